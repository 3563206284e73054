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
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "integral::option")]
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
    /// RFC 3339, between 1970 and 9999-12-31T23:59:59.999Z in UTC (an offset that takes the time out of
    /// that range is refused too); default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(regex(pattern = r"^(19[7-9][0-9]|[2-9][0-9]{3})-"), extend("format" = "date-time"))
    )]
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
    /// 1 for the first chunk, +1 for each next one (at most 2^64 - 1).
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 18_446_744_073_709_551_615_u64)))]
    #[serde(deserialize_with = "integral::u64")]
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

/// Integer fields as the spec's JSON Schema `integer` reads them: any JSON number whose value is an
/// integer, `2`, `2.0` or `2e0` alike (a JSON library may write an integral float so), not only the
/// literal serde's `u64` takes. A fraction, a negative number or one past `u64::MAX` is still refused.
mod integral {
    use serde::de::{Deserializer, Error, Unexpected, Visitor};
    use std::fmt;

    struct Integral;

    impl Visitor<'_> for Integral {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a non-negative integer")
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }

        fn visit_f64<E: Error>(self, v: f64) -> Result<u64, E> {
            // Only below 2^53, where every integer is a double: a larger one written with a fraction or
            // an exponent may have been rounded by the parse (2^53 + 1 reads as 2^53), and would be taken
            // as another number than the one sent. Such values are past every bound these fields have.
            if v.fract() == 0.0 && (0.0..9_007_199_254_740_992.0).contains(&v) {
                Ok(v as u64)
            } else {
                Err(E::invalid_value(Unexpected::Float(v), &self))
            }
        }
    }

    /// A `u64` from any integral JSON number.
    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(Integral)
    }

    /// An optional integer: `null` is `None`, as for a plain `Option<u64>`.
    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        struct Optional;

        impl<'de> Visitor<'de> for Optional {
            type Value = Option<u64>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                Integral.expecting(f)
            }

            fn visit_none<E: Error>(self) -> Result<Option<u64>, E> {
                Ok(None)
            }

            fn visit_unit<E: Error>(self) -> Result<Option<u64>, E> {
                Ok(None)
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
                u64(d).map(Some)
            }
        }

        d.deserialize_option(Optional)
    }
}
