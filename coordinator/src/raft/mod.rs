//! Replication: the same state machine, ordered by Raft (openraft 0.9) across members.
//!
//! - [`log_store`]: the Raft log and vote, fsynced, with group commit.
//! - [`sm`]: the state machine store (the same `apply` as single-member mode) and snapshots.
//! - [`network`]: openraft's messages over our `peerpb.Peer` gRPC service on the peer port.
//! - [`batch`]: the leader's batcher, which proposes the commands that arrive while an entry is
//!   in flight as one entry.
//! - this module: [`RaftMember`] — what the gRPC adapters call — and the peer service.
//!
//! # Behaviour clients see
//! - Any member takes any request. A write on a follower is forwarded to the leader over the
//!   peer port; when no leader is known it waits up to [`PROPOSE_WAIT`], then answers
//!   `etcdserver: no leader`.
//! - A linearizable read asks the leader for a read index (the leader confirms it still leads
//!   with a quorum round), waits until this member applied that far, then reads locally.
//!   Serializable reads are served locally at once.
//! - Leases: only the leader keeps deadlines; keep-alives on a follower are forwarded. On
//!   becoming leader a member gives every lease its full TTL plus one election timeout (etcd does
//!   the same), so no lease expires early because of an election.
//!
//! # Elections
//! openraft 0.9 draws its election timeout once per process, so two members with close draws
//! could split votes forever. We switch its timer off (`enable_elect = false`) and run our own:
//! a follower that has heard nothing from a leader (append-entries or a vote it granted) for a
//! timeout drawn afresh in `[election, 2 × election)` before *every* campaign calls
//! `trigger().elect()`.
//!
//! # Leader transfer (`etcdctl move-leader`)
//! openraft 0.9 has no leader transfer, so [`RaftMember::move_leader`] builds Raft's
//! TimeoutNow from what it offers. The leader stops everything that reaches followers: its
//! batcher holds new writes and waits until the entries it proposed are answered, linearizable
//! read rounds (which send heartbeats) wait, and openraft's heartbeats are switched off
//! (`runtime_config().heartbeat(false)`). Once openraft's metrics show the transferee matched
//! the leader's last log index, the leader sends it `TimeoutNow` over the peer service. The
//! transferee skips pre-vote and calls `trigger().elect()` as soon as openraft's vote lease
//! (`election_timeout_max`, ET/2: a follower refuses every vote request for that long after it
//! last heard from the leader) has run out, counted from its own last contact with the leader
//! plus one heartbeat interval of slack for members that heard a little later than it did.
//! Its term goes up by one; the old leader, whose own lease ran out long ago (openraft renews a
//! leader's only when it is elected), grants the vote with every member whose lease ran out,
//! and steps down. The call returns when the old leader's metrics name the transferee as
//! leader. An attempt is given up after [`RaftMember::transfer_timeout`]; then, as etcd does,
//! the call keeps waiting (the leader serving as usual) until the caller's gRPC deadline before
//! it fails with etcd's `etcdserver: request timed out, leader transfer took too long`, because
//! etcd's client retries `MoveLeader` on that `Unavailable` while its deadline lasts. Either way
//! heartbeats, reads and the batcher resume (a drop guard, so also when the client hangs up
//! mid-attempt): the held writes are proposed, and if leadership moved openraft refuses them
//! before they enter any log and they are forwarded to the new leader, so none is lost or
//! applied twice.
//!
//! A TimeoutNow read late (the transferee was paused or cut off while it waited in a socket,
//! and the leader gave up long ago) must not start a campaign: right before `elect` the
//! transferee asks the leader (`ConfirmTransfer`) whether the attempt to it is still on and its
//! log still matches; no answer or no means no campaign. (The leader's resumed heartbeats
//! alone did not hold it back: under load they took longer than a vote lease to get through
//! after the transferee resumed.)
//!
//! Why no other member campaigns in between: our election timer fires no sooner than one
//! election timeout (ET) after a member last heard from the leader, while the transferee
//! campaigns ET/2 plus one heartbeat interval after it last did. The leader's last messages
//! (heartbeats, commit notices) go to every member at once, so a member hears last at most
//! about one heartbeat interval before the transferee; with ET ≥ 5 heartbeat intervals
//! (checked at start-up) the transferee is first by at least half a heartbeat interval. And
//! a pre-vote in that window needs a majority, but the leader refuses pre-votes while it leads,
//! and the transferee refuses every pre-vote from TimeoutNow until its own campaign.

pub mod batch;
pub mod log_store;
pub mod network;
pub mod sm;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{Raft, ServerState};
use parking_lot::{Mutex, RwLock};
use proto::peerpb::Blob;
use proto::peerpb::peer_client::PeerClient;
use proto::peerpb::peer_server::Peer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
// Tokio's clock (the OS's monotonic clock in production) so that a simulation's clock drives
// elections and deadlines too.
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::command::Command;
use crate::error::{Error, Result};
use crate::lease::Lessor;
use crate::metrics::CoordinatorMetrics;
use crate::state::{OutcomeWire, OutcomeWireExt, StateMachine};
use crate::watch::WatchHub;
use batch::WriteFailed;

/// How long a write waits for a leader before `etcdserver: no leader`.
pub const PROPOSE_WAIT: Duration = Duration::from_secs(5);

// The types of the log format (what an entry holds, what applying it answers) live in
// `coord-log`, so the fuzz targets can build them without the server; re-exported here.
pub use coord_log::raft::{EntryOutcome, MemberNode, TypeConfig};

/// A pre-vote request: the candidate and its last log id.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PreVoteRequest {
    candidate: u64,
    last_log: Option<openraft::LogId<u64>>,
}

/// A pre-vote answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum PreVoteAnswer {
    Granted,
    Refused,
    /// The candidate is not in the receiver's membership (it was removed).
    NotAMember,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreVoteOutcome {
    Go,
    Lost,
    Removed,
}

/// The leader's request to the transferee of a leader transfer: campaign now.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TimeoutNowRequest {
    /// The leader asking.
    leader: u64,
    /// Its term: a transferee that has moved on to another term ignores the request.
    term: u64,
    /// The leader's last log id, which the transferee must hold.
    last_log: Option<openraft::LogId<u64>>,
}

/// The transferee's last question before campaigning: is the transfer still on?
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConfirmTransferRequest {
    /// The member asking.
    transferee: u64,
    /// The leader's term, from the TimeoutNow.
    term: u64,
    /// The transferee's last log id.
    last_log: Option<openraft::LogId<u64>>,
}

/// Why a forwarded request failed on the member it was sent to.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum PeerError {
    /// That member is not the leader (maybe it knows who is).
    NotLeader(Option<u64>),
    /// Anything else.
    Failed(String),
}

/// What a member needs to join or form a cluster.
pub struct RaftParts {
    /// This member's id.
    pub id: u64,
    /// This member's name and peer URL.
    pub me: MemberNode,
    /// Every initial member (id → node), this one included.
    pub initial: BTreeMap<u64, MemberNode>,
    /// `--initial-cluster-state new`: initialise the cluster if this member's log is empty.
    pub bootstrap: bool,
    /// Cancelled when this member learns it was removed from the cluster.
    pub removed: CancellationToken,
    /// Applied entries between snapshots.
    pub snapshot_count: u64,
    /// Cluster token (member ids derive from it).
    pub token: String,
    /// Where the log lives, how peers are reached, where randomness comes from.
    pub io: RaftIo,
    /// Election timeout.
    pub election_timeout: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// The opened state machine, watch hub, lessor, metrics.
    pub state: Arc<RwLock<StateMachine>>,
    /// Watch hub.
    pub hub: Arc<WatchHub>,
    /// Lease deadlines.
    pub lessor: Arc<Lessor>,
    /// Metrics.
    pub metrics: CoordinatorMetrics,
}

