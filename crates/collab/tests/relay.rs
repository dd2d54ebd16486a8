//! Documents across nodes: several `Collab`s on ONE store, joined by an in-memory relay that
//! can delay, reorder, refuse, lose and hold messages, with fake y-websocket clients.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus::Registry;
use switchboard_collab::{
    codec, Access, CloseCode, Collab, CollabConfig, CollabMetrics, Content, DocConnection, DocSink,
    Format, Outgoing, Relay,
};
use switchboard_store::testing::TestDatabase;
use switchboard_store::{NewDocument, NewUser, Store, UserRole};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{GetString, ReadTxn, Text, Transact, Update};

// ----- the in-memory relay -----

#[derive(Default)]
struct Net {
    nodes: Mutex<Vec<Collab>>,
    subs: Mutex<HashSet<(usize, i64)>>,
    /// Deliveries to these nodes wait until released.
    held: Mutex<HashMap<usize, Vec<(i64, Bytes)>>>,
    /// Per sending node: refuse (send returns false) / silently lose the next n messages.
    refuse: Mutex<HashMap<usize, usize>>,
    lose: Mutex<HashMap<usize, usize>>,
    /// Random delay of each delivery, up to this (reorders messages); zero: in order, at once.
    jitter_ms: AtomicUsize,
    /// Payloads handed to send, for tests that need a real one.
    sent: Mutex<Vec<Bytes>>,
    /// Deliveries made to each node.
    delivered: Mutex<HashMap<usize, usize>>,
    /// A node whose next subscribe waits: it reports `subscribed` and waits for `go`.
    pause: Mutex<Option<Pause>>,
}

/// (node, "subscribed", "go on")
type Pause = (usize, oneshot::Sender<()>, oneshot::Receiver<()>);

struct TestRelay {
    net: Arc<Net>,
    me: usize,
}

fn take_one(map: &Mutex<HashMap<usize, usize>>, node: usize) -> bool {
    let mut m = map.lock().unwrap();
    match m.get_mut(&node) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

impl Net {
    fn deliver(self: &Arc<Self>, to: usize, doc_id: i64, payload: Bytes) {
        if let Some(q) = self.held.lock().unwrap().get_mut(&to) {
            q.push((doc_id, payload));
            return;
        }
        let collab = self.nodes.lock().unwrap()[to].clone();
        let jitter = self.jitter_ms.load(Ordering::Relaxed);
        let net = self.clone();
        let run = move || {
            *net.delivered.lock().unwrap().entry(to).or_default() += 1;
            collab.handle_relay(doc_id, payload);
        };
        if jitter == 0 {
            // In order, on the sender's stack, as a broker reader would (never blocking).
            run();
        } else {
            let delay = Duration::from_millis(rand::random::<u64>() % jitter as u64);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                run();
            });
        }
    }

    fn hold(&self, node: usize) {
        self.held.lock().unwrap().entry(node).or_default();
    }

    fn release(self: &Arc<Self>, node: usize) {
        let queued = self.held.lock().unwrap().remove(&node).unwrap_or_default();
        for (doc_id, payload) in queued {
            self.deliver(node, doc_id, payload);
        }
    }

    fn subscribed(&self, node: usize, doc_id: i64) -> bool {
        self.subs.lock().unwrap().contains(&(node, doc_id))
    }

    fn delivered_to(&self, node: usize) -> usize {
        self.delivered
            .lock()
            .unwrap()
            .get(&node)
            .copied()
            .unwrap_or(0)
    }
}

#[async_trait]
impl Relay for TestRelay {
    async fn subscribe(&self, doc_id: i64) -> Result<(), String> {
        self.net.subs.lock().unwrap().insert((self.me, doc_id));
        let pause = {
            let mut p = self.net.pause.lock().unwrap();
            match p.take() {
                Some((node, subscribed, go)) if node == self.me => Some((subscribed, go)),
                other => {
                    *p = other;
                    None
                }
            }
        };
        if let Some((subscribed, go)) = pause {
            let _ = subscribed.send(());
            let _ = go.await;
        }
        Ok(())
    }

