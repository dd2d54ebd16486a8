//! Multi-site: `/v1/admin/sites` (admins create, list and change sites; audited) and
//! `POST /v1/sites/{id}/tokens`, with which a site's backend, authenticated by its site key
//! (`X-Site-Key`), mints connection tokens for its own users.
//!
//! A site user is a store user bound to `(site_id, external_id)`, provisioned on its first
//! token. Its username is derived (`s{site_id}_{external_id}`, see
//! [`crate::sites::site_username`]) and its password hash is unusable, so it cannot log in
//! with a password. Its access token is an ordinary connection JWT (`sub` = user id): it
//! connects and uses the chat REST API like any account, and shares rooms with users of
//! other sites and ordinary accounts.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{patch, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_store::{
    NewAudit, NewSite, NewUser, Site, SiteUpdate, StoreError, User, UserRole, UserUpdate,
};

use crate::accounts;
use crate::node::Node;
use crate::rest::admin::Admin;
use crate::rest::auth::audit;
use crate::rest::error::ApiError;
use crate::rest::extract::{ApiJson, ApiPath};
use crate::rest::openapi::{Auth, Op};
use crate::sites::{new_site_key, normalize_origin, site_key_hash, site_username};

/// Allowed origins one site may list.
pub const MAX_ORIGINS: usize = 64;
/// External ids are 1 to this many characters.
pub const MAX_EXTERNAL_ID: usize = 128;
/// The longest token a site may ask for (`ttl`, seconds).
pub const MAX_TOKEN_TTL: u64 = 24 * 3600;
/// The header carrying a site key.
pub const SITE_KEY_HEADER: &str = "x-site-key";
/// The password hash of site users: not a PHC string, so no password ever matches.
const NO_PASSWORD: &str = "!site-user";

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/admin/sites", post(create).get(list))
        .route("/v1/admin/sites/{id}", patch(update))
        .route("/v1/sites/{id}/tokens", post(mint))
}

/// The OpenAPI operations of this module, for `rest::openapi`.
#[rustfmt::skip]
pub const OPS: &[Op] = &[
    Op::new("post", "/v1/admin/sites", Auth::Admin, "Create a site; its site key is returned once, here (audited)").body("CreateSite").ok(201, "CreatedSite"),
    Op::new("get", "/v1/admin/sites", Auth::Admin, "Every site, by id").ok(200, "SiteList"),
    Op::new("patch", "/v1/admin/sites/{id}", Auth::Admin, "Rename a site or replace its allowed origins (audited)").body("PatchSite").ok(200, "Site").errors(&[404]),
    Op::new("post", "/v1/sites/{id}/tokens", Auth::SiteKey, "A site's backend mints a connection token for one of its users, provisioning the user on first use").body("MintToken").ok(200, "SiteToken"),
];

/// The schemas [`OPS`] refers to.
pub fn schemas() -> Value {
    let int = json!({"type": "integer", "format": "int64"});
    let origins = json!({"type": "array", "maxItems": MAX_ORIGINS, "items": {"type": "string", "description": "scheme://host[:port]"}});
    json!({
        "Site": {"type": "object", "required": ["id", "name", "allowed_origins", "created_at"], "properties": {
            "id": int,
            "name": {"type": "string"},
            "allowed_origins": origins,
            "created_at": int,
        }},
        "CreateSite": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "allowed_origins": origins,
        }},
        "CreatedSite": {"type": "object", "required": ["site", "site_key"], "properties": {
            "site": {"$ref": "#/components/schemas/Site"},
            "site_key": {"type": "string", "description": "Shown only here; the server keeps a hash. Send it as X-Site-Key"},
        }},
        "SiteList": {"type": "object", "required": ["sites"], "properties": {
            "sites": {"type": "array", "items": {"$ref": "#/components/schemas/Site"}},
        }},
        "PatchSite": {"type": "object", "additionalProperties": false, "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "allowed_origins": origins,
        }},
        "MintToken": {"type": "object", "required": ["external_id"], "additionalProperties": false, "properties": {
            "external_id": {"type": "string", "minLength": 1, "maxLength": MAX_EXTERNAL_ID, "description": "The site's own id for the user"},
            "display_name": {"type": "string", "minLength": 1, "maxLength": 64, "description": "Set on the first token; a later one changes it"},
            "ttl": {"type": "integer", "minimum": 1, "maximum": MAX_TOKEN_TTL, "description": "Seconds; default the access token lifetime"},
        }},
        "SiteToken": {"type": "object", "required": ["access_token", "token_type", "expires_in", "user", "site_id", "external_id"], "properties": {
            "access_token": {"type": "string", "description": "A connection token, also a bearer token for this API"},
            "token_type": {"type": "string", "enum": ["Bearer"]},
            "expires_in": {"type": "integer", "description": "Seconds"},
            "user": {"$ref": "#/components/schemas/User"},
            "site_id": int,
            "external_id": {"type": "string"},
        }},
    })
}

