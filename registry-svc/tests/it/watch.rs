use proto::registry_v1 as pb;
use proto::registry_v1::watch_response::Event;
use tonic::Streaming;

use crate::coord::{Coordinator, within};
use crate::harness::{Registry, T, instance, register};

async fn next(s: &mut Streaming<pb::WatchResponse>) -> Event {
    within(T, "next watch message", s.message())
        .await
        .expect("stream ok")
        .expect("stream open")
        .event
        .expect("event")
}

async fn change(s: &mut Streaming<pb::WatchResponse>) -> (i32, String, i64, i32) {
    match next(s).await {
        Event::Change(c) => {
            let i = c.instance.expect("instance");
            (c.kind, i.instance_id, c.revision, i.port as i32)
        }
        other => panic!("expected a change, got {other:?}"),
    }
}

const ADDED: i32 = pb::ChangeKind::Added as i32;
const MODIFIED: i32 = pb::ChangeKind::Modified as i32;
const REMOVED: i32 = pb::ChangeKind::Removed as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_a_snapshot_then_add_change_remove_in_order_and_resumes_from_a_revision() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    register(&mut g, instance("w", "svc", "old", 1)).await;
    register(&mut g, instance("w", "other", "x", 1)).await;

    let mut s = g
        .watch(pb::WatchRequest {
            namespace: "w".into(),
            service: "svc".into(),
            after_revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let snap_rev = match next(&mut s).await {
        Event::Snapshot(snap) => {
            assert!(!snap.resynced);
            let ids: Vec<_> = snap
                .instances
                .iter()
                .map(|i| i.instance_id.as_str())
                .collect();
            assert_eq!(ids, vec!["old"], "only the watched service");
            snap.revision
        }
        other => panic!("expected a snapshot, got {other:?}"),
    };

    let a = register(&mut g, instance("w", "svc", "a", 10)).await;
    register(&mut g, instance("w", "other", "y", 1)).await; // not watched
    let a2 = register(&mut g, instance("w", "svc", "a", 11)).await;
    let del = g
        .deregister(pb::DeregisterRequest {
            instance: Some(pb::InstanceRef {
                namespace: "w".into(),
                service: "svc".into(),
                instance_id: "a".into(),
            }),
        })
        .await
        .expect("deregister")
        .into_inner();

    let c1 = change(&mut s).await;
    let c2 = change(&mut s).await;
    let c3 = change(&mut s).await;
    assert_eq!(c1, (ADDED, "a".into(), a.revision, 10));
    assert_eq!(c2, (MODIFIED, "a".into(), a2.revision, 11));
    assert_eq!(
        c3,
        (REMOVED, "a".into(), del.revision, 11),
        "removed carries the last record"
    );
    assert!(snap_rev < c1.2 && c1.2 < c2.2 && c2.2 < c3.2);
    drop(s);

    // Resume after the first change: exactly the later two, no snapshot, nothing repeated.
    let mut resumed = g
        .watch(pb::WatchRequest {
            namespace: "w".into(),
            service: "svc".into(),
            after_revision: c1.2,
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(change(&mut resumed).await, c2);
    assert_eq!(change(&mut resumed).await, c3);

    // A namespace watch sees every service of it.
    let mut ns = g
        .watch(pb::WatchRequest {
            namespace: "w".into(),
            service: String::new(),
            after_revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    match next(&mut ns).await {
        Event::Snapshot(snap) => assert_eq!(snap.instances.len(), 3, "old, x, y"),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_a_compacted_revision_yields_a_fresh_snapshot_flagged_resynced() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let first = register(&mut g, instance("cw", "svc", "a", 1)).await;
    register(&mut g, instance("cw", "svc", "b", 1)).await;
    let last = register(&mut g, instance("cw", "svc", "c", 1)).await;
    let coord = coord_client::Client::connect([c.url()]).expect("client");
    coord.compact(last.revision).await.expect("compact");

    let mut s = g
        .watch(pb::WatchRequest {
            namespace: "cw".into(),
            service: "svc".into(),
            after_revision: first.revision,
        })
        .await
        .expect("watch")
        .into_inner();
    match next(&mut s).await {
        Event::Snapshot(snap) => {
            assert!(snap.resynced, "flagged");
            assert_eq!(snap.instances.len(), 3);
            assert!(snap.revision >= last.revision);
        }
        other => panic!("expected a resynced snapshot, got {other:?}"),
    }
    // Changes follow as usual.
    let d = register(&mut g, instance("cw", "svc", "d", 1)).await;
    assert_eq!(change(&mut s).await, (ADDED, "d".into(), d.revision, 1));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_watch_streams_one_json_object_per_line() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let a = register(&mut g, instance("rw", "svc", "a", 1)).await;
    register(&mut g, instance("rw", "svc", "b", 1)).await;
    let path = format!(
        "/v1/namespaces/rw/watch?service=svc&after_revision={}",
        a.revision
    );
    let text = read_some(r.http, &path).await;
    let line = text
        .lines()
        .find(|l| l.contains("\"type\":\"change\""))
        .unwrap_or_else(|| panic!("no change line in {text:?}"));
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON object per line");
    assert_eq!(v["kind"], "added");
    assert_eq!(v["instance"]["instance_id"], "b");
    r.stop().await;
}

/// Reads from an endless HTTP response until a line with a change arrived (or 5 s passed).
async fn read_some(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        match tokio::time::timeout(std::time::Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            _ => {}
        }
        if String::from_utf8_lossy(&out).contains("\"type\":\"change\"") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_sharing_a_feed_each_see_every_change_once_in_order() {
    let c = Coordinator::start().await;
    let r = Registry::start(&c.url()).await;
    let mut g = r.grpc().await;
    let mut revisions = vec![
        register(&mut g, instance("mw", "svc", "i0", 1))
            .await
            .revision,
    ];
    // Ten watchers from the start, then more registrations, then ten resuming from the middle.
    let mut from_start = Vec::new();
    for _ in 0..10 {
        let mut s = g
            .watch(pb::WatchRequest {
                namespace: "mw".into(),
                service: "svc".into(),
                after_revision: 0,
            })
            .await
            .expect("watch")
            .into_inner();
        assert!(matches!(next(&mut s).await, Event::Snapshot(_)));
        from_start.push(s);
    }
    for n in 1..20 {
        revisions.push(
            register(&mut g, instance("mw", "svc", &format!("i{n}"), 1))
                .await
                .revision,
        );
    }
    let middle = revisions[9];
    let mut resumed = Vec::new();
    for _ in 0..10 {
        resumed.push(
            g.watch(pb::WatchRequest {
                namespace: "mw".into(),
                service: "svc".into(),
                after_revision: middle,
            })
            .await
            .expect("watch")
            .into_inner(),
        );
    }
    for n in 20..30 {
        revisions.push(
            register(&mut g, instance("mw", "svc", &format!("i{n}"), 1))
                .await
                .revision,
        );
    }
    for s in &mut from_start {
        let mut got = Vec::new();
        while got.len() < 29 {
            got.push(change(s).await.2);
        }
        assert_eq!(got, revisions[1..].to_vec());
    }
    for s in &mut resumed {
        let mut got = Vec::new();
        while got.len() < 20 {
            got.push(change(s).await.2);
        }
        assert_eq!(got, revisions[10..].to_vec());
    }
    r.stop().await;
}
