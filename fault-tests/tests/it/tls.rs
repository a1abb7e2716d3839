//! The compose stack with TLS on every hop (`compose/docker-compose.tls.yml`), from the host.
//!
//! The development CA and a pair per service are written by `service_kit::devcerts::write_stack`
//! (what `scripts/dev-certs.sh` runs) into the project's own folder, whose `certs/` the overlay
//! mounts; the stack comes up from the images of `scripts/build-images.sh`. Then, through the
//! ports published on 127.0.0.1:
//!
//! - real `etcdctl` (3.4) with `--cacert --cert --key` writes and reads on every coordinator
//!   member; with the CA but no client certificate, or in plaintext, it is refused;
//! - the members are three and have one leader, and advertise `https://` peer URLs (they only
//!   reach each other over TLS with certificates checked by CA and member name);
//! - registry-svc and config-svc answer gRPC and REST over TLS with a client certificate, and
//!   refuse a client without one; the demo instances are registered (they reached the registry
//!   over mTLS, and it reached the coordinator over mTLS);
//! - lb-gateway serves TLS on its proxy port and forwards a request to a demo instance (found
//!   through its mTLS registry client); plaintext there is refused;
//! - the last hop is TLS too: the demo instances serve their HTTP + gRPC port over TLS with
//!   client certificates required, the gateway dials them over mTLS (its `/admin/backends`
//!   shows every demo backend of both routes with `tls_server_name` "demo-svc", and the
//!   instance that answered has served requests), gRPC `demo.v1.Demo/Hello` through the
//!   gateway over TLS is answered by a demo instance, and registry-svc health-checks the
//!   instances over mTLS (their checks have `tls` on, named for their host names; the replicas
//!   count passing HTTP probes and the three stay healthy).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::config_v1 as cfg;
use proto::registry_v1 as reg;
use serde_json::Value;
use service_kit::tls::{ClientTlsFiles, rustls, tokio_rustls};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Endpoint;

use crate::docker::Project;
use crate::kv::MEMBERS;

/// The certificate files the test uses from the host.
struct Certs {
    ca: PathBuf,
    client: PathBuf,
    client_key: PathBuf,
}

