//! Collaborative documents: Yjs documents kept in memory while open, synced with y-websocket
//! clients, persisted to the store in batches, compacted, versioned and unloaded when idle.
//! No sockets and no HTTP: the server hands each connection a [`DocSink`] and feeds its
//! frames to a [`DocConnection`].
//!
//! # Layout
//! - `codec`: the y-websocket messages and the close codes.
//! - `doc`: one loaded [`Document`]: the yrs doc, its connections, awareness, the outboxes.
//! - `session`: [`DocConnection`], one client's session (permissions, awareness limits).
//! - `persist`: the node's persistence worker (group commit, compaction).
//! - `relay`: the [`Relay`] trait (documents across nodes, over the server's broker), the
//!   node's subscriptions and the buffer of a loading document.
//! - `fuzzing` (hidden): a store-less document session for the fuzz targets in `fuzz/`.
//! - here: [`Collab`], the registry (load once, unload when idle), each document's task
//!   (fan-out ticks, automatic versions, unloading), and the operations REST needs.
//!
//! # Guarantees
//! - **Load once.** The first connection to a document loads its snapshot and log; every
//!   concurrent opener waits for that one load, and nobody is served before it finishes.
//! - **Durability window.** An applied update is in the store within `persist_interval`
//!   plus one commit (see `persist`). A graceful shutdown writes everything. After a crash
//!   the last window may be missing from the store, but every connected client still holds
//!   it and sends it back when it re-syncs (sync step 2), which makes the document whole.
//! - **Several nodes** (with [`Collab::set_relay`]). Every node holding a document relays
//!   its local changes, merged per fan-out tick, and its connections' awareness; it applies
//!   and fans out the other nodes' changes without storing or relaying them again (the node
//!   that accepted an update stores it, once). Lost relay messages heal by sync requests
//!   (see `relay`). Loading subscribes first, then reads the store, then applies what was
//!   relayed meanwhile, then asks the peers for what they hold but have not stored.
//!   Another node's cursors disappear when it relays their removal, or 30 s after their
//!   last renewal when it crashed. Automatic versions count local changes only. Deleting a document and disconnecting a user stay
//!   node-local: the server broadcasts those.
//! - **Viewers never write.** Their updates are not applied, stored or relayed.
//! - **Bounded memory.** A document nobody has open for `unload_after` is written out and
//!   dropped. Per connection: at most `max_awareness_clients` awareness ids, states of at
//!   most `max_awareness_state_bytes`, `awareness_rate` messages per second; updates of at
//!   most `max_update_bytes`. Overflow closes the connection with a 44xx code (see `codec`).
//!   Per document: a loading document buffers at most 1,024 relay messages or 4 MiB
//!   (overflow: dropped, the sync after loading fills in), at most 4,096 awareness states.
//!
//! **Versions and garbage collection.** yrs garbage-collects deleted content, so an old
//! state cannot be rebuilt from the live document. A version therefore stores the whole
//! encoded state at the time it was taken (its `size` in bytes): restoring needs nothing
//! but that copy, and the live document keeps collecting garbage. The price is storage, one
//! full copy per version; automatic versions are pruned to the newest `auto_versions_kept`,
//! named ones are kept until the document is deleted.

pub mod codec;
mod doc;
#[doc(hidden)]
pub mod fuzzing;
mod persist;
mod relay;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use switchboard_store::{DocVersion, NewDocVersion, Store, StoreError};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use yrs::types::ToJson;
use yrs::{GetString, Text, Transact};

pub use codec::CloseCode;
pub use doc::{DocSink, Document, Outgoing};
pub use relay::Relay;
pub use session::{Access, DocConnection};

use codec::RelayBody;
use relay::{LoadBuffer, Peers, Subscription};

/// The Y.Text that the `text` format, text appends and restores work on.
pub const TEXT_NAME: &str = "content";

