//! `/v1/admin`: role changes and the audit log. Admins only (403 for everyone else).

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, patch};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use switchboard_store::{AuditEntry, NewAudit, User, UserRole, UserUpdate};

use crate::node::Node;
use crate::rest::auth::audit;
use crate::rest::error::ApiError;
use crate::rest::extract::{ApiJson, ApiPath, ApiQuery, AuthUser};

/// Audit pages hold at most this many entries.
pub const MAX_AUDIT_PAGE: u32 = 1000;
const DEFAULT_AUDIT_PAGE: u32 = 100;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/admin/users/{id}", patch(patch_user))
        .route("/v1/admin/audit", get(audit_log))
}

/// An [`AuthUser`] that is an admin.
pub struct Admin(pub AuthUser);

impl axum::extract::FromRequestParts<Arc<Node>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        node: &Arc<Node>,
    ) -> Result<Self, ApiError> {
        let user = AuthUser::from_request_parts(parts, node).await?;
        if !user.is_admin() {
            return Err(ApiError::Forbidden("admins only".into()));
        }
        Ok(Admin(user))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchUser {
    role: UserRole,
}

/// Sets a user's role; a change is audited as `role_change`. Admins cannot change their own
/// role (409), so the last admin cannot lock everyone out by accident.
async fn patch_user(
    State(node): State<Arc<Node>>,
    Admin(admin): Admin,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<PatchUser>,
) -> Result<Json<User>, ApiError> {
    let user = node
        .store
        .user_by_id(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no user {id}")))?;
    if user.role == req.role {
        return Ok(Json(user));
    }
    if id == admin.id() {
        return Err(ApiError::Conflict(
            "admins cannot change their own role".into(),
        ));
    }
    let updated = node
        .store
        .update_user(
            id,
            UserUpdate {
                role: Some(req.role),
                ..Default::default()
            },
        )
        .await?;
    tracing::info!(admin = admin.id(), user = id, role = %req.role, "role changed");
    audit(
        &node,
        NewAudit {
            actor_user_id: Some(admin.id()),
            action: "role_change".into(),
            target: format!("user:{id}"),
            detail: json!({"from": user.role, "to": req.role}),
        },
    )
    .await;
    Ok(Json(updated))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    before: Option<i64>,
    limit: Option<u32>,
}

#[derive(Serialize)]
struct AuditPage {
    /// Newest first.
    entries: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before: Option<i64>,
}

async fn audit_log(
    State(node): State<Arc<Node>>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_AUDIT_PAGE);
    if !(1..=MAX_AUDIT_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_AUDIT_PAGE}"
        )));
    }
    let entries = node.store.audit_log(q.before, limit).await?;
    let next_before = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditPage {
        entries,
        next_before,
    }))
}

/// Decodes `body` as the handler of `route` (`"METHOD /path"`) does and runs the checks the
/// handler makes before it reaches the store; `None` when `route` is not one of this
/// module's. For the `rest_bodies` fuzz target (see [`crate::fuzzing`]).
#[doc(hidden)]
pub(crate) fn check_body(route: &str, body: &[u8]) -> Option<Result<(), ApiError>> {
    use crate::fuzzing::json;
    Some(match route {
        "PATCH /v1/admin/users/{id}" => json::<PatchUser>(body).map(|_| ()),
        _ => return None,
    })
}
