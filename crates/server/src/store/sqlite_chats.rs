//! [`ChatStore`] for SQLite: reads on the pool, writes through one writer task that batches concurrent
//! writes into shared `BEGIN IMMEDIATE … COMMIT` transactions (group commit).
//!
//! SQLite has one writer at a time; funnelling every chat write through a single connection removes
//! lock contention, and batching amortizes the commit (one fsync per batch). A batch whose transaction
//! fails is retried op by op, each in its own transaction, so one bad op cannot fail its neighbours.

use super::chats::{ChatLookup, ChatRecord, ChatStore, MessageRecord, Target, WrappedKey, WriteOp, WriteResult};
use super::sqlite::SqliteStore;
use super::StoreError;
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Connection as _, Row};
use tokio::sync::{mpsc, oneshot};

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

/// The sending half of the writer task's queue.
pub(super) struct Writer {
    tx: parking_lot::Mutex<Option<mpsc::Sender<Job>>>,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Writer {
    /// Starts the writer task on its own connection.
    pub(super) fn start(conn: SqliteConnection) -> Writer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(conn, rx));
        Writer { tx: parking_lot::Mutex::new(Some(tx)), task: parking_lot::Mutex::new(Some(task)) }
    }

    async fn submit(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        let tx = self.tx.lock().clone().ok_or_else(|| StoreError::Unavailable("store closed".into()))?;
        let (reply, answer) = oneshot::channel();
        tx.send(Job { op, reply }).await.map_err(|_| StoreError::Unavailable("store closed".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// Stops accepting writes, lets the queued ones finish, and waits for the writer to end.
    pub(super) async fn close(&self) {
        self.tx.lock().take();
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn run(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match apply_batch(&mut conn, &batch).await {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, size = batch.len(), "group commit failed; retrying its writes one by one");
                for job in batch.drain(..) {
                    let result = apply_batch(&mut conn, std::slice::from_ref(&job)).await.map(|mut r| r.remove(0));
                    let _ = job.reply.send(result);
                }
            }
        }
    }
    let _ = conn.close().await;
}

async fn apply_batch(conn: &mut SqliteConnection, batch: &[Job]) -> Result<Vec<WriteResult>, StoreError> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        match apply(conn, &job.op).await {
            Ok(r) => results.push(r),
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                return Err(e);
            }
        }
    }
    if let Err(e) = sqlx::query("COMMIT").execute(&mut *conn).await {
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        return Err(e.into());
    }
    Ok(results)
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

async fn owned_chat(conn: &mut SqliteConnection, owner: &str, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
    let row = sqlx::query(&format!("SELECT {CHAT_COLS} FROM chats WHERE chat_id = ?1 AND owner = ?2"))
        .bind(chat_id)
        .bind(owner)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.as_ref().map(chat_record))
}

/// Inserts a new chat unless the id exists or was deleted. Returns the new row, or `Raced`/`NotFound`.
async fn create_chat(
    conn: &mut SqliteConnection,
    owner: &str,
    chat_id: &str,
    key: &WrappedKey,
    now: i64,
) -> Result<Result<ChatRecord, WriteResult>, StoreError> {
    let row = sqlx::query(&format!(
        "INSERT INTO chats (chat_id, owner, chat_key, kek_id, last_edited_ms, created_at) \
         SELECT ?1, ?2, ?3, ?4, ?5, ?5 WHERE NOT EXISTS (SELECT 1 FROM chat_tombstones WHERE chat_id = ?1) \
         ON CONFLICT (chat_id) DO NOTHING RETURNING {CHAT_COLS}"
    ))
    .bind(chat_id)
    .bind(owner)
    .bind(&key.wrapped)
    .bind(&key.kek_id)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = row {
        return Ok(Ok(chat_record(&row)));
    }
    Ok(Err(if owned_chat(conn, owner, chat_id).await?.is_some() { WriteResult::Raced } else { WriteResult::NotFound }))
}

/// The result when a conditional update matched no row: a conflict if the chat is the owner's.
async fn unmatched(conn: &mut SqliteConnection, owner: &str, chat_id: &str) -> Result<WriteResult, StoreError> {
    Ok(match owned_chat(conn, owner, chat_id).await? {
        Some(chat) => WriteResult::Conflict(chat),
        None => WriteResult::NotFound,
    })
}

