//! The NATS engine: core NATS for fan-out, JetStream for history, a KV bucket for presence.
//!
//! # Subjects
//! Names are carried as a *token*: the base64url (no padding) of the name, or `_` for the empty
//! name, so channel names with `.`, `*`, `>` or spaces stay one subject token. `{prefix}` is
//! [`EngineOptions::prefix`] with every character outside `[A-Za-z0-9_-]` replaced by `_`.
//! - `{prefix}.ch.{token}`: a channel's fan-out. Payload: JSON `{"k":"p","e":epoch,"p":publication}`
//!   for a publication (`e` absent for [`Broker::broadcast`] and channels without history),
//!   `{"k":"j"|"l","i":client_info}` for a join or leave.
//! - `{prefix}.t.{token}`: a node topic, raw bytes.
//! - `{prefix}.h.{token}`: a channel's history, kept by the stream below.
//!
//! `subscribe` and `subscribe_topic` return once the server has processed the SUB: a message
//! sent to a private inbox after it has come back (`Client::flush` only writes the socket).
//! Subscriptions are counted: a subject stays subscribed until it has been unsubscribed as many
//! times as it was subscribed, so overlapping calls from concurrent tasks cannot leave it
//! unsubscribed by mistake.
//!
//! # History stream
//! One stream, `{PREFIX}_history` (the sanitised prefix upper-cased), holds every channel's history
//! on `{prefix}.h.>`: file storage, `max_messages_per_subject = history_max_size`,
//! `max_age = history_max_ttl` (0 = unlimited for both), discard old. Each stored message is JSON
//! `{"o":offset,"e":epoch,"f":first_kept,"x":expires_unix_ms,"q":previous_sequence,"p":publication}`.
//!
//! **Offsets.** A node appends with `Nats-Expected-Last-Subject-Sequence` set to the stream sequence
//! of the channel's last message as it knows it (cached per channel, offset and epoch alongside).
//! The server refuses the append if anything was stored on the subject since, so an offset is
//! assigned exactly once, cluster-wide, atomically with the append. On that refusal the node
//! re-reads the subject's last message from the stream leader, and retries (bounded, jittered).
//! A node appends one publication of a channel at a time, and publishes it for fan-out (core
//! NATS) after the append is acknowledged and before the next append, so one node's
//! publications reach every subscriber in offset order. Publications from different nodes may
//! interleave out of offset order; the hub re-orders them.
//!
//! **Epochs.** A channel without a live message starts a new random epoch: its first publication
//! gets offset 1. A read of such a quiet channel appends a *marker* (offset 0, no publication)
//! under the same optimistic check, so every node reads the same epoch and the first
//! publication, which follows the marker, keeps it. `remove_history` purges the subject, so the
//! next read or publication starts a new epoch.
//!
//! **Per-publication limits.** `history_size` is applied at append time: `f`, the first offset
//! kept, becomes `max(previous f, offset - history_size + 1)` and reads ignore older messages
//! (they leave the stream through `max_messages_per_subject`). `history_ttl` is carried as `x`: a
//! channel whose last message is past `x` is expired, and its next publication or read starts a
//! new epoch, as the in-memory engine does. The nats-server this was built against (2.9) has no
//! per-message TTL (`Nats-TTL` needs 2.11), so storage itself is reclaimed by `max_age` and
//! `max_messages_per_subject`, the upper bounds; `x` compares wall clocks of different nodes.
//!
//! **Reads.** `limit: Some(0)` (every subscribe) is one direct get of the subject's last
//! message. A read of a few publications next to the top walks back from the last message
//! through `q` with direct gets; a longer one reads the subject with a pull consumer. A
//! malformed stored message counts as expired: the channel goes on with a new epoch after it.
//! The per-channel cache is dropped by [`Broker::sweep`] after [`CACHE_IDLE`] without use.
//!
//! # Presence
//! A KV bucket `{PREFIX}_presence` with `max_age = presence_ttl`, key `{channel token}.{client
//! token}`, value the `ClientInfo` JSON. The engine remembers the entries it added and a
//! heartbeat task re-puts them every `presence_ttl / 3`, so the entries of a node that crashed (or
//! whose shutdown token was cancelled) expire within `presence_ttl`. Reads take the last value of
//! every key under `{channel token}.` with a pull consumer (last per subject) and skip deletes.
//! The bucket's stream (`KV_{bucket}`) is created with the settings async-nats gives a bucket,
//! but directly: `create_or_update_key_value` fails on nats-server 2.9 (see `connect`).
//!
//! # Reconnects, timeouts and limits
//! async-nats reconnects by itself and restores the subscriptions. After a disconnect the
//! engine calls [`BrokerEventHandler::handle_reconnect`] once the connection is back, so the hub
//! recovers positioned channels from history. Every command is bounded by [`COMMAND_TIMEOUT`];
//! an unreachable server gives [`BrokerError::Unavailable`], never a hang, and while the
//! connection is down history commands fail at once rather than queue an append that the
//! server could still store after the caller was told it failed. An append whose acknowledgement
//! is lost (timeout) may still be stored; the caller's retry then publishes it twice. Each subscription
//! buffers at most [`SUBSCRIPTION_CAPACITY`] messages; past that async-nats drops messages for it
//! (a slow consumer, logged): the hub then sees an offset gap and recovers from history, and
//! joins, leaves and offset-less publications are lost. Malformed payloads are logged and dropped.
//! Background tasks (subscription readers, the presence heartbeat) stop when
//! [`EngineOptions::shutdown`] is cancelled.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::connection::State;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer, ReplayPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{
    self, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind, StorageType,
};
use async_nats::{Client, ConnectOptions, Event};
use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use switchboard_hub::memory::new_epoch;
use switchboard_hub::{
    Broker, BrokerError, BrokerEventHandler, HistoryFilter, HistoryPage, PresenceStore,
    PublishOptions,
};
use switchboard_protocol::client::{ClientInfo, Publication, StreamPosition};
use switchboard_protocol::RawValue;
use tokio_util::sync::CancellationToken;

