//! The PostgreSQL store: sqlx, its own migrations (`migrations/postgres/`), the identity half here and
//! the chat half in `pg_chats.rs`.
//!
//! Several gateway nodes may share one database, so nothing here relies on in-process state for
//! correctness: every method is one statement or one transaction whose atomicity PostgreSQL provides
//! (`INSERT … ON CONFLICT`, `UPDATE … RETURNING`, row locks).
//!
//! The schema is created in the first schema of the connection's `search_path` (by default `public`);
//! `postgres://…?options=-c%20search_path%3Dchatsync` puts it elsewhere (the tests use one schema each).

use super::{ApiKey, Device, Millis, NewSession, Session, SessionInfo, Store, StoreError, User, UserSummary};
use anyhow::Context as _;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection as _, Row};
use std::str::FromStr;
use std::time::Duration;

/// Connections in the pool (reads, identity writes, and the chat writers' batches: one each).
const POOL_SIZE: u32 = 12;
/// How long a server's start waits for its whole pool to open.
const WARM_UP: Duration = Duration::from_secs(3);
/// How long a call waits for a free connection (or for a new one to be established).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection of the pool for one transaction, safe to cancel while its `BEGIN` is unanswered.
///
/// sqlx counts a transaction only once PostgreSQL has answered its `BEGIN`; a future dropped in between
/// (a warm-up cancelled because the user's last connection on the node closed, or any other cancelled
/// caller) rolled nothing back, and the connection went back to the pool inside that transaction: its next
/// user ran in the stale snapshot (a read-only one refused every write: "cannot execute INSERT in a
/// read-only transaction"), and once a statement failed there every later one did ("current transaction
/// is aborted"), for as long as the connection lived. Dropped while the `BEGIN` is in doubt, this closes
/// the connection instead (ending the transaction with the session); the pool opens another. Once the
/// `BEGIN` is answered, sqlx's own rollback on drop takes over.
///
/// The bug is sqlx's (transact-rs/sqlx#4393, fixed in sqlx 0.9.1, which claims the depth before the round
/// trip): once chatsync moves to sqlx 0.9, this wrapper can go.
pub(super) struct TxConn {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    in_doubt: bool,
}

impl TxConn {
    pub(super) async fn acquire(pool: &PgPool) -> Result<TxConn, sqlx::Error> {
        Ok(TxConn { conn: pool.acquire().await?, in_doubt: false })
    }

    /// Begins a transaction with `statement` (`None`: a plain `BEGIN`).
    pub(super) async fn begin(
        &mut self,
        statement: Option<&'static str>,
    ) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
        self.in_doubt = true;
        let tx = match statement {
            Some(statement) => self.conn.begin_with(statement).await?,
            None => self.conn.begin().await?,
        };
        self.in_doubt = false;
        Ok(tx)
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if self.in_doubt {
            self.conn.close_on_drop();
        }
    }
}

/// PostgreSQL-backed [`Store`] (and [`super::chats::ChatStore`]).
pub struct PgStore {
    pub(super) pool: PgPool,
    pub(super) writer: super::pg_chats::Writer,
}

pub use super::pg_chats::warm_up;

