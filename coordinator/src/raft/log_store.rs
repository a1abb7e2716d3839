//! openraft's log storage on our write-ahead log, with group commit.
//!
//! openraft hands every client write to `append` on its own, but lets the store report
//! durability later through a callback. So `append` only puts the entries in the in-memory cache
//! (openraft may read them back at once to replicate them) and queues them for the writer
//! thread; the writer takes everything queued, writes it, `fdatasync`s once and then fires every
//! callback. Truncations and purges travel through the same queue, so disk order is call order.
//!
//! # The leader writes its log while it replicates
//!
//! openraft 0.9 waits for the leader's own `append` to be flushed before it sends the entries to
//! the followers, so every entry paid two `fdatasync`s one after the other (the leader's, then a
//! follower's). etcd's leader writes its WAL while its messages travel, and so does ours: an
//! append of this member's own entries while it leads (its vote committed, the entries of its
//! term) is reported flushed at once, and openraft replicates them at once. Nothing is exposed
//! before it is durable on a majority regardless:
//!
//! - openraft may now count the leader towards a commit before the leader's write is on disk,
//!   but the state machine applies an entry — and so answers a client, serves a read after it,
//!   takes a snapshot of it — only once this log has really made it durable
//!   ([`Durability::wait_for`] in `sm::apply`): by then the leader and the follower whose
//!   answer committed it both hold it on disk;
//! - no follower learns of a commit index before the leader's log is durable up to it (the
//!   transport waits, `network`), so no follower applies an entry that a crash of the leader
//!   could take back.
//!
//! Followers' appends are reported only once durable, as before: their answer is what counts
//! them. If the leader's write fails after it was reported, the writer marks the log failed and
//! the waiting applies fail, which stops openraft: nothing unwritten is ever applied.
//!
//! openraft counts log indexes from 0 (the initial membership); the WAL from 1, so WAL index =
//! Raft index + 1 throughout this file.
//!
//! The vote and the last purged log id live in a small file (`raft-meta`) replaced atomically
//! (write, fsync, rename, fsync dir): a member never votes twice in a term across restarts.
//!
//! [`Storage::Memory`] swaps the disk for a [`MemDisk`] that a deterministic simulation keeps
//! across simulated crashes; the cache, the queue, the batching and the order of operations are
//! the same code.

#![allow(clippy::result_large_err, clippy::type_complexity)] // openraft fixes these error and state types.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs;
use std::io::Write;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::TypeConfig;
use crate::wal::{self, Wal};

type NodeId = u64;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

enum Op {
    /// Records to write; the callback to fire once durable (`None`: reported already, a
    /// leader's own entries).
    Append(Vec<wal::Entry>, Option<LogFlushed<TypeConfig>>),
    Truncate(u64, tokio::sync::oneshot::Sender<std::io::Result<()>>),
    Purge(u64, tokio::sync::oneshot::Sender<std::io::Result<()>>),
}

/// Where the log and the vote are kept.
pub enum Storage {
    /// Production: the WAL and `raft-meta` in this directory; a thread writes and `fdatasync`s.
    Dir(PathBuf),
    /// The deterministic simulation's disk (see [`MemDisk`]); a task "writes" it.
    Memory(MemDisk),
}

/// Where durable writes go (the writer's side of [`Storage`]).
enum Durable {
    Dir(PathBuf),
    Memory(MemDisk),
}

/// How far the log is durable: the last Raft index written and `fdatasync`ed (everything before
/// it is durable or purged), or why the writer failed (for good).
#[derive(Debug, Clone)]
enum Flushed {
    Upto(Option<u64>),
    Failed(String),
}

/// Waits for the log to be durable up to an index (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Durability {
    rx: tokio::sync::watch::Receiver<Flushed>,
}

impl Durability {
    /// Returns once every entry up to Raft index `index` is durable; an error if the writer failed
    /// or stopped first.
    pub async fn wait_for(&self, index: u64) -> Result<(), String> {
        let reached = |f: &Flushed| match f {
            Flushed::Upto(i) => i.is_some_and(|i| i >= index),
            Flushed::Failed(_) => true,
        };
        let mut rx = self.rx.clone();
        match rx.wait_for(reached).await.as_deref() {
            Ok(Flushed::Failed(e)) => Err(format!("the Raft log could not be written: {e}")),
            Ok(Flushed::Upto(_)) => Ok(()),
            Err(_) => Err("the Raft log writer stopped".into()),
        }
    }
}

