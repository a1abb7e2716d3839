//! The routes file: what the gateway serves and how (TOML).
//!
//! ```toml
//! [gateway]                          # all optional
//! max_in_flight = 10000              # load shedding: 503 beyond this many requests in flight
//! rate_limit.global = { per_second = 20000, burst = 40000 }
//! rate_limit.per_client_ip = { per_second = 500, burst = 1000 }
//!
//! [[routes]]
//! name = "orders"                    # unique; used in metrics, logs and the admin API
//! match = { host = "api.example.com", path_prefix = "/orders" }   # or grpc_service = "pkg.Svc"
//! backend = { namespace = "prod", service = "orders", tags = ["v2"], zone = "eu-1" }
//!                                    # more backend keys: protocol = "auto" | "http1" | "http2";
//!                                    # tls = true (dial the instances over TLS: needs the
//!                                    # gateway's --backend-cacert); tls_server_name =
//!                                    # "orders.internal" (the name their certificates must
//!                                    # carry, sent as SNI; default: each registered address)
//! rewrite_prefix = "/v2/orders"      # replaces the matched path_prefix
//! hash = "header:x-user-id"          # none | path | uri | client_ip | header:N | cookie:N | query:N
//! algorithm = "maglev"               # ring (default) | maglev
//! bounded_load = true                # default true
//! epsilon = 0.25                     # default 0.25
//! timeouts = { connect = "1s", per_try = "15s", overall = "30s" }
//! retries = { attempts = 2, budget_percent = 20, min_per_second = 10 }
//! outlier = { consecutive_5xx = 5, consecutive_connect_failures = 3, base_ejection = "10s" }
//! circuit_breaker = { max_requests = 1024 }
//! rate_limit.per_client_ip = { per_second = 100, burst = 200 }
//! ```
//!
//! Routes are tried in file order; the first whose every condition holds takes the request.
//! `path_prefix` matches whole segments (`/orders` matches `/orders`, `/orders/7`,
//! `/orders?x` but not `/ordersx`); a prefix ending in `/` matches literally. `host` matches the
//! `Host` header (or `:authority`) without its port, exactly or as `*.suffix`. `grpc_service`
//! matches gRPC requests (content type `application/grpc…`) to `/pkg.Service/…`.
//!
//! `backend.tls = true` makes the gateway dial the route's instances over TLS (Envoy's per-cluster
//! upstream TLS): the certificate each instance presents must chain to the gateway's
//! `--backend-cacert` and name `backend.tls_server_name`, or else the instance's registered
//! address (an IP address or DNS name); that name is also sent as SNI when it is a DNS name. The
//! gateway presents its `--backend-cert` to backends that ask for a client certificate. A
//! handshake that fails is a failed connect (the next choice, or 502), never a plaintext request.
//! A route with `tls` on is refused (at start, or when a routes version arrives) if the gateway
//! has no `--backend-cacert`.
//!
//! Every field is checked at load: unknown keys, bad durations, an empty or duplicate name, a
//! Maglev size that is not a prime, a rewrite without a prefix, a `tls_server_name` without
//! `tls` or that is neither a DNS name nor an IP address; the error names the route and the
//! field, and `main` exits 64 with it.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use http::HeaderName;
use serde::{Deserialize, Deserializer, Serialize};

use crate::hash::maglev::{DEFAULT_TABLE_SIZE, is_prime};
use crate::hash::ring::DEFAULT_VNODES;
use crate::hash::{Algorithm, hash_key};

/// A routes file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// The file cannot be read.
    #[error("cannot read the routes file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not have the expected shape.
    #[error("routes file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("routes file {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, naming the route and field.
        message: String,
    },
}

/// The parsed and checked routes file.
#[derive(Debug, Clone, Serialize)]
pub struct RoutesFile {
    /// Gateway-wide settings.
    pub gateway: GatewaySettings,
    /// The routes, in matching order.
    pub routes: Vec<Route>,
}

/// Gateway-wide settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// Requests in flight over the whole gateway beyond which new ones are shed with 503.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u64,
    /// Rate limits over every route.
    #[serde(default)]
    pub rate_limit: RateLimits,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            max_in_flight: default_max_in_flight(),
            rate_limit: RateLimits::default(),
        }
    }
}

