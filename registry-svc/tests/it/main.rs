//! Integration tests of `registry-svc`, in one test binary to save link time.
//!
//! - `coord`: an in-process coordinator behind a cuttable proxy, and bounded waits (shared with
//!   `coord-client`'s tests).
//! - `harness`: registry-svc in process on ephemeral ports, HTTP and gRPC helpers, test
//!   backends whose health can be switched.
//! - `run`: the library's `run` in process; `binary`: the built executable (exit codes, logs,
//!   signals, `health`).
//! - `authz`: authentication (static tokens, JWTs) and the role × operation matrix over both
//!   faces, denial logs; `auth_support`: what it shares with config-svc's (which includes it).
//! - `registration`: register, discover, TTL expiry, deregister, bad input, REST face.
//! - `health_checks`: HTTP/TCP/gRPC probes marking instances unhealthy and back, protect
//!   threshold, one prober per instance across replicas.
//! - `watch`: snapshot + ordered changes, resume, compaction.
//! - `outages`: registry and coordinator restarts, the client library re-registering.
//! - `failover`: a three-member Raft coordinator losing its leader under the registry.
//! - `tls`: TLS on the registry's ports and mTLS to the coordinator.
//! - `tls_checks`: HTTP and gRPC health checks over TLS (`--check-cacert|cert|key`): healthy
//!   with the right CA and name, unhealthy with a foreign CA, a wrong name, a plaintext
//!   instance, or no `--check-cacert`, the reason recorded.

#[path = "../../../coord-client/tests/it/harness.rs"]
mod coord;

mod auth_support;
mod authz;
mod binary;
mod failover;
mod harness;
mod health_checks;
mod outages;
mod registration;
mod run;
mod tls;
mod tls_checks;
mod watch;
