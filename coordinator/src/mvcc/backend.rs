//! Where the key space lives: an ordered byte map with atomic batches.
//!
//! The MVCC layer keeps everything in one ordered map under short prefixes (see [`super::keys`]),
//! so a whole applied batch — records, lease changes and the applied index — lands in one atomic
//! write. [`SledBackend`] is the production engine; [`MemBackend`] serves unit tests, which then
//! need neither disk nor cleanup.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::Result;

use super::packed::{self, BucketKey, Slot};

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
    /// Visit entries with keys in `[from, to)` as they are at one moment, without holding
    /// writers off while the visit runs: `captured` runs once, as soon as that moment is fixed
    /// and before the first entry is visited, and writes applied after it (say, by a caller
    /// that held its own lock until `captured` released it) are not visited. This is how a
    /// snapshot of the whole key space is taken while the member goes on applying.
    fn scan_at(
        &self,
        from: &[u8],
        to: &[u8],
        captured: &mut dyn FnMut(),
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()>;
    /// Bytes used on disk (0 for memory).
    fn size_on_disk(&self) -> u64;
    /// Make everything applied so far durable.
    fn flush(&self) -> Result<()>;
    /// Rewrite the stored entries compactly and give the space of deleted ones back to the
    /// file system (etcd's defragmentation). Reads and writes go on meanwhile, except for a
    /// brief wait while the rewritten copy is swapped in. Memory has nothing to give back.
    fn defragment(&self) -> Result<Defragmented> {
        Ok(Defragmented::default())
    }
}

