//! How a room's stream looks on the wire. A live broadcast and a recovered or paged event are
//! encoded by the same function, so a client cannot tell them apart.

use std::sync::Arc;

use serde_json::{json, Value};
use switchboard_protocol::client::Publication;
use switchboard_store::{EventKind, Message, RoomEvent};

/// A message as clients see it: the text of a deleted or removed message is withheld.
pub fn message_view(m: &Message) -> Value {
    let hidden = m.deleted || m.removed;
    json!({
        "id": m.id,
        "room_id": m.room_id,
        "offset": m.offset,
        "user_id": m.user_id,
        "client_msg_id": m.client_msg_id,
        "text": if hidden { Value::Null } else { Value::String(m.text.clone()) },
        "reply_to": m.reply_to,
        "created_at": m.created_at,
        "edited_at": m.edited_at,
        "deleted": m.deleted,
        "removed": m.removed,
    })
}

/// The publication data of one stream event: `{"type", "message_id", "user_id", "message"}`
/// with `type` one of `message`, `edit`, `delete`, `removed`, `restored`.
pub fn event_data(e: &RoomEvent) -> Value {
    json!({
        "type": e.kind.as_str(),
        "message_id": e.message_id,
        "user_id": e.user_id,
        "at": e.created_at,
        "message": e.message.as_ref().map(message_view),
    })
}

pub fn publication(e: &RoomEvent) -> Arc<Publication> {
    Arc::new(Publication {
        offset: e.offset as u64,
        data: serde_json::value::to_raw_value(&event_data(e)).expect("JSON values serialize"),
        info: None,
        tags: None,
    })
}

/// The stream event a newly appended message is.
pub fn message_event(m: &Message) -> RoomEvent {
    RoomEvent {
        room_id: m.room_id,
        offset: m.offset,
        kind: EventKind::Message,
        message_id: m.id,
        user_id: m.user_id,
        data: json!({}),
        created_at: m.created_at,
        message: Some(m.clone()),
    }
}

/// An ephemeral push (typing, read receipt): no offset, not stored, not recovered.
pub fn ephemeral(data: Value) -> Arc<Publication> {
    Arc::new(Publication {
        offset: 0,
        data: serde_json::value::to_raw_value(&data).expect("JSON values serialize"),
        info: None,
        tags: None,
    })
}
