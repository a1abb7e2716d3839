//! The coordinator cluster from the host: members by their published ports, the leader by the
//! Maintenance Status API, and a recorded workload (puts with unique values, linearizable gets,
//! deletes, compare-and-set txns; leases on the side) checked by `history-checker`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use history_checker as hc;
use proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::etcdserverpb::request_op::Request as Op;
use proto::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::docker::Project;

/// The coordinator services of the compose file.
pub const MEMBERS: [&str; 3] = ["coordinator-1", "coordinator-2", "coordinator-3"];

/// Bound on one request of the workload; past it the outcome is unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on one Status call: short, so that a paused or cut-off member does not slow the
/// polling that times elections (a Status on loopback takes milliseconds).
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(400);

/// One member's view, from `Maintenance/Status`.
#[derive(Clone, Copy, Debug)]
pub struct Status {
    pub member_id: u64,
    /// The leader it knows (0: none).
    pub leader: u64,
    pub term: u64,
}

/// The three members, reached through their published client ports.
pub struct Members {
    /// Channel per member; replaced by [`Members::refresh`] after a container restart, when
    /// Docker may publish the port on another host port.
    channels: Mutex<Vec<(SocketAddr, Channel)>>,
    /// Member ids, by index, learned at start.
    ids: Vec<u64>,
}

fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid endpoint")
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy()
}

impl Members {
    /// Connects to the members of `project` and learns their ids (all must answer).
    pub async fn connect(project: &Project) -> Members {
        let channels: Vec<(SocketAddr, Channel)> = MEMBERS
            .iter()
            .map(|m| {
                let addr = project.port(m, 2379);
                (addr, channel(addr))
            })
            .collect();
        let mut members = Members {
            channels: Mutex::new(channels),
            ids: Vec::new(),
        };
        let mut ids = Vec::new();
        for (i, name) in MEMBERS.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(30);
            let id = loop {
                if let Some(s) = members.status(i).await {
                    break s.member_id;
                }
                assert!(Instant::now() < deadline, "{name} answers Status");
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            ids.push(id);
        }
        members.ids = ids;
        members
    }

    /// Reads the published ports again (after `docker start` or a reconnect).
    pub fn refresh(&self, project: &Project, i: usize) {
        let addr = project.port(MEMBERS[i], 2379);
        let mut channels = self.channels.lock().expect("channels");
        if channels[i].0 != addr {
            channels[i] = (addr, channel(addr));
        }
    }

    pub fn len(&self) -> usize {
        MEMBERS.len()
    }

    fn channel(&self, i: usize) -> Channel {
        self.channels.lock().expect("channels")[i].1.clone()
    }

