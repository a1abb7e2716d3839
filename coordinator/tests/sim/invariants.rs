//! Raft's safety properties, checked from what each member showed of itself (its metrics, its
//! log, its durable votes, its state machine), across members and restarts.
//!
//! Every check is a plain function over observations, so the tests at the bottom feed each one
//! a corrupted observation and require that it is flagged.
//!
//! # Leader ids, not terms
//! openraft 0.9 (without its `single-term-leader` feature, as we build it) identifies a leader by
//! the pair (term, node id), ordered by term then node id, and a log entry by (that pair,
//! index). A voter may grant (t, 3) and then (t, 4): the pair plays the role of Raft's term, so
//! two leaders in one *term* are part of the protocol. The figure-3 properties are checked in
//! that form: one leader per leader id, votes that never go back in openraft's order, log
//! matching on (leader id, index), and leader completeness against lower leader ids.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use coordinator::raft::TypeConfig;
use openraft::{Entry, Vote};

/// One log entry as the checks compare it: its log id and a digest of its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryId {
    /// Term of the leader that wrote it.
    pub term: u64,
    /// That leader's id.
    pub leader: u64,
    /// Digest of the payload (bincode).
    pub digest: u64,
}

impl EntryId {
    /// The id of an openraft entry.
    pub fn of(e: &Entry<TypeConfig>) -> EntryId {
        let mut h = DefaultHasher::new();
        bincode::serialize(&e.payload)
            .unwrap_or_default()
            .hash(&mut h);
        EntryId {
            term: e.log_id.leader_id.term,
            leader: e.log_id.leader_id.node_id,
            digest: h.finish(),
        }
    }
}

/// A log as the checks see it: Raft index → entry.
pub type Log = BTreeMap<u64, EntryId>;

/// A log from openraft entries.
pub fn log_of(entries: &[Entry<TypeConfig>]) -> Log {
    entries
        .iter()
        .map(|e| (e.log_id.index, EntryId::of(e)))
        .collect()
}

/// A leader id: (term, node id), in openraft's order.
pub type LeaderId = (u64, u64);

/// What the monitors recorded while the simulation ran, and what it broke.
#[derive(Default)]
pub struct Observations {
    /// Leader id → every member that showed itself leader with it.
    pub leaders: BTreeMap<LeaderId, BTreeSet<u64>>,
    /// Member → the last term it showed (across restarts).
    pub terms: BTreeMap<u64, u64>,
    /// Index → the entry some member applied there (applied means committed).
    pub committed: BTreeMap<u64, (EntryId, u64)>,
    /// Violations found so far.
    pub violations: Vec<String>,
}

impl Observations {
    /// Election safety: at most one leader per leader id, and it is the member the id names,
    /// holding a committed (quorum-granted) vote.
    pub fn note_leader(&mut self, leader: LeaderId, committed: bool, member: u64) {
        let set = self.leaders.entry(leader).or_default();
        set.insert(member);
        if set.len() > 1 || leader.1 != member || !committed {
            self.violations.push(format!(
                "election safety: members {set:?} led with leader id {leader:?} \
                 (vote committed: {committed})"
            ));
        }
    }

    /// A member's term never goes back, not even across a restart (the vote is durable).
    pub fn note_term(&mut self, member: u64, term: u64) {
        let last = self.terms.entry(member).or_insert(0);
        if term < *last {
            self.violations.push(format!(
                "term went back on member {member}: {last} then {term}"
            ));
        }
        *last = (*last).max(term);
    }

    /// State machine safety: `member` applied `entries` (all at or below its applied index), so
    /// they are committed; no member may have applied another entry at any of those indexes.
    pub fn note_applied(&mut self, member: u64, entries: &Log) {
        for (&index, &id) in entries {
            match self.committed.get(&index) {
                None => {
                    self.committed.insert(index, (id, member));
                }
                Some((known, by)) if *known != id => self.violations.push(format!(
                    "state machine safety: at index {index} member {by} applied {known:?}, \
                     member {member} applied {id:?}"
                )),
                Some(_) => {}
            }
        }
    }