/// What a [`Backend::defragment`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Defragmented {
    /// Bytes on disk before.
    pub before: u64,
    /// Bytes on disk after.
    pub after: u64,
    /// Entries copied.
    pub entries: u64,
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
    fn scan_at(
        &self,
        from: &[u8],
        to: &[u8],
        captured: &mut dyn FnMut(),
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        // Tests only: a copy of the range is the fixed moment.
        let copy: Vec<(Vec<u8>, Vec<u8>)> = {
            let m = self.map.read();
            m.range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        captured();
        for (k, v) in &copy {
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

/// The sled engine, written back from memory, rewritten compactly on demand.
///
/// Each `apply` lands in an in-memory overlay at once (readers see it immediately); a flusher
/// thread moves the overlay into sled as one atomic sled batch every [`WRITE_BACK_EVERY`]. sled
/// seals and writes (with `sync_file_range`, waiting for the disk) an I/O buffer twice for every
/// batch it is given, on a thread pool that wakes all its idle threads for each job. At one batch
/// per applied group that cost more disk waits than the write-ahead log's own fsync; at one batch
/// per 10 ms it still cost a three-member cluster 26–40 µs of CPU per put under 64 clients
/// (sled's I/O threads and this flusher); at one per 100 ms, 13–15 µs (fewer batches, and
/// records of a revision bucket or key written twice in a window reach sled once). The overlay
/// then holds about the last 100 ms of applied writes (more while a defragmentation copies),
/// which reads merge over sled as before (an ordered map lookup). Nothing is lost by waiting:
/// every applied command is in the fsynced log until a [`Backend::flush`] of this backend —
/// which writes the overlay, flushes sled and `fsync`s its files itself (sled 0.34's own flush
/// ends in `sync_file_range`, which does not survive a power loss) — has made it redundant.
///
/// # Packed revision records
///
/// Callers see the logical key space of [`super::keys`]; in sled, small revision records
/// share an entry per 16 main revisions ([`super::packed`]): the write-back merges them into
/// their buckets, reads and scans unpack them. That takes most of sled's per-record cost (a tree
/// descent, a leaf copy and a log fragment per record) off every member.
///
/// # Defragmentation
///
/// sled never gives back the space of deleted and compacted records (its files only grow, as
/// etcd's bolt file does). [`Backend::defragment`] does what etcd does to its bolt file: it
/// writes the live entries into a fresh sled database beside the current one and swaps it in.
///
/// 1. *Freeze*: the overlay is written back once more, then the write-back stops (writes keep
///    landing in the overlay, reads merge it over sled as always), so the sled tree no longer
///    changes; it is flushed once.
/// 2. *Copy*, while the member serves: every entry of the frozen tree goes, in chunks, into a
///    new database in `<dir>.defrag`, which is then flushed, its files and directory fsynced,
///    and closed.
/// 3. *Swap*, under this backend's lock (reads and writes wait, briefly): the old database is
///    closed, the marker file `<dir>.defrag-done` is written and fsynced (the copy is whole),
///    `<dir>` is renamed to `<dir>.replaced` and `<dir>.defrag` to `<dir>`, the parent
///    directory fsynced, the marker removed; the new database is opened at `<dir>` and takes
///    over the overlay (the writes made during the copy). Then `<dir>.replaced` is deleted.
///
/// Crash safety: [`SledBackend::open`] first finishes or undoes an interrupted swap
/// ([`recover_interrupted_defrag`]): with the marker present the copy is complete and the swap
/// is rolled forward; without it `<dir>` still holds the old database and a leftover
/// `<dir>.defrag` is deleted. Either way one whole database opens, old or new, never a mix, and
/// the log replays whatever it did not hold yet (the copy holds the tree as of the freeze,
/// which is at least as new as the last flush the log was purged behind).
pub struct SledBackend {
    shared: Arc<SledShared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

/// sled 0.34 guards every tree with one *process-wide* reader-writer lock: `apply_batch` takes
/// it for writing, `flush` holds it for reading while it waits for sled's I/O threads, which
/// need it for reading too. A batch queued behind a flush then deadlocks all three (seen in
/// tests, where several stores share a process; possible with one). So every batch and every
/// flush goes through this one mutex, and sled's own periodic flusher is off: we flush.
static SLED_WRITES: Mutex<()> = Mutex::new(());

/// How often the overlay is written to sled.
pub const WRITE_BACK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// How many bytes of entries a defragmentation copies per sled batch.
const DEFRAG_CHUNK_BYTES: usize = 4 << 20;

type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// What the backend handle, the flusher thread and a defragmentation share.
struct SledShared {
    /// The sled directory.
    dir: PathBuf,
    cache_bytes: u64,
    /// The open database: `None` only while a defragmentation swaps it (under the write lock)
    /// or after the drop began, or if reopening failed.
    slot: RwLock<Option<SledInner>>,
    /// Held by a defragmentation from start to end and by every explicit flush, so that a
    /// flush never writes to a database that is being replaced (it waits, then flushes the new
    /// one).
    maintenance: Mutex<()>,
    stop: (Mutex<bool>, Condvar),
}

struct SledInner {
    db: sled::Db,
    tree: sled::Tree,
    /// Writes not yet handed to sled.
    overlay: Mutex<Overlay>,
    /// Writes being handed to sled right now (still read from here until sled has them).
    flushing: RwLock<Arc<Overlay>>,
    /// Serialises writers of sled (the flusher and explicit flushes).
    write_lock: Mutex<()>,
    error: Mutex<Option<String>>,
    /// Nothing was written since the last explicit flush.
    clean: AtomicBool,
    /// A defragmentation is copying this database: nothing may be written to it any more.
    frozen: AtomicBool,
}

fn open_db(dir: &Path, cache_bytes: u64) -> Result<(sled::Db, sled::Tree)> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()?;
    let tree = db.open_tree("kv")?;
    Ok((db, tree))
}

impl SledInner {
    fn new(db: sled::Db, tree: sled::Tree, overlay: Overlay) -> SledInner {
        let clean = overlay.is_empty();
        SledInner {
            db,
            tree,
            overlay: Mutex::new(overlay),
            flushing: RwLock::new(Arc::new(BTreeMap::new())),
            write_lock: Mutex::new(()),
            error: Mutex::new(None),
            clean: AtomicBool::new(clean),
            frozen: AtomicBool::new(false),
        }
    }

    /// Move the overlay into sled as one batch. Returns how many writes moved.
    fn write_back(&self) -> Result<usize> {
        let _w = self.write_lock.lock();
        if self.frozen.load(Ordering::Acquire) {
            // Being copied by a defragmentation: the overlay waits for the new database.
            return Ok(0);
        }
        // Take the overlay and publish it as `flushing` in one step under the overlay lock, so
        // a reader (which also looks at both under that lock) never misses these writes.
        let taken = {
            let mut o = self.overlay.lock();
            if o.is_empty() {
                return Ok(0);
            }
            let taken = Arc::new(std::mem::take(&mut *o));
            *self.flushing.write() = taken.clone();
            taken
        };
        let n = taken.len();
        let r = sled_batch(&self.tree, &taken).and_then(|b| {
            let _g = SLED_WRITES.lock();
            self.tree.apply_batch(b).map_err(Into::into)
        });
        let mut o = self.overlay.lock();
        if let Err(e) = &r {
            // Keep the writes readable and retry on the next round (newer overlay writes win).
            for (k, v) in taken.iter() {
                o.entry(k.clone()).or_insert_with(|| v.clone());
            }
            *self.error.lock() = Some(e.to_string());
        }
        *self.flushing.write() = Arc::new(BTreeMap::new());
        drop(o);
        r?;
        Ok(n)
    }

    /// Release sled's `Db` (its files and lock), which must have nothing left to write.
    fn close_flushed(self) {
        let _g = SLED_WRITES.lock();
        drop(self);
    }
}

/// The error of an operation on a backend whose database is gone (reopening it after a
/// defragmentation failed; the member must be restarted).
fn unavailable() -> crate::error::Error {
    std::io::Error::other("the key space is unavailable: reopening sled after a defragmentation failed; restart the member").into()
}

impl SledBackend {
    /// Open (or create) the database in `dir`, after finishing or undoing a defragmentation
    /// that a crash interrupted (see [`recover_interrupted_defrag`]).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledBackend> {
        if let Some(what) = recover_interrupted_defrag(dir)? {
            tracing::warn!(dir = %dir.display(), "{what}");
        }
        let (db, tree) = open_db(dir, cache_bytes)?;
        let shared = Arc::new(SledShared {
            dir: dir.to_path_buf(),
            cache_bytes,
            slot: RwLock::new(Some(SledInner::new(db, tree, BTreeMap::new()))),
            maintenance: Mutex::new(()),
            stop: (Mutex::new(false), Condvar::new()),
        });
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("sled-writeback".into())
                .spawn(move || {
                    let (lock, cv) = &shared.stop;
                    loop {
                        {
                            let mut stopped = lock.lock();
                            if *stopped {
                                return;
                            }
                            cv.wait_for(&mut stopped, WRITE_BACK_EVERY);
                            if *stopped {
                                return;
                            }
                        }
                        let slot = shared.slot.read();
                        if let Some(inner) = slot.as_ref()
                            && let Err(e) = inner.write_back()
                        {
                            tracing::error!(error = %e, "writing the key space to sled failed");
                        }
                    }
                })?
        };
        Ok(SledBackend {
            shared,
            flusher: Some(flusher),
        })
    }

    /// Runs `f` on the open database.
    fn with<T>(&self, f: impl FnOnce(&SledInner) -> Result<T>) -> Result<T> {
        let slot = self.shared.slot.read();
        match slot.as_ref() {
            Some(inner) => f(inner),
            None => Err(unavailable()),
        }
    }

    /// Freeze, copy, swap: see the type's docs.
    fn defragment_now(&self) -> Result<Defragmented> {
        let _m = self.shared.maintenance.lock();
        let started = std::time::Instant::now();
        let dir = &self.shared.dir;
        let paths = DefragPaths::of(dir)?;
        // Leftovers of an earlier attempt that failed without a crash.
        remove_dir_if_exists(&paths.copy)?;
        remove_dir_if_exists(&paths.replaced)?;
        // What the overlay holds goes into the tree first: the copy then leaves out what was
        // deleted or compacted until now, not only until the last write-back (up to
        // WRITE_BACK_EVERY ago; right after a compaction, that can be all of it).
        self.with(|inner| inner.write_back().map(drop))?;
        let before = dir_bytes(dir)?;

        // 1 + 2: freeze the current tree, copy it into a fresh database.
        let entries = {
            let slot = self.shared.slot.read();
            let inner = slot.as_ref().ok_or_else(unavailable)?;
            {
                let _w = inner.write_lock.lock();
                inner.frozen.store(true, Ordering::Release);
            }
            let copied = {
                let _g = SLED_WRITES.lock();
                inner.db.flush().map_err(crate::error::Error::from)
            }
            .and_then(|_| copy_tree(&inner.tree, &paths.copy, self.shared.cache_bytes));
            match copied {
                Ok(n) => n,
                Err(e) => {
                    // Writing resumes into the old database; the partial copy goes.
                    inner.frozen.store(false, Ordering::Release);
                    let _ = remove_dir_if_exists(&paths.copy);
                    return Err(e);
                }
            }
        };

        // 3: swap, with readers and writers waiting.
        {
            let mut slot = self.shared.slot.write();
            let old = slot.take().ok_or_else(unavailable)?;
            let mut overlay = std::mem::take(&mut *old.overlay.lock());
            // The frozen database had nothing written since its flush: closing it writes nothing.
            old.close_flushed();
            let swapped = swap_in(dir, &paths);
            if let Err(e) = &swapped {
                tracing::error!(error = %e, "defragmentation: the swap failed; recovering");
                // Roll forward if the marker was written, back otherwise; then reopen whichever
                // database is at `dir`.
                if let Err(e) = recover_interrupted_defrag(dir) {
                    tracing::error!(error = %e, "defragmentation: recovering the swap failed");
                }
            }
            match open_db(dir, self.shared.cache_bytes) {
                Ok((db, tree)) => {
                    *slot = Some(SledInner::new(db, tree, std::mem::take(&mut overlay)));
                }
                Err(e) => {
                    tracing::error!(error = %e, "defragmentation: cannot reopen sled");
                    return Err(e);
                }
            }
            swapped?;
        }
        if let Err(e) = remove_dir_if_exists(&paths.replaced) {
            // Deleted at the next start, or by the next defragmentation.
            tracing::warn!(error = %e, dir = %paths.replaced.display(), "cannot delete the replaced database");
        }
        let after = dir_bytes(dir)?;
        let report = Defragmented {
            before,
            after,
            entries,
        };
        tracing::info!(
            before_bytes = before,
            after_bytes = after,
            entries,
            ms = started.elapsed().as_millis() as u64,
            "defragmented the key space"
        );
        Ok(report)
    }
}

/// Copies every entry of `tree` into a new database at `to`, then flushes, fsyncs and closes
/// it. Returns how many entries it copied.
fn copy_tree(tree: &sled::Tree, to: &Path, cache_bytes: u64) -> Result<u64> {
    let (db, new_tree) = open_db(to, cache_bytes)?;
    let mut count = 0u64;
    let mut from: Vec<u8> = Vec::new();
    loop {
        // A chunk under the sled mutex (an iterator must not see a batch queue up: see
        // SLED_WRITES), written as one batch under it again.
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let mut done = true;
        {
            let _g = SLED_WRITES.lock();
            for item in tree.range(from.as_slice()..) {
                let (k, v) = item?;
                bytes += k.len() + v.len();
                chunk.push((k, v));
                if bytes >= DEFRAG_CHUNK_BYTES {
                    done = false;
                    break;
                }
            }
        }
        if let Some((k, _)) = chunk.last() {
            // The next chunk starts just after this one's last key.
            from = k.to_vec();
            from.push(0);
        }
        count += chunk.len() as u64;
        let mut b = sled::Batch::default();
        for (k, v) in chunk {
            b.insert(k, v);
        }
        {
            let _g = SLED_WRITES.lock();
            new_tree.apply_batch(b)?;
        }
        if done {
            break;
        }
    }
    {
        let _g = SLED_WRITES.lock();
        db.flush()?;
    }
    drop(new_tree);
    {
        // Flushed: closing writes nothing.
        let _g = SLED_WRITES.lock();
        drop(db);
    }
    fsync_tree(to)?;
    Ok(count)
}

/// The names a defragmentation uses beside the sled directory `dir`.
struct DefragPaths {
    /// `<dir>.defrag`: the copy being written.
    copy: PathBuf,
    /// `<dir>.defrag-done`: marker, written once the copy is whole; the swap rolls forward.
    done: PathBuf,
    /// `<dir>.replaced`: the old database, deleted once the swap is done.
    replaced: PathBuf,
    parent: PathBuf,
}

impl DefragPaths {
    fn of(dir: &Path) -> std::io::Result<DefragPaths> {
        let name = dir.file_name().ok_or_else(|| {
            std::io::Error::other(format!("{} has no directory name", dir.display()))
        })?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let beside = |suffix: &str| {
            let mut n = name.to_os_string();
            n.push(suffix);
            parent.join(n)
        };
        Ok(DefragPaths {
            copy: beside(".defrag"),
            done: beside(".defrag-done"),
            replaced: beside(".replaced"),
            parent,
        })
    }
}

/// Puts the finished copy in place of `dir` (the old database closed): marker, two renames,
/// directory fsyncs, marker removed.
fn swap_in(dir: &Path, p: &DefragPaths) -> std::io::Result<()> {
    crash_point("before-marker");
    std::fs::File::create(&p.done)?.sync_all()?;
    sync_dir(&p.parent)?;
    crash_point("after-marker");
    std::fs::rename(dir, &p.replaced)?;
    crash_point("between-renames");
    std::fs::rename(&p.copy, dir)?;
    sync_dir(&p.parent)?;
    crash_point("before-marker-removed");
    std::fs::remove_file(&p.done)?;
    sync_dir(&p.parent)
}

/// The environment variable naming a point of the swap where the process aborts, as a
/// `kill -9` there would stop it (etcd's failpoints, for the crash tests): `before-marker`,
/// `after-marker`, `between-renames` or `before-marker-removed`. Unset in production.
pub const CRASH_POINT_ENV: &str = "COORDINATOR_DEFRAG_CRASH";

fn crash_point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var(CRASH_POINT_ENV).ok())
        .as_deref()
        == Some(name)
    {
        eprintln!("{CRASH_POINT_ENV}={name}: aborting the process here");
        std::process::abort();
    }
}

