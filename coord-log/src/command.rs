//! The replicated command: what goes into the log and what `apply` executes.
//!
//! This is deliberately separate from the wire API (as etcd keeps `raft_internal.proto` apart from
//! `rpc.proto`): the log format must stay readable across wire-API changes, and it carries only
//! what `apply` needs to be deterministic. Every member applies the same commands in the same
//! order and reaches the same state; nothing here depends on the clock or on randomness, which is
//! why lease IDs are chosen *before* a grant is proposed.

use std::cell::Cell;

use serde::{Deserialize, Deserializer, Serialize};

/// Deepest nesting of transactions in transactions a request may have: refused above it before
/// proposing ([`crate::validate`]), so every command in the log decodes (see [`DECODE_NESTING`]).
pub const MAX_NESTING: usize = 64;

/// Deepest nesting of commands (`AsUser`) and transactions the decoder accepts: above it,
/// decoding fails instead of recursing until the stack overflows (a log record or a peer
/// message of a few kilobytes could otherwise crash a member). Leaves room above
/// [`MAX_NESTING`] for the `AsUser` wrapper.
pub const DECODE_NESTING: u32 = 2 * MAX_NESTING as u32;

thread_local! {
    /// How deep the decoder on this thread currently is (see [`nested`]).
    static DECODE_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Deserializes a nested command or transaction, counting its depth on this thread.
fn nested<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            DECODE_DEPTH.with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
    let depth = DECODE_DEPTH.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let _leave = Leave;
    if depth > DECODE_NESTING {
        return Err(serde::de::Error::custom(format!(
            "commands nested deeper than {DECODE_NESTING} levels"
        )));
    }
    T::deserialize(d)
}

/// A range of keys: `end` empty = just `key`; `end == [0]` = every key >= `key`; otherwise
/// `[key, end)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KeyRange {
    /// First key.
    pub key: Vec<u8>,
    /// End of the range (exclusive), with etcd's special values.
    pub end: Vec<u8>,
}

impl KeyRange {
    /// A range that holds just `key`.
    pub fn single(key: impl Into<Vec<u8>>) -> KeyRange {
        KeyRange {
            key: key.into(),
            end: Vec::new(),
        }
    }

    /// Whether this range names exactly one key.
    pub fn is_single(&self) -> bool {
        self.end.is_empty()
    }

    /// Whether `k` falls inside the range.
    pub fn contains(&self, k: &[u8]) -> bool {
        if self.end.is_empty() {
            return k == self.key.as_slice();
        }
        if k < self.key.as_slice() {
            return false;
        }
        self.end.as_slice() == [0] || k < self.end.as_slice()
    }

    /// Whether two ranges share at least one key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        // Normalise both to half-open intervals [lo, hi) where hi = None means unbounded.
        fn bounds(r: &KeyRange) -> (Vec<u8>, Option<Vec<u8>>) {
            if r.end.is_empty() {
                let mut hi = r.key.clone();
                hi.push(0);
                (r.key.clone(), Some(hi))
            } else if r.end.as_slice() == [0] {
                (r.key.clone(), None)
            } else {
                (r.key.clone(), Some(r.end.clone()))
            }
        }
        let (a_lo, a_hi) = bounds(self);
        let (b_lo, b_hi) = bounds(other);
        let a_before_b_ends = b_hi.as_ref().is_none_or(|h| a_lo < *h);
        let b_before_a_ends = a_hi.as_ref().is_none_or(|h| b_lo < *h);
        a_before_b_ends && b_before_a_ends
    }
}

/// Sort order of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SortOrder {
    /// No ordering asked (results come by key).
    #[default]
    None,
    /// Ascending.
    Ascend,
    /// Descending.
    Descend,
}

/// Field a range is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SortTarget {
    /// The key.
    #[default]
    Key,
    /// The key's version.
    Version,
    /// The create revision.
    Create,
    /// The mod revision.
    Mod,
    /// The value.
    Value,
}

/// A read of a range of keys, with every option etcd offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeReq {
    /// Keys to read.
    pub range: KeyRange,
    /// Maximum number of keys returned; 0 = no limit.
    pub limit: i64,
    /// Revision to read at; 0 = the current revision.
    pub revision: i64,
    /// Sort order.
    pub sort_order: SortOrder,
    /// Sort field.
    pub sort_target: SortTarget,
    /// Return keys only, no values.
    pub keys_only: bool,
    /// Return only the count.
    pub count_only: bool,
    /// Filters on mod and create revision (0 = no filter).
    pub min_mod_revision: i64,
    /// Upper bound on mod revision.
    pub max_mod_revision: i64,
    /// Lower bound on create revision.
    pub min_create_revision: i64,
    /// Upper bound on create revision.
    pub max_create_revision: i64,
}

