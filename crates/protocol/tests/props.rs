//! Property tests (proptest): every client and server message survives encode → decode unchanged, and
//! decoding arbitrary JSON-ish text never panics and classifies every failure. Case counts stay moderate
//! (`PROPTEST_CASES` overrides them) so the suite stays fast; the fuzz targets in `fuzz/` go further.

use chatsync_protocol::*;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

fn config() -> ProptestConfig {
    ProptestConfig { cases: 128, ..ProptestConfig::default() }
}

fn chat_id() -> impl Strategy<Value = ChatId> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| ChatId::new(s).unwrap())
}

fn message_id() -> impl Strategy<Value = MessageId> {
    "[A-Za-z0-9_.:-]{1,128}".prop_map(|s| MessageId::new(s).unwrap())
}

fn request_id() -> impl Strategy<Value = Option<String>> {
    option::of("[ -~]{1,64}")
}

fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![any::<f64>().prop_filter("finite", |f| f.is_finite()), -1e12..1e12f64]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        finite().prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(any::<String>(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_map() -> impl Strategy<Value = Map<String, Value>> {
    btree_map("[a-z_]{1,8}|\\PC{0,8}", json_value(), 0..6).prop_map(|m| m.into_iter().collect())
}

fn content() -> impl Strategy<Value = MessageContent> {
    prop_oneof![any::<String>().prop_map(MessageContent::Text), json_map().prop_map(MessageContent::Json)]
}

fn timestamp() -> impl Strategy<Value = ClientTimestamp> {
    prop_oneof![finite().prop_map(ClientTimestamp::Unix), any::<String>().prop_map(ClientTimestamp::Text)]
}

fn temp_id() -> impl Strategy<Value = TempId> {
    prop_oneof![
        any::<String>().prop_map(TempId::Text),
        any::<i64>().prop_map(|n| TempId::Number(n.into())),
        any::<u64>().prop_map(|n| TempId::Number(n.into())),
        finite().prop_map(|f| TempId::Number(Number::from_f64(f).unwrap())),
    ]
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    let versions = (option::of(any::<i64>()), option::of(any::<i64>()), option::of(any::<i64>()))
        .prop_map(|(messages_v, title_v, draft_v)| ClientVersions { messages_v, title_v, draft_v });
    prop_oneof![
        Just(ClientMessage::Ping(Empty {})),
        Just(ClientMessage::RequestCacheStatus(Empty {})),
        (btree_map(chat_id(), versions, 0..5), option::of(chat_id())).prop_map(|(chat_versions, immediate)| {
            ClientMessage::InitialSyncRequest(InitialSyncRequest { chat_versions, immediate_view_chat_id: immediate })
        }),
        (chat_id(), option::of(json_map()))
            .prop_map(|(chat_id, draft_json)| ClientMessage::UpdateDraft(UpdateDraft { chat_id, draft_json })),
        chat_id().prop_map(|chat_id| ClientMessage::DeleteDraft(DeleteDraft { chat_id })),
        (chat_id(), any::<u64>()).prop_map(|(chat_id, seq)| ClientMessage::MarkRead(MarkRead { chat_id, seq })),
        (chat_id(), any::<String>())
            .prop_map(|(chat_id, new_title)| ClientMessage::UpdateTitle(UpdateTitle { chat_id, new_title })),
        (chat_id(), message_id(), content(), option::of(timestamp()), option::of(temp_id())).prop_map(
            |(chat_id, message_id, content, timestamp, temp_id)| {
                ClientMessage::ChatMessageAdded(ChatMessageAdded {
                    chat_id,
                    message: NewMessage { message_id, content, timestamp, temp_id },
                })
            }
        ),
        (chat_id(), any::<u64>(), option::of(any::<u32>())).prop_map(|(chat_id, after_seq, limit)| {
            ClientMessage::GetChatMessages(GetChatMessages { chat_id, after_seq, limit })
        }),
        vec(chat_id(), 0..5)
            .prop_map(|chat_ids| ClientMessage::RequestChatContentBatch(RequestChatContentBatch { chat_ids })),
        chat_id().prop_map(|chat_id| ClientMessage::DeleteChat(DeleteChat { chat_id })),
        vec(json_value(), 0..5).prop_map(|changes| ClientMessage::SyncOfflineChanges(SyncOfflineChanges { changes })),
        (chat_id(), message_id()).prop_map(|(chat_id, m)| ClientMessage::CancelStream(CancelStream {
            chat_id,
            stream_id: StreamId::new(m.as_str()).unwrap()
        })),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::InvalidJson),
        Just(ErrorCode::InvalidMessage),
        Just(ErrorCode::UnknownType),
        Just(ErrorCode::InvalidPayload),
        Just(ErrorCode::LimitExceeded),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::RateLimited),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Internal),
    ]
}