use crate::{Engine, EngineOptions};

/// Upper bound of every request to NATS (connect, JetStream API, publish acks, round trips).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound of a history or presence read through a consumer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages buffered per subscription before async-nats drops them (slow consumer).
pub const SUBSCRIPTION_CAPACITY: usize = 4096;
/// Appends tried per publication before contention is reported as unavailability.
const APPEND_ATTEMPTS: u32 = 64;
/// Messages asked for per fetch of a consumer read.
const READ_BATCH: usize = 256;
/// Reads of at most this many publications from the top walk back with direct gets; longer
/// ones use a consumer.
const WALK_MAX: u64 = 32;
/// Presence puts in flight at once during a heartbeat.
const HEARTBEAT_CONCURRENCY: usize = 64;
/// A channel's cached last position is dropped by `sweep` after this long unused.
pub const CACHE_IDLE: Duration = Duration::from_secs(300);

/// The history stream's name for `prefix`.
pub fn history_stream_name(prefix: &str) -> String {
    format!("{}_history", sanitize(prefix).to_uppercase())
}

/// The presence bucket's name for `prefix`.
pub fn presence_bucket_name(prefix: &str) -> String {
    format!("{}_presence", sanitize(prefix).to_uppercase())
}

fn sanitize(prefix: &str) -> String {
    let s: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "switchboard".to_owned()
    } else {
        s
    }
}

/// A name as one subject token. No base64 encoding is one character long, so `_` is free for
/// the empty name.
fn token(name: &str) -> String {
    if name.is_empty() {
        "_".to_owned()
    } else {
        URL_SAFE_NO_PAD.encode(name)
    }
}

struct Subjects {
    prefix: String,
}

impl Subjects {
    fn channel(&self, channel: &str) -> String {
        format!("{}.ch.{}", self.prefix, token(channel))
    }
    fn topic(&self, topic: &str) -> String {
        format!("{}.t.{}", self.prefix, token(topic))
    }
    fn history(&self, channel: &str) -> String {
        format!("{}.h.{}", self.prefix, token(channel))
    }
}

/// Connects to NATS at `url` and prepares the history stream and the presence bucket.
pub async fn connect(url: &str, opts: EngineOptions) -> Result<Engine, BrokerError> {
    let shared = Arc::new(Shared::default());
    let events = shared.clone();
    let connecting = ConnectOptions::new()
        .name("switchboard")
        .connection_timeout(COMMAND_TIMEOUT)
        .request_timeout(Some(COMMAND_TIMEOUT))
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            let shared = events.clone();
            async move { shared.on_event(event) }
        })
        .connect(url);
    let client = timed("connect", connecting).await?;
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(COMMAND_TIMEOUT);

    let stream_name = history_stream_name(&opts.prefix);
    let subjects = Subjects {
        prefix: sanitize(&opts.prefix),
    };
    let config = stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{}.h.>", subjects.prefix)],
        storage: StorageType::File,
        max_messages_per_subject: match opts.history_max_size {
            0 => -1,
            n => i64::try_from(n).unwrap_or(i64::MAX),
        },
        max_age: opts.history_max_ttl,
        discard: DiscardPolicy::Old,
        allow_direct: true,
        description: Some("switchboard channel history".to_owned()),
        ..Default::default()
    };
    timed("create history stream", js.create_or_update_stream(config)).await?;
    let stream = timed("get history stream", js.get_stream(&stream_name)).await?;

    // The bucket's stream is made here rather than by `create_or_update_key_value`, whose
    // account query fails to parse a nats-server 2.9 reply (`reserved_memory` missing).
    let bucket = presence_bucket_name(&opts.prefix);
    let kv_config = stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("switchboard presence".to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: opts.presence_ttl,
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        ..Default::default()
    };
    timed(
        "create presence bucket",
        js.create_or_update_stream(kv_config),
    )
    .await?;
    let kv = timed("get presence bucket", js.get_key_value(&bucket)).await?;

    tracing::info!(
        server = %client.server_info().version,
        stream = %stream_name,
        bucket = %bucket,
        "nats engine connected"
    );

    let entries = Arc::new(DashMap::new());
    tokio::spawn(heartbeat(
        kv.clone(),
        entries.clone(),
        (opts.presence_ttl / 3).max(Duration::from_millis(100)),
        opts.shutdown.clone(),
    ));

    let broker = NatsBroker {
        client: client.clone(),
        js,
        stream,
        subjects,
        shared,
        channels: DashMap::new(),
        subscriptions: DashMap::new(),
        shutdown: opts.shutdown,
        started: Instant::now(),
    };
    let presence = NatsPresence { kv, entries };
    Ok(Engine {
        broker: Arc::new(broker),
        presence: Arc::new(presence),
    })
}

