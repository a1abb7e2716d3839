//! The state machine: `apply` is the only code that changes the key space.
//!
//! `apply(index, command)` takes the next committed log entry and returns the response and the
//! events it produced. It is deterministic — no clock, no randomness, no I/O beyond the backend —
//! so every member that applies the same log reaches the same state. Requests that could be
//! refused without looking at the state (empty keys, too many txn ops, duplicate keys) are
//! refused *before* proposing by [`validate`]; what depends on the state (does the lease exist?
//! does the key exist for `ignore_value`?) is checked here, before anything is written, so a
//! failing command changes nothing.
//!
//! Leases live here too (their TTL and attached keys); *when* a lease expires is not state but
//! the leader's business (see [`crate::lease`]), which proposes a `LeaseRevoke` when it does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proto::etcdserverpb::{
    self as pb, DeleteRangeResponse, PutResponse, RangeResponse, ResponseHeader, ResponseOp,
    TxnResponse, response_op,
};
use proto::mvccpb::Event;

use crate::auth::{AuthCmd, AuthShared, AuthState};
use crate::command::{
    Command, Compare, CompareResult, CompareTarget, DeleteReq, KeyRange, Op, PutReq, TxnReq,
};
use crate::error::{Error, Result};
use crate::mvcc::keys;
use crate::mvcc::store::WriteTxn;
use crate::mvcc::{Backend, MvccStore};

// The wire form of outcomes is part of the log format and lives in `coord-log`; re-exported here.
pub use coord_log::raft::{ErrorWire, OutcomeWire, ResponseWire};

/// Meta prefix of published member attributes (`m` + "member/" + id BE).
const MEMBER_ATTRS: &[u8] = b"mmember/";

/// Largest TTL a lease may ask for (etcd's limit, in seconds).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// A granted lease, as replicated state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// TTL granted, in seconds.
    pub ttl: i64,
    /// Keys attached now.
    pub keys: BTreeSet<Vec<u8>>,
}

/// What applying one command produced.
#[derive(Debug)]
pub struct Applied {
    /// Store revision after the command.
    pub revision: i64,
    /// The response, or the error the command was refused with (nothing changed then).
    pub result: Result<Response>,
    /// Events to deliver to watchers, all at `revision`.
    pub events: Vec<Event>,
}

/// Responses of commands (headers are filled in by the adapters).
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// Put.
    Put(PutResponse),
    /// DeleteRange.
    Delete(DeleteRangeResponse),
    /// Txn.
    Txn(TxnResponse),
    /// Compact.
    Compact,
    /// LeaseGrant: id and ttl granted.
    LeaseGrant {
        /// Lease ID.
        id: i64,
        /// TTL.
        ttl: i64,
    },
    /// LeaseRevoke.
    LeaseRevoke,
    /// Noop.
    Noop,
    /// An auth change: the auth revision after it.
    Auth {
        /// Auth revision.
        revision: u64,
    },
}

/// Visits every backend entry (records, leases, meta, auth) as of the moment `st` shows, and
/// releases `st` as soon as the backend has fixed that moment (`Backend::scan_at`): the visit,
/// however long, runs while entries go on being applied, and sees none of them. Raft
/// snapshots and `Maintenance.Snapshot` copy the key space this way.
pub fn visit_all_released(
    st: parking_lot::RwLockReadGuard<'_, StateMachine>,
    f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
) -> Result<()> {
    let backend = st.store().backend().clone();
    let mut st = Some(st);
    backend.scan_at(&[0], &[0xff], &mut || drop(st.take()), f)
}

/// The key space plus leases plus users and roles plus the applied index.
pub struct StateMachine {
    store: MvccStore,
    leases: BTreeMap<i64, LeaseInfo>,
    applied_index: u64,
    applied_term: u64,
    auth: AuthState,
    /// Where the request path reads the auth state; republished after every auth change.
    auth_shared: Arc<AuthShared>,
}

fn header(rev: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision: rev,
        ..Default::default()
    })
}

impl StateMachine {
    /// Open the state machine over a backend, rebuilding index and lease table.
    pub fn open(backend: Arc<dyn Backend>) -> Result<StateMachine> {
        let store = MvccStore::open(backend.clone())?;
        let mut leases = BTreeMap::new();
        let mut err = None;
        backend.scan(
            &[keys::LEASE],
            &[keys::LEASE + 1],
            &mut |k, v| match keys::parse_lease_key(k).and_then(|id| Ok((id, keys::decode_i64(v)?)))
            {
                Ok((id, ttl)) => {
                    leases.insert(
                        id,
                        LeaseInfo {
                            ttl,
                            keys: BTreeSet::new(),
                        },
                    );
                    true
                }
                Err(e) => {
                    err = Some(e);
                    false
                }
            },
        )?;
        if let Some(e) = err {
            return Err(e);
        }
        // Re-attach keys to their leases from the current version of every key.
        let all = KeyRange {
            key: vec![0],
            end: vec![0],
        };
        for kv in store.latest_in(&all, false)? {
            if kv.lease != 0
                && let Some(l) = leases.get_mut(&kv.lease)
            {
                l.keys.insert(kv.key);
            }
        }
        let applied_index = match backend.get(keys::META_APPLIED)? {
            Some(v) => keys::decode_i64(&v)? as u64,
            None => 0,
        };
        let applied_term = match backend.get(keys::META_TERM)? {
            Some(v) => keys::decode_i64(&v)? as u64,
            None => 0,
        };
        let auth = AuthState::load(&backend)?;
        let auth_shared = Arc::new(AuthShared::default());
        auth_shared.publish(auth.view());
        Ok(StateMachine {
            store,
            leases,
            applied_index,
            applied_term,
            auth,
            auth_shared,
        })
    }

    /// Take the state of `fresh` (a state machine reopened after a snapshot was installed),
    /// keeping the handle the request path reads the auth state from.
    pub fn replace(&mut self, mut fresh: StateMachine) {
        fresh.auth_shared = self.auth_shared.clone();
        fresh.auth_shared.publish(fresh.auth.view());
        *self = fresh;
    }

