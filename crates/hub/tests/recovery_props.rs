//! Property test of history and recovery through the hub's public API: under any
//! interleaving of publishes, client disconnects, reconnects and broker restarts, a simulated
//! client ends with every publication exactly once and in order, except those it was
//! explicitly told it cannot recover (`recovered: false`).
//!
//! The client does what the server's connection does (`crates/server/src/conn/session.rs`):
//! to subscribe it holds the channel's pushes, adds itself to the hub, reads the stream
//! position and, when it has a position, recovers with the server's rule (`read_position`:
//! all or nothing, contiguous from its offset, same epoch, at most `recovery_max`
//! publications); then it releases the held pushes above what the reply covered.
//! Publications may arrive between the subscribe and the history read (they are held, and
//! must be neither lost nor doubled). A broker restart is a new `MemoryBroker` (a new epoch)
//! behind a new `Hub`: the client's connection is gone and it reconnects.
//!
//! Between the engine and the hub sits a [`Shuffler`]: it holds what the engine delivers and
//! hands it to the hub's `BrokerEventHandler` when the test says, in any order, with one
//! delivery dropped or doubled, as publications from several nodes arrive. The hub must put
//! them back in order, fill what is missing from history (its `HistorySource` reads the
//! engine), or tell the client to resubscribe (`Sink::resubscribe`); the client then does
//! what the SDK does on that unsubscribe (code 2500): subscribe again, recovering from its
//! last position. Gap checks run on tokio's paused clock.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use switchboard_hub::hub::{HistorySource, REORDER_WAIT};
use switchboard_hub::{
    Broker, BrokerError, BrokerEventHandler, Delivery, HistoryFilter, HistoryPage, Hub,
    MemoryBroker, MemoryPresence, PublishOptions, Sink, Subscriber,
};
use switchboard_protocol::client::{ClientInfo, Publication, StreamPosition};
use switchboard_protocol::RawValue;

const CHANNEL: &str = "news";

/// What the hub did across all cases (held, gap fills, duplicates dropped, resubscribes):
/// the run checks that the property was exercised on each path.
static COVERAGE: Mutex<[u64; 4]> = Mutex::new([0; 4]);

fn count(hub: &Hub) {
    let m = hub.metrics();
    let mut c = COVERAGE.lock().unwrap();
    for (i, v) in [
        m.held.get(),
        m.gap_fills.get(),
        m.duplicates.get(),
        m.resubscribes.get(),
    ]
    .into_iter()
    .enumerate()
    {
        c[i] += v;
    }
}

/// The client's outbound path: holds pushes while subscribing, then passes them on.
#[derive(Default)]
struct ClientSink(Mutex<SinkState>);

#[derive(Default)]
struct SinkState {
    /// Told to resubscribe: pushes are dropped until the client subscribes again.
    blocked: bool,
    /// `Some` while a subscribe is in flight (`Conn::hold`).
    held: Option<Vec<(u64, u64)>>,
    /// Pushes the client has been sent and not yet processed: (offset, n).
    inbox: Vec<(u64, u64)>,
}

/// The `n` a test publication carries.
fn n_of(payload: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(payload).expect("a JSON push");
    v["push"]["pub"]["data"]["n"]
        .as_u64()
        .expect("a test publication")
}

impl Sink for ClientSink {
    fn deliver(&self, d: &Delivery) {
        let mut s = self.0.lock().unwrap();
        if s.blocked {
            return;
        }
        let push = (d.offset, n_of(&d.payload));
        match &mut s.held {
            Some(held) => held.push(push),
            None => s.inbox.push(push),
        }
    }

    fn resubscribe(&self, _channel: &str) {
        // `Conn::resubscribe`: later pushes are dropped; what was sent before stays.
        self.0.lock().unwrap().blocked = true;
    }
}

impl ClientSink {
    fn blocked(&self) -> bool {
        self.0.lock().unwrap().blocked
    }

    fn hold(&self) {
        self.0.lock().unwrap().held = Some(Vec::new());
    }

