//! Chat-sync writes end to end (PROTOCOL.md sections 5 and 6): `update_title`, `update_draft`,
//! `delete_draft` and `delete_chat` — success, versions, every error code, and the cross-user case
//! (another user's chat is `not_found` and the write changes nothing).

mod common;
#[macro_use]
mod sync_util;

use chatsync_protocol::*;
use common::TestServer;
use serde_json::json;
use sync_util::*;

// ---------------------------------------------------------------- update_title

#[tokio::test]
async fn update_title_on_a_new_chat_creates_it_with_title_v_1_and_other_versions_0() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let updated = set_title(&mut alice, "c1", "Groceries").await;
    assert_eq!(updated.chat_id.as_str(), "c1");
    assert_eq!(updated.data.title, "Groceries");
    assert_eq!(updated.versions.title_v, 1);

    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.title.as_deref(), Some("Groceries"));
    assert_eq!(state.versions, Versions { messages_v: 0, title_v: 1, draft_v: 0 });
    assert_eq!(state.kind, ChatChangeKind::NewChat);
}

#[tokio::test]
async fn each_title_change_increments_title_v_by_one() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for (i, t) in ["one", "two", "three"].iter().enumerate() {
        let updated = set_title(&mut alice, "c1", t).await;
        assert_eq!(updated.versions.title_v, i as u64 + 1);
        assert_eq!(updated.data.title, *t);
    }
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.title.as_deref(), Some("three"));
    assert_eq!(state.versions.title_v, 3);
}

#[tokio::test]
async fn empty_title_clears_the_title() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "Something").await;
    let cleared = set_title(&mut alice, "c1", "").await;
    assert_eq!(cleared.data.title, "");
    assert_eq!(cleared.versions.title_v, 2);
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.title.as_deref(), Some(""));
    assert_eq!(state.versions.title_v, 2);
}

#[tokio::test]
async fn title_at_the_char_limit_is_accepted_counting_unicode_scalar_values() {
    let server = TestServer::start_with(|c| c.max_title_chars = 5).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    // 5 characters, 10 bytes: the limit is in characters, not bytes.
    let updated = set_title(&mut alice, "c1", "ééééé").await;
    assert_eq!(updated.data.title, "ééééé");
    assert_eq!(updated.versions.title_v, 1);
}

#[tokio::test]
async fn title_over_the_limit_is_limit_exceeded_naming_new_title_and_changes_nothing() {
    let server = TestServer::start_with(|c| c.max_title_chars = 5).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "short").await;
    let reply = alice.request(&title("c1", "toolong")).await.unwrap();
    assert_limit(&reply, "new_title", "max_title_chars");
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.title.as_deref(), Some("short"));
    assert_eq!(state.versions.title_v, 1);

    // Over the limit on an unknown id does not create the chat either.
    let reply = alice.request(&title("c2", "toolong")).await.unwrap();
    assert_limit(&reply, "new_title", "max_title_chars");
    assert!(!lists_chat(&mut alice, "c2").await);
}

#[tokio::test]
async fn update_title_with_missing_or_malformed_fields_is_invalid_payload_naming_the_field() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let cases = [
        (json!({ "chat_id": "c1" }), "new_title"),
        (json!({ "new_title": "x" }), "chat_id"),
        (json!({ "chat_id": "c1", "new_title": 5 }), "new_title"),
        (json!({ "chat_id": "c 1", "new_title": "x" }), "chat_id"),
        (json!({ "chat_id": "c".repeat(65), "new_title": "x" }), "chat_id"),
        (json!({ "chat_id": "c1", "new_title": null }), "new_title"),
    ];
    for (payload, field) in cases {
        let reply = request_raw(&mut alice, "update_title", payload.clone()).await;
        assert_error(&reply, ErrorCode::InvalidPayload, Some(field));
    }
    assert!(sync_all(&mut alice).await.server_chat_order.is_empty(), "no chat was created");
}

