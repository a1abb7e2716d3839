//! The client library applications use to read their configuration.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tonic::Status> {
//! use config_svc::client::{Change, ConfigClient};
//! use config_svc::model::ItemRef;
//!
//! let client = ConfigClient::builder(["http://127.0.0.1:9300"])
//!     .client_id("orders-7")
//!     .label("zone", "a")
//!     .cache_dir("/var/cache/orders")
//!     .build()?;
//! let item = ItemRef::new("prod", "orders", "app.yaml");
//! let now = client.fetch(&item).await?; // falls back to the cached copy while unreachable
//! println!("version {} (stale: {})", now.version.number, now.stale);
//! let sub = client.subscribe(vec![item.clone()], |change: &Change| {
//!     if let Change::Updated { version, .. } = change {
//!         println!("now at version {}", version.number);
//!     }
//! });
//! let latest = sub.get(&item); // always the last good version, even while disconnected
//! # let _ = latest; Ok(()) }
//! ```
//!
//! # Guarantees
//! - A version is accepted only if its content matches its SHA-256 checksum; the *last good
//!   version* of each item is kept in memory and, with a cache directory, on disk
//!   (`<dir>/<ns>/<group>/<key>.json`, replaced atomically), so a process that restarts while
//!   config-svc is down still starts with its configuration.
//! - [`ConfigClient::fetch`] answers from the service, or, if it cannot be reached, from the
//!   cache (flagged `stale`).
//! - A [`Subscription`] keeps one watch open and reconnects (moving through the endpoints,
//!   with backoff) for as long as it lives; on reconnect it tells the service which versions it
//!   holds, so it is sent exactly what it missed, in order. The callback runs on the
//!   subscription's task, once per change, in order; it should return quickly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use proto::config_v1 as pb;
use proto::config_v1::config_client::ConfigClient as Grpc;
use serde::{Deserialize, Serialize};
use service_kit::authn::BearerToken;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::model::{ItemRef, checksum};

/// Builds a [`ConfigClient`].
pub struct Builder {
    endpoints: Vec<String>,
    client: pb::Client,
    cache_dir: Option<PathBuf>,
    timeout: Duration,
    token: String,
    tls: Option<Arc<service_kit::tls::rustls::ClientConfig>>,
}

impl Builder {
    /// Dial over TLS (config-svc's CA and a client certificate:
    /// `service_kit::tls::ClientTlsFiles`); `None` dials plain TCP.
    pub fn tls(mut self, tls: Option<Arc<service_kit::tls::rustls::ClientConfig>>) -> Builder {
        self.tls = tls;
        self
    }

    /// Send `Authorization: Bearer <token>` with every call (for a config-svc with auth on).
    pub fn token(mut self, token: impl Into<String>) -> Builder {
        self.token = token.into();
        self
    }

    /// This client's stable id (for percentage rollouts).
    pub fn client_id(mut self, id: impl Into<String>) -> Builder {
        self.client.id = id.into();
        self
    }

    /// A label (for label-selected rollouts).
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Builder {
        self.client.labels.insert(name.into(), value.into());
        self
    }

    /// Keep the last good versions on disk under `dir` too.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Timeout of one unary call (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Builder {
        self.timeout = timeout;
        self
    }

    /// The client (connects lazily; call inside a Tokio runtime).
    pub fn build(self) -> Result<ConfigClient, Status> {
        let token = BearerToken::new(&self.token).map_err(Status::invalid_argument)?;
        let mut channels = Vec::new();
        for e in &self.endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            };
            let endpoint = Endpoint::from_shared(service_kit::tls::plain_scheme(&url))
                .map_err(|err| Status::invalid_argument(format!("endpoint {url:?}: {err}")))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            channels.push(service_kit::tls::lazy_channel(endpoint, self.tls.as_ref()));
        }
        if channels.is_empty() {
            return Err(Status::invalid_argument("no config-svc endpoints given"));
        }
        Ok(ConfigClient {
            inner: Arc::new(Inner {
                channels,
                current: AtomicUsize::new(0),
                token,
                client: self.client,
                cache: Cache {
                    memory: Mutex::new(HashMap::new()),
                    dir: self.cache_dir,
                },
                timeout: self.timeout,
            }),
        })
    }
}

