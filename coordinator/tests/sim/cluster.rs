//! One simulated cluster: the members' software (the production `RaftMember`, state machine,
//! peer service and transport), its clients, and the monitors that record what each member shows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use coordinator::command::{
    Command, Compare, CompareResult, CompareTarget, DeleteReq, KeyRange, Op, PutReq, RangeReq,
    TxnReq,
};
use coordinator::error::Error;
use coordinator::lease::Lessor;
use coordinator::metrics::CoordinatorMetrics;
use coordinator::mvcc::Backend;
use coordinator::raft::log_store::{MemDisk, Storage};
use coordinator::raft::{MemberNode, RaftIo, RaftMember, RaftParts};
use coordinator::state::{Response as SmResponse, StateMachine};
use coordinator::watch::{HeaderTemplate, WatchHub};
use history_checker::{ClientId, Outcome, Recorder, Request, Response};
use parking_lot::{Mutex, RwLock};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use turmoil::net::TcpListener;

use crate::backend::{KvDisk, SimBackend};
use crate::invariants::{Observations, log_of};
use crate::net;

/// The peer port every member listens on.
pub const PEER_PORT: u16 = 2380;
/// Heartbeat interval (production default: 100 ms; halved to keep simulated runs short).
pub const HEARTBEAT: Duration = Duration::from_millis(50);
/// Election timeout (production default: 1 s; halved likewise).
pub const ELECTION: Duration = Duration::from_millis(500);
/// A client gives up on an operation after this long (its outcome is then unknown).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(8);

/// What one run is made of.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Members (3 or 5).
    pub members: usize,
    /// Clients started on each member (again after each restart).
    pub clients_per_member: usize,
    /// Operations per client.
    pub ops_per_client: usize,
    /// Keys the clients share.
    pub keys: usize,
    /// Entries between snapshots.
    pub snapshot_count: u64,
}

/// A member's software as it runs now (set at start, cleared when the host crashes).
pub struct Live {
    /// The Raft member.
    pub member: RaftMember,
    /// Its state machine.
    pub state: Arc<RwLock<StateMachine>>,
}

/// What a member keeps across crashes: its disks.
pub struct Disks {
    /// The Raft log and vote.
    pub log: MemDisk,
    /// The key space.
    pub kv: KvDisk,
    /// How many times its software started.
    pub starts: AtomicU64,
}

/// Everything the simulation shares with the members' software. All of it is touched from the
/// one thread that runs the simulation, so locks never contend.
pub struct Shared {
    /// The run's seed.
    pub seed: u64,
    /// The run's shape.
    pub shape: Shape,
    /// Per member: its disks.
    pub disks: Vec<Disks>,
    /// Per member: its running software.
    pub live: Vec<Mutex<Option<Live>>>,
    /// What the monitors saw.
    pub obs: Mutex<Observations>,
    /// The client history.
    pub rec: Recorder,
    /// Clients stop issuing operations.
    pub stop_clients: AtomicBool,
    /// Clients running now.
    pub active_clients: AtomicUsize,
    /// Next client id.
    pub next_client: AtomicU64,
    /// Start the final reads.
    pub final_reads: AtomicBool,
    /// The final reads are done.
    pub final_done: AtomicBool,
    /// Next unique value.
    pub next_value: AtomicU64,
    /// Record a line per client operation and leadership change (`SIM_VERBOSE`).
    pub verbose: bool,
    /// Those lines.
    pub events: Mutex<Vec<String>>,
    /// A leader transfer the driver asks for (target member id), taken by whichever member
    /// leads next (as `etcdctl move-leader` finds the leader).
    pub transfer_to: Mutex<Option<u64>>,
    /// Leader transfers to another member that succeeded.
    pub transfers_ok: AtomicUsize,
    /// Leader transfers that failed (timed out, leadership lost, target refused).
    pub transfers_failed: AtomicUsize,
}

