//! `cluster status`: the coordinator's members with each one's own status (leader, term, Raft
//! index, revision, database size), and `/healthz` + `/readyz` of every admin server given.
//!
//! Statuses are asked of the `--coordinator` endpoints and of every member's advertised
//! client URL not among them (reachable from here on a local stack; not from the host for a
//! compose stack, whose members advertise container names: give all three published ports
//! with `--coordinator` there). The command exits 3 when any member or admin server is
//! unreachable or unhealthy, or no leader is known.

use std::collections::BTreeMap;

use coord_client::{Client, ClientConfig};
use serde_json::{Value, json};

use crate::error::{CtlError, Result};
use crate::http::{Http, base_url};
use crate::output::{Table, bytes, emit};
use crate::{Ctx, Done};

/// One member as reported.
struct MemberRow {
    id: u64,
    name: String,
    endpoint: String,
    status: Option<proto::etcdserverpb::StatusResponse>,
    error: Option<String>,
    learner: bool,
}

/// One admin server's probes.
struct Probe {
    service: &'static str,
    addr: String,
    healthz: std::result::Result<u16, String>,
    readyz: std::result::Result<u16, String>,
}

impl Probe {
    fn ok(&self) -> bool {
        self.healthz == Ok(200) && self.readyz == Ok(200)
    }
}

fn probe_text(r: &std::result::Result<u16, String>) -> String {
    match r {
        Ok(200) => "ok".into(),
        Ok(code) => format!("HTTP {code}"),
        Err(e) => format!("down ({e})"),
    }
}

fn normalize(url: &str) -> String {
    base_url(url)
}

fn coordinator_client(ctx: &Ctx, endpoints: Vec<String>) -> Result<Client> {
    let mut config = ClientConfig::new(endpoints);
    config.request_timeout = ctx.global.timeout.min(std::time::Duration::from_secs(5));
    config.connect_timeout = config
        .request_timeout
        .min(std::time::Duration::from_secs(2));
    // Every endpoint is tried at once on a failure; a few seconds tell a dead cluster.
    config.retry_deadline = ctx.global.timeout.min(std::time::Duration::from_secs(3));
    config.tls = ctx.tls.clone();
    Client::new(config).map_err(|e| CtlError::Usage(format!("--coordinator: {e}")))
}

fn error_text(e: &coord_client::Error) -> String {
    use std::error::Error as _;
    // The innermost cause says it best ("connection refused").
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        text = match err.downcast_ref::<std::io::Error>() {
            Some(io) => crate::error::io_words(io),
            None => err.to_string(),
        };
        source = err.source();
    }
    text
}

