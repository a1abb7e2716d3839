//! Health checking, the pure parts: the per-instance state machine, who probes what, and the
//! probes themselves (HTTP GET, TCP connect, `grpc.health.v1`).
//!
//! # Who probes what
//! Every replica registers itself under `/registry/v1/replicas/<id>` with a lease of its own and
//! watches that prefix, so all replicas see the same set of live replicas (up to watch delay).
//! An instance is probed by the replica that wins rendezvous (highest-random-weight) hashing:
//! `owner(instance) = argmax over replicas r of mix64(fnv1a64(r + "\n" + instance key))`. Every replica
//! computes the same owner from the same set, so each instance is probed by exactly one replica;
//! when a replica joins or leaves, only the instances it wins or loses move (about 1/n of them).
//! While the replica set changes (a new replica's key has reached some replicas but not
//! others, or a dead replica's lease has not expired yet) an instance can briefly be probed by
//! two replicas or by none, for at most one watch delay or one replica TTL respectively.
//! FNV-1a and MurmurHash3's finaliser are used because they are fixed forever: replicas built by different compilers agree.
//!
//! # Probing over TLS
//! HTTP and gRPC checks with `tls` on ([`CheckKind::tls`]) dial TLS with the replica's
//! [`ProbeTls`] (`--check-cacert`, `--check-cert`, `--check-key`): the instance's certificate
//! must chain to that CA and carry the check's `tls_server_name`, or else the registered
//! address; HTTP offers ALPN `http/1.1`, gRPC `h2`. A failed handshake is a failed probe whose
//! reason (unknown issuer, wrong name, not TLS at all...) becomes the record's `health_detail`
//! like any other. A replica started without `--check-cacert` fails every TLS probe, saying
//! so, rather than probing in plaintext or refusing registrations: the replica that accepts a
//! registration is often not the one that probes it, and the fix (give that replica the CA)
//! belongs to the operator, who sees the reason in the record.
//!
//! # The state machine
//! A new registration starts healthy. `unhealthy_threshold` failed probes in a row make it
//! unhealthy; `healthy_threshold` passing probes in a row make it healthy again. Only
//! transitions are written to the coordinator.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use service_kit::tls::rustls::ClientConfig;
use service_kit::tls::rustls::client::Resumption;
use service_kit::tls::rustls::pki_types::ServerName;
use service_kit::tls::tokio_rustls::{self, client::TlsStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::model::{CheckKind, CheckTls, HealthCheckSpec, HealthStatus};

/// The TLS material a replica probes TLS checks with (`--check-cacert`, `--check-cert`,
/// `--check-key`), as one connector per ALPN offer. Cheap to clone. Session resumption is off:
/// every probe is a full handshake, so every probe verifies the instance's certificate (a
/// resumed session would keep passing after the instance's certificate expired or changed).
#[derive(Clone)]
pub struct ProbeTls {
    http1: tokio_rustls::TlsConnector,
    h2: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for ProbeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeTls").finish_non_exhaustive()
    }
}

impl ProbeTls {
    /// Connectors from a client configuration (`ClientTlsFiles::client_config`).
    pub fn new(config: &Arc<ClientConfig>) -> ProbeTls {
        let with_alpn = |alpn: &[u8]| {
            let mut c = (**config).clone();
            c.alpn_protocols = vec![alpn.to_vec()];
            c.resumption = Resumption::disabled();
            tokio_rustls::TlsConnector::from(Arc::new(c))
        };
        ProbeTls {
            http1: with_alpn(b"http/1.1"),
            h2: with_alpn(b"h2"),
        }
    }
}

/// Where a probe goes: `host` is the registered address (an IP address or a DNS name), `addr`
/// the same with the port, for connecting.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The registered address.
    pub host: &'a str,
    /// `host:port` (IPv6 in brackets).
    pub addr: &'a str,
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// MurmurHash3's 64-bit finaliser: spreads FNV's output so that similar keys get unrelated
/// weights (FNV alone skews rendezvous hashing).
pub fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The replica (of `replicas`) that probes the instance stored under `key`.
pub fn owner<'a>(key: &str, replicas: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    replicas
        .into_iter()
        .max_by_key(|r| (mix64(fnv1a64(&[r.as_bytes(), b"\n", key.as_bytes()])), *r))
}

/// The health state of one probed instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckState {
    /// The current conclusion.
    pub status: HealthStatus,
    /// Passing probes in a row.
    pub passes: u32,
    /// Failed probes in a row.
    pub failures: u32,
}

