//! Routes replaced at run time by versions of a config-svc item.

use crate::harness::{ConfigSvc, Gateway, HttpBackend, NS, Stack, T, wait_until};

fn routes_to(service: &str) -> String {
    format!(
        r#"
[[routes]]
name = "web"
backend = {{ namespace = "{NS}", service = "{service}" }}
hash = "header:x-user"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_version_in_config_svc_replaces_the_file_and_a_bad_one_is_rejected() {
    let stack = Stack::start().await;
    let config = ConfigSvc::start(&stack.coordinator.url()).await;
    let blue = HttpBackend::start("blue").await;
    let _rb = stack.register("blue", "blue-1", blue.port(), false).await;
    let green = HttpBackend::start("green").await;
    let _rg = stack
        .register("green", "green-1", green.port(), false)
        .await;

    // The file sends everything to blue until config-svc says otherwise.
    let url = config.url();
    let gw = Gateway::start_with(
        &stack.registry.url(),
        &routes_to("blue"),
        &[
            "--config-endpoints",
            &url,
            "--routes-item",
            "test/lb-gateway/routes.toml",
        ],
    )
    .await;
    gw.wait_backends("web", 1).await;
    assert_eq!(gw.get("/", &[("x-user", "u")]).await.1["backend"], "blue");

    config
        .publish("test", "lb-gateway", "routes.toml", &routes_to("green"))
        .await;
    wait_until(T, "requests to reach green", || async {
        gw.get("/", &[("x-user", "u")]).await.1["backend"] == "green"
    })
    .await;
    let listed = gw.admin("/admin/routes").await;
    assert!(
        listed["source"]
            .as_str()
            .expect("source")
            .starts_with("config-svc test/lb-gateway/routes.toml v"),
        "{listed}"
    );

    // Valid TOML for config-svc, but not valid routes: rejected, green stays.
    let bad = "[[routes]]\nname = \"web\"\nbackend = { namespace = \"test\", service = \"blue\" }\nretries = { attempts = 0 }\n";
    config
        .publish("test", "lb-gateway", "routes.toml", bad)
        .await;
    wait_until(T, "the bad version to be rejected", || async {
        gw.metric("lb_gateway_route_reloads_total{result=\"rejected\"}")
            .await
            >= 1.0
    })
    .await;
    // A route with backend.tls on, but this gateway has no --backend-cacert: rejected too.
    let tls = format!(
        "[[routes]]\nname = \"web\"\nbackend = {{ namespace = \"{NS}\", service = \"blue\", tls = true }}\n"
    );
    config
        .publish("test", "lb-gateway", "routes.toml", &tls)
        .await;
    wait_until(T, "the tls version to be rejected", || async {
        gw.metric("lb_gateway_route_reloads_total{result=\"rejected\"}")
            .await
            >= 2.0
    })
    .await;
    for _ in 0..5 {
        assert_eq!(gw.get("/", &[("x-user", "u")]).await.1["backend"], "green");
    }
    assert_eq!(
        gw.metric("lb_gateway_route_reloads_total{result=\"applied\"}")
            .await,
        1.0
    );
    gw.stop().await;
    config.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_keeps_a_routes_backend_keeps_its_live_set() {
    let stack = Stack::start().await;
    let config = ConfigSvc::start(&stack.coordinator.url()).await;
    let blue = HttpBackend::start("blue").await;
    let _rb = stack.register("blue", "blue-1", blue.port(), false).await;
    let url = config.url();
    let gw = Gateway::start_with(
        &stack.registry.url(),
        &routes_to("blue"),
        &[
            "--config-endpoints",
            &url,
            "--routes-item",
            "test/lb-gateway/routes.toml",
        ],
    )
    .await;
    gw.wait_backends("web", 1).await;
    // Same name and backend, other settings: the backend set carries over at once.
    let changed = format!("{}epsilon = 0.5\n", routes_to("blue"));
    config
        .publish("test", "lb-gateway", "routes.toml", &changed)
        .await;
    wait_until(T, "the new version to apply", || async {
        gw.admin("/admin/routes").await["routes"][0]["epsilon"] == 0.5
    })
    .await;
    assert_eq!(gw.backends("web").await.len(), 1, "no gap without backends");
    assert_eq!(gw.get("/", &[("x-user", "u")]).await.0, 200);
    gw.stop().await;
    config.stop().await;
}
