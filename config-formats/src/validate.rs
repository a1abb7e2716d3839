//! Validation: content must parse in its format (a failure names the line and column), and
//! structured content must satisfy the item's JSON Schema (a violation names the JSON pointer of
//! the offending value, and for JSON content its line and column too). Pure.
//!
//! Structured formats are read into one tree ([`serde_json::Value`]) so that schemas and the
//! key-path diff work the same for all of them: YAML mappings and TOML tables become objects
//! (non-string YAML keys are written as strings, TOML dates as strings), and `.properties`
//! files become one flat object of strings (`server.port=80` → `{"server.port": "80"}`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Format;
use crate::{Error, Result};

/// One thing wrong with some content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// What is wrong.
    pub message: String,
    /// 1-based line (0: unknown).
    pub line: u32,
    /// 1-based column, in characters (0: unknown).
    pub column: u32,
    /// JSON pointer of the offending value for schema violations ("" otherwise).
    #[serde(default)]
    pub path: String,
}

impl Problem {
    fn at(message: impl Into<String>, line: usize, column: usize) -> Problem {
        Problem {
            message: message.into(),
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
            path: String::new(),
        }
    }

    /// "line L, column C: message" (or "at PATH: message").
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if self.line > 0 {
            s.push_str(&format!("line {}, column {}", self.line, self.column));
        }
        if !self.path.is_empty() {
            if !s.is_empty() {
                s.push_str(", ");
            }
            s.push_str(&format!("at {}", self.path));
        }
        if !s.is_empty() {
            s.push_str(": ");
        }
        s.push_str(&self.message);
        s
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let mut cut = offset;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let before = &text[..cut];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

/// Parses `content` as `format`; `None` for text (which has no tree).
pub fn parse(format: Format, content: &str) -> std::result::Result<Option<Value>, Problem> {
    match format {
        Format::Text => Ok(None),
        Format::Json => parse_json(content).map(Some),
        Format::Yaml => parse_yaml(content).map(Some),
        Format::Toml => parse_toml(content).map(Some),
        Format::Properties => parse_properties(content).map(|pairs| {
            Some(Value::Object(
                pairs
                    .into_iter()
                    .map(|(k, v, _)| (k, Value::String(v)))
                    .collect(),
            ))
        }),
    }
}

fn parse_json(content: &str) -> std::result::Result<Value, Problem> {
    serde_json::from_str(content).map_err(|e| {
        let text = e.to_string();
        let message = text
            .rsplit_once(" at line ")
            .map(|(m, _)| m.to_owned())
            .unwrap_or(text);
        Problem::at(message, e.line(), e.column())
    })
}

fn parse_yaml(content: &str) -> std::result::Result<Value, Problem> {
    let value: serde_norway::Value = serde_norway::from_str(content).map_err(|e| {
        let text = e.to_string();
        // From the byte offset, not the parser's own line: YAML counts a lone CR as a line
        // break, every other format here (and the fuzz target's check) counts only LF, so a
        // problem's line means the same in every format.
        let (line, column) = e
            .location()
            .map(|l| line_column(content, l.index()))
            .unwrap_or((0, 0));
        let message = text
            .rsplit_once(" at line ")
            .map(|(m, _)| m.to_owned())
            .unwrap_or(text);
        Problem::at(message, line, column)
    })?;
    Ok(yaml_to_json(value))
}

fn yaml_to_json(v: serde_norway::Value) -> Value {
    use serde_norway::Value as Y;
    match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or_else(|| Value::String(n.to_string()))
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(yaml_to_json).collect()),
        Y::Mapping(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let key = match yaml_to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(t) => yaml_to_json(t.value),
    }
}

fn parse_toml(content: &str) -> std::result::Result<Value, Problem> {
    let table: toml::Table = content.parse().map_err(|e: toml::de::Error| {
        let (line, column) = e
            .span()
            .map(|s| line_column(content, s.start))
            .unwrap_or((0, 0));
        Problem::at(e.message().trim().to_owned(), line, column)
    })?;
    Ok(toml_to_json(toml::Value::Table(table)))
}

fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

