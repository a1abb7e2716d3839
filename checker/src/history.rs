//! What a test records: every client operation with its invoke and return times and what the
//! client was told.
//!
//! A history is built either by hand ([`History::record`], with explicit times) or while a test
//! runs, through a shared [`Recorder`] whose logical clock orders invokes and returns as they
//! really happened, deterministically (so a simulation seed replays to the same history).

use std::fmt;
use std::sync::Mutex;

/// A store revision, as in etcd's `header.revision` and `mod_revision`. The empty store is at
/// revision 1; every write that changes something makes the next one.
pub type Revision = i64;
/// A key, as bytes.
pub type Key = Vec<u8>;
/// A value, as bytes.
pub type Value = Vec<u8>;
/// A point in time: monotonic nanoseconds or ticks of a logical clock. Only the order matters:
/// operation A precedes B in real time when `A.complete < B.invoke` (equal times are concurrent).
pub type Time = u64;

/// Who issued an operation. A client is expected to wait for one operation before the next
/// (a session); the "revision never goes back" check is per client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

/// An operation's index in [`History::ops`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub usize);

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// `Put key=value`.
    Put { key: Key, value: Value },
    /// A linearizable single-key `Range` (not a serializable one: those may be stale).
    Get { key: Key },
    /// `DeleteRange` of a single key.
    Delete { key: Key },
    /// `Txn { compare: [mod_revision(key) == expected_mod_revision], success: [put key=value] }`.
    /// An `expected_mod_revision` of 0 means "the key does not exist".
    Cas {
        key: Key,
        expected_mod_revision: Revision,
        value: Value,
    },
}

impl Request {
    /// `Put key=value`.
    pub fn put(key: impl Into<Key>, value: impl Into<Value>) -> Self {
        Request::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    /// `Get key`.
    pub fn get(key: impl Into<Key>) -> Self {
        Request::Get { key: key.into() }
    }

    /// `Delete key`.
    pub fn delete(key: impl Into<Key>) -> Self {
        Request::Delete { key: key.into() }
    }

    /// `if mod_revision(key) == expected_mod_revision then put key=value`.
    pub fn cas(
        key: impl Into<Key>,
        expected_mod_revision: Revision,
        value: impl Into<Value>,
    ) -> Self {
        Request::Cas {
            key: key.into(),
            expected_mod_revision,
            value: value.into(),
        }
    }

    /// The one key the request touches.
    pub fn key(&self) -> &Key {
        match self {
            Request::Put { key, .. }
            | Request::Get { key }
            | Request::Delete { key }
            | Request::Cas { key, .. } => key,
        }
    }

    /// Whether the request may change the store.
    pub fn is_write(&self) -> bool {
        !matches!(self, Request::Get { .. })
    }
}

/// A key's state as a `Get` returned it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyValue {
    /// The value.
    pub value: Value,
    /// The revision of the write that produced this value.
    pub mod_revision: Revision,
    /// Puts since the key was (re)created: 1 after the creating put.
    pub version: i64,
}

/// A successful response. Every variant carries the header revision: the store revision the
/// response reflects (for a write that changed something, the revision it created).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Response {
    /// The put was applied at `revision`.
    Put { revision: Revision },
    /// The key's state at `revision`; `None` if absent.
    Get {
        revision: Revision,
        kv: Option<KeyValue>,
    },
    /// `deleted` keys (0 or 1) were removed; with 1, `revision` is the delete's own revision,
    /// with 0 nothing changed and `revision` is the store revision at that moment.
    Delete { revision: Revision, deleted: i64 },
    /// The compare held and the put was applied at `revision` (`succeeded`), or it did not and
    /// nothing changed (`revision` is then the store revision at that moment).
    Cas { revision: Revision, succeeded: bool },
}

impl Response {
    /// A `Get` that found `value`.
    pub fn found(
        revision: Revision,
        value: impl Into<Value>,
        mod_revision: Revision,
        version: i64,
    ) -> Self {
        Response::Get {
            revision,
            kv: Some(KeyValue {
                value: value.into(),
                mod_revision,
                version,
            }),
        }
    }

