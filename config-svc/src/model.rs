//! The configuration model: items, versions, pointers, rollouts, and the rules that decide which
//! version a client gets. Pure: no I/O.
//!
//! # Which version a client gets
//! An item has at most one *current* version and at most one *rollout*, whose *candidate* is a
//! newer version meant only for the clients its [`RolloutRule`] selects: clients whose labels
//! contain every pair of `labels`, and, if `percentage` is set, whose id hashes into the first
//! `percentage` percent. The hash is SHA-256 of `"<ns>/<group>/<key>\n<client id>"`, so a client
//! keeps its place for the item across requests, restarts and replicas of config-svc, and
//! raising the percentage only adds clients. A client without an id is never in a percentage.
//! See [`effective_version`].
//!
//! # Released versions
//! A version was *released* (handed to everyone at some point) if it is not newer than the
//! current version and was not a candidate given up by abort. A watch that resumes from version
//! `k` is sent the released versions after `k` in order, then the one meant for it now
//! ([`missed_versions`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Longest namespace, group or key.
pub const MAX_NAME_LEN: usize = 253;
/// Longest author or message.
pub const MAX_TEXT_LEN: usize = 4096;
/// Largest JSON Schema.
pub const MAX_SCHEMA_BYTES: usize = 256 * 1024;
/// Most versions an item may keep.
pub const MAX_RETENTION: u32 = 10_000;

/// Checks a namespace, group or key: 1 to 253 letters, digits, `.`, `_`, `-`, `:`; not `.` or
/// `..`.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("{what} is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{what} is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    if name == "." || name == ".." {
        return Err(Error::invalid(format!("{what} {name:?} is not allowed")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Err(Error::invalid(format!(
            "{what} {name:?} contains {c:?}: use letters, digits, '.', '_', '-' and ':'"
        )));
    }
    Ok(())
}

/// Namespace / group / key of an item.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ItemRef {
    /// Namespace (an environment or tenant).
    pub namespace: String,
    /// Group (an application or a set of related items).
    pub group: String,
    /// Key (the item's name, e.g. `db.yaml`).
    pub key: String,
}

impl ItemRef {
    /// A reference from its three parts.
    pub fn new(ns: impl Into<String>, group: impl Into<String>, key: impl Into<String>) -> ItemRef {
        ItemRef {
            namespace: ns.into(),
            group: group.into(),
            key: key.into(),
        }
    }

    /// Checks the three names.
    pub fn validate(&self) -> Result<()> {
        validate_name("namespace", &self.namespace)?;
        validate_name("group", &self.group)?;
        validate_name("key", &self.key)
    }

    /// `ns/group/key`, for messages and hashing.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.group, self.key)
    }
}

impl std::fmt::Display for ItemRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.group, self.key)
    }
}

impl From<(String, String, String)> for ItemRef {
    fn from((namespace, group, key): (String, String, String)) -> ItemRef {
        ItemRef {
            namespace,
            group,
            key,
        }
    }
}

// The format enum lives in `config-formats` (with the parsers), so the fuzz targets can build
// them without the service; re-exported here under its old path.
pub use config_formats::Format;

/// `sha256:<hex>` of `content`.
pub fn checksum(content: &str) -> String {
    let digest = Sha256::digest(content.as_bytes());
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// An item's settings and bookkeeping (the `meta` key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemMeta {
    /// The format of the newest version.
    pub format: Format,
    /// JSON Schema that structured content must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// How many versions are kept (the current one and a rollout's are always kept).
    pub retention: u32,
    /// The highest version number given so far.
    pub latest: u64,
    /// The lowest version number still stored.
    pub oldest: u64,
    /// Deleted: no current version; history still readable.
    #[serde(default)]
    pub deleted: bool,
    /// Candidates given up by abort (never released), oldest first; pruned with retention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aborted: Vec<u64>,
    /// When the item was first published.
    pub created_at_ms: i64,
    /// When the item last changed (any write).
    pub updated_at_ms: i64,
}

/// The current-version pointer (the `current` key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    /// The current version number.
    pub version: u64,
    /// Its checksum.
    pub checksum: String,
}

/// Which clients get a rollout's candidate (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRule {
    /// Labels a client must all have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Share of clients (0..=100) by stable hash of their id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<u32>,
}

impl RolloutRule {
    /// True if the rule says nothing (no rollout asked for).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.percentage.is_none()
    }

    /// Checks the percentage and the labels.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.percentage
            && p > 100
        {
            return Err(Error::invalid(format!(
                "rollout percentage {p} is out of range: 0 to 100"
            )));
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > MAX_NAME_LEN || v.len() > MAX_NAME_LEN {
                return Err(Error::invalid(format!(
                    "rollout label {k:?}={v:?} is invalid: names 1 to {MAX_NAME_LEN} bytes, values at most {MAX_NAME_LEN}"
                )));
            }
        }
        Ok(())
    }

    /// Whether `client` gets the candidate of `item`'s rollout.
    pub fn selects(&self, item: &ItemRef, client: &ClientInfo) -> bool {
        if !self
            .labels
            .iter()
            .all(|(k, v)| client.labels.get(k) == Some(v))
        {
            return false;
        }
        match self.percentage {
            None => true,
            Some(p) => !client.id.is_empty() && bucket(item, &client.id) < p * 100,
        }
    }
}

