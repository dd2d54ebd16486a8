//! The in-memory engine: one node, history rings and presence in process memory.
//!
//! Publishing to a channel takes that channel's stream lock, assigns the next offset, appends
//! to the ring and hands the publication to the node's handler before releasing the lock, so
//! deliveries leave in offset order. History is lost on restart, and every stream then starts
//! with a new epoch: clients holding an old position get `recovered: false`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use switchboard_protocol::client::{ClientInfo, Publication, StreamPosition};
use switchboard_protocol::RawValue;

use crate::broker::{
    Broker, BrokerError, BrokerEventHandler, HistoryFilter, HistoryPage, PresenceStore,
    PublishOptions,
};

struct Stream {
    epoch: String,
    top: u64,
    items: VecDeque<Arc<Publication>>,
    expires_at: Instant,
}

impl Stream {
    fn new(now: Instant) -> Self {
        Stream {
            epoch: new_epoch(),
            top: 0,
            items: VecDeque::new(),
            expires_at: now,
        }
    }
    fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }
}

/// A short random identifier for a stream's lifetime.
pub fn new_epoch() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..8)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// One node's engine.
///
/// Memory is bounded by activity: a stream lives `history_ttl` after its last publication, and
/// a stream that was only read (a subscribe or history call on a quiet channel) lives
/// `idle_ttl` after the last read. Either way an expired stream is dropped whole, and the next
/// one for that channel starts with a new epoch, so positions from the old one are refused
/// (`recovered: false`), never misread.
pub struct MemoryBroker {
    handler: OnceLock<Weak<dyn BrokerEventHandler>>,
    /// One stream per channel with history. std Mutex: held only for in-memory work and the
    /// synchronous hand-off to the handler, never across an await.
    streams: DashMap<Arc<str>, Arc<Mutex<Stream>>>,
    idle_ttl: Duration,
    /// Node topics subscribed (one node: a message goes back to this node when subscribed).
    topics: Mutex<HashSet<String>>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(Duration::from_secs(300))
    }
}

impl MemoryBroker {
    /// `idle_ttl`: how long a stream without publications is kept after it was last read.
    pub fn new(idle_ttl: Duration) -> Self {
        MemoryBroker {
            handler: OnceLock::new(),
            streams: DashMap::new(),
            idle_ttl,
            topics: Mutex::new(HashSet::new()),
        }
    }

    fn handler(&self) -> Option<Arc<dyn BrokerEventHandler>> {
        self.handler.get().and_then(Weak::upgrade)
    }

    fn stream(&self, channel: &str) -> Arc<Mutex<Stream>> {
        if let Some(s) = self.streams.get(channel) {
            return s.clone();
        }
        self.streams
            .entry(Arc::from(channel))
            .or_insert_with(|| Arc::new(Mutex::new(Stream::new(Instant::now() + self.idle_ttl))))
            .clone()
    }
}

fn expired(s: &Stream, now: Instant) -> bool {
    now >= s.expires_at
}

#[async_trait]
impl Broker for MemoryBroker {
    fn register(&self, handler: Weak<dyn BrokerEventHandler>) {
        let _ = self.handler.set(handler);
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
        let handler = self.handler();
        if opts.history_size == 0 {
            if let Some(h) = handler {
                h.handle_publication(channel, Arc::new(publication), "");
            }
            return Ok(StreamPosition::default());
        }
        let stream = self.stream(channel);
        let mut s = stream.lock().expect("stream lock poisoned");
        let now = Instant::now();
        if expired(&s, now) {
            *s = Stream::new(now);
        }
        s.top += 1;
        publication.offset = s.top;
        let publication = Arc::new(publication);
        s.items.push_back(publication.clone());
        while s.items.len() > opts.history_size {
            s.items.pop_front();
        }
        s.expires_at = now + opts.history_ttl;
        let position = s.position();
        if let Some(h) = handler {
            h.handle_publication(channel, publication, &position.epoch);
        }
        Ok(position)
    }

    async fn broadcast(
        &self,
        channel: &str,
        publication: Arc<Publication>,
    ) -> Result<(), BrokerError> {
        if let Some(h) = self.handler() {
            h.handle_publication(channel, publication, "");
        }
        Ok(())
    }

    async fn publish_join(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        if let Some(h) = self.handler() {
            h.handle_join(channel, info);
        }
        Ok(())
    }

