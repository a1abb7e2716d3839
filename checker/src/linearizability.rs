//! A linearizability checker for small histories, per key, that needs no revisions.
//!
//! The search is the one of Wing & Gong with the memoization of Lowe, as in porcupine: the
//! invoke and return events are put in one list ordered by time; the search repeatedly takes a
//! call that is still pending, applies it to the model, and removes it, and backtracks when it
//! reaches a return whose call was not taken. A set of (taken operations, model state) already
//! explored cuts repeats, which keeps the search practical for a few hundred operations per
//! key. Operations of unknown outcome return "at infinity" and accept any output, so they may
//! be placed anywhere after their invoke, including at the very end (not applied).
//!
//! [`Model`] is generic; [`RegisterModel`] is a key holding an optional value with put, get,
//! delete and a compare-and-set on the value. [`check_history`] turns a KV [`History`] into
//! register operations per key (a compare-and-set on `mod_revision` becomes one on the value
//! written at that revision, exact when values are unique) and checks every key.
//!
//! The search is exponential in the worst case: a step budget per key turns a search that
//! would not end into an inconclusive result rather than a hang.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;

use crate::history::{
    DisplayBytes, History, Key, OpId, Outcome, Request, Response, Revision, Time, Value,
};
use crate::report::{Violation, ViolationKind};

/// A sequential specification.
pub trait Model {
    /// The state; explored (operations taken, state) pairs are remembered, so keep it small.
    type State: Clone + Eq + Hash + Debug;
    /// What an operation asks.
    type Input: Debug;
    /// What it answered.
    type Output: Debug;
    /// The state before any operation.
    fn init(&self) -> Self::State;
    /// The state after `input` applied to `state` answered `output`, or `None` if it could not
    /// have answered that. `output` is `None` when unknown: any answer is possible.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State>;
}

/// One operation for the search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<I, O> {
    /// The operation in the recorded history, for reports.
    pub id: OpId,
    /// What was asked.
    pub input: I,
    /// What was answered; `None` if unknown (the operation may take effect any time after its
    /// invoke, or never).
    pub output: Option<O>,
    /// When it was sent.
    pub invoke: Time,
    /// When it returned; ignored when `output` is `None`.
    pub complete: Time,
}

/// The result of [`search`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An order exists that respects real time and the model.
    Linearizable,
    /// None exists.
    NotLinearizable {
        /// The longest prefix of a linearization the search found, in order.
        prefix: Vec<OpId>,
        /// The operation that returned before it could be placed after that prefix.
        stuck: OpId,
    },
    /// The step budget ran out first.
    Inconclusive {
        /// Steps taken.
        steps: u64,
    },
}

