//! The write-ahead log: every command is here, fsynced, before it is applied or acknowledged.
//!
//! sled (the state machine's engine) cannot promise durability on its own (its flush ends in
//! `sync_file_range`), so the log is the record of truth: a command is acknowledged only after
//! `fdatasync` returned for the segment holding it. On start the state machine is brought up to
//! date by replaying the entries after its applied index.
//!
//! Format: segment files `wal-<first index, 20 digits>.log`, each a sequence of records
//! `[len: u32 LE][crc32 of body: u32 LE][body]`, body = `[index: u64 LE][term: u64 LE][data]`.
//! On open:
//! - a record that is cut short or fails its CRC at the end of the *last* segment is a torn
//!   write from a crash: the tail is truncated and the log goes on;
//! - a bad record anywhere else (inside an older segment, or followed by good records) is
//!   corruption: opening fails rather than serving from a log with a hole in it.
//!
//! Segments whose every entry is at or below an index the state machine has made durable are
//! deleted by [`Wal::purge_to`], so disk use stays bounded.
//!
//! The segment being written is zero-filled ahead of its records, [`PREALLOC_BYTES`] at a time:
//! an append that fits in the zeros overwrites blocks the file already owns, so its
//! `fdatasync` writes data only. Appending past the file's end instead changes its size and
//! allocates blocks, and then every `fdatasync` must also write the inode (measured: ~5 % of a
//! follower's CPU on ext4, and a second device write per commit). The zeros cost one larger
//! write per [`PREALLOC_BYTES`] of log. A zero record header marks the end of the records; on
//! open the last segment is cut back to its records (the next append zero-fills again), and a
//! segment is cut to its records before the log rolls to the next, so only the segment being
//! written ever holds zeros. This is what etcd's WAL does with its preallocated segments.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
// The record framing is part of the log format and lives in `coord-log`, so the fuzz targets
// can build it without the server; re-exported here under the old paths.
pub use coord_log::record::{Entry, Scan, encode_record, scan_records};

/// Roll to a new segment after this many bytes.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// The segment being written is zero-filled this far ahead of its records.
pub const PREALLOC_BYTES: u64 = 1024 * 1024;

struct Segment {
    first: u64,
    path: PathBuf,
}

/// Where one entry sits on disk.
#[derive(Debug, Clone, Copy)]
struct Position {
    index: u64,
    term: u64,
    segment_first: u64,
    offset: u64,
}

/// An append-only, fsynced, segmented log.
pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    file: File,
    /// Where the records of the segment being written end (the next append's offset).
    file_len: u64,
    /// The segment file's size: zeros from `file_len` up to here.
    alloc_len: u64,
    last_index: u64,
    last_term: u64,
    buf: Vec<u8>,
    positions: std::collections::VecDeque<Position>,
}

fn seg_name(first: u64) -> String {
    format!("wal-{first:020}.log")
}

