//! The service's Prometheus metrics, registered in the admin server's registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use service_kit::admin::Metrics;

/// Labels of the request counter: `face` (`http` or `grpc`) and `code`.
pub type RequestLabels = [(&'static str, String); 2];

/// Handles to every metric; cheap to clone (the handles are shared).
#[derive(Clone, Debug)]
pub struct DemoMetrics {
    /// `demo_requests_total{face,code}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `demo_settings_version`: the config-svc version in use (0 = defaults).
    pub settings_version: Gauge,
    /// `demo_settings_updates_total`: versions taken into use.
    pub settings_updates: Counter,
    /// `demo_settings_rejected_total`: versions refused (invalid documents).
    pub settings_rejected: Counter,
    /// `demo_registered`: 1 while registered.
    pub registered: Gauge,
    /// `demo_registration_failures_total`: failed registration attempts.
    pub registration_failures: Counter,
}

impl DemoMetrics {
    /// Creates the metrics and registers them in `metrics`.
    pub fn register(metrics: &Metrics) -> DemoMetrics {
        let m = DemoMetrics {
            requests: Family::default(),
            settings_version: Gauge::default(),
            settings_updates: Counter::default(),
            settings_rejected: Counter::default(),
            registered: Gauge::default(),
            registration_failures: Counter::default(),
        };
        let mut r = metrics.registry();
        r.register(
            "demo_requests",
            "Requests answered, by face and code",
            m.requests.clone(),
        );
        r.register(
            "demo_settings_version",
            "The config-svc version of the settings in use (0: defaults)",
            m.settings_version.clone(),
        );
        r.register(
            "demo_settings_updates",
            "Settings versions taken into use",
            m.settings_updates.clone(),
        );
        r.register(
            "demo_settings_rejected",
            "Settings versions refused as invalid",
            m.settings_rejected.clone(),
        );
        r.register(
            "demo_registered",
            "1 while registered",
            m.registered.clone(),
        );
        r.register(
            "demo_registration_failures",
            "Failed registration attempts",
            m.registration_failures.clone(),
        );
        m
    }
}
