//! Integration tests of `lb-gateway`, in one test binary to save link time.
//!
//! - `coord`: an in-process coordinator (shared with `coord-client`'s tests) and bounded waits.
//! - `harness`: registry-svc in process, small HTTP and gRPC backends registered in it, the
//!   gateway in process, clients.
//! - `run`: the library's `run` in process; `binary`: the built executable (exit codes, a bad
//!   routes file).
//! - `routing`: stickiness, membership changes, ejection, draining, registry outage, rewrite,
//!   traceparent, bounded loads, refusals.
//! - `grpc`: unary and streaming calls, status and trailers.
//! - `limits`: rate limiting (429), load shedding (503), timeouts (504), circuit breakers,
//!   WebSocket tunnels.
//! - `identity`: with auth on in registry-svc, the gateway discovers with its own read-only
//!   token and forwards the caller's `Authorization`, never its own.
//! - `conn_limits`: the listener's limits (header read timeout, header size, connections).
//! - `fast_path`: the listener's own HTTP/1.1 path (pipelining, split heads, 431, chunked,
//!   HEAD, 204/304, HTTP/1.0) and its hand-over to hyper.
//! - `overrides`: routes replaced by versions of a config-svc item (a bad one rejected).
//! - `backend_tls`: routes with `backend.tls`: HTTP/1.1 and gRPC backends over TLS with the
//!   gateway's client certificate, refused certificates (502, nothing sent), the start refused
//!   without `--backend-cacert`.
//! - `dashboard`: the web dashboard's JSON API and its errors, and the page in headless
//!   Chromium (`browser`: chromedriver as a child process, WebDriver over HTTP).

#[path = "../../../coord-client/tests/it/harness.rs"]
mod coord;

mod backend_tls;
mod binary;
mod browser;
mod conn_limits;
mod dashboard;
mod fast_path;
mod grpc;
mod harness;
mod identity;
mod limits;
mod overrides;
mod routing;
mod run;
mod tls;