/// What the connection's event callback and the subscription readers share with the broker.
#[derive(Default)]
struct Shared {
    handler: OnceLock<Weak<dyn BrokerEventHandler>>,
    /// Set on `Disconnected`; the `Connected` that clears it is a reconnect.
    disconnected: AtomicBool,
    /// Unix ms of the last slow-consumer warning, so a burst logs once.
    slow_logged: AtomicU64,
}

impl Shared {
    fn handler(&self) -> Option<Arc<dyn BrokerEventHandler>> {
        self.handler.get().and_then(Weak::upgrade)
    }

    fn on_event(&self, event: Event) {
        match event {
            Event::Disconnected => {
                if !self.disconnected.swap(true, Ordering::SeqCst) {
                    tracing::warn!("nats disconnected; reconnecting");
                }
            }
            Event::Connected => {
                if self.disconnected.swap(false, Ordering::SeqCst) {
                    tracing::info!("nats reconnected; channels recover from history");
                    if let Some(h) = self.handler() {
                        h.handle_reconnect();
                    }
                }
            }
            Event::SlowConsumer(sid) => {
                let now = now_ms();
                let last = self.slow_logged.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= 10_000
                    && self
                        .slow_logged
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        sid,
                        "nats subscription full: messages dropped (the hub recovers gaps from history)"
                    );
                }
            }
            Event::Closed => tracing::warn!("nats connection closed"),
            Event::LameDuckMode => tracing::info!("nats server entered lame duck mode"),
            Event::Draining => tracing::debug!("nats connection draining"),
            Event::ServerError(err) => tracing::warn!(error = %err, "nats server error"),
            Event::ClientError(err) => tracing::warn!(error = %err, "nats client error"),
        }
    }
}

fn unavailable(what: &str, err: impl Display) -> BrokerError {
    BrokerError::Unavailable(format!("nats {what}: {err}"))
}

/// Runs `fut` within [`COMMAND_TIMEOUT`], mapping its failure to `Unavailable`.
async fn timed<T, E: Display>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(what, e)),
        Err(_) => Err(unavailable(what, "timed out")),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
enum Kind {
    #[serde(rename = "p")]
    Publication,
    #[serde(rename = "j")]
    Join,
    #[serde(rename = "l")]
    Leave,
}

/// A fan-out message, as sent.
#[derive(Serialize)]
struct WireOut<'a> {
    k: Kind,
    #[serde(skip_serializing_if = "str::is_empty")]
    e: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    p: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    i: Option<&'a ClientInfo>,
}

/// A fan-out message, as received.
#[derive(Deserialize)]
struct WireIn {
    k: Kind,
    #[serde(default)]
    e: String,
    #[serde(default)]
    p: Option<Publication>,
    #[serde(default)]
    i: Option<ClientInfo>,
}

/// A history message, as stored. A marker has `o: 0` and no `p`.
#[derive(Serialize)]
struct StoredOut<'a> {
    o: u64,
    e: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    f: u64,
    #[serde(skip_serializing_if = "is_zero")]
    x: u64,
    #[serde(skip_serializing_if = "is_zero")]
    q: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    p: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StoredIn {
    #[serde(default)]
    o: u64,
    e: String,
    #[serde(default)]
    f: u64,
    #[serde(default)]
    x: u64,
    #[serde(default)]
    q: u64,
    #[serde(default)]
    p: Option<Box<RawValue>>,
}

/// A channel's last stored message: where its stream stands.
#[derive(Clone)]
struct Top {
    /// Stream sequence of the message: the expectation of the next append.
    seq: u64,
    offset: u64,
    epoch: String,
    /// First offset kept by `history_size` (0 for a marker).
    first: u64,
    /// Unix ms after which the channel's history is gone; 0 = only the stream's limits apply.
    expires: u64,
    /// Stream sequence of the previous message on the subject, 0 for none.
    prev: u64,
    publication: Option<Box<RawValue>>,
}

impl Top {
    fn decode(seq: u64, payload: &[u8], subject: &str) -> Top {
        match serde_json::from_slice::<StoredIn>(payload) {
            Ok(s) => Top {
                seq,
                offset: s.o,
                epoch: s.e,
                first: s.f,
                expires: s.x,
                prev: s.q,
                publication: s.p,
            },
            Err(err) => {
                // Treated as expired: the channel's next append starts a new epoch after it.
                tracing::warn!(subject, seq, error = %err, "malformed history message ignored");
                Top {
                    seq,
                    offset: 0,
                    epoch: String::new(),
                    first: 0,
                    expires: 1,
                    prev: 0,
                    publication: None,
                }
            }
        }
    }

    fn expired(&self, now: u64) -> bool {
        self.expires != 0 && now >= self.expires
    }

    fn publication(&self) -> Option<Arc<Publication>> {
        let raw = self.publication.as_ref()?;
        match serde_json::from_str::<Publication>(raw.get()) {
            Ok(p) => Some(Arc::new(p)),
            Err(err) => {
                tracing::warn!(seq = self.seq, error = %err, "malformed stored publication");
                None
            }
        }
    }
}