/// A write of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PutReq {
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// Lease to attach (0 = none).
    pub lease: i64,
    /// Return the previous key-value.
    pub prev_kv: bool,
    /// Keep the current value.
    pub ignore_value: bool,
    /// Keep the current lease.
    pub ignore_lease: bool,
}

/// A delete of a range of keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeleteReq {
    /// Keys to delete.
    pub range: KeyRange,
    /// Return the deleted key-values.
    pub prev_kv: bool,
}

/// One operation inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A read.
    Range(RangeReq),
    /// A write.
    Put(PutReq),
    /// A delete.
    Delete(DeleteReq),
    /// A nested transaction.
    Txn(#[serde(deserialize_with = "nested")] TxnReq),
}

/// How a compare relates the key's field to the given value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    /// `==`
    Equal,
    /// `>`
    Greater,
    /// `<`
    Less,
    /// `!=`
    NotEqual,
}

/// What a compare looks at, and the value it compares with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The key's version.
    Version(i64),
    /// The key's create revision.
    Create(i64),
    /// The key's mod revision.
    Mod(i64),
    /// The key's value.
    Value(Vec<u8>),
    /// The key's lease.
    Lease(i64),
}

/// One guard of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// Keys compared (all of them must satisfy the compare).
    pub range: KeyRange,
    /// Relation.
    pub result: CompareResult,
    /// Field and value.
    pub target: CompareTarget,
}

/// A transaction: if every compare holds, run `success`, else `failure`; one revision in all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnReq {
    /// Guards.
    pub compare: Vec<Compare>,
    /// Ops when all guards hold.
    pub success: Vec<Op>,
    /// Ops otherwise.
    pub failure: Vec<Op>,
}

impl TxnReq {
    /// Whether no branch of this transaction (nested ones included) writes.
    pub fn is_read_only(&self) -> bool {
        self.success
            .iter()
            .chain(self.failure.iter())
            .all(|op| match op {
                Op::Range(_) => true,
                Op::Txn(t) => t.is_read_only(),
                Op::Put(_) | Op::Delete(_) => false,
            })
    }
}

/// A command in the replicated log. `apply` is the only code that executes these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Put one key.
    Put(PutReq),
    /// Delete a range of keys.
    Delete(DeleteReq),
    /// A transaction.
    Txn(TxnReq),
    /// Drop history before `revision`.
    Compact {
        /// First revision to keep.
        revision: i64,
    },
    /// Create a lease with a chosen ID.
    LeaseGrant {
        /// Lease ID (chosen by the proposer, never 0).
        id: i64,
        /// Granted TTL in seconds.
        ttl: i64,
    },
    /// Revoke (or expire) a lease: its keys are deleted in one revision.
    LeaseRevoke {
        /// Lease ID.
        id: i64,
    },
    /// No change; written at start-up so every term begins with an entry of its own.
    Noop,
    /// A member publishes the client URLs it serves (as etcd members publish their attributes).
    MemberAttrs {
        /// Member id.
        id: u64,
        /// Member name.
        name: String,
        /// Client URLs.
        client_urls: Vec<String>,
    },
    /// A change of users, roles or the auth switch (password hashes computed before proposing).
    Auth(crate::auth::AuthCmd),
    /// A command issued on behalf of an authenticated user: `apply` checks the user's
    /// permissions again at this point of the log (while auth is enabled) before running it.
    AsUser {
        /// User name.
        user: String,
        /// The command.
        #[serde(deserialize_with = "nested")]
        cmd: Box<Command>,
    },
    /// Client commands gathered by the leader into one log entry (see `raft::batch`): applied
    /// in order, each with its own revision, events and outcome, exactly as if each had been
    /// an entry of its own; a refused one changes nothing and the next goes on. Only a Raft
    /// leader proposes these; one inside another command is refused at apply.
    Batch(Vec<Command>),
}

impl Command {
    /// The command itself, without the user it was issued for.
    pub fn unwrapped(&self) -> &Command {
        match self {
            Command::AsUser { cmd, .. } => cmd.unwrapped(),
            other => other,
        }
    }

    /// The commands an entry holds: those of a [`Command::Batch`], or the command itself.
    pub fn commands(&self) -> &[Command] {
        match self {
            Command::Batch(cmds) => cmds,
            one => std::slice::from_ref(one),
        }
    }

