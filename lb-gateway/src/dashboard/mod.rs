//! The web dashboard: `http://<admin address>/ui/`, on the gateway's admin port.
//!
//! One page shows the whole platform, live:
//! - the coordinator cluster: each member, which one leads, its Raft term, the store's revision,
//!   its health (from `Maintenance.Status` of every member);
//! - every registry service with its instances, their health and weight;
//! - config-svc items with their history, a side-by-side diff of two versions, and the state of
//!   a staged rollout;
//! - each route's hash ring (or Maglev table), with the share of keys, the weight and the
//!   current load (requests in flight, requests per second) of every backend.
//!
//! # Why the gateway serves it
//! The gateway already holds the most live part of the picture, which no other service has: the
//! tables it routes with and the load on each backend. It also already talks to the registry.
//! So the page is served beside `/admin/*`, and the gateway gathers the rest on each request:
//! the coordinator over gRPC (`--dashboard-coordinator-endpoints`), config-svc over its REST API
//! (`--dashboard-config-url`). Both are optional: without them, or while they cannot be
//! reached, that panel says why and the others keep working.
//!
//! # How the page is made and kept live
//! Plain HTML, CSS and JavaScript (`index.html`, `style.css`, `app.js` beside this file), built
//! into the binary with `include_str!`: no build step, no CDN, nothing fetched from elsewhere.
//! The page polls the small JSON API below once a second and redraws what changed. Polling
//! rather than Server-Sent Events: each answer is a whole snapshot, so a missed poll or a
//! restarted gateway heals by itself, and the server keeps no per-viewer state; a dashboard has
//! few viewers, and a poll costs a few small upstream calls.
//!
//! | route | answer |
//! |---|---|
//! | `GET /ui/` | the page (`/ui/app.js`, `/ui/style.css`) |
//! | `GET /ui/api/cluster` | coordinator members: ID, name, URLs, leader, term, revision, index, DB size, health |
//! | `GET /ui/api/services` | registry namespaces → services → instances (health, weight, zone, ...) and the routes that use each service |
//! | `GET /ui/api/routes` | per route: what `/admin/backends` shows, plus the table's algorithm and its owners around the ring |
//! | `GET /ui/api/config` | config-svc items (current and latest version, rollout) per namespace |
//! | `GET /ui/api/config/history?namespace=&group=&key=` | the item's versions, newest first |
//! | `GET /ui/api/config/diff?namespace=&group=&key=&from=&to=` | config-svc's diff of two versions (lines and key paths) |
//!
//! # Errors
//! Every error is JSON, `{"error": "...", "source": "coordinator" | "registry" | "config-svc" |
//! "dashboard"}` ([`DashboardError`]): 502 when an upstream cannot be reached or fails, 504 when
//! it does not answer within [`CALL_TIMEOUT`], 503 when the dashboard was not given its
//! address, 400 for a bad parameter; config-svc's own 4xx answers (an unknown item or version)
//! keep their status. The page shows the message in the panel concerned.
//!
//! # Caveats
//! - The member list comes through the configured coordinator endpoints; members are then asked
//!   at those endpoints or, failing that, at the client URLs they advertise. If no configured
//!   endpoint answers, the panel says so even while other members run: list them all.
//! - Config namespaces are not listed by config-svc: the page shows those of
//!   `--dashboard-config-namespaces`, or else the registry's namespaces.
//! - Upstreams over TLS: `https://` coordinator endpoints and config-svc URLs are dialled with the
//!   gateway's `--client-cacert|cert|key` (the CA, and the client certificate a server with
//!   `--client-cert-auth` requires); with auth on, the coordinator gets the token of
//!   `--dashboard-coordinator-token-file` (gRPC metadata `token`; with `--client-cert-auth` the
//!   certificate's CN names the user instead) and config-svc the bearer token of
//!   `--config-token-file`.
//! - The admin port itself is plain HTTP without authentication, so it should stay on a trusted
//!   network (compose publishes it on 127.0.0.1 only).

pub mod sources;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use registry_svc::client::RegistryClient;
use serde_json::{Value, json};

use crate::proxy::Gateway;
use crate::resilience::now_ns;
use sources::{Cluster, ConfigRest};