/// Why an append was not stored.
enum AppendError {
    /// Something was stored on the subject since the expected sequence.
    Conflict,
    Failed(BrokerError),
}

/// One channel's state on this node.
struct ChannelState {
    /// The channel's last message as this node knows it. The async lock is held across the
    /// append and the fan-out publish: this node's publications leave in offset order.
    top: tokio::sync::Mutex<Option<Top>>,
    /// Milliseconds since the broker started, at last use; `sweep` drops idle entries.
    used: AtomicU64,
}

/// A counted subscription to one subject.
#[derive(Default)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    count: usize,
    /// Cancels the reader task, which drops the subscription.
    reader: Option<CancellationToken>,
    /// Removed from the map: a caller that waited for this slot looks it up again.
    dead: bool,
}

#[derive(Clone)]
enum Target {
    Channel(Arc<str>),
    Topic(Arc<str>),
}

/// The broker half of the engine. Built by [`connect`].
pub struct NatsBroker {
    client: Client,
    js: async_nats::jetstream::Context,
    stream: stream::Stream,
    subjects: Subjects,
    shared: Arc<Shared>,
    channels: DashMap<String, Arc<ChannelState>>,
    /// Keyed by subject (channel and topic subjects differ).
    subscriptions: DashMap<String, Arc<Slot>>,
    shutdown: CancellationToken,
    started: Instant,
}

