//! The REST/JSON face: the same operations as gRPC, on axum. Bodies are the domain types of
//! [`crate::store`] and [`crate::model`] as JSON; errors are [`Error`]'s JSON answers.
//! `GET /openapi.json` serves the OpenAPI 3 document (`openapi.json` beside this file).
//!
//! Every route but `/openapi.json` passes the authentication middleware
//! (`service_kit::authn::http_middleware`) first, which answers 401 or puts the caller's
//! [`Identity`] into the request; each handler hands it to [`Store`] or [`Hub`], which check
//! the permission (see [`crate::store`]; 403 when missing).
//!
//! `I` below is `/v1/namespaces/{ns}/groups/{group}/items/{key}`.
//!
//! | method | path | operation |
//! |---|---|---|
//! | GET | `/v1/namespaces/{ns}/items?group=&include_deleted=&page_size=&page_token=` | list |
//! | POST | `I/versions` | publish (body: content, format, author, message, expected_version, schema, retention, rollout) |
//! | GET | `I?client_id=&label.K=V` | the version meant for the client, with the item |
//! | GET | `I/raw?client_id=&label.K=V&version=` | just the content, with its format's content type |
//! | GET | `I/versions?page_size=&page_token=&include_content=` | history, newest first |
//! | GET | `I/versions/{n}` | one version |
//! | GET | `I/diff?from=&to=` | diff |
//! | POST | `I/rollback` | rollback (body: version, author, message, expected_version) |
//! | DELETE | `I?expected_version=` | delete (history stays) |
//! | POST | `I/purge` | purge a deleted item's history |
//! | PUT | `I/options` | schema and retention (body: schema, retention) |
//! | POST | `I/rollout/promote`, `I/rollout/abort` | end a rollout |
//! | POST | `/v1/validate` | check content (body: format, content, schema) |
//! | GET | `/v1/namespaces/{ns}/watch?group=&item=G/K&known=G/K:N&client_id=&label.K=V` | watch (NDJSON stream) |

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};
use service_kit::authn::{self, Identity};
use tokio_stream::StreamExt;

use crate::error::{Error, Result};
use crate::model::{ClientInfo, Format, ItemRef};
use crate::store::{PublishInput, Store, Version};
use crate::watch::{Hub, Scope, WatchItem};

/// The OpenAPI document of this face.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Rest {
    store: Arc<Store>,
    hub: Arc<Hub>,
}

/// The REST routes over a shared [`Store`] and [`Hub`].
pub fn router(store: Arc<Store>, hub: Arc<Hub>) -> Router {
    const I: &str = "/v1/namespaces/{ns}/groups/{group}/items/{key}";
    let auth = store.auth().clone();
    Router::new()
        .route("/v1/validate", post(validate))
        .route("/v1/namespaces/{ns}/items", get(list))
        .route("/v1/namespaces/{ns}/watch", get(watch))
        .route(I, get(get_current).delete(delete))
        .route(&format!("{I}/raw"), get(raw))
        .route(&format!("{I}/versions"), get(history).post(publish))
        .route(&format!("{I}/versions/{{n}}"), get(get_version))
        .route(&format!("{I}/diff"), get(diff))
        .route(&format!("{I}/rollback"), post(rollback))
        .route(&format!("{I}/purge"), post(purge))
        .route(&format!("{I}/options"), put(set_options))
        .route(&format!("{I}/rollout/promote"), post(promote))
        .route(&format!("{I}/rollout/abort"), post(abort))
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            authn::http_middleware::<Error>,
        ))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .with_state(Rest { store, hub })
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

fn item(ns: String, group: String, key: String) -> Result<ItemRef> {
    let r = ItemRef::new(ns, group, key);
    r.validate()?;
    Ok(r)
}

/// The query's pairs.
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
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

fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| {
        Error::invalid(format!(
            "query parameter {name}={value:?} is not a whole number in range"
        ))
    })
}

fn unknown(name: &str, allowed: &str) -> Error {
    Error::invalid(format!("unknown query parameter {name:?}: use {allowed}"))
}

/// Reads `client_id` and `label.K=V` from a query pair; false if it is neither.
fn client_param(client: &mut ClientInfo, k: &str, v: &str) -> bool {
    if k == "client_id" {
        client.id = v.to_owned();
        true
    } else if let Some(label) = k.strip_prefix("label.").filter(|l| !l.is_empty()) {
        client.labels.insert(label.to_owned(), v.to_owned());
        true
    } else {
        false
    }
}

async fn list(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path(ns): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let (mut group, mut include_deleted, mut page_size, mut page_token) =
        (None, false, 0u32, String::new());
    for (k, v) in query_pairs(q.as_deref()) {
        match k.as_str() {
            "group" => group = Some(v),
            "include_deleted" => include_deleted = parse_bool(&k, &v)?,
            "page_size" => page_size = parse_num(&k, &v)?,
            "page_token" => page_token = v,
            other => {
                return Err(unknown(
                    other,
                    "group, include_deleted, page_size, page_token",
                ));
            }
        }
    }
    let page = s
        .store
        .list(
            &who,
            &ns,
            group.as_deref(),
            include_deleted,
            page_size,
            &page_token,
        )
        .await?;
    Ok(Json(json!(page)))
}

