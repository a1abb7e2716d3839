//! A Raft cluster of real `coordinator` processes on loopback, under the faults we can inject
//! today: `kill -9` (SIGKILL), restart on the same data directory, and pause (SIGSTOP/SIGCONT,
//! our stand-in for a partition until network faults exist).
//!
//! What each test proves is in its name. Every client operation is recorded with the revision
//! the cluster acknowledged, and the checks are made against those acknowledgements: an acked
//! write must be on every member with exactly that revision, revisions never go back, no two
//! acks share a revision, and a write acked before another started has the lower revision.
//! Under `kill -9` of the leader, a mixed workload (puts, linearizable gets, deletes,
//! compare-and-sets on shared keys) and a watcher on every member are also recorded and handed
//! to `history-checker` (revision replay: stale reads, lost writes, watch gaps and order).
//!
//! Elections are measured against the issue's target (a new leader within 3 s of losing the
//! old one, with the default 1 s election timeout) and printed; run with
//! `cargo test -p coordinator --test it cluster -- --nocapture` to see the figures.
//!
//! The tests share one lock (see [`Cluster`]), so they run one after another however many test
//! threads there are: election times on a 2-core machine mean nothing if two clusters compete.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use history_checker as hc;
use proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::request_op::Request as Op;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::{
    Compare, DeleteRangeRequest, HashKvRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchRequest,
};
use proto::mvccpb::KeyValue;
use proto::mvccpb::event::EventType;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::harness::{Cluster, Etcdctl, MemberStatus, wait_for, wait_until, within};

/// The issue's bound on electing a new leader after the old one is lost.
const ELECTION_BOUND: Duration = Duration::from_secs(3);
/// Upper bound on one client request in these tests (a failover may be in progress).
const REQUEST: Duration = Duration::from_secs(8);
/// Upper bound on waits for the cluster to converge.
const CONVERGE: Duration = Duration::from_secs(20);
/// The election timeout the members run with (the server's default).
const ELECTION_TIMEOUT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Small client helpers
// ---------------------------------------------------------------------------------------------

/// `prefix` and the end of its range.
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    (prefix.as_bytes().to_vec(), end)
}

