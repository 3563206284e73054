//! Handler errors and their one translation into the client `error` envelope (PROTOCOL.md section 4).
//!
//! Internal detail goes to the server log (with the connection id), never to the client.

use crate::store::StoreError;
use chatsync_protocol::{ErrorCode, ErrorPayload};

/// Why a request failed. Built by handlers; turned into a payload by [`Error::into_payload`].
#[derive(Debug)]
pub struct Error {
    payload: ErrorPayload,
    /// Server-side detail for the log; never sent.
    internal: Option<String>,
}

impl Error {
    fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error { payload: ErrorPayload::new(code, message), internal: None }
    }

    /// `invalid_payload` naming `field`.
    pub fn invalid_payload(field: &str, message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorCode::InvalidPayload, message);
        e.payload.field = Some(field.to_owned());
        e
    }

    /// `limit_exceeded` naming the limit's field.
    pub fn limit_exceeded(field: &str, message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorCode::LimitExceeded, message);
        e.payload.field = Some(field.to_owned());
        e
    }

    /// `not_found` for a chat (absent, deleted or another user's: indistinguishable on purpose).
    pub fn chat_not_found(chat_id: &str) -> Error {
        Error::new(ErrorCode::NotFound, "Chat not found.").with_chat(chat_id)
    }

    /// `unavailable`: a backend is temporarily unreachable.
    pub fn unavailable(detail: impl Into<String>) -> Error {
        Error {
            internal: Some(detail.into()),
            ..Error::new(ErrorCode::Unavailable, "A backend is temporarily unavailable; retry later.")
        }
    }

    /// `internal`: anything else. `detail` is logged, never sent.
    pub fn internal(detail: impl Into<String>) -> Error {
        Error { internal: Some(detail.into()), ..Error::new(ErrorCode::Internal, "Internal error.") }
    }

    /// Adds the chat id as context.
    pub fn with_chat(mut self, chat_id: &str) -> Error {
        self.payload.chat_id = Some(chat_id.to_owned());
        self
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.payload.code
    }

    /// Server-side detail, for the log.
    pub fn internal_detail(&self) -> Option<&str> {
        self.internal.as_deref()
    }

    /// The client payload: code, message and context only.
    pub fn into_payload(self) -> ErrorPayload {
        self.payload
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::Unavailable(d) => Error::unavailable(d),
            other => Error::internal(other.to_string()),
        }
    }
}
