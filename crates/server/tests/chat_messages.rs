//! Messages end to end (PROTOCOL.md sections 5 and 6): `chat_message_added`, `get_chat_messages` and
//! `request_chat_content_batch` — confirmation, seq and versions, idempotent resends, limits, every
//! error code, pagination, and the cross-user case.

mod common;
#[macro_use]
mod sync_util;

use chatsync_protocol::*;
use common::TestServer;
use serde_json::{json, Value};
use sync_util::*;

fn seqs(messages: &[MessageOut]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

/// Adds messages `m1..=mn` to `chat`.
async fn add_n(c: &mut chatsync_client::Client, chat: &str, n: u64) {
    for i in 1..=n {
        let confirmed = add_message(c, chat, &format!("m{i}"), json!(format!("message {i}"))).await;
        assert_eq!(confirmed.new_messages_v, i);
    }
}

// ---------------------------------------------------------------- chat_message_added

#[tokio::test]
async fn message_is_confirmed_with_temp_id_echoed_and_seq_equal_to_the_new_messages_v() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let t0 = now_secs();
    let first = alice
        .request(&message_full("c1", json!({ "message_id": "m1", "content": "hello", "temp_id": "tmp-1" })))
        .await
        .unwrap();
    let first = expect_msg!(first, ChatMessageConfirmed);
    let second = alice
        .request(&message_full("c1", json!({ "message_id": "m2", "content": { "a": 1 }, "temp_id": 42 })))
        .await
        .unwrap();
    let second = expect_msg!(second, ChatMessageConfirmed);
    let t1 = now_secs();

    assert_eq!(first.chat_id.as_str(), "c1");
    assert_eq!(first.message_id.as_str(), "m1");
    assert_eq!(first.temp_id, Some(TempId::Text("tmp-1".into())));
    assert_eq!(first.new_messages_v, 1);
    assert!(!first.duplicate);
    assert_eq!(second.temp_id, Some(TempId::Number(42.into())));
    assert_eq!(second.new_messages_v, 2);
    for ts in [first.new_last_edited_overall_timestamp, second.new_last_edited_overall_timestamp] {
        assert!((t0..=t1).contains(&ts), "{ts} not in {t0}..={t1}");
    }

    let page = all_messages(&mut alice, "c1").await;
    assert_eq!(seqs(&page.messages), [1, 2]);
    assert_eq!(page.messages_v, 2);
    assert_eq!(page.messages[0].content, text("hello"));
    assert_eq!(page.messages[1].content, MessageContent::Json(json!({ "a": 1 }).as_object().unwrap().clone()));
}

#[tokio::test]
async fn message_without_temp_id_is_confirmed_with_null_temp_id() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let confirmed = add_message(&mut alice, "c1", "m1", json!("x")).await;
    assert_eq!(confirmed.temp_id, None);
    assert_eq!(confirmed.new_messages_v, 1);
}

#[tokio::test]
async fn message_to_a_new_chat_creates_it_for_the_writer() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    add_message(&mut alice, "fresh", "m1", json!("first")).await;
    let state = chat_state(&mut alice, "fresh").await;
    assert_eq!(state.versions, Versions { messages_v: 1, title_v: 0, draft_v: 0 });
    assert_eq!(state.title.as_deref(), Some(""));
    assert_eq!(state.draft_json, Some(None));
    assert!(!lists_chat(&mut bob, "fresh").await);
}

