//! `etcdserverpb.KV`.

use proto::etcdserverpb::kv_server::Kv;
use proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::{Ctx, delete_req, put_req, range_req, txn_req};
use crate::auth::{Caller, Credentials};
use crate::command::Command;
use crate::error::{Error, Result};
use crate::state::{self, Response as SmResponse};

/// The KV service.
#[derive(Clone)]
pub struct KvService {
    ctx: Ctx,
}

impl KvService {
    /// Wrap a context.
    pub fn new(ctx: Ctx) -> KvService {
        KvService { ctx }
    }

    async fn write(&self, caller: &Caller, cmd: Command) -> Result<(i64, SmResponse)> {
        state::validate(&cmd, self.ctx.limits.max_txn_ops)?;
        check_command(&self.ctx, caller, &cmd)?;
        let applied = self.ctx.member.propose(caller.wrap(cmd)).await?;
        let resp = applied.result?;
        Ok((applied.revision, resp))
    }

    async fn do_range(&self, md: &MetadataMap, r: RangeRequest) -> Result<RangeResponse> {
        let auth_rev = self.ctx.auth.revision();
        let caller = self.ctx.auth.caller(Credentials::from_metadata(md))?;
        self.ctx.check_size(&r)?;
        let serializable = r.serializable;
        let req = range_req(r)?;
        caller.read(&req.range)?;
        if !serializable {
            self.ctx.member.read_barrier().await?;
            // An auth change applied while waiting (here, after another member acknowledged
            // it) decides too.
            if self.ctx.auth.revision() != auth_rev {
                self.ctx
                    .auth
                    .caller(Credentials::from_metadata(md))?
                    .read(&req.range)?;
            }
        }
        let st = self.ctx.state.read();
        let rr = st.store().range(&req)?;
        Ok(RangeResponse {
            header: self.ctx.header(rr.revision),
            kvs: rr.kvs,
            more: rr.more,
            count: rr.count,
        })
    }

    async fn do_put(&self, caller: Result<Caller>, p: PutRequest) -> Result<PutResponse> {
        let caller = caller?;
        self.ctx.check_size(&p)?;
        self.ctx.check_space()?;
        match self.write(&caller, Command::Put(put_req(p))).await? {
            (rev, SmResponse::Put(mut r)) => {
                r.header = self.ctx.header(rev);
                Ok(r)
            }
            _ => Err(Error::InvalidArgument("unexpected response to put".into())),
        }
    }

    async fn do_delete(
        &self,
        caller: Result<Caller>,
        d: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse> {
        let caller = caller?;
        self.ctx.check_size(&d)?;
        match self.write(&caller, Command::Delete(delete_req(d))).await? {
            (rev, SmResponse::Delete(mut r)) => {
                r.header = self.ctx.header(rev);
                Ok(r)
            }
            _ => Err(Error::InvalidArgument(
                "unexpected response to delete".into(),
            )),
        }
    }

    async fn do_txn(&self, md: &MetadataMap, t: TxnRequest) -> Result<TxnResponse> {
        let auth_rev = self.ctx.auth.revision();
        let caller = self.ctx.auth.caller(Credentials::from_metadata(md))?;
        self.ctx.check_size(&t)?;
        let t = txn_req(t)?;
        if t.is_read_only() {
            state::validate_txn(&t, self.ctx.limits.max_txn_ops)?;
            caller.read_txn(&t)?;
            self.ctx.member.read_barrier().await?;
            if self.ctx.auth.revision() != auth_rev {
                self.ctx
                    .auth
                    .caller(Credentials::from_metadata(md))?
                    .read_txn(&t)?;
            }
            let st = self.ctx.state.read();
            let mut r = st.read_txn(&t)?;
            r.header = self.ctx.header(st.revision());
            return Ok(r);
        }
        self.ctx.check_space()?;
        match self.write(&caller, Command::Txn(t)).await? {
            (rev, SmResponse::Txn(mut r)) => {
                r.header = self.ctx.header(rev);
                fill_headers(&self.ctx, &mut r);
                Ok(r)
            }
            _ => Err(Error::InvalidArgument("unexpected response to txn".into())),
        }
    }

    async fn do_compact(
        &self,
        caller: Result<Caller>,
        c: CompactionRequest,
    ) -> Result<CompactionResponse> {
        let caller = caller?;
        // Compaction drops everyone's history: root only while auth is on.
        caller.root()?;
        let (rev, _) = self
            .write(
                &caller,
                Command::Compact {
                    revision: c.revision,
                },
            )
            .await?;
        Ok(CompactionResponse {
            header: self.ctx.header(rev),
        })
    }
}

/// Check a command at the door against the caller's permissions (the keys a lease holds come
/// from the state); nothing to do, and no lock taken, while auth is disabled.
pub fn check_command(ctx: &Ctx, caller: &Caller, cmd: &Command) -> Result<()> {
    if caller.perms().is_none() {
        return Ok(());
    }
    let st = ctx.state.read();
    caller.command(cmd, &|id| st.lease_keys(id))
}

/// Give nested responses full headers (the state machine sets only revisions).
fn fill_headers(ctx: &Ctx, r: &mut TxnResponse) {
    use proto::etcdserverpb::response_op::Response as R;
    for op in &mut r.responses {
        match &mut op.response {
            Some(R::ResponseRange(x)) => x.header = ctx.header(rev_of(&x.header)),
            Some(R::ResponsePut(x)) => x.header = ctx.header(rev_of(&x.header)),
            Some(R::ResponseDeleteRange(x)) => x.header = ctx.header(rev_of(&x.header)),
            Some(R::ResponseTxn(x)) => {
                x.header = ctx.header(rev_of(&x.header));
                fill_headers(ctx, x);
            }
            None => {}
        }
    }
}

fn rev_of(h: &Option<proto::etcdserverpb::ResponseHeader>) -> i64 {
    h.as_ref().map(|h| h.revision).unwrap_or(0)
}

fn done<T>(ctx: &Ctx, method: &'static str, r: Result<T>) -> Result<Response<T>, Status> {
    let r = r.map(Response::new).map_err(Status::from);
    ctx.metrics.rpc(method, &r);
    r
}

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "KV.Range")]
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let (md, _, r) = req.into_parts();
        done(&self.ctx, "Range", self.do_range(&md, r).await)
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "KV.Put")]
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = self.ctx.auth.caller_of(&req);
        done(
            &self.ctx,
            "Put",
            self.do_put(caller, req.into_inner()).await,
        )
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "KV.DeleteRange")]
    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = self.ctx.auth.caller_of(&req);
        done(
            &self.ctx,
            "DeleteRange",
            self.do_delete(caller, req.into_inner()).await,
        )
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "KV.Txn")]
    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let (md, _, t) = req.into_parts();
        done(&self.ctx, "Txn", self.do_txn(&md, t).await)
    }

    #[tracing::instrument(skip_all, target = "request", level = "debug", name = "KV.Compact")]
    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let caller = self.ctx.auth.caller_of(&req);
        done(
            &self.ctx,
            "Compact",
            self.do_compact(caller, req.into_inner()).await,
        )
    }
}
