//! The client library services use to register themselves (and to discover others).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tonic::Status> {
//! use registry_svc::client::RegistryClient;
//! use proto::registry_v1::Instance;
//!
//! let client = RegistryClient::connect(["http://127.0.0.1:9200"])?;
//! let me = client
//!     .register(Instance {
//!         namespace: "prod".into(),
//!         service: "orders".into(),
//!         address: "10.0.0.7".into(),
//!         port: 8080,
//!         ttl_seconds: 10,
//!         ..Default::default()
//!     })
//!     .await?;
//! // ... serve ...
//! me.deregister().await?; // on shutdown
//! # Ok(()) }
//! ```
//!
//! [`RegistryClient::register`] returns a [`Registration`] whose background task heart-beats on
//! a `KeepAlive` stream every third of the TTL. When the registry answers `NOT_FOUND` (the
//! instance expired during a registry or coordinator outage longer than its TTL) it registers
//! the instance again under the same ID; when a registry endpoint fails it moves to the next
//! one. Dropping the registration stops heart-beating (the instance then expires after its
//! TTL); [`Registration::deregister`] removes it at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proto::registry_v1 as pb;
use proto::registry_v1::registry_client::RegistryClient as Grpc;
use service_kit::authn::BearerToken;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// A client of one or more registry-svc replicas; cheap to clone.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    channels: Vec<Channel>,
    current: AtomicUsize,
    /// Sent with every call (none by default).
    token: BearerToken,
}

/// The channel the generated client runs on: the bearer token (if any) added to every call.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

