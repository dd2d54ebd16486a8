//! Documents across nodes: the [`Relay`] a server implements over its broker, and the
//! node's side of it: subscriptions counted per document, and the buffer that holds a
//! loading document's relay messages.
//!
//! Every node that has a document loaded is subscribed to it. Its local changes (merged per
//! fan-out tick, the same update its own connections get) and its connections' awareness go
//! to the other nodes; what arrives from them is applied to the in-memory document and fanned
//! out locally, but neither stored nor relayed again: the node whose client sent an update is
//! the one that persists it. Messages carry the origin's node id (random at start), so a
//! node ignores its own if the broker hands them back. See `codec` for the envelope.
//!
//! **Holes heal by sync.** A relay may drop messages (`send` says so, or the transport loses
//! them). A document then sends a *sync request* (its state vector); every peer answers with
//! a *sync reply*: what the requester lacks, plus the peer's own state vector, which the
//! requester answers with what the peer lacks. A document asks when it loads, when a send was
//! refused, when a remote update arrives whose predecessors it has not seen, and every
//! [`RESYNC_INTERVAL`] while updates cross nodes (for losses nothing else reveals).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::CollabMetrics;

/// How a node's documents reach the same documents on other nodes.
#[async_trait]
pub trait Relay: Send + Sync {
    /// Starts receiving `doc_id`'s relay messages (the server then calls
    /// [`crate::Collab::handle_relay`]`(doc_id, payload)` for each). Returns once the
    /// subscription is active.
    async fn subscribe(&self, doc_id: i64) -> Result<(), String>;
    async fn unsubscribe(&self, doc_id: i64);
    /// Hands `payload` to every node subscribed to `doc_id` (possibly including this one:
    /// collab filters its own messages by the node id inside the payload). Never blocks: a
    /// bounded hand-off that returns false when the message was dropped.
    ///
    /// Payloads are as large as what they carry: a sync reply to a node that just loaded a
    /// document can be the size of the document's recent changes.
    fn send(&self, doc_id: i64, payload: Bytes) -> bool;
}

