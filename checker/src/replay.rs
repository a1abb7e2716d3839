//! The revision replay check: cheap (sorting and one pass per key), so it runs on histories of
//! 100k operations and more.
//!
//! It leans on what etcd puts in every response: the store revision. Steps, in order:
//! 1. Each successful response is checked on its own ([`ViolationKind::Malformed`]).
//! 2. Writes that changed the store (put, delete that deleted, compare-and-set that
//!    succeeded) must have distinct revisions.
//! 3. Real time: an operation invoked after another returned has a revision `>=` the other's,
//!    `>` if it is a write; per client, revisions never go back.
//! 4. Placement: every value a read shows (by its `mod_revision`) and every watch event must be
//!    the write at that revision. Where no acknowledged write is there, a write of unknown outcome
//!    with that key and value (or a delete of the key) is placed there, once, and only at a
//!    revision after every revision returned before it was sent.
//! 5. Replay, per key: walking the writes (acknowledged and placed) and the reads in revision
//!    order, every read at revision r must show exactly the state after the writes up to r:
//!    value, `mod_revision`, version; a delete that deleted must find the key, one that deleted
//!    nothing must not; a compare-and-set must have compared the state then.
//! 6. No lost write: a read of every written key invoked after all its acknowledged writes
//!    returned must show the last of them or something later.
//!
//! # Writes of unknown outcome nobody saw
//! They may have been applied at any free revision after they were sent, or never. The check
//! gives them the benefit of the doubt without placing them: a key found absent is explained by
//! an unseen delete of unknown outcome (if one could fit between the last read that saw the key
//! and that read), a compare-and-set or delete that contradicts the replay by an unseen put,
//! and versions of a key are only checked exactly before the first write of unknown outcome to
//! it was sent. So unknown writes never cause a false alarm, and some bugs near them go unseen.
//!
//! # Assumptions
//! - Every write to the checked keys is in the history, and the keys did not exist before it
//!   (use a fresh key prefix per run). Revisions may have gaps: writes to other keys.
//! - Values are unique per key (as etcd's robustness tests do): a value identifies its write.
//! - Reads are linearizable; a serializable read may legitimately be stale.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::history::{
    ClientId, DisplayBytes, History, Key, KeyValue, OpId, Outcome, Request, Response, Revision,
    Time, Value,
};
use crate::report::{Report, Violation, ViolationKind};
use crate::watch::{self, WatchRecord, WatcherId};

/// What [`check`] requires beyond the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Every key with an acknowledged write must have a read invoked after all of them
    /// returned ([`ViolationKind::MissingFinalRead`] otherwise), so that a lost write shows.
    /// On by default.
    pub require_final_reads: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            require_final_reads: true,
        }
    }
}

/// What a write does at its revision.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Effect {
    Put(Value),
    Delete,
}

/// What must hold just before a write is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Precondition {
    None,
    /// A delete that deleted: the key existed.
    Present,
    /// A compare-and-set that succeeded: the key's `mod_revision` (0 = absent).
    ModRevision(Revision),
}

/// A write known to be at a revision: acknowledged, or of unknown outcome and seen there.
#[derive(Clone, Debug)]
pub(crate) struct Write {
    pub op: OpId,
    pub key: Key,
    pub effect: Effect,
    pre: Precondition,
}

/// Every write known to be at a revision, by revision.
pub(crate) type WriteLog = BTreeMap<Revision, Write>;

/// A write of unknown outcome.
struct Unknown {
    op: OpId,
    key: Key,
    effect: Effect,
    pre: Precondition,
    /// The highest revision returned before it was sent: it can only be applied after that.
    after: Revision,
    placed_at: Option<Revision>,
}

/// A successful operation's place in time and in revisions.
struct Timed {
    op: OpId,
    client: ClientId,
    invoke: Time,
    complete: Time,
    revision: Revision,
    mutation: bool,
}

/// What a successful response says about its key's state at its revision.
#[derive(Clone, Debug)]
enum Seen {
    Present(KeyValue),
    Absent,
    /// A compare-and-set whose compare failed: the key's `mod_revision` was not this.
    NotModRevision(Revision),
}

struct Observation {
    op: OpId,
    key: Key,
    revision: Revision,
    seen: Seen,
    is_get: bool,
    /// Cleared when placement already reported it: the replay skips it.
    valid: bool,
}