#[tokio::test]
async fn update_title_on_another_users_chat_is_not_found_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_title(&mut alice, "c1", "Alice's").await;
    let before = chat_state(&mut alice, "c1").await;

    let reply = bob.request(&title("c1", "Bob was here")).await.unwrap();
    let e = assert_error(&reply, ErrorCode::NotFound, None);
    assert_eq!(e.chat_id.as_deref(), Some("c1"));

    assert_eq!(chat_state(&mut alice, "c1").await, before);
    assert!(!lists_chat(&mut bob, "c1").await, "bob did not get the chat");
}

// ---------------------------------------------------------------- update_draft

#[tokio::test]
async fn update_draft_confirms_with_draft_v_and_timestamp_and_initial_sync_returns_it() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let t0 = now_secs();
    let first = set_draft(&mut alice, "c1", doc("hello")).await;
    let second = set_draft(&mut alice, "c1", doc("hello world")).await;
    let t1 = now_secs();
    assert_eq!(first.chat_id.as_str(), "c1");
    assert_eq!(first.draft_v, 1);
    assert_eq!(second.draft_v, 2);
    for ts in [first.last_edited_overall_timestamp, second.last_edited_overall_timestamp] {
        assert!((t0..=t1).contains(&ts), "{ts} not in {t0}..={t1}");
    }
    assert!(second.last_edited_overall_timestamp >= first.last_edited_overall_timestamp);

    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.draft_json, Some(doc("hello world").as_object().cloned()));
    assert_eq!(state.versions, Versions { messages_v: 0, title_v: 0, draft_v: 2 });
    assert_eq!(state.title.as_deref(), Some(""), "a title never set is \"\"");
    assert_eq!(state.last_edited_overall_timestamp, second.last_edited_overall_timestamp);
}

#[tokio::test]
async fn null_draft_clears_it_and_initial_sync_reports_an_explicit_null() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_draft(&mut alice, "c1", doc("soon gone")).await;
    let cleared = set_draft(&mut alice, "c1", json!(null)).await;
    assert_eq!(cleared.draft_v, 2);
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.draft_json, Some(None), "explicit null, not absent");
    assert_eq!(state.versions.draft_v, 2);
}

#[tokio::test]
async fn draft_text_in_a_heading_over_the_char_limit_is_limit_exceeded() {
    let server = TestServer::start_with(|c| c.max_draft_chars = 10).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let heading = json!({ "type": "doc", "content": [
        { "type": "heading", "attrs": { "level": 1 }, "content": [{ "type": "text", "text": "abcdefghijk" }] }
    ]});
    let reply = alice.request(&draft("c1", heading)).await.unwrap();
    assert_limit(&reply, "draft_json", "max_draft_chars");
    assert!(!lists_chat(&mut alice, "c1").await, "a rejected draft creates no chat");
}

/// Tiptap-like nodes, `wraps` of them around a text node: each `{"content":[…]}` is two levels of
/// nesting, the text node one (`wraps` 14 is 29 levels).
fn nested_draft(wraps: usize) -> serde_json::Value {
    (0..wraps).fold(json!({ "type": "text", "text": "deep" }), |inner, _| json!({ "type": "x", "content": [inner] }))
}

/// A draft nested past the limit (only its text was checked: 124 levels were accepted) was stored and then
/// broke every initial sync of the user: the Rust client's parser stops at 128 levels, the frame's own
/// levels included. `Limits::MAX_DRAFT_DEPTH` levels are taken and synced to a new device; one level more
/// is `limit_exceeded` naming `draft_json` (as the draft's text limits), and the draft stays as it was.
#[tokio::test]
async fn a_draft_nested_at_the_depth_limit_is_accepted_and_one_level_more_is_limit_exceeded() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    assert_eq!(Limits::MAX_DRAFT_DEPTH, 32, "the drafts below are built for 32 levels");
    // 3 (the doc, its content array, a node) + 29 = 32 levels.
    let at_limit = json!({ "type": "doc", "content": [{ "type": "x", "attrs": nested_draft(14) }] });
    assert_eq!(set_draft(&mut alice, "c1", at_limit.clone()).await.draft_v, 1);
    for over in [
        json!({ "type": "doc", "content": [{ "type": "x", "content": [nested_draft(14)] }] }), // 4 + 29
        json!({ "type": "doc", "content": [nested_draft(60)] }),
    ] {
        let reply = alice.request(&draft("c1", over)).await.unwrap();
        let e = assert_limit(&reply, "draft_json", "32 levels");
        assert_eq!(e.chat_id.as_deref(), Some("c1"));
    }
    let mut phone = another_device(&server, "alice", "phone").await;
    let state = chat_state(&mut phone, "c1").await;
    assert_eq!(state.draft_json, Some(at_limit.as_object().cloned()), "the draft at the limit is kept and synced");
    assert_eq!(state.versions.draft_v, 1);
}

