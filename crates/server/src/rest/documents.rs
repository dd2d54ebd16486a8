//! `/v1/documents`: collaborative documents: create, list, read, rename, delete, members,
//! content, server-side edits and versions. The live editing itself is the y-websocket
//! endpoint `/docs/{id}` (see [`crate::docs`]).
//!
//! Roles: the creator owns a document; owners share it (editor or viewer) and delete it;
//! owners and editors rename, edit, save and restore versions; every role reads. Admins may
//! do what an owner may. A change of someone's access closes their open connections to the
//! document (4000 to reconnect with the new role, 4403 when access was removed).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_collab::{codec, CollabError, Content, Format};
use switchboard_store::{
    DocRole, DocVersion, Document, NewAudit, NewDocument, NewNotification, NotificationKind,
};

use crate::node::Node;
use crate::rest::error::ApiError;
use crate::rest::extract::{ApiJson, ApiPath, ApiQuery, AuthUser};

/// Longest title, in characters.
const MAX_TITLE_CHARS: usize = 200;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/documents", post(create).get(mine))
        .route(
            "/v1/documents/{id}",
            get(one).patch(rename).delete(delete_doc),
        )
        .route(
            "/v1/documents/{id}/members/{user_id}",
            put(set_member).delete(remove_member),
        )
        .route("/v1/documents/{id}/content", get(content))
        .route("/v1/documents/{id}/updates", post(updates))
        .route(
            "/v1/documents/{id}/versions",
            post(save_version).get(versions),
        )
        .route("/v1/documents/{id}/versions/{version}", get(version))
        .route(
            "/v1/documents/{id}/versions/{version}/restore",
            post(restore),
        )
}

impl From<CollabError> for ApiError {
    fn from(e: CollabError) -> Self {
        match e {
            CollabError::NotFound => ApiError::NotFound("no such document or version".into()),
            CollabError::Invalid(m) => ApiError::BadRequest(m),
            CollabError::Unavailable => ApiError::Unavailable,
            CollabError::Internal(m) => ApiError::Internal(m),
        }
    }
}

fn doc_json(d: &Document, role: DocRole) -> Value {
    json!({
        "id": d.id, "title": d.title, "owner_id": d.owner_id, "created_at": d.created_at,
        "updated_at": d.updated_at, "role": role, "path": format!("/docs/{}", d.id),
    })
}

fn version_json(v: &DocVersion) -> Value {
    json!({
        "id": v.id, "doc_id": v.doc_id, "label": v.label, "auto": v.auto,
        "created_by": v.created_by, "created_at": v.created_at, "size": v.size,
    })
}

fn title(raw: &str) -> Result<String, ApiError> {
    let t = raw.trim();
    if t.is_empty() || t.chars().count() > MAX_TITLE_CHARS {
        return Err(ApiError::BadRequest(format!(
            "title must have 1 to {MAX_TITLE_CHARS} characters"
        )));
    }
    Ok(t.to_string())
}

/// The document and the caller's role in it; admins act as owners. 404 if it does not
/// exist, 403 if the caller has no access, or a role not in `allowed`.
async fn access(
    node: &Node,
    user: &AuthUser,
    id: i64,
    allowed: &[DocRole],
) -> Result<(Document, DocRole), ApiError> {
    let doc = node
        .store
        .document(id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such document".into()))?;
    let role = match node.store.document_role(id, user.id()).await? {
        Some(r) => r,
        None if user.is_admin() => DocRole::Owner,
        None => {
            return Err(ApiError::Forbidden(
                "you have no access to this document".into(),
            ))
        }
    };
    let role = if user.is_admin() {
        DocRole::Owner
    } else {
        role
    };
    if !allowed.contains(&role) {
        return Err(ApiError::Forbidden(format!(
            "a {role} of this document may not do this"
        )));
    }
    Ok((doc, role))
}

const ANY: &[DocRole] = &[DocRole::Owner, DocRole::Editor, DocRole::Viewer];
const WRITERS: &[DocRole] = &[DocRole::Owner, DocRole::Editor];
const OWNER: &[DocRole] = &[DocRole::Owner];

async fn audit(
    node: &Node,
    actor: i64,
    action: &str,
    doc: i64,
    detail: Value,
) -> Result<(), ApiError> {
    node.store
        .append_audit(NewAudit {
            actor_user_id: Some(actor),
            action: action.into(),
            target: format!("document:{doc}"),
            detail,
        })
        .await?;
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TitleReq {
    title: String,
}

async fn create(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiJson(req): ApiJson<TitleReq>,
) -> Result<Response, ApiError> {
    let doc = node
        .store
        .create_document(NewDocument {
            owner_id: user.id(),
            title: title(&req.title)?,
        })
        .await?;
    audit(
        &node,
        user.id(),
        "document_created",
        doc.id,
        json!({"title": doc.title}),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"document": doc_json(&doc, DocRole::Owner)})),
    )
        .into_response())
}

