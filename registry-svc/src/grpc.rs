//! The gRPC face (`registry.v1.Registry`): converts messages to domain types, calls
//! [`Registry`], converts back. Errors become statuses through `From<Error> for Status`.
//!
//! Every call passes the authentication interceptor ([`GrpcAuth`]) first, which puts the
//! caller's [`Identity`] into the request; each handler hands it to [`Registry`], which checks
//! the permission (see [`crate::registry`]).

use std::pin::Pin;
use std::sync::Arc;

use proto::registry_v1 as pb;
use proto::registry_v1::registry_server::Registry as RegistryApi;
use service_kit::authn::{GrpcAuth, Identity};
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::model::{
    CheckKind, DiscoverFilter, HealthCheckSpec, HealthStatus, Instance, InstanceRef, Protocol,
    ServiceOptions,
};
use crate::registry::{ChangeKind, Registry, WatchItem};

/// The gRPC service over a shared [`Registry`].
#[derive(Clone)]
pub struct GrpcService {
    registry: Arc<Registry>,
}

impl GrpcService {
    /// Wraps a registry.
    pub fn new(registry: Arc<Registry>) -> GrpcService {
        GrpcService { registry }
    }

    /// The tonic server for this service, behind the authentication interceptor.
    pub fn server(
        self,
    ) -> InterceptedService<pb::registry_server::RegistryServer<GrpcService>, GrpcAuth<Error>> {
        let auth = GrpcAuth::new(self.registry.auth().clone());
        InterceptedService::new(pb::registry_server::RegistryServer::new(self), auth)
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

/// A protobuf instance as a domain instance (no validation here: `Registry` validates).
pub fn instance_from_pb(i: pb::Instance) -> Result<Instance, Error> {
    let protocol = match pb::Protocol::try_from(i.protocol) {
        Ok(pb::Protocol::Unspecified | pb::Protocol::Http) => Protocol::Http,
        Ok(pb::Protocol::Grpc) => Protocol::Grpc,
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        Err(_) => {
            return Err(Error::invalid(format!(
                "protocol {} is not one of http, grpc, tcp",
                i.protocol
            )));
        }
    };
    let health_check = match i.health_check {
        None => None,
        Some(h) => {
            let kind = match h.kind {
                Some(pb::health_check::Kind::Http(http)) => CheckKind::Http {
                    path: http.path,
                    tls: http.tls,
                    tls_server_name: http.tls_server_name,
                },
                Some(pb::health_check::Kind::Tcp(_)) => CheckKind::Tcp,
                Some(pb::health_check::Kind::Grpc(g)) => CheckKind::Grpc {
                    service: g.service,
                    tls: g.tls,
                    tls_server_name: g.tls_server_name,
                },
                None => {
                    return Err(Error::invalid(
                        "health_check has no kind: set one of http, tcp, grpc",
                    ));
                }
            };
            Some(HealthCheckSpec {
                kind,
                interval_ms: h.interval_ms,
                timeout_ms: h.timeout_ms,
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
            })
        }
    };
    Ok(Instance {
        namespace: i.namespace,
        service: i.service,
        instance_id: i.instance_id,
        address: i.address,
        port: i.port,
        protocol,
        metadata: i.metadata.into_iter().collect(),
        tags: i.tags,
        weight: i.weight,
        zone: i.zone,
        health_check,
        ttl_seconds: i.ttl_seconds,
        health: HealthStatus::Healthy,
        health_detail: String::new(),
        revision: 0,
    })
}

/// A domain instance as a protobuf instance.
pub fn instance_to_pb(i: Instance) -> pb::Instance {
    let protocol = match i.protocol {
        Protocol::Http => pb::Protocol::Http,
        Protocol::Grpc => pb::Protocol::Grpc,
        Protocol::Tcp => pb::Protocol::Tcp,
    };
    let health_check = i.health_check.map(|h| pb::HealthCheck {
        kind: Some(match h.kind {
            CheckKind::Http {
                path,
                tls,
                tls_server_name,
            } => pb::health_check::Kind::Http(pb::HttpCheck {
                path,
                tls,
                tls_server_name,
            }),
            CheckKind::Tcp => pb::health_check::Kind::Tcp(pb::TcpCheck {}),
            CheckKind::Grpc {
                service,
                tls,
                tls_server_name,
            } => pb::health_check::Kind::Grpc(pb::GrpcCheck {
                service,
                tls,
                tls_server_name,
            }),
        }),
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    });
    let health = match i.health {
        HealthStatus::Healthy => pb::HealthStatus::Healthy,
        HealthStatus::Unhealthy => pb::HealthStatus::Unhealthy,
    };
    pb::Instance {
        namespace: i.namespace,
        service: i.service,
        instance_id: i.instance_id,
        address: i.address,
        port: i.port,
        protocol: protocol as i32,
        metadata: i.metadata.into_iter().collect(),
        tags: i.tags,
        weight: i.weight,
        zone: i.zone,
        health_check,
        ttl_seconds: i.ttl_seconds,
        health: health as i32,
        health_detail: i.health_detail,
        revision: i.revision,
    }
}

fn reference(r: Option<pb::InstanceRef>) -> Result<InstanceRef, Error> {
    let r = r.ok_or_else(|| Error::invalid("instance is missing"))?;
    let r = InstanceRef {
        namespace: r.namespace,
        service: r.service,
        instance_id: r.instance_id,
    };
    r.validate()?;
    Ok(r)
}

fn options_to_pb(o: ServiceOptions) -> pb::ServiceOptions {
    pb::ServiceOptions {
        namespace: o.namespace,
        service: o.service,
        protect_threshold: o.protect_threshold,
    }
}

/// A watch delivery as a protobuf message.
pub fn watch_item_to_pb(item: WatchItem) -> pb::WatchResponse {
    let event = match item {
        WatchItem::Snapshot {
            instances,
            revision,
            resynced,
        } => pb::watch_response::Event::Snapshot(pb::Snapshot {
            instances: instances.into_iter().map(instance_to_pb).collect(),
            revision,
            resynced,
        }),
        WatchItem::Change {
            kind,
            instance,
            revision,
        } => pb::watch_response::Event::Change(pb::Change {
            kind: match kind {
                ChangeKind::Added => pb::ChangeKind::Added,
                ChangeKind::Modified => pb::ChangeKind::Modified,
                ChangeKind::Removed => pb::ChangeKind::Removed,
            } as i32,
            instance: Some(instance_to_pb(*instance)),
            revision,
        }),
    };
    pb::WatchResponse { event: Some(event) }
}

// ---- the service ----------------------------------------------------------------------------

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RegistryApi for GrpcService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let who = caller(&req)?;
        let instance = req
            .into_inner()
            .instance
            .ok_or_else(|| Error::invalid("instance is missing"))?;
        let (instance, revision) = self
            .registry
            .register(&who, instance_from_pb(instance)?)
            .await?;
        Ok(Response::new(pb::RegisterResponse {
            instance: Some(instance_to_pb(instance)),
            revision,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let who = caller(&req)?;
        let r = reference(req.into_inner().instance)?;
        let ttl_seconds = self.registry.heartbeat(&who, &r).await?;
        Ok(Response::new(pb::HeartbeatResponse { ttl_seconds }))
    }

    type KeepAliveStream = BoxStream<pb::HeartbeatResponse>;

    async fn keep_alive(
        &self,
        req: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let who = caller(&req)?;
        let mut incoming = req.into_inner();
        let registry = self.registry.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            // The lease is looked up once per instance and kept while renewals succeed.
            let mut cached: Option<(InstanceRef, i64)> = None;
            let stop = registry.shutdown_token().clone();
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    msg = incoming.next() => match msg {
                        Some(Ok(msg)) => msg,
                        _ => break,
                    },
                };
                let answer = async {
                    let r = reference(msg.instance)?;
                    let lease = match &cached {
                        Some((c, lease)) if *c == r => *lease,
                        _ => registry.lease_of(&who, &r).await?,
                    };
                    let ttl = registry.renew(&who, &r, lease).await?;
                    cached = Some((r, lease));
                    Ok::<_, Error>(ttl)
                }
                .await;
                let end = answer.is_err();
                let msg = answer
                    .map(|ttl_seconds| pb::HeartbeatResponse { ttl_seconds })
                    .map_err(Status::from);
                if tx.send(msg).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let who = caller(&req)?;
        let r = reference(req.into_inner().instance)?;
        let (existed, revision) = self.registry.deregister(&who, &r).await?;
        Ok(Response::new(pb::DeregisterResponse { existed, revision }))
    }

    async fn list_namespaces(
        &self,
        req: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let who = caller(&req)?;
        let (namespaces, revision) = self.registry.list_namespaces(&who).await?;
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces,
            revision,
        }))
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let who = caller(&req)?;
        let (services, revision) = self
            .registry
            .list_services(&who, &req.into_inner().namespace)
            .await?;
        Ok(Response::new(pb::ListServicesResponse {
            services,
            revision,
        }))
    }

    async fn discover(
        &self,
        req: Request<pb::DiscoverRequest>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let filter = DiscoverFilter {
            tags: r.tags,
            zone: r.zone,
            metadata: r.metadata.into_iter().collect(),
            healthy_only: r.healthy_only,
        };
        let d = self
            .registry
            .discover(&who, &r.namespace, &r.service, &filter)
            .await?;
        Ok(Response::new(pb::DiscoverResponse {
            instances: d.instances.into_iter().map(instance_to_pb).collect(),
            revision: d.revision,
            protect_threshold_triggered: d.protect_threshold_triggered,
        }))
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let svc = (!r.service.is_empty()).then_some(r.service.as_str());
        let rx = self
            .registry
            .watch(&who, &r.namespace, svc, r.after_revision)
            .await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|item| item.map(watch_item_to_pb).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn set_service_options(
        &self,
        req: Request<pb::SetServiceOptionsRequest>,
    ) -> Result<Response<pb::ServiceOptions>, Status> {
        let who = caller(&req)?;
        let o = req
            .into_inner()
            .options
            .ok_or_else(|| Error::invalid("options is missing"))?;
        let set = self
            .registry
            .set_options(
                &who,
                ServiceOptions {
                    namespace: o.namespace,
                    service: o.service,
                    protect_threshold: o.protect_threshold,
                },
            )
            .await?;
        Ok(Response::new(options_to_pb(set)))
    }

    async fn get_service_options(
        &self,
        req: Request<pb::GetServiceOptionsRequest>,
    ) -> Result<Response<pb::ServiceOptions>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let o = self
            .registry
            .options(&who, &r.namespace, &r.service)
            .await?;
        Ok(Response::new(options_to_pb(o)))
    }
}