#[tokio::test]
async fn other_devices_receive_the_message_with_seq_sender_content_and_timestamps() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let doc_content = json!({ "type": "doc", "content": [{ "type": "text", "text": "rich" }] });
    let cases = [
        // (message, expected client_timestamp)
        (
            json!({ "message_id": "m1", "content": "plain", "timestamp": "2024-05-01T10:00:00Z", "sender": "assistant" }),
            Some(ClientTimestamp::Text("2024-05-01T10:00:00Z".into())),
        ),
        (
            json!({ "message_id": "m2", "content": doc_content, "timestamp": 1714557600.5 }),
            Some(ClientTimestamp::Unix(1714557600.5)),
        ),
        (json!({ "message_id": "m3", "content": "no timestamp" }), None),
    ];
    for (i, (m, ts)) in cases.into_iter().enumerate() {
        let t0 = now_secs();
        let confirmed = expect_msg!(phone.request(&message_full("c1", m.clone())).await.unwrap(), ChatMessageConfirmed);
        let event = laptop.recv().await.unwrap();
        assert_eq!(event.request_id, None);
        let event = expect_msg!(event, ChatMessageAdded);
        assert_eq!(event.chat_id.as_str(), "c1");
        assert_eq!(event.message.message_id.as_str(), m["message_id"].as_str().unwrap());
        assert_eq!(event.message.seq, i as u64 + 1);
        assert_eq!(event.versions.messages_v, i as u64 + 1);
        assert_eq!(event.message.sender_name, "user", "the sender field is ignored");
        assert_eq!(serde_json::to_value(&event.message.content).unwrap(), m["content"]);
        assert_eq!(event.message.client_timestamp, ts);
        assert_eq!(event.last_edited_overall_timestamp, confirmed.new_last_edited_overall_timestamp);
        let created = &event.message.created_at;
        let created = humantime::parse_rfc3339(created).unwrap_or_else(|e| panic!("{created}: {e}"));
        let created = created.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(
            (t0..=now_secs()).contains(&created),
            "created_at {:?} is the server's clock",
            event.message.created_at
        );
    }
    // The stored messages read back the same.
    let page = all_messages(&mut laptop, "c1").await;
    assert_eq!(page.messages.iter().map(|m| m.sender_name.as_str()).collect::<Vec<_>>(), ["user"; 3]);
    assert_eq!(page.messages[0].client_timestamp, Some(ClientTimestamp::Text("2024-05-01T10:00:00Z".into())));
    assert_eq!(page.messages[1].client_timestamp, Some(ClientTimestamp::Unix(1714557600.5)));
    assert_eq!(page.messages[2].client_timestamp, None);
}

#[tokio::test]
async fn resending_a_message_id_is_a_duplicate_with_the_originals_versions_and_no_broadcast() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let original = add_message(&mut phone, "c1", "m1", json!("original")).await;
    expect_msg!(laptop.recv().await.unwrap(), ChatMessageAdded);
    add_message(&mut phone, "c1", "m2", json!("second")).await;
    expect_msg!(laptop.recv().await.unwrap(), ChatMessageAdded);

    let resend = phone
        .request(&message_full("c1", json!({ "message_id": "m1", "content": "changed?", "temp_id": "t-again" })))
        .await
        .unwrap();
    let dup = expect_msg!(resend, ChatMessageConfirmed);
    assert!(dup.duplicate);
    assert_eq!(dup.message_id.as_str(), "m1");
    assert_eq!(dup.temp_id, Some(TempId::Text("t-again".into())));
    assert_eq!(dup.new_messages_v, original.new_messages_v);
    assert_eq!(dup.new_last_edited_overall_timestamp, original.new_last_edited_overall_timestamp);

    assert_quiet(&mut laptop).await;
    assert_quiet(&mut phone).await;
    let page = all_messages(&mut phone, "c1").await;
    assert_eq!(page.messages_v, 2);
    assert_eq!(seqs(&page.messages), [1, 2]);
    assert_eq!(page.messages[0].content, text("original"), "the resend did not overwrite the original");
}

#[tokio::test]
async fn content_of_exactly_32_kib_of_json_is_accepted_and_one_byte_more_is_limit_exceeded() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    // A JSON string of n ASCII characters is n + 2 bytes of JSON.
    let at_limit = "a".repeat(32 * 1024 - 2);
    let ok = add_message(&mut alice, "c1", "m1", json!(at_limit)).await;
    assert_eq!(ok.new_messages_v, 1);
    let over = "a".repeat(32 * 1024 - 1);
    let reply = alice.request(&message("c1", "m2", json!(over))).await.unwrap();
    let e = assert_error(&reply, ErrorCode::LimitExceeded, Some("message.content"));
    assert!(e.message.contains("32768") || e.message.contains("32 KiB"), "{e:?}");
    // Object content over the limit too.
    let big_object = json!({ "type": "doc", "text": "b".repeat(33 * 1024) });
    let reply = alice.request(&message("c1", "m3", big_object)).await.unwrap();
    assert_error(&reply, ErrorCode::LimitExceeded, Some("message.content"));
    assert_eq!(all_messages(&mut alice, "c1").await.messages_v, 1);
}

