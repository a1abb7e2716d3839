//! The configuration operations, shared by the gRPC and REST faces: each takes domain types,
//! talks to the coordinator through `coord-client`, and returns domain types or [`Error`].
//!
//! # Authorisation
//! Every public operation that the faces call takes the caller's [`Identity`] and checks it
//! first, here and only here (watches check through [`Store::check`] in [`crate::watch`]).
//! What each needs in the item's namespace (`service_kit::authn`: admin implies write implies
//! read):
//!
//! | operation | permission |
//! |---|---|
//! | get (current or a version, raw), list, history, diff, watch | read |
//! | publish (also compare-and-set), rollback, delete, rollout promote and abort | write |
//! | set options (schema, retention), publish that also sets schema or retention, purge | admin |
//! | validate (stores nothing, names no namespace) | none beyond authentication |
//!
//! With auth off every caller is anonymous and allowed everything.
//!
//! # Guarantees
//! - Every change of an item is **one coordinator Txn** guarded by the `mod_revision` of the
//!   item's `meta` key (see [`crate::keys`]): it writes the new version, moves the pointer,
//!   updates the meta and drops versions past retention together, or nothing at all. Two
//!   writers racing on one item serialise: the loser re-reads and tries again, or, if it asked
//!   for a compare-and-set (`expected_version`), fails with [`Error::Conflict`].
//! - Versions are immutable: a number is given once per item (numbers keep growing across
//!   delete and re-create; only purge starts again at 1) and its record is never rewritten.
//! - The Txns are retried after a lost connection (they are guarded); a publish whose first
//!   attempt was applied is recognised by its version record, so it is not applied twice.
//! - While a rollout is in progress, publish and rollback are refused (`FailedPrecondition`):
//!   promote or abort it first. Delete ends it (its candidate counts as aborted).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use coord_client::{Client, KeyValue, Txn};
use parking_lot::Mutex;
use proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use proto::etcdserverpb::request_op::Request as Op;
use proto::etcdserverpb::{DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest};
use serde::{Deserialize, Serialize};
use service_kit::authn::{Auth, Identity, Permission};

use crate::error::{Error, Result};
use crate::keys::{self, Parsed, Part};
use crate::metrics::ConfigMetrics;
use crate::model::{
    ClientInfo, Format, ItemMeta, ItemRef, ItemState, MAX_RETENTION, MAX_SCHEMA_BYTES,
    MAX_TEXT_LEN, Pointer, Rollout, RolloutRule, StoredVersion, VersionHeader, checksum,
    effective_version, now_ms, retention_floor, validate_name,
};
use crate::validate::{self, Problem, Schema};

/// Limits and defaults of the store.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest content accepted, in bytes.
    pub max_content_bytes: usize,
    /// Retention of new items that do not set one.
    pub default_retention: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_content_bytes: 1024 * 1024,
            default_retention: 100,
        }
    }
}

/// A version as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Which item.
    pub item: ItemRef,
    /// Number, format, checksum, author, message, timestamp, ...
    #[serde(flatten)]
    pub header: VersionHeader,
    /// The content (absent in history pages unless asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl Version {
    /// From a stored version.
    pub fn new(item: ItemRef, v: &StoredVersion, with_content: bool) -> Version {
        Version {
            item,
            header: v.header.clone(),
            content: with_content.then(|| v.content.clone()),
        }
    }
}

/// An item's state and settings as the API shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Which item.
    pub item: ItemRef,
    /// The newest version's format.
    pub format: Format,
    /// The current version (0: deleted).
    pub current_version: u64,
    /// The highest version number given.
    pub latest_version: u64,
    /// The oldest version still stored.
    pub oldest_version: u64,
    /// Deleted (history still readable).
    pub deleted: bool,
    /// The JSON Schema, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Versions kept.
    pub retention: u32,
    /// The rollout in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Candidates given up by abort.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aborted: Vec<u64>,
    /// First published.
    pub created_at_ms: i64,
    /// Last changed.
    pub updated_at_ms: i64,
}

impl Item {
    /// From a stored state whose meta exists.
    pub fn new(item: ItemRef, state: &ItemState) -> Option<Item> {
        let meta = state.meta.as_ref()?;
        Some(Item {
            item,
            format: meta.format,
            current_version: state.current_version(),
            latest_version: meta.latest,
            oldest_version: meta.oldest,
            deleted: meta.deleted,
            schema: meta.schema.clone(),
            retention: meta.retention,
            rollout: state.rollout.clone(),
            aborted: meta.aborted.clone(),
            created_at_ms: meta.created_at_ms,
            updated_at_ms: meta.updated_at_ms,
        })
    }
}