fn default_max_in_flight() -> u64 {
    10_000
}

/// A global and a per-client-IP limit, each optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Over all clients.
    pub global: Option<Rate>,
    /// Per client IP address.
    pub per_client_ip: Option<Rate>,
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Sustained requests per second (> 0).
    pub per_second: f64,
    /// Requests allowed at once (≥ 1; default: one second's worth).
    #[serde(default)]
    pub burst: Option<u32>,
}

impl Rate {
    /// The burst, defaulting to one second's worth (at least 1).
    pub fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
            .max(1)
    }
}

/// One route.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Conditions, all of which must hold.
    #[serde(rename = "match", default)]
    pub matcher: Match,
    /// The registry service whose instances serve the route.
    pub backend: BackendRef,
    /// Replaces the matched `path_prefix`.
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    /// Where the hash key comes from.
    #[serde(default, deserialize_with = "de_hash", serialize_with = "ser_hash")]
    pub hash: HashOn,
    /// Ring or Maglev.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Ring points per 100 of weight.
    #[serde(default = "default_vnodes")]
    pub vnodes: u32,
    /// Maglev table size (a prime larger than the number of instances).
    #[serde(default = "default_table_size")]
    pub table_size: usize,
    /// Bounded loads on or off.
    #[serde(default = "yes")]
    pub bounded_load: bool,
    /// The bounded-load factor ε: no instance takes more than (1 + ε) × the mean load.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Retries.
    #[serde(default)]
    pub retries: Retries,
    /// Passive outlier ejection.
    #[serde(default)]
    pub outlier: Outlier,
    /// Per-instance circuit breaker.
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    /// Rate limits of this route, on top of the gateway's.
    #[serde(default)]
    pub rate_limit: RateLimits,
}

impl Route {
    /// The bounded-load factor, if bounded loads are on.
    pub fn epsilon(&self) -> Option<f64> {
        self.bounded_load.then_some(self.epsilon)
    }
}

fn yes() -> bool {
    true
}
fn default_vnodes() -> u32 {
    DEFAULT_VNODES
}
fn default_table_size() -> usize {
    DEFAULT_TABLE_SIZE
}
fn default_epsilon() -> f64 {
    0.25
}

/// Match conditions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Host, exact or `*.suffix`.
    pub host: Option<String>,
    /// Path prefix (whole segments unless it ends with `/`).
    pub path_prefix: Option<String>,
    /// gRPC service, `package.Service`.
    pub grpc_service: Option<String>,
}

/// The registry service of a route, with optional filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    /// Registry namespace.
    pub namespace: String,
    /// Registry service.
    pub service: String,
    /// Instances must carry every one of these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Only instances of this zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// How to talk to the instances.
    #[serde(default)]
    pub protocol: BackendProtocol,
    /// Dial the instances over TLS (as an Envoy cluster's upstream TLS context): their
    /// certificates are checked against the gateway's `--backend-cacert`, and the gateway
    /// presents `--backend-cert` when it has one. ALPN offers `h2` to HTTP/2 backends and
    /// `http/1.1` to HTTP/1.1 ones.
    #[serde(default)]
    pub tls: bool,
    /// The name the instances' certificates must carry, also sent as SNI (a DNS name or an IP
    /// address). Default: each instance's registered address. Only with `tls = true`.
    #[serde(default)]
    pub tls_server_name: Option<String>,
}

/// How the gateway talks to a route's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/2 (prior knowledge) for instances registered as gRPC and for gRPC requests,
    /// HTTP/1.1 otherwise.
    #[default]
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// Timeouts of a route.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Establishing a connection to an instance: TCP, and the TLS handshake for TLS backends.
    #[serde(default = "d_connect", with = "duration")]
    pub connect: Duration,
    /// One try: from sending the request to the response's headers.
    #[serde(default = "d_per_try", with = "duration")]
    pub per_try: Duration,
    /// Every try together, until the response's headers.
    #[serde(default = "d_overall", with = "duration")]
    pub overall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: d_connect(),
            per_try: d_per_try(),
            overall: d_overall(),
        }
    }
}

