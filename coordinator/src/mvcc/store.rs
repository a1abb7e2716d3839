//! The MVCC store: an in-memory index of every key's revisions over a backend of records.
//!
//! Rules (etcd's):
//! - The store starts at revision 1. Each write transaction that changes something takes the
//!   next revision; writes inside one transaction share it and differ in sub revision.
//! - A key's `create_revision` is the revision of the put that created it after its last delete,
//!   `version` counts puts since then (1 on create), `mod_revision` is its last change.
//! - A delete writes a tombstone; the key reads as absent from then on.
//! - Reads at revision `r` see the newest version with `mod_revision <= r`. `r` must be in
//!   `[compact_revision, current_revision]`.
//! - Compaction at `c` drops every version older than the newest one at or before `c`, and drops
//!   tombstones older than `c`, so the state at `c` stays readable and later history is intact.
//!
//! Writes happen through [`MvccStore::begin_write`]: a [`WriteTxn`] stages records and index
//! changes, and [`MvccStore::commit`] lands one backend batch for all transactions applied since
//! the last commit, so a crash leaves all of a batch or none of it.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use proto::mvccpb::{Event, KeyValue, event::EventType};

use super::backend::{Backend, Batch};
use super::keys::{self, Record, Revision, rev_key};
use crate::command::{KeyRange, RangeReq, SortOrder, SortTarget};
use crate::error::{Error, Result};

/// One version of a key, as the index knows it (no value: that stays in the backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    rev: Revision,
    create: i64,
    version: i64,
    lease: i64,
    tombstone: bool,
}

/// The answer to a range.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RangeResult {
    /// Key-values, after sort and limit.
    pub kvs: Vec<KeyValue>,
    /// Whether the limit cut the result short.
    pub more: bool,
    /// Keys in the range at that revision (before the limit).
    pub count: i64,
    /// Revision the range was read at.
    pub revision: i64,
}

/// The multi-version key space.
pub struct MvccStore {
    backend: Arc<dyn Backend>,
    index: BTreeMap<Vec<u8>, Vec<Entry>>,
    current_rev: i64,
    compact_rev: i64,
    /// Records written since the last commit (readable before they reach the backend).
    pending: HashMap<Revision, Vec<u8>>,
    batch: Batch,
    live_keys: i64,
}

