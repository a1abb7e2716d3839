//! `registry-svc`: the service registry of the platform.
//!
//! Services register their instances here and clients discover and watch them, as they would
//! with Consul, Nacos or ZooKeeper + Curator. The service keeps no state of its own: every
//! record lives in the coordinator (through `coord-client`), so any number of replicas can run
//! side by side, and restarting one loses nothing.
//!
//! # Layout
//! - [`model`] (from `registry-model`): instances, health check specs, service options,
//!   validation, discovery filters and the protect threshold. Pure.
//! - [`keys`] (from `registry-model`): the key layout in the coordinator (documented there, and
//!   only there).
//! - [`registry`]: the operations (register, heartbeat, deregister, list, discover, watch,
//!   options) over the coordinator. Both faces call these and nothing else.
//! - [`grpc`]: the `registry.v1.Registry` gRPC face; [`rest`]: the same over REST/JSON
//!   (`/openapi.json` documents it). [`error`]: the one error type, mapped to gRPC status and
//!   HTTP JSON in one place.
//! - [`health`]: the health state machine, who probes what (rendezvous hashing over the live
//!   replicas), the probes (HTTP, TCP, `grpc.health.v1`). Pure apart from the probes.
//! - [`checker`]: the replica's background work: joining the replica set, probing its share.
//! - [`client`]: the library services use to register and stay registered.
//! - [`metrics`]: registrations, heartbeats, health checks (results, latency), watchers.
//! - `main.rs`: the binary; `src/bin/bench.rs`: the load generator.
//!
//! # Serving
//! Three listeners: gRPC (`registry.v1.Registry` and `grpc.health.v1.Health`), REST, and the
//! admin server (`/healthz`, `/readyz`, `/metrics`). The process starts serving even while the
//! coordinator is unreachable; it becomes ready (`/readyz` 200, gRPC health `SERVING`) once it
//! joined the replica set in the coordinator.
//!
//! # Authentication
//! Off by default (everyone may do everything). With `--auth-mode token|jwt|mtls` every gRPC
//! call and REST route (but `/openapi.json` and `grpc.health.v1`) needs credentials, and each
//! operation a permission in its namespace from `--auth-policy-file`: see
//! `service_kit::authn` for the flags and the policy format, [`registry`] for what each
//! operation needs.
//!
//! # TLS
//! `--cert-file`/`--key-file` (+ `--trusted-ca-file`, `--client-cert-auth`) put the gRPC and
//! REST listeners on TLS; `--coordinator-cacert|cert|key` dial the coordinator over TLS;
//! `--check-cacert|cert|key` ([`CheckTlsArgs`]) are what health checks with `tls` on verify the
//! instances' certificates against and present to them (see [`health`]).
//!
//! # Caveats
//! - Readiness is not withdrawn when the coordinator becomes unreachable later; calls then
//!   answer `UNAVAILABLE` / 503.
//! - While the replica set changes, an instance may briefly be probed by two replicas or none
//!   (see [`health`]).

pub mod checker;
pub mod client;
pub mod error;
pub mod grpc;
pub mod health;
// `model` and `keys` are pure and live in `registry-model`, so the fuzz targets can build them
// without the service; re-exported here under their old paths.
pub use registry_model::keys;
pub mod metrics;
pub use registry_model::model;
pub mod registry;
pub mod rest;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use coord_client::{Client, ClientConfig};
use service_kit::admin::{self, Health, Metrics};
use service_kit::authn::{Auth, AuthArgs};
use service_kit::config::{parse_duration, parse_listen_url};
use service_kit::telemetry::LogFormat;
use service_kit::tls::{ClientTlsArgs, ClientTlsFiles, ServerTlsArgs};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::grpc::GrpcService;
use crate::metrics::RegistryMetrics;
use crate::registry::Registry;

/// The name this service reports in logs, traces and `--version`.
pub const SERVICE_NAME: &str = "registry-svc";

/// How long the servers get to finish after shutdown before they are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The service's configuration, from flags or environment variables.
#[derive(Debug, Clone, clap::Parser)]
pub struct Config {
    /// Address of the admin HTTP server (health, readiness, metrics), as
    /// `host:port` or `http://host:port`.
    #[arg(
        long,
        env = "REGISTRY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9101",
        value_name = "ADDR",
        value_parser = parse_listen_url
    )]
    pub admin_listen: SocketAddr,

    /// Address of the gRPC server (`registry.v1.Registry`, `grpc.health.v1.Health`).
    #[arg(
        long,
        env = "REGISTRY_GRPC_LISTEN",
        default_value = "127.0.0.1:9200",
        value_name = "ADDR",
        value_parser = parse_listen_url
    )]
    pub grpc_listen: SocketAddr,

    /// Address of the REST/JSON server.
    #[arg(
        long,
        env = "REGISTRY_HTTP_LISTEN",
        default_value = "127.0.0.1:9201",
        value_name = "ADDR",
        value_parser = parse_listen_url
    )]
    pub http_listen: SocketAddr,

    /// Coordinator endpoints, comma-separated (`http://host:port`).
    #[arg(
        long,
        env = "REGISTRY_COORDINATOR_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub coordinator_endpoints: Vec<String>,

    /// This replica's ID in the replica set (default: random). Letters, digits, '.', '_', '-'.
    #[arg(
        long,
        env = "REGISTRY_REPLICA_ID",
        default_value = "",
        value_name = "ID"
    )]
    pub replica_id: String,

    /// TTL of this replica's membership lease: how long until the others take over its share
    /// of health checks after it dies, e.g. "5s" (2s to 1h).
    #[arg(
        long,
        env = "REGISTRY_REPLICA_TTL",
        default_value = "5s",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub replica_ttl: Duration,

    /// Format of the log lines written to stdout.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Authentication and authorisation (`--auth-mode`, `--auth-policy-file`, …; off by
    /// default). See `service_kit::authn` and the permission table in [`registry`].
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

    /// TLS of the health checks that ask for it (`--check-cacert`, `--check-cert`,
    /// `--check-key`).
    #[command(flatten)]
    pub check_tls: CheckTlsArgs,
}

