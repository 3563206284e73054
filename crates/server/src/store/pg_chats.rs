//! [`ChatStore`] for PostgreSQL: reads on the pool; writes through [`WRITERS`] writer tasks per process,
//! each of which takes the writes queued to it (up to [`MAX_BATCH`]) and applies them as one batch in
//! ONE statement, `SELECT * FROM chatsync_write_batch_locked(…arrays…)` (PL/pgSQL functions, migrations
//! `0003_write_batch.sql`, `0006_senders_read.sql`, `0008_batch_owner_locks.sql` and
//! `0012_mark_read_locks_its_chat.sql`), which is its own
//! transaction: one round trip and one commit (one WAL flush) per batch (group commit). The batch first
//! takes an advisory lock per distinct owner (of this schema: `0010_owner_locks_per_schema.sql`), in one
//! global order, so batches of different nodes that share owners queue instead of deadlocking
//! (PostgreSQL would break a deadlock only after a second). Writes are spread over the writers by owner:
//! one user's writes are applied in order by one writer; batches of different users overlap.
//!
//! Correctness never rests on the writer being alone: several gateway nodes may write to one database.
//! Each op in the function is written so that PostgreSQL's row locks and statement atomicity (READ
//! COMMITTED; each statement of the VOLATILE function takes a fresh snapshot) make it correct against
//! concurrent transactions from anywhere:
//!
//! - versions are incremented in the writing `UPDATE … RETURNING`, which also checks ownership and the
//!   offline-sync condition (re-evaluated on the newest row version if it had to wait for a lock);
//! - a message first locks its chat row (`FOR NO KEY UPDATE`), so the duplicate check and the `seq`
//!   assignment after it see every message committed before; the `(chat_id, message_id)` and
//!   `(chat_id, seq)` unique indexes back this up; a read marker locks it likewise before it recounts
//!   the unread messages (a subquery of an `UPDATE` that waited for the row reads the older snapshot);
//! - creating a chat locks the owner's `users` row first, so the count in the inserting statement sees
//!   every other creation of that owner (the chat limit cannot be overshot by two nodes); a deletion of
//!   the same id that committed while the insert waited is caught by a second look at the tombstones.
//!
//! A batch whose statement fails in the database (a deadlock with another writer or node, a constraint hit, a
//! bug) is rolled back whole and retried op by op, each in its own statement, so one bad op fails alone; a
//! write alone in its statement that PostgreSQL rolled back as a deadlock's victim or a serialization failure
//! runs once more (it did not commit). A batch whose outcome is unknown or whose connection broke (an I/O
//! error, a FATAL error, a connection exception) fails whole with [`StoreError::Unavailable`] and is not
//! retried, and its connection is closed; except a batch that PostgreSQL answered with nothing but the end of
//! its session ([`session_ended_before`]): it did not run, and runs again, once, on another connection. A
//! panic while handling a batch fails that batch's writes with `Unavailable` and the writer carries on; the
//! writer replaces its broken connection from the pool, which replaces its own, so [`ChatStore::failed`]
//! never resolves and [`ChatStore::writer_faults`] is `None` for this backend.

use super::chats::{ChatLookup, ChatRecord, ChatStore, MessageRecord, Target, WrappedKey, WriteOp, WriteResult};
use super::pg::{PgStore, TxConn};
use super::StoreError;
use async_trait::async_trait;
use futures_util::{FutureExt as _, TryStreamExt as _};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, PgRow, Postgres};
use sqlx::Row;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Writer tasks per process, each with its own queue and its own connection (held across batches). A write goes
/// to the writer of its owner, so one user's writes stay in order; different users' batches commit in
/// parallel, overlapping their round trips to the server. One: the writes that queue while a batch is
/// in flight form the next batch, so at ordinary load batches are larger and PostgreSQL runs fewer
/// transactions (three-node `fanout` at 2,000 writes/s, before the commit window: ~460 instead of ~1,100
/// per second, 38% less PostgreSQL CPU than with four writers; the window took ~30% more off), and the
/// saturation ceiling stayed within the noise of the measurement (BENCHMARKS.md). More writers help only when a commit waits long (a slow WAL flush).
const WRITERS: usize = 1;
/// How long the writer keeps its connection between two batches (see [`run_batch`]).
const HELD_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long the writer keeps one connection at most (the pool's own `max_lifetime` does not see a
/// connection that is never given back).
const HELD_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// How long a batch may take in PostgreSQL (`--store-timeout-secs`, the server's `statement_timeout`).
const DEFAULT_TIMEOUT: std::time::Duration = super::DEFAULT_STORE_TIMEOUT;
/// How much longer than that the writer waits for a batch's answer before it gives up on its connection
/// (PostgreSQL cancels the statement at the timeout and answers; no answer by then: the host is gone).
const NO_ANSWER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Most writes in one group-commit batch (one statement).
const MAX_BATCH: usize = 256;
/// Queued writes per writer before `write` waits (backpressure).
const QUEUE: usize = 4096;

const CHAT_COLS: &str =
    "chat_id, title, draft, title_v, messages_v, draft_v, last_edited_ms, unread_count, chat_key, kek_id, read_seq";
const MESSAGE_COLS: &str = "seq, message_id, content, client_timestamp, created_at, sender";

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
    /// The commit window, µs (see [`serve`]).
    window_us: Arc<AtomicU64>,
    /// How long a batch may take, ms (see [`run_batch`]).
    timeout_ms: Arc<AtomicU64>,
    /// Batches begun (see [`ChatStore::batches_begun`]).
    batches: Arc<AtomicU64>,
}