/// Remote awareness states not renewed for this long are removed (y-protocols clients renew
/// theirs every 15 s and time others out after 30 s; this covers a node that crashed
/// without relaying its connections' removals).
pub(crate) const REMOTE_AWARENESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Sync requests of one document are at least this far apart (a relay that keeps refusing
/// would otherwise get one per tick).
pub(crate) const SYNC_REQUEST_SPACING: Duration = Duration::from_millis(200);

/// A document that relayed or received updates since the last check sends a sync request
/// this often: the repair for messages a transport lost without telling anyone.
pub(crate) const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// What a loading document's buffer holds at most; past either, the buffer is dropped and
/// the sync request sent after loading brings the same content (awareness comes back with
/// the next renewal).
const LOAD_BUFFER_MESSAGES: usize = 1024;
const LOAD_BUFFER_BYTES: usize = 4 << 20;

/// The node's relay, shared by its documents.
pub(crate) struct Peers {
    relay: Arc<dyn Relay>,
    /// This node's id in every envelope it sends.
    pub node: u64,
    metrics: CollabMetrics,
    /// Subscribed documents and how many loaded copies use each (a document unloading while
    /// its next copy loads must not unsubscribe the new one).
    subs: Mutex<HashMap<i64, SubEntry>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

struct SubEntry {
    refs: usize,
    /// Whether the relay subscription is active. An async mutex, so one document's
    /// subscribes and unsubscribes run one at a time, in the order they were asked for.
    gate: Arc<tokio::sync::Mutex<bool>>,
}

impl Peers {
    pub(crate) fn new(
        relay: Arc<dyn Relay>,
        node: u64,
        metrics: CollabMetrics,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Peers {
        Peers {
            relay,
            node,
            metrics,
            subs: Mutex::new(HashMap::new()),
            tasks,
            shutdown,
        }
    }

    /// Hands a payload to the relay; false (counted) when it was dropped.
    pub(crate) fn send(&self, doc_id: i64, payload: Vec<u8>) -> bool {
        if self.relay.send(doc_id, Bytes::from(payload)) {
            self.metrics.relay_sent.inc();
            true
        } else {
            self.metrics.relay_dropped.inc();
            tracing::debug!(
                doc = doc_id,
                "relay refused a message; the document will resync"
            );
            false
        }
    }

    /// Subscribes to `doc_id` (if this node is not already) and returns once the
    /// subscription is active. Dropping the guard releases this use of it.
    pub(crate) async fn subscribe(self: &Arc<Self>, doc_id: i64) -> Result<Subscription, String> {
        let gate = {
            let mut subs = self.subs.lock().expect("subscriptions lock poisoned");
            let e = subs.entry(doc_id).or_insert_with(|| SubEntry {
                refs: 0,
                gate: Arc::new(tokio::sync::Mutex::new(false)),
            });
            e.refs += 1;
            e.gate.clone()
        };
        // From here on the guard owns the reference, also if subscribing fails.
        let guard = Subscription {
            peers: self.clone(),
            doc_id,
        };
        let mut active = gate.lock().await;
        if !*active {
            self.relay.subscribe(doc_id).await?;
            *active = true;
        }
        Ok(guard)
    }

    /// Drops one use of `doc_id`'s subscription; the last one unsubscribes, on a task.
    fn release(self: &Arc<Self>, doc_id: i64) {
        let gate = {
            let mut subs = self.subs.lock().expect("subscriptions lock poisoned");
            let Some(e) = subs.get_mut(&doc_id) else {
                return;
            };
            e.refs -= 1;
            if e.refs > 0 {
                return;
            }
            e.gate.clone()
        };
        if self.shutdown.is_cancelled() {
            // The node is stopping, and its broker with it.
            return;
        }
        let peers = self.clone();
        self.tasks.spawn(async move {
            let mut active = gate.lock().await;
            let unused = |peers: &Peers| {
                peers
                    .subs
                    .lock()
                    .expect("subscriptions lock poisoned")
                    .get(&doc_id)
                    .is_some_and(|e| e.refs == 0)
            };
            // Someone may have reopened the document meanwhile: then it stays subscribed.
            if *active && unused(&peers) {
                peers.relay.unsubscribe(doc_id).await;
                *active = false;
            }
            drop(active);
            let mut subs = peers.subs.lock().expect("subscriptions lock poisoned");
            if subs
                .get(&doc_id)
                .is_some_and(|e| e.refs == 0 && Arc::ptr_eq(&e.gate, &gate))
            {
                subs.remove(&doc_id);
            }
        });
    }
}

/// One loaded copy's use of its document's relay subscription.
pub(crate) struct Subscription {
    peers: Arc<Peers>,
    doc_id: i64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.peers.release(self.doc_id);
    }
}

/// Relay messages that arrived while the document was being read from the store, as
/// received (decoded ones hold yrs values that are not `Send`).
#[derive(Default)]
pub(crate) struct LoadBuffer {
    pub messages: Vec<Bytes>,
    bytes: usize,
    /// Something was dropped: only the sync request after loading can bring it.
    pub overflowed: bool,
}

impl LoadBuffer {
    pub(crate) fn push(&mut self, doc_id: i64, payload: Bytes) {
        if self.overflowed {
            return;
        }
        let size = payload.len();
        if self.messages.len() >= LOAD_BUFFER_MESSAGES || self.bytes + size > LOAD_BUFFER_BYTES {
            tracing::debug!(
                doc = doc_id,
                "relay buffer of a loading document overflowed; the sync after loading fills in"
            );
            self.messages = Vec::new();
            self.bytes = 0;
            self.overflowed = true;
            return;
        }
        self.bytes += size;
        self.messages.push(payload);
    }
}
