//! WebSocket details the server needs beyond tungstenite's reader: the upgrade handshake
//! checks and server-side frame encoding (unmasked, so one encoding serves every receiver).

use std::collections::HashSet;

use bytes::Bytes;
use http::HeaderMap;
use switchboard_protocol::codes::Disconnect;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Frames `payload` as one final text frame.
pub fn text_frame(payload: &[u8]) -> Bytes {
    frame(OpCode::Data(Data::Text), payload)
}

/// Frames `payload` as one final binary frame.
pub fn binary_frame(payload: &[u8]) -> Bytes {
    frame(OpCode::Data(Data::Binary), payload)
}

/// A Ping frame with an empty payload.
pub fn ping_frame() -> Bytes {
    frame(OpCode::Control(Control::Ping), &[])
}

/// A Close frame carrying a disconnect code and reason.
pub fn close_frame(d: Disconnect) -> Bytes {
    let mut payload = Vec::with_capacity(2 + d.reason.len());
    payload.extend_from_slice(&d.code.to_be_bytes());
    payload.extend_from_slice(d.reason.as_bytes());
    frame(OpCode::Control(Control::Close), &payload)
}

fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 10);
    FrameHeader {
        opcode,
        ..FrameHeader::default()
    }
    .format(payload.len() as u64, &mut out)
    .expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Length of the header `text_frame` puts before a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Why an upgrade request is refused (HTTP status, message).
pub type Refusal = (http::StatusCode, &'static str);

/// The subprotocols `/connection/websocket` accepts (besides none).
pub const CENTRIFUGE_PROTOCOLS: &[&str] = &["centrifuge-json"];

/// Checks an upgrade request; returns the `Sec-WebSocket-Accept` value and the chosen
/// subprotocol. No subprotocol, or one of `supported`, is accepted.
pub fn check_upgrade(
    headers: &HeaderMap,
    supported: &[&'static str],
) -> Result<(String, Option<&'static str>), Refusal> {
    let bad = http::StatusCode::BAD_REQUEST;
    let has_token = |name: http::header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has_token(http::header::CONNECTION, "upgrade")
        || !has_token(http::header::UPGRADE, "websocket")
    {
        return Err((
            http::StatusCode::UPGRADE_REQUIRED,
            "expected a WebSocket upgrade",
        ));
    }
    if headers
        .get(http::header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err((bad, "unsupported WebSocket version"));
    }
    let key = headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .ok_or((bad, "missing Sec-WebSocket-Key"))?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let offered: Vec<String> = headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect();
    let protocol = if offered.is_empty() {
        None
    } else if let Some(p) = supported.iter().find(|s| offered.iter().any(|p| p == *s)) {
        Some(*p)
    } else {
        return Err((bad, "unsupported subprotocol"));
    };
    Ok((accept, protocol))
}

/// Whether a browser origin may connect. No Origin header (a non-browser client) is always
/// allowed, since origins only protect browsers. Otherwise the origin must be in the global
/// `allowed` list (`"*"` allows any) or in `sites` (every site's allowed origins,
/// lower-cased). With an empty global list and no site origins, any origin is allowed
/// (the quick-start default); once any site lists an origin, an empty global list no longer
/// means "any": only site origins are allowed.
pub fn origin_allowed(allowed: &[String], sites: &HashSet<String>, headers: &HeaderMap) -> bool {
    if allowed.is_empty() && sites.is_empty() {
        return true;
    }
    match headers
        .get(http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(origin) => {
            allowed
                .iter()
                .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
                || sites.contains(&origin.to_ascii_lowercase())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_match_rfc6455_lengths() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let f = text_frame(&vec![b'x'; len]);
            assert_eq!(f.len(), len + header_len(len));
            assert_eq!(f[0], 0x81);
        }
        let c = close_frame(switchboard_protocol::codes::DISCONNECT_SLOW);
        assert_eq!(&c[..], &[0x88, 6, 0x0b, 0xc0, b's', b'l', b'o', b'w']);
    }

    #[test]
    fn upgrade_checks() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("sec-websocket-version", "13".parse().unwrap());
        h.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        let (accept, proto) = check_upgrade(&h, CENTRIFUGE_PROTOCOLS).unwrap();
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(proto, None);
        assert!(check_upgrade(&h, &[]).is_ok());
        h.insert(
            "sec-websocket-protocol",
            "centrifuge-protobuf".parse().unwrap(),
        );
        assert!(check_upgrade(&h, CENTRIFUGE_PROTOCOLS).is_err());
        h.insert("sec-websocket-protocol", "centrifuge-json".parse().unwrap());
        assert_eq!(
            check_upgrade(&h, CENTRIFUGE_PROTOCOLS).unwrap().1,
            Some("centrifuge-json")
        );

        let allowed = vec!["https://app.example".to_string()];
        let none = HashSet::new();
        assert!(origin_allowed(&allowed, &none, &h));
        h.insert("origin", "https://evil.example".parse().unwrap());
        assert!(!origin_allowed(&allowed, &none, &h));
        assert!(origin_allowed(&[], &none, &h));

        // Site origins: allowed alongside the global list; once any exists, an empty global
        // list no longer allows every origin.
        let sites: HashSet<String> = ["https://shop.example".to_string()].into();
        assert!(!origin_allowed(&[], &sites, &h));
        assert!(!origin_allowed(&allowed, &sites, &h));
        h.insert("origin", "https://Shop.Example".parse().unwrap());
        assert!(origin_allowed(&[], &sites, &h));
        assert!(origin_allowed(&allowed, &sites, &h));
        h.insert("origin", "https://app.example".parse().unwrap());
        assert!(origin_allowed(&allowed, &sites, &h));
        assert!(origin_allowed(&["*".to_string()], &sites, &h));
        h.remove("origin");
        assert!(origin_allowed(&[], &sites, &h));
    }
}
