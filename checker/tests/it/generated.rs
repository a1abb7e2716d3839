//! Property tests on generated histories: valid ones pass every check, and one injected bug of
//! each kind is flagged.

use std::time::Instant;

use history_checker::generate::{GenConfig, Generated, Rng, generate};
use history_checker::linearizability::{self, LinOptions};
use history_checker::{
    History, KeyValue, OpId, Options, Outcome, Request, Response, ViolationKind as K, check,
};

const SEEDS: u64 = 300;

fn small() -> GenConfig {
    GenConfig::default()
}

fn no_watchers() -> GenConfig {
    GenConfig {
        clients: 5,
        keys: 2,
        ops_per_client: 20,
        watchers: 0,
        unknown_percent: 15,
        failed_percent: 5,
    }
}

#[track_caller]
fn assert_valid(seed: u64, g: &Generated) {
    let report = check(&g.history, &g.watches, &Options::default());
    assert!(report.is_ok(), "seed {seed}: {report}");
}

#[test]
fn random_valid_histories_pass_the_replay_and_watch_checks() {
    let (mut applied, mut unseen) = (0, 0);
    for seed in 0..SEEDS {
        for config in [small(), no_watchers()] {
            let g = generate(seed, &config);
            assert_valid(seed, &g);
            let r = check(&g.history, &g.watches, &Options::default());
            applied += r.unknown_applied;
            unseen += r.unknown_unseen;
        }
    }
    // The generator must exercise unknown outcomes both ways.
    println!("unknown writes: {applied} seen applied, {unseen} unseen");
    assert!(
        applied > 50 && unseen > 50,
        "{applied} applied, {unseen} unseen"
    );
}

#[test]
fn random_valid_histories_are_linearizable_per_key() {
    for seed in 0..SEEDS {
        let g = generate(seed, &no_watchers());
        let report = linearizability::check_history(&g.history, &LinOptions::default());
        if !report.is_ok() {
            report.assert_ok();
        }
    }
}

#[test]
fn generator_is_deterministic_per_seed() {
    assert_eq!(generate(7, &small()), generate(7, &small()));
    assert_ne!(generate(7, &small()).history, generate(8, &small()).history);
}

/// Successful gets, with their response.
fn gets(h: &History) -> Vec<(OpId, Response)> {
    h.ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o.request, Request::Get { .. }))
        .filter_map(|(i, o)| match &o.outcome {
            Outcome::Ok(r) => Some((OpId(i), r.clone())),
            _ => None,
        })
        .collect()
}

