-- Switchboard store: notifications and presence (SQLite). Keep in step with
-- ../postgres/0003_notifications.sql. Additive only: one new table and one new column.

-- Stored notifications: @mentions, new direct rooms and room invites. Listed newest first per
-- user; `read_at` is set when the user marks them read. No foreign key on room or message,
-- like moderation_flags: a notification outlives a deleted room as a plain record.
CREATE TABLE notifications (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind        TEXT    NOT NULL CHECK (kind IN ('mention', 'direct', 'invite')),
    room_id     INTEGER,
    message_id  INTEGER,
    -- Who caused it (the author of the mention, the creator of the direct room, the inviter).
    actor_id    INTEGER,
    -- JSON detail (an excerpt of the message, the room's name).
    data        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    read_at     INTEGER
);
CREATE INDEX notifications_user ON notifications (user_id, id);

-- When the user's last connection to a node closed (ms since the Unix epoch); NULL: never seen.
ALTER TABLE users ADD COLUMN last_seen INTEGER;
