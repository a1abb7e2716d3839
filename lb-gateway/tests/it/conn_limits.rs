//! The listener's own limits, over real sockets: header read timeout (slow-loris), request
//! header size, connection cap.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use registry_svc::client::Registration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::harness::{Gateway, HttpBackend, NS, Stack, T, within};

fn routes() -> String {
    format!(
        r#"
[[routes]]
name = "web"
backend = {{ namespace = "{NS}", service = "web" }}
"#
    )
}

/// A gateway with one backend behind route `web`, started with `flags`.
async fn gateway(flags: &[&str]) -> (Stack, Registration, HttpBackend, Gateway) {
    let stack = Stack::start().await;
    let b = HttpBackend::start("a").await;
    let r = stack.register("web", "a", b.port(), false).await;
    let gw = Gateway::start_with(&stack.registry.url(), &routes(), flags).await;
    gw.wait_backends("web", 1).await;
    (stack, r, b, gw)
}

/// Sends `request` on a fresh connection and reads the answer until the server closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    // The server may reset instead of closing after refusing a head: keep what was read.
    let _ = within(T, "the answer", s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Writes `bytes` one per second until the server closes the connection; returns how long
/// that took and how many bytes went out before it.
async fn dribble(addr: SocketAddr, bytes: &'static [u8]) -> (Duration, usize) {
    let s = TcpStream::connect(addr).await.expect("connect");
    let start = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 256];
        // EOF or a reset: either way the server hung up. Anything else it sends is ignored.
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        start.elapsed()
    });
    let mut sent = 0;
    for b in bytes {
        if closed.is_finished() || wr.write_all(std::slice::from_ref(b)).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let took = within(T, "the server to hang up", closed)
        .await
        .expect("reader");
    (took, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_clients_are_cut_off_after_the_header_read_timeout() {
    let (_stack, _r, b, gw) = gateway(&["--header-read-timeout", "3s"]).await;
    let addr = gw.proxy;
    // An HTTP/1.1 head at one byte a second (would take ~60 s), an HTTP/2 preface at the same
    // pace (hyper does not know the protocol before its 24th byte), and a client that sends
    // nothing at all: all three are closed about 3 s after connecting.
    const H1: &[u8] =
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    const H2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let h1 = tokio::spawn(dribble(addr, H1));
    let h2 = tokio::spawn(dribble(addr, H2));
    let silent = tokio::spawn(dribble(addr, b""));
    for (name, task, total) in [("HTTP/1.1", h1, H1.len()), ("HTTP/2", h2, H2.len())] {
        let (took, sent) = task.await.expect("task");
        assert!(
            took >= Duration::from_millis(2500) && took < Duration::from_secs(6),
            "{name}: closed after {took:?}, expected about 3 s"
        );
        assert!(
            sent < total,
            "{name}: the whole head went out ({sent} bytes)"
        );
    }
    let (took, _) = silent.await.expect("task");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(6),
        "silent: closed after {took:?}"
    );
    assert_eq!(b.hits(), 0, "nothing reached the backend");
    // A client that sends its head at once is served as usual.
    let answer = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_above_max_header_bytes_are_answered_431() {
    let (_stack, _r, b, gw) = gateway(&["--max-header-bytes", "16384"]).await;
    let request = |header_bytes: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(header_bytes)
        )
    };
    let answer = exchange(gw.proxy, request(8 * 1024).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "8 KiB header: {answer}");
    assert_eq!(b.hits(), 1);
    let answer = exchange(gw.proxy, request(32 * 1024).as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "32 KiB header: {answer}"
    );
    assert_eq!(b.hits(), 1, "the refused request never reached the backend");
    // The gateway goes on serving.
    assert_eq!(gw.get("/", &[]).await.0, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    let (_stack, _r, _b, gw) = gateway(&[
        "--max-connections",
        "2",
        "--worker-threads",
        "1",
        "--header-read-timeout",
        "30s",
    ])
    .await;
    // Two idle connections take both slots.
    let first = TcpStream::connect(gw.proxy).await.expect("connect");
    let _second = TcpStream::connect(gw.proxy).await.expect("connect");
    // The third connects (the kernel's backlog) but is not read while they are open.
    let mut third = TcpStream::connect(gw.proxy).await.expect("connect");
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let early = tokio::time::timeout(Duration::from_secs(1), third.read_to_end(&mut answer)).await;
    assert!(early.is_err(), "answered while at the cap: {answer:?}");
    // One slot frees: the queued connection is served.
    drop(first);
    within(
        T,
        "the queued request's answer",
        third.read_to_end(&mut answer),
    )
    .await
    .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_are_spread_evenly_over_the_workers() {
    let (_stack, _r, _b, gw) = gateway(&["--worker-threads", "2"]).await;
    // Connections opened one after another, each kept open after its answer. Idle workers race
    // for each one in the kernel; the balance lets only the one with fewer connections accept.
    let mut open = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(gw.proxy).await.expect("connect");
        s.write_all(b"GET /item HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = within(T, "an answer", s.read(&mut buf))
            .await
            .expect("read");
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "connection {i}: {answer}"
        );
        open.push(s);
    }
    let worker = |w: usize| format!("lb_gateway_worker_connections{{worker=\"{w}\"}}");
    let (zero, one) = (gw.metric(&worker(0)).await, gw.metric(&worker(1)).await);
    assert_eq!(zero + one, 40.0, "{}", gw.metrics().await);
    assert!(
        (zero - one).abs() <= 2.0,
        "worker 0: {zero}, worker 1: {one}"
    );
    // Closed connections are uncounted.
    open.truncate(10);
    crate::harness::wait_until(T, "the closed connections to be uncounted", || async {
        gw.metric(&worker(0)).await + gw.metric(&worker(1)).await == 10.0
    })
    .await;
    drop(open);
    gw.stop().await;
}