/// How long one upstream call of the dashboard may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Points of the hash space sampled to draw a route's ring (owners at evenly spaced keys).
pub const RING_SAMPLES: usize = 360;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// Where the dashboard finds the parts the gateway does not talk to by itself.
#[derive(Debug, Clone, Default)]
pub struct DashboardConfig {
    /// Coordinator gRPC endpoints (`http://host:port`); empty: no cluster panel.
    pub coordinator_endpoints: Vec<String>,
    /// config-svc REST base URLs (`http://host:port`); empty: no config panel.
    pub config_urls: Vec<String>,
    /// config-svc namespaces to list; empty: the registry's namespaces.
    pub config_namespaces: Vec<String>,
    /// TLS for `https://` coordinator endpoints and config-svc URLs (the gateway's
    /// `--client-cacert|cert|key`): the CA their certificates are checked against and the
    /// client certificate they may require.
    pub tls: Option<Arc<service_kit::tls::rustls::ClientConfig>>,
    /// Token sent to the coordinator (gRPC metadata `token`) when its auth is on; empty: none.
    pub coordinator_token: String,
    /// Bearer token sent to config-svc when its auth is on; empty: none.
    pub config_token: String,
}

/// Why a dashboard API call failed; each maps to one HTTP status in [`IntoResponse`].
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The dashboard was not told where an upstream is.
    #[error("{0}")]
    NotConfigured(String),
    /// A parameter is missing or malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The upstream could not be reached, or failed.
    #[error("cannot reach {source_name}: {message}")]
    Unreachable {
        /// Which upstream.
        source_name: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The upstream did not answer in time.
    #[error("{source_name} did not answer within {}s", CALL_TIMEOUT.as_secs())]
    Timeout {
        /// Which upstream.
        source_name: &'static str,
    },
    /// The upstream answered with an error of its own.
    #[error("{source_name}: {message}")]
    Upstream {
        /// Which upstream.
        source_name: &'static str,
        /// Its HTTP status.
        status: StatusCode,
        /// Its message.
        message: String,
    },
}

impl DashboardError {
    fn status(&self) -> StatusCode {
        match self {
            DashboardError::NotConfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
            DashboardError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DashboardError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            DashboardError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            DashboardError::Upstream { status, .. } if status.is_client_error() => *status,
            DashboardError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    fn source_name(&self) -> &'static str {
        match self {
            DashboardError::NotConfigured(_) | DashboardError::BadRequest(_) => "dashboard",
            DashboardError::Unreachable { source_name, .. }
            | DashboardError::Timeout { source_name }
            | DashboardError::Upstream { source_name, .. } => source_name,
        }
    }
}

impl IntoResponse for DashboardError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.to_string(), "source": self.source_name() });
        (self.status(), Json(body)).into_response()
    }
}

type ApiResult = Result<Json<Value>, DashboardError>;

/// The dashboard's shared state; cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

struct Inner {
    gw: Arc<Gateway>,
    registry: RegistryClient,
    cluster: Option<Cluster>,
    config: Option<ConfigRest>,
    config_namespaces: Vec<String>,
}

impl Dashboard {
    /// The dashboard of `gw`, reading the registry through `registry`. Must be called inside a
    /// Tokio runtime (channels are opened lazily). Fails on a malformed endpoint or URL.
    pub fn new(
        gw: Arc<Gateway>,
        registry: RegistryClient,
        config: DashboardConfig,
    ) -> Result<Dashboard, String> {
        let cluster = non_empty(config.coordinator_endpoints);
        let cluster = if cluster.is_empty() {
            None
        } else {
            Some(Cluster::new(
                &cluster,
                config.tls.clone(),
                &config.coordinator_token,
            )?)
        };
        let urls = non_empty(config.config_urls);
        let rest = if urls.is_empty() {
            None
        } else {
            Some(ConfigRest::new(urls, config.tls, &config.config_token)?)
        };
        Ok(Dashboard {
            inner: Arc::new(Inner {
                gw,
                registry,
                cluster,
                config: rest,
                config_namespaces: non_empty(config.config_namespaces),
            }),
        })
    }
}

fn non_empty(list: Vec<String>) -> Vec<String> {
    list.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Checks `--dashboard-config-url` values: `http://host:port` or `https://host:port` base URLs.
pub fn validate_config_url(url: &str) -> Result<(), String> {
    sources::base_url(url).map(|_| ())
}

/// The page, its assets and its JSON API.
pub fn router(dashboard: Dashboard) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/ui/api/cluster", get(cluster))
        .route("/ui/api/services", get(services))
        .route("/ui/api/routes", get(routes))
        .route("/ui/api/config", get(config_items))
        .route("/ui/api/config/history", get(config_history))
        .route("/ui/api/config/diff", get(config_diff))
        .route("/ui/api/{*rest}", get(unknown_api))
        .with_state(dashboard)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn unknown_api() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "no such dashboard API", "source": "dashboard" })),
    )
        .into_response()
}

