//! Revision records packed into buckets: how [`super::SledBackend`] stores the `r` records.
//!
//! The MVCC layer writes one record per revision under a 17-byte key (see [`super::keys`]).
//! Stored one sled entry each, every record costs sled a tree descent, a copy of the leaf's
//! key and value vectors and a log fragment when it is written back, and again when compaction
//! deletes it: on a follower under puts that was a quarter of its CPU. So small records of
//! nearby revisions share one sled entry, a *bucket*:
//!
//! - the bucket of main revision `m` is `m / 16`, stored under [`BUCKET`] (`R`) + that number
//!   (BE u64); sled sorts buckets, as it sorts records, by revision;
//! - a record goes into its bucket if its sub revision is below [`PACKED_SUBS`] and it encodes
//!   to at most [`MAX_PACKED_RECORD`] bytes; any other record stays a sled entry of its own
//!   under its 17-byte key. Both limits are fixed, so where a record lives follows from the
//!   record alone, and a bucket holds at most 16 × 4 records of ≤ 512 bytes (≤ 33 KiB): a sled
//!   leaf of buckets stays far below the size at which sled 0.34 writes a node as a blob file of
//!   its own (a quarter of a segment, 128 KiB), and reading one revision stays one sled `get`
//!   and a search among at most 64 entries;
//! - a database written before buckets existed has every record under its 17-byte key, which
//!   stays readable as it is: reads look in the bucket first and then for the record's own
//!   entry, scans merge both, deletes remove both. Nothing is rewritten at open.
//!
//! The encoding of a bucket, in order: a format byte ([`FORMAT`]), the entry count (u16 LE),
//! per entry its main revision's offset in the bucket (u8), its sub revision (u8) and its
//! length (u16 LE), sorted by revision; then the records' bytes, concatenated in that order.

use crate::error::{Error, Result};

use super::keys::{REV, Revision, rev_key};

/// Prefix of buckets in sled. Never a logical key's prefix (those are `r`, `l`, `m`, `a`).
pub const BUCKET: u8 = b'R';
/// Main revisions per bucket.
pub const MAINS_PER_BUCKET: u64 = 16;
/// Records with a sub revision below this go into buckets.
pub const PACKED_SUBS: u64 = 4;
/// Records larger than this (encoded) keep a sled entry of their own.
pub const MAX_PACKED_RECORD: usize = 512;
/// The bucket encoding's format byte.
pub const FORMAT: u8 = 1;

const ENTRY: usize = 4;
const HEAD: usize = 3;

/// A record's place inside its bucket: main revision's offset, sub revision. Sorts as the
/// revisions do.
pub type Slot = (u8, u8);

/// The sled key of a bucket.
pub type BucketKey = [u8; 9];

/// The bucket and slot that a revision record of key `key` (17 bytes, `r` + main + sub) would
/// have, or `None` for any other key and for sub revisions that are never packed.
pub fn slot_of(key: &[u8]) -> Option<(BucketKey, Slot)> {
    if key.len() != 17 || key[0] != REV {
        return None;
    }
    let main = be_u64(&key[1..9]);
    let sub = be_u64(&key[9..17]);
    if sub >= PACKED_SUBS {
        return None;
    }
    Some((
        bucket_key(main / MAINS_PER_BUCKET),
        ((main % MAINS_PER_BUCKET) as u8, sub as u8),
    ))
}

/// Whether a record of `len` encoded bytes goes into its bucket (given [`slot_of`] found one).
pub fn packs(len: usize) -> bool {
    len <= MAX_PACKED_RECORD
}

/// The sled key of bucket number `n`.
pub fn bucket_key(n: u64) -> BucketKey {
    let mut k = [0u8; 9];
    k[0] = BUCKET;
    k[1..9].copy_from_slice(&n.to_be_bytes());
    k
}

/// The logical (17-byte) key of the record in `slot` of the bucket stored under `bucket`.
pub fn record_key(bucket: &[u8], slot: Slot) -> Result<[u8; 17]> {
    if bucket.len() != 9 || bucket[0] != BUCKET {
        return Err(Error::Corrupt(format!(
            "bad bucket key of {} bytes",
            bucket.len()
        )));
    }
    let main = be_u64(&bucket[1..9]) * MAINS_PER_BUCKET + u64::from(slot.0);
    Ok(rev_key(Revision {
        main: main as i64,
        sub: i64::from(slot.1),
    }))
}