/// Put; the acknowledged revision, or the error as text.
async fn try_put(
    kv: &mut KvClient<Channel>,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<i64, String> {
    let req = PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    };
    match tokio::time::timeout(timeout, kv.put(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner().header.map(|h| h.revision).unwrap_or(0)),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Put that must succeed; the acknowledged revision.
async fn put(c: &Cluster, i: usize, key: &str, value: &str) -> i64 {
    try_put(&mut c.kv(i), key, value, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("put {key} through member {i}: {e}"))
}

/// Range of one key or a prefix; `(kvs, header revision)` or the error as text.
async fn try_range(
    kv: &mut KvClient<Channel>,
    key: &str,
    prefix: bool,
    serializable: bool,
    timeout: Duration,
) -> Result<(Vec<KeyValue>, i64), String> {
    let (key, range_end) = if prefix {
        prefix_range(key)
    } else {
        (key.as_bytes().to_vec(), Vec::new())
    };
    let req = RangeRequest {
        key,
        range_end,
        serializable,
        ..Default::default()
    };
    match tokio::time::timeout(timeout, kv.range(req)).await {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            Ok((r.kvs, r.header.map(|h| h.revision).unwrap_or(0)))
        }
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Linearizable read of one key through member `i` (must succeed).
async fn get(c: &Cluster, i: usize, key: &str) -> Option<KeyValue> {
    let (kvs, _) = try_range(&mut c.kv(i), key, false, false, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("linearizable get {key} through member {i}: {e}"));
    kvs.into_iter().next()
}

/// Linearizable read of a prefix through member `i` (must succeed): key → kv, and the revision.
async fn scan(c: &Cluster, i: usize, prefix: &str) -> (BTreeMap<String, KeyValue>, i64) {
    let (kvs, rev) = try_range(&mut c.kv(i), prefix, true, false, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("linearizable range {prefix} through member {i}: {e}"));
    let map = kvs
        .into_iter()
        .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv))
        .collect();
    (map, rev)
}

/// Maintenance.HashKV at `revision` on member `i`: (hash, the member's own revision).
async fn hash_kv(c: &Cluster, i: usize, revision: i64) -> (u32, i64) {
    let r = within(
        REQUEST,
        "HashKV",
        c.maintenance(i).hash_kv(HashKvRequest { revision }),
    )
    .await
    .unwrap_or_else(|e| panic!("HashKV({revision}) on member {i}: {e}"))
    .into_inner();
    assert_eq!(r.hash_revision, revision, "member {i}: {r:?}");
    (r.hash, r.header.map(|h| h.revision).unwrap_or(0))
}

/// Waits until every member in `members` has applied `revision` (a linearizable read through
/// each brings it there), then asserts their HashKV at `revision` is the same.
async fn assert_same_hash(c: &Cluster, members: &[usize], revision: i64) -> u32 {
    let mut hashes = Vec::new();
    for &i in members {
        get(c, i, "health").await;
        let (hash, at) = hash_kv(c, i, revision).await;
        assert!(at >= revision, "member {i} is at {at} < {revision}");
        hashes.push((i, hash));
    }
    let first = hashes[0].1;
    assert!(
        hashes.iter().all(|(_, h)| *h == first),
        "HashKV at revision {revision} differs between members: {hashes:?}"
    );
    first
}

/// `(key, value, create, mod, version, lease)` of every kv, for comparing members.
fn flat(map: &BTreeMap<String, KeyValue>) -> Vec<(String, Vec<u8>, i64, i64, i64, i64)> {
    map.iter()
        .map(|(k, kv)| {
            (
                k.clone(),
                kv.value.clone(),
                kv.create_revision,
                kv.mod_revision,
                kv.version,
                kv.lease,
            )
        })
        .collect()
}

/// Waits for a leader other than `old` (which is down or paused); returns it and how long it
/// took from `since`.
async fn wait_new_leader(c: &Cluster, old: usize, since: Instant) -> (usize, Duration) {
    let leader = wait_for(
        Duration::from_secs(15),
        "a new leader after losing the old one",
        || async move { c.leader().await.filter(|&l| l != old) },
    )
    .await;
    (leader, since.elapsed())
}

/// Waits until every running member names the same leader at the same term; returns it.
async fn wait_all_agree(c: &Cluster) -> usize {
    wait_for(
        CONVERGE,
        "every member to name the same leader",
        || async move {
            let statuses = c.statuses().await;
            let up = c.up();
            let got: Vec<&MemberStatus> = up.iter().filter_map(|&i| statuses[i].as_ref()).collect();
            if got.len() != up.len() || got.is_empty() {
                return None;
            }
            let (leader, term) = (got[0].leader, got[0].term);
            let agree = leader != 0 && got.iter().all(|s| s.leader == leader && s.term == term);
            agree.then(|| c.index_of(leader)).flatten()
        },
    )
    .await
}

/// Waits until every running member holds and has applied the same log (no follower behind);
/// returns the leader.
async fn wait_in_sync(c: &Cluster) -> usize {
    let leader = wait_all_agree(c).await;
    wait_until(
        CONVERGE,
        "every member to hold and apply the same log",
        || async move {
            let statuses = c.statuses().await;
            let up = c.up();
            let got: Vec<&MemberStatus> = up.iter().filter_map(|&i| statuses[i].as_ref()).collect();
            got.len() == up.len()
                && got.iter().all(|s| {
                    s.raft_index == got[0].raft_index && s.applied_index == got[0].applied_index
                })
        },
    )
    .await;
    leader
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ---------------------------------------------------------------------------------------------
// A recorded write load
// ---------------------------------------------------------------------------------------------

/// One write a client made, as it saw it.
#[derive(Debug, Clone)]
struct WriteOp {
    writer: usize,
    key: String,
    value: String,
    /// Member the request was sent to.
    member: usize,
    invoked: Instant,
    returned: Instant,
    /// The acknowledged revision, or why the outcome is unknown.
    result: Result<i64, String>,
}

/// Writers that put unique keys under `prefix` through the members, each writer sequentially,
/// moving to the next member when a request fails. Every operation is recorded.
struct Load {
    ops: Arc<Mutex<Vec<WriteOp>>>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(c: &Cluster, prefix: &str, writers: usize, members: &[usize]) -> Load {
        let ops = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let clients: Vec<(usize, KvClient<Channel>)> =
            members.iter().map(|&i| (i, c.kv(i))).collect();
        let tasks = (0..writers)
            .map(|w| {
                let mut clients = clients.clone();
                let ops = ops.clone();
                let stop = stop.clone();
                let prefix = prefix.to_string();
                tokio::spawn(async move {
                    let mut at = w % clients.len();
                    for seq in 0.. {
                        if stop.is_cancelled() {
                            return;
                        }
                        let key = format!("{prefix}{w}/{seq:06}");
                        let value = format!("w{w}-s{seq}");
                        let (member, kv) = &mut clients[at];
                        let invoked = Instant::now();
                        let result = try_put(kv, &key, &value, Duration::from_secs(3)).await;
                        let failed = result.is_err();
                        ops.lock().expect("ops").push(WriteOp {
                            writer: w,
                            key,
                            value,
                            member: *member,
                            invoked,
                            returned: Instant::now(),
                            result,
                        });
                        if failed {
                            at = (at + 1) % clients.len();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                })
            })
            .collect();
        Load { ops, stop, tasks }
    }

    fn acked(&self) -> usize {
        self.ops
            .lock()
            .expect("ops")
            .iter()
            .filter(|o| o.result.is_ok())
            .count()
    }

    async fn finish(self) -> Vec<WriteOp> {
        self.stop.cancel();
        for t in self.tasks {
            within(Duration::from_secs(10), "a writer to stop", t)
                .await
                .expect("writer task");
        }
        self.ops.lock().expect("ops").clone()
    }
}

/// Checks a history of writes on its own: no two acks at one revision; each writer's acks go
/// up; a write acknowledged before another was invoked has the lower revision.
fn check_write_history(ops: &[WriteOp]) {
    let acked: Vec<(&WriteOp, i64)> = ops
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|r| (o, *r)))
        .collect();
    let mut by_rev: HashMap<i64, &WriteOp> = HashMap::new();
    for (o, rev) in &acked {
        if let Some(other) = by_rev.insert(*rev, o) {
            panic!("two writes acknowledged at revision {rev}:\n  {other:?}\n  {o:?}");
        }
    }
    let mut last: HashMap<usize, (i64, &WriteOp)> = HashMap::new();
    for (o, rev) in &acked {
        if let Some((prev, p)) = last.insert(o.writer, (*rev, o)) {
            assert!(
                *rev > prev,
                "writer {} saw revisions go back: {prev} then {rev}\n  {p:?}\n  {o:?}",
                o.writer
            );
        }
    }
    // Real-time order: sort by return time; keep the running max of revisions returned.
    let mut by_return: Vec<(Instant, i64)> = acked.iter().map(|(o, r)| (o.returned, *r)).collect();
    by_return.sort();
    let mut prefix_max = Vec::with_capacity(by_return.len());
    let mut m = i64::MIN;
    for (_, r) in &by_return {
        m = m.max(*r);
        prefix_max.push(m);
    }
    for (o, rev) in &acked {
        let before = by_return.partition_point(|(t, _)| *t < o.invoked);
        if before > 0 {
            let max_before = prefix_max[before - 1];
            assert!(
                max_before < *rev,
                "{o:?} got revision {rev}, but a write acknowledged before it was sent had \
                 revision {max_before}"
            );
        }
    }
}

/// Checks that member `i` holds every acknowledged write of `ops` (same value, same revision,
/// version 1: each key was put once), and nothing that was never attempted. Returns its view.
async fn check_acked_present(
    c: &Cluster,
    i: usize,
    prefix: &str,
    ops: &[WriteOp],
) -> BTreeMap<String, KeyValue> {
    let (found, header_rev) = scan(c, i, prefix).await;
    let max_acked = ops
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .max()
        .copied()
        .unwrap_or(0);
    assert!(
        header_rev >= max_acked,
        "member {i} is at revision {header_rev}, below the acknowledged {max_acked}"
    );
    let attempted: HashSet<&str> = ops.iter().map(|o| o.key.as_str()).collect();
    for o in ops {
        let Ok(rev) = o.result else { continue };
        let kv = found
            .get(&o.key)
            .unwrap_or_else(|| panic!("member {i} lost the acknowledged write {o:?}"));
        assert_eq!(
            (kv.value.as_slice(), kv.mod_revision, kv.version),
            (o.value.as_bytes(), rev, 1),
            "member {i}: {} is not as acknowledged ({o:?}): {kv:?}",
            o.key
        );
    }
    for (k, kv) in &found {
        assert!(
            attempted.contains(k.as_str()),
            "member {i} holds {k}, which no client wrote: {kv:?}"
        );
        assert_eq!(
            kv.version, 1,
            "member {i}: {k} applied more than once: {kv:?}"
        );
    }
    found
}

// ---------------------------------------------------------------------------------------------
// A recorded mixed workload, for the history checker
// ---------------------------------------------------------------------------------------------

/// Sends one recorded request through `kv`; the response as the checker models it.
async fn perform(kv: &mut KvClient<Channel>, req: &hc::Request) -> Result<hc::Response, String> {
    let header_rev =
        |h: Option<proto::etcdserverpb::ResponseHeader>| h.map(|h| h.revision).unwrap_or(0);
    let call = async {
        Ok::<_, tonic::Status>(match req {
            hc::Request::Put { key, value } => {
                let r = kv
                    .put(PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                hc::Response::Put {
                    revision: header_rev(r.header),
                }
            }
            hc::Request::Get { key } => {
                let r = kv
                    .range(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                hc::Response::Get {
                    revision: header_rev(r.header),
                    kv: r.kvs.into_iter().next().map(|kv| hc::KeyValue {
                        value: kv.value,
                        mod_revision: kv.mod_revision,
                        version: kv.version,
                    }),
                }
            }
            hc::Request::Delete { key } => {
                let r = kv
                    .delete_range(DeleteRangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                hc::Response::Delete {
                    revision: header_rev(r.header),
                    deleted: r.deleted,
                }
            }
            hc::Request::Cas {
                key,
                expected_mod_revision,
                value,
            } => {
                let r = kv
                    .txn(TxnRequest {
                        compare: vec![Compare {
                            result: CompareResult::Equal as i32,
                            target: CompareTarget::Mod as i32,
                            key: key.clone(),
                            target_union: Some(TargetUnion::ModRevision(*expected_mod_revision)),
                            ..Default::default()
                        }],
                        success: vec![RequestOp {
                            request: Some(Op::RequestPut(PutRequest {
                                key: key.clone(),
                                value: value.clone(),
                                ..Default::default()
                            })),
                        }],
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                hc::Response::Cas {
                    revision: header_rev(r.header),
                    succeeded: r.succeeded,
                }
            }
        })
    };
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err("no answer within 3 s".into()),
    }
}

/// Records `req` sent through `kv` in `rec`. Any error is recorded as an unknown outcome: a
/// write refused by one member may still have been proposed by it.
async fn recorded(
    rec: &hc::Recorder,
    client: u64,
    kv: &mut KvClient<Channel>,
    req: hc::Request,
) -> Result<hc::Response, String> {
    let id = rec.invoke(hc::ClientId(client), req.clone());
    let res = perform(kv, &req).await;
    rec.complete(
        id,
        match &res {
            Ok(r) => hc::Outcome::Ok(r.clone()),
            Err(_) => hc::Outcome::Unknown,
        },
    );
    res
}

/// Clients doing puts (unique values), linearizable gets, deletes and compare-and-sets on a few
/// shared keys under `prefix`, each client sequentially, through the members in turn (moving
/// on when a request fails). Every operation is recorded.
struct Mixed {
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Mixed {
    fn start(
        c: &Cluster,
        rec: &Arc<hc::Recorder>,
        prefix: &str,
        clients: u64,
        keys: u64,
        members: &[usize],
    ) -> Mixed {
        let stop = tokio_util::sync::CancellationToken::new();
        let kvs: Vec<KvClient<Channel>> = members.iter().map(|&i| c.kv(i)).collect();
        let tasks = (0..clients)
            .map(|client| {
                let mut kvs = kvs.clone();
                let (rec, stop, prefix) = (rec.clone(), stop.clone(), prefix.to_string());
                tokio::spawn(async move {
                    let mut at = client as usize % kvs.len();
                    let mut seen: HashMap<Vec<u8>, i64> = HashMap::new();
                    for seq in 0u64.. {
                        if stop.is_cancelled() {
                            return;
                        }
                        let key = format!("{prefix}k{}", rand::random::<u64>() % keys).into_bytes();
                        let value = format!("c{client}-{seq}").into_bytes();
                        let req = match rand::random::<u32>() % 10 {
                            0..=4 => hc::Request::put(key.clone(), value),
                            5..=7 => hc::Request::get(key.clone()),
                            8 => hc::Request::delete(key.clone()),
                            _ => hc::Request::cas(
                                key.clone(),
                                seen.get(&key).copied().unwrap_or(0),
                                value,
                            ),
                        };
                        match recorded(&rec, client, &mut kvs[at], req).await {
                            Ok(hc::Response::Get { kv, .. }) => {
                                seen.insert(key, kv.map(|kv| kv.mod_revision).unwrap_or(0));
                            }
                            Ok(_) => {}
                            Err(_) => {
                                at = (at + 1) % kvs.len();
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Mixed { stop, tasks }
    }

    async fn finish(self) {
        self.stop.cancel();
        for t in self.tasks {
            within(Duration::from_secs(10), "a mixed client to stop", t)
                .await
                .expect("mixed client task");
        }
    }
}

/// A watcher whose stream is recorded for the checker while the test runs.
struct RecordedWatch {
    record: Arc<Mutex<hc::WatchRecord>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordedWatch {
    /// Watches `prefix` on member `i` from revision `start`.
    async fn open(c: &Cluster, i: usize, id: u64, prefix: &str, start: i64) -> RecordedWatch {
        let (tx, mut stream) = open_watch(c, i, prefix, start).await;
        let record = Arc::new(Mutex::new(hc::WatchRecord::new(
            id,
            hc::KeyRange::prefix(prefix.as_bytes().to_vec()),
            start,
        )));
        let rec = record.clone();
        let task = tokio::spawn(async move {
            let _keep_open = tx;
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled {
                    return;
                }
                if resp.events.is_empty() {
                    continue;
                }
                let events = resp
                    .events
                    .iter()
                    .map(|e| {
                        let kv = e.kv.clone().unwrap_or_default();
                        if e.r#type() == EventType::Delete {
                            hc::WatchEvent::delete(kv.mod_revision, kv.key)
                        } else {
                            hc::WatchEvent::put(kv.mod_revision, kv.key, kv.value)
                        }
                    })
                    .collect();
                rec.lock().expect("watch record").push_response(events);
            }
        });
        RecordedWatch { record, task }
    }

    fn last_revision(&self) -> i64 {
        let r = self.record.lock().expect("watch record");
        r.responses
            .iter()
            .flatten()
            .map(|e| e.revision)
            .max()
            .unwrap_or(0)
    }

    /// Waits until the watcher delivered `revision`, then stops it; its record is complete
    /// through `revision`.
    async fn finish_at(self, revision: i64, what: &str) -> hc::WatchRecord {
        wait_until(CONVERGE, what, || {
            let last = self.last_revision();
            async move { last >= revision }
        })
        .await;
        self.task.abort();
        let mut r = self.record.lock().expect("watch record").clone();
        r.complete_through = Some(revision);
        r
    }

    /// Stops it as it is (a watcher on a member that was killed).
    fn finish_broken(self) -> hc::WatchRecord {
        self.task.abort();
        self.record.lock().expect("watch record").clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Formation, writes through every member, agreement
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_elect_exactly_one_leader_and_agree_on_every_write() {
    let c = Cluster::start(3).await;
    let leader = wait_all_agree(&c).await;
    let statuses: Vec<MemberStatus> = c
        .statuses()
        .await
        .into_iter()
        .map(|s| s.expect("every member answers Status"))
        .collect();
    let leaders: Vec<usize> = (0..3).filter(|&i| statuses[i].leads()).collect();
    assert_eq!(leaders, [leader], "exactly one member leads: {statuses:#?}");
    for (i, s) in statuses.iter().enumerate() {
        assert_eq!(s.member_id, c.member_id(i), "member {i}'s id: {s:?}");
        assert_eq!(s.leader, c.member_id(leader), "member {i}'s leader: {s:?}");
        assert!(
            s.term >= 1 && s.term == statuses[leader].term,
            "{statuses:#?}"
        );
        assert!(!s.is_learner, "{s:?}");
    }

    // A write through each member is at once readable, linearizably, through every member.
    let mut last = 0;
    for i in 0..3 {
        let key = format!("one/{i}");
        let value = format!("from-{}", c.name(i));
        let rev = put(&c, i, &key, &value).await;
        assert!(rev > last, "revisions go up: {last} then {rev}");
        last = rev;
        for j in 0..3 {
            let kv = get(&c, j, &key)
                .await
                .unwrap_or_else(|| panic!("{key} (acked at {rev} via member {i}) missing on {j}"));
            assert_eq!(
                (kv.value.as_slice(), kv.mod_revision),
                (value.as_bytes(), rev),
                "member {j} read {key} written through member {i}"
            );
        }
    }
    // Overwrites and a delete through different members.
    put(&c, 2, "one/0", "again").await;
    let resp = within(
        REQUEST,
        "delete",
        c.kv(0).delete_range(DeleteRangeRequest {
            key: b"one/1".to_vec(),
            ..Default::default()
        }),
    )
    .await
    .expect("delete through member 0")
    .into_inner();
    assert_eq!(resp.deleted, 1);
    let final_rev = resp.header.expect("header").revision;

    // Every member: the same keys with the same revisions and versions, the same revision, and
    // the same HashKV there.
    let mut views = Vec::new();
    for i in 0..3 {
        let (view, rev) = scan(&c, i, "one/").await;
        assert_eq!(rev, final_rev, "member {i}'s revision");
        views.push(flat(&view));
    }
    assert_eq!(views[0], views[1], "members 0 and 1 differ");
    assert_eq!(views[0], views[2], "members 0 and 2 differ");
    assert_eq!(views[0].len(), 2, "{:?}", views[0]);
    assert_same_hash(&c, &[0, 1, 2], final_rev).await;
}

// ---------------------------------------------------------------------------------------------
// kill -9 of the leader under load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_write_load_loses_no_acknowledged_write() {
    const LOAD: Duration = Duration::from_secs(10);
    let mut c = Cluster::start(3).await;
    let old = wait_all_agree(&c).await;
    let old_term = c.term(old).await;

    // Two workloads at once, through every member: writers of unique keys (`load/`), checked
    // key by key below, and clients mixing puts, linearizable gets, deletes and
    // compare-and-sets on a few shared keys (`mix/`), recorded for the history checker along
    // with a watcher on every member.
    let (_, rev0) = scan(&c, 0, "mix/").await;
    let mut watchers = Vec::new();
    for i in 0..3 {
        watchers.push(RecordedWatch::open(&c, i, i as u64, "mix/", rev0 + 1).await);
    }
    let rec = Arc::new(hc::Recorder::new());
    let started = Instant::now();
    let load = Load::start(&c, "load/", 4, &[0, 1, 2]);
    let mixed = Mixed::start(&c, &rec, "mix/", 4, 8, &[0, 1, 2]);
    wait_until(Duration::from_secs(10), "100 writes acknowledged", || {
        let n = load.acked();
        async move { n >= 100 }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    c.kill(old);
    let killed_at = Instant::now();
    let (new, election) = wait_new_leader(&c, old, killed_at).await;
    let new_term = c.term(new).await;
    // Keep the load on until LOAD after its start (at least 2 s after the election).
    let until = (started + LOAD).max(Instant::now() + Duration::from_secs(2));
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    let ops = load.finish().await;
    mixed.finish().await;

    // Figures: the election, and how long no write was acknowledged around the kill.
    let mut acks: Vec<Instant> = ops
        .iter()
        .filter(|o| o.result.is_ok())
        .map(|o| o.returned)
        .collect();
    acks.sort();
    let last_before = acks.iter().rev().find(|t| **t <= killed_at).copied();
    let first_after = acks.iter().find(|t| **t > killed_at).copied();
    let stall = match (last_before, first_after) {
        (Some(a), Some(b)) => b - a,
        _ => Duration::MAX,
    };
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for o in &ops {
        if let Err(e) = &o.result {
            *errors.entry(e.clone()).or_default() += 1;
        }
    }
    let mut per_member = [0usize; 3];
    for o in ops.iter().filter(|o| o.result.is_ok()) {
        per_member[o.member] += 1;
    }
    println!(
        "kill -9 of the leader (member {old}, term {old_term}) under load: new leader member \
         {new} (term {new_term}) after {} ms; no write acknowledged for {} ms; {} unique-key \
         writes acknowledged (through members 0, 1, 2: {per_member:?}); failed or unknown: \
         {errors:?}",
        ms(election),
        ms(stall),
        acks.len()
    );
    assert!(
        new_term > old_term,
        "the new leader's term {new_term} > {old_term}"
    );
    assert!(
        election <= ELECTION_BOUND,
        "a new leader took {} ms (bound {} ms)",
        ms(election),
        ms(ELECTION_BOUND)
    );
    assert!(
        first_after.is_some(),
        "no write was acknowledged after the kill"
    );

    // The unique-key writes: history, then presence on the survivors.
    check_write_history(&ops);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let mut views = Vec::new();
    for &i in &survivors {
        views.push(flat(&check_acked_present(&c, i, "load/", &ops).await));
    }
    assert_eq!(views[0], views[1], "the survivors hold different data");

    // The mixed history: a last write every watcher must reach, then final reads of every
    // shared key through each survivor.
    let end = match recorded(
        &rec,
        99,
        &mut c.kv(survivors[0]),
        hc::Request::put(b"mix/end".to_vec(), b"end".to_vec()),
    )
    .await
    {
        Ok(r) => r.revision(),
        Err(e) => panic!("the last write: {e}"),
    };
    let mut keys: Vec<Vec<u8>> = (0..8).map(|k| format!("mix/k{k}").into_bytes()).collect();
    keys.push(b"mix/end".to_vec());
    for &i in &survivors {
        let mut kv = c.kv(i);
        for key in &keys {
            recorded(&rec, 100 + i as u64, &mut kv, hc::Request::get(key.clone()))
                .await
                .unwrap_or_else(|e| panic!("final read through member {i}: {e}"));
        }
    }

    // The killed member restarts on its data and catches up with the same data.
    c.restart(old).await;
    wait_for(
        CONVERGE,
        "the restarted member to answer linearizable reads",
        || {
            let mut kv = c.kv(old);
            async move {
                try_range(&mut kv, "load/", true, false, Duration::from_secs(5))
                    .await
                    .ok()
            }
        },
    )
    .await;
    let view = flat(&check_acked_present(&c, old, "load/", &ops).await);
    assert_eq!(
        view, views[0],
        "the restarted member differs from the survivors"
    );
    let mut kv = c.kv(old);
    for key in &keys {
        recorded(
            &rec,
            100 + old as u64,
            &mut kv,
            hc::Request::get(key.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("final read through the restarted member: {e}"));
    }
    // A watcher on the restarted member replays the whole history from its store.
    let replay = RecordedWatch::open(&c, old, 3, "mix/", rev0 + 1).await;

    let mut records = Vec::new();
    for (i, w) in watchers.into_iter().enumerate() {
        records.push(if i == old {
            w.finish_broken()
        } else {
            w.finish_at(end, "a survivor's watcher to reach the last write")
                .await
        });
    }
    records.push(
        replay
            .finish_at(
                end,
                "the restarted member's watcher to replay up to the last write",
            )
            .await,
    );
    let history = Arc::into_inner(rec)
        .expect("no client holds the recorder")
        .into_history();
    let report = hc::check(&history, &records, &hc::Options::default());
    println!("history check of the mixed workload: {report}");
    report.assert_ok();

    let (_, rev) = scan(&c, survivors[0], "load/").await;
    assert_same_hash(&c, &[0, 1, 2], rev).await;
}

// ---------------------------------------------------------------------------------------------
// Catch-up by snapshot
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_far_behind_catches_up_by_snapshot() {
    const WRITES: usize = 2_400;
    // Few writers, so that the leader's batches stay small and the log moves by well over the
    // 512 entries openraft purges at a time (with 16 writers 2,400 writes took ~330 entries).
    const TASKS: usize = 2;
    let mut c = Cluster::start_with(3, &["--snapshot-count", "100"]).await;
    let leader = wait_all_agree(&c).await;
    let behind = (0..3).find(|&i| i != leader).expect("a follower");
    let other = (0..3)
        .find(|&i| i != leader && i != behind)
        .expect("another follower");
    put(&c, leader, "snap/first", "1").await;
    scan(&c, behind, "snap/").await;
    let before = c.status(behind).await.expect("status of the follower");
    c.kill(behind);

    // Many writes while it is down, through both live members.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..TASKS {
        let mut kv = c.kv(if w % 2 == 0 { leader } else { other });
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in (w..WRITES).step_by(TASKS) {
                let key = format!("snap/{:03}", n % 300);
                let value = format!("v{n}");
                let rev = try_put(&mut kv, &key, &value, REQUEST)
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
                acked.push((key, value, rev));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(
            within(Duration::from_secs(90), "the writers", task)
                .await
                .expect("writer"),
        );
    }
    let lead = c.status(leader).await.expect("leader status");
    println!(
        "{WRITES} writes in {} ms while member {behind} was down (it had applied index {} at \
         revision {}; the leader is now at index {}, revision {})",
        ms(t.elapsed()),
        before.applied_index,
        before.revision,
        lead.raft_index,
        lead.revision
    );
    assert!(
        lead.revision >= before.revision + WRITES as i64,
        "every write took a revision: {} → {}",
        before.revision,
        lead.revision
    );
    assert!(
        lead.raft_index >= before.applied_index + 1_000,
        "the log moved {} entries",
        lead.raft_index - before.applied_index
    );

    c.restart(behind).await;
    let t = Instant::now();
    wait_until(
        CONVERGE,
        "the restarted member to apply the leader's index",
        || async {
            c.status(behind)
                .await
                .is_some_and(|s| s.applied_index >= lead.raft_index)
        },
    )
    .await;
    println!(
        "member {behind} caught up {} entries in {} ms after restart",
        lead.raft_index - before.applied_index,
        ms(t.elapsed())
    );
    let log = c.log_since_last_start(behind);
    assert!(
        log.contains("installed snapshot"),
        "member {behind} caught up without installing a snapshot (the log behind the \
         snapshot should have been purged); its log since restart:\n{}",
        log.lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Same data everywhere, the latest acked value of every key, the same HashKV.
    let mut latest: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for (k, v, r) in acked {
        let e = latest.entry(k).or_insert((v.clone(), r));
        if r > e.1 {
            *e = (v, r);
        }
    }
    let mut views = Vec::new();
    for i in 0..3 {
        let (view, _) = scan(&c, i, "snap/").await;
        for (k, (v, r)) in &latest {
            let kv = view
                .get(k)
                .unwrap_or_else(|| panic!("member {i} lacks {k}"));
            assert_eq!(
                (kv.value.as_slice(), kv.mod_revision),
                (v.as_bytes(), *r),
                "member {i}: {k}"
            );
        }
        views.push(flat(&view));
    }
    assert_eq!(views[0], views[1]);
    assert_eq!(views[0], views[2]);
    let (_, rev) = scan(&c, leader, "snap/").await;
    assert_same_hash(&c, &[0, 1, 2], rev).await;
    // History before the snapshot is there too: the first write, at its own revision.
    let first_rev = views[0]
        .iter()
        .map(|(_, _, create, _, _, _)| *create)
        .min()
        .expect("keys");
    assert_same_hash(&c, &[0, 1, 2], first_rev + 10).await;
}

// ---------------------------------------------------------------------------------------------
// A paused leader
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_steps_down_after_resuming_and_serves_no_stale_linearizable_read() {
    const PAUSE: Duration = Duration::from_secs(5);
    let mut c = Cluster::start(3).await;
    let old = wait_all_agree(&c).await;
    let mut old_kv = c.kv(old);
    let first = try_put(&mut old_kv, "pause/key", "v0", REQUEST)
        .await
        .expect("put through the leader");
    // A healthy cluster: no follower behind (that case has its own test).
    assert_eq!(wait_in_sync(&c).await, old);

    c.pause(old);
    let paused_at = Instant::now();
    let (new, election) = wait_new_leader(&c, old, paused_at).await;
    // The bound on this is the business of the election tests; here it is only printed.
    println!(
        "leader (member {old}) paused: member {new} leads after {} ms",
        ms(election)
    );

    // The others keep taking writes.
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let mut latest = (String::new(), first);
    for n in 1..=20 {
        let value = format!("v{n}");
        let rev = put(&c, others[n % 2], "pause/key", &value).await;
        assert!(rev > latest.1);
        latest = (value, rev);
    }

    // Reads sent to the paused member now are answered only after it resumes, when it may still
    // believe it leads.
    let lin = {
        let mut kv = old_kv.clone();
        tokio::spawn(async move {
            try_range(&mut kv, "pause/key", false, false, Duration::from_secs(15)).await
        })
    };
    let ser = {
        let mut kv = old_kv.clone();
        tokio::spawn(async move {
            try_range(&mut kv, "pause/key", false, true, Duration::from_secs(15)).await
        })
    };
    tokio::time::sleep(PAUSE.saturating_sub(paused_at.elapsed())).await;
    c.resume(old);
    let resumed_at = Instant::now();

    let lin = within(Duration::from_secs(20), "the linearizable read", lin)
        .await
        .expect("read task");
    let ser = within(Duration::from_secs(20), "the serializable read", ser)
        .await
        .expect("read task");
    let value_of = |r: &Result<(Vec<KeyValue>, i64), String>| match r {
        Ok((kvs, _)) => kvs
            .first()
            .map(|kv| {
                format!(
                    "{} @{}",
                    String::from_utf8_lossy(&kv.value),
                    kv.mod_revision
                )
            })
            .unwrap_or_else(|| "(none)".into()),
        Err(e) => format!("error: {e}"),
    };
    println!(
        "reads sent to the paused leader, answered after SIGCONT: linearizable {}, \
         serializable {} (latest acked: {} @{})",
        value_of(&lin),
        value_of(&ser),
        latest.0,
        latest.1
    );
    if let Ok((kvs, _)) = &lin {
        let kv = kvs.first().expect("the key exists");
        assert_eq!(
            (kv.value.as_slice(), kv.mod_revision),
            (latest.0.as_bytes(), latest.1),
            "a stale linearizable read from the resumed old leader"
        );
    }

    // The old leader steps down and follows the new one.
    let new_id = c.member_id(new);
    wait_until(
        Duration::from_secs(5),
        "the resumed old leader to follow the new leader",
        || async {
            c.status(old)
                .await
                .is_some_and(|s| s.leader == new_id && !s.leads())
        },
    )
    .await;
    println!(
        "the resumed old leader follows member {new} after {} ms",
        ms(resumed_at.elapsed())
    );
    let leaders: Vec<usize> = c
        .statuses()
        .await
        .iter()
        .enumerate()
        .filter(|(_, s)| s.as_ref().is_some_and(|s| s.leads()))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(leaders, [new], "one leader after the pause");

    // Linearizable reads through it see the latest write at once.
    let kv = get(&c, old, "pause/key").await.expect("the key");
    assert_eq!(kv.value, latest.0.as_bytes());
    let rev = put(&c, new, "pause/key", "after").await;
    let kv = get(&c, old, "pause/key").await.expect("the key");
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"after"[..], rev));
}

// ---------------------------------------------------------------------------------------------
// Leases across a failover
// ---------------------------------------------------------------------------------------------

/// One LeaseKeepAlive round trip; the TTL returned.
async fn keep_alive_once(c: &Cluster, i: usize, id: i64) -> Result<i64, String> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(LeaseKeepAliveRequest { id })
        .await
        .map_err(|e| e.to_string())?;
    let mut lease = c.lease(i);
    let call = async {
        let mut stream = lease
            .lease_keep_alive(ReceiverStream::new(rx))
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        match stream.message().await {
            Ok(Some(r)) => Ok(r.ttl),
            Ok(None) => Err("stream ended".to_string()),
            Err(s) => Err(s.message().to_string()),
        }
    };
    tokio::time::timeout(REQUEST, call)
        .await
        .map_err(|_| "no keep-alive answer".to_string())?
}

async fn grant(c: &Cluster, i: usize, ttl: i64) -> i64 {
    within(
        REQUEST,
        "LeaseGrant",
        c.lease(i).lease_grant(LeaseGrantRequest { ttl, id: 0 }),
    )
    .await
    .unwrap_or_else(|e| panic!("grant through member {i}: {e}"))
    .into_inner()
    .id
}

async fn put_with_lease(c: &Cluster, i: usize, key: &str, lease: i64) {
    let req = PutRequest {
        key: key.into(),
        value: b"held".to_vec(),
        lease,
        ..Default::default()
    };
    within(REQUEST, "Put with a lease", c.kv(i).put(req))
        .await
        .unwrap_or_else(|e| panic!("put {key} with a lease through member {i}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_a_leader_failover_and_expire_after_keep_alives_stop() {
    const TTL: i64 = 10;
    const TTL_D: Duration = Duration::from_secs(TTL as u64);
    let mut c = Cluster::start(3).await;
    let old = wait_all_agree(&c).await;
    let (f1, f2) = {
        let f: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        (f[0], f[1])
    };

    // `quiet` is never kept alive; `kept` is kept alive through a follower until after the
    // failover.
    let granted = Instant::now();
    let quiet = grant(&c, f1, TTL).await;
    put_with_lease(&c, f2, "lease/quiet", quiet).await;
    let kept = grant(&c, f2, TTL).await;
    put_with_lease(&c, f1, "lease/kept", kept).await;

    c.kill(old);
    let killed_at = Instant::now();
    let (new, election) = wait_new_leader(&c, old, killed_at).await;
    let leader_seen = Instant::now();
    println!(
        "lease test: member {new} leads {} ms after the leader was killed",
        ms(election)
    );

    let mut last_sent = granted;
    let mut last_acked = granted;
    while granted.elapsed() < Duration::from_secs(5) {
        let sent = Instant::now();
        let ttl = keep_alive_once(&c, f2, kept)
            .await
            .unwrap_or_else(|e| panic!("keep-alive through member {f2}: {e}"));
        assert_eq!(ttl, TTL, "a keep-alive renews the full TTL");
        (last_sent, last_acked) = (sent, Instant::now());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 5 s after the grant, across the failover, both keys are there on both survivors.
    for i in [f1, f2] {
        for key in ["lease/quiet", "lease/kept"] {
            assert!(
                get(&c, i, key).await.is_some(),
                "{key} vanished early (member {i}, {} ms after the grant)",
                ms(granted.elapsed())
            );
        }
    }
    let ttl = within(
        REQUEST,
        "LeaseTimeToLive",
        c.lease(f1).lease_time_to_live(LeaseTimeToLiveRequest {
            id: quiet,
            keys: true,
        }),
    )
    .await
    .expect("time to live")
    .into_inner();
    assert!(ttl.ttl > 0 && ttl.ttl <= TTL + 1, "{ttl:?}");
    assert_eq!(ttl.keys, [b"lease/quiet".to_vec()], "{ttl:?}");

    // Now no keep-alives at all: each key goes once its lease runs out, not before.
    let gone = |key: &'static str| {
        let kv = c.kv(f1);
        async move {
            wait_for(Duration::from_secs(30), "a leased key to expire", || {
                let mut kv = kv.clone();
                async move {
                    match try_range(&mut kv, key, false, false, Duration::from_secs(3)).await {
                        Ok((kvs, _)) if kvs.is_empty() => Some(Instant::now()),
                        _ => None,
                    }
                }
            })
            .await
        }
    };
    let (quiet_gone, kept_gone) = tokio::join!(gone("lease/quiet"), gone("lease/kept"));
    println!(
        "lease never kept alive: gone {} ms after the grant (TTL {TTL} s, leader killed {} ms \
         after the grant); lease kept alive until {} ms: gone {} ms after the last keep-alive",
        ms(quiet_gone - granted),
        ms(killed_at - granted),
        ms(last_acked - granted),
        ms(kept_gone - last_acked),
    );
    let slack = ELECTION_TIMEOUT + Duration::from_secs(2);
    assert!(
        quiet_gone >= granted + TTL_D,
        "the quiet lease expired {} ms after its grant, before its TTL",
        ms(quiet_gone - granted)
    );
    assert!(
        quiet_gone <= leader_seen + TTL_D + slack,
        "the quiet lease lived {} ms past the new leader's election (bound: TTL + election \
         timeout + 2 s)",
        ms(quiet_gone - leader_seen)
    );
    assert!(
        kept_gone >= last_sent + TTL_D,
        "the kept lease expired {} ms after its last keep-alive, before its TTL",
        ms(kept_gone - last_sent)
    );
    assert!(
        kept_gone <= last_acked + TTL_D + slack,
        "the kept lease lived {} ms past its last keep-alive",
        ms(kept_gone - last_acked)
    );
    for i in [f1, f2] {
        let r = within(
            REQUEST,
            "LeaseTimeToLive",
            c.lease(i).lease_time_to_live(LeaseTimeToLiveRequest {
                id: kept,
                keys: false,
            }),
        )
        .await
        .expect("time to live of an expired lease")
        .into_inner();
        assert_eq!(r.ttl, -1, "member {i}: the expired lease is gone: {r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Watch on a follower
// ---------------------------------------------------------------------------------------------

/// Opens a watch of `prefix` from `start` on member `i`; returns the response stream.
async fn open_watch(
    c: &Cluster,
    i: usize,
    prefix: &str,
    start: i64,
) -> (
    mpsc::Sender<WatchRequest>,
    tonic::Streaming<proto::etcdserverpb::WatchResponse>,
) {
    let (key, range_end) = prefix_range(prefix);
    let (tx, rx) = mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key,
            range_end,
            start_revision: start,
            ..Default::default()
        })),
    })
    .await
    .expect("queue the create request");
    let mut stream = within(
        REQUEST,
        "open a Watch stream",
        c.watch(i).watch(ReceiverStream::new(rx)),
    )
    .await
    .unwrap_or_else(|e| panic!("watch on member {i}: {e}"))
    .into_inner();
    let created = within(REQUEST, "the watch to be created", stream.message())
        .await
        .expect("watch stream")
        .expect("a created response");
    assert!(created.created, "{created:?}");
    (tx, stream)
}

/// Reads events until `n` arrived (bounded); returns (type, key, value, revision) of each.
async fn read_events(
    stream: &mut tonic::Streaming<proto::etcdserverpb::WatchResponse>,
    n: usize,
    timeout: Duration,
) -> Vec<(EventType, String, Vec<u8>, i64)> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let resp = match tokio::time::timeout(left, stream.message()).await {
            Ok(r) => r.expect("watch stream error").expect("watch stream ended"),
            Err(_) => panic!(
                "timed out after {timeout:?} with {} of {n} events",
                out.len()
            ),
        };
        assert!(!resp.canceled, "watch canceled: {resp:?}");
        for e in resp.events {
            let kv = e.kv.clone().expect("an event has a kv");
            out.push((
                e.r#type(),
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.value,
                kv.mod_revision,
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_follower_sees_every_write_through_the_leader_in_order() {
    const TASKS: usize = 4;
    const EACH: usize = 75;
    let c = Cluster::start(3).await;
    let leader = wait_all_agree(&c).await;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    let (_, rev0) = scan(&c, follower, "watch/").await;
    let (_ftx, mut on_follower) = open_watch(&c, follower, "watch/", rev0 + 1).await;
    let (_ltx, mut on_leader) = open_watch(&c, leader, "watch/", rev0 + 1).await;

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let mut kv = c.kv(leader);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..EACH {
                let key = format!("watch/{}", (t * EACH + n) % 40);
                let value = format!("{t}-{n}");
                let rev = try_put(&mut kv, &key, &value, REQUEST)
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
                acked.push((rev, key, value));
            }
            acked
        }));
    }
    let mut acked = BTreeMap::new();
    for task in tasks {
        for (rev, key, value) in within(Duration::from_secs(60), "writers", task)
            .await
            .expect("writer")
        {
            acked.insert(rev, (key, value));
        }
    }
    let del = within(
        REQUEST,
        "delete",
        c.kv(leader).delete_range(DeleteRangeRequest {
            key: b"watch/0".to_vec(),
            ..Default::default()
        }),
    )
    .await
    .expect("delete")
    .into_inner();
    let del_rev = del.header.expect("header").revision;
    let total = TASKS * EACH + 1;

    let events = read_events(&mut on_follower, total, Duration::from_secs(20)).await;
    assert_eq!(events.len(), total, "exactly one event per write");
    for (n, (ty, key, value, rev)) in events.iter().enumerate() {
        assert_eq!(
            *rev,
            rev0 + 1 + n as i64,
            "event {n}: in order, no gaps, no repeats"
        );
        if *rev == del_rev {
            assert_eq!((*ty, key.as_str()), (EventType::Delete, "watch/0"));
        } else {
            let (k, v) = acked
                .get(rev)
                .unwrap_or_else(|| panic!("event at {rev} matches no acknowledged put"));
            assert_eq!(
                (*ty, key, value.as_slice()),
                (EventType::Put, k, v.as_bytes()),
                "event at revision {rev}"
            );
        }
    }
    let on_leader = read_events(&mut on_leader, total, Duration::from_secs(20)).await;
    assert_eq!(
        on_leader, events,
        "the leader's and the follower's watchers saw the same"
    );
}

// ---------------------------------------------------------------------------------------------
// Batched entries: many writes in one Raft entry, each answered on its own
// ---------------------------------------------------------------------------------------------

/// `(sum, count)` of histogram `name` on member `i`'s metrics page.
async fn histogram(c: &Cluster, i: usize, name: &str) -> (f64, f64) {
    let (code, body) = crate::admin::get(c.metrics_addr(i), "/metrics").await;
    assert_eq!(code, 200, "metrics of member {i}");
    let sample = |suffix: &str| {
        let prefix = format!("{name}_{suffix} ");
        body.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name}_{suffix} on member {i}:\n{body}"))
    };
    (sample("sum"), sample("count"))
}

/// What one client's write was answered with.
#[derive(Debug)]
enum Answered {
    /// A put of `key` = `value`, acknowledged at `rev`.
    Put {
        rev: i64,
        key: String,
        value: String,
    },
    /// A txn whose compare failed; its failure branch put `key` = `value` at `rev`.
    TxnElse {
        rev: i64,
        key: String,
        value: String,
    },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_raft_entries_and_each_client_gets_its_own_outcome() {
    const CLIENTS: usize = 48;
    const ROUNDS: usize = 5;
    let c = Cluster::start(3).await;
    let leader = wait_all_agree(&c).await;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    let (_, rev0) = scan(&c, follower, "batch/").await;
    let (_wtx, mut watch) = open_watch(&c, follower, "batch/", rev0 + 1).await;
    let (sum0, count0) = histogram(&c, leader, "coordinator_raft_entry_commands").await;

    // Every round, all clients at once (a barrier lines them up): a put of the client's own
    // key, a txn whose compare fails (its failure branch puts), and a put with a lease that does
    // not exist, which apply refuses. A quarter of the clients go through a follower, whose
    // forwarded writes join the leader's batches.
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for t in 0..CLIENTS {
        let mut kv = c.kv(if t % 4 == 0 { follower } else { leader });
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            for round in 0..ROUNDS {
                barrier.wait().await;
                let (key, value) = (format!("batch/{t}"), format!("{t}.{round}"));
                let rev = try_put(&mut kv, &key, &value, REQUEST)
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
                answered.push(Answered::Put { rev, key, value });

                barrier.wait().await;
                let (key, value) = (format!("batch/{t}/else"), format!("else {t}.{round}"));
                let txn = TxnRequest {
                    compare: vec![Compare {
                        key: b"batch-absent".to_vec(),
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Value as i32,
                        target_union: Some(TargetUnion::Value(b"never".to_vec())),
                        ..Default::default()
                    }],
                    success: vec![],
                    failure: vec![RequestOp {
                        request: Some(Op::RequestPut(PutRequest {
                            key: key.clone().into_bytes(),
                            value: value.clone().into_bytes(),
                            ..Default::default()
                        })),
                    }],
                };
                let r = within(REQUEST, "txn", kv.txn(txn))
                    .await
                    .unwrap_or_else(|e| panic!("txn of client {t}: {e}"))
                    .into_inner();
                assert!(!r.succeeded, "client {t}: the compare fails: {r:?}");
                let rev = r.header.expect("header").revision;
                answered.push(Answered::TxnElse { rev, key, value });

                barrier.wait().await;
                let refused = within(
                    REQUEST,
                    "put with an unknown lease",
                    kv.put(PutRequest {
                        key: format!("batch/{t}/leased").into_bytes(),
                        value: b"x".to_vec(),
                        lease: 0x7e57_0000 + t as i64,
                        ..Default::default()
                    }),
                )
                .await
                .expect_err("a put with an unknown lease is refused");
                assert_eq!(
                    refused.code(),
                    tonic::Code::NotFound,
                    "client {t}: {refused:?}"
                );
                assert_eq!(refused.message(), "etcdserver: requested lease not found");
            }
            answered
        }));
    }
    let mut by_rev: BTreeMap<i64, (String, String)> = BTreeMap::new();
    for task in tasks {
        let answered = within(Duration::from_secs(120), "clients", task)
            .await
            .expect("client task");
        for a in answered {
            let (rev, key, value) = match a {
                Answered::Put { rev, key, value } | Answered::TxnElse { rev, key, value } => {
                    (rev, key, value)
                }
            };
            if let Some(other) = by_rev.insert(rev, (key.clone(), value.clone())) {
                panic!("revision {rev} acknowledged twice: {other:?} and {key}={value}");
            }
        }
    }
    let writes = CLIENTS * ROUNDS * 2;
    assert_eq!(by_rev.len(), writes);
    assert_eq!(
        by_rev.keys().copied().collect::<Vec<_>>(),
        (rev0 + 1..=rev0 + writes as i64).collect::<Vec<_>>(),
        "the acknowledged writes took every revision after {rev0} once; the refused puts took none"
    );

    // The watch on the follower sees every write once, in revision order, as acknowledged.
    let events = read_events(&mut watch, writes, Duration::from_secs(30)).await;
    assert_eq!(events.len(), writes, "one event per acknowledged write");
    for ((ty, key, value, rev), (acked_rev, (acked_key, acked_value))) in
        events.iter().zip(by_rev.iter())
    {
        assert_eq!(*ty, EventType::Put);
        assert_eq!(
            (rev, key, value.as_slice()),
            (acked_rev, acked_key, acked_value.as_bytes()),
            "the event at revision {rev} is the write acknowledged there"
        );
    }
    for t in 0..CLIENTS {
        assert!(
            get(&c, follower, &format!("batch/{t}/leased"))
                .await
                .is_none(),
            "a refused put changed nothing"
        );
    }

    // The leader proposed fewer entries than commands: some entries held several.
    let (sum1, count1) = histogram(&c, leader, "coordinator_raft_entry_commands").await;
    let (commands, entries) = (sum1 - sum0, count1 - count0);
    assert!(
        commands >= (CLIENTS * ROUNDS * 3) as f64,
        "every client write went through the leader's batcher: {commands} commands"
    );
    assert!(
        entries < commands,
        "some entries held several commands: {commands} commands in {entries} entries"
    );
    println!("{commands} commands in {entries} entries");
    assert_same_hash(&c, &[0, 1, 2], rev0 + writes as i64).await;
}

// ---------------------------------------------------------------------------------------------
// etcdctl against the cluster, each command through another member
// ---------------------------------------------------------------------------------------------

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("expected an integer, got {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_basics_work_through_every_member_of_a_cluster() {
    let c = Cluster::start(3).await;
    wait_all_agree(&c).await;
    let ctl: Vec<Etcdctl> = (0..3).map(|i| c.etcdctl(i)).collect();

    // put / get / del, each through another member.
    assert_eq!(ctl[0].ok(&["put", "a", "1"]).await.trim(), "OK");
    assert_eq!(ctl[1].ok(&["put", "a", "2"]).await.trim(), "OK");
    assert_eq!(lines(&ctl[2].ok(&["get", "a"]).await), ["a", "2"]);
    let got = ctl[0].json(&["get", "a"]).await;
    let rev_a = int(&got["kvs"][0]["mod_revision"]);
    assert_eq!(int(&got["kvs"][0]["version"]), 2, "{got}");
    for (i, ctl) in ctl.iter().enumerate() {
        let g = ctl.json(&["get", "a"]).await;
        assert_eq!(int(&g["kvs"][0]["mod_revision"]), rev_a, "member {i}: {g}");
        assert_eq!(
            g["header"]["member_id"].as_u64(),
            Some(c.member_id(i)),
            "member {i} answers with its own id: {g}"
        );
    }
    ctl[1].ok(&["put", "d/1", "one"]).await;
    ctl[2].ok(&["put", "d/2", "two"]).await;
    let out = ctl[0].ok(&["del", "--prefix", "--prev-kv", "d/"]).await;
    assert_eq!(lines(&out), ["2", "d/1", "one", "d/2", "two"]);
    assert_eq!(ctl[1].ok(&["get", "--prefix", "d/"]).await.trim(), "");

    // txn -i.
    let input = "val(\"a\") = \"2\"\n\nput t yes\n\nput t no\n\n";
    let out = ctl[2]
        .run_with_stdin(&["txn", "-i"], Some(input), crate::harness::ETCDCTL_TIMEOUT)
        .await
        .ok("txn -i");
    assert!(out.lines().any(|l| l == "SUCCESS"), "{out}");
    assert_eq!(lines(&ctl[0].ok(&["get", "t"]).await), ["t", "yes"]);

    // watch on one member, writes through the two others.
    let rev = int(&ctl[1].json(&["get", "w/"]).await["header"]["revision"]) + 1;
    let mut watch = ctl[1].spawn(&["watch", "--prefix", "w/", &format!("--rev={rev}")]);
    ctl[2].ok(&["put", "w/a", "1"]).await;
    ctl[0].ok(&["put", "w/b", "2"]).await;
    ctl[2].ok(&["del", "w/a"]).await;
    assert_eq!(
        watch.lines(9, Duration::from_secs(15)).await,
        ["PUT", "w/a", "1", "PUT", "w/b", "2", "DELETE", "w/a", ""]
    );
    watch.kill().await;

    // lease grant / put --lease / keep-alive / timetolive / list / revoke.
    let granted = ctl[0].ok(&["lease", "grant", "100"]).await;
    assert!(granted.contains("granted with TTL(100s)"), "{granted}");
    let id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    ctl[1].ok(&["put", "--lease", &id, "leased/a", "1"]).await;
    let kept = ctl[2].ok(&["lease", "keep-alive", "--once", &id]).await;
    assert_eq!(kept.trim(), format!("lease {id} keepalived with TTL(100)"));
    let ttl = ctl[0].ok(&["lease", "timetolive", "--keys", &id]).await;
    assert!(ttl.contains("attached keys([leased/a])"), "{ttl}");
    let list = ctl[1].ok(&["lease", "list"]).await;
    assert!(list.lines().any(|l| l == id), "{list}");
    assert_eq!(
        ctl[2].ok(&["lease", "revoke", &id]).await.trim(),
        format!("lease {id} revoked")
    );
    assert_eq!(ctl[0].ok(&["get", "leased/a"]).await.trim(), "");

    // lock: two contenders on different members exclude each other.
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let script = format!(
        "echo start >> {f}; sleep 1; echo end >> {f}",
        f = file.path().display()
    );
    let args = ["lock", "cluster-lock", "--", "sh", "-c", &script];
    let (a, b) = tokio::join!(
        ctl[0].run_with_stdin(&args, None, Duration::from_secs(30)),
        ctl[2].run_with_stdin(&args, None, Duration::from_secs(30)),
    );
    a.ok("lock through member 0");
    b.ok("lock through member 2");
    let log = std::fs::read_to_string(file.path()).expect("both contenders wrote");
    assert_eq!(
        lines(&log),
        ["start", "end", "start", "end"],
        "critical sections overlapped"
    );

    // member list and endpoint status agree everywhere.
    let list = ctl[1].json(&["member", "list"]).await;
    let members = list["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{list}");
    for i in 0..3 {
        let m = members
            .iter()
            .find(|m| m["ID"].as_u64() == Some(c.member_id(i)))
            .unwrap_or_else(|| panic!("member {i} is listed: {list}"));
        assert_eq!(m["name"], c.name(i), "{list}");
        assert_eq!(m["peerURLs"], serde_json::json!([c.peer_url(i)]), "{list}");
        assert_eq!(m["clientURLs"], serde_json::json!([c.url(i)]), "{list}");
    }
    let all = Etcdctl::new((0..3).map(|i| c.endpoint(i)).collect::<Vec<_>>().join(","));
    let status = all.json(&["endpoint", "status"]).await;
    let status = status.as_array().expect("one status per endpoint");
    assert_eq!(status.len(), 3);
    let leader = status[0]["Status"]["leader"].as_u64();
    let leaders = status
        .iter()
        .filter(|s| s["Status"]["leader"] == s["Status"]["header"]["member_id"])
        .count();
    assert_eq!(leaders, 1, "exactly one endpoint is the leader: {status:?}");
    for s in status {
        assert_eq!(s["Status"]["leader"].as_u64(), leader, "{status:?}");
    }
    let out = ctl[2].run(&["endpoint", "health", "--cluster"]).await;
    let health = format!("{}{}", out.stdout, out.stderr);
    out.ok("endpoint health --cluster");
    for i in 0..3 {
        assert!(
            health.contains(&format!("{} is healthy", c.url(i))),
            "{health}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Membership: add a fourth member, remove it
// ---------------------------------------------------------------------------------------------

/// `etcdctl member add` of a fourth member through the leader (checking what it prints), then
/// starts it with `--initial-cluster-state existing`, writes 10 more keys under `m/`, and waits
/// until it has every key under `m/`. Returns its index.
async fn add_and_start_a_fourth_member(c: &mut Cluster, leader: usize) -> usize {
    let fourth = c.prepare_joining_member();
    let out = c
        .etcdctl(leader)
        .ok(&[
            "member",
            "add",
            c.name(fourth),
            &format!("--peer-urls={}", c.peer_url(fourth)),
        ])
        .await;
    let id = c.member_id(fourth);
    assert!(
        out.contains(&format!("Member {id:16x} added to cluster")),
        "member add prints the new id {id:x}:\n{out}"
    );
    assert!(
        out.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
        "{out}"
    );
    for i in 0..=fourth {
        assert!(
            out.contains(&format!("{}={}", c.name(i), c.peer_url(i))),
            "ETCD_INITIAL_CLUSTER names {}:\n{out}",
            c.name(i)
        );
    }

    // Start it (as etcd's docs say: after `member add`), with an --initial-cluster naming all
    // four. It catches up with what was written before and after.
    c.restart(fourth).await;
    for n in 50..60 {
        put(c, n % 3, &format!("m/{n:02}"), "after").await;
    }
    let t = Instant::now();
    let (want, _) = scan(c, leader, "m/").await;
    wait_until(CONVERGE, "the fourth member to catch up", || async {
        let mut kv = c.kv(fourth);
        try_range(&mut kv, "m/", true, false, Duration::from_secs(5))
            .await
            .is_ok_and(|(kvs, _)| kvs.len() == want.len())
    })
    .await;
    println!(
        "the fourth member caught up {} ms after it started",
        ms(t.elapsed())
    );
    fourth
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_add_of_a_fourth_member_catches_up_and_member_remove_takes_it_out() {
    let mut c = Cluster::start(3).await;
    let leader = wait_all_agree(&c).await;
    for n in 0..50 {
        put(&c, n % 3, &format!("m/{n:02}"), "before").await;
    }

    let fourth = add_and_start_a_fourth_member(&mut c, leader).await;
    let id = c.member_id(fourth);
    let (want, _) = scan(&c, leader, "m/").await;
    let (view, rev) = scan(&c, fourth, "m/").await;
    assert_eq!(flat(&view), flat(&want));
    assert_same_hash(&c, &[0, 1, 2, 3], rev).await;
    let s = c.status(fourth).await.expect("status of the fourth member");
    assert!(!s.is_learner, "added as a voter: {s:?}");
    assert_eq!(s.leader, c.member_id(leader), "{s:?}");

    // Every member lists it, with its URLs once it published them.
    let fourth_url = c.url(fourth);
    wait_until(
        CONVERGE,
        "every member to list the fourth member, started",
        || {
            let ctls: Vec<Etcdctl> = (0..4).map(|i| c.etcdctl(i)).collect();
            let fourth_url = fourth_url.clone();
            async move {
                for ctl in ctls {
                    let list = ctl.json(&["member", "list"]).await;
                    let members = list["members"].as_array().cloned().unwrap_or_default();
                    let listed = members.len() == 4
                        && members.iter().any(|m| {
                            m["ID"].as_u64() == Some(id)
                                && m["clientURLs"] == serde_json::json!([fourth_url.clone()])
                        });
                    if !listed {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    let list = c.etcdctl(2).json(&["member", "list"]).await;
    let m = list["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["ID"].as_u64() == Some(id)).cloned())
        .expect("the fourth member is listed");
    assert_eq!(
        m["peerURLs"],
        serde_json::json!([c.peer_url(fourth)]),
        "{list}"
    );
    // Checked at the end, so that the removal is tested whatever this shows.
    let listed_name = m["name"].as_str().unwrap_or("").to_string();
    assert!(
        m.get("isLearner").is_none() || m["isLearner"] == false,
        "{list}"
    );

    // Remove it (through the leader), then the three carry on without it.
    let leader = c.wait_leader(CONVERGE).await;
    let out = c
        .etcdctl(leader)
        .ok(&["member", "remove", &format!("{id:x}")])
        .await;
    // etcdctl prints ids with `%16x` (space-padded), as in `member add` above.
    assert!(
        out.contains(&format!("Member {id:16x} removed from cluster")),
        "{out}"
    );
    c.mark_removed(fourth);
    for i in 0..3 {
        let list = c.etcdctl(i).json(&["member", "list"]).await;
        let ids: HashSet<u64> = list["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter_map(|m| m["ID"].as_u64())
            .collect();
        assert_eq!(
            ids,
            (0..3).map(|j| c.member_id(j)).collect::<HashSet<_>>(),
            "member {i}'s list after the removal: {list}"
        );
    }
    c.kill(fourth);
    for i in 0..3 {
        put(&c, i, &format!("m/removed/{i}"), "x").await;
    }
    let (_, rev) = scan(&c, 0, "m/").await;
    assert_same_hash(&c, &[0, 1, 2], rev).await;

    // As in etcd, a member added by `member add` (which sends no name) shows its name once it
    // has started and published its attributes.
    assert_eq!(
        listed_name,
        c.name(fourth),
        "the started fourth member's name in member list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_stops_serving_and_does_not_disturb_the_others() {
    let mut c = Cluster::start(3).await;
    let leader = wait_all_agree(&c).await;
    for n in 0..10 {
        put(&c, n % 3, &format!("m/{n:02}"), "before").await;
    }
    let fourth = add_and_start_a_fourth_member(&mut c, leader).await;
    let id = c.member_id(fourth);
    let leader = c.wait_leader(CONVERGE).await;
    let term = c.term(leader).await;
    c.etcdctl(leader)
        .ok(&["member", "remove", &format!("{id:x}")])
        .await;
    c.mark_removed(fourth);

    // The three carry on, under the same leader and term, for longer than the removed
    // member's election timeout (twice over); then the removed member must have stopped
    // serving: exited, or refusing requests.
    let removed_at = Instant::now();
    let mut n = 0;
    while removed_at.elapsed() < 2 * ELECTION_TIMEOUT + Duration::from_secs(2) {
        put(&c, n % 3, &format!("m/after/{n:03}"), "x").await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        c.leader().await,
        Some(leader),
        "the leader changed after a removal"
    );
    assert_eq!(
        c.term(leader).await,
        term,
        "the term changed after a removal"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let last = loop {
        if c.has_exited(fourth) {
            break None;
        }
        let mut kv = c.kv(fourth);
        let read = try_range(&mut kv, "m/", true, true, Duration::from_secs(2)).await;
        if read.is_err() {
            break None;
        }
        if Instant::now() >= deadline {
            break Some((read, c.status(fourth).await));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some((read, status)) = last {
        let read = read.map(|(kvs, rev)| format!("{} keys at revision {rev}", kvs.len()));
        panic!(
            "the removed member still serves {} s after its removal: a serializable range \
             answered {read:?}; its status: {status:?}",
            removed_at.elapsed().as_secs()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Elections
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_leader_kills_elect_a_new_leader_within_three_seconds_every_time() {
    const ROUNDS: usize = 5;
    let mut c = Cluster::start(3).await;
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let old = wait_in_sync(&c).await;
        let term = c.term(old).await;
        c.kill(old);
        let killed_at = Instant::now();
        let (new, took) = wait_new_leader(&c, old, killed_at).await;
        let new_term = c.term(new).await;
        println!(
            "round {round}: killed member {old} (term {term}); member {new} leads at term \
             {new_term} after {} ms",
            ms(took)
        );
        times.push(took);
        assert!(new_term > term);
        // Bring the old leader back and make sure it is current before the next round.
        c.restart(old).await;
        let rev = put(&c, new, &format!("round/{round}"), "x").await;
        let kv = wait_for(
            CONVERGE,
            "the restarted member to read the latest write",
            || {
                let mut kv = c.kv(old);
                let key = format!("round/{round}");
                async move {
                    try_range(&mut kv, &key, false, false, Duration::from_secs(5))
                        .await
                        .ok()
                        .and_then(|(kvs, _)| kvs.into_iter().next())
                }
            },
        )
        .await;
        assert_eq!(kv.mod_revision, rev);
    }
    let list: Vec<u128> = times.iter().map(|d| ms(*d)).collect();
    println!("election times after kill -9 of the leader (ms): {list:?}");
    assert!(
        times.iter().all(|t| *t <= ELECTION_BOUND),
        "every election within {} ms: {list:?}",
        ms(ELECTION_BOUND)
    );
}

/// One observation of the survivors during an election: (ms since the kill, member, term,
/// the leader it names).
type Seen = (u128, usize, u64, u64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_member_to_campaign_after_the_leader_dies_becomes_the_leader() {
    // With both survivors up to date and nobody else campaigning, the first campaign must win:
    // that is what drawing the election timeout from [ET, 2 ET) is for. A round where both
    // survivors campaign before either leads is a split vote and proves nothing; it is retried.
    let mut c = Cluster::start(3).await;
    let mut conclusive = 0;
    for round in 0..4 {
        if conclusive == 2 {
            break;
        }
        let old = wait_in_sync(&c).await;
        let term = c.term(old).await;
        c.kill(old);
        let killed_at = Instant::now();
        let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        let mut timeline: Vec<Seen> = Vec::new();
        // Who campaigned first: a member seen campaigning (a higher term, following nobody
        // else) in two polls in a row while the other was not campaigning in the first of
        // them. Two polls, so that a member caught in the moment between granting its vote and
        // hearing from the winner is not taken for a candidate. `Some(both)` means both
        // campaigned at about the same time (inconclusive).
        let mut first: Option<Vec<usize>> = None;
        let campaigning = |st: &[Option<MemberStatus>], i: usize| {
            st[i]
                .as_ref()
                .is_some_and(|s| s.term > term && (s.leader == 0 || s.leader == s.member_id))
        };
        let mut prev: Vec<Option<MemberStatus>> = Vec::new();
        let mut polls_with_leader = 0;
        let leader = loop {
            assert!(
                killed_at.elapsed() < Duration::from_secs(20),
                "no leader 20 s after the kill; seen: {timeline:?}"
            );
            let statuses = c.statuses().await;
            let at = killed_at.elapsed().as_millis();
            for &i in &survivors {
                if let Some(s) = &statuses[i] {
                    let changed = timeline
                        .iter()
                        .rev()
                        .find(|e| e.1 == i)
                        .is_none_or(|e| (e.2, e.3) != (s.term, s.leader));
                    if changed {
                        timeline.push((at, i, s.term, s.leader));
                    }
                }
            }
            if first.is_none() && !prev.is_empty() {
                let steady: Vec<usize> = survivors
                    .iter()
                    .copied()
                    .filter(|&i| campaigning(&prev, i) && campaigning(&statuses, i))
                    .collect();
                first = match steady.as_slice() {
                    [] => None,
                    [x] => {
                        let other = survivors.iter().copied().find(|i| i != x).expect("two");
                        Some(if campaigning(&prev, other) {
                            survivors.clone()
                        } else {
                            vec![*x]
                        })
                    }
                    _ => Some(steady),
                };
            }
            if let Some(l) = Cluster::leader_of(&statuses, 2) {
                polls_with_leader += 1;
                if first.is_some() || polls_with_leader >= 3 {
                    break l;
                }
            }
            prev = statuses;
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let new_term = c.term(leader).await;
        println!(
            "round {round}: killed member {old} at term {term}; member {leader} leads at term \
             {new_term} after {} ms; first to campaign: {first:?}; (ms, member, term, leader): \
             {timeline:?}",
            ms(killed_at.elapsed())
        );
        // With pre-vote, only a member that already won a pre-vote campaigns, so the first
        // campaign must win: the term moves by exactly one. (A voter that granted its vote also
        // shows the new term with no leader for a moment, so polling alone cannot always tell
        // which survivor campaigned; the term can.)
        assert_eq!(
            new_term,
            term + 1,
            "the first campaign after the kill did not win (split vote or disruption); \
             (ms, member, term, leader): {timeline:?}"
        );
        if let Some(first) = first.filter(|f| f.len() == 1) {
            assert_eq!(
                first[0], leader,
                "member {} campaigned first with nobody competing, yet member {leader} became \
                 leader; (ms, member, term, leader): {timeline:?}",
                first[0]
            );
        }
        conclusive += 1;
        c.restart(old).await;
    }
    assert!(conclusive > 0, "no round finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_fell_behind_does_not_hold_up_the_next_election() {
    // The follower with the higher member id falls behind (paused while the others commit),
    // then the leader dies just as it comes back. It cannot win (its log is shorter), so the
    // other follower must, within the usual bound.
    let mut c = Cluster::start(3).await;
    let old = wait_in_sync(&c).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let behind = *followers
        .iter()
        .max_by_key(|&&i| c.member_id(i))
        .expect("followers");
    let ahead = *followers.iter().find(|&&i| i != behind).expect("followers");

    c.pause(behind);
    let paused_at = Instant::now();
    for n in 0..20 {
        put(&c, old, &format!("behind/{n:02}"), "x").await;
    }
    // Long enough that its election timer ran out while it was stopped.
    tokio::time::sleep(
        (2 * ELECTION_TIMEOUT + Duration::from_millis(300)).saturating_sub(paused_at.elapsed()),
    )
    .await;
    let term = c.term(old).await;
    c.kill(old);
    c.resume(behind);
    let killed_at = Instant::now();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(l) = c.leader().await
                && l != old
            {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let took = killed_at.elapsed();
    let Ok(new) = found else {
        let terms: Vec<Option<u64>> = c
            .statuses()
            .await
            .iter()
            .map(|s| s.as_ref().map(|s| s.term))
            .collect();
        panic!(
            "no leader 20 s after the kill (old term {term}; terms now {terms:?}): the member \
             that fell behind (member {behind}) keeps campaigning and the up-to-date one \
             (member {ahead}) cannot win"
        );
    };
    let new_term = c.term(new).await;
    println!(
        "leader killed while member {behind} (higher id) was behind: member {new} leads at term \
         {new_term} (was {term}) after {} ms",
        ms(took)
    );
    assert_eq!(new, ahead, "only the member with the whole log can win");
    assert!(
        took <= ELECTION_BOUND,
        "a new leader took {} ms (bound {} ms); terms went from {term} to {new_term}",
        ms(took),
        ms(ELECTION_BOUND)
    );
    // The member that was behind catches up.
    let kv = get(&c, behind, "behind/19").await;
    assert!(kv.is_some(), "member {behind} has caught up");
}

// ---------------------------------------------------------------------------------------------
// Errors clients see during a failover
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_whose_leader_died_waits_or_fails_with_an_etcd_error() {
    // The follower still believes in the dead leader for a while. Its forward to the leader
    // fails to connect, so the write was certainly not delivered: the follower may wait for the
    // new leader, or answer as etcd would. etcd's clients match these texts exactly.
    const ETCD_TEXTS: [&str; 3] = [
        "etcdserver: leader changed",
        "etcdserver: no leader",
        "etcdserver: request timed out",
    ];
    let mut c = Cluster::start(3).await;
    let old = wait_in_sync(&c).await;
    let follower = (0..3).find(|&i| i != old).expect("a follower");
    let mut kv = c.kv(follower);
    try_put(&mut kv, "dead/warm-up", "x", REQUEST)
        .await
        .expect("put through the follower");
    c.kill(old);
    let sent = Instant::now();
    let res = try_put(&mut kv, "dead/1", "v", REQUEST).await;
    println!(
        "put through a follower just after the leader was killed: {res:?} after {} ms",
        ms(sent.elapsed())
    );
    if let Err(e) = &res {
        assert!(
            ETCD_TEXTS.iter().any(|t| e == &format!("Unavailable: {t}")),
            "the error is not one of etcd's texts {ETCD_TEXTS:?}: {e}"
        );
    }
}

/// A leader paused past every lease's TTL wakes up believing it still leads, with every
/// deadline on its clock passed. Its expiries are its own stale decision: they must not be
/// forwarded to the leader elected meanwhile (which kept the leases alive) and committed there.
/// (Found by the container fault tests: every registration vanished a few seconds after a
/// paused or partitioned leader came back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_coming_back_does_not_expire_leases_the_new_leader_kept_alive() {
    const TTL: i64 = 3;
    let mut c = Cluster::start(3).await;
    let old = wait_all_agree(&c).await;
    let f: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let id = grant(&c, f[0], TTL).await;
    put_with_lease(&c, f[0], "lease/kept-through-pause", id).await;

    // Keep-alives every 500 ms through the followers, all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let (c_lease, c_lease2) = (c.lease(f[0]), c.lease(f[1]));
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut clients = [c_lease, c_lease2];
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.send(LeaseKeepAliveRequest { id }).await;
                let lease = &mut clients[n % 2];
                n += 1;
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    if let Ok(s) = lease.lease_keep_alive(ReceiverStream::new(rx)).await {
                        let _ = s.into_inner().message().await;
                    }
                })
                .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    c.pause(old);
    let paused_at = Instant::now();
    let (_new, _) = wait_new_leader(&c, old, paused_at).await;
    // Well past the TTL on the paused member's clock.
    tokio::time::sleep(Duration::from_secs(TTL as u64 * 2 + 1)).await;
    c.resume(old);
    // Time for the old leader to act on its stale deadlines and to learn of the new term.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let ttl = within(
        REQUEST,
        "LeaseTimeToLive",
        c.lease(f[1])
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true }),
    )
    .await
    .expect("time to live")
    .into_inner();
    assert!(
        ttl.ttl > 0,
        "the lease kept alive through the new leader was revoked: {ttl:?}"
    );
    assert_eq!(ttl.keys, vec![b"lease/kept-through-pause".to_vec()]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = keeper.await;
}

// ---------------------------------------------------------------------------------------------
// Leader transfer: etcdctl move-leader
// ---------------------------------------------------------------------------------------------

/// `etcdctl move-leader ID` with every endpoint (it finds the leader itself); what it printed.
async fn move_leader(c: &Cluster, target: usize) -> crate::harness::Output {
    let all = Etcdctl::new((0..3).map(|i| c.endpoint(i)).collect::<Vec<_>>().join(","));
    all.run(&["move-leader", &format!("{:x}", c.member_id(target))])
        .await
}

/// Moves leadership from `from` to `to` with `etcdctl move-leader`, checks what etcdctl printed,
/// that every member names `to` as leader at one term above `term`, and returns how long the
/// command took.
async fn move_and_check(c: &Cluster, from: usize, to: usize, term: u64) -> Duration {
    let t = Instant::now();
    let out = move_leader(c, to).await;
    let took = t.elapsed();
    let said = format!("{}{}", out.stdout, out.stderr);
    out.ok("move-leader");
    assert_eq!(
        said.trim(),
        format!(
            "Leadership transferred from {:x} to {:x}",
            c.member_id(from),
            c.member_id(to)
        ),
        "what etcdctl printed"
    );
    assert_eq!(
        wait_all_agree(c).await,
        to,
        "every member names the transferee"
    );
    let statuses = c.statuses().await;
    for (i, s) in statuses.iter().enumerate() {
        let s = s
            .as_ref()
            .unwrap_or_else(|| panic!("member {i} answers Status"));
        assert_eq!(
            s.term,
            term + 1,
            "member {i}: one election, won at once by the transferee: {statuses:?}"
        );
    }
    // endpoint status (what an operator looks at) shows it too.
    let all = Etcdctl::new((0..3).map(|i| c.endpoint(i)).collect::<Vec<_>>().join(","));
    let status = all.json(&["endpoint", "status"]).await;
    for s in status.as_array().expect("one status per endpoint") {
        assert_eq!(s["Status"]["leader"].as_u64(), Some(c.member_id(to)), "{s}");
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_hands_leadership_to_the_named_member_under_write_load_and_loses_no_acknowledged_write()
 {
    let c = Cluster::start(3).await;
    let first = wait_in_sync(&c).await;
    let term = c.term(first).await;
    let load = Load::start(&c, "ml/", 4, &[0, 1, 2]);
    wait_until(CONVERGE, "the writers to get going", || async {
        load.acked() >= 100
    })
    .await;

    // To a follower, then straight back (the new leader was elected a moment ago), both
    // under the load.
    let second = (first + 1) % 3;
    let took = move_and_check(&c, first, second, term).await;
    println!("move-leader {first} -> {second} took {} ms", ms(took));
    let before = load.acked();
    wait_until(CONVERGE, "writes to go on after the transfer", || async {
        load.acked() >= before + 100
    })
    .await;
    let took = move_and_check(&c, second, first, term + 1).await;
    println!("move-leader {second} -> {first} took {} ms", ms(took));
    let before = load.acked();
    wait_until(
        CONVERGE,
        "writes to go on after the second transfer",
        || async { load.acked() >= before + 100 },
    )
    .await;

    let ops = load.finish().await;
    let failed: Vec<&WriteOp> = ops.iter().filter(|o| o.result.is_err()).collect();
    println!(
        "{} writes, {} acknowledged, {} failed: {:?}",
        ops.len(),
        ops.len() - failed.len(),
        failed.len(),
        failed.iter().map(|o| &o.result).collect::<Vec<_>>()
    );
    check_write_history(&ops);
    wait_in_sync(&c).await;
    for i in 0..3 {
        check_acked_present(&c, i, "ml/", &ops).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_refuses_learners_unknown_ids_and_followers_with_etcds_errors_and_to_the_leader_is_a_no_op()
 {
    let c = Cluster::start(3).await;
    let leader = wait_in_sync(&c).await;
    let term = c.term(leader).await;
    let follower = (leader + 1) % 3;

    // An id that is no member's.
    let all = Etcdctl::new((0..3).map(|i| c.endpoint(i)).collect::<Vec<_>>().join(","));
    let out = all.run(&["move-leader", "1234abcd"]).await;
    assert!(!out.status.success(), "move-leader to an unknown id fails");
    assert!(
        out.stderr.contains("etcdserver: bad leader transferee"),
        "{}",
        out.stderr
    );

    // A learner.
    let port = crate::harness::free_port();
    let added = c
        .etcdctl(leader)
        .ok(&[
            "member",
            "add",
            "learner",
            "--learner",
            &format!("--peer-urls=http://127.0.0.1:{port}"),
        ])
        .await;
    let learner = added
        .split_whitespace()
        .nth(1)
        .expect("member add prints the id")
        .to_string();
    let out = all.run(&["move-leader", &learner]).await;
    assert!(!out.status.success(), "move-leader to a learner fails");
    assert!(
        out.stderr.contains("etcdserver: bad leader transferee"),
        "{}",
        out.stderr
    );
    c.etcdctl(leader).ok(&["member", "remove", &learner]).await;

    // Sent to a follower: etcd's answer, `etcdserver: not leader` (etcdctl itself looks for the
    // leader among its endpoints and gives up before asking when none leads).
    let mut m = c.maintenance(follower);
    let err = m
        .move_leader(proto::etcdserverpb::MoveLeaderRequest {
            target_id: c.member_id(follower),
        })
        .await
        .expect_err("a follower refuses MoveLeader");
    assert_eq!(
        (err.code(), err.message()),
        (tonic::Code::FailedPrecondition, "etcdserver: not leader")
    );
    let out = c
        .etcdctl(follower)
        .run(&["move-leader", &format!("{:x}", c.member_id(leader))])
        .await;
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("no leader endpoint given"),
        "{}",
        out.stderr
    );

    // To the leader itself: OK, nothing changes.
    let out = move_leader(&c, leader).await;
    let said = out.stdout.clone();
    out.ok("move-leader to the leader itself");
    assert!(said.contains("Leadership transferred"), "{said}");
    assert_eq!(wait_all_agree(&c).await, leader);
    assert_eq!(c.term(leader).await, term, "no election");
}

/// After a failed leader transfer: every member agrees the old leader still leads, at the same
/// term, and the write load keeps being acknowledged.
async fn leader_kept_and_writes_go_on(
    c: &Cluster,
    leader: usize,
    term: u64,
    load: &Load,
    after: &str,
) {
    assert_eq!(
        wait_all_agree(c).await,
        leader,
        "the old leader keeps leading"
    );
    assert_eq!(c.term(leader).await, term, "no election");
    let before = load.acked();
    wait_until(
        CONVERGE,
        &format!("writes to go on after {after}"),
        || async { load.acked() >= before + 50 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_to_a_paused_member_fails_with_etcds_timeout_and_the_leader_keeps_leading() {
    let mut c = Cluster::start(3).await;
    let leader = wait_in_sync(&c).await;
    let term = c.term(leader).await;
    let target = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    // The target holds the whole log, so the leader goes as far as sending it TimeoutNow,
    // which waits in its socket.
    c.pause(target);
    let mut m = c.maintenance(leader);
    let target_id = c.member_id(target);
    let moving = tokio::spawn(async move {
        m.move_leader(proto::etcdserverpb::MoveLeaderRequest { target_id })
            .await
    });
    // Writes arriving during the transfer wait for it and then succeed or fail, never vanish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let load = Load::start(&c, "mt/", 2, &[leader, other]);
    // Without a deadline, the call fails after its one attempt, with etcd's error.
    let err = moving
        .await
        .expect("MoveLeader task")
        .expect_err("the transfer cannot succeed");
    assert_eq!(
        (err.code(), err.message()),
        (
            tonic::Code::Unavailable,
            "etcdserver: request timed out, leader transfer took too long"
        )
    );
    leader_kept_and_writes_go_on(&c, leader, term, &load, "the failed transfer").await;

    // etcdctl sends a deadline: as etcd, the call waits for it after the attempt failed, so
    // etcdctl gives up on its own (`context deadline exceeded`) instead of retrying (etcd's
    // client retries MoveLeader on Unavailable, and every retry would hold writes again).
    let out = c
        .etcdctl(leader)
        .run(&[
            "move-leader",
            &format!("{target_id:x}"),
            "--command-timeout=5s",
        ])
        .await;
    assert!(!out.status.success(), "the transfer cannot succeed");
    assert!(
        out.stderr.contains("context deadline exceeded"),
        "{}",
        out.stderr
    );
    let attempts = c.log(leader).matches("leader transfer starting").count();
    assert_eq!(attempts, 2, "one attempt per call: etcdctl did not retry");
    leader_kept_and_writes_go_on(&c, leader, term, &load, "the second failed transfer").await;

    // The target wakes up to the stale TimeoutNows: the leader's heartbeats, resumed long
    // ago, keep it from campaigning.
    c.resume(target);
    wait_in_sync(&c).await;
    tokio::time::sleep(3 * ELECTION_TIMEOUT).await;
    assert_eq!(
        wait_all_agree(&c).await,
        leader,
        "the leader is still the leader"
    );
    for i in 0..3 {
        assert_eq!(
            c.term(i).await,
            term,
            "member {i}: no election after resuming"
        );
    }

    let ops = load.finish().await;
    check_write_history(&ops);
    wait_in_sync(&c).await;
    for i in 0..3 {
        check_acked_present(&c, i, "mt/", &ops).await;
    }
}
