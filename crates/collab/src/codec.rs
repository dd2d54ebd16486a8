//! The y-websocket wire format: one binary WebSocket message per protocol message, a varuint
//! message type followed by its body (the encoding of `y-protocols`, which `yrs::sync` also
//! implements). This module decodes what clients send, defensively, and encodes what the
//! server sends; it is the only place that knows the byte layout.
//!
//! | type | body |
//! |---|---|
//! | 0 sync | varuint subtype: 0 step 1 (varbytes state vector), 1 step 2 (varbytes update), 2 update (varbytes update) |
//! | 1 awareness | varbytes awareness update: varuint n, then n × (varuint client id, varuint clock, varstring JSON state) |
//! | 2 auth | varuint 0 (permission denied) + varstring reason |
//! | 3 query awareness | empty |
//!
//! Between nodes (see `relay`) the envelope is this crate's own: 1 byte format version (1),
//! the origin node id (u64, little-endian), 1 byte kind, then the body:
//!
//! | kind | body |
//! |---|---|
//! | 0 update | a Yjs update (v1) |
//! | 1 awareness | an awareness update, as in the awareness message |
//! | 2 sync request | the sender's state vector (v1): "send me what I lack" |
//! | 3 sync reply | the target node id (u64, little-endian), varbytes update (v1), then optionally the replier's state vector (v1) |
//!
//! Decoding never trusts lengths: a body larger than the limit is refused before it is
//! parsed, and every parse of client bytes is guarded so that a malformed update cannot take
//! the connection task (or a document's lock) down with it. Relay payloads get the same
//! guarded parsing.

mod layout;

use std::panic::{catch_unwind, AssertUnwindSafe};

use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::{StateVector, Update};

pub const MSG_SYNC: u64 = 0;
pub const MSG_AWARENESS: u64 = 1;
pub const MSG_AUTH: u64 = 2;
pub const MSG_QUERY_AWARENESS: u64 = 3;
const SYNC_STEP1: u64 = 0;
const SYNC_STEP2: u64 = 1;
const SYNC_UPDATE: u64 = 2;
const AUTH_PERMISSION_DENIED: u64 = 0;

/// A WebSocket close code and reason sent when the server ends a document connection.
///
/// y-websocket 3.1 treats 4400–4499 as terminal (it stops reconnecting) and every other code
/// as transient, so the codes below follow that split: 44xx for "reconnecting cannot help",
/// 4000/45xx and 1001 for "try again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode {
    pub code: u16,
    pub reason: &'static str,
}

/// A frame that does not parse: an unknown message type, a truncated varint, a bad update.
pub const CLOSE_MALFORMED: CloseCode = CloseCode {
    code: 4400,
    reason: "malformed message",
};
/// A missing, invalid or expired token.
pub const CLOSE_UNAUTHORIZED: CloseCode = CloseCode {
    code: 4401,
    reason: "invalid token",
};
/// The user may not open this document (sent after the auth permission-denied message).
pub const CLOSE_FORBIDDEN: CloseCode = CloseCode {
    code: 4403,
    reason: "no access to this document",
};
/// No such document.
pub const CLOSE_NOT_FOUND: CloseCode = CloseCode {
    code: 4404,
    reason: "no such document",
};
/// The document was deleted while the connection was open.
pub const CLOSE_DELETED: CloseCode = CloseCode {
    code: 4410,
    reason: "document deleted",
};
/// A message (an update, or an awareness state) larger than the configured limit.
pub const CLOSE_TOO_LARGE: CloseCode = CloseCode {
    code: 4413,
    reason: "message too large",
};
/// Awareness messages faster than the per-connection rate, or more awareness client ids than
/// one connection may introduce.
pub const CLOSE_FLOOD: CloseCode = CloseCode {
    code: 4429,
    reason: "awareness flood",
};
/// The user's role changed: reconnect to get the new one.
pub const CLOSE_ACCESS_CHANGED: CloseCode = CloseCode {
    code: 4000,
    reason: "access changed",
};
/// The document could not be loaded (the database is unavailable): try again later.
pub const CLOSE_UNAVAILABLE: CloseCode = CloseCode {
    code: 4503,
    reason: "document unavailable",
};
/// Nothing was received from the client for too long.
pub const CLOSE_TIMEOUT: CloseCode = CloseCode {
    code: 4508,
    reason: "no message received in time",
};
/// The server is shutting down; reconnect (elsewhere).
pub const CLOSE_SHUTDOWN: CloseCode = CloseCode {
    code: 1001,
    reason: "server shutting down",
};

