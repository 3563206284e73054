//! [`ChatStore`] for SQLite: reads on the sqlx pool; writes through one writer thread that batches
//! concurrent writes into shared `BEGIN IMMEDIATE … COMMIT` transactions (group commit).
//!
//! SQLite has one writer at a time; funnelling every chat write through a single connection removes
//! lock contention, and batching amortizes the commit (one fsync per batch). The writer owns a plain
//! `rusqlite` connection on its own thread, so a batch costs one hand-off between threads, not one per
//! statement. A batch whose transaction fails is retried op by op, each in its own transaction, so one
//! bad op cannot fail its neighbours.

use super::chats::{ChatLookup, ChatRecord, ChatStore, MessageRecord, Target, WrappedKey, WriteOp, WriteResult};
use super::sqlite::SqliteStore;
use super::StoreError;
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::path::Path;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How often the WAL is checkpointed into the database (off the write path).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// Most writes in one group-commit transaction.
const MAX_BATCH: usize = 512;
/// Queued writes before `write` waits (backpressure).
const QUEUE: usize = 8192;

const CHAT_COLS: &str =
    "chat_id, title, draft, title_v, messages_v, draft_v, last_edited_ms, unread_count, chat_key, kek_id";

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteResult, StoreError>>,
}

/// The sending half of the writer thread's queue.
pub(super) struct Writer {
    tx: parking_lot::Mutex<Option<mpsc::Sender<Job>>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::SystemIoFailure
                        | rusqlite::ErrorCode::CannotOpen
                ) =>
            {
                StoreError::Unavailable(e.to_string())
            }
            other => StoreError::Backend(other.to_string()),
        }
    }
}

impl Writer {
    /// Opens the writer's connection to `path` (already migrated) and starts its thread.
    pub(super) fn start(path: &Path, durability: super::Durability) -> anyhow::Result<Writer> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(super::sqlite::BUSY_TIMEOUT)?;
        // Checkpoints run on their own thread (below), not inside a commit on the write path.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; \
             PRAGMA wal_autocheckpoint = 0;",
        )?;
        conn.execute_batch(match durability {
            super::Durability::Full => "PRAGMA synchronous = FULL;",
            super::Durability::Normal => "PRAGMA synchronous = NORMAL;",
        })?;
        conn.set_prepared_statement_cache_capacity(64);
        let checkpointer = rusqlite::Connection::open(path)?;
        checkpointer.busy_timeout(super::sqlite::BUSY_TIMEOUT)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let checkpoints = std::thread::Builder::new()
            .name("chatsync-checkpoint".into())
            .spawn(move || checkpoint(checkpointer, stopped))?;
        let thread = std::thread::Builder::new().name("chatsync-writer".into()).spawn(move || {
            run(conn, rx);
            drop(stop);
            // `close` returns only once the final checkpoint is done and every connection of this
            // store is closed: a store opened next on the same file finds no lock still held.
            let _ = checkpoints.join();
        })?;
        Ok(Writer { tx: parking_lot::Mutex::new(Some(tx)), thread: parking_lot::Mutex::new(Some(thread)) })
    }

    async fn submit(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        let tx = self.tx.lock().clone().ok_or_else(|| StoreError::Unavailable("store closed".into()))?;
        let (reply, answer) = oneshot::channel();
        tx.send(Job { op, reply }).await.map_err(|_| StoreError::Unavailable("store closed".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// Stops accepting writes, lets the queued ones finish, and waits for the writer and the checkpoint
    /// thread to end (their connections closed).
    pub(super) async fn close(&self) {
        self.tx.lock().take();
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

fn run(mut conn: rusqlite::Connection, mut rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match apply_batch(&mut conn, &batch) {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, size = batch.len(), "group commit failed; retrying its writes one by one");
                for job in batch.drain(..) {
                    let result = apply_batch(&mut conn, std::slice::from_ref(&job)).map(|mut r| r.remove(0));
                    let _ = job.reply.send(result);
                }
            }
        }
    }
}

/// Copies the WAL back into the database every [`CHECKPOINT_EVERY`], concurrently with the writer (PASSIVE never
/// blocks it), and once more with TRUNCATE when the writer has stopped.
fn checkpoint(conn: rusqlite::Connection, stopped: std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match stopped.recv_timeout(CHECKPOINT_EVERY) {
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
            }
            _ => {
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
                return;
            }
        }
    }
}

