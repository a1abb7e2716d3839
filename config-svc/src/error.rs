//! The service's one error type, mapped to a gRPC status and to an HTTP JSON answer here and
//! nowhere else.
//!
//! | variant | gRPC | HTTP | when |
//! |---|---|---|---|
//! | `InvalidArgument` | `INVALID_ARGUMENT` | 400 | a bad name, size, page token, version 0 ... |
//! | `Invalid` | `INVALID_ARGUMENT` | 400 | content that does not parse or violates the schema (with line/column/path) |
//! | `Unauthenticated` | `UNAUTHENTICATED` | 401 | no or bad credentials (with `WWW-Authenticate: Bearer`) |
//! | `PermissionDenied` | `PERMISSION_DENIED` | 403 | the caller lacks the permission in the namespace |
//! | `NotFound` | `NOT_FOUND` | 404 | unknown item, deleted item's current version, version out of range |
//! | `Conflict` | `ABORTED` | 409 | compare-and-set lost: the current version is not the expected one |
//! | `FailedPrecondition` | `FAILED_PRECONDITION` | 409 | the item's state forbids it (rollout in progress, purge before delete) |
//! | `Unavailable` | `UNAVAILABLE` | 503 | the coordinator could not be reached |
//! | `Internal` | `INTERNAL` | 500 | a record that does not parse, an unexpected answer |
//!
//! HTTP bodies are `{"error": {"code": "invalid_argument", "message": "...", "problems": [...]}}`
//! (`problems` only for `Invalid`).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use service_kit::authn::AuthError;

use crate::validate::Problem;

/// Everything a configuration call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message says what is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// The content does not parse in its format or violates the item's schema.
    #[error("{message}")]
    Invalid {
        /// A summary naming the first problem and its position.
        message: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
    /// No credentials, or credentials that prove nothing (see `service_kit::authn`).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller may not do this in this namespace.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The item or version does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A compare-and-set failed: someone else changed the item first.
    #[error("{0}")]
    Conflict(String),
    /// The item's state does not allow the operation now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The coordinator could not be reached; retry later.
    #[error("coordinator unavailable: {0}")]
    Unavailable(#[source] coord_client::Error),
    /// Anything else.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<config_formats::Error> for Error {
    /// The same variant, with the same text.
    fn from(e: config_formats::Error) -> Error {
        match e {
            config_formats::Error::InvalidArgument(m) => Error::InvalidArgument(m),
            config_formats::Error::Invalid { message, problems } => {
                Error::Invalid { message, problems }
            }
        }
    }
}

impl Error {
    /// An `InvalidArgument` error.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidArgument(message.into())
    }

    /// The code string used in HTTP bodies and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) | Error::Invalid { .. } => "invalid_argument",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::PermissionDenied(_) => "permission_denied",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            Error::InvalidArgument(_) | Error::Invalid { .. } => StatusCode::BAD_REQUEST,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) | Error::FailedPrecondition(_) => StatusCode::CONFLICT,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body of the HTTP answer.
    pub fn to_json(&self) -> serde_json::Value {
        let mut error = json!({ "code": self.code(), "message": self.to_string() });
        if let Error::Invalid { problems, .. } = self {
            error["problems"] = json!(problems);
        }
        json!({ "error": error })
    }
}

impl From<coord_client::Error> for Error {
    fn from(e: coord_client::Error) -> Error {
        if e.is_unavailable() {
            Error::Unavailable(e)
        } else {
            Error::Internal(e.to_string())
        }
    }
}

impl From<AuthError> for Error {
    fn from(e: AuthError) -> Error {
        match e {
            AuthError::Unauthenticated(m) => Error::Unauthenticated(m),
            AuthError::PermissionDenied(m) => Error::PermissionDenied(m),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let message = e.to_string();
        match e {
            Error::InvalidArgument(_) | Error::Invalid { .. } => {
                tonic::Status::invalid_argument(message)
            }
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(message),
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::Conflict(_) => tonic::Status::aborted(message),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            Error::Unavailable(_) => tonic::Status::unavailable(message),
            Error::Internal(_) => tonic::Status::internal(message),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut response = (self.http_status(), Json(self.to_json())).into_response();
        if let Error::Unauthenticated(_) = self {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_maps_to_one_grpc_code_and_one_http_status() {
        let cases = [
            (
                Error::invalid("x"),
                tonic::Code::InvalidArgument,
                StatusCode::BAD_REQUEST,
            ),
            (
                Error::Unauthenticated("x".into()),
                tonic::Code::Unauthenticated,
                StatusCode::UNAUTHORIZED,
            ),
            (
                Error::PermissionDenied("x".into()),
                tonic::Code::PermissionDenied,
                StatusCode::FORBIDDEN,
            ),
            (
                Error::NotFound("x".into()),
                tonic::Code::NotFound,
                StatusCode::NOT_FOUND,
            ),
            (
                Error::Conflict("x".into()),
                tonic::Code::Aborted,
                StatusCode::CONFLICT,
            ),
            (
                Error::FailedPrecondition("x".into()),
                tonic::Code::FailedPrecondition,
                StatusCode::CONFLICT,
            ),
            (
                Error::Unavailable(coord_client::Error::Timeout { what: "Range" }),
                tonic::Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (e, code, http) in cases {
            assert_eq!(e.http_status(), http);
            assert_eq!(tonic::Status::from(e).code(), code);
        }
    }

    #[test]
    fn invalid_content_carries_its_problems_in_the_http_body() {
        let e = Error::Invalid {
            message: "line 2, column 3: expected value".into(),
            problems: vec![Problem {
                message: "expected value".into(),
                line: 2,
                column: 3,
                path: String::new(),
            }],
        };
        let body = e.to_json();
        assert_eq!(body["error"]["code"], "invalid_argument");
        assert_eq!(body["error"]["problems"][0]["line"], 2);
        assert_eq!(body["error"]["problems"][0]["column"], 3);
    }
}
