//! The registry's operations, shared by the gRPC and REST faces: each takes domain types,
//! talks to the coordinator through `coord-client`, and returns domain types or [`Error`].
//!
//! # Authorisation
//! Every public operation takes the caller's [`Identity`] and checks it first, here and only
//! here (the faces cannot forget it: they have no other way in). What each needs in the
//! namespace it touches (`service_kit::authn`: admin implies write implies read):
//!
//! | operation | permission |
//! |---|---|
//! | discover, list services, get service options, watch | read |
//! | register, heartbeat (unary and stream), deregister | write |
//! | set service options (protect threshold) | admin |
//! | list namespaces | none: the answer holds only the namespaces the caller may read |
//!
//! With auth off every caller is anonymous and allowed everything.
//!
//! # Guarantees
//! - An instance record is bound to a lease of its own; it disappears `ttl_seconds` after the
//!   last heartbeat (as a ZooKeeper ephemeral node), or at once on deregistration.
//! - Registering an ID that exists replaces the record (new lease, health reset to healthy);
//!   the old lease is revoked afterwards, which no longer owns the key.
//! - Writes are guarded transactions (`mod_revision` compares), so they are safe to retry and
//!   never overwrite a change they did not see.
//! - Every read answer carries the coordinator revision it reflects; a watch delivers a
//!   snapshot at revision R and then every change after R, once and in order, across
//!   coordinator reconnects; resuming from a compacted revision yields a fresh snapshot flagged
//!   `resynced`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use coord_client::{Client, EventKind, KeyValue, Txn, WatchEvent, WatchOptions};
use parking_lot::Mutex;
use proto::etcdserverpb::response_op::Response as ResponseOp;
use serde::{Deserialize, Serialize};
use service_kit::authn::{Auth, Identity, Permission};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::keys;
use crate::metrics::RegistryMetrics;
use crate::model::{DiscoverFilter, Instance, InstanceRef, ServiceOptions, select, validate_name};

/// The answer of a discovery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Discovery {
    /// The matching instances, ordered by instance ID.
    pub instances: Vec<Instance>,
    /// The coordinator revision the answer reflects.
    pub revision: i64,
    /// Healthy-only was asked but the protect threshold made unhealthy instances count.
    pub protect_threshold_triggered: bool,
}

/// How an instance changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Registered (a new record).
    Added,
    /// Re-registered, or its health changed.
    Modified,
    /// Deregistered or expired.
    Removed,
}

/// One delivery of a watch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WatchItem {
    /// Every instance at `revision`.
    Snapshot {
        /// The instances.
        instances: Vec<Instance>,
        /// The revision they reflect.
        revision: i64,
        /// True when it replaces a resume that was impossible (history compacted).
        resynced: bool,
    },
    /// One change.
    Change {
        /// What happened.
        kind: ChangeKind,
        /// The instance after the change (for `removed`: as last seen).
        instance: Box<Instance>,
        /// The coordinator revision of the change.
        revision: i64,
    },
}

/// Changes a feed keeps for watchers that are behind; one further behind reads on its own.
const FEED_BUFFER: usize = 8192;
/// How long a new watcher waits for a new feed to be established before reading on its own.
const FEED_READY_WAIT: Duration = Duration::from_secs(5);
/// How often a feed checks whether anyone still listens.
const FEED_IDLE_CHECK: Duration = Duration::from_secs(10);

/// One coordinator watch of a prefix, shared by every watcher of that prefix in this replica,
/// so that N watchers of a service cost the coordinator one watch, and each change is decoded
/// once.
///
/// A watcher subscribes, then reads `position` (the revision of the last change the feed sent,
/// or where its coordinator watch started). The feed updates `position` *before* sending a
/// change, so every change above the position read is in the subscriber's receiver. A watcher
/// that needs older changes (a resume from before the position), or that falls more than
/// [`FEED_BUFFER`] changes behind, or whose feed ends, continues with a coordinator watch of its
/// own from the last revision it delivered; nothing is skipped or repeated either way.
struct Feed {
    tx: broadcast::Sender<Arc<FeedItem>>,
    /// 0 until the coordinator watch is established.
    position: watch::Receiver<i64>,
    ended: AtomicBool,
}

enum FeedItem {
    Change(i64, WatchItem),
    End,
}

