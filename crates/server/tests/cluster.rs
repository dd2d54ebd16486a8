//! Three nodes on loopback ports, sharing PostgreSQL and either the real Redis
//! (127.0.0.1:6379) or the real NATS (127.0.0.1:4222). Every test runs once per broker. The
//! nodes are real processes (so one can be killed with SIGKILL), each with its own key prefix
//! on the broker and its own PostgreSQL schema, so tests never see each other.
//!
//! Without Redis, NATS or PostgreSQL the tests print a loud SKIP, except under CI (env `CI`),
//! where a missing service is a failure.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::cluster::{chat_room, nats_url, redis_url, Cluster, Nginx};
use common::RawClient;
use serde_json::{json, Value};

/// Publications on `channel` until `n` arrived; fails the test after `limit`.
async fn collect(c: &mut RawClient, channel: &str, n: usize, limit: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} publications on {channel} arrived",
            got.len()
        );
        got.push(c.publication(channel).await);
    }
    got
}

/// Offsets must be exactly `1..=n`, in that order.
fn assert_in_order(pubs: &[Value], n: u64) {
    let offsets: Vec<u64> = pubs
        .iter()
        .map(|p| p["offset"].as_u64().unwrap_or(0))
        .collect();
    let want: Vec<u64> = (1..=n).collect();
    assert_eq!(offsets, want, "offsets in order, no gap, no duplicate");
}

