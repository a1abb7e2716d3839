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

#![allow(clippy::result_large_err, clippy::type_complexity)] // openraft fixes these error and state types.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs;
use std::io::Write;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as smpsc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

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

struct Inner {
    cache: Mutex<BTreeMap<u64, Entry<TypeConfig>>>,
    meta: Mutex<Meta>,
    last_log: Mutex<Option<LogId<NodeId>>>,
    tx: Mutex<Option<smpsc::Sender<Op>>>,
    meta_path: PathBuf,
}

/// The Raft log store. Cheap to clone (openraft wants a reader beside the store).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
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
        fs::create_dir_all(dir)?;
        let meta_path = dir.join("raft-meta");
        let meta: Meta = match fs::read(&meta_path) {
            Ok(b) => bincode::deserialize(&b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(e.into()),
        };
        let (mut wal, entries) = Wal::open(&dir.join("log"))?;
        let purged_index = meta.last_purged.map(|l| l.index).unwrap_or(0);
        let mut cache = BTreeMap::new();
        for e in entries {
            if meta.last_purged.is_some() && e.index <= purged_index + 1 {
                continue;
            }
            let entry: Entry<TypeConfig> = bincode::deserialize(&e.data)?;
            cache.insert(entry.log_id.index, entry);
        }
        // A log whose tail was purged past its end (a snapshot installed on a follower) restarts
        // right after the purge point.
        if meta.last_purged.is_some() && wal.last_index() < purged_index + 1 {
            wal.reset_to(purged_index + 2)?;
        }
        let last_log = cache
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(meta.last_purged);
        let (tx, rx) = smpsc::channel::<Op>();
        std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || writer(wal, rx))?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                cache: Mutex::new(cache),
                meta: Mutex::new(meta),
                last_log: Mutex::new(last_log),
                tx: Mutex::new(Some(tx)),
                meta_path,
            }),
        })
    }

    /// The last log id held (appended, maybe not yet flushed).
    pub fn last_log_id(&self) -> Option<LogId<NodeId>> {
        *self.inner.last_log.lock()
    }

    /// Stop the writer thread (after what was queued).
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
        let b = bincode::serialize(m).map_err(|e| io_err(ErrorVerb::Write, &e))?;
        write_atomic(&self.inner.meta_path, &b).map_err(|e| io_err(ErrorVerb::Write, &e))
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

fn writer(mut wal: Wal, rx: smpsc::Receiver<Op>) {
    let mut pending: Vec<Op> = Vec::new();
    while let Ok(first) = rx.recv() {
        pending.push(first);
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        let mut batch: Vec<wal::Entry> = Vec::new();
        let mut callbacks: Vec<LogFlushed<TypeConfig>> = Vec::new();
        for op in pending.drain(..) {
            match op {
                Op::Append(entries, cb) => {
                    batch.extend(entries);
                    callbacks.push(cb);
                }
                other => {
                    // Keep order: flush the appends gathered so far, then do this op.
                    flush(&mut wal, &mut batch, &mut callbacks);
                    match other {
                        Op::Truncate(i, done) => {
                            let _ = done.send(wal.truncate_from(i + 1).map_err(to_io));
                        }
                        Op::Purge(i, done) => {
                            let r = if i + 1 >= wal.last_index() {
                                wal.reset_to(i + 2)
                            } else {
                                wal.purge_to(i + 1).map(|_| ())
                            };
                            let _ = done.send(r.map_err(to_io));
                        }
                        Op::Append(..) => {}
                    }
                }
            }
        }
        flush(&mut wal, &mut batch, &mut callbacks);
    }
}

fn to_io(e: crate::error::Error) -> std::io::Error {
    match e {
        crate::error::Error::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

fn flush(wal: &mut Wal, batch: &mut Vec<wal::Entry>, callbacks: &mut Vec<LogFlushed<TypeConfig>>) {
    if callbacks.is_empty() {
        return;
    }
    let r = wal.append(batch);
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
