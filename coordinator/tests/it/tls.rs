//! TLS on the client and peer ports: certificates from a development CA made per test
//! (`service_kit::devcerts`), servers in process, clients of every kind (our tonic client,
//! raw rustls, the real `etcdctl` 3.4 with `--cacert --cert --key`, HTTP/1.1 for the JSON
//! gateway); three members in process whose peer port needs a certificate from the right CA
//! that names a member.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::etcdserverpb::{PutRequest, RangeRequest, StatusRequest};
use service_kit::devcerts::DevCa;
use service_kit::testing::assert_tls_refused;
use service_kit::tls::{ClientTlsFiles, rustls, tokio_rustls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

use crate::harness::{CLUSTER_SERIAL, Etcdctl, free_port, wait_for, wait_until, within};

/// A CA and the files it issued, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: DevCa,
    ca_path: PathBuf,
}

/// SANs every server certificate here carries (clients dial 127.0.0.1).
const LOCAL: &[&str] = &["localhost", "127.0.0.1"];

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = DevCa::new(name).expect("CA");
        let ca_path = ca.write_ca(dir.path()).expect("write CA");
        Pki { dir, ca, ca_path }
    }

    /// Issues a certificate with CN `cn` and SANs localhost, 127.0.0.1 (and `cn`).
    fn pair(&self, stem: &str, cn: &str) -> (PathBuf, PathBuf) {
        let mut sans = LOCAL.to_vec();
        sans.push(cn);
        self.ca
            .write_pair(self.dir.path(), stem, cn, &sans)
            .expect("write pair")
    }

    fn ca(&self) -> &str {
        self.ca_path.to_str().expect("utf-8 path")
    }
}

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// A single member with TLS on its client port: `--cert-file`, `--key-file` and `extra`.
async fn start(pki: &Pki, extra: &[&str]) -> (coordinator::Running, tempfile::TempDir) {
    let data = tempfile::tempdir().expect("temp dir");
    let (cert, key) = pki.pair("server", "coordinator");
    let mut args: Vec<String> = [
        "coordinator",
        "--data-dir",
        &s(&data.path().join("data")),
        "--listen-client-urls",
        "https://127.0.0.1:0",
        "--listen-metrics-urls",
        "http://127.0.0.1:0",
        "--cert-file",
        &s(&cert),
        "--key-file",
        &s(&key),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    let running = within(
        Duration::from_secs(20),
        "coordinator::start",
        coordinator::start(coordinator::Config::parse_from(args)),
    )
    .await
    .expect("start");
    (running, data)
}

fn client_config(ca: &str, pair: Option<&(PathBuf, PathBuf)>) -> Arc<rustls::ClientConfig> {
    ClientTlsFiles {
        ca_file: Some(ca.into()),
        cert_file: pair.map(|p| p.0.clone()),
        key_file: pair.map(|p| p.1.clone()),
    }
    .client_config()
    .expect("client config")
    .expect("TLS on")
}

fn tls_kv(addr: std::net::SocketAddr, config: &Arc<rustls::ClientConfig>) -> KvClient<Channel> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    KvClient::new(service_kit::tls::lazy_channel(ep, Some(config)))
}

