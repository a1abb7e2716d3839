//! Publish, read, history, diff, rollback, CAS, validation, delete, retention — through gRPC
//! against a real coordinator.

use proto::config_v1 as pb;
use tonic::Code;

use crate::coord::{Coordinator, within};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_get_returns_content_checksum_and_metadata() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let ns = fresh_ns("publish");
    let it = item(&ns, "orders", "app.yaml");

    let mut req = publish_req(&it, pb::Format::Yaml, "port: 80\n");
    req.message = "first".into();
    let p = publish(&mut g, req).await;
    let v = p.version.expect("version");
    assert_eq!(v.number, 1);
    assert_eq!(
        v.checksum,
        config_svc::model::checksum("port: 80\n"),
        "checksum is the content's SHA-256"
    );
    assert!(p.revision > 0);
    let info = p.item.expect("item");
    assert_eq!(info.current_version, 1);
    assert_eq!(info.format, pb::Format::Yaml as i32);

    let got = get(&mut g, &it, 0, None).await.expect("get current");
    let v = got.version.expect("version");
    assert_eq!(
        (
            v.number,
            v.content.as_str(),
            v.author.as_str(),
            v.message.as_str()
        ),
        (1, "port: 80\n", "tester", "first")
    );
    assert!(v.created_at_ms > 0);

    // A second publish keeps the format and moves the pointer.
    let mut req = publish_req(&it, pb::Format::Unspecified, "port: 81\n");
    req.author = "bob".into();
    let p = publish(&mut g, req).await;
    assert_eq!(p.version.expect("v").number, 2);
    let got = get(&mut g, &it, 0, None).await.expect("get");
    assert_eq!(got.version.expect("v").content, "port: 81\n");
    let old = get(&mut g, &it, 1, None).await.expect("get v1");
    assert_eq!(old.version.expect("v").content, "port: 80\n");

    // Listed in its namespace.
    let list = within(
        T,
        "List",
        g.list(pb::ListRequest {
            namespace: ns.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("list")
    .into_inner();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].current_version, 2);
    assert!(svc.metric("config_publishes_total{result=\"ok\"}").await >= 2.0);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_newest_first_and_diff_shows_lines_and_key_paths() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("history"), "app", "settings.json");
    for port in 1..=5 {
        publish(
            &mut g,
            publish_req(
                &it,
                pb::Format::Json,
                &format!("{{\n  \"port\": {port},\n  \"name\": \"svc\"\n}}\n"),
            ),
        )
        .await;
    }
    let page = |token: String| {
        let mut g = g.clone();
        let it = it.clone();
        async move {
            within(
                T,
                "History",
                g.history(pb::HistoryRequest {
                    item: Some(it),
                    page_size: 2,
                    page_token: token,
                    include_content: false,
                }),
            )
            .await
            .expect("history")
            .into_inner()
        }
    };
    let mut numbers = Vec::new();
    let mut token = String::new();
    loop {
        let p = page(token).await;
        assert!(p.versions.len() <= 2);
        assert!(
            p.versions
                .iter()
                .all(|v| v.content.is_empty() && v.size > 0)
        );
        numbers.extend(p.versions.iter().map(|v| v.number));
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    assert_eq!(
        numbers,
        vec![5, 4, 3, 2, 1],
        "newest first, every version once"
    );

    let d = within(
        T,
        "Diff",
        g.diff(pb::DiffRequest {
            item: Some(it.clone()),
            from_version: 2,
            to_version: 5,
        }),
    )
    .await
    .expect("diff")
    .into_inner();
    assert!(d.structured);
    assert_eq!(d.changes.len(), 1, "{:?}", d.changes);
    assert_eq!(d.changes[0].path, "port");
    assert_eq!(d.changes[0].op, pb::key_change::Op::Changed as i32);
    assert_eq!(
        (
            d.changes[0].old_value.as_str(),
            d.changes[0].new_value.as_str()
        ),
        ("2", "5")
    );
    let changed: Vec<(i32, &str)> = d
        .lines
        .iter()
        .filter(|l| l.op != pb::diff_line::Op::Equal as i32)
        .map(|l| (l.op, l.text.as_str()))
        .collect();
    assert_eq!(
        changed,
        vec![
            (pb::diff_line::Op::Delete as i32, "  \"port\": 2,"),
            (pb::diff_line::Op::Insert as i32, "  \"port\": 5,"),
        ]
    );
    assert!(d.unified.contains("-  \"port\": 2,"), "{}", d.unified);

    // Text items get a line diff only.
    let t = item(&it.namespace, "app", "motd");
    publish_text(&mut g, &t, "hello\nworld\n").await;
    publish_text(&mut g, &t, "hello\nthere\n").await;
    let d = within(
        T,
        "Diff",
        g.diff(pb::DiffRequest {
            item: Some(t),
            from_version: 0,
            to_version: 0,
        }),
    )
    .await
    .expect("diff of the last two")
    .into_inner();
    assert!(!d.structured);
    assert_eq!((d.from_version, d.to_version), (1, 2));
    assert!(d.unified.contains("-world\n+there\n"), "{}", d.unified);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_creates_a_new_version_with_the_old_content_and_deletes_nothing() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("rollback"), "app", "flags");
    publish_text(&mut g, &it, "a=1").await;
    publish_text(&mut g, &it, "a=2").await;
    publish_text(&mut g, &it, "a=3").await;
    let r = within(
        T,
        "Rollback",
        g.rollback(pb::RollbackRequest {
            item: Some(it.clone()),
            version: 1,
            author: "ops".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("rollback")
    .into_inner();
    let v = r.version.expect("version");
    assert_eq!((v.number, v.rollback_of), (4, 1));
    assert_eq!(v.message, "rollback to version 1");
    let cur = get(&mut g, &it, 0, None)
        .await
        .expect("get")
        .version
        .expect("v");
    assert_eq!((cur.number, cur.content.as_str()), (4, "a=1"));
    for (n, content) in [(1, "a=1"), (2, "a=2"), (3, "a=3")] {
        let v = get(&mut g, &it, n, None)
            .await
            .expect("old version")
            .version
            .expect("v");
        assert_eq!(v.content, content, "version {n} is still there");
    }
    // Rolling back to a version that does not exist is NOT_FOUND.
    let err = within(
        T,
        "Rollback",
        g.rollback(pb::RollbackRequest {
            item: Some(it.clone()),
            version: 99,
            ..Default::default()
        }),
    )
    .await
    .expect_err("no version 99");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(err.message().contains("99"), "{err}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_detects_a_concurrent_publish() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("cas"), "app", "limits");

    // expected_version 0 = "create only".
    let mut req = publish_req(&it, pb::Format::Text, "v1");
    req.expected_version = Some(0);
    publish(&mut g, req.clone()).await;
    let err = within(T, "Publish", g.publish(req))
        .await
        .expect_err("the item exists now");
    assert_eq!(err.code(), Code::Aborted, "{err}");

    // Two writers both read version 1 and publish with expected_version 1: one wins.
    let mut a = publish_req(&it, pb::Format::Text, "from a");
    a.expected_version = Some(1);
    let mut b = publish_req(&it, pb::Format::Text, "from b");
    b.expected_version = Some(1);
    let (mut ga, mut gb) = (g.clone(), g.clone());
    let (ra, rb) = tokio::join!(
        within(T, "publish a", ga.publish(a)),
        within(T, "publish b", gb.publish(b))
    );
    let outcomes = [ra.is_ok(), rb.is_ok()];
    assert_eq!(
        outcomes.iter().filter(|ok| **ok).count(),
        1,
        "exactly one wins: {ra:?} {rb:?}"
    );
    let loser = if ra.is_ok() { rb } else { ra }.expect_err("loser");
    assert_eq!(loser.code(), Code::Aborted);
    assert!(
        loser.message().contains("not the expected 1"),
        "{}",
        loser.message()
    );
    let cur = get(&mut g, &it, 0, None)
        .await
        .expect("get")
        .item
        .expect("item");
    assert_eq!(cur.current_version, 2, "the loser wrote nothing");
    assert_eq!(cur.latest_version, 2);

    // Without compare-and-set, concurrent publishes all land as versions of their own.
    let (mut ga, mut gb) = (g.clone(), g.clone());
    let (ra, rb) = tokio::join!(
        within(
            T,
            "publish c",
            ga.publish(publish_req(&it, pb::Format::Text, "from c"))
        ),
        within(
            T,
            "publish d",
            gb.publish(publish_req(&it, pb::Format::Text, "from d"))
        )
    );
    let mut numbers = vec![
        ra.expect("c").into_inner().version.expect("v").number,
        rb.expect("d").into_inner().version.expect("v").number,
    ];
    numbers.sort();
    assert_eq!(numbers, vec![3, 4]);
    for n in [3, 4] {
        let v = get(&mut g, &it, n, None)
            .await
            .expect("kept")
            .version
            .expect("v");
        assert!(v.content == "from c" || v.content == "from d");
    }

    // The same over REST: 409.
    let path = format!(
        "/v1/namespaces/{}/groups/app/items/limits/versions",
        it.namespace
    );
    let body = serde_json::json!({"content": "x", "expected_version": 1});
    let (status, json) = http_call(svc.http, "POST", &path, Some(&body)).await;
    assert_eq!(status, 409, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("version 4"),
        "{json}"
    );
    assert_eq!(json["error"]["code"], "conflict");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_and_schema_violations_are_rejected_with_their_position() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("validate"), "app", "server.json");

    let err = within(
        T,
        "Publish",
        g.publish(publish_req(
            &it,
            pb::Format::Json,
            "{\n  \"port\": 80,\n  \"host\": }\n",
        )),
    )
    .await
    .expect_err("not JSON");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("line 3, column 11"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("not valid json"),
        "{}",
        err.message()
    );

    // A schema on the item: structured content must satisfy it.
    let schema = r#"{"type":"object","properties":{"port":{"type":"integer","maximum":65535}},"required":["port"]}"#;
    let mut req = publish_req(&it, pb::Format::Json, "{\"port\": 80}");
    req.schema = Some(schema.into());
    publish(&mut g, req).await;
    let err = within(
        T,
        "Publish",
        g.publish(publish_req(
            &it,
            pb::Format::Json,
            "{\n  \"port\": 70000\n}",
        )),
    )
    .await
    .expect_err("violates the schema");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("/port"), "{}", err.message());
    assert!(
        err.message().contains("line 2, column 11"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("65535"), "{}", err.message());

    // The same schema checks YAML of the same item (by path).
    let err = within(
        T,
        "Publish",
        g.publish(publish_req(&it, pb::Format::Yaml, "host: x\n")),
    )
    .await
    .expect_err("port is required");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("port"), "{}", err.message());

    // Nothing was written by the refused publishes.
    let info = get(&mut g, &it, 0, None)
        .await
        .expect("get")
        .item
        .expect("item");
    assert_eq!((info.current_version, info.latest_version), (1, 1));

    // REST answers 400 with the problems' positions.
    let path = format!(
        "/v1/namespaces/{}/groups/app/items/server.json/versions",
        it.namespace
    );
    let body = serde_json::json!({"content": "{\"port\": \"eighty\"}"});
    let (status, json) = http_call(svc.http, "POST", &path, Some(&body)).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["error"]["problems"][0]["path"], "/port");
    assert_eq!(json["error"]["problems"][0]["line"], 1);

    // Validate without storing.
    let v = within(
        T,
        "Validate",
        g.validate(pb::ValidateRequest {
            format: pb::Format::Toml as i32,
            content: "a = 1\nb = [\n".into(),
            schema: String::new(),
        }),
    )
    .await
    .expect("validate")
    .into_inner();
    assert!(!v.valid);
    assert!(v.problems[0].line >= 2, "{:?}", v.problems);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_invalid_argument_or_not_found_with_a_message() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start_with(
        &coordinator.url(),
        "127.0.0.1:0",
        &["--max-content-bytes", "2048"],
    )
    .await;
    let mut g = svc.grpc().await;
    let ns = fresh_ns("bad");
    let it = item(&ns, "app", "k");

    let cases: Vec<(pb::PublishRequest, Code, &str)> = vec![
        (
            publish_req(&item(&ns, "a/b", "k"), pb::Format::Text, "x"),
            Code::InvalidArgument,
            "group",
        ),
        (
            publish_req(&item("", "a", "k"), pb::Format::Text, "x"),
            Code::InvalidArgument,
            "namespace is empty",
        ),
        (
            publish_req(&it, pb::Format::Unspecified, "x"),
            Code::InvalidArgument,
            "format is required",
        ),
        (
            publish_req(&it, pb::Format::Text, &"x".repeat(4096)),
            Code::InvalidArgument,
            "at most 2048",
        ),
        (
            pb::PublishRequest {
                format: 42,
                ..publish_req(&it, pb::Format::Text, "x")
            },
            Code::InvalidArgument,
            "format 42",
        ),
        (
            pb::PublishRequest {
                rollout: Some(pb::RolloutRule {
                    labels: Default::default(),
                    percentage: Some(5),
                }),
                ..publish_req(&it, pb::Format::Text, "x")
            },
            Code::FailedPrecondition,
            "no current version",
        ),
        (
            pb::PublishRequest {
                rollout: Some(pb::RolloutRule::default()),
                ..publish_req(&it, pb::Format::Text, "x")
            },
            Code::InvalidArgument,
            "selects no one",
        ),
    ];
    for (req, code, text) in cases {
        let err = within(T, "Publish", g.publish(req))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{err}");
        assert!(
            err.message().contains(text),
            "{text:?} not in {:?}",
            err.message()
        );
    }
    let err = get(&mut g, &it, 0, None).await.expect_err("unknown item");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("does not exist"), "{err}");

    publish_text(&mut g, &it, "x").await;
    let err = get(&mut g, &it, 7, None)
        .await
        .expect_err("version out of range");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("versions are 1 to 1"), "{err}");

    // REST: 404 for an unknown item and unknown routes, 400 for a bad body or query.
    let base = format!("/v1/namespaces/{ns}/groups/app/items");
    let (status, json) = http_call(svc.http, "GET", &format!("{base}/nope"), None).await;
    assert_eq!(status, 404, "{json}");
    assert_eq!(json["error"]["code"], "not_found");
    let (status, _) = http_call(svc.http, "GET", &format!("{base}/k/versions/9"), None).await;
    assert_eq!(status, 404);
    let (status, _) = http_call(svc.http, "GET", &format!("{base}/k/versions/0"), None).await;
    assert_eq!(status, 400);
    let (status, json) = http_call(
        svc.http,
        "POST",
        &format!("{base}/k/versions"),
        Some(&serde_json::json!({"content": 5})),
    )
    .await;
    assert_eq!(status, 400, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid JSON body")
    );
    let (status, _) = http_call(svc.http, "GET", &format!("{base}/k?colour=red"), None).await;
    assert_eq!(status, 400);
    let (status, _) = http_call(svc.http, "GET", "/v2/anything", None).await;
    assert_eq!(status, 404);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_keeps_history_readable_until_purged() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("delete"), "app", "k");
    publish_text(&mut g, &it, "one").await;
    publish_text(&mut g, &it, "two").await;

    // Purge needs a delete first.
    let err = within(
        T,
        "Purge",
        g.purge(pb::PurgeRequest {
            item: Some(it.clone()),
        }),
    )
    .await
    .expect_err("still live");
    assert_eq!(err.code(), Code::FailedPrecondition);

    let d = within(
        T,
        "Delete",
        g.delete(pb::DeleteRequest {
            item: Some(it.clone()),
            expected_version: None,
        }),
    )
    .await
    .expect("delete")
    .into_inner();
    assert!(d.deleted);
    let err = get(&mut g, &it, 0, None)
        .await
        .expect_err("no current version");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("deleted"), "{err}");
    let old = get(&mut g, &it, 1, None).await.expect("history readable");
    assert_eq!(old.version.expect("v").content, "one");

    // Publishing again continues the numbering.
    assert_eq!(publish_text(&mut g, &it, "three").await, 3);
    within(
        T,
        "Delete",
        g.delete(pb::DeleteRequest {
            item: Some(it.clone()),
            expected_version: Some(3),
        }),
    )
    .await
    .expect("delete with CAS");
    within(
        T,
        "Purge",
        g.purge(pb::PurgeRequest {
            item: Some(it.clone()),
        }),
    )
    .await
    .expect("purge");
    let err = get(&mut g, &it, 1, None).await.expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    // Nothing of it is left in the coordinator.
    let client = coord_client::Client::connect([coordinator.url()]).expect("client");
    for prefix in ["/config/v1/items/", "/config/v1/versions/"] {
        let left = client
            .get_prefix(format!("{prefix}{}/", it.namespace))
            .await
            .expect("range");
        assert!(left.kvs.is_empty(), "{prefix}: {:?}", left.kvs);
    }
    // And a new item under the name starts at 1 again.
    assert_eq!(publish_text(&mut g, &it, "new").await, 1);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_only_the_newest_versions() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("retention"), "app", "k");
    let mut req = publish_req(&it, pb::Format::Text, "v1");
    req.retention = Some(3);
    publish(&mut g, req).await;
    for n in 2..=6 {
        publish_text(&mut g, &it, &format!("v{n}")).await;
    }
    let h = within(
        T,
        "History",
        g.history(pb::HistoryRequest {
            item: Some(it.clone()),
            page_size: 100,
            ..Default::default()
        }),
    )
    .await
    .expect("history")
    .into_inner();
    let numbers: Vec<u64> = h.versions.iter().map(|v| v.number).collect();
    assert_eq!(numbers, vec![6, 5, 4]);
    let err = get(&mut g, &it, 2, None).await.expect_err("pruned");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("no longer stored"), "{err}");

    // Lowering retention prunes at once.
    let info = within(
        T,
        "SetOptions",
        g.set_options(pb::SetOptionsRequest {
            item: Some(it.clone()),
            schema: None,
            retention: Some(1),
        }),
    )
    .await
    .expect("set options")
    .into_inner();
    assert_eq!(info.retention, 1);
    assert!(get(&mut g, &it, 5, None).await.is_err());
    assert_eq!(
        get(&mut g, &it, 0, None)
            .await
            .expect("current kept")
            .version
            .expect("v")
            .number,
        6
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_face_serves_the_same_operations_and_an_openapi_document() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let ns = fresh_ns("rest");
    let base = format!("/v1/namespaces/{ns}/groups/web/items/app.properties");
    let body = serde_json::json!({
        "format": "properties",
        "content": "server.port=80\nname=web\n",
        "author": "ann",
        "message": "initial"
    });
    let (status, json) =
        http_call(svc.http, "POST", &format!("{base}/versions"), Some(&body)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["version"]["number"], 1);
    let body = serde_json::json!({"content": "server.port=81\nname=web\n"});
    let (status, _) = http_call(svc.http, "POST", &format!("{base}/versions"), Some(&body)).await;
    assert_eq!(status, 200);

    let (status, json) = http_call(svc.http, "GET", &base, None).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["version"]["number"], 2);
    assert_eq!(json["version"]["content"], "server.port=81\nname=web\n");
    assert_eq!(json["item"]["format"], "properties");

    let (status, _, raw) = http_raw(svc.http, "GET", &format!("{base}/raw?version=1"), None).await;
    assert_eq!(status, 200);
    assert_eq!(raw, "server.port=80\nname=web\n");

    let (status, json) =
        http_call(svc.http, "GET", &format!("{base}/diff?from=1&to=2"), None).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["changes"][0]["path"], "server.port");
    assert_eq!(json["changes"][0]["op"], "changed");

    let (status, json) = http_call(
        svc.http,
        "POST",
        &format!("{base}/rollback"),
        Some(&serde_json::json!({"version": 1})),
    )
    .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["version"]["number"], 3);
    assert_eq!(json["version"]["rollback_of"], 1);

    let (status, json) = http_call(
        svc.http,
        "GET",
        &format!("{base}/versions?page_size=2"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json["versions"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["next_page_token"], "2");

    let (status, json) =
        http_call(svc.http, "GET", &format!("/v1/namespaces/{ns}/items"), None).await;
    assert_eq!(status, 200);
    assert_eq!(json["items"][0]["current_version"], 3);

    let (status, json) = http_call(
        svc.http,
        "POST",
        "/v1/validate",
        Some(&serde_json::json!({"format": "yaml", "content": "a: [1\n"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json["valid"], false);
    assert!(
        json["problems"][0]["line"].as_u64().unwrap_or(0) >= 1,
        "{json}"
    );

    let (status, json) = http_call(svc.http, "DELETE", &base, None).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["deleted"], true);

    let (status, doc) = http_call(svc.http, "GET", "/openapi.json", None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_every_item_once_in_group_then_key_order() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let ns = fresh_ns("list");
    // "a" < "a-b" as groups, although "a/z" > "a-b/c" as strings.
    for (group, key) in [("a", "z"), ("a-b", "c"), ("a", "b"), ("b", "x")] {
        publish_text(&mut g, &item(&ns, group, key), "x").await;
    }
    let deleted = item(&ns, "b", "gone");
    publish_text(&mut g, &deleted, "x").await;
    within(
        T,
        "Delete",
        g.delete(pb::DeleteRequest {
            item: Some(deleted),
            expected_version: None,
        }),
    )
    .await
    .expect("delete");
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let page = within(
            T,
            "List",
            g.list(pb::ListRequest {
                namespace: ns.clone(),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            }),
        )
        .await
        .expect("list")
        .into_inner();
        for i in &page.items {
            let r = i.item.clone().expect("ref");
            seen.push(format!("{}/{}", r.group, r.key));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        vec!["a/b", "a/z", "a-b/c", "b/x"],
        "deleted items are left out"
    );
    let all = within(
        T,
        "List",
        g.list(pb::ListRequest {
            namespace: ns.clone(),
            group: "b".into(),
            include_deleted: true,
            ..Default::default()
        }),
    )
    .await
    .expect("list")
    .into_inner();
    assert_eq!(all.items.len(), 2);
    assert!(all.items.iter().any(|i| i.deleted));
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_schema_must_accept_the_version_in_use() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("options"), "app", "s.yaml");
    publish(&mut g, publish_req(&it, pb::Format::Yaml, "port: 80\n")).await;
    let strict = r#"{"type":"object","required":["host"]}"#;
    let err = within(
        T,
        "SetOptions",
        g.set_options(pb::SetOptionsRequest {
            item: Some(it.clone()),
            schema: Some(strict.into()),
            retention: None,
        }),
    )
    .await
    .expect_err("version 1 has no host");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("version 1"), "{err}");
    let ok = r#"{"type":"object","properties":{"port":{"type":"integer"}}}"#;
    let info = within(
        T,
        "SetOptions",
        g.set_options(pb::SetOptionsRequest {
            item: Some(it.clone()),
            schema: Some(ok.into()),
            retention: None,
        }),
    )
    .await
    .expect("accepted")
    .into_inner();
    assert_eq!(info.schema, ok);
    let err = within(
        T,
        "Publish",
        g.publish(publish_req(&it, pb::Format::Yaml, "port: eighty\n")),
    )
    .await
    .expect_err("port must be an integer");
    assert!(err.message().contains("/port"), "{err}");
    // A bad schema is refused, and "" removes the schema.
    let err = within(
        T,
        "SetOptions",
        g.set_options(pb::SetOptionsRequest {
            item: Some(it.clone()),
            schema: Some("{not json".into()),
            retention: None,
        }),
    )
    .await
    .expect_err("not a schema");
    assert_eq!(err.code(), Code::InvalidArgument);
    let (status, json) = http_call(
        svc.http,
        "PUT",
        &format!(
            "/v1/namespaces/{}/groups/app/items/s.yaml/options",
            it.namespace
        ),
        Some(&serde_json::json!({"schema": ""})),
    )
    .await;
    assert_eq!(status, 200, "{json}");
    assert!(json.get("schema").is_none(), "{json}");
    publish(&mut g, publish_req(&it, pb::Format::Yaml, "port: eighty\n")).await;
    svc.stop().await;
}
