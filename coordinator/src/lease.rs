//! Lease deadlines: the leader's clock, kept apart from the replicated state.
//!
//! Which leases exist, their TTL and their keys are replicated state ([`crate::state`]). *When*
//! one expires is decided by the leader alone, from its own monotonic clock: keep-alives renew a
//! deadline here (not through the log, as in etcd), and an expiry task proposes a `LeaseRevoke`
//! for every lease past its deadline, which every member then applies the same way.
//!
//! On start (and, with replication, whenever a member becomes leader) every known lease gets a
//! fresh full TTL — etcd's behaviour without lease checkpoints. A lease therefore never expires
//! early because of a restart or an election; it may live up to one TTL longer than its last
//! keep-alive suggested.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Smallest TTL granted, in seconds (etcd: 1.5 × election timeout, rounded up).
pub const MIN_TTL: i64 = 2;

/// Deadlines of the leases this member expires.
#[derive(Default)]
pub struct Lessor {
    deadlines: Mutex<HashMap<i64, (Instant, i64)>>,
    /// Only the leader keeps deadlines; followers forward keep-alives to it.
    active: std::sync::atomic::AtomicBool,
}

impl Lessor {
    /// An empty lessor.
    pub fn new() -> Lessor {
        Lessor::default()
    }

    /// Whether this member keeps lease deadlines (it is the leader).
    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Start keeping deadlines: every lease gets its full TTL plus `extend` from now (on start
    /// or on becoming leader, so that no lease expires early because of an election).
    pub fn promote(&self, leases: impl Iterator<Item = (i64, i64)>, extend: Duration) {
        let now = Instant::now();
        let mut d = self.deadlines.lock();
        d.clear();
        for (id, ttl) in leases {
            d.insert(id, (now + secs(ttl) + extend, ttl));
        }
        self.active
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Stop keeping deadlines (this member is no longer the leader).
    pub fn demote(&self) {
        self.active
            .store(false, std::sync::atomic::Ordering::Release);
        self.deadlines.lock().clear();
    }

    /// A lease was granted (applied).
    pub fn granted(&self, id: i64, ttl: i64) {
        if self.is_active() {
            self.deadlines
                .lock()
                .insert(id, (Instant::now() + secs(ttl), ttl));
        }
    }

    /// A lease was revoked (applied).
    pub fn revoked(&self, id: i64) {
        self.deadlines.lock().remove(&id);
    }

    /// Renew a lease; returns its TTL, or `None` if this member knows no such lease.
    pub fn renew(&self, id: i64) -> Option<i64> {
        let mut d = self.deadlines.lock();
        let (deadline, ttl) = d.get_mut(&id)?;
        *deadline = Instant::now() + secs(*ttl);
        Some(*ttl)
    }

    /// Seconds left before the lease expires (rounded up), or `None` if unknown.
    pub fn remaining(&self, id: i64) -> Option<i64> {
        let d = self.deadlines.lock();
        let (deadline, _) = d.get(&id)?;
        let left = deadline.saturating_duration_since(Instant::now());
        Some(left.as_millis().div_ceil(1000) as i64)
    }

    /// Leases past their deadline, at most `max` of them.
    pub fn expired(&self, max: usize) -> Vec<i64> {
        let now = Instant::now();
        let d = self.deadlines.lock();
        d.iter()
            .filter(|(_, (dl, _))| *dl <= now)
            .map(|(id, _)| *id)
            .take(max)
            .collect()
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_moves_the_deadline_and_unknown_leases_are_none() {
        let l = Lessor::new();
        l.promote(std::iter::empty(), Duration::ZERO);
        l.granted(7, 0);
        assert_eq!(l.expired(10), vec![7]);
        l.granted(8, 100);
        assert_eq!(l.renew(8), Some(100));
        assert!(l.remaining(8).expect("known") >= 99);
        assert_eq!(l.renew(9), None);
        l.revoked(7);
        assert!(l.expired(10).is_empty());
    }
}
