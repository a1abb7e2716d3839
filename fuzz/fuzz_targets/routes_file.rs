//! lb-gateway's routes file (TOML, crate `lb-core`) and the pure functions a route applies to a
//! request.
//!
//! Input: UTF-8 text, read as a routes file; then, for every route it accepts, the same bytes
//! split into a host and a path to match, hash and rewrite. Properties checked:
//! - parsing never panics; a file it accepts has unique route names;
//! - a route's hash key spec prints to a string that parses back to the same spec;
//! - matching and rewriting never panic on any host or path (they come from clients), and a
//!   rewrite of a path its prefix matches starts with the replacement.

#![no_main]

use lb_core::routes::{self, HashOn, RequestView};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A request to try the routes on: the text's last line, as `host path`.
    let last = text.lines().last().unwrap_or("");
    let (host, path) = last.split_once(' ').unwrap_or((last, "/"));
    for grpc in [false, true] {
        let view = RequestView {
            host: Some(host),
            path,
            grpc,
        };
        let file = match routes::parse(text) {
            Ok(f) => f,
            Err(_) => return,
        };
        let mut names: Vec<&str> = file.routes.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "two routes share a name");
        for r in &file.routes {
            let spec = r.hash.as_string();
            assert_eq!(
                HashOn::parse(&spec).as_ref(),
                Ok(&r.hash),
                "hash spec {spec:?} does not read back"
            );
            let _ = r.matcher.matches(&view);
            if let Some(prefix) = &r.matcher.path_prefix {
                if routes::prefix_matches(prefix, path) {
                    if let Some(with) = &r.rewrite_prefix {
                        let out = routes::rewrite(path, prefix, with);
                        assert!(
                            out.starts_with(with.as_str()),
                            "rewrite lost its replacement"
                        );
                    }
                }
            }
        }
    }
    // The pure helpers on their own, with the text's pieces as prefix and replacement.
    let mut parts = text.splitn(3, '\n');
    let (a, b, c) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    if routes::prefix_matches(a, b) {
        let out = routes::rewrite(b, a, c);
        assert!(out.starts_with(c), "rewrite({b:?}, {a:?}, {c:?}) = {out:?}");
    }
    let _ = HashOn::parse(a);
});