async fn mine(State(node): State<Arc<Node>>, user: AuthUser) -> Result<Json<Value>, ApiError> {
    let list = node.store.documents_for_user(user.id()).await?;
    let docs: Vec<Value> = list.iter().map(|s| doc_json(&s.document, s.role)).collect();
    Ok(Json(json!({ "documents": docs })))
}

async fn one(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let (doc, role) = access(&node, &user, id, ANY).await?;
    let members = node.store.document_members(id).await?;
    Ok(Json(
        json!({"document": doc_json(&doc, role), "members": members}),
    ))
}

async fn rename(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<TitleReq>,
) -> Result<Json<Value>, ApiError> {
    let (_, role) = access(&node, &user, id, WRITERS).await?;
    let doc = node.store.rename_document(id, &title(&req.title)?).await?;
    Ok(Json(json!({"document": doc_json(&doc, role)})))
}

async fn delete_doc(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let (doc, _) = access(&node, &user, id, OWNER).await?;
    node.store.delete_document(id).await?;
    node.collab.deleted(id);
    audit(
        &node,
        user.id(),
        "document_deleted",
        id,
        json!({"title": doc.title}),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleReq {
    role: DocRole,
}

async fn set_member(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath((id, target)): ApiPath<(i64, i64)>,
    ApiJson(req): ApiJson<RoleReq>,
) -> Result<Json<Value>, ApiError> {
    let (doc, _) = access(&node, &user, id, OWNER).await?;
    if req.role == DocRole::Owner {
        return Err(ApiError::BadRequest("role must be editor or viewer".into()));
    }
    if target == doc.owner_id {
        return Err(ApiError::BadRequest(
            "the owner's role cannot change".into(),
        ));
    }
    let before = node.store.document_role(id, target).await?;
    let member = node.store.set_document_member(id, target, req.role).await?;
    if before != Some(req.role) {
        if before.is_some() {
            node.collab
                .disconnect_user(id, &target.to_string(), codec::CLOSE_ACCESS_CHANGED);
        }
        audit(
            &node,
            user.id(),
            "document_shared",
            id,
            json!({"user_id": target, "role": req.role, "before": before}),
        )
        .await?;
        let note = NewNotification {
            user_id: target,
            kind: NotificationKind::Share,
            room_id: None,
            message_id: None,
            actor_id: Some(user.id()),
            data: json!({"document_id": id, "title": doc.title, "role": req.role}),
        };
        if let Err(e) = node.chat.notify(vec![note]).await {
            // The share itself is committed; a lost notification is logged, not fatal.
            tracing::warn!(doc = id, user = target, error = %e, "share notification failed");
        }
    }
    Ok(Json(json!({ "member": member })))
}

async fn remove_member(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath((id, target)): ApiPath<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    // Owners remove anyone; members may leave.
    let allowed = if target == user.id() { ANY } else { OWNER };
    access(&node, &user, id, allowed).await?;
    node.store.remove_document_member(id, target).await?;
    node.collab
        .disconnect_user(id, &target.to_string(), codec::CLOSE_FORBIDDEN);
    audit(
        &node,
        user.id(),
        "document_unshared",
        id,
        json!({"user_id": target}),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct FormatQuery {
    format: Option<String>,
}

fn format(q: &FormatQuery) -> Result<Format, ApiError> {
    match q.format.as_deref().unwrap_or("text") {
        "text" => Ok(Format::Text),
        "json" => Ok(Format::Json),
        "update" => Ok(Format::Update),
        other => Err(ApiError::BadRequest(format!(
            "unknown format {other:?}: use text, json or update"
        ))),
    }
}

fn content_response(c: Content) -> Response {
    match c {
        Content::Text(t) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], t).into_response()
        }
        Content::Json(v) => Json(v).into_response(),
        Content::Update(u) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], u).into_response()
        }
    }
}

async fn content(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<FormatQuery>,
) -> Result<Response, ApiError> {
    let f = format(&q)?;
    access(&node, &user, id, ANY).await?;
    Ok(content_response(node.collab.content(id, f).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EditReq {
    /// Text appended to the `content` text.
    text: Option<String>,
    /// A Yjs update (v1), base64.
    update: Option<String>,
}

/// A server-side edit: `application/octet-stream` (a Yjs update, v1) or JSON
/// `{"text": "..."}` (appended) / `{"update": "<base64>"}`.
async fn updates(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    access(&node, &user, id, WRITERS).await?;
    let binary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    let changed = if binary {
        node.collab.apply_update(id, &body).await?
    } else {
        let req: EditReq =
            crate::rest::extract::json_body(&body, "request body").map_err(ApiError::BadRequest)?;
        match (req.text, req.update) {
            (Some(text), None) => node.collab.append_text(id, &text).await?,
            (None, Some(b64)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|_| ApiError::BadRequest("update is not valid base64".into()))?;
                node.collab.apply_update(id, &bytes).await?
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "send exactly one of text or update (or an application/octet-stream body)"
                        .into(),
                ))
            }
        }
    };
    Ok(Json(json!({ "changed": changed })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelReq {
    label: String,
}

async fn save_version(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<LabelReq>,
) -> Result<Response, ApiError> {
    access(&node, &user, id, WRITERS).await?;
    let label = req.label.trim();
    if label.is_empty() || label.chars().count() > 200 {
        return Err(ApiError::BadRequest(
            "label must have 1 to 200 characters".into(),
        ));
    }
    let v = node
        .collab
        .save_version(id, label, false, Some(user.id()))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"version": version_json(&v)})),
    )
        .into_response())
}

