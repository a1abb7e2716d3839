//! Watch streams as a watcher saw them, and the checks on them.
//!
//! A watcher is recorded with its key range, the first revision it was meant to deliver, and
//! the responses it received, each a batch of events, in arrival order. On their own
//! ([`check_watches`]) the streams are checked for order, duplicates, range, atomic delivery of
//! a revision, and for agreement between watchers on what they both cover. Together with a KV
//! history ([`crate::check`]) each event must also be the write at its revision, and no write in
//! the range may be missing up to the last revision the watcher covered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use crate::history::{DisplayBytes, Key, Revision, Value};
use crate::replay::{Effect, WriteLog};
use crate::report::{Report, Violation, ViolationKind};

/// Names a watcher in violations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WatcherId(pub u64);

impl fmt::Display for WatcherId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// Put or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The key was set to the event's value.
    Put,
    /// The key was deleted.
    Delete,
}

/// One event as delivered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    /// The revision of the write (`kv.mod_revision` of the event).
    pub revision: Revision,
    /// The key.
    pub key: Key,
    /// Put or delete.
    pub kind: EventKind,
    /// The value put; ignored for a delete.
    pub value: Value,
}

impl WatchEvent {
    /// A put event.
    pub fn put(revision: Revision, key: impl Into<Key>, value: impl Into<Value>) -> Self {
        WatchEvent {
            revision,
            key: key.into(),
            kind: EventKind::Put,
            value: value.into(),
        }
    }

    /// A delete event.
    pub fn delete(revision: Revision, key: impl Into<Key>) -> Self {
        WatchEvent {
            revision,
            key: key.into(),
            kind: EventKind::Delete,
            value: Value::new(),
        }
    }

    pub(crate) fn effect(&self) -> Effect {
        match self.kind {
            EventKind::Put => Effect::Put(self.value.clone()),
            EventKind::Delete => Effect::Delete,
        }
    }
}

impl fmt::Display for WatchEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            EventKind::Put => write!(
                f,
                "put {}={} @{}",
                DisplayBytes(&self.key),
                DisplayBytes(&self.value),
                self.revision
            ),
            EventKind::Delete => write!(f, "delete {} @{}", DisplayBytes(&self.key), self.revision),
        }
    }
}

/// The keys a watcher covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyRange {
    /// One key.
    Key(Key),
    /// Every key starting with the prefix (the empty prefix: every key).
    Prefix(Key),
    /// Keys in `[start, end)`.
    Range { start: Key, end: Key },
    /// Keys `>= start`.
    FromKey(Key),
}

impl KeyRange {
    /// One key.
    pub fn key(key: impl Into<Key>) -> Self {
        KeyRange::Key(key.into())
    }

    /// Every key with this prefix.
    pub fn prefix(prefix: impl Into<Key>) -> Self {
        KeyRange::Prefix(prefix.into())
    }

    /// The range of an etcd request: `range_end` empty = the key alone, `[0]` = every key
    /// `>= key`, otherwise `[key, range_end)`.
    pub fn from_etcd(key: impl Into<Key>, range_end: impl Into<Key>) -> Self {
        let key = key.into();
        let end = range_end.into();
        if end.is_empty() {
            KeyRange::Key(key)
        } else if end == [0] {
            if key.is_empty() || key == [0] {
                KeyRange::Prefix(Key::new())
            } else {
                KeyRange::FromKey(key)
            }
        } else if prefix_end(&key).as_deref() == Some(end.as_slice()) {
            KeyRange::Prefix(key)
        } else {
            KeyRange::Range { start: key, end }
        }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Key(k) => k.as_slice() == key,
            KeyRange::Prefix(p) => key.starts_with(p),
            KeyRange::Range { start, end } => start.as_slice() <= key && key < end.as_slice(),
            KeyRange::FromKey(start) => start.as_slice() <= key,
        }
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRange::Key(k) => write!(f, "{}", DisplayBytes(k)),
            KeyRange::Prefix(p) => write!(f, "{}*", DisplayBytes(p)),
            KeyRange::Range { start, end } => {
                write!(f, "[{}, {})", DisplayBytes(start), DisplayBytes(end))
            }
            KeyRange::FromKey(k) => write!(f, ">={}", DisplayBytes(k)),
        }
    }
}

