//! The registry's domain: instance records, health check specs, service options, and the
//! validation every request goes through before anything is written. Pure: no I/O.
//!
//! These types are what is stored in the coordinator (as JSON) and what the REST face speaks;
//! the gRPC face converts to and from them (`grpc.rs`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::Invalid;

/// Lease TTL used when a registration asks for none, in seconds.
pub const DEFAULT_TTL_SECONDS: u32 = 10;
/// Shortest TTL accepted (the coordinator's minimum lease TTL).
pub const MIN_TTL_SECONDS: u32 = 2;
/// Longest TTL accepted.
pub const MAX_TTL_SECONDS: u32 = 3600;
/// Weight used when a registration asks for none.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;
/// Most metadata entries per instance.
pub const MAX_METADATA: usize = 64;
/// Most tags per instance.
pub const MAX_TAGS: usize = 64;

/// How clients talk to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 over TCP.
    #[default]
    Http,
    /// gRPC.
    Grpc,
    /// Plain TCP.
    Tcp,
}

/// What the registry last concluded about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Passing its check (or it has none: then only its TTL keeps it listed).
    #[default]
    Healthy,
    /// Failed its check `unhealthy_threshold` times in a row; kept, but excluded from
    /// healthy-only answers.
    Unhealthy,
}

/// How an instance is probed.
///
/// HTTP and gRPC checks can run over TLS (`tls`, as Consul's `tls_server_name` checks do):
/// the checking registry-svc replica verifies the instance's certificate against its
/// `--check-cacert` for `tls_server_name`, or for the registered address when that is empty,
/// and presents `--check-cert` when it has one. `tls` and `tls_server_name` are written only
/// when set, so a plain check is stored as it was before they existed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CheckKind {
    /// `GET http://address:port{path}` (`https://` with `tls`); a 2xx answer is healthy.
    Http {
        /// Path starting with `/`.
        path: String,
        /// Probe over TLS.
        #[serde(default, skip_serializing_if = "is_false")]
        tls: bool,
        /// The name the instance's certificate must carry (a DNS name or an IP address; `""`:
        /// the registered address). Only with `tls`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        tls_server_name: String,
    },
    /// A TCP connection is accepted.
    Tcp,
    /// `grpc.health.v1.Health/Check` answers `SERVING`.
    Grpc {
        /// The service name to ask about (`""`: the whole server).
        #[serde(default)]
        service: String,
        /// Probe over TLS.
        #[serde(default, skip_serializing_if = "is_false")]
        tls: bool,
        /// As for HTTP checks.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        tls_server_name: String,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How a check reaches its instance over TLS: the name the certificate is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckTls<'a> {
    /// `tls_server_name`, or `None` for the registered address.
    pub server_name: Option<&'a str>,
}

impl CheckKind {
    /// An HTTP check of `path`, plain.
    pub fn http(path: impl Into<String>) -> CheckKind {
        CheckKind::Http {
            path: path.into(),
            tls: false,
            tls_server_name: String::new(),
        }
    }

    /// A gRPC check of `service`, plain.
    pub fn grpc(service: impl Into<String>) -> CheckKind {
        CheckKind::Grpc {
            service: service.into(),
            tls: false,
            tls_server_name: String::new(),
        }
    }

    /// `Some` when the check runs over TLS.
    pub fn tls(&self) -> Option<CheckTls<'_>> {
        match self {
            CheckKind::Http {
                tls: true,
                tls_server_name,
                ..
            }
            | CheckKind::Grpc {
                tls: true,
                tls_server_name,
                ..
            } => Some(CheckTls {
                server_name: (!tls_server_name.is_empty()).then_some(tls_server_name.as_str()),
            }),
            _ => None,
        }
    }
}

