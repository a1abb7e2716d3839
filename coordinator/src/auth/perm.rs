//! Key permissions as merged intervals, and the check of every leaf of a request against them.
//!
//! A role grants READ, WRITE or READWRITE on a key, a range `[key, range_end)` or every key from
//! `key` on (`range_end = "\0"`), exactly as etcd's `authpb.Permission`. For each user and each
//! auth revision the permissions of all its roles are merged into two sorted lists of disjoint
//! intervals (read and write, as etcd's range-permission cache does), so a check is a binary
//! search: a requested range is allowed when one merged interval covers all of it. A range that
//! is only partly covered is denied, as in etcd, even if the uncovered keys do not exist.

pub use coord_log::auth::{Perm, PermKind};

use crate::command::{Command, KeyRange, Op, PutReq, TxnReq};
use crate::error::{Error, Result};

/// A half-open interval `[lo, hi)`; `hi = None` is unbounded.
type Interval = (Vec<u8>, Option<Vec<u8>>);

/// The interval a key range names, with etcd's conventions.
fn interval(key: &[u8], end: &[u8]) -> Interval {
    if end.is_empty() {
        let mut hi = key.to_vec();
        hi.push(0);
        return (key.to_vec(), Some(hi));
    }
    if end == [0] {
        return (key.to_vec(), None);
    }
    if end <= key {
        // An empty range (etcd answers nothing); checked as the single key so that it can never
        // be wider than what it names.
        let mut hi = key.to_vec();
        hi.push(0);
        return (key.to_vec(), Some(hi));
    }
    (key.to_vec(), Some(end.to_vec()))
}

/// Disjoint, sorted intervals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntervalSet {
    items: Vec<Interval>,
}

impl IntervalSet {
    /// Merge intervals into a disjoint sorted set.
    pub fn new(mut items: Vec<Interval>) -> IntervalSet {
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<Interval> = Vec::with_capacity(items.len());
        for (lo, hi) in items {
            if let Some(last) = out.last_mut() {
                let touches = match &last.1 {
                    None => true,
                    Some(h) => lo <= *h,
                };
                if touches {
                    last.1 = match (&last.1, hi) {
                        (None, _) | (_, None) => None,
                        (Some(a), Some(b)) => Some(if *a >= b { a.clone() } else { b }),
                    };
                    continue;
                }
            }
            out.push((lo, hi));
        }
        IntervalSet { items: out }
    }

    /// Whether one interval covers all of `[lo, hi)`.
    pub fn covers(&self, lo: &[u8], hi: Option<&[u8]>) -> bool {
        // The last interval starting at or before `lo`.
        let idx = self.items.partition_point(|(l, _)| l.as_slice() <= lo);
        if idx == 0 {
            return false;
        }
        let (_, ihi) = &self.items[idx - 1];
        match (ihi, hi) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(ih), Some(h)) => h <= ih.as_slice() && lo < ih.as_slice(),
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Everything one user may do, computed once per auth revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserPerms {
    /// Holds the `root` role: everything is allowed.
    pub root: bool,
    /// Keys the user may read.
    pub read: IntervalSet,
    /// Keys the user may write.
    pub write: IntervalSet,
}

impl UserPerms {
    /// Merge the permissions of a user's roles.
    pub fn build<'a>(root: bool, perms: impl Iterator<Item = &'a Perm>) -> UserPerms {
        let mut read = Vec::new();
        let mut write = Vec::new();
        for p in perms {
            let iv = interval(&p.key, &p.end);
            if p.kind.reads() {
                read.push(iv.clone());
            }
            if p.kind.writes() {
                write.push(iv);
            }
        }
        UserPerms {
            root,
            read: IntervalSet::new(read),
            write: IntervalSet::new(write),
        }
    }