impl NatsBroker {
    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn channel_state(&self, channel: &str) -> Arc<ChannelState> {
        let state = match self.channels.get(channel) {
            Some(s) => s.clone(),
            None => self
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| {
                    Arc::new(ChannelState {
                        top: tokio::sync::Mutex::new(None),
                        used: AtomicU64::new(0),
                    })
                })
                .clone(),
        };
        state.used.store(self.elapsed_ms(), Ordering::Relaxed);
        state
    }

    async fn core_publish(&self, subject: String, payload: Vec<u8>) -> Result<(), BrokerError> {
        timed("publish", self.client.publish(subject, payload.into())).await
    }

    /// Fails fast while disconnected, rather than queueing a write that would time out, and
    /// might still be stored after the caller was told it failed.
    fn connected(&self, what: &str) -> Result<(), BrokerError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            _ => Err(unavailable(what, "disconnected")),
        }
    }

    /// Appends `body` to `subject` if the subject's last message is still `expect`.
    async fn append(&self, subject: &str, body: Vec<u8>, expect: u64) -> Result<u64, AppendError> {
        self.connected("history append")
            .map_err(AppendError::Failed)?;
        let message = PublishMessage::build()
            .payload(body.into())
            .expected_last_subject_sequence(expect);
        let acked = tokio::time::timeout(COMMAND_TIMEOUT, async {
            self.js
                .send_publish(subject.to_owned(), message)
                .await?
                .await
        })
        .await;
        match acked {
            Ok(Ok(ack)) => Ok(ack.sequence),
            Ok(Err(e)) if matches!(e.kind(), PublishErrorKind::WrongLastSequence) => {
                Err(AppendError::Conflict)
            }
            Ok(Err(e)) => Err(AppendError::Failed(unavailable("history append", e))),
            Err(_) => Err(AppendError::Failed(unavailable(
                "history append",
                "timed out",
            ))),
        }
    }

    /// The subject's last message, from the stream leader (`leader`) or any replica.
    async fn read_last(&self, subject: &str, leader: bool) -> Result<Option<Top>, BrokerError> {
        self.connected("history read")?;
        let message = if leader {
            let got = tokio::time::timeout(
                COMMAND_TIMEOUT,
                self.stream.get_last_raw_message_by_subject(subject),
            )
            .await
            .map_err(|_| unavailable("history read", "timed out"))?;
            match got {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                    return Ok(None)
                }
                Err(e) => return Err(unavailable("history read", e)),
            }
        } else {
            let got = tokio::time::timeout(
                COMMAND_TIMEOUT,
                self.stream.direct_get_last_for_subject(subject),
            )
            .await
            .map_err(|_| unavailable("history read", "timed out"))?;
            match got {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(None),
                Err(e) => return Err(unavailable("history read", e)),
            }
        };
        Ok(Some(Top::decode(
            message.sequence,
            &message.payload,
            subject,
        )))
    }

    /// The channel's live top. A channel without one gets a marker: a new epoch at offset 0
    /// that every node then reads.
    async fn position(&self, subject: &str) -> Result<Top, BrokerError> {
        for attempt in 0..APPEND_ATTEMPTS {
            // A replica may lag behind the leader: after a conflict, ask the leader.
            let last = self.read_last(subject, attempt > 0).await?;
            if let Some(top) = &last {
                if !top.expired(now_ms()) {
                    return Ok(top.clone());
                }
            }
            let prev = last.map_or(0, |t| t.seq);
            let epoch = new_epoch();
            let marker = StoredOut {
                o: 0,
                e: &epoch,
                f: 0,
                x: 0,
                q: prev,
                p: None,
            };
            let body = serde_json::to_vec(&marker).expect("a marker serializes");
            match self.append(subject, body, prev).await {
                Ok(seq) => {
                    return Ok(Top {
                        seq,
                        offset: 0,
                        epoch,
                        first: 0,
                        expires: 0,
                        prev,
                        publication: None,
                    })
                }
                Err(AppendError::Conflict) => jitter(attempt).await,
                Err(AppendError::Failed(e)) => return Err(e),
            }
        }
        Err(BrokerError::Unavailable(
            "nats history: too much contention".into(),
        ))
    }

    /// The current epoch's kept publications with offsets from `low` up to `top`, ascending
    /// and contiguous. Starts above `low` when older ones were trimmed.
    async fn kept(
        &self,
        subject: &str,
        top: &Top,
        low: u64,
    ) -> Result<Vec<Arc<Publication>>, BrokerError> {
        let first = top.first.max(1);
        let low = low.max(first);
        if top.offset == 0 || low > top.offset {
            return Ok(Vec::new());
        }
        if top.offset - low < WALK_MAX {
            return self.walk_back(subject, top, low, first).await;
        }
        let mut found: Vec<(u64, Arc<Publication>)> = Vec::new();
        read_consumer(
            &self.stream,
            subject.to_owned(),
            DeliverPolicy::All,
            Some(top.seq),
            |message, seq| {
                if seq > top.seq {
                    return;
                }
                let t = Top::decode(seq, &message.payload, subject);
                if t.epoch == top.epoch && t.offset >= low && t.offset <= top.offset {
                    if let Some(p) = t.publication() {
                        found.push((t.offset, p));
                    }
                }
            },
        )
        .await?;
        // Keep the contiguous run that ends at the top.
        let mut out = Vec::with_capacity(found.len());
        let mut want = top.offset;
        for (offset, p) in found.into_iter().rev() {
            if offset != want {
                break;
            }
            out.push(p);
            want -= 1;
        }
        out.reverse();
        Ok(out)
    }

    /// Follows `q` links back from the top with direct gets.
    async fn walk_back(
        &self,
        subject: &str,
        top: &Top,
        low: u64,
        first: u64,
    ) -> Result<Vec<Arc<Publication>>, BrokerError> {
        let Some(p) = top.publication() else {
            return Ok(Vec::new());
        };
        let mut out = vec![p];
        let (mut offset, mut prev) = (top.offset, top.prev);
        while offset > low && prev != 0 {
            let got = tokio::time::timeout(COMMAND_TIMEOUT, self.stream.direct_get(prev))
                .await
                .map_err(|_| unavailable("history read", "timed out"))?;
            let message = match got {
                Ok(m) => m,
                // Trimmed by the stream's limits.
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => break,
                Err(e) => return Err(unavailable("history read", e)),
            };
            let t = Top::decode(message.sequence, &message.payload, subject);
            if t.epoch != top.epoch || t.offset + 1 != offset || t.offset < first {
                break;
            }
            let Some(p) = t.publication() else { break };
            out.push(p);
            offset = t.offset;
            prev = t.prev;
        }
        out.reverse();
        Ok(out)
    }

    /// Subscribes `subject` for `target`, or counts one more subscriber of it.
    async fn add_subscription(&self, subject: String, target: Target) -> Result<(), BrokerError> {
        loop {
            let slot = self
                .subscriptions
                .entry(subject.clone())
                .or_default()
                .clone();
            let mut state = slot.state.lock().await;
            if state.dead {
                continue;
            }
            if state.reader.is_none() {
                match self.start_reader(&subject, target.clone()).await {
                    Ok(token) => state.reader = Some(token),
                    Err(e) => {
                        if state.count == 0 {
                            state.dead = true;
                            self.subscriptions
                                .remove_if(&subject, |_, s| Arc::ptr_eq(s, &slot));
                        }
                        return Err(e);
                    }
                }
            }
            state.count += 1;
            return Ok(());
        }
    }

    async fn remove_subscription(&self, subject: &str) -> Result<(), BrokerError> {
        let Some(slot) = self.subscriptions.get(subject).map(|s| s.clone()) else {
            return Ok(());
        };
        let mut state = slot.state.lock().await;
        if state.dead {
            return Ok(());
        }
        state.count = state.count.saturating_sub(1);
        if state.count == 0 {
            if let Some(reader) = state.reader.take() {
                reader.cancel();
            }
            state.dead = true;
            self.subscriptions
                .remove_if(subject, |_, s| Arc::ptr_eq(s, &slot));
        }
        Ok(())
    }

    /// Returns once the server has processed every command this connection sent before.
    /// `Client::flush` is not enough: it only writes the socket buffer. A server handles one
    /// connection's commands in order, so a message sent to a private inbox that comes back
    /// was handled after them.
    async fn sync(&self) -> Result<(), BrokerError> {
        let inbox = self.client.new_inbox();
        let mut echo = timed("sync", self.client.subscribe(inbox.clone())).await?;
        timed("sync", self.client.publish(inbox, Bytes::new())).await?;
        match tokio::time::timeout(COMMAND_TIMEOUT, echo.next()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(unavailable("sync", "connection closed")),
            Err(_) => Err(unavailable("sync", "timed out")),
        }
    }

    /// Subscribes and spawns the task that hands the subject's messages to the handler. The
    /// server has processed the SUB when this returns.
    async fn start_reader(
        &self,
        subject: &str,
        target: Target,
    ) -> Result<CancellationToken, BrokerError> {
        let mut subscriber = timed("subscribe", self.client.subscribe(subject.to_owned())).await?;
        self.sync().await?;
        let token = self.shutdown.child_token();
        let stop = token.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    m = subscriber.next() => m,
                };
                let Some(message) = message else {
                    tracing::debug!("nats subscription ended");
                    break;
                };
                let Some(handler) = shared.handler() else {
                    continue;
                };
                match &target {
                    Target::Channel(channel) => dispatch(&*handler, channel, &message.payload),
                    Target::Topic(topic) => handler.handle_message(topic, message.payload),
                }
            }
            let _ = subscriber.unsubscribe().await;
        });
        Ok(token)
    }
}

