//! `config-svc`: the configuration service of the platform.
//!
//! Applications read their configuration here and are told the moment it changes, as they
//! would with Nacos config, Spring Cloud Config or ZooKeeper-backed configuration. An *item*
//! (namespace / group / key, in json, yaml, toml, properties or text) has immutable numbered
//! *versions*; publishing creates one and moves the item's *current* pointer to it. History,
//! diff, rollback, validation (format and JSON Schema), watches and staged rollouts sit on
//! top. The service keeps no state of its own: everything lives in the coordinator (through
//! `coord-client`), so any number of replicas can run side by side and restarting one loses
//! nothing.
//!
//! # Layout
//! - [`model`]: items, versions, pointers, rollouts; which version a client gets
//!   (label selectors, stable percentage hashing), released versions, retention. Pure.
//! - [`validate`] (from `config-formats`): parsing each format with line/column errors, JSON
//!   Schema. Pure.
//! - [`diff`]: line diff and key-path diff. Pure.
//! - [`keys`]: the key layout in the coordinator (documented there, and only there).
//! - [`store`]: the operations (publish, get, list, history, diff, rollback, delete, purge,
//!   options, promote, abort, validate), each change one guarded coordinator Txn.
//! - [`watch`]: one coordinator watch per process fanned out to every client watch, with
//!   per-client catch-up (resume, slow readers).
//! - [`grpc`]: the `config.v1.Config` gRPC face; [`rest`]: the same over REST/JSON
//!   (`/openapi.json` documents it). [`error`]: the one error type, mapped to gRPC status and
//!   HTTP JSON in one place.
//! - [`client`]: the library applications use: fetch, a local cache of the last good version
//!   served while the service is unreachable, change callbacks.
//! - [`metrics`]: publishes, reads, watchers, push latency.
//! - `main.rs`: the binary; `src/bin/bench.rs`: the load generator.
//!
//! # Serving
//! Three listeners: gRPC (`config.v1.Config` and `grpc.health.v1.Health`), REST, and the
//! admin server (`/healthz`, `/readyz`, `/metrics`). The process starts serving even while the
//! coordinator is unreachable; it becomes ready (`/readyz` 200, gRPC health `SERVING`) once its
//! coordinator watch is established.
//!
//! # Authentication
//! Off by default (everyone may do everything). With `--auth-mode token|jwt|mtls` every gRPC
//! call and REST route (but `/openapi.json` and `grpc.health.v1`) needs credentials, and each
//! operation a permission in its namespace from `--auth-policy-file`: see
//! `service_kit::authn` for the flags and the policy format, [`store`] for what each operation
//! needs.
//!
//! # Caveats
//! - Readiness is not withdrawn when the coordinator becomes unreachable later; calls then
//!   answer `UNAVAILABLE` / 503, and watches stay open and catch up when it is back.
//! - The push-latency metric compares this replica's clock with the writer's (another replica
//!   may have written the change).

pub mod client;
pub mod diff;
pub mod error;
pub mod grpc;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod rest;
pub mod store;
// Parsing and validation are pure and live in `config-formats`, so the fuzz targets can build
// them without the service; re-exported here under the old path.
pub use config_formats::validate;
pub mod watch;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use coord_client::{Client, ClientConfig};
use service_kit::admin::{self, Health, Metrics};
use service_kit::authn::{Auth, AuthArgs};
use service_kit::config::parse_listen_url;
use service_kit::telemetry::LogFormat;
use service_kit::tls::{ClientTlsArgs, ServerTlsArgs};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::grpc::GrpcService;
use crate::metrics::ConfigMetrics;
use crate::store::{Limits, Store};
use crate::watch::Hub;

/// The name this service reports in logs, traces and `--version`.
pub const SERVICE_NAME: &str = "config-svc";