impl CheckState {
    /// Starts from a status (the one in the record).
    pub fn new(status: HealthStatus) -> CheckState {
        CheckState {
            status,
            passes: 0,
            failures: 0,
        }
    }

    /// Records one probe result; returns the new status if it changed.
    pub fn observe(&mut self, passed: bool, spec: &HealthCheckSpec) -> Option<HealthStatus> {
        if passed {
            self.passes += 1;
            self.failures = 0;
            if self.status == HealthStatus::Unhealthy && self.passes >= spec.healthy_threshold {
                self.status = HealthStatus::Healthy;
                return Some(self.status);
            }
        } else {
            self.failures += 1;
            self.passes = 0;
            if self.status == HealthStatus::Healthy && self.failures >= spec.unhealthy_threshold {
                self.status = HealthStatus::Unhealthy;
                return Some(self.status);
            }
        }
        None
    }
}

/// The label of a check kind, for metrics.
pub fn kind_label(kind: &CheckKind) -> &'static str {
    match kind {
        CheckKind::Http { .. } => "http",
        CheckKind::Tcp => "tcp",
        CheckKind::Grpc { .. } => "grpc",
    }
}

/// Probes `target` once as `spec` says, within its timeout; TLS checks with `tls`. `Ok(())`
/// if healthy, otherwise why not.
pub async fn probe(
    target: Target<'_>,
    spec: &HealthCheckSpec,
    tls: Option<&ProbeTls>,
) -> Result<(), String> {
    let timeout = Duration::from_millis(u64::from(spec.timeout_ms));
    let addr = target.addr;
    let work = async {
        let dial = match spec.kind.tls() {
            None => None,
            Some(check) => Some(TlsDial::new(target, check, tls)?),
        };
        match &spec.kind {
            CheckKind::Tcp => TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect {addr}: {e}")),
            CheckKind::Http { path, .. } => match dial {
                None => {
                    let stream = TcpStream::connect(addr)
                        .await
                        .map_err(|e| format!("http connect {addr}: {e}"))?;
                    http_get(stream, addr, path).await
                }
                Some(dial) => {
                    let stream = dial.connect(&dial.http1).await?;
                    http_get(stream, addr, path).await
                }
            },
            CheckKind::Grpc { service, .. } => grpc_check(addr, service, timeout, dial).await,
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// One TLS probe's dialling: the address, the name the certificate must carry, the connectors.
#[derive(Clone)]
struct TlsDial {
    addr: String,
    name: ServerName<'static>,
    http1: tokio_rustls::TlsConnector,
    h2: tokio_rustls::TlsConnector,
}

impl TlsDial {
    fn new(
        target: Target<'_>,
        check: CheckTls<'_>,
        tls: Option<&ProbeTls>,
    ) -> Result<TlsDial, String> {
        let Some(tls) = tls else {
            return Err(
                "a TLS check, but this registry-svc replica has no --check-cacert to verify \
                 the instance's certificate with"
                    .into(),
            );
        };
        let name = check.server_name.unwrap_or(target.host);
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| format!("{name:?} cannot be checked against a certificate: {e}"))?;
        Ok(TlsDial {
            addr: target.addr.to_owned(),
            name,
            http1: tls.http1.clone(),
            h2: tls.h2.clone(),
        })
    }

    /// TCP, then the handshake with `connector`; errors name the address and the checked name.
    async fn connect(
        &self,
        connector: &tokio_rustls::TlsConnector,
    ) -> Result<TlsStream<TcpStream>, String> {
        let addr = &self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("tls connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| {
                format!(
                    "TLS handshake with {addr} (certificate checked for {}): {e}",
                    self.name.to_str()
                )
            })
    }
}

/// tonic's connector for a gRPC probe over TLS: each call dials [`TlsDial`] with ALPN `h2`.
#[derive(Clone)]
struct GrpcTlsConnector(Arc<TlsDial>);

type GrpcConnectFuture = Pin<
    Box<
        dyn Future<Output = Result<hyper_util::rt::TokioIo<TlsStream<TcpStream>>, std::io::Error>>
            + Send,
    >,
>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for GrpcTlsConnector {
    type Response = hyper_util::rt::TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = GrpcConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let dial = self.0.clone();
        Box::pin(async move {
            dial.connect(&dial.h2)
                .await
                .map(hyper_util::rt::TokioIo::new)
                .map_err(std::io::Error::other)
        })
    }
}

