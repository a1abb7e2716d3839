//! `history-checker`: checks what clients saw of an etcd-compatible KV against what the store
//! promises. Tests record every client operation (invoke time, return time, response) and
//! every watch stream, then hand them here. Pure logic: no I/O, no dependencies, so it builds
//! in seconds and checks histories recorded against our coordinator and against etcd alike.
//!
//! # The model
//! etcd's: one global revision counter; every write that changes the store creates the next
//! revision; every response carries the revision of the store it reflects. A client operation
//! is a put, a linearizable get, a delete, or a compare-and-set on one key's `mod_revision`,
//! and ends in a response, a failure that proves it did not happen, or an unknown outcome (a
//! timeout: it may have happened, once, at any later time).
//!
//! # Layout
//! - [`history`]: [`History`], [`Operation`], [`Request`], [`Response`], [`Outcome`], and the
//!   thread-safe [`Recorder`] with its logical clock.
//! - [`replay`]: [`check`], the revision replay check, cheap enough for 100k operations:
//!   unique write revisions, real-time order, revisions never going back per client, every read
//!   equal to the replay of the writes up to its revision, unknown writes placed at most once,
//!   no acknowledged write lost. Watch streams are checked with it.
//! - [`watch`]: [`WatchRecord`] and [`check_watches`]: order, duplicates, gaps, atomic
//!   revisions, agreement between watchers.
//! - [`linearizability`]: a Wing–Gong/porcupine search per key for small histories, for where
//!   revisions are not available; generic over a [`linearizability::Model`].
//! - [`report`]: [`Report`], [`Violation`], [`ViolationKind`]: which operations broke which
//!   rule and why.
//! - [`generate`]: random histories valid by construction, for property tests.
//!
//! # Recording
//! ```
//! use history_checker::{check, ClientId, Options, Outcome, Recorder, Request, Response};
//!
//! let rec = Recorder::new();
//! let id = rec.invoke(ClientId(1), Request::put("k", "v1"));
//! rec.complete(id, Outcome::Ok(Response::Put { revision: 2 }));
//! let id = rec.invoke(ClientId(2), Request::get("k"));
//! rec.complete(id, Outcome::Ok(Response::found(2, "v1", 2, 1)));
//! check(&rec.into_history(), &[], &Options::default()).assert_ok();
//! ```
//!
//! # Caveats
//! - Keys must not exist before the history starts and every write to them must be recorded
//!   (use a fresh key prefix per run); values must be unique per key.
//! - Only linearizable reads may be recorded as `Get`: a serializable read may be stale.
//! - A client library that retries a write by itself can apply it twice, or report
//!   `deleted = 0` for a delete its first attempt did: record such a write as unknown unless
//!   it succeeded on its first attempt.
//! - Writes of unknown outcome that no read or watch event shows are given the benefit of the
//!   doubt (see [`replay`]): the check never blames them, and may miss a bug near them.

pub mod generate;
pub mod history;
pub mod linearizability;
pub mod replay;
pub mod report;
pub mod watch;

pub use history::{
    ClientId, History, Key, KeyValue, OpId, Operation, Outcome, Recorder, Request, Response,
    Revision, Time, Value,
};
pub use replay::{Options, check, check_history};
pub use report::{Report, Violation, ViolationKind};
pub use watch::{EventKind, KeyRange, WatchEvent, WatchRecord, WatcherId, check_watches};
