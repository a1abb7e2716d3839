//! The revision replay check.

use history_checker::{
    ClientId, History, OpId, Options, Outcome, Recorder, Request, Response, ViolationKind as K,
    check, check_history,
};

use crate::support::{H, assert_flags, assert_kinds};

#[test]
fn sequential_history_with_every_operation_type_passes() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.get(1, "k", (3, 4), 2, Some(("a", 2, 1)));
    h.put(2, "k", "b", (5, 6), 3);
    h.get(2, "k", (7, 8), 3, Some(("b", 3, 2)));
    h.cas(1, "k", 3, "c", (9, 10), 4, true);
    h.cas(2, "k", 3, "d", (11, 12), 4, false);
    h.delete(1, "k", (13, 14), 5, 1);
    h.delete(2, "k", (15, 16), 5, 0);
    h.get(2, "k", (17, 18), 5, None);
    h.cas(1, "k", 0, "e", (19, 20), 6, true);
    h.put_failed(2, "k", "never", (21, 22));
    h.get(3, "k", (23, 24), 6, Some(("e", 6, 1)));
    assert_kinds(&h.check(), &[]);
}

#[test]
fn concurrent_history_with_overlapping_reads_and_writes_passes() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    // b is being written from 3 to 10; reads during it may see a or b.
    h.put(2, "k", "b", (3, 10), 3);
    h.get(3, "k", (4, 5), 2, Some(("a", 2, 1)));
    h.get(4, "k", (6, 7), 3, Some(("b", 3, 2)));
    h.get(3, "k", (8, 9), 3, Some(("b", 3, 2)));
    // Two concurrent compare-and-sets on the same revision: one wins.
    h.cas(1, "k", 3, "c", (11, 12), 4, true);
    h.cas(2, "k", 3, "d", (11, 13), 4, false);
    // A write to another key concurrent with all of it; revision 6 was someone else's key.
    h.put(4, "j", "x", (8, 14), 5);
    h.get(5, "k", (20, 21), 6, Some(("c", 4, 3)));
    h.get(5, "j", (22, 23), 6, Some(("x", 5, 1)));
    assert_kinds(&h.check(), &[]);
}

#[test]
fn unknown_write_seen_applied_passes_and_is_placed() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put_unknown(2, "k", "b", 3);
    h.get(3, "k", (5, 6), 3, Some(("b", 3, 2)));
    h.get(3, "k", (7, 8), 3, Some(("b", 3, 2)));
    let report = h.check();
    assert_kinds(&report, &[]);
    assert_eq!((report.unknown_applied, report.unknown_unseen), (1, 0));
}

#[test]
fn unknown_write_applied_after_the_client_gave_up_passes() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put_unknown(2, "k", "late", 3);
    // Other writes go first; the timed-out put lands only after them.
    h.put(1, "k", "b", (5, 6), 3);
    h.get(3, "k", (7, 8), 3, Some(("b", 3, 2)));
    h.get(3, "k", (9, 10), 4, Some(("late", 4, 3)));
    let report = h.check();
    assert_kinds(&report, &[]);
    assert_eq!(report.unknown_applied, 1);
}

#[test]
fn unknown_write_never_applied_passes() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put_unknown(2, "k", "b", 3);
    h.get(3, "k", (5, 6), 2, Some(("a", 2, 1)));
    h.put(1, "k", "c", (7, 8), 3);
    h.get(3, "k", (9, 10), 3, Some(("c", 3, 2)));
    let report = h.check();
    assert_kinds(&report, &[]);
    assert_eq!((report.unknown_applied, report.unknown_unseen), (0, 1));
}

#[test]
fn unseen_unknown_delete_explains_a_key_found_absent() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.delete_unknown(2, "k", 3);
    h.get(3, "k", (5, 6), 3, None);
    h.get(3, "k", (7, 8), 3, None);
    assert_kinds(&h.check(), &[]);
}

#[test]
fn key_found_absent_without_any_delete_is_a_stale_read() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.get(3, "k", (3, 4), 2, None);
    h.get(3, "k", (5, 6), 2, Some(("a", 2, 1)));
    assert_kinds(&h.check(), &[K::StaleRead]);
}

#[test]
fn stale_read_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "k", "b", (3, 4), 3);
    // At revision 3 the key is b, but the read shows a.
    let stale = h.get(2, "k", (5, 6), 3, Some(("a", 2, 1)));
    h.get(3, "k", (7, 8), 3, Some(("b", 3, 2)));
    let report = h.check();
    assert_kinds(&report, &[K::StaleRead]);
    assert_eq!(report.violations[0].ops, vec![OpId(1), stale]);
    assert_eq!(report.violations[0].revision, Some(3));
}

