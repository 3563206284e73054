//! Server-to-client messages (PROTOCOL.md sections 2, 4 and 6). Every one is sent as
//! `{"type","payload"}` plus `request_id` where it answers a request (see [`crate::encode`]).

use crate::error::ErrorCode;
use crate::ids::{ChatId, MessageId};
use crate::limits::Limits;
use crate::{MessageContent, TempId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Every message the server sends, one variant per wire `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The greeting, sent first on every authenticated connection.
    Connected(Connected),
    /// Reply to `ping`.
    Pong(crate::Empty),
    /// A failed request.
    Error(ErrorPayload),
    /// Reply to `initial_sync_request`.
    InitialSyncResponse(InitialSyncResponse),
    /// `initial_sync_request` failed.
    InitialSyncError(InitialSyncError),
    /// SELF after `update_draft`.
    DraftUpdateConfirmed(DraftUpdateConfirmed),
    /// OTHERS after `update_draft`; ALL after an applied `draft` change of `sync_offline_changes`.
    ChatDraftUpdated(ChatDraftUpdated),
    /// SELF after `delete_draft`.
    DraftDeleteReceipt(DraftDeleteReceipt),
    /// OTHERS after `delete_draft`; ALL after an applied `delete_draft` change of `sync_offline_changes`.
    DraftDeleted(DraftDeleted),
    /// ALL after `update_title`, and after an applied `title` change of `sync_offline_changes`.
    ChatTitleUpdated(ChatTitleUpdated),
    /// SELF after `chat_message_added`.
    ChatMessageConfirmed(ChatMessageConfirmed),
    /// OTHERS after `chat_message_added`; ALL for a message from the application backend (SERVER_API.md
    /// section 3).
    ChatMessageAdded(MessageAddedEvent),
    /// Reply to `get_chat_messages`.
    ChatMessagesResponse(ChatMessagesResponse),
    /// Reply to `request_chat_content_batch`.
    ChatContentBatchResponse(ChatContentBatchResponse),
    /// ALL after `delete_chat`.
    ChatDeleted(ChatDeleted),
    /// SELF after `sync_offline_changes`.
    OfflineSyncComplete(OfflineSyncComplete),
    /// Reply to `request_cache_status`.
    CacheStatusResponse(CacheStatusResponse),
    /// ALL: the most recently edited chat is warm.
    PriorityChatReady(PriorityChatReady),
    /// ALL: the whole cache is warm.
    CachePrimed(CachePrimed),
    /// ALL: a stream began (SERVER_API.md section 4).
    StreamStarted(crate::StreamStarted),
    /// ALL: a stream's next text (possibly several chunks merged).
    StreamChunk(crate::StreamChunk),
    /// ALL: a stream's message is stored.
    StreamCompleted(crate::StreamCompleted),
    /// ALL: a stream ended without a message.
    StreamCancelled(crate::StreamCancelled),
    /// ALL after `mark_read` moved the read marker (SELF only when it did not).
    ChatReadUpdated(ChatReadUpdated),
}

impl ServerMessage {
    /// The wire `type`.
    pub fn wire_type(&self) -> &'static str {
        match self {
            ServerMessage::Connected(_) => "connected",
            ServerMessage::Pong(_) => "pong",
            ServerMessage::Error(_) => "error",
            ServerMessage::InitialSyncResponse(_) => "initial_sync_response",
            ServerMessage::InitialSyncError(_) => "initial_sync_error",
            ServerMessage::DraftUpdateConfirmed(_) => "draft_update_confirmed",
            ServerMessage::ChatDraftUpdated(_) => "chat_draft_updated",
            ServerMessage::DraftDeleteReceipt(_) => "draft_delete_receipt",
            ServerMessage::DraftDeleted(_) => "draft_deleted",
            ServerMessage::ChatTitleUpdated(_) => "chat_title_updated",
            ServerMessage::ChatMessageConfirmed(_) => "chat_message_confirmed",
            ServerMessage::ChatMessageAdded(_) => "chat_message_added",
            ServerMessage::ChatMessagesResponse(_) => "chat_messages_response",
            ServerMessage::ChatContentBatchResponse(_) => "chat_content_batch_response",
            ServerMessage::ChatDeleted(_) => "chat_deleted",
            ServerMessage::OfflineSyncComplete(_) => "offline_sync_complete",
            ServerMessage::CacheStatusResponse(_) => "cache_status_response",
            ServerMessage::PriorityChatReady(_) => "priority_chat_ready",
            ServerMessage::CachePrimed(_) => "cache_primed",
            ServerMessage::StreamStarted(_) => "stream_started",
            ServerMessage::StreamChunk(_) => "stream_chunk",
            ServerMessage::StreamCompleted(_) => "stream_completed",
            ServerMessage::StreamCancelled(_) => "stream_cancelled",
            ServerMessage::ChatReadUpdated(_) => "chat_read_updated",
        }
    }

    /// The chat whose state a broadcast of a change announces (title, draft, message, read marker); `None`
    /// for every other message (a deletion, stream events, replies).
    pub fn changed_chat(&self) -> Option<&ChatId> {
        match self {
            ServerMessage::ChatDraftUpdated(e) => Some(&e.chat_id),
            ServerMessage::DraftDeleted(e) => Some(&e.chat_id),
            ServerMessage::ChatTitleUpdated(e) => Some(&e.chat_id),
            ServerMessage::ChatMessageAdded(e) => Some(&e.chat_id),
            ServerMessage::ChatReadUpdated(e) => Some(&e.chat_id),
            _ => None,
        }
    }
}

/// The wire types of the messages [`ServerMessage::changed_chat`] names a chat of.
const CHANGE_TYPES: [&str; 5] =
    ["chat_draft_updated", "draft_deleted", "chat_title_updated", "chat_message_added", "chat_read_updated"];

/// [`ServerMessage::changed_chat`] read off a frame as [`crate::encode`] writes it (the type, then the
/// payload with `chat_id` first), without parsing it: a node checks the frames other nodes publish
/// against the chats it knows deleted. `None` for every other frame.
pub fn frame_changed_chat(frame: &str) -> Option<&str> {
    let (kind, rest) = frame_type(frame)?;
    if !CHANGE_TYPES.contains(&kind) {
        return None;
    }
    leading_chat(rest)
}

/// A stream event that a device must not get for a chat it had `chat_deleted` of: a chunk (text of the
/// chat's stream) or a completion (a message stored in the chat). `stream_started` and `stream_cancelled`
/// are not among them (SERVER_API.md allows both just after `chat_deleted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamProgress {
    /// `stream_chunk`.
    Chunk,
    /// `stream_completed`.
    Completed,
}

/// The kind and chat of a `stream_chunk` or `stream_completed` frame as [`crate::encode`] writes it (the
/// type, then the payload with `chat_id` first), read without parsing it, as [`frame_changed_chat`] does:
/// a node checks the stream frames other nodes publish against the chats it knows deleted. `None` for
/// every other frame.
pub fn frame_stream_progress(frame: &str) -> Option<(StreamProgress, &str)> {
    let (kind, rest) = frame_type(frame)?;
    let progress = match kind {
        "stream_chunk" => StreamProgress::Chunk,
        "stream_completed" => StreamProgress::Completed,
        _ => return None,
    };
    Some((progress, leading_chat(rest)?))
}

/// The wire type of a frame as [`crate::encode`] writes it, and what follows it.
fn frame_type(frame: &str) -> Option<(&str, &str)> {
    frame.strip_prefix(r#"{"type":""#)?.split_once('"')
}

/// The `chat_id` that opens the payload, in what follows a frame's type.
fn leading_chat(rest: &str) -> Option<&str> {
    // Chat ids are validated to [A-Za-z0-9_-]: JSON writes them as they are.
    let (chat, _) = rest.strip_prefix(r#","payload":{"chat_id":""#)?.split_once('"')?;
    Some(chat)
}

#[cfg(test)]
mod tests {
    use super::{frame_changed_chat, frame_stream_progress, ServerMessage, StreamProgress};
    use serde_json::json;

    #[test]
    fn a_frame_names_the_chat_its_message_changes() {
        let message = json!({"message_id": "m1", "seq": 1, "sender_name": "user", "content": "hi",
            "created_at": "2026-01-01T00:00:00Z", "client_timestamp": null});
        let samples = [
            json!({"type": "chat_draft_updated", "payload": {"chat_id": "c-1", "data": {"draft_json": null},
                "versions": {"draft_v": 2}, "last_edited_overall_timestamp": 1}}),
            json!({"type": "draft_deleted", "payload": {"chat_id": "c_2", "draft_v": 3}}),
            json!({"type": "chat_title_updated", "payload": {"chat_id": "c3", "data": {"title": "t"},
                "versions": {"title_v": 1}}}),
            json!({"type": "chat_message_added", "payload": {"chat_id": "c_4", "message": message,
                "versions": {"messages_v": 1}, "last_edited_overall_timestamp": 1}}),
            json!({"type": "chat_read_updated", "payload": {"chat_id": "C5", "read_seq": 1, "unread_count": 0}}),
            json!({"type": "chat_deleted", "payload": {"chat_id": "c6", "tombstone": true}}),
            json!({"type": "stream_cancelled", "payload": {"chat_id": "c7", "stream_id": "s", "reason": "aborted"}}),
            json!({"type": "pong", "payload": {}}),
        ];
        let mut changes = 0;
        for sample in samples {
            let m: ServerMessage = serde_json::from_value(sample.clone()).expect("a valid sample");
            changes += usize::from(m.changed_chat().is_some());
            for request_id in [None, Some("r1")] {
                let frame = crate::encode(&m, request_id);
                assert_eq!(frame_changed_chat(&frame), m.changed_chat().map(|c| c.as_str()), "{frame}");
            }
        }
        assert_eq!(changes, super::CHANGE_TYPES.len());
        assert_eq!(frame_changed_chat(r#"{"type":"chat_title_updated""#), None);
        assert_eq!(frame_changed_chat(""), None);
    }

    #[test]
    fn a_frame_names_the_chat_of_its_stream_s_chunk_or_completion() {
        let samples = [
            (
                json!({"type": "stream_chunk", "payload": {"chat_id": "c-1", "stream_id": "s.1:a", "seq": 3,
                "delta": "\"chat_id\":\"x\""}}),
                Some((StreamProgress::Chunk, "c-1")),
            ),
            (
                json!({"type": "stream_completed", "payload": {"chat_id": "c_2", "stream_id": "s", "message_id": "m",
                "seq": 1, "messages_v": 1}}),
                Some((StreamProgress::Completed, "c_2")),
            ),
            (
                json!({"type": "stream_started", "payload": {"chat_id": "c3", "stream_id": "s", "message_id": "m",
                "sender_name": "assistant", "meta": {}}}),
                None,
            ),
            (
                json!({"type": "stream_cancelled", "payload": {"chat_id": "c4", "stream_id": "s",
                "reason": "aborted"}}),
                None,
            ),
            (json!({"type": "chat_deleted", "payload": {"chat_id": "c5", "tombstone": true}}), None),
            (
                json!({"type": "chat_title_updated", "payload": {"chat_id": "c6", "data": {"title": "t"},
                "versions": {"title_v": 1}}}),
                None,
            ),
        ];
        for (sample, expected) in samples {
            let m: ServerMessage = serde_json::from_value(sample.clone()).expect("a valid sample");
            for request_id in [None, Some("r1")] {
                let frame = crate::encode(&m, request_id);
                assert_eq!(frame_stream_progress(&frame), expected, "{frame}");
            }
        }
        assert_eq!(frame_stream_progress(r#"{"type":"stream_completed""#), None);
        assert_eq!(frame_stream_progress(r#"{"type":"stream_chunk","payload":{"chat_id":"c"#), None);
        assert_eq!(frame_stream_progress(""), None);
    }
}

/// `chat_read_updated` payload: the user's read marker of a chat and what is left unread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatReadUpdated {
    /// The chat.
    pub chat_id: ChatId,
    /// The read marker (highest seq read).
    pub read_seq: u64,
    /// Messages from other senders above the marker.
    pub unread_count: u64,
}

/// `connected` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Connected {
    /// Unique per connection, never reused.
    pub connection_id: String,
    /// The authenticated user.
    pub user_id: String,
    /// The device fingerprint hash (lowercase hex SHA-256).
    pub device_hash: String,
    /// Always `chatsync.v1`.
    pub protocol: String,
    /// The server clock, RFC 3339.
    pub server_time: String,
    /// The limits this server enforces.
    pub limits: Limits,
}

/// `error` payload: a stable code, a plain-English message, and context where known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorPayload {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable sentence; never internal detail.
    pub message: String,
    /// The payload field at fault (`invalid_payload`, `limit_exceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The chat concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_id: Option<String>,
    /// The message concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The offline change concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
}

impl ErrorPayload {
    /// An error with no context.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorPayload { code, message: message.into(), field: None, chat_id: None, message_id: None, change_id: None }
    }
}

/// The three versions of a chat, as the server knows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Versions {
    /// Number of messages.
    pub messages_v: u64,
    /// Title version.
    pub title_v: u64,
    /// Draft version (per user and chat).
    pub draft_v: u64,
}

/// Whether an initial-sync entry is new to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ChatChangeKind {
    /// The client did not list this chat.
    NewChat,
    /// The client has an older version of this chat.
    UpdatedChat,
}

/// One stored message as sent to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MessageOut {
    /// Client-chosen id.
    pub message_id: MessageId,
    /// 1-based position in the chat.
    pub seq: u64,
    /// Always `"user"` for messages from a user's devices.
    pub sender_name: String,
    /// The content, as sent.
    pub content: MessageContent,
    /// Server time of acceptance, RFC 3339.
    pub created_at: String,
    /// The client's timestamp, as sent (or `null`).
    pub client_timestamp: Option<crate::ClientTimestamp>,
}

/// One entry of `chats_to_add_or_update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatUpdate {
    /// The chat.
    pub chat_id: ChatId,
    /// New to the client, or updated.
    #[serde(rename = "type")]
    pub kind: ChatChangeKind,
    /// Current versions.
    pub versions: Versions,
    /// Unix seconds of the last message or draft change.
    pub last_edited_overall_timestamp: i64,
    /// Unread messages.
    pub unread_count: u64,
    /// Present when new or the title is newer; may be `""`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Present when new or the draft is newer; an explicit `null` means no draft.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "double_option")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Map<String, Value>>"))]
    pub draft_json: Option<Option<Map<String, Value>>>,
    /// For the immediate-view chat only: the messages the client lacks, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<MessageOut>>,
}

/// `initial_sync_response` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct InitialSyncResponse {
    /// Ids the client listed that the user does not (or no longer) own.
    pub chat_ids_to_delete: Vec<ChatId>,
    /// Chats new to the client or newer than it has; the immediate-view chat first.
    pub chats_to_add_or_update: Vec<ChatUpdate>,
    /// Every chat of the user, most recent first (complete in the last part; empty before it).
    pub server_chat_order: Vec<ChatId>,
    /// RFC 3339 (in the last part; empty before it).
    pub sync_completed_at: String,
    /// The user's open streams, with their text so far (SERVER_API.md section 4); split over the parts.
    #[serde(default)]
    pub active_streams: Vec<crate::ActiveStream>,
    /// More parts of this reply follow ("Bounded replies"); `false` on the last (or only) part.
    #[serde(default)]
    pub more: bool,
}

