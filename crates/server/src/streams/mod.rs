//! Open streams (SERVER_API.md section 4): replies being generated, their chunks ordered by `seq`, until
//! they complete (stored as a message), are aborted, cancelled from a device, or time out.
//!
//! [`StreamRegistry`] is the state of the open streams, behind a small trait like the hub:
//! [`memory::MemoryStreams`] (the embedded default: this node's memory, lost on restart) and
//! [`redis::RedisStreams`] (cluster mode: the state in Redis, encrypted, so that any node's API serves any
//! stream and every node's devices see it in `active_streams`). Chunks themselves travel to devices
//! through the hub like every broadcast; the registry only decides whether a chunk is accepted.
//!
//! What is not here: the HTTP endpoints (`api/streams.rs`), the `cancel_stream` handler
//! (`handlers/cancel_stream.rs`), and the merging of chunks for slow connections (`hub/outbox.rs`).

pub mod memory;
pub mod ops;
pub mod redis;

use async_trait::async_trait;
use chatsync_protocol::{
    encode, ActiveStream, ChatId, MessageId, ServerMessage, StreamCancelReason, StreamCancelled, StreamId,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Names one stream: streams belong to a user and a chat; the stream id is the backend's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamKey {
    /// The owner of the chat.
    pub user_id: String,
    /// The chat the stream writes into.
    pub chat_id: ChatId,
    /// The backend's id of the stream.
    pub stream_id: StreamId,
}

/// What a stream was started with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// The id the completed message gets.
    pub message_id: MessageId,
    /// Who writes it (never `"user"`).
    pub sender_name: String,
    /// The backend's metadata, passed through (`{}` when none).
    pub meta: Map<String, Value>,
}

/// An open stream as the registry holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenStream {
    /// Which stream.
    pub key: StreamKey,
    /// What it was started with.
    pub info: StreamInfo,
    /// The last accepted chunk (0: none yet).
    pub seq: u64,
    /// Every accepted chunk's text, concatenated.
    pub content: String,
}

impl OpenStream {
    /// The `active_streams` entry of `initial_sync_response`.
    pub fn active(&self) -> ActiveStream {
        ActiveStream {
            chat_id: self.key.chat_id.clone(),
            stream_id: self.key.stream_id.clone(),
            message_id: self.info.message_id.clone(),
            sender_name: self.info.sender_name.clone(),
            meta: self.info.meta.clone(),
            seq: self.seq,
            content_so_far: self.content.clone(),
        }
    }
}

/// The outcome of [`StreamRegistry::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A new stream: announce it.
    New,
    /// The same stream (same message id and sender) was already open: a retried start, nothing to announce.
    AlreadyOpen,
}

/// The outcome of an accepted [`StreamRegistry::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The next chunk: deliver it.
    Accepted,
    /// A `seq` already accepted (a retry): ignored, whatever its delta.
    Duplicate,
}

/// Why a registry operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// No such open stream (never started, completed, aborted, cancelled, timed out, or lost in a restart).
    #[error("the stream is not open")]
    NotOpen,
    /// `seq` is not the next one.
    #[error("chunk {got} does not follow chunk {last}")]
    Gap {
        /// The last accepted chunk.
        last: u64,
        /// The chunk sent.
        got: u64,
    },
    /// The accumulated text would exceed the cap.
    #[error("the stream's text would exceed {max} bytes")]
    TooLarge {
        /// The cap, bytes.
        max: usize,
    },
    /// The user has as many streams open as the registry allows (`max_open_streams_per_user`); a stream
    /// that ends frees its slot.
    #[error("the user has {max} streams open already")]
    TooMany {
        /// The cap, streams per user.
        max: usize,
    },
    /// A stream with this id is open with another message id or sender.
    #[error("a stream with this id is already open with another message id or sender")]
    Conflict,
    /// The backend (Redis) failed; retry.
    #[error("stream state unavailable: {0}")]
    Unavailable(String),
}

