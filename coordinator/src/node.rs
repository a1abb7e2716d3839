//! The single-member node: orders commands, makes them durable, applies them, answers.
//!
//! Two threads form a pipeline, which is how group commit happens without any timer:
//!
//! ```text
//!  propose() ──► [log thread] take every waiting proposal, append them to the WAL, one fdatasync
//!                     │
//!                     ▼
//!               [apply thread] apply each in order to the state machine, one backend batch,
//!                              publish events to the watch hub, answer the proposers
//! ```
//!
//! While one batch is being fsynced the next one gathers, so under load each fsync carries
//! many commands. Nothing is applied (hence visible to reads or watchers) or acknowledged
//! before it is on disk. A third, lazy thread flushes sled now and then and lets the log drop
//! the segments sled has made redundant.
//!
//! With replication the log thread's job goes to Raft; the apply thread's stays as it is.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use crate::command::Command;
use crate::error::{Error, Result};
use crate::lease::Lessor;
use crate::metrics::CoordinatorMetrics;
use crate::mvcc::Backend;
use crate::state::{Applied, Response, StateMachine};
use crate::wal::{Entry, Wal};
use crate::watch::WatchHub;

/// Most proposals written by one fsync.
const MAX_BATCH: usize = 4096;
/// How often sled is flushed so the log can be purged.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

struct Proposal {
    cmd: Command,
    data: Vec<u8>,
    reply: oneshot::Sender<Result<Applied>>,
}

enum LogMsg {
    Propose(Proposal),
    /// Finish what was taken, stop the pipeline threads, then answer.
    Stop(std::sync::mpsc::Sender<()>),
}

struct Batch {
    entries: Vec<(u64, u64, Proposal)>,
}

/// Handle to the running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

struct Shared {
    state: Arc<RwLock<StateMachine>>,
    hub: Arc<WatchHub>,
    lessor: Arc<Lessor>,
    proposals: mpsc::Sender<LogMsg>,
    term: u64,
    failed: Arc<AtomicBool>,
    metrics: CoordinatorMetrics,
    wal_bytes: Arc<AtomicU64>,
    stop_checkpoint: parking_lot::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    threads: parking_lot::Mutex<Vec<thread::JoinHandle<()>>>,
}

/// What the log thread needs (not the proposal sender, so that stopping can close it).
struct LogSide {
    failed: Arc<AtomicBool>,
    metrics: CoordinatorMetrics,
    wal_bytes: Arc<AtomicU64>,
}

/// What the apply thread needs.
struct ApplySide {
    state: Arc<RwLock<StateMachine>>,
    hub: Arc<WatchHub>,
    lessor: Arc<Lessor>,
    failed: Arc<AtomicBool>,
    metrics: CoordinatorMetrics,
}

/// What the node needs to start.
pub struct NodeParts {
    /// The state machine, already opened and replayed.
    pub state: Arc<RwLock<StateMachine>>,
    /// The log, opened.
    pub wal: Wal,
    /// The backend under the state machine (for checkpoints).
    pub backend: Arc<dyn Backend>,
    /// Term for new entries.
    pub term: u64,
    /// Watch hub.
    pub hub: Arc<WatchHub>,
    /// Lease deadlines.
    pub lessor: Arc<Lessor>,
    /// Metrics.
    pub metrics: CoordinatorMetrics,
}

/// Replay log entries after the state machine's applied index.
pub fn replay(state: &mut StateMachine, entries: &[Entry]) -> Result<usize> {
    let applied = state.applied_index();
    let mut n = 0;
    for (expected, e) in (applied + 1..).zip(entries.iter().filter(|e| e.index > applied)) {
        if e.index != expected {
            return Err(Error::Corrupt(format!(
                "log starts at index {} but the state machine needs {}",
                e.index, expected
            )));
        }
        let cmd: Command = bincode::deserialize(&e.data)?;
        state.apply(e.index, e.term, &cmd);
        n += 1;
    }
    state.commit()?;
    Ok(n)
}

