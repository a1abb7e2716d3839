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
//! | `lb_gateway_worker_connections` | worker | client connections open on each proxy worker |
//!
//! Handles per route and per backend are resolved once (when the route or the backend appears),
//! so the request path touches only atomics. The two latency histograms a request feeds are
//! [`Latency`]s, a shard per proxy worker, so that workers on different cores do not write
//! the same memory for them. A backend's series are removed once it has left the set and
//! drained.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use service_kit::admin::Metrics;

type RouteLabels = [(&'static str, String); 1];
type RouteClassLabels = [(&'static str, String); 2];
type BackendLabels = [(&'static str, String); 2];
type BackendClassLabels = [(&'static str, String); 3];
type WorkerLabels = [(&'static str, String); 1];

/// Makes the latency histograms of a family, with a shard per proxy worker.
#[derive(Clone, Copy, Debug)]
pub struct LatencyShards(usize);

impl MetricConstructor<Latency> for LatencyShards {
    fn new_metric(&self) -> Latency {
        Latency::new(self.0)
    }
}

/// Upper bound of the first latency bucket: 0.25 ms. Bucket `i` ends at `FIRST_BUCKET_NS << i`.
const FIRST_BUCKET_NS: u64 = 250_000;
/// Finite latency buckets: 0.25 ms to ~16 s, doubling; one more (`+Inf`) follows.
const FINITE_BUCKETS: usize = 17;

/// A latency histogram (0.25 ms to ~16 s, doubling, as Prometheus's classic buckets) with one
/// shard per proxy worker.
///
/// Why not `prometheus_client`'s `Histogram`: it keeps its counts behind one mutex, and every
/// proxied request observes two histograms (its route's and its backend's). With a worker per
/// core, each request then took two locks whose cache lines the cores passed back and forth.
/// Here a worker adds to its own shard (aligned to a cache line pair, relaxed atomic adds on
/// integers: the sum is kept in nanoseconds), and a scrape adds the shards up. A scrape may
/// see an observation in `count` and not yet in its bucket; the next one sees both. The price
/// is memory: 256 bytes per worker (at most [`crate::upstream::WORKER_SLOTS`]) per series.
/// Measured by the `latency_contention` example (`BENCHMARKS.md`, session 17).
#[derive(Clone, Debug)]
pub struct Latency(Arc<[Shard]>);

#[repr(align(128))]
#[derive(Debug, Default)]
struct Shard {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; FINITE_BUCKETS + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Latency {
    /// A histogram with `shards` shards (at least one). Worker `i` writes shard `i % shards`.
    pub fn new(shards: usize) -> Latency {
        Latency((0..shards.max(1)).map(|_| Shard::default()).collect())
    }

    /// Counts one observation of `d`, in the calling worker's shard.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let shard = &self.0[crate::upstream::worker() % self.0.len()];
        shard.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        shard.count.fetch_add(1, Ordering::Relaxed);
        shard.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// `(sum in seconds, count, per-bucket counts with their upper bounds)`, all shards added.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> =
            (0..=FINITE_BUCKETS).map(|i| (upper_bound(i), 0)).collect();
        let (mut sum_ns, mut count) = (0u128, 0u64);
        for shard in self.0.iter() {
            for (b, n) in buckets.iter_mut().zip(&shard.buckets) {
                b.1 += n.load(Ordering::Relaxed);
            }
            count += shard.count.load(Ordering::Relaxed);
            sum_ns += u128::from(shard.sum_ns.load(Ordering::Relaxed));
        }
        // Precision: f64 holds 2^53 ns (104 days) of summed latency exactly.
        #[allow(clippy::cast_precision_loss)]
        let sum = sum_ns as f64 / 1e9;
        (sum, count, buckets)
    }
}

/// The bucket an observation of `ns` nanoseconds falls in: the first whose upper bound is at
/// least `ns` (`+Inf` past the last finite one).
fn bucket_of(ns: u64) -> usize {
    // In units of the first bound, rounded up: bucket i holds units in (2^(i-1), 2^i].
    let units = ns.div_ceil(FIRST_BUCKET_NS);
    if units <= 1 {
        return 0;
    }
    let i = (u64::BITS - (units - 1).leading_zeros()) as usize;
    i.min(FINITE_BUCKETS)
}

fn upper_bound(i: usize) -> f64 {
    if i >= FINITE_BUCKETS {
        f64::INFINITY
    } else {
        // Exact: at most 250,000 × 2^16 ns.
        #[allow(clippy::cast_precision_loss)]
        let ns = (FIRST_BUCKET_NS << i) as f64;
        ns / 1e9
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Every family, registered once.
#[derive(Clone)]
pub struct GatewayMetrics {
    requests: Family<RouteClassLabels, Counter>,
    duration: Family<RouteLabels, Latency, LatencyShards>,
    in_flight: Family<RouteLabels, Gauge>,
    rejected: Family<RouteClassLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    spills: Family<RouteLabels, Counter>,
    membership_changes: Family<RouteLabels, Counter>,
    keys_moved: Family<RouteLabels, Gauge<f64, AtomicU64>>,
    backends: Family<RouteClassLabels, Gauge>,
    backend_requests: Family<BackendClassLabels, Counter>,
    backend_duration: Family<BackendLabels, Latency, LatencyShards>,
    backend_in_flight: Family<BackendLabels, Gauge>,
    backend_ejections: Family<BackendLabels, Counter>,
    backend_connect_failures: Family<BackendLabels, Counter>,
    backend_tls_failures: Family<BackendClassLabels, Counter>,
    reloads: Family<RouteLabels, Counter>,
    worker_connections: Family<WorkerLabels, Gauge>,
}

/// Status classes, indexed by the first digit minus one.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: u16) -> usize {
    usize::from((status / 100).clamp(1, 5) - 1)
}

impl GatewayMetrics {
    /// Registers the families in `metrics`, for a gateway of `workers` proxy workers.
    pub fn register(metrics: &Metrics, workers: usize) -> GatewayMetrics {
        let shards = LatencyShards(workers.clamp(1, crate::upstream::WORKER_SLOTS));
        let m = GatewayMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(shards),
            in_flight: Family::default(),
            rejected: Family::default(),
            retries: Family::default(),
            spills: Family::default(),
            membership_changes: Family::default(),
            keys_moved: Family::default(),
            backends: Family::default(),
            backend_requests: Family::default(),
            backend_duration: Family::new_with_constructor(shards),
            backend_in_flight: Family::default(),
            backend_ejections: Family::default(),
            backend_connect_failures: Family::default(),
            backend_tls_failures: Family::default(),
            reloads: Family::default(),
            worker_connections: Family::default(),
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
            "worker_connections",
            "Client connections open on each proxy worker",
            m.worker_connections.clone(),
        );
        r.register(
            "route_reloads",
            "Routes versions from config-svc, by result (applied, rejected)",
            m.reloads.clone(),
        );
        m
    }

    /// The open-connection gauges of `workers` proxy workers (`worker` = 0, 1, …).
    pub fn worker_connections(&self, workers: usize) -> Vec<Gauge> {
        (0..workers)
            .map(|i| {
                self.worker_connections
                    .get_or_create(&[("worker", i.to_string())])
                    .clone()
            })
            .collect()
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
    pub duration: Latency,
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
    pub duration: Latency,
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

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
    use prometheus_client::registry::Registry;

    use super::*;

    fn text(metric: impl EncodeMetric + Send + Sync + std::fmt::Debug + 'static) -> String {
        let mut registry = Registry::default();
        registry.register("latency_seconds", "Latency", metric);
        let mut out = String::new();
        encode(&mut out, &registry).expect("encode");
        out
    }

    #[test]
    fn an_observation_on_a_bucket_bound_counts_in_that_bucket_and_one_past_it_in_the_next() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(250_000), 0);
        assert_eq!(bucket_of(250_001), 1);
        assert_eq!(bucket_of(500_000), 1);
        assert_eq!(bucket_of(500_001), 2);
        assert_eq!(bucket_of(1_000_000), 2);
        assert_eq!(bucket_of(250_000 << 16), 16);
        assert_eq!(bucket_of((250_000 << 16) + 1), FINITE_BUCKETS);
        assert_eq!(bucket_of(u64::MAX), FINITE_BUCKETS);
        for i in 0..FINITE_BUCKETS {
            let bound_ns = FIRST_BUCKET_NS << i;
            assert!((upper_bound(i) - bound_ns as f64 / 1e9).abs() < 1e-15);
            assert_eq!(bucket_of(bound_ns), i, "bound of bucket {i}");
            assert_eq!(bucket_of(bound_ns + 1), i + 1, "just past bucket {i}");
        }
    }

    #[test]
    fn the_sharded_histogram_encodes_as_prometheus_clients_histogram_of_the_same_observations() {
        let ours = Latency::new(4);
        let theirs = Histogram::new(exponential_buckets(0.000_25, 2.0, 17));
        // Microsecond-exact observations (f64 seconds compare as the same bucket).
        let us = [
            0, 100, 250, 251, 999, 1_000, 3_000, 70_000, 1_000_000, 20_000_000,
        ];
        for (n, &u) in us.iter().enumerate() {
            crate::upstream::set_worker(n);
            ours.observe(Duration::from_micros(u));
            theirs.observe(Duration::from_micros(u).as_secs_f64());
        }
        crate::upstream::set_worker(0);
        let (a, b) = (text(ours), text(theirs));
        assert!(a.contains("latency_seconds_count 10"), "{a}");
        assert!(a.contains("latency_seconds_bucket{le=\"+Inf\"} 10"), "{a}");
        // The sums may differ in the last bits (ours adds nanoseconds, theirs seconds).
        let sum = |t: &str| -> f64 {
            let line = t.lines().find(|l| l.starts_with("latency_seconds_sum"));
            let value = line.and_then(|l| l.split_whitespace().nth(1));
            value.and_then(|v| v.parse().ok()).expect("a sum line")
        };
        assert!((sum(&a) - 21.0756).abs() < 1e-9, "{a}");
        assert!((sum(&a) - sum(&b)).abs() < 1e-9);
        let without_sum = |t: &str| -> Vec<String> {
            let lines = t.lines().filter(|l| !l.starts_with("latency_seconds_sum"));
            lines.map(str::to_owned).collect()
        };
        assert_eq!(without_sum(&a), without_sum(&b));
    }

    #[test]
    fn observations_from_many_workers_at_once_are_all_counted() {
        // More workers than shards: some share one.
        let (shards, workers) = (4, 7);
        let latency = Latency::new(shards);
        std::thread::scope(|s| {
            for w in 0..workers {
                let latency = latency.clone();
                s.spawn(move || {
                    crate::upstream::set_worker(w);
                    for i in 0..1_000u64 {
                        latency.observe(Duration::from_micros(i));
                    }
                });
            }
        });
        let (sum, count, buckets) = latency.snapshot();
        let workers = workers as u64;
        assert_eq!(count, 1_000 * workers);
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), count);
        // 0..=250 µs in the first bucket, 251..=500 in the second, 501..=999 in the third.
        assert_eq!(buckets[0].1, 251 * workers);
        assert_eq!(buckets[1].1, 250 * workers);
        assert_eq!(buckets[2].1, 499 * workers);
        let expected = (999.0 * 1_000.0 / 2.0) * 1e-6 * workers as f64;
        assert!((sum - expected).abs() < 1e-9, "{sum} vs {expected}");
    }
}