/// The client's place (0..10000) for `item`: a stable hash of the item and the client id.
pub fn bucket(item: &ItemRef, client_id: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(item.path().as_bytes());
    h.update(b"\n");
    h.update(client_id.as_bytes());
    let d = h.finalize();
    let n = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    u32::try_from(n % 10_000).unwrap_or(0)
}

/// A staged rollout in progress (the `rollout` key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The version being rolled out.
    pub candidate: u64,
    /// The current version when it started.
    pub base: u64,
    /// Who gets it.
    pub rule: RolloutRule,
    /// Who started it.
    pub author: String,
    /// When it started.
    pub started_at_ms: i64,
}

/// Who is asking: an id (for percentages) and labels (for selectors).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// A stable client id (e.g. a host or pod name); "" for anonymous.
    #[serde(default)]
    pub id: String,
    /// Labels such as `zone=a`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What a version record holds besides its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionHeader {
    /// The version number (1, 2, ...).
    pub number: u64,
    /// The content's format.
    pub format: Format,
    /// `sha256:<hex>` of the content.
    pub checksum: String,
    /// Who published it.
    #[serde(default)]
    pub author: String,
    /// Why.
    #[serde(default)]
    pub message: String,
    /// When.
    pub created_at_ms: i64,
    /// The version whose content it copies, if made by rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
    /// Published as a rollout candidate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub candidate: bool,
    /// Content length in bytes.
    pub size: u64,
}

/// One immutable version: its header and content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVersion {
    /// Number, format, checksum, author, ...
    #[serde(flatten)]
    pub header: VersionHeader,
    /// The content, verbatim.
    pub content: String,
}

impl StoredVersion {
    /// The stored form: the header as one JSON line, `\n`, the content verbatim (so the content
    /// is not escaped and a 1 MiB item stays about 1 MiB in the coordinator).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = serde_json::to_vec(&self.header)
            .map_err(|e| Error::Internal(format!("cannot encode a version: {e}")))?;
        out.push(b'\n');
        out.extend_from_slice(self.content.as_bytes());
        Ok(out)
    }

    /// Reads the stored form back.
    pub fn decode(raw: &[u8]) -> Result<StoredVersion> {
        let split = raw
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| Error::Internal("version record has no header line".into()))?;
        let header: VersionHeader = serde_json::from_slice(&raw[..split])
            .map_err(|e| Error::Internal(format!("version header does not parse: {e}")))?;
        let content = String::from_utf8(raw[split + 1..].to_vec())
            .map_err(|_| Error::Internal("version content is not UTF-8".into()))?;
        Ok(StoredVersion { header, content })
    }
}

/// An item's state as stored: its three small keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemState {
    /// Settings and bookkeeping (absent: the item does not exist).
    pub meta: Option<ItemMeta>,
    /// The current version.
    pub current: Option<Pointer>,
    /// A rollout in progress.
    pub rollout: Option<Rollout>,
}

impl ItemState {
    /// True if the item exists and is not deleted.
    pub fn is_live(&self) -> bool {
        self.meta.as_ref().is_some_and(|m| !m.deleted)
    }

    /// The current version number (0 if none).
    pub fn current_version(&self) -> u64 {
        if self.is_live() {
            self.current.as_ref().map(|p| p.version).unwrap_or(0)
        } else {
            0
        }
    }
}

/// The version `client` should have of `item` in `state` (`None`: nothing, the item does not
/// exist or is deleted).
pub fn effective_version(item: &ItemRef, state: &ItemState, client: &ClientInfo) -> Option<u64> {
    if !state.is_live() {
        return None;
    }
    if let Some(r) = &state.rollout
        && r.rule.selects(item, client)
    {
        return Some(r.candidate);
    }
    state.current.as_ref().map(|p| p.version)
}

/// Whether version `n` was ever handed to everyone (see the module docs).
pub fn is_released(state: &ItemState, n: u64) -> bool {
    let current = state.current.as_ref().map(|p| p.version).unwrap_or(0);
    let aborted = state.meta.as_ref().is_some_and(|m| m.aborted.contains(&n));
    n <= current && !aborted
}

/// The numbers of the versions a client that holds `known` must be sent before `target`:
/// released versions strictly between the two, in order. Empty when `target <= known`.
pub fn missed_versions(state: &ItemState, known: u64, target: u64) -> Vec<u64> {
    if target <= known + 1 {
        return Vec::new();
    }
    (known + 1..target)
        .filter(|n| is_released(state, *n))
        .collect()
}

