//! The checked-in specs (`docs/asyncapi.json`, `docs/openapi.json`) are what the wire types generate, and
//! they hold together: every `$ref` resolves, the required top-level members are there, every protocol
//! message type and every API endpoint is present. (Messages validating against these schemas:
//! `tests/roundtrip.rs` and `tests/props.rs`.)

use chatsync_protocol::specs::{self, asyncapi, openapi, REGENERATE};
use chatsync_protocol::ClientMessage;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Every server message type of PROTOCOL.md implemented so far (more may exist; none may be missing).
const SERVER_TYPES: &[&str] = &[
    "connected",
    "pong",
    "error",
    "initial_sync_response",
    "initial_sync_error",
    "draft_update_confirmed",
    "chat_draft_updated",
    "draft_delete_receipt",
    "draft_deleted",
    "chat_title_updated",
    "chat_message_confirmed",
    "chat_message_added",
    "chat_messages_response",
    "chat_content_batch_response",
    "chat_deleted",
    "offline_sync_complete",
    "cache_status_response",
    "priority_chat_ready",
    "cache_primed",
    "chat_read_updated",
    "stream_started",
    "stream_chunk",
    "stream_completed",
    "stream_cancelled",
];

fn docs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

/// The JSON pointer of the first place where `a` and `b` differ.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, format!("{at}/{k}")),
                _ => Some(format!("{at}/{k}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (p, q))| first_difference(p, q, format!("{at}/{i}")))
        }
        _ if a == b => None,
        _ => Some(if at.is_empty() { "/".into() } else { at }),
    }
}

#[test]
fn checked_in_specs_are_current() {
    for (name, text) in specs::files() {
        let path = docs_dir().join(name);
        let generated: Value = serde_json::from_str(&text).unwrap();
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("docs/{name} cannot be read ({e}): run `{REGENERATE}` to create it"));
        let on_disk: Value = serde_json::from_str(&on_disk)
            .unwrap_or_else(|e| panic!("docs/{name} is not JSON ({e}): run `{REGENERATE}` to rewrite it"));
        if let Some(at) = first_difference(&on_disk, &generated, String::new()) {
            panic!("docs/{name} is out of date (first difference at {at}): run `{REGENERATE}` to update it");
        }
    }
}

/// Resolves a local `$ref` (`#/a/b~1c`) in `doc`.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    doc.pointer(pointer)
}

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_ref_resolves() {
    for (name, doc) in [("asyncapi.json", asyncapi()), ("openapi.json", openapi())] {
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty(), "{name} has no $ref at all");
        for r in all {
            assert!(r.starts_with("#/"), "{name}: {r} is not a local reference");
            assert!(resolve(&doc, &r).is_some(), "{name}: {r} does not resolve");
        }
    }
}

