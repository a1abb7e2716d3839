//! `--cacert`, `--cert`, `--key` and `--token-file` against services that require them: a
//! coordinator serving only clients with a certificate from the CA (`--client-cert-auth`),
//! registry-svc and config-svc serving TLS with client certificates required, reaching the
//! coordinator over mTLS, and (registry-svc) requiring a bearer token too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser as _;
use service_kit::devcerts::DevCa;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::harness::{NS, T, ctl, http_get, wait_until, within};

fn s(p: &Path) -> String {
    p.display().to_string()
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// The flags a service needs for mTLS to the coordinator and TLS with client certificates on
/// its own ports.
fn service_tls(ca: &Path, cert: &Path, key: &Path) -> Vec<String> {
    [
        "--coordinator-cacert",
        &s(ca),
        "--coordinator-cert",
        &s(cert),
        "--coordinator-key",
        &s(key),
        "--cert-file",
        &s(cert),
        "--key-file",
        &s(key),
        "--trusted-ca-file",
        &s(ca),
        "--client-cert-auth",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_reaches_tls_services_with_the_ca_a_client_certificate_and_a_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new("test CA").expect("CA");
    let ca_path = ca.write_ca(dir.path()).expect("CA file");
    let pair = |stem: &str| -> (PathBuf, PathBuf) {
        ca.write_pair(dir.path(), stem, stem, &["localhost", "127.0.0.1"])
            .expect("pair")
    };
    let (c_cert, c_key) = pair("coordinator");
    let (r_cert, r_key) = pair("registry-svc");
    let (f_cert, f_key) = pair("config-svc");
    let (u_cert, u_key) = pair("operator");

    let coordinator = within(
        T,
        "coordinator start",
        coordinator::start(coordinator::Config::parse_from([
            "coordinator",
            "--data-dir",
            &s(&dir.path().join("data")),
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
        ])),
    )
    .await
    .expect("coordinator starts");
    let coord_url = format!("https://{}", coordinator.client_addr());
    let shutdown = CancellationToken::new();

    // registry-svc: TLS both ways and a bearer token (static token of subject "ops", root).
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[roles]\nroot = { \"*\" = \"admin\" }\n\n[subjects]\nops = [\"root\"]\n",
    )
    .expect("policy");
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(&tokens, "tok-ops-0001 ops\n").expect("tokens");
    let token_file = dir.path().join("ops.token");
    std::fs::write(&token_file, "tok-ops-0001\n").expect("token file");
    let mut args = vec![
        "registry-svc".to_owned(),
        "--coordinator-endpoints".into(),
        coord_url.clone(),
        "--auth-mode".into(),
        "token".into(),
        "--auth-policy-file".into(),
        s(&policy),
        "--auth-tokens-file".into(),
        s(&tokens),
    ];
    args.extend(service_tls(&ca_path, &r_cert, &r_key));
    let reg = registry_svc::Config::try_parse_from(args).expect("registry config");
    let reg_listeners = registry_svc::Listeners {
        admin: bind().await,
        grpc: bind().await,
        http: bind().await,
    };
    let addr = |l: &TcpListener| l.local_addr().expect("addr");
    let (registry_grpc, registry_admin) = (addr(&reg_listeners.grpc), addr(&reg_listeners.admin));
    tokio::spawn(registry_svc::run_with_listeners(
        reg,
        reg_listeners,
        shutdown.clone(),
    ));

    // config-svc: TLS both ways (no token).
    let mut args = vec![
        "config-svc".to_owned(),
        "--coordinator-endpoints".into(),
        coord_url.clone(),
    ];
    args.extend(service_tls(&ca_path, &f_cert, &f_key));
    let cfg = config_svc::Config::try_parse_from(args).expect("config-svc config");
    let cfg_listeners = config_svc::Listeners {
        admin: bind().await,
        grpc: bind().await,
        http: bind().await,
    };
    let (config_grpc, config_admin) = (addr(&cfg_listeners.grpc), addr(&cfg_listeners.admin));
    tokio::spawn(config_svc::run_with_listeners(
        cfg,
        cfg_listeners,
        shutdown.clone(),
    ));
    for (what, admin) in [
        ("registry-svc", registry_admin),
        ("config-svc", config_admin),
    ] {
        wait_until(T, &format!("{what} to be ready"), || async move {
            http_get(admin, "/readyz").await.0 == 200
        })
        .await;
    }

    let base = |registry: SocketAddr, config: SocketAddr| -> Vec<String> {
        vec![
            "--coordinator".into(),
            coordinator.client_addr().to_string(),
            "--registry".into(),
            registry.to_string(),
            "--config".into(),
            config.to_string(),
            "--coordinator-admin".into(),
            coordinator.metrics_addr().to_string(),
            "--registry-admin".into(),
            registry_admin.to_string(),
            "--config-admin".into(),
            config_admin.to_string(),
            "--gateway-admin".into(),
            crate::harness::dead_addr(),
            "--namespace".into(),
            NS.into(),
        ]
    };
    let tls = vec![
        "--cacert".to_owned(),
        s(&ca_path),
        "--cert".into(),
        s(&u_cert),
        "--key".into(),
        s(&u_key),
    ];
    let run = |extra: &[&str], with_tls: bool, with_token: bool| {
        let mut all = base(registry_grpc, config_grpc);
        if with_tls {
            all.extend(tls.clone());
        }
        if with_token {
            all.extend(["--token-file".to_owned(), s(&token_file)]);
        }
        all.extend(extra.iter().map(|a| (*a).to_owned()));
        all
    };

    // registry-svc over mTLS with the token: register, then list.
    let done = ctl(&run(
        &[
            "register",
            "web",
            "--address",
            "10.0.0.1",
            "--port",
            "80",
            "--id",
            "web-1",
        ],
        true,
        true,
    ))
    .await;
    done.assert_ok();
    let listed = ctl(&run(&["-o", "json", "instances", "web"], true, true)).await;
    listed.assert_ok();
    assert!(listed.stdout.contains("web-1"), "{}", listed.stdout);

    // config-svc over mTLS: put, then get.
    let put = ctl(&run(
        &[
            "config",
            "put",
            "app/settings.json",
            "--content",
            "{\"tls\": true}",
        ],
        true,
        false,
    ))
    .await;
    put.assert_ok();
    let got = ctl(&run(
        &["config", "get", "app/settings.json", "--content-only"],
        true,
        false,
    ))
    .await;
    got.assert_ok();
    assert!(got.stdout.contains("\"tls\": true"), "{}", got.stdout);

    // The coordinator over mTLS: cluster status names the leader and finds every admin
    // server healthy (the gateway's is not running: that row is down, so exit code 3).
    let status = ctl(&run(&["-o", "json", "cluster", "status"], true, false)).await;
    let json: serde_json::Value = serde_json::from_str(&status.stdout)
        .unwrap_or_else(|e| panic!("cluster status JSON ({e}): {status:?}"));
    let members = json["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{json}");
    assert_eq!(members[0]["is_leader"], true, "{json}");
    assert!(json["revision"].as_i64().unwrap_or(0) > 1, "{json}");

    // Without the token the registry refuses (401 → unauthenticated), naming it.
    let refused = ctl(&run(&["instances", "web"], true, false)).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("registry-svc"), "{refused:?}");

    // Without TLS flags: nothing is served to a plaintext client.
    let refused = ctl(&run(&["--timeout", "3s", "config", "list"], false, false)).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("config-svc"), "{refused:?}");
    // With the CA but no client certificate: refused by the handshake.
    let mut no_cert = base(registry_grpc, config_grpc);
    no_cert.extend([
        "--cacert".to_owned(),
        s(&ca_path),
        "--timeout".into(),
        "3s".into(),
        "config".into(),
        "list".into(),
    ]);
    let refused = ctl(&no_cert).await;
    assert_eq!(refused.code, 1, "{refused:?}");

    // Flags that do not fit together, and files that cannot be read: usage errors, one line.
    let mut bad = base(registry_grpc, config_grpc);
    bad.extend(["--cert".to_owned(), s(&u_cert), "services".into()]);
    let run_bad = ctl(&bad).await;
    assert_eq!(run_bad.code, 2, "{run_bad:?}");
    assert!(run_bad.stderr.contains("--cert needs --key"), "{run_bad:?}");
    let mut bad = base(registry_grpc, config_grpc);
    bad.extend([
        "--token-file".to_owned(),
        s(&dir.path().join("missing.token")),
        "services".into(),
    ]);
    let run_bad = ctl(&bad).await;
    assert_eq!(run_bad.code, 2, "{run_bad:?}");
    assert!(run_bad.stderr.contains("--token-file"), "{run_bad:?}");
    let mut bad = base(registry_grpc, config_grpc);
    bad.extend([
        "--cacert".to_owned(),
        s(&dir.path().join("missing-ca.pem")),
        "services".into(),
    ]);
    let run_bad = ctl(&bad).await;
    assert_eq!(run_bad.code, 2, "{run_bad:?}");
    assert!(run_bad.stderr.contains("missing-ca.pem"), "{run_bad:?}");

    shutdown.cancel();
    drop(coordinator);
}