/// The smallest key greater than every key with this prefix; `None` if there is none.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// One watcher's stream, as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchRecord {
    /// Names it in violations.
    pub watcher: WatcherId,
    /// The keys watched.
    pub range: KeyRange,
    /// The first revision the watcher is meant to deliver. For a watch created "from now"
    /// (etcd's start revision 0), the creation response's header revision + 1.
    pub start_revision: Revision,
    /// The responses received, in order, each with its events in order.
    pub responses: Vec<Vec<WatchEvent>>,
    /// The last revision the stream is known to be complete through (a progress notification,
    /// or the test waited until the watcher reached the final revision). Without it, the
    /// revision of the last event received; no gap is looked for beyond it.
    pub complete_through: Option<Revision>,
}

impl WatchRecord {
    /// A watcher that has received nothing yet.
    pub fn new(watcher: u64, range: KeyRange, start_revision: Revision) -> Self {
        WatchRecord {
            watcher: WatcherId(watcher),
            range,
            start_revision,
            responses: Vec::new(),
            complete_through: None,
        }
    }

    /// Records one response.
    pub fn push_response(&mut self, events: Vec<WatchEvent>) {
        self.responses.push(events);
    }

    /// Every event received, in order.
    pub fn events(&self) -> impl Iterator<Item = &WatchEvent> {
        self.responses.iter().flatten()
    }

    /// The last revision checked for gaps: [`Self::complete_through`], or the last event's
    /// revision, or `start_revision - 1` when nothing arrived.
    pub fn through(&self) -> Revision {
        self.complete_through.unwrap_or_else(|| {
            self.events()
                .map(|e| e.revision)
                .max()
                .unwrap_or(self.start_revision - 1)
        })
    }
}

/// Checks watch streams on their own, without the writes: order, duplicates, range, start,
/// atomic revisions, and agreement between watchers.
pub fn check_watches(watches: &[WatchRecord]) -> Report {
    let mut violations = Vec::new();
    for w in watches {
        check_stream(w, &mut violations);
    }
    check_agreement(watches, &mut violations);
    Report {
        violations,
        watchers: watches.len(),
        ..Report::default()
    }
}

/// Order, duplicates, range, start revision and atomic delivery of one stream.
pub(crate) fn check_stream(w: &WatchRecord, out: &mut Vec<Violation>) {
    let id = w.watcher;
    let mut seen: HashSet<(Revision, &Key)> = HashSet::new();
    let mut response_of: HashMap<Revision, usize> = HashMap::new();
    let mut split_reported: HashSet<Revision> = HashSet::new();
    let mut last: Option<&WatchEvent> = None;
    for (resp, events) in w.responses.iter().enumerate() {
        for ev in events {
            let rev = ev.revision;
            if !w.range.contains(&ev.key) {
                out.push(
                    Violation::new(
                        ViolationKind::WatchEventOutOfRange,
                        format!("{id} watching {} delivered {ev}", w.range),
                    )
                    .watchers([id])
                    .key(&ev.key)
                    .revision(rev),
                );
            }
            if rev < w.start_revision {
                out.push(
                    Violation::new(
                        ViolationKind::WatchEventBeforeStart,
                        format!(
                            "{id} started at revision {} but delivered {ev}",
                            w.start_revision
                        ),
                    )
                    .watchers([id])
                    .key(&ev.key)
                    .revision(rev),
                );
            }
            if !seen.insert((rev, &ev.key)) {
                out.push(
                    Violation::new(
                        ViolationKind::WatchDuplicateEvent,
                        format!("{id} delivered {ev} a second time (response {resp})"),
                    )
                    .watchers([id])
                    .key(&ev.key)
                    .revision(rev),
                );
                continue;
            }
            if let Some(prev) = last
                && rev < prev.revision
            {
                out.push(
                    Violation::new(
                        ViolationKind::WatchOutOfOrder,
                        format!("{id} delivered {ev} after {prev} (response {resp})"),
                    )
                    .watchers([id])
                    .key(&ev.key)
                    .revision(rev),
                );
            }
            match response_of.get(&rev) {
                Some(&first) if first != resp && split_reported.insert(rev) => out.push(
                    Violation::new(
                        ViolationKind::WatchRevisionSplit,
                        format!(
                            "{id} delivered events of revision {rev} in responses {first} and {resp}"
                        ),
                    )
                    .watchers([id])
                    .revision(rev),
                ),
                Some(_) => {}
                None => {
                    response_of.insert(rev, resp);
                }
            }
            if last.is_none_or(|prev| rev >= prev.revision) {
                last = Some(ev);
            }
        }
    }
}

