//! The machine-readable specs, generated from the wire types (feature `schema`): `docs/asyncapi.json`
//! (AsyncAPI 3.0, the WebSocket protocol of `docs/PROTOCOL.md`) and `docs/openapi.json` (OpenAPI 3.1, the
//! application-backend API of `docs/SERVER_API.md`).
//!
//! The message schemas come from `schemars` derives on the same types serde reads and writes, so they
//! cannot drift from the code: client messages in serde's *deserialize* contract (what the server
//! accepts), server messages in its *serialize* contract (what the server sends). What no type says
//! (replies, close codes, HTTP paths and statuses) is in the tables below, one line per item.
//!
//! `cargo run -p chatsync-protocol --features schema --bin specs` rewrites the files;
//! `crates/protocol/tests/specs.rs` fails when they are out of date.

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

/// The files under `docs/` and their contents (pretty JSON, newline-terminated).
pub fn files() -> Vec<(&'static str, String)> {
    let pretty = |v: Value| serde_json::to_string_pretty(&v).expect("a Value always serializes") + "\n";
    vec![("asyncapi.json", pretty(asyncapi())), ("openapi.json", pretty(openapi()))]
}

/// A self-contained JSON Schema (draft 07) of one message of an AsyncAPI document made by [`asyncapi`]:
/// the message's envelope schema with the document's `components` beside it, so that its `$ref`s
/// resolve. `side` is `client` or `server`. `None` when the document has no such message.
pub fn message_schema(asyncapi: &Value, side: &str, wire_type: &str) -> Option<Value> {
    let message = asyncapi.get("components")?.get("messages")?.get(format!("{side}.{wire_type}"))?;
    let mut schema = message.get("payload")?.clone();
    schema["components"] = asyncapi["components"].clone();
    schema["$schema"] = json!("http://json-schema.org/draft-07/schema#");
    Some(schema)
}

/// The command that rewrites the files.
pub const REGENERATE: &str = "cargo run -p chatsync-protocol --features schema --bin specs";

// ---------------------------------------------------------------------------------------------------------
// Tables: what the types do not say. Adding a message or an endpoint is one line here.
// ---------------------------------------------------------------------------------------------------------

/// The replies SELF gets to each client message type (in order of likelihood). Every client message may
/// also be answered with `error` (`initial_sync_request`: `initial_sync_error`), added automatically.
/// Lines for types the enum does not have (yet) are skipped.
pub const REPLIES: &[(&str, &[&str])] = &[
    ("ping", &["pong"]),
    ("initial_sync_request", &["initial_sync_response"]),
    ("update_draft", &["draft_update_confirmed"]),
    ("delete_draft", &["draft_delete_receipt"]),
    ("update_title", &["chat_title_updated"]),
    ("chat_message_added", &["chat_message_confirmed"]),
    ("get_chat_messages", &["chat_messages_response"]),
    ("request_chat_content_batch", &["chat_content_batch_response"]),
    ("delete_chat", &["chat_deleted"]),
    ("sync_offline_changes", &["offline_sync_complete", "chat_title_updated", "chat_draft_updated", "draft_deleted"]),
    ("request_cache_status", &["cache_status_response"]),
    ("mark_read", &["chat_read_updated"]),
    ("cancel_stream", &["stream_cancelled"]),
];

