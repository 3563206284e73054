//! [`ChatStore`] for PostgreSQL: reads on the pool; writes through [`WRITERS`] writer tasks per process,
//! each of which batches the concurrent writes queued to it into one shared transaction (group commit:
//! one commit, so one WAL flush, per batch instead of per write). Writes are spread over the writers by
//! owner: one user's writes are applied in order by one writer; batches of different users overlap.
//!
//! Correctness never rests on the writer being alone: several gateway nodes may write to one database.
//! Every op is written so that PostgreSQL's row locks and statement atomicity (READ COMMITTED) make it
//! correct against concurrent transactions from anywhere:
//!
//! - versions are incremented in the writing `UPDATE … RETURNING`, which also checks ownership and the
//!   offline-sync condition (re-evaluated on the newest row version if it had to wait for a lock);
//! - a message first locks its chat row (`FOR NO KEY UPDATE`), so the duplicate check and the `seq`
//!   assignment in the next statement see every message committed before; the `(chat_id, message_id)`
//!   and `(chat_id, seq)` unique indexes back this up;
//! - creating a chat locks the owner's `users` row first, so the count in the inserting statement sees
//!   every other creation of that owner (the chat limit cannot be overshot by two nodes); a deletion of
//!   the same id that committed while the insert waited is caught by a second look at the tombstones.
//!
//! A batch whose transaction fails before its commit (a deadlock with another writer or node, a
//! constraint hit by a race, a bug) is rolled back and retried op by op, each in its own transaction, so
//! one bad op fails alone. A failed commit fails the whole batch with [`StoreError::Unavailable`] (its outcome is
//! unknown; nothing is retried). A panic while applying a batch fails that batch's writes with
//! `Unavailable` and the writer carries on; the pool replaces broken connections by itself, so
//! [`ChatStore::failed`] never resolves and [`ChatStore::writer_faults`] is `None` for this backend.

use super::chats::{ChatLookup, ChatRecord, ChatStore, MessageRecord, Target, WrappedKey, WriteOp, WriteResult};
use super::pg::PgStore;
use super::StoreError;
use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

/// Writer tasks per process, each with its own queue and (per batch) its own connection. A write goes
/// to the writer of its owner, so one user's writes stay in order; different users' batches commit in
/// parallel, overlapping their round trips to the server.
const WRITERS: usize = 4;
/// Most writes in one group-commit transaction.
const MAX_BATCH: usize = 256;
/// Queued writes per writer before `write` waits (backpressure).
const QUEUE: usize = 4096;

const CHAT_COLS: &str =
    "chat_id, title, draft, title_v, messages_v, draft_v, last_edited_ms, unread_count, chat_key, kek_id";
const MESSAGE_COLS: &str = "seq, message_id, content, client_timestamp, created_at";

/// Read transactions of more than one statement see one snapshot (as SQLite's do).
const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteResult, StoreError>>,
}