/// The user whose writer takes `op`: every op of one owner goes to the same writer, in order.
fn partition_key(op: &WriteOp) -> &str {
    match op {
        WriteOp::Title { owner, .. }
        | WriteOp::Draft { owner, .. }
        | WriteOp::DeleteDraft { owner, .. }
        | WriteOp::Message { owner, .. }
        | WriteOp::MarkRead { owner, .. }
        | WriteOp::DeleteChat { owner, .. } => owner,
        WriteOp::UserKey { user_id, .. } => user_id,
    }
}

impl Writer {
    /// Starts [`WRITERS`] writer tasks on `pool`.
    pub(super) fn start(pool: PgPool) -> Writer {
        let (window_us, batches) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let timeout_ms = Arc::new(AtomicU64::new(DEFAULT_TIMEOUT.as_millis() as u64));
        let (queues, tasks) = (0..WRITERS)
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                let knobs =
                    Knobs { window_us: window_us.clone(), timeout_ms: timeout_ms.clone(), batches: batches.clone() };
                (tx, tokio::spawn(serve(pool.clone(), rx, knobs)))
            })
            .unzip();
        let (queues, tasks) = (parking_lot::Mutex::new(Some(queues)), parking_lot::Mutex::new(tasks));
        Writer { queues, tasks, window_us, timeout_ms, batches }
    }

    /// Sets how long a batch may take (`--store-timeout-secs`).
    pub(super) fn set_timeout(&self, timeout: std::time::Duration) {
        self.timeout_ms.store(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1), Ordering::Relaxed);
    }

    /// Batches begun.
    pub(super) fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }

    /// Sets the commit window (`--commit-window-us`).
    pub(super) fn set_window(&self, window: std::time::Duration) {
        self.window_us.store(u64::try_from(window.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
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

/// What a writer task reads of its [`Writer`]'s settings and counters.
struct Knobs {
    window_us: Arc<AtomicU64>,
    timeout_ms: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
}

/// One writer's group-commit loop: collects what is queued (up to [`MAX_BATCH`]) and applies it in one
/// transaction. A batch that panics is caught: its writes fail (their reply senders are
/// dropped) and the loop goes on.
///
/// The commit window: when the writer takes a write with none queued behind it (it was idle, or this one
/// write arrived during the previous commit), it waits `window_us` for others to share the transaction,
/// since PostgreSQL's cost is mostly per transaction (the batch function's setup); when several writes
/// queued while a batch was in flight, they form the next batch without waiting. The wait is a thread's
/// sleep on the blocking pool ([`precise_sleep`]), not tokio's timer, which rounds up to its next
/// millisecond tick (a 250 µs window waited 1-2 ms).
async fn serve(pool: PgPool, mut rx: mpsc::Receiver<Job>, knobs: Knobs) {
    let Knobs { window_us, timeout_ms, batches } = knobs;
    // The writer's own connection, held from one batch to the next (see [`run_batch`]), with when it was
    // acquired and last used.
    let mut held: Option<(PoolConnection<Postgres>, Instant, Instant)> = None;
    while let Some(first) = rx.recv().await {
        batches.fetch_add(1, Ordering::SeqCst);
        let window = window_us.load(Ordering::Relaxed);
        if window > 0 && rx.is_empty() {
            precise_sleep(std::time::Duration::from_micros(window)).await;
        }
        let mut batch = Vec::with_capacity(MAX_BATCH.min(rx.len() + 1));
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let size = batch.len();
        metrics::histogram!(crate::metrics::WRITER_BATCH).record(size as f64);
        let now = Instant::now();
        // A connection idle for a while may have been dropped by the server or the network meanwhile
        // (a restart, an idle timeout): it goes back to the pool, which checks it, and a checked one is
        // taken. Under load batches follow each other and the connection is kept, up to an age.
        let held_one = held.take().filter(|(_, acquired, used)| {
            now.duration_since(*used) < HELD_IDLE && now.duration_since(*acquired) < HELD_MAX_AGE
        });
        let (conn, acquired) = match held_one {
            Some((conn, acquired, _)) => (conn, acquired),
            None => match pool.acquire().await {
                Ok(conn) => (conn, Instant::now()),
                Err(e) => {
                    tracing::error!(error = %e, size, "no PostgreSQL connection for a group commit; its writes failed with unavailable");
                    let text = e.to_string();
                    for job in batch {
                        let _ = job.reply.send(Err(StoreError::Unavailable(text.clone())));
                    }
                    continue;
                }
            },
        };
        // Run in the writer's own task (a spawned task would cost a hand-off and a wake-up per batch);
        // a panic is caught here and fails only this batch.
        let timeout = std::time::Duration::from_millis(timeout_ms.load(Ordering::Relaxed)) + NO_ANSWER_GRACE;
        match std::panic::AssertUnwindSafe(run_batch(&pool, (conn, acquired), batch, timeout)).catch_unwind().await {
            Ok(conn) => held = conn.map(|(conn, acquired)| (conn, acquired, Instant::now())),
            Err(panic) => {
                let what = crate::logging::panic_text(&*panic);
                tracing::error!(size, panic = what, "chat writer batch panicked; its writes failed with unavailable");
            }
        }
    }
}

/// Sleeps `duration` to within the OS timer's slack (tens of µs on Linux), where `tokio::time::sleep`
/// would round it up to the timer wheel's next millisecond tick: a thread of the blocking pool sleeps
/// and wakes the caller (two wake-ups per batch that waits, a few µs of CPU; at most one such thread per
/// writer, kept by the pool between batches). If the pool refuses the task (the runtime is shutting
/// down), the window is skipped.
async fn precise_sleep(duration: std::time::Duration) {
    let _ = tokio::task::spawn_blocking(move || std::thread::sleep(duration)).await;
}

/// Applies `batch` on the writer's connection and answers its writes; gives the connection back unless
/// it may be broken.
///
/// The writer holds one connection of the pool from one batch to the next instead of acquiring one per
/// batch: an acquire and a release cost a task hand-off and two round trips (sqlx checks a connection
/// with a ping before handing it out and when it comes back), and in the three-node benchmark the
/// writer's batch took ~1.07 ms against 0.3-0.4 ms of statement. The connection is kept while batches
/// follow each other ([`HELD_IDLE`]) and up to an age ([`HELD_MAX_AGE`]); after a pause the next batch
/// takes a checked one, so a connection dropped while the writer was idle costs no write. A connection
/// that breaks under a batch ([`breaks_connection`]) is closed: that batch fails with `unavailable` (its
/// outcome is unknown), and the next one acquires a checked connection; except when the session had
/// ended before the batch ran ([`session_ended_before`]): then it runs again, once, on a checked
/// connection (PostgreSQL restarted, or an operator or an idle timeout ended the session, between two
/// batches).
async fn run_batch(
    pool: &PgPool,
    (mut conn, mut acquired): (PoolConnection<Postgres>, Instant),
    batch: Vec<Job>,
    timeout: std::time::Duration,
) -> Option<(PoolConnection<Postgres>, Instant)> {
    let mut healthy = true;
    let mut answered = false;
    let mut outcome = apply_lone_again_if_conflicted(&mut conn, &batch, timeout, &mut answered).await;
    if let Err(e) = &outcome {
        if session_ended_before(e, answered) {
            tracing::warn!(error = %e, "the writer's PostgreSQL session had ended; its batch runs on another connection");
            metrics::counter!(crate::metrics::WRITER_RERUNS).increment(1);
            // Its pool slot is freed before another connection is asked for.
            conn.close_on_drop();
            drop(conn);
            conn = match pool.acquire().await {
                Ok(fresh) => fresh,
                Err(e) => {
                    let text = e.to_string();
                    for job in batch {
                        let _ = job.reply.send(Err(StoreError::Unavailable(text.clone())));
                    }
                    return None;
                }
            };
            acquired = Instant::now();
            outcome = apply_lone_again_if_conflicted(&mut conn, &batch, timeout, &mut answered).await;
        }
    }
    match outcome {
        Ok(results) => {
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.reply.send(Ok(result));
            }
        }
        // PostgreSQL cancelled the statement at `statement_timeout` (a lock another session holds): it
        // was rolled back, and each op retried alone would wait as long again.
        Err(e) if is_cancelled(&e) => {
            tracing::error!(error = %e, size = batch.len(), "group commit cancelled at the store timeout; its writes failed with unavailable");
            let text = e.to_string();
            for job in batch {
                let _ = job.reply.send(Err(StoreError::Unavailable(text.clone())));
            }
        }
        // The statement failed in the database and was rolled back whole: retry op by op, so that only
        // the failing op gets the error.
        Err(e @ sqlx::Error::Database(_)) if batch.len() > 1 && !breaks_connection(&e) => {
            tracing::warn!(error = %e, size = batch.len(), "group commit failed; retrying its writes one by one");
            for job in batch {
                let result = if healthy {
                    let one = std::slice::from_ref(&job);
                    apply_lone_again_if_conflicted(&mut conn, one, timeout, &mut false).await.map_err(|e| {
                        if breaks_connection(&e) {
                            healthy = false;
                            tracing::error!(error = %e, "the connection broke while retrying a group commit's writes one by one");
                            // Its outcome is unknown, whatever the error's class.
                            return StoreError::Unavailable(e.to_string());
                        }
                        StoreError::from(e)
                    })
                } else {
                    Err(StoreError::Unavailable("the connection to PostgreSQL broke while retrying the batch".into()))
                };
                let _ = job.reply.send(result.map(|mut r| r.remove(0)));
            }
        }
        // A lone op's own error (the database refused it, on a connection still usable); or the batch may
        // not have reached the server, or its outcome is unknown (the connection broke, also by a FATAL or
        // PANIC error, which can follow a commit whatever its class): nothing is retried, and the writes
        // fail with `unavailable`, which tells their callers that they may have been applied.
        Err(e) => {
            let size = batch.len();
            healthy = !breaks_connection(&e);
            let lone = healthy && matches!(e, sqlx::Error::Database(_));
            if !healthy {
                tracing::error!(error = %e, size, "group commit failed; its writes failed with unavailable");
            }
            let text = e.to_string();
            let mut error = Some(if lone { StoreError::from(e) } else { StoreError::Unavailable(text.clone()) });
            for (i, job) in batch.into_iter().enumerate() {
                let error = if i + 1 == size { error.take().unwrap() } else { copy_error(&error, &text) };
                let _ = job.reply.send(Err(error));
            }
        }
    }
    if healthy {
        Some((conn, acquired))
    } else {
        conn.close_on_drop();
        None
    }
}

/// `batch` applied ([`apply_batch`], [`bounded`]); a batch of one write that PostgreSQL rolled back as a
/// deadlock's victim or a serialization failure ([`rolled_back_by_conflict`]) runs once more: it did not
/// commit, and what it met (another node's transaction: two owners creating one chat id, `keys rotate`)
/// has usually ended by then. A larger batch that fails so is retried op by op (see [`run_batch`]), each
/// op through here; before, a lone write failed with `unavailable` where the same write in a larger
/// batch was retried.
async fn apply_lone_again_if_conflicted(
    conn: &mut PgConnection,
    batch: &[Job],
    timeout: std::time::Duration,
    answered: &mut bool,
) -> Result<Vec<WriteResult>, sqlx::Error> {
    match bounded(timeout, apply_batch(conn, batch, answered)).await {
        Err(e) if batch.len() == 1 && rolled_back_by_conflict(&e) => {
            tracing::warn!(error = %e, "a write was rolled back by a conflict with another transaction; running it again");
            bounded(timeout, apply_batch(conn, batch, answered)).await
        }
        other => other,
    }
}

/// Whether PostgreSQL rolled the statement (and its implicit transaction) back as a deadlock's victim
/// (40P01) or a serialization failure (40001): nothing of it committed.
fn rolled_back_by_conflict(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|db| db.code()).is_some_and(|code| code == "40P01" || code == "40001")
}

/// Whether PostgreSQL cancelled the statement (57014: `statement_timeout`, or an operator's
/// `pg_cancel_backend`); the transaction was rolled back and the connection stays usable.
fn is_cancelled(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|db| db.code()).is_some_and(|code| code == "57014")
}

