//! Key-value calls: get, prefix range, put, delete, and transactions.

use proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::request_op::Request as Op;
use proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse,
    RequestOp, TxnRequest, TxnResponse,
};

use crate::{Client, Idempotence, Result};

/// A stored key with its revisions (etcd's `mvccpb.KeyValue`).
pub use proto::mvccpb::KeyValue;

/// The end of the range holding every key that starts with `prefix` (etcd's prefix rule: the
/// prefix with its last byte below 0xff incremented; `"\0"` if there is none).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The keys a range read found, and the revision the read reflects.
#[derive(Debug, Clone, Default)]
pub struct RangeResult {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// The store's revision when the read was served.
    pub revision: i64,
}

fn revision_of(header: Option<&proto::etcdserverpb::ResponseHeader>) -> i64 {
    header.map(|h| h.revision).unwrap_or_default()
}

impl Client {
    /// A raw Range (retried: it is a read).
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        self.call("Range", Idempotence::Safe, |ch| {
            let req = req.clone();
            async move {
                KvClient::new(ch)
                    .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                    .range(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// The value of `key`, if any, and the revision the read reflects.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<(Option<KeyValue>, i64)> {
        let resp = self
            .range(RangeRequest {
                key: key.into(),
                ..Default::default()
            })
            .await?;
        let revision = revision_of(resp.header.as_ref());
        Ok((resp.kvs.into_iter().next(), revision))
    }

    /// Every key starting with `prefix`, and the revision the read reflects.
    pub async fn get_prefix(&self, prefix: impl Into<Vec<u8>>) -> Result<RangeResult> {
        let key = prefix.into();
        let resp = self
            .range(RangeRequest {
                range_end: prefix_end(&key),
                key,
                ..Default::default()
            })
            .await?;
        Ok(RangeResult {
            revision: revision_of(resp.header.as_ref()),
            kvs: resp.kvs,
        })
    }

    /// Every key starting with `prefix`, keys only (no values), for listings.
    pub async fn keys_with_prefix(&self, prefix: impl Into<Vec<u8>>) -> Result<RangeResult> {
        let key = prefix.into();
        let resp = self
            .range(RangeRequest {
                range_end: prefix_end(&key),
                key,
                keys_only: true,
                ..Default::default()
            })
            .await?;
        Ok(RangeResult {
            revision: revision_of(resp.header.as_ref()),
            kvs: resp.kvs,
        })
    }

    /// Puts `key = value` (bound to `lease` unless it is 0); returns the new revision.
    ///
    /// Not retried after a failure that may have reached the server (see the crate docs): such a
    /// failure is returned as [`crate::Error::Uncertain`].
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<i64> {
        let req = PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..Default::default()
        };
        self.call("Put", Idempotence::Unsafe, |ch| {
            let req = req.clone();
            async move {
                KvClient::new(ch)
                    .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                    .put(req)
                    .await
                    .map(|r| revision_of(r.get_ref().header.as_ref()))
            }
        })
        .await
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1) and the revision. Retried.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<(i64, i64)> {
        self.delete_range(key.into(), Vec::new()).await
    }

    /// Deletes every key starting with `prefix`; returns how many and the revision. Retried.
    pub async fn delete_prefix(&self, prefix: impl Into<Vec<u8>>) -> Result<(i64, i64)> {
        let key = prefix.into();
        let end = prefix_end(&key);
        self.delete_range(key, end).await
    }

    async fn delete_range(&self, key: Vec<u8>, range_end: Vec<u8>) -> Result<(i64, i64)> {
        let req = DeleteRangeRequest {
            key,
            range_end,
            ..Default::default()
        };
        self.call("DeleteRange", Idempotence::Safe, |ch| {
            let req = req.clone();
            async move {
                KvClient::new(ch)
                    .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                    .delete_range(req)
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        (r.deleted, revision_of(r.header.as_ref()))
                    })
            }
        })
        .await
    }