/// An active health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckSpec {
    /// What to probe.
    #[serde(flatten)]
    pub kind: CheckKind,
    /// Time between probes, in milliseconds (default 5000, 100 ..= 3 600 000).
    #[serde(default)]
    pub interval_ms: u32,
    /// Time one probe may take, in milliseconds (default 1000, 10 ..= interval).
    #[serde(default)]
    pub timeout_ms: u32,
    /// Consecutive successes that make an unhealthy instance healthy (default 2, 1 ..= 100).
    #[serde(default)]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy instance unhealthy (default 3, 1 ..= 100).
    #[serde(default)]
    pub unhealthy_threshold: u32,
}

/// One registered instance of a service, as stored under its key and as returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Namespace (a name, see [`validate_name`]).
    pub namespace: String,
    /// Service (a name).
    pub service: String,
    /// Instance ID, unique within the service (generated when registering without one).
    #[serde(default)]
    pub instance_id: String,
    /// IP address or DNS name.
    pub address: String,
    /// 1 ..= 65535 (wider type so that a bad value reaches validation).
    pub port: u32,
    /// How to talk to it.
    #[serde(default)]
    pub protocol: Protocol,
    /// Free-form key/value pairs.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Labels, matched by discovery filters.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Relative weight for load balancing (default 100).
    #[serde(default)]
    pub weight: u32,
    /// Availability zone, if any.
    #[serde(default)]
    pub zone: String,
    /// Active health check, if any.
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    /// Lease TTL in seconds: the instance vanishes this long after its last heartbeat.
    #[serde(default)]
    pub ttl_seconds: u32,
    /// Health as last concluded by a checker.
    #[serde(default)]
    pub health: HealthStatus,
    /// Why the last health transition happened.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health_detail: String,
    /// Coordinator revision of the record's last change (not stored; filled in on read).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Settings of a whole service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceOptions {
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// Service.
    #[serde(default)]
    pub service: String,
    /// Nacos-style protect threshold, 0.0 ..= 1.0 (0: off). When a healthy-only discovery
    /// finds that fewer than this fraction of the matching instances are healthy, it returns
    /// the unhealthy ones too, so a mass failure or a broken check never empties a pool.
    #[serde(default)]
    pub protect_threshold: f64,
}

/// Which instance a heartbeat or deregistration is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstanceRef {
    /// Namespace.
    pub namespace: String,
    /// Service.
    pub service: String,
    /// Instance ID.
    pub instance_id: String,
}

impl InstanceRef {
    /// Checks every part.
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_name("namespace", &self.namespace)?;
        validate_name("service", &self.service)?;
        validate_instance_id(&self.instance_id)
    }
}

impl Instance {
    /// The reference to this instance.
    pub fn reference(&self) -> InstanceRef {
        InstanceRef {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            instance_id: self.instance_id.clone(),
        }
    }

    /// `address:port` (IPv6 in brackets), for connecting.
    pub fn socket_addr(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    /// Validates a registration and fills in defaults (ID, weight, TTL, check timings). The
    /// health fields are reset: a new registration starts healthy.
    pub fn normalize_for_registration(mut self) -> Result<Instance, Invalid> {
        validate_name("namespace", &self.namespace)?;
        validate_name("service", &self.service)?;
        if self.instance_id.is_empty() {
            self.instance_id = new_instance_id();
        }
        validate_instance_id(&self.instance_id)?;
        validate_address(&self.address)?;
        if self.port == 0 || self.port > 65535 {
            return Err(Invalid::new(format!(
                "port {} is out of range: expected 1 to 65535",
                self.port
            )));
        }
        if self.weight == 0 {
            self.weight = DEFAULT_WEIGHT;
        }
        if self.weight > MAX_WEIGHT {
            return Err(Invalid::new(format!(
                "weight {} is out of range: expected 1 to {MAX_WEIGHT}",
                self.weight
            )));
        }
        if !self.zone.is_empty() {
            validate_name("zone", &self.zone)?;
        }
        if self.tags.len() > MAX_TAGS {
            return Err(Invalid::new(format!(
                "{} tags given; at most {MAX_TAGS} are allowed",
                self.tags.len()
            )));
        }
        for tag in &self.tags {
            validate_tag(tag)?;
        }
        if self.metadata.len() > MAX_METADATA {
            return Err(Invalid::new(format!(
                "{} metadata entries given; at most {MAX_METADATA} are allowed",
                self.metadata.len()
            )));
        }
        for (k, v) in &self.metadata {
            validate_metadata(k, v)?;
        }
        if self.ttl_seconds == 0 {
            self.ttl_seconds = DEFAULT_TTL_SECONDS;
        }
        if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&self.ttl_seconds) {
            return Err(Invalid::new(format!(
                "ttl_seconds {} is out of range: expected {MIN_TTL_SECONDS} to {MAX_TTL_SECONDS} (0 for the default {DEFAULT_TTL_SECONDS})",
                self.ttl_seconds
            )));
        }
        if let Some(check) = self.health_check.take() {
            self.health_check = Some(check.normalize()?);
        }
        self.health = HealthStatus::Healthy;
        self.health_detail.clear();
        self.revision = 0;
        Ok(self)
    }

