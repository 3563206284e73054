//! Client-to-server messages (PROTOCOL.md section 6), one payload struct per message type.
//!
//! Serializing a [`ClientMessage`] gives `{"type","payload"}`; the server decodes with [`crate::decode`],
//! which classifies errors per PROTOCOL.md section 4.

use crate::ids::{ChatId, MessageId};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Every message a client may send, one variant per wire `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
pub enum ClientMessage {
    /// `ping` → `pong`.
    Ping(Empty),
    /// `initial_sync_request` → `initial_sync_response`.
    InitialSyncRequest(InitialSyncRequest),
    /// `update_draft` → `draft_update_confirmed` + OTHERS `chat_draft_updated`.
    UpdateDraft(UpdateDraft),
    /// `delete_draft` → `draft_delete_receipt` + OTHERS `draft_deleted`.
    DeleteDraft(DeleteDraft),
    /// `update_title` → ALL `chat_title_updated`.
    UpdateTitle(UpdateTitle),
    /// `chat_message_added` → `chat_message_confirmed` + OTHERS `chat_message_added`.
    ChatMessageAdded(ChatMessageAdded),
    /// `get_chat_messages` → `chat_messages_response`.
    GetChatMessages(GetChatMessages),
    /// `request_chat_content_batch` → `chat_content_batch_response`.
    RequestChatContentBatch(RequestChatContentBatch),
    /// `delete_chat` → ALL `chat_deleted`.
    DeleteChat(DeleteChat),
    /// `sync_offline_changes` → broadcasts + `offline_sync_complete`.
    SyncOfflineChanges(SyncOfflineChanges),
    /// `request_cache_status` → `cache_status_response`.
    RequestCacheStatus(Empty),
    /// `cancel_stream` → ALL `stream_cancelled` (SERVER_API.md section 4).
    CancelStream(crate::CancelStream),
    /// `mark_read` → ALL `chat_read_updated` (SELF only when the marker does not move).
    MarkRead(MarkRead),
}

impl ClientMessage {
    /// Every wire `type` a client may send.
    pub const TYPES: [&'static str; 13] = [
        "ping",
        "initial_sync_request",
        "update_draft",
        "delete_draft",
        "update_title",
        "chat_message_added",
        "get_chat_messages",
        "request_chat_content_batch",
        "delete_chat",
        "sync_offline_changes",
        "request_cache_status",
        "cancel_stream",
        "mark_read",
    ];

    /// The wire `type` of this message.
    pub fn wire_type(&self) -> &'static str {
        match self {
            ClientMessage::Ping(_) => "ping",
            ClientMessage::InitialSyncRequest(_) => "initial_sync_request",
            ClientMessage::UpdateDraft(_) => "update_draft",
            ClientMessage::DeleteDraft(_) => "delete_draft",
            ClientMessage::UpdateTitle(_) => "update_title",
            ClientMessage::ChatMessageAdded(_) => "chat_message_added",
            ClientMessage::GetChatMessages(_) => "get_chat_messages",
            ClientMessage::RequestChatContentBatch(_) => "request_chat_content_batch",
            ClientMessage::DeleteChat(_) => "delete_chat",
            ClientMessage::SyncOfflineChanges(_) => "sync_offline_changes",
            ClientMessage::RequestCacheStatus(_) => "request_cache_status",
            ClientMessage::CancelStream(_) => "cancel_stream",
            ClientMessage::MarkRead(_) => "mark_read",
        }
    }

    /// Encodes this message as a client frame, with an optional `request_id`.
    pub fn encode(&self, request_id: Option<&str>) -> String {
        #[derive(Serialize)]
        struct Envelope<'a> {
            #[serde(flatten)]
            message: &'a ClientMessage,
            #[serde(skip_serializing_if = "Option::is_none")]
            request_id: Option<&'a str>,
        }
        serde_json::to_string(&Envelope { message: self, request_id }).expect("client messages always serialize")
    }
}

/// A payload with no fields (`ping`, `request_cache_status`). Unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Empty {}

/// A client's known versions of one chat; a missing component counts as -1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ClientVersions {
    /// Messages the client has (`messages_v`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_v: Option<i64>,
    /// Title version the client has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title_v: Option<i64>,
    /// Draft version the client has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_v: Option<i64>,
}

/// `initial_sync_request` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct InitialSyncRequest {
    /// What the client already has, per chat (at most 10,000 entries).
    #[serde(deserialize_with = "versions_map")]
    pub chat_versions: BTreeMap<ChatId, ClientVersions>,
    /// The chat on screen: it comes first in the reply, with the messages the client lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immediate_view_chat_id: Option<ChatId>,
}

/// `update_draft` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpdateDraft {
    /// The chat; created for the writer when unknown.
    pub chat_id: ChatId,
    /// The draft document (usually Tiptap), or `null` to clear. Required, even when `null`.
    #[serde(deserialize_with = "nullable_object")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "nullable_object_schema"))]
    pub draft_json: Option<Map<String, Value>>,
}

/// `delete_draft` payload (`chatId` accepted as an alias).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeleteDraft {
    /// The chat whose draft is deleted.
    #[serde(alias = "chatId")]
    pub chat_id: ChatId,
}

/// `update_title` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpdateTitle {
    /// The chat; created for the writer when unknown.
    pub chat_id: ChatId,
    /// The new title; `""` clears it.
    pub new_title: String,
}

/// `chat_message_added` payload (client to server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ChatMessageAdded {
    /// The chat; created for the writer when unknown.
    pub chat_id: ChatId,
    /// The message.
    #[serde(deserialize_with = "object_only")]
    pub message: NewMessage,
}

/// A message as a client sends it. A `sender` field is accepted and ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NewMessage {
    /// Unique per chat; re-sending it is idempotent.
    pub message_id: MessageId,
    /// The content: a JSON object or a string (at most 32 KiB of JSON and 32 levels of nesting).
    pub content: MessageContent,
    /// The client's clock, kept as `client_timestamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<ClientTimestamp>,
    /// Echoed on `chat_message_confirmed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_id: Option<TempId>,
}

