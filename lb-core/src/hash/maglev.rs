//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016).
//!
//! Each member has a permutation of the `M` table slots (`M` prime): it starts at
//! `offset = h₀(id) mod M` and steps by `skip = h₁(id) mod (M − 1) + 1`. Members take turns
//! claiming the next free slot of their permutation until the table is full. A key is looked up
//! in O(1): `table[hash mod M]`.
//!
//! Weights follow Envoy's scheme: in round `r`, a member takes a turn only while
//! `r × weight ≥ turns taken × max weight`, so it claims slots in proportion to its weight.
//!
//! Each member owns close to `M/n` slots (the imbalance is at most a few slots), and a change of
//! membership moves slightly more than the `1/n` minimum (the paper measures a few percent
//! more), since the filling order shifts. The fallback walk for a key goes forward through
//! the table from the key's slot, yielding each member at its first appearance.

use super::{Node, Visited, hash_seeded};

/// Table size unless configured otherwise: Envoy's default, a prime.
pub const DEFAULT_TABLE_SIZE: usize = 65_537;

/// Slot not yet claimed while building.
const EMPTY: u32 = u32::MAX;

/// A built Maglev table.
#[derive(Debug, Clone, Default)]
pub struct Maglev {
    /// Member index per slot.
    table: Vec<u32>,
    /// Number of members.
    members: usize,
}

/// Whether `n` is prime (trial division; sizes are at most a few million).
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

impl Maglev {
    /// Builds the table over `nodes`. `size` must be a prime larger than the number of nodes
    /// (the routes file checks this; a non-prime size still gives a valid but less even
    /// table).
    pub fn new(nodes: &[Node<'_>], size: usize) -> Maglev {
        let n = nodes.len();
        if n == 0 || size == 0 {
            return Maglev {
                table: Vec::new(),
                members: n,
            };
        }
        let m = size as u64;
        let perms: Vec<(u64, u64)> = nodes
            .iter()
            .map(|node| {
                let offset = hash_seeded(node.id, 0xa5a5) % m;
                let skip = if m > 1 {
                    hash_seeded(node.id, 0x5a5a) % (m - 1) + 1
                } else {
                    1
                };
                (offset, skip)
            })
            .collect();
        let weights: Vec<u64> = nodes.iter().map(|n| u64::from(n.weight.max(1))).collect();
        let max_weight = weights.iter().copied().max().unwrap_or(1);
        let mut next = vec![0u64; n];
        let mut target = vec![0u64; n];
        let mut table = vec![EMPTY; size];
        let mut filled = 0usize;
        let mut round = 0u64;
        while filled < size {
            for i in 0..n {
                if round * weights[i] < target[i] {
                    continue;
                }
                target[i] += max_weight;
                let (offset, skip) = perms[i];
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if table[slot] == EMPTY {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == size {
                    break;
                }
            }
            round += 1;
        }
        Maglev { table, members: n }
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members
    }

    /// Whether there is no member.
    pub fn is_empty(&self) -> bool {
        self.members == 0
    }

    /// The table: member index per slot.
    pub fn slots(&self) -> &[u32] {
        &self.table
    }

    /// The owner of `hash`.
    pub fn first(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }

    /// Every member once: forward through the table from `hash`'s slot.
    pub fn walk(&self, hash: u64) -> MaglevWalk<'_> {
        let start = if self.table.is_empty() {
            0
        } else {
            (hash % self.table.len() as u64) as usize
        };
        MaglevWalk {
            maglev: self,
            start,
            step: 0,
            visited: Visited::new(self.members),
        }
    }

    /// The share of the slots each member owns.
    pub fn shares(&self) -> Vec<f64> {
        let mut shares = vec![0.0; self.members];
        for &m in &self.table {
            shares[m as usize] += 1.0;
        }
        let total = self.table.len().max(1) as f64;
        shares.iter_mut().for_each(|s| *s /= total);
        shares
    }
}

/// Iterator of [`Maglev::walk`].
#[derive(Debug)]
pub struct MaglevWalk<'a> {
    maglev: &'a Maglev,
    start: usize,
    step: usize,
    visited: Visited,
}

impl Iterator for MaglevWalk<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let m = self.maglev.table.len();
        while self.step < m && self.visited.count() < self.maglev.members {
            let member = self.maglev.table[(self.start + self.step) % m] as usize;
            self.step += 1;
            if self.visited.insert(member) {
                return Some(member);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::testing::{counts, ids, nodes, peak_to_mean};
    use crate::hash::{Table, hash_key};
    use proptest::prelude::*;

    /// A smaller prime than the default keeps the property tests quick.
    const M: usize = 5_003;

    #[test]
    fn primes() {
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(M));
        assert!(!is_prime(65_536));
        assert!(!is_prime(1));
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let ids = ids(10);
        let maglev = Maglev::new(&nodes(&ids), M);
        assert!(maglev.slots().iter().all(|&s| (s as usize) < 10));
        for share in maglev.shares() {
            assert!((share - 0.1).abs() < 0.002, "{share}");
        }
    }

    #[test]
    fn weights_scale_the_owned_share() {
        let ids = ids(3);
        let mut ns = nodes(&ids);
        ns[0].weight = 200;
        let shares = Maglev::new(&ns, M).shares();
        assert!((shares[0] - 0.5).abs() < 0.01, "{shares:?}");
        assert!((shares[1] - 0.25).abs() < 0.01, "{shares:?}");
    }

    #[test]
    fn walk_visits_every_member_once_starting_with_the_owner() {
        let ids = ids(6);
        let maglev = Maglev::new(&nodes(&ids), M);
        for k in 0..100u64 {
            let h = hash_key(&k.to_le_bytes());
            let walk: Vec<usize> = maglev.walk(h).collect();
            assert_eq!(walk[0], maglev.first(h).expect("owner"));
            let mut sorted = walk;
            sorted.sort_unstable();
            assert_eq!(sorted, (0..6).collect::<Vec<_>>());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// Uniform keys: Maglev is nearly perfectly balanced.
        #[test]
        fn uniform_keys_are_balanced(n in 2usize..50) {
            let ids = ids(n);
            let table = Table::Maglev(Maglev::new(&nodes(&ids), M));
            let ratio = peak_to_mean(&counts(&table, 20_000 * n as u64));
            prop_assert!(ratio < 1.1, "peak/mean {ratio} with {n} members");
        }

        /// Removing (or, read backwards, adding) one of n members moves close to 1/n of the
        /// slots, at the table size the gateway uses. (Maglev trades some disruption for
        /// balance, and the trade grows as the table shrinks relative to n: at 5,003 slots and
        /// 46 members it moves up to 2.1× the ideal, at 65,537 at most 1.27× for n < 50.)
        #[test]
        fn one_membership_change_moves_about_one_nth(n in 3usize..50, gone in 0usize..50) {
            let gone = gone % n;
            let all = ids(n);
            let rest: Vec<String> = all.iter().enumerate()
                .filter(|(i, _)| *i != gone).map(|(_, s)| s.clone()).collect();
            let size = DEFAULT_TABLE_SIZE;
            let before = Maglev::new(&nodes(&all), size);
            let after = Maglev::new(&nodes(&rest), size);
            let moved = before.slots().iter().zip(after.slots())
                .filter(|&(&b, &a)| all[b as usize] != rest[a as usize])
                .count();
            let fraction = moved as f64 / size as f64;
            let ideal = 1.0 / n as f64;
            prop_assert!(fraction >= ideal * 0.95, "moved {fraction}, ideal {ideal}");
            prop_assert!(fraction <= ideal * 1.4, "moved {fraction}, ideal {ideal}");
        }
    }
}