    async fn publish_leave(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        if let Some(h) = self.handler() {
            h.handle_leave(channel, info);
        }
        Ok(())
    }

    async fn subscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn history(
        &self,
        channel: &str,
        filter: &HistoryFilter,
    ) -> Result<HistoryPage, BrokerError> {
        let stream = self.stream(channel);
        let mut s = stream.lock().expect("stream lock poisoned");
        let now = Instant::now();
        if expired(&s, now) {
            *s = Stream::new(now + self.idle_ttl);
        } else if s.top == 0 {
            s.expires_at = s.expires_at.max(now + self.idle_ttl);
        }
        Ok(HistoryPage {
            publications: select(&s, filter)?,
            position: s.position(),
        })
    }

    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError> {
        self.streams.remove(channel);
        Ok(())
    }

    fn sweep(&self) {
        let now = Instant::now();
        self.streams
            .retain(|_, s| !expired(&s.lock().expect("stream lock poisoned"), now));
    }

    async fn publish_message(&self, topic: &str, payload: Bytes) -> Result<(), BrokerError> {
        let subscribed = self
            .topics
            .lock()
            .expect("topics lock poisoned")
            .contains(topic);
        if subscribed {
            if let Some(h) = self.handler() {
                h.handle_message(topic, payload);
            }
        }
        Ok(())
    }

    async fn subscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        self.topics
            .lock()
            .expect("topics lock poisoned")
            .insert(topic.to_owned());
        Ok(())
    }

    async fn unsubscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        self.topics
            .lock()
            .expect("topics lock poisoned")
            .remove(topic);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

/// Applies a history filter to a stream's ring.
fn select(s: &Stream, f: &HistoryFilter) -> Result<Vec<Arc<Publication>>, BrokerError> {
    let limit = f.limit.unwrap_or(usize::MAX);
    if limit == 0 {
        return Ok(Vec::new());
    }
    let first = s.items.front().map_or(s.top + 1, |p| p.offset);
    let out: Vec<_> = match (&f.since, f.reverse) {
        (Some(since), _) if !since.epoch.is_empty() && since.epoch != s.epoch => {
            return Err(BrokerError::UnrecoverablePosition)
        }
        (Some(since), false) => {
            // The next offset the client wants; past u64::MAX there is none to give.
            if since.offset.checked_add(1).is_none_or(|next| next < first) {
                return Err(BrokerError::UnrecoverablePosition);
            }
            s.items
                .iter()
                .filter(|p| p.offset > since.offset)
                .take(limit)
                .cloned()
                .collect()
        }
        (Some(since), true) => s
            .items
            .iter()
            .rev()
            .filter(|p| p.offset < since.offset)
            .take(limit)
            .cloned()
            .collect(),
        (None, false) => s.items.iter().take(limit).cloned().collect(),
        (None, true) => s.items.iter().rev().take(limit).cloned().collect(),
    };
    Ok(out)
}