/// `work`, or an I/O error (the connection is in doubt: it is closed, and the writes fail with
/// `unavailable`, their outcome unknown) once it has taken `timeout`. PostgreSQL itself cancels a
/// statement at the server's `statement_timeout` (a lock another session holds; the writes then fail,
/// not applied); this is for a batch with no answer at all past that (a host that vanished
/// mid-statement: no reply, no reset), which would hold the writer, and every later write of the node,
/// for as long.
async fn bounded<T>(
    timeout: std::time::Duration,
    work: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| {
        tracing::error!(
            timeout_ms = timeout.as_millis() as u64,
            "no answer from PostgreSQL to a batch of writes in time; its connection is dropped"
        );
        Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "the batch timed out in PostgreSQL")))
    })
}

/// Whether `e` leaves the connection unusable or in doubt: anything but the database's own error, and
/// of those a FATAL or PANIC one (the session ends: a shutdown, a terminated backend, an idle timeout),
/// a connection exception (class 08), or a transaction left aborted (25P02). A cancelled statement
/// (57014, a statement timeout) leaves the session as it was.
fn breaks_connection(e: &sqlx::Error) -> bool {
    use sqlx::postgres::{PgDatabaseError, PgSeverity};
    let Some(db) = e.as_database_error() else { return true };
    let fatal = db
        .try_downcast_ref::<PgDatabaseError>()
        .is_some_and(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic));
    // 25006: a read-only server (a primary demoted by a failover): this connection will never write again,
    // a new one may reach the new primary.
    fatal || db.code().is_some_and(|c| c.starts_with("08") || c == "25P02" || c == "25006")
}

