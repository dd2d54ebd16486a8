//! The PostgreSQL backend: one pool; concurrency is the database's.
//!
//! Offsets: `UPDATE rooms SET last_offset = last_offset + n ... RETURNING` takes the room
//! row's lock until commit, so appenders of one room serialize on it and offsets are handed
//! out gap-free: the increment and the rows that use it commit or roll back together.
//! A batch locks all its rooms with one `SELECT ... ORDER BY id FOR NO KEY UPDATE` (rows are
//! locked in the order returned, ascending id) and then moves all their offsets with one
//! `UPDATE ... FROM UNNEST`, so batches cannot deadlock on each other and a batch costs the
//! same number of round trips however many rooms it touches.
//!
//! Dedupe under concurrency: the lookup reads committed rows at statement start (READ
//! COMMITTED), so two transactions may both find a client message id absent. The insert's
//! `ON CONFLICT (user_id, client_msg_id) DO NOTHING` waits for the other to commit and then
//! skips the row; a skipped row would leave a gap, so the whole batch rolls back and runs
//! again, and the second lookup finds the original. The same retry covers a room deleted
//! between the lookup and the reservation.
//!
//! Durability: PostgreSQL's default `synchronous_commit = on`: a commit has reached the WAL
//! on disk before it is acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Postgres, Transaction};

use crate::plan::{refusal_sql, Lookup, Plan, Refusal, Wanted};
use crate::{migrations, Backend, StoreOptions};

/// Attempts of a batch that keeps meeting concurrent duplicates before giving up with
/// `Unavailable`.
const APPEND_ATTEMPTS: usize = 4;

pub(crate) struct PgStore {
    writer: PgPool,
    /// The same pool as `writer`: PostgreSQL needs no split.
    reader: PgPool,
}

/// Connects one connection within `connect_timeout`. The pool's own connect retries a
/// refused connection until its acquire timeout (it assumes a server still starting); at
/// start-up we would rather fail at once with a clear message.
async fn connect_once(
    opts: &PgConnectOptions,
    options: &StoreOptions,
) -> Result<PgConnection, StoreError> {
    let target = format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("")
    );
    match tokio::time::timeout(options.connect_timeout, opts.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(match db_err(e) {
            StoreError::Unavailable(why) => {
                StoreError::Unavailable(format!("cannot connect to postgres at {target}: {why}"))
            }
            other => other,
        }),
        Err(_) => Err(StoreError::Unavailable(format!(
            "timed out after {:?} connecting to postgres at {target}",
            options.connect_timeout
        ))),
    }
}

impl PgStore {
    const BACKEND: Backend = Backend::Postgres;
    /// Finds a document inside a write transaction and locks its row until commit, as the
    /// `UPDATE documents` of an append does: writers of one document (appends, compactions)
    /// take turns, and `delete_document` waits for them.
    const LOCK_DOCUMENT: &'static str = "SELECT id FROM documents WHERE id = $1 FOR NO KEY UPDATE";

    pub(crate) async fn open(url: &str, options: &StoreOptions) -> Result<PgStore, StoreError> {
        let opts = PgConnectOptions::from_str(url).map_err(db_err)?;
        let mut conn = connect_once(&opts, options).await?;
        // Takes an advisory lock, so nodes starting together migrate one at a time.
        migrations::migrator(Backend::Postgres)
            .run(&mut conn)
            .await
            .map_err(crate::error::migrate_err)?;
        let _ = conn.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(opts.clone())
            .await
            .map_err(db_err)?;
        tracing::info!(
            backend = "postgres",
            host = %opts.get_host(),
            port = opts.get_port(),
            database = opts.get_database().unwrap_or(""),
            "store opened"
        );
        Ok(PgStore {
            writer: pool.clone(),
            reader: pool,
        })
    }

    pub(crate) async fn migrate(url: &str) -> Result<(), StoreError> {
        let opts = PgConnectOptions::from_str(url).map_err(db_err)?;
        let mut conn = connect_once(&opts, &StoreOptions::default()).await?;
        migrations::migrator(Backend::Postgres)
            .run(&mut conn)
            .await
            .map_err(crate::error::migrate_err)?;
        let _ = conn.close().await;
        Ok(())
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.writer.begin().await.map_err(db_err)
    }

