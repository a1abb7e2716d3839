//! Live backend sets: the bridge between the registry's view and the pure choice.
//!
//! A route owns a [`RouteState`], whose current [`Pool`] (members, weights, the built table)
//! sits behind an `ArcSwap`: a registry change builds a whole new pool and swaps it in, so a
//! request sees either the old set or the new one, never a mix, and nothing is locked on the
//! request path. A [`Backend`] (its load, outlier state, connections, metric handles) lives
//! across swaps for as long as its address stays in the set. A backend that leaves is
//! *draining*: requests already on it hold it and finish normally; no new request picks it;
//! once its last request ends it is dropped, with its connections and metric series.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use proto::registry_v1 as pb;
use serde::Serialize;

use crate::backend_tls::RouteTls;
use crate::hash::select::{Choice, Loads, pick_keyed, pick_p2c};
use crate::hash::{Node, Table, moved_fraction};
use crate::metrics::{BackendMetrics, RouteMetrics};
use crate::resilience::{GlobalLimit, KeyedLimit, OutlierState, RetryBudget, max_ejected};
use crate::routes::{BackendProtocol, Route};
use crate::upstream::{ConnPool, Target};

/// Evenly spaced keys compared before and after a swap to measure keys moved.
const MOVED_SAMPLES: usize = 4096;

/// Whether a backend is spoken to over HTTP/2 or HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Wire {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// One backend of one route, alive across set swaps.
pub struct Backend {
    /// `address:port`: its identity in the tables.
    pub id: String,
    /// Where it listens.
    pub addr: Target,
    /// What the registry says it speaks.
    pub registered_grpc: bool,
    /// Its connections.
    pub conns: ConnPool,
    /// Passive outlier detection.
    pub outlier: OutlierState,
    /// Metric handles; `metrics.in_flight` is its load.
    pub metrics: BackendMetrics,
}

impl Backend {
    /// Requests in flight at it.
    pub fn in_flight(&self) -> u64 {
        u64::try_from(self.metrics.in_flight.get()).unwrap_or(0)
    }
}

impl crate::h1::Recycle for Backend {
    fn recycle(&self, conn: crate::h1::RawConn) {
        self.conns.put_back_raw(conn);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.metrics.remove();
    }
}

/// A backend as a member of one pool generation, with what the registry said of it.
#[derive(Clone)]
pub struct Member {
    /// The live backend.
    pub backend: Arc<Backend>,
    /// Its weight (≥ 1).
    pub weight: u32,
    /// Registry instance ID.
    pub instance_id: String,
    /// Zone.
    pub zone: String,
    /// Whether the registry reports it healthy.
    pub healthy: bool,
}

/// One generation of a route's backend set.
pub struct Pool {
    /// The members, in table order.
    pub members: Vec<Member>,
    /// The built table.
    pub table: Table,
    /// Sum of the members' weights.
    pub total_weight: u64,
    /// Registry revision it reflects (0: nothing heard yet).
    pub revision: i64,
    /// Whether every instance was unhealthy, so all were taken anyway (panic mode).
    pub panic: bool,
}

impl Pool {
    fn empty(route: &Route) -> Pool {
        Pool {
            members: Vec::new(),
            table: Table::build(route.algorithm, &[], route.vnodes, route.table_size),
            total_weight: 0,
            revision: 0,
            panic: false,
        }
    }

    /// The member with `id`, if any.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.members.iter().position(|m| m.backend.id == id)
    }
}

/// Where the registry watch of a route stands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncState {
    /// Whether a first answer (snapshot, or "no such namespace") arrived.
    pub synced: bool,
    /// The watch is up now.
    pub connected: bool,
    /// The last error, if the watch is down.
    pub last_error: Option<String>,
}

/// Everything the gateway keeps for one route.
pub struct RouteState {
    /// The route as configured.
    pub route: Route,
    /// TLS to its instances (`backend.tls`).
    pub tls: Option<RouteTls>,
    /// The current backend set.
    pub pool: ArcSwap<Pool>,
    /// Backends that left the set with requests still on them.
    pub draining: Mutex<Vec<Arc<Backend>>>,
    /// Metric handles; `metrics.in_flight` is the route's `T`.
    pub metrics: RouteMetrics,
    /// Retry budget.
    pub budget: RetryBudget,
    /// Route-level rate limits.
    pub global_limit: Option<GlobalLimit>,
    /// Route-level per-IP limit.
    pub ip_limit: Option<KeyedLimit>,
    /// Members ejected now (a hint that lets the common path skip summing weights).
    pub ejected_hint: AtomicI64,
    /// Registry watch state.
    pub sync: Mutex<SyncState>,
    /// Set swaps so far.
    pub generation: AtomicU64,
}

