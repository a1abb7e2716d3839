//! Watches that survive reconnects.
//!
//! A [`WatchStream`] is fed by a background task that holds one etcd watch. The task remembers
//! the revision after the last one it delivered; when the stream breaks (the endpoint died or
//! restarted) it opens a new watch from that revision on the next endpoint that answers, so the
//! reader sees every change once, in order, with no gap, across any number of reconnects. If the
//! coordinator compacted that revision meanwhile, the reader gets [`WatchEvent::Compacted`] and
//! the stream ends: the reader must read a fresh snapshot and watch again from its revision.

use std::time::Duration;

use proto::etcdserverpb::watch_client::WatchClient;
use proto::etcdserverpb::watch_request::RequestUnion;
use proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
use proto::mvccpb::event::EventType;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::Client;
use crate::kv::{KeyValue, prefix_end};

/// What to watch.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// The key, or the first key of the range.
    pub key: Vec<u8>,
    /// The end of the range (exclusive); empty for the single key.
    pub range_end: Vec<u8>,
    /// The first revision to deliver; 0 means "changes after now".
    pub start_revision: i64,
    /// Deliver the previous value with each event.
    pub prev_kv: bool,
}

impl WatchOptions {
    /// Every key starting with `prefix`, from `start_revision` (0: from now).
    pub fn prefix(prefix: impl Into<Vec<u8>>, start_revision: i64) -> WatchOptions {
        let key = prefix.into();
        WatchOptions {
            range_end: prefix_end(&key),
            key,
            start_revision,
            prev_kv: false,
        }
    }

    /// Also deliver previous values.
    pub fn with_prev_kv(mut self) -> WatchOptions {
        self.prev_kv = true;
        self
    }
}

/// Whether a key was written or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted (also by a lease expiring or being revoked).
    Delete,
}

/// One change of one key.
#[derive(Debug, Clone)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change (for a delete: the key, with `mod_revision` the deletion's).
    pub kv: KeyValue,
    /// The value before the change, if asked for and there was one.
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        self.kv.mod_revision
    }
}

/// What a watch delivers.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// The watch is established; changes after `revision` follow (sent once, first).
    Created {
        /// The store's revision when the watch was created.
        revision: i64,
    },
    /// Changes, in revision order, all of one revision or several consecutive ones.
    Events(Vec<Event>),
    /// The revision the watch needed was compacted: read a fresh snapshot and watch again.
    /// The stream ends after this.
    Compacted {
        /// The coordinator's compacted revision.
        compact_revision: i64,
    },
}

/// A watch that survives reconnects; ends when dropped or after [`WatchEvent::Compacted`].
pub struct WatchStream {
    rx: mpsc::Receiver<WatchEvent>,
    _stop: DropGuard,
}

impl WatchStream {
    /// The next delivery; `None` once the watch ended (compacted, or the client was dropped).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }
}

impl Client {
    /// Starts a watch (see the module docs). Returns at once; the first delivery is
    /// [`WatchEvent::Created`].
    pub fn watch(&self, options: WatchOptions) -> WatchStream {
        let (tx, rx) = mpsc::channel(256);
        let cancel = CancellationToken::new();
        tokio::spawn(run(self.clone(), options, tx, cancel.clone()));
        WatchStream {
            rx,
            _stop: cancel.drop_guard(),
        }
    }
}

/// Why one watch connection ended.
enum Ended {
    /// Reconnect (from the remembered revision).
    Broken,
    /// Stop for good.
    Done,
}

async fn run(
    client: Client,
    options: WatchOptions,
    tx: mpsc::Sender<WatchEvent>,
    cancel: CancellationToken,
) {
    // The next revision to deliver; 0 until the first watch told us what "now" is.
    let mut next = options.start_revision;
    let mut created_sent = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        let (index, channel) = client.current();
        let ended = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tx.closed() => return,
            ended = one_watch(channel, &options, &mut next, &mut created_sent, &tx, &mut backoff) => ended,
        };
        match ended {
            Ended::Done => return,
            Ended::Broken => {
                client.rotate(index);
                tracing::debug!(next, "watch broken; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_millis(1000));
            }
        }
    }
}

async fn one_watch(
    channel: tonic::transport::Channel,
    options: &WatchOptions,
    next: &mut i64,
    created_sent: &mut bool,
    tx: &mpsc::Sender<WatchEvent>,
    backoff: &mut Duration,
) -> Ended {
    let (req_tx, req_rx) = mpsc::channel(1);
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: options.key.clone(),
            range_end: options.range_end.clone(),
            start_revision: *next,
            prev_kv: options.prev_kv,
            ..Default::default()
        })),
    };
    if req_tx.send(create).await.is_err() {
        return Ended::Broken;
    }
    let mut stream = match WatchClient::new(channel)
        .max_decoding_message_size(crate::MAX_RESPONSE_BYTES)
        .watch(ReceiverStream::new(req_rx))
        .await
    {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            tracing::debug!(error = %status, "watch: cannot open stream");
            return Ended::Broken;
        }
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Ended::Broken,
            Err(status) => {
                tracing::debug!(error = %status, "watch stream failed");
                return Ended::Broken;
            }
        };
        if resp.canceled {
            if resp.compact_revision > 0 {
                let _ = tx
                    .send(WatchEvent::Compacted {
                        compact_revision: resp.compact_revision,
                    })
                    .await;
                return Ended::Done;
            }
            tracing::warn!(reason = %resp.cancel_reason, "watch cancelled by the coordinator; re-creating");
            return Ended::Broken;
        }
        if resp.created {
            *backoff = Duration::from_millis(50);
            let header_rev = resp.header.as_ref().map(|h| h.revision).unwrap_or_default();
            if *next == 0 {
                *next = header_rev + 1;
            }
            if !*created_sent {
                *created_sent = true;
                if tx
                    .send(WatchEvent::Created {
                        revision: header_rev,
                    })
                    .await
                    .is_err()
                {
                    return Ended::Done;
                }
            }
        }
        if resp.events.is_empty() {
            continue;
        }
        let mut events = Vec::with_capacity(resp.events.len());
        for e in resp.events {
            let Some(kv) = e.kv else { continue };
            // Never deliver a revision twice (a server replaying from an older revision).
            if kv.mod_revision < *next {
                continue;
            }
            let kind = if e.r#type == EventType::Delete as i32 {
                EventKind::Delete
            } else {
                EventKind::Put
            };
            events.push(Event {
                kind,
                kv,
                prev_kv: e.prev_kv,
            });
        }
        if let Some(last) = events.last() {
            *next = last.kv.mod_revision + 1;
            if tx.send(WatchEvent::Events(events)).await.is_err() {
                return Ended::Done;
            }
        }
    }
}
