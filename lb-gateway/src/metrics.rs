//! Prometheus metrics of the gateway, per route and per backend.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `lb_gateway_requests_total` | route, class | answers to clients by status class (`2xx`…) |
//! | `lb_gateway_request_duration_seconds` | route | time to the response's headers |
//! | `lb_gateway_in_flight` | route | requests in flight |
//! | `lb_gateway_rejected_total` | route, reason | answered by the gateway itself (429/503/502/504/404) |
//! | `lb_gateway_retries_total` | route | retries sent |
//! | `lb_gateway_bounded_load_spills_total` | route | keyed requests that went past their owner for load |
//! | `lb_gateway_membership_changes_total` | route | backend sets swapped in |
//! | `lb_gateway_keys_moved_ratio` | route | share of the key space that changed owner at the last swap |
//! | `lb_gateway_backends` | route, state | backends `active`, `ejected`, `draining` |
//! | `lb_gateway_backend_requests_total` | route, backend, class | tries answered by each backend |
//! | `lb_gateway_backend_request_duration_seconds` | route, backend | per try, to the headers |
//! | `lb_gateway_backend_in_flight` | route, backend | requests in flight at the backend |
//! | `lb_gateway_backend_ejections_total` | route, backend | outlier ejections |
//! | `lb_gateway_backend_connect_failures_total` | route, backend | failed connects and tries with no answer |
//! | `lb_gateway_backend_tls_failures_total` | route, backend, reason | failed TLS handshakes with backends (`unknown_issuer`, `name_mismatch`, `not_tls`, … see `backend_tls::failure_reason`) |
//! | `lb_gateway_route_reloads_total` | result | routes versions from config-svc `applied` or `rejected` |
//!
//! Handles per route and per backend are resolved once (when the route or the backend appears),
//! so the request path touches only atomics and the histograms' own locks. A backend's series
//! are removed once it has left the set and drained.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use service_kit::admin::Metrics;