/// What to publish.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishInput {
    /// Which item (filled from the path in REST).
    #[serde(default)]
    pub item: Option<ItemRef>,
    /// Required for a new item; the item's format otherwise.
    #[serde(default)]
    pub format: Option<Format>,
    /// The content.
    pub content: String,
    /// Who publishes.
    #[serde(default)]
    pub author: String,
    /// Why.
    #[serde(default)]
    pub message: String,
    /// Compare-and-set: the current version must be this (0: none).
    #[serde(default)]
    pub expected_version: Option<u64>,
    /// A new JSON Schema (`""` removes it).
    #[serde(default)]
    pub schema: Option<String>,
    /// A new retention.
    #[serde(default)]
    pub retention: Option<u32>,
    /// Publish as a rollout candidate for these clients.
    #[serde(default)]
    pub rollout: Option<RolloutRule>,
}

/// The answer of a publish, rollback, delete: the version (if any), the item, the revision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// The new version (without content).
    pub version: Version,
    /// The item after the change.
    pub item: Item,
    /// The coordinator revision of the change.
    pub revision: i64,
}

/// A page of items.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemPage {
    /// The items, by group then key.
    pub items: Vec<Item>,
    /// Pass back to get the next page ("" at the end).
    pub next_page_token: String,
    /// The revision the page reflects.
    pub revision: i64,
}

/// A page of history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Versions, newest first.
    pub versions: Vec<Version>,
    /// Pass back to get the next (older) page ("" at the end).
    pub next_page_token: String,
}

/// Immutable version records recently seen, shared by every reader and watcher so that a
/// version is read from the coordinator about once however many watchers need it. Bounded by
/// total content size; evicts the oldest entries first.
pub struct VersionCache {
    inner: Mutex<CacheInner>,
    max_bytes: usize,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<(ItemRef, u64), Arc<StoredVersion>>,
    order: VecDeque<(ItemRef, u64)>,
    bytes: usize,
}

impl VersionCache {
    /// A cache holding at most `max_bytes` of content.
    pub fn new(max_bytes: usize) -> VersionCache {
        VersionCache {
            inner: Mutex::new(CacheInner::default()),
            max_bytes,
        }
    }

    /// The version if cached.
    pub fn get(&self, item: &ItemRef, n: u64) -> Option<Arc<StoredVersion>> {
        self.inner.lock().map.get(&(item.clone(), n)).cloned()
    }

    /// Caches a version (versions never change, so there is nothing to invalidate; purge
    /// and re-create reuse numbers, which [`VersionCache::forget_item`] handles).
    pub fn insert(&self, item: &ItemRef, v: Arc<StoredVersion>) {
        let size = v.content.len() + 256;
        if size > self.max_bytes {
            return;
        }
        let mut c = self.inner.lock();
        let key = (item.clone(), v.header.number);
        if c.map.insert(key.clone(), v).is_some() {
            return;
        }
        c.order.push_back(key);
        c.bytes += size;
        while c.bytes > self.max_bytes {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(v) = c.map.remove(&old) {
                c.bytes -= v.content.len() + 256;
            }
        }
    }

    /// Drops every cached version of `item` (after a purge).
    pub fn forget_item(&self, item: &ItemRef) {
        let mut c = self.inner.lock();
        let before = c.map.len();
        c.map.retain(|(i, _), _| i != item);
        if c.map.len() != before {
            let CacheInner { map, order, bytes } = &mut *c;
            order.retain(|k| map.contains_key(k));
            *bytes = map.values().map(|v| v.content.len() + 256).sum();
        }
    }
}

/// The store: a handle on the coordinator plus metrics. Cheap to share behind an `Arc`.
pub struct Store {
    client: Client,
    /// Who may do what (off: everyone everything).
    auth: Arc<Auth>,
    metrics: ConfigMetrics,
    limits: Limits,
    cache: Arc<VersionCache>,
}

/// Builds an item's state from the keys under its prefix; returns it with the meta key's
/// `mod_revision` (0 if absent).
pub fn state_from_kvs<'a>(kvs: impl IntoIterator<Item = &'a KeyValue>) -> Result<(ItemState, i64)> {
    let mut state = ItemState::default();
    let mut meta_rev = 0;
    for kv in kvs {
        let Some(Parsed::Item { part, .. }) = keys::parse(&kv.key) else {
            continue;
        };
        apply_kv(&mut state, part, Some(&kv.value))?;
        if part == Part::Meta {
            meta_rev = kv.mod_revision;
        }
    }
    Ok((state, meta_rev))
}

/// Sets (`Some`) or clears (`None`) one part of a state from a stored value.
pub fn apply_kv(state: &mut ItemState, part: Part, value: Option<&[u8]>) -> Result<()> {
    fn de<T: serde::de::DeserializeOwned>(what: &str, v: &[u8]) -> Result<T> {
        serde_json::from_slice(v)
            .map_err(|e| Error::Internal(format!("{what} record does not parse: {e}")))
    }
    match (part, value) {
        (Part::Meta, Some(v)) => state.meta = Some(de("meta", v)?),
        (Part::Meta, None) => state.meta = None,
        (Part::Current, Some(v)) => state.current = Some(de("current", v)?),
        (Part::Current, None) => state.current = None,
        (Part::Rollout, Some(v)) => state.rollout = Some(de("rollout", v)?),
        (Part::Rollout, None) => state.rollout = None,
    }
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Internal(format!("cannot encode a record: {e}")))
}