/// Whether a batch that failed with `e`, PostgreSQL having `answered` nothing of its statement before
/// (no result row, no completion), did not run: `e` is PostgreSQL's own end of the session (57P01: a
/// shutdown or restart, or the backend terminated; 57P02: a crash of another backend; 57P03: starting
/// up; 57P05: an idle timeout). The statement's rows and its completion are sent before its implicit
/// transaction commits (at the protocol's Sync), and an error after them would follow them in the
/// stream, so such a batch did not commit. This holds for errors PostgreSQL sends; a proxy in between
/// that made up such an error after a commit would break it (PgBouncer's own errors are other codes).
/// An I/O error (a crash, a socket closed) may follow a commit, and is never taken for this.
fn session_ended_before(e: &sqlx::Error, answered: bool) -> bool {
    !answered
        && e.as_database_error()
            .and_then(|db| db.code())
            .is_some_and(|code| matches!(&*code, "57P01" | "57P02" | "57P03" | "57P05"))
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

/// The arrays `chatsync_write_batch` takes: element i of each describes op i (see the migration).
#[derive(Default)]
struct BatchArgs<'a> {
    kinds: Vec<&'static str>,
    owners: Vec<&'a str>,
    chat_ids: Vec<Option<&'a str>>,
    payloads: Vec<Option<&'a [u8]>>,
    create_keys: Vec<Option<&'a [u8]>>,
    kek_ids: Vec<Option<&'a str>>,
    max_chats: Vec<Option<i64>>,
    conds: Vec<Option<i64>>,
    nows: Vec<Option<i64>>,
    message_ids: Vec<Option<&'a str>>,
    client_timestamps: Vec<Option<&'a str>>,
    senders: Vec<Option<&'a str>>,
    created_ats: Vec<Option<i64>>,
    /// Webhook events of the batch (outbox rows), by the `r_idx` of the op that records each.
    event_idx: Vec<i32>,
    event_ids: Vec<&'a str>,
    event_users: Vec<&'a str>,
    event_kinds: Vec<&'a str>,
    event_bodies: Vec<&'a [u8]>,
    event_times: Vec<i64>,
}