/// Hands one fan-out message to the handler; a malformed one is logged and dropped.
fn dispatch(handler: &dyn BrokerEventHandler, channel: &str, payload: &[u8]) {
    let wire = match serde_json::from_slice::<WireIn>(payload) {
        Ok(w) => w,
        Err(err) => {
            tracing::warn!(channel, error = %err, "malformed nats message dropped");
            return;
        }
    };
    match (wire.k, wire.p, wire.i) {
        (Kind::Publication, Some(p), _) => {
            handler.handle_publication(channel, Arc::new(p), &wire.e)
        }
        (Kind::Join, _, Some(info)) => handler.handle_join(channel, &info),
        (Kind::Leave, _, Some(info)) => handler.handle_leave(channel, &info),
        _ => tracing::warn!(channel, "incomplete nats message dropped"),
    }
}

async fn jitter(attempt: u32) {
    let max = 200 * u64::from(attempt.min(10) + 1);
    tokio::time::sleep(Duration::from_micros(rand::random_range(0..=max))).await;
}

/// Reads `filter` on `stream` with an ephemeral pull consumer, in `no_wait` batches, until the
/// server has nothing more (or the read passed `stop_seq`), calling `each` with every message
/// and its stream sequence. `no_wait` fetches end on the server's own "no messages" answer,
/// which stays right when messages expire during the read (pending counts do not, on 2.9).
async fn read_consumer(
    stream: &stream::Stream,
    filter: String,
    deliver_policy: DeliverPolicy,
    stop_seq: Option<u64>,
    mut each: impl FnMut(&async_nats::jetstream::Message, u64),
) -> Result<(), BrokerError> {
    let consumer: PullConsumer = timed(
        "read",
        stream.create_consumer(pull::Config {
            filter_subject: filter,
            deliver_policy,
            ack_policy: AckPolicy::None,
            replay_policy: ReplayPolicy::Instant,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        }),
    )
    .await?;
    let name = consumer.cached_info().name.clone();
    let mut result = Ok(());
    if consumer.cached_info().num_pending > 0 {
        result = async {
            let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
            loop {
                let fetch = consumer.fetch().max_messages(READ_BATCH).messages();
                let mut batch = tokio::time::timeout_at(deadline, fetch)
                    .await
                    .map_err(|_| unavailable("read", "timed out"))?
                    .map_err(|e| unavailable("read", e))?;
                let mut got = 0;
                loop {
                    let next = tokio::time::timeout_at(deadline, batch.next())
                        .await
                        .map_err(|_| unavailable("read", "timed out"))?;
                    let message = match next {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return Err(unavailable("read", e)),
                        None => break,
                    };
                    got += 1;
                    let seq = match message.info() {
                        Ok(info) => info.stream_sequence,
                        Err(e) => return Err(unavailable("read", e)),
                    };
                    each(&message, seq);
                    if stop_seq.is_some_and(|s| seq >= s) {
                        return Ok(());
                    }
                }
                if got < READ_BATCH {
                    return Ok(());
                }
            }
        }
        .await;
    }
    // The server would drop the ephemeral consumer after its inactivity threshold anyway.
    let _ = tokio::time::timeout(COMMAND_TIMEOUT, stream.delete_consumer(&name)).await;
    result
}

/// Applies a history filter to a channel's kept publications, as the in-memory engine does.
/// `items` covers at least the offsets the filter needs (see `history`); `top` is the offset
/// of the stream's newest publication.
fn select(
    items: &[Arc<Publication>],
    top: u64,
    f: &HistoryFilter,
) -> Result<Vec<Arc<Publication>>, BrokerError> {
    let limit = f.limit.unwrap_or(usize::MAX);
    let first = items.first().map_or(top + 1, |p| p.offset);
    let out = match (&f.since, f.reverse) {
        (Some(since), false) => {
            if since.offset + 1 < first {
                return Err(BrokerError::UnrecoverablePosition);
            }
            items
                .iter()
                .filter(|p| p.offset > since.offset)
                .take(limit)
                .cloned()
                .collect()
        }
        (Some(since), true) => items
            .iter()
            .rev()
            .filter(|p| p.offset < since.offset)
            .take(limit)
            .cloned()
            .collect(),
        (None, false) => items.iter().take(limit).cloned().collect(),
        (None, true) => items.iter().rev().take(limit).cloned().collect(),
    };
    Ok(out)
}

#[async_trait]
impl Broker for NatsBroker {
    fn register(&self, handler: Weak<dyn BrokerEventHandler>) {
        let _ = self.shared.handler.set(handler);
    }