struct Inner {
    /// This member's id: its own entries, appended while it leads, are reported flushed at once.
    me: NodeId,
    flushed: tokio::sync::watch::Receiver<Flushed>,
    cache: Mutex<BTreeMap<u64, Entry<TypeConfig>>>,
    meta: Mutex<Meta>,
    last_log: Mutex<Option<LogId<NodeId>>>,
    tx: Mutex<Option<mpsc::UnboundedSender<Op>>>,
    durable: Durable,
}

/// The Raft log store. Cheap to clone (openraft wants a reader beside the store).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

/// A simulated disk for one member, for the deterministic simulation (`coordinator/tests/sim`):
/// it outlives the member's process, so a simulated crash keeps exactly what was made durable.
///
/// Appends become durable only when the writer task "fsyncs" them, after a latency drawn from a
/// seeded generator; a crash before that loses them, and their callbacks never fired, just as on
/// a real disk. The vote and the purge point are durable once `save_vote`/`purge` returned (the
/// disk version replaces `raft-meta` synchronously). Torn writes are not modelled.
#[derive(Clone)]
pub struct MemDisk {
    inner: Arc<Mutex<MemDiskInner>>,
}

struct MemDiskInner {
    meta: Meta,
    /// Durable records by WAL index (Raft index + 1).
    entries: BTreeMap<u64, wal::Entry>,
    votes: Vec<Vote<NodeId>>,
    rng: StdRng,
    max_fsync: Duration,
    /// Fault injection for the simulation's own tests: appends are acknowledged but never
    /// reach the disk (an fsync that lies), so a crash forgets the log.
    lying: bool,
}

impl MemDisk {
    /// An empty disk whose fsyncs take up to `max_fsync`, drawn from a generator seeded by `seed`.
    pub fn new(seed: u64, max_fsync: Duration) -> MemDisk {
        MemDisk {
            inner: Arc::new(Mutex::new(MemDiskInner {
                meta: Meta::default(),
                entries: BTreeMap::new(),
                votes: Vec::new(),
                rng: StdRng::seed_from_u64(seed),
                max_fsync,
                lying: false,
            })),
        }
    }

    /// A disk whose fsync lies: appends are acknowledged and never kept (to show that the
    /// simulation's checks catch a member that forgets acknowledged entries).
    pub fn lying(seed: u64, max_fsync: Duration) -> MemDisk {
        let d = MemDisk::new(seed, max_fsync);
        d.inner.lock().lying = true;
        d
    }

    /// Every vote ever made durable, in order (to check that no term gets two votes).
    pub fn votes(&self) -> Vec<Vote<NodeId>> {
        self.inner.lock().votes.clone()
    }

    /// The durable vote.
    pub fn vote(&self) -> Option<Vote<NodeId>> {
        self.inner.lock().meta.vote
    }

    /// The durable purge point.
    pub fn last_purged(&self) -> Option<LogId<NodeId>> {
        self.inner.lock().meta.last_purged
    }

    /// The durable log entries after the purge point, in order.
    pub fn entries(&self) -> crate::error::Result<Vec<Entry<TypeConfig>>> {
        let d = self.inner.lock();
        let purged = d.meta.last_purged.map(|l| l.index + 1);
        let mut out = Vec::new();
        for e in d.entries.values() {
            if purged.is_some_and(|p| e.index <= p) {
                continue;
            }
            out.push(bincode::deserialize(&e.data)?);
        }
        Ok(out)
    }

    fn fsync_latency(&self) -> Duration {
        let mut d = self.inner.lock();
        let max = d.max_fsync.as_micros() as u64;
        Duration::from_micros(if max == 0 {
            0
        } else {
            d.rng.random_range(0..=max)
        })
    }

    fn save_meta(&self, m: &Meta) {
        let mut d = self.inner.lock();
        if let Some(v) = m.vote
            && d.meta.vote != Some(v)
        {
            d.votes.push(v);
        }
        d.meta = m.clone();
    }
}

