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
//! # The state machine
//! A new registration starts healthy. `unhealthy_threshold` failed probes in a row make it
//! unhealthy; `healthy_threshold` passing probes in a row make it healthy again. Only
//! transitions are written to the coordinator.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::model::{CheckKind, HealthCheckSpec, HealthStatus};

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

/// Probes `addr` (`host:port`) once as `spec` says, within its timeout. `Ok(())` if healthy,
/// otherwise why not.
pub async fn probe(addr: &str, spec: &HealthCheckSpec) -> Result<(), String> {
    let timeout = Duration::from_millis(u64::from(spec.timeout_ms));
    let work = async {
        match &spec.kind {
            CheckKind::Tcp => TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect {addr}: {e}")),
            CheckKind::Http { path } => http_get(addr, path).await,
            CheckKind::Grpc { service } => grpc_check(addr, service, timeout).await,
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// `GET path` over HTTP/1.1; 2xx passes. Reads only the status line.
async fn http_get(addr: &str, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("http connect {addr}: {e}"))?;
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

/// `grpc.health.v1.Health/Check`; `SERVING` passes.
async fn grpc_check(addr: &str, service: &str, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("grpc endpoint {addr}: {e}"))?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("grpc connect {addr}: {e}"))?;
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

/// Runs one probe and measures it.
pub async fn timed_probe(addr: &str, spec: &HealthCheckSpec) -> (Result<(), String>, Duration) {
    let started = Instant::now();
    let result = probe(addr, spec).await;
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
