//! A node's local channels: who is subscribed here, and fan-out of what the broker delivers.
//!
//! Fan-out encodes each push once ([`Delivery`]) and hands the same bytes to every subscriber's
//! [`Sink`]. The subscriber list of a channel is a copy-on-write `Arc<[Subscriber]>`: a
//! publisher clones the `Arc` under a short lock and iterates without holding it, so
//! subscribing never waits for a fan-out and a fan-out never waits for another.
//!
//! **Order.** A positioned channel's publications (offset > 0) leave the hub in offset order,
//! each once, with no gap, whatever order the broker delivered them in (publications made on
//! different nodes can cross on the way). Per channel the hub keeps the next offset it owes
//! its subscribers:
//! - the offset it expects is delivered at once, followed by any held ones it unblocks;
//! - an older offset is a duplicate and dropped;
//! - a newer one is held (at most [`REORDER_MAX`] per channel). If the gap is still open
//!   after [`REORDER_WAIT`], the hub reads the missing publications from the channel's history
//!   ([`HistorySource`]) and delivers them.
//! - When history cannot fill the gap (trimmed, another epoch, unavailable) or the hold
//!   overflows, every subscriber of the channel is told to resubscribe ([`Sink::resubscribe`]):
//!   the SDK then recovers from its last position, or learns `recovered: false`. Never a silent
//!   gap.
//!
//! The expected offset is learnt from the first subscriber's position read
//! ([`Hub::observe_position`]); until then publications are held. After the engine reconnects
//! ([`BrokerEventHandler::handle_reconnect`]) every positioned channel catches up from history
//! the same way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use prometheus::IntCounter;
use switchboard_protocol::client::{self, ClientInfo, JoinLeave, Publication, StreamPosition};

use crate::broker::{
    Broker, BrokerError, BrokerEventHandler, HistoryFilter, HistoryPage, PresenceStore,
};

/// How long publications after a gap wait for the missing ones before history is read.
pub const REORDER_WAIT: Duration = Duration::from_millis(100);
/// Publications a channel holds after a gap; past this its subscribers resubscribe.
pub const REORDER_MAX: usize = 4096;
/// Checks (one per [`REORDER_WAIT`]) a channel holds publications while no subscriber has
/// read its position, before it starts from the first one held.
const BASELINE_CHECKS: u32 = 50;
/// Failed history reads of one gap before its subscribers are told to resubscribe.
const FILL_ATTEMPTS: u32 = 3;

/// Where the hub reads a channel's missed publications: the channel owner's durable stream or
/// the broker's history (the server decides which).
#[async_trait]
pub trait HistorySource: Send + Sync {
    async fn history(
        &self,
        channel: &str,
        filter: &HistoryFilter,
    ) -> Result<HistoryPage, BrokerError>;
}

/// Receives node topic messages ([`Broker::publish_message`]).
pub trait MessageHandler: Send + Sync {
    fn handle_message(&self, topic: &str, payload: Bytes);
}

/// One push, encoded once and shared by every subscriber it goes to.
pub struct Delivery {
    pub channel: Arc<str>,
    /// The publication's offset; 0 for joins, leaves and channels without history.
    pub offset: u64,
    /// The JSON push.
    pub payload: Bytes,
    framed: OnceLock<Bytes>,
}

impl Delivery {
    pub fn new(channel: Arc<str>, offset: u64, payload: Bytes) -> Self {
        Delivery {
            channel,
            offset,
            payload,
            framed: OnceLock::new(),
        }
    }

    /// The payload framed for a transport. The first caller frames it; the rest share the result.
    pub fn framed(&self, frame: impl FnOnce(&[u8]) -> Bytes) -> &Bytes {
        self.framed.get_or_init(|| frame(&self.payload))
    }
}

/// Where a subscriber's pushes go: a connection's outbound path. `deliver` must not block or
/// await; a sink that cannot keep up applies its own overflow policy (see the server's conn).
pub trait Sink: Send + Sync {
    fn deliver(&self, delivery: &Delivery);
    /// The hub cannot go on delivering `channel` to this subscriber in order without a gap.
    /// The sink must drop the channel's pushes from now on and have its client resubscribe
    /// with recovery (Centrifugo unsubscribe code 2500, insufficient state).
    fn resubscribe(&self, channel: &str);
}

