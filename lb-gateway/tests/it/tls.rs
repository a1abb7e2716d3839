//! TLS on the proxy port: HTTPS (HTTP/1.1 through ALPN) is answered, plaintext is refused; the
//! admin port stays plain HTTP.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use lb_gateway::{Config, Listeners, run_with_listeners};
use service_kit::devcerts::DevCa;
use service_kit::tls::{ClientTlsFiles, rustls, tokio_rustls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

async fn get(stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin)) -> String {
    let _ = stream
        .write_all(b"GET /nowhere HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let mut resp = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut resp)).await;
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_port_answers_https_and_refuses_plaintext() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new("test CA").expect("CA");
    let ca_path = ca.write_ca(dir.path()).expect("CA file");
    let (cert, key) = ca
        .write_pair(
            dir.path(),
            "gateway",
            "lb-gateway",
            &["localhost", "127.0.0.1"],
        )
        .expect("pair");
    let s = |p: &std::path::Path| p.display().to_string();
    let config = Config::try_parse_from([
        "lb-gateway",
        "--registry-endpoints",
        "http://127.0.0.1:9",
        "--cert-file",
        &s(&cert),
        "--key-file",
        &s(&key),
        "--worker-threads",
        "1",
    ])
    .expect("valid config");
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (proxy_addr, admin_addr) = (
        proxy.local_addr().expect("addr"),
        admin.local_addr().expect("addr"),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_with_listeners(
        config,
        Listeners { proxy, admin },
        shutdown.clone(),
    ));

    // The admin port is plain HTTP (health probes unchanged).
    let health = tokio::task::spawn_blocking(move || {
        service_kit::probe::check_health(
            &admin_addr.to_string(),
            "/healthz",
            Duration::from_secs(5),
        )
    })
    .await
    .expect("probe task");
    assert_eq!(health, Ok(()));

    // Plaintext HTTP to the proxy port: no HTTP answer.
    let mut plain = TcpStream::connect(proxy_addr).await.expect("connect");
    let resp = get(&mut plain).await;
    assert!(!resp.starts_with("HTTP/1.1"), "plaintext answered: {resp}");

    // HTTPS: answered by the proxy (no routes: 404 with its JSON body).
    let mut client = (*ClientTlsFiles {
        ca_file: Some(ca_path),
        ..Default::default()
    }
    .client_config()
    .expect("client config")
    .expect("TLS on"))
    .clone();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(proxy_addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the gateway");
    let resp = get(&mut tls).await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
}

/// The dashboard reads the coordinator (gRPC) and config-svc (REST) over TLS with the gateway's
/// client certificate (`--client-cacert|cert|key`), and sends config-svc the bearer token of
/// `--config-token-file`: both require a client certificate, config-svc also a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_reads_the_coordinator_and_config_svc_over_mtls_with_a_token() {
    use crate::harness::{Gateway, Registry, T, get, wait_until};

    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new("test CA").expect("CA");
    let ca_path = ca.write_ca(dir.path()).expect("CA file");
    let s = |p: &std::path::Path| p.display().to_string();
    let pair = |stem: &str| {
        ca.write_pair(dir.path(), stem, stem, &["localhost", "127.0.0.1"])
            .expect("pair")
    };
    let (c_cert, c_key) = pair("coordinator");
    let (r_cert, r_key) = pair("registry-svc");
    let (f_cert, f_key) = pair("config-svc");
    let (g_cert, g_key) = pair("lb-gateway");

    // A coordinator that serves only clients with a certificate from the CA.
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
    let coordinator_url = format!("https://{}", coordinator.client_addr());

    // registry-svc and config-svc: mTLS to the coordinator, TLS with client certificates on
    // their own ports; config-svc also wants a bearer token.
    let tls_flags = |cert: &std::path::Path, key: &std::path::Path| -> Vec<String> {
        [
            "--coordinator-cacert",
            &s(&ca_path),
            "--coordinator-cert",
            &s(cert),
            "--coordinator-key",
            &s(key),
            "--cert-file",
            &s(cert),
            "--key-file",
            &s(key),
            "--trusted-ca-file",
            &s(&ca_path),
            "--client-cert-auth",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let registry_flags = tls_flags(&r_cert, &r_key);
    let registry = Registry::start_with(
        &coordinator_url,
        &registry_flags
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;

    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[roles]\nreader = { \"*\" = \"read\" }\n\n[subjects]\ndashboard = [\"reader\"]\n",
    )
    .expect("policy");
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(&tokens, "tok-dashboard-0001 dashboard\n").expect("tokens");
    let token_file = dir.path().join("gateway.token");
    std::fs::write(&token_file, "tok-dashboard-0001\n").expect("token file");
    let mut config_args = vec![
        "config-svc".to_owned(),
        "--coordinator-endpoints".into(),
        coordinator_url.clone(),
        "--auth-mode".into(),
        "token".into(),
        "--auth-policy-file".into(),
        s(&policy),
        "--auth-tokens-file".into(),
        s(&tokens),
    ];
    config_args.extend(tls_flags(&f_cert, &f_key));
    let config = config_svc::Config::try_parse_from(config_args).expect("config-svc config");
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
    let listeners = config_svc::Listeners {
        admin: bind().await,
        grpc: bind().await,
        http: bind().await,
    };
    let (config_http, config_admin) = (
        listeners.http.local_addr().expect("addr"),
        listeners.admin.local_addr().expect("addr"),
    );
    let config_stop = CancellationToken::new();
    let config_task = tokio::spawn(config_svc::run_with_listeners(
        config,
        listeners,
        config_stop.clone(),
    ));
    wait_until(T, "config-svc to be ready", || async {
        get(config_admin, "/readyz", &[]).await.0 == 200
    })
    .await;

    let config_url = format!("https://127.0.0.1:{}", config_http.port());
    let registry_url = format!("https://127.0.0.1:{}", registry.grpc.port());
    let gateway = |with_token: bool, with_cert: bool| {
        let mut flags = vec![
            "--client-cacert".to_owned(),
            s(&ca_path),
            "--dashboard-coordinator-endpoints".into(),
            coordinator_url.clone(),
            "--dashboard-config-url".into(),
            config_url.clone(),
            "--dashboard-config-namespaces".into(),
            "team".into(),
        ];
        if with_cert {
            flags.extend(["--client-cert".into(), s(&g_cert)]);
            flags.extend(["--client-key".into(), s(&g_key)]);
        }
        if with_token {
            flags.extend(["--config-token-file".into(), s(&token_file)]);
        }
        flags
    };

    // With the certificate and the token: the cluster panel shows the member and its leader,
    // the config panel lists namespace "team" (empty, but answered: 200).
    let flags = gateway(true, true);
    let gw = Gateway::start_with(
        &registry_url,
        "",
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let (status, cluster, _) = get(gw.admin, "/ui/api/cluster", &[]).await;
    assert_eq!(status, 200, "{cluster}");
    let members = cluster["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{cluster}");
    assert!(cluster["leader"].is_string(), "{cluster}");
    let (status, items, _) = get(gw.admin, "/ui/api/config", &[]).await;
    assert_eq!(status, 200, "{items}");
    assert_eq!(items["namespaces"][0]["namespace"], "team", "{items}");
    gw.stop().await;

    // Without the token: config-svc answers 401, which the config panel passes on; the cluster
    // panel is unaffected (the coordinator names the gateway by its certificate).
    let flags = gateway(false, true);
    let gw = Gateway::start_with(
        &registry_url,
        "",
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let (status, body, _) = get(gw.admin, "/ui/api/config", &[]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["source"], "config-svc", "{body}");
    let (status, body, _) = get(gw.admin, "/ui/api/cluster", &[]).await;
    assert_eq!(status, 200, "{body}");
    gw.stop().await;

    // An https:// dashboard upstream without --client-cacert: the gateway refuses to start.
    let config = Config::try_parse_from([
        "lb-gateway",
        "--registry-endpoints",
        "http://127.0.0.1:9",
        "--dashboard-coordinator-endpoints",
        &coordinator_url,
    ])
    .expect("flags parse");
    let refused = run_with_listeners(
        config,
        Listeners {
            proxy: bind().await,
            admin: bind().await,
        },
        CancellationToken::new(),
    )
    .await
    .expect_err("an https:// upstream without a CA");
    assert!(
        refused.to_string().contains("--client-cacert"),
        "{refused:#}"
    );

    registry.stop().await;
    config_stop.cancel();
    let _ = tokio::time::timeout(T, config_task).await;
    drop(coordinator);
}