impl MvccStore {
    /// Open the store over `backend`, rebuilding the index from the records found there.
    pub fn open(backend: Arc<dyn Backend>) -> Result<MvccStore> {
        let mut index: BTreeMap<Vec<u8>, Vec<Entry>> = BTreeMap::new();
        let mut err = None;
        backend.scan(&[keys::REV], &[keys::REV + 1], &mut |k, v| {
            let parsed = keys::parse_rev_key(k).and_then(|rev| Ok((rev, Record::decode(v)?)));
            match parsed {
                Ok((rev, rec)) => {
                    let e = Entry {
                        rev,
                        create: rec.create,
                        version: rec.version,
                        lease: rec.lease,
                        tombstone: rec.tombstone,
                    };
                    index.entry(rec.key).or_default().push(e);
                    true
                }
                Err(e) => {
                    err = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        let current_rev = match backend.get(keys::META_REVISION)? {
            Some(v) => keys::decode_i64(&v)?,
            None => 1,
        };
        let compact_rev = match backend.get(keys::META_COMPACT)? {
            Some(v) => keys::decode_i64(&v)?,
            None => 0,
        };
        let live_keys = index
            .values()
            .filter(|es| es.last().is_some_and(|e| !e.tombstone))
            .count() as i64;
        Ok(MvccStore {
            backend,
            index,
            current_rev,
            compact_rev,
            pending: HashMap::new(),
            batch: Batch::default(),
            live_keys,
        })
    }

    /// The backend (for leases and meta values kept beside the key space).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The current revision.
    pub fn current_revision(&self) -> i64 {
        self.current_rev
    }

    /// The compacted revision (0 if never compacted).
    pub fn compact_revision(&self) -> i64 {
        self.compact_rev
    }

    /// Number of keys that exist at the current revision.
    pub fn live_keys(&self) -> i64 {
        self.live_keys
    }

    /// Queue a write of a non-record value (lease, meta) into the next commit.
    pub fn stage(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        match value {
            Some(v) => self.batch.put(key, v),
            None => self.batch.delete(key),
        }
    }

    /// Land everything staged since the last commit in one atomic backend batch, together with
    /// the current and compacted revision.
    pub fn commit(&mut self) -> Result<()> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.put(
            keys::META_REVISION.to_vec(),
            self.current_rev.to_le_bytes().to_vec(),
        );
        batch.put(
            keys::META_COMPACT.to_vec(),
            self.compact_rev.to_le_bytes().to_vec(),
        );
        let res = self.backend.apply(batch);
        self.pending.clear();
        res
    }

    fn check_read_revision(&self, rev: i64) -> Result<i64> {
        let rev = if rev <= 0 { self.current_rev } else { rev };
        if rev > self.current_rev {
            return Err(Error::FutureRevision);
        }
        if rev < self.compact_rev {
            return Err(Error::Compacted {
                compact_revision: self.compact_rev,
            });
        }
        Ok(rev)
    }

    /// Check that a range could be served (revision in bounds) without serving it.
    pub fn validate_range(&self, req: &RangeReq) -> Result<()> {
        self.check_read_revision(req.revision).map(|_| ())
    }

    fn record(&self, rev: Revision) -> Result<Record> {
        if let Some(b) = self.pending.get(&rev) {
            return Record::decode(b);
        }
        match self.backend.get(&rev_key(rev))? {
            Some(b) => Record::decode(&b),
            None => Err(Error::Corrupt(format!(
                "index names revision {rev:?} but no record exists"
            ))),
        }
    }

    fn entry_at(entries: &[Entry], rev: i64) -> Option<&Entry> {
        let idx = entries.partition_point(|e| e.rev.main <= rev);
        if idx == 0 {
            return None;
        }
        let e = &entries[idx - 1];
        if e.tombstone { None } else { Some(e) }
    }

    fn iter_range<'a>(
        &'a self,
        range: &'a KeyRange,
    ) -> Box<dyn Iterator<Item = (&'a Vec<u8>, &'a Vec<Entry>)> + 'a> {
        if range.is_single() {
            return Box::new(self.index.get_key_value(&range.key).into_iter());
        }
        let lo = Bound::Included(range.key.as_slice());
        let hi = if range.end.as_slice() == [0] {
            Bound::Unbounded
        } else if range.end.as_slice() <= range.key.as_slice() {
            return Box::new(std::iter::empty());
        } else {
            Bound::Excluded(range.end.as_slice())
        };
        Box::new(self.index.range::<[u8], _>((lo, hi)))
    }

    fn kv_from(&self, key: &[u8], e: &Entry, with_value: bool) -> Result<KeyValue> {
        let value = if with_value {
            self.record(e.rev)?.value
        } else {
            Vec::new()
        };
        Ok(KeyValue {
            key: key.to_vec(),
            create_revision: e.create,
            mod_revision: e.rev.main,
            version: e.version,
            value,
            lease: e.lease,
        })
    }

    /// Read a range with every etcd option.
    pub fn range(&self, req: &RangeReq) -> Result<RangeResult> {
        let rev = self.check_read_revision(req.revision)?;
        self.range_at(req, rev)
    }

    /// `range` at a revision already checked against the bounds.
    fn range_at(&self, req: &RangeReq, rev: i64) -> Result<RangeResult> {
        let filtered = req.min_mod_revision > 0
            || req.max_mod_revision > 0
            || req.min_create_revision > 0
            || req.max_create_revision > 0;
        let mut order = req.sort_order;
        if req.sort_target != SortTarget::Key && order == SortOrder::None {
            order = SortOrder::Ascend;
        }
        let key_sorted = req.sort_target == SortTarget::Key && order != SortOrder::Descend;
        let mut hits: Vec<(&Vec<u8>, Entry)> = Vec::new();
        let mut count = 0i64;
        for (k, entries) in self.iter_range(&req.range) {
            let Some(e) = Self::entry_at(entries, rev) else {
                continue;
            };
            if filtered {
                if req.min_mod_revision > 0 && e.rev.main < req.min_mod_revision {
                    continue;
                }
                if req.max_mod_revision > 0 && e.rev.main > req.max_mod_revision {
                    continue;
                }
                if req.min_create_revision > 0 && e.create < req.min_create_revision {
                    continue;
                }
                if req.max_create_revision > 0 && e.create > req.max_create_revision {
                    continue;
                }
            }
            count += 1;
            // Without a sort we can stop collecting at the limit, but keep counting.
            if key_sorted && req.limit > 0 && hits.len() as i64 >= req.limit {
                continue;
            }
            hits.push((k, *e));
        }
        if req.count_only {
            return Ok(RangeResult {
                kvs: Vec::new(),
                more: false,
                count,
                revision: self.current_rev,
            });
        }
        let with_value = !req.keys_only;
        let mut kvs = Vec::with_capacity(hits.len());
        match (req.sort_target, order) {
            (SortTarget::Key, SortOrder::Descend) => hits.reverse(),
            (SortTarget::Key, _) => {}
            (SortTarget::Value, _) => {}
            (target, _) => {
                hits.sort_by_key(|(_, e)| match target {
                    SortTarget::Version => e.version,
                    SortTarget::Create => e.create,
                    SortTarget::Mod => e.rev.main,
                    SortTarget::Key | SortTarget::Value => 0,
                });
                if order == SortOrder::Descend {
                    hits.reverse();
                }
            }
        }
        if req.sort_target == SortTarget::Value {
            let mut full = hits
                .iter()
                .map(|(k, e)| self.kv_from(k, e, true))
                .collect::<Result<Vec<_>>>()?;
            full.sort_by(|a, b| a.value.cmp(&b.value));
            if order == SortOrder::Descend {
                full.reverse();
            }
            if !with_value {
                for kv in &mut full {
                    kv.value.clear();
                }
            }
            kvs = full;
        } else {
            let take = if req.limit > 0 {
                hits.len().min(req.limit as usize)
            } else {
                hits.len()
            };
            for (k, e) in &hits[..take] {
                kvs.push(self.kv_from(k, e, with_value)?);
            }
        }
        if req.limit > 0 && kvs.len() as i64 > req.limit {
            kvs.truncate(req.limit as usize);
        }
        let more = req.limit > 0 && count > req.limit;
        Ok(RangeResult {
            kvs,
            more,
            count,
            revision: self.current_rev,
        })
    }

    /// The latest version of `key` (with its value), if the key exists now.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        match self.index.get(key).and_then(|es| es.last()) {
            Some(e) if !e.tombstone => Ok(Some(self.kv_from(key, e, true)?)),
            _ => Ok(None),
        }
    }

    /// The latest version of every existing key in the range (values only if `with_value`).
    pub fn latest_in(&self, range: &KeyRange, with_value: bool) -> Result<Vec<KeyValue>> {
        let mut out = Vec::new();
        for (k, es) in self.iter_range(range) {
            if let Some(e) = es.last().filter(|e| !e.tombstone) {
                out.push(self.kv_from(k, e, with_value)?);
            }
        }
        Ok(out)
    }

    /// The events with main revision in `[from, to]`, in revision order, each with the key's
    /// previous version when `with_prev` is set. Used to replay history to watchers.
    pub fn events_between(&self, from: i64, to: i64, with_prev: bool) -> Result<Vec<(i64, Event)>> {
        if from < self.compact_rev {
            return Err(Error::Compacted {
                compact_revision: self.compact_rev,
            });
        }
        let mut out = Vec::new();
        if to < from {
            return Ok(out);
        }
        let lo = rev_key(Revision { main: from, sub: 0 });
        let hi = rev_key(Revision {
            main: to.saturating_add(1),
            sub: 0,
        });
        let mut err = None;
        self.backend
            .scan(&lo, &hi, &mut |k, v| match keys::parse_rev_key(k)
                .and_then(|rev| Ok((rev, Record::decode(v)?)))
            {
                Ok((rev, rec)) => {
                    out.push((rev.main, self.event_from_record(rev, rec, with_prev)));
                    true
                }
                Err(e) => {
                    err = Some(e);
                    false
                }
            })?;
        if let Some(e) = err {
            return Err(e);
        }
        // Fill previous values (needs the index, so outside the scan callback).
        if with_prev {
            for (_, ev) in &mut out {
                if let Some(kv) = &ev.kv {
                    ev.prev_kv = self.version_before(&kv.key, kv.mod_revision)?;
                }
            }
        }
        Ok(out)
    }

    fn event_from_record(&self, rev: Revision, rec: Record, _with_prev: bool) -> Event {
        if rec.tombstone {
            Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: rec.key,
                    mod_revision: rev.main,
                    ..Default::default()
                }),
                prev_kv: None,
            }
        } else {
            Event {
                r#type: EventType::Put as i32,
                kv: Some(KeyValue {
                    key: rec.key,
                    create_revision: rec.create,
                    mod_revision: rev.main,
                    version: rec.version,
                    value: rec.value,
                    lease: rec.lease,
                }),
                prev_kv: None,
            }
        }
    }

    /// The version of `key` that was current just before revision `rev`.
    pub fn version_before(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>> {
        let Some(es) = self.index.get(key) else {
            return Ok(None);
        };
        match Self::entry_at(es, rev - 1) {
            Some(e) => Ok(Some(self.kv_from(key, e, true)?)),
            None => Ok(None),
        }
    }

    /// Start a write transaction at the next revision.
    pub fn begin_write(&mut self) -> WriteTxn<'_> {
        let main = self.current_rev + 1;
        WriteTxn {
            store: self,
            main,
            sub: 0,
            events: Vec::new(),
        }
    }

    /// Drop history before `rev` (see the module docs for what survives).
    pub fn compact(&mut self, rev: i64) -> Result<()> {
        if rev > self.current_rev {
            return Err(Error::FutureRevision);
        }
        if rev <= self.compact_rev {
            return Err(Error::Compacted {
                compact_revision: self.compact_rev,
            });
        }
        let mut emptied = Vec::new();
        let mut dropped = Vec::new();
        for (k, es) in self.index.iter_mut() {
            let idx = es.partition_point(|e| e.rev.main <= rev);
            if idx == 0 {
                continue;
            }
            // Keep the newest version at or before `rev`, unless it is a tombstone older than
            // `rev` (then the key simply did not exist at `rev`).
            let keep_from = if es[idx - 1].tombstone && es[idx - 1].rev.main < rev {
                idx
            } else {
                idx - 1
            };
            for e in es.drain(..keep_from) {
                dropped.push(e.rev);
            }
            if es.is_empty() {
                emptied.push(k.clone());
            }
        }
        for k in emptied {
            self.index.remove(&k);
        }
        for r in dropped {
            self.batch.delete(rev_key(r).to_vec());
        }
        self.compact_rev = rev;
        Ok(())
    }

    /// A CRC-32 over every record at or below `rev` (etcd's HashKV: equal on members that hold
    /// the same history).
    pub fn hash_kv(&self, rev: i64) -> Result<u32> {
        let rev = if rev <= 0 { self.current_rev } else { rev };
        if rev > self.current_rev {
            return Err(Error::FutureRevision);
        }
        if rev < self.compact_rev {
            return Err(Error::Compacted {
                compact_revision: self.compact_rev,
            });
        }
        let mut h = crc32fast::Hasher::new();
        let hi = rev_key(Revision {
            main: rev.saturating_add(1),
            sub: 0,
        });
        self.backend.scan(&[keys::REV], &hi, &mut |k, v| {
            h.update(k);
            h.update(v);
            true
        })?;
        Ok(h.finalize())
    }
}

