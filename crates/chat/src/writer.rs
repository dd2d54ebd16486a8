//! The group-commit writer: one task that owns every write to the rooms' streams.
//!
//! Sends queue here (bounded, see [`QUEUE`]); the task takes everything waiting, commits it in
//! one transaction, broadcasts the results in offset order, and only then answers the
//! senders. While one batch commits, the next accumulates, so the batch grows with load and
//! the commit window is the commit itself (~1.5-3 ms), with no timer. Because one task writes
//! and broadcasts, each room's publications leave in offset order.
//!
//! **Overflow policy:** the queue holds [`QUEUE`] jobs; a sender waits for room (backpressure
//! onto that client's connection task), so nothing is dropped.
//! **Durability:** a sender is answered after its transaction committed.
//! **Moderation:** after a batch is broadcast, its new messages (and each edit) are offered
//! to the moderation queue with a non-blocking `try_reserve`; a full queue drops the check
//! (counted), so moderation never delays a send (see [`crate::moderation`]).
//! **Mentions:** likewise, after the broadcast, new messages containing `@` are offered to
//! the mention queue (`try_reserve`, never waited on; see [`crate::notify`]).

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

pub(crate) enum Job {
    Message(
        NewMessage,
        oneshot::Sender<Result<AppendedMessage, StoreError>>,
    ),
    Event(NewEvent, oneshot::Sender<Result<RoomEvent, StoreError>>),
}

pub(crate) fn channel_of(room_id: i64) -> String {
    format!("chat:{room_id}")
}

pub(crate) async fn run(
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    mut rx: mpsc::Receiver<Job>,
    shutdown: CancellationToken,
    moderation: Option<moderation::Queue>,
    mentions: MentionQueue,
) {
    let mut pending: Option<Job> = None;
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
                let result = store.append_event(event).await;
                if let Ok(e) = &result {
                    broadcast(&broker, e).await;
                    if let (Some(q), EventKind::Edit, Some(m)) = (&moderation, e.kind, &e.message) {
                        q.offer(m, Instant::now(), true);
                    }
                }
                let _ = reply.send(result);
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
                // Checks every sender's membership, mute and ban in the same transaction.
                let results = store.append_sends(batch).await;
                let committed = Instant::now();
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
    tracing::debug!("chat writer stopped");
}

async fn broadcast(broker: &Arc<dyn Broker>, e: &RoomEvent) {
    let channel = channel_of(e.room_id);
    if let Err(err) = broker.broadcast(&channel, events::publication(e)).await {
        // Stored but not delivered live: subscribers recover it from the store.
        tracing::warn!(channel, error = %err, "broadcast failed");
    }
}