/// `initial_sync_error` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct InitialSyncError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable sentence.
    pub message: String,
}

/// `draft_update_confirmed` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DraftUpdateConfirmed {
    /// The chat.
    pub chat_id: ChatId,
    /// The new draft version.
    pub draft_v: u64,
    /// Unix seconds.
    pub last_edited_overall_timestamp: i64,
}

/// `{"draft_json"}` inside `chat_draft_updated`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DraftData {
    /// The draft, or `null` when cleared.
    pub draft_json: Option<Map<String, Value>>,
}

/// `{"draft_v"}` inside `chat_draft_updated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DraftVersion {
    /// The new draft version.
    pub draft_v: u64,
}

/// `chat_draft_updated` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatDraftUpdated {
    /// The chat.
    pub chat_id: ChatId,
    /// The draft.
    pub data: DraftData,
    /// The new draft version.
    pub versions: DraftVersion,
    /// Unix seconds.
    pub last_edited_overall_timestamp: i64,
}

/// `draft_delete_receipt` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DraftDeleteReceipt {
    /// The chat.
    pub chat_id: ChatId,
    /// Whether a draft was deleted.
    pub success: bool,
    /// The new draft version, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_v: Option<u64>,
    /// `"Draft not found."` when there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `draft_deleted` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DraftDeleted {
    /// The chat.
    pub chat_id: ChatId,
    /// The new draft version.
    pub draft_v: u64,
}

