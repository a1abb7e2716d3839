//! Integration tests of `config-svc`, in one test binary to save link time.
//!
//! - `run`: the library's `run` in process, on an ephemeral port.
//! - `binary`: the built `config-svc` executable: exit codes.

mod binary;
mod run;
