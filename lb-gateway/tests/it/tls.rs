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