impl Node {
    /// Start the pipeline threads.
    pub fn start(parts: NodeParts) -> Node {
        let (tx, rx) = mpsc::channel::<LogMsg>(16 * 1024);
        let (apply_tx, apply_rx) = std::sync::mpsc::sync_channel::<Batch>(4);
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let purge_to = Arc::new(AtomicU64::new(0));
        let wal_bytes = Arc::new(AtomicU64::new(parts.wal.size_bytes()));
        let failed = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let log_side = LogSide {
            failed: failed.clone(),
            metrics: parts.metrics.clone(),
            wal_bytes: wal_bytes.clone(),
        };
        let wal = parts.wal;
        let term = parts.term;
        let p = purge_to.clone();
        threads.extend(
            thread::Builder::new()
                .name("wal".into())
                .spawn(move || log_loop(log_side, wal, term, rx, apply_tx, p))
                .ok(),
        );
        let apply_side = ApplySide {
            state: parts.state.clone(),
            hub: parts.hub.clone(),
            lessor: parts.lessor.clone(),
            failed: failed.clone(),
            metrics: parts.metrics.clone(),
        };
        threads.extend(
            thread::Builder::new()
                .name("apply".into())
                .spawn(move || apply_loop(apply_side, apply_rx))
                .ok(),
        );
        let state = parts.state.clone();
        let backend = parts.backend.clone();
        threads.extend(
            thread::Builder::new()
                .name("checkpoint".into())
                .spawn(move || {
                    // Wakes every CHECKPOINT_EVERY, or at once when told to stop.
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stop_rx.recv_timeout(CHECKPOINT_EVERY)
                    {
                        let applied = state.read().applied_index();
                        match backend.flush() {
                            Ok(()) => purge_to.store(applied, Ordering::Release),
                            Err(e) => tracing::error!(error = %e, "checkpoint flush failed"),
                        }
                    }
                })
                .ok(),
        );
        let shared = Arc::new(Shared {
            state: parts.state,
            hub: parts.hub,
            lessor: parts.lessor,
            proposals: tx,
            term: parts.term,
            failed,
            metrics: parts.metrics,
            wal_bytes,
            stop_checkpoint: parking_lot::Mutex::new(Some(stop_tx)),
            threads: parking_lot::Mutex::new(threads),
        });
        Node { shared }
    }

    /// Stop the pipeline: proposals already taken are finished, later ones get `Stopped`; the
    /// threads end, sled is flushed and released (so the data dir can be opened again).
    pub async fn stop(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.shared.proposals.send(LogMsg::Stop(tx)).await.is_ok() {
            let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
        }
        if let Some(s) = self.shared.stop_checkpoint.lock().take() {
            let _ = s.send(());
        }
        let threads: Vec<_> = std::mem::take(&mut *self.shared.threads.lock());
        let state = self.shared.state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            let mut st = state.write();
            if let Err(e) = st.store().backend().flush() {
                tracing::warn!(error = %e, "final flush failed");
            }
            st.close();
        })
        .await;
    }

    /// Propose a command and wait until it is durable and applied.
    pub async fn propose(&self, cmd: Command) -> Result<Applied> {
        if self.shared.failed.load(Ordering::Acquire) || self.shared.proposals.is_closed() {
            return Err(Error::Stopped);
        }
        let data = bincode::serialize(&cmd)
            .map_err(|e| Error::InvalidArgument(format!("unencodable command: {e}")))?;
        let (reply, rx) = oneshot::channel();
        self.shared
            .proposals
            .send(LogMsg::Propose(Proposal { cmd, data, reply }))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// The state machine (read it under the lock; never hold the lock across an await).
    pub fn state(&self) -> &Arc<RwLock<StateMachine>> {
        &self.shared.state
    }

    /// The watch hub.
    pub fn hub(&self) -> &Arc<WatchHub> {
        &self.shared.hub
    }

    /// Lease deadlines.
    pub fn lessor(&self) -> &Arc<Lessor> {
        &self.shared.lessor
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.shared.term
    }

    /// Metrics.
    pub fn metrics(&self) -> &CoordinatorMetrics {
        &self.shared.metrics
    }

    /// Bytes in the write-ahead log.
    pub fn wal_bytes(&self) -> u64 {
        self.shared.wal_bytes.load(Ordering::Relaxed)
    }
}

