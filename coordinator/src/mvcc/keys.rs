//! Layout of the key space inside the backend, and the record encoding.
//!
//! One ordered map, four prefixes:
//!
//! | prefix | key                              | value                                   |
//! |--------|----------------------------------|-----------------------------------------|
//! | `r`    | main revision (BE u64) + sub (BE u64) | a [`Record`]: one put or tombstone  |
//! | `l`    | lease ID (BE u64)                | granted TTL (LE i64)                    |
//! | `m`    | meta name                        | LE i64 / u64 (applied index, revision…) |
//! | `a`    | `ameta`, `au/<user>`, `ar/<role>` | auth state (bincode; see [`crate::auth::store`]) |
//!
//! Records are keyed by revision, as in etcd's bolt layout, so replaying history for a watcher
//! is a forward scan, and the in-memory index (in [`super::store`]) maps user keys to revisions.
//! This is the logical layout, the one the MVCC layer reads and writes; the sled backend stores
//! small records packed several to a sled entry ([`super::packed`]).

use crate::error::{Error, Result};

/// Prefix of revision records.
pub const REV: u8 = b'r';
/// Prefix of lease records.
pub const LEASE: u8 = b'l';
/// Prefix of meta values.
pub const META: u8 = b'm';
/// Prefix of the auth state (users, roles, the auth switch).
pub const AUTH: u8 = b'a';

/// Meta: index of the last applied log entry.
pub const META_APPLIED: &[u8] = b"mapplied_index";
/// Meta: current revision.
pub const META_REVISION: &[u8] = b"mcurrent_rev";
/// Meta: compacted revision.
pub const META_COMPACT: &[u8] = b"mcompact_rev";
/// Meta: term of the last applied entry.
pub const META_TERM: &[u8] = b"mterm";
/// Meta: cluster identity (cluster id, member id), written once at first start.
pub const META_CLUSTER_ID: &[u8] = b"mcluster_id";
/// Meta: this member's id.
pub const META_MEMBER_ID: &[u8] = b"mmember_id";

/// A revision: the main revision (one per write transaction) and the sub revision (one per write
/// inside that transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    /// Global revision.
    pub main: i64,
    /// Position inside the transaction.
    pub sub: i64,
}

/// The backend key of a revision record.
pub fn rev_key(rev: Revision) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = REV;
    k[1..9].copy_from_slice(&(rev.main as u64).to_be_bytes());
    k[9..17].copy_from_slice(&(rev.sub as u64).to_be_bytes());
    k
}

/// Decode a backend key made by [`rev_key`].
pub fn parse_rev_key(k: &[u8]) -> Result<Revision> {
    if k.len() != 17 || k[0] != REV {
        return Err(Error::Corrupt(format!(
            "bad revision key of {} bytes",
            k.len()
        )));
    }
    let main = u64::from_be_bytes(arr8(&k[1..9])) as i64;
    let sub = u64::from_be_bytes(arr8(&k[9..17])) as i64;
    Ok(Revision { main, sub })
}

/// The backend key of a lease record.
pub fn lease_key(id: i64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LEASE;
    k[1..9].copy_from_slice(&(id as u64).to_be_bytes());
    k
}

/// Decode a lease key.
pub fn parse_lease_key(k: &[u8]) -> Result<i64> {
    if k.len() != 9 || k[0] != LEASE {
        return Err(Error::Corrupt("bad lease key".into()));
    }
    Ok(u64::from_be_bytes(arr8(&k[1..9])) as i64)
}

fn arr8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    a
}

/// Decode an i64 stored little-endian.
pub fn decode_i64(v: &[u8]) -> Result<i64> {
    if v.len() != 8 {
        return Err(Error::Corrupt(format!("bad integer of {} bytes", v.len())));
    }
    Ok(i64::from_le_bytes(arr8(v)))
}

/// One version of one key, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Whether this version is a deletion.
    pub tombstone: bool,
    /// User key.
    pub key: Vec<u8>,
    /// Create revision (0 for tombstones).
    pub create: i64,
    /// Version (0 for tombstones).
    pub version: i64,
    /// Lease (0 = none).
    pub lease: i64,
    /// Value (empty for tombstones).
    pub value: Vec<u8>,
}

const HEADER: usize = 1 + 8 + 8 + 8 + 4;

impl Record {
    /// Encode to bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.key.len() + self.value.len());
        out.push(u8::from(self.tombstone));
        out.extend_from_slice(&self.create.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.lease.to_le_bytes());
        out.extend_from_slice(&(self.key.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.value);
        out
    }

    /// Decode from bytes made by [`Record::encode`].
    pub fn decode(b: &[u8]) -> Result<Record> {
        if b.len() < HEADER {
            return Err(Error::Corrupt(format!(
                "record of {} bytes is too short",
                b.len()
            )));
        }
        let tombstone = b[0] != 0;
        let create = i64::from_le_bytes(arr8(&b[1..9]));
        let version = i64::from_le_bytes(arr8(&b[9..17]));
        let lease = i64::from_le_bytes(arr8(&b[17..25]));
        let mut kl = [0u8; 4];
        kl.copy_from_slice(&b[25..29]);
        let klen = u32::from_le_bytes(kl) as usize;
        if b.len() < HEADER + klen {
            return Err(Error::Corrupt("record key overruns the record".into()));
        }
        let key = b[HEADER..HEADER + klen].to_vec();
        let value = b[HEADER + klen..].to_vec();
        Ok(Record {
            tombstone,
            key,
            create,
            version,
            lease,
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrips_and_rejects_truncation() {
        let r = Record {
            tombstone: false,
            key: b"k".to_vec(),
            create: 3,
            version: 2,
            lease: 7,
            value: b"v".to_vec(),
        };
        let e = r.encode();
        assert_eq!(Record::decode(&e).expect("decode"), r);
        assert!(Record::decode(&e[..10]).is_err());
    }

    #[test]
    fn revision_keys_sort_by_revision() {
        let a = rev_key(Revision { main: 2, sub: 5 });
        let b = rev_key(Revision { main: 10, sub: 0 });
        assert!(a < b);
        assert_eq!(
            parse_rev_key(&b).expect("parse"),
            Revision { main: 10, sub: 0 }
        );
    }
}
