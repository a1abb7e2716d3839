//! What a check found: a list of violations, each naming the operations (and watchers) involved
//! and saying why.

use std::fmt;

use crate::history::{DisplayBytes, Key, OpId, Revision};
use crate::watch::WatcherId;

/// What kind of rule a history broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViolationKind {
    /// A response that cannot be right on its own: the wrong response type for the request,
    /// a revision below 1, `mod_revision` above the header revision, a version below 1, a
    /// delete count other than 0 or 1, a return before the invoke.
    Malformed,
    /// Two acknowledged writes at one revision.
    DuplicateRevision,
    /// An operation invoked after another returned carries a lower revision (or, for a
    /// write, not a higher one); or a write was observed at a revision that existed before
    /// the write was even sent.
    RealTimeOrder,
    /// A client saw a lower revision than one it had already seen.
    RevisionWentBack,
    /// A read (or a failed delete) reflects an older state of the key than the replay of the
    /// writes up to its revision: a missed write, a missed delete, a resurrected key.
    StaleRead,
    /// A read or watch event shows a value that no write of the key (acknowledged or of
    /// unknown outcome) ever carried.
    UnexplainedValue,
    /// A read disagrees with the replay in another way: the value's `mod_revision` is not where
    /// it was written, a wrong version, a compare-and-set or delete that contradicts the state.
    ReadMismatch,
    /// A write of unknown outcome was observed at two different revisions (applied twice).
    UnknownWriteAppliedTwice,
    /// The final read of a key does not reflect the key's last acknowledged write or a later one.
    LostWrite,
    /// A key has acknowledged writes but no read was invoked after all of them returned, so a
    /// lost write could not be detected (see [`crate::Options::require_final_reads`]).
    MissingFinalRead,
    /// A watcher delivered an event with a lower revision than one it delivered before.
    WatchOutOfOrder,
    /// A watcher delivered the same (revision, key) twice.
    WatchDuplicateEvent,
    /// A watcher skipped a write in its range between its start revision and the last
    /// revision it is known to have covered.
    WatchMissingEvent,
    /// A watch event disagrees with the write at its revision (other key, value or type).
    WatchEventMismatch,
    /// A watch event for a key outside the watcher's range.
    WatchEventOutOfRange,
    /// A watch event older than the watcher's start revision.
    WatchEventBeforeStart,
    /// The events of one revision were split over several watch responses.
    WatchRevisionSplit,
    /// Two watchers disagree on the events of a range and revisions they both cover.
    WatchersDisagree,
    /// No linearization of one key's operations exists (see [`crate::linearizability`]).
    NotLinearizable,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ViolationKind::Malformed => "malformed response",
            ViolationKind::DuplicateRevision => "duplicate revision",
            ViolationKind::RealTimeOrder => "real-time order",
            ViolationKind::RevisionWentBack => "revision went back",
            ViolationKind::StaleRead => "stale read",
            ViolationKind::UnexplainedValue => "unexplained value",
            ViolationKind::ReadMismatch => "read mismatch",
            ViolationKind::UnknownWriteAppliedTwice => "unknown write applied twice",
            ViolationKind::LostWrite => "lost write",
            ViolationKind::MissingFinalRead => "missing final read",
            ViolationKind::WatchOutOfOrder => "watch out of order",
            ViolationKind::WatchDuplicateEvent => "watch duplicate event",
            ViolationKind::WatchMissingEvent => "watch missing event",
            ViolationKind::WatchEventMismatch => "watch event mismatch",
            ViolationKind::WatchEventOutOfRange => "watch event out of range",
            ViolationKind::WatchEventBeforeStart => "watch event before start",
            ViolationKind::WatchRevisionSplit => "watch revision split",
            ViolationKind::WatchersDisagree => "watchers disagree",
            ViolationKind::NotLinearizable => "not linearizable",
        };
        f.write_str(s)
    }
}

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which rule.
    pub kind: ViolationKind,
    /// The operations involved, the offending one last where there is an order.
    pub ops: Vec<OpId>,
    /// The watchers involved.
    pub watchers: Vec<WatcherId>,
    /// The key, where one is concerned.
    pub key: Option<Key>,
    /// The revision at issue, where one is.
    pub revision: Option<Revision>,
    /// Why, with the operations described (`#12 c3 get "k" -> ok rev 9 ...`).
    pub detail: String,
}

impl Violation {
    pub(crate) fn new(kind: ViolationKind, detail: String) -> Self {
        Violation {
            kind,
            ops: Vec::new(),
            watchers: Vec::new(),
            key: None,
            revision: None,
            detail,
        }
    }

    pub(crate) fn ops(mut self, ops: impl IntoIterator<Item = OpId>) -> Self {
        self.ops.extend(ops);
        self
    }

    pub(crate) fn watchers(mut self, watchers: impl IntoIterator<Item = WatcherId>) -> Self {
        self.watchers.extend(watchers);
        self
    }

    pub(crate) fn key(mut self, key: &[u8]) -> Self {
        self.key = Some(key.to_vec());
        self
    }

    pub(crate) fn revision(mut self, revision: Revision) -> Self {
        self.revision = Some(revision);
        self
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(key) = &self.key {
            write!(f, " [key {}]", DisplayBytes(key))?;
        }
        if let Some(rev) = self.revision {
            write!(f, " [rev {rev}]")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// The result of [`crate::check`] or [`crate::check_watches`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Every violation found, grouped by check.
    pub violations: Vec<Violation>,
    /// Operations in the history.
    pub operations: usize,
    /// Watchers checked.
    pub watchers: usize,
    /// Writes of unknown outcome that reads or watch events showed applied (each placed at
    /// the revision where it was seen).
    pub unknown_applied: usize,
    /// Writes of unknown outcome nothing showed applied (they may or may not have been).
    pub unknown_unseen: usize,
}

impl Report {
    /// Whether no violation was found.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// Whether a violation of `kind` was found.
    pub fn has(&self, kind: ViolationKind) -> bool {
        self.violations.iter().any(|v| v.kind == kind)
    }

    /// The kinds found, sorted, without repeats.
    pub fn kinds(&self) -> Vec<ViolationKind> {
        let mut kinds: Vec<_> = self.violations.iter().map(|v| v.kind).collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }

    /// Panics with the report if a violation was found: for tests.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(self.is_ok(), "history check failed:\n{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 30;
        writeln!(
            f,
            "{} operations, {} watchers, unknown-outcome writes: {} seen applied, {} unseen; {} violations",
            self.operations,
            self.watchers,
            self.unknown_applied,
            self.unknown_unseen,
            self.violations.len()
        )?;
        for v in self.violations.iter().take(SHOWN) {
            writeln!(f, "- {v}")?;
        }
        if self.violations.len() > SHOWN {
            writeln!(f, "- … and {} more", self.violations.len() - SHOWN)?;
        }
        Ok(())
    }
}
