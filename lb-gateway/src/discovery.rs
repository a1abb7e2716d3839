//! Backend sets from the registry: one `registry.v1.Registry/Watch` per service the routes
//! name, feeding every route of that service.
//!
//! The watch starts with a snapshot and then delivers each change in order; the task keeps the
//! service's instances, and after every delivery each route rebuilds its pool from them
//! (filtered by its tags and zone) and swaps it in ([`RouteState::update`]).
//!
//! When the registry cannot be reached, or the watch breaks, the routes keep the last set they
//! had and the task reconnects with backoff (100 ms doubling to 2 s), resuming from the last
//! revision it saw, so nothing is missed and nothing is applied twice; the registry answers a
//! resume from compacted history with a fresh snapshot. A namespace that does not exist yet (no
//! instance was ever registered in it) counts as an empty set and is asked again every 500 ms.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use proto::registry_v1 as pb;
use registry_svc::client::RegistryClient;
use service_kit::admin::Health;
use tokio_util::sync::CancellationToken;

use crate::pool::RouteState;

/// The registry watches of the current route table.
pub struct Discovery {
    client: RegistryClient,
    health: Health,
    shutdown: CancellationToken,
    /// Cancels the watches of the table last applied.
    current: Mutex<Option<CancellationToken>>,
}

impl Discovery {
    /// No watches yet; `health` turns ready once every service of the first table applied
    /// has had a first answer.
    pub fn new(client: RegistryClient, health: Health, shutdown: CancellationToken) -> Discovery {
        Discovery {
            client,
            health,
            shutdown,
            current: Mutex::new(None),
        }
    }

    /// Starts one watch per distinct `(namespace, service)` of `routes`, feeding those routes,
    /// and stops the watches of the table applied before.
    pub fn apply(&self, routes: &[Arc<RouteState>]) {
        let generation = self.shutdown.child_token();
        if let Some(old) = self.current.lock().replace(generation.clone()) {
            old.cancel();
        }
        let mut services: HashMap<(String, String), Vec<Arc<RouteState>>> = HashMap::new();
        for r in routes {
            let b = &r.route.backend;
            services
                .entry((b.namespace.clone(), b.service.clone()))
                .or_default()
                .push(Arc::clone(r));
        }
        if services.is_empty() {
            self.health.set_ready(true);
        }
        let unsynced = Arc::new(AtomicUsize::new(services.len()));
        for ((ns, svc), routes) in services {
            let watch = ServiceWatch {
                client: self.client.clone(),
                namespace: ns,
                service: svc,
                routes,
                unsynced: Arc::clone(&unsynced),
                health: self.health.clone(),
                synced: false,
            };
            tokio::spawn(watch.run(generation.clone()));
        }
    }
}

struct ServiceWatch {
    client: RegistryClient,
    namespace: String,
    service: String,
    routes: Vec<Arc<RouteState>>,
    unsynced: Arc<AtomicUsize>,
    health: Health,
    synced: bool,
}

impl ServiceWatch {
    fn set_state(&mut self, connected: bool, error: Option<String>, synced: bool) {
        if synced && !self.synced {
            self.synced = true;
            if self.unsynced.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.health.set_ready(true);
                tracing::info!("every routed service has its backend set: ready");
            }
        }
        for r in &self.routes {
            let mut s = r.sync.lock();
            s.connected = connected;
            s.last_error = error.clone();
            s.synced |= synced;
        }
    }

    fn publish(&self, instances: &BTreeMap<String, pb::Instance>, revision: i64) {
        let list: Vec<pb::Instance> = instances.values().cloned().collect();
        for r in &self.routes {
            let before = r.pool.load().members.len();
            let moved = r.update(&list, revision);
            let after = r.pool.load().members.len();
            if before != after {
                tracing::info!(
                    route = %r.route.name,
                    service = %format!("{}/{}", self.namespace, self.service),
                    revision,
                    backends = after,
                    keys_moved = moved,
                    "backend set changed"
                );
            }
        }
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let mut instances: BTreeMap<String, pb::Instance> = BTreeMap::new();
        let mut revision = 0i64;
        let mut backoff = Duration::from_millis(100);
        let what = format!("{}/{}", self.namespace, self.service);
        loop {
            let request = pb::WatchRequest {
                namespace: self.namespace.clone(),
                service: self.service.clone(),
                after_revision: revision,
            };
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                opened = self.client.watch(request) => opened,
            };
            let mut stream = match opened {
                Ok(s) => s,
                Err(status)
                    if status.code() == tonic::Code::InvalidArgument
                        && status.message().contains("does not exist") =>
                {
                    // Nothing was ever registered in the namespace: an empty set, for now.
                    self.set_state(true, None, true);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
                Err(status) => {
                    tracing::warn!(service = %what, error = %status.message(), code = ?status.code(), "registry watch cannot start; keeping the last known backends");
                    self.set_state(false, Some(status.message().to_owned()), false);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = stream.message() => m,
                };
                match message {
                    Ok(Some(resp)) => {
                        match resp.event {
                            Some(pb::watch_response::Event::Snapshot(s)) => {
                                instances = s
                                    .instances
                                    .into_iter()
                                    .map(|i| (i.instance_id.clone(), i))
                                    .collect();
                                revision = s.revision;
                            }
                            Some(pb::watch_response::Event::Change(c)) => {
                                if let Some(i) = c.instance {
                                    if c.kind == pb::ChangeKind::Removed as i32 {
                                        instances.remove(&i.instance_id);
                                    } else {
                                        instances.insert(i.instance_id.clone(), i);
                                    }
                                }
                                revision = revision.max(c.revision);
                            }
                            None => continue,
                        }
                        self.publish(&instances, revision);
                        self.set_state(true, None, true);
                        backoff = Duration::from_millis(100);
                    }
                    Ok(None) => {
                        self.set_state(false, Some("the registry ended the watch".into()), false);
                        break;
                    }
                    Err(status) => {
                        tracing::warn!(service = %what, error = %status.message(), "registry watch broke; keeping the last known backends");
                        self.set_state(false, Some(status.message().to_owned()), false);
                        break;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
