//! Watches: the version meant for the client of each watched item first, then every new one in
//! order, resumable from the versions the client already holds.
//!
//! # How
//! One [`Hub`] per process holds a single coordinator watch on everything under
//! [`keys::ROOT`], decodes each revision's changes once, puts new version records in the shared
//! [`VersionCache`](crate::store::VersionCache), and broadcasts the revision to every watcher
//! of this process. A watcher:
//! 1. subscribes to the broadcast, then reads its items' state (revision `R`), so every change
//!    after `R` reaches it through the broadcast and none is missed;
//! 2. sends, per item, the versions the client lacks (below), then `Synced { R }`;
//! 3. applies each broadcast revision above `R` to its copy of the items' state and sends
//!    what changed for its client.
//!
//! A watcher that falls behind (its broadcast buffer overflowed because its client reads
//! slowly) or whose hub lost the coordinator's history (compaction while disconnected) reads
//! its items' state again and continues from there — a slow client never slows the others, as
//! with the coordinator's own "victim" watchers. Version history lives in keys of its own, so
//! this catch-up works however long ago the last delivery was.
//!
//! # What a client is sent
//! For each item, the client has a *delivered* version: the one it said it holds (`known`), or
//! none. When the version meant for it ([`effective_version`]) differs, it is sent the
//! *released* versions between the two in order ([`missed_versions`]: skipping aborted
//! candidates and versions meant for other clients), then the new one. Nothing is sent for an
//! item it already holds the right version of, so reconnecting with `known` set resumes
//! exactly. A deleted item is announced once with `Deleted` (only if the client had a version of
//! it). When a rollout is aborted, clients that had the candidate are sent the current version
//! again (reason `Aborted`): a version number lower than the one before.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use coord_client::{EventKind, WatchEvent, WatchOptions};
use serde::{Deserialize, Serialize};
use service_kit::authn::{Identity, Permission};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::keys::{self, Parsed, Part};
use crate::model::{
    ClientInfo, ItemMeta, ItemRef, ItemState, Pointer, Rollout, StoredVersion, effective_version,
    missed_versions, now_ms, validate_name,
};
use crate::store::{Store, apply_kv, state_from_kvs};

/// How many revisions a watcher may fall behind before it re-reads its items (default).
pub const DEFAULT_WATCH_BUFFER: usize = 1024;
/// How long a watch waits for the hub's coordinator watch before answering `UNAVAILABLE`.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Why a version is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The version held when the watch started.
    Initial,
    /// A version the client missed (resume, or catching up after falling behind).
    Missed,
    /// Newly published.
    Published,
    /// Published by a rollback.
    RolledBack,
    /// This client was selected for a rollout's candidate.
    Rollout,
    /// The rollout's candidate became current.
    Promoted,
    /// The rollout was aborted: back to the current version.
    Aborted,
}

/// One delivery of a watch.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A version of an item.
    Update {
        /// Which item.
        item: ItemRef,
        /// The version (with content).
        version: Arc<StoredVersion>,
        /// Why it is sent.
        reason: Reason,
    },
    /// The item was deleted (or purged).
    Deleted {
        /// Which item.
        item: ItemRef,
    },
    /// Everything held at `revision` was sent.
    Synced {
        /// The coordinator revision.
        revision: i64,
    },
}

/// What a watch covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// These items.
    Items(BTreeSet<ItemRef>),
    /// Every item of a namespace, or of one of its groups.
    Prefix {
        /// The namespace.
        namespace: String,
        /// The group, or every group.
        group: Option<String>,
    },
}

impl Scope {
    /// Checks the names.
    pub fn validate(&self) -> Result<()> {
        match self {
            Scope::Items(items) if items.is_empty() => {
                Err(Error::invalid("watch names no items and no prefix"))
            }
            Scope::Items(items) if items.len() > 1000 => Err(Error::invalid(format!(
                "watch names {} items; at most 1000 (watch a prefix instead)",
                items.len()
            ))),
            Scope::Items(items) => items.iter().try_for_each(ItemRef::validate),
            Scope::Prefix { namespace, group } => {
                validate_name("namespace", namespace)?;
                if let Some(g) = group {
                    validate_name("group", g)?;
                }
                Ok(())
            }
        }
    }

