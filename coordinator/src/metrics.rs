//! The coordinator's Prometheus metrics, registered once into the shared admin registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Labels of the per-RPC counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// gRPC method, e.g. `Put`.
    pub method: &'static str,
    /// gRPC code name, e.g. `Ok`.
    pub code: &'static str,
}

/// Handles to every metric the coordinator updates (cheap to clone, lock-free to update).
#[derive(Clone, Debug)]
pub struct CoordinatorMetrics {
    /// Duration of one WAL append + fdatasync.
    pub wal_fsync_seconds: Histogram,
    /// Commands per fsync.
    pub batch_size: Histogram,
    /// Commands per Raft entry proposed by a leader (see `raft::batch`).
    pub raft_entry_commands: Histogram,
    /// Duration of applying one batch and committing it to sled.
    pub apply_seconds: Histogram,
    /// Commands applied.
    pub applied: Counter,
    /// RPCs served.
    pub rpcs: Family<RpcLabels, Counter>,
    /// Current revision.
    pub revision: Gauge,
    /// Watchers registered.
    pub watchers: Gauge,
    /// Backend size on disk.
    pub db_bytes: Gauge,
    /// Leases alive.
    pub leases: Gauge,
}

impl CoordinatorMetrics {
    /// Create the metrics and register them under `etcd_`-like names.
    pub fn register(m: &service_kit::admin::Metrics) -> CoordinatorMetrics {
        let me = CoordinatorMetrics {
            wal_fsync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            raft_entry_commands: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            apply_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 18)),
            applied: Counter::default(),
            rpcs: Family::default(),
            revision: Gauge::default(),
            watchers: Gauge::default(),
            db_bytes: Gauge::default(),
            leases: Gauge::default(),
        };
        let mut r = m.registry();
        r.register(
            "coordinator_wal_fsync_duration_seconds",
            "WAL append + fdatasync latency",
            me.wal_fsync_seconds.clone(),
        );
        r.register(
            "coordinator_wal_batch_commands",
            "Commands made durable by one fsync",
            me.batch_size.clone(),
        );
        r.register(
            "coordinator_raft_entry_commands",
            "Commands per Raft entry this member proposed as leader",
            me.raft_entry_commands.clone(),
        );
        r.register(
            "coordinator_apply_duration_seconds",
            "Time to apply and commit one batch",
            me.apply_seconds.clone(),
        );
        r.register(
            "coordinator_applied_commands",
            "Commands applied to the state machine",
            me.applied.clone(),
        );
        r.register(
            "coordinator_grpc_requests",
            "gRPC requests by method and result",
            me.rpcs.clone(),
        );
        r.register(
            "coordinator_mvcc_revision",
            "Current store revision",
            me.revision.clone(),
        );
        r.register(
            "coordinator_watchers",
            "Registered watchers",
            me.watchers.clone(),
        );
        r.register(
            "coordinator_db_size_bytes",
            "Backend size on disk",
            me.db_bytes.clone(),
        );
        r.register("coordinator_leases", "Leases alive", me.leases.clone());
        me
    }

    /// Count one RPC.
    pub fn rpc<T>(&self, method: &'static str, r: &Result<T, tonic::Status>) {
        let code = match r {
            Ok(_) => "Ok",
            Err(s) => code_name(s.code()),
        };
        self.rpcs.get_or_create(&RpcLabels { method, code }).inc();
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
