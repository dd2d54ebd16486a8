-- Switchboard store: collaborative documents (SQLite). Keep in step with
-- ../postgres/0005_documents.sql. Additive: five new tables, and notifications rebuilt (same
-- columns, rows and ids) so that its kind CHECK allows 'share'.

-- A collaborative (Yjs) document. Its content is the snapshot (if compacted) plus the update
-- log after it; the owner is the creator and is never a row of document_members.
CREATE TABLE documents (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    title      TEXT    NOT NULL,
    owner_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    -- Bumped by renames and appended updates; never moves backward.
    updated_at INTEGER NOT NULL
);
CREATE INDEX documents_owner ON documents (owner_id);

-- Everyone but the owner who may open a document.
CREATE TABLE document_members (
    doc_id   INTEGER NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    user_id  INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role     TEXT    NOT NULL CHECK (role IN ('editor', 'viewer')),
    added_at INTEGER NOT NULL,
    PRIMARY KEY (doc_id, user_id)
);
CREATE INDEX document_members_user ON document_members (user_id);

-- The update log: Yjs updates (lib0 v1, opaque bytes) in the order they were stored.
-- AUTOINCREMENT, not a plain rowid: compaction deletes the newest rows too, and a plain rowid
-- would hand their seqs out again, below a snapshot's snapshot_seq, where loads never look.
CREATE TABLE doc_updates (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id     INTEGER NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    data       BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX doc_updates_doc ON doc_updates (doc_id, seq);

-- At most one per document: its state with every update up to snapshot_seq merged in.
CREATE TABLE doc_snapshots (
    doc_id       INTEGER PRIMARY KEY REFERENCES documents (id) ON DELETE CASCADE,
    snapshot_seq INTEGER NOT NULL,
    data         BLOB    NOT NULL,
    updated_at   INTEGER NOT NULL
);

-- Saved states of a document, named by a person or taken automatically (auto) during
-- activity. No foreign key on created_by, like user_bans: the record outlives who made it.
CREATE TABLE doc_versions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id     INTEGER NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    label      TEXT    NOT NULL,
    auto       BOOLEAN NOT NULL,
    created_by INTEGER,
    created_at INTEGER NOT NULL,
    -- Bytes of state, so listings need not read it.
    size       INTEGER NOT NULL,
    -- The document's full state as a Yjs update (v1).
    state      BLOB    NOT NULL
);
CREATE INDEX doc_versions_doc ON doc_versions (doc_id, id);

-- notifications: SQLite cannot alter a CHECK, so the table is rebuilt with 'share' allowed.
-- Rows keep their ids, and the AUTOINCREMENT high-water mark is carried over, so ids of
-- rows that no longer exist are not handed out again either. Nothing references
-- notifications, so dropping the old table breaks no foreign key.
CREATE TABLE notifications_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind        TEXT    NOT NULL CHECK (kind IN ('mention', 'direct', 'invite', 'share')),
    room_id     INTEGER,
    message_id  INTEGER,
    -- Who caused it (the author of the mention, the creator of the direct room, the inviter,
    -- the user who shared a document).
    actor_id    INTEGER,
    -- JSON detail (an excerpt of the message, the room's name, the document's title).
    data        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    read_at     INTEGER
);
INSERT INTO notifications_new
    (id, user_id, kind, room_id, message_id, actor_id, data, created_at, read_at)
    SELECT id, user_id, kind, room_id, message_id, actor_id, data, created_at, read_at
    FROM notifications;
DELETE FROM sqlite_sequence WHERE name = 'notifications_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'notifications_new', seq FROM sqlite_sequence WHERE name = 'notifications';
DROP TABLE notifications;
ALTER TABLE notifications_new RENAME TO notifications;
CREATE INDEX notifications_user ON notifications (user_id, id);
