//! The request path: match a route, admit, pick, forward, retry, answer.
//!
//! 1. **Route**: the first route whose conditions hold; none → 404.
//! 2. **Admit**: the gateway's and the route's rate limits (global, per client IP) → 429;
//!    more than `max_in_flight` requests in the gateway → 503. Every refusal says why, as JSON
//!    (`{"error": "...", "message": "..."}`), or for a gRPC request as `grpc-status` and
//!    `grpc-message` (RESOURCE_EXHAUSTED, UNAVAILABLE, ...).
//! 3. **Pick**: the route's hash key, if the request has one, goes through the table with
//!    bounded loads; keyless requests go by power of two choices. Ejected backends, backends
//!    at their circuit breaker and backends this request already tried are skipped.
//! 4. **Forward**: over HTTP/1.1 or HTTP/2 (gRPC), hop-by-hop headers removed, `x-forwarded-for`
//!    appended, a `traceparent` naming the gateway's span. The body streams both ways;
//!    trailers (gRPC status) pass through. An `Upgrade` (WebSocket) answered 101 becomes a
//!    byte tunnel.
//! 5. **Retry**: a failed connect goes to the next choice, always (nothing was sent). A
//!    timeout, a reset or a 502/503/504 goes to the next choice when the request is idempotent
//!    and bodyless, tries remain, the overall deadline has not passed and the retry budget
//!    allows. Outcomes feed outlier detection.
//!
//! Timeouts bound the time to the response's *headers*; a response body (a gRPC stream, a
//! download) may then take as long as it takes.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tracing::Instrument as _;

use crate::h1::{self, ExchangeError, Fields, RawBody, RawConn};
use crate::head::{self, RawHead, ReqHead};
use crate::pool::{Backend, LiveLoads, RouteState, Wire};
use crate::resilience::{GlobalLimit, KeyedLimit, Outcome, now_ns, ns_at};
use crate::routes::{GatewaySettings, RequestView, rewrite};
use crate::trace::{self, TRACEPARENT};
use crate::upstream::{ConnectError, Finish, ProxyBody, UpBody};

/// Everything the request path needs; shared by every connection.
pub struct Gateway {
    /// The routes and gateway-wide settings, swapped whole when routes are reloaded.
    pub table: ArcSwap<RouteTable>,
    /// Requests in flight over the gateway (until their response body ends).
    pub in_flight: Arc<AtomicU64>,
    /// Whether to write an access log line per request.
    pub access_log: bool,
    /// Whether requests without a body go through the gateway's own HTTP/1.1 client.
    pub own_http1: bool,
    /// Whether the listener serves bodyless HTTP/1.1 requests itself (`fast`), not hyper.
    pub own_http1_server: bool,
    /// Metrics of requests that match no route (route label `-`).
    pub unrouted: crate::metrics::RouteMetrics,
}

/// A rate limit's verdict, evaluated only when reached (`None`: no such limit).
type LimitCheck<'a> = dyn Fn() -> Option<Result<(), Duration>> + 'a;

/// One generation of the routes: what a routes file (or a config-svc version) describes.
pub struct RouteTable {
    /// The routes, in matching order.
    pub routes: Vec<Arc<RouteState>>,
    /// Gateway-wide settings.
    pub settings: GatewaySettings,
    /// Gateway-wide global rate limit.
    pub global_limit: Option<GlobalLimit>,
    /// Gateway-wide per-IP rate limit.
    pub ip_limit: Option<KeyedLimit>,
    /// Where it came from (`file ...`, `config-svc ns/group/key vN`).
    pub source: String,
}

impl RouteTable {
    /// The first route whose conditions hold.
    pub fn find(&self, view: &RequestView<'_>) -> Option<&Arc<RouteState>> {
        self.routes.iter().find(|r| r.route.matcher.matches(view))
    }

    /// Admission: the rate limits (gateway, then route; global, then per client), then load
    /// shedding. On success the request counts as in flight until the guard is dropped.
    fn admit(
        &self,
        gw: &Gateway,
        route: &RouteState,
        client: IpAddr,
        now: u64,
    ) -> Result<Admitted, Failure> {
        let checks: [(&LimitCheck<'_>, &str); 4] = [
            (
                &|| self.global_limit.as_ref().map(|l| l.check(now)),
                "the gateway's global rate limit",
            ),
            (
                &|| self.ip_limit.as_ref().map(|l| l.check(client, now)),
                "the gateway's per-client-IP rate limit",
            ),
            (
                &|| route.global_limit.as_ref().map(|l| l.check(now)),
                "the route's global rate limit",
            ),
            (
                &|| route.ip_limit.as_ref().map(|l| l.check(client, now)),
                "the route's per-client-IP rate limit",
            ),
        ];
        for (check, what) in checks {
            if let Some(Err(wait)) = check() {
                let msg = format!(
                    "{what} is exceeded; retry in {} ms",
                    wait.as_millis().max(1)
                );
                return Err((Refusal::RateLimited, msg, Some(wait), 0));
            }
        }
        let max = self.settings.max_in_flight;
        if gw.in_flight.fetch_add(1, Ordering::Relaxed) >= max {
            gw.in_flight.fetch_sub(1, Ordering::Relaxed);
            let msg =
                format!("the gateway has {max} requests in flight, its limit; try again shortly");
            return Err((Refusal::Overloaded, msg, Some(Duration::from_secs(1)), 0));
        }
        Ok(Admitted(Some(Arc::clone(&gw.in_flight))))
    }
}

/// Why the gateway answered itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No route matched.
    NoRoute,
    /// A rate limit.
    RateLimited,
    /// Too many requests in flight.
    Overloaded,
    /// The route has no backend to offer.
    NoBackend,
    /// Every backend left is ejected, at its circuit breaker, or already tried.
    Unavailable,
    /// Connecting failed on every try.
    ConnectFailed,
    /// The backend did not answer in time.
    Timeout,
    /// The backend broke the exchange.
    UpstreamError,
    /// The request's head has a field the HTTP library refuses (one httparse let through).
    BadRequest,
}