type RouteLabels = [(&'static str, String); 1];
type RouteClassLabels = [(&'static str, String); 2];
type BackendLabels = [(&'static str, String); 2];
type BackendClassLabels = [(&'static str, String); 3];

fn latency() -> Histogram {
    // 0.25 ms to ~16 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

/// Every family, registered once.
#[derive(Clone)]
pub struct GatewayMetrics {
    requests: Family<RouteClassLabels, Counter>,
    duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<RouteLabels, Gauge>,
    rejected: Family<RouteClassLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    spills: Family<RouteLabels, Counter>,
    membership_changes: Family<RouteLabels, Counter>,
    keys_moved: Family<RouteLabels, Gauge<f64, AtomicU64>>,
    backends: Family<RouteClassLabels, Gauge>,
    backend_requests: Family<BackendClassLabels, Counter>,
    backend_duration: Family<BackendLabels, Histogram, fn() -> Histogram>,
    backend_in_flight: Family<BackendLabels, Gauge>,
    backend_ejections: Family<BackendLabels, Counter>,
    backend_connect_failures: Family<BackendLabels, Counter>,
    backend_tls_failures: Family<BackendClassLabels, Counter>,
    reloads: Family<RouteLabels, Counter>,
}

/// Status classes, indexed by the first digit minus one.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: u16) -> usize {
    usize::from((status / 100).clamp(1, 5) - 1)
}

impl GatewayMetrics {
    /// Registers the families in `metrics`.
    pub fn register(metrics: &Metrics) -> GatewayMetrics {
        let m = GatewayMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            in_flight: Family::default(),
            rejected: Family::default(),
            retries: Family::default(),
            spills: Family::default(),
            membership_changes: Family::default(),
            keys_moved: Family::default(),
            backends: Family::default(),
            backend_requests: Family::default(),
            backend_duration: Family::new_with_constructor(latency),
            backend_in_flight: Family::default(),
            backend_ejections: Family::default(),
            backend_connect_failures: Family::default(),
            backend_tls_failures: Family::default(),
            reloads: Family::default(),
        };
        let mut r = metrics.registry();
        let r = r.sub_registry_with_prefix("lb_gateway");
        r.register(
            "requests",
            "Answers to clients by status class",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from the request to the response's headers",
            m.duration.clone(),
        );
        r.register("in_flight", "Requests in flight", m.in_flight.clone());
        r.register(
            "rejected",
            "Requests answered by the gateway itself, by reason",
            m.rejected.clone(),
        );
        r.register(
            "retries",
            "Retries sent to a next choice",
            m.retries.clone(),
        );
        r.register(
            "bounded_load_spills",
            "Keyed requests sent past their owner because it was at its bounded load",
            m.spills.clone(),
        );
        r.register(
            "membership_changes",
            "Backend sets swapped in after a registry change",
            m.membership_changes.clone(),
        );
        r.register(
            "keys_moved_ratio",
            "Share of the key space whose owner changed at the last membership change",
            m.keys_moved.clone(),
        );
        r.register("backends", "Backends by state", m.backends.clone());
        r.register(
            "backend_requests",
            "Tries answered by each backend, by status class",
            m.backend_requests.clone(),
        );
        r.register(
            "backend_request_duration_seconds",
            "Time from sending a try to its response's headers",
            m.backend_duration.clone(),
        );
        r.register(
            "backend_in_flight",
            "Requests in flight at each backend",
            m.backend_in_flight.clone(),
        );
        r.register(
            "backend_ejections",
            "Outlier ejections of each backend",
            m.backend_ejections.clone(),
        );
        r.register(
            "backend_connect_failures",
            "Failed connects and tries without an answer, per backend",
            m.backend_connect_failures.clone(),
        );
        r.register(
            "backend_tls_failures",
            "Failed TLS handshakes with each backend, by reason",
            m.backend_tls_failures.clone(),
        );
        r.register(
            "route_reloads",
            "Routes versions from config-svc, by result (applied, rejected)",
            m.reloads.clone(),
        );
        m
    }

    /// Counts a routes reload with `result` (`applied`, `rejected`).
    pub fn reloaded(&self, result: &str) {
        self.reloads
            .get_or_create(&[("result", result.to_owned())])
            .inc();
    }

    /// The handles of one route.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let l = [("route", route.to_owned())];
        let class = |c: &str| [("route", route.to_owned()), ("class", c.to_owned())];
        RouteMetrics {
            requests: CLASSES.map(|c| self.requests.get_or_create(&class(c)).clone()),
            duration: self.duration.get_or_create(&l).clone(),
            in_flight: self.in_flight.get_or_create(&l).clone(),
            retries: self.retries.get_or_create(&l).clone(),
            spills: self.spills.get_or_create(&l).clone(),
            membership_changes: self.membership_changes.get_or_create(&l).clone(),
            keys_moved: self.keys_moved.get_or_create(&l).clone(),
            route: route.to_owned(),
            families: self.clone(),
        }
    }
}

/// The handles of one route.
#[derive(Clone)]
pub struct RouteMetrics {
    requests: [Counter; 5],
    /// Time to the response's headers.
    pub duration: Histogram,
    /// Requests in flight on the route (also the `T` of bounded loads).
    pub in_flight: Gauge,
    /// Retries.
    pub retries: Counter,
    /// Bounded-load spills.
    pub spills: Counter,
    /// Membership changes.
    pub membership_changes: Counter,
    /// Share of keys moved at the last change.
    pub keys_moved: Gauge<f64, AtomicU64>,
    route: String,
    families: GatewayMetrics,
}

impl RouteMetrics {
    /// Counts an answer to a client.
    pub fn answered(&self, status: u16) {
        self.requests[class_index(status)].inc();
    }

    /// Counts a request the gateway answered itself.
    pub fn rejected(&self, reason: &str) {
        self.families
            .rejected
            .get_or_create(&[("route", self.route.clone()), ("reason", reason.to_owned())])
            .inc();
    }

    /// Sets the number of backends in `state`.
    pub fn set_backends(&self, state: &str, n: usize) {
        self.families
            .backends
            .get_or_create(&[("route", self.route.clone()), ("class", state.to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The handles of one backend of this route.
    pub fn backend(&self, backend: &str) -> BackendMetrics {
        let l = [
            ("route", self.route.clone()),
            ("backend", backend.to_owned()),
        ];
        let class = |c: &str| {
            [
                ("route", self.route.clone()),
                ("backend", backend.to_owned()),
                ("class", c.to_owned()),
            ]
        };
        let f = &self.families;
        BackendMetrics {
            requests: CLASSES.map(|c| f.backend_requests.get_or_create(&class(c)).clone()),
            duration: f.backend_duration.get_or_create(&l).clone(),
            in_flight: f.backend_in_flight.get_or_create(&l).clone(),
            ejections: f.backend_ejections.get_or_create(&l).clone(),
            connect_failures: f.backend_connect_failures.get_or_create(&l).clone(),
            labels: l,
            families: f.clone(),
        }
    }
}

/// The handles of one backend on one route.
pub struct BackendMetrics {
    requests: [Counter; 5],
    /// Per try, to the headers.
    pub duration: Histogram,
    /// In flight at the backend: the load that bounded loads and the circuit breaker read.
    pub in_flight: Gauge,
    /// Outlier ejections.
    pub ejections: Counter,
    /// Failed connects / tries without an answer.
    pub connect_failures: Counter,
    labels: BackendLabels,
    families: GatewayMetrics,
}

impl BackendMetrics {
    /// Counts a try's answer.
    pub fn answered(&self, status: u16) {
        self.requests[class_index(status)].inc();
    }

    /// Tries answered so far, all classes.
    pub fn total(&self) -> u64 {
        self.requests.iter().map(Counter::get).sum()
    }

    /// Counts a failed TLS handshake with the backend, for `reason` (a
    /// [`crate::backend_tls::failure_reason`]).
    pub fn tls_failed(&self, reason: &str) {
        let [route, backend] = self.labels.clone();
        self.families
            .backend_tls_failures
            .get_or_create(&[route, backend, ("reason", reason.to_owned())])
            .inc();
    }

    /// Removes this backend's series (it left the set and drained).
    pub fn remove(&self) {
        let f = &self.families;
        for reason in crate::backend_tls::FAILURE_REASONS {
            let [route, backend] = self.labels.clone();
            f.backend_tls_failures
                .remove(&[route, backend, ("reason", reason.to_owned())]);
        }
        f.backend_duration.remove(&self.labels);
        f.backend_in_flight.remove(&self.labels);
        f.backend_ejections.remove(&self.labels);
        f.backend_connect_failures.remove(&self.labels);
        for c in CLASSES {
            let [route, backend] = self.labels.clone();
            f.backend_requests
                .remove(&[route, backend, ("class", c.to_owned())]);
        }
    }
}