impl RouteState {
    /// A route with no backends yet, dialling its instances over TLS with `tls` when given.
    pub fn new(route: Route, metrics: RouteMetrics, tls: Option<RouteTls>) -> RouteState {
        RouteState {
            tls,
            pool: ArcSwap::from_pointee(Pool::empty(&route)),
            draining: Mutex::new(Vec::new()),
            budget: RetryBudget::new(&route.retries),
            global_limit: route.rate_limit.global.as_ref().map(GlobalLimit::new),
            ip_limit: route.rate_limit.per_client_ip.as_ref().map(KeyedLimit::new),
            ejected_hint: AtomicI64::new(0),
            sync: Mutex::new(SyncState::default()),
            generation: AtomicU64::new(0),
            metrics,
            route,
        }
    }

    /// Takes over `old`'s live backend set (its pool, draining backends and watch state), when
    /// a reload keeps the route's name and backend: requests keep their backends, loads and
    /// ejections carry over, and the registry watch's first snapshot refreshes it.
    pub fn adopt(&self, old: &RouteState) {
        self.pool.store(old.pool.load_full());
        *self.draining.lock() = old.draining.lock().clone();
        *self.sync.lock() = old.sync.lock().clone();
    }

    /// Whether `i` passes the route's filters (tags, zone).
    fn wanted(&self, i: &pb::Instance) -> bool {
        let b = &self.route.backend;
        b.tags.iter().all(|t| i.tags.contains(t))
            && b.zone.as_ref().is_none_or(|z| &i.zone == z)
            && i.protocol != pb::Protocol::Tcp as i32
            && i.weight > 0
    }

    /// Builds the pool for `instances` (the service's whole current set) at `revision` and
    /// swaps it in. Returns the share of keys that changed owner.
    pub fn update(&self, instances: &[pb::Instance], revision: i64) -> f64 {
        let old = self.pool.load_full();
        let mut known: HashMap<&str, &Arc<Backend>> = old
            .members
            .iter()
            .map(|m| (m.backend.id.as_str(), &m.backend))
            .collect();
        let draining = self.draining.lock().clone();
        for b in &draining {
            known.entry(b.id.as_str()).or_insert(b);
        }

        let wanted: Vec<&pb::Instance> = instances.iter().filter(|i| self.wanted(i)).collect();
        let healthy: Vec<&pb::Instance> = wanted
            .iter()
            .copied()
            .filter(|i| i.health != pb::HealthStatus::Unhealthy as i32)
            .collect();
        // Panic mode (as Envoy's): when none is healthy, use them all rather than none.
        let panic = healthy.is_empty() && !wanted.is_empty();
        let chosen = if panic { wanted } else { healthy };

        let mut members: Vec<Member> = Vec::with_capacity(chosen.len());
        for i in chosen {
            let Some(addr) = Target::parse(&i.address, i.port) else {
                tracing::warn!(route = %self.route.name, instance = %i.instance_id, address = %i.address, port = i.port, "instance address is neither an IP address nor a DNS name, or its port is out of range; skipped");
                continue;
            };
            let id = addr.to_string();
            if members.iter().any(|m| m.backend.id == id) {
                continue;
            }
            let tls = match self.tls.as_ref().map(|t| t.for_target(&addr)).transpose() {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::warn!(route = %self.route.name, instance = %i.instance_id, error = %e, "instance skipped: its TLS server name is unusable (set backend.tls_server_name)");
                    continue;
                }
            };
            let backend = match known.get(id.as_str()) {
                Some(b) => Arc::clone(b),
                None => Arc::new(Backend {
                    metrics: self.metrics.backend(&id),
                    conns: ConnPool::new(addr.clone(), tls),
                    outlier: OutlierState::default(),
                    registered_grpc: i.protocol == pb::Protocol::Grpc as i32,
                    addr,
                    id,
                }),
            };
            members.push(Member {
                backend,
                weight: i.weight.max(1),
                instance_id: i.instance_id.clone(),
                zone: i.zone.clone(),
                healthy: i.health != pb::HealthStatus::Unhealthy as i32,
            });
        }
        // Table order independent of the registry's order.
        members.sort_by(|a, b| a.backend.id.cmp(&b.backend.id));
        let nodes: Vec<Node<'_>> = members
            .iter()
            .map(|m| Node {
                id: &m.backend.id,
                weight: m.weight,
            })
            .collect();
        let table = Table::build(
            self.route.algorithm,
            &nodes,
            self.route.vnodes,
            self.route.table_size,
        );
        let before_ids: Vec<&str> = old.members.iter().map(|m| m.backend.id.as_str()).collect();
        let after_ids: Vec<&str> = nodes.iter().map(|n| n.id).collect();
        let moved = if old.members.is_empty() {
            0.0
        } else {
            moved_fraction(
                &old.table.owners_sampled(MOVED_SAMPLES),
                &before_ids,
                &table.owners_sampled(MOVED_SAMPLES),
                &after_ids,
            )
        };
        let changed = before_ids != after_ids
            || old
                .members
                .iter()
                .zip(&members)
                .any(|(a, b)| a.weight != b.weight);
        let total_weight = members.iter().map(|m| u64::from(m.weight)).sum();