/// The sending halves of the writer tasks' queues.
pub(super) struct Writer {
    queues: parking_lot::Mutex<Option<Vec<mpsc::Sender<Job>>>>,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The user whose writer takes `op`: every op of one owner goes to the same writer, in order.
fn partition_key(op: &WriteOp) -> &str {
    match op {
        WriteOp::Title { owner, .. }
        | WriteOp::Draft { owner, .. }
        | WriteOp::DeleteDraft { owner, .. }
        | WriteOp::Message { owner, .. }
        | WriteOp::DeleteChat { owner, .. } => owner,
        WriteOp::UserKey { user_id, .. } => user_id,
    }
}

impl Writer {
    /// Starts [`WRITERS`] writer tasks on `pool`.
    pub(super) fn start(pool: PgPool) -> Writer {
        let (queues, tasks) = (0..WRITERS)
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                (tx, tokio::spawn(serve(pool.clone(), rx)))
            })
            .unzip();
        Writer { queues: parking_lot::Mutex::new(Some(queues)), tasks: parking_lot::Mutex::new(tasks) }
    }

    async fn submit(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        let tx = {
            let queues = self.queues.lock();
            let queues = queues.as_ref().ok_or_else(|| StoreError::Unavailable("store closed".into()))?;
            let mut hasher = std::hash::DefaultHasher::new();
            std::hash::Hash::hash(partition_key(&op), &mut hasher);
            queues[(std::hash::Hasher::finish(&hasher) % queues.len() as u64) as usize].clone()
        };
        let (reply, answer) = oneshot::channel();
        tx.send(Job { op, reply }).await.map_err(|_| StoreError::Unavailable("chat writer stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("chat writer failed this write".into()))?
    }

    /// Stops accepting writes, lets the queued ones finish, and waits for the writer tasks to end.
    pub(super) async fn close(&self) {
        self.queues.lock().take();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// One writer's group-commit loop: collects what is queued (up to [`MAX_BATCH`]) and applies it in one
/// transaction. Each batch runs in its own task: if it panics, its writes fail (their reply senders are
/// dropped) and the loop goes on.
async fn serve(pool: PgPool, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::with_capacity(MAX_BATCH.min(rx.len() + 1));
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let size = batch.len();
        if let Err(e) = tokio::spawn(run_batch(pool.clone(), batch)).await {
            tracing::error!(error = %e, size, "chat writer batch panicked; its writes failed with unavailable");
        }
    }
}

/// Why a batch failed, and whether it got as far as its commit.
struct BatchError {
    error: StoreError,
    at_commit: bool,
}

async fn run_batch(pool: PgPool, batch: Vec<Job>) {
    match apply_batch(&pool, &batch).await {
        Ok(results) => {
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.reply.send(Ok(result));
            }
        }
        Err(e) if e.at_commit || batch.len() == 1 => {
            if e.at_commit {
                let size = batch.len();
                tracing::error!(error = %e.error, size, "group commit failed; its writes failed with unavailable");
            }
            let error = if e.at_commit { StoreError::Unavailable(e.error.to_string()) } else { e.error };
            let text = error.to_string();
            let mut error = Some(error);
            let last = batch.len() - 1;
            for (i, job) in batch.into_iter().enumerate() {
                let error = if i == last { error.take().unwrap() } else { copy_error(&error, &text) };
                let _ = job.reply.send(Err(error));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e.error, size = batch.len(), "group commit failed; retrying its writes one by one");
            for job in batch {
                let result = apply_batch(&pool, std::slice::from_ref(&job)).await;
                let _ = job.reply.send(result.map(|mut r| r.remove(0)).map_err(|e| e.error));
            }
        }
    }
}

/// A copy of `error` (same kind, same text) for the other writes of a failed batch.
fn copy_error(error: &Option<StoreError>, text: &str) -> StoreError {
    match error {
        Some(StoreError::Unavailable(_)) => StoreError::Unavailable(text.to_owned()),
        Some(StoreError::AlreadyExists) => StoreError::AlreadyExists,
        Some(StoreError::NotFound) => StoreError::NotFound,
        _ => StoreError::Backend(text.to_owned()),
    }
}

async fn apply_batch(pool: &PgPool, batch: &[Job]) -> Result<Vec<WriteResult>, BatchError> {
    let before = |error: sqlx::Error| BatchError { error: error.into(), at_commit: false };
    let mut tx = pool.begin().await.map_err(before)?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let result = apply(&mut tx, &job.op).await.map_err(|error| BatchError { error, at_commit: false })?;
        results.push(result);
    }
    tx.commit().await.map_err(|error| BatchError { error: error.into(), at_commit: true })?;
    Ok(results)
}

