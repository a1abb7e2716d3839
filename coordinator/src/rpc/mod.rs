//! Thin gRPC adapters: decode, check limits, call the node, map errors (once, in
//! [`crate::error`]), fill the response header.
//!
//! - [`kv`]: `etcdserverpb.KV` — Range, Put, DeleteRange, Txn, Compact.
//! - [`watch`]: `etcdserverpb.Watch` — one bidirectional stream carrying many watchers.
//! - [`lease`]: `etcdserverpb.Lease` — grant, revoke, keep-alive stream, time-to-live, list.
//! - [`maintenance`]: `etcdserverpb.Maintenance` and `etcdserverpb.Cluster`.
//! - [`auth`]: `etcdserverpb.Auth` — users, roles, permissions, authenticate.
//!
//! Every adapter first asks [`Ctx::auth`] who calls (one atomic load while auth is disabled)
//! and checks the request against the caller's permissions before doing anything else.

pub mod auth;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use proto::etcdserverpb::{self as pb, ResponseHeader};

use crate::command::{
    Compare, CompareResult, CompareTarget, DeleteReq, KeyRange, Op, PutReq, RangeReq, SortOrder,
    SortTarget, TxnReq,
};
use crate::error::{Error, Result};
use crate::lease::Lessor;
use crate::member::Member;
use crate::metrics::CoordinatorMetrics;
use crate::state::StateMachine;
use crate::watch::WatchHub;

/// Who this member is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Cluster id.
    pub cluster_id: u64,
    /// Member id.
    pub member_id: u64,
    /// Member name.
    pub name: String,
    /// Peer URLs.
    pub peer_urls: Vec<String>,
    /// Client URLs.
    pub client_urls: Vec<String>,
}

/// Limits enforced on requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request in bytes.
    pub max_request_bytes: usize,
    /// Most ops per txn branch.
    pub max_txn_ops: usize,
    /// Most watchers per watch stream.
    pub max_watchers_per_stream: usize,
    /// Most leases alive at once (checked before proposing a grant).
    pub max_leases: usize,
    /// Backend quota.
    pub quota_backend_bytes: u64,
}

/// Everything an adapter needs. Cheap to clone.
#[derive(Clone)]
pub struct Ctx {
    /// Who orders commands (one member alone, or Raft).
    pub member: Member,
    /// The state machine (read it under the lock; never across an await).
    pub state: Arc<parking_lot::RwLock<StateMachine>>,
    /// Watch hub.
    pub hub: Arc<WatchHub>,
    /// Lease deadlines (kept by the leader).
    pub lessor: Arc<Lessor>,
    /// Metrics.
    pub metrics: CoordinatorMetrics,
    /// Identity.
    pub id: Arc<Identity>,
    /// Limits.
    pub limits: Limits,
    /// NOSPACE alarm raised.
    pub nospace: Arc<AtomicBool>,
    /// Authentication and permissions.
    pub auth: Arc<crate::auth::Gate>,
    /// Next watch stream id.
    pub next_stream: Arc<AtomicU64>,
    /// Cancelled when the server stops: long-lived streams (watch, keep-alive) end on it, so
    /// a graceful shutdown does not wait for clients to hang up.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Server version reported by Status.
    pub version: &'static str,
}

impl Ctx {
    /// A response header at `rev`.
    pub fn header(&self, rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.id.cluster_id,
            member_id: self.id.member_id,
            revision: rev,
            raft_term: self.member.term(),
        })
    }

    /// Refuse a request larger than the limit with etcd's error.
    pub fn check_size<M: prost::Message>(&self, m: &M) -> Result<()> {
        if m.encoded_len() > self.limits.max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        Ok(())
    }

    /// Refuse a write while the NOSPACE alarm is raised.
    pub fn check_space(&self) -> Result<()> {
        if self.nospace.load(Ordering::Acquire) {
            return Err(Error::NoSpace);
        }
        Ok(())
    }
}

/// Build a key range from etcd's (key, range_end).
pub fn key_range(key: Vec<u8>, range_end: Vec<u8>) -> KeyRange {
    KeyRange {
        key,
        end: range_end,
    }
}

