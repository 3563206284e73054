//! The durable store: the `Store` trait (what every backend guarantees) and the shared record types.
//!
//! Only `store/` knows SQL. The embedded implementation is [`sqlite::SqliteStore`]; [`pg::PgStore`]
//! (PostgreSQL, for several nodes sharing one database) implements the same traits and passes the same
//! contract tests (`tests/store_contract.rs`, `tests/chat_store_contract.rs`).

pub mod bytes;
pub mod chats;
pub mod events;
pub mod metered;
pub mod pg;
mod pg_chats;
mod pg_events;
pub mod sqlite;
mod sqlite_chats;
mod sqlite_events;

#[doc(hidden)]
pub use sqlite_chats::WriterFaults;

use async_trait::async_trait;
use std::sync::Arc;

/// Milliseconds since the Unix epoch (the store's time unit).
pub type Millis = i64;

/// The latest time the wire can carry: 9999-12-31T23:59:59.999Z (RFC 3339 has four-digit years).
pub const LATEST_MILLIS: Millis = 253_402_300_799_999;

/// A store time as a [`SystemTime`](std::time::SystemTime), clamped to 1970..=[`LATEST_MILLIS`] so that
/// formatting it as RFC 3339 cannot fail.
pub fn system_time(ms: Millis) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.clamp(0, LATEST_MILLIS) as u64)
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record already exists (e.g. `users add` of an existing user).
    #[error("already exists")]
    AlreadyExists,
    /// A referenced record does not exist (e.g. a session for an unknown user).
    #[error("not found")]
    NotFound,
    /// The backend is unreachable or closed (retry later). The text is for server logs only.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend failed otherwise. The text is for server logs only.
    #[error("backend error: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => {
                StoreError::Unavailable(e.to_string())
            }
            ref db if pg_transient(db) || sqlite_transient(db) => StoreError::Unavailable(e.to_string()),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// SQLite errors worth retrying later, the same the chat writer's connection maps to `Unavailable`
/// (`sqlite_chats.rs`): the database held by another connection past the busy timeout (BUSY, LOCKED), a
/// full disk (FULL), an I/O error (IOERR), a file that cannot be opened (CANTOPEN). The identity half,
/// the chat reads and the webhook outbox reach SQLite through sqlx, which reports SQLite's extended result
/// code: its low byte is the primary one.
fn sqlite_transient(e: &sqlx::Error) -> bool {
    use rusqlite::ffi;
    let Some(db) = e.as_database_error() else { return false };
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_none() {
        return false;
    }
    let Some(code) = db.code().and_then(|c| c.parse::<i32>().ok()) else { return false };
    matches!(
        code & 0xff,
        ffi::SQLITE_BUSY | ffi::SQLITE_LOCKED | ffi::SQLITE_FULL | ffi::SQLITE_IOERR | ffi::SQLITE_CANTOPEN
    )
}

/// PostgreSQL errors worth retrying later: connection exceptions (08), a transaction rolled back by a
/// deadlock or serialization failure (40), insufficient resources such as a full disk (53), operator
/// intervention such as a shutdown (57), and a write refused as read-only (25006): a primary demoted by
/// a failover, or a standby reached before the new primary is promoted.
fn pg_transient(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else { return false };
    let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() else { return false };
    pg.code() == "25006" || ["08", "40", "53", "57"].iter().any(|class| pg.code().starts_with(class))
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user id.
    pub user_id: String,
    /// Whether the user has two-factor authentication (changes the device-mismatch close reason).
    pub tfa_enabled: bool,
    /// Creation time.
    pub created_at: Millis,
}

/// A session to create. `token_hash` is SHA-256 of the token; the token itself is never stored.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Random id for logs and revocation broadcasts.
    pub session_id: String,
    /// SHA-256(token).
    pub token_hash: [u8; 32],
    /// Owner.
    pub user_id: String,
    /// Device the session is bound to at issue, if any.
    pub device_hash: Option<String>,
    /// The device id behind `device_hash`, when known (stored as the device's label).
    pub device_label: Option<String>,
    /// Issue time.
    pub created_at: Millis,
    /// Expiry, if any.
    pub expires_at: Option<Millis>,
}

/// A stored session, joined with its user's 2FA flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Session id.
    pub session_id: String,
    /// Owner.
    pub user_id: String,
    /// Bound device, once bound.
    pub device_hash: Option<String>,
    /// Expiry, if any.
    pub expires_at: Option<Millis>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<Millis>,
    /// The owner's 2FA flag.
    pub user_tfa: bool,
}

/// A device known for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Lowercase hex SHA-256 fingerprint.
    pub device_hash: String,
    /// The device id the client gave (`X-Device-Id`, `device_id`, `sessions issue --device-id`); `None`
    /// for a fingerprinted device.
    pub label: Option<String>,
    /// First authenticated connection (or binding at issue).
    pub first_seen: Millis,
    /// Latest authenticated connection.
    pub last_seen: Millis,
}