#[derive(Clone)]
pub struct Subscriber {
    pub client: Arc<str>,
    pub sink: Arc<dyn Sink>,
    /// Receives join and leave pushes.
    pub join_leave: bool,
}

struct LocalChannel {
    name: Arc<str>,
    subscribers: Mutex<Arc<[Subscriber]>>,
    order: Mutex<Order>,
}

impl LocalChannel {
    fn new(name: &str) -> Self {
        LocalChannel {
            name: Arc::from(name),
            subscribers: Mutex::new(Arc::from(Vec::new())),
            order: Mutex::new(Order::default()),
        }
    }

    fn subs(&self) -> Arc<[Subscriber]> {
        self.subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .clone()
    }

    fn order(&self) -> MutexGuard<'_, Order> {
        self.order.lock().expect("order lock poisoned")
    }
}

/// A positioned channel's delivery state (see the module doc).
#[derive(Default)]
struct Order {
    /// The epoch `next` belongs to; "" until a publication or a position read names one.
    epoch: String,
    /// The next offset owed to subscribers; 0 while unknown.
    next: u64,
    /// Publications after a gap, by offset; at most [`REORDER_MAX`].
    held: BTreeMap<u64, Arc<Publication>>,
    /// A gap check task is scheduled.
    checking: bool,
    /// The engine reconnected: the next check reads history even without a visible gap.
    catch_up: bool,
}

/// Counters the server exports.
#[derive(Clone)]
pub struct HubMetrics {
    pub publications: IntCounter,
    pub deliveries: IntCounter,
    /// Publications that arrived ahead of a gap and were held.
    pub held: IntCounter,
    /// Publications read from history to fill a gap.
    pub gap_fills: IntCounter,
    /// Publications dropped as already delivered.
    pub duplicates: IntCounter,
    /// Subscribers told to resubscribe because a gap could not be filled.
    pub resubscribes: IntCounter,
}

impl Default for HubMetrics {
    fn default() -> Self {
        HubMetrics {
            publications: IntCounter::new(
                "switchboard_publications_total",
                "Publications fanned out on this node",
            )
            .expect("valid metric"),
            deliveries: IntCounter::new(
                "switchboard_deliveries_total",
                "Pushes handed to local subscribers",
            )
            .expect("valid metric"),
            held: IntCounter::new(
                "switchboard_reorder_held_total",
                "Publications that arrived ahead of a gap in offsets and were held",
            )
            .expect("valid metric"),
            gap_fills: IntCounter::new(
                "switchboard_gap_fills_total",
                "Publications read from history to fill a gap in offsets",
            )
            .expect("valid metric"),
            duplicates: IntCounter::new(
                "switchboard_duplicate_publications_total",
                "Publications dropped because their offset was already delivered",
            )
            .expect("valid metric"),
            resubscribes: IntCounter::new(
                "switchboard_insufficient_state_total",
                "Subscribers told to resubscribe because a gap in offsets could not be filled",
            )
            .expect("valid metric"),
        }
    }
}

struct Inner {
    channels: DashMap<Arc<str>, Arc<LocalChannel>>,
    metrics: HubMetrics,
    me: Weak<Inner>,
    history: OnceLock<Weak<dyn HistorySource>>,
    messages: OnceLock<Weak<dyn MessageHandler>>,
}

/// A node's channel registry, engine handles and fan-out. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<dyn PresenceStore>,
}

impl Hub {
    pub fn new(broker: Arc<dyn Broker>, presence: Arc<dyn PresenceStore>) -> Self {
        let inner = Arc::new_cyclic(|me| Inner {
            channels: DashMap::new(),
            metrics: HubMetrics::default(),
            me: me.clone(),
            history: OnceLock::new(),
            messages: OnceLock::new(),
        });
        let weak = Arc::downgrade(&inner);
        let handler: std::sync::Weak<dyn BrokerEventHandler> = weak;
        broker.register(handler);
        Hub {
            inner,
            broker,
            presence,
        }
    }

