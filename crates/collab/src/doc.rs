//! One loaded document: the yrs document, the connections that have it open, the awareness
//! states they introduced, and the two outboxes (fan-out and persistence).
//!
//! Everything is behind one std mutex, held only for in-memory work (applying an update,
//! encoding a diff, pushing to an outbox) and never across an await. Sends to connections
//! happen outside it, except the few per-connection replies written while joining (which
//! must leave before any later broadcast, and never block).
//!
//! **Fan-out.** An applied update is not sent at once: its effective part (what the document
//! did not know yet, `TransactionMut::encode_update_v1`) goes into the fan-out outbox, and the
//! document's task ([`crate::Collab`]) merges everything that arrived within one tick into a
//! single update, encodes it once and writes the same bytes to every connection. The tick
//! grows with the number of connections ([`Document::tick`]): with few editors an update
//! leaves at once; with a thousand, a fan-out costs a thousand writes, so updates are
//! gathered for up to `max_tick`, which keeps the cost per second flat instead of growing
//! with editors².
//!
//! **Persistence.** The same effective update goes into the persistence outbox, which the
//! node's persistence worker drains every `persist_interval` (see `persist.rs`).
//!
//! **Other nodes** (with a relay, see `relay.rs`). The fan-out also hands the tick's merged
//! *local* changes (and local awareness changes) to the relay. Updates from other nodes are
//! applied the same way but go to the fan-out outbox only: this node neither stores nor
//! relays them, and they do not count as a change for automatic versions. One exception
//! keeps "whoever accepted it stores it" true: while a local update waits in yrs for missing
//! predecessors, whatever integrates next is treated as local (stored and relayed again,
//! harmless since updates are idempotent), because it may carry that local update. Awareness
//! states from other nodes are kept without an owning connection and expire when not
//! renewed.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, IdSet, ReadTxn, StateVector, Transact, Update};

use crate::codec::{self, ClientUpdate, CloseCode};
use crate::relay::Peers;

/// How much the fan-out tick grows per open connection (see [`Document::tick`]). A write to
/// a loopback socket costs ~10 µs here, so at 20 µs per connection at most about half of the
/// tick goes to writing.
const TICK_PER_CONNECTION: Duration = Duration::from_micros(20);

/// A message to one or many connections, encoded once. The transport frames it once, on
/// first use, and every connection shares the framed bytes.
pub struct Outgoing {
    payload: Bytes,
    framed: OnceLock<Bytes>,
}

impl Outgoing {
    pub fn new(payload: Vec<u8>) -> Outgoing {
        Outgoing {
            payload: Bytes::from(payload),
            framed: OnceLock::new(),
        }
    }

    /// The y-websocket message.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The message framed by `frame`; the first caller frames, the rest share the result.
    pub fn framed(&self, frame: impl FnOnce(&[u8]) -> Bytes) -> &Bytes {
        self.framed.get_or_init(|| frame(&self.payload))
    }
}

/// Where a document connection's messages go: the transport's outbound path. Neither method
/// may block or await; a sink that cannot keep up applies its own overflow policy (the
/// server's closes the connection, and the client re-syncs when it reconnects).
pub trait DocSink: Send + Sync {
    fn send(&self, msg: &Outgoing);
    /// Asks the transport to close the connection with `code`.
    fn close(&self, code: CloseCode);
}

#[derive(Clone)]
pub(crate) struct ConnEntry {
    pub id: u64,
    pub user: Arc<str>,
    pub sink: Arc<dyn DocSink>,
}

struct Aware {
    clock: u32,
    json: Arc<str>,
    owner: Owner,
}

/// Who an awareness state belongs to.
#[derive(Clone, Copy, PartialEq)]
enum Owner {
    /// The local connection that introduced this client id (the one whose close removes it).
    Conn(u64),
    /// Another node's connection: removed when that node says so or when not renewed.
    Remote(Instant),
}

/// Awareness states of a document, at most (remote ones beyond it are ignored; local ones
/// are bounded per connection already).
const MAX_AWARENESS_STATES: usize = 4096;

