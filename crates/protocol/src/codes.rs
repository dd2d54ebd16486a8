//! Error and disconnect codes of the Centrifugo client protocol v2.
//!
//! Error codes travel inside replies; disconnect codes travel in WebSocket Close frames. Codes
//! 3000..3499 ask the SDK to reconnect, 3500..3999 tell it to stop.

use serde::Serialize;

/// An error returned in a reply to one command. The connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ErrorCode {
    pub code: u32,
    pub message: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub temporary: bool,
}

const fn err(code: u32, message: &'static str, temporary: bool) -> ErrorCode {
    ErrorCode {
        code,
        message,
        temporary,
    }
}

pub const ERROR_INTERNAL: ErrorCode = err(100, "internal server error", true);
pub const ERROR_UNAUTHORIZED: ErrorCode = err(101, "unauthorized", false);
pub const ERROR_UNKNOWN_CHANNEL: ErrorCode = err(102, "unknown channel", false);
pub const ERROR_PERMISSION_DENIED: ErrorCode = err(103, "permission denied", false);
pub const ERROR_METHOD_NOT_FOUND: ErrorCode = err(104, "method not found", false);
pub const ERROR_ALREADY_SUBSCRIBED: ErrorCode = err(105, "already subscribed", false);
pub const ERROR_LIMIT_EXCEEDED: ErrorCode = err(106, "limit exceeded", false);
pub const ERROR_BAD_REQUEST: ErrorCode = err(107, "bad request", false);
pub const ERROR_NOT_AVAILABLE: ErrorCode = err(108, "not available", false);
pub const ERROR_TOKEN_EXPIRED: ErrorCode = err(109, "token expired", false);
pub const ERROR_EXPIRED: ErrorCode = err(110, "expired", false);
pub const ERROR_TOO_MANY_REQUESTS: ErrorCode = err(111, "too many requests", true);
pub const ERROR_UNRECOVERABLE_POSITION: ErrorCode = err(112, "unrecoverable position", false);

/// Why the server closes a connection; sent as the Close frame's code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    pub code: u16,
    pub reason: &'static str,
}

impl Disconnect {
    /// Whether the SDK reconnects after this code (protocol rule: below 3500).
    pub fn reconnect(&self) -> bool {
        self.code < 3500 || (4000..4500).contains(&self.code)
    }
}

const fn dis(code: u16, reason: &'static str) -> Disconnect {
    Disconnect { code, reason }
}

pub const DISCONNECT_NORMAL: Disconnect = dis(3000, "connection closed");
pub const DISCONNECT_SHUTDOWN: Disconnect = dis(3001, "shutdown");
pub const DISCONNECT_SERVER_ERROR: Disconnect = dis(3004, "internal server error");
pub const DISCONNECT_EXPIRED: Disconnect = dis(3005, "connection expired");
pub const DISCONNECT_SUB_EXPIRED: Disconnect = dis(3006, "subscription expired");
pub const DISCONNECT_SLOW: Disconnect = dis(3008, "slow");
pub const DISCONNECT_WRITE_ERROR: Disconnect = dis(3009, "write error");
pub const DISCONNECT_INSUFFICIENT_STATE: Disconnect = dis(3010, "insufficient state");
pub const DISCONNECT_FORCE_RECONNECT: Disconnect = dis(3011, "force reconnect");
pub const DISCONNECT_NO_PONG: Disconnect = dis(3012, "no pong");
pub const DISCONNECT_TOO_MANY_REQUESTS: Disconnect = dis(3013, "too many requests");
pub const DISCONNECT_INVALID_TOKEN: Disconnect = dis(3500, "invalid token");
pub const DISCONNECT_BAD_REQUEST: Disconnect = dis(3501, "bad request");
pub const DISCONNECT_STALE: Disconnect = dis(3502, "stale");
pub const DISCONNECT_FORCE_NO_RECONNECT: Disconnect = dis(3503, "force disconnect");
pub const DISCONNECT_CONNECTION_LIMIT: Disconnect = dis(3504, "connection limit");
pub const DISCONNECT_CHANNEL_LIMIT: Disconnect = dis(3505, "channel limit");
pub const DISCONNECT_PERMISSION_DENIED: Disconnect = dis(3507, "permission denied");
/// Standard WebSocket code for a message over the size limit.
pub const DISCONNECT_MESSAGE_TOO_BIG: Disconnect = dis(1009, "message too big");

/// Unsubscribe push codes (server-side unsubscribe); below 2500 the SDK does not resubscribe.
pub const UNSUBSCRIBE_SERVER: (u32, &str) = (2000, "server unsubscribe");
/// The server cannot go on delivering the channel without a gap: the SDK resubscribes and
/// recovers from its last position.
pub const UNSUBSCRIBE_INSUFFICIENT_STATE: (u32, &str) = (2500, "insufficient state");