/// The `synchronous_commit` chatsync's connections set, given the one PostgreSQL has for them
/// (`configured`): `off` for [`Durability::Normal`](super::Durability::Normal); for `Full`, `on` when
/// it is `off` (a database or role tuned that way would confirm writes a PostgreSQL crash can lose),
/// else none (`on`, `local`, `remote_write` and `remote_apply` all flush locally first).
fn synchronous_commit(durability: super::Durability, configured: &str) -> Option<&'static str> {
    match durability {
        super::Durability::Normal => Some("off"),
        super::Durability::Full => configured.eq_ignore_ascii_case("off").then_some("on"),
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://…` or `postgresql://…`) and applies pending
    /// migrations. With [`super::Durability::Normal`] the connections use `synchronous_commit = off`:
    /// a crash of the chatsync process loses nothing acknowledged, a crash of the PostgreSQL server may
    /// lose the last moments of writes (never corrupting anything). With `Full` they keep PostgreSQL's
    /// setting, unless that is `off` ([`synchronous_commit`]).
    ///
    /// A server (not a one-off command) passes its `statement_timeout`, set on every connection; it
    /// opens the whole pool ([`POOL_SIZE`] connections) before
    /// this returns and keeps it full: otherwise the pool grows on demand, and the first burst of requests
    /// after a start waits for PostgreSQL to start a backend per connection (a process each, tens of ms of
    /// CPU on a small machine) while it is also serving that burst. Each of those connections is warmed up
    /// for the writer's batches when it opens (`pg_chats::warm_up`). Best effort: a server whose
    /// PostgreSQL has fewer free connections still starts (after at most [`WARM_UP`]) and grows on demand.
    pub async fn open(
        url: &str,
        durability: super::Durability,
        statement_timeout: Option<std::time::Duration>,
    ) -> anyhow::Result<PgStore> {
        let mut options = PgConnectOptions::from_str(url).context("invalid PostgreSQL URL")?;
        let serving = statement_timeout.is_some();
        // One connection first: a refused connection or a bad password is reported as such, at once
        // (the pool would retry until its acquire timeout and report only the timeout).
        let mut probe = sqlx::PgConnection::connect_with(&options)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {}", super::shown_url(url)))?;
        let configured: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut probe)
            .await
            .context("cannot read synchronous_commit")?;
        if let Some(value) = synchronous_commit(durability, &configured) {
            if durability == super::Durability::Full {
                tracing::warn!(configured = %configured, "PostgreSQL's synchronous_commit is off; chatsync's connections turn it on (--durability full)");
            }
            options = options.options([("synchronous_commit", value)]);
        }
        if let Some(timeout) = statement_timeout {
            options = options.options([("statement_timeout", format!("{}ms", timeout.as_millis().max(1)))]);
        }
        // Migrated on that connection, before the pool opens any: a server's connections are warmed up
        // (below) with the functions the migrations create.
        sqlx::migrate!("migrations/postgres")
            .run(&mut probe)
            .await
            .with_context(|| format!("cannot migrate the PostgreSQL database at {}", super::shown_url(url)))?;
        let _ = probe.close().await;
        // Lazy: the pool's maintenance keeps `min_connections` open when it can, never failing the start.
        let mut pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .min_connections(if serving { POOL_SIZE } else { 0 })
            .acquire_timeout(ACQUIRE_TIMEOUT);
        if serving {
            // Every connection a server opens (at start, and when the pool replaces one: after a
            // PostgreSQL restart, or at the end of a connection's lifetime) is warmed up before its first
            // use. Best effort, and bounded: a connection whose warm-up fails or takes too long is rolled
            // back and used cold (or discarded, if even that fails).
            pool = pool.after_connect(|conn, _| {
                Box::pin(async move {
                    let limit = super::pg_chats::WARM_UP_LIMIT;
                    let error = match tokio::time::timeout(limit, super::pg_chats::warm_up(conn)).await {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("not done after {limit:?}"),
                    };
                    tracing::warn!(
                        error,
                        "could not warm up a PostgreSQL connection; its first writes plan the batch function"
                    );
                    // A warm-up cut short may have left its transaction open on the server (sqlx does not
                    // know of a BEGIN it did not see answered): end it, or discard the connection.
                    use sqlx::Executor as _;
                    match tokio::time::timeout(Duration::from_secs(2), conn.execute("ROLLBACK")).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(sqlx::Error::PoolTimedOut),
                    }
                })
            });
        }
        let pool = pool.connect_lazy_with(options);
        if serving {
            let all = futures_util::future::join_all((0..POOL_SIZE).map(|_| pool.acquire()));
            let opened = match tokio::time::timeout(WARM_UP, all).await {
                Ok(conns) => conns.iter().filter(|c| c.is_ok()).count(),
                Err(_) => 0,
            };
            if opened < POOL_SIZE as usize {
                tracing::warn!(
                    opened,
                    wanted = POOL_SIZE,
                    "could not open every PostgreSQL connection at start (is max_connections too low?); the pool grows on demand"
                );
            }
        }
        let writer = super::pg_chats::Writer::start(pool.clone());
        Ok(PgStore { pool, writer })
    }
}

/// Whether `e` is PostgreSQL's foreign key violation (a referenced row does not exist).
fn foreign_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "23503")
}

