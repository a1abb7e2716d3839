//! The settings document: a JSON object published to config-svc.
//!
//! ```json
//! { "greeting": "hello", "color": "blue" }
//! ```
//!
//! `greeting` (a string of at most [`MAX_GREETING`] bytes) is what answers carry; every other
//! field is passed through as it is, under `settings`, so a user can publish anything and see it
//! arrive. A version that is not a JSON object, or whose `greeting` is not a short string, is
//! refused with an error saying why, and the last good settings stay in use.

use serde_json::{Map, Value};

/// The greeting used until settings are published.
pub const DEFAULT_GREETING: &str = "hello";

/// The longest accepted greeting, in bytes.
pub const MAX_GREETING: usize = 256;

/// The settings in use.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// config-svc's version number (0: the built-in defaults).
    pub version: u64,
    /// The greeting every answer carries.
    pub greeting: String,
    /// The whole document.
    pub document: Map<String, Value>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            version: 0,
            greeting: DEFAULT_GREETING.to_string(),
            document: Map::new(),
        }
    }
}

/// Why a settings version was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    /// Not JSON at all.
    #[error("settings version {version} is not valid JSON: {message}")]
    NotJson {
        /// The refused version.
        version: u64,
        /// The parser's message (with line and column).
        message: String,
    },
    /// JSON, but not an object.
    #[error("settings version {version} must be a JSON object, found {found}")]
    NotAnObject {
        /// The refused version.
        version: u64,
        /// What it is instead.
        found: &'static str,
    },
    /// `greeting` is not a string of at most [`MAX_GREETING`] bytes.
    #[error(
        "settings version {version}: \"greeting\" must be a string of at most {MAX_GREETING} bytes"
    )]
    BadGreeting {
        /// The refused version.
        version: u64,
    },
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Settings {
    /// Parses version `version` with `content`.
    pub fn parse(version: u64, content: &str) -> Result<Settings, SettingsError> {
        let value: Value = serde_json::from_str(content).map_err(|e| SettingsError::NotJson {
            version,
            message: e.to_string(),
        })?;
        let Value::Object(document) = value else {
            return Err(SettingsError::NotAnObject {
                version,
                found: kind(&value),
            });
        };
        let greeting = match document.get("greeting") {
            None => DEFAULT_GREETING.to_string(),
            Some(Value::String(g)) if g.len() <= MAX_GREETING => g.clone(),
            Some(_) => return Err(SettingsError::BadGreeting { version }),
        };
        Ok(Settings {
            version,
            greeting,
            document,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_with_a_greeting_is_taken_whole() {
        let s = Settings::parse(3, r#"{"greeting":"hi","color":"blue"}"#).expect("valid");
        assert_eq!(s.version, 3);
        assert_eq!(s.greeting, "hi");
        assert_eq!(s.document["color"], "blue");
    }

    #[test]
    fn a_missing_greeting_means_the_default() {
        let s = Settings::parse(1, "{}").expect("valid");
        assert_eq!(s.greeting, DEFAULT_GREETING);
    }

    #[test]
    fn bad_documents_are_refused_saying_why() {
        let e = Settings::parse(2, "{not json").expect_err("invalid");
        assert!(
            matches!(e, SettingsError::NotJson { version: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("line 1"), "{e}");
        assert_eq!(
            Settings::parse(4, "[1,2]"),
            Err(SettingsError::NotAnObject {
                version: 4,
                found: "an array"
            })
        );
        assert_eq!(
            Settings::parse(5, r#"{"greeting": 7}"#),
            Err(SettingsError::BadGreeting { version: 5 })
        );
        let long = format!(r#"{{"greeting":"{}"}}"#, "x".repeat(MAX_GREETING + 1));
        assert_eq!(
            Settings::parse(6, &long),
            Err(SettingsError::BadGreeting { version: 6 })
        );
    }
}
