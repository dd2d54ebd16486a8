//! The server HTTP API, compatible with Centrifugo's: `POST /api/{method}` with a JSON body,
//! authenticated by `X-API-Key: KEY` or `Authorization: apikey KEY`. Results come back as
//! `{"result": ...}`; failures of a well-formed request as `{"error": {code, message}}` with
//! status 200, as Centrifugo does (a body of the wrong shape is error 107). A body that is not
//! JSON gets 400, a missing or wrong key 401, an unknown method 404.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_hub::BrokerError;
use switchboard_protocol::client::{ClientInfo, PresenceStatsResult, StreamPosition};
use switchboard_protocol::codes::{self, Disconnect, ErrorCode};
use switchboard_protocol::RawValue;

use crate::conn::{history_filter, publish_options};
use crate::node::{Node, API_DISCONNECT};

fn authorized(node: &Node, headers: &HeaderMap) -> bool {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("apikey "))
        });
    key.is_some_and(|k| constant_time_eq(k.as_bytes(), node.api_key.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request is refused before it is carried out.
enum Refused {
    /// At the HTTP level: bad key, body that is not JSON, unknown method.
    Http(StatusCode, String),
    /// A JSON body of the wrong shape: Centrifugo answers these with status 200 and an API
    /// error (107), which `cent` reports as a `CentApiResponseError`.
    Api(ErrorCode),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Http(status, message) => {
                let body = json!({"error": {"code": status.as_u16(), "message": message}});
                (status, Json(body)).into_response()
            }
            Refused::Api(e) => api_error(e),
        }
    }
}

fn api_error(e: ErrorCode) -> Response {
    Json(json!({"error": {"code": e.code, "message": e.message}})).into_response()
}

fn broker_error(e: BrokerError) -> Response {
    match e {
        BrokerError::UnrecoverablePosition => api_error(codes::ERROR_UNRECOVERABLE_POSITION),
        BrokerError::Unavailable(msg) => {
            tracing::warn!(error = %msg, "api: engine unavailable");
            api_error(codes::ERROR_INTERNAL)
        }
    }
}

fn ok(v: Value) -> Response {
    Json(json!({ "result": v })).into_response()
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refused> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        tracing::info!(error = %e, "api: request body is not JSON");
        Refused::Http(StatusCode::BAD_REQUEST, "request body is not JSON".into())
    })?;
    serde_json::from_value(value).map_err(|e| {
        tracing::info!(error = %e, "api: request of the wrong shape");
        Refused::Api(codes::ERROR_BAD_REQUEST)
    })
}

#[derive(Deserialize)]
struct PublishReq {
    channel: String,
    data: Box<RawValue>,
    #[serde(default)]
    skip_history: bool,
    #[serde(default)]
    tags: Option<std::collections::HashMap<String, String>>,
}

#[derive(Deserialize)]
struct BroadcastReq {
    channels: Vec<String>,
    data: Box<RawValue>,
    #[serde(default)]
    skip_history: bool,
}

#[derive(Deserialize)]
struct UserChannelReq {
    user: String,
    channel: String,
    #[serde(default)]
    client: Option<String>,
}

