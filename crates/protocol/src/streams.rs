//! Streams (SERVER_API.md section 4, PROTOCOL.md "Messages from other senders, unread counts, streams"):
//! the `cancel_stream` client payload, the four `stream_*` server payloads, the `active_streams` entry
//! of `initial_sync_response`, and the helpers the server's outbox uses to merge queued `stream_chunk`
//! frames of one stream ([`chunk_frame_key`], [`merge_chunk_frames`]) and to find the end of a stream
//! ([`stream_end_frame_key`]).

use crate::ids::{ChatId, MessageId, StreamId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `cancel_stream` payload (client to server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CancelStream {
    /// The chat the stream writes into.
    pub chat_id: ChatId,
    /// The stream to cancel.
    pub stream_id: StreamId,
}

/// `stream_started` payload (ALL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StreamStarted {
    /// The chat.
    pub chat_id: ChatId,
    /// The stream.
    pub stream_id: StreamId,
    /// The id the completed message will have.
    pub message_id: MessageId,
    /// Who writes it (never `"user"`).
    pub sender_name: String,
    /// The backend's metadata, untouched (`{}` when it gave none).
    #[serde(default)]
    pub meta: Map<String, Value>,
}

/// `stream_chunk` payload (ALL). When a connection is behind, several chunks of one stream arrive as one:
/// `seq` is the last one merged and `delta` the concatenation, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StreamChunk {
    /// The chat.
    pub chat_id: ChatId,
    /// The stream.
    pub stream_id: StreamId,
    /// 1-based, +1 per chunk (the last one merged).
    pub seq: u64,
    /// The text added by this chunk (or the merged chunks).
    pub delta: String,
}

/// `stream_completed` payload (ALL): the message is stored; nothing else of the stream follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StreamCompleted {
    /// The chat.
    pub chat_id: ChatId,
    /// The stream.
    pub stream_id: StreamId,
    /// The stored message.
    pub message_id: MessageId,
    /// The stored message's `seq` in the chat.
    pub seq: u64,
    /// The chat's `messages_v` after it.
    pub messages_v: u64,
}

/// Why a stream ended without a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum StreamCancelReason {
    /// A device of the user sent `cancel_stream`.
    CancelledByUser,
    /// The backend aborted it (`DELETE …/streams/{stream_id}`).
    Aborted,
    /// No chunk for the idle timeout.
    Timeout,
}

/// `stream_cancelled` payload (ALL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StreamCancelled {
    /// The chat.
    pub chat_id: ChatId,
    /// The stream.
    pub stream_id: StreamId,
    /// Why.
    pub reason: StreamCancelReason,
}

/// One entry of `initial_sync_response.active_streams`: an open stream of the user, with its text so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ActiveStream {
    /// The chat.
    pub chat_id: ChatId,
    /// The stream.
    pub stream_id: StreamId,
    /// The id the completed message will have.
    pub message_id: MessageId,
    /// Who writes it.
    pub sender_name: String,
    /// The backend's metadata (`{}` when none).
    #[serde(default)]
    pub meta: Map<String, Value>,
    /// The last chunk included in `content_so_far` (0: none yet); the next `stream_chunk` has `seq + 1`.
    pub seq: u64,
    /// Every chunk's text up to `seq`, concatenated.
    pub content_so_far: String,
}

/// The start of every `stream_chunk` frame [`crate::encode`] writes without a `request_id`.
const CHUNK_PREFIX: &str = r#"{"type":"stream_chunk","payload":{"chat_id":""#;

