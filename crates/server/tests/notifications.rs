//! Notifications and per-user presence over the real protocol and REST, on SQLite and
//! PostgreSQL: an @mention of a member is stored and pushed on `notifications:#{id}` (and
//! only its user may subscribe there), direct rooms and invites notify, the list pages and
//! filters, marking read works, and presence follows the user's last connection.

mod common;

use std::time::{Duration, Instant};

use common::{connect, databases, http, RawClient};
use serde_json::{json, Value};
use switchboard::testing::TestServer;
use switchboard_store::{NewUser, UserRole};

struct U {
    id: i64,
    name: String,
    token: String,
}

/// A user in the store.
async fn user(server: &TestServer, name: &str) -> U {
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
    U {
        id: u.id,
        token: server.token(&u.id.to_string(), None),
        name: u.username,
    }
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

fn channel(id: i64) -> String {
    format!("notifications:#{id}")
}

/// Connects `u` and subscribes it to its own notifications channel.
async fn listen(server: &TestServer, u: &U) -> RawClient {
    let mut c = connect(server, &u.token).await;
    let r = c
        .call(json!({"subscribe": {"channel": channel(u.id)}}))
        .await;
    assert!(r.get("subscribe").is_some(), "own notifications: {r}");
    c
}

/// The next notification pushed to `c` on `u`'s channel.
async fn pushed(c: &mut RawClient, id: i64) -> Value {
    let p = c.publication(&channel(id)).await;
    assert_eq!(p["data"]["type"], "notification", "{p}");
    p["data"]["notification"].clone()
}

async fn list(server: &TestServer, u: &U, query: &str) -> Vec<Value> {
    let (s, body) = rest(
        server,
        &u.token,
        "GET",
        &format!("/v1/notifications{query}"),
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["channel"], channel(u.id));
    body["notifications"].as_array().unwrap().clone()
}

#[tokio::test]
async fn mentions_are_stored_pushed_and_private() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), "").await;
        let alice = user(&server, "alice").await;
        let bob = user(&server, "bob").await;
        let carol = user(&server, "carol").await;

        // Only bob may subscribe to bob's channel; nobody may publish there.
        let mut b = listen(&server, &bob).await;
        let mut c = connect(&server, &carol.token).await;
        let r = c
            .call(json!({"subscribe": {"channel": channel(bob.id)}}))
            .await;
        assert_eq!(r["error"]["code"], 103, "{r}");
        let r = c
            .call(json!({"publish": {"channel": channel(bob.id), "data": {"x": 1}}}))
            .await;
        assert_eq!(r["error"]["code"], 103, "{r}");
        let r = b
            .call(json!({"publish": {"channel": channel(bob.id), "data": {"x": 1}}}))
            .await;
        assert_eq!(r["error"]["code"], 103, "{r}");

        // A private room with bob (an invite notification), not carol.
        let (s, room) = rest(
            &server,
            &alice.token,
            "POST",
            "/v1/rooms",
            json!({"kind": "private", "name": "r", "members": [bob.id]}),
        )
        .await;
        assert_eq!(s, 201, "{room}");
        let room_id = room["id"].as_i64().unwrap();
        let invite = pushed(&mut b, bob.id).await;
        assert_eq!(invite["kind"], "invite");
        assert_eq!(invite["room_id"], room_id);
        assert_eq!(invite["actor_id"], alice.id);

        // Mentions of a member (any case), a non-member and the author herself.
        let text = format!(
            "hi @{} and @{}, says @{}",
            bob.name.to_uppercase(),
            carol.name,
            alice.name
        );
        let started = Instant::now();
        let (s, sent) = rest(
            &server,
            &alice.token,
            "POST",
            &format!("/v1/rooms/{room_id}/messages"),
            json!({"text": text, "client_msg_id": "m1"}),
        )
        .await;
        assert_eq!(s, 201, "{sent}");
        let mention = pushed(&mut b, bob.id).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(mention["kind"], "mention");
        assert_eq!(mention["room_id"], room_id);
        assert_eq!(mention["message_id"], sent["message"]["id"]);
        assert_eq!(mention["actor_id"], alice.id);
        assert_eq!(mention["data"]["excerpt"], text);
        assert_eq!(mention["read"], false);

        // A retry notifies nobody again; an edit does not either.
        let (s, _) = rest(
            &server,
            &alice.token,
            "POST",
            &format!("/v1/rooms/{room_id}/messages"),
            json!({"text": text, "client_msg_id": "m1"}),
        )
        .await;
        assert_eq!(s, 200);
        // A later mention arrives after nothing else: proof the retry pushed nothing.
        let (s, second) = rest(
            &server,
            &alice.token,
            "POST",
            &format!("/v1/rooms/{room_id}/messages"),
            json!({"text": format!("@{} again", bob.name), "client_msg_id": "m2"}),
        )
        .await;
        assert_eq!(s, 201);
        let next = pushed(&mut b, bob.id).await;
        assert_eq!(next["message_id"], second["message"]["id"]);

        // Stored: newest first, carol and alice got nothing.
        let all = list(&server, &bob, "").await;
        let kinds: Vec<&str> = all.iter().map(|n| n["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["mention", "mention", "invite"]);
        assert_eq!(all[1], mention);
        assert!(list(&server, &carol, "").await.is_empty());
        assert!(list(&server, &alice, "").await.is_empty());

        // Paging.
        let (s, page) = rest(
            &server,
            &bob.token,
            "GET",
            "/v1/notifications?limit=2",
            json!({}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(page["notifications"].as_array().unwrap().len(), 2);
        let before = page["next_before"].as_i64().unwrap();
        let rest_page = list(&server, &bob, &format!("?before={before}")).await;
        assert_eq!(rest_page, vec![all[2].clone()]);

        // Mark read: by id (someone else's id is ignored), then all.
        let (s, r) = rest(
            &server,
            &carol.token,
            "POST",
            "/v1/notifications/read",
            json!({"ids": [all[0]["id"]]}),
        )
        .await;
        assert_eq!((s, &r["marked"]), (200, &json!(0)), "{r}");
        let (s, r) = rest(
            &server,
            &bob.token,
            "POST",
            "/v1/notifications/read",
            json!({"ids": [all[0]["id"]]}),
        )
        .await;
        assert_eq!((s, &r["marked"]), (200, &json!(1)), "{r}");
        let unread = list(&server, &bob, "?unread=true").await;
        assert_eq!(unread.len(), 2);
        assert!(unread.iter().all(|n| n["id"] != all[0]["id"]));
        let (s, r) = rest(
            &server,
            &bob.token,
            "POST",
            "/v1/notifications/read",
            json!({"all": true}),
        )
        .await;
        assert_eq!((s, &r["marked"]), (200, &json!(2)), "{r}");
        assert!(list(&server, &bob, "?unread=true").await.is_empty());
        let read = list(&server, &bob, "").await;
        assert!(read
            .iter()
            .all(|n| n["read"] == true && n["read_at"].is_i64()));

        // Bad requests.
        for body in [
            json!({}),
            json!({"all": true, "ids": [1]}),
            json!({"all": false}),
            json!({"what": 1}),
        ] {
            let (s, r) = rest(&server, &bob.token, "POST", "/v1/notifications/read", body).await;
            assert_eq!(s, 400, "{r}");
        }
        let (s, _) = rest(
            &server,
            &bob.token,
            "GET",
            "/v1/notifications?limit=x",
            json!({}),
        )
        .await;
        assert_eq!(s, 400);
        let resp = http()
            .get(format!("{}/v1/notifications", server.http_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);

        b.close().await;
        c.close().await;
        server.shutdown().await;
    }
}

#[tokio::test]
async fn direct_rooms_and_invites_notify() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), "").await;
        let alice = user(&server, "alice").await;
        let bob = user(&server, "bob").await;
        let carol = user(&server, "carol").await;
        let mut b = listen(&server, &bob).await;
        let mut c = listen(&server, &carol).await;

        let (s, dm) = rest(
            &server,
            &alice.token,
            "POST",
            "/v1/rooms",
            json!({"kind": "direct", "members": [bob.id]}),
        )
        .await;
        assert_eq!(s, 201, "{dm}");
        let n = pushed(&mut b, bob.id).await;
        assert_eq!(n["kind"], "direct");
        assert_eq!(n["room_id"], dm["id"]);
        assert_eq!(n["actor_id"], alice.id);
        assert_eq!(n["data"]["room_kind"], "direct");
        // The same pair again returns the existing room and notifies nobody.
        let (s, again) = rest(
            &server,
            &alice.token,
            "POST",
            "/v1/rooms",
            json!({"kind": "direct", "members": [bob.id]}),
        )
        .await;
        assert_eq!((s, &again["id"]), (200, &dm["id"]));
        assert_eq!(list(&server, &bob, "").await.len(), 1);

        let (s, room) = rest(
            &server,
            &alice.token,
            "POST",
            "/v1/rooms",
            json!({"kind": "private", "name": "plans"}),
        )
        .await;
        assert_eq!(s, 201);
        let id = room["id"].as_i64().unwrap();
        let (s, r) = rest(
            &server,
            &alice.token,
            "POST",
            &format!("/v1/rooms/{id}/invite"),
            json!({"user_id": carol.id}),
        )
        .await;
        assert_eq!(s, 200, "{r}");
        let n = pushed(&mut c, carol.id).await;
        assert_eq!(n["kind"], "invite");
        assert_eq!(n["room_id"], id);
        assert_eq!(n["data"]["room_name"], "plans");
        let stored = list(&server, &carol, "").await;
        assert_eq!(stored, vec![n]);
        // A refused invite (already a member) notifies nobody.
        let (s, _) = rest(
            &server,
            &alice.token,
            "POST",
            &format!("/v1/rooms/{id}/invite"),
            json!({"user_id": carol.id}),
        )
        .await;
        assert_eq!(s, 409);
        assert_eq!(list(&server, &carol, "").await.len(), 1);

        b.close().await;
        c.close().await;
        server.shutdown().await;
    }
}

