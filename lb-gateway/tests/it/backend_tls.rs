//! TLS from the gateway to its backends (routes with `backend.tls = true`): real rustls servers
//! started here, certificates from `service_kit::devcerts`.
//!
//! - HTTP/1.1 (the gateway's own client for bodyless requests, hyper's for requests with a
//!   body) and gRPC (HTTP/2) reach TLS backends that require a client certificate, and get the
//!   gateway's; pooled TLS connections are reused; a plain route next to them keeps working.
//! - A backend whose certificate is from another CA, names another host, or that does not speak
//!   TLS at all gets a ClientHello and nothing else: the request is answered 502 with the JSON
//!   body saying why, and `lb_gateway_backend_tls_failures_total` counts the reason.
//! - `backend.tls_server_name` checks (and sends as SNI) another name than the address.
//! - A tls route without `--backend-cacert` is refused at start (in process and by the binary,
//!   exit 64); a routes version from config-svc with one is rejected (see `overrides`).
//! - The gateway's client certificate follows its files.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use clap::Parser as _;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde_json::Value;
use service_kit::devcerts::DevCa;
use service_kit::tls::rustls::{self, ServerConfig};
use service_kit::tls::{ServerTlsFiles, cert_common_name, tokio_rustls};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as PbStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{Gateway, HttpBackend, NS, Stack, T, wait_until, within};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A CA with files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: DevCa,
    ca_file: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = DevCa::new(name).expect("CA");
        let ca_file = ca.write_ca(dir.path()).expect("CA file");
        Pki { dir, ca, ca_file }
    }

    /// A certificate (CN `cn`, names `sans`) and its key, written as `<stem>.pem`.
    fn pair(&self, stem: &str, cn: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        self.ca
            .write_pair(self.dir.path(), stem, cn, sans)
            .expect("pair")
    }

    /// A backend's server configuration: `sans` in its certificate; with `client_ca`, a
    /// client certificate from that CA is required.
    fn server(&self, stem: &str, sans: &[&str], client_ca: Option<&Path>) -> Arc<ServerConfig> {
        let (cert, key) = self.pair(stem, stem, sans);
        ServerTlsFiles {
            cert_file: Some(cert),
            key_file: Some(key),
            trusted_ca_file: client_ca.map(Path::to_owned),
            client_cert_auth: client_ca.is_some(),
        }
        .server_config()
        .expect("server config")
        .expect("TLS on")
    }
}

/// An HTTP backend behind TLS (HTTP/1.1 or HTTP/2, as ALPN says). Every answer is JSON naming
/// it, the client certificate's CN, the ALPN protocol, the HTTP version and the body's size. It
/// records the first bytes of every connection, to show what arrived before any handshake.
struct TlsBackend {
    port: u16,
    /// Handshakes completed.
    handshakes: Arc<AtomicU64>,
    /// HTTP requests served.
    requests: Arc<AtomicU64>,
    /// The first bytes of each connection.
    first_bytes: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: CancellationToken,
}

