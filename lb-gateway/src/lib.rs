//! `lb-gateway`: the front door of the platform.
//!
//! An HTTP/1.1, HTTP/2 (h2c too) and gRPC reverse proxy. Each request is matched to a route
//! (host, path prefix or gRPC service, from a TOML routes file), and sent to one instance of the
//! route's registry service, chosen by consistent hashing with bounded loads over the
//! instances the registry reports live at that moment. It keeps no state of its own: backend
//! sets come from `registry-svc` watches.
//!
//! # Layout
//!
//! - [`hash`] (from `lb-core`): the pure core. [`hash::ring`] (ketama-like, weighted virtual
//!   nodes), [`hash::maglev`] (weighted Maglev), [`hash::select`] (bounded loads, power of two
//!   choices). No I/O; property-tested.
//! - [`routes`] (from `lb-core`): the routes file (model, checks, matching, hash keys,
//!   rewrites).
//! - [`pool`]: a route's live backend set behind an `ArcSwap`, rebuilt and swapped on every
//!   registry change; backends' loads, outlier state and connections; draining.
//! - [`discovery`]: one registry watch per routed service, feeding the pools; keeps the last
//!   known set while the registry is unreachable.
//! - [`proxy`]: the request path (admit, pick, forward, retry, answer); [`upstream`]: per-backend
//!   connection pools and the bodies; [`server`]: the listener (h1 + h2c, upgrades, graceful
//!   drain); [`fast`]: the listener's HTTP/1.1 fast path; [`h1`]: the gateway's own HTTP/1.1
//!   client; [`head`]: a request head as hyper's `Parts` or as the fast path's bytes.
//! - [`backend_tls`]: TLS to the backends of routes with `backend.tls` (`--backend-cacert`,
//!   `--backend-cert`, `--backend-key`; ALPN per wire; handshake failures as connect failures).
//! - [`resilience`]: rate limits (GCRA), retry budget, outlier ejection.
//! - [`overrides`]: routes replaced at run time by versions of a config-svc item.
//! - [`trace`]: W3C `traceparent`; [`metrics`]: Prometheus families; [`admin`]: the JSON API.
//! - [`dashboard`]: the web dashboard (`/ui/` on the admin port): cluster, services, config
//!   items with history and diffs, each route's ring and loads, kept live by polling.
//! - `main.rs`: the binary (exit 64 on a bad config or routes file, `health` subcommand).
//!
//! # Identity
//! The gateway never acts for anyone but itself: it reads registry-svc (and config-svc, for
//! `--routes-item`) with its own bearer token (`--registry-token-file`, `--config-token-file`;
//! a read-only subject), and forwards each caller's `Authorization` header to the backend
//! unchanged (only `Proxy-Authorization`, addressed to the gateway, is removed). Its own tokens
//! are never sent to a backend.
//!
//! # Guarantees
//! - A registry change swaps a route's whole backend set at once: a request sees the old set
//!   or the new one. Requests already on a backend that left finish there (draining).
//! - Keyed requests stay on their key's owner unless it is ejected, at its circuit breaker, or
//!   above `(1 + ε)` × the mean in-flight load; then they walk the key's fixed order of
//!   preference. One of `n` backends joining or leaving moves about `1/n` of the keys.
//! - While the registry is unreachable the gateway routes with the last set it had.
//!
//! # Caveats
//! - Loads, ejections and circuit breakers are per route: two routes over one service count
//!   their requests separately.
//! - Timeouts bound the time to a response's headers, not its body (streams may run long).
//! - Routes come from the file at start; with `--routes-item`, each version of that config-svc
//!   item replaces them whole (see [`overrides`]). Editing the file needs a restart.

