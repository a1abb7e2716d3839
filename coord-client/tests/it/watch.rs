use std::time::Duration;

use coord_client::{Client, EventKind, WatchEvent, WatchOptions, WatchStream};

use crate::harness::{Coordinator, within};

const T: Duration = Duration::from_secs(15);

async fn next(stream: &mut WatchStream) -> WatchEvent {
    within(T, "next watch delivery", stream.next())
        .await
        .expect("the watch is still open")
}

/// Reads events until `n` were delivered; returns (key, revision, kind) of each.
async fn collect(stream: &mut WatchStream, n: usize) -> Vec<(String, i64, EventKind)> {
    let mut out = Vec::new();
    while out.len() < n {
        match next(stream).await {
            WatchEvent::Events(events) => out.extend(events.into_iter().map(|e| {
                (
                    String::from_utf8_lossy(&e.kv.key).into_owned(),
                    e.kv.mod_revision,
                    e.kind,
                )
            })),
            WatchEvent::Created { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn watch_delivers_puts_and_deletes_in_revision_order() {
    let c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    let mut w = client.watch(WatchOptions::prefix("/w/", 0));
    assert!(matches!(next(&mut w).await, WatchEvent::Created { .. }));
    let r1 = client.put("/w/a", "1", 0).await.expect("put");
    client.put("/outside", "1", 0).await.expect("put");
    let r2 = client.put("/w/a", "2", 0).await.expect("put");
    let (_, r3) = client.delete("/w/a").await.expect("delete");
    let got = collect(&mut w, 3).await;
    assert_eq!(
        got,
        vec![
            ("/w/a".into(), r1, EventKind::Put),
            ("/w/a".into(), r2, EventKind::Put),
            ("/w/a".into(), r3, EventKind::Delete),
        ]
    );
}

#[tokio::test]
async fn watch_survives_a_coordinator_restart_and_resumes_without_gaps() {
    let mut c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    let mut w = client.watch(WatchOptions::prefix("/r/", 0));
    assert!(matches!(next(&mut w).await, WatchEvent::Created { .. }));
    let mut written = Vec::new();
    for i in 0..5 {
        written.push(client.put(format!("/r/{i}"), "v", 0).await.expect("put"));
    }
    let before = collect(&mut w, 5).await;

    c.restart().await;
    // Written right after the restart, likely before the watch reconnected: it must catch up.
    for i in 5..10 {
        written.push(
            client
                .put(format!("/r/{i}"), "v", 0)
                .await
                .expect("put after restart"),
        );
    }
    let after = collect(&mut w, 5).await;
    let revisions: Vec<i64> = before.iter().chain(&after).map(|e| e.1).collect();
    assert_eq!(
        revisions, written,
        "every write once, in order, none missing"
    );
    let keys: Vec<String> = before.iter().chain(&after).map(|e| e.0.clone()).collect();
    let expected: Vec<String> = (0..10).map(|i| format!("/r/{i}")).collect();
    assert_eq!(keys, expected);
}

#[tokio::test]
async fn watch_from_a_past_revision_replays_history() {
    let c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    let r1 = client.put("/h/a", "1", 0).await.expect("put");
    let r2 = client.put("/h/b", "1", 0).await.expect("put");
    let mut w = client.watch(WatchOptions::prefix("/h/", r1));
    let got = collect(&mut w, 2).await;
    assert_eq!(got.iter().map(|e| e.1).collect::<Vec<_>>(), vec![r1, r2]);
}

#[tokio::test]
async fn watch_from_a_compacted_revision_reports_compaction_and_ends() {
    let c = Coordinator::start().await;
    let client = Client::connect([c.url()]).expect("client");
    let r1 = client.put("/c/a", "1", 0).await.expect("put");
    let r2 = client.put("/c/a", "2", 0).await.expect("put");
    client.compact(r2).await.expect("compact");
    let mut w = client.watch(WatchOptions::prefix("/c/", r1));
    loop {
        match next(&mut w).await {
            WatchEvent::Compacted { compact_revision } => {
                assert_eq!(compact_revision, r2);
                break;
            }
            WatchEvent::Created { .. } => {}
            other => panic!("expected compaction, got {other:?}"),
        }
    }
    assert!(
        within(T, "end of the stream", w.next()).await.is_none(),
        "the stream ends after compaction"
    );
}
