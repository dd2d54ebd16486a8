//! WebSocket details the server needs beyond tungstenite's reader: the upgrade handshake
//! checks, the per-address connection rate, and server-side frame encoding (unmasked, so one
//! encoding serves every receiver).
//!
//! No extension is ever negotiated: an offered `permessage-deflate` is ignored (the reply
//! has no `Sec-WebSocket-Extensions`), so nothing a client sends is inflated, and a frame
//! with a reserved bit set fails the connection.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// The most client addresses [`ConnectionRate`] tracks at once.
pub const MAX_TRACKED_ADDRS: usize = 65_536;

/// New WebSocket connections per client address (`client.connection_rate_per_ip`): a token
/// bucket per address (IPv6: per /64), `rate` per second up to `burst`.
///
/// **Bounded memory.** At most [`MAX_TRACKED_ADDRS`] addresses (about 64 bytes each, 4 MB
/// in all). When the map is full, buckets that have refilled (which behave like untracked
/// ones) are dropped, at most once a second; if it is still full, a new address is admitted
/// without being tracked until room frees up, so a flood from more addresses than that
/// within `burst / rate` seconds is not limited.
pub struct ConnectionRate {
    rate: f64,
    burst: f64,
    // std Mutex: one map operation per upgrade, never held across an await.
    state: Mutex<RateState>,
}

struct RateState {
    buckets: HashMap<IpAddr, Bucket>,
    last_sweep: Option<Instant>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl ConnectionRate {
    /// `rate` 0: no limit.
    pub fn new(rate: u32, burst: u32) -> ConnectionRate {
        ConnectionRate {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            state: Mutex::new(RateState {
                buckets: HashMap::new(),
                last_sweep: None,
            }),
        }
    }

    /// Takes a token for a new connection from `ip`, or says how long until there is one.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let key = crate::accounts::limiter::addr_key(ip);
        let (rate, burst) = (self.rate, self.burst);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.buckets.contains_key(&key) && st.buckets.len() >= MAX_TRACKED_ADDRS {
            if st
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
            {
                st.last_sweep = Some(now);
                st.buckets.retain(|_, b| {
                    b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
                });
            }
            if st.buckets.len() >= MAX_TRACKED_ADDRS {
                return Ok(());
            }
        }
        let b = st.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.tokens =
            (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buckets
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_rate_is_per_address_and_refills() {
        let r = ConnectionRate::new(2, 3);
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        for _ in 0..3 {
            assert!(r.admit(a, t0).is_ok());
        }
        let wait = r.admit(a, t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(r.admit(b, t0).is_ok(), "another address has its own bucket");
        assert!(r.admit(a, t0 + Duration::from_millis(500)).is_ok());
        assert!(r.admit(a, t0 + Duration::from_millis(500)).is_err());
        // One /64 is one address.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            assert!(r.admit(v6a, t0).is_ok());
        }
        assert!(r.admit(v6b, t0).is_err());
        assert!(
            ConnectionRate::new(0, 1).admit(a, t0).is_ok(),
            "0: no limit"
        );
    }

    #[test]
    fn connection_rate_memory_is_bounded() {
        let r = ConnectionRate::new(1, 1);
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_ADDRS as u32 {
            assert!(r.admit(IpAddr::V4(i.into()), t0).is_ok());
        }
        // Full of fresh buckets: a new address is admitted untracked.
        let extra = IpAddr::V4(u32::MAX.into());
        assert!(r.admit(extra, t0).is_ok());
        assert_eq!(r.tracked(), MAX_TRACKED_ADDRS);
        // Once they have refilled, they are swept and the new address is tracked.
        let later = t0 + Duration::from_secs(2);
        assert!(r.admit(extra, later).is_ok());
        assert!(r.admit(extra, later).is_err());
        assert_eq!(r.tracked(), 1);
    }

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
