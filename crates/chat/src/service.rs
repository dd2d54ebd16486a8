//! The chat service: who may read and write a room, and the one write path to its stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_hub::{Broker, BrokerError, HistoryFilter, HistoryPage};
use switchboard_protocol::client::StreamPosition;
use switchboard_store::{
    EventKind, Member, MemberRole, Message, NewEvent, NewMessage, NewNotification, Notification,
    RoomEvent, Store, StoreError,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events;
use crate::moderation::{self, ModerationConfig};
use crate::notify;
use crate::writer::{self, Job};

/// Events one store read returns at most (the store's own cap).
const STORE_PAGE: u32 = 10_000;
/// Typing pushes per user and room: at most one per this interval.
const TYPING_INTERVAL: Duration = Duration::from_secs(1);
/// How long clients show "typing" after a push without another one.
pub const TYPING_TTL_MS: u64 = 5_000;
/// Typing throttle entries kept before old ones are swept (bounds the map).
const TYPING_ENTRIES_MAX: usize = 100_000;

#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Longest message text, in characters.
    pub max_message_chars: usize,
    /// The moderation pipeline that checks committed messages (see [`crate::moderation`]).
    pub moderation: ModerationConfig,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            max_message_chars: 4000,
            moderation: ModerationConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChatError {
    #[error("no such room or message")]
    NotFound,
    #[error("not allowed")]
    Forbidden,
    #[error("muted")]
    Muted,
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database is unreachable; retrying later may succeed.
    #[error("unavailable")]
    Unavailable,
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ChatError::NotFound,
            StoreError::Conflict(m) => ChatError::Conflict(m),
            StoreError::Invalid(m) => ChatError::Invalid(m),
            StoreError::Forbidden => ChatError::Forbidden,
            StoreError::Muted => ChatError::Muted,
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "chat: store unavailable");
                ChatError::Unavailable
            }
            other => ChatError::Internal(other.to_string()),
        }
    }
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct Send {
    pub text: String,
    pub client_msg_id: Option<String>,
    pub reply_to: Option<i64>,
}

/// The outcome of a send: the stored message, and whether it was a retry of an earlier one.
#[derive(Debug, Clone)]
pub struct Sent {
    pub message: Message,
    pub duplicate: bool,
}