/// `{"title"}` inside `chat_title_updated`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TitleData {
    /// The new title (may be `""`).
    pub title: String,
}

/// `{"title_v"}` inside `chat_title_updated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TitleVersion {
    /// The new title version.
    pub title_v: u64,
}

/// `chat_title_updated` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatTitleUpdated {
    /// The chat.
    pub chat_id: ChatId,
    /// The title.
    pub data: TitleData,
    /// The new title version.
    pub versions: TitleVersion,
}

/// `chat_message_confirmed` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatMessageConfirmed {
    /// The chat.
    pub chat_id: ChatId,
    /// The message.
    pub message_id: MessageId,
    /// The client's temporary id, echoed (or `null`).
    pub temp_id: Option<TempId>,
    /// `messages_v` after this message (for a duplicate: after the original).
    pub new_messages_v: u64,
    /// Unix seconds.
    pub new_last_edited_overall_timestamp: i64,
    /// `true` when the `message_id` was already stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// `chat_message_added` payload (server to client).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MessageAddedEvent {
    /// The chat.
    pub chat_id: ChatId,
    /// The message, in the same shape as in `chat_messages_response`.
    pub message: MessageOut,
    /// The chat's message count.
    pub versions: MessagesVersion,
    /// Unix seconds.
    pub last_edited_overall_timestamp: i64,
}