/// Parses Java `.properties` text: `key=value`, `key: value` or `key value`; `#` and `!`
/// comments; a trailing backslash continues a line; `\t \n \r \f \uXXXX` escapes. Returns
/// `(key, value, line)` in file order; a later duplicate replaces an earlier one when read as a
/// tree. Fails only on a malformed `\u` escape (the format accepts anything else).
pub fn parse_properties(
    content: &str,
) -> std::result::Result<Vec<(String, String, usize)>, Problem> {
    let mut out = Vec::new();
    let lines: Vec<&str> = content.split('\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let first_line = i + 1;
        // Join continuation lines: (text, line number, column offset of its first char).
        let mut logical: Vec<(char, usize, usize)> = Vec::new();
        let mut continuing = true;
        let mut first = true;
        while continuing && i < lines.len() {
            let raw = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
            let trimmed_start = raw.trim_start_matches([' ', '\t', '\x0c']);
            let skipped = raw[..raw.len() - trimmed_start.len()].chars().count();
            if first && (trimmed_start.starts_with('#') || trimmed_start.starts_with('!')) {
                i += 1;
                logical.clear();
                break;
            }
            first = false;
            let chars: Vec<char> = trimmed_start.chars().collect();
            // A line ends in a continuation if it ends in an odd number of backslashes.
            let trailing = chars.iter().rev().take_while(|c| **c == '\\').count();
            continuing = trailing % 2 == 1;
            let keep = if continuing {
                chars.len() - 1
            } else {
                chars.len()
            };
            for (col, c) in chars.into_iter().take(keep).enumerate() {
                logical.push((c, i + 1, skipped + col + 1));
            }
            i += 1;
        }
        if logical.is_empty() {
            continue;
        }
        // Split key and value at the first unescaped '=', ':' or whitespace.
        let mut key = String::new();
        let mut idx = 0;
        let mut escaped = false;
        while idx < logical.len() {
            let c = logical[idx].0;
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '=' || c == ':' || c == ' ' || c == '\t' || c == '\x0c' {
                break;
            }
            idx += 1;
        }
        let key_chars = &logical[..idx];
        let mut rest = idx;
        while rest < logical.len() && matches!(logical[rest].0, ' ' | '\t' | '\x0c') {
            rest += 1;
        }
        if rest < logical.len() && matches!(logical[rest].0, '=' | ':') {
            rest += 1;
            while rest < logical.len() && matches!(logical[rest].0, ' ' | '\t' | '\x0c') {
                rest += 1;
            }
        }
        key.push_str(&unescape(key_chars)?);
        let value = unescape(&logical[rest..])?;
        out.push((key, value, first_line));
    }
    Ok(out)
}

fn unescape(chars: &[(char, usize, usize)]) -> std::result::Result<String, Problem> {
    let mut s = String::new();
    let mut i = 0;
    while i < chars.len() {
        let (c, line, col) = chars[i];
        if c != '\\' {
            s.push(c);
            i += 1;
            continue;
        }
        let Some(&(next, _, _)) = chars.get(i + 1) else {
            i += 1;
            continue;
        };
        match next {
            't' => s.push('\t'),
            'n' => s.push('\n'),
            'r' => s.push('\r'),
            'f' => s.push('\x0c'),
            'u' => {
                let hex: String = chars.iter().skip(i + 2).take(4).map(|c| c.0).collect();
                let code = (hex.len() == 4)
                    .then(|| u32::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .and_then(char::from_u32)
                    .ok_or_else(|| {
                        Problem::at(format!("malformed \\uXXXX escape \"\\u{hex}\""), line, col)
                    })?;
                s.push(code);
                i += 6;
                continue;
            }
            other => s.push(other),
        }
        i += 2;
    }
    Ok(s)
}

/// A compiled JSON Schema.
pub struct Schema {
    validator: jsonschema::Validator,
}

impl Schema {
    /// Compiles `text` (a JSON Schema document); `InvalidArgument` if it is not one.
    pub fn compile(text: &str) -> Result<Schema> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            Error::invalid(format!(
                "schema is not valid JSON: line {}, column {}: {e}",
                e.line(),
                e.column()
            ))
        })?;
        let validator = jsonschema::validator_for(&value)
            .map_err(|e| Error::invalid(format!("schema is not a valid JSON Schema: {e}")))?;
        Ok(Schema { validator })
    }

    /// Every violation of the schema by `tree`, with the JSON pointer of the offending value;
    /// for JSON content (`json_text`), also its line and column.
    pub fn check(&self, tree: &Value, json_text: Option<&str>) -> Vec<Problem> {
        self.validator
            .iter_errors(tree)
            .take(20)
            .map(|e| {
                let path = e.instance_path().to_string();
                let (line, column) = json_text
                    .and_then(|t| locate_pointer(t, &path))
                    .map(|off| line_column(json_text.unwrap_or_default(), off))
                    .unwrap_or((0, 0));
                Problem {
                    message: e.to_string(),
                    line: u32::try_from(line).unwrap_or(0),
                    column: u32::try_from(column).unwrap_or(0),
                    path: if path.is_empty() { "/".into() } else { path },
                }
            })
            .collect()
    }
}