/// Acknowledged puts of `key` that an acknowledged write at or below revision `upto` followed
/// in real time (sent after the put returned): (revision, value).
fn overwritten_puts(h: &History, key: &[u8], upto: i64) -> Vec<(i64, Vec<u8>)> {
    let later_write_sent = h
        .ops
        .iter()
        .filter(|o| o.request.key().as_slice() == key)
        .filter_map(|o| match &o.outcome {
            Outcome::Ok(r) if r.is_mutation() && r.revision() <= upto => Some(o.invoke),
            _ => None,
        })
        .max();
    let Some(later_write_sent) = later_write_sent else {
        return Vec::new();
    };
    h.ops
        .iter()
        .filter(|o| o.complete < later_write_sent)
        .filter_map(|o| match (&o.request, &o.outcome) {
            (Request::Put { key: k, value }, Outcome::Ok(Response::Put { revision }))
                if k.as_slice() == key =>
            {
                Some((*revision, value.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Makes a get show the value of an acknowledged put that another acknowledged write, sent
/// after it returned and at or below the get's revision, overwrote: returns false if the history has no such get. With `final_only`, only the final
/// reads (the generator's last operations, one per key) are candidates.
fn inject_stale_read(h: &mut History, rng: &mut Rng, final_only: bool, keys: usize) -> bool {
    let mut candidates = Vec::new();
    let n = h.len();
    for (id, resp) in gets(h) {
        if final_only && id.0 + keys < n {
            continue;
        }
        let revision = resp.revision();
        let key = h.op(id).request.key().clone();
        for (rev, value) in overwritten_puts(h, &key, revision) {
            candidates.push((id, revision, rev, value));
        }
    }
    if candidates.is_empty() {
        return false;
    }
    let (id, revision, rev, value) =
        candidates[rng.below(candidates.len() as u64) as usize].clone();
    h.ops[id.0].outcome = Outcome::Ok(Response::Get {
        revision,
        kv: Some(KeyValue {
            value,
            mod_revision: rev,
            version: 1,
        }),
    });
    true
}

#[test]
fn injected_stale_read_is_flagged_in_random_histories() {
    let mut injected = 0;
    for seed in 0..SEEDS {
        let mut g = generate(seed, &no_watchers());
        let mut rng = Rng::new(seed ^ 0xdead);
        if !inject_stale_read(&mut g.history, &mut rng, false, no_watchers().keys) {
            continue;
        }
        injected += 1;
        let report = check(&g.history, &[], &Options::default());
        assert!(report.has(K::StaleRead), "seed {seed}: {report}");
    }
    assert!(injected > SEEDS / 2, "only {injected} injected");
}

#[test]
fn injected_lost_write_is_flagged_in_random_histories() {
    let mut injected = 0;
    for seed in 0..SEEDS {
        let mut g = generate(seed, &small());
        let mut rng = Rng::new(seed ^ 0xbeef);
        // The generator's last operations are the final reads, one per key.
        if !inject_stale_read(&mut g.history, &mut rng, true, small().keys) {
            continue;
        }
        injected += 1;
        let report = check(&g.history, &g.watches, &Options::default());
        assert!(report.has(K::LostWrite), "seed {seed}: {report}");
        let lin = linearizability::check_history(&g.history, &LinOptions::default());
        assert!(
            !lin.violations.is_empty(),
            "seed {seed}: linearizability missed it"
        );
    }
    assert!(injected > SEEDS / 2, "only {injected} injected");
}

#[test]
fn injected_revision_going_back_is_flagged_in_random_histories() {
    let mut injected = 0;
    for seed in 0..SEEDS {
        let mut g = generate(seed, &no_watchers());
        let h = &mut g.history;
        // A client's get that follows one of its operations at a higher revision than the
        // get's mod_revision: lower the get's revision below that operation's.
        let mut target = None;
        for (id, resp) in gets(h) {
            let op = h.op(id);
            let floor = match &resp {
                Response::Get { kv: Some(kv), .. } => kv.mod_revision,
                _ => 1,
            };
            let before = h.ops.iter().filter_map(|o| match &o.outcome {
                Outcome::Ok(r) if o.client == op.client && o.complete < op.invoke => {
                    Some(r.revision())
                }
                _ => None,
            });
            if let Some(max) = before.max()
                && max > floor
                && max > 1
            {
                target = Some((id, max - 1));
            }
        }
        let Some((id, rev)) = target else { continue };
        if let Outcome::Ok(Response::Get { revision, .. }) = &mut h.ops[id.0].outcome {
            *revision = rev;
        }
        injected += 1;
        let report = check(h, &[], &Options::default());
        assert!(report.has(K::RevisionWentBack), "seed {seed}: {report}");
    }
    assert!(injected > SEEDS / 2, "only {injected} injected");
}

/// Indexes (response, event) of watch events whose revision is an acknowledged write's.
fn acked_events(g: &Generated, w: usize) -> Vec<(usize, usize)> {
    let acked: std::collections::HashSet<i64> = g
        .history
        .ops
        .iter()
        .filter_map(|o| match &o.outcome {
            Outcome::Ok(r) if r.is_mutation() => Some(r.revision()),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (ri, resp) in g.watches[w].responses.iter().enumerate() {
        for (ei, e) in resp.iter().enumerate() {
            if acked.contains(&e.revision) {
                out.push((ri, ei));
            }
        }
    }
    out
}

#[test]
fn injected_missing_watch_event_is_flagged_in_random_histories() {
    let mut injected = 0;
    for seed in 0..SEEDS {
        let mut g = generate(seed, &small());
        let mut rng = Rng::new(seed);
        let w = rng.below(g.watches.len() as u64) as usize;
        let events = acked_events(&g, w);
        if events.is_empty() {
            continue;
        }
        let (ri, ei) = events[rng.below(events.len() as u64) as usize];
        g.watches[w].responses[ri].remove(ei);
        injected += 1;
        let report = check(&g.history, &g.watches, &Options::default());
        assert!(report.has(K::WatchMissingEvent), "seed {seed}: {report}");
    }
    assert!(injected > SEEDS / 2, "only {injected} injected");
}

#[test]
fn injected_duplicate_or_reordered_watch_event_is_flagged_in_random_histories() {
    let mut injected = 0;
    for seed in 0..SEEDS {
        let mut g = generate(seed, &small());
        let mut rng = Rng::new(seed);
        let w = &mut g.watches[rng.below(2) as usize];
        let events: Vec<_> = w.events().cloned().collect();
        if events.len() < 2 {
            continue;
        }
        injected += 1;
        let i = rng.below(events.len() as u64 - 1) as usize;
        let mut dup = w.clone();
        dup.push_response(vec![events[i].clone()]);
        let report = check(&g.history, &[dup.clone()], &Options::default());
        assert!(report.has(K::WatchDuplicateEvent), "seed {seed}: {report}");
        let mut swapped = w.clone();
        swapped.responses = events[..i]
            .iter()
            .chain([&events[i + 1], &events[i]])
            .chain(&events[i + 2..])
            .map(|e| vec![e.clone()])
            .collect();
        let report = check(&g.history, &[swapped], &Options::default());
        assert!(report.has(K::WatchOutOfOrder), "seed {seed}: {report}");
    }
    assert!(injected > SEEDS / 2, "only {injected} injected");
}

#[test]
fn replay_check_handles_100k_operations() {
    let config = GenConfig {
        clients: 8,
        keys: 64,
        ops_per_client: 12_500,
        watchers: 2,
        unknown_percent: 2,
        failed_percent: 1,
    };
    let started = Instant::now();
    let g = generate(42, &config);
    let generated = started.elapsed();
    let started = Instant::now();
    let report = check(&g.history, &g.watches, &Options::default());
    println!(
        "{} ops generated in {generated:?}, checked in {:?}",
        g.history.len(),
        started.elapsed()
    );
    assert!(g.history.len() >= 100_000);
    report.assert_ok();
}

/// Many more seeds and shapes than the suite runs, for when a checker changes:
/// `HISTORY_SEEDS=3000 cargo test -p history-checker --test it at_scale -- --ignored`.
#[test]
#[ignore]
fn random_valid_histories_pass_every_check_at_scale() {
    let seeds: u64 = std::env::var("HISTORY_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let configs = [
        GenConfig {
            clients: 3,
            keys: 1,
            ops_per_client: 30,
            watchers: 0,
            unknown_percent: 30,
            failed_percent: 10,
        },
        GenConfig {
            clients: 6,
            keys: 1,
            ops_per_client: 15,
            watchers: 3,
            unknown_percent: 20,
            failed_percent: 5,
        },
        GenConfig {
            clients: 2,
            keys: 2,
            ops_per_client: 40,
            watchers: 1,
            unknown_percent: 40,
            failed_percent: 0,
        },
    ];
    for seed in 0..seeds {
        for config in &configs {
            let g = generate(seed, config);
            assert_valid(seed, &g);
            let lin = linearizability::check_history(&g.history, &LinOptions::default());
            assert!(lin.is_ok(), "seed {seed} {config:?}: {:?}", lin.violations);
        }
    }
}
