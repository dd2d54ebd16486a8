//! `GET /v1/openapi.json`: an OpenAPI 3.1 document of every `/v1` route, built from [`OPS`]
//! (one entry per route and method) and the schemas in [`schemas`].
//!
//! **Adding a route:** add one `Op` line to [`OPS`], e.g.
//! `Op::new("post", "/v1/rooms/{id}/join", Auth::User, "Join a public room").ok(200, "Member").errors(&[404, 409]),`
//! and its schemas to [`schemas`] (or use `"Object"`). Path parameters are taken from the
//! path (`{id}`, `{room_id}`: integers when the name ends in `id`, strings otherwise). The
//! `accounts` integration test fails when a `/v1` route of the router is missing here, when
//! an `Op` names a route that does not exist, or when a schema is missing.

use std::sync::{Arc, OnceLock};

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};

use crate::node::Node;

/// Who may call an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No credentials.
    None,
    /// `Authorization: Bearer ACCESS_TOKEN` (401 without).
    User,
    /// A bearer token of an admin (403 for other users).
    Admin,
    /// `X-Site-Key: SITE_KEY` of the site in the path (401 without, or with a wrong one).
    SiteKey,
}

/// One documented operation: a method on a path.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub method: &'static str,
    pub path: &'static str,
    pub auth: Auth,
    pub summary: &'static str,
    /// The request body's schema name, if any.
    pub body: Option<&'static str>,
    /// The success status and its body's schema name (`""`: no body).
    pub ok: (u16, &'static str),
    /// Query parameters: (name, JSON type, description).
    pub query: &'static [(&'static str, &'static str, &'static str)],
    /// Error statuses beyond the automatic ones (400 with input, 401/403 with auth).
    pub errors: &'static [u16],
}

impl Op {
    /// `method` in lower case: `get`, `post`, `put`, `patch`, `delete`.
    pub const fn new(
        method: &'static str,
        path: &'static str,
        auth: Auth,
        summary: &'static str,
    ) -> Op {
        Op {
            method,
            path,
            auth,
            summary,
            body: None,
            ok: (200, ""),
            query: &[],
            errors: &[],
        }
    }
    pub const fn body(mut self, schema: &'static str) -> Op {
        self.body = Some(schema);
        self
    }
    pub const fn ok(mut self, status: u16, schema: &'static str) -> Op {
        self.ok = (status, schema);
        self
    }
    pub const fn query(
        mut self,
        params: &'static [(&'static str, &'static str, &'static str)],
    ) -> Op {
        self.query = params;
        self
    }
    pub const fn errors(mut self, statuses: &'static [u16]) -> Op {
        self.errors = statuses;
        self
    }
}

