//! Round trips of every client and server message, and the error classification of `decode`.

use chatsync_protocol::*;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

fn chat(id: &str) -> ChatId {
    ChatId::new(id).unwrap()
}

fn msg_id(id: &str) -> MessageId {
    MessageId::new(id).unwrap()
}

fn doc() -> Map<String, Value> {
    json!({"type": "doc", "content": [{"type": "paragraph", "content": [{"type": "text", "text": "hi"}]}]})
        .as_object()
        .unwrap()
        .clone()
}

fn client_samples() -> Vec<ClientMessage> {
    let mut versions = BTreeMap::new();
    versions.insert(chat("c1"), ClientVersions { messages_v: Some(3), title_v: None, draft_v: Some(-1) });
    vec![
        ClientMessage::Ping(Empty {}),
        ClientMessage::InitialSyncRequest(InitialSyncRequest {
            chat_versions: versions,
            immediate_view_chat_id: Some(chat("c1")),
        }),
        ClientMessage::InitialSyncRequest(InitialSyncRequest {
            chat_versions: BTreeMap::new(),
            immediate_view_chat_id: None,
        }),
        ClientMessage::UpdateDraft(UpdateDraft { chat_id: chat("c1"), draft_json: Some(doc()) }),
        ClientMessage::UpdateDraft(UpdateDraft { chat_id: chat("c1"), draft_json: None }),
        ClientMessage::DeleteDraft(DeleteDraft { chat_id: chat("c1") }),
        ClientMessage::UpdateTitle(UpdateTitle { chat_id: chat("c1"), new_title: "".into() }),
        ClientMessage::ChatMessageAdded(ChatMessageAdded {
            chat_id: chat("c1"),
            message: NewMessage {
                message_id: msg_id("m.1"),
                content: MessageContent::Text("hello".into()),
                timestamp: Some(ClientTimestamp::Unix(1_700_000_000.5)),
                temp_id: Some(TempId::Text("t1".into())),
            },
        }),
        ClientMessage::ChatMessageAdded(ChatMessageAdded {
            chat_id: chat("c1"),
            message: NewMessage {
                message_id: msg_id("m:2"),
                content: MessageContent::Json(doc()),
                timestamp: Some(ClientTimestamp::Text("2026-11-29T10:00:00Z".into())),
                temp_id: Some(TempId::Number(7.into())),
            },
        }),
        ClientMessage::GetChatMessages(GetChatMessages { chat_id: chat("c1"), after_seq: 5, limit: Some(10) }),
        ClientMessage::RequestChatContentBatch(RequestChatContentBatch { chat_ids: vec![chat("a"), chat("b")] }),
        ClientMessage::DeleteChat(DeleteChat { chat_id: chat("c1") }),
        ClientMessage::SyncOfflineChanges(SyncOfflineChanges {
            changes: vec![
                json!({"change_id": "x", "chat_id": "c1", "type": "title", "value": "T", "version_before_edit": 0}),
            ],
        }),
        ClientMessage::RequestCacheStatus(Empty {}),
        ClientMessage::CancelStream(CancelStream { chat_id: chat("c1"), stream_id: StreamId::new("s.1").unwrap() }),
        ClientMessage::MarkRead(MarkRead { chat_id: chat("c1"), seq: 7 }),
    ]
}