fn log_loop(
    shared: LogSide,
    mut wal: Wal,
    term: u64,
    mut rx: mpsc::Receiver<LogMsg>,
    apply_tx: std::sync::mpsc::SyncSender<Batch>,
    purge_to: Arc<AtomicU64>,
) {
    let mut purged = 0u64;
    let mut entries: Vec<Entry> = Vec::new();
    let mut stop: Option<std::sync::mpsc::Sender<()>> = None;
    while let Some(first) = rx.blocking_recv() {
        let mut props = Vec::new();
        match first {
            LogMsg::Propose(p) => props.push(p),
            LogMsg::Stop(s) => stop = Some(s),
        }
        while stop.is_none() && props.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(LogMsg::Propose(p)) => props.push(p),
                Ok(LogMsg::Stop(s)) => stop = Some(s),
                Err(_) => break,
            }
        }
        if props.is_empty() {
            break;
        }
        entries.clear();
        for (idx, p) in (wal.last_index() + 1..).zip(props.iter_mut()) {
            entries.push(Entry {
                index: idx,
                term,
                data: std::mem::take(&mut p.data),
            });
        }
        let started = Instant::now();
        if let Err(e) = wal.append(&entries) {
            tracing::error!(error = %e, "write-ahead log append failed; refusing further writes");
            shared.failed.store(true, Ordering::Release);
            for p in props {
                let _ = p.reply.send(Err(Error::Stopped));
            }
            break;
        }
        shared
            .metrics
            .wal_fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        shared.metrics.batch_size.observe(props.len() as f64);
        let batch = Batch {
            entries: entries
                .iter()
                .zip(props)
                .map(|(e, p)| (e.index, e.term, p))
                .collect(),
        };
        if apply_tx.send(batch).is_err() {
            break;
        }
        let target = purge_to.load(Ordering::Acquire);
        if target > purged {
            match wal.purge_to(target) {
                Ok(_) => {
                    purged = target;
                    shared.wal_bytes.store(wal.size_bytes(), Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "purging the write-ahead log failed"),
            }
        }
        if stop.is_some() {
            break;
        }
    }
    // Refuse whatever is still queued, then let the apply thread drain and end.
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        match msg {
            LogMsg::Propose(p) => {
                let _ = p.reply.send(Err(Error::Stopped));
            }
            LogMsg::Stop(s) => {
                let _ = s.send(());
            }
        }
    }
    drop(apply_tx);
    drop(wal);
    if let Some(s) = stop {
        let _ = s.send(());
    }
}

fn apply_loop(shared: ApplySide, rx: std::sync::mpsc::Receiver<Batch>) {
    while let Ok(batch) = rx.recv() {
        let started = Instant::now();
        let mut done = Vec::with_capacity(batch.entries.len());
        let commit = {
            let mut st = shared.state.write();
            for (index, term, p) in batch.entries {
                let applied = st.apply(index, term, &p.cmd);
                done.push((p, applied));
            }
            st.commit()
        };
        if let Err(e) = commit {
            // The commands are in the log; a restart will apply them. Stop taking writes.
            tracing::error!(error = %e, "state machine commit failed; refusing further writes");
            shared.failed.store(true, Ordering::Release);
            for (p, _) in done {
                let _ = p.reply.send(Err(Error::Stopped));
            }
            continue;
        }
        shared
            .metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        for (p, applied) in done {
            let Some(applied) = applied else { continue };
            shared.hub.publish(applied.revision, &applied.events);
            match &applied.result {
                Ok(Response::LeaseGrant { id, ttl }) => shared.lessor.granted(*id, *ttl),
                Ok(Response::LeaseRevoke) => {
                    if let Command::LeaseRevoke { id } = p.cmd.unwrapped() {
                        shared.lessor.revoked(*id);
                    }
                }
                _ => {}
            }
            shared.metrics.applied.inc();
            let _ = p.reply.send(Ok(applied));
        }
    }
}
