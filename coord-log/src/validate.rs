//! The checks run on a command before it is proposed: what can be refused without the state
//! (empty keys, too many ops, duplicate writes in one txn branch, bad `ignore_*` combinations,
//! nesting too deep). `coordinator::state::validate` runs them and answers with its own error
//! of the same name and text.

use crate::command::{Command, KeyRange, MAX_NESTING, Op, PutReq, TxnReq};

/// Why a command is refused before proposing. Each is `coordinator::error::Error`'s variant of
/// the same name (`TooDeep` is its `InvalidArgument`), with the same text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A key is empty.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value` with a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// `ignore_lease` with a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A txn branch with more ops than allowed.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A key written twice in one txn branch.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// Transactions nested deeper than [`MAX_NESTING`].
    #[error("etcdserver: {0}")]
    TooDeep(String),
}

/// Refuse, before proposing, what can be refused without the state: empty keys, too many ops,
/// duplicate writes in one txn branch, bad ignore_* combinations.
pub fn validate(cmd: &Command, max_txn_ops: usize) -> Result<(), Invalid> {
    match cmd {
        Command::Put(p) => validate_put(p),
        Command::Delete(d) => {
            if d.range.key.is_empty() {
                return Err(Invalid::EmptyKey);
            }
            Ok(())
        }
        Command::Txn(t) => {
            validate_txn(t, max_txn_ops)?;
            Ok(())
        }
        Command::AsUser { cmd, .. } => validate(cmd, max_txn_ops),
        _ => Ok(()),
    }
}

fn validate_put(p: &PutReq) -> Result<(), Invalid> {
    if p.key.is_empty() {
        return Err(Invalid::EmptyKey);
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(Invalid::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(Invalid::LeaseProvided);
    }
    Ok(())
}

/// Validate a txn: op counts per branch, keys, no key written twice in one branch, and
/// nesting at most [`MAX_NESTING`] deep.
pub fn validate_txn(t: &TxnReq, max_txn_ops: usize) -> Result<(), Invalid> {
    validate_txn_at(t, max_txn_ops, 1)
}

fn validate_txn_at(t: &TxnReq, max_txn_ops: usize, depth: usize) -> Result<(), Invalid> {
    if depth > MAX_NESTING {
        return Err(Invalid::TooDeep(format!(
            "txn requests nested too deeply (at most {} levels)",
            MAX_NESTING
        )));
    }
    if t.compare.len() > max_txn_ops
        || t.success.len() > max_txn_ops
        || t.failure.len() > max_txn_ops
    {
        return Err(Invalid::TooManyOps);
    }
    for c in &t.compare {
        if c.range.key.is_empty() {
            return Err(Invalid::EmptyKey);
        }
    }
    for branch in [&t.success, &t.failure] {
        for op in branch.iter() {
            match op {
                Op::Range(r) => {
                    if r.range.key.is_empty() {
                        return Err(Invalid::EmptyKey);
                    }
                }
                Op::Put(p) => validate_put(p)?,
                Op::Delete(d) => {
                    if d.range.key.is_empty() {
                        return Err(Invalid::EmptyKey);
                    }
                }
                Op::Txn(inner) => validate_txn_at(inner, max_txn_ops, depth + 1)?,
            }
        }
        let mut writes = Vec::new();
        collect_writes(branch, &mut writes);
        check_no_overlap(&writes)?;
    }
    Ok(())
}

/// Every range written by a branch; nested txns contribute both of their branches (either may
/// run), as etcd counts them.
fn collect_writes(ops: &[Op], out: &mut Vec<(KeyRange, bool)>) {
    for op in ops {
        match op {
            Op::Put(p) => out.push((KeyRange::single(p.key.clone()), true)),
            Op::Delete(d) => out.push((d.range.clone(), false)),
            Op::Txn(inner) => {
                // Each nested branch is checked on its own; across the outer branch, a nested
                // branch's writes must not collide with the outer ones.
                let mut s = Vec::new();
                collect_writes(&inner.success, &mut s);
                let mut f = Vec::new();
                collect_writes(&inner.failure, &mut f);
                out.extend(dedup_union(s, f));
            }
            Op::Range(_) => {}
        }
    }
}

fn dedup_union(a: Vec<(KeyRange, bool)>, b: Vec<(KeyRange, bool)>) -> Vec<(KeyRange, bool)> {
    let mut out = a;
    for r in b {
        if !out.iter().any(|x| x.0 == r.0) {
            out.push(r);
        }
    }
    out
}

fn check_no_overlap(writes: &[(KeyRange, bool)]) -> Result<(), Invalid> {
    for (i, (a, a_put)) in writes.iter().enumerate() {
        for (b, b_put) in &writes[i + 1..] {
            // Two puts of one key, or a put inside a deleted range, are duplicates. Two deletes
            // may overlap (etcd allows it).
            if (*a_put || *b_put) && a.overlaps(b) {
                return Err(Invalid::DuplicateKey);
            }
        }
    }
    Ok(())
}
