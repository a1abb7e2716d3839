//! The watch hub: fan-out of applied events to watchers, without ever slowing `apply`.
//!
//! Every applied revision is [`WatchHub::publish`]ed once, in order. A watcher is either
//! *synced* — it has every event up to the last published revision and receives new ones as
//! they are published — or *catching up* — a task of its own replays history from the store,
//! starting at the watcher's cursor, until it reaches the published revision, and then (under
//! the hub's lock, so no publish can slip between) joins the synced set.
//!
//! Publishing never waits: a synced watcher whose stream buffer is full is moved to catch-up
//! with its cursor at the first undelivered revision (etcd calls these "victims"). So events
//! are delivered in revision order, each once, with no gap, and a slow reader costs only its
//! own catch-up task. A watcher starting in the past simply starts in catch-up; one whose
//! cursor falls behind the compacted revision is cancelled with `compact_revision` set.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};
use proto::etcdserverpb::{ResponseHeader, WatchResponse};
use proto::mvccpb::{Event, event::EventType};
use tokio::sync::mpsc;
use tonic::Status;

use crate::command::KeyRange;
use crate::error::Error;
use crate::state::StateMachine;

/// Sender half of one watch stream's outgoing messages.
pub type StreamTx = mpsc::Sender<Result<WatchResponse, Status>>;

/// Revisions replayed per read of history during catch-up.
const CATCH_UP_CHUNK: i64 = 512;

/// What a watcher asked for.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Keys watched.
    pub range: KeyRange,
    /// Skip PUT events.
    pub no_put: bool,
    /// Skip DELETE events.
    pub no_delete: bool,
    /// Include the previous key-value in events.
    pub prev_kv: bool,
    /// Periodic progress notifications asked for.
    pub progress_notify: bool,
}

/// One watcher.
pub struct Watcher {
    /// Hub-wide id.
    gid: u64,
    /// The id the client knows (unique per stream).
    pub watch_id: i64,
    spec: WatchSpec,
    tx: StreamTx,
    cancelled: AtomicBool,
    /// Which stream it belongs to (for progress requests).
    stream: u64,
}

struct Synced {
    watcher: Arc<Watcher>,
    next_rev: i64,
}

struct Inner {
    published_rev: i64,
    synced: HashMap<u64, Synced>,
    /// gid -> cursor of watchers catching up, per stream (for progress answers).
    catching_up: HashMap<u64, (u64, i64)>,
    next_gid: u64,
}

/// Header values every watch response carries.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderTemplate {
    /// Cluster id.
    pub cluster_id: u64,
    /// Member id.
    pub member_id: u64,
    /// Raft term.
    pub raft_term: u64,
}

/// Fan-out of applied events.
pub struct WatchHub {
    inner: Mutex<Inner>,
    state: Arc<RwLock<StateMachine>>,
    header: HeaderTemplate,
    /// The current term, kept up to date by the Raft member.
    term: std::sync::atomic::AtomicU64,
    rt: tokio::runtime::Handle,
}

impl WatchHub {
    /// A hub whose published revision starts at the state's current revision.
    pub fn new(
        state: Arc<RwLock<StateMachine>>,
        header: HeaderTemplate,
        rt: tokio::runtime::Handle,
    ) -> Arc<WatchHub> {
        let rev = state.read().revision();
        Arc::new(WatchHub {
            inner: Mutex::new(Inner {
                published_rev: rev,
                synced: HashMap::new(),
                catching_up: HashMap::new(),
                next_gid: 1,
            }),
            state,
            header,
            term: std::sync::atomic::AtomicU64::new(0),
            rt,
        })
    }

