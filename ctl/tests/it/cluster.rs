//! `cluster status`.

use crate::harness::{Stack, dead_addr};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_shows_the_leader_revision_and_every_service_healthy() {
    let stack = Stack::start().await.with_gateway("").await;
    // Something to give the store a revision above 1.
    stack
        .ctl(&["config", "put", "g/k.txt", "--content", "x"])
        .await
        .assert_ok();

    let json = stack.json(&["cluster", "status"]).await;
    assert_eq!(json["healthy"], true, "{json}");
    let members = json["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{json}");
    assert_eq!(json["leader"], members[0]["name"], "{json}");
    assert_eq!(members[0]["is_leader"], true, "{json}");
    assert!(json["revision"].as_i64().expect("revision") > 1, "{json}");
    assert!(
        members[0]["db_size"].as_i64().expect("db size") > 0,
        "{json}"
    );
    let services: Vec<&str> = json["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["service"].as_str().expect("name"))
        .collect();
    assert_eq!(
        services,
        ["coordinator", "registry-svc", "config-svc", "lb-gateway"],
        "{json}"
    );

    let run = stack.ctl(&["cluster", "status"]).await;
    run.assert_ok();
    assert!(
        run.stdout.starts_with("coordinator: leader "),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("MEMBER") && run.stdout.contains("REVISION"),
        "{}",
        run.stdout
    );
    let registry_row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("registry-svc"))
        .expect("registry row");
    assert!(
        registry_row.ends_with("ok  ok")
            || registry_row
                .split_whitespace()
                .filter(|c| *c == "ok")
                .count()
                == 2,
        "{registry_row}"
    );
    assert!(run.stdout.contains("all healthy"), "{}", run.stdout);

    // A config-svc admin server that is down: reported, and exit code 3.
    let dead = dead_addr();
    let mut args: Vec<String> = stack.flags();
    args.extend([
        "--config-admin".into(),
        dead.clone(),
        "cluster".into(),
        "status".into(),
    ]);
    let run = crate::harness::ctl(&args).await;
    assert_eq!(run.code, 3, "{run:?}");
    // (Given twice, the flag lists both admin servers: the live one and the dead one.)
    let row = run
        .stdout
        .lines()
        .find(|l| l.contains(&dead))
        .expect("the dead server's row");
    assert!(
        row.starts_with("config-svc") && row.contains("down (connection refused)"),
        "{row}"
    );
    assert!(run.stdout.contains("NOT all healthy"), "{}", run.stdout);
}