async fn publish(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
    b: std::result::Result<Json<PublishInput>, JsonRejection>,
) -> Result<Json<Value>> {
    let mut input = body(b)?;
    input.item = Some(item(ns, group, key)?);
    Ok(Json(json!(s.store.publish(&who, input).await?)))
}

fn client_and_version(q: Option<&str>) -> Result<(ClientInfo, u64)> {
    let mut client = ClientInfo::default();
    let mut version = 0;
    for (k, v) in query_pairs(q) {
        if client_param(&mut client, &k, &v) {
            continue;
        }
        match k.as_str() {
            "version" => version = parse_num(&k, &v)?,
            other => return Err(unknown(other, "client_id, label.NAME, version")),
        }
    }
    Ok((client, version))
}

async fn get_current(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    let (client, version) = client_and_version(q.as_deref())?;
    let (v, info) = s.store.get(&who, &item, version, &client).await?;
    Ok(Json(
        json!({ "version": Version::new(item, &v, true), "item": info }),
    ))
}

async fn raw(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let item = item(ns, group, key)?;
    let (client, version) = client_and_version(q.as_deref())?;
    let (v, _) = s.store.get(&who, &item, version, &client).await?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                v.header.format.content_type().to_owned(),
            ),
            (header::ETAG, format!("\"{}\"", v.header.checksum)),
            (
                header::HeaderName::from_static("x-config-version"),
                v.header.number.to_string(),
            ),
        ],
        v.content.clone(),
    )
        .into_response())
}

async fn get_version(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key, n)): Path<(String, String, String, String)>,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    let n: u64 = n
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::invalid(format!("version {n:?} is not a number of 1 or more")))?;
    let (v, info) = s.store.get(&who, &item, n, &ClientInfo::default()).await?;
    Ok(Json(
        json!({ "version": Version::new(item, &v, true), "item": info }),
    ))
}

async fn history(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    let (mut page_size, mut page_token, mut include_content) = (0u32, String::new(), false);
    for (k, v) in query_pairs(q.as_deref()) {
        match k.as_str() {
            "page_size" => page_size = parse_num(&k, &v)?,
            "page_token" => page_token = v,
            "include_content" => include_content = parse_bool(&k, &v)?,
            other => return Err(unknown(other, "page_size, page_token, include_content")),
        }
    }
    let page = s
        .store
        .history(&who, &item, page_size, &page_token, include_content)
        .await?;
    Ok(Json(json!(page)))
}

async fn diff(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    let (mut from, mut to) = (0u64, 0u64);
    for (k, v) in query_pairs(q.as_deref()) {
        match k.as_str() {
            "from" => from = parse_num(&k, &v)?,
            "to" => to = parse_num(&k, &v)?,
            other => return Err(unknown(other, "from, to")),
        }
    }
    Ok(Json(json!(s.store.diff(&who, &item, from, to).await?)))
}

#[derive(Deserialize)]
struct RollbackBody {
    version: u64,
    #[serde(default)]
    author: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    expected_version: Option<u64>,
}

async fn rollback(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
    b: std::result::Result<Json<RollbackBody>, JsonRejection>,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    let b = body(b)?;
    let p = s
        .store
        .rollback(
            &who,
            item,
            b.version,
            b.author,
            b.message,
            b.expected_version,
        )
        .await?;
    Ok(Json(json!(p)))
}

async fn delete(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    let mut expected = None;
    for (k, v) in query_pairs(q.as_deref()) {
        match k.as_str() {
            "expected_version" => expected = Some(parse_num(&k, &v)?),
            other => return Err(unknown(other, "expected_version")),
        }
    }
    let (deleted, info, revision) = s.store.delete(&who, &item, expected).await?;
    Ok(Json(
        json!({ "deleted": deleted, "item": info, "revision": revision }),
    ))
}

async fn purge(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    let revision = s.store.purge(&who, &item).await?;
    Ok(Json(json!({ "revision": revision })))
}

#[derive(Deserialize)]
struct OptionsBody {
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    retention: Option<u32>,
}

async fn set_options(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
    b: std::result::Result<Json<OptionsBody>, JsonRejection>,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    let b = body(b)?;
    Ok(Json(json!(
        s.store
            .set_options(&who, &item, b.schema, b.retention)
            .await?
    )))
}

async fn promote(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    Ok(Json(json!(s.store.promote(&who, &item).await?)))
}

async fn abort(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path((ns, group, key)): Path<(String, String, String)>,
) -> Result<Json<Value>> {
    let item = item(ns, group, key)?;
    Ok(Json(json!(s.store.abort(&who, &item).await?)))
}

#[derive(Deserialize)]
struct ValidateBody {
    format: Format,
    content: String,
    #[serde(default)]
    schema: Option<String>,
}

