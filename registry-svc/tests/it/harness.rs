//! registry-svc in process, and helpers to talk to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser as _;
use proto::registry_v1 as pb;
use proto::registry_v1::registry_client::RegistryClient as Grpc;
use registry_svc::client::RegistryClient;
use registry_svc::{Config, Listeners, run_with_listeners};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::coord::{wait_until, within};

/// Bound on any single wait in these tests unless a test says otherwise.
pub const T: Duration = Duration::from_secs(15);

/// A registry-svc running in this process.
pub struct Registry {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Registry {
    /// Starts one on ephemeral ports against `coordinator` and waits until it is ready.
    pub async fn start(coordinator: &str) -> Registry {
        Self::start_with(coordinator, "127.0.0.1:0", &[]).await
    }

    /// Starts one with its gRPC server on `grpc` and extra flags.
    pub async fn start_with(coordinator: &str, grpc: &str, extra: &[&str]) -> Registry {
        let mut args = vec![
            "registry-svc",
            "--coordinator-endpoints",
            coordinator,
            "--replica-ttl",
            "2s",
        ];
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
        let registry = Registry {
            grpc,
            http,
            admin,
            shutdown,
            task,
        };
        wait_until(T, "registry-svc to be ready", || async move {
            http_call(admin, "GET", "/readyz", None).await.0 == 200
        })
        .await;
        registry
    }

    /// `http://127.0.0.1:PORT` of the gRPC server.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The generated gRPC client.
    pub async fn grpc(&self) -> Grpc<Channel> {
        within(T, "connect to registry-svc", Grpc::connect(self.grpc_url()))
            .await
            .expect("connect")
    }

    /// The client library, on this replica.
    pub fn client(&self) -> RegistryClient {
        RegistryClient::connect([self.grpc_url()]).expect("client")
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
        within(T, "registry-svc to stop", self.task)
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

/// An instance of `ns/svc` with ID `id` on `127.0.0.1:port`.
pub fn instance(ns: &str, svc: &str, id: &str, port: u32) -> pb::Instance {
    pb::Instance {
        namespace: ns.into(),
        service: svc.into(),
        instance_id: id.into(),
        address: "127.0.0.1".into(),
        port,
        ttl_seconds: 10,
        ..Default::default()
    }
}

/// Registers through gRPC and returns the stored instance.
pub async fn register(g: &mut Grpc<Channel>, i: pb::Instance) -> pb::Instance {
    within(
        T,
        "Register",
        g.register(pb::RegisterRequest { instance: Some(i) }),
    )
    .await
    .expect("register")
    .into_inner()
    .instance
    .expect("instance")
}

/// Discovers through gRPC.
pub async fn discover(
    g: &mut Grpc<Channel>,
    ns: &str,
    svc: &str,
    healthy_only: bool,
) -> pb::DiscoverResponse {
    within(
        T,
        "Discover",
        g.discover(pb::DiscoverRequest {
            namespace: ns.into(),
            service: svc.into(),
            healthy_only,
            ..Default::default()
        }),
    )
    .await
    .expect("discover")
    .into_inner()
}

/// IDs of the instances of a discovery answer, sorted.
pub fn ids(d: &pb::DiscoverResponse) -> Vec<String> {
    let mut v: Vec<String> = d.instances.iter().map(|i| i.instance_id.clone()).collect();
    v.sort();
    v
}

/// An HTTP backend whose `/health` answers 200 or 503 as its switch says.
pub struct Backend {
    pub port: u32,
    pub healthy: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Backend {
    pub async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let port = u32::from(listener.local_addr().expect("addr").port());
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        let (h, s) = (healthy.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
                };
                let ok = h.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let status = if ok {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    let _ = conn
                        .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
                        .await;
                });
            }
        });
        Backend {
            port,
            healthy,
            stop,
        }
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