/// `GET path` over HTTP/1.1 on `stream` (plain or TLS); 2xx passes. Reads only the status line.
async fn http_get<S>(mut stream: S, addr: &str, path: &str) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: registry-svc\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("http send: {e}"))?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("http read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.split("\r\n").next().unwrap_or_default();
    let code = line.split(' ').nth(1).unwrap_or_default();
    if !line.starts_with("HTTP/") || code.len() != 3 {
        return Err(format!("GET {path}: not an HTTP answer: {line:?}"));
    }
    if code.starts_with('2') {
        Ok(())
    } else {
        Err(format!("GET {path} answered {code}"))
    }
}

/// `grpc.health.v1.Health/Check` (over TLS with `dial`); `SERVING` passes.
async fn grpc_check(
    addr: &str,
    service: &str,
    timeout: Duration,
    dial: Option<TlsDial>,
) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("grpc endpoint {addr}: {e}"))?
        .connect_timeout(timeout);
    let channel = match dial {
        None => endpoint
            .connect()
            .await
            .map_err(|e| format!("grpc connect {addr}: {e}"))?,
        Some(dial) => endpoint
            .connect_with_connector(GrpcTlsConnector(Arc::new(dial)))
            .await
            .map_err(|e| format!("grpc connect {addr}: {}", error_chain(&e)))?,
    };
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| format!("grpc health check: {} {}", s.code(), s.message()))?;
    let status = resp.get_ref().status;
    if status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        let name = ServingStatus::try_from(status)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN");
        Err(format!("grpc health status {name}"))
    }
}

/// An error and its sources, `: `-separated (tonic's transport error alone says only
/// "transport error"; the handshake's reason is underneath).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// Runs one probe and measures it.
pub async fn timed_probe(
    target: Target<'_>,
    spec: &HealthCheckSpec,
    tls: Option<&ProbeTls>,
) -> (Result<(), String>, Duration) {
    let started = Instant::now();
    let result = probe(target, spec, tls).await;
    (result, started.elapsed())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn spec() -> HealthCheckSpec {
        HealthCheckSpec {
            kind: CheckKind::Tcp,
            interval_ms: 1000,
            timeout_ms: 100,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    #[test]
    fn unhealthy_after_threshold_failures_in_a_row_and_back_after_passes() {
        let s = spec();
        let mut st = CheckState::new(HealthStatus::Healthy);
        assert_eq!(st.observe(false, &s), None);
        assert_eq!(st.observe(false, &s), None);
        assert_eq!(
            st.observe(true, &s),
            None,
            "a pass resets the failure count"
        );
        assert_eq!(st.observe(false, &s), None);
        assert_eq!(st.observe(false, &s), None);
        assert_eq!(st.observe(false, &s), Some(HealthStatus::Unhealthy));
        assert_eq!(st.observe(false, &s), None, "only transitions are reported");
        assert_eq!(st.observe(true, &s), None);
        assert_eq!(st.observe(true, &s), Some(HealthStatus::Healthy));
    }

    #[test]
    fn fnv_is_the_published_function() {
        // Test vectors of FNV-1a 64.
        assert_eq!(fnv1a64(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(&[b"foo"]), 0xdcb2_7518_fed9_d577);
    }

    #[test]
    fn every_instance_has_one_owner_and_a_new_replica_takes_about_its_share() {
        let keys: Vec<String> = (0..3000).map(|i| format!("/k/{i}")).collect();
        let three = ["r1", "r2", "r3"];
        let four = ["r1", "r2", "r3", "r4"];
        let mut per_replica: HashMap<&str, usize> = HashMap::new();
        let mut moved = 0;
        for k in &keys {
            let before = owner(k, three).expect("owner");
            let after = owner(k, four).expect("owner");
            *per_replica.entry(before).or_default() += 1;
            if before != after {
                assert_eq!(after, "r4", "keys only move to the new replica");
                moved += 1;
            }
            // Order of the replica list does not matter.
            assert_eq!(owner(k, ["r3", "r1", "r2"]), Some(before));
        }
        for (r, n) in per_replica {
            assert!((800..1200).contains(&n), "{r} owns {n} of 3000");
        }
        assert!((550..950).contains(&moved), "{moved} of 3000 moved");
        assert_eq!(owner("/k", Vec::<&str>::new()), None);
    }
}
