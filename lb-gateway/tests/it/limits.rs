//! Traffic control end to end: rate limits, load shedding, timeouts, circuit breakers,
//! WebSocket tunnels.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::harness::{Gateway, HttpBackend, NS, Stack, T, wait_until, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limiter_answers_429_saying_which_limit_and_when_to_retry() {
    let stack = Stack::start().await;
    let b = HttpBackend::start("a").await;
    let _r = stack.register("web", "a", b.port(), false).await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &format!(
            r#"
[[routes]]
name = "web"
backend = {{ namespace = "{NS}", service = "web" }}
rate_limit.per_client_ip = {{ per_second = 1, burst = 3 }}
"#
        ),
    )
    .await;
    gw.wait_backends("web", 1).await;
    for _ in 0..3 {
        assert_eq!(gw.get("/", &[]).await.0, 200);
    }
    let (status, body, headers) = gw.get("/", &[]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "rate_limited");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("per-client-IP"),
        "{body}"
    );
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(b.hits(), 3, "the refused request never reached the backend");
    assert_eq!(
        gw.metric("lb_gateway_rejected_total{route=\"web\",reason=\"rate_limited\"}")
            .await,
        1.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_gateway_sheds_with_503_overloaded() {
    let stack = Stack::start().await;
    let b = HttpBackend::start("a").await;
    let _r = stack.register("web", "a", b.port(), false).await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &format!(
            r#"
[gateway]
max_in_flight = 1

[[routes]]
name = "web"
backend = {{ namespace = "{NS}", service = "web" }}
"#
        ),
    )
    .await;
    gw.wait_backends("web", 1).await;
    let proxy = gw.proxy;
    let slow = tokio::spawn(async move { crate::harness::get(proxy, "/slow/1500", &[]).await });
    wait_until(T, "the slow request to arrive", || async { b.hits() == 1 }).await;
    let (status, body, _) = gw.get("/", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "overloaded");
    assert_eq!(within(T, "slow", slow).await.expect("task").0, 200);
    // Once the slow one is done there is room again.
    assert_eq!(gw.get("/", &[]).await.0, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_becomes_a_tunnel_to_the_backend() {
    let stack = Stack::start().await;
    let b = HttpBackend::start("a").await;
    let _r = stack.register("web", "a", b.port(), false).await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &format!(
            r#"
[[routes]]
name = "web"
backend = {{ namespace = "{NS}", service = "web" }}
"#
        ),
    )
    .await;
    gw.wait_backends("web", 1).await;
    let mut s = TcpStream::connect(gw.proxy).await.expect("connect");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    within(T, "101 head", async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.expect("read");
            head.push(byte[0]);
        }
    })
    .await;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping through the tunnel")
        .await
        .expect("write");
    let mut echo = [0u8; 23];
    within(T, "echo", s.read_exact(&mut echo))
        .await
        .expect("echo");
    assert_eq!(&echo, b"ping through the tunnel");
    // The tunnel counts as in flight until it closes.
    let load = gw.backends("web").await[0]["in_flight"].as_u64();
    assert_eq!(load, Some(1));
    drop(s);
    wait_until(T, "the tunnel's load to be released", || async {
        gw.backends("web").await[0]["in_flight"].as_u64() == Some(0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_slower_than_the_per_try_timeout_gets_504_after_a_retry() {
    let stack = Stack::start().await;
    let a = HttpBackend::start("a").await;
    let _ra = stack.register("web", "a", a.port(), false).await;
    let b = HttpBackend::start("b").await;
    let _rb = stack.register("web", "b", b.port(), false).await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &format!(
            r#"
[[routes]]
name = "web"
backend = {{ namespace = "{NS}", service = "web" }}
timeouts = {{ per_try = "200ms", overall = "5s" }}
retries = {{ attempts = 2 }}
"#
        ),
    )
    .await;
    gw.wait_backends("web", 2).await;
    let started = std::time::Instant::now();
    let (status, body, _) = gw.get("/slow/3000", &[]).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "upstream_timeout");
    assert!(
        body["message"].as_str().expect("message").contains("200ms"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.hits() + b.hits(), 2, "tried once at each backend");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_at_its_circuit_breaker_limit_passes_requests_to_the_next_choice() {
    let stack = Stack::start().await;
    let a = HttpBackend::start("a").await;
    let _ra = stack.register("web", "a", a.port(), false).await;
    let b = HttpBackend::start("b").await;
    let _rb = stack.register("web", "b", b.port(), false).await;
    let gw = Gateway::start(
        &stack.registry.url(),
        &format!(
            r#"
[[routes]]
name = "web"
backend = {{ namespace = "{NS}", service = "web" }}
hash = "header:x-user"
bounded_load = false
circuit_breaker = {{ max_requests = 1 }}
"#
        ),
    )
    .await;
    gw.wait_backends("web", 2).await;
    // Two slow requests for one key: the owner takes one, its breaker sends the other on.
    let proxy = gw.proxy;
    let first =
        tokio::spawn(
            async move { crate::harness::get(proxy, "/slow/800", &[("x-user", "k")]).await },
        );
    wait_until(T, "the first request to arrive", || async {
        a.hits() + b.hits() == 1
    })
    .await;
    let (_, second, _) = gw.get("/slow/10", &[("x-user", "k")]).await;
    let (_, first, _) = within(T, "first", first).await.expect("task");
    assert_ne!(first["backend"], second["backend"], "{first} {second}");
    // Unloaded again, the key is back on its owner.
    let (_, third, _) = gw.get("/", &[("x-user", "k")]).await;
    assert_eq!(third["backend"], first["backend"]);
    gw.stop().await;
}
