//! The configuration service's key layout in the coordinator — the one place it is written down.
//!
//! | key | value | written by |
//! |---|---|---|
//! | `/config/v1/items/<ns>/<group>/<key>/meta` | [`ItemMeta`](crate::model::ItemMeta) as JSON: format, schema, retention, latest number, deleted flag, aborted candidates | every change of the item (it is the guard every Txn compares) |
//! | `/config/v1/items/<ns>/<group>/<key>/current` | [`Pointer`](crate::model::Pointer) as JSON: the current version number | publish, rollback, promote; deleted by delete |
//! | `/config/v1/items/<ns>/<group>/<key>/rollout` | [`Rollout`](crate::model::Rollout) as JSON: candidate, base, rule | publish with a rollout rule; deleted by promote, abort, delete |
//! | `/config/v1/versions/<ns>/<group>/<key>/<n>` | [`StoredVersion`](crate::model::StoredVersion): one JSON header line, `\n`, then the content verbatim | publish (once; never rewritten); deleted by retention and purge |
//!
//! `<n>` is the version number as 20 zero-padded digits, so key order is version order and a
//! history page is one Range. Names cannot contain `/` (see `model::validate_name`), so
//! `/config/v1/items/<ns>/<group>/` holds exactly the items of that group.
//!
//! Why two trees: the small per-item keys (`items/`) can be listed for a whole namespace in
//! one Range without reading any content, and a version is a key of its own, so coordinator
//! compaction (which drops *old revisions of a key*) never loses history: every version is the
//! latest revision of its own key. Every change of an item is one Txn guarded by the
//! `mod_revision` of its `meta` key, so concurrent writers serialise and nothing is half-written.

/// Everything the configuration service stores.
pub const ROOT: &str = "/config/v1/";
/// Per-item state (meta, current, rollout).
pub const ITEMS: &str = "/config/v1/items/";
/// Version records.
pub const VERSIONS: &str = "/config/v1/versions/";

/// The last part of the meta key.
pub const META: &str = "meta";
/// The last part of the current-pointer key.
pub const CURRENT: &str = "current";
/// The last part of the rollout key.
pub const ROLLOUT: &str = "rollout";

/// The prefix of one item's state keys.
pub fn item_prefix(ns: &str, group: &str, key: &str) -> String {
    format!("{ITEMS}{ns}/{group}/{key}/")
}

/// The meta key of an item.
pub fn meta(ns: &str, group: &str, key: &str) -> String {
    format!("{ITEMS}{ns}/{group}/{key}/{META}")
}

/// The current-pointer key of an item.
pub fn current(ns: &str, group: &str, key: &str) -> String {
    format!("{ITEMS}{ns}/{group}/{key}/{CURRENT}")
}

/// The rollout key of an item.
pub fn rollout(ns: &str, group: &str, key: &str) -> String {
    format!("{ITEMS}{ns}/{group}/{key}/{ROLLOUT}")
}

/// The prefix of every item of a namespace (`group = None`) or of one group.
pub fn items_of(ns: &str, group: Option<&str>) -> String {
    match group {
        Some(g) => format!("{ITEMS}{ns}/{g}/"),
        None => format!("{ITEMS}{ns}/"),
    }
}

/// The prefix of an item's versions.
pub fn versions_prefix(ns: &str, group: &str, key: &str) -> String {
    format!("{VERSIONS}{ns}/{group}/{key}/")
}

/// The key of one version.
pub fn version(ns: &str, group: &str, key: &str, n: u64) -> String {
    format!("{VERSIONS}{ns}/{group}/{key}/{n:020}")
}

/// Which per-item key a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `meta`.
    Meta,
    /// `current`.
    Current,
    /// `rollout`.
    Rollout,
}

/// What a key under [`ROOT`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A per-item key.
    Item {
        /// `(ns, group, key)`.
        item: (String, String, String),
        /// Which one.
        part: Part,
    },
    /// A version record.
    Version {
        /// `(ns, group, key)`.
        item: (String, String, String),
        /// The version number.
        number: u64,
    },
}

fn split3(rest: &str) -> Option<((String, String, String), &str)> {
    let mut parts = rest.splitn(4, '/');
    let (ns, group, key, last) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if ns.is_empty() || group.is_empty() || key.is_empty() || last.contains('/') {
        return None;
    }
    Some(((ns.to_owned(), group.to_owned(), key.to_owned()), last))
}

/// Parses a key under [`ROOT`]; `None` for anything else.
pub fn parse(key: &[u8]) -> Option<Parsed> {
    let key = std::str::from_utf8(key).ok()?;
    if let Some(rest) = key.strip_prefix(ITEMS) {
        let (item, last) = split3(rest)?;
        let part = match last {
            META => Part::Meta,
            CURRENT => Part::Current,
            ROLLOUT => Part::Rollout,
            _ => return None,
        };
        Some(Parsed::Item { item, part })
    } else if let Some(rest) = key.strip_prefix(VERSIONS) {
        let (item, last) = split3(rest)?;
        let number = last.parse().ok()?;
        Some(Parsed::Version { item, number })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(a: &str, b: &str, c: &str) -> (String, String, String) {
        (a.into(), b.into(), c.into())
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(
            meta("prod", "app", "db.yaml"),
            "/config/v1/items/prod/app/db.yaml/meta"
        );
        assert_eq!(
            parse(meta("prod", "app", "db.yaml").as_bytes()),
            Some(Parsed::Item {
                item: t("prod", "app", "db.yaml"),
                part: Part::Meta
            })
        );
        assert_eq!(
            parse(current("a", "b", "c").as_bytes()),
            Some(Parsed::Item {
                item: t("a", "b", "c"),
                part: Part::Current
            })
        );
        let v = version("a", "b", "c", 42);
        assert_eq!(v, "/config/v1/versions/a/b/c/00000000000000000042");
        assert_eq!(
            parse(v.as_bytes()),
            Some(Parsed::Version {
                item: t("a", "b", "c"),
                number: 42
            })
        );
        assert!(v.starts_with(&versions_prefix("a", "b", "c")));
        assert_eq!(parse(b"/config/v1/items/a/b/c/other"), None);
        assert_eq!(parse(b"/registry/v1/x"), None);
    }

    #[test]
    fn version_keys_sort_by_number() {
        assert!(version("a", "b", "c", 9) < version("a", "b", "c", 10));
        assert!(version("a", "b", "c", 99) < version("a", "b", "c", 100));
    }

    #[test]
    fn group_prefix_does_not_match_a_longer_group_name() {
        assert!(!meta("ns", "group2", "k").starts_with(&items_of("ns", Some("group"))));
        assert!(meta("ns", "group", "k").starts_with(&items_of("ns", Some("group"))));
        assert!(meta("ns", "group", "k").starts_with(&items_of("ns", None)));
    }
}
