//! `/v1/auth`: register, login, refresh, logout. The rules live in [`crate::accounts`].
//!
//! Login failures answer 401 with one message whether the username or the password was
//! wrong (an unknown user costs the same argon2 work), and are audited as `login_failed`
//! with a reason. A locked account or address answers 429 with `Retry-After`, before any
//! password is checked; those refusals are not audited one by one (the failure that caused
//! the lockout is, with `locked_out`).

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use switchboard_store::{now_ms, NewAudit, NewUser, RefreshToken, User, UserRole};

use crate::accounts::{self, limiter::Locked};
use crate::node::Node;
use crate::rest::error::ApiError;
use crate::rest::extract::{ApiJson, AuthUser, ClientIp};

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/auth/register", post(register))
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/refresh", post(refresh))
        .route("/v1/auth/logout", post(logout))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    username: String,
    password: String,
    display_name: String,
}

async fn register(
    State(node): State<Arc<Node>>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    accounts::validate_username(&req.username).map_err(ApiError::BadRequest)?;
    accounts::validate_password(&req.password).map_err(ApiError::BadRequest)?;
    let display_name =
        accounts::validate_display_name(&req.display_name).map_err(ApiError::BadRequest)?;
    let username = accounts::normalize_username(&req.username);
    // A cheap early answer for the common case; the store's unique constraint decides.
    if node.store.user_by_username(&username).await?.is_some() {
        return Err(ApiError::Conflict("username is taken".into()));
    }
    let password_hash = node
        .accounts
        .hasher
        .hash(req.password)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let user = node
        .store
        .create_user(NewUser {
            username,
            password_hash,
            display_name,
            role: UserRole::User,
        })
        .await?;
    tracing::debug!(user = user.id, "registered");
    Ok((StatusCode::CREATED, Json(user)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    username: String,
    password: String,
}

/// What login and refresh return.
#[derive(Serialize)]
struct TokenPair {
    access_token: String,
    refresh_token: String,
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
    user: User,
}

async fn login(
    State(node): State<Arc<Node>>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    let accounts = &node.accounts;
    if !accounts.can_sign() {
        return Err(signing_disabled());
    }
    let valid_name = accounts::validate_username(&req.username).is_ok();
    // Invalid usernames cannot exist, but they are still rate limited (and bounded in length).
    let key: String = accounts::normalize_username(&req.username)
        .chars()
        .take(64)
        .collect();
    let attempt = match accounts.limiter.begin(&key, ip, Instant::now()) {
        Ok(a) => a,
        Err(retry) => {
            tracing::debug!(%ip, "login refused: locked");
            return Ok(too_many(retry));
        }
    };
    let user = if valid_name {
        node.store.user_by_username(&key).await?
    } else {
        None
    };
    let ok = accounts
        .hasher
        .verify(user.as_ref().map(|u| u.password_hash.clone()), req.password)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let user = match user {
        Some(user) if ok => user,
        other => {
            let locked = attempt.failed(Instant::now());
            let reason = if other.is_some() {
                "wrong_password"
            } else {
                "unknown_user"
            };
            let name = valid_name.then_some(&key);
            audit_failed_login(&node, other.as_ref(), name, ip, reason, locked).await;
            return Err(ApiError::Unauthorized(
                "invalid username or password".into(),
            ));
        }
    };
    attempt.succeeded();
    purge_expired_if_due(&node);
    let pair = issue(&node, user).await?;
    audit(
        &node,
        NewAudit {
            actor_user_id: Some(pair.user.id),
            action: "login".into(),
            target: format!("user:{}", pair.user.id),
            detail: json!({"ip": ip.to_string()}),
        },
    )
    .await;
    Ok(Json(pair).into_response())
}

async fn audit_failed_login(
    node: &Node,
    user: Option<&User>,
    username: Option<&String>,
    ip: IpAddr,
    reason: &str,
    locked: Locked,
) {
    let mut detail = json!({"reason": reason, "ip": ip.to_string(), "username": username});
    if locked.account || locked.addr {
        let scope = match (locked.account, locked.addr) {
            (true, true) => "account_and_ip",
            (true, false) => "account",
            _ => "ip",
        };
        detail["locked_out"] = json!(scope);
    }
    audit(
        node,
        NewAudit {
            actor_user_id: None,
            action: "login_failed".into(),
            target: match user {
                Some(u) => format!("user:{}", u.id),
                None => format!("username:{}", username.map_or("", |s| s.as_str())),
            },
            detail,
        },
    )
    .await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    refresh_token: String,
}

async fn refresh(
    State(node): State<Arc<Node>>,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    if !node.accounts.can_sign() {
        return Err(signing_disabled());
    }
    let invalid = || ApiError::Unauthorized("invalid refresh token".into());
    let hash = accounts::refresh_token_hash(&req.refresh_token);
    let token = node
        .store
        .find_refresh_token(&hash)
        .await?
        .ok_or_else(invalid)?;
    // `revoke_refresh_token` is the atomic step: of two requests with the same token, only
    // one sees `true`; the other is a reuse like any other.
    if token.revoked || !node.store.revoke_refresh_token(&hash).await? {
        let revoked = node.store.revoke_user_refresh_tokens(token.user_id).await?;
        tracing::info!(
            user = token.user_id,
            revoked,
            "refresh token reused: revoked all of the user's refresh tokens"
        );
        audit(
            &node,
            NewAudit {
                actor_user_id: None,
                action: "refresh_token_reuse".into(),
                target: format!("user:{}", token.user_id),
                detail: json!({"revoked": revoked}),
            },
        )
        .await;
        return Err(ApiError::Unauthorized(
            "refresh token was already used; every session of this user was signed out".into(),
        ));
    }
    if token.expires_at <= now_ms() {
        return Err(ApiError::Unauthorized("refresh token expired".into()));
    }
    let user = node
        .store
        .user_by_id(token.user_id)
        .await?
        .ok_or_else(invalid)?;
    Ok(Json(issue(&node, user).await?))
}

async fn logout(
    State(node): State<Arc<Node>>,
    me: AuthUser,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    let hash = accounts::refresh_token_hash(&req.refresh_token);
    // Idempotent: an unknown or already revoked token is fine, but only one's own tokens
    // are revoked.
    if let Some(token) = node.store.find_refresh_token(&hash).await? {
        if token.user_id == me.id() {
            node.store.revoke_refresh_token(&hash).await?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A new access token and a new stored refresh token for `user`.
async fn issue(node: &Node, user: User) -> Result<TokenPair, ApiError> {
    let (access_token, expires_in) = node
        .accounts
        .access_token(user.id)
        .ok_or_else(signing_disabled)?;
    let (refresh_token, token_hash) = accounts::new_refresh_token();
    node.store
        .store_refresh_token(RefreshToken {
            token_hash,
            user_id: user.id,
            expires_at: node.accounts.refresh_expiry_ms(),
            revoked: false,
        })
        .await?;
    Ok(TokenPair {
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in,
        user,
    })
}

/// Appends to the audit log; a failure is logged, not returned (the action already
/// happened).
pub(crate) async fn audit(node: &Node, entry: NewAudit) {
    let action = entry.action.clone();
    if let Err(e) = node.store.append_audit(entry).await {
        tracing::error!(error = %e, action, "cannot write the audit log");
    }
}

/// Deletes expired refresh tokens at most once an hour, in a tracked task.
fn purge_expired_if_due(node: &Arc<Node>) {
    const EVERY_MS: i64 = 3600 * 1000;
    let now = now_ms();
    let last = node.accounts.last_purge_ms.load(Ordering::Relaxed);
    if now - last < EVERY_MS
        || node
            .accounts
            .last_purge_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let node2 = node.clone();
    node.tasks.spawn(async move {
        match node2.store.purge_expired_refresh_tokens(now).await {
            Ok(n) => tracing::debug!(purged = n, "expired refresh tokens purged"),
            Err(e) => tracing::warn!(error = %e, "cannot purge expired refresh tokens"),
        }
    });
}

fn too_many(retry: Duration) -> Response {
    let secs = (retry.as_millis() as u64).div_ceil(1000).max(1);
    let mut resp =
        ApiError::TooManyRequests(format!("too many failed logins; try again in {secs} s"))
            .into_response();
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        secs.to_string().parse().expect("digits"),
    );
    resp
}

fn signing_disabled() -> ApiError {
    ApiError::Forbidden(
        "password login is disabled: this server verifies RS256 tokens and cannot sign them".into(),
    )
}

/// Decodes `body` as the handler of `route` (`"METHOD /path"`) does and runs the checks the
/// handler makes before it reaches the store; `None` when `route` is not one of this
/// module's. For the `rest_bodies` fuzz target (see [`crate::fuzzing`]).
#[doc(hidden)]
pub(crate) fn check_body(route: &str, body: &[u8]) -> Option<Result<(), ApiError>> {
    use crate::fuzzing::json;
    Some(match route {
        "POST /v1/auth/register" => json::<RegisterRequest>(body).and_then(|req| {
            accounts::validate_username(&req.username).map_err(ApiError::BadRequest)?;
            accounts::validate_password(&req.password).map_err(ApiError::BadRequest)?;
            accounts::validate_display_name(&req.display_name).map_err(ApiError::BadRequest)?;
            accounts::normalize_username(&req.username);
            Ok(())
        }),
        "POST /v1/auth/login" => json::<LoginRequest>(body).map(|req| {
            let _ = accounts::validate_username(&req.username);
            let _key: String = accounts::normalize_username(&req.username)
                .chars()
                .take(64)
                .collect();
        }),
        "POST /v1/auth/refresh" | "POST /v1/auth/logout" => {
            json::<RefreshRequest>(body).map(|req| {
                accounts::refresh_token_hash(&req.refresh_token);
            })
        }
        _ => return None,
    })
}