fn validate_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if !(1..=64).contains(&name.chars().count()) || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "name must be 1 to 64 characters, without control characters".into(),
        ));
    }
    Ok(name.to_string())
}

fn validate_origins(origins: &[String]) -> Result<Vec<String>, ApiError> {
    if origins.len() > MAX_ORIGINS {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_ORIGINS} allowed_origins"
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(origins.len());
    for o in origins {
        let o = normalize_origin(o).map_err(ApiError::BadRequest)?;
        if !out.contains(&o) {
            out.push(o);
        }
    }
    Ok(out)
}

/// Refreshes the node's cached site origins after a change. A failure is logged: the
/// change is committed, and the next change or restart reloads.
async fn reload_origins(node: &Node) {
    if let Err(e) = node.site_origins.reload(&*node.store).await {
        tracing::error!(error = %e, "cannot reload site origins");
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSite {
    name: String,
    #[serde(default)]
    allowed_origins: Vec<String>,
}

#[derive(Serialize)]
struct CreatedSite {
    site: Site,
    site_key: String,
}

async fn create(
    State(node): State<Arc<Node>>,
    Admin(admin): Admin,
    ApiJson(req): ApiJson<CreateSite>,
) -> Result<(StatusCode, Json<CreatedSite>), ApiError> {
    let name = validate_name(&req.name)?;
    let allowed_origins = validate_origins(&req.allowed_origins)?;
    let (site_key, key_hash) = new_site_key();
    let site = node
        .store
        .create_site(NewSite {
            name,
            key_hash,
            allowed_origins,
        })
        .await?;
    reload_origins(&node).await;
    tracing::info!(admin = admin.id(), site = site.id, "site created");
    audit(
        &node,
        NewAudit {
            actor_user_id: Some(admin.id()),
            action: "site_created".into(),
            target: format!("site:{}", site.id),
            detail: json!({"name": site.name, "allowed_origins": site.allowed_origins}),
        },
    )
    .await;
    Ok((StatusCode::CREATED, Json(CreatedSite { site, site_key })))
}

async fn list(State(node): State<Arc<Node>>, _admin: Admin) -> Result<Json<Value>, ApiError> {
    let sites = node.store.sites().await?;
    Ok(Json(json!({ "sites": sites })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchSite {
    name: Option<String>,
    allowed_origins: Option<Vec<String>>,
}

async fn update(
    State(node): State<Arc<Node>>,
    Admin(admin): Admin,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<PatchSite>,
) -> Result<Json<Site>, ApiError> {
    let name = req.name.as_deref().map(validate_name).transpose()?;
    let allowed_origins = req
        .allowed_origins
        .as_deref()
        .map(validate_origins)
        .transpose()?;
    let before = node
        .store
        .site(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no site {id}")))?;
    let site = node
        .store
        .update_site(
            id,
            SiteUpdate {
                name,
                allowed_origins,
            },
        )
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::NotFound(format!("no site {id}")),
            other => other.into(),
        })?;
    reload_origins(&node).await;
    audit(
        &node,
        NewAudit {
            actor_user_id: Some(admin.id()),
            action: "site_updated".into(),
            target: format!("site:{id}"),
            detail: json!({
                "from": {"name": before.name, "allowed_origins": before.allowed_origins},
                "to": {"name": site.name, "allowed_origins": site.allowed_origins},
            }),
        },
    )
    .await;
    Ok(Json(site))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintToken {
    external_id: String,
    display_name: Option<String>,
    ttl: Option<u64>,
}

#[derive(Serialize)]
struct SiteToken {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    user: User,
    site_id: i64,
    external_id: String,
}

/// Equal strings in time independent of where they differ (both are hex SHA-256s).
fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn mint(
    State(node): State<Arc<Node>>,
    ApiPath(id): ApiPath<i64>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<MintToken>,
) -> Result<Json<SiteToken>, ApiError> {
    let key = headers
        .get(SITE_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::Unauthorized("missing X-Site-Key".into()))?;
    // An unknown site and a wrong key (including another site's) answer alike.
    let site = node.store.site(id).await?;
    if !site.is_some_and(|s| same_hash(&s.key_hash, &site_key_hash(key))) {
        return Err(ApiError::Unauthorized("invalid site key".into()));
    }
    let external_id = req.external_id;
    let n = external_id.chars().count();
    if !(1..=MAX_EXTERNAL_ID).contains(&n) || external_id.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "external_id must be 1 to {MAX_EXTERNAL_ID} characters, without control characters"
        )));
    }
    let display_name = req
        .display_name
        .as_deref()
        .map(accounts::validate_display_name)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let ttl = req
        .ttl
        .unwrap_or(node.accounts.config.access_token_ttl.as_secs());
    if !(1..=MAX_TOKEN_TTL).contains(&ttl) {
        return Err(ApiError::BadRequest(format!(
            "ttl must be between 1 and {MAX_TOKEN_TTL} seconds"
        )));
    }
    let user = match node.store.site_user(id, &external_id).await? {
        Some(user) => match display_name {
            Some(name) if name != user.display_name => {
                node.store
                    .update_user(
                        user.id,
                        UserUpdate {
                            display_name: Some(name),
                            ..Default::default()
                        },
                    )
                    .await?
            }
            _ => user,
        },
        None => provision(&node, id, &external_id, display_name).await?,
    };
    let (access_token, expires_in) = node
        .accounts
        .access_token_for(user.id, ttl)
        .ok_or_else(|| {
            ApiError::Forbidden(
                "this server verifies RS256 tokens and cannot sign them: sites mint tokens themselves".into(),
            )
        })?;
    Ok(Json(SiteToken {
        access_token,
        token_type: "Bearer",
        expires_in,
        user,
        site_id: id,
        external_id,
    }))
}

/// Creates the site's user for `external_id`, trying derived usernames until one is free
/// (another account may hold one). A concurrent first token for the same user wins the
/// race harmlessly: the loser reads the winner's user.
async fn provision(
    node: &Node,
    site_id: i64,
    external_id: &str,
    display_name: Option<String>,
) -> Result<User, ApiError> {
    let display_name =
        display_name.unwrap_or_else(|| external_id.trim().chars().take(64).collect());
    let display_name = if display_name.is_empty() {
        site_username(site_id, external_id, 0)
    } else {
        display_name
    };
    for attempt in 0..5 {
        let created = node
            .store
            .create_site_user(
                site_id,
                external_id,
                NewUser {
                    username: site_username(site_id, external_id, attempt),
                    password_hash: NO_PASSWORD.into(),
                    display_name: display_name.clone(),
                    role: UserRole::User,
                },
            )
            .await;
        match created {
            Ok(user) => {
                audit(
                    node,
                    NewAudit {
                        actor_user_id: None,
                        action: "site_user_created".into(),
                        target: format!("user:{}", user.id),
                        detail: json!({"site_id": site_id, "external_id": external_id, "username": user.username}),
                    },
                )
                .await;
                return Ok(user);
            }
            Err(StoreError::Conflict(_)) => {
                if let Some(user) = node.store.site_user(site_id, external_id).await? {
                    return Ok(user);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(
        "no free username for this external_id".into(),
    ))
}

/// Decodes `body` as the handler of `route` (`"METHOD /path"`) does and runs the checks the
/// handler makes before it reaches the store; `None` when `route` is not one of this
/// module's. For the `rest_bodies` fuzz target (see [`crate::fuzzing`]).
#[doc(hidden)]
pub(crate) fn check_body(route: &str, body: &[u8]) -> Option<Result<(), ApiError>> {
    use crate::fuzzing::json;
    Some(match route {
        "POST /v1/admin/sites" => json::<CreateSite>(body).and_then(|req| {
            validate_name(&req.name)?;
            validate_origins(&req.allowed_origins)?;
            Ok(())
        }),
        "PATCH /v1/admin/sites/{id}" => json::<PatchSite>(body).and_then(|req| {
            req.name.as_deref().map(validate_name).transpose()?;
            req.allowed_origins
                .as_deref()
                .map(validate_origins)
                .transpose()?;
            Ok(())
        }),
        "POST /v1/sites/{id}/tokens" => json::<MintToken>(body).and_then(|req| {
            let external_id = req.external_id;
            let n = external_id.chars().count();
            if !(1..=MAX_EXTERNAL_ID).contains(&n) || external_id.chars().any(char::is_control) {
                return Err(ApiError::BadRequest("external_id".into()));
            }
            let display_name = req
                .display_name
                .as_deref()
                .map(accounts::validate_display_name)
                .transpose()
                .map_err(ApiError::BadRequest)?;
            if !(1..=MAX_TOKEN_TTL).contains(&req.ttl.unwrap_or(900)) {
                return Err(ApiError::BadRequest("ttl".into()));
            }
            // What `provision` derives for a new site user.
            let display_name =
                display_name.unwrap_or_else(|| external_id.trim().chars().take(64).collect());
            let _ = display_name;
            for attempt in 0..5 {
                site_username(1, &external_id, attempt);
            }
            Ok(())
        }),
        _ => return None,
    })
}
