//! The formats an item's content can have.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The format of an item's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Any UTF-8 text.
    Text,
    /// JSON.
    Json,
    /// YAML (one document).
    Yaml,
    /// TOML.
    Toml,
    /// Java `.properties`.
    Properties,
}

impl Format {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
            Format::Yaml => "yaml",
            Format::Toml => "toml",
            Format::Properties => "properties",
        }
    }

    /// Whether content of this format is a tree of keys (diffed by key path, checked by schema).
    pub fn is_structured(self) -> bool {
        !matches!(self, Format::Text)
    }

    /// The HTTP content type of raw content.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Yaml => "application/yaml",
            Format::Toml => "application/toml",
            Format::Text | Format::Properties => "text/plain; charset=utf-8",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "txt" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            "yaml" | "yml" => Ok(Format::Yaml),
            "toml" => Ok(Format::Toml),
            "properties" => Ok(Format::Properties),
            other => Err(Error::invalid(format!(
                "format {other:?} is not one of json, yaml, toml, properties, text"
            ))),
        }
    }
}