fn versions() -> impl Strategy<Value = Versions> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(messages_v, title_v, draft_v)| Versions {
        messages_v,
        title_v,
        draft_v,
    })
}

fn message_out() -> impl Strategy<Value = MessageOut> {
    (message_id(), any::<u64>(), any::<String>(), content(), any::<String>(), option::of(timestamp())).prop_map(
        |(message_id, seq, sender_name, content, created_at, client_timestamp)| MessageOut {
            message_id,
            seq,
            sender_name,
            content,
            created_at,
            client_timestamp,
        },
    )
}

fn chat_update() -> impl Strategy<Value = ChatUpdate> {
    (
        chat_id(),
        prop_oneof![Just(ChatChangeKind::NewChat), Just(ChatChangeKind::UpdatedChat)],
        versions(),
        any::<i64>(),
        any::<u64>(),
        option::of(any::<String>()),
        option::of(option::of(json_map())),
        option::of(vec(message_out(), 0..3)),
    )
        .prop_map(|(chat_id, kind, versions, ts, unread_count, title, draft_json, messages)| ChatUpdate {
            chat_id,
            kind,
            versions,
            last_edited_overall_timestamp: ts,
            unread_count,
            title,
            draft_json,
            messages,
        })
}

fn offline_result() -> impl Strategy<Value = OfflineResult> {
    let kind = prop_oneof![
        Just(OfflineChangeType::Title),
        Just(OfflineChangeType::Draft),
        Just(OfflineChangeType::DeleteDraft)
    ];
    let status = prop_oneof![Just(OfflineStatus::Applied), Just(OfflineStatus::Conflict), Just(OfflineStatus::Error)];
    (
        option::of(any::<String>()),
        option::of(any::<String>()),
        option::of(kind),
        status,
        option::of(error_code()),
        option::of(versions()),
    )
        .prop_map(|(change_id, chat_id, kind, status, code, versions)| OfflineResult {
            change_id,
            chat_id,
            kind,
            status,
            code,
            versions,
        })
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    let s = || any::<String>();
    let limits = any::<[u32; 10]>().prop_map(|l| Limits {
        max_frame_bytes: l[0],
        max_title_chars: l[1],
        max_draft_chars: l[2],
        max_draft_words: l[3],
        max_offline_changes: l[4],
        max_batch_chats: l[5],
        max_page_messages: l[6],
        rate_per_sec: l[7],
        rate_burst: l[8],
        max_reply_bytes: l[9],
    });
    prop_oneof![
        (s(), s(), s(), s(), s(), limits).prop_map(
            |(connection_id, user_id, device_hash, protocol, server_time, limits)| {
                ServerMessage::Connected(Connected {
                    connection_id,
                    user_id,
                    device_hash,
                    protocol,
                    server_time,
                    limits,
                })
            }
        ),
        Just(ServerMessage::Pong(Empty {})),
        (error_code(), s(), option::of(s()), option::of(s()), option::of(s()), option::of(s())).prop_map(
            |(code, message, field, chat_id, message_id, change_id)| {
                ServerMessage::Error(ErrorPayload { code, message, field, chat_id, message_id, change_id })
            }
        ),
        (vec(chat_id(), 0..3), vec(chat_update(), 0..3), vec(chat_id(), 0..3), s(), any::<bool>()).prop_map(
            |(chat_ids_to_delete, chats_to_add_or_update, server_chat_order, sync_completed_at, more)| {
                ServerMessage::InitialSyncResponse(InitialSyncResponse {
                    chat_ids_to_delete,
                    chats_to_add_or_update,
                    server_chat_order,
                    sync_completed_at,
                    active_streams: Vec::new(),
                    more,
                })
            }
        ),
        (error_code(), s())
            .prop_map(|(code, message)| ServerMessage::InitialSyncError(InitialSyncError { code, message })),
        (chat_id(), any::<u64>(), any::<i64>()).prop_map(|(chat_id, draft_v, ts)| {
            ServerMessage::DraftUpdateConfirmed(DraftUpdateConfirmed {
                chat_id,
                draft_v,
                last_edited_overall_timestamp: ts,
            })
        }),
        (chat_id(), option::of(json_map()), any::<u64>(), any::<i64>()).prop_map(
            |(chat_id, draft_json, draft_v, ts)| {
                ServerMessage::ChatDraftUpdated(ChatDraftUpdated {
                    chat_id,
                    data: DraftData { draft_json },
                    versions: DraftVersion { draft_v },
                    last_edited_overall_timestamp: ts,
                })
            }
        ),
        (chat_id(), any::<bool>(), option::of(any::<u64>()), option::of(s())).prop_map(
            |(chat_id, success, draft_v, message)| {
                ServerMessage::DraftDeleteReceipt(DraftDeleteReceipt { chat_id, success, draft_v, message })
            }
        ),
        (chat_id(), any::<u64>())
            .prop_map(|(chat_id, draft_v)| ServerMessage::DraftDeleted(DraftDeleted { chat_id, draft_v })),
        (chat_id(), s(), any::<u64>()).prop_map(|(chat_id, title, title_v)| {
            ServerMessage::ChatTitleUpdated(ChatTitleUpdated {
                chat_id,
                data: TitleData { title },
                versions: TitleVersion { title_v },
            })
        }),
        (chat_id(), message_id(), option::of(temp_id()), any::<u64>(), any::<i64>(), any::<bool>()).prop_map(
            |(chat_id, message_id, temp_id, new_messages_v, ts, duplicate)| {
                ServerMessage::ChatMessageConfirmed(ChatMessageConfirmed {
                    chat_id,
                    message_id,
                    temp_id,
                    new_messages_v,
                    new_last_edited_overall_timestamp: ts,
                    duplicate,
                })
            }
        ),
        (chat_id(), message_out(), any::<u64>(), any::<i64>()).prop_map(|(chat_id, m, messages_v, ts)| {
            ServerMessage::ChatMessageAdded(MessageAddedEvent {
                chat_id,
                message: m,
                versions: MessagesVersion { messages_v },
                last_edited_overall_timestamp: ts,
            })
        }),
        (chat_id(), vec(message_out(), 0..3), any::<u64>(), any::<bool>()).prop_map(
            |(chat_id, messages, messages_v, has_more)| {
                ServerMessage::ChatMessagesResponse(ChatMessagesResponse { chat_id, messages, messages_v, has_more })
            }
        ),
        (
            btree_map(chat_id(), vec(message_out(), 0..2), 0..3),
            btree_map(chat_id(), any::<u64>().prop_map(|messages_v| MessagesVersion { messages_v }), 0..3),
            vec(chat_id(), 0..3),
            any::<bool>()
        )
            .prop_map(|(messages_by_chat_id, versions_by_chat_id, not_found, more)| {
                ServerMessage::ChatContentBatchResponse(ChatContentBatchResponse {
                    messages_by_chat_id,
                    versions_by_chat_id,
                    not_found,
                    more,
                })
            }),
        (chat_id(), any::<bool>())
            .prop_map(|(chat_id, tombstone)| ServerMessage::ChatDeleted(ChatDeleted { chat_id, tombstone })),
        (any::<u32>(), any::<u32>(), any::<u32>(), vec(offline_result(), 0..4)).prop_map(
            |(processed, conflicts, errors, results)| {
                ServerMessage::OfflineSyncComplete(OfflineSyncComplete { processed, conflicts, errors, results })
            }
        ),
        any::<bool>().prop_map(|is_primed| ServerMessage::CacheStatusResponse(CacheStatusResponse { is_primed })),
        chat_id().prop_map(|chat_id| ServerMessage::PriorityChatReady(PriorityChatReady { chat_id })),
        s().prop_map(|status| ServerMessage::CachePrimed(CachePrimed { status })),
        (chat_id(), message_id(), any::<u64>(), s()).prop_map(|(chat_id, m, seq, delta)| {
            ServerMessage::StreamChunk(StreamChunk {
                chat_id,
                stream_id: StreamId::new(m.as_str()).unwrap(),
                seq,
                delta,
            })
        }),
        (chat_id(), message_id(), s(), json_map()).prop_map(|(chat_id, m, sender_name, meta)| {
            ServerMessage::StreamStarted(StreamStarted {
                chat_id,
                stream_id: StreamId::new(m.as_str()).unwrap(),
                message_id: m,
                sender_name,
                meta,
            })
        }),
    ]
}