/// If `frame` is a `stream_chunk` frame as [`crate::encode`] writes it, the part that names its stream
/// (`<chat_id>","stream_id":"<stream_id>`), else `None`. Cheap (a prefix check and one search): ids
/// contain neither quotes nor commas, so the first `","seq":` ends the key.
pub fn chunk_frame_key(frame: &str) -> Option<&str> {
    let rest = frame.strip_prefix(CHUNK_PREFIX)?;
    let end = rest.find(r#"","seq":"#)?;
    let key = &rest[..end];
    key.contains(r#"","stream_id":""#).then_some(key)
}

/// The key [`chunk_frame_key`] finds in the `stream_chunk` frames of the stream `stream_id` of `chat_id`.
pub fn chunk_key(chat_id: &str, stream_id: &str) -> String {
    // Ids are validated to [A-Za-z0-9_.:-]: JSON writes them as they are.
    format!(r#"{chat_id}","stream_id":"{stream_id}"#)
}

/// The `seq` of a `stream_chunk` frame as [`crate::encode`] writes it (`None` for any other frame). Cheap:
/// the number follows the key.
pub fn chunk_frame_seq(frame: &str) -> Option<u64> {
    let key = chunk_frame_key(frame)?;
    let rest = &frame[CHUNK_PREFIX.len() + key.len() + r#"","seq":"#.len()..];
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// The starts of the `stream_completed` and `stream_cancelled` frames [`crate::encode`] writes (with or
/// without a `request_id`, which comes after the payload), and what follows the stream's key in each.
const END_PREFIXES: [(&str, &str); 2] = [
    (r#"{"type":"stream_completed","payload":{"chat_id":""#, r#"","message_id":"#),
    (r#"{"type":"stream_cancelled","payload":{"chat_id":""#, r#"","reason":"#),
];

/// If `frame` is a `stream_completed` or `stream_cancelled` frame as [`crate::encode`] writes it, the key of
/// its stream (as [`chunk_frame_key`] finds it in the stream's chunks), else `None`. Cheap: a prefix check
/// and one search.
pub fn stream_end_frame_key(frame: &str) -> Option<&str> {
    let (rest, after) = END_PREFIXES.iter().find_map(|(prefix, after)| Some((frame.strip_prefix(prefix)?, after)))?;
    let key = &rest[..rest.find(after)?];
    key.contains(r#"","stream_id":""#).then_some(key)
}

/// The bytes of the `delta` string, as JSON writes it (escapes included, quotes not), in a `stream_chunk`
/// frame as [`crate::encode`] writes it without a `request_id`: what the chunk adds to a merged chunk's
/// frame. Cheap (no parsing). For any other frame, the frame's length (an upper bound).
pub fn chunk_frame_delta_len(frame: &str) -> usize {
    let Some(key) = chunk_frame_key(frame) else { return frame.len() };
    let rest = &frame[CHUNK_PREFIX.len() + key.len() + r#"","seq":"#.len()..];
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    match rest[digits..].strip_prefix(r#","delta":""#).and_then(|delta| delta.strip_suffix(r#""}}"#)) {
        Some(delta) => delta.len(),
        None => frame.len(),
    }
}

/// Parses a `stream_chunk` frame back into its payload (`None` for any other frame).
pub fn parse_chunk_frame(frame: &str) -> Option<StreamChunk> {
    match crate::decode_server(frame).ok()?.message {
        crate::ServerMessage::StreamChunk(c) => Some(c),
        _ => None,
    }
}

/// Appends the chunk of `next` (a `stream_chunk` frame of the same stream) to `into`: `seq` becomes the
/// later one and `delta` the concatenation. Returns `false` (and changes nothing) if `next` is not a
/// chunk of the same stream.
pub fn merge_chunk_frames(into: &mut StreamChunk, next: &str) -> bool {
    match parse_chunk_frame(next) {
        Some(c) if c.chat_id == into.chat_id && c.stream_id == into.stream_id => {
            into.seq = into.seq.max(c.seq);
            into.delta.push_str(&c.delta);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, ServerMessage};

    fn chunk(seq: u64, delta: &str) -> StreamChunk {
        StreamChunk {
            chat_id: ChatId::new("c-1").unwrap(),
            stream_id: StreamId::new("s:1.x").unwrap(),
            seq,
            delta: delta.into(),
        }
    }

    #[test]
    fn the_key_of_a_chunk_frame_names_its_stream() {
        let frame = encode(&ServerMessage::StreamChunk(chunk(3, "\",\"seq\":9 tricky")), None);
        assert_eq!(chunk_frame_key(&frame), Some(r#"c-1","stream_id":"s:1.x"#));
        let other = encode(&ServerMessage::Pong(crate::Empty {}), None);
        assert_eq!(chunk_frame_key(&other), None);
        let with_request_id = encode(&ServerMessage::StreamChunk(chunk(3, "x")), Some("r"));
        assert!(parse_chunk_frame(&with_request_id).is_some());
        assert_eq!(chunk_key("c-1", "s:1.x"), chunk_frame_key(&frame).unwrap());
        assert_eq!(chunk_frame_seq(&frame), Some(3));
        let big = encode(&ServerMessage::StreamChunk(chunk(u64::MAX, "9")), None);
        assert_eq!(chunk_frame_seq(&big), Some(u64::MAX));
        assert_eq!(chunk_frame_seq(&other), None);
    }

    #[test]
    fn the_key_of_a_stream_end_frame_is_the_key_of_its_chunks() {
        use crate::{MessageId, StreamCancelReason, StreamCancelled, StreamCompleted};
        let (chat_id, stream_id) = (ChatId::new("c-1").unwrap(), StreamId::new("s:1.x").unwrap());
        let completed = ServerMessage::StreamCompleted(StreamCompleted {
            chat_id: chat_id.clone(),
            stream_id: stream_id.clone(),
            message_id: MessageId::new("m").unwrap(),
            seq: 3,
            messages_v: 4,
        });
        let cancelled = ServerMessage::StreamCancelled(StreamCancelled {
            chat_id,
            stream_id,
            reason: StreamCancelReason::CancelledByUser,
        });
        let key = chunk_key("c-1", "s:1.x");
        for message in [completed, cancelled] {
            assert_eq!(stream_end_frame_key(&encode(&message, None)), Some(key.as_str()));
            assert_eq!(
                stream_end_frame_key(&encode(&message, Some("r1"))),
                Some(key.as_str()),
                "a device's own cancel"
            );
        }
        assert_eq!(stream_end_frame_key(&encode(&ServerMessage::StreamChunk(chunk(1, "x")), None)), None);
        assert_eq!(stream_end_frame_key(&encode(&ServerMessage::Pong(crate::Empty {}), None)), None);
    }

    #[test]
    fn the_delta_of_a_chunk_frame_is_measured_as_json_writes_it() {
        for delta in ["", "abc", "a\"b\\c\n\u{1}é😀", "\",\"seq\":9}}"] {
            let frame = encode(&ServerMessage::StreamChunk(chunk(12, delta)), None);
            assert_eq!(chunk_frame_delta_len(&frame), serde_json::to_string(delta).unwrap().len() - 2, "{delta:?}");
        }
        let with_request_id = encode(&ServerMessage::StreamChunk(chunk(3, "x")), Some("r"));
        assert_eq!(chunk_frame_delta_len(&with_request_id), with_request_id.len(), "an upper bound");
    }

    #[test]
    fn merging_concatenates_in_order_and_keeps_the_last_seq() {
        let mut first = chunk(1, "Hel");
        assert!(merge_chunk_frames(&mut first, &encode(&ServerMessage::StreamChunk(chunk(2, "lo")), None)));
        assert_eq!(first, chunk(2, "Hello"));
        let mut other = chunk(1, "a");
        other.stream_id = StreamId::new("s2").unwrap();
        assert!(!merge_chunk_frames(&mut first, &encode(&ServerMessage::StreamChunk(other), None)));
        assert_eq!(first, chunk(2, "Hello"));
    }
}