/// Every `/v1` operation, in the order the document lists them.
#[rustfmt::skip]
pub const OPS: &[Op] = &[
    Op::new("post", "/v1/auth/register", Auth::None, "Create an account").body("RegisterRequest").ok(201, "User").errors(&[409]),
    Op::new("post", "/v1/auth/login", Auth::None, "Log in: an access token (also a connection token) and a refresh token").body("LoginRequest").ok(200, "TokenPair").errors(&[401, 403, 429]),
    Op::new("post", "/v1/auth/refresh", Auth::None, "Rotate a refresh token for a new token pair; reusing a rotated token signs the user out everywhere").body("RefreshRequest").ok(200, "TokenPair").errors(&[401, 403]),
    Op::new("post", "/v1/auth/logout", Auth::User, "Revoke a refresh token").body("RefreshRequest").ok(204, ""),
    Op::new("get", "/v1/users", Auth::User, "Public profiles (id, username, display name) by username or by ids").query(&[("username", "string", "one username (any case)"), ("ids", "string", "comma-separated user ids, at most 100")]).ok(200, "ProfileList"),
    Op::new("get", "/v1/users/me", Auth::User, "The caller's account").ok(200, "User"),
    Op::new("patch", "/v1/users/me", Auth::User, "Change the display name and/or the password (a password change revokes every refresh token)").body("PatchMe").ok(200, "User").errors(&[403, 429]),
    Op::new("patch", "/v1/admin/users/{id}", Auth::Admin, "Change a user's role (audited)").body("PatchUser").ok(200, "User").errors(&[404, 409]),
    Op::new("get", "/v1/admin/audit", Auth::Admin, "The audit log, newest first").query(&[("before", "integer", "only entries with a smaller id"), ("limit", "integer", "1 to 1000, default 100")]).ok(200, "AuditPage"),
    Op::new("get", "/v1/openapi.json", Auth::None, "This document").ok(200, "Object"),
    // rooms (rest::rooms)
    Op::new("post", "/v1/rooms", Auth::User, "Create a room (a direct room with an existing one returns it, 200)").body("CreateRoom").ok(201, "Room"),
    Op::new("get", "/v1/rooms", Auth::User, "My rooms, with unread counts and last messages").ok(200, "MyRooms"),
    Op::new("get", "/v1/rooms/public", Auth::User, "Public rooms by id").query(&[("after", "integer", "only rooms with a larger id"), ("limit", "integer", "1 to 200, default 50")]).ok(200, "RoomList"),
    Op::new("get", "/v1/rooms/{id}", Auth::User, "A room and its members").ok(200, "RoomWithMembers").errors(&[404]),
    Op::new("delete", "/v1/rooms/{id}", Auth::User, "Delete a room with its messages (owner or admin; audited)").ok(204, "").errors(&[403, 404]),
    Op::new("post", "/v1/rooms/{id}/join", Auth::User, "Join a public room").ok(200, "MemberResponse").errors(&[403, 404]),
    Op::new("post", "/v1/rooms/{id}/leave", Auth::User, "Leave a room").ok(204, "").errors(&[404]),
    Op::new("post", "/v1/rooms/{id}/invite", Auth::User, "Add a member (owners and moderators)").body("UserRef").ok(200, "MemberResponse").errors(&[403, 404, 409]),
    Op::new("post", "/v1/rooms/{id}/kick", Auth::User, "Remove a member (owners and moderators)").body("UserRef").ok(204, "").errors(&[403, 404]),
    Op::new("put", "/v1/rooms/{id}/members/{user_id}", Auth::User, "Set a member's role (owners)").body("MemberRoleRequest").ok(200, "MemberResponse").errors(&[403, 404]),
    Op::new("get", "/v1/rooms/{id}/messages", Auth::User, "A page of messages, oldest first").query(&[("before", "integer", "offsets below"), ("after", "integer", "offsets above"), ("limit", "integer", "1 to 500, default 50")]).ok(200, "MessageList").errors(&[403, 404]),
    Op::new("post", "/v1/rooms/{id}/messages", Auth::User, "Send a message (a retry with the same client_msg_id returns the original, 200)").body("SendMessage").ok(201, "SentMessage").errors(&[403, 404]),
];

