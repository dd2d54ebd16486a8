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

/// A bad request body, query or path, answered in the API's JSON error shape (axum's own
/// rejections are plain text). Body-too-large keeps its 413.
#[derive(Debug)]
pub struct BadInput(axum::http::StatusCode, String);

impl axum::response::IntoResponse for BadInput {
    fn into_response(self) -> axum::response::Response {
        use axum::http::StatusCode;
        let code = match self.0 {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            _ => "bad_request",
        };
        let body = serde_json::json!({"error": {"code": code, "message": self.1}});
        (self.0, axum::Json(body)).into_response()
    }
}

fn bad_input(status: axum::http::StatusCode, text: String) -> BadInput {
    use axum::http::StatusCode;
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => BadInput(status, "request body too large".into()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => BadInput(
            StatusCode::BAD_REQUEST,
            "expected a JSON body with Content-Type: application/json".into(),
        ),
        _ => BadInput(StatusCode::BAD_REQUEST, text),
    }
}

/// `axum::Json` with [`BadInput`] rejections.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = BadInput;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, BadInput> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(bad_input(e.status(), e.body_text())),
        }
    }
}

/// `axum::extract::Query` with [`BadInput`] rejections.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = BadInput;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, BadInput> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(bad_input(e.status(), e.body_text())),
        }
    }
}

/// `axum::extract::Path` with [`BadInput`] rejections.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = BadInput;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, BadInput> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(bad_input(e.status(), e.body_text())),
        }
    }
}

/// The client's address: the TCP peer (the accept loop attaches it as
/// `ConnectInfo<SocketAddr>`). Proxies are not trusted: behind one, every client has the
/// proxy's address. Unspecified (`0.0.0.0`) when the request did not come through
/// [`crate::server::serve`].
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub std::net::IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::ConnectInfo;
        use std::net::{IpAddr, Ipv4Addr, SocketAddr};
        Ok(ClientIp(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip()),
        ))
    }
}