/// Every close code the server sends on `/v1/ws` with its reason and when (PROTOCOL.md sections 1, 2, 4
/// and 8).
pub const CLOSE_CODES: &[(u16, &str, &str)] = &[
    (1001, "Heartbeat timeout", "nothing (frame or Pong) arrived for the heartbeat timeout (default 60 s)"),
    (1001, "Server shutting down", "the server is stopping, after in-flight requests finish"),
    (1002, "Protocol error", "broken WebSocket framing"),
    (1003, "Binary frames are not supported", "the client sent a binary frame"),
    (1007, "Invalid UTF-8", "a text frame that is not valid UTF-8"),
    (1008, "Authentication required", "no token"),
    (1008, "Invalid session", "unknown, expired or revoked token; an invalid JWT"),
    (1008, "Device mismatch, 2FA required", "the session is bound to another device; the user has 2FA"),
    (1008, "Device mismatch", "the session is bound to another device"),
    (1008, "Invalid device id", "an X-Device-Id / device_id that is not 1-128 printable ASCII characters"),
    (1008, "Session revoked", "the session was revoked while connected"),
    (1008, "Token expired", "a JWT connection token expired while connected"),
    (1008, "Rate limit exceeded", "more than 10x the burst dropped within 10 s"),
    (1009, "Message too big", "a frame larger than max_frame_bytes"),
    (1011, "Authentication error", "backend failure during authentication"),
    (1011, "Internal error", "an unexpected failure of the server on this connection"),
    (1013, "Server overloaded", "the node is at its connection limit"),
    (1013, "Too many connections", "the user has the per-user maximum of open connections"),
    (1013, "Slow consumer", "the connection's outbound queue exceeded its bound; reconnect and re-sync"),
];

/// Makes the schema of a request or response body (`body!(T)` in [`endpoints`]).
pub type BodySchema = fn(&mut SchemaGenerator) -> schemars::Schema;

/// One endpoint of the server API (SERVER_API.md), paths relative to `/v1/api`.
pub struct Endpoint {
    /// `get`, `post`, `delete`, …
    pub method: &'static str,
    /// With `{param}` segments.
    pub path: &'static str,
    /// Unique operation id.
    pub id: &'static str,
    /// One line.
    pub summary: &'static str,
    /// The request body's schema, if any (deserialize contract).
    pub request: Option<BodySchema>,
    /// Success statuses and their bodies (serialize contract; `None` = no body).
    pub success: Vec<(u16, Option<BodySchema>)>,
    /// Error statuses this endpoint can produce besides 401, 429, 500 and 503 (which every endpoint can).
    pub errors: &'static [u16],
}

/// `Some(schema of T)`, for the endpoint table.
macro_rules! body {
    ($t:ty) => {
        Some((|g: &mut SchemaGenerator| g.subschema_for::<$t>()) as BodySchema)
    };
}

