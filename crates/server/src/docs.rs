//! `GET /docs/{doc_id}?token=JWT`: the y-websocket endpoint for collaborative documents.
//!
//! The stock provider connects with `new WebsocketProvider('ws://HOST/docs', docId, ydoc,
//! {params: {token}})`. Every check happens after the upgrade, so that a refusal reaches
//! the provider as a close code it understands (4401 bad token, 4403 after the auth
//! permission-denied message, 4404 unknown document: terminal for y-websocket 3.1) rather
//! than as a failed handshake it would retry forever.
//!
//! A connection is one task and the same [`Conn`] outbound path as a Centrifugo connection
//! (bounded; a client that does not read is closed with 3008 and re-syncs when it
//! reconnects). Its protocol state is a [`DocConnection`]; this module only moves frames.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, Request, State};
use axum::response::Response;
use futures_util::StreamExt;
use switchboard_collab::codec::{self, CloseCode};
use switchboard_collab::{Access, DocSink, Outgoing};
use switchboard_protocol::codes::Disconnect;
use switchboard_store::DocRole;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::Message;

use crate::conn::{finish, Conn, ConnIo, READ_BUFFER_BYTES};
use crate::node::Node;
use crate::ws;

pub async fn websocket(
    State(node): State<Arc<Node>>,
    Path(doc_ref): Path<String>,
    Query(mut query): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let token = query.remove("token");
    crate::server::upgrade(node, req, &[], move |node, stream, prefix| {
        run(node, stream, prefix, doc_ref, token)
    })
}

fn disconnect(c: CloseCode) -> Disconnect {
    Disconnect {
        code: c.code,
        reason: c.reason,
    }
}

/// The transport half of a document connection.
struct ConnSink(Arc<Conn>);

impl DocSink for ConnSink {
    fn send(&self, msg: &Outgoing) {
        self.0.send_raw(msg.framed(ws::binary_frame).clone());
    }

    fn close(&self, code: CloseCode) {
        self.0.close(disconnect(code));
    }
}

/// Who is connecting, with which access; or the code to close with.
async fn authorize(
    node: &Node,
    conn: &Conn,
    doc_ref: &str,
    token: Option<&str>,
) -> Result<(i64, String, Access), CloseCode> {
    let claims = token
        .and_then(|t| node.verifier.verify_connect(t).ok())
        .ok_or(codec::CLOSE_UNAUTHORIZED)?;
    let user_id: i64 = claims.sub.parse().map_err(|_| codec::CLOSE_UNAUTHORIZED)?;
    let doc_id: i64 = doc_ref.parse().map_err(|_| codec::CLOSE_NOT_FOUND)?;
    let role = node
        .store
        .document_role(doc_id, user_id)
        .await
        .map_err(|_| codec::CLOSE_UNAVAILABLE)?;
    match role {
        Some(DocRole::Owner | DocRole::Editor) => Ok((doc_id, claims.sub, Access::Edit)),
        Some(DocRole::Viewer) => Ok((doc_id, claims.sub, Access::View)),
        None => match node.store.document(doc_id).await {
            // Admins may do what an owner may, here as over REST.
            Ok(Some(_)) if is_admin(node, user_id).await => Ok((doc_id, claims.sub, Access::Edit)),
            Ok(Some(_)) => {
                let denied = codec::permission_denied("you have no access to this document");
                conn.send_raw(ws::binary_frame(&denied));
                Err(codec::CLOSE_FORBIDDEN)
            }
            Ok(None) => Err(codec::CLOSE_NOT_FOUND),
            Err(_) => Err(codec::CLOSE_UNAVAILABLE),
        },
    }
}

async fn is_admin(node: &Node, user_id: i64) -> bool {
    matches!(node.store.user_by_id(user_id).await, Ok(Some(u)) if u.role == switchboard_store::UserRole::Admin)
}

