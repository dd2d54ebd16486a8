//! Client connections: the upgrade hand-off, one task per connection, and its shutdown.
//!
//! A connection is one task and one shared [`Conn`]. The task reads frames (through
//! tungstenite, over [`ConnIo`]), runs commands, keeps the ping/pong and expiry timers, writes
//! backlog when the socket drains, and closes. Everything written goes through `Conn`'s ordered
//! outbound path, including tungstenite's own control frames. Nothing else is allocated per
//! connection while it is idle: no channel, no writer task.

pub mod outbound;
mod session;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use switchboard_protocol::codes::{self, Disconnect};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::Message;

pub use outbound::{Conn, Control};
use session::Session;
pub use session::{history_filter, publish_options};

use crate::node::Node;
use crate::ws;

/// How long a closing connection may take to write its last bytes and Close frame.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the peer to finish after our Close frame before dropping the socket.
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Initial read buffer: small, because most connections are idle most of the time. A typical
/// `connect` with its JWT fits; tungstenite grows the buffer to a frame's length once it has
/// read the frame header, so large frames still arrive in one read.
pub(crate) const READ_BUFFER_BYTES: usize = 512;

/// Reads from the shared socket for tungstenite; routes its writes (pongs, close replies)
/// into the connection's ordered outbound path.
pub(crate) struct ConnIo {
    pub(crate) conn: Arc<Conn>,
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.conn.stream.poll_read_ready(cx))?;
            match self.conn.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.conn.send_raw(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// How a connection ended.
enum End {
    /// We close with this code.
    Close(Disconnect),
    /// The peer closed or the socket failed: nothing more to send.
    Gone,
}

/// Runs one WebSocket connection to the end. `prefix` holds bytes read past the HTTP request.
pub async fn run(node: Arc<Node>, stream: TcpStream, prefix: Vec<u8>) {
    let id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
    let metrics = node.metrics.clone();
    let conn = Arc::new(Conn::new(
        id.clone(),
        stream,
        node.config.client.write_queue_max_bytes,
        metrics.clone(),
    ));
    node.connections.fetch_add(1, Ordering::Relaxed);
    metrics.connections.inc();
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(node.config.client.max_frame_size))
        .max_frame_size(Some(node.config.client.max_frame_size));
    let io = ConnIo { conn: conn.clone() };
    let mut ws = Box::pin(WebSocketStream::from_partially_read(
        io,
        prefix,
        Role::Server,
        Some(config),
    ))
    .await;
    let mut session = Session::new(node.clone(), conn.clone());
    let timer = tokio::time::sleep_until(session.next_deadline().into());
    tokio::pin!(timer);

    let end = loop {
        let backlog = conn.has_backlog();
        tokio::select! {
            biased;
            _ = node.shutdown.cancelled() => break End::Close(codes::DISCONNECT_SHUTDOWN),
            _ = conn.wake.notified() => {
                if let Some(d) = conn.closing() {
                    break End::Close(d);
                }
                if conn.broken() {
                    break End::Gone;
                }
                for c in conn.take_control() {
                    Box::pin(session.handle_control(c)).await;
                }
            }
            w = conn.stream.writable(), if backlog => {
                if w.is_err() || conn.flush().is_err() {
                    break End::Gone;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    // Boxed: command handling is large and short-lived; an idle connection's
                    // task should not carry its state (see BENCHMARKS.md, memory per connection).
                    let handled = corked(&conn, Box::pin(session.handle_frame(text.as_str())));
                    if let Err(d) = handled.await {
                        break End::Close(d);
                    }
                    timer.as_mut().reset(session.next_deadline().into());
                }
                Some(Ok(Message::Binary(_))) => {
                    tracing::info!(client = %id, "closing: binary frame on a JSON connection");
                    break End::Close(codes::DISCONNECT_BAD_REQUEST);
                }
                Some(Ok(Message::Close(_))) | None => break End::Gone,
                Some(Ok(_)) => {}
                Some(Err(tungstenite::Error::Capacity(_))) => {
                    tracing::info!(client = %id, "closing: frame over the size limit");
                    break End::Close(codes::DISCONNECT_MESSAGE_TOO_BIG);
                }
                Some(Err(e)) => {
                    tracing::debug!(client = %id, error = %e, "read failed");
                    break End::Gone;
                }
            },
            _ = &mut timer => {
                if let Err(d) = session.on_timer() {
                    break End::Close(d);
                }
                timer.as_mut().reset(session.next_deadline().into());
            }
        }
    };

    Box::pin(session.cleanup()).await;
    let code = match end {
        End::Close(d) => {
            Box::pin(finish(&conn, d)).await;
            d.code
        }
        End::Gone => codes::DISCONNECT_NORMAL.code,
    };
    metrics
        .disconnects
        .with_label_values(&[&code.to_string()])
        .inc();
    metrics.connections.dec();
    node.connections.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(client = %id, user = session.user().unwrap_or(""), code, "connection closed");
}

/// Runs `commands` (a client frame's) with the connection corked, for at most
/// [`outbound::CORK_MAX`]: pushes that arrive meanwhile go out with the replies, in one write.
async fn corked<F: Future>(conn: &Conn, mut commands: Pin<Box<F>>) -> F::Output {
    conn.cork();
    let out = match tokio::time::timeout(outbound::CORK_MAX, &mut commands).await {
        Ok(out) => out,
        Err(_) => {
            conn.uncork();
            commands.await
        }
    };
    conn.uncork();
    out
}

/// Writes what is pending and the Close frame, then drains the peer until it closes.
pub(crate) async fn finish(conn: &Conn, d: Disconnect) {
    let deadline = tokio::time::Instant::now() + CLOSE_WRITE_TIMEOUT;
    conn.send_close(ws::close_frame(d));
    loop {
        match conn.flush() {
            Ok(true) => break,
            Ok(false) => {}
            Err(_) => return,
        }
        if tokio::time::timeout_at(deadline, conn.stream.writable())
            .await
            .is_err()
        {
            return;
        }
    }
    // Our FIN tells the peer we are done (RFC 6455: the server closes TCP first), so it closes
    // its side at once instead of waiting. Then read until it does: Linux resets a socket
    // closed with unread input, which can destroy the Close frame in flight.
    let _ = socket2::SockRef::from(&conn.stream).shutdown(std::net::Shutdown::Write);
    let drain = async {
        let mut buf = [0u8; 512];
        loop {
            if conn.stream.readable().await.is_err() {
                return;
            }
            match conn.stream.try_read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_DRAIN_TIMEOUT, drain).await;
}