#[test]
fn lost_acknowledged_write_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    let acked = h.put(1, "k", "b", (3, 4), 3);
    // The store forgot b: the final read still shows a.
    let last = h.get(2, "k", (5, 6), 3, Some(("a", 2, 1)));
    let report = h.check();
    assert_flags(&report, K::LostWrite);
    let lost = report
        .violations
        .iter()
        .find(|v| v.kind == K::LostWrite)
        .map(|v| v.ops.clone());
    assert_eq!(lost, Some(vec![acked, last]));
}

#[test]
fn lost_write_behind_a_revision_that_went_back_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "k", "b", (3, 4), 3);
    // A restarted node lost revision 3 entirely.
    h.get(2, "k", (5, 6), 2, Some(("a", 2, 1)));
    let report = h.check();
    assert_kinds(&report, &[K::LostWrite, K::RealTimeOrder]);
}

#[test]
fn revision_going_back_for_a_client_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "k", "b", (3, 4), 3);
    // The same client then reads from a member that is behind.
    h.get(1, "k", (5, 6), 2, Some(("a", 2, 1)));
    h.get(2, "k", (7, 8), 3, Some(("b", 3, 2)));
    assert_kinds(&h.check(), &[K::RevisionWentBack]);
}

#[test]
fn two_acknowledged_writes_at_one_revision_are_flagged() {
    let mut h = H::new();
    let a = h.put(1, "k", "a", (1, 4), 2);
    let b = h.put(2, "j", "b", (2, 3), 2);
    h.get(3, "k", (5, 6), 2, Some(("a", 2, 1)));
    h.get(3, "j", (7, 8), 2, Some(("b", 2, 1)));
    let report = h.check();
    assert_kinds(&report, &[K::DuplicateRevision]);
    assert_eq!(report.violations[0].ops, vec![a, b]);
}

#[test]
fn read_of_a_never_written_value_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.get(2, "k", (3, 4), 2, Some(("zzz", 2, 1)));
    h.get(2, "k", (5, 6), 3, Some(("ghost", 3, 2)));
    h.get(2, "k", (7, 8), 3, Some(("a", 2, 1)));
    let report = h.check();
    assert_kinds(&report, &[K::UnexplainedValue]);
    assert_eq!(report.violations.len(), 2);
}

#[test]
fn value_read_at_the_wrong_mod_revision_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "j", "b", (3, 4), 3);
    h.get(2, "k", (5, 6), 3, Some(("a", 3, 1)));
    h.get(2, "k", (7, 8), 3, Some(("a", 2, 1)));
    h.get(2, "j", (9, 10), 3, Some(("b", 3, 1)));
    assert_kinds(&h.check(), &[K::ReadMismatch]);
}

#[test]
fn real_time_order_violation_between_clients_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "k", "b", (3, 4), 3);
    // Sent after revision 3 was returned to client 1, yet reflects revision 2.
    h.get(2, "k", (5, 6), 2, Some(("a", 2, 1)));
    h.get(3, "k", (7, 8), 3, Some(("b", 3, 2)));
    let report = h.check();
    assert_kinds(&report, &[K::RealTimeOrder]);
    assert_eq!(report.violations[0].ops, vec![OpId(1), OpId(2)]);
}

#[test]
fn write_not_above_a_revision_read_before_it_is_flagged() {
    let mut h = H::new();
    h.get(1, "k", (1, 2), 3, None);
    h.put(2, "k", "a", (3, 4), 3);
    h.get(1, "k", (5, 6), 3, Some(("a", 3, 1)));
    assert_flags(&h.check(), K::RealTimeOrder);
}

#[test]
fn unknown_write_seen_at_two_revisions_is_flagged() {
    let mut h = H::new();
    let u = h.put_unknown(1, "k", "a", 1);
    h.get(2, "k", (2, 3), 2, Some(("a", 2, 1)));
    h.put(2, "j", "x", (4, 5), 3);
    h.get(2, "k", (6, 7), 4, Some(("a", 4, 2)));
    h.get(2, "j", (8, 9), 4, Some(("x", 3, 1)));
    let report = h.check();
    assert_flags(&report, K::UnknownWriteAppliedTwice);
    assert!(report.violations[0].ops.contains(&u));
}

#[test]
fn unknown_write_seen_before_it_was_sent_is_flagged() {
    let mut h = H::new();
    h.put(1, "j", "x", (1, 2), 3);
    // Sent after revision 3 was returned, yet seen at revision 2.
    h.put_unknown(2, "k", "a", 3);
    h.get(3, "k", (4, 5), 3, Some(("a", 2, 1)));
    h.get(3, "j", (6, 7), 3, Some(("x", 3, 1)));
    assert_kinds(&h.check(), &[K::RealTimeOrder]);
}