/// Something that names the write at a revision: a read's `mod_revision` or a watch event.
struct WriteRef {
    source: RefSource,
    key: Key,
    revision: Revision,
    effect: Effect,
}

#[derive(Clone, Copy)]
enum RefSource {
    Read { observation: usize },
    Watch { watcher: WatcherId },
}

/// Runs every check on a KV history and the watch streams recorded alongside it (pass `&[]`
/// for none). See the module documentation for the rules.
pub fn check(history: &History, watches: &[WatchRecord], options: &Options) -> Report {
    let mut out = Vec::new();
    let Classified {
        timed,
        acked,
        mut unknown,
        mut observations,
    } = classify(history, &mut out);

    let (mut log, duplicates) = check_unique_revisions(history, acked, &mut out);
    check_real_time(history, &timed, &mut out);
    bound_unknown(&timed, history, &mut unknown);

    let mut refs = Vec::new();
    for (i, o) in observations.iter().enumerate() {
        if let Seen::Present(kv) = &o.seen {
            refs.push(WriteRef {
                source: RefSource::Read { observation: i },
                key: o.key.clone(),
                revision: kv.mod_revision,
                effect: Effect::Put(kv.value.clone()),
            });
        }
    }
    for w in watches {
        watch::check_stream(w, &mut out);
        for e in w.events() {
            refs.push(WriteRef {
                source: RefSource::Watch { watcher: w.watcher },
                key: e.key.clone(),
                revision: e.revision,
                effect: e.effect(),
            });
        }
    }
    place(
        history,
        refs,
        &mut log,
        &duplicates,
        &mut unknown,
        &mut observations,
        &mut out,
    );
    replay(
        history,
        &log,
        &duplicates,
        &observations,
        &unknown,
        &mut out,
    );
    check_final_reads(history, &log, &observations, &unknown, options, &mut out);
    for w in watches {
        watch::check_gaps(w, &log, &mut out);
    }
    watch::check_agreement(watches, &mut out);

    let applied = unknown.iter().filter(|u| u.placed_at.is_some()).count();
    Report {
        violations: out,
        operations: history.len(),
        watchers: watches.len(),
        unknown_applied: applied,
        unknown_unseen: unknown.len() - applied,
    }
}

/// [`check`] without watchers.
pub fn check_history(history: &History, options: &Options) -> Report {
    check(history, &[], options)
}

struct Classified {
    timed: Vec<Timed>,
    acked: Vec<(Revision, Write)>,
    unknown: Vec<Unknown>,
    observations: Vec<Observation>,
}

fn classify(h: &History, out: &mut Vec<Violation>) -> Classified {
    let mut c = Classified {
        timed: Vec::new(),
        acked: Vec::new(),
        unknown: Vec::new(),
        observations: Vec::new(),
    };
    for (i, op) in h.ops.iter().enumerate() {
        let id = OpId(i);
        let resp = match &op.outcome {
            Outcome::Failed => continue,
            Outcome::Unknown => {
                let (effect, pre) = match &op.request {
                    Request::Get { .. } => continue,
                    Request::Put { value, .. } => (Effect::Put(value.clone()), Precondition::None),
                    Request::Delete { .. } => (Effect::Delete, Precondition::Present),
                    Request::Cas {
                        expected_mod_revision,
                        value,
                        ..
                    } => (
                        Effect::Put(value.clone()),
                        Precondition::ModRevision(*expected_mod_revision),
                    ),
                };
                c.unknown.push(Unknown {
                    op: id,
                    key: op.request.key().clone(),
                    effect,
                    pre,
                    after: 0,
                    placed_at: None,
                });
                continue;
            }
            Outcome::Ok(resp) => resp,
        };
        if let Err(why) = validate(&op.request, resp, op.invoke, op.complete) {
            out.push(
                Violation::new(
                    ViolationKind::Malformed,
                    format!("{}: {why}", h.describe(id)),
                )
                .ops([id])
                .key(op.request.key()),
            );
            continue;
        }
        let key = op.request.key().clone();
        let revision = resp.revision();
        c.timed.push(Timed {
            op: id,
            client: op.client,
            invoke: op.invoke,
            complete: op.complete,
            revision,
            mutation: resp.is_mutation(),
        });
        let observe = |seen, is_get| Observation {
            op: id,
            key: key.clone(),
            revision,
            seen,
            is_get,
            valid: true,
        };
        match (&op.request, resp) {
            (Request::Put { value, .. }, _) => c.acked.push((
                revision,
                Write {
                    op: id,
                    key: key.clone(),
                    effect: Effect::Put(value.clone()),
                    pre: Precondition::None,
                },
            )),
            (Request::Get { .. }, Response::Get { kv, .. }) => {
                let seen = kv.clone().map_or(Seen::Absent, Seen::Present);
                c.observations.push(observe(seen, true));
            }
            (Request::Delete { .. }, Response::Delete { deleted: 1, .. }) => c.acked.push((
                revision,
                Write {
                    op: id,
                    key: key.clone(),
                    effect: Effect::Delete,
                    pre: Precondition::Present,
                },
            )),
            (Request::Delete { .. }, _) => c.observations.push(observe(Seen::Absent, false)),
            (
                Request::Cas {
                    expected_mod_revision,
                    value,
                    ..
                },
                Response::Cas { succeeded, .. },
            ) => {
                if *succeeded {
                    c.acked.push((
                        revision,
                        Write {
                            op: id,
                            key: key.clone(),
                            effect: Effect::Put(value.clone()),
                            pre: Precondition::ModRevision(*expected_mod_revision),
                        },
                    ));
                } else {
                    c.observations
                        .push(observe(Seen::NotModRevision(*expected_mod_revision), false));
                }
            }
            // `validate` let only matching pairs through.
            _ => {}
        }
    }
    c
}