    /// `Conn::release`: the held pushes above `after` go out, in order.
    fn release(&self, after: u64) {
        let mut s = self.0.lock().unwrap();
        let held = s.held.take().unwrap_or_default();
        s.inbox.extend(held.into_iter().filter(|(o, _)| *o > after));
    }

    fn take(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.0.lock().unwrap().inbox)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Publish(u8),
    /// The shuffler hands over what it holds: permuted by the seed, and maybe one dropped
    /// (then the engine reports a reconnect) or one doubled.
    Deliver {
        seed: u64,
        drop: bool,
        double: bool,
    },
    Disconnect,
    /// Reconnect (if disconnected), with `u8` publications landing between the subscribe
    /// and the history read.
    Reconnect(u8),
    /// The engine restarts: history lost, a new epoch; connections drop.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..4).prop_map(Op::Publish),
        4 => (any::<u64>(), proptest::bool::weighted(0.2), proptest::bool::weighted(0.2))
            .prop_map(|(seed, drop, double)| Op::Deliver { seed, drop, double }),
        2 => Just(Op::Disconnect),
        3 => (0u8..3).prop_map(Op::Reconnect),
        1 => Just(Op::Restart),
    ]
}

/// Holds the engine's deliveries until the test hands them to the hub (see the module docs).
#[derive(Default)]
struct Shuffler {
    hub: OnceLock<Weak<dyn BrokerEventHandler>>,
    pending: Mutex<Vec<(Arc<Publication>, String)>>,
}

impl Shuffler {
    fn hub(&self) -> Option<Arc<dyn BrokerEventHandler>> {
        self.hub.get().and_then(Weak::upgrade)
    }

    /// Hands over what is pending, permuted by `seed` (maybe dropping or doubling one).
    fn deliver(&self, seed: u64, drop: bool, double: bool) {
        let mut batch = std::mem::take(&mut *self.pending.lock().unwrap());
        let mut x = seed | 1;
        for i in (1..batch.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            batch.swap(i, (x % (i as u64 + 1)) as usize);
        }
        if drop && !batch.is_empty() {
            batch.remove((x % batch.len() as u64) as usize);
        }
        if double && !batch.is_empty() {
            let again = batch[(x >> 7) as usize % batch.len()].clone();
            batch.push(again);
        }
        if let Some(hub) = self.hub() {
            for (p, epoch) in batch {
                hub.handle_publication(CHANNEL, p, &epoch);
            }
            if drop {
                // The engine contract: deliveries go missing only across a lost connection
                // to the service, which the engine reports once it is back. (A delivery
                // lost without it, with no publication after it, would go unnoticed.)
                hub.handle_reconnect();
            }
        }
    }
}

impl BrokerEventHandler for Shuffler {
    fn handle_publication(&self, _channel: &str, publication: Arc<Publication>, epoch: &str) {
        self.pending
            .lock()
            .unwrap()
            .push((publication, epoch.to_string()));
    }
    fn handle_join(&self, _: &str, _: &ClientInfo) {}
    fn handle_leave(&self, _: &str, _: &ClientInfo) {}
    fn handle_message(&self, _: &str, _: Bytes) {}
    fn handle_reconnect(&self) {}
}

/// The engine as the hub sees it: a `MemoryBroker` whose deliveries go through a
/// [`Shuffler`].
struct ShuffledBroker {
    engine: MemoryBroker,
    shuffler: Arc<Shuffler>,
}