    pub fn metrics(&self) -> &HubMetrics {
        &self.inner.metrics
    }

    /// Sets where gaps are filled from. Called once at start; without it a gap that does not
    /// close by itself makes the channel's subscribers resubscribe.
    pub fn set_history_source(&self, source: Weak<dyn HistorySource>) {
        let _ = self.inner.history.set(source);
    }

    /// Sets who receives node topic messages. Called once at start.
    pub fn set_message_handler(&self, handler: Weak<dyn MessageHandler>) {
        let _ = self.inner.messages.set(handler);
    }

    /// A subscriber of `channel` read its stream position. The first read tells the hub
    /// which offset it owes next; held publications up to it are dropped (the subscriber has
    /// them from history, or starts after them) and the rest are delivered.
    pub fn observe_position(&self, channel: &str, position: &StreamPosition) {
        let Some(ch) = self.inner.channels.get(channel).map(|c| c.clone()) else {
            return;
        };
        let mut o = ch.order();
        if o.next == 0 {
            o.next = position.offset + 1;
            if o.epoch.is_empty() {
                o.epoch.clone_from(&position.epoch);
            }
            self.inner.drain(&ch, &mut o);
        }
    }

    /// Adds a local subscriber. The node subscribes to the channel on the broker when this is
    /// the channel's first local subscriber. Deliveries to `sub` start before this returns.
    pub async fn add_subscriber(&self, channel: &str, sub: Subscriber) -> Result<(), BrokerError> {
        let mut first = false;
        {
            let ch = self
                .inner
                .channels
                .entry(Arc::from(channel))
                .or_insert_with(|| {
                    first = true;
                    Arc::new(LocalChannel::new(channel))
                });
            let mut subs = ch.subscribers.lock().expect("subscribers lock poisoned");
            let mut next: Vec<Subscriber> = subs.iter().cloned().collect();
            next.push(sub);
            *subs = next.into();
        }
        if first {
            self.broker.subscribe(channel).await?;
        }
        Ok(())
    }

    /// Removes a local subscriber; unsubscribes the node from the broker when it was the last.
    pub async fn remove_subscriber(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let mut now_empty = false;
        if let Some(ch) = self.inner.channels.get(channel) {
            let mut subs = ch.subscribers.lock().expect("subscribers lock poisoned");
            let next: Vec<Subscriber> = subs
                .iter()
                .filter(|s| &*s.client != client)
                .cloned()
                .collect();
            now_empty = next.is_empty();
            *subs = next.into();
        }
        if now_empty {
            let removed = self.inner.channels.remove_if(channel, |_, ch| {
                ch.subscribers
                    .lock()
                    .expect("subscribers lock poisoned")
                    .is_empty()
            });
            if removed.is_some() {
                self.broker.unsubscribe(channel).await?;
            }
        }
        Ok(())
    }

    /// Channels with at least one local subscriber, with their subscriber counts.
    pub fn channels(&self) -> Vec<(String, usize)> {
        self.inner
            .channels
            .iter()
            .map(|e| {
                (
                    e.key().to_string(),
                    e.subscribers
                        .lock()
                        .expect("subscribers lock poisoned")
                        .len(),
                )
            })
            .collect()
    }

    pub fn num_subscribers(&self, channel: &str) -> usize {
        self.inner.channels.get(channel).map_or(0, |c| {
            c.subscribers
                .lock()
                .expect("subscribers lock poisoned")
                .len()
        })
    }
}

impl Inner {
    fn subscribers(&self, channel: &str) -> Option<(Arc<str>, Arc<[Subscriber]>)> {
        let ch = self.channels.get(channel)?;
        Some((ch.name.clone(), ch.subs()))
    }

    fn history_source(&self) -> Option<Arc<dyn HistorySource>> {
        self.history.get().and_then(Weak::upgrade)
    }

