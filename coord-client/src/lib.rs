//! `coord-client`: the typed client every platform service uses to reach the coordinator.
//!
//! It speaks the etcd v3 API through the code generated in `proto` (not the third-party
//! `etcd-client` crate) and adds what every service would otherwise write again: failover
//! between endpoints, bounded retries, leases kept alive across outages, and watches that
//! resume from the last revision they delivered.
//!
//! # Layout
//! - [`Client`] (this file): endpoints, channels, and the one retry loop every call goes through.
//! - [`kv`]: get, prefix range, put, delete, txn helpers.
//! - [`lease`]: grant, keep-alive, revoke, and [`lease::LeaseKeeper`], a task that keeps a lease
//!   alive and, after it expired (an outage longer than its TTL), grants a new one and calls the
//!   owner back so it can write its keys again.
//! - [`maintenance`]: the member list and each endpoint's status (leader, term, revision).
//! - [`watch`]: [`watch::WatchStream`], a watch that survives reconnects.
//! - [`error`]: the crate's one error type.
//!
//! # Which calls are retried
//! Every call runs under one deadline ([`ClientConfig::retry_deadline`]). A failure that says the
//! endpoint is down (gRPC `Unavailable`, a transport error, a per-attempt timeout) moves the
//! client to the next endpoint and tries again, with a short backoff once every endpoint failed.
//!
//! | call | retried after a failure that may have reached the server? |
//! |---|---|
//! | `get`, `range`, `get_prefix`, lease keep-alive, time-to-live | yes: reads |
//! | `lease_grant` | yes: the client picks the lease ID, so a repeated grant answers "lease already exists", which is taken as success |
//! | `lease_revoke` | yes: "lease not found" on a retry is taken as success |
//! | `delete` | yes: deleting twice leaves the same state (the retry may report `deleted = 0`) |
//! | `txn_guarded` (a Txn whose compares make a repeat fail) | yes: the caller asserts the guard |
//! | `put`, `txn` | **no**: only when the failure proves the request never left (connection refused, `etcdserver: no leader`); otherwise the error is returned and the caller decides |
//!
//! # Caveats
//! - With several endpoints the client does not learn the cluster's members by itself; it uses
//!   the list it was given.
//! - Answers may be as large as etcd's clients accept ([`MAX_RESPONSE_BYTES`], 2 GiB - 1, etcd's
//!   `MaxCallRecvMsgSize` default), not tonic's 4 MiB: a Range over a big prefix (a registry
//!   service of 50,000 instances is about 15 MB) must not fail in the client.
//! - A watch reconnect is invisible to its reader except for a log line; if the history it needs
//!   was compacted meanwhile, the reader gets [`watch::WatchEvent::Compacted`] and must read a
//!   fresh snapshot.

pub mod error;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod watch;

/// The largest answer the client decodes: etcd's client default (`math.MaxInt32`).
pub const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use error::{Error, Result};
pub use kv::{KeyValue, Txn};
pub use lease::LeaseKeeper;
pub use maintenance::EndpointStatus;
pub use watch::{Event, EventKind, WatchEvent, WatchOptions, WatchStream};

/// How the client connects and how long it keeps trying.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Coordinator endpoints, as `http://host:port` or `host:port`.
    pub endpoints: Vec<String>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How long one attempt of one call may take.
    pub request_timeout: Duration,
    /// How long one call keeps retrying on other endpoints before it fails.
    pub retry_deadline: Duration,
    /// TLS (the coordinator's CA, and a client certificate when the coordinator requires
    /// one: `service_kit::tls::ClientTlsArgs`); `None` dials plain TCP. With TLS,
    /// `https://` and `http://` endpoints are both dialled over TLS.
    pub tls: Option<Arc<service_kit::tls::rustls::ClientConfig>>,
}

impl ClientConfig {
    /// Defaults (connect 2 s, request 5 s, retry for 10 s, no TLS) for `endpoints`.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> ClientConfig {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            retry_deadline: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// A handle on the coordinator; cheap to clone, all clones share the connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<Member>,
    /// Index of the endpoint calls go to first.
    preferred: AtomicUsize,
    config: ClientConfig,
}

struct Member {
    url: String,
    channel: Channel,
}

/// Whether a call may be repeated after a failure that might have reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idempotence {
    /// Repeating it leaves the same state.
    Safe,
    /// Repeating it could apply it twice.
    Unsafe,
}

/// What a failed attempt tells about retrying.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The request certainly did not reach a server that could apply it.
    NotSent,
    /// The endpoint failed; the request may or may not have been applied.
    MaybeSent,
    /// An answer from the server: retrying elsewhere would not help.
    Final,
}

fn classify(status: &Status) -> Failure {
    match status.code() {
        Code::Unavailable => {
            let text = status.message();
            if text.contains("etcdserver: no leader") || is_connect_error(status) {
                Failure::NotSent
            } else {
                Failure::MaybeSent
            }
        }
        // A connection that broke mid-call surfaces as Cancelled/Unknown/Internal with a
        // transport error inside.
        _ if is_transport_error(status) => {
            if is_connect_error(status) {
                Failure::NotSent
            } else {
                Failure::MaybeSent
            }
        }
        _ => Failure::Final,
    }
}

