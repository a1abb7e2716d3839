//! Differences between two versions. Pure.
//!
//! Every pair gets a line diff (and a unified diff text). When both versions are structured
//! (json, yaml, toml, properties) and parse, it also gets a key-path diff: the paths whose value
//! was added, removed or changed, e.g. `server.port` or `hosts[2]`. Objects are compared key by
//! key, arrays index by index; a key that holds `.`, `[`, `]` or `"` is written `["a.b"]`.
//! `.properties` keys are flat, so they are used as they are.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use similar::{ChangeTag, TextDiff};

use crate::model::{Format, StoredVersion};
use crate::validate;

/// What happened to a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineOp {
    /// In both.
    Equal,
    /// Only in the new version.
    Insert,
    /// Only in the old version.
    Delete,
}

/// One line of a line diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffLine {
    /// Equal, insert or delete.
    pub op: LineOp,
    /// The line, without its newline.
    pub text: String,
    /// 1-based line number in the old content (0: not there).
    pub old_line: u32,
    /// 1-based line number in the new content (0: not there).
    pub new_line: u32,
}

/// What happened at a key path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyOp {
    /// Only in the new version.
    Added,
    /// Only in the old version.
    Removed,
    /// In both, with different values.
    Changed,
}

/// One key-path change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChange {
    /// The path, e.g. `server.ports[1]`.
    pub path: String,
    /// Added, removed or changed.
    pub op: KeyOp,
    /// The old value as JSON text ("" if absent).
    pub old_value: String,
    /// The new value as JSON text ("" if absent).
    pub new_value: String,
}

/// The difference between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    /// The older side.
    pub from_version: u64,
    /// The newer side.
    pub to_version: u64,
    /// Every line, marked.
    pub lines: Vec<DiffLine>,
    /// A unified diff (3 lines of context).
    pub unified: String,
    /// True when `changes` was computed (both sides structured and parseable).
    pub structured: bool,
    /// Key-path changes, in path order.
    pub changes: Vec<KeyChange>,
}

/// Diffs `from` against `to`.
pub fn diff(from: &StoredVersion, to: &StoredVersion) -> Diff {
    let text = TextDiff::from_lines(from.content.as_str(), to.content.as_str());
    let lines = text
        .iter_all_changes()
        .map(|c| DiffLine {
            op: match c.tag() {
                ChangeTag::Equal => LineOp::Equal,
                ChangeTag::Insert => LineOp::Insert,
                ChangeTag::Delete => LineOp::Delete,
            },
            text: c
                .value()
                .trim_end_matches('\n')
                .trim_end_matches('\r')
                .to_owned(),
            old_line: c
                .old_index()
                .map(|i| u32::try_from(i + 1).unwrap_or(u32::MAX))
                .unwrap_or(0),
            new_line: c
                .new_index()
                .map(|i| u32::try_from(i + 1).unwrap_or(u32::MAX))
                .unwrap_or(0),
        })
        .collect();
    let unified = text
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("version {}", from.header.number),
            &format!("version {}", to.header.number),
        )
        .to_string();
    let (f, t) = (from.header.format, to.header.format);
    let trees = if f.is_structured() && t.is_structured() {
        match (
            validate::parse(f, &from.content),
            validate::parse(t, &to.content),
        ) {
            (Ok(Some(a)), Ok(Some(b))) => Some((a, b)),
            _ => None,
        }
    } else {
        None
    };
    let structured = trees.is_some();
    let mut changes = Vec::new();
    if let Some((a, b)) = trees {
        let flat = f == Format::Properties && t == Format::Properties;
        key_diff(String::new(), Some(&a), Some(&b), flat, &mut changes);
    }
    Diff {
        from_version: from.header.number,
        to_version: to.header.number,
        lines,
        unified,
        structured,
        changes,
    }
}

fn child(path: &str, key: &str, flat: bool) -> String {
    let plain = flat
        || (!key.is_empty()
            && !key.contains(['.', '[', ']', '"'])
            && !key.contains(char::is_whitespace));
    match (plain, path.is_empty()) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{path}.{key}"),
        (false, _) => format!("{path}[{}]", Value::String(key.to_owned())),
    }
}