    async fn publish(
        &self,
        channel: &str,
        data: Box<RawValue>,
        info: Option<ClientInfo>,
        opts: &PublishOptions,
    ) -> Result<StreamPosition, BrokerError> {
        let mut publication = Publication {
            offset: 0,
            data,
            info,
            tags: opts.tags.clone(),
        };
        let fanout_subject = self.subjects.channel(channel);
        if opts.history_size == 0 {
            let raw = to_raw(&publication)?;
            let wire = encode_wire(Kind::Publication, "", Some(&raw), None);
            self.core_publish(fanout_subject, wire).await?;
            return Ok(StreamPosition::default());
        }
        let subject = self.subjects.history(channel);
        let state = self.channel_state(channel);
        let mut cached = state.top.lock().await;
        let size = opts.history_size as u64;
        let ttl = u64::try_from(opts.history_ttl.as_millis()).unwrap_or(u64::MAX);
        for attempt in 0..APPEND_ATTEMPTS {
            let last = match cached.take() {
                Some(t) => Some(t),
                None => self.read_last(&subject, true).await?,
            };
            let now = now_ms();
            let (offset, epoch, first) = match &last {
                Some(t) if !t.expired(now) => {
                    let offset = t.offset + 1;
                    let first = t.first.max(offset.saturating_sub(size - 1)).max(1);
                    (offset, t.epoch.clone(), first)
                }
                _ => (1, new_epoch(), 1),
            };
            let prev = last.map_or(0, |t| t.seq);
            publication.offset = offset;
            let raw = to_raw(&publication)?;
            let expires = now.saturating_add(ttl).max(1);
            let stored = StoredOut {
                o: offset,
                e: &epoch,
                f: first,
                x: expires,
                q: prev,
                p: Some(&raw),
            };
            let body = serde_json::to_vec(&stored).expect("a history message serializes");
            match self.append(&subject, body, prev).await {
                Ok(seq) => {
                    let wire = encode_wire(Kind::Publication, &epoch, Some(&raw), None);
                    *cached = Some(Top {
                        seq,
                        offset,
                        epoch: epoch.clone(),
                        first,
                        expires,
                        prev,
                        publication: None,
                    });
                    // Stored: a failed fan-out is a gap the subscribers recover from history.
                    if let Err(e) = self.core_publish(fanout_subject, wire).await {
                        tracing::warn!(channel, error = %e, "nats fan-out failed after append");
                    }
                    return Ok(StreamPosition { offset, epoch });
                }
                Err(AppendError::Conflict) => jitter(attempt).await,
                Err(AppendError::Failed(e)) => return Err(e),
            }
        }
        Err(BrokerError::Unavailable(
            "nats history: too much contention".into(),
        ))
    }

    async fn broadcast(
        &self,
        channel: &str,
        publication: Arc<Publication>,
    ) -> Result<(), BrokerError> {
        let raw = to_raw(&publication)?;
        let wire = encode_wire(Kind::Publication, "", Some(&raw), None);
        self.core_publish(self.subjects.channel(channel), wire)
            .await
    }

    async fn publish_join(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        let wire = encode_wire(Kind::Join, "", None, Some(info));
        self.core_publish(self.subjects.channel(channel), wire)
            .await
    }

    async fn publish_leave(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        let wire = encode_wire(Kind::Leave, "", None, Some(info));
        self.core_publish(self.subjects.channel(channel), wire)
            .await
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.add_subscription(
            self.subjects.channel(channel),
            Target::Channel(Arc::from(channel)),
        )
        .await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.remove_subscription(&self.subjects.channel(channel))
            .await
    }

    async fn history(
        &self,
        channel: &str,
        filter: &HistoryFilter,
    ) -> Result<HistoryPage, BrokerError> {
        let subject = self.subjects.history(channel);
        let top = self.position(&subject).await?;
        let position = StreamPosition {
            offset: top.offset,
            epoch: top.epoch.clone(),
        };
        let limit = filter.limit.unwrap_or(usize::MAX);
        if limit == 0 {
            return Ok(HistoryPage {
                publications: Vec::new(),
                position,
            });
        }
        if let Some(since) = &filter.since {
            if !since.epoch.is_empty() && since.epoch != top.epoch {
                return Err(BrokerError::UnrecoverablePosition);
            }
        }
        // The lowest offset the filter can need; `select` then applies it exactly.
        let limit64 = u64::try_from(limit).unwrap_or(u64::MAX);
        let low = match (&filter.since, filter.reverse) {
            (Some(since), false) => since.offset.saturating_add(1),
            (None, false) => 0,
            (None, true) => top.offset.saturating_sub(limit64.saturating_sub(1)),
            (Some(since), true) => since.offset.min(top.offset + 1).saturating_sub(limit64),
        };
        let items = self.kept(&subject, &top, low).await?;
        Ok(HistoryPage {
            publications: select(&items, top.offset, filter)?,
            position,
        })
    }

    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError> {
        let state = self.channel_state(channel);
        let mut cached = state.top.lock().await;
        *cached = None;
        let subject = self.subjects.history(channel);
        timed(
            "history purge",
            self.stream.purge().filter(subject).into_future(),
        )
        .await?;
        Ok(())
    }