/// The range of bucket keys `[lo, hi)` that may hold records with logical keys in
/// `[from, to)`, or `None` if that range holds no revision record.
pub fn bucket_range(from: &[u8], to: &[u8]) -> Option<(BucketKey, Option<BucketKey>)> {
    let rev_end = [REV + 1];
    if from >= &rev_end[..] || to <= &[REV][..] || from >= to {
        return None;
    }
    let lo = if from < &[REV][..] {
        0
    } else {
        padded_main(from) / MAINS_PER_BUCKET
    };
    let hi = if to >= &rev_end[..] {
        None
    } else {
        // The bucket of `to`'s main revision may still hold records below `to`.
        (padded_main(to) / MAINS_PER_BUCKET)
            .checked_add(1)
            .map(bucket_key)
    };
    Some((bucket_key(lo), hi))
}

/// The main revision in bytes 1..9 of a key starting with `r`, missing bytes read as zero.
fn padded_main(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().saturating_sub(1).min(8);
    b[..n].copy_from_slice(&k[1..1 + n]);
    u64::from_be_bytes(b)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

/// Walks an encoded bucket's entry table: each record's slot and byte range, in order, each
/// checked to lie inside the bucket.
struct Records<'a> {
    bucket: &'a [u8],
    table: std::slice::ChunksExact<'a, u8>,
    /// Where the next record starts.
    at: usize,
}

impl<'a> Records<'a> {
    fn of(bucket: &'a [u8]) -> Result<Records<'a>> {
        if bucket.len() < HEAD || bucket[0] != FORMAT {
            return Err(corrupt(bucket, "unknown format"));
        }
        let n = usize::from(u16::from_le_bytes([bucket[1], bucket[2]]));
        let at = HEAD + n * ENTRY;
        let table = bucket
            .get(HEAD..at)
            .ok_or_else(|| corrupt(bucket, "entry table overruns it"))?;
        Ok(Records {
            bucket,
            table: table.chunks_exact(ENTRY),
            at,
        })
    }
}

impl Iterator for Records<'_> {
    type Item = Result<(Slot, std::ops::Range<usize>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let e = self.table.next()?;
        let len = usize::from(u16::from_le_bytes([e[2], e[3]]));
        let range = self.at..self.at + len;
        if self.bucket.len() < range.end {
            return Some(Err(corrupt(self.bucket, "a record overruns it")));
        }
        self.at = range.end;
        Some(Ok(((e[0], e[1]), range)))
    }
}

fn corrupt(bucket: &[u8], what: &str) -> Error {
    Error::Corrupt(format!("bucket of {} bytes: {what}", bucket.len()))
}

/// The entries of an encoded bucket: each slot with the byte range of its record, in order.
pub fn entries(bucket: &[u8]) -> Result<Vec<(Slot, std::ops::Range<usize>)>> {
    let mut records = Records::of(bucket)?;
    let out = records.by_ref().collect::<Result<Vec<_>>>()?;
    if records.at != bucket.len() {
        return Err(corrupt(bucket, "bytes left after the last record"));
    }
    Ok(out)
}

/// The record in `slot` of an encoded bucket, if there is one. (Walks the entry table
/// without collecting it: this is every read of a packed record.)
pub fn find(bucket: &[u8], slot: Slot) -> Result<Option<&[u8]>> {
    for record in Records::of(bucket)? {
        let (s, range) = record?;
        if s == slot {
            return Ok(Some(&bucket[range]));
        }
        if s > slot {
            break;
        }
    }
    Ok(None)
}

