//! Registry commands against a live registry-svc.

use crate::harness::{NS, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_then_instances_lists_it_then_deregister_removes_it() {
    let stack = Stack::start().await;

    let run = stack
        .ctl(&[
            "register",
            "orders",
            "--address",
            "10.0.0.7",
            "--port",
            "8080",
            "--id",
            "orders-1",
            "--ttl",
            "60",
            "--tag",
            "blue",
            "--meta",
            "version=1.2",
            "--zone",
            "a",
        ])
        .await;
    run.assert_ok();
    assert!(
        run.stdout
            .contains("registered orders-1 of ctltest/orders at 10.0.0.7:8080"),
        "{}",
        run.stdout
    );

    // Table: a header and the instance's row.
    let run = stack.ctl(&["instances", "orders"]).await;
    run.assert_ok();
    let mut lines = run.stdout.lines();
    let header = lines.next().expect("header");
    for col in ["INSTANCE", "ADDRESS", "PROTOCOL", "HEALTH", "ZONE", "TAGS"] {
        assert!(header.contains(col), "{header}");
    }
    let row = lines.next().expect("a row");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..3], ["orders-1", "10.0.0.7:8080", "http"], "{row}");
    assert!(cells.contains(&"blue") && cells.contains(&"a"), "{row}");

    // JSON: every field, by name.
    let json = stack.json(&["instances", "orders"]).await;
    let list = json["instances"].as_array().expect("instances");
    assert_eq!(list.len(), 1, "{json}");
    assert_eq!(list[0]["instance_id"], "orders-1");
    assert_eq!(list[0]["namespace"], NS);
    assert_eq!(list[0]["port"], 8080);
    assert_eq!(list[0]["metadata"]["version"], "1.2");
    assert_eq!(list[0]["ttl_seconds"], 60);
    assert!(json["revision"].as_i64().expect("revision") > 0);

    // services counts it.
    let json = stack.json(&["services"]).await;
    assert_eq!(json["services"][0]["service"], "orders", "{json}");
    assert_eq!(json["services"][0]["instances"], 1, "{json}");
    let run = stack.ctl(&["services"]).await;
    run.assert_ok();
    assert!(run.stdout.starts_with("SERVICE"), "{}", run.stdout);
    assert!(
        run.stdout.lines().any(|l| l.starts_with("orders ")),
        "{}",
        run.stdout
    );

    let run = stack.ctl(&["deregister", "orders", "orders-1"]).await;
    run.assert_ok();
    assert!(
        run.stdout.contains("deregistered orders-1"),
        "{}",
        run.stdout
    );
    let json = stack.json(&["instances", "orders"]).await;
    assert_eq!(
        json["instances"].as_array().map(Vec::len),
        Some(0),
        "{json}"
    );
    let run = stack.ctl(&["instances", "orders"]).await;
    run.assert_ok();
    assert!(
        run.stdout.contains("no instances of ctltest/orders"),
        "{}",
        run.stdout
    );

    // Deregistering again is an error that says why.
    let run = stack.ctl(&["deregister", "orders", "orders-1"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("instance orders-1 of ctltest/orders is not registered"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_with_count_prints_the_listing_then_a_change_made_meanwhile_and_exits() {
    let stack = Stack::start().await;
    stack
        .ctl(&[
            "register",
            "cart",
            "--address",
            "10.0.0.1",
            "--port",
            "80",
            "--id",
            "cart-1",
        ])
        .await
        .assert_ok();

    let mut watch = stack.spawn(&["watch", "cart", "--count", "1"]);
    let first = watch.line().await;
    assert!(
        first.starts_with("# ctltest/cart: 1 instance(s) at revision"),
        "{first}"
    );
    let listed = watch.line().await;
    assert!(
        listed.contains("present") && listed.contains("cart-1"),
        "{listed}"
    );

    // Now that the watch is open, a change: a second instance.
    stack
        .ctl(&[
            "register",
            "cart",
            "--address",
            "10.0.0.2",
            "--port",
            "80",
            "--id",
            "cart-2",
        ])
        .await
        .assert_ok();
    let change = watch.line().await;
    assert!(
        change.contains("added") && change.contains("cart-2") && change.contains("10.0.0.2:80"),
        "{change}"
    );
    assert_eq!(watch.exit_code().await, 0);

    // JSON lines: a snapshot document, then the change.
    let mut watch = stack.spawn(&["-o", "json", "watch", "cart", "--count", "1"]);
    let snap: serde_json::Value = serde_json::from_str(&watch.line().await).expect("json line");
    assert_eq!(snap["event"], "snapshot");
    assert_eq!(
        snap["instances"].as_array().map(Vec::len),
        Some(2),
        "{snap}"
    );
    stack
        .ctl(&["deregister", "cart", "cart-1"])
        .await
        .assert_ok();
    let change: serde_json::Value = serde_json::from_str(&watch.line().await).expect("json line");
    assert_eq!(change["event"], "removed", "{change}");
    assert_eq!(change["instance"]["instance_id"], "cart-1", "{change}");
    assert_eq!(watch.exit_code().await, 0);
}
