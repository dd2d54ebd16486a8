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
///
/// Messages name the field and what is wrong with it in the API's terms. They never carry
/// serde's or axum's wording, which names Rust types (`i64`, `struct RegisterRequest`), nor
/// echo the offending value (see [`describe`]).
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

fn bad_request(message: String) -> BadInput {
    BadInput(axum::http::StatusCode::BAD_REQUEST, message)
}

/// A body that could not be read: too large (413), or cut off.
fn unreadable(e: axum::extract::rejection::BytesRejection) -> BadInput {
    use axum::http::StatusCode;
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        BadInput(e.status(), "request body too large".into())
    } else {
        bad_request("the request body could not be read".into())
    }
}

/// What is wrong with the field at `path` (such as `members[0]`; `.` or empty for the whole
/// value) of `what` (the request body, the query), from a serde error message, in words fit
/// for a client: a missing or unknown field, an unknown enum value (with the accepted ones),
/// or else "has the wrong type or an invalid value". serde's own text for the last kind
/// names Rust types, so it is dropped; the detail goes to the debug log.
pub(crate) fn describe(what: &str, path: &str, serde_message: &str) -> String {
    // serde_json appends the position; the field path says more.
    let msg = serde_message
        .rsplit_once(" at line ")
        .map_or(serde_message, |(m, _)| m);
    let at = if path.is_empty() || path == "." {
        String::new()
    } else {
        format!(" `{path}`")
    };
    for prefix in ["missing field `", "unknown field `", "unknown variant `"] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let name = rest.split('`').next().unwrap_or("");
            let kind = match prefix {
                "missing field `" => "missing field",
                "unknown field `" => "unknown field",
                _ => "unknown value",
            };
            // For enums the accepted values are the API's own words: keep them.
            let expected = match (prefix, rest.split_once(", expected ")) {
                ("unknown variant `", Some((_, e))) => format!(", expected {e}"),
                _ => String::new(),
            };
            let place = if at.is_empty() {
                String::new()
            } else {
                format!(" in{at}")
            };
            return format!("{what}: {kind} `{name}`{place}{expected}");
        }
    }
    tracing::debug!(what, path, error = serde_message, "bad input");
    if at.is_empty() {
        format!("{what} has the wrong shape")
    } else {
        format!("{what}:{at} has the wrong type or an invalid value")
    }
}

/// Deserializes a JSON body (after the size limit), describing failures with [`describe`].
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, String> {
    let not_json = |e: serde_json::Error| {
        format!(
            "{what} is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    };
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() {
            describe(what, &path, &inner.to_string())
        } else {
            not_json(inner)
        }
    })?;
    de.end().map_err(not_json)?;
    Ok(value)
}

/// Whether the request says its body is JSON (`application/json` or `application/*+json`).
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence
        .strip_prefix("application/")
        .is_some_and(|sub| sub == "json" || sub.ends_with("+json"))
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
        if !is_json(req.headers()) {
            return Err(bad_request(
                "expected a JSON body with Content-Type: application/json".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(unreadable)?;
        json_body(&bytes, "request body")
            .map(ApiJson)
            .map_err(bad_request)
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

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, BadInput> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                bad_request(describe(
                    "query",
                    &e.path().to_string(),
                    &e.inner().to_string(),
                ))
            })
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
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                tracing::debug!(error = %e.body_text(), "bad path");
                let key = match e.kind() {
                    ErrorKind::ParseErrorAtKey { key, .. }
                    | ErrorKind::InvalidUtf8InPathParam { key }
                    | ErrorKind::DeserializeError { key, .. } => Some(key.as_str()),
                    _ => None,
                };
                Err(bad_request(match key {
                    Some(key) => format!("invalid `{key}` in the path"),
                    None => "invalid path parameter".into(),
                }))
            }
            Err(_) => Err(bad_request("invalid path".into())),
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