#[tokio::test]
async fn draft_text_in_nested_list_items_counts_toward_the_char_limit() {
    let server = TestServer::start_with(|c| c.max_draft_chars = 10).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_draft(&mut alice, "c1", doc("ok")).await;
    // Two nested list items: "abcde" + " " + "fghij" + " " + "k" = 13 characters.
    let item = |t: &str| json!({ "type": "listItem", "content": [{ "type": "paragraph", "content": [{ "type": "text", "text": t }] }] });
    let nested = json!({ "type": "doc", "content": [{ "type": "bulletList", "content": [
        item("abcde"),
        { "type": "listItem", "content": [{ "type": "bulletList", "content": [item("fghij"), item("k")] }] }
    ]}]});
    let reply = alice.request(&draft("c1", nested)).await.unwrap();
    assert_limit(&reply, "draft_json", "max_draft_chars");
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.draft_json, Some(doc("ok").as_object().cloned()), "the old draft is kept");
    assert_eq!(state.versions.draft_v, 1);
}

#[tokio::test]
async fn draft_exactly_at_the_char_limit_is_accepted_joining_nodes_with_single_spaces() {
    let server = TestServer::start_with(|c| c.max_draft_chars = 10).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let two = |a: &str, b: &str| {
        json!({ "type": "doc", "content": [
            { "type": "paragraph", "content": [{ "type": "text", "text": a }] },
            { "type": "heading", "content": [{ "type": "text", "text": b }] }
        ]})
    };
    // "abcd" + " " + "éfghi" = 10 scalar values (11 bytes): accepted.
    let ok = alice.request(&draft("c1", two("abcd", "éfghi"))).await.unwrap();
    assert_eq!(expect_msg!(ok, DraftUpdateConfirmed).draft_v, 1);
    // Surrounding whitespace is trimmed: still 10.
    let ok = alice.request(&draft("c1", two("   abcd", "efghi   "))).await.unwrap();
    assert_eq!(expect_msg!(ok, DraftUpdateConfirmed).draft_v, 2);
    // One more character: 11.
    let reply = alice.request(&draft("c1", two("abcd", "efghij"))).await.unwrap();
    assert_limit(&reply, "draft_json", "max_draft_chars");
}

#[tokio::test]
async fn draft_word_limit_counts_whitespace_separated_words_across_nodes() {
    let server = TestServer::start_with(|c| c.max_draft_words = 3).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let ok = alice.request(&draft("c1", doc("one  two\tthree"))).await.unwrap();
    assert_eq!(expect_msg!(ok, DraftUpdateConfirmed).draft_v, 1);
    // Text nodes are joined with a space, so "two" and "three" in separate nodes are separate words.
    let split = json!({ "type": "doc", "content": [
        { "type": "paragraph", "content": [{ "type": "text", "text": "one two" }] },
        { "type": "blockquote", "content": [{ "type": "paragraph", "content": [{ "type": "text", "text": "three" }, { "type": "text", "text": "four" }] }] }
    ]});
    let reply = alice.request(&draft("c1", split)).await.unwrap();
    assert_limit(&reply, "draft_json", "max_draft_words");
    assert_eq!(chat_state(&mut alice, "c1").await.versions.draft_v, 1);
}

#[tokio::test]
async fn update_draft_on_a_new_chat_creates_it_for_the_writer() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_draft(&mut alice, "fresh", doc("x")).await;
    let r = sync_all(&mut alice).await;
    assert_eq!(ids(&r.server_chat_order), ["fresh"]);
    assert!(!lists_chat(&mut bob, "fresh").await);
}