/// The member's outside world. Production: [`RaftIo::production`]. The deterministic simulation
/// (`coordinator/tests/sim`) passes a simulated disk, a simulated network and a seed; everything
/// else is the same code.
pub struct RaftIo {
    /// Where the Raft log and vote live.
    pub log: log_store::Storage,
    /// How channels to peers are opened.
    pub connect: network::Connector,
    /// Seed for election timeout draws; `None` seeds from the operating system.
    pub seed: Option<u64>,
    /// Build snapshots on the Raft task instead of a blocking thread (only for in-memory
    /// backends, which never wait on a disk).
    pub inline_snapshots: bool,
}

impl RaftIo {
    /// The log and vote on disk in `dir`, peers over TCP, randomness from the OS.
    pub fn production(dir: std::path::PathBuf) -> RaftIo {
        RaftIo {
            log: log_store::Storage::Dir(dir),
            connect: network::tcp(),
            seed: None,
            inline_snapshots: false,
        }
    }
}

struct Inner {
    id: u64,
    raft: Raft<TypeConfig>,
    /// Every write this member makes as leader goes through here.
    batcher: batch::Batcher,
    state: Arc<RwLock<StateMachine>>,
    lessor: Arc<Lessor>,
    sm: sm::SmStore,
    log: log_store::LogStore,
    peers: Mutex<HashMap<u64, PeerClient<Channel>>>,
    /// Per peer: calls in a row that timed out (see [`network::REPLACE_AFTER_TIMEOUTS`]).
    peer_timeouts: Mutex<HashMap<u64, u32>>,
    connect: network::Connector,
    rng: Mutex<StdRng>,
    last_heartbeat: Mutex<Instant>,
    /// Where this member's own campaign stands; pre-vote answers read it to break ties.
    campaign: Mutex<Campaign>,
    election_timeout: Duration,
    /// Heartbeat interval.
    heartbeat: Duration,
    /// openraft's vote lease (`election_timeout_max`): how long a follower refuses every vote
    /// request after it last heard from the leader.
    vote_lease: Duration,
    /// Held by a leader transfer for its whole length, and by membership changes: one at a time.
    transfer: tokio::sync::Mutex<()>,
    /// On the leader, while an attempt waits for the transferee's campaign: its id. The
    /// transferee confirms with it before campaigning (see `ConfirmTransfer`).
    transferring_to: Mutex<Option<u64>>,
    /// Read-index rounds on the leader hold it shared; a leader transfer holds it exclusively, so
    /// no round sends heartbeats while followers' vote leases run out.
    read_gate: tokio::sync::RwLock<()>,
    stop: CancellationToken,
    token: String,
    hub: Arc<WatchHub>,
    removed: CancellationToken,
    reads: Mutex<ReadRounds>,
    /// The leader id openraft restored this member to at start-up, until an entry proposed by
    /// this process under it committed (see [`RaftMember::leader_read_index`]).
    restored_leader: Mutex<Option<openraft::LeaderId<u64>>>,
}

/// This member's own campaign, as far as other members' pre-votes care.
///
/// Two survivors whose timers fire within one round trip both win their pre-votes (each grants
/// the other before its own answer came back), both call `elect` at the same term and split the
/// vote; under CI load that repeated and pushed an election past 3 s. So while a pre-vote is in
/// flight, a peer with an equal log is granted only if its id is lower (and then we step back),
/// and for a short while after our own `elect` every pre-vote is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Campaign {
    Idle,
    /// Our pre-vote is out; `yielded` once we granted another candidate's.
    PreVoting {
        yielded: bool,
    },
    /// We called `elect` at this instant.
    Electing {
        at: Instant,
    },
    /// The leader asked us to take over (TimeoutNow); we campaign once the vote lease ran out.
    Transferee,
}

impl Campaign {
    /// The answer to a pre-vote from a candidate whose log is at least as long as ours (so it
    /// would be granted but for our own campaign). Ties between two campaigns: the longer log
    /// wins, then the lower id; for `electing_window` after our own `elect`, every pre-vote is
    /// refused (our vote requests are on their way).
    fn answer(
        &mut self,
        their_log_longer: bool,
        their_id_lower: bool,
        electing_window: Duration,
    ) -> PreVoteAnswer {
        match *self {
            Campaign::Electing { at } if at.elapsed() < electing_window => PreVoteAnswer::Refused,
            // Our campaign is due any moment, with the leader's blessing: a second one would
            // split the vote.
            Campaign::Transferee => PreVoteAnswer::Refused,
            Campaign::PreVoting { .. } if !their_log_longer && !their_id_lower => {
                PreVoteAnswer::Refused
            }
            Campaign::PreVoting { .. } => {
                *self = Campaign::PreVoting { yielded: true };
                PreVoteAnswer::Granted
            }
            Campaign::Idle | Campaign::Electing { .. } => PreVoteAnswer::Granted,
        }
    }
}

#[derive(Default)]
struct ReadRounds {
    waiting: Vec<tokio::sync::oneshot::Sender<Option<u64>>>,
    running: bool,
}

/// A member of a replicated coordinator. Cheap to clone.
#[derive(Clone)]
pub struct RaftMember {
    inner: Arc<Inner>,
}

/// The outcome of a proposal, in process.
pub type Outcome = (i64, Result<crate::state::Response>);

impl RaftMember {
    /// Open the log, start openraft, and (for a new cluster) initialise the membership.
    pub async fn start(p: RaftParts) -> anyhow::Result<RaftMember> {
        let log = log_store::LogStore::open_storage(p.io.log, p.id)?;
        let sm = sm::SmStore::new(
            p.state.clone(),
            p.hub.clone(),
            p.lessor.clone(),
            p.metrics.clone(),
            p.io.inline_snapshots,
            p.snapshot_count,
            log.durability(),
        )?;
        let rng = match p.io.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let et = p.election_timeout.as_millis() as u64;
        let vote_lease_ms = (et / 2).max(p.heartbeat.as_millis() as u64 + 2);
        let config = openraft::Config {
            cluster_name: "coordinator".into(),
            heartbeat_interval: p.heartbeat.as_millis() as u64,
            // openraft's own timer is off; these two only set how long a follower refuses votes
            // after a heartbeat (its "leader lease" = the max). Keep that well below our smallest
            // draw (one election timeout), so heartbeat skew between followers never makes the
            // first campaign fail; pre-vote is what keeps disruptive candidates out.
            election_timeout_min: (et / 4).max(p.heartbeat.as_millis() as u64 + 1),
            election_timeout_max: vote_lease_ms,
            enable_elect: false,
            install_snapshot_timeout: 10_000,
            max_payload_entries: 1024,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(p.snapshot_count),
            max_in_snapshot_log_to_keep: (p.snapshot_count / 10).max(10),
            purge_batch_size: 512,
            ..Default::default()
        }
        .validate()?;
        let raft = Raft::new(
            p.id,
            Arc::new(config),
            network::Network::new(p.io.connect.clone(), log.durability()),
            log.clone(),
            sm.clone(),
        )
        .await?;
        if p.bootstrap && !raft.is_initialized().await? {
            // Every initial member may call this with the same membership; it is a no-op where a
            // log already exists.
            if let Err(e) = raft.initialize(p.initial.clone()).await {
                tracing::info!(error = %e, "cluster already initialised");
            }
        }
        let stop = CancellationToken::new();
        let batcher = batch::Batcher::start(raft.clone(), p.metrics.clone(), stop.clone());
        let member = RaftMember {
            inner: Arc::new(Inner {
                id: p.id,
                raft,
                batcher,
                state: p.state,
                lessor: p.lessor,
                sm,
                log,
                peers: Mutex::new(HashMap::new()),
                peer_timeouts: Mutex::new(HashMap::new()),
                connect: p.io.connect,
                rng: Mutex::new(rng),
                last_heartbeat: Mutex::new(Instant::now()),
                campaign: Mutex::new(Campaign::Idle),
                election_timeout: p.election_timeout,
                heartbeat: p.heartbeat,
                vote_lease: Duration::from_millis(vote_lease_ms),
                transfer: tokio::sync::Mutex::new(()),
                transferring_to: Mutex::new(None),
                read_gate: tokio::sync::RwLock::new(()),
                stop,
                token: p.token,
                hub: p.hub.clone(),
                removed: p.removed,
                reads: Mutex::new(ReadRounds::default()),
                restored_leader: Mutex::new(None),
            }),
        };
        // Asked of openraft's core (not its metrics, which it publishes later): a member that
        // restarted as leader is one from its first moment.
        let restored = member
            .inner
            .raft
            .with_raft_state(|st| {
                (st.server_state == ServerState::Leader).then_some(st.vote_ref().leader_id)
            })
            .await?;
        if let Some(leader_id) = restored {
            *member.inner.restored_leader.lock() = Some(leader_id);
            tokio::spawn(member.clone().confirm_restored_leadership(leader_id));
        }
        tokio::spawn(member.clone().snapshot_timer());
        tokio::spawn(member.clone().election_timer());
        tokio::spawn(member.clone().leadership_watch());
        Ok(member)
    }