/// `levels` levels of objects, each the only member `a` of the one around it (`{"a":{}}` is 2).
fn nested(levels: usize) -> Value {
    (1..levels).fold(json!({}), |inner, _| json!({ "a": inner }))
}

/// Content nested past the limit was stored (only its bytes were checked) and then poisoned every read of
/// it: a reader's JSON parser (serde_json stops at 128 levels) meets it inside the frame that carries it.
/// `Limits::MAX_MESSAGE_CONTENT_DEPTH` levels are taken and read back; one more, in objects or in arrays,
/// is `limit_exceeded` naming `message.content`, with the chat and message ids, and stores nothing.
#[tokio::test]
async fn content_nested_at_the_depth_limit_is_accepted_and_one_level_more_is_limit_exceeded() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let at_limit = nested(Limits::MAX_MESSAGE_CONTENT_DEPTH);
    let ok = add_message(&mut alice, "c1", "m1", at_limit.clone()).await;
    assert_eq!(ok.new_messages_v, 1);
    let mut in_arrays = json!([]);
    for _ in 2..=Limits::MAX_MESSAGE_CONTENT_DEPTH {
        in_arrays = json!([in_arrays]);
    }
    for (id, over) in [("m2", nested(Limits::MAX_MESSAGE_CONTENT_DEPTH + 1)), ("m3", json!({ "a": in_arrays }))] {
        let reply = alice.request(&message("c1", id, over)).await.unwrap();
        let e = assert_error(&reply, ErrorCode::LimitExceeded, Some("message.content"));
        assert!(e.message.contains(&Limits::MAX_MESSAGE_CONTENT_DEPTH.to_string()), "{e:?}");
        assert_eq!((e.chat_id.as_deref(), e.message_id.as_deref()), (Some("c1"), Some(id)));
    }
    let page = all_messages(&mut alice, "c1").await;
    assert_eq!(page.messages_v, 1);
    assert_eq!(serde_json::to_value(&page.messages[0].content).unwrap(), at_limit);
}

#[tokio::test]
async fn bad_client_timestamps_are_invalid_payload_naming_message_timestamp() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for ts in [json!("yesterday"), json!(-5), json!("2024-13-45T99:00:00Z"), json!(true)] {
        let reply = request_with_timestamp(&mut alice, ts.clone()).await;
        assert_error(&reply, ErrorCode::InvalidPayload, Some("message.timestamp"));
    }
    assert!(!lists_chat(&mut alice, "c1").await, "no chat was created");
}

/// Sends `chat_message_added` with a given raw timestamp.
async fn request_with_timestamp(c: &mut chatsync_client::Client, ts: serde_json::Value) -> Incoming {
    let payload = json!({ "chat_id": "c1", "message": { "message_id": "m1", "content": "x", "timestamp": ts } });
    request_raw(c, "chat_message_added", payload).await
}

#[tokio::test]
async fn message_with_missing_or_malformed_fields_is_invalid_payload_naming_the_field() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let cases = [
        (json!({ "chat_id": "c1" }), "message"),
        (json!({ "message": { "message_id": "m1", "content": "x" } }), "chat_id"),
        (json!({ "chat_id": "c1", "message": "hi" }), "message"),
        (json!({ "chat_id": "c1", "message": { "message_id": "m/1", "content": "x" } }), "message.message_id"),
        (json!({ "chat_id": "c1", "message": { "message_id": "m1", "content": 5 } }), "message.content"),
        (json!({ "chat_id": "c1", "message": { "message_id": "m1", "content": ["x"] } }), "message.content"),
    ];
    for (payload, field) in cases {
        let reply = request_raw(&mut alice, "chat_message_added", payload).await;
        assert_error(&reply, ErrorCode::InvalidPayload, Some(field));
    }
    assert!(!lists_chat(&mut alice, "c1").await);
}

#[tokio::test]
async fn a_missing_nested_field_is_named_by_its_dotted_path() {
    // PROTOCOL.md section 8: `field` is a dotted path for nested fields, e.g. `message.message_id`.
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let reply =
        request_raw(&mut alice, "chat_message_added", json!({ "chat_id": "c1", "message": { "content": "x" } })).await;
    assert_error(&reply, ErrorCode::InvalidPayload, Some("message.message_id"));
    let reply =
        request_raw(&mut alice, "chat_message_added", json!({ "chat_id": "c1", "message": { "message_id": "m1" } }))
            .await;
    assert_error(&reply, ErrorCode::InvalidPayload, Some("message.content"));
}

