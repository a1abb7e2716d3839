//! The admin server, served in process on an ephemeral port.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use service_kit::admin::{self, Health, Metrics};
use service_kit::probe::check_health;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Server {
    addr: SocketAddr,
    health: Health,
    metrics: Metrics,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let health = Health::new();
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(admin::serve(
        listener,
        admin::router(health.clone(), metrics.clone()),
        shutdown.clone(),
    ));
    Server {
        addr,
        health,
        metrics,
        shutdown,
        task,
    }
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("serve returns promptly after cancel")
            .expect("serve task did not panic");
        result.expect("serve returns Ok");
    }
}

struct Reply {
    status: u16,
    content_type: Option<String>,
    body: String,
}

/// A raw HTTP/1.1 GET, so the test depends on no HTTP client.
async fn get(addr: SocketAddr, method_and_path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request =
        format!("{method_and_path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let content_type = lines
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.to_owned());
    Reply {
        status,
        content_type,
        body: body.to_owned(),
    }
}

async fn probe(addr: SocketAddr, path: &'static str) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        check_health(&addr.to_string(), path, Duration::from_secs(2))
    })
    .await
    .expect("probe task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_ok_json_while_running() {
    let server = start().await;
    let reply = get(server.addr, "GET /healthz").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    assert_eq!(reply.body, r#"{"status":"ok"}"#);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_set_ready_then_200() {
    let server = start().await;
    let reply = get(server.addr, "GET /readyz").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body, r#"{"status":"not ready"}"#);

    server.health.set_ready(true);
    let reply = get(server.addr, "GET /readyz").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, r#"{"status":"ready"}"#);

    server.health.set_ready(false);
    assert_eq!(get(server.addr, "GET /readyz").await.status, 503);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exposes_service_counters_as_openmetrics() {
    let server = start().await;
    let widgets = Counter::<u64>::default();
    server
        .metrics
        .registry()
        .register("widgets_made", "Widgets made", widgets.clone());
    widgets.inc_by(3);

    let reply = get(server.addr, "GET /metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(
        reply.body.contains("# TYPE widgets_made counter"),
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains("widgets_made_total 3"),
        "{}",
        reply.body
    );
    assert!(reply.body.trim_end().ends_with("# EOF"), "{}", reply.body);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_counts_admin_requests_by_path_and_code() {
    let server = start().await;
    get(server.addr, "GET /healthz").await;
    get(server.addr, "GET /no/such/thing").await;
    let body = server.metrics.encode();
    assert!(
        body.contains(r#"admin_http_requests_total{path="/healthz",code="200"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"admin_http_requests_total{path="other",code="404"} 1"#),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_gets_json_404() {
    let server = start().await;
    let reply = get(server.addr, "GET /nope").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    assert_eq!(reply.body, r#"{"error":"not found"}"#);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_gets_json_405() {
    let server = start().await;
    let reply = get(server.addr, "POST /healthz").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.body, r#"{"error":"method not allowed"}"#);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_health_follows_the_status_code() {
    let server = start().await;
    probe(server.addr, "/healthz")
        .await
        .expect("healthz is 200");

    let err = probe(server.addr, "/readyz")
        .await
        .expect_err("not ready yet");
    assert!(err.contains("503"), "{err}");
    server.health.set_ready(true);
    probe(server.addr, "/readyz").await.expect("ready now");

    let err = probe(server.addr, "/missing").await.expect_err("404");
    assert!(err.contains("404"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_health_fails_once_the_server_is_stopped() {
    let server = start().await;
    let addr = server.addr;
    probe(addr, "/healthz").await.expect("up");
    server.stop().await;
    let err = probe(addr, "/healthz").await.expect_err("server is gone");
    assert!(err.contains("connect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_health_times_out_on_a_silent_peer() {
    // Accepts connections but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let err = tokio::task::spawn_blocking(move || {
        check_health(&addr.to_string(), "/healthz", Duration::from_millis(300))
    })
    .await
    .expect("probe task")
    .expect_err("no answer");
    assert!(err.contains("timed out"), "{err}");
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_finishes_after_cancel_with_an_idle_keep_alive_connection_open() {
    let server = start().await;
    // Leave a keep-alive connection open and idle.
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).as_bytes())
        .await
        .expect("write");
    let mut buf = [0u8; 256];
    let n = idle.read(&mut buf).await.expect("read");
    assert!(n > 0);
    // Idle connections are closed at once on shutdown, so serve returns well
    // before SHUTDOWN_GRACE (5s) would cut them off.
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}
