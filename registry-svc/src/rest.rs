//! The REST/JSON face: the same operations as gRPC, on axum. Bodies are the domain types of
//! [`crate::model`] and [`crate::registry`] as JSON; errors are [`Error`]'s JSON answers.
//! `GET /openapi.json` serves the OpenAPI 3 document (`openapi.json` beside this file).
//!
//! Every route but `/openapi.json` passes the authentication middleware
//! (`service_kit::authn::http_middleware`) first, which answers 401 or puts the caller's
//! [`Identity`] into the request; each handler hands it to [`Registry`], which checks the
//! permission (see [`crate::registry`]; 403 when missing).
//!
//! | method | path | operation |
//! |---|---|---|
//! | POST | `/v1/instances` | register |
//! | POST | `/v1/namespaces/{ns}/services/{svc}/instances/{id}/heartbeat` | heartbeat |
//! | DELETE | `/v1/namespaces/{ns}/services/{svc}/instances/{id}` | deregister |
//! | GET | `/v1/namespaces` | list namespaces |
//! | GET | `/v1/namespaces/{ns}/services` | list services |
//! | GET | `/v1/namespaces/{ns}/services/{svc}/instances?tag=&zone=&meta.K=V&healthy_only=` | discover |
//! | GET | `/v1/namespaces/{ns}/watch?service=&after_revision=` | watch (NDJSON stream) |
//! | GET, PUT | `/v1/namespaces/{ns}/services/{svc}/options` | service options |

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};
use service_kit::authn::{self, Identity};
use tokio_stream::StreamExt;

use crate::error::{Error, Result};
use crate::model::{DiscoverFilter, Instance, InstanceRef, ServiceOptions};
use crate::registry::{Discovery, Registry};

/// The OpenAPI document of this face.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The REST routes over a shared [`Registry`].
pub fn router(registry: Arc<Registry>) -> Router {
    let auth = registry.auth().clone();
    Router::new()
        .route("/v1/instances", post(register))
        .route(
            "/v1/namespaces/{ns}/services/{svc}/instances/{id}/heartbeat",
            post(heartbeat),
        )
        .route(
            "/v1/namespaces/{ns}/services/{svc}/instances/{id}",
            delete(deregister),
        )
        .route("/v1/namespaces", get(list_namespaces))
        .route("/v1/namespaces/{ns}/services", get(list_services))
        .route(
            "/v1/namespaces/{ns}/services/{svc}/instances",
            get(discover),
        )
        .route("/v1/namespaces/{ns}/watch", get(watch))
        .route(
            "/v1/namespaces/{ns}/services/{svc}/options",
            get(get_options).put(set_options),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            authn::http_middleware::<Error>,
        ))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .with_state(registry)
}

/// A JSON body, or a 400 saying why it is not one.
fn body<T>(body: std::result::Result<Json<T>, JsonRejection>) -> Result<T> {
    body.map(|Json(v)| v)
        .map_err(|e| Error::invalid(format!("invalid JSON body: {}", e.body_text())))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> Error {
    Error::NotFound("no such route; see /openapi.json".into())
}

async fn register(
    State(r): State<Arc<Registry>>,
    Extension(who): Extension<Identity>,
    b: std::result::Result<Json<Instance>, JsonRejection>,
) -> Result<Json<Value>> {
    let (instance, revision) = r.register(&who, body(b)?).await?;
    Ok(Json(json!({ "instance": instance, "revision": revision })))
}

fn reference(ns: String, svc: String, id: String) -> Result<InstanceRef> {
    let r = InstanceRef {
        namespace: ns,
        service: svc,
        instance_id: id,
    };
    r.validate()?;
    Ok(r)
}

async fn heartbeat(
    State(r): State<Arc<Registry>>,
    Extension(who): Extension<Identity>,
    Path((ns, svc, id)): Path<(String, String, String)>,
) -> Result<Json<Value>> {
    let ttl = r.heartbeat(&who, &reference(ns, svc, id)?).await?;
    Ok(Json(json!({ "ttl_seconds": ttl })))
}

async fn deregister(
    State(r): State<Arc<Registry>>,
    Extension(who): Extension<Identity>,
    Path((ns, svc, id)): Path<(String, String, String)>,
) -> Result<Json<Value>> {
    let (existed, revision) = r.deregister(&who, &reference(ns, svc, id)?).await?;
    Ok(Json(json!({ "existed": existed, "revision": revision })))
}

async fn list_namespaces(
    State(r): State<Arc<Registry>>,
    Extension(who): Extension<Identity>,
) -> Result<Json<Value>> {
    let (namespaces, revision) = r.list_namespaces(&who).await?;
    Ok(Json(
        json!({ "namespaces": namespaces, "revision": revision }),
    ))
}

async fn list_services(
    State(r): State<Arc<Registry>>,
    Extension(who): Extension<Identity>,
    Path(ns): Path<String>,
) -> Result<Json<Value>> {
    let (services, revision) = r.list_services(&who, &ns).await?;
    Ok(Json(json!({ "services": services, "revision": revision })))
}

fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(Error::invalid(format!(
            "query parameter {name}={other:?} is not a boolean (true or false)"
        ))),
    }
}

