//! `registry-model`: the parts of `registry-svc` that are pure functions of their input (the
//! records it stores and reads back, their validation, the coordinator keys it builds and
//! parses), in a crate of their own so that what only needs them (the fuzz targets in `fuzz/`,
//! whose instrumented build CI runs) does not compile the service, its gRPC and HTTP stacks and
//! its coordinator client. `registry-svc` re-exports both modules (`registry_svc::model`,
//! `registry_svc::keys`): use them from there.
//!
//! - [`model`]: instances, health check specs, service options, validation, discovery filters.
//! - [`keys`]: the key layout in the coordinator (documented there, and only there).

pub mod keys;
pub mod model;

/// A request that does not validate; the message says what is wrong. `registry-svc` turns it
/// into its `Error::InvalidArgument` (gRPC `INVALID_ARGUMENT`, HTTP 400) with the same text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Invalid {
        Invalid(message.into())
    }
}
