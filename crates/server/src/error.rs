//! Handler errors and their one translation into the client `error` envelope (PROTOCOL.md section 4).
//!
//! Internal detail goes to the server log (with the connection id), never to the client.

use crate::store::StoreError;
use chatsync_protocol::{ErrorCode, ErrorPayload};

/// Why a request failed. Built by handlers; turned into a payload by [`Error::into_payload`].
/// Boxed, so that `Result<T, Error>` stays small on the hot path.
#[derive(Debug)]
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    payload: ErrorPayload,
    /// Server-side detail for the log; never sent.
    internal: Option<String>,
}

impl Error {
    fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error(Box::new(Inner { payload: ErrorPayload::new(code, message), internal: None }))
    }

    fn with_internal(mut self, detail: String) -> Error {
        self.0.internal = Some(detail);
        self
    }

    /// `invalid_payload` naming `field`.
    pub fn invalid_payload(field: &str, message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorCode::InvalidPayload, message);
        e.0.payload.field = Some(field.to_owned());
        e
    }

    /// `limit_exceeded` naming the limit's field.
    pub fn limit_exceeded(field: &str, message: impl Into<String>) -> Error {
        let mut e = Error::new(ErrorCode::LimitExceeded, message);
        e.0.payload.field = Some(field.to_owned());
        e
    }

    /// `limit_exceeded` naming `chat_id`: creating the chat would take its owner past `max` chats.
    pub fn chat_limit(chat_id: &str, max: u32) -> Error {
        Error::limit_exceeded("chat_id", format!("Creating this chat would exceed max_chats_per_user ({max})."))
            .with_chat(chat_id)
    }

    /// `not_found` for a chat (absent, deleted or another user's: indistinguishable on purpose).
    pub fn chat_not_found(chat_id: &str) -> Error {
        Error::new(ErrorCode::NotFound, "Chat not found.").with_chat(chat_id)
    }

    /// `not_found` for a stream: no such open stream of the user in that chat.
    pub fn stream_not_found(chat_id: &str) -> Error {
        Error::new(ErrorCode::NotFound, "Stream not found.").with_chat(chat_id)
    }

    /// `unavailable`: a backend is temporarily unreachable.
    pub fn unavailable(detail: impl Into<String>) -> Error {
        Error::new(ErrorCode::Unavailable, "A backend is temporarily unavailable; retry later.")
            .with_internal(detail.into())
    }

    /// `internal`: anything else. `detail` is logged, never sent.
    pub fn internal(detail: impl Into<String>) -> Error {
        Error::new(ErrorCode::Internal, "Internal error.").with_internal(detail.into())
    }

    /// Adds the chat id as context.
    pub fn with_chat(mut self, chat_id: &str) -> Error {
        self.0.payload.chat_id = Some(chat_id.to_owned());
        self
    }

    /// Adds the message id as context.
    pub fn with_message(mut self, message_id: &str) -> Error {
        self.0.payload.message_id = Some(message_id.to_owned());
        self
    }

    /// Adds the request's chat and message ids where the error does not name them yet (PROTOCOL.md
    /// section 4: context "where known"), so that a store failure names them too.
    pub fn with_context(mut self, chat_id: Option<&str>, message_id: Option<&str>) -> Error {
        let payload = &mut self.0.payload;
        if payload.chat_id.is_none() {
            payload.chat_id = chat_id.map(str::to_owned);
        }
        if payload.message_id.is_none() {
            payload.message_id = message_id.map(str::to_owned);
        }
        self
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.0.payload.code
    }

    /// Server-side detail, for the log.
    pub fn internal_detail(&self) -> Option<&str> {
        self.0.internal.as_deref()
    }

    /// The client payload: code, message and context only.
    pub fn into_payload(self) -> ErrorPayload {
        self.0.payload
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