/// Message content: a JSON object or a plain string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// A structured document.
    Json(Map<String, Value>),
}

impl MessageContent {
    /// Its nesting depth ([`crate::json_depth`]): 0 for text, at least 1 for a document; at most
    /// [`crate::Limits::MAX_MESSAGE_CONTENT_DEPTH`] is accepted.
    pub fn depth(&self) -> usize {
        match self {
            MessageContent::Text(_) => 0,
            MessageContent::Json(members) => crate::object_depth(members),
        }
    }
}

/// A client timestamp: unix seconds or RFC 3339 text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum ClientTimestamp {
    /// Unix seconds (fractions allowed).
    Unix(f64),
    /// RFC 3339 text.
    Text(String),
}

/// A client's temporary id for a message, echoed back: a string or a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum TempId {
    /// Text id.
    Text(String),
    /// Numeric id.
    Number(serde_json::Number),
}

/// `get_chat_messages` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GetChatMessages {
    /// The chat.
    pub chat_id: ChatId,
    /// Return messages with `seq` greater than this (default 0).
    #[serde(default)]
    pub after_seq: u64,
    /// Page size (default 100, at most the page limit). A larger integer of any size saturates at
    /// `u32::MAX`, so that it is reported as over the limit rather than as malformed.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "saturating_u32")]
    pub limit: Option<u32>,
}

/// `request_chat_content_batch` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RequestChatContentBatch {
    /// The chats (at most the batch limit).
    pub chat_ids: Vec<ChatId>,
}

/// `delete_chat` payload (`chatId` accepted as an alias).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeleteChat {
    /// The chat to delete.
    #[serde(alias = "chatId")]
    pub chat_id: ChatId,
}

