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
        if names.len() == 3 {
            let clients: u64 = nodes
                .iter()
                .map(|n| n["num_clients"].as_u64().unwrap())
                .sum();
            assert_eq!(clients, 2, "reader on node0, writer on node2: {info}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/api/info never listed 3 nodes: {info}"
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
    let token_dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("node")
            .args(["--test", "node_loss.cluster.js"])
            .current_dir(&js)
            .env("SB_WS_URL", nginx.ws_url())
            .env("SB_HTTP_URL", nginx.http_url())
            .env("SB_API_KEY", common::cluster::API_KEY)
            .env("SB_SECRET", common::cluster::SECRET)
            .env("SB_BIN", env!("CARGO_BIN_EXE_switchboard"))
            .env("SWITCHBOARD_DATA_DIR", token_dir.path())
            .env("SB_CHANNEL", format!("chat:{room}"))
            .env("SB_USERS", serde_json::to_string(&users).unwrap())
            .env("SB_VICTIM_PID", pid.to_string())
            .env("SB_VICTIM_HTTP", cluster.http(victim))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("node loss suite finished in time")
    .expect("node runs");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "node_loss.cluster.js failed");
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