fn chat_record(r: &PgRow) -> ChatRecord {
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

fn message_record(r: &PgRow) -> MessageRecord {
    MessageRecord {
        seq: r.get::<i64, _>(0) as u64,
        message_id: r.get(1),
        content: r.get(2),
        client_timestamp: r.get(3),
        created_at_ms: r.get(4),
    }
}

async fn owned_chat(c: &mut PgConnection, owner: &str, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
    let row = sqlx::query(&format!("SELECT {CHAT_COLS} FROM chats WHERE chat_id = $1 AND owner = $2"))
        .bind(chat_id)
        .bind(owner)
        .fetch_optional(&mut *c)
        .await?;
    Ok(row.as_ref().map(chat_record))
}

/// Inserts a new chat unless the id exists or was deleted, or the owner is at `max_chats`. Returns the
/// new row, or `Raced`/`NotFound`/`ChatLimit`.
async fn create_chat(
    c: &mut PgConnection,
    owner: &str,
    chat_id: &str,
    key: &WrappedKey,
    max_chats: u32,
    now: i64,
) -> Result<Result<ChatRecord, WriteResult>, StoreError> {
    // Creations by one owner queue on the owner's row (on every node), so the count in the inserting
    // statement (a fresh snapshot, taken once the lock is held) sees every creation committed before.
    sqlx::query("SELECT 1 FROM users WHERE user_id = $1 FOR NO KEY UPDATE").bind(owner).execute(&mut *c).await?;
    let row = sqlx::query(&format!(
        "INSERT INTO chats (chat_id, owner, chat_key, kek_id, last_edited_ms, created_at) \
         SELECT $1, $2, $3, $4, $5, $5 WHERE NOT EXISTS (SELECT 1 FROM chat_tombstones WHERE chat_id = $1) \
         AND (SELECT COUNT(*) FROM chats WHERE owner = $2) < $6 \
         ON CONFLICT (chat_id) DO NOTHING RETURNING {CHAT_COLS}"
    ))
    .bind(chat_id)
    .bind(owner)
    .bind(&key.wrapped)
    .bind(&key.kek_id)
    .bind(now)
    .bind(i64::from(max_chats))
    .fetch_optional(&mut *c)
    .await?;
    if let Some(row) = row {
        // If the insert waited for a concurrent deletion of this id to commit, that deletion's tombstone
        // was invisible to the insert's snapshot: look again with a fresh one.
        let deleted = sqlx::query("SELECT 1 FROM chat_tombstones WHERE chat_id = $1")
            .bind(chat_id)
            .fetch_optional(&mut *c)
            .await?;
        if deleted.is_some() {
            sqlx::query("DELETE FROM chats WHERE chat_id = $1").bind(chat_id).execute(&mut *c).await?;
            return Ok(Err(WriteResult::NotFound));
        }
        return Ok(Ok(chat_record(&row)));
    }
    if owned_chat(c, owner, chat_id).await?.is_some() {
        return Ok(Err(WriteResult::Raced));
    }
    let taken: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM chats WHERE chat_id = $1) \
         OR EXISTS (SELECT 1 FROM chat_tombstones WHERE chat_id = $1)",
    )
    .bind(chat_id)
    .fetch_one(&mut *c)
    .await?;
    Ok(Err(if taken { WriteResult::NotFound } else { WriteResult::ChatLimit }))
}

/// Creates the chat of a [`Target::Create`] write. Returns the version condition that still applies
/// (none once the chat was created just now), or the write's result if the chat could not be created.
async fn reach(
    c: &mut PgConnection,
    owner: &str,
    chat_id: &str,
    target: &Target,
    condition: Option<i64>,
    now: i64,
) -> Result<Result<Option<i64>, WriteResult>, StoreError> {
    match target {
        Target::Existing => Ok(Ok(condition)),
        Target::Create { key, max_chats } => {
            Ok(create_chat(c, owner, chat_id, key, *max_chats, now).await?.map(|_| None))
        }
    }
}

/// The result when a conditional update matched no row: a conflict if the chat is the owner's.
async fn unmatched(c: &mut PgConnection, owner: &str, chat_id: &str) -> Result<WriteResult, StoreError> {
    Ok(match owned_chat(c, owner, chat_id).await? {
        Some(chat) => WriteResult::Conflict(chat),
        None => WriteResult::NotFound,
    })
}

