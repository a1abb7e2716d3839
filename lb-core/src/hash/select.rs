//! Choosing a member for a request, given its candidates and the members' current loads.
//!
//! # Keyed requests: consistent hashing with bounded loads
//! Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads" (SODA 2018;
//! the 2016 preprint is what Envoy's `hash_balance_factor` and HAProxy's `hash-balance-factor`
//! implement). With `T` requests in flight over the pool and `W` the pool's total weight, a
//! member of weight `w` may hold at most
//!
//! ```text
//! capacity(w) = ⌈(1 + ε) · (T + 1) · w / W⌉
//! ```
//!
//! requests, counting the one being placed. The key's owner takes the request if it is below
//! its capacity; otherwise the request walks the key's order of preference (see
//! [`super::Table::walk`]) to the first member that is. Since the capacities add up to more
//! than `T + 1`, one always is. After placing, no member holds more than
//! `⌈(1 + ε) · mean⌉` (weighted: its weighted share of that), however skewed the keys are,
//! while a key keeps its owner whenever the owner is not overloaded. `ε = 0.25` by default;
//! no bound at all when a route turns it off.
//!
//! # Keyless requests: power of two choices
//! Two distinct available members at random; the one with fewer in-flight requests per unit of
//! weight wins (Mitzenmacher: the maximum load drops from `log n / log log n` to `log log n`).
//!
//! # Availability
//! A member that is ejected (outlier detection), at its circuit breaker's limit, or already
//! tried by this request is *unavailable*: it is skipped as if absent, and does not count in
//! `W`. A request whose every candidate is unavailable gets no member.

use super::Table;

/// What the choice needs to know about the members right now.
pub trait Loads {
    /// Number of members (indices `0..len()`).
    fn len(&self) -> usize;
    /// Whether there is no member.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Requests in flight at member `i`.
    fn load(&self, i: usize) -> u64;
    /// Weight of member `i` (at least 1).
    fn weight(&self, i: usize) -> u64;
    /// Whether member `i` may take this request.
    fn available(&self, i: usize) -> bool;
    /// Requests in flight over the whole pool (`T`).
    fn total_load(&self) -> u64;
    /// Sum of the weights of the available members (`W`).
    fn total_weight(&self) -> u64;
}

/// The outcome of a keyed choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The chosen member.
    pub member: usize,
    /// How many candidates came before it in the key's order (0: the owner).
    pub rank: usize,
    /// Whether an available candidate was passed over for being at its bound: a
    /// bounded-load spill.
    pub spilled: bool,
}

/// The most requests a member of `weight` may hold (see the module docs).
///
/// Computed in integers (ε in millionths), so that e.g. `1.1 × 360 × 100 / 900` is 44, not
/// the 45 that the same product gives in floating point.
pub fn capacity(epsilon: f64, total_load: u64, weight: u64, total_weight: u64) -> u64 {
    if total_weight == 0 {
        return u64::MAX;
    }
    let eps_ppm = (epsilon.max(0.0) * 1e6).round() as u128;
    let num = (1_000_000 + eps_ppm) * u128::from(total_load + 1) * u128::from(weight);
    let den = 1_000_000 * u128::from(total_weight);
    u64::try_from(num.div_ceil(den)).unwrap_or(u64::MAX)
}

/// Picks a member for the key whose hash is `hash`: its owner in `table`, or, with bounded
/// loads (`epsilon` set), the first candidate below its capacity. `None` if no member is
/// available.
pub fn pick_keyed(
    table: &Table,
    hash: u64,
    loads: &impl Loads,
    epsilon: Option<f64>,
) -> Option<Choice> {
    let fits = |i: usize| match epsilon {
        None => true,
        Some(eps) => {
            loads.load(i)
                < capacity(
                    eps,
                    loads.total_load(),
                    loads.weight(i),
                    loads.total_weight(),
                )
        }
    };
    // The common case without walking (and without allocating the walk's visited set).
    let owner = table.first(hash)?;
    if loads.available(owner) && fits(owner) {
        return Some(Choice {
            member: owner,
            rank: 0,
            spilled: false,
        });
    }
    let mut spilled = false;
    let mut fallback = None;
    for (rank, i) in table.walk(hash).enumerate() {
        if !loads.available(i) {
            continue;
        }
        if fits(i) {
            return Some(Choice {
                member: i,
                rank,
                spilled,
            });
        }
        spilled = true;
        fallback.get_or_insert(Choice {
            member: i,
            rank,
            spilled: false,
        });
    }
    // Only reachable when loads changed under us (they are read live, without a lock).
    fallback
}

