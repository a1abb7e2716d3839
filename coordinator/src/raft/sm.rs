//! openraft's state machine: the same `apply` as the single-member mode, plus snapshots.
//!
//! Committed entries are applied in one sled batch per call, together with the last applied log
//! id and the membership, so a crash leaves the state machine at a batch boundary it can resume
//! from (the log replays the rest). After the batch lands, its events go to the watch hub and the
//! lease hooks run, exactly as in [`crate::node`]. An entry that holds a [`Command::Batch`]
//! (see [`super::batch`]) gives one outcome per command in it, in order.
//!
//! A snapshot is every backend entry (records, leases, meta) at one consistent point, fixed
//! under the state's read lock; the lock is released before the (long) copy, which runs while
//! entries go on being applied (`state::visit_all_released`). Installing one replaces the
//! backend's contents in one batch and rebuilds the index. Snapshots are held in memory (the key space is expected to fit; the
//! whole store is scanned to build one).

#![allow(clippy::result_large_err, clippy::type_complexity)] // openraft fixes these error and state types.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use parking_lot::{Mutex, RwLock};

use super::{EntryOutcome, MemberNode, TypeConfig};
use crate::command::Command;
use crate::lease::Lessor;
use crate::metrics::CoordinatorMetrics;
use crate::mvcc::{Backend, Batch};
use crate::state::{OutcomeWire, OutcomeWireExt, Response, StateMachine};
use crate::watch::WatchHub;

type NodeId = u64;

/// Meta key: last applied log id (bincode).
const META_RAFT_APPLIED: &[u8] = b"mraft_last_applied";
/// Meta key: last membership (bincode).
const META_RAFT_MEMBERSHIP: &[u8] = b"mraft_membership";

fn sm_err<E: std::error::Error + 'static>(verb: ErrorVerb, e: &E) -> StorageError<NodeId> {
    StorageIOError::new(ErrorSubject::StateMachine, verb, openraft::AnyError::new(e)).into()
}

struct Stored {
    meta: SnapshotMeta<NodeId, MemberNode>,
    data: Vec<u8>,
}

/// The state machine store handed to openraft. Cheap to clone.
#[derive(Clone)]
pub struct SmStore {
    state: Arc<RwLock<StateMachine>>,
    hub: Arc<WatchHub>,
    lessor: Arc<Lessor>,
    metrics: CoordinatorMetrics,
    applied: Arc<Mutex<(Option<LogId<NodeId>>, StoredMembership<NodeId, MemberNode>)>>,
    current: Arc<Mutex<Option<Stored>>>,
    /// Build snapshots on the calling task rather than a blocking thread (the deterministic
    /// simulation, whose in-memory backend never waits on a disk).
    inline_snapshots: bool,
    due: Arc<SnapshotDue>,
    /// The Raft log's durability: nothing is applied before it is on this member's disk (the
    /// leader reports its own appends flushed early; see `log_store`).
    durable: super::log_store::Durability,
}

/// When a snapshot is due: every `--snapshot-count` *commands* applied, batched or not (a
/// batch is one entry, and openraft's own policy counts entries only, so with batches of
/// hundreds of commands the log, and a replay after a crash, would grow hundreds of times
/// longer between snapshots than the flag says).
pub struct SnapshotDue {
    every: u64,
    applied: AtomicU64,
    at_last: AtomicU64,
    wake: tokio::sync::Notify,
}

impl SnapshotDue {
    /// Whether `every` commands were applied since the last snapshot was taken.
    pub fn is_due(&self) -> bool {
        let applied = self.applied.load(Ordering::Acquire);
        applied.saturating_sub(self.at_last.load(Ordering::Acquire)) >= self.every
    }

    /// Returns once a snapshot may be due (check [`Self::is_due`]).
    pub async fn wait(&self) {
        self.wake.notified().await
    }
}

