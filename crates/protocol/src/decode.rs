//! Decoding client frames in two steps (PROTOCOL.md sections 3 and 4): the envelope first, then the
//! payload of the named type. Each failure maps to exactly one [`ErrorCode`].

use crate::client::*;
use crate::error::ErrorCode;
use crate::ids::RequestId;
use crate::server::ServerMessage;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The request id, echoed on the reply.
    pub request_id: Option<RequestId>,
    /// The typed message.
    pub message: ClientMessage,
}

/// Why a frame could not be decoded; becomes an `error` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    /// `invalid_json`, `invalid_message`, `unknown_type` or `invalid_payload`.
    pub code: ErrorCode,
    /// Plain-English explanation naming the field or type at fault.
    pub message: String,
    /// The payload field at fault, for `invalid_payload`.
    pub field: Option<String>,
    /// The request id, when the envelope carried a valid one.
    pub request_id: Option<RequestId>,
    /// The message type, when it is a known one (so a failed `initial_sync_request` can be answered
    /// with `initial_sync_error`).
    pub message_type: Option<&'static str>,
}

/// A payload field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct PayloadError {
    /// Dotted path of the field (`message.message_id`), or the missing field's name.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The envelope with its three members kept raw. A member present as `null` is `Some("null")`, not
/// `None`: only an absent member counts as omitted.
#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    request_id: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn envelope_error(code: ErrorCode, message: impl Into<String>) -> DecodeError {
    DecodeError { code, message: message.into(), field: None, request_id: None, message_type: None }
}

/// Decodes one client text frame.
pub fn decode(text: &str) -> Result<Decoded, DecodeError> {
    // An object only: serde's derived structs would also take an array of the members in order.
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = RawEnvelope::deserialize(crate::client::ObjectOnly(&mut de)).and_then(|raw| de.end().map(|()| raw));
    let raw: RawEnvelope = raw.map_err(|e| match e.classify() {
        // Not an object: still `invalid_json` if it is not JSON at all.
        serde_json::error::Category::Data if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() => {
            envelope_error(ErrorCode::InvalidJson, "The frame is not valid JSON.")
        }
        serde_json::error::Category::Data => envelope_error(
            ErrorCode::InvalidMessage,
            "A message must be a JSON object with a string `type`, an object `payload` and an optional `request_id`.",
        ),
        _ => envelope_error(ErrorCode::InvalidJson, "The frame is not valid JSON."),
    })?;

    let request_id = match raw.request_id {
        None => None,
        Some(v) => Some(serde_json::from_str::<String>(v.get()).ok().and_then(|s| RequestId::new(s).ok()).ok_or_else(
            || {
                // Named when it is a known one, so that an initial sync is answered `initial_sync_error`.
                let kind = raw.kind.and_then(|k| serde_json::from_str::<String>(k.get()).ok());
                DecodeError {
                    message_type: kind.and_then(|k| ClientMessage::TYPES.iter().copied().find(|t| *t == k)),
                    ..envelope_error(
                        ErrorCode::InvalidMessage,
                        "`request_id` must be a string of 1-64 printable ASCII characters.",
                    )
                }
            },
        )?),
    };
    let fail = |code, message: String| DecodeError {
        code,
        message,
        field: None,
        request_id: request_id.clone(),
        message_type: None,
    };

    let kind = raw.kind.ok_or_else(|| fail(ErrorCode::InvalidMessage, "The message has no `type`.".into()))?;
    let kind: String = serde_json::from_str(kind.get())
        .map_err(|_| fail(ErrorCode::InvalidMessage, "`type` must be a string.".into()))?;
    // From here on a failure names the type when it is a known one.
    let message_type = ClientMessage::TYPES.iter().copied().find(|t| *t == kind);
    let fail = |code, message: String| DecodeError { message_type, ..fail(code, message) };
    let payload = match raw.payload {
        None => "{}",
        Some(p) if p.get().starts_with('{') => p.get(),
        Some(_) => return Err(fail(ErrorCode::InvalidMessage, "`payload` must be an object.".into())),
    };

    let message = decode_payload(&kind, payload).map_err(|e| match e {
        PayloadOrType::UnknownType => {
            let shown: String = kind.chars().take(64).collect();
            fail(ErrorCode::UnknownType, format!("Unknown message type `{}`.", shown.escape_debug()))
        }
        PayloadOrType::Payload(p) => DecodeError {
            code: ErrorCode::InvalidPayload,
            message: format!("Invalid payload: {p}."),
            field: Some(p.field),
            request_id: request_id.clone(),
            message_type,
        },
    })?;
    Ok(Decoded { request_id, message })
}

