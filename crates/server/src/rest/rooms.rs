//! `/v1/rooms`: create, list, join, invite, leave, kick, member roles, and messages.
//!
//! Roles: the creator owns a room; owners and moderators invite and kick; only owners change
//! roles. Membership is enforced here and, for the `chat:{id}` channel, in the server (the
//! chat namespace's owner), never only in the client.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};

use crate::rest::extract::{ApiJson, ApiPath, ApiQuery};
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_chat::events::message_view;
use switchboard_chat::{Chat, ChatError, Send};
use switchboard_store::{
    MemberRole, MessagePage, NewAudit, NewNotification, NewRoom, NotificationKind, Room, RoomKind,
};

use crate::conn::Control;
use crate::node::Node;
use crate::rest::error::ApiError;
use crate::rest::extract::AuthUser;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/rooms", post(create).get(mine))
        .route("/v1/rooms/public", get(public))
        .route("/v1/rooms/{id}", get(one).delete(delete_room))
        .route("/v1/rooms/{id}/join", post(join))
        .route("/v1/rooms/{id}/leave", post(leave))
        .route("/v1/rooms/{id}/invite", post(invite))
        .route("/v1/rooms/{id}/kick", post(kick))
        .route("/v1/rooms/{id}/members/{user_id}", put(set_role))
        .route("/v1/rooms/{id}/messages", get(messages).post(send))
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::NotFound => ApiError::NotFound("no such room or message".into()),
            ChatError::Forbidden => ApiError::Forbidden("not a member of this room".into()),
            ChatError::Muted => ApiError::Forbidden("you are muted in this room".into()),
            ChatError::Invalid(m) => ApiError::BadRequest(m),
            ChatError::Conflict(m) => ApiError::Conflict(m),
            ChatError::Unavailable => ApiError::Unavailable,
            ChatError::Internal(m) => ApiError::Internal(m),
        }
    }
}

fn room_json(r: &Room) -> Value {
    json!({
        "id": r.id, "kind": r.kind, "name": r.name, "created_by": r.created_by,
        "created_at": r.created_at, "channel": Chat::channel(r.id),
        "last_offset": r.last_offset, "epoch": r.epoch,
    })
}