    /// A response header at `rev`.
    pub fn header(&self, rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.header.cluster_id,
            member_id: self.header.member_id,
            revision: rev,
            raft_term: self.term.load(Ordering::Relaxed).max(self.header.raft_term),
        })
    }

    /// Record the current Raft term (for response headers).
    pub fn set_term(&self, term: u64) {
        self.term.store(term, Ordering::Relaxed);
    }

    /// The last revision whose events were published.
    pub fn published_revision(&self) -> i64 {
        self.inner.lock().published_rev
    }

    /// Number of watchers (synced and catching up).
    pub fn watcher_count(&self) -> usize {
        let i = self.inner.lock();
        i.synced.len() + i.catching_up.len()
    }

    /// Publish the events of one revision. Never blocks on a watcher.
    ///
    /// A put's event comes from `apply` without the key's previous version unless its request
    /// asked for it (reading it costs a backend read per put), so when a synced watcher wants
    /// `prev_kv` it is read here first, as etcd's watch stream reads it when it sends. A watcher
    /// that asks for `prev_kv` in the moment between that check and the delivery below gets the
    /// revision through catch-up instead, which reads history with previous versions.
    pub fn publish(self: &Arc<Self>, rev: i64, events: &[Event]) {
        let filled;
        let mut events = events;
        let mut prev_read = false;
        if events.iter().any(lacks_prev) && self.wants_prev(rev) {
            filled = self.with_prev(events);
            events = &filled;
            prev_read = true;
        }
        let mut inner = self.inner.lock();
        if rev <= inner.published_rev {
            return;
        }
        inner.published_rev = rev;
        if events.is_empty() || inner.synced.is_empty() {
            return;
        }
        let mut victims = Vec::new();
        let mut closed = Vec::new();
        for (gid, s) in inner.synced.iter_mut() {
            if rev < s.next_rev {
                continue;
            }
            let evs = filter_events(&s.watcher.spec, events);
            if evs.is_empty() {
                s.next_rev = rev + 1;
                continue;
            }
            if s.watcher.spec.prev_kv && !prev_read && evs.iter().any(lacks_prev) {
                victims.push((*gid, rev));
                continue;
            }
            let resp = WatchResponse {
                header: self.header(rev),
                watch_id: s.watcher.watch_id,
                events: evs,
                ..Default::default()
            };
            match s.watcher.tx.try_send(Ok(resp)) {
                Ok(()) => s.next_rev = rev + 1,
                Err(mpsc::error::TrySendError::Full(_)) => victims.push((*gid, rev)),
                Err(mpsc::error::TrySendError::Closed(_)) => closed.push(*gid),
            }
        }
        for gid in closed {
            inner.synced.remove(&gid);
        }
        for (gid, cursor) in victims {
            if let Some(s) = inner.synced.remove(&gid) {
                inner.catching_up.insert(gid, (s.watcher.stream, cursor));
                self.spawn_catch_up(s.watcher, cursor);
            }
        }
    }

    /// Whether a synced watcher due to receive `rev` wants previous versions.
    fn wants_prev(&self, rev: i64) -> bool {
        let inner = self.inner.lock();
        rev > inner.published_rev
            && inner
                .synced
                .values()
                .any(|s| s.watcher.spec.prev_kv && rev >= s.next_rev)
    }

    /// `events` with the previous version of each put's key read from the store. One that is no
    /// longer there (compacted meanwhile) stays without, as in etcd.
    fn with_prev(&self, events: &[Event]) -> Vec<Event> {
        let st = self.state.read();
        events
            .iter()
            .map(|ev| {
                let mut ev = ev.clone();
                if lacks_prev(&ev)
                    && let Some(kv) = &ev.kv
                {
                    ev.prev_kv = st
                        .store()
                        .version_before(&kv.key, kv.mod_revision)
                        .ok()
                        .flatten();
                }
                ev
            })
            .collect()
    }

    /// After the store was replaced by a snapshot: every synced watcher replays history from
    /// its cursor (what the snapshot skipped is in its history), and publishing resumes at `rev`.
    pub fn reset_after_snapshot(self: &Arc<Self>, rev: i64) {
        let mut inner = self.inner.lock();
        let synced: Vec<(u64, Synced)> = inner.synced.drain().collect();
        for (gid, s) in synced {
            inner
                .catching_up
                .insert(gid, (s.watcher.stream, s.next_rev));
            self.spawn_catch_up(s.watcher, s.next_rev);
        }
        inner.published_rev = rev;
    }

    /// Register a watcher. `start_rev` 0 means "from the next revision". The `created` response
    /// must already have been sent on `tx`.
    pub fn watch(
        self: &Arc<Self>,
        stream: u64,
        watch_id: i64,
        spec: WatchSpec,
        start_rev: i64,
        tx: StreamTx,
    ) -> Arc<Watcher> {
        let mut inner = self.inner.lock();
        let gid = inner.next_gid;
        inner.next_gid += 1;
        let w = Arc::new(Watcher {
            gid,
            watch_id,
            spec,
            tx,
            cancelled: AtomicBool::new(false),
            stream,
        });
        let published = inner.published_rev;
        if start_rev == 0 || start_rev > published {
            let next_rev = if start_rev == 0 {
                published + 1
            } else {
                start_rev
            };
            inner.synced.insert(
                gid,
                Synced {
                    watcher: w.clone(),
                    next_rev,
                },
            );
        } else {
            inner.catching_up.insert(gid, (stream, start_rev));
            self.spawn_catch_up(w.clone(), start_rev);
        }
        w
    }

    /// Stop a watcher.
    pub fn cancel(&self, w: &Watcher) {
        w.cancelled.store(true, Ordering::Release);
        let mut inner = self.inner.lock();
        inner.synced.remove(&w.gid);
        inner.catching_up.remove(&w.gid);
    }

    /// The revision up to which every watcher of `stream` has been sent all its events.
    pub fn progress_revision(&self, stream: u64) -> i64 {
        let inner = self.inner.lock();
        let mut rev = inner.published_rev;
        for (s, cursor) in inner.catching_up.values() {
            if *s == stream {
                rev = rev.min(cursor - 1);
            }
        }
        rev
    }

    /// Send a progress notification to every synced watcher that asked for them.
    pub fn notify_progress(&self) {
        let inner = self.inner.lock();
        let rev = inner.published_rev;
        for s in inner.synced.values() {
            if s.watcher.spec.progress_notify {
                let resp = WatchResponse {
                    header: self.header(rev),
                    watch_id: s.watcher.watch_id,
                    ..Default::default()
                };
                let _ = s.watcher.tx.try_send(Ok(resp));
            }
        }
    }

    fn spawn_catch_up(self: &Arc<Self>, w: Arc<Watcher>, cursor: i64) {
        let hub = self.clone();
        self.rt.spawn(async move { hub.catch_up(w, cursor).await });
    }

    async fn catch_up(self: Arc<Self>, w: Arc<Watcher>, mut cursor: i64) {
        loop {
            if w.cancelled.load(Ordering::Acquire) || w.tx.is_closed() {
                self.inner.lock().catching_up.remove(&w.gid);
                return;
            }
            let target = {
                let mut inner = self.inner.lock();
                if cursor > inner.published_rev {
                    inner.catching_up.remove(&w.gid);
                    if !w.cancelled.load(Ordering::Acquire) {
                        inner.synced.insert(
                            w.gid,
                            Synced {
                                watcher: w.clone(),
                                next_rev: cursor,
                            },
                        );
                    }
                    return;
                }
                if let Some(e) = inner.catching_up.get_mut(&w.gid) {
                    e.1 = cursor;
                }
                inner.published_rev
            };
            let end = target.min(cursor + CATCH_UP_CHUNK - 1);
            let read = {
                let st = self.state.read();
                st.store().events_between(cursor, end, w.spec.prev_kv)
            };
            let events = match read {
                Ok(evs) => evs,
                Err(Error::Compacted { compact_revision }) => {
                    let resp = WatchResponse {
                        header: self.header(target),
                        watch_id: w.watch_id,
                        canceled: true,
                        compact_revision,
                        cancel_reason: Error::Compacted { compact_revision }.to_string(),
                        ..Default::default()
                    };
                    let _ = w.tx.send(Ok(resp)).await;
                    self.cancel(&w);
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "watch catch-up failed to read history");
                    let _ = w.tx.send(Err(Status::from(e))).await;
                    self.cancel(&w);
                    return;
                }
            };
            // Group by revision: one response per revision, as when live.
            let mut i = 0;
            while i < events.len() {
                let rev = events[i].0;
                let mut j = i;
                let mut batch = Vec::new();
                while j < events.len() && events[j].0 == rev {
                    batch.push(events[j].1.clone());
                    j += 1;
                }
                i = j;
                let evs = filter_events(&w.spec, &batch);
                if evs.is_empty() {
                    continue;
                }
                let resp = WatchResponse {
                    header: self.header(rev),
                    watch_id: w.watch_id,
                    events: evs,
                    ..Default::default()
                };
                if w.tx.send(Ok(resp)).await.is_err() {
                    self.inner.lock().catching_up.remove(&w.gid);
                    return;
                }
            }
            cursor = end + 1;
        }
    }
}

/// A put of a key that existed before, whose event does not carry the previous version.
fn lacks_prev(ev: &Event) -> bool {
    ev.r#type == EventType::Put as i32
        && ev.prev_kv.is_none()
        && ev.kv.as_ref().is_some_and(|kv| kv.version > 1)
}

fn filter_events(spec: &WatchSpec, events: &[Event]) -> Vec<Event> {
    let mut out = Vec::new();
    for ev in events {
        let Some(kv) = &ev.kv else { continue };
        if !spec.range.contains(&kv.key) {
            continue;
        }
        let is_put = ev.r#type == EventType::Put as i32;
        if (is_put && spec.no_put) || (!is_put && spec.no_delete) {
            continue;
        }
        let mut e = ev.clone();
        if !spec.prev_kv {
            e.prev_kv = None;
        }
        out.push(e);
    }
    out
}
