//! The gRPC face (`config.v1.Config`): converts messages to domain types, calls [`Store`] or
//! [`Hub`], converts back. Errors become statuses through `From<Error> for Status`.
//!
//! Every call passes the authentication interceptor ([`GrpcAuth`]) first, which puts the
//! caller's [`Identity`] into the request; each handler hands it to [`Store`] or [`Hub`], which
//! check the permission (see [`crate::store`]).

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use proto::config_v1 as pb;
use proto::config_v1::config_server::Config as ConfigApi;
use service_kit::authn::{GrpcAuth, Identity};
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::diff::{Diff, KeyOp, LineOp};
use crate::error::Error;
use crate::model::{ClientInfo, Format, ItemRef, Rollout, RolloutRule, StoredVersion};
use crate::store::{Item, PublishInput, Published, Store, Version};
use crate::validate::Problem;
use crate::watch::{Hub, Reason, Scope, WatchItem};

/// The gRPC service over a shared [`Store`] and [`Hub`].
#[derive(Clone)]
pub struct GrpcService {
    store: Arc<Store>,
    hub: Arc<Hub>,
}

impl GrpcService {
    /// Wraps a store and a hub.
    pub fn new(store: Arc<Store>, hub: Arc<Hub>) -> GrpcService {
        GrpcService { store, hub }
    }

    /// The tonic server for this service (accepting messages up to 4 MiB), behind the
    /// authentication interceptor.
    pub fn server(
        self,
    ) -> InterceptedService<pb::config_server::ConfigServer<GrpcService>, GrpcAuth<Error>> {
        let auth = GrpcAuth::new(self.store.auth().clone());
        let server = pb::config_server::ConfigServer::new(self)
            .max_decoding_message_size(4 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024);
        InterceptedService::new(server, auth)
    }
}

/// The caller, as the interceptor found it.
fn caller<T>(req: &Request<T>) -> Result<Identity, Error> {
    req.extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Error::Internal("the authentication interceptor did not run".into()))
}

// ---- conversions ----------------------------------------------------------------------------

/// A protobuf format as a domain format (`None` for unspecified).
pub fn format_from_pb(f: i32) -> Result<Option<Format>, Error> {
    match pb::Format::try_from(f) {
        Ok(pb::Format::Unspecified) => Ok(None),
        Ok(pb::Format::Text) => Ok(Some(Format::Text)),
        Ok(pb::Format::Json) => Ok(Some(Format::Json)),
        Ok(pb::Format::Yaml) => Ok(Some(Format::Yaml)),
        Ok(pb::Format::Toml) => Ok(Some(Format::Toml)),
        Ok(pb::Format::Properties) => Ok(Some(Format::Properties)),
        Err(_) => Err(Error::invalid(format!(
            "format {f} is not one of json, yaml, toml, properties, text"
        ))),
    }
}

/// A domain format as a protobuf format.
pub fn format_to_pb(f: Format) -> pb::Format {
    match f {
        Format::Text => pb::Format::Text,
        Format::Json => pb::Format::Json,
        Format::Yaml => pb::Format::Yaml,
        Format::Toml => pb::Format::Toml,
        Format::Properties => pb::Format::Properties,
    }
}

/// A protobuf item reference (required).
pub fn item_from_pb(r: Option<pb::ItemRef>) -> Result<ItemRef, Error> {
    let r = r.ok_or_else(|| Error::invalid("item is missing"))?;
    let item = ItemRef::new(r.namespace, r.group, r.key);
    item.validate()?;
    Ok(item)
}

/// A domain item reference as protobuf.
pub fn item_to_pb(r: &ItemRef) -> pb::ItemRef {
    pb::ItemRef {
        namespace: r.namespace.clone(),
        group: r.group.clone(),
        key: r.key.clone(),
    }
}

fn client_from_pb(c: Option<pb::Client>) -> ClientInfo {
    c.map(|c| ClientInfo {
        id: c.id,
        labels: c.labels.into_iter().collect(),
    })
    .unwrap_or_default()
}

fn rule_from_pb(r: Option<pb::RolloutRule>) -> Option<RolloutRule> {
    r.map(|r| RolloutRule {
        labels: r.labels.into_iter().collect(),
        percentage: r.percentage,
    })
}

fn rule_to_pb(r: &RolloutRule) -> pb::RolloutRule {
    pb::RolloutRule {
        labels: r.labels.clone().into_iter().collect(),
        percentage: r.percentage,
    }
}

fn rollout_to_pb(r: &Rollout) -> pb::Rollout {
    pb::Rollout {
        candidate: r.candidate,
        base: r.base,
        rule: Some(rule_to_pb(&r.rule)),
        author: r.author.clone(),
        started_at_ms: r.started_at_ms,
    }
}

