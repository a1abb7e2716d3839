//! Watch semantics through our generated client: ordered, unique, gap-free events; replay from
//! history; cancellation below the compaction; filters; progress; slow consumers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proto::etcdserverpb::watch_create_request::FilterType;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, WatchCreateRequest, WatchProgressRequest,
    WatchRequest, WatchResponse,
};
use proto::mvccpb::Event;
use proto::mvccpb::event::EventType;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::harness::{Server, channel, put, within};

const T: Duration = Duration::from_secs(15);

/// `prefix` and the end of its range.
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    (prefix.as_bytes().to_vec(), end)
}

fn watch_prefix(prefix: &str, start_revision: i64) -> WatchCreateRequest {
    let (key, range_end) = prefix_range(prefix);
    WatchCreateRequest {
        key,
        range_end,
        start_revision,
        ..Default::default()
    }
}

/// One bidirectional Watch stream.
struct WatchSession {
    requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl WatchSession {
    /// Opens a stream whose first request creates `first`; returns the session and the
    /// creation response. (etcd sends the stream's response headers only with its first
    /// response, so the first request must be queued before the call is awaited.)
    async fn open(server: &Server, first: WatchCreateRequest) -> (WatchSession, WatchResponse) {
        let mut client = server.watch().await.max_decoding_message_size(64 << 20);
        let (requests, rx) = mpsc::channel(16);
        requests
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(first)),
            })
            .await
            .expect("queue the first request");
        let responses = within(
            T,
            "open the Watch stream",
            client.watch(ReceiverStream::new(rx)),
        )
        .await
        .expect("open the Watch stream")
        .into_inner();
        let mut session = WatchSession {
            requests,
            responses,
        };
        let created = session.next().await;
        assert!(
            created.created,
            "expected a created response, got {created:?}"
        );
        (session, created)
    }

    async fn send(&self, request: RequestUnion) {
        self.requests
            .send(WatchRequest {
                request_union: Some(request),
            })
            .await
            .expect("the Watch request stream is open");
    }

    /// Sends a create request; returns the first response, which must confirm the creation.
    async fn create(&mut self, create: WatchCreateRequest) -> WatchResponse {
        self.send(RequestUnion::CreateRequest(create)).await;
        let resp = self.next().await;
        assert!(resp.created, "expected a created response, got {resp:?}");
        resp
    }

    /// The next response, within [`T`].
    async fn next(&mut self) -> WatchResponse {
        within(T, "a watch response", self.responses.message())
            .await
            .expect("watch stream error")
            .expect("watch stream ended")
    }

    /// Reads responses until `n` events arrived for `watch_id` (within `timeout`), checking every
    /// response belongs to it and none is a cancellation.
    async fn events(&mut self, watch_id: i64, n: usize, timeout: Duration) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let resp = match tokio::time::timeout(left, self.responses.message()).await {
                Ok(r) => r.expect("watch stream error").expect("watch stream ended"),
                Err(_) => panic!(
                    "timed out after {timeout:?} with {} of {n} events",
                    events.len()
                ),
            };
            assert!(!resp.canceled, "watch canceled: {resp:?}");
            assert_eq!(
                resp.watch_id, watch_id,
                "response for another watch: {resp:?}"
            );
            events.extend(resp.events);
        }
        events
    }
}

fn ekv(e: &Event) -> &proto::mvccpb::KeyValue {
    e.kv.as_ref().expect("an event has a kv")
}

