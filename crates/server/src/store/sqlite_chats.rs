//! [`ChatStore`] for SQLite: reads on the sqlx pool; writes through one writer thread that batches
//! concurrent writes into shared `BEGIN IMMEDIATE … COMMIT` transactions (group commit).
//!
//! SQLite has one writer at a time; funnelling every chat write through a single connection removes
//! lock contention, and batching amortizes the commit (one fsync per batch). The writer owns a plain
//! `rusqlite` connection on its own thread, so a batch costs one hand-off between threads, not one per
//! statement. A batch whose transaction fails is retried op by op, each in its own transaction, so one
//! bad op cannot fail its neighbours.
//!
//! The writer is supervised: if it panics, or its connection breaks (I/O error, corruption, the file
//! gone), the writes of the batch in flight fail with [`StoreError::Unavailable`], the death is logged
//! at error level, and the writer reopens its connection and carries on with the queue. More than
//! [`MAX_RESTARTS`] deaths within [`RESTART_WINDOW`] and it gives up: every write fails with
//! `Unavailable` and [`ChatStore::failed`] resolves, which stops the server (non-zero exit). A full
//! disk is not a death: those writes fail with `Unavailable` and later ones succeed once space returns.

use super::chats::{
    ChatLookup, ChatRecord, ChatStore, MessageRecord, NewEvent, Target, WrappedKey, WriteOp, WriteResult,
};
use super::sqlite::SqliteStore;
use super::StoreError;
use async_trait::async_trait;
use rusqlite::{params, OpenFlags, OptionalExtension, TransactionBehavior};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// How often the WAL is checkpointed into the database (off the write path).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Most writes in one group-commit transaction.
const MAX_BATCH: usize = 512;
/// Queued writes before `write` waits (backpressure).
const QUEUE: usize = 8192;
/// Writer deaths tolerated within [`RESTART_WINDOW`]; one more and the writer gives up.
const MAX_RESTARTS: usize = 5;
/// The window over which writer deaths are counted.
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// Pause before the first restart; doubled for each further death in the window.
const RESTART_PAUSE: Duration = Duration::from_millis(100);

const CHAT_COLS: &str =
    "chat_id, title, draft, title_v, messages_v, draft_v, last_edited_ms, unread_count, chat_key, kek_id, read_seq";
/// The columns [`message_row`] and [`message_record`] read, in order.
const MESSAGE_COLS: &str = "seq, message_id, content, client_timestamp, created_at, sender";

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteResult, StoreError>>,
}

/// The sending half of the writer thread's queue, and the writer's fate.
pub(super) struct Writer {
    tx: parking_lot::Mutex<Option<mpsc::Sender<Job>>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    faults: Arc<WriterFaults>,
    /// Becomes `Some(reason)` when the writer gives up.
    gave_up: watch::Receiver<Option<String>>,
    /// The commit window, µs (see [`Supervisor::serve`]).
    window_us: Arc<AtomicU64>,
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

/// Why a write failed: the error for its caller, and whether the writer's connection is broken (the
/// supervisor then fails the batch in flight with `Unavailable` and reopens the connection).
struct WriteError {
    error: StoreError,
    broken: bool,
    /// Another connection held the database past the busy timeout: retrying the batch's writes one by
    /// one would wait that long for each.
    busy: bool,
}

impl From<rusqlite::Error> for WriteError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        let broken = matches!(
            e.sqlite_error_code(),
            Some(SystemIoFailure | DatabaseCorrupt | NotADatabase | CannotOpen | ReadOnly)
        );
        let busy = matches!(e.sqlite_error_code(), Some(DatabaseBusy | DatabaseLocked));
        WriteError { error: e.into(), broken, busy }
    }
}

impl From<StoreError> for WriteError {
    fn from(error: StoreError) -> Self {
        WriteError { error, broken: false, busy: false }
    }
}

