//! The Redis engine: a [`Broker`] and a [`PresenceStore`] that many nodes share through one
//! Redis server. Built by [`connect`]; the types are [`RedisBroker`] and [`RedisPresence`].
//!
//! # Keys
//! Every key starts with `EngineOptions::prefix` (`{p}` below), so deployments and test runs
//! can share a server:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{p}:meta:{channel}` | hash | `e` the stream's epoch, `t` its top offset |
//! | `{p}:stream:{channel}` | stream | one entry per kept publication, id `{offset}-0`, field `d` the publication's JSON (offset left out) |
//! | `{p}:ch:{channel}` | pub/sub | the channel's publications, joins and leaves |
//! | `{p}:topic:{topic}` | pub/sub | node topic messages, the raw payload |
//! | `{p}:presence:{channel}` | hash | client id -> `ClientInfo` JSON |
//! | `{p}:presence-exp:{channel}` | sorted set | client id -> expiry (Redis server time, ms) |
//!
//! # Publications, ordering and epochs
//! With history, one Lua script (EVALSHA) reads or creates the channel's meta (the epoch a new
//! stream gets is a random string the caller passes), increments the top offset, XADDs the
//! publication with id `{offset}-0` trimmed to `history_size` (exact MAXLEN), sets both keys'
//! TTL to `history_ttl` and PUBLISHes the publication with its offset and epoch. Redis runs
//! scripts one at a time, so append and publish are one step: offsets are assigned in the
//! order every node receives them, and each node receives a channel's publications in offset
//! order. Without history a publication is a plain PUBLISH with offset 0.
//!
//! History reads go through a second script, which creates the meta of a channel that has none
//! (TTL `history_max_ttl`, refreshed by later reads while the channel stays quiet), so every
//! node reading a quiet channel sees the same epoch and a later publish keeps it. The filter
//! rules are the in-memory engine's ([`switchboard_hub::MemoryBroker`]).
//!
//! The epoch changes whenever history is lost: when the keys expire, on `remove_history`, and
//! after a Redis restart (this deployment's Redis keeps nothing on disk). A client holding an
//! old position is then told `recovered: false`, never given a silent gap.
//!
//! # Pub/sub payloads
//! On `{p}:ch:{channel}` the first byte says what follows:
//! - `P{epoch} {offset} {publication JSON}`: a publication. The epoch is empty for
//!   [`Broker::broadcast`] and for publications without history; the header's offset wins
//!   over any in the JSON.
//! - `J{ClientInfo JSON}` and `L{ClientInfo JSON}`: a join and a leave.
//!
//! Topic payloads are delivered as they were sent. A payload that does not decode is logged
//! (warn) and dropped.
//!
//! # The subscribed connection
//! One connection per node, owned by a task, carries every SUBSCRIBE. `subscribe` returns once
//! Redis confirmed it. The task reads frames off the socket and calls the handler before reading
//! the next, so there is no queue in between: a node that falls behind is disconnected by Redis
//! (`client-output-buffer-limit pubsub`), which is then handled as any other loss. On a loss the
//! task reconnects with backoff (100 ms doubling to 5 s, with jitter), subscribes everything
//! again, waits for the confirmations and calls `handle_reconnect` so channels recover from
//! history. A `subscribe` made while the connection is down is kept and happens on reconnect;
//! if it times out first it fails with `Unavailable` but stays wanted until `unsubscribe`. The
//! connection is named `{p}:pubsub` (CLIENT SETNAME). The task stops on `shutdown`.
//!
//! Other commands go through a [`ConnectionManager`] (reconnects on its own) and each has a
//! response timeout of [`RESPONSE_TIMEOUT`]: a dead Redis gives `Unavailable`, never a hang.
//!
//! # Presence
//! An entry is a hash field plus a sorted-set score holding its expiry, `presence_ttl` from the
//! last write, in Redis's clock. Reads drop expired entries first (Lua). Each node remembers the
//! entries it added and a task writes them again every `presence_ttl / 3`; when a node dies or
//! its shutdown token is cancelled, its clients leave presence within `presence_ttl`.

mod pubsub;
mod resp;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, ConnectionAddr, RedisResult, Script, Value};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use switchboard_hub::memory::new_epoch;
use switchboard_hub::{
    Broker, BrokerError, BrokerEventHandler, HistoryFilter, HistoryPage, PresenceStore,
    PublishOptions,
};
use switchboard_protocol::client::{ClientInfo, Publication, StreamPosition};
use switchboard_protocol::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{Engine, EngineOptions};
use pubsub::{Addr, Deliver, Request, Target};

