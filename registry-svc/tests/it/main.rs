//! Integration tests of `registry-svc`, in one test binary to save link time.
//!
//! - `run`: the library's `run` in process, on an ephemeral port.
//! - `binary`: the built `registry-svc` executable: exit codes, logs, signals and the `health` subcommand.

mod binary;
mod run;
