//! The installed `etcdctl` 3.4 against the coordinator, command by command, checking what it
//! prints. These prove wire compatibility with etcd's own Go client.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Server, free_port, wait_until};

const LINES: Duration = Duration::from_secs(15);

/// Decodes a base64 field of etcdctl's JSON output (keys and values are base64 there).
fn b64(v: &Value) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected a base64 string, got {v}"));
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let idx = ALPHABET
            .iter()
            .position(|&a| a == c)
            .expect("base64 character") as u32;
        bits = (bits << 6) | idx;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).expect("utf-8")
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("expected an integer, got {v}"))
}

/// The `(key, value)` pairs of a `get -w json` result.
fn kv_pairs(json: &Value) -> Vec<(String, String)> {
    json["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| (b64(&kv["key"]), b64(&kv["value"])))
                .collect()
        })
        .unwrap_or_default()
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_report_revisions_and_versions_like_etcd() {
    let server = Server::start().await;
    let ctl = server.etcdctl();

    assert_eq!(ctl.ok(&["put", "a", "1"]).await.trim(), "OK");
    ctl.ok(&["put", "a", "2"]).await;
    ctl.ok(&["put", "b", "3"]).await;

    let got = ctl.json(&["get", "a"]).await;
    // The store starts at revision 1, so three puts end at revision 4.
    assert_eq!(int(&got["header"]["revision"]), 4, "{got}");
    assert_eq!(int(&got["count"]), 1, "{got}");
    let kv = &got["kvs"][0];
    assert_eq!(b64(&kv["key"]), "a");
    assert_eq!(b64(&kv["value"]), "2");
    assert_eq!(int(&kv["create_revision"]), 2, "{got}");
    assert_eq!(int(&kv["mod_revision"]), 3, "{got}");
    assert_eq!(int(&kv["version"]), 2, "{got}");
    assert!(kv.get("lease").is_none(), "no lease attached: {got}");
    assert!(
        got["header"]["member_id"].as_u64().unwrap_or(0) != 0,
        "header has a member id: {got}"
    );
    assert!(
        got["header"]["cluster_id"].as_u64().unwrap_or(0) != 0,
        "header has a cluster id: {got}"
    );

    // Simple output: key line, value line.
    assert_eq!(lines(&ctl.ok(&["get", "a"]).await), ["a", "2"]);
    // A past revision shows the value as of then.
    assert_eq!(lines(&ctl.ok(&["get", "a", "--rev=2"]).await), ["a", "1"]);
    // Before the key existed, nothing.
    assert_eq!(ctl.ok(&["get", "b", "--rev=3"]).await.trim(), "");
    // A missing key prints nothing and succeeds.
    assert_eq!(ctl.ok(&["get", "missing"]).await.trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_prefix_keys_only_limit_and_sort() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    for (k, v) in [
        ("p/b", "2"),
        ("p/a", "3"),
        ("p/c", "1"),
        ("pz", "x"),
        ("o", "y"),
    ] {
        ctl.ok(&["put", k, v]).await;
    }

    let all = ctl.json(&["get", "--prefix", "p/"]).await;
    assert_eq!(
        kv_pairs(&all),
        [
            ("p/a".into(), "3".into()),
            ("p/b".into(), "2".into()),
            ("p/c".into(), "1".into())
        ],
        "prefix range in key order, excluding pz and o: {all}"
    );
    assert_eq!(int(&all["count"]), 3);

    assert_eq!(
        lines(&ctl.ok(&["get", "--prefix", "p/", "--keys-only"]).await),
        ["p/a", "", "p/b", "", "p/c", ""]
    );

    let limited = ctl.json(&["get", "--prefix", "p/", "--limit=2"]).await;
    assert_eq!(kv_pairs(&limited).len(), 2, "{limited}");
    assert_eq!(
        limited["more"],
        Value::Bool(true),
        "more is set when the limit cut: {limited}"
    );
    assert_eq!(
        int(&limited["count"]),
        3,
        "count is the total, not the page: {limited}"
    );

    let by_value = ctl
        .ok(&[
            "get",
            "--prefix",
            "p/",
            "--sort-by=VALUE",
            "--order=DESCEND",
        ])
        .await;
    assert_eq!(lines(&by_value), ["p/a", "3", "p/b", "2", "p/c", "1"]);

    let by_create = ctl
        .ok(&[
            "get",
            "--prefix",
            "p/",
            "--sort-by=CREATE",
            "--order=ASCEND",
        ])
        .await;
    assert_eq!(lines(&by_create), ["p/b", "2", "p/a", "3", "p/c", "1"]);

    let by_key_desc = ctl.ok(&["get", "--prefix", "p/", "--order=DESCEND"]).await;
    assert_eq!(lines(&by_key_desc), ["p/c", "1", "p/b", "2", "p/a", "3"]);

    // A sort other than by key sorts the whole range, then limits.
    let top = ctl
        .ok(&[
            "get",
            "--prefix",
            "p/",
            "--sort-by=VALUE",
            "--order=DESCEND",
            "--limit=1",
        ])
        .await;
    assert_eq!(lines(&top), ["p/a", "3"], "the largest value of the range");
    let newest = ctl
        .ok(&[
            "get",
            "--prefix",
            "p/",
            "--sort-by=MODIFY",
            "--order=DESCEND",
            "--limit=1",
        ])
        .await;
    assert_eq!(
        lines(&newest),
        ["p/c", "1"],
        "the most recently modified key"
    );

    // `--from-key`: every key >= the given one.
    let from = ctl.ok(&["get", "--from-key", "p/b", "--keys-only"]).await;
    assert_eq!(
        lines(&from)
            .into_iter()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>(),
        ["p/b", "p/c", "pz"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_prefix_with_prev_kv_prints_deleted_pairs() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    for (k, v) in [("d/1", "one"), ("d/2", "two"), ("e", "stay")] {
        ctl.ok(&["put", k, v]).await;
    }

    let out = ctl.ok(&["del", "--prefix", "--prev-kv", "d/"]).await;
    assert_eq!(lines(&out), ["2", "d/1", "one", "d/2", "two"]);

    assert_eq!(ctl.ok(&["get", "--prefix", "d/"]).await.trim(), "");
    assert_eq!(lines(&ctl.ok(&["get", "e"]).await), ["e", "stay"]);
    // Deleting nothing reports 0.
    assert_eq!(ctl.ok(&["del", "nothing"]).await.trim(), "0");

    // One delete of two keys is one revision: puts at 2,3,4, delete at 5.
    let status = ctl.json(&["get", "e"]).await;
    assert_eq!(int(&status["header"]["revision"]), 5, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_interactive_takes_the_success_branch_when_compares_hold() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    ctl.ok(&["put", "k1", "v1"]).await;

    let input = "val(\"k1\") = \"v1\"\nmod(\"k1\") > \"0\"\nversion(\"k1\") = \"1\"\n\n\
                 put k2 yes\nget k1\n\nput k3 no\n\n";
    let out = ctl
        .run_with_stdin(&["txn", "-i"], Some(input), crate::harness::ETCDCTL_TIMEOUT)
        .await
        .ok("txn -i");
    let printed: Vec<&str> = out
        .lines()
        .filter(|l| !l.ends_with(':') && !l.is_empty())
        .collect();
    assert_eq!(
        printed,
        ["SUCCESS", "OK", "k1", "v1"],
        "full output:\n{out}"
    );

    assert_eq!(lines(&ctl.ok(&["get", "k2"]).await), ["k2", "yes"]);
    assert_eq!(
        ctl.ok(&["get", "k3"]).await.trim(),
        "",
        "the failure branch did not run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_interactive_takes_the_failure_branch_when_a_compare_fails() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    ctl.ok(&["put", "k1", "v1"]).await;

    let input =
        "val(\"k1\") = \"v1\"\nval(\"k1\") = \"other\"\n\nput k2 yes\n\nput k3 no\ndel k1\n\n";
    let out = ctl
        .run_with_stdin(
            &["txn", "-i", "-w", "json"],
            Some(input),
            crate::harness::ETCDCTL_TIMEOUT,
        )
        .await
        .ok("txn -i -w json");
    let json_line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let resp: Value = serde_json::from_str(json_line).expect("txn JSON");
    assert!(
        resp.get("succeeded").is_none() || resp["succeeded"] == Value::Bool(false),
        "the compare failed: {resp}"
    );
    assert_eq!(
        resp["responses"].as_array().map(Vec::len),
        Some(2),
        "{resp}"
    );
    // Both failure ops are one revision: 2 for the first put, 3 for the txn.
    assert_eq!(int(&resp["header"]["revision"]), 3, "{resp}");

    assert_eq!(
        ctl.ok(&["get", "k2"]).await.trim(),
        "",
        "the success branch did not run"
    );
    assert_eq!(lines(&ctl.ok(&["get", "k3"]).await), ["k3", "no"]);
    assert_eq!(ctl.ok(&["get", "k1"]).await.trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prefix_streams_puts_and_deletes_in_order() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    // Start from a known revision so no event can be missed between spawn and the puts.
    let rev = int(&ctl.json(&["get", "w/"]).await["header"]["revision"]) + 1;
    let mut watch = ctl.spawn(&["watch", "--prefix", "w/", &format!("--rev={rev}")]);

    ctl.ok(&["put", "w/a", "1"]).await;
    ctl.ok(&["put", "other", "x"]).await;
    ctl.ok(&["put", "w/b", "2"]).await;
    ctl.ok(&["del", "w/a"]).await;

    let got = watch.lines(9, LINES).await;
    assert_eq!(
        got,
        ["PUT", "w/a", "1", "PUT", "w/b", "2", "DELETE", "w/a", ""]
    );

    // Live events after the replay too.
    ctl.ok(&["put", "w/c", "3"]).await;
    assert_eq!(watch.lines(3, LINES).await, ["PUT", "w/c", "3"]);
    watch.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_rev_replays_history_from_that_revision() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    ctl.ok(&["put", "h", "1"]).await; // rev 2
    ctl.ok(&["put", "h", "2"]).await; // rev 3
    ctl.ok(&["put", "h", "3"]).await; // rev 4
    ctl.ok(&["del", "h"]).await; // rev 5

    let mut watch = ctl.spawn(&["watch", "h", "--rev=3"]);
    let got = watch.lines(9, LINES).await;
    assert_eq!(got, ["PUT", "h", "2", "PUT", "h", "3", "DELETE", "h", ""]);
    watch.kill().await;

    // From revision 1 (the empty store): the whole history of the key.
    let mut watch = ctl.spawn(&["watch", "h", "--rev=1"]);
    let got = watch.lines(12, LINES).await;
    assert_eq!(
        got,
        [
            "PUT", "h", "1", "PUT", "h", "2", "PUT", "h", "3", "DELETE", "h", ""
        ]
    );
    watch.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prev_kv_shows_the_value_before_each_event() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    ctl.ok(&["put", "pk", "old"]).await; // rev 2
    let mut watch = ctl.spawn(&["watch", "pk", "--prev-kv", "--rev=3"]);
    ctl.ok(&["put", "pk", "new"]).await;
    ctl.ok(&["del", "pk"]).await;
    // With --prev-kv etcdctl prints: type, prev key, prev value, key, value.
    let got = watch.lines(10, LINES).await;
    assert_eq!(
        got,
        [
            "PUT", "pk", "old", "pk", "new", "DELETE", "pk", "new", "pk", ""
        ]
    );
    watch.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_grant_keepalive_timetolive_list_and_revoke() {
    let server = Server::start().await;
    let ctl = server.etcdctl();

    let granted = ctl.ok(&["lease", "grant", "100"]).await;
    // "lease 694d7c4b2dcd3c0e granted with TTL(100s)"
    let words: Vec<&str> = granted.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"lease"), "{granted}");
    assert!(granted.contains("granted with TTL(100s)"), "{granted}");
    let id = words[1].to_string();
    assert!(
        u64::from_str_radix(&id, 16).is_ok_and(|n| n != 0),
        "hex lease id: {granted}"
    );

    ctl.ok(&["put", "--lease", &id, "leased/a", "1"]).await;
    ctl.ok(&["put", "--lease", &id, "leased/b", "2"]).await;
    ctl.ok(&["put", "unleased", "3"]).await;

    let got = ctl.json(&["get", "leased/a"]).await;
    assert_eq!(
        got["kvs"][0]["lease"].as_i64().map(|l| format!("{l:016x}")),
        Some(id.clone()),
        "the key carries the lease: {got}"
    );

    let kept = ctl.ok(&["lease", "keep-alive", "--once", &id]).await;
    assert_eq!(kept.trim(), format!("lease {id} keepalived with TTL(100)"));

    let ttl = ctl.ok(&["lease", "timetolive", "--keys", &id]).await;
    assert!(
        ttl.starts_with(&format!("lease {id} granted with TTL(100s), remaining(")),
        "{ttl}"
    );
    assert!(ttl.contains("attached keys([leased/a leased/b])"), "{ttl}");
    let ttl_json = ctl.json(&["lease", "timetolive", &id]).await;
    let remaining = int(&ttl_json["ttl"]);
    assert!(
        (90..=100).contains(&remaining),
        "remaining TTL just after keep-alive: {ttl_json}"
    );
    assert_eq!(int(&ttl_json["granted-ttl"]), 100, "{ttl_json}");

    let second = ctl.ok(&["lease", "grant", "50"]).await;
    let second_id = second
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    let list = ctl.ok(&["lease", "list"]).await;
    assert!(list.starts_with("found 2 leases"), "{list}");
    assert!(list.lines().any(|l| l == id), "{list}");
    assert!(list.lines().any(|l| l == second_id), "{list}");

    assert_eq!(
        ctl.ok(&["lease", "revoke", &id]).await.trim(),
        format!("lease {id} revoked")
    );
    assert_eq!(
        ctl.ok(&["get", "--prefix", "leased/"]).await.trim(),
        "",
        "revoke deletes its keys"
    );
    assert_eq!(
        lines(&ctl.ok(&["get", "unleased"]).await),
        ["unleased", "3"]
    );
    let gone = ctl.ok(&["lease", "timetolive", &id]).await;
    assert_eq!(gone.trim(), format!("lease {id} already expired"));
    let list = ctl.ok(&["lease", "list"]).await;
    assert!(list.starts_with("found 1 leases"), "{list}");

    // Revoking twice: the lease is not found.
    let again = ctl.run(&["lease", "revoke", &id]).await;
    assert!(!again.status.success());
    assert!(
        again
            .stderr
            .contains("etcdserver: requested lease not found"),
        "{}",
        again.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expires_and_deletes_its_keys_without_keepalive() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    let granted = ctl.ok(&["lease", "grant", "2"]).await;
    let id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    ctl.ok(&["put", "--lease", &id, "eph", "1"]).await;
    let start = std::time::Instant::now();
    wait_until(Duration::from_secs(10), "the leased key to expire", || {
        let ctl = ctl.clone();
        async move { ctl.ok(&["get", "eph"]).await.trim().is_empty() }
    })
    .await;
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "a 2 s lease expired after only {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_gives_mutual_exclusion_to_two_contenders() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    let file = server.scratch().join("critical-section.log");
    let script = format!(
        "echo start >> {f}; sleep 1; echo end >> {f}",
        f = file.display()
    );
    let args = ["lock", "mylock", "--", "sh", "-c", &script];
    let (a, b) = tokio::join!(
        ctl.run_with_stdin(&args, None, Duration::from_secs(30)),
        ctl.run_with_stdin(&args, None, Duration::from_secs(30)),
    );
    a.ok("lock (first contender)");
    b.ok("lock (second contender)");
    let log = std::fs::read_to_string(&file).expect("both contenders wrote");
    assert_eq!(
        lines(&log),
        ["start", "end", "start", "end"],
        "critical sections overlapped"
    );

    // Released: the lock prefix is empty again.
    wait_until(
        Duration::from_secs(5),
        "the lock keys to be deleted",
        || {
            let ctl = ctl.clone();
            async move {
                ctl.ok(&["get", "--prefix", "mylock"])
                    .await
                    .trim()
                    .is_empty()
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_holder_blocks_a_waiter_until_it_releases() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    // Without a command, `lock` prints the lock key and holds it until interrupted.
    let mut holder = ctl.spawn(&["lock", "held"]);
    let key = holder
        .next_line(LINES)
        .await
        .expect("the holder prints its key");
    assert!(key.starts_with("held/"), "{key}");

    let mut waiter = ctl.spawn(&["lock", "held"]);
    waiter.assert_silent(Duration::from_millis(1500)).await;

    holder.signal("INT").await;
    let key2 = waiter
        .next_line(LINES)
        .await
        .expect("the waiter gets the lock");
    assert!(key2.starts_with("held/") && key2 != key, "{key2}");
    waiter.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elect_listener_observes_the_leader_and_the_next_one() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    let mut first = ctl.spawn(&["elect", "myelection", "p1"]);
    let won = first.lines(2, LINES).await;
    assert!(won[0].starts_with("myelection/"), "{won:?}");
    assert_eq!(won[1], "p1");

    let mut listener = ctl.spawn(&["elect", "--listen", "myelection"]);
    let seen = listener.lines(2, LINES).await;
    assert_eq!(seen, won, "the listener sees the current leader's proposal");

    // A second candidate waits while the first leads.
    let mut second = ctl.spawn(&["elect", "myelection", "p2"]);
    second.assert_silent(Duration::from_millis(1500)).await;

    // The first resigns on SIGINT; the second wins and the listener sees it.
    first.signal("INT").await;
    assert!(
        first.wait(LINES).await.success(),
        "the first campaigner exits cleanly on SIGINT"
    );
    let won2 = second.lines(2, LINES).await;
    assert_eq!(won2[1], "p2", "{won2:?}");
    let seen2 = listener.lines(2, LINES).await;
    assert_eq!(seen2, won2);
    second.kill().await;
    listener.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_shows_one_started_member_with_its_urls() {
    // Advertise a known client URL, as a deployment would.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let server = Server::start_with(&[
        "--name",
        "node-a",
        "--listen-client-urls",
        &url,
        "--advertise-client-urls",
        &url,
    ])
    .await;
    let ctl = server.etcdctl();

    let list = ctl.json(&["member", "list"]).await;
    let members = list["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{list}");
    let m = &members[0];
    assert_eq!(m["name"], "node-a", "{list}");
    assert_eq!(
        m["ID"].as_u64(),
        list["header"]["member_id"].as_u64(),
        "{list}"
    );
    assert!(m["ID"].as_u64().unwrap_or(0) != 0, "{list}");
    assert_eq!(m["clientURLs"], serde_json::json!([url]), "{list}");
    assert!(
        m.get("isLearner").is_none() || m["isLearner"] == false,
        "{list}"
    );

    let table = ctl.ok(&["member", "list"]).await;
    // "ID, started, name, peer urls, client urls, is learner"
    let fields: Vec<&str> = table.trim().split(", ").collect();
    assert_eq!(fields.len(), 6, "{table}");
    assert_eq!(fields[1], "started", "{table}");
    assert_eq!(fields[2], "node-a", "{table}");
    assert_eq!(fields[4], url, "{table}");
    assert_eq!(fields[5], "false", "{table}");

    // `--cluster` dials the advertised client URLs from the member list.
    // etcdctl 3.4 prints the health lines to stderr.
    let out = ctl.run(&["endpoint", "health", "--cluster"]).await;
    let health = format!("{}{}", out.stdout, out.stderr);
    out.ok("endpoint health --cluster");
    assert!(health.contains(&format!("{url} is healthy")), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_status_and_health_report_a_healthy_leader() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    ctl.ok(&["put", "x", "1"]).await;

    // etcdctl 3.4 prints the health lines to stderr.
    let out = ctl.run(&["endpoint", "health"]).await;
    let health = format!("{}{}", out.stdout, out.stderr);
    out.ok("endpoint health");
    assert!(
        health.contains(&format!("{} is healthy", server.endpoint())),
        "{health}"
    );
    let health_json = ctl.json(&["endpoint", "health"]).await;
    assert_eq!(health_json[0]["health"], true, "{health_json}");

    let status = ctl.json(&["endpoint", "status"]).await;
    let s = &status[0]["Status"];
    assert_eq!(
        status[0]["Endpoint"],
        server.endpoint().as_str(),
        "{status}"
    );
    assert!(
        !s["version"].as_str().unwrap_or("").is_empty(),
        "a version: {status}"
    );
    assert_eq!(int(&s["header"]["revision"]), 2, "{status}");
    let member = s["header"]["member_id"].as_u64().expect("member id");
    assert_eq!(
        s["leader"].as_u64(),
        Some(member),
        "a single node leads itself: {status}"
    );
    assert!(s["raftTerm"].as_u64().unwrap_or(0) >= 1, "{status}");
    assert!(s["dbSize"].as_i64().unwrap_or(0) > 0, "{status}");

    // The table form has the same facts; IS LEADER is true.
    let table = ctl.ok(&["endpoint", "status"]).await;
    let fields: Vec<&str> = table.trim().split(", ").collect();
    assert_eq!(fields[0], server.endpoint(), "{table}");
    assert_eq!(fields[4], "true", "IS LEADER: {table}");
    assert_eq!(fields[5], "false", "IS LEARNER: {table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_on_a_single_member_accepts_only_itself() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    let status = ctl.json(&["endpoint", "status"]).await;
    let member = status[0]["Status"]["header"]["member_id"]
        .as_u64()
        .expect("member id");
    let out = ctl.ok(&["move-leader", &format!("{member:x}")]).await;
    assert_eq!(
        out.trim(),
        format!("Leadership transferred from {member:x} to {member:x}")
    );
    let out = ctl
        .run(&["move-leader", &format!("{:x}", member ^ 1)])
        .await;
    assert!(!out.status.success(), "no other member to move to");
    assert!(
        out.stderr.contains("etcdserver: bad leader transferee"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_makes_older_revisions_unreadable() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    for v in ["1", "2", "3", "4"] {
        ctl.ok(&["put", "c", v]).await; // revs 2..=5
    }
    assert_eq!(
        ctl.ok(&["compaction", "4"]).await.trim(),
        "compacted revision 4"
    );

    let old = ctl.run(&["get", "c", "--rev=3"]).await;
    assert!(
        !old.status.success(),
        "reading below the compaction must fail: {}",
        old.stdout
    );
    assert!(
        old.stderr
            .contains("etcdserver: mvcc: required revision has been compacted"),
        "{}",
        old.stderr
    );
    // The compaction revision itself is still readable, and so is the present.
    assert_eq!(lines(&ctl.ok(&["get", "c", "--rev=4"]).await), ["c", "3"]);
    assert_eq!(lines(&ctl.ok(&["get", "c"]).await), ["c", "4"]);

    // Compacting again at or below it fails the same way.
    let again = ctl.run(&["compaction", "3"]).await;
    assert!(!again.status.success());
    assert!(
        again
            .stderr
            .contains("required revision has been compacted"),
        "{}",
        again.stderr
    );

    // A watch from below the compaction is cancelled with the reason.
    let mut watch = ctl.spawn(&["watch", "c", "--rev=2"]);
    let first = watch.next_line(LINES).await;
    let stderr = watch.stderr().await;
    assert!(
        first
            .as_deref()
            .is_some_and(|l| l.contains("required revision has been compacted"))
            || stderr.contains("required revision has been compacted"),
        "stdout: {first:?}, stderr: {stderr}"
    );
    watch.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_writes_a_nonempty_file() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    for i in 0..20 {
        ctl.ok(&["put", &format!("snap/{i}"), "some value"]).await;
    }
    let path = server.scratch().join("backup.db");
    let path_str = path.display().to_string();
    let out = ctl.ok(&["snapshot", "save", &path_str]).await;
    assert!(
        out.contains(&format!("Snapshot saved at {path_str}")),
        "{out}"
    );
    let len = std::fs::metadata(&path)
        .expect("snapshot file exists")
        .len();
    assert!(len > 0, "snapshot is empty");
    assert!(
        !server.scratch().join("backup.db.part").exists(),
        "no partial file left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_perf_small_load_passes() {
    let server = Server::start().await;
    let ctl = server.etcdctl();
    // Runs about 60 s by design.
    let out = ctl
        .run_with_stdin(
            &["check", "perf", "--load=s"],
            None,
            Duration::from_secs(180),
        )
        .await;
    let stdout = out.stdout.clone();
    let text = out.ok("check perf --load=s");
    assert!(text.lines().any(|l| l.trim() == "PASS"), "{stdout}");
    assert!(!text.contains("FAIL"), "{stdout}");
    // It cleans up after itself.
    wait_until(
        Duration::from_secs(5),
        "the check perf prefix to be empty",
        || {
            let ctl = ctl.clone();
            async move {
                let out = ctl
                    .ok(&["get", "--prefix", "/etcdctl-check-perf/", "--keys-only"])
                    .await;
                out.trim().is_empty()
            }
        },
    )
    .await;
}