    /// Whether the instance matches discovery filters (every tag, the zone if given, every
    /// metadata pair).
    pub fn matches(&self, filter: &DiscoverFilter) -> bool {
        filter.tags.iter().all(|t| self.tags.contains(t))
            && (filter.zone.is_empty() || filter.zone == self.zone)
            && filter
                .metadata
                .iter()
                .all(|(k, v)| self.metadata.get(k) == Some(v))
    }
}

impl HealthCheckSpec {
    /// Validates and fills in defaults.
    pub fn normalize(mut self) -> Result<HealthCheckSpec, Invalid> {
        if let CheckKind::Http { path, .. } = &self.kind
            && (!path.starts_with('/')
                || path.len() > 1024
                || path.chars().any(|c| c.is_control() || c == ' '))
        {
            return Err(Invalid::new(format!(
                "health_check.path {path:?} must start with '/' and hold no spaces or control characters"
            )));
        }
        if let CheckKind::Http {
            tls,
            tls_server_name,
            ..
        }
        | CheckKind::Grpc {
            tls,
            tls_server_name,
            ..
        } = &self.kind
            && !tls_server_name.is_empty()
        {
            if !tls {
                return Err(Invalid::new(format!(
                    "health_check.tls_server_name {tls_server_name:?} needs health_check.tls = true"
                )));
            }
            if validate_address(tls_server_name).is_err() {
                return Err(Invalid::new(format!(
                    "health_check.tls_server_name {tls_server_name:?} must be a DNS name or an IP address"
                )));
            }
        }
        if self.interval_ms == 0 {
            self.interval_ms = 5000;
        }
        if self.timeout_ms == 0 {
            self.timeout_ms = 1000.min(self.interval_ms);
        }
        if self.healthy_threshold == 0 {
            self.healthy_threshold = 2;
        }
        if self.unhealthy_threshold == 0 {
            self.unhealthy_threshold = 3;
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(Invalid::new(format!(
                "health_check.interval_ms {} is out of range: expected 100 to 3600000",
                self.interval_ms
            )));
        }
        if self.timeout_ms < 10 || self.timeout_ms > self.interval_ms {
            return Err(Invalid::new(format!(
                "health_check.timeout_ms {} is out of range: expected 10 to interval_ms ({})",
                self.timeout_ms, self.interval_ms
            )));
        }
        for (name, v) in [
            ("healthy_threshold", self.healthy_threshold),
            ("unhealthy_threshold", self.unhealthy_threshold),
        ] {
            if v > 100 {
                return Err(Invalid::new(format!(
                    "health_check.{name} {v} is out of range: expected 1 to 100"
                )));
            }
        }
        Ok(self)
    }
}

impl ServiceOptions {
    /// Validates the names and the threshold.
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_name("namespace", &self.namespace)?;
        validate_name("service", &self.service)?;
        if !(0.0..=1.0).contains(&self.protect_threshold) {
            return Err(Invalid::new(format!(
                "protect_threshold {} is out of range: expected 0.0 to 1.0",
                self.protect_threshold
            )));
        }
        Ok(())
    }
}