async fn apply(c: &mut PgConnection, op: &WriteOp) -> Result<WriteResult, StoreError> {
    match op {
        WriteOp::Title { owner, chat_id, title, target, if_version_at_most, now } => {
            let condition = match reach(c, owner, chat_id, target, *if_version_at_most, *now).await? {
                Ok(condition) => condition,
                Err(result) => return Ok(result),
            };
            let row = sqlx::query(&format!(
                "UPDATE chats SET title = $3, title_v = title_v + 1 \
                 WHERE chat_id = $1 AND owner = $2 AND ($4::BIGINT IS NULL OR title_v <= $4) RETURNING {CHAT_COLS}"
            ))
            .bind(chat_id)
            .bind(owner)
            .bind(title)
            .bind(condition)
            .fetch_optional(&mut *c)
            .await?;
            match row {
                Some(row) => Ok(WriteResult::Applied(chat_record(&row))),
                None => unmatched(c, owner, chat_id).await,
            }
        }
        WriteOp::Draft { owner, chat_id, draft, target, if_version_at_most, now } => {
            let condition = match reach(c, owner, chat_id, target, *if_version_at_most, *now).await? {
                Ok(condition) => condition,
                Err(result) => return Ok(result),
            };
            let row = sqlx::query(&format!(
                "UPDATE chats SET draft = $3, draft_v = draft_v + 1, last_edited_ms = GREATEST(last_edited_ms, $5) \
                 WHERE chat_id = $1 AND owner = $2 AND ($4::BIGINT IS NULL OR draft_v <= $4) RETURNING {CHAT_COLS}"
            ))
            .bind(chat_id)
            .bind(owner)
            .bind(draft)
            .bind(condition)
            .bind(now)
            .fetch_optional(&mut *c)
            .await?;
            match row {
                Some(row) => Ok(WriteResult::Applied(chat_record(&row))),
                None => unmatched(c, owner, chat_id).await,
            }
        }
        WriteOp::DeleteDraft { owner, chat_id, target, if_version_at_most } => {
            let condition = match reach(c, owner, chat_id, target, *if_version_at_most, 0).await? {
                Ok(condition) => condition,
                Err(result) => return Ok(result),
            };
            let row = sqlx::query(&format!(
                "UPDATE chats SET draft = NULL, draft_v = draft_v + 1 \
                 WHERE chat_id = $1 AND owner = $2 AND draft IS NOT NULL AND ($3::BIGINT IS NULL OR draft_v <= $3) \
                 RETURNING {CHAT_COLS}"
            ))
            .bind(chat_id)
            .bind(owner)
            .bind(condition)
            .fetch_optional(&mut *c)
            .await?;
            if let Some(row) = row {
                return Ok(WriteResult::Applied(chat_record(&row)));
            }
            Ok(match owned_chat(c, owner, chat_id).await? {
                None => WriteResult::NotFound,
                Some(chat) if chat.draft.is_none() => WriteResult::NoDraft(chat),
                Some(chat) => WriteResult::Conflict(chat),
            })
        }
        WriteOp::Message { owner, chat_id, message_id, content, client_timestamp, target, now } => {
            match target {
                Target::Create { key, max_chats } => {
                    // The inserted row is locked by this transaction until it ends.
                    if let Err(result) = create_chat(c, owner, chat_id, key, *max_chats, *now).await? {
                        return Ok(result);
                    }
                }
                Target::Existing => {
                    // Lock the chat: messages of this chat from other transactions queue behind us, and
                    // the next statement's snapshot sees every message committed before.
                    let locked = sqlx::query("SELECT 1 FROM chats WHERE chat_id = $1 AND owner = $2 FOR NO KEY UPDATE")
                        .bind(chat_id)
                        .bind(owner)
                        .fetch_optional(&mut *c)
                        .await?;
                    if locked.is_none() {
                        return Ok(WriteResult::NotFound);
                    }
                }
            }
            // One statement: count the message (unless its id is stored) and insert it at the new count.
            let row = sqlx::query(&format!(
                "WITH chat AS (UPDATE chats \
                   SET messages_v = messages_v + 1, last_edited_ms = GREATEST(last_edited_ms, $2) \
                   WHERE chat_id = $1 AND NOT EXISTS (SELECT 1 FROM messages WHERE chat_id = $1 AND message_id = $3) \
                   RETURNING {CHAT_COLS}), \
                 inserted AS (INSERT INTO messages (chat_id, seq, message_id, content, client_timestamp, created_at) \
                   SELECT chat_id, messages_v, $3, $4, $5, $2 FROM chat) \
                 SELECT {CHAT_COLS} FROM chat"
            ))
            .bind(chat_id)
            .bind(now)
            .bind(message_id)
            .bind(content)
            .bind(client_timestamp)
            .fetch_optional(&mut *c)
            .await?;
            if let Some(row) = row {
                let chat = chat_record(&row);
                let message = MessageRecord {
                    seq: chat.messages_v,
                    message_id: message_id.clone(),
                    content: content.clone(),
                    client_timestamp: client_timestamp.clone(),
                    created_at_ms: *now,
                };
                return Ok(WriteResult::Message { chat, message, duplicate: false });
            }
            let original =
                sqlx::query(&format!("SELECT {MESSAGE_COLS} FROM messages WHERE chat_id = $1 AND message_id = $2"))
                    .bind(chat_id)
                    .bind(message_id)
                    .fetch_one(&mut *c)
                    .await?;
            let chat = owned_chat(c, owner, chat_id).await?.ok_or(StoreError::NotFound)?;
            Ok(WriteResult::Message { chat, message: message_record(&original), duplicate: true })
        }
        WriteOp::DeleteChat { owner, chat_id, now } => {
            // Messages go with the chat row (ON DELETE CASCADE), and so does its wrapped key (a column).
            let done = sqlx::query(
                "WITH gone AS (DELETE FROM chats WHERE chat_id = $1 AND owner = $2 RETURNING chat_id, owner) \
                 INSERT INTO chat_tombstones (chat_id, owner, deleted_at) SELECT chat_id, owner, $3 FROM gone",
            )
            .bind(chat_id)
            .bind(owner)
            .bind(now)
            .execute(&mut *c)
            .await?;
            Ok(if done.rows_affected() == 0 { WriteResult::NotFound } else { WriteResult::Deleted })
        }
        WriteOp::UserKey { user_id, candidate } => {
            let row = sqlx::query(
                "WITH stored AS (INSERT INTO user_keys (user_id, wrapped, kek_id) VALUES ($1, $2, $3) \
                   ON CONFLICT DO NOTHING RETURNING wrapped, kek_id) \
                 SELECT wrapped, kek_id FROM stored UNION ALL SELECT wrapped, kek_id FROM user_keys WHERE user_id = $1",
            )
            .bind(user_id)
            .bind(&candidate.wrapped)
            .bind(&candidate.kek_id)
            .fetch_optional(&mut *c)
            .await?;
            let row = match row {
                Some(row) => row,
                // Another transaction stored a key after this statement's snapshot: read it now.
                None => {
                    sqlx::query("SELECT wrapped, kek_id FROM user_keys WHERE user_id = $1")
                        .bind(user_id)
                        .fetch_one(&mut *c)
                        .await?
                }
            };
            Ok(WriteResult::UserKey(WrappedKey { wrapped: row.get(0), kek_id: row.get(1) }))
        }
    }
}

