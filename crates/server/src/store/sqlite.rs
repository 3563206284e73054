//! The embedded store: SQLite through sqlx, WAL mode, migrations embedded in the binary.

use super::{ApiKey, Device, Millis, NewSession, Session, SessionInfo, Store, StoreError, User, UserSummary};
use anyhow::Context as _;
use async_trait::async_trait;
use rusqlite::OptionalExtension as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Row;
use std::path::Path;
use std::time::Duration;

/// How long every connection (pool, writer, checkpointer, CLI) waits for a lock held by another
/// connection or process before failing with "database is locked".
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How a transaction that writes starts. A deferred `BEGIN` that reads first and writes later cannot
/// wait for the write lock (SQLite returns SQLITE_BUSY at once rather than risk a deadlock), so
/// transactions that write take the lock up front, where the busy timeout applies.
pub(super) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    /// Identity (authentication, sessions, devices) and key metadata: never queued behind chat reads,
    /// so a burst of large reads cannot starve authentication.
    pub(super) pool: SqlitePool,
    /// Chat reads (lists, pages, lookups).
    pub(super) reads: SqlitePool,
    pub(super) writer: super::sqlite_chats::Writer,
    /// Device sightings (one per authentication), recorded in shared transactions ([`record_sightings`]).
    sightings: tokio::sync::mpsc::Sender<Sighting>,
    /// The lookups of every API request and every authentication, answered on the calling thread.
    inline: InlineReads,
}

/// Point lookups on the hot paths (the API key of every `/v1/api` request, the session of every
/// WebSocket authentication), answered on the calling thread by connections of their own. Reading a row
/// by its key from pages in memory takes a few µs; handing the query to a pool connection's thread and
/// waking the task again costs more than the query (in the `stream` benchmark's profile the hand-off was
/// about a fifth of the server's CPU). A lookup does not wait for other connections: when both reserved
/// connections are in use, or SQLite cannot take its read lock at once (busy timeout 0), the lookup goes
/// to the pool as before. The rows read are tiny and always current: this is not a cache (a revocation
/// committed by another process is seen by the next lookup). [`Store::close`] closes both connections.
struct InlineReads {
    conns: [parking_lot::Mutex<Option<rusqlite::Connection>>; 2],
}

impl InlineReads {
    fn open(path: &Path) -> rusqlite::Result<InlineReads> {
        let open = || -> rusqlite::Result<_> {
            let flags = rusqlite::OpenFlags::default() - rusqlite::OpenFlags::SQLITE_OPEN_CREATE;
            let conn = rusqlite::Connection::open_with_flags(path, flags)?;
            conn.busy_timeout(Duration::ZERO)?;
            conn.execute_batch("PRAGMA query_only = ON;")?;
            Ok(parking_lot::Mutex::new(Some(conn)))
        };
        Ok(InlineReads { conns: [open()?, open()?] })
    }

    /// Runs `read` on a free connection, or `None` (use the pool) when none is free (or closed) or the read
    /// failed.
    fn try_read<T>(&self, read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>) -> Option<T> {
        let guard = self.conns.iter().find_map(|c| c.try_lock().filter(|g| g.is_some()))?;
        match read(guard.as_ref()?) {
            Ok(found) => Some(found),
            Err(e) => {
                tracing::debug!(error = %e, "inline lookup failed; asking the pool");
                None
            }
        }
    }
}

const SESSION_BY_TOKEN_HASH: &str = "SELECT s.session_id, s.user_id, s.device_hash, s.expires_at, s.revoked_at, \
     u.tfa_enabled FROM sessions s JOIN users u ON u.user_id = s.user_id WHERE s.token_hash = ?1";

const API_KEY_BY_HASH: &str =
    "SELECT key_id, name, created_at, last_used_at, revoked_at FROM api_keys WHERE key_hash = ?1";