fn apply_batch(conn: &mut rusqlite::Connection, batch: &[Job]) -> Result<Vec<WriteResult>, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        results.push(apply(&tx, &job.op)?);
    }
    tx.commit()?;
    Ok(results)
}

fn chat_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChatRecord> {
    Ok(ChatRecord {
        chat_id: r.get(0)?,
        title: r.get(1)?,
        draft: r.get(2)?,
        title_v: r.get::<_, i64>(3)? as u64,
        messages_v: r.get::<_, i64>(4)? as u64,
        draft_v: r.get::<_, i64>(5)? as u64,
        last_edited_ms: r.get(6)?,
        unread_count: r.get::<_, i64>(7)? as u64,
        key: WrappedKey { wrapped: r.get(8)?, kek_id: r.get(9)? },
    })
}

fn message_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRecord> {
    Ok(MessageRecord {
        seq: r.get::<_, i64>(0)? as u64,
        message_id: r.get(1)?,
        content: r.get(2)?,
        client_timestamp: r.get(3)?,
        created_at_ms: r.get(4)?,
    })
}

fn owned_chat(tx: &rusqlite::Connection, owner: &str, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
    let mut st = tx.prepare_cached(&format!("SELECT {CHAT_COLS} FROM chats WHERE chat_id = ?1 AND owner = ?2"))?;
    Ok(st.query_row(params![chat_id, owner], chat_row).optional()?)
}

/// Inserts a new chat unless the id exists or was deleted. Returns the new row, or `Raced`/`NotFound`.
fn create_chat(
    tx: &rusqlite::Connection,
    owner: &str,
    chat_id: &str,
    key: &WrappedKey,
    max_chats: u32,
    now: i64,
) -> Result<Result<ChatRecord, WriteResult>, StoreError> {
    // The count runs in the inserting statement: concurrent creations cannot overshoot the limit.
    let mut st = tx.prepare_cached(&format!(
        "INSERT INTO chats (chat_id, owner, chat_key, kek_id, last_edited_ms, created_at) \
         SELECT ?1, ?2, ?3, ?4, ?5, ?5 WHERE NOT EXISTS (SELECT 1 FROM chat_tombstones WHERE chat_id = ?1) \
         AND (SELECT COUNT(*) FROM chats WHERE owner = ?2) < ?6 \
         ON CONFLICT (chat_id) DO NOTHING RETURNING {CHAT_COLS}"
    ))?;
    let row = st.query_row(params![chat_id, owner, key.wrapped, key.kek_id, now, max_chats], chat_row).optional()?;
    if let Some(chat) = row {
        return Ok(Ok(chat));
    }
    if owned_chat(tx, owner, chat_id)?.is_some() {
        return Ok(Err(WriteResult::Raced));
    }
    let taken: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM chats WHERE chat_id = ?1) OR EXISTS (SELECT 1 FROM chat_tombstones WHERE chat_id = ?1)",
        params![chat_id],
        |r| r.get(0),
    )?;
    Ok(Err(if taken { WriteResult::NotFound } else { WriteResult::ChatLimit }))
}

/// Creates the chat of a [`Target::Create`] write. Returns the version condition that still applies
/// (none once the chat was created just now: it has no version a change could conflict with), or the
/// write's result if the chat could not be created.
fn reach(
    tx: &rusqlite::Connection,
    owner: &str,
    chat_id: &str,
    target: &Target,
    condition: Option<i64>,
    now: i64,
) -> Result<Result<Option<i64>, WriteResult>, StoreError> {
    match target {
        Target::Existing => Ok(Ok(condition)),
        Target::Create { key, max_chats } => Ok(create_chat(tx, owner, chat_id, key, *max_chats, now)?.map(|_| None)),
    }
}

