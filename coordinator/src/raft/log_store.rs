//! openraft's log storage on our write-ahead log, with group commit.
//!
//! openraft hands every client write to `append` on its own, but lets the store report
//! durability later through a callback. So `append` only puts the entries in the in-memory cache
//! (openraft may read them back at once to replicate them) and queues them for the writer
//! thread; the writer takes everything queued, writes it, `fdatasync`s once and then fires every
//! callback. Truncations and purges travel through the same queue, so disk order is call order.
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
    Append(Vec<wal::Entry>, LogFlushed<TypeConfig>),
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

struct Inner {
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
    /// Open the log in `dir` (created if missing).
    pub fn open(dir: &Path) -> crate::error::Result<LogStore> {
        LogStore::open_storage(Storage::Dir(dir.to_path_buf()))
    }

    /// Open the log where `storage` says. [`Storage::Memory`] must be opened inside a Tokio
    /// runtime (its writer is a task).
    pub fn open_storage(storage: Storage) -> crate::error::Result<LogStore> {
        let (tx, rx) = mpsc::unbounded_channel::<Op>();
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
                std::thread::Builder::new()
                    .name("raft-log".into())
                    .spawn(move || disk_writer(wal, rx))?;
                (meta, entries, Durable::Dir(meta_path))
            }
            Storage::Memory(disk) => {
                let (meta, entries) = {
                    let d = disk.inner.lock();
                    (d.meta.clone(), d.entries.values().cloned().collect())
                };
                tokio::spawn(memory_writer(disk.clone(), rx));
                (meta, entries, Durable::Memory(disk))
            }
        };
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
        Ok(LogStore {
            inner: Arc::new(Inner {
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

/// Production writer: everything queued is written with one `fdatasync`.
fn disk_writer(mut wal: Wal, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut pending: Vec<Op> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        pending.push(first);
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        write_ops(&mut wal, &mut pending);
    }
}

/// Simulation writer: the same batching, with a simulated fsync latency before the batch is
/// durable.
async fn memory_writer(mut disk: MemDisk, mut rx: mpsc::UnboundedReceiver<Op>) {
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
        write_ops(&mut disk, &mut pending);
    }
}

/// Carry out queued operations in call order: appends gathered into one durable write, and a
/// truncate or purge after the appends queued before it.
fn write_ops(sink: &mut impl Sink, pending: &mut Vec<Op>) {
    let mut batch: Vec<wal::Entry> = Vec::new();
    let mut callbacks: Vec<LogFlushed<TypeConfig>> = Vec::new();
    for op in pending.drain(..) {
        match op {
            Op::Append(entries, cb) => {
                batch.extend(entries);
                callbacks.push(cb);
            }
            Op::Truncate(i, done) => {
                flush(sink, &mut batch, &mut callbacks);
                let _ = done.send(sink.truncate(i));
            }
            Op::Purge(i, done) => {
                flush(sink, &mut batch, &mut callbacks);
                let _ = done.send(sink.purge(i));
            }
        }
    }
    flush(sink, &mut batch, &mut callbacks);
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
) {
    if callbacks.is_empty() {
        return;
    }
    let r = sink.append(batch);
    batch.clear();
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
        {
            let mut cache = self.inner.cache.lock();
            let mut last = self.inner.last_log.lock();
            for e in entries {
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
        self.send(Op::Append(records, callback))
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
