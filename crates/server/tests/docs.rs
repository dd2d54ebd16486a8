//! Collaborative documents over the real y-websocket endpoint and REST, on SQLite and
//! PostgreSQL: sync and convergence, permissions and close codes, awareness clean-up,
//! persistence across a restart, compaction, versions and restore, and the bad-input rows
//! of the documents issue (each closes with its code, leaves the document untouched and does
//! not disturb the document's other clients).
//!
//! The client here is a raw y-websocket peer built on yrs: it sees every frame, so tests can
//! assert exact messages and close codes. The npm `yjs`/`y-websocket` suite is in
//! tests/compat/js.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{databases, http, STEP};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::testing::TestServer;
use switchboard_store::{NewUser, UserRole};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

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
        "PATCH" => http().patch(url).json(&body),
        "DELETE" => http().delete(url),
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

async fn create_doc(server: &TestServer, token: &str, title: &str) -> i64 {
    let (s, body) = rest(
        server,
        token,
        "POST",
        "/v1/documents",
        json!({"title": title}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    body["document"]["id"].as_i64().unwrap()
}

async fn share(server: &TestServer, token: &str, doc: i64, user: i64, role: &str) {
    let path = format!("/v1/documents/{doc}/members/{user}");
    let (s, body) = rest(server, token, "PUT", &path, json!({"role": role})).await;
    assert_eq!(s, 200, "{body}");
}

async fn server_text(server: &TestServer, token: &str, doc: i64) -> String {
    let (s, body) = rest(
        server,
        token,
        "GET",
        &format!("/v1/documents/{doc}/content?format=text"),
        Value::Null,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    body.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string())
}

/// What the server sent, decoded.
#[derive(Debug)]
enum Got {
    Step1,
    Step2,
    Update,
    /// (client id, clock, json) entries.
    Awareness(Vec<(u64, u32, String)>),
    Denied(String),
    Close(u16),
    Ended,
}

/// A raw y-websocket peer with its own yrs document.
struct Peer {
    ws: WebSocketStream<TcpStream>,
    doc: Doc,
}

impl Peer {
    /// Connects and completes the handshake: sends step 1, answers the server's step 1, and
    /// waits for the server's step 2.
    async fn join(server: &TestServer, doc: i64, token: &str) -> Peer {
        let mut p = Peer::open(server, &format!("/docs/{doc}?token={token}")).await;
        p.send_step1().await;
        p.until_synced().await;
        p
    }

    async fn open(server: &TestServer, path: &str) -> Peer {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let url = format!("ws://{}{path}", server.addr);
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (ws, resp) = tokio_tungstenite::client_async_with_config(
            url.into_client_request().unwrap(),
            tcp,
            Some(config),
        )
        .await
        .expect("websocket handshake");
        assert_eq!(resp.status().as_u16(), 101);
        Peer {
            ws,
            doc: Doc::new(),
        }
    }

    async fn send(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }

    async fn send_step1(&mut self) {
        let sv = self.doc.transact().state_vector().encode_v1();
        self.send(sync(0, &sv)).await;
    }

    /// Reads one message and applies what it carries to the local document.
    async fn next(&mut self) -> Got {
        loop {
            let msg = match tokio::time::timeout(STEP, self.ws.next()).await {
                Err(_) => panic!("nothing from the server within {STEP:?}"),
                Ok(None) | Ok(Some(Err(_))) => return Got::Ended,
                Ok(Some(Ok(m))) => m,
            };
            let bytes = match msg {
                Message::Binary(b) => b,
                Message::Close(Some(f)) => return Got::Close(f.code.into()),
                Message::Close(None) => return Got::Ended,
                _ => continue,
            };
            let mut c = Cursor::new(&bytes);
            let kind: u64 = c.read_var().unwrap();
            return match kind {
                0 => {
                    let sub: u64 = c.read_var().unwrap();
                    let body = c.read_buf().unwrap().to_vec();
                    match sub {
                        0 => {
                            // Answer the server's step 1 with what it misses.
                            let sv = StateVector::decode_v1(&body).unwrap();
                            let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                            self.send(sync(1, &diff)).await;
                            Got::Step1
                        }
                        1 | 2 => {
                            let u = Update::decode_v1(&body).unwrap();
                            self.doc.transact_mut().apply_update(u).unwrap();
                            if sub == 1 {
                                Got::Step2
                            } else {
                                Got::Update
                            }
                        }
                        other => panic!("unknown sync subtype {other}"),
                    }
                }
                1 => {
                    let body = c.read_buf().unwrap().to_vec();
                    let mut a = Cursor::new(&body);
                    let n: u64 = a.read_var().unwrap();
                    let entries = (0..n)
                        .map(|_| {
                            let id: u64 = a.read_var().unwrap();
                            let clock: u32 = a.read_var().unwrap();
                            let json = a.read_string().unwrap().to_string();
                            (id, clock, json)
                        })
                        .collect();
                    Got::Awareness(entries)
                }
                2 => {
                    let _denied: u64 = c.read_var().unwrap();
                    Got::Denied(c.read_string().unwrap().to_string())
                }
                other => panic!("unknown message type {other}"),
            };
        }
    }

    async fn until_synced(&mut self) {
        loop {
            match self.next().await {
                Got::Step2 => return,
                Got::Close(c) => panic!("closed with {c} while syncing"),
                Got::Ended => panic!("ended while syncing"),
                _ => {}
            }
        }
    }

    /// Reads until the local text equals `want` (or fails after STEP).
    async fn until_text(&mut self, want: &str) {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.text() != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "text {:?}, want {want:?}",
                self.text()
            );
            match self.next().await {
                Got::Close(c) => panic!("closed with {c}"),
                Got::Ended => panic!("ended"),
                _ => {}
            }
        }
    }

    /// Reads until an awareness message arrives; returns its entries.
    async fn until_awareness(&mut self) -> Vec<(u64, u32, String)> {
        loop {
            match self.next().await {
                Got::Awareness(e) if !e.is_empty() => return e,
                Got::Close(c) => panic!("closed with {c}"),
                Got::Ended => panic!("ended"),
                _ => {}
            }
        }
    }

    async fn close_code(&mut self) -> u16 {
        loop {
            match self.next().await {
                Got::Close(c) => return c,
                Got::Ended => panic!("ended without a Close frame"),
                _ => {}
            }
        }
    }

    fn text(&self) -> String {
        let t = self.doc.get_or_insert_text("content");
        t.get_string(&self.doc.transact())
    }

    /// Edits locally and sends the update.
    async fn edit(&mut self, f: impl FnOnce(&mut yrs::TransactionMut, &yrs::TextRef)) {
        let t = self.doc.get_or_insert_text("content");
        let update = {
            let mut txn = self.doc.transact_mut();
            f(&mut txn, &t);
            txn.encode_update_v1()
        };
        self.send(sync(2, &update)).await;
    }

    async fn insert(&mut self, at: u32, s: &str) {
        self.edit(|txn, t| t.insert(txn, at, s)).await;
    }

    async fn set_awareness(&mut self, client: u64, clock: u32, json: &str) {
        self.send(awareness(&[(client, clock, json)])).await;
    }
}

