-- Switchboard store, initial schema (SQLite). Keep in step with ../postgres/0001_init.sql:
-- same tables, columns, constraints and meaning; only the types are spelled per dialect.
-- Times are milliseconds since the Unix epoch. Ids are 64-bit integers that are never reused.
-- The per-room stream position is called `seq` in SQL (OFFSET is a reserved word) and
-- `offset` in the Rust API.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    display_name  TEXT    NOT NULL,
    role          TEXT    NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    created_at    INTEGER NOT NULL
);

CREATE TABLE refresh_tokens (
    token_hash TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL,
    revoked    BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);

CREATE TABLE rooms (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT    NOT NULL CHECK (kind IN ('public', 'private', 'direct')),
    name        TEXT    NOT NULL,
    created_by  INTEGER NOT NULL REFERENCES users (id),
    created_at  INTEGER NOT NULL,
    -- Random at creation and never changed: the stream's history is never lost while the
    -- row exists, so recovery positions stay valid across restarts.
    epoch       TEXT    NOT NULL,
    -- The offset of the room's newest event; 0 for an empty room.
    last_offset INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX rooms_kind ON rooms (kind, id);

CREATE TABLE room_members (
    room_id          INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id          INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role             TEXT    NOT NULL CHECK (role IN ('owner', 'moderator', 'member')),
    muted_until      INTEGER,
    last_read_offset INTEGER NOT NULL DEFAULT 0,
    joined_at        INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_user ON room_members (user_id);

-- messages and room_events take every chat write, so they carry no foreign keys: on
-- PostgreSQL the per-row FK triggers were half the cost of a batch insert. The store keeps
-- the references itself instead:
--  * an append checks the room, the user and reply_to inside its transaction, after taking
--    the room row's lock (UPDATE rooms ... last_offset), so the room cannot vanish under it;
--  * delete_room deletes the room row first (waiting for appends that hold its lock), then
--    its events and messages, in one transaction;
--  * messages are never deleted one by one (delete and moderation are flags), and users are
--    never deleted.
CREATE TABLE messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id       INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    user_id       INTEGER NOT NULL,
    client_msg_id TEXT,
    text          TEXT    NOT NULL,
    reply_to      INTEGER,
    created_at    INTEGER NOT NULL,
    edited_at     INTEGER,
    deleted       BOOLEAN NOT NULL DEFAULT FALSE,
    removed       BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (room_id, seq),
    UNIQUE (user_id, client_msg_id)
);

-- The room's durable stream: one row per offset, 1, 2, 3, ... with no gaps. No foreign
-- keys (see messages).
CREATE TABLE room_events (
    room_id    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('message', 'edit', 'delete', 'removed', 'restored')),
    message_id INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    data       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, seq)
) WITHOUT ROWID;

-- No foreign key on actor_user_id: the audit trail outlives what it mentions.
CREATE TABLE audit_log (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    at            INTEGER NOT NULL,
    actor_user_id INTEGER,
    action        TEXT    NOT NULL,
    target        TEXT    NOT NULL,
    detail        TEXT    NOT NULL
);