async fn validate(
    State(s): State<Rest>,
    b: std::result::Result<Json<ValidateBody>, JsonRejection>,
) -> Result<Json<Value>> {
    let b = body(b)?;
    let problems = s
        .store
        .validate(b.format, &b.content, b.schema.as_deref())?;
    Ok(Json(
        json!({ "valid": problems.is_empty(), "problems": problems }),
    ))
}

/// `group`, `item=G/K` (repeatable), `known=G/K:N` (repeatable), `client_id`, `label.K=V`.
fn watch_params(ns: &str, q: Option<&str>) -> Result<(Scope, HashMap<ItemRef, u64>, ClientInfo)> {
    let mut group = None;
    let mut items = BTreeSet::new();
    let mut known = HashMap::new();
    let mut client = ClientInfo::default();
    let split = |v: &str| -> Result<ItemRef> {
        let (g, k) = v
            .split_once('/')
            .ok_or_else(|| Error::invalid(format!("{v:?} is not GROUP/KEY")))?;
        let r = ItemRef::new(ns, g, k);
        r.validate()?;
        Ok(r)
    };
    for (k, v) in query_pairs(q) {
        if client_param(&mut client, &k, &v) {
            continue;
        }
        match k.as_str() {
            "group" => group = Some(v),
            "item" => {
                items.insert(split(&v)?);
            }
            "known" => {
                let (item, n) = v.rsplit_once(':').ok_or_else(|| {
                    Error::invalid(format!("known={v:?} is not GROUP/KEY:VERSION"))
                })?;
                known.insert(split(item)?, parse_num::<u64>("known", n)?);
            }
            other => {
                return Err(unknown(other, "group, item, known, client_id, label.NAME"));
            }
        }
    }
    let scope = if items.is_empty() {
        Scope::Prefix {
            namespace: ns.to_owned(),
            group,
        }
    } else if group.is_some() {
        return Err(Error::invalid("give either item or group, not both"));
    } else {
        Scope::Items(items)
    };
    Ok((scope, known, client))
}

/// One JSON line of the REST watch stream.
pub fn watch_item_json(item: Result<WatchItem>) -> Value {
    match item {
        Ok(WatchItem::Update {
            item,
            version,
            reason,
        }) => json!({
            "type": "update",
            "reason": reason,
            "version": Version::new(item, &version, true),
        }),
        Ok(WatchItem::Deleted { item }) => json!({ "type": "deleted", "item": item }),
        Ok(WatchItem::Synced { revision }) => json!({ "type": "synced", "revision": revision }),
        Err(e) => {
            let mut v = e.to_json();
            v["type"] = json!("error");
            v
        }
    }
}

async fn watch(
    State(s): State<Rest>,
    Extension(who): Extension<Identity>,
    Path(ns): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let (scope, known, client) = watch_params(&ns, q.as_deref())?;
    let rx = s.hub.watch(&who, scope, known, client).await?;
    let lines = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| {
        let mut line = watch_item_json(item).to_string();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_query_reads_items_known_versions_and_labels() {
        let (scope, known, client) = watch_params(
            "prod",
            Some("item=app/db.yaml&item=app/x&known=app/db.yaml:3&client_id=c1&label.zone=a"),
        )
        .expect("valid");
        let db = ItemRef::new("prod", "app", "db.yaml");
        assert!(matches!(&scope, Scope::Items(i) if i.len() == 2 && i.contains(&db)));
        assert_eq!(known.get(&db), Some(&3));
        assert_eq!(client.id, "c1");
        assert_eq!(client.labels.get("zone").map(String::as_str), Some("a"));
    }

    #[test]
    fn watch_query_defaults_to_the_namespace_prefix_and_rejects_unknowns() {
        let (scope, _, _) = watch_params("prod", Some("group=app")).expect("valid");
        assert_eq!(
            scope,
            Scope::Prefix {
                namespace: "prod".into(),
                group: Some("app".into())
            }
        );
        assert!(watch_params("prod", Some("colour=red")).is_err());
        assert!(watch_params("prod", Some("known=app/x")).is_err());
        assert!(watch_params("prod", Some("item=nokey")).is_err());
    }

    #[test]
    fn openapi_document_is_valid_json_naming_every_path() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.0.3");
        let i = "/v1/namespaces/{ns}/groups/{group}/items/{key}";
        for path in [
            "/v1/validate".to_owned(),
            "/v1/namespaces/{ns}/items".to_owned(),
            "/v1/namespaces/{ns}/watch".to_owned(),
            i.to_owned(),
            format!("{i}/raw"),
            format!("{i}/versions"),
            format!("{i}/versions/{{n}}"),
            format!("{i}/diff"),
            format!("{i}/rollback"),
            format!("{i}/purge"),
            format!("{i}/options"),
            format!("{i}/rollout/promote"),
            format!("{i}/rollout/abort"),
        ] {
            assert!(doc["paths"][&path].is_object(), "{path} missing");
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