impl TlsBackend {
    /// `keep_alive: false` closes every HTTP/1.1 connection after one answer.
    async fn start(name: &str, config: Arc<ServerConfig>, keep_alive: bool) -> TlsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let backend = TlsBackend {
            port,
            handshakes: Arc::default(),
            requests: Arc::default(),
            first_bytes: Arc::default(),
            stop: CancellationToken::new(),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (handshakes, requests, first) = (
            backend.handshakes.clone(),
            backend.requests.clone(),
            backend.first_bytes.clone(),
        );
        let (stop, name) = (backend.stop.clone(), name.to_owned());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a { Ok((tcp, _)) => tcp, Err(_) => continue },
                };
                let (acceptor, handshakes, requests, first, stop, name) = (
                    acceptor.clone(),
                    handshakes.clone(),
                    requests.clone(),
                    first.clone(),
                    stop.clone(),
                    name.clone(),
                );
                tokio::spawn(async move {
                    let mut head = [0u8; 3];
                    let n = tcp.peek(&mut head).await.unwrap_or(0);
                    first.lock().push(head[..n].to_vec());
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    handshakes.fetch_add(1, Ordering::SeqCst);
                    let session = tls.get_ref().1;
                    let cn = session
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| cert_common_name(c))
                        .unwrap_or_default();
                    let alpn = session
                        .alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .unwrap_or_default();
                    let h2 = alpn == "h2";
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (name, cn, alpn) = (name.clone(), cn.clone(), alpn.clone());
                        requests.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let version = format!("{:?}", req.version());
                            let path = req.uri().path().to_owned();
                            let got = req
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes().len())
                                .unwrap_or(0);
                            let body = serde_json::json!({
                                "backend": name, "client_cn": cn, "alpn": alpn,
                                "version": version, "path": path, "body_bytes": got,
                            });
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body.to_string())))
                                    .expect("response"),
                            )
                        }
                    });
                    let io = TokioIo::new(tls);
                    if h2 {
                        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc);
                        tokio::select! { _ = stop.cancelled() => {} _ = conn => {} }
                    } else {
                        let conn = hyper::server::conn::http1::Builder::new()
                            .keep_alive(keep_alive)
                            .serve_connection(io, svc);
                        tokio::select! { _ = stop.cancelled() => {} _ = conn => {} }
                    }
                });
            }
        });
        backend
    }

    fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections so far, and whether each began with a TLS handshake record (0x16 0x03).
    fn connections_began_with_tls(&self) -> (usize, bool) {
        let first = self.first_bytes.lock();
        let all_tls = first
            .iter()
            .all(|b| b.len() >= 2 && b[0] == 0x16 && b[1] == 0x03);
        (first.len(), all_tls)
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// POST `body` to `path` through the gateway; status and JSON body.
async fn post(gw: &Gateway, path: &str, body: &'static str) -> (u16, Value) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Full<Bytes>>();
    let req = Request::post(gw.url(path))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    let resp = within(T, "POST", client.request(req))
        .await
        .expect("HTTP exchange");
    let status = resp.status().as_u16();
    let bytes = within(T, "body", resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn route(name: &str, prefix: &str, service: &str, backend_extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nmatch = {{ path_prefix = \"{prefix}\" }}\n\
         backend = {{ namespace = \"{NS}\", service = \"{service}\"{backend_extra} }}\n\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_routes_reach_http1_and_grpc_backends_presenting_the_gateway_certificate() {
    let pki = Pki::new("backend CA");
    let (g_cert, g_key) = pki.pair("lb-gateway", "lb-gateway", &["lb-gateway"]);
    let stack = Stack::start().await;

    // Both TLS backends require a client certificate from the CA.
    let secure = TlsBackend::start(
        "secure",
        pki.server("secure", &["127.0.0.1"], Some(&pki.ca_file)),
        true,
    )
    .await;
    let _r1 = stack.register("secure", "s1", secure.port, false).await;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", ServingStatus::Serving)
        .await;
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let grpc_port = grpc_listener.local_addr().expect("addr").port();
    let grpc_stop = CancellationToken::new();
    let grpc_tls = pki.server("grpc", &["127.0.0.1"], Some(&pki.ca_file));
    let stop = grpc_stop.clone();
    tokio::spawn(async move {
        service_kit::tls::serve_tonic(
            tonic::transport::Server::builder().add_service(health),
            grpc_listener,
            Some(grpc_tls),
            stop.cancelled_owned(),
        )
        .await
    });
    let _r2 = stack.register("health", "h1", grpc_port, true).await;
    let plain = HttpBackend::start("plain").await;
    let _r3 = stack.register("plain", "p1", plain.port(), false).await;

    let routes = format!(
        "{}[[routes]]\nname = \"health\"\nmatch = {{ grpc_service = \"grpc.health.v1.Health\" }}\n\
         backend = {{ namespace = \"{NS}\", service = \"health\", tls = true }}\n\n{}",
        route("secure", "/secure", "secure", ", tls = true"),
        route("plain", "/", "plain", ""),
    );
    let gw = Gateway::start_with(
        &stack.registry.url(),
        &routes,
        &[
            "--backend-cacert",
            &s(&pki.ca_file),
            "--backend-cert",
            &s(&g_cert),
            "--backend-key",
            &s(&g_key),
            "--worker-threads",
            "1",
        ],
    )
    .await;
    for r in ["secure", "health", "plain"] {
        gw.wait_backends(r, 1).await;
    }

    // HTTP/1.1 without a body (the gateway's own client): over TLS, ALPN http/1.1, with the
    // gateway's certificate; the pooled TLS connection serves every request.
    for i in 0..5 {
        let (status, body, _) = gw.get(&format!("/secure/{i}"), &[]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["backend"], "secure", "{body}");
        assert_eq!(body["client_cn"], "lb-gateway", "{body}");
        assert_eq!(body["alpn"], "http/1.1", "{body}");
        assert_eq!(body["version"], "HTTP/1.1", "{body}");
    }
    assert_eq!(secure.handshakes(), 1, "one TLS connection, reused");

    // HTTP/1.1 with a body (hyper's client).
    let (status, body) = post(&gw, "/secure/upload", "hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["body_bytes"], 5, "{body}");
    assert_eq!(body["client_cn"], "lb-gateway", "{body}");
    assert_eq!(body["alpn"], "http/1.1", "{body}");

    // gRPC (HTTP/2, ALPN h2) to a tonic server over TLS.
    let channel = tonic::transport::Channel::from_shared(gw.url(""))
        .expect("url")
        .connect_lazy();
    let answer = within(
        T,
        "Check",
        HealthClient::new(channel).check(HealthCheckRequest {
            service: "orders".into(),
        }),
    )
    .await
    .expect("Check through the gateway over TLS");
    assert_eq!(answer.into_inner().status, PbStatus::Serving as i32);

    // The plain route next to them.
    let (status, body, _) = gw.get("/elsewhere", &[]).await;
    assert_eq!((status, &body["backend"]), (200, &Value::from("plain")));

    let backends = gw.backends("secure").await;
    assert_eq!(backends[0]["tls_server_name"], "127.0.0.1", "{backends:?}");
    assert_eq!(
        gw.backends("plain").await[0]["tls_server_name"],
        Value::Null
    );
    assert_eq!(
        gw.metric("lb_gateway_backend_tls_failures_total").await,
        0.0
    );
    let (n, tls) = secure.connections_began_with_tls();
    assert!(n >= 2 && tls, "{n} connections, all TLS: {tls}");
    gw.stop().await;
    grpc_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_certificates_get_no_plaintext_and_the_request_a_502_saying_why() {
    let pki = Pki::new("backend CA");
    let other = Pki::new("someone else's CA");
    let stack = Stack::start().await;

    let foreign = TlsBackend::start(
        "foreign",
        other.server("foreign", &["127.0.0.1"], None),
        true,
    )
    .await;
    let _r1 = stack.register("foreign", "f1", foreign.port, false).await;
    // The right CA, but the certificate names another host.
    let misnamed = TlsBackend::start(
        "misnamed",
        pki.server("misnamed", &["orders.internal"], None),
        true,
    )
    .await;
    let _r2 = stack.register("misnamed", "m1", misnamed.port, false).await;
    // No TLS at all.
    let cleartext = HttpBackend::start("cleartext").await;
    let _r3 = stack
        .register("cleartext", "c1", cleartext.port(), false)
        .await;
    let plain = HttpBackend::start("plain").await;
    let _r4 = stack.register("plain", "p1", plain.port(), false).await;

    let routes = [
        route("foreign", "/foreign", "foreign", ", tls = true"),
        route("misnamed", "/misnamed", "misnamed", ", tls = true"),
        // The same backend, checked for the name its certificate carries.
        route(
            "renamed",
            "/renamed",
            "misnamed",
            ", tls = true, tls_server_name = \"orders.internal\"",
        ),
        route("cleartext", "/cleartext", "cleartext", ", tls = true"),
        route("plain", "/", "plain", ""),
    ]
    .concat();
    let gw = Gateway::start_with(
        &stack.registry.url(),
        &routes,
        &["--backend-cacert", &s(&pki.ca_file)],
    )
    .await;
    for r in ["foreign", "misnamed", "renamed", "cleartext", "plain"] {
        gw.wait_backends(r, 1).await;
    }

    let cases = [
        (
            "foreign",
            foreign.port,
            "unknown_issuer",
            "invalid peer certificate",
        ),
        (
            "misnamed",
            misnamed.port,
            "name_mismatch",
            "not valid for name",
        ),
        ("cleartext", cleartext.port(), "not_tls", ""),
    ];
    for (name, port, reason, detail) in cases {
        let (status, body, _) = gw.get(&format!("/{name}/secret?token=abc"), &[]).await;
        assert_eq!(status, 502, "{name}: {body}");
        assert_eq!(body["error"], "connect_failed", "{name}: {body}");
        let message = body["message"].as_str().expect("message");
        assert!(
            message.contains(&format!("TLS handshake with 127.0.0.1:{port}"))
                && message.contains("(as 127.0.0.1)")
                && message.contains(detail),
            "{name}: {message}"
        );
        let failures = gw
            .metric(&format!(
                "lb_gateway_backend_tls_failures_total{{route=\"{name}\",backend=\"127.0.0.1:{port}\",reason=\"{reason}\"}}"
            ))
            .await;
        assert!(failures >= 1.0, "{name}: {}", gw.metrics().await);
    }
    // Nothing but a ClientHello reached them: no handshake completed, no request was read.
    for (name, backend) in [("foreign", &foreign), ("misnamed", &misnamed)] {
        assert_eq!(backend.handshakes(), 0, "{name}");
        assert_eq!(backend.requests(), 0, "{name}");
        let (n, tls) = backend.connections_began_with_tls();
        assert!(n >= 1 && tls, "{name}: {n} connections, all TLS: {tls}");
    }
    assert_eq!(
        cleartext.hits(),
        0,
        "no request reached the plaintext backend"
    );

    // Checked for the name its certificate carries, the same backend is reached.
    let (status, body, _) = gw.get("/renamed/x", &[]).await;
    assert_eq!((status, &body["backend"]), (200, &Value::from("misnamed")));
    assert_eq!(misnamed.handshakes(), 1);
    assert_eq!(
        gw.backends("renamed").await[0]["tls_server_name"],
        "orders.internal"
    );
    // And the plain route is untouched.
    let (status, body, _) = gw.get("/elsewhere", &[]).await;
    assert_eq!((status, &body["backend"]), (200, &Value::from("plain")));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_certificate_follows_its_files_and_without_one_a_backend_requiring_it_refuses()
{
    let pki = Pki::new("backend CA");
    let stack = Stack::start().await;
    // A full handshake per request (no keep-alive, no session resumption, which would carry
    // the identity of the session's first handshake over): every request shows the
    // certificate in use.
    let mut config = (*pki.server("strict", &["127.0.0.1"], Some(&pki.ca_file))).clone();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let backend = TlsBackend::start("strict", Arc::new(config), false).await;
    let _r = stack.register("strict", "s1", backend.port, false).await;
    let routes = route("strict", "/", "strict", ", tls = true");

    // Without a client certificate: the backend refuses the gateway, the request gets a 502.
    let gw = Gateway::start_with(
        &stack.registry.url(),
        &routes,
        &["--backend-cacert", &s(&pki.ca_file)],
    )
    .await;
    gw.wait_backends("strict", 1).await;
    let (status, body, _) = gw.get("/x", &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(backend.requests(), 0);
    gw.stop().await;

    // With one: presented; replaced on disk, the new one is presented from then on.
    let (cert, key) = pki.pair("gw", "lb-gateway", &["lb-gateway"]);
    let gw = Gateway::start_with(
        &stack.registry.url(),
        &routes,
        &[
            "--backend-cacert",
            &s(&pki.ca_file),
            "--backend-cert",
            &s(&cert),
            "--backend-key",
            &s(&key),
        ],
    )
    .await;
    gw.wait_backends("strict", 1).await;
    let (status, body, _) = gw.get("/x", &[]).await;
    assert_eq!(
        (status, &body["client_cn"]),
        (200, &Value::from("lb-gateway"))
    );
    pki.pair("gw", "lb-gateway-renewed", &["lb-gateway"]);
    wait_until(T, "the renewed certificate to be presented", || async {
        gw.get("/x", &[]).await.1["client_cn"] == "lb-gateway-renewed"
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_tls_route_without_backend_cacert_is_refused_at_start_naming_the_route() {
    let routes = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        routes.path(),
        route("secure", "/", "secure", ", tls = true"),
    )
    .expect("write");
    let config = lb_gateway::Config::try_parse_from([
        "lb-gateway",
        "--registry-endpoints",
        "http://127.0.0.1:9",
        "--routes",
        &s(routes.path()),
    ])
    .expect("flags parse");
    assert!(
        config
            .check_routes(&config.load_routes().expect("routes"))
            .expect_err("no CA")
            .contains("--backend-cacert")
    );
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
    let refused = lb_gateway::run_with_listeners(
        config,
        lb_gateway::Listeners {
            proxy: bind().await,
            admin: bind().await,
        },
        CancellationToken::new(),
    )
    .await
    .expect_err("a tls route without a CA");
    let message = format!("{refused:#}");
    assert!(
        message.contains("route \"secure\"") && message.contains("--backend-cacert"),
        "{message}"
    );

    // A client certificate without the CA is refused by the flags' check.
    let config = lb_gateway::Config::try_parse_from([
        "lb-gateway",
        "--backend-cert",
        "c.pem",
        "--backend-key",
        "k.pem",
    ])
    .expect("flags parse");
    assert!(
        config
            .validate()
            .expect_err("no CA")
            .contains("--backend-cacert"),
    );
}