async fn cross_node_delivery(broker: &str) {
    let Some(cluster) = Cluster::start(broker, 3).await else {
        return;
    };
    let mut sub = cluster.client(0, "reader").await;
    let reply = sub.call(json!({"subscribe": {"channel": "feed:x"}})).await;
    assert!(reply.get("subscribe").is_some(), "subscribe: {reply}");

    const EACH: usize = 60;
    let mut writer = cluster.client(2, "writer").await;
    let via_client = async {
        for n in 0..EACH {
            let r = writer
                .call(json!({"publish": {"channel": "feed:x", "data": {"from": "c", "n": n}}}))
                .await;
            assert!(r.get("publish").is_some(), "client publish: {r}");
        }
    };
    let via_api = async {
        for n in 0..EACH {
            let r = cluster
                .api(
                    1,
                    "publish",
                    json!({"channel": "feed:x", "data": {"from": "b", "n": n}}),
                )
                .await;
            assert!(r.get("error").is_none(), "api publish: {r}");
        }
    };
    tokio::join!(via_client, via_api);
    let pubs = collect(&mut sub, "feed:x", 2 * EACH, Duration::from_secs(20)).await;
    assert_in_order(&pubs, 2 * EACH as u64);
    for from in ["b", "c"] {
        let ns: Vec<u64> = pubs
            .iter()
            .filter(|p| p["data"]["from"] == from)
            .map(|p| p["data"]["n"].as_u64().unwrap())
            .collect();
        assert_eq!(
            ns,
            (0..EACH as u64).collect::<Vec<_>>(),
            "{from}'s publications, each once, in its order"
        );
    }

    // /api/info on any node lists all three, with their connection counts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = cluster.api(1, "info", json!({})).await;
        let nodes = info["result"]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let names: BTreeSet<String> = nodes
            .iter()
            .filter_map(|n| n["name"].as_str().map(String::from))
            .collect();
        let clients: u64 = nodes
            .iter()
            .map(|n| n["num_clients"].as_u64().unwrap_or(0))
            .sum();
        // Heartbeats are up to a second old: wait for ones sent after both connected.
        if names.len() == 3 && clients == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/api/info never listed 3 nodes with the reader and the writer: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_delivery_in_offset_order_redis() {
    cross_node_delivery(&redis_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_delivery_in_offset_order_nats() {
    cross_node_delivery(&nats_url()).await;
}

async fn presence_across_nodes(broker: &str) {
    let Some(mut cluster) = Cluster::start(broker, 3).await else {
        return;
    };
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = cluster.client(i, &format!("user{i}")).await;
        let r = c.call(json!({"subscribe": {"channel": "feed:room"}})).await;
        assert!(r.get("subscribe").is_some(), "subscribe: {r}");
        clients.push(c);
    }
    let users = |v: &Value| -> BTreeSet<String> {
        v["result"]["presence"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|i| i["user"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    for i in 0..3 {
        let p = cluster
            .api(i, "presence", json!({"channel": "feed:room"}))
            .await;
        assert_eq!(
            users(&p),
            ["user0", "user1", "user2"].map(String::from).into(),
            "presence on node {i}: {p}"
        );
    }
    // A client's presence through the protocol too, on another node.
    let r = clients[0]
        .call(json!({"presence": {"channel": "feed:room"}}))
        .await;
    assert_eq!(
        r["presence"]["presence"].as_object().map(|m| m.len()),
        Some(3),
        "{r}"
    );

    // node2 dies without a word: its client leaves presence within the TTL (3 s).
    cluster.kill(2).await;
    let killed = Instant::now();
    loop {
        let p = cluster
            .api(0, "presence", json!({"channel": "feed:room"}))
            .await;
        if users(&p) == ["user0", "user1"].map(String::from).into() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(8),
            "the killed node's client is still present: {p}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stats = cluster
        .api(1, "presence_stats", json!({"channel": "feed:room"}))
        .await;
    assert_eq!(stats["result"]["num_clients"], 2, "{stats}");
    assert_eq!(stats["result"]["num_users"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_a_killed_node_expires_redis() {
    presence_across_nodes(&redis_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_a_killed_node_expires_nats() {
    presence_across_nodes(&nats_url()).await;
}

async fn chat_across_nodes(broker: &str) {
    let Some(cluster) = Cluster::start(broker, 3).await else {
        return;
    };
    let (room, users) = chat_room(&cluster.db, 3).await;
    let channel = format!("chat:{room}");
    let mut reader = cluster.client(0, &users[0].to_string()).await;
    let r = reader
        .call(json!({"subscribe": {"channel": channel}}))
        .await;
    assert!(r.get("subscribe").is_some(), "subscribe: {r}");

    // Two senders on two other nodes write into the room at once: PostgreSQL hands out the
    // offsets, and their broadcasts cross on the way to node0.
    const EACH: usize = 80;
    let mut senders = Vec::new();
    for (i, user) in [(1, users[1]), (2, users[2])] {
        let mut c = cluster.client(i, &user.to_string()).await;
        let channel = channel.clone();
        senders.push(tokio::spawn(async move {
            for n in 0..EACH {
                let id = format!("{user}-{n}");
                let r = c
                    .call(json!({"publish": {"channel": channel, "data": {"text": id, "client_msg_id": id}}}))
                    .await;
                assert!(r.get("publish").is_some(), "send: {r}");
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let pubs = collect(&mut reader, &channel, 2 * EACH, Duration::from_secs(20)).await;
    assert_in_order(&pubs, 2 * EACH as u64);
    let texts: HashMap<String, usize> = pubs.iter().fold(HashMap::new(), |mut m, p| {
        *m.entry(
            p["data"]["message"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
        .or_default() += 1;
        m
    });
    assert_eq!(texts.len(), 2 * EACH, "every message once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_from_several_nodes_arrives_in_offset_order_redis() {
    chat_across_nodes(&redis_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_from_several_nodes_arrives_in_offset_order_nats() {
    chat_across_nodes(&nats_url()).await;
}

async fn node_loss_behind_nginx(broker: &str) {
    let Some(mut cluster) = Cluster::start(broker, 3).await else {
        return;
    };
    let Some(js) = common::cluster::js_suite().await else {
        return;
    };
    let Some(nginx) = Nginx::start(&cluster).await else {
        return;
    };
    let (room, users) = chat_room(&cluster.db, 7).await;
    let victim = 1;
    let pid = cluster.nodes[victim]
        .child
        .as_ref()
        .and_then(|c| c.id())
        .expect("victim pid");
    run_js(
        &js,
        "node_loss.cluster.js",
        &nginx.ws_url(),
        &nginx.http_url(),
        &[
            ("SB_CHANNEL", format!("chat:{room}")),
            ("SB_USERS", serde_json::to_string(&users).unwrap()),
            ("SB_VICTIM_PID", pid.to_string()),
            ("SB_VICTIM_HTTP", cluster.http(victim)),
        ],
    )
    .await;
    // The suite killed the node; reap it.
    cluster.kill(victim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_behind_nginx_loses_nothing_redis() {
    node_loss_behind_nginx(&redis_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_behind_nginx_loses_nothing_nats() {
    node_loss_behind_nginx(&nats_url()).await;
}

/// Runs one JS cluster suite with `node --test`; panics unless it passes.
async fn run_js(
    js: &std::path::Path,
    file: &str,
    ws_url: &str,
    http_url: &str,
    extra: &[(&str, String)],
) {
    let token_dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new("node");
    cmd.args(["--test", file])
        .current_dir(js)
        .env("SB_WS_URL", ws_url)
        .env("SB_HTTP_URL", http_url)
        .env("SB_API_KEY", common::cluster::API_KEY)
        .env("SB_SECRET", common::cluster::SECRET)
        .env("SB_BIN", env!("CARGO_BIN_EXE_switchboard"))
        // `switchboard token` must not touch the repository's ./data.
        .env("SWITCHBOARD_DATA_DIR", token_dir.path())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    // Output goes to a file, so that it is there to print even when the suite hangs.
    let log = token_dir.path().join("suite.log");
    let f = std::fs::File::create(&log).unwrap();
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    let mut child = cmd.spawn().expect("node runs");
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await;
    println!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    let status = status
        .unwrap_or_else(|_| panic!("{file} did not finish in 120 s"))
        .expect("node runs");
    assert!(status.success(), "{file} failed");
}

async fn documents_across_nodes(broker: &str) {
    let Some(mut cluster) = Cluster::start(broker, 3).await else {
        return;
    };
    let Some(js) = common::cluster::js_suite().await else {
        return;
    };
    let result = tempfile::tempdir().unwrap();
    let result_file = result.path().join("result.json");
    let nodes: Vec<String> = (0..3).map(|i| cluster.http(i)).collect();
    run_js(
        &js,
        "docs.cluster.js",
        &format!("ws://{}/connection/websocket", cluster.addr(0)),
        &cluster.http(0),
        &[
            ("SB_NODES", serde_json::to_string(&nodes).unwrap()),
            ("SB_RESULT", result_file.display().to_string()),
        ],
    )
    .await;
    let got: Value = serde_json::from_slice(&std::fs::read(&result_file).unwrap()).unwrap();
    let (doc, text) = (got["doc"].as_i64().unwrap(), got["text"].as_str().unwrap());

    // Past the persistence interval (50 ms), every node dies at once: the store alone must
    // hold the converged text.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        cluster.kill(i).await;
    }
    let store = cluster.db.open().await;
    let content = store.load_document(doc).await.unwrap().expect("document");
    store.close().await;
    let ydoc = yrs::Doc::new();
    {
        use yrs::updates::decoder::Decode;
        use yrs::Transact;
        let mut txn = ydoc.transact_mut();
        for bytes in content
            .snapshot
            .iter()
            .chain(content.updates.iter().map(|u| &u.data))
        {
            txn.apply_update(yrs::Update::decode_v1(bytes).unwrap())
                .unwrap();
        }
    }
    let stored = {
        use yrs::{GetString, Transact};
        let t = ydoc.get_or_insert_text("content");
        let txn = ydoc.transact();
        t.get_string(&txn)
    };
    assert_eq!(stored, text, "the store holds the converged text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_converge_across_nodes_and_are_stored_redis() {
    documents_across_nodes(&redis_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_converge_across_nodes_and_are_stored_nats() {
    documents_across_nodes(&nats_url()).await;
}