fn d_connect() -> Duration {
    Duration::from_secs(1)
}
fn d_per_try() -> Duration {
    Duration::from_secs(15)
}
fn d_overall() -> Duration {
    Duration::from_secs(30)
}

/// Retries of a route.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Tries per request, the first included (1: no retry).
    #[serde(default = "d_attempts")]
    pub attempts: u32,
    /// Retries may add at most this percentage of the route's requests...
    #[serde(default = "d_budget_percent")]
    pub budget_percent: u32,
    /// ...plus this many retries per second.
    #[serde(default = "d_min_per_second")]
    pub min_per_second: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: d_attempts(),
            budget_percent: d_budget_percent(),
            min_per_second: d_min_per_second(),
        }
    }
}

fn d_attempts() -> u32 {
    2
}
fn d_budget_percent() -> u32 {
    20
}
fn d_min_per_second() -> u32 {
    10
}

/// Passive outlier ejection of a route.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// Consecutive 5xx answers that eject an instance (0: never).
    #[serde(default = "d_5xx")]
    pub consecutive_5xx: u32,
    /// Consecutive failures to connect (or to get an answer at all) that eject (0: never).
    #[serde(default = "d_connect_failures")]
    pub consecutive_connect_failures: u32,
    /// First ejection; the n-th in a row lasts n times as long.
    #[serde(default = "d_base_ejection", with = "duration")]
    pub base_ejection: Duration,
    /// Longest ejection.
    #[serde(default = "d_max_ejection", with = "duration")]
    pub max_ejection: Duration,
    /// At most this share of the pool is ejected at once (at least one instance if > 0).
    #[serde(default = "d_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_5xx: d_5xx(),
            consecutive_connect_failures: d_connect_failures(),
            base_ejection: d_base_ejection(),
            max_ejection: d_max_ejection(),
            max_ejected_percent: d_max_ejected_percent(),
        }
    }
}

fn d_5xx() -> u32 {
    5
}
fn d_connect_failures() -> u32 {
    3
}
fn d_base_ejection() -> Duration {
    Duration::from_secs(10)
}
fn d_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn d_max_ejected_percent() -> u32 {
    50
}

/// Per-instance circuit breaker of a route.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Requests in flight to one instance beyond which it takes no more (they go to the
    /// next candidate, or get 503 if none is left).
    #[serde(default = "d_max_requests")]
    pub max_requests: u64,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            max_requests: d_max_requests(),
        }
    }
}

fn d_max_requests() -> u64 {
    1024
}

/// Where a route's hash key comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HashOn {
    /// No key: power of two choices.
    #[default]
    None,
    /// The path, without the query.
    Path,
    /// Path and query (nginx's `$request_uri`).
    Uri,
    /// The client's IP address.
    ClientIp,
    /// A header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// A query parameter's raw value.
    Query(String),
}

impl HashOn {
    /// Parses `none`, `path`, `uri`, `client_ip`, `header:NAME`, `cookie:NAME`, `query:NAME`.
    pub fn parse(s: &str) -> Result<HashOn, String> {
        const HELP: &str =
            "expected none, path, uri, client_ip, header:NAME, cookie:NAME or query:NAME";
        let named = |prefix: &str| s.strip_prefix(prefix).filter(|n| !n.is_empty());
        Ok(match s {
            "none" => HashOn::None,
            "path" => HashOn::Path,
            "uri" => HashOn::Uri,
            "client_ip" => HashOn::ClientIp,
            _ => {
                if let Some(name) = named("header:") {
                    HashOn::Header(
                        HeaderName::from_bytes(name.as_bytes())
                            .map_err(|_| format!("hash {s:?}: {name:?} is not a header name"))?,
                    )
                } else if let Some(name) = named("cookie:") {
                    HashOn::Cookie(name.to_owned())
                } else if let Some(name) = named("query:") {
                    HashOn::Query(name.to_owned())
                } else {
                    return Err(format!("hash {s:?} is not understood: {HELP}"));
                }
            }
        })
    }

    /// The string form [`HashOn::parse`] reads.
    pub fn as_string(&self) -> String {
        match self {
            HashOn::None => "none".into(),
            HashOn::Path => "path".into(),
            HashOn::Uri => "uri".into(),
            HashOn::ClientIp => "client_ip".into(),
            HashOn::Header(h) => format!("header:{h}"),
            HashOn::Cookie(c) => format!("cookie:{c}"),
            HashOn::Query(q) => format!("query:{q}"),
        }
    }