/// Checks a successful response on its own.
fn validate(req: &Request, resp: &Response, invoke: Time, complete: Time) -> Result<(), String> {
    if complete < invoke {
        return Err(format!(
            "returned at {complete}, before its invoke at {invoke}"
        ));
    }
    let rev = resp.revision();
    if rev < 1 {
        return Err(format!("revision {rev} below 1"));
    }
    match (req, resp) {
        (Request::Put { .. }, Response::Put { .. }) => Ok(()),
        (Request::Get { .. }, Response::Get { kv, .. }) => match kv {
            Some(kv) if kv.mod_revision < 1 || kv.mod_revision > rev => Err(format!(
                "mod_revision {} outside 1..={rev}",
                kv.mod_revision
            )),
            Some(kv) if kv.version < 1 => Err(format!("version {} below 1", kv.version)),
            _ => Ok(()),
        },
        (Request::Delete { .. }, Response::Delete { deleted, .. }) => {
            if *deleted == 0 || *deleted == 1 {
                Ok(())
            } else {
                Err(format!("deleted {deleted} keys of one"))
            }
        }
        (
            Request::Cas {
                expected_mod_revision,
                ..
            },
            Response::Cas { .. },
        ) => {
            if *expected_mod_revision < 0 {
                Err(format!("expected mod_revision {expected_mod_revision}"))
            } else {
                Ok(())
            }
        }
        _ => Err("response type does not match the request".to_string()),
    }
}

/// Two acknowledged writes at one revision are a violation; the log keeps the first, the
/// others are returned apart (the replay of their keys still needs them).
fn check_unique_revisions(
    h: &History,
    acked: Vec<(Revision, Write)>,
    out: &mut Vec<Violation>,
) -> (WriteLog, Vec<(Revision, Write)>) {
    let mut by_rev: BTreeMap<Revision, Vec<Write>> = BTreeMap::new();
    for (rev, w) in acked {
        by_rev.entry(rev).or_default().push(w);
    }
    let mut log = WriteLog::new();
    let mut duplicates = Vec::new();
    for (rev, writes) in by_rev {
        if writes.len() > 1 {
            let ops: Vec<OpId> = writes.iter().map(|w| w.op).collect();
            let described: Vec<String> = ops.iter().map(|&o| h.describe(o)).collect();
            out.push(
                Violation::new(
                    ViolationKind::DuplicateRevision,
                    format!(
                        "{} acknowledged writes at revision {rev}: {}",
                        ops.len(),
                        described.join("; ")
                    ),
                )
                .ops(ops)
                .revision(rev),
            );
        }
        let mut writes = writes.into_iter();
        if let Some(first) = writes.next() {
            log.insert(rev, first);
        }
        duplicates.extend(writes.map(|w| (rev, w)));
    }
    (log, duplicates)
}