impl<'a> BatchArgs<'a> {
    fn push(&mut self, op: &'a WriteOp) {
        let (kind, owner, chat_id, payload, target, cond, now): (_, &str, _, _, Option<&Target>, _, _) = match op {
            WriteOp::Title { owner, chat_id, title, target, if_version_at_most, now } => {
                ("title", owner, Some(chat_id), Some(&title[..]), Some(target), *if_version_at_most, Some(*now))
            }
            WriteOp::Draft { owner, chat_id, draft, target, if_version_at_most, now } => {
                ("draft", owner, Some(chat_id), draft.as_deref(), Some(target), *if_version_at_most, Some(*now))
            }
            // Creating a chat for a draft deletion stamps it with time 0, as the SQLite writer does.
            WriteOp::DeleteDraft { owner, chat_id, target, if_version_at_most } => {
                ("delete_draft", owner, Some(chat_id), None, Some(target), *if_version_at_most, Some(0))
            }
            WriteOp::Message { owner, chat_id, content, target, now, .. } => {
                ("message", owner, Some(chat_id), Some(&content[..]), Some(target), None, Some(*now))
            }
            // The target seq travels in `conds` (see the migration).
            WriteOp::MarkRead { owner, chat_id, seq } => {
                ("mark_read", owner, Some(chat_id), None, None, Some(i64::try_from(*seq).unwrap_or(i64::MAX)), None)
            }
            WriteOp::DeleteChat { owner, chat_id, now, .. } => {
                ("delete_chat", owner, Some(chat_id), None, None, None, Some(*now))
            }
            WriteOp::UserKey { user_id, candidate } => {
                ("user_key", user_id, None, Some(&candidate.wrapped[..]), None, None, None)
            }
        };
        let (create_key, kek_id, max_chats) = match (target, op) {
            (Some(Target::Create { key, max_chats }), _) => {
                (Some(&key.wrapped[..]), Some(key.kek_id.as_str()), Some(i64::from(*max_chats)))
            }
            (_, WriteOp::UserKey { candidate, .. }) => (None, Some(candidate.kek_id.as_str()), None),
            _ => (None, None, None),
        };
        let (message_id, client_timestamp, sender, created_at) = match op {
            WriteOp::Message { message_id, client_timestamp, sender, created_at, .. } => {
                (Some(message_id.as_str()), client_timestamp.as_deref(), Some(sender.as_str()), Some(*created_at))
            }
            _ => (None, None, None, None),
        };
        self.kinds.push(kind);
        self.owners.push(owner);
        self.chat_ids.push(chat_id.map(String::as_str));
        self.payloads.push(payload);
        self.create_keys.push(create_key);
        self.kek_ids.push(kek_id);
        self.max_chats.push(max_chats);
        self.conds.push(cond);
        self.nows.push(now);
        self.message_ids.push(message_id);
        self.client_timestamps.push(client_timestamp);
        self.senders.push(sender);
        self.created_ats.push(created_at);
        let event = match op {
            WriteOp::Message { event, .. } | WriteOp::DeleteChat { event, .. } => event.as_ref(),
            _ => None,
        };
        if let Some(event) = event {
            // `r_idx` of the op (the function numbers ops from 1).
            self.event_idx.push(self.kinds.len() as i32);
            self.event_ids.push(&event.event_id);
            self.event_users.push(owner);
            self.event_kinds.push(&event.kind);
            self.event_bodies.push(&event.body);
            self.event_times.push(event.created_at_ms);
        }
    }
}

/// The call of the batch function; its arguments `$1`…`$BATCH_ARGS` are bound first in `apply_batch`.
const BATCH_CALL: &str = "chatsync_write_batch_locked($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";
/// How many parameters [`BATCH_CALL`] takes (the webhook events' parameters come after them).
const BATCH_ARGS: usize = 13;

/// One batch, in one statement.
static BATCH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT * FROM {BATCH_CALL} ORDER BY r_idx"));

/// One batch that records webhook events (migration `0007_webhooks.sql`), still in one statement, so
/// in the write's own transaction: a data-modifying CTE inserts the outbox row of every op whose outcome
/// is a stored message (with its `seq`) or a deleted chat. Ops refused, raced or duplicate record none.
/// Rows are inserted in op order, so a user's events get ascending ids in the order of the writes; the
/// trigger of migration `0011_webhook_heads.sql` keeps each user's head in the same statement.
static BATCH_WITH_EVENTS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let p: Vec<String> = (BATCH_ARGS + 1..=BATCH_ARGS + 6).map(|i| format!("${i}")).collect();
    format!(
        "WITH r AS MATERIALIZED (SELECT * FROM {BATCH_CALL}), \
         ev AS ( \
           INSERT INTO webhook_events (event_id, user_id, kind, seq, body, created_at, next_attempt_at) \
           SELECT e.event_id, e.user_id, e.kind, CASE WHEN r.r_outcome = 'message' THEN r.r_seq END, e.body, \
                  e.created_at, e.created_at \
           FROM r JOIN unnest({}::int[], {}::text[], {}::text[], {}::text[], {}::bytea[], {}::bigint[]) \
                AS e(idx, event_id, user_id, kind, body, created_at) ON e.idx = r.r_idx \
           WHERE r.r_outcome IN ('message', 'deleted') ORDER BY r.r_idx) \
         SELECT * FROM r ORDER BY r_idx",
        p[0], p[1], p[2], p[3], p[4], p[5]
    )
});