async fn versions(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Value>, ApiError> {
    access(&node, &user, id, ANY).await?;
    let list = node.store.doc_versions(id).await?;
    Ok(Json(
        json!({"versions": list.iter().map(version_json).collect::<Vec<_>>()}),
    ))
}

async fn version(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath((id, v)): ApiPath<(i64, i64)>,
    ApiQuery(q): ApiQuery<FormatQuery>,
) -> Result<Response, ApiError> {
    let f = format(&q)?;
    access(&node, &user, id, ANY).await?;
    let (_, content) = node.collab.version_content(id, v, f).await?;
    Ok(content_response(content))
}

async fn restore(
    State(node): State<Arc<Node>>,
    user: AuthUser,
    ApiPath((id, v)): ApiPath<(i64, i64)>,
) -> Result<Json<Value>, ApiError> {
    access(&node, &user, id, WRITERS).await?;
    let version = node.collab.restore_version(id, v, Some(user.id())).await?;
    audit(
        &node,
        user.id(),
        "version_restored",
        id,
        json!({"version_id": v, "label": version.label}),
    )
    .await?;
    Ok(Json(json!({"restored": version_json(&version)})))
}

use crate::rest::openapi::{Auth, Op};

/// The routes of this module, for `/v1/openapi.json`.
#[rustfmt::skip]
pub const OPS: &[Op] = &[
    Op::new("post", "/v1/documents", Auth::User, "Create a document (the caller owns it; audited)").body("TitleRequest").ok(201, "DocumentResponse"),
    Op::new("get", "/v1/documents", Auth::User, "Documents I own or that are shared with me, most recently updated first").ok(200, "DocumentList"),
    Op::new("get", "/v1/documents/{id}", Auth::User, "A document, my role and its members").ok(200, "DocumentWithMembers").errors(&[403, 404]),
    Op::new("patch", "/v1/documents/{id}", Auth::User, "Rename (owners and editors)").body("TitleRequest").ok(200, "DocumentResponse").errors(&[403, 404]),
    Op::new("delete", "/v1/documents/{id}", Auth::User, "Delete with its history and versions (owner or admin; open connections close with 4410; audited)").ok(204, "").errors(&[403, 404]),
    Op::new("put", "/v1/documents/{id}/members/{user_id}", Auth::User, "Share: set a user's role, editor or viewer (owner; notifies the user; audited)").body("DocRoleRequest").ok(200, "DocMemberResponse").errors(&[403, 404]),
    Op::new("delete", "/v1/documents/{id}/members/{user_id}", Auth::User, "Unshare (owner), or leave (the member); open connections close with 4403").ok(204, "").errors(&[403, 404]),
    Op::new("get", "/v1/documents/{id}/content", Auth::User, "The content: text (the Y.Text `content`), json (every root type) or update (the whole state as a Yjs v1 update)").query(&[("format", "string", "text (default), json or update")]).ok(200, "Object").errors(&[403, 404]),
    Op::new("post", "/v1/documents/{id}/updates", Auth::User, "A server-side edit (owners and editors): an application/octet-stream Yjs v1 update, or JSON {text} (appended) or {update} (base64)").body("EditRequest").ok(200, "EditResponse").errors(&[403, 404]),
    Op::new("post", "/v1/documents/{id}/versions", Auth::User, "Save a named version of the current state (owners and editors)").body("LabelRequest").ok(201, "VersionResponse").errors(&[403, 404]),
    Op::new("get", "/v1/documents/{id}/versions", Auth::User, "Versions, newest first (named and automatic)").ok(200, "VersionList").errors(&[403, 404]),
    Op::new("get", "/v1/documents/{id}/versions/{version}", Auth::User, "A version's content, in the formats of /content").query(&[("format", "string", "text (default), json or update")]).ok(200, "Object").errors(&[403, 404]),
    Op::new("post", "/v1/documents/{id}/versions/{version}/restore", Auth::User, "Make the text what it was in a version, as a new change every client sees at once; the current state is saved first as an automatic version (owners and editors; audited)").ok(200, "RestoreResponse").errors(&[403, 404]),
];

/// The schemas [`OPS`] refers to.
pub fn schemas() -> Value {
    let int = json!({"type": "integer", "format": "int64"});
    let doc_role = json!({"type": "string", "enum": ["owner", "editor", "viewer"]});
    json!({
        "Document": {
            "type": "object",
            "properties": {
                "id": int, "title": {"type": "string"}, "owner_id": int,
                "created_at": int, "updated_at": int, "role": doc_role,
                "path": {"type": "string", "description": "The y-websocket endpoint: ws://HOST/docs/{id}?token=ACCESS_TOKEN"},
            },
        },
        "DocumentResponse": {"type": "object", "properties": {"document": {"$ref": "#/components/schemas/Document"}}},
        "DocumentList": {"type": "object", "properties": {"documents": {"type": "array", "items": {"$ref": "#/components/schemas/Document"}}}},
        "DocMember": {"type": "object", "properties": {"doc_id": int, "user_id": int, "role": doc_role, "added_at": int}},
        "DocMemberResponse": {"type": "object", "properties": {"member": {"$ref": "#/components/schemas/DocMember"}}},
        "DocumentWithMembers": {"type": "object", "properties": {
            "document": {"$ref": "#/components/schemas/Document"},
            "members": {"type": "array", "items": {"$ref": "#/components/schemas/DocMember"}},
        }},
        "TitleRequest": {"type": "object", "required": ["title"], "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 200}}},
        "DocRoleRequest": {"type": "object", "required": ["role"], "properties": {"role": {"type": "string", "enum": ["editor", "viewer"]}}},
        "EditRequest": {"type": "object", "properties": {
            "text": {"type": "string", "description": "Appended to the Y.Text `content`"},
            "update": {"type": "string", "description": "A Yjs v1 update, base64"},
        }},
        "EditResponse": {"type": "object", "properties": {"changed": {"type": "boolean"}}},
        "LabelRequest": {"type": "object", "required": ["label"], "properties": {"label": {"type": "string", "minLength": 1, "maxLength": 200}}},
        "Version": {"type": "object", "properties": {
            "id": int, "doc_id": int, "label": {"type": "string"}, "auto": {"type": "boolean"},
            "created_by": {"type": ["integer", "null"]}, "created_at": int,
            "size": {"type": "integer", "description": "Bytes of the stored state"},
        }},
        "VersionResponse": {"type": "object", "properties": {"version": {"$ref": "#/components/schemas/Version"}}},
        "VersionList": {"type": "object", "properties": {"versions": {"type": "array", "items": {"$ref": "#/components/schemas/Version"}}}},
        "RestoreResponse": {"type": "object", "properties": {"restored": {"$ref": "#/components/schemas/Version"}}},
    })
}

/// Decodes `body` as the handler of `route` (`"METHOD /path"`) does and runs the checks the
/// handler makes before it reaches the store; `None` when `route` is not one of this
/// module's. For the `rest_bodies` fuzz target (see [`crate::fuzzing`]).
#[doc(hidden)]
pub(crate) fn check_body(route: &str, body: &[u8]) -> Option<Result<(), ApiError>> {
    use crate::fuzzing::json;
    Some(match route {
        "POST /v1/documents" | "PATCH /v1/documents/{id}" => {
            json::<TitleReq>(body).and_then(|req| title(&req.title).map(|_| ()))
        }
        "PUT /v1/documents/{id}/members/{user_id}" => json::<RoleReq>(body).and_then(|req| {
            if req.role == DocRole::Owner {
                return Err(ApiError::BadRequest("role must be editor or viewer".into()));
            }
            Ok(())
        }),
        // The JSON form (the binary form is the y-websocket update the `ywebsocket` target
        // covers); `Collab::apply_update` refuses what does not decode before applying.
        "POST /v1/documents/{id}/updates" => serde_json::from_slice::<EditReq>(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
            .and_then(|req| match (req.text, req.update) {
                (Some(_), None) => Ok(()),
                (None, Some(b64)) => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64.as_bytes())
                        .map_err(|_| ApiError::BadRequest("update is not valid base64".into()))?;
                    codec::decode_update(&bytes)
                        .map(|_| ())
                        .ok_or_else(|| ApiError::BadRequest("not a Yjs update".into()))
                }
                _ => Err(ApiError::BadRequest(
                    "send exactly one of text or update".into(),
                )),
            }),
        "POST /v1/documents/{id}/versions" => json::<LabelReq>(body).and_then(|req| {
            let label = req.label.trim();
            if label.is_empty() || label.chars().count() > 200 {
                return Err(ApiError::BadRequest(
                    "label must have 1 to 200 characters".into(),
                ));
            }
            Ok(())
        }),
        _ => return None,
    })
}
