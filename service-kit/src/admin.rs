//! The admin HTTP server every process exposes.
//!
//! | route      | answer                                                        |
//! |------------|---------------------------------------------------------------|
//! | `/healthz` | 200 `{"status":"ok"}` while the process can answer at all      |
//! | `/readyz`  | 200 `{"status":"ready"}` or 503 `{"status":"not ready"}`       |
//! | `/metrics` | OpenMetrics text of the [`Metrics`] registry                  |
//! | other      | 404 `{"error":"not found"}` (405 for a wrong method)          |
//!
//! Only `GET` (and `HEAD`) are routed. The server counts its own requests in
//! `admin_http_requests_total{path,code}`, with every unknown path counted as
//! `path="other"` so that scanners cannot grow the label set.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::{Mutex, MutexGuard};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The content type of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long [`serve`] waits for in-flight requests once shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The readiness flag behind `/readyz`. Starts not ready.
///
/// Cheap to clone; all clones share one flag. A service sets it once it can
/// do its job (listening, caught up) and may clear it again, e.g. while
/// draining.
#[derive(Debug, Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// A flag that starts not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets readiness; `/readyz` reflects it on the next request.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Whether the service is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Labels of the admin request counter: `path` and `code`.
type RequestLabels = [(&'static str, String); 2];

/// A shared Prometheus registry, encoded by `/metrics`.
///
/// Cheap to clone; all clones share one registry. A service registers its
/// own metrics once at startup through [`Metrics::registry`]; the metric
/// handles themselves are lock-free, so updating them never touches the lock.
/// A `parking_lot` mutex, not an async one, because the lock is only held for
/// registration and encoding, which never await.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    admin_requests: Family<RequestLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry holding only the admin server's own request counter.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let admin_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "admin_http_requests",
            "Requests served by the admin HTTP server",
            admin_requests.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            admin_requests,
        }
    }

    /// Locks the registry so the caller can register metrics:
    /// `metrics.registry().register("name", "help", counter.clone())`.
    ///
    /// Do not hold the guard across an `.await`.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock()
    }

    /// The registry in OpenMetrics text format, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            // Writing to a String cannot fail; only a broken metric can.
            tracing::error!(error = %err, "encoding metrics failed");
        }
        out
    }
}

/// The admin routes (see the module docs), with request counting.
pub fn router(health: Health, metrics: Metrics) -> Router {
    let counter = metrics.admin_requests.clone();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz).with_state(health))
        .route("/metrics", get(metrics_text).with_state(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let counter = counter.clone();
            async move {
                let path = known_path(req.uri().path());
                let response = next.run(req).await;
                counter
                    .get_or_create(&[
                        ("path", path.to_owned()),
                        ("code", response.status().as_str().to_owned()),
                    ])
                    .inc();
                response
            }
        }))
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets
/// in-flight requests finish for at most [`SHUTDOWN_GRACE`].
///
/// Returns an error only if the listener fails.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let grace_expired = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result,
        () = grace_expired => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "admin server: requests still in flight after the grace period; dropping them");
            Ok(())
        }
    }
}

fn known_path(path: &str) -> &'static str {
    match path {
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(health): State<Health>) -> Response {
    if health.is_ready() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready" })),
        )
            .into_response()
    }
}

async fn metrics_text(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        metrics.encode(),
    )
}

async fn not_found() -> (StatusCode, Json<serde_json::Value>) {
    (StatusCode::NOT_FOUND, Json(json!({ "error": "not found" })))
}

async fn method_not_allowed() -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({ "error": "method not allowed" })),
    )
}