/// Where the writer puts what openraft hands over, in call order.
trait Sink {
    /// Append records and make them durable.
    fn append(&mut self, batch: &[wal::Entry]) -> std::io::Result<()>;
    /// Drop Raft index `i` and everything after it.
    fn truncate(&mut self, i: u64) -> std::io::Result<()>;
    /// Drop Raft index `i` and everything before it.
    fn purge(&mut self, i: u64) -> std::io::Result<()>;
}

impl Sink for Wal {
    fn append(&mut self, batch: &[wal::Entry]) -> std::io::Result<()> {
        Wal::append(self, batch).map_err(to_io)
    }
    fn truncate(&mut self, i: u64) -> std::io::Result<()> {
        self.truncate_from(i + 1).map_err(to_io)
    }
    fn purge(&mut self, i: u64) -> std::io::Result<()> {
        let r = if i + 1 >= self.last_index() {
            self.reset_to(i + 2)
        } else {
            self.purge_to(i + 1).map(|_| ())
        };
        r.map_err(to_io)
    }
}

impl Sink for MemDisk {
    fn append(&mut self, batch: &[wal::Entry]) -> std::io::Result<()> {
        let mut d = self.inner.lock();
        if d.lying {
            return Ok(());
        }
        for e in batch {
            // A record rewrites whatever was at its index and after it (the WAL truncates too).
            let _ = d.entries.split_off(&e.index);
            d.entries.insert(e.index, e.clone());
        }
        Ok(())
    }
    fn truncate(&mut self, i: u64) -> std::io::Result<()> {
        let _ = self.inner.lock().entries.split_off(&(i + 1));
        Ok(())
    }
    fn purge(&mut self, i: u64) -> std::io::Result<()> {
        let mut d = self.inner.lock();
        let keep = d.entries.split_off(&(i + 2));
        d.entries = keep;
        Ok(())
    }
}