async fn members(ctx: &Ctx) -> Result<Vec<MemberRow>> {
    let given: Vec<String> = ctx
        .global
        .coordinator
        .iter()
        .map(|e| normalize(e))
        .collect();
    let client = coordinator_client(ctx, given.clone())?;
    let addr = given.join(",");
    let list = client.member_list().await.map_err(|e| {
        if e.is_unavailable() {
            CtlError::Unreachable {
                service: "coordinator",
                addr: addr.clone(),
                detail: error_text(&e),
            }
        } else {
            CtlError::Refused {
                service: "coordinator",
                code: "MemberList".into(),
                message: e.to_string(),
            }
        }
    })?;
    let mut statuses = client.endpoint_statuses().await;
    // Members whose advertised client URL was not given: ask there too.
    let extra: Vec<String> = list
        .iter()
        .flat_map(|m| m.client_ur_ls.iter().map(|u| normalize(u)))
        .filter(|u| !given.contains(u))
        .collect();
    if !extra.is_empty() {
        let more = coordinator_client(ctx, extra)?;
        statuses.extend(more.endpoint_statuses().await);
    }
    let mut rows = Vec::new();
    for m in &list {
        let mine = statuses.iter().find(|s| match &s.status {
            Ok(st) => st.header.as_ref().is_some_and(|h| h.member_id == m.id),
            Err(_) => false,
        });
        let (endpoint, status, error) = match mine {
            Some(s) => (s.endpoint.clone(), s.status.as_ref().ok().cloned(), None),
            None => {
                // No answer from this member: report the failure of one of its URLs.
                let failed = statuses.iter().find(|s| {
                    s.status.is_err() && m.client_ur_ls.iter().any(|u| normalize(u) == s.endpoint)
                });
                let endpoint = m
                    .client_ur_ls
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "-".into());
                let error = match failed {
                    Some(s) => s.status.as_ref().err().map(error_text),
                    None => Some("no status (its client URL is not reachable from here)".into()),
                };
                (endpoint, None, error)
            }
        };
        rows.push(MemberRow {
            id: m.id,
            name: m.name.clone(),
            endpoint,
            status,
            error,
            learner: m.is_learner,
        });
    }
    // Given endpoints that answered for no listed member, or did not answer at all, and are
    // no member's URL: show them too, so a typo is visible.
    for s in &statuses {
        let listed = rows.iter().any(|r| r.endpoint == s.endpoint)
            || list
                .iter()
                .any(|m| m.client_ur_ls.iter().any(|u| normalize(u) == s.endpoint));
        if !listed && let Err(e) = &s.status {
            rows.push(MemberRow {
                id: 0,
                name: "?".into(),
                endpoint: s.endpoint.clone(),
                status: None,
                error: Some(error_text(e)),
                learner: false,
            });
        }
    }
    Ok(rows)
}