impl Refusal {
    /// The label used in metrics and the `error` field.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::NoRoute => "no_route",
            Refusal::RateLimited => "rate_limited",
            Refusal::Overloaded => "overloaded",
            Refusal::NoBackend => "no_backend",
            Refusal::Unavailable => "backends_unavailable",
            Refusal::ConnectFailed => "connect_failed",
            Refusal::Timeout => "upstream_timeout",
            Refusal::UpstreamError => "upstream_error",
            Refusal::BadRequest => "bad_request",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Overloaded | Refusal::NoBackend | Refusal::Unavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::ConnectFailed | Refusal::UpstreamError => StatusCode::BAD_GATEWAY,
            Refusal::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
        }
    }

    /// The gRPC status code for gRPC callers.
    fn grpc_status(self) -> u8 {
        match self {
            Refusal::NoRoute => 12,    // UNIMPLEMENTED
            Refusal::RateLimited => 8, // RESOURCE_EXHAUSTED
            Refusal::Timeout => 4,     // DEADLINE_EXCEEDED
            Refusal::BadRequest => 3,  // INVALID_ARGUMENT
            _ => 14,                   // UNAVAILABLE
        }
    }
}

/// A response the gateway writes itself.
pub fn refuse(
    why: Refusal,
    message: &str,
    grpc: bool,
    retry_after: Option<Duration>,
) -> Response<ProxyBody> {
    let mut resp = if grpc {
        let mut r = Response::new(ProxyBody::empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(why.grpc_status())),
        );
        let text = format!("{}: {message}", why.code());
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&text)) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let body = serde_json::json!({ "error": why.code(), "message": message }).to_string();
        let mut r = Response::new(ProxyBody::full(Bytes::from(body)));
        *r.status_mut() = why.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    if let Some(wait) = retry_after {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

/// Percent-encodes a `grpc-message` (the gRPC spec's encoding).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn is_grpc(req: &ReqHead) -> bool {
    req.header(&header::CONTENT_TYPE)
        .is_some_and(|v| v.starts_with(b"application/grpc"))
}

/// The request's host without port: `Host`, else the URI's authority.
fn host_of(req: &ReqHead) -> Option<&str> {
    let raw = req
        .header(&header::HOST)
        .and_then(|h| std::str::from_utf8(h).ok().filter(|h| h.is_ascii()))
        .or_else(|| req.target_authority())?;
    // Strip a port, minding IPv6 literals ("[::1]:80").
    Some(match raw.rfind(':') {
        Some(i) if !raw[i..].contains(']') => &raw[..i],
        _ => raw,
    })
}

/// An upgrade the gateway tunnels (WebSocket and the like). `Upgrade: h2c` alone is not one:
/// RFC 9113 §3.1 deprecates that route to HTTP/2, so the request is answered over HTTP/1.1 (a
/// server may ignore an upgrade) and h2c clients use prior knowledge, which the listener takes.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| !t.trim().is_empty() && !t.trim().eq_ignore_ascii_case("h2c"))
        })
    }) && headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    })
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), keeping the upgrade pair when tunnelling and
/// `te: trailers` (which gRPC needs).
///
/// Most heads carry none of these fields: one pass over the names finds that out, instead of a
/// hashed lookup per field name (this runs twice per proxied request).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(conn) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            if !(keep_upgrade && n == header::UPGRADE) {
                headers.remove(n);
            }
        }
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::TRANSFER_ENCODING);
    if headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// Whether `strip_hop_by_hop` may remove or change anything because of a field named `name`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::PROXY_AUTHORIZATION
        || *name == header::TRANSFER_ENCODING
        || *name == header::TE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Releases a request's share of the loads when its response ends.
struct LoadGuard {
    backend: Arc<Backend>,
    route: Arc<RouteState>,
    gateway: Arc<AtomicU64>,
}

