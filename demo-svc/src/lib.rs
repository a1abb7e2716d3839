//! `demo-svc`: the demo application of the compose stack.
//!
//! A deliberately small service that does what a real one on the platform does, so that a user
//! can watch the platform work through `lb-gateway`:
//!
//! - it **registers itself** through `registry_svc::client::RegistryClient` (a lease of
//!   `--ttl`, an HTTP health check on its own `/healthz`), is kept registered by the client's
//!   keep-alive (re-registered after an outage), and **deregisters on SIGTERM** before it stops;
//! - it **reads its settings** through `config_svc::client::ConfigClient`: one JSON item
//!   (`--settings-item`, default `demo/demo-svc/settings.json`) fetched at start and then
//!   followed by a subscription, so a published version is in use within moments;
//! - it **answers HTTP** on every path (`GET /anything` → JSON naming the instance, the path it
//!   was asked for and the settings version in use) and **gRPC** on the same port
//!   (`demo.v1.Demo/Hello`, plus `grpc.health.v1.Health`), HTTP/1.1 and h2c alike;
//! - with `--cert-file`/`--key-file` (`TLS_CERT_FILE`, `TLS_KEY_FILE`; plus `--trusted-ca-file`
//!   and `--client-cert-auth` to require client certificates) it **serves that port over TLS**,
//!   HTTP/1.1 and HTTP/2 (so gRPC) chosen by ALPN, as registry-svc and config-svc serve theirs,
//!   and its registered health check asks the registry to probe over TLS too (`tls` on, the
//!   certificate checked for the advertised host name, see [`Config::check_tls_server_name`]);
//! - it has the platform's admin server (`/healthz`, `/readyz`, `/metrics`) on `--admin-listen`,
//!   logs through `tracing` and exports spans over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//!   (both from `service-kit`).
//!
//! # Layout
//! - [`Config`]: flags and `DEMO_*` environment variables, with [`Config::validate`].
//! - [`settings`]: the settings document and its checks (pure).
//! - [`app`]: the HTTP and gRPC faces over the shared [`app::State`].
//! - [`metrics`]: the Prometheus metrics of the service.
//! - [`run`] / [`run_with_listeners`]: start everything, run until `shutdown`, then deregister
//!   and drain.
//!
//! # Guarantees and caveats
//! - The admin port stays plain HTTP (container health checks probe it), TLS or not.
//! - Readiness (`/readyz`, and so the container's health) turns true once the instance is in
//!   the registry; it turns false again as soon as shutdown starts, before deregistering.
//! - A settings version that is not a JSON object with valid fields is refused: the last good
//!   settings stay in use, the refusal is logged and counted
//!   (`demo_settings_rejected_total`).
//! - When config-svc cannot be reached at start, the built-in defaults (version 0) are served
//!   until the subscription delivers a version; the registry is retried with backoff until it
//!   answers, and the HTTP/gRPC port serves meanwhile.

pub mod app;
pub mod metrics;
pub mod settings;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use config_svc::client::{Change, ConfigClient};
use config_svc::model::ItemRef;
use proto::registry_v1 as pb;
use registry_svc::client::{Registration, RegistryClient};
use service_kit::admin::{self as kit_admin, Health, Metrics};
use service_kit::authn::read_token_file;
use service_kit::config::{parse_duration, parse_listen_url};
use service_kit::telemetry::LogFormat;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::State;
use crate::metrics::DemoMetrics;

/// The name this service reports in logs, traces and `--version`.
pub const SERVICE_NAME: &str = "demo-svc";

/// The generated `demo.v1` code (from `proto/demo/demo.proto`).
pub mod pb_demo {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("demo.v1");
}