    /// A `Get` that found nothing.
    pub fn absent(revision: Revision) -> Self {
        Response::Get { revision, kv: None }
    }

    /// The header revision.
    pub fn revision(&self) -> Revision {
        match self {
            Response::Put { revision }
            | Response::Get { revision, .. }
            | Response::Delete { revision, .. }
            | Response::Cas { revision, .. } => *revision,
        }
    }

    /// Whether this response reports a change of the store (a new revision).
    pub fn is_mutation(&self) -> bool {
        match self {
            Response::Put { .. } => true,
            Response::Get { .. } => false,
            Response::Delete { deleted, .. } => *deleted > 0,
            Response::Cas { succeeded, .. } => *succeeded,
        }
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The client got this response.
    Ok(Response),
    /// The operation certainly did not take effect (refused before it reached the log:
    /// connection refused, `etcdserver: no leader` before proposing, invalid request).
    Failed,
    /// The client does not know (timeout, connection lost mid-request, or never completed):
    /// the write may have taken effect, once, at any time after its invoke, even after the
    /// client gave up. Reads with this outcome are ignored.
    Unknown,
}

/// One recorded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// Who issued it.
    pub client: ClientId,
    /// What was asked.
    pub request: Request,
    /// When the request was sent (at or before the real send).
    pub invoke: Time,
    /// When the response arrived (at or after the real arrival). Ignored for
    /// [`Outcome::Unknown`]: such an operation may take effect arbitrarily late.
    pub complete: Time,
    /// What the client was told.
    pub outcome: Outcome,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "c{} {} -> ",
            self.client.0,
            DisplayRequest(&self.request)
        )?;
        match &self.outcome {
            Outcome::Ok(resp) => write!(f, "{}", DisplayResponse(resp))?,
            Outcome::Failed => f.write_str("failed")?,
            Outcome::Unknown => f.write_str("unknown")?,
        }
        if self.outcome == Outcome::Unknown {
            write!(f, " [t {}..]", self.invoke)
        } else {
            write!(f, " [t {}..{}]", self.invoke, self.complete)
        }
    }
}

/// Every operation of a run, in any order (checks sort by time themselves).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The operations; an [`OpId`] is an index into this.
    pub ops: Vec<Operation>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an operation.
    pub fn push(&mut self, op: Operation) -> OpId {
        self.ops.push(op);
        OpId(self.ops.len() - 1)
    }

    /// Appends an operation from its parts.
    pub fn record(
        &mut self,
        client: u64,
        request: Request,
        invoke: Time,
        complete: Time,
        outcome: Outcome,
    ) -> OpId {
        self.push(Operation {
            client: ClientId(client),
            request,
            invoke,
            complete,
            outcome,
        })
    }

    /// The operation `id`.
    ///
    /// # Panics
    /// If `id` is not from this history.
    pub fn op(&self, id: OpId) -> &Operation {
        &self.ops[id.0]
    }

    /// `#12 c3 put "k"="v" -> ok rev 17 [t 100..140]`, for messages.
    pub fn describe(&self, id: OpId) -> String {
        match self.ops.get(id.0) {
            Some(op) => format!("#{} {}", id.0, op),
            None => format!("#{} (not in history)", id.0),
        }
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Records a history while clients run, from any thread or task.
///
/// Times come from a logical clock that ticks once per invoke and once per return, under one
/// lock: call [`Recorder::invoke`] right before sending and [`Recorder::complete`] right after
/// the response (or error) arrived, and real-time order is preserved (an operation that really
/// returned before another was sent gets an earlier return tick than the other's invoke tick).
/// An operation never completed stays [`Outcome::Unknown`].
#[derive(Debug, Default)]
pub struct Recorder {
    inner: Mutex<RecorderInner>,
}

#[derive(Debug, Default)]
struct RecorderInner {
    clock: Time,
    history: History,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderInner> {
        // A panic elsewhere while holding the lock leaves the history intact: keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `client` is about to send `request`.
    pub fn invoke(&self, client: ClientId, request: Request) -> OpId {
        let mut inner = self.lock();
        inner.clock += 1;
        let invoke = inner.clock;
        inner.history.push(Operation {
            client,
            request,
            invoke,
            complete: Time::MAX,
            outcome: Outcome::Unknown,
        })
    }

    /// Records how operation `id` ended.
    pub fn complete(&self, id: OpId, outcome: Outcome) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if let Some(op) = inner.history.ops.get_mut(id.0) {
            op.complete = now;
            op.outcome = outcome;
        }
    }

    /// A copy of the history so far (operations not completed yet are unknown).
    pub fn snapshot(&self) -> History {
        self.lock().history.clone()
    }

    /// The history recorded.
    pub fn into_history(self) -> History {
        self.inner
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .history
    }
}

/// Shows bytes as a quoted string when they are printable UTF-8, else as hex; cut at 40 bytes.
pub(crate) struct DisplayBytes<'a>(pub &'a [u8]);