/// `mark_read` payload: the user has read the chat up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MarkRead {
    /// The chat.
    pub chat_id: ChatId,
    /// The highest message seq read (capped at the chat's `messages_v`).
    pub seq: u64,
}

/// `sync_offline_changes` payload. Each change is validated on its own ([`OfflineChange::parse`]), so one
/// malformed change is an `error` result and does not fail the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SyncOfflineChanges {
    /// The changes, applied in order (at most the offline limit).
    #[cfg_attr(feature = "schema", schemars(with = "Vec<OfflineChange>"))]
    pub changes: Vec<Value>,
}

/// The kind of an offline change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum OfflineChangeType {
    /// A title change; `value` is the new title.
    Title,
    /// A draft change; `value` is the draft document or `null`.
    Draft,
    /// A draft deletion; `value` is ignored.
    DeleteDraft,
}

/// One validated offline change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OfflineChange {
    /// Echoed in the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    /// The chat.
    pub chat_id: ChatId,
    /// The kind of change.
    #[serde(rename = "type")]
    pub kind: OfflineChangeType,
    /// The new value (title string, draft object or `null`); required for a title or a draft, ignored
    /// (and optional) for a draft deletion.
    #[serde(default)]
    pub value: Value,
    /// The component version the client edited from.
    pub version_before_edit: i64,
}

impl OfflineChange {
    /// Validates one raw change. On failure returns the field and reason, like `invalid_payload`.
    pub fn parse(raw: &Value) -> Result<OfflineChange, crate::PayloadError> {
        if !raw.is_object() {
            return Err(crate::PayloadError { field: "change".into(), reason: "must be an object".into() });
        }
        let change: OfflineChange = crate::decode::typed_payload(raw)?;
        // A missing `value` reads as `null`; for a draft that would clear it, so a draft change must
        // carry it, `null` or not (as `update_draft` must carry `draft_json`).
        let has_value = raw.get("value").is_some();
        let bad_value = match change.kind {
            OfflineChangeType::Title => !change.value.is_string(),
            OfflineChangeType::Draft => !has_value || !(change.value.is_object() || change.value.is_null()),
            OfflineChangeType::DeleteDraft => false,
        };
        if bad_value {
            return Err(crate::PayloadError {
                field: "value".into(),
                reason: "must be a string for a title, an object or null for a draft".into(),
            });
        }
        Ok(change)
    }
}

/// The schema of a required field that may be `null` or an object (a plain `Option` would be optional).
#[cfg(feature = "schema")]
fn nullable_object_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": ["object", "null"], "additionalProperties": true})
}

/// Deserializes a required field that may be `null` or an object.
fn nullable_object<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Map<String, Value>>, D::Error> {
    Option::<Map<String, Value>>::deserialize(d)
}

/// Deserializes a struct from a JSON object only. serde's derived structs also accept an array of their
/// fields in order (`["id", "text"]` as a message), which the protocol does not allow: such a field has
/// the wrong type. Errors inside the object keep their path.
fn object_only<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    T::deserialize(ObjectOnly(d))
}

/// `chat_versions`: each entry must be an object.
fn versions_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<ChatId, ClientVersions>, D::Error> {
    struct Entry(ClientVersions);
    impl<'de> Deserialize<'de> for Entry {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
            object_only(d).map(Entry)
        }
    }
    let map = BTreeMap::<ChatId, Entry>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, Entry(v))| (k, v)).collect())
}

/// A deserializer that reads a struct as a map only (see [`object_only`]).
pub(crate) struct ObjectOnly<D>(pub(crate) D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// An optional non-negative integer, saturating at `u32::MAX` (integers beyond 64 bits arrive as floats).
fn saturating_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<u32>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Option<u32>, E> {
            Ok(Some(u32::try_from(v).unwrap_or(u32::MAX)))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Option<u32>, E> {
            u64::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                .and_then(|v| self.visit_u64(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Option<u32>, E> {
            if v >= u64::MAX as f64 && v.is_finite() {
                Ok(Some(u32::MAX))
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(V)
}