    /// A transaction, not retried after a failure that may have reached the server.
    pub async fn txn(&self, txn: impl Into<TxnRequest>) -> Result<TxnResponse> {
        self.txn_with(txn.into(), Idempotence::Unsafe).await
    }

    /// A transaction whose compares make a second application fail (for example "create only
    /// if `create_revision == 0`", or "only if `mod_revision == n`"), so it is retried like a
    /// read. The caller asserts the guard; a retried guarded txn that was applied the first time
    /// answers `succeeded = false`, and the caller must read to tell "I won" from "someone else
    /// did".
    pub async fn txn_guarded(&self, txn: impl Into<TxnRequest>) -> Result<TxnResponse> {
        self.txn_with(txn.into(), Idempotence::Safe).await
    }

    async fn txn_with(&self, req: TxnRequest, idempotence: Idempotence) -> Result<TxnResponse> {
        self.call("Txn", idempotence, |ch| {
            let req = req.clone();
            async move {
                KvClient::new(ch)
                    .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                    .txn(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Compacts the history up to `revision` (retried: compacting twice is harmless, although
    /// the retry may answer "compacted").
    pub async fn compact(&self, revision: i64) -> Result<()> {
        let req = CompactionRequest {
            revision,
            physical: true,
        };
        self.call("Compact", Idempotence::Safe, |ch| async move {
            KvClient::new(ch)
                .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                .compact(req)
                .await
                .map(|_| ())
        })
        .await
    }
}

/// A small builder for transactions: compares, then the ops to run if all hold, else the others.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    req: TxnRequest,
}

impl Txn {
    /// An empty transaction (no compares: the success branch runs).
    pub fn new() -> Txn {
        Txn::default()
    }

    fn compare(mut self, key: Vec<u8>, target: CompareTarget, value: TargetUnion) -> Txn {
        self.req.compare.push(Compare {
            result: CompareResult::Equal as i32,
            target: target as i32,
            key,
            target_union: Some(value),
            range_end: Vec::new(),
        });
        self
    }

    /// Only if `key` does not exist (its create revision is 0).
    pub fn if_absent(self, key: impl Into<Vec<u8>>) -> Txn {
        self.compare(
            key.into(),
            CompareTarget::Create,
            TargetUnion::CreateRevision(0),
        )
    }

    /// Only if `key` was last written at `revision` (0: it does not exist).
    pub fn if_mod_revision(self, key: impl Into<Vec<u8>>, revision: i64) -> Txn {
        self.compare(
            key.into(),
            CompareTarget::Mod,
            TargetUnion::ModRevision(revision),
        )
    }

    /// On success, put `key = value` bound to `lease` (0: none).
    pub fn then_put(
        mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Txn {
        self.req
            .success
            .push(put_op(key.into(), value.into(), lease));
        self
    }

    /// On success, delete `key`.
    pub fn then_delete(mut self, key: impl Into<Vec<u8>>) -> Txn {
        self.req.success.push(RequestOp {
            request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                key: key.into(),
                ..Default::default()
            })),
        });
        self
    }

    /// On failure, read `key` (to learn who won).
    pub fn else_get(mut self, key: impl Into<Vec<u8>>) -> Txn {
        self.req.failure.push(RequestOp {
            request: Some(Op::RequestRange(RangeRequest {
                key: key.into(),
                ..Default::default()
            })),
        });
        self
    }

    /// The request.
    pub fn build(self) -> TxnRequest {
        self.req
    }
}

impl From<Txn> for TxnRequest {
    fn from(txn: Txn) -> TxnRequest {
        txn.req
    }
}

fn put_op(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn txn_builder_puts_compares_and_branches_in_place() {
        let req = Txn::new()
            .if_absent("k")
            .then_put("k", "v", 7)
            .else_get("k")
            .build();
        assert_eq!(req.compare.len(), 1);
        assert_eq!(req.success.len(), 1);
        assert_eq!(req.failure.len(), 1);
        assert_eq!(
            req.compare[0].target_union,
            Some(TargetUnion::CreateRevision(0))
        );
    }
}