/// How long in-flight requests may take after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The service's configuration, from flags or `DEMO_*` environment variables.
#[derive(Debug, Clone, clap::Parser)]
pub struct Config {
    /// Address the HTTP + gRPC server listens on (`host:port` or `http://host:port`).
    #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:8500", value_name = "ADDR",
          value_parser = parse_listen_url)]
    pub listen: SocketAddr,

    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "DEMO_ADMIN_LISTEN", default_value = "127.0.0.1:9104", value_name = "ADDR",
          value_parser = parse_listen_url)]
    pub admin_listen: SocketAddr,

    /// This instance's id in the registry and in every answer (default: the host name, or
    /// `demo-<port>` without one).
    #[arg(long, env = "DEMO_INSTANCE_ID", default_value = "", value_name = "ID")]
    pub instance_id: String,

    /// The address others reach this instance at (default: the listen IP when it is a specific
    /// one, else the host name). A host name is resolved to its IP address at start, and the IP
    /// is registered (lb-gateway routes to IP addresses).
    #[arg(
        long,
        env = "DEMO_ADVERTISE_ADDRESS",
        default_value = "",
        value_name = "HOST"
    )]
    pub advertise_address: String,

    /// gRPC endpoints of registry-svc replicas, comma-separated.
    #[arg(
        long,
        env = "DEMO_REGISTRY_ENDPOINTS",
        default_value = "http://127.0.0.1:9200",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub registry_endpoints: Vec<String>,

    /// gRPC endpoints of config-svc replicas, comma-separated.
    #[arg(
        long,
        env = "DEMO_CONFIG_ENDPOINTS",
        default_value = "http://127.0.0.1:9300",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub config_endpoints: Vec<String>,

    /// File holding this service's bearer token for registry-svc (when it has auth on; a
    /// subject with write permission on `--namespace`).
    #[arg(long, env = "DEMO_REGISTRY_TOKEN_FILE", value_name = "FILE")]
    pub registry_token_file: Option<PathBuf>,

    /// File holding this service's bearer token for config-svc (when it has auth on; read
    /// permission on the settings item's namespace).
    #[arg(long, env = "DEMO_CONFIG_TOKEN_FILE", value_name = "FILE")]
    pub config_token_file: Option<PathBuf>,

    /// Registry namespace to register in.
    #[arg(
        long,
        env = "DEMO_NAMESPACE",
        default_value = "demo",
        value_name = "NS"
    )]
    pub namespace: String,

    /// Service name to register as.
    #[arg(
        long,
        env = "DEMO_SERVICE",
        default_value = "demo",
        value_name = "NAME"
    )]
    pub service: String,

    /// Zone to register with (optional; lb-gateway routes can filter on it).
    #[arg(long, env = "DEMO_ZONE", default_value = "", value_name = "ZONE")]
    pub zone: String,

    /// The config-svc item holding the settings, as `namespace/group/key`.
    #[arg(long, env = "DEMO_SETTINGS_ITEM", default_value = "demo/demo-svc/settings.json",
          value_name = "ITEM", value_parser = parse_item)]
    pub settings_item: ItemRef,

    /// The registration's TTL: the instance expires this long after its last heartbeat.
    #[arg(long, env = "DEMO_TTL", default_value = "10s", value_name = "DURATION",
          value_parser = parse_duration)]
    pub ttl: Duration,

    /// How often the registry health-checks this instance (`GET /healthz` on the main port).
    #[arg(long, env = "DEMO_HEALTH_CHECK_INTERVAL", default_value = "1s", value_name = "DURATION",
          value_parser = parse_duration)]
    pub health_check_interval: Duration,

    /// Format of the log lines written to stdout.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// TLS to registry-svc and config-svc (`--client-cacert`, `--client-cert`, `--client-key`).
    #[command(flatten)]
    pub client_tls: service_kit::tls::ServiceClientTlsArgs,

    /// TLS of the HTTP + gRPC port (`--cert-file`, `--key-file`, `--trusted-ca-file`,
    /// `--client-cert-auth`); the admin port stays plain HTTP.
    #[command(flatten)]
    pub tls: service_kit::tls::ServerTlsArgs,
}

