//! JSON variant of the Centrifugo client protocol v2: commands in, replies and pushes out.
//!
//! A WebSocket text frame carries one or more JSON objects separated by `\n`, in both
//! directions. `data` fields are arbitrary JSON and are carried as raw JSON text, never
//! re-encoded. Decoding borrows from the frame, so a command costs no copies until a field has
//! to outlive it.

use std::collections::HashMap;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::codes::ErrorCode;

/// Offsets are numbers in JSON, but some clients send 64-bit values as strings.
fn offset<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num<'a> {
        N(u64),
        S(&'a str),
    }
    match Num::deserialize(d)? {
        Num::N(n) => Ok(n),
        Num::S(s) => s.parse().map_err(de::Error::custom),
    }
}

/// One decoded client command. Exactly one method field is set, or none for a pong (`{}`).
#[derive(Debug, Default, Deserialize)]
pub struct Command<'a> {
    #[serde(default)]
    pub id: u32,
    #[serde(borrow)]
    pub connect: Option<ConnectRequest<'a>>,
    #[serde(borrow)]
    pub subscribe: Option<SubscribeRequest<'a>>,
    #[serde(borrow)]
    pub unsubscribe: Option<ChannelRequest<'a>>,
    #[serde(borrow)]
    pub publish: Option<PublishRequest<'a>>,
    #[serde(borrow)]
    pub presence: Option<ChannelRequest<'a>>,
    #[serde(borrow)]
    pub presence_stats: Option<ChannelRequest<'a>>,
    #[serde(borrow)]
    pub history: Option<HistoryRequest<'a>>,
    #[serde(borrow)]
    pub rpc: Option<RpcRequest<'a>>,
    #[serde(borrow)]
    pub send: Option<SendRequest<'a>>,
    #[serde(borrow)]
    pub refresh: Option<RefreshRequest<'a>>,
    #[serde(borrow)]
    pub sub_refresh: Option<SubRefreshRequest<'a>>,
}

/// The method a command invokes, for dispatch and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Connect,
    Subscribe,
    Unsubscribe,
    Publish,
    Presence,
    PresenceStats,
    History,
    Rpc,
    Send,
    Refresh,
    SubRefresh,
    /// `{}`: the client's answer to a server ping.
    Pong,
}

impl Method {
    pub const ALL: [Method; 12] = [
        Method::Connect,
        Method::Subscribe,
        Method::Unsubscribe,
        Method::Publish,
        Method::Presence,
        Method::PresenceStats,
        Method::History,
        Method::Rpc,
        Method::Send,
        Method::Refresh,
        Method::SubRefresh,
        Method::Pong,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Connect => "connect",
            Method::Subscribe => "subscribe",
            Method::Unsubscribe => "unsubscribe",
            Method::Publish => "publish",
            Method::Presence => "presence",
            Method::PresenceStats => "presence_stats",
            Method::History => "history",
            Method::Rpc => "rpc",
            Method::Send => "send",
            Method::Refresh => "refresh",
            Method::SubRefresh => "sub_refresh",
            Method::Pong => "pong",
        }
    }
}