struct Inner {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    writer: mpsc::Sender<Job>,
    config: ChatConfig,
    typing: Mutex<HashMap<(i64, i64), Instant>>,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Chat {
    inner: Arc<Inner>,
}

impl Chat {
    /// Starts the writer task on `tracker`, and the moderation task when moderation is
    /// enabled; the writer finishes the queued writes when `shutdown` fires.
    pub fn start(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        config: ChatConfig,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Chat {
        let (tx, rx) = mpsc::channel(writer::QUEUE);
        let moderation = config.moderation.enabled.then(|| {
            let (queue, pipeline) =
                moderation::start(&config.moderation, store.clone(), tx.clone());
            tracker.spawn(pipeline.run(shutdown.clone()));
            queue
        });
        let (mentions, mention_task) =
            notify::start(store.clone(), broker.clone(), shutdown.clone());
        tracker.spawn(mention_task);
        tracker.spawn(writer::run(
            store.clone(),
            broker.clone(),
            rx,
            shutdown,
            moderation,
            mentions,
        ));
        Chat {
            inner: Arc::new(Inner {
                store,
                broker,
                writer: tx,
                config,
                typing: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The channel of a room.
    pub fn channel(room_id: i64) -> String {
        writer::channel_of(room_id)
    }

    /// The room of a `chat:{id}` channel.
    pub fn room_of(channel: &str) -> Option<i64> {
        channel
            .strip_prefix("chat:")?
            .parse()
            .ok()
            .filter(|id| *id > 0)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The membership of `user_id` in `room_id`; `Forbidden` for a non-member, `NotFound`
    /// for a room that does not exist.
    pub async fn member(&self, room_id: i64, user_id: i64) -> Result<Member, ChatError> {
        match self.inner.store.member(room_id, user_id).await? {
            Some(m) => Ok(m),
            None => match self.inner.store.room(room_id).await? {
                Some(_) => Err(ChatError::Forbidden),
                None => Err(ChatError::NotFound),
            },
        }
    }

    /// Appends an edit, delete, removal or restore through the writer, so it is broadcast in
    /// offset order with everything else. The caller has checked permissions.
    pub(crate) async fn append_event(&self, event: NewEvent) -> Result<RoomEvent, ChatError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Event(event, tx), rx).await
    }

    fn validate_text(&self, text: &str) -> Result<(), ChatError> {
        if text.trim().is_empty() {
            return Err(ChatError::Invalid("text is empty".into()));
        }
        let max = self.inner.config.max_message_chars;
        if text.chars().count() > max {
            return Err(ChatError::Invalid(format!(
                "text is longer than {max} characters"
            )));
        }
        Ok(())
    }

    /// Sends a message: validated, deduplicated on `(user, client_msg_id)`, committed under
    /// the room's next offset, broadcast, then returned.
    ///
    /// Membership, mutes and bans are checked by the writer's transaction
    /// ([`Store::append_sends`]), not by a read here: the check costs one statement per
    /// batch instead of a query (and, on SQLite, two thread hops) per send, sees exactly
    /// what the append commits against, and needs no cache to keep in step with the write
    /// paths that change membership, on this node or any other. `NotFound` for a missing
    /// room, `Forbidden` for a non-member, `Muted` for a muted or banned sender.
    pub async fn send(&self, user_id: i64, room_id: i64, send: Send) -> Result<Sent, ChatError> {
        self.validate_text(&send.text)?;
        if let Some(id) = &send.client_msg_id {
            if id.is_empty() || id.len() > 128 {
                return Err(ChatError::Invalid(
                    "client_msg_id must be 1-128 bytes".into(),
                ));
            }
        }
        let (tx, rx) = oneshot::channel();
        let job = Job::Message(
            NewMessage {
                room_id,
                user_id,
                client_msg_id: send.client_msg_id,
                text: send.text,
                reply_to: send.reply_to,
            },
            tx,
        );
        self.submit(job, rx).await.map(|a| Sent {
            message: a.message,
            duplicate: a.duplicate,
        })
    }

    async fn submit<T>(
        &self,
        job: Job,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, ChatError> {
        self.inner
            .writer
            .send(job)
            .await
            .map_err(|_| ChatError::Internal("chat writer stopped".into()))?;
        match rx.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ChatError::Internal(
                "chat writer dropped the request".into(),
            )),
        }
    }

    /// Edits (author only) or deletes (author, room moderator or owner, or `admin`) a message.
    pub async fn change(
        &self,
        user_id: i64,
        is_admin: bool,
        message_id: i64,
        kind: EventKind,
        text: Option<String>,
    ) -> Result<Message, ChatError> {
        let msg = self
            .inner
            .store
            .message(message_id)
            .await?
            .ok_or(ChatError::NotFound)?;
        let member = self.inner.store.member(msg.room_id, user_id).await?;
        let author = msg.user_id == user_id && member.is_some();
        let moderator = member
            .as_ref()
            .is_some_and(|m| matches!(m.role, MemberRole::Owner | MemberRole::Moderator));
        let allowed = match kind {
            EventKind::Edit => author,
            EventKind::Delete => author || moderator || is_admin,
            _ => moderator || is_admin,
        };
        if !allowed {
            return Err(if member.is_some() || is_admin {
                ChatError::Forbidden
            } else {
                ChatError::NotFound
            });
        }
        if let Some(t) = &text {
            self.validate_text(t)?;
        }
        let (tx, rx) = oneshot::channel();
        let event = NewEvent {
            room_id: msg.room_id,
            message_id,
            user_id,
            kind,
            text,
            data: serde_json::Value::Null,
        };
        let e = self.submit(Job::Event(event, tx), rx).await?;
        e.message.ok_or(ChatError::NotFound)
    }

    /// Stores notifications (one transaction) and pushes each on its user's
    /// `notifications:#{user_id}` channel. For rare, explicit actions (a new direct room, an
    /// invite); mentions take the writer's asynchronous path (see [`crate::notify`]).
    pub async fn notify(
        &self,
        notifications: Vec<NewNotification>,
    ) -> Result<Vec<Notification>, ChatError> {
        let stored = self.inner.store.add_notifications(notifications).await?;
        notify::push(&self.inner.broker, &stored).await;
        Ok(stored)
    }

    /// Marks the room read up to `offset` and tells the room. Returns the stored position.
    pub async fn read(&self, user_id: i64, room_id: i64, offset: i64) -> Result<i64, ChatError> {
        self.member(room_id, user_id).await?;
        let at = self
            .inner
            .store
            .set_last_read(room_id, user_id, offset)
            .await?;
        let data = json!({"type": "read", "user_id": user_id, "offset": at});
        self.ephemeral(room_id, data).await;
        Ok(at)
    }

    /// Tells the room that `user_id` is typing. Throttled to one push per user and room per
    /// second; returns whether a push was sent.
    pub async fn typing(&self, user_id: i64, room_id: i64) -> Result<bool, ChatError> {
        self.member(room_id, user_id).await?;
        {
            let mut t = self.inner.typing.lock().expect("typing lock poisoned");
            let now = Instant::now();
            if t.get(&(user_id, room_id))
                .is_some_and(|last| now - *last < TYPING_INTERVAL)
            {
                return Ok(false);
            }
            if t.len() >= TYPING_ENTRIES_MAX {
                t.retain(|_, last| now - *last < TYPING_INTERVAL);
            }
            t.insert((user_id, room_id), now);
        }
        let data = json!({"type": "typing", "user_id": user_id, "ttl_ms": TYPING_TTL_MS});
        self.ephemeral(room_id, data).await;
        Ok(true)
    }

    async fn ephemeral(&self, room_id: i64, data: serde_json::Value) {
        let channel = Chat::channel(room_id);
        if let Err(e) = self
            .inner
            .broker
            .broadcast(&channel, events::ephemeral(data))
            .await
        {
            tracing::debug!(channel, error = %e, "ephemeral push failed");
        }
    }

    /// A room's stream for subscribe positions, recovery and `history`, with the broker's
    /// semantics. `limit` is honoured exactly (read in pages of the store's cap), so a
    /// recovery asking for `max + 1` events can tell that more than `max` are missing.
    pub async fn history(
        &self,
        room_id: i64,
        filter: &HistoryFilter,
    ) -> Result<HistoryPage, BrokerError> {
        let unavailable = |e: StoreError| BrokerError::Unavailable(e.to_string());
        let pos = self
            .inner
            .store
            .room_position(room_id)
            .await
            .map_err(unavailable)?;
        let position = StreamPosition {
            offset: pos.offset as u64,
            epoch: pos.epoch.clone(),
        };
        if let Some(since) = &filter.since {
            if !since.epoch.is_empty() && since.epoch != pos.epoch {
                return Err(BrokerError::UnrecoverablePosition);
            }
        }
        let mut want = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        if filter.reverse {
            let mut before = filter
                .since
                .as_ref()
                .map_or(pos.offset + 1, |s| store_offset(s.offset));
            while want > 0 {
                let n = want.min(STORE_PAGE as usize) as u32;
                let page = self.inner.store.events_before(room_id, before, n).await;
                let page = page.map_err(unavailable)?;
                let got = page.len();
                before = page.first().map_or(0, |e| e.offset);
                out.extend(page.iter().rev().map(events::publication));
                want -= got;
                if got < n as usize {
                    break;
                }
            }
        } else {
            let mut after = filter.since.as_ref().map_or(0, |s| store_offset(s.offset));
            while want > 0 {
                let n = want.min(STORE_PAGE as usize) as u32;
                let page = self
                    .inner
                    .store
                    .events(room_id, after, n)
                    .await
                    .map_err(unavailable)?;
                let got = page.len();
                after = page.last().map_or(after, |e| e.offset);
                out.extend(page.iter().map(events::publication));
                want -= got;
                if got < n as usize {
                    break;
                }
            }
        }
        Ok(HistoryPage {
            publications: out,
            position,
        })
    }
}

/// A client's offset (any `u64`) as the store's `i64`: offsets past `i64::MAX` are beyond
/// every stored event, so they saturate (a plain cast made them negative: "after -1" read
/// the whole stream).
fn store_offset(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}