/// Appends the key-path changes between `a` and `b` under `path`.
pub fn key_diff(
    path: String,
    a: Option<&Value>,
    b: Option<&Value>,
    flat: bool,
    out: &mut Vec<KeyChange>,
) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                key_diff(child(&path, k, flat), x.get(k), y.get(k), flat, out);
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            for i in 0..x.len().max(y.len()) {
                key_diff(format!("{path}[{i}]"), x.get(i), y.get(i), flat, out);
            }
        }
        (x, y) if x == y => {}
        (x, y) => out.push(KeyChange {
            path: if path.is_empty() { "$".into() } else { path },
            op: match (x, y) {
                (None, _) => KeyOp::Added,
                (_, None) => KeyOp::Removed,
                _ => KeyOp::Changed,
            },
            old_value: x.map(Value::to_string).unwrap_or_default(),
            new_value: y.map(Value::to_string).unwrap_or_default(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{VersionHeader, checksum};

    fn v(n: u64, format: Format, content: &str) -> StoredVersion {
        StoredVersion {
            header: VersionHeader {
                number: n,
                format,
                checksum: checksum(content),
                author: String::new(),
                message: String::new(),
                created_at_ms: 0,
                rollback_of: None,
                candidate: false,
                size: content.len() as u64,
            },
            content: content.into(),
        }
    }

    #[test]
    fn text_diff_marks_inserted_and_deleted_lines() {
        let d = diff(
            &v(1, Format::Text, "a\nb\nc\n"),
            &v(2, Format::Text, "a\nB\nc\nd\n"),
        );
        assert!(!d.structured);
        let ops: Vec<(LineOp, &str)> = d.lines.iter().map(|l| (l.op, l.text.as_str())).collect();
        assert_eq!(
            ops,
            vec![
                (LineOp::Equal, "a"),
                (LineOp::Delete, "b"),
                (LineOp::Insert, "B"),
                (LineOp::Equal, "c"),
                (LineOp::Insert, "d"),
            ]
        );
        assert!(d.unified.contains("-b\n+B\n"), "{}", d.unified);
        assert!(d.unified.contains("version 1"), "{}", d.unified);
    }

    #[test]
    fn structured_diff_names_key_paths() {
        let d = diff(
            &v(
                1,
                Format::Yaml,
                "server:\n  port: 80\n  hosts: [a, b]\nold: 1\n",
            ),
            &v(
                2,
                Format::Json,
                r#"{"server": {"port": 81, "hosts": ["a", "b", "c"]}, "new": {"x.y": true}}"#,
            ),
        );
        assert!(d.structured);
        let got: Vec<(String, KeyOp, String, String)> = d
            .changes
            .iter()
            .map(|c| {
                (
                    c.path.clone(),
                    c.op,
                    c.old_value.clone(),
                    c.new_value.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "new".into(),
                    KeyOp::Added,
                    String::new(),
                    r#"{"x.y":true}"#.into()
                ),
                ("old".into(), KeyOp::Removed, "1".into(), String::new()),
                (
                    "server.hosts[2]".into(),
                    KeyOp::Added,
                    String::new(),
                    "\"c\"".into()
                ),
                (
                    "server.port".into(),
                    KeyOp::Changed,
                    "80".into(),
                    "81".into()
                ),
            ]
        );
    }

    #[test]
    fn properties_keys_are_used_as_they_are() {
        let d = diff(
            &v(1, Format::Properties, "server.port=80\na.b=1\n"),
            &v(2, Format::Properties, "server.port=81\na.b=1\n"),
        );
        assert_eq!(d.changes.len(), 1);
        assert_eq!(d.changes[0].path, "server.port");
    }

    #[test]
    fn keys_with_dots_are_quoted_in_structured_formats() {
        let mut out = Vec::new();
        key_diff(
            String::new(),
            Some(&serde_json::json!({"a": {"b.c": 1}})),
            Some(&serde_json::json!({"a": {"b.c": 2}})),
            false,
            &mut out,
        );
        assert_eq!(out[0].path, r#"a["b.c"]"#);
    }
}