/// Why a frame could not be decoded into commands. Any of these closes the connection with 3501.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON, or not a command object.
    Malformed(String),
    /// More than one method field in one command.
    AmbiguousMethod,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(e) => write!(f, "malformed command: {e}"),
            DecodeError::AmbiguousMethod => f.write_str("command has more than one method"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl<'a> Command<'a> {
    /// The method this command invokes; errors when it names several.
    pub fn method(&self) -> Result<Method, DecodeError> {
        let present = [
            (self.connect.is_some(), Method::Connect),
            (self.subscribe.is_some(), Method::Subscribe),
            (self.unsubscribe.is_some(), Method::Unsubscribe),
            (self.publish.is_some(), Method::Publish),
            (self.presence.is_some(), Method::Presence),
            (self.presence_stats.is_some(), Method::PresenceStats),
            (self.history.is_some(), Method::History),
            (self.rpc.is_some(), Method::Rpc),
            (self.send.is_some(), Method::Send),
            (self.refresh.is_some(), Method::Refresh),
            (self.sub_refresh.is_some(), Method::SubRefresh),
        ];
        let mut found = None;
        for (is, m) in present {
            if is {
                if found.is_some() {
                    return Err(DecodeError::AmbiguousMethod);
                }
                found = Some(m);
            }
        }
        Ok(found.unwrap_or(Method::Pong))
    }
}

/// Splits a text frame into commands. Blank lines are skipped; an empty frame yields nothing.
pub fn decode_commands(frame: &str) -> Result<Vec<Command<'_>>, DecodeError> {
    let mut out = Vec::new();
    for line in frame.split('\n') {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cmd: Command<'_> =
            serde_json::from_str(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        cmd.method()?;
        out.push(cmd);
    }
    Ok(out)
}

#[derive(Debug, Default, Deserialize)]
pub struct ConnectRequest<'a> {
    #[serde(default, borrow)]
    pub token: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub subs: HashMap<String, SubscribeRequest<'a>>,
    #[serde(default, borrow)]
    pub name: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    pub version: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct SubscribeRequest<'a> {
    #[serde(default, borrow)]
    pub channel: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    pub token: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    pub recover: bool,
    #[serde(default, borrow)]
    pub epoch: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, deserialize_with = "offset")]
    pub offset: u64,
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
    #[serde(default)]
    pub positioned: bool,
    #[serde(default)]
    pub recoverable: bool,
    #[serde(default)]
    pub join_leave: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct ChannelRequest<'a> {
    #[serde(default, borrow)]
    pub channel: std::borrow::Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
pub struct PublishRequest<'a> {
    #[serde(default, borrow)]
    pub channel: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub data: Option<&'a RawValue>,
}

/// A position in a channel's stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    #[serde(default, deserialize_with = "offset")]
    pub offset: u64,
    #[serde(default)]
    pub epoch: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct HistoryRequest<'a> {
    #[serde(default, borrow)]
    pub channel: std::borrow::Cow<'a, str>,
    #[serde(default)]
    pub limit: i32,
    #[serde(default)]
    pub since: Option<StreamPosition>,
    #[serde(default)]
    pub reverse: bool,
}

#[derive(Debug, Deserialize)]
pub struct RpcRequest<'a> {
    #[serde(default, borrow)]
    pub method: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub struct SendRequest<'a> {
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RefreshRequest<'a> {
    #[serde(default, borrow)]
    pub token: std::borrow::Cow<'a, str>,
}

#[derive(Debug, Default, Deserialize)]
pub struct SubRefreshRequest<'a> {
    #[serde(default, borrow)]
    pub channel: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    pub token: std::borrow::Cow<'a, str>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
fn is_zero32(n: &u32) -> bool {
    *n == 0
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// Who published, or who joined or left.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientInfo {
    pub user: String,
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<Box<RawValue>>,
}

/// One message in a channel. `offset` is 0 for channels without history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Publication {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    pub data: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<HashMap<String, String>>,
}

#[derive(Debug, Default, Serialize)]
pub struct ConnectResult {
    pub client: String,
    pub version: String,
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero32")]
    pub ttl: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub subs: HashMap<String, SubscribeResult>,
    #[serde(skip_serializing_if = "is_zero32")]
    pub ping: u32,
    #[serde(skip_serializing_if = "is_false")]
    pub pong: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
}

/// Reply to `subscribe`. The `id` field (channel compaction) is never set, and `delta` is false.
#[derive(Debug, Default, Serialize)]
pub struct SubscribeResult {
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero32")]
    pub ttl: u32,
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<std::sync::Arc<Publication>>,
    #[serde(skip_serializing_if = "is_false")]
    pub recovered: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "is_false")]
    pub was_recovering: bool,
    pub delta: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct PresenceResult {
    pub presence: HashMap<String, ClientInfo>,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceStatsResult {
    pub num_clients: u32,
    pub num_users: u32,
}

#[derive(Debug, Default, Serialize)]
pub struct HistoryResult {
    pub publications: Vec<std::sync::Arc<Publication>>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct RpcResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
}

#[derive(Debug, Default, Serialize)]
pub struct RefreshResult {
    pub client: String,
    pub version: String,
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero32")]
    pub ttl: u32,
}

#[derive(Debug, Default, Serialize)]
pub struct SubRefreshResult {
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero32")]
    pub ttl: u32,
}

/// Body of a `subscribe` push: the server subscribed this connection to a channel.
#[derive(Debug, Default, Serialize)]
pub struct SubscribePush {
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
}

/// Body of an `unsubscribe` push.
#[derive(Debug, Serialize)]
pub struct UnsubscribePush<'a> {
    pub code: u32,
    pub reason: &'a str,
}