#[async_trait]
impl Broker for ShuffledBroker {
    fn register(&self, handler: Weak<dyn BrokerEventHandler>) {
        let _ = self.shuffler.hub.set(handler);
        let me: Arc<dyn BrokerEventHandler> = self.shuffler.clone();
        self.engine.register(Arc::downgrade(&me));
    }
    async fn publish(
        &self,
        channel: &str,
        data: Box<RawValue>,
        info: Option<ClientInfo>,
        opts: &PublishOptions,
    ) -> Result<StreamPosition, BrokerError> {
        self.engine.publish(channel, data, info, opts).await
    }
    async fn broadcast(&self, channel: &str, p: Arc<Publication>) -> Result<(), BrokerError> {
        self.engine.broadcast(channel, p).await
    }
    async fn publish_join(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        self.engine.publish_join(channel, info).await
    }
    async fn publish_leave(&self, channel: &str, info: &ClientInfo) -> Result<(), BrokerError> {
        self.engine.publish_leave(channel, info).await
    }
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.engine.subscribe(channel).await
    }
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.engine.unsubscribe(channel).await
    }
    async fn history(&self, channel: &str, f: &HistoryFilter) -> Result<HistoryPage, BrokerError> {
        self.engine.history(channel, f).await
    }
    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError> {
        self.engine.remove_history(channel).await
    }
    async fn publish_message(&self, topic: &str, payload: Bytes) -> Result<(), BrokerError> {
        self.engine.publish_message(topic, payload).await
    }
    async fn subscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        self.engine.subscribe_topic(topic).await
    }
    async fn unsubscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        self.engine.unsubscribe_topic(topic).await
    }
    fn name(&self) -> &'static str {
        "shuffled-memory"
    }
}

/// The hub's gap fills read the engine's history, as the server's do for channels without
/// an owner.
struct EngineHistory(Arc<ShuffledBroker>);

#[async_trait]
impl HistorySource for EngineHistory {
    async fn history(&self, channel: &str, f: &HistoryFilter) -> Result<HistoryPage, BrokerError> {
        self.0.history(channel, f).await
    }
}

struct Node {
    hub: Hub,
    shuffler: Arc<Shuffler>,
    _history: Arc<dyn HistorySource>,
}

fn node() -> Node {
    let shuffler = Arc::new(Shuffler::default());
    let broker = Arc::new(ShuffledBroker {
        engine: MemoryBroker::default(),
        shuffler: shuffler.clone(),
    });
    let hub = Hub::new(broker.clone(), Arc::new(MemoryPresence::new()));
    let history: Arc<dyn HistorySource> = Arc::new(EngineHistory(broker));
    hub.set_history_source(Arc::downgrade(&history));
    Node {
        hub,
        shuffler,
        _history: history,
    }
}

/// Lets the hub's gap checks run (the clock is paused: sleeping advances it at once).
async fn settle() {
    for _ in 0..4 {
        tokio::time::sleep(REORDER_WAIT * 2).await;
    }
}

/// The server's recovery rule (`Session::read_position`).
async fn read_position(
    broker: &dyn Broker,
    recover: Option<&StreamPosition>,
    max: usize,
) -> Result<(Vec<Arc<Publication>>, StreamPosition, bool), BrokerError> {
    let top_only = HistoryFilter {
        since: None,
        limit: Some(0),
        reverse: false,
    };
    let Some(since) = recover else {
        let page = broker.history(CHANNEL, &top_only).await?;
        return Ok((Vec::new(), page.position, false));
    };
    let filter = HistoryFilter {
        since: Some(since.clone()),
        limit: Some(max + 1),
        reverse: false,
    };
    match broker.history(CHANNEL, &filter).await {
        Ok(page) => {
            let contiguous = match page.publications.first() {
                Some(first) => first.offset == since.offset + 1,
                None => page.position.offset == since.offset,
            };
            let ok =
                page.position.epoch == since.epoch && contiguous && page.publications.len() <= max;
            let pubs = if ok { page.publications } else { Vec::new() };
            Ok((pubs, page.position, ok))
        }
        Err(BrokerError::UnrecoverablePosition) => {
            let page = broker.history(CHANNEL, &top_only).await?;
            Ok((Vec::new(), page.position, false))
        }
        Err(e) => Err(e),
    }
}

/// What the simulated client knows and got.
struct Client {
    sink: Arc<ClientSink>,
    connected: bool,
    /// Its position in the stream: the last offset it saw, and that stream's epoch.
    pos: Option<StreamPosition>,
    /// The `n` of every publication it got, in the order it got them.
    got: Vec<u64>,
    /// Publications it was told it cannot recover.
    told_lost: HashSet<u64>,
    resubscribes: usize,
    /// The engine generation its position belongs to.
    generation: usize,
}