/// Polls the presence of `u` until `online` matches, for up to 5 s.
async fn presence_until(server: &TestServer, asker: &U, id: i64, online: bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, p) = rest(
            server,
            &asker.token,
            "GET",
            &format!("/v1/users/{id}/presence"),
            json!({}),
        )
        .await;
        assert_eq!(s, 200, "{p}");
        if p["online"] == online && (online || !p["last_seen"].is_null()) {
            return p;
        }
        assert!(Instant::now() < deadline, "presence stuck at {p}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn presence_follows_the_last_connection() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), "").await;
        let alice = user(&server, "alice").await;
        let bob = user(&server, "bob").await;

        let (s, p) = rest(
            &server,
            &alice.token,
            "GET",
            &format!("/v1/users/{}/presence", bob.id),
            json!({}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(
            p,
            json!({"user_id": bob.id, "online": false, "last_seen": null})
        );
        let (s, _) = rest(
            &server,
            &alice.token,
            "GET",
            "/v1/users/99999999/presence",
            json!({}),
        )
        .await;
        assert_eq!(s, 404);

        let before = switchboard_store::now_ms();
        let b1 = connect(&server, &bob.token).await;
        let b2 = connect(&server, &bob.token).await;
        let p = presence_until(&server, &alice, bob.id, true).await;
        assert!(p["last_seen"].as_i64().unwrap() >= before, "{p}");

        // One of two connections closes: still online.
        b1.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, p) = rest(
            &server,
            &alice.token,
            "GET",
            &format!("/v1/users/{}/presence", bob.id),
            json!({}),
        )
        .await;
        assert_eq!(p["online"], true, "{p}");
        assert!(server
            .node()
            .store
            .last_seen(bob.id)
            .await
            .unwrap()
            .is_none());

        // The last one closes: offline, last_seen stored.
        b2.close().await;
        let p = presence_until(&server, &alice, bob.id, false).await;
        let seen = p["last_seen"].as_i64().unwrap();
        assert!(seen >= before && seen <= switchboard_store::now_ms(), "{p}");
        assert_eq!(
            server.node().store.last_seen(bob.id).await.unwrap(),
            Some(seen)
        );

        // Back online, then offline again: last_seen moves forward.
        let b3 = connect(&server, &bob.token).await;
        presence_until(&server, &alice, bob.id, true).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        b3.close().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let p = presence_until(&server, &alice, bob.id, false).await;
            if p["last_seen"].as_i64().unwrap() > seen {
                break;
            }
            assert!(Instant::now() < deadline, "last_seen did not move: {p}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A connection whose user is not a store id does not disturb anything.
        let other = connect(&server, &server.token("not-a-number", None)).await;
        other.close().await;
        server.shutdown().await;
    }
}
