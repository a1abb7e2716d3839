//! The coordinator's one error type, and its translation to gRPC statuses.
//!
//! etcd clients match on the gRPC code *and* the exact message text (for example
//! `etcdserver: mvcc: required revision has been compacted`), so every variant that etcd also has
//! carries etcd's text verbatim. The mapping lives here and nowhere else.

use tonic::{Code, Status};

/// Everything that can go wrong while serving a request or applying a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request named no key where one is required.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value` / `ignore_lease` on a key that does not exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// `ignore_value` set together with a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// `ignore_lease` set together with a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A txn branch with more operations than `--max-txn-ops`.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// Two writes to the same key in one txn branch.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// A request larger than `--max-request-bytes`.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// The requested revision was removed by compaction.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted {
        /// The store's compacted revision.
        compact_revision: i64,
    },
    /// The requested revision has not happened yet.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// The lease does not exist (never granted, revoked or expired).
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A lease with the requested ID already exists.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// The TTL asked for is above the maximum.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// `--max-leases` leases are alive already.
    #[error("etcdserver: too many leases (limit {limit})")]
    TooManyLeases {
        /// The configured limit.
        limit: usize,
    },
    /// The backend is over its quota; only reads and deletes are served until space is freed.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// The member has no leader to order writes.
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The request was proposed but not committed in time; it may still take effect.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The server is shutting down.
    #[error("etcdserver: server stopped")]
    Stopped,
    /// The member named in a cluster request does not exist.
    #[error("etcdserver: member not found")]
    MemberNotFound,
    /// A request only the leader serves (`MoveLeader`) reached a member that does not lead.
    #[error("etcdserver: not leader")]
    NotLeader,
    /// `MoveLeader` to a member that does not exist or is a learner.
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// `MoveLeader` did not see the transferee lead in time; the old leader keeps (or regains)
    /// leadership, unless the transferee's campaign still wins later.
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    /// A request the server understands but cannot serve in this mode.
    #[error("etcdserver: {0}")]
    Unsupported(String),
    /// A malformed request (bad enum value, bad argument).
    #[error("etcdserver: {0}")]
    InvalidArgument(String),
    /// The on-disk state is damaged; the server refuses to go on rather than serve wrong data.
    #[error("storage corrupted: {0}")]
    Corrupt(String),
    /// The storage engine failed.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// Auth is enabled and the request names no user (no token).
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// Authenticate with an unknown user or a wrong password.
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// The user may not do this.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// The token is malformed, badly signed, expired, or its user changed since.
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// Authenticate while auth is disabled.
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// `auth enable` without a root user.
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    /// `auth enable` while the root user lacks the root role.
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    /// The user exists already.
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    /// No such user.
    #[error("etcdserver: user name not found")]
    UserNotFound,
    /// The role exists already.
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    /// No such role.
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    /// A role request with an empty name.
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    /// A grant without a permission.
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    /// Revoking a role the user does not have.
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    /// Revoking a permission the role does not have.
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    /// A change that would lock root out while auth is on (delete root, revoke its role).
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// Too many users, roles or permissions.
    #[error("etcdserver: {0}")]
    AuthLimit(String),
    /// An error raised on another member, carried with its gRPC code and text.
    #[error("{message}")]
    Remote {
        /// gRPC code.
        code: i32,
        /// Message as the client will see it.
        message: String,
    },
    /// The operating system failed an I/O call.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code etcd uses for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::EmptyKey
            | Error::KeyNotFound
            | Error::ValueProvided
            | Error::LeaseProvided
            | Error::TooManyOps
            | Error::DuplicateKey
            | Error::RequestTooLarge
            | Error::InvalidArgument(_)
            | Error::UserEmpty
            | Error::AuthFailed
            | Error::RoleEmpty
            | Error::PermissionNotGiven
            | Error::InvalidAuthMgmt => Code::InvalidArgument,
            Error::PermissionDenied => Code::PermissionDenied,
            Error::InvalidAuthToken => Code::Unauthenticated,
            Error::AuthNotEnabled
            | Error::RootUserNotExist
            | Error::RootRoleNotExist
            | Error::UserAlreadyExist
            | Error::UserNotFound
            | Error::RoleAlreadyExist
            | Error::RoleNotFound
            | Error::RoleNotGranted
            | Error::PermissionNotGranted
            | Error::AuthLimit(_)
            | Error::NotLeader
            | Error::BadLeaderTransferee => Code::FailedPrecondition,
            Error::Compacted { .. } | Error::FutureRevision | Error::LeaseTtlTooLarge => {
                Code::OutOfRange
            }
            Error::LeaseNotFound | Error::MemberNotFound => Code::NotFound,
            Error::LeaseExists => Code::FailedPrecondition,
            Error::NoSpace | Error::TooManyLeases { .. } => Code::ResourceExhausted,
            Error::NoLeader | Error::Stopped | Error::Timeout | Error::LeaderTransferTimeout => {
                Code::Unavailable
            }
            Error::Unsupported(_) => Code::Unimplemented,
            Error::Corrupt(_) => Code::DataLoss,
            Error::Storage(_) | Error::Io(_) => Code::Internal,
            Error::Remote { code, .. } => Code::from(*code),
        }
    }
}

impl Error {
    /// Rebuild an error that crossed the network; known etcd errors get their variant back.
    pub fn from_wire(e: crate::state::ErrorWire) -> Error {
        if e.compact_revision != 0 {
            return Error::Compacted {
                compact_revision: e.compact_revision,
            };
        }
        let known = [
            Error::LeaseNotFound,
            Error::LeaseExists,
            Error::LeaseTtlTooLarge,
            Error::KeyNotFound,
            Error::FutureRevision,
            Error::NoSpace,
            Error::NoLeader,
            Error::Timeout,
            Error::PermissionDenied,
            Error::UserEmpty,
            Error::InvalidAuthToken,
        ];
        for k in known {
            if k.to_string() == e.message {
                return k;
            }
        }
        Error::Remote {
            code: e.code,
            message: e.message,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

impl From<coord_log::validate::Invalid> for Error {
    /// The variant of the same name and text (`TooDeep` is an `InvalidArgument`).
    fn from(e: coord_log::validate::Invalid) -> Error {
        use coord_log::validate::Invalid;
        match e {
            Invalid::EmptyKey => Error::EmptyKey,
            Invalid::ValueProvided => Error::ValueProvided,
            Invalid::LeaseProvided => Error::LeaseProvided,
            Invalid::TooManyOps => Error::TooManyOps,
            Invalid::DuplicateKey => Error::DuplicateKey,
            Invalid::TooDeep(m) => Error::InvalidArgument(m),
        }
    }
}

impl From<bincode::Error> for Error {
    fn from(e: bincode::Error) -> Error {
        Error::Corrupt(format!("undecodable record: {e}"))
    }
}
