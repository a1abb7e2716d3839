//! Integration tests of `config-svc` against a real in-process coordinator, in one test binary
//! to save link time.
//!
//! - `coord`: an in-process coordinator behind a cuttable proxy, and bounded waits (shared with
//!   `coord-client`'s tests).
//! - `harness`: config-svc in process on ephemeral ports, gRPC/HTTP/watch helpers.
//! - `authz`: authentication (static tokens, JWTs) and the role × operation matrix over both
//!   faces, denial logs; `auth_support` is shared with registry-svc's tests.
//! - `run`: the library's `run` in process; `binary`: the built executable (exit codes).
//! - `publish`: publish → get, history and diff, rollback, compare-and-set, validation with
//!   positions, bad input, delete/purge, retention, the REST face.
//! - `watch`: current first then every version in order, resume from a version, prefixes and
//!   deletes, coordinator restart, REST NDJSON.
//! - `rollout`: staged rollout by label and by percentage, promote, abort; watches follow.
//! - `restart`: config-svc restart loses nothing; the client library's cache and callbacks.

#[path = "../../../coord-client/tests/it/harness.rs"]
mod coord;

#[path = "../../../registry-svc/tests/it/auth_support.rs"]
mod auth_support;

mod authz;
mod binary;
mod harness;
mod publish;
mod restart;
mod rollout;
mod run;
mod watch;