/// A domain version as protobuf.
pub fn version_to_pb(v: &Version) -> pb::Version {
    let h = &v.header;
    pb::Version {
        item: Some(item_to_pb(&v.item)),
        number: h.number,
        format: format_to_pb(h.format) as i32,
        content: v.content.clone().unwrap_or_default(),
        checksum: h.checksum.clone(),
        author: h.author.clone(),
        message: h.message.clone(),
        created_at_ms: h.created_at_ms,
        rollback_of: h.rollback_of.unwrap_or(0),
        candidate: h.candidate,
        size: h.size,
    }
}

/// A stored version (with content) as protobuf.
pub fn stored_to_pb(item: &ItemRef, v: &StoredVersion) -> pb::Version {
    version_to_pb(&Version::new(item.clone(), v, true))
}

/// A domain item as protobuf.
pub fn item_info_to_pb(i: &Item) -> pb::Item {
    pb::Item {
        item: Some(item_to_pb(&i.item)),
        format: format_to_pb(i.format) as i32,
        current_version: i.current_version,
        latest_version: i.latest_version,
        deleted: i.deleted,
        schema: i.schema.clone().unwrap_or_default(),
        retention: i.retention,
        rollout: i.rollout.as_ref().map(rollout_to_pb),
        created_at_ms: i.created_at_ms,
        updated_at_ms: i.updated_at_ms,
        aborted: i.aborted.clone(),
    }
}

fn published_to_pb(p: Published) -> pb::PublishResponse {
    pb::PublishResponse {
        version: Some(version_to_pb(&p.version)),
        item: Some(item_info_to_pb(&p.item)),
        revision: p.revision,
    }
}

fn problem_to_pb(p: Problem) -> pb::Problem {
    pb::Problem {
        message: p.message,
        line: p.line,
        column: p.column,
        path: p.path,
    }
}

fn diff_to_pb(d: Diff) -> pb::DiffResponse {
    pb::DiffResponse {
        from_version: d.from_version,
        to_version: d.to_version,
        lines: d
            .lines
            .into_iter()
            .map(|l| pb::DiffLine {
                op: match l.op {
                    LineOp::Equal => pb::diff_line::Op::Equal,
                    LineOp::Insert => pb::diff_line::Op::Insert,
                    LineOp::Delete => pb::diff_line::Op::Delete,
                } as i32,
                text: l.text,
                old_line: l.old_line,
                new_line: l.new_line,
            })
            .collect(),
        unified: d.unified,
        structured: d.structured,
        changes: d
            .changes
            .into_iter()
            .map(|c| pb::KeyChange {
                path: c.path,
                op: match c.op {
                    KeyOp::Added => pb::key_change::Op::Added,
                    KeyOp::Removed => pb::key_change::Op::Removed,
                    KeyOp::Changed => pb::key_change::Op::Changed,
                } as i32,
                old_value: c.old_value,
                new_value: c.new_value,
            })
            .collect(),
    }
}

/// A domain reason as protobuf.
pub fn reason_to_pb(r: Reason) -> pb::Reason {
    match r {
        Reason::Initial => pb::Reason::Initial,
        Reason::Missed => pb::Reason::Missed,
        Reason::Published => pb::Reason::Published,
        Reason::RolledBack => pb::Reason::RolledBack,
        Reason::Rollout => pb::Reason::Rollout,
        Reason::Promoted => pb::Reason::Promoted,
        Reason::Aborted => pb::Reason::Aborted,
    }
}

/// A watch delivery as protobuf.
pub fn watch_item_to_pb(item: WatchItem) -> pb::WatchResponse {
    let event = match item {
        WatchItem::Update {
            item,
            version,
            reason,
        } => pb::watch_response::Event::Update(pb::Update {
            version: Some(stored_to_pb(&item, &version)),
            reason: reason_to_pb(reason) as i32,
        }),
        WatchItem::Deleted { item } => pb::watch_response::Event::Deleted(pb::Deleted {
            item: Some(item_to_pb(&item)),
        }),
        WatchItem::Synced { revision } => {
            pb::watch_response::Event::Synced(pb::Synced { revision })
        }
    };
    pb::WatchResponse { event: Some(event) }
}

