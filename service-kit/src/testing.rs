//! Assertions that the tests of several services share (their integration tests link this
//! crate anyway). Kept out of each test tree so the rule they encode — what a refused TLS
//! handshake looks like to a tonic client — is written once.

/// Asserts that `err` is a refused TLS handshake. The status must be the client transport's
/// own (it carries a `tonic::transport::Error`; a status the server answered with carries
/// none), so no request was served. Which code it has depends on timing: `Unavailable` when
/// the client learns it during the handshake; with TLS 1.3 the server refuses the client's
/// certificate after the client finished its part, so the first request sees the server's
/// alert (`CertificateRequired`, `UnknownCA`: `Unknown`, "transport error"), the connection
/// closing (`Cancelled`), or, when the request's bytes reach a socket the server already
/// closed, a reset (`Unknown`).
#[track_caller]
pub fn assert_tls_refused(err: &tonic::Status) {
    let from_transport =
        std::error::Error::source(err).is_some_and(|e| e.is::<tonic::transport::Error>());
    assert!(
        from_transport
            && matches!(
                err.code(),
                tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
            ),
        "expected a refused connection, got {}",
        status_chain(err)
    );
}

/// The status and every error under it, for failure messages.
pub fn status_chain(err: &tonic::Status) -> String {
    let mut out = format!("{err}");
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(err);
    while let Some(e) = cur {
        out.push_str(&format!(" <- {e}"));
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_the_server_answered_with_is_not_a_refused_handshake() {
        let answered = tonic::Status::unavailable("the server said so");
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_tls_refused(&answered)
        }));
        assert!(
            caught.is_err(),
            "a server's own status passed as a refused handshake"
        );
    }

    #[test]
    fn the_chain_names_every_error_under_the_status() {
        let inner = std::io::Error::other("connection reset");
        let status = tonic::Status::from_error(Box::new(inner));
        let chain = status_chain(&status);
        assert!(chain.contains("connection reset"), "{chain}");
    }
}
