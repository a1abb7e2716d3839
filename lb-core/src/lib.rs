//! `lb-core`: the parts of `lb-gateway` that are pure functions of their input, in a crate of
//! their own so that what only needs them (the fuzz targets in `fuzz/`, whose instrumented build
//! CI runs) does not compile the proxy, its HTTP stack and its registry and config clients.
//! `lb-gateway` re-exports both modules (`lb_gateway::hash`, `lb_gateway::routes`): use them
//! from there.
//!
//! - [`hash`]: the pure core. [`hash::ring`] (ketama-like, weighted virtual nodes),
//!   [`hash::maglev`] (weighted Maglev), [`hash::select`] (bounded loads, power of two
//!   choices). No I/O; property-tested.
//! - [`routes`]: the routes file (model, checks, matching, hash keys, rewrites).

pub mod hash;
pub mod routes;