pub mod admin;
pub mod backend_tls;
pub mod dashboard;
pub mod discovery;
pub mod fast;
pub mod h1;
pub mod head;
// The pure parts (the hash tables, the routes file) live in `lb-core`, so the fuzz targets can
// build them without the proxy; re-exported here under their old paths.
pub use lb_core::hash;
pub mod metrics;
pub mod overrides;
pub mod pool;
pub mod proxy;
pub mod resilience;
pub use lb_core::routes;
pub mod server;
pub mod trace;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use registry_svc::client::RegistryClient;
use service_kit::admin::{self as kit_admin, Health, Metrics};
use service_kit::authn::read_token_file;
use service_kit::config::{parse_duration, parse_listen_url};
use service_kit::telemetry::LogFormat;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::discovery::Discovery;
use crate::metrics::GatewayMetrics;
use crate::pool::RouteState;
use crate::proxy::{Gateway, RouteTable};
use crate::resilience::{GlobalLimit, KeyedLimit};
use crate::routes::RoutesFile;

/// The name this service reports in logs, traces and `--version`.
pub const SERVICE_NAME: &str = "lb-gateway";

/// The service's configuration, from flags or environment variables.
#[derive(Debug, Clone, clap::Parser)]
pub struct Config {
    /// Address the proxy listens on (HTTP/1.1 and h2c), as `host:port` or `http://host:port`.
    #[arg(
        long,
        env = "LB_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR",
        value_parser = parse_listen_url
    )]
    pub listen: SocketAddr,

    /// Address of the admin HTTP server (health, readiness, metrics, admin API), as
    /// `host:port` or `http://host:port`.
    #[arg(
        long,
        env = "LB_GATEWAY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9103",
        value_name = "ADDR",
        value_parser = parse_listen_url
    )]
    pub admin_listen: SocketAddr,

    /// The routes file (TOML). Without one the gateway has no routes and answers 404.
    #[arg(long, env = "LB_GATEWAY_ROUTES", value_name = "FILE")]
    pub routes: Option<PathBuf>,

    /// gRPC endpoints of config-svc replicas, comma-separated, for `--routes-item`.
    #[arg(
        long,
        env = "LB_GATEWAY_CONFIG_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub config_endpoints: Vec<String>,

    /// A config-svc item (`namespace/group/key`) whose versions replace the routes at run time;
    /// the `--routes` file is served until the first arrives.
    #[arg(long, env = "LB_GATEWAY_ROUTES_ITEM", value_name = "ITEM", value_parser = overrides::parse_item)]
    pub routes_item: Option<config_svc::model::ItemRef>,

    /// gRPC endpoints of registry-svc replicas, comma-separated (`http://host:port`).
    #[arg(
        long,
        env = "LB_GATEWAY_REGISTRY_ENDPOINTS",
        default_value = "http://127.0.0.1:9200",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub registry_endpoints: Vec<String>,

    /// File holding the gateway's own bearer token for registry-svc (when the registry has
    /// auth on): give it a subject with read permission on the routed namespaces, never write
    /// or admin. It is sent only to registry-svc, never to backends.
    #[arg(long, env = "LB_GATEWAY_REGISTRY_TOKEN_FILE", value_name = "FILE")]
    pub registry_token_file: Option<PathBuf>,

    /// File holding the gateway's bearer token for config-svc (`--routes-item`), read
    /// permission on the item's namespace.
    #[arg(long, env = "LB_GATEWAY_CONFIG_TOKEN_FILE", value_name = "FILE")]
    pub config_token_file: Option<PathBuf>,

    /// Proxy workers (default: one per CPU). Each is a thread with its own single-threaded
    /// runtime accepting from the shared listener and serving its connections start to end,
    /// as nginx's worker processes do; the first also runs the control plane (registry
    /// watches, admin API).
    #[arg(long, env = "LB_GATEWAY_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Most client connections open at once (split evenly over the workers); beyond it,
    /// new connections wait in the listen backlog until one closes.
    #[arg(
        long,
        env = "LB_GATEWAY_MAX_CONNECTIONS",
        default_value_t = 20_000,
        value_name = "N"
    )]
    pub max_connections: usize,

    /// Largest request head (request line + headers; HTTP/2: header list) in bytes; larger
    /// ones are answered 431. At least 8192.
    #[arg(
        long,
        env = "LB_GATEWAY_MAX_HEADER_BYTES",
        default_value_t = 64 * 1024,
        value_name = "BYTES"
    )]
    pub max_header_bytes: usize,

    /// Time a client has to send a request's complete headers (slow-loris protection), e.g.
    /// "30s"; the connection is closed after it. Also bounds an idle HTTP/1.1 keep-alive.
    #[arg(
        long,
        env = "LB_GATEWAY_HEADER_READ_TIMEOUT",
        default_value = "30s",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub header_read_timeout: Duration,

    /// Write one access log line per request (`true` or `false`).
    #[arg(
        long,
        env = "LB_GATEWAY_ACCESS_LOG",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub access_log: bool,

    /// The HTTP/1.1 client for requests without a body: `own` (the gateway's, driven from the
    /// request's task; see `h1`) or `hyper` (hyper's, as for requests with bodies). For
    /// comparing the two; `own` is faster.
    #[arg(long, env = "LB_GATEWAY_HTTP1_CLIENT", default_value = "own", value_name = "own|hyper",
          value_parser = ["own", "hyper"])]
    pub http1_client: String,

    /// The HTTP/1.1 server for requests without a body: `own` (the listener's fast path, see
    /// `fast`; hyper still serves HTTP/2, upgrades, requests with bodies and TLS) or `hyper`
    /// (hyper's server for everything). `own` spent 0.86-0.89x hyper's CPU per request in
    /// `scripts/bench-gateway.sh`.
    #[arg(long, env = "LB_GATEWAY_HTTP1_SERVER", default_value = "own", value_name = "own|hyper",
          value_parser = ["own", "hyper"])]
    pub http1_server: String,

    /// How long in-flight requests may take to finish after shutdown is asked, e.g. "10s".
    #[arg(
        long,
        env = "LB_GATEWAY_SHUTDOWN_GRACE",
        default_value = "10s",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub shutdown_grace: Duration,

    /// Coordinator endpoints whose members the dashboard (`/ui/`) shows, comma-separated
    /// (`http://host:port`, or `https://host:port`: TLS with the `--client-*` files). Without
    /// them the dashboard's cluster panel says so.
    #[arg(
        long,
        env = "LB_GATEWAY_DASHBOARD_COORDINATOR_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub dashboard_coordinator_endpoints: Vec<String>,

    /// Base URLs of config-svc's REST API for the dashboard's config panel, comma-separated
    /// (`http://host:port`, or `https://host:port`: TLS with the `--client-*` files; the next is
    /// tried when one cannot be reached). It sends the `--config-token-file` token.
    #[arg(
        long,
        env = "LB_GATEWAY_DASHBOARD_CONFIG_URL",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub dashboard_config_url: Vec<String>,

    /// config-svc namespaces the dashboard lists, comma-separated (default: the registry's
    /// namespaces; config-svc cannot list its own).
    #[arg(
        long,
        env = "LB_GATEWAY_DASHBOARD_CONFIG_NAMESPACES",
        value_delimiter = ',',
        value_name = "NAMES"
    )]
    pub dashboard_config_namespaces: Vec<String>,

    /// File holding the token the dashboard sends the coordinator (gRPC metadata `token`) when
    /// its auth is on; read once at start. With `--client-cert-auth` on the coordinator, the
    /// `--client-cert` CN names the user instead and no token is needed.
    #[arg(
        long,
        env = "LB_GATEWAY_DASHBOARD_COORDINATOR_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub dashboard_coordinator_token_file: Option<PathBuf>,

    /// Format of the log lines written to stdout.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// TLS of the proxy listener (`--cert-file`, `--key-file`, `--trusted-ca-file`,
    /// `--client-cert-auth`; HTTP/1.1 and HTTP/2 through ALPN); the admin listener stays plain.
    #[command(flatten)]
    pub tls: service_kit::tls::ServerTlsArgs,

    /// TLS to registry-svc and config-svc (`--client-cacert`, `--client-cert`, `--client-key`).
    #[command(flatten)]
    pub client_tls: service_kit::tls::ServiceClientTlsArgs,

    /// TLS to the backends of routes with `backend.tls = true` (`--backend-cacert`,
    /// `--backend-cert`, `--backend-key`).
    #[command(flatten)]
    pub backend_tls: backend_tls::BackendTlsArgs,
}

