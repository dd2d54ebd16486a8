//! Runs `bench docs` against a small in-process y-websocket server built on yrs. The mock
//! keeps one document per path, answers step1 with step2, sends its own step1 and an empty
//! awareness heartbeat after the upgrade, and relays updates to every connection of the
//! document, the sender included unless `skip_sender` is set. Updates that arrive within one
//! 20 ms tick go out merged into one, as Switchboard's relay does. It uses yrs's own `sync`
//! codec, not the bench's.
//!
//! It also speaks the Switchboard REST calls the bench makes (register, login, create document,
//! content as text), with `/docs/{id}?token=` on the same port, so both modes are checked
//! without the real server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use switchboard_bench::{docs, DocsArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, Transact, Update};

const TOKEN: &str = "mock-token";
const RELAY_TICK: Duration = Duration::from_millis(20);

struct Room {
    doc: Doc,
    /// (sending connection, update).
    relay: broadcast::Sender<(usize, Arc<Vec<u8>>)>,
}

#[derive(Default)]
struct Mock {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    /// Switchboard document ids handed out by `POST /v1/documents`.
    next_id: AtomicI64,
    connections: AtomicUsize,
    /// Do not relay updates back to their sender (some servers don't).
    skip_sender: bool,
    /// Relayed frames that carried more than one queued update.
    merged_frames: AtomicUsize,
}

impl Mock {
    fn room(&self, path: &str) -> Arc<Room> {
        let mut rooms = self.rooms.lock().unwrap();
        rooms
            .entry(path.to_owned())
            .or_insert_with(|| {
                let doc = Doc::new();
                doc.get_or_insert_text("content");
                Arc::new(Room {
                    doc,
                    relay: broadcast::channel(1 << 16).0,
                })
            })
            .clone()
    }
}

async fn start_mock(skip_sender: bool) -> (String, Arc<Mock>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = Arc::new(Mock {
        skip_sender,
        ..Mock::default()
    });
    let m = mock.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(stream, m.clone()));
        }
    });
    (addr.to_string(), mock)
}

/// WebSocket upgrades go to [`serve_ws`]; anything else is one REST call.
async fn serve(stream: TcpStream, mock: Arc<Mock>) {
    let mut head = [0u8; 256];
    let Ok(n) = stream.peek(&mut head).await else {
        return;
    };
    let start = String::from_utf8_lossy(&head[..n]);
    if start.starts_with("GET ") && !start.starts_with("GET /v1/") {
        serve_ws(stream, mock).await;
    } else {
        serve_rest(stream, &mock).await;
    }
}

