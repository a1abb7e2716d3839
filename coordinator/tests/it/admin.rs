//! The admin HTTP server (`--listen-metrics-urls`): liveness, readiness and metrics.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Server, put, within};

/// `GET path` over HTTP/1.0; returns (status code, body).
pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    within(Duration::from_secs(10), &format!("GET {path}"), async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the admin port");
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .expect("send request");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read response");
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {raw}"));
        (code, body.to_string())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_readyz_and_metrics_answer_on_the_metrics_port() {
    let server = Server::start().await;
    let addr = server.metrics_addr();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);

    let mut kv = server.kv().await;
    put(&mut kv, "m", "1").await;
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.lines()
            .any(|l| !l.starts_with('#') && !l.trim().is_empty()),
        "some samples:\n{body}"
    );
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF:\n{body}"
    );

    assert_eq!(get(addr, "/no-such-page").await.0, 404);
}