impl Config {
    /// Checks what the parsers cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.registry_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err("--registry-endpoints is empty".into());
        }
        read_token_file(self.registry_token_file.as_deref())?;
        read_token_file(self.config_token_file.as_deref())?;
        read_token_file(self.dashboard_coordinator_token_file.as_deref())?;
        if self.worker_threads == Some(0) {
            return Err("--worker-threads must be at least 1".into());
        }
        let config_endpoints = self.config_endpoints.iter().any(|e| !e.trim().is_empty());
        if self.routes_item.is_some() && !config_endpoints {
            return Err("--routes-item needs --config-endpoints".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        for url in self
            .dashboard_config_url
            .iter()
            .filter(|u| !u.trim().is_empty())
        {
            dashboard::validate_config_url(url)
                .map_err(|e| format!("--dashboard-config-url: {e}"))?;
        }
        self.tls.files().validate("")?;
        self.client_tls.files().validate("--client-")?;
        self.backend_tls.validate()?;
        if self.max_header_bytes < server::MIN_HEADER_BYTES
            || u32::try_from(self.max_header_bytes).is_err()
        {
            return Err(format!(
                "--max-header-bytes must be between {} and {}",
                server::MIN_HEADER_BYTES,
                u32::MAX
            ));
        }
        if self.header_read_timeout.is_zero() {
            return Err("--header-read-timeout must be above zero".into());
        }
        Ok(())
    }

    /// Loads the routes file (an empty set without one).
    pub fn load_routes(&self) -> Result<routes::RoutesFile, routes::RoutesError> {
        match &self.routes {
            Some(path) => routes::load(path),
            None => routes::parse(""),
        }
    }

    /// Checks `file` against the flags: a route with `backend.tls` needs `--backend-cacert`.
    pub fn check_routes(&self, file: &routes::RoutesFile) -> Result<(), String> {
        backend_tls::check_routes(file, self.backend_tls.configured())
    }
}

