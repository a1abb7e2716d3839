//! The demo service against real registry-svc and config-svc replicas in process.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser as _;
use config_svc::client::ConfigClient;
use demo_svc::pb_demo::HelloRequest;
use demo_svc::pb_demo::demo_client::DemoClient;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use proto::config_v1 as cpb;
use proto::registry_v1 as rpb;
use registry_svc::client::RegistryClient;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::coord::{Coordinator, wait_until, within};

const T: Duration = Duration::from_secs(20);

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

struct Stack {
    _coordinator: Coordinator,
    registry: SocketAddr,
    registry_admin: SocketAddr,
    config: SocketAddr,
    stops: Vec<CancellationToken>,
}

impl Stack {
    async fn start() -> Stack {
        Stack::start_with(&[]).await
    }

    /// With extra registry-svc flags.
    async fn start_with(registry_flags: &[&str]) -> Stack {
        let coordinator = Coordinator::start().await;
        let url = coordinator.url();
        let mut args = vec![
            "registry-svc",
            "--coordinator-endpoints",
            &url,
            "--replica-ttl",
            "2s",
        ];
        args.extend_from_slice(registry_flags);
        let rconf = registry_svc::Config::try_parse_from(args).expect("registry config");
        let rl = registry_svc::Listeners {
            admin: bind().await,
            grpc: bind().await,
            http: bind().await,
        };
        let registry = rl.grpc.local_addr().expect("addr");
        let registry_admin = rl.admin.local_addr().expect("addr");
        let rstop = CancellationToken::new();
        tokio::spawn(registry_svc::run_with_listeners(rconf, rl, rstop.clone()));

        let cconf =
            config_svc::Config::try_parse_from(["config-svc", "--coordinator-endpoints", &url])
                .expect("config-svc config");
        let cl = config_svc::Listeners {
            admin: bind().await,
            grpc: bind().await,
            http: bind().await,
        };
        let config = cl.grpc.local_addr().expect("addr");
        let cstop = CancellationToken::new();
        tokio::spawn(config_svc::run_with_listeners(cconf, cl, cstop.clone()));
        Stack {
            _coordinator: coordinator,
            registry,
            registry_admin,
            config,
            stops: vec![rstop, cstop],
        }
    }

    fn registry_url(&self) -> String {
        format!("http://{}", self.registry)
    }

    fn config_url(&self) -> String {
        format!("http://{}", self.config)
    }

