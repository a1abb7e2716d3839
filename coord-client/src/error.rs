//! The crate's one error type.

use tonic::{Code, Status};

/// What a coordinator call can fail with. Variants are those a caller acts on differently.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No endpoint answered within the retry deadline.
    #[error("coordinator unavailable ({what}): {last}")]
    Unavailable {
        /// The call that failed.
        what: &'static str,
        /// The last attempt's failure.
        #[source]
        last: Box<Error>,
    },
    /// A write that must not be repeated blindly failed in a way that leaves open whether it
    /// was applied; the caller must read to find out.
    #[error("outcome of {what} unknown: {source}")]
    Uncertain {
        /// The call that failed.
        what: &'static str,
        /// The failure.
        #[source]
        source: Status,
    },
    /// One attempt took longer than the request timeout.
    #[error("{what} timed out")]
    Timeout {
        /// The call that timed out.
        what: &'static str,
    },
    /// The revision asked for was compacted away.
    #[error("required revision has been compacted (compacted revision {compact_revision})")]
    Compacted {
        /// The coordinator's compacted revision.
        compact_revision: i64,
    },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease not found")]
    LeaseNotFound,
    /// An endpoint that cannot be parsed.
    #[error("invalid coordinator endpoint {0}")]
    InvalidEndpoint(String),
    /// Any other answer of the coordinator (bad argument, quota, ...).
    #[error("coordinator answered {}: {}", .0.code(), .0.message())]
    Status(#[source] Status),
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Maps a coordinator status to the variant a caller acts on.
    pub fn from_status(status: Status) -> Error {
        let message = status.message();
        if status.code() == Code::NotFound && message.contains("lease not found") {
            Error::LeaseNotFound
        } else if status.code() == Code::OutOfRange && message.contains("has been compacted") {
            Error::Compacted {
                compact_revision: 0,
            }
        } else {
            Error::Status(status)
        }
    }

    /// True if the coordinator could not be reached (as opposed to a refusal).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::Timeout { .. } | Error::Uncertain { .. }
        )
    }
}
