//! Where the key space lives: an ordered byte map with atomic batches.
//!
//! The MVCC layer keeps everything in one ordered map under short prefixes (see [`super::keys`]),
//! so a whole applied batch — records, lease changes and the applied index — lands in one atomic
//! write. [`SledBackend`] is the production engine; [`MemBackend`] serves unit tests, which then
//! need neither disk nor cleanup.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;

use parking_lot::RwLock;

use crate::error::Result;

/// A set of writes applied atomically: `Some(value)` puts, `None` deletes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Writes in order.
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    /// Queue a put.
    pub fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.ops.push((k, Some(v)));
    }
    /// Queue a delete.
    pub fn delete(&mut self, k: Vec<u8>) {
        self.ops.push((k, None));
    }
    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// An ordered byte map with atomic batches.
pub trait Backend: Send + Sync + 'static {
    /// Read one key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Apply every write of the batch, all or nothing.
    fn apply(&self, batch: Batch) -> Result<()>;
    /// Visit entries with keys in `[from, to)` in order until `f` returns false.
    fn scan(&self, from: &[u8], to: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<()>;
    /// Bytes used on disk (0 for memory).
    fn size_on_disk(&self) -> u64;
    /// Make everything applied so far durable.
    fn flush(&self) -> Result<()>;
}

/// In-memory backend for tests.
#[derive(Default)]
pub struct MemBackend {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Backend for MemBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.map.read().get(key).cloned())
    }
    fn apply(&self, batch: Batch) -> Result<()> {
        let mut m = self.map.write();
        for (k, v) in batch.ops {
            match v {
                Some(v) => {
                    m.insert(k, v);
                }
                None => {
                    m.remove(&k);
                }
            }
        }
        Ok(())
    }
    fn scan(&self, from: &[u8], to: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<()> {
        let m = self.map.read();
        for (k, v) in m.range::<[u8], _>((Bound::Included(from), Bound::Excluded(to))) {
            if !f(k, v) {
                break;
            }
        }
        Ok(())
    }
    fn size_on_disk(&self) -> u64 {
        0
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// The sled engine.
///
/// sled 0.34's own `flush` ends in `sync_file_range`, which survives `kill -9` but not a power
/// loss. [`SledBackend::flush`] therefore also `fsync`s sled's files itself. The coordinator never
/// relies on sled alone for an acknowledged write anyway: the write-ahead log holds every command
/// until a flush of this backend has made it redundant.
pub struct SledBackend {
    db: sled::Db,
    tree: sled::Tree,
    dir: std::path::PathBuf,
}

impl SledBackend {
    /// Open (or create) the database in `dir`.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledBackend> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(Some(1000))
            .open()?;
        let tree = db.open_tree("kv")?;
        Ok(SledBackend {
            db,
            tree,
            dir: dir.to_path_buf(),
        })
    }

    fn fsync_files(&self) -> Result<()> {
        fn sync_dir(p: &Path) -> std::io::Result<()> {
            for entry in std::fs::read_dir(p)? {
                let entry = entry?;
                let ft = entry.file_type()?;
                if ft.is_dir() {
                    sync_dir(&entry.path())?;
                } else if ft.is_file() {
                    std::fs::File::open(entry.path())?.sync_all()?;
                }
            }
            std::fs::File::open(p)?.sync_all()
        }
        sync_dir(&self.dir)?;
        Ok(())
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }
    fn apply(&self, batch: Batch) -> Result<()> {
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.tree.apply_batch(b)?;
        Ok(())
    }
    fn scan(&self, from: &[u8], to: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<()> {
        for item in self.tree.range(from..to) {
            let (k, v) = item?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }
    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        self.fsync_files()
    }
}
