-- Switchboard store: multi-site (SQLite). Keep in step with ../postgres/0004_sites.sql.
-- Additive only: one new table and two new columns.

-- Websites sharing this deployment. A site's backend mints connection tokens for its own
-- users with its site key; only the key's SHA-256 (hex) is kept, like refresh tokens.
CREATE TABLE sites (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL,
    key_hash        TEXT    NOT NULL UNIQUE,
    -- JSON array of origins ("https://shop.example") browsers of this site connect from.
    allowed_origins TEXT    NOT NULL,
    created_at      INTEGER NOT NULL
);

-- Users provisioned by a site: which site, and the site's own id for them. NULL for
-- ordinary accounts. One user per (site, external id).
ALTER TABLE users ADD COLUMN site_id INTEGER REFERENCES sites (id);
ALTER TABLE users ADD COLUMN external_id TEXT;
CREATE UNIQUE INDEX users_site_external ON users (site_id, external_id);