    /// A read-only transaction whose statements all see one snapshot (READ COMMITTED, the
    /// default, takes a new one per statement).
    async fn begin_read(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.reader
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(db_err)
    }

    /// PostgreSQL's writes run on the caller's runtime (see `Store::writer_runtime`).
    fn writer_runtime(&self) -> Option<tokio::runtime::Handle> {
        None
    }

    /// Stores a batch of moderation flags in one statement.
    async fn insert_flags(
        &self,
        rows: Vec<crate::shared::FlagRow>,
        created_at: i64,
    ) -> Result<(), StoreError> {
        let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (message, room, user, reason, detail) in rows {
            cols.0.push(message);
            cols.1.push(room);
            cols.2.push(user);
            cols.3.push(reason);
            cols.4.push(detail);
        }
        sqlx::query(
            "INSERT INTO moderation_flags \
             (message_id, room_id, user_id, reason, detail, created_at) \
             SELECT m, r, u, reason, detail, $6 \
             FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[]) \
             AS x(m, r, u, reason, detail)",
        )
        .bind(cols.0)
        .bind(cols.1)
        .bind(cols.2)
        .bind(cols.3)
        .bind(cols.4)
        .bind(created_at)
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// `append_messages` (and, with `senders`, `append_sends`) for PostgreSQL.
    async fn append_batch(
        &self,
        mut batch: Vec<NewMessage>,
        senders: bool,
    ) -> Result<Vec<Result<AppendedMessage, StoreError>>, StoreError> {
        for _ in 0..APPEND_ATTEMPTS {
            match self.try_append(batch, senders).await? {
                Ok(results) => return Ok(results),
                Err(again) => batch = again,
            }
        }
        Err(StoreError::Unavailable(
            "too many concurrent duplicates; retry the batch".into(),
        ))
    }

    /// One attempt: `Ok(Err(batch))` means a race was lost and nothing was written.
    #[allow(clippy::type_complexity)]
    async fn try_append(
        &self,
        batch: Vec<NewMessage>,
        senders: bool,
    ) -> Result<Result<Vec<Result<AppendedMessage, StoreError>>, Vec<NewMessage>>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let lookup = lookup(&mut tx, &Wanted::of(&batch, senders), now).await?;
        let mut plan = Plan::new(batch, lookup, now);
        let (rooms, counts): (Vec<i64>, Vec<i64>) = plan.room_counts().into_iter().unzip();
        let mut last = BTreeMap::new();
        if !rooms.is_empty() {
            // Two statements for every room of the batch: lock the rows in ascending id order
            // (so two batches never deadlock on each other's rooms), then move their offsets.
            let locked: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM rooms WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
            )
            .bind(&rooms)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            if locked.len() != rooms.len() {
                // Deleted since the lookup: roll back and plan again.
                return Ok(Err(plan.into_batch()));
            }
            let tops: Vec<(i64, i64)> = sqlx::query_as(
                "UPDATE rooms SET last_offset = rooms.last_offset + x.n \
                 FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS x(id, n) \
                 WHERE rooms.id = x.id RETURNING rooms.id, rooms.last_offset",
            )
            .bind(&rooms)
            .bind(&counts)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            last.extend(tops);
        }
        plan.assign(&last);
        let expected = plan.new_count();
        let mut ids = HashMap::with_capacity(expected);
        if expected > 0 {
            let mut rooms = Vec::with_capacity(expected);
            let mut seqs = Vec::with_capacity(expected);
            let mut users = Vec::with_capacity(expected);
            let mut cmids: Vec<Option<&str>> = Vec::with_capacity(expected);
            let mut texts: Vec<&str> = Vec::with_capacity(expected);
            let mut replies = Vec::with_capacity(expected);
            for (m, offset) in plan.new_rows() {
                rooms.push(m.room_id);
                seqs.push(offset);
                users.push(m.user_id);
                cmids.push(m.client_msg_id.as_deref());
                texts.push(m.text.as_str());
                replies.push(m.reply_to);
            }
            // One statement, one round trip per batch. A message's row is also its stream
            // event (migration 0006).
            let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
                "INSERT INTO messages (room_id, seq, user_id, client_msg_id, text, reply_to, created_at) \
                 SELECT r, s, u, c, t, p, $7 \
                 FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[]) \
                     AS x(r, s, u, c, t, p) \
                 ON CONFLICT (user_id, client_msg_id) DO NOTHING \
                 RETURNING id, room_id, seq",
            )
            .bind(&rooms)
            .bind(&seqs)
            .bind(&users)
            .bind(&cmids)
            .bind(&texts)
            .bind(&replies)
            .bind(plan.created_at())
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            if rows.len() != expected {
                drop(tx);
                tracing::debug!("concurrent duplicate in append batch; retrying");
                return Ok(Err(plan.into_batch()));
            }
            ids.extend(rows.into_iter().map(|(id, room, seq)| ((room, seq), id)));
        }
        tx.commit().await.map_err(db_err)?;
        Ok(Ok(plan.finish(&ids)))
    }
}