impl Shared {
    /// Fresh disks for every member; with `lying`, log disks whose fsync lies.
    pub fn new(seed: u64, shape: Shape, lying: bool) -> Arc<Shared> {
        let disks = (0..shape.members)
            .map(|i| Disks {
                log: if lying {
                    MemDisk::lying(mix(seed, 100 + i as u64), Duration::from_millis(3))
                } else {
                    MemDisk::new(mix(seed, 100 + i as u64), Duration::from_millis(3))
                },
                kv: KvDisk::new(mix(seed, 200 + i as u64), 0.3),
                starts: AtomicU64::new(0),
            })
            .collect();
        let live = (0..shape.members).map(|_| Mutex::new(None)).collect();
        Arc::new(Shared {
            seed,
            shape,
            disks,
            live,
            obs: Mutex::new(Observations::default()),
            rec: Recorder::new(),
            stop_clients: AtomicBool::new(false),
            active_clients: AtomicUsize::new(0),
            next_client: AtomicU64::new(1),
            final_reads: AtomicBool::new(false),
            final_done: AtomicBool::new(false),
            next_value: AtomicU64::new(1),
            verbose: std::env::var_os("SIM_VERBOSE").is_some(),
            events: Mutex::new(Vec::new()),
            transfer_to: Mutex::new(None),
            transfers_ok: AtomicUsize::new(0),
            transfers_failed: AtomicUsize::new(0),
        })
    }

    /// Record an event line (when verbose), stamped with the simulated time.
    pub fn note(&self, what: impl FnOnce() -> String) {
        if self.verbose {
            let t = turmoil::sim_elapsed().unwrap_or_default().as_millis();
            self.events.lock().push(format!("{t:>6} ms  {}", what()));
        }
    }
}

/// What a member shows of itself, for event lines.
fn status(member: &RaftMember, state: &RwLock<StateMachine>) -> String {
    let m = member.raft().metrics().borrow().clone();
    let st = state.read();
    format!(
        "[n{} {:?} vote {} leader {:?} applied {:?} rev {}]",
        member.id(),
        m.state,
        m.vote,
        m.current_leader,
        m.last_applied.map(|l| l.index),
        st.revision()
    )
}

/// Host name of member `i` (0-based).
pub fn host(i: usize) -> String {
    format!("n{}", i + 1)
}

