-- Switchboard store: moderation (SQLite). Keep in step with ../postgres/0002_moderation.sql.
-- Additive only: two new tables, nothing in 0001 changes.

-- Messages the moderation pipeline (or a person) flagged for review. No foreign keys, like
-- messages and room_events: a flag names a message that is never deleted on its own, and
-- listings join the message, so flags of a deleted room drop out of every listing.
CREATE TABLE moderation_flags (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  INTEGER NOT NULL,
    room_id     INTEGER NOT NULL,
    -- The message's author.
    user_id     INTEGER NOT NULL,
    -- The check that fired: 'profanity', 'words', 'repeat', 'links', 'burst'.
    reason      TEXT    NOT NULL,
    -- JSON detail (what matched, counts).
    detail      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    -- Set once a moderator acted: 'removed', 'restored' or 'dismissed'.
    resolved_at INTEGER,
    resolved_by INTEGER,
    resolution  TEXT CHECK (resolution IN ('removed', 'restored', 'dismissed'))
);
CREATE INDEX moderation_flags_room ON moderation_flags (room_id, id);
CREATE INDEX moderation_flags_message ON moderation_flags (message_id);

-- Users who may not send anywhere until `until_at` (NULL: until lifted).
CREATE TABLE user_bans (
    user_id    INTEGER PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    until_at   INTEGER,
    reason     TEXT    NOT NULL,
    created_by INTEGER,
    created_at INTEGER NOT NULL
);