#[derive(Deserialize)]
struct DisconnectBody {
    code: u16,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
struct DisconnectReq {
    user: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    disconnect: Option<DisconnectBody>,
}

#[derive(Deserialize)]
struct ChannelReq {
    channel: String,
}

#[derive(Deserialize)]
struct HistoryReq {
    channel: String,
    #[serde(default)]
    limit: i32,
    #[serde(default)]
    since: Option<StreamPosition>,
    #[serde(default)]
    reverse: bool,
}

#[derive(Deserialize, Default)]
struct ChannelsReq {
    #[serde(default)]
    pattern: String,
}

pub async fn handle(
    State(node): State<Arc<Node>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&node, &headers) {
        let e = Refused::Http(
            StatusCode::UNAUTHORIZED,
            "missing or invalid API key".into(),
        );
        return e.into_response();
    }
    match dispatch(&node, &method, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn dispatch(node: &Arc<Node>, method: &str, body: &[u8]) -> Result<Response, Refused> {
    Ok(match method {
        "publish" => {
            let r: PublishReq = parse(body)?;
            publish(node, &r.channel, r.data, r.skip_history, r.tags).await
        }
        "broadcast" => {
            let r: BroadcastReq = parse(body)?;
            let mut responses = Vec::with_capacity(r.channels.len());
            for channel in &r.channels {
                let resp =
                    match publish_one(node, channel, r.data.clone(), r.skip_history, None).await {
                        Ok(pos) => json!({"result": {"offset": pos.offset, "epoch": pos.epoch}}),
                        Err(e) => json!({"error": {"code": e.code, "message": e.message}}),
                    };
                responses.push(resp);
            }
            ok(json!({ "responses": responses }))
        }
        "subscribe" => {
            let r: UserChannelReq = parse(body)?;
            if node.config.namespace(&r.channel).is_none() {
                return Ok(api_error(codes::ERROR_UNKNOWN_CHANNEL));
            }
            crate::cluster::control_user(node, &r.user, r.client.as_deref(), &r.channel, true)
                .await;
            ok(json!({}))
        }
        "unsubscribe" => {
            let r: UserChannelReq = parse(body)?;
            crate::cluster::control_user(node, &r.user, r.client.as_deref(), &r.channel, false)
                .await;
            ok(json!({}))
        }
        "disconnect" => {
            let r: DisconnectReq = parse(body)?;
            let d = match r.disconnect {
                // Custom codes must be static for the close path; map them to the known set.
                Some(b) => known_disconnect(b.code).unwrap_or_else(|| {
                    tracing::debug!(code = b.code, reason = %b.reason, "api: custom disconnect code mapped to 3503");
                    API_DISCONNECT
                }),
                None => API_DISCONNECT,
            };
            crate::cluster::disconnect_user(node, &r.user, r.client.as_deref(), d).await;
            ok(json!({}))
        }
        "presence" => {
            let r: ChannelReq = parse(body)?;
            match presence_ns(node, &r.channel) {
                Err(e) => api_error(e),
                Ok(()) => match node.hub.presence.presence(&r.channel).await {
                    Ok(p) => {
                        let p: std::collections::HashMap<String, ClientInfo> = p;
                        ok(json!({ "presence": p }))
                    }
                    Err(e) => broker_error(e),
                },
            }
        }
        "presence_stats" => {
            let r: ChannelReq = parse(body)?;
            match presence_ns(node, &r.channel) {
                Err(e) => api_error(e),
                Ok(()) => match node.hub.presence.stats(&r.channel).await {
                    Ok((num_clients, num_users)) => ok(serde_json::to_value(PresenceStatsResult {
                        num_clients,
                        num_users,
                    })
                    .expect("serializable")),
                    Err(e) => broker_error(e),
                },
            }
        }
        "history" => {
            let r: HistoryReq = parse(body)?;
            let owner = node.owner(&r.channel);
            match node.config.namespace(&r.channel) {
                None => api_error(codes::ERROR_UNKNOWN_CHANNEL),
                Some(ns) if ns.history_size == 0 && owner.is_none() => {
                    api_error(codes::ERROR_NOT_AVAILABLE)
                }
                Some(_) => {
                    let f = history_filter(r.limit, r.since, r.reverse);
                    let page = match owner {
                        Some(o) => o.history(&r.channel, &f).await,
                        None => node.hub.broker.history(&r.channel, &f).await,
                    };
                    match page {
                        Ok(page) => ok(json!({
                            "publications": page.publications,
                            "offset": page.position.offset,
                            "epoch": page.position.epoch,
                        })),
                        Err(e) => broker_error(e),
                    }
                }
            }
        }
        "history_remove" => {
            let r: ChannelReq = parse(body)?;
            if node.owner(&r.channel).is_some() {
                // A durable stream is never dropped through this API.
                return Ok(api_error(codes::ERROR_NOT_AVAILABLE));
            }
            match node.hub.broker.remove_history(&r.channel).await {
                Ok(()) => ok(json!({})),
                Err(e) => broker_error(e),
            }
        }
        "channels" => {
            let r: ChannelsReq = parse(body)?;
            let mut channels = serde_json::Map::new();
            for (name, n) in node.hub.channels() {
                if r.pattern.is_empty() || glob_match(&r.pattern, &name) {
                    channels.insert(name, json!({ "num_clients": n }));
                }
            }
            ok(json!({ "channels": channels }))
        }
        "info" => {
            let mut nodes = vec![node_info(node)];
            nodes.extend(node.peers.live(node.config.broker.presence_ttl));
            ok(json!({ "engine": node.hub.broker.name(), "nodes": nodes }))
        }
        _ => {
            let msg = format!("unknown API method {method:?}");
            return Err(Refused::Http(StatusCode::NOT_FOUND, msg));
        }
    })
}

pub fn node_info(node: &Node) -> Value {
    use std::sync::atomic::Ordering;
    json!({
        "uid": node.uid,
        "name": node.config.name,
        "version": env!("CARGO_PKG_VERSION"),
        "num_clients": node.connections.load(Ordering::Relaxed),
        "num_users": node.users.len(),
        "num_channels": node.hub.channels().len(),
        "num_subs": node.metrics.subscriptions.get(),
        "uptime": node.started.elapsed().as_secs(),
    })
}

fn presence_ns(node: &Node, channel: &str) -> Result<(), ErrorCode> {
    presence_ns_of(&node.config, channel)
}

fn presence_ns_of(config: &crate::config::Config, channel: &str) -> Result<(), ErrorCode> {
    match config.namespace(channel) {
        None => Err(codes::ERROR_UNKNOWN_CHANNEL),
        Some(ns) if !ns.presence => Err(codes::ERROR_NOT_AVAILABLE),
        Some(_) => Ok(()),
    }
}

async fn publish_one(
    node: &Node,
    channel: &str,
    data: Box<RawValue>,
    skip_history: bool,
    tags: Option<std::collections::HashMap<String, String>>,
) -> Result<StreamPosition, ErrorCode> {
    if channel.is_empty() {
        return Err(codes::ERROR_BAD_REQUEST);
    }
    let ns = node
        .config
        .namespace(channel)
        .ok_or(codes::ERROR_UNKNOWN_CHANNEL)?;
    if node.owner(channel).is_some() {
        // The owning service assigns these channels' offsets; it has its own write path.
        return Err(codes::ERROR_NOT_AVAILABLE);
    }
    let mut opts = publish_options(ns);
    if skip_history {
        opts.history_size = 0;
    }
    opts.tags = tags;
    node.hub
        .broker
        .publish(channel, data, None, &opts)
        .await
        .map_err(|e| {
            tracing::warn!(channel, error = %e, "api publish failed");
            match e {
                BrokerError::UnrecoverablePosition => codes::ERROR_INTERNAL,
                BrokerError::Unavailable(_) => codes::ERROR_INTERNAL,
            }
        })
}

async fn publish(
    node: &Node,
    channel: &str,
    data: Box<RawValue>,
    skip_history: bool,
    tags: Option<std::collections::HashMap<String, String>>,
) -> Response {
    match publish_one(node, channel, data, skip_history, tags).await {
        Ok(pos) => ok(json!({"offset": pos.offset, "epoch": pos.epoch})),
        Err(e) => api_error(e),
    }
}

pub(crate) fn known_disconnect(code: u16) -> Option<Disconnect> {
    [
        codes::DISCONNECT_SHUTDOWN,
        codes::DISCONNECT_EXPIRED,
        codes::DISCONNECT_FORCE_RECONNECT,
        codes::DISCONNECT_INVALID_TOKEN,
        codes::DISCONNECT_FORCE_NO_RECONNECT,
        codes::DISCONNECT_CONNECTION_LIMIT,
        codes::DISCONNECT_PERMISSION_DENIED,
    ]
    .into_iter()
    .find(|d| d.code == code)
}

/// Glob with `*` (any run) and `?` (one character).
fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Decodes `body` as [`dispatch`] does for `method` and runs its checks that need no node
/// (`config` stands for the node's); the error is the refusal (HTTP or API error code).
/// For the `rest_bodies` fuzz target (see [`crate::fuzzing`]).
#[doc(hidden)]
pub(crate) fn check_body(
    config: &crate::config::Config,
    method: &str,
    body: &[u8],
) -> Result<(), String> {
    let refused = |r: Refused| match r {
        Refused::Http(status, m) => format!("{status}: {m}"),
        Refused::Api(e) => format!("error {}", e.code),
    };
    let known = |channel: &str| -> Result<(), String> {
        if channel.is_empty() {
            return Err("empty channel".into());
        }
        config
            .namespace(channel)
            .map(|ns| drop(publish_options(ns)))
            .ok_or_else(|| "unknown channel".into())
    };
    match method {
        "publish" => {
            let r: PublishReq = parse(body).map_err(refused)?;
            known(&r.channel)
        }
        "broadcast" => {
            let r: BroadcastReq = parse(body).map_err(refused)?;
            r.channels.iter().try_for_each(|c| known(c))
        }
        "subscribe" | "unsubscribe" => {
            let r: UserChannelReq = parse(body).map_err(refused)?;
            known(&r.channel)
        }
        "disconnect" => {
            let r: DisconnectReq = parse(body).map_err(refused)?;
            if let Some(b) = r.disconnect {
                known_disconnect(b.code);
            }
            Ok(())
        }
        "presence" | "presence_stats" => {
            let r: ChannelReq = parse(body).map_err(refused)?;
            presence_ns_of(config, &r.channel).map_err(|e| format!("error {}", e.code))
        }
        "history" => {
            let r: HistoryReq = parse(body).map_err(refused)?;
            known(&r.channel)?;
            history_filter(r.limit, r.since, r.reverse);
            Ok(())
        }
        "history_remove" => parse::<ChannelReq>(body).map(drop).map_err(refused),
        "channels" => {
            let r: ChannelsReq = parse(body).map_err(refused)?;
            for name in [
                "news",
                "chat:1",
                "notifications:#42",
                "system:dashboard",
                "",
            ] {
                glob_match(&r.pattern, name);
            }
            Ok(())
        }
        "info" => Ok(()),
        _ => Err(format!("unknown API method {method:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("chat:*", "chat:1"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("chat:*", "news"));
        assert!(!glob_match("a?c", "ac"));
    }
}