#[tokio::test]
async fn message_to_another_users_chat_is_not_found_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    add_message(&mut alice, "c1", "m1", json!("mine")).await;
    let before = chat_state(&mut alice, "c1").await;
    let messages_before = all_messages(&mut alice, "c1").await;
    for id in ["m2", "m1"] {
        let reply = bob.request(&message("c1", id, json!("intruder"))).await.unwrap();
        let e = assert_error(&reply, ErrorCode::NotFound, None);
        assert_eq!(e.chat_id.as_deref(), Some("c1"));
    }
    assert_eq!(chat_state(&mut alice, "c1").await, before);
    assert_eq!(all_messages(&mut alice, "c1").await, messages_before);
}

#[tokio::test]
async fn every_error_of_a_message_names_its_chat_and_message() {
    // PROTOCOL.md section 4: context fields are added where known; a client that pipelines messages
    // without request ids can tell only by them which message failed.
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    add_message(&mut alice, "c1", "m1", json!("mine")).await;
    let reply = bob.request(&message("c1", "m2", json!("intruder"))).await.unwrap();
    let e = assert_error(&reply, ErrorCode::NotFound, None);
    assert_eq!((e.chat_id.as_deref(), e.message_id.as_deref()), (Some("c1"), Some("m2")), "{e:?}");

    // A store failure: the write of this one chat fails (internal), the others are untouched.
    let faults = server.ctx.chats.writer_faults().expect("the SQLite store has a writer");
    faults.fail_chat(Some("c1"));
    let reply = alice.request(&message("c1", "m3", json!("lost"))).await.unwrap();
    let e = assert_error(&reply, ErrorCode::Internal, None);
    assert_eq!((e.chat_id.as_deref(), e.message_id.as_deref()), (Some("c1"), Some("m3")), "{e:?}");
    for request in [
        title("c1", "t"),
        draft("c1", doc("d")),
        delete_chat("c1"),
        msg("mark_read", json!({"chat_id": "c1", "seq": 1})),
    ] {
        let reply = alice.request(&request).await.unwrap();
        let e = assert_error(&reply, ErrorCode::Internal, None);
        assert_eq!((e.chat_id.as_deref(), e.message_id.as_deref()), (Some("c1"), None), "{request:?}: {e:?}");
    }
    faults.fail_chat(None);
    assert_eq!(all_messages(&mut alice, "c1").await.messages_v, 1);
}

#[tokio::test]
async fn last_edited_timestamp_never_goes_backwards_across_messages_and_drafts() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let t0 = now_secs();
    let mut stamps = Vec::new();
    for i in 0..4 {
        stamps
            .push(add_message(&mut alice, "c1", &format!("m{i}"), json!("x")).await.new_last_edited_overall_timestamp);
        stamps.push(set_draft(&mut alice, "c1", doc(&format!("d{i}"))).await.last_edited_overall_timestamp);
        set_title(&mut alice, "c1", &format!("t{i}")).await;
    }
    let t1 = now_secs();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    assert!(stamps.iter().all(|s| (t0..=t1).contains(s)), "{stamps:?} not in {t0}..={t1}");
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.last_edited_overall_timestamp, *stamps.last().unwrap());
    assert_eq!(state.versions, Versions { messages_v: 4, title_v: 4, draft_v: 4 });
}

// ---------------------------------------------------------------- get_chat_messages

#[tokio::test]
async fn get_chat_messages_pages_oldest_first_with_has_more() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_n(&mut alice, "c1", 5).await;
    let expected = [(0, vec![1, 2], true), (2, vec![3, 4], true), (4, vec![5], false), (5, vec![], false)];
    for (after, want, more) in expected {
        let reply = alice.request(&get_messages("c1", after, Some(2))).await.unwrap();
        let page = expect_msg!(reply, ChatMessagesResponse);
        assert_eq!(page.chat_id.as_str(), "c1");
        assert_eq!(seqs(&page.messages), want, "after_seq {after}");
        assert_eq!(page.has_more, more, "after_seq {after}");
        assert_eq!(page.messages_v, 5);
        for m in &page.messages {
            assert_eq!(m.message_id.as_str(), format!("m{}", m.seq));
            assert_eq!(m.content, text(&format!("message {}", m.seq)));
            assert_eq!(m.sender_name, "user");
        }
    }
    // Defaults: after_seq 0, limit 100.
    let reply = request_raw(&mut alice, "get_chat_messages", json!({ "chat_id": "c1" })).await;
    let page = expect_msg!(reply, ChatMessagesResponse);
    assert_eq!(seqs(&page.messages), [1, 2, 3, 4, 5]);
    assert!(!page.has_more);
}