/// `--check-cacert`, `--check-cert`, `--check-key`: how this replica probes instances whose
/// HTTP or gRPC health check has `tls` on. Without `--check-cacert` such checks fail, the
/// reason saying so (see [`health`]); plain checks do not need any of these.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CheckTlsArgs {
    /// CA bundle (PEM) the certificates of instances with TLS health checks are verified
    /// against.
    #[arg(long, env = "REGISTRY_CHECK_CACERT", value_name = "FILE")]
    pub check_cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) presented to instances that ask for one.
    #[arg(long, env = "REGISTRY_CHECK_CERT", value_name = "FILE")]
    pub check_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --check-cert.
    #[arg(long, env = "REGISTRY_CHECK_KEY", value_name = "FILE")]
    pub check_key: Option<std::path::PathBuf>,
}

impl CheckTlsArgs {
    /// The files as a [`ClientTlsFiles`].
    pub fn files(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca_file: self.check_cacert.clone(),
            cert_file: self.check_cert.clone(),
            key_file: self.check_key.clone(),
        }
    }

    /// Reads the files now (so that a bad one fails the start), or `None` without
    /// `--check-cacert`.
    pub fn load(&self) -> Result<Option<health::ProbeTls>, service_kit::tls::TlsError> {
        let files = self.files();
        files
            .validate("--check-")
            .map_err(service_kit::tls::TlsError::Flags)?;
        Ok(files
            .client_config()?
            .map(|config| health::ProbeTls::new(&config)))
    }
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
        if !(Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&self.replica_ttl) {
            return Err(format!(
                "--replica-ttl {:?} is out of range: expected 2s to 1h",
                self.replica_ttl
            ));
        }
        self.auth.validate()?;
        if !self.replica_id.is_empty()
            && (self.replica_id.len() > 128
                || !self
                    .replica_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "--replica-id {:?} is invalid: up to 128 letters, digits, '.', '_' and '-'",
                self.replica_id
            ));
        }
        self.tls.files().validate("")?;
        self.coordinator_tls.files().validate("--coordinator-")?;
        self.check_tls.files().validate("--check-")?;
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
        replica_id,
        replica_ttl,
        log_format: _,
        auth,
        tls,
        coordinator_tls,
        check_tls,
    } = config;
    let auth = Auth::from_args(&auth).map_err(|e| anyhow::anyhow!(e))?;
    // Certificates are read now, so that a bad file fails the start with a clear message.
    let server_tls = tls.files().server_config().context(
        "TLS of the gRPC and REST listeners (--cert-file, --key-file, --trusted-ca-file)",
    )?;
    let client_tls = coordinator_tls.client_config().context(
        "TLS of the coordinator client (--coordinator-cacert, --coordinator-cert, --coordinator-key)",
    )?;
    let probe_tls = check_tls
        .load()
        .context("TLS of the health checks (--check-cacert, --check-cert, --check-key)")?;
    if server_tls.is_some() || client_tls.is_some() || probe_tls.is_some() {
        service_kit::tls::reload_on_sighup();
    }
    let replica_id = if replica_id.is_empty() {
        model::new_instance_id()
    } else {
        replica_id
    };
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
    let registry_metrics = RegistryMetrics::register(&metrics);
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
    let registry = Registry::new(client, registry_metrics, auth, shutdown.clone());

    // gRPC: the registry and grpc.health.v1, NOT_SERVING until this replica joined.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    reporter
        .set_not_serving::<proto::registry_v1::registry_server::RegistryServer<GrpcService>>()
        .await;
    let grpc_server = {
        // TCP_NODELAY on every accepted connection (serve_tonic): tonic's own `tcp_nodelay`
        // only applies to listeners it binds itself, and Nagle + delayed ACKs add ~40 ms.
        let service = GrpcService::new(registry.clone()).server();
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
        let router = rest::router(registry.clone());
        let stop = shutdown.clone();
        let tls = server_tls.clone();
        tokio::spawn(async move {
            service_kit::tls::serve_axum(router, listeners.http, tls, stop.cancelled_owned()).await
        })
    };
    tracing::info!(grpc = %grpc_addr, rest = %http_addr, replica = %replica_id, "registry listening");
    tracing::info!(admin = %admin_addr, "admin server listening");

    // Membership, readiness, health checking.
    let replica = {
        let (registry, health, shutdown) = (registry.clone(), health.clone(), shutdown.clone());
        tokio::spawn(async move {
            let ttl = i64::try_from(replica_ttl.as_secs()).unwrap_or(i64::MAX);
            let keeper = checker::join(&registry, &replica_id, ttl, &shutdown).await;
            if keeper.is_some() {
                health.set_ready(true);
                reporter
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
                reporter
                    .set_serving::<proto::registry_v1::registry_server::RegistryServer<GrpcService>>()
                    .await;
                tracing::info!("ready");
            }
            checker::run(registry, replica_id, probe_tls, shutdown).await;
            if let Some(keeper) = keeper {
                // Leave the replica set at once so the others take over its checks.
                let _ = tokio::time::timeout(Duration::from_secs(2), keeper.revoke()).await;
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
        let _ = replica.await;
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
