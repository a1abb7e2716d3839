//! `ring [route [key]]`: lb-gateway's view of its routes, from its admin JSON API.
//!
//! - no route: every route with its service, registry watch state and backend count
//!   (`/admin/backends`);
//! - a route: its table (ring or Maglev) and each member's share of the key space
//!   (`/admin/table`);
//! - a route and a key: where the key goes and why (`/admin/lookup`, with `/admin/backends`
//!   for the state of the backends involved): its hash, the owner of that point, the fixed
//!   order of preference, and the backend picked under the current loads.

use serde_json::{Value, json};

use crate::error::Result;
use crate::http::Http;
use crate::output::{Table, emit};
use crate::{Ctx, Done};

const SERVICE: &str = "lb-gateway";

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map(|f| format!("{:.1}%", f * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Dispatches on how much was given.
pub async fn run(ctx: &Ctx, route: Option<String>, key: Option<String>) -> Result<Done> {
    let http = Http::new(ctx.global.timeout, ctx.tls.clone());
    let admin = ctx.global.gateway_admin.clone();
    match (route, key) {
        (None, _) => routes(ctx, &http, &admin).await,
        (Some(route), None) => table(ctx, &http, &admin, &route).await,
        (Some(route), Some(key)) => lookup(ctx, &http, &admin, &route, &key).await,
    }
}

async fn routes(ctx: &Ctx, http: &Http, admin: &str) -> Result<Done> {
    let json = http.get_json(SERVICE, admin, "/admin/backends").await?;
    emit(ctx.global.output, &json, || {
        let mut t = Table::new(&["ROUTE", "SERVICE", "BACKENDS", "REVISION", "REGISTRY"]);
        for r in json["routes"].as_array().into_iter().flatten() {
            t.row(vec![
                s(&r["route"]),
                s(&r["service"]),
                r["backends"].as_array().map_or(0, Vec::len).to_string(),
                s(&r["revision"]),
                s(&r["registry"]),
            ]);
        }
        if t.is_empty() {
            "the gateway has no routes".into()
        } else {
            t.to_string()
        }
    });
    Ok(Done::Ok)
}

async fn table(ctx: &Ctx, http: &Http, admin: &str, route: &str) -> Result<Done> {
    let json = http
        .get_json(
            SERVICE,
            admin,
            &format!("/admin/table?route={}", encode(route)),
        )
        .await?;
    emit(ctx.global.output, &json, || {
        let size = match json["algorithm"].as_str() {
            Some("maglev") => format!("{} slots", s(&json["table_size"])),
            _ => format!("{} points", s(&json["points"])),
        };
        let mut text = format!(
            "route {} ({} table, {size}, registry revision {})\n",
            route,
            s(&json["algorithm"]),
            s(&json["revision"])
        );
        let mut t = Table::new(&["BACKEND", "WEIGHT", "SHARE"]);
        for m in json["members"].as_array().into_iter().flatten() {
            t.row(vec![s(&m["id"]), s(&m["weight"]), pct(&m["share"])]);
        }
        if t.is_empty() {
            text.push_str("no live backends\n");
        } else {
            text.push_str(&t.to_string());
        }
        text
    });
    Ok(Done::Ok)
}

/// Why `pick` got the key, in words, given the owner and the backends' state.
fn explain(lookup: &Value, backends: Option<&Value>) -> String {
    let owner = lookup["owner"].as_str();
    let pick = lookup["pick"].as_str();
    let state = |id: &str| -> Option<&Value> {
        backends?["backends"]
            .as_array()?
            .iter()
            .find(|b| b["id"].as_str() == Some(id))
    };
    match (owner, pick) {
        (None, _) => "the route has no live backends: requests get 503".into(),
        (Some(_), None) => {
            "every backend is ejected, open-circuited or over its load bound: requests get 503"
                .into()
        }
        (Some(o), Some(p)) if o == p => format!(
            "the key's hash {} falls to {o} in the {} table, and {o} is healthy and under its load bound (1 + ε) × mean, so it takes the key",
            s(&lookup["hash"]),
            lookup["hash_on"].as_str().unwrap_or("route's")
        ),
        (Some(o), Some(p)) => {
            let mut why = Vec::new();
            if let Some(b) = state(o) {
                if b["ejected"].as_bool() == Some(true) {
                    why.push(format!("ejected for {} ms more", s(&b["ejected_for_ms"])));
                }
                if b["registry_health"].as_str() == Some("unhealthy") {
                    why.push("unhealthy in the registry".into());
                }
                why.push(format!("{} requests in flight", s(&b["in_flight"])));
            }
            format!(
                "the key's owner {o} is passed over ({}), so the key walks its order of preference to {p}{}",
                if why.is_empty() {
                    "over its load bound".into()
                } else {
                    why.join(", ")
                },
                if lookup["spilled"].as_bool() == Some(true) {
                    " (spilled: over the bounded-load limit)"
                } else {
                    ""
                }
            )
        }
    }
}

async fn lookup(ctx: &Ctx, http: &Http, admin: &str, route: &str, key: &str) -> Result<Done> {
    let found = http
        .get_json(
            SERVICE,
            admin,
            &format!("/admin/lookup?route={}&key={}", encode(route), encode(key)),
        )
        .await?;
    // The backends' state explains a spill; without it the answer still stands.
    let backends = http
        .get_json(SERVICE, admin, "/admin/backends")
        .await
        .ok()
        .and_then(|all| {
            all["routes"]
                .as_array()?
                .iter()
                .find(|r| r["route"].as_str() == Some(route))
                .cloned()
        });
    let why = explain(&found, backends.as_ref());
    let mut json = found.clone();
    json["why"] = json!(why);
    emit(ctx.global.output, &json, || {
        let mut t = Table::new(&["FIELD", "VALUE"]);
        t.row(vec!["route".into(), s(&found["route"])]);
        t.row(vec!["key".into(), s(&found["key"])]);
        t.row(vec!["hash on".into(), s(&found["hash_on"])]);
        t.row(vec!["hash".into(), s(&found["hash"])]);
        t.row(vec!["owner".into(), s(&found["owner"])]);
        t.row(vec!["backend".into(), s(&found["pick"])]);
        t.row(vec![
            "order".into(),
            found["order"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(" > "))
                .unwrap_or_else(|| "-".into()),
        ]);
        t.row(vec!["revision".into(), s(&found["revision"])]);
        format!("{t}why: {why}\n")
    });
    Ok(Done::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("/users/alice bob"), "%2Fusers%2Falice%20bob");
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
    }

    #[test]
    fn a_spill_is_explained_by_the_owners_state() {
        let lookup = json!({"owner": "a", "pick": "b", "hash": "00ff", "spilled": false});
        let backends = json!({"backends": [{"id": "a", "ejected": true, "ejected_for_ms": 900, "in_flight": 0}]});
        let why = explain(&lookup, Some(&backends));
        assert!(why.contains("owner a is passed over"), "{why}");
        assert!(why.contains("ejected for 900 ms"), "{why}");
        assert!(why.contains("to b"), "{why}");
    }
}