/// Convert a RangeRequest.
pub fn range_req(r: pb::RangeRequest) -> Result<RangeReq> {
    let sort_order = match pb::range_request::SortOrder::try_from(r.sort_order) {
        Ok(pb::range_request::SortOrder::None) => SortOrder::None,
        Ok(pb::range_request::SortOrder::Ascend) => SortOrder::Ascend,
        Ok(pb::range_request::SortOrder::Descend) => SortOrder::Descend,
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "unknown sort order {}",
                r.sort_order
            )));
        }
    };
    let sort_target = match pb::range_request::SortTarget::try_from(r.sort_target) {
        Ok(pb::range_request::SortTarget::Key) => SortTarget::Key,
        Ok(pb::range_request::SortTarget::Version) => SortTarget::Version,
        Ok(pb::range_request::SortTarget::Create) => SortTarget::Create,
        Ok(pb::range_request::SortTarget::Mod) => SortTarget::Mod,
        Ok(pb::range_request::SortTarget::Value) => SortTarget::Value,
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "unknown sort target {}",
                r.sort_target
            )));
        }
    };
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.limit < 0 {
        return Err(Error::InvalidArgument("negative limit".into()));
    }
    Ok(RangeReq {
        range: key_range(r.key, r.range_end),
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

/// Convert a PutRequest.
pub fn put_req(p: pb::PutRequest) -> PutReq {
    PutReq {
        key: p.key,
        value: p.value,
        lease: p.lease,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

/// Convert a DeleteRangeRequest.
pub fn delete_req(d: pb::DeleteRangeRequest) -> DeleteReq {
    DeleteReq {
        range: key_range(d.key, d.range_end),
        prev_kv: d.prev_kv,
    }
}

fn compare(c: pb::Compare) -> Result<Compare> {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let result = match R::try_from(c.result) {
        Ok(R::Equal) => CompareResult::Equal,
        Ok(R::Greater) => CompareResult::Greater,
        Ok(R::Less) => CompareResult::Less,
        Ok(R::NotEqual) => CompareResult::NotEqual,
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "unknown compare result {}",
                c.result
            )));
        }
    };
    let int = |u: &Option<U>| match u {
        Some(U::Version(v))
        | Some(U::CreateRevision(v))
        | Some(U::ModRevision(v))
        | Some(U::Lease(v)) => *v,
        _ => 0,
    };
    let target = match T::try_from(c.target) {
        Ok(T::Version) => CompareTarget::Version(int(&c.target_union)),
        Ok(T::Create) => CompareTarget::Create(int(&c.target_union)),
        Ok(T::Mod) => CompareTarget::Mod(int(&c.target_union)),
        Ok(T::Lease) => CompareTarget::Lease(int(&c.target_union)),
        Ok(T::Value) => CompareTarget::Value(match c.target_union {
            Some(U::Value(v)) => v,
            _ => Vec::new(),
        }),
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "unknown compare target {}",
                c.target
            )));
        }
    };
    Ok(Compare {
        range: key_range(c.key, c.range_end),
        result,
        target,
    })
}

fn op(o: pb::RequestOp) -> Result<Op> {
    use pb::request_op::Request as R;
    match o.request {
        Some(R::RequestRange(r)) => Ok(Op::Range(range_req(r)?)),
        Some(R::RequestPut(p)) => Ok(Op::Put(put_req(p))),
        Some(R::RequestDeleteRange(d)) => Ok(Op::Delete(delete_req(d))),
        Some(R::RequestTxn(t)) => Ok(Op::Txn(txn_req(t)?)),
        None => Err(Error::InvalidArgument(
            "txn operation with no request".into(),
        )),
    }
}

/// Convert a TxnRequest (recursively).
pub fn txn_req(t: pb::TxnRequest) -> Result<TxnReq> {
    Ok(TxnReq {
        compare: t.compare.into_iter().map(compare).collect::<Result<_>>()?,
        success: t.success.into_iter().map(op).collect::<Result<_>>()?,
        failure: t.failure.into_iter().map(op).collect::<Result<_>>()?,
    })
}

/// Stable 64-bit hash (FNV-1a) for deriving member and cluster ids, as etcd derives them from
/// names and URLs.
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Rewrites gRPC's own "message too large" refusal (raised by tonic before our handlers run,
/// with code OutOfRange, which etcd clients read as a revision error) into etcd's
/// `InvalidArgument: etcdserver: request is too large`. The status may travel in the headers
/// (trailers-only response) or in the trailers, so both are checked.
pub fn too_large_as_etcd(
    mut resp: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    fix_too_large(resp.headers_mut());
    resp.map(|b| tonic::body::Body::new(TooLargeBody { inner: b }))
}

fn fix_too_large(h: &mut tonic::codegen::http::HeaderMap) {
    use tonic::codegen::http::HeaderValue;
    let out_of_range = h.get("grpc-status").is_some_and(|v| v == "11");
    let too_large = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| m.contains("too large") || m.contains("too%20large"));
    if out_of_range && too_large {
        h.insert("grpc-status", HeaderValue::from_static("3"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("etcdserver: request is too large"),
        );
    }
}

struct TooLargeBody {
    inner: tonic::body::Body,
}

impl http_body::Body for TooLargeBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            std::task::Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(t) = frame.trailers_mut() {
                    fix_too_large(t);
                }
                std::task::Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A member's id: derived from its peer URL and the cluster token, so every member computes the
/// same ids from `--initial-cluster` alone.
pub fn member_id_for(peer_url: &str, token: &str) -> u64 {
    fnv64(&[peer_url.as_bytes(), token.as_bytes()])
}