    pub fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(i))
    }

    pub fn lease(&self, i: usize) -> LeaseClient<Channel> {
        LeaseClient::new(self.channel(i))
    }

    /// Member `i`'s status, or `None` if it does not answer within [`STATUS_TIMEOUT`].
    pub async fn status(&self, i: usize) -> Option<Status> {
        let mut m = MaintenanceClient::new(self.channel(i));
        let r = tokio::time::timeout(STATUS_TIMEOUT, m.status(StatusRequest {}))
            .await
            .ok()?
            .ok()?
            .into_inner();
        Some(Status {
            member_id: r.header.map(|h| h.member_id).unwrap_or(0),
            leader: r.leader,
            term: r.raft_term,
        })
    }

    /// The leader now: a member that says it leads, at the highest such term, named leader by
    /// a majority of the members that answer (a deposed leader that has not noticed yet is not
    /// taken for the leader).
    pub async fn leader(&self) -> Option<usize> {
        let statuses = futures::future::join_all((0..self.len()).map(|i| self.status(i))).await;
        let (i, s) = statuses
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.filter(|s| s.leader != 0 && s.leader == s.member_id)
                    .map(|s| (i, s))
            })
            .max_by_key(|(_, s)| s.term)?;
        let agree = statuses
            .iter()
            .flatten()
            .filter(|o| o.leader == s.member_id && o.term == s.term)
            .count();
        (agree > self.len() / 2).then_some(i)
    }

    /// Polls until a leader other than `not` is found; the leader and the time since `since`.
    pub async fn wait_leader(
        &self,
        not: Option<usize>,
        since: Instant,
        timeout: Duration,
    ) -> Option<(usize, Duration)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader().await.filter(|&l| Some(l) != not) {
                return Some((l, since.elapsed()));
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the members other than `old` until one says it leads at a term above `old_term`
    /// (a member says so only after a majority voted for it); that member and the time since
    /// `since`. Only the others are asked, so a paused or cut-off old leader does not slow the
    /// polling.
    pub async fn wait_new_leader(
        &self,
        old: usize,
        old_term: u64,
        since: Instant,
        timeout: Duration,
    ) -> Option<(usize, Duration)> {
        let deadline = Instant::now() + timeout;
        let others: Vec<usize> = (0..self.len()).filter(|&i| i != old).collect();
        loop {
            let statuses = futures::future::join_all(others.iter().map(|&i| self.status(i))).await;
            let found = others.iter().zip(&statuses).find_map(|(&i, s)| {
                s.filter(|s| s.leader == s.member_id && s.term > old_term)
                    .map(|_| i)
            });
            if let Some(i) = found {
                return Some((i, since.elapsed()));
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The member id of member `i`.
    pub fn id(&self, i: usize) -> u64 {
        self.ids[i]
    }
}

/// Sends one recorded request; the response as the checker models it.
async fn perform(kv: &mut KvClient<Channel>, req: &hc::Request) -> Result<hc::Response, String> {
    let rev = |h: Option<proto::etcdserverpb::ResponseHeader>| h.map(|h| h.revision).unwrap_or(0);
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
                    revision: rev(r.header),
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
                    revision: rev(r.header),
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
                    revision: rev(r.header),
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
                    revision: rev(r.header),
                    succeeded: r.succeeded,
                }
            }
        })
    };
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
    }
}

/// Records `req` sent through `kv`. An error is an unknown outcome (a member that refused may
/// still have proposed it, and a timeout says nothing) unless the connection was never made.
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
            Err(e) if never_sent(e) => hc::Outcome::Failed,
            Err(_) => hc::Outcome::Unknown,
        },
    );
    res
}

/// Whether an error proves the request never reached a member: the connection could not be
/// made (refused, or the member is not reachable at all). Anything else may have been proposed.
fn never_sent(error: &str) -> bool {
    error.contains("tcp connect error")
}

/// What the workload did.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// KV operations sent (recorded).
    pub ops: u64,
    /// KV operations that failed or timed out (unknown outcome).
    pub failed: u64,
    /// Acknowledged writes (puts, deletes that deleted, CAS that succeeded).
    pub acked_writes: u64,
    /// Lease cycles (grant, put with the lease, keep-alive, revoke, read) completed.
    pub lease_cycles: u64,
    /// Lease steps that failed (the cycle was abandoned).
    pub lease_failed: u64,
    /// Keys still readable after their lease's revoke was acknowledged.
    pub lease_violations: u64,
    /// The first few errors, for the report.
    pub errors: Vec<String>,
    /// When each acknowledged write was answered (for how long writes stopped).
    pub acked_at: Vec<Instant>,
}

impl Counts {
    /// The longest stretch without an acknowledged write, and where it began: how long writes
    /// stopped during a fault (the workload writes about 70 times a second, so a stretch
    /// shorter than ~50 ms is the workload's own pace).
    pub fn longest_write_pause(&self) -> Option<(Instant, Duration)> {
        let mut at = self.acked_at.clone();
        at.sort();
        at.windows(2)
            .map(|w| (w[0], w[1] - w[0]))
            .max_by_key(|(_, d)| *d)
    }

    fn merge(&mut self, o: Counts) {
        self.ops += o.ops;
        self.failed += o.failed;
        self.acked_writes += o.acked_writes;
        self.lease_cycles += o.lease_cycles;
        self.lease_failed += o.lease_failed;
        self.lease_violations += o.lease_violations;
        self.acked_at.extend(o.acked_at);
        for e in o.errors {
            if self.errors.len() < 5 && !self.errors.contains(&e) {
                self.errors.push(e);
            }
        }
    }
}

/// Clients issuing a recorded mixed workload through every member in turn, and a lease client,
/// until stopped or a bound on operations is reached.
pub struct Workload {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<Counts>>,
    pub rec: Arc<hc::Recorder>,
    pub prefix: String,
    pub keys: u64,
}

