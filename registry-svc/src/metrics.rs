//! The service's metrics, registered once in the shared admin registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Label sets: `result` (`ok` or an error code).
type Result1 = [(&'static str, &'static str); 1];
/// `kind` (`http`, `tcp`, `grpc`) and `result` (`pass`, `fail`).
type Check = [(&'static str, &'static str); 2];

/// Every metric registry-svc exports (names get the `registry_` prefix).
#[derive(Clone)]
pub struct RegistryMetrics {
    /// `registry_registrations_total{result}`.
    pub registrations: Family<Result1, Counter>,
    /// `registry_heartbeats_total{result}`.
    pub heartbeats: Family<Result1, Counter>,
    /// `registry_deregistrations_total{result}`.
    pub deregistrations: Family<Result1, Counter>,
    /// `registry_discoveries_total{result}`.
    pub discoveries: Family<Result1, Counter>,
    /// `registry_health_checks_total{kind,result}`.
    pub health_checks: Family<Check, Counter>,
    /// `registry_health_check_duration_seconds{kind}`.
    pub health_check_seconds: Family<[(&'static str, &'static str); 1], Histogram>,
    /// `registry_health_transitions_total{to}`.
    pub health_transitions: Family<[(&'static str, &'static str); 1], Counter>,
    /// `registry_watchers`: open watch streams (gRPC and REST).
    pub watchers: Gauge,
    /// `registry_probed_instances`: instances this replica checks.
    pub probed_instances: Gauge,
    /// `registry_live_replicas`: replicas this one sees.
    pub live_replicas: Gauge,
}

fn histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

impl RegistryMetrics {
    /// Creates the metrics and registers them in `metrics`.
    pub fn register(metrics: &service_kit::admin::Metrics) -> RegistryMetrics {
        let m = RegistryMetrics {
            registrations: Family::default(),
            heartbeats: Family::default(),
            deregistrations: Family::default(),
            discoveries: Family::default(),
            health_checks: Family::default(),
            health_check_seconds: Family::new_with_constructor(histogram),
            health_transitions: Family::default(),
            watchers: Gauge::default(),
            probed_instances: Gauge::default(),
            live_replicas: Gauge::default(),
        };
        let mut r = metrics.registry();
        let r = r.sub_registry_with_prefix("registry");
        r.register(
            "registrations",
            "Register calls by result",
            m.registrations.clone(),
        );
        r.register("heartbeats", "Heartbeats by result", m.heartbeats.clone());
        r.register(
            "deregistrations",
            "Deregister calls by result",
            m.deregistrations.clone(),
        );
        r.register(
            "discoveries",
            "Discover calls by result",
            m.discoveries.clone(),
        );
        r.register(
            "health_checks",
            "Health probes by kind and result",
            m.health_checks.clone(),
        );
        r.register(
            "health_check_duration_seconds",
            "Health probe latency by kind",
            m.health_check_seconds.clone(),
        );
        r.register(
            "health_transitions",
            "Instances marked healthy or unhealthy",
            m.health_transitions.clone(),
        );
        r.register("watchers", "Open watch streams", m.watchers.clone());
        r.register(
            "probed_instances",
            "Instances this replica health-checks",
            m.probed_instances.clone(),
        );
        r.register(
            "live_replicas",
            "Registry replicas this replica sees",
            m.live_replicas.clone(),
        );
        m
    }

    /// Counts one call in `family` by its outcome.
    pub fn count<T>(family: &Family<Result1, Counter>, result: &crate::error::Result<T>) {
        let label = match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        family.get_or_create(&[("result", label)]).inc();
    }
}