    /// The hash of the request's key, if it has one.
    pub fn key_hash(&self, req: &impl KeySource, client: IpAddr) -> Option<u64> {
        let pq = req.path_and_query();
        let (path, query) = match pq.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (pq, None),
        };
        match self {
            HashOn::None => None,
            HashOn::Path => Some(hash_key(if path.is_empty() {
                b"/"
            } else {
                path.as_bytes()
            })),
            HashOn::Uri => Some(hash_key(pq.as_bytes())),
            HashOn::ClientIp => Some(match client {
                IpAddr::V4(ip) => hash_key(&ip.octets()),
                IpAddr::V6(ip) => hash_key(&ip.octets()),
            }),
            HashOn::Header(name) => req.field(name).map(hash_key),
            HashOn::Cookie(name) => cookie(req, name).map(hash_key),
            HashOn::Query(name) => query.and_then(|q| query_value(q, name)).map(hash_key),
        }
    }
}

/// What a hash key is read from: a request's target and its header fields, however the
/// request holds them (hyper's `Parts`, or the bytes of a head as read).
pub trait KeySource {
    /// The path and query as an origin-form target (`/` when there is none).
    fn path_and_query(&self) -> &str;
    /// The first `Some` that `f` gives for the values of the fields named `name`, in order.
    fn find_field<'a, T>(
        &'a self,
        name: &HeaderName,
        f: impl FnMut(&'a [u8]) -> Option<T>,
    ) -> Option<T>;

    /// The value of the first field named `name`.
    fn field(&self, name: &HeaderName) -> Option<&[u8]> {
        self.find_field(name, Some)
    }
}

impl KeySource for http::request::Parts {
    fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map_or("/", |pq| pq.as_str())
    }

    fn find_field<'a, T>(
        &'a self,
        name: &HeaderName,
        f: impl FnMut(&'a [u8]) -> Option<T>,
    ) -> Option<T> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes())
            .find_map(f)
    }
}

/// The raw value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(req: &'a impl KeySource, name: &str) -> Option<&'a [u8]> {
    req.find_field(&http::header::COOKIE, |v| {
        v.split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
        })
    })
}

/// The raw value of parameter `name` in `query`.
fn query_value<'a>(q: &'a str, name: &str) -> Option<&'a [u8]> {
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v.as_bytes())
    })
}

fn de_hash<'de, D: Deserializer<'de>>(d: D) -> Result<HashOn, D::Error> {
    let s = String::deserialize(d)?;
    HashOn::parse(&s).map_err(serde::de::Error::custom)
}

fn ser_hash<S: serde::Serializer>(h: &HashOn, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&h.as_string())
}

mod duration {
    //! Durations written as `"500ms"`, `"2s"`.
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        service_kit::config::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    gateway: GatewaySettings,
    #[serde(default)]
    routes: Vec<Route>,
}

/// Reads and checks the routes file at `path`.
pub fn load(path: &Path) -> Result<RoutesFile, RoutesError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RoutesError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text).map_err(|e| match e {
        RoutesError::Parse { message, .. } => RoutesError::Parse {
            path: shown.clone(),
            message,
        },
        RoutesError::Invalid { message, .. } => RoutesError::Invalid {
            path: shown.clone(),
            message,
        },
        other => other,
    })
}