#[test]
fn asyncapi_has_every_message_and_operation() {
    let doc = asyncapi();
    for key in ["asyncapi", "info", "servers", "channels", "operations", "components"] {
        assert!(doc.get(key).is_some(), "asyncapi.json lacks `{key}`");
    }
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["channels"]["ws"]["address"], "/v1/ws");
    let messages = doc["components"]["messages"].as_object().unwrap();
    let channel = doc["channels"]["ws"]["messages"].as_object().unwrap();
    for t in ClientMessage::TYPES {
        let key = format!("client.{t}");
        assert!(messages.contains_key(&key) && channel.contains_key(&key), "asyncapi.json lacks {key}");
        let op = &doc["operations"][format!("receive.{t}")];
        assert_eq!(op["action"], "receive", "asyncapi.json lacks the operation receive.{t}");
        assert!(!op["reply"]["messages"].as_array().unwrap().is_empty(), "receive.{t} has no reply");
        assert_eq!(messages[&key]["payload"]["properties"]["type"]["const"], *t);
    }
    for t in SERVER_TYPES {
        let key = format!("server.{t}");
        assert!(messages.contains_key(&key) && channel.contains_key(&key), "asyncapi.json lacks {key}");
        assert_eq!(messages[&key]["payload"]["properties"]["type"]["const"], *t);
    }
    // AsyncAPI 3: an operation's messages are the channel's.
    for (name, op) in doc["operations"].as_object().unwrap() {
        let mut all = Vec::new();
        refs(&op["messages"], &mut all);
        refs(&op["reply"], &mut all);
        for r in &all {
            assert!(r == "#/channels/ws" || r.starts_with("#/channels/ws/messages/"), "{name}: {r}");
        }
    }
    let send = doc["operations"]["send.events"]["messages"].as_array().unwrap();
    assert!(send.len() >= SERVER_TYPES.len());
    // The close codes and the authentication.
    let close = doc["channels"]["ws"]["x-close-codes"].as_array().unwrap();
    for (code, reason) in [(1008, "Invalid session"), (1013, "Slow consumer"), (1009, "Message too big")] {
        assert!(close.iter().any(|c| c["code"] == code && c["reason"] == reason), "close code {code} {reason}");
        assert!(doc["channels"]["ws"]["description"].as_str().unwrap().contains(reason));
    }
    for scheme in ["bearer", "queryToken", "cookie"] {
        assert!(doc["components"]["securitySchemes"].get(scheme).is_some(), "security scheme {scheme}");
    }
}

#[test]
fn openapi_operations_are_complete() {
    let doc = openapi();
    for key in ["openapi", "info", "servers", "paths", "components", "security"] {
        assert!(doc.get(key).is_some(), "openapi.json lacks `{key}`");
    }
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["components"]["securitySchemes"]["apiKey"]["scheme"], "bearer");
    let error = &doc["components"]["responses"]["E404"]["content"]["application/json"]["schema"];
    assert!(resolve(&doc, error["$ref"].as_str().unwrap()).is_some());
    let mut ids = BTreeSet::new();
    let endpoints = specs::endpoints();
    for e in &endpoints {
        let op = &doc["paths"][e.path][e.method];
        assert!(op.is_object(), "openapi.json lacks {} {}", e.method, e.path);
        assert!(ids.insert(op["operationId"].as_str().unwrap().to_owned()), "operationId {} repeated", e.id);
        let responses = op["responses"].as_object().unwrap();
        assert!(responses.keys().any(|s| s.starts_with('2')), "{} has no success response", e.id);
        assert!(responses.contains_key("401"), "{} lacks 401", e.id);
        let declared: BTreeSet<&str> = op["parameters"]
            .as_array()
            .map(|p| p.iter().map(|p| p["name"].as_str().unwrap()).collect())
            .unwrap_or_default();
        let in_path: BTreeSet<&str> =
            e.path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
        assert_eq!(declared, in_path, "{}: path parameters", e.id);
        if e.request.is_some() {
            assert!(op["requestBody"]["content"]["application/json"]["schema"].is_object(), "{}: body", e.id);
        }
    }
    let operations: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(operations, endpoints.len());
}

/// Every OpenAPI link (`specs::LINKS`) is on a success response that exists and names an operation that
/// exists, with exactly that operation's path parameters.
#[test]
fn openapi_links_name_real_operations_and_all_their_parameters() {
    let doc = openapi();
    let endpoints = specs::endpoints();
    for (from, status, to, params) in specs::LINKS {
        let source = endpoints.iter().find(|e| e.id == *from).unwrap_or_else(|| panic!("link from unknown {from}"));
        let target = endpoints.iter().find(|e| e.id == *to).unwrap_or_else(|| panic!("link to unknown {to}"));
        assert!(source.success.iter().any(|(s, _)| s == status), "{from} has no {status}");
        let link = &doc["paths"][source.path][source.method]["responses"][status.to_string()]["links"][*to];
        assert_eq!(link["operationId"], *to, "{from} {status} -> {to}");
        let named: BTreeSet<&str> = params.iter().map(|(p, _)| *p).collect();
        let in_path: BTreeSet<&str> =
            target.path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
        assert_eq!(named, in_path, "{from} {status} -> {to}: parameters");
    }
}