/// `chat_messages_response` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatMessagesResponse {
    /// The chat.
    pub chat_id: ChatId,
    /// Oldest first.
    pub messages: Vec<MessageOut>,
    /// The chat's message count.
    pub messages_v: u64,
    /// More messages follow the last one returned.
    pub has_more: bool,
}

/// `{"messages_v"}` inside `chat_content_batch_response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MessagesVersion {
    /// The chat's message count.
    pub messages_v: u64,
}

/// `chat_content_batch_response` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatContentBatchResponse {
    /// Most recent messages per chat, oldest first.
    pub messages_by_chat_id: BTreeMap<ChatId, Vec<MessageOut>>,
    /// Message counts per chat.
    pub versions_by_chat_id: BTreeMap<ChatId, MessagesVersion>,
    /// Requested ids that are not the user's chats.
    pub not_found: Vec<ChatId>,
    /// More parts of this reply follow ("Bounded replies"); `false` on the last (or only) part.
    #[serde(default)]
    pub more: bool,
}

/// `chat_deleted` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatDeleted {
    /// The chat.
    pub chat_id: ChatId,
    /// Always `true`.
    pub tombstone: bool,
}

/// The outcome of one offline change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum OfflineStatus {
    /// Written and broadcast.
    Applied,
    /// The component changed since `version_before_edit`; discarded.
    Conflict,
    /// Invalid or failed; see `code`.
    Error,
}

