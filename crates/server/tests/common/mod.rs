//! Helpers shared by the integration tests: a raw client for the Centrifugo JSON protocol that
//! sees every frame the server sends (so tests can assert exact error and close codes), a
//! `Bystander` that proves a server kept serving well-behaved clients, and an API helper.

#![allow(dead_code)]

pub mod cluster;

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::testing::TestServer;
use switchboard_store::testing::TestDatabase;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long any single expectation may wait before the test fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(5);

/// A free TCP port on the loopback address (for a server started as its own process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A service a `suite` of tests needs is missing: fails under CI; otherwise prints a loud
/// SKIP notice and returns (the caller then skips).
pub fn missing_service(suite: &str, what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required by the {suite} tests (CI is set)");
    }
    eprintln!("\n======================================================================");
    eprintln!("SKIPPED: {what} is not reachable; this {suite} test did not run.");
    eprintln!("======================================================================\n");
}

/// What the server did to a connection, as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// One protocol message (a frame may carry several, joined by `\n`).
    Msg(Value),
    /// A Close frame with this code (`None` when the frame had no code).
    Close(Option<u16>, String),
    /// The stream ended, or failed, without a Close frame.
    Ended(String),
}

/// A WebSocket client speaking the JSON protocol line by line, with no SDK logic in between.
pub struct RawClient {
    ws: WebSocketStream<TcpStream>,
    pending: VecDeque<Value>,
    next_id: u32,
    /// Set once a Close frame or the end of the stream was seen.
    closed: Option<Event>,
    /// Whether server pings (`{}`) are answered with a pong, as every SDK does.
    pub answer_pings: bool,
    /// Server pings seen so far.
    pub pings: usize,
}

impl RawClient {
    /// Opens `/connection/websocket` (no subprotocol) and does not send anything yet.
    pub async fn open(server: &TestServer) -> RawClient {
        let tcp = TcpStream::connect(server.addr).await.expect("tcp connect");
        Self::handshake(server, tcp, None).await.0
    }

    /// Opens `/connection/websocket` asking for the `centrifuge-json` subprotocol; returns the
    /// subprotocol the server chose.
    pub async fn open_json_subprotocol(server: &TestServer) -> (RawClient, Option<String>) {
        let tcp = TcpStream::connect(server.addr).await.expect("tcp connect");
        Self::handshake(server, tcp, Some("centrifuge-json")).await
    }

    /// Like [`RawClient::open`] with a tiny kernel receive buffer, so that a client that stops
    /// reading backs up into the server's write queue quickly.
    pub async fn open_small_rcvbuf(server: &TestServer) -> RawClient {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let tcp = sock.connect(server.addr).await.expect("tcp connect");
        Self::handshake(server, tcp, None).await.0
    }

    /// Opens `/connection/websocket` of the server at `addr` (a server in another process).
    pub async fn open_at(addr: std::net::SocketAddr) -> RawClient {
        let tcp = TcpStream::connect(addr).await.expect("tcp connect");
        let url = format!("ws://{addr}/connection/websocket");
        Self::handshake_url(&url, tcp, None).await.0
    }

    async fn handshake(
        server: &TestServer,
        tcp: TcpStream,
        subprotocol: Option<&str>,
    ) -> (RawClient, Option<String>) {
        Self::handshake_url(&server.ws_url(), tcp, subprotocol).await
    }