/// True when the status came from failing to open a connection (nothing was sent).
fn is_connect_error(status: &Status) -> bool {
    let mut text = status.message().to_ascii_lowercase();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        text.push_str(&err.to_string().to_ascii_lowercase());
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        source = err.source();
    }
    text.contains("connection refused") || text.contains("tcp connect error")
}

/// True when the status was made by the client's transport (the connection failed), not
/// sent by a server.
fn is_transport_error(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::transport::Error>() || err.is::<std::io::Error>() {
            return true;
        }
        source = err.source();
    }
    let text = status.message().to_ascii_lowercase();
    text.contains("transport error") || text.contains("h2 protocol error")
}

impl Client {
    /// A client for `config.endpoints`. Connections are opened lazily, so this succeeds while
    /// the coordinator is down; the first call waits for it (up to the retry deadline). Must be
    /// called inside a Tokio runtime (each endpoint's channel spawns its worker task).
    pub fn new(config: ClientConfig) -> Result<Client> {
        if config.endpoints.is_empty() {
            return Err(Error::InvalidEndpoint("no endpoints given".into()));
        }
        let mut members = Vec::with_capacity(config.endpoints.len());
        for raw in &config.endpoints {
            let url = if raw.contains("://") {
                raw.clone()
            } else {
                format!("http://{raw}")
            };
            let endpoint = Endpoint::from_shared(service_kit::tls::plain_scheme(&url))
                .map_err(|e| Error::InvalidEndpoint(format!("{raw:?}: {e}")))?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            members.push(Member {
                url,
                channel: service_kit::tls::lazy_channel(endpoint, config.tls.as_ref()),
            });
        }
        Ok(Client {
            inner: Arc::new(Inner {
                members,
                preferred: AtomicUsize::new(0),
                config,
            }),
        })
    }

    /// Shorthand for `Client::new(ClientConfig::new(endpoints))`.
    pub fn connect<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Result<Client> {
        Client::new(ClientConfig::new(endpoints))
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The channel of the endpoint calls go to now, and its index.
    pub(crate) fn current(&self) -> (usize, Channel) {
        let i = self.inner.preferred.load(Ordering::Relaxed) % self.inner.members.len();
        (i, self.inner.members[i].channel.clone())
    }

    /// Moves to the endpoint after `failed` (unless another caller already moved on).
    pub(crate) fn rotate(&self, failed: usize) {
        let n = self.inner.members.len();
        if n > 1 {
            let _ = self.inner.preferred.compare_exchange(
                failed,
                (failed + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            tracing::debug!(
                from = %self.inner.members[failed].url,
                to = %self.inner.members[(failed + 1) % n].url,
                "coordinator endpoint failed; switching"
            );
        }
    }

    pub(crate) fn endpoint_count(&self) -> usize {
        self.inner.members.len()
    }

    /// Runs `attempt` against the current endpoint, moving to the next one and retrying as the
    /// module docs describe, until it succeeds, fails for good, or the retry deadline passes.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        idempotence: Idempotence,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.retry_deadline;
        let mut backoff = Duration::from_millis(25);
        let mut failures = 0usize;
        loop {
            let (index, channel) = self.current();
            let left = deadline.saturating_duration_since(Instant::now());
            let per_attempt = config
                .request_timeout
                .min(left.max(Duration::from_millis(1)));
            let failure = match tokio::time::timeout(per_attempt, attempt(channel)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(status)) => match classify(&status) {
                    Failure::Final => return Err(Error::from_status(status)),
                    Failure::MaybeSent if idempotence == Idempotence::Unsafe => {
                        return Err(Error::Uncertain {
                            what,
                            source: status,
                        });
                    }
                    _ => Error::from_status(status),
                },
                Err(_) if idempotence == Idempotence::Unsafe => {
                    return Err(Error::Uncertain {
                        what,
                        source: Status::deadline_exceeded("attempt timed out"),
                    });
                }
                Err(_) => Error::Timeout { what },
            };
            self.rotate(index);
            failures += 1;
            if Instant::now() >= deadline {
                return Err(Error::Unavailable {
                    what,
                    last: Box::new(failure),
                });
            }
            tracing::debug!(what, error = %failure, "coordinator call failed; retrying");
            // Try every endpoint once before waiting.
            if failures.is_multiple_of(self.endpoint_count()) {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(backoff.min(left)).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_leader_and_refused_connections_were_not_sent() {
        assert_eq!(
            classify(&Status::unavailable("etcdserver: no leader")),
            Failure::NotSent
        );
        assert_eq!(
            classify(&Status::unavailable(
                "tcp connect error: Connection refused (os error 111)"
            )),
            Failure::NotSent
        );
    }

    #[test]
    fn other_unavailable_errors_may_have_been_applied() {
        assert_eq!(
            classify(&Status::unavailable("etcdserver: server stopped")),
            Failure::MaybeSent
        );
    }

    #[test]
    fn server_answers_are_final() {
        assert_eq!(
            classify(&Status::invalid_argument("etcdserver: key is not provided")),
            Failure::Final
        );
        assert_eq!(
            classify(&Status::not_found("etcdserver: requested lease not found")),
            Failure::Final
        );
    }

    #[test]
    fn a_client_needs_an_endpoint() {
        assert!(matches!(
            Client::new(ClientConfig::new(Vec::<String>::new())),
            Err(Error::InvalidEndpoint(_))
        ));
    }
}
