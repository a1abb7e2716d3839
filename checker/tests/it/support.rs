//! Short hand for writing histories by hand: times are `(invoke, complete)` ticks.

use history_checker::{
    History, KeyValue, OpId, Options, Outcome, Report, Request, Response, Revision, Time,
    ViolationKind, WatchRecord, check,
};

#[derive(Default)]
pub struct H {
    pub h: History,
}

impl H {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, c: u64, key: &str, value: &str, t: (Time, Time), rev: Revision) -> OpId {
        let resp = Response::Put { revision: rev };
        self.h
            .record(c, Request::put(key, value), t.0, t.1, Outcome::Ok(resp))
    }

    pub fn put_unknown(&mut self, c: u64, key: &str, value: &str, invoke: Time) -> OpId {
        self.h.record(
            c,
            Request::put(key, value),
            invoke,
            invoke + 1,
            Outcome::Unknown,
        )
    }

    pub fn put_failed(&mut self, c: u64, key: &str, value: &str, t: (Time, Time)) -> OpId {
        self.h
            .record(c, Request::put(key, value), t.0, t.1, Outcome::Failed)
    }

    /// `found`: `(value, mod_revision, version)`.
    pub fn get(
        &mut self,
        c: u64,
        key: &str,
        t: (Time, Time),
        rev: Revision,
        found: Option<(&str, Revision, i64)>,
    ) -> OpId {
        let kv = found.map(|(v, m, ver)| KeyValue {
            value: v.as_bytes().to_vec(),
            mod_revision: m,
            version: ver,
        });
        self.h.record(
            c,
            Request::get(key),
            t.0,
            t.1,
            Outcome::Ok(Response::Get { revision: rev, kv }),
        )
    }

    pub fn delete(
        &mut self,
        c: u64,
        key: &str,
        t: (Time, Time),
        rev: Revision,
        deleted: i64,
    ) -> OpId {
        self.h.record(
            c,
            Request::delete(key),
            t.0,
            t.1,
            Outcome::Ok(Response::Delete {
                revision: rev,
                deleted,
            }),
        )
    }

    pub fn delete_unknown(&mut self, c: u64, key: &str, invoke: Time) -> OpId {
        self.h.record(
            c,
            Request::delete(key),
            invoke,
            invoke + 1,
            Outcome::Unknown,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn cas(
        &mut self,
        c: u64,
        key: &str,
        expected: Revision,
        value: &str,
        t: (Time, Time),
        rev: Revision,
        succeeded: bool,
    ) -> OpId {
        self.h.record(
            c,
            Request::cas(key, expected, value),
            t.0,
            t.1,
            Outcome::Ok(Response::Cas {
                revision: rev,
                succeeded,
            }),
        )
    }

    pub fn check(&self) -> Report {
        check(&self.h, &[], &Options::default())
    }

    pub fn check_with(&self, watches: &[WatchRecord]) -> Report {
        check(&self.h, watches, &Options::default())
    }
}

/// Asserts that exactly these kinds were found, and prints the report either way.
#[track_caller]
pub fn assert_kinds(report: &Report, kinds: &[ViolationKind]) {
    println!("{report}");
    let mut want = kinds.to_vec();
    want.sort();
    want.dedup();
    assert_eq!(report.kinds(), want, "{report}");
}

/// Asserts that `kind` was found (other kinds may follow from the same bug).
#[track_caller]
pub fn assert_flags(report: &Report, kind: ViolationKind) {
    println!("{report}");
    assert!(report.has(kind), "expected {kind}, got:\n{report}");
}
