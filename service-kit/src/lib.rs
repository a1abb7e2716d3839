//! What every service of the platform does the same way.
//!
//! The coordinator and the three services (`registry-svc`, `config-svc`,
//! `lb-gateway`) start, log, expose health and metrics, parse their
//! configuration and stop in one way, and that way lives here so that it is
//! written — and fixed — once. The crate holds no business logic and knows
//! nothing about the coordinator's protocol.
//!
//! # Layout
//!
//! - [`authn`]: who is calling (static bearer tokens, JWTs, TLS client certificates) and
//!   whether a policy of roles and per-namespace permissions (read < write < admin) lets them;
//!   registry-svc and config-svc check it at the top of their operations.
//! - [`telemetry`]: installs the global `tracing` subscriber (text or JSON
//!   logs filtered by `RUST_LOG`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//!   set, an OpenTelemetry OTLP/gRPC span exporter. [`telemetry::init`]
//!   returns a guard that flushes spans when dropped.
//! - [`shutdown`]: a future that resolves on SIGTERM or SIGINT, and a
//!   [`CancellationToken`](tokio_util::sync::CancellationToken) cancelled by
//!   it, which a service passes to its `run(config, shutdown)`.
//! - [`admin`]: the admin HTTP server every process exposes: `/healthz`
//!   (liveness), `/readyz` (readiness, driven by a [`admin::Health`] flag),
//!   `/metrics` (OpenMetrics text from a shared [`admin::Metrics`] registry),
//!   JSON errors for everything else, and graceful shutdown.
//! - [`config`]: the exit code and message for bad configuration (64, like
//!   `EX_USAGE`), command-line parsing that honours it, and parsers for
//!   durations (`"500ms"`) and listen addresses (`"http://127.0.0.1:2379"`).
//! - [`probe`]: a blocking, dependency-free HTTP/1.0 health probe, for the
//!   `health` subcommand that container health checks run in images without
//!   `curl`.
//! - [`process`]: the serving half of a service's `main` (runtime, telemetry, startup line,
//!   run until a signal, exit code), written once for every service binary.
//! - [`time`]: wall-clock times as UTC text (RFC 3339), for file names and
//!   tools.
//! - [`tls`]: TLS (rustls, ring) for every listener and internal client: the etcd-style
//!   file flags, reloading certificates (file change or SIGHUP), concurrent handshakes for
//!   tonic and axum servers, TLS channels for tonic clients, certificate names.
//! - [`devcerts`]: a development CA (rcgen) issuing a certificate per service; the
//!   `devcerts` binary writes them for the compose stack.
//!
//! # Guarantees and caveats
//!
//! - [`telemetry::init`] never panics and may be called more than once: only
//!   the first call installs a subscriber, later calls return an inert guard.
//!   When OTLP export is enabled it must run inside a Tokio runtime (the gRPC
//!   channel is created there), but it connects lazily, so no collector needs
//!   to be reachable at startup; spans are dropped while none is.
//! - [`shutdown::signal`] and [`shutdown::token_on_signal`] must be called
//!   inside a Tokio runtime; they install their signal handlers before
//!   returning, so a signal that arrives afterwards is never lost.
//! - [`admin::serve`] waits for in-flight requests after shutdown is
//!   requested, but at most [`admin::SHUTDOWN_GRACE`].
//! - `/healthz` answers 200 for as long as the process can answer at all; it
//!   says nothing about dependencies. Readiness is whatever the service sets.
//!
//! # Features
//! - `runtime` (default): everything above. Without it, only the pure parsers of [`config`]
//!   are built, with no dependency: `lb-core` uses them for the routes file, and so the fuzz
//!   targets do not compile the telemetry, TLS and HTTP stacks.

#[cfg(feature = "runtime")]
pub mod admin;
#[cfg(feature = "runtime")]
pub mod authn;
pub mod config;
#[cfg(feature = "runtime")]
pub mod devcerts;
#[cfg(feature = "runtime")]
pub mod probe;
#[cfg(feature = "runtime")]
pub mod process;
pub mod procstat;
#[cfg(feature = "runtime")]
pub mod shutdown;
#[cfg(feature = "runtime")]
pub mod telemetry;
#[cfg(feature = "runtime")]
pub mod testing;
#[cfg(feature = "runtime")]
pub mod time;
#[cfg(feature = "runtime")]
pub mod tls;