/// How long the servers get to finish after shutdown before they are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The service's configuration, from flags or environment variables.
#[derive(Debug, Clone, clap::Parser)]
pub struct Config {
    /// Address of the admin HTTP server (health, readiness, metrics), as
    /// `host:port` or `http://host:port`.
    #[arg(
        long,
        env = "CONFIG_ADMIN_LISTEN",
        default_value = "127.0.0.1:9102",
        value_name = "ADDR",
        value_parser = parse_listen_url
    )]
    pub admin_listen: SocketAddr,

    /// Address of the gRPC server (`config.v1.Config`, `grpc.health.v1.Health`).
    #[arg(
        long,
        env = "CONFIG_GRPC_LISTEN",
        default_value = "127.0.0.1:9300",
        value_name = "ADDR",
        value_parser = parse_listen_url
    )]
    pub grpc_listen: SocketAddr,

    /// Address of the REST/JSON server.
    #[arg(
        long,
        env = "CONFIG_HTTP_LISTEN",
        default_value = "127.0.0.1:9301",
        value_name = "ADDR",
        value_parser = parse_listen_url
    )]
    pub http_listen: SocketAddr,

    /// Coordinator endpoints, comma-separated (`http://host:port`).
    #[arg(
        long,
        env = "CONFIG_COORDINATOR_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub coordinator_endpoints: Vec<String>,

    /// Largest content accepted, in bytes (1 KiB to 1 MiB; the coordinator's default request
    /// limit is 1.5 MiB).
    #[arg(
        long,
        env = "CONFIG_MAX_CONTENT_BYTES",
        default_value_t = 1024 * 1024,
        value_name = "BYTES"
    )]
    pub max_content_bytes: usize,

    /// Versions kept per item unless the item sets its own retention (1 to 10000).
    #[arg(
        long,
        env = "CONFIG_DEFAULT_RETENTION",
        default_value_t = 100,
        value_name = "N"
    )]
    pub default_retention: u32,

    /// How many revisions a watcher may fall behind (its client reading slowly) before it
    /// re-reads its items from the coordinator (16 to 1048576).
    #[arg(
        long,
        env = "CONFIG_WATCH_BUFFER",
        default_value_t = watch::DEFAULT_WATCH_BUFFER,
        value_name = "REVISIONS"
    )]
    pub watch_buffer: usize,

    /// Format of the log lines written to stdout.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Authentication and authorisation (`--auth-mode`, `--auth-policy-file`, …; off by
    /// default). See `service_kit::authn` and the permission table in [`store`].
    #[command(flatten)]
    pub auth: AuthArgs,

    /// TLS of the gRPC and REST listeners (`--cert-file`, `--key-file`, `--trusted-ca-file`,
    /// `--client-cert-auth`); the admin listener stays plain HTTP.
    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// TLS of the coordinator client (`--coordinator-cacert`, `--coordinator-cert`,
    /// `--coordinator-key`).
    #[command(flatten)]
    pub coordinator_tls: ClientTlsArgs,
}

impl Config {
    /// Checks what the parsers cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self
            .coordinator_endpoints
            .iter()
            .all(|e| e.trim().is_empty())
        {
            return Err("--coordinator-endpoints is empty".into());
        }
        if !(1024..=1024 * 1024).contains(&self.max_content_bytes) {
            return Err(format!(
                "--max-content-bytes {} is out of range: expected 1024 to 1048576",
                self.max_content_bytes
            ));
        }
        if !(1..=model::MAX_RETENTION).contains(&self.default_retention) {
            return Err(format!(
                "--default-retention {} is out of range: expected 1 to {}",
                self.default_retention,
                model::MAX_RETENTION
            ));
        }
        self.auth.validate()?;
        if !(16..=1 << 20).contains(&self.watch_buffer) {
            return Err(format!(
                "--watch-buffer {} is out of range: expected 16 to 1048576",
                self.watch_buffer
            ));
        }
        self.tls.files().validate("")?;
        self.coordinator_tls.files().validate("--coordinator-")?;
        Ok(())
    }
}

/// The listeners the service serves on, bound by the caller.
pub struct Listeners {
    /// Admin HTTP (health, readiness, metrics).
    pub admin: TcpListener,
    /// gRPC.
    pub grpc: TcpListener,
    /// REST.
    pub http: TcpListener,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on the {what} address {addr}"))
}

/// Binds every address of `config` and serves until `shutdown` is cancelled.
///
/// Fails if an address cannot be bound or a server fails; returns `Ok(())` after a clean
/// shutdown.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let admin = bind(config.admin_listen, "admin").await?;
    run_with_listener(config, admin, shutdown).await
}

/// Like [`run`], but serves the admin endpoints on `admin_listener`, which the caller has
/// bound, instead of binding `config.admin_listen`.
pub async fn run_with_listener(
    config: Config,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let grpc = bind(config.grpc_listen, "gRPC").await?;
    let http = bind(config.http_listen, "REST").await?;
    run_with_listeners(
        config,
        Listeners {
            admin: admin_listener,
            grpc,
            http,
        },
        shutdown,
    )
    .await
}