#[test]
fn wrong_version_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "k", "b", (3, 4), 3);
    h.get(2, "k", (5, 6), 3, Some(("b", 3, 1)));
    assert_kinds(&h.check(), &[K::ReadMismatch]);
}

#[test]
fn compare_and_set_succeeding_on_a_stale_revision_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "k", "b", (3, 4), 3);
    h.cas(2, "k", 2, "c", (5, 6), 4, true);
    h.get(3, "k", (7, 8), 4, Some(("c", 4, 3)));
    assert_kinds(&h.check(), &[K::ReadMismatch]);
}

#[test]
fn compare_and_set_failing_although_the_compare_held_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.cas(2, "k", 2, "c", (3, 4), 2, false);
    h.get(3, "k", (5, 6), 2, Some(("a", 2, 1)));
    assert_kinds(&h.check(), &[K::ReadMismatch]);
}

#[test]
fn delete_reporting_a_deletion_of_an_absent_key_is_flagged() {
    let mut h = H::new();
    h.delete(1, "k", (1, 2), 2, 1);
    h.get(3, "k", (3, 4), 2, None);
    assert_kinds(&h.check(), &[K::ReadMismatch]);
}

#[test]
fn delete_finding_nothing_after_an_acknowledged_put_is_flagged() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.delete(2, "k", (3, 4), 2, 0);
    h.get(3, "k", (5, 6), 2, Some(("a", 2, 1)));
    assert_kinds(&h.check(), &[K::StaleRead]);
}

#[test]
fn missing_final_read_is_flagged_unless_not_required() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.get(2, "k", (1, 3), 2, Some(("a", 2, 1)));
    assert_kinds(&h.check(), &[K::MissingFinalRead]);
    let lenient = Options {
        require_final_reads: false,
    };
    assert_kinds(&check_history(&h.h, &lenient), &[]);
}

#[test]
fn malformed_responses_are_flagged() {
    let mut h = H::new();
    h.get(1, "k", (1, 2), 2, Some(("a", 3, 1)));
    h.get(1, "k", (3, 4), 2, Some(("a", 2, 0)));
    h.delete(1, "k", (5, 6), 2, 2);
    h.h.record(
        1,
        Request::put("k", "v"),
        7,
        8,
        Outcome::Ok(Response::absent(2)),
    );
    h.h.record(
        1,
        Request::get("k"),
        10,
        9,
        Outcome::Ok(Response::absent(2)),
    );
    let report = h.check();
    assert_kinds(&report, &[K::Malformed]);
    assert_eq!(report.violations.len(), 5);
}

#[test]
fn history_recorded_from_threads_passes() {
    use std::sync::Arc;
    use std::sync::Mutex;

    // A toy linearizable store behind a lock, hit by four threads through the recorder.
    struct Store {
        revision: i64,
        kv: Option<(Vec<u8>, i64, i64)>,
    }
    let store = Arc::new(Mutex::new(Store {
        revision: 1,
        kv: None,
    }));
    let rec = Arc::new(Recorder::new());
    let threads: Vec<_> = (0..4u64)
        .map(|c| {
            let (store, rec) = (store.clone(), rec.clone());
            std::thread::spawn(move || {
                for i in 0..50 {
                    let value = format!("c{c}-{i}").into_bytes();
                    let req = if i % 2 == 0 {
                        Request::put("k", value.clone())
                    } else {
                        Request::get("k")
                    };
                    let id = rec.invoke(ClientId(c), req.clone());
                    let resp = {
                        let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
                        if req.is_write() {
                            s.revision += 1;
                            let version = s.kv.as_ref().map_or(1, |kv| kv.2 + 1);
                            s.kv = Some((value, s.revision, version));
                            Response::Put {
                                revision: s.revision,
                            }
                        } else {
                            match &s.kv {
                                Some((v, m, ver)) => {
                                    Response::found(s.revision, v.clone(), *m, *ver)
                                }
                                None => Response::absent(s.revision),
                            }
                        }
                    };
                    rec.complete(id, Outcome::Ok(resp));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let id = rec.invoke(ClientId(9), Request::get("k"));
    let resp = {
        let s = store.lock().unwrap_or_else(|e| e.into_inner());
        let (v, m, ver) = s.kv.clone().expect("written");
        Response::found(s.revision, v, m, ver)
    };
    rec.complete(id, Outcome::Ok(resp));
    let history: History = Arc::try_unwrap(rec).expect("threads done").into_history();
    assert_eq!(history.len(), 201);
    check(&history, &[], &Options::default()).assert_ok();
}
