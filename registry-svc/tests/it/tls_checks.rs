//! Health checks over TLS: registry-svc probes instances serving HTTPS and gRPC over TLS with
//! `--check-cacert` (and presents `--check-cert` to instances that require a client
//! certificate). A check is healthy only when the instance's certificate chains to that CA and
//! carries the check's `tls_server_name` (or the registered address); a foreign CA, a wrong
//! name, an instance answering in plaintext, or a replica with no `--check-cacert` make it
//! unhealthy, and the reason is recorded in `health_detail` as for any failed check. Every probe
//! is a full handshake: an instance whose certificate is replaced by a foreign one turns
//! unhealthy (a resumed TLS session would not have shown it the new certificate).

use std::path::{Path, PathBuf};

use proto::registry_v1 as pb;
use serde_json::json;
use service_kit::devcerts::DevCa;
use service_kit::tls::ServerTlsFiles;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::coord::{Coordinator, wait_until};
use crate::harness::{Backend, Registry, T, discover, http_call, instance, register};

/// Writes a pair named for `localhost` and `127.0.0.1` issued by `ca`.
fn pair(ca: &DevCa, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    ca.write_pair(dir, stem, stem, &["localhost", "127.0.0.1"])
        .expect("write pair")
}

/// An instance serving `GET /health` (200) over HTTPS on `port` and `grpc.health.v1`
/// (SERVING) over TLS on `grpc_port`, with `cert`; it requires a client certificate from
/// `client_ca` when given.
struct TlsInstance {
    port: u32,
    grpc_port: u32,
    stop: CancellationToken,
}

impl TlsInstance {
    async fn start(cert: &(PathBuf, PathBuf), client_ca: Option<&Path>) -> TlsInstance {
        let config = ServerTlsFiles {
            cert_file: Some(cert.0.clone()),
            key_file: Some(cert.1.clone()),
            trusted_ca_file: client_ca.map(Path::to_owned),
            client_cert_auth: client_ca.is_some(),
        }
        .server_config()
        .expect("server TLS config")
        .expect("TLS on");
        let stop = CancellationToken::new();

        let router = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = u32::from(listener.local_addr().expect("addr").port());
        tokio::spawn(service_kit::tls::serve_axum(
            router,
            listener,
            Some(config.clone()),
            stop.clone().cancelled_owned(),
        ));

        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let grpc_port = u32::from(listener.local_addr().expect("addr").port());
        let router = tonic::transport::Server::builder().add_service(health);
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            // Keeps the reporter (and so the SERVING status) alive as long as the server.
            let _reporter = reporter;
            service_kit::tls::serve_tonic(router, listener, Some(config), shutdown).await
        });
        TlsInstance {
            port,
            grpc_port,
            stop,
        }
    }
}

impl Drop for TlsInstance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn tls_http_check(server_name: &str) -> pb::HealthCheck {
    pb::HealthCheck {
        kind: Some(pb::health_check::Kind::Http(pb::HttpCheck {
            path: "/health".into(),
            tls: true,
            tls_server_name: server_name.into(),
        })),
        interval_ms: 150,
        timeout_ms: 140,
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    }
}

fn tls_grpc_check(server_name: &str) -> pb::HealthCheck {
    pb::HealthCheck {
        kind: Some(pb::health_check::Kind::Grpc(pb::GrpcCheck {
            service: String::new(),
            tls: true,
            tls_server_name: server_name.into(),
        })),
        ..tls_http_check("")
    }
}

/// The record of `ns/svc/id` (panics if absent).
async fn record(r: &Registry, ns: &str, svc: &str, id: &str) -> pb::Instance {
    let mut g = r.grpc().await;
    discover(&mut g, ns, svc, false)
        .await
        .instances
        .into_iter()
        .find(|i| i.instance_id == id)
        .unwrap_or_else(|| panic!("{ns}/{svc}/{id} is registered"))
}

