//! The NATS engine against a real nats-server (`nats-server -js`), at 127.0.0.1:4222 or
//! `SWITCHBOARD_TEST_NATS_URL`. Each test uses its own random prefix, so its own stream and
//! bucket, and deletes them when it ends. Without a server the tests print `SKIP` and pass,
//! unless `CI` is set. Reconnects go through a TCP proxy in this file: the shared server is
//! never restarted.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use switchboard_engines::{nats, Engine, EngineOptions};
use switchboard_hub::{
    Broker, BrokerError, BrokerEventHandler, HistoryFilter, MemoryBroker, PublishOptions,
};
use switchboard_protocol::client::{ClientInfo, Publication, StreamPosition};
use switchboard_protocol::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const PRESENCE_TTL: Duration = Duration::from_secs(2);

fn nats_url() -> String {
    std::env::var("SWITCHBOARD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `host:port` of a `nats://[user:pass@]host:port` URL.
fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split(['/', ',']).next().unwrap_or(rest).to_owned()
}

/// The server's URL, or `None` (after a loud SKIP) when it is unreachable outside CI.
async fn nats_available() -> Option<String> {
    let url = nats_url();
    let addr = host_port(&url);
    let reachable = matches!(
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await,
        Ok(Ok(_))
    );
    if reachable {
        return Some(url);
    }
    if std::env::var_os("CI").is_some() {
        panic!("NATS is not reachable at {url} and CI is set: start `nats-server -js` or set SWITCHBOARD_TEST_NATS_URL");
    }
    eprintln!("\n*** SKIP: NATS is not reachable at {url}; start `nats-server -js` to run this test ***\n");
    None
}

macro_rules! require_nats {
    () => {
        match nats_available().await {
            Some(url) => url,
            None => return,
        }
    };
}

#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Pub {
        channel: String,
        offset: u64,
        epoch: String,
        data: String,
    },
    Join(String, String),
    Leave(String, String),
    Msg(String, Bytes),
}

/// Records what the engine hands to its node.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Ev>>,
    reconnects: AtomicUsize,
}

impl Recorder {
    fn events(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }

    /// (offset, epoch, data) of the publications received on `channel`, in arrival order.
    fn pubs(&self, channel: &str) -> Vec<(u64, String, String)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Ev::Pub {
                    channel: c,
                    offset,
                    epoch,
                    data,
                } if c == channel => Some((offset, epoch, data)),
                _ => None,
            })
            .collect()
    }

    fn push(&self, e: Ev) {
        self.events.lock().unwrap().push(e);
    }
}

impl BrokerEventHandler for Recorder {
    fn handle_publication(&self, channel: &str, publication: Arc<Publication>, epoch: &str) {
        self.push(Ev::Pub {
            channel: channel.into(),
            offset: publication.offset,
            epoch: epoch.into(),
            data: publication.data.get().trim_matches('"').to_owned(),
        });
    }
    fn handle_join(&self, channel: &str, info: &ClientInfo) {
        self.push(Ev::Join(channel.into(), info.client.clone()));
    }
    fn handle_leave(&self, channel: &str, info: &ClientInfo) {
        self.push(Ev::Leave(channel.into(), info.client.clone()));
    }
    fn handle_message(&self, topic: &str, payload: Bytes) {
        self.push(Ev::Msg(topic.into(), payload));
    }
    fn handle_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::SeqCst);
    }
}

struct Node {
    engine: Engine,
    rec: Arc<Recorder>,
    shutdown: CancellationToken,
}

impl Node {
    fn broker(&self) -> &dyn Broker {
        &*self.engine.broker
    }
}

/// One test's deployment: a random prefix, and the cleanup of its stream and bucket on drop.
struct Deployment {
    url: String,
    prefix: String,
    shutdowns: Mutex<Vec<CancellationToken>>,
}

