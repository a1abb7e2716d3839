//! The service's metrics, registered once in the shared admin registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// One label: `result` (`ok` or an error code).
type Result1 = [(&'static str, &'static str); 1];
/// `op` and `result`.
type OpResult = [(&'static str, &'static str); 2];

/// Every metric config-svc exports (names get the `config_` prefix).
#[derive(Clone)]
pub struct ConfigMetrics {
    /// `config_publishes_total{result}`: publish and rollback calls.
    pub publishes: Family<Result1, Counter>,
    /// `config_reads_total{result}`: get calls.
    pub reads: Family<Result1, Counter>,
    /// `config_operations_total{op,result}`: everything else (list, history, diff, delete,
    /// purge, options, promote, abort, validate).
    pub operations: Family<OpResult, Counter>,
    /// `config_watchers`: open watch streams (gRPC and REST).
    pub watchers: Gauge,
    /// `config_watch_updates_total`: versions sent to watchers.
    pub watch_updates: Counter,
    /// `config_push_latency_seconds`: from a change being written to its delivery to a
    /// watcher's stream (by this replica's clock).
    pub push_latency: Histogram,
    /// `config_watch_resyncs_total`: watchers that fell behind (or lost the coordinator's
    /// history) and re-read their items.
    pub watch_resyncs: Counter,
}

impl ConfigMetrics {
    /// Creates the metrics and registers them in `metrics`.
    pub fn register(metrics: &service_kit::admin::Metrics) -> ConfigMetrics {
        let m = ConfigMetrics::unregistered();
        let mut r = metrics.registry();
        let r = r.sub_registry_with_prefix("config");
        r.register(
            "publishes",
            "Publish and rollback calls by result",
            m.publishes.clone(),
        );
        r.register("reads", "Get calls by result", m.reads.clone());
        r.register(
            "operations",
            "Other calls by operation and result",
            m.operations.clone(),
        );
        r.register("watchers", "Open watch streams", m.watchers.clone());
        r.register(
            "watch_updates",
            "Versions sent to watchers",
            m.watch_updates.clone(),
        );
        r.register(
            "push_latency_seconds",
            "Time from a change being written to its delivery to a watcher",
            m.push_latency.clone(),
        );
        r.register(
            "watch_resyncs",
            "Watchers that re-read their items after falling behind",
            m.watch_resyncs.clone(),
        );
        m
    }

    /// Metrics registered nowhere (for tests and tools).
    pub fn unregistered() -> ConfigMetrics {
        ConfigMetrics {
            publishes: Family::default(),
            reads: Family::default(),
            operations: Family::default(),
            watchers: Gauge::default(),
            watch_updates: Counter::default(),
            push_latency: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            watch_resyncs: Counter::default(),
        }
    }

    fn label<T>(result: &crate::error::Result<T>) -> &'static str {
        match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        }
    }

    /// Counts one call in `family` by its outcome.
    pub fn count<T>(family: &Family<Result1, Counter>, result: &crate::error::Result<T>) {
        family
            .get_or_create(&[("result", Self::label(result))])
            .inc();
    }

    /// Counts one `op` call by its outcome.
    pub fn count_op<T>(&self, op: &'static str, result: &crate::error::Result<T>) {
        self.operations
            .get_or_create(&[("op", op), ("result", Self::label(result))])
            .inc();
    }
}