/// Tuning; see the README's `[docs]` section.
#[derive(Debug, Clone)]
pub struct CollabConfig {
    /// How often the persistence worker writes (the durability window). At most 100 ms.
    pub persist_interval: Duration,
    /// Compact a document's log into a snapshot past this many bytes...
    pub compact_bytes: usize,
    /// ...or this many entries.
    pub compact_updates: usize,
    /// Unload a document nobody has had open for this long.
    pub unload_after: Duration,
    /// Largest update (or awareness message) a client may send.
    pub max_update_bytes: usize,
    /// Upper bound of the fan-out tick (updates gathered into one broadcast).
    pub max_tick: Duration,
    /// Awareness messages per second per connection, and the burst allowed.
    pub awareness_rate: u32,
    pub awareness_burst: u32,
    /// Awareness client ids one connection may introduce.
    pub max_awareness_clients: usize,
    /// Largest awareness state (JSON) of one client.
    pub max_awareness_state_bytes: usize,
    /// Take an automatic version of a changed document this often; zero: never.
    pub auto_version_interval: Duration,
    /// Automatic versions kept per document (named ones are always kept).
    pub auto_versions_kept: u32,
}

impl Default for CollabConfig {
    fn default() -> Self {
        CollabConfig {
            persist_interval: Duration::from_millis(50),
            compact_bytes: 1 << 20,
            compact_updates: 1000,
            unload_after: Duration::from_secs(30),
            max_update_bytes: 1 << 20,
            max_tick: Duration::from_millis(20),
            awareness_rate: 30,
            awareness_burst: 60,
            max_awareness_clients: 8,
            max_awareness_state_bytes: 8 * 1024,
            auto_version_interval: Duration::from_secs(600),
            auto_versions_kept: 20,
        }
    }
}

/// Prometheus handles, registered by the server.
#[derive(Clone)]
pub struct CollabMetrics {
    pub loaded: IntGauge,
    pub connections: IntGauge,
    pub updates: IntCounter,
    pub persisted: IntCounter,
    pub persist_errors: IntCounter,
    pub persist_seconds: Histogram,
    pub compactions: IntCounter,
    pub load_seconds: Histogram,
    /// Relay messages handed to the relay, taken in from other nodes, refused by the relay's
    /// hand-off (each makes the document resync), and received but malformed (dropped).
    pub relay_sent: IntCounter,
    pub relay_received: IntCounter,
    pub relay_dropped: IntCounter,
    pub relay_malformed: IntCounter,
}

impl CollabMetrics {
    pub fn new(registry: &Registry) -> CollabMetrics {
        let m = CollabMetrics {
            loaded: IntGauge::new("switchboard_docs_loaded", "Documents loaded in memory")
                .expect("metric"),
            connections: IntGauge::new("switchboard_doc_connections", "Open document connections")
                .expect("metric"),
            updates: IntCounter::new(
                "switchboard_doc_updates_total",
                "Document updates applied that changed a document",
            )
            .expect("metric"),
            persisted: IntCounter::new(
                "switchboard_doc_updates_persisted_total",
                "Merged document updates written to the store",
            )
            .expect("metric"),
            persist_errors: IntCounter::new(
                "switchboard_doc_persist_errors_total",
                "Failed writes of document updates (retried)",
            )
            .expect("metric"),
            persist_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "switchboard_doc_persist_seconds",
                    "Time to commit one batch of document updates",
                )
                .buckets(vec![
                    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
            )
            .expect("metric"),
            compactions: IntCounter::new(
                "switchboard_doc_compactions_total",
                "Document logs compacted into snapshots",
            )
            .expect("metric"),
            load_seconds: Histogram::with_opts(
                HistogramOpts::new("switchboard_doc_load_seconds", "Time to load one document")
                    .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            )
            .expect("metric"),
            relay_sent: IntCounter::new(
                "switchboard_doc_relay_sent_total",
                "Document relay messages handed to the broker",
            )
            .expect("metric"),
            relay_received: IntCounter::new(
                "switchboard_doc_relay_received_total",
                "Document relay messages from other nodes taken in",
            )
            .expect("metric"),
            relay_dropped: IntCounter::new(
                "switchboard_doc_relay_dropped_total",
                "Document relay messages the broker hand-off dropped (healed by a sync request)",
            )
            .expect("metric"),
            relay_malformed: IntCounter::new(
                "switchboard_doc_relay_malformed_total",
                "Document relay payloads that did not decode (dropped)",
            )
            .expect("metric"),
        };
        for c in [
            Box::new(m.loaded.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.connections.clone()),
            Box::new(m.updates.clone()),
            Box::new(m.persisted.clone()),
            Box::new(m.persist_errors.clone()),
            Box::new(m.persist_seconds.clone()),
            Box::new(m.compactions.clone()),
            Box::new(m.load_seconds.clone()),
            Box::new(m.relay_sent.clone()),
            Box::new(m.relay_received.clone()),
            Box::new(m.relay_dropped.clone()),
            Box::new(m.relay_malformed.clone()),
        ] {
            registry.register(c).expect("register metric");
        }
        m
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollabError {
    #[error("no such document")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    #[error("the database is unavailable")]
    Unavailable,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for CollabError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => CollabError::NotFound,
            StoreError::Invalid(m) => CollabError::Invalid(m),
            StoreError::Unavailable(_) => CollabError::Unavailable,
            other => CollabError::Internal(other.to_string()),
        }
    }
}

