//! The Redis engine against a real Redis (127.0.0.1:6379, or `SWITCHBOARD_TEST_REDIS_URL`).
//!
//! Every test works under its own random key prefix and never flushes or restarts the server:
//! others share it. Without a reachable Redis the tests print `SKIP:` and pass, unless `CI` is
//! set, where they fail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use switchboard_engines::{Engine, EngineOptions};
use switchboard_hub::{BrokerError, BrokerEventHandler, HistoryFilter, PublishOptions};
use switchboard_protocol::client::{ClientInfo, Publication, StreamPosition};
use switchboard_protocol::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A plain connection for the test's own commands, or `None` (after a loud SKIP) without Redis.
async fn redis_or_skip(test: &str) -> Option<redis::aio::MultiplexedConnection> {
    let url = redis_url();
    let attempt = async {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    };
    let err = match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(conn)) => return Some(conn),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_string(),
    };
    if std::env::var_os("CI").is_some() {
        panic!("Redis at {url} is unreachable ({err}); CI needs it for the Redis engine tests");
    }
    eprintln!(
        "SKIP: {test}: Redis at {url} is unreachable ({err}); set SWITCHBOARD_TEST_REDIS_URL"
    );
    None
}

fn prefix() -> String {
    format!("sbtest-{:016x}", rand::random::<u64>())
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
    Msg(String, Vec<u8>),
    Reconnect,
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Ev>>);

impl Recorder {
    fn events(&self) -> Vec<Ev> {
        self.0.lock().unwrap().clone()
    }
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
        self.0.lock().unwrap().push(e)
    }
}

impl BrokerEventHandler for Recorder {
    fn handle_publication(&self, channel: &str, p: Arc<Publication>, epoch: &str) {
        self.push(Ev::Pub {
            channel: channel.into(),
            offset: p.offset,
            epoch: epoch.into(),
            data: p.data.get().into(),
        })
    }
    fn handle_join(&self, channel: &str, info: &ClientInfo) {
        self.push(Ev::Join(channel.into(), info.client.clone()))
    }
    fn handle_leave(&self, channel: &str, info: &ClientInfo) {
        self.push(Ev::Leave(channel.into(), info.client.clone()))
    }
    fn handle_message(&self, topic: &str, payload: Bytes) {
        self.push(Ev::Msg(topic.into(), payload.to_vec()))
    }
    fn handle_reconnect(&self) {
        self.push(Ev::Reconnect)
    }
}