/// Applies `batch` in one statement (its own transaction: one round trip, one commit).
async fn apply_batch(
    conn: &mut PgConnection,
    batch: &[Job],
    answered: &mut bool,
) -> Result<Vec<WriteResult>, sqlx::Error> {
    apply_ops(conn, batch.iter().map(|job| &job.op), answered).await
}

/// Applies `ops` in one statement on `executor`. `answered` tells, when it fails, whether anything of
/// the statement's results (a row, its completion) had arrived before the error.
async fn apply_ops<'a, 'c>(
    executor: impl sqlx::PgExecutor<'c>,
    ops: impl Iterator<Item = &'a WriteOp>,
    answered: &mut bool,
) -> Result<Vec<WriteResult>, sqlx::Error> {
    let mut args = BatchArgs::default();
    for op in ops {
        args.push(op);
    }
    let count = args.kinds.len();
    let sql: &str = if args.event_idx.is_empty() { &BATCH } else { &BATCH_WITH_EVENTS };
    let mut query = sqlx::query(sql)
        .bind(&args.kinds)
        .bind(&args.owners)
        .bind(&args.chat_ids)
        .bind(&args.payloads)
        .bind(&args.create_keys)
        .bind(&args.kek_ids)
        .bind(&args.max_chats)
        .bind(&args.conds)
        .bind(&args.nows)
        .bind(&args.message_ids)
        .bind(&args.client_timestamps)
        .bind(&args.senders)
        .bind(&args.created_ats);
    if !args.event_idx.is_empty() {
        query = query
            .bind(&args.event_idx)
            .bind(&args.event_ids)
            .bind(&args.event_users)
            .bind(&args.event_kinds)
            .bind(&args.event_bodies)
            .bind(&args.event_times);
    }
    let mut rows = Vec::with_capacity(count);
    let mut stream = sqlx::Executor::fetch_many(executor, query);
    loop {
        match stream.try_next().await {
            Ok(Some(result)) => {
                *answered = true;
                if let sqlx::Either::Right(row) = result {
                    rows.push(row);
                }
            }
            Ok(None) => break,
            Err(e) => return Err(e),
        }
    }
    if rows.len() != count {
        return Err(sqlx::Error::Protocol(format!("{} results for {count} writes", rows.len())));
    }
    rows.iter().map(write_result).collect()
}

/// The start of the user and chat id of [`warm_up`]'s writes, followed by the session's backend pid (so
/// that the warm-ups of several connections never wait for each other): no client can name a user or a
/// chat so (a space).
const WARM_UP_ID: &str = "chatsync warm-up";
/// How long a round of [`warm_up`] waits for a lock before it gives up (and the warm-up with it).
const WARM_UP_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);
/// How long a statement of [`warm_up`] may run.
const WARM_UP_STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long [`warm_up`] may take in all, as the pool's `after_connect` runs it (it counts against the
/// acquire timeout of the request that opens the connection).
pub(super) const WARM_UP_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Rounds of [`warm_up`]: PostgreSQL plans a PL/pgSQL statement for its parameters on each of its first
/// five executions in a session before it settles on a generic plan.
const WARM_UP_ROUNDS: usize = 6;

/// Prepares a new connection for the writer's batches, so that the first writes it carries do not pay
/// for it: PostgreSQL compiles the PL/pgSQL batch functions and plans each of their statements per
/// session, when first executed (and for its parameters on the first five executions). Measured
/// with `pgbench`: a draft write's first batch on a new connection took ~5 ms, later ones 0.3 ms; in the
/// three-node benchmark, each node's twelve connections paid it in turn during the first seconds, whose
/// batches took 4-21 ms.
///
/// Each round runs, in a transaction that is rolled back, one batch of every kind of write and outcome
/// on a user and a chat of its own ([`WARM_UP_ID`] and the backend pid), and checks the outcomes: nothing
/// is stored. It never waits long for another session: each round gives up on a lock after
/// [`WARM_UP_LOCK_TIMEOUT`] (a `keys rotate` holding the tables, an owner lock of the batch function on
/// a colliding hash) and on a statement after [`WARM_UP_STATEMENT_TIMEOUT`], and takes the tables in the
/// order a rotation does (`chats`, then `user_keys`). The batch that records webhook events is left to
/// its first use.
pub async fn warm_up(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await?;
    let id = format!("{WARM_UP_ID} {pid}");
    let key = WrappedKey { wrapped: vec![0; 40], kek_id: "warm-up".into() };
    let create = Target::Create { key: key.clone(), max_chats: 1 };
    let message = || WriteOp::Message {
        owner: id.clone(),
        chat_id: id.clone(),
        message_id: id.clone(),
        content: vec![0; 16],
        client_timestamp: None,
        sender: super::chats::USER_SENDER.into(),
        created_at: 1,
        now: 1,
        target: Target::Existing,
        event: None,
    };
    let draft = |target: Target, if_version_at_most: Option<i64>| WriteOp::Draft {
        owner: id.clone(),
        chat_id: id.clone(),
        draft: Some(vec![0; 16]),
        target,
        if_version_at_most,
        now: 1,
    };
    let delete_draft = || WriteOp::DeleteDraft {
        owner: id.clone(),
        chat_id: id.clone(),
        target: Target::Existing,
        if_version_at_most: None,
    };
    // Each op, and the outcome it must have (the batch function's every branch, but the webhook one).
    let ops = [
        (draft(create.clone(), None), "applied (created)"),
        (draft(Target::Existing, Some(0)), "conflict"),
        (
            WriteOp::Title {
                owner: id.clone(),
                chat_id: id.clone(),
                title: vec![0; 16],
                target: Target::Existing,
                if_version_at_most: None,
                now: 1,
            },
            "applied",
        ),
        (message(), "message"),
        (message(), "duplicate"),
        (WriteOp::MarkRead { owner: id.clone(), chat_id: id.clone(), seq: 1 }, "applied"),
        (WriteOp::MarkRead { owner: id.clone(), chat_id: id.clone(), seq: 1 }, "unchanged"),
        (delete_draft(), "applied"),
        (delete_draft(), "no_draft"),
        (WriteOp::DeleteChat { owner: id.clone(), chat_id: id.clone(), now: 1, event: None }, "deleted"),
        (draft(create, None), "not_found"),
        (WriteOp::UserKey { user_id: id.clone(), candidate: key.clone() }, "user_key"),
    ];
    for _ in 0..WARM_UP_ROUNDS {
        let mut tx = conn.begin().await?;
        // SET LOCAL, for this transaction only.
        sqlx::query("SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)")
            .bind(format!("{}ms", WARM_UP_LOCK_TIMEOUT.as_millis()))
            .bind(format!("{}ms", WARM_UP_STATEMENT_TIMEOUT.as_millis()))
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO users (user_id, created_at) VALUES ($1, 0) ON CONFLICT DO NOTHING")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        let results = apply_ops(&mut *tx, ops.iter().map(|(op, _)| op), &mut false).await?;
        tx.rollback().await?;
        let outcomes: Vec<&str> = results.iter().map(outcome_name).collect();
        let expected: Vec<&str> = ops.iter().map(|(_, outcome)| *outcome).collect();
        if outcomes != expected {
            return Err(sqlx::Error::Protocol(format!("warm-up outcomes {outcomes:?}, expected {expected:?}")));
        }
    }
    Ok(())
}