/// The result when a conditional update matched no row: a conflict if the chat is the owner's.
fn unmatched(tx: &rusqlite::Connection, owner: &str, chat_id: &str) -> Result<WriteResult, StoreError> {
    Ok(match owned_chat(tx, owner, chat_id)? {
        Some(chat) => WriteResult::Conflict(chat),
        None => WriteResult::NotFound,
    })
}

/// Runs an `UPDATE … RETURNING` of one chat row.
fn update_chat(
    tx: &rusqlite::Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<Option<ChatRecord>, StoreError> {
    let mut st = tx.prepare_cached(sql)?;
    Ok(st.query_row(p, chat_row).optional()?)
}

fn apply(tx: &rusqlite::Connection, op: &WriteOp) -> Result<WriteResult, StoreError> {
    match op {
        WriteOp::Title { owner, chat_id, title, target, if_version_at_most, now } => {
            let if_version_at_most = match reach(tx, owner, chat_id, target, *if_version_at_most, *now)? {
                Ok(condition) => condition,
                Err(result) => return Ok(result),
            };
            let sql = format!(
                "UPDATE chats SET title = ?3, title_v = title_v + 1 \
                 WHERE chat_id = ?1 AND owner = ?2 AND (?4 IS NULL OR title_v <= ?4) RETURNING {CHAT_COLS}"
            );
            match update_chat(tx, &sql, params![chat_id, owner, title, if_version_at_most])? {
                Some(chat) => Ok(WriteResult::Applied(chat)),
                None => unmatched(tx, owner, chat_id),
            }
        }
        WriteOp::Draft { owner, chat_id, draft, target, if_version_at_most, now } => {
            let if_version_at_most = match reach(tx, owner, chat_id, target, *if_version_at_most, *now)? {
                Ok(condition) => condition,
                Err(result) => return Ok(result),
            };
            let sql = format!(
                "UPDATE chats SET draft = ?3, draft_v = draft_v + 1, last_edited_ms = MAX(last_edited_ms, ?5) \
                 WHERE chat_id = ?1 AND owner = ?2 AND (?4 IS NULL OR draft_v <= ?4) RETURNING {CHAT_COLS}"
            );
            match update_chat(tx, &sql, params![chat_id, owner, draft, if_version_at_most, now])? {
                Some(chat) => Ok(WriteResult::Applied(chat)),
                None => unmatched(tx, owner, chat_id),
            }
        }
        WriteOp::DeleteDraft { owner, chat_id, target, if_version_at_most } => {
            let if_version_at_most = match reach(tx, owner, chat_id, target, *if_version_at_most, 0)? {
                Ok(condition) => condition,
                Err(result) => return Ok(result),
            };
            let sql = format!(
                "UPDATE chats SET draft = NULL, draft_v = draft_v + 1 \
                 WHERE chat_id = ?1 AND owner = ?2 AND draft IS NOT NULL AND (?3 IS NULL OR draft_v <= ?3) \
                 RETURNING {CHAT_COLS}"
            );
            if let Some(chat) = update_chat(tx, &sql, params![chat_id, owner, if_version_at_most])? {
                return Ok(WriteResult::Applied(chat));
            }
            Ok(match owned_chat(tx, owner, chat_id)? {
                None => WriteResult::NotFound,
                Some(chat) if chat.draft.is_none() => WriteResult::NoDraft(chat),
                Some(chat) => WriteResult::Conflict(chat),
            })
        }
        WriteOp::Message { owner, chat_id, message_id, content, client_timestamp, target, now } => {
            match target {
                Target::Create { key, max_chats } => {
                    if let Err(result) = create_chat(tx, owner, chat_id, key, *max_chats, *now)? {
                        return Ok(result);
                    }
                }
                Target::Existing => {
                    if owned_chat(tx, owner, chat_id)?.is_none() {
                        return Ok(WriteResult::NotFound);
                    }
                }
            }
            let original = tx
                .prepare_cached(
                    "SELECT seq, message_id, content, client_timestamp, created_at FROM messages \
                     WHERE chat_id = ?1 AND message_id = ?2",
                )?
                .query_row(params![chat_id, message_id], message_row)
                .optional()?;
            if let Some(original) = original {
                let chat = owned_chat(tx, owner, chat_id)?.ok_or(StoreError::NotFound)?;
                return Ok(WriteResult::Message { chat, message: original, duplicate: true });
            }
            let sql = format!(
                "UPDATE chats SET messages_v = messages_v + 1, last_edited_ms = MAX(last_edited_ms, ?2) \
                 WHERE chat_id = ?1 RETURNING {CHAT_COLS}"
            );
            let chat = update_chat(tx, &sql, params![chat_id, now])?.ok_or(StoreError::NotFound)?;
            let message = MessageRecord {
                seq: chat.messages_v,
                message_id: message_id.clone(),
                content: content.clone(),
                client_timestamp: client_timestamp.clone(),
                created_at_ms: *now,
            };
            tx.prepare_cached(
                "INSERT INTO messages (chat_id, seq, message_id, content, client_timestamp, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                chat_id,
                message.seq as i64,
                message.message_id,
                message.content,
                message.client_timestamp,
                message.created_at_ms
            ])?;
            Ok(WriteResult::Message { chat, message, duplicate: false })
        }
        WriteOp::DeleteChat { owner, chat_id, now } => {
            let deleted = tx
                .prepare_cached("DELETE FROM chats WHERE chat_id = ?1 AND owner = ?2")?
                .execute(params![chat_id, owner])?;
            if deleted == 0 {
                return Ok(WriteResult::NotFound);
            }
            tx.prepare_cached("INSERT INTO chat_tombstones (chat_id, owner, deleted_at) VALUES (?1, ?2, ?3)")?
                .execute(params![chat_id, owner, now])?;
            Ok(WriteResult::Deleted)
        }
        WriteOp::UserKey { user_id, candidate } => {
            tx.prepare_cached(
                "INSERT INTO user_keys (user_id, wrapped, kek_id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )?
            .execute(params![user_id, candidate.wrapped, candidate.kek_id])?;
            let key = tx
                .prepare_cached("SELECT wrapped, kek_id FROM user_keys WHERE user_id = ?1")?
                .query_row(params![user_id], |r| Ok(WrappedKey { wrapped: r.get(0)?, kek_id: r.get(1)? }))?;
            Ok(WriteResult::UserKey(key))
        }
    }
}

fn chat_record(r: &SqliteRow) -> ChatRecord {
    ChatRecord {
        chat_id: r.get(0),
        title: r.get(1),
        draft: r.get(2),
        title_v: r.get::<i64, _>(3) as u64,
        messages_v: r.get::<i64, _>(4) as u64,
        draft_v: r.get::<i64, _>(5) as u64,
        last_edited_ms: r.get(6),
        unread_count: r.get::<i64, _>(7) as u64,
        key: WrappedKey { wrapped: r.get(8), kek_id: r.get(9) },
    }
}

fn message_record(r: &SqliteRow) -> MessageRecord {
    MessageRecord {
        seq: r.get::<i64, _>(0) as u64,
        message_id: r.get(1),
        content: r.get(2),
        client_timestamp: r.get(3),
        created_at_ms: r.get(4),
    }
}

async fn pool_owned_chat(
    conn: &mut sqlx::SqliteConnection,
    owner: &str,
    chat_id: &str,
) -> Result<Option<ChatRecord>, StoreError> {
    let row = sqlx::query(&format!("SELECT {CHAT_COLS} FROM chats WHERE chat_id = ?1 AND owner = ?2"))
        .bind(chat_id)
        .bind(owner)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.as_ref().map(chat_record))
}