/// Searches for a linearization of `entries` under `model`, in at most `max_steps` steps.
pub fn search<M: Model>(
    model: &M,
    entries: &[Entry<M::Input, M::Output>],
    max_steps: u64,
) -> Verdict {
    const NIL: usize = usize::MAX;
    let n = entries.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Events: (time, is_return, op). Calls sort before returns at equal times (concurrent).
    let mut events: Vec<(Time, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in entries.iter().enumerate() {
        let complete = if e.output.is_none() {
            Time::MAX
        } else {
            e.complete.max(e.invoke)
        };
        events.push((e.invoke, false, i));
        events.push((complete, true, i));
    }
    events.sort_unstable();
    let mut ret_of = vec![0; n];
    for (pos, &(_, is_ret, op)) in events.iter().enumerate() {
        if is_ret {
            ret_of[op] = pos;
        }
    }
    // Doubly linked list over event positions; `head` is a sentinel before the first.
    let head = 2 * n;
    let mut next: Vec<usize> = (1..=2 * n)
        .map(|i| if i == 2 * n { NIL } else { i })
        .collect();
    next.push(0);
    let mut prev: Vec<usize> = (0..2 * n)
        .map(|i| if i == 0 { head } else { i - 1 })
        .collect();
    prev.push(NIL);
    fn unlink(next: &mut [usize], prev: &mut [usize], x: usize) {
        let (p, nx) = (prev[x], next[x]);
        next[p] = nx;
        if nx != usize::MAX {
            prev[nx] = p;
        }
    }
    fn relink(next: &mut [usize], prev: &mut [usize], x: usize) {
        let (p, nx) = (prev[x], next[x]);
        next[p] = x;
        if nx != usize::MAX {
            prev[nx] = x;
        }
    }

    let words = n.div_ceil(64);
    let mut taken = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut entry = next[head];
    let mut steps = 0u64;
    let mut best: Option<(usize, Vec<OpId>, OpId)> = None;
    while next[head] != NIL {
        steps += 1;
        if steps > max_steps {
            return Verdict::Inconclusive { steps };
        }
        let (_, is_ret, op) = events[entry];
        if !is_ret {
            let e = &entries[op];
            if let Some(new_state) = model.step(&state, &e.input, e.output.as_ref()) {
                taken[op / 64] |= 1 << (op % 64);
                if seen.insert((taken.clone(), new_state.clone())) {
                    let old = std::mem::replace(&mut state, new_state);
                    stack.push((entry, old));
                    unlink(&mut next, &mut prev, entry);
                    unlink(&mut next, &mut prev, ret_of[op]);
                    entry = next[head];
                    continue;
                }
                taken[op / 64] &= !(1 << (op % 64));
            }
            entry = next[entry];
        } else {
            if best
                .as_ref()
                .is_none_or(|(depth, _, _)| stack.len() > *depth)
            {
                let prefix = stack
                    .iter()
                    .map(|&(c, _)| entries[events[c].2].id)
                    .collect();
                best = Some((stack.len(), prefix, entries[op].id));
            }
            let Some((call, old)) = stack.pop() else {
                let (_, prefix, stuck) = best.unwrap_or((0, Vec::new(), entries[op].id));
                return Verdict::NotLinearizable { prefix, stuck };
            };
            let op = events[call].2;
            taken[op / 64] &= !(1 << (op % 64));
            state = old;
            relink(&mut next, &mut prev, ret_of[op]);
            relink(&mut next, &mut prev, call);
            entry = next[call];
        }
    }
    Verdict::Linearizable
}

/// What a compare-and-set compares the register's value with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CasExpected {
    /// The register is empty.
    Absent,
    /// The register holds this value.
    Value(Value),
    /// The value written at the expected revision is not known: it may be one of these values
    /// of writes of unknown outcome whose revision no response told. The compare may hold if
    /// the register holds one of them (or may not: that write could be at another revision),
    /// and cannot otherwise; with no values it never holds.
    Unresolved(Vec<Value>),
}

/// An operation on a register.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegisterInput {
    /// Set the value.
    Write(Value),
    /// Read the value.
    Read,
    /// Empty the register.
    Delete,
    /// Set `new` if the value matches `expected`.
    Cas { expected: CasExpected, new: Value },
}

/// What a register operation answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegisterOutput {
    /// The write was done.
    Written,
    /// The value read.
    Read(Option<Value>),
    /// Whether the delete found a value.
    Deleted(bool),
    /// Whether the compare held (and the value was set).
    Cas(bool),
}

/// A register operation for [`search`].
pub type RegisterEntry = Entry<RegisterInput, RegisterOutput>;

/// A register holding an optional value.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegisterModel;

impl Model for RegisterModel {
    type State = Option<Value>;
    type Input = RegisterInput;
    type Output = RegisterOutput;

    fn init(&self) -> Self::State {
        None
    }