/// Which versions survive retention after `latest` was added: everything from the returned
/// number up. Never drops `keep` (the current version, a rollout's candidate or base).
pub fn retention_floor(latest: u64, retention: u32, keep: &[u64]) -> u64 {
    let by_count = latest.saturating_sub(u64::from(retention.max(1))) + 1;
    keep.iter()
        .copied()
        .filter(|k| *k > 0)
        .fold(by_count, u64::min)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> ItemRef {
        ItemRef::new("prod", "orders", "app.yaml")
    }

    fn state(current: u64, rollout: Option<(u64, RolloutRule)>) -> ItemState {
        ItemState {
            meta: Some(ItemMeta {
                format: Format::Yaml,
                schema: None,
                retention: 10,
                latest: current.max(rollout.as_ref().map(|r| r.0).unwrap_or(0)),
                oldest: 1,
                deleted: false,
                aborted: vec![],
                created_at_ms: 0,
                updated_at_ms: 0,
            }),
            current: Some(Pointer {
                version: current,
                checksum: String::new(),
            }),
            rollout: rollout.map(|(candidate, rule)| Rollout {
                candidate,
                base: current,
                rule,
                author: String::new(),
                started_at_ms: 0,
            }),
        }
    }

    fn client(id: &str, labels: &[(&str, &str)]) -> ClientInfo {
        ClientInfo {
            id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    #[test]
    fn names_allow_dots_and_dashes_but_not_slashes() {
        assert!(validate_name("key", "db.yaml").is_ok());
        assert!(validate_name("key", "DEFAULT_GROUP").is_ok());
        assert!(validate_name("key", "a/b").is_err());
        assert!(validate_name("key", "").is_err());
        assert!(validate_name("key", "..").is_err());
        assert!(validate_name("key", &"x".repeat(254)).is_err());
    }

    #[test]
    fn version_record_round_trips_with_newlines_in_content() {
        let v = StoredVersion {
            header: VersionHeader {
                number: 3,
                format: Format::Text,
                checksum: checksum("a\nb\n"),
                author: "ann".into(),
                message: "line1\nline2".into(),
                created_at_ms: 1,
                rollback_of: Some(1),
                candidate: false,
                size: 4,
            },
            content: "a\nb\n".into(),
        };
        let raw = v.encode().expect("encode");
        assert_eq!(StoredVersion::decode(&raw).expect("decode"), v);
    }

    #[test]
    fn label_rule_selects_clients_with_every_label() {
        let rule = RolloutRule {
            labels: [("zone".to_string(), "a".to_string())].into(),
            percentage: None,
        };
        let s = state(1, Some((2, rule)));
        assert_eq!(
            effective_version(&item(), &s, &client("c1", &[("zone", "a")])),
            Some(2)
        );
        assert_eq!(
            effective_version(&item(), &s, &client("c1", &[("zone", "b")])),
            Some(1)
        );
        assert_eq!(effective_version(&item(), &s, &client("c1", &[])), Some(1));
    }

    #[test]
    fn percentage_rule_selects_about_that_share_stably() {
        let rule = RolloutRule {
            labels: BTreeMap::new(),
            percentage: Some(30),
        };
        let s = state(1, Some((2, rule)));
        let picked: Vec<bool> = (0..2000)
            .map(|i| effective_version(&item(), &s, &client(&format!("c{i}"), &[])) == Some(2))
            .collect();
        let share = picked.iter().filter(|p| **p).count();
        assert!((500..700).contains(&share), "{share} of 2000 selected");
        // Stable: the same answer every time.
        for (i, p) in picked.iter().enumerate().take(50) {
            assert_eq!(
                effective_version(&item(), &s, &client(&format!("c{i}"), &[])) == Some(2),
                *p
            );
        }
        // Anonymous clients are never in a percentage.
        assert_eq!(effective_version(&item(), &s, &client("", &[])), Some(1));
    }

    #[test]
    fn raising_the_percentage_keeps_everyone_already_selected() {
        let at = |p| RolloutRule {
            labels: BTreeMap::new(),
            percentage: Some(p),
        };
        for i in 0..500 {
            let c = client(&format!("c{i}"), &[]);
            if at(10).selects(&item(), &c) {
                assert!(at(50).selects(&item(), &c));
            }
        }
        assert!(at(100).selects(&item(), &client("x", &[])));
        assert!(!at(0).selects(&item(), &client("x", &[])));
    }

    #[test]
    fn deleted_items_have_no_effective_version() {
        let mut s = state(1, None);
        if let Some(m) = s.meta.as_mut() {
            m.deleted = true;
        }
        assert_eq!(effective_version(&item(), &s, &ClientInfo::default()), None);
    }

    #[test]
    fn missed_versions_skip_aborted_candidates() {
        let mut s = state(6, None);
        if let Some(m) = s.meta.as_mut() {
            m.aborted = vec![4];
        }
        assert_eq!(missed_versions(&s, 2, 6), vec![3, 5]);
        assert_eq!(missed_versions(&s, 5, 6), Vec::<u64>::new());
        assert_eq!(missed_versions(&s, 6, 3), Vec::<u64>::new());
    }

    #[test]
    fn retention_keeps_the_newest_and_protected_versions() {
        assert_eq!(retention_floor(10, 3, &[10]), 8);
        assert_eq!(retention_floor(10, 3, &[5, 10]), 5);
        assert_eq!(retention_floor(2, 5, &[2]), 1);
        assert_eq!(retention_floor(10, 0, &[10]), 10);
    }

    #[test]
    fn checksum_is_sha256_hex() {
        assert_eq!(
            checksum(""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