    /// Short name for metrics and traces.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Put(_) => "put",
            Command::Delete(_) => "delete",
            Command::Txn(_) => "txn",
            Command::Compact { .. } => "compact",
            Command::LeaseGrant { .. } => "lease_grant",
            Command::LeaseRevoke { .. } => "lease_revoke",
            Command::Noop => "noop",
            Command::MemberAttrs { .. } => "member_attrs",
            Command::Auth(a) => a.kind(),
            Command::AsUser { cmd, .. } => cmd.kind(),
            Command::Batch(_) => "batch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(k: &str, e: &str) -> KeyRange {
        KeyRange {
            key: k.as_bytes().to_vec(),
            end: e.as_bytes().to_vec(),
        }
    }

    #[test]
    fn range_contains_follows_etcd_conventions() {
        assert!(r("a", "").contains(b"a"));
        assert!(!r("a", "").contains(b"ab"));
        assert!(r("a", "b").contains(b"azzz"));
        assert!(!r("a", "b").contains(b"b"));
        let from_a = KeyRange {
            key: b"a".to_vec(),
            end: vec![0],
        };
        assert!(from_a.contains(b"zzzz"));
        assert!(!from_a.contains(b"0"));
    }

    #[test]
    fn overlapping_ranges_are_detected() {
        assert!(r("a", "").overlaps(&r("a", "")));
        assert!(!r("a", "").overlaps(&r("b", "")));
        assert!(r("a", "c").overlaps(&r("b", "")));
        assert!(!r("a", "b").overlaps(&r("b", "c")));
        let all = KeyRange {
            key: vec![0],
            end: vec![0],
        };
        assert!(all.overlaps(&r("zz", "")));
    }

    /// `AsUser` wrapped `levels` times around a `Noop`, as bincode writes it (variant index
    /// u32, then the user name's u64 length).
    fn as_user_nested(levels: usize) -> Vec<u8> {
        let mut b = Vec::with_capacity(levels * 12 + 4);
        for _ in 0..levels {
            b.extend_from_slice(&9u32.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
        }
        b.extend_from_slice(&6u32.to_le_bytes());
        b
    }

    fn txn_nested(levels: usize) -> Command {
        let mut t = TxnReq::default();
        for _ in 1..levels {
            t = TxnReq {
                success: vec![Op::Txn(t)],
                ..TxnReq::default()
            };
        }
        Command::Txn(t)
    }

    #[test]
    fn a_deeply_nested_command_is_refused_by_the_decoder_not_a_stack_overflow() {
        // 1.2 MB, under the peer port's message limit: this used to recurse a million times.
        let e = bincode::deserialize::<Command>(&as_user_nested(100_000)).expect_err("refused");
        assert!(e.to_string().contains("nested deeper than"), "{e}");
        let ok: Command =
            bincode::deserialize(&as_user_nested(DECODE_NESTING as usize)).expect("at the limit");
        assert_eq!(ok.unwrapped(), &Command::Noop);
        bincode::deserialize::<Command>(&as_user_nested(DECODE_NESTING as usize + 1))
            .expect_err("one above the limit");
        // The counter is per decode: a refused one leaves none behind.
        bincode::deserialize::<Command>(&as_user_nested(DECODE_NESTING as usize))
            .expect("the depth count was reset");
    }

    #[test]
    fn nested_txns_decode_up_to_the_limit_and_validation_stops_them_below_it() {
        let deepest = txn_nested(MAX_NESTING);
        let bytes = bincode::serialize(&deepest).expect("encode");
        assert_eq!(
            bincode::deserialize::<Command>(&bytes).expect("decode"),
            deepest
        );
        crate::validate::validate(&deepest, 128).expect("MAX_NESTING levels are accepted");
        let e = crate::validate::validate(&txn_nested(MAX_NESTING + 1), 128).expect_err("refused");
        assert!(e.to_string().contains("nested too deeply"), "{e}");
        // The decoder counts the nested ones: the outermost txn is the command itself.
        let at_limit =
            bincode::serialize(&txn_nested(DECODE_NESTING as usize + 1)).expect("encode");
        bincode::deserialize::<Command>(&at_limit).expect("at the decoder's limit");
        let too_deep =
            bincode::serialize(&txn_nested(DECODE_NESTING as usize + 2)).expect("encode");
        bincode::deserialize::<Command>(&too_deep).expect_err("refused by the decoder");
    }
}
