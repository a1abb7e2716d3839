//! The coordinator's log record framing (`coord-log`'s `record.rs`:
//! `[len][crc32][index][term][data]`), which both the single-member WAL and the Raft log store
//! read back at start-up.
//!
//! Input: bytes, used twice. Properties checked:
//! - as a segment file: scanning never panics; it accepts a prefix of the bytes that is exactly
//!   the good records re-encoded, and reports a bad tail iff bytes remain after it;
//! - as entries (the bytes cut into pieces): encoded records scan back to the same entries;
//!   the log cut anywhere inside a record yields exactly the records before the cut and a bad
//!   tail; one byte altered yields the records before the altered one, never a misread record.

#![no_main]

use coord_log::record::{Entry, encode_record, scan_records};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // 1. Arbitrary bytes as a segment.
    let scan = scan_records(data, data.len() as u64);
    assert!(scan.good_len <= data.len() as u64);
    assert_eq!(scan.bad_tail, scan.good_len != data.len() as u64);
    let mut again = Vec::new();
    for (offset, e) in &scan.entries {
        assert_eq!(
            *offset,
            again.len() as u64,
            "offsets are where records start"
        );
        encode_record(e, &mut again);
    }
    assert_eq!(again.as_slice(), &data[..scan.good_len as usize]);

    // 2. Entries made from the bytes: each piece up to a 0xff byte is one entry's data.
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let entries: Vec<Entry> = rest
        .split(|b| *b == 0xff)
        .enumerate()
        .map(|(i, piece)| Entry {
            index: i as u64 + 1,
            term: u64::from(knob),
            data: piece.to_vec(),
        })
        .collect();
    let mut log = Vec::new();
    let mut starts = Vec::new();
    for e in &entries {
        starts.push(log.len());
        encode_record(e, &mut log);
    }
    let scan = scan_records(log.as_slice(), log.len() as u64);
    assert!(!scan.bad_tail);
    let read: Vec<Entry> = scan.entries.into_iter().map(|(_, e)| e).collect();
    assert_eq!(read, entries, "records do not read back as written");

    // Cut short inside a record (never on a record boundary).
    let cut = (usize::from(knob) * 7919 + rest.len()) % log.len();
    let whole = starts.iter().take_while(|s| **s + 8 + 16 <= cut).count();
    let complete = starts.partition_point(|s| *s < cut);
    if !starts.contains(&cut) {
        let scan = scan_records(&log[..cut], cut as u64);
        assert!(scan.bad_tail, "a log cut at {cut} is not reported torn");
        let got: Vec<&Entry> = scan.entries.iter().map(|(_, e)| e).collect();
        assert_eq!(
            got.len(),
            complete - 1,
            "cut at {cut}: wrong number of records"
        );
        assert!(got.iter().zip(&entries).all(|(a, b)| *a == b));
        let _ = whole;
    }

    // One byte altered.
    let at = (usize::from(knob) * 104_729 + rest.len() * 31) % log.len();
    let mut bad = log.clone();
    bad[at] ^= knob | 1;
    let victim = starts.partition_point(|s| *s <= at) - 1;
    let scan = scan_records(bad.as_slice(), bad.len() as u64);
    let got: Vec<&Entry> = scan.entries.iter().map(|(_, e)| e).collect();
    assert!(scan.bad_tail, "a damaged log is not reported damaged");
    assert_eq!(
        got.len(),
        victim,
        "byte {at} altered: records after the damaged one were read"
    );
    assert!(got.iter().zip(&entries).all(|(a, b)| *a == b));
});