/// One decoded client message.
#[derive(Debug)]
pub enum Incoming {
    /// "Here is my state vector: send me what I miss."
    SyncStep1(StateVector),
    /// The answer to our step 1: what we miss (an update, possibly empty).
    SyncStep2(ClientUpdate),
    /// An incremental edit.
    Update(ClientUpdate),
    Awareness(AwarenessUpdate),
    QueryAwareness,
    /// Auth messages from a client carry nothing the server acts on.
    Auth,
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    TooLarge,
}

impl Refused {
    pub fn close_code(self) -> CloseCode {
        match self {
            Refused::Malformed => CLOSE_MALFORMED,
            Refused::TooLarge => CLOSE_TOO_LARGE,
        }
    }
}

/// Runs a parse of client bytes; a panic inside the CRDT library (its debug assertions
/// reject some hostile values by panicking) becomes a refusal.
fn guarded<T>(parse: impl FnOnce() -> Option<T>) -> Result<T, Refused> {
    match catch_unwind(AssertUnwindSafe(parse)) {
        Ok(Some(v)) => Ok(v),
        _ => Err(Refused::Malformed),
    }
}

/// Decodes one client frame. Bodies over `max_bytes` are refused before they are parsed.
pub fn decode(frame: &[u8], max_bytes: usize) -> Result<Incoming, Refused> {
    if frame.len() > max_bytes + 16 {
        return Err(Refused::TooLarge);
    }
    let mut c = Cursor::new(frame);
    let kind: u64 = c.read_var().map_err(|_| Refused::Malformed)?;
    match kind {
        MSG_SYNC => {
            let sub: u64 = c.read_var().map_err(|_| Refused::Malformed)?;
            let body = c.read_buf().map_err(|_| Refused::Malformed)?;
            if body.len() > max_bytes {
                return Err(Refused::TooLarge);
            }
            match sub {
                SYNC_STEP1 => {
                    // Each entry: a client id and a clock, a byte each at least.
                    if !count_fits(body, 2) {
                        return Err(Refused::Malformed);
                    }
                    guarded(|| StateVector::decode_v1(body).ok()).map(Incoming::SyncStep1)
                }
                SYNC_STEP2 => ClientUpdate::decode(body)
                    .map(Incoming::SyncStep2)
                    .ok_or(Refused::Malformed),
                SYNC_UPDATE => ClientUpdate::decode(body)
                    .map(Incoming::Update)
                    .ok_or(Refused::Malformed),
                _ => Err(Refused::Malformed),
            }
        }
        MSG_AWARENESS => {
            let body = c.read_buf().map_err(|_| Refused::Malformed)?;
            if body.len() > max_bytes {
                return Err(Refused::TooLarge);
            }
            // Each entry: a client id, a clock and a string length, a byte each at least.
            if !count_fits(body, 3) {
                return Err(Refused::Malformed);
            }
            guarded(|| AwarenessUpdate::decode_v1(body).ok()).map(Incoming::Awareness)
        }
        MSG_QUERY_AWARENESS => Ok(Incoming::QueryAwareness),
        MSG_AUTH => Ok(Incoming::Auth),
        _ => Err(Refused::Malformed),
    }
}

/// Decodes a Yjs update (v1) from untrusted bytes; `None` if it does not decode.
pub fn decode_update(bytes: &[u8]) -> Option<Update> {
    if !update_counts_fit(bytes) {
        return None;
    }
    guarded(|| Update::decode_v1(bytes).ok()).ok()
}