#[tokio::test]
async fn get_chat_messages_of_a_chat_without_messages_is_empty() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "no messages").await;
    let page = all_messages(&mut alice, "c1").await;
    assert!(page.messages.is_empty());
    assert_eq!(page.messages_v, 0);
    assert!(!page.has_more);
}

#[tokio::test]
async fn get_chat_messages_limit_over_max_page_messages_is_limit_exceeded() {
    let server = TestServer::start_with(|c| c.max_page_messages = 3).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_n(&mut alice, "c1", 4).await;
    let reply = alice.request(&get_messages("c1", 0, Some(4))).await.unwrap();
    assert_limit(&reply, "limit", "max_page_messages");
    let page = expect_msg!(alice.request(&get_messages("c1", 0, Some(3))).await.unwrap(), ChatMessagesResponse);
    assert_eq!(seqs(&page.messages), [1, 2, 3]);
    assert!(page.has_more);
    // Without a limit the page is capped at max_page_messages, not rejected.
    let page = expect_msg!(alice.request(&get_messages("c1", 1, None)).await.unwrap(), ChatMessagesResponse);
    assert_eq!(seqs(&page.messages), [2, 3, 4]);
    assert!(!page.has_more);
}

#[tokio::test]
async fn get_chat_messages_with_zero_or_malformed_fields_is_invalid_payload() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_n(&mut alice, "c1", 1).await;
    let cases = [
        (json!({ "chat_id": "c1", "limit": 0 }), "limit"),
        (json!({ "chat_id": "c1", "limit": -1 }), "limit"),
        (json!({ "chat_id": "c1", "limit": "10" }), "limit"),
        (json!({ "chat_id": "c1", "after_seq": -1 }), "after_seq"),
        (json!({ "after_seq": 0 }), "chat_id"),
    ];
    for (payload, field) in cases {
        let reply = request_raw(&mut alice, "get_chat_messages", payload).await;
        assert_error(&reply, ErrorCode::InvalidPayload, Some(field));
    }
}

#[tokio::test]
async fn get_chat_messages_of_an_unknown_or_foreign_chat_is_not_found() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    add_n(&mut alice, "c1", 2).await;
    let e = assert_error(&bob.request(&get_messages("c1", 0, None)).await.unwrap(), ErrorCode::NotFound, None);
    assert_eq!(e.chat_id.as_deref(), Some("c1"));
    assert_not_found(&alice.request(&get_messages("ghost", 0, None)).await.unwrap());
    assert!(!lists_chat(&mut alice, "ghost").await, "reading does not create a chat");
}

// ---------------------------------------------------------------- request_chat_content_batch