    fn step(
        &self,
        state: &Self::State,
        input: &RegisterInput,
        output: Option<&RegisterOutput>,
    ) -> Option<Self::State> {
        match (input, output) {
            (RegisterInput::Write(v), None | Some(RegisterOutput::Written)) => {
                Some(Some(v.clone()))
            }
            (RegisterInput::Read, None) => Some(state.clone()),
            (RegisterInput::Read, Some(RegisterOutput::Read(v))) => {
                (v == state).then(|| state.clone())
            }
            (RegisterInput::Delete, None) => Some(None),
            (RegisterInput::Delete, Some(RegisterOutput::Deleted(d))) => {
                (*d == state.is_some()).then_some(None)
            }
            (RegisterInput::Cas { expected, new }, out) => {
                // Whether the compare can hold, and whether it can fail.
                let (can_hold, can_fail) = match expected {
                    CasExpected::Absent => (state.is_none(), state.is_some()),
                    CasExpected::Value(v) => {
                        let holds = state.as_ref() == Some(v);
                        (holds, !holds)
                    }
                    CasExpected::Unresolved(vs) => {
                        (state.as_ref().is_some_and(|s| vs.contains(s)), true)
                    }
                };
                match out {
                    // A compare that failed changed nothing, as if never applied (which placing
                    // the operation last also covers): take the success where it can hold.
                    None => Some(if can_hold {
                        Some(new.clone())
                    } else {
                        state.clone()
                    }),
                    Some(RegisterOutput::Cas(true)) => can_hold.then(|| Some(new.clone())),
                    Some(RegisterOutput::Cas(false)) => can_fail.then(|| state.clone()),
                    Some(_) => None,
                }
            }
            _ => None,
        }
    }
}

/// Limits of [`check_history`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinOptions {
    /// Search steps per key before giving up as inconclusive.
    pub max_steps_per_key: u64,
}

impl Default for LinOptions {
    fn default() -> Self {
        LinOptions {
            max_steps_per_key: 2_000_000,
        }
    }
}

/// The result of [`check_history`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinReport {
    /// One [`ViolationKind::NotLinearizable`] per key with no linearization (and
    /// [`ViolationKind::Malformed`] for responses of the wrong type).
    pub violations: Vec<Violation>,
    /// Keys whose search ran out of steps.
    pub inconclusive: Vec<Key>,
    /// Keys checked.
    pub keys: usize,
}

impl LinReport {
    /// Whether every key was found linearizable.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty() && self.inconclusive.is_empty()
    }

    /// Panics with the report unless every key was found linearizable: for tests.
    #[track_caller]
    pub fn assert_ok(&self) {
        if !self.is_ok() {
            let lines: Vec<String> = self.violations.iter().map(|v| format!("- {v}")).collect();
            let inconclusive: Vec<String> = self
                .inconclusive
                .iter()
                .map(|k| DisplayBytes(k).to_string())
                .collect();
            panic!(
                "linearizability check failed on {} keys:\n{}\ninconclusive: [{}]",
                self.keys,
                lines.join("\n"),
                inconclusive.join(", ")
            );
        }
    }
}