/// Parses and checks routes given as TOML text.
pub fn parse(text: &str) -> Result<RoutesFile, RoutesError> {
    let raw: Raw = toml::from_str(text).map_err(|e| RoutesError::Parse {
        path: "<text>".into(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let file = RoutesFile {
        gateway: raw.gateway,
        routes: raw.routes,
    };
    validate(&file).map_err(|message| RoutesError::Invalid {
        path: "<text>".into(),
        message,
    })?;
    Ok(file)
}

fn validate_rate(what: &str, rate: &Option<Rate>) -> Result<(), String> {
    if let Some(r) = rate
        && !(r.per_second.is_finite() && r.per_second > 0.0)
    {
        return Err(format!("{what}.per_second must be a number above 0"));
    }
    Ok(())
}

fn validate(file: &RoutesFile) -> Result<(), String> {
    if file.gateway.max_in_flight == 0 {
        return Err("gateway.max_in_flight must be at least 1".into());
    }
    validate_rate("gateway.rate_limit.global", &file.gateway.rate_limit.global)?;
    validate_rate(
        "gateway.rate_limit.per_client_ip",
        &file.gateway.rate_limit.per_client_ip,
    )?;
    let mut names = HashSet::new();
    for (i, r) in file.routes.iter().enumerate() {
        let at = format!("route {} ({:?})", i + 1, r.name);
        let fail = |m: String| Err(format!("{at}: {m}"));
        if r.name.is_empty()
            || !r
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return fail("name must be non-empty letters, digits, '-', '_' or '.'".into());
        }
        if !names.insert(r.name.as_str()) {
            return fail("the name is used by an earlier route".into());
        }
        if r.backend.namespace.is_empty() || r.backend.service.is_empty() {
            return fail("backend.namespace and backend.service are required".into());
        }
        if let Some(name) = &r.backend.tls_server_name {
            if !r.backend.tls {
                return fail("backend.tls_server_name needs backend.tls = true".into());
            }
            if !is_server_name(name) {
                return fail(format!(
                    "backend.tls_server_name {name:?} must be a DNS name or an IP address"
                ));
            }
        }
        if let Some(p) = &r.matcher.path_prefix
            && !p.starts_with('/')
        {
            return fail(format!("match.path_prefix {p:?} must start with '/'"));
        }
        if let Some(h) = &r.matcher.host
            && (h.is_empty() || h.contains('/') || h[1..].contains('*'))
        {
            return fail(format!("match.host {h:?} must be a host name or *.suffix"));
        }
        if let Some(g) = &r.matcher.grpc_service
            && (g.is_empty() || g.contains('/'))
        {
            return fail(format!(
                "match.grpc_service {g:?} must be a fully qualified service name, e.g. \"pkg.Service\""
            ));
        }
        if let Some(rw) = &r.rewrite_prefix {
            if r.matcher.path_prefix.is_none() {
                return fail("rewrite_prefix needs match.path_prefix".into());
            }
            if !rw.starts_with('/') {
                return fail(format!("rewrite_prefix {rw:?} must start with '/'"));
            }
            // It becomes part of the request line sent on: a path, nothing else.
            if rw.contains(['?', '#']) || rw.parse::<http::uri::PathAndQuery>().is_err() {
                return fail(format!(
                    "rewrite_prefix {rw:?} must be a URI path (no spaces, '?' or '#')"
                ));
            }
        }
        if r.vnodes == 0 || r.vnodes > 10_000 {
            return fail(format!("vnodes {} must be from 1 to 10000", r.vnodes));
        }
        if r.algorithm == Algorithm::Maglev
            && (!is_prime(r.table_size) || !(7..=10_000_019).contains(&r.table_size))
        {
            return fail(format!(
                "table_size {} must be a prime from 7 to 10000019 (e.g. 65537)",
                r.table_size
            ));
        }
        if !(r.epsilon.is_finite() && r.epsilon >= 0.0 && r.epsilon <= 100.0) {
            return fail(format!("epsilon {} must be from 0 to 100", r.epsilon));
        }
        let t = &r.timeouts;
        if t.connect.is_zero() || t.per_try.is_zero() || t.overall.is_zero() {
            return fail("timeouts must be above zero".into());
        }
        if r.retries.attempts == 0 || r.retries.attempts > 10 {
            return fail(format!(
                "retries.attempts {} must be from 1 to 10",
                r.retries.attempts
            ));
        }
        if r.outlier.max_ejected_percent > 100 {
            return fail("outlier.max_ejected_percent must be at most 100".into());
        }
        if r.outlier.base_ejection.is_zero() || r.outlier.max_ejection < r.outlier.base_ejection {
            return fail(
                "outlier: base_ejection must be above zero and at most max_ejection".into(),
            );
        }
        if r.circuit_breaker.max_requests == 0 {
            return fail("circuit_breaker.max_requests must be at least 1".into());
        }
        validate_rate(&format!("{at}: rate_limit.global"), &r.rate_limit.global)?;
        validate_rate(
            &format!("{at}: rate_limit.per_client_ip"),
            &r.rate_limit.per_client_ip,
        )?;
    }
    Ok(())
}

/// Whether `name` can be checked against a certificate: an IP address, or a DNS name (labels
/// of letters, digits, `-` and `_`, none empty or starting or ending with `-`, at most 253
/// characters, not all digits at the end, which would read as an IP address).
pub fn is_server_name(name: &str) -> bool {
    if name.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels_ok = is_dns_labels(name, |b| b == b'_');
    labels_ok
        && name
            .rsplit('.')
            .next()
            .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `name` is a host name as RFC 1123 spells it: dot-separated labels, none empty or
/// longer than 63 characters, none starting or ending with `-`, of letters, digits, `-` and
/// whatever bytes `also` admits; at most 253 characters in all.
pub fn is_dns_labels(name: &str, also: fn(u8) -> bool) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || also(b))
        })
}