impl CollabError {
    /// The close code for a connection that could not open the document.
    pub fn close_code(&self) -> CloseCode {
        match self {
            CollabError::NotFound => codec::CLOSE_NOT_FOUND,
            _ => codec::CLOSE_UNAVAILABLE,
        }
    }
}

/// How a document's content is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Y.Text named [`TEXT_NAME`].
    Text,
    /// Every root type as JSON.
    Json,
    /// The whole state as one Yjs update (v1).
    Update,
}

pub enum Content {
    Text(String),
    Json(serde_json::Value),
    Update(Vec<u8>),
}

/// A registry slot: the document once loaded. Concurrent openers wait on the same cell.
struct Slot {
    cell: OnceCell<Arc<Document>>,
    /// Where relay messages for the document go: a buffer while it loads, then the document.
    inbox: Mutex<Inbox>,
}

enum Inbox {
    Loading(LoadBuffer),
    Ready(Arc<Document>),
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    config: CollabConfig,
    metrics: CollabMetrics,
    docs: Mutex<HashMap<i64, Arc<Slot>>>,
    dirty: persist::Dirty,
    /// Serializes flushes (the worker's and an explicit [`Collab::flush`]).
    flush_lock: tokio::sync::Mutex<()>,
    next_conn: AtomicU64,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// This node's id in relay messages (random at start).
    node: u64,
    /// Set once by [`Collab::set_relay`]; unset, the node is alone.
    peers: OnceLock<Arc<Peers>>,
}

impl Inner {
    pub(crate) fn mark_dirty(&self, doc: &Arc<Document>) {
        self.dirty.mark(doc);
    }

    pub(crate) fn dirty_docs(&self) -> Vec<Arc<Document>> {
        self.dirty.take()
    }
}

/// The node's documents. Cheap to clone.
#[derive(Clone)]
pub struct Collab {
    inner: Arc<Inner>,
}