impl Deployment {
    fn new(url: String) -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let suffix: String = (0..10)
            .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
            .collect();
        Deployment {
            url,
            prefix: format!("sbtest{suffix}"),
            shutdowns: Mutex::new(Vec::new()),
        }
    }

    fn opts(&self) -> EngineOptions {
        let shutdown = CancellationToken::new();
        self.shutdowns.lock().unwrap().push(shutdown.clone());
        EngineOptions {
            prefix: self.prefix.clone(),
            presence_ttl: PRESENCE_TTL,
            history_max_size: 1000,
            history_max_ttl: Duration::from_secs(3600),
            shutdown,
        }
    }

    async fn node(&self) -> Node {
        self.node_at(&self.url.clone()).await
    }

    async fn node_at(&self, url: &str) -> Node {
        let opts = self.opts();
        let shutdown = opts.shutdown.clone();
        let engine = nats::connect(url, opts).await.expect("connect to NATS");
        let rec = Arc::new(Recorder::default());
        let handler: Weak<dyn BrokerEventHandler> = Arc::downgrade(&rec) as _;
        engine.broker.register(handler);
        Node {
            engine,
            rec,
            shutdown,
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for t in self.shutdowns.lock().unwrap().iter() {
            t.cancel();
        }
        let url = self.url.clone();
        let stream = nats::history_stream_name(&self.prefix);
        let bucket = nats::presence_bucket_name(&self.prefix);
        // Best effort, on a thread of its own: this may run inside a runtime, or while panicking.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(3), async_nats::connect(url)).await
                else {
                    return;
                };
                let js = async_nats::jetstream::new(client);
                let _ =
                    tokio::time::timeout(Duration::from_secs(3), js.delete_stream(&stream)).await;
                let _ = tokio::time::timeout(Duration::from_secs(3), js.delete_key_value(&bucket))
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn eventually(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn data(s: &str) -> Box<RawValue> {
    RawValue::from_string(format!("\"{s}\"")).unwrap()
}

fn popts(size: usize) -> PublishOptions {
    PublishOptions {
        history_size: size,
        history_ttl: Duration::from_secs(60),
        tags: None,
    }
}

fn info(user: &str, client: &str) -> ClientInfo {
    ClientInfo {
        user: user.into(),
        client: client.into(),
        conn_info: None,
        chan_info: None,
    }
}

fn filter(since: Option<StreamPosition>, limit: Option<usize>, reverse: bool) -> HistoryFilter {
    HistoryFilter {
        since,
        limit,
        reverse,
    }
}

fn pos(offset: u64, epoch: &str) -> Option<StreamPosition> {
    Some(StreamPosition {
        offset,
        epoch: epoch.into(),
    })
}

/// Offsets of a history page, or `None` for an unrecoverable position.
async fn offsets(b: &dyn Broker, channel: &str, f: &HistoryFilter) -> Option<Vec<u64>> {
    match b.history(channel, f).await {
        Ok(page) => Some(page.publications.iter().map(|p| p.offset).collect()),
        Err(BrokerError::UnrecoverablePosition) => None,
        Err(e) => panic!("history failed: {e}"),
    }
}

/// Channel names that are not valid NATS subject tokens, as every test's channel.
const CHANNEL: &str = "chat.room:1 #x*>";

#[tokio::test]
async fn two_nodes_deliver_to_each_other_in_offset_order() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let (a, b) = (d.node().await, d.node().await);
    assert_eq!(a.broker().name(), "nats");
    a.broker().subscribe(CHANNEL).await.unwrap();
    b.broker().subscribe(CHANNEL).await.unwrap();

    let publish_all = |node: &Node, tag: &'static str| {
        let broker = node.engine.broker.clone();
        async move {
            let mut out = Vec::new();
            for i in 1..=30 {
                let label = format!("{tag}-{i}");
                let p = broker
                    .publish(CHANNEL, data(&label), None, &popts(100))
                    .await
                    .unwrap();
                out.push((p.offset, p.epoch, label));
            }
            out
        }
    };
    let (from_a, from_b) = tokio::join!(publish_all(&a, "a"), publish_all(&b, "b"));
    let epoch = from_a[0].1.clone();
    assert!(from_a.iter().chain(&from_b).all(|(_, e, _)| *e == epoch));

    for node in [&a, &b] {
        eventually(
            "all 60 publications on both nodes",
            Duration::from_secs(5),
            || node.rec.pubs(CHANNEL).len() == 60,
        )
        .await;
        let got = node.rec.pubs(CHANNEL);
        for (tag, sent) in [("a-", &from_a), ("b-", &from_b)] {
            let mine: Vec<_> = got
                .iter()
                .filter(|(_, _, d)| d.starts_with(tag))
                .cloned()
                .collect();
            assert_eq!(
                &mine, sent,
                "one node's publications arrive in offset order"
            );
        }
    }

    b.broker().unsubscribe(CHANNEL).await.unwrap();
    a.broker()
        .publish(CHANNEL, data("after"), None, &popts(100))
        .await
        .unwrap();
    eventually(
        "a receives its own publication",
        Duration::from_secs(5),
        || a.rec.pubs(CHANNEL).len() == 61,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.rec.pubs(CHANNEL).len(), 60, "b unsubscribed");
}

#[tokio::test]
async fn subscriptions_are_counted() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let a = d.node().await;
    let b = a.broker();
    b.subscribe("c").await.unwrap();
    b.subscribe("c").await.unwrap();
    b.unsubscribe("c").await.unwrap();
    b.publish("c", data("1"), None, &popts(0)).await.unwrap();
    eventually(
        "delivery while one subscription is left",
        Duration::from_secs(5),
        || a.rec.pubs("c").len() == 1,
    )
    .await;
    b.unsubscribe("c").await.unwrap();
    b.unsubscribe("c").await.unwrap(); // one too many is harmless
    b.publish("c", data("2"), None, &popts(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.rec.pubs("c").len(), 1);
    b.subscribe("c").await.unwrap();
    b.publish("c", data("3"), None, &popts(0)).await.unwrap();
    eventually(
        "delivery after subscribing again",
        Duration::from_secs(5),
        || a.rec.pubs("c").len() == 2,
    )
    .await;
}

#[tokio::test]
async fn concurrent_publishes_from_two_nodes_get_each_offset_once() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let (a, b) = (d.node().await, d.node().await);
    let mut tasks = Vec::new();
    for node in [&a, &b] {
        for t in 0..4 {
            let broker = node.engine.broker.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..50 {
                    let p = broker
                        .publish("race", data(&format!("{t}-{i}")), None, &popts(1000))
                        .await
                        .unwrap();
                    got.push(p);
                }
                got
            }));
        }
    }
    let mut positions = Vec::new();
    for t in tasks {
        positions.extend(t.await.unwrap());
    }
    let epochs: HashSet<_> = positions.iter().map(|p| p.epoch.clone()).collect();
    assert_eq!(epochs.len(), 1, "one epoch");
    let mut offs: Vec<u64> = positions.iter().map(|p| p.offset).collect();
    offs.sort_unstable();
    assert_eq!(
        offs,
        (1..=400).collect::<Vec<_>>(),
        "every offset exactly once"
    );

    for node in [&a, &b] {
        let page = node
            .broker()
            .history("race", &HistoryFilter::default())
            .await
            .unwrap();
        let got: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
        assert_eq!(got, (1..=400).collect::<Vec<_>>());
        assert_eq!(page.position.offset, 400);
        assert!(epochs.contains(&page.position.epoch));
    }
}

