//! The `Store` trait: everything the rest of Switchboard may ask of durable storage.

use async_trait::async_trait;

use crate::model::*;
use crate::StoreError;

/// The largest page any listing returns, whatever `limit` asks for.
pub const MAX_PAGE: u32 = 10_000;

/// Durable storage for accounts, rooms, the rooms' message streams, moderation (flags and
/// bans), notifications, presence (`last_seen`), sites, collaborative documents and the
/// audit log.
///
/// Implemented over SQLite and PostgreSQL with identical behaviour (one test suite runs
/// against both). Object safe: the server holds an `Arc<dyn Store>` chosen by [`crate::open`].
///
/// Every method either commits completely or changes nothing. A returned `Ok` means the
/// change is committed (and, see the crate docs, durable). Reads see every write whose call
/// has returned.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which database this is.
    fn backend(&self) -> Backend;

    /// The runtime that runs this store's writes, if it has one of its own (SQLite: see
    /// its module docs). A task that does little but wait for writes (the chat writer) runs
    /// best there: each write's result wakes it on a thread that is waiting for it, not on
    /// a busy worker. `None` (PostgreSQL): the caller's runtime, whose I/O driver owns the
    /// connections.
    fn writer_runtime(&self) -> Option<tokio::runtime::Handle> {
        None
    }

    /// A cheap round trip, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes the connection pools after in-flight calls finish. Later calls fail with
    /// `Unavailable`.
    async fn close(&self);

    // ----- accounts -----

    /// `Conflict` if the username is taken.
    async fn create_user(&self, user: NewUser) -> Result<User, StoreError>;
    async fn user_by_id(&self, id: i64) -> Result<Option<User>, StoreError>;
    /// Exact, case-sensitive match: normalize usernames before storing and looking up.
    async fn user_by_username(&self, username: &str) -> Result<Option<User>, StoreError>;
    /// `NotFound` if there is no such user.
    async fn update_user(&self, id: i64, update: UserUpdate) -> Result<User, StoreError>;

    /// `Conflict` if the hash is already stored.
    async fn store_refresh_token(&self, token: RefreshToken) -> Result<(), StoreError>;
    /// Returns revoked and expired tokens too: the caller decides (and may treat the reuse
    /// of a revoked token as theft).
    async fn find_refresh_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<RefreshToken>, StoreError>;
    /// True if the token existed and was not yet revoked.
    async fn revoke_refresh_token(&self, token_hash: &str) -> Result<bool, StoreError>;
    /// Revokes all of a user's tokens; returns how many were live.
    async fn revoke_user_refresh_tokens(&self, user_id: i64) -> Result<u64, StoreError>;
    /// Deletes tokens that expired before `now`; returns how many.
    async fn purge_expired_refresh_tokens(&self, now: i64) -> Result<u64, StoreError>;

    // ----- rooms and membership -----

    /// Creates the room with a fresh random epoch, and its creator as `owner`, in one
    /// transaction. `NotFound` if the creator does not exist.
    async fn create_room(&self, room: NewRoom) -> Result<Room, StoreError>;
    async fn room(&self, id: i64) -> Result<Option<Room>, StoreError>;
    /// Deletes the room with its members, messages and events. `NotFound` if absent.
    async fn delete_room(&self, id: i64) -> Result<(), StoreError>;
    /// Public rooms by id, for browsing and joining: ids above `after_id`, ascending.
    async fn public_rooms(&self, after_id: i64, limit: u32) -> Result<Vec<Room>, StoreError>;
    /// A direct room whose members include both users, if one exists.
    async fn direct_room(&self, user_a: i64, user_b: i64) -> Result<Option<Room>, StoreError>;
    /// The user's rooms with unread counts and last messages, most recently active first.
    async fn rooms_for_user(&self, user_id: i64) -> Result<Vec<RoomSummary>, StoreError>;

    /// Adds a member whose read position starts at the room's current offset (history
    /// before joining is not unread). `NotFound` if the room or user does not exist,
    /// `Conflict` if already a member.
    async fn add_member(
        &self,
        room_id: i64,
        user_id: i64,
        role: MemberRole,
    ) -> Result<Member, StoreError>;
    /// `NotFound` if not a member.
    async fn remove_member(&self, room_id: i64, user_id: i64) -> Result<(), StoreError>;
    async fn member(&self, room_id: i64, user_id: i64) -> Result<Option<Member>, StoreError>;
    /// All members of a room, by user id.
    async fn members(&self, room_id: i64) -> Result<Vec<Member>, StoreError>;
    /// `NotFound` if not a member.
    async fn set_member_role(
        &self,
        room_id: i64,
        user_id: i64,
        role: MemberRole,
    ) -> Result<Member, StoreError>;
    /// Mutes until the given time, or unmutes with `None`. `NotFound` if not a member.
    async fn set_member_muted(
        &self,
        room_id: i64,
        user_id: i64,
        muted_until: Option<i64>,
    ) -> Result<Member, StoreError>;
    /// Moves the member's read position forward to `offset` (clamped to the room's last
    /// offset; never backward) and returns the resulting position. `NotFound` if not a member.
    async fn set_last_read(
        &self,
        room_id: i64,
        user_id: i64,
        offset: i64,
    ) -> Result<i64, StoreError>;

    // ----- the message stream -----

    /// Appends a batch of messages in ONE transaction (group commit), returning one result
    /// per input, in input order.
    ///
    /// - A message whose `(user_id, client_msg_id)` is already stored, or appeared earlier
    ///   in the batch, is a duplicate: its result is the original with `duplicate: true`,
    ///   and it takes no offset.
    /// - Every other valid message takes its room's next offset (strictly increasing, no
    ///   gaps, in batch order within a room) and is written with its `message` event.
    /// - A message that fails validation (`NotFound` room, `Invalid` user, reply or text)
    ///   gets its own error and takes no offset; the rest of the batch still commits.
    /// - If the transaction itself fails, every result is that error and nothing is stored.
    async fn append_messages(
        &self,
        batch: Vec<NewMessage>,
    ) -> Vec<Result<AppendedMessage, StoreError>>;

    /// [`Store::append_messages`] for what users send: the same transaction also checks
    /// each sender's standing, so the check and the append see the same state and a send
    /// needs no read of its own. Per message, before dedupe: `NotFound` if the room does
    /// not exist, `Forbidden` if the sender is not a member of it, `Muted` if the sender is
    /// muted there or banned at the batch's time. A refused message takes no offset (a
    /// retry by a user muted since the first attempt is refused too).
    ///
    /// On SQLite the batch holds the write lock from its first read, so a membership, mute
    /// or ban change is ordered wholly before or after it. On PostgreSQL the check reads
    /// what was committed when the batch's lookup ran (READ COMMITTED): a change that
    /// commits while a batch is being written does not stop that batch, and stops every
    /// batch that starts after it.
    async fn append_sends(
        &self,
        batch: Vec<NewMessage>,
    ) -> Vec<Result<AppendedMessage, StoreError>>;

    /// Applies an edit, delete, removal or restore to a message and appends the event
    /// under the room's next offset, in one transaction. `NotFound` if the message is not in
    /// that room, `Conflict` if its state forbids it (editing a deleted or removed message,
    /// deleting twice, removing a removed or restoring a visible one), `Invalid` for kind
    /// `Message` or an edit without text.
    async fn append_event(&self, event: NewEvent) -> Result<RoomEvent, StoreError>;

    /// Events with offsets above `after_offset`, oldest first, at most `limit`. For
    /// recovery: a client at offset N asks for `events(room, N, cap)`.
    async fn events(
        &self,
        room_id: i64,
        after_offset: i64,
        limit: u32,
    ) -> Result<Vec<RoomEvent>, StoreError>;
    /// The `limit` events just below `before_offset`, oldest first. For paging backwards.
    async fn events_before(
        &self,
        room_id: i64,
        before_offset: i64,
        limit: u32,
    ) -> Result<Vec<RoomEvent>, StoreError>;
    /// The room's last offset and epoch. `NotFound` if there is no such room.
    async fn room_position(&self, room_id: i64) -> Result<StreamPosition, StoreError>;
    async fn message(&self, id: i64) -> Result<Option<Message>, StoreError>;
    /// A page of messages for REST history, including deleted and removed ones (flagged).
    async fn messages(&self, room_id: i64, page: MessagePage) -> Result<Vec<Message>, StoreError>;

    // ----- moderation -----

    /// The member and any ban of the user, in one read: what a send checks. `None` if not a
    /// member. The ban is returned whether or not it is still in force.
    async fn sender(
        &self,
        room_id: i64,
        user_id: i64,
    ) -> Result<Option<(Member, Option<Ban>)>, StoreError>;

    /// Stores flags in one transaction; returns how many.
    async fn add_flags(&self, flags: Vec<NewFlag>) -> Result<u64, StoreError>;
    async fn flag(&self, id: i64) -> Result<Option<Flag>, StoreError>;
    /// Flags with their messages, newest first. Flags whose message is gone (a deleted room)
    /// are left out.
    async fn flags(&self, query: FlagQuery) -> Result<Vec<Flag>, StoreError>;
    /// Settles one open flag. `NotFound` if absent, `Conflict` if already resolved.
    async fn resolve_flag(
        &self,
        id: i64,
        by: Option<i64>,
        resolution: FlagResolution,
    ) -> Result<Flag, StoreError>;
    /// Settles every open flag of a message; returns how many.
    async fn resolve_message_flags(
        &self,
        message_id: i64,
        by: Option<i64>,
        resolution: FlagResolution,
    ) -> Result<u64, StoreError>;

    /// Bans a user from sending anywhere, replacing any earlier ban. `NotFound` if there is
    /// no such user.
    async fn set_ban(&self, user_id: i64, ban: NewBan) -> Result<Ban, StoreError>;
    /// Lifts a ban; true if there was one.
    async fn lift_ban(&self, user_id: i64) -> Result<bool, StoreError>;
    /// The user's ban, in force or expired.
    async fn ban(&self, user_id: i64) -> Result<Option<Ban>, StoreError>;

    // ----- notifications and presence -----

    /// Stores notifications in one transaction and returns them with their ids, in input
    /// order. `NotFound` (nothing stored) if a user does not exist.
    async fn add_notifications(
        &self,
        notifications: Vec<NewNotification>,
    ) -> Result<Vec<Notification>, StoreError>;
    /// One user's notifications, newest first.
    async fn notifications(
        &self,
        query: NotificationQuery,
    ) -> Result<Vec<Notification>, StoreError>;
    /// Marks the user's notifications read (those already read keep their time); returns
    /// how many changed. Ids of other users' notifications are ignored.
    async fn mark_notifications_read(
        &self,
        user_id: i64,
        which: MarkRead,
    ) -> Result<u64, StoreError>;
    /// The ids of the room's members whose usernames are among `usernames` (exact match:
    /// pass them normalized). For resolving `@mentions`.
    async fn member_ids_by_username(
        &self,
        room_id: i64,
        usernames: &[String],
    ) -> Result<Vec<i64>, StoreError>;
    /// Records when users were last seen, `(user_id, at)`, in one transaction; a time
    /// never moves backward, and unknown users are skipped.
    async fn set_last_seen(&self, seen: Vec<(i64, i64)>) -> Result<(), StoreError>;
    /// When the user was last seen (`None`: never). `NotFound` if there is no such user.
    async fn last_seen(&self, user_id: i64) -> Result<Option<i64>, StoreError>;

    // ----- sites -----

    /// `Conflict` if the key hash is already stored.
    async fn create_site(&self, site: NewSite) -> Result<Site, StoreError>;
    async fn site(&self, id: i64) -> Result<Option<Site>, StoreError>;
    /// Every site, by id.
    async fn sites(&self) -> Result<Vec<Site>, StoreError>;
    /// `NotFound` if there is no such site.
    async fn update_site(&self, id: i64, update: SiteUpdate) -> Result<Site, StoreError>;
    /// The user a site provisioned under `external_id`, if any.
    async fn site_user(&self, site_id: i64, external_id: &str) -> Result<Option<User>, StoreError>;
    /// Creates a user bound to a site under `external_id`. `NotFound` if the site does not
    /// exist, `Conflict` if the username is taken or the site already has that external id
    /// (the caller re-reads [`Store::site_user`] to tell them apart).
    async fn create_site_user(
        &self,
        site_id: i64,
        external_id: &str,
        user: NewUser,
    ) -> Result<User, StoreError>;

    // ----- documents -----
    //
    // A document's content is a Yjs update log plus, once compacted, a snapshot of
    // everything up to `snapshot_seq`. Seqs come from one counter for the whole table and
    // are never reused. Within a document they commit in increasing order (an append holds
    // the document's row while it takes them), so a load always sees a prefix of the
    // document's log, and compacting through a seq the caller has loaded never drops an
    // update it has not seen.

    /// `NotFound` if the owner does not exist. created_at = updated_at = now.
    async fn create_document(&self, doc: NewDocument) -> Result<Document, StoreError>;
    async fn document(&self, id: i64) -> Result<Option<Document>, StoreError>;
    /// Documents the user owns or is a member of, with the user's role; most recently updated
    /// first (ties: higher id first).
    async fn documents_for_user(&self, user_id: i64) -> Result<Vec<DocumentSummary>, StoreError>;
    /// Renames; bumps updated_at. `NotFound` if absent.
    async fn rename_document(&self, id: i64, title: &str) -> Result<Document, StoreError>;
    /// Deletes the document with its members, update log, snapshot and versions, in one
    /// transaction. `NotFound` if absent.
    async fn delete_document(&self, id: i64) -> Result<(), StoreError>;
    /// The user's role: `Owner` for documents.owner_id, the member row's role otherwise, `None`
    /// for no access (or no such document).
    async fn document_role(&self, doc_id: i64, user_id: i64)
        -> Result<Option<DocRole>, StoreError>;
    /// Adds or changes a member (upsert; added_at kept on change). `Invalid` for role Owner or
    /// for the owner's own user id, `NotFound` if the document or user does not exist.
    async fn set_document_member(
        &self,
        doc_id: i64,
        user_id: i64,
        role: DocRole,
    ) -> Result<DocMember, StoreError>;
    /// `NotFound` if not a member.
    async fn remove_document_member(&self, doc_id: i64, user_id: i64) -> Result<(), StoreError>;
    /// Member rows (not the owner), by user id.
    async fn document_members(&self, doc_id: i64) -> Result<Vec<DocMember>, StoreError>;
    /// Appends updates to their documents' logs in ONE transaction (group commit) and bumps
    /// those documents' updated_at. Returns one entry per input, in order: the assigned seq, or
    /// `None` when that document no longer exists (skipped, never an error: a document deleted
    /// while edits were in flight must not fail the batch). seq is a per-table increasing id
    /// (strictly increasing within a document, in input order). Empty `data` is `Invalid`.
    ///
    /// `Invalid` (for an empty `data` anywhere in the batch) is checked before anything is
    /// written: the whole call fails and nothing is stored.
    async fn append_doc_updates(
        &self,
        updates: Vec<NewDocUpdate>,
    ) -> Result<Vec<Option<i64>>, StoreError>;
    /// The snapshot and the log after it. `None` if there is no such document.
    ///
    /// Both are read from one consistent view of the database, so a compaction running at
    /// the same time is seen entirely or not at all.
    async fn load_document(&self, doc_id: i64) -> Result<Option<DocContent>, StoreError>;
    /// Compaction, in ONE transaction: stores `snapshot` as the document's snapshot with
    /// snapshot_seq = through_seq (replacing any older one) and deletes log entries with seq <=
    /// through_seq. A call whose through_seq is not above the stored snapshot_seq changes
    /// nothing (Ok). `NotFound` if the document is gone.
    ///
    /// `Invalid` for an empty snapshot, or for a `through_seq` above the document's newest
    /// log entry (a seq the document never had: later appends would get seqs at or below
    /// it, and loads would skip them).
    async fn compact_document(
        &self,
        doc_id: i64,
        snapshot: Vec<u8>,
        through_seq: i64,
    ) -> Result<(), StoreError>;
    /// `NotFound` if the document does not exist; `Invalid` for empty state or a label over 200
    /// chars.
    async fn create_doc_version(&self, version: NewDocVersion) -> Result<DocVersion, StoreError>;
    /// Newest first (by id).
    async fn doc_versions(&self, doc_id: i64) -> Result<Vec<DocVersion>, StoreError>;
    /// The version's metadata and state, only if it belongs to `doc_id`.
    async fn doc_version(
        &self,
        doc_id: i64,
        version_id: i64,
    ) -> Result<Option<(DocVersion, Vec<u8>)>, StoreError>;
    /// Deletes all but the newest `keep` automatic versions of the document; returns how many
    /// were deleted. Named (non-auto) versions are never deleted.
    async fn prune_auto_versions(&self, doc_id: i64, keep: u32) -> Result<u64, StoreError>;

    // ----- audit -----

    async fn append_audit(&self, entry: NewAudit) -> Result<AuditEntry, StoreError>;
    /// Newest first: ids below `before_id` (all if `None`), at most `limit`.
    async fn audit_log(
        &self,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;
}
