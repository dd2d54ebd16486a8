//! Who is calling a `/v1` route: `Authorization: Bearer ACCESS_TOKEN`, where the access token
//! is the same JWT a client connects with (`sub` = the user's numeric id).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use switchboard_store::{User, UserRole};

use crate::auth::TokenError;
use crate::node::Node;
use crate::rest::error::ApiError;

/// An authenticated user, read fresh from the store (so role changes apply at once).
#[derive(Debug, Clone)]
pub struct AuthUser(pub User);

impl AuthUser {
    pub fn id(&self) -> i64 {
        self.0.id
    }

    pub fn is_admin(&self) -> bool {
        self.0.role == UserRole::Admin
    }
}

impl FromRequestParts<Arc<Node>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
        let claims = node.verifier.verify_connect(token).map_err(|e| match e {
            TokenError::Expired => ApiError::Unauthorized("access token expired".into()),
            TokenError::Invalid => ApiError::Unauthorized("invalid access token".into()),
        })?;
        let id: i64 = claims
            .sub
            .parse()
            .map_err(|_| ApiError::Unauthorized("token subject is not a user id".into()))?;
        let user = node
            .store
            .user_by_id(id)
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown user".into()))?;
        Ok(AuthUser(user))
    }
}