fn parse_seg_name(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Whether the record header at `offset` of the file is all zeros (the zero-filled room after
/// the records, not a torn record).
fn zero_header_at(path: &Path, offset: u64) -> Result<bool> {
    let f = File::open(path)?;
    let mut hdr = [0u8; 8];
    match f.read_exact_at(&mut hdr, offset) {
        Ok(()) => Ok(hdr == [0u8; 8]),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn scan_segment(path: &Path) -> Result<Scan> {
    let f = File::open(path)?;
    let total = f.metadata()?.len();
    Ok(scan_records(BufReader::with_capacity(1 << 20, f), total))
}

impl Wal {
    /// Open the log in `dir` (created if missing) and return it with every entry it holds.
    pub fn open(dir: &Path) -> Result<(Wal, Vec<Entry>)> {
        fs::create_dir_all(dir)?;
        let mut segments = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            if let Some(first) = e.file_name().to_str().and_then(parse_seg_name) {
                segments.push(Segment {
                    first,
                    path: e.path(),
                });
            }
        }
        segments.sort_by_key(|s| s.first);
        let mut all: Vec<Entry> = Vec::new();
        let mut positions = std::collections::VecDeque::new();
        let n = segments.len();
        for (i, seg) in segments.iter().enumerate() {
            let scan = scan_segment(&seg.path)?;
            if scan.bad_tail {
                if i + 1 < n {
                    return Err(Error::Corrupt(format!(
                        "write-ahead log segment {} is damaged at byte {} and later segments exist",
                        seg.path.display(),
                        scan.good_len
                    )));
                }
                if zero_header_at(&seg.path, scan.good_len)? {
                    // The zero-filled room after the records (see the module docs): cut off, so
                    // that nothing a crash left in it can be read as a record later.
                    tracing::debug!(segment = %seg.path.display(), offset = scan.good_len,
                        "cutting the write-ahead log's zero-filled tail");
                } else {
                    tracing::warn!(segment = %seg.path.display(), offset = scan.good_len,
                        "truncating torn tail of the write-ahead log");
                }
                let f = OpenOptions::new().write(true).open(&seg.path)?;
                f.set_len(scan.good_len)?;
                f.sync_all()?;
            }
            for (offset, e) in scan.entries {
                positions.push_back(Position {
                    index: e.index,
                    term: e.term,
                    segment_first: seg.first,
                    offset,
                });
                if let Some(prev) = all.last()
                    && e.index != prev.index + 1
                {
                    return Err(Error::Corrupt(format!(
                        "write-ahead log jumps from index {} to {}",
                        prev.index, e.index
                    )));
                }
                all.push(e);
            }
        }
        let (last_index, last_term) = match all.last() {
            Some(e) => (e.index, e.term),
            None => match segments.last() {
                Some(s) => (s.first.saturating_sub(1), 0),
                None => (0, 0),
            },
        };
        let (file, file_len) = match segments.last() {
            Some(s) => {
                let mut f = OpenOptions::new().write(true).read(true).open(&s.path)?;
                let len = f.seek(SeekFrom::End(0))?;
                (f, len)
            }
            None => {
                let path = dir.join(seg_name(last_index + 1));
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .read(true)
                    .open(&path)?;
                sync_dir(dir)?;
                segments.push(Segment {
                    first: last_index + 1,
                    path,
                });
                (f, 0)
            }
        };
        let wal = Wal {
            dir: dir.to_path_buf(),
            segments,
            file,
            file_len,
            alloc_len: file_len,
            last_index,
            last_term,
            buf: Vec::with_capacity(1 << 20),
            positions,
        };
        Ok((wal, all))
    }

    /// Index of the last entry (0 when empty).
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// Term of the last entry.
    pub fn last_term(&self) -> u64 {
        self.last_term
    }

    /// Append entries (their indexes must continue the log) and fsync before returning.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        if self.file_len >= SEGMENT_BYTES {
            self.roll()?;
        }
        self.buf.clear();
        let seg_first = self.segments.last().map(|s| s.first).unwrap_or(1);
        for e in entries {
            if e.index != self.last_index + 1 {
                return Err(Error::Corrupt(format!(
                    "append of index {} after {}",
                    e.index, self.last_index
                )));
            }
            self.positions.push_back(Position {
                index: e.index,
                term: e.term,
                segment_first: seg_first,
                offset: self.file_len + self.buf.len() as u64,
            });
            encode_record(e, &mut self.buf);
            self.last_index = e.index;
            self.last_term = e.term;
        }
        let records = self.buf.len() as u64;
        let end = self.file_len + records;
        let mut alloc = self.alloc_len;
        if end > alloc {
            // Past the zeros: zero-fill the next stretch in the same write (see the module docs).
            alloc = (end / PREALLOC_BYTES + 1) * PREALLOC_BYTES;
            self.buf.resize((alloc - self.file_len) as usize, 0);
        }
        self.file.write_all_at(&self.buf, self.file_len)?;
        self.file.sync_data()?;
        self.file_len = end;
        self.alloc_len = alloc;
        if self.buf.capacity() > 8 << 20 {
            self.buf = Vec::with_capacity(1 << 20);
        }
        Ok(())
    }

    fn roll(&mut self) -> Result<()> {
        // The finished segment keeps its records only, so that only the last segment ever
        // holds zeros.
        if self.alloc_len > self.file_len {
            self.file.set_len(self.file_len)?;
            self.file.sync_all()?;
        }
        let first = self.last_index + 1;
        let path = self.dir.join(seg_name(first));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&path)?;
        sync_dir(&self.dir)?;
        self.file = f;
        self.file_len = 0;
        self.alloc_len = 0;
        self.segments.push(Segment { first, path });
        Ok(())
    }

    /// Delete segments whose entries are all at or below `index` (never the segment being
    /// written).
    pub fn purge_to(&mut self, index: u64) -> Result<usize> {
        let mut removed = 0;
        while self.segments.len() > 1 {
            // Segment 0 ends where segment 1 begins.
            let next_first = self.segments[1].first;
            if next_first - 1 > index {
                break;
            }
            let seg = self.segments.remove(0);
            fs::remove_file(&seg.path)?;
            while self
                .positions
                .front()
                .is_some_and(|p| p.segment_first == seg.first)
            {
                self.positions.pop_front();
            }
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Term of the entry at `index`, if the log holds it.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        let first = self.positions.front()?.index;
        if index < first {
            return None;
        }
        self.positions.get((index - first) as usize).map(|p| p.term)
    }

    /// Delete every entry at or after `index` (a Raft follower does this when its log conflicts
    /// with the leader's). Durable before returning.
    pub fn truncate_from(&mut self, index: u64) -> Result<()> {
        if index > self.last_index {
            return Ok(());
        }
        let Some(first) = self.positions.front().map(|p| p.index) else {
            return Err(Error::Corrupt(format!(
                "truncate at {index} in an empty log"
            )));
        };
        if index < first {
            return Err(Error::Corrupt(format!(
                "truncate at {index} below the first entry held ({first})"
            )));
        }
        let pos = self.positions[(index - first) as usize];
        // Drop whole segments after the one holding `index`.
        while self
            .segments
            .last()
            .is_some_and(|s| s.first > pos.segment_first)
        {
            if let Some(seg) = self.segments.pop() {
                fs::remove_file(&seg.path)?;
            }
        }
        let Some(seg) = self.segments.last() else {
            return Err(Error::Corrupt("no segment left to truncate".into()));
        };
        let mut f = OpenOptions::new().write(true).read(true).open(&seg.path)?;
        f.set_len(pos.offset)?;
        f.sync_all()?;
        sync_dir(&self.dir)?;
        self.file_len = f.seek(SeekFrom::End(0))?;
        self.alloc_len = self.file_len;
        self.file = f;
        self.positions.truncate((index - first) as usize);
        self.last_index = index - 1;
        self.last_term = self.positions.back().map(|p| p.term).unwrap_or(0);
        Ok(())
    }

    /// Drop every entry and continue the log at `next` (after a snapshot made the whole log
    /// redundant and the next entry comes from beyond its end).
    pub fn reset_to(&mut self, next: u64) -> Result<()> {
        let path = self.dir.join(seg_name(next));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&path)?;
        f.set_len(0)?;
        f.sync_all()?;
        for seg in self.segments.drain(..) {
            if seg.path != path {
                fs::remove_file(&seg.path)?;
            }
        }
        sync_dir(&self.dir)?;
        self.segments.push(Segment { first: next, path });
        self.file = f;
        self.file_len = 0;
        self.alloc_len = 0;
        self.positions.clear();
        self.last_index = next - 1;
        self.last_term = 0;
        Ok(())
    }

    /// Bytes held by all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter_map(|s| fs::metadata(&s.path).ok())
            .map(|m| m.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> Entry {
        Entry {
            index: i,
            term: 1,
            data: format!("cmd{i}").into_bytes(),
        }
    }

    /// Writes entries 1 and 2 into a new log in `dir`; where their records end.
    fn two_entries(dir: &Path) -> u64 {
        let (mut w, _) = Wal::open(dir).expect("open");
        w.append(&[entry(1), entry(2)]).expect("append");
        w.file_len
    }

    #[test]
    fn appended_entries_come_back_after_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (mut w, got) = Wal::open(dir.path()).expect("open");
            assert!(got.is_empty());
            w.append(&[entry(1), entry(2)]).expect("append");
            w.append(&[entry(3)]).expect("append");
        }
        let (w, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(got, vec![entry(1), entry(2), entry(3)]);
        assert_eq!(w.last_index(), 3);
    }

    #[test]
    fn torn_tail_is_truncated_and_log_continues() {
        let dir = tempfile::tempdir().expect("tmp");
        let len = two_entries(dir.path());
        let seg = dir.path().join(seg_name(1));
        let f = OpenOptions::new().write(true).open(&seg).expect("open seg");
        f.set_len(len - 3).expect("cut");
        let (mut w, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(got, vec![entry(1)]);
        w.append(&[entry(2)]).expect("append after truncation");
        let (_, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(got, vec![entry(1), entry(2)]);
    }

    #[test]
    fn corruption_before_a_later_segment_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (mut w, _) = Wal::open(dir.path()).expect("open");
            w.append(&[entry(1), entry(2)]).expect("append");
            w.roll().expect("roll");
            w.append(&[entry(3)]).expect("append");
        }
        let seg = dir.path().join(seg_name(1));
        let mut bytes = fs::read(&seg).expect("read");
        bytes[12] ^= 0xff; // flip a bit inside the first record's body
        fs::write(&seg, bytes).expect("write");
        match Wal::open(dir.path()) {
            Err(Error::Corrupt(msg)) => assert!(msg.contains("damaged"), "{msg}"),
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("opened a corrupted log"),
        }
    }

    #[test]
    fn truncation_drops_the_suffix_even_across_segments() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut w, _) = Wal::open(dir.path()).expect("open");
        w.append(&[entry(1), entry(2)]).expect("append");
        w.roll().expect("roll");
        w.append(&[entry(3), entry(4)]).expect("append");
        w.truncate_from(2).expect("truncate");
        assert_eq!(w.last_index(), 1);
        w.append(&[Entry {
            index: 2,
            term: 2,
            data: b"new".to_vec(),
        }])
        .expect("append");
        assert_eq!(w.term_at(2), Some(2));
        drop(w);
        let (_, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(
            got,
            vec![
                entry(1),
                Entry {
                    index: 2,
                    term: 2,
                    data: b"new".to_vec()
                }
            ]
        );
    }

    #[test]
    fn purge_removes_only_fully_applied_segments() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut w, _) = Wal::open(dir.path()).expect("open");
        w.append(&[entry(1), entry(2)]).expect("append");
        w.roll().expect("roll");
        w.append(&[entry(3), entry(4)]).expect("append");
        assert_eq!(w.purge_to(1).expect("purge"), 0);
        assert_eq!(w.purge_to(2).expect("purge"), 1);
        drop(w);
        let (_, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(got, vec![entry(3), entry(4)]);
    }

    #[test]
    fn appends_land_in_zero_filled_room_and_a_finished_segment_keeps_only_its_records() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut w, _) = Wal::open(dir.path()).expect("open");
        w.append(&[entry(1), entry(2)]).expect("append");
        let seg1 = dir.path().join(seg_name(1));
        let size = fs::metadata(&seg1).expect("meta").len();
        assert_eq!(size, PREALLOC_BYTES, "the segment is zero-filled ahead");
        let first = w.file_len;
        w.append(&[entry(3)]).expect("append");
        assert!(w.file_len > first);
        assert_eq!(
            fs::metadata(&seg1).expect("meta").len(),
            size,
            "an append that fits in the zeros does not grow the file"
        );
        // An append larger than the room left grows the zeros past it.
        let big = Entry {
            index: 4,
            term: 1,
            data: vec![7u8; PREALLOC_BYTES as usize],
        };
        w.append(std::slice::from_ref(&big)).expect("append big");
        let grown = fs::metadata(&seg1).expect("meta").len();
        assert!(
            grown > w.file_len && grown.is_multiple_of(PREALLOC_BYTES),
            "{grown}"
        );
        let records = w.file_len;
        w.roll().expect("roll");
        assert_eq!(
            fs::metadata(&seg1).expect("meta").len(),
            records,
            "a finished segment is cut to its records"
        );
        w.append(&[entry(5)]).expect("append");
        drop(w);
        let (mut w, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(
            got,
            vec![entry(1), entry(2), entry(3), big.clone(), entry(5)]
        );
        let seg5 = dir.path().join(seg_name(5));
        assert_eq!(
            fs::metadata(&seg5).expect("meta").len(),
            w.file_len,
            "open cuts the last segment back to its records"
        );
        w.append(&[entry(6)]).expect("append after reopen");
        drop(w);
        let (_, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(got.last(), Some(&entry(6)));
        assert_eq!(got.len(), 6);
    }

    #[test]
    fn a_torn_write_inside_the_zeros_is_cut_off_and_never_read_later() {
        let dir = tempfile::tempdir().expect("tmp");
        let end = two_entries(dir.path());
        let seg = dir.path().join(seg_name(1));
        // A crash left a whole record of a write that never returned behind a header that did
        // not reach the disk (zeros), and half a record right after the good ones.
        let mut lost = Vec::new();
        encode_record(&entry(4), &mut lost);
        let f = OpenOptions::new().write(true).open(&seg).expect("open seg");
        f.write_all_at(&lost, end + 64).expect("write lost record");
        let (w, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(got, vec![entry(1), entry(2)]);
        assert_eq!(fs::metadata(&seg).expect("meta").len(), end);
        drop(w);
        let mut half = Vec::new();
        encode_record(&entry(3), &mut half);
        f.write_all_at(&half[..half.len() / 2], end)
            .expect("write torn record");
        let (mut w, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(got, vec![entry(1), entry(2)]);
        // The log goes on from the good records; the bytes the crash left are gone.
        w.append(&[entry(3)]).expect("append");
        drop(w);
        let (_, got) = Wal::open(dir.path()).expect("reopen");
        assert_eq!(got, vec![entry(1), entry(2), entry(3)]);
    }
}
