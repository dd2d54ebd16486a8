//! Chat over the real protocol and REST, on SQLite and PostgreSQL: membership enforced by the
//! server, durable gap-free offsets, dedupe on retry, recovery from the store across restarts,
//! typing and receipts, and the bad-input rows of the chat issue.

mod common;

use common::{connect, databases, http, next_of};
use serde_json::{json, Value};
use switchboard::testing::TestServer;
use switchboard_store::{NewUser, UserRole};

/// A user in the store; returns (id, token).
async fn user(server: &TestServer, name: &str) -> (i64, String) {
    let u = server
        .node()
        .store
        .create_user(NewUser {
            username: format!("{name}_{}", common::unique("u")),
            password_hash: String::new(),
            display_name: name.into(),
            role: UserRole::User,
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
        "PUT" => http().put(url).json(&body),
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

#[tokio::test]
async fn membership_offsets_dedupe_and_bad_input() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), "[chat]\nmax_message_chars = 30\n").await;
        let (alice, at) = user(&server, "alice").await;
        let (bob, bt) = user(&server, "bob").await;
        let (_eve, et) = user(&server, "eve").await;
        let (s, room) = rest(
            &server,
            &at,
            "POST",
            "/v1/rooms",
            json!({"kind": "private", "name": "r", "members": [bob]}),
        )
        .await;
        assert_eq!(s, 201, "{room}");
        let channel = room["channel"].as_str().unwrap().to_string();

        // A stranger can neither subscribe nor publish.
        let mut eve = connect(&server, &et).await;
        let r = eve.call(json!({"subscribe": {"channel": channel}})).await;
        assert_eq!(r["error"]["code"], 103, "{r}");
        let r = eve.call(json!({"publish": {"channel": channel, "data": {"text": "hi", "client_msg_id": "e1"}}})).await;
        assert_eq!(r["error"]["code"], 103, "{r}");

        let mut a = connect(&server, &at).await;
        let r = a.call(json!({"subscribe": {"channel": channel}})).await;
        assert_eq!(r["subscribe"]["recoverable"], true, "{r}");
        assert_eq!(r["subscribe"]["epoch"], room["epoch"], "{r}");
        let mut b = connect(&server, &bt).await;
        b.call(json!({"subscribe": {"channel": channel}})).await;

        // SQL- and HTML-looking text is stored and returned exactly.
        let tricky = "'; DROP TABLE x;--<b>";
        let r = a.call(json!({"publish": {"channel": channel, "data": {"text": tricky, "client_msg_id": "a1"}}})).await;
        assert!(r.get("publish").is_some(), "{r}");
        let p = b.publication(&channel).await;
        assert_eq!(p["offset"], 1);
        assert_eq!(p["data"]["type"], "message");
        assert_eq!(p["data"]["message"]["text"], tricky);
        assert_eq!(p["data"]["message"]["user_id"], alice);

        // A retry with the same client_msg_id is acknowledged and creates nothing.
        let r = a.call(json!({"publish": {"channel": channel, "data": {"text": tricky, "client_msg_id": "a1"}}})).await;
        assert!(r.get("publish").is_some(), "{r}");
        let r = b.call(json!({"publish": {"channel": channel, "data": {"text": "second", "client_msg_id": "b1"}}})).await;
        assert!(r.get("publish").is_some(), "{r}");
        assert_eq!(
            b.publication(&channel).await["offset"],
            2,
            "the retry took no offset"
        );

        // Bad input: oversized (107, not stored), invalid data (107), muted (103).
        let r = a.call(json!({"publish": {"channel": channel, "data": {"text": "x".repeat(31), "client_msg_id": "a2"}}})).await;
        assert_eq!(r["error"]["code"], 107, "{r}");
        let r = a
            .call(json!({"publish": {"channel": channel, "data": {"txt": "no text field"}}}))
            .await;
        assert_eq!(r["error"]["code"], 107, "{r}");
        let r = a
            .call(json!({"publish": {"channel": channel, "data": "just a string"}}))
            .await;
        assert_eq!(r["error"]["code"], 107, "{r}");
        let room_id = room["id"].as_i64().unwrap();
        let until = Some(i64::MAX / 2);
        server
            .node()
            .store
            .set_member_muted(room_id, bob, until)
            .await
            .unwrap();
        let r = b.call(json!({"publish": {"channel": channel, "data": {"text": "muted?", "client_msg_id": "b2"}}})).await;
        assert_eq!(r["error"]["code"], 103, "{r}");

        let (s, page) = rest(
            &server,
            &at,
            "GET",
            &format!("/v1/rooms/{room_id}/messages"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200, "{page}");
        let texts: Vec<&str> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, vec![tricky, "second"], "nothing else was stored");
        let (s, _) = rest(
            &server,
            &et,
            "GET",
            &format!("/v1/rooms/{room_id}/messages"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 403);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn offline_member_recovers_everything_across_a_restart() {
    for db in databases().await {
        // One sender publishes 500 messages as fast as it can: lift the per-connection rate.
        const FAST: &str = "[client]\ncommand_rate = 100000\ncommand_burst = 100000\n";
        let server = TestServer::start_on(db.url(), FAST).await;
        let (_alice, at) = user(&server, "alice").await;
        let (bob, bt) = user(&server, "bob").await;
        let (_, room) = rest(
            &server,
            &at,
            "POST",
            "/v1/rooms",
            json!({"kind": "public", "name": "lobby"}),
        )
        .await;
        let room_id = room["id"].as_i64().unwrap();
        let channel = format!("chat:{room_id}");
        let (s, _) = rest(
            &server,
            &bt,
            "POST",
            &format!("/v1/rooms/{room_id}/join"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200);

        let mut b = connect(&server, &bt).await;
        let r = b.call(json!({"subscribe": {"channel": channel}})).await;
        let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
        let mut a = connect(&server, &at).await;
        a.call(json!({"publish": {"channel": channel, "data": {"text": "before", "client_msg_id": "x0"}}})).await;
        assert_eq!(b.publication(&channel).await["offset"], 1);
        b.close().await; // bob goes offline at offset 1

        for i in 0..500 {
            let id = format!("m{i}");
            let r = a.call(json!({"publish": {"channel": channel, "data": {"text": format!("n{i}"), "client_msg_id": id}}})).await;
            assert!(r.get("publish").is_some(), "{r}");
        }
        a.close().await;
        // The server restarts in between: the room's stream and epoch live in the database.
        server.shutdown().await;
        let server = TestServer::start_on(db.url(), FAST).await;
        let bt = server.token(&bob.to_string(), None);

        let mut b = connect(&server, &bt).await;
        let r = b
            .call(json!({"subscribe": {"channel": channel, "recover": true, "offset": 1, "epoch": epoch}}))
            .await;
        let sub = &r["subscribe"];
        assert_eq!(sub["recovered"], true, "{}", sub["epoch"]);
        assert_eq!(sub["epoch"], epoch);
        let pubs = sub["publications"].as_array().unwrap();
        assert_eq!(pubs.len(), 500);
        for (i, p) in pubs.iter().enumerate() {
            assert_eq!(p["offset"], i as u64 + 2);
            assert_eq!(p["data"]["message"]["text"], format!("n{i}"));
        }
        server.shutdown().await;
    }
}

#[tokio::test]
async fn typing_receipts_edits_and_deletes_reach_members() {
    let server = TestServer::start().await;
    let (_alice, at) = user(&server, "alice").await;
    let (bob, bt) = user(&server, "bob").await;
    let (_, room) = rest(
        &server,
        &at,
        "POST",
        "/v1/rooms",
        json!({"kind": "direct", "members": [bob]}),
    )
    .await;
    let channel = room["channel"].as_str().unwrap().to_string();
    let room_id = room["id"].as_i64().unwrap();
    // The same direct room comes back for the pair.
    let (_, again) = rest(
        &server,
        &bt,
        "POST",
        "/v1/rooms",
        json!({"kind": "direct", "members": [_alice]}),
    )
    .await;
    assert_eq!(again["id"], room_id);

    let mut a = connect(&server, &at).await;
    let mut b = connect(&server, &bt).await;
    a.call(json!({"subscribe": {"channel": channel}})).await;
    b.call(json!({"subscribe": {"channel": channel}})).await;

    let r = b
        .call(json!({"rpc": {"method": "chat.typing", "data": {"room": room_id}}}))
        .await;
    assert_eq!(r["rpc"]["data"]["sent"], true, "{r}");
    let r = b
        .call(json!({"rpc": {"method": "chat.typing", "data": {"room": room_id}}}))
        .await;
    assert_eq!(r["rpc"]["data"]["sent"], false, "throttled: {r}");
    let p = next_of(&mut a, &channel, "typing").await;
    assert_eq!(p["data"]["user_id"], bob);
    assert!(p.get("offset").is_none(), "typing is ephemeral: {p}");

    let r = a.call(json!({"rpc": {"method": "chat.send", "data": {"room": room_id, "text": "hello", "client_msg_id": "s1"}}})).await;
    let msg = &r["rpc"]["data"]["message"];
    assert_eq!(msg["offset"], 1, "{r}");
    let message_id = msg["id"].as_i64().unwrap();
    next_of(&mut b, &channel, "message").await;

    let r = b
        .call(json!({"rpc": {"method": "chat.read", "data": {"room": room_id, "offset": 1}}}))
        .await;
    assert_eq!(r["rpc"]["data"]["offset"], 1, "{r}");
    let p = next_of(&mut a, &channel, "read").await;
    assert_eq!(p["data"]["offset"], 1);

    // Only the author edits; the edit and the delete are stream events with offsets.
    let r = b.call(json!({"rpc": {"method": "chat.edit", "data": {"message_id": message_id, "text": "hack"}}})).await;
    assert_eq!(r["error"]["code"], 103, "{r}");
    let r = a.call(json!({"rpc": {"method": "chat.edit", "data": {"message_id": message_id, "text": "hello!"}}})).await;
    assert_eq!(r["rpc"]["data"]["message"]["text"], "hello!", "{r}");
    let p = next_of(&mut b, &channel, "edit").await;
    assert_eq!(p["offset"], 2);
    a.call(json!({"rpc": {"method": "chat.delete", "data": {"message_id": message_id}}}))
        .await;
    let p = next_of(&mut b, &channel, "delete").await;
    assert_eq!(p["offset"], 3);
    assert_eq!(
        p["data"]["message"]["text"],
        Value::Null,
        "deleted text is withheld"
    );

    // Unread counts: bob read up to 1, the room is at 3.
    let (_, mine) = rest(&server, &bt, "GET", "/v1/rooms", Value::Null).await;
    assert_eq!(mine["rooms"][0]["unread"], 2, "{mine}");
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_a_room_is_owner_only_audited_and_ends_subscriptions() {
    let server = TestServer::start().await;
    let (alice, at) = user(&server, "alice").await;
    let (bob, bt) = user(&server, "bob").await;
    let (_, room) = rest(
        &server,
        &at,
        "POST",
        "/v1/rooms",
        json!({"kind": "private", "name": "doomed", "members": [bob]}),
    )
    .await;
    let room_id = room["id"].as_i64().unwrap();
    let channel = room["channel"].as_str().unwrap().to_string();
    let mut b = connect(&server, &bt).await;
    b.call(json!({"subscribe": {"channel": channel}})).await;

    let del = |token: String| {
        let url = format!("{}/v1/rooms/{room_id}", server.http_url());
        async move {
            http()
                .delete(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(del(bt.clone()).await, 403, "a member who is not the owner");
    assert_eq!(del(at.clone()).await, 204);
    assert_eq!(del(at.clone()).await, 404);

    // Bob's subscription ends with an unsubscribe push.
    loop {
        match b.next_event().await {
            common::Event::Msg(m) if m["push"]["unsubscribe"].is_object() => {
                assert_eq!(m["push"]["channel"], channel.as_str());
                break;
            }
            common::Event::Msg(_) => {}
            other => panic!("expected an unsubscribe push, got {other:?}"),
        }
    }
    let (s, _) = rest(
        &server,
        &bt,
        "GET",
        &format!("/v1/rooms/{room_id}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, 404);
    let log = server.node().store.audit_log(None, 50).await.unwrap();
    let entry = log
        .iter()
        .find(|e| e.action == "room_deleted")
        .expect("audited");
    assert_eq!(
        (entry.actor_user_id, entry.target.as_str()),
        (Some(alice), format!("room:{room_id}").as_str())
    );
    server.shutdown().await;
}

/// Membership, roles, mutes and bans are checked in the send's own transaction, so every
/// change applies to the very next send, whichever path made it: REST (invite, kick, leave,
/// join, role change, mute, ban) or a direct store write (another node, the CLI).
#[tokio::test]
async fn membership_changes_apply_to_the_next_send() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), "").await;
        let (_alice, at) = user(&server, "alice").await;
        let (bob, bt) = user(&server, "bob").await;
        let (carol, ct) = user(&server, "carol").await;
        let admin = {
            let u = server
                .node()
                .store
                .create_user(NewUser {
                    username: common::unique("root"),
                    password_hash: String::new(),
                    display_name: "root".into(),
                    role: UserRole::Admin,
                })
                .await
                .unwrap();
            server.token(&u.id.to_string(), None)
        };
        let (s, room) = rest(
            &server,
            &at,
            "POST",
            "/v1/rooms",
            json!({"kind": "public", "name": "r", "members": [bob]}),
        )
        .await;
        assert_eq!(s, 201, "{room}");
        let room_id = room["id"].as_i64().unwrap();
        let channel = room["channel"].as_str().unwrap().to_string();
        let mut b = connect(&server, &bt).await;
        let mut c = connect(&server, &ct).await;
        let mut n = 0;
        let mut next = || {
            n += 1;
            json!({"publish": {"channel": channel, "data": {"text": "hi", "client_msg_id": format!("m{n}")}}})
        };
        let ok = |r: &Value| assert!(r.get("publish").is_some(), "{r}");
        let refused = |r: &Value, code: u64| assert_eq!(r["error"]["code"], code, "{r}");

        // Not a member yet: refused; invited: the next send goes through.
        refused(&c.call(next()).await, 103);
        let (s, _) = rest(
            &server,
            &at,
            "POST",
            &format!("/v1/rooms/{room_id}/invite"),
            json!({"user_id": carol}),
        )
        .await;
        assert_eq!(s, 200);
        ok(&c.call(next()).await);

        // Kicked: refused at once, on every send path.
        ok(&b.call(next()).await);
        let (s, _) = rest(
            &server,
            &at,
            "POST",
            &format!("/v1/rooms/{room_id}/kick"),
            json!({"user_id": bob}),
        )
        .await;
        assert_eq!(s, 204);
        refused(&b.call(next()).await, 103);
        let r = b
            .call(
                json!({"rpc": {"method": "chat.send", "data": {"room": room_id, "text": "rpc?"}}}),
            )
            .await;
        refused(&r, 103);
        let (s, _) = rest(
            &server,
            &bt,
            "POST",
            &format!("/v1/rooms/{room_id}/messages"),
            json!({"text": "rest?"}),
        )
        .await;
        assert_eq!(s, 403);
        // Joins again (a public room): sends at once. A role change keeps him sending.
        let (s, _) = rest(
            &server,
            &bt,
            "POST",
            &format!("/v1/rooms/{room_id}/join"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200);
        ok(&b.call(next()).await);
        let (s, _) = rest(
            &server,
            &at,
            "PUT",
            &format!("/v1/rooms/{room_id}/members/{bob}"),
            json!({"role": "moderator"}),
        )
        .await;
        assert_eq!(s, 200);
        ok(&b.call(next()).await);

        // Leaves: refused at once.
        let (s, _) = rest(
            &server,
            &ct,
            "POST",
            &format!("/v1/rooms/{room_id}/leave"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 204);
        refused(&c.call(next()).await, 103);

        // Muted over REST, then unmuted: refused, then accepted, each at once.
        let until = switchboard_store::now_ms() + 60_000;
        let mute_path = format!("/v1/rooms/{room_id}/mute");
        let mute = |until: Value| {
            let body = json!({"user_id": bob, "until": until});
            rest(&server, &at, "POST", &mute_path, body)
        };
        assert_eq!(mute(json!(until)).await.0, 200);
        refused(&b.call(next()).await, 103);
        assert_eq!(mute(Value::Null).await.0, 200);
        ok(&b.call(next()).await);

        // Banned over REST, then lifted.
        let (s, _) = rest(
            &server,
            &admin,
            "POST",
            &format!("/v1/moderation/users/{bob}/ban"),
            json!({"reason": "spam"}),
        )
        .await;
        assert_eq!(s, 200);
        refused(&b.call(next()).await, 103);
        let (s, _) = rest(
            &server,
            &admin,
            "POST",
            &format!("/v1/moderation/users/{bob}/unban"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 204);
        ok(&b.call(next()).await);

        // A write that bypasses this node's REST and chat service (another node, the CLI)
        // applies just as fast: nothing is cached.
        let store = &server.node().store;
        store.remove_member(room_id, bob).await.unwrap();
        refused(&b.call(next()).await, 103);
        store
            .add_member(room_id, bob, switchboard_store::MemberRole::Member)
            .await
            .unwrap();
        ok(&b.call(next()).await);

        // Only the accepted sends took offsets: 1..=7, no gaps.
        let events = store.events(room_id, 0, 100).await.unwrap();
        let offsets: Vec<i64> = events.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, (1..=7).collect::<Vec<_>>());

        // The room is deleted: unknown channel.
        let url = format!("{}/v1/rooms/{room_id}", server.http_url());
        let s = http().delete(url).bearer_auth(&at).send().await.unwrap();
        assert_eq!(s.status().as_u16(), 204);
        refused(&b.call(next()).await, 102);
        server.shutdown().await;
    }
}
