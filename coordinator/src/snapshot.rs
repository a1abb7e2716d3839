//! Snapshot files: [`write`] makes them (for `Maintenance.Snapshot`, which `etcdctl snapshot
//! save` calls, and for the scheduled backups of [`crate::backup`]); `coordinator snapshot
//! status|restore` reads them, in the manner of `etcdutl`.
//!
//! The format is described in [`crate::rpc::maintenance`]: `CSNAP001`, the backend's entries
//! as length-prefixed records, an end marker, a CRC-32 of everything before it, zero padding to
//! a multiple of 512 bytes, then the SHA-256 of everything before it. A file is trusted only
//! after all of these check out: a truncated or altered file is refused before anything is
//! written.
//!
//! A restore writes a fresh data directory for a *new* cluster: the key space with its whole
//! history and revisions, leases and the auth state, as the snapshot holds them; but not the
//! old cluster's identity (cluster and member ids, member names and URLs), Raft log position or
//! membership. The new member's ids derive from `--initial-cluster`, `--initial-advertise-peer-urls`
//! and `--initial-cluster-token`, as at a first start; members started on such directories with
//! the same `--initial-cluster` (and `--initial-cluster-state new`) form the new cluster, their
//! state machines identical from the first log entry on.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::mvcc::keys;
use crate::mvcc::{Backend, Batch, SledBackend};

/// The first 8 bytes of every snapshot.
pub const MAGIC: &[u8; 8] = b"CSNAP001";
const SHA_LEN: u64 = 32;
/// Records larger than this are taken as damage, not data (the largest real entry is a value
/// under `--max-request-bytes`, at most 64 MiB).
const MAX_RECORD: u32 = 256 * 1024 * 1024;

/// Writes a snapshot of `state` into `out` (an empty file) in the format above: one
/// consistent point in time, fixed under the state's read lock, which is released as soon as
/// the backend holds that point (`state::visit_all_released`), so writes go on while the copy
/// is written; then padded and hashed. Leaves `out` positioned at its start; returns its size
/// and the store revision it holds. `Maintenance.Snapshot` streams what this writes; `--backup-dir` keeps it.
pub fn write(
    state: &parking_lot::RwLock<crate::state::StateMachine>,
    out: &mut File,
) -> crate::error::Result<(u64, i64)> {
    use std::io::Write as _;
    let st = state.read();
    let rev = st.revision();
    let mut h = crc32fast::Hasher::new();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut *out);
    let mut io_err = None;
    w.write_all(MAGIC)?;
    h.update(MAGIC);
    crate::state::visit_all_released(st, &mut |k, v| {
        let mut rec = Vec::with_capacity(8 + k.len() + v.len());
        rec.extend_from_slice(&(k.len() as u32).to_le_bytes());
        rec.extend_from_slice(k);
        rec.extend_from_slice(&(v.len() as u32).to_le_bytes());
        rec.extend_from_slice(v);
        h.update(&rec);
        if let Err(e) = w.write_all(&rec) {
            io_err = Some(e);
            return false;
        }
        true
    })?;
    if let Some(e) = io_err {
        return Err(e.into());
    }
    let end = u32::MAX.to_le_bytes();
    h.update(&end);
    w.write_all(&end)?;
    w.write_all(&h.finalize().to_le_bytes())?;
    w.flush()?;
    drop(w);
    let len = out.metadata()?.len();
    let pad = (512 - (len % 512)) % 512;
    out.write_all(&vec![0u8; pad as usize])?;
    // The SHA-256 covers the file as written, read back.
    let mut sha = Sha256::new();
    out.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    out.write_all(&sha.finalize())?;
    let total = out.metadata()?.len();
    out.seek(SeekFrom::Start(0))?;
    Ok((total, rev))
}