/// Builds the route table of `file`, dialling the backends of routes with `backend.tls` with
/// `tls`. Routes of `previous` that keep their name and backend (TLS settings included) hand
/// their live backend sets over (see [`RouteState::adopt`]). Fails, naming the route, when a
/// route has `backend.tls` on and `tls` is `None` (no `--backend-cacert`).
pub fn build_table(
    metrics: &GatewayMetrics,
    file: &RoutesFile,
    previous: Option<&RouteTable>,
    source: String,
    tls: Option<&Arc<backend_tls::BackendTls>>,
) -> Result<RouteTable, String> {
    let mut routes = Vec::with_capacity(file.routes.len());
    for r in &file.routes {
        let route_tls = backend_tls::RouteTls::of(r, tls)?;
        let state = RouteState::new(r.clone(), metrics.route(&r.name), route_tls);
        if let Some(old) = previous.and_then(|p| {
            p.routes
                .iter()
                .find(|o| o.route.name == r.name && o.route.backend == r.backend)
        }) {
            state.adopt(old);
        }
        routes.push(Arc::new(state));
    }
    let settings = file.gateway.clone();
    Ok(RouteTable {
        routes,
        global_limit: settings.rate_limit.global.as_ref().map(GlobalLimit::new),
        ip_limit: settings
            .rate_limit
            .per_client_ip
            .as_ref()
            .map(KeyedLimit::new),
        settings,
        source,
    })
}

/// The listeners the service serves on, bound by the caller.
pub struct Listeners {
    /// The proxy (clients' traffic).
    pub proxy: TcpListener,
    /// Admin HTTP.
    pub admin: TcpListener,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on the {what} address {addr}"))
}