/// Body of `join` and `leave` pushes.
#[derive(Debug, Serialize)]
pub struct JoinLeave<'a> {
    pub info: &'a ClientInfo,
}

/// Appends `{"id":ID,"KEY":RESULT}` to `out`.
pub fn encode_reply<T: Serialize>(out: &mut Vec<u8>, id: u32, key: &str, result: &T) {
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa(id as u64).as_bytes());
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    serde_json::to_writer(&mut *out, result).expect("serializing to a Vec cannot fail");
    out.push(b'}');
}

/// Appends `{"id":ID,"error":{...}}` to `out`.
pub fn encode_error(out: &mut Vec<u8>, id: u32, error: &ErrorCode) {
    encode_reply(out, id, "error", error)
}

/// Appends `{"push":{"channel":CHANNEL,"KEY":BODY}}` to `out`.
pub fn encode_push<T: Serialize>(out: &mut Vec<u8>, channel: &str, key: &str, body: &T) {
    out.extend_from_slice(b"{\"push\":{");
    if !channel.is_empty() {
        out.extend_from_slice(b"\"channel\":");
        serde_json::to_writer(&mut *out, channel).expect("serializing to a Vec cannot fail");
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    serde_json::to_writer(&mut *out, body).expect("serializing to a Vec cannot fail");
    out.extend_from_slice(b"}}");
}

/// The publication push for a channel, encoded once per broadcast.
pub fn publication_push(channel: &str, publication: &Publication) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + channel.len() + publication.data.get().len());
    encode_push(&mut out, channel, "pub", publication);
    out
}

/// The server's ping: an empty object. The client answers with an empty command.
pub const PING: &[u8] = b"{}";

fn itoa(n: u64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes;

    #[test]
    fn decodes_several_commands_in_one_frame() {
        let frame = "{\"id\":1,\"connect\":{\"token\":\"t\",\"name\":\"js\"}}\n{\"id\":2,\"subscribe\":{\"channel\":\"news\",\"recover\":true,\"offset\":\"7\",\"epoch\":\"e\"}}\n{}";
        let cmds = decode_commands(frame).unwrap();
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0].method().unwrap(), Method::Connect);
        assert_eq!(
            cmds[0].connect.as_ref().unwrap().token.as_deref(),
            Some("t")
        );
        let sub = cmds[1].subscribe.as_ref().unwrap();
        assert_eq!(
            (sub.channel.as_ref(), sub.recover, sub.offset),
            ("news", true, 7)
        );
        assert_eq!(cmds[2].method().unwrap(), Method::Pong);
    }

    #[test]
    fn publish_data_stays_raw() {
        let cmds =
            decode_commands(r#"{"id":3,"publish":{"channel":"c","data":{"a": [1, 2]}}}"#).unwrap();
        let data = cmds[0].publish.as_ref().unwrap().data.unwrap();
        assert_eq!(data.get(), r#"{"a": [1, 2]}"#);
    }

    #[test]
    fn rejects_garbage_and_ambiguity() {
        assert!(matches!(
            decode_commands("not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_commands("[1,2]"),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            decode_commands(r#"{"id":1,"presence":{"channel":"a"},"history":{"channel":"a"}}"#)
                .unwrap_err(),
            DecodeError::AmbiguousMethod
        );
    }

    #[test]
    fn encodes_replies_and_pushes() {
        let mut out = Vec::new();
        encode_error(&mut out, 4, &codes::ERROR_TOO_MANY_REQUESTS);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":4,"error":{"code":111,"message":"too many requests","temporary":true}}"#
        );
        let p = Publication {
            offset: 9,
            data: RawValue::from_string("{\"x\":1}".into()).unwrap(),
            info: None,
            tags: None,
        };
        let push = publication_push("a\"b", &p);
        assert_eq!(
            String::from_utf8(push).unwrap(),
            r#"{"push":{"channel":"a\"b","pub":{"offset":9,"data":{"x":1}}}}"#
        );
        let mut out = Vec::new();
        encode_reply(&mut out, 2, "subscribe", &SubscribeResult::default());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"id":2,"subscribe":{"delta":false}}"#
        );
    }
}