/// A session as listed for operators (`chatsync sessions list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Session id.
    pub session_id: String,
    /// Bound device, once bound.
    pub device_hash: Option<String>,
    /// The bound device's label, when known.
    pub device_label: Option<String>,
    /// Issue time.
    pub created_at: Millis,
    /// Expiry, if any.
    pub expires_at: Option<Millis>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<Millis>,
}

/// An API key of an application backend (SERVER_API.md section 1). The key itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Public id (`ak_…`), for listing and revocation.
    pub key_id: String,
    /// Operator's name for it.
    pub name: Option<String>,
    /// Creation time.
    pub created_at: Millis,
    /// Latest authenticated request (updated at most once a minute).
    pub last_used_at: Option<Millis>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<Millis>,
}

/// A user with the counts the server API reports (`GET /v1/api/users/{user_id}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    /// The user.
    pub user: User,
    /// Chats the user owns (deleted ones excluded).
    pub chat_count: u64,
    /// Devices known for the user.
    pub device_count: u64,
}

/// Durable truth for identities. Every method is atomic on its own.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a user. Fails with [`StoreError::AlreadyExists`] if the id is taken.
    async fn create_user(&self, user_id: &str, tfa_enabled: bool, now: Millis) -> Result<(), StoreError>;

    /// Looks a user up.
    async fn user(&self, user_id: &str) -> Result<Option<User>, StoreError>;

    /// Stores a session; a device given at issue is also recorded as known for the user.
    /// Fails with [`StoreError::NotFound`] if the user does not exist.
    async fn create_session(&self, session: &NewSession) -> Result<(), StoreError>;

    /// Bulk provisioning (benchmarks, imports): creates the users that do not exist yet (without 2FA)
    /// and all `sessions`, in one transaction.
    async fn provision(&self, users: &[String], sessions: &[NewSession]) -> Result<(), StoreError>;

    /// Finds a session by SHA-256(token), whatever its state (the caller checks expiry and revocation).
    async fn session_by_token_hash(&self, token_hash: &[u8; 32]) -> Result<Option<Session>, StoreError>;

    /// Binds an unbound session to `device_hash` atomically and returns the device the session is now
    /// bound to: `device_hash` if it was unbound (or already bound to it), the other device otherwise.
    async fn bind_session_device(&self, session_id: &str, device_hash: &str) -> Result<String, StoreError>;

    /// Records `device_hash` as known for the user (first/last seen). A `label` (the device id the client
    /// gave) replaces the stored one; `None` keeps it.
    async fn record_device(
        &self,
        user_id: &str,
        device_hash: &str,
        label: Option<&str>,
        now: Millis,
    ) -> Result<(), StoreError>;

    /// Revokes the session with this token hash. Returns `false` if there is none or it was already revoked.
    async fn revoke_session(&self, token_hash: &[u8; 32], now: Millis) -> Result<bool, StoreError>;

    /// Ids of sessions revoked at or after `since`.
    async fn sessions_revoked_since(&self, since: Millis) -> Result<Vec<String>, StoreError>;

    /// The user's known devices, most recently seen first.
    async fn devices(&self, user_id: &str) -> Result<Vec<Device>, StoreError>;

    /// Every user, by id.
    async fn users(&self) -> Result<Vec<User>, StoreError>;

    /// Every session of the user (active, expired and revoked), newest first, with the bound device's label.
    async fn sessions_of(&self, user_id: &str) -> Result<Vec<SessionInfo>, StoreError>;

    /// Revokes every not yet revoked session of the user bound to `device_hash`, atomically, and returns
    /// their ids, sorted (empty if there were none).
    async fn revoke_device(&self, user_id: &str, device_hash: &str, now: Millis) -> Result<Vec<String>, StoreError>;

    /// The user with its chat and device counts.
    async fn user_summary(&self, user_id: &str) -> Result<Option<UserSummary>, StoreError>;

    /// Revokes the session with this id (kept revoked if it already was) and returns its owner; `None` if
    /// there is no such session.
    async fn revoke_session_by_id(&self, session_id: &str, now: Millis) -> Result<Option<String>, StoreError>;

    /// Stores an API key (`key_hash` = SHA-256 of the key).
    async fn create_api_key(
        &self,
        key_id: &str,
        key_hash: &[u8; 32],
        name: Option<&str>,
        now: Millis,
    ) -> Result<(), StoreError>;

    /// Finds an API key by SHA-256(key), whatever its state (the caller checks revocation).
    async fn api_key_by_hash(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError>;

    /// Records that the key was used at `now`.
    async fn touch_api_key(&self, key_id: &str, now: Millis) -> Result<(), StoreError>;

    /// Every API key, oldest first.
    async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError>;

    /// Revokes an API key. Returns `false` if there is none with this id or it was already revoked.
    async fn revoke_api_key(&self, key_id: &str, now: Millis) -> Result<bool, StoreError>;

    /// Closes the backend; every later call fails with [`StoreError::Unavailable`].
    async fn close(&self);
}