enum PayloadOrType {
    UnknownType,
    Payload(PayloadError),
}

fn decode_payload(kind: &str, payload: &str) -> Result<ClientMessage, PayloadOrType> {
    fn p<T: DeserializeOwned>(payload: &str) -> Result<T, PayloadOrType> {
        // Fast path without path tracking; only a payload that fails is parsed again to name the field.
        serde_json::from_str(payload).or_else(|_| {
            let mut de = serde_json::Deserializer::from_str(payload);
            parse_with_path(&mut de).map_err(PayloadOrType::Payload)
        })
    }
    // One arm per wire type; `ClientMessage::TYPES` lists the same names (checked by a unit test).
    Ok(match kind {
        "ping" => ClientMessage::Ping(p(payload)?),
        "initial_sync_request" => ClientMessage::InitialSyncRequest(p(payload)?),
        "update_draft" => ClientMessage::UpdateDraft(p(payload)?),
        "delete_draft" => ClientMessage::DeleteDraft(p(payload)?),
        "update_title" => ClientMessage::UpdateTitle(p(payload)?),
        "chat_message_added" => ClientMessage::ChatMessageAdded(p(payload)?),
        "get_chat_messages" => ClientMessage::GetChatMessages(p(payload)?),
        "request_chat_content_batch" => ClientMessage::RequestChatContentBatch(p(payload)?),
        "delete_chat" => ClientMessage::DeleteChat(p(payload)?),
        "sync_offline_changes" => ClientMessage::SyncOfflineChanges(p(payload)?),
        "request_cache_status" => ClientMessage::RequestCacheStatus(p(payload)?),
        "cancel_stream" => ClientMessage::CancelStream(p(payload)?),
        "mark_read" => ClientMessage::MarkRead(p(payload)?),
        _ => return Err(PayloadOrType::UnknownType),
    })
}

/// Deserializes `T`, naming the failing field on error.
fn parse_with_path<'de, T, D>(de: D) -> Result<T, PayloadError>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de, Error = serde_json::Error>,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let reason = strip_position(&inner.to_string());
        let root = path == "." || path.is_empty();
        // A missing field is reported at its parent; serde names it in backticks.
        let field = match (missing_field_name(&reason), root) {
            (Some(name), true) => name.to_owned(),
            (Some(name), false) => format!("{path}.{name}"),
            (None, true) => "payload".to_owned(),
            (None, false) => path,
        };
        PayloadError { field, reason }
    })
}

/// Deserializes a payload-like value into `T`, naming the failing field on error.
pub(crate) fn typed_payload<T: DeserializeOwned>(value: &Value) -> Result<T, PayloadError> {
    parse_with_path(value)
}

fn missing_field_name(reason: &str) -> Option<&str> {
    let rest = reason.strip_prefix("missing field `")?;
    rest.split('`').next()
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// A decoded server frame, as a client sees it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Incoming {
    /// The message.
    #[serde(flatten)]
    pub message: ServerMessage,
    /// Present on a direct reply, and on the sender's copy of a broadcast.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// Decodes one server frame (used by clients and tests).
pub fn decode_server(text: &str) -> Result<Incoming, serde_json::Error> {
    serde_json::from_str(text)
}
