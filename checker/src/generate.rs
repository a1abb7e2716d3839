//! Random histories that are valid by construction, for property tests of the checkers.
//!
//! A sequential model of an etcd store (one revision counter, put/get/delete/compare-and-set,
//! an event log) is driven by simulated clients under a random interleaving: at every tick one
//! thing happens: a client sends, a pending request takes effect (its linearization point), a
//! response arrives, a request fails before taking effect, or a client times out. A timed-out
//! request is recorded as unknown and may still take effect later, or never; a response may
//! also be lost after the request took effect. After the run a fresh client reads every key,
//! and watchers over one key or every key replay the event log from a random start revision in
//! responses of one to three revisions.
//!
//! The same seed and configuration always give the same history.

use std::collections::BTreeMap;

use crate::history::{
    ClientId, History, Key, KeyValue, OpId, Operation, Outcome, Request, Response, Revision, Time,
};
use crate::watch::{KeyRange, WatchEvent, WatchRecord};

/// Shape of a generated history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenConfig {
    /// Concurrent clients, each waiting for one request before the next.
    pub clients: usize,
    /// Keys `k0`, `k1`, …
    pub keys: usize,
    /// Requests per client (the final reads come on top).
    pub ops_per_client: usize,
    /// Watchers; even ones watch the prefix `k` (every key), odd ones a single key.
    pub watchers: usize,
    /// Percent of requests that time out before taking effect (then may take effect later or
    /// never), and separately of responses lost after taking effect: both end unknown.
    pub unknown_percent: u64,
    /// Percent of requests that fail before taking effect.
    pub failed_percent: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            clients: 4,
            keys: 3,
            ops_per_client: 15,
            watchers: 2,
            unknown_percent: 8,
            failed_percent: 4,
        }
    }
}

/// A generated run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// Every client operation, final reads included.
    pub history: History,
    /// Every watcher's stream, each complete through `final_revision`.
    pub watches: Vec<WatchRecord>,
    /// The store revision at the end.
    pub final_revision: Revision,
}

/// A small deterministic random generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with `percent` % probability.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The sequential model of the store.
#[derive(Debug)]
struct Store {
    revision: Revision,
    kvs: BTreeMap<Key, KeyValue>,
    events: Vec<WatchEvent>,
}

