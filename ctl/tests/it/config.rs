//! Configuration commands against a live config-svc.

use crate::harness::Stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_history_diff_rollback_round_trip() {
    let stack = Stack::start().await;
    let item = "app/settings.json";

    let run = stack
        .ctl(&[
            "config",
            "put",
            item,
            "--content",
            r#"{"greeting":"hello","port":80}"#,
            "-m",
            "first",
        ])
        .await;
    run.assert_ok();
    assert!(
        run.stdout
            .contains("published ctltest/app/settings.json version 1 (json"),
        "{}",
        run.stdout
    );

    // The format comes from a file's extension too; stdin works with "-f -".
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("v2.json");
    std::fs::write(&file, r#"{"greeting":"bonjour","port":80}"#).expect("write");
    let json = stack
        .json(&[
            "config",
            "put",
            item,
            "-f",
            file.to_str().expect("utf-8"),
            "-m",
            "second",
        ])
        .await;
    assert_eq!(json["version"]["number"], 2, "{json}");
    assert_eq!(json["version"]["author"], "tester", "{json}");
    assert_eq!(json["item"]["current_version"], 2, "{json}");

    // get: table with the content after it; JSON with everything; --content-only.
    let run = stack.ctl(&["config", "get", item]).await;
    run.assert_ok();
    assert!(
        run.stdout.contains("version   2 (current 2, latest 2)"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("format    json"), "{}", run.stdout);
    assert!(
        run.stdout
            .trim_end()
            .ends_with(r#"{"greeting":"bonjour","port":80}"#),
        "{}",
        run.stdout
    );
    let run = stack
        .ctl(&["config", "get", item, "--version", "1", "--content-only"])
        .await;
    run.assert_ok();
    assert_eq!(run.stdout.trim_end(), r#"{"greeting":"hello","port":80}"#);

    // history: two versions, newest first, the current one marked.
    let json = stack.json(&["config", "history", item]).await;
    let versions = json["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 2, "{json}");
    assert_eq!(
        (
            versions[0]["number"].as_u64(),
            versions[1]["number"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(versions[1]["message"], "first");
    let run = stack.ctl(&["config", "history", item]).await;
    run.assert_ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    assert!(lines[0].starts_with("VERSION"), "{}", lines[0]);
    assert!(
        lines[1].starts_with("2 ") && lines[1].contains("current") && lines[1].contains("second"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("1 ") && lines[2].contains("first"),
        "{}",
        lines[2]
    );

    // diff: unified text, and the key path that changed.
    let run = stack.ctl(&["config", "diff", item, "1", "2"]).await;
    run.assert_ok();
    assert!(
        run.stdout.contains(r#"-{"greeting":"hello","port":80}"#),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(r#"+{"greeting":"bonjour","port":80}"#),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("greeting") && l.contains("changed")),
        "{}",
        run.stdout
    );
    let json = stack.json(&["config", "diff", item, "1"]).await;
    assert_eq!(json["to_version"], 2, "{json}");
    assert_eq!(json["changes"][0]["path"], "greeting", "{json}");
    assert_eq!(json["changes"][0]["new_value"], "\"bonjour\"", "{json}");

    // rollback to 1: a third version with the first one's content.
    let run = stack
        .ctl(&["config", "rollback", item, "1", "-m", "undo"])
        .await;
    run.assert_ok();
    assert!(
        run.stdout
            .contains("rolled back ctltest/app/settings.json version 3"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("content of version 1"),
        "{}",
        run.stdout
    );
    let json = stack.json(&["config", "get", item]).await;
    assert_eq!(json["version"]["number"], 3, "{json}");
    assert_eq!(json["version"]["rollback_of"], 1, "{json}");
    assert_eq!(
        json["version"]["content"], r#"{"greeting":"hello","port":80}"#,
        "{json}"
    );

    // list shows the item.
    let run = stack.ctl(&["config", "list"]).await;
    run.assert_ok();
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("app/settings.json") && l.contains("json")),
        "{}",
        run.stdout
    );

    // A refusal from the service is one line naming it, exit 1.
    let run = stack.ctl(&["config", "get", "app/missing.json"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.starts_with("platformctl: config-svc: "),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("NOT_FOUND"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    // Invalid content: the service's validation message.
    let run = stack
        .ctl(&["config", "put", item, "--content", "{not json"])
        .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("INVALID_ARGUMENT"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_with_count_sees_a_version_published_meanwhile() {
    let stack = Stack::start().await;
    let item = "web/app.yaml";
    stack
        .ctl(&["config", "put", item, "--content", "a: 1\n"])
        .await
        .assert_ok();

    let mut watch = stack.spawn(&["config", "watch", item, "--count", "1"]);
    let initial = watch.line().await;
    assert!(
        initial.starts_with("initial") && initial.contains("ctltest/web/app.yaml version 1"),
        "{initial}"
    );
    let synced = watch.line().await;
    assert!(synced.starts_with("# synced at revision"), "{synced}");

    stack
        .ctl(&["config", "put", item, "--content", "a: 2\n"])
        .await
        .assert_ok();
    let update = watch.line().await;
    assert!(
        update.starts_with("published") && update.contains("version 2 (yaml"),
        "{update}"
    );
    assert_eq!(watch.exit_code().await, 0);

    // JSON lines, watching the whole group, with the content.
    let mut watch = stack.spawn(&[
        "-o", "json", "config", "watch", "--group", "web", "--count", "1",
    ]);
    let first: serde_json::Value =
        serde_json::from_str(&watch.line_where(|l| l.contains("\"synced\"")).await).expect("json");
    assert_eq!(first["event"], "synced");
    stack
        .ctl(&["config", "rollback", item, "1"])
        .await
        .assert_ok();
    let update: serde_json::Value = serde_json::from_str(&watch.line().await).expect("json");
    assert_eq!(update["reason"], "rolled-back", "{update}");
    assert_eq!(update["number"], 3, "{update}");
    assert_eq!(update["content"], "a: 1\n", "{update}");
    assert_eq!(watch.exit_code().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_starts_shows_promotes_and_aborts() {
    let stack = Stack::start().await;
    let item = "svc/flags.toml";
    stack
        .ctl(&["config", "put", item, "--content", "on = false\n"])
        .await
        .assert_ok();

    let run = stack
        .ctl(&[
            "config",
            "rollout",
            "start",
            item,
            "--content",
            "on = true\n",
            "--percentage",
            "10",
            "--label",
            "zone=a",
        ])
        .await;
    run.assert_ok();
    assert!(
        run.stdout
            .contains("started rollout of ctltest/svc/flags.toml version 2"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("zone=a and 10% of client ids"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("others keep version 1"),
        "{}",
        run.stdout
    );

    let json = stack.json(&["config", "rollout", "show", item]).await;
    assert_eq!(json["rollout"]["candidate"], 2, "{json}");
    assert_eq!(json["rollout"]["base"], 1, "{json}");
    assert_eq!(json["rollout"]["percentage"], 10, "{json}");
    assert_eq!(json["rollout"]["labels"]["zone"], "a", "{json}");
    assert_eq!(json["current_version"], 1, "{json}");
    let run = stack.ctl(&["config", "rollout", "show", item]).await;
    run.assert_ok();
    assert!(
        run.stdout.contains(
            "rollout of version 2 to zone=a and 10% of client ids (others keep version 1)"
        ),
        "{}",
        run.stdout
    );

    let run = stack.ctl(&["config", "rollout", "promote", item]).await;
    run.assert_ok();
    assert!(
        run.stdout
            .contains("no rollout in progress; current version 2"),
        "{}",
        run.stdout
    );

    // A second rollout, aborted: the current version stays, the candidate is listed as aborted.
    stack
        .ctl(&[
            "config",
            "rollout",
            "start",
            item,
            "--content",
            "on = 3\n",
            "--label",
            "zone=b",
        ])
        .await
        .assert_ok();
    let json = stack.json(&["config", "rollout", "abort", item]).await;
    assert!(json["rollout"].is_null(), "{json}");
    assert_eq!(json["current_version"], 2, "{json}");
    assert_eq!(json["aborted"][0], 3, "{json}");
    let run = stack.ctl(&["config", "rollout", "show", item]).await;
    run.assert_ok();
    assert!(
        run.stdout.contains("aborted candidates: 3"),
        "{}",
        run.stdout
    );
}