impl Collab {
    /// Starts the persistence worker on `tasks`; it stops (after a final write) when
    /// `shutdown` fires.
    pub fn start(
        store: Arc<dyn Store>,
        config: CollabConfig,
        metrics: CollabMetrics,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Collab {
        let inner = Arc::new(Inner {
            store,
            config,
            metrics,
            docs: Mutex::new(HashMap::new()),
            dirty: persist::Dirty::default(),
            flush_lock: tokio::sync::Mutex::new(()),
            next_conn: AtomicU64::new(1),
            tasks: tasks.clone(),
            shutdown,
            node: rand::random(),
            peers: OnceLock::new(),
        });
        tasks.spawn(persist::run(inner.clone()));
        Collab { inner }
    }

    pub fn config(&self) -> &CollabConfig {
        &self.inner.config
    }

    /// Makes this node one of several: documents it loads relay their changes and awareness
    /// to the other nodes holding them, and apply theirs (see `relay`). Call it once, at
    /// start, before any document opens; documents already loaded stay node-local until
    /// they unload. A second call is ignored.
    pub fn set_relay(&self, relay: Arc<dyn Relay>) {
        let inner = &self.inner;
        let peers = Peers::new(
            relay,
            inner.node,
            inner.metrics.clone(),
            inner.tasks.clone(),
            inner.shutdown.clone(),
        );
        if inner.peers.set(Arc::new(peers)).is_err() {
            tracing::warn!("Collab::set_relay called twice; keeping the first relay");
            return;
        }
        if self.loaded() > 0 {
            tracing::warn!("Collab::set_relay called with documents loaded; they stay node-local");
        }
        tracing::debug!(node = inner.node, "documents relay across nodes");
    }

    /// A relay message for `doc_id` from the broker (see [`Relay::subscribe`]). Never blocks
    /// or awaits: it applies the message to the loaded document (a short lock, like a
    /// client's update), or buffers it while the document loads. The node's own messages,
    /// sync replies meant for other nodes and messages for documents not loaded here are
    /// ignored; malformed payloads are logged, counted and dropped.
    pub fn handle_relay(&self, doc_id: i64, payload: Bytes) {
        let inner = &self.inner;
        let Some(peers) = inner.peers.get() else {
            return;
        };
        let Some((origin, to)) = codec::relay_route(&payload) else {
            return self.refuse_relay(doc_id, &payload);
        };
        if origin == peers.node || to.is_some_and(|to| to != peers.node) {
            return;
        }
        let slot = inner
            .docs
            .lock()
            .expect("registry lock poisoned")
            .get(&doc_id)
            .cloned();
        let Some(slot) = slot else {
            return;
        };
        let doc = match &mut *slot.inbox.lock().expect("inbox lock poisoned") {
            Inbox::Loading(buffer) => return buffer.push(doc_id, payload),
            Inbox::Ready(doc) => doc.clone(),
        };
        relay_in(inner, &doc, &payload);
    }

    fn refuse_relay(&self, doc_id: i64, payload: &[u8]) {
        refuse_relay(&self.inner, doc_id, payload)
    }

    /// Opens a session for `user` on a document, loading it if needed.
    pub async fn connect(
        &self,
        doc_id: i64,
        user: &str,
        access: Access,
        sink: Arc<dyn DocSink>,
    ) -> Result<DocConnection, CollabError> {
        let user: Arc<str> = Arc::from(user);
        loop {
            let doc = self.open(doc_id).await?;
            let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
            let inner = self.inner.clone();
            if let Some(c) = DocConnection::join(inner, doc, id, user.clone(), access, sink.clone())
            {
                return Ok(c);
            }
            // Unloaded between open and join: open it again.
        }
    }

    /// The loaded document, loading it once (concurrent callers share the load).
    async fn open(&self, doc_id: i64) -> Result<Arc<Document>, CollabError> {
        loop {
            let slot = self
                .inner
                .docs
                .lock()
                .expect("registry lock poisoned")
                .entry(doc_id)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        cell: OnceCell::new(),
                        inbox: Mutex::new(Inbox::Loading(LoadBuffer::default())),
                    })
                })
                .clone();
            match slot.cell.get_or_try_init(|| self.load(doc_id, &slot)).await {
                Ok(doc) => {
                    if doc.lock().closed {
                        self.forget(doc_id, &slot);
                        continue;
                    }
                    return Ok(doc.clone());
                }
                Err(e) => {
                    self.forget(doc_id, &slot);
                    return Err(e);
                }
            }
        }
    }

    /// Removes `slot` from the registry if it is still the one there.
    fn forget(&self, doc_id: i64, slot: &Arc<Slot>) {
        let mut docs = self.inner.docs.lock().expect("registry lock poisoned");
        if docs.get(&doc_id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            docs.remove(&doc_id);
        }
    }

    /// Loads a document into `slot`. With a relay: first subscribe, then read the store,
    /// then apply what arrived meanwhile (buffered in the slot), then ask the peers for what
    /// they accepted but had not stored yet (a sync request with the loaded state vector).
    /// An update is then either in the store as read, or relayed after the subscription
    /// started, or in some peer's memory: none is missed.
    async fn load(&self, doc_id: i64, slot: &Slot) -> Result<Arc<Document>, CollabError> {
        let started = Instant::now();
        let peers = self.inner.peers.get().cloned();
        let subscription: Option<Subscription> = match &peers {
            Some(p) => Some(p.subscribe(doc_id).await.map_err(|e| {
                tracing::warn!(doc = doc_id, error = %e, "subscribing to a document's relay failed");
                CollabError::Unavailable
            })?),
            None => None,
        };
        let content = self
            .inner
            .store
            .load_document(doc_id)
            .await?
            .ok_or(CollabError::NotFound)?;
        let log_entries = content.updates.len();
        let log_bytes = content.updates.iter().map(|u| u.data.len()).sum();
        // Integrating a large log is CPU work: keep it off the async workers.
        let doc = tokio::task::spawn_blocking(move || {
            let doc = yrs::Doc::new();
            {
                let mut txn = doc.transact_mut();
                let parts = content
                    .snapshot
                    .iter()
                    .map(|s| (content.snapshot_seq, s))
                    .chain(content.updates.iter().map(|u| (u.seq, &u.data)));
                for (seq, bytes) in parts {
                    let applied = codec::decode_update(bytes)
                        .ok_or_else(|| "does not decode".to_string())
                        .and_then(|u| txn.apply_update(u).map_err(|e| e.to_string()));
                    if let Err(e) = applied {
                        // Stored bytes that do not decode are skipped, loudly: the rest of
                        // the document stays usable.
                        tracing::error!(doc = doc_id, seq, error = %e, "skipping a stored update that does not apply");
                    }
                }
            }
            doc
        })
        .await
        .map_err(|e| CollabError::Internal(format!("loading panicked: {e}")))?;
        let document = Arc::new(Document::new(
            doc_id,
            doc,
            log_entries,
            log_bytes,
            peers.clone(),
        ));
        if peers.is_some() {
            let ready = Inbox::Ready(document.clone());
            let buffered = match std::mem::replace(
                &mut *slot.inbox.lock().expect("inbox lock poisoned"),
                ready,
            ) {
                Inbox::Loading(buffer) => buffer,
                Inbox::Ready(_) => LoadBuffer::default(),
            };
            let (n, overflowed) = (buffered.messages.len(), buffered.overflowed);
            for payload in &buffered.messages {
                relay_in(&self.inner, &document, payload);
            }
            document.send_sync_request();
            tracing::debug!(
                doc = doc_id,
                buffered = n,
                overflowed,
                "document joined its peers"
            );
        }
        self.inner.metrics.loaded.inc();
        self.inner
            .metrics
            .load_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(doc = doc_id, log_entries, elapsed = ?started.elapsed(), "document loaded");
        let inner = self.inner.clone();
        let task_doc = document.clone();
        self.inner
            .tasks
            .spawn(async move { run_document(inner, task_doc, subscription).await });
        Ok(document)
    }

    /// A loaded document's content, loading it if needed.
    pub async fn content(&self, doc_id: i64, format: Format) -> Result<Content, CollabError> {
        let doc = self.open(doc_id).await?;
        read_content(&doc, format).ok_or(CollabError::Unavailable)
    }

    /// Applies a Yjs update (v1) from a bot or the REST API, as if a client sent it.
    /// Returns whether it changed the document.
    pub async fn apply_update(&self, doc_id: i64, update: &[u8]) -> Result<bool, CollabError> {
        if update.len() > self.inner.config.max_update_bytes {
            return Err(CollabError::Invalid(format!(
                "update larger than {} bytes",
                self.inner.config.max_update_bytes
            )));
        }
        if codec::ClientUpdate::decode(update).is_none() {
            return Err(CollabError::Invalid(
                "not a Yjs update (v1 encoding)".into(),
            ));
        }
        self.change(doc_id, |doc| match codec::ClientUpdate::decode(update) {
            Some(u) => doc.apply(u, true),
            None => Err(doc::ApplyError::Invalid),
        })
        .await
    }

    /// Appends `text` at the end of the [`TEXT_NAME`] text.
    pub async fn append_text(&self, doc_id: i64, text: &str) -> Result<bool, CollabError> {
        self.change(doc_id, |doc| {
            doc.change_text(TEXT_NAME, |txn, t| {
                let len = t.len(txn);
                t.insert(txn, len, text);
            })
        })
        .await
    }

    /// Runs a change on the loaded document, reopening it if it was unloaded meanwhile.
    async fn change(
        &self,
        doc_id: i64,
        f: impl Fn(&Document) -> Result<doc::Applied, doc::ApplyError>,
    ) -> Result<bool, CollabError> {
        for _ in 0..3 {
            let doc = self.open(doc_id).await?;
            match f(&doc) {
                Ok(applied) if applied.changed => {
                    self.inner.metrics.updates.inc();
                    self.inner.mark_dirty(&doc);
                    doc.fan_out_or_schedule(self.inner.config.max_tick);
                    return Ok(true);
                }
                Ok(_) => return Ok(false),
                Err(doc::ApplyError::Invalid) => {
                    return Err(CollabError::Invalid("the update does not apply".into()))
                }
                Err(doc::ApplyError::Gap) => {
                    return Err(CollabError::Invalid(
                        "the update has blocks that start past the document's clock for \
                         their client: send the changes they follow first"
                            .into(),
                    ))
                }
                Err(doc::ApplyError::Closed) => continue,
            }
        }
        Err(CollabError::Unavailable)
    }

    /// Stores the document's current state as a version.
    pub async fn save_version(
        &self,
        doc_id: i64,
        label: &str,
        auto: bool,
        by: Option<i64>,
    ) -> Result<DocVersion, CollabError> {
        let doc = self.open(doc_id).await?;
        save_version(&self.inner, &doc, label, auto, by).await
    }

    /// A version's content.
    pub async fn version_content(
        &self,
        doc_id: i64,
        version_id: i64,
        format: Format,
    ) -> Result<(DocVersion, Content), CollabError> {
        let (version, state) = self
            .inner
            .store
            .doc_version(doc_id, version_id)
            .await?
            .ok_or(CollabError::NotFound)?;
        let doc = version_doc(&state)?;
        let tmp = Document::new(doc_id, doc, 0, 0, None);
        let content = read_content(&tmp, format).ok_or(CollabError::Unavailable)?;
        Ok((version, content))
    }

    /// Makes the [`TEXT_NAME`] text what it was in a version, as a new change that every
    /// connected client receives at once. History is kept: first the current state is saved
    /// as an automatic version ("before restoring ..."), then the text is replaced.
    pub async fn restore_version(
        &self,
        doc_id: i64,
        version_id: i64,
        by: Option<i64>,
    ) -> Result<DocVersion, CollabError> {
        let (version, state) = self
            .inner
            .store
            .doc_version(doc_id, version_id)
            .await?
            .ok_or(CollabError::NotFound)?;
        let old = version_doc(&state)?;
        let old_text = {
            let t = old.get_or_insert_text(TEXT_NAME);
            let txn = old.transact();
            t.get_string(&txn)
        };
        let label = format!("before restoring \"{}\"", version.label);
        self.save_version(doc_id, &label, true, by).await?;
        self.change(doc_id, |doc| {
            doc.change_text(TEXT_NAME, |txn, t| {
                let len = t.len(txn);
                if t.get_string(txn) != old_text {
                    t.remove_range(txn, 0, len);
                    t.insert(txn, 0, &old_text);
                }
            })
        })
        .await?;
        Ok(version)
    }

    /// After the document was deleted from the store: closes its connections with 4410 and
    /// drops it from memory without writing.
    pub fn deleted(&self, doc_id: i64) {
        let slot = self
            .inner
            .docs
            .lock()
            .expect("registry lock poisoned")
            .remove(&doc_id);
        if let Some(doc) = slot.and_then(|s| s.cell.get().cloned()) {
            doc.close(Some(codec::CLOSE_DELETED), true);
            doc.wake.notify_one();
        }
    }

    /// Closes `user`'s connections to a document with `code` (their access changed).
    pub fn disconnect_user(&self, doc_id: i64, user: &str, code: CloseCode) -> usize {
        let slot = self
            .inner
            .docs
            .lock()
            .expect("registry lock poisoned")
            .get(&doc_id)
            .cloned();
        let Some(doc) = slot.and_then(|s| s.cell.get().cloned()) else {
            return 0;
        };
        let conns = doc.connections();
        let mut n = 0;
        for c in conns.iter().filter(|c| &*c.user == user) {
            c.sink.close(code);
            n += 1;
        }
        n
    }

    /// Writes every pending update now. True when nothing was left unwritten.
    pub async fn flush(&self) -> bool {
        persist::flush(&self.inner).await
    }

    /// How many documents are loaded.
    pub fn loaded(&self) -> usize {
        self.inner
            .docs
            .lock()
            .expect("registry lock poisoned")
            .values()
            .filter(|s| s.cell.initialized())
            .count()
    }
}