/// An update from outside this node (a client, the REST API, a peer node), decoded, with
/// where its blocks sit: [`ClientUpdate::fit`] gives the part a document can integrate
/// without the hole that yrs would otherwise make (see [`layout`]).
#[derive(Debug)]
pub struct ClientUpdate {
    update: Update,
    bytes: Vec<u8>,
    layout: layout::Layout,
}

impl ClientUpdate {
    /// Decodes an update (v1) from untrusted bytes; `None` if it does not decode, or lists
    /// blocks out of clock order.
    pub fn decode(bytes: &[u8]) -> Option<ClientUpdate> {
        let update = decode_update(bytes)?;
        let layout = guarded(|| layout::Layout::of(bytes)).ok()?;
        Some(ClientUpdate {
            update,
            bytes: bytes.to_vec(),
            layout,
        })
    }

    /// The update as decoded.
    pub fn update(&self) -> &Update {
        &self.update
    }

    /// Whether it carries nothing (no blocks and no deletions).
    pub fn is_empty(&self) -> bool {
        self.update.is_empty()
    }

    /// What a document with state vector `known` can integrate, and whether that is only a
    /// part: blocks that start past `known`'s clock for their client are cut off, with every
    /// later block of that client. `None` if the cut update does not decode (it always
    /// should: it is this update's own bytes).
    pub(crate) fn fit(self, known: &StateVector) -> Option<(Update, bool)> {
        match self.layout.fit(&self.bytes, known) {
            layout::Fit::Whole => Some((self.update, false)),
            layout::Fit::Trimmed(bytes) => decode_update(&bytes).map(|u| (u, true)),
        }
    }
}

/// A varuint at the start of `bytes`, and its length.
fn leading_var(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut n: u64 = 0;
    for (i, b) in bytes.iter().take(10).enumerate() {
        n |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

/// Whether the entry count `body` starts with fits in the bytes after it, at `min_entry`
/// bytes per entry at least.
///
/// yrs reserves room for a declared count before it reads the entries (`try_reserve`,
/// which fails only when the allocator does): eight bytes declaring 2^32 awareness clients
/// made it allocate hundreds of gigabytes (found by the `ywebsocket` fuzz target), and
/// smaller counts that the allocator grants cost real memory (a hash table writes a control
/// byte per slot). A count the body cannot hold is refused before yrs sees it.
fn count_fits(body: &[u8], min_entry: usize) -> bool {
    match leading_var(body) {
        Some((n, used)) => n <= ((body.len() - used) / min_entry) as u64,
        None => false,
    }
}

/// [`count_fits`] for an update (v1): its client count (a block count, a client id and a
/// clock per client, a byte each at least), and the first client's block count (a byte per
/// block at least). Later clients' counts are only reached by parsing blocks.
fn update_counts_fit(body: &[u8]) -> bool {
    let Some((clients, used)) = leading_var(body) else {
        return false;
    };
    let rest = &body[used..];
    if clients > (rest.len() / 3) as u64 {
        return false;
    }
    clients == 0 || count_fits(rest, 1)
}

fn sync_message(sub: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.write_var(MSG_SYNC);
    out.write_var(sub);
    out.write_buf(body);
    out
}

/// Sync step 1: the server's state vector (encoded v1).
pub fn sync_step1(state_vector: &[u8]) -> Vec<u8> {
    sync_message(SYNC_STEP1, state_vector)
}

/// Sync step 2: what the client misses (an update, encoded v1).
pub fn sync_step2(update: &[u8]) -> Vec<u8> {
    sync_message(SYNC_STEP2, update)
}

/// An incremental update (encoded v1).
pub fn sync_update(update: &[u8]) -> Vec<u8> {
    sync_message(SYNC_UPDATE, update)
}

/// One awareness message for `entries` of `(client id, clock, JSON state)`; a state of
/// `"null"` tells receivers the client is gone. With no entries it is the heartbeat: a
/// message every client applies as a no-op, which keeps y-websocket's 30 s silence watchdog
/// from reconnecting.
pub fn awareness<'a>(entries: impl ExactSizeIterator<Item = (u64, u32, &'a str)>) -> Vec<u8> {
    let body = awareness_update(entries);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.write_var(MSG_AWARENESS);
    out.write_buf(&body);
    out
}