#[test]
fn every_client_message_round_trips() {
    let samples = client_samples();
    let mut seen: Vec<&str> = samples.iter().map(|m| m.wire_type()).collect();
    seen.sort();
    seen.dedup();
    let mut all = ClientMessage::TYPES.to_vec();
    all.sort();
    assert_eq!(seen, all, "a sample for every client type");

    for m in samples {
        let text = m.encode(Some("r-1"));
        let decoded = decode(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(decoded.message, m, "{text}");
        assert_eq!(decoded.request_id.as_ref().map(|r| r.as_str()), Some("r-1"));
        let bare = decode(&m.encode(None)).unwrap();
        assert_eq!(bare.request_id, None);
    }
}

fn server_samples() -> Vec<ServerMessage> {
    let message = MessageOut {
        message_id: msg_id("m1"),
        seq: 1,
        sender_name: "user".into(),
        content: MessageContent::Text("hi".into()),
        created_at: "2026-11-29T10:00:00Z".into(),
        client_timestamp: None,
    };
    let mut by_chat = BTreeMap::new();
    by_chat.insert(chat("c1"), vec![message.clone()]);
    let mut versions = BTreeMap::new();
    versions.insert(chat("c1"), MessagesVersion { messages_v: 1 });
    vec![
        ServerMessage::Connected(Connected {
            connection_id: "c".into(),
            user_id: "alice".into(),
            device_hash: "ab".into(),
            protocol: PROTOCOL_NAME.into(),
            server_time: "2026-11-29T10:00:00Z".into(),
            limits: Limits::default(),
        }),
        ServerMessage::Pong(Empty {}),
        ServerMessage::Error(ErrorPayload {
            chat_id: Some("c1".into()),
            ..ErrorPayload::new(ErrorCode::NotFound, "Chat not found.")
        }),
        ServerMessage::InitialSyncResponse(InitialSyncResponse {
            chat_ids_to_delete: vec![chat("gone")],
            chats_to_add_or_update: vec![
                ChatUpdate {
                    chat_id: chat("c1"),
                    kind: ChatChangeKind::NewChat,
                    versions: Versions { messages_v: 1, title_v: 2, draft_v: 3 },
                    last_edited_overall_timestamp: 1_700_000_000,
                    unread_count: 0,
                    title: Some("".into()),
                    draft_json: Some(None),
                    messages: Some(vec![message.clone()]),
                },
                ChatUpdate {
                    chat_id: chat("c2"),
                    kind: ChatChangeKind::UpdatedChat,
                    versions: Versions::default(),
                    last_edited_overall_timestamp: 0,
                    unread_count: 2,
                    title: None,
                    draft_json: Some(Some(doc())),
                    messages: None,
                },
            ],
            server_chat_order: vec![chat("c1"), chat("c2")],
            sync_completed_at: "2026-11-29T10:00:00Z".into(),
            active_streams: vec![ActiveStream {
                chat_id: chat("c1"),
                stream_id: StreamId::new("s1").unwrap(),
                message_id: msg_id("m2"),
                sender_name: "assistant".into(),
                meta: doc(),
                seq: 2,
                content_so_far: "Hello, wor".into(),
            }],
            more: true,
        }),
        ServerMessage::InitialSyncError(InitialSyncError { code: ErrorCode::Unavailable, message: "Retry.".into() }),
        ServerMessage::DraftUpdateConfirmed(DraftUpdateConfirmed {
            chat_id: chat("c1"),
            draft_v: 4,
            last_edited_overall_timestamp: 5,
        }),
        ServerMessage::ChatDraftUpdated(ChatDraftUpdated {
            chat_id: chat("c1"),
            data: DraftData { draft_json: None },
            versions: DraftVersion { draft_v: 4 },
            last_edited_overall_timestamp: 5,
        }),
        ServerMessage::DraftDeleteReceipt(DraftDeleteReceipt {
            chat_id: chat("c1"),
            success: false,
            draft_v: None,
            message: Some("Draft not found.".into()),
        }),
        ServerMessage::DraftDeleted(DraftDeleted { chat_id: chat("c1"), draft_v: 2 }),
        ServerMessage::ChatTitleUpdated(ChatTitleUpdated {
            chat_id: chat("c1"),
            data: TitleData { title: "T".into() },
            versions: TitleVersion { title_v: 1 },
        }),
        ServerMessage::ChatMessageConfirmed(ChatMessageConfirmed {
            chat_id: chat("c1"),
            message_id: msg_id("m1"),
            temp_id: Some(TempId::Text("t".into())),
            new_messages_v: 1,
            new_last_edited_overall_timestamp: 5,
            duplicate: true,
        }),
        ServerMessage::ChatMessageAdded(MessageAddedEvent {
            chat_id: chat("c1"),
            message: MessageOut {
                message_id: msg_id("m1"),
                seq: 1,
                sender_name: "user".into(),
                content: MessageContent::Json(doc()),
                created_at: "2026-11-29T10:00:00Z".into(),
                client_timestamp: Some(ClientTimestamp::Unix(3.0)),
            },
            versions: MessagesVersion { messages_v: 1 },
            last_edited_overall_timestamp: 5,
        }),
        ServerMessage::ChatMessagesResponse(ChatMessagesResponse {
            chat_id: chat("c1"),
            messages: vec![message],
            messages_v: 1,
            has_more: false,
        }),
        ServerMessage::ChatContentBatchResponse(ChatContentBatchResponse {
            messages_by_chat_id: by_chat,
            versions_by_chat_id: versions,
            not_found: vec![chat("x")],
            more: false,
        }),
        ServerMessage::ChatDeleted(ChatDeleted { chat_id: chat("c1"), tombstone: true }),
        ServerMessage::OfflineSyncComplete(OfflineSyncComplete {
            processed: 1,
            conflicts: 1,
            errors: 1,
            results: vec![
                OfflineResult {
                    change_id: Some("a".into()),
                    chat_id: Some("c1".into()),
                    kind: Some(OfflineChangeType::Title),
                    status: OfflineStatus::Applied,
                    code: None,
                    versions: Some(Versions::default()),
                },
                OfflineResult {
                    change_id: None,
                    chat_id: None,
                    kind: None,
                    status: OfflineStatus::Error,
                    code: Some(ErrorCode::InvalidPayload),
                    versions: None,
                },
            ],
        }),
        ServerMessage::CacheStatusResponse(CacheStatusResponse { is_primed: true }),
        ServerMessage::PriorityChatReady(PriorityChatReady { chat_id: chat("c1") }),
        ServerMessage::CachePrimed(CachePrimed { status: "full_sync_ready".into() }),
        ServerMessage::StreamStarted(StreamStarted {
            chat_id: chat("c1"),
            stream_id: StreamId::new("s1").unwrap(),
            message_id: msg_id("m2"),
            sender_name: "assistant".into(),
            meta: Map::new(),
        }),
        ServerMessage::StreamChunk(StreamChunk {
            chat_id: chat("c1"),
            stream_id: StreamId::new("s1").unwrap(),
            seq: 1,
            delta: "Hel\"lo".into(),
        }),
        ServerMessage::StreamCompleted(StreamCompleted {
            chat_id: chat("c1"),
            stream_id: StreamId::new("s1").unwrap(),
            message_id: msg_id("m2"),
            seq: 4,
            messages_v: 4,
        }),
        ServerMessage::StreamCancelled(StreamCancelled {
            chat_id: chat("c1"),
            stream_id: StreamId::new("s1").unwrap(),
            reason: StreamCancelReason::CancelledByUser,
        }),
        ServerMessage::ChatReadUpdated(ChatReadUpdated { chat_id: chat("c1"), read_seq: 3, unread_count: 1 }),
    ]
}

#[test]
fn every_server_message_round_trips() {
    for m in server_samples() {
        let text = encode(&m, Some("r-9"));
        let v: Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["payload", "request_id", "type"], "one envelope shape: {text}");
        assert!(v["payload"].is_object(), "{text}");
        let back = decode_server(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(back.message, m, "{text}");
        assert_eq!(back.request_id.as_deref(), Some("r-9"));
        let bare: Value = serde_json::from_str(&encode(&m, None)).unwrap();
        assert!(bare.get("request_id").is_none());
    }
}

#[test]
fn cleared_draft_is_an_explicit_null_in_initial_sync() {
    let entry = ChatUpdate {
        chat_id: chat("c1"),
        kind: ChatChangeKind::UpdatedChat,
        versions: Versions::default(),
        last_edited_overall_timestamp: 0,
        unread_count: 0,
        title: None,
        draft_json: Some(None),
        messages: None,
    };
    let v = serde_json::to_value(&entry).unwrap();
    assert_eq!(v.get("draft_json"), Some(&Value::Null));
    assert!(v.get("title").is_none());
}

fn err(text: &str) -> DecodeError {
    decode(text).expect_err(text)
}

#[test]
fn envelope_errors_are_classified() {
    assert_eq!(err("{not json").code, ErrorCode::InvalidJson);
    assert_eq!(err("").code, ErrorCode::InvalidJson);
    assert_eq!(err(r#"{"type":"ping"} trailing"#).code, ErrorCode::InvalidJson);
    assert_eq!(err("[1,2]").code, ErrorCode::InvalidMessage);
    assert_eq!(err("\"ping\"").code, ErrorCode::InvalidMessage);
    assert_eq!(err("{}").code, ErrorCode::InvalidMessage);
    assert_eq!(err(r#"{"type":5}"#).code, ErrorCode::InvalidMessage);
    assert_eq!(err(r#"{"type":"ping","payload":[]}"#).code, ErrorCode::InvalidMessage);
    assert_eq!(err(r#"{"type":"ping","payload":null}"#).code, ErrorCode::InvalidMessage);
    assert_eq!(err(r#"{"type":"ping","request_id":7}"#).code, ErrorCode::InvalidMessage);
    assert_eq!(err(r#"{"type":"ping","request_id":""}"#).code, ErrorCode::InvalidMessage);
    let long = format!(r#"{{"type":"ping","request_id":"{}"}}"#, "a".repeat(65));
    assert_eq!(err(&long).code, ErrorCode::InvalidMessage);
}

#[test]
fn unknown_type_names_it_and_keeps_request_id() {
    let e = err(r#"{"type":"frobnicate","request_id":"q"}"#);
    assert_eq!(e.code, ErrorCode::UnknownType);
    assert!(e.message.contains("frobnicate"), "{}", e.message);
    assert_eq!(e.request_id.unwrap().as_str(), "q");
}

#[test]
fn invalid_payload_names_the_field() {
    let cases = [
        (r#"{"type":"update_title","payload":{"new_title":"x"}}"#, "chat_id"),
        (r#"{"type":"update_title","payload":{"chat_id":"c","new_title":5}}"#, "new_title"),
        (r#"{"type":"update_title","payload":{"chat_id":"bad id","new_title":"x"}}"#, "chat_id"),
        (r#"{"type":"update_draft","payload":{"chat_id":"c"}}"#, "draft_json"),
        (r#"{"type":"update_draft","payload":{"chat_id":"c","draft_json":"text"}}"#, "draft_json"),
        (
            r#"{"type":"chat_message_added","payload":{"chat_id":"c","message":{"message_id":"a/b","content":"x"}}}"#,
            "message.message_id",
        ),
        (
            r#"{"type":"chat_message_added","payload":{"chat_id":"c","message":{"message_id":"m","content":5}}}"#,
            "message.content",
        ),
        (r#"{"type":"get_chat_messages","payload":{"chat_id":"c","after_seq":-1}}"#, "after_seq"),
        (r#"{"type":"request_chat_content_batch","payload":{"chat_ids":["ok","no way"]}}"#, "chat_ids[1]"),
        (
            r#"{"type":"initial_sync_request","payload":{"chat_versions":{"c":{"title_v":"x"}}}}"#,
            "chat_versions.c.title_v",
        ),
        (r#"{"type":"sync_offline_changes","payload":{"changes":{}}}"#, "changes"),
        // An array of the fields in order is not an object (serde's derive would accept it).
        (r#"{"type":"chat_message_added","payload":{"chat_id":"c","message":["m","x"]}}"#, "message"),
        (r#"{"type":"initial_sync_request","payload":{"chat_versions":{"c":[1,2,3]}}}"#, "chat_versions.c"),
        (
            r#"{"type":"chat_message_added","payload":{"chat_id":"c","message":{"message_id":"m","content":"x","timestamp":[]}}}"#,
            "message.timestamp",
        ),
    ];
    for (text, field) in cases {
        let e = err(text);
        assert_eq!(e.code, ErrorCode::InvalidPayload, "{text}");
        assert_eq!(e.field.as_deref(), Some(field), "{text}: {}", e.message);
        assert!(e.message.contains(field), "{text}: {}", e.message);
    }
}

#[test]
fn aliases_and_omitted_payload() {
    let d = decode(r#"{"type":"delete_draft","payload":{"chatId":"c9"}}"#).unwrap();
    assert_eq!(d.message, ClientMessage::DeleteDraft(DeleteDraft { chat_id: chat("c9") }));
    let d = decode(r#"{"type":"delete_chat","payload":{"chatId":"c9"}}"#).unwrap();
    assert_eq!(d.message, ClientMessage::DeleteChat(DeleteChat { chat_id: chat("c9") }));
    assert_eq!(decode(r#"{"type":"ping"}"#).unwrap().message, ClientMessage::Ping(Empty {}));
}

#[test]
fn offline_changes_validate_one_by_one() {
    let ok = OfflineChange::parse(&json!({"chat_id":"c","type":"draft","value":null,"version_before_edit":2})).unwrap();
    assert_eq!(ok.kind, OfflineChangeType::Draft);
    let bad =
        OfflineChange::parse(&json!({"chat_id":"c","type":"title","value":3,"version_before_edit":0})).unwrap_err();
    assert_eq!(bad.field, "value");
    let bad = OfflineChange::parse(&json!({"chat_id":"c","type":"rename","version_before_edit":0})).unwrap_err();
    assert_eq!(bad.field, "type");
    let bad = OfflineChange::parse(&json!({"chat_id":"c","type":"title","value":"x"})).unwrap_err();
    assert_eq!(bad.field, "version_before_edit");
    // The fields in order as an array are not a change.
    let bad = OfflineChange::parse(&json!([null, "c", "title", "x", 0])).unwrap_err();
    assert_eq!(bad.field, "change");
}

#[test]
fn server_wire_type_is_the_encoded_type() {
    for m in server_samples() {
        let v: Value = serde_json::from_str(&encode(&m, None)).unwrap();
        assert_eq!(v["type"], m.wire_type());
    }
}

/// Checks `text` against the AsyncAPI schema of its message (`side`: `client` or `server`); returns the
/// validation errors.
fn schema_errors(side: &str, text: &str) -> Vec<String> {
    use std::sync::LazyLock;
    static DOC: LazyLock<Value> = LazyLock::new(chatsync_protocol::specs::asyncapi);
    let v: Value = serde_json::from_str(text).unwrap();
    let wire_type = v["type"].as_str().unwrap();
    let schema = chatsync_protocol::specs::message_schema(&DOC, side, wire_type)
        .unwrap_or_else(|| panic!("no schema for {side}.{wire_type}"));
    let validator = jsonschema::draft7::new(&schema).unwrap();
    validator.iter_errors(&v).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

#[test]
fn every_sample_matches_its_generated_schema() {
    for m in client_samples() {
        for text in [m.encode(Some("r-1")), m.encode(None)] {
            let errors = schema_errors("client", &text);
            assert!(errors.is_empty(), "{text}: {errors:?}");
        }
    }
    for m in server_samples() {
        for text in [encode(&m, Some("r-1")), encode(&m, None)] {
            let errors = schema_errors("server", &text);
            assert!(errors.is_empty(), "{text}: {errors:?}");
        }
    }
    // The payload of `ping` may be omitted (PROTOCOL.md section 3); the `chatId` alias is not in the schema
    // (it is accepted, not advertised).
    assert!(schema_errors("client", r#"{"type":"ping"}"#).is_empty());
}

#[test]
fn payloads_the_decoder_refuses_are_refused_by_the_schema_too() {
    for text in [
        r#"{"type":"update_title","payload":{"chat_id":"a b","new_title":"x"}}"#,
        r#"{"type":"update_title","payload":{"chat_id":"","new_title":"x"}}"#,
        r#"{"type":"update_draft","payload":{"chat_id":"c1"}}"#,
        r#"{"type":"update_draft","payload":{"chat_id":"c1","draft_json":"text"}}"#,
        r#"{"type":"chat_message_added","payload":{"chat_id":"c1","message":{"message_id":"m1"}}}"#,
        r#"{"type":"chat_message_added","payload":{"chat_id":"c1","message":{"message_id":"m/1","content":"x"}}}"#,
        r#"{"type":"chat_message_added","payload":{"chat_id":"c1","message":{"message_id":"m1","content":3}}}"#,
        r#"{"type":"get_chat_messages","payload":{"chat_id":"c1","after_seq":-1}}"#,
        r#"{"type":"initial_sync_request","payload":{}}"#,
        r#"{"type":"initial_sync_request","payload":{"chat_versions":{"a b":{}}}}"#,
        r#"{"type":"ping","payload":{},"request_id":""}"#,
    ] {
        assert!(decode(text).is_err(), "the decoder accepts {text}");
        assert!(!schema_errors("client", text).is_empty(), "the schema accepts {text}");
    }
}

#[test]
fn stream_payloads_have_the_documented_shape() {
    let v: Value = serde_json::from_str(&encode(
        &ServerMessage::StreamCancelled(StreamCancelled {
            chat_id: chat("c1"),
            stream_id: StreamId::new("s1").unwrap(),
            reason: StreamCancelReason::Timeout,
        }),
        None,
    ))
    .unwrap();
    assert_eq!(
        v,
        json!({"type": "stream_cancelled", "payload": {"chat_id": "c1", "stream_id": "s1", "reason": "timeout"}})
    );
    let started = decode_server(
        r#"{"type":"stream_started","payload":{"chat_id":"c","stream_id":"s","message_id":"m","sender_name":"a"}}"#,
    )
    .unwrap();
    assert!(matches!(started.message, ServerMessage::StreamStarted(s) if s.meta.is_empty()), "meta defaults to {{}}");
    let sync = decode_server(
        r#"{"type":"initial_sync_response","payload":{"chat_ids_to_delete":[],"chats_to_add_or_update":[],"server_chat_order":[],"sync_completed_at":""}}"#,
    )
    .unwrap();
    assert!(matches!(sync.message, ServerMessage::InitialSyncResponse(r) if r.active_streams.is_empty()));
    let e = err(r#"{"type":"cancel_stream","payload":{"chat_id":"c1","stream_id":"a/b"}}"#);
    assert_eq!((e.code, e.field.as_deref()), (ErrorCode::InvalidPayload, Some("stream_id")));
    let e = err(r#"{"type":"cancel_stream","payload":{"chat_id":"c1"}}"#);
    assert_eq!((e.code, e.field.as_deref()), (ErrorCode::InvalidPayload, Some("stream_id")));
}
