//! Scheduled backups (`--backup-dir`, `--backup-interval`, `--backup-keep`): every interval
//! the member writes a snapshot of its key space into the backup directory and keeps only the
//! newest K.
//!
//! Each file holds exactly what `Maintenance.Snapshot` streams (`etcdctl snapshot save`): the
//! format of [`crate::snapshot`], with its CRC-32 and trailing SHA-256, so `coordinator
//! snapshot status` checks it and `coordinator snapshot restore` makes a data dir of it. It is
//! named `snapshot-<UTC time>-rev<revision>.db` (names sort by time) and appears whole or not
//! at all: written to a `.tmp-` file, fsynced, renamed, and the directory fsynced, so a crash
//! leaves at most a temporary file (removed at the next start) and never a half snapshot
//! under a final name.
//!
//! A failed backup (full disk, unwritable directory) is logged and counted
//! (`coordinator_backup_failures_total`) and the next one is tried at the next tick: the
//! member keeps serving. Every member of a cluster writes its own (its state at its applied
//! index); a restore needs only one of them.
//!
//! Caveat: like `Maintenance.Snapshot`, the copy is taken under the state's read lock, so
//! writes wait while the key space is copied (about a second per few hundred MB).

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::state::StateMachine;

/// Where, how often, how many.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// The directory the snapshots go to (created if missing).
    pub dir: PathBuf,
    /// Time between two backups.
    pub interval: Duration,
    /// How many of the newest backups are kept.
    pub keep: usize,
}

/// The backup metrics (registered in the coordinator's admin registry).
#[derive(Clone, Debug, Default)]
pub struct BackupMetrics {
    /// Unix time (seconds) of the last backup that succeeded.
    pub last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Size in bytes of the last backup that succeeded.
    pub last_size: Gauge,
    /// Store revision of the last backup that succeeded.
    pub last_revision: Gauge,
    /// Backups written.
    pub written: Counter,
    /// Backups that failed.
    pub failures: Counter,
}

impl BackupMetrics {
    /// Creates them and registers them under `coordinator_backup_*`.
    pub fn register(m: &service_kit::admin::Metrics) -> BackupMetrics {
        let me = BackupMetrics::default();
        let mut r = m.registry();
        r.register(
            "coordinator_backup_last_success_timestamp_seconds",
            "Unix time of the last scheduled backup that succeeded",
            me.last_success.clone(),
        );
        r.register(
            "coordinator_backup_last_size_bytes",
            "Size of the last scheduled backup that succeeded",
            me.last_size.clone(),
        );
        r.register(
            "coordinator_backup_last_revision",
            "Store revision held by the last scheduled backup that succeeded",
            me.last_revision.clone(),
        );
        r.register(
            "coordinator_backup_written",
            "Scheduled backups written",
            me.written.clone(),
        );
        r.register(
            "coordinator_backup_failures",
            "Scheduled backups that failed",
            me.failures.clone(),
        );
        me
    }
}

/// One backup written.
#[derive(Debug, Clone)]
pub struct Written {
    /// Its final path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The store revision it holds.
    pub revision: i64,
    /// Older backups removed to keep the newest K.
    pub pruned: usize,
}

const PREFIX: &str = "snapshot-";
const SUFFIX: &str = ".db";
const TMP_PREFIX: &str = ".tmp-";

/// True for a file name this module writes (a finished backup).
pub fn is_backup_name(name: &str) -> bool {
    name.starts_with(PREFIX) && name.ends_with(SUFFIX) && name.contains("-rev")
}