/// Finishes or undoes a defragmentation of the sled directory `dir` that a crash (or a failed
/// swap) interrupted, so that `dir` holds one whole database: with the marker
/// `<dir>.defrag-done` present the copy `<dir>.defrag` is complete and replaces `dir`;
/// without it a leftover copy is incomplete and is deleted. A leftover `<dir>.replaced` (the
/// old database of a finished swap) is deleted. Returns what it did, if anything.
pub fn recover_interrupted_defrag(dir: &Path) -> std::io::Result<Option<String>> {
    let p = DefragPaths::of(dir)?;
    let mut did = Vec::new();
    if p.done.exists() {
        if p.copy.exists() {
            if dir.exists() {
                // An older leftover would be in the way of the rename.
                remove_dir_if_exists(&p.replaced)?;
                std::fs::rename(dir, &p.replaced)?;
            }
            std::fs::rename(&p.copy, dir)?;
            sync_dir(&p.parent)?;
        }
        std::fs::remove_file(&p.done)?;
        sync_dir(&p.parent)?;
        did.push(format!(
            "finished an interrupted defragmentation: {} is the defragmented copy",
            dir.display()
        ));
    } else if p.copy.exists() {
        remove_dir_if_exists(&p.copy)?;
        did.push(format!(
            "removed the unfinished defragmentation copy {}; {} is unchanged",
            p.copy.display(),
            dir.display()
        ));
    }
    if p.replaced.exists() {
        remove_dir_if_exists(&p.replaced)?;
        did.push(format!(
            "removed {}, the database a defragmentation replaced",
            p.replaced.display()
        ));
    }
    Ok((!did.is_empty()).then(|| did.join("; ")))
}