    /// Whether `item` is watched.
    pub fn contains(&self, item: &ItemRef) -> bool {
        match self {
            Scope::Items(items) => items.contains(item),
            Scope::Prefix { namespace, group } => {
                item.namespace == *namespace && group.as_ref().is_none_or(|g| *g == item.group)
            }
        }
    }
}

/// One decoded change of one revision.
#[derive(Debug, Clone)]
enum Change {
    Meta(ItemRef, Option<ItemMeta>),
    Current(ItemRef, Option<Pointer>),
    Rollout(ItemRef, Option<Rollout>),
}

impl Change {
    fn item(&self) -> &ItemRef {
        match self {
            Change::Meta(i, _) | Change::Current(i, _) | Change::Rollout(i, _) => i,
        }
    }
}

/// What the hub broadcasts.
#[derive(Debug)]
enum HubMsg {
    /// The changes of one revision.
    Batch { revision: i64, changes: Vec<Change> },
    /// The hub's coordinator watch started again after losing history: re-read everything.
    Resync,
}

/// The process-wide fan-out of coordinator changes (see the module docs).
pub struct Hub {
    store: Arc<Store>,
    tx: broadcast::Sender<Arc<HubMsg>>,
    ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
}

impl Hub {
    /// Starts the hub's coordinator watch; it runs until `shutdown`. A watcher may fall
    /// `buffer` revisions behind before it re-reads its items.
    pub fn start(store: Arc<Store>, buffer: usize, shutdown: CancellationToken) -> Arc<Hub> {
        let (tx, _) = broadcast::channel(buffer.max(1));
        let (ready_tx, ready) = watch::channel(false);
        let hub = Arc::new(Hub {
            store,
            tx,
            ready,
            shutdown,
        });
        tokio::spawn(run_hub(hub.clone(), ready_tx));
        hub
    }

    /// True once the hub's coordinator watch was established.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the hub is ready (false after `timeout` or shutdown).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        tokio::select! {
            r = tokio::time::timeout(timeout, ready.wait_for(|r| *r)) => matches!(r, Ok(Ok(_))),
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// Starts a watch; deliveries arrive on the returned channel until the receiver is
    /// dropped or the service stops. An error ends the stream.
    pub async fn watch(
        self: &Arc<Self>,
        who: &Identity,
        scope: Scope,
        known: HashMap<ItemRef, u64>,
        client: ClientInfo,
    ) -> Result<mpsc::Receiver<Result<WatchItem>>> {
        match &scope {
            Scope::Prefix { namespace, .. } => {
                self.store
                    .check(who, "watch", namespace, Permission::Read)?
            }
            Scope::Items(items) => {
                let namespaces: BTreeSet<&str> =
                    items.iter().map(|i| i.namespace.as_str()).collect();
                for ns in namespaces {
                    self.store.check(who, "watch", ns, Permission::Read)?;
                }
            }
        }
        scope.validate()?;
        if !self.wait_ready(READY_WAIT).await {
            return Err(Error::Unavailable(coord_client::Error::Timeout {
                what: "watch (the coordinator watch is not established)",
            }));
        }
        // Subscribe before the first read (see the module docs).
        let rx = self.tx.subscribe();
        // A small hand-off: a slow client should make its watcher fall behind (and catch up
        // from history later) rather than pile versions up in memory.
        let (tx, out) = mpsc::channel(8);
        let watcher = Watcher {
            hub: self.clone(),
            scope,
            client,
            items: BTreeMap::new(),
            revision: 0,
        };
        tokio::spawn(watcher.run(rx, known, tx));
        Ok(out)
    }
}