fn version_doc(state: &[u8]) -> Result<yrs::Doc, CollabError> {
    let update = codec::decode_update(state)
        .ok_or_else(|| CollabError::Internal("a stored version does not decode".into()))?;
    let doc = yrs::Doc::new();
    doc.transact_mut()
        .apply_update(update)
        .map_err(|e| CollabError::Internal(format!("a stored version does not apply: {e}")))?;
    Ok(doc)
}

/// `None` if the document had to close (see `Document::state_update`).
fn read_content(doc: &Document, format: Format) -> Option<Content> {
    match format {
        Format::Text => Some(Content::Text(doc.read(|d| {
            let t = d.get_or_insert_text(TEXT_NAME);
            let txn = d.transact();
            t.get_string(&txn)
        }))),
        Format::Json => Some(Content::Json(doc.read(|d| {
            let txn = d.transact();
            serde_json::to_value(d.to_json(&txn)).unwrap_or(serde_json::Value::Null)
        }))),
        Format::Update => doc.state_update().map(Content::Update),
    }
}

async fn save_version(
    inner: &Inner,
    doc: &Arc<Document>,
    label: &str,
    auto: bool,
    by: Option<i64>,
) -> Result<DocVersion, CollabError> {
    let state = doc.state_update().ok_or(CollabError::Unavailable)?;
    let version = inner
        .store
        .create_doc_version(NewDocVersion {
            doc_id: doc.id,
            label: label.to_string(),
            auto,
            created_by: by,
            state,
        })
        .await?;
    if auto {
        inner
            .store
            .prune_auto_versions(doc.id, inner.config.auto_versions_kept)
            .await?;
    }
    Ok(version)
}