/// A write transaction: every write in it gets the same main revision.
pub struct WriteTxn<'a> {
    store: &'a mut MvccStore,
    main: i64,
    sub: i64,
    events: Vec<Event>,
}

impl WriteTxn<'_> {
    /// The revision reads inside this transaction see: the new one once something was written.
    pub fn read_revision(&self) -> i64 {
        if self.sub > 0 {
            self.main
        } else {
            self.main - 1
        }
    }

    /// Read through the transaction (sees its own writes).
    pub fn range(&self, req: &RangeReq) -> Result<RangeResult> {
        let view = self.read_revision();
        let rev = if req.revision <= 0 {
            view
        } else {
            req.revision
        };
        if rev > view {
            return Err(Error::FutureRevision);
        }
        if rev < self.store.compact_rev {
            return Err(Error::Compacted {
                compact_revision: self.store.compact_rev,
            });
        }
        let mut out = self.store.range_at(req, rev)?;
        out.revision = view;
        Ok(out)
    }

    /// The current version of `key` as this transaction sees it.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        self.store.get(key)
    }

    /// Keys in `range` that exist now, with values.
    pub fn latest_in(&self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        self.store.latest_in(range, true)
    }

    /// Write `value` under `key`. Returns the previous version, if any, with its value only when
    /// `prev_value` is set: the index alone gives its revisions and lease, so a put that nobody
    /// asked the previous value of reads nothing from the backend. The put's event then carries
    /// no `prev_kv` either; the watch hub reads it for the watchers that want it, as etcd does.
    pub fn put(
        &mut self,
        key: &[u8],
        value: Vec<u8>,
        lease: i64,
        prev_value: bool,
    ) -> Result<Option<KeyValue>> {
        let prev = match self.store.index.get(key).and_then(|es| es.last()) {
            Some(e) if !e.tombstone => Some(self.store.kv_from(key, e, prev_value)?),
            _ => None,
        };
        let rev = Revision {
            main: self.main,
            sub: self.sub,
        };
        self.sub += 1;
        let (create, version) = match &prev {
            Some(p) => (p.create_revision, p.version + 1),
            None => (self.main, 1),
        };
        let rec = Record {
            tombstone: false,
            key: key.to_vec(),
            create,
            version,
            lease,
            value,
        };
        let bytes = rec.encode();
        let entry = Entry {
            rev,
            create,
            version,
            lease,
            tombstone: false,
        };
        match self.store.index.get_mut(key) {
            Some(es) => es.push(entry),
            None => {
                self.store.index.insert(key.to_vec(), vec![entry]);
            }
        }
        if prev.is_none() {
            self.store.live_keys += 1;
        }
        self.store.batch.put(rev_key(rev).to_vec(), bytes.clone());
        self.store.pending.insert(rev, bytes);
        self.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: rec.key,
                create_revision: create,
                mod_revision: self.main,
                version,
                value: rec.value,
                lease,
            }),
            prev_kv: if prev_value { prev.clone() } else { None },
        });
        Ok(prev)
    }

    /// Delete every existing key in `range`. Returns the deleted versions.
    pub fn delete(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        let victims = self.store.latest_in(range, true)?;
        for prev in &victims {
            let rev = Revision {
                main: self.main,
                sub: self.sub,
            };
            self.sub += 1;
            let rec = Record {
                tombstone: true,
                key: prev.key.clone(),
                create: 0,
                version: 0,
                lease: 0,
                value: Vec::new(),
            };
            let bytes = rec.encode();
            if let Some(es) = self.store.index.get_mut(&prev.key) {
                es.push(Entry {
                    rev,
                    create: 0,
                    version: 0,
                    lease: 0,
                    tombstone: true,
                });
            }
            self.store.live_keys -= 1;
            self.store.batch.put(rev_key(rev).to_vec(), bytes.clone());
            self.store.pending.insert(rev, bytes);
            self.events.push(Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: prev.key.clone(),
                    mod_revision: self.main,
                    ..Default::default()
                }),
                prev_kv: Some(prev.clone()),
            });
        }
        Ok(victims)
    }

    /// Finish: if anything was written, the store moves to the new revision. Returns the store's
    /// revision after the transaction and the events it produced.
    pub fn finish(self) -> (i64, Vec<Event>) {
        if self.sub > 0 {
            self.store.current_rev = self.main;
        }
        (self.store.current_rev, self.events)
    }
}