/// Why a snapshot cannot be read or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be opened or read.
    #[error("cannot read snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not one of our snapshots at all (etcd's bolt files land here too).
    #[error("{path} is not a coordinator snapshot: {reason}")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The file was cut short or altered.
    #[error("snapshot {path} is corrupted or truncated: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Which check failed.
        reason: String,
    },
    /// A restore flag is missing or inconsistent.
    #[error("{0}")]
    BadFlags(String),
    /// The target data directory already holds something.
    #[error("data dir {0} exists and is not empty; restore writes a fresh one")]
    DataDirExists(PathBuf),
    /// Writing the new data directory failed.
    #[error("cannot write the restored data dir: {0}")]
    Write(String),
}

/// What `snapshot status` reports (etcdutl's columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// CRC-32 of the snapshot's content (the checksum stored in the file).
    pub hash: u32,
    /// The store revision at which the snapshot was taken.
    pub revision: i64,
    /// Entries in the snapshot (every stored version of every key, leases, auth and meta
    /// records: what etcdutl counts as keys of the bolt file).
    pub total_keys: u64,
    /// File size in bytes.
    pub total_size: u64,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Called with each backend entry (key, value) of a snapshot.
pub type EntryVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), SnapshotError> + 'a;

/// Checks every checksum of the file at `path` and calls `entry` for each backend entry, in
/// order. Nothing is handed to `entry` before the SHA-256 trailer was verified.
pub fn read(path: &Path, entry: &mut EntryVisitor<'_>) -> Result<SnapshotInfo, SnapshotError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    let mut magic = [0u8; 8];
    if size < 8 || f.read_exact(&mut magic).is_err() {
        return Err(SnapshotError::NotASnapshot {
            path: path.to_path_buf(),
            reason: format!("only {size} bytes"),
        });
    }
    if &magic != MAGIC {
        return Err(SnapshotError::NotASnapshot {
            path: path.to_path_buf(),
            reason: format!(
                "it starts with {:02x?}, not {:?} (etcd's own bolt snapshots are not readable here)",
                magic,
                String::from_utf8_lossy(MAGIC)
            ),
        });
    }
    // etcd's convention, which `etcdctl snapshot save` checks too.
    if size < 8 + 8 + SHA_LEN || size % 512 != SHA_LEN {
        return Err(corrupt(
            path,
            format!("its size ({size} bytes) is not a multiple of 512 plus the 32-byte SHA-256"),
        ));
    }
    let body = size - SHA_LEN;

    // 1. The SHA-256 of everything before the trailer.
    f.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    let mut sha = Sha256::new();
    let mut r = BufReader::with_capacity(1 << 20, (&mut f).take(body));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    let mut trailer = [0u8; SHA_LEN as usize];
    f.read_exact(&mut trailer).map_err(io_err(path))?;
    if sha.finalize().as_slice() != trailer {
        return Err(corrupt(
            path,
            "the SHA-256 trailer does not match its content",
        ));
    }

    // 2. The records, the end marker, the CRC-32, the padding.
    f.seek(SeekFrom::Start(8)).map_err(io_err(path))?;
    let mut r = BufReader::with_capacity(1 << 20, (&mut f).take(body - 8));
    let mut crc = crc32fast::Hasher::new();
    crc.update(MAGIC);
    let mut count = 0u64;
    let mut revision = 0i64;
    let read_u32 = |r: &mut dyn Read, what: &str| -> Result<u32, SnapshotError> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)
            .map_err(|_| corrupt(path, format!("it ends inside {what}")))?;
        Ok(u32::from_le_bytes(b))
    };
    let mut key = Vec::new();
    let mut value = Vec::new();
    loop {
        let klen = read_u32(&mut r, "a record")?;
        crc.update(&klen.to_le_bytes());
        if klen == u32::MAX {
            break;
        }
        if klen > MAX_RECORD {
            return Err(corrupt(path, format!("a key of {klen} bytes")));
        }
        key.resize(klen as usize, 0);
        r.read_exact(&mut key)
            .map_err(|_| corrupt(path, "it ends inside a key"))?;
        let vlen = read_u32(&mut r, "a record")?;
        if vlen > MAX_RECORD {
            return Err(corrupt(path, format!("a value of {vlen} bytes")));
        }
        value.resize(vlen as usize, 0);
        r.read_exact(&mut value)
            .map_err(|_| corrupt(path, "it ends inside a value"))?;
        crc.update(&key);
        crc.update(&vlen.to_le_bytes());
        crc.update(&value);
        if key == keys::META_REVISION {
            revision = keys::decode_i64(&value)
                .map_err(|e| corrupt(path, format!("its revision record: {e}")))?;
        }
        count += 1;
        entry(&key, &value)?;
    }
    let stored = read_u32(&mut r, "the checksum")?;
    let hash = crc.finalize();
    if stored != hash {
        return Err(corrupt(
            path,
            format!("CRC-32 {stored:08x} stored, {hash:08x} computed"),
        ));
    }
    let mut pad = Vec::new();
    r.read_to_end(&mut pad).map_err(io_err(path))?;
    if pad.len() >= 512 || pad.iter().any(|b| *b != 0) {
        return Err(corrupt(path, "unexpected bytes after the checksum"));
    }
    Ok(SnapshotInfo {
        hash,
        revision,
        total_keys: count,
        total_size: size,
    })
}