/// Fault injection into the writer, for tests (reached through [`ChatStore::writer_faults`]). Each knob
/// is inert until a test sets it; none is reachable from the network or the command line.
#[doc(hidden)]
#[derive(Default)]
pub struct WriterFaults {
    /// The next this-many batches panic after applying their ops, before their commit.
    panics: AtomicU32,
    /// The next this-many batches fail as on a broken connection (an I/O error), before their commit.
    breaks: AtomicU32,
    /// The next this-many batches commit, and then their writes fail with `unavailable`, as a lost answer
    /// would (their outcome unknown to the caller).
    lost_answers: AtomicU32,
    /// Ops on this chat id fail with a backend error.
    failing_chat: parking_lot::Mutex<Option<String>>,
    /// `PRAGMA max_page_count` for the writer's connection (`None`: SQLite's maximum), and whether the
    /// current connection has it.
    page_limit: parking_lot::Mutex<(Option<u64>, bool)>,
    /// While set, the writer waits before collecting its next batch.
    held: parking_lot::Mutex<bool>,
    released: parking_lot::Condvar,
    /// The writer holds a job while held.
    holding: AtomicBool,
    /// Connections the writer reopened after a death.
    restarts: AtomicU32,
    /// WAL frames past which the WAL should start over (0: [`WAL_RESET_FRAMES`]).
    wal_reset_frames: AtomicI64,
    /// Times the checkpoint thread found that the WAL had started over since its previous pass.
    wal_resets: AtomicU32,
    /// Batches the writer began (counted when it takes a batch's first write, before the commit window).
    batches: AtomicU64,
    queue: OnceLock<mpsc::WeakSender<Job>>,
}

impl WriterFaults {
    /// Lets the WAL start over past `frames` frames instead of [`WAL_RESET_FRAMES`].
    pub fn reset_wal_past(&self, frames: i64) {
        self.wal_reset_frames.store(frames, Ordering::SeqCst);
    }

    /// Times the checkpoint thread has found the WAL started over since its previous pass.
    pub fn wal_resets(&self) -> u32 {
        self.wal_resets.load(Ordering::SeqCst)
    }

    fn wal_reset_frames(&self) -> i64 {
        match self.wal_reset_frames.load(Ordering::SeqCst) {
            0 => WAL_RESET_FRAMES,
            n => n,
        }
    }

    /// The next `n` batches panic inside their transaction, before it commits.
    pub fn panic_next(&self, n: u32) {
        self.panics.store(n, Ordering::SeqCst);
    }

    /// The next `n` batches fail inside their transaction as if the connection broke (an I/O error).
    pub fn break_next(&self, n: u32) {
        self.breaks.store(n, Ordering::SeqCst);
    }

    /// The next `n` batches commit, and then answer their writes with `unavailable` (as a connection that
    /// broke after the commit would, on a server store).
    pub fn lose_answer_next(&self, n: u32) {
        self.lost_answers.store(n, Ordering::SeqCst);
    }