/// The finished backups in `dir`, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str()
            && is_backup_name(name)
        {
            out.push(entry.path());
        }
    }
    // Names start with a fixed-width UTC time, so name order is time order.
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes one backup of `state` into `config.dir` and prunes to `config.keep`.
pub fn write_one(
    state: &RwLock<StateMachine>,
    config: &BackupConfig,
) -> crate::error::Result<Written> {
    fs::create_dir_all(&config.dir)?;
    let stamp =
        service_kit::time::utc_millis(service_kit::time::now_millis()).replace([':', '-'], "");
    let tmp = config.dir.join(format!(
        "{TMP_PREFIX}{PREFIX}{stamp}-{}",
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let (size, revision) = crate::snapshot::write(state, &mut file)?;
        file.sync_all()?;
        drop(file);
        let path = config
            .dir
            .join(format!("{PREFIX}{stamp}-rev{revision}{SUFFIX}"));
        fs::rename(&tmp, &path)?;
        sync_dir(&config.dir)?;
        Ok::<_, crate::error::Error>((path, size, revision))
    })();
    let (path, size, revision) = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let pruned = prune(&config.dir, config.keep)?;
    Ok(Written {
        path,
        size,
        revision,
        pruned,
    })
}

/// Removes all but the newest `keep` backups; returns how many went.
pub fn prune(dir: &Path, keep: usize) -> std::io::Result<usize> {
    let all = list(dir)?;
    let excess = all.len().saturating_sub(keep);
    for old in &all[..excess] {
        fs::remove_file(old)?;
    }
    if excess > 0 {
        sync_dir(dir)?;
    }
    Ok(excess)
}

/// Removes temporary files a crash mid-backup left behind.
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TMP_PREFIX))
        {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(path = %entry.path().display(), "removed an unfinished backup")
                }
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove an unfinished backup")
                }
            }
        }
    }
}

/// Runs the schedule until `shutdown`: the first backup one interval after the start, then
/// one per interval (a slow backup delays the next; none are piled up).
pub async fn run(
    state: Arc<RwLock<StateMachine>>,
    config: BackupConfig,
    metrics: BackupMetrics,
    shutdown: CancellationToken,
) {
    tracing::info!(
        dir = %config.dir.display(),
        interval = ?config.interval,
        keep = config.keep,
        "scheduled backups on"
    );
    remove_leftovers(&config.dir);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + config.interval,
        config.interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (st, cfg) = (state.clone(), config.clone());
        let started = std::time::Instant::now();
        let outcome = tokio::task::spawn_blocking(move || write_one(&st, &cfg)).await;
        match outcome {
            Ok(Ok(w)) => {
                metrics.written.inc();
                metrics
                    .last_success
                    .set(service_kit::time::now_millis() as f64 / 1000.0);
                metrics
                    .last_size
                    .set(i64::try_from(w.size).unwrap_or(i64::MAX));
                metrics.last_revision.set(w.revision);
                tracing::info!(
                    path = %w.path.display(),
                    bytes = w.size,
                    revision = w.revision,
                    pruned = w.pruned,
                    took_ms = started.elapsed().as_millis() as u64,
                    "backup written"
                );
            }
            Ok(Err(e)) => {
                metrics.failures.inc();
                tracing::error!(dir = %config.dir.display(), error = %e, "backup failed; the next is tried at the next interval");
            }
            Err(e) => {
                metrics.failures.inc();
                tracing::error!(error = %e, "backup task failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_and_ignores_other_files() {
        let dir = tempfile::tempdir().expect("tmp");
        for name in [
            "snapshot-20260101T000001.000Z-rev5.db",
            "snapshot-20260101T000002.000Z-rev9.db",
            "snapshot-20260101T000003.000Z-rev12.db",
            "notes.txt",
        ] {
            fs::write(dir.path().join(name), b"x").expect("write");
        }
        assert_eq!(prune(dir.path(), 2).expect("prune"), 1);
        let left: Vec<String> = list(dir.path())
            .expect("list")
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        assert_eq!(
            left,
            [
                "snapshot-20260101T000002.000Z-rev9.db",
                "snapshot-20260101T000003.000Z-rev12.db"
            ]
        );
        assert!(dir.path().join("notes.txt").exists());
    }
}
