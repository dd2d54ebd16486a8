//! Dialing bench connections: source address, TCP, WebSocket upgrade, then the protocol's
//! `connect` command with a freshly minted token. This also holds the setup-time
//! request/reply helper. Setup may parse JSON fully. The hot path in `wire` must not.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::wire::{self, Line};
use crate::Target;

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// How long one connection may take from TCP connect to the `connect` reply.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a setup command (such as `subscribe`) may wait for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Lifetime of minted tokens. A run that outlives it sees its connections expire.
const TOKEN_TTL_S: u64 = 3600;

/// The `{}` answer to a server ping.
pub(crate) fn pong() -> Message {
    Message::text("{}")
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

/// Everything needed to open connection number `i`. Shared by all connection tasks.
pub(crate) struct Dialer {
    url: String,
    addr: SocketAddr,
    /// Source addresses to bind, round-robin by connection number. Empty means the kernel picks.
    sources: Vec<IpAddr>,
    /// Mints connection tokens for [`Dialer::open`]. `None` when the caller brings its own
    /// tokens ([`Dialer::open_with_token`]).
    key: Option<EncodingKey>,
    config: WebSocketConfig,
    /// Kernel receive buffer (SO_RCVBUF) for each socket; `None` keeps the system default.
    recv_buffer: Option<u32>,
}

impl Dialer {
    /// Resolves the target once. `read_buffer` is tungstenite's read chunk per connection.
    /// Keep it small when holding many connections.
    pub(crate) async fn new(target: &Target, read_buffer: usize) -> anyhow::Result<Self> {
        let key = EncodingKey::from_secret(target.secret.as_bytes());
        Self::for_url(&target.url, target.sources, Some(key), read_buffer).await
    }

    /// Like [`Dialer::new`], for callers without a [`Target`]. Without `key`, only
    /// [`Dialer::open_with_token`] works.
    pub(crate) async fn for_url(
        url: &str,
        sources: u8,
        key: Option<EncodingKey>,
        read_buffer: usize,
    ) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("bad --url {url}"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some(other) => bail!("--url scheme {other} is not supported (only ws://)"),
            None => bail!("--url needs a scheme: ws://host:port/path"),
        }
        let host = uri.host().ok_or_else(|| anyhow!("--url has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .min_by_key(|a| !a.is_ipv4()) // prefer IPv4: the source addresses are 127.0.0.k
            .ok_or_else(|| anyhow!("{host} resolves to nothing"))?;
        let sources = if addr.ip().is_loopback() && addr.is_ipv4() {
            (1..=sources)
                .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, k)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Dialer {
            url: url.to_owned(),
            addr,
            sources,
            key,
            config: WebSocketConfig::default()
                .read_buffer_size(read_buffer)
                // 0: every message is written to the socket at once, with no buffer kept around.
                .write_buffer_size(0)
                .max_message_size(Some(16 << 20)),
            recv_buffer: None,
        })
    }

    /// A small kernel receive buffer, so that a connection that stops reading backs up into
    /// the server quickly (`fanout --stalled`).
    pub(crate) fn with_recv_buffer(mut self, bytes: u32) -> Self {
        self.recv_buffer = Some(bytes);
        self
    }

    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Keep a write buffer instead of writing each message at once. The publisher uses it to
    /// send all due messages with one flush.
    pub(crate) fn with_write_buffer(mut self, bytes: usize) -> Self {
        self.config = self.config.write_buffer_size(bytes);
        self
    }

    pub(crate) fn token(&self, i: usize) -> anyhow::Result<String> {
        self.token_for(&format!("bench-{i}"), TOKEN_TTL_S)
    }

    /// A connection token for user `sub` that expires in `ttl_s` seconds.
    pub(crate) fn token_for(&self, sub: &str, ttl_s: u64) -> anyhow::Result<String> {
        let exp = now_ns() / 1_000_000_000 + ttl_s;
        let key = self
            .key
            .as_ref()
            .ok_or_else(|| anyhow!("no secret to mint connection tokens with"))?;
        Ok(jsonwebtoken::encode(
            &Header::default(),
            &Claims { sub, exp },
            key,
        )?)
    }

    /// Opens connection `i` with a minted token and completes the protocol `connect` handshake.
    pub(crate) async fn open(&self, i: usize) -> anyhow::Result<Ws> {
        let token = self.token(i)?;
        self.open_with_token(i, &token).await
    }

    /// Opens connection `i` (which picks its source address) and connects with `token`.
    pub(crate) async fn open_with_token(&self, i: usize, token: &str) -> anyhow::Result<Ws> {
        tokio::time::timeout(OPEN_TIMEOUT, self.open_inner(i, token))
            .await
            .map_err(|_| anyhow!("connect timed out after {OPEN_TIMEOUT:?}"))?
    }

    /// Opens connection `i` to `url` with no protocol handshake: TCP and the WebSocket upgrade
    /// only, for protocols other than Centrifugo's (`bench docs` speaks y-websocket). `url` must
    /// name the dialer's host and port; only its path and query may differ.
    pub(crate) async fn open_ws(&self, i: usize, url: &str) -> anyhow::Result<Ws> {
        tokio::time::timeout(OPEN_TIMEOUT, self.upgrade(i, url))
            .await
            .map_err(|_| anyhow!("connect timed out after {OPEN_TIMEOUT:?}"))?
    }

    async fn open_inner(&self, i: usize, token: &str) -> anyhow::Result<Ws> {
        let mut ws = self.upgrade(i, &self.url).await?;
        let connect = serde_json::json!({
            "id": 1,
            "connect": {"token": token, "name": "bench"}
        });
        request_reply(&mut ws, 1, connect.to_string(), "connect").await?;
        Ok(ws)
    }

    async fn upgrade(&self, i: usize, url: &str) -> anyhow::Result<Ws> {
        let socket = TcpSocket::new_v4()
            .or_else(|_| TcpSocket::new_v6())
            .context("socket")?;
        if let Some(bytes) = self.recv_buffer {
            socket.set_recv_buffer_size(bytes).context("SO_RCVBUF")?;
        }
        if !self.sources.is_empty() {
            let src = self.sources[i % self.sources.len()];
            socket
                .bind(SocketAddr::new(src, 0))
                .with_context(|| format!("bind {src}"))?;
        }
        let stream = socket.connect(self.addr).await.context("tcp connect")?;
        stream.set_nodelay(true)?;
        let request = url.into_client_request()?;
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(self.config))
                .await
                .context("websocket upgrade")?;
        Ok(ws)
    }
}

