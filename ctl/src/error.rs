//! The tool's one error type. Every variant prints as one line that names what failed and
//! where, since that line is all a user sees (no backtraces).

use std::time::Duration;

use tonic::{Code, Status};

/// What a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing answered at the address (connection refused, no route, DNS).
    #[error("cannot reach {service} at {addr}: {detail}")]
    Unreachable {
        /// Which service.
        service: &'static str,
        /// The address(es) tried.
        addr: String,
        /// The cause, e.g. "connection refused".
        detail: String,
    },
    /// The call took longer than `--timeout`.
    #[error("{service} at {addr} did not answer within {timeout:?}")]
    Timeout {
        /// Which service.
        service: &'static str,
        /// The address(es) tried.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
    /// The service answered with a refusal (not found, invalid argument, conflict ...).
    #[error("{service}: {message} ({code})")]
    Refused {
        /// Which service.
        service: &'static str,
        /// The gRPC code or HTTP status.
        code: String,
        /// Its message.
        message: String,
    },
    /// A bad argument the parser could not catch.
    #[error("{0}")]
    Usage(String),
    /// A local file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl CtlError {
    /// The process exit code for this error (2 for usage, as clap's own; 1 otherwise).
    pub fn exit_code(&self) -> i32 {
        match self {
            CtlError::Usage(_) => 2,
            _ => 1,
        }
    }

    /// Maps a gRPC status from `service` at `addr`.
    pub fn from_status(service: &'static str, addr: &str, status: Status) -> CtlError {
        if let Some(detail) = connect_failure(&status) {
            return CtlError::Unreachable {
                service,
                addr: addr.to_owned(),
                detail,
            };
        }
        CtlError::Refused {
            service,
            code: code_name(status.code()).to_owned(),
            message: status.message().to_owned(),
        }
    }
}

/// If `status` says the connection failed (rather than the server refusing), the innermost
/// cause in words.
fn connect_failure(status: &Status) -> Option<String> {
    let transport = status.code() == Code::Unavailable
        || status.message().contains("transport error")
        || status.message().contains("connect");
    if !transport {
        return None;
    }
    // The innermost cause is the clearest ("Connection refused (os error 111)").
    let mut detail = None;
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            detail = Some(io_words(io));
        } else if detail.is_none() {
            detail = Some(err.to_string());
        }
        source = err.source();
    }
    match detail {
        Some(d) => Some(d),
        // A server that answered UNAVAILABLE itself (e.g. "etcdserver: no leader") has no
        // transport cause: report it as a refusal with its message.
        None if status.message().to_ascii_lowercase().contains("connect") => {
            Some(status.message().to_owned())
        }
        None => None,
    }
}

/// An I/O error in plain words ("connection refused", not "Connection refused (os error 111)").
pub fn io_words(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        TimedOut => "connection timed out".into(),
        AddrNotAvailable => "address not available".into(),
        _ => e.to_string(),
    }
}

/// The canonical name of a gRPC code (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Shorthand for the tool's results.
pub type Result<T, E = CtlError> = std::result::Result<T, E>;
