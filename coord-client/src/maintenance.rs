//! Cluster and maintenance reads: the member list, and each endpoint's own status (leader,
//! term, Raft index, revision, database size), as `etcdctl member list` and
//! `etcdctl endpoint status` show them.
//!
//! The member list goes through the retry loop like any read. A status is about one endpoint,
//! so it is asked of that endpoint alone, once, without failover: an endpoint that does not
//! answer is reported as such, not hidden behind another one's answer.

use proto::etcdserverpb::cluster_client::ClusterClient;
use proto::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::etcdserverpb::{Member, MemberListRequest, StatusRequest, StatusResponse};

use crate::{Client, Error, Idempotence, Result};

/// One endpoint's answer to `Maintenance.Status`.
#[derive(Debug)]
pub struct EndpointStatus {
    /// The endpoint as given to the client (`http://host:port`).
    pub endpoint: String,
    /// Its status, or why it could not be read.
    pub status: std::result::Result<StatusResponse, Error>,
}

impl Client {
    /// The cluster's members (retried: it is a read).
    pub async fn member_list(&self) -> Result<Vec<Member>> {
        self.call("MemberList", Idempotence::Safe, |ch| async move {
            ClusterClient::new(ch)
                .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                .member_list(MemberListRequest {
                    linearizable: false,
                })
                .await
                .map(|r| r.into_inner().members)
        })
        .await
    }

    /// `Maintenance.Status` of every endpoint this client was given, each asked once and
    /// at the same time, within the request timeout.
    pub async fn endpoint_statuses(&self) -> Vec<EndpointStatus> {
        let timeout = self.config().request_timeout;
        let asks: Vec<_> = self
            .inner
            .members
            .iter()
            .map(|m| {
                let channel = m.channel.clone();
                tokio::spawn(async move {
                    let mut client = MaintenanceClient::new(channel)
                        .max_decoding_message_size(crate::MAX_RESPONSE_BYTES);
                    let call = client.status(StatusRequest {});
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok(r)) => Ok(r.into_inner()),
                        Ok(Err(s)) => Err(Error::from_status(s)),
                        Err(_) => Err(Error::Timeout { what: "Status" }),
                    }
                })
            })
            .collect();
        let mut out = Vec::with_capacity(asks.len());
        for (m, ask) in self.inner.members.iter().zip(asks) {
            let status = ask.await.unwrap_or_else(|e| {
                Err(Error::Status(tonic::Status::internal(format!(
                    "status task failed: {e}"
                ))))
            });
            out.push(EndpointStatus {
                endpoint: m.url.clone(),
                status,
            });
        }
        out
    }
}