/// Every endpoint of the server API that has types in [`crate::api`]; add one entry per endpoint.
pub fn endpoints() -> Vec<Endpoint> {
    use crate::api::*;
    #[rustfmt::skip]
    fn e(
        method: &'static str, path: &'static str, id: &'static str, summary: &'static str,
        request: Option<BodySchema>, success: Vec<(u16, Option<BodySchema>)>, errors: &'static [u16],
    ) -> Endpoint {
        Endpoint { method, path, id, summary, request, success, errors }
    }
    vec![
        e(
            "post",
            "/users",
            "createUser",
            "Creates a user.",
            body!(CreateUser),
            vec![(201, body!(UserCreated))],
            &[409],
        ),
        e(
            "get",
            "/users/{user_id}",
            "getUser",
            "A user, with chat and device counts.",
            None,
            vec![(200, body!(UserInfo))],
            &[404],
        ),
        e(
            "post",
            "/users/{user_id}/sessions",
            "createSession",
            "Issues a session token for a device (shown only in this response).",
            body!(CreateSession),
            vec![(201, body!(SessionCreated))],
            &[404],
        ),
        e(
            "delete",
            "/sessions/{session_id}",
            "revokeSession",
            "Revokes a session; its open sockets close with 1008 `Session revoked` on every node.",
            None,
            vec![(204, None)],
            &[404],
        ),
        e(
            "get",
            "/users/{user_id}/devices",
            "listDevices",
            "The user's devices, most recently seen first.",
            None,
            vec![(200, body!(DeviceList))],
            &[404],
        ),
        e(
            "delete",
            "/users/{user_id}/devices/{device_hash}",
            "revokeDevice",
            "Revokes every session bound to the device (its sockets close as for a revoked session).",
            None,
            vec![(204, None)],
            &[404],
        ),
        e(
            "post",
            "/users/{user_id}/chats/{chat_id}/messages",
            "postMessage",
            "Puts a message from another sender into a chat (created when new); ALL of the user's connections \
             receive `chat_message_added`. A repeated `message_id` is 200 with `duplicate: true`.",
            body!(PostMessage),
            vec![(201, body!(MessagePosted)), (200, body!(MessagePosted))],
            &[404, 422],
        ),
        e(
            "post",
            "/users/{user_id}/chats/{chat_id}/streams",
            "startStream",
            "Opens a stream (a reply being written); ALL of the user's connections receive `stream_started`. \
             Starting the same stream again is 200.",
            body!(StartStream),
            vec![(201, body!(StreamOpened)), (200, body!(StreamOpened))],
            &[404, 409, 422],
        ),
        e(
            "post",
            "/users/{user_id}/chats/{chat_id}/streams/{stream_id}/chunks",
            "postStreamChunk",
            "Appends chunk `seq` (1, 2, …); ALL receive `stream_chunk`. A repeated `seq` is 200 and ignored; a gap \
             or a stream that is not open is 409.",
            body!(PostChunk),
            vec![(202, body!(crate::Empty)), (200, body!(crate::Empty))],
            &[404, 409, 422],
        ),
        e(
            "post",
            "/users/{user_id}/chats/{chat_id}/streams/{stream_id}/complete",
            "completeStream",
            "Stores the stream as a message (as `POST …/messages`), then ALL receive `stream_completed`.",
            body!(CompleteStream),
            vec![(201, body!(MessagePosted)), (200, body!(MessagePosted))],
            &[404, 409, 422],
        ),
        e(
            "delete",
            "/users/{user_id}/chats/{chat_id}/streams/{stream_id}",
            "abortStream",
            "Aborts an open stream; ALL receive `stream_cancelled` with reason `aborted`.",
            None,
            vec![(204, None)],
            &[404, 409],
        ),
    ]
}