fn io_err<E: std::error::Error + 'static>(verb: ErrorVerb, e: &E) -> StorageError<NodeId> {
    StorageIOError::new(ErrorSubject::Logs, verb, openraft::AnyError::new(e)).into()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl LogStore {
    /// Open the log in `dir` (created if missing) for member `me`.
    pub fn open(dir: &Path, me: NodeId) -> crate::error::Result<LogStore> {
        LogStore::open_storage(Storage::Dir(dir.to_path_buf()), me)
    }

    /// Open the log where `storage` says, for member `me`. [`Storage::Memory`] must be opened
    /// inside a Tokio runtime (its writer is a task).
    pub fn open_storage(storage: Storage, me: NodeId) -> crate::error::Result<LogStore> {
        let (tx, rx) = mpsc::unbounded_channel::<Op>();
        // What the log holds at start is on disk; the writer moves this on.
        let (flushed_tx, flushed) = tokio::sync::watch::channel(Flushed::Upto(None));
        let (meta, entries, durable) = match storage {
            Storage::Dir(dir) => {
                fs::create_dir_all(&dir)?;
                let meta_path = dir.join("raft-meta");
                let meta: Meta = match fs::read(&meta_path) {
                    Ok(b) => bincode::deserialize(&b)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Meta::default(),
                    Err(e) => return Err(e.into()),
                };
                let (mut wal, entries) = Wal::open(&dir.join("log"))?;
                let purged_index = meta.last_purged.map(|l| l.index).unwrap_or(0);
                // A log whose tail was purged past its end (a snapshot installed on a follower)
                // restarts right after the purge point.
                if meta.last_purged.is_some() && wal.last_index() < purged_index + 1 {
                    wal.reset_to(purged_index + 2)?;
                }
                let tx = flushed_tx.clone();
                std::thread::Builder::new()
                    .name("raft-log".into())
                    .spawn(move || disk_writer(wal, rx, tx))?;
                (meta, entries, Durable::Dir(meta_path))
            }
            Storage::Memory(disk) => {
                let (meta, entries) = {
                    let d = disk.inner.lock();
                    (d.meta.clone(), d.entries.values().cloned().collect())
                };
                tokio::spawn(memory_writer(disk.clone(), rx, flushed_tx.clone()));
                (meta, entries, Durable::Memory(disk))
            }
        };
        // A member that led when it stopped does not lead again in the same term (openraft
        // 0.9 resumes leadership at once when it finds its own committed vote): its own entries
        // were reported flushed before they were on disk, so a crash may have lost some that a
        // follower holds, and new entries of the same term at those indexes would carry the
        // very log ids the follower's differing entries carry — log matching broken (the
        // simulation found this). Read back as not committed, the vote keeps its term and
        // candidate (no second vote in the term is possible), and the member campaigns: a new
        // term, whose entries replace the lost ones wherever they are.
        let mut meta = meta;
        if let Some(v) = meta.vote.as_mut()
            && v.committed
            && v.leader_id.node_id == me
        {
            v.committed = false;
        }
        let purged_index = meta.last_purged.map(|l| l.index).unwrap_or(0);
        let mut cache = BTreeMap::new();
        for e in entries {
            if meta.last_purged.is_some() && e.index <= purged_index + 1 {
                continue;
            }
            let entry: Entry<TypeConfig> = bincode::deserialize(&e.data)?;
            cache.insert(entry.log_id.index, entry);
        }
        let last_log = cache
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(meta.last_purged);
        flushed_tx.send_modify(|f| {
            if let Flushed::Upto(i) = f {
                *i = (*i).max(last_log.map(|l| l.index));
            }
        });
        Ok(LogStore {
            inner: Arc::new(Inner {
                me,
                flushed,
                cache: Mutex::new(cache),
                meta: Mutex::new(meta),
                last_log: Mutex::new(last_log),
                tx: Mutex::new(Some(tx)),
                durable,
            }),
        })
    }

    /// The last log id held (appended, maybe not yet flushed).
    pub fn last_log_id(&self) -> Option<LogId<NodeId>> {
        *self.inner.last_log.lock()
    }

    /// The entries held (appended, maybe not yet flushed) in `range` of Raft indexes.
    pub fn entries(&self, range: impl RangeBounds<u64>) -> Vec<Entry<TypeConfig>> {
        let cache = self.inner.cache.lock();
        cache.range(range).map(|(_, e)| e.clone()).collect()
    }

    /// Waits for this log's durability (see the module docs).
    pub fn durability(&self) -> Durability {
        Durability {
            rx: self.inner.flushed.clone(),
        }
    }

    /// Stop the writer (after what was queued).
    pub fn close(&self) {
        self.inner.tx.lock().take();
    }

    fn send(&self, op: Op) -> Result<(), StorageError<NodeId>> {
        let tx = self.inner.tx.lock();
        let Some(tx) = tx.as_ref() else {
            return Err(io_err(
                ErrorVerb::Write,
                &std::io::Error::other("log store closed"),
            ));
        };
        tx.send(op)
            .map_err(|_| io_err(ErrorVerb::Write, &std::io::Error::other("log writer gone")))
    }

    fn save_meta(&self, m: &Meta) -> Result<(), StorageError<NodeId>> {
        match &self.inner.durable {
            Durable::Dir(path) => {
                let b = bincode::serialize(m).map_err(|e| io_err(ErrorVerb::Write, &e))?;
                write_atomic(path, &b).map_err(|e| io_err(ErrorVerb::Write, &e))
            }
            Durable::Memory(disk) => {
                disk.save_meta(m);
                Ok(())
            }
        }
    }

    async fn wait(
        rx: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    ) -> Result<(), StorageError<NodeId>> {
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io_err(ErrorVerb::Write, &e)),
            Err(e) => Err(io_err(ErrorVerb::Write, &e)),
        }
    }
}

type FlushedTx = tokio::sync::watch::Sender<Flushed>;

/// Production writer: everything queued is written with one `fdatasync`.
fn disk_writer(mut wal: Wal, mut rx: mpsc::UnboundedReceiver<Op>, flushed: FlushedTx) {
    let mut pending: Vec<Op> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        pending.push(first);
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        write_ops(&mut wal, &mut pending, &flushed);
    }
}

/// Simulation writer: the same batching, with a simulated fsync latency before the batch is
/// durable.
async fn memory_writer(mut disk: MemDisk, mut rx: mpsc::UnboundedReceiver<Op>, flushed: FlushedTx) {
    let mut pending: Vec<Op> = Vec::new();
    while let Some(first) = rx.recv().await {
        pending.push(first);
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        let latency = disk.fsync_latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        write_ops(&mut disk, &mut pending, &flushed);
    }
}

