//! `config-formats`: the parts of `config-svc` that are pure functions of an item's content (its
//! format, the parsers of json, yaml, toml, properties and text, JSON Schema validation), in a
//! crate of their own so that what only needs them (the fuzz targets in `fuzz/`, whose
//! instrumented build CI runs) does not compile the service, its gRPC and HTTP stacks and its
//! coordinator client. `config-svc` re-exports them (`config_svc::model::Format`,
//! `config_svc::validate`): use them from there.
//!
//! - [`Format`]: the formats and their names.
//! - [`validate`]: parsing (a failure names the line and column) and schema checks (a violation
//!   names the JSON pointer).

pub mod format;
pub mod validate;

pub use format::Format;

use validate::Problem;

/// What parsing a format name, compiling a schema or validating content can fail with;
/// `config-svc` turns each into its `Error` variant of the same name and text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed (an unknown format, a schema that is not one); the message says
    /// what is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// The content does not parse in its format or violates the item's schema.
    #[error("{message}")]
    Invalid {
        /// A summary naming the first problem and its position.
        message: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An `InvalidArgument` error.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidArgument(message.into())
    }
}