/// Parses `namespace/group/key`.
pub fn parse_item(s: &str) -> Result<ItemRef, String> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [ns, group, key] if !ns.is_empty() && !group.is_empty() && !key.is_empty() => {
            let item = ItemRef::new(*ns, *group, *key);
            item.validate()
                .map_err(|e| format!("invalid settings item {s:?}: {e}"))?;
            Ok(item)
        }
        _ => Err(format!(
            "invalid settings item {s:?}: expected namespace/group/key, e.g. demo/demo-svc/settings.json"
        )),
    }
}

impl Config {
    /// Checks what the parsers cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.registry_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err("--registry-endpoints is empty".into());
        }
        self.client_tls.files().validate("--client-")?;
        self.tls.files().validate("")?;
        if self.config_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err("--config-endpoints is empty".into());
        }
        read_token_file(self.registry_token_file.as_deref())?;
        read_token_file(self.config_token_file.as_deref())?;
        for (flag, value) in [
            ("--namespace", &self.namespace),
            ("--service", &self.service),
        ] {
            if value.trim().is_empty() {
                return Err(format!("{flag} is empty"));
            }
        }
        if self.instance_id.len() > 128 {
            return Err("--instance-id is longer than 128 bytes".into());
        }
        let ttl = self.ttl.as_secs();
        if !(2..=3600).contains(&ttl) {
            return Err(format!(
                "--ttl {:?} is out of range: whole seconds from 2s to 1h",
                self.ttl
            ));
        }
        let interval = self.health_check_interval;
        if interval < Duration::from_millis(100) || interval > Duration::from_secs(60) {
            return Err(format!(
                "--health-check-interval {interval:?} is out of range: 100ms to 60s"
            ));
        }
        Ok(())
    }

    /// The instance id: the configured one, else the host name, else `demo-<port>`.
    pub fn effective_instance_id(&self, port: u16) -> String {
        if !self.instance_id.trim().is_empty() {
            return self.instance_id.trim().to_string();
        }
        host_name().unwrap_or_else(|| format!("demo-{port}"))
    }

    /// With TLS on, the name the registry's health check verifies this instance's certificate
    /// for: the advertise address when it is a host name (it is registered as its IP address,
    /// which a certificate seldom names), else `""` (the registered IP address itself).
    pub fn check_tls_server_name(&self, advertise: &str) -> String {
        if advertise.parse::<IpAddr>().is_ok() {
            String::new()
        } else {
            advertise.to_string()
        }
    }

    /// The address to register: the configured one, else the listen IP if specific, else the
    /// host name (what other containers resolve), else 127.0.0.1.
    pub fn effective_advertise_address(&self, listen: SocketAddr) -> String {
        if !self.advertise_address.trim().is_empty() {
            return self.advertise_address.trim().to_string();
        }
        if !listen.ip().is_unspecified() {
            return listen.ip().to_string();
        }
        host_name().unwrap_or_else(|| IpAddr::from([127, 0, 0, 1]).to_string())
    }
}

/// The IP address to register for `host`: `host` itself if it is one, else what it resolves
/// to (IPv4 first). lb-gateway routes to IP addresses only, so a host name is resolved here,
/// once, at start (in a container the host name resolves to the container's address).
pub async fn resolve(host: &str, port: u16) -> anyhow::Result<String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve the advertise address {host:?}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .map(|a| a.ip().to_string())
        .ok_or_else(|| anyhow::anyhow!("the advertise address {host:?} resolves to nothing"))
}

/// `$HOSTNAME`, else `/etc/hostname` (Docker provides both).
fn host_name() -> Option<String> {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_file = || std::fs::read_to_string("/etc/hostname").ok();
    from_env
        .or_else(from_file)
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The listeners the service serves on, bound by the caller (tests bind `127.0.0.1:0`).
pub struct Listeners {
    /// HTTP + gRPC.
    pub app: TcpListener,
    /// Admin (`/healthz`, `/readyz`, `/metrics`).
    pub admin: TcpListener,
}

/// Binds the configured addresses and runs until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let app = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    run_with_listeners(config, Listeners { app, admin }, shutdown).await
}