/// Picks a member for a keyless request by power of two choices. `None` if no member is
/// available.
pub fn pick_p2c(loads: &impl Loads, rng: &mut impl rand::Rng) -> Option<usize> {
    let n = loads.len();
    match n {
        0 => return None,
        1 => return loads.available(0).then_some(0),
        _ => {}
    }
    // A few random draws find two available members unless most are unavailable.
    for _ in 0..4 {
        let a = rng.random_range(0..n);
        let mut b = rng.random_range(0..n - 1);
        if b >= a {
            b += 1;
        }
        match (loads.available(a), loads.available(b)) {
            (true, true) => return Some(lighter(loads, a, b)),
            (true, false) => return Some(a),
            (false, true) => return Some(b),
            (false, false) => {}
        }
    }
    (0..n)
        .filter(|&i| loads.available(i))
        .reduce(|a, b| lighter(loads, a, b))
}

/// The member with fewer in-flight requests per unit of weight (ties: `a`).
fn lighter(loads: &impl Loads, a: usize, b: usize) -> usize {
    // load_a / w_a <= load_b / w_b, without division.
    let (la, wa) = (
        u128::from(loads.load(a)),
        u128::from(loads.weight(a).max(1)),
    );
    let (lb, wb) = (
        u128::from(loads.load(b)),
        u128::from(loads.weight(b).max(1)),
    );
    if la * wb <= lb * wa { a } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::maglev::Maglev;
    use crate::hash::ring::{DEFAULT_VNODES, Ring};
    use crate::hash::testing::{ids, nodes};
    use crate::hash::{Node, hash_key};
    use proptest::prelude::*;
    use rand::Rng as _;
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    /// Loads in plain vectors.
    struct Sim {
        load: Vec<u64>,
        weight: Vec<u64>,
        down: Vec<bool>,
    }

    impl Sim {
        fn new(weights: Vec<u64>) -> Sim {
            Sim {
                load: vec![0; weights.len()],
                down: vec![false; weights.len()],
                weight: weights,
            }
        }
    }

    impl Loads for Sim {
        fn len(&self) -> usize {
            self.load.len()
        }
        fn load(&self, i: usize) -> u64 {
            self.load[i]
        }
        fn weight(&self, i: usize) -> u64 {
            self.weight[i]
        }
        fn available(&self, i: usize) -> bool {
            !self.down[i]
        }
        fn total_load(&self) -> u64 {
            self.load.iter().sum()
        }
        fn total_weight(&self) -> u64 {
            (0..self.len())
                .filter(|&i| !self.down[i])
                .map(|i| self.weight[i])
                .sum()
        }
    }

    /// Ranks 1..=k with P(rank) ∝ 1/rank^s, sampled through the cumulative distribution.
    struct Zipf {
        cdf: Vec<f64>,
    }

    impl Zipf {
        fn new(k: usize, s: f64) -> Zipf {
            let mut acc = 0.0;
            let mut cdf: Vec<f64> = (1..=k)
                .map(|r| {
                    acc += 1.0 / (r as f64).powf(s);
                    acc
                })
                .collect();
            let total = acc;
            cdf.iter_mut().for_each(|c| *c /= total);
            Zipf { cdf }
        }
        fn sample(&self, rng: &mut impl rand::Rng) -> u64 {
            let u: f64 = rng.random();
            self.cdf.partition_point(|&c| c < u) as u64
        }
    }

    /// Runs a closed-loop simulation: `in_flight` requests at all times, each step ending a
    /// random one and placing a new Zipf-keyed one. Returns the worst peak/mean seen and
    /// checks after every placement that no member exceeds ⌈(1 + ε)·T·w/W⌉.
    fn simulate(
        table: &Table,
        sim: &mut Sim,
        epsilon: Option<f64>,
        in_flight: usize,
        seed: u64,
    ) -> f64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let zipf = Zipf::new(10_000, 1.1);
        let mut live: Vec<usize> = Vec::with_capacity(in_flight);
        let mut worst: f64 = 0.0;
        let total_weight: u64 = sim.weight.iter().sum();
        for step in 0..in_flight * 20 {
            if live.len() == in_flight {
                let gone = live.swap_remove(rng.random_range(0..live.len()));
                sim.load[gone] -= 1;
            }
            let key = zipf.sample(&mut rng);
            let choice =
                pick_keyed(table, hash_key(&key.to_le_bytes()), sim, epsilon).expect("a member");
            sim.load[choice.member] += 1;
            live.push(choice.member);
            let total = live.len() as u64;
            if let Some(eps) = epsilon {
                for i in 0..sim.len() {
                    // The bound after placing: capacity() with T + 1 = total.
                    let bound = capacity(eps, total - 1, sim.weight[i], total_weight);
                    assert!(
                        sim.load[i] <= bound,
                        "member {i} holds {} > {bound}",
                        sim.load[i]
                    );
                }
            }
            if step >= in_flight {
                // Steady state: weighted peak over weighted mean.
                let mean = total as f64 / total_weight as f64;
                let peak = (0..sim.len())
                    .map(|i| sim.load[i] as f64 / sim.weight[i] as f64)
                    .fold(0.0, f64::max);
                worst = worst.max(peak / mean);
            }
        }
        worst
    }

    #[test]
    fn zipf_keys_without_a_bound_overload_the_hot_owner() {
        // The check that the bounded-load test below measures something.
        let ids = ids(10);
        let table = Table::Ring(Ring::new(&nodes(&ids), DEFAULT_VNODES));
        let mut sim = Sim::new(vec![100; 10]);
        let worst = simulate(&table, &mut sim, None, 1_000, 7);
        assert!(worst > 2.0, "peak/mean {worst}");
    }

    #[test]
    fn capacity_is_exact_where_floating_point_is_not() {
        let float = (1.0f64 + 0.1) * 360.0 * 100.0 / 900.0;
        assert!(float.ceil() > 44.0, "the trap this avoids: {float}");
        assert_eq!(capacity(0.1, 39, 1, 1), 44);
        assert_eq!(capacity(0.25, 11, 1, 3), 5);
        assert_eq!(capacity(0.0, 8, 1, 3), 3);
        assert_eq!(capacity(0.25, 0, 1, 0), u64::MAX);
    }

    #[test]
    fn owner_takes_the_request_while_below_its_bound() {
        let ids = ids(4);
        let table = Table::Ring(Ring::new(&nodes(&ids), DEFAULT_VNODES));
        let sim = Sim::new(vec![100; 4]);
        let h = hash_key(b"user-1");
        let choice = pick_keyed(&table, h, &sim, Some(0.25)).expect("member");
        assert_eq!(
            choice,
            Choice {
                member: table.first(h).expect("owner"),
                rank: 0,
                spilled: false
            }
        );
    }

    #[test]
    fn overloaded_owner_spills_to_the_next_candidate() {
        let ids = ids(4);
        let table = Table::Ring(Ring::new(&nodes(&ids), DEFAULT_VNODES));
        let h = hash_key(b"user-1");
        let order: Vec<usize> = table.walk(h).collect();
        let mut sim = Sim::new(vec![100; 4]);
        sim.load[order[0]] = 10; // T = 10: capacity ⌈1.25 · 11 / 4⌉ = 4
        let choice = pick_keyed(&table, h, &sim, Some(0.25)).expect("member");
        assert_eq!(
            choice,
            Choice {
                member: order[1],
                rank: 1,
                spilled: true
            }
        );
        // Without a bound the owner keeps it.
        assert_eq!(
            pick_keyed(&table, h, &sim, None).expect("m").member,
            order[0]
        );
    }

    #[test]
    fn unavailable_owner_is_skipped_without_counting_a_spill() {
        let ids = ids(4);
        let table = Table::Maglev(Maglev::new(&nodes(&ids), 1_009));
        let h = hash_key(b"user-2");
        let order: Vec<usize> = table.walk(h).collect();
        let mut sim = Sim::new(vec![100; 4]);
        sim.down[order[0]] = true;
        let choice = pick_keyed(&table, h, &sim, Some(0.25)).expect("member");
        assert_eq!(
            choice,
            Choice {
                member: order[1],
                rank: 1,
                spilled: false
            }
        );
        sim.down = vec![true; 4];
        assert_eq!(pick_keyed(&table, h, &sim, Some(0.25)), None);
    }

    #[test]
    fn p2c_prefers_the_less_loaded_per_weight_and_skips_unavailable() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut sim = Sim::new(vec![100, 100]);
        sim.load = vec![5, 1];
        for _ in 0..20 {
            assert_eq!(pick_p2c(&sim, &mut rng), Some(1));
        }
        sim.weight = vec![1000, 100]; // 5/1000 < 1/100
        assert_eq!(pick_p2c(&sim, &mut rng), Some(0));
        sim.down[0] = true;
        assert_eq!(pick_p2c(&sim, &mut rng), Some(1));
        sim.down[1] = true;
        assert_eq!(pick_p2c(&sim, &mut rng), None);
        assert_eq!(pick_p2c(&Sim::new(vec![]), &mut rng), None);
    }

    #[test]
    fn p2c_spreads_keyless_requests_evenly() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut sim = Sim::new(vec![100; 8]);
        let mut live = Vec::new();
        let mut worst: f64 = 0.0;
        for step in 0..40_000 {
            if live.len() == 400 {
                let gone: usize = live.swap_remove(rng.random_range(0..live.len()));
                sim.load[gone] -= 1;
            }
            let m = pick_p2c(&sim, &mut rng).expect("member");
            sim.load[m] += 1;
            live.push(m);
            if step > 400 {
                let peak = *sim.load.iter().max().expect("n") as f64;
                worst = worst.max(peak / 50.0);
            }
        }
        assert!(worst < 1.25, "peak/mean {worst}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Zipf-distributed keys with bounded loads: peak/mean stays within 1 + ε (plus the
        /// rounding of one request: ⌈(1+ε)·mean⌉/mean), on either table.
        #[test]
        fn zipf_keys_with_bounded_loads_stay_within_one_plus_epsilon(
            n in 3usize..24,
            eps_percent in 10u32..100,
            maglev in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let epsilon = f64::from(eps_percent) / 100.0;
            let ids = ids(n);
            let table = if maglev {
                Table::Maglev(Maglev::new(&nodes(&ids), 5_003))
            } else {
                Table::Ring(Ring::new(&nodes(&ids), DEFAULT_VNODES))
            };
            let in_flight = 40 * n;
            let mut sim = Sim::new(vec![100; n]);
            let worst = simulate(&table, &mut sim, Some(epsilon), in_flight, seed);
            let mean = in_flight as f64 / n as f64;
            // ⌈(1 + ε)·mean⌉ / mean, with the ceiling taken exactly.
            let allowed = capacity(epsilon, in_flight as u64 - 1, 1, n as u64) as f64 / mean;
            prop_assert!(worst <= allowed + 1e-9, "peak/mean {worst} > {allowed} (ε = {epsilon})");
        }

        /// The same with unequal weights: each member's load stays within its weighted bound.
        #[test]
        fn weighted_bounded_loads_respect_each_members_share(
            weights in proptest::collection::vec(50u32..400, 3..12),
            seed in any::<u64>(),
        ) {
            let ids = ids(weights.len());
            let nodes: Vec<Node<'_>> = ids.iter().zip(&weights)
                .map(|(id, &w)| Node { id: id.as_str(), weight: w }).collect();
            let table = Table::Ring(Ring::new(&nodes, DEFAULT_VNODES));
            let mut sim = Sim::new(weights.iter().map(|&w| u64::from(w)).collect());
            // `simulate` asserts the weighted bound after every placement.
            simulate(&table, &mut sim, Some(0.25), 60 * weights.len(), seed);
        }
    }
}