    async fn unsubscribe(&self, doc_id: i64) {
        self.net.subs.lock().unwrap().remove(&(self.me, doc_id));
    }

    fn send(&self, doc_id: i64, payload: Bytes) -> bool {
        if take_one(&self.net.refuse, self.me) {
            return false;
        }
        self.net.sent.lock().unwrap().push(payload.clone());
        if take_one(&self.net.lose, self.me) {
            return true;
        }
        // Every subscribed node, this one included (collab must ignore its own).
        let targets: Vec<usize> = {
            let subs = self.net.subs.lock().unwrap();
            let n = self.net.nodes.lock().unwrap().len();
            (0..n).filter(|i| subs.contains(&(*i, doc_id))).collect()
        };
        for to in targets {
            self.net.deliver(to, doc_id, payload.clone());
        }
        true
    }
}

// ----- nodes and clients -----

struct Cluster {
    _db: TestDatabase,
    store: Arc<dyn Store>,
    net: Arc<Net>,
    nodes: Vec<Collab>,
    metrics: Vec<CollabMetrics>,
    doc_id: i64,
    shutdown: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn config() -> CollabConfig {
    CollabConfig {
        persist_interval: Duration::from_millis(20),
        auto_version_interval: Duration::ZERO,
        ..CollabConfig::default()
    }
}

async fn cluster(configs: Vec<CollabConfig>) -> Cluster {
    let db = TestDatabase::sqlite();
    let store = db.open().await;
    let owner = store
        .create_user(NewUser {
            username: "owner".into(),
            password_hash: String::new(),
            display_name: "Owner".into(),
            role: UserRole::User,
        })
        .await
        .unwrap();
    let doc = store
        .create_document(NewDocument {
            owner_id: owner.id,
            title: "shared".into(),
        })
        .await
        .unwrap();
    let net = Arc::new(Net::default());
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut nodes = Vec::new();
    let mut metrics = Vec::new();
    for (i, config) in configs.into_iter().enumerate() {
        let m = CollabMetrics::new(&Registry::new());
        let collab = Collab::start(store.clone(), config, m.clone(), &tasks, shutdown.clone());
        collab.set_relay(Arc::new(TestRelay {
            net: net.clone(),
            me: i,
        }));
        net.nodes.lock().unwrap().push(collab.clone());
        nodes.push(collab);
        metrics.push(m);
    }
    Cluster {
        _db: db,
        store,
        net,
        nodes,
        metrics,
        doc_id: doc.id,
        shutdown,
    }
}

#[derive(Default)]
struct Sink {
    inbox: Mutex<Vec<Bytes>>,
    closed: Mutex<Option<CloseCode>>,
}

impl DocSink for Sink {
    fn send(&self, msg: &Outgoing) {
        self.inbox.lock().unwrap().push(msg.payload().clone());
    }
    fn close(&self, code: CloseCode) {
        *self.closed.lock().unwrap() = Some(code);
    }
}

/// A y-websocket client: its own yrs doc, fed by what the server sends.
struct Client {
    conn: Option<DocConnection>,
    sink: Arc<Sink>,
    doc: yrs::Doc,
    text: yrs::TextRef,
    /// Awareness states it knows of (client id → JSON).
    awareness: HashMap<u64, String>,
    clock: u32,
    id: u64,
}

impl Client {
    async fn connect(collab: &Collab, doc_id: i64, id: u64) -> Client {
        let sink = Arc::new(Sink::default());
        let conn = collab
            .connect(doc_id, "someone", Access::Edit, sink.clone())
            .await
            .expect("connect");
        let doc = yrs::Doc::with_client_id(id);
        let text = doc.get_or_insert_text(switchboard_collab::TEXT_NAME);
        let mut c = Client {
            conn: Some(conn),
            sink,
            doc,
            text,
            awareness: HashMap::new(),
            clock: 0,
            id,
        };
        let sv = c.doc.transact().state_vector();
        c.send(Message::Sync(SyncMessage::SyncStep1(sv)).encode_v1());
        c.pump();
        c
    }

    fn send(&mut self, frame: Vec<u8>) {
        self.conn
            .as_mut()
            .expect("connected")
            .handle(&frame)
            .expect("server accepts the frame");
    }

