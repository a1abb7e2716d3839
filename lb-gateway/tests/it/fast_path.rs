//! The listener's own HTTP/1.1 fast path over raw sockets: pipelined requests, a head split
//! across reads, an oversized head, chunked answers (with trailers), HEAD, 1xx, 204 and 304
//! without a body, HTTP/1.0, `Connection: close`, and the hand-over to hyper (a request with a
//! body on a connection the fast path served before). The same exchanges with
//! `--http1-server hyper` give the same answers, except that hyper's server drops trailers.

use std::collections::HashMap;
use std::net::SocketAddr;

use registry_svc::client::Registration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::harness::{Gateway, NS, Stack, T, within};

/// A backend speaking raw HTTP/1.1, so that it can answer what hyper's server would not write
/// (a 103 before the answer, a chunked body with trailers, a 304 with a length). By path:
/// `/chunked`: chunks `hel`, `lo` and trailer `x-sum: 5`; `/204`, `/304` (with
/// `Content-Length: 7`), `/early` (103 then 200), `/head` (the request's head as the body);
/// HEAD: `Content-Length: 5`, no body; anything else: `Content-Length` body
/// `<method> <target> <request body>`.
struct RawBackend {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn raw_backend() -> RawBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                () = s.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let s = s.clone();
            tokio::spawn(async move {
                let serve = async {
                    let mut got: Vec<u8> = Vec::new();
                    loop {
                        let end = loop {
                            if let Some(end) = find(&got, b"\r\n\r\n") {
                                break end + 4;
                            }
                            let mut b = [0u8; 4096];
                            match stream.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&b[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&got[..end]).into_owned();
                        got.drain(..end);
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                let (n, v) = l.split_once(':')?;
                                n.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().ok())?
                            })
                            .unwrap_or(0);
                        while got.len() < length {
                            let mut b = [0u8; 4096];
                            match stream.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&b[..n]),
                            }
                        }
                        let body: Vec<u8> = got.drain(..length).collect();
                        let mut line = head.lines().next().unwrap_or("").split(' ');
                        let method = line.next().unwrap_or("").to_owned();
                        let target = line.next().unwrap_or("").to_owned();
                        let answer: Vec<u8> = match (method.as_str(), target.as_str()) {
                            ("HEAD", _) => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec(),
                            (_, "/chunked") => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\nx-sum: 5\r\n\r\n".to_vec(),
                            (_, "/204") => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                            (_, "/304") => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\nETag: \"e\"\r\n\r\n".to_vec(),
                            (_, "/early") => b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlater".to_vec(),
                            (_, "/head") => {
                                let mut a = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                    head.len()
                                )
                                .into_bytes();
                                a.extend_from_slice(head.as_bytes());
                                a
                            }
                            _ => {
                                let text = format!(
                                    "{method} {target} {}",
                                    String::from_utf8_lossy(&body)
                                );
                                let mut a = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                    text.len()
                                )
                                .into_bytes();
                                a.extend_from_slice(text.as_bytes());
                                a
                            }
                        };
                        if stream.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    () = s.cancelled() => {}
                    () = serve => {}
                }
            });
        }
    });
    RawBackend { addr, stop }
}

async fn gateway(flags: &[&str]) -> (Stack, Registration, RawBackend, Gateway) {
    let stack = Stack::start().await;
    let b = raw_backend().await;
    let r = stack.register("raw", "r", b.addr.port(), false).await;
    let routes = format!(
        "[[routes]]\nname = \"raw\"\nbackend = {{ namespace = \"{NS}\", service = \"raw\" }}\n"
    );
    // These tests run the fast path (the default) explicitly unless they choose a server.
    let mut flags = flags.to_vec();
    if !flags.contains(&"--http1-server") {
        flags.extend(["--http1-server", "own"]);
    }
    let gw = Gateway::start_with(&stack.registry.url(), &routes, &flags).await;
    gw.wait_backends("raw", 1).await;
    (stack, r, b, gw)
}

/// One answer read off a client connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    trailers: HashMap<String, String>,
}

/// Reads answers from a connection, keeping what follows one answer for the next.
struct Reader {
    s: OwnedReadHalf,
    buf: Vec<u8>,
    eof: bool,
}

impl Reader {
    fn new(s: OwnedReadHalf) -> Reader {
        Reader {
            s,
            buf: Vec::new(),
            eof: false,
        }
    }