    /// Leader completeness: a member that just became leader with id `leader` holds every
    /// entry committed under lower leader ids (above its purge point: those are in its snapshot).
    pub fn check_new_leader(&mut self, leader: LeaderId, log: &Log, purged: Option<u64>) {
        for (&index, &(id, by)) in &self.committed {
            if (id.term, id.leader) >= leader || purged.is_some_and(|p| index <= p) {
                continue;
            }
            if log.get(&index) != Some(&id) {
                self.violations.push(format!(
                    "leader completeness: leader {leader:?} lacks the entry {id:?} at index \
                     {index} that member {by} applied (it holds {:?})",
                    log.get(&index)
                ));
            }
        }
    }
}

/// Log matching: if two logs hold an entry with the same index and leader id, the entries are
/// the same and so is every entry before it that both still hold.
pub fn check_log_matching(logs: &[(String, Log)]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (na, a)) in logs.iter().enumerate() {
        for (nb, b) in &logs[i + 1..] {
            let mut matched: Option<u64> = None;
            for (index, ea) in a.iter().rev() {
                let Some(eb) = b.get(index) else { continue };
                match matched {
                    None if (ea.term, ea.leader) == (eb.term, eb.leader) => {
                        if ea != eb {
                            out.push(format!(
                                "log matching: {na} and {nb} hold different entries of one \
                                 leader at index {index}: {ea:?} / {eb:?}"
                            ));
                        }
                        matched = Some(*index);
                    }
                    None => {}
                    Some(at) if ea != eb => {
                        out.push(format!(
                            "log matching: {na} and {nb} agree at index {at} but differ at \
                             index {index}: {ea:?} / {eb:?}"
                        ));
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
    }
    out
}

/// A member's vote never goes back in openraft's order (term, node id, committed), across
/// restarts: so it never grants a leader id lower than one it granted, nor two candidates one
/// leader id (`votes`: every vote it made durable, in order).
pub fn check_votes(member: &str, votes: &[Vote<u64>]) -> Vec<String> {
    let mut out = Vec::new();
    let key = |v: &Vote<u64>| (v.leader_id.term, v.leader_id.node_id, v.committed);
    for w in votes.windows(2) {
        if key(&w[1]) < key(&w[0]) {
            out.push(format!(
                "vote went back on {member}: {:?} then {:?}",
                key(&w[0]),
                key(&w[1])
            ));
        }
    }
    out
}

/// Every member's state machine holds the same history: the same events at every revision
/// that several of them reached. `histories`: per member, a digest of each revision's events.
pub fn check_state_machines(histories: &[(String, BTreeMap<i64, u64>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (na, a)) in histories.iter().enumerate() {
        for (nb, b) in &histories[i + 1..] {
            for (rev, da) in a {
                if let Some(db) = b.get(rev)
                    && da != db
                {
                    out.push(format!(
                        "state machines differ: {na} and {nb} hold different events at \
                             revision {rev}"
                    ));
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(term: u64, digest: u64) -> EntryId {
        EntryId {
            term,
            leader: term % 3 + 1,
            digest,
        }
    }

    fn log(entries: &[(u64, EntryId)]) -> Log {
        entries.iter().copied().collect()
    }

    #[test]
    fn a_leader_under_another_members_id_or_without_a_quorum_is_flagged() {
        let mut o = Observations::default();
        o.note_leader((3, 1), true, 1);
        o.note_leader((3, 1), true, 1);
        // openraft orders leaders by (term, node): a second leader in term 3 is allowed.
        o.note_leader((3, 2), true, 2);
        assert!(o.violations.is_empty());
        o.note_leader((4, 2), true, 3);
        assert_eq!(o.violations.len(), 1, "{:?}", o.violations);
        assert!(o.violations[0].contains("election safety"));
        o.note_leader((5, 1), false, 1);
        assert_eq!(o.violations.len(), 2, "{:?}", o.violations);
    }

    #[test]
    fn a_term_going_back_is_flagged() {
        let mut o = Observations::default();
        o.note_term(1, 2);
        o.note_term(1, 5);
        o.note_term(2, 1);
        assert!(o.violations.is_empty());
        o.note_term(1, 4);
        assert_eq!(o.violations.len(), 1);
    }

    #[test]
    fn different_entries_applied_at_one_index_are_flagged() {
        let mut o = Observations::default();
        o.note_applied(1, &log(&[(1, e(1, 10)), (2, e(1, 11))]));
        o.note_applied(2, &log(&[(1, e(1, 10)), (2, e(1, 11)), (3, e(2, 12))]));
        assert!(o.violations.is_empty());
        // Same term, other payload: a corrupted apply.
        o.note_applied(3, &log(&[(2, e(1, 99))]));
        assert_eq!(o.violations.len(), 1);
        assert!(o.violations[0].contains("state machine safety"));
    }

    #[test]
    fn a_new_leader_missing_a_committed_entry_is_flagged() {
        let mut o = Observations::default();
        o.note_applied(1, &log(&[(1, e(1, 10)), (2, e(1, 11))]));
        o.check_new_leader((2, 2), &log(&[(1, e(1, 10)), (2, e(1, 11))]), None);
        // Entries at or below the purge point are in the snapshot.
        o.check_new_leader((2, 2), &log(&[(2, e(1, 11))]), Some(1));
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        o.check_new_leader((3, 3), &log(&[(1, e(1, 10))]), None);
        assert_eq!(o.violations.len(), 1);
        assert!(o.violations[0].contains("leader completeness"));
    }

    #[test]
    fn logs_that_agree_at_an_index_but_differ_before_it_are_flagged() {
        let a = log(&[(1, e(1, 1)), (2, e(1, 2)), (3, e(2, 3))]);
        let b = log(&[(1, e(1, 1)), (2, e(1, 2)), (3, e(2, 3)), (4, e(2, 4))]);
        // Diverged after index 1, in different terms: allowed (an uncommitted tail).
        let c = log(&[(1, e(1, 1)), (2, e(3, 7))]);
        let named = |v: Vec<Log>| -> Vec<(String, Log)> {
            v.into_iter()
                .enumerate()
                .map(|(i, l)| (format!("n{i}"), l))
                .collect()
        };
        assert!(check_log_matching(&named(vec![a.clone(), b.clone(), c])).is_empty());
        let bad = log(&[(1, e(1, 1)), (2, e(1, 99)), (3, e(2, 3))]);
        let v = check_log_matching(&named(vec![a.clone(), bad]));
        assert_eq!(v.len(), 1, "{v:?}");
        let same_slot = log(&[(1, e(1, 1)), (2, e(1, 2)), (3, e(2, 42))]);
        assert_eq!(
            check_log_matching(&named(vec![a.clone(), same_slot])).len(),
            1
        );
        // Same term, another leader (openraft's leader ids): a different entry is allowed.
        let other_leader = EntryId {
            leader: e(2, 0).leader + 1,
            ..e(2, 43)
        };
        let d = log(&[(1, e(1, 1)), (2, e(1, 2)), (3, other_leader)]);
        assert!(check_log_matching(&named(vec![a, d])).is_empty());
    }

    #[test]
    fn a_vote_going_back_is_flagged() {
        let v = |term: u64, node: u64| Vote::new(term, node);
        let c = |term: u64, node: u64| Vote::new_committed(term, node);
        assert!(check_votes("n1", &[v(1, 1), v(1, 3), c(1, 3), v(2, 3), v(3, 2)]).is_empty());
        // A lower candidate in the same term after a higher one: a second vote in that term.
        assert_eq!(check_votes("n1", &[v(1, 1), v(2, 3), v(2, 2)]).len(), 1);
        assert_eq!(check_votes("n1", &[v(3, 1), v(2, 2)]).len(), 1);
        assert_eq!(check_votes("n1", &[c(2, 2), v(2, 2)]).len(), 1);
    }

    #[test]
    fn state_machines_with_different_events_at_a_revision_are_flagged() {
        let a: BTreeMap<i64, u64> = [(2, 20), (3, 30)].into();
        let b: BTreeMap<i64, u64> = [(2, 20), (3, 30), (4, 40)].into();
        let c: BTreeMap<i64, u64> = [(2, 20), (3, 31)].into();
        let named = |v: Vec<BTreeMap<i64, u64>>| -> Vec<(String, BTreeMap<i64, u64>)> {
            v.into_iter()
                .enumerate()
                .map(|(i, h)| (format!("n{i}"), h))
                .collect()
        };
        assert!(check_state_machines(&named(vec![a.clone(), b])).is_empty());
        assert_eq!(check_state_machines(&named(vec![a, c])).len(), 1);
    }
}
