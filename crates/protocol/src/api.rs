//! The application-backend API (SERVER_API.md): request and response bodies of `/v1/api`.
//!
//! Requests reject unknown fields (`invalid_payload`). Times are RFC 3339 text. Like the WebSocket types,
//! these are the only place that knows the JSON shape; the server's `api/` handlers and clients share them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of every error response: `{"error":{"code","message","field"?}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ApiErrorBody {
    /// The error.
    pub error: ApiErrorDetail,
}

/// One API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ApiErrorDetail {
    /// Stable code: `invalid_json`, `invalid_payload`, `unauthorized`, `not_found`, `conflict`,
    /// `payload_too_large`, `limit_exceeded`, `rate_limited`, `unavailable`, `internal`.
    #[cfg_attr(feature = "schema", schemars(extend("enum" = [
        "invalid_json", "invalid_payload", "unauthorized", "not_found", "conflict", "payload_too_large",
        "limit_exceeded", "rate_limited", "unavailable", "internal"
    ])))]
    pub code: String,
    /// A plain English sentence.
    pub message: String,
    /// The offending field as a dotted path (or the path segment), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `POST /v1/api/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// The new user's id (1-64 characters of `[A-Za-z0-9_.@-]`).
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.@-]+$")))]
    pub user_id: String,
    /// Two-factor authentication flag (changes the device-mismatch close reason).
    #[serde(default)]
    pub tfa: bool,
}

/// `201` of `POST /v1/api/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UserCreated {
    /// The user id.
    pub user_id: String,
}

/// `GET /v1/api/users/{user_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UserInfo {
    /// The user id.
    pub user_id: String,
    /// Two-factor authentication flag.
    pub tfa: bool,
    /// Creation time.
    pub created_at: String,
    /// Chats the user owns.
    pub chat_count: u64,
    /// Devices known for the user.
    pub device_count: u64,
}

/// `POST /v1/api/users/{user_id}/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// Binds the session to this device id at issue (PROTOCOL.md section 2); unbound otherwise (bound on
    /// first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 128), regex(pattern = r"^[\x20-\x7e]+$")))]
    pub device_id: Option<String>,
    /// Lifetime in seconds (default: 30 days; at least 1, at most ten years).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 315_360_000)))]
    pub ttl_secs: Option<u64>,
}

/// `201` of `POST /v1/api/users/{user_id}/sessions`. The token is shown only here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SessionCreated {
    /// Session id (for `DELETE /v1/api/sessions/{session_id}`).
    pub session_id: String,
    /// The session token (`cs_…`).
    pub token: String,
    /// Expiry, or `null` for none.
    pub expires_at: Option<String>,
}

/// One device of `GET /v1/api/users/{user_id}/devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeviceInfo {
    /// Lowercase hex SHA-256 fingerprint.
    pub device_hash: String,
    /// First authenticated connection.
    pub first_seen: String,
    /// Latest authenticated connection.
    pub last_seen: String,
}

/// `GET /v1/api/users/{user_id}/devices`, most recently seen first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeviceList {
    /// The devices.
    pub devices: Vec<DeviceInfo>,
}

/// `POST /v1/api/users/{user_id}/chats/{chat_id}/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PostMessage {
    /// Idempotency key, unique per chat (PROTOCOL.md id rules).
    #[cfg_attr(feature = "schema", schemars(with = "crate::MessageId"))]
    pub message_id: String,
    /// Who wrote it: any id except `"user"` (e.g. `"assistant"`): 1-64 characters of `[A-Za-z0-9_.@-]`.
    #[cfg_attr(
        feature = "schema",
        schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.@-]+$"), extend("not" = {"const": "user"}))
    )]
    pub sender_name: String,
    /// A JSON object or a string: at most 32 KiB of JSON and 32 levels of nested objects and arrays.
    #[cfg_attr(feature = "schema", schemars(with = "crate::MessageContent"))]
    pub content: Value,
    /// RFC 3339; default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// `201` (or `200` for a repeated `message_id`) of `POST …/messages`, and `201` of `POST …/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MessagePosted {
    /// The chat.
    pub chat_id: String,
    /// The message.
    pub message_id: String,
    /// Its position in the chat (the original's for a duplicate).
    pub seq: u64,
    /// The chat's message count after the write.
    pub messages_v: u64,
    /// The `message_id` was already stored; nothing changed and nothing was broadcast.
    pub duplicate: bool,
}

/// `POST /v1/api/users/{user_id}/chats/{chat_id}/streams` (SERVER_API.md section 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct StartStream {
    /// The backend's id of the stream (the message id rules).
    #[cfg_attr(feature = "schema", schemars(with = "crate::StreamId"))]
    pub stream_id: String,
    /// The id the completed message gets.
    #[cfg_attr(feature = "schema", schemars(with = "crate::MessageId"))]
    pub message_id: String,
    /// Who writes it: any id except `"user"`: 1-64 characters of `[A-Za-z0-9_.@-]`.
    #[cfg_attr(
        feature = "schema",
        schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.@-]+$"), extend("not" = {"const": "user"}))
    )]
    pub sender_name: String,
    /// Any JSON object up to 4 KiB and 32 levels of nesting, passed through to the devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Map<String, Value>>,
}

/// `201` (or `200` for a retried start of the same stream) of `POST …/streams`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StreamOpened {
    /// The stream.
    pub stream_id: String,
}

/// `POST …/streams/{stream_id}/chunks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PostChunk {
    /// 1 for the first chunk, +1 for each next one.
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub seq: u64,
    /// The text this chunk adds (at most 16 KiB, and its `stream_chunk` frame, JSON-escaped, at most
    /// `max_reply_bytes`).
    pub delta: String,
}

/// `POST …/streams/{stream_id}/complete`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CompleteStream {
    /// The message to store (a JSON object or a string); default: the stream's text so far, as a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<crate::MessageContent>"))]
    pub content: Option<Value>,
}
