//! # Switchboard chat
//!
//! Rooms and their durable, ordered message streams, on top of the `Store` and `Broker`
//! traits. No sockets, no HTTP: the server maps protocol commands and REST routes onto
//! [`Chat`].
//!
//! - [`service`]: [`Chat`]: membership checks, validation, sends, edits and deletes, read
//!   receipts, typing, and the stream reads used for recovery and history.
//! - [`writer`]: the single group-commit writer task behind every write to a stream.
//! - [`events`]: the wire shape of stream events, shared by live pushes and recovery.
//! - [`moderation`]: the asynchronous checks of committed messages (profanity, word list,
//!   spam heuristics) and the moderator actions (remove, restore, mute, ban, flags).
//! - [`notify`]: notifications (`@mentions`, direct rooms, invites), stored and pushed on
//!   `notifications:#{user_id}`; mentions are resolved off the hot path.
//!
//! ## Guarantees
//! - A send is acknowledged only after its transaction committed (group commit: everything
//!   queued while the previous batch committed goes in one transaction).
//! - Each room's events take offsets 1, 2, 3... with no gaps, and are broadcast in that order.
//!   The room's epoch never changes, so clients recover across server restarts.
//! - A retry with the same `client_msg_id` returns the original message and publishes
//!   nothing new.
//! - Typing and read-receipt pushes are ephemeral: no offset, not stored, not recovered.
//! - Moderation never delays delivery: a message is checked after it was committed and
//!   broadcast, through a bounded queue that drops checks (counted) rather than wait; a
//!   removal is an ordinary `removed` event under the room's next offset.

pub mod events;
pub mod moderation;
pub mod notify;
pub mod service;
pub mod writer;

pub use moderation::{ModerationConfig, Moderator};
pub use service::{Chat, ChatConfig, ChatError, Send, Sent, TYPING_TTL_MS};