async fn probes(ctx: &Ctx) -> Vec<Probe> {
    let http = Http::new(
        ctx.global.timeout.min(std::time::Duration::from_secs(3)),
        ctx.tls.clone(),
    );
    let g = &ctx.global;
    let mut targets: Vec<(&'static str, String)> = Vec::new();
    for a in &g.coordinator_admin {
        targets.push(("coordinator", a.trim().to_owned()));
    }
    for a in &g.registry_admin {
        targets.push(("registry-svc", a.trim().to_owned()));
    }
    for a in &g.config_admin {
        targets.push(("config-svc", a.trim().to_owned()));
    }
    targets.push(("lb-gateway", g.gateway_admin.trim().to_owned()));
    targets.retain(|(_, a)| !a.is_empty());
    let tasks: Vec<_> = targets
        .into_iter()
        .map(|(service, addr)| {
            let http = http.clone();
            tokio::spawn(async move {
                let ask = |path: &'static str| {
                    let (http, addr) = (http.clone(), addr.clone());
                    async move {
                        http.get(service, &addr, path)
                            .await
                            .map(|a| a.status)
                            .map_err(|e| match e {
                                CtlError::Unreachable { detail, .. } => detail,
                                CtlError::Timeout { .. } => "no answer in time".into(),
                                other => other.to_string(),
                            })
                    }
                };
                let (healthz, readyz) = tokio::join!(ask("/healthz"), ask("/readyz"));
                Probe {
                    service,
                    addr,
                    healthz,
                    readyz,
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(p) = t.await {
            out.push(p);
        }
    }
    out
}

/// `cluster status`.
pub async fn status(ctx: &Ctx) -> Result<Done> {
    let (rows, probes) = tokio::join!(members(ctx), probes(ctx));
    let rows = rows?;
    let names: BTreeMap<u64, String> = rows.iter().map(|r| (r.id, r.name.clone())).collect();
    // The leader as the members with a status see it (the highest term wins).
    let leader = rows
        .iter()
        .filter_map(|r| r.status.as_ref())
        .filter(|s| s.leader != 0)
        .max_by_key(|s| s.raft_term)
        .map(|s| (s.leader, s.raft_term));
    let revision = rows
        .iter()
        .filter_map(|r| r.status.as_ref())
        .filter_map(|s| s.header.as_ref().map(|h| h.revision))
        .max()
        .unwrap_or(0);
    let healthy =
        leader.is_some() && rows.iter().all(|r| r.status.is_some()) && probes.iter().all(Probe::ok);
    let leader_name =
        leader.map(|(id, _)| names.get(&id).cloned().unwrap_or_else(|| format!("{id:x}")));

    let json = json!({
        "healthy": healthy,
        "leader": leader_name,
        "leader_id": leader.map(|(id, _)| format!("{id:x}")),
        "term": leader.map(|(_, t)| t),
        "revision": revision,
        "members": rows.iter().map(|r| {
            let mut m = json!({
                "id": format!("{:x}", r.id),
                "name": r.name,
                "endpoint": r.endpoint,
                "learner": r.learner,
                "error": r.error,
            });
            if let Some(s) = &r.status {
                m["is_leader"] = json!(s.leader == r.id && r.id != 0);
                m["version"] = json!(s.version);
                m["raft_term"] = json!(s.raft_term);
                m["raft_index"] = json!(s.raft_index);
                m["raft_applied_index"] = json!(s.raft_applied_index);
                m["revision"] = json!(s.header.as_ref().map(|h| h.revision));
                m["db_size"] = json!(s.db_size);
                m["db_size_in_use"] = json!(s.db_size_in_use);
                m["errors"] = json!(s.errors);
            }
            m
        }).collect::<Vec<Value>>(),
        "services": probes.iter().map(|p| json!({
            "service": p.service,
            "admin": p.addr,
            "healthz": probe_text(&p.healthz),
            "readyz": probe_text(&p.readyz),
            "healthy": p.ok(),
        })).collect::<Vec<Value>>(),
    });
    emit(ctx.global.output, &json, || {
        let mut text = match (&leader_name, leader) {
            (Some(name), Some((_, term))) => {
                format!("coordinator: leader {name}, term {term}, revision {revision}\n\n")
            }
            _ => format!("coordinator: NO LEADER known, revision {revision}\n\n"),
        };
        let mut t = Table::new(&[
            "MEMBER",
            "ID",
            "ENDPOINT",
            "LEADER",
            "TERM",
            "RAFT INDEX",
            "APPLIED",
            "REVISION",
            "DB SIZE",
            "STATUS",
        ]);
        for r in &rows {
            let mut cells = vec![r.name.clone(), format!("{:x}", r.id), r.endpoint.clone()];
            match &r.status {
                Some(s) => {
                    cells.extend([
                        if s.leader == r.id { "*" } else { "" }.to_owned(),
                        s.raft_term.to_string(),
                        s.raft_index.to_string(),
                        s.raft_applied_index.to_string(),
                        s.header
                            .as_ref()
                            .map(|h| h.revision.to_string())
                            .unwrap_or_default(),
                        bytes(u64::try_from(s.db_size).unwrap_or(0)),
                        if !s.errors.is_empty() {
                            s.errors.join("; ")
                        } else if r.learner {
                            "learner".into()
                        } else {
                            "ok".into()
                        },
                    ]);
                }
                None => {
                    cells.extend(["", "-", "-", "-", "-", "-"].map(String::from));
                    cells.push(format!(
                        "unreachable: {}",
                        r.error.clone().unwrap_or_default()
                    ));
                }
            }
            t.row(cells);
        }
        text.push_str(&t.to_string());
        let mut p = Table::new(&["SERVICE", "ADMIN", "HEALTHZ", "READYZ"]);
        for probe in &probes {
            p.row(vec![
                probe.service.into(),
                probe.addr.clone(),
                probe_text(&probe.healthz),
                probe_text(&probe.readyz),
            ]);
        }
        text.push('\n');
        text.push_str(&p.to_string());
        text.push_str(if healthy {
            "\nall healthy\n"
        } else {
            "\nNOT all healthy\n"
        });
        text
    });
    Ok(if healthy { Done::Ok } else { Done::Unhealthy })
}