/// Reads and checks the whole file; reports what `snapshot status` prints.
pub fn status(path: &Path) -> Result<SnapshotInfo, SnapshotError> {
    read(path, &mut |_, _| Ok(()))
}

/// Sizes as etcdutl prints them (SI units: `2.1 MB`, `20 kB`).
pub fn human_size(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if v < 10.0 {
        format!("{v:.1} {}", units[u])
    } else {
        format!("{:.0} {}", v, units[u])
    }
}

/// `snapshot status` output: `simple` (default), `table` or `json`.
pub fn format_status(info: &SnapshotInfo, format: &str) -> Result<String, SnapshotError> {
    match format {
        "simple" => Ok(format!(
            "{:08x}, {}, {}, {}",
            info.hash,
            info.revision,
            info.total_keys,
            human_size(info.total_size)
        )),
        "json" => Ok(serde_json::json!({
            "hash": info.hash,
            "revision": info.revision,
            "totalKey": info.total_keys,
            "totalSize": info.total_size,
        })
        .to_string()),
        "table" => {
            let cells = [
                format!("{:08x}", info.hash),
                info.revision.to_string(),
                info.total_keys.to_string(),
                human_size(info.total_size),
            ];
            let heads = ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"];
            let widths: Vec<usize> = heads
                .iter()
                .zip(&cells)
                .map(|(h, c)| h.len().max(c.len()) + 2)
                .collect();
            let line = widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("+");
            let row = |items: &[String]| {
                items
                    .iter()
                    .zip(&widths)
                    .map(|(s, w)| format!("{:^w$}", s, w = *w))
                    .collect::<Vec<_>>()
                    .join("|")
            };
            let heads: Vec<String> = heads.iter().map(|s| s.to_string()).collect();
            Ok(format!(
                "+{line}+\n|{}|\n+{line}+\n|{}|\n+{line}+",
                row(&heads),
                row(&cells)
            ))
        }
        other => Err(SnapshotError::BadFlags(format!(
            "unknown output format {other:?} (simple, table or json)"
        ))),
    }
}

/// What a restore needs (etcdutl's flags).
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The snapshot file.
    pub file: PathBuf,
    /// The new member's data directory (must not exist, or be empty).
    pub data_dir: PathBuf,
    /// The new member's name.
    pub name: String,
    /// `name=peer-url,...` of the new cluster.
    pub initial_cluster: String,
    /// This member's peer URLs (the first must be its `--initial-cluster` entry).
    pub initial_advertise_peer_urls: Vec<String>,
    /// The new cluster's token.
    pub initial_cluster_token: String,
}

/// What a restore wrote.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The snapshot.
    pub info: SnapshotInfo,
    /// Entries written.
    pub entries: u64,
    /// The restored store's revision (as the new member will serve it).
    pub revision: i64,
    /// The new cluster id.
    pub cluster_id: u64,
    /// The new member id.
    pub member_id: u64,
}