impl Client {
    /// A publication, live or recovered: it must be the next offset of the stream.
    fn accept(&mut self, offset: u64, n: u64) -> Result<(), TestCaseError> {
        let pos = self
            .pos
            .as_mut()
            .ok_or_else(|| TestCaseError::fail("a publication before a position"))?;
        prop_assert_eq!(
            offset,
            pos.offset + 1,
            "offset {} (n {}) after {}: a gap, a duplicate or out of order",
            offset,
            n,
            pos.offset
        );
        pos.offset = offset;
        self.got.push(n);
        Ok(())
    }

    fn drain(&mut self) -> Result<(), TestCaseError> {
        for (offset, n) in self.sink.take() {
            self.accept(offset, n)?;
        }
        Ok(())
    }
}

struct Sim {
    node: Node,
    opts: PublishOptions,
    recovery_max: usize,
    /// Every publication's `n`, in publishing order (n = its index).
    published: Vec<u64>,
    /// Restarts so far, and where in `published` the current engine's stream began.
    generation: usize,
    epoch_start: usize,
}

impl Sim {
    async fn publish(&mut self) {
        let n = self.published.len() as u64;
        let data = RawValue::from_string(format!("{{\"n\":{n}}}")).unwrap();
        self.node
            .hub
            .broker
            .publish(CHANNEL, data, None, &self.opts)
            .await
            .expect("the memory engine publishes");
        self.published.push(n);
    }

    /// `Session::join_channel` for a subscribe with recovery from the client's position.
    async fn subscribe(&mut self, c: &mut Client, interleave: u8) -> Result<(), TestCaseError> {
        c.resubscribes += 1;
        c.sink.hold();
        let sub = Subscriber {
            client: Arc::from(format!("client-{}", c.resubscribes)),
            sink: c.sink.clone(),
            join_leave: false,
        };
        self.node.hub.add_subscriber(CHANNEL, sub).await.unwrap();
        for _ in 0..interleave {
            // Arrives while the subscribe is in flight: held, then released above the reply.
            self.publish().await;
            self.node.shuffler.deliver(0, false, false);
        }
        let read_at = self.published.len();
        let broker = self.node.hub.broker.clone();
        let (pubs, position, recovered) =
            read_position(&*broker, c.pos.as_ref(), self.recovery_max)
                .await
                .unwrap();
        let after = pubs.last().map_or(position.offset, |p| p.offset);
        self.node.hub.observe_position(CHANNEL, &position);
        // Recovery must succeed exactly when the rule allows it: a position in this
        // engine's stream, with no more missed than the ring keeps and the cap allows.
        let top = (read_at - self.epoch_start) as u64;
        prop_assert_eq!(position.offset, top, "the stream's top offset");
        let should = c.pos.as_ref().is_some_and(|p| {
            let missed = top.saturating_sub(p.offset) as usize;
            c.generation == self.generation
                && p.offset <= top
                && missed <= self.recovery_max
                && missed <= self.opts.history_size
        });
        prop_assert_eq!(
            recovered,
            should,
            "recovered from {:?} at top {}",
            c.pos,
            top
        );
        c.generation = self.generation;
        if recovered {
            for p in &pubs {
                c.accept(p.offset, n_of_publication(p))?;
            }
            prop_assert_eq!(c.pos.as_ref().map(|p| p.offset), Some(position.offset));
        } else {
            // Told: everything published up to the position it was given and not yet
            // received is lost; it continues from there.
            let last = c.got.last().copied();
            for &n in &self.published[..read_at] {
                if last.is_none_or(|l| n > l) {
                    c.told_lost.insert(n);
                }
            }
            c.pos = Some(position);
        }
        c.sink.release(after);
        c.connected = true;
        c.drain()
    }

