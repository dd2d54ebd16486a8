//! `/v1/moderation` and `/v1/rooms/{id}/mute`: what moderators do about messages and users.
//!
//! Who may act: an admin anywhere, or a room's owner or moderator in that room (403 for
//! everyone else, 404 for a room or message that does not exist). Bans are global, so they
//! are for admins only. Every action is written to the audit log (`GET /v1/admin/audit`):
//! `message_removed`, `message_restored`, `user_muted`, `user_unmuted`, `user_banned`,
//! `user_unbanned`, `flag_dismissed`. The pipeline's own removals are audited too, with no
//! actor. The work itself is in `switchboard_chat::moderation`; this module maps HTTP onto it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_chat::events::message_view;
use switchboard_chat::{ChatError, Moderator};
use switchboard_store::{EventKind, FlagQuery};

use crate::node::Node;
use crate::rest::error::ApiError;
use crate::rest::extract::{ApiJson, ApiPath, ApiQuery, AuthUser};
use crate::rest::openapi::{Auth, Op};

/// Flags listed per page at most.
pub const MAX_FLAG_PAGE: u32 = 500;
const DEFAULT_FLAG_PAGE: u32 = 100;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/moderation/flags", get(flags))
        .route("/v1/moderation/flags/{id}/dismiss", post(dismiss))
        .route("/v1/moderation/messages/{id}/remove", post(remove))
        .route("/v1/moderation/messages/{id}/restore", post(restore))
        .route("/v1/moderation/users/{id}/ban", post(ban))
        .route("/v1/moderation/users/{id}/unban", post(unban))
        .route("/v1/rooms/{id}/mute", post(mute))
}

/// The OpenAPI operations of this module, for `rest::openapi`.
#[rustfmt::skip]
pub const OPS: &[Op] = &[
    Op::new("get", "/v1/moderation/flags", Auth::User, "Flagged messages, newest first: one room's (its owner or moderators), or every room's (admins)").query(&[("room", "integer", "the room; required unless admin"), ("include_resolved", "boolean", "also flags already settled"), ("before", "integer", "only flags with a smaller id"), ("limit", "integer", "1 to 500, default 100")]).ok(200, "FlagList").errors(&[403, 404]),
    Op::new("post", "/v1/moderation/flags/{id}/dismiss", Auth::User, "Dismiss a flag; the message stays (audited)").ok(200, "FlagResponse").errors(&[403, 404, 409]),
    Op::new("post", "/v1/moderation/messages/{id}/remove", Auth::User, "Remove a message: a `removed` event to the room, text withheld from history (audited)").body("ModerationReason").ok(200, "MessageResponse").errors(&[403, 404, 409]),
    Op::new("post", "/v1/moderation/messages/{id}/restore", Auth::User, "Restore a removed message: a `restored` event to the room (audited)").body("ModerationReason").ok(200, "MessageResponse").errors(&[403, 404, 409]),
    Op::new("post", "/v1/moderation/users/{id}/ban", Auth::Admin, "Ban a user from sending anywhere (error 103), until a time or until lifted (audited)").body("BanRequest").ok(200, "BanResponse").errors(&[404]),
    Op::new("post", "/v1/moderation/users/{id}/unban", Auth::Admin, "Lift a user's ban (audited)").ok(204, "").errors(&[404]),
    Op::new("post", "/v1/rooms/{id}/mute", Auth::User, "Mute a member until a time, or unmute with until null (owners, moderators, admins; audited)").body("MuteRequest").ok(200, "MemberResponse").errors(&[403, 404]),
];

/// The schemas [`OPS`] refers to beyond the shared ones (`MemberResponse`, `Message`).
pub fn schemas() -> Value {
    let int = json!({"type": "integer", "format": "int64"});
    let ms = json!({"type": ["integer", "null"], "format": "int64", "description": "ms since the Unix epoch"});
    json!({
        "Flag": {
            "type": "object",
            "required": ["id", "message_id", "room_id", "user_id", "reason", "detail", "created_at"],
            "properties": {
                "id": int, "message_id": int, "room_id": int,
                "user_id": {"type": "integer", "format": "int64", "description": "The message's author"},
                "reason": {"type": "string", "enum": ["profanity", "words", "repeat", "links", "burst"]},
                "detail": {"type": "object", "description": "What matched"},
                "created_at": int,
                "resolved_at": ms,
                "resolved_by": {"type": ["integer", "null"], "format": "int64"},
                "resolution": {"type": ["string", "null"], "enum": ["removed", "restored", "dismissed", null]},
                "message": {"description": "The message as it is now, text included", "$ref": "#/components/schemas/Message"},
            },
        },
        "FlagList": {"type": "object", "required": ["flags"], "properties": {
            "flags": {"type": "array", "items": {"$ref": "#/components/schemas/Flag"}},
        }},
        "FlagResponse": {"type": "object", "properties": {"flag": {"$ref": "#/components/schemas/Flag"}}},
        "ModerationReason": {"type": "object", "description": "Optional; an empty body is fine", "properties": {
            "reason": {"type": "string"},
        }},
        "MessageResponse": {"type": "object", "properties": {"message": {"$ref": "#/components/schemas/Message"}}},
        "BanRequest": {"type": "object", "description": "Optional; an empty body bans until lifted", "properties": {
            "until": ms,
            "reason": {"type": "string"},
        }},
        "BanResponse": {"type": "object", "properties": {"ban": {
            "type": "object",
            "properties": {"user_id": int, "until": ms, "reason": {"type": "string"}, "created_by": {"type": ["integer", "null"]}, "created_at": int},
        }}},
        "MuteRequest": {"type": "object", "required": ["user_id"], "properties": {
            "user_id": int,
            "until": ms,
        }},
    })
}

