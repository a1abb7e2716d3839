//! Printing: aligned tables for people, JSON for scripts, and the small formatting helpers
//! (times, sizes) both use.

use std::fmt::Write as _;
use std::io::Write as _;

use serde_json::Value;

use crate::cli::Output;

/// Rows under a header, printed with every column padded to its widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (cells beyond the header are dropped, missing ones are blank).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// True without rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().take(n).enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String], f: &mut std::fmt::Formatter<'_>| {
            let mut out = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == n {
                    out.push_str(cell);
                } else {
                    let _ = write!(out, "{cell:<width$}  ");
                }
            }
            writeln!(f, "{}", out.trim_end())
        };
        line(&self.header, f)?;
        for row in &self.rows {
            line(row, f)?;
        }
        Ok(())
    }
}

/// Prints `json` (pretty) in JSON mode, or what `table` renders otherwise.
pub fn emit(output: Output, json: &Value, table: impl FnOnce() -> String) {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(json).unwrap_or_else(|_| json.to_string()),
        Output::Table => table(),
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    if !text.ends_with('\n') {
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
}

/// Prints one line of a stream: compact JSON in JSON mode, `line` otherwise; flushed at once
/// so a reader (or a test) sees it without waiting.
pub fn stream_line(output: Output, json: &Value, line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = match output {
        Output::Json => writeln!(out, "{json}"),
        Output::Table => writeln!(out, "{line}"),
    };
    let _ = out.flush();
}

/// Milliseconds since the Unix epoch as `2026-01-02T03:04:05Z` (UTC); "-" for 0.
pub fn time_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    service_kit::time::utc_seconds(ms)
}

/// A byte count for people: `512 B`, `1.5 KiB`, `3.2 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The first 12 hex digits of a `sha256:...` checksum, for tables.
pub fn short_checksum(c: &str) -> String {
    let hex = c.strip_prefix("sha256:").unwrap_or(c);
    hex.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_times_are_a_dash() {
        assert_eq!(time_ms(0), "-");
        assert_eq!(time_ms(1_000), "1970-01-01T00:00:01Z");
    }

    #[test]
    fn tables_pad_every_column_but_the_last() {
        let mut t = Table::new(&["A", "LONGER", "C"]);
        t.row(vec!["xyz".into(), "1".into(), "tail".into()]);
        assert_eq!(t.to_string(), "A    LONGER  C\nxyz  1       tail\n");
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