/// One OpenAPI link: from operation, its status, to operation, `(parameter, runtime expression)`s.
pub type Link = (&'static str, u16, &'static str, &'static [(&'static str, &'static str)]);

/// The stream a start answered with, in the chat of its path.
const STARTED_STREAM: &[(&str, &str)] = &[
    ("user_id", "$request.path.user_id"),
    ("chat_id", "$request.path.chat_id"),
    ("stream_id", "$response.body#/stream_id"),
];

/// The stream of the request's own path.
const SAME_STREAM: &[(&str, &str)] = &[
    ("user_id", "$request.path.user_id"),
    ("chat_id", "$request.path.chat_id"),
    ("stream_id", "$request.path.stream_id"),
];

/// OpenAPI links (what a success answer gives the next call, for clients and stateful testers such as
/// schemathesis): from operation, its status, to operation, and each parameter's runtime expression.
pub const LINKS: &[Link] = &[
    ("createUser", 201, "getUser", &[("user_id", "$response.body#/user_id")]),
    ("createUser", 201, "createSession", &[("user_id", "$response.body#/user_id")]),
    ("createUser", 201, "listDevices", &[("user_id", "$response.body#/user_id")]),
    ("createSession", 201, "revokeSession", &[("session_id", "$response.body#/session_id")]),
    ("createSession", 201, "listDevices", &[("user_id", "$request.path.user_id")]),
    (
        "listDevices",
        200,
        "revokeDevice",
        &[("user_id", "$request.path.user_id"), ("device_hash", "$response.body#/devices/0/device_hash")],
    ),
    ("postMessage", 201, "getUser", &[("user_id", "$request.path.user_id")]),
    ("startStream", 201, "postStreamChunk", STARTED_STREAM),
    ("startStream", 201, "completeStream", STARTED_STREAM),
    ("startStream", 201, "abortStream", STARTED_STREAM),
    ("postStreamChunk", 202, "completeStream", SAME_STREAM),
];

/// The codes an error status carries.
const STATUS_TEXT: &[(u16, &str)] = &[
    (400, "`invalid_json` or `invalid_payload` (`field` names the offending field or path segment)"),
    (401, "`unauthorized`: missing or unknown API key"),
    (404, "`not_found`"),
    (409, "`conflict`"),
    (413, "`payload_too_large`: the body is larger than 256 KiB"),
    (422, "`limit_exceeded`"),
    (429, "`rate_limited`; retry after `Retry-After` seconds"),
    (500, "`internal`"),
    (503, "`unavailable`: retry later"),
];

// ---------------------------------------------------------------------------------------------------------
// Schema generation in both serde contracts, sharing one set of components.
// ---------------------------------------------------------------------------------------------------------

/// Two generators (deserialize contract for what the server reads, serialize for what it writes) whose
/// definitions end up in one `components/schemas`.
struct Gen {
    input: SchemaGenerator,
    output: SchemaGenerator,
}

impl Gen {
    fn new(settings: SchemaSettings) -> Gen {
        let settings = settings.with(|s| s.definitions_path = "#/components/schemas/".into());
        Gen {
            input: settings.clone().for_deserialize().into_generator(),
            output: settings.for_serialize().into_generator(),
        }
    }

    fn input<T: JsonSchema>(&mut self) -> Value {
        self.input.subschema_for::<T>().to_value()
    }

    fn output<T: JsonSchema>(&mut self) -> Value {
        self.output.subschema_for::<T>().to_value()
    }

    /// The definition a `$ref` from this generator points at.
    fn definition(&self, reference: &Value) -> Option<&Value> {
        let name = reference.get("$ref")?.as_str()?.strip_prefix("#/components/schemas/")?;
        self.input.definitions().get(name).or_else(|| self.output.definitions().get(name))
    }

    /// Both contracts' definitions in one map. A type whose two schemas differ gets the output one under
    /// its name and the input one as `<name>Input`, with the input side's references rewritten.
    fn into_definitions(mut self) -> Map<String, Value> {
        let mut input = self.input.take_definitions(true);
        let output = self.output.take_definitions(true);
        let clashes: Vec<String> =
            input.iter().filter(|(k, v)| output.get(*k).is_some_and(|o| o != *v)).map(|(k, _)| k.clone()).collect();
        for name in &clashes {
            let v = input.remove(name).expect("listed from the map");
            input.insert(format!("{name}Input"), v);
        }
        let mut input = Value::Object(input);
        for name in &clashes {
            rename_refs(&mut input, name, &format!("{name}Input"));
        }
        let Value::Object(mut all) = input else { unreachable!("built as an object") };
        all.extend(output);
        all
    }
}

fn rename_refs(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get_mut("$ref") {
                if r.strip_prefix("#/components/schemas/") == Some(from) {
                    *r = format!("#/components/schemas/{to}");
                }
            }
            m.values_mut().for_each(|v| rename_refs(v, from, to));
        }
        Value::Array(a) => a.iter_mut().for_each(|v| rename_refs(v, from, to)),
        _ => {}
    }
}

/// One variant of an adjacently tagged message enum, read back from its schema.
struct Variant {
    wire_type: String,
    description: String,
    payload: Value,
}

/// The variants of a `#[serde(tag = "type", content = "payload")]` enum, from its schema (so a new
/// variant appears in the specs without any table change).
fn variants(gen: &Gen, enum_ref: &Value) -> Vec<Variant> {
    let def = gen.definition(enum_ref).expect("the enum's schema is a definition");
    let one_of = def["oneOf"].as_array().expect("a tagged enum is a oneOf");
    one_of
        .iter()
        .map(|v| Variant {
            wire_type: v["properties"]["type"]["const"].as_str().expect("each variant has a const type").to_owned(),
            description: v["description"].as_str().unwrap_or_default().to_owned(),
            payload: v["properties"]["payload"].clone(),
        })
        .collect()
}