impl LoadGuard {
    fn new(backend: Arc<Backend>, route: Arc<RouteState>, gateway: Arc<AtomicU64>) -> LoadGuard {
        backend.metrics.in_flight.inc();
        route.metrics.in_flight.inc();
        LoadGuard {
            backend,
            route,
            gateway,
        }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.backend.metrics.in_flight.dec();
        self.route.metrics.in_flight.dec();
        self.gateway.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What ends with a response body: the load, and the HTTP/1.1 connection to hand back.
struct Done {
    _load: LoadGuard,
    conn: Option<http1::SendRequest<UpBody>>,
}

impl Finish for Done {
    fn finish(&mut self, complete: bool) {
        if let Some(conn) = self.conn.take()
            && complete
        {
            self._load.backend.conns.put_back(conn);
        }
    }
}

/// Holds the gateway's in-flight count until a load guard takes over, or the request ends.
struct Admitted(Option<Arc<AtomicU64>>);

impl Admitted {
    /// A [`LoadGuard`] now holds the count.
    fn hand_over(&mut self) {
        self.0 = None;
    }

    /// The load guard was dropped (a retry follows): hold the count again.
    fn take_back(&mut self, gateway: &Arc<AtomicU64>) {
        if self.0.is_none() {
            gateway.fetch_add(1, Ordering::Relaxed);
            self.0 = Some(Arc::clone(gateway));
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The client end of a connection.
#[derive(Debug, Clone)]
pub struct Client {
    /// Its address.
    pub addr: SocketAddr,
    /// Its IP address as a header value (for `x-forwarded-for`).
    pub ip_value: HeaderValue,
}

impl Client {
    /// The client at `addr`.
    pub fn new(addr: SocketAddr) -> Client {
        let ip_value = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Client { addr, ip_value }
    }
}

/// Serves one request (the `hyper` service function).
pub async fn handle(
    gw: Arc<Gateway>,
    client: Arc<Client>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let head = ReqHead::Parts(Box::new(parts));
    Ok(serve_request(&gw, &client, head, Some(body), upgrade, Fields::Map).await)
}

/// Serves one request given as its head, its body (`None`: none) and, for an upgrade the
/// gateway tunnels, the client side of the upgrade. The listener's own HTTP/1.1 fast path
/// (`fast`) calls this directly for bodyless requests, with `fields` [`Fields::Lines`]: an
/// answer from the gateway's own HTTP/1.1 client then carries its fields as lines in its body
/// ([`ProxyBody::Raw`]) and an empty header map. hyper's service function calls it for the
/// rest, with [`Fields::Map`].
pub async fn serve_request(
    gw: &Arc<Gateway>,
    client: &Arc<Client>,
    req: ReqHead,
    body: Option<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    fields: Fields,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let grpc = is_grpc(&req);
    let table = gw.table.load();
    let route = {
        let view = RequestView {
            host: host_of(&req),
            path: req.path(),
            grpc,
        };
        table.find(&view).cloned()
    };
    let Some(route) = route else {
        gw.unrouted.rejected(Refusal::NoRoute.code());
        gw.unrouted.answered(404);
        let msg = format!("no route matches {} {}", req.method(), req.path());
        return refuse(Refusal::NoRoute, &msg, grpc, None);
    };
    // A span per request, under service-kit's request-span target: exported when spans are
    // exported (OpenTelemetry), not made otherwise unless RUST_LOG asks for it.
    let span = tracing::debug_span!(
        target: service_kit::telemetry::REQUEST_SPANS,
        "proxy",
        otel.kind = "server",
        route = %route.route.name,
        method = %req.method(),
        trace_id = tracing::field::Empty,
    );
    let hop = trace::hop(req.header(&TRACEPARENT_FIELD), &span);
    if !span.is_disabled() {
        span.record("trace_id", tracing::field::display(hop.ours.trace_id_hex()));
    }
    let access = gw.access_log.then(|| {
        (
            req.method().clone(),
            req.path().to_owned(),
            hop.ours.trace_id_hex(),
        )
    });
    let admitted = table.admit(gw, &route, client.addr.ip(), ns_at(start));
    drop(table);
    let result = match admitted {
        Ok(admitted) => {
            let call = Call {
                client,
                grpc,
                hop: &hop,
                start,
                fields,
            };
            // Boxed: the proxy's state machine is large, and hyper moves the request's future.
            // (Awaited in place instead, it was copied twice per request, not once.)
            boxed(|| proxy(gw, &route, admitted, req, body, client_upgrade, call))
                .instrument(span.clone())
                .await
        }
        Err(refused) => Err(refused),
    };
    let (resp, backend, attempts) = match result {
        Ok(done) => done,
        Err((why, message, retry_after, attempts)) => {
            route.metrics.rejected(why.code());
            (refuse(why, &message, grpc, retry_after), None, attempts)
        }
    };
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    route.metrics.answered(status);
    route.metrics.duration.observe(elapsed);
    if let Some((method, path, trace_id)) = access {
        let grpc_status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::info!(
            target: "lb_gateway::access",
            parent: &span,
            client = %client.addr.ip(),
            %method,
            %path,
            status,
            grpc_status,
            route = %route.route.name,
            backend = backend.as_ref().map_or("-", |b| b.id.as_str()),
            attempts,
            duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            %trace_id,
            "access"
        );
    }
    resp
}

type Failure = (Refusal, String, Option<Duration>, u32);

/// `Box::pin(make())` with the box allocated first, so that the future can be made where it
/// will live instead of on the stack and then copied (all of its size, ~3 KB, per request).
#[inline(always)]
fn boxed<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

const TRACEPARENT_FIELD: HeaderName = HeaderName::from_static(TRACEPARENT);

/// What the request path knows about a request besides the request itself.
struct Call<'a> {
    client: &'a Client,
    grpc: bool,
    hop: &'a trace::Hop,
    /// When it arrived.
    start: Instant,
    /// How an answer read by the gateway's own HTTP/1.1 client hands over its fields.
    fields: Fields,
}

async fn proxy(
    gw: &Arc<Gateway>,
    route: &Arc<RouteState>,
    mut admitted: Admitted,
    mut req: ReqHead,
    body: Option<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    call: Call<'_>,
) -> Result<(Response<ProxyBody>, Option<Arc<Backend>>, u32), Failure> {
    let Call {
        client,
        grpc,
        hop,
        start,
        fields,
    } = call;
    let client_ip = client.addr.ip();
    route.budget.deposit();

    let r = &route.route;
    let body_done = body.as_ref().is_none_or(|b| b.is_end_stream());
    let key = r.hash.key_hash(&req, client_ip);
    let trace_bytes = hop.ours.header_bytes();

    // The request as it goes out, minus what depends on the wire. A raw head is edited as it
    // is written (`RawHead::encode`), or when it becomes `Parts` for another sender.
    if let ReqHead::Parts(parts) = &mut req {
        head::edit(
            &mut parts.headers,
            client_upgrade.is_some(),
            client,
            &trace_bytes,
        );
    }
    // The request's authority, for a head that needs one (a shared copy of the field's bytes,
    // not a new string); a raw head's is read if it becomes `Parts`.
    let mut authority: Option<HeaderValue> = match &req {
        ReqHead::Parts(parts) => authority_of(parts),
        ReqHead::Raw(_) => None,
    };
    // The path and query sent on, when it differs from the request's (a rewrite).
    let rewritten: Option<String> = match (&r.rewrite_prefix, &r.matcher.path_prefix) {
        (Some(with), Some(prefix)) => {
            let mut out = rewrite(req.path(), prefix, with);
            if let Some(q) = req.query() {
                out.push('?');
                out.push_str(q);
            }
            Some(out)
        }
        _ => None,
    };
    // The request's own path and query, for a head whose target is rebuilt; a raw head's
    // (written as it is) is taken if it becomes `Parts`.
    let mut original_pq: Option<http::uri::PathAndQuery> = match &req {
        ReqHead::Parts(parts) => parts.uri.path_and_query().cloned(),
        ReqHead::Raw(_) => None,
    };

    let attempts_allowed = r.retries.attempts;
    let retryable =
        attempts_allowed > 1 && client_upgrade.is_none() && idempotent(req.method()) && body_done;
    // What a retry rebuilds the request from (only kept when it may be needed). Taken when the
    // head is first given away: a copy before hyper's client takes it; the head itself after
    // the gateway's own client, which only borrows it, has sent it (no copy on the common path).
    let mut template: Option<Template> = None;
    // Whether the head in hand carries a Host this hop added for its backend (a retry's head
    // must not keep it: the next backend's name goes there instead).
    let mut added_host = false;
    // No body and no upgrade: the gateway's own HTTP/1.1 client takes it (see `h1`).
    let bodyless = gw.own_http1 && client_upgrade.is_none() && body_done;
    let body = match body {
        Some(b) => UpBody::Incoming(b),
        None => UpBody::Empty,
    };
    let mut pending: Option<(ReqHead, UpBody)> = Some((req, body));

    let pool = route.pool.load_full();
    let deadline = start + r.timeouts.overall;
    let mut tried: Vec<usize> = Vec::new();
    let mut attempts: u32 = 0;
    let mut last: Failure = (Refusal::NoBackend, String::new(), None, 0);
    let mut stale_conn_retries = 0;
    loop {
        // The first try reuses the request's arrival time; retries read the clock.
        let now_instant = if attempts == 0 { start } else { Instant::now() };
        let now = ns_at(now_instant);
        let view = LiveLoads::new(&pool, route, now, &tried);
        let Some(choice) = view.pick(key) else {
            if attempts > 0 {
                last.3 = attempts;
                return Err(last);
            }
            let b = &r.backend;
            let msg = if pool.members.is_empty() {
                let sync = route.sync.lock().clone();
                match sync.last_error {
                    Some(e) if !sync.synced => format!(
                        "no instances of {}/{} are known yet (registry: {e})",
                        b.namespace, b.service
                    ),
                    _ => format!(
                        "no live instances of {}/{} match the route",
                        b.namespace, b.service
                    ),
                }
            } else {
                format!(
                    "all {} instances of {}/{} are ejected or at their limit of {} requests",
                    pool.members.len(),
                    b.namespace,
                    b.service,
                    r.circuit_breaker.max_requests
                )
            };
            let why = if pool.members.is_empty() {
                Refusal::NoBackend
            } else {
                Refusal::Unavailable
            };
            return Err((why, msg, None, attempts));
        };
        if choice.spilled {
            route.metrics.spills.inc();
        }
        let member = &pool.members[choice.member];
        let backend = Arc::clone(&member.backend);
        // The gateway's in-flight count moves into the guard.
        admitted.hand_over();
        let load = LoadGuard::new(
            Arc::clone(&backend),
            Arc::clone(route),
            gw.in_flight.clone(),
        );
        let wire = route.wire(&backend, grpc);
        let remaining = deadline.saturating_duration_since(now_instant);
        let connect_timeout = r.timeouts.connect.min(remaining);

        // Connect first: a failure here leaves the request unsent.
        enum Sender {
            H1(http1::SendRequest<UpBody>),
            H2(hyper::client::conn::http2::SendRequest<UpBody>),
            Raw(RawConn),
        }
        let sender = match wire {
            Wire::Http1 if bodyless => backend.conns.raw(connect_timeout).await.map(Sender::Raw),
            Wire::Http1 => backend.conns.h1(connect_timeout).await.map(Sender::H1),
            Wire::Http2 => backend.conns.h2(connect_timeout).await.map(Sender::H2),
        };
        attempts += 1;
        let mut sender = match sender {
            Ok(s) => s,
            Err(e) => {
                backend.metrics.connect_failures.inc();
                if let ConnectError::Tls {
                    server_name,
                    source,
                    ..
                } = &e
                {
                    let reason = crate::backend_tls::failure_reason(source);
                    backend.metrics.tls_failed(reason);
                    tracing::warn!(route = %r.name, backend = %backend.id, server_name = %server_name, reason, error = %source, "TLS handshake with the backend failed; nothing was sent");
                }
                record(route, &pool, &backend, Outcome::ConnectFailure);
                tried.push(choice.member);
                drop(load);
                admitted.take_back(&gw.in_flight);
                last = (Refusal::ConnectFailed, format!("{e}"), None, attempts);
                if attempts < attempts_allowed
                    && Instant::now() < deadline
                    && route.budget.try_withdraw(now_ns())
                {
                    route.metrics.retries.inc();
                    continue;
                }
                return Err(last);
            }
        };

        let (mut req, body) = match pending.take() {
            Some(p) => p,
            None => match &template {
                Some(Template::Parts(t)) => {
                    let (method, uri, headers) = &**t;
                    added_host = false;
                    let (mut p, ()) = Request::new(()).into_parts();
                    p.method = method.clone();
                    p.uri = uri.clone();
                    p.headers = headers.clone();
                    (ReqHead::Parts(Box::new(p)), UpBody::Empty)
                }
                Some(Template::Raw(raw)) => (ReqHead::Raw(raw.clone()), UpBody::Empty),
                None => return Err(last),
            },
        };
        // The gateway's own HTTP/1.1 client writes a raw head as it is; hyper's take `Parts`.
        if matches!(req, ReqHead::Raw(_)) && !matches!(sender, Sender::Raw(_)) {
            let Some(parts) = req.into_parts(client, &trace_bytes) else {
                return Err((
                    Refusal::BadRequest,
                    "the request head has a field the HTTP library refuses".into(),
                    None,
                    attempts,
                ));
            };
            if authority.is_none() {
                authority = authority_of(&parts);
            }
            if original_pq.is_none() {
                original_pq = parts.uri.path_and_query().cloned();
            }
            req = ReqHead::Parts(parts);
        }
        if retryable
            && template.is_none()
            && !matches!(sender, Sender::Raw(_))
            && let ReqHead::Parts(parts) = &req
        {
            template = Some(template_of(
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
                added_host,
            ));
        }
        // Wire-specific head (a raw head's target and Host are written with it).
        match (&mut req, wire) {
            (ReqHead::Raw(_), _) => {}
            (ReqHead::Parts(parts), Wire::Http1) => {
                parts.version = Version::HTTP_11;
                // Origin form; untouched (no allocation) unless rewritten or absolute.
                match &rewritten {
                    Some(pq) => {
                        parts.uri =
                            Uri::try_from(pq.as_str()).unwrap_or_else(|_| Uri::from_static("/"));
                    }
                    None if parts.uri.scheme().is_some() || parts.uri.authority().is_some() => {
                        parts.uri = original_pq
                            .clone()
                            .map_or_else(|| Uri::from_static("/"), Uri::from);
                    }
                    None => {}
                }
                if !parts.headers.contains_key(header::HOST) {
                    let host = match &authority {
                        Some(v) => Ok(v.clone()),
                        None => HeaderValue::from_str(&backend.id),
                    };
                    if let Ok(v) = host {
                        parts.headers.insert(header::HOST, v);
                        added_host = true;
                    }
                }
            }
            (ReqHead::Parts(parts), Wire::Http2) => {
                parts.version = Version::HTTP_2;
                let host = authority
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(&backend.id);
                let pq = rewritten
                    .as_deref()
                    .or(original_pq.as_ref().map(|p| p.as_str()))
                    .unwrap_or("/");
                parts.uri = Uri::try_from(format!("http://{host}{pq}"))
                    .unwrap_or_else(|_| Uri::from_static("/"));
                parts.headers.remove(header::HOST);
                added_host = false;
            }
        }
        let sent_at = if attempts <= 1 { start } else { Instant::now() };
        let per_try = r
            .timeouts
            .per_try
            .min(deadline.saturating_duration_since(sent_at));
        let answer = match (&mut sender, req) {
            // Boxed, as hyper's futures are large and the gateway's own client is the common
            // path: inline, they made every copy of this state larger.
            (Sender::H1(s), ReqHead::Parts(parts)) => {
                Box::pin(hyper_within(
                    per_try,
                    s.try_send_request(Request::from_parts(*parts, body)),
                ))
                .await
            }
            (Sender::H2(s), ReqHead::Parts(parts)) => {
                Box::pin(hyper_within(
                    per_try,
                    s.try_send_request(Request::from_parts(*parts, body)),
                ))
                .await
            }
            // Not reached: a raw head for hyper's senders became `Parts` above.
            (Sender::H1(_) | Sender::H2(_), ReqHead::Raw(_)) => {
                return Err((
                    Refusal::BadRequest,
                    "the request head could not be prepared for the backend".into(),
                    None,
                    attempts,
                ));
            }
            (Sender::Raw(conn), req) => {
                let by = tokio::time::Instant::from_std(sent_at + per_try);
                let answer = match &req {
                    ReqHead::Parts(parts) => {
                        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                        let write = |out: &mut Vec<u8>| {
                            h1::encode_head(&parts.method, pq, &parts.headers, out);
                        };
                        conn.exchange_within(by, &parts.method, write, fields).await
                    }
                    ReqHead::Raw(raw) => {
                        let target = rewritten
                            .as_deref()
                            .unwrap_or(raw.path_and_query().as_str());
                        let write = |out: &mut Vec<u8>| {
                            raw.encode(target, client, &trace_bytes, &backend.id, out);
                        };
                        conn.exchange_within(by, raw.method(), write, fields).await
                    }
                }
                .map(|r| r.map(Answer::Raw));
                if let Ok(Err(ExchangeError::Stale)) = answer {
                    Ok(Err(SendError::Stale(Box::new(req))))
                } else {
                    if retryable && template.is_none() {
                        template = Some(template_from(req, added_host));
                    }
                    match answer {
                        Ok(Err(e)) => Ok(Err(SendError::Raw(e))),
                        Ok(Ok(a)) => Ok(Ok(a)),
                        Err(t) => Err(t),
                    }
                }
            }
        };
        let failure = match answer {
            Ok(Ok(resp)) => {
                let status = resp.status();
                backend.metrics.answered(status.as_u16());
                backend.metrics.duration.observe(sent_at.elapsed());
                let server_error = status.is_server_error()
                    && status != StatusCode::NOT_IMPLEMENTED
                    && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED;
                record(
                    route,
                    &pool,
                    &backend,
                    if server_error {
                        Outcome::ServerError
                    } else {
                        Outcome::Success
                    },
                );
                let retry_status = matches!(status.as_u16(), 502..=504);
                if retry_status
                    && retryable
                    && attempts < attempts_allowed
                    && Instant::now() < deadline
                    && route.budget.try_withdraw(now_ns())
                {
                    tracing::debug!(backend = %backend.id, status = status.as_u16(), "retrying at the next choice");
                    route.metrics.retries.inc();
                    tried.push(choice.member);
                    drop(resp);
                    drop(sender);
                    drop(load);
                    admitted.take_back(&gw.in_flight);
                    continue;
                }
                let resp = match (resp, sender) {
                    (Answer::Raw(head), Sender::Raw(conn)) => respond_raw(head, conn, load),
                    (Answer::Hyper(resp), Sender::H1(s)) => {
                        respond(resp, load, Some(s), client_upgrade)
                    }
                    (Answer::Hyper(resp), _) => respond(resp, load, None, client_upgrade),
                    (Answer::Raw(_), _) => unreachable!("a raw answer comes from a raw sender"),
                };
                return Ok((resp, Some(backend), attempts));
            }
            Ok(Err(SendError::Stale(p))) if stale_conn_retries < 2 => {
                // The pooled connection was closed before it answered a byte: the bodyless
                // request goes again on a fresh one, as the same try.
                stale_conn_retries += 1;
                attempts -= 1;
                pending = Some((*p, UpBody::Empty));
                drop(load);
                admitted.take_back(&gw.in_flight);
                continue;
            }
            Ok(Err(SendError::Stale(p))) => {
                if retryable && template.is_none() {
                    template = Some(template_from(*p, added_host));
                }
                (
                    Refusal::UpstreamError,
                    format!("{} closed the connection before answering", backend.id),
                )
            }
            Ok(Err(SendError::Raw(e))) => (
                Refusal::UpstreamError,
                format!("{} did not answer: {e}", backend.id),
            ),
            Ok(Err(SendError::Hyper(mut e))) => {
                if let Some(req) = e.take_message()
                    && stale_conn_retries < 2
                {
                    // The pooled connection was closed before the request went out: send it
                    // again on a fresh one, as the same try.
                    stale_conn_retries += 1;
                    attempts -= 1;
                    let (p, b) = req.into_parts();
                    pending = Some((ReqHead::Parts(Box::new(p)), b));
                    drop(load);
                    admitted.take_back(&gw.in_flight);
                    continue;
                }
                (
                    Refusal::UpstreamError,
                    format!("{} did not answer: {}", backend.id, e.error()),
                )
            }
            Err(_) => (
                Refusal::Timeout,
                format!("{} did not answer within {per_try:?}", backend.id),
            ),
        };
        backend.metrics.connect_failures.inc();
        record(route, &pool, &backend, Outcome::ConnectFailure);
        tried.push(choice.member);
        drop(load);
        admitted.take_back(&gw.in_flight);
        last = (failure.0, failure.1, None, attempts);
        if retryable
            && attempts < attempts_allowed
            && Instant::now() < deadline
            && route.budget.try_withdraw(now_ns())
        {
            route.metrics.retries.inc();
            continue;
        }
        return Err(last);
    }
}

/// What a retry rebuilds its request from: method, target and header fields, or a raw head
/// (which is never changed by a try: its target and Host are chosen as it is written).
enum Template {
    Parts(Box<(Method, Uri, HeaderMap)>),
    Raw(RawHead),
}

/// The request's authority for a head that needs one: its `Host` (a shared copy of the
/// field's bytes, not a new string), else an absolute-form target's.
fn authority_of(parts: &http::request::Parts) -> Option<HeaderValue> {
    parts
        .headers
        .get(header::HOST)
        .filter(|h| h.to_str().is_ok())
        .cloned()
        .or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
}

/// The retry template from a head the gateway's own client sent.
fn template_from(req: ReqHead, added_host: bool) -> Template {
    match req {
        ReqHead::Parts(p) => {
            let p = *p;
            template_of(p.method, p.uri, p.headers, added_host)
        }
        ReqHead::Raw(raw) => Template::Raw(raw),
    }
}

/// The retry template from a head; without the Host this hop added for a backend, if it did
/// (a head's uri is already in the form every retry gives it, so it may stay as it is).
/// A request sent by one of hyper's client connections (HTTP/1.1 or HTTP/2), its answer
/// awaited for at most `per_try`, in the terms the retry loop uses.
async fn hyper_within(
    per_try: Duration,
    sent: impl Future<
        Output = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<UpBody>>>,
    >,
) -> Result<Result<Answer, SendError>, h1::TimedOut> {
    tokio::time::timeout(per_try, sent)
        .await
        .map_err(|_| h1::TimedOut)
        .map(|r| {
            r.map(Answer::Hyper)
                .map_err(|e| SendError::Hyper(Box::new(e)))
        })
}

fn template_of(method: Method, uri: Uri, mut headers: HeaderMap, added_host: bool) -> Template {
    if added_host {
        headers.remove(header::HOST);
    }
    Template::Parts(Box::new((method, uri, headers)))
}

/// Feeds outlier detection; on an ejection, counts and logs it.
fn record(route: &RouteState, pool: &crate::pool::Pool, backend: &Backend, outcome: Outcome) {
    // A success only resets counters; only failures need the time.
    let now = if outcome == Outcome::Success {
        0
    } else {
        now_ns()
    };
    if let Some(length) = backend
        .outlier
        .record(outcome, &route.route.outlier, now, || {
            route.may_eject(pool, now)
        })
    {
        backend.metrics.ejections.inc();
        tracing::warn!(route = %route.route.name, backend = %backend.id, ejection = ?length, ?outcome, "backend ejected");
        route.refresh_gauges();
    }
}

/// Appends the client to `X-Forwarded-For`: one field, the values the request had (all of its
/// lines, in order) and then the client's address.
pub(crate) fn forwarded_for(headers: &mut HeaderMap, client: &Client) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let mut joined: Option<Vec<u8>> = None;
    for v in headers.get_all(&XFF) {
        let out = joined.get_or_insert_with(Vec::new);
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b", ");
    }
    let value = match joined {
        Some(mut out) => {
            out.extend_from_slice(client.ip_value.as_bytes());
            HeaderValue::from_bytes(&out).ok()
        }
        // The common case: the connection's address, formatted once per connection.
        None => Some(client.ip_value.clone()),
    };
    if let Some(v) = value {
        headers.insert(XFF, v);
    }
}

/// A backend's answer, from hyper's client or the gateway's own.
enum Answer {
    Hyper(Response<Incoming>),
    Raw(h1::Head),
}

impl Answer {
    fn status(&self) -> StatusCode {
        match self {
            Answer::Hyper(r) => r.status(),
            Answer::Raw(h) => h.status,
        }
    }
}

/// Why a send failed (rare: boxed, so that the common answer is small to move).
enum SendError {
    Hyper(Box<hyper::client::conn::TrySendError<Request<UpBody>>>),
    /// A pooled connection went stale before answering; the request's head comes back.
    Stale(Box<ReqHead>),
    Raw(ExchangeError),
}

/// The client's response from a head read by the gateway's own client; the body streams from
/// `conn`, which returns to the backend's pool when the body was read to the end.
fn respond_raw(mut head: h1::Head, conn: RawConn, load: LoadGuard) -> Response<ProxyBody> {
    let body = RawBody::new(
        conn,
        &head,
        Arc::clone(&load.backend) as Arc<dyn h1::Recycle>,
    );
    // Lines come without hop-by-hop fields already.
    let lines = head.lines.take();
    let mut resp = Response::new(ProxyBody::Raw {
        done: Some(Box::new(Done {
            _load: load,
            conn: None,
        })),
        body,
        lines,
    });
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    strip_hop_by_hop(resp.headers_mut(), false);
    resp
}

/// Turns a backend's response into the client's.
fn respond(
    mut resp: Response<Incoming>,
    load: LoadGuard,
    conn: Option<http1::SendRequest<UpBody>>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ProxyBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_side) = client_upgrade
    {
        let backend_side = hyper::upgrade::on(&mut resp);
        let (parts, _) = resp.into_parts();
        tokio::spawn(async move {
            // The load guard lives as long as the tunnel.
            let _load = load;
            let _conn = conn;
            match tokio::try_join!(client_side, backend_side) {
                Ok((c, b)) => {
                    let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        return Response::from_parts(parts, ProxyBody::empty());
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    let (parts, body) = resp.into_parts();
    let done = Done { _load: load, conn };
    Response::from_parts(
        parts,
        ProxyBody::Upstream {
            body,
            done: Some(Box::new(done)),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("connection").is_none() && h.get("keep-alive").is_none());
        assert!(h.get("x-secret").is_none());
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn each_hop_by_hop_field_alone_is_removed_and_other_heads_stay_as_they_are() {
        for name in [
            "connection",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "transfer-encoding",
            "te",
        ] {
            let mut h = HeaderMap::new();
            h.insert("host", HeaderValue::from_static("a"));
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static("gzip"),
            );
            strip_hop_by_hop(&mut h, false);
            assert!(h.get(name).is_none(), "{name} stayed");
            assert_eq!(h.len(), 1, "{name}");
        }
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a"));
        h.append("accept", HeaderValue::from_static("*/*"));
        h.append("accept", HeaderValue::from_static("text/plain"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }

    #[test]
    fn upgrade_pair_is_kept_when_tunnelling() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("connection").is_some() && h.get("upgrade").is_some());
    }

    #[test]
    fn an_h2c_upgrade_is_not_tunnelled_and_its_headers_do_not_travel() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAoAAAAAIAAAAA"),
        );
        assert!(!is_upgrade(&h));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        h.insert("connection", HeaderValue::from_static("upgrade"));
        h.insert("upgrade", HeaderValue::from_static("h2c, websocket"));
        assert!(
            is_upgrade(&h),
            "another protocol offered alongside is tunnelled"
        );
    }

    #[test]
    fn host_loses_its_port() {
        let head = |uri: &str, host: Option<&str>| {
            let mut b = Request::get(uri);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            ReqHead::Parts(Box::new(b.body(()).expect("request").into_parts().0))
        };
        let h = head("/x", Some("api.example.com:8080"));
        assert_eq!(host_of(&h), Some("api.example.com"));
        assert_eq!(host_of(&head("/x", Some("[::1]"))), Some("[::1]"));
        let abs = head("http://svc.local:80/x", None);
        assert_eq!(host_of(&abs), Some("svc.local"));
    }

    #[test]
    fn refusals_say_why_in_json_or_grpc_status() {
        let r = refuse(
            Refusal::RateLimited,
            "slow down",
            false,
            Some(Duration::from_millis(1500)),
        );
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        let g = refuse(Refusal::Unavailable, "all gone ünd", true, None);
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], "14");
        assert_eq!(
            g.headers()["grpc-message"],
            "backends_unavailable: all gone %C3%BCnd"
        );
    }
}