async fn run(
    node: Arc<Node>,
    stream: TcpStream,
    prefix: Vec<u8>,
    doc_ref: String,
    token: Option<String>,
) {
    let id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
    let conn = Arc::new(Conn::new(
        id.clone(),
        stream,
        node.config.client.write_queue_max_bytes,
        node.metrics.clone(),
    ));
    node.connections.fetch_add(1, Ordering::Relaxed);
    let docs = &node.config.docs;
    // A frame may carry an update of max_update_bytes plus its few header bytes.
    let max_frame = docs.max_update_bytes + 64;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    let io = ConnIo { conn: conn.clone() };
    let mut ws = Box::pin(WebSocketStream::from_partially_read(
        io,
        prefix,
        Role::Server,
        Some(config),
    ))
    .await;

    let close = match authorize(&node, &conn, &doc_ref, token.as_deref()).await {
        Err(code) => {
            tracing::info!(client = %id, doc = %doc_ref, code = code.code, "document connection refused");
            Some(code)
        }
        Ok((doc_id, user, access)) => {
            let sink = Arc::new(ConnSink(conn.clone()));
            match node.collab.connect(doc_id, &user, access, sink).await {
                Err(e) => {
                    tracing::warn!(client = %id, doc = doc_id, error = %e, "cannot open document");
                    Some(e.close_code())
                }
                Ok(session) => serve(&node, &conn, &mut ws, session, &id, &user).await,
            }
        }
    };
    if let Some(code) = close {
        Box::pin(finish(&conn, disconnect(code))).await;
    }
    node.connections.fetch_sub(1, Ordering::Relaxed);
}

/// Moves frames between the socket and the session until one side ends. Returns the code to
/// close with, or `None` when the peer is gone.
async fn serve(
    node: &Node,
    conn: &Arc<Conn>,
    ws: &mut WebSocketStream<ConnIo>,
    mut session: switchboard_collab::DocConnection,
    id: &str,
    user: &str,
) -> Option<CloseCode> {
    let docs = &node.config.docs;
    let mut heartbeat = tokio::time::interval(docs.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut last_heard = Instant::now();
    let doc = session.doc_id();
    let end = loop {
        let backlog = conn.has_backlog();
        tokio::select! {
            biased;
            _ = node.shutdown.cancelled() => break Some(codec::CLOSE_SHUTDOWN),
            _ = conn.wake.notified() => {
                if let Some(d) = conn.closing() {
                    // Closed by the document (deleted, access changed) or by the outbound
                    // path's overflow policy.
                    break Some(CloseCode { code: d.code, reason: d.reason });
                }
                if conn.broken() {
                    break None;
                }
            }
            w = conn.stream.writable(), if backlog => {
                if w.is_err() || conn.flush().is_err() {
                    break None;
                }
            }
            msg = ws.next() => {
                last_heard = Instant::now();
                match msg {
                    Some(Ok(Message::Binary(frame))) => {
                        if let Err(code) = session.handle(&frame) {
                            tracing::info!(client = %id, user, doc, code = code.code, reason = code.reason, "closing document connection: bad input");
                            break Some(code);
                        }
                    }
                    Some(Ok(Message::Text(_))) => {
                        tracing::info!(client = %id, user, doc, "closing: text frame on a y-websocket connection");
                        break Some(codec::CLOSE_MALFORMED);
                    }
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Ok(_)) => {}
                    Some(Err(tungstenite::Error::Capacity(_))) => {
                        tracing::info!(client = %id, user, doc, "closing: frame over the size limit");
                        break Some(codec::CLOSE_TOO_LARGE);
                    }
                    Some(Err(e)) => {
                        tracing::debug!(client = %id, error = %e, "read failed");
                        break None;
                    }
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() >= docs.idle_timeout {
                    break Some(codec::CLOSE_TIMEOUT);
                }
                session.heartbeat();
                // A Ping too: browsers and `ws` answer it, which proves the peer is there
                // even when it has nothing to say.
                conn.send_raw(ws::ping_frame());
            }
        }
    };
    drop(session);
    tracing::debug!(client = %id, user, doc, code = end.map(|c| c.code), "document connection closed");
    end
}
