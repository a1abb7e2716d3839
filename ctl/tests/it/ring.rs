//! `ring` against lb-gateway's admin API.

use serde_json::Value;

use crate::harness::{NS, Stack, T, http_get, wait_until};

const ROUTES: &str = r#"
[[routes]]
name = "web"
match = { path_prefix = "/" }
backend = { namespace = "ctltest", service = "web" }
hash = "path"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_names_the_backend_a_key_goes_to_and_why() {
    assert_eq!(NS, "ctltest", "the routes file names the test namespace");
    let stack = Stack::start().await.with_gateway(ROUTES).await;
    for (id, port) in [("web-1", "9001"), ("web-2", "9002"), ("web-3", "9003")] {
        stack
            .ctl(&[
                "register",
                "web",
                "--address",
                "127.0.0.1",
                "--port",
                port,
                "--id",
                id,
            ])
            .await
            .assert_ok();
    }
    let admin = stack.gateway_admin.expect("gateway");
    wait_until(T, "the gateway to see three backends", || async move {
        let (_, body) = http_get(admin, "/admin/backends").await;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        v["routes"][0]["backends"].as_array().map(Vec::len) == Some(3)
    })
    .await;

    // The CLI's answer is the gateway's own.
    let key = "/users/alice";
    let json = stack.json(&["ring", "web", key]).await;
    let (_, direct) = http_get(admin, "/admin/lookup?route=web&key=%2Fusers%2Falice").await;
    let direct: Value = serde_json::from_str(&direct).expect("lookup json");
    assert_eq!(json["owner"], direct["owner"], "{json} vs {direct}");
    assert_eq!(json["pick"], direct["pick"], "{json} vs {direct}");
    assert_eq!(json["hash"], direct["hash"], "{json} vs {direct}");
    assert_eq!(json["order"].as_array().map(Vec::len), Some(3), "{json}");
    let pick = json["pick"].as_str().expect("a backend").to_owned();
    assert!(
        json["why"].as_str().expect("why").contains("takes the key"),
        "{json}"
    );

    // Table: the backend and the reason.
    let run = stack.ctl(&["ring", "web", key]).await;
    run.assert_ok();
    let backend_row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("backend"))
        .expect("backend row");
    assert!(backend_row.ends_with(&pick), "{}", run.stdout);
    assert!(run.stdout.contains("why: the key's hash"), "{}", run.stdout);

    // The ring: three members sharing the key space.
    let json = stack.json(&["ring", "web"]).await;
    let members = json["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{json}");
    let total: f64 = members.iter().filter_map(|m| m["share"].as_f64()).sum();
    assert!((total - 1.0).abs() < 0.01, "shares sum to {total}: {json}");
    let run = stack.ctl(&["ring", "web"]).await;
    run.assert_ok();
    assert!(
        run.stdout.contains("BACKEND") && run.stdout.contains("SHARE"),
        "{}",
        run.stdout
    );

    // Every route.
    let run = stack.ctl(&["ring"]).await;
    run.assert_ok();
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("web ") && l.contains("ctltest/web") && l.contains(" 3 ")),
        "{}",
        run.stdout
    );

    // An unknown route: the gateway's 404 message, exit 1.
    let run = stack.ctl(&["ring", "nope", "k"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("no route named \"nope\""),
        "{}",
        run.stderr
    );
}
