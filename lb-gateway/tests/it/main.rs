//! Integration tests of `lb-gateway`, in one test binary to save link time.
//!
//! - `run`: the library's `run` in process, on an ephemeral port.
//! - `binary`: the built `lb-gateway` executable: exit codes.

mod binary;
mod run;