/// A client of one or more config-svc replicas; cheap to clone.
#[derive(Clone)]
pub struct ConfigClient {
    inner: Arc<Inner>,
}

/// The channel the generated client runs on: the bearer token (if any) added to every call.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

struct Inner {
    channels: Vec<Channel>,
    current: AtomicUsize,
    /// Sent with every call (none by default).
    token: BearerToken,
    client: pb::Client,
    cache: Cache,
    timeout: Duration,
}

/// A fetched version.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The version (with content).
    pub version: pb::Version,
    /// True if it came from the cache because the service could not be reached.
    pub stale: bool,
}

/// A change a subscription saw.
#[derive(Debug, Clone)]
pub enum Change {
    /// A new version to use.
    Updated {
        /// The version (with content; its checksum was verified).
        version: pb::Version,
        /// Why it was sent.
        reason: pb::Reason,
    },
    /// The item was deleted; the cached copy is kept.
    Deleted {
        /// Which item.
        item: ItemRef,
    },
}

/// True for failures that mean "the service could not be reached" (the cache answers then).
pub fn is_unreachable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

fn pb_ref(i: &ItemRef) -> pb::ItemRef {
    pb::ItemRef {
        namespace: i.namespace.clone(),
        group: i.group.clone(),
        key: i.key.clone(),
    }
}

fn item_of(v: &pb::Version) -> Option<ItemRef> {
    v.item
        .as_ref()
        .map(|i| ItemRef::new(i.namespace.clone(), i.group.clone(), i.key.clone()))
}

impl ConfigClient {
    /// A builder for the gRPC endpoints of config-svc replicas (`http://host:port`).
    pub fn builder<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Builder {
        Builder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            client: pb::Client::default(),
            cache_dir: None,
            timeout: Duration::from_secs(5),
            token: String::new(),
            tls: None,
        }
    }

    /// A client with no id, labels or disk cache.
    pub fn connect<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
    ) -> Result<ConfigClient, Status> {
        Self::builder(endpoints).build()
    }

    /// The generated gRPC client on the current endpoint.
    pub fn grpc(&self) -> Grpc<AuthChannel> {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.channels.len();
        Grpc::with_interceptor(self.inner.channels[i].clone(), self.inner.token.clone())
            .max_decoding_message_size(16 * 1024 * 1024)
    }

    fn rotate(&self) {
        self.inner.current.fetch_add(1, Ordering::Relaxed);
    }

    /// Fetches the version meant for this client: from the service (trying each endpoint
    /// once), else from the cache (`stale`). Errors the service gave (e.g. `NOT_FOUND`) are
    /// returned as they are.
    pub async fn fetch(&self, item: &ItemRef) -> Result<Fetched, Status> {
        let mut last = Status::unavailable("no endpoint tried");
        for _ in 0..self.inner.channels.len() {
            let req = pb::GetRequest {
                item: Some(pb_ref(item)),
                version: 0,
                client: Some(self.inner.client.clone()),
            };
            let answer = tokio::time::timeout(self.inner.timeout, self.grpc().get(req)).await;
            match answer {
                Ok(Ok(resp)) => {
                    let version = resp.into_inner().version.unwrap_or_default();
                    if !self.inner.cache.accept(item, &version) {
                        return Err(Status::data_loss(format!(
                            "version {} of {item} does not match its checksum",
                            version.number
                        )));
                    }
                    return Ok(Fetched {
                        version,
                        stale: false,
                    });
                }
                Ok(Err(s)) if !is_unreachable(&s) => return Err(s),
                Ok(Err(s)) => last = s,
                Err(_) => last = Status::deadline_exceeded("config-svc did not answer in time"),
            }
            self.rotate();
        }
        match self.inner.cache.get(item) {
            Some(version) => {
                tracing::warn!(item = %item, error = %last, "config-svc unreachable; serving the cached version");
                Ok(Fetched {
                    version,
                    stale: true,
                })
            }
            None => Err(last),
        }
    }

    /// The last good version of `item` this client holds (memory, then disk).
    pub fn cached(&self, item: &ItemRef) -> Option<pb::Version> {
        self.inner.cache.get(item)
    }

    /// Watches `items` until the subscription is dropped, calling `on_change` for each change
    /// (see the module docs).
    pub fn subscribe(
        &self,
        items: Vec<ItemRef>,
        on_change: impl Fn(&Change) + Send + Sync + 'static,
    ) -> Subscription {
        for item in &items {
            // Load the disk copies now so `get` serves at once.
            let _ = self.inner.cache.get(item);
        }
        let cancel = CancellationToken::new();
        let (synced_tx, synced) = watch::channel(false);
        let task = tokio::spawn(keep_watching(
            self.clone(),
            items.clone(),
            Arc::new(on_change),
            synced_tx,
            cancel.clone(),
        ));
        Subscription {
            client: self.clone(),
            synced,
            cancel,
            task: Some(task),
        }
    }
}

