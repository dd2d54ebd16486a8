//! The SQL both backends share, written once.
//!
//! SQLite and PostgreSQL accept the same text for everything except the bulk paths of
//! `append_messages`: `$N` placeholders, `RETURNING`, `ON CONFLICT DO NOTHING`, `TRUE`/`FALSE`,
//! `CASE`, `COALESCE`. So the `Store` implementation is generated per backend by
//! [`sql_store!`], which expands the same method bodies against each backend's pool and
//! row types. A backend module provides `self.reader` / `self.writer` pools, `begin_write`,
//! `begin_read`, `append_batch`, `insert_flags`, `BACKEND` and `LOCK_DOCUMENT`; everything
//! else is here.
//!
//! Rows are decoded by column position, in the order of the `*_cols!` lists below.

/// Column lists, optionally prefixed with a table alias (`"m."`). Decoders read them by
/// position, so the order here is the contract.
macro_rules! user_cols {
    ($p:literal) => {
        concat!(
            $p,
            "id, ",
            $p,
            "username, ",
            $p,
            "password_hash, ",
            $p,
            "display_name, ",
            $p,
            "role, ",
            $p,
            "created_at"
        )
    };
}
macro_rules! room_cols {
    ($p:literal) => {
        concat!(
            $p,
            "id, ",
            $p,
            "kind, ",
            $p,
            "name, ",
            $p,
            "created_by, ",
            $p,
            "created_at, ",
            $p,
            "epoch, ",
            $p,
            "last_offset"
        )
    };
}
macro_rules! member_cols {
    ($p:literal) => {
        concat!(
            $p,
            "room_id, ",
            $p,
            "user_id, ",
            $p,
            "role, ",
            $p,
            "muted_until, ",
            $p,
            "last_read_offset, ",
            $p,
            "joined_at"
        )
    };
}
macro_rules! msg_cols {
    ($p:literal) => {
        concat!(
            $p,
            "id, ",
            $p,
            "room_id, ",
            $p,
            "seq, ",
            $p,
            "user_id, ",
            $p,
            "client_msg_id, ",
            $p,
            "text, ",
            $p,
            "reply_to, ",
            $p,
            "created_at, ",
            $p,
            "edited_at, ",
            $p,
            "deleted, ",
            $p,
            "removed"
        )
    };
}
macro_rules! event_cols {
    () => {
        concat!(
            "e.room_id, e.seq, e.kind, e.message_id, e.user_id, e.data, e.created_at, ",
            msg_cols!("m.")
        )
    };
}
/// A message's own stream event, read from its `messages` row `m` (see migration 0006),
/// with the same columns as `event_cols!`.
macro_rules! message_event_cols {
    () => {
        concat!(
            "m.room_id, m.seq, 'message', m.id, m.user_id, '{}', m.created_at, ",
            msg_cols!("m.")
        )
    };
}
macro_rules! flag_cols {
    () => {
        "f.id, f.message_id, f.room_id, f.user_id, f.reason, f.detail, f.created_at, \
         f.resolved_at, f.resolved_by, f.resolution"
    };
}
macro_rules! ban_cols {
    ($p:literal) => {
        concat!(
            $p,
            "user_id, ",
            $p,
            "until_at, ",
            $p,
            "reason, ",
            $p,
            "created_by, ",
            $p,
            "created_at"
        )
    };
}
macro_rules! doc_cols {
    ($p:literal) => {
        concat!(
            $p,
            "id, ",
            $p,
            "title, ",
            $p,
            "owner_id, ",
            $p,
            "created_at, ",
            $p,
            "updated_at"
        )
    };
}
macro_rules! version_cols {
    () => {
        "id, doc_id, label, auto, created_by, created_at, size"
    };
}
pub(crate) const FLAG_WIDTH: usize = 10;
pub(crate) const DOC_WIDTH: usize = 5;
pub(crate) const VERSION_WIDTH: usize = 7;
/// The longest version label, in characters.
pub(crate) const MAX_LABEL_CHARS: usize = 200;
pub(crate) const ROOM_WIDTH: usize = 7;
pub(crate) const MEMBER_WIDTH: usize = 6;
pub(crate) const EVENT_WIDTH: usize = 7;

pub(crate) use {
    ban_cols, doc_cols, event_cols, flag_cols, member_cols, message_event_cols, msg_cols,
    room_cols, user_cols, version_cols,
};

/// Parses a stored enum or JSON value; a failure means the database holds something the
/// schema's CHECK constraints should have kept out.
pub(crate) fn parse_stored<T: std::str::FromStr>(s: &str) -> Result<T, crate::StoreError> {
    s.parse()
        .map_err(|_| crate::StoreError::other(format!("unexpected stored value {s:?}")))
}

pub(crate) fn parse_json(s: &str) -> Result<serde_json::Value, crate::StoreError> {
    serde_json::from_str(s)
        .map_err(|e| crate::StoreError::other(format!("stored JSON does not parse: {e}")))
}

/// PostgreSQL cannot store NUL in TEXT; refusing it on both backends keeps them alike.
pub(crate) fn check_text(field: &str, s: &str) -> Result<(), crate::StoreError> {
    if s.contains('\0') {
        return Err(crate::StoreError::Invalid(format!(
            "{field} contains a NUL character"
        )));
    }
    Ok(())
}

/// Effective page size: at most [`crate::MAX_PAGE`].
pub(crate) fn page(limit: u32) -> i64 {
    i64::from(limit.min(crate::MAX_PAGE))
}

/// The stored `data` of an edit or moderation event: the caller's detail as an object, with
/// the new text for an edit.
pub(crate) fn event_data(
    kind: crate::EventKind,
    text: Option<&str>,
    detail: serde_json::Value,
) -> serde_json::Value {
    let mut obj = match detail {
        serde_json::Value::Object(map) => map,
        serde_json::Value::Null => serde_json::Map::new(),
        other => {
            let mut map = serde_json::Map::new();
            map.insert("detail".into(), other);
            map
        }
    };
    if let (crate::EventKind::Edit, Some(t)) = (kind, text) {
        obj.insert("text".into(), serde_json::Value::String(t.to_owned()));
    }
    serde_json::Value::Object(obj)
}

/// One new moderation flag as the backends' `insert_flags` takes it: message, room, user,
/// reason, detail (JSON text).
pub(crate) type FlagRow = (i64, i64, i64, String, String);