async fn cluster(State(d): State<Dashboard>) -> ApiResult {
    let Some(cluster) = &d.inner.cluster else {
        return Err(DashboardError::NotConfigured(
            "no coordinator endpoints were given (--dashboard-coordinator-endpoints)".into(),
        ));
    };
    cluster.view().await.map(Json)
}

/// The names of the routes over each `namespace/service`.
fn routes_by_service(gw: &Gateway) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for r in &gw.table.load().routes {
        let b = &r.route.backend;
        out.entry(format!("{}/{}", b.namespace, b.service))
            .or_default()
            .push(r.route.name.clone());
    }
    out
}

async fn services(State(d): State<Dashboard>) -> ApiResult {
    let routed = routes_by_service(&d.inner.gw);
    sources::services(&d.inner.registry, &routed)
        .await
        .map(Json)
}

async fn routes(State(d): State<Dashboard>) -> Json<Value> {
    let now = now_ns();
    let table = d.inner.gw.table.load();
    let routes: Vec<Value> = table
        .routes
        .iter()
        .map(|r| {
            let pool = r.pool.load();
            let mut view = crate::admin::route_view(r, &pool, now);
            view["algorithm"] = json!(r.route.algorithm);
            view["hash_on"] = json!(r.route.hash.as_string());
            // Who owns each of RING_SAMPLES evenly spaced keys, as indices into `backends`
            // (-1: nobody), of the same pool generation.
            view["ring"] = pool
                .table
                .owners_sampled(RING_SAMPLES)
                .into_iter()
                .map(|o| o.map_or(-1, |i| i64::try_from(i).unwrap_or(-1)))
                .collect();
            view
        })
        .collect();
    Json(json!({ "source": table.source, "routes": routes }))
}

fn config_rest(d: &Dashboard) -> Result<&ConfigRest, DashboardError> {
    d.inner.config.as_ref().ok_or_else(|| {
        DashboardError::NotConfigured("no config-svc URL was given (--dashboard-config-url)".into())
    })
}

async fn config_items(State(d): State<Dashboard>) -> ApiResult {
    let rest = config_rest(&d)?;
    let namespaces = if d.inner.config_namespaces.is_empty() {
        sources::namespaces(&d.inner.registry).await?
    } else {
        d.inner.config_namespaces.clone()
    };
    let mut out = Vec::with_capacity(namespaces.len());
    for ns in namespaces {
        let page = rest.list_items(&ns).await?;
        out.push(json!({
            "namespace": ns,
            "items": page.get("items").cloned().unwrap_or_else(|| json!([])),
            "more": page.get("next_page_token").and_then(Value::as_str).is_some_and(|t| !t.is_empty()),
        }));
    }
    Ok(Json(json!({ "namespaces": out })))
}

/// `namespace`, `group` and `key` of the query, each checked as config-svc checks names.
fn item_params(q: &HashMap<String, String>) -> Result<[String; 3], DashboardError> {
    let mut out: [String; 3] = Default::default();
    for (slot, name) in out.iter_mut().zip(["namespace", "group", "key"]) {
        let value = q.get(name).ok_or_else(|| {
            DashboardError::BadRequest(format!("the {name} parameter is required"))
        })?;
        config_svc::model::validate_name(name, value)
            .map_err(|e| DashboardError::BadRequest(e.to_string()))?;
        value.clone_into(slot);
    }
    Ok(out)
}

fn version_param(q: &HashMap<String, String>, name: &str) -> Result<u64, DashboardError> {
    match q.get(name) {
        None => Ok(0),
        Some(v) if v.is_empty() => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            DashboardError::BadRequest(format!("{name}={v:?} is not a version number"))
        }),
    }
}

async fn config_history(
    State(d): State<Dashboard>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let rest = config_rest(&d)?;
    let item = item_params(&q)?;
    rest.history(&item).await.map(Json)
}

async fn config_diff(
    State(d): State<Dashboard>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let rest = config_rest(&d)?;
    let item = item_params(&q)?;
    let from = version_param(&q, "from")?;
    let to = version_param(&q, "to")?;
    rest.diff(&item, from, to).await.map(Json)
}