/// The register operations of each key of a KV history. Failed operations and reads of unknown
/// outcome are left out. A compare-and-set on `mod_revision` r compares with the value written
/// at r (known from an acknowledged write or a read), with [`CasExpected::Absent`] for 0; for
/// a revision no response ties to a value of the key, with the values of the key's writes of
/// unknown outcome whose revision no response told ([`CasExpected::Unresolved`]), or with
/// nothing if a response ties r to another key or a delete.
pub fn register_operations(
    history: &History,
) -> (BTreeMap<Key, Vec<RegisterEntry>>, Vec<Violation>) {
    // The value each (key, revision) was written with, from every response that tells.
    let mut written: HashMap<(&Key, Revision), &Value> = HashMap::new();
    // Revisions some response ties to a write, of any key.
    let mut tied: HashSet<Revision> = HashSet::new();
    // Values of each key's writes of unknown outcome (those whose revision a read told are
    // dropped below).
    let mut unknown_values: HashMap<&Key, Vec<Value>> = HashMap::new();
    for op in &history.ops {
        match (&op.request, &op.outcome) {
            (Request::Put { key, value } | Request::Cas { key, value, .. }, Outcome::Unknown) => {
                unknown_values.entry(key).or_default().push(value.clone());
            }
            (_, Outcome::Ok(resp)) if resp.is_mutation() => {
                tied.insert(resp.revision());
            }
            _ => {}
        }
        match (&op.request, &op.outcome) {
            (Request::Put { key, value }, Outcome::Ok(Response::Put { revision }))
            | (
                Request::Cas { key, value, .. },
                Outcome::Ok(Response::Cas {
                    revision,
                    succeeded: true,
                }),
            ) => {
                written.insert((key, *revision), value);
            }
            (Request::Get { key }, Outcome::Ok(Response::Get { kv: Some(kv), .. })) => {
                written.insert((key, kv.mod_revision), &kv.value);
            }
            _ => {}
        }
    }
    let known: HashSet<(&Key, &Value)> = written.iter().map(|((k, _), v)| (*k, *v)).collect();
    for (key, values) in unknown_values.iter_mut() {
        values.retain(|v| !known.contains(&(*key, v)));
    }
    let mut per_key: BTreeMap<Key, Vec<RegisterEntry>> = BTreeMap::new();
    let mut malformed = Vec::new();
    for (i, op) in history.ops.iter().enumerate() {
        let id = OpId(i);
        let input = match &op.request {
            Request::Put { value, .. } => RegisterInput::Write(value.clone()),
            Request::Get { .. } => RegisterInput::Read,
            Request::Delete { .. } => RegisterInput::Delete,
            Request::Cas {
                key,
                expected_mod_revision,
                value,
            } => RegisterInput::Cas {
                expected: if *expected_mod_revision == 0 {
                    CasExpected::Absent
                } else {
                    match written.get(&(key, *expected_mod_revision)) {
                        Some(v) => CasExpected::Value((*v).clone()),
                        None if tied.contains(expected_mod_revision) => {
                            CasExpected::Unresolved(Vec::new())
                        }
                        None => CasExpected::Unresolved(
                            unknown_values.get(key).cloned().unwrap_or_default(),
                        ),
                    }
                },
                new: value.clone(),
            },
        };
        let output = match (&op.request, &op.outcome) {
            (_, Outcome::Failed) | (Request::Get { .. }, Outcome::Unknown) => continue,
            (_, Outcome::Unknown) => None,
            (Request::Put { .. }, Outcome::Ok(Response::Put { .. })) => {
                Some(RegisterOutput::Written)
            }
            (Request::Get { .. }, Outcome::Ok(Response::Get { kv, .. })) => {
                Some(RegisterOutput::Read(kv.as_ref().map(|kv| kv.value.clone())))
            }
            (Request::Delete { .. }, Outcome::Ok(Response::Delete { deleted, .. })) => {
                Some(RegisterOutput::Deleted(*deleted > 0))
            }
            (Request::Cas { .. }, Outcome::Ok(Response::Cas { succeeded, .. })) => {
                Some(RegisterOutput::Cas(*succeeded))
            }
            (_, Outcome::Ok(_)) => {
                malformed.push(
                    Violation::new(
                        ViolationKind::Malformed,
                        format!(
                            "{}: response type does not match the request",
                            history.describe(id)
                        ),
                    )
                    .ops([id])
                    .key(op.request.key()),
                );
                continue;
            }
        };
        per_key
            .entry(op.request.key().clone())
            .or_default()
            .push(Entry {
                id,
                input,
                output,
                invoke: op.invoke,
                complete: op.complete,
            });
    }
    (per_key, malformed)
}

/// Checks each key of a KV history for linearizability as a register, ignoring revisions.
pub fn check_history(history: &History, options: &LinOptions) -> LinReport {
    let (per_key, mut violations) = register_operations(history);
    let mut report = LinReport {
        keys: per_key.len(),
        ..LinReport::default()
    };
    for (key, entries) in per_key {
        match search(&RegisterModel, &entries, options.max_steps_per_key) {
            Verdict::Linearizable => {}
            Verdict::Inconclusive { .. } => report.inconclusive.push(key),
            Verdict::NotLinearizable { prefix, stuck } => {
                let tail: Vec<OpId> = prefix.iter().rev().take(3).rev().copied().collect();
                let tail_described: Vec<String> =
                    tail.iter().map(|&o| history.describe(o)).collect();
                violations.push(
                    Violation::new(
                        ViolationKind::NotLinearizable,
                        format!(
                            "no order of the key's {} operations fits a register; the longest linearizable prefix has {} operations, ending [{}]; {} cannot follow it",
                            entries.len(),
                            prefix.len(),
                            tail_described.join("; "),
                            history.describe(stuck)
                        ),
                    )
                    .ops(tail.into_iter().chain([stuck]))
                    .key(&key),
                );
            }
        }
    }
    report.violations = violations;
    report
}
