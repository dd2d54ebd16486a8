//! `/v1/notifications` (the caller's stored notifications: `@mentions`, new direct rooms,
//! invites) and `/v1/users/{id}/presence` (online on this node, and `last_seen`).
//!
//! Notifications are also pushed live on `notifications:#{user_id}` (see
//! `switchboard_chat::notify`); this list is the durable record a client reads on connect.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_chat::notify::{channel_of, view};
use switchboard_store::{now_ms, MarkRead, NotificationQuery};

use crate::node::Node;
use crate::rest::error::ApiError;
use crate::rest::extract::{ApiJson, ApiPath, ApiQuery, AuthUser};
use crate::rest::openapi::{Auth, Op};

/// Notifications listed per page at most.
pub const MAX_PAGE: u32 = 200;
const DEFAULT_PAGE: u32 = 50;
/// Ids one `POST /v1/notifications/read` may name.
pub const MAX_READ_IDS: usize = 1000;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/notifications", get(list))
        .route("/v1/notifications/read", post(mark_read))
        .route("/v1/users/{id}/presence", get(presence))
}

/// The OpenAPI operations of this module, for `rest::openapi`.
#[rustfmt::skip]
pub const OPS: &[Op] = &[
    Op::new("get", "/v1/notifications", Auth::User, "My notifications (mentions, direct rooms, invites), newest first; also pushed live on notifications:#{my id}").query(&[("unread", "boolean", "only those not yet read"), ("before", "integer", "only notifications with a smaller id"), ("limit", "integer", "1 to 200, default 50")]).ok(200, "NotificationList"),
    Op::new("post", "/v1/notifications/read", Auth::User, "Mark my notifications read: some by id, or all").body("MarkReadRequest").ok(200, "MarkReadResponse"),
    Op::new("get", "/v1/users/{id}/presence", Auth::User, "Whether a user is connected to this node, and when it was last seen").ok(200, "Presence").errors(&[404]),
];

/// The schemas [`OPS`] refers to.
pub fn schemas() -> Value {
    let int = json!({"type": "integer", "format": "int64"});
    let opt_int = json!({"type": ["integer", "null"], "format": "int64"});
    json!({
        "Notification": {
            "type": "object",
            "required": ["id", "kind", "data", "created_at", "read"],
            "properties": {
                "id": int,
                "kind": {"type": "string", "enum": ["mention", "direct", "invite"]},
                "room_id": opt_int,
                "message_id": opt_int,
                "actor_id": {"type": ["integer", "null"], "format": "int64", "description": "Who caused it: the author, the room's creator, the inviter"},
                "data": {"type": "object", "description": "mention: {offset, excerpt}; direct and invite: {room_name, room_kind}"},
                "created_at": int,
                "read_at": {"type": ["integer", "null"], "format": "int64", "description": "ms since the Unix epoch"},
                "read": {"type": "boolean"},
            },
        },
        "NotificationList": {"type": "object", "required": ["notifications", "channel"], "properties": {
            "notifications": {"type": "array", "items": {"$ref": "#/components/schemas/Notification"}},
            "channel": {"type": "string", "description": "The caller's live channel, notifications:#{id}"},
            "next_before": {"type": "integer", "format": "int64", "description": "Pass as `before` for the next page; absent on the last"},
        }},
        "MarkReadRequest": {"type": "object", "description": "Either ids or all: true", "additionalProperties": false, "properties": {
            "ids": {"type": "array", "maxItems": MAX_READ_IDS, "items": {"type": "integer", "format": "int64"}},
            "all": {"type": "boolean"},
        }},
        "MarkReadResponse": {"type": "object", "required": ["marked"], "properties": {
            "marked": {"type": "integer", "description": "How many were unread and are now read"},
        }},
        "Presence": {"type": "object", "required": ["user_id", "online"], "properties": {
            "user_id": int,
            "online": {"type": "boolean", "description": "At least one connection on this node"},
            "last_seen": {"type": ["integer", "null"], "format": "int64", "description": "Now when online; else when the last connection closed (ms since the Unix epoch); null if never seen"},
        }},
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    unread: bool,
    before: Option<i64>,
    limit: Option<u32>,
}

async fn list(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let list = node
        .store
        .notifications(NotificationQuery {
            user_id: user.id(),
            unread_only: q.unread,
            before_id: q.before,
            limit,
        })
        .await?;
    let mut body = json!({
        "notifications": list.iter().map(view).collect::<Vec<_>>(),
        "channel": channel_of(user.id()),
    });
    if list.len() == limit as usize {
        if let Some(last) = list.last() {
            body["next_before"] = json!(last.id);
        }
    }
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkReadReq {
    #[serde(default)]
    ids: Option<Vec<i64>>,
    #[serde(default)]
    all: bool,
}

async fn mark_read(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiJson(req): ApiJson<MarkReadReq>,
) -> Result<Json<Value>, ApiError> {
    let which = match (req.ids, req.all) {
        (None, true) => MarkRead::All,
        (Some(ids), false) if ids.len() <= MAX_READ_IDS => MarkRead::Ids(ids),
        (Some(_), false) => {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_READ_IDS} ids at a time"
            )))
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give either \"ids\": [...] or \"all\": true".into(),
            ))
        }
    };
    let marked = node.store.mark_notifications_read(user.id(), which).await?;
    Ok(Json(json!({ "marked": marked })))
}

async fn presence(
    State(node): State<Arc<Node>>,
    _user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let stored = match node.store.last_seen(id).await {
        Ok(t) => t,
        Err(switchboard_store::StoreError::NotFound) => {
            return Err(ApiError::NotFound(format!("no user {id}")))
        }
        Err(e) => return Err(e.into()),
    };
    let online = node.users.contains_key(&id.to_string());
    let last_seen = if online { Some(now_ms()) } else { stored };
    Ok(Json(
        json!({ "user_id": id, "online": online, "last_seen": last_seen }),
    ))
}

/// Decodes `body` as the handler of `route` (`"METHOD /path"`) does and runs the checks the
/// handler makes before it reaches the store; `None` when `route` is not one of this
/// module's. For the `rest_bodies` fuzz target (see [`crate::fuzzing`]).
#[doc(hidden)]
pub(crate) fn check_body(route: &str, body: &[u8]) -> Option<Result<(), ApiError>> {
    use crate::fuzzing::json;
    Some(match route {
        "POST /v1/notifications/read" => {
            json::<MarkReadReq>(body).and_then(|req| match (req.ids, req.all) {
                (None, true) => Ok(()),
                (Some(ids), false) if ids.len() <= MAX_READ_IDS => Ok(()),
                _ => Err(ApiError::BadRequest("ids or all".into())),
            })
        }
        _ => return None,
    })
}