/// What a route is matched against.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Host without port, if any.
    pub host: Option<&'a str>,
    /// The path.
    pub path: &'a str,
    /// Whether the request is gRPC.
    pub grpc: bool,
}

impl Match {
    /// Whether the request meets every condition.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(want) = &self.host {
            let Some(host) = req.host else { return false };
            let ok = match want.strip_prefix("*.") {
                // On bytes: a host cut at the suffix's length need not fall on a char
                // boundary (slicing the str there panicked; found writing fuzz/routes_file).
                Some(suffix) => {
                    let (h, s) = (host.as_bytes(), suffix.as_bytes());
                    h.len() > s.len() + 1
                        && h[h.len() - s.len()..].eq_ignore_ascii_case(s)
                        && h[h.len() - s.len() - 1] == b'.'
                }
                None => host.eq_ignore_ascii_case(want),
            };
            if !ok {
                return false;
            }
        }
        if let Some(prefix) = &self.path_prefix
            && !prefix_matches(prefix, req.path)
        {
            return false;
        }
        if let Some(svc) = &self.grpc_service {
            if !req.grpc {
                return false;
            }
            let Some(rest) = req.path.strip_prefix('/') else {
                return false;
            };
            let Some(rest) = rest.strip_prefix(svc.as_str()) else {
                return false;
            };
            if !rest.starts_with('/') {
                return false;
            }
        }
        true
    }
}