impl Feed {
    /// The feed's position once it is established (`None` if that takes longer than `wait`).
    async fn position(&self, wait: Duration) -> Option<i64> {
        let mut rx = self.position.clone();
        let established = tokio::time::timeout(wait, rx.wait_for(|p| *p > 0)).await;
        match established {
            Ok(Ok(p)) => Some(*p),
            _ => None,
        }
    }
}

/// The registry: a handle on the coordinator plus metrics. Cheap to share behind an `Arc`.
pub struct Registry {
    client: Client,
    metrics: RegistryMetrics,
    /// Who may do what (off: everyone everything).
    auth: Arc<Auth>,
    /// Services whose record is known to exist (saves a write per registration). A std-free
    /// `parking_lot` mutex: held only to look up or insert, never across an await.
    known_services: Mutex<HashSet<(String, String)>>,
    /// Shared coordinator watches, one per watched prefix (see [`Feed`]).
    feeds: Mutex<HashMap<String, Arc<Feed>>>,
    /// Cancelled when the service stops: ends every watch and keep-alive stream, so that the
    /// servers' graceful shutdown does not wait for clients to hang up.
    shutdown: CancellationToken,
}

/// Decodes an instance record, filling in its revision.
pub fn decode(kv: &KeyValue) -> Result<Instance> {
    let mut instance: Instance = serde_json::from_slice(&kv.value).map_err(|e| {
        Error::Internal(format!(
            "record {} does not parse: {e}",
            String::from_utf8_lossy(&kv.key)
        ))
    })?;
    instance.revision = kv.mod_revision;
    Ok(instance)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Internal(format!("cannot encode a record: {e}")))
}

fn header_revision(h: Option<&proto::etcdserverpb::ResponseHeader>) -> i64 {
    h.map(|h| h.revision).unwrap_or_default()
}

fn not_registered(r: &InstanceRef) -> Error {
    Error::NotFound(format!(
        "instance {}/{}/{} is not registered (deregistered, or expired after its TTL): register it again",
        r.namespace, r.service, r.instance_id
    ))
}