/// Runs the service on `listeners` until `shutdown` is cancelled: serves, registers, follows
/// the settings; then turns not ready, deregisters and lets in-flight requests finish (at
/// most [`SHUTDOWN_GRACE`]).
pub async fn run_with_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let local = listeners.app.local_addr().context("app listener address")?;
    let instance_id = config.effective_instance_id(local.port());
    let advertise = config.effective_advertise_address(local);
    let address = resolve(&advertise, local.port()).await?;
    // Certificates are read now, so that a bad file fails the start with a clear message.
    let server_tls = config
        .tls
        .files()
        .server_config()
        .context("TLS of the HTTP + gRPC port (--cert-file, --key-file, --trusted-ca-file)")?;
    let check_tls = server_tls
        .is_some()
        .then(|| config.check_tls_server_name(&advertise));

    let health = Health::new();
    let registry_metrics = Metrics::new();
    let metrics = DemoMetrics::register(&registry_metrics);
    let state = State::new(instance_id.clone(), metrics.clone());

    // Stops the servers; separate from `shutdown` so that deregistering comes first.
    let stop_serving = CancellationToken::new();
    let admin_task = tokio::spawn(kit_admin::serve(
        listeners.admin,
        kit_admin::router(health.clone(), registry_metrics.clone()),
        stop_serving.clone(),
    ));
    let tls_on = server_tls.is_some();
    let app_task = tokio::spawn(app::serve(
        listeners.app,
        server_tls,
        state.clone(),
        stop_serving.clone(),
    ));
    tracing::info!(instance = %instance_id, %local, advertise = %address, tls = tls_on, "serving HTTP and gRPC");

    let client_tls = config.client_tls.client_config().context(
        "TLS to registry-svc and config-svc (--client-cacert, --client-cert, --client-key)",
    )?;
    if client_tls.is_some() || tls_on {
        service_kit::tls::reload_on_sighup();
    }

    // Settings: what config-svc has now, then every new version.
    let config_client = ConfigClient::builder(config.config_endpoints.clone())
        .tls(client_tls.clone())
        .client_id(instance_id.clone())
        .label("service", config.service.clone())
        .timeout(Duration::from_secs(2))
        .token(
            read_token_file(config.config_token_file.as_deref()).map_err(|e| anyhow::anyhow!(e))?,
        )
        .build()
        .map_err(|s| anyhow::anyhow!("invalid config-svc endpoint: {}", s.message()))?;
    let item = config.settings_item.clone();
    match config_client.fetch(&item).await {
        Ok(fetched) => state.offer_settings(&fetched.version),
        Err(s) if s.code() == tonic::Code::NotFound => {
            tracing::info!(item = %item, "no settings published yet; using the defaults");
        }
        Err(s) => {
            tracing::warn!(item = %item, error = %s.message(), "settings unavailable; using the defaults until they arrive");
        }
    }
    let on_change = {
        let state = state.clone();
        move |change: &Change| match change {
            Change::Updated { version, .. } => state.offer_settings(version),
            Change::Deleted { item } => {
                tracing::info!(item = %item, "settings item deleted; keeping the last good settings");
            }
        }
    };
    let subscription = config_client.subscribe(vec![item], on_change);

    // Registration, retried until the registry answers (or we are asked to stop).
    let registry_token =
        read_token_file(config.registry_token_file.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    let registry = RegistryClient::connect_tls(config.registry_endpoints.clone(), client_tls)
        .and_then(|c| c.with_token(&registry_token))
        .map_err(|s| anyhow::anyhow!("invalid registry endpoint or token: {}", s.message()))?;
    let instance = instance_record(
        &config,
        &instance_id,
        &address,
        local.port(),
        check_tls.as_deref(),
    );
    let registration = register_until_done(&registry, instance, &metrics, &shutdown).await;
    if let Some(reg) = &registration {
        let registered = reg.instance();
        tracing::info!(
            instance = %registered.instance_id,
            namespace = %registered.namespace,
            service = %registered.service,
            address = %format!("{}:{}", registered.address, registered.port),
            ttl_seconds = registered.ttl_seconds,
            "registered"
        );
        metrics.registered.set(1);
        health.set_ready(true);
        spawn_registration_log(reg, shutdown.clone());
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down: not ready, deregistering, then draining");
    health.set_ready(false);
    if let Some(reg) = registration {
        match tokio::time::timeout(Duration::from_secs(3), reg.deregister()).await {
            Ok(Ok(())) => tracing::info!("deregistered"),
            Ok(Err(s)) => {
                tracing::warn!(error = %s.message(), "deregistering failed; the instance expires after its TTL")
            }
            Err(_) => tracing::warn!("deregistering timed out; the instance expires after its TTL"),
        }
        metrics.registered.set(0);
    }
    subscription.close().await;
    stop_serving.cancel();
    let app_result = app_task.await.context("app server task")?;
    let admin_result = admin_task.await.context("admin server task")?;
    app_result.context("app server")?;
    admin_result.context("admin server")?;
    tracing::info!("stopped");
    Ok(())
}

/// The registry record of this instance; `check_tls`: the port serves TLS, and the health
/// check verifies the certificate for this name (`""`: the registered address).
fn instance_record(
    config: &Config,
    id: &str,
    address: &str,
    port: u16,
    check_tls: Option<&str>,
) -> pb::Instance {
    let interval_ms = u32::try_from(config.health_check_interval.as_millis()).unwrap_or(60_000);
    pb::Instance {
        namespace: config.namespace.clone(),
        service: config.service.clone(),
        instance_id: id.to_string(),
        address: address.to_string(),
        port: u32::from(port),
        protocol: pb::Protocol::Http as i32,
        zone: config.zone.clone(),
        weight: 1,
        ttl_seconds: u32::try_from(config.ttl.as_secs()).unwrap_or(3600),
        metadata: [("version".to_string(), env!("CARGO_PKG_VERSION").to_string())].into(),
        health_check: Some(pb::HealthCheck {
            kind: Some(pb::health_check::Kind::Http(pb::HttpCheck {
                path: "/healthz".into(),
                tls: check_tls.is_some(),
                tls_server_name: check_tls.unwrap_or_default().to_string(),
            })),
            interval_ms,
            timeout_ms: (interval_ms / 2).max(100),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        }),
        ..Default::default()
    }
}

async fn register_until_done(
    registry: &RegistryClient,
    instance: pb::Instance,
    metrics: &DemoMetrics,
    shutdown: &CancellationToken,
) -> Option<Registration> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return None,
            r = tokio::time::timeout(Duration::from_secs(5), registry.register(instance.clone())) => r,
        };
        match attempt {
            Ok(Ok(reg)) => return Some(reg),
            Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => {
                // Retrying cannot help; say why and keep serving unregistered.
                tracing::error!(error = %s.message(), "the registry refused this instance");
                metrics.registration_failures.inc();
                return None;
            }
            Ok(Err(s)) => {
                tracing::warn!(error = %s.message(), retry_in = ?backoff, "registering failed");
            }
            Err(_) => tracing::warn!(retry_in = ?backoff, "registering timed out"),
        }
        metrics.registration_failures.inc();
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Logs every re-registration the client's keep-alive makes (after an outage).
fn spawn_registration_log(reg: &Registration, shutdown: CancellationToken) {
    let mut rx = reg.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let revision = rx.borrow().revision;
                    tracing::info!(revision, "registered again (the registration had expired)");
                }
            }
        }
    });
}

pub use settings::Settings;