/// A seed for one consumer of randomness, derived from the run's seed.
pub fn mix(seed: u64, stream: u64) -> u64 {
    // splitmix64
    let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The software of member `i`: started at boot and again after every simulated restart.
pub async fn member_main(sh: Arc<Shared>, i: usize) -> turmoil::Result {
    let start = sh.disks[i].starts.fetch_add(1, Ordering::SeqCst);
    let id = i as u64 + 1;
    let backend: Arc<dyn Backend> =
        Arc::new(SimBackend::open(&sh.disks[i].kv).map_err(|e| e.to_string())?);
    let state = Arc::new(RwLock::new(
        StateMachine::open(backend).map_err(|e| e.to_string())?,
    ));
    let hub = WatchHub::new(
        state.clone(),
        HeaderTemplate {
            cluster_id: 1,
            member_id: id,
            raft_term: 0,
        },
        tokio::runtime::Handle::current(),
    );
    let metrics = CoordinatorMetrics::register(&service_kit::admin::Metrics::new());
    let initial: BTreeMap<u64, MemberNode> = (0..sh.shape.members)
        .map(|j| {
            (
                j as u64 + 1,
                MemberNode {
                    name: host(j),
                    peer_url: format!("http://{}:{PEER_PORT}", host(j)),
                },
            )
        })
        .collect();
    let listener = TcpListener::bind(("0.0.0.0", PEER_PORT)).await?;
    let member = RaftMember::start(RaftParts {
        id,
        me: initial[&id].clone(),
        initial,
        bootstrap: true,
        removed: CancellationToken::new(),
        snapshot_count: sh.shape.snapshot_count,
        token: "sim".into(),
        io: RaftIo {
            log: Storage::Memory(sh.disks[i].log.clone()),
            connect: net::connector(),
            seed: Some(mix(sh.seed, 1000 * (start + 1) + id)),
            inline_snapshots: true,
        },
        election_timeout: ELECTION,
        heartbeat: HEARTBEAT,
        state: state.clone(),
        hub,
        lessor: Arc::new(Lessor::new()),
        metrics,
    })
    .await
    .map_err(|e| e.to_string())?;

    let svc = proto::peerpb::peer_server::PeerServer::new(member.peer_service())
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(256 * 1024 * 1024);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(net::incoming(listener))
            .await;
    });
    *sh.live[i].lock() = Some(Live {
        member: member.clone(),
        state: state.clone(),
    });
    tokio::spawn(monitor(sh.clone(), id, member.clone()));
    tokio::spawn(transfer_agent(sh.clone(), id, member.clone()));
    if !sh.stop_clients.load(Ordering::SeqCst) {
        for _ in 0..sh.shape.clients_per_member {
            let cid = sh.next_client.fetch_add(1, Ordering::SeqCst);
            let rng = StdRng::seed_from_u64(mix(sh.seed, 10_000 + cid));
            tokio::spawn(client(
                sh.clone(),
                member.clone(),
                state.clone(),
                ClientId(cid),
                rng,
            ));
        }
    }
    if i == 0 {
        tokio::spawn(final_reads(sh.clone(), member.clone(), state.clone()));
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// Records what member `id` shows of itself each time its metrics change: its term, whether
/// it leads (and then whether its log holds every committed entry), and the entries it applied.
async fn monitor(sh: Arc<Shared>, id: u64, member: RaftMember) {
    let mut rx = member.raft().metrics();
    let mut led: Option<(u64, u64)> = None;
    let mut recorded: Option<u64> = None;
    loop {
        let m = rx.borrow_and_update().clone();
        {
            let mut obs = sh.obs.lock();
            obs.note_term(id, m.current_term);
            let leads = m.state == openraft::ServerState::Leader && m.current_leader == Some(id);
            let leader = (m.vote.leader_id.term, m.vote.leader_id.node_id);
            if leads && led != Some(leader) {
                led = Some(leader);
                sh.note(|| format!("n{id} leads with {leader:?}"));
                obs.note_leader(leader, m.vote.committed, id);
                let log = log_of(&member.log_store().entries(..));
                obs.check_new_leader(leader, &log, m.purged.map(|p| p.index));
            }
            if let Some(applied) = m.last_applied {
                let from = recorded.map(|r| r + 1).unwrap_or(0);
                if applied.index >= from {
                    let log = log_of(&member.log_store().entries(from..=applied.index));
                    obs.note_applied(id, &log);
                    recorded = Some(applied.index);
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Carries out the driver's leader transfers: the member that leads when one is asked for calls
/// `move_leader` (what `MoveLeader` runs), while the clients and the nemesis go on.
async fn transfer_agent(sh: Arc<Shared>, id: u64, member: RaftMember) {
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if !member.is_leader() {
            continue;
        }
        let Some(target) = sh.transfer_to.lock().take() else {
            continue;
        };
        let r = member.move_leader(target, None).await;
        sh.note(|| format!("n{id} move-leader to n{target}: {r:?}"));
        // Moving to itself is a no-op; not counted.
        match r {
            Ok(()) if target != id => sh.transfers_ok.fetch_add(1, Ordering::SeqCst),
            Ok(()) => 0,
            Err(_) => sh.transfers_failed.fetch_add(1, Ordering::SeqCst),
        };
    }
}

/// Counts a running client; dropped when it ends or its host crashes.
struct Active(Arc<Shared>);

impl Active {
    fn new(sh: &Arc<Shared>) -> Active {
        sh.active_clients.fetch_add(1, Ordering::SeqCst);
        Active(sh.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active_clients.fetch_sub(1, Ordering::SeqCst);
    }
}

fn key(k: usize) -> Vec<u8> {
    format!("k{k}").into_bytes()
}

/// A client session on one member: random puts, linearizable gets, deletes and
/// compare-and-sets on a few shared keys, each recorded with its outcome.
async fn client(
    sh: Arc<Shared>,
    member: RaftMember,
    state: Arc<RwLock<StateMachine>>,
    cid: ClientId,
    mut rng: StdRng,
) {
    let _active = Active::new(&sh);
    sh.note(|| format!("c{} starts on n{}", cid.0, member.id()));
    // The last mod_revision this client saw per key: what its compare-and-sets expect.
    let mut seen: HashMap<usize, i64> = HashMap::new();
    for _ in 0..sh.shape.ops_per_client {
        if sh.stop_clients.load(Ordering::SeqCst) {
            return;
        }
        let k = rng.random_range(0..sh.shape.keys);
        let roll = rng.random_range(0..100);
        if roll < 35 {
            get(&sh, &member, &state, cid, k, &mut seen).await;
        } else {
            let value = format!("v{}", sh.next_value.fetch_add(1, Ordering::SeqCst)).into_bytes();
            let (req, cmd) = if roll < 75 {
                (
                    Request::put(key(k), value.clone()),
                    Command::Put(PutReq {
                        key: key(k),
                        value,
                        ..Default::default()
                    }),
                )
            } else if roll < 85 {
                (
                    Request::delete(key(k)),
                    Command::Delete(DeleteReq {
                        range: KeyRange::single(key(k)),
                        prev_kv: false,
                    }),
                )
            } else {
                let expected = seen.get(&k).copied().unwrap_or(0);
                (
                    Request::cas(key(k), expected, value.clone()),
                    Command::Txn(TxnReq {
                        compare: vec![Compare {
                            range: KeyRange::single(key(k)),
                            result: CompareResult::Equal,
                            target: CompareTarget::Mod(expected),
                        }],
                        success: vec![Op::Put(PutReq {
                            key: key(k),
                            value,
                            ..Default::default()
                        })],
                        failure: vec![],
                    }),
                )
            };
            let op = sh.rec.invoke(cid, req);
            let res = tokio::time::timeout(CLIENT_TIMEOUT, member.propose(cmd)).await;
            let outcome = match res {
                Err(_) => Outcome::Unknown,
                Ok(Err(Error::NoLeader)) => Outcome::Failed,
                Ok(Err(_)) => Outcome::Unknown,
                Ok(Ok((rev, Ok(SmResponse::Put(_))))) => {
                    seen.insert(k, rev);
                    Outcome::Ok(Response::Put { revision: rev })
                }
                Ok(Ok((rev, Ok(SmResponse::Delete(d))))) => {
                    if d.deleted > 0 {
                        seen.insert(k, 0);
                    }
                    Outcome::Ok(Response::Delete {
                        revision: rev,
                        deleted: d.deleted,
                    })
                }
                Ok(Ok((rev, Ok(SmResponse::Txn(t))))) => {
                    if t.succeeded {
                        seen.insert(k, rev);
                    }
                    Outcome::Ok(Response::Cas {
                        revision: rev,
                        succeeded: t.succeeded,
                    })
                }
                // Refused by the state machine: nothing changed.
                Ok(Ok((_, Err(_)))) => Outcome::Failed,
                Ok(Ok((_, Ok(_)))) => Outcome::Unknown,
            };
            sh.note(|| {
                format!(
                    "c{} #{} {:?} -> {:?} {}",
                    cid.0,
                    op.0,
                    sh.rec.snapshot().op(op).request,
                    outcome,
                    status(&member, &state)
                )
            });
            sh.rec.complete(op, outcome);
        }
        let pause = rng.random_range(0..60);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// A linearizable read of one key, as the KV adapter serves it: the read barrier, then the
/// local state machine. Returns whether it succeeded.
async fn get(
    sh: &Shared,
    member: &RaftMember,
    state: &RwLock<StateMachine>,
    cid: ClientId,
    k: usize,
    seen: &mut HashMap<usize, i64>,
) -> bool {
    let op = sh.rec.invoke(cid, Request::get(key(k)));
    let barrier = tokio::time::timeout(CLIENT_TIMEOUT, member.read_barrier()).await;
    if !matches!(barrier, Ok(Ok(()))) {
        sh.rec.complete(op, Outcome::Failed);
        return false;
    }
    let req = RangeReq {
        range: KeyRange::single(key(k)),
        ..Default::default()
    };
    let read = state.read().store().range(&req);
    sh.note(|| {
        format!(
            "c{} #{} get k{k} -> {:?} {}",
            cid.0,
            op.0,
            read.as_ref().map(|r| (
                r.revision,
                r.kvs.first().map(|kv| (
                    kv.mod_revision,
                    String::from_utf8_lossy(&kv.value).to_string()
                ))
            )),
            status(member, state)
        )
    });
    match read {
        Ok(r) => {
            let resp = match r.kvs.first() {
                Some(kv) => {
                    seen.insert(k, kv.mod_revision);
                    Response::found(r.revision, kv.value.clone(), kv.mod_revision, kv.version)
                }
                None => {
                    seen.insert(k, 0);
                    Response::absent(r.revision)
                }
            };
            sh.rec.complete(op, Outcome::Ok(resp));
            true
        }
        Err(_) => {
            sh.rec.complete(op, Outcome::Failed);
            false
        }
    }
}

/// After the faults: one linearizable read of every key (retried until it succeeds), so that a
/// lost acknowledged write shows.
async fn final_reads(sh: Arc<Shared>, member: RaftMember, state: Arc<RwLock<StateMachine>>) {
    while !sh.final_reads.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cid = ClientId(sh.next_client.fetch_add(1, Ordering::SeqCst));
    let mut seen = HashMap::new();
    for k in 0..sh.shape.keys {
        while !get(&sh, &member, &state, cid, k, &mut seen).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    sh.final_done.store(true, Ordering::SeqCst);
}