#[tokio::test]
async fn update_draft_with_missing_or_malformed_fields_is_invalid_payload_naming_the_field() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let cases = [
        (json!({ "chat_id": "c1" }), "draft_json"),
        (json!({ "chat_id": "c1", "draft_json": "text" }), "draft_json"),
        (json!({ "chat_id": "c1", "draft_json": [1, 2] }), "draft_json"),
        (json!({ "draft_json": {} }), "chat_id"),
        (json!({ "chat_id": "bad/id", "draft_json": {} }), "chat_id"),
    ];
    for (payload, field) in cases {
        let reply = request_raw(&mut alice, "update_draft", payload).await;
        assert_error(&reply, ErrorCode::InvalidPayload, Some(field));
    }
    assert!(sync_all(&mut alice).await.server_chat_order.is_empty());
}

#[tokio::test]
async fn update_draft_on_another_users_chat_is_not_found_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_draft(&mut alice, "c1", doc("alice's draft")).await;
    let before = chat_state(&mut alice, "c1").await;
    for d in [doc("bob's draft"), json!(null)] {
        let reply = bob.request(&draft("c1", d)).await.unwrap();
        assert_not_found(&reply);
    }
    assert_eq!(chat_state(&mut alice, "c1").await, before);
    assert!(!lists_chat(&mut bob, "c1").await);
}

// ---------------------------------------------------------------- delete_draft

#[tokio::test]
async fn delete_draft_with_a_draft_succeeds_with_the_new_draft_v() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_draft(&mut alice, "c1", doc("x")).await;
    let reply = alice.request(&delete_draft("c1")).await.unwrap();
    let receipt = expect_msg!(reply, DraftDeleteReceipt);
    assert_eq!(
        receipt,
        DraftDeleteReceipt { chat_id: ChatId::new("c1").unwrap(), success: true, draft_v: Some(2), message: None }
    );
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.draft_json, Some(None));
    assert_eq!(state.versions.draft_v, 2);
}

#[tokio::test]
async fn delete_draft_without_a_draft_is_an_unsuccessful_receipt_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "no draft here").await;
    let reply = alice.request(&delete_draft("c1")).await.unwrap();
    let receipt = expect_msg!(reply, DraftDeleteReceipt);
    assert_eq!(receipt.chat_id.as_str(), "c1");
    assert!(!receipt.success);
    assert_eq!(receipt.message.as_deref(), Some("Draft not found."));
    assert_eq!(receipt.draft_v, None);
    assert_eq!(chat_state(&mut alice, "c1").await.versions.draft_v, 0);

    // A second delete after a successful one: also "Draft not found.", draft_v stays.
    set_draft(&mut alice, "c1", doc("x")).await;
    expect_msg!(alice.request(&delete_draft("c1")).await.unwrap(), DraftDeleteReceipt);
    let again = expect_msg!(alice.request(&delete_draft("c1")).await.unwrap(), DraftDeleteReceipt);
    assert!(!again.success);
    assert_eq!(again.message.as_deref(), Some("Draft not found."));
    assert_eq!(chat_state(&mut alice, "c1").await.versions.draft_v, 2);
}

#[tokio::test]
async fn delete_draft_accepts_the_chat_id_alias_chatid() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_draft(&mut alice, "c1", doc("x")).await;
    let reply = request_raw(&mut alice, "delete_draft", json!({ "chatId": "c1" })).await;
    let receipt = expect_msg!(reply, DraftDeleteReceipt);
    assert!(receipt.success);
    assert_eq!(receipt.chat_id.as_str(), "c1");
    assert_eq!(receipt.draft_v, Some(2));
}

#[tokio::test]
async fn delete_draft_on_an_unknown_chat_is_not_found_and_creates_nothing() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let reply = alice.request(&delete_draft("nope")).await.unwrap();
    assert_not_found(&reply);
    assert!(!lists_chat(&mut alice, "nope").await);
}