async fn room(node: &Node, id: i64) -> Result<Room, ApiError> {
    node.store
        .room(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no room {id}")))
}

/// The caller's role in the room; 403 unless it is one of `allowed`.
async fn require(
    node: &Node,
    room: i64,
    user: i64,
    allowed: &[MemberRole],
) -> Result<(), ApiError> {
    match node.store.member(room, user).await? {
        Some(m) if allowed.contains(&m.role) => Ok(()),
        Some(_) => Err(ApiError::Forbidden(
            "your role in this room does not allow this".into(),
        )),
        None => Err(ApiError::Forbidden("not a member of this room".into())),
    }
}

/// Stores and pushes a `direct` or `invite` notification for each of `users`. The room
/// change already happened, so a failure is logged, not returned.
async fn notify(node: &Node, room: &Room, actor: i64, kind: NotificationKind, users: &[i64]) {
    let notes: Vec<NewNotification> = users
        .iter()
        .filter(|&&u| u != actor)
        .map(|&u| NewNotification {
            user_id: u,
            kind,
            room_id: Some(room.id),
            message_id: None,
            actor_id: Some(actor),
            data: json!({"room_name": room.name, "room_kind": room.kind}),
        })
        .collect();
    if notes.is_empty() {
        return;
    }
    if let Err(e) = node.chat.notify(notes).await {
        tracing::warn!(room = room.id, error = %e, "room notification failed");
    }
}

#[derive(Deserialize)]
struct CreateRoom {
    kind: RoomKind,
    #[serde(default)]
    name: String,
    /// Other members to add; for a direct room, exactly the one other user.
    #[serde(default)]
    members: Vec<i64>,
}

async fn create(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiJson(req): ApiJson<CreateRoom>,
) -> Result<Response, ApiError> {
    let me = user.id();
    if req.kind == RoomKind::Direct {
        let [other] = req.members[..] else {
            return Err(ApiError::BadRequest(
                "a direct room has exactly one other member".into(),
            ));
        };
        if other == me || node.store.user_by_id(other).await?.is_none() {
            return Err(ApiError::BadRequest(
                "unknown user for a direct room".into(),
            ));
        }
        if let Some(existing) = node.store.direct_room(me, other).await? {
            return Ok(Json(room_json(&existing)).into_response());
        }
    } else if req.name.trim().is_empty() || req.name.chars().count() > 100 {
        return Err(ApiError::BadRequest("name must be 1-100 characters".into()));
    }
    let room = node
        .store
        .create_room(NewRoom {
            kind: req.kind,
            name: req.name,
            created_by: me,
        })
        .await?;
    let mut added = Vec::new();
    for other in req.members.iter().filter(|&&u| u != me) {
        if node.store.user_by_id(*other).await?.is_none() {
            return Err(ApiError::BadRequest(format!("unknown user {other}")));
        }
        node.store
            .add_member(room.id, *other, MemberRole::Member)
            .await?;
        added.push(*other);
    }
    let kind = if room.kind == RoomKind::Direct {
        NotificationKind::Direct
    } else {
        NotificationKind::Invite
    };
    notify(&node, &room, me, kind, &added).await;
    Ok((StatusCode::CREATED, Json(room_json(&room))).into_response())
}

async fn mine(State(node): State<Arc<Node>>, user: AuthUser) -> Result<Json<Value>, ApiError> {
    let rooms = node.store.rooms_for_user(user.id()).await?;
    let list: Vec<Value> = rooms
        .iter()
        .map(|s| {
            json!({
                "room": room_json(&s.room),
                "role": s.member.role,
                "unread": s.unread,
                "last_read_offset": s.member.last_read_offset,
                "last_message": s.last_message.as_ref().map(message_view),
            })
        })
        .collect();
    Ok(Json(json!({ "rooms": list })))
}

#[derive(Deserialize)]
struct Paging {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: u32,
}

fn default_limit() -> u32 {
    50
}

async fn public(
    State(node): State<Arc<Node>>,
    _user: AuthUser,
    ApiQuery(p): ApiQuery<Paging>,
) -> Result<Json<Value>, ApiError> {
    let rooms = node
        .store
        .public_rooms(p.after, p.limit.clamp(1, 200))
        .await?;
    Ok(Json(
        json!({ "rooms": rooms.iter().map(room_json).collect::<Vec<_>>() }),
    ))
}

async fn one(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let room = room(&node, id).await?;
    let member = node.store.member(id, user.id()).await?;
    if member.is_none() && room.kind != RoomKind::Public && !user.is_admin() {
        return Err(ApiError::NotFound(format!("no room {id}")));
    }
    let members = node.store.members(id).await?;
    Ok(Json(json!({"room": room_json(&room), "members": members})))
}

/// Deletes a room with its messages (owner or admin). Members' subscriptions end with an
/// unsubscribe push; the deletion is audited.
async fn delete_room(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let room = room(&node, id).await?;
    if !user.is_admin() {
        require(&node, id, user.id(), &[MemberRole::Owner]).await?;
    }
    let members = node.store.members(id).await?;
    node.store.delete_room(id).await?;
    for m in &members {
        unsubscribe_everywhere(&node, id, m.user_id);
    }
    let audit = NewAudit {
        actor_user_id: Some(user.id()),
        action: "room_deleted".into(),
        target: format!("room:{id}"),
        detail: json!({ "name": room.name, "kind": room.kind, "members": members.len() }),
    };
    node.store.append_audit(audit).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn join(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let room = room(&node, id).await?;
    if room.kind != RoomKind::Public {
        return Err(ApiError::Forbidden(
            "only public rooms can be joined; ask for an invite".into(),
        ));
    }
    let member = match node.store.member(id, user.id()).await? {
        Some(m) => m,
        None => {
            node.store
                .add_member(id, user.id(), MemberRole::Member)
                .await?
        }
    };
    Ok(Json(json!({ "member": member })))
}

/// Ends `user`'s subscriptions to the room on this node (leave, kick).
fn unsubscribe_everywhere(node: &Node, room: i64, user: i64) {
    let channel = Chat::channel(room);
    node.control_user(&user.to_string(), None, || Control::Unsubscribe {
        channel: channel.clone(),
    });
}

async fn leave(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    node.store.remove_member(id, user.id()).await?;
    unsubscribe_everywhere(&node, id, user.id());
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct UserRef {
    user_id: i64,
}

async fn invite(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<UserRef>,
) -> Result<Json<Value>, ApiError> {
    let room = room(&node, id).await?;
    if room.kind == RoomKind::Direct {
        return Err(ApiError::BadRequest(
            "a direct room has exactly two members".into(),
        ));
    }
    require(
        &node,
        id,
        user.id(),
        &[MemberRole::Owner, MemberRole::Moderator],
    )
    .await?;
    if node.store.user_by_id(req.user_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no user {}", req.user_id)));
    }
    let member = node
        .store
        .add_member(id, req.user_id, MemberRole::Member)
        .await?;
    notify(
        &node,
        &room,
        user.id(),
        NotificationKind::Invite,
        &[req.user_id],
    )
    .await;
    Ok(Json(json!({ "member": member })))
}

async fn kick(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<UserRef>,
) -> Result<StatusCode, ApiError> {
    require(
        &node,
        id,
        user.id(),
        &[MemberRole::Owner, MemberRole::Moderator],
    )
    .await?;
    if let Some(target) = node.store.member(id, req.user_id).await? {
        if target.role == MemberRole::Owner {
            return Err(ApiError::Forbidden("the owner cannot be kicked".into()));
        }
    }
    node.store.remove_member(id, req.user_id).await?;
    unsubscribe_everywhere(&node, id, req.user_id);
    let audit = NewAudit {
        actor_user_id: Some(user.id()),
        action: "room_kick".into(),
        target: format!("room:{id}"),
        detail: json!({ "user_id": req.user_id }),
    };
    node.store.append_audit(audit).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct RoleReq {
    role: MemberRole,
}

async fn set_role(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath((id, target)): ApiPath<(i64, i64)>,
    ApiJson(req): ApiJson<RoleReq>,
) -> Result<Json<Value>, ApiError> {
    require(&node, id, user.id(), &[MemberRole::Owner]).await?;
    if req.role == MemberRole::Owner {
        return Err(ApiError::BadRequest(
            "ownership cannot be given away here".into(),
        ));
    }
    let member = node.store.set_member_role(id, target, req.role).await?;
    let audit = NewAudit {
        actor_user_id: Some(user.id()),
        action: "room_role_change".into(),
        target: format!("room:{id}"),
        detail: json!({ "user_id": target, "role": req.role }),
    };
    node.store.append_audit(audit).await?;
    Ok(Json(json!({ "member": member })))
}

#[derive(Deserialize)]
struct MessagesQuery {
    before: Option<i64>,
    after: Option<i64>,
    #[serde(default = "default_limit")]
    limit: u32,
}

async fn messages(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<MessagesQuery>,
) -> Result<Json<Value>, ApiError> {
    node.chat.member(id, user.id()).await?;
    let page = MessagePage {
        before: q.before,
        after: q.after,
        limit: q.limit.clamp(1, 500),
    };
    let list = node.store.messages(id, page).await?;
    Ok(Json(
        json!({ "messages": list.iter().map(message_view).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
struct SendReq {
    text: String,
    #[serde(default)]
    client_msg_id: Option<String>,
    #[serde(default)]
    reply_to: Option<i64>,
}

async fn send(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<SendReq>,
) -> Result<Response, ApiError> {
    let send = Send {
        text: req.text,
        client_msg_id: req.client_msg_id,
        reply_to: req.reply_to,
    };
    let sent = node.chat.send(user.id(), id, send).await?;
    let status = if sent.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let body = json!({"message": message_view(&sent.message), "duplicate": sent.duplicate});
    Ok((status, Json(body)).into_response())
}

/// Decodes `body` as the handler of `route` (`"METHOD /path"`) does and runs the checks the
/// handler makes before it reaches the store; `None` when `route` is not one of this
/// module's. For the `rest_bodies` fuzz target (see [`crate::fuzzing`]).
#[doc(hidden)]
pub(crate) fn check_body(route: &str, body: &[u8]) -> Option<Result<(), ApiError>> {
    use crate::fuzzing::json;
    Some(match route {
        "POST /v1/rooms" => json::<CreateRoom>(body).and_then(|req| {
            if req.kind == RoomKind::Direct {
                let [_other] = req.members[..] else {
                    return Err(ApiError::BadRequest(
                        "a direct room has exactly one other member".into(),
                    ));
                };
            } else if req.name.trim().is_empty() || req.name.chars().count() > 100 {
                return Err(ApiError::BadRequest("name must be 1-100 characters".into()));
            }
            Ok(())
        }),
        "POST /v1/rooms/{id}/invite" | "POST /v1/rooms/{id}/kick" => {
            json::<UserRef>(body).map(|_| ())
        }
        "PUT /v1/rooms/{id}/members/{user_id}" => json::<RoleReq>(body).and_then(|req| {
            if req.role == MemberRole::Owner {
                return Err(ApiError::BadRequest(
                    "ownership cannot be given away here".into(),
                ));
            }
            Ok(())
        }),
        // `Chat::send` validates the text and `client_msg_id` (see its tests).
        "POST /v1/rooms/{id}/messages" => json::<SendReq>(body).map(|_| ()),
        _ => return None,
    })
}
