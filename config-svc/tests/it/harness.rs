//! config-svc in process, and helpers to talk to it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser as _;
use config_svc::{Config, Listeners, run_with_listeners};
use proto::config_v1 as pb;
use proto::config_v1::config_client::ConfigClient as Grpc;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::coord::{wait_until, within};

/// Bound on any single wait in these tests unless a test says otherwise.
pub const T: Duration = Duration::from_secs(15);

/// A config-svc running in this process.
pub struct ConfigSvc {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ConfigSvc {
    /// Starts one on ephemeral ports against `coordinator` and waits until it is ready.
    pub async fn start(coordinator: &str) -> ConfigSvc {
        Self::start_with(coordinator, "127.0.0.1:0", &[]).await
    }

    /// Starts one with its gRPC server on `grpc` and extra flags.
    pub async fn start_with(coordinator: &str, grpc: &str, extra: &[&str]) -> ConfigSvc {
        let mut args = vec!["config-svc", "--coordinator-endpoints", coordinator];
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).expect("valid config");
        let bind = |a: String| async move { TcpListener::bind(&a).await.expect("bind") };
        let listeners = Listeners {
            admin: bind("127.0.0.1:0".into()).await,
            grpc: bind_retrying(grpc).await,
            http: bind("127.0.0.1:0".into()).await,
        };
        let (grpc, http, admin) = (
            listeners.grpc.local_addr().expect("addr"),
            listeners.http.local_addr().expect("addr"),
            listeners.admin.local_addr().expect("addr"),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with_listeners(config, listeners, shutdown.clone()));
        let svc = ConfigSvc {
            grpc,
            http,
            admin,
            shutdown,
            task,
        };
        wait_until(T, "config-svc to be ready", || async move {
            http_call(admin, "GET", "/readyz", None).await.0 == 200
        })
        .await;
        svc
    }

    /// `http://127.0.0.1:PORT` of the gRPC server.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The generated gRPC client.
    pub async fn grpc(&self) -> Grpc<Channel> {
        within(T, "connect to config-svc", Grpc::connect(self.grpc_url()))
            .await
            .expect("connect")
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, _, raw) = http_raw(self.admin, "GET", "/metrics", None).await;
        assert_eq!(status, 200);
        raw
    }

    /// Value of a metric line starting with `prefix` (0 if absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Stops it and checks `run` returned `Ok`.
    pub async fn stop(self) {
        self.shutdown.cancel();
        within(T, "config-svc to stop", self.task)
            .await
            .expect("no panic")
            .expect("run returns Ok");
    }
}

async fn bind_retrying(addr: &str) -> TcpListener {
    let deadline = std::time::Instant::now() + T;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("bind {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}

/// An HTTP/1.1 request; returns the status, the body parsed as JSON (Null if not JSON), and the
/// raw body.
pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        out
    };
    let raw = within(T, "HTTP exchange", exchange).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, json, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// [`http_raw`] without the raw body.
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let (status, json, _) = http_raw(addr, method, path, body).await;
    (status, json)
}

/// An item reference.
pub fn item(ns: &str, group: &str, key: &str) -> pb::ItemRef {
    pb::ItemRef {
        namespace: ns.into(),
        group: group.into(),
        key: key.into(),
    }
}

/// A fresh namespace name, so tests sharing a coordinator never see each other's items.
pub fn fresh_ns(tag: &str) -> String {
    format!("{tag}-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ N.fetch_add(0x9e37_79b9, Ordering::Relaxed)
}

/// A publish request for `item` with `content` in `format`.
pub fn publish_req(i: &pb::ItemRef, format: pb::Format, content: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        item: Some(i.clone()),
        format: format as i32,
        content: content.into(),
        author: "tester".into(),
        message: String::new(),
        ..Default::default()
    }
}

/// Publishes and returns the response.
pub async fn publish(g: &mut Grpc<Channel>, req: pb::PublishRequest) -> pb::PublishResponse {
    within(T, "Publish", g.publish(req))
        .await
        .expect("publish")
        .into_inner()
}

/// Publishes text content; returns the new version number.
pub async fn publish_text(g: &mut Grpc<Channel>, i: &pb::ItemRef, content: &str) -> u64 {
    publish(g, publish_req(i, pb::Format::Text, content))
        .await
        .version
        .expect("version")
        .number
}

/// Gets the version meant for `client` (or a given version).
pub async fn get(
    g: &mut Grpc<Channel>,
    i: &pb::ItemRef,
    version: u64,
    client: Option<pb::Client>,
) -> Result<pb::GetResponse, tonic::Status> {
    within(
        T,
        "Get",
        g.get(pb::GetRequest {
            item: Some(i.clone()),
            version,
            client,
        }),
    )
    .await
    .map(|r| r.into_inner())
}

/// A client identity.
pub fn client(id: &str, labels: &[(&str, &str)]) -> pb::Client {
    pb::Client {
        id: id.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    }
}

/// One watch stream, read with bounded waits.
pub struct Watch {
    stream: tonic::Streaming<pb::WatchResponse>,
}

/// What a watch delivered, simplified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// key, version number, content, reason.
    Update(String, u64, String, pb::Reason),
    /// key.
    Deleted(String),
    /// The initial state was sent.
    Synced,
}

impl Watch {
    /// Opens a watch.
    pub async fn open(g: &mut Grpc<Channel>, req: pb::WatchRequest) -> Watch {
        let stream = within(T, "Watch", g.watch(req))
            .await
            .expect("watch")
            .into_inner();
        Watch { stream }
    }

    /// The next delivery (panics after `T`).
    pub async fn next(&mut self) -> Seen {
        let msg = within(T, "a watch delivery", self.stream.message())
            .await
            .expect("watch stream ok")
            .expect("watch stream open");
        match msg.event.expect("event") {
            pb::watch_response::Event::Update(u) => {
                let v = u.version.expect("version");
                Seen::Update(
                    v.item.expect("item").key,
                    v.number,
                    v.content,
                    pb::Reason::try_from(u.reason).expect("reason"),
                )
            }
            pb::watch_response::Event::Deleted(d) => Seen::Deleted(d.item.expect("item").key),
            pb::watch_response::Event::Synced(_) => Seen::Synced,
        }
    }

    /// The next `n` deliveries.
    pub async fn take(&mut self, n: usize) -> Vec<Seen> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// Asserts nothing arrives within `d`.
    pub async fn quiet_for(&mut self, d: Duration) {
        if let Ok(msg) = tokio::time::timeout(d, self.stream.message()).await {
            panic!("expected no delivery, got {msg:?}");
        }
    }
}

/// A watch request for `items` (in one namespace) as `client`, holding `known` versions.
pub fn watch_items(
    items: &[pb::ItemRef],
    known: &[(pb::ItemRef, u64)],
    client: Option<pb::Client>,
) -> pb::WatchRequest {
    pb::WatchRequest {
        items: items.to_vec(),
        prefix: None,
        known: known
            .iter()
            .map(|(i, v)| pb::KnownVersion {
                item: Some(i.clone()),
                version: *v,
            })
            .collect(),
        client,
    }
}

/// Shorthand for an update the watch should deliver.
pub fn upd(key: &str, n: u64, content: &str, reason: pb::Reason) -> Seen {
    Seen::Update(key.into(), n, content.into(), reason)
}