#[tokio::test]
async fn content_batch_returns_own_chats_and_lists_unknown_foreign_and_deleted_in_not_found() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    add_n(&mut alice, "a1", 2).await;
    add_n(&mut alice, "a2", 1).await;
    set_title(&mut alice, "a-empty", "no messages").await;
    set_title(&mut alice, "a-gone", "deleted").await;
    expect_msg!(alice.request(&delete_chat("a-gone")).await.unwrap(), ChatDeleted);
    add_n(&mut bob, "b1", 1).await;

    let reply = alice.request(&batch(&["a1", "b1", "ghost", "a2", "a-empty", "a-gone", "a1"])).await.unwrap();
    let r = expect_msg!(reply, ChatContentBatchResponse);
    let mut not_found = ids(&r.not_found);
    not_found.sort();
    assert_eq!(not_found, ["a-gone", "b1", "ghost"]);
    assert_eq!(r.messages_by_chat_id.keys().map(ChatId::as_str).collect::<Vec<_>>(), ["a-empty", "a1", "a2"]);
    assert_eq!(seqs(&r.messages_by_chat_id[&ChatId::new("a1").unwrap()]), [1, 2]);
    assert_eq!(seqs(&r.messages_by_chat_id[&ChatId::new("a2").unwrap()]), [1]);
    assert!(r.messages_by_chat_id[&ChatId::new("a-empty").unwrap()].is_empty());
    let v = |id: &str| r.versions_by_chat_id[&ChatId::new(id).unwrap()].messages_v;
    assert_eq!((v("a1"), v("a2"), v("a-empty")), (2, 1, 0));
    assert_eq!(r.versions_by_chat_id.len(), 3, "no versions for foreign or unknown chats");
    assert_eq!(r.messages_by_chat_id[&ChatId::new("a1").unwrap()][1].content, text("message 2"));

    // Bob's chat is untouched and bob sees it.
    let b = expect_msg!(bob.request(&batch(&["b1", "a1"])).await.unwrap(), ChatContentBatchResponse);
    assert_eq!(ids(&b.not_found), ["a1"]);
    assert_eq!(seqs(&b.messages_by_chat_id[&ChatId::new("b1").unwrap()]), [1]);
}

/// A chat deleted by another device after the batch read its page, before the part was handed over:
/// the device gets the chat's `chat_deleted` first, so the part leaves the chat out (it would show the
/// deleted chat's messages again) and names it in `not_found`.
#[tokio::test]
async fn a_content_batch_part_made_as_its_chat_is_deleted_leaves_the_chat_out() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    add_n(&mut phone, "a1", 2).await;
    add_n(&mut phone, "a2", 1).await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let mut held = server.ctx.pauses.arm(chatsync::pause::BATCH_PART);
    laptop.send(&batch(&["a1", "a2"]), Some("batch")).await.unwrap();
    held.reached().await;
    expect_msg!(phone.request(&delete_chat("a1")).await.unwrap(), ChatDeleted);
    held.release();
    let deleted = expect_msg!(laptop.recv().await.unwrap(), ChatDeleted);
    assert_eq!(deleted.chat_id.as_str(), "a1");
    let r = expect_msg!(laptop.recv_reply("batch").await.unwrap(), ChatContentBatchResponse);
    assert_eq!(r.messages_by_chat_id.keys().map(ChatId::as_str).collect::<Vec<_>>(), ["a2"], "{r:?}");
    assert_eq!(r.versions_by_chat_id.len(), 1);
    assert_eq!(ids(&r.not_found), ["a1"]);
    assert!(!r.more);
}

#[tokio::test]
async fn content_batch_returns_the_most_recent_page_oldest_first() {
    let server = TestServer::start_with(|c| c.max_page_messages = 3).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_n(&mut alice, "c1", 5).await;
    let r = expect_msg!(alice.request(&batch(&["c1"])).await.unwrap(), ChatContentBatchResponse);
    assert_eq!(seqs(&r.messages_by_chat_id[&ChatId::new("c1").unwrap()]), [3, 4, 5]);
    assert_eq!(r.versions_by_chat_id[&ChatId::new("c1").unwrap()].messages_v, 5);
    assert!(r.not_found.is_empty());

    // The same from a fresh connection after the user's cache was dropped (read from the store).
    drop(alice);
    while server.ctx.hub.connection_count() > 0 || server.ctx.cache.is_primed("alice").await {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await; // waits for the server to see the close
    }
    let mut again = another_device(&server, "alice", "laptop2").await;
    let r = expect_msg!(again.request(&batch(&["c1"])).await.unwrap(), ChatContentBatchResponse);
    assert_eq!(seqs(&r.messages_by_chat_id[&ChatId::new("c1").unwrap()]), [3, 4, 5]);
    assert_eq!(r.versions_by_chat_id[&ChatId::new("c1").unwrap()].messages_v, 5);
}

#[tokio::test]
async fn content_batch_over_max_batch_chats_is_limit_exceeded() {
    let server = TestServer::start_with(|c| c.max_batch_chats = 2).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_n(&mut alice, "c1", 1).await;
    let reply = alice.request(&batch(&["c1", "c2", "c3"])).await.unwrap();
    assert_limit(&reply, "chat_ids", "max_batch_chats");
    let ok = expect_msg!(alice.request(&batch(&["c1", "c2"])).await.unwrap(), ChatContentBatchResponse);
    assert_eq!(ids(&ok.not_found), ["c2"]);
}