impl Registry {
    /// A registry over `client`.
    pub fn new(
        client: Client,
        metrics: RegistryMetrics,
        auth: Arc<Auth>,
        shutdown: CancellationToken,
    ) -> Arc<Registry> {
        Arc::new(Registry {
            client,
            metrics,
            auth,
            known_services: Mutex::new(HashSet::new()),
            feeds: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    /// Cancelled when the service stops.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The coordinator client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The metrics.
    pub fn metrics(&self) -> &RegistryMetrics {
        &self.metrics
    }

    /// Who may do what; the faces authenticate callers with it.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The one authorisation check (see the module docs).
    fn check(&self, who: &Identity, action: &str, ns: &str, need: Permission) -> Result<()> {
        Ok(self.auth.authorize(who, action, ns, need)?)
    }

    /// Registers (or replaces) an instance; returns it as stored and the revision.
    pub async fn register(&self, who: &Identity, instance: Instance) -> Result<(Instance, i64)> {
        self.check(who, "register", &instance.namespace, Permission::Write)?;
        let result = self.register_inner(instance).await;
        RegistryMetrics::count(&self.metrics.registrations, &result);
        result
    }

    async fn register_inner(&self, instance: Instance) -> Result<(Instance, i64)> {
        let mut instance = instance.normalize_for_registration()?;
        self.ensure_service(&instance.namespace, &instance.service)
            .await?;
        let key = keys::instance(
            &instance.namespace,
            &instance.service,
            &instance.instance_id,
        );
        let value = encode(&instance)?;
        let (lease, _) = self
            .client
            .lease_grant(i64::from(instance.ttl_seconds))
            .await?;
        // A concurrent registration of the same ID can move the record under us; try a few
        // times, each guarded by the revision we saw.
        // Guess that the ID is new (the common case: one transaction, no read); a failed guard
        // answers with the record as it is, and the next attempt is guarded by that.
        let (mut old_rev, mut old_lease) = (0, 0);
        for _ in 0..5 {
            let txn = Txn::new()
                .if_mod_revision(key.clone(), old_rev)
                .then_put(key.clone(), value.clone(), lease)
                .else_get(key.clone());
            let resp = match self.client.txn_guarded(txn).await {
                Ok(r) => r,
                Err(e) => {
                    self.revoke_quietly(lease);
                    return Err(e.into());
                }
            };
            if resp.succeeded {
                let revision = header_revision(resp.header.as_ref());
                if old_lease != 0 && old_lease != lease {
                    self.revoke_quietly(old_lease);
                }
                instance.revision = revision;
                tracing::debug!(key, lease, revision, "registered");
                return Ok((instance, revision));
            }
            let current = resp.responses.into_iter().find_map(|op| match op.response {
                Some(ResponseOp::ResponseRange(r)) => r.kvs.into_iter().next(),
                _ => None,
            });
            match current {
                // Our own earlier attempt was applied (a retried txn).
                Some(kv) if kv.lease == lease => {
                    instance.revision = kv.mod_revision;
                    return Ok((instance, kv.mod_revision));
                }
                Some(kv) => (old_rev, old_lease) = (kv.mod_revision, kv.lease),
                None => (old_rev, old_lease) = (0, 0),
            }
        }
        self.revoke_quietly(lease);
        Err(Error::Unavailable(coord_client::Error::Timeout {
            what: "register (the record kept changing)",
        }))
    }

    fn revoke_quietly(&self, lease: i64) {
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.lease_revoke(lease).await {
                tracing::debug!(lease, error = %e, "revoking a lease failed; it will expire");
            }
        });
    }

    /// Creates the service record if it does not exist yet.
    async fn ensure_service(&self, ns: &str, svc: &str) -> Result<()> {
        let id = (ns.to_owned(), svc.to_owned());
        if self.known_services.lock().contains(&id) {
            return Ok(());
        }
        let key = keys::service(ns, svc);
        let options = ServiceOptions {
            namespace: ns.to_owned(),
            service: svc.to_owned(),
            protect_threshold: 0.0,
        };
        self.client
            .txn_guarded(
                Txn::new()
                    .if_absent(key.clone())
                    .then_put(key, encode(&options)?, 0),
            )
            .await?;
        self.known_services.lock().insert(id);
        Ok(())
    }

    /// The lease behind a registered instance (`NotFound` if it is gone).
    pub async fn lease_of(&self, who: &Identity, r: &InstanceRef) -> Result<i64> {
        self.check(who, "heartbeat", &r.namespace, Permission::Write)?;
        r.validate()?;
        let key = keys::instance(&r.namespace, &r.service, &r.instance_id);
        match self.client.get(key).await? {
            (Some(kv), _) if kv.lease != 0 => Ok(kv.lease),
            _ => Err(not_registered(r)),
        }
    }

    /// Renews a lease found by [`Registry::lease_of`]; returns the TTL (`NotFound` if expired).
    pub async fn renew(&self, who: &Identity, r: &InstanceRef, lease: i64) -> Result<u32> {
        self.check(who, "heartbeat", &r.namespace, Permission::Write)?;
        let result = match self.client.lease_keep_alive_once(lease).await {
            Ok(ttl) if ttl > 0 => Ok(u32::try_from(ttl).unwrap_or(u32::MAX)),
            Ok(_) | Err(coord_client::Error::LeaseNotFound) => Err(not_registered(r)),
            Err(e) => Err(e.into()),
        };
        RegistryMetrics::count(&self.metrics.heartbeats, &result);
        result
    }

    /// One heartbeat: renews the instance's lease; returns its TTL.
    pub async fn heartbeat(&self, who: &Identity, r: &InstanceRef) -> Result<u32> {
        let lease = match self.lease_of(who, r).await {
            Ok(l) => l,
            Err(e) => {
                let result: Result<u32> = Err(e);
                RegistryMetrics::count(&self.metrics.heartbeats, &result);
                return result;
            }
        };
        self.renew(who, r, lease).await
    }

    /// Removes an instance now; returns whether it existed and the revision.
    pub async fn deregister(&self, who: &Identity, r: &InstanceRef) -> Result<(bool, i64)> {
        self.check(who, "deregister", &r.namespace, Permission::Write)?;
        let result = self.deregister_inner(r).await;
        RegistryMetrics::count(&self.metrics.deregistrations, &result);
        result
    }

    async fn deregister_inner(&self, r: &InstanceRef) -> Result<(bool, i64)> {
        r.validate()?;
        let key = keys::instance(&r.namespace, &r.service, &r.instance_id);
        let (existing, revision) = self.client.get(key.clone()).await?;
        let Some(kv) = existing else {
            return Ok((false, revision));
        };
        let (deleted, revision) = self.client.delete(key).await?;
        if kv.lease != 0 {
            self.revoke_quietly(kv.lease);
        }
        Ok((deleted > 0, revision))
    }

    /// Every namespace (that has ever had a service registered) that `who` may read, sorted.
    pub async fn list_namespaces(&self, who: &Identity) -> Result<(Vec<String>, i64)> {
        let res = self.client.keys_with_prefix(keys::SERVICES).await?;
        let names: BTreeSet<String> = res
            .kvs
            .iter()
            .filter_map(|kv| keys::parse_service(&kv.key).map(|(ns, _)| ns))
            .filter(|ns| self.auth.allows(who, ns, Permission::Read))
            .collect();
        Ok((names.into_iter().collect(), res.revision))
    }

    /// Every service of a namespace, sorted (empty for an unknown namespace).
    pub async fn list_services(&self, who: &Identity, ns: &str) -> Result<(Vec<String>, i64)> {
        self.check(who, "list services", ns, Permission::Read)?;
        validate_name("namespace", ns)?;
        let res = self
            .client
            .keys_with_prefix(keys::namespace_services(ns))
            .await?;
        let names = res
            .kvs
            .iter()
            .filter_map(|kv| keys::parse_service(&kv.key).map(|(_, svc)| svc))
            .collect();
        Ok((names, res.revision))
    }

    /// The instances of a service matching `filter` (see [`crate::model::select`]).
    pub async fn discover(
        &self,
        who: &Identity,
        ns: &str,
        svc: &str,
        filter: &DiscoverFilter,
    ) -> Result<Discovery> {
        self.check(who, "discover", ns, Permission::Read)?;
        let result = self.discover_inner(ns, svc, filter).await;
        RegistryMetrics::count(&self.metrics.discoveries, &result);
        result
    }

    async fn discover_inner(
        &self,
        ns: &str,
        svc: &str,
        filter: &DiscoverFilter,
    ) -> Result<Discovery> {
        validate_name("namespace", ns)?;
        validate_name("service", svc)?;
        let res = self
            .client
            .get_prefix(keys::service_instances(ns, svc))
            .await?;
        let instances = res.kvs.iter().map(decode).collect::<Result<Vec<_>>>()?;
        let threshold = if filter.healthy_only {
            self.options_inner(ns, svc).await?.protect_threshold
        } else {
            0.0
        };
        let (instances, triggered) = select(instances, filter, threshold);
        Ok(Discovery {
            instances,
            revision: res.revision,
            protect_threshold_triggered: triggered,
        })
    }

    /// A service's options (defaults if the service is unknown).
    pub async fn options(&self, who: &Identity, ns: &str, svc: &str) -> Result<ServiceOptions> {
        self.check(who, "get service options", ns, Permission::Read)?;
        self.options_inner(ns, svc).await
    }

    async fn options_inner(&self, ns: &str, svc: &str) -> Result<ServiceOptions> {
        validate_name("namespace", ns)?;
        validate_name("service", svc)?;
        let (kv, _) = self.client.get(keys::service(ns, svc)).await?;
        match kv {
            Some(kv) => serde_json::from_slice(&kv.value)
                .map_err(|e| Error::Internal(format!("service record does not parse: {e}"))),
            None => Ok(ServiceOptions {
                namespace: ns.to_owned(),
                service: svc.to_owned(),
                protect_threshold: 0.0,
            }),
        }
    }

    /// Sets a service's options (creating the service record if needed).
    pub async fn set_options(
        &self,
        who: &Identity,
        options: ServiceOptions,
    ) -> Result<ServiceOptions> {
        self.check(
            who,
            "set service options",
            &options.namespace,
            Permission::Admin,
        )?;
        options.validate()?;
        let key = keys::service(&options.namespace, &options.service);
        // A plain put: setting the same options twice is harmless, so an uncertain outcome is
        // reported and the caller may simply repeat.
        self.client.put(key, encode(&options)?, 0).await?;
        self.known_services
            .lock()
            .insert((options.namespace.clone(), options.service.clone()));
        Ok(options)
    }

    /// Watches a service (or, with `svc = None`, a whole namespace): a snapshot unless
    /// `after_revision > 0`, then every change after it (see the module docs).
    ///
    /// The namespace must exist (`InvalidArgument` otherwise); the service need not.
    pub async fn watch(
        self: &Arc<Self>,
        who: &Identity,
        ns: &str,
        svc: Option<&str>,
        after_revision: i64,
    ) -> Result<mpsc::Receiver<Result<WatchItem>>> {
        self.check(who, "watch", ns, Permission::Read)?;
        validate_name("namespace", ns)?;
        if let Some(svc) = svc {
            validate_name("service", svc)?;
        }
        if after_revision < 0 {
            return Err(Error::invalid(format!(
                "after_revision {after_revision} is negative"
            )));
        }
        let known = self
            .client
            .keys_with_prefix(keys::namespace_services(ns))
            .await?;
        if known.kvs.is_empty() {
            return Err(Error::invalid(format!(
                "namespace {ns:?} does not exist (nothing was ever registered in it)"
            )));
        }
        let prefix = match svc {
            Some(svc) => keys::service_instances(ns, svc),
            None => keys::namespace_instances(ns),
        };
        let (tx, rx) = mpsc::channel(1024);
        let this = self.clone();
        tokio::spawn(async move {
            this.metrics.watchers.inc();
            if let Err(e) = this.run_watch(prefix, after_revision, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
            this.metrics.watchers.dec();
        });
        Ok(rx)
    }

    async fn snapshot(
        &self,
        prefix: &str,
        resynced: bool,
        tx: &mpsc::Sender<Result<WatchItem>>,
    ) -> Result<Option<i64>> {
        let res = self.client.get_prefix(prefix.to_owned()).await?;
        let instances = res.kvs.iter().map(decode).collect::<Result<Vec<_>>>()?;
        let item = WatchItem::Snapshot {
            instances,
            revision: res.revision,
            resynced,
        };
        Ok(tx.send(Ok(item)).await.ok().map(|_| res.revision))
    }

    async fn run_watch(
        self: &Arc<Self>,
        prefix: String,
        after_revision: i64,
        tx: &mpsc::Sender<Result<WatchItem>>,
    ) -> Result<()> {
        // Subscribe to the shared feed first, then learn its position: every change after that
        // position is in `feed_rx` (see `Feed`).
        let feed = self.feed(&prefix);
        let mut feed_rx = feed.tx.subscribe();
        let position = feed.position(FEED_READY_WAIT).await;
        let mut after = if after_revision > 0 {
            after_revision
        } else {
            // Read after the position was known, so the snapshot's revision is at least it.
            match self.snapshot(&prefix, false, tx).await? {
                Some(rev) => rev,
                None => return Ok(()),
            }
        };
        if let Some(position) = position
            && after >= position
        {
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return Ok(()),
                    _ = self.shutdown.cancelled() => return Ok(()),
                    item = feed_rx.recv() => item,
                };
                match item.as_deref() {
                    Ok(FeedItem::Change(rev, change)) => {
                        if *rev <= after {
                            continue;
                        }
                        after = *rev;
                        if tx.send(Ok(change.clone())).await.is_err() {
                            return Ok(());
                        }
                    }
                    // The feed ended, or this watcher fell too far behind it: go on alone.
                    Ok(FeedItem::End) | Err(_) => break,
                }
            }
        }
        drop(feed_rx);
        self.private_watch(prefix, after, tx).await
    }