    fn allowed(&self, set: &IntervalSet, r: &KeyRange) -> Result<()> {
        if self.root {
            return Ok(());
        }
        let (lo, hi) = interval(&r.key, &r.end);
        if set.covers(&lo, hi.as_deref()) {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }

    /// Read permission on a range.
    pub fn read(&self, r: &KeyRange) -> Result<()> {
        self.allowed(&self.read, r)
    }

    /// Write permission on a range.
    pub fn write(&self, r: &KeyRange) -> Result<()> {
        self.allowed(&self.write, r)
    }

    /// Read permission on one key.
    pub fn read_key(&self, k: &[u8]) -> Result<()> {
        self.read(&KeyRange::single(k.to_vec()))
    }

    /// Write permission on one key.
    pub fn write_key(&self, k: &[u8]) -> Result<()> {
        self.write(&KeyRange::single(k.to_vec()))
    }

    /// Root only.
    pub fn root(&self) -> Result<()> {
        if self.root {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }

    /// A put: write on the key, read too with `prev_kv`; with a lease, write on every key the
    /// lease holds already (`lease_keys`, as etcd's `checkLeasePuts`).
    pub fn put(&self, p: &PutReq, lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>) -> Result<()> {
        self.write_key(&p.key)?;
        if p.prev_kv {
            self.read_key(&p.key)?;
        }
        if p.lease != 0 && !self.root {
            for k in lease_keys(p.lease) {
                self.write_key(&k)?;
            }
        }
        Ok(())
    }

    /// A txn: every compare (read), every op of *both* branches, nested txns included, whichever
    /// branch would run (etcd checks them all, so the outcome of a compare cannot leak).
    pub fn txn(&self, t: &TxnReq, lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>) -> Result<()> {
        if self.root {
            return Ok(());
        }
        for c in &t.compare {
            self.read(&c.range)?;
        }
        for op in t.success.iter().chain(t.failure.iter()) {
            match op {
                Op::Range(r) => self.read(&r.range)?,
                Op::Put(p) => self.put(p, lease_keys)?,
                Op::Delete(d) => {
                    self.write(&d.range)?;
                    if d.prev_kv {
                        self.read(&d.range)?;
                    }
                }
                Op::Txn(inner) => self.txn(inner, lease_keys)?,
            }
        }
        Ok(())
    }

    /// A replicated command issued on behalf of this user (checked again when applied, so a
    /// permission revoked between the check at the door and the apply still holds).
    pub fn command(&self, cmd: &Command, lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>) -> Result<()> {
        if self.root {
            return Ok(());
        }
        match cmd {
            Command::Put(p) => self.put(p, lease_keys),
            Command::Delete(d) => {
                self.write(&d.range)?;
                if d.prev_kv {
                    self.read(&d.range)?;
                }
                Ok(())
            }
            Command::Txn(t) => self.txn(t, lease_keys),
            Command::LeaseRevoke { id } => {
                for k in lease_keys(*id) {
                    self.write_key(&k)?;
                }
                Ok(())
            }
            // Any authenticated user may grant a lease.
            Command::LeaseGrant { .. } | Command::Noop => Ok(()),
            Command::Compact { .. }
            | Command::MemberAttrs { .. }
            | Command::Auth(_)
            | Command::AsUser { .. }
            | Command::Batch(_) => Err(Error::PermissionDenied),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(kind: PermKind, k: &str, e: &str) -> Perm {
        Perm {
            kind,
            key: k.as_bytes().to_vec(),
            end: e.as_bytes().to_vec(),
        }
    }

    fn kr(k: &str, e: &str) -> KeyRange {
        KeyRange {
            key: k.as_bytes().to_vec(),
            end: e.as_bytes().to_vec(),
        }
    }

    #[test]
    fn merged_intervals_cover_only_what_was_granted() {
        let perms = [
            perm(PermKind::ReadWrite, "a/", "a0"),
            perm(PermKind::Read, "b", ""),
            perm(PermKind::Read, "a0", "a5"),
            perm(PermKind::Write, "z", "\0"),
        ];
        let u = UserPerms::build(false, perms.iter());
        // Prefix a/ joined with [a0, a5): one interval [a/, a5).
        u.read(&kr("a/x", "a3"))
            .expect("covered by the merged interval");
        u.read(&kr("a/", "a0")).expect("the prefix itself");
        assert!(u.read(&kr("a/", "a6")).is_err(), "past the end");
        assert!(u.write(&kr("a0", "")).is_err(), "a0 is read-only");
        u.write(&kr("a/k", "")).expect("inside the prefix");
        u.read(&kr("b", "")).expect("single key");
        assert!(
            u.read(&kr("b", "c")).is_err(),
            "a range from the single key"
        );
        assert!(u.read(&kr("ba", "")).is_err());
        u.write(&kr("zz", "\0")).expect("from-key inside from-key");
        assert!(u.read(&kr("zz", "")).is_err(), "write-only");
        assert!(u.write(&kr("y", "\0")).is_err(), "from-key starting before");
        assert!(u.read(&kr("\0", "\0")).is_err(), "everything");
        let root = UserPerms::build(true, [].iter());
        root.read(&kr("\0", "\0")).expect("root reads everything");
    }

    #[test]
    fn txn_checks_compares_and_both_branches_recursively() {
        use crate::command::{Compare, CompareResult, CompareTarget, DeleteReq, RangeReq};
        let u = UserPerms::build(false, [perm(PermKind::ReadWrite, "p/", "p0")].iter());
        let none = |_: i64| Vec::new();
        let put = |k: &str| {
            Op::Put(PutReq {
                key: k.into(),
                ..Default::default()
            })
        };
        let inside = TxnReq {
            compare: vec![Compare {
                range: kr("p/a", ""),
                result: CompareResult::Equal,
                target: CompareTarget::Version(0),
            }],
            success: vec![put("p/a")],
            failure: vec![Op::Range(RangeReq {
                range: kr("p/", "p0"),
                ..Default::default()
            })],
        };
        u.txn(&inside, &none).expect("all inside");
        let mut outside_compare = inside.clone();
        outside_compare.compare[0].range = kr("q", "");
        assert!(u.txn(&outside_compare, &none).is_err());
        let mut outside_failure = inside.clone();
        outside_failure.failure.push(Op::Delete(DeleteReq {
            range: kr("q", ""),
            prev_kv: false,
        }));
        assert!(u.txn(&outside_failure, &none).is_err());
        let mut nested = inside.clone();
        nested.success.push(Op::Txn(TxnReq {
            compare: vec![],
            success: vec![],
            failure: vec![put("q")],
        }));
        assert!(u.txn(&nested, &none).is_err());
        // A lease that already holds a key outside the prefix.
        let lease = TxnReq {
            compare: vec![],
            success: vec![Op::Put(PutReq {
                key: b"p/x".to_vec(),
                lease: 7,
                ..Default::default()
            })],
            failure: vec![],
        };
        let holds_q = |_: i64| vec![b"q".to_vec()];
        assert!(u.txn(&lease, &holds_q).is_err());
        u.txn(&lease, &none).expect("an empty lease");
    }
}