async fn wait_health(r: &Registry, ns: &str, svc: &str, id: &str, health: pb::HealthStatus) {
    wait_until(T, &format!("{id} to be {health:?}"), || async {
        record(r, ns, svc, id).await.health == health as i32
    })
    .await;
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_checks_pass_with_the_right_ca_and_name_and_fail_saying_why_otherwise() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new("check CA").expect("CA");
    let ca_path = ca.write_ca(dir.path()).expect("CA file");
    let foreign = DevCa::new("foreign CA").expect("CA");

    // The registry verifies instances against `ca` and presents its own pair from `ca`; the
    // good instance requires that client certificate.
    let registry_pair = pair(&ca, dir.path(), "registry");
    let c = Coordinator::start().await;
    let r = Registry::start_with(
        &c.url(),
        "127.0.0.1:0",
        &[
            "--check-cacert",
            &s(&ca_path),
            "--check-cert",
            &s(&registry_pair.0),
            "--check-key",
            &s(&registry_pair.1),
        ],
    )
    .await;
    let mut g = r.grpc().await;
    let good = TlsInstance::start(&pair(&ca, dir.path(), "good"), Some(&ca_path)).await;
    let foreign_dir = tempfile::tempdir().expect("temp dir");
    let stranger = TlsInstance::start(&pair(&foreign, foreign_dir.path(), "stranger"), None).await;
    let plain = Backend::start().await;

    // Healthy: HTTPS by the registered address (127.0.0.1), HTTPS by a name the certificate
    // carries (registered through REST, as JSON), gRPC over TLS.
    let mut by_address = instance("tls", "web", "by-address", good.port);
    by_address.health_check = Some(tls_http_check(""));
    register(&mut g, by_address).await;
    let body = json!({
        "namespace": "tls", "service": "web", "instance_id": "by-name",
        "address": "127.0.0.1", "port": good.port, "ttl_seconds": 10,
        "health_check": {"type": "http", "path": "/health", "tls": true,
                         "tls_server_name": "localhost", "interval_ms": 150,
                         "timeout_ms": 140, "healthy_threshold": 1, "unhealthy_threshold": 1}
    });
    let (status, answer) = http_call(r.http, "POST", "/v1/instances", Some(&body)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["instance"]["health_check"]["tls"], true, "{answer}");
    assert_eq!(
        answer["instance"]["health_check"]["tls_server_name"], "localhost",
        "{answer}"
    );
    let mut grpc = instance("tls", "web", "grpc", good.grpc_port);
    grpc.health_check = Some(tls_grpc_check("localhost"));
    register(&mut g, grpc).await;
    // The gRPC face shows the REST registration's TLS fields.
    let by_name = record(&r, "tls", "web", "by-name").await;
    assert!(
        matches!(
            by_name.health_check.as_ref().and_then(|h| h.kind.as_ref()),
            Some(pb::health_check::Kind::Http(h)) if h.tls && h.tls_server_name == "localhost"
        ),
        "{by_name:?}"
    );

    wait_until(T, "the TLS checks to pass a few times", || async {
        r.metric("registry_health_checks_total{kind=\"http\",result=\"pass\"}")
            .await
            >= 4.0
            && r.metric("registry_health_checks_total{kind=\"grpc\",result=\"pass\"}")
                .await
                >= 2.0
    })
    .await;
    assert_eq!(
        r.metric("registry_health_checks_total{kind=\"http\",result=\"fail\"}")
            .await,
        0.0,
        "no TLS check of the good instance failed"
    );
    assert_eq!(
        r.metric("registry_health_checks_total{kind=\"grpc\",result=\"fail\"}")
            .await,
        0.0,
        "no TLS check of the good instance failed"
    );

    // Unhealthy: a certificate from another CA, a name the certificate does not carry (over
    // HTTP and gRPC), an instance that answers in plaintext.
    let failing = [
        ("foreign-ca", stranger.port, tls_http_check("localhost")),
        ("wrong-name", good.port, tls_http_check("orders.internal")),
        (
            "grpc-wrong-name",
            good.grpc_port,
            tls_grpc_check("orders.internal"),
        ),
        ("plaintext", plain.port, tls_http_check("")),
    ];
    for (id, port, check) in &failing {
        let mut i = instance("tls", "web", id, *port);
        i.health_check = Some(check.clone());
        register(&mut g, i).await;
    }
    for (id, _, _) in &failing {
        wait_health(&r, "tls", "web", id, pb::HealthStatus::Unhealthy).await;
    }
    let detail = |id: &'static str| {
        let r = &r;
        async move { record(r, "tls", "web", id).await.health_detail }
    };
    let d = detail("foreign-ca").await;
    assert!(
        d.contains("TLS handshake") && d.contains("UnknownIssuer"),
        "foreign CA: {d}"
    );
    for id in ["wrong-name", "grpc-wrong-name"] {
        let d = detail(id).await;
        assert!(
            d.contains("orders.internal") && d.contains("not valid for name"),
            "{id}: {d}"
        );
    }
    let d = detail("plaintext").await;
    assert!(d.contains("TLS handshake"), "plaintext: {d}");
    assert!(
        r.metric("registry_health_checks_total{kind=\"grpc\",result=\"fail\"}")
            .await
            >= 1.0
    );

    // The good ones stayed healthy throughout.
    for id in ["by-address", "by-name", "grpc"] {
        assert_eq!(
            record(&r, "tls", "web", id).await.health,
            pb::HealthStatus::Healthy as i32,
            "{id}"
        );
    }
    let mut healthy: Vec<String> = discover(&mut g, "tls", "web", true)
        .await
        .instances
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    healthy.sort();
    assert_eq!(healthy, ["by-address", "by-name", "grpc"]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_check_cacert_fails_tls_checks_saying_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new("check CA").expect("CA");
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let good = TlsInstance::start(&pair(&ca, dir.path(), "good"), None).await;
    let mut i = instance("tls2", "web", "no-ca", good.port);
    i.health_check = Some(tls_http_check("localhost"));
    // Accepted: another replica (with the CA) may be the one that probes it.
    register(&mut g, i).await;
    wait_health(&r, "tls2", "web", "no-ca", pb::HealthStatus::Unhealthy).await;
    let d = record(&r, "tls2", "web", "no-ca").await.health_detail;
    assert!(d.contains("no --check-cacert"), "{d}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_check_specs_and_flags_are_refused_with_a_clear_message() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let mut i = instance("tls3", "web", "x", 8443);
    i.health_check = Some(pb::HealthCheck {
        kind: Some(pb::health_check::Kind::Http(pb::HttpCheck {
            path: "/h".into(),
            tls: false,
            tls_server_name: "demo-1".into(),
        })),
        ..Default::default()
    });
    let err = g
        .register(pb::RegisterRequest { instance: Some(i) })
        .await
        .expect_err("a server name without tls");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("needs health_check.tls = true"),
        "{err}"
    );
    let body = json!({
        "namespace": "tls3", "service": "web", "address": "127.0.0.1", "port": 8443,
        "health_check": {"type": "grpc", "tls": true, "tls_server_name": "https://demo-1"}
    });
    let (status, answer) = http_call(r.http, "POST", "/v1/instances", Some(&body)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer
            .to_string()
            .contains("must be a DNS name or an IP address"),
        "{answer}"
    );
    r.stop().await;

    // --check-cert needs its key and the CA; a CA file that does not exist fails the start.
    use clap::Parser as _;
    let parse = |extra: &[&str]| {
        let mut args = vec!["registry-svc"];
        args.extend_from_slice(extra);
        registry_svc::Config::try_parse_from(args).expect("parses")
    };
    let e = parse(&["--check-cert", "c.pem"])
        .validate()
        .expect_err("no key");
    assert!(e.contains("--check-cert needs --check-key"), "{e}");
    let e = parse(&["--check-cert", "c.pem", "--check-key", "k.pem"])
        .validate()
        .expect_err("no CA");
    assert!(e.contains("--check-cacert"), "{e}");
    let missing = parse(&["--check-cacert", "/nonexistent/ca.pem"]);
    missing.validate().expect("the flags fit together");
    let e = missing.check_tls.load().expect_err("no such file");
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_probe_verifies_the_certificate_so_a_replaced_foreign_one_turns_the_instance_unhealthy()
 {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new("check CA").expect("CA");
    let ca_path = ca.write_ca(dir.path()).expect("CA file");
    let c = Coordinator::start().await;
    let r = Registry::start_with(&c.url(), "127.0.0.1:0", &["--check-cacert", &s(&ca_path)]).await;
    let mut g = r.grpc().await;
    // The instance re-reads its pair when the files change (service-kit's CertReloader), keeping
    // its TLS session cache: a probe resuming an earlier session would not see the new one.
    let instance_pair = pair(&ca, dir.path(), "instance");
    let server = TlsInstance::start(&instance_pair, None).await;
    let mut i = instance("tls4", "web", "swapped", server.port);
    i.health_check = Some(tls_http_check("localhost"));
    register(&mut g, i).await;
    wait_until(T, "a few passing TLS probes", || async {
        r.metric("registry_health_checks_total{kind=\"http\",result=\"pass\"}")
            .await
            >= 3.0
    })
    .await;
    assert_eq!(
        record(&r, "tls4", "web", "swapped").await.health,
        pb::HealthStatus::Healthy as i32
    );

    // The same files now hold a pair from another CA.
    let foreign = DevCa::new("foreign CA").expect("CA");
    foreign
        .write_pair(
            dir.path(),
            "instance",
            "instance",
            &["localhost", "127.0.0.1"],
        )
        .expect("overwrite the pair");
    wait_health(&r, "tls4", "web", "swapped", pb::HealthStatus::Unhealthy).await;
    let d = record(&r, "tls4", "web", "swapped").await.health_detail;
    assert!(d.contains("UnknownIssuer"), "{d}");
    r.stop().await;
}