/// The schemas operations refer to by name.
pub fn schemas() -> Value {
    let user_role = json!({"type": "string", "enum": ["user", "admin"]});
    json!({
        "Object": {"type": "object"},
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "examples": ["bad_request", "unauthorized", "forbidden", "not_found", "conflict", "too_many_requests"]},
                    "message": {"type": "string", "description": "What is wrong, for people"},
                },
            }},
        },
        "Profile": {
            "type": "object",
            "required": ["id", "username", "display_name"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "username": {"type": "string"},
                "display_name": {"type": "string"},
            },
        },
        "ProfileList": {"type": "object", "properties": {"users": {"type": "array", "items": {"$ref": "#/components/schemas/Profile"}}}},
        "User": {
            "type": "object",
            "required": ["id", "username", "display_name", "role", "created_at"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "username": {"type": "string", "description": "Lower case"},
                "display_name": {"type": "string"},
                "role": user_role,
                "created_at": {"type": "integer", "format": "int64", "description": "ms since the Unix epoch"},
            },
        },
        "RegisterRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["username", "password", "display_name"],
            "properties": {
                "username": {"type": "string", "minLength": 3, "maxLength": 32, "pattern": "^[a-zA-Z0-9_.-]+$", "description": "Case-insensitive (stored lower-cased)"},
                "password": {"type": "string", "minLength": 8, "maxLength": 1024},
                "display_name": {"type": "string", "minLength": 1, "maxLength": 64},
            },
        },
        "LoginRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["username", "password"],
            "properties": {"username": {"type": "string"}, "password": {"type": "string"}},
        },
        "RefreshRequest": {
            "type": "object",
            "additionalProperties": false,
            "required": ["refresh_token"],
            "properties": {"refresh_token": {"type": "string"}},
        },
        "TokenPair": {
            "type": "object",
            "required": ["access_token", "refresh_token", "token_type", "expires_in", "user"],
            "properties": {
                "access_token": {"type": "string", "description": "HS256 JWT, sub = user id; also a connection token for /connection/websocket"},
                "refresh_token": {"type": "string", "description": "Single use: /v1/auth/refresh rotates it"},
                "token_type": {"type": "string", "const": "Bearer"},
                "expires_in": {"type": "integer", "description": "Seconds until the access token expires"},
                "user": {"$ref": "#/components/schemas/User"},
            },
        },
        "PatchMe": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "display_name": {"type": "string", "minLength": 1, "maxLength": 64},
                "password": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["current", "new"],
                    "properties": {"current": {"type": "string"}, "new": {"type": "string", "minLength": 8}},
                },
            },
        },
        "PatchUser": {
            "type": "object",
            "additionalProperties": false,
            "required": ["role"],
            "properties": {"role": user_role},
        },
        "AuditEntry": {
            "type": "object",
            "required": ["id", "at", "action", "target", "detail"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "at": {"type": "integer", "format": "int64", "description": "ms since the Unix epoch"},
                "actor_user_id": {"type": ["integer", "null"], "format": "int64"},
                "action": {"type": "string", "examples": ["login", "login_failed", "role_change", "password_changed", "refresh_token_reuse", "admin_created"]},
                "target": {"type": "string", "examples": ["user:42", "username:bob"]},
                "detail": {"type": "object"},
            },
        },
        "Room": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "kind": {"type": "string", "enum": ["public", "private", "direct"]},
                "name": {"type": "string"},
                "created_by": {"type": "integer", "format": "int64"},
                "created_at": {"type": "integer", "format": "int64"},
                "channel": {"type": "string", "description": "chat:{id}"},
                "last_offset": {"type": "integer", "format": "int64"},
                "epoch": {"type": "string"},
            },
        },
        "RoomList": {"type": "object", "properties": {"rooms": {"type": "array", "items": {"$ref": "#/components/schemas/Room"}}}},
        "MyRooms": {"type": "object", "properties": {"rooms": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "room": {"$ref": "#/components/schemas/Room"},
                "role": {"type": "string", "enum": ["owner", "moderator", "member"]},
                "unread": {"type": "integer"},
                "last_read_offset": {"type": "integer"},
                "last_message": {"oneOf": [{"$ref": "#/components/schemas/Message"}, {"type": "null"}]},
            },
        }}}},
        "Member": {
            "type": "object",
            "properties": {
                "room_id": {"type": "integer", "format": "int64"},
                "user_id": {"type": "integer", "format": "int64"},
                "role": {"type": "string", "enum": ["owner", "moderator", "member"]},
                "muted_until": {"type": ["integer", "null"]},
                "last_read_offset": {"type": "integer"},
                "joined_at": {"type": "integer", "format": "int64"},
            },
        },
        "MemberResponse": {"type": "object", "properties": {"member": {"$ref": "#/components/schemas/Member"}}},
        "RoomWithMembers": {"type": "object", "properties": {
            "room": {"$ref": "#/components/schemas/Room"},
            "members": {"type": "array", "items": {"$ref": "#/components/schemas/Member"}},
        }},
        "CreateRoom": {
            "type": "object",
            "required": ["kind"],
            "properties": {
                "kind": {"type": "string", "enum": ["public", "private", "direct"]},
                "name": {"type": "string", "maxLength": 100, "description": "Required unless direct"},
                "members": {"type": "array", "items": {"type": "integer", "format": "int64"}, "description": "Direct: exactly the other user"},
            },
        },
        "UserRef": {"type": "object", "required": ["user_id"], "properties": {"user_id": {"type": "integer", "format": "int64"}}},
        "MemberRoleRequest": {"type": "object", "required": ["role"], "properties": {"role": {"type": "string", "enum": ["moderator", "member"]}}},
        "Message": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "room_id": {"type": "integer", "format": "int64"},
                "offset": {"type": "integer", "format": "int64"},
                "user_id": {"type": "integer", "format": "int64"},
                "client_msg_id": {"type": ["string", "null"]},
                "text": {"type": ["string", "null"], "description": "null when deleted or removed"},
                "reply_to": {"type": ["integer", "null"]},
                "created_at": {"type": "integer", "format": "int64"},
                "edited_at": {"type": ["integer", "null"]},
                "deleted": {"type": "boolean"},
                "removed": {"type": "boolean"},
            },
        },
        "MessageList": {"type": "object", "properties": {"messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}}}},
        "SendMessage": {
            "type": "object",
            "required": ["text"],
            "properties": {
                "text": {"type": "string"},
                "client_msg_id": {"type": "string", "description": "Idempotency key, unique per user"},
                "reply_to": {"type": "integer", "format": "int64"},
            },
        },
        "SentMessage": {"type": "object", "properties": {
            "message": {"$ref": "#/components/schemas/Message"},
            "duplicate": {"type": "boolean"},
        }},
        "AuditPage": {
            "type": "object",
            "required": ["entries"],
            "properties": {
                "entries": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}},
                "next_before": {"type": "integer", "format": "int64", "description": "Pass as `before` for the next page; absent on the last"},
            },
        },
    })
}

