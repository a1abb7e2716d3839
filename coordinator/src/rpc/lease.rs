//! `etcdserverpb.Lease`.

use std::pin::Pin;

use futures::Stream;
use proto::etcdserverpb::lease_server::Lease;
use proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Ctx;
use crate::auth::Caller;
use crate::command::Command;
use crate::error::{Error, Result};
use crate::lease::MIN_TTL;
use crate::state::{MAX_LEASE_TTL, Response as SmResponse};

/// The Lease service.
#[derive(Clone)]
pub struct LeaseService {
    ctx: Ctx,
}

impl LeaseService {
    /// Wrap a context.
    pub fn new(ctx: Ctx) -> LeaseService {
        LeaseService { ctx }
    }

    async fn grant(
        &self,
        caller: Result<Caller>,
        r: LeaseGrantRequest,
    ) -> Result<LeaseGrantResponse> {
        // Any authenticated user may grant a lease.
        let caller = caller?;
        self.ctx.check_space()?;
        if r.ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        if r.id < 0 {
            return Err(Error::InvalidArgument("lease ID must be positive".into()));
        }
        // Checked here, not in apply: members may run with different limits, and apply must
        // decide the same on each. Concurrent grants may pass it together (by their number).
        if self.ctx.state.read().leases().len() >= self.ctx.limits.max_leases {
            return Err(Error::TooManyLeases {
                limit: self.ctx.limits.max_leases,
            });
        }
        let ttl = r.ttl.max(MIN_TTL);
        let mut id = r.id;
        if id == 0 {
            // Chosen here, before proposing, so that apply stays deterministic.
            loop {
                id = (rand::random::<u64>() >> 1) as i64;
                if id != 0 && !self.ctx.state.read().leases().contains_key(&id) {
                    break;
                }
            }
        }
        let applied = self
            .ctx
            .member
            .propose(caller.wrap(Command::LeaseGrant { id, ttl }))
            .await?;
        match applied.result? {
            SmResponse::LeaseGrant { id, ttl } => Ok(LeaseGrantResponse {
                header: self.ctx.header(applied.revision),
                id,
                ttl,
                error: String::new(),
            }),
            _ => Err(Error::InvalidArgument(
                "unexpected response to lease grant".into(),
            )),
        }
    }

    async fn revoke(
        &self,
        caller: Result<Caller>,
        r: LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse> {
        // Revoking deletes the lease's keys: write permission on every one of them.
        let caller = caller?;
        let cmd = Command::LeaseRevoke { id: r.id };
        super::kv::check_command(&self.ctx, &caller, &cmd)?;
        let applied = self.ctx.member.propose(caller.wrap(cmd)).await?;
        applied.result?;
        Ok(LeaseRevokeResponse {
            header: self.ctx.header(applied.revision),
        })
    }

    async fn time_to_live(
        &self,
        caller: Result<Caller>,
        r: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse> {
        let caller = caller?;
        if r.keys {
            // The key list is refused whole unless the caller may read every key (etcd 3.5
            // denies too, rather than filtering).
            if let Some(p) = caller.perms() {
                for k in self.ctx.state.read().lease_keys(r.id) {
                    p.read_key(&k)?;
                }
            }
        }
        // The leader owns deadlines: ask it (locally when alone).
        let remaining = self.ctx.member.lease_remaining(r.id).await?;
        let st = self.ctx.state.read();
        let rev = st.revision();
        Ok(match st.leases().get(&r.id) {
            Some(info) => LeaseTimeToLiveResponse {
                header: self.ctx.header(rev),
                id: r.id,
                ttl: if remaining < 0 { info.ttl } else { remaining },
                granted_ttl: info.ttl,
                keys: if r.keys {
                    info.keys.iter().cloned().collect()
                } else {
                    Vec::new()
                },
            },
            // etcd answers an unknown lease with TTL -1, not an error.
            None => LeaseTimeToLiveResponse {
                header: self.ctx.header(rev),
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        })
    }

    fn leases(&self, caller: Result<Caller>) -> Result<LeaseLeasesResponse> {
        caller?;
        let st = self.ctx.state.read();
        Ok(LeaseLeasesResponse {
            header: self.ctx.header(st.revision()),
            leases: st
                .leases()
                .keys()
                .map(|id| LeaseStatus { id: *id })
                .collect(),
        })
    }
}

fn done<T>(ctx: &Ctx, method: &'static str, r: Result<T>) -> Result<Response<T>, Status> {
    let r = r.map(Response::new).map_err(Status::from);
    ctx.metrics.rpc(method, &r);
    r
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Lease.LeaseGrant"
    )]
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let caller = self.ctx.auth.caller_of(&req);
        done(
            &self.ctx,
            "LeaseGrant",
            self.grant(caller, req.into_inner()).await,
        )
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Lease.LeaseRevoke"
    )]
    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        done(
            &self.ctx,
            "LeaseRevoke",
            self.revoke(self.ctx.auth.caller_of(&req), req.into_inner())
                .await,
        )
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        // Keep-alives need an authenticated user while auth is on (checked when the stream opens).
        self.ctx.auth.caller_of(&req).map_err(Status::from)?;
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let ctx = self.ctx.clone();
        ctx.metrics.rpc::<()>("LeaseKeepAlive", &Ok(()));
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = ctx.shutdown.cancelled() => break,
                    m = incoming.next() => match m {
                        Some(Ok(m)) => m,
                        _ => break,
                    },
                };
                // Unknown (expired, revoked) leases answer TTL 0, as etcd does.
                let ttl = match ctx.member.lease_renew(m.id).await {
                    Ok(ttl) => ttl,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        break;
                    }
                };
                let rev = ctx.state.read().revision();
                let resp = LeaseKeepAliveResponse {
                    header: ctx.header(rev),
                    id: m.id,
                    ttl,
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Lease.LeaseTimeToLive"
    )]
    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        done(
            &self.ctx,
            "LeaseTimeToLive",
            self.time_to_live(self.ctx.auth.caller_of(&req), req.into_inner())
                .await,
        )
    }

    #[tracing::instrument(
        skip_all,
        target = "request",
        level = "debug",
        name = "Lease.LeaseLeases"
    )]
    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let r = self.leases(self.ctx.auth.caller_of(&req));
        done(&self.ctx, "LeaseLeases", r)
    }
}

/// Propose revocation of expired leases, forever (until the node stops).
pub async fn expiry_loop(ctx: Ctx, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Only the leader expires leases. At most 500 revocations per tick (etcd limits its
        // revoke rate the same way).
        let expired = if ctx.lessor.is_active() {
            ctx.lessor.expired(500)
        } else {
            Vec::new()
        };
        // Expiry is this member's own decision, from its own clock: proposed only while it
        // leads and never forwarded (a stale leader's expiries must not reach the real one).
        for id in expired {
            match ctx
                .member
                .propose_as_leader(Command::LeaseRevoke { id })
                .await
            {
                Ok(a) => {
                    if let Err(Error::LeaseNotFound) = a.result {
                        ctx.lessor.revoked(id);
                    } else {
                        tracing::debug!(lease = id, "lease expired");
                    }
                }
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "could not propose lease expiry");
                    break;
                }
            }
        }
        let st = ctx.state.read();
        ctx.metrics.leases.set(st.leases().len() as i64);
        ctx.metrics.revision.set(st.revision());
    }
}
