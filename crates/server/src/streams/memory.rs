//! The embedded [`StreamRegistry`]: open streams in this node's memory (one map per user under one lock).
//! A restart loses them (SERVER_API.md section 4). Process memory is not at rest: the text is held as is.
//! A user's open streams are counted in their map, under the lock of the insert, for the per-user cap.

use super::{Appended, OpenStream, Opened, StreamError, StreamInfo, StreamKey, StreamRegistry};
use async_trait::async_trait;
use chatsync_protocol::{ChatId, StreamId};
use parking_lot::Mutex;
use std::collections::HashMap;

struct Entry {
    info: StreamInfo,
    seq: u64,
    content: String,
    last_ms: i64,
}

type UserStreams = HashMap<(ChatId, StreamId), Entry>;

/// [`StreamRegistry`] in process memory.
pub struct MemoryStreams {
    users: Mutex<HashMap<String, UserStreams>>,
    max_bytes: usize,
    max_open: usize,
}

impl MemoryStreams {
    /// An empty registry whose streams hold at most `max_bytes` of text each (and no cap on the streams a
    /// user may have open: [`MemoryStreams::with_max_open`]).
    pub fn new(max_bytes: usize) -> MemoryStreams {
        MemoryStreams { users: Mutex::default(), max_bytes, max_open: usize::MAX }
    }

    /// Caps the streams one user may have open at once at `max_open` (a start beyond it is
    /// [`StreamError::TooMany`]).
    pub fn with_max_open(mut self, max_open: usize) -> MemoryStreams {
        self.max_open = max_open;
        self
    }
}

fn id(key: &StreamKey) -> (ChatId, StreamId) {
    (key.chat_id.clone(), key.stream_id.clone())
}

#[async_trait]
impl StreamRegistry for MemoryStreams {
    async fn open(&self, key: &StreamKey, info: &StreamInfo, now_ms: i64) -> Result<Opened, StreamError> {
        let mut users = self.users.lock();
        let streams = users.entry(key.user_id.clone()).or_default();
        if let Some(open) = streams.get(&id(key)) {
            let same = open.info.message_id == info.message_id && open.info.sender_name == info.sender_name;
            return if same { Ok(Opened::AlreadyOpen) } else { Err(StreamError::Conflict) };
        }
        // Counted under the lock of the insert: concurrent starts cannot both take the last slot.
        if streams.len() >= self.max_open {
            return Err(StreamError::TooMany { max: self.max_open });
        }
        streams.insert(id(key), Entry { info: info.clone(), seq: 0, content: String::new(), last_ms: now_ms });
        Ok(Opened::New)
    }

    async fn append(&self, key: &StreamKey, seq: u64, delta: &str, now_ms: i64) -> Result<Appended, StreamError> {
        let mut users = self.users.lock();
        let entry = users
            .get_mut(&key.user_id)
            .and_then(|s| s.get_mut(&(key.chat_id.clone(), key.stream_id.clone())))
            .ok_or(StreamError::NotOpen)?;
        if seq <= entry.seq {
            return Ok(Appended::Duplicate);
        }
        if seq != entry.seq + 1 {
            return Err(StreamError::Gap { last: entry.seq, got: seq });
        }
        if entry.content.len() + delta.len() > self.max_bytes {
            return Err(StreamError::TooLarge { max: self.max_bytes });
        }
        entry.seq = seq;
        entry.content.push_str(delta);
        entry.last_ms = now_ms;
        Ok(Appended::Accepted)
    }

    async fn take(&self, key: &StreamKey) -> Result<Option<OpenStream>, StreamError> {
        let mut users = self.users.lock();
        let Some(streams) = users.get_mut(&key.user_id) else { return Ok(None) };
        let taken = streams.remove(&id(key));
        if streams.is_empty() {
            users.remove(&key.user_id);
        }
        Ok(taken.map(|e| OpenStream { key: key.clone(), info: e.info, seq: e.seq, content: e.content }))
    }

    async fn restore(&self, stream: OpenStream, now_ms: i64) -> Result<(), StreamError> {
        let mut users = self.users.lock();
        let streams = users.entry(stream.key.user_id.clone()).or_default();
        streams.entry(id(&stream.key)).or_insert(Entry {
            info: stream.info,
            seq: stream.seq,
            content: stream.content,
            last_ms: now_ms,
        });
        Ok(())
    }

    async fn is_open(&self, key: &StreamKey) -> Result<bool, StreamError> {
        Ok(self.users.lock().get(&key.user_id).is_some_and(|streams| streams.contains_key(&id(key))))
    }

    async fn list(&self, user_id: &str) -> Result<Vec<OpenStream>, StreamError> {
        let users = self.users.lock();
        let Some(streams) = users.get(user_id) else { return Ok(Vec::new()) };
        Ok(streams
            .iter()
            .map(|((chat_id, stream_id), e)| OpenStream {
                key: StreamKey { user_id: user_id.to_owned(), chat_id: chat_id.clone(), stream_id: stream_id.clone() },
                info: e.info.clone(),
                seq: e.seq,
                content: e.content.clone(),
            })
            .collect())
    }

    async fn sweep_idle(&self, cutoff_ms: i64) -> Result<Vec<StreamKey>, StreamError> {
        let mut users = self.users.lock();
        let mut idle = Vec::new();
        users.retain(|user_id, streams| {
            streams.retain(|(chat_id, stream_id), e| {
                let keep = e.last_ms > cutoff_ms;
                if !keep {
                    idle.push(StreamKey {
                        user_id: user_id.clone(),
                        chat_id: chat_id.clone(),
                        stream_id: stream_id.clone(),
                    });
                }
                keep
            });
            !streams.is_empty()
        });
        Ok(idle)
    }
}