/// Binds both addresses of `config` and serves until `shutdown` is cancelled.
///
/// Fails if the routes file is bad, an address cannot be bound or a server fails; returns
/// `Ok(())` after a clean shutdown.
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
    let proxy = bind(config.listen, "proxy").await?;
    run_with_listeners(
        config,
        Listeners {
            proxy,
            admin: admin_listener,
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
    let file = config.load_routes()?;
    // Destructured so that a new field does not compile until it is used.
    let Config {
        listen: _,
        admin_listen: _,
        routes: routes_path,
        config_endpoints,
        routes_item,
        registry_endpoints,
        registry_token_file,
        config_token_file,
        worker_threads,
        max_connections,
        max_header_bytes,
        header_read_timeout,
        access_log,
        http1_client,
        http1_server,
        shutdown_grace,
        dashboard_coordinator_endpoints,
        dashboard_config_url,
        dashboard_config_namespaces,
        dashboard_coordinator_token_file,
        log_format: _,
        tls,
        client_tls,
        backend_tls,
    } = config;
    // Certificates are read now, so that a bad file fails the start with a clear message.
    let server_tls = tls
        .files()
        .server_config()
        .context("TLS of the proxy listener (--cert-file, --key-file, --trusted-ca-file)")?;
    let client_tls = client_tls.client_config().context(
        "TLS to registry-svc and config-svc (--client-cacert, --client-cert, --client-key)",
    )?;
    let backend_tls = backend_tls
        .load()
        .context("TLS to the backends (--backend-cacert, --backend-cert, --backend-key)")?;
    if server_tls.is_some() || client_tls.is_some() || backend_tls.is_some() {
        service_kit::tls::reload_on_sighup();
    }
    let proxy_addr = listeners
        .proxy
        .local_addr()
        .context("cannot read the proxy listener's address")?;
    let admin_addr = listeners
        .admin
        .local_addr()
        .context("cannot read the admin listener's address")?;

    let health = Health::new();
    let metrics = Metrics::new();
    let workers = worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let gm = GatewayMetrics::register(&metrics, workers);
    let source = match &routes_path {
        Some(p) => format!("file {}", p.display()),
        None => "none".to_owned(),
    };
    let table = build_table(&gm, &file, None, source, backend_tls.as_ref())
        .map_err(|e| anyhow::anyhow!("routes file: {e}"))?;
    let gw = Arc::new(Gateway {
        table: arc_swap::ArcSwap::from_pointee(table),
        in_flight: Arc::new(AtomicU64::new(0)),
        access_log,
        own_http1: http1_client == "own",
        own_http1_server: http1_server == "own",
        unrouted: gm.route("-"),
    });

    let client = RegistryClient::connect_tls(
        registry_endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty()),
        client_tls.clone(),
    )
    .and_then(|c| {
        let token = read_token_file(registry_token_file.as_deref())
            .map_err(tonic::Status::invalid_argument)?;
        c.with_token(&token)
    })
    .map_err(|s| anyhow::anyhow!("invalid registry endpoint or token: {}", s.message()))?;
    let dashboard = dashboard::Dashboard::new(
        Arc::clone(&gw),
        client.clone(),
        dashboard::DashboardConfig {
            coordinator_endpoints: dashboard_coordinator_endpoints,
            config_urls: dashboard_config_url,
            config_namespaces: dashboard_config_namespaces,
            tls: client_tls.clone(),
            coordinator_token: read_token_file(dashboard_coordinator_token_file.as_deref())
                .map_err(|e| anyhow::anyhow!(e))?,
            config_token: read_token_file(config_token_file.as_deref())
                .map_err(|e| anyhow::anyhow!(e))?,
        },
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let discovery = Arc::new(Discovery::new(client, health.clone(), shutdown.clone()));
    discovery.apply(&gw.table.load().routes);

    // Routes from config-svc, when asked for.
    let reloads = match routes_item {
        Some(item) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let endpoints = config_endpoints
                .iter()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect();
            tracing::info!(item = %item, "routes follow the config-svc item");
            let token =
                read_token_file(config_token_file.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
            let subscription = overrides::spawn(
                endpoints,
                &token,
                item,
                client_tls.clone(),
                tx,
                shutdown.clone(),
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            let applier = tokio::spawn(apply_reloads(
                rx,
                Arc::clone(&gw),
                Arc::clone(&discovery),
                gm.clone(),
                backend_tls.clone(),
                shutdown.clone(),
            ));
            Some((subscription, applier))
        }
        None => None,
    };

    // Once a second: expired ejections, drained backends, gauges.
    let ticker = {
        let (gw, stop) = (Arc::clone(&gw), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                for r in &gw.table.load().routes {
                    r.prune_draining();
                    r.refresh_gauges();
                }
            }
        })
    };

    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, routes = gw.table.load().routes.len(), "lb-gateway listening");
    let per_worker = server::ConnLimits {
        max_connections: max_connections.div_ceil(workers),
        max_header_bytes,
        header_read_timeout,
    };
    // Workers 1.. on threads of their own, on clones of the listening socket; the balance
    // spreads the connections evenly over all of them.
    let balance = server::Balance::new(gm.worker_connections(workers));
    let mut extra_workers = Vec::new();
    let proxy_listener = if workers > 1 {
        let std_listener = listeners
            .proxy
            .into_std()
            .context("cannot share the proxy listener")?;
        for i in 1..workers {
            let clone = std_listener
                .try_clone()
                .context("cannot share the proxy listener")?;
            let (gw, stop, tls) = (Arc::clone(&gw), shutdown.clone(), server_tls.clone());
            let balance = Arc::clone(&balance);
            let thread = std::thread::Builder::new()
                .name(format!("lb-gateway-worker-{i}"))
                .spawn(move || -> std::io::Result<()> {
                    upstream::set_worker(i);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(clone)?;
                        let seat = (balance, i);
                        server::serve(listener, tls, gw, per_worker, seat, shutdown_grace, stop)
                            .await
                    })
                })
                .context("cannot start a proxy worker thread")?;
            extra_workers.push(thread);
        }
        TcpListener::from_std(std_listener).context("cannot share the proxy listener")?
    } else {
        listeners.proxy
    };
    let proxy_server = tokio::spawn(server::serve(
        proxy_listener,
        server_tls,
        Arc::clone(&gw),
        per_worker,
        (balance, 0),
        shutdown_grace,
        shutdown.clone(),
    ));
    let admin_router = kit_admin::router(health.clone(), metrics)
        .merge(admin::router(gw))
        .merge(dashboard::router(dashboard));
    let admin_result = kit_admin::serve(listeners.admin, admin_router, shutdown.clone())
        .await
        .context("admin server failed");
    health.set_ready(false);
    shutdown.cancel();
    let proxy_result = proxy_server.await.context("proxy server task failed")?;
    for worker in extra_workers {
        let joined = tokio::task::spawn_blocking(move || worker.join()).await;
        match joined {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "a proxy worker failed"),
            _ => tracing::warn!("a proxy worker panicked"),
        }
    }
    if let Some((subscription, applier)) = reloads {
        let _ = subscription.await;
        let _ = applier.await;
    }
    let _ = ticker.await;
    admin_result?;
    proxy_result.context("proxy server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Applies routes versions from config-svc as they come (see [`overrides`]).
async fn apply_reloads(
    mut updates: tokio::sync::mpsc::UnboundedReceiver<overrides::Update>,
    gw: Arc<Gateway>,
    discovery: Arc<Discovery>,
    metrics: GatewayMetrics,
    backend_tls: Option<Arc<backend_tls::BackendTls>>,
    shutdown: CancellationToken,
) {
    loop {
        let update = tokio::select! {
            _ = shutdown.cancelled() => return,
            u = updates.recv() => match u {
                Some(u) => u,
                None => return,
            },
        };
        let table = routes::parse(&update.text)
            .map_err(|e| e.to_string())
            .and_then(|file| {
                build_table(
                    &metrics,
                    &file,
                    Some(&gw.table.load()),
                    update.source.clone(),
                    backend_tls.as_ref(),
                )
            });
        match table {
            Ok(table) => {
                discovery.apply(&table.routes);
                let n = table.routes.len();
                gw.table.store(Arc::new(table));
                metrics.reloaded("applied");
                tracing::info!(source = %update.source, routes = n, "routes replaced");
            }
            Err(e) => {
                metrics.reloaded("rejected");
                tracing::warn!(source = %update.source, error = %e, "routes version rejected; keeping the current routes");
            }
        }
    }
}