    fn sweep(&self) {
        let now = self.elapsed_ms();
        let idle = CACHE_IDLE.as_millis() as u64;
        // Only entries nobody holds: a publish that still holds its state keeps it, so one
        // node never has two locks (two orders) for a channel. `retain` holds the shard's write
        // lock, so no `get` clones an entry between the check and the removal.
        self.channels.retain(|_, s| {
            Arc::strong_count(s) > 1 || now.saturating_sub(s.used.load(Ordering::Relaxed)) < idle
        });
    }

    async fn publish_message(&self, topic: &str, payload: Bytes) -> Result<(), BrokerError> {
        timed(
            "publish",
            self.client.publish(self.subjects.topic(topic), payload),
        )
        .await
    }

    async fn subscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        self.add_subscription(self.subjects.topic(topic), Target::Topic(Arc::from(topic)))
            .await
    }

    async fn unsubscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        self.remove_subscription(&self.subjects.topic(topic)).await
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}

fn to_raw(publication: &Publication) -> Result<Box<RawValue>, BrokerError> {
    serde_json::value::to_raw_value(publication)
        .map_err(|e| BrokerError::Unavailable(format!("publication not serializable: {e}")))
}

fn encode_wire(kind: Kind, epoch: &str, p: Option<&RawValue>, i: Option<&ClientInfo>) -> Vec<u8> {
    serde_json::to_vec(&WireOut {
        k: kind,
        e: epoch,
        p,
        i,
    })
    .expect("a fan-out message serializes")
}

/// The presence half of the engine. Built by [`connect`].
pub struct NatsPresence {
    kv: kv::Store,
    /// Entries this node added, re-put by the heartbeat: key to value.
    entries: Arc<DashMap<String, Bytes>>,
}

impl NatsPresence {
    fn key(channel: &str, client: &str) -> String {
        format!("{}.{}", token(channel), token(client))
    }

    async fn read(&self, channel: &str) -> Result<HashMap<String, ClientInfo>, BrokerError> {
        let mut out = HashMap::new();
        let filter = format!("{}{}.*", self.kv.prefix, token(channel));
        read_consumer(
            &self.kv.stream,
            filter,
            DeliverPolicy::LastPerSubject,
            None,
            |message, _| {
                let deleted = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| op.as_str() != "PUT");
                if deleted {
                    return;
                }
                match serde_json::from_slice::<ClientInfo>(&message.payload) {
                    Ok(info) => {
                        out.insert(info.client.clone(), info);
                    }
                    Err(err) => {
                        tracing::warn!(channel, error = %err, "malformed presence entry ignored")
                    }
                }
            },
        )
        .await?;
        Ok(out)
    }
}

#[async_trait]
impl PresenceStore for NatsPresence {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        let key = Self::key(channel, &info.client);
        let value =
            Bytes::from(serde_json::to_vec(info).map_err(|e| unavailable("presence encode", e))?);
        // Remembered first: if this put fails, the next heartbeat stores the entry.
        self.entries.insert(key.clone(), value.clone());
        timed("presence add", self.kv.put(key, value)).await?;
        Ok(())
    }

    async fn remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let key = Self::key(channel, client);
        // Forgotten first, so no heartbeat re-puts it after the delete (see `heartbeat`).
        self.entries.remove(&key);
        timed("presence remove", self.kv.delete(key)).await
    }

    async fn presence(&self, channel: &str) -> Result<HashMap<String, ClientInfo>, BrokerError> {
        self.read(channel).await
    }

    async fn stats(&self, channel: &str) -> Result<(u32, u32), BrokerError> {
        let clients = self.read(channel).await?;
        let users: HashSet<&str> = clients.values().map(|i| i.user.as_str()).collect();
        Ok((clients.len() as u32, users.len() as u32))
    }
}

/// Re-puts this node's presence entries every `interval`, so they outlive the bucket's
/// `max_age` only while the node is alive. An entry removed while its put was in flight is
/// deleted again after the put, so a heartbeat never resurrects a removed client.
async fn heartbeat(
    kv: kv::Store,
    entries: Arc<DashMap<String, Bytes>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let snapshot: Vec<(String, Bytes)> = entries
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        if snapshot.is_empty() {
            continue;
        }
        let kv = &kv;
        let round = futures_util::stream::iter(snapshot)
            .map(|(key, value)| async move {
                let ok = matches!(
                    tokio::time::timeout(COMMAND_TIMEOUT, kv.put(key.as_str(), value)).await,
                    Ok(Ok(_))
                );
                (key, ok)
            })
            .buffer_unordered(HEARTBEAT_CONCURRENCY)
            .collect::<Vec<_>>();
        let results = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = round => r,
        };
        let mut failed = 0usize;
        for (key, ok) in results {
            if !ok {
                failed += 1;
            } else if !entries.contains_key(&key) {
                let _ = tokio::time::timeout(COMMAND_TIMEOUT, kv.delete(key.as_str())).await;
            }
        }
        if failed > 0 && !failing {
            tracing::warn!(failed, "nats presence heartbeat failing");
        } else if failed == 0 && failing {
            tracing::info!("nats presence heartbeat recovered");
        }
        failing = failed > 0;
    }
    tracing::debug!("nats presence heartbeat stopped");
}