    /// Users, roles and the auth switch.
    pub fn auth(&self) -> &AuthState {
        &self.auth
    }

    /// The published auth state (shared with the request path).
    pub fn auth_shared(&self) -> Arc<AuthShared> {
        self.auth_shared.clone()
    }

    /// Keys a lease holds now.
    pub fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        self.leases
            .get(&id)
            .map(|l| l.keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The key space (read-only).
    pub fn store(&self) -> &MvccStore {
        &self.store
    }

    /// Index of the last applied log entry.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Term of the last applied log entry.
    pub fn applied_term(&self) -> u64 {
        self.applied_term
    }

    /// Current revision.
    pub fn revision(&self) -> i64 {
        self.store.current_revision()
    }

    /// Leases with their TTL and keys.
    pub fn leases(&self) -> &BTreeMap<i64, LeaseInfo> {
        &self.leases
    }

    /// Land every change applied since the last commit, with the applied index, atomically.
    pub fn commit(&mut self) -> Result<()> {
        self.store.stage(
            keys::META_APPLIED.to_vec(),
            Some((self.applied_index as i64).to_le_bytes().to_vec()),
        );
        self.store.stage(
            keys::META_TERM.to_vec(),
            Some((self.applied_term as i64).to_le_bytes().to_vec()),
        );
        self.store.commit()
    }

    /// Apply the log entry at `index` (entries at or below the applied index are skipped, so
    /// replaying a log after a crash is safe). A [`Command::Batch`] is refused here: only
    /// [`Self::apply_entry`] takes one.
    pub fn apply(&mut self, index: u64, term: u64, cmd: &Command) -> Option<Applied> {
        if index <= self.applied_index {
            return None;
        }
        self.applied_index = index;
        self.applied_term = term;
        Some(self.apply_command(cmd))
    }

    /// Apply the log entry at `index`, which may be a [`Command::Batch`]: one [`Applied`] per
    /// command it holds, in order, each with its own revision and events, exactly as if each
    /// command had been an entry of its own (a refused one changes nothing, the next goes on).
    /// Entries at or below the applied index are skipped, as in [`Self::apply`].
    pub fn apply_entry(&mut self, index: u64, term: u64, cmd: &Command) -> Option<Vec<Applied>> {
        if index <= self.applied_index {
            return None;
        }
        self.applied_index = index;
        self.applied_term = term;
        Some(
            cmd.commands()
                .iter()
                .map(|c| self.apply_command(c))
                .collect(),
        )
    }

    fn apply_command(&mut self, cmd: &Command) -> Applied {
        let mut events = Vec::new();
        let result = self.apply_checked(cmd, &mut events);
        Applied {
            revision: self.store.current_revision(),
            result,
            events,
        }
    }

    /// Apply a command, checking the permissions of the user it was issued for while auth is
    /// enabled (the auth state at this point of the log decides, identically on every member).
    fn apply_checked(&mut self, cmd: &Command, events: &mut Vec<Event>) -> Result<Response> {
        match cmd {
            Command::AsUser { user, cmd } => {
                if matches!(**cmd, Command::AsUser { .. }) {
                    return Err(Error::InvalidArgument("nested user commands".into()));
                }
                if self.auth.enabled() {
                    let view = self.auth_shared.view();
                    let Some((perms, _)) = view.user(user) else {
                        return Err(Error::PermissionDenied);
                    };
                    let leases = &self.leases;
                    let lease_keys = |id: i64| {
                        leases
                            .get(&id)
                            .map(|l| l.keys.iter().cloned().collect())
                            .unwrap_or_default()
                    };
                    perms.command(cmd, &lease_keys)?;
                }
                self.apply_one(cmd, events)
            }
            // Client writes proposed while auth was off but applied after it was turned on
            // (etcd refuses them the same way). Lease revocations without a user are the
            // leader's expiries; members publishing attributes and no-ops are internal.
            Command::Put(_) | Command::Delete(_) | Command::Compact { .. } | Command::Auth(_)
                if self.auth.enabled() =>
            {
                Err(Error::UserEmpty)
            }
            Command::Txn(t) if self.auth.enabled() && !t.is_read_only() => Err(Error::UserEmpty),
            _ => self.apply_one(cmd, events),
        }
    }

    fn apply_one(&mut self, cmd: &Command, events: &mut Vec<Event>) -> Result<Response> {
        match cmd {
            Command::Put(p) => self.apply_put(p, events),
            Command::Delete(d) => self.apply_delete(d, events),
            Command::Txn(t) => self.apply_txn(t, events),
            Command::Compact { revision } => {
                self.store.compact(*revision).map(|_| Response::Compact)
            }
            Command::LeaseGrant { id, ttl } => self.apply_grant(*id, *ttl),
            Command::LeaseRevoke { id } => self.apply_revoke(*id, events),
            Command::Noop => Ok(Response::Noop),
            Command::MemberAttrs {
                id,
                name,
                client_urls,
            } => {
                let mut k = MEMBER_ATTRS.to_vec();
                k.extend_from_slice(&id.to_be_bytes());
                match bincode::serialize(&(name, client_urls)) {
                    Ok(v) => {
                        self.store.stage(k, Some(v));
                        Ok(Response::Noop)
                    }
                    Err(e) => Err(Error::InvalidArgument(format!("member attributes: {e}"))),
                }
            }
            Command::Auth(a) => self.apply_auth(a),
            Command::AsUser { .. } => Err(Error::InvalidArgument("nested user commands".into())),
            Command::Batch(_) => Err(Error::InvalidArgument(
                "a batch inside another command".into(),
            )),
        }
    }

    fn apply_auth(&mut self, a: &AuthCmd) -> Result<Response> {
        let staged = self.auth.apply(a)?;
        let changed = !staged.is_empty();
        for (k, v) in staged {
            self.store.stage(k, v);
        }
        if changed {
            self.auth_shared.publish(self.auth.view());
        }
        Ok(Response::Auth {
            revision: self.auth.revision(),
        })
    }

    fn apply_put(&mut self, p: &PutReq, events: &mut Vec<Event>) -> Result<Response> {
        self.check_put(p, None)?;
        let mut txn = self.store.begin_write();
        let resp = put_in(&mut txn, &mut self.leases, p)?;
        let (rev, evs) = txn.finish();
        events.extend(evs);
        Ok(Response::Put(PutResponse {
            header: header(rev),
            ..resp
        }))
    }

    fn apply_delete(&mut self, d: &DeleteReq, events: &mut Vec<Event>) -> Result<Response> {
        let mut txn = self.store.begin_write();
        let resp = delete_in(&mut txn, &mut self.leases, d)?;
        let (rev, evs) = txn.finish();
        events.extend(evs);
        Ok(Response::Delete(DeleteRangeResponse {
            header: header(rev),
            ..resp
        }))
    }

    /// Check a put against the state before anything is written.
    fn check_put(&self, p: &PutReq, txn_view: Option<&WriteTxn<'_>>) -> Result<()> {
        if p.lease != 0 && !p.ignore_lease && !self.leases.contains_key(&p.lease) {
            return Err(Error::LeaseNotFound);
        }
        if p.ignore_value || p.ignore_lease {
            let exists = match txn_view {
                Some(t) => t.get(&p.key)?.is_some(),
                None => self.store.get(&p.key)?.is_some(),
            };
            if !exists {
                return Err(Error::KeyNotFound);
            }
        }
        Ok(())
    }

    fn apply_txn(&mut self, t: &TxnReq, events: &mut Vec<Event>) -> Result<Response> {
        // Decide every branch first, against the state before the txn (etcd does the same for
        // nested txns), then check every op on the chosen path, then execute.
        let mut path = Vec::new();
        self.choose_path(t, &mut path)?;
        let mut cursor = 0;
        self.check_path(t, &path, &mut cursor)?;
        let mut txn = self.store.begin_write();
        let mut cursor = 0;
        let resp = exec_txn(&mut txn, &mut self.leases, t, &path, &mut cursor)?;
        let (rev, evs) = txn.finish();
        events.extend(evs);
        let mut resp = resp;
        resp.header = header(rev);
        Ok(Response::Txn(resp))
    }

    fn choose_path(&self, t: &TxnReq, path: &mut Vec<bool>) -> Result<()> {
        let ok = t
            .compare
            .iter()
            .map(|c| self.compare(c))
            .collect::<Result<Vec<_>>>()?;
        let ok = ok.into_iter().all(|b| b);
        path.push(ok);
        let ops = if ok { &t.success } else { &t.failure };
        for op in ops {
            if let Op::Txn(inner) = op {
                self.choose_path(inner, path)?;
            }
        }
        Ok(())
    }

    fn check_path(&self, t: &TxnReq, path: &[bool], cursor: &mut usize) -> Result<()> {
        let ok = path.get(*cursor).copied().unwrap_or(false);
        *cursor += 1;
        let ops = if ok { &t.success } else { &t.failure };
        for op in ops {
            match op {
                Op::Put(p) => {
                    if p.lease != 0 && !p.ignore_lease && !self.leases.contains_key(&p.lease) {
                        return Err(Error::LeaseNotFound);
                    }
                    if (p.ignore_value || p.ignore_lease) && self.store.get(&p.key)?.is_none() {
                        return Err(Error::KeyNotFound);
                    }
                }
                Op::Range(r) => self.store.validate_range(r)?,
                Op::Delete(_) => {}
                Op::Txn(inner) => self.check_path(inner, path, cursor)?,
            }
        }
        Ok(())
    }

    fn compare(&self, c: &Compare) -> Result<bool> {
        let kvs = if c.range.is_single() {
            self.store
                .get(&c.range.key)?
                .into_iter()
                .collect::<Vec<_>>()
        } else {
            let with_value = matches!(c.target, CompareTarget::Value(_));
            self.store.latest_in(&c.range, with_value)?
        };
        if kvs.is_empty() {
            // A missing key compares as version/create/mod/lease 0; a value compare fails.
            if let CompareTarget::Value(_) = c.target {
                return Ok(false);
            }
            return Ok(compare_one(c, &proto::mvccpb::KeyValue::default()));
        }
        Ok(kvs.iter().all(|kv| compare_one(c, kv)))
    }

    fn apply_grant(&mut self, id: i64, ttl: i64) -> Result<Response> {
        if id == 0 {
            return Err(Error::InvalidArgument("lease id 0 is reserved".into()));
        }
        if ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        if self.leases.contains_key(&id) {
            return Err(Error::LeaseExists);
        }
        self.leases.insert(
            id,
            LeaseInfo {
                ttl,
                keys: BTreeSet::new(),
            },
        );
        self.store.stage(
            keys::lease_key(id).to_vec(),
            Some(ttl.to_le_bytes().to_vec()),
        );
        Ok(Response::LeaseGrant { id, ttl })
    }

    fn apply_revoke(&mut self, id: i64, events: &mut Vec<Event>) -> Result<Response> {
        let Some(info) = self.leases.remove(&id) else {
            return Err(Error::LeaseNotFound);
        };
        let mut txn = self.store.begin_write();
        for k in &info.keys {
            txn.delete(&KeyRange::single(k.clone()))?;
        }
        let (_, evs) = txn.finish();
        events.extend(evs);
        self.store.stage(keys::lease_key(id).to_vec(), None);
        Ok(Response::LeaseRevoke)
    }
}

fn compare_one(c: &Compare, kv: &proto::mvccpb::KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord = match &c.target {
        CompareTarget::Version(v) => kv.version.cmp(v),
        CompareTarget::Create(v) => kv.create_revision.cmp(v),
        CompareTarget::Mod(v) => kv.mod_revision.cmp(v),
        CompareTarget::Lease(v) => kv.lease.cmp(v),
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

fn put_in(
    txn: &mut WriteTxn<'_>,
    leases: &mut BTreeMap<i64, LeaseInfo>,
    p: &PutReq,
) -> Result<PutResponse> {
    let cur = if p.ignore_value || p.ignore_lease {
        txn.get(&p.key)?
    } else {
        None
    };
    let value = if p.ignore_value {
        cur.as_ref().map(|c| c.value.clone()).unwrap_or_default()
    } else {
        p.value.clone()
    };
    let lease = if p.ignore_lease {
        cur.as_ref().map(|c| c.lease).unwrap_or(0)
    } else {
        p.lease
    };
    let prev = txn.put(&p.key, value, lease, p.prev_kv)?;
    if let Some(prev) = &prev
        && prev.lease != 0
        && prev.lease != lease
        && let Some(l) = leases.get_mut(&prev.lease)
    {
        l.keys.remove(&p.key);
    }
    if lease != 0
        && let Some(l) = leases.get_mut(&lease)
    {
        l.keys.insert(p.key.clone());
    }
    Ok(PutResponse {
        header: None,
        prev_kv: if p.prev_kv { prev } else { None },
    })
}

fn delete_in(
    txn: &mut WriteTxn<'_>,
    leases: &mut BTreeMap<i64, LeaseInfo>,
    d: &DeleteReq,
) -> Result<DeleteRangeResponse> {
    let gone = txn.delete(&d.range)?;
    for kv in &gone {
        if kv.lease != 0
            && let Some(l) = leases.get_mut(&kv.lease)
        {
            l.keys.remove(&kv.key);
        }
    }
    Ok(DeleteRangeResponse {
        header: None,
        deleted: gone.len() as i64,
        prev_kvs: if d.prev_kv { gone } else { Vec::new() },
    })
}

fn exec_txn(
    txn: &mut WriteTxn<'_>,
    leases: &mut BTreeMap<i64, LeaseInfo>,
    t: &TxnReq,
    path: &[bool],
    cursor: &mut usize,
) -> Result<TxnResponse> {
    let ok = path.get(*cursor).copied().unwrap_or(false);
    *cursor += 1;
    let ops = if ok { &t.success } else { &t.failure };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let r = match op {
            Op::Range(r) => {
                let rr = txn.range(r)?;
                response_op::Response::ResponseRange(RangeResponse {
                    header: header(rr.revision),
                    kvs: rr.kvs,
                    more: rr.more,
                    count: rr.count,
                })
            }
            Op::Put(p) => {
                let mut resp = put_in(txn, leases, p)?;
                resp.header = header(txn.read_revision());
                response_op::Response::ResponsePut(resp)
            }
            Op::Delete(d) => {
                let mut resp = delete_in(txn, leases, d)?;
                resp.header = header(txn.read_revision());
                response_op::Response::ResponseDeleteRange(resp)
            }
            Op::Txn(inner) => {
                let mut resp = exec_txn(txn, leases, inner, path, cursor)?;
                resp.header = header(txn.read_revision());
                response_op::Response::ResponseTxn(resp)
            }
        };
        responses.push(ResponseOp { response: Some(r) });
    }
    Ok(TxnResponse {
        header: None,
        succeeded: ok,
        responses,
    })
}

/// Refuse, before proposing, what can be refused without the state: empty keys, too many ops,
/// duplicate writes in one txn branch, bad ignore_* combinations (see
/// [`coord_log::validate`], where the checks live so that the fuzz targets reach them).
pub fn validate(cmd: &Command, max_txn_ops: usize) -> Result<()> {
    coord_log::validate::validate(cmd, max_txn_ops).map_err(Error::from)
}

/// Validate a txn: op counts per branch, keys, no key written twice in one branch, and
/// nesting at most [`MAX_NESTING`](crate::command::MAX_NESTING) deep.
pub fn validate_txn(t: &TxnReq, max_txn_ops: usize) -> Result<()> {
    coord_log::validate::validate_txn(t, max_txn_ops).map_err(Error::from)
}

/// Convert a state-machine response for one op into the wire form used by `pb::ResponseOp`.
pub fn wire_header(rev: i64) -> Option<pb::ResponseHeader> {
    header(rev)
}

impl StateMachine {
    /// Evaluate a txn that writes nothing, against the current state, without the log.
    pub fn read_txn(&self, t: &TxnReq) -> Result<TxnResponse> {
        let mut path = Vec::new();
        self.choose_path(t, &mut path)?;
        let mut cursor = 0;
        self.check_path(t, &path, &mut cursor)?;
        let mut cursor = 0;
        let mut resp = self.read_txn_at(t, &path, &mut cursor)?;
        resp.header = header(self.revision());
        Ok(resp)
    }

    fn read_txn_at(&self, t: &TxnReq, path: &[bool], cursor: &mut usize) -> Result<TxnResponse> {
        let ok = path.get(*cursor).copied().unwrap_or(false);
        *cursor += 1;
        let ops = if ok { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let r = match op {
                Op::Range(r) => {
                    let rr = self.store.range(r)?;
                    response_op::Response::ResponseRange(RangeResponse {
                        header: header(rr.revision),
                        kvs: rr.kvs,
                        more: rr.more,
                        count: rr.count,
                    })
                }
                Op::Txn(inner) => {
                    let mut resp = self.read_txn_at(inner, path, cursor)?;
                    resp.header = header(self.revision());
                    response_op::Response::ResponseTxn(resp)
                }
                Op::Put(_) | Op::Delete(_) => {
                    return Err(Error::InvalidArgument("write in a read-only txn".into()));
                }
            };
            responses.push(ResponseOp { response: Some(r) });
        }
        Ok(TxnResponse {
            header: None,
            succeeded: ok,
            responses,
        })
    }
}

/// Between [`OutcomeWire`] (a plain type of the log format, in `coord-log`) and the in-process
/// result it carries.
pub trait OutcomeWireExt: Sized {
    /// Encode an in-process result.
    fn from_result(revision: i64, result: &Result<Response>) -> Self;
    /// Decode into the in-process form.
    fn into_result(self) -> (i64, Result<Response>);
}

impl OutcomeWireExt for OutcomeWire {
    fn from_result(revision: i64, result: &Result<Response>) -> OutcomeWire {
        use prost::Message;
        let result = match result {
            Ok(Response::Put(r)) => Ok(ResponseWire::Put(r.encode_to_vec())),
            Ok(Response::Delete(r)) => Ok(ResponseWire::Delete(r.encode_to_vec())),
            Ok(Response::Txn(r)) => Ok(ResponseWire::Txn(r.encode_to_vec())),
            Ok(Response::Compact) => Ok(ResponseWire::Compact),
            Ok(Response::LeaseGrant { id, ttl }) => {
                Ok(ResponseWire::LeaseGrant { id: *id, ttl: *ttl })
            }
            Ok(Response::LeaseRevoke) => Ok(ResponseWire::LeaseRevoke),
            Ok(Response::Noop) => Ok(ResponseWire::Noop),
            Ok(Response::Auth { revision }) => Ok(ResponseWire::Auth {
                revision: *revision,
            }),
            Err(e) => Err(ErrorWire {
                code: e.code() as i32,
                message: e.to_string(),
                compact_revision: match e {
                    Error::Compacted { compact_revision } => *compact_revision,
                    _ => 0,
                },
            }),
        };
        OutcomeWire { revision, result }
    }

    fn into_result(self) -> (i64, Result<Response>) {
        use prost::Message;
        let decode_err =
            |e: prost::DecodeError| Error::Corrupt(format!("undecodable response: {e}"));
        let result = match self.result {
            Ok(ResponseWire::Put(b)) => PutResponse::decode(b.as_slice())
                .map(Response::Put)
                .map_err(decode_err),
            Ok(ResponseWire::Delete(b)) => DeleteRangeResponse::decode(b.as_slice())
                .map(Response::Delete)
                .map_err(decode_err),
            Ok(ResponseWire::Txn(b)) => TxnResponse::decode(b.as_slice())
                .map(Response::Txn)
                .map_err(decode_err),
            Ok(ResponseWire::Compact) => Ok(Response::Compact),
            Ok(ResponseWire::LeaseGrant { id, ttl }) => Ok(Response::LeaseGrant { id, ttl }),
            Ok(ResponseWire::LeaseRevoke) => Ok(Response::LeaseRevoke),
            Ok(ResponseWire::Noop) => Ok(Response::Noop),
            Ok(ResponseWire::Auth { revision }) => Ok(Response::Auth { revision }),
            Err(e) => Err(Error::from_wire(e)),
        };
        (self.revision, result)
    }
}

impl StateMachine {
    /// Release the backend (sled's files and lock): the state machine is empty afterwards and
    /// only good to be dropped. Used when the node stops.
    pub fn close(&mut self) {
        let empty: Arc<dyn Backend> = Arc::new(crate::mvcc::MemBackend::default());
        if let Ok(store) = MvccStore::open(empty) {
            self.store = store;
        }
        self.leases.clear();
    }
}

impl StateMachine {
    /// Queue a write of a value beside the key space (consensus metadata) into the next commit.
    pub fn stage(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.store.stage(key, value);
    }
}

impl StateMachine {
    /// Name and client URLs each member published.
    pub fn member_attrs(&self) -> BTreeMap<u64, (String, Vec<String>)> {
        let mut out = BTreeMap::new();
        let mut end = MEMBER_ATTRS.to_vec();
        if let Some(l) = end.last_mut() {
            *l += 1;
        }
        let _ = self.store.backend().scan(MEMBER_ATTRS, &end, &mut |k, v| {
            if k.len() == MEMBER_ATTRS.len() + 8 {
                let mut id = [0u8; 8];
                id.copy_from_slice(&k[MEMBER_ATTRS.len()..]);
                if let Ok(attrs) = bincode::deserialize::<(String, Vec<String>)>(v) {
                    out.insert(u64::from_be_bytes(id), attrs);
                }
            }
            true
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{RangeReq, SortOrder, SortTarget};
    use crate::mvcc::MemBackend;

    struct T {
        sm: StateMachine,
        backend: Arc<dyn Backend>,
        index: u64,
    }

    impl T {
        fn new() -> T {
            let backend: Arc<dyn Backend> = Arc::new(MemBackend::default());
            T {
                sm: StateMachine::open(backend.clone()).expect("open"),
                backend,
                index: 0,
            }
        }
        fn apply(&mut self, cmd: Command) -> Applied {
            validate(&cmd, 128).expect("valid");
            self.index += 1;
            let a = self.sm.apply(self.index, 1, &cmd).expect("new index");
            self.sm.commit().expect("commit");
            a
        }
        fn put(&mut self, k: &str, v: &str) -> i64 {
            let a = self.apply(Command::Put(PutReq {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }));
            a.result.expect("put");
            a.revision
        }
        fn get_at(&self, k: &str, rev: i64) -> Result<Option<proto::mvccpb::KeyValue>> {
            let r = self.sm.store().range(&RangeReq {
                range: KeyRange::single(k.as_bytes().to_vec()),
                revision: rev,
                ..Default::default()
            })?;
            Ok(r.kvs.into_iter().next())
        }
    }

    fn prefix(p: &str) -> KeyRange {
        let mut end = p.as_bytes().to_vec();
        let last = end.len() - 1;
        end[last] += 1;
        KeyRange {
            key: p.as_bytes().to_vec(),
            end,
        }
    }

    fn cmp(k: &str, result: CompareResult, target: CompareTarget) -> Compare {
        Compare {
            range: KeyRange::single(k.as_bytes().to_vec()),
            result,
            target,
        }
    }

    fn put_op(k: &str, v: &str) -> Op {
        Op::Put(PutReq {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })
    }

    #[test]
    fn revisions_start_at_one_and_a_txn_takes_exactly_one() {
        let mut t = T::new();
        assert_eq!(t.sm.revision(), 1);
        assert_eq!(t.put("a", "1"), 2);
        let a = t.apply(Command::Txn(TxnReq {
            compare: vec![],
            success: vec![put_op("b", "1"), put_op("c", "1")],
            failure: vec![],
        }));
        assert_eq!(a.revision, 3);
        assert_eq!(a.events.len(), 2);
        assert_eq!(t.get_at("b", 0).expect("get").expect("b").mod_revision, 3);
        assert_eq!(t.get_at("c", 0).expect("get").expect("c").mod_revision, 3);
        // A txn that writes nothing does not move the revision.
        let a = t.apply(Command::Txn(TxnReq::default()));
        assert_eq!(a.revision, 3);
    }

    #[test]
    fn versions_count_puts_and_a_delete_resets_them() {
        let mut t = T::new();
        t.put("k", "1");
        t.put("k", "2");
        let kv = t.get_at("k", 0).expect("get").expect("k");
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
        let a = t.apply(Command::Delete(DeleteReq {
            range: KeyRange::single("k"),
            prev_kv: true,
        }));
        match a.result.expect("delete") {
            Response::Delete(d) => {
                assert_eq!(d.deleted, 1);
                assert_eq!(d.prev_kvs[0].value, b"2");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(t.get_at("k", 0).expect("get").is_none());
        t.put("k", "3");
        let kv = t.get_at("k", 0).expect("get").expect("k");
        assert_eq!((kv.create_revision, kv.version), (5, 1));
        // The past stays readable.
        assert_eq!(t.get_at("k", 3).expect("get").expect("k").value, b"2");
        assert!(t.get_at("k", 4).expect("get").is_none());
    }

    #[test]
    fn future_revisions_are_refused() {
        let mut t = T::new();
        t.put("k", "1");
        assert!(matches!(t.get_at("k", 3), Err(Error::FutureRevision)));
    }

    #[test]
    fn compaction_keeps_the_state_at_its_revision_and_drops_older_history() {
        let mut t = T::new();
        t.put("k", "1"); // 2
        t.put("k", "2"); // 3
        t.put("gone", "x"); // 4
        t.apply(Command::Delete(DeleteReq {
            range: KeyRange::single("gone"),
            prev_kv: false,
        })); // 5
        t.put("k", "3"); // 6
        let a = t.apply(Command::Compact { revision: 5 });
        a.result.expect("compact");
        assert!(matches!(
            t.get_at("k", 4),
            Err(Error::Compacted {
                compact_revision: 5
            })
        ));
        assert_eq!(
            t.get_at("k", 5).expect("at compact rev").expect("k").value,
            b"2"
        );
        assert_eq!(t.get_at("k", 6).expect("after").expect("k").value, b"3");
        // Compacting again at or below is refused, as is the future.
        assert!(matches!(
            t.apply(Command::Compact { revision: 5 }).result,
            Err(Error::Compacted { .. })
        ));
        assert!(matches!(
            t.apply(Command::Compact { revision: 99 }).result,
            Err(Error::FutureRevision)
        ));
        // History from the compact revision on is intact for watchers.
        let evs = t.sm.store().events_between(5, 6, false).expect("history");
        assert_eq!(evs.iter().map(|e| e.0).collect::<Vec<_>>(), vec![5, 6]);
        assert!(matches!(
            t.sm.store().events_between(4, 6, false),
            Err(Error::Compacted { .. })
        ));
    }

    #[test]
    fn compares_cover_every_target_and_missing_keys_compare_as_zero() {
        let mut t = T::new();
        t.put("k", "b"); // rev 2, version 1
        let sm = &t.sm;
        use CompareResult::*;
        assert!(
            sm.compare(&cmp("k", Equal, CompareTarget::Version(1)))
                .expect("c")
        );
        assert!(
            sm.compare(&cmp("k", Greater, CompareTarget::Create(1)))
                .expect("c")
        );
        assert!(
            sm.compare(&cmp("k", Less, CompareTarget::Mod(3)))
                .expect("c")
        );
        assert!(
            sm.compare(&cmp("k", NotEqual, CompareTarget::Value(b"a".to_vec())))
                .expect("c")
        );
        assert!(
            sm.compare(&cmp("k", Greater, CompareTarget::Value(b"a".to_vec())))
                .expect("c")
        );
        assert!(
            sm.compare(&cmp("k", Equal, CompareTarget::Lease(0)))
                .expect("c")
        );
        assert!(
            sm.compare(&cmp("missing", Equal, CompareTarget::Create(0)))
                .expect("c")
        );
        assert!(
            !sm.compare(&cmp("missing", Equal, CompareTarget::Value(vec![])))
                .expect("c")
        );
    }

    #[test]
    fn txn_runs_the_failure_branch_and_nested_txns_in_one_revision() {
        let mut t = T::new();
        t.put("k", "1");
        let a = t.apply(Command::Txn(TxnReq {
            compare: vec![cmp(
                "k",
                CompareResult::Equal,
                CompareTarget::Value(b"nope".to_vec()),
            )],
            success: vec![put_op("s", "1")],
            failure: vec![
                put_op("f", "1"),
                Op::Txn(TxnReq {
                    compare: vec![cmp("k", CompareResult::Equal, CompareTarget::Version(1))],
                    success: vec![put_op("n", "1")],
                    failure: vec![],
                }),
                Op::Range(RangeReq {
                    range: KeyRange::single("f"),
                    ..Default::default()
                }),
            ],
        }));
        let Response::Txn(r) = a.result.expect("txn") else {
            panic!("not a txn")
        };
        assert!(!r.succeeded);
        assert_eq!(a.revision, 3);
        assert!(t.get_at("s", 0).expect("get").is_none());
        assert_eq!(t.get_at("n", 0).expect("get").expect("n").mod_revision, 3);
        // The range inside the txn saw the txn's own write.
        let Some(response_op::Response::ResponseRange(rr)) = &r.responses[2].response else {
            panic!("no range response")
        };
        assert_eq!(rr.kvs[0].key, b"f");
    }

    #[test]
    fn invalid_txns_are_refused_before_proposing() {
        let dup = TxnReq {
            compare: vec![],
            success: vec![put_op("a", "1"), put_op("a", "2")],
            failure: vec![],
        };
        assert!(matches!(validate_txn(&dup, 128), Err(Error::DuplicateKey)));
        let del_then_put = TxnReq {
            compare: vec![],
            success: vec![
                Op::Delete(DeleteReq {
                    range: prefix("a"),
                    prev_kv: false,
                }),
                put_op("ab", "1"),
            ],
            failure: vec![],
        };
        assert!(matches!(
            validate_txn(&del_then_put, 128),
            Err(Error::DuplicateKey)
        ));
        let same_key_other_branch = TxnReq {
            compare: vec![],
            success: vec![put_op("a", "1")],
            failure: vec![put_op("a", "2")],
        };
        validate_txn(&same_key_other_branch, 128).expect("branches are separate");
        let many = TxnReq {
            compare: vec![],
            success: (0..129).map(|i| put_op(&format!("k{i}"), "v")).collect(),
            failure: vec![],
        };
        assert!(matches!(validate_txn(&many, 128), Err(Error::TooManyOps)));
        assert!(matches!(
            validate(&Command::Put(PutReq::default()), 128),
            Err(Error::EmptyKey)
        ));
    }

    #[test]
    fn unknown_lease_refuses_the_whole_write_and_changes_nothing() {
        let mut t = T::new();
        let a = t.apply(Command::Put(PutReq {
            key: b"k".to_vec(),
            lease: 42,
            ..Default::default()
        }));
        assert!(matches!(a.result, Err(Error::LeaseNotFound)));
        assert_eq!(a.revision, 1);
        let a = t.apply(Command::Txn(TxnReq {
            compare: vec![],
            success: vec![
                put_op("ok", "1"),
                Op::Put(PutReq {
                    key: b"k".to_vec(),
                    lease: 42,
                    ..Default::default()
                }),
            ],
            failure: vec![],
        }));
        assert!(matches!(a.result, Err(Error::LeaseNotFound)));
        assert!(t.get_at("ok", 0).expect("get").is_none());
        assert_eq!(t.sm.revision(), 1);
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_in_one_revision() {
        let mut t = T::new();
        t.apply(Command::LeaseGrant { id: 7, ttl: 10 })
            .result
            .expect("grant");
        for k in ["a", "b", "c"] {
            t.apply(Command::Put(PutReq {
                key: k.into(),
                value: b"v".to_vec(),
                lease: 7,
                ..Default::default()
            }))
            .result
            .expect("put");
        }
        // Re-putting "c" without the lease detaches it.
        t.put("c", "free");
        assert_eq!(t.sm.leases()[&7].keys.len(), 2);
        let a = t.apply(Command::LeaseRevoke { id: 7 });
        a.result.expect("revoke");
        assert_eq!(a.events.len(), 2);
        assert!(
            a.events
                .iter()
                .all(|e| e.kv.as_ref().expect("kv").mod_revision == a.revision)
        );
        assert!(t.get_at("a", 0).expect("get").is_none());
        assert_eq!(t.get_at("c", 0).expect("get").expect("c").value, b"free");
        assert!(matches!(
            t.apply(Command::LeaseRevoke { id: 7 }).result,
            Err(Error::LeaseNotFound)
        ));
        assert!(matches!(
            t.apply(Command::LeaseGrant {
                id: 8,
                ttl: MAX_LEASE_TTL + 1
            })
            .result,
            Err(Error::LeaseTtlTooLarge)
        ));
    }

    #[test]
    fn range_options_limit_sort_count_and_filters() {
        let mut t = T::new();
        t.put("p/a", "3"); // 2
        t.put("p/b", "1"); // 3
        t.put("p/c", "2"); // 4
        t.put("p/a", "4"); // 5
        t.put("q", "x");
        let store = t.sm.store();
        let base = RangeReq {
            range: prefix("p/"),
            ..Default::default()
        };
        let r = store
            .range(&RangeReq {
                limit: 2,
                ..base.clone()
            })
            .expect("range");
        assert_eq!((r.kvs.len(), r.more, r.count), (2, true, 3));
        let r = store
            .range(&RangeReq {
                sort_order: SortOrder::Descend,
                ..base.clone()
            })
            .expect("range");
        assert_eq!(r.kvs[0].key, b"p/c");
        let r = store
            .range(&RangeReq {
                sort_target: SortTarget::Mod,
                sort_order: SortOrder::Descend,
                limit: 1,
                ..base.clone()
            })
            .expect("range");
        assert_eq!(r.kvs[0].key, b"p/a");
        let r = store
            .range(&RangeReq {
                sort_target: SortTarget::Value,
                ..base.clone()
            })
            .expect("range");
        assert_eq!(
            r.kvs.iter().map(|k| k.value.clone()).collect::<Vec<_>>(),
            vec![b"1".to_vec(), b"2".to_vec(), b"4".to_vec()]
        );
        let r = store
            .range(&RangeReq {
                keys_only: true,
                ..base.clone()
            })
            .expect("range");
        assert!(r.kvs.iter().all(|k| k.value.is_empty()));
        let r = store
            .range(&RangeReq {
                count_only: true,
                ..base.clone()
            })
            .expect("range");
        assert_eq!((r.kvs.len(), r.count), (0, 3));
        let r = store
            .range(&RangeReq {
                min_mod_revision: 4,
                ..base.clone()
            })
            .expect("range");
        assert_eq!(r.kvs.len(), 2);
        let r = store
            .range(&RangeReq {
                max_create_revision: 2,
                ..base.clone()
            })
            .expect("range");
        assert_eq!(r.kvs.len(), 1);
        let all = KeyRange {
            key: vec![0],
            end: vec![0],
        };
        assert_eq!(
            store
                .range(&RangeReq {
                    range: all,
                    ..Default::default()
                })
                .expect("all")
                .count,
            4
        );
    }

    #[test]
    fn ignore_value_and_ignore_lease_keep_what_the_key_has() {
        let mut t = T::new();
        t.apply(Command::LeaseGrant { id: 9, ttl: 10 })
            .result
            .expect("grant");
        t.apply(Command::Put(PutReq {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            lease: 9,
            ..Default::default()
        }))
        .result
        .expect("put");
        t.apply(Command::Put(PutReq {
            key: b"k".to_vec(),
            ignore_value: true,
            ignore_lease: true,
            ..Default::default()
        }))
        .result
        .expect("put");
        let kv = t.get_at("k", 0).expect("get").expect("k");
        assert_eq!(
            (kv.value.as_slice(), kv.lease, kv.version),
            (&b"v"[..], 9, 2)
        );
        let a = t.apply(Command::Put(PutReq {
            key: b"nope".to_vec(),
            ignore_value: true,
            ..Default::default()
        }));
        assert!(matches!(a.result, Err(Error::KeyNotFound)));
    }

    #[test]
    fn state_survives_reopen_and_replayed_entries_are_skipped() {
        let mut t = T::new();
        t.apply(Command::LeaseGrant { id: 5, ttl: 30 })
            .result
            .expect("grant");
        t.apply(Command::Put(PutReq {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            lease: 5,
            ..Default::default()
        }))
        .result
        .expect("put");
        let idx = t.index;
        let reopened = StateMachine::open(t.backend.clone()).expect("reopen");
        assert_eq!(reopened.applied_index(), idx);
        assert_eq!(reopened.revision(), 2);
        assert!(reopened.leases()[&5].keys.contains(&b"k"[..]));
        let mut reopened = reopened;
        assert!(reopened.apply(idx, 1, &Command::Noop).is_none());
    }

    /// Commands of a mixed batch: a put, a txn whose compare fails, a put refused for an
    /// unknown lease, a batch inside the batch (refused), a delete.
    fn mixed_batch() -> Vec<Command> {
        vec![
            Command::Put(PutReq {
                key: b"a".to_vec(),
                value: b"1".to_vec(),
                ..Default::default()
            }),
            Command::Txn(TxnReq {
                compare: vec![cmp(
                    "a",
                    CompareResult::Equal,
                    CompareTarget::Value(b"2".to_vec()),
                )],
                success: vec![put_op("a", "then")],
                failure: vec![put_op("b", "else")],
            }),
            Command::Put(PutReq {
                key: b"c".to_vec(),
                value: b"x".to_vec(),
                lease: 99,
                ..Default::default()
            }),
            Command::Batch(vec![Command::Put(PutReq {
                key: b"d".to_vec(),
                value: b"x".to_vec(),
                ..Default::default()
            })]),
            Command::Delete(DeleteReq {
                range: KeyRange::single(b"a".to_vec()),
                prev_kv: false,
            }),
        ]
    }

    #[test]
    fn a_batch_entry_answers_each_command_as_separate_entries_would() {
        let cmds = mixed_batch();
        // The same commands, one entry each.
        let mut one_by_one = T::new();
        let separate: Vec<Applied> = cmds
            .iter()
            .map(|c| {
                one_by_one.index += 1;
                one_by_one
                    .sm
                    .apply(one_by_one.index, 1, c)
                    .expect("new index")
            })
            .collect();
        one_by_one.sm.commit().expect("commit");
        // All of them in one entry.
        let mut batched = T::new();
        let list = batched
            .sm
            .apply_entry(1, 1, &Command::Batch(cmds.clone()))
            .expect("new index");
        batched.sm.commit().expect("commit");

        assert_eq!(list.len(), cmds.len(), "one outcome per command");
        for (n, (b, s)) in list.iter().zip(&separate).enumerate() {
            assert_eq!(b.revision, s.revision, "command {n}: revision");
            assert_eq!(
                format!("{:?}", b.result),
                format!("{:?}", s.result),
                "command {n}"
            );
            assert_eq!(b.events, s.events, "command {n}: events");
        }
        let revisions: Vec<i64> = list.iter().map(|a| a.revision).collect();
        assert_eq!(
            revisions,
            [2, 3, 3, 3, 4],
            "refused commands take no revision"
        );
        match &list[1].result {
            Ok(Response::Txn(t)) => assert!(!t.succeeded, "the failure branch ran"),
            other => panic!("txn: {other:?}"),
        }
        assert!(matches!(list[2].result, Err(Error::LeaseNotFound)));
        assert!(matches!(list[3].result, Err(Error::InvalidArgument(_))));
        assert_eq!(batched.sm.applied_index(), 1, "the batch is one entry");
        assert!(batched.get_at("a", 0).expect("read").is_none());
        assert_eq!(
            batched.get_at("b", 0).expect("read").expect("b").value,
            b"else"
        );
        assert!(batched.get_at("c", 0).expect("read").is_none());
        assert!(batched.get_at("d", 0).expect("read").is_none());
        // And the same key space: every revision record alike.
        let dump = |t: &T| {
            let mut out = Vec::new();
            t.backend
                .scan(&[keys::REV], &[keys::REV + 1], &mut |k, v| {
                    out.push((k.to_vec(), v.to_vec()));
                    true
                })
                .expect("scan");
            out
        };
        assert_eq!(dump(&batched), dump(&one_by_one));
        // A replayed batch entry is skipped as a whole.
        assert!(
            batched
                .sm
                .apply_entry(1, 1, &Command::Batch(cmds))
                .is_none()
        );
    }
}