#[async_trait]
impl Store for PgStore {
    async fn create_user(&self, user_id: &str, tfa_enabled: bool, now: Millis) -> Result<(), StoreError> {
        let done = sqlx::query(
            "INSERT INTO users (user_id, tfa_enabled, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(user_id)
        .bind(tfa_enabled)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists);
        }
        Ok(())
    }

    async fn user(&self, user_id: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query("SELECT user_id, tfa_enabled, created_at FROM users WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| User { user_id: r.get(0), tfa_enabled: r.get(1), created_at: r.get(2) }))
    }

    async fn create_session(&self, s: &NewSession) -> Result<(), StoreError> {
        // The foreign key makes "the user exists" part of the insert itself.
        let mut conn = TxConn::acquire(&self.pool).await?;
        let mut tx = conn.begin(None).await?;
        match insert_session(&mut tx, s).await {
            Err(e) if foreign_key_violation(&e) => return Err(StoreError::NotFound),
            other => other?,
        }
        tx.commit().await?;
        Ok(())
    }

    async fn provision(&self, users: &[String], sessions: &[NewSession]) -> Result<(), StoreError> {
        let mut conn = TxConn::acquire(&self.pool).await?;
        let mut tx = conn.begin(None).await?;
        sqlx::query(
            "INSERT INTO users (user_id, tfa_enabled, created_at) SELECT u, FALSE, $2 FROM UNNEST($1::TEXT[]) AS u \
             ON CONFLICT DO NOTHING",
        )
        .bind(users)
        .bind(super::now_millis())
        .execute(&mut *tx)
        .await?;
        for s in sessions {
            insert_session(&mut tx, s).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn session_by_token_hash(&self, token_hash: &[u8; 32]) -> Result<Option<Session>, StoreError> {
        let row = sqlx::query(
            "SELECT s.session_id, s.user_id, s.device_hash, s.expires_at, s.revoked_at, u.tfa_enabled \
             FROM sessions s JOIN users u ON u.user_id = s.user_id WHERE s.token_hash = $1",
        )
        .bind(&token_hash[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Session {
            session_id: r.get(0),
            user_id: r.get(1),
            device_hash: r.get(2),
            expires_at: r.get(3),
            revoked_at: r.get(4),
            user_tfa: r.get(5),
        }))
    }

    async fn bind_session_device(&self, session_id: &str, device_hash: &str) -> Result<String, StoreError> {
        // One statement: the row lock makes racers queue; the second sees the first one's device.
        let row = sqlx::query(
            "UPDATE sessions SET device_hash = COALESCE(device_hash, $2) WHERE session_id = $1 RETURNING device_hash",
        )
        .bind(session_id)
        .bind(device_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.get(0)).ok_or(StoreError::NotFound)
    }

    async fn record_device(
        &self,
        user_id: &str,
        device_hash: &str,
        label: Option<&str>,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        upsert_device(&mut conn, user_id, device_hash, label, now).await?;
        Ok(())
    }

    async fn revoke_session(&self, token_hash: &[u8; 32], now: Millis) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE sessions SET revoked_at = $2 WHERE token_hash = $1 AND revoked_at IS NULL")
            .bind(&token_hash[..])
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn sessions_revoked_since(&self, since: Millis) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT session_id FROM sessions WHERE revoked_at >= $1")
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    async fn devices(&self, user_id: &str) -> Result<Vec<Device>, StoreError> {
        let rows = sqlx::query(
            "SELECT device_hash, label, first_seen, last_seen FROM devices WHERE user_id = $1 \
             ORDER BY last_seen DESC, device_hash COLLATE \"C\"",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Device { device_hash: r.get(0), label: r.get(1), first_seen: r.get(2), last_seen: r.get(3) })
            .collect())
    }

    async fn users(&self) -> Result<Vec<User>, StoreError> {
        let rows = sqlx::query("SELECT user_id, tfa_enabled, created_at FROM users ORDER BY user_id COLLATE \"C\"")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| User { user_id: r.get(0), tfa_enabled: r.get(1), created_at: r.get(2) }).collect())
    }

    async fn sessions_of(&self, user_id: &str) -> Result<Vec<SessionInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.session_id, s.device_hash, d.label, s.created_at, s.expires_at, s.revoked_at \
             FROM sessions s LEFT JOIN devices d ON d.user_id = s.user_id AND d.device_hash = s.device_hash \
             WHERE s.user_id = $1 ORDER BY s.created_at DESC, s.session_id COLLATE \"C\"",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| SessionInfo {
                session_id: r.get(0),
                device_hash: r.get(1),
                device_label: r.get(2),
                created_at: r.get(3),
                expires_at: r.get(4),
                revoked_at: r.get(5),
            })
            .collect())
    }

    async fn revoke_device(&self, user_id: &str, device_hash: &str, now: Millis) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "UPDATE sessions SET revoked_at = $3 \
             WHERE user_id = $1 AND device_hash = $2 AND revoked_at IS NULL RETURNING session_id",
        )
        .bind(user_id)
        .bind(device_hash)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut ids: Vec<String> = rows.into_iter().map(|r| r.get(0)).collect();
        ids.sort();
        Ok(ids)
    }

    async fn user_summary(&self, user_id: &str) -> Result<Option<UserSummary>, StoreError> {
        let row = sqlx::query(
            "SELECT u.user_id, u.tfa_enabled, u.created_at, \
             (SELECT COUNT(*) FROM chats WHERE owner = u.user_id), \
             (SELECT COUNT(*) FROM devices WHERE user_id = u.user_id) \
             FROM users u WHERE u.user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| UserSummary {
            user: User { user_id: r.get(0), tfa_enabled: r.get(1), created_at: r.get(2) },
            chat_count: r.get::<i64, _>(3) as u64,
            device_count: r.get::<i64, _>(4) as u64,
        }))
    }

    async fn revoke_session_by_id(&self, session_id: &str, now: Millis) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "UPDATE sessions SET revoked_at = COALESCE(revoked_at, $2) WHERE session_id = $1 RETURNING user_id",
        )
        .bind(session_id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn create_api_key(
        &self,
        key_id: &str,
        key_hash: &[u8; 32],
        name: Option<&str>,
        now: Millis,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO api_keys (key_id, key_hash, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(key_id)
            .bind(&key_hash[..])
            .bind(name)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn api_key_by_hash(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        let row =
            sqlx::query("SELECT key_id, name, created_at, last_used_at, revoked_at FROM api_keys WHERE key_hash = $1")
                .bind(&key_hash[..])
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| api_key_row(&r)))
    }

    async fn touch_api_key(&self, key_id: &str, now: Millis) -> Result<(), StoreError> {
        sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE key_id = $1")
            .bind(key_id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, name, created_at, last_used_at, revoked_at FROM api_keys ORDER BY created_at, key_id COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(api_key_row).collect())
    }

    async fn revoke_api_key(&self, key_id: &str, now: Millis) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE key_id = $1 AND revoked_at IS NULL")
            .bind(key_id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

async fn insert_session(conn: &mut sqlx::PgConnection, s: &NewSession) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sessions (session_id, token_hash, user_id, device_hash, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&s.session_id)
    .bind(&s.token_hash[..])
    .bind(&s.user_id)
    .bind(&s.device_hash)
    .bind(s.created_at)
    .bind(s.expires_at)
    .execute(&mut *conn)
    .await?;
    if let Some(device) = &s.device_hash {
        upsert_device(conn, &s.user_id, device, s.device_label.as_deref(), s.created_at).await?;
    }
    Ok(())
}

async fn upsert_device(
    conn: &mut sqlx::PgConnection,
    user_id: &str,
    device_hash: &str,
    label: Option<&str>,
    now: Millis,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO devices (user_id, device_hash, label, first_seen, last_seen) VALUES ($1, $2, $3, $4, $4) \
         ON CONFLICT (user_id, device_hash) DO UPDATE SET \
         last_seen = GREATEST(devices.last_seen, excluded.last_seen), label = COALESCE(excluded.label, devices.label)",
    )
    .bind(user_id)
    .bind(device_hash)
    .bind(label)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

fn api_key_row(r: &sqlx::postgres::PgRow) -> ApiKey {
    ApiKey { key_id: r.get(0), name: r.get(1), created_at: r.get(2), last_used_at: r.get(3), revoked_at: r.get(4) }
}

#[cfg(test)]
mod tests {
    use super::super::Durability;
    use super::synchronous_commit;

    #[test]
    fn full_durability_never_runs_with_synchronous_commit_off() {
        assert_eq!(synchronous_commit(Durability::Full, "off"), Some("on"));
        assert_eq!(synchronous_commit(Durability::Full, "OFF"), Some("on"));
        for kept in ["on", "local", "remote_write", "remote_apply"] {
            assert_eq!(synchronous_commit(Durability::Full, kept), None, "{kept}");
        }
        assert_eq!(synchronous_commit(Durability::Normal, "on"), Some("off"));
    }
}