/// Discovery filters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiscoverFilter {
    /// Every tag must be present.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Only this zone, if not empty.
    #[serde(default)]
    pub zone: String,
    /// Every pair must match.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Only healthy instances (subject to the protect threshold).
    #[serde(default)]
    pub healthy_only: bool,
}

/// Applies the filters and the protect threshold; returns the instances and whether the
/// threshold made unhealthy instances count.
pub fn select(
    instances: Vec<Instance>,
    filter: &DiscoverFilter,
    protect_threshold: f64,
) -> (Vec<Instance>, bool) {
    let matching: Vec<Instance> = instances
        .into_iter()
        .filter(|i| i.matches(filter))
        .collect();
    if !filter.healthy_only || matching.is_empty() {
        return (matching, false);
    }
    let healthy = matching
        .iter()
        .filter(|i| i.health == HealthStatus::Healthy)
        .count();
    let fraction = healthy as f64 / matching.len() as f64;
    if protect_threshold > 0.0 && fraction < protect_threshold {
        return (matching, true);
    }
    (
        matching
            .into_iter()
            .filter(|i| i.health == HealthStatus::Healthy)
            .collect(),
        false,
    )
}

/// A random 16-hex-digit instance ID.
pub fn new_instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Namespaces, services and zones: 1 to 63 characters of `a-z 0-9 . _ -`, starting with a
/// letter or digit (they become parts of coordinator keys, so no `/`).
pub fn validate_name(what: &str, name: &str) -> Result<(), Invalid> {
    if name.is_empty() {
        return Err(Invalid::new(format!("{what} is empty")));
    }
    if name.len() > 63 {
        return Err(Invalid::new(format!(
            "{what} {name:?} is longer than 63 characters"
        )));
    }
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !rest_ok {
        return Err(Invalid::new(format!(
            "{what} {name:?} is invalid: use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// Instance IDs: 1 to 128 characters of `A-Z a-z 0-9 . _ : -`.
pub fn validate_instance_id(id: &str) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(Invalid::new("instance_id is empty"));
    }
    if id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(Invalid::new(format!(
            "instance_id {id:?} is invalid: 1 to 128 characters of letters, digits, '.', '_', ':' and '-'"
        )));
    }
    Ok(())
}

/// An IP address, or a DNS name (labels of letters, digits and `-`, separated by dots).
pub fn validate_address(address: &str) -> Result<(), Invalid> {
    if address.is_empty() {
        return Err(Invalid::new("address is empty"));
    }
    if address.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let valid_name = address.len() <= 253
        && address.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid_name {
        return Err(Invalid::new(format!(
            "address {address:?} is neither an IP address nor a host name (give the host only: no scheme, port or path)"
        )));
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), Invalid> {
    if tag.is_empty() || tag.len() > 128 || tag.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Invalid::new(format!(
            "tag {tag:?} is invalid: 1 to 128 characters, no spaces or control characters"
        )));
    }
    Ok(())
}

fn validate_metadata(key: &str, value: &str) -> Result<(), Invalid> {
    if key.is_empty()
        || key.len() > 128
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    {
        return Err(Invalid::new(format!(
            "metadata key {key:?} is invalid: 1 to 128 characters of letters, digits, '.', '_', '-' and '/'"
        )));
    }
    if value.len() > 1024 {
        return Err(Invalid::new(format!(
            "metadata value of {key:?} is longer than 1024 bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance {
            namespace: "prod".into(),
            service: "orders".into(),
            instance_id: String::new(),
            address: "10.0.0.1".into(),
            port: 8080,
            protocol: Protocol::Http,
            metadata: BTreeMap::new(),
            tags: vec![],
            weight: 0,
            zone: String::new(),
            health_check: None,
            ttl_seconds: 0,
            health: HealthStatus::Unhealthy,
            health_detail: "old".into(),
            revision: 7,
        }
    }

    fn err_text(r: Result<Instance, Invalid>) -> String {
        r.expect_err("must be rejected").to_string()
    }

    #[test]
    fn registration_gets_defaults_and_starts_healthy() {
        let i = instance().normalize_for_registration().expect("valid");
        assert_eq!(i.instance_id.len(), 16);
        assert_eq!(i.weight, DEFAULT_WEIGHT);
        assert_eq!(i.ttl_seconds, DEFAULT_TTL_SECONDS);
        assert_eq!(i.health, HealthStatus::Healthy);
        assert!(i.health_detail.is_empty());
        assert_eq!(i.revision, 0);
    }

    #[test]
    fn bad_input_is_rejected_with_a_message_naming_the_field() {
        let mut i = instance();
        i.port = 0;
        assert!(err_text(i.normalize_for_registration()).contains("port 0"));
        let mut i = instance();
        i.port = 70000;
        assert!(err_text(i.normalize_for_registration()).contains("port 70000"));
        let mut i = instance();
        i.namespace = String::new();
        assert!(err_text(i.normalize_for_registration()).contains("namespace is empty"));
        let mut i = instance();
        i.service = "Bad/Name".into();
        assert!(err_text(i.normalize_for_registration()).contains("service \"Bad/Name\""));
        let mut i = instance();
        i.address = "http://x:80".into();
        assert!(err_text(i.normalize_for_registration()).contains("address"));
        let mut i = instance();
        i.ttl_seconds = 1;
        assert!(err_text(i.normalize_for_registration()).contains("ttl_seconds 1"));
        let mut i = instance();
        i.ttl_seconds = 100_000;
        assert!(err_text(i.normalize_for_registration()).contains("ttl_seconds"));
        let mut i = instance();
        i.instance_id = "a b".into();
        assert!(err_text(i.normalize_for_registration()).contains("instance_id"));
    }

    #[test]
    fn addresses_may_be_ips_or_host_names() {
        for ok in [
            "10.1.2.3",
            "::1",
            "fe80::1",
            "orders-1.svc.local",
            "localhost",
        ] {
            validate_address(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "a..b", "-x.com", "x:80", "a/b", "not an address"] {
            assert!(validate_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn health_check_defaults_and_bounds() {
        let spec = HealthCheckSpec {
            kind: CheckKind::Tcp,
            interval_ms: 0,
            timeout_ms: 0,
            healthy_threshold: 0,
            unhealthy_threshold: 0,
        }
        .normalize()
        .expect("valid");
        assert_eq!(
            (
                spec.interval_ms,
                spec.timeout_ms,
                spec.healthy_threshold,
                spec.unhealthy_threshold
            ),
            (5000, 1000, 2, 3)
        );
        let slow = HealthCheckSpec {
            timeout_ms: 6000,
            ..spec.clone()
        };
        assert!(slow.normalize().is_err(), "timeout above interval");
        let bad_path = HealthCheckSpec {
            kind: CheckKind::http("healthz"),
            ..spec
        };
        assert!(bad_path.normalize().is_err());
    }

    #[test]
    fn check_spec_json_is_flat_with_a_type_tag() {
        let json = r#"{"type":"http","path":"/h","interval_ms":500}"#;
        let spec: HealthCheckSpec = serde_json::from_str(json).expect("parse");
        assert_eq!(spec.kind, CheckKind::http("/h"));
        assert_eq!(spec.interval_ms, 500);
        let back = serde_json::to_value(&spec).expect("json");
        assert_eq!(back["type"], "http");
        assert_eq!(back["path"], "/h");
        assert!(
            back.get("tls").is_none() && back.get("tls_server_name").is_none(),
            "a plain check is stored as before TLS checks existed: {back}"
        );
    }

    #[test]
    fn tls_checks_read_their_server_name_and_write_it_back() {
        let json = r#"{"type":"http","path":"/h","tls":true,"tls_server_name":"demo-1"}"#;
        let spec: HealthCheckSpec = serde_json::from_str(json).expect("parse");
        assert_eq!(
            spec.kind.tls(),
            Some(CheckTls {
                server_name: Some("demo-1")
            })
        );
        let spec = spec.normalize().expect("valid");
        let back = serde_json::to_value(&spec).expect("json");
        assert_eq!(
            (&back["tls"], &back["tls_server_name"]),
            (&true.into(), &"demo-1".into())
        );

        let json = r#"{"type":"grpc","tls":true}"#;
        let spec: HealthCheckSpec = serde_json::from_str(json).expect("parse");
        assert_eq!(
            spec.kind.tls(),
            Some(CheckTls { server_name: None }),
            "the registered address"
        );
        let ip = r#"{"type":"grpc","tls":true,"tls_server_name":"10.0.0.7"}"#;
        let spec: HealthCheckSpec = serde_json::from_str(ip).expect("parse");
        spec.normalize().expect("an IP address is a server name");
        assert_eq!(CheckKind::http("/x").tls(), None);
        assert_eq!(CheckKind::Tcp.tls(), None);
    }

    #[test]
    fn a_bad_tls_server_name_is_refused_saying_why() {
        let refused = |json: &str| {
            serde_json::from_str::<HealthCheckSpec>(json)
                .expect("parse")
                .normalize()
                .expect_err("must be refused")
                .to_string()
        };
        let e = refused(r#"{"type":"http","path":"/h","tls_server_name":"demo-1"}"#);
        assert!(e.contains("needs health_check.tls = true"), "{e}");
        let e = refused(r#"{"type":"grpc","tls":false,"tls_server_name":"demo-1"}"#);
        assert!(e.contains("needs health_check.tls = true"), "{e}");
        for bad in ["https://demo-1", "demo 1", "demo-1:8500", "a..b"] {
            let e = refused(&format!(
                r#"{{"type":"http","path":"/h","tls":true,"tls_server_name":"{bad}"}}"#
            ));
            assert!(
                e.contains("tls_server_name") && e.contains("must be a DNS name or an IP address"),
                "{bad}: {e}"
            );
        }
    }

    fn with_health(id: &str, health: HealthStatus, zone: &str) -> Instance {
        let mut i = instance();
        i.instance_id = id.into();
        i.health = health;
        i.zone = zone.into();
        i
    }

    #[test]
    fn healthy_only_drops_unhealthy_instances_above_the_threshold() {
        let all = vec![
            with_health("a", HealthStatus::Healthy, "z1"),
            with_health("b", HealthStatus::Healthy, "z1"),
            with_health("c", HealthStatus::Unhealthy, "z1"),
        ];
        let filter = DiscoverFilter {
            healthy_only: true,
            ..Default::default()
        };
        let (got, protected) = select(all.clone(), &filter, 0.5);
        assert_eq!(got.len(), 2);
        assert!(!protected);
        // 2/3 healthy is below 0.8: everything comes back, flagged.
        let (got, protected) = select(all, &filter, 0.8);
        assert_eq!(got.len(), 3);
        assert!(protected);
    }

    #[test]
    fn filters_need_every_tag_the_zone_and_every_metadata_pair() {
        let mut a = with_health("a", HealthStatus::Healthy, "z1");
        a.tags = vec!["v2".into(), "canary".into()];
        a.metadata.insert("team".into(), "x".into());
        let b = with_health("b", HealthStatus::Healthy, "z2");
        let mut filter = DiscoverFilter {
            tags: vec!["v2".into()],
            ..Default::default()
        };
        assert_eq!(select(vec![a.clone(), b.clone()], &filter, 0.0).0.len(), 1);
        filter.zone = "z2".into();
        assert!(
            select(vec![a.clone(), b.clone()], &filter, 0.0)
                .0
                .is_empty()
        );
        let filter = DiscoverFilter {
            metadata: [("team".to_string(), "x".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(select(vec![a, b], &filter, 0.0).0[0].instance_id, "a");
    }
}
