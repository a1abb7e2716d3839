//! config-svc's content parsers and validation (crate `config-formats`): json, yaml, toml,
//! properties and text, with or without a JSON Schema.
//!
//! Input: one selector byte (low bits: the format; high bit: the rest is `schema NUL content`),
//! then UTF-8 text. Properties checked:
//! - parsing, validating and describing problems never panic, whatever the text or schema;
//! - the tree of any structured format is a JSON document that JSON reads back;
//! - every problem position lies inside the content, and for JSON content every schema
//!   violation's JSON pointer is found in the text (`locate_pointer`) inside its bounds.

#![no_main]

use config_formats::Format;
use config_formats::validate::{self, Schema};
use libfuzzer_sys::fuzz_target;

const FORMATS: [Format; 5] = [
    Format::Text,
    Format::Json,
    Format::Yaml,
    Format::Toml,
    Format::Properties,
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let format = FORMATS[usize::from(selector & 0x7f) % FORMATS.len()];
    let (schema_text, content) = match text.split_once('\0') {
        Some((s, c)) if selector & 0x80 != 0 => (Some(s), c),
        _ => (None, text),
    };
    let schema = schema_text.and_then(|s| Schema::compile(s).ok());

    let problems = validate::problems(format, content, schema.as_ref());
    let lines = content.matches('\n').count() + 1;
    for p in &problems {
        let _ = p.describe();
        assert!(
            (p.line as usize) <= lines + 1,
            "problem line {} beyond the content's {lines} lines: {p:?}",
            p.line
        );
        if format == Format::Json && !p.path.is_empty() {
            if let Some(off) = validate::locate_pointer(content, &p.path) {
                assert!(
                    off <= content.len(),
                    "pointer {} located past the end",
                    p.path
                );
            }
        }
    }
    assert_eq!(
        validate::validate(format, content, schema.as_ref()).is_ok(),
        problems.is_empty(),
        "validate and problems disagree"
    );

    if let Ok(Some(tree)) = validate::parse(format, content) {
        let json = serde_json::to_string(&tree).expect("a tree serializes");
        // serde_json refuses documents nested deeper than 128; a tree that deep is still fine.
        if let Err(e) = validate::parse(Format::Json, &json) {
            assert!(
                e.message.contains("recursion limit"),
                "the tree of {format:?} content is not JSON that JSON reads back: {e:?}"
            );
        }
    }

    let (line, column) = validate::line_column(content, usize::from(selector) * 31);
    assert!(line >= 1 && column >= 1);
});