    async fn fill(&mut self) -> bool {
        let mut b = [0u8; 8192];
        let n = within(T, "bytes from the gateway", self.s.read(&mut b))
            .await
            .unwrap_or(0);
        if n == 0 {
            self.eof = true;
        }
        self.buf.extend_from_slice(&b[..n]);
        n > 0
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(
                self.fill().await,
                "connection closed mid-line: {:?}",
                self.buf
            );
        }
    }

    async fn fields(&mut self) -> HashMap<String, String> {
        let mut fields = HashMap::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                return fields;
            }
            let (n, v) = line.split_once(':').expect("a field");
            fields.insert(n.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    /// The next answer to a request with `method`.
    async fn answer(&mut self, method: &str) -> Answer {
        let status_line = self.line().await;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers = self.fields().await;
        let mut trailers = HashMap::new();
        let body = if method == "HEAD" || status == 204 || status == 304 || status < 200 {
            Vec::new()
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let size = self.line().await;
                let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                    .expect("chunk size");
                if size == 0 {
                    trailers = self.fields().await;
                    break body;
                }
                body.extend(self.take(size).await);
                assert_eq!(self.take(2).await, b"\r\n");
            }
        } else if let Some(n) = headers.get("content-length") {
            self.take(n.parse().expect("length")).await
        } else {
            while self.fill().await {}
            std::mem::take(&mut self.buf)
        };
        Answer {
            status,
            headers,
            body,
            trailers,
        }
    }

    /// Whether the gateway closes the connection (and sends nothing more).
    async fn closed(&mut self) -> bool {
        while self.buf.is_empty() && !self.eof {
            self.fill().await;
        }
        self.buf.is_empty() && self.eof
    }
}

async fn connect(gw: &Gateway) -> (Reader, OwnedWriteHalf) {
    let (r, w) = TcpStream::connect(gw.proxy)
        .await
        .expect("connect")
        .into_split();
    (Reader::new(r), w)
}