/// Carry out queued operations in call order: appends gathered into one durable write, and a
/// truncate or purge after the appends queued before it.
fn write_ops(sink: &mut impl Sink, pending: &mut Vec<Op>, flushed: &FlushedTx) {
    let mut batch: Vec<wal::Entry> = Vec::new();
    let mut callbacks: Vec<LogFlushed<TypeConfig>> = Vec::new();
    for op in pending.drain(..) {
        match op {
            Op::Append(entries, cb) => {
                batch.extend(entries);
                callbacks.extend(cb);
            }
            Op::Truncate(i, done) => {
                flush(sink, &mut batch, &mut callbacks, flushed);
                let r = sink.truncate(i);
                if r.is_ok() {
                    // Index `i` and after are gone: what comes there next is not durable yet.
                    flushed.send_modify(|f| {
                        if let Flushed::Upto(upto) = f {
                            *upto = (*upto).min(i.checked_sub(1));
                        }
                    });
                }
                let _ = done.send(r);
            }
            Op::Purge(i, done) => {
                flush(sink, &mut batch, &mut callbacks, flushed);
                let _ = done.send(sink.purge(i));
            }
        }
    }
    flush(sink, &mut batch, &mut callbacks, flushed);
}

fn to_io(e: crate::error::Error) -> std::io::Error {
    match e {
        crate::error::Error::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

fn flush(
    sink: &mut impl Sink,
    batch: &mut Vec<wal::Entry>,
    callbacks: &mut Vec<LogFlushed<TypeConfig>>,
    flushed: &FlushedTx,
) {
    if batch.is_empty() && callbacks.is_empty() {
        return;
    }
    let r = sink.append(batch);
    // The WAL counts from 1, Raft from 0.
    let last = batch.last().map(|e| e.index - 1);
    batch.clear();
    flushed.send_modify(|f| {
        if matches!(f, Flushed::Failed(_)) {
            return;
        }
        match &r {
            Ok(()) if last.is_some() => *f = Flushed::Upto(last),
            Ok(()) => {}
            Err(e) => *f = Flushed::Failed(e.to_string()),
        }
    });
    for cb in callbacks.drain(..) {
        match &r {
            Ok(()) => cb.log_io_completed(Ok(())),
            Err(e) => cb.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let cache = self.inner.cache.lock();
        Ok(cache.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged = self.inner.meta.lock().last_purged;
        let last = *self.inner.last_log.lock();
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut m = self.inner.meta.lock().clone();
        m.vote = Some(*vote);
        self.save_meta(&m)?;
        *self.inner.meta.lock() = m;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.meta.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Kept in memory only: losing it costs a re-apply from the state machine's own index.
        self.inner.meta.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.meta.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut records = Vec::new();
        // This member's own entries while it leads: reported flushed at once (module docs).
        let leading = self
            .inner
            .meta
            .lock()
            .vote
            .filter(|v| v.committed && v.leader_id.node_id == self.inner.me);
        let mut own = leading.is_some();
        {
            let mut cache = self.inner.cache.lock();
            let mut last = self.inner.last_log.lock();
            for e in entries {
                own &= leading.is_some_and(|v| e.log_id.leader_id == v.leader_id);
                let data = bincode::serialize(&e).map_err(|err| io_err(ErrorVerb::Write, &err))?;
                records.push(wal::Entry {
                    index: e.log_id.index + 1,
                    term: e.log_id.leader_id.term,
                    data,
                });
                *last = Some(e.log_id);
                cache.insert(e.log_id.index, e);
            }
        }
        if own && !records.is_empty() {
            self.send(Op::Append(records, None))?;
            callback.log_io_completed(Ok(()));
            Ok(())
        } else {
            self.send(Op::Append(records, Some(callback)))
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        {
            let mut cache = self.inner.cache.lock();
            let _ = cache.split_off(&log_id.index);
            let prev = cache.values().next_back().map(|e| e.log_id);
            *self.inner.last_log.lock() = prev.or(self.inner.meta.lock().last_purged);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Truncate(log_id.index, tx))?;
        Self::wait(rx).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut m = self.inner.meta.lock().clone();
        m.last_purged = Some(log_id);
        self.save_meta(&m)?;
        *self.inner.meta.lock() = m;
        {
            let mut cache = self.inner.cache.lock();
            let keep = cache.split_off(&(log_id.index + 1));
            *cache = keep;
            let mut last = self.inner.last_log.lock();
            if last.is_none_or(|l| l.index < log_id.index) {
                *last = Some(log_id);
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Purge(log_id.index, tx))?;
        Self::wait(rx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that keeps nothing and fails when told to.
    struct Sink1 {
        fail: bool,
    }

    impl Sink for Sink1 {
        fn append(&mut self, _: &[wal::Entry]) -> std::io::Result<()> {
            if self.fail {
                Err(std::io::Error::other("disk full"))
            } else {
                Ok(())
            }
        }
        fn truncate(&mut self, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn purge(&mut self, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Records for Raft indexes `from..=to` (the WAL counts from 1).
    fn records(from: u64, to: u64) -> Vec<wal::Entry> {
        (from..=to)
            .map(|i| wal::Entry {
                index: i + 1,
                term: 1,
                data: vec![i as u8],
            })
            .collect()
    }

    fn reached(d: &Durability, index: u64) -> Option<Result<(), String>> {
        futures::FutureExt::now_or_never(d.wait_for(index))
    }

    #[tokio::test]
    async fn durability_follows_what_the_writer_made_durable_and_drops_with_a_truncation() {
        let (tx, rx) = tokio::sync::watch::channel(Flushed::Upto(None));
        let d = Durability { rx };
        let mut sink = Sink1 { fail: false };
        assert_eq!(reached(&d, 0), None, "nothing written yet");
        write_ops(&mut sink, &mut vec![Op::Append(records(0, 3), None)], &tx);
        assert_eq!(reached(&d, 3), Some(Ok(())));
        assert_eq!(reached(&d, 4), None, "index 4 was never written");
        // Truncating from 2 takes 2 and 3 away: a new entry there is not durable until written.
        let (done, _) = tokio::sync::oneshot::channel();
        write_ops(&mut sink, &mut vec![Op::Truncate(2, done)], &tx);
        assert_eq!(reached(&d, 1), Some(Ok(())));
        assert_eq!(reached(&d, 2), None);
        write_ops(&mut sink, &mut vec![Op::Append(records(2, 2), None)], &tx);
        assert_eq!(reached(&d, 2), Some(Ok(())));
    }

    #[tokio::test]
    async fn a_failed_log_write_fails_every_wait_for_good() {
        let (tx, rx) = tokio::sync::watch::channel(Flushed::Upto(None));
        let d = Durability { rx };
        write_ops(
            &mut Sink1 { fail: true },
            &mut vec![Op::Append(records(0, 1), None)],
            &tx,
        );
        let err = reached(&d, 1)
            .expect("answered at once")
            .expect_err("failed");
        assert!(err.contains("disk full"), "{err}");
        // A later successful write does not make the lost entries durable.
        write_ops(
            &mut Sink1 { fail: false },
            &mut vec![Op::Append(records(2, 2), None)],
            &tx,
        );
        assert!(matches!(reached(&d, 0), Some(Err(_))));
    }

    #[tokio::test]
    async fn a_member_that_led_reads_its_vote_back_uncommitted_and_others_votes_unchanged() {
        let disk = MemDisk::new(1, Duration::ZERO);
        let mut log = LogStore::open_storage(Storage::Memory(disk.clone()), 1).expect("open");
        let mine = Vote::new_committed(3, 1);
        log.save_vote(&mine).await.expect("vote");
        log.close();
        let mut again = LogStore::open_storage(Storage::Memory(disk.clone()), 1).expect("reopen");
        let read = again.read_vote().await.expect("read").expect("a vote");
        assert_eq!(read.leader_id, mine.leader_id, "same term and candidate");
        assert!(!read.committed, "it must campaign, not resume leading");
        // Member 2 reads member 1's committed vote as it is (it follows that leader).
        let other = LogStore::open_storage(Storage::Memory(disk), 2)
            .expect("open as 2")
            .read_vote()
            .await
            .expect("read")
            .expect("a vote");
        assert_eq!(other, mine);
    }
}
