//! The stable error codes of PROTOCOL.md section 4.

use serde::{Deserialize, Serialize};

/// A stable error code sent in `error` payloads. Clients branch on these; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    InvalidJson,
    /// Not an object, `type` missing or not a string, `payload` not an object, or a bad `request_id`.
    InvalidMessage,
    /// No handler for `type`.
    UnknownType,
    /// A field is missing, of the wrong type, or malformed.
    InvalidPayload,
    /// A content or size limit is exceeded.
    LimitExceeded,
    /// The chat does not exist, was deleted, or belongs to another user.
    NotFound,
    /// The connection exceeded its message rate; the request was dropped.
    RateLimited,
    /// A backend is temporarily unreachable; retry later.
    Unavailable,
    /// Anything else; no internal detail is ever included.
    Internal,
}

impl ErrorCode {
    /// The wire spelling, e.g. `"invalid_payload"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidPayload => "invalid_payload",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