/// Real-time order implies revision order; per client, revisions never go back.
fn check_real_time(h: &History, timed: &[Timed], out: &mut Vec<Violation>) {
    // Per client first, so that a client's own regression is named as such.
    let mut went_back = HashSet::new();
    let mut by_client: BTreeMap<ClientId, Vec<&Timed>> = BTreeMap::new();
    for t in timed {
        by_client.entry(t.client).or_default().push(t);
    }
    for (client, ops) in by_client {
        for (b, a) in max_before(&ops) {
            if b.revision < a.revision {
                went_back.insert(b.op);
                out.push(
                    Violation::new(
                        ViolationKind::RevisionWentBack,
                        format!(
                            "client {} saw revision {} then, in a later operation, {}: {} then {}",
                            client.0,
                            a.revision,
                            b.revision,
                            h.describe(a.op),
                            h.describe(b.op)
                        ),
                    )
                    .ops([a.op, b.op])
                    .key(h.op(b.op).request.key())
                    .revision(b.revision),
                );
            }
        }
    }
    let all: Vec<&Timed> = timed.iter().collect();
    for (b, a) in max_before(&all) {
        if went_back.contains(&b.op) {
            continue;
        }
        let bad = b.revision < a.revision || (b.mutation && b.revision == a.revision);
        if bad {
            let rule = if b.mutation {
                "a write must get a higher revision than anything returned before it was sent"
            } else {
                "a read must not reflect an older revision than anything returned before it was sent"
            };
            out.push(
                Violation::new(
                    ViolationKind::RealTimeOrder,
                    format!(
                        "{} returned revision {} before {} was sent, which got revision {} ({rule})",
                        h.describe(a.op),
                        a.revision,
                        h.describe(b.op),
                        b.revision
                    ),
                )
                .ops([a.op, b.op])
                .key(h.op(b.op).request.key())
                .revision(b.revision),
            );
        }
    }
}

/// For each operation B, the operation with the highest revision among those that returned
/// before B was invoked, if any: `(B, A)`.
fn max_before<'a>(ops: &[&'a Timed]) -> Vec<(&'a Timed, &'a Timed)> {
    let mut by_invoke: Vec<&Timed> = ops.to_vec();
    by_invoke.sort_by_key(|t| (t.invoke, t.op));
    let mut by_complete: Vec<&Timed> = ops.to_vec();
    by_complete.sort_by_key(|t| (t.complete, t.op));
    let mut next = 0;
    let mut best: Option<&Timed> = None;
    let mut pairs = Vec::new();
    for b in by_invoke {
        while next < by_complete.len() && by_complete[next].complete < b.invoke {
            let a = by_complete[next];
            if best.is_none_or(|m| a.revision > m.revision) {
                best = Some(a);
            }
            next += 1;
        }
        if let Some(a) = best {
            pairs.push((b, a));
        }
    }
    pairs
}

/// Sets each unknown write's lower bound: the highest revision returned before it was sent.
fn bound_unknown(timed: &[Timed], h: &History, unknown: &mut [Unknown]) {
    let mut by_complete: Vec<(Time, Revision)> =
        timed.iter().map(|t| (t.complete, t.revision)).collect();
    by_complete.sort_unstable();
    let mut prefix_max = Vec::with_capacity(by_complete.len());
    let mut m = 0;
    for &(_, r) in &by_complete {
        m = m.max(r);
        prefix_max.push(m);
    }
    for u in unknown {
        let invoke = h.op(u.op).invoke;
        let n = by_complete.partition_point(|&(c, _)| c < invoke);
        u.after = if n == 0 { 0 } else { prefix_max[n - 1] };
    }
}

fn describe_effect(key: &[u8], effect: &Effect) -> String {
    match effect {
        Effect::Put(v) => format!("put {}={}", DisplayBytes(key), DisplayBytes(v)),
        Effect::Delete => format!("delete {}", DisplayBytes(key)),
    }
}

