//! The node's one subscribed connection to Redis and the task that owns it.
//!
//! The task keeps the set of keys the node wants. It reads frames straight off the socket and
//! hands each message to [`Deliver`] before reading the next, so no queue sits between Redis and
//! the handler. When the connection drops it reconnects with backoff, subscribes the whole set
//! again, waits for every confirmation and only then reports the reconnect.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::resp::{take_frame, Frame};
use super::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};

/// First reconnect delay; doubles per failed attempt up to [`MAX_BACKOFF`], with jitter.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A quiet connection is pinged this often; no bytes for this plus [`RESPONSE_TIMEOUT`] means
/// it is dead (a half-open TCP connection never reports EOF).
const PING_INTERVAL: Duration = Duration::from_secs(3);
/// Keys per SUBSCRIBE when the whole set is restored.
const RESUBSCRIBE_CHUNK: usize = 512;
/// Reads ask for at least this much room in the buffer.
const READ_CHUNK: usize = 16 * 1024;
/// Requests coalesced into one write.
const MAX_BATCH: usize = 256;

/// Where the subscribed connection goes, and how it introduces itself.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) addr: Addr,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// CLIENT SETNAME, so operators (and tests) can find this connection in CLIENT LIST.
    pub(crate) client_name: String,
}

#[derive(Debug, Clone)]
pub(crate) enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
}

/// What the task does with what it reads. Called on the task; must not block.
pub(crate) trait Deliver: Send + Sync + 'static {
    fn message(&self, key: &[u8], payload: Bytes);
    /// The connection was lost and is back with every wanted key subscribed again.
    fn reconnected(&self);
}

pub(crate) enum Request {
    /// Answered once Redis confirmed the subscription (possibly after a reconnect).
    Subscribe(Vec<u8>, oneshot::Sender<()>),
    /// Answered at once: messages for the key are dropped from then on.
    Unsubscribe(Vec<u8>, oneshot::Sender<()>),
}

pub(crate) struct Conn {
    reader: Box<dyn AsyncRead + Send + Unpin>,
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    buf: BytesMut,
}

/// Connects, authenticates and names the connection, within [`CONNECT_TIMEOUT`].
pub(crate) async fn open(target: &Target) -> Result<Conn, String> {
    match timeout(CONNECT_TIMEOUT, open_inner(target)).await {
        Ok(r) => r,
        Err(_) => Err("timed out connecting".into()),
    }
}

async fn open_inner(target: &Target) -> Result<Conn, String> {
    let (reader, writer): (
        Box<dyn AsyncRead + Send + Unpin>,
        Box<dyn AsyncWrite + Send + Unpin>,
    ) = match &target.addr {
        Addr::Tcp(host, port) => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| e.to_string())?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        #[cfg(unix)]
        Addr::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| e.to_string())?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        #[cfg(not(unix))]
        Addr::Unix(_) => return Err("unix sockets are not supported here".into()),
    };
    let mut conn = Conn {
        reader,
        writer,
        buf: BytesMut::with_capacity(READ_CHUNK),
    };
    let mut hello = Vec::new();
    let mut replies = 1;
    if let Some(password) = &target.password {
        let mut auth = ::redis::cmd("AUTH");
        if let Some(user) = &target.username {
            auth.arg(user);
        }
        hello.extend(auth.arg(password).get_packed_command());
        replies += 1;
    }
    hello.extend(
        ::redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&target.client_name)
            .get_packed_command(),
    );
    conn.writer
        .write_all(&hello)
        .await
        .map_err(|e| e.to_string())?;
    while replies > 0 {
        match conn.next_frame().await? {
            Frame::Simple(_) => replies -= 1,
            Frame::Error(e) => return Err(String::from_utf8_lossy(&e).into_owned()),
            other => return Err(format!("unexpected reply to the handshake: {other:?}")),
        }
    }
    Ok(conn)
}

