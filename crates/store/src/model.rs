//! The records the store holds and the inputs that create them. Plain data: no I/O.
//!
//! Times are milliseconds since the Unix epoch (`i64`). Ids are `i64`, assigned by the
//! database and never reused. A room's stream position is called `offset` here (it is the
//! Centrifugo publication offset of channel `chat:{room_id}`) and `seq` in SQL.

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Milliseconds since the Unix epoch, the unit of every time the store keeps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Declares a closed set of names stored as TEXT (with a CHECK constraint in the schema),
/// with conversions both ways and serde in lower case.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// The name as stored and as sent on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = StoreError;
            fn from_str(s: &str) -> Result<Self, StoreError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(StoreError::Invalid(format!(
                        concat!("unknown ", stringify!($name), " {:?}"), other
                    ))),
                }
            }
        }
    };
}

text_enum! {
    /// A user's global role.
    UserRole { User = "user", Admin = "admin" }
}

text_enum! {
    /// Who may find and join a room. `Direct` rooms have exactly two members.
    RoomKind { Public = "public", Private = "private", Direct = "direct" }
}

text_enum! {
    /// A member's role in one room.
    MemberRole { Owner = "owner", Moderator = "moderator", Member = "member" }
}

text_enum! {
    /// What a room event records. Every kind takes the room's next offset.
    EventKind {
        /// A new message (written by [`crate::Store::append_messages`] only).
        Message = "message",
        /// The author changed the text; the event's data holds the new `text`.
        Edit = "edit",
        /// The author (or a moderator) deleted the message.
        Delete = "delete",
        /// Moderation removed the message.
        Removed = "removed",
        /// Moderation restored a removed message.
        Restored = "restored",
    }
}

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub username: String,
    /// Never serialized, so a `User` can be returned by an API as it is.
    #[serde(skip_serializing, default)]
    pub password_hash: String,
    pub display_name: String,
    pub role: UserRole,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: String,
    /// The argon2id PHC string. Accounts that never log in with a password (site users
    /// whose tokens are minted by their app) may store an unusable value such as `""`.
    pub password_hash: String,
    pub display_name: String,
    pub role: UserRole,
}

/// The fields of a user to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserUpdate {
    pub display_name: Option<String>,
    pub password_hash: Option<String>,
    pub role: Option<UserRole>,
}

/// A website sharing this deployment. Its backend mints connection tokens for its users
/// with the site key, of which the store keeps only a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub id: i64,
    pub name: String,
    /// Origins (`https://shop.example`) browsers of this site connect from.
    pub allowed_origins: Vec<String>,
    /// Never serialized, so a `Site` can be returned by an API as it is.
    #[serde(skip_serializing, default)]
    pub key_hash: String,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewSite {
    pub name: String,
    /// The hash of the site key (the caller hashes; the store never sees the key).
    pub key_hash: String,
    pub allowed_origins: Vec<String>,
}

/// The fields of a site to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct SiteUpdate {
    pub name: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
}

/// A refresh token, known to the store only by its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshToken {
    pub token_hash: String,
    pub user_id: i64,
    pub expires_at: i64,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    pub id: i64,
    pub kind: RoomKind,
    pub name: String,
    pub created_by: i64,
    pub created_at: i64,
    /// Random at creation, never changed: the stream's history is never lost.
    pub epoch: String,
    /// The offset of the newest event; 0 for an empty room.
    pub last_offset: i64,
}

#[derive(Debug, Clone)]
pub struct NewRoom {
    pub kind: RoomKind,
    pub name: String,
    /// Becomes the room's first member, with role `owner`.
    pub created_by: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub room_id: i64,
    pub user_id: i64,
    pub role: MemberRole,
    /// Sends are refused until this time (enforced by the caller).
    pub muted_until: Option<i64>,
    /// The newest offset the member has read; starts at the room's offset when joining.
    pub last_read_offset: i64,
    pub joined_at: i64,
}

/// One entry of [`crate::Store::rooms_for_user`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSummary {
    pub room: Room,
    pub member: Member,
    /// `room.last_offset - member.last_read_offset`: edits and deletes count too, since
    /// they are events in the room's stream.
    pub unread: i64,
    /// The newest message that is neither deleted nor removed.
    pub last_message: Option<Message>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: i64,
    pub room_id: i64,
    pub offset: i64,
    pub user_id: i64,
    pub client_msg_id: Option<String>,
    /// Kept after delete and removal (moderators may restore); callers hide it.
    pub text: String,
    pub reply_to: Option<i64>,
    pub created_at: i64,
    pub edited_at: Option<i64>,
    pub deleted: bool,
    pub removed: bool,
}