/// How long any command may take before the caller gets `Unavailable`.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Subscribe/unsubscribe requests waiting for the pub/sub task (callers wait when it is full).
const REQUEST_QUEUE: usize = 1024;
/// Presence entries written per script call, and calls in flight, during a heartbeat.
const HEARTBEAT_CHUNK: usize = 256;
const HEARTBEAT_CONCURRENCY: usize = 16;

/// See the module doc. ARGV: epoch for a new stream, history size, TTL (ms), publication JSON.
static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 't', 0)
end
local top = redis.call('HINCRBY', KEYS[1], 't', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], string.format('%d-0', top), 'd', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], 'P' .. epoch .. ' ' .. string.format('%d', top) .. ' ' .. ARGV[4])
return {top, epoch}
"#,
    )
});

/// Reads or creates the meta, then selects. ARGV: epoch for a new stream, TTL of a quiet stream
/// (ms), mode ('' position only, 'f' XRANGE, 'r' XREVRANGE), the caller's epoch ('' none), the
/// lowest acceptable first kept offset ('' no check), range bounds, COUNT ('' all).
/// Returns {epoch, top, 1 if unrecoverable else 0, entries}.
static HISTORY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 't', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  top = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
  if top == 0 and redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
end
local mode = ARGV[3]
if mode == '' then return {epoch, top, 0, {}} end
if ARGV[4] ~= '' and ARGV[4] ~= epoch then return {epoch, top, 1, {}} end
if ARGV[5] ~= '' then
  local first = top + 1
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if #head > 0 then first = tonumber(string.match(head[1][1], '^%d+')) end
  if tonumber(ARGV[5]) < first then return {epoch, top, 1, {}} end
end
local cmd = 'XRANGE'
if mode == 'r' then cmd = 'XREVRANGE' end
local items
if ARGV[8] == '' then
  items = redis.call(cmd, KEYS[2], ARGV[6], ARGV[7])
else
  items = redis.call(cmd, KEYS[2], ARGV[6], ARGV[7], 'COUNT', ARGV[8])
end
return {epoch, top, 0, items}
"#,
    )
});

/// Writes presence entries. ARGV: TTL (ms), then client, info pairs.
static PRESENCE_ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local ttl = tonumber(ARGV[1])
local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], expires, ARGV[i])
end
for _, k in ipairs(KEYS) do
  if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
return 1
"#,
    )
});

/// Drops expired entries, then returns HGETALL (ARGV[1] 'p') or {clients, distinct users}.
static PRESENCE_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #gone > 0 then
  for _, c in ipairs(gone) do redis.call('HDEL', KEYS[1], c) end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
if ARGV[1] == 'p' then return redis.call('HGETALL', KEYS[1]) end
local vals = redis.call('HVALS', KEYS[1])
local users, n = {}, 0
for _, v in ipairs(vals) do
  local ok, info = pcall(cjson.decode, v)
  if ok and type(info) == 'table' and type(info.user) == 'string' and not users[info.user] then
    users[info.user] = true
    n = n + 1
  end
end
return {#vals, n}
"#,
    )
});

/// Key names (see the module doc).
struct Keys {
    prefix: String,
    /// `{p}:ch:` and `{p}:topic:`, to tell deliveries apart.
    channel_prefix: String,
    topic_prefix: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            channel_prefix: format!("{prefix}:ch:"),
            topic_prefix: format!("{prefix}:topic:"),
        }
    }
    fn meta(&self, channel: &str) -> String {
        format!("{}:meta:{channel}", self.prefix)
    }
    fn stream(&self, channel: &str) -> String {
        format!("{}:stream:{channel}", self.prefix)
    }
    fn channel(&self, channel: &str) -> String {
        format!("{}{channel}", self.channel_prefix)
    }
    fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.topic_prefix)
    }
    fn presence(&self, channel: &str) -> String {
        format!("{}:presence:{channel}", self.prefix)
    }
    fn presence_exp(&self, channel: &str) -> String {
        format!("{}:presence-exp:{channel}", self.prefix)
    }
}