/// Like [`run`], on listeners the caller bound (tests bind `127.0.0.1:0`).
pub async fn run_with_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().map_err(|e| anyhow::anyhow!(e))?;
    // Destructured so that a new field does not compile until it is used.
    let Config {
        admin_listen: _,
        grpc_listen: _,
        http_listen: _,
        coordinator_endpoints,
        max_content_bytes,
        default_retention,
        watch_buffer,
        log_format: _,
        auth,
        tls,
        coordinator_tls,
    } = config;
    let auth = Auth::from_args(&auth).map_err(|e| anyhow::anyhow!(e))?;
    // Certificates are read now, so that a bad file fails the start with a clear message.
    let server_tls = tls.files().server_config().context(
        "TLS of the gRPC and REST listeners (--cert-file, --key-file, --trusted-ca-file)",
    )?;
    let client_tls = coordinator_tls.client_config().context(
        "TLS of the coordinator client (--coordinator-cacert, --coordinator-cert, --coordinator-key)",
    )?;
    if server_tls.is_some() || client_tls.is_some() {
        service_kit::tls::reload_on_sighup();
    }
    let addr = |l: &TcpListener, what: &str| {
        l.local_addr()
            .with_context(|| format!("cannot read the {what} listener's address"))
    };
    let (admin_addr, grpc_addr, http_addr) = (
        addr(&listeners.admin, "admin")?,
        addr(&listeners.grpc, "gRPC")?,
        addr(&listeners.http, "REST")?,
    );

    let health = Health::new();
    let metrics = Metrics::new();
    let config_metrics = ConfigMetrics::register(&metrics);
    let client = Client::new(ClientConfig {
        tls: client_tls,
        ..ClientConfig::new(
            coordinator_endpoints
                .iter()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty()),
        )
    })
    .context("invalid coordinator endpoint")?;
    let store = Store::new(
        client,
        config_metrics,
        Limits {
            max_content_bytes,
            default_retention,
        },
        auth,
    );
    let hub = Hub::start(store.clone(), watch_buffer, shutdown.clone());

    // gRPC: the config service and grpc.health.v1, NOT_SERVING until the hub is ready.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    reporter
        .set_not_serving::<proto::config_v1::config_server::ConfigServer<GrpcService>>()
        .await;
    let grpc_server = {
        // TCP_NODELAY on every accepted connection (serve_tonic): tonic's own `tcp_nodelay`
        // only applies to listeners it binds itself, and Nagle + delayed ACKs add ~40 ms.
        let service = GrpcService::new(store.clone(), hub.clone()).server();
        let stop = shutdown.clone();
        let tls = server_tls.clone();
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(service);
        tokio::spawn(async move {
            service_kit::tls::serve_tonic(router, listeners.grpc, tls, stop.cancelled_owned()).await
        })
    };
    let rest_server = {
        let router = rest::router(store.clone(), hub.clone());
        let stop = shutdown.clone();
        let tls = server_tls.clone();
        tokio::spawn(async move {
            service_kit::tls::serve_axum(router, listeners.http, tls, stop.cancelled_owned()).await
        })
    };
    tracing::info!(grpc = %grpc_addr, rest = %http_addr, "config service listening");
    tracing::info!(admin = %admin_addr, "admin server listening");

    let readiness = {
        let (hub, health, shutdown) = (hub.clone(), health.clone(), shutdown.clone());
        tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                if hub.wait_ready(Duration::from_secs(3600)).await {
                    health.set_ready(true);
                    reporter
                        .set_service_status("", tonic_health::ServingStatus::Serving)
                        .await;
                    reporter
                        .set_serving::<proto::config_v1::config_server::ConfigServer<GrpcService>>()
                        .await;
                    tracing::info!("ready");
                    return;
                }
            }
        })
    };

    let admin_result = admin::serve(
        listeners.admin,
        admin::router(health.clone(), metrics),
        shutdown.clone(),
    )
    .await
    .context("admin server failed");
    health.set_ready(false);
    shutdown.cancel();
    let finish = async {
        let grpc = grpc_server.await;
        let rest = rest_server.await;
        let _ = readiness.await;
        (grpc, rest)
    };
    let (grpc, rest) =
        match tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(3), finish).await {
            Ok(done) => done,
            Err(_) => {
                tracing::warn!("servers still busy after the grace period; stopping anyway");
                return admin_result;
            }
        };
    admin_result?;
    grpc.context("gRPC server task failed")?
        .context("gRPC server failed")?;
    rest.context("REST server task failed")?
        .context("REST server failed")?;
    tracing::info!("stopped");
    Ok(())
}
