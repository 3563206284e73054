//! Fuzz target `decode_payloads`: structured input. The fuzzer picks one of the client message types and
//! builds its payload as a JSON tree whose keys and strings favour the protocol's own field names, ids and
//! values, so that most frames get past the envelope and deep into each payload decoder. Checks: `decode`
//! never panics; a payload that decodes re-encodes to a frame that decodes to the same message; every
//! offline change is validated by `OfflineChange::parse` without panicking, and a valid change round trips.
#![no_main]

use chatsync_protocol::{decode, ClientMessage, OfflineChange};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Number, Value};

/// Field names of every client payload (and of offline changes and Tiptap drafts).
const KEYS: &[&str] = &[
    "chat_id",
    "chatId",
    "chat_versions",
    "immediate_view_chat_id",
    "messages_v",
    "title_v",
    "draft_v",
    "draft_json",
    "new_title",
    "message",
    "message_id",
    "content",
    "timestamp",
    "temp_id",
    "sender",
    "after_seq",
    "limit",
    "chat_ids",
    "changes",
    "change_id",
    "type",
    "value",
    "version_before_edit",
    "text",
    "title",
    "draft",
    "delete_draft",
];

/// Strings that are valid ids, types or timestamps, or close to the edges.
const STRINGS: &[&str] = &[
    "c1",
    "chat-1_A",
    "m.1",
    "m:2",
    "",
    " ",
    "a b",
    "é",
    "title",
    "draft",
    "delete_draft",
    "doc",
    "text",
    "2026-11-29T10:00:00Z",
    "x\u{0}y",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Known(u8),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    kind: u8,
    request_id: Option<String>,
    payload: Vec<(Key, Json)>,
}

fn key(k: &Key) -> String {
    match k {
        Key::Known(i) => KEYS[*i as usize % KEYS.len()].to_owned(),
        Key::Other(s) => s.clone(),
    }
}

fn object(fields: &[(Key, Json)], depth: u32) -> Map<String, Value> {
    fields.iter().map(|(k, v)| (key(k), value(v, depth + 1))).collect()
}

fn value(j: &Json, depth: u32) -> Value {
    if depth > 24 {
        return Value::Null;
    }
    match j {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Int(i) => Value::from(*i),
        Json::Uint(u) => Value::from(*u),
        Json::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Json::Known(i) => Value::String(STRINGS[*i as usize % STRINGS.len()].to_owned()),
        Json::Str(s) => Value::String(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(|x| value(x, depth + 1)).collect()),
        Json::Object(fields) => Value::Object(object(fields, depth)),
    }
}

fuzz_target!(|input: Input| {
    let kind = ClientMessage::TYPES[input.kind as usize % ClientMessage::TYPES.len()];
    let mut frame = Map::new();
    frame.insert("type".into(), Value::String(kind.into()));
    frame.insert("payload".into(), Value::Object(object(&input.payload, 0)));
    if let Some(r) = &input.request_id {
        frame.insert("request_id".into(), Value::String(r.clone()));
    }
    let text = serde_json::to_string(&frame).expect("a JSON map serializes");
    let decoded = match decode(&text) {
        Ok(d) => d,
        Err(e) => {
            // A known type can only fail on its payload or its request id.
            assert!(e.message_type.is_none() || e.message_type == Some(kind), "{e:?}");
            return;
        }
    };
    assert_eq!(decoded.message.wire_type(), kind);
    let again = decoded.message.encode(decoded.request_id.as_ref().map(|r| r.as_str()));
    assert_eq!(decode(&again).as_ref(), Ok(&decoded), "round trip of {text}");
    if let ClientMessage::SyncOfflineChanges(p) = &decoded.message {
        for raw in &p.changes {
            if let Ok(change) = OfflineChange::parse(raw) {
                let back = serde_json::to_value(&change).expect("a change serializes");
                assert_eq!(OfflineChange::parse(&back), Ok(change));
            }
        }
    }
});