fn sync(sub: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.write_var(0u64);
    out.write_var(sub);
    out.write_buf(body);
    out
}

fn awareness(entries: &[(u64, u32, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.write_var(entries.len() as u64);
    for (id, clock, json) in entries {
        body.write_var(*id);
        body.write_var(*clock);
        body.write_string(json);
    }
    let mut out = Vec::new();
    out.write_var(1u64);
    out.write_buf(&body);
    out
}

/// Quick persistence for tests that restart: 10 ms writes.
const CONFIG: &str = "[docs]\npersist_interval = \"10ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_persistence_and_restart() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), CONFIG).await;
        let (_, owner) = user(&server, "ann").await;
        let doc = create_doc(&server, &owner, "Notes").await;
        let mut a = Peer::join(&server, doc, &owner).await;
        let mut b = Peer::join(&server, doc, &owner).await;
        a.insert(0, "hello").await;
        b.until_text("hello").await;
        b.insert(5, " world").await;
        a.until_text("hello world").await;
        // Concurrent edits on both sides converge.
        a.insert(0, "A").await;
        b.insert(0, "B").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        while tokio::time::timeout(Duration::from_millis(100), a.next())
            .await
            .is_ok()
        {}
        while tokio::time::timeout(Duration::from_millis(100), b.next())
            .await
            .is_ok()
        {}
        assert_eq!(a.text(), b.text());
        let text = a.text();
        assert_eq!(text.len(), "hello world".len() + 2);
        assert_eq!(server_text(&server, &owner, doc).await, text);

        // A restart keeps the content: a graceful shutdown writes everything.
        drop((a, b));
        server.shutdown().await;
        // Same secret, same database: the token and the document are still good.
        let server = TestServer::start_on(db.url(), CONFIG).await;
        let c = Peer::join(&server, doc, &owner).await;
        assert_eq!(c.text(), text);
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_and_close_codes() {
    let server = TestServer::start_with(CONFIG).await;
    let (_, owner) = user(&server, "own").await;
    let (viewer_id, viewer) = user(&server, "view").await;
    let (_, stranger) = user(&server, "str").await;
    let doc = create_doc(&server, &owner, "Plan").await;
    share(&server, &owner, doc, viewer_id, "viewer").await;

    let mut o = Peer::join(&server, doc, &owner).await;
    o.insert(0, "abc").await;
    let mut v = Peer::join(&server, doc, &viewer).await;
    v.until_text("abc").await;
    // The viewer's write: refused with the auth message, never relayed or stored.
    v.insert(0, "XYZ").await;
    loop {
        match v.next().await {
            Got::Denied(reason) => {
                assert!(reason.contains("read-only"), "{reason}");
                break;
            }
            Got::Close(c) => panic!("viewer closed with {c}"),
            _ => {}
        }
    }
    o.insert(3, "d").await;
    o.until_text("abcd").await;
    v.until_text("XYZabcd").await; // its own local edit stays local
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server_text(&server, &owner, doc).await, "abcd");

    // A stranger: the permission-denied message, then 4403.
    let mut s = Peer::open(&server, &format!("/docs/{doc}?token={stranger}")).await;
    assert!(matches!(s.next().await, Got::Denied(_)));
    assert_eq!(s.close_code().await, 4403);
    // An admin may open any document, as over REST.
    let admin = server
        .node()
        .store
        .create_user(NewUser {
            username: common::unique("adm"),
            password_hash: String::new(),
            display_name: "Admin".into(),
            role: UserRole::Admin,
        })
        .await
        .unwrap();
    let mut ad = Peer::join(&server, doc, &server.token(&admin.id.to_string(), None)).await;
    ad.until_text("abcd").await;
    drop(ad);
    // No token or a bad one: 4401. Unknown or malformed document ids: 4404.
    let mut n = Peer::open(&server, &format!("/docs/{doc}")).await;
    assert_eq!(n.close_code().await, 4401);
    let mut n = Peer::open(&server, &format!("/docs/{doc}?token=nope")).await;
    assert_eq!(n.close_code().await, 4401);
    let expired = server.token("1", Some(-10));
    let mut n = Peer::open(&server, &format!("/docs/{doc}?token={expired}")).await;
    assert_eq!(n.close_code().await, 4401);
    let mut n = Peer::open(&server, &format!("/docs/999999?token={owner}")).await;
    assert_eq!(n.close_code().await, 4404);
    let mut n = Peer::open(&server, &format!("/docs/abc?token={owner}")).await;
    assert_eq!(n.close_code().await, 4404);
    // REST: a stranger gets 403, a viewer may read but not write.
    let (st, _) = rest(
        &server,
        &stranger,
        "GET",
        &format!("/v1/documents/{doc}"),
        Value::Null,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _) = rest(
        &server,
        &viewer,
        "POST",
        &format!("/v1/documents/{doc}/updates"),
        json!({"text": "x"}),
    )
    .await;
    assert_eq!(st, 403);
    assert_eq!(server_text(&server, &viewer, doc).await, "abcd");

    // Promoting the viewer closes its connection with 4000 (reconnect for the new role).
    share(&server, &owner, doc, viewer_id, "editor").await;
    assert_eq!(v.close_code().await, 4000);
    let mut e = Peer::join(&server, doc, &viewer).await;
    e.insert(0, ">").await;
    o.until_text(">abcd").await;
    // Removing access closes with 4403.
    let (st, _) = rest(
        &server,
        &owner,
        "DELETE",
        &format!("/v1/documents/{doc}/members/{viewer_id}"),
        Value::Null,
    )
    .await;
    assert_eq!(st, 204);
    assert_eq!(e.close_code().await, 4403);
    // Deleting the document closes everyone with 4410.
    let (st, _) = rest(
        &server,
        &owner,
        "DELETE",
        &format!("/v1/documents/{doc}"),
        Value::Null,
    )
    .await;
    assert_eq!(st, 204);
    assert_eq!(o.close_code().await, 4410);
    let mut gone = Peer::open(&server, &format!("/docs/{doc}?token={owner}")).await;
    assert_eq!(gone.close_code().await, 4404);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awareness_is_relayed_and_removed_on_close() {
    let server = TestServer::start_with(CONFIG).await;
    let (_, owner) = user(&server, "aw").await;
    let doc = create_doc(&server, &owner, "Cursors").await;
    let mut a = Peer::join(&server, doc, &owner).await;
    let mut b = Peer::join(&server, doc, &owner).await;
    a.set_awareness(4242, 1, r#"{"user":{"name":"ann"},"cursor":3}"#)
        .await;
    let seen = b.until_awareness().await;
    assert_eq!(
        seen,
        vec![(4242, 1, r#"{"user":{"name":"ann"},"cursor":3}"#.to_string())]
    );
    // A newcomer gets everyone's current state at once.
    let mut c = Peer::open(&server, &format!("/docs/{doc}?token={owner}")).await;
    c.send_step1().await;
    assert_eq!(c.until_awareness().await[0].0, 4242);
    // A's connection closes: everyone is told its client is gone (state null, clock + 1).
    let started = std::time::Instant::now();
    a.ws.close(None).await.unwrap();
    drop(a);
    let gone = b.until_awareness().await;
    assert_eq!(gone, vec![(4242, 2, "null".to_string())]);
    assert!(started.elapsed() < Duration::from_secs(2));
    server.shutdown().await;
}

/// The bad-input rows: each closes the offender with its code, leaves the document as it
/// was, and the document's other client keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_and_leaves_the_document_untouched() {
    let server =
        TestServer::start_with("[docs]\npersist_interval = \"10ms\"\nmax_update_bytes = 4096\n")
            .await;
    let (_, owner) = user(&server, "bad").await;
    let doc = create_doc(&server, &owner, "Target").await;
    let mut good = Peer::join(&server, doc, &owner).await;
    good.insert(0, "safe").await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let big = {
        let d = Doc::new();
        let t = d.get_or_insert_text("content");
        let mut txn = d.transact_mut();
        t.insert(&mut txn, 0, &"x".repeat(10_000));
        sync(2, &txn.encode_update_v1())
    };
    let flood: Vec<Vec<u8>> = (0..200).map(|i| awareness(&[(77, i + 1, "{}")])).collect();
    let many_ids = awareness(&(1..=20).map(|i| (i as u64, 1, "{}")).collect::<Vec<_>>());
    let cases: Vec<(&str, Vec<Vec<u8>>, u16)> = vec![
        (
            "malformed binary frame",
            vec![vec![0xde, 0xad, 0xbe, 0xef]],
            4400,
        ),
        ("truncated varint", vec![vec![0x80]], 4400),
        ("truncated update", vec![vec![0, 2, 50, 1, 2, 3]], 4400),
        ("garbage update", vec![sync(2, &[0xff; 12])], 4400),
        ("update over the limit", vec![big], 4413),
        ("awareness flood", flood, 4429),
        ("too many awareness ids", vec![many_ids], 4429),
    ];
    for (what, frames, code) in cases {
        let mut p = Peer::join(&server, doc, &owner).await;
        for f in frames {
            if p.ws.send(Message::Binary(f.into())).await.is_err() {
                break;
            }
        }
        assert_eq!(p.close_code().await, code, "{what}");
        assert_eq!(server_text(&server, &owner, doc).await, "safe", "{what}");
    }
    // A text frame is not y-websocket.
    let mut p = Peer::join(&server, doc, &owner).await;
    p.ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(p.close_code().await, 4400);

    // The well-behaved client saw nothing of it and still edits.
    good.insert(4, "!").await;
    let mut check = Peer::join(&server, doc, &owner).await;
    check.until_text("safe!").await;
    assert_eq!(server_text(&server, &owner, doc).await, "safe!");
    server.shutdown().await;
}

/// An edit built on content the server lacks (it reached the editor some other way, say
/// another provider) is not integrated behind a hole, as yrs 0.28.1 would (and a later
/// update spanning that hole made yrs free memory it still used: found by the `ywebsocket`
/// fuzz target). The server cuts it off and sends the editor its step 1; the editor's
/// step 2 brings the missing part, and nothing is lost. Over REST the same update is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_on_content_the_server_lacks_is_fetched_from_its_sender() {
    let server = TestServer::start_with(CONFIG).await;
    let (_, owner) = user(&server, "gap").await;
    let doc = create_doc(&server, &owner, "Gap").await;
    // The author's two edits; the editor got both elsewhere and sends only the second.
    let author = Doc::with_client_id(4242);
    let text = author.get_or_insert_text("content");
    let first = {
        let mut txn = author.transact_mut();
        text.insert(&mut txn, 0, "ab");
        txn.encode_update_v1()
    };
    let second = {
        let mut txn = author.transact_mut();
        text.insert(&mut txn, 2, " cd");
        txn.encode_update_v1()
    };
    let (s, body) = rest(
        &server,
        &owner,
        "POST",
        &format!("/v1/documents/{doc}/updates"),
        json!({"update": base64::engine::general_purpose::STANDARD.encode(&second)}),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("past"),
        "{body}"
    );

    let mut editor = Peer::join(&server, doc, &owner).await;
    for u in [&first, &second] {
        editor
            .doc
            .transact_mut()
            .apply_update(Update::decode_v1(u).unwrap())
            .unwrap();
    }
    editor.send(sync(2, &second)).await;
    // The server asks (step 1), the peer answers with everything the server lacks.
    loop {
        match editor.next().await {
            Got::Step1 => break,
            Got::Close(c) => panic!("closed with {c}"),
            Got::Ended => panic!("ended"),
            _ => {}
        }
    }
    let mut check = Peer::join(&server, doc, &owner).await;
    check.until_text("ab cd").await;
    assert_eq!(server_text(&server, &owner, doc).await, "ab cd");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_restore_and_rest_edits() {
    for db in databases().await {
        let server = TestServer::start_on(db.url(), CONFIG).await;
        let (_, owner) = user(&server, "ver").await;
        let doc = create_doc(&server, &owner, "Draft").await;
        let mut a = Peer::join(&server, doc, &owner).await;
        a.insert(0, "first draft").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (s, v1) = rest(
            &server,
            &owner,
            "POST",
            &format!("/v1/documents/{doc}/versions"),
            json!({"label": "v1"}),
        )
        .await;
        assert_eq!(s, 201, "{v1}");
        let v1 = v1["version"]["id"].as_i64().unwrap();
        a.edit(|txn, t| {
            t.remove_range(txn, 0, 5);
            t.insert(txn, 0, "second");
        })
        .await;
        a.until_text("second draft").await;
        // A bot appends over REST; connected clients see it.
        let (s, body) = rest(
            &server,
            &owner,
            "POST",
            &format!("/v1/documents/{doc}/updates"),
            json!({"text": "!"}),
        )
        .await;
        assert_eq!((s, &body["changed"]), (200, &json!(true)), "{body}");
        a.until_text("second draft!").await;
        // A raw Yjs update over REST, as application/octet-stream.
        let raw = {
            let d = Doc::new();
            let t = d.get_or_insert_text("other");
            let mut txn = d.transact_mut();
            t.insert(&mut txn, 0, "side");
            txn.encode_update_v1()
        };
        let resp = http()
            .post(format!("{}/v1/documents/{doc}/updates", server.http_url()))
            .bearer_auth(&owner)
            .header("content-type", "application/octet-stream")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let (s, j) = rest(
            &server,
            &owner,
            "GET",
            &format!("/v1/documents/{doc}/content?format=json"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(j["content"], "second draft!");
        // A root type the server never declared is listed, but its shape is unknown to it.
        assert!(j.get("other").is_some(), "{j}");
        let resp = http()
            .post(format!("{}/v1/documents/{doc}/updates", server.http_url()))
            .bearer_auth(&owner)
            .header("content-type", "application/octet-stream")
            .body(vec![1, 2, 3])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);

        // Versions: listed newest first, readable, and a restore reaches every client.
        let (s, text) = rest(
            &server,
            &owner,
            "GET",
            &format!("/v1/documents/{doc}/versions/{v1}?format=text"),
            Value::Null,
        )
        .await;
        assert_eq!((s, text), (200, json!("first draft")));
        let (s, body) = rest(
            &server,
            &owner,
            "POST",
            &format!("/v1/documents/{doc}/versions/{v1}/restore"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 200, "{body}");
        a.until_text("first draft").await;
        let (_, list) = rest(
            &server,
            &owner,
            "GET",
            &format!("/v1/documents/{doc}/versions"),
            Value::Null,
        )
        .await;
        let labels: Vec<&str> = list["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["label"].as_str().unwrap())
            .collect();
        assert_eq!(labels, vec!["before restoring \"v1\"", "v1"]);
        let (s, _) = rest(
            &server,
            &owner,
            "POST",
            &format!("/v1/documents/{doc}/versions/999999/restore"),
            Value::Null,
        )
        .await;
        assert_eq!(s, 404);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(server_text(&server, &owner, doc).await, "first draft");

        // The audit log has the creation and the restore.
        let audit = server.node().store.audit_log(None, 50).await.unwrap();
        let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
        assert!(
            actions.contains(&"document_created") && actions.contains(&"version_restored"),
            "{actions:?}"
        );
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_unloading_and_concurrent_first_loads() {
    let server = TestServer::start_with(
        "[docs]\npersist_interval = \"5ms\"\ncompact_updates = 10\nunload_after = \"300ms\"\n",
    )
    .await;
    let (_, owner) = user(&server, "cmp").await;
    let doc = create_doc(&server, &owner, "Log").await;
    let mut a = Peer::join(&server, doc, &owner).await;
    for i in 0..40 {
        a.insert(i, "x").await;
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
    drop(a);
    // Written, compacted (the log is short again) and unloaded.
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let c = server
            .node()
            .store
            .load_document(doc)
            .await
            .unwrap()
            .unwrap();
        if c.snapshot.is_some() && c.updates.len() < 10 && server.node().collab.loaded() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not compacted and unloaded: {} log entries, {} loaded",
            c.updates.len(),
            server.node().collab.loaded()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Many first connections at once share one load, and all see the whole text.
    let peers =
        futures_util::future::join_all((0..8).map(|_| Peer::join(&server, doc, &owner))).await;
    for p in &peers {
        assert_eq!(p.text(), "x".repeat(40));
    }
    assert_eq!(server.node().collab.loaded(), 1);
    server.shutdown().await;
}