/// Checks `content` as `format` against `schema` (if any); `Error::Invalid` naming the first
/// problem and its position, with every problem attached.
pub fn validate(format: Format, content: &str, schema: Option<&Schema>) -> Result<()> {
    let problems = problems(format, content, schema);
    match problems.first() {
        None => Ok(()),
        Some(first) => {
            let what = if first.path.is_empty() {
                format!("content is not valid {}", format.as_str())
            } else {
                "content violates the item's schema".to_owned()
            };
            Err(Error::Invalid {
                message: format!("{what}: {}", first.describe()),
                problems,
            })
        }
    }
}

/// Every problem of `content` as `format` (and against `schema`); empty if it is valid.
pub fn problems(format: Format, content: &str, schema: Option<&Schema>) -> Vec<Problem> {
    match parse(format, content) {
        Err(p) => vec![p],
        Ok(None) => Vec::new(),
        Ok(Some(tree)) => match schema {
            None => Vec::new(),
            Some(s) => s.check(&tree, (format == Format::Json).then_some(content)),
        },
    }
}

/// The byte offset in JSON `text` of the value at JSON pointer `pointer` (`""` or `"/"`: the
/// root). A small scanner over already-valid JSON; `None` if the path is not found.
pub fn locate_pointer(text: &str, pointer: &str) -> Option<usize> {
    let segments: Vec<String> = pointer
        .split('/')
        .skip(1)
        .filter(|s| !s.is_empty())
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    let b = text.as_bytes();
    let mut pos = skip_ws(b, 0);
    for seg in segments {
        match *b.get(pos)? {
            b'{' => {
                pos = skip_ws(b, pos + 1);
                loop {
                    if *b.get(pos)? == b'}' {
                        return None;
                    }
                    let (key, after) = read_string(b, pos)?;
                    pos = skip_ws(b, after);
                    if *b.get(pos)? != b':' {
                        return None;
                    }
                    pos = skip_ws(b, pos + 1);
                    if key == seg {
                        break;
                    }
                    pos = skip_ws(b, skip_value(b, pos)?);
                    if *b.get(pos)? == b',' {
                        pos = skip_ws(b, pos + 1);
                    }
                }
            }
            b'[' => {
                let index: usize = seg.parse().ok()?;
                pos = skip_ws(b, pos + 1);
                for _ in 0..index {
                    if *b.get(pos)? == b']' {
                        return None;
                    }
                    pos = skip_ws(b, skip_value(b, pos)?);
                    if *b.get(pos)? == b',' {
                        pos = skip_ws(b, pos + 1);
                    }
                }
                if *b.get(pos)? == b']' {
                    return None;
                }
            }
            _ => return None,
        }
    }
    Some(pos)
}

fn skip_ws(b: &[u8], mut pos: usize) -> usize {
    while pos < b.len() && matches!(b[pos], b' ' | b'\t' | b'\n' | b'\r') {
        pos += 1;
    }
    pos
}

/// The decoded string starting at `pos` (a `"`), and the position after it.
fn read_string(b: &[u8], pos: usize) -> Option<(String, usize)> {
    if *b.get(pos)? != b'"' {
        return None;
    }
    let mut end = pos + 1;
    while *b.get(end)? != b'"' {
        if b[end] == b'\\' {
            end += 1;
        }
        end += 1;
    }
    let raw = std::str::from_utf8(&b[pos..=end]).ok()?;
    let s: String = serde_json::from_str(raw).ok()?;
    Some((s, end + 1))
}