    /// The shared feed of `prefix`, started if there is none (or it ended).
    fn feed(self: &Arc<Self>, prefix: &str) -> Arc<Feed> {
        let mut feeds = self.feeds.lock();
        if let Some(feed) = feeds.get(prefix)
            && !feed.ended.load(Ordering::Acquire)
        {
            return feed.clone();
        }
        let (tx, _) = broadcast::channel(FEED_BUFFER);
        let (position_tx, position_rx) = watch::channel(0);
        let feed = Arc::new(Feed {
            tx,
            position: position_rx,
            ended: AtomicBool::new(false),
        });
        feeds.insert(prefix.to_owned(), feed.clone());
        tokio::spawn(
            self.clone()
                .run_feed(prefix.to_owned(), feed.clone(), position_tx),
        );
        feed
    }

    async fn run_feed(
        self: Arc<Self>,
        prefix: String,
        feed: Arc<Feed>,
        position: watch::Sender<i64>,
    ) {
        let mut stream = self
            .client
            .watch(WatchOptions::prefix(prefix.clone(), 0).with_prev_kv());
        let mut idle = tokio::time::interval(FEED_IDLE_CHECK);
        idle.tick().await;
        loop {
            let item = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = idle.tick() => {
                    if feed.tx.receiver_count() == 0 {
                        break;
                    }
                    continue;
                }
                item = stream.next() => item,
            };
            match item {
                Some(WatchEvent::Created { revision }) => {
                    let _ = position.send(revision);
                }
                Some(WatchEvent::Events(events)) => {
                    for e in events {
                        let rev = e.revision();
                        let change = match to_change(&e) {
                            Ok(c) => c,
                            Err(err) => {
                                tracing::warn!(error = %err, "skipping an unreadable record");
                                continue;
                            }
                        };
                        // Position first, then send: whoever reads a position subscribed before
                        // every later change was sent.
                        let _ = position.send(rev);
                        let _ = feed.tx.send(Arc::new(FeedItem::Change(rev, change)));
                    }
                }
                Some(WatchEvent::Compacted { .. }) | None => break,
            }
        }
        feed.ended.store(true, Ordering::Release);
        let _ = feed.tx.send(Arc::new(FeedItem::End));
        let mut feeds = self.feeds.lock();
        if feeds.get(&prefix).is_some_and(|f| Arc::ptr_eq(f, &feed)) {
            feeds.remove(&prefix);
        }
    }

    /// A watch of its own on the coordinator, from `after + 1` (a resume from before the shared
    /// feed's position, or a watcher that fell behind the feed).
    async fn private_watch(
        &self,
        prefix: String,
        mut after: i64,
        tx: &mpsc::Sender<Result<WatchItem>>,
    ) -> Result<()> {
        loop {
            let mut stream = self
                .client
                .watch(WatchOptions::prefix(prefix.clone(), after + 1).with_prev_kv());
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return Ok(()),
                    _ = self.shutdown.cancelled() => return Ok(()),
                    item = stream.next() => item,
                };
                match item {
                    None => return Ok(()),
                    Some(WatchEvent::Created { .. }) => {}
                    Some(WatchEvent::Events(events)) => {
                        for e in events {
                            let change = to_change(&e)?;
                            after = e.revision();
                            if tx.send(Ok(change)).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    Some(WatchEvent::Compacted { compact_revision }) => {
                        tracing::info!(
                            prefix,
                            after,
                            compact_revision,
                            "watch history compacted; sending a fresh snapshot"
                        );
                        match self.snapshot(&prefix, true, tx).await? {
                            Some(rev) => after = rev,
                            None => return Ok(()),
                        }
                        break;
                    }
                }
            }
        }
    }
}

