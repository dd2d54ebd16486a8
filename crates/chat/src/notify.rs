//! Notifications: `@mentions`, new direct rooms and room invites, stored per user and pushed
//! live on the user's personal channel `notifications:#{user_id}`.
//!
//! ## Delivery
//! A notification is stored first ([`Store::add_notifications`], one transaction per batch)
//! and then pushed with `Broker::broadcast` as an ephemeral publication (offset 0, no
//! history): `{"type": "notification", "notification": {...}}`. The push is a convenience
//! for connected clients; the durable list is `GET /v1/notifications`, which a client reads
//! when it (re)connects. The channel name carries `#{user_id}`, Centrifugo's user-limited
//! channel syntax, so only that user may subscribe (the server enforces `#` channels).
//!
//! ## Mentions, off the hot path
//! The chat writer commits a batch and broadcasts it; then, before answering the senders, it
//! offers each new message whose text contains `@` to a bounded queue ([`QUEUE`]) with a
//! non-blocking `try_reserve` (a full queue drops the mention check, counted and logged at
//! each power of two; the message is unaffected). One task takes what is waiting (up to
//! [`BATCH`] messages), parses `@username`s, resolves them among the room's members only
//! (the author's own mention is skipped), stores the batch's notifications in one
//! transaction, and pushes them. So mentions never delay an acknowledgement: the writer's
//! cost is a byte scan for `@` and, for messages that have one, a clone into the queue.
//! Edits do not notify (the original message did). What is still queued at shutdown is
//! dropped.
//!
//! Direct rooms and invites are rare, explicit REST actions: their notifications are
//! stored and pushed inline by the handler ([`crate::Chat::notify`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use switchboard_hub::Broker;
use switchboard_store::{Message, NewNotification, Notification, NotificationKind, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::events;

/// Messages waiting for their mentions to be resolved; beyond, checks are dropped.
pub const QUEUE: usize = 4096;
/// Messages the mention task takes from its queue at a time.
pub const BATCH: usize = 256;
/// Distinct `@username`s looked up per message at most; further ones are ignored.
pub const MENTIONS_MAX: usize = 16;
/// Characters of the message text kept in a mention's `data.excerpt`.
const EXCERPT_CHARS: usize = 200;

/// The personal channel of a user: `notifications:#{user_id}`.
pub fn channel_of(user_id: i64) -> String {
    format!("notifications:#{user_id}")
}

fn username_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// The distinct usernames a text mentions, lower-cased, in order of appearance, at most
/// [`MENTIONS_MAX`]. A mention is `@` not preceded by a username character (so
/// `a@example.com` is not one), followed by 3-32 username characters (`a-z 0-9 _ . -`, any
/// case); trailing `.` and `-` are punctuation, not part of the name (`hi @bob.`).
pub fn mentions(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut prev: Option<char> = None;
    for (i, c) in text.char_indices() {
        let after_word = prev.is_some_and(username_char);
        prev = Some(c);
        if c != '@' || after_word {
            continue;
        }
        let rest = &text[i + 1..];
        let end = rest.find(|c: char| !username_char(c)).unwrap_or(rest.len());
        let name = rest[..end].trim_end_matches(['.', '-']);
        if (3..=32).contains(&name.len()) {
            let name = name.to_ascii_lowercase();
            if !out.contains(&name) {
                out.push(name);
                if out.len() == MENTIONS_MAX {
                    break;
                }
            }
        }
    }
    out
}

/// A notification as clients see it (REST and the live push).
pub fn view(n: &Notification) -> Value {
    json!({
        "id": n.id,
        "kind": n.kind,
        "room_id": n.room_id,
        "message_id": n.message_id,
        "actor_id": n.actor_id,
        "data": n.data,
        "created_at": n.created_at,
        "read_at": n.read_at,
        "read": n.read_at.is_some(),
    })
}

/// Pushes stored notifications to their users' channels (ephemeral, offset 0).
pub(crate) async fn push(broker: &Arc<dyn Broker>, list: &[Notification]) {
    for n in list {
        let channel = channel_of(n.user_id);
        let data = json!({"type": "notification", "notification": view(n)});
        if let Err(e) = broker.broadcast(&channel, events::ephemeral(data)).await {
            // Stored: the client finds it in GET /v1/notifications.
            tracing::debug!(channel, error = %e, "notification push failed");
        }
    }
}

/// The writer's end of the mention queue. Never blocks.
pub(crate) struct MentionQueue {
    tx: mpsc::Sender<Message>,
    dropped: AtomicU64,
}

impl MentionQueue {
    /// Hands a committed message that may mention someone to the mention task, or drops
    /// the check (counted) if the queue is full.
    pub(crate) fn offer(&self, message: &Message) {
        if !message.text.contains('@') {
            return;
        }
        match self.tx.try_reserve() {
            Ok(permit) => permit.send(message.clone()),
            Err(mpsc::error::TrySendError::Full(())) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "mention queue full: mention checks dropped");
                }
            }
            Err(mpsc::error::TrySendError::Closed(())) => {}
        }
    }
}

/// The queue for the writer and the task to spawn.
pub(crate) fn start(
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    shutdown: CancellationToken,
) -> (MentionQueue, impl std::future::Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let queue = MentionQueue {
        tx,
        dropped: AtomicU64::new(0),
    };
    (queue, run(store, broker, rx, shutdown))
}

async fn run(
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    mut rx: mpsc::Receiver<Message>,
    shutdown: CancellationToken,
) {
    let mut buf = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut buf, BATCH) => n,
            _ = shutdown.cancelled() => break,
        };
        if n == 0 {
            break;
        }
        let mut notes = Vec::new();
        for m in buf.drain(..) {
            let names = mentions(&m.text);
            if names.is_empty() {
                continue;
            }
            let ids = match store.member_ids_by_username(m.room_id, &names).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(room = m.room_id, error = %e, "mentions: lookup failed");
                    continue;
                }
            };
            let excerpt: String = m.text.chars().take(EXCERPT_CHARS).collect();
            notes.extend(
                ids.into_iter()
                    .filter(|&u| u != m.user_id)
                    .map(|u| NewNotification {
                        user_id: u,
                        kind: NotificationKind::Mention,
                        room_id: Some(m.room_id),
                        message_id: Some(m.id),
                        actor_id: Some(m.user_id),
                        data: json!({"offset": m.offset, "excerpt": excerpt}),
                    }),
            );
        }
        if notes.is_empty() {
            continue;
        }
        match store.add_notifications(notes).await {
            Ok(stored) => push(&broker, &stored).await,
            Err(e) => tracing::warn!(error = %e, "mentions: storing notifications failed"),
        }
    }
    tracing::debug!("mention task stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mentions() {
        assert_eq!(mentions("hi @Bob and @carol_1."), vec!["bob", "carol_1"]);
        assert_eq!(mentions("@bob @BOB @bob"), vec!["bob"]);
        assert!(mentions("mail a@example.com").is_empty());
        assert!(mentions("@ab is too short, @ alone").is_empty());
        assert_eq!(mentions("(@dave-) @eve.x"), vec!["dave", "eve.x"]);
        assert_eq!(mentions("é@zed ü @zoë"), vec!["zed"]);
        let many: String = (0..40).map(|i| format!("@user{i} ")).collect();
        assert_eq!(mentions(&many).len(), MENTIONS_MAX);
        assert!(mentions(&"@".repeat(100)).is_empty());
        let long = format!("@{}", "a".repeat(33));
        assert!(mentions(&long).is_empty());
    }

    #[test]
    fn channel_is_user_limited() {
        assert_eq!(channel_of(42), "notifications:#42");
    }
}
