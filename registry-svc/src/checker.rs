//! The replica's background work: membership in the replica set, and probing the instances it
//! owns (see [`crate::health`] for who owns what and the state machine).
//!
//! One task watches the whole registry prefix (`/registry/v1/`): replica keys tell who is alive,
//! instance keys what to probe. After every change it reconciles: a probe task per owned
//! instance that has a health check, restarted when the instance's lease, address or check
//! changes, stopped when the instance goes away or moves to another replica. A probe task
//! writes only transitions, as a transaction guarded by the record's revision and bound to the
//! instance's own lease, so a write can never resurrect an instance that expired meanwhile.
//! TLS checks are probed with the replica's [`ProbeTls`] (`--check-cacert`, ...; see
//! [`crate::health`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use coord_client::{EventKind, KeyValue, LeaseKeeper, Txn, WatchEvent, WatchOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::health::{CheckState, ProbeTls, Target, kind_label, owner, timed_probe};
use crate::keys;
use crate::model::{HealthCheckSpec, HealthStatus, Instance};
use crate::registry::{Registry, decode};

/// Registers this replica under its own lease, retrying until it succeeds or `shutdown`.
/// Returns the keeper (which re-registers the replica after an outage by itself).
pub async fn join(
    registry: &Registry,
    replica_id: &str,
    ttl: i64,
    shutdown: &CancellationToken,
) -> Option<LeaseKeeper> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let client = registry.client().clone();
        let key = keys::replica(replica_id);
        let value = serde_json::json!({ "id": replica_id, "pid": std::process::id() }).to_string();
        let attempt = registry
            .client()
            .keep_lease(ttl, move |lease| {
                let (client, key, value) = (client.clone(), key.clone(), value.clone());
                async move { client.put(key, value, lease).await.map(|_| ()) }
            })
            .await;
        match attempt {
            Ok(keeper) => {
                tracing::info!(replica = replica_id, "joined the replica set");
                return Some(keeper);
            }
            Err(e) => tracing::warn!(error = %e, "cannot register this replica yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// What a probe task was started for; a change restarts it.
#[derive(Debug, Clone, PartialEq)]
struct Fingerprint {
    lease: i64,
    /// The registered address, and `host:port`.
    host: String,
    addr: String,
    spec: HealthCheckSpec,
}

struct Probe {
    fingerprint: Fingerprint,
    task: JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The checker's view of the registry.
#[derive(Default)]
struct View {
    replicas: BTreeSet<String>,
    /// Instance key → (record, lease).
    instances: HashMap<String, (Instance, i64)>,
}

impl View {
    fn apply_put(&mut self, kv: &KeyValue) {
        if let Some(id) = keys::parse_replica(&kv.key) {
            self.replicas.insert(id);
        } else if keys::parse_instance(&kv.key).is_some() {
            match decode(kv) {
                Ok(i) => {
                    self.instances
                        .insert(String::from_utf8_lossy(&kv.key).into_owned(), (i, kv.lease));
                }
                Err(e) => tracing::warn!(error = %e, "skipping a record"),
            }
        }
    }

    fn apply_delete(&mut self, key: &[u8]) {
        if let Some(id) = keys::parse_replica(key) {
            self.replicas.remove(&id);
        } else {
            self.instances.remove(String::from_utf8_lossy(key).as_ref());
        }
    }
}

/// Probes the instances this replica owns until `shutdown`; TLS checks with `tls` (`None`: they
/// fail, saying that this replica has no `--check-cacert`).
pub async fn run(
    registry: Arc<Registry>,
    replica_id: String,
    tls: Option<ProbeTls>,
    shutdown: CancellationToken,
) {
    let mut probes: HashMap<String, Probe> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let snapshot = match registry.client().get_prefix(keys::ROOT).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "checker: cannot read the registry; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut view = View::default();
        for kv in &snapshot.kvs {
            view.apply_put(kv);
        }
        reconcile(&registry, &replica_id, &view, tls.as_ref(), &mut probes);
        let mut stream = registry
            .client()
            .watch(WatchOptions::prefix(keys::ROOT, snapshot.revision + 1));
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => break,
                item = stream.next() => item,
            };
            match item {
                Some(WatchEvent::Created { .. }) => continue,
                Some(WatchEvent::Events(events)) => {
                    for e in &events {
                        match e.kind {
                            EventKind::Put => view.apply_put(&e.kv),
                            EventKind::Delete => view.apply_delete(&e.kv.key),
                        }
                    }
                    reconcile(&registry, &replica_id, &view, tls.as_ref(), &mut probes);
                }
                Some(WatchEvent::Compacted { .. }) | None => break,
            }
        }
    }
    probes.clear();
    registry.metrics().probed_instances.set(0);
}