/// One "node": an engine with a recording handler. Dropping it stops the engine's tasks.
struct Node {
    engine: Engine,
    rec: Arc<Recorder>,
    shutdown: CancellationToken,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn options(prefix: &str, presence_ttl: Duration) -> EngineOptions {
    EngineOptions {
        prefix: prefix.into(),
        presence_ttl,
        history_max_size: 1000,
        history_max_ttl: Duration::from_secs(60),
        shutdown: CancellationToken::new(),
    }
}

async fn node_at(url: &str, prefix: &str, presence_ttl: Duration) -> Node {
    let opts = options(prefix, presence_ttl);
    let shutdown = opts.shutdown.clone();
    let engine = switchboard_engines::connect(url, opts)
        .await
        .expect("connect to redis");
    let rec = Arc::new(Recorder::default());
    let weak: Weak<Recorder> = Arc::downgrade(&rec);
    engine.broker.register(weak);
    Node {
        engine,
        rec,
        shutdown,
    }
}

async fn node(prefix: &str) -> Node {
    node_at(&redis_url(), prefix, Duration::from_secs(5)).await
}

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

fn info(user: &str, client: &str) -> ClientInfo {
    ClientInfo {
        user: user.into(),
        client: client.into(),
        conn_info: None,
        chan_info: None,
    }
}

/// Polls `cond` for up to `limit`.
async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn filter(since: Option<StreamPosition>, limit: Option<usize>, reverse: bool) -> HistoryFilter {
    HistoryFilter {
        since,
        limit,
        reverse,
    }
}

async fn offsets(n: &Node, channel: &str, f: HistoryFilter) -> Result<Vec<u64>, BrokerError> {
    n.engine
        .broker
        .history(channel, &f)
        .await
        .map(|p| p.publications.iter().map(|p| p.offset).collect())
}

#[tokio::test]
async fn two_nodes_receive_both_nodes_publications_in_offset_order() {
    let Some(_) = redis_or_skip("two_nodes").await else {
        return;
    };
    let p = prefix();
    let (a, b) = (node(&p).await, node(&p).await);
    a.engine.broker.subscribe("c").await.unwrap();
    b.engine.broker.subscribe("c").await.unwrap();
    let mut epoch = String::new();
    for i in 1..=10u64 {
        let from = if i % 2 == 0 { &a } else { &b };
        let pos = from
            .engine
            .broker
            .publish("c", data(i), None, &opts(100))
            .await
            .unwrap();
        assert_eq!(pos.offset, i);
        if i > 1 {
            assert_eq!(pos.epoch, epoch, "one stream, one epoch");
        }
        epoch = pos.epoch;
    }
    assert!(!epoch.is_empty());
    for n in [&a, &b] {
        wait_until(Duration::from_secs(5), "10 publications", || {
            n.rec.pubs("c").len() == 10
        })
        .await;
        let got = n.rec.pubs("c");
        let want: Vec<_> = (1..=10u64)
            .map(|i| (i, epoch.clone(), i.to_string()))
            .collect();
        assert_eq!(got, want);
    }
}

#[tokio::test]
async fn concurrent_publishes_from_two_nodes_get_every_offset_once() {
    let Some(_) = redis_or_skip("concurrent_publishes").await else {
        return;
    };
    let p = prefix();
    let (a, b) = (node(&p).await, node(&p).await);
    a.engine.broker.subscribe("c").await.unwrap();
    b.engine.broker.subscribe("c").await.unwrap();
    let run = |n: &Node| {
        let broker = n.engine.broker.clone();
        async move {
            futures_util::stream::iter(0..300u64)
                .map(|i| {
                    let broker = broker.clone();
                    async move {
                        broker
                            .publish("c", data(i), None, &opts(1000))
                            .await
                            .unwrap()
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        }
    };
    let (ra, rb) = tokio::join!(run(&a), run(&b));
    let mut all: Vec<u64> = ra.iter().chain(&rb).map(|p| p.offset).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=600).collect::<Vec<_>>());
    for n in [&a, &b] {
        wait_until(Duration::from_secs(10), "600 publications", || {
            n.rec.pubs("c").len() >= 600
        })
        .await;
        let got: Vec<u64> = n.rec.pubs("c").iter().map(|p| p.0).collect();
        assert_eq!(
            got,
            (1..=600).collect::<Vec<_>>(),
            "delivered in offset order"
        );
    }
}

#[tokio::test]
async fn offsets_increase_and_ring_trims() {
    let Some(_) = redis_or_skip("ring_trims").await else {
        return;
    };
    let n = node(&prefix()).await;
    for i in 1..=5 {
        let pos = n
            .engine
            .broker
            .publish("c", data(i), None, &opts(3))
            .await
            .unwrap();
        assert_eq!(pos.offset, i);
    }
    let page = n
        .engine
        .broker
        .history("c", &filter(None, None, false))
        .await
        .unwrap();
    let offs: Vec<_> = page.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offs, vec![3, 4, 5]);
    assert_eq!(page.publications[0].data.get(), "3");
    assert_eq!(page.position.offset, 5);
}

#[tokio::test]
async fn since_reverse_and_limits() {
    let Some(_) = redis_or_skip("since_reverse_and_limits").await else {
        return;
    };
    let n = node(&prefix()).await;
    let mut epoch = String::new();
    for i in 1..=10 {
        epoch = n
            .engine
            .broker
            .publish("c", data(i), None, &opts(100))
            .await
            .unwrap()
            .epoch;
    }
    let since = Some(StreamPosition {
        offset: 4,
        epoch: epoch.clone(),
    });
    let get = |since, limit, reverse| offsets(&n, "c", filter(since, limit, reverse));
    assert_eq!(
        get(since.clone(), Some(3), false).await.unwrap(),
        vec![5, 6, 7]
    );
    assert_eq!(
        get(since.clone(), None, false).await.unwrap(),
        (5..=10).collect::<Vec<_>>()
    );
    assert_eq!(get(since.clone(), Some(2), true).await.unwrap(), vec![3, 2]);
    assert_eq!(get(since.clone(), None, true).await.unwrap(), vec![3, 2, 1]);
    assert_eq!(get(None, Some(2), true).await.unwrap(), vec![10, 9]);
    assert_eq!(get(None, Some(2), false).await.unwrap(), vec![1, 2]);
    assert_eq!(get(None, Some(0), false).await.unwrap(), Vec::<u64>::new());
    let at_top = Some(StreamPosition {
        offset: 10,
        epoch: epoch.clone(),
    });
    assert_eq!(get(at_top, None, false).await.unwrap(), Vec::<u64>::new());
    let no_epoch = Some(StreamPosition {
        offset: 8,
        epoch: String::new(),
    });
    assert_eq!(get(no_epoch, None, false).await.unwrap(), vec![9, 10]);
    let zero = Some(StreamPosition {
        offset: 0,
        epoch: epoch.clone(),
    });
    assert_eq!(get(zero.clone(), Some(1), false).await.unwrap(), vec![1]);
    assert_eq!(get(zero, None, true).await.unwrap(), Vec::<u64>::new());
    let wrong = Some(StreamPosition {
        offset: 4,
        epoch: "other".into(),
    });
    for reverse in [false, true] {
        assert!(matches!(
            get(wrong.clone(), None, reverse).await,
            Err(BrokerError::UnrecoverablePosition)
        ));
    }
    // Like the in-memory engine: limit 0 returns the position without checking it.
    let page = n
        .engine
        .broker
        .history("c", &filter(wrong, Some(0), false))
        .await
        .unwrap();
    assert_eq!(page.position, StreamPosition { offset: 10, epoch });
}

#[tokio::test]
async fn trimmed_position_is_unrecoverable_and_ttl_starts_new_epoch() {
    let Some(_) = redis_or_skip("trimmed_and_ttl").await else {
        return;
    };
    let n = node(&prefix()).await;
    let mut o = opts(2);
    o.history_ttl = Duration::from_millis(300);
    let first = n
        .engine
        .broker
        .publish("c", data(1), None, &o)
        .await
        .unwrap();
    for i in 2..=5 {
        n.engine
            .broker
            .publish("c", data(i), None, &o)
            .await
            .unwrap();
    }
    let at = |offset| {
        Some(StreamPosition {
            offset,
            epoch: first.epoch.clone(),
        })
    };
    assert!(matches!(
        offsets(&n, "c", filter(at(1), None, false)).await,
        Err(BrokerError::UnrecoverablePosition)
    ));
    assert!(matches!(
        offsets(&n, "c", filter(at(2), None, false)).await,
        Err(BrokerError::UnrecoverablePosition)
    ));
    assert_eq!(
        offsets(&n, "c", filter(at(3), None, false)).await.unwrap(),
        vec![4, 5]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let page = n
        .engine
        .broker
        .history("c", &HistoryFilter::default())
        .await
        .unwrap();
    assert_ne!(page.position.epoch, first.epoch);
    assert_eq!(page.position.offset, 0);
    assert!(page.publications.is_empty());
    assert!(matches!(
        offsets(&n, "c", filter(at(5), None, false)).await,
        Err(BrokerError::UnrecoverablePosition)
    ));
    let next = n
        .engine
        .broker
        .publish("c", data(6), None, &o)
        .await
        .unwrap();
    assert_eq!(
        next,
        StreamPosition {
            offset: 1,
            epoch: page.position.epoch
        }
    );
}

#[tokio::test]
async fn quiet_channel_epoch_is_the_same_on_every_node_and_kept_by_publish() {
    let Some(_) = redis_or_skip("quiet_channel_epoch").await else {
        return;
    };
    let p = prefix();
    let (a, b) = (node(&p).await, node(&p).await);
    let ea = a
        .engine
        .broker
        .history("q", &HistoryFilter::default())
        .await
        .unwrap()
        .position;
    let eb = b
        .engine
        .broker
        .history("q", &HistoryFilter::default())
        .await
        .unwrap()
        .position;
    assert_eq!(ea.offset, 0);
    assert!(!ea.epoch.is_empty());
    assert_eq!(ea, eb);
    let pos = b
        .engine
        .broker
        .publish("q", data(1), None, &opts(10))
        .await
        .unwrap();
    assert_eq!(
        pos,
        StreamPosition {
            offset: 1,
            epoch: ea.epoch.clone()
        }
    );
    // A subscriber that saw the quiet stream at offset 0 recovers the publication.
    assert_eq!(
        offsets(&a, "q", filter(Some(ea), None, false))
            .await
            .unwrap(),
        vec![1]
    );
}

#[tokio::test]
async fn remove_history_starts_a_new_epoch() {
    let Some(_) = redis_or_skip("remove_history").await else {
        return;
    };
    let n = node(&prefix()).await;
    let b = &n.engine.broker;
    let first = b.publish("c", data(1), None, &opts(10)).await.unwrap();
    b.publish("c", data(2), None, &opts(10)).await.unwrap();
    b.remove_history("c").await.unwrap();
    let next = b.publish("c", data(3), None, &opts(10)).await.unwrap();
    assert_eq!(next.offset, 1);
    assert_ne!(next.epoch, first.epoch);
    let page = b.history("c", &HistoryFilter::default()).await.unwrap();
    assert_eq!(page.position, next);
    assert_eq!(page.publications.len(), 1);
    assert_eq!(page.publications[0].data.get(), "3");
}

#[tokio::test]
async fn join_leave_broadcast_no_history_and_tags() {
    let Some(_) = redis_or_skip("join_leave_broadcast").await else {
        return;
    };
    let p = prefix();
    let (a, b) = (node(&p).await, node(&p).await);
    b.engine.broker.subscribe("c").await.unwrap();
    a.engine
        .broker
        .publish_join("c", &info("u1", "x"))
        .await
        .unwrap();
    a.engine
        .broker
        .publish_leave("c", &info("u1", "x"))
        .await
        .unwrap();
    let broadcast = Arc::new(Publication {
        offset: 77,
        data: data(77),
        info: Some(info("u2", "y")),
        tags: None,
    });
    a.engine.broker.broadcast("c", broadcast).await.unwrap();
    let mut o = opts(0);
    o.tags = Some(HashMap::from([("k".to_string(), "v".to_string())]));
    let pos = a
        .engine
        .broker
        .publish("c", data(5), None, &o)
        .await
        .unwrap();
    assert_eq!(pos, StreamPosition::default());
    wait_until(Duration::from_secs(5), "four events", || {
        b.rec.events().len() == 4
    })
    .await;
    let ev = b.rec.events();
    assert_eq!(ev[0], Ev::Join("c".into(), "x".into()));
    assert_eq!(ev[1], Ev::Leave("c".into(), "x".into()));
    assert_eq!(
        ev[2],
        Ev::Pub {
            channel: "c".into(),
            offset: 77,
            epoch: String::new(),
            data: "77".into()
        }
    );
    assert_eq!(
        ev[3],
        Ev::Pub {
            channel: "c".into(),
            offset: 0,
            epoch: String::new(),
            data: "5".into()
        }
    );
    // Neither the broadcast nor the publication without history touched history.
    let page = a
        .engine
        .broker
        .history("c", &HistoryFilter::default())
        .await
        .unwrap();
    assert_eq!(page.position.offset, 0);
    assert!(page.publications.is_empty());
    assert!(a.rec.events().is_empty(), "a never subscribed");
}

#[tokio::test]
async fn publication_info_and_tags_survive_pubsub_and_history() {
    let Some(_) = redis_or_skip("info_and_tags").await else {
        return;
    };
    let rec = Arc::new(Mutex::new(Vec::<Arc<Publication>>::new()));
    struct Keep(Arc<Mutex<Vec<Arc<Publication>>>>);
    impl BrokerEventHandler for Keep {
        fn handle_publication(&self, _: &str, p: Arc<Publication>, _: &str) {
            self.0.lock().unwrap().push(p)
        }
        fn handle_join(&self, _: &str, _: &ClientInfo) {}
        fn handle_leave(&self, _: &str, _: &ClientInfo) {}
        fn handle_message(&self, _: &str, _: Bytes) {}
        fn handle_reconnect(&self) {}
    }
    // A fresh engine, since a broker takes one handler.
    let opts_ = options(&prefix(), Duration::from_secs(5));
    let shutdown = opts_.shutdown.clone();
    let engine = switchboard_engines::connect(&redis_url(), opts_)
        .await
        .unwrap();
    let keep = Arc::new(Keep(rec.clone()));
    let weak: Weak<Keep> = Arc::downgrade(&keep);
    engine.broker.register(weak);
    engine.broker.subscribe("c").await.unwrap();
    let mut o = opts(10);
    o.tags = Some(HashMap::from([("k".to_string(), "v".to_string())]));
    let conn_info = RawValue::from_string(r#"{"name":"Ann"}"#.into()).unwrap();
    let mut who = info("u1", "x");
    who.conn_info = Some(conn_info);
    let payload = RawValue::from_string(r#"{"text":"hi \"there\" \n"}"#.into()).unwrap();
    engine
        .broker
        .publish("c", payload, Some(who), &o)
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "the publication", || {
        !rec.lock().unwrap().is_empty()
    })
    .await;
    let live = rec.lock().unwrap()[0].clone();
    let page = engine
        .broker
        .history("c", &HistoryFilter::default())
        .await
        .unwrap();
    for p in [&live, &page.publications[0]] {
        assert_eq!(p.offset, 1);
        assert_eq!(p.data.get(), r#"{"text":"hi \"there\" \n"}"#);
        let i = p.info.as_ref().unwrap();
        assert_eq!((i.user.as_str(), i.client.as_str()), ("u1", "x"));
        assert_eq!(i.conn_info.as_ref().unwrap().get(), r#"{"name":"Ann"}"#);
        assert_eq!(p.tags.as_ref().unwrap()["k"], "v");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn topics_reach_every_subscribed_node_and_stop_after_unsubscribe() {
    let Some(_) = redis_or_skip("topics").await else {
        return;
    };
    let p = prefix();
    let (a, b) = (node(&p).await, node(&p).await);
    a.engine.broker.subscribe_topic("t").await.unwrap();
    b.engine.broker.subscribe_topic("t").await.unwrap();
    // A channel of the same name is a different thing.
    b.engine.broker.subscribe("t").await.unwrap();
    let raw = Bytes::from_static(b"\x00\xffraw bytes\r\n");
    a.engine
        .broker
        .publish_message("t", raw.clone())
        .await
        .unwrap();
    for n in [&a, &b] {
        wait_until(Duration::from_secs(5), "the topic message", || {
            n.rec.events() == vec![Ev::Msg("t".into(), raw.to_vec())]
        })
        .await;
    }
    b.engine.broker.unsubscribe_topic("t").await.unwrap();
    a.engine
        .broker
        .publish_message("t", Bytes::from_static(b"second"))
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "the second message on a", || {
        a.rec.events().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.rec.events().len(), 1, "b unsubscribed");
    // Unsubscribing a channel stops its deliveries too.
    b.engine.broker.unsubscribe("t").await.unwrap();
    a.engine
        .broker
        .publish("t", data(1), None, &opts(0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.rec.events().len(), 1);
}

#[tokio::test]
async fn malformed_payloads_are_dropped() {
    let Some(mut raw) = redis_or_skip("malformed_payloads").await else {
        return;
    };
    let p = prefix();
    let n = node(&p).await;
    n.engine.broker.subscribe("c").await.unwrap();
    for junk in [
        &b""[..],
        b"Z",
        b"P",
        b"Pe x {}",
        b"Pe 1 not json",
        b"J{",
        b"\xff\xfe",
    ] {
        redis::cmd("PUBLISH")
            .arg(format!("{p}:ch:c"))
            .arg(junk)
            .query_async::<i64>(&mut raw)
            .await
            .unwrap();
    }
    n.engine
        .broker
        .publish("c", data(1), None, &opts(5))
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "the good publication", || {
        !n.rec.events().is_empty()
    })
    .await;
    assert_eq!(
        n.rec.pubs("c").iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(n.rec.events().len(), 1);
}

#[tokio::test]
async fn presence_is_shared_and_a_stopped_node_s_clients_expire() {
    let Some(_) = redis_or_skip("presence").await else {
        return;
    };
    let p = prefix();
    let ttl = Duration::from_millis(1500);
    let a = node_at(&redis_url(), &p, ttl).await;
    let b = node_at(&redis_url(), &p, ttl).await;
    a.engine.presence.add("c", &info("u1", "a1")).await.unwrap();
    b.engine.presence.add("c", &info("u1", "b1")).await.unwrap();
    b.engine.presence.add("c", &info("u2", "b2")).await.unwrap();
    b.engine
        .presence
        .add("other", &info("u3", "b3"))
        .await
        .unwrap();
    for n in [&a, &b] {
        let all = n.engine.presence.presence("c").await.unwrap();
        let mut clients: Vec<_> = all.keys().cloned().collect();
        clients.sort();
        assert_eq!(clients, ["a1", "b1", "b2"]);
        assert_eq!(all["b2"].user, "u2");
        assert_eq!(n.engine.presence.stats("c").await.unwrap(), (3, 2));
    }
    b.engine.presence.remove("c", "b1").await.unwrap();
    assert_eq!(a.engine.presence.stats("c").await.unwrap(), (2, 2));
    // Heartbeats keep live entries well past the TTL, and do not bring back removed ones.
    tokio::time::sleep(ttl * 2).await;
    let mut clients: Vec<_> = a
        .engine
        .presence
        .presence("c")
        .await
        .unwrap()
        .into_keys()
        .collect();
    clients.sort();
    assert_eq!(clients, ["a1", "b2"]);
    assert_eq!(a.engine.presence.stats("other").await.unwrap(), (1, 1));
    b.shutdown.cancel();
    let stopped = Instant::now();
    let deadline = stopped + ttl + Duration::from_secs(1);
    loop {
        let left = a.engine.presence.presence("c").await.unwrap();
        if !left.contains_key("b2") {
            assert!(left.contains_key("a1"), "a's own client stays");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b's client outlived the presence TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.engine.presence.stats("c").await.unwrap(), (1, 1));
    assert_eq!(a.engine.presence.stats("other").await.unwrap(), (0, 0));
    assert!(a
        .engine
        .presence
        .presence("nobody")
        .await
        .unwrap()
        .is_empty());
}

/// The ids of the pub/sub connections named for `prefix`.
async fn pubsub_client_ids(raw: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<u64> {
    let name = switchboard_engines::redis::pubsub_client_name(prefix);
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(raw)
        .await
        .unwrap();
    list.lines()
        .filter(|l| l.split(' ').any(|f| f == format!("name={name}")))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(|id| id.parse().unwrap())
        .collect()
}

#[tokio::test]
async fn killed_pubsub_connection_reconnects_resubscribes_and_reports() {
    let Some(mut raw) = redis_or_skip("reconnect").await else {
        return;
    };
    let p = prefix();
    let n = node(&p).await;
    n.engine.broker.subscribe("c").await.unwrap();
    n.engine.broker.subscribe_topic("t").await.unwrap();
    n.engine
        .broker
        .publish("c", data(1), None, &opts(10))
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "the first publication", || {
        n.rec.pubs("c").len() == 1
    })
    .await;
    let ids = pubsub_client_ids(&mut raw, &p).await;
    assert_eq!(ids.len(), 1, "one pub/sub connection per node");
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(ids[0])
        .query_async::<i64>(&mut raw)
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "handle_reconnect", || {
        n.rec.events().contains(&Ev::Reconnect)
    })
    .await;
    let again = pubsub_client_ids(&mut raw, &p).await;
    assert_eq!(again.len(), 1);
    assert_ne!(again[0], ids[0]);
    n.engine
        .broker
        .publish("c", data(2), None, &opts(10))
        .await
        .unwrap();
    n.engine
        .broker
        .publish_message("t", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        "deliveries after the reconnect",
        || {
            let ev = n.rec.events();
            ev.iter().filter(|e| matches!(e, Ev::Pub { .. })).count() == 2
                && ev.contains(&Ev::Msg("t".into(), b"hi".to_vec()))
        },
    )
    .await;
    assert_eq!(
        n.rec.pubs("c").iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[tokio::test]
async fn unreachable_redis_fails_fast() {
    let started = Instant::now();
    let r = switchboard_engines::connect(
        "redis://127.0.0.1:1",
        options(&prefix(), Duration::from_secs(5)),
    )
    .await;
    assert!(
        matches!(r, Err(BrokerError::Unavailable(_))),
        "{:?}",
        r.err()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// A TCP proxy in front of Redis that can be taken down (existing connections cut, new ones
/// refused) and brought back.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { port, up, cut }
    }
    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }
    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn redis_going_away_gives_unavailable_quickly_then_everything_recovers() {
    let Some(_) = redis_or_skip("redis_going_away").await else {
        return;
    };
    let url = redis_url();
    let Some(upstream) = url
        .strip_prefix("redis://")
        .map(|rest| rest.split('/').next().unwrap_or(rest))
        .filter(|hostport| !hostport.contains('@'))
    else {
        eprintln!("SKIP: redis_going_away: needs a plain redis://host:port url, not {url}");
        return;
    };
    let upstream = if upstream.contains(':') {
        upstream.to_string()
    } else {
        format!("{upstream}:6379")
    };
    let proxy = Proxy::start(upstream).await;
    let p = prefix();
    let n = node_at(
        &format!("redis://127.0.0.1:{}", proxy.port),
        &p,
        Duration::from_secs(5),
    )
    .await;
    n.engine.broker.subscribe("c").await.unwrap();
    n.engine
        .broker
        .publish("c", data(1), None, &opts(10))
        .await
        .unwrap();

    proxy.down();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = n.engine.broker.publish("c", data(2), None, &opts(10)).await;
    assert!(matches!(r, Err(BrokerError::Unavailable(_))), "{r:?}");
    let r = n
        .engine
        .broker
        .history("c", &HistoryFilter::default())
        .await;
    assert!(matches!(r, Err(BrokerError::Unavailable(_))), "{r:?}");
    let r = n.engine.presence.add("c", &info("u", "x")).await;
    assert!(matches!(r, Err(BrokerError::Unavailable(_))), "{r:?}");
    // A subscribe while down times out but is kept, and happens on reconnect.
    let r = n.engine.broker.subscribe("later").await;
    assert!(matches!(r, Err(BrokerError::Unavailable(_))), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "four failing calls took {:?}",
        started.elapsed()
    );

    proxy.up();
    wait_until(Duration::from_secs(15), "handle_reconnect", || {
        n.rec.events().contains(&Ev::Reconnect)
    })
    .await;
    let mut pos = None;
    for _ in 0..50 {
        match n.engine.broker.publish("c", data(3), None, &opts(10)).await {
            Ok(p) => {
                pos = Some(p);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let pos = pos.expect("publish works again");
    n.engine
        .broker
        .publish("later", data(4), None, &opts(0))
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "deliveries after recovery", || {
        n.rec.pubs("c").iter().any(|p| p.0 == pos.offset) && n.rec.pubs("later").len() == 1
    })
    .await;
}
