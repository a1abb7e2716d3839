//! Watches: current first, every new version in order, resume from a version, prefixes,
//! deletes, coordinator restarts, REST NDJSON.

use std::time::Duration;

use proto::config_v1 as pb;
use proto::config_v1::Reason;

use crate::coord::{Coordinator, within};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_the_current_version_then_every_new_one_in_order() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("watch"), "app", "k");
    publish_text(&mut g, &it, "v1").await;

    let mut w = Watch::open(&mut g, watch_items(std::slice::from_ref(&it), &[], None)).await;
    assert_eq!(
        w.take(2).await,
        vec![upd("k", 1, "v1", Reason::Initial), Seen::Synced]
    );
    for n in 2..=20 {
        publish_text(&mut g, &it, &format!("v{n}")).await;
    }
    let seen = w.take(19).await;
    let expected: Vec<Seen> = (2..=20)
        .map(|n| upd("k", n, &format!("v{n}"), Reason::Published))
        .collect();
    assert_eq!(seen, expected, "every version, in order, once");

    within(
        T,
        "Rollback",
        g.rollback(pb::RollbackRequest {
            item: Some(it.clone()),
            version: 3,
            ..Default::default()
        }),
    )
    .await
    .expect("rollback");
    assert_eq!(w.next().await, upd("k", 21, "v3", Reason::RolledBack));
    assert!(svc.metric("config_watchers ").await >= 1.0);
    assert!(svc.metric("config_push_latency_seconds_count").await >= 20.0);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_from_a_known_version_after_reconnect() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("resume"), "app", "k");
    for n in 1..=3 {
        publish_text(&mut g, &it, &format!("v{n}")).await;
    }
    let mut w = Watch::open(&mut g, watch_items(std::slice::from_ref(&it), &[], None)).await;
    assert_eq!(
        w.take(2).await,
        vec![upd("k", 3, "v3", Reason::Initial), Seen::Synced]
    );
    drop(w); // disconnect

    for n in 4..=6 {
        publish_text(&mut g, &it, &format!("v{n}")).await;
    }
    // Reconnect saying "I hold version 3": versions 4, 5, 6 arrive in order, then live ones.
    let mut w = Watch::open(
        &mut g,
        watch_items(std::slice::from_ref(&it), &[(it.clone(), 3)], None),
    )
    .await;
    assert_eq!(
        w.take(4).await,
        vec![
            upd("k", 4, "v4", Reason::Missed),
            upd("k", 5, "v5", Reason::Missed),
            upd("k", 6, "v6", Reason::Missed),
            Seen::Synced
        ]
    );
    publish_text(&mut g, &it, "v7").await;
    assert_eq!(w.next().await, upd("k", 7, "v7", Reason::Published));

    // Holding the current version already: nothing but Synced.
    let mut w2 = Watch::open(
        &mut g,
        watch_items(std::slice::from_ref(&it), &[(it.clone(), 7)], None),
    )
    .await;
    assert_eq!(w2.next().await, Seen::Synced);
    w2.quiet_for(Duration::from_millis(300)).await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_watch_sees_new_items_and_deletes() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let ns = fresh_ns("prefix");
    let a = item(&ns, "app", "a");
    let other = item(&ns, "other", "x");
    publish_text(&mut g, &a, "a1").await;
    publish_text(&mut g, &other, "x1").await;

    let mut w = Watch::open(
        &mut g,
        pb::WatchRequest {
            prefix: Some(pb::Prefix {
                namespace: ns.clone(),
                group: "app".into(),
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        w.take(2).await,
        vec![upd("a", 1, "a1", Reason::Initial), Seen::Synced]
    );
    let b = item(&ns, "app", "b");
    publish_text(&mut g, &other, "x2").await; // another group: not seen
    publish_text(&mut g, &b, "b1").await;
    assert_eq!(w.next().await, upd("b", 1, "b1", Reason::Published));
    within(
        T,
        "Delete",
        g.delete(pb::DeleteRequest {
            item: Some(a.clone()),
            expected_version: None,
        }),
    )
    .await
    .expect("delete");
    assert_eq!(w.next().await, Seen::Deleted("a".into()));
    // Re-created: the new version only (numbers continue).
    publish_text(&mut g, &a, "a-again").await;
    assert_eq!(w.next().await, upd("a", 2, "a-again", Reason::Published));
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_a_coordinator_restart_without_losing_versions() {
    let mut coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("coordrestart"), "app", "k");
    publish_text(&mut g, &it, "v1").await;
    let mut w = Watch::open(&mut g, watch_items(std::slice::from_ref(&it), &[], None)).await;
    assert_eq!(
        w.take(2).await,
        vec![upd("k", 1, "v1", Reason::Initial), Seen::Synced]
    );

    coordinator.stop().await;
    let err = get(&mut g, &it, 0, None)
        .await
        .expect_err("coordinator down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    coordinator.start_again().await;

    // Publishes after the restart arrive on the same stream, in order.
    publish_text(&mut g, &it, "v2").await;
    publish_text(&mut g, &it, "v3").await;
    assert_eq!(
        w.take(2).await,
        vec![
            upd("k", 2, "v2", Reason::Published),
            upd("k", 3, "v3", Reason::Published)
        ]
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_watch_streams_one_json_object_per_line() {
    let coordinator = Coordinator::start().await;
    let svc = ConfigSvc::start(&coordinator.url()).await;
    let mut g = svc.grpc().await;
    let ns = fresh_ns("ndjson");
    let it = item(&ns, "app", "k");
    publish_text(&mut g, &it, "v1").await;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::TcpStream::connect(svc.http)
        .await
        .expect("connect");
    let req = format!(
        "GET /v1/namespaces/{ns}/watch?item=app/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut lines = BufReader::new(s).lines();
    let mut objects = Vec::new();
    let mut published = false;
    while objects.len() < 3 {
        let line = within(T, "an NDJSON line", lines.next_line())
            .await
            .expect("read")
            .expect("open");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v.is_object()
        {
            objects.push(v);
            if objects.len() == 2 && !published {
                published = true;
                publish_text(&mut g, &it, "v2").await;
            }
        }
    }
    assert_eq!(objects[0]["type"], "update");
    assert_eq!(objects[0]["reason"], "initial");
    assert_eq!(objects[0]["version"]["content"], "v1");
    assert_eq!(objects[1]["type"], "synced");
    assert_eq!(objects[2]["version"]["number"], 2);
    assert_eq!(objects[2]["reason"], "published");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_reads_slowly_still_gets_every_version_in_order() {
    let coordinator = Coordinator::start().await;
    // A watcher may fall 16 revisions behind before it must re-read (default 1,024).
    let svc =
        ConfigSvc::start_with(&coordinator.url(), "127.0.0.1:0", &["--watch-buffer", "16"]).await;
    let mut g = svc.grpc().await;
    let it = item(&fresh_ns("slow"), "app", "k");
    publish_text(&mut g, &it, "v1").await;
    let mut w = Watch::open(&mut g, watch_items(std::slice::from_ref(&it), &[], None)).await;
    assert_eq!(
        w.take(2).await,
        vec![upd("k", 1, "v1", Reason::Initial), Seen::Synced]
    );
    // Publish far more than the watcher's buffers hold, with content large enough to fill the
    // HTTP/2 windows, while the watcher reads nothing.
    let padding = "x".repeat(100 * 1024);
    let last = 100u64;
    for n in 2..=last {
        publish_text(&mut g, &it, &format!("v{n}\n{padding}")).await;
    }
    // Now read: every version, once, in order (those it fell behind on are re-read from
    // history and sent as missed).
    let mut expected = 2u64;
    while expected <= last {
        match w.next().await {
            Seen::Update(key, n, content, reason) => {
                assert_eq!(key, "k");
                assert_eq!(n, expected, "in order, no gaps, no repeats");
                assert!(content.starts_with(&format!("v{n}\n")));
                assert!(
                    matches!(reason, Reason::Published | Reason::Missed),
                    "{reason:?}"
                );
                expected += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        svc.metric("config_watch_resyncs_total").await >= 1.0,
        "the watcher fell behind and caught up"
    );
    svc.stop().await;
}