/// The in-memory engine's unit tests, against NATS.
#[tokio::test]
async fn history_trims_to_history_size_and_filters_like_memory() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let (a, b) = (d.node().await, d.node().await);

    for i in 1..=5 {
        let p = a
            .broker()
            .publish("ring", data(&i.to_string()), None, &popts(3))
            .await
            .unwrap();
        assert_eq!(p.offset, i);
    }
    let page = b
        .broker()
        .history("ring", &HistoryFilter::default())
        .await
        .unwrap();
    let offs: Vec<_> = page.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offs, vec![3, 4, 5]);
    assert_eq!(page.position.offset, 5);

    let mut epoch = String::new();
    for i in 1..=10 {
        epoch = a
            .broker()
            .publish("c", data(&i.to_string()), None, &popts(100))
            .await
            .unwrap()
            .epoch;
    }
    let b = b.broker();
    let since = pos(4, &epoch);
    assert_eq!(
        offsets(b, "c", &filter(since.clone(), Some(3), false)).await,
        Some(vec![5, 6, 7])
    );
    assert_eq!(
        offsets(b, "c", &filter(since.clone(), Some(2), true)).await,
        Some(vec![3, 2])
    );
    assert_eq!(
        offsets(b, "c", &filter(None, Some(2), true)).await,
        Some(vec![10, 9])
    );
    assert_eq!(
        offsets(b, "c", &filter(None, Some(0), false)).await,
        Some(vec![])
    );
    assert_eq!(
        offsets(b, "c", &filter(pos(4, "other"), None, false)).await,
        None
    );
    let page = b.history("c", &filter(None, Some(0), false)).await.unwrap();
    assert_eq!(
        page.position,
        StreamPosition {
            offset: 10,
            epoch: epoch.clone()
        }
    );
    // An empty epoch in `since` is not checked, as in memory.
    assert_eq!(
        offsets(b, "c", &filter(pos(8, ""), None, false)).await,
        Some(vec![9, 10])
    );
}

