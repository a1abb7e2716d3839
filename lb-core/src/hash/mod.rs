//! The pure core of the gateway: where a key goes.
//!
//! Nothing here does I/O, reads a clock or keeps live state; every function takes what it
//! needs (the members, their weights, their current loads) and answers. The proxy feeds it
//! live numbers (see `pool`), and the property tests feed it simulated ones.
//!
//! - [`ring`]: a ketama-like ring with virtual nodes, as many per member as its weight asks.
//! - [`maglev`]: Google's Maglev lookup table (Eisenbud et al., NSDI 2016), weighted the way
//!   Envoy weights it.
//! - [`select`]: the choice among a key's candidates: consistent hashing with bounded loads
//!   (Mirrokni, Thorup, Zadimoghaddam 2016) for keyed requests, power-of-two-choices on
//!   in-flight requests for keyless ones.
//!
//! # Identities and hashes
//! A member is hashed by its identity string, which the gateway sets to `address:port` (as
//! nginx and HAProxy do), so an instance that restarts on the same address keeps its keys, and
//! every gateway replica computes the same table from the same registry view. Keys and
//! identities are hashed with XXH3 (64 bits), which is stable across platforms and releases.
//!
//! Both tables walk, for a key, through *every* member in a fixed order of preference: the
//! first is the key's owner; the rest are where it spills (bounded loads) or retries go. The
//! order depends only on the key and the member set.

pub mod maglev;
pub mod ring;
pub mod select;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// A member as the tables see it: an identity to hash and a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node<'a> {
    /// Stable identity (`address:port` in the gateway).
    pub id: &'a str,
    /// Relative weight; 0 is treated as 1 by the tables (the pool leaves weight-0 members out).
    pub weight: u32,
}

/// The hash of a request's key.
pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The hash of `id` under `seed` (independent hashes of one identity).
pub(crate) fn hash_seeded(id: &str, seed: u64) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), seed)
}

/// Which table a route uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// [`ring::Ring`]: O(log points) lookup, cheap to build, balance depends on vnodes.
    #[default]
    Ring,
    /// [`maglev::Maglev`]: O(1) lookup, near-perfect balance, a table of `table_size` entries.
    Maglev,
}

/// A built table of either kind.
#[derive(Debug, Clone)]
pub enum Table {
    /// A ring.
    Ring(ring::Ring),
    /// A Maglev table.
    Maglev(maglev::Maglev),
}

impl Table {
    /// Builds the table of `algorithm` over `nodes` (`vnodes`: ring points per 100 of
    /// weight; `table_size`: Maglev's prime table size).
    pub fn build(
        algorithm: Algorithm,
        nodes: &[Node<'_>],
        vnodes: u32,
        table_size: usize,
    ) -> Table {
        match algorithm {
            Algorithm::Ring => Table::Ring(ring::Ring::new(nodes, vnodes)),
            Algorithm::Maglev => Table::Maglev(maglev::Maglev::new(nodes, table_size)),
        }
    }

    /// The owner of `hash`, if there is any member.
    pub fn first(&self, hash: u64) -> Option<usize> {
        match self {
            Table::Ring(r) => r.first(hash),
            Table::Maglev(m) => m.first(hash),
        }
    }

    /// Every member once, in `hash`'s order of preference.
    pub fn walk(&self, hash: u64) -> Walk<'_> {
        match self {
            Table::Ring(r) => Walk::Ring(r.walk(hash)),
            Table::Maglev(m) => Walk::Maglev(m.walk(hash)),
        }
    }

    /// How many members the table was built over.
    pub fn len(&self) -> usize {
        match self {
            Table::Ring(r) => r.len(),
            Table::Maglev(m) => m.len(),
        }
    }

    /// Whether the table has no member.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The share of the key space each member owns (sums to 1 unless empty).
    pub fn shares(&self) -> Vec<f64> {
        match self {
            Table::Ring(r) => r.shares(),
            Table::Maglev(m) => m.shares(),
        }
    }

    /// The owner of each of `samples` evenly spaced points of the hash space, to compare two
    /// tables (see [`moved_fraction`]).
    pub fn owners_sampled(&self, samples: usize) -> Vec<Option<usize>> {
        let step = u64::MAX / samples.max(1) as u64;
        (0..samples as u64)
            .map(|i| self.first(i.wrapping_mul(step)))
            .collect()
    }
}

/// A [`Table::walk`] iterator.
#[derive(Debug)]
pub enum Walk<'a> {
    /// Walking a ring.
    Ring(ring::RingWalk<'a>),
    /// Walking a Maglev table.
    Maglev(maglev::MaglevWalk<'a>),
}

impl Iterator for Walk<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            Walk::Ring(w) => w.next(),
            Walk::Maglev(w) => w.next(),
        }
    }
}

/// The fraction of sampled keys whose owner's identity differs between two tables.
/// `before_ids[i]` / `after_ids[i]` are the identities of member `i` of each table.
pub fn moved_fraction(
    before: &[Option<usize>],
    before_ids: &[&str],
    after: &[Option<usize>],
    after_ids: &[&str],
) -> f64 {
    if before.is_empty() || before.len() != after.len() {
        return 0.0;
    }
    let moved = before
        .iter()
        .zip(after)
        .filter(|(b, a)| b.and_then(|i| before_ids.get(i)) != a.and_then(|i| after_ids.get(i)))
        .count();
    moved as f64 / before.len() as f64
}

/// A set of member indices, for walks that must visit each member once.
#[derive(Debug, Clone)]
pub(crate) struct Visited {
    words: Vec<u64>,
    count: usize,
}

impl Visited {
    pub(crate) fn new(n: usize) -> Visited {
        Visited {
            words: vec![0; n.div_ceil(64)],
            count: 0,
        }
    }

    /// Marks `i`; true if it was not marked before.
    pub(crate) fn insert(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        if self.words[w] & b != 0 {
            return false;
        }
        self.words[w] |= b;
        self.count += 1;
        true
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the property tests of the tables.

    use super::Node;

    /// `n` member identities like the gateway's (`10.0.x.y:8080`).
    pub fn ids(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 256, i % 256))
            .collect()
    }

    /// Nodes of equal weight over `ids`.
    pub fn nodes(ids: &[String]) -> Vec<Node<'_>> {
        ids.iter()
            .map(|id| Node {
                id: id.as_str(),
                weight: 100,
            })
            .collect()
    }

    /// The owner of `keys` uniform keys, counted per member.
    pub fn counts(table: &super::Table, keys: u64) -> Vec<u64> {
        let mut counts = vec![0u64; table.len()];
        for k in 0..keys {
            let owner = table
                .first(super::hash_key(&k.to_le_bytes()))
                .expect("non-empty");
            counts[owner] += 1;
        }
        counts
    }

    /// max / mean of `counts`.
    pub fn peak_to_mean(counts: &[u64]) -> f64 {
        let total: u64 = counts.iter().sum();
        let mean = total as f64 / counts.len() as f64;
        *counts.iter().max().expect("non-empty") as f64 / mean
    }
}