    /// Applies what the server sent.
    fn pump(&mut self) {
        let msgs = std::mem::take(&mut *self.sink.inbox.lock().unwrap());
        for m in msgs {
            match Message::decode_v1(&m).expect("server frames decode") {
                Message::Sync(SyncMessage::SyncStep1(sv)) => {
                    let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                    self.send(Message::Sync(SyncMessage::SyncStep2(diff)).encode_v1());
                }
                Message::Sync(SyncMessage::SyncStep2(u))
                | Message::Sync(SyncMessage::Update(u)) => {
                    self.doc
                        .transact_mut()
                        .apply_update(Update::decode_v1(&u).unwrap())
                        .unwrap();
                }
                Message::Awareness(a) => {
                    for (id, e) in a.clients {
                        if &*e.json == "null" {
                            self.awareness.remove(&id.get());
                        } else {
                            self.awareness.insert(id.get(), e.json.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        assert_eq!(
            *self.sink.closed.lock().unwrap(),
            None,
            "closed by the server"
        );
    }

    fn type_text(&mut self, s: &str) {
        let update = {
            let mut txn = self.doc.transact_mut();
            let len = self.text.len(&txn);
            self.text.insert(&mut txn, len, s);
            txn.encode_update_v1()
        };
        self.send(Message::Sync(SyncMessage::Update(update)).encode_v1());
    }

    fn set_awareness(&mut self, json: &str) {
        self.clock += 1;
        let frame = codec::awareness([(self.id, self.clock, json)].into_iter());
        self.send(frame);
    }

    fn content(&self) -> String {
        self.text.get_string(&self.doc.transact())
    }

    fn leave(&mut self) {
        self.conn = None;
    }
}

async fn text_of(collab: &Collab, doc_id: i64) -> String {
    match collab.content(doc_id, Format::Text).await.unwrap() {
        Content::Text(t) => t,
        _ => unreachable!(),
    }
}

/// Polls `check` (pumping the clients first) until it holds, or panics after 10 s.
async fn eventually<F, Fut>(what: &str, clients: &mut [&mut Client], mut check: F)
where
    F: FnMut(&[&mut Client]) -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..1000 {
        for c in clients.iter_mut() {
            c.pump();
        }
        if check(&*clients).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Everything stored for the document: (the state rebuilt from the store, the log entries).
async fn stored(store: &Arc<dyn Store>, doc_id: i64) -> (String, Vec<Vec<u8>>) {
    let content = store.load_document(doc_id).await.unwrap().unwrap();
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text(switchboard_collab::TEXT_NAME);
    {
        let mut txn = doc.transact_mut();
        for bytes in content
            .snapshot
            .iter()
            .chain(content.updates.iter().map(|u| &u.data))
        {
            txn.apply_update(Update::decode_v1(bytes).unwrap()).unwrap();
        }
    }
    let s = text.get_string(&doc.transact());
    (s, content.updates.into_iter().map(|u| u.data).collect())
}

/// No two log entries carry the same insertion: no update was written twice.
fn assert_stored_once(entries: &[Vec<u8>]) {
    let sets: Vec<_> = entries
        .iter()
        .map(|e| Update::decode_v1(e).unwrap().insertions(true))
        .collect();
    for (i, a) in sets.iter().enumerate() {
        for b in &sets[i + 1..] {
            assert!(a.intersect(b).is_empty(), "an update was stored twice");
        }
    }
}

async fn all_equal(nodes: &[Collab], doc_id: i64, want: &str) -> bool {
    for n in nodes {
        if text_of(n, doc_id).await != want {
            return false;
        }
    }
    true
}

// ----- the tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editors_on_different_nodes_converge_and_each_update_is_stored_once() {
    let c = cluster(vec![config(), config(), config()]).await;
    let mut a = Client::connect(&c.nodes[0], c.doc_id, 1).await;
    let mut b = Client::connect(&c.nodes[1], c.doc_id, 2).await;
    let mut d = Client::connect(&c.nodes[2], c.doc_id, 3).await;
    for i in 0..20 {
        a.type_text(&format!("a{i} "));
        b.type_text(&format!("b{i} "));
        d.type_text(&format!("c{i} "));
        if i % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let nodes = c.nodes.clone();
    let doc_id = c.doc_id;
    eventually("clients converge", &mut [&mut a, &mut b, &mut d], |cs| {
        let want = cs[0].content();
        // 3 editors × (10 × "x0 " + 10 × "x10 ")
        let same = cs.iter().all(|x| x.content() == want) && want.len() == 3 * (30 + 40);
        let nodes = nodes.clone();
        async move { same && all_equal(&nodes, doc_id, &want).await }
    })
    .await;
    let fin = a.content();
    for n in 0..20 {
        for p in ["a", "b", "c"] {
            assert!(fin.contains(&format!("{p}{n} ")), "{p}{n} is missing");
        }
    }
    for n in &c.nodes {
        assert!(n.flush().await);
    }
    let (text, entries) = stored(&c.store, c.doc_id).await;
    assert_eq!(text, fin);
    assert_stored_once(&entries);
    for m in &c.metrics {
        assert_eq!(m.relay_dropped.get(), 0);
        assert_eq!(m.relay_malformed.get(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editors_converge_when_delivery_reorders() {
    let c = cluster(vec![config(), config()]).await;
    c.net.jitter_ms.store(15, Ordering::Relaxed);
    let mut a = Client::connect(&c.nodes[0], c.doc_id, 1).await;
    let mut b = Client::connect(&c.nodes[1], c.doc_id, 2).await;
    for i in 0..30 {
        a.type_text(&format!("a{i} "));
        b.type_text(&format!("b{i} "));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let nodes = c.nodes.clone();
    let doc_id = c.doc_id;
    eventually("clients converge", &mut [&mut a, &mut b], |cs| {
        let want = cs[0].content();
        let same = cs[1].content() == want && want.matches(' ').count() == 60;
        let nodes = nodes.clone();
        async move { same && all_equal(&nodes, doc_id, &want).await }
    })
    .await;
    for n in &c.nodes {
        assert!(n.flush().await);
    }
    let (text, entries) = stored(&c.store, c.doc_id).await;
    assert_eq!(text, a.content());
    assert_stored_once(&entries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loads_while_others_edit_ends_up_identical() {
    // Node 0 stores late (its updates reach a new node only by relay or sync); node 1 stores
    // at once; node 2 loads in the middle.
    let slow = CollabConfig {
        persist_interval: Duration::from_secs(3600),
        ..config()
    };
    let c = cluster(vec![slow, config(), config()]).await;
    let mut a = Client::connect(&c.nodes[0], c.doc_id, 1).await;
    let mut b = Client::connect(&c.nodes[1], c.doc_id, 2).await;
    a.type_text("unstored-by-a ");
    b.type_text("stored-by-b ");
    assert!(c.nodes[1].flush().await);

    // Node 2 opens the document and stops right after subscribing, before reading the store.
    let (subscribed_tx, subscribed_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel();
    *c.net.pause.lock().unwrap() = Some((2, subscribed_tx, go_rx));
    let node2 = c.nodes[2].clone();
    let doc_id = c.doc_id;
    let joining = tokio::spawn(async move { Client::connect(&node2, doc_id, 3).await });
    subscribed_rx.await.unwrap();
    // Edits while it loads: relayed to node 2, which buffers them.
    let before = c.net.delivered_to(2);
    a.type_text("while-loading-a ");
    b.type_text("while-loading-b ");
    assert!(
        c.net.delivered_to(2) > before,
        "node 2 received relay messages while loading"
    );
    go_tx.send(()).unwrap();
    let mut d = joining.await.unwrap();
    // And edits after it loaded.
    a.type_text("after-a ");
    d.type_text("after-c ");

    let nodes = c.nodes.clone();
    eventually("all converge", &mut [&mut a, &mut b, &mut d], |cs| {
        let want = cs[0].content();
        let same = cs.iter().all(|x| x.content() == want) && want.matches(' ').count() == 6;
        let nodes = nodes.clone();
        async move { same && all_equal(&nodes, doc_id, &want).await }
    })
    .await;
    assert!(d.content().contains("unstored-by-a "));
    // A client that joins node 2 now gets it all in its first sync.
    let e = Client::connect(&c.nodes[2], c.doc_id, 4).await;
    assert_eq!(e.content(), a.content());
    for n in &c.nodes {
        assert!(n.flush().await);
    }
    let (text, entries) = stored(&c.store, c.doc_id).await;
    assert_eq!(text, a.content());
    assert_stored_once(&entries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awareness_crosses_nodes_and_a_leaving_connection_is_removed_everywhere() {
    let c = cluster(vec![config(), config()]).await;
    let mut a = Client::connect(&c.nodes[0], c.doc_id, 1).await;
    let mut b = Client::connect(&c.nodes[1], c.doc_id, 2).await;
    a.set_awareness(r#"{"user":"ann"}"#);
    b.set_awareness(r#"{"user":"bob"}"#);
    eventually("each sees the other", &mut [&mut a, &mut b], |cs| {
        let ok = cs[0].awareness.get(&2).map(String::as_str) == Some(r#"{"user":"bob"}"#)
            && cs[1].awareness.get(&1).map(String::as_str) == Some(r#"{"user":"ann"}"#);
        async move { ok }
    })
    .await;
    // A connection joining node 1 later gets node 0's state with its first messages.
    let mut late = Client::connect(&c.nodes[1], c.doc_id, 3).await;
    late.pump();
    assert_eq!(
        late.awareness.get(&1).map(String::as_str),
        Some(r#"{"user":"ann"}"#)
    );
    assert!(late.awareness.contains_key(&2));

    a.leave();
    eventually(
        "the removal reaches node 1",
        &mut [&mut b, &mut late],
        |cs| {
            let ok = cs.iter().all(|x| !x.awareness.contains_key(&1));
            async move { ok }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_what_another_node_stored_but_did_not_relay_yet() {
    let compacting = CollabConfig {
        compact_updates: 3,
        ..config()
    };
    let c = cluster(vec![compacting, config()]).await;
    let mut a = Client::connect(&c.nodes[0], c.doc_id, 1).await;
    let mut b = Client::connect(&c.nodes[1], c.doc_id, 2).await;
    // Node 0 hears nothing from node 1 for now.
    c.net.hold(0);
    b.type_text("from-b ");
    assert!(c.nodes[1].flush().await);
    assert!(!text_of(&c.nodes[0], c.doc_id).await.contains("from-b"));
    // Node 0 writes three entries of its own: it compacts the log, node 1's entry included.
    for i in 0..3 {
        a.type_text(&format!("a{i} "));
        assert!(c.nodes[0].flush().await);
    }
    for _ in 0..500 {
        if c.metrics[0].compactions.get() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(c.metrics[0].compactions.get(), 1, "node 0 compacted");
    let content = c.store.load_document(c.doc_id).await.unwrap().unwrap();
    assert!(content.snapshot.is_some());
    assert!(content.updates.is_empty(), "the whole log was compacted");
    let (text, _) = stored(&c.store, c.doc_id).await;
    assert!(
        text.contains("from-b "),
        "node 1's stored update survived: {text:?}"
    );
    assert!(text.contains("a2 "));

    // Once node 0 hears again, everything converges, and the store still agrees.
    c.net.release(0);
    let nodes = c.nodes.clone();
    let doc_id = c.doc_id;
    eventually("converge", &mut [&mut a, &mut b], |cs| {
        let want = cs[0].content();
        let same = cs[1].content() == want && want.matches(' ').count() == 4;
        let nodes = nodes.clone();
        async move { same && all_equal(&nodes, doc_id, &want).await }
    })
    .await;
    for n in &c.nodes {
        assert!(n.flush().await);
    }
    assert_eq!(stored(&c.store, c.doc_id).await.0, a.content());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_relay_message_is_healed_by_the_sync_request() {
    let c = cluster(vec![config(), config()]).await;
    let mut a = Client::connect(&c.nodes[0], c.doc_id, 1).await;
    let mut b = Client::connect(&c.nodes[1], c.doc_id, 2).await;
    c.net.refuse.lock().unwrap().insert(0, 1);
    a.type_text("refused ");
    // No further edit: node 0's next tick asks for a sync, and node 1 gets the update.
    let dropped = c.metrics[0].relay_dropped.clone();
    eventually("node 1 heals", &mut [&mut b], |cs| {
        let ok = cs[0].content() == "refused " && dropped.get() == 1;
        async move { ok }
    })
    .await;
    assert_eq!(text_of(&c.nodes[1], c.doc_id).await, "refused ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_relay_message_is_healed_by_the_sync_request() {
    let c = cluster(vec![config(), config()]).await;
    let mut a = Client::connect(&c.nodes[0], c.doc_id, 1).await;
    let mut b = Client::connect(&c.nodes[1], c.doc_id, 2).await;
    // The transport loses a message without saying so; the next one depends on it.
    c.net.lose.lock().unwrap().insert(0, 1);
    a.type_text("lost ");
    a.type_text("next ");
    eventually("node 1 heals", &mut [&mut b], |cs| {
        let ok = cs[0].content() == "lost next ";
        async move { ok }
    })
    .await;
    assert_eq!(text_of(&c.nodes[1], c.doc_id).await, "lost next ");
    for n in &c.nodes {
        assert!(n.flush().await);
    }
    let (text, entries) = stored(&c.store, c.doc_id).await;
    assert_eq!(text, "lost next ");
    assert_stored_once(&entries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_relay_payload_is_dropped_and_the_document_is_unaffected() {
    let c = cluster(vec![config(), config()]).await;
    let mut a = Client::connect(&c.nodes[0], c.doc_id, 1).await;
    let mut b = Client::connect(&c.nodes[1], c.doc_id, 2).await;
    a.type_text("hello ");
    eventually("synced", &mut [&mut b], |cs| {
        let ok = cs[0].content() == "hello ";
        async move { ok }
    })
    .await;
    let real = c.net.sent.lock().unwrap().last().unwrap().clone();
    let mut bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        (0..200u8).collect(),
        real[..real.len() / 2].to_vec(),
    ];
    let mut other_version = real.to_vec();
    other_version[0] = other_version[0].wrapping_add(1);
    bad.push(other_version);
    let mut garbage_body = real[..10].to_vec();
    garbage_body.extend([0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
    bad.push(garbage_body);
    let mut unknown_kind = real.to_vec();
    unknown_kind[9] = 0x7f;
    bad.push(unknown_kind);
    for payload in &bad {
        c.nodes[1].handle_relay(c.doc_id, Bytes::from(payload.clone()));
    }
    assert_eq!(c.metrics[1].relay_malformed.get(), bad.len() as u64);
    b.pump();
    assert_eq!(b.content(), "hello ");
    assert_eq!(text_of(&c.nodes[1], c.doc_id).await, "hello ");
    // Still relaying both ways.
    b.type_text("world ");
    a.type_text("again ");
    let nodes = c.nodes.clone();
    let doc_id = c.doc_id;
    eventually("converge", &mut [&mut a, &mut b], |cs| {
        let want = cs[0].content();
        let same = cs[1].content() == want && want.matches(' ').count() == 3;
        let nodes = nodes.clone();
        async move { same && all_equal(&nodes, doc_id, &want).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_unsubscribes() {
    let quick = CollabConfig {
        unload_after: Duration::from_millis(50),
        ..config()
    };
    let c = cluster(vec![quick, config()]).await;
    let mut a = Client::connect(&c.nodes[0], c.doc_id, 1).await;
    assert!(c.net.subscribed(0, c.doc_id));
    a.type_text("x");
    a.leave();
    for _ in 0..300 {
        if c.nodes[0].loaded() == 0 && !c.net.subscribed(0, c.doc_id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(c.nodes[0].loaded(), 0);
    assert!(!c.net.subscribed(0, c.doc_id), "unloading unsubscribed");
    // Reopening subscribes again and finds the content.
    let a2 = Client::connect(&c.nodes[0], c.doc_id, 5).await;
    assert!(c.net.subscribed(0, c.doc_id));
    assert_eq!(a2.content(), "x");
}
