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
    proposals: mpsc::Sender<Proposal>,
    term: u64,
    failed: AtomicBool,
    metrics: CoordinatorMetrics,
    wal_bytes: Arc<AtomicU64>,
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
    let mut expected = applied + 1;
    for e in entries.iter().filter(|e| e.index > applied) {
        if e.index != expected {
            return Err(Error::Corrupt(format!(
                "log starts at index {} but the state machine needs {}",
                e.index, expected
            )));
        }
        let cmd: Command = bincode::deserialize(&e.data)?;
        state.apply(e.index, e.term, &cmd);
        expected += 1;
        n += 1;
    }
    state.commit()?;
    Ok(n)
}

impl Node {
    /// Start the pipeline threads.
    pub fn start(parts: NodeParts) -> Node {
        let (tx, rx) = mpsc::channel::<Proposal>(16 * 1024);
        let (apply_tx, apply_rx) = std::sync::mpsc::sync_channel::<Batch>(4);
        let purge_to = Arc::new(AtomicU64::new(0));
        let wal_bytes = Arc::new(AtomicU64::new(parts.wal.size_bytes()));
        let shared = Arc::new(Shared {
            state: parts.state.clone(),
            hub: parts.hub.clone(),
            lessor: parts.lessor.clone(),
            proposals: tx,
            term: parts.term,
            failed: AtomicBool::new(false),
            metrics: parts.metrics.clone(),
            wal_bytes: wal_bytes.clone(),
        });
        {
            let shared = shared.clone();
            let purge_to = purge_to.clone();
            let wal = parts.wal;
            let term = parts.term;
            thread::Builder::new()
                .name("wal".into())
                .spawn(move || log_loop(shared, wal, term, rx, apply_tx, purge_to))
                .ok();
        }
        {
            let shared = shared.clone();
            thread::Builder::new()
                .name("apply".into())
                .spawn(move || apply_loop(shared, apply_rx))
                .ok();
        }
        {
            let state = parts.state.clone();
            let backend = parts.backend.clone();
            let weak = Arc::downgrade(&shared);
            thread::Builder::new()
                .name("checkpoint".into())
                .spawn(move || {
                    loop {
                        thread::sleep(CHECKPOINT_EVERY);
                        let Some(shared) = weak.upgrade() else { return };
                        if shared.proposals.is_closed() {
                            return;
                        }
                        drop(shared);
                        let applied = state.read().applied_index();
                        match backend.flush() {
                            Ok(()) => purge_to.store(applied, Ordering::Release),
                            Err(e) => tracing::error!(error = %e, "checkpoint flush failed"),
                        }
                    }
                })
                .ok();
        }
        Node { shared }
    }

    /// Propose a command and wait until it is durable and applied.
    pub async fn propose(&self, cmd: Command) -> Result<Applied> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(Error::Stopped);
        }
        let data = bincode::serialize(&cmd)
            .map_err(|e| Error::InvalidArgument(format!("unencodable command: {e}")))?;
        let (reply, rx) = oneshot::channel();
        self.shared
            .proposals
            .send(Proposal { cmd, data, reply })
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
    shared: Arc<Shared>,
    mut wal: Wal,
    term: u64,
    mut rx: mpsc::Receiver<Proposal>,
    apply_tx: std::sync::mpsc::SyncSender<Batch>,
    purge_to: Arc<AtomicU64>,
) {
    let mut purged = 0u64;
    let mut entries: Vec<Entry> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut props = vec![first];
        while props.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => props.push(p),
                Err(_) => break,
            }
        }
        entries.clear();
        let mut idx = wal.last_index();
        for p in props.iter_mut() {
            idx += 1;
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
            rx.close();
            continue;
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
            return;
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
    }
}

fn apply_loop(shared: Arc<Shared>, rx: std::sync::mpsc::Receiver<Batch>) {
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
                    if let Command::LeaseRevoke { id } = p.cmd {
                        shared.lessor.revoked(id);
                    }
                }
                _ => {}
            }
            shared.metrics.applied.inc();
            let _ = p.reply.send(Ok(applied));
        }
    }
}
