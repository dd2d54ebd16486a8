//! Entry points for the fuzz targets in `fuzz/` (hidden from the docs; not an API).
//!
//! Each function decodes untrusted input exactly as the server does on its way in, and
//! runs the checks that need no node, store or socket. The decoders themselves are the
//! server's: [`switchboard_protocol::client::decode_commands`] for WebSocket text frames,
//! [`Config::from_layers`] for the config, the `ApiJson` extractor and each handler's
//! checks for REST bodies (`check_body` next to each handler), and `api::check_body` for
//! the server API.

use axum::extract::FromRequest;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use switchboard_protocol::client::{self as proto, DecodeError, Method};

use crate::config::Config;
use crate::rest::error::ApiError;
use crate::rest::extract::ApiJson;

/// Decodes a text frame as `Session::handle_frame` does, then derives from each command
/// what its handler derives before it touches the node (method, history filter, channel
/// and recovery position). Returns the number of commands.
pub fn client_frame(text: &str) -> Result<usize, DecodeError> {
    let commands = proto::decode_commands(text)?;
    for cmd in &commands {
        let method = cmd.method()?;
        method.name();
        if let Some(h) = &cmd.history {
            crate::conn::history_filter(h.limit, h.since.clone(), h.reverse);
        }
        if let Some(s) = &cmd.subscribe {
            // The recovery request a subscribe turns into (`Session::subscribe`).
            let _ = s
                .recover
                .then(|| (s.offset, s.epoch.as_deref().unwrap_or("").to_string()));
        }
        if let Some(c) = &cmd.connect {
            for (channel, s) in &c.subs {
                let _ = (channel.len(), s.offset, s.epoch.as_deref());
            }
        }
        debug_assert!(method == Method::Pong || Method::ALL.contains(&method));
    }
    Ok(commands.len())
}

/// The routes with a JSON body, as `"METHOD /path"`; [`rest_body`] takes these.
pub const REST_BODIES: &[&str] = &[
    "POST /v1/auth/register",
    "POST /v1/auth/login",
    "POST /v1/auth/refresh",
    "POST /v1/auth/logout",
    "PATCH /v1/admin/users/{id}",
    "PATCH /v1/users/me",
    "POST /v1/rooms",
    "POST /v1/rooms/{id}/invite",
    "POST /v1/rooms/{id}/kick",
    "PUT /v1/rooms/{id}/members/{user_id}",
    "POST /v1/rooms/{id}/messages",
    "POST /v1/rooms/{id}/mute",
    "POST /v1/documents",
    "PATCH /v1/documents/{id}",
    "PUT /v1/documents/{id}/members/{user_id}",
    "POST /v1/documents/{id}/updates",
    "POST /v1/documents/{id}/versions",
    "POST /v1/moderation/messages/{id}/remove",
    "POST /v1/moderation/messages/{id}/restore",
    "POST /v1/moderation/users/{id}/ban",
    "POST /v1/notifications/read",
    "POST /v1/admin/sites",
    "PATCH /v1/admin/sites/{id}",
    "POST /v1/sites/{id}/tokens",
];

/// The server API's methods (`POST /api/{method}`); [`api_body`] takes these.
pub const API_METHODS: &[&str] = &[
    "publish",
    "broadcast",
    "subscribe",
    "unsubscribe",
    "disconnect",
    "presence",
    "presence_stats",
    "history",
    "history_remove",
    "channels",
    "info",
];

/// Decodes a REST body for `route` (one of [`REST_BODIES`]) as its handler does, with the
/// handler's checks; the error is what the client would be told.
pub fn rest_body(route: &str, body: &[u8]) -> Result<(), String> {
    use crate::rest::*;
    let checked = auth::check_body(route, body)
        .or_else(|| admin::check_body(route, body))
        .or_else(|| users::check_body(route, body))
        .or_else(|| rooms::check_body(route, body))
        .or_else(|| documents::check_body(route, body))
        .or_else(|| moderation::check_body(route, body))
        .or_else(|| notifications::check_body(route, body))
        .or_else(|| sites::check_body(route, body));
    match checked {
        Some(r) => r.map_err(|e| format!("{e:?}")),
        None => panic!("{route:?} is not in REST_BODIES"),
    }
}

/// Decodes a server API body for `method` (one of [`API_METHODS`]) as `api::handle` does,
/// with the checks that need only the config.
pub fn api_body(config: &Config, method: &str, body: &[u8]) -> Result<(), String> {
    crate::api::check_body(config, method, body)
}

/// `body` through the handlers' `ApiJson` extractor, as a `Content-Type: application/json`
/// request.
pub(crate) fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/")
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(body.to_vec()))
        .expect("a valid request");
    match ApiJson::<T>::from_request(req, &())
        .now_or_never()
        .expect("a body in memory is read at once")
    {
        Ok(ApiJson(v)) => Ok(v),
        Err(e) => Err(ApiError::BadRequest(format!("{e:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rest_body_route_is_checked() {
        for route in REST_BODIES {
            // Panics for a route no module claims.
            let _ = rest_body(route, b"{}");
        }
        assert!(rest_body(
            "POST /v1/auth/register",
            br#"{"username":"alice","password":"correct horse","display_name":"Alice"}"#
        )
        .is_ok());
        assert!(rest_body("POST /v1/auth/register", br#"{"username":"a"}"#).is_err());
        let config = Config::load(None, Vec::new(), &[]).unwrap();
        for method in API_METHODS {
            let _ = api_body(&config, method, b"{}");
        }
        assert!(api_body(&config, "publish", br#"{"channel":"news","data":{}}"#).is_ok());
        assert!(api_body(&config, "publish", br#"{"channel":"nope:1","data":{}}"#).is_err());
        assert_eq!(client_frame("{\"id\":1,\"connect\":{}}\n{}"), Ok(2));
    }
}