/// One entry of `offline_sync_complete.results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OfflineResult {
    /// Echoed from the change (or `null`).
    pub change_id: Option<String>,
    /// The chat, when the change named a valid one.
    pub chat_id: Option<String>,
    /// The change type, when valid.
    #[serde(rename = "type")]
    pub kind: Option<crate::OfflineChangeType>,
    /// Applied, conflict or error.
    pub status: OfflineStatus,
    /// The error code, for `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// The chat's current versions, for `applied` and `conflict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<Versions>,
}

/// `offline_sync_complete` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OfflineSyncComplete {
    /// Changes applied.
    pub processed: u32,
    /// Changes discarded as conflicts.
    pub conflicts: u32,
    /// Changes that failed.
    pub errors: u32,
    /// One result per change, in order.
    pub results: Vec<OfflineResult>,
}

/// `cache_status_response` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CacheStatusResponse {
    /// Whether the warm-up finished.
    pub is_primed: bool,
}

/// `priority_chat_ready` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PriorityChatReady {
    /// The most recently edited chat.
    pub chat_id: ChatId,
}

/// `cache_primed` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CachePrimed {
    /// Always `"full_sync_ready"`.
    pub status: String,
}

/// Serde helper: `None` = absent, `Some(None)` = explicit `null`.
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<Option<T>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}