/// Whether a snapshot entry belongs to the old cluster's identity or Raft position, which a
/// restore leaves behind.
fn left_behind(key: &[u8]) -> bool {
    const OLD: &[&[u8]] = &[
        keys::META_APPLIED,
        keys::META_TERM,
        keys::META_CLUSTER_ID,
        keys::META_MEMBER_ID,
        b"mraft_last_applied",
        b"mraft_membership",
    ];
    OLD.contains(&key) || key.starts_with(b"mmember/")
}

/// The ids a member started with these flags derives (the same rules as a first start).
fn new_ids(members: &[(String, String)], my_url: &str, token: &str) -> (u64, u64) {
    let member_id = crate::rpc::member_id_for(my_url, token);
    let mut parts: Vec<Vec<u8>> = members
        .iter()
        .map(|(n, u)| format!("{n}={u}").into_bytes())
        .collect();
    parts.sort();
    parts.push(token.as_bytes().to_vec());
    let refs: Vec<&[u8]> = parts.iter().map(|v| v.as_slice()).collect();
    (crate::rpc::fnv64(&refs), member_id)
}

fn parse_members(spec: &str) -> Result<Vec<(String, String)>, SnapshotError> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((n, u)) if !n.is_empty() && !u.is_empty() => {
                out.push((n.to_string(), u.to_string()))
            }
            _ => {
                return Err(SnapshotError::BadFlags(format!(
                    "--initial-cluster entry {part:?} is not name=url"
                )));
            }
        }
    }
    if out.is_empty() {
        return Err(SnapshotError::BadFlags("--initial-cluster is empty".into()));
    }
    Ok(out)
}