/// The name the engine's subscribed connection gives itself (CLIENT SETNAME takes no spaces).
pub fn pubsub_client_name(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    format!("{clean}:pubsub")
}

/// Connects to Redis at `url` (`redis://[user:password@]host[:port][/db]` or
/// `redis+unix:///path`), opens the subscribed connection and starts the engine's tasks.
/// Fails with `Unavailable` within a few seconds when Redis cannot be reached.
pub async fn connect(url: &str, opts: EngineOptions) -> Result<Engine, BrokerError> {
    let client = Client::open(url).map_err(|e| unavailable("bad redis url", e))?;
    let info = client.get_connection_info();
    let addr = match info.addr() {
        ConnectionAddr::Tcp(host, port) => Addr::Tcp(host.clone(), *port),
        ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
        _ => {
            return Err(BrokerError::Unavailable(
                "redis over TLS is not supported by this build".into(),
            ))
        }
    };
    let target = Target {
        addr,
        username: info.redis_settings().username().map(str::to_owned),
        password: info.redis_settings().password().map(str::to_owned),
        client_name: pubsub_client_name(&opts.prefix),
    };
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    let conn = run(
        CONNECT_TIMEOUT,
        ConnectionManager::new_with_config(client, config),
    )
    .await?;
    let first = pubsub::open(&target)
        .await
        .map_err(|e| BrokerError::Unavailable(format!("redis pub/sub: {e}")))?;

    let shared = Arc::new(Shared {
        keys: Keys::new(&opts.prefix),
        handler: OnceLock::new(),
    });
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    let task = pubsub::Task::new(target, shared.clone(), rx, opts.shutdown.clone());
    tokio::spawn(task.run(first));

    let presence = Arc::new(PresenceInner {
        conn: conn.clone(),
        keys: Keys::new(&opts.prefix),
        ttl: opts.presence_ttl,
        own: Mutex::new(HashMap::new()),
    });
    tokio::spawn(heartbeat(
        Arc::downgrade(&presence),
        opts.presence_ttl,
        opts.shutdown.clone(),
    ));

    Ok(Engine {
        broker: Arc::new(RedisBroker {
            shared,
            conn,
            requests: tx,
            history_max_ttl: opts.history_max_ttl,
        }),
        presence: Arc::new(RedisPresence { inner: presence }),
    })
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("{what}: {e}"))
}

/// Runs a Redis call within `limit`.
async fn run<T>(
    limit: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable("redis", e)),
        Err(_) => Err(BrokerError::Unavailable(
            "redis did not answer in time".into(),
        )),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What the pub/sub task and the broker share.
struct Shared {
    keys: Keys,
    handler: OnceLock<Weak<dyn BrokerEventHandler>>,
}

impl Shared {
    fn handler(&self) -> Option<Arc<dyn BrokerEventHandler>> {
        self.handler.get().and_then(Weak::upgrade)
    }
}

impl Deliver for Shared {
    fn message(&self, key: &[u8], payload: Bytes) {
        let Some(handler) = self.handler() else {
            return;
        };
        if let Some(name) = key.strip_prefix(self.keys.topic_prefix.as_bytes()) {
            match std::str::from_utf8(name) {
                Ok(topic) => handler.handle_message(topic, payload),
                Err(_) => tracing::warn!("dropping a message on a topic whose name is not UTF-8"),
            }
            return;
        }
        let Some(name) = key.strip_prefix(self.keys.channel_prefix.as_bytes()) else {
            return;
        };
        let Ok(channel) = std::str::from_utf8(name) else {
            tracing::warn!("dropping a message on a channel whose name is not UTF-8");
            return;
        };
        match decode(&payload) {
            Ok(Event::Publication(p, epoch)) => {
                handler.handle_publication(channel, Arc::new(p), epoch)
            }
            Ok(Event::Join(info)) => handler.handle_join(channel, &info),
            Ok(Event::Leave(info)) => handler.handle_leave(channel, &info),
            Err(e) => tracing::warn!(channel, "dropping a malformed redis pub/sub payload: {e}"),
        }
    }

    fn reconnected(&self) {
        if let Some(h) = self.handler() {
            h.handle_reconnect();
        }
    }
}

#[derive(Debug)]
enum Event<'a> {
    Publication(Publication, &'a str),
    Join(ClientInfo),
    Leave(ClientInfo),
}