impl RegistryClient {
    /// A client for the gRPC endpoints of registry replicas (`http://host:port`). Connects
    /// lazily; must be called inside a Tokio runtime.
    pub fn connect<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
    ) -> Result<RegistryClient, Status> {
        Self::connect_tls(endpoints, None)
    }

    /// Like [`connect`](Self::connect), over TLS when `tls` is set (the registry's CA and a
    /// client certificate: `service_kit::tls::ClientTlsFiles`).
    pub fn connect_tls<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
        tls: Option<Arc<service_kit::tls::rustls::ClientConfig>>,
    ) -> Result<RegistryClient, Status> {
        let mut channels = Vec::new();
        for e in endpoints {
            let url: String = e.into();
            let url = if url.contains("://") {
                url
            } else {
                format!("http://{url}")
            };
            let endpoint = Endpoint::from_shared(service_kit::tls::plain_scheme(&url))
                .map_err(|err| Status::invalid_argument(format!("endpoint {url:?}: {err}")))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true);
            channels.push(service_kit::tls::lazy_channel(endpoint, tls.as_ref()));
        }
        if channels.is_empty() {
            return Err(Status::invalid_argument("no registry endpoints given"));
        }
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                channels,
                current: AtomicUsize::new(0),
                token: BearerToken::default(),
            }),
        })
    }

    /// The same client sending `Authorization: Bearer <token>` with every call (for a
    /// registry with auth on; an empty token sends none). Fails if the token is not visible
    /// ASCII.
    pub fn with_token(self, token: &str) -> Result<RegistryClient, Status> {
        let token = BearerToken::new(token).map_err(Status::invalid_argument)?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                channels: self.inner.channels.clone(),
                current: AtomicUsize::new(0),
                token,
            }),
        })
    }

    /// The generated gRPC client on the current endpoint.
    pub fn grpc(&self) -> Grpc<AuthChannel> {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.channels.len();
        // A Discover or watch snapshot of a big service exceeds tonic's 4 MiB default (about
        // 310 bytes per instance): accept what the coordinator client accepts.
        Grpc::with_interceptor(self.inner.channels[i].clone(), self.inner.token.clone())
            .max_decoding_message_size(coord_client::MAX_RESPONSE_BYTES)
    }

    /// Moves to the next endpoint (after a failure).
    fn rotate(&self) {
        self.inner.current.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs a unary call, moving to the next endpoint on `UNAVAILABLE` (each endpoint once).
    async fn unary<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Grpc<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last = Status::unavailable("no endpoint tried");
        for _ in 0..self.inner.channels.len() {
            match call(self.grpc()).await {
                Err(s) if s.code() == Code::Unavailable => {
                    self.rotate();
                    last = s;
                }
                other => return other,
            }
        }
        Err(last)
    }

    /// Registers once, without keeping the instance alive.
    pub async fn register_once(&self, instance: pb::Instance) -> Result<pb::Instance, Status> {
        self.unary(|mut g| {
            let instance = instance.clone();
            async move {
                g.register(pb::RegisterRequest {
                    instance: Some(instance),
                })
                .await
                .map(|r| r.into_inner().instance.unwrap_or_default())
            }
        })
        .await
    }

    /// Registers `instance` and keeps it registered until the [`Registration`] is dropped or
    /// deregistered (see the module docs).
    pub async fn register(&self, instance: pb::Instance) -> Result<Registration, Status> {
        let registered = self.register_once(instance).await?;
        let (tx, rx) = watch::channel(registered.clone());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(keep_registered(
            self.clone(),
            registered,
            tx,
            cancel.clone(),
        ));
        Ok(Registration {
            client: self.clone(),
            instance: rx,
            cancel,
            task: Some(task),
        })
    }

    /// Discovers the instances of a service.
    pub async fn discover(&self, req: pb::DiscoverRequest) -> Result<pb::DiscoverResponse, Status> {
        self.unary(|mut g| {
            let req = req.clone();
            async move { g.discover(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Opens a watch (see `registry.v1.Registry/Watch`).
    pub async fn watch(
        &self,
        req: pb::WatchRequest,
    ) -> Result<tonic::Streaming<pb::WatchResponse>, Status> {
        self.unary(|mut g| {
            let req = req.clone();
            async move { g.watch(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Deregisters an instance.
    pub async fn deregister(&self, r: pb::InstanceRef) -> Result<bool, Status> {
        self.unary(|mut g| {
            let r = r.clone();
            async move {
                g.deregister(pb::DeregisterRequest { instance: Some(r) })
                    .await
                    .map(|resp| resp.into_inner().existed)
            }
        })
        .await
    }
}

fn reference(i: &pb::Instance) -> pb::InstanceRef {
    pb::InstanceRef {
        namespace: i.namespace.clone(),
        service: i.service.clone(),
        instance_id: i.instance_id.clone(),
    }
}

/// An instance kept registered by a background task.
pub struct Registration {
    client: RegistryClient,
    instance: watch::Receiver<pb::Instance>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    /// The instance as last registered (its ID, revision and defaults filled in).
    pub fn instance(&self) -> pb::Instance {
        self.instance.borrow().clone()
    }

    /// A receiver that sees every re-registration.
    pub fn subscribe(&self) -> watch::Receiver<pb::Instance> {
        self.instance.clone()
    }

    /// Stops heart-beating and removes the instance now.
    pub async fn deregister(mut self) -> Result<(), Status> {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let r = reference(&self.instance.borrow());
        self.client.deregister(r).await.map(|_| ())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

async fn keep_registered(
    client: RegistryClient,
    mut instance: pb::Instance,
    tx: watch::Sender<pb::Instance>,
    cancel: CancellationToken,
) {
    let ttl = Duration::from_secs(u64::from(instance.ttl_seconds.max(2)));
    let period = (ttl / 3).max(Duration::from_millis(300));
    let mut backoff = Duration::from_millis(100);
    'reconnect: loop {
        if cancel.is_cancelled() {
            return;
        }
        let (req_tx, req_rx) = mpsc::channel(1);
        let opened = client
            .grpc()
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(req_rx))
            .await;
        let mut stream = match opened {
            Ok(s) => s.into_inner(),
            Err(e) => {
                tracing::debug!(error = %e, "registry keep-alive: cannot open a stream");
                client.rotate();
                if !sleep_or_cancel(backoff, &cancel).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        loop {
            let hb = pb::HeartbeatRequest {
                instance: Some(reference(&instance)),
            };
            if req_tx.send(hb).await.is_err() {
                continue 'reconnect;
            }
            let answer = tokio::select! {
                _ = cancel.cancelled() => return,
                a = tokio::time::timeout(ttl, stream.message()) => a,
            };
            match answer {
                Ok(Ok(Some(_))) => {
                    backoff = Duration::from_millis(100);
                    if !sleep_or_cancel(period, &cancel).await {
                        return;
                    }
                }
                Ok(Err(s)) if s.code() == Code::NotFound => {
                    tracing::warn!(id = %instance.instance_id, "registration lost; registering again");
                    loop {
                        match client.register_once(instance.clone()).await {
                            Ok(again) => {
                                instance = again;
                                let _ = tx.send(instance.clone());
                                break;
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "re-registration failed; retrying");
                                client.rotate();
                                if !sleep_or_cancel(backoff, &cancel).await {
                                    return;
                                }
                                backoff = (backoff * 2).min(Duration::from_secs(2));
                            }
                        }
                    }
                    continue 'reconnect;
                }
                other => {
                    tracing::debug!(answer = ?other.map(|r| r.map(|_| ())), "registry keep-alive broke; reconnecting");
                    client.rotate();
                    if !sleep_or_cancel(backoff, &cancel).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue 'reconnect;
                }
            }
        }
    }
}