/// The name of `result`'s outcome, for [`warm_up`]'s check.
fn outcome_name(result: &WriteResult) -> &'static str {
    match result {
        WriteResult::Applied(chat) if chat.draft_v == 1 && chat.title_v == 0 && chat.messages_v == 0 => {
            "applied (created)"
        }
        WriteResult::Applied(_) => "applied",
        WriteResult::Message { duplicate: false, .. } => "message",
        WriteResult::Message { duplicate: true, .. } => "duplicate",
        WriteResult::NotFound => "not_found",
        WriteResult::Raced => "raced",
        WriteResult::Conflict(_) => "conflict",
        WriteResult::NoDraft(_) => "no_draft",
        WriteResult::Deleted => "deleted",
        WriteResult::Unchanged(_) => "unchanged",
        WriteResult::ChatLimit => "chat_limit",
        WriteResult::UserKey(_) => "user_key",
    }
}

/// One row of `chatsync_write_batch`: `r_idx`, `r_outcome`, the chat's columns (from index 2, in
/// [`CHAT_COLS`] order) and the message's (from index 12), then `r_read_seq` (17) and `r_sender` (18).
fn write_result(r: &PgRow) -> Result<WriteResult, sqlx::Error> {
    let outcome: String = r.try_get(1)?;
    let chat = || -> Result<ChatRecord, sqlx::Error> {
        Ok(ChatRecord {
            chat_id: r.try_get(2)?,
            title: r.try_get(3)?,
            draft: r.try_get(4)?,
            title_v: r.try_get::<i64, _>(5)? as u64,
            messages_v: r.try_get::<i64, _>(6)? as u64,
            draft_v: r.try_get::<i64, _>(7)? as u64,
            last_edited_ms: r.try_get(8)?,
            unread_count: r.try_get::<i64, _>(9)? as u64,
            key: WrappedKey { wrapped: r.try_get(10)?, kek_id: r.try_get(11)? },
            read_seq: r.try_get::<i64, _>(17)? as u64,
        })
    };
    let message = || -> Result<MessageRecord, sqlx::Error> {
        Ok(MessageRecord {
            seq: r.try_get::<i64, _>(12)? as u64,
            message_id: r.try_get(13)?,
            content: r.try_get(14)?,
            client_timestamp: r.try_get(15)?,
            created_at_ms: r.try_get(16)?,
            sender: r.try_get(18)?,
        })
    };
    Ok(match outcome.as_str() {
        "applied" => WriteResult::Applied(chat()?),
        "conflict" => WriteResult::Conflict(chat()?),
        "no_draft" => WriteResult::NoDraft(chat()?),
        "message" => WriteResult::Message { chat: chat()?, message: message()?, duplicate: false },
        "duplicate" => WriteResult::Message { chat: chat()?, message: message()?, duplicate: true },
        "not_found" => WriteResult::NotFound,
        "raced" => WriteResult::Raced,
        "chat_limit" => WriteResult::ChatLimit,
        "deleted" => WriteResult::Deleted,
        "unchanged" => WriteResult::Unchanged(chat()?),
        "user_key" => WriteResult::UserKey(WrappedKey { wrapped: r.try_get(10)?, kek_id: r.try_get(11)? }),
        other => return Err(sqlx::Error::Protocol(format!("unknown write outcome {other:?}"))),
    })
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
        read_seq: r.get::<i64, _>(10) as u64,
    }
}

