//! Test backends for the store contract suites and the PostgreSQL end-to-end tests: a fresh SQLite
//! file, or a fresh schema of the PostgreSQL database named by `CHATSYNC_TEST_POSTGRES_URL`.
//!
//! Each PostgreSQL test gets its own schema (`cs_test_<uuid>`, put first in the connection's
//! `search_path` through the URL's `options`), dropped when the test's [`PgSchema`] is dropped (also on
//! panic), so parallel tests and runs cannot see each other. When the variable is unset (a machine with
//! only Rust), PostgreSQL tests print a note and pass without running; when it is set and the server
//! does not answer, they fail.
#![allow(dead_code)]

use chatsync::store::{self, Backend, Durability};

/// The variable naming the test PostgreSQL database.
pub const PG_URL_VAR: &str = "CHATSYNC_TEST_POSTGRES_URL";

/// A schema of its own in the test database, dropped (with everything in it) on drop.
pub struct PgSchema {
    /// The URL that connects with this schema first in the `search_path`.
    pub url: String,
    /// The schema name.
    pub name: String,
    base_url: String,
}

impl PgSchema {
    /// Creates a fresh schema; `None` (after a printed note) if `CHATSYNC_TEST_POSTGRES_URL` is unset.
    /// Panics if the variable is set and the server cannot be reached.
    pub async fn create() -> Option<PgSchema> {
        let Some(base_url) = std::env::var(PG_URL_VAR).ok().filter(|u| !u.is_empty()) else {
            eprintln!("note: {PG_URL_VAR} is unset; skipping this PostgreSQL test");
            return None;
        };
        let name = format!("cs_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = connect(&base_url).await;
        sqlx::query(&format!("CREATE SCHEMA {name}")).execute(&mut conn).await.unwrap();
        let separator = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{separator}options=-c%20search_path%3D{name}");
        Some(PgSchema { url, name, base_url })
    }

    /// A plain connection to the schema (for inspecting tables directly).
    pub async fn connect(&self) -> sqlx::PgConnection {
        connect(&self.url).await
    }
}

async fn connect(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection as _;
    match sqlx::PgConnection::connect(url).await {
        Ok(conn) => conn,
        Err(e) => panic!("{PG_URL_VAR} is set but PostgreSQL does not answer: {e}"),
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // A thread of its own with its own runtime: drop may run inside (or outside) a runtime.
        let (url, name) = (self.base_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                sqlx::query("SET lock_timeout = '1s'").execute(&mut conn).await?;
                let drop_schema = format!("DROP SCHEMA IF EXISTS {name} CASCADE");
                let dropped = sqlx::query(&drop_schema).execute(&mut conn).await;
                if dropped.as_ref().err().and_then(|e| e.as_database_error()).and_then(|e| e.code()).as_deref()
                    == Some("55P03")
                {
                    // A lock timeout. This drop blocks the test's runtime (the join above), and a server
                    // of the test may still have work on that runtime in the middle of a transaction: a
                    // pool connection opened in the background, warming up (seen holding the schema's
                    // tables "idle in transaction" after tests that end the server's sessions), or a
                    // server left running after a panic. Nothing will finish it, so the DROP waited
                    // forever (a test hung in CI this way). End the sessions of this database that hold
                    // locks on the schema's tables (waiting up to 5 s for each to exit), then drop.
                    sqlx::query(
                        "SELECT pg_terminate_backend(l.pid, 5000) FROM pg_locks l \
                         JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE n.nspname = $1 AND l.pid <> pg_backend_pid() \
                         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    )
                    .bind(&name)
                    .execute(&mut conn)
                    .await?;
                    sqlx::query(&drop_schema).execute(&mut conn).await?;
                } else {
                    dropped?;
                }
                conn.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("note: could not drop test schema {}", self.name);
        }
    }
}

/// Where a test backend lives.
pub enum Place {
    /// A SQLite file in a temporary directory.
    Sqlite(tempfile::TempDir),
    /// A PostgreSQL schema.
    Postgres(PgSchema),
}

/// An open backend and the database it lives in (dropped after the backend).
pub struct TestBackend {
    pub backend: Backend,
    pub place: Place,
}

impl TestBackend {
    /// The store URL of this backend's database.
    pub fn url(&self) -> String {
        match &self.place {
            Place::Sqlite(dir) => format!("sqlite://{}", dir.path().join("chatsync.db").display()),
            Place::Postgres(schema) => schema.url.clone(),
        }
    }

    /// Opens another handle on the same database (a second node, or the same one after a restart).
    pub async fn open_again(&self) -> Backend {
        store::open_backend(&self.url(), Durability::Full).await.unwrap()
    }
}

/// A backend on a fresh SQLite file (always available).
pub async fn sqlite() -> Option<TestBackend> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("chatsync.db").display());
    let backend = store::open_backend(&url, Durability::Full).await.unwrap();
    Some(TestBackend { backend, place: Place::Sqlite(dir) })
}

/// A backend on a fresh PostgreSQL schema; `None` when `CHATSYNC_TEST_POSTGRES_URL` is unset.
pub async fn postgres() -> Option<TestBackend> {
    let schema = PgSchema::create().await?;
    let backend = store::open_backend(&schema.url, Durability::Full).await.unwrap();
    Some(TestBackend { backend, place: Place::Postgres(schema) })
}
