//! Leases: grant, keep-alive, revoke, and a task that keeps one alive across outages.

use std::future::Future;
use std::time::Duration;

use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::{Client, Error, Idempotence, Result};

/// A fresh positive lease ID (etcd IDs are positive `i64`).
fn new_lease_id() -> i64 {
    (rand::random::<u64>() >> 1).max(1) as i64
}

impl Client {
    /// Grants a lease of `ttl` seconds; returns its ID and the TTL granted.
    ///
    /// The client picks the ID, so a retry after an uncertain failure is safe: if the first
    /// attempt was applied, the retry answers "lease already exists", taken as success.
    pub async fn lease_grant(&self, ttl: i64) -> Result<(i64, i64)> {
        let id = new_lease_id();
        let mut attempts = 0u32;
        self.call("LeaseGrant", Idempotence::Safe, |ch| {
            attempts += 1;
            let retry = attempts > 1;
            async move {
                match LeaseClient::new(ch)
                    .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                    .lease_grant(LeaseGrantRequest { ttl, id })
                    .await
                {
                    Ok(r) => Ok((r.get_ref().id, r.get_ref().ttl)),
                    Err(s)
                        if retry
                            && s.code() == Code::FailedPrecondition
                            && s.message().contains("lease already exists") =>
                    {
                        Ok((id, ttl))
                    }
                    Err(s) => Err(s),
                }
            }
        })
        .await
    }

    /// Revokes a lease, deleting every key bound to it. A lease that does not exist (any more)
    /// is not an error: the call makes sure it is gone.
    pub async fn lease_revoke(&self, id: i64) -> Result<()> {
        let res = self
            .call("LeaseRevoke", Idempotence::Safe, |ch| async move {
                LeaseClient::new(ch)
                    .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                    .lease_revoke(LeaseRevokeRequest { id })
                    .await
                    .map(|_| ())
            })
            .await;
        match res {
            Err(Error::LeaseNotFound) => Ok(()),
            other => other,
        }
    }

    /// Renews a lease once; returns its TTL, or 0 if it does not exist any more.
    pub async fn lease_keep_alive_once(&self, id: i64) -> Result<i64> {
        self.call("LeaseKeepAlive", Idempotence::Safe, |ch| async move {
            let mut stream = LeaseClient::new(ch)
                .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                .lease_keep_alive(tokio_stream::once(LeaseKeepAliveRequest { id }))
                .await?
                .into_inner();
            match stream.message().await? {
                Some(resp) => Ok(resp.ttl),
                None => Err(tonic::Status::unavailable(
                    "keep-alive stream ended without an answer",
                )),
            }
        })
        .await
    }

    /// The remaining TTL of a lease in seconds (`-1` if it does not exist).
    pub async fn lease_time_to_live(&self, id: i64) -> Result<i64> {
        self.call("LeaseTimeToLive", Idempotence::Safe, |ch| async move {
            LeaseClient::new(ch)
                .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
                .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
                .await
                .map(|r| r.get_ref().ttl)
        })
        .await
    }

    /// Grants a lease of `ttl` seconds, calls `on_grant(lease)` so the owner can write its keys
    /// bound to it, and keeps the lease alive in a background task.
    ///
    /// If the lease expires anyway (the coordinator was unreachable for longer than the TTL),
    /// the task grants a new one and calls `on_grant` again, retrying with backoff until it
    /// succeeds or the keeper is stopped. The first grant and `on_grant` must succeed for this
    /// call to return `Ok`.
    pub async fn keep_lease<F, Fut>(&self, ttl: i64, mut on_grant: F) -> Result<LeaseKeeper>
    where
        F: FnMut(i64) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let (id, granted) = self.lease_grant(ttl).await?;
        if let Err(e) = on_grant(id).await {
            let _ = self.lease_revoke(id).await;
            return Err(e);
        }
        let (tx, rx) = watch::channel(id);
        let cancel = CancellationToken::new();
        let client = self.clone();
        let token = cancel.clone();
        let task = tokio::spawn(async move {
            let period = Duration::from_millis((granted.max(1) as u64) * 1000 / 3)
                .max(Duration::from_millis(200));
            let mut id = id;
            let mut wait = period;
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                match client.lease_keep_alive_once(id).await {
                    Ok(ttl) if ttl > 0 => wait = period,
                    Ok(_) | Err(Error::LeaseNotFound) => {
                        tracing::warn!(lease = id, "lease expired; granting a new one");
                        let Some(new_id) = regrant(&client, ttl, &mut on_grant, &token).await
                        else {
                            return;
                        };
                        id = new_id;
                        let _ = tx.send(id);
                        wait = period;
                    }
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "lease keep-alive failed; retrying");
                        wait = period.min(Duration::from_millis(500));
                    }
                }
            }
        });
        Ok(LeaseKeeper {
            lease: rx,
            cancel,
            task: Some(task),
            client: self.clone(),
        })
    }
}

/// Grants a new lease and calls `on_grant` until both succeed; `None` if cancelled first.
async fn regrant<F, Fut>(
    client: &Client,
    ttl: i64,
    on_grant: &mut F,
    cancel: &CancellationToken,
) -> Option<i64>
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        if cancel.is_cancelled() {
            return None;
        }
        match client.lease_grant(ttl).await {
            Ok((id, _)) => match on_grant(id).await {
                Ok(()) => return Some(id),
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "re-registering under a new lease failed");
                    let _ = client.lease_revoke(id).await;
                }
            },
            Err(e) => tracing::warn!(error = %e, "lease grant failed; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A lease kept alive by a background task (see [`Client::keep_lease`]). Dropping it stops the
/// task without revoking the lease, which then expires after its TTL.
pub struct LeaseKeeper {
    lease: watch::Receiver<i64>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    client: Client,
}

impl LeaseKeeper {
    /// The lease now held (it changes after an expiry).
    pub fn lease_id(&self) -> i64 {
        *self.lease.borrow()
    }

    /// A receiver that sees every new lease.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.lease.clone()
    }

    /// Stops keeping the lease alive and revokes it, deleting its keys.
    pub async fn revoke(mut self) -> Result<()> {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let id = *self.lease.borrow();
        self.client.lease_revoke(id).await
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
