//! openraft's types for the coordinator (its [`TypeConfig`]: what a Raft log entry holds and
//! what applying one answers), as the Raft log stores them and peers send them (bincode). The
//! Raft machinery itself is `coordinator::raft`'s.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::command::Command;

/// A member as the membership knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    /// Member name.
    pub name: String,
    /// Peer URL (`http://host:port`).
    pub peer_url: String,
}

openraft::declare_raft_types!(
    /// openraft's types for the coordinator.
    pub TypeConfig:
        D = Command,
        R = EntryOutcome,
        NodeId = u64,
        Node = MemberNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What applying one log entry gave: one outcome per command it holds (several for a
/// [`Command::Batch`], in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryOutcome(pub Vec<OutcomeWire>);

/// The outcome of one applied command in a form that crosses the network (a forwarded write's
/// answer) and can sit in openraft's response type: responses as their protobuf encoding, errors
/// as the gRPC code and etcd's text that the client will see.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutcomeWire {
    /// Store revision after the command.
    pub revision: i64,
    /// The response, or the refused command's error.
    pub result: Result<ResponseWire, ErrorWire>,
}

/// `coordinator::state::Response` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResponseWire {
    /// Encoded `PutResponse`.
    Put(Vec<u8>),
    /// Encoded `DeleteRangeResponse`.
    Delete(Vec<u8>),
    /// Encoded `TxnResponse`.
    Txn(Vec<u8>),
    /// Compact.
    Compact,
    /// LeaseGrant.
    LeaseGrant {
        /// Lease ID.
        id: i64,
        /// TTL.
        ttl: i64,
    },
    /// LeaseRevoke.
    LeaseRevoke,
    /// Noop.
    Noop,
    /// An auth change.
    Auth {
        /// Auth revision after it.
        revision: u64,
    },
}

/// `coordinator::error::Error` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorWire {
    /// gRPC code.
    pub code: i32,
    /// Message (etcd's text).
    pub message: String,
    /// Compacted revision, for `Compacted`.
    pub compact_revision: i64,
}