/// Encode a bucket from its records, which must come sorted by slot, each at most
/// [`MAX_PACKED_RECORD`] bytes (at most 64 of them: [`MAINS_PER_BUCKET`] × [`PACKED_SUBS`]).
pub fn encode(records: &[(Slot, &[u8])]) -> Vec<u8> {
    let body: usize = records.iter().map(|(_, r)| r.len()).sum();
    let mut out = Vec::with_capacity(HEAD + records.len() * ENTRY + body);
    out.push(FORMAT);
    out.extend_from_slice(&(records.len() as u16).to_le_bytes());
    for (slot, r) in records {
        debug_assert!(packs(r.len()));
        out.extend_from_slice(&[slot.0, slot.1]);
        out.extend_from_slice(&(r.len() as u16).to_le_bytes());
    }
    for (_, r) in records {
        out.extend_from_slice(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::keys::parse_rev_key;

    fn rk(main: i64, sub: i64) -> [u8; 17] {
        rev_key(Revision { main, sub })
    }

    #[test]
    fn a_bucket_roundtrips_its_records_and_finds_each_one() {
        let recs: Vec<(Slot, Vec<u8>)> = vec![
            ((0, 0), b"first".to_vec()),
            ((0, 3), Vec::new()),
            ((7, 1), vec![9; MAX_PACKED_RECORD]),
            ((15, 0), b"last".to_vec()),
        ];
        let borrowed: Vec<(Slot, &[u8])> = recs.iter().map(|(s, r)| (*s, r.as_slice())).collect();
        let b = encode(&borrowed);
        let got: Vec<(Slot, &[u8])> = entries(&b)
            .expect("entries")
            .into_iter()
            .map(|(s, r)| (s, &b[r]))
            .collect();
        assert_eq!(got, borrowed);
        for (slot, r) in &borrowed {
            assert_eq!(find(&b, *slot).expect("find"), Some(*r));
        }
        assert_eq!(find(&b, (0, 1)).expect("find"), None);
        assert_eq!(entries(&encode(&[])).expect("empty"), vec![]);
    }

    #[test]
    fn a_damaged_bucket_is_reported_as_corrupt_not_misread() {
        let b = encode(&[((1, 0), b"abc"), ((2, 0), b"de")]);
        for cut in 0..b.len() {
            assert!(entries(&b[..cut]).is_err(), "cut at {cut}");
            assert!(find(&b[..cut], (2, 0)).is_err(), "cut at {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(entries(&longer).is_err());
        let mut other = b.clone();
        other[0] = FORMAT + 1;
        assert!(entries(&other).is_err());
    }

    #[test]
    fn records_map_to_buckets_and_back_by_revision() {
        let (bk, slot) = slot_of(&rk(35, 2)).expect("packed");
        assert_eq!(bk, bucket_key(2));
        assert_eq!(slot, (3, 2));
        let back = record_key(&bk, slot).expect("key");
        assert_eq!(
            parse_rev_key(&back).expect("rev"),
            Revision { main: 35, sub: 2 }
        );
        assert_eq!(
            slot_of(&rk(35, PACKED_SUBS as i64)),
            None,
            "high subs stay apart"
        );
        assert_eq!(slot_of(b"mcurrent_rev"), None);
        assert_eq!(slot_of(&rk(35, 0)[..16]), None);
        // Slots sort as revisions do, and buckets as their first revisions.
        let slot = |main, sub| slot_of(&rk(main, sub)).expect("packed");
        assert!(slot(33, 3).1 < slot(34, 0).1);
        assert!(slot(47, 0).0 < slot(48, 0).0);
    }

    #[test]
    fn the_bucket_range_covers_every_record_of_a_key_range_and_no_more_buckets() {
        let all = bucket_range(&[REV], &[REV + 1]).expect("all");
        assert_eq!(all, (bucket_key(0), None));
        assert_eq!(bucket_range(&[0], &[0xff]), Some((bucket_key(0), None)));
        assert_eq!(bucket_range(b"a", b"m"), None, "no revision records there");
        assert_eq!(bucket_range(&[REV + 1], &[0xff]), None);
        // Revisions 20..=40 live in buckets 1 and 2.
        let (lo, hi) = bucket_range(&rk(20, 0), &rk(40, 1)).expect("some");
        assert_eq!((lo, hi), (bucket_key(1), Some(bucket_key(3))));
        // A bound of a main revision alone (9 bytes) or of the prefix alone.
        let (lo, hi) = bucket_range(&[REV], &rk(32, 0)[..9]).expect("some");
        assert_eq!((lo, hi), (bucket_key(0), Some(bucket_key(3))));
        assert_eq!(bucket_range(&rk(5, 0), &rk(5, 0)), None, "empty range");
    }
}