fn to_change(e: &coord_client::Event) -> Result<WatchItem> {
    let revision = e.revision();
    let (kind, instance) = match e.kind {
        EventKind::Put => {
            let kind = if e.kv.create_revision == e.kv.mod_revision {
                ChangeKind::Added
            } else {
                ChangeKind::Modified
            };
            (kind, decode(&e.kv)?)
        }
        EventKind::Delete => {
            let instance = match &e.prev_kv {
                Some(prev) => {
                    let mut i = decode(prev)?;
                    i.revision = revision;
                    i
                }
                None => removed_stub(&e.kv.key, revision)?,
            };
            (ChangeKind::Removed, instance)
        }
    };
    Ok(WatchItem::Change {
        kind,
        instance: Box::new(instance),
        revision,
    })
}

/// An instance known only by its key (a delete whose previous value was compacted away).
fn removed_stub(key: &[u8], revision: i64) -> Result<Instance> {
    let (namespace, service, instance_id) = keys::parse_instance(key).ok_or_else(|| {
        Error::Internal(format!(
            "unexpected key {} under the instances prefix",
            String::from_utf8_lossy(key)
        ))
    })?;
    Ok(Instance {
        namespace,
        service,
        instance_id,
        address: String::new(),
        port: 0,
        protocol: Default::default(),
        metadata: Default::default(),
        tags: Vec::new(),
        weight: 0,
        zone: String::new(),
        health_check: None,
        ttl_seconds: 0,
        health: Default::default(),
        health_detail: String::new(),
        revision,
    })
}