#[async_trait]
impl ChatStore for SqliteStore {
    async fn write(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        self.writer.submit(op).await
    }

    async fn chat_lookup(&self, chat_id: &str) -> Result<ChatLookup, StoreError> {
        let row = sqlx::query("SELECT owner, chat_key, kek_id FROM chats WHERE chat_id = ?1")
            .bind(chat_id)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(r) = row {
            return Ok(ChatLookup::Exists { owner: r.get(0), key: WrappedKey { wrapped: r.get(1), kek_id: r.get(2) } });
        }
        let gone = sqlx::query("SELECT 1 FROM chat_tombstones WHERE chat_id = ?1")
            .bind(chat_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(if gone.is_some() { ChatLookup::Deleted } else { ChatLookup::Absent })
    }

    async fn user_key(&self, user_id: &str) -> Result<Option<WrappedKey>, StoreError> {
        let row = sqlx::query("SELECT wrapped, kek_id FROM user_keys WHERE user_id = ?1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| WrappedKey { wrapped: r.get(0), kek_id: r.get(1) }))
    }

    async fn chats(&self, owner: &str) -> Result<Vec<ChatRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CHAT_COLS} FROM chats WHERE owner = ?1 ORDER BY last_edited_ms DESC, chat_id"
        ))
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(chat_record).collect())
    }

    async fn chat(&self, owner: &str, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        pool_owned_chat(&mut conn, owner, chat_id).await
    }

    async fn messages_after(
        &self,
        owner: &str,
        chat_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>, bool)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(chat) = pool_owned_chat(&mut tx, owner, chat_id).await? else { return Ok(None) };
        let rows = sqlx::query(
            "SELECT seq, message_id, content, client_timestamp, created_at FROM messages \
             WHERE chat_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(chat_id)
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(limit as i64 + 1)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut messages: Vec<MessageRecord> = rows.iter().map(message_record).collect();
        let has_more = messages.len() > limit as usize;
        messages.truncate(limit as usize);
        Ok(Some((chat, messages, has_more)))
    }

    async fn latest_messages(
        &self,
        owner: &str,
        chat_id: &str,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(chat) = pool_owned_chat(&mut tx, owner, chat_id).await? else { return Ok(None) };
        let rows = sqlx::query(
            "SELECT seq, message_id, content, client_timestamp, created_at FROM messages \
             WHERE chat_id = ?1 ORDER BY seq DESC LIMIT ?2",
        )
        .bind(chat_id)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut messages: Vec<MessageRecord> = rows.iter().map(message_record).collect();
        messages.reverse();
        Ok(Some((chat, messages)))
    }

    async fn wrapped_keys(&self) -> Result<Vec<(String, WrappedKey)>, StoreError> {
        let rows = sqlx::query(
            "SELECT 'chat:' || chat_id, chat_key, kek_id FROM chats \
             UNION ALL SELECT 'user:' || user_id, wrapped, kek_id FROM user_keys",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), WrappedKey { wrapped: r.get(1), kek_id: r.get(2) })).collect())
    }

    async fn rewrap_keys(&self, keys: &[(String, WrappedKey)], check: &[u8]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(super::sqlite::BEGIN_WRITE).await?;
        for (key_ref, key) in keys {
            let (sql, id) = match key_ref.split_once(':') {
                Some(("chat", id)) => ("UPDATE chats SET chat_key = ?2, kek_id = ?3 WHERE chat_id = ?1", id),
                Some(("user", id)) => ("UPDATE user_keys SET wrapped = ?2, kek_id = ?3 WHERE user_id = ?1", id),
                _ => return Err(StoreError::Backend(format!("unknown key slot {key_ref}"))),
            };
            sqlx::query(sql).bind(id).bind(&key.wrapped).bind(&key.kek_id).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO meta (name, value) VALUES ('kek_check', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(check)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn key_check(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT value FROM meta WHERE name = 'kek_check'").fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn init_key_check(&self, check: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO meta (name, value) VALUES ('kek_check', ?1) ON CONFLICT DO NOTHING")
            .bind(check)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
