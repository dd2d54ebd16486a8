//! A namespace owned by a service (`ChannelOwner`): the service decides who subscribes, takes
//! client publishes, and its durable stream (not the broker's ring) serves subscribe positions,
//! recovery and history. The owner here is a small in-memory stand-in for the chat service.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::{api, RawClient};
use serde_json::json;
use switchboard::node::{ChannelOwner, Node, RpcContext};
use switchboard::testing::TestServer;
use switchboard_hub::{BrokerError, HistoryFilter, HistoryPage};
use switchboard_protocol::client::{Publication, StreamPosition};
use switchboard_protocol::codes::{self, ErrorCode};
use switchboard_protocol::RawValue;

const EPOCH: &str = "durable-epoch";

struct Owner {
    node: Arc<Node>,
    members: HashSet<&'static str>,
    /// The stream; the lock is held across the broadcast so offsets leave in order.
    log: tokio::sync::Mutex<Vec<Arc<Publication>>>,
    publishes: Mutex<u32>,
}

#[async_trait]
impl ChannelOwner for Owner {
    async fn can_subscribe(&self, user: &str, _channel: &str) -> Result<(), ErrorCode> {
        if self.members.contains(user) {
            Ok(())
        } else {
            Err(codes::ERROR_PERMISSION_DENIED)
        }
    }

    async fn publish(
        &self,
        ctx: RpcContext<'_>,
        channel: &str,
        data: &RawValue,
    ) -> Result<(), ErrorCode> {
        self.can_subscribe(ctx.user, channel).await?;
        *self.publishes.lock().unwrap() += 1;
        let mut log = self.log.lock().await;
        let publication = Arc::new(Publication {
            offset: log.len() as u64 + 1,
            data: data.to_owned(),
            info: None,
            tags: None,
        });
        log.push(publication.clone());
        self.node
            .hub
            .broker
            .broadcast(channel, publication)
            .await
            .map_err(|_| codes::ERROR_INTERNAL)
    }

    async fn history(&self, _channel: &str, f: &HistoryFilter) -> Result<HistoryPage, BrokerError> {
        let log = self.log.lock().await;
        if let Some(since) = &f.since {
            if since.epoch != EPOCH {
                return Err(BrokerError::UnrecoverablePosition);
            }
        }
        let after = f.since.as_ref().map_or(0, |s| s.offset);
        let publications = log
            .iter()
            .filter(|p| p.offset > after)
            .take(f.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect();
        let position = StreamPosition {
            offset: log.len() as u64,
            epoch: EPOCH.into(),
        };
        Ok(HistoryPage {
            publications,
            position,
        })
    }
}

async fn server_with_owner() -> (TestServer, Arc<Owner>) {
    // history_size = 0: the namespace keeps no ring, yet its channels are recoverable.
    let server = TestServer::start_with("[namespaces.room]\nhistory_size = 0\n").await;
    let owner = Arc::new(Owner {
        node: server.node().clone(),
        members: ["alice", "bob"].into_iter().collect(),
        log: tokio::sync::Mutex::new(Vec::new()),
        publishes: Mutex::new(0),
    });
    server.node().register_owner("room", owner.clone());
    (server, owner)
}

#[tokio::test]
async fn owner_decides_subscribe_and_publish() {
    let (server, owner) = server_with_owner().await;
    let mut eve = RawClient::connect(&server, "eve").await;
    let r = eve.call(json!({"subscribe": {"channel": "room:1"}})).await;
    assert_eq!(r["error"]["code"], 103, "{r}");
    let r = eve
        .call(json!({"publish": {"channel": "room:1", "data": {"t": "x"}}}))
        .await;
    assert_eq!(r["error"]["code"], 103, "{r}");

    let mut alice = RawClient::connect(&server, "alice").await;
    let r = alice
        .call(json!({"subscribe": {"channel": "room:1"}}))
        .await;
    let sub = &r["subscribe"];
    assert_eq!(sub["recoverable"], true, "{r}");
    assert_eq!(sub["epoch"], EPOCH, "{r}");
    let r = alice
        .call(json!({"publish": {"channel": "room:1", "data": {"t": "hi"}}}))
        .await;
    assert!(r.get("publish").is_some(), "{r}");
    let p = alice.publication("room:1").await;
    assert_eq!(
        (p["offset"].as_u64(), &p["data"]),
        (Some(1), &json!({"t": "hi"}))
    );
    assert_eq!(*owner.publishes.lock().unwrap(), 1);

    // The server API may not write into an owned stream, and reads the owner's.
    let (_, v) = api(&server, "publish", json!({"channel": "room:1", "data": {}})).await;
    assert_eq!(v["error"]["code"], 108, "{v}");
    let (_, v) = api(
        &server,
        "history",
        json!({"channel": "room:1", "limit": -1}),
    )
    .await;
    assert_eq!(v["result"]["epoch"], EPOCH, "{v}");
    assert_eq!(
        v["result"]["publications"][0]["data"],
        json!({"t": "hi"}),
        "{v}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn recovery_reads_the_owners_stream() {
    let (server, _owner) = server_with_owner().await;
    let mut bob = RawClient::connect(&server, "bob").await;
    for i in 0..5 {
        let r = bob
            .call(json!({"publish": {"channel": "room:2", "data": {"n": i}}}))
            .await;
        assert!(r.get("publish").is_some(), "{r}");
    }
    // Alice was at offset 2: she recovers 3, 4 and 5, then gets live ones.
    let mut alice = RawClient::connect(&server, "alice").await;
    let r = alice
        .call(json!({"subscribe": {"channel": "room:2", "recover": true, "offset": 2, "epoch": EPOCH}}))
        .await;
    let sub = &r["subscribe"];
    assert_eq!(sub["recovered"], true, "{r}");
    let offsets: Vec<u64> = sub["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![3, 4, 5]);
    bob.call(json!({"publish": {"channel": "room:2", "data": {"n": 5}}}))
        .await;
    assert_eq!(alice.publication("room:2").await["offset"], 6);

    // Another epoch cannot be recovered from: told explicitly, no publications.
    let mut late = RawClient::connect(&server, "bob").await;
    let r = late
        .call(json!({"subscribe": {"channel": "room:2", "recover": true, "offset": 1, "epoch": "gone"}}))
        .await;
    assert_eq!(r["subscribe"]["recovered"], serde_json::Value::Null, "{r}");
    assert_eq!(r["subscribe"]["was_recovering"], true, "{r}");
    assert!(r["subscribe"].get("publications").is_none(), "{r}");
    server.shutdown().await;
}