    async fn handshake_url(
        url: &str,
        tcp: TcpStream,
        subprotocol: Option<&str>,
    ) -> (RawClient, Option<String>) {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().expect("request");
        if let Some(p) = subprotocol {
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().expect("header"));
        }
        // The client must be able to send frames larger than the server's limit.
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (ws, resp) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
            .await
            .expect("websocket handshake");
        assert_eq!(resp.status().as_u16(), 101, "handshake status");
        let chosen = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().expect("header").to_string());
        let client = RawClient {
            ws,
            pending: VecDeque::new(),
            next_id: 0,
            closed: None,
            answer_pings: true,
            pings: 0,
        };
        (client, chosen)
    }

    /// Opens a connection and authenticates it as `user`; panics unless the connect succeeds.
    pub async fn connect(server: &TestServer, user: &str) -> RawClient {
        let mut c = Self::open(server).await;
        let reply = c
            .call(json!({"connect": {"token": server.token(user, None)}}))
            .await;
        assert!(reply.get("connect").is_some(), "connect failed: {reply}");
        c
    }

    pub fn next_id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        self.ws.send(Message::text(text)).await.expect("send frame");
    }

    /// Sends `cmd` with a fresh id and returns that id.
    pub async fn send(&mut self, mut cmd: Value) -> u32 {
        let id = self.next_id();
        cmd["id"] = json!(id);
        self.send_text(cmd.to_string()).await;
        id
    }

    /// Sends a command and waits for its reply, keeping pushes for later.
    pub async fn call(&mut self, cmd: Value) -> Value {
        let id = self.send(cmd).await;
        self.reply(id).await
    }

    /// Waits for the reply with this id. Pushes and other replies that arrive first are kept.
    pub async fn reply(&mut self, id: u32) -> Value {
        let mut skipped = VecDeque::new();
        let found = loop {
            match self.next_event().await {
                Event::Msg(m) if m.get("id").and_then(Value::as_u64) == Some(u64::from(id)) => {
                    break m
                }
                Event::Msg(m) => skipped.push_back(m),
                other => panic!("waiting for reply {id}, got {other:?}; before it: {skipped:?}"),
            }
        };
        // Keep what was skipped, in order, ahead of anything still pending.
        while let Some(m) = skipped.pop_back() {
            self.pending.push_front(m);
        }
        found
    }

    /// The next publication push on `channel`, skipping other pushes (join, leave, ...).
    pub async fn publication(&mut self, channel: &str) -> Value {
        loop {
            match self.next_event().await {
                Event::Msg(m) => {
                    let push = &m["push"];
                    if push["channel"] == channel && push.get("pub").is_some() {
                        return push["pub"].clone();
                    }
                }
                other => panic!("waiting for a publication on {channel}, got {other:?}"),
            }
        }
    }

    /// The next protocol message, Close frame or end of stream; fails the test after [`STEP`].
    pub async fn next_event(&mut self) -> Event {
        match tokio::time::timeout(STEP, self.next_event_inner()).await {
            Ok(e) => e,
            Err(_) => panic!("no message from the server within {STEP:?}"),
        }
    }

    async fn next_event_inner(&mut self) -> Event {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Event::Msg(m);
            }
            if let Some(e) = &self.closed {
                return e.clone();
            }
            let event = match self.ws.next().await {
                None => Event::Ended("stream ended".into()),
                Some(Err(e)) => Event::Ended(format!("stream error: {e}")),
                Some(Ok(Message::Close(frame))) => match frame {
                    Some(f) => Event::Close(Some(u16::from(f.code)), f.reason.to_string()),
                    None => Event::Close(None, String::new()),
                },
                Some(Ok(Message::Text(text))) => {
                    for line in text.split('\n').filter(|l| !l.trim().is_empty()) {
                        let v: Value = serde_json::from_str(line)
                            .unwrap_or_else(|e| panic!("server sent invalid JSON {line:?}: {e}"));
                        if v.as_object().is_some_and(|o| o.is_empty()) {
                            // Server ping: answer it like an SDK does.
                            self.pings += 1;
                            if self.answer_pings {
                                let _ = self.ws.send(Message::text("{}")).await;
                            }
                            continue;
                        }
                        self.pending.push_back(v);
                    }
                    continue;
                }
                Some(Ok(Message::Binary(b))) => {
                    panic!("server sent a binary frame to a JSON client: {b:?}")
                }
                Some(Ok(_)) => continue, // ping/pong/raw frames
            };
            if matches!(event, Event::Close(..)) {
                // Complete the closing handshake like a real client: tungstenite has queued the
                // echo of the server's Close frame and sends it on the next write; then end our
                // side of the TCP stream, which the server waits for before it lets go.
                let _ = tokio::time::timeout(Duration::from_millis(200), self.ws.flush()).await;
                let _ = self.ws.get_mut().shutdown().await;
            }
            self.closed = Some(event.clone());
        }
    }

    /// Reads until the server closes the connection and returns the close code. Messages before
    /// the Close frame are ignored. Fails if the stream ends without a Close frame.
    pub async fn close_code(&mut self) -> u16 {
        let mut seen = 0usize;
        loop {
            match self.next_event().await {
                Event::Msg(_) => seen += 1,
                Event::Close(Some(code), _) => return code,
                other => panic!(
                    "expected a Close frame with a code, got {other:?} (after {seen} messages)"
                ),
            }
        }
    }

    /// Asserts that the next thing from the server is a Close frame with `code`, with no reply or
    /// push before it.
    pub async fn expect_close(&mut self, code: u16) {
        match self.next_event().await {
            Event::Close(Some(c), reason) => {
                assert_eq!(c, code, "close code (reason {reason:?})")
            }
            other => panic!("expected Close {code}, got {other:?}"),
        }
    }

    /// Stays connected for `dur`, answering pings and ignoring pushes; panics if the server
    /// closes the connection meanwhile.
    pub async fn idle_for(&mut self, dur: Duration) {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            match tokio::time::timeout_at(deadline, self.next_event_inner()).await {
                Err(_) => return,
                Ok(Event::Msg(_)) => continue,
                Ok(other) => panic!("a well-behaved client was disconnected: {other:?}"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The error code of a reply, or a panic naming what came instead.
pub fn error_code(reply: &Value) -> u64 {
    reply["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected an error reply, got {reply}"))
}

/// A unique channel name, so tests sharing a server never see each other's traffic.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A well-behaved client that is connected and subscribed before a test misbehaves, and proves
/// afterwards that the server kept serving it and still accepts new clients.
pub struct Bystander {
    sub: RawClient,
    channel: String,
}

impl Bystander {
    pub async fn start(server: &TestServer) -> Bystander {
        let channel = unique("bystander");
        let mut sub = RawClient::connect(server, "bystander").await;
        let reply = sub.call(json!({"subscribe": {"channel": channel}})).await;
        assert!(
            reply.get("subscribe").is_some(),
            "bystander subscribe failed: {reply}"
        );
        Bystander { sub, channel }
    }

    /// A new client connects and publishes; the bystander receives it, and so does a new
    /// subscriber.
    pub async fn check(mut self, server: &TestServer) {
        let mut fresh = RawClient::connect(server, "fresh-sub").await;
        let reply = fresh
            .call(json!({"subscribe": {"channel": self.channel}}))
            .await;
        assert!(
            reply.get("subscribe").is_some(),
            "fresh subscribe failed: {reply}"
        );
        let mut publisher = RawClient::connect(server, "fresh-pub").await;
        let data = json!({"still": "serving"});
        let reply = publisher
            .call(json!({"publish": {"channel": self.channel, "data": data}}))
            .await;
        assert!(
            reply.get("publish").is_some(),
            "publish after bad input failed: {reply}"
        );
        assert_eq!(
            self.sub.publication(&self.channel).await["data"],
            data,
            "bystander"
        );
        assert_eq!(
            fresh.publication(&self.channel).await["data"],
            data,
            "fresh subscriber"
        );
        self.sub.close().await;
        fresh.close().await;
        publisher.close().await;
    }
}

/// An HTTP client that never uses a proxy (tests talk to 127.0.0.1 only).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(STEP)
        .build()
        .expect("http client")
}

/// `POST /api/{method}` with the server's key; returns (status, body).
pub async fn api(server: &TestServer, method: &str, body: Value) -> (u16, Value) {
    let resp = http()
        .post(format!("{}/api/{method}", server.http_url()))
        .header("X-API-Key", &server.api_key)
        .json(&body)
        .send()
        .await
        .expect("api request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("api body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

// ----- helpers shared by the chat, moderation, notification and site suites -----

/// The databases to run on: SQLite always, PostgreSQL when it is there (required under CI).
pub async fn databases() -> Vec<TestDatabase> {
    let mut dbs = vec![TestDatabase::sqlite()];
    match TestDatabase::postgres().await {
        Some(db) => dbs.push(db),
        None if std::env::var_os("CI").is_some() => {
            panic!("PostgreSQL is required under CI (127.0.0.1:5432, database test)")
        }
        None => eprintln!("SKIP PostgreSQL half: no server at 127.0.0.1:5432"),
    }
    dbs
}

pub async fn connect(server: &TestServer, token: &str) -> RawClient {
    let mut c = RawClient::open(server).await;
    let r = c.call(json!({"connect": {"token": token}})).await;
    assert!(r.get("connect").is_some(), "connect: {r}");
    c
}

/// The next publication on `channel` whose data has this `type`, skipping others.
pub async fn next_of(c: &mut RawClient, channel: &str, kind: &str) -> Value {
    loop {
        let p = c.publication(channel).await;
        if p["data"]["type"] == kind {
            return p;
        }
    }
}