fn delete_range_op(key: String, range_end: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.into_bytes(),
            range_end,
            ..Default::default()
        })),
    }
}

fn not_found(item: &ItemRef) -> Error {
    Error::NotFound(format!("item {item} does not exist"))
}

fn check_text(what: &str, s: &str) -> Result<()> {
    if s.len() > MAX_TEXT_LEN {
        return Err(Error::invalid(format!(
            "{what} is {} bytes long; at most {MAX_TEXT_LEN} are allowed",
            s.len()
        )));
    }
    Ok(())
}

fn check_retention(r: u32) -> Result<u32> {
    if r == 0 || r > MAX_RETENTION {
        return Err(Error::invalid(format!(
            "retention {r} is out of range: 1 to {MAX_RETENTION} versions"
        )));
    }
    Ok(r)
}

fn compile_schema(schema: Option<&str>) -> Result<Option<Schema>> {
    match schema {
        None => Ok(None),
        Some(s) if s.len() > MAX_SCHEMA_BYTES => Err(Error::invalid(format!(
            "schema is {} bytes long; at most {MAX_SCHEMA_BYTES} are allowed",
            s.len()
        ))),
        Some(s) => Ok(Some(Schema::compile(s)?)),
    }
}

/// Which kind of publish.
enum Origin {
    Publish,
    Rollback(u64),
}

/// How many times a write re-reads and retries after losing a race.
const WRITE_ATTEMPTS: usize = 16;

impl Store {
    /// A store over `client`.
    pub fn new(
        client: Client,
        metrics: ConfigMetrics,
        limits: Limits,
        auth: Arc<Auth>,
    ) -> Arc<Store> {
        Arc::new(Store {
            client,
            auth,
            metrics,
            limits,
            cache: Arc::new(VersionCache::new(64 * 1024 * 1024)),
        })
    }

    /// The coordinator client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Who may do what; the faces authenticate callers with it.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The one authorisation check (see the module docs).
    pub fn check(&self, who: &Identity, action: &str, ns: &str, need: Permission) -> Result<()> {
        Ok(self.auth.authorize(who, action, ns, need)?)
    }

    /// The metrics.
    pub fn metrics(&self) -> &ConfigMetrics {
        &self.metrics
    }