/// Writes a fresh data directory from a snapshot. The file is checked whole first; the data
/// directory is written under a temporary name beside it and renamed into place at the end, so
/// a failed restore leaves nothing that looks like a data directory.
pub fn restore(opts: &RestoreOptions) -> Result<RestoreReport, SnapshotError> {
    if opts.name.is_empty() {
        return Err(SnapshotError::BadFlags("--name must not be empty".into()));
    }
    let members = parse_members(&opts.initial_cluster)?;
    let mine: Vec<&String> = members
        .iter()
        .filter(|(n, _)| n == &opts.name)
        .map(|(_, u)| u)
        .collect();
    let Some(my_url) = mine.first() else {
        return Err(SnapshotError::BadFlags(format!(
            "--initial-cluster has no member named {:?} (--name)",
            opts.name
        )));
    };
    if let Some(adv) = opts.initial_advertise_peer_urls.first()
        && adv != *my_url
    {
        return Err(SnapshotError::BadFlags(format!(
            "--initial-advertise-peer-urls {adv} does not match {}={my_url} in --initial-cluster",
            opts.name
        )));
    }
    if opts.initial_cluster_token.is_empty() {
        return Err(SnapshotError::BadFlags(
            "--initial-cluster-token must not be empty".into(),
        ));
    }
    if opts.data_dir.exists() {
        let empty = std::fs::read_dir(&opts.data_dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(SnapshotError::DataDirExists(opts.data_dir.clone()));
        }
    }
    // Check the whole file before writing anything.
    let info = status(&opts.file)?;

    let parent = opts
        .data_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let parent = if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent
    };
    std::fs::create_dir_all(&parent)
        .map_err(|e| SnapshotError::Write(format!("cannot create {}: {e}", parent.display())))?;
    let dir_name = opts
        .data_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let tmp = parent.join(format!(".{dir_name}.restoring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = write_data_dir(opts, &tmp, &members, my_url, info.clone());
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if opts.data_dir.exists() {
        std::fs::remove_dir(&opts.data_dir).map_err(|e| {
            SnapshotError::Write(format!("cannot replace {}: {e}", opts.data_dir.display()))
        })?;
    }
    std::fs::rename(&tmp, &opts.data_dir).map_err(|e| {
        SnapshotError::Write(format!(
            "cannot move {} to {}: {e}",
            tmp.display(),
            opts.data_dir.display()
        ))
    })?;
    Ok(report)
}

fn write_data_dir(
    opts: &RestoreOptions,
    dir: &Path,
    members: &[(String, String)],
    my_url: &str,
    info: SnapshotInfo,
) -> Result<RestoreReport, SnapshotError> {
    let w = |e: crate::error::Error| SnapshotError::Write(e.to_string());
    let db = dir.join("member").join("snap").join("db");
    std::fs::create_dir_all(&db)
        .map_err(|e| SnapshotError::Write(format!("cannot create {}: {e}", db.display())))?;
    let backend = Arc::new(SledBackend::open(&db, 64 * 1024 * 1024).map_err(w)?);
    let mut batch = Batch::default();
    let mut pending = 0usize;
    let mut entries = 0u64;
    read(&opts.file, &mut |k, v| {
        if left_behind(k) {
            return Ok(());
        }
        batch.put(k.to_vec(), v.to_vec());
        pending += k.len() + v.len();
        entries += 1;
        if pending > 16 * 1024 * 1024 {
            backend.apply(std::mem::take(&mut batch)).map_err(w)?;
            pending = 0;
        }
        Ok(())
    })?;
    let (cluster_id, member_id) = new_ids(members, my_url, &opts.initial_cluster_token);
    batch.put(
        keys::META_CLUSTER_ID.to_vec(),
        (cluster_id as i64).to_le_bytes().to_vec(),
    );
    batch.put(
        keys::META_MEMBER_ID.to_vec(),
        (member_id as i64).to_le_bytes().to_vec(),
    );
    backend.apply(batch).map_err(w)?;
    backend.flush().map_err(w)?;
    // Load it the way a starting member will: it must open, at the snapshot's revision.
    let backend: Arc<dyn Backend> = backend;
    let revision = {
        let sm = crate::state::StateMachine::open(backend.clone()).map_err(w)?;
        sm.revision()
    };
    if revision != info.revision {
        return Err(SnapshotError::Write(format!(
            "the restored store is at revision {revision}, the snapshot at {}",
            info.revision
        )));
    }
    backend.flush().map_err(w)?;
    drop(backend);
    Ok(RestoreReport {
        info,
        entries,
        revision,
        cluster_id,
        member_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_etcdutl() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(20_480), "20 kB");
        assert_eq!(human_size(2_105_344), "2.1 MB");
    }

    #[test]
    fn identity_and_raft_position_are_left_behind() {
        assert!(left_behind(keys::META_APPLIED));
        assert!(left_behind(keys::META_MEMBER_ID));
        assert!(left_behind(b"mmember/\0\0\0\0\0\0\0\x01"));
        assert!(!left_behind(keys::META_REVISION));
        assert!(!left_behind(keys::META_COMPACT));
        assert!(!left_behind(b"l\0\0\0\0\0\0\0\x01"));
        assert!(!left_behind(b"ameta"));
    }

    #[test]
    fn bad_flags_are_refused_before_reading() {
        let base = RestoreOptions {
            file: PathBuf::from("/nonexistent"),
            data_dir: PathBuf::from("/tmp/never-written"),
            name: "n1".into(),
            initial_cluster: "n1=http://a:2380".into(),
            initial_advertise_peer_urls: vec!["http://a:2380".into()],
            initial_cluster_token: "t".into(),
        };
        let mut o = base.clone();
        o.initial_cluster = "n2=http://b:2380".into();
        assert!(matches!(restore(&o), Err(SnapshotError::BadFlags(_))));
        let mut o = base.clone();
        o.initial_advertise_peer_urls = vec!["http://other:2380".into()];
        assert!(matches!(restore(&o), Err(SnapshotError::BadFlags(_))));
        let mut o = base.clone();
        o.initial_cluster = "garbage".into();
        assert!(matches!(restore(&o), Err(SnapshotError::BadFlags(_))));
        assert!(matches!(restore(&base), Err(SnapshotError::Io { .. })));
    }
}
