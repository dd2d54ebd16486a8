//! Moderation over the real protocol and REST, on SQLite and PostgreSQL: a profane message is
//! removed within 500 ms and members receive the `removed` event; history withholds its text;
//! a spam burst is flagged and listed; restore, dismiss, mute and ban (error 103 in every
//! room); 403 for everyone but admins and the room's owner and moderators; audit entries.

mod common;

use std::time::{Duration, Instant};

use common::{connect, databases, http, next_of, RawClient};
use serde_json::{json, Value};
use switchboard::testing::TestServer;
use switchboard_store::{MemberRole, NewUser, UserRole};

/// A user in the store; returns (id, token).
async fn user(server: &TestServer, name: &str, role: UserRole) -> (i64, String) {
    let u = server
        .node()
        .store
        .create_user(NewUser {
            username: format!("{name}_{}", common::unique("u")),
            password_hash: String::new(),
            display_name: name.into(),
            role,
        })
        .await
        .unwrap();
    (u.id, server.token(&u.id.to_string(), None))
}

async fn rest(
    server: &TestServer,
    token: &str,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let url = format!("{}{path}", server.http_url());
    let req = match method {
        "GET" => http().get(url),
        _ => http().post(url).json(&body),
    };
    let resp = req.bearer_auth(token).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn publish(c: &mut RawClient, channel: &str, text: &str, id: &str) -> Value {
    c.call(json!({"publish": {"channel": channel, "data": {"text": text, "client_msg_id": id}}}))
        .await
}

/// Polls the flags of `room` (as `token`) until one has this reason.
async fn wait_for_flag(server: &TestServer, token: &str, room: i64, reason: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, body) = rest(
            server,
            token,
            "GET",
            &format!("/v1/moderation/flags?room={room}"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200, "{body}");
        if let Some(f) = body["flags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["reason"] == reason)
        {
            return f.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} flag in room {room}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn messages(page: &Value) -> Vec<Value> {
    page["messages"].as_array().unwrap().clone()
}

#[tokio::test]
async fn profanity_is_removed_spam_flagged_and_moderators_act() {
    for db in databases().await {
        let config = "[moderation]\nburst_max = 5\nburst_window = \"30s\"\n";
        let server = TestServer::start_on(db.url(), config).await;
        let (alice, at) = user(&server, "alice", UserRole::User).await;
        let (bob, bt) = user(&server, "bob", UserRole::User).await;
        let (carol, ct) = user(&server, "carol", UserRole::User).await;
        let (_eve, et) = user(&server, "eve", UserRole::User).await;
        let (_root, admin) = user(&server, "root", UserRole::Admin).await;
        let (s, room) = rest(
            &server,
            &at,
            "POST",
            "/v1/rooms",
            json!({"kind": "private", "name": "r", "members": [bob, carol]}),
        )
        .await;
        assert_eq!(s, 201, "{room}");
        let room_id = room["id"].as_i64().unwrap();
        let channel = room["channel"].as_str().unwrap().to_string();
        server
            .node()
            .store
            .set_member_role(room_id, carol, MemberRole::Moderator)
            .await
            .unwrap();

        let mut a = connect(&server, &at).await;
        let mut b = connect(&server, &bt).await;
        a.call(json!({"subscribe": {"channel": channel}})).await;
        let r = b.call(json!({"subscribe": {"channel": channel}})).await;
        let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();

        // A profane message is delivered, then removed: the other member gets the `removed`
        // event within 500 ms of the publish being acknowledged.
        let r = publish(&mut a, &channel, "what the fuck is this", "p1").await;
        assert!(r.get("publish").is_some(), "{r}");
        let acked = Instant::now();
        let p = next_of(&mut b, &channel, "message").await;
        assert_eq!(p["offset"], 1);
        let bad_id = p["data"]["message"]["id"].as_i64().unwrap();
        let p = next_of(&mut b, &channel, "removed").await;
        let took = acked.elapsed();
        eprintln!(
            "{}: the removal reached the member {took:?} after the ack",
            db.url()
        );
        assert!(
            took < Duration::from_millis(500),
            "removal reached the member after {took:?}"
        );
        assert_eq!(p["offset"], 2, "{p}");
        assert_eq!(p["data"]["message_id"], bad_id);
        assert_eq!(p["data"]["user_id"], 0, "the pipeline acted");
        assert_eq!(p["data"]["message"]["removed"], true);
        assert_eq!(p["data"]["message"]["text"], Value::Null, "text withheld");
        next_of(&mut a, &channel, "removed").await;

        // History shows it removed, over REST and in recovery.
        let (s, page) = rest(
            &server,
            &bt,
            "GET",
            &format!("/v1/rooms/{room_id}/messages"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200, "{page}");
        let list = messages(&page);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["removed"], true);
        assert_eq!(list[0]["text"], Value::Null);
        let mut late = connect(&server, &bt).await;
        let r = late
            .call(json!({"subscribe": {"channel": channel, "recover": true, "offset": 0, "epoch": epoch}}))
            .await;
        let pubs = r["subscribe"]["publications"].as_array().unwrap().clone();
        assert_eq!(pubs.len(), 2, "{r}");
        assert_eq!(pubs[0]["data"]["type"], "message");
        assert_eq!(pubs[0]["data"]["message"]["removed"], true);
        assert_eq!(pubs[0]["data"]["message"]["text"], Value::Null);
        assert_eq!(pubs[1]["data"]["type"], "removed");
        late.close().await;

        // A spam burst (more than 5 messages in 30 s) is flagged once, and listed for the
        // room's moderator with the message's text. The messages stay up.
        for i in 0..6 {
            let r = publish(&mut b, &channel, &format!("buy {i}"), &format!("s{i}")).await;
            assert!(r.get("publish").is_some(), "{r}");
        }
        let flag = wait_for_flag(&server, &ct, room_id, "burst").await;
        assert_eq!(flag["user_id"], bob);
        assert_eq!(flag["room_id"], room_id);
        assert_eq!(flag["message"]["text"], "buy 5");
        assert_eq!(flag["detail"]["count"], 6);
        assert_eq!(flag["resolution"], Value::Null);
        let (s, all) = rest(&server, &admin, "GET", "/v1/moderation/flags", Value::Null).await;
        assert_eq!(s, 200, "admins list every room's flags: {all}");
        assert!(all["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["id"] == flag["id"]));

        // Non-moderators get 403 on every endpoint; unknown things 404.
        let flags_path = format!("/v1/moderation/flags?room={room_id}");
        let spam_id = flag["message_id"].as_i64().unwrap();
        let flag_id = flag["id"].as_i64().unwrap();
        for (token, method, path, body) in [
            (&bt, "GET", flags_path.clone(), Value::Null),
            (&et, "GET", flags_path.clone(), Value::Null),
            (&bt, "GET", "/v1/moderation/flags".to_string(), Value::Null),
            (&ct, "GET", "/v1/moderation/flags".to_string(), Value::Null),
            (
                &bt,
                "POST",
                format!("/v1/moderation/flags/{flag_id}/dismiss"),
                Value::Null,
            ),
            (
                &bt,
                "POST",
                format!("/v1/moderation/messages/{spam_id}/remove"),
                Value::Null,
            ),
            (
                &et,
                "POST",
                format!("/v1/moderation/messages/{bad_id}/restore"),
                Value::Null,
            ),
            (
                &bt,
                "POST",
                format!("/v1/rooms/{room_id}/mute"),
                json!({"user_id": alice}),
            ),
            (
                &ct,
                "POST",
                format!("/v1/moderation/users/{bob}/ban"),
                Value::Null,
            ),
            (
                &ct,
                "POST",
                format!("/v1/moderation/users/{bob}/unban"),
                Value::Null,
            ),
        ] {
            let (s, body) = rest(&server, token, method, &path, body).await;
            assert_eq!(s, 403, "{method} {path}: {body}");
            assert_eq!(body["error"]["code"], "forbidden", "{body}");
        }
        let (s, _) = rest(
            &server,
            &ct,
            "POST",
            "/v1/moderation/messages/999999/remove",
            Value::Null,
        )
        .await;
        assert_eq!(s, 404);
        let (s, _) = rest(
            &server,
            &ct,
            "GET",
            "/v1/moderation/flags?room=999999",
            Value::Null,
        )
        .await;
        assert_eq!(s, 404);
        let (s, _) = rest(&server, "nope", "GET", &flags_path, Value::Null).await;
        assert_eq!(s, 401);

        // The moderator removes a flagged message (settling its flag): members see it go.
        let (s, body) = rest(
            &server,
            &ct,
            "POST",
            &format!("/v1/moderation/messages/{spam_id}/remove"),
            json!({"reason": "spam"}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["message"]["removed"], true);
        assert_eq!(body["message"]["text"], Value::Null);
        let p = next_of(&mut a, &channel, "removed").await;
        assert_eq!(p["data"]["message_id"], spam_id);
        assert_eq!(p["data"]["user_id"], carol);
        let (s, body) = rest(
            &server,
            &ct,
            "POST",
            &format!("/v1/moderation/messages/{spam_id}/remove"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 409, "removed twice: {body}");
        let (_, open) = rest(&server, &ct, "GET", &flags_path, Value::Null).await;
        assert!(open["flags"].as_array().unwrap().is_empty(), "{open}");
        let (_, settled) = rest(
            &server,
            &ct,
            "GET",
            &format!("{flags_path}&include_resolved=true"),
            Value::Null,
        )
        .await;
        assert_eq!(settled["flags"][0]["resolution"], "removed", "{settled}");
        assert_eq!(settled["flags"][0]["resolved_by"], carol);

        // Restore brings the profane message back (an admin may, in any room).
        let (s, body) = rest(
            &server,
            &admin,
            "POST",
            &format!("/v1/moderation/messages/{bad_id}/restore"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["message"]["text"], "what the fuck is this");
        let p = next_of(&mut b, &channel, "restored").await;
        assert_eq!(p["data"]["message"]["removed"], false);
        assert_eq!(p["data"]["message"]["text"], "what the fuck is this");
        let (_, page) = rest(
            &server,
            &bt,
            "GET",
            &format!("/v1/rooms/{room_id}/messages"),
            Value::Null,
        )
        .await;
        let first = &messages(&page)[0];
        assert_eq!(
            (first["id"].as_i64(), &first["removed"]),
            (Some(bad_id), &json!(false))
        );
        assert_eq!(first["text"], "what the fuck is this");
        let (s, _) = rest(
            &server,
            &admin,
            "POST",
            &format!("/v1/moderation/messages/{bad_id}/restore"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 409, "restoring a visible message");

        // Dismissing a flag leaves the message alone.
        for i in 0..6 {
            publish(&mut b, &channel, &format!("spam {i}"), &format!("t{i}")).await;
        }
        // The burst window (30 s) flagged bob already; a link flood is a new flag.
        let links: Vec<String> = (1..=6)
            .map(|i| format!("https://example.com/{i}"))
            .collect();
        let links = format!("links: {}", links.join(" "));
        publish(&mut b, &channel, &links, "l1").await;
        let flag = wait_for_flag(&server, &ct, room_id, "links").await;
        let (s, body) = rest(
            &server,
            &ct,
            "POST",
            &format!("/v1/moderation/flags/{}/dismiss", flag["id"]),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["flag"]["resolution"], "dismissed");
        let (s, _) = rest(
            &server,
            &ct,
            "POST",
            &format!("/v1/moderation/flags/{}/dismiss", flag["id"]),
            Value::Null,
        )
        .await;
        assert_eq!(s, 409, "dismissed twice");

        // Mute: 103 for the muted member until unmuted; the owner cannot be muted by a
        // moderator.
        let until = switchboard_store::now_ms() + 60_000;
        let (s, body) = rest(
            &server,
            &ct,
            "POST",
            &format!("/v1/rooms/{room_id}/mute"),
            json!({"user_id": bob, "until": until}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["member"]["muted_until"], until);
        let r = publish(&mut b, &channel, "can I talk?", "m1").await;
        assert_eq!(r["error"]["code"], 103, "muted: {r}");
        let (s, _) = rest(
            &server,
            &ct,
            "POST",
            &format!("/v1/rooms/{room_id}/mute"),
            json!({"user_id": alice, "until": until}),
        )
        .await;
        assert_eq!(s, 403, "a moderator cannot mute the owner");
        let (s, _) = rest(
            &server,
            &ct,
            "POST",
            &format!("/v1/rooms/{room_id}/mute"),
            json!({"user_id": bob, "until": 1}),
        )
        .await;
        assert_eq!(s, 400, "until in the past");
        let (s, body) = rest(
            &server,
            &ct,
            "POST",
            &format!("/v1/rooms/{room_id}/mute"),
            json!({"user_id": bob, "until": null}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let r = publish(&mut b, &channel, "thanks", "m2").await;
        assert!(r.get("publish").is_some(), "unmuted: {r}");

        // Ban: 103 in every room, and 403 over REST, until lifted.
        let (_, lobby) = rest(
            &server,
            &at,
            "POST",
            "/v1/rooms",
            json!({"kind": "public", "name": "lobby"}),
        )
        .await;
        let lobby_id = lobby["id"].as_i64().unwrap();
        let lobby_channel = format!("chat:{lobby_id}");
        let (s, _) = rest(
            &server,
            &bt,
            "POST",
            &format!("/v1/rooms/{lobby_id}/join"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200);
        let (s, body) = rest(
            &server,
            &admin,
            "POST",
            &format!("/v1/moderation/users/{bob}/ban"),
            json!({"reason": "spam"}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["ban"]["until"], Value::Null);
        for (ch, id) in [(&channel, "x1"), (&lobby_channel, "x2")] {
            let r = publish(&mut b, ch, "hello?", id).await;
            assert_eq!(r["error"]["code"], 103, "banned in {ch}: {r}");
        }
        let r = b
            .call(
                json!({"rpc": {"method": "chat.send", "data": {"room": lobby_id, "text": "rpc?"}}}),
            )
            .await;
        assert_eq!(r["error"]["code"], 103, "{r}");
        let (s, _) = rest(
            &server,
            &bt,
            "POST",
            &format!("/v1/rooms/{lobby_id}/messages"),
            json!({"text": "rest?"}),
        )
        .await;
        assert_eq!(s, 403);
        let (s, _) = rest(
            &server,
            &admin,
            "POST",
            "/v1/moderation/users/999999/ban",
            Value::Null,
        )
        .await;
        assert_eq!(s, 404);
        let (s, _) = rest(
            &server,
            &admin,
            "POST",
            &format!("/v1/moderation/users/{bob}/unban"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 204);
        let (s, _) = rest(
            &server,
            &admin,
            "POST",
            &format!("/v1/moderation/users/{bob}/unban"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 404, "not banned any more");
        let r = publish(&mut b, &lobby_channel, "back", "x3").await;
        assert!(r.get("publish").is_some(), "unbanned: {r}");

        // Every action is in the audit log; the pipeline's removal has no actor.
        let (s, log) = rest(
            &server,
            &admin,
            "GET",
            "/v1/admin/audit?limit=100",
            Value::Null,
        )
        .await;
        assert_eq!(s, 200, "{log}");
        let entries = log["entries"].as_array().unwrap();
        let find = |action: &str| -> Vec<Value> {
            entries
                .iter()
                .filter(|e| e["action"] == action)
                .cloned()
                .collect()
        };
        let removed = find("message_removed");
        assert_eq!(removed.len(), 2, "{removed:?}");
        let auto = removed
            .iter()
            .find(|e| e["detail"]["auto"] == true)
            .unwrap();
        assert_eq!(auto["actor_user_id"], Value::Null);
        assert_eq!(auto["target"], format!("message:{bad_id}"));
        assert_eq!(auto["detail"]["checks"], json!(["profanity"]));
        let by_carol = removed
            .iter()
            .find(|e| e["detail"]["auto"] == false)
            .unwrap();
        assert_eq!(by_carol["actor_user_id"], carol);
        assert_eq!(by_carol["detail"]["reason"], "spam");
        for action in [
            "message_restored",
            "flag_dismissed",
            "user_muted",
            "user_unmuted",
            "user_banned",
            "user_unbanned",
        ] {
            assert_eq!(find(action).len(), 1, "{action}: {entries:?}");
        }
        assert_eq!(find("user_banned")[0]["target"], format!("user:{bob}"));

        // The latency metric saw the removal.
        let metrics = server.node().metrics.render();
        assert!(
            metrics.contains("switchboard_moderation_seconds_count{outcome=\"remove\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("switchboard_moderation_dropped_total 0"));
        server.shutdown().await;
    }
}

/// Config keys reach the pipeline: a custom word is removed, and with `enabled = false`
/// nothing is checked.
#[tokio::test]
async fn word_list_and_switch() {
    let config = "[moderation]\nwords = [\"Kumquat\"]\nlinks = \"remove\"\nlinks_max = 1\n";
    let server = TestServer::start_with(config).await;
    let (_alice, at) = user(&server, "alice", UserRole::User).await;
    let (_, room) = rest(
        &server,
        &at,
        "POST",
        "/v1/rooms",
        json!({"kind": "public", "name": "w"}),
    )
    .await;
    let channel = room["channel"].as_str().unwrap().to_string();
    let mut a = connect(&server, &at).await;
    a.call(json!({"subscribe": {"channel": channel}})).await;
    publish(&mut a, &channel, "I like KUMQUATS", "w0").await;
    publish(&mut a, &channel, "a kumquat!", "w1").await;
    publish(&mut a, &channel, "http://a.x http://b.x", "w2").await;
    let mut removed = Vec::new();
    while removed.len() < 2 {
        let p = a.publication(&channel).await;
        if p["data"]["type"] == "removed" {
            removed.push(p["data"]["message"]["client_msg_id"].clone());
        }
    }
    assert_eq!(
        removed,
        vec!["w1", "w2"],
        "only the whole word and the link flood"
    );
    server.shutdown().await;

    let server = TestServer::start_with("[moderation]\nenabled = false\n").await;
    let (_alice, at) = user(&server, "alice", UserRole::User).await;
    let (_, room) = rest(
        &server,
        &at,
        "POST",
        "/v1/rooms",
        json!({"kind": "public", "name": "w"}),
    )
    .await;
    let room_id = room["id"].as_i64().unwrap();
    let channel = room["channel"].as_str().unwrap().to_string();
    let mut a = connect(&server, &at).await;
    publish(&mut a, &channel, "what the fuck", "f0").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, page) = rest(
        &server,
        &at,
        "GET",
        &format!("/v1/rooms/{room_id}/messages"),
        Value::Null,
    )
    .await;
    assert_eq!(messages(&page)[0]["removed"], false, "moderation is off");
    server.shutdown().await;
}

/// `rest::moderation::OPS` documents exactly the module's routes, and its schema
/// references resolve, so `rest::openapi` can list them as they are.
#[tokio::test]
async fn openapi_ops_cover_the_routes() {
    use switchboard::rest::{moderation, openapi};
    use tower::ServiceExt;
    let server = TestServer::start().await;
    const UNMATCHED: axum::http::StatusCode = axum::http::StatusCode::IM_A_TEAPOT;
    let router =
        || switchboard::server::router(server.node().clone()).fallback(|| async { UNMATCHED });
    let listing = format!("{:?}", moderation::routes());
    let mut paths: Vec<&str> = listing
        .split('"')
        .filter(|s| s.starts_with("/v1/"))
        .collect();
    paths.sort_unstable();
    paths.dedup();
    let mut documented: Vec<&str> = moderation::OPS.iter().map(|op| op.path).collect();
    documented.sort_unstable();
    documented.dedup();
    assert_eq!(paths, documented, "routes and OPS differ");
    for op in moderation::OPS {
        let concrete: String = op
            .path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "1" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let req = axum::http::Request::builder()
            .method(op.method.to_ascii_uppercase().as_str())
            .uri(&concrete)
            .body(axum::body::Body::empty())
            .unwrap();
        let status = router().oneshot(req).await.unwrap().status();
        assert_eq!(
            status, 401,
            "{} {} is routed and needs a token",
            op.method, op.path
        );
    }
    let mut schemas = openapi::schemas();
    let ours = moderation::schemas();
    for (name, schema) in ours.as_object().unwrap() {
        assert!(schemas.get(name).is_none(), "{name} is already defined");
        schemas[name] = schema.clone();
    }
    let mut refs: Vec<String> = ours
        .to_string()
        .split("\"#/components/schemas/")
        .skip(1)
        .map(|p| p[..p.find('"').unwrap()].to_string())
        .collect();
    for op in moderation::OPS {
        refs.extend(op.body.map(str::to_string));
        if !op.ok.1.is_empty() {
            refs.push(op.ok.1.to_string());
        }
    }
    for name in refs {
        assert!(schemas.get(&name).is_some(), "missing schema {name}");
    }
    server.shutdown().await;
}