/// When a write counts as durable (SQLite's `synchronous` setting; on PostgreSQL, `normal` turns
/// `synchronous_commit` off for chatsync's connections and `full` keeps the server's setting, unless
/// that is `off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every commit is fsynced before it is confirmed: nothing acknowledged is lost, even on power loss.
    #[default]
    Full,
    /// Commits reach the OS before they are confirmed: nothing acknowledged is lost if the process
    /// crashes, but an OS crash or power loss may lose the last moments of writes.
    Normal,
}

/// Both halves of one backend.
#[derive(Clone)]
pub struct Backend {
    /// Users, sessions, devices.
    pub identity: Arc<dyn Store>,
    /// Chats, messages, keys.
    pub chats: Arc<dyn chats::ChatStore>,
    /// The webhook outbox.
    pub events: Arc<dyn events::EventStore>,
}

/// How long a statement of a server may run in PostgreSQL by default (`--store-timeout-secs`).
pub const DEFAULT_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens the store named by `url` (`sqlite://PATH`, or `postgres://…` / `postgresql://…`), creating
/// and migrating it as needed, for a server: a PostgreSQL pool is opened in full, and its statements
/// are bounded by [`DEFAULT_STORE_TIMEOUT`] (see [`open_server_backend`]).
pub async fn open_backend(url: &str, durability: Durability) -> Result<Backend, anyhow::Error> {
    open_server_backend(url, durability, DEFAULT_STORE_TIMEOUT).await
}

/// [`open_backend`] with `store_timeout` (`--store-timeout-secs`): on PostgreSQL, the server's
/// connections run with that `statement_timeout`, so that PostgreSQL cancels (and rolls back) a write
/// batch stuck on a lock another session holds, and the writer gives up on a batch with no answer
/// shortly after (a host gone without a reset).
pub async fn open_server_backend(
    url: &str,
    durability: Durability,
    store_timeout: std::time::Duration,
) -> Result<Backend, anyhow::Error> {
    let backend = open_with(url, durability, Some(store_timeout)).await?;
    backend.chats.set_write_timeout(store_timeout);
    Ok(backend)
}

/// [`open_backend`] for a one-off command (`keys rotate`): a PostgreSQL pool that opens connections only as
/// the command needs them.
pub async fn open_command_backend(url: &str, durability: Durability) -> Result<Backend, anyhow::Error> {
    open_with(url, durability, None).await
}

/// Opens only the identity half (CLI commands; always fully durable; a PostgreSQL pool that opens
/// connections only as the command needs them).
pub async fn open(url: &str) -> Result<Arc<dyn Store>, anyhow::Error> {
    Ok(open_with(url, Durability::Full, None).await?.identity)
}

/// `serving`: for a server, its statement timeout (a command's statements, such as a key rotation's,
/// may take as long as they need).
async fn open_with(
    url: &str,
    durability: Durability,
    serving: Option<std::time::Duration>,
) -> Result<Backend, anyhow::Error> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let store = Arc::new(sqlite::SqliteStore::open(std::path::Path::new(path), durability).await?);
        return Ok(Backend { identity: store.clone(), chats: store.clone(), events: store });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = Arc::new(pg::PgStore::open(url, durability, serving).await?);
        return Ok(Backend { identity: store.clone(), chats: store.clone(), events: store });
    }
    anyhow::bail!("unsupported database URL scheme (supported: sqlite://PATH, postgres://USER@HOST:PORT/DB)")
}

/// A store URL as shown in messages and logs: the password of its userinfo and the value of a `password`
/// parameter in its query (sqlx, like libpq, takes it there too) are replaced by `***`.
pub fn shown_url(url: &str) -> String {
    let url = match url.split_once('?') {
        Some((base, query)) => {
            let pairs: Vec<&str> = query
                .split('&')
                .map(
                    |pair| {
                        if pair.split_once('=').is_some_and(|(k, _)| k == "password") {
                            "password=***"
                        } else {
                            pair
                        }
                    },
                )
                .collect();
            format!("{base}?{}", pairs.join("&"))
        }
        None => url.to_owned(),
    };
    let Some((scheme, rest)) = url.split_once("://") else { return url };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        _ => url,
    }
}

/// Milliseconds since the Unix epoch, from the server clock.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::shown_url;

    #[test]
    fn a_shown_store_url_holds_no_password() {
        assert_eq!(shown_url("postgres://cs:pw@db:5432/x"), "postgres://cs:***@db:5432/x");
        assert_eq!(
            shown_url("postgres://cs@db/x?sslmode=require&password=pw"),
            "postgres://cs@db/x?sslmode=require&password=***"
        );
        assert_eq!(
            shown_url("postgres://db/x?options=a@b:c"),
            "postgres://db/x?options=a@b:c",
            "an @ after the host is not userinfo"
        );
        assert_eq!(shown_url("sqlite://./data/chatsync.db"), "sqlite://./data/chatsync.db");
    }
}