fn message_record(r: &PgRow) -> MessageRecord {
    MessageRecord {
        seq: r.get::<i64, _>(0) as u64,
        message_id: r.get(1),
        content: r.get(2),
        client_timestamp: r.get(3),
        created_at_ms: r.get(4),
        sender: r.get(5),
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

#[async_trait]
impl ChatStore for PgStore {
    async fn write(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        self.writer.submit(op).await
    }

    async fn chat_lookup(&self, chat_id: &str) -> Result<ChatLookup, StoreError> {
        // One round trip: the chat, or else whether a tombstone holds the id (a first write to a new
        // chat looks up an absent id, and at a cold start every chat is new).
        let row = sqlx::query(
            "SELECT owner, chat_key, kek_id FROM chats WHERE chat_id = $1 \
             UNION ALL SELECT NULL, NULL, NULL FROM chat_tombstones WHERE chat_id = $1 LIMIT 1",
        )
        .bind(chat_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => ChatLookup::Absent,
            Some(r) => match r.get::<Option<String>, _>(0) {
                Some(owner) => ChatLookup::Exists { owner, key: WrappedKey { wrapped: r.get(1), kek_id: r.get(2) } },
                None => ChatLookup::Deleted,
            },
        })
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
            "SELECT {CHAT_COLS} FROM chats WHERE owner = $1 ORDER BY last_edited_ms DESC, chat_id COLLATE \"C\""
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
        let mut conn = TxConn::acquire(&self.pool).await?;
        let mut tx = conn.begin(Some(BEGIN_READ)).await?;
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
        let mut conn = TxConn::acquire(&self.pool).await?;
        let mut tx = conn.begin(Some(BEGIN_READ)).await?;
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

    async fn rewrap_keys(
        &self,
        keys: &[(String, WrappedKey)],
        from_check: &[u8],
        kek_id: &str,
        check: &[u8],
    ) -> Result<(), StoreError> {
        let mut conn = TxConn::acquire(&self.pool).await?;
        let mut tx = conn.begin(None).await?;
        // The check value's row first: a `create_user_keys` holding it (FOR SHARE) commits before this
        // goes on (and its keys are then counted below); one that comes later sees the new value.
        let stored: Option<Vec<u8>> = sqlx::query_scalar("SELECT value FROM meta WHERE name = 'kek_check' FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?;
        if stored.is_some_and(|stored| stored != from_check) {
            return Err(StoreError::Backend(super::chats::ROTATED_MEANWHILE.to_owned()));
        }
        // Then the key tables, against writers (servers' batches, which never take the row above): those
        // writing now commit first, and are counted below; later ones wait for this transaction.
        sqlx::query("LOCK TABLE chats, user_keys IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
        for (key_ref, key) in keys {
            let (sql, id) = match key_ref.split_once(':') {
                Some(("chat", id)) => ("UPDATE chats SET chat_key = $2, kek_id = $3 WHERE chat_id = $1", id),
                Some(("user", id)) => ("UPDATE user_keys SET wrapped = $2, kek_id = $3 WHERE user_id = $1", id),
                _ => return Err(StoreError::Backend(format!("unknown key slot {key_ref}"))),
            };
            sqlx::query(sql).bind(id).bind(&key.wrapped).bind(&key.kek_id).execute(&mut *tx).await?;
        }
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM chats WHERE kek_id <> $1) + (SELECT count(*) FROM user_keys WHERE kek_id <> $1)",
        )
        .bind(kek_id)
        .fetch_one(&mut *tx)
        .await?;
        if left > 0 {
            return Err(StoreError::Backend(super::chats::stored_during_rotation(left)));
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

    async fn create_user_keys(&self, keys: &[(String, WrappedKey)], check: &[u8]) -> Result<bool, StoreError> {
        let mut conn = TxConn::acquire(&self.pool).await?;
        let mut tx = conn.begin(None).await?;
        // FOR SHARE: a rotation (FOR UPDATE on this row) waits for this transaction; if one committed
        // first, the row read here is its new value (READ COMMITTED re-reads a row it waited for).
        let stored: Option<Vec<u8>> = sqlx::query_scalar("SELECT value FROM meta WHERE name = 'kek_check' FOR SHARE")
            .fetch_optional(&mut *tx)
            .await?;
        if stored.as_deref() != Some(check) {
            return Ok(false);
        }
        let users: Vec<&str> = keys.iter().map(|(user, _)| user.as_str()).collect();
        let wrapped: Vec<&[u8]> = keys.iter().map(|(_, key)| &key.wrapped[..]).collect();
        let kek_ids: Vec<&str> = keys.iter().map(|(_, key)| key.kek_id.as_str()).collect();
        sqlx::query(
            "INSERT INTO user_keys (user_id, wrapped, kek_id) \
             SELECT * FROM UNNEST($1::TEXT[], $2::BYTEA[], $3::TEXT[]) ON CONFLICT DO NOTHING",
        )
        .bind(&users)
        .bind(&wrapped)
        .bind(&kek_ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
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

    fn set_write_timeout(&self, timeout: std::time::Duration) {
        self.writer.set_timeout(timeout);
    }

    fn set_commit_window(&self, window: std::time::Duration) {
        self.writer.set_window(window);
    }

    fn batches_begun(&self) -> Option<u64> {
        Some(self.writer.batches())
    }
}
