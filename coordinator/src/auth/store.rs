//! The replicated auth state: users, roles, permissions, the enabled flag and the auth revision.
//!
//! It changes only through [`AuthCmd`]s applied by [`crate::state::StateMachine::apply`], so every
//! member holds the same users and roles at the same log index. Applying is cheap and
//! deterministic: password hashes are computed *before* proposing (by the member that took the
//! request), and the secret of simple tokens is drawn before proposing `Enable`. Every change
//! bumps the auth revision (etcd's `authRevision`) and is staged into the same backend batch as
//! the key space, under the `a` prefix (see [`crate::mvcc::keys`]), so it survives restarts and
//! travels in Raft snapshots.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::perm::{Perm, UserPerms};
use crate::error::{Error, Result};
use crate::mvcc::Backend;

/// The user and the role that hold every permission.
pub const ROOT: &str = "root";
/// Most users.
pub const MAX_USERS: usize = 1000;
/// Most roles.
pub const MAX_ROLES: usize = 1000;
/// Most permissions of one role.
pub const MAX_PERMS_PER_ROLE: usize = 256;
/// Most roles granted to one user.
pub const MAX_ROLES_PER_USER: usize = 64;
/// Longest user or role name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

// The command type is part of the log format and lives in `coord-log` (see `crate::command`).
pub use coord_log::auth::AuthCmd;

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRec {
    /// PHC string of the password hash; `None` = no password.
    pub hash: Option<String>,
    /// Roles granted.
    pub roles: BTreeSet<String>,
    /// Auth revision of the user's creation or last password change: tokens issued before it
    /// are no longer valid.
    pub cred_revision: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    enabled: bool,
    revision: u64,
    secret: Vec<u8>,
}

/// The auth state (replicated).
#[derive(Debug, Clone, Default)]
pub struct AuthState {
    meta: Meta,
    users: BTreeMap<String, UserRec>,
    roles: BTreeMap<String, Vec<Perm>>,
}

/// What the request path needs, derived from [`AuthState`] once per auth revision and shared
/// read-only: permissions are merged per user here, not per request.
#[derive(Debug, Default)]
pub struct AuthView {
    /// Authentication on.
    pub enabled: bool,
    /// Auth revision.
    pub revision: u64,
    /// Key of simple tokens.
    pub secret: Vec<u8>,
    /// Every user's merged permissions and credential revision.
    pub users: HashMap<String, (Arc<UserPerms>, u64)>,
}

impl AuthView {
    /// A user's permissions and credential revision.
    pub fn user(&self, name: &str) -> Option<&(Arc<UserPerms>, u64)> {
        self.users.get(name)
    }
}

const META_KEY: &[u8] = b"ameta";
const USER_PREFIX: &[u8] = b"au/";
const ROLE_PREFIX: &[u8] = b"ar/";