/// Generates the row decoders and the `Store` impl for one backend.
/// `$store`: the backend struct; `$row`: its row type.
macro_rules! sql_store {
    ($store:ty, $row:ty) => {
        use sqlx::Row as _;
        use $crate::error::db_err;
        use $crate::model::*;
        use $crate::shared::{
            ban_cols, check_text, doc_cols, event_cols, flag_cols, member_cols, message_event_cols,
            msg_cols, page,
            parse_json, parse_stored, room_cols, user_cols, version_cols, DOC_WIDTH, EVENT_WIDTH,
            FLAG_WIDTH, MAX_LABEL_CHARS, MEMBER_WIDTH, ROOM_WIDTH, VERSION_WIDTH,
        };
        use $crate::StoreError;

        fn get<'r, T>(row: &'r $row, i: usize) -> Result<T, StoreError>
        where
            T: sqlx::Decode<'r, <$row as sqlx::Row>::Database>
                + sqlx::Type<<$row as sqlx::Row>::Database>,
        {
            row.try_get(i).map_err(db_err)
        }

        fn user_at(row: &$row, i: usize) -> Result<User, StoreError> {
            Ok(User {
                id: get(row, i)?,
                username: get(row, i + 1)?,
                password_hash: get(row, i + 2)?,
                display_name: get(row, i + 3)?,
                role: parse_stored(get::<&str>(row, i + 4)?)?,
                created_at: get(row, i + 5)?,
            })
        }

        fn room_at(row: &$row, i: usize) -> Result<Room, StoreError> {
            Ok(Room {
                id: get(row, i)?,
                kind: parse_stored(get::<&str>(row, i + 1)?)?,
                name: get(row, i + 2)?,
                created_by: get(row, i + 3)?,
                created_at: get(row, i + 4)?,
                epoch: get(row, i + 5)?,
                last_offset: get(row, i + 6)?,
            })
        }

        fn member_at(row: &$row, i: usize) -> Result<Member, StoreError> {
            Ok(Member {
                room_id: get(row, i)?,
                user_id: get(row, i + 1)?,
                role: parse_stored(get::<&str>(row, i + 2)?)?,
                muted_until: get(row, i + 3)?,
                last_read_offset: get(row, i + 4)?,
                joined_at: get(row, i + 5)?,
            })
        }

        fn message_at(row: &$row, i: usize) -> Result<Message, StoreError> {
            Ok(Message {
                id: get(row, i)?,
                room_id: get(row, i + 1)?,
                offset: get(row, i + 2)?,
                user_id: get(row, i + 3)?,
                client_msg_id: get(row, i + 4)?,
                text: get(row, i + 5)?,
                reply_to: get(row, i + 6)?,
                created_at: get(row, i + 7)?,
                edited_at: get(row, i + 8)?,
                deleted: get(row, i + 9)?,
                removed: get(row, i + 10)?,
            })
        }

        /// A message from a LEFT JOIN: absent when its id column is NULL.
        fn opt_message_at(row: &$row, i: usize) -> Result<Option<Message>, StoreError> {
            match get::<Option<i64>>(row, i)? {
                Some(_) => message_at(row, i).map(Some),
                None => Ok(None),
            }
        }

        fn event_at(row: &$row) -> Result<RoomEvent, StoreError> {
            Ok(RoomEvent {
                room_id: get(row, 0)?,
                offset: get(row, 1)?,
                kind: parse_stored(get::<&str>(row, 2)?)?,
                message_id: get(row, 3)?,
                user_id: get(row, 4)?,
                data: parse_json(get::<&str>(row, 5)?)?,
                created_at: get(row, 6)?,
                message: opt_message_at(row, EVENT_WIDTH)?,
            })
        }

        fn audit_at(row: &$row) -> Result<AuditEntry, StoreError> {
            Ok(AuditEntry {
                id: get(row, 0)?,
                at: get(row, 1)?,
                actor_user_id: get(row, 2)?,
                action: get(row, 3)?,
                target: get(row, 4)?,
                detail: parse_json(get::<&str>(row, 5)?)?,
            })
        }

        fn flag_at(row: &$row) -> Result<Flag, StoreError> {
            Ok(Flag {
                id: get(row, 0)?,
                message_id: get(row, 1)?,
                room_id: get(row, 2)?,
                user_id: get(row, 3)?,
                reason: get(row, 4)?,
                detail: parse_json(get::<&str>(row, 5)?)?,
                created_at: get(row, 6)?,
                resolved_at: get(row, 7)?,
                resolved_by: get(row, 8)?,
                resolution: get::<Option<&str>>(row, 9)?.map(parse_stored).transpose()?,
                message: opt_message_at(row, FLAG_WIDTH)?,
            })
        }

        /// A ban from a LEFT JOIN: absent when its user_id column is NULL.
        fn opt_ban_at(row: &$row, i: usize) -> Result<Option<Ban>, StoreError> {
            let Some(user_id) = get::<Option<i64>>(row, i)? else {
                return Ok(None);
            };
            Ok(Some(Ban {
                user_id,
                until: get(row, i + 1)?,
                reason: get(row, i + 2)?,
                created_by: get(row, i + 3)?,
                created_at: get(row, i + 4)?,
            }))
        }

        fn site_at(row: &$row) -> Result<Site, StoreError> {
            let origins = parse_json(get::<&str>(row, 3)?)?;
            Ok(Site {
                id: get(row, 0)?,
                name: get(row, 1)?,
                key_hash: get(row, 2)?,
                allowed_origins: serde_json::from_value(origins)
                    .map_err(|e| StoreError::Invalid(format!("stored allowed_origins: {e}")))?,
                created_at: get(row, 4)?,
            })
        }

        fn document_at(row: &$row, i: usize) -> Result<Document, StoreError> {
            Ok(Document {
                id: get(row, i)?,
                title: get(row, i + 1)?,
                owner_id: get(row, i + 2)?,
                created_at: get(row, i + 3)?,
                updated_at: get(row, i + 4)?,
            })
        }

        fn doc_member_at(row: &$row) -> Result<DocMember, StoreError> {
            Ok(DocMember {
                doc_id: get(row, 0)?,
                user_id: get(row, 1)?,
                role: parse_stored(get::<&str>(row, 2)?)?,
                added_at: get(row, 3)?,
            })
        }

        fn version_at(row: &$row) -> Result<DocVersion, StoreError> {
            Ok(DocVersion {
                id: get(row, 0)?,
                doc_id: get(row, 1)?,
                label: get(row, 2)?,
                auto: get(row, 3)?,
                created_by: get(row, 4)?,
                created_at: get(row, 5)?,
                size: get(row, 6)?,
            })
        }

        /// Replaces the generic text of a unique violation with the caller's.
        fn conflict(e: sqlx::Error, what: &str) -> StoreError {
            match db_err(e) {
                StoreError::Conflict(_) => StoreError::Conflict(what.to_owned()),
                other => other,
            }
        }

        impl $store {
            /// `append_batch`, with a failed transaction reported to every message.
            /// `senders`: check each sender's standing too (`append_sends`).
            async fn append_or_fail(
                &self,
                batch: Vec<NewMessage>,
                senders: bool,
            ) -> Vec<Result<AppendedMessage, StoreError>> {
                if batch.is_empty() {
                    return Vec::new();
                }
                let n = batch.len();
                match self.append_batch(batch, senders).await {
                    Ok(results) => results,
                    Err(e) => {
                        tracing::warn!(error = %e, messages = n, "append batch failed");
                        (0..n).map(|_| Err(e.replicate())).collect()
                    }
                }
            }
        }

        #[async_trait::async_trait]
        impl $crate::Store for $store {
            fn backend(&self) -> Backend {
                Self::BACKEND
            }

            fn writer_runtime(&self) -> Option<tokio::runtime::Handle> {
                self.writer_runtime()
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1")
                    .execute(&self.reader)
                    .await
                    .map_err(db_err)?;
                Ok(())
            }

            async fn close(&self) {
                self.writer.close().await;
                self.reader.close().await;
            }

            async fn create_user(&self, user: NewUser) -> Result<User, StoreError> {
                check_text("username", &user.username)?;
                check_text("password_hash", &user.password_hash)?;
                check_text("display_name", &user.display_name)?;
                let created_at = now_ms();
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO users (username, password_hash, display_name, role, created_at) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                )
                .bind(&user.username)
                .bind(&user.password_hash)
                .bind(&user.display_name)
                .bind(user.role.as_str())
                .bind(created_at)
                .fetch_one(&self.writer)
                .await
                .map_err(|e| conflict(e, "username is taken"))?;
                Ok(User {
                    id,
                    username: user.username,
                    password_hash: user.password_hash,
                    display_name: user.display_name,
                    role: user.role,
                    created_at,
                })
            }

            async fn user_by_id(&self, id: i64) -> Result<Option<User>, StoreError> {
                let row = sqlx::query(concat!("SELECT ", user_cols!(""), " FROM users WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db_err)?;
                row.map(|r| user_at(&r, 0)).transpose()
            }

            async fn user_by_username(&self, username: &str) -> Result<Option<User>, StoreError> {
                if check_text("username", username).is_err() {
                    return Ok(None);
                }
                let row = sqlx::query(concat!(
                    "SELECT ", user_cols!(""), " FROM users WHERE username = $1"
                ))
                .bind(username)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| user_at(&r, 0)).transpose()
            }

            async fn update_user(&self, id: i64, update: UserUpdate) -> Result<User, StoreError> {
                for (field, value) in [
                    ("display_name", &update.display_name),
                    ("password_hash", &update.password_hash),
                ] {
                    if let Some(v) = value {
                        check_text(field, v)?;
                    }
                }
                let row = sqlx::query(concat!(
                    "UPDATE users SET display_name = COALESCE($2, display_name), \
                     password_hash = COALESCE($3, password_hash), role = COALESCE($4, role) \
                     WHERE id = $1 RETURNING ", user_cols!("")
                ))
                .bind(id)
                .bind(update.display_name)
                .bind(update.password_hash)
                .bind(update.role.map(UserRole::as_str))
                .fetch_optional(&self.writer)
                .await
                .map_err(db_err)?;
                user_at(&row.ok_or(StoreError::NotFound)?, 0)
            }

            async fn store_refresh_token(&self, token: RefreshToken) -> Result<(), StoreError> {
                check_text("token_hash", &token.token_hash)?;
                sqlx::query(
                    "INSERT INTO refresh_tokens (token_hash, user_id, expires_at, revoked) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(&token.token_hash)
                .bind(token.user_id)
                .bind(token.expires_at)
                .bind(token.revoked)
                .execute(&self.writer)
                .await
                .map_err(|e| conflict(e, "refresh token already stored"))?;
                Ok(())
            }

            async fn find_refresh_token(
                &self,
                token_hash: &str,
            ) -> Result<Option<RefreshToken>, StoreError> {
                if check_text("token_hash", token_hash).is_err() {
                    return Ok(None);
                }
                let row = sqlx::query(
                    "SELECT token_hash, user_id, expires_at, revoked FROM refresh_tokens \
                     WHERE token_hash = $1",
                )
                .bind(token_hash)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| {
                    Ok(RefreshToken {
                        token_hash: get(&r, 0)?,
                        user_id: get(&r, 1)?,
                        expires_at: get(&r, 2)?,
                        revoked: get(&r, 3)?,
                    })
                })
                .transpose()
            }

            async fn revoke_refresh_token(&self, token_hash: &str) -> Result<bool, StoreError> {
                if check_text("token_hash", token_hash).is_err() {
                    return Ok(false);
                }
                let done = sqlx::query(
                    "UPDATE refresh_tokens SET revoked = TRUE \
                     WHERE token_hash = $1 AND revoked = FALSE",
                )
                .bind(token_hash)
                .execute(&self.writer)
                .await
                .map_err(db_err)?;
                Ok(done.rows_affected() > 0)
            }

            async fn revoke_user_refresh_tokens(&self, user_id: i64) -> Result<u64, StoreError> {
                let done = sqlx::query(
                    "UPDATE refresh_tokens SET revoked = TRUE WHERE user_id = $1 AND revoked = FALSE",
                )
                .bind(user_id)
                .execute(&self.writer)
                .await
                .map_err(db_err)?;
                Ok(done.rows_affected())
            }

            async fn purge_expired_refresh_tokens(&self, now: i64) -> Result<u64, StoreError> {
                let done = sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < $1")
                    .bind(now)
                    .execute(&self.writer)
                    .await
                    .map_err(db_err)?;
                Ok(done.rows_affected())
            }

            async fn create_room(&self, room: NewRoom) -> Result<Room, StoreError> {
                check_text("name", &room.name)?;
                let created_at = now_ms();
                let epoch = format!("{:016x}", rand::random::<u64>());
                let mut tx = self.begin_write().await?;
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO rooms (kind, name, created_by, created_at, epoch, last_offset) \
                     VALUES ($1, $2, $3, $4, $5, 0) RETURNING id",
                )
                .bind(room.kind.as_str())
                .bind(&room.name)
                .bind(room.created_by)
                .bind(created_at)
                .bind(&epoch)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
                sqlx::query(
                    "INSERT INTO room_members (room_id, user_id, role, last_read_offset, joined_at) \
                     VALUES ($1, $2, 'owner', 0, $3)",
                )
                .bind(id)
                .bind(room.created_by)
                .bind(created_at)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                Ok(Room {
                    id,
                    kind: room.kind,
                    name: room.name,
                    created_by: room.created_by,
                    created_at,
                    epoch,
                    last_offset: 0,
                })
            }

            async fn room(&self, id: i64) -> Result<Option<Room>, StoreError> {
                let row = sqlx::query(concat!("SELECT ", room_cols!(""), " FROM rooms WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db_err)?;
                row.map(|r| room_at(&r, 0)).transpose()
            }

            async fn delete_room(&self, id: i64) -> Result<(), StoreError> {
                // The room row first: its lock waits out appends in flight, and appends
                // that come later find no room. messages and room_events have no foreign
                // keys (see the migration), so they are deleted here; members cascade.
                let mut tx = self.begin_write().await?;
                let done = sqlx::query("DELETE FROM rooms WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                sqlx::query("DELETE FROM room_events WHERE room_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                sqlx::query("DELETE FROM messages WHERE room_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                Ok(())
            }

            async fn public_rooms(&self, after_id: i64, limit: u32) -> Result<Vec<Room>, StoreError> {
                let rows = sqlx::query(concat!(
                    "SELECT ", room_cols!(""), " FROM rooms \
                     WHERE kind = 'public' AND id > $1 ORDER BY id LIMIT $2"
                ))
                .bind(after_id)
                .bind(page(limit))
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter().map(|r| room_at(r, 0)).collect()
            }

            async fn direct_room(&self, user_a: i64, user_b: i64) -> Result<Option<Room>, StoreError> {
                let row = sqlx::query(concat!(
                    "SELECT ", room_cols!("r."), " FROM rooms r \
                     JOIN room_members a ON a.room_id = r.id AND a.user_id = $1 \
                     JOIN room_members b ON b.room_id = r.id AND b.user_id = $2 \
                     WHERE r.kind = 'direct' ORDER BY r.id LIMIT 1"
                ))
                .bind(user_a)
                .bind(user_b)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| room_at(&r, 0)).transpose()
            }

            async fn rooms_for_user(&self, user_id: i64) -> Result<Vec<RoomSummary>, StoreError> {
                // The last visible message is found through the (room_id, seq) index,
                // scanning back from the newest.
                let rows = sqlx::query(concat!(
                    "SELECT ", room_cols!("r."), ", ", member_cols!("rm."), ", ", msg_cols!("m."),
                    " FROM room_members rm JOIN rooms r ON r.id = rm.room_id \
                     LEFT JOIN messages m ON m.room_id = r.id AND m.seq = ( \
                         SELECT m2.seq FROM messages m2 \
                         WHERE m2.room_id = r.id AND m2.deleted = FALSE AND m2.removed = FALSE \
                         ORDER BY m2.seq DESC LIMIT 1) \
                     WHERE rm.user_id = $1 \
                     ORDER BY COALESCE(m.created_at, r.created_at) DESC, r.id DESC"
                ))
                .bind(user_id)
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        let room = room_at(r, 0)?;
                        let member = member_at(r, ROOM_WIDTH)?;
                        Ok(RoomSummary {
                            unread: (room.last_offset - member.last_read_offset).max(0),
                            last_message: opt_message_at(r, ROOM_WIDTH + MEMBER_WIDTH)?,
                            room,
                            member,
                        })
                    })
                    .collect()
            }

            async fn add_member(
                &self,
                room_id: i64,
                user_id: i64,
                role: MemberRole,
            ) -> Result<Member, StoreError> {
                let row = sqlx::query(concat!(
                    "INSERT INTO room_members (room_id, user_id, role, last_read_offset, joined_at) \
                     SELECT id, $2, $3, last_offset, $4 FROM rooms WHERE id = $1 \
                     ON CONFLICT (room_id, user_id) DO NOTHING RETURNING ", member_cols!("")
                ))
                .bind(room_id)
                .bind(user_id)
                .bind(role.as_str())
                .bind(now_ms())
                .fetch_optional(&self.writer)
                .await
                .map_err(db_err)?;
                match row {
                    Some(r) => member_at(&r, 0),
                    None => match self.room(room_id).await? {
                        None => Err(StoreError::NotFound),
                        Some(_) => Err(StoreError::Conflict("already a member".into())),
                    },
                }
            }

            async fn remove_member(&self, room_id: i64, user_id: i64) -> Result<(), StoreError> {
                let done = sqlx::query("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")
                    .bind(room_id)
                    .bind(user_id)
                    .execute(&self.writer)
                    .await
                    .map_err(db_err)?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(())
            }

            async fn member(&self, room_id: i64, user_id: i64) -> Result<Option<Member>, StoreError> {
                let row = sqlx::query(concat!(
                    "SELECT ", member_cols!(""), " FROM room_members WHERE room_id = $1 AND user_id = $2"
                ))
                .bind(room_id)
                .bind(user_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| member_at(&r, 0)).transpose()
            }

            async fn members(&self, room_id: i64) -> Result<Vec<Member>, StoreError> {
                let rows = sqlx::query(concat!(
                    "SELECT ", member_cols!(""), " FROM room_members WHERE room_id = $1 ORDER BY user_id"
                ))
                .bind(room_id)
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter().map(|r| member_at(r, 0)).collect()
            }

            async fn set_member_role(
                &self,
                room_id: i64,
                user_id: i64,
                role: MemberRole,
            ) -> Result<Member, StoreError> {
                let row = sqlx::query(concat!(
                    "UPDATE room_members SET role = $3 WHERE room_id = $1 AND user_id = $2 RETURNING ",
                    member_cols!("")
                ))
                .bind(room_id)
                .bind(user_id)
                .bind(role.as_str())
                .fetch_optional(&self.writer)
                .await
                .map_err(db_err)?;
                member_at(&row.ok_or(StoreError::NotFound)?, 0)
            }

            async fn set_member_muted(
                &self,
                room_id: i64,
                user_id: i64,
                muted_until: Option<i64>,
            ) -> Result<Member, StoreError> {
                let row = sqlx::query(concat!(
                    "UPDATE room_members SET muted_until = $3 WHERE room_id = $1 AND user_id = $2 \
                     RETURNING ", member_cols!("")
                ))
                .bind(room_id)
                .bind(user_id)
                .bind(muted_until)
                .fetch_optional(&self.writer)
                .await
                .map_err(db_err)?;
                member_at(&row.ok_or(StoreError::NotFound)?, 0)
            }

            async fn set_last_read(
                &self,
                room_id: i64,
                user_id: i64,
                offset: i64,
            ) -> Result<i64, StoreError> {
                // Forward only, and never past the room's last offset (so unread >= 0).
                let moved: Option<i64> = sqlx::query_scalar(
                    "UPDATE room_members SET last_read_offset = ( \
                         SELECT CASE WHEN r.last_offset < $3 THEN r.last_offset ELSE $3 END \
                         FROM rooms r WHERE r.id = $1) \
                     WHERE room_id = $1 AND user_id = $2 AND last_read_offset < $3 \
                     RETURNING last_read_offset",
                )
                .bind(room_id)
                .bind(user_id)
                .bind(offset)
                .fetch_optional(&self.writer)
                .await
                .map_err(db_err)?;
                match moved {
                    Some(o) => Ok(o),
                    None => self
                        .member(room_id, user_id)
                        .await?
                        .map(|m| m.last_read_offset)
                        .ok_or(StoreError::NotFound),
                }
            }

            async fn append_messages(
                &self,
                batch: Vec<NewMessage>,
            ) -> Vec<Result<AppendedMessage, StoreError>> {
                self.append_or_fail(batch, false).await
            }

            async fn append_sends(
                &self,
                batch: Vec<NewMessage>,
            ) -> Vec<Result<AppendedMessage, StoreError>> {
                self.append_or_fail(batch, true).await
            }

            async fn append_event(&self, event: NewEvent) -> Result<RoomEvent, StoreError> {
                let text = match (event.kind, event.text.as_deref()) {
                    (EventKind::Message, _) => {
                        return Err(StoreError::Invalid(
                            "messages are appended with append_messages".into(),
                        ))
                    }
                    (EventKind::Edit, None) => {
                        return Err(StoreError::Invalid("an edit needs the new text".into()))
                    }
                    (EventKind::Edit, Some(t)) => {
                        check_text("text", t)?;
                        Some(t)
                    }
                    _ => None,
                };
                let data = $crate::shared::event_data(event.kind, text, event.data);
                let created_at = now_ms();
                let mut tx = self.begin_write().await?;
                // The room's row first, as in append_messages: one lock order everywhere.
                let offset: Option<i64> = sqlx::query_scalar(
                    "UPDATE rooms SET last_offset = last_offset + 1 WHERE id = $1 RETURNING last_offset",
                )
                .bind(event.room_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
                let Some(offset) = offset else {
                    return Err(StoreError::NotFound);
                };
                let update = match event.kind {
                    EventKind::Edit => sqlx::query(concat!(
                        "UPDATE messages SET text = $3, edited_at = $4 WHERE id = $1 AND room_id = $2 \
                         AND deleted = FALSE AND removed = FALSE RETURNING ", msg_cols!("")
                    ))
                    .bind(event.message_id)
                    .bind(event.room_id)
                    .bind(text)
                    .bind(created_at),
                    EventKind::Delete => sqlx::query(concat!(
                        "UPDATE messages SET deleted = TRUE WHERE id = $1 AND room_id = $2 \
                         AND deleted = FALSE RETURNING ", msg_cols!("")
                    ))
                    .bind(event.message_id)
                    .bind(event.room_id),
                    EventKind::Removed => sqlx::query(concat!(
                        "UPDATE messages SET removed = TRUE WHERE id = $1 AND room_id = $2 \
                         AND removed = FALSE RETURNING ", msg_cols!("")
                    ))
                    .bind(event.message_id)
                    .bind(event.room_id),
                    EventKind::Restored | EventKind::Message => sqlx::query(concat!(
                        "UPDATE messages SET removed = FALSE WHERE id = $1 AND room_id = $2 \
                         AND removed = TRUE RETURNING ", msg_cols!("")
                    ))
                    .bind(event.message_id)
                    .bind(event.room_id),
                };
                let row = update.fetch_optional(&mut *tx).await.map_err(db_err)?;
                let Some(row) = row else {
                    // Dropping the transaction rolls back the offset taken above.
                    drop(tx);
                    return Err(match self.message(event.message_id).await? {
                        Some(m) if m.room_id == event.room_id => StoreError::Conflict(format!(
                            "cannot {} a message that is {}",
                            event.kind,
                            match (m.deleted, m.removed) {
                                (true, _) => "deleted",
                                (_, true) => "removed",
                                _ => "visible",
                            }
                        )),
                        _ => StoreError::NotFound,
                    });
                };
                let message = message_at(&row, 0)?;
                sqlx::query(
                    "INSERT INTO room_events (room_id, seq, kind, message_id, user_id, data, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(event.room_id)
                .bind(offset)
                .bind(event.kind.as_str())
                .bind(event.message_id)
                .bind(event.user_id)
                .bind(data.to_string())
                .bind(created_at)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                Ok(RoomEvent {
                    room_id: event.room_id,
                    offset,
                    kind: event.kind,
                    message_id: event.message_id,
                    user_id: event.user_id,
                    data,
                    created_at,
                    message: Some(message),
                })
            }

            async fn events(
                &self,
                room_id: i64,
                after_offset: i64,
                limit: u32,
            ) -> Result<Vec<RoomEvent>, StoreError> {
                // The stream is messages and room_events merged by offset (migration
                // 0006): the first `limit` of each, then the first `limit` of both.
                let rows = sqlx::query(concat!(
                    "SELECT * FROM (SELECT ", event_cols!(), " FROM room_events e \
                     LEFT JOIN messages m ON m.id = e.message_id \
                     WHERE e.room_id = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3) AS x \
                     UNION ALL SELECT * FROM (SELECT ", message_event_cols!(), " FROM messages m \
                     WHERE m.room_id = $1 AND m.seq > $2 ORDER BY m.seq LIMIT $3) AS y \
                     ORDER BY 2 LIMIT $3"
                ))
                .bind(room_id)
                .bind(after_offset)
                .bind(page(limit))
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter().map(event_at).collect()
            }

            async fn events_before(
                &self,
                room_id: i64,
                before_offset: i64,
                limit: u32,
            ) -> Result<Vec<RoomEvent>, StoreError> {
                // As in `events`, newest first.
                let rows = sqlx::query(concat!(
                    "SELECT * FROM (SELECT ", event_cols!(), " FROM room_events e \
                     LEFT JOIN messages m ON m.id = e.message_id \
                     WHERE e.room_id = $1 AND e.seq < $2 ORDER BY e.seq DESC LIMIT $3) AS x \
                     UNION ALL SELECT * FROM (SELECT ", message_event_cols!(), " FROM messages m \
                     WHERE m.room_id = $1 AND m.seq < $2 ORDER BY m.seq DESC LIMIT $3) AS y \
                     ORDER BY 2 DESC LIMIT $3"
                ))
                .bind(room_id)
                .bind(before_offset)
                .bind(page(limit))
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter().rev().map(event_at).collect()
            }

            async fn room_position(&self, room_id: i64) -> Result<StreamPosition, StoreError> {
                let row = sqlx::query("SELECT last_offset, epoch FROM rooms WHERE id = $1")
                    .bind(room_id)
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db_err)?
                    .ok_or(StoreError::NotFound)?;
                Ok(StreamPosition {
                    offset: get(&row, 0)?,
                    epoch: get(&row, 1)?,
                })
            }

            async fn message(&self, id: i64) -> Result<Option<Message>, StoreError> {
                let row = sqlx::query(concat!("SELECT ", msg_cols!(""), " FROM messages WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db_err)?;
                row.map(|r| message_at(&r, 0)).transpose()
            }

            async fn messages(
                &self,
                room_id: i64,
                page_req: MessagePage,
            ) -> Result<Vec<Message>, StoreError> {
                let limit = page(page_req.limit);
                let rows = if let Some(after) = page_req.after {
                    sqlx::query(concat!(
                        "SELECT ", msg_cols!(""), " FROM messages WHERE room_id = $1 AND seq > $2 \
                         AND ($3 IS NULL OR seq < $3) ORDER BY seq LIMIT $4"
                    ))
                    .bind(room_id)
                    .bind(after)
                    .bind(page_req.before)
                    .bind(limit)
                    .fetch_all(&self.reader)
                    .await
                } else {
                    sqlx::query(concat!(
                        "SELECT ", msg_cols!(""), " FROM messages WHERE room_id = $1 \
                         AND ($2 IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3"
                    ))
                    .bind(room_id)
                    .bind(page_req.before)
                    .bind(limit)
                    .fetch_all(&self.reader)
                    .await
                    .map(|mut rows| {
                        rows.reverse();
                        rows
                    })
                }
                .map_err(db_err)?;
                rows.iter().map(|r| message_at(r, 0)).collect()
            }

            async fn add_notifications(
                &self,
                notifications: Vec<NewNotification>,
            ) -> Result<Vec<Notification>, StoreError> {
                if notifications.is_empty() {
                    return Ok(Vec::new());
                }
                let created_at = now_ms();
                let mut out = Vec::with_capacity(notifications.len());
                let mut tx = self.begin_write().await?;
                for n in notifications {
                    let data = match n.data {
                        serde_json::Value::Null => serde_json::json!({}),
                        d => d,
                    };
                    let text = data.to_string();
                    check_text("data", &text)?;
                    // An unknown user fails the foreign key: NotFound.
                    let id: i64 = sqlx::query_scalar(
                        "INSERT INTO notifications \
                         (user_id, kind, room_id, message_id, actor_id, data, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    )
                    .bind(n.user_id)
                    .bind(n.kind.as_str())
                    .bind(n.room_id)
                    .bind(n.message_id)
                    .bind(n.actor_id)
                    .bind(text)
                    .bind(created_at)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_err)?;
                    out.push(Notification {
                        id,
                        user_id: n.user_id,
                        kind: n.kind,
                        room_id: n.room_id,
                        message_id: n.message_id,
                        actor_id: n.actor_id,
                        data,
                        created_at,
                        read_at: None,
                    });
                }
                tx.commit().await.map_err(db_err)?;
                Ok(out)
            }

            async fn notifications(
                &self,
                q: NotificationQuery,
            ) -> Result<Vec<Notification>, StoreError> {
                let rows = sqlx::query(
                    "SELECT id, user_id, kind, room_id, message_id, actor_id, data, created_at, \
                     read_at FROM notifications WHERE user_id = $1 \
                     AND ($2 = FALSE OR read_at IS NULL) AND ($3 IS NULL OR id < $3) \
                     ORDER BY id DESC LIMIT $4",
                )
                .bind(q.user_id)
                .bind(q.unread_only)
                .bind(q.before_id)
                .bind(page(q.limit))
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        Ok(Notification {
                            id: get(r, 0)?,
                            user_id: get(r, 1)?,
                            kind: parse_stored(get::<&str>(r, 2)?)?,
                            room_id: get(r, 3)?,
                            message_id: get(r, 4)?,
                            actor_id: get(r, 5)?,
                            data: parse_json(get::<&str>(r, 6)?)?,
                            created_at: get(r, 7)?,
                            read_at: get(r, 8)?,
                        })
                    })
                    .collect()
            }

            async fn mark_notifications_read(
                &self,
                user_id: i64,
                which: MarkRead,
            ) -> Result<u64, StoreError> {
                let now = now_ms();
                match which {
                    MarkRead::All => {
                        let done = sqlx::query(
                            "UPDATE notifications SET read_at = $2 \
                             WHERE user_id = $1 AND read_at IS NULL",
                        )
                        .bind(user_id)
                        .bind(now)
                        .execute(&self.writer)
                        .await
                        .map_err(db_err)?;
                        Ok(done.rows_affected())
                    }
                    MarkRead::Ids(ids) => {
                        if ids.is_empty() {
                            return Ok(0);
                        }
                        let mut n = 0;
                        let mut tx = self.begin_write().await?;
                        for id in ids {
                            let done = sqlx::query(
                                "UPDATE notifications SET read_at = $3 \
                                 WHERE id = $1 AND user_id = $2 AND read_at IS NULL",
                            )
                            .bind(id)
                            .bind(user_id)
                            .bind(now)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                            n += done.rows_affected();
                        }
                        tx.commit().await.map_err(db_err)?;
                        Ok(n)
                    }
                }
            }

            async fn member_ids_by_username(
                &self,
                room_id: i64,
                usernames: &[String],
            ) -> Result<Vec<i64>, StoreError> {
                let mut ids = Vec::new();
                for name in usernames {
                    if check_text("username", name).is_err() {
                        continue;
                    }
                    let id: Option<i64> = sqlx::query_scalar(
                        "SELECT u.id FROM users u JOIN room_members rm \
                         ON rm.user_id = u.id AND rm.room_id = $1 WHERE u.username = $2",
                    )
                    .bind(room_id)
                    .bind(name)
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db_err)?;
                    if let Some(id) = id {
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
                Ok(ids)
            }

            async fn set_last_seen(&self, seen: Vec<(i64, i64)>) -> Result<(), StoreError> {
                if seen.is_empty() {
                    return Ok(());
                }
                let mut tx = self.begin_write().await?;
                for (user_id, at) in seen {
                    sqlx::query(
                        "UPDATE users SET last_seen = $2 \
                         WHERE id = $1 AND (last_seen IS NULL OR last_seen < $2)",
                    )
                    .bind(user_id)
                    .bind(at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                }
                tx.commit().await.map_err(db_err)?;
                Ok(())
            }

            async fn last_seen(&self, user_id: i64) -> Result<Option<i64>, StoreError> {
                let row: Option<Option<i64>> =
                    sqlx::query_scalar("SELECT last_seen FROM users WHERE id = $1")
                        .bind(user_id)
                        .fetch_optional(&self.reader)
                        .await
                        .map_err(db_err)?;
                row.ok_or(StoreError::NotFound)
            }

            async fn append_audit(&self, entry: NewAudit) -> Result<AuditEntry, StoreError> {
                check_text("action", &entry.action)?;
                check_text("target", &entry.target)?;
                let at = now_ms();
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO audit_log (at, actor_user_id, action, target, detail) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                )
                .bind(at)
                .bind(entry.actor_user_id)
                .bind(&entry.action)
                .bind(&entry.target)
                .bind(entry.detail.to_string())
                .fetch_one(&self.writer)
                .await
                .map_err(db_err)?;
                Ok(AuditEntry {
                    id,
                    at,
                    actor_user_id: entry.actor_user_id,
                    action: entry.action,
                    target: entry.target,
                    detail: entry.detail,
                })
            }

            async fn audit_log(
                &self,
                before_id: Option<i64>,
                limit: u32,
            ) -> Result<Vec<AuditEntry>, StoreError> {
                let rows = sqlx::query(
                    "SELECT id, at, actor_user_id, action, target, detail FROM audit_log \
                     WHERE ($1 IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
                )
                .bind(before_id)
                .bind(page(limit))
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter().map(audit_at).collect()
            }

            async fn sender(
                &self,
                room_id: i64,
                user_id: i64,
            ) -> Result<Option<(Member, Option<Ban>)>, StoreError> {
                let row = sqlx::query(concat!(
                    "SELECT ", member_cols!("rm."), ", ", ban_cols!("b."),
                    " FROM room_members rm LEFT JOIN user_bans b ON b.user_id = rm.user_id \
                     WHERE rm.room_id = $1 AND rm.user_id = $2"
                ))
                .bind(room_id)
                .bind(user_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| Ok((member_at(&r, 0)?, opt_ban_at(&r, MEMBER_WIDTH)?)))
                    .transpose()
            }

            async fn add_flags(&self, flags: Vec<NewFlag>) -> Result<u64, StoreError> {
                if flags.is_empty() {
                    return Ok(0);
                }
                for f in &flags {
                    check_text("reason", &f.reason)?;
                }
                let rows: Vec<$crate::shared::FlagRow> = flags
                    .into_iter()
                    .map(|f| {
                        let detail = match f.detail {
                            serde_json::Value::Null => "{}".to_owned(),
                            d => d.to_string(),
                        };
                        (f.message_id, f.room_id, f.user_id, f.reason, detail)
                    })
                    .collect();
                let n = rows.len() as u64;
                self.insert_flags(rows, now_ms()).await?;
                Ok(n)
            }

            async fn flag(&self, id: i64) -> Result<Option<Flag>, StoreError> {
                let row = sqlx::query(concat!(
                    "SELECT ", flag_cols!(), ", ", msg_cols!("m."),
                    " FROM moderation_flags f LEFT JOIN messages m ON m.id = f.message_id \
                     WHERE f.id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| flag_at(&r)).transpose()
            }

            async fn flags(&self, q: FlagQuery) -> Result<Vec<Flag>, StoreError> {
                let rows = sqlx::query(concat!(
                    "SELECT ", flag_cols!(), ", ", msg_cols!("m."),
                    " FROM moderation_flags f JOIN messages m ON m.id = f.message_id \
                     WHERE ($1 IS NULL OR f.room_id = $1) AND ($2 OR f.resolved_at IS NULL) \
                     AND ($3 IS NULL OR f.id < $3) ORDER BY f.id DESC LIMIT $4"
                ))
                .bind(q.room_id)
                .bind(q.include_resolved)
                .bind(q.before_id)
                .bind(page(q.limit))
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter().map(flag_at).collect()
            }

            async fn resolve_flag(
                &self,
                id: i64,
                by: Option<i64>,
                resolution: FlagResolution,
            ) -> Result<Flag, StoreError> {
                let done = sqlx::query(
                    "UPDATE moderation_flags SET resolved_at = $2, resolved_by = $3, resolution = $4 \
                     WHERE id = $1 AND resolved_at IS NULL",
                )
                .bind(id)
                .bind(now_ms())
                .bind(by)
                .bind(resolution.as_str())
                .execute(&self.writer)
                .await
                .map_err(db_err)?;
                let flag = self.flag(id).await?.ok_or(StoreError::NotFound)?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::Conflict("the flag is already resolved".into()));
                }
                Ok(flag)
            }

            async fn resolve_message_flags(
                &self,
                message_id: i64,
                by: Option<i64>,
                resolution: FlagResolution,
            ) -> Result<u64, StoreError> {
                let done = sqlx::query(
                    "UPDATE moderation_flags SET resolved_at = $2, resolved_by = $3, resolution = $4 \
                     WHERE message_id = $1 AND resolved_at IS NULL",
                )
                .bind(message_id)
                .bind(now_ms())
                .bind(by)
                .bind(resolution.as_str())
                .execute(&self.writer)
                .await
                .map_err(db_err)?;
                Ok(done.rows_affected())
            }

            async fn set_ban(&self, user_id: i64, ban: NewBan) -> Result<Ban, StoreError> {
                check_text("reason", &ban.reason)?;
                let created_at = now_ms();
                // An unknown user fails the foreign key: NotFound.
                sqlx::query(
                    "INSERT INTO user_bans (user_id, until_at, reason, created_by, created_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id) DO UPDATE SET \
                     until_at = excluded.until_at, reason = excluded.reason, \
                     created_by = excluded.created_by, created_at = excluded.created_at",
                )
                .bind(user_id)
                .bind(ban.until)
                .bind(&ban.reason)
                .bind(ban.created_by)
                .bind(created_at)
                .execute(&self.writer)
                .await
                .map_err(db_err)?;
                Ok(Ban {
                    user_id,
                    until: ban.until,
                    reason: ban.reason,
                    created_by: ban.created_by,
                    created_at,
                })
            }

            async fn lift_ban(&self, user_id: i64) -> Result<bool, StoreError> {
                let done = sqlx::query("DELETE FROM user_bans WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&self.writer)
                    .await
                    .map_err(db_err)?;
                Ok(done.rows_affected() > 0)
            }

            async fn ban(&self, user_id: i64) -> Result<Option<Ban>, StoreError> {
                let row = sqlx::query(concat!(
                    "SELECT ", ban_cols!(""), " FROM user_bans WHERE user_id = $1"
                ))
                .bind(user_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                match row {
                    Some(r) => opt_ban_at(&r, 0),
                    None => Ok(None),
                }
            }

            async fn create_site(&self, site: NewSite) -> Result<Site, StoreError> {
                check_text("name", &site.name)?;
                check_text("key_hash", &site.key_hash)?;
                for o in &site.allowed_origins {
                    check_text("allowed_origins", o)?;
                }
                let created_at = now_ms();
                let origins = serde_json::to_string(&site.allowed_origins)
                    .map_err(|e| StoreError::Invalid(e.to_string()))?;
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO sites (name, key_hash, allowed_origins, created_at) \
                     VALUES ($1, $2, $3, $4) RETURNING id",
                )
                .bind(&site.name)
                .bind(&site.key_hash)
                .bind(&origins)
                .bind(created_at)
                .fetch_one(&self.writer)
                .await
                .map_err(|e| conflict(e, "site key hash is taken"))?;
                Ok(Site {
                    id,
                    name: site.name,
                    allowed_origins: site.allowed_origins,
                    key_hash: site.key_hash,
                    created_at,
                })
            }

            async fn site(&self, id: i64) -> Result<Option<Site>, StoreError> {
                let row = sqlx::query(
                    "SELECT id, name, key_hash, allowed_origins, created_at FROM sites WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| site_at(&r)).transpose()
            }

            async fn sites(&self) -> Result<Vec<Site>, StoreError> {
                let rows = sqlx::query(
                    "SELECT id, name, key_hash, allowed_origins, created_at FROM sites ORDER BY id",
                )
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter().map(site_at).collect()
            }

            async fn update_site(&self, id: i64, update: SiteUpdate) -> Result<Site, StoreError> {
                if let Some(name) = &update.name {
                    check_text("name", name)?;
                }
                let origins = match &update.allowed_origins {
                    Some(list) => {
                        for o in list {
                            check_text("allowed_origins", o)?;
                        }
                        Some(
                            serde_json::to_string(list)
                                .map_err(|e| StoreError::Invalid(e.to_string()))?,
                        )
                    }
                    None => None,
                };
                let row = sqlx::query(
                    "UPDATE sites SET name = COALESCE($2, name), \
                     allowed_origins = COALESCE($3, allowed_origins) WHERE id = $1 \
                     RETURNING id, name, key_hash, allowed_origins, created_at",
                )
                .bind(id)
                .bind(update.name)
                .bind(origins)
                .fetch_optional(&self.writer)
                .await
                .map_err(db_err)?;
                site_at(&row.ok_or(StoreError::NotFound)?)
            }

            async fn site_user(
                &self,
                site_id: i64,
                external_id: &str,
            ) -> Result<Option<User>, StoreError> {
                if check_text("external_id", external_id).is_err() {
                    return Ok(None);
                }
                let row = sqlx::query(concat!(
                    "SELECT ", user_cols!(""),
                    " FROM users WHERE site_id = $1 AND external_id = $2"
                ))
                .bind(site_id)
                .bind(external_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| user_at(&r, 0)).transpose()
            }

            async fn create_site_user(
                &self,
                site_id: i64,
                external_id: &str,
                user: NewUser,
            ) -> Result<User, StoreError> {
                check_text("external_id", external_id)?;
                check_text("username", &user.username)?;
                check_text("password_hash", &user.password_hash)?;
                check_text("display_name", &user.display_name)?;
                let created_at = now_ms();
                // An unknown site fails the foreign key: NotFound.
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO users (username, password_hash, display_name, role, created_at, \
                     site_id, external_id) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                )
                .bind(&user.username)
                .bind(&user.password_hash)
                .bind(&user.display_name)
                .bind(user.role.as_str())
                .bind(created_at)
                .bind(site_id)
                .bind(external_id)
                .fetch_one(&self.writer)
                .await
                .map_err(|e| conflict(e, "username or external id is taken"))?;
                Ok(User {
                    id,
                    username: user.username,
                    password_hash: user.password_hash,
                    display_name: user.display_name,
                    role: user.role,
                    created_at,
                })
            }

            async fn create_document(&self, doc: NewDocument) -> Result<Document, StoreError> {
                check_text("title", &doc.title)?;
                let now = now_ms();
                // An unknown owner fails the foreign key: NotFound.
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO documents (title, owner_id, created_at, updated_at) \
                     VALUES ($1, $2, $3, $3) RETURNING id",
                )
                .bind(&doc.title)
                .bind(doc.owner_id)
                .bind(now)
                .fetch_one(&self.writer)
                .await
                .map_err(db_err)?;
                Ok(Document {
                    id,
                    title: doc.title,
                    owner_id: doc.owner_id,
                    created_at: now,
                    updated_at: now,
                })
            }

            async fn document(&self, id: i64) -> Result<Option<Document>, StoreError> {
                let row = sqlx::query(concat!(
                    "SELECT ", doc_cols!(""), " FROM documents WHERE id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| document_at(&r, 0)).transpose()
            }

            async fn documents_for_user(
                &self,
                user_id: i64,
            ) -> Result<Vec<DocumentSummary>, StoreError> {
                // The owner is never a member row, so the two halves never overlap.
                let rows = sqlx::query(concat!(
                    "SELECT ", doc_cols!(""), ", 'owner' AS role FROM documents \
                     WHERE owner_id = $1 \
                     UNION ALL \
                     SELECT ", doc_cols!("d."), ", dm.role FROM document_members dm \
                     JOIN documents d ON d.id = dm.doc_id WHERE dm.user_id = $1 \
                     ORDER BY updated_at DESC, id DESC"
                ))
                .bind(user_id)
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter()
                    .map(|r| {
                        Ok(DocumentSummary {
                            document: document_at(r, 0)?,
                            role: parse_stored(get::<&str>(r, DOC_WIDTH)?)?,
                        })
                    })
                    .collect()
            }

            async fn rename_document(&self, id: i64, title: &str) -> Result<Document, StoreError> {
                check_text("title", title)?;
                let row = sqlx::query(concat!(
                    "UPDATE documents SET title = $2, \
                     updated_at = CASE WHEN updated_at < $3 THEN $3 ELSE updated_at END \
                     WHERE id = $1 RETURNING ", doc_cols!("")
                ))
                .bind(id)
                .bind(title)
                .bind(now_ms())
                .fetch_optional(&self.writer)
                .await
                .map_err(db_err)?;
                document_at(&row.ok_or(StoreError::NotFound)?, 0)
            }

            async fn delete_document(&self, id: i64) -> Result<(), StoreError> {
                // Members, log, snapshot and versions cascade with the row, all in this one
                // statement. Its row lock waits out appends and compactions in flight; those
                // that come later find no document.
                let done = sqlx::query("DELETE FROM documents WHERE id = $1")
                    .bind(id)
                    .execute(&self.writer)
                    .await
                    .map_err(db_err)?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(())
            }

            async fn document_role(
                &self,
                doc_id: i64,
                user_id: i64,
            ) -> Result<Option<DocRole>, StoreError> {
                let role: Option<Option<String>> = sqlx::query_scalar(
                    "SELECT CASE WHEN d.owner_id = $2 THEN 'owner' ELSE dm.role END \
                     FROM documents d LEFT JOIN document_members dm \
                     ON dm.doc_id = d.id AND dm.user_id = $2 WHERE d.id = $1",
                )
                .bind(doc_id)
                .bind(user_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                role.flatten().map(|r| parse_stored(&r)).transpose()
            }

            async fn set_document_member(
                &self,
                doc_id: i64,
                user_id: i64,
                role: DocRole,
            ) -> Result<DocMember, StoreError> {
                if role == DocRole::Owner {
                    return Err(StoreError::Invalid(
                        "a document's only owner is its creator".into(),
                    ));
                }
                // The SELECT finds no row for the owner, who is never a member row. An
                // unknown user fails the foreign key: NotFound.
                let row = sqlx::query(
                    "INSERT INTO document_members (doc_id, user_id, role, added_at) \
                     SELECT id, $2, $3, $4 FROM documents WHERE id = $1 AND owner_id <> $2 \
                     ON CONFLICT (doc_id, user_id) DO UPDATE SET role = excluded.role \
                     RETURNING doc_id, user_id, role, added_at",
                )
                .bind(doc_id)
                .bind(user_id)
                .bind(role.as_str())
                .bind(now_ms())
                .fetch_optional(&self.writer)
                .await
                .map_err(db_err)?;
                match row {
                    Some(r) => doc_member_at(&r),
                    None => match self.document(doc_id).await? {
                        Some(d) if d.owner_id == user_id => Err(StoreError::Invalid(
                            "the owner cannot be made a member".into(),
                        )),
                        _ => Err(StoreError::NotFound),
                    },
                }
            }

            async fn remove_document_member(
                &self,
                doc_id: i64,
                user_id: i64,
            ) -> Result<(), StoreError> {
                let done =
                    sqlx::query("DELETE FROM document_members WHERE doc_id = $1 AND user_id = $2")
                        .bind(doc_id)
                        .bind(user_id)
                        .execute(&self.writer)
                        .await
                        .map_err(db_err)?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(())
            }

            async fn document_members(&self, doc_id: i64) -> Result<Vec<DocMember>, StoreError> {
                let rows = sqlx::query(
                    "SELECT doc_id, user_id, role, added_at FROM document_members \
                     WHERE doc_id = $1 ORDER BY user_id",
                )
                .bind(doc_id)
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter().map(doc_member_at).collect()
            }

            async fn append_doc_updates(
                &self,
                updates: Vec<NewDocUpdate>,
            ) -> Result<Vec<Option<i64>>, StoreError> {
                if updates.is_empty() {
                    return Ok(Vec::new());
                }
                if updates.iter().any(|u| u.data.is_empty()) {
                    return Err(StoreError::Invalid("a document update cannot be empty".into()));
                }
                let now = now_ms();
                let docs: std::collections::BTreeSet<i64> =
                    updates.iter().map(|u| u.doc_id).collect();
                let mut tx = self.begin_write().await?;
                // Each document's row first, in ascending id order so that batches cannot
                // deadlock on each other. The row stays locked until commit, so one
                // document's seqs commit in the order they are taken; a document deleted
                // before we got here is simply absent.
                let mut live = std::collections::BTreeSet::new();
                for doc_id in docs {
                    let found: Option<i64> = sqlx::query_scalar(
                        "UPDATE documents SET \
                         updated_at = CASE WHEN updated_at < $2 THEN $2 ELSE updated_at END \
                         WHERE id = $1 RETURNING id",
                    )
                    .bind(doc_id)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_err)?;
                    if found.is_some() {
                        live.insert(doc_id);
                    }
                }
                let mut seqs = Vec::with_capacity(updates.len());
                for u in &updates {
                    if !live.contains(&u.doc_id) {
                        seqs.push(None);
                        continue;
                    }
                    let seq: i64 = sqlx::query_scalar(
                        "INSERT INTO doc_updates (doc_id, data, created_at) \
                         VALUES ($1, $2, $3) RETURNING seq",
                    )
                    .bind(u.doc_id)
                    .bind(u.data.as_slice())
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_err)?;
                    seqs.push(Some(seq));
                }
                tx.commit().await.map_err(db_err)?;
                let skipped = seqs.iter().filter(|s| s.is_none()).count();
                if skipped > 0 {
                    tracing::debug!(skipped, "updates to deleted documents skipped");
                }
                Ok(seqs)
            }

            async fn load_document(&self, doc_id: i64) -> Result<Option<DocContent>, StoreError> {
                // One read transaction: the snapshot and the log come from the same state,
                // never an old snapshot with a log a compaction has already trimmed.
                let mut tx = self.begin_read().await?;
                let head = sqlx::query(
                    "SELECT d.id, s.snapshot_seq, s.data FROM documents d \
                     LEFT JOIN doc_snapshots s ON s.doc_id = d.id WHERE d.id = $1",
                )
                .bind(doc_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
                let Some(head) = head else {
                    return Ok(None);
                };
                let snapshot_seq = get::<Option<i64>>(&head, 1)?.unwrap_or(0);
                let snapshot: Option<Vec<u8>> = get(&head, 2)?;
                let updates = sqlx::query_as::<_, (i64, Vec<u8>)>(
                    "SELECT seq, data FROM doc_updates WHERE doc_id = $1 AND seq > $2 ORDER BY seq",
                )
                .bind(doc_id)
                .bind(snapshot_seq)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                Ok(Some(DocContent {
                    snapshot,
                    snapshot_seq,
                    updates: updates
                        .into_iter()
                        .map(|(seq, data)| DocUpdate { seq, data })
                        .collect(),
                }))
            }

            async fn compact_document(
                &self,
                doc_id: i64,
                snapshot: Vec<u8>,
                through_seq: i64,
            ) -> Result<(), StoreError> {
                if snapshot.is_empty() {
                    return Err(StoreError::Invalid("a snapshot cannot be empty".into()));
                }
                let mut tx = self.begin_write().await?;
                // The document's row first, as in append_doc_updates: compactions of one
                // document run one at a time, so the checks below hold until commit, and
                // delete_document waits for them.
                let found: Option<i64> = sqlx::query_scalar(Self::LOCK_DOCUMENT)
                    .bind(doc_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_err)?;
                if found.is_none() {
                    return Err(StoreError::NotFound);
                }
                let (stored, newest): (Option<i64>, Option<i64>) = sqlx::query_as(
                    "SELECT (SELECT snapshot_seq FROM doc_snapshots WHERE doc_id = $1), \
                     (SELECT MAX(seq) FROM doc_updates WHERE doc_id = $1)",
                )
                .bind(doc_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?;
                if through_seq <= stored.unwrap_or(0) {
                    // Stale: a newer snapshot is already stored. Nothing changes.
                    return Ok(());
                }
                if newest.is_none_or(|n| through_seq > n) {
                    return Err(StoreError::Invalid(
                        "through_seq is beyond the document's log".into(),
                    ));
                }
                sqlx::query(
                    "INSERT INTO doc_snapshots (doc_id, snapshot_seq, data, updated_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (doc_id) DO UPDATE SET \
                     snapshot_seq = excluded.snapshot_seq, data = excluded.data, \
                     updated_at = excluded.updated_at",
                )
                .bind(doc_id)
                .bind(through_seq)
                .bind(snapshot.as_slice())
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                sqlx::query("DELETE FROM doc_updates WHERE doc_id = $1 AND seq <= $2")
                    .bind(doc_id)
                    .bind(through_seq)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                Ok(())
            }

            async fn create_doc_version(
                &self,
                version: NewDocVersion,
            ) -> Result<DocVersion, StoreError> {
                check_text("label", &version.label)?;
                if version.label.chars().count() > MAX_LABEL_CHARS {
                    return Err(StoreError::Invalid(format!(
                        "a version label is at most {MAX_LABEL_CHARS} characters"
                    )));
                }
                if version.state.is_empty() {
                    return Err(StoreError::Invalid("a version's state cannot be empty".into()));
                }
                let created_at = now_ms();
                let size = version.state.len() as i64;
                // An unknown document fails the foreign key: NotFound.
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO doc_versions \
                     (doc_id, label, auto, created_by, created_at, size, state) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                )
                .bind(version.doc_id)
                .bind(&version.label)
                .bind(version.auto)
                .bind(version.created_by)
                .bind(created_at)
                .bind(size)
                .bind(version.state.as_slice())
                .fetch_one(&self.writer)
                .await
                .map_err(db_err)?;
                Ok(DocVersion {
                    id,
                    doc_id: version.doc_id,
                    label: version.label,
                    auto: version.auto,
                    created_by: version.created_by,
                    created_at,
                    size,
                })
            }

            async fn doc_versions(&self, doc_id: i64) -> Result<Vec<DocVersion>, StoreError> {
                let rows = sqlx::query(concat!(
                    "SELECT ", version_cols!(), " FROM doc_versions WHERE doc_id = $1 \
                     ORDER BY id DESC"
                ))
                .bind(doc_id)
                .fetch_all(&self.reader)
                .await
                .map_err(db_err)?;
                rows.iter().map(version_at).collect()
            }

            async fn doc_version(
                &self,
                doc_id: i64,
                version_id: i64,
            ) -> Result<Option<(DocVersion, Vec<u8>)>, StoreError> {
                let row = sqlx::query(concat!(
                    "SELECT ", version_cols!(), ", state FROM doc_versions \
                     WHERE id = $1 AND doc_id = $2"
                ))
                .bind(version_id)
                .bind(doc_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(db_err)?;
                row.map(|r| Ok((version_at(&r)?, get(&r, VERSION_WIDTH)?)))
                    .transpose()
            }

            async fn prune_auto_versions(&self, doc_id: i64, keep: u32) -> Result<u64, StoreError> {
                let done = sqlx::query(
                    "DELETE FROM doc_versions WHERE doc_id = $1 AND auto = TRUE AND id NOT IN ( \
                         SELECT id FROM doc_versions WHERE doc_id = $1 AND auto = TRUE \
                         ORDER BY id DESC LIMIT $2)",
                )
                .bind(doc_id)
                .bind(i64::from(keep))
                .execute(&self.writer)
                .await
                .map_err(db_err)?;
                Ok(done.rows_affected())
            }
        }
    };
}

pub(crate) use sql_store;