/// `P{epoch} {offset} {json}`.
fn encode_publication(epoch: &str, offset: u64, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + epoch.len() + 24);
    out.push(b'P');
    out.extend_from_slice(epoch.as_bytes());
    out.push(b' ');
    out.extend_from_slice(offset.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(json);
    out
}

fn decode(payload: &[u8]) -> Result<Event<'_>, String> {
    let (&kind, rest) = payload.split_first().ok_or("empty payload")?;
    match kind {
        b'P' => {
            let mut parts = rest.splitn(3, |&b| b == b' ');
            let (Some(epoch), Some(offset), Some(json)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err("publication header incomplete".into());
            };
            let epoch = std::str::from_utf8(epoch).map_err(|_| "epoch is not UTF-8")?;
            if offset.is_empty() || !offset.iter().all(u8::is_ascii_digit) {
                return Err("bad offset".into());
            }
            let offset = std::str::from_utf8(offset)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("offset out of range")?;
            let mut p: Publication = serde_json::from_slice(json).map_err(|e| e.to_string())?;
            p.offset = offset;
            Ok(Event::Publication(p, epoch))
        }
        b'J' => Ok(Event::Join(
            serde_json::from_slice(rest).map_err(|e| e.to_string())?,
        )),
        b'L' => Ok(Event::Leave(
            serde_json::from_slice(rest).map_err(|e| e.to_string())?,
        )),
        other => Err(format!("unknown kind byte {other:#04x}")),
    }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn bad_reply(what: &str) -> BrokerError {
    tracing::warn!("unexpected reply from redis to {what}");
    BrokerError::Unavailable(format!("unexpected reply from redis to {what}"))
}

/// The broker half of the engine. See the module doc.
pub struct RedisBroker {
    shared: Arc<Shared>,
    conn: ConnectionManager,
    /// To the pub/sub task; bounded, callers wait (within their timeout) when it is full.
    requests: mpsc::Sender<Request>,
    history_max_ttl: Duration,
}

impl RedisBroker {
    async fn pubsub(
        &self,
        make: impl FnOnce(oneshot::Sender<()>) -> Request,
    ) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        let call = async {
            self.requests
                .send(make(tx))
                .await
                .map_err(|_| BrokerError::Unavailable("redis engine stopped".into()))?;
            rx.await
                .map_err(|_| BrokerError::Unavailable("redis engine stopped".into()))
        };
        match tokio::time::timeout(RESPONSE_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => Err(BrokerError::Unavailable(
                "redis did not confirm the subscription in time".into(),
            )),
        }
    }

    async fn publish_raw(&self, key: String, payload: Vec<u8>) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        run(
            RESPONSE_TIMEOUT,
            ::redis::cmd("PUBLISH")
                .arg(key)
                .arg(payload)
                .query_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
    }

    async fn publish_info(
        &self,
        channel: &str,
        kind: u8,
        info: &ClientInfo,
    ) -> Result<(), BrokerError> {
        let mut payload = vec![kind];
        serde_json::to_writer(&mut payload, info).map_err(|e| unavailable("encode", e))?;
        self.publish_raw(self.shared.keys.channel(channel), payload)
            .await
    }
}

