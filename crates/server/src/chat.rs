//! The chat service on the wire: the `chat` namespace's owner (channel `chat:{room_id}`) and the
//! `chat.*` RPC methods. Connection users are store user ids (`sub` of the token).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;
use switchboard_chat::{Chat, ChatError, Send};
use switchboard_hub::{BrokerError, HistoryFilter, HistoryPage};
use switchboard_protocol::codes::{self, ErrorCode};
use switchboard_protocol::RawValue;
use switchboard_store::{EventKind, UserRole};

use crate::node::{ChannelOwner, Node, RpcContext, RpcHandler};

/// The namespace chat rooms live in.
pub const NAMESPACE: &str = "chat";

/// Protocol code for a chat failure. Store outages are temporary (100), so SDKs retry.
pub fn error_code(e: &ChatError) -> ErrorCode {
    match e {
        ChatError::NotFound => codes::ERROR_UNKNOWN_CHANNEL,
        ChatError::Forbidden | ChatError::Muted => codes::ERROR_PERMISSION_DENIED,
        ChatError::Invalid(_) | ChatError::Conflict(_) => codes::ERROR_BAD_REQUEST,
        ChatError::Unavailable => codes::ERROR_INTERNAL,
        ChatError::Internal(detail) => {
            tracing::error!(error = %detail, "chat: internal error");
            codes::ERROR_INTERNAL
        }
    }
}

fn user_id(user: &str) -> Result<i64, ErrorCode> {
    user.parse().map_err(|_| codes::ERROR_PERMISSION_DENIED)
}

/// The `data` of a client publish to `chat:{room}`, and of `chat.send` (next to `room`).
#[derive(Deserialize)]
struct SendBody {
    text: String,
    #[serde(default)]
    client_msg_id: Option<String>,
    #[serde(default)]
    reply_to: Option<i64>,
}

impl From<SendBody> for Send {
    fn from(b: SendBody) -> Send {
        Send {
            text: b.text,
            client_msg_id: b.client_msg_id,
            reply_to: b.reply_to,
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(data: Option<&RawValue>) -> Result<T, ErrorCode> {
    let raw = data.map_or("null", |d| d.get());
    serde_json::from_str(raw).map_err(|_| codes::ERROR_BAD_REQUEST)
}

fn raw(v: serde_json::Value) -> Option<Box<RawValue>> {
    Some(serde_json::value::to_raw_value(&v).expect("JSON values serialize"))
}

struct Owner(Chat);

#[async_trait]
impl ChannelOwner for Owner {
    async fn can_subscribe(&self, user: &str, channel: &str) -> Result<(), ErrorCode> {
        let room = Chat::room_of(channel).ok_or(codes::ERROR_UNKNOWN_CHANNEL)?;
        self.0
            .member(room, user_id(user)?)
            .await
            .map(|_| ())
            .map_err(|e| error_code(&e))
    }

    async fn publish(
        &self,
        ctx: RpcContext<'_>,
        channel: &str,
        data: &RawValue,
    ) -> Result<(), ErrorCode> {
        let room = Chat::room_of(channel).ok_or(codes::ERROR_UNKNOWN_CHANNEL)?;
        let body: SendBody = parse(Some(data))?;
        let user = user_id(ctx.user)?;
        self.0
            .send(user, room, body.into())
            .await
            .map(|_| ())
            .map_err(|e| error_code(&e))
    }

    async fn history(&self, channel: &str, f: &HistoryFilter) -> Result<HistoryPage, BrokerError> {
        let room = Chat::room_of(channel)
            .ok_or_else(|| BrokerError::Unavailable(format!("{channel} is not a room")))?;
        self.0.history(room, f).await
    }
}

#[derive(Deserialize)]
struct SendRpc {
    room: i64,
    #[serde(flatten)]
    body: SendBody,
}

#[derive(Deserialize)]
struct RoomOffset {
    room: i64,
    offset: i64,
}

#[derive(Deserialize)]
struct RoomOnly {
    room: i64,
}

#[derive(Deserialize)]
struct Change {
    message_id: i64,
    #[serde(default)]
    text: Option<String>,
}

/// The `chat.*` RPC methods.
struct Rpc {
    chat: Chat,
    method: &'static str,
}

#[async_trait]
impl RpcHandler for Rpc {
    async fn call(
        &self,
        ctx: RpcContext<'_>,
        data: Option<&RawValue>,
    ) -> Result<Option<Box<RawValue>>, ErrorCode> {
        let user = user_id(ctx.user)?;
        let chat = &self.chat;
        let code = |e: ChatError| error_code(&e);
        match self.method {
            "chat.send" => {
                let r: SendRpc = parse(data)?;
                let sent = chat.send(user, r.room, r.body.into()).await.map_err(code)?;
                Ok(raw(json!({
                    "message": switchboard_chat::events::message_view(&sent.message),
                    "duplicate": sent.duplicate,
                })))
            }
            "chat.read" => {
                let r: RoomOffset = parse(data)?;
                let at = chat.read(user, r.room, r.offset).await.map_err(code)?;
                Ok(raw(json!({ "offset": at })))
            }
            "chat.typing" => {
                let r: RoomOnly = parse(data)?;
                let sent = chat.typing(user, r.room).await.map_err(code)?;
                Ok(raw(json!({ "sent": sent })))
            }
            "chat.edit" | "chat.delete" => {
                let r: Change = parse(data)?;
                let (kind, text) = if self.method == "chat.edit" {
                    (
                        EventKind::Edit,
                        Some(r.text.ok_or(codes::ERROR_BAD_REQUEST)?),
                    )
                } else {
                    (EventKind::Delete, None)
                };
                let admin = is_admin(chat, user).await?;
                let m = chat
                    .change(user, admin, r.message_id, kind, text)
                    .await
                    .map_err(code)?;
                Ok(raw(
                    json!({ "message": switchboard_chat::events::message_view(&m) }),
                ))
            }
            other => {
                tracing::error!(method = other, "chat rpc registered without a handler");
                Err(codes::ERROR_METHOD_NOT_FOUND)
            }
        }
    }
}

async fn is_admin(chat: &Chat, user: i64) -> Result<bool, ErrorCode> {
    match chat.store().user_by_id(user).await {
        Ok(u) => Ok(u.is_some_and(|u| u.role == UserRole::Admin)),
        Err(e) => Err(error_code(&ChatError::from(e))),
    }
}

/// Makes `node.chat` the owner of the `chat` namespace and registers the `chat.*` methods.
pub fn install(node: &Node) {
    node.register_owner(NAMESPACE, Arc::new(Owner(node.chat.clone())));
    for method in [
        "chat.send",
        "chat.read",
        "chat.typing",
        "chat.edit",
        "chat.delete",
    ] {
        node.register_rpc(
            method,
            Arc::new(Rpc {
                chat: node.chat.clone(),
                method,
            }),
        );
    }
}