/// What an update did to the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Applied {
    /// New content: it was queued for fan-out and persistence. Otherwise nothing was new
    /// (already known, or waiting for missing predecessors).
    pub changed: bool,
    /// Blocks that start past what the document has of their client were not integrated
    /// (see [`ClientUpdate::fit`]): whoever sent them has their predecessors and should be
    /// asked for them.
    pub cut: bool,
}

impl Applied {
    const UNCHANGED: Applied = Applied {
        changed: false,
        cut: false,
    };
    const CHANGED: Applied = Applied {
        changed: true,
        cut: false,
    };
}

/// What an update from another node did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remote {
    /// New content, queued for fan-out.
    Changed,
    /// New content that may carry a local update (see the module docs): queued for fan-out,
    /// the relay and persistence, like a local change.
    Local,
    Unchanged,
}

/// Why an update was not applied.
#[derive(Debug)]
pub(crate) enum ApplyError {
    /// The document was unloaded or deleted meanwhile: open it again.
    Closed,
    /// The CRDT refused the update.
    Invalid,
    /// Only part of the update continues what the document has, and a whole one was asked
    /// for; nothing was applied.
    Gap,
}

pub(crate) struct State {
    doc: Doc,
    /// Copy-on-write, so a fan-out clones one `Arc` under the lock and writes without it.
    conns: Arc<Vec<ConnEntry>>,
    awareness: HashMap<u64, Aware>,
    /// Fan-out outbox: local changes (also relayed) and changes from other nodes.
    out_updates: Vec<Vec<u8>>,
    out_remote: Vec<Vec<u8>>,
    /// Awareness changes to fan out: (clock, state, local: relay it too).
    out_awareness: HashMap<u64, (u32, Arc<str>, bool)>,
    pub unpersisted: Vec<Vec<u8>>,
    pub unpersisted_bytes: usize,
    /// Log entries and bytes stored (by this node) since the last snapshot, for compaction.
    pub log_entries: usize,
    pub log_bytes: usize,
    pub compacting: bool,
    /// Since when no connection has had the document open.
    idle_since: Option<Instant>,
    /// Changed since the last automatic version.
    pub changed_since_version: bool,
    /// Unloaded or deleted: no more joins or updates; reopen instead.
    pub closed: bool,
    /// When the last fan-out finished, and whether one is running (only one at a time, so
    /// every connection receives the merged updates in the same order).
    last_fan_out: Instant,
    fanning: bool,
    /// Peers should be asked for what this node lacks (a relay send failed, or an update
    /// waits for missing predecessors); the document's task sends the sync request.
    want_sync: bool,
    /// A local update waits for missing predecessors (see the module docs).
    local_pending: bool,
    /// Updates crossed nodes since the last periodic resync.
    relay_activity: bool,
}

pub struct Document {
    pub id: i64,
    state: Mutex<State>,
    /// Wakes the document's task: something waits in the fan-out outbox.
    pub(crate) wake: Notify,
    /// Where the next fan-out starts in the connection list.
    rotation: AtomicUsize,
    /// The node's relay, when documents span nodes.
    peers: Option<Arc<Peers>>,
}

impl Document {
    pub(crate) fn new(
        id: i64,
        doc: Doc,
        log_entries: usize,
        log_bytes: usize,
        peers: Option<Arc<Peers>>,
    ) -> Self {
        Document {
            id,
            state: Mutex::new(State {
                doc,
                conns: Arc::new(Vec::new()),
                awareness: HashMap::new(),
                out_updates: Vec::new(),
                out_remote: Vec::new(),
                out_awareness: HashMap::new(),
                unpersisted: Vec::new(),
                unpersisted_bytes: 0,
                log_entries,
                log_bytes,
                compacting: false,
                idle_since: Some(Instant::now()),
                changed_since_version: false,
                closed: false,
                last_fan_out: Instant::now(),
                fanning: false,
                want_sync: false,
                local_pending: false,
                relay_activity: false,
            }),
            wake: Notify::new(),
            rotation: AtomicUsize::new(0),
            peers,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("document lock poisoned")
    }

    /// Adds a connection and sends it the server's sync step 1 and the awareness states of
    /// everyone else. `false` if the document was closed meanwhile (open it again).
    pub(crate) fn join(&self, entry: ConnEntry) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        let sv = st.doc.transact().state_vector().encode_v1();
        entry.sink.send(&Outgoing::new(codec::sync_step1(&sv)));
        if !st.awareness.is_empty() {
            let msg = codec::awareness(
                st.awareness
                    .iter()
                    .map(|(id, a)| (*id, a.clock, &*a.json))
                    .collect::<Vec<_>>()
                    .into_iter(),
            );
            entry.sink.send(&Outgoing::new(msg));
        }
        Arc::make_mut(&mut st.conns).push(entry);
        st.idle_since = None;
        true
    }