/// A message to append. Validation of content (non-empty, length, membership, mute) is the
/// caller's; the store refuses only what it cannot store faithfully (NUL characters) and
/// references that do not resolve.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub room_id: i64,
    pub user_id: i64,
    /// The sender's idempotency key, unique per user across all rooms.
    pub client_msg_id: Option<String>,
    pub text: String,
    pub reply_to: Option<i64>,
}

/// The outcome of appending one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendedMessage {
    pub message: Message,
    /// True when `(user_id, client_msg_id)` was already stored (or came earlier in the same
    /// batch): `message` is the original, and no offset was taken.
    pub duplicate: bool,
}

/// An edit, delete, removal or restore. It changes the message and takes the room's next
/// offset in one transaction.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub room_id: i64,
    pub message_id: i64,
    /// Who acted (the author, a moderator, an admin, or the moderation pipeline's user).
    pub user_id: i64,
    pub kind: EventKind,
    /// The new text; required for `Edit`, ignored otherwise.
    pub text: Option<String>,
    /// Extra detail stored with the event (e.g. `{"reason": "profanity"}`); `Null` for none.
    pub data: serde_json::Value,
}

/// One entry of a room's durable stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomEvent {
    pub room_id: i64,
    pub offset: i64,
    pub kind: EventKind,
    pub message_id: i64,
    /// The author for `message`, the actor otherwise.
    pub user_id: i64,
    /// `{}` for `message`; `{"text": ...}` plus the caller's detail for `edit`; the caller's
    /// detail (an object, `{}` if none) for the others.
    pub data: serde_json::Value,
    pub created_at: i64,
    /// The message as it is now (so a recovered `message` event of a since-removed message
    /// already says `removed`). `None` only if the message row is gone.
    pub message: Option<Message>,
}

/// Where a room's stream stands: what a subscribe reply and a recovery check need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub offset: i64,
    pub epoch: String,
}

/// A page of a room's messages, always returned oldest first. With neither bound, the
/// newest `limit` messages; with `after`, the oldest `limit` above it; with only `before`,
/// the newest `limit` below it.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessagePage {
    pub before: Option<i64>,
    pub after: Option<i64>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct NewAudit {
    pub actor_user_id: Option<i64>,
    /// A short stable name: `login`, `login_failed`, `role_change`, `message_removed`, ...
    pub action: String,
    /// What was acted on, e.g. `user:42` or `room:7`.
    pub target: String,
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor_user_id: Option<i64>,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
}

text_enum! {
    /// How a moderator settled a flag.
    FlagResolution { Removed = "removed", Restored = "restored", Dismissed = "dismissed" }
}

/// A message flagged for review, by the moderation pipeline or a person.
#[derive(Debug, Clone)]
pub struct NewFlag {
    pub message_id: i64,
    pub room_id: i64,
    /// The message's author.
    pub user_id: i64,
    /// The check that fired (`profanity`, `words`, `repeat`, `links`, `burst`).
    pub reason: String,
    /// What matched, as JSON; `Null` for nothing.
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    pub id: i64,
    pub message_id: i64,
    pub room_id: i64,
    pub user_id: i64,
    pub reason: String,
    pub detail: serde_json::Value,
    pub created_at: i64,
    /// Set when a moderator removed or restored the message, or dismissed the flag.
    pub resolved_at: Option<i64>,
    pub resolved_by: Option<i64>,
    pub resolution: Option<FlagResolution>,
    /// The message as it is now (with its text: flags are for moderators).
    pub message: Option<Message>,
}

/// Which flags [`crate::Store::flags`] lists: newest first, ids below `before_id`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlagQuery {
    /// One room's flags, or every room's with `None`.
    pub room_id: Option<i64>,
    /// Resolved flags too, not only the open ones.
    pub include_resolved: bool,
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// A user who may not send messages anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub user_id: i64,
    /// The ban ends at this time; `None` until it is lifted.
    pub until: Option<i64>,
    pub reason: String,
    pub created_by: Option<i64>,
    pub created_at: i64,
}