/// Text that is mostly JSON: valid frames with a random edit, JSON values, and raw JSON-alphabet noise.
fn jsonish() -> impl Strategy<Value = String> {
    let frame = (client_message(), request_id()).prop_map(|(m, r)| m.encode(r.as_deref()));
    prop_oneof![
        (frame, any::<usize>(), "[\\[\\]{}\":,0-9a-z\\\\ .-]{0,3}").prop_map(|(f, at, edit)| {
            let cut = f.char_indices().map(|(i, _)| i).nth(at % f.chars().count()).unwrap_or(0);
            format!("{}{}{}", &f[..cut], edit, &f[cut..])
        }),
        json_value().prop_map(|v| v.to_string()),
        "[\\[\\]{}\":,0-9a-z_\\\\ .-]{0,64}",
        any::<String>(),
    ]
}

/// The validation errors of `text` against the AsyncAPI schema of its message (`side`: `client` or
/// `server`); validators are built once per message type.
fn schema_errors(side: &str, text: &str) -> Vec<String> {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};
    static DOC: LazyLock<Value> = LazyLock::new(chatsync_protocol::specs::asyncapi);
    static VALIDATORS: LazyLock<Mutex<HashMap<String, std::sync::Arc<jsonschema::Validator>>>> =
        LazyLock::new(Default::default);
    let v: Value = serde_json::from_str(text).unwrap();
    let key = format!("{side}.{}", v["type"].as_str().unwrap());
    let validator = VALIDATORS
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_insert_with(|| {
            let (side, wire_type) = key.split_once('.').unwrap();
            let schema = chatsync_protocol::specs::message_schema(&DOC, side, wire_type).expect("a schema");
            std::sync::Arc::new(jsonschema::draft7::new(&schema).unwrap())
        })
        .clone();
    validator.iter_errors(&v).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn client_messages_round_trip(message in client_message(), rid in request_id()) {
        let text = message.encode(rid.as_deref());
        let decoded = decode(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        prop_assert_eq!(decoded.request_id.as_ref().map(|r| r.as_str()), rid.as_deref());
        prop_assert_eq!(decoded.message, message);
    }

    #[test]
    fn client_messages_match_their_generated_schema(message in client_message(), rid in request_id()) {
        // The schema describes valid offline changes; the decoder also takes invalid ones (each becomes an
        // `error` result), which the strategy generates.
        if let ClientMessage::SyncOfflineChanges(s) = &message {
            prop_assume!(s.changes.iter().all(|c| OfflineChange::parse(c).is_ok()));
        }
        let text = message.encode(rid.as_deref());
        let errors = schema_errors("client", &text);
        prop_assert!(errors.is_empty(), "{}: {:?}", text, errors);
    }

    #[test]
    fn server_messages_match_their_generated_schema(message in server_message(), rid in request_id()) {
        let text = encode(&message, rid.as_deref());
        let errors = schema_errors("server", &text);
        prop_assert!(errors.is_empty(), "{}: {:?}", text, errors);
    }

    #[test]
    fn server_messages_round_trip(message in server_message(), rid in request_id()) {
        let text = encode(&message, rid.as_deref());
        let incoming = decode_server(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        prop_assert_eq!(incoming.request_id, rid);
        prop_assert_eq!(incoming.message, message);
    }

    #[test]
    fn decode_never_panics_and_classifies(text in jsonish()) {
        match decode(&text) {
            Ok(d) => {
                let again = d.message.encode(d.request_id.as_ref().map(|r| r.as_str()));
                prop_assert_eq!(decode(&again), Ok(d));
            }
            Err(e) => {
                prop_assert!(matches!(
                    e.code,
                    ErrorCode::InvalidJson | ErrorCode::InvalidMessage | ErrorCode::UnknownType | ErrorCode::InvalidPayload
                ));
                prop_assert_eq!(e.field.is_some(), e.code == ErrorCode::InvalidPayload);
            }
        }
        let _ = decode_server(&text);
    }
}

/// Found by `client_messages_round_trip`: without serde_json's `float_roundtrip` the parser is off by one
/// ulp on some floats, so a relayed draft or timestamp changed its value.
#[test]
fn floats_are_parsed_exactly() {
    for f in [1.0410193285681326e281, -111419654059.24324, -210209487282.5897] {
        let text = ClientMessage::SyncOfflineChanges(SyncOfflineChanges { changes: vec![Value::from(f)] }).encode(None);
        let Ok(Decoded { message: ClientMessage::SyncOfflineChanges(p), .. }) = decode(&text) else { panic!("{text}") };
        assert_eq!(p.changes[0].as_f64(), Some(f), "{text}");
    }
}
