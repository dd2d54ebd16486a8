//! `/v1/users/me`: the caller's own account; `/v1/users?username=|ids=`: other users' public
//! profiles (id, username, display name), for showing names and finding people to invite.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_store::{NewAudit, User, UserUpdate};

use crate::accounts;
use crate::node::Node;
use crate::rest::auth::audit;
use crate::rest::error::ApiError;
use crate::rest::extract::{ApiJson, ApiQuery, AuthUser, ClientIp};

/// Most ids one `GET /v1/users?ids=` may ask for.
const MAX_LOOKUP_IDS: usize = 100;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/users", get(lookup))
        .route("/v1/users/me", get(me).patch(patch_me))
}

/// What any signed-in user may see of another: no role, no dates.
fn profile(u: &User) -> Value {
    json!({"id": u.id, "username": u.username, "display_name": u.display_name})
}

#[derive(Deserialize)]
struct Lookup {
    username: Option<String>,
    /// Comma-separated user ids.
    ids: Option<String>,
}

/// Public profiles by username (zero or one) or by ids (those that exist, in the order
/// asked). Usernames are not secret here: registration already tells a taken one.
async fn lookup(
    State(node): State<Arc<Node>>,
    _me: AuthUser,
    ApiQuery(q): ApiQuery<Lookup>,
) -> Result<Json<Value>, ApiError> {
    let mut users = Vec::new();
    match (q.username, q.ids) {
        (Some(name), None) => {
            let name = accounts::normalize_username(&name);
            if let Some(u) = node.store.user_by_username(&name).await? {
                users.push(profile(&u));
            }
        }
        (None, Some(ids)) => {
            let ids: Vec<i64> = ids
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|_| ApiError::BadRequest("ids must be comma-separated integers".into()))?;
            if ids.len() > MAX_LOOKUP_IDS {
                return Err(ApiError::BadRequest(format!(
                    "at most {MAX_LOOKUP_IDS} ids at once"
                )));
            }
            for id in ids {
                if let Some(u) = node.store.user_by_id(id).await? {
                    users.push(profile(&u));
                }
            }
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of username or ids".into(),
            ))
        }
    }
    Ok(Json(json!({ "users": users })))
}

async fn me(me: AuthUser) -> Json<User> {
    Json(me.0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchMe {
    display_name: Option<String>,
    password: Option<PasswordChange>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    current: String,
    new: String,
}

/// Changes the display name and/or the password. A password change needs the current
/// password (wrong: 403, counted like a failed login, so a stolen access token cannot be used
/// to guess it) and signs out every session: all refresh tokens are revoked.
async fn patch_me(
    State(node): State<Arc<Node>>,
    ClientIp(ip): ClientIp,
    me: AuthUser,
    ApiJson(req): ApiJson<PatchMe>,
) -> Result<Json<User>, ApiError> {
    let display_name = req
        .display_name
        .as_deref()
        .map(accounts::validate_display_name)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let mut password_hash = None;
    if let Some(change) = req.password {
        accounts::validate_password(&change.new)
            .map_err(|m| ApiError::BadRequest(format!("new {m}")))?;
        let attempt = node
            .accounts
            .limiter
            .begin(&me.0.username, ip, Instant::now())
            .map_err(|retry| {
                ApiError::TooManyRequests(format!(
                    "too many wrong passwords; try again in {} s",
                    (retry.as_millis() as u64).div_ceil(1000).max(1)
                ))
            })?;
        let hasher = &node.accounts.hasher;
        let ok = hasher
            .verify(Some(me.0.password_hash.clone()), change.current)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if !ok {
            attempt.failed(Instant::now());
            return Err(ApiError::Forbidden("current password is incorrect".into()));
        }
        attempt.succeeded();
        password_hash = Some(
            hasher
                .hash(change.new)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?,
        );
    }
    if display_name.is_none() && password_hash.is_none() {
        return Ok(Json(me.0));
    }
    let changed_password = password_hash.is_some();
    let user = node
        .store
        .update_user(
            me.id(),
            UserUpdate {
                display_name,
                password_hash,
                role: None,
            },
        )
        .await?;
    if changed_password {
        let revoked = node.store.revoke_user_refresh_tokens(me.id()).await?;
        audit(
            &node,
            NewAudit {
                actor_user_id: Some(me.id()),
                action: "password_changed".into(),
                target: format!("user:{}", me.id()),
                detail: json!({"ip": ip.to_string(), "refresh_tokens_revoked": revoked}),
            },
        )
        .await;
    }
    Ok(Json(user))
}

/// Decodes `body` as the handler of `route` (`"METHOD /path"`) does and runs the checks the
/// handler makes before it reaches the store; `None` when `route` is not one of this
/// module's. For the `rest_bodies` fuzz target (see [`crate::fuzzing`]).
#[doc(hidden)]
pub(crate) fn check_body(route: &str, body: &[u8]) -> Option<Result<(), ApiError>> {
    use crate::fuzzing::json;
    Some(match route {
        "PATCH /v1/users/me" => json::<PatchMe>(body).and_then(|req| {
            req.display_name
                .as_deref()
                .map(accounts::validate_display_name)
                .transpose()
                .map_err(ApiError::BadRequest)?;
            if let Some(change) = req.password {
                accounts::validate_password(&change.new)
                    .map_err(|m| ApiError::BadRequest(format!("new {m}")))?;
            }
            Ok(())
        }),
        _ => return None,
    })
}