/// The scope, known versions and client of a watch request.
pub fn watch_from_pb(
    r: pb::WatchRequest,
) -> Result<(Scope, HashMap<ItemRef, u64>, ClientInfo), Error> {
    let scope = match (r.items.is_empty(), r.prefix) {
        (false, None) => Scope::Items(
            r.items
                .into_iter()
                .map(|i| item_from_pb(Some(i)))
                .collect::<Result<BTreeSet<_>, _>>()?,
        ),
        (true, Some(p)) => Scope::Prefix {
            namespace: p.namespace,
            group: (!p.group.is_empty()).then_some(p.group),
        },
        (false, Some(_)) => return Err(Error::invalid("give either items or a prefix, not both")),
        (true, None) => return Err(Error::invalid("give items or a prefix to watch")),
    };
    let mut known = HashMap::new();
    for k in r.known {
        known.insert(item_from_pb(k.item)?, k.version);
    }
    Ok((scope, known, client_from_pb(r.client)))
}

// ---- the service ----------------------------------------------------------------------------

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigApi for GrpcService {
    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let input = PublishInput {
            item: Some(item_from_pb(r.item)?),
            format: format_from_pb(r.format)?,
            content: r.content,
            author: r.author,
            message: r.message,
            expected_version: r.expected_version,
            schema: r.schema,
            retention: r.retention,
            rollout: rule_from_pb(r.rollout),
        };
        Ok(Response::new(published_to_pb(
            self.store.publish(&who, input).await?,
        )))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let item = item_from_pb(r.item)?;
        let (version, info) = self
            .store
            .get(&who, &item, r.version, &client_from_pb(r.client))
            .await?;
        Ok(Response::new(pb::GetResponse {
            version: Some(stored_to_pb(&item, &version)),
            item: Some(item_info_to_pb(&info)),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let group = (!r.group.is_empty()).then_some(r.group.as_str());
        let page = self
            .store
            .list(
                &who,
                &r.namespace,
                group,
                r.include_deleted,
                r.page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(pb::ListResponse {
            items: page.items.iter().map(item_info_to_pb).collect(),
            next_page_token: page.next_page_token,
            revision: page.revision,
        }))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let item = item_from_pb(r.item)?;
        let page = self
            .store
            .history(&who, &item, r.page_size, &r.page_token, r.include_content)
            .await?;
        Ok(Response::new(pb::HistoryResponse {
            versions: page.versions.iter().map(version_to_pb).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn diff(
        &self,
        req: Request<pb::DiffRequest>,
    ) -> Result<Response<pb::DiffResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let item = item_from_pb(r.item)?;
        let d = self
            .store
            .diff(&who, &item, r.from_version, r.to_version)
            .await?;
        Ok(Response::new(diff_to_pb(d)))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let item = item_from_pb(r.item)?;
        let p = self
            .store
            .rollback(
                &who,
                item,
                r.version,
                r.author,
                r.message,
                r.expected_version,
            )
            .await?;
        Ok(Response::new(published_to_pb(p)))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let item = item_from_pb(r.item)?;
        let (deleted, info, revision) = self.store.delete(&who, &item, r.expected_version).await?;
        Ok(Response::new(pb::DeleteResponse {
            deleted,
            item: Some(item_info_to_pb(&info)),
            revision,
        }))
    }

    async fn purge(
        &self,
        req: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        let who = caller(&req)?;
        let item = item_from_pb(req.into_inner().item)?;
        let revision = self.store.purge(&who, &item).await?;
        Ok(Response::new(pb::PurgeResponse { revision }))
    }

    async fn set_options(
        &self,
        req: Request<pb::SetOptionsRequest>,
    ) -> Result<Response<pb::Item>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let item = item_from_pb(r.item)?;
        let info = self
            .store
            .set_options(&who, &item, r.schema, r.retention)
            .await?;
        Ok(Response::new(item_info_to_pb(&info)))
    }

    async fn validate(
        &self,
        req: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let r = req.into_inner();
        let format =
            format_from_pb(r.format)?.ok_or_else(|| Error::invalid("format is required"))?;
        let problems = self
            .store
            .validate(format, &r.content, Some(r.schema.as_str()))?;
        Ok(Response::new(pb::ValidateResponse {
            valid: problems.is_empty(),
            problems: problems.into_iter().map(problem_to_pb).collect(),
        }))
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::Item>, Status> {
        let who = caller(&req)?;
        let item = item_from_pb(req.into_inner().item)?;
        let info = self.store.promote(&who, &item).await?;
        Ok(Response::new(item_info_to_pb(&info)))
    }

    async fn abort(&self, req: Request<pb::AbortRequest>) -> Result<Response<pb::Item>, Status> {
        let who = caller(&req)?;
        let item = item_from_pb(req.into_inner().item)?;
        let info = self.store.abort(&who, &item).await?;
        Ok(Response::new(item_info_to_pb(&info)))
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = caller(&req)?;
        let (scope, known, client) = watch_from_pb(req.into_inner())?;
        let rx = self.hub.watch(&who, scope, known, client).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|item| item.map(watch_item_to_pb).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }
}
