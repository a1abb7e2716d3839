//! Traffic control: rate limits, the retry budget, passive outlier ejection.
//!
//! Every type here takes the current time as an argument (nanoseconds on the gateway's own
//! monotonic clock, [`now_ns`]), so tests drive time by hand. State is kept in atomics or in
//! short `parking_lot` critical sections that never await.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::routes::{Outlier, Rate, Retries};

/// Nanoseconds since the first call in this process (monotonic).
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// [`now_ns`] for an instant already read (saves a clock read on the request path).
pub fn ns_at(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // Offset by one so that 0 can mean "never".
    u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX) + 1
}

/// The generic cell rate algorithm: a token bucket stored as one timestamp, the "theoretical
/// arrival time" (TAT) of the next request.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    /// Nanoseconds between requests at the sustained rate.
    interval: u64,
    /// How far ahead of `now` the TAT may run: `burst × interval`.
    window: u64,
}

impl Gcra {
    /// A limit of `rate`.
    pub fn new(rate: &Rate) -> Gcra {
        let interval = (1e9 / rate.per_second).max(1.0) as u64;
        Gcra {
            interval,
            window: interval.saturating_mul(u64::from(rate.burst())),
        }
    }

    /// Given the stored TAT, whether a request at `now` passes, and the TAT to store if so.
    /// `Err` carries how long until one would.
    fn step(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let next = tat.max(now) + self.interval;
        if next > now + self.window {
            return Err(Duration::from_nanos(next - now - self.window));
        }
        Ok(next)
    }

    /// Checks a request against a TAT kept in an atomic.
    pub fn check_atomic(&self, tat: &AtomicU64, now: u64) -> Result<(), Duration> {
        let mut current = tat.load(Ordering::Relaxed);
        loop {
            let next = self.step(current, now)?;
            match tat.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

/// A global limit: one GCRA cell.
#[derive(Debug)]
pub struct GlobalLimit {
    gcra: Gcra,
    tat: AtomicU64,
}

impl GlobalLimit {
    /// A limit of `rate` over everyone.
    pub fn new(rate: &Rate) -> GlobalLimit {
        GlobalLimit {
            gcra: Gcra::new(rate),
            tat: AtomicU64::new(0),
        }
    }

    /// Whether a request at `now` passes; `Err(wait)` if not.
    pub fn check(&self, now: u64) -> Result<(), Duration> {
        self.gcra.check_atomic(&self.tat, now)
    }
}

/// Shards of the per-key table, to keep lock contention low.
const SHARDS: usize = 16;

/// Most keys tracked per shard; beyond it, expired entries are swept, and if none expired
/// the request passes unlimited (fail open) rather than grow without bound.
const MAX_KEYS_PER_SHARD: usize = 8_192;

/// A limit per key (client IP): one GCRA cell per key, in sharded maps.
#[derive(Debug)]
pub struct KeyedLimit<K = IpAddr> {
    gcra: Gcra,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<HashMap<K, u64>>>,
}

impl<K: Hash + Eq + Copy> KeyedLimit<K> {
    /// A limit of `rate` per key.
    pub fn new(rate: &Rate) -> KeyedLimit<K> {
        KeyedLimit {
            gcra: Gcra::new(rate),
            hasher: Default::default(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Whether a request of `key` at `now` passes; `Err(wait)` if not.
    pub fn check(&self, key: K, now: u64) -> Result<(), Duration> {
        let shard = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut map = self.shards[shard].lock();
        if let Some(tat) = map.get_mut(&key) {
            *tat = self.gcra.step(*tat, now)?;
            return Ok(());
        }
        if map.len() >= MAX_KEYS_PER_SHARD {
            // A TAT in the past means a full bucket: the entry carries no information.
            map.retain(|_, tat| *tat > now);
            if map.len() >= MAX_KEYS_PER_SHARD {
                return Ok(());
            }
        }
        let tat = self.gcra.step(0, now)?;
        map.insert(key, tat);
        Ok(())
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Fixed-point scale of the budget's tokens.
const MILLI: i64 = 1_000;

/// A retry budget (as Linkerd's and Finagle's): retries may add at most `budget_percent` of
/// the requests, plus `min_per_second` retries per second.
///
/// Each request deposits `budget_percent / 100` of a token; each retry withdraws one. Once a
/// second the floor's `min_per_second` tokens are added. The balance is capped at ten seconds'
/// worth of the floor (at least 10 tokens), so an idle period cannot save up a retry storm.
#[derive(Debug)]
pub struct RetryBudget {
    deposit: i64,
    floor: i64,
    cap: i64,
    tokens: AtomicI64,
    last_refill: AtomicU64,
}

impl RetryBudget {
    /// The budget of `retries`.
    pub fn new(retries: &Retries) -> RetryBudget {
        let floor = i64::from(retries.min_per_second) * MILLI;
        let cap = (floor * 10).max(10 * MILLI);
        RetryBudget {
            deposit: i64::from(retries.budget_percent) * MILLI / 100,
            floor,
            cap,
            tokens: AtomicI64::new(floor.min(cap)),
            last_refill: AtomicU64::new(0),
        }
    }

    fn add(&self, amount: i64) {
        if amount == 0 {
            return;
        }
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < self.cap).then(|| (t + amount).min(self.cap))
            });
    }

    /// Records a request.
    pub fn deposit(&self) {
        self.add(self.deposit);
    }

    /// Takes a token for one retry at `now`, if there is one.
    pub fn try_withdraw(&self, now: u64) -> bool {
        let last = self.last_refill.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1_000_000_000
            && self
                .last_refill
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.add(self.floor);
        }
        self.tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= MILLI).then_some(t - MILLI)
            })
            .is_ok()
    }

    /// Whole retries the budget holds now.
    pub fn available(&self) -> i64 {
        self.tokens.load(Ordering::Relaxed) / MILLI
    }
}

/// How one try at a backend ended, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer below 500 (or a 5xx that is not the backend's fault, e.g. 501).
    Success,
    /// A 5xx answer.
    ServerError,
    /// No connection, or no answer at all (reset, timeout).
    ConnectFailure,
}