    /// The version cache.
    pub fn cache(&self) -> &Arc<VersionCache> {
        &self.cache
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reads an item's state, its meta `mod_revision` and the revision of the read.
    pub async fn read_state(&self, item: &ItemRef) -> Result<(ItemState, i64, i64)> {
        let res = self
            .client
            .get_prefix(keys::item_prefix(&item.namespace, &item.group, &item.key))
            .await?;
        let (state, meta_rev) = state_from_kvs(&res.kvs)?;
        Ok((state, meta_rev, res.revision))
    }

    /// Reads one version (from the cache if there); `None` if it is not stored.
    pub async fn read_version(&self, item: &ItemRef, n: u64) -> Result<Option<Arc<StoredVersion>>> {
        if let Some(v) = self.cache.get(item, n) {
            return Ok(Some(v));
        }
        let key = keys::version(&item.namespace, &item.group, &item.key, n);
        let (kv, _) = self.client.get(key).await?;
        let Some(kv) = kv else { return Ok(None) };
        let v = Arc::new(StoredVersion::decode(&kv.value)?);
        self.cache.insert(item, v.clone());
        Ok(Some(v))
    }

    /// Reads the versions numbered `numbers` that are still stored, in the order given. One
    /// read per version (most come from the cache): a Range over several versions could
    /// exceed the 4 MiB a coordinator answer may hold.
    pub async fn read_versions(
        &self,
        item: &ItemRef,
        numbers: &[u64],
    ) -> Result<Vec<Arc<StoredVersion>>> {
        let mut out = Vec::with_capacity(numbers.len());
        for n in numbers {
            if let Some(v) = self.read_version(item, *n).await? {
                out.push(v);
            }
        }
        Ok(out)
    }

    fn version_out_of_range(item: &ItemRef, n: u64, state: &ItemState) -> Error {
        match &state.meta {
            Some(m) if n > m.latest || n == 0 => Error::NotFound(format!(
                "version {n} of {item} does not exist: its versions are 1 to {}",
                m.latest
            )),
            Some(m) => Error::NotFound(format!(
                "version {n} of {item} is no longer stored: versions {} to {} are kept (retention {})",
                m.oldest, m.latest, m.retention
            )),
            None => not_found(item),
        }
    }

    /// Reads version `n` if `state` says it is still stored (the cache may hold pruned ones).
    async fn read_retained(
        &self,
        item: &ItemRef,
        n: u64,
        state: &ItemState,
    ) -> Result<Arc<StoredVersion>> {
        let retained = state
            .meta
            .as_ref()
            .is_some_and(|m| n >= m.oldest && n <= m.latest);
        if retained && let Some(v) = self.read_version(item, n).await? {
            return Ok(v);
        }
        Err(Self::version_out_of_range(item, n, state))
    }

    async fn commit(&self, req: TxnRequest) -> Result<Option<i64>> {
        let resp = self.client.txn_guarded(req).await?;
        Ok(resp
            .succeeded
            .then(|| resp.header.map(|h| h.revision).unwrap_or_default()))
    }

    // ---- publish ---------------------------------------------------------------------------

    /// Publishes a new version (see the module docs).
    pub async fn publish(&self, who: &Identity, input: PublishInput) -> Result<Published> {
        let ns = input.item.as_ref().map_or("", |i| i.namespace.as_str());
        if input.schema.is_some() || input.retention.is_some() {
            self.check(
                who,
                "publish with schema or retention",
                ns,
                Permission::Admin,
            )?;
        } else {
            self.check(who, "publish", ns, Permission::Write)?;
        }
        let result = self.publish_inner(input, Origin::Publish).await;
        ConfigMetrics::count(&self.metrics.publishes, &result);
        result
    }

    /// Publishes a new version with the content of version `version`.
    pub async fn rollback(
        &self,
        who: &Identity,
        item: ItemRef,
        version: u64,
        author: String,
        message: String,
        expected_version: Option<u64>,
    ) -> Result<Published> {
        self.check(who, "rollback", &item.namespace, Permission::Write)?;
        let result = async {
            item.validate()?;
            if version == 0 {
                return Err(Error::invalid("version must be 1 or more"));
            }
            let (state, _, _) = self.read_state(&item).await?;
            let old = self.read_retained(&item, version, &state).await?;
            let message = if message.is_empty() {
                format!("rollback to version {version}")
            } else {
                message
            };
            let input = PublishInput {
                item: Some(item),
                format: Some(old.header.format),
                content: old.content.clone(),
                author,
                message,
                expected_version,
                schema: None,
                retention: None,
                rollout: None,
            };
            self.publish_inner(input, Origin::Rollback(version)).await
        }
        .await;
        ConfigMetrics::count(&self.metrics.publishes, &result);
        result
    }

    async fn publish_inner(&self, input: PublishInput, origin: Origin) -> Result<Published> {
        let item = input
            .item
            .clone()
            .ok_or_else(|| Error::invalid("item is missing"))?;
        item.validate()?;
        check_text("author", &input.author)?;
        check_text("message", &input.message)?;
        if input.content.len() > self.limits.max_content_bytes {
            return Err(Error::invalid(format!(
                "content is {} bytes; at most {} are allowed",
                input.content.len(),
                self.limits.max_content_bytes
            )));
        }
        let rollout = input.rollout.clone();
        if let Some(r) = &rollout {
            if r.is_empty() {
                return Err(Error::invalid(
                    "the rollout rule selects no one: give labels and/or a percentage",
                ));
            }
            r.validate()?;
        }
        if let Some(r) = input.retention {
            check_retention(r)?;
        }
        let sum = checksum(&input.content);
        for _ in 0..WRITE_ATTEMPTS {
            let (state, meta_rev, _) = self.read_state(&item).await?;
            let current = state.current_version();
            if let Some(expected) = input.expected_version
                && expected != current
            {
                return Err(Error::Conflict(format!(
                    "item {item} is at version {current}, not the expected {expected}: it changed meanwhile; read it and try again"
                )));
            }
            if let Some(r) = &state.rollout
                && state.is_live()
            {
                return Err(Error::FailedPrecondition(format!(
                    "a rollout of version {} of {item} is in progress: promote or abort it first",
                    r.candidate
                )));
            }
            if rollout.is_some() && current == 0 {
                return Err(Error::FailedPrecondition(format!(
                    "item {item} has no current version: a rollout needs one for the clients it does not select"
                )));
            }
            let old_meta = state.meta.as_ref();
            let format = input.format.or(old_meta.map(|m| m.format)).ok_or_else(|| {
                Error::invalid(format!("format is required for the new item {item}"))
            })?;
            let schema_text = match &input.schema {
                Some(s) if s.trim().is_empty() => None,
                Some(s) => Some(s.clone()),
                None => old_meta.and_then(|m| m.schema.clone()),
            };
            let schema = compile_schema(schema_text.as_deref())?;
            validate::validate(format, &input.content, schema.as_ref())?;
            let retention = input
                .retention
                .or(old_meta.map(|m| m.retention))
                .unwrap_or(self.limits.default_retention);
            let now = now_ms();
            let n = old_meta.map(|m| m.latest).unwrap_or(0) + 1;
            let header = VersionHeader {
                number: n,
                format,
                checksum: sum.clone(),
                author: input.author.clone(),
                message: input.message.clone(),
                created_at_ms: now,
                rollback_of: match origin {
                    Origin::Rollback(v) => Some(v),
                    Origin::Publish => None,
                },
                candidate: rollout.is_some(),
                size: input.content.len() as u64,
            };
            let version = StoredVersion {
                header,
                content: input.content.clone(),
            };
            let keep: Vec<u64> = if rollout.is_some() {
                vec![n, current]
            } else {
                vec![n]
            };
            let floor = retention_floor(n, retention, &keep);
            let mut aborted = old_meta.map(|m| m.aborted.clone()).unwrap_or_default();
            aborted.retain(|a| *a >= floor);
            let old_oldest = old_meta.map(|m| m.oldest).unwrap_or(1).max(1);
            let meta = ItemMeta {
                format,
                schema: schema_text,
                retention,
                latest: n,
                oldest: old_oldest.max(floor),
                deleted: false,
                aborted,
                created_at_ms: old_meta.map(|m| m.created_at_ms).unwrap_or(now),
                updated_at_ms: now,
            };
            let (ns, g, k) = (&item.namespace, &item.group, &item.key);
            let meta_key = keys::meta(ns, g, k);
            let mut txn = Txn::new()
                .if_mod_revision(meta_key.clone(), meta_rev)
                .then_put(keys::version(ns, g, k, n), version.encode()?, 0)
                .then_put(meta_key, encode(&meta)?, 0);
            let new_rollout = rollout.as_ref().map(|rule| Rollout {
                candidate: n,
                base: current,
                rule: rule.clone(),
                author: input.author.clone(),
                started_at_ms: now,
            });
            txn = match &new_rollout {
                Some(r) => txn.then_put(keys::rollout(ns, g, k), encode(r)?, 0),
                None => txn.then_put(
                    keys::current(ns, g, k),
                    encode(&Pointer {
                        version: n,
                        checksum: sum.clone(),
                    })?,
                    0,
                ),
            };
            let mut req = txn.build();
            if floor > old_oldest {
                req.success.push(delete_range_op(
                    keys::versions_prefix(ns, g, k),
                    keys::version(ns, g, k, floor).into_bytes(),
                ));
            }
            let revision = match self.commit(req).await? {
                Some(rev) => rev,
                None => {
                    // Lost a race, or our own earlier attempt was applied (a retried Txn).
                    if let (Some(kv), _) = self.client.get(keys::version(ns, g, k, n)).await?
                        && StoredVersion::decode(&kv.value)?.header == version.header
                    {
                        kv.mod_revision
                    } else {
                        continue;
                    }
                }
            };
            let version = Arc::new(version);
            self.cache.insert(&item, version.clone());
            let state = ItemState {
                meta: Some(meta),
                current: if new_rollout.is_some() {
                    state.current.clone()
                } else {
                    Some(Pointer {
                        version: n,
                        checksum: sum.clone(),
                    })
                },
                rollout: new_rollout,
            };
            tracing::debug!(item = %item, version = n, revision, "published");
            return Ok(Published {
                version: Version::new(item.clone(), &version, false),
                item: Item::new(item, &state).ok_or_else(|| Error::Internal("no meta".into()))?,
                revision,
            });
        }
        Err(Error::Conflict(format!(
            "item {item} kept changing while publishing; try again"
        )))
    }

    // ---- reads -----------------------------------------------------------------------------

    /// The version `client` should have (`version == 0`) or version `version`, with the item.
    pub async fn get(
        &self,
        who: &Identity,
        item: &ItemRef,
        version: u64,
        client: &ClientInfo,
    ) -> Result<(Arc<StoredVersion>, Item)> {
        self.check(who, "get", &item.namespace, Permission::Read)?;
        let result = self.get_inner(item, version, client).await;
        ConfigMetrics::count(&self.metrics.reads, &result);
        result
    }

    async fn get_inner(
        &self,
        item: &ItemRef,
        version: u64,
        client: &ClientInfo,
    ) -> Result<(Arc<StoredVersion>, Item)> {
        item.validate()?;
        let (state, _, _) = self.read_state(item).await?;
        let Some(info) = Item::new(item.clone(), &state) else {
            return Err(not_found(item));
        };
        let n = if version > 0 {
            version
        } else {
            effective_version(item, &state, client).ok_or_else(|| {
                Error::NotFound(format!(
                    "item {item} is deleted; its history (versions {} to {}) is still readable by number",
                    info.oldest_version, info.latest_version
                ))
            })?
        };
        Ok((self.read_retained(item, n, &state).await?, info))
    }

    /// The items of a namespace (or one group), by group then key.
    pub async fn list(
        &self,
        who: &Identity,
        ns: &str,
        group: Option<&str>,
        include_deleted: bool,
        page_size: u32,
        page_token: &str,
    ) -> Result<ItemPage> {
        self.check(who, "list", ns, Permission::Read)?;
        let result = async {
            validate_name("namespace", ns)?;
            if let Some(g) = group {
                validate_name("group", g)?;
            }
            let page_size = match page_size {
                0 => 100,
                n if n > 1000 => {
                    return Err(Error::invalid(format!(
                        "page_size {n} is too large: at most 1000"
                    )));
                }
                n => n as usize,
            };
            let res = self.client.get_prefix(keys::items_of(ns, group)).await?;
            let mut states: BTreeMap<ItemRef, ItemState> = BTreeMap::new();
            for kv in &res.kvs {
                let Some(Parsed::Item { item, part }) = keys::parse(&kv.key) else {
                    continue;
                };
                let state = states.entry(item.into()).or_default();
                apply_kv(state, part, Some(&kv.value))?;
            }
            // The token is the last item's "group/key"; items are ordered by (group, key).
            let after = match page_token {
                "" => None,
                t => Some(t.split_once('/').ok_or_else(|| {
                    Error::invalid(format!("page_token {t:?} is not one this service gave"))
                })?),
            };
            let mut items = Vec::new();
            let mut next_page_token = String::new();
            for (item, state) in states {
                if let Some((g, k)) = after
                    && (item.group.as_str(), item.key.as_str()) <= (g, k)
                {
                    continue;
                }
                let Some(info) = Item::new(item, &state) else {
                    continue;
                };
                if info.deleted && !include_deleted {
                    continue;
                }
                if items.len() == page_size {
                    if let Some(last) = items.last() {
                        let last: &Item = last;
                        next_page_token = format!("{}/{}", last.item.group, last.item.key);
                    }
                    break;
                }
                items.push(info);
            }
            Ok(ItemPage {
                items,
                next_page_token,
                revision: res.revision,
            })
        }
        .await;
        self.metrics.count_op("list", &result);
        result
    }

    /// An item's versions, newest first.
    pub async fn history(
        &self,
        who: &Identity,
        item: &ItemRef,
        page_size: u32,
        page_token: &str,
        include_content: bool,
    ) -> Result<HistoryPage> {
        self.check(who, "history", &item.namespace, Permission::Read)?;
        let result = async {
            item.validate()?;
            let page_size = match page_size {
                0 => 20,
                n if n > 100 => {
                    return Err(Error::invalid(format!(
                        "page_size {n} is too large: at most 100"
                    )));
                }
                n => i64::from(n),
            };
            let (ns, g, k) = (&item.namespace, &item.group, &item.key);
            let prefix = keys::versions_prefix(ns, g, k);
            let range_end = if page_token.is_empty() {
                coord_client::kv::prefix_end(prefix.as_bytes())
            } else {
                let below: u64 = page_token.parse().map_err(|_| {
                    Error::invalid(format!(
                        "page_token {page_token:?} is not one this service gave"
                    ))
                })?;
                keys::version(ns, g, k, below).into_bytes()
            };
            let resp = self
                .client
                .range(RangeRequest {
                    key: prefix.into_bytes(),
                    range_end,
                    limit: page_size + 1,
                    sort_order: SortOrder::Descend as i32,
                    sort_target: SortTarget::Key as i32,
                    keys_only: true,
                    ..Default::default()
                })
                .await?;
            if resp.kvs.is_empty() && page_token.is_empty() {
                let (state, _, _) = self.read_state(item).await?;
                if state.meta.is_none() {
                    return Err(not_found(item));
                }
            }
            let mut numbers: Vec<u64> = resp
                .kvs
                .iter()
                .filter_map(|kv| match keys::parse(&kv.key) {
                    Some(Parsed::Version { number, .. }) => Some(number),
                    _ => None,
                })
                .collect();
            let mut next_page_token = String::new();
            if numbers.len() as i64 > page_size {
                numbers.truncate(page_size as usize);
                if let Some(last) = numbers.last() {
                    next_page_token = last.to_string();
                }
            }
            let versions = self
                .read_versions(item, &numbers)
                .await?
                .iter()
                .map(|v| Version::new(item.clone(), v, include_content))
                .collect();
            Ok(HistoryPage {
                versions,
                next_page_token,
            })
        }
        .await;
        self.metrics.count_op("history", &result);
        result
    }

    /// The difference between versions `from` and `to` (`to == 0`: the current version;
    /// `from == 0`: the version before `to`).
    pub async fn diff(
        &self,
        who: &Identity,
        item: &ItemRef,
        from: u64,
        to: u64,
    ) -> Result<crate::diff::Diff> {
        self.check(who, "diff", &item.namespace, Permission::Read)?;
        let result = async {
            item.validate()?;
            let (state, _, _) = self.read_state(item).await?;
            if state.meta.is_none() {
                return Err(not_found(item));
            }
            let to = if to == 0 {
                match state.current_version() {
                    0 => {
                        return Err(Error::NotFound(format!(
                            "item {item} is deleted: name both versions to diff"
                        )));
                    }
                    n => n,
                }
            } else {
                to
            };
            let from = if from == 0 {
                to.saturating_sub(1)
            } else {
                from
            };
            let mut sides = Vec::with_capacity(2);
            for n in [from, to] {
                sides.push(self.read_retained(item, n, &state).await?);
            }
            Ok(crate::diff::diff(&sides[0], &sides[1]))
        }
        .await;
        self.metrics.count_op("diff", &result);
        result
    }

    // ---- other writes ----------------------------------------------------------------------

    /// Runs `change` on the item's state until its Txn commits; `change` returns the ops to
    /// run (after the meta guard) and the new state, or `None` to stop with the current state.
    async fn change<F>(
        &self,
        op: &'static str,
        item: &ItemRef,
        mut change: F,
    ) -> Result<(ItemState, i64, bool)>
    where
        F: FnMut(&ItemState) -> Result<Option<(Vec<RequestOp>, ItemState)>>,
    {
        let result = async {
            item.validate()?;
            for _ in 0..WRITE_ATTEMPTS {
                let (state, meta_rev, revision) = self.read_state(item).await?;
                if state.meta.is_none() {
                    return Err(not_found(item));
                }
                let Some((ops, new_state)) = change(&state)? else {
                    return Ok((state, revision, false));
                };
                let mut req = Txn::new()
                    .if_mod_revision(
                        keys::meta(&item.namespace, &item.group, &item.key),
                        meta_rev,
                    )
                    .build();
                req.success = ops;
                if let Some(rev) = self.commit(req).await? {
                    return Ok((new_state, rev, true));
                }
            }
            Err(Error::Conflict(format!(
                "item {item} kept changing; try again"
            )))
        }
        .await;
        self.metrics.count_op(op, &result);
        result
    }

    /// Deletes an item: no current version, no rollout; history stays. Returns whether it
    /// was live, the item, and the revision.
    pub async fn delete(
        &self,
        who: &Identity,
        item: &ItemRef,
        expected_version: Option<u64>,
    ) -> Result<(bool, Item, i64)> {
        self.check(who, "delete", &item.namespace, Permission::Write)?;
        let (ns, g, k) = (&item.namespace, &item.group, &item.key);
        let (state, rev, changed) = self
            .change("delete", item, |state| {
                let current = state.current_version();
                if let Some(e) = expected_version
                    && e != current
                {
                    return Err(Error::Conflict(format!(
                        "item {item} is at version {current}, not the expected {e}"
                    )));
                }
                let Some(meta) = state.meta.as_ref().filter(|m| !m.deleted) else {
                    return Ok(None);
                };
                let mut meta = meta.clone();
                meta.deleted = true;
                meta.updated_at_ms = now_ms();
                if let Some(r) = &state.rollout {
                    meta.aborted.push(r.candidate);
                }
                let ops = Txn::new()
                    .then_put(keys::meta(ns, g, k), encode(&meta)?, 0)
                    .then_delete(keys::current(ns, g, k))
                    .then_delete(keys::rollout(ns, g, k))
                    .build()
                    .success;
                Ok(Some((
                    ops,
                    ItemState {
                        meta: Some(meta),
                        current: None,
                        rollout: None,
                    },
                )))
            })
            .await?;
        let info = Item::new(item.clone(), &state).ok_or_else(|| not_found(item))?;
        Ok((changed, info, rev))
    }

    /// Removes a deleted item and all its versions.
    pub async fn purge(&self, who: &Identity, item: &ItemRef) -> Result<i64> {
        self.check(who, "purge", &item.namespace, Permission::Admin)?;
        let (ns, g, k) = (&item.namespace, &item.group, &item.key);
        let (_, rev, _) = self
            .change("purge", item, |state| {
                if state.is_live() {
                    return Err(Error::FailedPrecondition(format!(
                        "item {item} is not deleted: delete it before purging its history"
                    )));
                }
                let items = keys::item_prefix(ns, g, k);
                let versions = keys::versions_prefix(ns, g, k);
                let ops = vec![
                    delete_range_op(
                        items.clone(),
                        coord_client::kv::prefix_end(items.as_bytes()),
                    ),
                    delete_range_op(
                        versions.clone(),
                        coord_client::kv::prefix_end(versions.as_bytes()),
                    ),
                ];
                Ok(Some((ops, ItemState::default())))
            })
            .await?;
        self.cache.forget_item(item);
        Ok(rev)
    }

    /// Changes an item's schema (`Some("")` removes it) and/or retention. A new schema must
    /// accept the current version.
    pub async fn set_options(
        &self,
        who: &Identity,
        item: &ItemRef,
        schema: Option<String>,
        retention: Option<u32>,
    ) -> Result<Item> {
        self.check(who, "set options", &item.namespace, Permission::Admin)?;
        if let Some(r) = retention {
            check_retention(r)?;
        }
        let compiled = compile_schema(schema.as_deref().filter(|s| !s.trim().is_empty()))?;
        // The current version (and candidate) must satisfy a new schema.
        if let Some(schema) = &compiled {
            let (state, _, _) = self.read_state(item).await?;
            let mut check = vec![state.current_version()];
            if let Some(r) = &state.rollout {
                check.push(r.candidate);
            }
            for n in check.into_iter().filter(|n| *n > 0) {
                if let Some(v) = self.read_version(item, n).await?
                    && v.header.format.is_structured()
                {
                    validate::validate(v.header.format, &v.content, Some(schema)).map_err(|e| match Error::from(e) {
                        Error::Invalid { message, problems } => Error::Invalid {
                            message: format!("version {n} (in use) does not satisfy the new schema: {message}"),
                            problems,
                        },
                        other => other,
                    })?;
                }
            }
        }
        let (ns, g, k) = (&item.namespace, &item.group, &item.key);
        let (state, _, _) = self
            .change("set_options", item, |state| {
                let Some(meta) = state.meta.as_ref() else {
                    return Ok(None);
                };
                let mut meta = meta.clone();
                if let Some(s) = &schema {
                    meta.schema = (!s.trim().is_empty()).then(|| s.clone());
                }
                if let Some(r) = retention {
                    meta.retention = r;
                }
                meta.updated_at_ms = now_ms();
                let mut keep = vec![state.current_version(), meta.latest];
                if let Some(r) = &state.rollout {
                    keep.extend([r.candidate, r.base]);
                }
                let floor = retention_floor(meta.latest, meta.retention, &keep);
                let mut prune = Vec::new();
                if floor > meta.oldest {
                    prune.push(delete_range_op(
                        keys::versions_prefix(ns, g, k),
                        keys::version(ns, g, k, floor).into_bytes(),
                    ));
                    meta.oldest = floor;
                    meta.aborted.retain(|a| *a >= floor);
                }
                let mut ops = Txn::new()
                    .then_put(keys::meta(ns, g, k), encode(&meta)?, 0)
                    .build()
                    .success;
                ops.extend(prune);
                let mut new_state = state.clone();
                new_state.meta = Some(meta);
                Ok(Some((ops, new_state)))
            })
            .await?;
        Item::new(item.clone(), &state).ok_or_else(|| not_found(item))
    }

    /// Makes the rollout's candidate current for everyone.
    pub async fn promote(&self, who: &Identity, item: &ItemRef) -> Result<Item> {
        self.check(who, "promote rollout", &item.namespace, Permission::Write)?;
        let (ns, g, k) = (&item.namespace, &item.group, &item.key);
        let candidate = {
            let (state, _, _) = self.read_state(item).await?;
            match (&state.rollout, state.is_live()) {
                (Some(r), true) => r.candidate,
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "no rollout of {item} is in progress"
                    )));
                }
            }
        };
        let version = self.read_version(item, candidate).await?.ok_or_else(|| {
            Error::Internal(format!("candidate {candidate} of {item} is missing"))
        })?;
        let (state, _, _) = self
            .change("promote", item, |state| {
                let (Some(meta), Some(r)) = (state.meta.as_ref(), state.rollout.as_ref()) else {
                    return Err(Error::FailedPrecondition(format!(
                        "no rollout of {item} is in progress"
                    )));
                };
                if r.candidate != candidate {
                    return Err(Error::Conflict(format!(
                        "the rollout of {item} changed meanwhile (candidate {} now)",
                        r.candidate
                    )));
                }
                let mut meta = meta.clone();
                meta.updated_at_ms = now_ms();
                let pointer = Pointer {
                    version: candidate,
                    checksum: version.header.checksum.clone(),
                };
                let ops = Txn::new()
                    .then_put(keys::meta(ns, g, k), encode(&meta)?, 0)
                    .then_put(keys::current(ns, g, k), encode(&pointer)?, 0)
                    .then_delete(keys::rollout(ns, g, k))
                    .build()
                    .success;
                Ok(Some((
                    ops,
                    ItemState {
                        meta: Some(meta),
                        current: Some(pointer),
                        rollout: None,
                    },
                )))
            })
            .await?;
        Item::new(item.clone(), &state).ok_or_else(|| not_found(item))
    }

    /// Ends the rollout: its candidate is never released; selected clients go back to the
    /// current version.
    pub async fn abort(&self, who: &Identity, item: &ItemRef) -> Result<Item> {
        self.check(who, "abort rollout", &item.namespace, Permission::Write)?;
        let (ns, g, k) = (&item.namespace, &item.group, &item.key);
        let (state, _, _) = self
            .change("abort", item, |state| {
                let (Some(meta), Some(r), true) =
                    (state.meta.as_ref(), state.rollout.as_ref(), state.is_live())
                else {
                    return Err(Error::FailedPrecondition(format!(
                        "no rollout of {item} is in progress"
                    )));
                };
                let mut meta = meta.clone();
                meta.updated_at_ms = now_ms();
                meta.aborted.push(r.candidate);
                let ops = Txn::new()
                    .then_put(keys::meta(ns, g, k), encode(&meta)?, 0)
                    .then_delete(keys::rollout(ns, g, k))
                    .build()
                    .success;
                let mut new_state = state.clone();
                new_state.meta = Some(meta);
                new_state.rollout = None;
                Ok(Some((ops, new_state)))
            })
            .await?;
        Item::new(item.clone(), &state).ok_or_else(|| not_found(item))
    }

    /// Checks content without storing it.
    pub fn validate(
        &self,
        format: Format,
        content: &str,
        schema: Option<&str>,
    ) -> Result<Vec<Problem>> {
        let result = (|| {
            if content.len() > self.limits.max_content_bytes {
                return Err(Error::invalid(format!(
                    "content is {} bytes; at most {} are allowed",
                    content.len(),
                    self.limits.max_content_bytes
                )));
            }
            let schema = compile_schema(schema.filter(|s| !s.trim().is_empty()))?;
            Ok(validate::problems(format, content, schema.as_ref()))
        })();
        self.metrics.count_op("validate", &result);
        result
    }
}
