//! `lb-gateway`: the load-balancing gateway of the platform.
//!
//! **Placeholder.** Until its issue lands, this service does nothing but
//! serve the admin endpoints every process has: `/healthz`, `/readyz` (ready
//! once the admin listener is bound) and `/metrics`. It exists now so that
//! deployment, health checks and dashboards can be wired up ahead of the real
//! work, and so that its shape — a library with `run(config, shutdown)` and a
//! thin `main.rs` — is already fixed.
//!
//! # Layout
//!
//! - [`Config`]: command-line flags, each with an environment variable.
//! - [`run`]: binds the admin address and serves until the shutdown token
//!   is cancelled; [`run_with_listener`] does the same on a listener the
//!   caller bound (tests bind `127.0.0.1:0`).
//! - `main.rs`: parses the config (exit 64 if invalid), initialises
//!   telemetry, logs the effective config and runs until SIGTERM or SIGINT.
//!   `lb-gateway health` probes the admin `/healthz` and exits 0 or 1, for container
//!   health checks.
//!
//! Everything shared with the other services (telemetry, signals, the admin
//! server, parsers) lives in `service-kit`.

pub mod hash;

use std::net::SocketAddr;

use anyhow::Context as _;
use service_kit::admin::{self, Health, Metrics};
use service_kit::config::parse_listen_url;
use service_kit::telemetry::LogFormat;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The name this service reports in logs, traces and `--version`.
pub const SERVICE_NAME: &str = "lb-gateway";

/// The service's configuration, from flags or environment variables.
#[derive(Debug, Clone, clap::Parser)]
pub struct Config {
    /// Address of the admin HTTP server (health, readiness, metrics), as
    /// `host:port` or `http://host:port`.
    #[arg(
        long,
        env = "LB_GATEWAY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9103",
        value_name = "ADDR",
        value_parser = parse_listen_url
    )]
    pub admin_listen: SocketAddr,

    /// Format of the log lines written to stdout.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Binds `config.admin_listen` and serves until `shutdown` is cancelled.
///
/// Fails if the address cannot be bound or the server fails; returns
/// `Ok(())` after a clean shutdown.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on the admin address {}", config.admin_listen))?;
    run_with_listener(config, listener, shutdown).await
}

/// Like [`run`], but serves the admin endpoints on `admin_listener`, which
/// the caller has bound, instead of binding `config.admin_listen`.
pub async fn run_with_listener(
    config: Config,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Destructured so that a new field does not compile until it is used.
    let Config {
        admin_listen: _,
        log_format: _,
    } = config;

    let addr = admin_listener
        .local_addr()
        .context("cannot read the admin listener's address")?;
    let health = Health::new();
    let metrics = Metrics::new();
    // A placeholder has nothing to wait for: ready as soon as it listens.
    health.set_ready(true);
    tracing::info!(admin = %addr, "admin server listening");

    admin::serve(admin_listener, admin::router(health, metrics), shutdown)
        .await
        .context("admin server failed")?;
    tracing::info!("stopped");
    Ok(())
}