/// Checks every read's `mod_revision` and every watch event against the write at that revision,
/// placing writes of unknown outcome where they were seen.
fn place(
    h: &History,
    mut refs: Vec<WriteRef>,
    log: &mut WriteLog,
    duplicates: &[(Revision, Write)],
    unknown: &mut [Unknown],
    observations: &mut [Observation],
    out: &mut Vec<Violation>,
) {
    // Ascending revisions: any unplaced candidate that fits a revision fits every later one,
    // so which one is taken never blocks a later placement.
    refs.sort_by_key(|r| r.revision);
    let mut candidates: HashMap<(&Key, &Effect), Vec<usize>> = HashMap::new();
    for (i, u) in unknown.iter().enumerate() {
        candidates.entry((&u.key, &u.effect)).or_default().push(i);
    }
    let candidates: HashMap<(Key, Effect), Vec<usize>> = candidates
        .into_iter()
        .map(|((k, e), v)| ((k.clone(), e.clone()), v))
        .collect();
    let mut acked_at: HashMap<(&Key, &Effect), Revision> = HashMap::new();
    for (&rev, w) in log.iter() {
        acked_at.entry((&w.key, &w.effect)).or_insert(rev);
    }
    let acked_at: HashMap<(Key, Effect), Revision> = acked_at
        .into_iter()
        .map(|((k, e), r)| ((k.clone(), e.clone()), r))
        .collect();

    for r in refs {
        let (who, ops, watchers) = match r.source {
            RefSource::Read { observation } => {
                let op = observations[observation].op;
                (h.describe(op), vec![op], vec![])
            }
            RefSource::Watch { watcher } => (
                format!(
                    "{watcher} event {}@{}",
                    describe_effect(&r.key, &r.effect),
                    r.revision
                ),
                vec![],
                vec![watcher],
            ),
        };
        let what = describe_effect(&r.key, &r.effect);
        let found = match log.get(&r.revision) {
            Some(w) if w.key == r.key && w.effect == r.effect => continue,
            // Already reported as a duplicate revision.
            Some(_)
                if duplicates.iter().any(|(rev, w)| {
                    *rev == r.revision && w.key == r.key && w.effect == r.effect
                }) =>
            {
                continue;
            }
            Some(w) => Err(format!(
                "shows {what} at revision {}, where the write was {} {}",
                r.revision,
                h.describe(w.op),
                describe_effect(&w.key, &w.effect)
            )),
            None => {
                let cands = candidates
                    .get(&(r.key.clone(), r.effect.clone()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                // Of the candidates that fit, take the one sent last: the others, which
                // could have been applied earlier, stay free to explain other observations.
                let fits = cands
                    .iter()
                    .copied()
                    .filter(|&i| unknown[i].placed_at.is_none() && unknown[i].after < r.revision)
                    .max_by_key(|&i| (unknown[i].after, h.op(unknown[i].op).invoke));
                if let Some(i) = fits {
                    let u = &mut unknown[i];
                    u.placed_at = Some(r.revision);
                    log.insert(
                        r.revision,
                        Write {
                            op: u.op,
                            key: u.key.clone(),
                            effect: u.effect.clone(),
                            pre: u.pre,
                        },
                    );
                    continue;
                }
                Ok(cands)
            }
        };
        // Not explained: say why as precisely as possible.
        let ever_written = acked_at.get(&(r.key.clone(), r.effect.clone()));
        let (kind, detail, more_ops) = match found {
            Err(detail) => {
                let kind = match r.source {
                    RefSource::Watch { .. } => ViolationKind::WatchEventMismatch,
                    RefSource::Read { .. }
                        if ever_written.is_none() && cands_empty(&candidates, &r) =>
                    {
                        ViolationKind::UnexplainedValue
                    }
                    RefSource::Read { .. } => ViolationKind::ReadMismatch,
                };
                (kind, detail, vec![])
            }
            Ok(cands) => {
                if let Some(&i) = cands.iter().find(|&&i| unknown[i].placed_at.is_some()) {
                    let u = &unknown[i];
                    (
                        ViolationKind::UnknownWriteAppliedTwice,
                        format!(
                            "shows {what} at revision {}, but {} was already seen applied at revision {}",
                            r.revision,
                            h.describe(u.op),
                            u.placed_at.unwrap_or_default()
                        ),
                        vec![u.op],
                    )
                } else if let Some(&i) = cands.first() {
                    let u = &unknown[i];
                    (
                        ViolationKind::RealTimeOrder,
                        format!(
                            "shows {what} at revision {}, but {} was sent after revision {} had been returned",
                            r.revision,
                            h.describe(u.op),
                            u.after
                        ),
                        vec![u.op],
                    )
                } else if let Some(&rev) = ever_written {
                    let op = log.get(&rev).map(|w| w.op);
                    (
                        match r.source {
                            RefSource::Watch { .. } => ViolationKind::WatchEventMismatch,
                            RefSource::Read { .. } => ViolationKind::ReadMismatch,
                        },
                        format!(
                            "shows {what} at revision {}, but that write is at revision {rev}{}",
                            r.revision,
                            op.map(|o| format!(" ({})", h.describe(o)))
                                .unwrap_or_default()
                        ),
                        op.into_iter().collect(),
                    )
                } else {
                    (
                        ViolationKind::UnexplainedValue,
                        format!(
                            "shows {what} at revision {}, which no write (acknowledged or of unknown outcome) made",
                            r.revision
                        ),
                        vec![],
                    )
                }
            }
        };
        if let RefSource::Read { observation } = r.source {
            observations[observation].valid = false;
        }
        out.push(
            Violation::new(kind, format!("{who} {detail}"))
                .ops(more_ops.into_iter().chain(ops))
                .watchers(watchers)
                .key(&r.key)
                .revision(r.revision),
        );
    }
}

fn cands_empty(candidates: &HashMap<(Key, Effect), Vec<usize>>, r: &WriteRef) -> bool {
    candidates
        .get(&(r.key.clone(), r.effect.clone()))
        .is_none_or(Vec::is_empty)
}

/// A key's state after the known writes so far.
struct KeyState {
    value: Value,
    mod_revision: Revision,
    /// `None` where writes of unknown outcome make it uncertain.
    version: Option<i64>,
    op: OpId,
}

/// Per key: unseen writes of unknown outcome, by the lowest revision after which one could apply.
#[derive(Default)]
struct Unseen {
    put_after: Option<Revision>,
    delete_after: Option<Revision>,
}

impl Unseen {
    fn any_after(&self) -> Option<Revision> {
        match (self.put_after, self.delete_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Whether an unseen write of unknown outcome sent after revision `after` could have been
/// applied at a free revision in `(lo, hi]`.
fn could_fit(after: Option<Revision>, lo: Revision, hi: Revision, log: &WriteLog) -> bool {
    match after {
        Some(after) => free_revision(log, lo.max(after), hi).is_some(),
        None => false,
    }
}

/// The first revision in `(lo, hi]` with no known write.
fn free_revision(log: &WriteLog, lo: Revision, hi: Revision) -> Option<Revision> {
    if lo >= hi {
        return None;
    }
    let mut r = lo + 1;
    for (&taken, _) in log.range(lo + 1..=hi) {
        if taken != r {
            return Some(r);
        }
        r += 1;
    }
    (r <= hi).then_some(r)
}

/// Replays each key's known writes in revision order and checks every read against the state.
fn replay(
    h: &History,
    log: &WriteLog,
    duplicates: &[(Revision, Write)],
    observations: &[Observation],
    unknown: &[Unknown],
    out: &mut Vec<Violation>,
) {
    #[derive(Default)]
    struct PerKey<'a> {
        writes: Vec<(Revision, &'a Write)>,
        reads: Vec<&'a Observation>,
        unseen: Unseen,
    }
    let mut keys: BTreeMap<&Key, PerKey<'_>> = BTreeMap::new();
    for (rev, w) in log
        .iter()
        .map(|(r, w)| (*r, w))
        .chain(duplicates.iter().map(|(r, w)| (*r, w)))
    {
        keys.entry(&w.key).or_default().writes.push((rev, w));
    }
    for o in observations.iter().filter(|o| o.valid) {
        keys.entry(&o.key).or_default().reads.push(o);
    }
    for u in unknown.iter().filter(|u| u.placed_at.is_none()) {
        if let Some(k) = keys.get_mut(&u.key) {
            let slot = match u.effect {
                Effect::Put(_) => &mut k.unseen.put_after,
                Effect::Delete => &mut k.unseen.delete_after,
            };
            *slot = Some(slot.map_or(u.after, |a| a.min(u.after)));
        }
    }
    for (key, mut k) in keys {
        k.writes.sort_by_key(|(rev, w)| (*rev, w.op));
        k.reads.sort_by_key(|o| (o.revision, o.op));
        replay_key(h, key, &k.writes, &k.reads, &k.unseen, log, out);
    }
}

fn replay_key(
    h: &History,
    key: &Key,
    writes: &[(Revision, &Write)],
    reads: &[&Observation],
    unseen: &Unseen,
    log: &WriteLog,
    out: &mut Vec<Violation>,
) {
    let mut cur: Option<KeyState> = None;
    // An unseen delete of unknown outcome was assumed since the last known write.
    let mut deleted_since = false;
    // The revision of the last known write, or read that showed the state, of this key: an
    // unseen write assumed to explain something must come after it.
    let mut last_seen: Revision = 0;
    let any_unseen_after = unseen.any_after();
    let state_of = |s: Option<&KeyState>| match s {
        Some(s) => format!(
            "{} (mod_revision {}, version {}, written by {})",
            DisplayBytes(&s.value),
            s.mod_revision,
            s.version.map_or("?".to_string(), |v| v.to_string()),
            h.describe(s.op)
        ),
        None => "absent".to_string(),
    };
    let (mut wi, mut ri) = (0, 0);
    while wi < writes.len() || ri < reads.len() {
        let write_next = match (writes.get(wi), reads.get(ri)) {
            (Some((wr, _)), Some(r)) => *wr <= r.revision,
            (Some(_), None) => true,
            _ => false,
        };
        let effective = if deleted_since { None } else { cur.as_ref() };
        let effective_mod = effective.map_or(0, |s| s.mod_revision);
        if write_next {
            let (rev, w) = writes[wi];
            wi += 1;
            let mut uncertain = false;
            match w.pre {
                Precondition::None => {}
                Precondition::Present => {
                    if effective.is_none() {
                        if could_fit(unseen.put_after, last_seen, rev - 1, log) {
                            uncertain = true;
                        } else {
                            out.push(
                                Violation::new(
                                    ViolationKind::ReadMismatch,
                                    format!(
                                        "{} deleted the key at revision {rev}, but at revision {} it was {}",
                                        h.describe(w.op),
                                        rev - 1,
                                        state_of(effective)
                                    ),
                                )
                                .ops(cur.as_ref().map(|s| s.op).into_iter().chain([w.op]))
                                .key(key)
                                .revision(rev),
                            );
                        }
                    }
                }
                Precondition::ModRevision(expected) => {
                    if effective_mod != expected {
                        let explained = if expected == 0 {
                            could_fit(unseen.delete_after, last_seen, rev - 1, log)
                        } else {
                            expected > last_seen
                                && expected < rev
                                && !log.contains_key(&expected)
                                && unseen.put_after.is_some_and(|a| a < expected)
                        };
                        if explained {
                            uncertain = true;
                        } else {
                            out.push(
                                Violation::new(
                                    ViolationKind::ReadMismatch,
                                    format!(
                                        "{} succeeded at revision {rev} comparing mod_revision == {expected}, but at revision {} the key was {}",
                                        h.describe(w.op),
                                        rev - 1,
                                        state_of(effective)
                                    ),
                                )
                                .ops(cur.as_ref().map(|s| s.op).into_iter().chain([w.op]))
                                .key(key)
                                .revision(rev),
                            );
                        }
                    }
                }
            }
            cur = match &w.effect {
                Effect::Put(value) => {
                    let version = if uncertain || any_unseen_after.is_some_and(|a| a < rev) {
                        None
                    } else {
                        match effective {
                            Some(s) => s.version.map(|v| v + 1),
                            None => Some(1),
                        }
                    };
                    Some(KeyState {
                        value: value.clone(),
                        mod_revision: rev,
                        version,
                        op: w.op,
                    })
                }
                Effect::Delete => None,
            };
            deleted_since = false;
            last_seen = rev;
            continue;
        }

        let o = reads[ri];
        ri += 1;
        let r = o.revision;
        match &o.seen {
            Seen::Present(kv) => match effective {
                Some(s) if s.mod_revision == kv.mod_revision => {
                    let bad = if s.value != kv.value {
                        Some(format!("value {}", DisplayBytes(&kv.value)))
                    } else if s.version.is_some_and(|v| v != kv.version) {
                        Some(format!("version {}", kv.version))
                    } else {
                        None
                    };
                    if let Some(bad) = bad {
                        out.push(
                            Violation::new(
                                ViolationKind::ReadMismatch,
                                format!(
                                    "{} shows {bad}, but at revision {r} the key was {}",
                                    h.describe(o.op),
                                    state_of(effective)
                                ),
                            )
                            .ops([s.op, o.op])
                            .key(key)
                            .revision(r),
                        );
                    }
                }
                _ => {
                    let why = if deleted_since {
                        "; an earlier read already found it deleted"
                    } else {
                        ""
                    };
                    out.push(
                        Violation::new(
                            ViolationKind::StaleRead,
                            format!(
                                "{} shows the value written at revision {}, but at revision {r} the key was {}{why}",
                                h.describe(o.op),
                                kv.mod_revision,
                                state_of(cur.as_ref())
                            ),
                        )
                        .ops(cur.as_ref().map(|s| s.op).into_iter().chain([o.op]))
                        .key(key)
                        .revision(r),
                    );
                }
            },
            Seen::Absent => {
                if let Some(s) = effective {
                    if could_fit(unseen.delete_after, last_seen, r, log) {
                        deleted_since = true;
                    } else {
                        let what = if o.is_get {
                            "shows the key absent"
                        } else {
                            "deleted nothing"
                        };
                        out.push(
                            Violation::new(
                                ViolationKind::StaleRead,
                                format!(
                                    "{} {what}, but at revision {r} the key was {}",
                                    h.describe(o.op),
                                    state_of(effective)
                                ),
                            )
                            .ops([s.op, o.op])
                            .key(key)
                            .revision(r),
                        );
                    }
                }
            }
            Seen::NotModRevision(expected) => {
                if effective_mod == *expected {
                    let explained = could_fit(unseen.put_after, last_seen, r, log)
                        || (effective.is_some()
                            && could_fit(unseen.delete_after, last_seen, r, log));
                    if !explained {
                        out.push(
                            Violation::new(
                                ViolationKind::ReadMismatch,
                                format!(
                                    "{}: the compare failed, but at revision {r} the key was {}",
                                    h.describe(o.op),
                                    state_of(effective)
                                ),
                            )
                            .ops(effective.map(|s| s.op).into_iter().chain([o.op]))
                            .key(key)
                            .revision(r),
                        );
                    }
                }
            }
        }
        // A failed compare-and-set only says what the state was not: it pins nothing.
        if !matches!(o.seen, Seen::NotModRevision(_)) {
            last_seen = last_seen.max(r);
        }
    }
}

/// The last read of each written key, invoked after all its acknowledged writes returned, must
/// show the last of them or a later write.
fn check_final_reads(
    h: &History,
    log: &WriteLog,
    observations: &[Observation],
    unknown: &[Unknown],
    options: &Options,
    out: &mut Vec<Violation>,
) {
    struct Last {
        revision: Revision,
        op: OpId,
        is_delete: bool,
        returned: Time,
    }
    let mut last: BTreeMap<&Key, Last> = BTreeMap::new();
    for (&rev, w) in log {
        let op = h.op(w.op);
        if !matches!(op.outcome, Outcome::Ok(_)) {
            continue; // placed unknown writes are not acknowledged
        }
        let l = last.entry(&w.key).or_insert(Last {
            revision: rev,
            op: w.op,
            is_delete: w.effect == Effect::Delete,
            returned: op.complete,
        });
        if rev >= l.revision {
            l.revision = rev;
            l.op = w.op;
            l.is_delete = w.effect == Effect::Delete;
        }
        l.returned = l.returned.max(op.complete);
    }
    let mut final_read: HashMap<&Key, &Observation> = HashMap::new();
    for o in observations.iter().filter(|o| o.is_get) {
        let Some(l) = last.get(&o.key) else { continue };
        let invoke = h.op(o.op).invoke;
        if invoke <= l.returned {
            continue;
        }
        let e = final_read.entry(&o.key).or_insert(o);
        if invoke > h.op(e.op).invoke {
            *e = o;
        }
    }
    for (key, l) in last {
        let Some(o) = final_read.get(key) else {
            if options.require_final_reads {
                out.push(
                    Violation::new(
                        ViolationKind::MissingFinalRead,
                        format!(
                            "no read of the key was sent after its acknowledged writes returned (the last is {})",
                            h.describe(l.op)
                        ),
                    )
                    .ops([l.op])
                    .key(key),
                );
            }
            continue;
        };
        let later_delete = || {
            unknown.iter().any(|u| {
                &u.key == key
                    && u.effect == Effect::Delete
                    && match u.placed_at {
                        Some(at) => at > l.revision,
                        None => u.after < o.revision,
                    }
            })
        };
        let lost = o.revision < l.revision
            || match &o.seen {
                Seen::Present(kv) if l.is_delete => kv.mod_revision <= l.revision,
                Seen::Present(kv) => kv.mod_revision < l.revision,
                Seen::Absent => !l.is_delete && !later_delete(),
                Seen::NotModRevision(_) => false,
            };
        if lost {
            out.push(
                Violation::new(
                    ViolationKind::LostWrite,
                    format!(
                        "the final read {} does not reflect the last acknowledged write {}",
                        h.describe(o.op),
                        h.describe(l.op)
                    ),
                )
                .ops([l.op, o.op])
                .key(key)
                .revision(l.revision),
            );
        }
    }
}
