//! The service's one error type, mapped to a gRPC status and to an HTTP JSON answer here and
//! nowhere else.
//!
//! | variant | gRPC | HTTP |
//! |---|---|---|
//! | `InvalidArgument` | `INVALID_ARGUMENT` | 400 |
//! | `Unauthenticated` | `UNAUTHENTICATED` | 401 (with `WWW-Authenticate: Bearer`) |
//! | `PermissionDenied` | `PERMISSION_DENIED` | 403 |
//! | `NotFound` | `NOT_FOUND` | 404 |
//! | `Unavailable` | `UNAVAILABLE` | 503 |
//! | `Internal` | `INTERNAL` | 500 |
//!
//! HTTP bodies are `{"error": {"code": "invalid_argument", "message": "..."}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use service_kit::authn::AuthError;

/// Everything a registry call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message says what is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// No credentials, or credentials that prove nothing (see `service_kit::authn`).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller may not do this in this namespace.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The instance (or other object) does not exist (any more).
    #[error("{0}")]
    NotFound(String),
    /// The coordinator could not be reached; retry later.
    #[error("coordinator unavailable: {0}")]
    Unavailable(#[source] coord_client::Error),
    /// Anything else (a record that does not parse, an unexpected coordinator answer).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<registry_model::Invalid> for Error {
    /// A request that does not validate (see `registry_model`) is `InvalidArgument`.
    fn from(e: registry_model::Invalid) -> Error {
        Error::InvalidArgument(e.0)
    }
}

impl Error {
    /// An `InvalidArgument` error.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidArgument(message.into())
    }

    /// The code string used in HTTP bodies and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::PermissionDenied(_) => "permission_denied",
            Error::NotFound(_) => "not_found",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
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
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(message),
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::Unavailable(_) => tonic::Status::unavailable(message),
            Error::Internal(_) => tonic::Status::internal(message),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        let mut response = (self.http_status(), Json(body)).into_response();
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
    fn invalid_argument_is_400_and_grpc_invalid_argument() {
        let e = Error::invalid("port 0 is out of range");
        assert_eq!(e.http_status(), StatusCode::BAD_REQUEST);
        let s = tonic::Status::from(e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "port 0 is out of range");
    }

    #[test]
    fn auth_denials_are_401_and_403_in_both_faces() {
        let e = Error::from(AuthError::Unauthenticated("no token".into()));
        assert_eq!(e.http_status(), StatusCode::UNAUTHORIZED);
        let r = e.into_response();
        assert_eq!(r.headers()[axum::http::header::WWW_AUTHENTICATE], "Bearer");
        let e = Error::from(AuthError::Unauthenticated("no token".into()));
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unauthenticated);
        let e = Error::from(AuthError::PermissionDenied("alice may not".into()));
        assert_eq!(e.http_status(), StatusCode::FORBIDDEN);
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn not_found_and_unavailable_map_in_both_faces() {
        assert_eq!(
            Error::NotFound("x".into()).http_status(),
            StatusCode::NOT_FOUND
        );
        let e = Error::Unavailable(coord_client::Error::Timeout { what: "Range" });
        assert_eq!(e.http_status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
    }
}