    /// Removes a connection, and the awareness states it introduced (everyone else is told
    /// at the next tick).
    pub(crate) fn leave(&self, conn: u64) {
        let mut st = self.lock();
        Arc::make_mut(&mut st.conns).retain(|c| c.id != conn);
        let gone: Vec<u64> = st
            .awareness
            .iter()
            .filter(|(_, a)| a.owner == Owner::Conn(conn))
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            if let Some(a) = st.awareness.remove(id) {
                // A client may send clock u32::MAX: `+ 1` overflowed (a panic in this
                // connection's drop, under the lock) or wrapped to 0, a removal every peer
                // ignores. At an equal clock a removal still wins (y-protocols).
                st.out_awareness
                    .insert(*id, (a.clock.saturating_add(1), Arc::from("null"), true));
            }
        }
        if st.conns.is_empty() {
            st.idle_since = Some(Instant::now());
        }
        drop(st);
        if !gone.is_empty() {
            self.wake.notify_one();
        }
    }

    /// The server's sync step 1: its state vector, which a client answers with a step 2
    /// holding everything the server lacks.
    pub(crate) fn step1(&self) -> Outgoing {
        let sv = self.lock().doc.transact().state_vector().encode_v1();
        Outgoing::new(codec::sync_step1(&sv))
    }

    /// The diff a client with state vector `sv` misses, as sync step 2 (empty if the
    /// document had to close, see [`Document::encode_state`]).
    pub(crate) fn step2(&self, sv: &StateVector) -> Outgoing {
        let mut st = self.lock();
        let update = self
            .encode_state(&mut st, sv)
            .unwrap_or_else(|| Update::EMPTY_V1.to_vec());
        Outgoing::new(codec::sync_step2(&update))
    }

    /// What the document has past `sv`, encoded (v1); `None` if the document is closed, or
    /// had to close.
    ///
    /// yrs merges the updates it keeps pending (blocks whose predecessors are missing) into
    /// every such encoding, and some that it accepted it cannot merge back: the encoding
    /// panicked (found by the `ywebsocket` fuzz target: sync step 2, content reads and
    /// versions all failed, under this lock). A panic here closes the document like one
    /// while applying: its connections reconnect into a copy reloaded from the store, which
    /// never had the pending blocks.
    fn encode_state(&self, st: &mut State, sv: &StateVector) -> Option<Vec<u8>> {
        if st.closed {
            return None;
        }
        match catch_unwind(AssertUnwindSafe(|| {
            st.doc.transact().encode_state_as_update_v1(sv)
        })) {
            Ok(update) => Some(update),
            Err(_) => {
                tracing::error!(
                    doc = self.id,
                    "encoding the document panicked the CRDT; closing the document"
                );
                self.close_broken(st);
                None
            }
        }
    }

    /// Closes a document whose CRDT state is not to be trusted: every connection gets a
    /// transient close, and the next open loads a fresh copy from the store.
    fn close_broken(&self, st: &mut State) {
        st.closed = true;
        for c in st.conns.iter() {
            c.sink.close(codec::CLOSE_UNAVAILABLE);
        }
    }

    /// Applies an update and queues its effective part for fan-out (and the relay) and
    /// persistence. With `whole`, an update that only partly continues what the document
    /// has is refused ([`ApplyError::Gap`]); otherwise that part is applied (see
    /// [`Applied::cut`]).
    pub(crate) fn apply(&self, update: ClientUpdate, whole: bool) -> Result<Applied, ApplyError> {
        let mut st = self.lock();
        if st.closed {
            return Err(ApplyError::Closed);
        }
        let (effective, missing, parked, cut) = self.integrate(&mut st, update, whole)?;
        st.local_pending = (st.local_pending && missing) || parked;
        if (parked || cut) && self.peers.is_some() && !st.want_sync {
            // The client knows content this node lacks (it came from another node, say
            // before a reconnect): ask the peers for it.
            st.want_sync = true;
            self.wake.notify_one();
        }
        let changed = effective != Update::EMPTY_V1;
        if changed {
            self.queue(&mut st, effective);
        }
        Ok(Applied { changed, cut })
    }

    /// Applies an update another node accepted: queued for fan-out only (see the module
    /// docs for the one exception, which is then reported as [`Remote::Local`]).
    pub(crate) fn apply_remote(&self, update: ClientUpdate) -> Result<Remote, ApplyError> {
        let mut st = self.lock();
        if st.closed {
            return Err(ApplyError::Closed);
        }
        // Blocks past this node's clock (a relay message lost or late) wait like missing
        // predecessors: the peers are asked for what precedes them.
        let (effective, missing, parked, cut) = self.integrate(&mut st, update, false)?;
        let parked = parked || cut;
        let was_local_pending = st.local_pending;
        st.local_pending &= missing;
        // Only when this update is what waits: a gap that a sync could not fill (nobody
        // has the predecessors) must not make every later update ask again.
        let ask = parked && !st.want_sync;
        st.want_sync |= parked;
        let outcome = if effective == Update::EMPTY_V1 {
            Remote::Unchanged
        } else if was_local_pending {
            self.queue(&mut st, effective);
            Remote::Local
        } else {
            st.out_remote.push(effective);
            st.relay_activity = true;
            Remote::Changed
        };
        drop(st);
        if ask {
            // Predecessors are missing: a message was lost or is late. Ask the peers.
            self.wake.notify_one();
        }
        Ok(outcome)
    }

    /// Integrates an update: its effective part, whether parts of the document now wait
    /// for missing predecessors, whether parts of this update joined them, and whether
    /// blocks were cut off because they would have left a hole (with `whole`, such an
    /// update is refused instead).
    ///
    /// A panic inside the CRDT library while integrating leaves the document in an unknown
    /// state: the document is then closed (its connections get a transient close, reconnect
    /// and re-sync into a freshly loaded copy) rather than served half-applied.
    fn integrate(
        &self,
        st: &mut State,
        update: ClientUpdate,
        whole: bool,
    ) -> Result<(Vec<u8>, bool, bool, bool), ApplyError> {
        let before_sv = st.doc.transact().state_vector();
        let (update, cut) = update.fit(&before_sv).ok_or(ApplyError::Invalid)?;
        if cut && whole {
            return Err(ApplyError::Gap);
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut txn = st.doc.transact_mut();
            let before = txn.has_missing_updates().then(|| parked(&txn));
            txn.apply_update(update)?;
            let missing = txn.has_missing_updates();
            let joined = missing && {
                let (ins, del) = parked(&txn);
                let (ins0, del0) = before.unwrap_or_default();
                !ins.diff(&ins0).is_empty() || !del.diff(&del0).is_empty()
            };
            Ok::<_, yrs::error::UpdateError>((txn.encode_update_v1(), missing, joined))
        }));
        match result {
            Ok(Ok((effective, missing, joined))) => Ok((effective, missing, joined, cut)),
            Ok(Err(_)) if st.doc.transact().state_vector() != before_sv => {
                // yrs refused the update after integrating part of it, and that part stays:
                // shown here, but in no effective update, so never persisted or relayed.
                // Close the document: it reloads from the store, which never had it.
                tracing::warn!(
                    doc = self.id,
                    "update refused after partly applying; closing the document"
                );
                self.close_broken(st);
                Err(ApplyError::Invalid)
            }
            Ok(Err(_)) => Err(ApplyError::Invalid),
            Err(_) => {
                tracing::error!(
                    doc = self.id,
                    "update panicked the CRDT; closing the document"
                );
                self.close_broken(st);
                Err(ApplyError::Invalid)
            }
        }
    }

    /// Runs a local change (a server-side edit) of the text named `text` and queues it like a
    /// client update. The text is looked up before the transaction opens: yrs takes its own
    /// write lock to create a root type, so doing it inside `edit` would deadlock.
    pub(crate) fn change_text(
        &self,
        text: &str,
        edit: impl FnOnce(&mut yrs::TransactionMut<'_>, &yrs::TextRef),
    ) -> Result<Applied, ApplyError> {
        let mut st = self.lock();
        if st.closed {
            return Err(ApplyError::Closed);
        }
        let effective = {
            let t = st.doc.get_or_insert_text(text);
            let mut txn = st.doc.transact_mut();
            edit(&mut txn, &t);
            txn.encode_update_v1()
        };
        if effective == Update::EMPTY_V1 {
            return Ok(Applied::UNCHANGED);
        }
        self.queue(&mut st, effective);
        Ok(Applied::CHANGED)
    }

    fn queue(&self, st: &mut State, effective: Vec<u8>) {
        st.unpersisted_bytes += effective.len();
        st.unpersisted.push(effective.clone());
        st.out_updates.push(effective);
        st.changed_since_version = true;
    }

    /// After a change was queued: fans out at once, on the caller's task, when a tick has
    /// passed since the last fan-out (a quiet document pays no task hop); otherwise wakes the
    /// document's task, which fans out when the tick is over.
    pub(crate) fn fan_out_or_schedule(&self, max_tick: Duration) {
        let now_due = {
            let st = self.lock();
            !st.fanning && st.last_fan_out.elapsed() >= tick_for(st.conns.len(), max_tick)
        };
        if now_due {
            self.fan_out();
        } else {
            self.wake.notify_one();
        }
    }

    /// Applies a client's awareness update. `owned` is the set of client ids the connection
    /// introduced; it may hold at most `max_clients`.
    pub(crate) fn awareness(
        &self,
        conn: u64,
        owned: &mut Vec<u64>,
        update: AwarenessUpdate,
        max_clients: usize,
        max_state_bytes: usize,
    ) -> Result<(), CloseCode> {
        let mut st = self.lock();
        let mut changed = false;
        for (client, entry) in update.clients {
            let id = client.get();
            if entry.json.len() > max_state_bytes {
                return Err(codec::CLOSE_TOO_LARGE);
            }
            if !owned.contains(&id) {
                if owned.len() >= max_clients {
                    return Err(codec::CLOSE_FLOOD);
                }
                owned.push(id);
            }
            let removal = &*entry.json == "null";
            if let Some(cur) = st.awareness.get(&id) {
                // The y-protocols rule: a newer clock wins; at the same clock only a removal.
                if cur.clock > entry.clock || (cur.clock == entry.clock && !removal) {
                    continue;
                }
            } else if removal {
                continue;
            }
            if removal {
                st.awareness.remove(&id);
            } else {
                st.awareness.insert(
                    id,
                    Aware {
                        clock: entry.clock,
                        json: entry.json.clone(),
                        owner: Owner::Conn(conn),
                    },
                );
            }
            st.out_awareness.insert(id, (entry.clock, entry.json, true));
            changed = true;
        }
        drop(st);
        if changed {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Applies awareness changes another node relayed (same rules as a client's, without an
    /// owning connection). States over `max_state_bytes` are ignored.
    pub(crate) fn awareness_remote(&self, update: AwarenessUpdate, max_state_bytes: usize) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        let now = Instant::now();
        let mut changed = false;
        for (client, entry) in update.clients {
            let id = client.get();
            if entry.json.len() > max_state_bytes {
                continue;
            }
            let removal = &*entry.json == "null";
            if let Some(cur) = st.awareness.get(&id) {
                if cur.clock > entry.clock || (cur.clock == entry.clock && !removal) {
                    continue;
                }
            } else if removal || st.awareness.len() >= MAX_AWARENESS_STATES {
                continue;
            }
            if removal {
                st.awareness.remove(&id);
            } else {
                st.awareness.insert(
                    id,
                    Aware {
                        clock: entry.clock,
                        json: entry.json.clone(),
                        owner: Owner::Remote(now),
                    },
                );
            }
            st.out_awareness
                .insert(id, (entry.clock, entry.json, false));
            changed = true;
        }
        drop(st);
        if changed {
            self.wake.notify_one();
        }
    }

    /// Removes other nodes' awareness states not renewed for `timeout` (their node may
    /// have crashed without relaying the removals); local connections are told at the next
    /// tick.
    pub(crate) fn expire_remote_awareness(&self, timeout: Duration) {
        let mut st = self.lock();
        let expired: Vec<(u64, u32)> = st
            .awareness
            .iter()
            .filter(|(_, a)| matches!(a.owner, Owner::Remote(at) if at.elapsed() >= timeout))
            .map(|(id, a)| (*id, a.clock))
            .collect();
        for (id, clock) in &expired {
            st.awareness.remove(id);
            st.out_awareness
                .insert(*id, (clock.saturating_add(1), Arc::from("null"), false));
        }
        drop(st);
        if !expired.is_empty() {
            self.wake.notify_one();
        }
    }

    /// Every awareness state, for a client's query-awareness message.
    pub(crate) fn awareness_states(&self) -> Outgoing {
        let st = self.lock();
        Outgoing::new(codec::awareness(
            st.awareness
                .iter()
                .map(|(id, a)| (*id, a.clock, &*a.json))
                .collect::<Vec<_>>()
                .into_iter(),
        ))
    }

    /// When the next fan-out is due: a tick after the last one.
    pub(crate) fn next_fan_out(&self, max_tick: Duration) -> Instant {
        let st = self.lock();
        st.last_fan_out + tick_for(st.conns.len(), max_tick)
    }

    /// Sends what the outboxes hold: all updates since the last fan-out merged into one, and
    /// the awareness changes in one message, each encoded once for every connection. The
    /// local part of both also goes to the relay, the same merged update when nothing came
    /// from other nodes in this tick.
    pub(crate) fn fan_out(&self) -> usize {
        let (conns, local, remote, aware) = {
            let mut st = self.lock();
            if st.fanning
                || (st.out_updates.is_empty()
                    && st.out_remote.is_empty()
                    && st.out_awareness.is_empty())
            {
                return 0;
            }
            st.fanning = true;
            (
                st.conns.clone(),
                std::mem::take(&mut st.out_updates),
                std::mem::take(&mut st.out_remote),
                std::mem::take(&mut st.out_awareness),
            )
        };
        // Ok: one merged update; Err: parts that would not merge, sent one by one.
        let local = (!local.is_empty()).then(|| merge(local));
        let relayed = self.relay_out(local.as_ref(), &aware);
        let updates = match (local, remote.is_empty()) {
            (local, true) => local,
            (local, false) => {
                let mut all = remote;
                match local {
                    Some(Ok(u)) => all.push(u),
                    Some(Err(parts)) => all.extend(parts),
                    None => {}
                }
                Some(merge(all))
            }
        };
        let mut msgs = Vec::with_capacity(2);
        match &updates {
            Some(Ok(update)) => msgs.push(Outgoing::new(codec::sync_update(update))),
            Some(Err(parts)) => {
                msgs.extend(parts.iter().map(|u| Outgoing::new(codec::sync_update(u))))
            }
            None => {}
        }
        if !aware.is_empty() {
            msgs.push(Outgoing::new(codec::awareness(
                aware
                    .iter()
                    .map(|(id, (clock, json, _))| (*id, *clock, &**json))
                    .collect::<Vec<_>>()
                    .into_iter(),
            )));
        }
        // Each fan-out starts at the next connection, so that no client is always the last to
        // be written to (at 1,000 connections the last one waits ~10 ms longer than the first).
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % conns.len().max(1);
        let (tail, head) = conns.split_at(start);
        for c in head.iter().chain(tail) {
            for m in &msgs {
                c.sink.send(m);
            }
        }
        let more = {
            let mut st = self.lock();
            st.fanning = false;
            st.last_fan_out = Instant::now();
            if !relayed {
                // Peers miss something: the document's task asks them to sync.
                st.want_sync = true;
            }
            !st.out_updates.is_empty()
                || !st.out_remote.is_empty()
                || !st.out_awareness.is_empty()
                || !relayed
        };
        if more {
            // Changes that arrived meanwhile go out at the next tick.
            self.wake.notify_one();
        }
        conns.len() * msgs.len()
    }

    /// Hands a tick's local changes to the relay. False if the relay dropped any of them.
    fn relay_out(
        &self,
        local: Option<&Result<Vec<u8>, Vec<Vec<u8>>>>,
        aware: &HashMap<u64, (u32, Arc<str>, bool)>,
    ) -> bool {
        let Some(peers) = &self.peers else {
            return true;
        };
        let mut ok = true;
        match local {
            Some(Ok(update)) => ok &= peers.send(self.id, codec::relay_update(peers.node, update)),
            Some(Err(parts)) => {
                for update in parts {
                    ok &= peers.send(self.id, codec::relay_update(peers.node, update));
                }
            }
            None => {}
        }
        if local.is_some() {
            self.lock().relay_activity = true;
        }
        let mine: Vec<(u64, u32, &str)> = aware
            .iter()
            .filter(|(_, (_, _, local))| *local)
            .map(|(id, (clock, json, _))| (*id, *clock, &**json))
            .collect();
        if !mine.is_empty() {
            ok &= peers.send(
                self.id,
                codec::relay_awareness(peers.node, mine.into_iter()),
            );
        }
        ok
    }

    /// Whether the document should ask its peers to sync.
    pub(crate) fn wants_sync(&self) -> bool {
        self.lock().want_sync
    }

    /// Asks for a sync request at the task's next chance.
    pub(crate) fn ask_sync(&self) {
        self.lock().want_sync = true;
        self.wake.notify_one();
    }

    /// Whether updates crossed nodes since the last call.
    pub(crate) fn take_relay_activity(&self) -> bool {
        std::mem::take(&mut self.lock().relay_activity)
    }

    /// Sends a sync request with the document's state vector ("send me what I lack"), and
    /// this node's awareness states (in case some were dropped too). If the relay drops
    /// either, the document asks again later.
    pub(crate) fn send_sync_request(&self) {
        let Some(peers) = &self.peers else {
            return;
        };
        let sv = {
            let mut st = self.lock();
            st.want_sync = false;
            let sv = st.doc.transact().state_vector().encode_v1();
            sv
        };
        let sent = peers.send(self.id, codec::relay_sync_request(peers.node, &sv));
        if !(sent && self.send_local_awareness()) {
            self.lock().want_sync = true;
        }
    }

    /// Answers node `to`, whose state vector is `sv`, with what it lacks. A reply to a
    /// request also carries this node's state vector (so the requester sends back what this
    /// node lacks); a reply to a reply does not, and is not sent when it would be empty.
    pub(crate) fn send_sync_reply(&self, to: u64, sv: &StateVector, to_request: bool) {
        let Some(peers) = &self.peers else {
            return;
        };
        let (diff, own) = {
            let mut st = self.lock();
            let Some(diff) = self.encode_state(&mut st, sv) else {
                return;
            };
            let own = to_request.then(|| st.doc.transact().state_vector().encode_v1());
            (diff, own)
        };
        if !to_request && diff == Update::EMPTY_V1 {
            return;
        }
        let payload = codec::relay_sync_reply(peers.node, to, &diff, own.as_deref());
        if !peers.send(self.id, payload) {
            self.ask_sync();
        }
    }

    /// Relays the awareness states of this node's connections (so a node that just loaded
    /// the document shows their cursors before their next renewal). False if dropped.
    pub(crate) fn send_local_awareness(&self) -> bool {
        let Some(peers) = &self.peers else {
            return true;
        };
        let payload = {
            let st = self.lock();
            let mine: Vec<(u64, u32, &str)> = st
                .awareness
                .iter()
                .filter(|(_, a)| matches!(a.owner, Owner::Conn(_)))
                .map(|(id, a)| (*id, a.clock, &*a.json))
                .collect();
            if mine.is_empty() {
                return true;
            }
            codec::relay_awareness(peers.node, mine.into_iter())
        };
        peers.send(self.id, payload)
    }

    /// Takes the persistence outbox, merged into one update.
    pub(crate) fn take_unpersisted(&self) -> Option<Vec<u8>> {
        let mut st = self.lock();
        if st.unpersisted.is_empty() {
            return None;
        }
        st.unpersisted_bytes = 0;
        let parts = std::mem::take(&mut st.unpersisted);
        drop(st);
        Some(match merge(parts) {
            Ok(u) => u,
            // Our own effective updates always decode; merging them cannot fail.
            Err(parts) => yrs::merge_updates_v1(&parts).unwrap_or_else(|_| parts.concat()),
        })
    }

    /// Puts an update whose write failed back, to be retried first.
    pub(crate) fn restore_unpersisted(&self, update: Vec<u8>) {
        let mut st = self.lock();
        st.unpersisted_bytes += update.len();
        st.unpersisted.insert(0, update);
    }

    /// The document's whole state as one update; `None` if the document is closed, or had
    /// to close (see [`Document::encode_state`]).
    pub(crate) fn state_update(&self) -> Option<Vec<u8>> {
        let mut st = self.lock();
        self.encode_state(&mut st, &StateVector::default())
    }

    /// Reads the document.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Doc) -> T) -> T {
        let st = self.lock();
        f(&st.doc)
    }

    pub(crate) fn connections(&self) -> Arc<Vec<ConnEntry>> {
        self.lock().conns.clone()
    }

    /// Closes the document if nobody has had it open for `after` and nothing is left to
    /// write; one check under the lock, so no connection can join in between.
    pub(crate) fn close_if_idle(&self, after: Duration) -> bool {
        let mut st = self.lock();
        let idle = st.conns.is_empty()
            && st.unpersisted.is_empty()
            && !st.compacting
            && st.idle_since.is_some_and(|t| t.elapsed() >= after);
        if idle {
            st.closed = true;
        }
        idle
    }

    /// Closes the document: every connection gets `code`, later joins and updates fail.
    pub(crate) fn close(&self, code: Option<CloseCode>, drop_unpersisted: bool) {
        let mut st = self.lock();
        st.closed = true;
        if drop_unpersisted {
            st.unpersisted.clear();
            st.unpersisted_bytes = 0;
        }
        if let Some(code) = code {
            for c in st.conns.iter() {
                c.sink.close(code);
            }
        }
    }
}

/// Up to this many connections a document fans every change out at once: a fan-out then
/// costs well under a millisecond, and gathering would only add latency.
const GATHER_ABOVE_CONNECTIONS: usize = 64;

/// How long updates are gathered before one fan-out, for `conns` connections.
fn tick_for(conns: usize, max_tick: Duration) -> Duration {
    if conns <= GATHER_ABOVE_CONNECTIONS {
        return Duration::ZERO;
    }
    (TICK_PER_CONNECTION * conns as u32).min(max_tick)
}

/// What waits in yrs for missing predecessors: inserted ids and deleted ids.
fn parked(txn: &impl ReadTxn) -> (IdSet, IdSet) {
    let store = ReadTxn::store(txn);
    (
        store
            .pending_update()
            .map(|p| p.update.insertions(true))
            .unwrap_or_default(),
        store.pending_ds().cloned().unwrap_or_default(),
    )
}

/// One update from several; the parts back if any does not decode.
fn merge(mut parts: Vec<Vec<u8>>) -> Result<Vec<u8>, Vec<Vec<u8>>> {
    if parts.len() == 1 {
        return Ok(parts.pop().expect("one part"));
    }
    let decoded: Result<Vec<Update>, _> = parts.iter().map(|p| Update::decode_v1(p)).collect();
    match decoded {
        Ok(updates) => Ok(Update::merge_updates(updates).encode_v1()),
        Err(_) => Err(parts),
    }
}