fn summary(events: &[Event]) -> Vec<(EventType, String, i64)> {
    events
        .iter()
        .map(|e| {
            (
                e.r#type(),
                String::from_utf8_lossy(&ekv(e).key).into_owned(),
                ekv(e).mod_revision,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_concurrent_puts_arrives_ordered_without_duplicates_or_gaps() {
    const WRITERS: usize = 8;
    const EACH: usize = 250;
    let server = Server::start().await;
    let (mut session, created) = WatchSession::open(&server, watch_prefix("burst/", 0)).await;
    let watch_id = created.watch_id;

    // Writers on their own connection, concurrently.
    let writers = channel(&server.url()).await;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut kv = proto::etcdserverpb::kv_client::KvClient::new(writers.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::with_capacity(EACH);
            for i in 0..EACH {
                let key = format!("burst/{w}/{i}");
                let rev = put(&mut kv, &key, &format!("{w}-{i}")).await;
                acked.push((key, rev));
            }
            acked
        }));
    }
    let mut acked: HashMap<String, i64> = HashMap::new();
    for task in tasks {
        acked.extend(
            within(Duration::from_secs(60), "the writers", task)
                .await
                .expect("writer"),
        );
    }
    let total = WRITERS * EACH;

    let events = session
        .events(watch_id, total, Duration::from_secs(30))
        .await;
    assert_eq!(
        events.len(),
        total,
        "more events than writes arrived in the batch"
    );
    let first = ekv(&events[0]).mod_revision;
    for (i, e) in events.iter().enumerate() {
        let kv = ekv(e);
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        assert_eq!(e.r#type(), EventType::Put);
        assert_eq!(
            kv.mod_revision,
            first + i as i64,
            "event {i} ({key}): revisions must be consecutive"
        );
        assert_eq!(
            acked.get(&key),
            Some(&kv.mod_revision),
            "event revision = the put's acked revision"
        );
        let (w, n) = key
            .trim_start_matches("burst/")
            .split_once('/')
            .expect("burst/w/i");
        assert_eq!(kv.value, format!("{w}-{n}").as_bytes());
    }
    let mut revs: Vec<i64> = acked.values().copied().collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), total, "every acked put got its own revision");

    // Nothing more (no duplicates after the batch): the next event is a sentinel.
    let mut kv = server.kv().await;
    let end_rev = put(&mut kv, "burst/zz-end", "end").await;
    let next = session.events(watch_id, 1, T).await;
    assert_eq!(
        summary(&next),
        [(EventType::Put, "burst/zz-end".into(), end_rev)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_past_revision_replays_history_then_streams_live() {
    let server = Server::start().await;
    let mut kv = server.kv().await;
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(put(&mut kv, &format!("hist/{}", i % 3), &i.to_string()).await);
    }
    let del = within(
        T,
        "delete",
        kv.delete_range(DeleteRangeRequest {
            key: b"hist/0".to_vec(),
            ..Default::default()
        }),
    )
    .await
    .expect("delete")
    .into_inner();
    let del_rev = del.header.expect("header").revision;

    let (mut session, created) = WatchSession::open(&server, watch_prefix("hist/", revs[0])).await;
    let all = created.watch_id;
    let events = session.events(all, 11, T).await;
    let got: Vec<i64> = events.iter().map(|e| ekv(e).mod_revision).collect();
    let mut want = revs.clone();
    want.push(del_rev);
    assert_eq!(got, want, "the whole history, in order");
    for (i, e) in events.iter().take(10).enumerate() {
        assert_eq!(ekv(e).value, i.to_string().as_bytes());
        assert_eq!(
            ekv(e).version,
            (i / 3 + 1) as i64,
            "version of hist/{} at its {}th put",
            i % 3,
            i / 3 + 1
        );
    }
    assert_eq!(events[10].r#type(), EventType::Delete);

    // A second watch on the same stream, from the middle, on one key: hist/1 was put at
    // i = 1, 4, 7, so from revs[5] only i = 7 is left.
    let create = WatchCreateRequest {
        key: b"hist/1".to_vec(),
        start_revision: revs[5],
        ..Default::default()
    };
    let one = session.create(create).await.watch_id;
    assert_ne!(one, all, "watch ids on one stream are distinct");
    let events = session.events(one, 1, T).await;
    assert_eq!(
        summary(&events),
        [(EventType::Put, "hist/1".to_string(), revs[7])]
    );

    // Live: a new put reaches both watches after their history.
    let live = put(&mut kv, "hist/1", "live").await;
    let mut seen: HashMap<i64, Vec<i64>> = HashMap::new();
    while seen.values().map(Vec::len).sum::<usize>() < 2 {
        let resp = session.next().await;
        assert!(!resp.canceled, "{resp:?}");
        seen.entry(resp.watch_id)
            .or_default()
            .extend(resp.events.iter().map(|e| ekv(e).mod_revision));
    }
    assert_eq!(seen.get(&all), Some(&vec![live]), "{seen:?}");
    assert_eq!(seen.get(&one), Some(&vec![live]), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_is_canceled_with_the_compact_revision() {
    let server = Server::start().await;
    let mut kv = server.kv().await;
    for i in 0..5 {
        put(&mut kv, "cw", &i.to_string()).await; // revs 2..=6
    }
    within(
        T,
        "compact",
        kv.compact(CompactionRequest {
            revision: 5,
            physical: true,
        }),
    )
    .await
    .expect("compact to 5");

    // Another watch opens the stream, so the answer to this one can be read as it comes.
    let (mut session, _) = WatchSession::open(&server, watch_prefix("unrelated/", 0)).await;
    let create = WatchCreateRequest {
        key: b"cw".to_vec(),
        start_revision: 3,
        ..Default::default()
    };
    session.send(RequestUnion::CreateRequest(create)).await;
    // etcd answers "created", then cancels; accept the cancellation in the first response too.
    let mut resp = session.next().await;
    if resp.created && !resp.canceled {
        let id = resp.watch_id;
        resp = session.next().await;
        assert_eq!(resp.watch_id, id, "{resp:?}");
    }
    assert!(
        resp.canceled,
        "a watch below the compaction is canceled: {resp:?}"
    );
    assert_eq!(
        resp.compact_revision, 5,
        "and says where history starts: {resp:?}"
    );
    assert!(resp.events.is_empty(), "{resp:?}");

    // From the compaction revision itself, history is still there.
    let create = WatchCreateRequest {
        key: b"cw".to_vec(),
        start_revision: 5,
        ..Default::default()
    };
    let id = session.create(create).await.watch_id;
    let events = session.events(id, 2, T).await;
    assert_eq!(
        summary(&events),
        [
            (EventType::Put, "cw".to_string(), 5),
            (EventType::Put, "cw".to_string(), 6),
        ]
    );
    assert_eq!(ekv(&events[0]).value, b"3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noput_filter_delivers_only_deletes_and_nodelete_only_puts() {
    let server = Server::start().await;
    let mut noput = watch_prefix("flt/", 0);
    noput.filters = vec![FilterType::Noput as i32];
    let (mut session, created) = WatchSession::open(&server, noput).await;
    let noput_id = created.watch_id;
    let mut nodelete = watch_prefix("flt/", 0);
    nodelete.filters = vec![FilterType::Nodelete as i32];
    let nodelete_id = session.create(nodelete).await.watch_id;

    let mut kv = server.kv().await;
    let del = |key: &'static str| DeleteRangeRequest {
        key: key.into(),
        ..Default::default()
    };
    let a = put(&mut kv, "flt/a", "1").await;
    let b = put(&mut kv, "flt/b", "2").await;
    let del_a = kv
        .delete_range(del("flt/a"))
        .await
        .expect("delete")
        .into_inner()
        .header
        .expect("h")
        .revision;
    let c = put(&mut kv, "flt/c", "3").await;
    let del_b = kv
        .delete_range(del("flt/b"))
        .await
        .expect("delete")
        .into_inner()
        .header
        .expect("h")
        .revision;

    let mut seen: HashMap<i64, Vec<Event>> = HashMap::new();
    // Puts (a, b, c) for one watch, deletes (a, b) for the other: 5 events in all. Because del b
    // is the last write, any wrongly delivered put would arrive before it.
    while seen.values().map(Vec::len).sum::<usize>() < 5 {
        let resp = session.next().await;
        assert!(!resp.canceled, "{resp:?}");
        seen.entry(resp.watch_id).or_default().extend(resp.events);
    }
    assert_eq!(
        summary(seen.get(&noput_id).map(Vec::as_slice).unwrap_or_default()),
        [
            (EventType::Delete, "flt/a".to_string(), del_a),
            (EventType::Delete, "flt/b".to_string(), del_b),
        ]
    );
    assert_eq!(
        summary(
            seen.get(&nodelete_id)
                .map(Vec::as_slice)
                .unwrap_or_default()
        ),
        [
            (EventType::Put, "flt/a".to_string(), a),
            (EventType::Put, "flt/b".to_string(), b),
            (EventType::Put, "flt/c".to_string(), c),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_request_answers_with_watch_id_minus_one_and_the_current_revision() {
    let server = Server::start().await;
    let (session, _) = WatchSession::open(&server, watch_prefix("prog/", 0)).await;
    let mut session = session;
    let mut kv = server.kv().await;
    put(&mut kv, "elsewhere/1", "x").await;
    let rev = put(&mut kv, "elsewhere/2", "y").await;

    session
        .send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
        .await;
    let resp = session.next().await;
    assert_eq!(
        resp.watch_id, -1,
        "a progress response belongs to no watch: {resp:?}"
    );
    assert!(resp.events.is_empty(), "{resp:?}");
    assert!(!resp.canceled && !resp.created, "{resp:?}");
    assert_eq!(
        resp.header.as_ref().map(|h| h.revision),
        Some(rev),
        "{resp:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_gets_every_event_later_and_does_not_block_writers() {
    const PUTS: usize = 20_000;
    const WRITERS: usize = 16;
    let value = "v".repeat(1024);
    let server = Server::start().await;

    // The slow watcher: created, then not read at all while the puts happen.
    let (mut slow, created) = WatchSession::open(&server, watch_prefix("slow/", 0)).await;
    let slow_id = created.watch_id;

    // A fast watcher on another connection, read all along, counting.
    let (mut fast, created) = WatchSession::open(&server, watch_prefix("slow/", 0)).await;
    let fast_id = created.watch_id;
    let fast_reader = tokio::spawn(async move {
        let events = fast.events(fast_id, PUTS, Duration::from_secs(150)).await;
        events
            .iter()
            .map(|e| ekv(e).mod_revision)
            .collect::<Vec<_>>()
    });

    let writers = channel(&server.url()).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut kv = proto::etcdserverpb::kv_client::KvClient::new(writers.clone());
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in (w..PUTS).step_by(WRITERS) {
                let req = PutRequest {
                    key: format!("slow/{i:05}").into_bytes(),
                    value: value.clone().into_bytes(),
                    ..Default::default()
                };
                let resp = within(T, "a put while a watcher is stalled", kv.put(req))
                    .await
                    .unwrap_or_else(|e| panic!("put {i}: {e}"))
                    .into_inner();
                acked.push((i, resp.header.expect("header").revision));
            }
            acked
        }));
    }
    let mut acked = vec![0i64; PUTS];
    for task in tasks {
        let done = within(
            Duration::from_secs(120),
            "20,000 puts with a stalled watcher",
            task,
        )
        .await
        .expect("writer task");
        for (i, rev) in done {
            acked[i] = rev;
        }
    }
    let write_time = started.elapsed();
    eprintln!("{PUTS} puts of 1 KiB with a stalled watcher took {write_time:?}");

    // The fast watcher kept up: it has everything soon after the last put.
    let fast_revs = within(Duration::from_secs(30), "the fast watcher", fast_reader)
        .await
        .expect("fast watcher task");
    let mut want: Vec<i64> = acked.clone();
    want.sort_unstable();
    assert_eq!(
        fast_revs, want,
        "the fast watcher saw every put once, in order"
    );

    // Now the slow one reads: everything, in order, nothing twice or missing.
    let events = slow.events(slow_id, PUTS, Duration::from_secs(60)).await;
    let slow_revs: Vec<i64> = events.iter().map(|e| ekv(e).mod_revision).collect();
    assert_eq!(slow_revs.len(), PUTS);
    for (n, pair) in slow_revs.windows(2).enumerate() {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "slow watcher: gap or reorder after event {n}"
        );
    }
    assert_eq!(
        slow_revs, want,
        "the slow watcher saw every put once, in order"
    );
    for e in &events {
        let kv = ekv(e);
        let i: usize = String::from_utf8_lossy(&kv.key["slow/".len()..])
            .parse()
            .expect("index");
        assert_eq!(acked[i], kv.mod_revision, "slow/{i:05}");
        assert_eq!(kv.value.len(), 1024);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_future_revision_starts_there() {
    let server = Server::start().await;
    let mut kv = server.kv().await;
    let now = put(&mut kv, "fut", "0").await;
    let (mut session, created) = WatchSession::open(&server, watch_prefix("fut", now + 3)).await;
    let mut revs = Vec::new();
    for i in 1..=5 {
        revs.push(put(&mut kv, "fut", &i.to_string()).await);
    }
    let events = session.events(created.watch_id, 3, T).await;
    let got: Vec<i64> = events.iter().map(|e| ekv(e).mod_revision).collect();
    assert_eq!(
        got,
        [now + 3, now + 4, now + 5],
        "events from the requested revision on, only"
    );
    assert_eq!(got, revs[2..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_revision_arrive_together() {
    use proto::etcdserverpb::lease_client::LeaseClient;
    use proto::etcdserverpb::request_op::Request;
    use proto::etcdserverpb::{LeaseGrantRequest, LeaseRevokeRequest, RequestOp, TxnRequest};

    let server = Server::start().await;
    let (mut session, created) = WatchSession::open(&server, watch_prefix("atom/", 0)).await;
    let mut kv = server.kv().await;
    let mut lease = LeaseClient::new(channel(&server.url()).await);
    let id = lease
        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id;

    // One txn writing three keys with the lease: one revision, three events.
    let ops = (0..3)
        .map(|i| RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: format!("atom/{i}").into_bytes(),
                value: b"v".to_vec(),
                lease: id,
                ..Default::default()
            })),
        })
        .collect();
    let txn_rev = kv
        .txn(TxnRequest {
            success: ops,
            ..Default::default()
        })
        .await
        .expect("txn")
        .into_inner()
        .header
        .expect("h")
        .revision;
    // Revoking the lease deletes the three keys in one revision.
    let revoke_rev = lease
        .lease_revoke(LeaseRevokeRequest { id })
        .await
        .expect("revoke")
        .into_inner()
        .header
        .expect("h")
        .revision;
    assert_eq!(revoke_rev, txn_rev + 1, "a revoke is one revision");

    for (want_type, want_rev) in [(EventType::Put, txn_rev), (EventType::Delete, revoke_rev)] {
        let resp = session.next().await;
        assert_eq!(resp.watch_id, created.watch_id);
        assert_eq!(
            summary(&resp.events),
            (0..3)
                .map(|i| (want_type, format!("atom/{i}"), want_rev))
                .collect::<Vec<_>>(),
            "all events of revision {want_rev} in one response, in key order"
        );
    }
}