/// The position after the value starting at `pos`.
fn skip_value(b: &[u8], pos: usize) -> Option<usize> {
    match *b.get(pos)? {
        b'"' => read_string(b, pos).map(|(_, e)| e),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut p = pos;
            loop {
                match *b.get(p)? {
                    b'"' => {
                        p = read_string(b, p)?.1;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(p + 1);
                        }
                    }
                    _ => {}
                }
                p += 1;
            }
        }
        _ => {
            let mut p = pos;
            while p < b.len() && !matches!(b[p], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                p += 1;
            }
            Some(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(format: Format, content: &str) -> Problem {
        parse(format, content).expect_err("should not parse")
    }

    #[test]
    fn invalid_json_names_line_and_column() {
        let p = problem(Format::Json, "{\n  \"a\": 1,\n  \"b\": }\n");
        assert_eq!((p.line, p.column), (3, 8), "{p:?}");
        assert!(p.message.contains("expected value"), "{p:?}");
        assert!(!p.message.contains("at line"), "{p:?}");
    }

    #[test]
    fn invalid_yaml_names_line_and_column() {
        let p = problem(Format::Yaml, "a: 1\nb: [1, 2\nc: 3\n");
        assert!(p.line >= 2, "{p:?}");
        assert!(p.column > 0, "{p:?}");
    }

    #[test]
    fn yaml_problem_lines_count_line_feeds_only_as_every_format_does() {
        // YAML itself takes each lone CR as a line break (line 4 here); the problem names the
        // line as JSON and TOML would count it. Found by the config_formats fuzz target.
        let p = problem(Format::Yaml, "a: 1\r\r\rb: x: y\nc: 2\n");
        assert_eq!((p.line, p.column), (1, 12), "{p:?}");
        // Columns are characters, the offset behind them bytes.
        let p = problem(Format::Yaml, "ééé: 1\nb: [1, 2\nc: 3\n");
        assert_eq!((p.line, p.column), (3, 2), "{p:?}");
    }

    #[test]
    fn invalid_toml_names_line_and_column() {
        let p = problem(Format::Toml, "a = 1\nb = \n");
        assert_eq!(p.line, 2, "{p:?}");
        assert!(p.column > 0, "{p:?}");
    }

    #[test]
    fn yaml_and_toml_become_json_trees() {
        let y = parse(
            Format::Yaml,
            "server:\n  port: 80\n  hosts: [a, b]\n1: one\n",
        )
        .expect("valid")
        .expect("tree");
        assert_eq!(y["server"]["port"], 80);
        assert_eq!(y["server"]["hosts"][1], "b");
        assert_eq!(y["1"], "one");
        let t = parse(Format::Toml, "[server]\nport = 80\nstart = 1979-05-27\n")
            .expect("valid")
            .expect("tree");
        assert_eq!(t["server"]["port"], 80);
        assert_eq!(t["server"]["start"], "1979-05-27");
    }

    #[test]
    fn properties_follow_java_rules() {
        let text = "# comment\n! also\nserver.port=8080\nname : demo\nplain value here\nmulti = a\\\n    b\nunicode=\\u0041\\tx\n\nempty\n";
        let pairs = parse_properties(text).expect("valid");
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _, _)| key == k)
                .map(|(_, v, l)| (v.clone(), *l))
        };
        assert_eq!(get("server.port"), Some(("8080".into(), 3)));
        assert_eq!(get("name"), Some(("demo".into(), 4)));
        assert_eq!(get("plain"), Some(("value here".into(), 5)));
        assert_eq!(get("multi"), Some(("ab".into(), 6)));
        assert_eq!(get("unicode"), Some(("A\tx".into(), 8)));
        assert_eq!(get("empty"), Some((String::new(), 10)));
    }

    #[test]
    fn properties_reject_a_malformed_unicode_escape_with_its_position() {
        let p = problem(Format::Properties, "a=1\nb=x\\u12G4\n");
        assert_eq!((p.line, p.column), (2, 4), "{p:?}");
    }

    #[test]
    fn schema_violation_names_the_pointer_and_for_json_the_line() {
        let schema = Schema::compile(
            r#"{"type":"object","properties":{"port":{"type":"integer","maximum":65535}},"required":["port"]}"#,
        )
        .expect("schema");
        let content = "{\n  \"name\": \"x\",\n  \"port\": 70000\n}";
        let err = validate(Format::Json, content, Some(&schema)).expect_err("violates");
        let Error::Invalid { message, problems } = err else {
            panic!("not Invalid")
        };
        assert_eq!(problems[0].path, "/port");
        assert_eq!((problems[0].line, problems[0].column), (3, 11));
        assert!(message.contains("/port"), "{message}");
        assert!(message.contains("65535"), "{message}");
        // The same schema applies to YAML (path only).
        let err = validate(Format::Yaml, "name: x\n", Some(&schema)).expect_err("missing port");
        assert!(err.to_string().contains("port"), "{err}");
        assert!(validate(Format::Yaml, "port: 80\n", Some(&schema)).is_ok());
    }

    #[test]
    fn a_bad_schema_is_invalid_argument() {
        assert!(matches!(
            Schema::compile("{"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Schema::compile(r#"{"type": 12}"#),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn pointer_locator_finds_nested_values() {
        let t = r#"{"a": {"b": [1, {"c": "x"}]}, "d": 2}"#;
        let off = locate_pointer(t, "/a/b/1/c").expect("found");
        assert_eq!(&t[off..off + 3], "\"x\"");
        let off = locate_pointer(t, "/d").expect("found");
        assert_eq!(&t[off..off + 1], "2");
        assert_eq!(locate_pointer(t, "/zz"), None);
        assert_eq!(locate_pointer(t, ""), Some(0));
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncé\nx", 6), (2, 3));
        assert_eq!(line_column("", 0), (1, 1));
    }
}