fn has_required(gen: &Gen, schema: &Value) -> bool {
    let def = gen.definition(schema).unwrap_or(schema);
    def.get("required").and_then(Value::as_array).is_some_and(|r| !r.is_empty())
}

// ---------------------------------------------------------------------------------------------------------
// AsyncAPI 3.0
// ---------------------------------------------------------------------------------------------------------

/// The AsyncAPI 3.0 document of the WebSocket protocol. It describes the chatsync server: it
/// *receives* client messages and *sends* server messages on the channel `/v1/ws`.
pub fn asyncapi() -> Value {
    // AsyncAPI 3.0 schemas are JSON Schema draft 07 (plus extensions).
    let mut gen = Gen::new(SchemaSettings::draft07());
    let client_enum = gen.input::<crate::ClientMessage>();
    let server_enum = gen.output::<crate::ServerMessage>();
    let request_id = gen.input::<crate::RequestId>();
    let client = variants(&gen, &client_enum);
    let server = variants(&gen, &server_enum);

    let mut messages = Map::new();
    let mut channel_messages = Map::new();
    let mut add = |side: &str, v: &Variant, payload_required: bool, sent_by: &str| {
        let key = format!("{side}.{}", v.wire_type);
        let mut required = vec![json!("type")];
        if payload_required {
            required.push(json!("payload"));
        }
        let envelope = json!({
            "type": "object",
            "properties": {
                "type": {"const": v.wire_type},
                "payload": v.payload,
                "request_id": request_id,
            },
            "required": required,
        });
        let summary = if v.description.is_empty() { format!("`{}`", v.wire_type) } else { v.description.clone() };
        messages.insert(
            key.clone(),
            json!({
                "name": v.wire_type,
                "title": format!("{} ({sent_by})", v.wire_type),
                "summary": summary,
                "contentType": "application/json",
                "correlationId": {"$ref": "#/components/correlationIds/request_id"},
                "payload": envelope,
            }),
        );
        channel_messages.insert(key.clone(), json!({"$ref": format!("#/components/messages/{key}")}));
    };
    for v in &client {
        // `payload` may be omitted when it would be `{}` (PROTOCOL.md section 3).
        add("client", v, has_required(&gen, &v.payload), "client to server");
    }
    for v in &server {
        add("server", v, true, "server to client");
    }

    let mut operations = Map::new();
    for v in &client {
        let mut replies: Vec<&str> =
            REPLIES.iter().find(|(t, _)| *t == v.wire_type).map(|(_, r)| r.to_vec()).unwrap_or_default();
        replies.push(if v.wire_type == "initial_sync_request" { "initial_sync_error" } else { "error" });
        let reply_refs: Vec<Value> = replies
            .iter()
            .filter(|r| server.iter().any(|s| s.wire_type == **r))
            .map(|r| json!({"$ref": format!("#/channels/ws/messages/server.{r}")}))
            .collect();
        operations.insert(
            format!("receive.{}", v.wire_type),
            json!({
                "action": "receive",
                "channel": {"$ref": "#/channels/ws"},
                "summary": v.description,
                "messages": [{"$ref": format!("#/channels/ws/messages/client.{}", v.wire_type)}],
                "reply": {"channel": {"$ref": "#/channels/ws"}, "messages": reply_refs},
            }),
        );
    }
    operations.insert(
        "send.events".into(),
        json!({
            "action": "send",
            "channel": {"$ref": "#/channels/ws"},
            "summary": "Every server message: replies to SELF (with the request's `request_id`) and broadcasts \
                        to OTHERS or ALL of the user's connections.",
            "messages": server
                .iter()
                .map(|v| json!({"$ref": format!("#/channels/ws/messages/server.{}", v.wire_type)}))
                .collect::<Vec<_>>(),
        }),
    );

    let close_table: String = CLOSE_CODES.iter().map(|(c, r, w)| format!("| {c} | `{r}` | {w} |\n")).collect();
    let channel_description = format!(
        "One WebSocket per connection; text frames only, one JSON object per frame (`docs/PROTOCOL.md`). \
         Client frames are `{{\"type\",\"payload\",\"request_id\"?}}`; server frames `{{\"type\",\"payload\"}}` \
         plus `request_id` on a direct reply and on SELF's copy of a broadcast it caused. Authentication \
         happens during the upgrade (token from the cookie `auth_refresh_token`, then `Authorization: Bearer`, \
         then the query parameter `token`; device id from `X-Device-Id` or `device_id`); on failure the \
         upgrade completes and the server closes at once with the code below.\n\n\
         | close code | reason | when |\n|---|---|---|\n{close_table}"
    );
    let close_codes: Vec<Value> =
        CLOSE_CODES.iter().map(|(c, r, w)| json!({"code": c, "reason": r, "when": w})).collect();

    let schemas = gen.into_definitions();

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "chatsync WebSocket protocol",
            "version": crate::PROTOCOL_NAME,
            "description": "The real-time sync protocol between a user's devices and chatsync, generated from the \
                            Rust wire types (`crates/protocol`). The document describes the server: it receives \
                            client messages and sends server messages. Normative text: docs/PROTOCOL.md.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:8080",
                "protocol": "ws",
                "description": "`chatsync serve` with its defaults (use `wss` behind TLS).",
                "security": [
                    {"$ref": "#/components/securitySchemes/bearer"},
                    {"$ref": "#/components/securitySchemes/queryToken"},
                    {"$ref": "#/components/securitySchemes/cookie"},
                ],
            },
        },
        "channels": {
            "ws": {
                "address": "/v1/ws",
                "title": "The chatsync WebSocket",
                "description": channel_description,
                "messages": channel_messages,
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "headers": {
                            "type": "object",
                            "properties": {
                                "Authorization": {"type": "string", "description": "`Bearer <token>`: a session token (`cs_…`) or, when configured, a JWT."},
                                "X-Device-Id": {"type": "string", "minLength": 1, "maxLength": 128, "description": "The device id; its hash is the device fingerprint. Without it, User-Agent and Accept-Language are hashed."},
                                "Origin": {"type": "string", "description": "Checked against --allowed-origins when configured; required for cookie authentication."},
                            },
                        },
                        "query": {
                            "type": "object",
                            "properties": {
                                "token": {"type": "string", "description": "The token, for clients that can set no header (browsers)."},
                                "device_id": {"type": "string", "minLength": 1, "maxLength": 128, "description": "The device id, for clients that can set no header."},
                            },
                        },
                        "bindingVersion": "0.1.0",
                    },
                },
                "x-close-codes": close_codes,
            },
        },
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "correlationIds": {
                "request_id": {
                    "description": "A client's `request_id` (1-64 printable ASCII characters) is echoed on the reply \
                                    (every part of a split reply) and on SELF's copy of the broadcasts it caused.",
                    "location": "$message.payload#/request_id",
                },
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <token>`: a session token (`chatsync sessions issue`, `POST /v1/api/users/{user_id}/sessions`) or a JWT when a JWT key is configured (SERVER_API.md section 6). API keys are never accepted here.",
                },
                "queryToken": {
                    "type": "httpApiKey",
                    "in": "query",
                    "name": "token",
                    "description": "The same token as a query parameter (never logged).",
                },
                "cookie": {
                    "type": "httpApiKey",
                    "in": "cookie",
                    "name": "auth_refresh_token",
                    "description": "The same token as a cookie; accepted only with an `Origin` from --allowed-origins (HTTP 403 otherwise).",
                },
            },
        },
    })
}

// ---------------------------------------------------------------------------------------------------------
// OpenAPI 3.1
// ---------------------------------------------------------------------------------------------------------

/// The OpenAPI 3.1 document of the server API (`/v1/api`).
pub fn openapi() -> Value {
    let mut gen = Gen::new(SchemaSettings::draft2020_12());
    let error_body = gen.output::<crate::api::ApiErrorBody>();
    let mut paths = Map::new();
    for e in endpoints() {
        let mut op = Map::new();
        op.insert("operationId".into(), json!(e.id));
        op.insert("summary".into(), json!(e.summary));
        let params: Vec<Value> = path_params(e.path)
            .map(|p| {
                json!({
                    "name": p,
                    "in": "path",
                    "required": true,
                    "schema": path_param_schema(p),
                })
            })
            .collect();
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(request) = e.request {
            let schema = request(&mut gen.input).to_value();
            // An empty body counts as `{}` (SERVER_API.md section 7, "Bodies"): it may be left out
            // where no field is required.
            let required = has_required(&gen, &schema);
            op.insert(
                "requestBody".into(),
                json!({"required": required, "content": {"application/json": {"schema": schema}}}),
            );
        }
        let mut responses = Map::new();
        for (status, body) in &e.success {
            let mut r = json!({"description": success_text(*status)});
            if let Some(body) = body {
                r["content"] = json!({"application/json": {"schema": body(&mut gen.output)}});
            }
            let links: Map<String, Value> = LINKS
                .iter()
                .filter(|(from, s, _, _)| *from == e.id && s == status)
                .map(|(_, _, to, params)| {
                    let params: Map<String, Value> = params.iter().map(|(p, x)| (p.to_string(), json!(x))).collect();
                    (to.to_string(), json!({"operationId": to, "parameters": params}))
                })
                .collect();
            if !links.is_empty() {
                r["links"] = Value::Object(links);
            }
            responses.insert(status.to_string(), r);
        }
        let mut errors: Vec<u16> = e.errors.to_vec();
        if e.request.is_some() {
            errors.extend([400, 413]);
        }
        if e.path.contains('{') {
            errors.push(400);
        }
        errors.extend([401, 429, 500, 503]);
        errors.sort_unstable();
        errors.dedup();
        for status in errors {
            responses.insert(status.to_string(), json!({"$ref": format!("#/components/responses/E{status}")}));
        }
        op.insert("responses".into(), Value::Object(responses));
        let item = paths.entry(e.path.to_owned()).or_insert_with(|| json!({}));
        item[e.method] = Value::Object(op);
    }

    let mut responses = Map::new();
    for (status, text) in STATUS_TEXT {
        let mut r = json!({
            "description": text,
            "content": {"application/json": {"schema": error_body}},
        });
        if *status == 429 {
            r["headers"] = json!({"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer", "minimum": 0}}});
        }
        responses.insert(format!("E{status}"), r);
    }

    let schemas = gen.into_definitions();
    json!({
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "chatsync server API",
            "version": "1",
            "description": "How an application backend talks to chatsync (docs/SERVER_API.md), generated from the \
                            Rust request and response types (`crates/protocol/src/api.rs`). Every write is \
                            durable before its 2xx response. Request bodies are at most 256 KiB; unknown fields \
                            are `invalid_payload`.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:8080/v1/api", "description": "`chatsync serve` with its defaults"}],
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <api key>` (`chatsync api-keys create`). Session tokens are never accepted here.",
                },
            },
        },
    })
}

fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

/// The schema of a path parameter (the checks of the server's `api::path_*`).
fn path_param_schema(name: &str) -> Value {
    match name {
        "user_id" => json!({"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_.@-]+$"}),
        "chat_id" => json!({"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_-]+$"}),
        "stream_id" => json!({"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9_.:-]+$"}),
        "session_id" => json!({"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9]+$"}),
        "device_hash" => json!({"type": "string", "pattern": "^[0-9a-f]{64}$"}),
        _ => json!({"type": "string"}),
    }
}

fn success_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No content",
        _ => "Success",
    }
}
