//! Integration tests of `platformctl`: the real binary against the services in process.
//!
//! - `coord`: bounded waits (`within`, `wait_until`), coord-client's.
//! - `harness`: the stack in process (coordinator, registry-svc, config-svc, lb-gateway) and
//!   runners of the binary (to the end, or streaming line by line).
//! - `registry`: services, instances, register, deregister, watch.
//! - `config`: put, get, history, diff, rollback, list, watch, rollout.
//! - `ring`: where a key goes, the ring, the routes.
//! - `cluster`: cluster status.
//! - `errors`: unreachable services, bad usage, completions.
//! - `tls`: `--cacert`, `--cert`, `--key`, `--token-file` against services requiring them.
//! - `disaster_drill`: registrations and config versions through snapshot save, the loss of
//!   every member, and a restore into a fresh three-member cluster.

/// Bounded waits, shared with coord-client's tests.
#[path = "../../../coord-client/tests/it/harness.rs"]
mod coord;

mod cluster;
mod config;
mod disaster_drill;
mod errors;
mod harness;
mod registry;
mod ring;
mod tls;