impl SmStore {
    /// Wrap an opened state machine.
    pub fn new(
        state: Arc<RwLock<StateMachine>>,
        hub: Arc<WatchHub>,
        lessor: Arc<Lessor>,
        metrics: CoordinatorMetrics,
        inline_snapshots: bool,
        snapshot_count: u64,
        durable: super::log_store::Durability,
    ) -> crate::error::Result<SmStore> {
        let (applied, membership) = {
            let st = state.read();
            let b = st.store().backend();
            let applied = match b.get(META_RAFT_APPLIED)? {
                Some(v) => bincode::deserialize(&v)?,
                None => None,
            };
            let membership = match b.get(META_RAFT_MEMBERSHIP)? {
                Some(v) => bincode::deserialize(&v)?,
                None => StoredMembership::default(),
            };
            (applied, membership)
        };
        Ok(SmStore {
            state,
            hub,
            lessor,
            metrics,
            applied: Arc::new(Mutex::new((applied, membership))),
            current: Arc::new(Mutex::new(None)),
            inline_snapshots,
            due: Arc::new(SnapshotDue {
                every: snapshot_count.max(1),
                applied: AtomicU64::new(0),
                at_last: AtomicU64::new(0),
                wake: tokio::sync::Notify::new(),
            }),
            durable,
        })
    }

    /// When the next snapshot is due (by commands applied).
    pub fn snapshot_due(&self) -> Arc<SnapshotDue> {
        self.due.clone()
    }

    /// The membership last applied (for member lists).
    pub fn membership(&self) -> StoredMembership<NodeId, MemberNode> {
        self.applied.lock().1.clone()
    }

    fn dump(
        &self,
    ) -> Result<
        (
            Vec<u8>,
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, MemberNode>,
        ),
        StorageError<NodeId>,
    > {
        let st = self.state.read();
        let (applied, membership) = self.applied.lock().clone();
        // Every command applied so far is in this snapshot (apply holds the write lock).
        self.due
            .at_last
            .store(self.due.applied.load(Ordering::Acquire), Ordering::Release);
        let backend = st.store().backend().clone();
        let mut entries = EntriesEncoder::default();
        crate::state::visit_all_released(st, &mut |k, v| {
            entries.push(k, v);
            true
        })
        .map_err(|e| sm_err(ErrorVerb::Read, &e))?;
        // openraft purges the log behind a snapshot: everything it covers must be durable in
        // sled first (the snapshot itself lives in memory only).
        backend.flush().map_err(|e| sm_err(ErrorVerb::Write, &e))?;
        Ok((entries.finish(), applied, membership))
    }
}

/// A snapshot's bytes, encoded while the key space is visited rather than after it was
/// collected (which held a second copy of the whole store): bincode's encoding of a
/// `Vec<(Vec<u8>, Vec<u8>)>` — the count, then each key and value as length and bytes, every
/// length a little-endian u64 — which `install_snapshot` decodes with `bincode::deserialize`.
struct EntriesEncoder {
    buf: Vec<u8>,
    count: u64,
}

impl Default for EntriesEncoder {
    fn default() -> EntriesEncoder {
        EntriesEncoder {
            // The count goes first; it is known at the end.
            buf: vec![0; 8],
            count: 0,
        }
    }
}