/// Sends one command and waits for the reply with `id`. Answers pings while waiting, and
/// ignores pushes that arrive before the reply.
pub(crate) async fn request_reply(
    ws: &mut Ws,
    id: u32,
    command: String,
    method: &str,
) -> anyhow::Result<serde_json::Value> {
    ws.send(Message::text(command))
        .await
        .with_context(|| format!("sending {method}"))?;
    tokio::time::timeout(REPLY_TIMEOUT, async {
        loop {
            let msg = match ws.next().await {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => bail!("waiting for {method} reply: {e}"),
                None => bail!("connection ended before the {method} reply"),
            };
            let frame = match &msg {
                Message::Text(t) => t.as_bytes(),
                Message::Binary(b) => &b[..],
                Message::Close(Some(c)) => {
                    bail!(
                        "server closed with {} {:?} before the {method} reply",
                        c.code,
                        c.reason.as_str()
                    )
                }
                Message::Close(None) => bail!("server closed before the {method} reply"),
                _ => continue,
            };
            let mut pinged = false;
            let mut reply = None;
            for line in wire::lines(frame) {
                match wire::classify(line) {
                    Line::Ping => pinged = true,
                    Line::Pub(_) => {}
                    Line::Other if reply.is_none() => {
                        let v: serde_json::Value =
                            serde_json::from_slice(line).with_context(|| {
                                format!("bad JSON from server: {}", String::from_utf8_lossy(line))
                            })?;
                        if v.get("id").and_then(|v| v.as_u64()) == Some(u64::from(id)) {
                            reply = Some(v);
                        }
                    }
                    Line::Other => {}
                }
            }
            if pinged {
                ws.send(pong()).await?;
            }
            if let Some(v) = reply {
                if let Some(err) = v.get("error") {
                    bail!("{method} failed: {err}");
                }
                return v
                    .get(method)
                    .cloned()
                    .ok_or_else(|| anyhow!("unexpected {method} reply: {v}"));
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no {method} reply within {REPLY_TIMEOUT:?}"))?
}

/// The outcome of [`open_all`]. `tasks` holds one task per connected client.
pub(crate) struct Opened {
    pub tasks: JoinSet<()>,
    pub connected: usize,
    pub failed: usize,
    pub errors: ErrorSample,
}

/// Opens `n` clients with at most `concurrency` setups in flight. `setup(i)` dials and prepares
/// client `i`, usually returning its [`Ws`] (`bench docs` returns the connection with its
/// document). Then `run(i, client)` drives it in its own task until it ends. This returns once
/// every setup has succeeded or failed. The clients keep running in the returned tasks.
pub(crate) async fn open_all<T, S, SF, R, RF>(
    n: usize,
    concurrency: usize,
    setup: S,
    run: R,
) -> Opened
where
    T: Send + 'static,
    S: Fn(usize) -> SF + Send + Sync + 'static,
    SF: Future<Output = anyhow::Result<T>> + Send + 'static,
    R: Fn(usize, T) -> RF + Send + Sync + 'static,
    RF: Future<Output = ()> + Send + 'static,
{
    let concurrency = concurrency.max(1);
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(concurrency);
    let in_flight = Arc::new(Semaphore::new(concurrency));
    let (setup, run) = (Arc::new(setup), Arc::new(run));
    // Spawning runs in its own task so that results are drained while it waits for permits.
    let spawner = tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            let (setup, run, ready) = (setup.clone(), run.clone(), ready_tx.clone());
            tasks.spawn(async move {
                let ws = setup(i).await;
                drop(permit);
                match ws {
                    Ok(ws) => {
                        let _ = ready.send(Ok(())).await;
                        run(i, ws).await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e)).await;
                    }
                }
            });
        }
        tasks
    });
    let (mut connected, mut failed, mut errors) = (0, 0, ErrorSample::default());
    while let Some(result) = ready_rx.recv().await {
        match result {
            Ok(()) => connected += 1,
            Err(e) => {
                failed += 1;
                errors.add(&e);
            }
        }
        if connected + failed == n {
            break;
        }
    }
    let tasks = match spawner.await {
        Ok(tasks) => tasks,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    Opened {
        tasks,
        connected,
        failed,
        errors,
    }
}