async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> Result<(), tonic::Status> {
    kv.put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn get(kv: &mut KvClient<Channel>, key: &str) -> Result<Option<Vec<u8>>, tonic::Status> {
    let r = kv
        .range(RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.kvs.into_iter().next().map(|kv| kv.value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_untrusted_clients_are_refused_on_a_tls_port() {
    let pki = Pki::new("ca");
    let (server, _data) = start(&pki, &[]).await;
    let addr = server.client_addr();

    // Plaintext gRPC to the TLS port: the handshake fails, nothing is served.
    let plain = within(Duration::from_secs(10), "plaintext connect", async {
        let mut kv = KvClient::connect(format!("http://{addr}")).await?;
        put(&mut kv, "k", "plain")
            .await
            .map_err(anyhow::Error::from)
    })
    .await;
    assert!(plain.is_err(), "plaintext was served: {plain:?}");

    // A client that trusts another CA refuses the server's certificate.
    let foreign = Pki::new("foreign");
    let mut kv = tls_kv(addr, &client_config(foreign.ca(), None));
    let err = put(&mut kv, "k", "v").await.expect_err("untrusted server");
    assert_tls_refused(&err);

    // A client that trusts the CA is served, and the value is there.
    let mut kv = tls_kv(addr, &client_config(pki.ca(), None));
    put(&mut kv, "k", "tls").await.expect("put over TLS");
    assert_eq!(get(&mut kv, "k").await.expect("get"), Some(b"tls".to_vec()));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_auth_refuses_clients_without_a_certificate_from_the_trusted_ca() {
    let pki = Pki::new("ca");
    let (server, _data) = start(&pki, &["--trusted-ca-file", pki.ca(), "--client-cert-auth"]).await;
    let addr = server.client_addr();

    let mut anonymous = tls_kv(addr, &client_config(pki.ca(), None));
    let err = put(&mut anonymous, "k", "v")
        .await
        .expect_err("no client cert");
    assert_tls_refused(&err);

    let foreign = Pki::new("foreign");
    let foreign_pair = foreign.pair("client", "alice");
    let mut stranger = tls_kv(addr, &client_config(pki.ca(), Some(&foreign_pair)));
    let err = put(&mut stranger, "k", "v")
        .await
        .expect_err("client cert from a foreign CA");
    assert_tls_refused(&err);

    let pair = pki.pair("client", "alice");
    let mut kv = tls_kv(addr, &client_config(pki.ca(), Some(&pair)));
    put(&mut kv, "k", "v")
        .await
        .expect("put with a client cert");
    server.shutdown().await;
}

/// etcdctl's TLS flags.
fn etcdctl_tls(ca: &str, pair: Option<&(PathBuf, PathBuf)>) -> Vec<String> {
    let mut args = vec![format!("--cacert={ca}")];
    if let Some((cert, key)) = pair {
        args.push(format!("--cert={}", cert.display()));
        args.push(format!("--key={}", key.display()));
    }
    args
}

async fn ctl(ctl: &Etcdctl, tls: &[String], args: &[&str]) -> crate::harness::Output {
    let mut all: Vec<&str> = tls.iter().map(String::as_str).collect();
    all.extend_from_slice(args);
    ctl.run(&all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_with_cacert_cert_and_key_works_over_tls() {
    let pki = Pki::new("ca");
    let (server, _data) = start(&pki, &["--trusted-ca-file", pki.ca(), "--client-cert-auth"]).await;
    let endpoint = format!("https://{}", server.client_addr());
    let etcdctl = Etcdctl::new(endpoint.clone());
    let pair = pki.pair("etcdctl", "etcdctl");
    let tls = etcdctl_tls(pki.ca(), Some(&pair));

    let out = ctl(&etcdctl, &tls, &["put", "greeting", "hello"]).await;
    assert_eq!(out.ok("put").trim(), "OK");
    let out = ctl(&etcdctl, &tls, &["get", "greeting"]).await;
    assert_eq!(out.ok("get"), "greeting\nhello\n");
    let out = ctl(&etcdctl, &tls, &["endpoint", "health"]).await;
    assert!(
        out.stderr.contains("is healthy") || out.stdout.contains("is healthy"),
        "{out:?}"
    );

    // Without a client certificate the server refuses etcdctl.
    let no_cert = etcdctl_tls(pki.ca(), None);
    let out = ctl(
        &etcdctl,
        &no_cert,
        &["--dial-timeout=2s", "get", "greeting"],
    )
    .await;
    assert!(
        !out.status.success(),
        "served without a client cert: {out:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_user_and_the_client_certificate_cn_name_users_over_tls() {
    let pki = Pki::new("ca");
    let (server, _data) = start(&pki, &["--trusted-ca-file", pki.ca(), "--client-cert-auth"]).await;
    let endpoint = format!("https://{}", server.client_addr());
    let etcdctl = Etcdctl::new(endpoint.clone());
    // A certificate whose CN is no user: it can act only with --user.
    let tool = pki.pair("tool", "ops-tool");
    let tls = etcdctl_tls(pki.ca(), Some(&tool));
    for args in [
        &["role", "add", "root"][..],
        &["user", "add", "root:root-secret-1"],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "app"],
        &[
            "role",
            "grant-permission",
            "app",
            "--prefix=true",
            "readwrite",
            "app/",
        ],
        &["user", "add", "alice:alice-secret-1"],
        &["user", "grant-role", "alice", "app"],
        &["auth", "enable"],
    ] {
        ctl(&etcdctl, &tls, args).await.ok(&args.join(" "));
    }

    // --user over TLS, as against etcd.
    let out = ctl(
        &etcdctl,
        &tls,
        &["--user", "root:root-secret-1", "put", "top", "1"],
    )
    .await;
    assert_eq!(out.ok("put as root").trim(), "OK");
    let out = ctl(
        &etcdctl,
        &tls,
        &["--user", "alice:alice-secret-1", "put", "top", "2"],
    )
    .await;
    assert!(out.stderr.contains("permission denied"), "{out:?}");
    // No token and a CN that is no user: refused.
    let out = ctl(&etcdctl, &tls, &["put", "app/x", "1"]).await;
    assert!(!out.status.success(), "{out:?}");

    // No token, a certificate with CN alice: alice's permissions.
    let alice = pki.pair("alice", "alice");
    let as_alice = etcdctl_tls(pki.ca(), Some(&alice));
    let out = ctl(&etcdctl, &as_alice, &["put", "app/x", "1"]).await;
    assert_eq!(out.ok("put app/x as alice's cert").trim(), "OK");
    let out = ctl(&etcdctl, &as_alice, &["put", "top", "3"]).await;
    assert!(out.stderr.contains("permission denied"), "{out:?}");

    // A client cannot claim a CN by sending the internal header itself.
    let mut kv = tls_kv(server.client_addr(), &client_config(pki.ca(), Some(&tool)));
    let mut req = tonic::Request::new(PutRequest {
        key: b"top".to_vec(),
        value: b"forged".to_vec(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        coordinator::auth::CERT_CN_HEADER,
        "root".parse().expect("ascii"),
    );
    let err = kv.put(req).await.expect_err("forged CN header");
    assert_ne!(err.code(), tonic::Code::Ok);
    let out = ctl(
        &etcdctl,
        &tls,
        &["--user", "root:root-secret-1", "get", "top"],
    )
    .await;
    assert_eq!(out.ok("get top").trim(), "top\n1");
    server.shutdown().await;
}

/// A raw TLS connection to `addr`; returns the stream and the server certificate's CN.
async fn raw_tls(
    addr: std::net::SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    alpn: &[u8],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<String>,
) {
    let mut config = (**config).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let cn = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| service_kit::tls::cert_common_name(c));
    (tls, cn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_gateway_answers_http1_on_the_tls_port() {
    let pki = Pki::new("ca");
    let (server, _data) = start(&pki, &[]).await;
    let config = client_config(pki.ca(), None);
    let body = r#"{"key":"Zm9v","value":"YmFy"}"#;
    let (mut tls, _) = raw_tls(server.client_addr(), &config, b"http/1.1").await;
    let req = format!(
        "POST /v3/kv/put HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut resp = String::new();
    within(
        Duration::from_secs(10),
        "gateway answer",
        tls.read_to_string(&mut resp),
    )
    .await
    .ok();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let mut kv = tls_kv(server.client_addr(), &config);
    assert_eq!(
        get(&mut kv, "foo").await.expect("get"),
        Some(b"bar".to_vec())
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let pki = Pki::new("ca");
    let (server, _data) = start(&pki, &[]).await;
    let config = client_config(pki.ca(), None);
    let (_, cn) = raw_tls(server.client_addr(), &config, b"h2").await;
    assert_eq!(cn.as_deref(), Some("coordinator"));

    // Same paths, new pair (as a certificate manager renews it).
    pki.ca
        .write_pair(pki.dir.path(), "server", "coordinator-renewed", LOCAL)
        .expect("renew");
    let addr = server.client_addr();
    wait_until(Duration::from_secs(10), "the renewed certificate", || {
        let config = config.clone();
        async move { raw_tls(addr, &config, b"h2").await.1.as_deref() == Some("coordinator-renewed") }
    })
    .await;
    // And the server still serves over it.
    let mut kv = tls_kv(addr, &config);
    put(&mut kv, "after", "renewal")
        .await
        .expect("put after renewal");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------------------------

/// Peer certificate of one member: issued by `ca` with CN `cn`.
struct PeerCert<'a> {
    ca: &'a Pki,
    cn: &'a str,
}

/// Three members in process, with TLS between them (`--peer-client-cert-auth`), all trusting
/// `trusted`; member i presents `certs[i]`. Client ports are plain.
async fn start_peers(
    trusted: &Pki,
    certs: [PeerCert<'_>; 3],
) -> (Vec<coordinator::Running>, Vec<tempfile::TempDir>) {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    let initial = (0..3)
        .map(|i| format!("n{}={}", i + 1, urls[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut dirs = Vec::new();
    let mut starts = Vec::new();
    for (i, pc) in certs.iter().enumerate() {
        let data = tempfile::tempdir().expect("temp dir");
        let (cert, key) = pc.ca.pair(&format!("peer-{i}"), pc.cn);
        let args: Vec<String> = [
            "coordinator",
            "--name",
            &format!("n{}", i + 1),
            "--data-dir",
            &s(&data.path().join("data")),
            "--listen-client-urls",
            "http://127.0.0.1:0",
            "--listen-metrics-urls",
            "http://127.0.0.1:0",
            "--listen-peer-urls",
            &urls[i],
            "--initial-advertise-peer-urls",
            &urls[i],
            "--initial-cluster",
            &initial,
            "--peer-cert-file",
            &s(&cert),
            "--peer-key-file",
            &s(&key),
            "--peer-trusted-ca-file",
            trusted.ca(),
            "--peer-client-cert-auth",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        dirs.push(data);
        starts.push(coordinator::start(coordinator::Config::parse_from(args)));
    }
    let running = within(
        Duration::from_secs(30),
        "three members start",
        futures::future::join_all(starts),
    )
    .await
    .into_iter()
    .map(|r| r.expect("member starts"))
    .collect();
    (running, dirs)
}

async fn leader_of(member: &coordinator::Running) -> u64 {
    let Ok(mut m) = MaintenanceClient::connect(format!("http://{}", member.client_addr())).await
    else {
        return 0;
    };
    match tokio::time::timeout(Duration::from_secs(2), m.status(StatusRequest {})).await {
        Ok(Ok(r)) => r.into_inner().leader,
        _ => 0,
    }
}

async fn plain_kv(member: &coordinator::Running) -> KvClient<Channel> {
    KvClient::connect(format!("http://{}", member.client_addr()))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_with_certificates_from_the_peer_ca_form_a_cluster_over_tls() {
    let _serial = CLUSTER_SERIAL.lock().await;
    let pki = Pki::new("peer-ca");
    let (members, _dirs) = start_peers(
        &pki,
        [
            PeerCert { ca: &pki, cn: "n1" },
            PeerCert { ca: &pki, cn: "n2" },
            PeerCert { ca: &pki, cn: "n3" },
        ],
    )
    .await;
    let leader = wait_for(
        Duration::from_secs(20),
        "all three agree on a leader",
        || async {
            let l: Vec<u64> = futures::future::join_all(members.iter().map(leader_of)).await;
            (l[0] != 0 && l.iter().all(|x| *x == l[0])).then_some(l[0])
        },
    )
    .await;
    assert_ne!(leader, 0);
    let mut kv = plain_kv(&members[0]).await;
    put(&mut kv, "replicated", "over-tls").await.expect("put");
    for m in &members {
        let mut kv = plain_kv(m).await;
        assert_eq!(
            get(&mut kv, "replicated").await.expect("linearizable get"),
            Some(b"over-tls".to_vec())
        );
    }
    for m in members {
        m.shutdown().await;
    }
}

/// n1 and n2 hold good certificates; n3 one that must be refused: n1 and n2 elect a leader
/// and commit writes, n3 never learns of either.
async fn third_member_never_joins(third: PeerCert<'_>, trusted: &Pki) {
    let (members, _dirs) = start_peers(
        trusted,
        [
            PeerCert {
                ca: trusted,
                cn: "n1",
            },
            PeerCert {
                ca: trusted,
                cn: "n2",
            },
            third,
        ],
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "n1 and n2 agree on a leader",
        || async {
            let (a, b) = (leader_of(&members[0]).await, leader_of(&members[1]).await);
            a != 0 && a == b
        },
    )
    .await;
    let mut kv = plain_kv(&members[0]).await;
    put(&mut kv, "k", "v")
        .await
        .expect("put on the two good members");
    // Several election timeouts and heartbeats later, n3 still knows no leader and no data.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leader_of(&members[2]).await, 0, "n3 joined");
    let mut kv3 = plain_kv(&members[2]).await;
    let local = kv3
        .range(RangeRequest {
            key: b"k".to_vec(),
            serializable: true,
            ..Default::default()
        })
        .await
        .expect("serializable read on n3")
        .into_inner();
    assert!(local.kvs.is_empty(), "n3 received data: {local:?}");
    for m in members {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_certificate_from_a_foreign_ca_never_joins() {
    let _serial = CLUSTER_SERIAL.lock().await;
    let pki = Pki::new("peer-ca");
    let foreign = Pki::new("foreign-ca");
    third_member_never_joins(
        PeerCert {
            ca: &foreign,
            cn: "n3",
        },
        &pki,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_certificate_names_no_member_is_refused() {
    let _serial = CLUSTER_SERIAL.lock().await;
    let pki = Pki::new("peer-ca");
    third_member_never_joins(
        PeerCert {
            ca: &pki,
            cn: "intruder",
        },
        &pki,
    )
    .await;
}
