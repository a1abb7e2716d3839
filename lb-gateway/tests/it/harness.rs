//! The whole path in process: a coordinator, registry-svc, small HTTP and gRPC backends
//! registered in it, and the gateway; plus clients. Nothing sleeps to let something happen:
//! waits poll with a deadline ([`wait_until`]).

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser as _;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proto::registry_v1 as pb;
use registry_svc::client::{Registration, RegistryClient};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::coord::{Coordinator, wait_until, within};

/// Bound on any single wait unless a test says otherwise.
pub const T: Duration = Duration::from_secs(15);

/// The namespace every test registers in.
pub const NS: &str = "test";

/// A registry-svc in process.
pub struct Registry {
    pub grpc: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Registry {
    pub async fn start(coordinator: &str) -> Registry {
        Self::start_with(coordinator, &[]).await
    }

    /// [`Registry::start`] with extra flags.
    pub async fn start_with(coordinator: &str, extra: &[&str]) -> Registry {
        let mut args = vec![
            "registry-svc",
            "--coordinator-endpoints",
            coordinator,
            "--replica-ttl",
            "2s",
        ];
        args.extend_from_slice(extra);
        let config = registry_svc::Config::try_parse_from(args).expect("registry config");
        let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
        let listeners = registry_svc::Listeners {
            admin: bind().await,
            grpc: bind().await,
            http: bind().await,
        };
        let grpc = listeners.grpc.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(registry_svc::run_with_listeners(
            config,
            listeners,
            shutdown.clone(),
        ));
        Registry {
            grpc,
            shutdown,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn client(&self) -> RegistryClient {
        RegistryClient::connect([self.url()]).expect("registry client")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = within(T, "registry-svc to stop", self.task).await;
    }
}

/// A config-svc in process.
pub struct ConfigSvc {
    pub grpc: SocketAddr,
    /// Its REST API.
    pub http: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ConfigSvc {
    pub async fn start(coordinator: &str) -> ConfigSvc {
        let config = config_svc::Config::try_parse_from([
            "config-svc",
            "--coordinator-endpoints",
            coordinator,
        ])
        .expect("config-svc config");
        let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
        let listeners = config_svc::Listeners {
            admin: bind().await,
            grpc: bind().await,
            http: bind().await,
        };
        let grpc = listeners.grpc.local_addr().expect("addr");
        let http = listeners.http.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(config_svc::run_with_listeners(
            config,
            listeners,
            shutdown.clone(),
        ));
        ConfigSvc {
            grpc,
            http,
            shutdown,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Publishes `content` (TOML) as the next version of `ns/group/key`; returns its number.
    pub async fn publish(&self, ns: &str, group: &str, key: &str, content: &str) -> u64 {
        self.publish_with(ns, group, key, content, None).await
    }

    /// [`ConfigSvc::publish`], as the candidate of a staged rollout to `rollout`'s clients
    /// when given.
    pub async fn publish_with(
        &self,
        ns: &str,
        group: &str,
        key: &str,
        content: &str,
        rollout: Option<proto::config_v1::RolloutRule>,
    ) -> u64 {
        use proto::config_v1 as cpb;
        let req = cpb::PublishRequest {
            rollout,
            item: Some(cpb::ItemRef {
                namespace: ns.into(),
                group: group.into(),
                key: key.into(),
            }),
            format: cpb::Format::Toml as i32,
            content: content.into(),
            author: "test".into(),
            ..Default::default()
        };
        // config-svc may still be starting: retry until the deadline.
        let deadline = std::time::Instant::now() + T;
        loop {
            let attempt = async {
                let mut client = cpb::config_client::ConfigClient::connect(self.url())
                    .await
                    .map_err(|e| e.to_string())?;
                client.publish(req.clone()).await.map_err(|s| s.to_string())
            };
            match attempt.await {
                Ok(answer) => {
                    return answer
                        .into_inner()
                        .version
                        .map(|v| v.number)
                        .expect("a version");
                }
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "publish failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = within(T, "config-svc to stop", self.task).await;
    }
}

/// Coordinator + registry.
pub struct Stack {
    pub coordinator: Coordinator,
    pub registry: Registry,
}

impl Stack {
    pub async fn start() -> Stack {
        let coordinator = Coordinator::start().await;
        let registry = Registry::start(&coordinator.url()).await;
        Stack {
            coordinator,
            registry,
        }
    }

    /// Registers `127.0.0.1:port` as instance `id` of `svc`, kept alive until dropped.
    pub async fn register(&self, svc: &str, id: &str, port: u16, grpc: bool) -> Registration {
        self.register_at(svc, id, "127.0.0.1", port, grpc).await
    }

    /// Registers `address:port` (an IP or a DNS name) as instance `id` of `svc`.
    pub async fn register_at(
        &self,
        svc: &str,
        id: &str,
        address: &str,
        port: u16,
        grpc: bool,
    ) -> Registration {
        let instance = pb::Instance {
            namespace: NS.into(),
            service: svc.into(),
            instance_id: id.into(),
            address: address.into(),
            port: u32::from(port),
            protocol: if grpc {
                pb::Protocol::Grpc as i32
            } else {
                pb::Protocol::Http as i32
            },
            ttl_seconds: 10,
            ..Default::default()
        };
        let client = self.registry.client();
        wait_until(T, "registration to succeed", || {
            let (client, instance) = (client.clone(), instance.clone());
            async move { client.register_once(instance).await.is_ok() }
        })
        .await;
        within(T, "register", client.register(instance))
            .await
            .expect("register")
    }
}

/// A small HTTP backend. Every answer is JSON naming the backend and echoing what it got;
/// `/status/N` answers N; `/fail-on/NAME` answers 503 at backend NAME only; `/slow/MS` answers after MS milliseconds; `/ws` accepts an upgrade
/// and echoes bytes.
pub struct HttpBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl HttpBackend {
    pub async fn start(name: &str) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (n, h, s) = (name.to_owned(), hits.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (n, h, s) = (n.clone(), h.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| backend_answer(n.clone(), h.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        HttpBackend {
            name: name.to_owned(),
            addr,
            hits,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes the listener and every connection, as a crashed process would.
    pub fn kill(&self) {
        self.stop.cancel();
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn backend_answer(
    name: String,
    hits: Arc<AtomicU64>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let body = serde_json::json!({
        "backend": name,
        "path": path,
        "query": req.uri().query().unwrap_or(""),
        "host": header("host"),
        "traceparent": header("traceparent"),
        "x_forwarded_for": header("x-forwarded-for"),
        "version": format!("{:?}", req.version()),
        "upgrade": header("upgrade"),
        "authorization": header("authorization"),
    });
    if path == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .expect("response");
        return Ok(resp);
    }
    let mut status = StatusCode::OK;
    if path.strip_prefix("/fail-on/") == Some(name.as_str()) {
        status = StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        status = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap_or(StatusCode::OK);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(100))).await;
    }
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-backend", name)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response"))
}

/// The gateway in process.
pub struct Gateway {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _routes: tempfile::NamedTempFile,
}

impl Gateway {
    /// Starts one with `routes` (TOML) against `registry`, waiting until it is ready.
    pub async fn start(registry: &str, routes: &str) -> Gateway {
        Self::start_with(registry, routes, &[]).await
    }

    /// [`Gateway::start`] with extra flags.
    pub async fn start_with(registry: &str, routes: &str, extra: &[&str]) -> Gateway {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), routes).expect("write routes");
        let path = file.path().display().to_string();
        let mut args = vec![
            "lb-gateway",
            "--routes",
            &path,
            "--registry-endpoints",
            registry,
            "--shutdown-grace",
            "2s",
        ];
        args.extend_from_slice(extra);
        let config = lb_gateway::Config::try_parse_from(args).expect("gateway config");
        let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
        let listeners = lb_gateway::Listeners {
            proxy: bind().await,
            admin: bind().await,
        };
        let proxy = listeners.proxy.local_addr().expect("addr");
        let admin = listeners.admin.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(lb_gateway::run_with_listeners(
            config,
            listeners,
            shutdown.clone(),
        ));
        let gw = Gateway {
            proxy,
            admin,
            shutdown,
            task,
            _routes: file,
        };
        wait_until(T, "the gateway to be ready", || async {
            get(admin, "/readyz", &[]).await.0 == 200
        })
        .await;
        gw
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// GET through the gateway.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Value, HeaderMap) {
        get(self.proxy, path, headers).await
    }

    /// An admin API answer.
    pub async fn admin(&self, path: &str) -> Value {
        let (status, body, _) = get(self.admin, path, &[]).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// The number of backends of `route` in the current set.
    pub async fn backends(&self, route: &str) -> Vec<Value> {
        let all = self.admin("/admin/backends").await;
        all["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .find(|r| r["route"] == route)
            .map(|r| r["backends"].as_array().cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Waits until `route` has `n` backends.
    pub async fn wait_backends(&self, route: &str, n: usize) {
        wait_until(
            T,
            &format!("route {route} to have {n} backends"),
            || async { self.backends(route).await.len() == n },
        )
        .await;
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        raw_get(self.admin, "/metrics").await.1
    }

    /// Sum of the metric lines that start with `prefix`.
    pub async fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        within(T, "the gateway to stop", self.task)
            .await
            .expect("no panic")
            .expect("run returns Ok");
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// GET `path` from `addr` over HTTP/1.1; the body parsed as JSON (Null if it is not).
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Value, HeaderMap) {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).expect("request");
    let resp = within(T, "HTTP request", client().request(req))
        .await
        .expect("HTTP exchange");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = within(T, "HTTP body", resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
        headers,
    )
}

/// GET returning the raw body text.
pub async fn raw_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = within(T, "HTTP request", client().request(req))
        .await
        .expect("HTTP exchange");
    let status = resp.status().as_u16();
    let body = within(T, "HTTP body", resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A hash key (an `x-user` value among `user-0` .. `user-49`) that backend `id` serves; panics
/// if none of them goes there.
pub async fn key_served_by(gw: &Gateway, id: &str) -> String {
    for u in 0..50 {
        let user = format!("user-{u}");
        if served_by(gw, "/", &user, 1).await.contains_key(id) {
            return user;
        }
    }
    panic!("no key among user-0..user-49 is served by {id}");
}

/// Which backend served each of `requests` GETs of `path` with the header `x-user: user`.
pub async fn served_by(
    gw: &Gateway,
    path: &str,
    user: &str,
    requests: usize,
) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..requests {
        let (status, body, _) = gw.get(path, &[("x-user", user)]).await;
        assert_eq!(status, 200, "{body}");
        *seen
            .entry(body["backend"].as_str().unwrap_or("?").to_owned())
            .or_insert(0) += 1;
    }
    seen
}