impl fmt::Display for DisplayBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 40;
        let shown = &self.0[..self.0.len().min(MAX)];
        let more = if self.0.len() > MAX { "…" } else { "" };
        match std::str::from_utf8(shown) {
            Ok(s) if s.chars().all(|c| !c.is_control()) => write!(f, "{s:?}{more}"),
            _ => {
                f.write_str("0x")?;
                for b in shown {
                    write!(f, "{b:02x}")?;
                }
                f.write_str(more)
            }
        }
    }
}

pub(crate) struct DisplayRequest<'a>(pub &'a Request);

impl fmt::Display for DisplayRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Request::Put { key, value } => {
                write!(f, "put {}={}", DisplayBytes(key), DisplayBytes(value))
            }
            Request::Get { key } => write!(f, "get {}", DisplayBytes(key)),
            Request::Delete { key } => write!(f, "delete {}", DisplayBytes(key)),
            Request::Cas {
                key,
                expected_mod_revision,
                value,
            } => write!(
                f,
                "cas {} if mod_revision=={} then ={}",
                DisplayBytes(key),
                expected_mod_revision,
                DisplayBytes(value)
            ),
        }
    }
}

pub(crate) struct DisplayResponse<'a>(pub &'a Response);

impl fmt::Display for DisplayResponse<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Response::Put { revision } => write!(f, "ok rev {revision}"),
            Response::Get { revision, kv: None } => write!(f, "ok rev {revision} absent"),
            Response::Get {
                revision,
                kv: Some(kv),
            } => write!(
                f,
                "ok rev {revision} {} (mod_revision {}, version {})",
                DisplayBytes(&kv.value),
                kv.mod_revision,
                kv.version
            ),
            Response::Delete { revision, deleted } => {
                write!(f, "ok rev {revision} deleted {deleted}")
            }
            Response::Cas {
                revision,
                succeeded,
            } => write!(
                f,
                "ok rev {revision} {}",
                if *succeeded {
                    "succeeded"
                } else {
                    "compare failed"
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_ticks_once_per_invoke_and_return() {
        let rec = Recorder::new();
        let a = rec.invoke(ClientId(1), Request::put("k", "v"));
        let b = rec.invoke(ClientId(2), Request::get("k"));
        rec.complete(a, Outcome::Ok(Response::Put { revision: 2 }));
        let h = rec.into_history();
        assert_eq!((h.op(a).invoke, h.op(a).complete), (1, 3));
        assert_eq!(h.op(b).invoke, 2);
        assert_eq!(h.op(b).outcome, Outcome::Unknown);
    }

    #[test]
    fn describe_shows_printable_and_binary_bytes() {
        let mut h = History::new();
        let id = h.record(
            3,
            Request::put(b"k".to_vec(), vec![0u8, 1]),
            5,
            9,
            Outcome::Ok(Response::Put { revision: 4 }),
        );
        assert_eq!(
            h.describe(id),
            "#0 c3 put \"k\"=0x0001 -> ok rev 4 [t 5..9]"
        );
    }
}
