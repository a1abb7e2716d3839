//! What the gRPC adapters call to order writes and reads: one member alone, or a Raft member.
//!
//! Both modes share the state machine, watch hub and lessor; they differ only in who decides
//! the order of commands (the local group-commit pipeline, or Raft) and in how a linearizable
//! read is made safe (nothing to do alone; a read index from the leader in a cluster).

use crate::command::Command;
use crate::error::Result;
use crate::node::Node;
use crate::raft::RaftMember;
use crate::state::Response;

/// The result of a proposal.
#[derive(Debug)]
pub struct Proposed {
    /// Store revision after the command.
    pub revision: i64,
    /// The response, or the error the command was refused with.
    pub result: Result<Response>,
}

/// A member in one of the two modes. Cheap to clone.
#[derive(Clone)]
pub enum Member {
    /// A single member ordering commands itself.
    Single(Node),
    /// A member of a Raft cluster.
    Raft(RaftMember),
}

/// One member as member lists show it.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    /// Member id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Peer URLs.
    pub peer_urls: Vec<String>,
    /// Client URLs (empty until the member published them).
    pub client_urls: Vec<String>,
    /// Learner (non-voting).
    pub is_learner: bool,
}

impl Member {
    /// Order a command and wait until it is applied here.
    pub async fn propose(&self, cmd: Command) -> Result<Proposed> {
        match self {
            Member::Single(n) => {
                let a = n.propose(cmd).await?;
                Ok(Proposed {
                    revision: a.revision,
                    result: a.result,
                })
            }
            Member::Raft(r) => {
                let (revision, result) = r.propose(cmd).await?;
                Ok(Proposed { revision, result })
            }
        }
    }

    /// Order a command only if this member leads (never forwarded): see
    /// [`crate::raft::RaftMember::propose_as_leader`]. A single member always leads.
    pub async fn propose_as_leader(&self, cmd: Command) -> Result<Proposed> {
        match self {
            Member::Single(_) => self.propose(cmd).await,
            Member::Raft(r) => {
                let (revision, result) = r.propose_as_leader(cmd).await?;
                Ok(Proposed { revision, result })
            }
        }
    }

    /// Return once a read here would see every write acknowledged before the call.
    pub async fn read_barrier(&self) -> Result<()> {
        match self {
            Member::Single(_) => Ok(()),
            Member::Raft(r) => r.read_barrier().await,
        }
    }

    /// Renew a lease; its TTL, or 0 if unknown.
    pub async fn lease_renew(&self, id: i64) -> Result<i64> {
        match self {
            Member::Single(n) => {
                let known = n.state().read().leases().contains_key(&id);
                Ok(if known {
                    n.lessor().renew(id).unwrap_or(0)
                } else {
                    0
                })
            }
            Member::Raft(r) => r.lease_renew(id).await,
        }
    }

    /// Seconds left of a lease, or -1 if unknown.
    pub async fn lease_remaining(&self, id: i64) -> Result<i64> {
        match self {
            Member::Single(n) => {
                let ttl = n.state().read().leases().get(&id).map(|l| l.ttl);
                Ok(match ttl {
                    Some(ttl) => n.lessor().remaining(id).unwrap_or(ttl),
                    None => -1,
                })
            }
            Member::Raft(r) => r.lease_remaining(id).await,
        }
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        match self {
            Member::Single(n) => n.term(),
            Member::Raft(r) => r.term(),
        }
    }

    /// The leader's id, if one is known.
    pub fn leader(&self, me: u64) -> Option<u64> {
        match self {
            Member::Single(_) => Some(me),
            Member::Raft(r) => r.leader(),
        }
    }

    /// Index of the last log entry held.
    pub fn last_log_index(&self, applied: u64) -> u64 {
        match self {
            Member::Single(_) => applied,
            Member::Raft(r) => r.last_log_index(),
        }
    }

    /// Whether this member is a learner.
    pub fn is_learner(&self, me: u64) -> bool {
        match self {
            Member::Single(_) => false,
            Member::Raft(r) => r.members().iter().any(|(id, _, l)| *id == me && *l),
        }
    }

    /// Stop ordering commands; release storage.
    pub async fn stop(&self) {
        match self {
            Member::Single(n) => n.stop().await,
            Member::Raft(r) => r.stop().await,
        }
    }
}
