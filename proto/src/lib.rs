//! Protocol definitions and their generated code.
//!
//! - [`mvccpb`], [`authpb`] and [`etcdserverpb`]: the etcd v3 client API, wire compatible with etcd 3.4/3.5 so
//!   that `etcdctl` and etcd client libraries work against the coordinator unchanged. The `.proto`
//!   files under `etcd/` were written from etcd's public API documentation; field numbers and
//!   types are etcd's.
//! - [`peerpb`]: the coordinator's internal peer service (Raft messages, forwarded writes),
//!   served on the peer port only.
//! - [`registry_v1`]: `registry.v1`, the API of `registry-svc` (registration, discovery, health,
//!   watches).
//! - [`config_v1`]: `config.v1`, the API of `config-svc` (versioned configuration, rollouts,
//!   watches).
//!
//! Code is generated at build time by `protox` + `tonic-prost-build`; no `protoc` is required.
#![allow(clippy::all, missing_docs, rust_2018_idioms)]

/// etcd's key-value and event messages.
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// etcd's auth messages (users, roles, permissions).
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// etcd's v3 RPC services and messages.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// The coordinator's internal peer service (Raft transport, forwarding).
pub mod peerpb {
    tonic::include_proto!("peerpb");
}

/// `registry.v1`: the service registry's API (registry-svc).
pub mod registry_v1 {
    tonic::include_proto!("registry.v1");
}

/// `config.v1`: the configuration service's API (config-svc).
pub mod config_v1 {
    tonic::include_proto!("config.v1");
}