async fn apply(conn: &mut SqliteConnection, op: &WriteOp) -> Result<WriteResult, StoreError> {
    match op {
        WriteOp::Title { owner, chat_id, title, target, if_version_at_most, now } => {
            if let Target::Create(key) = target {
                if let Err(result) = create_chat(conn, owner, chat_id, key, *now).await? {
                    return Ok(result);
                }
            }
            let row = sqlx::query(&format!(
                "UPDATE chats SET title = ?3, title_v = title_v + 1 \
                 WHERE chat_id = ?1 AND owner = ?2 AND (?4 IS NULL OR title_v <= ?4) RETURNING {CHAT_COLS}"
            ))
            .bind(chat_id)
            .bind(owner)
            .bind(title)
            .bind(if_version_at_most)
            .fetch_optional(&mut *conn)
            .await?;
            match row {
                Some(row) => Ok(WriteResult::Applied(chat_record(&row))),
                None => unmatched(conn, owner, chat_id).await,
            }
        }
        WriteOp::Draft { owner, chat_id, draft, target, if_version_at_most, now } => {
            if let Target::Create(key) = target {
                if let Err(result) = create_chat(conn, owner, chat_id, key, *now).await? {
                    return Ok(result);
                }
            }
            let row = sqlx::query(&format!(
                "UPDATE chats SET draft = ?3, draft_v = draft_v + 1, last_edited_ms = MAX(last_edited_ms, ?5) \
                 WHERE chat_id = ?1 AND owner = ?2 AND (?4 IS NULL OR draft_v <= ?4) RETURNING {CHAT_COLS}"
            ))
            .bind(chat_id)
            .bind(owner)
            .bind(draft)
            .bind(if_version_at_most)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            match row {
                Some(row) => Ok(WriteResult::Applied(chat_record(&row))),
                None => unmatched(conn, owner, chat_id).await,
            }
        }
        WriteOp::DeleteDraft { owner, chat_id, if_version_at_most } => {
            let row = sqlx::query(&format!(
                "UPDATE chats SET draft = NULL, draft_v = draft_v + 1 \
                 WHERE chat_id = ?1 AND owner = ?2 AND draft IS NOT NULL AND (?3 IS NULL OR draft_v <= ?3) \
                 RETURNING {CHAT_COLS}"
            ))
            .bind(chat_id)
            .bind(owner)
            .bind(if_version_at_most)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = row {
                return Ok(WriteResult::Applied(chat_record(&row)));
            }
            Ok(match owned_chat(conn, owner, chat_id).await? {
                None => WriteResult::NotFound,
                Some(chat) if chat.draft.is_none() => WriteResult::NoDraft(chat),
                Some(chat) => WriteResult::Conflict(chat),
            })
        }
        WriteOp::Message { owner, chat_id, message_id, content, client_timestamp, target, now } => {
            match target {
                Target::Create(key) => {
                    if let Err(result) = create_chat(conn, owner, chat_id, key, *now).await? {
                        return Ok(result);
                    }
                }
                Target::Existing => {
                    if owned_chat(conn, owner, chat_id).await?.is_none() {
                        return Ok(WriteResult::NotFound);
                    }
                }
            }
            let original = sqlx::query(
                "SELECT seq, message_id, content, client_timestamp, created_at FROM messages \
                 WHERE chat_id = ?1 AND message_id = ?2",
            )
            .bind(chat_id)
            .bind(message_id)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(original) = original {
                let chat = owned_chat(conn, owner, chat_id).await?.ok_or(StoreError::NotFound)?;
                return Ok(WriteResult::Message { chat, message: message_record(&original), duplicate: true });
            }
            let row = sqlx::query(&format!(
                "UPDATE chats SET messages_v = messages_v + 1, last_edited_ms = MAX(last_edited_ms, ?2) \
                 WHERE chat_id = ?1 RETURNING {CHAT_COLS}"
            ))
            .bind(chat_id)
            .bind(now)
            .fetch_one(&mut *conn)
            .await?;
            let chat = chat_record(&row);
            let message = MessageRecord {
                seq: chat.messages_v,
                message_id: message_id.clone(),
                content: content.clone(),
                client_timestamp: client_timestamp.clone(),
                created_at_ms: *now,
            };
            sqlx::query(
                "INSERT INTO messages (chat_id, seq, message_id, content, client_timestamp, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .bind(chat_id)
            .bind(message.seq as i64)
            .bind(&message.message_id)
            .bind(&message.content)
            .bind(&message.client_timestamp)
            .bind(message.created_at_ms)
            .execute(&mut *conn)
            .await?;
            Ok(WriteResult::Message { chat, message, duplicate: false })
        }
        WriteOp::DeleteChat { owner, chat_id, now } => {
            let deleted = sqlx::query("DELETE FROM chats WHERE chat_id = ?1 AND owner = ?2")
                .bind(chat_id)
                .bind(owner)
                .execute(&mut *conn)
                .await?;
            if deleted.rows_affected() == 0 {
                return Ok(WriteResult::NotFound);
            }
            sqlx::query("INSERT INTO chat_tombstones (chat_id, owner, deleted_at) VALUES (?1, ?2, ?3)")
                .bind(chat_id)
                .bind(owner)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            Ok(WriteResult::Deleted)
        }
        WriteOp::UserKey { user_id, candidate } => {
            sqlx::query("INSERT INTO user_keys (user_id, wrapped, kek_id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING")
                .bind(user_id)
                .bind(&candidate.wrapped)
                .bind(&candidate.kek_id)
                .execute(&mut *conn)
                .await?;
            let row = sqlx::query("SELECT wrapped, kek_id FROM user_keys WHERE user_id = ?1")
                .bind(user_id)
                .fetch_one(&mut *conn)
                .await?;
            Ok(WriteResult::UserKey(WrappedKey { wrapped: row.get(0), kek_id: row.get(1) }))
        }
    }
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
        owned_chat(&mut conn, owner, chat_id).await
    }

    async fn messages_after(
        &self,
        owner: &str,
        chat_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>, bool)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(chat) = owned_chat(&mut tx, owner, chat_id).await? else { return Ok(None) };
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
        let Some(chat) = owned_chat(&mut tx, owner, chat_id).await? else { return Ok(None) };
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
        let mut tx = self.pool.begin().await?;
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