/// Every filter over a trimmed stream, compared with the in-memory engine (both the short
/// walk-back reads and the consumer reads).
#[tokio::test]
async fn history_filters_agree_with_memory_broker() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let (a, b) = (d.node().await, d.node().await);
    let memory = MemoryBroker::default();
    let (mut nats_epoch, mut mem_epoch) = (String::new(), String::new());
    for i in 1..=80u64 {
        // The ring shrinks from 60 to 50 at offset 70: memory trims at once, so must NATS.
        let size = if i < 70 { 60 } else { 50 };
        nats_epoch = a
            .broker()
            .publish("grid", data(&i.to_string()), None, &popts(size))
            .await
            .unwrap()
            .epoch;
        mem_epoch = memory
            .publish("grid", data(&i.to_string()), None, &popts(size))
            .await
            .unwrap()
            .epoch;
    }
    let sinces = [
        None,
        Some(0),
        Some(1),
        Some(20),
        Some(29),
        Some(30),
        Some(31),
        Some(47),
        Some(50),
        Some(70),
        Some(78),
        Some(79),
        Some(80),
        Some(81),
        Some(200),
    ];
    let limits = [None, Some(0), Some(1), Some(3), Some(40), Some(100)];
    let mut checked = 0;
    for since in sinces {
        for limit in limits {
            for reverse in [false, true] {
                for epoch_kind in 0..3 {
                    let (ne, me) = match epoch_kind {
                        0 => (nats_epoch.as_str(), mem_epoch.as_str()),
                        1 => ("", ""),
                        _ => ("wrong", "wrong"),
                    };
                    let nf = filter(since.map(|o| pos(o, ne).unwrap()), limit, reverse);
                    let mf = filter(since.map(|o| pos(o, me).unwrap()), limit, reverse);
                    let got = offsets(b.broker(), "grid", &nf).await;
                    let want = offsets(&memory, "grid", &mf).await;
                    assert_eq!(
                        got, want,
                        "since {since:?} limit {limit:?} reverse {reverse} epoch {epoch_kind}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 15 * 6 * 2 * 3);
    let page = b
        .broker()
        .history("grid", &HistoryFilter::default())
        .await
        .unwrap();
    assert_eq!(page.publications.len(), 50);
    assert_eq!(page.publications[0].offset, 31);
    assert_eq!(page.publications[0].data.get(), "\"31\"");
}

#[tokio::test]
async fn trimmed_position_is_unrecoverable_and_ttl_starts_new_epoch() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let (a, b) = (d.node().await, d.node().await);
    let mut o = popts(2);
    o.history_ttl = Duration::from_millis(300);
    let first = a.broker().publish("c", data("1"), None, &o).await.unwrap();
    for i in 2..=5 {
        a.broker()
            .publish("c", data(&i.to_string()), None, &o)
            .await
            .unwrap();
    }
    let f = filter(pos(1, &first.epoch), None, false);
    assert_eq!(offsets(b.broker(), "c", &f).await, None);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let page = b
        .broker()
        .history("c", &HistoryFilter::default())
        .await
        .unwrap();
    assert_ne!(page.position.epoch, first.epoch);
    assert_eq!(page.position.offset, 0);
    assert!(page.publications.is_empty());
    // The expired stream's new epoch is the same on the other node, and kept by its next
    // publication (a's cache still holds the old epoch).
    let again = a
        .broker()
        .history("c", &filter(None, Some(0), false))
        .await
        .unwrap();
    assert_eq!(again.position, page.position);
    let next = a.broker().publish("c", data("6"), None, &o).await.unwrap();
    assert_eq!(
        next,
        StreamPosition {
            offset: 1,
            epoch: page.position.epoch.clone()
        }
    );
}

#[tokio::test]
async fn quiet_channel_epoch_is_shared_and_kept_by_first_publish() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let (a, b) = (d.node().await, d.node().await);
    let quiet = a
        .broker()
        .history(CHANNEL, &filter(None, Some(0), false))
        .await
        .unwrap()
        .position;
    assert_eq!(quiet.offset, 0);
    assert!(!quiet.epoch.is_empty());
    let on_b = b
        .broker()
        .history(CHANNEL, &HistoryFilter::default())
        .await
        .unwrap();
    assert_eq!(on_b.position, quiet);
    assert!(on_b.publications.is_empty());
    let p1 = b
        .broker()
        .publish(CHANNEL, data("1"), None, &popts(10))
        .await
        .unwrap();
    assert_eq!(
        p1,
        StreamPosition {
            offset: 1,
            epoch: quiet.epoch.clone()
        }
    );
    let p2 = a
        .broker()
        .publish(CHANNEL, data("2"), None, &popts(10))
        .await
        .unwrap();
    assert_eq!(
        p2,
        StreamPosition {
            offset: 2,
            epoch: quiet.epoch.clone()
        }
    );
    // A client that subscribed to the quiet channel recovers both.
    assert_eq!(
        offsets(a.broker(), CHANNEL, &filter(Some(quiet), None, false)).await,
        Some(vec![1, 2])
    );
}

#[tokio::test]
async fn remove_history_starts_new_epoch() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let (a, b) = (d.node().await, d.node().await);
    let mut last = StreamPosition::default();
    for i in 1..=3 {
        last = a
            .broker()
            .publish("c", data(&i.to_string()), None, &popts(10))
            .await
            .unwrap();
    }
    b.broker().remove_history("c").await.unwrap();
    let page = b
        .broker()
        .history("c", &HistoryFilter::default())
        .await
        .unwrap();
    assert_eq!(page.position.offset, 0);
    assert_ne!(page.position.epoch, last.epoch);
    assert!(page.publications.is_empty());
    assert_eq!(
        offsets(b.broker(), "c", &filter(Some(last.clone()), None, false)).await,
        None
    );
    // a's cached position is stale; the append's check catches it.
    let next = a
        .broker()
        .publish("c", data("4"), None, &popts(10))
        .await
        .unwrap();
    assert_eq!(next.offset, 1);
    assert_eq!(next.epoch, page.position.epoch);

    // Removed without a read in between: the publication itself starts the new epoch.
    a.broker().remove_history("c").await.unwrap();
    let fresh = b
        .broker()
        .publish("c", data("5"), None, &popts(10))
        .await
        .unwrap();
    assert_eq!(fresh.offset, 1);
    assert_ne!(fresh.epoch, next.epoch);
}

#[tokio::test]
async fn join_leave_broadcast_offsetless_and_topics() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let (a, b) = (d.node().await, d.node().await);
    a.broker().subscribe(CHANNEL).await.unwrap();
    b.broker().subscribe(CHANNEL).await.unwrap();

    a.broker()
        .publish_join(CHANNEL, &info("u1", "c1"))
        .await
        .unwrap();
    b.broker()
        .publish_leave(CHANNEL, &info("u1", "c1"))
        .await
        .unwrap();
    let bc = Publication {
        offset: 42,
        data: data("stored"),
        info: Some(info("u1", "c1")),
        tags: None,
    };
    a.broker().broadcast(CHANNEL, Arc::new(bc)).await.unwrap();
    let p = b
        .broker()
        .publish(CHANNEL, data("nohistory"), None, &popts(0))
        .await
        .unwrap();
    assert_eq!(p, StreamPosition::default());

    let want = vec![
        Ev::Join(CHANNEL.into(), "c1".into()),
        Ev::Leave(CHANNEL.into(), "c1".into()),
        Ev::Pub {
            channel: CHANNEL.into(),
            offset: 42,
            epoch: String::new(),
            data: "stored".into(),
        },
        Ev::Pub {
            channel: CHANNEL.into(),
            offset: 0,
            epoch: String::new(),
            data: "nohistory".into(),
        },
    ];
    for node in [&a, &b] {
        eventually(
            "joins, leaves and broadcasts",
            Duration::from_secs(5),
            || node.rec.events().len() >= 4,
        )
        .await;
        let mut got = node.rec.events();
        // Different senders: only each sender's own order is guaranteed.
        got.sort_by_key(|e| want.iter().position(|w| w == e));
        assert_eq!(got, want);
    }
    // Offset-less publications and broadcasts are not history.
    let page = a
        .broker()
        .history(CHANNEL, &HistoryFilter::default())
        .await
        .unwrap();
    assert_eq!(page.position.offset, 0);

    // Topics: only subscribers get them, the sender included.
    let topic = "node.b.ctl";
    b.broker().subscribe_topic(topic).await.unwrap();
    a.broker()
        .publish_message(topic, Bytes::from_static(b"\x00raw"))
        .await
        .unwrap();
    let msg = Ev::Msg(topic.into(), Bytes::from_static(b"\x00raw"));
    eventually("topic message on b", Duration::from_secs(5), || {
        b.rec.events().contains(&msg)
    })
    .await;
    b.broker()
        .publish_message(topic, Bytes::from_static(b"self"))
        .await
        .unwrap();
    let own = Ev::Msg(topic.into(), Bytes::from_static(b"self"));
    eventually("b's own topic message", Duration::from_secs(5), || {
        b.rec.events().contains(&own)
    })
    .await;
    // A topic and a channel of the same name are different.
    a.broker()
        .publish(topic, data("not a topic"), None, &popts(0))
        .await
        .unwrap();
    b.broker().unsubscribe_topic(topic).await.unwrap();
    a.broker()
        .publish_message(topic, Bytes::from_static(b"late"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!a.rec.events().iter().any(|e| matches!(e, Ev::Msg(..))));
    let b_msgs = b
        .rec
        .events()
        .into_iter()
        .filter(|e| matches!(e, Ev::Msg(..)))
        .count();
    assert_eq!(b_msgs, 2);
    assert!(b.rec.pubs(topic).is_empty());
}

#[tokio::test]
async fn malformed_payloads_are_dropped() {
    let url = require_nats!();
    let d = Deployment::new(url.clone());
    let a = d.node().await;
    a.broker().subscribe(CHANNEL).await.unwrap();
    let raw = async_nats::connect(url).await.unwrap();
    let subject = format!("{}.ch.{}", d.prefix, URL_SAFE_NO_PAD.encode(CHANNEL));
    for junk in [
        &b"not json"[..],
        b"{\"k\":\"p\"}",
        b"{\"k\":\"z\"}",
        b"",
        b"\xff\xfe",
    ] {
        raw.publish(subject.clone(), Bytes::copy_from_slice(junk))
            .await
            .unwrap();
    }
    raw.flush().await.unwrap();
    a.broker()
        .publish(CHANNEL, data("ok"), None, &popts(5))
        .await
        .unwrap();
    eventually("the valid publication", Duration::from_secs(5), || {
        !a.rec.pubs(CHANNEL).is_empty()
    })
    .await;
    assert_eq!(a.rec.events().len(), 1);

    // A malformed history message ends its epoch instead of breaking the channel.
    let js = async_nats::jetstream::new(raw);
    let hsubject = format!("{}.h.{}", d.prefix, URL_SAFE_NO_PAD.encode(CHANNEL));
    js.publish(hsubject, Bytes::from_static(b"garbage"))
        .await
        .unwrap()
        .await
        .unwrap();
    let page = a
        .broker()
        .history(CHANNEL, &HistoryFilter::default())
        .await
        .unwrap();
    assert_eq!(page.position.offset, 0);
    let p = a
        .broker()
        .publish(CHANNEL, data("after"), None, &popts(5))
        .await
        .unwrap();
    assert_eq!(p.offset, 1);
    assert_eq!(p.epoch, page.position.epoch);
}

#[tokio::test]
async fn presence_is_shared_and_expires_when_a_node_stops() {
    let url = require_nats!();
    let d = Deployment::new(url);
    let (a, b) = (d.node().await, d.node().await);
    let (pa, pb) = (&a.engine.presence, &b.engine.presence);
    pa.add(CHANNEL, &info("u1", "c1")).await.unwrap();
    pa.add(CHANNEL, &info("u1", "c2")).await.unwrap();
    pb.add(CHANNEL, &info("u2", "c3")).await.unwrap();
    pb.add("other", &info("u9", "c9")).await.unwrap();
    for p in [pa, pb] {
        let who = p.presence(CHANNEL).await.unwrap();
        let mut clients: Vec<_> = who.keys().cloned().collect();
        clients.sort();
        assert_eq!(clients, ["c1", "c2", "c3"]);
        assert_eq!(who["c3"].user, "u2");
        assert_eq!(p.stats(CHANNEL).await.unwrap(), (3, 2));
    }
    assert_eq!(pa.stats("nobody").await.unwrap(), (0, 0));
    pa.remove(CHANNEL, "c2").await.unwrap();
    assert_eq!(pb.stats(CHANNEL).await.unwrap(), (2, 2));

    // Heartbeats keep entries past the TTL.
    tokio::time::sleep(PRESENCE_TTL + Duration::from_millis(700)).await;
    assert_eq!(pb.stats(CHANNEL).await.unwrap(), (2, 2));

    // a stops: its client expires within the TTL (plus the server's expiry check), b's stays.
    a.shutdown.cancel();
    let stopped = Instant::now();
    loop {
        let who = pb.presence(CHANNEL).await.unwrap();
        if !who.contains_key("c1") {
            assert!(who.contains_key("c3"));
            break;
        }
        assert!(
            stopped.elapsed() < PRESENCE_TTL * 3,
            "a's client did not expire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pb.stats(CHANNEL).await.unwrap(), (1, 1));
    assert_eq!(pb.stats("other").await.unwrap(), (1, 1));
}

/// A TCP proxy that can cut every connection through it and refuse new ones.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let token = cut2.lock().unwrap().clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy { addr, up, cut }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    fn sever(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn reconnect_calls_handle_reconnect_and_delivery_resumes() {
    let url = require_nats!();
    let d = Deployment::new(url.clone());
    let proxy = Proxy::start(host_port(&url)).await;
    let a = d.node_at(&proxy.url()).await;
    let b = d.node().await;
    a.broker().subscribe(CHANNEL).await.unwrap();
    b.broker()
        .publish(CHANNEL, data("before"), None, &popts(10))
        .await
        .unwrap();
    eventually("delivery through the proxy", Duration::from_secs(5), || {
        a.rec.pubs(CHANNEL).len() == 1
    })
    .await;
    let seen = a.rec.pubs(CHANNEL)[0].clone();

    proxy.sever();
    b.broker()
        .publish(CHANNEL, data("missed"), None, &popts(10))
        .await
        .unwrap();
    // Commands fail within a few seconds while the server is out of reach.
    let started = Instant::now();
    let res = a.broker().history(CHANNEL, &HistoryFilter::default()).await;
    assert!(matches!(res, Err(BrokerError::Unavailable(_))), "{res:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let started = Instant::now();
    let res = a.engine.presence.add(CHANNEL, &info("u", "c")).await;
    assert!(matches!(res, Err(BrokerError::Unavailable(_))), "{res:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(a.rec.reconnects.load(Ordering::SeqCst), 0);

    proxy.restore();
    eventually("handle_reconnect", Duration::from_secs(10), || {
        a.rec.reconnects.load(Ordering::SeqCst) == 1
    })
    .await;
    // The hub's recovery after a reconnect: what a missed, from where it was.
    let missed = offsets(
        a.broker(),
        CHANNEL,
        &filter(pos(seen.0, &seen.1), None, false),
    )
    .await;
    assert_eq!(missed, Some(vec![2]));
    b.broker()
        .publish(CHANNEL, data("after"), None, &popts(10))
        .await
        .unwrap();
    eventually(
        "delivery after the reconnect",
        Duration::from_secs(5),
        || a.rec.pubs(CHANNEL).iter().any(|(_, _, d)| d == "after"),
    )
    .await;
    let p = a
        .broker()
        .publish(CHANNEL, data("from a"), None, &popts(10))
        .await
        .unwrap();
    assert_eq!(p.offset, 4);
    // The presence entry added while cut off was kept and put by a heartbeat.
    eventually_async_presence(&b, "c").await;
}

async fn eventually_async_presence(node: &Node, client: &str) {
    let deadline = Instant::now() + PRESENCE_TTL * 2;
    loop {
        if node
            .engine
            .presence
            .presence(CHANNEL)
            .await
            .unwrap()
            .contains_key(client)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "presence of {client} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn unreachable_nats_is_unavailable_quickly() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let opts = EngineOptions {
        prefix: "sbtest_down".into(),
        presence_ttl: PRESENCE_TTL,
        history_max_size: 10,
        history_max_ttl: Duration::from_secs(60),
        shutdown: CancellationToken::new(),
    };
    let started = Instant::now();
    let res = switchboard_engines::connect(&format!("nats://127.0.0.1:{port}"), opts).await;
    assert!(matches!(res, Err(BrokerError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(5));
}