async fn exchanges(flags: &[&str]) {
    let own_server = !flags.contains(&"--http1-server");
    let (_stack, _r, _b, gw) = gateway(flags).await;

    // Pipelined: five requests in one write, answered in order; bodiless answers carry no
    // body, so each next answer parses where the last one ended.
    let (mut rd, mut wr) = connect(&gw).await;
    wr.write_all(
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n\
          HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /chunked HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n\
          GET /204 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /304 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /early HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /two?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let a = rd.answer("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"GET /one "[..]), "{a:?}");
    let a = rd.answer("HEAD").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.headers.get("content-length").map(String::as_str),
        Some("5"),
        "{a:?}"
    );
    let a = rd.answer("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"hello"[..]), "{a:?}");
    if own_server {
        // The fast path passes trailers on; hyper's server drops them (it did before it too).
        assert_eq!(
            a.trailers.get("x-sum").map(String::as_str),
            Some("5"),
            "{a:?}"
        );
    }
    let a = rd.answer("GET").await;
    assert_eq!(a.status, 204, "{a:?}");
    assert!(!a.headers.contains_key("content-length"), "{a:?}");
    let a = rd.answer("GET").await;
    assert_eq!(a.status, 304, "{a:?}");
    assert_eq!(a.headers.get("etag").map(String::as_str), Some("\"e\""));
    let a = rd.answer("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"later"[..]), "{a:?}");
    let a = rd.answer("GET").await;
    assert_eq!(
        (a.status, &a.body[..]),
        (200, &b"GET /two?q=1 "[..]),
        "{a:?}"
    );
    assert!(
        rd.closed().await,
        "Connection: close closes after the answer"
    );

    // A head split across reads: the parts arrive one after the other.
    let (mut rd, mut wr) = connect(&gw).await;
    for part in [
        &b"GET /sp"[..],
        b"lit HTTP/1.1\r\nHo",
        b"st: x\r\n",
        b"\r\n",
    ] {
        wr.write_all(part).await.expect("write");
        wr.flush().await.expect("flush");
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    let a = rd.answer("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"GET /split "[..]), "{a:?}");

    // Then a request with a body on the same connection (hyper's, after the hand-over), and a
    // bodyless one after it.
    wr.write_all(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        .await
        .expect("write");
    let a = rd.answer("POST").await;
    assert_eq!(
        (a.status, &a.body[..]),
        (200, &b"POST /p body"[..]),
        "{a:?}"
    );
    wr.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let a = rd.answer("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"GET /after "[..]), "{a:?}");

    // HTTP/1.0: no chunked coding (the body runs until close), and no keep-alive unless asked.
    let (mut rd, mut wr) = connect(&gw).await;
    wr.write_all(b"GET /chunked HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let a = rd.answer("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"hello"[..]), "{a:?}");
    assert!(!a.headers.contains_key("transfer-encoding"), "{a:?}");
    assert!(rd.closed().await);
    let (mut rd, mut wr) = connect(&gw).await;
    wr.write_all(b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /k2 HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let a = rd.answer("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"GET /k "[..]), "{a:?}");
    let a = rd.answer("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"GET /k2 "[..]), "{a:?}");
    assert!(rd.closed().await);

    // Answers carry a Date (the backend sent none).
    let (mut rd, mut wr) = connect(&gw).await;
    wr.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let a = rd.answer("GET").await;
    assert_eq!(a.status, 200);
    assert!(a.headers.contains_key("date"), "{a:?}");

    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_split_bodiless_and_chunked_exchanges_are_answered_in_order() {
    exchanges(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypers_server_gives_the_same_answers() {
    exchanges(&["--http1-server", "hyper"]).await;
}

/// The head the backend gets for a request with hop-by-hop fields, a field its Connection
/// names, two X-Forwarded-For lines and a traceparent: its lines after the request line,
/// lowercased and sorted, the gateway's span id masked (it is new per request).
async fn forwarded_head(flags: &[&str]) -> Vec<String> {
    let (_stack, _r, _b, gw) = gateway(flags).await;
    let (mut rd, mut wr) = connect(&gw).await;
    wr.write_all(
        b"GET /head HTTP/1.1\r\nHost: api.example\r\nConnection: keep-alive, X-Secret\r\n\
          Keep-Alive: timeout=5\r\nX-Secret: s\r\nTE: gzip\r\nProxy-Authorization: p\r\n\
          X-Forwarded-For: 192.0.2.1\r\n\
          traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
          Accept: */*\r\nX-Forwarded-For: 192.0.2.2\r\n\r\n",
    )
    .await
    .expect("write");
    let a = rd.answer("GET").await;
    assert_eq!(a.status, 200, "{a:?}");
    let text = String::from_utf8(a.body).expect("utf-8");
    let mut lines: Vec<String> = text
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let l = l.to_ascii_lowercase();
            match l.strip_prefix("traceparent: ") {
                // version-trace id-span id-flags: the span id is the gateway's own.
                Some(v) if v.len() == 55 => {
                    format!("traceparent: {}-<span>-{}", &v[..35], &v[53..])
                }
                _ => l,
            }
        })
        .collect();
    lines.sort();
    gw.stop().await;
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_gets_the_same_edited_head_from_the_fast_path_and_from_hyper() {
    let fast = forwarded_head(&[]).await;
    assert_eq!(
        fast,
        [
            "accept: */*",
            "host: api.example",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-<span>-01",
            "x-forwarded-for: 192.0.2.1, 192.0.2.2, 127.0.0.1",
        ],
        "hop-by-hop fields and the one Connection names go; the client is appended; the trace continues"
    );
    // The same request through hyper's server (a `HeaderMap` head), and from the fast path
    // through hyper's client (the raw head turned into `Parts`).
    for flags in [
        &["--http1-server", "hyper"][..],
        &["--http1-client", "hyper"],
    ] {
        assert_eq!(forwarded_head(flags).await, fast, "{flags:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_is_answered_431_in_json_and_the_connection_closed() {
    let (_stack, _r, _b, gw) = gateway(&["--max-header-bytes", "8192"]).await;
    for request in [
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(9000)
        ),
        format!("GET / HTTP/1.1\r\n{}\r\n", "x-many: 1\r\n".repeat(101)),
    ] {
        let (mut rd, mut wr) = connect(&gw).await;
        // Written in pieces, the way a large head arrives.
        for piece in request.as_bytes().chunks(1000) {
            if wr.write_all(piece).await.is_err() {
                break;
            }
        }
        let a = rd.answer("GET").await;
        assert_eq!(a.status, 431, "{a:?}");
        assert_eq!(
            a.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        let body: serde_json::Value = serde_json::from_slice(&a.body).expect("JSON");
        assert_eq!(body["error"], "request_header_fields_too_large", "{body}");
        assert!(rd.closed().await);
    }
    // Just under the limit is served.
    let (mut rd, mut wr) = connect(&gw).await;
    let request = format!(
        "GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(7000)
    );
    wr.write_all(request.as_bytes()).await.expect("write");
    let a = rd.answer("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"GET /ok "[..]), "{a:?}");
    gw.stop().await;
}
