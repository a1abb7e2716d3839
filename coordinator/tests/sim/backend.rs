//! The key space's storage engine in the simulation: what sled's write-back does, in memory.
//!
//! Production applies each batch to an in-memory overlay at once and writes the overlay to sled
//! later (every few milliseconds, or on `flush`), atomically. So after a crash the key space is
//! at some *batch boundary* at or behind what was applied, never ahead and never torn, and
//! everything applied before the last `flush` is there. [`SimBackend`] keeps the same promise:
//! reads see every applied batch; a [`KvDisk`] (which outlives the simulated process) receives
//! the batches applied so far at random batch boundaries (a seeded draw per batch) and on
//! `flush`. The log replays the rest on restart, as in production.

use std::collections::BTreeMap;
use std::sync::Arc;

use coordinator::error::Result;
use coordinator::mvcc::{Backend, Batch, MemBackend};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type Ops = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// The durable key space of one simulated member.
#[derive(Clone)]
pub struct KvDisk {
    inner: Arc<Mutex<KvDiskInner>>,
}

struct KvDiskInner {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    rng: StdRng,
    /// Chance that a write-back happens right after a batch.
    write_back: f64,
}

impl KvDisk {
    /// An empty disk; write-backs drawn from `seed`.
    pub fn new(seed: u64, write_back: f64) -> KvDisk {
        KvDisk {
            inner: Arc::new(Mutex::new(KvDiskInner {
                map: BTreeMap::new(),
                rng: StdRng::seed_from_u64(seed),
                write_back,
            })),
        }
    }

    fn write(&self, pending: &mut Vec<Ops>) {
        let mut d = self.inner.lock();
        for ops in pending.drain(..) {
            for (k, v) in ops {
                match v {
                    Some(v) => {
                        d.map.insert(k, v);
                    }
                    None => {
                        d.map.remove(&k);
                    }
                }
            }
        }
    }
}

/// A member's backend for one simulated process lifetime.
pub struct SimBackend {
    live: MemBackend,
    pending: Mutex<Vec<Ops>>,
    disk: KvDisk,
}

impl SimBackend {
    /// Start from what `disk` holds (after a crash: the last write-back).
    pub fn open(disk: &KvDisk) -> Result<SimBackend> {
        let live = MemBackend::default();
        let mut b = Batch::default();
        for (k, v) in disk.inner.lock().map.iter() {
            b.put(k.clone(), v.clone());
        }
        live.apply(b)?;
        Ok(SimBackend {
            live,
            pending: Mutex::new(Vec::new()),
            disk: disk.clone(),
        })
    }
}

impl Backend for SimBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.live.get(key)
    }

    fn apply(&self, batch: Batch) -> Result<()> {
        let ops = batch.ops.clone();
        self.live.apply(batch)?;
        let mut pending = self.pending.lock();
        pending.push(ops);
        let write_back = {
            let mut d = self.disk.inner.lock();
            let p = d.write_back;
            d.rng.random_bool(p)
        };
        if write_back {
            self.disk.write(&mut pending);
        }
        Ok(())
    }

    fn scan(&self, from: &[u8], to: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<()> {
        self.live.scan(from, to, f)
    }

    fn scan_at(
        &self,
        from: &[u8],
        to: &[u8],
        captured: &mut dyn FnMut(),
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.live.scan_at(from, to, captured, f)
    }

    fn size_on_disk(&self) -> u64 {
        0
    }

    fn flush(&self) -> Result<()> {
        self.disk.write(&mut self.pending.lock());
        Ok(())
    }
}