        // Who left: draining while requests are on them.
        let staying: std::collections::HashSet<&str> = after_ids.iter().copied().collect();
        {
            let mut d = self.draining.lock();
            for m in &old.members {
                if !staying.contains(m.backend.id.as_str()) {
                    d.push(Arc::clone(&m.backend));
                }
            }
            d.retain(|b| !staying.contains(b.id.as_str()));
            d.dedup_by(|a, b| a.id == b.id);
        }
        let pool = Pool {
            members,
            table,
            total_weight,
            revision,
            panic,
        };
        self.pool.store(Arc::new(pool));
        self.prune_draining();
        self.refresh_gauges();
        if changed {
            self.generation.fetch_add(1, Ordering::Relaxed);
            self.metrics.membership_changes.inc();
            self.metrics.keys_moved.set(moved);
        }
        moved
    }

    /// Drops draining backends whose last request finished.
    pub fn prune_draining(&self) {
        let mut d = self.draining.lock();
        d.retain(|b| b.in_flight() > 0);
        self.metrics.set_backends("draining", d.len());
    }

    /// Refreshes the `lb_gateway_backends` gauges and the ejected hint.
    pub fn refresh_gauges(&self) {
        let pool = self.pool.load();
        let now = crate::resilience::now_ns();
        let ejected = pool
            .members
            .iter()
            .filter(|m| m.backend.outlier.is_ejected(now))
            .count();
        self.ejected_hint.store(
            i64::try_from(ejected).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        self.metrics.set_backends("ejected", ejected);
        self.metrics
            .set_backends("active", pool.members.len() - ejected);
    }

    /// Which wire to use for a request to `backend`.
    pub fn wire(&self, backend: &Backend, grpc_request: bool) -> Wire {
        match self.route.backend.protocol {
            BackendProtocol::Http1 => Wire::Http1,
            BackendProtocol::Http2 => Wire::Http2,
            BackendProtocol::Auto if grpc_request || backend.registered_grpc => Wire::Http2,
            BackendProtocol::Auto => Wire::Http1,
        }
    }

    /// Whether one more member of `pool` may be ejected now.
    pub fn may_eject(&self, pool: &Pool, now: u64) -> bool {
        let ejected = pool
            .members
            .iter()
            .filter(|m| m.backend.outlier.is_ejected(now))
            .count();
        ejected < max_ejected(pool.members.len(), self.route.outlier.max_ejected_percent)
    }
}

/// The live loads of a pool for one request: skips ejected members, members at their circuit
/// breaker's limit, and members this request already tried.
pub struct LiveLoads<'a> {
    /// The pool.
    pub pool: &'a Pool,
    /// The route.
    pub route: &'a RouteState,
    /// Now (ns).
    pub now: u64,
    /// Members already tried by this request.
    pub tried: &'a [usize],
    /// Sum of the weights of the available members, computed once.
    total_weight: u64,
}

impl<'a> LiveLoads<'a> {
    /// A view of `pool` for a request that already tried `tried`.
    pub fn new(pool: &'a Pool, route: &'a RouteState, now: u64, tried: &'a [usize]) -> Self {
        let mut view = LiveLoads {
            pool,
            route,
            now,
            tried,
            total_weight: pool.total_weight,
        };
        if !tried.is_empty() || route.ejected_hint.load(Ordering::Relaxed) != 0 {
            view.total_weight = (0..pool.members.len())
                .filter(|&i| view.usable(i))
                .map(|i| u64::from(pool.members[i].weight))
                .sum();
        }
        view
    }

    fn usable(&self, i: usize) -> bool {
        !self.tried.contains(&i) && !self.pool.members[i].backend.outlier.is_ejected(self.now)
    }

    /// Picks a member: by key with bounded loads, or by power of two choices.
    pub fn pick(&self, key: Option<u64>) -> Option<Choice> {
        match key {
            Some(h) => pick_keyed(&self.pool.table, h, self, self.route.route.epsilon()),
            None => pick_p2c(self, &mut rand::rng()).map(|member| Choice {
                member,
                rank: 0,
                spilled: false,
            }),
        }
    }
}

impl Loads for LiveLoads<'_> {
    fn len(&self) -> usize {
        self.pool.members.len()
    }

    fn load(&self, i: usize) -> u64 {
        self.pool.members[i].backend.in_flight()
    }

    fn weight(&self, i: usize) -> u64 {
        u64::from(self.pool.members[i].weight)
    }

    fn available(&self, i: usize) -> bool {
        self.usable(i)
            && self.pool.members[i].backend.in_flight()
                < self.route.route.circuit_breaker.max_requests
    }

    fn total_load(&self) -> u64 {
        u64::try_from(self.route.metrics.in_flight.get()).unwrap_or(0)
    }

    fn total_weight(&self) -> u64 {
        self.total_weight
    }
}