/// A device seen at an authentication, waiting to be recorded.
struct Sighting {
    user_id: String,
    device_hash: String,
    label: Option<String>,
    now: Millis,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Most sightings recorded in one transaction.
const MAX_SIGHTINGS: usize = 256;

/// Records device sightings in shared transactions: a reconnect storm costs one commit (one fsync, one
/// acquisition of SQLite's write lock, which the chat writer also wants) per batch instead of per connection.
/// A batch that a row of it fails (a constraint: its user was deleted meanwhile) is retried sighting by
/// sighting, so that the bad one fails only its own authentication; any other failure (busy, I/O) fails the
/// batch, without retrying each sighting against the same trouble.
async fn record_sightings(pool: SqlitePool, mut queue: tokio::sync::mpsc::Receiver<Sighting>) {
    let mut batch = Vec::with_capacity(MAX_SIGHTINGS);
    while queue.recv_many(&mut batch, MAX_SIGHTINGS).await > 0 {
        match record_batch(&pool, &batch).await {
            Ok(()) => batch.drain(..).for_each(|s| {
                let _ = s.done.send(Ok(()));
            }),
            Err(sqlx::Error::Database(e)) if batch.len() > 1 && e.kind() != sqlx::error::ErrorKind::Other => {
                for s in batch.drain(..) {
                    let result = record_batch(&pool, std::slice::from_ref(&s)).await.map_err(StoreError::from);
                    let _ = s.done.send(result);
                }
            }
            Err(e) => {
                let e = StoreError::from(e);
                batch.drain(..).for_each(|s| {
                    let each = match &e {
                        StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
                        other => StoreError::Backend(other.to_string()),
                    };
                    let _ = s.done.send(Err(each));
                });
            }
        }
    }
}

async fn record_batch(pool: &SqlitePool, batch: &[Sighting]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin_with(BEGIN_WRITE).await?;
    for s in batch {
        upsert_device(&mut tx, &s.user_id, &s.device_hash, s.label.as_deref(), s.now).await?;
    }
    tx.commit().await
}

/// Applies the pending migrations in one write transaction (`BEGIN IMMEDIATE`; each migration a savepoint
/// in it). sqlx's migrator takes no lock on SQLite: processes opening a new database at once each read
/// the list of applied migrations before the first of them applied any, and all but one failed on a
/// migration another had applied (`table users already exists`). In one transaction, the list is read
/// under SQLite's write lock, which the others wait for (up to the busy timeout), and a process that dies
/// in the middle leaves no migration half applied. (`run_direct` is what `run` calls on the connection it
/// acquires; here that connection is the transaction's.)
async fn migrate(pool: &SqlitePool) -> anyhow::Result<()> {
    let mut tx = pool.begin_with(BEGIN_WRITE).await?;
    sqlx::migrate!("migrations/sqlite").run_direct(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and applies pending migrations.
    pub async fn open(path: &Path, durability: super::Durability) -> anyhow::Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::datadir::create_private_dir(dir)
                .with_context(|| format!("cannot create data directory {}", dir.display()))?;
            // Created anew (O_EXCL, which never follows a symbolic link): a link planted under the probe's
            // name in a directory others can write to would otherwise have this process truncate the file
            // it names. A name of this process's own, so that commands opening the store at once do not
            // meet each other's probe.
            let probe = dir.join(format!(".chatsync-write-test-{}", std::process::id()));
            let _ = std::fs::remove_file(&probe);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .with_context(|| format!("data directory {} is not writable", dir.display()))?;
            let _ = std::fs::remove_file(probe);
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                super::Durability::Full => SqliteSynchronous::Full,
                super::Durability::Normal => SqliteSynchronous::Normal,
            })
            .foreign_keys(true)
            // Deleted rows (delivered webhook events, ended sessions) are overwritten, as the chat
            // writer's are.
            .pragma("secure_delete", "on")
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("cannot open database {}", path.display()))?;
        migrate(&pool).await.with_context(|| format!("cannot migrate database {}", path.display()))?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open database {}", path.display()))?;
        let inline = InlineReads::open(path).with_context(|| format!("cannot open database {}", path.display()))?;
        let writer = super::sqlite_chats::Writer::start(path, durability)
            .with_context(|| format!("cannot open database {} for writing", path.display()))?;
        let (sightings, queue) = tokio::sync::mpsc::channel(4 * MAX_SIGHTINGS);
        tokio::spawn(record_sightings(pool.clone(), queue));
        Ok(SqliteStore { pool, reads, writer, sightings, inline })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(&self, user_id: &str, tfa_enabled: bool, now: Millis) -> Result<(), StoreError> {
        let done = sqlx::query(
            "INSERT INTO users (user_id, tfa_enabled, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
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
        let row = sqlx::query("SELECT user_id, tfa_enabled, created_at FROM users WHERE user_id = ?1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| User { user_id: r.get(0), tfa_enabled: r.get(1), created_at: r.get(2) }))
    }

    async fn create_session(&self, s: &NewSession) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let exists =
            sqlx::query("SELECT 1 FROM users WHERE user_id = ?1").bind(&s.user_id).fetch_optional(&mut *tx).await?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        insert_session(&mut tx, s).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn provision(&self, users: &[String], sessions: &[NewSession]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let now = super::now_millis();
        for user in users {
            sqlx::query(
                "INSERT INTO users (user_id, tfa_enabled, created_at) VALUES (?1, 0, ?2) ON CONFLICT DO NOTHING",
            )
            .bind(user)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        for s in sessions {
            insert_session(&mut tx, s).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn session_by_token_hash(&self, token_hash: &[u8; 32]) -> Result<Option<Session>, StoreError> {
        let session = |r: &rusqlite::Row<'_>| -> rusqlite::Result<Session> {
            Ok(Session {
                session_id: r.get(0)?,
                user_id: r.get(1)?,
                device_hash: r.get(2)?,
                expires_at: r.get(3)?,
                revoked_at: r.get(4)?,
                user_tfa: r.get(5)?,
            })
        };
        let inline = self
            .inline
            .try_read(|c| c.prepare_cached(SESSION_BY_TOKEN_HASH)?.query_row([&token_hash[..]], session).optional());
        if let Some(found) = inline {
            return Ok(found);
        }
        let row = sqlx::query(SESSION_BY_TOKEN_HASH).bind(&token_hash[..]).fetch_optional(&self.pool).await?;
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
        // One statement: binds when unbound, and returns whatever the session is bound to now.
        let row = sqlx::query(
            "UPDATE sessions SET device_hash = COALESCE(device_hash, ?2) WHERE session_id = ?1 RETURNING device_hash",
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
        let (done, recorded) = tokio::sync::oneshot::channel();
        let sighting = Sighting {
            user_id: user_id.to_owned(),
            device_hash: device_hash.to_owned(),
            label: label.map(str::to_owned),
            now,
            done,
        };
        let stopped = || StoreError::Unavailable("store closed".into());
        self.sightings.send(sighting).await.map_err(|_| stopped())?;
        recorded.await.map_err(|_| stopped())?
    }

    async fn revoke_session(&self, token_hash: &[u8; 32], now: Millis) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE sessions SET revoked_at = ?2 WHERE token_hash = ?1 AND revoked_at IS NULL")
            .bind(&token_hash[..])
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn sessions_revoked_since(&self, since: Millis) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT session_id FROM sessions WHERE revoked_at >= ?1")
            .bind(since)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    async fn devices(&self, user_id: &str) -> Result<Vec<Device>, StoreError> {
        let rows = sqlx::query(
            "SELECT device_hash, label, first_seen, last_seen FROM devices WHERE user_id = ?1 \
             ORDER BY last_seen DESC, device_hash",
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
        let rows = sqlx::query("SELECT user_id, tfa_enabled, created_at FROM users ORDER BY user_id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| User { user_id: r.get(0), tfa_enabled: r.get(1), created_at: r.get(2) }).collect())
    }

    async fn sessions_of(&self, user_id: &str) -> Result<Vec<SessionInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.session_id, s.device_hash, d.label, s.created_at, s.expires_at, s.revoked_at \
             FROM sessions s LEFT JOIN devices d ON d.user_id = s.user_id AND d.device_hash = s.device_hash \
             WHERE s.user_id = ?1 ORDER BY s.created_at DESC, s.session_id",
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
            "UPDATE sessions SET revoked_at = ?3 \
             WHERE user_id = ?1 AND device_hash = ?2 AND revoked_at IS NULL RETURNING session_id",
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
             FROM users u WHERE u.user_id = ?1",
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
            "UPDATE sessions SET revoked_at = COALESCE(revoked_at, ?2) WHERE session_id = ?1 RETURNING user_id",
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
        sqlx::query("INSERT INTO api_keys (key_id, key_hash, name, created_at) VALUES (?1, ?2, ?3, ?4)")
            .bind(key_id)
            .bind(&key_hash[..])
            .bind(name)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn api_key_by_hash(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        let key = |r: &rusqlite::Row<'_>| -> rusqlite::Result<ApiKey> {
            Ok(ApiKey {
                key_id: r.get(0)?,
                name: r.get(1)?,
                created_at: r.get(2)?,
                last_used_at: r.get(3)?,
                revoked_at: r.get(4)?,
            })
        };
        if let Some(found) =
            self.inline.try_read(|c| c.prepare_cached(API_KEY_BY_HASH)?.query_row([&key_hash[..]], key).optional())
        {
            return Ok(found);
        }
        let row = sqlx::query(API_KEY_BY_HASH).bind(&key_hash[..]).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| api_key_row(&r)))
    }

    async fn touch_api_key(&self, key_id: &str, now: Millis) -> Result<(), StoreError> {
        sqlx::query("UPDATE api_keys SET last_used_at = ?2 WHERE key_id = ?1")
            .bind(key_id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, name, created_at, last_used_at, revoked_at FROM api_keys ORDER BY created_at, key_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(api_key_row).collect())
    }

    async fn revoke_api_key(&self, key_id: &str, now: Millis) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE api_keys SET revoked_at = ?2 WHERE key_id = ?1 AND revoked_at IS NULL")
            .bind(key_id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn close(&self) {
        for conn in &self.inline.conns {
            conn.lock().take();
        }
        self.writer.close().await;
        self.reads.close().await;
        self.pool.close().await;
    }
}

async fn insert_session(conn: &mut sqlx::SqliteConnection, s: &NewSession) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sessions (session_id, token_hash, user_id, device_hash, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
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

/// Records a device seen at `?4`: first seen then if new, else its latest sighting and label.
const UPSERT_DEVICE: &str = "INSERT INTO devices (user_id, device_hash, label, first_seen, last_seen) \
     VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (user_id, device_hash) DO UPDATE SET \
     last_seen = MAX(last_seen, excluded.last_seen), label = COALESCE(excluded.label, label)";

async fn upsert_device(
    conn: &mut sqlx::SqliteConnection,
    user_id: &str,
    device_hash: &str,
    label: Option<&str>,
    now: Millis,
) -> Result<(), sqlx::Error> {
    sqlx::query(UPSERT_DEVICE).bind(user_id).bind(device_hash).bind(label).bind(now).execute(conn).await?;
    Ok(())
}

fn api_key_row(r: &sqlx::sqlite::SqliteRow) -> ApiKey {
    ApiKey { key_id: r.get(0), name: r.get(1), created_at: r.get(2), last_used_at: r.get(3), revoked_at: r.get(4) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lookups_answer_the_same_inline_and_through_the_pool_when_the_inline_connections_are_busy() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db"), super::super::Durability::Normal).await.unwrap();
        store.create_user("alice", true, 1).await.unwrap();
        let session = NewSession {
            session_id: "s1".into(),
            token_hash: [7; 32],
            user_id: "alice".into(),
            device_hash: None,
            device_label: None,
            created_at: 1,
            expires_at: Some(99),
        };
        store.create_session(&session).await.unwrap();
        store.create_api_key("ak_1", &[9; 32], Some("k"), 2).await.unwrap();

        let inline = (store.session_by_token_hash(&[7; 32]).await.unwrap(), store.api_key_by_hash(&[9; 32]).await);
        let held: Vec<_> = store.inline.conns.iter().map(|c| c.lock()).collect(); // both busy: the pool answers
        let pooled = (store.session_by_token_hash(&[7; 32]).await.unwrap(), store.api_key_by_hash(&[9; 32]).await);
        drop(held);
        assert_eq!(inline.0, pooled.0);
        assert_eq!(inline.1.unwrap(), pooled.1.unwrap());
        let found = inline.0.unwrap();
        assert_eq!((found.user_id.as_str(), found.expires_at, found.user_tfa), ("alice", Some(99), true));
        assert_eq!(store.session_by_token_hash(&[8; 32]).await.unwrap(), None);
        assert_eq!(store.api_key_by_hash(&[8; 32]).await.unwrap(), None);

        // A revocation is seen by the next inline lookup (not a cache).
        assert!(store.revoke_api_key("ak_1", 3).await.unwrap());
        assert_eq!(store.api_key_by_hash(&[9; 32]).await.unwrap().unwrap().revoked_at, Some(3));
        store.close().await;
    }
}