    /// Publishes `content` as the next JSON version of the demo's settings item.
    async fn publish(&self, content: &str) -> u64 {
        let req = cpb::PublishRequest {
            item: Some(cpb::ItemRef {
                namespace: "demo".into(),
                group: "demo-svc".into(),
                key: "settings.json".into(),
            }),
            format: cpb::Format::Json as i32,
            content: content.into(),
            author: "test".into(),
            ..Default::default()
        };
        let deadline = std::time::Instant::now() + T;
        loop {
            let client = ConfigClient::connect([self.config_url()]).expect("config client");
            match client.grpc().publish(req.clone()).await {
                Ok(r) => return r.into_inner().version.map(|v| v.number).expect("a version"),
                Err(s) => {
                    assert!(std::time::Instant::now() < deadline, "publish failed: {s}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn instances(&self) -> Vec<rpb::Instance> {
        let client = RegistryClient::connect([self.registry_url()]).expect("registry client");
        client
            .discover(rpb::DiscoverRequest {
                namespace: "demo".into(),
                service: "demo".into(),
                ..Default::default()
            })
            .await
            .map(|r| r.instances)
            .unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for s in &self.stops {
            s.cancel();
        }
    }
}

struct Demo {
    app: SocketAddr,
    admin: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Demo {
    async fn start(stack: &Stack, id: &str) -> Demo {
        Demo::start_with(stack, id, &[]).await
    }

    /// With extra demo-svc flags.
    async fn start_with(stack: &Stack, id: &str, flags: &[&str]) -> Demo {
        let (registry, config) = (stack.registry_url(), stack.config_url());
        let mut args = vec![
            "demo-svc",
            "--instance-id",
            id,
            "--registry-endpoints",
            &registry,
            "--config-endpoints",
            &config,
            "--ttl",
            "4s",
            "--health-check-interval",
            "300ms",
        ];
        args.extend_from_slice(flags);
        let config = demo_svc::Config::try_parse_from(args).expect("demo config");
        let listeners = demo_svc::Listeners {
            app: bind().await,
            admin: bind().await,
        };
        let app = listeners.app.local_addr().expect("addr");
        let admin = listeners.admin.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(demo_svc::run_with_listeners(
            config,
            listeners,
            stop.clone(),
        ));
        Demo {
            app,
            admin,
            stop,
            task,
        }
    }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: hyper::Uri = format!("http://{addr}{path}").parse().expect("uri");
    let resp = within(T, "an HTTP answer", client.get(uri))
        .await
        .expect("HTTP request");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = get(addr, path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("JSON answer")
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_answers_follows_settings_and_deregisters_on_shutdown() {
    let stack = Stack::start().await;
    let demo = Demo::start(&stack, "demo-a").await;

    // Registered, with its address, an HTTP health check, and ready.
    wait_until(T, "the demo instance in the registry", || async {
        stack
            .instances()
            .await
            .iter()
            .any(|i| i.instance_id == "demo-a")
    })
    .await;
    let instances = stack.instances().await;
    let me = instances
        .iter()
        .find(|i| i.instance_id == "demo-a")
        .expect("registered");
    assert_eq!(me.address, "127.0.0.1");
    assert_eq!(me.port, u32::from(demo.app.port()));
    assert_eq!(me.ttl_seconds, 4);
    let check = me.health_check.clone().expect("a health check");
    assert!(
        matches!(check.kind, Some(rpb::health_check::Kind::Http(ref h)) if h.path == "/healthz"),
        "{check:?}"
    );
    wait_until(T, "readiness", || async {
        get(demo.admin, "/readyz").await.0 == 200
    })
    .await;
    wait_until(T, "the registry to find it healthy", || async {
        stack
            .instances()
            .await
            .iter()
            .any(|i| i.instance_id == "demo-a" && i.health == rpb::HealthStatus::Healthy as i32)
    })
    .await;

    // HTTP: instance, path, defaults.
    let a = get_json(demo.app, "/users/alice").await;
    assert_eq!(a["instance"], "demo-a");
    assert_eq!(a["path"], "/users/alice");
    assert_eq!(a["greeting"], "hello");
    assert_eq!(a["settings_version"], 0);

    // Settings pushed: the next answers carry them.
    let v1 = stack
        .publish(r#"{"greeting":"bonjour","color":"blue"}"#)
        .await;
    wait_until(T, "the published settings in the answers", || async {
        get_json(demo.app, "/x").await["settings_version"] == v1
    })
    .await;
    let a = get_json(demo.app, "/x").await;
    assert_eq!(a["greeting"], "bonjour");
    assert_eq!(a["settings"]["color"], "blue");

    // A version that is valid JSON but not valid settings is refused; v1 stays in use.
    let v2 = stack.publish("[1, 2, 3]").await;
    assert!(v2 > v1);
    wait_until(T, "the refusal counted", || async {
        let (_, text) = get(demo.admin, "/metrics").await;
        metric(&text, "demo_settings_rejected_total") >= 1.0
    })
    .await;
    let a = get_json(demo.app, "/x").await;
    assert_eq!(a["settings_version"], v1, "{a}");
    assert_eq!(a["greeting"], "bonjour");
    let (_, text) = get(demo.admin, "/metrics").await;
    assert_eq!(metric(&text, "demo_settings_version"), v1 as f64);
    assert_eq!(metric(&text, "demo_registered"), 1.0);

    // gRPC on the same port: Hello, a refused key, grpc.health.v1.
    let mut grpc = DemoClient::connect(format!("http://{}", demo.app))
        .await
        .expect("gRPC connect");
    let r = grpc
        .hello(HelloRequest { key: "k1".into() })
        .await
        .expect("Hello")
        .into_inner();
    assert_eq!((r.instance_id.as_str(), r.key.as_str()), ("demo-a", "k1"));
    assert_eq!((r.config_version, r.greeting.as_str()), (v1, "bonjour"));
    let err = grpc
        .hello(HelloRequest {
            key: "k".repeat(2000),
        })
        .await
        .expect_err("an oversized key");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("at most 1024"), "{err}");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", demo.app))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // SIGTERM's path: deregistered at once (long before the 4 s TTL), run returns Ok.
    let stopped_at = std::time::Instant::now();
    demo.stop.cancel();
    within(T, "demo-svc to stop", demo.task)
        .await
        .expect("task")
        .expect("run returns Ok");
    let gone = stack.instances().await;
    assert!(
        gone.iter().all(|i| i.instance_id != "demo-a"),
        "deregistered on shutdown: {gone:?}"
    );
    assert!(
        stopped_at.elapsed() < Duration::from_secs(4),
        "stopped within the TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_with_defaults_while_the_registry_is_unreachable_and_registers_once_it_answers() {
    // A registry endpoint nobody listens on yet: the service serves, but is not ready.
    let spare = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let registry_addr = spare.local_addr().expect("addr");
    drop(spare);
    let coordinator = Coordinator::start().await;
    let config = demo_svc::Config::try_parse_from([
        "demo-svc",
        "--instance-id",
        "demo-b",
        "--registry-endpoints",
        &format!("http://{registry_addr}"),
        "--config-endpoints",
        &crate::coord::dead_endpoint(),
    ])
    .expect("demo config");
    let listeners = demo_svc::Listeners {
        app: bind().await,
        admin: bind().await,
    };
    let (app, admin) = (
        listeners.app.local_addr().expect("addr"),
        listeners.admin.local_addr().expect("addr"),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(demo_svc::run_with_listeners(
        config,
        listeners,
        stop.clone(),
    ));
    wait_until(T, "the app port to answer", || async {
        tokio::net::TcpStream::connect(app).await.is_ok()
    })
    .await;
    let a = get_json(app, "/k").await;
    assert_eq!(
        (a["instance"].as_str(), a["settings_version"].as_u64()),
        (Some("demo-b"), Some(0))
    );
    assert_eq!(
        get(admin, "/readyz").await.0,
        503,
        "not ready before registering"
    );
    let (_, text) = get(admin, "/metrics").await;
    assert_eq!(metric(&text, "demo_registered"), 0.0);

    // Now a registry appears on that address: the retry loop registers and turns ready.
    let rconf = registry_svc::Config::try_parse_from([
        "registry-svc",
        "--coordinator-endpoints",
        &coordinator.url(),
    ])
    .expect("registry config");
    let rl = registry_svc::Listeners {
        admin: bind().await,
        grpc: TcpListener::bind(registry_addr)
            .await
            .expect("bind the registry's address"),
        http: bind().await,
    };
    let rstop = CancellationToken::new();
    tokio::spawn(registry_svc::run_with_listeners(rconf, rl, rstop.clone()));
    wait_until(T, "readiness after registering", || async {
        get(admin, "/readyz").await.0 == 200
    })
    .await;
    let (_, text) = get(admin, "/metrics").await;
    assert!(metric(&text, "demo_registration_failures_total") >= 1.0);
    stop.cancel();
    within(T, "demo-svc to stop", task)
        .await
        .expect("task")
        .expect("run Ok");
    rstop.cancel();
}

#[test]
fn bad_configuration_is_refused_with_a_clear_message() {
    let parse = |args: &[&str]| {
        let mut all = vec!["demo-svc"];
        all.extend_from_slice(args);
        demo_svc::Config::try_parse_from(all)
    };
    let err = parse(&["--settings-item", "only/two"]).expect_err("bad item");
    assert!(
        err.to_string().contains("expected namespace/group/key"),
        "{err}"
    );
    let err = parse(&["--ttl", "soon"]).expect_err("bad duration");
    assert!(err.to_string().contains("invalid duration"), "{err}");
    let err = parse(&["--listen", "ftp://0.0.0.0:1"]).expect_err("bad scheme");
    assert!(err.to_string().contains("not supported"), "{err}");

    let c = parse(&["--ttl", "1s"]).expect("parses");
    assert!(c.validate().expect_err("too short").contains("--ttl"));
    let c = parse(&["--registry-endpoints", ""]).expect("parses");
    assert!(
        c.validate()
            .expect_err("empty")
            .contains("--registry-endpoints is empty")
    );
    let c = parse(&["--health-check-interval", "10ms"]).expect("parses");
    assert!(
        c.validate()
            .expect_err("too fast")
            .contains("--health-check-interval")
    );
    let c = parse(&[]).expect("defaults");
    c.validate().expect("the defaults are valid");
    assert_eq!(c.listen.to_string(), "127.0.0.1:8500");
    assert_eq!(c.effective_advertise_address(c.listen), "127.0.0.1");
    assert_eq!(
        parse(&["--instance-id", "x"])
            .expect("parses")
            .effective_instance_id(1),
        "x"
    );
}

#[tokio::test]
async fn a_host_name_is_registered_as_its_ip_address() {
    // lb-gateway routes to IP addresses only.
    assert_eq!(
        demo_svc::resolve("10.1.2.3", 80).await.expect("an IP"),
        "10.1.2.3"
    );
    assert_eq!(
        demo_svc::resolve("localhost", 80).await.expect("localhost"),
        "127.0.0.1"
    );
}

/// A GET over TLS to `addr` (checked as 127.0.0.1) with `tls`: the status and body, or the error.
async fn get_tls(
    addr: SocketAddr,
    path: &str,
    tls: std::sync::Arc<service_kit::tls::rustls::ClientConfig>,
) -> Result<(u16, String), String> {
    let connector = service_kit::tls::HttpsConnector::new(Some(tls), Duration::from_secs(5));
    let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
    let uri: hyper::Uri = format!("https://127.0.0.1:{}{path}", addr.port())
        .parse()
        .expect("uri");
    let resp = within(T, "an HTTPS answer", client.get(uri))
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_http_and_grpc_over_tls_and_the_registry_checks_it_over_tls() {
    use service_kit::devcerts::DevCa;
    use service_kit::tls::ClientTlsFiles;

    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new("test CA").expect("CA");
    let ca_file = ca.write_ca(dir.path()).expect("CA file");
    let names = ["localhost", "127.0.0.1"];
    let (demo_cert, demo_key) = ca
        .write_pair(dir.path(), "demo", "demo-svc", &names)
        .expect("demo pair");
    let (reg_cert, reg_key) = ca
        .write_pair(dir.path(), "registry", "registry-svc", &names)
        .expect("registry pair");
    let (client_cert, client_key) = ca
        .write_pair(dir.path(), "client", "client", &names)
        .expect("client pair");
    let s = |p: &std::path::Path| p.display().to_string();

    // The registry probes TLS checks with the CA and its own client certificate.
    let stack = Stack::start_with(&[
        "--check-cacert",
        &s(&ca_file),
        "--check-cert",
        &s(&reg_cert),
        "--check-key",
        &s(&reg_key),
    ])
    .await;
    // The demo serves TLS, requires client certificates, and advertises a host name (so the
    // check must verify the certificate for "localhost", not for the registered IP).
    let demo = Demo::start_with(
        &stack,
        "demo-tls",
        &[
            "--advertise-address",
            "localhost",
            "--cert-file",
            &s(&demo_cert),
            "--key-file",
            &s(&demo_key),
            "--trusted-ca-file",
            &s(&ca_file),
            "--client-cert-auth",
        ],
    )
    .await;

    wait_until(T, "the demo instance in the registry", || async {
        stack
            .instances()
            .await
            .iter()
            .any(|i| i.instance_id == "demo-tls")
    })
    .await;
    let me = stack
        .instances()
        .await
        .into_iter()
        .find(|i| i.instance_id == "demo-tls")
        .expect("registered");
    assert_eq!(
        me.address, "127.0.0.1",
        "the host name is registered as its IP"
    );
    let check = me.health_check.clone().expect("a health check");
    assert!(
        matches!(
            check.kind,
            Some(rpb::health_check::Kind::Http(ref h))
                if h.path == "/healthz" && h.tls && h.tls_server_name == "localhost"
        ),
        "an HTTPS check of the advertised name: {check:?}"
    );
    // The registry's TLS probes pass (with its client certificate), and none failed.
    wait_until(T, "the registry's TLS checks to pass", || async {
        let (_, text) = get(stack.registry_admin, "/metrics").await;
        text.lines().any(|l| {
            l.starts_with("registry_health_checks_total{kind=\"http\",result=\"pass\"}")
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(2.0)
        })
    })
    .await;
    let (_, text) = get(stack.registry_admin, "/metrics").await;
    assert!(
        !text.contains("registry_health_checks_total{kind=\"http\",result=\"fail\"}"),
        "{text}"
    );
    let me = stack
        .instances()
        .await
        .into_iter()
        .find(|i| i.instance_id == "demo-tls")
        .expect("registered");
    assert_eq!(me.health, rpb::HealthStatus::Healthy as i32, "{me:?}");

    // HTTPS with a client certificate: the instance answers.
    let with_cert = ClientTlsFiles {
        ca_file: Some(ca_file.clone()),
        cert_file: Some(client_cert.clone()),
        key_file: Some(client_key.clone()),
    }
    .client_config()
    .expect("client TLS")
    .expect("TLS on");
    let (status, body) = get_tls(demo.app, "/users/alice", with_cert.clone())
        .await
        .expect("an HTTPS answer");
    assert_eq!(status, 200, "{body}");
    let a: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (&a["instance"], &a["path"]),
        (&"demo-tls".into(), &"/users/alice".into())
    );

    // gRPC over TLS (ALPN h2) on the same port.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", demo.app))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let mut grpc = DemoClient::new(service_kit::tls::lazy_channel(endpoint, Some(&with_cert)));
    let r = grpc
        .hello(HelloRequest { key: "k1".into() })
        .await
        .expect("Hello over TLS")
        .into_inner();
    assert_eq!(r.instance_id, "demo-tls");

    // Refused: no client certificate, and plaintext.
    let anonymous = ClientTlsFiles {
        ca_file: Some(ca_file.clone()),
        ..Default::default()
    }
    .client_config()
    .expect("client TLS")
    .expect("TLS on");
    let refused = get_tls(demo.app, "/x", anonymous).await;
    assert!(
        refused.is_err(),
        "served a client without a certificate: {refused:?}"
    );
    let plain = Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>()
        .get(format!("http://{}/x", demo.app).parse().expect("uri"));
    let plain = within(T, "a plaintext attempt", plain).await;
    assert!(
        plain.as_ref().map_or(true, |r| r.status() != 200),
        "served plaintext on the TLS port: {plain:?}"
    );
    // The admin port stays plain HTTP.
    assert_eq!(get(demo.admin, "/readyz").await.0, 200);

    demo.stop.cancel();
    within(T, "demo-svc to stop", demo.task)
        .await
        .expect("task")
        .expect("run returns Ok");
}

#[test]
fn tls_flags_are_checked_and_the_check_names_the_advertised_host() {
    let parse = |args: &[&str]| {
        let mut all = vec!["demo-svc"];
        all.extend_from_slice(args);
        demo_svc::Config::try_parse_from(all).expect("parses")
    };
    let e = parse(&["--cert-file", "c.pem"])
        .validate()
        .expect_err("a certificate without its key");
    assert!(e.contains("--key-file"), "{e}");
    let c = parse(&[]);
    assert_eq!(c.check_tls_server_name("demo-1"), "demo-1");
    assert_eq!(
        c.check_tls_server_name("10.0.0.7"),
        "",
        "an IP is checked as registered"
    );
}