    /// Processes what the client was sent; when the hub told it to resubscribe, does what the
    /// SDK does on that unsubscribe: leaves, and subscribes again recovering from its
    /// position (which may itself be told to resubscribe: repeat).
    async fn resubscribe_if_told(&mut self, c: &mut Client) -> Result<(), TestCaseError> {
        c.drain()?;
        for _ in 0..8 {
            if !(c.connected && c.sink.blocked()) {
                return Ok(());
            }
            self.disconnect(c).await;
            c.sink = Arc::new(ClientSink::default());
            self.subscribe(c, 0).await?;
            self.node.shuffler.deliver(0, false, false);
            settle().await;
            c.drain()?;
        }
        Err(TestCaseError::fail("told to resubscribe over and over"))
    }

    async fn disconnect(&mut self, c: &mut Client) {
        let id = format!("client-{}", c.resubscribes);
        self.node.hub.remove_subscriber(CHANNEL, &id).await.unwrap();
        c.connected = false;
    }
}

fn n_of_publication(p: &Publication) -> u64 {
    let v: serde_json::Value = serde_json::from_str(p.data.get()).unwrap();
    v["n"].as_u64().unwrap()
}

async fn check(
    ops: Vec<Op>,
    history_size: usize,
    recovery_max: usize,
) -> Result<(), TestCaseError> {
    let mut sim = Sim {
        node: node(),
        opts: PublishOptions {
            history_size,
            history_ttl: Duration::from_secs(300),
            tags: None,
        },
        recovery_max,
        published: Vec::new(),
        generation: 0,
        epoch_start: 0,
    };
    let mut c = Client {
        sink: Arc::new(ClientSink::default()),
        connected: false,
        pos: None,
        got: Vec::new(),
        told_lost: HashSet::new(),
        resubscribes: 0,
        generation: 0,
    };
    sim.subscribe(&mut c, 0).await?;
    for op in ops {
        match op {
            Op::Publish(k) => {
                for _ in 0..k {
                    sim.publish().await;
                }
            }
            Op::Deliver { seed, drop, double } => {
                sim.node.shuffler.deliver(seed, drop, double);
            }
            Op::Disconnect if c.connected => sim.disconnect(&mut c).await,
            Op::Reconnect(k) if !c.connected => {
                c.sink = Arc::new(ClientSink::default());
                sim.subscribe(&mut c, k).await?;
            }
            Op::Restart => {
                count(&sim.node.hub);
                sim.node = node();
                sim.generation += 1;
                sim.epoch_start = sim.published.len();
                c.connected = false;
            }
            _ => {}
        }
        settle().await;
        sim.resubscribe_if_told(&mut c).await?;
    }
    // Everything in flight arrives, and the client catches up.
    sim.node.shuffler.deliver(0, false, false);
    settle().await;
    sim.resubscribe_if_told(&mut c).await?;
    if !c.connected {
        c.sink = Arc::new(ClientSink::default());
        sim.subscribe(&mut c, 0).await?;
    }
    sim.node.shuffler.deliver(0, false, false);
    settle().await;
    sim.resubscribe_if_told(&mut c).await?;
    count(&sim.node.hub);
    let want: Vec<u64> = sim
        .published
        .iter()
        .copied()
        .filter(|n| !c.told_lost.contains(n))
        .collect();
    prop_assert_eq!(
        &c.got,
        &want,
        "every publication exactly once, in order, unless told otherwise (lost: {:?})",
        c.told_lost
    );
    Ok(())
}

#[test]
fn clients_recover_everything_or_are_told() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    });
    let case = (
        proptest::collection::vec(op(), 0..40),
        1usize..10,
        1usize..8,
    );
    let result = runner.run(&case, |(ops, history_size, recovery_max)| {
        rt.block_on(check(ops, history_size, recovery_max))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let [held, gap_fills, duplicates, resubscribes] = *COVERAGE.lock().unwrap();
    eprintln!("hub: held {held}, gap fills {gap_fills}, duplicates {duplicates}, resubscribes {resubscribes}");
    assert!(
        held > 0 && gap_fills > 0 && duplicates > 0 && resubscribes > 0,
        "the cases did not reach every path of the hub's ordering"
    );
}
