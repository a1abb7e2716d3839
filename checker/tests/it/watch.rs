//! Watch streams, alone and against the writes.

use history_checker::{KeyRange, ViolationKind as K, WatchEvent, WatchRecord, check_watches};

use crate::support::{H, assert_flags, assert_kinds};

/// put k=a @2, put j=b @3, delete k @4, put k=c @5, and final reads.
fn writes() -> H {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "j", "b", (3, 4), 3);
    h.delete(1, "k", (5, 6), 4, 1);
    h.put(1, "k", "c", (7, 8), 5);
    h.get(2, "k", (9, 10), 5, Some(("c", 5, 1)));
    h.get(2, "j", (11, 12), 5, Some(("b", 3, 1)));
    h
}

/// Watches everything from revision 2, one revision per response.
fn all_keys() -> WatchRecord {
    let mut w = WatchRecord::new(0, KeyRange::prefix(""), 2);
    w.push_response(vec![WatchEvent::put(2, "k", "a")]);
    w.push_response(vec![WatchEvent::put(3, "j", "b")]);
    w.push_response(vec![WatchEvent::delete(4, "k")]);
    w.push_response(vec![WatchEvent::put(5, "k", "c")]);
    w.complete_through = Some(5);
    w
}

/// Watches k from revision 3.
fn key_k() -> WatchRecord {
    let mut w = WatchRecord::new(1, KeyRange::key("k"), 3);
    w.push_response(vec![
        WatchEvent::delete(4, "k"),
        WatchEvent::put(5, "k", "c"),
    ]);
    w.complete_through = Some(5);
    w
}

#[test]
fn watchers_that_saw_every_write_pass() {
    assert_kinds(&writes().check_with(&[all_keys(), key_k()]), &[]);
    assert_kinds(&check_watches(&[all_keys(), key_k()]), &[]);
}

#[test]
fn duplicated_watch_event_is_flagged() {
    let mut w = all_keys();
    w.responses[3].push(WatchEvent::put(3, "j", "b"));
    let report = writes().check_with(&[w.clone(), key_k()]);
    assert_kinds(&report, &[K::WatchDuplicateEvent]);
    assert_kinds(&check_watches(&[w]), &[K::WatchDuplicateEvent]);
}

#[test]
fn missing_watch_event_is_flagged() {
    let mut w = all_keys();
    w.responses.remove(2); // delete k @4
    let report = writes().check_with(&[w, key_k()]);
    assert_kinds(&report, &[K::WatchMissingEvent, K::WatchersDisagree]);
    let missing = report
        .violations
        .iter()
        .find(|v| v.kind == K::WatchMissingEvent)
        .map(|v| (v.revision, v.ops.clone()));
    assert_eq!(missing, Some((Some(4), vec![history_checker::OpId(2)])));
}

#[test]
fn missing_event_at_the_end_shows_only_with_a_known_completion() {
    let mut w = all_keys();
    w.responses.pop(); // put k=c @5
    w.complete_through = None;
    // Without knowing how far the watcher got, stopping early is not a gap...
    assert_kinds(&writes().check_with(&[w.clone()]), &[]);
    // ...but it is once it is known to have covered revision 5.
    w.complete_through = Some(5);
    assert_kinds(&writes().check_with(&[w]), &[K::WatchMissingEvent]);
}

#[test]
fn watch_events_out_of_order_are_flagged() {
    let mut w = all_keys();
    w.responses.swap(1, 2);
    assert_kinds(&writes().check_with(&[w.clone()]), &[K::WatchOutOfOrder]);
    assert_kinds(&check_watches(&[w]), &[K::WatchOutOfOrder]);
}

#[test]
fn events_of_one_revision_split_across_responses_are_flagged() {
    // A transaction writing two keys at revision 7 must arrive in one response.
    let mut w = WatchRecord::new(0, KeyRange::prefix("t/"), 7);
    w.push_response(vec![WatchEvent::put(7, "t/a", "1")]);
    w.push_response(vec![WatchEvent::put(7, "t/b", "1")]);
    assert_kinds(&check_watches(&[w]), &[K::WatchRevisionSplit]);
}

#[test]
fn watchers_of_one_range_that_disagree_are_flagged() {
    let mut a = WatchRecord::new(0, KeyRange::prefix("k"), 2);
    a.push_response(vec![WatchEvent::put(3, "k1", "x")]);
    a.push_response(vec![WatchEvent::put(4, "k2", "y")]);
    let mut b = WatchRecord::new(1, KeyRange::prefix("k"), 3);
    b.push_response(vec![WatchEvent::put(3, "k1", "other")]);
    b.push_response(vec![WatchEvent::put(4, "k2", "y")]);
    let report = check_watches(&[a, b]);
    assert_kinds(&report, &[K::WatchersDisagree]);
    assert_eq!(report.violations[0].revision, Some(3));
}

#[test]
fn watchers_with_different_starts_agree_on_what_both_cover() {
    let mut a = WatchRecord::new(0, KeyRange::prefix("k"), 2);
    a.push_response(vec![WatchEvent::put(2, "k1", "x")]);
    a.push_response(vec![WatchEvent::put(4, "k2", "y")]);
    let mut b = WatchRecord::new(1, KeyRange::key("k2"), 3);
    b.push_response(vec![WatchEvent::put(4, "k2", "y")]);
    assert_kinds(&check_watches(&[a, b]), &[]);
}

#[test]
fn watch_event_with_a_wrong_value_is_flagged() {
    let mut w = all_keys();
    w.responses[0] = vec![WatchEvent::put(2, "k", "not-a")];
    assert_flags(&writes().check_with(&[w]), K::WatchEventMismatch);
}

#[test]
fn watch_event_of_a_never_written_value_is_flagged() {
    let mut w = all_keys();
    w.push_response(vec![WatchEvent::put(6, "k", "ghost")]);
    w.complete_through = Some(6);
    assert_kinds(&writes().check_with(&[w]), &[K::UnexplainedValue]);
}

#[test]
fn watch_event_outside_the_range_or_before_the_start_is_flagged() {
    let mut w = key_k();
    w.responses.insert(0, vec![WatchEvent::put(3, "j", "b")]);
    assert_kinds(&writes().check_with(&[w]), &[K::WatchEventOutOfRange]);
    let mut w = key_k();
    w.responses.insert(0, vec![WatchEvent::put(2, "k", "a")]);
    assert_kinds(&writes().check_with(&[w]), &[K::WatchEventBeforeStart]);
}

#[test]
fn watch_event_shows_an_unknown_write_applied_and_others_must_deliver_it() {
    let mut h = writes();
    h.put_unknown(3, "k", "u", 13);
    let mut a = all_keys();
    a.push_response(vec![WatchEvent::put(6, "k", "u")]);
    a.complete_through = Some(6);
    let report = h.check_with(std::slice::from_ref(&a));
    assert_kinds(&report, &[]);
    assert_eq!(report.unknown_applied, 1);
    // A watcher of k known to have covered revision 6 without delivering it has a gap.
    let mut b = key_k();
    b.complete_through = Some(6);
    assert_kinds(
        &h.check_with(&[a, b]),
        &[K::WatchMissingEvent, K::WatchersDisagree],
    );
}
