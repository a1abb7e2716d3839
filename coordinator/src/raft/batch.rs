//! Leader-side batching: the client commands that arrive while earlier entries are in flight
//! become one Raft entry ([`Command::Batch`]).
//!
//! openraft 0.9 runs every `client_write` through its core loop on its own: one engine run, one
//! log `append` call, one responder, one entry in every AppendEntries, in the log of every
//! member and in every state-machine `apply` call. That per-entry cost, not the disk (the log
//! store already writes everything queued with one `fdatasync`), is what bounded a cluster's
//! put throughput. So every write this member makes as leader (its own clients', those
//! forwarded by followers, its lease expiries) goes through one task that:
//!
//! - proposes a command at once when fewer than [`MAX_IN_FLIGHT`] entries it proposed are still
//!   waiting to be applied (a lone client pays no extra wait);
//! - otherwise lets commands gather, and when an entry is answered proposes everything waiting
//!   (up to [`MAX_COMMANDS`] commands or [`MAX_BYTES`] encoded bytes) as one entry;
//! - answers each caller with its own command's outcome: `apply` gives one per command of a
//!   batch, in order, each with its own revision and events, exactly as separate entries would.
//!
//! A leader transfer ([`super::RaftMember::move_leader`]) pauses the batcher: commands keep
//! arriving and wait, none is proposed, and [`Batcher::pause`] returns once every entry already
//! proposed was answered, so the leader's log stops growing. On [`Batcher::resume`] the waiting
//! commands are proposed; if leadership moved meanwhile openraft refuses them as
//! `ForwardToLeader` before they enter any log, and the caller sends them to the new leader.
//!
//! A batch succeeds or fails as one entry for Raft (appended, replicated and committed together,
//! or not at all), while each command in it succeeds or is refused on its own at apply. A caller
//! that stopped waiting before its command was proposed (its deadline passed) is left out, so a
//! command is never proposed after its caller was told it timed out without being sent.

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use openraft::Raft;
use openraft::error::{ClientWriteError, Fatal, RaftError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{MemberNode, PROPOSE_WAIT, TypeConfig};
use crate::command::Command;
use crate::metrics::CoordinatorMetrics;
use crate::state::OutcomeWire;

/// Entries proposed by the batcher and not yet answered, at most. With one, every entry but
/// the first of a burst carries everything that arrived during the previous one's round trip
/// (leader fsync, replication, follower fsync, apply).
pub const MAX_IN_FLIGHT: usize = 1;
/// Commands in one entry, at most.
pub const MAX_COMMANDS: usize = 1024;
/// Encoded bytes of the commands in one entry: no command joins a batch that already holds this
/// many (a single command larger than this still goes, alone). With openraft's
/// `max_payload_entries` this keeps one AppendEntries as large as unbatched entries could make it.
pub const MAX_BYTES: usize = 256 * 1024;

/// Why a write made through the batcher failed.
#[derive(Debug)]
pub enum WriteFailed {
    /// No answer in time (the leader may have lost its quorum): the outcome is unknown.
    Timeout,
    /// openraft's own error for the entry (not leader, or stopped): nothing was applied. Boxed:
    /// unboxed it is 224 bytes against a success's 48, and every answer would carry its size.
    Raft(Box<RaftError<u64, ClientWriteError<u64, MemberNode>>>),
}

/// The outcome of one command written through the batcher.
pub type Written = std::result::Result<OutcomeWire, WriteFailed>;

struct Waiting {
    cmd: Command,
    bytes: usize,
    reply: oneshot::Sender<Written>,
}

type Answer = (
    Vec<oneshot::Sender<Written>>,
    Result<
        Result<openraft::raft::ClientWriteResult<TypeConfig>, oneshot::error::RecvError>,
        tokio::time::error::Elapsed,
    >,
);

/// The handle callers write through. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Waiting>,
    ctl: mpsc::UnboundedSender<Control>,
}

/// Pausing and resuming the batcher (leader transfer).
enum Control {
    /// Stop proposing; answer once nothing proposed is waiting for its answer.
    Pause(oneshot::Sender<()>),
    /// Propose again.
    Resume,
}

impl Batcher {
    /// Start the batching task for `raft`; it ends when `stop` is cancelled.
    pub fn start(
        raft: Raft<TypeConfig>,
        metrics: CoordinatorMetrics,
        stop: CancellationToken,
    ) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx, ctl_rx, metrics, stop));
        Batcher { tx, ctl }
    }

    /// Stop proposing (commands wait, within their own deadline); returns once every entry
    /// already proposed was answered. `false` if the batcher has stopped.
    pub async fn pause(&self) -> bool {
        let (ack, done) = oneshot::channel();
        if self.ctl.send(Control::Pause(ack)).is_err() {
            return false;
        }
        done.await.is_ok()
    }

    /// Propose again (what waited goes first). Synchronous, so a drop guard can call it.
    pub fn resume(&self) {
        let _ = self.ctl.send(Control::Resume);
    }

    /// Propose `cmd` (batched with others) and wait, at most [`PROPOSE_WAIT`], for its outcome.
    pub async fn write(&self, cmd: Command) -> Written {
        let bytes = bincode::serialized_size(&cmd).unwrap_or(0) as usize;
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Waiting { cmd, bytes, reply }).is_err() {
            return Err(WriteFailed::Raft(Box::new(RaftError::Fatal(
                Fatal::Stopped,
            ))));
        }
        match tokio::time::timeout(PROPOSE_WAIT, rx).await {
            Err(_) => Err(WriteFailed::Timeout),
            Ok(Ok(w)) => w,
            // The batcher stopped (the member is shutting down).
            Ok(Err(_)) => Err(WriteFailed::Raft(Box::new(RaftError::Fatal(
                Fatal::Stopped,
            )))),
        }
    }
}

