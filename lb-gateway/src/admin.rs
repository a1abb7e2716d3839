//! The admin JSON API, served beside `/healthz`, `/readyz` and `/metrics`.
//!
//! | route | answer |
//! |---|---|
//! | `GET /admin/routes` | the gateway settings and the routes as loaded (defaults filled in) |
//! | `GET /admin/backends` | per route: the registry watch's state, and each backend with its registry health, ejection, in-flight load, requests, share of the key space; draining backends |
//! | `GET /admin/lookup?route=R&key=K` | where key `K` goes on route `R`: its owner, its order of preference, and the pick under the current loads |
//! | `GET /admin/table?route=R` | the ring or Maglev table: size, each member's share; `&full=true` lists the ring's points |
//!
//! `key` is the raw value the route hashes: the header, cookie or query value, the path (or
//! path and query), or the client IP address as text.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::hash::{Table, hash_key};
use crate::pool::{LiveLoads, Pool, RouteState};
use crate::proxy::Gateway;
use crate::resilience::now_ns;
use crate::routes::HashOn;

/// The admin API routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/admin/routes", get(routes))
        .route("/admin/backends", get(backends))
        .route("/admin/lookup", get(lookup))
        .route("/admin/table", get(table))
        .with_state(gw)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn find(gw: &Gateway, name: Option<&String>) -> Result<Arc<RouteState>, (StatusCode, String)> {
    let Some(name) = name else {
        return Err((
            StatusCode::BAD_REQUEST,
            "the route parameter is required".into(),
        ));
    };
    gw.table
        .load()
        .routes
        .iter()
        .find(|r| &r.route.name == name)
        .cloned()
        .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no route named {name:?}")))
}

async fn routes(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let table = gw.table.load();
    let routes: Vec<&crate::routes::Route> = table.routes.iter().map(|r| &r.route).collect();
    Json(json!({ "source": table.source, "gateway": table.settings, "routes": routes }))
}

fn ms_until(until: u64, now: u64) -> u64 {
    until.saturating_sub(now) / 1_000_000
}

async fn backends(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let now = now_ns();
    let table = gw.table.load();
    let out: Vec<Value> = table
        .routes
        .iter()
        .map(|r| route_view(r, &r.pool.load(), now))
        .collect();
    Json(json!({ "routes": out }))
}

/// One route's live state as `/admin/backends` shows it (the dashboard adds its ring): the
/// registry watch's state, each backend's registry health, ejection, load and share of the
/// key space, and the draining backends. `pool` is one generation of `r`'s backend set, so a
/// caller can add more of that same generation.
pub fn route_view(r: &RouteState, pool: &Pool, now: u64) -> Value {
    r.prune_draining();
    let shares = pool.table.shares();
    let members: Vec<Value> = pool
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let b = &m.backend;
            json!({
                "id": b.id,
                "instance_id": m.instance_id,
                "zone": m.zone,
                "weight": m.weight,
                "registry_health": if m.healthy { "healthy" } else { "unhealthy" },
                "ejected": b.outlier.is_ejected(now),
                "ejected_for_ms": ms_until(b.outlier.ejected_until(), now),
                "ejections": b.outlier.total_ejections.load(std::sync::atomic::Ordering::Relaxed),
                "in_flight": b.in_flight(),
                "requests": b.metrics.total(),
                "idle_connections": b.conns.idle(),
                "tls_server_name": b.conns.tls_server_name(),
                "share": shares.get(i).copied().unwrap_or(0.0),
            })
        })
        .collect();
    let draining: Vec<Value> = r
        .draining
        .lock()
        .iter()
        .map(|b| json!({ "id": b.id, "in_flight": b.in_flight() }))
        .collect();
    json!({
        "route": r.route.name,
        "service": format!("{}/{}", r.route.backend.namespace, r.route.backend.service),
        "registry": *r.sync.lock(),
        "revision": pool.revision,
        "generation": r.generation.load(std::sync::atomic::Ordering::Relaxed),
        "panic_mode": pool.panic,
        "in_flight": r.metrics.in_flight.get(),
        "backends": members,
        "draining": draining,
    })
}

async fn lookup(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let r = match find(&gw, q.get("route")) {
        Ok(r) => r,
        Err((status, message)) => return error(status, message),
    };
    let Some(key) = q.get("key") else {
        return error(
            StatusCode::BAD_REQUEST,
            "the key parameter is required".into(),
        );
    };
    let hash = match &r.route.hash {
        HashOn::ClientIp => match key.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => hash_key(&ip.octets()),
            Ok(std::net::IpAddr::V6(ip)) => hash_key(&ip.octets()),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "route {:?} hashes the client IP; {key:?} is not one",
                        r.route.name
                    ),
                );
            }
        },
        _ => hash_key(key.as_bytes()),
    };
    let pool = r.pool.load();
    let ids: Vec<&str> = pool
        .table
        .walk(hash)
        .map(|i| pool.members[i].backend.id.as_str())
        .collect();
    let view = LiveLoads::new(&pool, &r, now_ns(), &[]);
    let pick = view.pick(Some(hash));
    Json(json!({
        "route": r.route.name,
        "key": key,
        "hash": format!("{hash:016x}"),
        "hash_on": r.route.hash.as_string(),
        "owner": ids.first(),
        "order": ids,
        "pick": pick.map(|c| pool.members[c.member].backend.id.clone()),
        "spilled": pick.is_some_and(|c| c.spilled),
        "revision": pool.revision,
    }))
    .into_response()
}

async fn table(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let r = match find(&gw, q.get("route")) {
        Ok(r) => r,
        Err((status, message)) => return error(status, message),
    };
    let pool = r.pool.load();
    let shares = pool.table.shares();
    let members: Vec<Value> = pool
        .members
        .iter()
        .zip(&shares)
        .map(|(m, s)| json!({ "id": m.backend.id, "weight": m.weight, "share": s }))
        .collect();
    let full = q.get("full").is_some_and(|v| v == "true" || v == "1");
    let mut out = json!({
        "route": r.route.name,
        "revision": pool.revision,
        "members": members,
    });
    match &pool.table {
        Table::Ring(ring) => {
            out["algorithm"] = json!("ring");
            out["points"] = json!(ring.points().len());
            if full {
                out["ring"] = ring
                    .points()
                    .iter()
                    .map(|(p, m)| {
                        json!([format!("{p:016x}"), pool.members[*m as usize].backend.id])
                    })
                    .collect();
            }
        }
        Table::Maglev(m) => {
            out["algorithm"] = json!("maglev");
            out["table_size"] = json!(m.slots().len());
        }
    }
    Json(out).into_response()
}