fn reconcile(
    registry: &Arc<Registry>,
    me: &str,
    view: &View,
    tls: Option<&ProbeTls>,
    probes: &mut HashMap<String, Probe>,
) {
    let replicas: Vec<&str> = view.replicas.iter().map(String::as_str).collect();
    registry.metrics().live_replicas.set(replicas.len() as i64);
    let mut wanted: HashMap<&str, Fingerprint> = HashMap::new();
    for (key, (instance, lease)) in &view.instances {
        let Some(spec) = &instance.health_check else {
            continue;
        };
        if owner(key, replicas.iter().copied()) != Some(me) {
            continue;
        }
        wanted.insert(
            key.as_str(),
            Fingerprint {
                lease: *lease,
                host: instance.address.clone(),
                addr: instance.socket_addr(),
                spec: spec.clone(),
            },
        );
    }
    probes.retain(|key, probe| wanted.get(key.as_str()) == Some(&probe.fingerprint));
    for (key, fingerprint) in wanted {
        if probes.contains_key(key) {
            continue;
        }
        let Some((instance, _)) = view.instances.get(key) else {
            continue;
        };
        let task = tokio::spawn(probe_loop(
            registry.clone(),
            key.to_owned(),
            fingerprint.clone(),
            instance.health,
            tls.cloned(),
        ));
        probes.insert(key.to_owned(), Probe { fingerprint, task });
    }
    registry.metrics().probed_instances.set(probes.len() as i64);
}

async fn probe_loop(
    registry: Arc<Registry>,
    key: String,
    fp: Fingerprint,
    recorded: HealthStatus,
    tls: Option<ProbeTls>,
) {
    let spec = &fp.spec;
    let kind = kind_label(&spec.kind);
    let mut state = CheckState::new(recorded);
    let mut believed = recorded;
    let mut tick = tokio::time::interval(Duration::from_millis(u64::from(spec.interval_ms)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut detail = String::new();
    loop {
        tick.tick().await;
        let target = Target {
            host: &fp.host,
            addr: &fp.addr,
        };
        let (result, took) = timed_probe(target, spec, tls.as_ref()).await;
        let m = registry.metrics();
        m.health_check_seconds
            .get_or_create(&[("kind", kind)])
            .observe(took.as_secs_f64());
        m.health_checks
            .get_or_create(&[
                ("kind", kind),
                ("result", if result.is_ok() { "pass" } else { "fail" }),
            ])
            .inc();
        if let Some(to) = state.observe(result.is_ok(), spec) {
            detail = match &result {
                Ok(()) => format!("{} probes passed in a row", spec.healthy_threshold),
                Err(why) => format!(
                    "{} probes failed in a row; last: {why}",
                    spec.unhealthy_threshold
                ),
            };
            tracing::info!(key, to = ?to, detail, "health changed");
        }
        if state.status != believed {
            match write_health(&registry, &key, fp.lease, state.status, &detail).await {
                Ok(true) => {
                    believed = state.status;
                    let label = match state.status {
                        HealthStatus::Healthy => "healthy",
                        HealthStatus::Unhealthy => "unhealthy",
                    };
                    m.health_transitions.get_or_create(&[("to", label)]).inc();
                }
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(key, error = %e, "cannot record a health change; retrying")
                }
            }
        }
    }
}

/// Writes `status` into the record if it is still the one bound to `lease`. `Ok(false)`: the
/// record is gone or was replaced (stop probing it).
async fn write_health(
    registry: &Registry,
    key: &str,
    lease: i64,
    status: HealthStatus,
    detail: &str,
) -> crate::error::Result<bool> {
    let client = registry.client();
    let (kv, _) = client.get(key.to_owned()).await?;
    let Some(kv) = kv.filter(|kv| kv.lease == lease) else {
        return Ok(false);
    };
    let mut instance = decode(&kv)?;
    if instance.health == status {
        return Ok(true);
    }
    instance.health = status;
    instance.health_detail = detail.to_owned();
    instance.revision = 0;
    let value =
        serde_json::to_vec(&instance).map_err(|e| crate::error::Error::Internal(e.to_string()))?;
    let resp = client
        .txn_guarded(
            Txn::new()
                .if_mod_revision(key.to_owned(), kv.mod_revision)
                .then_put(key.to_owned(), value, lease),
        )
        .await?;
    if resp.succeeded {
        Ok(true)
    } else {
        Err(crate::error::Error::Internal(
            "the record changed while writing its health".into(),
        ))
    }
}
