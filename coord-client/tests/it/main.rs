//! Integration tests of `coord-client` against an in-process coordinator.
//!
//! - `harness`: start, stop and restart a coordinator on a fixed data dir and port; bounded waits.
//! - `kv`: reads, writes, transactions, failover between endpoints.
//! - `lease`: grants, keep-alive, re-grant after expiry.
//! - `watch`: ordering, resume across a coordinator restart, compaction.

mod harness;
mod kv;
mod lease;
mod watch;