/// The body of an awareness message (the y-protocols awareness update encoding).
fn awareness_update<'a>(entries: impl ExactSizeIterator<Item = (u64, u32, &'a str)>) -> Vec<u8> {
    let mut body = Vec::new();
    body.write_var(entries.len() as u64);
    for (client, clock, json) in entries {
        body.write_var(client);
        body.write_var(clock);
        body.write_string(json);
    }
    body
}

/// The auth message "permission denied" with a reason (y-protocols/auth).
pub fn permission_denied(reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(reason.len() + 4);
    out.write_var(MSG_AUTH);
    out.write_var(AUTH_PERMISSION_DENIED);
    out.write_string(reason);
    out
}

// ----- the relay envelope (node to node) -----

/// The envelope's format version: a node drops (as malformed) what a newer format sends.
const RELAY_VERSION: u8 = 1;
const RELAY_UPDATE: u8 = 0;
const RELAY_AWARENESS: u8 = 1;
const RELAY_SYNC_REQUEST: u8 = 2;
const RELAY_SYNC_REPLY: u8 = 3;
/// Version, origin, kind.
const RELAY_HEADER: usize = 1 + 8 + 1;

/// One decoded relay message (see [`crate::Relay`]): the node that sent it and what it says.
#[derive(Debug)]
pub(crate) struct RelayMessage {
    pub origin: u64,
    pub body: RelayBody,
}

#[derive(Debug)]
pub(crate) enum RelayBody {
    /// Changes accepted on the origin node (its clients' or server-side edits).
    Update(ClientUpdate),
    /// Awareness changes of the origin node's connections.
    Awareness(AwarenessUpdate),
    /// "Here is my state vector: send me what I lack."
    SyncRequest(StateVector),
    /// The answer to a sync request, for one node only (see [`relay_route`]): what it
    /// lacked; and, when the replier wants the same in return, the replier's own state
    /// vector.
    SyncReply {
        update: ClientUpdate,
        state_vector: Option<StateVector>,
    },
}

fn relay_header(origin: u64, kind: u8, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(RELAY_HEADER + capacity);
    out.push(RELAY_VERSION);
    out.extend_from_slice(&origin.to_le_bytes());
    out.push(kind);
    out
}

/// A relayed update (encoded v1).
pub(crate) fn relay_update(origin: u64, update: &[u8]) -> Vec<u8> {
    let mut out = relay_header(origin, RELAY_UPDATE, update.len());
    out.extend_from_slice(update);
    out
}

/// Relayed awareness changes, `(client id, clock, JSON state)` as in [`awareness`].
pub(crate) fn relay_awareness<'a>(
    origin: u64,
    entries: impl ExactSizeIterator<Item = (u64, u32, &'a str)>,
) -> Vec<u8> {
    let body = awareness_update(entries);
    let mut out = relay_header(origin, RELAY_AWARENESS, body.len());
    out.extend_from_slice(&body);
    out
}

/// A sync request with the sender's state vector (encoded v1).
pub(crate) fn relay_sync_request(origin: u64, state_vector: &[u8]) -> Vec<u8> {
    let mut out = relay_header(origin, RELAY_SYNC_REQUEST, state_vector.len());
    out.extend_from_slice(state_vector);
    out
}

/// A sync reply to node `to`: `update` (v1), and optionally the replier's state vector (v1).
pub(crate) fn relay_sync_reply(
    origin: u64,
    to: u64,
    update: &[u8],
    state_vector: Option<&[u8]>,
) -> Vec<u8> {
    let sv = state_vector.unwrap_or_default();
    let mut out = relay_header(origin, RELAY_SYNC_REPLY, 8 + 5 + update.len() + sv.len());
    out.extend_from_slice(&to.to_le_bytes());
    out.write_buf(update);
    out.extend_from_slice(sv);
    out
}

