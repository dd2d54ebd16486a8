//! Bad input: one test per row of the acceptance table, each asserting the exact error or close
//! code, and each proving afterwards that the server kept serving a well-behaved client that was
//! connected throughout (see `common::Bystander`). Then the slow-consumer test, and the
//! connection timers (no pong, no connect, expired token), each next to a client that is kept.

mod common;

use std::time::Duration;

use common::{api, error_code, http, unique, Bystander, Event, RawClient};
use serde_json::{json, Value};
use switchboard::testing::TestServer;

#[tokio::test]
async fn non_json_frame_closes_with_3501() {
    let server = TestServer::start().await;
    let bystander = Bystander::start(&server).await;

    // After a successful connect.
    let mut c = RawClient::connect(&server, "u1").await;
    c.send_text("this is not json").await;
    c.expect_close(3501).await;

    // As the very first frame.
    let mut c = RawClient::open(&server).await;
    c.send_text("{\"id\":1,\"connect\":").await;
    c.expect_close(3501).await;

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn command_before_connect_closes_with_3501() {
    let server = TestServer::start().await;
    let bystander = Bystander::start(&server).await;

    let mut c = RawClient::open(&server).await;
    c.send(json!({"subscribe": {"channel": "news"}})).await;
    c.expect_close(3501).await;

    let mut c = RawClient::open(&server).await;
    c.send(json!({"publish": {"channel": "news", "data": {}}}))
        .await;
    c.expect_close(3501).await;

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_token_closes_with_3500() {
    let server = TestServer::start().await;
    let bystander = Bystander::start(&server).await;

    // Signed with another secret.
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "u1", "exp": unix_now() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-server-secret"),
    )
    .unwrap();
    // Not a JWT at all.
    for token in [forged.as_str(), "garbage"] {
        let mut c = RawClient::open(&server).await;
        c.send(json!({"connect": {"token": token}})).await;
        c.expect_close(3500).await;
    }

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn expired_token_gets_error_109() {
    let server = TestServer::start().await;
    let bystander = Bystander::start(&server).await;

    let mut c = RawClient::open(&server).await;
    let reply = c
        .call(json!({"connect": {"token": server.token("u1", Some(-60))}}))
        .await;
    assert_eq!(error_code(&reply), 109, "{reply}");
    // 109 is not temporary: the SDK must get a new token rather than retry this one.
    assert_ne!(reply["error"]["temporary"], json!(true), "{reply}");
    c.close().await;

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_namespace_gets_error_102() {
    let server = TestServer::start().await;
    let bystander = Bystander::start(&server).await;

    let mut c = RawClient::connect(&server, "u1").await;
    let reply = c.call(json!({"subscribe": {"channel": "nope:x"}})).await;
    assert_eq!(error_code(&reply), 102, "{reply}");
    // The connection survives a command error.
    let reply = c
        .call(json!({"subscribe": {"channel": unique("ok")}}))
        .await;
    assert!(reply.get("subscribe").is_some(), "{reply}");
    c.close().await;

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn subscribe_without_permission_gets_error_103() {
    let server = TestServer::start_with(
        "[namespaces.locked]\nallow_subscribe_for_client = false\n\n\
         [namespaces.ns]\nallow_subscribe_for_client = true\n",
    )
    .await;
    let bystander = Bystander::start(&server).await;

    let mut c = RawClient::connect(&server, "u1").await;
    let reply = c.call(json!({"subscribe": {"channel": "locked:x"}})).await;
    assert_eq!(
        error_code(&reply),
        103,
        "namespace without client subscribe: {reply}"
    );

    // A user-limited channel of user 42, tried by u1 and then by 42 itself.
    let reply = c
        .call(json!({"subscribe": {"channel": "ns:room#42"}}))
        .await;
    assert_eq!(error_code(&reply), 103, "another user's channel: {reply}");
    let mut owner = RawClient::connect(&server, "42").await;
    let reply = owner
        .call(json!({"subscribe": {"channel": "ns:room#42"}}))
        .await;
    assert!(
        reply.get("subscribe").is_some(),
        "the owner may subscribe: {reply}"
    );
    c.close().await;
    owner.close().await;

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn second_subscribe_gets_error_105() {
    let server = TestServer::start().await;
    let bystander = Bystander::start(&server).await;

    let channel = unique("twice");
    let mut c = RawClient::connect(&server, "u1").await;
    let reply = c.call(json!({"subscribe": {"channel": channel}})).await;
    assert!(reply.get("subscribe").is_some(), "{reply}");
    let reply = c.call(json!({"subscribe": {"channel": channel}})).await;
    assert_eq!(error_code(&reply), 105, "{reply}");
    c.close().await;

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn frame_over_limit_closes_with_1009() {
    let server = TestServer::start_with("[client]\nmax_frame_size = 1024\n").await;
    let bystander = Bystander::start(&server).await;

    let channel = unique("big");
    let mut c = RawClient::connect(&server, "u1").await;
    // Under the limit is fine...
    let reply = c
        .call(json!({"publish": {"channel": channel, "data": {"s": "x".repeat(800)}}}))
        .await;
    assert!(
        reply.get("publish").is_some(),
        "a 900-byte frame must pass: {reply}"
    );
    // ...over it is not.
    c.send(json!({"publish": {"channel": channel, "data": {"s": "x".repeat(4096)}}}))
        .await;
    c.expect_close(1009).await;

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn command_flood_gets_111_then_closes_with_3013() {
    let server = TestServer::start_with("[client]\ncommand_rate = 5\ncommand_burst = 10\n").await;
    let bystander = Bystander::start(&server).await;

    let channel = unique("flood");
    let mut c = RawClient::connect(&server, "flooder").await;
    let mut too_many = 0usize;
    let mut ok = 0usize;
    let mut close = None;
    // One command per frame, as fast as the socket takes them, reading whatever comes back.
    'flood: for _ in 0..2000 {
        let cmd = json!({"id": c.next_id(), "presence_stats": {"channel": channel}});
        c.send_text(cmd.to_string()).await;
        while let Ok(event) = tokio::time::timeout(Duration::from_millis(2), c.next_event()).await {
            match event {
                Event::Msg(m) if m.get("error").is_some() => {
                    assert_eq!(error_code(&m), 111, "{m}");
                    assert_eq!(
                        m["error"]["temporary"],
                        json!(true),
                        "111 is temporary: {m}"
                    );
                    too_many += 1;
                }
                Event::Msg(_) => ok += 1,
                other => {
                    close = Some(other);
                    break 'flood;
                }
            }
        }
    }
    if close.is_none() {
        close = Some(c.next_event().await);
    }
    assert!(ok >= 1, "the burst should let some commands through");
    assert!(
        too_many >= 1,
        "expected error 111 before the disconnect ({ok} ok)"
    );
    match close {
        Some(Event::Close(Some(code), reason)) => {
            assert_eq!(code, 3013, "close reason {reason:?}")
        }
        other => panic!("expected Close 3013 after {too_many} x 111, got {other:?}"),
    }

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn api_without_key_is_401() {
    let server = TestServer::start().await;
    let bystander = Bystander::start(&server).await;
    let url = format!("{}/api/publish", server.http_url());
    let body = json!({"channel": unique("api"), "data": {"x": 1}});

    let resp = http().post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "no key");
    let resp = http()
        .post(&url)
        .header("X-API-Key", "wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401, "wrong key");
    let resp = http()
        .post(&url)
        .header("Authorization", "apikey wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401, "wrong key in Authorization");

    // Both accepted spellings of the right key work.
    let resp = http()
        .post(&url)
        .header("Authorization", format!("apikey {}", server.api_key))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "Authorization: apikey KEY");
    let (status, reply) = api(&server, "publish", body).await;
    assert_eq!(status, 200, "X-API-Key: {reply}");
    assert!(reply.get("error").is_none(), "{reply}");

    bystander.check(&server).await;
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_api_json_is_400_with_message() {
    let server = TestServer::start().await;
    let bystander = Bystander::start(&server).await;

    for body in ["{\"channel\": ", "not json", "[1,2"] {
        let resp = http()
            .post(format!("{}/api/publish", server.http_url()))
            .header("X-API-Key", &server.api_key)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "body {body:?}");
        let text = resp.text().await.unwrap();
        assert!(
            !text.trim().is_empty(),
            "a 400 must say what is wrong (body {body:?})"
        );
    }

    bystander.check(&server).await;
    server.shutdown().await;
}

/// JSON of the wrong shape is a Centrifugo API error (200 + 107), as `cent` expects; nothing
/// is published.
#[tokio::test]
async fn api_json_of_wrong_shape_is_error_107() {
    let server = TestServer::start().await;
    for body in [
        r#"{"channel":"a"}"#,
        r#"{"data":{}}"#,
        r#"{"channel":5,"data":{}}"#,
    ] {
        let resp = http()
            .post(format!("{}/api/publish", server.http_url()))
            .header("X-API-Key", &server.api_key)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "body {body:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], 107, "body {body:?}: {v}");
    }
    let resp = http()
        .post(format!("{}/api/history", server.http_url()))
        .header("X-API-Key", &server.api_key)
        .body(r#"{"channel":"a","limit":-1}"#)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["result"]["publications"]
            .as_array()
            .map_or(0, |p| p.len()),
        0,
        "{v}"
    );
    server.shutdown().await;
}

/// A subscriber that stops reading is disconnected with 3008 once its write queue overflows,
/// while another subscriber of the same channel receives every publication, in order.
#[tokio::test]
async fn slow_consumer_is_closed_with_3008_and_others_get_everything() {
    const N: usize = 400;
    const SIZE: usize = 32 * 1024;
    let server = TestServer::start_with("[client]\nwrite_queue_max_bytes = 65536\n").await;
    let channel = unique("firehose");

    let mut slow = RawClient::open_small_rcvbuf(&server).await;
    let reply = slow
        .call(json!({"connect": {"token": server.token("slow", None)}}))
        .await;
    assert!(reply.get("connect").is_some(), "{reply}");
    let reply = slow.call(json!({"subscribe": {"channel": channel}})).await;
    assert!(reply.get("subscribe").is_some(), "{reply}");

    let mut good = RawClient::connect(&server, "good").await;
    let reply = good.call(json!({"subscribe": {"channel": channel}})).await;
    assert!(reply.get("subscribe").is_some(), "{reply}");
    let reader = {
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(N);
            while seqs.len() < N {
                let publication = good.publication(&channel).await;
                seqs.push(publication["data"]["seq"].as_u64().expect("seq"));
            }
            seqs
        })
    };

    // From here on the slow client reads nothing.
    let pad = "x".repeat(SIZE);
    for seq in 0..N {
        let (status, reply) = api(
            &server,
            "publish",
            json!({"channel": channel, "data": {"seq": seq, "pad": pad}}),
        )
        .await;
        assert_eq!(status, 200, "{reply}");
        assert!(reply.get("error").is_none(), "publish {seq}: {reply}");
    }

    let seqs = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the good subscriber fell behind")
        .expect("reader task");
    assert_eq!(
        seqs,
        (0..N as u64).collect::<Vec<_>>(),
        "the good subscriber got every publication, in order"
    );

    // The slow one now drains what the kernel buffered and must find a Close 3008 at the end.
    assert_eq!(slow.close_code().await, 3008);
    server.shutdown().await;
}

// Beyond the table: the connection timers. Each runs next to a client that behaves, which must
// be kept while the other is closed.

/// Waits for `victim` to be closed while `keeper` idles (answering pings); returns the code.
async fn closed_while_other_stays(victim: &mut RawClient, keeper: &mut RawClient) -> u16 {
    tokio::select! {
        code = victim.close_code() => code,
        () = keeper.idle_for(Duration::from_secs(30)) => unreachable!("close_code gives up first"),
    }
}

#[tokio::test]
async fn missing_pong_closes_with_3012() {
    let server =
        TestServer::start_with("[client]\nping_interval = \"1s\"\npong_timeout = \"1s\"\n").await;
    let mut mute = RawClient::connect(&server, "mute").await;
    mute.answer_pings = false;
    let mut polite = RawClient::connect(&server, "polite").await;

    let code = closed_while_other_stays(&mut mute, &mut polite).await;
    assert!(mute.pings >= 1, "the server never pinged");
    assert_eq!(code, 3012);
    assert!(polite.pings >= 1, "the polite client was pinged too");
    let reply = polite
        .call(json!({"presence_stats": {"channel": unique("alive")}}))
        .await;
    assert!(reply.get("presence_stats").is_some(), "{reply}");
    polite.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn no_connect_in_time_closes_with_3502() {
    let server = TestServer::start_with("[client]\nstale_timeout = \"1s\"\n").await;
    let mut idle = RawClient::open(&server).await;
    let mut prompt = RawClient::connect(&server, "prompt").await;
    let opened = std::time::Instant::now();
    let code = closed_while_other_stays(&mut idle, &mut prompt).await;
    assert_eq!(code, 3502);
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );
    let reply = prompt
        .call(json!({"presence_stats": {"channel": unique("alive")}}))
        .await;
    assert!(reply.get("presence_stats").is_some(), "{reply}");
    prompt.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn expired_connection_closes_with_3005_unless_refreshed() {
    let server = TestServer::start_with("[client]\nexpired_close_delay = \"1s\"\n").await;
    let mut lapsed = RawClient::open(&server).await;
    let reply = lapsed
        .call(json!({"connect": {"token": server.token("lapsed", Some(1))}}))
        .await;
    assert_eq!(reply["connect"]["expires"], json!(true), "{reply}");
    let mut renewed = RawClient::open(&server).await;
    let reply = renewed
        .call(json!({"connect": {"token": server.token("renewed", Some(1))}}))
        .await;
    assert_eq!(reply["connect"]["expires"], json!(true), "{reply}");
    let ttl = reply["connect"]["ttl"].as_u64().expect("ttl");
    assert!(ttl <= 1, "ttl {ttl} for a token that expires in 1 s");
    let reply = renewed
        .call(json!({"refresh": {"token": server.token("renewed", Some(3600))}}))
        .await;
    assert_eq!(reply["refresh"]["expires"], json!(true), "{reply}");
    let ttl = reply["refresh"]["ttl"].as_u64().expect("ttl");
    assert!(
        (3500..=3600).contains(&ttl),
        "ttl {ttl} after refreshing with a 1 h token"
    );

    let code = closed_while_other_stays(&mut lapsed, &mut renewed).await;
    assert_eq!(code, 3005);
    let reply = renewed
        .call(json!({"presence_stats": {"channel": unique("alive")}}))
        .await;
    assert!(reply.get("presence_stats").is_some(), "{reply}");
    renewed.close().await;
    server.shutdown().await;
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