    /// Whether this committed batch's answer is to be lost.
    fn answer_lost(&self) -> bool {
        self.lost_answers.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    /// Every op on `chat_id` fails with a backend error (`None`: none does).
    pub fn fail_chat(&self, chat_id: Option<&str>) {
        *self.failing_chat.lock() = chat_id.map(str::to_owned);
    }

    /// Caps the database file at `pages` pages, as a full disk would (`Some(0)`: at its current size;
    /// `None`: lifts the cap). Takes effect from the next batch.
    pub fn limit_pages(&self, pages: Option<u64>) {
        *self.page_limit.lock() = (pages, false);
    }

    /// Makes the writer wait before its next batch, until [`WriterFaults::release`]: writes queue up and
    /// then go into one batch.
    pub fn hold(&self) {
        *self.held.lock() = true;
    }

    /// Lets a held writer go on.
    pub fn release(&self) {
        *self.held.lock() = false;
        self.released.notify_all();
    }

    /// Writes waiting for the writer (queued, or in its hands while it is held).
    pub fn queued(&self) -> usize {
        let queued = self.queue.get().and_then(|q| q.upgrade()).map_or(0, |tx| tx.max_capacity() - tx.capacity());
        queued + usize::from(self.holding.load(Ordering::SeqCst))
    }

    /// How many times the writer restarted on a new connection.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// How many batches the writer has begun (taken the first write of).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }

    fn wait_while_held(&self) {
        let mut held = self.held.lock();
        if *held {
            self.holding.store(true, Ordering::SeqCst);
            while *held {
                self.released.wait(&mut held);
            }
            self.holding.store(false, Ordering::SeqCst);
        }
    }

    /// Applies a changed page limit to `conn`.
    fn apply_page_limit(&self, conn: &rusqlite::Connection) -> rusqlite::Result<()> {
        let mut limit = self.page_limit.lock();
        if !limit.1 {
            // SQLite clamps the value between the current size and its own maximum.
            let pages = limit.0.map_or(u32::MAX as u64, |p| p.max(1));
            conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
            limit.1 = true;
        }
        Ok(())
    }

    fn fails(&self, op: &WriteOp) -> bool {
        let failing = self.failing_chat.lock();
        let Some(failing) = failing.as_deref() else { return false };
        match op {
            WriteOp::Title { chat_id, .. }
            | WriteOp::Draft { chat_id, .. }
            | WriteOp::DeleteDraft { chat_id, .. }
            | WriteOp::Message { chat_id, .. }
            | WriteOp::MarkRead { chat_id, .. }
            | WriteOp::DeleteChat { chat_id, .. } => chat_id == failing,
            WriteOp::UserKey { .. } => false,
        }
    }

    /// Panics or fails as a broken connection would, when asked to.
    fn before_commit(&self) -> Result<(), WriteError> {
        let take = |n: &AtomicU32| n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if take(&self.panics) {
            panic!("injected writer fault");
        }
        if take(&self.breaks) {
            return Err(WriteError {
                error: StoreError::Unavailable("injected I/O error".into()),
                broken: true,
                busy: false,
            });
        }
        Ok(())
    }
}

/// Opens a connection for the writer to the (existing, migrated) database at `path`.
fn open_writer(path: &Path, durability: super::Durability) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(path, OpenFlags::default() - OpenFlags::SQLITE_OPEN_CREATE)?;
    conn.busy_timeout(super::sqlite::BUSY_TIMEOUT)?;
    // Checkpoints run on their own thread (below), not inside a commit on the write path.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; \
         PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864; \
         PRAGMA secure_delete = ON;",
    )?;
    conn.execute_batch(match durability {
        super::Durability::Full => "PRAGMA synchronous = FULL;",
        super::Durability::Normal => "PRAGMA synchronous = NORMAL;",
    })?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl Writer {
    /// Opens the writer's connection to `path` (already migrated) and starts its thread.
    pub(super) fn start(path: &Path, durability: super::Durability) -> anyhow::Result<Writer> {
        let conn = open_writer(path, durability)?;
        let checkpointer = rusqlite::Connection::open(path)?;
        checkpointer.busy_timeout(super::sqlite::BUSY_TIMEOUT)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let faults = Arc::new(WriterFaults::default());
        let _ = faults.queue.set(tx.downgrade());
        let (gave_up_tx, gave_up) = watch::channel(None);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let reset_round = Arc::new(AtomicU64::new(0));
        let (wanted, knobs) = (reset_round.clone(), faults.clone());
        let checkpoints = std::thread::Builder::new()
            .name("chatsync-checkpoint".into())
            .spawn(move || checkpoint(checkpointer, stopped, wanted, &knobs))?;
        let window_us = Arc::new(AtomicU64::new(0));
        let supervisor = Supervisor {
            path: path.to_owned(),
            durability,
            faults: faults.clone(),
            gave_up: gave_up_tx,
            reset_round,
            window_us: window_us.clone(),
        };
        let thread = std::thread::Builder::new().name("chatsync-writer".into()).spawn(move || {
            supervisor.run(conn, rx);
            // The final checkpoint is part of closing: it must not run into whoever opens the database next.
            drop(stop);
            // `close` returns only once the final checkpoint is done and every connection of this
            // store is closed: a store opened next on the same file finds no lock still held.
            let _ = checkpoints.join();
        })?;
        Ok(Writer {
            tx: parking_lot::Mutex::new(Some(tx)),
            thread: parking_lot::Mutex::new(Some(thread)),
            faults,
            gave_up,
            window_us,
        })
    }

    async fn submit(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        let tx = self.tx.lock().clone().ok_or_else(|| StoreError::Unavailable("store closed".into()))?;
        let (reply, answer) = oneshot::channel();
        tx.send(Job { op, reply }).await.map_err(|_| StoreError::Unavailable("chat writer stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("chat writer stopped".into()))?
    }

    /// Resolves with the reason once the writer has given up (never, if it stops in order).
    async fn gave_up(&self) -> String {
        let mut gave_up = self.gave_up.clone();
        let reason = gave_up.wait_for(Option::is_some).await.ok().and_then(|reason| reason.clone());
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// Stops accepting writes, lets the queued ones finish, and waits for the writer (and the final
    /// checkpoint) to end.
    pub(super) async fn close(&self) {
        self.tx.lock().take();
        self.faults.release();
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The writer thread's body: runs the group-commit loop, and restarts it (on a new connection) when it
/// panics or its connection breaks.
struct Supervisor {
    path: PathBuf,
    durability: super::Durability,
    faults: Arc<WriterFaults>,
    gave_up: watch::Sender<Option<String>>,
    /// Raised by the checkpoint thread, once a pass, while the WAL should start over (see [`checkpoint`]).
    reset_round: Arc<AtomicU64>,
    /// The commit window, µs: see [`Supervisor::serve`].
    window_us: Arc<AtomicU64>,
}

impl Supervisor {
    /// Between two batches, when the checkpoint thread asks for it: checkpoints the last few frames so that
    /// the WAL is fully copied and the next write transaction starts it over (see [`checkpoint`]). One success
    /// per request (`done` holds the request answered); while another checkpoint runs or a reader holds
    /// frames back, tries again at most every [`WAL_RESET_RETRY`]. A reader that began just before can still
    /// keep the next transaction from starting the WAL over: the checkpoint thread then asks again.
    fn reset_wal(&self, conn: &rusqlite::Connection, done: &mut u64, last_try: &mut Option<Instant>) {
        let round = self.reset_round.load(Ordering::Acquire);
        if round == *done || last_try.is_some_and(|t| t.elapsed() < WAL_RESET_RETRY) {
            return;
        }
        *last_try = Some(Instant::now());
        match wal_checkpoint(conn, "PASSIVE") {
            Ok((0, frames, copied)) if frames == copied => *done = round,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "WAL checkpoint failed");
                *done = round;
            }
        }
    }

    fn run(&self, first: rusqlite::Connection, mut rx: mpsc::Receiver<Job>) {
        let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        let mut deaths: VecDeque<Instant> = VecDeque::new();
        let mut conn = Some(first);
        loop {
            let why = match conn.take() {
                None => match open_writer(&self.path, self.durability) {
                    Ok(reopened) => {
                        self.faults.page_limit.lock().1 = false;
                        self.faults.restarts.fetch_add(1, Ordering::SeqCst);
                        tracing::info!("chat writer restarted");
                        conn = Some(reopened);
                        continue;
                    }
                    Err(e) => format!("cannot reopen the database: {e}"),
                },
                Some(mut c) => {
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.serve(&mut c, &mut rx, &mut batch)
                    }));
                    match served {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => format!("its connection failed: {e}"),
                        Err(panic) => format!("it panicked: {}", crate::logging::panic_text(panic.as_ref())),
                    }
                    // `c` is dropped here: the connection closes, rolling back any open transaction.
                }
            };
            let in_flight = batch.len();
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(StoreError::Unavailable(format!("chat writer died: {why}"))));
            }
            let now = Instant::now();
            deaths.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
            deaths.push_back(now);
            if deaths.len() > MAX_RESTARTS {
                tracing::error!(
                    reason = %why,
                    in_flight,
                    deaths = deaths.len(),
                    window_secs = RESTART_WINDOW.as_secs(),
                    "chat writer died too often; giving up: every write fails with unavailable and the server stops"
                );
                let _ = self.gave_up.send(Some(why));
                return;
            }
            let pause = RESTART_PAUSE * (1 << (deaths.len() - 1));
            tracing::error!(
                reason = %why,
                in_flight,
                pause_ms = pause.as_millis() as u64,
                "chat writer died; its in-flight writes failed with unavailable; restarting it"
            );
            std::thread::sleep(pause);
        }
    }

    /// The group-commit loop. Returns `Ok` when the queue is closed and drained, or the error that broke
    /// the connection (the writes of `batch` left unanswered are the supervisor's to fail).
    fn serve(
        &self,
        conn: &mut rusqlite::Connection,
        rx: &mut mpsc::Receiver<Job>,
        batch: &mut Vec<Job>,
    ) -> Result<(), StoreError> {
        let faults = &*self.faults;
        let (mut reset_done, mut reset_tried) = (0, None);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            faults.batches.fetch_add(1, Ordering::SeqCst);
            faults.wait_while_held();
            // The commit window: a write that finds the writer idle waits a moment for others to share its
            // transaction (one commit, one fsync, and the writer sleeps through their arrival instead of
            // being woken for each). Under load a queue is already waiting and nothing sleeps.
            let window = self.window_us.load(Ordering::Relaxed);
            if window > 0 && rx.is_empty() {
                std::thread::sleep(Duration::from_micros(window));
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            faults.apply_page_limit(conn)?;
            metrics::histogram!(crate::metrics::WRITER_BATCH).record(batch.len() as f64);
            match apply_batch(conn, batch, faults) {
                Ok(results) => {
                    let lost = faults.answer_lost();
                    for (job, result) in batch.drain(..).zip(results) {
                        let result = match lost {
                            true => Err(StoreError::Unavailable("injected lost answer".into())),
                            false => Ok(result),
                        };
                        let _ = job.reply.send(result);
                    }
                    self.reset_wal(conn, &mut reset_done, &mut reset_tried);
                }
                Err(e) if e.broken => return Err(e.error),
                Err(e) if e.busy => {
                    tracing::error!(error = %e.error, size = batch.len(), "group commit failed: another connection holds the database; its writes failed with unavailable");
                    let text = e.error.to_string();
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(StoreError::Unavailable(text.clone())));
                    }
                }
                Err(e) => {
                    log_batch_failure(&e.error, batch.len());
                    batch.reverse();
                    while let Some(job) = batch.pop() {
                        match apply_batch(conn, std::slice::from_ref(&job), faults) {
                            Err(e) if e.broken => {
                                batch.push(job);
                                return Err(e.error);
                            }
                            result => {
                                let _ = job.reply.send(result.map(|mut r| r.remove(0)).map_err(|e| e.error));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn log_batch_failure(error: &StoreError, size: usize) {
    match error {
        StoreError::Unavailable(_) => tracing::error!(
            %error,
            size,
            "group commit failed (disk full?); retrying its writes one by one, failures get unavailable"
        ),
        _ => tracing::warn!(%error, size, "group commit failed; retrying its writes one by one"),
    }
}

/// WAL frames (pages) past which the WAL should start over from its beginning: 4,096 pages, 16 MiB at 4 KiB.
const WAL_RESET_FRAMES: i64 = 4_096;
/// WAL frames past which the checkpoint thread stops waiting for the writer to reset the WAL and forces it
/// (TRUNCATE, which holds writers until the readers in the WAL are done): 65,536 pages, 256 MiB at 4 KiB.
const WAL_FORCE_RESET_FRAMES: i64 = 65_536;
/// How long a forced reset waits for readers before giving up until the next pass (writers wait as long).
const WAL_FORCE_RESET_WAIT: Duration = Duration::from_millis(100);
/// Least time between two attempts of the writer to let the WAL start over (each may sync the files).
const WAL_RESET_RETRY: Duration = Duration::from_millis(50);

/// Runs `PRAGMA wal_checkpoint(MODE)` and returns its row: (busy, frames in the WAL, frames checkpointed).
fn wal_checkpoint(conn: &rusqlite::Connection, mode: &str) -> rusqlite::Result<(i64, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
}

/// Copies the WAL back into the database every [`CHECKPOINT_EVERY`], concurrently with the writer (PASSIVE never
/// blocks it), asks the writer to let the WAL start over once it passes [`WAL_RESET_FRAMES`], and checkpoints
/// once more with TRUNCATE when the writer has stopped.
///
/// Why the writer resets the WAL, and not this thread: SQLite starts the WAL over from its beginning when a
/// write transaction begins on a WAL that is fully checkpointed and that no reader is still reading. Under
/// constant writes this thread never sees that state (the writer appends while it copies), so the WAL grew
/// without bound (a 10-minute soak: gigabytes). Forcing it (TRUNCATE or RESTART) blocks every writer while
/// SQLite's busy handler sleeps, in steps of up to 100 ms, for the readers: that was a 50-60 ms stall of every
/// write every 5 s (`fanout`'s p99). The writer instead runs a PASSIVE checkpoint itself between two batches
/// ([`Supervisor::reset_wal`]): this thread has just copied almost everything, so it copies a batch or two,
/// and no write can arrive meanwhile, so the WAL is fully checkpointed and its next transaction starts it over
/// (unless a reader that began just before still reads it: this thread sees the WAL still long a second later
/// and asks again).
fn checkpoint(
    conn: rusqlite::Connection,
    stopped: std::sync::mpsc::Receiver<()>,
    reset_round: Arc<AtomicU64>,
    faults: &WriterFaults,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut last_frames = 0;
    loop {
        match stopped.recv_timeout(CHECKPOINT_EVERY) {
            Err(RecvTimeoutError::Timeout) => match wal_checkpoint(&conn, "PASSIVE") {
                Ok((_, frames, _)) => {
                    if frames < last_frames {
                        faults.wal_resets.fetch_add(1, Ordering::SeqCst);
                    }
                    last_frames = frames;
                    if frames > WAL_FORCE_RESET_FRAMES {
                        // Readers have kept the WAL from starting over for long: force it, waiting only briefly.
                        let _ = conn.busy_timeout(WAL_FORCE_RESET_WAIT);
                        match wal_checkpoint(&conn, "TRUNCATE") {
                            Ok((0, _, _)) => {
                                tracing::warn!(frames, "WAL forced back to empty (readers kept it growing)")
                            }
                            Ok(_) => tracing::warn!(frames, "WAL reset postponed: readers stayed in the WAL"),
                            Err(e) => tracing::warn!(error = %e, "WAL reset failed"),
                        }
                        let _ = conn.busy_timeout(super::sqlite::BUSY_TIMEOUT);
                    } else if frames > faults.wal_reset_frames() {
                        // A second pass copies what was written during the first, so the writer's is short.
                        let _ = wal_checkpoint(&conn, "PASSIVE");
                        reset_round.fetch_add(1, Ordering::AcqRel);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
            },
            _ => {
                let _ = wal_checkpoint(&conn, "TRUNCATE");
                return;
            }
        }
    }
}

fn apply_batch(
    conn: &mut rusqlite::Connection,
    batch: &[Job],
    faults: &WriterFaults,
) -> Result<Vec<WriteResult>, WriteError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        if faults.fails(&job.op) {
            return Err(StoreError::Backend("injected write fault".into()).into());
        }
        results.push(apply(&tx, &job.op)?);
    }
    faults.before_commit()?;
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
        read_seq: r.get::<_, i64>(10)? as u64,
    })
}

fn message_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRecord> {
    Ok(MessageRecord {
        seq: r.get::<_, i64>(0)? as u64,
        message_id: r.get(1)?,
        content: r.get(2)?,
        client_timestamp: r.get(3)?,
        created_at_ms: r.get(4)?,
        sender: r.get(5)?,
    })
}

fn owned_chat(tx: &rusqlite::Connection, owner: &str, chat_id: &str) -> Result<Option<ChatRecord>, WriteError> {
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
) -> Result<Result<ChatRecord, WriteResult>, WriteError> {
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
) -> Result<Result<Option<i64>, WriteResult>, WriteError> {
    match target {
        Target::Existing => Ok(Ok(condition)),
        Target::Create { key, max_chats } => Ok(create_chat(tx, owner, chat_id, key, *max_chats, now)?.map(|_| None)),
    }
}

/// The result when a conditional update matched no row: a conflict if the chat is the owner's.
fn unmatched(tx: &rusqlite::Connection, owner: &str, chat_id: &str) -> Result<WriteResult, WriteError> {
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
) -> Result<Option<ChatRecord>, WriteError> {
    let mut st = tx.prepare_cached(sql)?;
    Ok(st.query_row(p, chat_row).optional()?)
}

fn apply(tx: &rusqlite::Connection, op: &WriteOp) -> Result<WriteResult, WriteError> {
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
        WriteOp::Message {
            owner,
            chat_id,
            message_id,
            content,
            client_timestamp,
            sender,
            created_at,
            target,
            now,
            event,
        } => {
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
                .prepare_cached(&format!("SELECT {MESSAGE_COLS} FROM messages WHERE chat_id = ?1 AND message_id = ?2"))?
                .query_row(params![chat_id, message_id], message_row)
                .optional()?;
            if let Some(original) = original {
                let chat = owned_chat(tx, owner, chat_id)?.ok_or(StoreError::NotFound)?;
                return Ok(WriteResult::Message { chat, message: original, duplicate: true });
            }
            let sql = format!(
                "UPDATE chats SET messages_v = messages_v + 1, last_edited_ms = MAX(last_edited_ms, ?2), \
                 unread_count = unread_count + (?3 <> 'user') WHERE chat_id = ?1 RETURNING {CHAT_COLS}"
            );
            let chat = update_chat(tx, &sql, params![chat_id, now, sender])?.ok_or(StoreError::NotFound)?;
            let message = MessageRecord {
                seq: chat.messages_v,
                message_id: message_id.clone(),
                content: content.clone(),
                client_timestamp: client_timestamp.clone(),
                created_at_ms: *created_at,
                sender: sender.clone(),
            };
            tx.prepare_cached(
                "INSERT INTO messages (chat_id, seq, message_id, content, client_timestamp, created_at, sender) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                chat_id,
                message.seq as i64,
                message.message_id,
                message.content,
                message.client_timestamp,
                message.created_at_ms,
                message.sender
            ])?;
            if let Some(event) = event {
                record_event(tx, owner, event, Some(message.seq))?;
            }
            Ok(WriteResult::Message { chat, message, duplicate: false })
        }
        WriteOp::MarkRead { owner, chat_id, seq } => {
            let Some(chat) = owned_chat(tx, owner, chat_id)? else { return Ok(WriteResult::NotFound) };
            let target = (*seq).min(chat.messages_v);
            if target <= chat.read_seq {
                return Ok(WriteResult::Unchanged(chat));
            }
            let sql = format!(
                "UPDATE chats SET read_seq = ?2, unread_count = (SELECT COUNT(*) FROM messages m \
                 WHERE m.chat_id = ?1 AND m.seq > ?2 AND m.sender <> 'user') WHERE chat_id = ?1 RETURNING {CHAT_COLS}"
            );
            let chat = update_chat(tx, &sql, params![chat_id, target as i64])?.ok_or(StoreError::NotFound)?;
            Ok(WriteResult::Applied(chat))
        }
        WriteOp::DeleteChat { owner, chat_id, now, event } => {
            let deleted = tx
                .prepare_cached("DELETE FROM chats WHERE chat_id = ?1 AND owner = ?2")?
                .execute(params![chat_id, owner])?;
            if deleted == 0 {
                return Ok(WriteResult::NotFound);
            }
            tx.prepare_cached("INSERT INTO chat_tombstones (chat_id, owner, deleted_at) VALUES (?1, ?2, ?3)")?
                .execute(params![chat_id, owner, now])?;
            if let Some(event) = event {
                record_event(tx, owner, event, None)?;
            }
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

/// Inserts a webhook event into the outbox, inside the write's transaction (due at once); the trigger of
/// migration `0007_webhook_heads.sql` makes it its user's head, or counts it, in the same transaction.
pub(super) fn record_event(
    tx: &rusqlite::Connection,
    user_id: &str,
    event: &NewEvent,
    seq: Option<u64>,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO webhook_events (event_id, user_id, kind, seq, body, created_at, next_attempt_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )?
    .execute(params![
        event.event_id,
        user_id,
        event.kind,
        seq.map(|s| s as i64),
        event.body,
        event.created_at_ms
    ])?;
    Ok(())
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
        read_seq: r.get::<i64, _>(10) as u64,
    }
}

fn message_record(r: &SqliteRow) -> MessageRecord {
    MessageRecord {
        seq: r.get::<i64, _>(0) as u64,
        message_id: r.get(1),
        content: r.get(2),
        client_timestamp: r.get(3),
        created_at_ms: r.get(4),
        sender: r.get(5),
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
            .fetch_optional(&self.reads)
            .await?;
        if let Some(r) = row {
            return Ok(ChatLookup::Exists { owner: r.get(0), key: WrappedKey { wrapped: r.get(1), kek_id: r.get(2) } });
        }
        let gone = sqlx::query("SELECT 1 FROM chat_tombstones WHERE chat_id = ?1")
            .bind(chat_id)
            .fetch_optional(&self.reads)
            .await?;
        Ok(if gone.is_some() { ChatLookup::Deleted } else { ChatLookup::Absent })
    }

    async fn user_key(&self, user_id: &str) -> Result<Option<WrappedKey>, StoreError> {
        let row = sqlx::query("SELECT wrapped, kek_id FROM user_keys WHERE user_id = ?1")
            .bind(user_id)
            .fetch_optional(&self.reads)
            .await?;
        Ok(row.map(|r| WrappedKey { wrapped: r.get(0), kek_id: r.get(1) }))
    }

    async fn chats(&self, owner: &str) -> Result<Vec<ChatRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CHAT_COLS} FROM chats WHERE owner = ?1 ORDER BY last_edited_ms DESC, chat_id"
        ))
        .bind(owner)
        .fetch_all(&self.reads)
        .await?;
        Ok(rows.iter().map(chat_record).collect())
    }

    async fn chat(&self, owner: &str, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
        let mut conn = self.reads.acquire().await?;
        pool_owned_chat(&mut conn, owner, chat_id).await
    }

    async fn messages_after(
        &self,
        owner: &str,
        chat_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>, bool)>, StoreError> {
        let mut tx = self.reads.begin().await?;
        let Some(chat) = pool_owned_chat(&mut tx, owner, chat_id).await? else { return Ok(None) };
        let rows = sqlx::query(
            "SELECT seq, message_id, content, client_timestamp, created_at, sender FROM messages \
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
        let mut tx = self.reads.begin().await?;
        let Some(chat) = pool_owned_chat(&mut tx, owner, chat_id).await? else { return Ok(None) };
        let rows = sqlx::query(
            "SELECT seq, message_id, content, client_timestamp, created_at, sender FROM messages \
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
        .fetch_all(&self.reads)
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
        // BEGIN IMMEDIATE: no other write (a key stored by a server or a command) interleaves.
        let mut tx = self.pool.begin_with(super::sqlite::BEGIN_WRITE).await?;
        let stored: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT value FROM meta WHERE name = 'kek_check'").fetch_optional(&mut *tx).await?;
        if stored.is_some_and(|stored| stored != from_check) {
            return Err(StoreError::Backend(super::chats::ROTATED_MEANWHILE.to_owned()));
        }
        for (key_ref, key) in keys {
            let (sql, id) = match key_ref.split_once(':') {
                Some(("chat", id)) => ("UPDATE chats SET chat_key = ?2, kek_id = ?3 WHERE chat_id = ?1", id),
                Some(("user", id)) => ("UPDATE user_keys SET wrapped = ?2, kek_id = ?3 WHERE user_id = ?1", id),
                _ => return Err(StoreError::Backend(format!("unknown key slot {key_ref}"))),
            };
            sqlx::query(sql).bind(id).bind(&key.wrapped).bind(&key.kek_id).execute(&mut *tx).await?;
        }
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM chats WHERE kek_id <> ?1) + (SELECT count(*) FROM user_keys WHERE kek_id <> ?1)",
        )
        .bind(kek_id)
        .fetch_one(&mut *tx)
        .await?;
        if left > 0 {
            return Err(StoreError::Backend(super::chats::stored_during_rotation(left)));
        }
        sqlx::query("INSERT INTO meta (name, value) VALUES ('kek_check', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(check)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_user_keys(&self, keys: &[(String, WrappedKey)], check: &[u8]) -> Result<bool, StoreError> {
        // In transactions of at most CHUNK keys, so that a server's writes on the same file never wait
        // long for the write lock. BEGIN IMMEDIATE: a rotation's transaction runs wholly before or after
        // each (keys a chunk stored before one are counted by it, and make it fail).
        const CHUNK: usize = 5_000;
        // (An empty list still checks the value: one empty chunk.)
        for chunk in keys.chunks(CHUNK).chain(keys.is_empty().then_some(&[][..])) {
            let mut tx = self.pool.begin_with(super::sqlite::BEGIN_WRITE).await?;
            let stored: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT value FROM meta WHERE name = 'kek_check'").fetch_optional(&mut *tx).await?;
            if stored.as_deref() != Some(check) {
                return Ok(false);
            }
            for (user_id, key) in chunk {
                sqlx::query(
                    "INSERT INTO user_keys (user_id, wrapped, kek_id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                )
                .bind(user_id)
                .bind(&key.wrapped)
                .bind(&key.kek_id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        }
        Ok(true)
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

    async fn failed(&self) -> String {
        self.writer.gave_up().await
    }

    fn writer_faults(&self) -> Option<Arc<WriterFaults>> {
        Some(self.writer.faults.clone())
    }

    fn set_commit_window(&self, window: std::time::Duration) {
        self.writer.window_us.store(u64::try_from(window.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}