/// A watch kept open by a background task; ends when dropped.
pub struct Subscription {
    client: ConfigClient,
    synced: watch::Receiver<bool>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Subscription {
    /// The last good version of `item`.
    pub fn get(&self, item: &ItemRef) -> Option<pb::Version> {
        self.client.cached(item)
    }

    /// True while connected and caught up with the service.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until connected and caught up (false after `timeout`).
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.synced.clone();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }

    /// Stops watching.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn keep_watching(
    client: ConfigClient,
    items: Vec<ItemRef>,
    on_change: Arc<dyn Fn(&Change) + Send + Sync>,
    synced: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let known = items
            .iter()
            .filter_map(|i| {
                client.cached(i).map(|v| pb::KnownVersion {
                    item: Some(pb_ref(i)),
                    version: v.number,
                })
            })
            .collect();
        let req = pb::WatchRequest {
            items: items.iter().map(pb_ref).collect(),
            prefix: None,
            known,
            client: Some(client.inner.client.clone()),
        };
        let mut grpc = client.grpc();
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            r = grpc.watch(req) => r,
        };
        match opened {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    let msg = tokio::select! {
                        _ = cancel.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let event = match msg {
                        Ok(Some(m)) => m.event,
                        Ok(None) => break,
                        Err(s) => {
                            tracing::debug!(error = %s, "config watch broke; reconnecting");
                            break;
                        }
                    };
                    match event {
                        Some(pb::watch_response::Event::Synced(_)) => {
                            backoff = Duration::from_millis(100);
                            let _ = synced.send(true);
                        }
                        Some(pb::watch_response::Event::Update(u)) => {
                            let Some(version) = u.version else { continue };
                            let Some(item) = item_of(&version) else {
                                continue;
                            };
                            if client.inner.cache.accept(&item, &version) {
                                let reason = pb::Reason::try_from(u.reason)
                                    .unwrap_or(pb::Reason::Unspecified);
                                on_change(&Change::Updated { version, reason });
                            } else {
                                tracing::warn!(item = %item, version = version.number, "version does not match its checksum; ignored");
                            }
                        }
                        Some(pb::watch_response::Event::Deleted(d)) => {
                            if let Some(i) = d.item {
                                let item = ItemRef::new(i.namespace, i.group, i.key);
                                on_change(&Change::Deleted { item });
                            }
                        }
                        None => {}
                    }
                }
            }
            Err(s) => tracing::debug!(error = %s, "cannot open a config watch"),
        }
        let _ = synced.send(false);
        client.rotate();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// The last good versions: memory, and optionally disk.
struct Cache {
    memory: Mutex<HashMap<ItemRef, pb::Version>>,
    dir: Option<PathBuf>,
}

