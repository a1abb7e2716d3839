//! `etcdserverpb.Watch`: one bidirectional stream carrying many watchers.
//!
//! Outgoing messages of all watchers of a stream share one bounded channel; the hub never waits
//! on it (see [`crate::watch`]). Limits: at most `--max-watchers-per-stream` watchers per stream.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::Stream;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::watch_server::Watch;
use proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Ctx, key_range};
use crate::watch::{WatchSpec, Watcher};

/// Messages buffered per stream before its watchers are moved to catch-up.
const STREAM_BUFFER: usize = 1024;

/// The Watch service.
#[derive(Clone)]
pub struct WatchService {
    ctx: Ctx,
}

impl WatchService {
    /// Wrap a context.
    pub fn new(ctx: Ctx) -> WatchService {
        WatchService { ctx }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // etcd clients send `hasleader=true` to have the stream cancelled while this member
        // has no leader, so they can move to one that has.
        let require_leader = req
            .metadata()
            .get("hasleader")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "true");
        // The stream's token names the user of every watch created on it; permissions are
        // checked at each create, against the auth state of that moment.
        let creds = crate::auth::Credentials::from_metadata(req.metadata());
        let token = creds.token.map(str::to_string);
        let cert_cn = creds.cert_cn.map(str::to_string);
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ctx = self.ctx.clone();
        let stream_id = ctx.next_stream.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.rpc::<()>("Watch", &Ok(()));
        tokio::spawn(async move {
            let mut session = Session {
                ctx: ctx.clone(),
                stream: stream_id,
                tx,
                watchers: HashMap::new(),
                next_id: 0,
                token,
                cert_cn,
            };
            let check_every = match &ctx.member {
                crate::member::Member::Raft(r) => r.election_timeout(),
                crate::member::Member::Single(_) => std::time::Duration::from_secs(3600),
            };
            let mut leader_check = tokio::time::interval(check_every);
            let mut leaderless = 0u32;
            loop {
                tokio::select! {
                    _ = leader_check.tick(), if require_leader => {
                        if ctx.member.leader(ctx.id.member_id).is_none() {
                            leaderless += 1;
                        } else {
                            leaderless = 0;
                        }
                        // etcd cancels after three checks without a leader.
                        if leaderless >= 3 {
                            let _ = session.tx.send(Err(tonic::Status::from(crate::error::Error::NoLeader))).await;
                            break;
                        }
                    }
                    msg = incoming.next() => match msg {
                        Some(Ok(m)) => {
                            if !session.handle(m).await {
                                break;
                            }
                        }
                        Some(Err(_)) | None => break,
                    },
                    _ = session.tx.closed() => break,
                    _ = ctx.shutdown.cancelled() => break,
                }
            }
            session.close();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    ctx: Ctx,
    stream: u64,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: HashMap<i64, Arc<Watcher>>,
    next_id: i64,
    token: Option<String>,
    /// The verified client certificate's CN (with `--client-cert-auth`).
    cert_cn: Option<String>,
}

impl Session {
    /// Handle one request; false when the stream should end.
    async fn handle(&mut self, m: WatchRequest) -> bool {
        match m.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                if let Some(w) = self.watchers.remove(&c.watch_id) {
                    self.ctx.hub.cancel(&w);
                    self.update_gauge();
                    let resp = WatchResponse {
                        header: self.ctx.header(self.ctx.hub.published_revision()),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    return self.tx.send(Ok(resp)).await.is_ok();
                }
                true
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                let rev = self.ctx.hub.progress_revision(self.stream);
                let resp = WatchResponse {
                    header: self.ctx.header(rev),
                    watch_id: -1,
                    ..Default::default()
                };
                self.tx.send(Ok(resp)).await.is_ok()
            }
            None => true,
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> bool {
        let hub = self.ctx.hub.clone();
        let refuse = |id: i64, reason: String, rev: i64, ctx: &Ctx| WatchResponse {
            header: ctx.header(rev),
            watch_id: id,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..Default::default()
        };
        let rev = hub.published_revision();
        if self.watchers.len() >= self.ctx.limits.max_watchers_per_stream {
            let r = refuse(
                c.watch_id,
                format!(
                    "etcdserver: too many watchers on this stream (limit {})",
                    self.ctx.limits.max_watchers_per_stream
                ),
                rev,
                &self.ctx,
            );
            return self.tx.send(Ok(r)).await.is_ok();
        }
        if c.key.is_empty() {
            let r = refuse(
                c.watch_id,
                "etcdserver: key is not provided".into(),
                rev,
                &self.ctx,
            );
            return self.tx.send(Ok(r)).await.is_ok();
        }
        let range = key_range(c.key.clone(), c.range_end.clone());
        let allowed = self
            .ctx
            .auth
            .caller(crate::auth::Credentials {
                token: self.token.as_deref(),
                cert_cn: self.cert_cn.as_deref(),
            })
            .and_then(|caller| caller.read(&range));
        if let Err(e) = allowed {
            let r = refuse(c.watch_id, e.to_string(), rev, &self.ctx);
            return self.tx.send(Ok(r)).await.is_ok();
        }
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                let r = refuse(
                    c.watch_id,
                    "etcdserver: duplicate watch ID provided on the WatchStream".into(),
                    rev,
                    &self.ctx,
                );
                return self.tx.send(Ok(r)).await.is_ok();
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        };
        let spec = WatchSpec {
            range,
            no_put: c.filters.contains(&0),
            no_delete: c.filters.contains(&1),
            prev_kv: c.prev_kv,
            progress_notify: c.progress_notify,
        };
        // `created` goes out before any event of this watcher: the watcher is registered only
        // after the message is queued.
        let created = WatchResponse {
            header: self.ctx.header(rev),
            watch_id: id,
            created: true,
            ..Default::default()
        };
        if self.tx.send(Ok(created)).await.is_err() {
            return false;
        }
        // A watch from revision 0 means "after what the client was told is current".
        let start = if c.start_revision == 0 {
            rev + 1
        } else {
            c.start_revision
        };
        let w = hub.watch(self.stream, id, spec, start, self.tx.clone());
        self.watchers.insert(id, w);
        self.update_gauge();
        true
    }

    fn update_gauge(&self) {
        self.ctx
            .metrics
            .watchers
            .set(self.ctx.hub.watcher_count() as i64);
    }

    fn close(&mut self) {
        for (_, w) in self.watchers.drain() {
            self.ctx.hub.cancel(&w);
        }
        self.update_gauge();
    }
}