    /// The election timeout.
    pub fn election_timeout(&self) -> Duration {
        self.inner.election_timeout
    }

    /// This member's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The openraft handle (membership changes, metrics).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.inner.raft
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow().current_term
    }

    /// The leader this member knows of.
    pub fn leader(&self) -> Option<u64> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// Whether this member leads.
    pub fn is_leader(&self) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.inner.id)
    }

    /// Last log index this member holds.
    pub fn last_log_index(&self) -> u64 {
        self.inner
            .raft
            .metrics()
            .borrow()
            .last_log_index
            .unwrap_or(0)
    }

    /// Members: (id, node, is_learner).
    pub fn members(&self) -> Vec<(u64, MemberNode, bool)> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        let voters: std::collections::BTreeSet<u64> = m.membership().voter_ids().collect();
        m.membership()
            .nodes()
            .map(|(id, n)| (*id, n.clone(), !voters.contains(id)))
            .collect()
    }

    fn node_of(&self, id: u64) -> Option<MemberNode> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).cloned()
    }

    fn peer(&self, id: u64) -> Result<PeerClient<Channel>> {
        if let Some(c) = self.inner.peers.lock().get(&id) {
            return Ok(c.clone());
        }
        let node = self.node_of(id).ok_or(Error::NoLeader)?;
        let ch = (self.inner.connect)(&node.peer_url)
            .map_err(|e| Error::InvalidArgument(format!("bad peer URL {}: {e}", node.peer_url)))?;
        let c = PeerClient::new(ch)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        self.inner.peers.lock().insert(id, c.clone());
        Ok(c)
    }

    /// A call to `id` timed out: after a few in a row, the next call uses a new connection.
    fn peer_timed_out(&self, id: u64) {
        let mut t = self.inner.peer_timeouts.lock();
        let n = t.entry(id).or_insert(0);
        *n += 1;
        if *n >= network::REPLACE_AFTER_TIMEOUTS {
            *n = 0;
            self.inner.peers.lock().remove(&id);
        }
    }

    /// `id` answered a call.
    fn peer_answered(&self, id: u64) {
        self.inner.peer_timeouts.lock().remove(&id);
    }

    /// Wait (bounded) for a leader to be known; `None` if none appears in time.
    async fn wait_leader(&self, deadline: Instant) -> Option<u64> {
        let mut rx = self.inner.raft.metrics();
        loop {
            if let Some(l) = rx.borrow().current_leader {
                return Some(l);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if tokio::time::timeout(left, rx.changed()).await.is_err() {
                return None;
            }
        }
    }

    /// Propose a command only if this member leads, never forwarding it: for decisions only
    /// the leader may take (lease expiry, made from its own clock). A member that believed it
    /// led while cut off (partitioned, paused) must not have such a decision committed by the
    /// real leader once it reconnects: its proposal stays in its own log and is overwritten
    /// there. `NoLeader` when it does not lead (or stops leading before the entry commits).
    pub async fn propose_as_leader(&self, cmd: Command) -> Result<Outcome> {
        if !self.is_leader() {
            return Err(Error::NoLeader);
        }
        match self.inner.batcher.write(cmd).await {
            Ok(o) => Ok(o.into_result()),
            Err(WriteFailed::Timeout) => Err(Error::Timeout),
            Err(WriteFailed::Raft(e)) => match *e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Err(Error::NoLeader),
                RaftError::APIError(e) => Err(Error::Unsupported(e.to_string())),
                RaftError::Fatal(_) => Err(Error::Stopped),
            },
        }
    }

    /// Propose a command; forwarded to the leader when this member does not lead.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome> {
        let deadline = Instant::now() + PROPOSE_WAIT;
        loop {
            let Some(leader) = self.wait_leader(deadline).await else {
                return Err(Error::NoLeader);
            };
            if leader == self.inner.id {
                match self.inner.batcher.write(cmd.clone()).await {
                    Ok(o) => return Ok(o.into_result()),
                    // A leader cut off from its quorum never commits: the outcome is unknown.
                    Err(WriteFailed::Timeout) => return Err(Error::Timeout),
                    Err(WriteFailed::Raft(e)) => match *e {
                        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {}
                        RaftError::APIError(e) => return Err(Error::Unsupported(e.to_string())),
                        RaftError::Fatal(_) => return Err(Error::Stopped),
                    },
                }
            } else {
                let data = bincode::serialize(&cmd)
                    .map_err(|e| Error::InvalidArgument(format!("unencodable command: {e}")))?;
                let mut c = self.peer(leader)?;
                // The leader answers within PROPOSE_WAIT; no answer at all means a dead
                // connection, and the write may have been applied: outcome unknown.
                let call = c.forward(Blob { data });
                let Ok(answer) =
                    tokio::time::timeout(PROPOSE_WAIT + self.inner.election_timeout, call).await
                else {
                    self.peer_timed_out(leader);
                    return Err(Error::Timeout);
                };
                self.peer_answered(leader);
                match answer {
                    Ok(r) => {
                        let res: std::result::Result<OutcomeWire, PeerError> =
                            bincode::deserialize(&r.into_inner().data)?;
                        match res {
                            Ok(o) => return Ok(o.into_result()),
                            Err(PeerError::NotLeader(_)) => {}
                            Err(PeerError::Failed(m)) => {
                                return Err(Error::from_wire(crate::state::ErrorWire {
                                    code: tonic::Code::Unavailable as i32,
                                    message: m,
                                    compact_revision: 0,
                                }));
                            }
                        }
                    }
                    // Could not connect: the write never left, so wait for the next leader.
                    Err(s) if is_connect_error(&s) => {
                        tracing::debug!(leader, error = %s, "leader unreachable; waiting for the next");
                        self.inner.peers.lock().remove(&leader);
                    }
                    // The connection broke after the write was sent: the leader may have applied
                    // it, so the outcome is unknown; answer with etcd's text, not a retry.
                    Err(s) => {
                        tracing::warn!(leader, error = %s, "forwarded write lost its leader");
                        return Err(Error::Remote {
                            code: tonic::Code::Unavailable as i32,
                            message: "etcdserver: leader changed".into(),
                        });
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Linearizable read barrier: returns once this member applied everything committed before
    /// the call (confirmed by the leader with a quorum round).
    pub async fn read_barrier(&self) -> Result<()> {
        let deadline = Instant::now() + PROPOSE_WAIT;
        loop {
            if self.wait_leader(deadline).await.is_none() {
                return Err(Error::NoLeader);
            }
            let index = self.read_index_round().await;
            if let Some(index) = index {
                let left = deadline.saturating_duration_since(Instant::now());
                return match self
                    .inner
                    .raft
                    .wait(Some(left))
                    .applied_index_at_least(Some(index), "read barrier")
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(_) => Err(Error::NoLeader),
                };
            }
            if Instant::now() >= deadline {
                return Err(Error::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Join the next read-index round. Concurrent reads share one round (one quorum check at the
    /// leader), as etcd batches its ReadIndex requests; a round always starts after every read
    /// that joins it was invoked, so its index covers every write acknowledged before them.
    async fn read_index_round(&self) -> Option<u64> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start_round = {
            let mut w = self.inner.reads.lock();
            w.waiting.push(tx);
            !std::mem::replace(&mut w.running, true)
        };
        if start_round {
            let me = self.clone();
            tokio::spawn(async move { me.run_read_rounds().await });
        }
        rx.await.ok().flatten()
    }

    async fn run_read_rounds(self) {
        loop {
            let waiters = {
                let mut w = self.inner.reads.lock();
                if w.waiting.is_empty() {
                    w.running = false;
                    return;
                }
                std::mem::take(&mut w.waiting)
            };
            let index = self.fetch_read_index().await;
            for tx in waiters {
                let _ = tx.send(index);
            }
        }
    }

    async fn fetch_read_index(&self) -> Option<u64> {
        let leader = self.leader()?;
        if leader == self.inner.id {
            self.leader_read_index().await
        } else {
            let mut c = self.peer(leader).ok()?;
            // Bounded: a round that hangs on a dead connection would hold every read here.
            let call = c.read_index(Blob { data: Vec::new() });
            match tokio::time::timeout(self.inner.election_timeout, call).await {
                Ok(Ok(r)) => {
                    self.peer_answered(leader);
                    let res: std::result::Result<u64, PeerError> =
                        bincode::deserialize(&r.into_inner().data).ok()?;
                    res.ok()
                }
                Ok(Err(_)) => None,
                Err(_) => {
                    self.peer_timed_out(leader);
                    None
                }
            }
        }
    }

    /// The read index, on the leader: openraft's (its commit index, or the first entry of its
    /// leadership if later, confirmed by a quorum round). `None` when it cannot serve one.
    ///
    /// openraft 0.9 restarts a member whose durable vote is committed and names itself as
    /// leader at once, under the same leader id and without a new entry; its commit index is
    /// then only what it had persisted, possibly behind entries committed (and acknowledged)
    /// before the crash, so a read index from it could miss them. Such a leader serves no read
    /// index until an entry this process proposed has committed (found by the simulation).
    async fn leader_read_index(&self) -> Option<u64> {
        // Checked before asking openraft, which takes its commit index when asked and then
        // runs a quorum round: checked after, the entry could commit during the round and the
        // stale index pass (the simulation found that too).
        let restored = *self.inner.restored_leader.lock();
        if let Some(restored) = restored
            && self.inner.raft.metrics().borrow().vote.leader_id == restored
        {
            return None;
        }
        // Waits while a leader transfer runs (its round would renew followers' vote leases);
        // if leadership moved, openraft refuses below and the caller asks the new leader.
        let _gate = self.inner.read_gate.read().await;
        let (read, _applied) = self.inner.raft.get_read_log_id().await.ok()?;
        Some(read.map(|l| l.index).unwrap_or(0))
    }

    /// Commit an entry under the leader id restored at start-up, so that the commit index is
    /// known again; until then [`Self::leader_read_index`] refuses.
    async fn confirm_restored_leadership(self, leader_id: openraft::LeaderId<u64>) {
        loop {
            let still = self.inner.raft.metrics().borrow().vote.leader_id == leader_id;
            if !still || self.inner.stop.is_cancelled() {
                return;
            }
            let write = self.inner.raft.client_write(Command::Noop);
            match tokio::time::timeout(PROPOSE_WAIT, write).await {
                Ok(Ok(_)) => {
                    *self.inner.restored_leader.lock() = None;
                    tracing::info!(member = self.inner.id, "restored leadership confirmed");
                    return;
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => return,
                Ok(Err(RaftError::Fatal(_))) => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Renew a lease at the leader; the TTL, or 0 if the lease is unknown.
    pub async fn lease_renew(&self, id: i64) -> Result<i64> {
        self.lease_call(id, true).await
    }

    /// Seconds left of a lease per the leader; -1 if unknown.
    pub async fn lease_remaining(&self, id: i64) -> Result<i64> {
        self.lease_call(id, false).await
    }

    async fn lease_call(&self, id: i64, renew: bool) -> Result<i64> {
        let deadline = Instant::now() + PROPOSE_WAIT;
        loop {
            let Some(leader) = self.wait_leader(deadline).await else {
                return Err(Error::NoLeader);
            };
            if leader == self.inner.id && self.inner.lessor.is_active() {
                return Ok(self.local_lease(id, renew));
            }
            if leader != self.inner.id {
                let mut c = self.peer(leader)?;
                let data =
                    bincode::serialize(&id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
                let r = if renew {
                    c.lease_keep_alive(Blob { data }).await
                } else {
                    c.lease_time_to_live(Blob { data }).await
                };
                if let Ok(r) = r {
                    let res: std::result::Result<i64, PeerError> =
                        bincode::deserialize(&r.into_inner().data)?;
                    if let Ok(v) = res {
                        return Ok(v);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn local_lease(&self, id: i64, renew: bool) -> i64 {
        let known = self.inner.state.read().leases().contains_key(&id);
        if !known {
            return if renew { 0 } else { -1 };
        }
        let v = if renew {
            self.inner.lessor.renew(id)
        } else {
            self.inner.lessor.remaining(id)
        };
        v.unwrap_or(if renew { 0 } else { -1 })
    }

    fn must_lead(&self) -> Result<()> {
        if self.is_leader() {
            return Ok(());
        }
        Err(Error::Remote {
            code: tonic::Code::FailedPrecondition as i32,
            message: format!(
                "etcdserver: member changes are served by the leader ({:016x}); send it there",
                self.leader().unwrap_or(0)
            ),
        })
    }

    /// Add a member (as a learner, then as a voter unless `learner`); returns its id.
    pub async fn add_member(&self, peer_url: &str, learner: bool) -> Result<u64> {
        // Not during a leader transfer (it would append while the transferee catches up).
        let _one = self.inner.transfer.lock().await;
        self.must_lead()?;
        let id = crate::rpc::member_id_for(peer_url, &self.inner.token);
        if self.members().iter().any(|(m, _, _)| *m == id) {
            return Err(Error::Remote {
                code: tonic::Code::FailedPrecondition as i32,
                message: "etcdserver: peerURL exists".into(),
            });
        }
        let node = MemberNode {
            name: String::new(),
            peer_url: peer_url.to_string(),
        };
        self.inner
            .raft
            .add_learner(id, node, false)
            .await
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        if !learner {
            self.change(openraft::ChangeMembers::AddVoterIds([id].into()))
                .await?;
        }
        Ok(id)
    }

    /// Promote a learner to a voter.
    pub async fn promote_member(&self, id: u64) -> Result<()> {
        // Not during a leader transfer (it would append while the transferee catches up).
        let _one = self.inner.transfer.lock().await;
        self.must_lead()?;
        if !self.members().iter().any(|(m, _, l)| *m == id && *l) {
            return Err(Error::Remote {
                code: tonic::Code::FailedPrecondition as i32,
                message: "etcdserver: can only promote a learner member".into(),
            });
        }
        self.change(openraft::ChangeMembers::AddVoterIds([id].into()))
            .await
    }

    /// Remove a member (voter or learner).
    pub async fn remove_member(&self, id: u64) -> Result<()> {
        // Not during a leader transfer (it would append while the transferee catches up).
        let _one = self.inner.transfer.lock().await;
        self.must_lead()?;
        let Some((_, _, learner)) = self.members().into_iter().find(|(m, _, _)| *m == id) else {
            return Err(Error::MemberNotFound);
        };
        if learner {
            self.change(openraft::ChangeMembers::RemoveNodes([id].into()))
                .await
        } else {
            self.change(openraft::ChangeMembers::RemoveVoters([id].into()))
                .await
        }
    }

    async fn change(&self, c: openraft::ChangeMembers<u64, MemberNode>) -> Result<()> {
        self.inner
            .raft
            .change_membership(c, false)
            .await
            .map(|_| ())
            .map_err(|e| Error::Unsupported(e.to_string()))
    }

    /// How long [`Self::move_leader`] may take, from its start to the transferee leading: three
    /// election timeouts (catching up, the vote lease of ET/2 running out, the campaign).
    pub fn transfer_timeout(&self) -> Duration {
        3 * self.inner.election_timeout
    }

    /// Make `target` the leader (`etcdctl move-leader`); see the module docs for how. Errors, as
    /// etcd's: `NotLeader` on a member that does not lead, `BadLeaderTransferee` when `target`
    /// is no voting member, `LeaderTransferTimeout` when it did not lead in time. Moving to this
    /// member itself is a no-op.
    ///
    /// One attempt, bounded by [`Self::transfer_timeout`] (and by `client_deadline`); if it
    /// fails, the leader serves as usual again and, as etcd does, the call goes on waiting for
    /// `target` to lead until `client_deadline` (the caller's gRPC deadline), then fails. Failing
    /// before the client's deadline would make etcd's client retry (it counts `MoveLeader` as
    /// repeatable and retries `Unavailable`), each retry another attempt holding writes: etcdctl
    /// ran seven of them in a row, 21 s of stalls, before this waited for the deadline.
    pub async fn move_leader(&self, target: u64, client_deadline: Option<Instant>) -> Result<()> {
        let started = Instant::now();
        let attempt_deadline = (started + self.transfer_timeout())
            .min(client_deadline.unwrap_or(started + self.transfer_timeout()));
        match self.transfer_once(target, started, attempt_deadline).await {
            Err(Error::LeaderTransferTimeout) => {}
            done => return done,
        }
        let Some(until) = client_deadline else {
            return Err(Error::LeaderTransferTimeout);
        };
        let mut rx = self.inner.raft.metrics();
        loop {
            if rx.borrow_and_update().current_leader == Some(target) {
                tracing::info!(
                    member = self.inner.id,
                    target,
                    "the transferee leads after all"
                );
                return Ok(());
            }
            if tokio::time::timeout_at(until, rx.changed()).await.is_err() {
                return Err(Error::LeaderTransferTimeout);
            }
        }
    }

    /// One transfer attempt (see [`Self::move_leader`]), given up at `deadline`.
    async fn transfer_once(&self, target: u64, started: Instant, deadline: Instant) -> Result<()> {
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        if !self
            .members()
            .iter()
            .any(|(id, _, learner)| *id == target && !learner)
        {
            return Err(Error::BadLeaderTransferee);
        }
        if target == self.inner.id {
            return Ok(());
        }
        let timed_out = |_| Error::LeaderTransferTimeout;
        let _one = tokio::time::timeout_at(deadline, self.inner.transfer.lock())
            .await
            .map_err(timed_out)?;
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        let term = self.term();
        tracing::info!(
            member = self.inner.id,
            target,
            term,
            "leader transfer starting"
        );

        // Stop everything that reaches followers; `_quiet` undoes it however this ends.
        let _reads = tokio::time::timeout_at(deadline, self.inner.read_gate.write())
            .await
            .map_err(timed_out)?;
        let _quiet = Quiet(self);
        self.inner.raft.runtime_config().heartbeat(false);
        match tokio::time::timeout_at(deadline, self.inner.batcher.pause()).await {
            Ok(true) => {}
            Ok(false) => return Err(Error::Stopped),
            Err(_) => return Err(self.transfer_failed(target, started, "entries in flight")),
        }

        // The transferee must hold the whole log.
        let mut rx = self.inner.raft.metrics();
        loop {
            let (leading, caught_up) = {
                let m = rx.borrow_and_update();
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&target).copied().flatten())
                    .map(|l| l.index);
                (
                    m.state == ServerState::Leader && m.current_leader == Some(self.inner.id),
                    matched == m.last_log_index,
                )
            };
            if !leading {
                return Err(self.transfer_failed(target, started, "lost leadership"));
            }
            if caught_up {
                break;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(self.transfer_failed(target, started, "transferee not caught up"));
            }
        }

        // TimeoutNow: answered once the transferee called `elect` (after the vote lease), or
        // with why it will not. Until this attempt ends the transferee may confirm it.
        let req = TimeoutNowRequest {
            leader: self.inner.id,
            term,
            last_log: self.inner.log.last_log_id(),
        };
        *self.inner.transferring_to.lock() = Some(target);
        let data = bincode::serialize(&req)
            .map_err(|e| Error::InvalidArgument(format!("unencodable request: {e}")))?;
        let mut c = self.peer(target)?;
        let answer = match tokio::time::timeout_at(deadline, c.timeout_now(Blob { data })).await {
            Ok(Ok(r)) => {
                self.peer_answered(target);
                bincode::deserialize::<std::result::Result<(), String>>(&r.into_inner().data)
                    .map_err(|e| format!("undecodable answer: {e}"))
                    .and_then(|a| a)
            }
            Ok(Err(status)) => Err(status.to_string()),
            Err(_) => {
                self.peer_timed_out(target);
                Err("no answer".into())
            }
        };
        if let Err(why) = answer {
            return Err(self.transfer_failed(target, started, &format!("refused: {why}")));
        }

        // Done when this member sees the transferee lead.
        loop {
            let (leader, now_term) = {
                let m = rx.borrow_and_update();
                (m.current_leader, m.current_term)
            };
            if leader == Some(target) && now_term > term {
                tracing::info!(
                    member = self.inner.id,
                    target,
                    term = now_term,
                    took_ms = started.elapsed().as_millis() as u64,
                    "leader transfer finished"
                );
                return Ok(());
            }
            if let Some(other) = leader.filter(|l| *l != target && now_term > term) {
                let why = format!("{other:x} was elected instead");
                return Err(self.transfer_failed(target, started, &why));
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(self.transfer_failed(target, started, "transferee not leading"));
            }
        }
    }

    fn transfer_failed(&self, target: u64, started: Instant, why: &str) -> Error {
        tracing::warn!(
            member = self.inner.id,
            target,
            took_ms = started.elapsed().as_millis() as u64,
            why,
            "leader transfer failed"
        );
        Error::LeaderTransferTimeout
    }

    /// The transferee's side of TimeoutNow: check the request, wait until the vote lease ran
    /// out, campaign; answered once `elect` was called (or why not), so the leader hears why a
    /// transfer did not start.
    async fn answer_timeout_now(&self, req: &TimeoutNowRequest) -> std::result::Result<(), String> {
        let (term, leader, voter) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == self.inner.id);
            (m.current_term, m.current_leader, voter)
        };
        if !voter {
            return Err("not a voter".into());
        }
        if term != req.term || leader != Some(req.leader) {
            return Err(format!(
                "at term {term} following {leader:?}, not {} at {}",
                req.leader, req.term
            ));
        }
        if self.inner.log.last_log_id() < req.last_log {
            return Err("log behind the leader's".into());
        }
        {
            let mut c = self.inner.campaign.lock();
            if *c == Campaign::Transferee {
                return Err("a transfer to this member is already under way".into());
            }
            *c = Campaign::Transferee;
        }
        let _reset = TransfereeReset(self);
        self.campaign_on_request(req).await
    }

    /// Campaign at the leader's request as soon as every member that heard from it no later
    /// than one heartbeat interval after us would grant a vote (their vote lease ran out), and
    /// the leader confirms that it still asks for it; given up after
    /// [`Self::transfer_timeout`] (the leader is still sending).
    ///
    /// The confirmation is what keeps a request read late from deposing the leader: a
    /// TimeoutNow that waited in a socket while this member was paused or cut off finds a stale
    /// last contact, and a leader grants any up-to-date candidate's vote (openraft renews a
    /// leader's own lease only when it is elected). Found by the paused-member test; waiting
    /// one more vote lease after reading the request was not enough on a loaded machine (the
    /// leader's resumed heartbeats took longer to get through).
    async fn campaign_on_request(
        &self,
        req: &TimeoutNowRequest,
    ) -> std::result::Result<(), String> {
        let give_up = Instant::now() + self.transfer_timeout();
        loop {
            let at =
                *self.inner.last_heartbeat.lock() + self.inner.vote_lease + self.inner.heartbeat;
            let now = Instant::now();
            if now >= at {
                break;
            }
            if now >= give_up {
                return Err("the leader is still sending".into());
            }
            tokio::select! {
                _ = self.inner.stop.cancelled() => return Err("stopping".into()),
                _ = tokio::time::sleep_until(at.min(give_up)) => {}
            }
        }
        let (now_term, state) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            (m.current_term, m.state)
        };
        if now_term != req.term || state == ServerState::Leader {
            return Err(format!("moved on to term {now_term} meanwhile"));
        }
        self.confirm_transfer(req).await?;
        *self.inner.campaign.lock() = Campaign::Electing { at: Instant::now() };
        tracing::info!(
            member = self.inner.id,
            term = req.term + 1,
            "leader transfer: campaigning at the leader's request"
        );
        self.inner
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| e.to_string())
    }

    /// Ask the leader whether its transfer to this member is still on, with our log as it now
    /// is (the campaign can only win if it matches the leader's).
    async fn confirm_transfer(&self, req: &TimeoutNowRequest) -> std::result::Result<(), String> {
        let ask = ConfirmTransferRequest {
            transferee: self.inner.id,
            term: req.term,
            last_log: self.inner.log.last_log_id(),
        };
        let data = bincode::serialize(&ask).map_err(|e| e.to_string())?;
        let mut c = self.peer(req.leader).map_err(|e| e.to_string())?;
        let call = c.confirm_transfer(Blob { data });
        match tokio::time::timeout(self.inner.vote_lease, call).await {
            Ok(Ok(r)) => {
                self.peer_answered(req.leader);
                match bincode::deserialize::<bool>(&r.into_inner().data) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("the leader no longer asks for it".into()),
                    Err(e) => Err(format!("undecodable confirmation: {e}")),
                }
            }
            Ok(Err(status)) => Err(format!("no confirmation: {status}")),
            Err(_) => {
                self.peer_timed_out(req.leader);
                Err("no confirmation in time".into())
            }
        }
    }

    /// The leader's side of `ConfirmTransfer`: yes while an attempt to that transferee waits for
    /// its campaign, this member still leads at that term, and the transferee holds its log.
    fn answer_confirm_transfer(&self, req: &ConfirmTransferRequest) -> bool {
        *self.inner.transferring_to.lock() == Some(req.transferee)
            && self.is_leader()
            && self.term() == req.term
            && self.inner.log.last_log_id() == req.last_log
    }

    /// Stop openraft and the background tasks; the log writer ends after what it holds.
    pub async fn stop(&self) {
        self.inner.stop.cancel();
        let _ = self.inner.raft.shutdown().await;
        self.inner.log.close();
    }

    /// Ask openraft for a snapshot whenever `--snapshot-count` commands were applied since the
    /// last one (its own policy, which counts entries, stays as a bound for unbatched logs).
    async fn snapshot_timer(self) {
        let due = self.inner.sm.snapshot_due();
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = due.wait() => {}
            }
            // A wake-up left over from before the last snapshot finds nothing due.
            if due.is_due() && self.inner.raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }

    /// A fresh election timeout in `[base, 2 × base)`.
    fn draw(&self, base: Duration) -> Duration {
        let ms = base.as_millis() as u64;
        Duration::from_millis(ms + self.inner.rng.lock().random_range(0..ms.max(1)))
    }

    fn heard_from_leader(&self) {
        *self.inner.last_heartbeat.lock() = Instant::now();
    }

    async fn election_timer(self) {
        let base = self.inner.election_timeout;
        // Campaign when no leader was heard from for a fresh draw from [ET, 2 ET), and not
        // before the previous attempt's own fresh draw ran out. `last_heartbeat` is contact
        // with a leader (or a granted vote) only, never our own attempts: pre-vote answers
        // depend on it.
        let mut timeout = self.draw(base);
        let mut next_try = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(25));
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.is_leader() {
                self.heard_from_leader();
                continue;
            }
            let since = self.inner.last_heartbeat.lock().elapsed();
            // The only voter has nobody to wait for (a restarted single member campaigns at
            // once: its log store never lets it resume leading without an election). Asked
            // only while the timeout runs, not on every tick.
            if Instant::now() < next_try || (since < timeout && !self.only_voter()) {
                continue;
            }
            if *self.inner.campaign.lock() == Campaign::Transferee {
                // A leader transfer's campaign is under way (see `campaign_on_request`).
                continue;
            }
            let voter = self
                .members()
                .iter()
                .any(|(id, _, learner)| *id == self.inner.id && !learner);
            if voter {
                *self.inner.campaign.lock() = Campaign::PreVoting { yielded: false };
                let mut outcome = self.pre_vote().await;
                {
                    let mut campaign = self.inner.campaign.lock();
                    if outcome == PreVoteOutcome::Go
                        && *campaign == (Campaign::PreVoting { yielded: true })
                    {
                        tracing::debug!(
                            member = self.inner.id,
                            "pre-vote won, but another candidate's was granted meanwhile; stepping back"
                        );
                        outcome = PreVoteOutcome::Lost;
                    }
                    *campaign = match outcome {
                        PreVoteOutcome::Go => Campaign::Electing { at: Instant::now() },
                        _ => Campaign::Idle,
                    };
                }
                match outcome {
                    PreVoteOutcome::Go => {
                        tracing::info!(
                            member = self.inner.id,
                            after_ms = since.as_millis() as u64,
                            "no leader heard from; pre-vote won; campaigning"
                        );
                        let _ = self.inner.raft.trigger().elect().await;
                    }
                    PreVoteOutcome::Lost => {
                        tracing::debug!(member = self.inner.id, "pre-vote lost; not campaigning");
                    }
                    PreVoteOutcome::Removed => {
                        tracing::warn!(
                            member = self.inner.id,
                            "peers say this member was removed from the cluster; stopping"
                        );
                        self.inner.removed.cancel();
                        return;
                    }
                }
            }
            timeout = self.draw(base);
            // A lost pre-vote changed no term and disturbed no one, so the next try may come
            // sooner: [ET/2, ET) (still drawn afresh, so two candidates do not keep colliding).
            // With [ET, 2 ET) here, a first try refused because a peer's log was one entry
            // ahead pushed the election past 3 s after a leader died.
            next_try = Instant::now() + self.draw(base / 2);
        }
    }

    /// Whether this member is the cluster's one voter.
    fn only_voter(&self) -> bool {
        let members = self.members();
        let mut voters = members.iter().filter(|(_, _, learner)| !learner);
        voters.next().is_some_and(|(id, _, _)| *id == self.inner.id) && voters.next().is_none()
    }

    /// Ask every other voter whether it would vote for us now.
    async fn pre_vote(&self) -> PreVoteOutcome {
        let members = self.members();
        let voters: Vec<u64> = members
            .iter()
            .filter(|(_, _, l)| !l)
            .map(|(id, _, _)| *id)
            .collect();
        if !voters.contains(&self.inner.id) {
            return PreVoteOutcome::Lost;
        }
        let req = PreVoteRequest {
            candidate: self.inner.id,
            last_log: self.inner.log.last_log_id(),
        };
        let Ok(data) = bincode::serialize(&req) else {
            return PreVoteOutcome::Lost;
        };
        let mut asks = Vec::new();
        for id in voters.iter().copied().filter(|id| *id != self.inner.id) {
            let Ok(mut c) = self.peer(id) else { continue };
            let data = data.clone();
            let me = self.clone();
            asks.push(async move {
                let call = c.pre_vote(Blob { data });
                match tokio::time::timeout(Duration::from_millis(500), call).await {
                    Ok(Ok(r)) => {
                        me.peer_answered(id);
                        bincode::deserialize::<PreVoteAnswer>(&r.into_inner().data).ok()
                    }
                    Ok(Err(_)) => None,
                    Err(_) => {
                        me.peer_timed_out(id);
                        None
                    }
                }
            });
        }
        // Stop as soon as a majority granted: a dead peer must not delay the campaign.
        let mut pending: futures::stream::FuturesUnordered<_> = asks.into_iter().collect();
        let mut granted = 1; // our own
        let mut removed = 0;
        let others = voters.len() - 1;
        while let Some(a) = futures::StreamExt::next(&mut pending).await {
            match a {
                Some(PreVoteAnswer::Granted) => granted += 1,
                Some(PreVoteAnswer::NotAMember) => removed += 1,
                Some(PreVoteAnswer::Refused) | None => {}
            }
            if granted * 2 > voters.len() {
                return PreVoteOutcome::Go;
            }
        }
        if removed > 0 && removed * 2 > others {
            return PreVoteOutcome::Removed;
        }
        if granted * 2 > voters.len() {
            PreVoteOutcome::Go
        } else {
            PreVoteOutcome::Lost
        }
    }

    fn answer_pre_vote(&self, req: &PreVoteRequest) -> PreVoteAnswer {
        let members = self.members();
        if !members.is_empty() && !members.iter().any(|(id, _, _)| *id == req.candidate) {
            return PreVoteAnswer::NotAMember;
        }
        // A member that heard from a leader recently keeps it (this also stops a member that
        // was cut off from disrupting a healthy cluster when it comes back).
        let heard = self.inner.last_heartbeat.lock().elapsed();
        if self.is_leader() || (self.leader().is_some() && heard < self.inner.election_timeout / 2)
        {
            return PreVoteAnswer::Refused;
        }
        // openraft's own order, as its vote handler compares: (term, leader node, index). A
        // leader is identified by (term, node id), so the term alone is not enough.
        let mine = self.inner.log.last_log_id();
        if req.last_log < mine {
            return PreVoteAnswer::Refused;
        }
        self.inner.campaign.lock().answer(
            req.last_log > mine,
            req.candidate < self.inner.id,
            self.inner.election_timeout / 4,
        )
    }

    async fn leadership_watch(self) {
        let mut rx = self.inner.raft.metrics();
        let mut leading = false;
        loop {
            let now_leading = {
                let m = rx.borrow();
                m.state == ServerState::Leader && m.current_leader == Some(self.inner.id)
            };
            if now_leading && !leading {
                let leases: Vec<(i64, i64)> = self
                    .inner
                    .state
                    .read()
                    .leases()
                    .iter()
                    .map(|(id, l)| (*id, l.ttl))
                    .collect();
                self.inner
                    .lessor
                    .promote(leases.into_iter(), self.inner.election_timeout);
                tracing::info!(
                    member = self.inner.id,
                    term = rx.borrow().current_term,
                    "became leader"
                );
            } else if !now_leading && leading {
                self.inner.lessor.demote();
                tracing::info!(member = self.inner.id, "no longer leader");
            }
            leading = now_leading;
            let (term, removed) = {
                let m = rx.borrow();
                let known = m
                    .membership_config
                    .membership()
                    .get_node(&self.inner.id)
                    .is_some();
                let has_members = m.membership_config.membership().nodes().next().is_some();
                (m.current_term, has_members && !known)
            };
            self.inner.hub.set_term(term);
            if removed {
                tracing::warn!(
                    member = self.inner.id,
                    "this member was removed from the cluster; stopping"
                );
                self.inner.removed.cancel();
                return;
            }
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    /// The peer gRPC service for this member.
    pub fn peer_service(&self) -> PeerService {
        PeerService {
            member: self.clone(),
        }
    }

    /// The log store (to inspect the log: tools and the simulation's invariant checks).
    pub fn log_store(&self) -> &log_store::LogStore {
        &self.inner.log
    }

    /// Membership as the state machine last applied it.
    pub fn applied_membership(&self) -> openraft::StoredMembership<u64, MemberNode> {
        self.inner.sm.membership()
    }
}

/// Undoes a leader transfer's quiet (heartbeats off, batcher paused) however the transfer ends,
/// the caller hanging up included.
struct Quiet<'a>(&'a RaftMember);

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        *self.0.inner.transferring_to.lock() = None;
        self.0.inner.raft.runtime_config().heartbeat(true);
        self.0.inner.batcher.resume();
    }
}

/// Ends a transferee's wait however its TimeoutNow call ends (cancelled included).
struct TransfereeReset<'a>(&'a RaftMember);

impl Drop for TransfereeReset<'_> {
    fn drop(&mut self) {
        let mut c = self.0.inner.campaign.lock();
        if *c == Campaign::Transferee {
            *c = Campaign::Idle;
        }
    }
}

/// Whether a failed call never reached the peer (so retrying it elsewhere is safe).
fn is_connect_error(s: &Status) -> bool {
    use std::error::Error as _;
    if s.code() != tonic::Code::Unavailable {
        return false;
    }
    // tonic reports an HTTP/2 failure of an established connection as "h2 protocol error:
    // ...", often with "connection" in it: the request may have reached the leader.
    if s.message().starts_with("h2 protocol error") {
        return false;
    }
    let mut text = s.message().to_string();
    let mut src = s.source();
    while let Some(e) = src {
        text.push_str(&e.to_string());
        src = e.source();
    }
    text.contains("connect") || text.contains("Connection refused")
}

/// Serves `peerpb.Peer` for one member.
#[derive(Clone)]
pub struct PeerService {
    member: RaftMember,
}

/// `v` encoded for the wire (a message of a stream).
fn encode<T: Serialize>(v: &T) -> std::result::Result<Blob, Status> {
    bincode::serialize(v)
        .map(|data| Blob { data })
        .map_err(|e| Status::internal(format!("encode: {e}")))
}

/// `v` encoded as a unary call's answer.
fn blob<T: Serialize>(v: &T) -> std::result::Result<Response<Blob>, Status> {
    encode(v).map(Response::new)
}

fn decode<T: serde::de::DeserializeOwned>(b: &Blob) -> std::result::Result<T, Status> {
    bincode::deserialize(&b.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable peer message: {e}")))
}

impl PeerService {
    /// One AppendEntries, encoded, in and out (a unary call or a message of a stream).
    async fn append(&self, req: &Blob) -> std::result::Result<Blob, Status> {
        let rpc = decode(req)?;
        let res = self.member.inner.raft.append_entries(rpc).await;
        if let Ok(r) = &res
            && !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_))
        {
            self.member.heard_from_leader();
        }
        encode(&res)
    }
}

/// The answers of an `AppendStream`, one per request message, in order.
type AppendAnswers =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::result::Result<Blob, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(
        &self,
        req: Request<Blob>,
    ) -> std::result::Result<Response<Blob>, Status> {
        self.append(req.get_ref()).await.map(Response::new)
    }

    type AppendStreamStream = AppendAnswers;

    async fn append_stream(
        &self,
        req: Request<tonic::Streaming<Blob>>,
    ) -> std::result::Result<Response<AppendAnswers>, Status> {
        use futures::StreamExt;
        let svc = self.clone();
        // One request at a time, in order: `then` polls the next message only after the
        // previous answer was produced, as the unary calls were answered one by one.
        let answers = req.into_inner().then(move |msg| {
            let svc = svc.clone();
            async move { svc.append(&msg?).await }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(&self, req: Request<Blob>) -> std::result::Result<Response<Blob>, Status> {
        let rpc = decode(req.get_ref())?;
        let res = self.member.inner.raft.vote(rpc).await;
        if let Ok(r) = &res
            && r.vote_granted
        {
            self.member.heard_from_leader();
        }
        blob(&res)
    }

    async fn install_snapshot(
        &self,
        req: Request<Blob>,
    ) -> std::result::Result<Response<Blob>, Status> {
        let rpc = decode(req.get_ref())?;
        let res = self.member.inner.raft.install_snapshot(rpc).await;
        self.member.heard_from_leader();
        blob(&res)
    }

    async fn pre_vote(&self, req: Request<Blob>) -> std::result::Result<Response<Blob>, Status> {
        let r: PreVoteRequest = decode(req.get_ref())?;
        blob(&self.member.answer_pre_vote(&r))
    }

    async fn timeout_now(&self, req: Request<Blob>) -> std::result::Result<Response<Blob>, Status> {
        let r: TimeoutNowRequest = decode(req.get_ref())?;
        let answer = self.member.answer_timeout_now(&r).await;
        if let Err(why) = &answer {
            tracing::info!(
                member = self.member.inner.id,
                leader = r.leader,
                why,
                "leader transfer refused"
            );
        }
        blob(&answer)
    }

    async fn confirm_transfer(
        &self,
        req: Request<Blob>,
    ) -> std::result::Result<Response<Blob>, Status> {
        let r: ConfirmTransferRequest = decode(req.get_ref())?;
        blob(&self.member.answer_confirm_transfer(&r))
    }

    async fn forward(&self, req: Request<Blob>) -> std::result::Result<Response<Blob>, Status> {
        let cmd: Command = decode(req.get_ref())?;
        if matches!(cmd, Command::Batch(_)) {
            // Only a leader's batcher makes batches, of the commands it was given one by one.
            return Err(Status::invalid_argument(
                "a forwarded write must be one command",
            ));
        }
        let res: std::result::Result<OutcomeWire, PeerError> =
            match self.member.inner.batcher.write(cmd).await {
                Ok(o) => Ok(o),
                Err(WriteFailed::Timeout) => Err(PeerError::Failed(Error::Timeout.to_string())),
                Err(WriteFailed::Raft(e)) => match *e {
                    RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                        Err(PeerError::NotLeader(f.leader_id))
                    }
                    e => Err(PeerError::Failed(e.to_string())),
                },
            };
        blob(&res)
    }

    async fn read_index(&self, _req: Request<Blob>) -> std::result::Result<Response<Blob>, Status> {
        let res: std::result::Result<u64, PeerError> = match self.member.leader_read_index().await {
            Some(index) => Ok(index),
            None => {
                tracing::debug!("read index refused");
                Err(PeerError::NotLeader(None))
            }
        };
        blob(&res)
    }

    async fn lease_keep_alive(
        &self,
        req: Request<Blob>,
    ) -> std::result::Result<Response<Blob>, Status> {
        let id: i64 = decode(req.get_ref())?;
        let res: std::result::Result<i64, PeerError> = if self.member.inner.lessor.is_active() {
            Ok(self.member.local_lease(id, true))
        } else {
            Err(PeerError::NotLeader(None))
        };
        blob(&res)
    }

    async fn lease_time_to_live(
        &self,
        req: Request<Blob>,
    ) -> std::result::Result<Response<Blob>, Status> {
        let id: i64 = decode(req.get_ref())?;
        let res: std::result::Result<i64, PeerError> = if self.member.inner.lessor.is_active() {
            Ok(self.member.local_lease(id, false))
        } else {
            Err(PeerError::NotLeader(None))
        };
        blob(&res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(250);

    #[test]
    fn an_idle_member_grants_every_pre_vote_it_gets_this_far() {
        let mut c = Campaign::Idle;
        assert_eq!(c.answer(false, false, WINDOW), PreVoteAnswer::Granted);
        assert_eq!(c, Campaign::Idle);
    }

    #[test]
    fn two_simultaneous_campaigns_with_equal_logs_leave_exactly_one_candidate() {
        // Members 1 and 2 both have their pre-vote out, and each gets the other's request.
        let mut one = Campaign::PreVoting { yielded: false };
        let mut two = Campaign::PreVoting { yielded: false };
        // 1 answers 2 (2's id is not lower): refused, 1 keeps campaigning.
        assert_eq!(one.answer(false, false, WINDOW), PreVoteAnswer::Refused);
        // 2 answers 1 (1's id is lower): granted, and 2 steps back.
        assert_eq!(two.answer(false, true, WINDOW), PreVoteAnswer::Granted);
        assert_eq!(one, Campaign::PreVoting { yielded: false });
        assert_eq!(two, Campaign::PreVoting { yielded: true });
    }

    #[test]
    fn a_longer_log_wins_a_tie_whatever_the_ids() {
        let mut c = Campaign::PreVoting { yielded: false };
        assert_eq!(c.answer(true, false, WINDOW), PreVoteAnswer::Granted);
        assert_eq!(c, Campaign::PreVoting { yielded: true });
    }

    #[test]
    fn a_transferee_refuses_every_pre_vote_until_its_own_campaign() {
        let mut c = Campaign::Transferee;
        assert_eq!(c.answer(true, true, WINDOW), PreVoteAnswer::Refused);
        assert_eq!(c.answer(false, false, WINDOW), PreVoteAnswer::Refused);
        assert_eq!(c, Campaign::Transferee);
    }

    #[test]
    fn pre_votes_are_refused_right_after_our_own_elect_and_granted_after_the_window() {
        let mut c = Campaign::Electing { at: Instant::now() };
        assert_eq!(c.answer(true, true, WINDOW), PreVoteAnswer::Refused);
        let mut old = Campaign::Electing {
            at: Instant::now() - 2 * WINDOW,
        };
        assert_eq!(old.answer(false, false, WINDOW), PreVoteAnswer::Granted);
    }
}
