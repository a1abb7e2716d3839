//! The HTTP and gRPC faces, on one port.
//!
//! | request | answer |
//! |---|---|
//! | `GET /healthz` | 200 `{"status":"ok"}` (what the registry's health check probes) |
//! | any other HTTP request | 200 JSON: `instance`, `method`, `path` (the key the gateway hashes), `greeting`, `settings_version`, `settings`, `served` |
//! | gRPC `demo.v1.Demo/Hello` | `instance_id`, `key`, `config_version`, `greeting`; a key over 1 KiB is `INVALID_ARGUMENT` |
//! | gRPC `grpc.health.v1.Health/Check` | `SERVING` |
//!
//! Every answer carries the header `x-demo-instance`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::RwLock;
use proto::config_v1 as cpb;
use serde_json::{Value, json};
use service_kit::tls::rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::SHUTDOWN_GRACE;
use crate::metrics::DemoMetrics;
use crate::pb_demo::demo_server::{Demo, DemoServer};
use crate::pb_demo::{HelloReply, HelloRequest};
use crate::settings::Settings;

/// The longest key `Hello` accepts, in bytes.
pub const MAX_KEY: usize = 1024;

/// What the handlers share; cheap to clone.
#[derive(Clone)]
pub struct State {
    inner: Arc<Inner>,
}

struct Inner {
    instance_id: String,
    /// Swapped whole on each accepted version; a std-style lock held only to clone the `Arc`.
    settings: RwLock<Arc<Settings>>,
    served: AtomicU64,
    metrics: DemoMetrics,
}

impl State {
    /// A state with the default settings.
    pub fn new(instance_id: String, metrics: DemoMetrics) -> State {
        State {
            inner: Arc::new(Inner {
                instance_id,
                settings: RwLock::new(Arc::new(Settings::default())),
                served: AtomicU64::new(0),
                metrics,
            }),
        }
    }

    /// The instance id.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// The settings in use.
    pub fn settings(&self) -> Arc<Settings> {
        self.inner.settings.read().clone()
    }

    /// Takes `version` into use if it is newer than the one in use and valid; otherwise keeps
    /// the current settings (logging and counting a refusal).
    pub fn offer_settings(&self, version: &cpb::Version) {
        let current = self.settings().version;
        if version.number <= current {
            return;
        }
        match Settings::parse(version.number, &version.content) {
            Ok(settings) => {
                tracing::info!(
                    version = settings.version,
                    previous = current,
                    "settings updated"
                );
                let m = &self.inner.metrics;
                m.settings_version
                    .set(i64::try_from(settings.version).unwrap_or(i64::MAX));
                m.settings_updates.inc();
                *self.inner.settings.write() = Arc::new(settings);
            }
            Err(err) => {
                tracing::warn!(error = %err, in_use = current, "settings refused; keeping the ones in use");
                self.inner.metrics.settings_rejected.inc();
            }
        }
    }

    fn count(&self, face: &'static str, code: impl ToString) {
        self.inner
            .metrics
            .requests
            .get_or_create(&[("face", face.to_string()), ("code", code.to_string())])
            .inc();
    }
}

/// The HTTP + gRPC router.
pub fn router(state: State) -> Router {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Nothing here can become unhealthy while the process answers: serving from the start.
    tokio::spawn(async move {
        health_reporter.set_serving::<DemoServer<DemoGrpc>>().await;
    });
    let grpc = tonic::service::Routes::new(DemoServer::new(DemoGrpc {
        state: state.clone(),
    }))
    .add_service(health_service)
    .into_axum_router();

    let http_state = state.clone();
    let instance = HeaderValue::from_str(state.instance_id())
        .unwrap_or_else(|_| HeaderValue::from_static("invalid-instance-id"));
    grpc.route(
        "/healthz",
        get(|| async { Json(json!({ "status": "ok" })) }),
    )
    .fallback(move |req: Request| answer(http_state.clone(), req))
    .layer(middleware::from_fn(move |req: Request, next: Next| {
        trace_request(req, next, instance.clone())
    }))
}

/// A span per request; the instance header on every answer.
async fn trace_request(req: Request, next: Next, instance: HeaderValue) -> Response {
    let grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        face = if grpc { "grpc" } else { "http" },
        status = tracing::field::Empty,
    );
    async move {
        let mut response = next.run(req).await;
        tracing::Span::current().record("status", response.status().as_u16());
        tracing::debug!("answered");
        response.headers_mut().insert("x-demo-instance", instance);
        response
    }
    .instrument(span)
    .await
}

async fn answer(state: State, req: Request) -> Response {
    let served = state.inner.served.fetch_add(1, Ordering::Relaxed) + 1;
    let settings = state.settings();
    state.count("http", StatusCode::OK.as_u16());
    let path = req.uri().path().to_string();
    let body = json!({
        "instance": state.instance_id(),
        "method": req.method().as_str(),
        "path": path,
        "greeting": settings.greeting,
        "settings_version": settings.version,
        "settings": Value::Object(settings.document.clone()),
        "served": served,
    });
    (StatusCode::OK, Json(body)).into_response()
}

/// `demo.v1.Demo`.
struct DemoGrpc {
    state: State,
}

#[tonic::async_trait]
impl Demo for DemoGrpc {
    async fn hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        let key = request.into_inner().key;
        if key.len() > MAX_KEY {
            self.state
                .count("grpc", tonic::Code::InvalidArgument as i32);
            return Err(tonic::Status::invalid_argument(format!(
                "key is {} bytes; at most {MAX_KEY} are accepted",
                key.len()
            )));
        }
        self.state.inner.served.fetch_add(1, Ordering::Relaxed);
        self.state.count("grpc", tonic::Code::Ok as i32);
        let settings = self.state.settings();
        Ok(tonic::Response::new(HelloReply {
            instance_id: self.state.instance_id().to_string(),
            key,
            config_version: settings.version,
            greeting: settings.greeting.clone(),
        }))
    }
}

/// Serves [`router`] on `listener` until `stop`, then lets in-flight requests finish for at
/// most [`SHUTDOWN_GRACE`]: HTTP/1.1 and h2c, or with `tls` (service-kit's `TlsIncoming`)
/// HTTP/1.1 and HTTP/2 over TLS as the client's ALPN asks.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    state: State,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let server =
        service_kit::tls::serve_axum(router(state), listener, tls, stop.clone().cancelled_owned());
    let grace_expired = async {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result,
        () = grace_expired => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still in flight after the grace period; dropping them");
            Ok(())
        }
    }
}
