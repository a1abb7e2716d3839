//! TLS on every hop of registry-svc: the coordinator requires client certificates
//! (`--client-cert-auth`) and registry-svc reaches it over mTLS (`--coordinator-cacert|cert|key`);
//! registry-svc's own gRPC and REST ports serve TLS and require client certificates too.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use proto::registry_v1::registry_client::RegistryClient as Grpc;
use service_kit::devcerts::DevCa;
use service_kit::testing::assert_tls_refused;
use service_kit::tls::{ClientTlsFiles, rustls, tokio_rustls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

use crate::coord::within;
use crate::harness::{Registry, discover, instance, register};

fn pair(ca: &DevCa, dir: &std::path::Path, stem: &str, cn: &str) -> (PathBuf, PathBuf) {
    ca.write_pair(dir, stem, cn, &["localhost", "127.0.0.1"])
        .expect("write pair")
}

fn client_config(
    ca: &std::path::Path,
    pair: Option<&(PathBuf, PathBuf)>,
) -> Arc<rustls::ClientConfig> {
    ClientTlsFiles {
        ca_file: Some(ca.to_owned()),
        cert_file: pair.map(|p| p.0.clone()),
        key_file: pair.map(|p| p.1.clone()),
    }
    .client_config()
    .expect("client config")
    .expect("TLS on")
}

fn grpc(addr: std::net::SocketAddr, config: &Arc<rustls::ClientConfig>) -> Grpc<Channel> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    Grpc::new(service_kit::tls::lazy_channel(ep, Some(config)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_serves_tls_and_reaches_the_coordinator_over_mtls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new("test CA").expect("CA");
    let ca_path = ca.write_ca(dir.path()).expect("CA file");
    let s = |p: &std::path::Path| p.display().to_string();

    // A coordinator that serves only clients with a certificate from the CA.
    let (c_cert, c_key) = pair(&ca, dir.path(), "coordinator", "coordinator");
    let coordinator = coordinator::start(coordinator::Config::parse_from([
        "coordinator",
        "--data-dir",
        &s(&dir.path().join("coordinator.etcd")),
        "--listen-client-urls",
        "https://127.0.0.1:0",
        "--listen-metrics-urls",
        "http://127.0.0.1:0",
        "--cert-file",
        &s(&c_cert),
        "--key-file",
        &s(&c_key),
        "--trusted-ca-file",
        &s(&ca_path),
        "--client-cert-auth",
    ]))
    .await
    .expect("coordinator starts");

    // registry-svc with TLS both ways; it only gets ready if its coordinator client works.
    let (r_cert, r_key) = pair(&ca, dir.path(), "registry", "registry-svc");
    let registry = within(
        Duration::from_secs(30),
        "registry-svc ready over mTLS",
        Registry::start_with(
            &format!("https://{}", coordinator.client_addr()),
            "127.0.0.1:0",
            &[
                "--coordinator-cacert",
                &s(&ca_path),
                "--coordinator-cert",
                &s(&r_cert),
                "--coordinator-key",
                &s(&r_key),
                "--cert-file",
                &s(&r_cert),
                "--key-file",
                &s(&r_key),
                "--trusted-ca-file",
                &s(&ca_path),
                "--client-cert-auth",
            ],
        ),
    )
    .await;

    // Plaintext gRPC to the TLS port: refused.
    let plain = within(Duration::from_secs(10), "plaintext", async {
        let mut g = Grpc::connect(registry.grpc_url()).await?;
        g.discover(proto::registry_v1::DiscoverRequest {
            namespace: "ns".into(),
            service: "svc".into(),
            ..Default::default()
        })
        .await
        .map_err(anyhow::Error::from)
    })
    .await;
    assert!(plain.is_err(), "plaintext served: {plain:?}");

    // TLS without a client certificate: refused.
    let mut anonymous = grpc(registry.grpc, &client_config(&ca_path, None));
    let err = anonymous
        .discover(proto::registry_v1::DiscoverRequest {
            namespace: "ns".into(),
            service: "svc".into(),
            ..Default::default()
        })
        .await
        .expect_err("no client certificate");
    assert_tls_refused(&err);

    // With one: register and discover, through to the coordinator.
    let (a_cert, a_key) = pair(&ca, dir.path(), "app", "app");
    let app = client_config(&ca_path, Some(&(a_cert, a_key)));
    let mut g = grpc(registry.grpc, &app);
    register(&mut g, instance("ns", "svc", "i-1", 8000)).await;
    let found = discover(&mut g, "ns", "svc", false).await;
    assert_eq!(crate::harness::ids(&found), vec!["i-1".to_string()]);

    // REST over TLS (HTTP/1.1 through ALPN).
    let mut h1 = (*app).clone();
    h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(registry.http)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(h1))
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.write_all(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut resp = String::new();
    within(
        Duration::from_secs(10),
        "REST answer",
        tls.read_to_string(&mut resp),
    )
    .await
    .ok();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    registry.stop().await;
    coordinator.shutdown().await;
}

/// `--auth-mode mtls`: the caller is the subject its verified client certificate names, and
/// the policy decides per namespace: a writer registers and discovers, a reader only
/// discovers, a certificate from the same CA naming a subject without roles is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_subjects_are_authorised_by_the_policy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new("test CA").expect("CA");
    let ca_path = ca.write_ca(dir.path()).expect("CA file");
    let s = |p: &std::path::Path| p.display().to_string();
    let coordinator = coordinator::start(coordinator::Config::parse_from([
        "coordinator",
        "--data-dir",
        &s(&dir.path().join("coordinator.etcd")),
        "--listen-client-urls",
        "http://127.0.0.1:0",
        "--listen-metrics-urls",
        "http://127.0.0.1:0",
    ]))
    .await
    .expect("coordinator starts");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[roles]\nwriter = { \"ns\" = \"write\" }\nreader = { \"ns\" = \"read\" }\n\
         [subjects]\napp = [\"writer\"]\nlister = [\"reader\"]\n",
    )
    .expect("policy file");
    let (r_cert, r_key) = pair(&ca, dir.path(), "registry", "registry-svc");
    let registry = within(
        Duration::from_secs(30),
        "registry-svc ready",
        Registry::start_with(
            &format!("http://{}", coordinator.client_addr()),
            "127.0.0.1:0",
            &[
                "--cert-file",
                &s(&r_cert),
                "--key-file",
                &s(&r_key),
                "--trusted-ca-file",
                &s(&ca_path),
                "--client-cert-auth",
                "--auth-mode",
                "mtls",
                "--auth-policy-file",
                &s(&policy),
            ],
        ),
    )
    .await;
    // Client certificates name their subject in their only DNS SAN.
    let client = |name: &str| {
        let p = ca
            .write_pair(dir.path(), name, name, &[name])
            .expect("write pair");
        grpc(registry.grpc, &client_config(&ca_path, Some(&p)))
    };
    let discover_req = || proto::registry_v1::DiscoverRequest {
        namespace: "ns".into(),
        service: "svc".into(),
        ..Default::default()
    };

    let mut app = client("app");
    register(&mut app, instance("ns", "svc", "i-1", 8000)).await;
    let found = discover(&mut app, "ns", "svc", false).await;
    assert_eq!(crate::harness::ids(&found), vec!["i-1".to_string()]);

    let mut lister = client("lister");
    let found = discover(&mut lister, "ns", "svc", false).await;
    assert_eq!(crate::harness::ids(&found), vec!["i-1".to_string()]);
    let err = lister
        .register(proto::registry_v1::RegisterRequest {
            instance: Some(instance("ns", "svc", "i-2", 8001)),
        })
        .await
        .expect_err("a reader may not register");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("lister"), "{err}");

    let mut intruder = client("intruder");
    let err = intruder
        .discover(discover_req())
        .await
        .expect_err("a subject without roles may not discover");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    registry.stop().await;
    coordinator.shutdown().await;
}