#[async_trait]
impl ChatStore for PgStore {
    async fn write(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        self.writer.submit(op).await
    }

    async fn chat_lookup(&self, chat_id: &str) -> Result<ChatLookup, StoreError> {
        let row = sqlx::query("SELECT owner, chat_key, kek_id FROM chats WHERE chat_id = $1")
            .bind(chat_id)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(r) = row {
            return Ok(ChatLookup::Exists { owner: r.get(0), key: WrappedKey { wrapped: r.get(1), kek_id: r.get(2) } });
        }
        let gone = sqlx::query("SELECT 1 FROM chat_tombstones WHERE chat_id = $1")
            .bind(chat_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(if gone.is_some() { ChatLookup::Deleted } else { ChatLookup::Absent })
    }

    async fn user_key(&self, user_id: &str) -> Result<Option<WrappedKey>, StoreError> {
        let row = sqlx::query("SELECT wrapped, kek_id FROM user_keys WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| WrappedKey { wrapped: r.get(0), kek_id: r.get(1) }))
    }

    async fn chats(&self, owner: &str) -> Result<Vec<ChatRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CHAT_COLS} FROM chats WHERE owner = $1 ORDER BY last_edited_ms DESC, chat_id"
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
        let mut tx = self.pool.begin_with(BEGIN_READ).await?;
        let Some(chat) = owned_chat(&mut tx, owner, chat_id).await? else { return Ok(None) };
        let rows = sqlx::query(&format!(
            "SELECT {MESSAGE_COLS} FROM messages WHERE chat_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(chat_id)
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
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
        let mut tx = self.pool.begin_with(BEGIN_READ).await?;
        let Some(chat) = owned_chat(&mut tx, owner, chat_id).await? else { return Ok(None) };
        let rows =
            sqlx::query(&format!("SELECT {MESSAGE_COLS} FROM messages WHERE chat_id = $1 ORDER BY seq DESC LIMIT $2"))
                .bind(chat_id)
                .bind(i64::from(limit))
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
                Some(("chat", id)) => ("UPDATE chats SET chat_key = $2, kek_id = $3 WHERE chat_id = $1", id),
                Some(("user", id)) => ("UPDATE user_keys SET wrapped = $2, kek_id = $3 WHERE user_id = $1", id),
                _ => return Err(StoreError::Backend(format!("unknown key slot {key_ref}"))),
            };
            sqlx::query(sql).bind(id).bind(&key.wrapped).bind(&key.kek_id).execute(&mut *tx).await?;
        }
        sqlx::query(
            "INSERT INTO meta (name, value) VALUES ('kek_check', $1) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
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
        sqlx::query("INSERT INTO meta (name, value) VALUES ('kek_check', $1) ON CONFLICT DO NOTHING")
            .bind(check)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