/// Segment-aware prefix match (see the module docs).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// `path` with `prefix` (which it matches) replaced by `with`.
pub fn rewrite(path: &str, prefix: &str, with: &str) -> String {
    let rest = path.get(prefix.len()..).unwrap_or("");
    let mut out = String::with_capacity(with.len() + rest.len());
    out.push_str(with);
    if out.ends_with('/') && rest.starts_with('/') {
        out.push_str(&rest[1..]);
    } else {
        out.push_str(rest);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        [gateway]
        max_in_flight = 500
        rate_limit.per_client_ip = { per_second = 5, burst = 10 }

        [[routes]]
        name = "orders"
        match = { host = "*.example.com", path_prefix = "/orders" }
        backend = { namespace = "prod", service = "orders", tags = ["v2"] }
        rewrite_prefix = "/v2"
        hash = "header:x-user"
        algorithm = "maglev"
        table_size = 65537
        timeouts = { connect = "200ms" }

        [[routes]]
        name = "grpc"
        match = { grpc_service = "pkg.Echo" }
        backend = { namespace = "prod", service = "echo" }
        bounded_load = false
    "#;

    fn err(text: &str) -> String {
        parse(text).expect_err("invalid").to_string()
    }

    #[test]
    fn full_file_parses_with_defaults_filled_in() {
        let f = parse(FULL).expect("valid");
        assert_eq!(f.gateway.max_in_flight, 500);
        assert_eq!(f.gateway.rate_limit.per_client_ip.expect("ip").burst(), 10);
        let r = &f.routes[0];
        assert_eq!(r.hash, HashOn::Header(HeaderName::from_static("x-user")));
        assert_eq!(r.algorithm, Algorithm::Maglev);
        assert_eq!(r.timeouts.connect, Duration::from_millis(200));
        assert_eq!(r.timeouts.overall, Duration::from_secs(30));
        assert_eq!(r.epsilon(), Some(0.25));
        assert_eq!(f.routes[1].epsilon(), None);
        assert_eq!(f.routes[1].hash, HashOn::None);
    }

    #[test]
    fn toml_syntax_errors_give_line_and_column() {
        let e = err("[[routes]\nname = 1");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = err(
            "[[routes]]\nname = \"a\"\nbackend = { namespace = \"n\", service = \"s\" }\nhsah = \"path\"",
        );
        assert!(e.contains("hsah"), "{e}");
    }

    #[test]
    fn bad_values_name_the_route_and_field() {
        let base = "[[routes]]\nname = \"a\"\nbackend = { namespace = \"n\", service = \"s\" }\n";
        let cases = [
            ("hash = \"header:\"", "hash"),
            ("hash = \"body\"", "not understood"),
            ("algorithm = \"maglev\"\ntable_size = 65536", "prime"),
            ("timeouts = { connect = \"5d\" }", "unknown unit"),
            ("rewrite_prefix = \"/x\"", "needs match.path_prefix"),
            (
                "match = { path_prefix = \"/a\" }\nrewrite_prefix = \"/b c\"",
                "must be a URI path",
            ),
            (
                "match = { path_prefix = \"/a\" }\nrewrite_prefix = \"/b?x=1\"",
                "must be a URI path",
            ),
            ("match = { path_prefix = \"x\" }", "must start with '/'"),
            ("retries = { attempts = 0 }", "retries.attempts"),
            ("epsilon = -1.0", "epsilon"),
        ];
        for (extra, want) in cases {
            let e = err(&format!("{base}{extra}"));
            assert!(e.contains(want), "{extra}: {e}");
        }
        let dup = format!("{base}{base}");
        assert!(
            err(&dup).contains("route 2 (\"a\"): the name is used"),
            "{}",
            err(&dup)
        );
    }

    #[test]
    fn the_compose_routes_files_are_valid_and_the_tls_one_dials_every_route_over_tls() {
        let compose = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose");
        let plain = load(&compose.join("gateway-routes.toml")).expect("the plain routes file");
        let tls = load(&compose.join("gateway-routes-tls.toml")).expect("the TLS routes file");
        let names = |f: &RoutesFile| f.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&plain), names(&tls), "the same routes");
        assert!(plain.routes.iter().all(|r| !r.backend.tls));
        for r in &tls.routes {
            assert!(r.backend.tls, "route {:?} dials over TLS", r.name);
            assert_eq!(
                r.backend.tls_server_name.as_deref(),
                Some("demo-svc"),
                "route {:?}: the name the demo pair carries",
                r.name
            );
        }
    }

    #[test]
    fn backend_tls_and_its_server_name_are_read_and_checked() {
        let base = "[[routes]]\nname = \"a\"\n";
        let f = parse(&format!(
            "{base}backend = {{ namespace = \"n\", service = \"s\", tls = true, tls_server_name = \"orders.internal\" }}"
        ))
        .expect("valid");
        assert!(f.routes[0].backend.tls);
        assert_eq!(
            f.routes[0].backend.tls_server_name.as_deref(),
            Some("orders.internal")
        );
        let plain = parse(&format!(
            "{base}backend = {{ namespace = \"n\", service = \"s\" }}"
        ))
        .expect("valid");
        assert!(!plain.routes[0].backend.tls, "TLS is off by default");
        assert_eq!(plain.routes[0].backend.tls_server_name, None);
        let ip = parse(&format!(
            "{base}backend = {{ namespace = \"n\", service = \"s\", tls = true, tls_server_name = \"10.0.0.7\" }}"
        ))
        .expect("an IP address is a server name");
        assert_eq!(
            ip.routes[0].backend.tls_server_name.as_deref(),
            Some("10.0.0.7")
        );
        let cases = [
            (
                "tls_server_name = \"x.internal\"",
                "backend.tls_server_name needs backend.tls = true",
            ),
            (
                "tls = true, tls_server_name = \"bad name\"",
                "must be a DNS name or an IP address",
            ),
            (
                "tls = true, tls_server_name = \"\"",
                "must be a DNS name or an IP address",
            ),
            (
                "tls = true, tls_server_name = \"https://x\"",
                "must be a DNS name or an IP address",
            ),
            ("tls = \"yes\"", "invalid type"),
            ("tsl = true", "tsl"),
        ];
        for (extra, want) in cases {
            let e = err(&format!(
                "{base}backend = {{ namespace = \"n\", service = \"s\", {extra} }}"
            ));
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn server_names_are_dns_names_or_ip_addresses() {
        for ok in [
            "a",
            "orders.internal",
            "x-1.y_z.example.",
            "127.0.0.1",
            "::1",
        ] {
            assert!(is_server_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a b",
            "1.2.3",
            "a/b",
            &"a".repeat(64),
        ] {
            assert!(!is_server_name(bad), "{bad}");
        }
    }

    #[test]
    fn host_and_prefix_and_grpc_matching() {
        let f = parse(FULL).expect("valid");
        let m = &f.routes[0].matcher;
        let view = |host, path| RequestView {
            host,
            path,
            grpc: false,
        };
        assert!(m.matches(&view(Some("api.example.com"), "/orders/1")));
        assert!(m.matches(&view(Some("API.Example.com"), "/orders")));
        assert!(!m.matches(&view(Some("example.com"), "/orders")));
        assert!(!m.matches(&view(Some("api.example.com"), "/ordersx")));
        assert!(!m.matches(&view(None, "/orders")));
        let g = &f.routes[1].matcher;
        assert!(g.matches(&RequestView {
            host: None,
            path: "/pkg.Echo/Say",
            grpc: true
        }));
        assert!(!g.matches(&RequestView {
            host: None,
            path: "/pkg.Echo/Say",
            grpc: false
        }));
        assert!(!g.matches(&RequestView {
            host: None,
            path: "/pkg.EchoX/Say",
            grpc: true
        }));
    }

    #[test]
    fn a_wildcard_host_never_panics_on_a_host_with_multibyte_characters() {
        let f = parse(FULL).expect("valid");
        let m = &f.routes[0].matcher;
        // The suffix "example.com" is 11 bytes; each host is cut inside a character there.
        for host in ["xéxxxxxxxxxx", "aa€bbbbbbbbbb", "€€€€€€€"] {
            let view = RequestView {
                host: Some(host),
                path: "/orders",
                grpc: false,
            };
            assert!(!m.matches(&view), "{host}");
        }
        let view = RequestView {
            host: Some("é.example.com"),
            path: "/orders",
            grpc: false,
        };
        assert!(
            m.matches(&view),
            "a non-ASCII label before the suffix still matches"
        );
    }

    #[test]
    fn rewrite_replaces_the_prefix_without_doubling_slashes() {
        assert_eq!(rewrite("/orders/1", "/orders", "/v2"), "/v2/1");
        assert_eq!(rewrite("/orders/1", "/orders", "/"), "/1");
        assert_eq!(rewrite("/orders", "/orders", "/"), "/");
        assert_eq!(rewrite("/orders", "/orders", "/v2"), "/v2");
        assert_eq!(rewrite("/api/x", "/api/", "/"), "/x");
    }

    #[test]
    fn keys_come_from_header_cookie_query_path_and_ip() {
        let req = http::Request::get("/a/b?user=7&x=1")
            .header("x-user", "alice")
            .header("cookie", "theme=dark; sid=s123")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let h = |spec: &str| HashOn::parse(spec).expect("spec").key_hash(&parts, ip);
        assert_eq!(h("header:x-user"), Some(hash_key(b"alice")));
        assert_eq!(h("cookie:sid"), Some(hash_key(b"s123")));
        assert_eq!(h("query:user"), Some(hash_key(b"7")));
        assert_eq!(h("path"), Some(hash_key(b"/a/b")));
        assert_eq!(h("uri"), Some(hash_key(b"/a/b?user=7&x=1")));
        assert_eq!(h("client_ip"), Some(hash_key(&[10, 1, 2, 3])));
        assert_eq!(h("header:x-missing"), None);
        assert_eq!(h("cookie:nope"), None);
        assert_eq!(h("none"), None);
    }
}