    /// Fans out one publication of a positioned channel, under its order lock.
    fn deliver(&self, ch: &LocalChannel, o: &mut Order, publication: &Publication) {
        o.next = publication.offset + 1;
        let payload = client::publication_push(&ch.name, publication);
        self.fan_out(ch.name.clone(), publication.offset, payload, &ch.subs());
    }

    /// Delivers the held publications that follow on from `next`; drops those before it.
    fn drain(&self, ch: &LocalChannel, o: &mut Order) {
        while let Some(entry) = o.held.first_entry() {
            let offset = *entry.key();
            if offset < o.next {
                entry.remove();
                self.metrics.duplicates.inc();
            } else if offset == o.next {
                let p = entry.remove();
                self.deliver(ch, o, &p);
            } else {
                break;
            }
        }
    }

    /// Tells every subscriber of `ch` to resubscribe and forgets the channel's position.
    fn resubscribe_all(&self, ch: &LocalChannel, o: &mut Order) {
        let subs = ch.subs();
        tracing::info!(
            channel = %ch.name,
            subscribers = subs.len(),
            next = o.next,
            "gap in offsets cannot be filled; subscribers resubscribe"
        );
        for s in subs.iter() {
            s.sink.resubscribe(&ch.name);
        }
        self.metrics.resubscribes.inc_by(subs.len() as u64);
        *o = Order {
            checking: o.checking,
            ..Order::default()
        };
    }

    /// Schedules a gap check for `ch` unless one is already scheduled.
    fn schedule_check(&self, ch: &Arc<LocalChannel>, o: &mut Order) {
        if o.checking {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait on: the gap cannot be filled later.
            self.resubscribe_all(ch, o);
            return;
        };
        o.checking = true;
        rt.spawn(check_gaps(self.me.clone(), ch.clone()));
    }

    fn fan_out(&self, channel: Arc<str>, offset: u64, payload: Vec<u8>, subs: &[Subscriber]) {
        let delivery = Delivery::new(channel, offset, Bytes::from(payload));
        let mut n = 0;
        for s in subs {
            s.sink.deliver(&delivery);
            n += 1;
        }
        self.metrics.deliveries.inc_by(n);
    }

    fn join_leave(&self, channel: &str, key: &str, info: &ClientInfo) {
        let Some((name, subs)) = self.subscribers(channel) else {
            return;
        };
        let wanted: Vec<Subscriber> = subs.iter().filter(|s| s.join_leave).cloned().collect();
        if wanted.is_empty() {
            return;
        }
        let mut payload = Vec::new();
        client::encode_push(&mut payload, channel, key, &JoinLeave { info });
        self.fan_out(name, 0, payload, &wanted);
    }
}

/// Waits for a channel's gap to close by itself, then fills it from history; subscribers
/// resubscribe when that fails. Runs until nothing is held.
async fn check_gaps(inner: Weak<Inner>, ch: Arc<LocalChannel>) {
    let mut baseline_checks = 0;
    let mut failures = 0;
    loop {
        tokio::time::sleep(REORDER_WAIT).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let (filter, catch_up) = {
            let mut o = ch.order();
            if o.held.is_empty() && !o.catch_up {
                o.checking = false;
                return;
            }
            if o.next == 0 {
                // No subscriber has read the position yet (its read is under way).
                baseline_checks += 1;
                if baseline_checks >= BASELINE_CHECKS {
                    if let Some(first) = o.held.keys().next().copied() {
                        o.next = first;
                        inner.drain(&ch, &mut o);
                    }
                    o.catch_up = false;
                }
                continue;
            }
            let want = match o.held.keys().next() {
                Some(first) if !o.catch_up => (*first - o.next) as usize,
                _ => REORDER_MAX,
            };
            let filter = HistoryFilter {
                since: Some(StreamPosition {
                    offset: o.next - 1,
                    epoch: o.epoch.clone(),
                }),
                limit: Some(want),
                reverse: false,
            };
            (filter, std::mem::take(&mut o.catch_up))
        };
        let read = match inner.history_source() {
            Some(source) => source.history(&ch.name, &filter).await,
            None => Err(BrokerError::Unavailable("no history source".into())),
        };
        let mut o = ch.order();
        match read {
            Ok(page) => {
                failures = 0;
                let before = o.next;
                for p in &page.publications {
                    if p.offset == o.next {
                        inner.metrics.gap_fills.inc();
                        inner.deliver(&ch, &mut o, p);
                    }
                }
                inner.drain(&ch, &mut o);
                let stuck = o.next == before && !o.held.is_empty() && !catch_up;
                if stuck {
                    // History does not have what is missing.
                    inner.resubscribe_all(&ch, &mut o);
                }
            }
            Err(BrokerError::UnrecoverablePosition) => inner.resubscribe_all(&ch, &mut o),
            Err(e) => {
                failures += 1;
                tracing::warn!(channel = %ch.name, error = %e, "gap fill: history read failed");
                if failures >= FILL_ATTEMPTS {
                    inner.resubscribe_all(&ch, &mut o);
                } else {
                    o.catch_up |= catch_up;
                }
            }
        }
    }
}