impl Certs {
    fn in_dir(dir: &Path) -> Certs {
        Certs {
            ca: dir.join("ca.pem"),
            client: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    /// A rustls client configuration trusting the development CA, with the `client` pair or
    /// without a certificate, offering `alpn`.
    fn config(&self, with_cert: bool, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let files = ClientTlsFiles {
            ca_file: Some(self.ca.clone()),
            cert_file: with_cert.then(|| self.client.clone()),
            key_file: with_cert.then(|| self.client_key.clone()),
        };
        let mut config = (*files
            .client_config()
            .expect("a client TLS configuration")
            .expect("TLS on"))
        .clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }
}

/// `etcdctl` (API v3) against `endpoint` with `tls` flags; success and its output.
fn etcdctl(endpoint: &str, tls: &[String], args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(tls)
        .args(["--dial-timeout=3s", "--command-timeout=5s"])
        .args(args)
        .output()
        .expect("run etcdctl (Debian package etcd-client: scripts/install-deps.sh)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// One HTTP/1.1 request over TLS to `addr` (verified as `127.0.0.1`); status line and headers
/// and body as text, or the error (a refused handshake).
async fn https(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let call = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a server name");
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write to {addr}: {e}"))?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer)
            .await
            .map_err(|e| format!("read from {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no HTTP status from {addr}: {text:?}"))?;
        Ok((status, text))
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| Err(format!("{method} {path} at {addr}: no answer in 10 s")))
}

/// One plaintext HTTP/1.1 GET to `addr`: the answer's first bytes, or the error.
async fn plain_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let call = async {
        let mut tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| Err("no answer in 10 s".into()))
}

/// The body of an HTTP answer (after the blank line).
fn body_of(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// A gRPC channel over TLS to `addr`, with the client certificate or without.
fn grpc_channel(addr: SocketAddr, certs: &Certs, with_cert: bool) -> tonic::transport::Channel {
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{}", addr.port()))
        .expect("a URL")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    service_kit::tls::lazy_channel(endpoint, Some(&certs.config(with_cert, b"h2")))
}

#[test]
fn compose_stack_runs_with_tls_on_every_hop() {
    let Some(_one) = crate::docker_tests("TLS stack test") else {
        return;
    };
    let project = Project::with_overlays("tls", &["docker-compose.tls.yml"]);
    let dir = project.dir().join("certs");
    let pairs =
        service_kit::devcerts::write_stack(&dir).expect("write the development certificates");
    assert_eq!(pairs, 8, "a pair per service and one for clients");
    let certs = Certs::in_dir(&dir);

    let took = project.up(Duration::from_secs(180));
    eprintln!(
        "TLS stack: {} containers healthy {:.1} s after `compose up`",
        project.services().len(),
        took.as_secs_f64()
    );

    coordinators_over_tls(&project, &certs);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(services_over_tls(&project, &certs));
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// etcdctl over mTLS against every member; refused without a certificate or in plaintext;
/// three members, one leader, https peer URLs.
fn coordinators_over_tls(project: &Project, certs: &Certs) {
    let s = |p: &Path| p.display().to_string();
    let mtls = vec![
        format!("--cacert={}", s(&certs.ca)),
        format!("--cert={}", s(&certs.client)),
        format!("--key={}", s(&certs.client_key)),
    ];
    let ca_only = vec![format!("--cacert={}", s(&certs.ca))];
    let endpoints: Vec<String> = MEMBERS
        .iter()
        .map(|m| format!("https://127.0.0.1:{}", project.port(m, 2379).port()))
        .collect();

    for (m, endpoint) in MEMBERS.iter().zip(&endpoints) {
        let key = format!("/tls/{m}");
        let (ok, out) = etcdctl(endpoint, &mtls, &["put", &key, &format!("written-via-{m}")]);
        assert!(
            ok && out.contains("OK"),
            "etcdctl put over mTLS to {m}: {out}"
        );
    }
    // Every member reads what was written through each of them.
    for (m, endpoint) in MEMBERS.iter().zip(&endpoints) {
        let (ok, out) = etcdctl(
            endpoint,
            &mtls,
            &["get", "/tls/", "--prefix", "--print-value-only"],
        );
        assert!(ok, "etcdctl get over mTLS from {m}: {out}");
        for w in MEMBERS {
            assert!(
                out.contains(&format!("written-via-{w}")),
                "{m} reads the key written via {w}: {out}"
            );
        }
    }
    for (m, endpoint) in MEMBERS.iter().zip(&endpoints) {
        let (ok, out) = etcdctl(endpoint, &ca_only, &["get", "/tls/", "--prefix"]);
        assert!(!ok, "{m} served a client without a certificate: {out}");
        let (ok, out) = etcdctl(
            &endpoint.replace("https://", "http://"),
            &[],
            &["get", "/tls/", "--prefix"],
        );
        assert!(!ok, "{m} served plaintext on its TLS client port: {out}");
    }

    // The peers: three members, every one advertising TLS peer URLs, and one leader that all
    // of them name.
    let (ok, out) = etcdctl(&endpoints[0], &mtls, &["member", "list", "-w", "json"]);
    assert!(ok, "member list: {out}");
    let list: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("member list JSON: {e}: {out}"));
    let members = list["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 3, "a member list of three: {out}");
    for member in &members {
        let peers = member["peerURLs"].as_array().cloned().unwrap_or_default();
        assert!(
            !peers.is_empty()
                && peers
                    .iter()
                    .all(|u| u.as_str().is_some_and(|u| u.starts_with("https://"))),
            "TLS peer URLs: {member}"
        );
    }
    let (ok, out) = etcdctl(
        &endpoints.join(","),
        &mtls,
        &["endpoint", "status", "-w", "json"],
    );
    assert!(ok, "endpoint status: {out}");
    let statuses: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("endpoint status JSON: {e}: {out}"));
    let leaders: Vec<u64> = statuses
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["Status"]["leader"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(leaders.len(), 3, "every member answers status: {out}");
    assert!(
        leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0]),
        "one leader that every member names: {leaders:?}"
    );
}

/// registry-svc, config-svc and lb-gateway (proxy and dashboard) over TLS.
async fn services_over_tls(project: &Project, certs: &Certs) {
    let registry_grpc = project.port("registry-svc-1", 9200);
    let registry_rest = project.port("registry-svc-1", 9201);
    let config_grpc = project.port("config-svc-1", 9300);
    let config_rest = project.port("config-svc-1", 9301);
    let gateway = project.port("lb-gateway", 8080);

    // registry-svc gRPC over mTLS: the three demo instances registered themselves through the
    // TLS registry (they are in the coordinator, which registry-svc reaches over mTLS).
    let mut registry =
        reg::registry_client::RegistryClient::new(grpc_channel(registry_grpc, certs, true));
    let deadline = Instant::now() + Duration::from_secs(60);
    let instances = loop {
        let found = registry
            .discover(reg::DiscoverRequest {
                namespace: "demo".into(),
                service: "demo".into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().instances);
        match found {
            Ok(list) if list.len() == 3 => break list,
            other if Instant::now() > deadline => {
                panic!("three demo instances in the registry over TLS within 60 s: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let mut ids: Vec<String> = instances.into_iter().map(|i| i.instance_id).collect();
    ids.sort();
    assert_eq!(ids, ["demo-1", "demo-2", "demo-3"]);
    let anonymous =
        reg::registry_client::RegistryClient::new(grpc_channel(registry_grpc, certs, false))
            .list_namespaces(reg::ListNamespacesRequest::default())
            .await;
    assert!(
        anonymous.is_err(),
        "registry-svc gRPC served a client without a certificate: {anonymous:?}"
    );

    // registry-svc REST over mTLS (HTTP/1.1 by ALPN); refused without a certificate.
    let (status, answer) = https(
        registry_rest,
        certs.config(true, b"http/1.1"),
        "GET",
        "/v1/namespaces/demo/services/demo/instances",
        None,
    )
    .await
    .expect("registry-svc REST over mTLS");
    assert_eq!(status, 200, "{answer}");
    assert!(body_of(&answer).contains("demo-1"), "{answer}");
    let refused = https(
        registry_rest,
        certs.config(false, b"http/1.1"),
        "GET",
        "/v1/namespaces",
        None,
    )
    .await;
    assert!(
        refused.as_ref().map_or(true, |(s, _)| *s == 0),
        "registry-svc REST served a client without a certificate: {refused:?}"
    );

    // config-svc gRPC over mTLS: publish, then read it back over REST.
    let mut config = cfg::config_client::ConfigClient::new(grpc_channel(config_grpc, certs, true));
    let item = cfg::ItemRef {
        namespace: "demo".into(),
        group: "tls-check".into(),
        key: "settings.json".into(),
    };
    let published = config
        .publish(cfg::PublishRequest {
            item: Some(item.clone()),
            format: cfg::Format::Json as i32,
            content: r#"{"tls": "on"}"#.into(),
            author: "tls-test".into(),
            message: "over mTLS".into(),
            ..Default::default()
        })
        .await
        .expect("config-svc Publish over mTLS")
        .into_inner();
    assert_eq!(published.version.map(|v| v.number), Some(1));
    let (status, answer) = https(
        config_rest,
        certs.config(true, b"http/1.1"),
        "GET",
        "/v1/namespaces/demo/groups/tls-check/items/settings.json",
        None,
    )
    .await
    .expect("config-svc REST over mTLS");
    assert_eq!(status, 200, "{answer}");
    assert!(body_of(&answer).contains("on"), "{answer}");
    let refused = https(
        config_rest,
        certs.config(false, b"http/1.1"),
        "GET",
        "/v1/namespaces/demo/items",
        None,
    )
    .await;
    assert!(
        refused.as_ref().map_or(true, |(s, _)| *s == 0),
        "config-svc REST served a client without a certificate: {refused:?}"
    );

    // lb-gateway: TLS on the proxy port (no client certificate needed), forwarded to a demo
    // instance it found through its mTLS registry client, which it reached over mTLS.
    let deadline = Instant::now() + Duration::from_secs(60);
    let answered_by = loop {
        let got = https(
            gateway,
            certs.config(false, b"http/1.1"),
            "GET",
            "/users/alice",
            None,
        )
        .await;
        match got {
            Ok((200, answer)) => {
                let lower = answer.to_ascii_lowercase();
                assert!(
                    lower.contains("x-demo-instance: demo-"),
                    "answered by a demo instance: {answer}"
                );
                let body: Value = serde_json::from_str(body_of(&answer))
                    .unwrap_or_else(|e| panic!("a JSON answer: {e}: {answer}"));
                break body["instance"].as_str().unwrap_or_default().to_owned();
            }
            other if Instant::now() > deadline => {
                panic!("GET /users/alice through the gateway over TLS within 60 s: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    demo_hop_over_tls(project, certs, &answered_by).await;

    // The gateway's dashboard (plain admin port) reads the coordinators and config-svc over
    // mTLS: the cluster panel sees three healthy members and a leader, the config panel the item
    // published above.
    let admin = project.port("lb-gateway", 9103);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cluster = plain_get(admin, "/ui/api/cluster").await;
        let members = cluster.as_ref().ok().and_then(|a| {
            let v: serde_json::Value = serde_json::from_str(body_of(a)).ok()?;
            let leader = v.get("leader")?.as_str()?.to_owned();
            let started = v
                .get("members")?
                .as_array()?
                .iter()
                .filter(|m| m.get("health").and_then(serde_json::Value::as_str) == Some("healthy"))
                .count();
            Some((leader, started))
        });
        match members {
            Some((leader, 3)) if !leader.is_empty() => break,
            _ if Instant::now() > deadline => panic!(
                "the dashboard's cluster panel over mTLS: three members and a leader within 30 s: {cluster:?}"
            ),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let items = plain_get(admin, "/ui/api/config")
        .await
        .expect("dashboard config panel");
    assert!(items.starts_with("HTTP/1.1 200"), "{items}");
    assert!(body_of(&items).contains("tls-check"), "{items}");

    let plain = plain_get(gateway, "/users/alice").await;
    assert!(
        plain
            .as_ref()
            .map_or(true, |a| !a.starts_with("HTTP/1.1 200")),
        "the gateway's TLS port answered plaintext: {plain:?}"
    );
}

/// The gateway → demo-svc hop and registry-svc's health checks of the demo instances are TLS:
/// gRPC through the gateway over TLS reaches a demo instance (h2 over TLS on both hops); the
/// gateway's `/admin/backends` (plain admin port) shows both routes' demo backends dialled over
/// TLS for "demo-svc", the one that answered `GET /users/alice` (`answered_by`) with requests;
/// the registry's records carry TLS checks named for each instance's host name, the replicas'
/// passing HTTP probes add up, and all three instances are healthy.
async fn demo_hop_over_tls(project: &Project, certs: &Certs, answered_by: &str) {
    use demo_svc::pb_demo::HelloRequest;
    use demo_svc::pb_demo::demo_client::DemoClient;

    let gateway = project.port("lb-gateway", 8080);
    let mut demo = DemoClient::new(grpc_channel(gateway, certs, false));
    let deadline = Instant::now() + Duration::from_secs(30);
    let hello = loop {
        let mut request = tonic::Request::new(HelloRequest { key: "tls".into() });
        request
            .metadata_mut()
            .insert("x-key", tonic::metadata::MetadataValue::from_static("tls"));
        match demo.hello(request).await {
            Ok(r) => break r.into_inner(),
            Err(s) if Instant::now() > deadline => {
                panic!("demo.v1.Demo/Hello through the gateway over TLS within 30 s: {s:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    assert!(
        hello.instance_id.starts_with("demo-"),
        "Hello answered by a demo instance: {hello:?}"
    );

    let admin = project.port("lb-gateway", 9103);
    let answer = plain_get(admin, "/admin/backends")
        .await
        .expect("the gateway's /admin/backends");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let view: Value = serde_json::from_str(body_of(&answer))
        .unwrap_or_else(|e| panic!("/admin/backends JSON: {e}: {answer}"));
    let routes = view["routes"].as_array().cloned().unwrap_or_default();
    let mut names: Vec<&str> = routes.iter().filter_map(|r| r["route"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["demo", "demo-grpc"],
        "the TLS routes file's routes: {view}"
    );
    for route in &routes {
        let name = route["route"].as_str().unwrap_or_default();
        let backends = route["backends"].as_array().cloned().unwrap_or_default();
        let mut ids: Vec<&str> = backends
            .iter()
            .filter_map(|b| b["instance_id"].as_str())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, ["demo-1", "demo-2", "demo-3"], "route {name}: {route}");
        for b in &backends {
            assert_eq!(
                b["tls_server_name"], "demo-svc",
                "route {name}: every demo backend is dialled over TLS for demo-svc: {b}"
            );
        }
        let served = |id: &str| {
            backends
                .iter()
                .find(|b| b["instance_id"] == id)
                .and_then(|b| b["requests"].as_u64())
                .unwrap_or(0)
        };
        let who = if name == "demo" {
            answered_by
        } else {
            hello.instance_id.as_str()
        };
        assert!(
            served(who) >= 1,
            "route {name}: {who} answered through it over TLS, so it served requests: {route}"
        );
    }

    // registry-svc checks the demo instances over mTLS: the records carry an HTTPS check named
    // for the instance's host name, and the replicas' HTTP probes pass (a failing TLS probe
    // would make the instance unhealthy within two seconds: unhealthy_threshold 2, every 1 s).
    let registry_grpc = project.port("registry-svc-1", 9200);
    let mut registry =
        reg::registry_client::RegistryClient::new(grpc_channel(registry_grpc, certs, true));
    let replicas = [
        project.port("registry-svc-1", 9101),
        project.port("registry-svc", 9101),
    ];
    let passes = || async {
        let mut total = 0.0;
        for admin in replicas {
            let text = plain_get(admin, "/metrics").await.unwrap_or_default();
            total += text
                .lines()
                .find(|l| {
                    l.starts_with("registry_health_checks_total{kind=\"http\",result=\"pass\"}")
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
        total
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while passes().await < 6.0 {
        assert!(
            Instant::now() < deadline,
            "the registry replicas' TLS probes of the demo instances pass (2 rounds each) within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let instances = registry
        .discover(reg::DiscoverRequest {
            namespace: "demo".into(),
            service: "demo".into(),
            ..Default::default()
        })
        .await
        .expect("Discover over mTLS")
        .into_inner()
        .instances;
    assert_eq!(instances.len(), 3, "{instances:?}");
    for i in &instances {
        assert!(
            matches!(
                i.health_check.as_ref().and_then(|h| h.kind.as_ref()),
                Some(reg::health_check::Kind::Http(h))
                    if h.tls && h.tls_server_name == i.instance_id
            ),
            "{}: an HTTPS check of its host name: {i:?}",
            i.instance_id
        );
        assert_eq!(
            i.health,
            reg::HealthStatus::Healthy as i32,
            "{} is healthy, checked over TLS: {i:?}",
            i.instance_id
        );
    }
}
