//! Integration tests of `demo-svc`, in one test binary: a coordinator, registry-svc and
//! config-svc in process (real ones), then the demo service's `run` in process.
//!
//! - `coord`: the in-process coordinator shared with `coord-client`'s tests, and bounded waits.
//! - `service`: registration with a health check, HTTP and gRPC answers, settings pushed by
//!   config-svc (and a bad version refused), deregistration on shutdown, bad configuration.

#[path = "../../../coord-client/tests/it/harness.rs"]
mod coord;

mod service;