fn user_key(name: &str) -> Vec<u8> {
    let mut k = USER_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn role_key(name: &str) -> Vec<u8> {
    let mut k = ROLE_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// A staged backend write: key and value (`None` deletes).
pub type Staged = (Vec<u8>, Option<Vec<u8>>);

impl AuthState {
    /// Load from the backend.
    pub fn load(backend: &Arc<dyn Backend>) -> Result<AuthState> {
        let mut st = AuthState::default();
        if let Some(v) = backend.get(META_KEY)? {
            st.meta = bincode::deserialize(&v)?;
        }
        let mut err = None;
        let mut end = USER_PREFIX.to_vec();
        if let Some(l) = end.last_mut() {
            *l += 1;
        }
        backend.scan(USER_PREFIX, &end, &mut |k, v| match (
            String::from_utf8(k[USER_PREFIX.len()..].to_vec()),
            bincode::deserialize::<UserRec>(v),
        ) {
            (Ok(name), Ok(rec)) => {
                st.users.insert(name, rec);
                true
            }
            _ => {
                err = Some(Error::Corrupt("undecodable auth user record".into()));
                false
            }
        })?;
        let mut end = ROLE_PREFIX.to_vec();
        if let Some(l) = end.last_mut() {
            *l += 1;
        }
        backend.scan(ROLE_PREFIX, &end, &mut |k, v| match (
            String::from_utf8(k[ROLE_PREFIX.len()..].to_vec()),
            bincode::deserialize::<Vec<Perm>>(v),
        ) {
            (Ok(name), Ok(perms)) => {
                st.roles.insert(name, perms);
                true
            }
            _ => {
                err = Some(Error::Corrupt("undecodable auth role record".into()));
                false
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        Ok(st)
    }

    /// Authentication on.
    pub fn enabled(&self) -> bool {
        self.meta.enabled
    }

    /// Auth revision.
    pub fn revision(&self) -> u64 {
        self.meta.revision
    }

    /// Users by name.
    pub fn users(&self) -> &BTreeMap<String, UserRec> {
        &self.users
    }

    /// Roles by name with their permissions.
    pub fn roles(&self) -> &BTreeMap<String, Vec<Perm>> {
        &self.roles
    }

    /// Derive the request path's view.
    pub fn view(&self) -> AuthView {
        let users = self
            .users
            .iter()
            .map(|(name, rec)| {
                let root = rec.roles.contains(ROOT);
                let perms = rec
                    .roles
                    .iter()
                    .filter_map(|r| self.roles.get(r))
                    .flat_map(|p| p.iter());
                (
                    name.clone(),
                    (Arc::new(UserPerms::build(root, perms)), rec.cred_revision),
                )
            })
            .collect();
        AuthView {
            enabled: self.meta.enabled,
            revision: self.meta.revision,
            secret: self.meta.secret.clone(),
            users,
        }
    }

    /// Apply one change. Nothing changes when it is refused; on success the auth revision moves
    /// by one and the backend writes to stage are returned.
    pub fn apply(&mut self, cmd: &AuthCmd) -> Result<Vec<Staged>> {
        let mut staged = Vec::new();
        let next = self.meta.revision + 1;
        match cmd {
            AuthCmd::Enable { secret } => {
                if self.meta.enabled {
                    // etcd answers success and changes nothing.
                    return Ok(staged);
                }
                let Some(root) = self.users.get(ROOT) else {
                    return Err(Error::RootUserNotExist);
                };
                if !root.roles.contains(ROOT) {
                    return Err(Error::RootRoleNotExist);
                }
                self.meta.enabled = true;
                self.meta.secret = secret.clone();
            }
            AuthCmd::Disable => {
                self.meta.enabled = false;
            }
            AuthCmd::UserAdd { name, hash } => {
                if self.users.contains_key(name) {
                    return Err(Error::UserAlreadyExist);
                }
                if self.users.len() >= MAX_USERS {
                    return Err(Error::AuthLimit(format!(
                        "too many users (limit {MAX_USERS})"
                    )));
                }
                let rec = UserRec {
                    hash: hash.clone(),
                    roles: BTreeSet::new(),
                    cred_revision: next,
                };
                staged.push(self.put_user(name, rec)?);
            }
            AuthCmd::UserDelete { name } => {
                if self.meta.enabled && name == ROOT {
                    return Err(Error::InvalidAuthMgmt);
                }
                if self.users.remove(name).is_none() {
                    return Err(Error::UserNotFound);
                }
                staged.push((user_key(name), None));
            }
            AuthCmd::UserChangePassword { name, hash } => {
                let Some(rec) = self.users.get(name) else {
                    return Err(Error::UserNotFound);
                };
                let mut rec = rec.clone();
                rec.hash = Some(hash.clone());
                rec.cred_revision = next;
                staged.push(self.put_user(name, rec)?);
            }
            AuthCmd::UserGrantRole { user, role } => {
                let Some(rec) = self.users.get(user) else {
                    return Err(Error::UserNotFound);
                };
                // The root role need not exist as a record (etcd lets it be granted anyway).
                if role != ROOT && !self.roles.contains_key(role) {
                    return Err(Error::RoleNotFound);
                }
                if rec.roles.contains(role) {
                    return Ok(staged);
                }
                if rec.roles.len() >= MAX_ROLES_PER_USER {
                    return Err(Error::AuthLimit(format!(
                        "too many roles granted to user {user} (limit {MAX_ROLES_PER_USER})"
                    )));
                }
                let mut rec = rec.clone();
                rec.roles.insert(role.clone());
                staged.push(self.put_user(user, rec)?);
            }
            AuthCmd::UserRevokeRole { user, role } => {
                if self.meta.enabled && user == ROOT && role == ROOT {
                    return Err(Error::InvalidAuthMgmt);
                }
                let Some(rec) = self.users.get(user) else {
                    return Err(Error::UserNotFound);
                };
                if !rec.roles.contains(role) {
                    return Err(Error::RoleNotGranted);
                }
                let mut rec = rec.clone();
                rec.roles.remove(role);
                staged.push(self.put_user(user, rec)?);
            }
            AuthCmd::RoleAdd { name } => {
                if self.roles.contains_key(name) {
                    return Err(Error::RoleAlreadyExist);
                }
                if self.roles.len() >= MAX_ROLES {
                    return Err(Error::AuthLimit(format!(
                        "too many roles (limit {MAX_ROLES})"
                    )));
                }
                staged.push(self.put_role(name, Vec::new())?);
            }
            AuthCmd::RoleDelete { name } => {
                if self.meta.enabled && name == ROOT {
                    return Err(Error::InvalidAuthMgmt);
                }
                if self.roles.remove(name).is_none() {
                    return Err(Error::RoleNotFound);
                }
                staged.push((role_key(name), None));
                let holders: Vec<String> = self
                    .users
                    .iter()
                    .filter(|(_, r)| r.roles.contains(name))
                    .map(|(n, _)| n.clone())
                    .collect();
                for u in holders {
                    if let Some(rec) = self.users.get(&u) {
                        let mut rec = rec.clone();
                        rec.roles.remove(name);
                        staged.push(self.put_user(&u, rec)?);
                    }
                }
            }
            AuthCmd::RoleGrantPermission { role, perm } => {
                let Some(perms) = self.roles.get(role) else {
                    return Err(Error::RoleNotFound);
                };
                let mut perms = perms.clone();
                match perms
                    .iter_mut()
                    .find(|p| p.key == perm.key && p.end == perm.end)
                {
                    Some(p) => p.kind = perm.kind,
                    None => {
                        if perms.len() >= MAX_PERMS_PER_ROLE {
                            return Err(Error::AuthLimit(format!(
                                "too many permissions in role {role} (limit {MAX_PERMS_PER_ROLE})"
                            )));
                        }
                        perms.push(perm.clone());
                        perms.sort_by(|a, b| (&a.key, &a.end).cmp(&(&b.key, &b.end)));
                    }
                }
                staged.push(self.put_role(role, perms)?);
            }
            AuthCmd::RoleRevokePermission { role, key, end } => {
                let Some(perms) = self.roles.get(role) else {
                    return Err(Error::RoleNotFound);
                };
                let before = perms.len();
                let perms: Vec<Perm> = perms
                    .iter()
                    .filter(|p| !(p.key == *key && p.end == *end))
                    .cloned()
                    .collect();
                if perms.len() == before {
                    return Err(Error::PermissionNotGranted);
                }
                staged.push(self.put_role(role, perms)?);
            }
        }
        self.meta.revision = next;
        staged.push((META_KEY.to_vec(), Some(bincode::serialize(&self.meta)?)));
        Ok(staged)
    }

    fn put_user(&mut self, name: &str, rec: UserRec) -> Result<Staged> {
        let v = bincode::serialize(&rec)?;
        self.users.insert(name.to_string(), rec);
        Ok((user_key(name), Some(v)))
    }

    fn put_role(&mut self, name: &str, perms: Vec<Perm>) -> Result<Staged> {
        let v = bincode::serialize(&perms)?;
        self.roles.insert(name.to_string(), perms);
        Ok((role_key(name), Some(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::perm::PermKind;

    fn user(name: &str) -> AuthCmd {
        AuthCmd::UserAdd {
            name: name.into(),
            hash: Some("h".into()),
        }
    }

    #[test]
    fn enable_needs_root_with_the_root_role_and_root_cannot_be_locked_out() {
        let mut a = AuthState::default();
        let enable = AuthCmd::Enable {
            secret: vec![1; 32],
        };
        assert!(matches!(a.apply(&enable), Err(Error::RootUserNotExist)));
        a.apply(&user(ROOT)).expect("add root");
        assert!(matches!(a.apply(&enable), Err(Error::RootRoleNotExist)));
        a.apply(&AuthCmd::UserGrantRole {
            user: ROOT.into(),
            role: ROOT.into(),
        })
        .expect("grant root without a root role record");
        let rev = a.revision();
        a.apply(&enable).expect("enable");
        assert!(a.enabled());
        assert_eq!(a.revision(), rev + 1);
        assert!(matches!(
            a.apply(&AuthCmd::UserDelete { name: ROOT.into() }),
            Err(Error::InvalidAuthMgmt)
        ));
        assert!(matches!(
            a.apply(&AuthCmd::UserRevokeRole {
                user: ROOT.into(),
                role: ROOT.into()
            }),
            Err(Error::InvalidAuthMgmt)
        ));
        // A refused change does not move the revision.
        assert_eq!(a.revision(), rev + 1);
        assert!(a.view().user(ROOT).expect("root").0.root);
    }

    #[test]
    fn roles_permissions_and_limits() {
        let mut a = AuthState::default();
        a.apply(&user("u")).expect("u");
        assert!(matches!(a.apply(&user("u")), Err(Error::UserAlreadyExist)));
        assert!(matches!(
            a.apply(&AuthCmd::UserGrantRole {
                user: "u".into(),
                role: "r".into()
            }),
            Err(Error::RoleNotFound)
        ));
        a.apply(&AuthCmd::RoleAdd { name: "r".into() }).expect("r");
        let p = Perm {
            kind: PermKind::Read,
            key: b"a".to_vec(),
            end: b"b".to_vec(),
        };
        a.apply(&AuthCmd::RoleGrantPermission {
            role: "r".into(),
            perm: p.clone(),
        })
        .expect("grant");
        // Same range again: the kind is replaced, not added.
        a.apply(&AuthCmd::RoleGrantPermission {
            role: "r".into(),
            perm: Perm {
                kind: PermKind::ReadWrite,
                ..p.clone()
            },
        })
        .expect("regrant");
        assert_eq!(a.roles()["r"].len(), 1);
        assert_eq!(a.roles()["r"][0].kind, PermKind::ReadWrite);
        a.apply(&AuthCmd::UserGrantRole {
            user: "u".into(),
            role: "r".into(),
        })
        .expect("grant role");
        let v = a.view();
        v.user("u")
            .expect("u")
            .0
            .write(&crate::command::KeyRange::single(b"a1".to_vec()))
            .expect("write a1");
        a.apply(&AuthCmd::RoleDelete { name: "r".into() })
            .expect("delete role");
        assert!(a.users()["u"].roles.is_empty());
        assert!(matches!(
            a.apply(&AuthCmd::RoleRevokePermission {
                role: "r".into(),
                key: b"a".to_vec(),
                end: b"b".to_vec()
            }),
            Err(Error::RoleNotFound)
        ));
        a.apply(&AuthCmd::RoleAdd { name: "r2".into() })
            .expect("r2");
        for i in 0..MAX_PERMS_PER_ROLE {
            a.apply(&AuthCmd::RoleGrantPermission {
                role: "r2".into(),
                perm: Perm {
                    kind: PermKind::Read,
                    key: format!("k{i}").into_bytes(),
                    end: Vec::new(),
                },
            })
            .expect("under the limit");
        }
        let e = a
            .apply(&AuthCmd::RoleGrantPermission {
                role: "r2".into(),
                perm: Perm {
                    kind: PermKind::Read,
                    key: b"one-more".to_vec(),
                    end: Vec::new(),
                },
            })
            .expect_err("over the limit");
        assert!(e.to_string().contains("too many permissions"), "{e}");
    }

    #[test]
    fn user_and_role_counts_are_limited() {
        let mut a = AuthState::default();
        for i in 0..MAX_USERS {
            a.apply(&user(&format!("u{i}"))).expect("under the limit");
        }
        let e = a.apply(&user("one-more")).expect_err("over the limit");
        assert_eq!(e.to_string(), "etcdserver: too many users (limit 1000)");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        for i in 0..MAX_ROLES {
            a.apply(&AuthCmd::RoleAdd {
                name: format!("r{i}"),
            })
            .expect("under the limit");
        }
        let e = a
            .apply(&AuthCmd::RoleAdd {
                name: "one-more".into(),
            })
            .expect_err("over the limit");
        assert_eq!(e.to_string(), "etcdserver: too many roles (limit 1000)");
        for i in 0..MAX_ROLES_PER_USER {
            a.apply(&AuthCmd::UserGrantRole {
                user: "u0".into(),
                role: format!("r{i}"),
            })
            .expect("under the limit");
        }
        let e = a
            .apply(&AuthCmd::UserGrantRole {
                user: "u0".into(),
                role: "r999".into(),
            })
            .expect_err("over the limit");
        assert!(
            e.to_string().contains("too many roles granted to user u0"),
            "{e}"
        );
    }

    #[test]
    fn state_round_trips_through_the_backend() {
        let backend: Arc<dyn Backend> = Arc::new(crate::mvcc::MemBackend::default());
        let mut a = AuthState::default();
        let mut batch = crate::mvcc::Batch::default();
        for c in [
            user(ROOT),
            AuthCmd::UserGrantRole {
                user: ROOT.into(),
                role: ROOT.into(),
            },
            AuthCmd::RoleAdd { name: "r".into() },
            AuthCmd::Enable {
                secret: vec![7; 32],
            },
        ] {
            for (k, v) in a.apply(&c).expect("apply") {
                match v {
                    Some(v) => batch.put(k, v),
                    None => batch.delete(k),
                }
            }
        }
        backend.apply(batch).expect("write");
        let b = AuthState::load(&backend).expect("load");
        assert!(b.enabled());
        assert_eq!(b.revision(), a.revision());
        assert_eq!(b.users(), a.users());
        assert_eq!(b.roles(), a.roles());
        assert_eq!(b.view().secret, vec![7; 32]);
        assert_eq!(META_KEY[0], crate::mvcc::keys::AUTH);
    }
}
