//! The auth changes a log entry can carry ([`AuthCmd`]) and the key permission they grant.
//! Applying them is `coordinator::auth`'s business; here are only the types, as the log
//! stores them.

use serde::{Deserialize, Serialize};

/// What a permission allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PermKind {
    /// Range, watch, compare, `prev_kv`.
    Read,
    /// Put, delete, lease revoke.
    Write,
    /// Both.
    ReadWrite,
}

impl PermKind {
    /// Whether reads are allowed.
    pub fn reads(self) -> bool {
        matches!(self, PermKind::Read | PermKind::ReadWrite)
    }

    /// Whether writes are allowed.
    pub fn writes(self) -> bool {
        matches!(self, PermKind::Write | PermKind::ReadWrite)
    }
}

/// One key permission of a role (replicated state).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Perm {
    /// READ, WRITE or READWRITE.
    pub kind: PermKind,
    /// First key.
    pub key: Vec<u8>,
    /// End of the range with etcd's conventions (empty = just `key`, `"\0"` = no end).
    pub end: Vec<u8>,
}

/// A change of the auth state (the replicated form of the Auth service's writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthCmd {
    /// Turn authentication on; `secret` signs simple tokens from now on (drawn by the proposer).
    Enable {
        /// Key of simple tokens (32 random bytes).
        secret: Vec<u8>,
    },
    /// Turn authentication off.
    Disable,
    /// Add a user; `hash` is the PHC string of its password, `None` for a user without one
    /// (it can authenticate only by a client certificate).
    UserAdd {
        /// Name.
        name: String,
        /// Password hash.
        hash: Option<String>,
    },
    /// Delete a user.
    UserDelete {
        /// Name.
        name: String,
    },
    /// Replace a user's password hash (its existing tokens stop working).
    UserChangePassword {
        /// Name.
        name: String,
        /// New password hash.
        hash: String,
    },
    /// Grant a role to a user.
    UserGrantRole {
        /// User.
        user: String,
        /// Role.
        role: String,
    },
    /// Revoke a role from a user.
    UserRevokeRole {
        /// User.
        user: String,
        /// Role.
        role: String,
    },
    /// Add a role.
    RoleAdd {
        /// Name.
        name: String,
    },
    /// Delete a role (and revoke it from every user).
    RoleDelete {
        /// Name.
        name: String,
    },
    /// Grant a permission to a role (replacing the kind of one on the same range).
    RoleGrantPermission {
        /// Role.
        role: String,
        /// Permission.
        perm: Perm,
    },
    /// Revoke the permission of a role on exactly this range.
    RoleRevokePermission {
        /// Role.
        role: String,
        /// Key.
        key: Vec<u8>,
        /// Range end.
        end: Vec<u8>,
    },
}

impl AuthCmd {
    /// Short name for metrics and traces.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthCmd::Enable { .. } => "auth_enable",
            AuthCmd::Disable => "auth_disable",
            AuthCmd::UserAdd { .. } => "user_add",
            AuthCmd::UserDelete { .. } => "user_delete",
            AuthCmd::UserChangePassword { .. } => "user_change_password",
            AuthCmd::UserGrantRole { .. } => "user_grant_role",
            AuthCmd::UserRevokeRole { .. } => "user_revoke_role",
            AuthCmd::RoleAdd { .. } => "role_add",
            AuthCmd::RoleDelete { .. } => "role_delete",
            AuthCmd::RoleGrantPermission { .. } => "role_grant_permission",
            AuthCmd::RoleRevokePermission { .. } => "role_revoke_permission",
        }
    }
}