#[tokio::test]
async fn delete_draft_with_missing_or_malformed_chat_id_is_invalid_payload() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for payload in [json!({}), json!({ "chat_id": 7 }), json!({ "chat_id": "" })] {
        let reply = request_raw(&mut alice, "delete_draft", payload).await;
        assert_error(&reply, ErrorCode::InvalidPayload, Some("chat_id"));
    }
}

#[tokio::test]
async fn delete_draft_on_another_users_chat_is_not_found_and_keeps_the_owners_draft() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_draft(&mut alice, "c1", doc("keep me")).await;
    let before = chat_state(&mut alice, "c1").await;
    let reply = bob.request(&delete_draft("c1")).await.unwrap();
    assert_not_found(&reply);
    let after = chat_state(&mut alice, "c1").await;
    assert_eq!(after, before);
    assert_eq!(after.draft_json, Some(doc("keep me").as_object().cloned()));
}

// ---------------------------------------------------------------- delete_chat

#[tokio::test]
async fn delete_chat_answers_chat_deleted_with_tombstone_and_removes_the_chat() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "t").await;
    set_title(&mut alice, "c2", "keep").await;
    let reply = alice.request(&delete_chat("c1")).await.unwrap();
    assert!(reply.request_id.is_some());
    assert_eq!(expect_msg!(reply, ChatDeleted), ChatDeleted { chat_id: ChatId::new("c1").unwrap(), tombstone: true });
    let r = sync_all(&mut alice).await;
    assert_eq!(ids(&r.server_chat_order), ["c2"]);
    assert!(entry(&r, "c1").is_none());
}

#[tokio::test]
async fn a_deleted_chat_is_not_found_for_every_later_read_and_write_by_its_owner() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "t").await;
    set_draft(&mut alice, "c1", doc("d")).await;
    add_message(&mut alice, "c1", "m1", json!("hi")).await;
    expect_msg!(alice.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);

    let writes_and_reads = [
        title("c1", "again"),
        draft("c1", doc("again")),
        draft("c1", json!(null)),
        delete_draft("c1"),
        message("c1", "m2", json!("again")),
        message("c1", "m1", json!("hi")),
        get_messages("c1", 0, None),
        delete_chat("c1"),
    ];
    for m in &writes_and_reads {
        let reply = alice.request(m).await.unwrap();
        assert_not_found(&reply);
    }
    let b = expect_msg!(alice.request(&batch(&["c1"])).await.unwrap(), ChatContentBatchResponse);
    assert_eq!(ids(&b.not_found), ["c1"]);
    assert!(b.messages_by_chat_id.is_empty());
    let (_, done) = offline_round(&mut alice, json!([off_title("x", "c1", "t", 99)])).await;
    assert_eq!(done.results[0].status, OfflineStatus::Error);
    assert_eq!(done.results[0].code, Some(ErrorCode::NotFound));

    let r = sync_with(&mut alice, json!({ "c1": { "messages_v": 1, "title_v": 1, "draft_v": 1 } }), Some("c1")).await;
    assert_eq!(ids(&r.chat_ids_to_delete), ["c1"]);
    assert!(r.server_chat_order.is_empty());
    assert!(r.chats_to_add_or_update.is_empty());
}

#[tokio::test]
async fn a_deleted_chat_id_is_never_reused_by_another_user() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_title(&mut alice, "c1", "t").await;
    expect_msg!(alice.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    assert_not_found(&bob.request(&title("c1", "mine now")).await.unwrap());
    assert_not_found(&bob.request(&message("c1", "m1", json!("mine"))).await.unwrap());
    assert_not_found(&bob.request(&draft("c1", doc("mine"))).await.unwrap());
    assert!(!lists_chat(&mut bob, "c1").await);
    assert!(!lists_chat(&mut alice, "c1").await);
}

#[tokio::test]
async fn delete_chat_accepts_the_chat_id_alias_chatid() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "t").await;
    let reply = request_raw(&mut alice, "delete_chat", json!({ "chatId": "c1" })).await;
    assert_eq!(expect_msg!(reply, ChatDeleted).chat_id.as_str(), "c1");
    assert!(!lists_chat(&mut alice, "c1").await);
}