/// The first few distinct error messages, each with how often it occurred, for the report.
/// Messages carry no connection number, so that 19k identical failures collapse into one entry.
#[derive(Default)]
pub(crate) struct ErrorSample(Vec<(String, u64)>);

impl ErrorSample {
    const KEEP: usize = 5;

    pub(crate) fn add(&mut self, e: &anyhow::Error) {
        self.add_n(format!("{e:#}"), 1);
    }

    fn add_n(&mut self, msg: String, n: u64) {
        if let Some(entry) = self.0.iter_mut().find(|(m, _)| *m == msg) {
            entry.1 += n;
        } else if self.0.len() < Self::KEEP {
            self.0.push((msg, n));
        }
    }

    pub(crate) fn extend(&mut self, other: ErrorSample) {
        for (msg, n) in other.0 {
            self.add_n(msg, n);
        }
    }

    /// `"message"`, or `"message (xN)"` when it occurred N > 1 times.
    pub(crate) fn snapshot(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(m, n)| {
                if *n > 1 {
                    format!("{m} (x{n})")
                } else {
                    m.clone()
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[tokio::test]
    async fn mints_tokens_the_server_can_check() {
        let target = Target {
            url: "ws://127.0.0.1:9/connection/websocket".into(),
            secret: "s3cret".into(),
            server_pid: None,
            sources: 3,
        };
        let d = Dialer::new(&target, 4096).await.unwrap();
        assert_eq!(d.sources.len(), 3);
        assert_eq!(d.port(), 9);
        let token = d.token(7).unwrap();
        #[derive(serde::Deserialize)]
        struct C {
            sub: String,
            exp: u64,
        }
        let got = jsonwebtoken::decode::<C>(
            &token,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::new(jsonwebtoken::Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(got.claims.sub, "bench-7");
        assert!(got.claims.exp > now_ns() / 1_000_000_000 + 3500);
    }

    #[test]
    fn error_sample_counts_repeats() {
        let mut a = ErrorSample::default();
        for _ in 0..3 {
            a.add(&anyhow!("refused"));
        }
        a.add(&anyhow!("timeout").context("connect"));
        let mut b = ErrorSample::default();
        b.add(&anyhow!("refused"));
        for i in 0..10 {
            b.add(&anyhow!("distinct {i}"));
        }
        a.extend(b);
        assert_eq!(
            a.snapshot(),
            [
                "refused (x4)",
                "connect: timeout",
                "distinct 0",
                "distinct 1",
                "distinct 2"
            ]
        );
    }

    #[tokio::test]
    async fn rejects_unsupported_urls() {
        let mut target = Target {
            url: "wss://127.0.0.1/x".into(),
            secret: "s".into(),
            server_pid: None,
            sources: 1,
        };
        assert!(Dialer::new(&target, 4096).await.is_err());
        target.url = "127.0.0.1:8000".into();
        assert!(Dialer::new(&target, 4096).await.is_err());
    }
}