async fn run_hub(hub: Arc<Hub>, ready_tx: watch::Sender<bool>) {
    let mut first = true;
    loop {
        let mut stream = hub
            .store
            .client()
            .watch(WatchOptions::prefix(keys::ROOT, 0));
        loop {
            let event = tokio::select! {
                _ = hub.shutdown.cancelled() => return,
                e = stream.next() => e,
            };
            match event {
                Some(WatchEvent::Created { revision }) => {
                    tracing::debug!(revision, "configuration watch established");
                    if first {
                        first = false;
                        let _ = ready_tx.send(true);
                    } else {
                        let _ = hub.tx.send(Arc::new(HubMsg::Resync));
                    }
                }
                Some(WatchEvent::Events(events)) => {
                    let mut batch: Vec<Change> = Vec::new();
                    let mut revision = 0;
                    for e in events {
                        if e.revision() != revision && !batch.is_empty() {
                            let changes = std::mem::take(&mut batch);
                            let _ = hub.tx.send(Arc::new(HubMsg::Batch { revision, changes }));
                        }
                        revision = e.revision();
                        if let Some(change) = hub.decode(&e) {
                            batch.push(change);
                        }
                    }
                    if !batch.is_empty() {
                        let _ = hub.tx.send(Arc::new(HubMsg::Batch {
                            revision,
                            changes: batch,
                        }));
                    }
                }
                Some(WatchEvent::Compacted { compact_revision }) => {
                    tracing::info!(
                        compact_revision,
                        "configuration watch lost history; watching again and re-reading"
                    );
                    break;
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
}

impl Hub {
    /// Decodes one coordinator event; version records go to the cache.
    fn decode(&self, e: &coord_client::Event) -> Option<Change> {
        let value = (e.kind == EventKind::Put).then_some(e.kv.value.as_slice());
        let decoded = match keys::parse(&e.kv.key)? {
            Parsed::Version { item, .. } => {
                if let Some(raw) = value {
                    match StoredVersion::decode(raw) {
                        Ok(v) => self.store.cache().insert(&item.into(), Arc::new(v)),
                        Err(err) => tracing::warn!(error = %err, "undecodable version record"),
                    }
                }
                return None;
            }
            Parsed::Item { item, part } => {
                let item: ItemRef = item.into();
                let mut state = ItemState::default();
                if let Err(err) = apply_kv(&mut state, part, value) {
                    tracing::warn!(item = %item, error = %err, "undecodable item record");
                    return None;
                }
                match part {
                    Part::Meta => Change::Meta(item, state.meta),
                    Part::Current => Change::Current(item, state.current),
                    Part::Rollout => Change::Rollout(item, state.rollout),
                }
            }
        };
        Some(decoded)
    }
}

/// One item as a watcher sees it.
#[derive(Debug, Default)]
struct Tracked {
    state: ItemState,
    /// The version the client holds (what it said, or what was sent last).
    delivered: Option<u64>,
    /// `Deleted` was sent and nothing since.
    deleted_sent: bool,
}

struct Watcher {
    hub: Arc<Hub>,
    scope: Scope,
    client: ClientInfo,
    items: BTreeMap<ItemRef, Tracked>,
    /// The revision the watcher's copy of the state reflects.
    revision: i64,
}

/// Keeps the watcher gauge right however the task ends.
struct Gauge(prometheus_client::metrics::gauge::Gauge);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The watcher's output ended (the client went away or the service stops).
struct Closed;

impl Watcher {
    async fn run(
        mut self,
        mut rx: broadcast::Receiver<Arc<HubMsg>>,
        known: HashMap<ItemRef, u64>,
        tx: mpsc::Sender<Result<WatchItem>>,
    ) {
        let metrics = self.hub.store.metrics().clone();
        metrics.watchers.inc();
        let _gauge = Gauge(metrics.watchers.clone());
        for (item, v) in known {
            if self.scope.contains(&item) && v > 0 {
                self.items.entry(item).or_default().delivered = Some(v);
            }
        }
        let shutdown = self.hub.shutdown.clone();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            r = self.serve(&mut rx, &tx) => r,
        };
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    }

    async fn serve(
        &mut self,
        rx: &mut broadcast::Receiver<Arc<HubMsg>>,
        tx: &mpsc::Sender<Result<WatchItem>>,
    ) -> Result<()> {
        if self.resync(tx, true).await?.is_err() {
            return Ok(());
        }
        if tx
            .send(Ok(WatchItem::Synced {
                revision: self.revision,
            }))
            .await
            .is_err()
        {
            return Ok(());
        }
        loop {
            let msg = match rx.recv().await {
                Ok(msg) => msg,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "watcher fell behind; re-reading its items");
                    self.hub.store.metrics().watch_resyncs.inc();
                    if self.resync(tx, false).await?.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            };
            match &*msg {
                HubMsg::Resync => {
                    self.hub.store.metrics().watch_resyncs.inc();
                    if self.resync(tx, false).await?.is_err() {
                        return Ok(());
                    }
                }
                HubMsg::Batch { revision, changes } => {
                    if *revision <= self.revision {
                        continue;
                    }
                    self.revision = *revision;
                    // Apply every change of the revision, then look at the touched items.
                    let mut touched: Vec<(ItemRef, Option<Rollout>)> = Vec::new();
                    for change in changes {
                        let item = change.item();
                        if !self.scope.contains(item) {
                            continue;
                        }
                        let tracked = self.items.entry(item.clone()).or_default();
                        if !touched.iter().any(|(i, _)| i == item) {
                            touched.push((item.clone(), tracked.state.rollout.clone()));
                        }
                        match change {
                            Change::Meta(_, m) => tracked.state.meta = m.clone(),
                            Change::Current(_, c) => tracked.state.current = c.clone(),
                            Change::Rollout(_, r) => tracked.state.rollout = r.clone(),
                        }
                    }
                    for (item, old_rollout) in touched {
                        if self
                            .evaluate(&item, Context::Live { old_rollout }, tx)
                            .await?
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Reads the watched items' state again and sends what the client lacks. The outer error
    /// is a failure to serve; the inner one means the client went away.
    async fn resync(
        &mut self,
        tx: &mpsc::Sender<Result<WatchItem>>,
        initial: bool,
    ) -> Result<std::result::Result<(), Closed>> {
        let store = &self.hub.store;
        let mut fresh: BTreeMap<ItemRef, ItemState> = BTreeMap::new();
        let revision = match &self.scope {
            Scope::Prefix { namespace, group } => {
                let res = store
                    .client()
                    .get_prefix(keys::items_of(namespace, group.as_deref()))
                    .await?;
                let mut grouped: BTreeMap<ItemRef, Vec<&coord_client::KeyValue>> = BTreeMap::new();
                for kv in &res.kvs {
                    if let Some(Parsed::Item { item, .. }) = keys::parse(&kv.key) {
                        grouped.entry(item.into()).or_default().push(kv);
                    }
                }
                for (item, kvs) in grouped {
                    fresh.insert(item, state_from_kvs(kvs)?.0);
                }
                res.revision
            }
            Scope::Items(items) => {
                let mut revision = i64::MAX;
                for item in items {
                    let (state, _, rev) = store.read_state(item).await?;
                    revision = revision.min(rev);
                    fresh.insert(item.clone(), state);
                }
                revision
            }
        };
        self.revision = revision;
        // Items that vanished (purged) count as deleted.
        for (item, tracked) in self.items.iter_mut() {
            if !fresh.contains_key(item) {
                tracked.state = ItemState::default();
            }
        }
        for (item, state) in fresh {
            self.items.entry(item).or_default().state = state;
        }
        let all: Vec<ItemRef> = self.items.keys().cloned().collect();
        for item in all {
            let context = if initial {
                Context::Initial
            } else {
                Context::Resync
            };
            if self.evaluate(&item, context, tx).await?.is_err() {
                return Ok(Err(Closed));
            }
        }
        Ok(Ok(()))
    }

    /// Sends what the client lacks of `item`.
    async fn evaluate(
        &mut self,
        item: &ItemRef,
        context: Context,
        tx: &mpsc::Sender<Result<WatchItem>>,
    ) -> Result<std::result::Result<(), Closed>> {
        let store = self.hub.store.clone();
        let Some(tracked) = self.items.get_mut(item) else {
            return Ok(Ok(()));
        };
        let target = effective_version(item, &tracked.state, &self.client);
        let Some(target) = target else {
            if tracked.delivered.is_some() && !tracked.deleted_sent {
                tracked.deleted_sent = true;
                if tx
                    .send(Ok(WatchItem::Deleted { item: item.clone() }))
                    .await
                    .is_err()
                {
                    return Ok(Err(Closed));
                }
            }
            return Ok(Ok(()));
        };
        if tracked.delivered == Some(target) && !tracked.deleted_sent {
            return Ok(Ok(()));
        }
        let missed = match tracked.delivered {
            Some(d) if target > d => missed_versions(&tracked.state, d, target),
            _ => Vec::new(),
        };
        let resumed =
            matches!(context, Context::Initial | Context::Resync) && tracked.delivered.is_some();
        let mut sends: Vec<(Arc<StoredVersion>, Reason)> = Vec::new();
        for v in store.read_versions(item, &missed).await? {
            sends.push((v, Reason::Missed));
        }
        let Some(version) = store.read_version(item, target).await? else {
            // Only possible if it was purged meanwhile; the next change will tell.
            tracing::debug!(item = %item, target, "version vanished while watching");
            return Ok(Ok(()));
        };
        let reason = match &context {
            Context::Initial if !resumed => Reason::Initial,
            Context::Initial | Context::Resync => Reason::Missed,
            Context::Live { old_rollout } => {
                let rollout = tracked.state.rollout.as_ref();
                if rollout.is_some_and(|r| r.candidate == target) {
                    Reason::Rollout
                } else if let Some(old) = old_rollout.as_ref().filter(|_| rollout.is_none()) {
                    if old.candidate == target {
                        Reason::Promoted
                    } else {
                        Reason::Aborted
                    }
                } else if version.header.rollback_of.is_some() {
                    Reason::RolledBack
                } else {
                    Reason::Published
                }
            }
        };
        let latency_ms = tracked
            .state
            .meta
            .as_ref()
            .map(|m| now_ms().saturating_sub(m.updated_at_ms))
            .unwrap_or(0);
        sends.push((version, reason));
        tracked.delivered = Some(target);
        tracked.deleted_sent = false;
        let live = matches!(context, Context::Live { .. });
        for (version, reason) in sends {
            if tx
                .send(Ok(WatchItem::Update {
                    item: item.clone(),
                    version,
                    reason,
                }))
                .await
                .is_err()
            {
                return Ok(Err(Closed));
            }
            store.metrics().watch_updates.inc();
        }
        if live {
            store
                .metrics()
                .push_latency
                .observe(latency_ms.max(0) as f64 / 1000.0);
        }
        Ok(Ok(()))
    }
}

/// Why an item is looked at.
enum Context {
    /// The watch just started.
    Initial,
    /// After falling behind or losing history.
    Resync,
    /// A change arrived; the item's rollout before it.
    Live { old_rollout: Option<Rollout> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_scope_matches_namespace_and_group() {
        let s = Scope::Prefix {
            namespace: "prod".into(),
            group: Some("app".into()),
        };
        assert!(s.contains(&ItemRef::new("prod", "app", "k")));
        assert!(!s.contains(&ItemRef::new("prod", "app2", "k")));
        assert!(!s.contains(&ItemRef::new("dev", "app", "k")));
        let all = Scope::Prefix {
            namespace: "prod".into(),
            group: None,
        };
        assert!(all.contains(&ItemRef::new("prod", "x", "y")));
    }

    #[test]
    fn an_empty_item_list_is_invalid() {
        assert!(Scope::Items(BTreeSet::new()).validate().is_err());
    }
}
