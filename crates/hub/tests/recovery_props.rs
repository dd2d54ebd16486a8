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
//! Deliveries reach the hub's `BrokerEventHandler` in offset order here (the memory engine
//! publishes under the stream lock).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use switchboard_hub::{
    Broker, BrokerError, Delivery, HistoryFilter, Hub, MemoryBroker, MemoryPresence,
    PublishOptions, Sink, Subscriber,
};
use switchboard_protocol::client::{Publication, StreamPosition};
use switchboard_protocol::RawValue;

const CHANNEL: &str = "news";

/// The client's outbound path: holds pushes while subscribing, then passes them on.
#[derive(Default)]
struct ClientSink(Mutex<SinkState>);

#[derive(Default)]
struct SinkState {
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
        let push = (d.offset, n_of(&d.payload));
        match &mut s.held {
            Some(held) => held.push(push),
            None => s.inbox.push(push),
        }
    }
}

impl ClientSink {
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
        2 => Just(Op::Disconnect),
        3 => (0u8..3).prop_map(Op::Reconnect),
        1 => Just(Op::Restart),
    ]
}

struct Node {
    hub: Hub,
}

fn node() -> Node {
    Node {
        hub: Hub::new(
            Arc::new(MemoryBroker::default()),
            Arc::new(MemoryPresence::new()),
        ),
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
            self.publish().await;
        }
        let read_at = self.published.len();
        let broker = self.node.hub.broker.clone();
        let (pubs, position, recovered) =
            read_position(&*broker, c.pos.as_ref(), self.recovery_max)
                .await
                .unwrap();
        let after = pubs.last().map_or(position.offset, |p| p.offset);
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
            Op::Disconnect if c.connected => sim.disconnect(&mut c).await,
            Op::Reconnect(k) if !c.connected => {
                c.sink = Arc::new(ClientSink::default());
                sim.subscribe(&mut c, k).await?;
            }
            Op::Restart => {
                sim.node = node();
                sim.generation += 1;
                sim.epoch_start = sim.published.len();
                c.connected = false;
            }
            _ => {}
        }
        c.drain()?;
    }
    if !c.connected {
        c.sink = Arc::new(ClientSink::default());
        sim.subscribe(&mut c, 0).await?;
    }
    c.drain()?;
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
}