/// Presence kept in process memory.
#[derive(Default)]
pub struct MemoryPresence {
    channels: DashMap<String, HashMap<String, ClientInfo>>,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl PresenceStore for MemoryPresence {
    async fn add(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        self.channels
            .entry(channel.to_owned())
            .or_default()
            .insert(info.client.clone(), info.clone());
        Ok(())
    }

    async fn remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        self.channels.remove_if_mut(channel, |_, m| {
            m.remove(client);
            m.is_empty()
        });
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<HashMap<String, ClientInfo>, BrokerError> {
        Ok(self
            .channels
            .get(channel)
            .map(|m| m.clone())
            .unwrap_or_default())
    }

    async fn stats(&self, channel: &str) -> Result<(u32, u32), BrokerError> {
        Ok(self.channels.get(channel).map_or((0, 0), |m| {
            let users: HashSet<&str> = m.values().map(|i| i.user.as_str()).collect();
            (m.len() as u32, users.len() as u32)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: u64) -> Box<RawValue> {
        RawValue::from_string(n.to_string()).unwrap()
    }

    fn opts(size: usize) -> PublishOptions {
        PublishOptions {
            history_size: size,
            history_ttl: Duration::from_secs(60),
            tags: None,
        }
    }

    #[tokio::test]
    async fn offsets_increase_and_ring_trims() {
        let b = MemoryBroker::default();
        for i in 1..=5 {
            let pos = b.publish("c", data(i), None, &opts(3)).await.unwrap();
            assert_eq!(pos.offset, i);
        }
        let page = b
            .history(
                "c",
                &HistoryFilter {
                    limit: None,
                    ..Default::default()
                },
            )
            .await;
        let page = page.unwrap();
        let offs: Vec<_> = page.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offs, vec![3, 4, 5]);
        assert_eq!(page.position.offset, 5);
    }

    #[tokio::test]
    async fn since_reverse_and_limits() {
        let b = MemoryBroker::default();
        let mut epoch = String::new();
        for i in 1..=10 {
            epoch = b
                .publish("c", data(i), None, &opts(100))
                .await
                .unwrap()
                .epoch;
        }
        let since = Some(StreamPosition {
            offset: 4,
            epoch: epoch.clone(),
        });
        let get = |since: Option<StreamPosition>, limit, reverse| {
            let f = HistoryFilter {
                since,
                limit,
                reverse,
            };
            let b = &b;
            async move {
                b.history("c", &f)
                    .await
                    .map(|p| p.publications.iter().map(|p| p.offset).collect::<Vec<_>>())
            }
        };
        assert_eq!(
            get(since.clone(), Some(3), false).await.unwrap(),
            vec![5, 6, 7]
        );
        assert_eq!(get(since.clone(), Some(2), true).await.unwrap(), vec![3, 2]);
        assert_eq!(get(None, Some(2), true).await.unwrap(), vec![10, 9]);
        assert_eq!(get(None, Some(0), false).await.unwrap(), Vec::<u64>::new());
        let wrong = Some(StreamPosition {
            offset: 4,
            epoch: "other".into(),
        });
        assert!(matches!(
            get(wrong, None, false).await,
            Err(BrokerError::UnrecoverablePosition)
        ));
        // Found while writing the fuzz targets: `offset + 1` overflowed (a panic in debug).
        let last = Some(StreamPosition {
            offset: u64::MAX,
            epoch: epoch.clone(),
        });
        assert!(matches!(
            get(last, None, false).await,
            Err(BrokerError::UnrecoverablePosition)
        ));
    }

    #[tokio::test]
    async fn trimmed_position_is_unrecoverable_and_ttl_starts_new_epoch() {
        let b = MemoryBroker::default();
        let mut o = opts(2);
        o.history_ttl = Duration::from_millis(20);
        let first = b.publish("c", data(1), None, &o).await.unwrap();
        for i in 2..=5 {
            b.publish("c", data(i), None, &o).await.unwrap();
        }
        let f = HistoryFilter {
            since: Some(StreamPosition {
                offset: 1,
                epoch: first.epoch.clone(),
            }),
            ..Default::default()
        };
        assert!(matches!(
            b.history("c", &f).await,
            Err(BrokerError::UnrecoverablePosition)
        ));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let page = b.history("c", &HistoryFilter::default()).await.unwrap();
        assert_ne!(page.position.epoch, first.epoch);
        assert_eq!(page.position.offset, 0);
    }

    #[tokio::test]
    async fn read_only_streams_expire_so_memory_stays_bounded() {
        let b = MemoryBroker::new(Duration::from_millis(20));
        let first = b
            .history("quiet", &HistoryFilter::default())
            .await
            .unwrap()
            .position;
        assert_eq!(b.streams.len(), 1);
        tokio::time::sleep(Duration::from_millis(30)).await;
        b.sweep();
        assert_eq!(b.streams.len(), 0);
        let again = b
            .history("quiet", &HistoryFilter::default())
            .await
            .unwrap()
            .position;
        assert_ne!(
            first.epoch, again.epoch,
            "a recreated stream is a new epoch"
        );
    }

    #[tokio::test]
    async fn presence_counts_users() {
        let p = MemoryPresence::new();
        let info = |u: &str, c: &str| ClientInfo {
            user: u.into(),
            client: c.into(),
            conn_info: None,
            chan_info: None,
        };
        p.add("c", &info("u1", "a")).await.unwrap();
        p.add("c", &info("u1", "b")).await.unwrap();
        p.add("c", &info("u2", "c")).await.unwrap();
        assert_eq!(p.stats("c").await.unwrap(), (3, 2));
        p.remove("c", "b").await.unwrap();
        assert_eq!(p.presence("c").await.unwrap().len(), 2);
    }
}