impl Ban {
    /// Whether the ban is in force at `now` (milliseconds since the Unix epoch).
    pub fn active_at(&self, now: i64) -> bool {
        self.until.is_none_or(|t| t > now)
    }
}

#[derive(Debug, Clone)]
pub struct NewBan {
    pub until: Option<i64>,
    pub reason: String,
    pub created_by: Option<i64>,
}

text_enum! {
    /// What a notification is about.
    NotificationKind {
        /// `@username` in a message of a room the user is a member of.
        Mention = "mention",
        /// Someone opened a direct room with the user.
        Direct = "direct",
        /// Someone added the user to a room.
        Invite = "invite",
        /// Someone shared a document with the user (data: {document_id, title, role}).
        Share = "share",
    }
}

/// A notification to store for one user.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub user_id: i64,
    pub kind: NotificationKind,
    pub room_id: Option<i64>,
    pub message_id: Option<i64>,
    /// Who caused it (the author, the room's creator, the inviter).
    pub actor_id: Option<i64>,
    /// Detail for display (an excerpt, the room's name), as a JSON object; `Null` for none.
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub id: i64,
    pub user_id: i64,
    pub kind: NotificationKind,
    pub room_id: Option<i64>,
    pub message_id: Option<i64>,
    pub actor_id: Option<i64>,
    pub data: serde_json::Value,
    pub created_at: i64,
    /// When the user marked it read; `None` while unread.
    pub read_at: Option<i64>,
}

/// Which notifications [`crate::Store::notifications`] lists: one user's, newest first.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotificationQuery {
    pub user_id: i64,
    /// Only those not yet read.
    pub unread_only: bool,
    /// Only ids below this one (paging).
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// Which of a user's notifications to mark read.
#[derive(Debug, Clone)]
pub enum MarkRead {
    /// These ids (ids of other users' notifications are ignored).
    Ids(Vec<i64>),
    /// Every unread one.
    All,
}

text_enum! {
    /// A user's access to one document. `Owner` is the creator (documents.owner_id), never a
    /// member row.
    DocRole { Owner = "owner", Editor = "editor", Viewer = "viewer" }
}

/// A collaborative (Yjs) document's metadata. Its content is read with
/// [`crate::Store::load_document`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub id: i64,
    pub title: String,
    /// The creator, whose role is always [`DocRole::Owner`].
    pub owner_id: i64,
    pub created_at: i64,
    /// Bumped by renames and appended updates; never moves backward.
    pub updated_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewDocument {
    pub owner_id: i64,
    /// Any text without NUL: length limits are the caller's.
    pub title: String,
}

/// One entry of documents_for_user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentSummary {
    pub document: Document,
    pub role: DocRole,
}

/// A user other than the owner who may open a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMember {
    pub doc_id: i64,
    pub user_id: i64,
    /// `Editor` or `Viewer`, never `Owner`.
    pub role: DocRole,
    /// When the user was first added; a role change keeps it.
    pub added_at: i64,
}

/// A Yjs update (lib0 v1 encoding, opaque bytes to the store) to append to a document's log.
#[derive(Debug, Clone)]
pub struct NewDocUpdate {
    pub doc_id: i64,
    pub data: Vec<u8>,
}

/// One entry of a document's update log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocUpdate {
    pub seq: i64,
    pub data: Vec<u8>,
}

/// What loading a document reads: its snapshot (if compacted) and the log after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocContent {
    pub snapshot: Option<Vec<u8>>,
    /// the highest seq merged into the snapshot (0: none)
    pub snapshot_seq: i64,
    /// log entries with seq > snapshot_seq, ascending
    pub updates: Vec<DocUpdate>,
}

/// A saved state of a document (its metadata; the state itself comes with
/// [`crate::Store::doc_version`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocVersion {
    pub id: i64,
    pub doc_id: i64,
    pub label: String,
    /// taken automatically during activity (not by a person)
    pub auto: bool,
    pub created_by: Option<i64>,
    pub created_at: i64,
    /// bytes of the stored state
    pub size: i64,
}

#[derive(Debug, Clone)]
pub struct NewDocVersion {
    pub doc_id: i64,
    /// At most 200 characters, without NUL.
    pub label: String,
    pub auto: bool,
    pub created_by: Option<i64>,
    /// the document's full state as a Yjs update (v1)
    pub state: Vec<u8>,
}