impl BrokerEventHandler for Inner {
    fn handle_publication(&self, channel: &str, publication: Arc<Publication>, epoch: &str) {
        self.metrics.publications.inc();
        let Some(ch) = self.channels.get(channel).map(|c| c.clone()) else {
            return;
        };
        let offset = publication.offset;
        if offset == 0 {
            let payload = client::publication_push(channel, &publication);
            self.fan_out(ch.name.clone(), 0, payload, &ch.subs());
            return;
        }
        let mut o = ch.order();
        if !epoch.is_empty() && !o.epoch.is_empty() && epoch != o.epoch {
            // The stream was lost and started again: positions of the old one mean nothing.
            self.resubscribe_all(&ch, &mut o);
            o.epoch = epoch.to_owned();
            o.next = offset + 1;
            return;
        }
        if o.epoch.is_empty() {
            epoch.clone_into(&mut o.epoch);
        }
        if o.next != 0 && offset < o.next {
            self.metrics.duplicates.inc();
        } else if o.next == offset {
            self.deliver(&ch, &mut o, &publication);
            if !o.held.is_empty() {
                self.drain(&ch, &mut o);
            }
        } else if o.held.len() >= REORDER_MAX {
            self.resubscribe_all(&ch, &mut o);
        } else {
            o.held.insert(offset, publication);
            self.metrics.held.inc();
            self.schedule_check(&ch, &mut o);
        }
    }

    fn handle_join(&self, channel: &str, info: &ClientInfo) {
        self.join_leave(channel, "join", info)
    }

    fn handle_leave(&self, channel: &str, info: &ClientInfo) {
        self.join_leave(channel, "leave", info)
    }

    fn handle_message(&self, topic: &str, payload: Bytes) {
        if let Some(h) = self.messages.get().and_then(Weak::upgrade) {
            h.handle_message(topic, payload);
        }
    }

