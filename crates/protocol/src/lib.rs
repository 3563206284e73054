//! chatsync wire protocol, version 1: the only place that knows the JSON shape.
//!
//! * [`decode`] turns one text frame into a typed [`ClientMessage`], reading the envelope first and the
//!   payload second, so that an unknown `type` is `unknown_type` and a bad payload of a known type is
//!   `invalid_payload` naming the field.
//! * [`ServerMessage`] is every server-to-client message; [`encode`] writes the envelope.
//! * [`ErrorCode`], [`Limits`] and the id newtypes ([`ChatId`], [`MessageId`]) are shared by the server,
//!   the client and the bench.
//!
//! No I/O happens here. The normative text is `docs/PROTOCOL.md`.

pub mod api;
mod client;
mod decode;
mod error;
mod ids;
mod limits;
mod server;
#[cfg(feature = "schema")]
pub mod specs;
mod streams;

pub use client::*;
pub use decode::{decode, decode_server, DecodeError, Decoded, Incoming, PayloadError};
pub use error::ErrorCode;
pub use ids::{ChatId, MessageId, RequestId, StreamId};
pub use limits::{json_depth, object_depth, Limits};
pub use server::*;
pub use streams::*;

/// The protocol name announced in `connected`.
pub const PROTOCOL_NAME: &str = "chatsync.v1";

/// Encodes a server message into its envelope `{"type","payload","request_id"?}`.
pub fn encode(message: &ServerMessage, request_id: Option<&str>) -> String {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        #[serde(flatten)]
        message: &'a ServerMessage,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    }
    serde_json::to_string(&Envelope { message, request_id })
        .expect("server messages always serialize: no non-string map keys, no failing Serialize impls")
}