/// The state of the open streams. Every method is atomic for one stream, also across nodes sharing the
/// state: of two concurrent calls on one stream, exactly one sees the stream in each state.
#[async_trait]
pub trait StreamRegistry: Send + Sync + 'static {
    /// Opens a stream (`seq` 0, no text). A stream already open with the same message id and sender is
    /// [`Opened::AlreadyOpen`]; with others, [`StreamError::Conflict`]. A new stream of a user who has the
    /// registry's cap of streams open is [`StreamError::TooMany`] (checked atomically with the opening:
    /// concurrent starts, on any node, never take a user past it).
    async fn open(&self, key: &StreamKey, info: &StreamInfo, now_ms: i64) -> Result<Opened, StreamError>;

    /// Accepts chunk `seq` if it is the next one (last + 1) and the text stays within the cap; a `seq` at
    /// or below the last one is [`Appended::Duplicate`] and changes nothing. Refreshes the idle clock.
    async fn append(&self, key: &StreamKey, seq: u64, delta: &str, now_ms: i64) -> Result<Appended, StreamError>;

    /// Housekeeping after an accepted chunk has been delivered (the Redis registry merges the stream's
    /// chunk list when an append asked for it). Best effort and bounded in time; it changes no text.
    async fn tidy(&self, _key: &StreamKey) {}

    /// Removes the stream and returns it (to be completed), or `None` if it is not open.
    async fn take(&self, key: &StreamKey) -> Result<Option<OpenStream>, StreamError>;

    /// Puts back a stream taken by [`StreamRegistry::take`] whose completion failed, unless a stream of
    /// that key was opened meanwhile. The cap of open streams is not checked: the stream held a slot until
    /// its take, and refusing it here would lose it (a user can be over the cap by the completions that
    /// failed while new streams took their slots; starts are refused until the count is under it again).
    async fn restore(&self, stream: OpenStream, now_ms: i64) -> Result<(), StreamError>;

    /// Whether the stream is open (a read: another call may change it at once).
    async fn is_open(&self, key: &StreamKey) -> Result<bool, StreamError>;

    /// Every open stream of `user_id` (any order). A stream whose stored state does not decode (damaged,
    /// or written by another version) is left out and logged by its id, not an error: the others are
    /// listed.
    async fn list(&self, user_id: &str) -> Result<Vec<OpenStream>, StreamError>;

    /// Removes every stream whose last chunk (or start) is at or before `cutoff_ms` and returns their keys.
    /// In a cluster every node sweeps, and each idle stream is returned to exactly one of them.
    async fn sweep_idle(&self, cutoff_ms: i64) -> Result<Vec<StreamKey>, StreamError>;
}

/// The registry `lib.rs::assemble` picks: memory on a single node, Redis with a bus.
pub fn from_config(
    config: &crate::Config,
    master: &crate::crypto::MasterKey,
) -> anyhow::Result<Arc<dyn StreamRegistry>> {
    let max = config.max_stream_bytes;
    let max_open = config.max_open_streams_per_user;
    Ok(match &config.redis_url {
        Some(url) => Arc::new(
            redis::RedisStreams::new(
                url,
                &config.redis_prefix,
                master.derive("streams"),
                max,
                Duration::from_secs(config.stream_idle_timeout_secs),
            )?
            .with_max_open(max_open),
        ),
        None => Arc::new(memory::MemoryStreams::new(max).with_max_open(max_open)),
    })
}

/// The `stream_cancelled` frame for `key`.
pub fn cancelled_frame(key: &StreamKey, reason: StreamCancelReason) -> String {
    encode(
        &ServerMessage::StreamCancelled(StreamCancelled {
            chat_id: key.chat_id.clone(),
            stream_id: key.stream_id.clone(),
            reason,
        }),
        None,
    )
}

/// Cancels idle streams with reason `timeout` until `shutdown`: sweeps every quarter of the idle timeout
/// (no more often than every 250 ms, at least every 15 s).
pub async fn sweep_idle_streams(ctx: Arc<crate::Ctx>, shutdown: CancellationToken) {
    let idle = Duration::from_secs(ctx.config.stream_idle_timeout_secs);
    let period = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let cutoff = crate::store::now_millis() - idle.as_millis() as i64;
        match ctx.streams.sweep_idle(cutoff).await {
            Ok(keys) => {
                for key in keys {
                    tracing::info!(user_id = %key.user_id, chat_id = %key.chat_id, stream_id = %key.stream_id, "stream timed out");
                    metrics::counter!(crate::metrics::STREAMS_ENDED, "reason" => "timeout").increment(1);
                    let frame = cancelled_frame(&key, StreamCancelReason::Timeout);
                    ctx.hub.deliver_in_order(&key.user_id, crate::hub::Audience::All, frame.into()).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "idle stream sweep failed"),
        }
    }
}