/// How often a document's task looks after unloading and automatic versions.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

/// A loaded document's task: fan-out ticks, automatic versions, and unloading when idle.
/// With a relay also sync requests, expiring other nodes' awareness states and the periodic
/// resync; it holds the document's relay subscription and releases it when it ends.
async fn run_document(inner: Arc<Inner>, doc: Arc<Document>, subscription: Option<Subscription>) {
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_version = Instant::now();
    let relayed = subscription.is_some();
    // Loading sent the first sync request.
    let mut last_sync = Instant::now();
    let mut last_resync = Instant::now();
    loop {
        let sync_at =
            (relayed && doc.wants_sync()).then(|| last_sync + relay::SYNC_REQUEST_SPACING);
        tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(sync_at.unwrap_or_else(Instant::now).into()), if sync_at.is_some() => {
                last_sync = Instant::now();
                doc.send_sync_request();
            }
            _ = doc.wake.notified() => {
                // A busy document gathers updates until a tick has passed since its last
                // fan-out (a quiet one was already sent by the connection that changed it).
                let due = doc.next_fan_out(inner.config.max_tick);
                if due > Instant::now() {
                    tokio::select! {
                        _ = inner.shutdown.cancelled() => break,
                        _ = tokio::time::sleep_until(due.into()) => {}
                    }
                }
                doc.fan_out();
                if doc.lock().closed {
                    break;
                }
            }
            _ = housekeeping.tick() => {
                if doc.lock().closed {
                    break;
                }
                let interval = inner.config.auto_version_interval;
                if !interval.is_zero()
                    && last_version.elapsed() >= interval
                    && doc.lock().changed_since_version
                {
                    doc.lock().changed_since_version = false;
                    last_version = Instant::now();
                    if let Err(e) = save_version(&inner, &doc, "auto", true, None).await {
                        tracing::warn!(doc = doc.id, error = %e, "automatic version failed");
                        doc.lock().changed_since_version = true;
                    }
                }
                if relayed {
                    doc.expire_remote_awareness(relay::REMOTE_AWARENESS_TIMEOUT);
                    if last_resync.elapsed() >= relay::RESYNC_INTERVAL {
                        last_resync = Instant::now();
                        if doc.take_relay_activity() {
                            doc.ask_sync();
                        }
                    }
                }
                if try_unload(&inner, &doc) {
                    break;
                }
            }
        }
    }
    inner.metrics.loaded.dec();
    // Unsubscribes unless another copy of the document (reloading) still uses it.
    drop(subscription);
}