#[tokio::test]
async fn delete_chat_on_an_unknown_chat_is_not_found() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let e = assert_error(&alice.request(&delete_chat("ghost")).await.unwrap(), ErrorCode::NotFound, None);
    assert_eq!(e.chat_id.as_deref(), Some("ghost"));
    // The unknown id was not tombstoned by the failed delete: it can still be created.
    assert_eq!(set_title(&mut alice, "ghost", "now real").await.versions.title_v, 1);
}

#[tokio::test]
async fn delete_chat_with_missing_or_malformed_chat_id_is_invalid_payload() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for payload in [json!({}), json!({ "chat_id": ["c1"] }), json!({ "chat_id": "c1!" })] {
        let reply = request_raw(&mut alice, "delete_chat", payload).await;
        assert_error(&reply, ErrorCode::InvalidPayload, Some("chat_id"));
    }
}

#[tokio::test]
async fn delete_chat_on_another_users_chat_is_not_found_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_title(&mut alice, "c1", "precious").await;
    set_draft(&mut alice, "c1", doc("draft")).await;
    add_message(&mut alice, "c1", "m1", json!("hello")).await;
    let before = chat_state(&mut alice, "c1").await;
    let messages_before = all_messages(&mut alice, "c1").await;

    assert_not_found(&bob.request(&delete_chat("c1")).await.unwrap());

    assert_eq!(chat_state(&mut alice, "c1").await, before);
    assert_eq!(all_messages(&mut alice, "c1").await, messages_before);
    // The id was not tombstoned: the owner can still write to it.
    assert_eq!(set_title(&mut alice, "c1", "still mine").await.versions.title_v, 2);
}

// ---------------------------------------------------------------- creation races

#[tokio::test]
async fn two_devices_creating_the_same_new_chat_concurrently_both_succeed_on_one_chat() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    for round in 0..5 {
        let chat = format!("new{round}");
        let (t, d) = (title(&chat, "T"), draft(&chat, doc("D")));
        let (a, b) = tokio::join!(phone.send(&t, Some("t")), laptop.send(&d, Some("d")));
        a.unwrap();
        b.unwrap();
        assert_eq!(expect_msg!(phone.recv_reply("t").await.unwrap(), ChatTitleUpdated).versions.title_v, 1);
        assert_eq!(expect_msg!(laptop.recv_reply("d").await.unwrap(), DraftUpdateConfirmed).draft_v, 1);
        let state = chat_state(&mut phone, &chat).await;
        assert_eq!(state.title.as_deref(), Some("T"));
        assert_eq!(state.draft_json, Some(doc("D").as_object().cloned()));
        assert_eq!(state.versions, Versions { messages_v: 0, title_v: 1, draft_v: 1 });
    }
}

#[tokio::test]
async fn two_users_creating_the_same_chat_id_concurrently_one_wins_and_the_other_is_not_found() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    for round in 0..5 {
        let chat = format!("contested{round}");
        let (ta, tb) = (title(&chat, "alice"), title(&chat, "bob"));
        let (a, b) = tokio::join!(alice.send(&ta, Some("a")), bob.send(&tb, Some("b")));
        a.unwrap();
        b.unwrap();
        let ra = alice.recv_reply("a").await.unwrap();
        let rb = bob.recv_reply("b").await.unwrap();
        let (winner, loser_reply, name) = match (&ra.message, &rb.message) {
            (ServerMessage::ChatTitleUpdated(_), ServerMessage::Error(_)) => (&mut alice, &rb, "alice"),
            (ServerMessage::Error(_), ServerMessage::ChatTitleUpdated(_)) => (&mut bob, &ra, "bob"),
            other => panic!("exactly one creator must win: {other:?}"),
        };
        assert_not_found(loser_reply);
        let state = chat_state(winner, &chat).await;
        assert_eq!(state.title.as_deref(), Some(name));
        assert_eq!(state.versions.title_v, 1, "the loser's write did not land");
    }
    let (a, b) = (sync_all(&mut alice).await, sync_all(&mut bob).await);
    assert_eq!(a.server_chat_order.len() + b.server_chat_order.len(), 5);
}