// The handshake callback's `Result<Response, ErrorResponse>` is tungstenite's signature.
#[allow(clippy::result_large_err)]
async fn serve_ws(stream: TcpStream, mock: Arc<Mock>) {
    let mut uri = None;
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async(stream, |req: &Request, resp: Response| {
            uri = Some(req.uri().clone());
            Ok(resp)
        })
        .await
    else {
        return;
    };
    let uri = uri.unwrap();
    let path = uri.path().to_owned();
    // Switchboard's checks: a token and a document that exists.
    if let Some(id) = path.strip_prefix("/docs/") {
        let close = |code: u16, reason: &'static str| CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        if uri.query() != Some(&format!("token={TOKEN}")) {
            let _ = ws.close(Some(close(4401, "bad token"))).await;
            return;
        }
        let known = id
            .parse::<i64>()
            .is_ok_and(|id| id >= 1 && id <= mock.next_id.load(Ordering::Relaxed));
        if !known {
            let _ = ws.close(Some(close(4404, "unknown document"))).await;
            return;
        }
    }
    let me = mock.connections.fetch_add(1, Ordering::Relaxed);
    let room = mock.room(&path);
    let mut relayed = room.relay.subscribe();
    let sv = room.doc.transact().state_vector();
    let hello = [
        YMessage::Sync(SyncMessage::SyncStep1(sv)).encode_v1(),
        vec![1, 1, 0], // the empty awareness heartbeat
    ];
    for m in hello {
        if ws.send(Message::binary(m)).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { return };
                let Message::Binary(frame) = msg else { continue };
                match YMessage::decode_v1(&frame) {
                    Ok(YMessage::Sync(SyncMessage::SyncStep1(sv))) => {
                        let diff = room.doc.transact().encode_state_as_update_v1(&sv);
                        let reply = YMessage::Sync(SyncMessage::SyncStep2(diff)).encode_v1();
                        if ws.send(Message::binary(reply)).await.is_err() {
                            return;
                        }
                    }
                    Ok(YMessage::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u))) => {
                        let before = room.doc.transact().state_vector();
                        {
                            let mut txn = room.doc.transact_mut();
                            txn.apply_update(Update::decode_v1(&u).unwrap()).unwrap();
                        }
                        // An empty step2 (a client with nothing new) is not relayed.
                        if room.doc.transact().state_vector() != before {
                            let _ = room.relay.send((me, Arc::new(u)));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("client sent a bad message: {e}"),
                }
            }
            update = relayed.recv() => {
                let Ok(first) = update else { return };
                // A relay tick: what else arrives meanwhile goes out in the same frame.
                tokio::time::sleep(RELAY_TICK).await;
                let mut queued = vec![first];
                while let Ok(more) = relayed.try_recv() {
                    queued.push(more);
                }
                let mut queued: Vec<Arc<Vec<u8>>> = queued
                    .into_iter()
                    .filter(|(from, _)| !(mock.skip_sender && *from == me))
                    .map(|(_, u)| u)
                    .collect();
                if queued.is_empty() {
                    continue;
                }
                let update = if queued.len() == 1 {
                    queued.remove(0).to_vec()
                } else {
                    mock.merged_frames.fetch_add(1, Ordering::Relaxed);
                    yrs::merge_updates_v1(queued.iter().map(|u| u.as_slice())).unwrap()
                };
                let frame = YMessage::Sync(SyncMessage::Update(update)).encode_v1();
                if ws.send(Message::binary(frame)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One HTTP/1.1 request, answered with `Connection: close`.
async fn serve_rest(mut stream: TcpStream, mock: &Mock) {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let Ok(n) = stream.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: serde_json::Value =
        serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or_default();
    let request_line = head.lines().next().unwrap_or_default().to_owned();
    let authorized = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}")));
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, reply) = match (method, target) {
        ("POST", "/v1/auth/register") => {
            assert!(body["username"]
                .as_str()
                .unwrap()
                .starts_with("bench-docs-"));
            assert!(body["password"].is_string() && body["display_name"].is_string());
            ("201 Created", "application/json", "{}".to_owned())
        }
        ("POST", "/v1/auth/login") => (
            "200 OK",
            "application/json",
            serde_json::json!({"access_token": TOKEN, "token_type": "Bearer"}).to_string(),
        ),
        ("POST", "/v1/documents") if authorized => {
            let id = mock.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            let document = serde_json::json!({"document": {"id": id, "title": body["title"],
                "owner_id": 1, "created_at": 0, "updated_at": 0, "role": "owner"}});
            ("201 Created", "application/json", document.to_string())
        }
        ("GET", t) if authorized && t.starts_with("/v1/documents/") => {
            let id = t
                .trim_start_matches("/v1/documents/")
                .trim_end_matches("/content?format=text");
            let room = mock.room(&format!("/docs/{id}"));
            let text = room.doc.get_or_insert_text("content");
            let text = text.get_string(&room.doc.transact());
            ("200 OK", "text/plain; charset=utf-8", text)
        }
        _ => ("401 Unauthorized", "application/json", "{}".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn args(editors: usize) -> DocsArgs {
    DocsArgs {
        base_url: String::new(),
        ws_url: None,
        server_pid: Some(std::process::id()),
        sources: 4,
        editors,
        rate: 10.0,
        chars: 2,
        replicas: 4,
        seed_chars: 100,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(200),
        concurrency: 8,
        setup_concurrency: 2,
        docs: 0,
        doc_bytes: 256,
        load_ops: 0,
        unload_wait: Duration::ZERO,
        user_prefix: "bench-docs".into(),
        password: "pw".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_mode_converges_and_times_every_edit() {
    // Without relays to the sender: seeding and the load phase must not rely on them.
    let (addr, mock) = start_mock(true).await;
    let mut a = args(12);
    a.ws_url = Some(format!("ws://{addr}/room"));
    a.docs = 3;
    a.load_ops = 1000;
    let report = docs::run(a).await.unwrap();
    assert_eq!((report.mode, report.connected), ("raw", 12), "{report:?}");
    // 12 editors x 10 edits/s x 1 s, give or take the edges of the window.
    assert!((100..=130).contains(&report.sent), "{report:?}");
    assert_eq!(report.observed, report.sent, "{report:?}");
    assert_eq!((report.lost, report.missing_edits), (0, 0), "{report:?}");
    assert_eq!(report.converged, Some(true), "{report:?}");
    // 4 replicas and the late joiner; no REST content in raw mode.
    assert_eq!((report.compared, report.mismatched), (5, 0), "{report:?}");
    assert_eq!(report.server_content_matches, None);
    // The seed, plus 2 characters per edit of the whole run (warm-up included).
    let chars = report.final_chars.unwrap();
    assert!(chars >= 100 + 2 * report.sent as usize, "{report:?}");
    assert_eq!((chars - 100) % 2, 0);
    let lat = report.latency_ms.unwrap();
    assert!(
        lat.p50 > 0.0 && lat.p50 <= lat.p99 && lat.p99 <= lat.max,
        "{lat:?}"
    );
    assert!(report.frames_received > 0 && report.server_cpu_s.is_some());
    assert_eq!(report.docs_loaded, 3, "{report:?}");
    assert!(report.rss_per_doc_bytes.is_some());
    assert_eq!((report.load_ops, report.load_updates), (1000, 3));
    assert!(
        report.load_ms.is_some() && report.join_ms.is_some(),
        "{report:?}"
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // Edited room, 3 memory rooms and the load room.
    let rooms = mock.rooms.lock().unwrap();
    assert_eq!(rooms.len(), 5, "{:?}", rooms.keys().collect::<Vec<_>>());
    assert!(rooms
        .keys()
        .any(|k| k.starts_with("/room-") && k.ends_with("-load")));
    drop(rooms);
    assert!(
        mock.merged_frames.load(Ordering::Relaxed) > 0,
        "the relay never merged"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["bench"], "docs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_mode_uses_rest_and_tokens() {
    let (addr, mock) = start_mock(false).await;
    let mut a = args(6);
    a.base_url = format!("http://{addr}");
    a.load_ops = 500;
    let report = docs::run(a).await.unwrap();
    assert_eq!(
        (report.mode, report.connected),
        ("switchboard", 6),
        "{report:?}"
    );
    assert_eq!(report.document.as_deref(), Some("1"));
    assert_eq!(report.converged, Some(true), "{report:?}");
    assert_eq!(report.server_content_matches, Some(true), "{report:?}");
    // 4 replicas, the late joiner and the server's content.
    assert_eq!((report.compared, report.mismatched), (6, 0), "{report:?}");
    assert!(report.load_ms.is_some(), "{report:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        mock.next_id.load(Ordering::Relaxed),
        2,
        "edited + load document"
    );
}

#[tokio::test]
async fn close_codes_are_reported() {
    let (addr, _) = start_mock(false).await;
    // Document 1 does not exist: nothing was created. The editing phase cannot start.
    let mut a = args(2);
    a.ws_url = Some(format!("ws://{addr}/docs/1?token={TOKEN}"));
    let err = docs::run(a).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("4404 (unknown document)"), "{msg}");
}