/// Where a relay payload comes from, and for a sync reply the node it is for; read without
/// decoding the body, so a node skips its own messages and other nodes' replies cheaply.
pub(crate) fn relay_route(payload: &[u8]) -> Option<(u64, Option<u64>)> {
    if payload.len() < RELAY_HEADER || payload[0] != RELAY_VERSION {
        return None;
    }
    let origin = u64::from_le_bytes(payload[1..9].try_into().ok()?);
    let to = match payload[9] {
        RELAY_SYNC_REPLY => Some(u64::from_le_bytes(
            payload
                .get(RELAY_HEADER..RELAY_HEADER + 8)?
                .try_into()
                .ok()?,
        )),
        _ => None,
    };
    Some((origin, to))
}

/// Decodes a relay payload from another node, as defensively as a client frame: a payload
/// that does not parse is refused, never a panic. Peers are trusted not to be hostile, but a
/// bug, a newer format or a corrupted message must not take the broker's reader down.
pub(crate) fn decode_relay(payload: &[u8]) -> Result<RelayMessage, Refused> {
    if payload.len() < RELAY_HEADER || payload[0] != RELAY_VERSION {
        return Err(Refused::Malformed);
    }
    let (origin, _) = relay_route(payload).ok_or(Refused::Malformed)?;
    let body = &payload[RELAY_HEADER..];
    let body = match payload[9] {
        RELAY_UPDATE => RelayBody::Update(ClientUpdate::decode(body).ok_or(Refused::Malformed)?),
        RELAY_AWARENESS => RelayBody::Awareness(guarded(|| AwarenessUpdate::decode_v1(body).ok())?),
        RELAY_SYNC_REQUEST => {
            RelayBody::SyncRequest(guarded(|| StateVector::decode_v1(body).ok())?)
        }
        RELAY_SYNC_REPLY => {
            let mut c = Cursor::new(body);
            // The target, already read by `relay_route`.
            c.read_exact(8).map_err(|_| Refused::Malformed)?;
            let update = c.read_buf().map_err(|_| Refused::Malformed)?;
            let update = ClientUpdate::decode(update).ok_or(Refused::Malformed)?;
            let rest = &body[c.next..];
            let state_vector = if rest.is_empty() {
                None
            } else {
                Some(guarded(|| StateVector::decode_v1(rest).ok())?)
            };
            RelayBody::SyncReply {
                update,
                state_vector,
            }
        }
        _ => return Err(Refused::Malformed),
    };
    Ok(RelayMessage { origin, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::sync::{Message, SyncMessage};
    use yrs::updates::encoder::Encode;
    use yrs::{Doc, GetString, ReadTxn, Text, Transact};

    fn edit() -> Vec<u8> {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("content");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "hello");
        txn.encode_update_v1()
    }

    #[test]
    fn round_trips_with_yrs_codec() {
        let u = edit();
        // What we encode, yrs (and so Yjs) decodes as the same message.
        let m = Message::decode_v1(&sync_update(&u)).unwrap();
        assert_eq!(m, Message::Sync(SyncMessage::Update(u.clone())));
        let m = Message::decode_v1(&sync_step2(&u)).unwrap();
        assert_eq!(m, Message::Sync(SyncMessage::SyncStep2(u.clone())));
        let sv = StateVector::default().encode_v1();
        let m = Message::decode_v1(&sync_step1(&sv)).unwrap();
        assert_eq!(
            m,
            Message::Sync(SyncMessage::SyncStep1(StateVector::default()))
        );
        let m = Message::decode_v1(&permission_denied("read-only")).unwrap();
        assert_eq!(m, Message::Auth(Some("read-only".into())));

        // And what yrs encodes, we decode.
        let frame = Message::Sync(SyncMessage::Update(u.clone())).encode_v1();
        let Incoming::Update(update) = decode(&frame, 1 << 20).unwrap() else {
            panic!("not an update")
        };
        let doc = Doc::new();
        let text = doc.get_or_insert_text("content");
        let (update, cut) = update.fit(&StateVector::default()).unwrap();
        assert!(!cut);
        doc.transact_mut().apply_update(update).unwrap();
        assert_eq!(text.get_string(&doc.transact()), "hello");
        assert!(doc.transact().state_vector().len() == 1);
    }

    #[test]
    fn awareness_messages() {
        let frame = awareness([(7u64, 3u32, r#"{"user":"ann"}"#)].into_iter());
        let Incoming::Awareness(a) = decode(&frame, 1 << 20).unwrap() else {
            panic!("not awareness")
        };
        assert_eq!(a.clients.len(), 1);
        let (id, e) = a.clients.iter().next().unwrap();
        assert_eq!(id.get(), 7);
        assert_eq!(e.clock, 3);
        assert_eq!(&*e.json, r#"{"user":"ann"}"#);
        // The heartbeat: an awareness update with no entries.
        assert_eq!(awareness(std::iter::empty()), vec![1, 1, 0]);
    }

    #[test]
    fn refuses_bad_frames() {
        let check = |frame: &[u8], want: Refused| {
            assert_eq!(decode(frame, 64).unwrap_err(), want, "{frame:?}");
        };
        check(&[], Refused::Malformed);
        check(&[0x80], Refused::Malformed); // truncated varint (continuation bit, no next byte)
        check(&[0, 2, 0x85], Refused::Malformed); // truncated length
        check(&[0, 2, 5, 1, 2], Refused::Malformed); // body shorter than its length
        check(&[0, 9, 0], Refused::Malformed); // unknown sync subtype
        check(&[9], Refused::Malformed); // unknown message type
        check(&[0, 2, 3, 0xff, 0xff, 0xff], Refused::Malformed); // garbage update
        check(&[1, 3, 0xff, 0xff, 0xff], Refused::Malformed); // garbage awareness
        let mut big = vec![0, 2, 100];
        big.extend([0u8; 100]);
        check(&big, Refused::TooLarge);
        check(&[0u8; 200], Refused::TooLarge);
        // Huge counts are refused without allocating for them.
        check(&[1, 6, 0xff, 0xff, 0xff, 0xff, 0x0f, 0], Refused::Malformed);
    }

    /// Regression (found by the `ywebsocket` fuzz target): declared counts are checked
    /// against the body before yrs reserves memory for them. 2^26 awareness clients in a
    /// 7-byte message made yrs reserve ~2.7 GB and write 64 MiB of hash-table control bytes;
    /// the seed with 2^32 - 1 tried to allocate 283 GB.
    #[test]
    fn counts_larger_than_the_body_are_refused_before_parsing() {
        // The refusal itself looks the same without the bound (yrs fails after reserving),
        // so the bound is checked exactly, and then through `decode`.
        assert!(count_fits(&[2, 1, 1, 0, 1, 1, 0], 3));
        assert!(
            !count_fits(&[3, 1, 1, 0, 1, 1, 0], 3),
            "3 entries cannot fit in 6 bytes"
        );
        assert!(!count_fits(&[0x80], 1), "a truncated count");
        assert!(count_fits(&[0], 3));
        assert!(update_counts_fit(&[0, 0]), "the empty update");
        assert!(update_counts_fit(&[1, 2, 7, 0, 0xaa, 0xbb]));
        assert!(
            !update_counts_fit(&[1, 5, 7, 0, 0xaa, 0xbb]),
            "5 blocks in 4 bytes"
        );
        assert!(!update_counts_fit(&[2, 1, 7]), "2 clients in 2 bytes");
        let mut awareness = vec![MSG_AWARENESS as u8];
        awareness.write_buf([0x80, 0x80, 0x80, 0x20, 1, 1, 0]); // 2^26 clients, one entry
        assert_eq!(decode(&awareness, 1 << 20).unwrap_err(), Refused::Malformed);
        // State vectors and updates likewise: 2^26 clients, then 2^26 blocks of one client.
        let step1 = sync_step1(&[0x80, 0x80, 0x80, 0x20, 1, 1]);
        assert_eq!(decode(&step1, 1 << 20).unwrap_err(), Refused::Malformed);
        let update = sync_update(&[0x80, 0x80, 0x80, 0x20, 1, 1, 1]);
        assert_eq!(decode(&update, 1 << 20).unwrap_err(), Refused::Malformed);
        let blocks = [1, 0x80, 0x80, 0x80, 0x20, 7, 0, 1];
        assert_eq!(
            decode(&sync_update(&blocks), 1 << 20).unwrap_err(),
            Refused::Malformed
        );
        assert!(decode_update(&blocks).is_none());
        // Counts that fit still decode.
        let ok = awareness_msg_for_test();
        assert!(matches!(decode(&ok, 1 << 20), Ok(Incoming::Awareness(_))));
        assert!(decode_update(&edit()).is_some());
        assert!(decode_update(Update::EMPTY_V1).is_some());
    }

    fn awareness_msg_for_test() -> Vec<u8> {
        awareness([(1u64, 1u32, "{}"), (2, 1, "null")].into_iter())
    }

    #[test]
    fn relay_envelopes_round_trip() {
        let u = edit();
        assert_eq!(relay_route(&relay_update(42, &u)), Some((42, None)));
        let m = decode_relay(&relay_update(42, &u)).unwrap();
        assert_eq!(m.origin, 42);
        let RelayBody::Update(update) = m.body else {
            panic!("not an update")
        };
        assert_eq!(
            update.update().encode_v1(),
            Update::decode_v1(&u).unwrap().encode_v1()
        );

        let m = decode_relay(&relay_awareness(u64::MAX, [(7u64, 3u32, "{}")].into_iter())).unwrap();
        assert_eq!(m.origin, u64::MAX);
        let RelayBody::Awareness(a) = m.body else {
            panic!("not awareness")
        };
        assert_eq!(a.clients.len(), 1);

        let sv = StateVector::default().encode_v1();
        let m = decode_relay(&relay_sync_request(1, &sv)).unwrap();
        assert!(matches!(m.body, RelayBody::SyncRequest(s) if s == StateVector::default()));

        for with_sv in [None, Some(sv.as_slice())] {
            let payload = relay_sync_reply(1, 9, &u, with_sv);
            assert_eq!(relay_route(&payload), Some((1, Some(9))));
            let m = decode_relay(&payload).unwrap();
            let RelayBody::SyncReply { state_vector, .. } = m.body else {
                panic!("not a reply")
            };
            assert_eq!(state_vector.is_some(), with_sv.is_some());
        }
    }

    #[test]
    fn refuses_bad_relay_payloads() {
        let doc = Doc::new();
        doc.transact_mut()
            .apply_update(Update::decode_v1(&edit()).unwrap())
            .unwrap();
        let sv = doc.transact().state_vector().encode_v1();
        let good = relay_sync_reply(1, 2, &edit(), Some(&sv));
        let mut bad: Vec<Vec<u8>> = vec![
            vec![],
            vec![1],
            vec![1, 0, 0, 0, 0, 0, 0, 0, 0],          // no kind
            vec![2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // another version
            vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 9],       // unknown kind
            vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff], // garbage update
            vec![
                1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 6, 0xff, 0xff, 0xff, 0xff, 0x0f,
            ], // huge count
            vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0x80], // truncated state vector
            vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 3, 2, 0, 0], // reply with a short target
        ];
        // Every truncation of a good reply (but the one that leaves out its whole state
        // vector, a valid reply without one).
        let without_sv = good.len() - sv.len();
        bad.extend(
            (0..good.len())
                .filter(|&n| n != without_sv)
                .map(|n| good[..n].to_vec()),
        );
        for payload in bad {
            assert!(decode_relay(&payload).is_err(), "{payload:?}");
        }
        assert!(decode_relay(&good).is_ok());
    }
}
