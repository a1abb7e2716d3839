//! The framing of a log record, which both the single-member WAL (`coordinator::wal`) and the
//! Raft log store read back at start-up: `[len: u32 LE][crc32 of body: u32 LE][body]`, body =
//! `[index: u64 LE][term: u64 LE][data]`.

use std::io::Read;

/// Largest record accepted on read (guards against garbage lengths).
const MAX_RECORD: u32 = 64 * 1024 * 1024;

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log (1-based, contiguous).
    pub index: u64,
    /// Term it was written in.
    pub term: u64,
    /// Encoded command.
    pub data: Vec<u8>,
}

/// What reading one segment found.
#[derive(Debug)]
pub struct Scan {
    /// Every good record, with its byte offset.
    pub entries: Vec<(u64, Entry)>,
    /// Byte offset after the last good record.
    pub good_len: u64,
    /// Whether bytes after `good_len` failed to parse.
    pub bad_tail: bool,
}

/// Appends `e` to `out` as one record (`[len][crc][index][term][data]`).
pub fn encode_record(e: &Entry, out: &mut Vec<u8>) {
    let len = (16 + e.data.len()) as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&e.index.to_le_bytes());
    out.extend_from_slice(&e.term.to_le_bytes());
    out.extend_from_slice(&e.data);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads the records of a segment of `total` bytes from `r`: every good one up to the first
/// that is cut short, too long, or fails its CRC. Never reads a length it was not given, and
/// allocates at most one record's body (bounded by `MAX_RECORD` and by `total`) at a time.
pub fn scan_records(mut r: impl Read, total: u64) -> Scan {
    let mut entries = Vec::new();
    let mut pos = 0u64;
    let bad = |entries, pos| Scan {
        entries,
        good_len: pos,
        bad_tail: true,
    };
    loop {
        if pos == total {
            return Scan {
                entries,
                good_len: pos,
                bad_tail: false,
            };
        }
        let mut hdr = [0u8; 8];
        if total - pos < 8 || r.read_exact(&mut hdr).is_err() {
            return bad(entries, pos);
        }
        let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let crc = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        if !(16..=MAX_RECORD).contains(&len) || u64::from(len) > total - pos - 8 {
            return bad(entries, pos);
        }
        let mut body = vec![0u8; len as usize];
        if r.read_exact(&mut body).is_err() || crc32fast::hash(&body) != crc {
            return bad(entries, pos);
        }
        let (head, data) = body.split_at(16);
        let (index, term) = head.split_at(8);
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        entries.push((
            pos,
            Entry {
                index: word(index),
                term: word(term),
                data: data.to_vec(),
            },
        ));
        pos += 8 + u64::from(len);
    }
}