/// Clients of the recorded workload.
const CLIENTS: u64 = 4;
/// Keys each workload shares among its clients.
const KEYS: u64 = 6;
/// Pause between one client's operations (4 clients: at most ~160 ops/s).
const PACE: Duration = Duration::from_millis(25);
/// Bound on one client's operations.
const MAX_OPS_PER_CLIENT: u64 = 5_000;

impl Workload {
    pub fn start(members: &Arc<Members>, prefix: &str) -> Workload {
        let stop = CancellationToken::new();
        let rec = Arc::new(hc::Recorder::new());
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let (members, rec, stop) = (members.clone(), rec.clone(), stop.clone());
            let prefix = prefix.to_string();
            tasks.push(tokio::spawn(async move {
                let mut counts = Counts::default();
                let mut at = client as usize % members.len();
                let mut kv = members.kv(at);
                let mut seen: std::collections::HashMap<Vec<u8>, i64> = Default::default();
                for seq in 0..MAX_OPS_PER_CLIENT {
                    if stop.is_cancelled() {
                        break;
                    }
                    let key = format!("{prefix}k{}", rand::random::<u64>() % KEYS).into_bytes();
                    let value = format!("{prefix}c{client}-{seq}").into_bytes();
                    let req = match rand::random::<u32>() % 20 {
                        0..=8 => hc::Request::put(key.clone(), value),
                        9..=14 => hc::Request::get(key.clone()),
                        15 => hc::Request::delete(key.clone()),
                        _ => hc::Request::cas(
                            key.clone(),
                            seen.get(&key).copied().unwrap_or(0),
                            value,
                        ),
                    };
                    counts.ops += 1;
                    match recorded(&rec, client, &mut kv, req).await {
                        Ok(r) => {
                            if r.is_mutation() {
                                counts.acked_writes += 1;
                                counts.acked_at.push(Instant::now());
                            }
                            if let hc::Response::Get { kv: got, .. } = r {
                                seen.insert(key, got.map(|g| g.mod_revision).unwrap_or(0));
                            }
                            tokio::time::sleep(PACE).await;
                        }
                        Err(e) => {
                            counts.failed += 1;
                            if counts.errors.len() < 3 && !counts.errors.contains(&e) {
                                counts.errors.push(e);
                            }
                            at = (at + 1) % members.len();
                            kv = members.kv(at);
                            // Back off: an outage would otherwise fill the history with
                            // unknown outcomes, which only widen the checker's search.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                counts
            }));
        }
        tasks.push(tokio::spawn(lease_cycles(
            members.clone(),
            format!("{prefix}lease/"),
            stop.clone(),
        )));
        Workload {
            stop,
            tasks,
            rec,
            prefix: prefix.to_string(),
            keys: KEYS,
        }
    }

    /// Stops the clients; what they did.
    pub async fn stop(self) -> (Arc<hc::Recorder>, Counts, String, u64) {
        self.stop.cancel();
        let mut total = Counts::default();
        for t in self.tasks {
            let counts = tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("a workload client stops within 20 s")
                .expect("a workload client task");
            total.merge(counts);
        }
        (self.rec, total, self.prefix, self.keys)
    }
}

/// Grant a lease, put a key under it, keep it alive once, revoke it, and read the key back
/// (linearizably): it must be gone once the revoke was acknowledged.
async fn lease_cycles(members: Arc<Members>, prefix: String, stop: CancellationToken) -> Counts {
    let mut counts = Counts::default();
    let mut at = 0usize;
    for n in 0..2_000u64 {
        if stop.is_cancelled() {
            break;
        }
        let key = format!("{prefix}{n}").into_bytes();
        let result = async {
            let mut lease = members.lease(at);
            let mut kv = members.kv(at);
            let t = |what: &'static str| move |_| format!("lease {what}: no answer in time");
            let grant = tokio::time::timeout(
                OP_TIMEOUT,
                lease.lease_grant(LeaseGrantRequest { ttl: 5, id: 0 }),
            )
            .await
            .map_err(t("grant"))?
            .map_err(|s| format!("lease grant: {}", s.message()))?
            .into_inner();
            let id = grant.id;
            tokio::time::timeout(
                OP_TIMEOUT,
                kv.put(PutRequest {
                    key: key.clone(),
                    value: b"leased".to_vec(),
                    lease: id,
                    ..Default::default()
                }),
            )
            .await
            .map_err(t("put"))?
            .map_err(|s| format!("put with lease: {}", s.message()))?;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(LeaseKeepAliveRequest { id })
                .await
                .map_err(|_| "keep-alive channel".to_string())?;
            let keep = async {
                let mut stream = lease
                    .lease_keep_alive(tokio_stream_from(rx))
                    .await?
                    .into_inner();
                stream.message().await
            };
            let ka = tokio::time::timeout(OP_TIMEOUT, keep)
                .await
                .map_err(t("keep-alive"))?
                .map_err(|s| format!("keep-alive: {}", s.message()))?;
            if ka.is_none_or(|r| r.ttl <= 0) {
                return Err("keep-alive: the lease was not found".into());
            }
            tokio::time::timeout(OP_TIMEOUT, lease.lease_revoke(LeaseRevokeRequest { id }))
                .await
                .map_err(t("revoke"))?
                .map_err(|s| format!("revoke: {}", s.message()))?;
            let got = tokio::time::timeout(
                OP_TIMEOUT,
                kv.range(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                }),
            )
            .await
            .map_err(t("read"))?
            .map_err(|s| format!("read after revoke: {}", s.message()))?
            .into_inner();
            Ok::<bool, String>(got.kvs.is_empty())
        }
        .await;
        match result {
            Ok(true) => counts.lease_cycles += 1,
            Ok(false) => {
                counts.lease_cycles += 1;
                counts.lease_violations += 1;
                counts.errors.push(format!(
                    "key {} readable after its lease was revoked",
                    String::from_utf8_lossy(&key)
                ));
            }
            Err(e) => {
                counts.lease_failed += 1;
                if counts.errors.len() < 3 && !counts.errors.contains(&e) {
                    counts.errors.push(e);
                }
                at = (at + 1) % members.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    counts
}

/// A stream of the requests sent on `rx`.
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// Reads every key of the workload once more (retrying through the members until each read
/// succeeds, within `timeout`), so a lost acknowledged write would show.
pub async fn final_reads(
    members: &Members,
    rec: &hc::Recorder,
    prefix: &str,
    keys: u64,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    for k in 0..keys {
        let key = format!("{prefix}k{k}").into_bytes();
        let mut at = 0;
        loop {
            let mut kv = members.kv(at);
            if recorded(rec, 1_000, &mut kv, hc::Request::get(key.clone()))
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "final read of {} within {timeout:?}",
                String::from_utf8_lossy(&key)
            );
            at = (at + 1) % members.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The checker's verdicts on one history.
pub struct Verdict {
    pub operations: usize,
    pub replay: hc::Report,
    pub linearizability: hc::linearizability::LinReport,
}

impl Verdict {
    pub fn lost_writes(&self) -> usize {
        self.replay
            .violations
            .iter()
            .filter(|v| v.kind == hc::ViolationKind::LostWrite)
            .count()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} ops; replay check: {} violations ({} lost acknowledged writes); linearizability: {} keys, {} violations, {} inconclusive",
            self.operations,
            self.replay.violations.len(),
            self.lost_writes(),
            self.linearizability.keys,
            self.linearizability.violations.len(),
            self.linearizability.inconclusive.len()
        )
    }
}

/// Checks `rec`'s history: the revision replay (no lost acknowledged write, no stale read,
/// real-time order) and the per-key linearizability search.
pub fn check(rec: Arc<hc::Recorder>) -> Verdict {
    let history = match Arc::try_unwrap(rec) {
        Ok(r) => r.into_history(),
        Err(shared) => shared.snapshot(),
    };
    let replay = hc::check(&history, &[], &hc::Options::default());
    // More search steps than the default: a whole-cluster outage leaves many writes of unknown
    // outcome, each of which may or may not have happened.
    let options = hc::linearizability::LinOptions {
        max_steps_per_key: 20_000_000,
    };
    let linearizability = hc::linearizability::check_history(&history, &options);
    Verdict {
        operations: history.len(),
        replay,
        linearizability,
    }
}