fn refuse_relay(inner: &Inner, doc_id: i64, payload: &[u8]) {
    inner.metrics.relay_malformed.inc();
    tracing::warn!(
        doc = doc_id,
        bytes = payload.len(),
        "dropping a relay message that does not decode"
    );
}

/// Applies one message from another node (already routed: not ours, for us) to a loaded
/// document.
fn relay_in(inner: &Inner, doc: &Arc<Document>, payload: &[u8]) {
    let Ok(msg) = codec::decode_relay(payload) else {
        return refuse_relay(inner, doc.id, payload);
    };
    inner.metrics.relay_received.inc();
    match msg.body {
        RelayBody::Update(update) => remote_update(inner, doc, update),
        RelayBody::SyncReply {
            update,
            state_vector,
            ..
        } => {
            remote_update(inner, doc, update);
            if let Some(sv) = state_vector {
                doc.send_sync_reply(msg.origin, &sv, false);
            }
        }
        RelayBody::SyncRequest(sv) => {
            doc.send_sync_reply(msg.origin, &sv, true);
            if !doc.send_local_awareness() {
                doc.ask_sync();
            }
        }
        RelayBody::Awareness(update) => {
            doc.awareness_remote(update, inner.config.max_awareness_state_bytes)
        }
    }
}

fn remote_update(inner: &Inner, doc: &Arc<Document>, update: codec::ClientUpdate) {
    match doc.apply_remote(update) {
        Ok(doc::Remote::Changed) => doc.fan_out_or_schedule(inner.config.max_tick),
        Ok(doc::Remote::Local) => {
            inner.mark_dirty(doc);
            doc.fan_out_or_schedule(inner.config.max_tick);
        }
        Ok(doc::Remote::Unchanged) | Err(doc::ApplyError::Closed) => {}
        Err(doc::ApplyError::Invalid | doc::ApplyError::Gap) => {
            tracing::warn!(
                doc = doc.id,
                "an update from another node does not apply; dropped"
            )
        }
    }
}

/// Unloads the document if it has been idle long enough with nothing left to write.
fn try_unload(inner: &Inner, doc: &Arc<Document>) -> bool {
    let mut docs = inner.docs.lock().expect("registry lock poisoned");
    if !doc.close_if_idle(inner.config.unload_after) {
        return false;
    }
    if docs
        .get(&doc.id)
        .and_then(|s| s.cell.get())
        .is_some_and(|d| Arc::ptr_eq(d, doc))
    {
        docs.remove(&doc.id);
    }
    tracing::debug!(doc = doc.id, "document unloaded");
    true
}