async fn run(
    raft: Raft<TypeConfig>,
    mut rx: mpsc::UnboundedReceiver<Waiting>,
    mut ctl: mpsc::UnboundedReceiver<Control>,
    metrics: CoordinatorMetrics,
    stop: CancellationToken,
) {
    let mut in_flight: FuturesUnordered<BoxFuture<'static, Answer>> = FuturesUnordered::new();
    let mut paused = false;
    // Pausers waiting for the entries in flight to be answered.
    let mut draining: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        if paused && in_flight.is_empty() {
            for d in draining.drain(..) {
                let _ = d.send(());
            }
        }
        let room = in_flight.len() < MAX_IN_FLIGHT && !paused;
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            Some(c) = ctl.recv() => match c {
                Control::Pause(ack) => {
                    paused = true;
                    draining.push(ack);
                }
                Control::Resume => {
                    paused = false;
                    draining.clear();
                }
            },
            Some(answer) = in_flight.next(), if !in_flight.is_empty() => answer_all(answer),
            first = rx.recv(), if room => {
                let Some(first) = first else { return };
                let batch = gather(first, &mut rx);
                if let Some(f) = propose(&raft, batch, &metrics).await {
                    in_flight.push(f);
                }
            }
        }
    }
}

/// `first` and whatever else is waiting, within the batch limits.
fn gather(first: Waiting, rx: &mut mpsc::UnboundedReceiver<Waiting>) -> Vec<Waiting> {
    let mut bytes = first.bytes;
    let mut batch = vec![first];
    while batch.len() < MAX_COMMANDS && bytes < MAX_BYTES {
        let Ok(w) = rx.try_recv() else { break };
        bytes += w.bytes;
        batch.push(w);
    }
    batch
}

/// Hand the batch to openraft as one entry (a lone command as itself); the future answers it.
async fn propose(
    raft: &Raft<TypeConfig>,
    batch: Vec<Waiting>,
    metrics: &CoordinatorMetrics,
) -> Option<BoxFuture<'static, Answer>> {
    // A caller that gave up before its command was proposed is told nothing more, and its
    // command is not proposed.
    let (mut cmds, replies): (Vec<Command>, Vec<_>) = batch
        .into_iter()
        .filter(|w| !w.reply.is_closed())
        .map(|w| (w.cmd, w.reply))
        .unzip();
    let cmd = match cmds.len() {
        0 => return None,
        1 => cmds.pop()?,
        _ => Command::Batch(cmds),
    };
    metrics.raft_entry_commands.observe(replies.len() as f64);
    match raft.client_write_ff(cmd).await {
        Ok(rx) => Some(Box::pin(async move {
            (replies, tokio::time::timeout(PROPOSE_WAIT, rx).await)
        })),
        Err(fatal) => {
            for r in replies {
                let _ = r.send(Err(WriteFailed::Raft(Box::new(RaftError::Fatal(
                    fatal.clone(),
                )))));
            }
            None
        }
    }
}

fn answer_all((replies, answer): Answer) {
    match answer {
        Err(_) => {
            for r in replies {
                let _ = r.send(Err(WriteFailed::Timeout));
            }
        }
        // openraft dropped the responder: its core stopped.
        Ok(Err(_)) => {
            for r in replies {
                let _ = r.send(Err(WriteFailed::Raft(Box::new(RaftError::Fatal(
                    Fatal::Stopped,
                )))));
            }
        }
        Ok(Ok(Err(e))) => {
            for r in replies {
                let _ = r.send(Err(WriteFailed::Raft(Box::new(RaftError::APIError(
                    e.clone(),
                )))));
            }
        }
        Ok(Ok(Ok(resp))) => {
            let outcomes = resp.data.0;
            if outcomes.len() != replies.len() {
                // Not an outcome per command (the entry was found applied already, which only a
                // restart can cause): what happened to each command is unknown.
                tracing::warn!(
                    commands = replies.len(),
                    outcomes = outcomes.len(),
                    "batched entry answered without an outcome per command"
                );
                for r in replies {
                    let _ = r.send(Err(WriteFailed::Timeout));
                }
                return;
            }
            for (r, o) in replies.into_iter().zip(outcomes) {
                let _ = r.send(Ok(o));
            }
        }
    }
}