    fn handle_reconnect(&self) {
        let channels: Vec<Arc<LocalChannel>> =
            self.channels.iter().map(|e| e.value().clone()).collect();
        for ch in channels {
            let mut o = ch.order();
            if o.next != 0 {
                o.catch_up = true;
                self.schedule_check(&ch, &mut o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{HistoryFilter, PublishOptions};
    use crate::memory::{MemoryBroker, MemoryPresence};
    use std::time::Duration;
    use switchboard_protocol::RawValue;

    #[derive(Default)]
    struct Collect(
        Mutex<Vec<(u64, String)>>,
        std::sync::atomic::AtomicUsize,
        Mutex<Vec<String>>,
    );
    impl Sink for Collect {
        fn deliver(&self, d: &Delivery) {
            // Framing runs once per delivery, whoever asks first.
            d.framed(|p| {
                self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Bytes::copy_from_slice(p)
            });
            self.0
                .lock()
                .unwrap()
                .push((d.offset, String::from_utf8(d.payload.to_vec()).unwrap()));
        }
        fn resubscribe(&self, channel: &str) {
            self.2.lock().unwrap().push(channel.to_string());
        }
    }

    fn info(c: &str) -> ClientInfo {
        ClientInfo {
            user: "u".into(),
            client: c.into(),
            conn_info: None,
            chan_info: None,
        }
    }

    #[tokio::test]
    async fn fans_out_once_encoded_in_offset_order() {
        let hub = Hub::new(
            Arc::new(MemoryBroker::default()),
            Arc::new(MemoryPresence::new()),
        );
        let a = Arc::new(Collect::default());
        let b = Arc::new(Collect::default());
        for (id, s, jl) in [("a", &a, true), ("b", &b, false)] {
            let sub = Subscriber {
                client: id.into(),
                sink: s.clone(),
                join_leave: jl,
            };
            hub.add_subscriber("news", sub).await.unwrap();
        }
        let top = HistoryFilter {
            limit: Some(0),
            ..Default::default()
        };
        let pos = hub.broker.history("news", &top).await.unwrap().position;
        hub.observe_position("news", &pos);
        let opts = PublishOptions {
            history_size: 10,
            history_ttl: Duration::from_secs(5),
            tags: None,
        };
        for i in 0..3 {
            let data = RawValue::from_string(format!("{{\"n\":{i}}}")).unwrap();
            hub.broker.publish("news", data, None, &opts).await.unwrap();
        }
        hub.broker.publish_join("news", &info("c")).await.unwrap();
        let got_a = a.0.lock().unwrap().clone();
        let got_b = b.0.lock().unwrap().clone();
        assert_eq!(
            got_a.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 0]
        );
        assert_eq!(got_b.len(), 3, "b did not ask for join/leave");
        assert_eq!(
            got_a[1].1,
            r#"{"push":{"channel":"news","pub":{"offset":2,"data":{"n":1}}}}"#
        );
        assert_eq!(a.1.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(
            b.1.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "framed once, by a"
        );
        assert_eq!(hub.metrics().deliveries.get(), 7);

        hub.remove_subscriber("news", "a").await.unwrap();
        hub.remove_subscriber("news", "b").await.unwrap();
        assert!(hub.channels().is_empty());
    }

    fn publication(offset: u64) -> Arc<Publication> {
        Arc::new(Publication {
            offset,
            data: RawValue::from_string(offset.to_string()).unwrap(),
            info: None,
            tags: None,
        })
    }

    /// A channel's durable stream for gap fills: publications 1..=top, minus `missing`.
    struct Stream {
        top: u64,
        missing: Vec<u64>,
        epoch: &'static str,
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl HistorySource for Stream {
        async fn history(
            &self,
            _channel: &str,
            f: &HistoryFilter,
        ) -> Result<HistoryPage, BrokerError> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let since = f.since.clone().unwrap_or_default();
            if since.epoch != self.epoch {
                return Err(BrokerError::UnrecoverablePosition);
            }
            let publications = (since.offset + 1..=self.top)
                .filter(|o| !self.missing.contains(o))
                .take(f.limit.unwrap_or(usize::MAX))
                .map(publication)
                .collect();
            Ok(HistoryPage {
                publications,
                position: StreamPosition {
                    offset: self.top,
                    epoch: self.epoch.into(),
                },
            })
        }
    }

    async fn subscribed(hub: &Hub, at: u64) -> Arc<Collect> {
        let c = Arc::new(Collect::default());
        let sub = Subscriber {
            client: "a".into(),
            sink: c.clone(),
            join_leave: false,
        };
        hub.add_subscriber("ch", sub).await.unwrap();
        hub.observe_position(
            "ch",
            &StreamPosition {
                offset: at,
                epoch: "e1".into(),
            },
        );
        c
    }

    fn offsets(c: &Collect) -> Vec<u64> {
        c.0.lock().unwrap().iter().map(|x| x.0).collect()
    }

    fn hub_with(stream: Option<Arc<Stream>>) -> Hub {
        let hub = Hub::new(
            Arc::new(MemoryBroker::default()),
            Arc::new(MemoryPresence::new()),
        );
        if let Some(s) = stream {
            let s: Arc<dyn HistorySource> = s;
            hub.set_history_source(Arc::downgrade(&s));
            std::mem::forget(s); // lives for the test
        }
        hub
    }

    #[tokio::test]
    async fn reorders_crossed_publications_and_drops_duplicates() {
        let hub = hub_with(None);
        let c = subscribed(&hub, 10).await;
        for o in [12, 13, 11, 11, 9, 14] {
            hub.inner.handle_publication("ch", publication(o), "e1");
        }
        assert_eq!(offsets(&c), vec![11, 12, 13, 14]);
        assert_eq!(hub.metrics().duplicates.get(), 2);
        assert!(c.2.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn publications_before_the_first_position_read_wait_for_it() {
        let hub = hub_with(None);
        let c = Arc::new(Collect::default());
        let sub = Subscriber {
            client: "a".into(),
            sink: c.clone(),
            join_leave: false,
        };
        hub.add_subscriber("ch", sub).await.unwrap();
        // 6 crosses 5 on the way; the subscriber's read says the stream is at 4.
        hub.inner.handle_publication("ch", publication(6), "e1");
        hub.inner.handle_publication("ch", publication(4), "e1");
        hub.observe_position(
            "ch",
            &StreamPosition {
                offset: 4,
                epoch: "e1".into(),
            },
        );
        hub.inner.handle_publication("ch", publication(5), "e1");
        assert_eq!(offsets(&c), vec![5, 6]);
    }

    #[tokio::test]
    async fn a_gap_that_stays_open_is_filled_from_history() {
        let stream = Arc::new(Stream {
            top: 20,
            missing: vec![],
            epoch: "e1",
            reads: Default::default(),
        });
        let hub = hub_with(Some(stream.clone()));
        let c = subscribed(&hub, 10).await;
        hub.inner.handle_publication("ch", publication(11), "e1");
        hub.inner.handle_publication("ch", publication(14), "e1");
        assert_eq!(offsets(&c), vec![11]);
        tokio::time::sleep(REORDER_WAIT * 3).await;
        assert_eq!(offsets(&c), vec![11, 12, 13, 14]);
        assert_eq!(hub.metrics().gap_fills.get(), 2);
        hub.inner.handle_publication("ch", publication(15), "e1");
        assert_eq!(offsets(&c).last(), Some(&15));
        assert!(c.2.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_gap_history_cannot_fill_makes_subscribers_resubscribe() {
        let stream = Arc::new(Stream {
            top: 20,
            missing: vec![12],
            epoch: "e1",
            reads: Default::default(),
        });
        let hub = hub_with(Some(stream.clone()));
        let c = subscribed(&hub, 10).await;
        hub.inner.handle_publication("ch", publication(11), "e1");
        hub.inner.handle_publication("ch", publication(13), "e1");
        tokio::time::sleep(REORDER_WAIT * 3).await;
        assert_eq!(offsets(&c), vec![11], "nothing after the hole");
        assert_eq!(*c.2.lock().unwrap(), vec!["ch".to_string()]);
        assert_eq!(hub.metrics().resubscribes.get(), 1);
    }

    #[tokio::test]
    async fn a_new_epoch_makes_subscribers_resubscribe() {
        let hub = hub_with(None);
        let c = subscribed(&hub, 10).await;
        hub.inner.handle_publication("ch", publication(11), "e1");
        hub.inner.handle_publication("ch", publication(1), "e2");
        assert_eq!(offsets(&c), vec![11]);
        assert_eq!(*c.2.lock().unwrap(), vec!["ch".to_string()]);
    }

    #[tokio::test]
    async fn after_a_reconnect_missed_publications_come_from_history() {
        let stream = Arc::new(Stream {
            top: 13,
            missing: vec![],
            epoch: "e1",
            reads: Default::default(),
        });
        let hub = hub_with(Some(stream.clone()));
        let c = subscribed(&hub, 10).await;
        hub.inner.handle_publication("ch", publication(11), "e1");
        // 12 and 13 were published while the engine was away; nothing else comes.
        hub.inner.handle_reconnect();
        tokio::time::sleep(REORDER_WAIT * 3).await;
        assert_eq!(offsets(&c), vec![11, 12, 13]);
        assert!(c.2.lock().unwrap().is_empty());
    }
}
