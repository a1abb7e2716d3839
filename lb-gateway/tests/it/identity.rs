//! Identity at the gateway: it reads the registry with its own read-only credentials and
//! forwards each caller's `Authorization` header unchanged, never adding its own.

use clap::Parser as _;

use crate::harness::{Coordinator, Gateway, HttpBackend, NS, Registry, T, wait_until, within};

const POLICY: &str = r#"
[roles]
discover = { "test" = "read" }
register = { "test" = "write" }
[subjects]
lb-gateway = ["discover"]
registrar = ["register"]
"#;

const GATEWAY_TOKEN: &str = "gateway-registry-token-0001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_authorization_reaches_the_backend_and_the_gateways_registry_token_never_does() {
    let dir = tempfile::tempdir().expect("dir");
    let (policy, tokens, gw_token) = (
        dir.path().join("policy.toml"),
        dir.path().join("tokens.txt"),
        dir.path().join("gateway.token"),
    );
    std::fs::write(&policy, POLICY).expect("policy");
    std::fs::write(
        &tokens,
        format!("{GATEWAY_TOKEN} lb-gateway\nregistrar-token-0001 registrar\n"),
    )
    .expect("tokens");
    std::fs::write(&gw_token, format!("{GATEWAY_TOKEN}\n")).expect("gateway token");
    let (policy, tokens, gw_token) = (
        policy.display().to_string(),
        tokens.display().to_string(),
        gw_token.display().to_string(),
    );
    let coordinator = Coordinator::start().await;
    let registry = Registry::start_with(
        &coordinator.url(),
        &[
            "--auth-mode",
            "token",
            "--auth-policy-file",
            &policy,
            "--auth-tokens-file",
            &tokens,
        ],
    )
    .await;

    // The client library registers with its own token; without one it is refused.
    let backend = HttpBackend::start("a").await;
    let instance = proto::registry_v1::Instance {
        namespace: NS.into(),
        service: "web".into(),
        instance_id: "a".into(),
        address: "127.0.0.1".into(),
        port: u32::from(backend.port()),
        ttl_seconds: 10,
        ..Default::default()
    };
    let e = registry
        .client()
        .register_once(instance.clone())
        .await
        .expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let client = registry
        .client()
        .with_token("registrar-token-0001")
        .expect("token");
    wait_until(T, "the registrar's registration to succeed", || {
        let (client, instance) = (client.clone(), instance.clone());
        async move { client.register_once(instance).await.is_ok() }
    })
    .await;
    let _registration = within(T, "register", client.register(instance))
        .await
        .expect("the registrar registers");

    let routes = format!(
        "[[routes]]\nname = \"web\"\nmatch = {{ path_prefix = \"/\" }}\nbackend = {{ namespace = \"{NS}\", service = \"web\" }}\n"
    );
    let gw = Gateway::start_with(
        &registry.url(),
        &routes,
        &["--registry-token-file", &gw_token],
    )
    .await;
    gw.wait_backends("web", 1).await;

    let (status, body, _) = gw
        .get("/orders", &[("authorization", "Bearer caller-token-xyz")])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["backend"], "a");
    assert_eq!(body["authorization"], "Bearer caller-token-xyz");
    let (status, body, _) = gw.get("/orders", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["authorization"], "",
        "the gateway added credentials of its own"
    );
    assert!(!body.to_string().contains(GATEWAY_TOKEN));

    // A gateway without the token cannot discover (it never acts as anyone else).
    let bad = lb_gateway::Config::try_parse_from([
        "lb-gateway",
        "--registry-token-file",
        "/nonexistent/token",
    ])
    .expect("parses");
    let e = bad.validate().expect_err("unreadable token file");
    assert!(e.contains("/nonexistent/token"), "{e}");
    gw.stop().await;
    registry.stop().await;
}
