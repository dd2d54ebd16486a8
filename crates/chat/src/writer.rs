//! The group-commit writer: one task that owns every write to the rooms' streams.
//!
//! Sends queue here (bounded, see [`QUEUE`]); the task takes everything waiting and commits it
//! in one transaction. While one batch commits, the next accumulates, so the batch grows with
//! load and the commit window is the commit itself (~1.5-3 ms), with no timer.
//!
//! **Delivery.** A committed batch goes to a second task, the deliverer, which broadcasts its
//! results in offset order and only then answers the senders. The two run on different
//! worker threads, so batch N+1 commits while batch N is written to the sockets (a batch's
//! broadcast costs about a third of its commit on PostgreSQL; serialised, the two capped the
//! writer). Because one task commits and one task broadcasts, in commit order, each room's
//! publications leave in offset order.
//!
//! **Where it runs.** The deliverer runs on the server's runtime; the writer on the store's
//! write runtime when it has one (SQLite's `sqlite-writer` thread, `Store::writer_runtime`),
//! so that the end of each commit wakes it at once rather than after the busy workers.
//!
//! **Overflow policy:** the queue holds [`QUEUE`] jobs; a sender waits for room (backpressure
//! onto that client's connection task), so nothing is dropped. Between the writer and the
//! deliverer at most [`DELIVERY_QUEUE`] committed batches wait; a full one holds the writer
//! (backpressure), so a slow broadcast slows commits instead of piling up results.
//! **Durability:** a sender is answered after its transaction committed.
//! **Database unavailable:** a batch that fails with `Unavailable` (the store waited its
//! acquire timeout for a connection, or lost it) also fails everything queued behind it at
//! once, so a send is answered within about one attempt while the database is away.
//! Such a batch may still have committed (the connection dropped while COMMIT was in
//! flight): its senders' retries then come back as duplicates, which are not broadcast, and
//! live subscribers would skip those offsets. The writer remembers what it could not
//! confirm ([`Unconfirmed`]) and, after its next successful write, finds in the store what
//! did commit and broadcasts it before anything newer in those rooms. (This relies on being
//! the only writer of its rooms, as on a single node.)
//! **Moderation:** after a batch is broadcast, its new messages (and each edit) are offered
//! to the moderation queue with a non-blocking `try_reserve`; a full queue drops the check
//! (counted), so moderation never delays a send (see [`crate::moderation`]).
//! **Mentions:** likewise, after the broadcast, new messages containing `@` are offered to
//! the mention queue (`try_reserve`, never waited on; see [`crate::notify`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use switchboard_hub::Broker;
use switchboard_store::{
    AppendedMessage, EventKind, NewEvent, NewMessage, RoomEvent, Store, StoreError,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::events;
use crate::moderation;
use crate::notify::MentionQueue;

/// Jobs waiting for the writer.
pub const QUEUE: usize = 8192;
/// Most messages committed in one transaction.
pub const BATCH_MAX: usize = 512;
/// Committed batches waiting for the deliverer (see the module docs).
const DELIVERY_QUEUE: usize = 4;

pub(crate) enum Job {
    Message(
        NewMessage,
        oneshot::Sender<Result<AppendedMessage, StoreError>>,
    ),
    Event(NewEvent, oneshot::Sender<Result<RoomEvent, StoreError>>),
}

/// What the writer hands the deliverer, in commit order.
enum Delivery {
    /// Events of unconfirmed writes found committed: broadcast before anything newer.
    Found(Vec<RoomEvent>),
    Event(
        Result<RoomEvent, StoreError>,
        oneshot::Sender<Result<RoomEvent, StoreError>>,
    ),
    Batch {
        results: Vec<Result<AppendedMessage, StoreError>>,
        replies: Vec<oneshot::Sender<Result<AppendedMessage, StoreError>>>,
        committed: Instant,
    },
}

pub(crate) fn channel_of(room_id: i64) -> String {
    format!("chat:{room_id}")
}

pub(crate) async fn run(
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    rx: mpsc::Receiver<Job>,
    shutdown: CancellationToken,
    moderation: Option<moderation::Queue>,
    mentions: MentionQueue,
) {
    let (tx, deliveries) = mpsc::channel(DELIVERY_QUEUE);
    // A task of its own, so that it runs on another worker thread than the commits.
    let deliverer = tokio::spawn(deliver(broker, deliveries, moderation, mentions));
    let writing = write(store.clone(), rx, tx, shutdown);
    // On the store's own write runtime if it has one (SQLite), where each commit's result
    // wakes the writer at once instead of queueing for a busy worker.
    match store.writer_runtime() {
        Some(runtime) => {
            if let Err(e) = runtime.spawn(writing).await {
                tracing::error!(error = %e, "chat writer failed");
            }
        }
        None => writing.await,
    }
    // The sender is gone: the deliverer finishes what was committed, then ends.
    if let Err(e) = deliverer.await {
        tracing::error!(error = %e, "chat deliverer failed");
    }
    tracing::debug!("chat writer stopped");
}

/// The writer's half: commits, and hands every result to the deliverer in commit order.
async fn write(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Job>,
    out: mpsc::Sender<Delivery>,
    shutdown: CancellationToken,
) {
    let mut pending: Option<Job> = None;
    let mut unconfirmed = Unconfirmed::default();
    // Fails only once the deliverer is gone, which happens only after this task ends.
    let hand = |d: Delivery| {
        let out = out.clone();
        async move {
            if out.send(d).await.is_err() {
                tracing::error!("chat deliverer gone; results not delivered");
            }
        }
    };
    loop {
        let first = match pending.take() {
            Some(j) => j,
            None => tokio::select! {
                j = rx.recv() => match j { Some(j) => j, None => break },
                _ = shutdown.cancelled() => {
                    // Stop taking new jobs, finish the queued ones: they may be acknowledged.
                    rx.close();
                    match rx.recv().await { Some(j) => j, None => break }
                }
            },
        };
        match first {
            Job::Event(event, reply) => {
                let key = (event.room_id, Key::of_event(&event));
                let result = store.append_event(event).await;
                if let Err(StoreError::Unavailable(_)) = &result {
                    unconfirmed.add(key.0, key.1);
                }
                if let Ok(e) = &result {
                    if !unconfirmed.is_empty() {
                        let first = HashMap::from([(e.room_id, e.offset)]);
                        let found = unconfirmed.resolve(&*store, &first).await;
                        if !found.is_empty() {
                            hand(Delivery::Found(found)).await;
                        }
                    }
                }
                hand(Delivery::Event(result, reply)).await;
            }
            Job::Message(m, reply) => {
                let mut batch = vec![m];
                let mut replies = vec![reply];
                while batch.len() < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(Job::Message(m, r)) => {
                            batch.push(m);
                            replies.push(r);
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // Kept in case the commit's outcome cannot be known (see `Unconfirmed`).
                let keys: Vec<(i64, Key)> = batch
                    .iter()
                    .map(|m| (m.room_id, Key::of_message(m)))
                    .collect();
                // Checks every sender's membership, mute and ban in the same transaction.
                let results = store.append_sends(batch).await;
                let committed = Instant::now();
                let unavailable = !results.is_empty()
                    && results
                        .iter()
                        .all(|r| matches!(r, Err(StoreError::Unavailable(_))));
                if unavailable {
                    for (room, key) in keys {
                        unconfirmed.add(room, key);
                    }
                } else if !unconfirmed.is_empty() {
                    let mut first: HashMap<i64, i64> = HashMap::new();
                    for r in results.iter().flatten().filter(|r| !r.duplicate) {
                        let at = first.entry(r.message.room_id).or_insert(r.message.offset);
                        *at = (*at).min(r.message.offset);
                    }
                    let found = unconfirmed.resolve(&*store, &first).await;
                    if !found.is_empty() {
                        hand(Delivery::Found(found)).await;
                    }
                }
                hand(Delivery::Batch {
                    results,
                    replies,
                    committed,
                })
                .await;
                if unavailable {
                    fail_queued(&mut rx, &mut pending);
                }
            }
        }
    }
}

/// The deliverer's half: broadcasts each committed result in the order the writer committed
/// them, offers new messages to moderation and mentions, and then answers their senders.
async fn deliver(
    broker: Arc<dyn Broker>,
    mut rx: mpsc::Receiver<Delivery>,
    moderation: Option<moderation::Queue>,
    mentions: MentionQueue,
) {
    while let Some(d) = rx.recv().await {
        match d {
            Delivery::Found(events) => {
                for e in &events {
                    broadcast(&broker, e).await;
                }
            }
            Delivery::Event(result, reply) => {
                if let Ok(e) = &result {
                    broadcast(&broker, e).await;
                    if let (Some(q), EventKind::Edit, Some(m)) = (&moderation, e.kind, &e.message) {
                        q.offer(m, Instant::now(), true);
                    }
                }
                let _ = reply.send(result);
            }
            Delivery::Batch {
                results,
                replies,
                committed,
            } => {
                for r in results.iter().flatten() {
                    if !r.duplicate {
                        broadcast(&broker, &events::message_event(&r.message)).await;
                    }
                }
                if let Some(q) = &moderation {
                    for r in results.iter().flatten().filter(|r| !r.duplicate) {
                        q.offer(&r.message, committed, false);
                    }
                }
                // A byte scan for '@' and, for messages that have one, a non-blocking hand-off.
                for r in results.iter().flatten().filter(|r| !r.duplicate) {
                    mentions.offer(&r.message);
                }
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
        }
    }
}

/// Most writes [`Unconfirmed`] remembers; past it, more are dropped (and logged).
const UNCONFIRMED_MAX: usize = 4096;

/// What identifies a write in the store once it has committed.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    /// A message by its sender's `client_msg_id`, unique per user; without one, by its text.
    Message {
        user_id: i64,
        client_msg_id: Option<String>,
        text: Option<String>,
    },
    Event {
        kind: EventKind,
        message_id: i64,
        user_id: i64,
    },
}

impl Key {
    fn of_message(m: &NewMessage) -> Key {
        Key::Message {
            user_id: m.user_id,
            client_msg_id: m.client_msg_id.clone(),
            // Only keyless messages need their text to be recognised.
            text: m.client_msg_id.is_none().then(|| m.text.clone()),
        }
    }

    fn of_event(e: &NewEvent) -> Key {
        Key::Event {
            kind: e.kind,
            message_id: e.message_id,
            user_id: e.user_id,
        }
    }

    fn matches(&self, e: &RoomEvent) -> bool {
        match self {
            Key::Message {
                user_id,
                client_msg_id,
                text,
            } => {
                e.kind == EventKind::Message
                    && e.user_id == *user_id
                    && e.message.as_ref().is_some_and(|m| match client_msg_id {
                        Some(id) => m.client_msg_id.as_deref() == Some(id.as_str()),
                        None => text.as_deref() == Some(m.text.as_str()),
                    })
            }
            Key::Event {
                kind,
                message_id,
                user_id,
            } => e.kind == *kind && e.message_id == *message_id && e.user_id == *user_id,
        }
    }
}

/// Writes that failed as `Unavailable` and may nevertheless have committed, by room.
#[derive(Default)]
struct Unconfirmed {
    rooms: HashMap<i64, Vec<Key>>,
    count: usize,
}

impl Unconfirmed {
    fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    fn add(&mut self, room: i64, key: Key) {
        if self.count >= UNCONFIRMED_MAX {
            tracing::warn!(
                room,
                "chat writer: too many unconfirmed writes; not tracking this one"
            );
            return;
        }
        self.count += 1;
        self.rooms.entry(room).or_default().push(key);
    }

    /// Called after a write succeeded (so the database answers again), before its results
    /// go to the deliverer. `first` holds, per room, the lowest offset that write is about
    /// to broadcast. Since nothing was written between the failed writes and this one, what
    /// committed of them is among the room's last events below that offset (or below its
    /// top, for rooms the write did not touch): those that match are returned, in offset
    /// order per room, for the deliverer to broadcast first. A room whose lookup fails stays
    /// for the next time.
    async fn resolve(&mut self, store: &dyn Store, first: &HashMap<i64, i64>) -> Vec<RoomEvent> {
        let mut delivered = Vec::new();
        let rooms: Vec<i64> = self.rooms.keys().copied().collect();
        for room in rooms {
            let keys = &self.rooms[&room];
            let bound = match first.get(&room) {
                Some(&offset) => Ok(offset),
                None => store.room_position(room).await.map(|p| p.offset + 1),
            };
            let found = match bound {
                Ok(bound) => store.events_before(room, bound, keys.len() as u32).await,
                Err(e) => Err(e),
            };
            match found {
                Ok(events) => {
                    let before = delivered.len();
                    delivered.extend(
                        events
                            .into_iter()
                            .filter(|e| keys.iter().any(|k| k.matches(e))),
                    );
                    let found = delivered.len() - before;
                    if found > 0 {
                        tracing::info!(
                            room,
                            found,
                            "chat writer: delivering writes that committed although their \
                             transaction reported an error"
                        );
                    }
                    let n = self.rooms.remove(&room).map_or(0, |k| k.len());
                    self.count -= n;
                }
                // The room is gone: nothing to deliver.
                Err(StoreError::NotFound) => {
                    let n = self.rooms.remove(&room).map_or(0, |k| k.len());
                    self.count -= n;
                }
                Err(e) => {
                    tracing::warn!(room, error = %e, "chat writer: cannot check unconfirmed writes yet");
                }
            }
        }
        delivered
    }
}

/// After a batch failed because the database is unavailable: answers every job that queued
/// meanwhile with `Unavailable` at once (clients get the temporary error 100 and retry), so
/// no send waits out one failing attempt after another behind the single writer. The next
/// job to arrive tries the database again.
fn fail_queued(rx: &mut mpsc::Receiver<Job>, pending: &mut Option<Job>) {
    let why = || StoreError::Unavailable("the database is unavailable; retry later".into());
    let mut failed = 0usize;
    while let Some(job) = pending.take().or_else(|| rx.try_recv().ok()) {
        failed += 1;
        match job {
            Job::Message(_, reply) => {
                let _ = reply.send(Err(why()));
            }
            Job::Event(_, reply) => {
                let _ = reply.send(Err(why()));
            }
        }
    }
    if failed > 0 {
        tracing::debug!(
            failed,
            "chat writer: failed the queued writes while the database is unavailable"
        );
    }
}

async fn broadcast(broker: &Arc<dyn Broker>, e: &RoomEvent) {
    let channel = channel_of(e.room_id);
    if let Err(err) = broker.broadcast(&channel, events::publication(e)).await {
        // Stored but not delivered live: subscribers recover it from the store.
        tracing::warn!(channel, error = %err, "broadcast failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_store::testing::TestDatabase;
    use switchboard_store::{NewRoom, NewUser, RoomKind, UserRole};

    fn msg(room: i64, user: i64, cmid: Option<&str>, text: &str) -> NewMessage {
        NewMessage {
            room_id: room,
            user_id: user,
            client_msg_id: cmid.map(str::to_string),
            text: text.to_string(),
            reply_to: None,
        }
    }

    /// Writes reported as failed are found in the store, if and only if they committed, and
    /// delivered in offset order below what the next write broadcasts.
    #[tokio::test]
    async fn unconfirmed_writes_that_committed_are_found_and_delivered() {
        let db = TestDatabase::sqlite();
        let store = db.open().await;
        let user = store
            .create_user(NewUser {
                username: "u".into(),
                password_hash: String::new(),
                display_name: "u".into(),
                role: UserRole::User,
            })
            .await
            .unwrap()
            .id;
        let mut rooms = Vec::new();
        for name in ["a", "b"] {
            let r = store
                .create_room(NewRoom {
                    kind: RoomKind::Public,
                    name: name.into(),
                    created_by: user,
                })
                .await
                .unwrap();
            rooms.push(r.id);
        }
        let (a, b) = (rooms[0], rooms[1]);
        let append = |m: NewMessage| {
            let store = store.clone();
            async move { store.append_messages(vec![m]).await.remove(0).unwrap() }
        };
        append(msg(a, user, Some("old"), "already delivered")).await;

        // A batch that "failed": two of its messages committed (one without an id), one not.
        let mut unconfirmed = Unconfirmed::default();
        let failed = [
            msg(a, user, Some("x1"), "committed"),
            msg(a, user, None, "committed, no id"),
            msg(a, user, Some("x3"), "never committed"),
            msg(b, user, Some("y1"), "committed in b"),
        ];
        for m in &failed {
            unconfirmed.add(m.room_id, Key::of_message(m));
        }
        for m in [&failed[0], &failed[1], &failed[3]] {
            append(msg(
                m.room_id,
                m.user_id,
                m.client_msg_id.as_deref(),
                &m.text,
            ))
            .await;
        }
        // The next write: a new message in room a at offset 4 (b is not in it).
        let next = append(msg(a, user, Some("new"), "next")).await;
        assert_eq!(next.message.offset, 4);

        let first = HashMap::from([(a, next.message.offset)]);
        let found = unconfirmed.resolve(&*store, &first).await;
        let mut delivered: Vec<(i64, i64)> = found.iter().map(|e| (e.room_id, e.offset)).collect();
        delivered.sort();
        assert_eq!(delivered, vec![(a, 2), (a, 3), (b, 1)]);
        assert!(unconfirmed.is_empty());
        assert_eq!(unconfirmed.count, 0);

        // Keys match only their own event.
        let old = store.events(a, 0, 1).await.unwrap().remove(0);
        assert!(!Key::of_message(&failed[0]).matches(&old));
        assert!(Key::of_message(&msg(a, user, Some("old"), "")).matches(&old));
        store.close().await;
    }
}
