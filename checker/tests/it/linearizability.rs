//! The per-key linearizability search, without revisions.

use history_checker::linearizability::{
    self, Entry, LinOptions, Model, RegisterInput, RegisterModel, RegisterOutput, Verdict,
};
use history_checker::{OpId, ViolationKind};

use crate::support::H;

fn lin(h: &H) -> linearizability::LinReport {
    let report = linearizability::check_history(&h.h, &LinOptions::default());
    for v in &report.violations {
        println!("- {v}");
    }
    report
}

#[test]
fn concurrent_register_history_is_linearizable() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(2, "k", "b", (3, 10), 3);
    h.get(3, "k", (4, 5), 2, Some(("a", 2, 1)));
    h.get(4, "k", (6, 7), 3, Some(("b", 3, 2)));
    h.get(3, "k", (8, 9), 3, Some(("b", 3, 2)));
    h.cas(1, "k", 3, "c", (11, 12), 4, true);
    h.cas(2, "k", 3, "d", (11, 13), 4, false);
    h.delete(1, "k", (14, 15), 5, 1);
    h.delete(2, "k", (16, 17), 5, 0);
    h.get(5, "k", (20, 21), 5, None);
    lin(&h).assert_ok();
}

#[test]
fn stale_read_is_not_linearizable() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "k", "b", (3, 4), 3);
    let stale = h.get(2, "k", (5, 6), 3, Some(("a", 2, 1)));
    let report = lin(&h);
    assert_eq!(report.violations.len(), 1);
    assert_eq!(report.violations[0].kind, ViolationKind::NotLinearizable);
    assert!(report.violations[0].ops.contains(&stale));
}

#[test]
fn read_of_a_never_written_value_is_not_linearizable() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.get(2, "k", (1, 3), 2, Some(("zzz", 2, 1)));
    assert!(!lin(&h).is_ok());
}

#[test]
fn lost_write_is_not_linearizable() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "k", "b", (3, 4), 3);
    h.delete(2, "k", (5, 6), 4, 1);
    h.get(2, "k", (7, 8), 4, Some(("b", 3, 2)));
    assert!(!lin(&h).is_ok());
}

#[test]
fn unknown_write_may_or_may_not_have_been_applied() {
    let mut applied = H::new();
    applied.put(1, "k", "a", (1, 2), 2);
    applied.put_unknown(2, "k", "b", 3);
    applied.get(3, "k", (10, 11), 3, Some(("b", 3, 2)));
    lin(&applied).assert_ok();

    let mut not_applied = H::new();
    not_applied.put(1, "k", "a", (1, 2), 2);
    not_applied.put_unknown(2, "k", "b", 3);
    not_applied.get(3, "k", (10, 11), 2, Some(("a", 2, 1)));
    lin(&not_applied).assert_ok();

    // But not both: once b was read, a cannot come back.
    let mut both = not_applied;
    both.get(3, "k", (5, 6), 3, Some(("b", 3, 2)));
    assert!(!lin(&both).is_ok());
}

#[test]
fn compare_and_set_on_a_stale_revision_is_not_linearizable() {
    let mut h = H::new();
    h.put(1, "k", "a", (1, 2), 2);
    h.put(1, "k", "b", (3, 4), 3);
    h.cas(2, "k", 2, "c", (5, 6), 4, true);
    assert!(!lin(&h).is_ok());
}

#[test]
fn exhausted_step_budget_is_inconclusive_not_a_pass() {
    // 16 concurrent writes and a read of a value none of them wrote: no order fits, and
    // proving it means trying many subsets.
    let mut h = H::new();
    for i in 0..16 {
        h.put(i, "k", &format!("v{i}"), (1, 100), 2 + i as i64);
    }
    h.get(99, "k", (1, 100), 20, Some(("nobody", 20, 1)));
    let report = linearizability::check_history(
        &h.h,
        &LinOptions {
            max_steps_per_key: 1_000,
        },
    );
    assert_eq!(report.inconclusive, vec![b"k".to_vec()]);
    assert!(!report.is_ok());
    assert!(!lin(&h).is_ok());
}

#[test]
fn search_works_on_any_model() {
    // A counter: Add(n) returns nothing, Read returns the sum.
    struct Counter;
    impl Model for Counter {
        type State = i64;
        type Input = Option<i64>; // Some(n) = add n, None = read
        type Output = i64;
        fn init(&self) -> i64 {
            0
        }
        fn step(&self, s: &i64, input: &Option<i64>, out: Option<&i64>) -> Option<i64> {
            match (input, out) {
                (Some(n), _) => Some(s + n),
                (None, Some(v)) => (v == s).then_some(*s),
                (None, None) => Some(*s),
            }
        }
    }
    let e = |id, input, output, invoke, complete| Entry {
        id: OpId(id),
        input,
        output,
        invoke,
        complete,
    };
    let ok = [
        e(0, Some(1), Some(0), 1, 5),
        e(1, Some(2), Some(0), 2, 6),
        e(2, None, Some(2), 3, 4),
        e(3, None, Some(3), 7, 8),
    ];
    assert_eq!(
        linearizability::search(&Counter, &ok, 10_000),
        Verdict::Linearizable
    );
    let bad = [e(0, Some(1), Some(0), 1, 2), e(1, None, Some(0), 3, 4)];
    assert!(matches!(
        linearizability::search(&Counter, &bad, 10_000),
        Verdict::NotLinearizable { stuck: OpId(1), .. }
    ));
}

#[test]
fn register_model_checks_delete_counts() {
    let m = RegisterModel;
    let full = Some(b"v".to_vec());
    let del = RegisterInput::Delete;
    assert_eq!(
        m.step(&full, &del, Some(&RegisterOutput::Deleted(true))),
        Some(None)
    );
    assert_eq!(
        m.step(&full, &del, Some(&RegisterOutput::Deleted(false))),
        None
    );
    assert_eq!(
        m.step(&None, &del, Some(&RegisterOutput::Deleted(false))),
        Some(None)
    );
}