/// Every write of the log in the watcher's range and covered revisions must have been delivered.
pub(crate) fn check_gaps(w: &WatchRecord, log: &WriteLog, out: &mut Vec<Violation>) {
    let through = w.through();
    if through < w.start_revision {
        return;
    }
    let seen: HashSet<(Revision, &Key)> = w.events().map(|e| (e.revision, &e.key)).collect();
    for (&rev, write) in log.range(w.start_revision..=through) {
        if w.range.contains(&write.key) && !seen.contains(&(rev, &write.key)) {
            let what = match &write.effect {
                Effect::Put(v) => format!("put {}={}", DisplayBytes(&write.key), DisplayBytes(v)),
                Effect::Delete => format!("delete {}", DisplayBytes(&write.key)),
            };
            out.push(
                Violation::new(
                    ViolationKind::WatchMissingEvent,
                    format!(
                        "{} watching {} from revision {} through {through} never delivered {what} @{rev} (op #{})",
                        w.watcher, w.range, w.start_revision, write.op.0
                    ),
                )
                .ops([write.op])
                .watchers([w.watcher])
                .key(&write.key)
                .revision(rev),
            );
        }
    }
}

/// Any two watchers must deliver the same events for the keys and revisions both cover.
pub(crate) fn check_agreement(watches: &[WatchRecord], out: &mut Vec<Violation>) {
    type Seen<'a> = BTreeMap<(Revision, &'a Key), (EventKind, &'a Value)>;
    fn covered<'a>(w: &'a WatchRecord, other: &KeyRange, lo: Revision, hi: Revision) -> Seen<'a> {
        w.events()
            .filter(|e| {
                e.revision >= lo
                    && e.revision <= hi
                    && w.range.contains(&e.key)
                    && other.contains(&e.key)
            })
            .map(|e| {
                // The value of a delete event carries nothing.
                static EMPTY: Value = Value::new();
                let value = if e.kind == EventKind::Put {
                    &e.value
                } else {
                    &EMPTY
                };
                ((e.revision, &e.key), (e.kind, value))
            })
            .collect()
    }
    fn show(e: Option<&(EventKind, &Value)>) -> String {
        match e {
            None => "nothing".to_string(),
            Some((EventKind::Put, v)) => format!("put {}", DisplayBytes(v)),
            Some((EventKind::Delete, _)) => "delete".to_string(),
        }
    }
    for (i, a) in watches.iter().enumerate() {
        for b in &watches[i + 1..] {
            let lo = a.start_revision.max(b.start_revision);
            let hi = a.through().min(b.through());
            if lo > hi {
                continue;
            }
            let ea = covered(a, &b.range, lo, hi);
            let eb = covered(b, &a.range, lo, hi);
            if ea == eb {
                continue;
            }
            let mut diffs = Vec::new();
            let mut first: Option<(Revision, &Key)> = None;
            let all: std::collections::BTreeSet<_> = ea.keys().chain(eb.keys()).collect();
            for k in all {
                let (x, y) = (ea.get(k), eb.get(k));
                if x != y {
                    first.get_or_insert(*k);
                    if diffs.len() < 3 {
                        diffs.push(format!(
                            "@{} {}: {} has {}, {} has {}",
                            k.0,
                            DisplayBytes(k.1),
                            a.watcher,
                            show(x),
                            b.watcher,
                            show(y)
                        ));
                    }
                }
            }
            let mut v = Violation::new(
                ViolationKind::WatchersDisagree,
                format!(
                    "{} ({}) and {} ({}) disagree on revisions {lo}..={hi}: {}",
                    a.watcher,
                    a.range,
                    b.watcher,
                    b.range,
                    diffs.join("; ")
                ),
            )
            .watchers([a.watcher, b.watcher]);
            if let Some((rev, key)) = first {
                v = v.key(key).revision(rev);
            }
            out.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_ranges_map_to_key_prefix_range_and_from_key() {
        assert_eq!(KeyRange::from_etcd("a", ""), KeyRange::key("a"));
        assert_eq!(KeyRange::from_etcd("ab", "ac"), KeyRange::prefix("ab"));
        assert_eq!(
            KeyRange::from_etcd(vec![b'a', 0xff], "b"),
            KeyRange::prefix(vec![b'a', 0xff])
        );
        assert_eq!(KeyRange::from_etcd("", vec![0]), KeyRange::prefix(""));
        assert_eq!(
            KeyRange::from_etcd("a", vec![0]),
            KeyRange::FromKey(b"a".to_vec())
        );
        let r = KeyRange::from_etcd("a", "c");
        assert!(r.contains(b"a") && r.contains(b"bzz") && !r.contains(b"c"));
        assert!(KeyRange::prefix("").contains(b"anything"));
    }
}