#[tokio::test]
async fn content_batch_with_missing_or_malformed_chat_ids_is_invalid_payload() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for payload in [json!({}), json!({ "chat_ids": "c1" }), json!({ "chat_ids": ["c1", "bad id"] })] {
        let reply = request_raw(&mut alice, "request_chat_content_batch", payload).await;
        let e = assert_error(&reply, ErrorCode::InvalidPayload, None);
        let field = e.field.clone().unwrap_or_default();
        assert!(field.starts_with("chat_ids"), "{e:?}");
        assert!(e.message.contains("chat_ids"), "{e:?}");
    }
}

#[tokio::test]
async fn content_batch_of_an_empty_list_is_an_empty_response() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let r = expect_msg!(alice.request(&batch(&[])).await.unwrap(), ChatContentBatchResponse);
    assert!(r.messages_by_chat_id.is_empty() && r.versions_by_chat_id.is_empty() && r.not_found.is_empty());
}

#[tokio::test]
async fn the_same_message_id_in_two_chats_is_two_messages() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let a = add_message(&mut alice, "c1", "m1", json!("in c1")).await;
    let b = add_message(&mut alice, "c2", "m1", json!("in c2")).await;
    assert!(!a.duplicate && !b.duplicate);
    assert_eq!((a.new_messages_v, b.new_messages_v), (1, 1));
    assert_eq!(all_messages(&mut alice, "c2").await.messages[0].content, text("in c2"));
}

#[tokio::test]
async fn concurrent_messages_from_two_devices_get_contiguous_unique_seqs() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    add_message(&mut phone, "c1", "m0", json!("start")).await;
    const N: usize = 10;
    for i in 0..N {
        phone.send(&message("c1", &format!("p{i}"), json!("p")), Some(&format!("p{i}"))).await.unwrap();
        laptop.send(&message("c1", &format!("l{i}"), json!("l")), Some(&format!("l{i}"))).await.unwrap();
    }
    let mut versions = Vec::new();
    for i in 0..N {
        versions
            .push(expect_msg!(phone.recv_reply(&format!("p{i}")).await.unwrap(), ChatMessageConfirmed).new_messages_v);
        versions
            .push(expect_msg!(laptop.recv_reply(&format!("l{i}")).await.unwrap(), ChatMessageConfirmed).new_messages_v);
    }
    versions.sort();
    assert_eq!(versions, (2..=2 * N as u64 + 1).collect::<Vec<_>>());
    let page = all_messages(&mut phone, "c1").await;
    assert_eq!(seqs(&page.messages), (1..=2 * N as u64 + 1).collect::<Vec<_>>());
    assert_eq!(page.messages_v, 2 * N as u64 + 1);
}

/// The broadcast has the shape of every other broadcast (`message` object, `versions`), exactly as the
/// original web client reads it: checked on the raw JSON, not through our own decoder.
#[tokio::test]
async fn the_message_broadcast_carries_a_message_object_and_versions_on_the_wire() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    let sent = json!({ "message_id": "m1", "content": {"text": "hi"}, "timestamp": 1714557600 });
    expect_msg!(phone.request(&message_full("c1", sent)).await.unwrap(), ChatMessageConfirmed);
    let raw: Value = serde_json::from_str(&laptop.recv_text().await.unwrap()).unwrap();
    assert_eq!(raw["type"], "chat_message_added");
    let payload = raw["payload"].as_object().unwrap();
    let mut keys: Vec<&str> = payload.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["chat_id", "last_edited_overall_timestamp", "message", "versions"]);
    assert_eq!(payload["versions"], json!({ "messages_v": 1 }));
    let message = payload["message"].as_object().unwrap();
    let mut keys: Vec<&str> = message.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["client_timestamp", "content", "created_at", "message_id", "sender_name", "seq"]);
    assert_eq!(message["message_id"], "m1");
    assert_eq!(message["seq"], 1);
    assert_eq!(message["sender_name"], "user");
    assert_eq!(message["content"], json!({"text": "hi"}));
    // The same object as `chat_messages_response` carries.
    let page = all_messages(&mut laptop, "c1").await;
    assert_eq!(serde_json::to_value(&page.messages[0]).unwrap(), payload["message"]);
}