impl EntriesEncoder {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        for bytes in [key, value] {
            self.buf
                .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            self.buf.extend_from_slice(bytes);
        }
        self.count += 1;
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf[..8].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SmStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (data, applied, membership) = if self.inline_snapshots {
            self.dump()?
        } else {
            let this = self.clone();
            tokio::task::spawn_blocking(move || this.dump())
                .await
                .map_err(|e| sm_err(ErrorVerb::Read, &e))??
        };
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "0-0-0".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        *self.current.lock() = Some(Stored {
            meta: meta.clone(),
            data: data.clone(),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for SmStore {
    type SnapshotBuilder = SmStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, MemberNode>), StorageError<NodeId>>
    {
        Ok(self.applied.lock().clone())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<EntryOutcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let entries: Vec<openraft::Entry<TypeConfig>> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            self.durable
                .wait_for(last.log_id.index)
                .await
                .map_err(|e| sm_err(ErrorVerb::Write, &std::io::Error::other(e)))?;
        }
        let started = std::time::Instant::now();
        let mut outs = Vec::new();
        let mut done = Vec::new();
        {
            let mut st = self.state.write();
            let mut applied = self.applied.lock();
            for e in entries {
                applied.0 = Some(e.log_id);
                let cmd = match e.payload {
                    EntryPayload::Blank => Command::Noop,
                    EntryPayload::Normal(c) => c,
                    EntryPayload::Membership(m) => {
                        applied.1 = StoredMembership::new(Some(e.log_id), m);
                        Command::Noop
                    }
                };
                // One outcome per command the entry holds (a batch holds several).
                match st.apply_entry(e.log_id.index, e.log_id.leader_id.term, &cmd) {
                    Some(list) => {
                        outs.push(EntryOutcome(
                            list.iter()
                                .map(|a| OutcomeWire::from_result(a.revision, &a.result))
                                .collect(),
                        ));
                        done.push((cmd, list));
                    }
                    None => outs.push(EntryOutcome(vec![OutcomeWire::from_result(
                        st.revision(),
                        &Ok(Response::Noop),
                    )])),
                }
            }
            let a = bincode::serialize(&applied.0).map_err(|e| sm_err(ErrorVerb::Write, &e))?;
            let m = bincode::serialize(&applied.1).map_err(|e| sm_err(ErrorVerb::Write, &e))?;
            st.stage(META_RAFT_APPLIED.to_vec(), Some(a));
            st.stage(META_RAFT_MEMBERSHIP.to_vec(), Some(m));
            st.commit().map_err(|e| sm_err(ErrorVerb::Write, &e))?;
        }
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        let commands: usize = done.iter().map(|(_, list)| list.len()).sum();
        self.due
            .applied
            .fetch_add(commands as u64, Ordering::AcqRel);
        if self.due.is_due() {
            self.due.wake.notify_one();
        }
        for (cmd, list) in done {
            for (c, a) in cmd.commands().iter().zip(list) {
                self.hub.publish(a.revision, &a.events);
                match (&a.result, c.unwrapped()) {
                    (Ok(Response::LeaseGrant { id, ttl }), _) => self.lessor.granted(*id, *ttl),
                    (Ok(Response::LeaseRevoke), Command::LeaseRevoke { id }) => {
                        self.lessor.revoked(*id)
                    }
                    _ => {}
                }
                self.metrics.applied.inc();
            }
        }
        Ok(outs)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MemberNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let entries: Vec<(Vec<u8>, Vec<u8>)> =
            bincode::deserialize(&data).map_err(|e| sm_err(ErrorVerb::Read, &e))?;
        let (rev, backend) = {
            let mut st = self.state.write();
            let backend: Arc<dyn Backend> = st.store().backend().clone();
            let mut batch = Batch::default();
            backend
                .scan(&[0], &[0xff], &mut |k, _| {
                    batch.delete(k.to_vec());
                    true
                })
                .map_err(|e| sm_err(ErrorVerb::Write, &e))?;
            for (k, v) in entries {
                batch.put(k, v);
            }
            backend
                .apply(batch)
                .map_err(|e| sm_err(ErrorVerb::Write, &e))?;
            let fresh =
                StateMachine::open(backend.clone()).map_err(|e| sm_err(ErrorVerb::Read, &e))?;
            st.replace(fresh);
            *self.applied.lock() = (meta.last_log_id, meta.last_membership.clone());
            (st.revision(), backend)
        };
        // openraft purges the log up to the snapshot once this returns: the installed state
        // must be durable first, or a crash would leave a state machine behind a purged log.
        backend.flush().map_err(|e| sm_err(ErrorVerb::Write, &e))?;
        self.hub.reset_after_snapshot(rev);
        *self.current.lock() = Some(Stored {
            meta: meta.clone(),
            data,
        });
        tracing::info!(snapshot = %meta.snapshot_id, revision = rev, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.current.lock().as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::EntriesEncoder;

    #[test]
    fn snapshot_encoding_is_what_install_decodes() {
        let sets: [Vec<(Vec<u8>, Vec<u8>)>; 3] = [
            Vec::new(),
            vec![(b"k".to_vec(), Vec::new())],
            (0..300u32)
                .map(|i| (i.to_be_bytes().to_vec(), vec![i as u8; i as usize % 70]))
                .collect(),
        ];
        for entries in sets {
            let mut enc = EntriesEncoder::default();
            for (k, v) in &entries {
                enc.push(k, v);
            }
            let bytes = enc.finish();
            assert_eq!(bytes, bincode::serialize(&entries).expect("bincode"));
            let back: Vec<(Vec<u8>, Vec<u8>)> = bincode::deserialize(&bytes).expect("decode");
            assert_eq!(back, entries);
        }
    }
}