/// `schemas()` plus those of route modules that keep their own.
fn all_schemas() -> Value {
    let mut all = schemas();
    for more in [
        super::moderation::schemas(),
        super::notifications::schemas(),
        super::sites::schemas(),
        super::documents::schemas(),
    ] {
        if let (Some(all), Value::Object(more)) = (all.as_object_mut(), more) {
            all.extend(more);
        }
    }
    all
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn error_response(status: u16) -> Value {
    let description = match status {
        400 => "Invalid input",
        401 => "Missing, invalid or expired credentials",
        403 => "Not allowed",
        404 => "Not found",
        409 => "Conflict with the current state",
        413 => "Request body too large",
        429 => "Too many attempts (see Retry-After)",
        503 => "The database is unavailable",
        _ => "Error",
    };
    json!({
        "description": description,
        "content": {"application/json": {"schema": schema_ref("Error")}},
    })
}

/// The `{name}` segments of a path.
fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

fn operation(op: &Op) -> Value {
    let mut params: Vec<Value> = path_params(op.path)
        .map(|name| {
            let schema = if name.ends_with("id") {
                json!({"type": "integer", "format": "int64"})
            } else {
                json!({"type": "string"})
            };
            json!({"name": name, "in": "path", "required": true, "schema": schema})
        })
        .collect();
    params.extend(op.query.iter().map(|(name, ty, description)| {
        json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": ty}})
    }));
    let mut responses = Map::new();
    let (status, schema) = op.ok;
    let mut ok = json!({"description": "Success"});
    if !schema.is_empty() {
        ok["content"] = json!({"application/json": {"schema": schema_ref(schema)}});
    }
    responses.insert(status.to_string(), ok);
    let mut errors: Vec<u16> = op.errors.to_vec();
    if op.body.is_some() || !params.is_empty() {
        errors.push(400);
    }
    if op.body.is_some() {
        errors.push(413);
    }
    match op.auth {
        Auth::None => {}
        Auth::User | Auth::SiteKey => errors.push(401),
        Auth::Admin => errors.extend([401, 403]),
    }
    errors.sort_unstable();
    errors.dedup();
    for e in errors {
        responses.insert(e.to_string(), error_response(e));
    }
    let tag = op.path.split('/').nth(2).unwrap_or("v1");
    let mut v = json!({
        "operationId": format!("{}_{}", op.method, op.path.trim_start_matches("/v1/").replace(['/', '.', '{', '}'], "_")),
        "summary": op.summary,
        "tags": [tag],
        "responses": responses,
    });
    if !params.is_empty() {
        v["parameters"] = Value::Array(params);
    }
    if let Some(body) = op.body {
        v["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": schema_ref(body)}},
        });
    }
    match op.auth {
        Auth::None => {}
        Auth::SiteKey => v["security"] = json!([{"siteKey": []}]),
        Auth::User | Auth::Admin => v["security"] = json!([{"bearer": []}]),
    }
    v
}

/// Every documented operation: this module's table and those of route modules that keep
/// their own (moderation, notifications, sites).
fn all_ops() -> impl Iterator<Item = &'static Op> {
    OPS.iter()
        .chain(super::moderation::OPS)
        .chain(super::notifications::OPS)
        .chain(super::sites::OPS)
        .chain(super::documents::OPS)
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in all_ops() {
        let item = paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}));
        item[op.method] = operation(op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Switchboard REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Accounts, rooms, messages, moderation, notifications and presence. Errors are JSON: {\"error\": {\"code\", \"message\"}}. Access tokens come from /v1/auth/login and are also connection tokens for the WebSocket endpoint.",
        },
        "paths": paths,
        "components": {
            "schemas": all_schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "siteKey": {"type": "apiKey", "in": "header", "name": "X-Site-Key"},
            },
        },
    })
}

pub fn routes() -> Router<Arc<Node>> {
    Router::new().route("/v1/openapi.json", get(serve))
}

async fn serve() -> impl IntoResponse {
    static DOC: OnceLock<String> = OnceLock::new();
    let body = DOC.get_or_init(|| document().to_string());
    ([(header::CONTENT_TYPE, "application/json")], body.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` points at a schema that exists, and no route is listed twice.
    #[test]
    fn references_resolve_and_ops_are_unique() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for part in text.split("\"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(schemas.contains_key(name), "missing schema {name}");
        }
        let mut seen = std::collections::HashSet::new();
        for op in all_ops() {
            assert!(
                seen.insert((op.method, op.path)),
                "{} {} twice",
                op.method,
                op.path
            );
            assert!(op.path.starts_with("/v1/"), "{}", op.path);
            assert!(
                ["get", "post", "put", "patch", "delete"].contains(&op.method),
                "{}",
                op.method
            );
        }
    }
}
