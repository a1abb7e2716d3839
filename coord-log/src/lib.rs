//! `coord-log`: the coordinator's log format, the parts of `coordinator` that are pure functions
//! of a log record or a peer message, in a crate of their own so that what only needs them (the
//! fuzz targets in `fuzz/`, whose instrumented build CI runs) does not compile the server, its
//! gRPC stack, sled and the rest. `coordinator` re-exports every item under its old path
//! (`coordinator::command`, `coordinator::auth::AuthCmd`, `coordinator::wal::scan_records`,
//! `coordinator::raft::TypeConfig`, `coordinator::state::OutcomeWire`, ...): use them from there.
//!
//! - [`command`]: the replicated command, what goes into the log and what `apply` executes
//!   (bincode), with its bounded-depth decoding.
//! - [`auth`]: the auth changes a command can carry.
//! - [`validate`]: the checks run on a command before proposing it.
//! - [`record`]: the framing of a record in the WAL and the Raft log (length, CRC, index, term).
//! - [`raft`]: openraft's type configuration (a Raft entry, a member, an entry's outcome).

pub mod auth;
pub mod command;
pub mod raft;
pub mod record;
pub mod validate;