#[async_trait]
impl Broker for RedisBroker {
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
        let publication = Publication {
            offset: 0,
            data,
            info,
            tags: opts.tags.clone(),
        };
        let json = serde_json::to_vec(&publication).map_err(|e| unavailable("encode", e))?;
        let keys = &self.shared.keys;
        if opts.history_size == 0 {
            self.publish_raw(keys.channel(channel), encode_publication("", 0, &json))
                .await?;
            return Ok(StreamPosition::default());
        }
        let mut conn = self.conn.clone();
        let mut call = PUBLISH.prepare_invoke();
        call.key(keys.meta(channel))
            .key(keys.stream(channel))
            .key(keys.channel(channel))
            .arg(new_epoch())
            .arg(opts.history_size)
            .arg(millis(opts.history_ttl))
            .arg(json);
        let reply: Value = run(RESPONSE_TIMEOUT, call.invoke_async(&mut conn)).await?;
        match &reply {
            Value::Array(v) if v.len() == 2 => {
                let offset = as_int(&v[0]).and_then(|n| u64::try_from(n).ok());
                let epoch = as_bytes(&v[1]).and_then(|b| std::str::from_utf8(b).ok());
                match (offset, epoch) {
                    (Some(offset), Some(epoch)) => Ok(StreamPosition {
                        offset,
                        epoch: epoch.to_owned(),
                    }),
                    _ => Err(bad_reply("publish")),
                }
            }
            _ => Err(bad_reply("publish")),
        }
    }

    async fn broadcast(
        &self,
        channel: &str,
        publication: Arc<Publication>,
    ) -> Result<(), BrokerError> {
        let json = serde_json::to_vec(&*publication).map_err(|e| unavailable("encode", e))?;
        self.publish_raw(
            self.shared.keys.channel(channel),
            encode_publication("", publication.offset, &json),
        )
        .await
    }

    async fn publish_join(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        self.publish_info(channel, b'J', info).await
    }

    async fn publish_leave(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        self.publish_info(channel, b'L', info).await
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let key = self.shared.keys.channel(channel).into_bytes();
        self.pubsub(|tx| Request::Subscribe(key, tx)).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let key = self.shared.keys.channel(channel).into_bytes();
        self.pubsub(|tx| Request::Unsubscribe(key, tx)).await
    }

    async fn history(
        &self,
        channel: &str,
        filter: &HistoryFilter,
    ) -> Result<HistoryPage, BrokerError> {
        let limit = filter.limit.unwrap_or(usize::MAX);
        let count = match filter.limit {
            None => String::new(),
            Some(n) => n.min(i64::MAX as usize).to_string(),
        };
        // (mode, caller's epoch, trim check, range bounds): the rules of MemoryBroker's select.
        let (mode, since_epoch, check, from, to) = match (&filter.since, filter.reverse) {
            _ if limit == 0 => ("", "", String::new(), String::new(), String::new()),
            (Some(s), false) => {
                let next = s.offset.saturating_add(1);
                (
                    "f",
                    s.epoch.as_str(),
                    next.to_string(),
                    format!("{next}-0"),
                    "+".into(),
                )
            }
            (Some(s), true) => (
                "r",
                s.epoch.as_str(),
                String::new(),
                format!("{}-0", s.offset.saturating_sub(1)),
                "-".into(),
            ),
            (None, false) => ("f", "", String::new(), "-".into(), "+".into()),
            (None, true) => ("r", "", String::new(), "+".into(), "-".into()),
        };
        let keys = &self.shared.keys;
        let mut conn = self.conn.clone();
        let mut call = HISTORY.prepare_invoke();
        call.key(keys.meta(channel))
            .key(keys.stream(channel))
            .arg(new_epoch())
            .arg(millis(self.history_max_ttl))
            .arg(mode)
            .arg(since_epoch)
            .arg(check)
            .arg(from)
            .arg(to)
            .arg(count);
        let reply: Value = run(RESPONSE_TIMEOUT, call.invoke_async(&mut conn)).await?;
        let Value::Array(parts) = reply else {
            return Err(bad_reply("history"));
        };
        let [epoch, top, status, items] = &parts[..] else {
            return Err(bad_reply("history"));
        };
        let (Some(epoch), Some(top), Some(status)) = (
            as_bytes(epoch).and_then(|b| std::str::from_utf8(b).ok()),
            as_int(top).and_then(|n| u64::try_from(n).ok()),
            as_int(status),
        ) else {
            return Err(bad_reply("history"));
        };
        if status != 0 {
            return Err(BrokerError::UnrecoverablePosition);
        }
        let publications = match items {
            Value::Array(items) => items
                .iter()
                .map(|item| entry(channel, item).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(bad_reply("history")),
        };
        Ok(HistoryPage {
            publications,
            position: StreamPosition {
                offset: top,
                epoch: epoch.to_owned(),
            },
        })
    }

    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError> {
        let keys = &self.shared.keys;
        let mut conn = self.conn.clone();
        run(
            RESPONSE_TIMEOUT,
            ::redis::cmd("DEL")
                .arg(keys.meta(channel))
                .arg(keys.stream(channel))
                .query_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
    }

    /// Nothing to do: Redis expires streams by their TTL.
    fn sweep(&self) {}

    async fn publish_message(&self, topic: &str, payload: Bytes) -> Result<(), BrokerError> {
        self.publish_raw(self.shared.keys.topic(topic), payload.to_vec())
            .await
    }

    async fn subscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        let key = self.shared.keys.topic(topic).into_bytes();
        self.pubsub(|tx| Request::Subscribe(key, tx)).await
    }

    async fn unsubscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        let key = self.shared.keys.topic(topic).into_bytes();
        self.pubsub(|tx| Request::Unsubscribe(key, tx)).await
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// A stream entry `[id, [field, value, ...]]` as a publication. A malformed entry fails the
/// read: skipping it would be a silent gap.
fn entry(channel: &str, item: &Value) -> Result<Publication, BrokerError> {
    let parsed = (|| {
        let Value::Array(parts) = item else {
            return None;
        };
        let [id, Value::Array(fields)] = &parts[..] else {
            return None;
        };
        let id = std::str::from_utf8(as_bytes(id)?).ok()?;
        let offset: u64 = id.strip_suffix("-0")?.parse().ok()?;
        let json = fields
            .chunks(2)
            .find(|kv| kv.len() == 2 && as_bytes(&kv[0]) == Some(b"d"))
            .and_then(|kv| as_bytes(&kv[1]))?;
        let mut p: Publication = serde_json::from_slice(json).ok()?;
        p.offset = offset;
        Some(p)
    })();
    parsed.ok_or_else(|| {
        tracing::warn!(channel, "malformed entry in a redis history stream");
        BrokerError::Unavailable("malformed entry in a redis history stream".into())
    })
}

/// The presence half of the engine. See the module doc.
pub struct RedisPresence {
    inner: Arc<PresenceInner>,
}

struct PresenceInner {
    conn: ConnectionManager,
    keys: Keys,
    ttl: Duration,
    /// The entries this node added: channel -> client -> ClientInfo JSON. std Mutex: never
    /// held across an await.
    own: Mutex<HashMap<String, HashMap<String, String>>>,
}

impl PresenceInner {
    fn own(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, String>>> {
        self.own.lock().expect("presence lock poisoned")
    }

    fn forget(&self, channel: &str, client: &str) {
        let mut own = self.own();
        if let Some(m) = own.get_mut(channel) {
            m.remove(client);
            if m.is_empty() {
                own.remove(channel);
            }
        }
    }

    async fn write(&self, channel: &str, entries: &[(String, String)]) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let mut call = PRESENCE_ADD.prepare_invoke();
        call.key(self.keys.presence(channel))
            .key(self.keys.presence_exp(channel))
            .arg(millis(self.ttl));
        for (client, info) in entries {
            call.arg(client).arg(info);
        }
        run(RESPONSE_TIMEOUT, call.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    async fn delete(&self, channel: &str, clients: &[&str]) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        run(
            RESPONSE_TIMEOUT,
            ::redis::pipe()
                .atomic()
                .cmd("HDEL")
                .arg(self.keys.presence(channel))
                .arg(clients)
                .ignore()
                .cmd("ZREM")
                .arg(self.keys.presence_exp(channel))
                .arg(clients)
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await
    }

    async fn read(&self, channel: &str, mode: &str) -> Result<Value, BrokerError> {
        let mut conn = self.conn.clone();
        let mut call = PRESENCE_READ.prepare_invoke();
        call.key(self.keys.presence(channel))
            .key(self.keys.presence_exp(channel))
            .arg(mode);
        run(RESPONSE_TIMEOUT, call.invoke_async(&mut conn)).await
    }

    /// Writes this node's entries again. An entry removed while its chunk was in flight may
    /// have been written back; it is deleted again once the chunk is done.
    async fn heartbeat(&self) {
        let chunks: Vec<(String, Vec<(String, String)>)> = {
            let own = self.own();
            own.iter()
                .flat_map(|(channel, clients)| {
                    let entries: Vec<(String, String)> = clients
                        .iter()
                        .map(|(c, i)| (c.clone(), i.clone()))
                        .collect();
                    entries
                        .chunks(HEARTBEAT_CHUNK)
                        .map(|c| (channel.clone(), c.to_vec()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let failures = futures_util::stream::iter(chunks)
            .map(|(channel, entries)| async move {
                let r = self.write(&channel, &entries).await;
                let stale: Vec<&str> = {
                    let own = self.own();
                    let mine = own.get(&channel);
                    entries
                        .iter()
                        .map(|(c, _)| c.as_str())
                        .filter(|c| !mine.is_some_and(|m| m.contains_key(*c)))
                        .collect()
                };
                if !stale.is_empty() {
                    let _ = self.delete(&channel, &stale).await;
                }
                r.is_err()
            })
            .buffer_unordered(HEARTBEAT_CONCURRENCY)
            .filter(|failed| std::future::ready(*failed))
            .count()
            .await;
        if failures > 0 {
            tracing::debug!(
                failures,
                "redis presence heartbeat failed for some channels"
            );
        }
    }
}

async fn heartbeat(presence: Weak<PresenceInner>, ttl: Duration, shutdown: CancellationToken) {
    let period = (ttl / 3).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(p) = presence.upgrade() else {
            return;
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = p.heartbeat() => {}
        }
    }
}

#[async_trait]
impl PresenceStore for RedisPresence {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        let json = serde_json::to_string(info).map_err(|e| unavailable("encode", e))?;
        let p = &self.inner;
        p.own()
            .entry(channel.to_owned())
            .or_default()
            .insert(info.client.clone(), json.clone());
        let r = p
            .write(channel, &[(info.client.clone(), json.clone())])
            .await;
        if r.is_err() {
            // The caller treats the client as not added; keep no heartbeat for it.
            let mut own = p.own();
            if let Some(m) = own.get_mut(channel) {
                if m.get(&info.client) == Some(&json) {
                    m.remove(&info.client);
                }
                if m.is_empty() {
                    own.remove(channel);
                }
            }
        }
        r
    }

    async fn remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        self.inner.forget(channel, client);
        self.inner.delete(channel, &[client]).await
    }

    async fn presence(&self, channel: &str) -> Result<HashMap<String, ClientInfo>, BrokerError> {
        let Value::Array(flat) = self.inner.read(channel, "p").await? else {
            return Err(bad_reply("presence"));
        };
        let mut out = HashMap::with_capacity(flat.len() / 2);
        for kv in flat.chunks(2) {
            let [k, v] = kv else {
                return Err(bad_reply("presence"));
            };
            let (Some(client), Some(json)) = (
                as_bytes(k).and_then(|b| std::str::from_utf8(b).ok()),
                as_bytes(v),
            ) else {
                return Err(bad_reply("presence"));
            };
            match serde_json::from_slice::<ClientInfo>(json) {
                Ok(info) => {
                    out.insert(client.to_owned(), info);
                }
                Err(e) => tracing::warn!(channel, client, "malformed redis presence entry: {e}"),
            }
        }
        Ok(out)
    }

    async fn stats(&self, channel: &str) -> Result<(u32, u32), BrokerError> {
        match self.inner.read(channel, "s").await? {
            Value::Array(v) if v.len() == 2 => {
                let n = |v: &Value| as_int(v).and_then(|n| u32::try_from(n).ok());
                match (n(&v[0]), n(&v[1])) {
                    (Some(clients), Some(users)) => Ok((clients, users)),
                    _ => Err(bad_reply("presence stats")),
                }
            }
            _ => Err(bad_reply("presence stats")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_payload_round_trips() {
        let p = Publication {
            offset: 0,
            data: RawValue::from_string(r#"{"a":1}"#.into()).unwrap(),
            info: None,
            tags: None,
        };
        let json = serde_json::to_vec(&p).unwrap();
        let wire = encode_publication("ep0ch", 42, &json);
        assert!(wire.starts_with(b"Pep0ch 42 {"));
        match decode(&wire).unwrap() {
            Event::Publication(p, epoch) => {
                assert_eq!(epoch, "ep0ch");
                assert_eq!(p.offset, 42);
                assert_eq!(p.data.get(), r#"{"a":1}"#);
            }
            other => panic!("{other:?}"),
        }
        match decode(&encode_publication("", 7, &json)).unwrap() {
            Event::Publication(p, "") => assert_eq!(p.offset, 7),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for bad in [
            &b""[..],
            b"X{}",
            b"P",
            b"Pe 1",
            b"Pe x {\"data\":1}",
            b"Pe -1 {\"data\":1}",
            b"Pe 99999999999999999999999 {\"data\":1}",
            b"Pe 1 {\"data\":",
            b"Pe 1 {}",
            b"J{\"user\":1}",
            b"L",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(
            decode(br#"J{"user":"u","client":"c"}"#),
            Ok(Event::Join(_))
        ));
    }

    #[test]
    fn client_name_has_no_spaces() {
        assert_eq!(pubsub_client_name("a b\n"), "a_b_:pubsub");
    }
}