/// One backend's outlier-detection state.
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Ejected until this time (ns), 0 if never.
    ejected_until: AtomicU64,
    /// Ejections in a row (the n-th lasts n × base).
    ejections: AtomicU32,
    /// When the last ejection started (ns).
    last_ejected_at: AtomicU64,
    /// Ejections ever (for metrics and the admin API).
    pub total_ejections: AtomicU64,
}

impl OutlierState {
    /// Whether the backend is ejected at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Until when it is ejected (ns; in the past or 0 if not).
    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Relaxed)
    }

    /// Records a try's outcome. Returns the ejection's length if this outcome ejects the
    /// backend; `may_eject` says whether the pool's share of ejected backends allows one more.
    pub fn record(
        &self,
        outcome: Outcome,
        config: &Outlier,
        now: u64,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let tripped = match outcome {
            Outcome::Success => {
                // Plain stores only when needed: the common path stays read-only.
                if self.consecutive_5xx.load(Ordering::Relaxed) != 0 {
                    self.consecutive_5xx.store(0, Ordering::Relaxed);
                }
                if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
                return None;
            }
            Outcome::ServerError => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                let n = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
                config.consecutive_5xx > 0 && n >= config.consecutive_5xx
            }
            Outcome::ConnectFailure => {
                let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                config.consecutive_connect_failures > 0 && n >= config.consecutive_connect_failures
            }
        };
        if !tripped || self.is_ejected(now) || !may_eject() {
            return None;
        }
        // A backend that stayed in for longer than the longest ejection starts over at 1×.
        let last = self.last_ejected_at.load(Ordering::Relaxed);
        let max = u64::try_from(config.max_ejection.as_nanos()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) > max.saturating_mul(2) {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = config
            .base_ejection
            .saturating_mul(n)
            .min(config.max_ejection);
        let until = now.saturating_add(u64::try_from(length.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until.store(until, Ordering::Relaxed);
        self.last_ejected_at.store(now, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.total_ejections.fetch_add(1, Ordering::Relaxed);
        Some(length)
    }
}

/// How many of `n` backends may be ejected at once under `percent`: at least one if
/// `percent > 0`.
pub fn max_ejected(n: usize, percent: u32) -> usize {
    if percent == 0 {
        return 0;
    }
    (n * percent as usize / 100).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate {
            per_second,
            burst: Some(burst),
        }
    }

    #[test]
    fn gcra_allows_the_burst_then_the_sustained_rate() {
        let limit = GlobalLimit::new(&rate(10.0, 5));
        let t0 = 10 * S;
        for _ in 0..5 {
            assert!(limit.check(t0).is_ok());
        }
        let wait = limit.check(t0).expect_err("burst used up");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // 100 ms later one more token.
        assert!(limit.check(t0 + S / 10).is_ok());
        assert!(limit.check(t0 + S / 10).is_err());
        // After a long pause the full burst is back, no more.
        for _ in 0..5 {
            assert!(limit.check(t0 + 100 * S).is_ok());
        }
        assert!(limit.check(t0 + 100 * S).is_err());
    }

    #[test]
    fn keyed_limit_is_per_key() {
        let limit: KeyedLimit<u32> = KeyedLimit::new(&rate(1.0, 2));
        assert!(limit.check(1, S).is_ok());
        assert!(limit.check(1, S).is_ok());
        assert!(limit.check(1, S).is_err());
        assert!(limit.check(2, S).is_ok());
        assert_eq!(limit.len(), 2);
    }

    #[test]
    fn keyed_limit_sweeps_expired_keys_instead_of_growing() {
        let limit: KeyedLimit<u32> = KeyedLimit::new(&rate(1000.0, 1));
        for k in 0..(SHARDS * MAX_KEYS_PER_SHARD) as u32 {
            let _ = limit.check(k, S);
        }
        // Much later every entry has expired; new keys replace them.
        for k in 0..1000u32 {
            assert!(limit.check(1_000_000 + k, 100 * S).is_ok());
        }
        assert!(limit.len() <= SHARDS * MAX_KEYS_PER_SHARD);
    }

    #[test]
    fn retry_budget_grows_with_requests_and_is_capped() {
        let b = RetryBudget::new(&Retries {
            attempts: 2,
            budget_percent: 20,
            min_per_second: 0,
        });
        assert!(!b.try_withdraw(S), "nothing deposited yet");
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.try_withdraw(S));
        assert!(b.try_withdraw(S));
        assert!(!b.try_withdraw(S), "20% of 10 requests is 2 retries");
        for _ in 0..10_000 {
            b.deposit();
        }
        assert_eq!(b.available(), 10, "capped");
    }

    #[test]
    fn retry_budget_floor_refills_each_second() {
        let b = RetryBudget::new(&Retries {
            attempts: 2,
            budget_percent: 0,
            min_per_second: 2,
        });
        let mut granted = 0;
        for _ in 0..100 {
            granted += usize::from(b.try_withdraw(5 * S));
        }
        // The initial floor plus one refill.
        assert_eq!(granted, 4);
        assert!(b.try_withdraw(7 * S));
    }

    fn outlier() -> Outlier {
        Outlier {
            consecutive_5xx: 3,
            consecutive_connect_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_growing_times() {
        let o = OutlierState::default();
        let c = outlier();
        assert_eq!(o.record(Outcome::ConnectFailure, &c, S, || true), None);
        let first = o.record(Outcome::ConnectFailure, &c, S, || true);
        assert_eq!(first, Some(Duration::from_secs(10)));
        assert!(o.is_ejected(2 * S) && !o.is_ejected(12 * S));
        o.record(Outcome::ConnectFailure, &c, 12 * S, || true);
        let second = o.record(Outcome::ConnectFailure, &c, 12 * S, || true);
        assert_eq!(second, Some(Duration::from_secs(20)));
        o.record(Outcome::ConnectFailure, &c, 40 * S, || true);
        let third = o.record(Outcome::ConnectFailure, &c, 40 * S, || true);
        assert_eq!(
            third,
            Some(Duration::from_secs(25)),
            "capped at max_ejection"
        );
    }

    #[test]
    fn a_success_resets_the_count_and_the_share_cap_holds() {
        let o = OutlierState::default();
        let c = outlier();
        o.record(Outcome::ServerError, &c, S, || true);
        o.record(Outcome::ServerError, &c, S, || true);
        o.record(Outcome::Success, &c, S, || true);
        o.record(Outcome::ServerError, &c, S, || true);
        o.record(Outcome::ServerError, &c, S, || true);
        assert!(!o.is_ejected(S));
        assert_eq!(
            o.record(Outcome::ServerError, &c, S, || false),
            None,
            "share cap"
        );
        assert!(o.record(Outcome::ServerError, &c, S, || true).is_some());
        assert_eq!(max_ejected(2, 50), 1);
        assert_eq!(max_ejected(1, 10), 1);
        assert_eq!(max_ejected(10, 0), 0);
    }
}