/// A version as kept on disk.
#[derive(Serialize, Deserialize)]
struct OnDisk {
    namespace: String,
    group: String,
    key: String,
    number: u64,
    format: i32,
    content: String,
    checksum: String,
    author: String,
    message: String,
    created_at_ms: i64,
    rollback_of: u64,
    candidate: bool,
}

impl Cache {
    fn path(dir: &Path, item: &ItemRef) -> PathBuf {
        dir.join(&item.namespace)
            .join(&item.group)
            .join(format!("{}.json", item.key))
    }

    /// Keeps `v` as the last good version of `item` if its checksum holds.
    fn accept(&self, item: &ItemRef, v: &pb::Version) -> bool {
        if checksum(&v.content) != v.checksum {
            return false;
        }
        self.memory.lock().insert(item.clone(), v.clone());
        if let Some(dir) = &self.dir
            && let Err(e) = Self::write(dir, item, v)
        {
            tracing::warn!(item = %item, error = %e, "cannot write the config cache");
        }
        true
    }

    fn write(dir: &Path, item: &ItemRef, v: &pb::Version) -> std::io::Result<()> {
        let path = Self::path(dir, item);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let disk = OnDisk {
            namespace: item.namespace.clone(),
            group: item.group.clone(),
            key: item.key.clone(),
            number: v.number,
            format: v.format,
            content: v.content.clone(),
            checksum: v.checksum.clone(),
            author: v.author.clone(),
            message: v.message.clone(),
            created_at_ms: v.created_at_ms,
            rollback_of: v.rollback_of,
            candidate: v.candidate,
        };
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&disk)?)?;
        std::fs::rename(&tmp, &path)
    }

    fn get(&self, item: &ItemRef) -> Option<pb::Version> {
        if let Some(v) = self.memory.lock().get(item) {
            return Some(v.clone());
        }
        let dir = self.dir.as_ref()?;
        let raw = std::fs::read(Self::path(dir, item)).ok()?;
        let d: OnDisk = serde_json::from_slice(&raw).ok()?;
        if checksum(&d.content) != d.checksum {
            tracing::warn!(item = %item, "cached config does not match its checksum; ignored");
            return None;
        }
        let v = pb::Version {
            item: Some(pb_ref(item)),
            number: d.number,
            format: d.format,
            size: d.content.len() as u64,
            content: d.content,
            checksum: d.checksum,
            author: d.author,
            message: d.message,
            created_at_ms: d.created_at_ms,
            rollback_of: d.rollback_of,
            candidate: d.candidate,
        };
        self.memory.lock().insert(item.clone(), v.clone());
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: u64, content: &str) -> pb::Version {
        pb::Version {
            number: n,
            content: content.into(),
            checksum: checksum(content),
            ..Default::default()
        }
    }

    #[test]
    fn cache_rejects_a_version_whose_checksum_does_not_match() {
        let cache = Cache {
            memory: Mutex::new(HashMap::new()),
            dir: None,
        };
        let item = ItemRef::new("a", "b", "c");
        let mut bad = version(1, "x");
        bad.checksum = checksum("y");
        assert!(!cache.accept(&item, &bad));
        assert!(cache.get(&item).is_none());
        assert!(cache.accept(&item, &version(2, "x")));
        assert_eq!(cache.get(&item).map(|v| v.number), Some(2));
    }

    #[test]
    fn disk_cache_survives_a_new_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let item = ItemRef::new("a", "b", "c.yaml");
        let first = Cache {
            memory: Mutex::new(HashMap::new()),
            dir: Some(dir.path().to_owned()),
        };
        assert!(first.accept(&item, &version(7, "k: v\n")));
        let second = Cache {
            memory: Mutex::new(HashMap::new()),
            dir: Some(dir.path().to_owned()),
        };
        let v = second.get(&item).expect("read from disk");
        assert_eq!((v.number, v.content.as_str()), (7, "k: v\n"));
    }
}