/// `tag` (repeatable), `zone`, `meta.KEY=VALUE` (repeatable), `healthy_only`.
fn discover_filter(query: Option<&str>) -> Result<DiscoverFilter> {
    let mut filter = DiscoverFilter::default();
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "tag" => filter.tags.push(v.into_owned()),
            "zone" => filter.zone = v.into_owned(),
            "healthy_only" => filter.healthy_only = parse_bool("healthy_only", &v)?,
            other => match other.strip_prefix("meta.") {
                Some(key) if !key.is_empty() => {
                    filter.metadata.insert(key.to_owned(), v.into_owned());
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown query parameter {other:?}: use tag, zone, meta.KEY or healthy_only"
                    )));
                }
            },
        }
    }
    Ok(filter)
}

async fn discover(
    State(r): State<Arc<Registry>>,
    Extension(who): Extension<Identity>,
    Path((ns, svc)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<Discovery>> {
    let filter = discover_filter(query.as_deref())?;
    Ok(Json(r.discover(&who, &ns, &svc, &filter).await?))
}

/// `service` (optional), `after_revision` (optional). Streams one JSON object per line.
async fn watch(
    State(r): State<Arc<Registry>>,
    Extension(who): Extension<Identity>,
    Path(ns): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let mut service = None;
    let mut after = 0i64;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "service" => service = Some(v.into_owned()),
            "after_revision" => {
                after = v.parse().map_err(|_| {
                    Error::invalid(format!("after_revision {v:?} is not a whole number"))
                })?;
            }
            other => {
                return Err(Error::invalid(format!(
                    "unknown query parameter {other:?}: use service or after_revision"
                )));
            }
        }
    }
    let rx = r.watch(&who, &ns, service.as_deref(), after).await?;
    let lines = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| {
        let value = match item {
            Ok(item) => serde_json::to_value(item).unwrap_or(Value::Null),
            Err(e) => {
                json!({ "type": "error", "error": { "code": e.code(), "message": e.to_string() } })
            }
        };
        let mut line = value.to_string();
        line.push('\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

async fn get_options(
    State(r): State<Arc<Registry>>,
    Extension(who): Extension<Identity>,
    Path((ns, svc)): Path<(String, String)>,
) -> Result<Json<ServiceOptions>> {
    Ok(Json(r.options(&who, &ns, &svc).await?))
}

async fn set_options(
    State(r): State<Arc<Registry>>,
    Extension(who): Extension<Identity>,
    Path((ns, svc)): Path<(String, String)>,
    b: std::result::Result<Json<ServiceOptions>, JsonRejection>,
) -> Result<Json<ServiceOptions>> {
    let mut options = body(b)?;
    options.namespace = ns;
    options.service = svc;
    Ok(Json(r.set_options(&who, options).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discover_query_takes_repeated_tags_and_metadata() {
        let f = discover_filter(Some("tag=a&tag=b&zone=z1&meta.team=x&healthy_only=true"))
            .expect("valid");
        assert_eq!(f.tags, vec!["a", "b"]);
        assert_eq!(f.zone, "z1");
        assert_eq!(f.metadata.get("team").map(String::as_str), Some("x"));
        assert!(f.healthy_only);
    }

    #[test]
    fn discover_query_rejects_unknown_parameters_and_bad_booleans() {
        assert!(discover_filter(Some("colour=red")).is_err());
        assert!(discover_filter(Some("healthy_only=maybe")).is_err());
    }

    #[test]
    fn openapi_document_is_valid_json_naming_every_path() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.0.3");
        for path in [
            "/v1/instances",
            "/v1/namespaces",
            "/v1/namespaces/{ns}/services",
            "/v1/namespaces/{ns}/services/{svc}/instances",
            "/v1/namespaces/{ns}/services/{svc}/instances/{id}",
            "/v1/namespaces/{ns}/services/{svc}/instances/{id}/heartbeat",
            "/v1/namespaces/{ns}/watch",
            "/v1/namespaces/{ns}/services/{svc}/options",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
    }

    #[test]
    fn openapi_document_names_the_bearer_scheme_and_401_on_every_operation() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let ops = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, ops)| {
                let ops = ops.as_object().expect("operations");
                ops.iter()
                    .map(move |(method, op)| (format!("{method} {path}"), op))
            });
        for (name, op) in ops {
            let responses = &op["responses"];
            assert!(responses["401"].is_object(), "{name}: no 401");
        }
    }
}