fn moderator(user: &AuthUser) -> Moderator {
    Moderator {
        user_id: user.id(),
        admin: user.is_admin(),
    }
}

/// The chat service's refusals, worded for moderation.
fn refused(e: ChatError) -> ApiError {
    match e {
        ChatError::Forbidden => ApiError::Forbidden(
            "only admins, and the room's owner and moderators, may do this".into(),
        ),
        ChatError::NotFound => ApiError::NotFound("no such room, message, user or flag".into()),
        other => other.into(),
    }
}

/// A JSON body that may be left out entirely, or be `null` (then `T::default()`).
fn optional_body<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return Ok(T::default());
    }
    crate::rest::extract::json_body(body, "request body").map_err(ApiError::BadRequest)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagsQuery {
    room: Option<i64>,
    #[serde(default)]
    include_resolved: bool,
    before: Option<i64>,
    limit: Option<u32>,
}

async fn flags(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiQuery(q): ApiQuery<FlagsQuery>,
) -> Result<Json<Value>, ApiError> {
    let query = FlagQuery {
        room_id: q.room,
        include_resolved: q.include_resolved,
        before_id: q.before,
        limit: q.limit.unwrap_or(DEFAULT_FLAG_PAGE).clamp(1, MAX_FLAG_PAGE),
    };
    let by = moderator(&user);
    let list = match node.chat.flags(by, query).await {
        Err(ChatError::Forbidden) if q.room.is_none() => {
            return Err(ApiError::Forbidden(
                "only admins list every room's flags; pass ?room=".into(),
            ))
        }
        other => other.map_err(refused)?,
    };
    Ok(Json(json!({ "flags": list })))
}

async fn dismiss(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let flag = node
        .chat
        .dismiss_flag(moderator(&user), id)
        .await
        .map_err(refused)?;
    Ok(Json(json!({ "flag": flag })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reason {
    #[serde(default)]
    reason: Option<String>,
}

async fn moderate(
    node: &Node,
    user: &AuthUser,
    id: i64,
    kind: EventKind,
    body: &Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: Reason = optional_body(body)?;
    let m = node
        .chat
        .moderate_message(moderator(user), id, kind, req.reason)
        .await
        .map_err(refused)?;
    Ok(Json(json!({ "message": message_view(&m) })))
}

async fn remove(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    moderate(&node, &user, id, EventKind::Removed, &body).await
}

async fn restore(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    moderate(&node, &user, id, EventKind::Restored, &body).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BanReq {
    /// Ms since the Unix epoch; absent or null: until lifted.
    #[serde(default)]
    until: Option<i64>,
    #[serde(default)]
    reason: String,
}

async fn ban(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    if !user.is_admin() {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    let req: BanReq = optional_body(&body)?;
    let ban = node
        .chat
        .ban(moderator(&user), id, req.until, req.reason)
        .await
        .map_err(refused)?;
    Ok(Json(json!({ "ban": ban })))
}

async fn unban(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    if !user.is_admin() {
        return Err(ApiError::Forbidden("admins only".into()));
    }
    match node.chat.unban(moderator(&user), id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(ChatError::NotFound) => Err(ApiError::NotFound(format!("user {id} is not banned"))),
        Err(e) => Err(refused(e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MuteReq {
    user_id: i64,
    /// Ms since the Unix epoch; absent or null unmutes.
    #[serde(default)]
    until: Option<i64>,
}

async fn mute(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(room): ApiPath<i64>,
    ApiJson(req): ApiJson<MuteReq>,
) -> Result<Json<Value>, ApiError> {
    let member = node
        .chat
        .mute(moderator(&user), room, req.user_id, req.until)
        .await
        .map_err(refused)?;
    Ok(Json(json!({ "member": member })))
}

/// Decodes `body` as the handler of `route` (`"METHOD /path"`) does and runs the checks the
/// handler makes before it reaches the store; `None` when `route` is not one of this
/// module's. For the `rest_bodies` fuzz target (see [`crate::fuzzing`]).
#[doc(hidden)]
pub(crate) fn check_body(route: &str, body: &[u8]) -> Option<Result<(), ApiError>> {
    use crate::fuzzing::json;
    let body = Bytes::copy_from_slice(body);
    Some(match route {
        "POST /v1/moderation/messages/{id}/remove"
        | "POST /v1/moderation/messages/{id}/restore" => optional_body::<Reason>(&body).map(|_| ()),
        "POST /v1/moderation/users/{id}/ban" => optional_body::<BanReq>(&body).map(|_| ()),
        "POST /v1/rooms/{id}/mute" => json::<MuteReq>(&body).map(|_| ()),
        _ => return None,
    })
}