impl Conn {
    /// Reads until a whole frame is buffered (handshake only: not cancel-safe across frames).
    async fn next_frame(&mut self) -> Result<Frame, String> {
        loop {
            if let Some(f) = take_frame(&mut self.buf).map_err(|e| e.to_string())? {
                return Ok(f);
            }
            self.buf.reserve(READ_CHUNK);
            match self.reader.read_buf(&mut self.buf).await {
                Ok(0) => return Err("connection closed by the server".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        match timeout(RESPONSE_TIMEOUT, self.writer.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out writing".into()),
        }
    }
}

enum Exit {
    Shutdown,
    Lost(String),
}

pub(crate) struct Task<D> {
    target: Target,
    deliver: Arc<D>,
    requests: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
    /// Keys the node wants, whether or not the connection is up.
    wanted: HashSet<Vec<u8>>,
    /// Subscribe calls waiting for their key's confirmation.
    waiters: HashMap<Vec<u8>, Vec<oneshot::Sender<()>>>,
    /// After a reconnect: keys whose confirmation is still to come before the node is told.
    restoring: Option<HashSet<Vec<u8>>>,
    /// Whether the last loss was logged, so a flapping connection warns once, not per retry.
    healthy: bool,
}

impl<D: Deliver> Task<D> {
    pub(crate) fn new(
        target: Target,
        deliver: Arc<D>,
        requests: mpsc::Receiver<Request>,
        shutdown: CancellationToken,
    ) -> Self {
        Task {
            target,
            deliver,
            requests,
            shutdown,
            wanted: HashSet::new(),
            waiters: HashMap::new(),
            restoring: None,
            healthy: true,
        }
    }

    /// Serves `first` and every connection after it until shutdown (or until the engine, the
    /// only sender of requests, is dropped).
    pub(crate) async fn run(mut self, first: Conn) {
        let mut conn = Some(first);
        let mut backoff = MIN_BACKOFF;
        let mut attempts = 0u32;
        loop {
            if let Some(c) = conn.take() {
                match self.serve(c).await {
                    Exit::Shutdown => return,
                    Exit::Lost(reason) => {
                        if self.healthy {
                            tracing::warn!(
                                subscriptions = self.wanted.len(),
                                "redis pub/sub connection lost ({reason}); reconnecting"
                            );
                        } else {
                            tracing::debug!("redis pub/sub connection lost again ({reason})");
                        }
                        self.healthy = false;
                        self.restoring = None;
                    }
                }
            }
            let half = backoff / 2;
            let jitter = rand::random_range(0..=half.as_millis() as u64);
            let deadline = Instant::now() + half + Duration::from_millis(jitter);
            // Keep answering requests while waiting, so callers see their own timeout and
            // shutdown is prompt.
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    req = self.requests.recv() => match req {
                        Some(r) => self.offline(r),
                        None => return,
                    },
                    _ = sleep_until(deadline) => break,
                }
            }
            attempts += 1;
            let opened = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = open(&self.target) => r,
            };
            match opened {
                Ok(mut c) => {
                    self.waiters.retain(|_, w| {
                        w.retain(|tx| !tx.is_closed());
                        !w.is_empty()
                    });
                    let keys: Vec<&Vec<u8>> = self.wanted.iter().collect();
                    let mut out = Vec::new();
                    for chunk in keys.chunks(RESUBSCRIBE_CHUNK) {
                        out.extend(::redis::cmd("SUBSCRIBE").arg(chunk).get_packed_command());
                    }
                    if let Err(e) = c.write(&out).await {
                        tracing::debug!(attempts, "redis pub/sub resubscribe failed: {e}");
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                    tracing::debug!(attempts, "redis pub/sub reconnected; resubscribing");
                    self.restoring = Some(self.wanted.clone());
                    self.check_restored();
                    backoff = MIN_BACKOFF;
                    attempts = 0;
                    conn = Some(c);
                }
                Err(e) => {
                    tracing::debug!(attempts, "redis pub/sub reconnect failed: {e}");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn serve(&mut self, mut c: Conn) -> Exit {
        let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        // Frames may already be buffered (read along with the handshake).
        if let Err(e) = self.drain(&mut c.buf) {
            return Exit::Lost(e);
        }
        loop {
            c.buf.reserve(READ_CHUNK);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Exit::Shutdown,
                r = c.reader.read_buf(&mut c.buf) => {
                    match r {
                        Ok(0) => return Exit::Lost("connection closed by the server".into()),
                        Err(e) => return Exit::Lost(e.to_string()),
                        Ok(_) => last_read = Instant::now(),
                    }
                    if let Err(e) = self.drain(&mut c.buf) {
                        return Exit::Lost(e);
                    }
                }
                req = self.requests.recv() => {
                    let Some(first) = req else { return Exit::Shutdown };
                    let mut out = Vec::new();
                    self.online(first, &mut out);
                    for _ in 1..MAX_BATCH {
                        match self.requests.try_recv() {
                            Ok(r) => self.online(r, &mut out),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = c.write(&out).await {
                        return Exit::Lost(e);
                    }
                }
                _ = ping.tick() => {
                    if last_read.elapsed() >= PING_INTERVAL + RESPONSE_TIMEOUT {
                        return Exit::Lost("no reply to PING".into());
                    }
                    if let Err(e) = c.write(b"*1\r\n$4\r\nPING\r\n").await {
                        return Exit::Lost(e);
                    }
                }
            }
        }
    }

    fn drain(&mut self, buf: &mut BytesMut) -> Result<(), String> {
        while let Some(frame) = take_frame(buf).map_err(|e| e.to_string())? {
            self.frame(frame)?;
        }
        Ok(())
    }

    fn frame(&mut self, frame: Frame) -> Result<(), String> {
        let items = match frame {
            Frame::Array(items) => items,
            // +OK, +PONG (a PING before the first SUBSCRIBE).
            Frame::Simple(_) => return Ok(()),
            Frame::Error(e) => {
                return Err(format!(
                    "redis error on the pub/sub connection: {}",
                    String::from_utf8_lossy(&e)
                ))
            }
            other => {
                tracing::debug!(?other, "unexpected frame on the redis pub/sub connection");
                return Ok(());
            }
        };
        let kind = items.first().and_then(Frame::as_bytes).map(|b| &b[..]);
        match (kind, items.get(1).and_then(Frame::as_bytes)) {
            (Some(b"message"), Some(key)) if items.len() == 3 => {
                if let (true, Some(payload)) = (self.wanted.contains(&key[..]), items[2].as_bytes())
                {
                    self.deliver.message(key, payload.clone());
                }
            }
            (Some(b"subscribe"), Some(key)) => {
                for tx in self.waiters.remove(&key[..]).unwrap_or_default() {
                    let _ = tx.send(());
                }
                if let Some(r) = &mut self.restoring {
                    r.remove(&key[..]);
                    self.check_restored();
                }
            }
            (Some(b"unsubscribe" | b"pong"), _) => {}
            _ => tracing::debug!(?items, "unexpected frame on the redis pub/sub connection"),
        }
        Ok(())
    }

    fn check_restored(&mut self) {
        if self.restoring.as_ref().is_some_and(HashSet::is_empty) {
            self.restoring = None;
            self.healthy = true;
            tracing::info!(
                subscriptions = self.wanted.len(),
                "redis pub/sub connection restored"
            );
            self.deliver.reconnected();
        }
    }

    fn online(&mut self, req: Request, out: &mut Vec<u8>) {
        match req {
            Request::Subscribe(key, tx) => {
                out.extend(::redis::cmd("SUBSCRIBE").arg(&key).get_packed_command());
                self.waiters.entry(key.clone()).or_default().push(tx);
                self.wanted.insert(key);
            }
            Request::Unsubscribe(key, tx) => {
                out.extend(::redis::cmd("UNSUBSCRIBE").arg(&key).get_packed_command());
                if let Some(r) = &mut self.restoring {
                    r.remove(&key);
                }
                self.wanted.remove(&key);
                self.check_restored();
                let _ = tx.send(());
            }
        }
    }

    fn offline(&mut self, req: Request) {
        match req {
            // Subscribed (and answered) when the connection is back.
            Request::Subscribe(key, tx) => {
                let w = self.waiters.entry(key.clone()).or_default();
                w.retain(|tx| !tx.is_closed());
                w.push(tx);
                self.wanted.insert(key);
            }
            Request::Unsubscribe(key, tx) => {
                self.wanted.remove(&key);
                self.waiters.remove(&key);
                let _ = tx.send(());
            }
        }
    }
}