impl Store {
    fn new() -> Self {
        Store {
            revision: 1,
            kvs: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    fn put(&mut self, key: &Key, value: &[u8]) {
        self.revision += 1;
        let version = self.kvs.get(key).map_or(1, |kv| kv.version + 1);
        self.kvs.insert(
            key.clone(),
            KeyValue {
                value: value.to_vec(),
                mod_revision: self.revision,
                version,
            },
        );
        self.events
            .push(WatchEvent::put(self.revision, key.clone(), value.to_vec()));
    }

    fn apply(&mut self, req: &Request) -> Response {
        match req {
            Request::Put { key, value } => {
                self.put(key, value);
                Response::Put {
                    revision: self.revision,
                }
            }
            Request::Get { key } => Response::Get {
                revision: self.revision,
                kv: self.kvs.get(key).cloned(),
            },
            Request::Delete { key } => {
                let deleted = if self.kvs.remove(key).is_some() {
                    self.revision += 1;
                    self.events
                        .push(WatchEvent::delete(self.revision, key.clone()));
                    1
                } else {
                    0
                };
                Response::Delete {
                    revision: self.revision,
                    deleted,
                }
            }
            Request::Cas {
                key,
                expected_mod_revision,
                value,
            } => {
                let current = self.kvs.get(key).map_or(0, |kv| kv.mod_revision);
                let succeeded = current == *expected_mod_revision;
                if succeeded {
                    self.put(key, value);
                }
                Response::Cas {
                    revision: self.revision,
                    succeeded,
                }
            }
        }
    }
}

struct Pending {
    id: OpId,
    applied: Option<Response>,
}

#[derive(Default)]
struct Client {
    remaining: usize,
    sent: usize,
    pending: Option<Pending>,
    /// The last mod_revision this client learned per key, for its compare-and-sets.
    last_mod: BTreeMap<Key, Revision>,
}

#[derive(Clone, Copy)]
enum Action {
    Send(usize),
    Progress(usize),
    Late(usize),
}

/// A random valid history of `config`'s shape.
pub fn generate(seed: u64, config: &GenConfig) -> Generated {
    let mut rng = Rng::new(seed);
    let keys: Vec<Key> = (0..config.keys.max(1))
        .map(|i| format!("k{i}").into_bytes())
        .collect();
    let mut store = Store::new();
    let mut history = History::new();
    let mut clients: Vec<Client> = (0..config.clients)
        .map(|_| Client {
            remaining: config.ops_per_client,
            ..Client::default()
        })
        .collect();
    // Requests that timed out before taking effect: they may still take effect.
    let mut late: Vec<OpId> = Vec::new();
    let mut clock: Time = 0;
    let mut actions = Vec::new();
    loop {
        actions.clear();
        for (i, c) in clients.iter().enumerate() {
            match c.pending {
                None if c.remaining > 0 => actions.push(Action::Send(i)),
                None => {}
                Some(_) => actions.push(Action::Progress(i)),
            }
        }
        actions.extend((0..late.len()).map(Action::Late));
        if actions.is_empty() {
            break;
        }
        clock += 1;
        match actions[rng.below(actions.len() as u64) as usize] {
            Action::Send(i) => {
                let c = &mut clients[i];
                let key = keys[rng.below(keys.len() as u64) as usize].clone();
                let value = format!("c{i}-{}", c.sent).into_bytes();
                let request = match rng.below(100) {
                    0..35 => Request::Put { key, value },
                    35..65 => Request::Get { key },
                    65..75 => Request::Delete { key },
                    p => {
                        let expected_mod_revision = if p < 87 {
                            c.last_mod.get(&key).copied().unwrap_or(0)
                        } else if p < 93 {
                            0
                        } else {
                            store.kvs.get(&key).map_or(0, |kv| kv.mod_revision)
                        };
                        Request::Cas {
                            key,
                            expected_mod_revision,
                            value,
                        }
                    }
                };
                c.sent += 1;
                c.remaining -= 1;
                let id = history.push(Operation {
                    client: ClientId(i as u64),
                    request,
                    invoke: clock,
                    complete: clock,
                    outcome: Outcome::Unknown,
                });
                c.pending = Some(Pending { id, applied: None });
            }
            Action::Progress(i) => {
                let c = &mut clients[i];
                let Some(p) = c.pending.as_mut() else {
                    continue;
                };
                let op = &mut history.ops[p.id.0];
                match p.applied.take() {
                    None => {
                        if rng.chance(config.failed_percent) {
                            op.complete = clock;
                            op.outcome = Outcome::Failed;
                            c.pending = None;
                        } else if rng.chance(config.unknown_percent) {
                            op.complete = clock;
                            if op.request.is_write() {
                                late.push(p.id);
                            }
                            c.pending = None;
                        } else {
                            p.applied = Some(store.apply(&op.request));
                        }
                    }
                    Some(resp) => {
                        op.complete = clock;
                        if !rng.chance(config.unknown_percent) {
                            learn(&mut c.last_mod, &op.request, &resp);
                            op.outcome = Outcome::Ok(resp);
                        }
                        c.pending = None;
                    }
                }
            }
            Action::Late(j) => {
                let id = late.swap_remove(j);
                if rng.chance(50) {
                    store.apply(&history.ops[id.0].request);
                }
            }
        }
    }

    // Final reads by a fresh client, one key after the other.
    let reader = ClientId(config.clients as u64);
    for key in &keys {
        let request = Request::Get { key: key.clone() };
        let outcome = Outcome::Ok(store.apply(&request));
        history.push(Operation {
            client: reader,
            request,
            invoke: clock + 1,
            complete: clock + 2,
            outcome,
        });
        clock += 2;
    }

    let final_revision = store.revision;
    let mut watches = Vec::new();
    for w in 0..config.watchers {
        let range = if w % 2 == 0 {
            KeyRange::prefix("k")
        } else {
            KeyRange::Key(keys[rng.below(keys.len() as u64) as usize].clone())
        };
        let start = 1 + rng.below(final_revision as u64 + 1) as Revision;
        let mut record = WatchRecord::new(w as u64, range, start);
        let mut events: Vec<WatchEvent> = store
            .events
            .iter()
            .filter(|e| e.revision >= start && record.range.contains(&e.key))
            .cloned()
            .collect();
        while !events.is_empty() {
            let n = (1 + rng.below(3) as usize).min(events.len());
            record.push_response(events.drain(..n).collect());
        }
        record.complete_through = Some(final_revision);
        watches.push(record);
    }
    Generated {
        history,
        watches,
        final_revision,
    }
}

/// What a client learns of a key's mod_revision from a response.
fn learn(last_mod: &mut BTreeMap<Key, Revision>, req: &Request, resp: &Response) {
    let learned = match (req, resp) {
        (Request::Put { .. }, Response::Put { revision }) => Some(*revision),
        (Request::Get { .. }, Response::Get { kv, .. }) => {
            Some(kv.as_ref().map_or(0, |kv| kv.mod_revision))
        }
        (Request::Delete { .. }, Response::Delete { .. }) => Some(0),
        (
            Request::Cas { .. },
            Response::Cas {
                revision,
                succeeded: true,
            },
        ) => Some(*revision),
        _ => None,
    };
    if let Some(rev) = learned {
        last_mod.insert(req.key().clone(), rev);
    }
}