fn remove_dir_if_exists(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_dir(p: &Path) -> std::io::Result<()> {
    std::fs::File::open(p)?.sync_all()
}

/// `fsync`s every file and directory under `p`, and `p` itself. A file sled deletes meanwhile
/// (an old blob or snapshot) has nothing left to sync.
fn fsync_tree(p: &Path) -> std::io::Result<()> {
    fn gone(r: std::io::Result<()>) -> std::io::Result<()> {
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
    for entry in std::fs::read_dir(p)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            gone(fsync_tree(&entry.path()))?;
        } else if ft.is_file() {
            gone(std::fs::File::open(entry.path()).and_then(|f| f.sync_all()))?;
        }
    }
    sync_dir(p)
}

/// Bytes that the files under `p` occupy on disk (allocated blocks, as `du` counts them).
pub fn dir_bytes(p: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(p)? {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // sled deletes files of its own while we look (blobs, old snapshots).
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            match dir_bytes(&entry.path()) {
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        } else {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

/// Waits (up to 5 s) until nothing in this process holds the lock on sled's database file in
/// `dir` any more. Dropping a sled 0.34 `Db` returns while a task of its I/O thread pool may
/// still hold the file open for a moment (seen as "could not acquire lock" when a test reopened
/// the directory at once); a restart in the same process must not race it.
fn wait_until_released(dir: &Path) {
    let path = dir.join("db");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while let Ok(f) = std::fs::File::open(&path) {
        match f.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            _ => return,
        }
    }
}

impl Drop for SledBackend {
    fn drop(&mut self) {
        {
            let (lock, cv) = &self.shared.stop;
            *lock.lock() = true;
            cv.notify_all();
        }
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
        // Hand the overlay to sled, but do not flush here: a sled flush started from a drop
        // was seen to wait forever (and, holding sled's global lock, to stall every other store
        // in the process). Nothing depends on it: the log holds every applied command, and an
        // orderly stop (`Node::stop`) flushes explicitly before the store is dropped.
        let taken = self.shared.slot.write().take();
        if let Some(inner) = taken {
            if inner.clean.load(Ordering::Acquire) {
                // Flushed by an orderly stop: dropping sled's `Db` has nothing left to write and
                // releases its files and lock (so the data dir can be opened again).
                inner.close_flushed();
                wait_until_released(&self.shared.dir);
            } else {
                // Not stopped in order (a test dropping a server, a panic): dropping sled 0.34's
                // `Db` then flushes, and that flush was seen to wait forever holding sled's
                // process-wide lock, stalling every other store in the process. Leave it to the
                // process exit; the log holds every applied command.
                if let Err(e) = inner.write_back() {
                    tracing::error!(error = %e, "final write of the key space to sled failed");
                }
                std::mem::forget(inner);
            }
        }
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.with(|inner| {
            {
                let o = inner.overlay.lock();
                if let Some(v) = o.get(key) {
                    return Ok(v.clone());
                }
                if let Some(v) = inner.flushing.read().get(key) {
                    return Ok(v.clone());
                }
            }
            sled_get(&inner.tree, key)
        })
    }
    fn apply(&self, batch: Batch) -> Result<()> {
        self.with(|inner| {
            inner.clean.store(false, Ordering::Release);
            let mut o = inner.overlay.lock();
            for (k, v) in batch.ops {
                o.insert(k, v);
            }
            Ok(())
        })
    }
    fn scan(&self, from: &[u8], to: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<()> {
        self.with(|inner| {
            let pending = pending_in(inner, from, to);
            merge_scan(inner, pending, from, to, f)
        })
    }
    /// The moment is fixed by stopping the write-back (so sled's tree no longer changes) and
    /// copying the overlay's writes in range, which are few (at most one write-back interval
    /// of them); the tree is then read with applies going on into the overlay, which grows
    /// meanwhile and is written back once the visit ends. No defragmentation swaps the
    /// database during the visit (the swap waits for the slot's read lock, held throughout);
    /// one that is copying meanwhile has frozen the tree already, which changes nothing here.
    /// The maintenance lock is not taken: a snapshot would then wait out a whole
    /// defragmentation holding applies off.
    fn scan_at(
        &self,
        from: &[u8],
        to: &[u8],
        captured: &mut dyn FnMut(),
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        self.with(|inner| {
            let _w = inner.write_lock.lock();
            let pending = pending_in(inner, from, to);
            captured();
            merge_scan(inner, pending, from, to, f)
        })
    }
    fn size_on_disk(&self) -> u64 {
        // Under the read lock: never in the middle of a swap.
        let _slot = self.shared.slot.read();
        dir_bytes(&self.shared.dir).unwrap_or(0)
    }
    fn flush(&self) -> Result<()> {
        // Waits for a defragmentation in progress, then flushes the database it swapped in.
        let _m = self.shared.maintenance.lock();
        self.with(|inner| {
            inner.write_back()?;
            {
                let _g = SLED_WRITES.lock();
                inner.db.flush()?;
            }
            fsync_tree(&self.shared.dir)?;
            if inner.overlay.lock().is_empty() {
                inner.clean.store(true, Ordering::Release);
            }
            Ok(())
        })
    }
    fn defragment(&self) -> Result<Defragmented> {
        self.defragment_now()
    }
}

/// The writes in `[from, to)` not yet in sled (flushing first, the overlay over it). Both
/// layers are read under the overlay lock, which the write-back also holds while it moves the
/// overlay to `flushing`: the pair is always consistent.
fn pending_in(inner: &SledInner, from: &[u8], to: &[u8]) -> Overlay {
    let mut pending: Overlay = BTreeMap::new();
    let range = (Bound::Included(from), Bound::Excluded(to));
    {
        let o = inner.overlay.lock();
        for (k, v) in inner.flushing.read().range::<[u8], _>(range) {
            pending.insert(k.clone(), v.clone());
        }
        for (k, v) in o.range::<[u8], _>(range) {
            pending.insert(k.clone(), v.clone());
        }
    }
    pending
}

/// Visit sled's entries in `[from, to)` with `pending` merged over them.
fn merge_scan(
    inner: &SledInner,
    pending: Overlay,
    from: &[u8],
    to: &[u8],
    f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
) -> Result<()> {
    let mut pend = pending.into_iter().peekable();
    // A sled iterator takes sled's global read lock again while it runs; with a batch queued
    // for the write lock in between, that second read waits forever. Iterating under the
    // same mutex as batches means no batch can queue meanwhile. (`f` must not call back
    // into this backend; none of our scans do.)
    let _g = SLED_WRITES.lock();
    let mut stored = SledRange::new(&inner.tree, from, to);
    while let Some(entry) = stored.next()? {
        let (k, v) = (entry.key(), entry.value());
        // Emit pending keys that sort before this one.
        while let Some((pk, _)) = pend.peek() {
            if pk.as_slice() >= k {
                break;
            }
            if let Some((pk, Some(pv))) = pend.next()
                && !f(&pk, &pv)
            {
                return Ok(());
            }
        }
        let overridden = match pend.peek() {
            Some((pk, _)) if pk.as_slice() == k => pend.next().map(|(_, v)| v),
            _ => None,
        };
        let keep_going = match overridden {
            Some(Some(pv)) => f(k, &pv),
            Some(None) => true,
            None => f(k, v),
        };
        if !keep_going {
            return Ok(());
        }
    }
    for (pk, pv) in pend {
        if let Some(pv) = pv
            && !f(&pk, &pv)
        {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads one logical key from sled: a revision record from its bucket if it is there, else
/// (a large record, a high sub revision, or a database written before buckets) from its own
/// entry.
fn sled_get(tree: &sled::Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
    if let Some((bucket, slot)) = packed::slot_of(key)
        && let Some(b) = tree.get(bucket)?
        && let Some(record) = packed::find(&b, slot)?
    {
        return Ok(Some(record.to_vec()));
    }
    Ok(tree.get(key)?.map(|v| v.to_vec()))
}

/// A change to one slot of a bucket: the record put there, or `None` to clear it.
type Change<'a> = (Slot, Option<&'a [u8]>);

/// A bucket being unpacked by a scan: its key, its value, and its records' slots and places.
type Unpacking = (
    sled::IVec,
    sled::IVec,
    std::vec::IntoIter<(Slot, std::ops::Range<usize>)>,
);

/// The sled batch that stores `writes` (logical keys, in order): small revision records merged
/// into their buckets (each bucket read once and rewritten, or removed once empty), everything
/// else under its own key. Only the write-back calls this, under its lock, so nothing else
/// changes a bucket between the read and the batch.
fn sled_batch(tree: &sled::Tree, writes: &Overlay) -> Result<sled::Batch> {
    let mut b = sled::Batch::default();
    // Per bucket, its changes in slot order (the overlay is sorted by revision).
    let mut buckets: BTreeMap<BucketKey, Vec<Change<'_>>> = BTreeMap::new();
    for (k, v) in writes {
        // Reads take a record from its bucket before its own entry, so a record stored under
        // its own key clears its slot (were a revision ever written again); a packed record
        // leaves its own entry be, which stays hidden (and goes when the record is deleted).
        match (packed::slot_of(k), v) {
            (Some((bucket, slot)), Some(v)) if packed::packs(v.len()) => {
                buckets.entry(bucket).or_default().push((slot, Some(v)));
            }
            (Some((bucket, slot)), Some(v)) => {
                buckets.entry(bucket).or_default().push((slot, None));
                b.insert(k.as_slice(), v.as_slice());
            }
            (Some((bucket, slot)), None) => {
                // Wherever it is: sled skips deleting a key it does not have.
                buckets.entry(bucket).or_default().push((slot, None));
                b.remove(k.as_slice());
            }
            (_, Some(v)) => b.insert(k.as_slice(), v.as_slice()),
            (_, None) => b.remove(k.as_slice()),
        }
    }
    for (bucket, changes) in buckets {
        let old = tree.get(bucket)?;
        let kept: Vec<(Slot, &[u8])> = match &old {
            Some(o) => packed::entries(o)?
                .into_iter()
                .map(|(s, r)| (s, &o[r]))
                .collect(),
            None => Vec::new(),
        };
        let mut merged: Vec<(Slot, &[u8])> = Vec::with_capacity(kept.len() + changes.len());
        let mut kept = kept.into_iter().peekable();
        for (slot, change) in changes {
            while let Some(&(s, r)) = kept.peek() {
                if s > slot {
                    break;
                }
                kept.next();
                if s < slot {
                    merged.push((s, r));
                }
            }
            if let Some(r) = change {
                merged.push((slot, r));
            }
        }
        merged.extend(kept);
        if !merged.is_empty() {
            b.insert(&bucket[..], packed::encode(&merged));
        } else if old.is_some() {
            b.remove(&bucket[..]);
        }
    }
    Ok(b)
}

/// A key read from sled: its own entry's, or a packed record's (made from its bucket's key).
enum StoredKey {
    Own(sled::IVec),
    Packed([u8; 17]),
}

/// One logical entry read from sled; the value is a part of `val` (a whole entry, or one
/// record of a bucket, shared rather than copied).
struct Stored {
    key: StoredKey,
    val: sled::IVec,
    at: std::ops::Range<usize>,
}

impl Stored {
    fn key(&self) -> &[u8] {
        match &self.key {
            StoredKey::Own(k) => k,
            StoredKey::Packed(k) => k,
        }
    }
    fn value(&self) -> &[u8] {
        &self.val[self.at.clone()]
    }
}

/// sled's logical entries in `[from, to)`, in key order: the entries under their own keys
/// (everything outside the bucket prefix) merged with the records unpacked from the buckets
/// that cover the range. Where a record is in both (see [`sled_batch`]) the bucket's is kept.
struct SledRange<'a> {
    from: &'a [u8],
    to: &'a [u8],
    /// Entries under their own keys: the range below the bucket prefix, then above it.
    own: std::collections::VecDeque<sled::Iter>,
    buckets: Option<sled::Iter>,
    /// The bucket being unpacked.
    bucket: Option<Unpacking>,
    next_own: Option<Stored>,
    next_packed: Option<Stored>,
    started: bool,
}

impl<'a> SledRange<'a> {
    fn new(tree: &sled::Tree, from: &'a [u8], to: &'a [u8]) -> SledRange<'a> {
        let below: &[u8] = &[packed::BUCKET];
        let above: &[u8] = &[packed::BUCKET + 1];
        let mut own = std::collections::VecDeque::new();
        let end = to.min(below);
        if from < end {
            own.push_back(tree.range(from..end));
        }
        let start = from.max(above);
        if start < to {
            own.push_back(tree.range(start..to));
        }
        let buckets = packed::bucket_range(from, to).map(|(lo, hi)| match hi {
            Some(hi) => tree.range(lo..hi),
            None => tree.range(&lo[..]..above),
        });
        SledRange {
            from,
            to,
            own,
            buckets,
            bucket: None,
            next_own: None,
            next_packed: None,
            started: false,
        }
    }

    fn own_entry(&mut self) -> Result<Option<Stored>> {
        while let Some(it) = self.own.front_mut() {
            match it.next() {
                Some(item) => {
                    let (k, v) = item?;
                    let at = 0..v.len();
                    return Ok(Some(Stored {
                        key: StoredKey::Own(k),
                        val: v,
                        at,
                    }));
                }
                None => {
                    self.own.pop_front();
                }
            }
        }
        Ok(None)
    }

    fn packed_entry(&mut self) -> Result<Option<Stored>> {
        loop {
            if let Some((bucket, val, records)) = &mut self.bucket {
                for (slot, at) in records.by_ref() {
                    let key = packed::record_key(bucket, slot)?;
                    if key[..] < *self.from {
                        continue;
                    }
                    if key[..] >= *self.to {
                        // Every later record and bucket is beyond the range too.
                        self.bucket = None;
                        self.buckets = None;
                        return Ok(None);
                    }
                    return Ok(Some(Stored {
                        key: StoredKey::Packed(key),
                        val: val.clone(),
                        at,
                    }));
                }
            }
            self.bucket = None;
            let Some(it) = self.buckets.as_mut() else {
                return Ok(None);
            };
            match it.next() {
                Some(item) => {
                    let (k, v) = item?;
                    let records = packed::entries(&v)?;
                    self.bucket = Some((k, v, records.into_iter()));
                }
                None => {
                    self.buckets = None;
                    return Ok(None);
                }
            }
        }
    }

    fn next(&mut self) -> Result<Option<Stored>> {
        if !self.started {
            self.started = true;
            self.next_own = self.own_entry()?;
            self.next_packed = self.packed_entry()?;
        }
        let own_first = match (&self.next_own, &self.next_packed) {
            (None, None) => return Ok(None),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(o), Some(p)) => {
                if o.key() == p.key() {
                    // The same record twice: keep the packed one.
                    self.next_own = self.own_entry()?;
                    false
                } else {
                    o.key() < p.key()
                }
            }
        };
        if own_first {
            let e = self.next_own.take();
            self.next_own = self.own_entry()?;
            Ok(e)
        } else {
            let e = self.next_packed.take();
            self.next_packed = self.packed_entry()?;
            Ok(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(b: &dyn Backend, from: &[u8], to: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        b.scan(from, to, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })
        .expect("scan");
        out
    }

    fn put_all(b: &dyn Backend, entries: &[(Vec<u8>, Vec<u8>)]) {
        let mut batch = Batch::default();
        for (k, v) in entries {
            batch.put(k.clone(), v.clone());
        }
        b.apply(batch).expect("apply");
    }

    /// A value of `len` bytes that differs per `seed` (so nothing dedups or compresses).
    fn value(seed: u64, len: usize) -> Vec<u8> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        (0..len).map(|_| rng.next() as u8).collect()
    }

    #[test]
    fn defragment_gives_space_back_and_keeps_every_entry_and_later_writes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("db");
        let b = SledBackend::open(&dir, 1 << 20).expect("open");
        // 24 MB of values, then all but a few deleted.
        for round in 0..6u64 {
            let entries: Vec<_> = (0..40u64)
                .map(|i| {
                    (
                        format!("big/{round}/{i:03}").into_bytes(),
                        value(round * 100 + i, 100_000),
                    )
                })
                .collect();
            put_all(&b, &entries);
            b.flush().expect("flush");
        }
        let mut batch = Batch::default();
        for round in 0..6u64 {
            for i in 0..40u64 {
                if !(round == 2 && i < 3) {
                    batch.delete(format!("big/{round}/{i:03}").into_bytes());
                }
            }
        }
        b.apply(batch).expect("delete");
        b.flush().expect("flush");
        let want = collect(&b, b"", b"\xff");
        assert_eq!(want.len(), 3);
        let before = b.size_on_disk();

        let d = b.defragment().expect("defragment");
        let after = b.size_on_disk();
        assert_eq!(d.entries, 3);
        assert!(d.after < d.before, "{d:?}");
        assert!(
            after < before / 2,
            "defragmentation shrank {before} bytes only to {after}"
        );
        assert_eq!(collect(&b, b"", b"\xff"), want, "the same entries after");
        assert!(!tmp.path().join("db.defrag").exists());
        assert!(!tmp.path().join("db.replaced").exists());
        assert!(!tmp.path().join("db.defrag-done").exists());

        // Writes go on into the new database, and everything survives a reopen.
        put_all(&b, &[(b"after".to_vec(), b"1".to_vec())]);
        b.flush().expect("flush");
        drop(b);
        let b = SledBackend::open(&dir, 1 << 20).expect("reopen");
        let mut all = want.clone();
        all.insert(0, (b"after".to_vec(), b"1".to_vec()));
        assert_eq!(collect(&b, b"", b"\xff"), all);
    }

    #[test]
    fn writes_made_while_a_defragmentation_copies_are_kept() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("db");
        let b = Arc::new(SledBackend::open(&dir, 1 << 20).expect("open"));
        let entries: Vec<_> = (0..200u64)
            .map(|i| (format!("k{i:04}").into_bytes(), value(i, 20_000)))
            .collect();
        put_all(&*b, &entries);
        b.flush().expect("flush");
        let writer = {
            let b = b.clone();
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    put_all(&*b, &[(format!("w{i:04}").into_bytes(), value(i, 100))]);
                }
            })
        };
        b.defragment().expect("defragment");
        writer.join().expect("writer");
        let got = collect(&*b, b"", b"\xff");
        assert_eq!(got.len(), 500, "every entry, old and written meanwhile");
        b.flush().expect("flush");
        let b = Arc::into_inner(b).expect("one handle");
        drop(b);
        let b = SledBackend::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(collect(&b, b"", b"\xff").len(), 500);
    }

    /// A closed database at `dir` holding `entries`.
    fn db_with(dir: &Path, entries: &[(Vec<u8>, Vec<u8>)]) {
        let b = SledBackend::open(dir, 1 << 20).expect("open");
        put_all(&b, entries);
        b.flush().expect("flush");
    }

    #[test]
    fn open_finishes_or_undoes_an_interrupted_swap() {
        let old = vec![(b"k".to_vec(), b"old".to_vec())];
        let new = vec![(b"k".to_vec(), b"new".to_vec())];
        let open = |dir: &Path| {
            let b = SledBackend::open(dir, 1 << 20).expect("open");
            let got = collect(&b, b"", b"\xff");
            for leftover in ["db.defrag", "db.defrag-done", "db.replaced"] {
                let p = dir.with_file_name(leftover);
                assert!(!p.exists(), "{} left behind", p.display());
            }
            got
        };

        // A copy without the marker was not finished: it goes, the old database stays.
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("db");
        db_with(&dir, &old);
        db_with(&tmp.path().join("db.defrag"), &new);
        assert_eq!(open(&dir), old);
        // Even a copy that is only a few files.
        std::fs::create_dir_all(tmp.path().join("db.defrag")).expect("mkdir");
        std::fs::write(tmp.path().join("db.defrag").join("db"), b"torn").expect("write");
        assert_eq!(open(&dir), old);

        // Marker written, nothing renamed yet: the copy is whole and replaces the old one.
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("db");
        db_with(&dir, &old);
        db_with(&tmp.path().join("db.defrag"), &new);
        std::fs::write(tmp.path().join("db.defrag-done"), b"").expect("marker");
        assert_eq!(open(&dir), new);

        // Between the renames: no `db` at all.
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("db");
        db_with(&tmp.path().join("db.replaced"), &old);
        db_with(&tmp.path().join("db.defrag"), &new);
        std::fs::write(tmp.path().join("db.defrag-done"), b"").expect("marker");
        assert_eq!(open(&dir), new);

        // Both renamed, the marker not yet removed; and the old database not yet deleted.
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("db");
        db_with(&tmp.path().join("db.replaced"), &old);
        db_with(&dir, &new);
        std::fs::write(tmp.path().join("db.defrag-done"), b"").expect("marker");
        assert_eq!(open(&dir), new);
        db_with(&tmp.path().join("db.replaced"), &old);
        assert_eq!(open(&dir), new);
    }

    /// `scan_at` on `b`: entries "a" and "c" reached sled, "b" and the new "a" are still
    /// pending; the writes made in `captured` (as an apply released by it would) change, delete
    /// and add keys, and must not be visited, yet are all there for the next read.
    fn scan_at_sees_its_moment_while_writes_go_on(b: &dyn Backend) {
        let kv = |k: &str, v: &str| (k.as_bytes().to_vec(), v.as_bytes().to_vec());
        put_all(b, &[kv("a", "1"), kv("c", "3")]);
        b.flush().expect("flush");
        put_all(b, &[kv("a", "1'"), kv("b", "2")]);
        let mut seen = Vec::new();
        let mut captures = 0;
        b.scan_at(
            b"a",
            b"z",
            &mut || {
                captures += 1;
                let mut later = Batch::default();
                later.put(b"a".to_vec(), b"after".to_vec());
                later.delete(b"b".to_vec());
                later.delete(b"c".to_vec());
                later.put(b"d".to_vec(), b"4".to_vec());
                b.apply(later).expect("an apply while the visit is pending");
            },
            &mut |k, v| {
                seen.push((k.to_vec(), v.to_vec()));
                true
            },
        )
        .expect("scan_at");
        assert_eq!(captures, 1);
        assert_eq!(seen, vec![kv("a", "1'"), kv("b", "2"), kv("c", "3")]);
        let after = vec![kv("a", "after"), kv("d", "4")];
        assert_eq!(collect(b, b"a", b"z"), after);
        b.flush().expect("flush");
        assert_eq!(collect(b, b"a", b"z"), after);
    }

    #[test]
    fn scan_at_sees_its_moment_while_writes_go_on_in_memory() {
        scan_at_sees_its_moment_while_writes_go_on(&MemBackend::default());
    }

    #[test]
    fn scan_at_sees_its_moment_while_writes_go_on_in_sled() {
        let dir = tempfile::tempdir().expect("tmp");
        let b = SledBackend::open(dir.path(), 1 << 20).expect("open");
        scan_at_sees_its_moment_while_writes_go_on(&b);
        drop(b);
        let b = SledBackend::open(dir.path(), 1 << 20).expect("reopen");
        let kv = |k: &str, v: &str| (k.as_bytes().to_vec(), v.as_bytes().to_vec());
        assert_eq!(
            collect(&b, b"a", b"z"),
            vec![kv("a", "after"), kv("d", "4")]
        );
    }

    #[test]
    fn write_back_reads_its_own_writes_before_and_after_reaching_sled() {
        let dir = tempfile::tempdir().expect("tmp");
        let b = SledBackend::open(dir.path(), 1 << 20).expect("open");
        let mut batch = Batch::default();
        batch.put(b"a".to_vec(), b"1".to_vec());
        batch.put(b"c".to_vec(), b"3".to_vec());
        b.apply(batch).expect("apply");
        b.flush().expect("flush");
        let mut batch = Batch::default();
        batch.put(b"b".to_vec(), b"2".to_vec());
        batch.delete(b"c".to_vec());
        batch.put(b"a".to_vec(), b"1'".to_vec());
        b.apply(batch).expect("apply");
        // Before the write-back: overlay merged over sled.
        let want = vec![
            (b"a".to_vec(), b"1'".to_vec()),
            (b"b".to_vec(), b"2".to_vec()),
        ];
        assert_eq!(collect(&b, b"a", b"z"), want);
        assert_eq!(b.get(b"c").expect("get"), None);
        b.flush().expect("flush");
        assert_eq!(collect(&b, b"a", b"z"), want);
        drop(b);
        let b = SledBackend::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(collect(&b, b"a", b"z"), want);
    }

    /// A small deterministic generator (xorshift) for test values and the randomized tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn rk(main: u64, sub: u64) -> Vec<u8> {
        crate::mvcc::keys::rev_key(crate::mvcc::Revision {
            main: main as i64,
            sub: sub as i64,
        })
        .to_vec()
    }

    /// A random key: mostly revision records (some subs past the packed ones), some of the
    /// other prefixes.
    fn random_key(rng: &mut Rng) -> Vec<u8> {
        match rng.below(10) {
            0 => format!("mmeta{}", rng.below(20)).into_bytes(),
            1 => format!("l{}", rng.below(20)).into_bytes(),
            _ => rk(1 + rng.below(120), rng.below(6)),
        }
    }

    /// A random range bound, biased to land inside and around the revision records.
    fn random_bound(rng: &mut Rng) -> Vec<u8> {
        match rng.below(8) {
            0 => Vec::new(),
            1 => vec![packed::BUCKET],
            2 => vec![b'r'],
            3 => vec![b's'],
            4 => rk(rng.below(130), 0)[..9].to_vec(),
            _ => rk(rng.below(130), rng.below(7)),
        }
    }

    #[test]
    fn packed_records_read_scan_and_delete_as_the_plain_map_does() {
        for seed in [0x5EED_1234_ABCD_0001, 7, 0xDEAD_BEEF] {
            packed_records_match_the_plain_map(seed);
        }
    }

    /// Random batches of puts and deletes (revision records small and large, of low and high
    /// sub revisions, records written the way builds before buckets did, other keys), applied
    /// to sled and to the in-memory map: every read and scan agrees, before and after the
    /// write-back, and across reopening.
    fn packed_records_match_the_plain_map(seed: u64) {
        let dir = tempfile::tempdir().expect("tmp");
        let mut sled_b = SledBackend::open(dir.path(), 1 << 20).expect("open");
        let mem = MemBackend::default();
        let mut rng = Rng(seed);
        let mut present: Vec<Vec<u8>> = Vec::new();
        let mut legacy = std::collections::HashSet::new();
        let mut written = std::collections::HashSet::new();
        let compare = |sled_b: &SledBackend, rng: &mut Rng, round: usize| {
            for _ in 0..40 {
                let k = random_key(rng);
                assert_eq!(
                    sled_b.get(&k).expect("get"),
                    mem.get(&k).expect("get"),
                    "round {round}: get {k:?}"
                );
            }
            let (got, want) = (collect(sled_b, b"", b"\xff"), collect(&mem, b"", b"\xff"));
            let keys = |v: &[(Vec<u8>, Vec<u8>)]| v.iter().map(|e| e.0.clone()).collect::<Vec<_>>();
            assert_eq!(
                keys(&got),
                keys(&want),
                "round {round}: keys of a full scan"
            );
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g.1 == w.1,
                    "round {round}: value of {:?}: {} bytes, want {}",
                    g.0,
                    g.1.len(),
                    w.1.len()
                );
            }
            for _ in 0..12 {
                let (a, b) = (random_bound(rng), random_bound(rng));
                let (from, to) = if a <= b { (a, b) } else { (b, a) };
                assert_eq!(
                    collect(sled_b, &from, &to),
                    collect(&mem, &from, &to),
                    "round {round}: scan {from:?}..{to:?}"
                );
            }
        };
        for round in 0..60 {
            let mut batch = Batch::default();
            let mut mirror = Batch::default();
            let mut in_batch = std::collections::HashSet::new();
            for _ in 0..rng.below(40) {
                if !present.is_empty() && rng.below(4) == 0 {
                    // A compaction-like delete of something stored.
                    let i = rng.below(present.len() as u64) as usize;
                    let k = present.swap_remove(i);
                    legacy.remove(&k);
                    if in_batch.insert(k.clone()) {
                        batch.delete(k.clone());
                        mirror.delete(k);
                    }
                    continue;
                }
                let k = random_key(&mut rng);
                let is_rev = k[0] == b'r';
                if (is_rev && !written.insert(k.clone())) || !in_batch.insert(k.clone()) {
                    // A revision is written once, and never again once compacted away.
                    continue;
                }
                let len = [0usize, 10, 300, 480, 600, 2000][rng.below(6) as usize];
                let v = value(rng.next(), len);
                batch.put(k.clone(), v.clone());
                mirror.put(k.clone(), v);
                present.push(k);
            }
            if round % 7 == 3 {
                // A record written by a build from before buckets: under its own key in sled.
                let k = rk(1 + rng.below(120), rng.below(4));
                if !in_batch.contains(&k) && written.insert(k.clone()) {
                    let v = value(rng.next(), 40);
                    sled_b
                        .with(|inner| Ok(inner.tree.insert(&k, v.clone())?))
                        .expect("legacy insert");
                    mem.apply({
                        let mut m = Batch::default();
                        m.put(k.clone(), v);
                        m
                    })
                    .expect("mirror");
                    legacy.insert(k.clone());
                    present.push(k);
                }
            }
            sled_b.apply(batch).expect("apply");
            mem.apply(mirror).expect("mirror");
            compare(&sled_b, &mut rng, round);
            if round % 3 == 0 {
                sled_b.flush().expect("flush");
                compare(&sled_b, &mut rng, round);
            }
            if round % 20 == 19 {
                sled_b.flush().expect("flush");
                drop(sled_b);
                sled_b = SledBackend::open(dir.path(), 1 << 20).expect("reopen");
                compare(&sled_b, &mut rng, round);
            }
        }
        sled_b.flush().expect("flush");
        // Every small record of a low sub revision shares its bucket's entry, except those
        // written before buckets; the rest have entries of their own.
        let (mut own, mut buckets) = (0, std::collections::BTreeSet::new());
        let logical = collect(&mem, b"", b"\xff");
        for (k, v) in &logical {
            match packed::slot_of(k) {
                Some((bucket, _)) if packed::packs(v.len()) && !legacy.contains(k) => {
                    buckets.insert(bucket);
                }
                _ => own += 1,
            }
        }
        let stored = sled_b.with(|inner| Ok(inner.tree.len())).expect("len");
        assert_eq!(stored, own + buckets.len(), "of {} entries", logical.len());
        assert!(
            buckets.len() * 4 < logical.len() - own,
            "records were packed"
        );
    }

    #[test]
    fn large_records_and_high_sub_revisions_keep_entries_of_their_own() {
        let dir = tempfile::tempdir().expect("tmp");
        let b = SledBackend::open(dir.path(), 1 << 20).expect("open");
        let small = value(1, 100);
        let large = value(2, packed::MAX_PACKED_RECORD + 1);
        let mut batch = Batch::default();
        batch.put(rk(16, 0), small.clone());
        batch.put(rk(17, 0), large.clone());
        batch.put(rk(17, packed::PACKED_SUBS), small.clone());
        b.apply(batch).expect("apply");
        b.flush().expect("flush");
        let own_keys: Vec<Vec<u8>> = b
            .with(|inner| {
                Ok(inner
                    .tree
                    .iter()
                    .keys()
                    .map(|k| k.map(|k| k.to_vec()))
                    .collect::<std::result::Result<_, _>>()?)
            })
            .expect("keys");
        assert_eq!(
            own_keys,
            vec![
                packed::bucket_key(1).to_vec(),
                rk(17, 0),
                rk(17, packed::PACKED_SUBS)
            ]
        );
        assert_eq!(b.get(&rk(16, 0)).expect("get"), Some(small.clone()));
        assert_eq!(b.get(&rk(17, 0)).expect("get"), Some(large.clone()));
        // Were a revision written again, larger, the later record is the one read.
        let mut batch = Batch::default();
        batch.put(rk(18, 0), small.clone());
        b.apply(batch).expect("apply");
        b.flush().expect("flush");
        let mut batch = Batch::default();
        batch.put(rk(18, 0), large.clone());
        b.apply(batch).expect("apply");
        b.flush().expect("flush");
        assert_eq!(b.get(&rk(18, 0)).expect("get"), Some(large.clone()));
        let mut batch = Batch::default();
        batch.delete(rk(18, 0));
        b.apply(batch).expect("apply");
        // Deleting the packed one empties its bucket, which then goes.
        let mut batch = Batch::default();
        batch.delete(rk(16, 0));
        b.apply(batch).expect("apply");
        b.flush().expect("flush");
        assert_eq!(b.get(&rk(16, 0)).expect("get"), None);
        assert!(
            b.with(|inner| Ok(inner.tree.get(packed::bucket_key(1))?))
                .expect("get")
                .is_none()
        );
    }
}
