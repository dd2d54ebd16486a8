//! Wire details of the JSON client protocol that the SDKs rely on but do not expose: the
//! subprotocol, several commands in one frame, and the exact shape of the subscribe reply.

mod common;

use common::{unique, RawClient};
use serde_json::json;
use switchboard::testing::TestServer;

#[tokio::test]
async fn centrifuge_json_subprotocol_is_accepted() {
    let server = TestServer::start().await;
    let (mut c, chosen) = RawClient::open_json_subprotocol(&server).await;
    assert_eq!(chosen.as_deref(), Some("centrifuge-json"));
    let reply = c
        .call(json!({"connect": {"token": server.token("u1", None)}}))
        .await;
    assert!(reply.get("connect").is_some(), "{reply}");
    c.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn several_commands_in_one_frame_each_get_their_reply() {
    let server = TestServer::start().await;
    let (a, b) = (unique("multi"), unique("multi"));
    let mut c = RawClient::open(&server).await;
    let frame = [
        json!({"id": 1, "connect": {"token": server.token("u1", None)}}),
        json!({"id": 2, "subscribe": {"channel": a}}),
        json!({"id": 3, "subscribe": {"channel": b}}),
        json!({"id": 4, "publish": {"channel": a, "data": {"n": 1}}}),
    ]
    .iter()
    .map(|v| v.to_string())
    .collect::<Vec<_>>()
    .join("\n");
    c.send_text(frame).await;
    for id in 1..=4 {
        let reply = c.reply(id).await;
        assert!(reply.get("error").is_none(), "command {id}: {reply}");
    }
    assert_eq!(c.publication(&a).await["data"], json!({"n": 1}));
    c.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_reply_has_no_id_and_no_delta() {
    let server = TestServer::start().await;
    let mut c = RawClient::connect(&server, "u1").await;
    let channel = unique("shape");
    let reply = c
        .call(json!({"subscribe": {"channel": channel, "delta": "fossil", "recoverable": true}}))
        .await;
    let result = reply
        .get("subscribe")
        .unwrap_or_else(|| panic!("subscribe failed: {reply}"));
    assert!(
        result.get("id").is_none(),
        "SubscribeResult.id must never be set: {result}"
    );
    assert_ne!(
        result.get("delta"),
        Some(&json!(true)),
        "delta must be refused: {result}"
    );
    assert_eq!(result["recoverable"], json!(true), "{result}");
    assert!(
        result["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{result}"
    );
    // Publications carry the next offset of the stream the reply described.
    let top = result.get("offset").and_then(|o| o.as_u64()).unwrap_or(0);
    let reply = c
        .call(json!({"publish": {"channel": channel, "data": {}}}))
        .await;
    assert!(reply.get("publish").is_some(), "{reply}");
    assert_eq!(c.publication(&channel).await["offset"], json!(top + 1));
    c.close().await;
    server.shutdown().await;
}