async fn lookup(
    tx: &mut Transaction<'static, Postgres>,
    wanted: &Wanted,
    now: i64,
) -> Result<Lookup, StoreError> {
    let mut out = Lookup::default();
    if !wanted.keys.is_empty() {
        let (users, cmids): (Vec<i64>, Vec<&str>) =
            wanted.keys.iter().map(|(u, c)| (*u, c.as_str())).unzip();
        let rows = sqlx::query(concat!(
            "SELECT ",
            msg_cols!(""),
            " FROM messages WHERE (user_id, client_msg_id) IN \
             (SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[]))"
        ))
        .bind(&users)
        .bind(&cmids)
        .fetch_all(&mut **tx)
        .await
        .map_err(db_err)?;
        for r in &rows {
            let m = message_at(r, 0)?;
            let key = (m.user_id, m.client_msg_id.clone().unwrap_or_default());
            out.existing.insert(key, m);
        }
    }
    if !wanted.senders.is_empty() {
        // Only the refused pairs come back (usually none).
        let (rooms, users): (Vec<i64>, Vec<i64>) = wanted.senders.iter().copied().unzip();
        let rows: Vec<(i64, i64, i32)> = sqlx::query_as(concat!(
            "SELECT x.r, x.u, ",
            refusal_sql!(code),
            " FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS x(r, u) \
             LEFT JOIN rooms r ON r.id = x.r \
             LEFT JOIN room_members rm ON rm.room_id = r.id AND rm.user_id = x.u \
             LEFT JOIN user_bans b ON b.user_id = rm.user_id WHERE ",
            refusal_sql!(where "$3"),
        ))
        .bind(&rooms)
        .bind(&users)
        .bind(now)
        .fetch_all(&mut **tx)
        .await
        .map_err(db_err)?;
        let refused = rows.into_iter();
        let refused = refused.map(|(room, user, code)| ((room, user), Refusal::from_code(code)));
        out.refused = Some(refused.collect());
    }
    if !wanted.users.is_empty() {
        out.users = sqlx::query_scalar("SELECT id FROM users WHERE id = ANY($1)")
            .bind(&wanted.users)
            .fetch_all(&mut **tx)
            .await
            .map_err(db_err)?
            .into_iter()
            .collect();
    }
    if !wanted.rooms.is_empty() {
        out.rooms = sqlx::query_scalar("SELECT id FROM rooms WHERE id = ANY($1)")
            .bind(&wanted.rooms)
            .fetch_all(&mut **tx)
            .await
            .map_err(db_err)?
            .into_iter()
            .collect();
    }
    if !wanted.replies.is_empty() {
        out.reply_rooms =
            sqlx::query_as::<_, (i64, i64)>("SELECT id, room_id FROM messages WHERE id = ANY($1)")
                .bind(&wanted.replies)
                .fetch_all(&mut **tx)
                .await
                .map_err(db_err)?
                .into_iter()
                .collect();
    }
    Ok(out)
}

crate::shared::sql_store!(PgStore, PgRow);
