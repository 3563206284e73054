//! The `ChatStore` contract (chats, messages, tombstones, wrapped keys): every backend must pass these.
//! Each case is a generic async fn run once per backend: the embedded SQLite store always; PostgreSQL in
//! a schema of its own when `CHATSYNC_TEST_POSTGRES_URL` is set (see `backends/mod.rs`).
//!
//! The store sees only bytes: the "ciphertexts" here are plain test bytes.

mod backends;

use backends::{Place, TestBackend};
use chatsync::store::chats::{ChatLookup, ChatRecord, ChatStore, Target, WrappedKey, WriteOp, WriteResult};
use chatsync::store::events::{EventStore, NewEvent, PendingEvent};
use chatsync::store::StoreError;
use std::collections::BTreeSet;
use std::sync::Arc;

macro_rules! contract_suite {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(b) = super::backends::$backend().await else { return };
                    super::$case(&b).await;
                }
            )*
        }
    };
}

macro_rules! contract_suites {
    ($($case:ident),* $(,)?) => {
        contract_suite!(sqlite: $($case),*);
        contract_suite!(postgres: $($case),*);
    };
}

contract_suites!(
    title_creates_the_chat_and_increments_its_version,
    drafts_set_clear_and_move_last_edited_forward_only,
    delete_draft_needs_a_draft,
    existing_targets_must_exist_and_be_the_writers,
    create_targets_race_with_existing_and_deleted_chats,
    offline_conditions_conflict_atomically,
    messages_get_consecutive_seqs_and_duplicates_report_the_original,
    message_pages_and_latest_messages,
    delete_chat_leaves_a_tombstone_and_removes_messages_and_key,
    chat_limit_is_enforced_on_creation_only,
    chats_are_listed_most_recently_edited_first,
    user_keys_are_stored_once,
    key_rotation_rewraps_every_key_and_the_check,
    key_rotation_refuses_keys_stored_after_it_read_them,
    user_keys_are_created_only_under_the_check_value_given,
    concurrent_messages_to_one_chat_get_each_seq_once,
    concurrent_creations_cannot_overshoot_the_chat_limit,
    concurrent_conditional_writes_apply_once,
    a_failing_write_fails_alone,
    two_handles_on_one_database_share_the_truth,
    writes_survive_reopening,
    other_senders_count_as_unread_until_marked_read,
    webhook_events_are_recorded_only_by_writes_that_apply,
    webhook_events_are_claimed_one_per_user_in_order,
    webhook_failures_reschedule_and_release_the_lease,
    webhook_leases_expire_and_are_released_by_owner,
    webhook_claims_from_two_handles_never_overlap,
    webhook_events_survive_reopening,
    webhook_heads_follow_inserts_deletes_and_reschedules,
    webhook_results_after_a_lost_lease_change_nothing,
    text_ties_are_ordered_by_bytes,
);

const NOW: i64 = 1_000;

fn key(tag: &str) -> WrappedKey {
    WrappedKey { wrapped: format!("wrapped-{tag}").into_bytes(), kek_id: "k1".into() }
}

fn create() -> Target {
    Target::Create { key: key("chat"), max_chats: 100 }
}

fn title(owner: &str, chat: &str, text: &str, target: Target, cond: Option<i64>, now: i64) -> WriteOp {
    WriteOp::Title {
        owner: owner.into(),
        chat_id: chat.into(),
        title: text.as_bytes().to_vec(),
        target,
        if_version_at_most: cond,
        now,
    }
}

fn draft(owner: &str, chat: &str, text: Option<&str>, target: Target, cond: Option<i64>, now: i64) -> WriteOp {
    WriteOp::Draft {
        owner: owner.into(),
        chat_id: chat.into(),
        draft: text.map(|t| t.as_bytes().to_vec()),
        target,
        if_version_at_most: cond,
        now,
    }
}

fn delete_draft(owner: &str, chat: &str, target: Target, cond: Option<i64>) -> WriteOp {
    WriteOp::DeleteDraft { owner: owner.into(), chat_id: chat.into(), target, if_version_at_most: cond }
}

fn message(owner: &str, chat: &str, id: &str, target: Target, now: i64) -> WriteOp {
    WriteOp::Message {
        owner: owner.into(),
        chat_id: chat.into(),
        message_id: id.into(),
        content: format!("content-{id}").into_bytes(),
        client_timestamp: Some(format!("\"ts-{id}\"")),
        sender: "user".into(),
        created_at: now,
        target,
        now,
        event: None,
    }
}

fn from(sender: &str, op: WriteOp) -> WriteOp {
    match op {
        WriteOp::Message { owner, chat_id, message_id, content, client_timestamp, target, now, .. } => {
            WriteOp::Message {
                owner,
                chat_id,
                message_id,
                content,
                client_timestamp,
                sender: sender.into(),
                created_at: 42,
                target,
                now,
                event: None,
            }
        }
        other => other,
    }
}

fn mark_read(owner: &str, chat: &str, seq: u64) -> WriteOp {
    WriteOp::MarkRead { owner: owner.into(), chat_id: chat.into(), seq }
}

fn delete_chat(owner: &str, chat: &str) -> WriteOp {
    WriteOp::DeleteChat { owner: owner.into(), chat_id: chat.into(), now: NOW, event: None }
}

async fn users(b: &TestBackend, ids: &[&str]) {
    for id in ids {
        b.backend.identity.create_user(id, false, 1).await.unwrap();
    }
}

async fn write(s: &dyn ChatStore, op: WriteOp) -> WriteResult {
    s.write(op).await.unwrap()
}

fn applied(r: WriteResult) -> ChatRecord {
    match r {
        WriteResult::Applied(chat) => chat,
        other => panic!("expected Applied, got {other:?}"),
    }
}

fn conflict(r: WriteResult) -> ChatRecord {
    match r {
        WriteResult::Conflict(chat) => chat,
        other => panic!("expected Conflict, got {other:?}"),
    }
}

/// Appends a message and returns its seq.
async fn append(s: &dyn ChatStore, owner: &str, chat: &str, id: &str) -> u64 {
    match write(s, message(owner, chat, id, Target::Existing, NOW)).await {
        WriteResult::Message { message, duplicate: false, .. } => message.seq,
        other => panic!("expected a new message, got {other:?}"),
    }
}

async fn title_creates_the_chat_and_increments_its_version(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s = b.backend.chats.as_ref();
    let chat = applied(write(s, title("alice", "c1", "one", create(), None, 500)).await);
    assert_eq!(chat.chat_id, "c1");
    assert_eq!(chat.title.as_deref(), Some(&b"one"[..]));
    assert_eq!((chat.title_v, chat.messages_v, chat.draft_v, chat.unread_count), (1, 0, 0, 0));
    assert_eq!(chat.draft, None);
    assert_eq!(chat.last_edited_ms, 500, "creation sets last_edited_ms");
    assert_eq!(chat.key, key("chat"));
    let chat = applied(write(s, title("alice", "c1", "two", Target::Existing, None, 900)).await);
    assert_eq!(chat.title_v, 2);
    assert_eq!(chat.last_edited_ms, 500, "a title change does not touch last_edited_ms");
    assert_eq!(s.chat("alice", "c1").await.unwrap(), Some(chat.clone()));
    assert_eq!(s.chats("alice").await.unwrap(), vec![chat]);
    assert_eq!(s.chat_lookup("c1").await.unwrap(), ChatLookup::Exists { owner: "alice".into(), key: key("chat") });
    assert_eq!(s.chat_lookup("c2").await.unwrap(), ChatLookup::Absent);
}

async fn drafts_set_clear_and_move_last_edited_forward_only(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s = b.backend.chats.as_ref();
    let chat = applied(write(s, draft("alice", "c1", Some("d1"), create(), None, 500)).await);
    assert_eq!(
        (chat.draft.as_deref(), chat.draft_v, chat.title_v, chat.title.as_deref()),
        (Some(&b"d1"[..]), 1, 0, None)
    );
    assert_eq!(chat.last_edited_ms, 500);
    let chat = applied(write(s, draft("alice", "c1", Some("d2"), Target::Existing, None, 400)).await);
    assert_eq!((chat.draft_v, chat.last_edited_ms), (2, 500), "last_edited_ms never decreases");
    let chat = applied(write(s, draft("alice", "c1", None, Target::Existing, None, 700)).await);
    assert_eq!((chat.draft, chat.draft_v, chat.last_edited_ms), (None, 3, 700));
}

async fn delete_draft_needs_a_draft(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s = b.backend.chats.as_ref();
    // A chat this op creates has no draft: NoDraft, but the chat exists now.
    match write(s, delete_draft("alice", "c1", create(), None)).await {
        WriteResult::NoDraft(chat) => assert_eq!((chat.chat_id.as_str(), chat.draft_v), ("c1", 0)),
        other => panic!("expected NoDraft, got {other:?}"),
    }
    assert!(s.chat("alice", "c1").await.unwrap().is_some());
    match write(s, delete_draft("alice", "c1", Target::Existing, None)).await {
        WriteResult::NoDraft(chat) => assert_eq!(chat.draft_v, 0),
        other => panic!("expected NoDraft, got {other:?}"),
    }
    let drafted = applied(write(s, draft("alice", "c1", Some("d"), Target::Existing, None, NOW)).await);
    let chat = applied(write(s, delete_draft("alice", "c1", Target::Existing, None)).await);
    assert_eq!((chat.draft, chat.draft_v), (None, 2));
    // PROTOCOL.md section 8: a deleted draft does not move the chat in the list (its receipt and
    // `draft_deleted` carry no timestamp, so devices would disagree on the order).
    assert_eq!(chat.last_edited_ms, drafted.last_edited_ms, "delete_draft leaves last_edited_ms");
    assert!(matches!(write(s, delete_draft("alice", "c1", Target::Existing, None)).await, WriteResult::NoDraft(_)));
}

async fn existing_targets_must_exist_and_be_the_writers(b: &TestBackend) {
    users(b, &["alice", "bob"]).await;
    let s = b.backend.chats.as_ref();
    applied(write(s, title("alice", "c1", "t", create(), None, NOW)).await);
    applied(write(s, draft("alice", "c1", Some("d"), Target::Existing, None, NOW)).await);
    for chat in ["c1", "nowhere"] {
        let ops = [
            title("bob", chat, "x", Target::Existing, None, NOW),
            draft("bob", chat, Some("x"), Target::Existing, None, NOW),
            draft("bob", chat, Some("x"), Target::Existing, Some(5), NOW),
            delete_draft("bob", chat, Target::Existing, None),
            message("bob", chat, "m", Target::Existing, NOW),
            delete_chat("bob", chat),
        ];
        for op in ops {
            let what = format!("{op:?}");
            assert_eq!(write(s, op).await, WriteResult::NotFound, "{what}");
        }
    }
    assert_eq!(s.chat("bob", "c1").await.unwrap(), None);
    assert!(s.chats("bob").await.unwrap().is_empty());
    assert_eq!(s.messages_after("bob", "c1", 0, 10).await.unwrap(), None);
    assert_eq!(s.latest_messages("bob", "c1", 10).await.unwrap(), None);
    let chat = s.chat("alice", "c1").await.unwrap().unwrap();
    assert_eq!((chat.title_v, chat.draft_v, chat.messages_v), (1, 1, 0), "nothing changed");
}

async fn create_targets_race_with_existing_and_deleted_chats(b: &TestBackend) {
    users(b, &["alice", "bob"]).await;
    let s = b.backend.chats.as_ref();
    applied(write(s, title("alice", "c1", "t", create(), None, NOW)).await);
    let ops = |owner: &str, chat: &str| {
        vec![
            title(owner, chat, "x", create(), None, NOW),
            draft(owner, chat, Some("x"), create(), None, NOW),
            delete_draft(owner, chat, create(), None),
            message(owner, chat, "m", create(), NOW),
        ]
    };
    for op in ops("alice", "c1") {
        assert_eq!(write(s, op).await, WriteResult::Raced, "the writer's own chat exists already");
    }
    for op in ops("bob", "c1") {
        assert_eq!(write(s, op).await, WriteResult::NotFound, "another user's chat");
    }
    assert_eq!(write(s, delete_chat("alice", "c1")).await, WriteResult::Deleted);
    for owner in ["alice", "bob"] {
        for op in ops(owner, "c1") {
            assert_eq!(write(s, op).await, WriteResult::NotFound, "a deleted id is never reused");
        }
    }
    assert_eq!(s.chat_lookup("c1").await.unwrap(), ChatLookup::Deleted);
}

async fn offline_conditions_conflict_atomically(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s = b.backend.chats.as_ref();
    applied(write(s, title("alice", "c1", "t1", create(), Some(0), NOW)).await);
    applied(write(s, title("alice", "c1", "t2", Target::Existing, Some(1), NOW)).await);
    let chat = conflict(write(s, title("alice", "c1", "stale", Target::Existing, Some(1), NOW)).await);
    assert_eq!((chat.title.as_deref(), chat.title_v), (Some(&b"t2"[..]), 2), "the conflict carries the chat as it is");
    applied(write(s, title("alice", "c1", "t3", Target::Existing, Some(7), NOW)).await);

    applied(write(s, draft("alice", "c1", Some("d1"), Target::Existing, Some(0), NOW)).await);
    let chat = conflict(write(s, draft("alice", "c1", Some("stale"), Target::Existing, Some(0), NOW)).await);
    assert_eq!((chat.draft.as_deref(), chat.draft_v), (Some(&b"d1"[..]), 1));
    let chat = conflict(write(s, delete_draft("alice", "c1", Target::Existing, Some(0))).await);
    assert_eq!(chat.draft_v, 1);
    let chat = applied(write(s, delete_draft("alice", "c1", Target::Existing, Some(1))).await);
    assert_eq!((chat.draft, chat.draft_v), (None, 2));
    // A chat created by the write has no version to conflict with.
    applied(write(s, title("alice", "c2", "t", create(), Some(-1), NOW)).await);
}

async fn messages_get_consecutive_seqs_and_duplicates_report_the_original(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s = b.backend.chats.as_ref();
    match write(s, message("alice", "c1", "m1", create(), 600)).await {
        WriteResult::Message { chat, message, duplicate } => {
            assert!(!duplicate);
            assert_eq!((chat.messages_v, chat.last_edited_ms, message.seq), (1, 600, 1));
            assert_eq!(message.content, b"content-m1");
            assert_eq!(message.client_timestamp.as_deref(), Some("\"ts-m1\""));
            assert_eq!(message.created_at_ms, 600);
        }
        other => panic!("expected a message, got {other:?}"),
    }
    assert_eq!(append(s, "alice", "c1", "m2").await, 2);
    assert_eq!(append(s, "alice", "c1", "m3").await, 3);
    let before = s.chat("alice", "c1").await.unwrap().unwrap();
    let mut again = message("alice", "c1", "m1", Target::Existing, 9_999);
    if let WriteOp::Message { content, .. } = &mut again {
        *content = b"different".to_vec();
    }
    match write(s, again).await {
        WriteResult::Message { chat, message, duplicate } => {
            assert!(duplicate);
            assert_eq!(chat, before, "a duplicate changes nothing");
            assert_eq!((message.seq, message.content.as_slice(), message.created_at_ms), (1, &b"content-m1"[..], 600));
        }
        other => panic!("expected a duplicate, got {other:?}"),
    }
    // Message ids are unique per chat, not globally.
    match write(s, message("alice", "c2", "m1", create(), NOW)).await {
        WriteResult::Message { message, duplicate: false, .. } => assert_eq!(message.seq, 1),
        other => panic!("expected a new message, got {other:?}"),
    }
}

async fn message_pages_and_latest_messages(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s = b.backend.chats.as_ref();
    applied(write(s, title("alice", "c1", "t", create(), None, NOW)).await);
    let (chat, page, more) = s.messages_after("alice", "c1", 0, 10).await.unwrap().unwrap();
    assert_eq!((chat.messages_v, page.len(), more), (0, 0, false));
    for i in 1..=5 {
        append(s, "alice", "c1", &format!("m{i}")).await;
    }
    let (chat, page, more) = s.messages_after("alice", "c1", 0, 2).await.unwrap().unwrap();
    assert_eq!(chat.messages_v, 5);
    assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(more);
    let (_, page, more) = s.messages_after("alice", "c1", 2, 3).await.unwrap().unwrap();
    assert_eq!(page.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), ["m3", "m4", "m5"]);
    assert!(!more, "exactly the rest");
    let (_, page, more) = s.messages_after("alice", "c1", 5, 3).await.unwrap().unwrap();
    assert!(page.is_empty() && !more);
    let (_, page, _) = s.messages_after("alice", "c1", u64::MAX, 3).await.unwrap().unwrap();
    assert!(page.is_empty());
    let (chat, latest) = s.latest_messages("alice", "c1", 2).await.unwrap().unwrap();
    assert_eq!(chat.messages_v, 5);
    assert_eq!(latest.iter().map(|m| m.seq).collect::<Vec<_>>(), [4, 5], "oldest first");
    assert_eq!(latest[1].content, b"content-m5");
    let (_, all) = s.latest_messages("alice", "c1", 100).await.unwrap().unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(s.messages_after("alice", "nowhere", 0, 10).await.unwrap(), None);
}

async fn delete_chat_leaves_a_tombstone_and_removes_messages_and_key(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s = b.backend.chats.as_ref();
    write(s, message("alice", "c1", "m1", create(), NOW)).await;
    applied(write(s, draft("alice", "c1", Some("d"), Target::Existing, None, NOW)).await);
    applied(write(s, title("alice", "c2", "t", create(), None, NOW)).await);
    assert!(s.wrapped_keys().await.unwrap().iter().any(|(slot, _)| slot == "chat:c1"));
    assert_eq!(write(s, delete_chat("alice", "c1")).await, WriteResult::Deleted);
    assert_eq!(s.chat_lookup("c1").await.unwrap(), ChatLookup::Deleted);
    assert_eq!(s.chat("alice", "c1").await.unwrap(), None);
    assert_eq!(s.chats("alice").await.unwrap().iter().map(|c| c.chat_id.as_str()).collect::<Vec<_>>(), ["c2"]);
    assert_eq!(s.messages_after("alice", "c1", 0, 10).await.unwrap(), None);
    let slots: Vec<String> = s.wrapped_keys().await.unwrap().into_iter().map(|(slot, _)| slot).collect();
    assert_eq!(slots, ["chat:c2"], "the deleted chat's key is gone with it");
    assert_eq!(write(s, delete_chat("alice", "c1")).await, WriteResult::NotFound, "deleted once");
    assert_eq!(write(s, message("alice", "c1", "m1", Target::Existing, NOW)).await, WriteResult::NotFound);
}

async fn chat_limit_is_enforced_on_creation_only(b: &TestBackend) {
    users(b, &["alice", "bob"]).await;
    let s = b.backend.chats.as_ref();
    let limited = || Target::Create { key: key("chat"), max_chats: 2 };
    applied(write(s, title("alice", "c1", "t", limited(), None, NOW)).await);
    write(s, message("alice", "c2", "m", limited(), NOW)).await;
    assert_eq!(write(s, title("alice", "c3", "t", limited(), None, NOW)).await, WriteResult::ChatLimit);
    assert_eq!(write(s, message("alice", "c3", "m", limited(), NOW)).await, WriteResult::ChatLimit);
    assert_eq!(s.chat_lookup("c3").await.unwrap(), ChatLookup::Absent, "nothing changed");
    // Existing chats still take writes; other users have their own count.
    applied(write(s, title("alice", "c1", "t2", Target::Existing, None, NOW)).await);
    applied(write(s, title("bob", "b1", "t", limited(), None, NOW)).await);
    // A deleted chat no longer counts.
    assert_eq!(write(s, delete_chat("alice", "c1")).await, WriteResult::Deleted);
    applied(write(s, draft("alice", "c3", Some("d"), limited(), None, NOW)).await);
}

async fn chats_are_listed_most_recently_edited_first(b: &TestBackend) {
    users(b, &["alice", "bob"]).await;
    let s = b.backend.chats.as_ref();
    applied(write(s, title("alice", "b", "t", create(), None, 100)).await);
    applied(write(s, title("alice", "a", "t", create(), None, 100)).await);
    applied(write(s, title("alice", "c", "t", create(), None, 50)).await);
    applied(write(s, title("bob", "z", "t", create(), None, 999)).await);
    let order = |chats: Vec<ChatRecord>| chats.into_iter().map(|c| c.chat_id).collect::<Vec<_>>();
    assert_eq!(order(s.chats("alice").await.unwrap()), ["a", "b", "c"], "ties by chat id");
    write(s, message("alice", "c", "m", Target::Existing, 200)).await;
    assert_eq!(order(s.chats("alice").await.unwrap()), ["c", "a", "b"]);
    applied(write(s, draft("alice", "b", Some("d"), Target::Existing, None, 300)).await);
    assert_eq!(order(s.chats("alice").await.unwrap()), ["b", "c", "a"]);
    assert!(s.chats("nobody").await.unwrap().is_empty());
}

async fn user_keys_are_stored_once(b: &TestBackend) {
    users(b, &["alice", "bob"]).await;
    let s = b.backend.chats.as_ref();
    assert_eq!(s.user_key("alice").await.unwrap(), None);
    let first = write(s, WriteOp::UserKey { user_id: "alice".into(), candidate: key("a1") }).await;
    assert_eq!(first, WriteResult::UserKey(key("a1")));
    let second = write(s, WriteOp::UserKey { user_id: "alice".into(), candidate: key("a2") }).await;
    assert_eq!(second, WriteResult::UserKey(key("a1")), "the key in force is kept");
    assert_eq!(s.user_key("alice").await.unwrap(), Some(key("a1")));
    assert_eq!(s.user_key("bob").await.unwrap(), None);
}

async fn key_rotation_rewraps_every_key_and_the_check(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s = b.backend.chats.as_ref();
    assert_eq!(s.key_check().await.unwrap(), None);
    s.init_key_check(b"check-1").await.unwrap();
    s.init_key_check(b"check-other").await.unwrap();
    assert_eq!(s.key_check().await.unwrap().as_deref(), Some(&b"check-1"[..]), "init keeps an existing check");
    applied(write(s, title("alice", "c1", "t", create(), None, NOW)).await);
    write(s, WriteOp::UserKey { user_id: "alice".into(), candidate: key("user") }).await;
    let mut keys = s.wrapped_keys().await.unwrap();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(keys, vec![("chat:c1".to_owned(), key("chat")), ("user:alice".to_owned(), key("user"))]);
    let rewrapped: Vec<(String, WrappedKey)> = keys
        .iter()
        .map(|(slot, k)| (slot.clone(), WrappedKey { wrapped: [&k.wrapped[..], b"-r"].concat(), kek_id: "k2".into() }))
        .collect();
    s.rewrap_keys(&rewrapped, b"check-1", "k2", b"check-2").await.unwrap();
    let mut after = s.wrapped_keys().await.unwrap();
    after.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(after, rewrapped);
    assert_eq!(s.key_check().await.unwrap().as_deref(), Some(&b"check-2"[..]));
    assert_eq!(s.user_key("alice").await.unwrap().unwrap().kek_id, "k2");
    match s.chat_lookup("c1").await.unwrap() {
        ChatLookup::Exists { key, .. } => assert_eq!(key.wrapped, b"wrapped-chat-r"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.chat("alice", "c1").await.unwrap().unwrap().key.kek_id, "k2");
    let bad = [("nonsense".to_owned(), key("x"))];
    assert!(matches!(s.rewrap_keys(&bad, b"check-2", "k3", b"check-3").await, Err(StoreError::Backend(_))));
    assert_eq!(s.key_check().await.unwrap().as_deref(), Some(&b"check-2"[..]), "a failed rotation changes nothing");
    // A rotation that verified its key against a check value since replaced (a second rotation).
    let err = s.rewrap_keys(&rewrapped_as(&after, "k3"), b"check-1", "k3", b"check-3").await.unwrap_err();
    assert!(err.to_string().contains("rotated meanwhile"), "{err}");
    assert_eq!(s.key_check().await.unwrap().as_deref(), Some(&b"check-2"[..]), "a failed rotation changes nothing");
    assert_eq!(s.user_key("alice").await.unwrap().unwrap().kek_id, "k2");
}

fn rewrapped_as(keys: &[(String, WrappedKey)], kek_id: &str) -> Vec<(String, WrappedKey)> {
    keys.iter()
        .map(|(slot, k)| {
            (slot.clone(), WrappedKey { wrapped: [&k.wrapped[..], b"-r"].concat(), kek_id: kek_id.into() })
        })
        .collect()
}

async fn key_rotation_refuses_keys_stored_after_it_read_them(b: &TestBackend) {
    // A server or command that stores a key (under the old master key) between the rotation's read and
    // its transaction: re-wrapping the rest would leave that key unopenable. The rotation fails instead.
    users(b, &["alice", "bob"]).await;
    let s = b.backend.chats.as_ref();
    s.init_key_check(b"check-1").await.unwrap();
    write(s, WriteOp::UserKey { user_id: "alice".into(), candidate: key("alice") }).await;
    let read = s.wrapped_keys().await.unwrap();
    applied(write(s, title("bob", "late-chat", "t", create(), None, NOW)).await);
    let err = s.rewrap_keys(&rewrapped_as(&read, "k2"), b"check-1", "k2", b"check-2").await.unwrap_err();
    assert!(err.to_string().contains("1 data key(s) were stored after the rotation read the keys"), "{err}");
    assert_eq!(s.key_check().await.unwrap().as_deref(), Some(&b"check-1"[..]), "nothing changed");
    assert_eq!(s.user_key("alice").await.unwrap(), Some(key("alice")), "nothing changed");
    // Read again, the rotation goes through.
    let read = s.wrapped_keys().await.unwrap();
    s.rewrap_keys(&rewrapped_as(&read, "k2"), b"check-1", "k2", b"check-2").await.unwrap();
    assert_eq!(s.user_key("alice").await.unwrap().unwrap().kek_id, "k2");
}

async fn user_keys_are_created_only_under_the_check_value_given(b: &TestBackend) {
    users(b, &["alice", "bob", "carol"]).await;
    let s = b.backend.chats.as_ref();
    let keys = |ids: &[&str]| -> Vec<(String, WrappedKey)> {
        ids.iter().map(|id| (id.to_string(), key(&format!("cli-{id}")))).collect()
    };
    assert!(!s.create_user_keys(&keys(&["alice"]), b"check-1").await.unwrap(), "no check value stored yet");
    assert_eq!(s.user_key("alice").await.unwrap(), None);
    s.init_key_check(b"check-1").await.unwrap();
    write(s, WriteOp::UserKey { user_id: "alice".into(), candidate: key("first") }).await;
    assert!(s.create_user_keys(&keys(&["alice", "bob"]), b"check-1").await.unwrap());
    assert_eq!(s.user_key("alice").await.unwrap(), Some(key("first")), "an existing key is kept");
    assert_eq!(s.user_key("bob").await.unwrap(), Some(key("cli-bob")));
    // After a rotation (another check value), a key wrapped under the old master key is refused.
    let read = s.wrapped_keys().await.unwrap();
    s.rewrap_keys(&rewrapped_as(&read, "k2"), b"check-1", "k2", b"check-2").await.unwrap();
    assert!(!s.create_user_keys(&keys(&["carol"]), b"check-1").await.unwrap());
    assert_eq!(s.user_key("carol").await.unwrap(), None);
    assert!(s.create_user_keys(&[], b"check-2").await.unwrap(), "an empty list is fine");
}

async fn concurrent_messages_to_one_chat_get_each_seq_once(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s: Arc<dyn ChatStore> = b.backend.chats.clone();
    applied(write(s.as_ref(), title("alice", "c1", "t", create(), None, NOW)).await);
    const N: usize = 64;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { append(s.as_ref(), "alice", "c1", &format!("m{i}")).await })
        })
        .collect();
    let mut seqs = BTreeSet::new();
    for t in tasks {
        assert!(seqs.insert(t.await.unwrap()), "each seq once");
    }
    assert_eq!(seqs, (1..=N as u64).collect::<BTreeSet<_>>());
    let (chat, page, more) = s.messages_after("alice", "c1", 0, 1000).await.unwrap().unwrap();
    assert_eq!((chat.messages_v, page.len(), more), (N as u64, N, false));
    assert!(page.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1));
    let ids: BTreeSet<_> = page.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(ids.len(), N);
}

async fn concurrent_creations_cannot_overshoot_the_chat_limit(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s: Arc<dyn ChatStore> = b.backend.chats.clone();
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let s = s.clone();
            let op = title("alice", &format!("c{i}"), "t", Target::Create { key: key("k"), max_chats: 3 }, None, NOW);
            tokio::spawn(async move { s.write(op).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            WriteResult::Applied(_) => created += 1,
            WriteResult::ChatLimit => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 3);
    assert_eq!(s.chats("alice").await.unwrap().len(), 3);
}

async fn concurrent_conditional_writes_apply_once(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s: Arc<dyn ChatStore> = b.backend.chats.clone();
    applied(write(s.as_ref(), title("alice", "c1", "t", create(), None, NOW)).await);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            let op = title("alice", "c1", &format!("offline-{i}"), Target::Existing, Some(1), NOW);
            tokio::spawn(async move { s.write(op).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        match t.await.unwrap() {
            WriteResult::Applied(chat) => {
                winners += 1;
                assert_eq!(chat.title_v, 2);
            }
            WriteResult::Conflict(chat) => assert_eq!(chat.title_v, 2),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(winners, 1, "exactly one write passes the condition");
}

async fn a_failing_write_fails_alone(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s: Arc<dyn ChatStore> = b.backend.chats.clone();
    applied(write(s.as_ref(), title("alice", "c1", "t", create(), None, NOW)).await);
    // A chat for a user that does not exist violates a foreign key: that write fails, whatever batch it
    // shares with the others.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            let op = if i % 4 == 0 {
                title("ghost", &format!("g{i}"), "t", create(), None, NOW)
            } else {
                message("alice", "c1", &format!("m{i}"), Target::Existing, NOW)
            };
            tokio::spawn(async move { (i, s.write(op).await) })
        })
        .collect();
    for t in tasks {
        let (i, result) = t.await.unwrap();
        if i % 4 == 0 {
            assert!(result.is_err(), "{result:?}");
        } else {
            assert!(matches!(result, Ok(WriteResult::Message { duplicate: false, .. })), "{result:?}");
        }
    }
    assert_eq!(s.chat("alice", "c1").await.unwrap().unwrap().messages_v, 12);
    assert_eq!(s.chat_lookup("g0").await.unwrap(), ChatLookup::Absent);
}

async fn two_handles_on_one_database_share_the_truth(b: &TestBackend) {
    users(b, &["alice"]).await;
    let other = b.open_again().await;
    let (one, two): (Arc<dyn ChatStore>, Arc<dyn ChatStore>) = (b.backend.chats.clone(), other.chats.clone());
    applied(write(one.as_ref(), title("alice", "c1", "t", create(), None, NOW)).await);
    assert_eq!(write(two.as_ref(), title("alice", "c1", "t", create(), None, NOW)).await, WriteResult::Raced);
    // Two writers (two nodes) appending to one chat: each seq once.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let s = if i % 2 == 0 { one.clone() } else { two.clone() };
            tokio::spawn(async move { append(s.as_ref(), "alice", "c1", &format!("m{i}")).await })
        })
        .collect();
    let mut seqs = BTreeSet::new();
    for t in tasks {
        assert!(seqs.insert(t.await.unwrap()));
    }
    assert_eq!(seqs, (1..=40).collect::<BTreeSet<_>>());
    // Duplicates are seen across handles.
    match write(two.as_ref(), message("alice", "c1", "m0", Target::Existing, NOW)).await {
        WriteResult::Message { duplicate, .. } => assert!(duplicate),
        other => panic!("{other:?}"),
    }
    // Creations racing from two handles cannot overshoot the chat limit (c1 is one of the 3).
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let s = if i % 2 == 0 { one.clone() } else { two.clone() };
            let op = title("alice", &format!("n{i}"), "t", Target::Create { key: key("k"), max_chats: 3 }, None, NOW);
            tokio::spawn(async move { s.write(op).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            WriteResult::Applied(_) => created += 1,
            WriteResult::ChatLimit => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 2);
    // Conditional writes racing from two handles: exactly one passes.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let s = if i % 2 == 0 { one.clone() } else { two.clone() };
            let op = draft("alice", "c1", Some("offline"), Target::Existing, Some(0), NOW);
            tokio::spawn(async move { s.write(op).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        match t.await.unwrap() {
            WriteResult::Applied(chat) => {
                winners += 1;
                assert_eq!(chat.draft_v, 1);
            }
            WriteResult::Conflict(chat) => assert_eq!(chat.draft_v, 1),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(write(two.as_ref(), delete_chat("alice", "c1")).await, WriteResult::Deleted);
    assert_eq!(one.chat_lookup("c1").await.unwrap(), ChatLookup::Deleted);
    other.identity.close().await;
}

async fn writes_survive_reopening(b: &TestBackend) {
    users(b, &["alice"]).await;
    let s = b.backend.chats.as_ref();
    write(s, message("alice", "c1", "m1", create(), NOW)).await;
    applied(write(s, title("alice", "c1", "t", Target::Existing, None, NOW)).await);
    write(s, WriteOp::UserKey { user_id: "alice".into(), candidate: key("u") }).await;
    let before = s.chat("alice", "c1").await.unwrap().unwrap();
    b.backend.identity.close().await;
    assert!(matches!(
        s.write(title("alice", "c1", "x", Target::Existing, None, NOW)).await,
        Err(StoreError::Unavailable(_))
    ));
    let reopened = b.open_again().await;
    assert_eq!(reopened.chats.chat("alice", "c1").await.unwrap(), Some(before));
    assert_eq!(reopened.chats.user_key("alice").await.unwrap(), Some(key("u")));
    assert_eq!(append(reopened.chats.as_ref(), "alice", "c1", "m2").await, 2);
    assert!(reopened.identity.user("alice").await.unwrap().is_some());
    reopened.identity.close().await;
}

async fn other_senders_count_as_unread_until_marked_read(b: &TestBackend) {
    users(b, &["alice", "bob"]).await;
    let s = b.backend.chats.as_ref();
    let WriteResult::Message { chat, message: stored, .. } =
        write(s, from("assistant", message("alice", "c1", "m1", create(), NOW))).await
    else {
        panic!("expected a message")
    };
    assert_eq!(
        (chat.unread_count, chat.read_seq, stored.sender.as_str(), stored.created_at_ms),
        (1, 0, "assistant", 42)
    );
    append(s, "alice", "c1", "m2").await; // the user's own: not unread
    let WriteResult::Message { chat, .. } =
        write(s, from("bot", message("alice", "c1", "m3", Target::Existing, NOW))).await
    else {
        panic!("expected a message")
    };
    assert_eq!((chat.messages_v, chat.unread_count), (3, 2));
    // A duplicate from another sender changes nothing.
    let WriteResult::Message { chat, duplicate, .. } =
        write(s, from("assistant", message("alice", "c1", "m1", Target::Existing, NOW))).await
    else {
        panic!("expected a message")
    };
    assert!(duplicate);
    assert_eq!(chat.unread_count, 2);

    let chat = applied(write(s, mark_read("alice", "c1", 1)).await);
    assert_eq!((chat.read_seq, chat.unread_count), (1, 1));
    match write(s, mark_read("alice", "c1", 1)).await {
        WriteResult::Unchanged(chat) => assert_eq!((chat.read_seq, chat.unread_count), (1, 1)),
        other => panic!("expected Unchanged, got {other:?}"),
    }
    let chat = applied(write(s, mark_read("alice", "c1", 99)).await);
    assert_eq!((chat.read_seq, chat.unread_count), (3, 0), "capped at messages_v");
    assert!(matches!(write(s, mark_read("bob", "c1", 3)).await, WriteResult::NotFound), "another user's chat");
    assert!(matches!(write(s, mark_read("alice", "nope", 3)).await, WriteResult::NotFound));

    let listed = s.chat("alice", "c1").await.unwrap().unwrap();
    assert_eq!((listed.read_seq, listed.unread_count), (3, 0));
    let (_, page, _) = s.messages_after("alice", "c1", 0, 10).await.unwrap().unwrap();
    let senders: Vec<_> = page.iter().map(|m| m.sender.as_str()).collect();
    assert_eq!(senders, ["assistant", "user", "bot"]);
    let (_, latest) = s.latest_messages("alice", "c1", 1).await.unwrap().unwrap();
    assert_eq!(latest[0].sender, "bot");
}

// ---------------------------------------------------------------- webhook outbox (EventStore)

fn event(id: &str, kind: &str) -> NewEvent {
    NewEvent { event_id: id.into(), kind: kind.into(), body: format!("sealed-{id}").into_bytes(), created_at_ms: NOW }
}

fn message_with_event(owner: &str, chat: &str, id: &str, target: Target, event_id: &str) -> WriteOp {
    let mut op = message(owner, chat, id, target, NOW);
    if let WriteOp::Message { event: e, .. } = &mut op {
        *e = Some(event(event_id, "message.created"));
    }
    op
}

/// Claims everything due at `now` for `node` (a long lease).
async fn claim(s: &dyn EventStore, node: &str, now: i64) -> Vec<PendingEvent> {
    s.claim_events(node, now, 60_000, 100).await.unwrap()
}

fn event_ids(events: &[PendingEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event_id.as_str()).collect()
}

async fn webhook_events_are_recorded_only_by_writes_that_apply(b: &TestBackend) {
    users(b, &["alice", "bob"]).await;
    let (s, ev) = (b.backend.chats.as_ref(), b.backend.events.as_ref());
    // A stored message records its event with the seq the write gave it (also when it creates the chat).
    write(s, message_with_event("alice", "c1", "m1", create(), "e1")).await;
    write(s, message_with_event("alice", "c1", "m2", Target::Existing, "e2")).await;
    // A duplicate, another user's chat, an absent chat: nothing recorded.
    write(s, message_with_event("alice", "c1", "m1", Target::Existing, "dup")).await;
    assert_eq!(
        write(s, message_with_event("bob", "c1", "x", Target::Existing, "foreign")).await,
        WriteResult::NotFound
    );
    assert_eq!(
        write(s, message_with_event("alice", "nope", "x", Target::Existing, "absent")).await,
        WriteResult::NotFound
    );
    // A deletion records its event; deleting again (not found) does not.
    let mut del = delete_chat("alice", "c1");
    if let WriteOp::DeleteChat { event: e, .. } = &mut del {
        *e = Some(event("e3", "chat.deleted"));
    }
    assert_eq!(write(s, del.clone()).await, WriteResult::Deleted);
    if let WriteOp::DeleteChat { event: e, .. } = &mut del {
        *e = Some(event("gone", "chat.deleted"));
    }
    assert_eq!(write(s, del).await, WriteResult::NotFound);
    // A standalone event (stream.cancel_requested).
    ev.record_event("bob", &event("e4", "stream.cancel_requested")).await.unwrap();
    assert_eq!(ev.pending_events().await.unwrap(), 4);

    let mut alice = Vec::new();
    for _ in 0..3 {
        let claimed = claim(ev, "n1", NOW).await;
        let mine: Vec<_> = claimed.iter().filter(|e| e.user_id == "alice").cloned().collect();
        assert_eq!(mine.len(), 1, "one event of a user at a time: {claimed:?}");
        for e in &claimed {
            assert!(ev.event_done(e).await.unwrap());
        }
        alice.extend(mine);
    }
    assert_eq!(event_ids(&alice), ["e1", "e2", "e3"]);
    assert_eq!(alice.iter().map(|e| e.seq).collect::<Vec<_>>(), [Some(1), Some(2), None]);
    assert_eq!(alice[0].kind, "message.created");
    assert_eq!(alice[2].kind, "chat.deleted");
    assert_eq!(alice[0].body, b"sealed-e1");
    assert_eq!((alice[0].created_at_ms, alice[0].attempts), (NOW, 0));
    assert_eq!(ev.pending_events().await.unwrap(), 0);
}

async fn webhook_events_are_claimed_one_per_user_in_order(b: &TestBackend) {
    let ev = b.backend.events.as_ref();
    for (user, id) in [("u1", "a1"), ("u2", "b1"), ("u1", "a2"), ("u1", "a3"), ("u2", "b2")] {
        ev.record_event(user, &event(id, "stream.cancel_requested")).await.unwrap();
    }
    // Not due before its creation time.
    assert!(claim(ev, "n1", NOW - 1).await.is_empty());
    let first = claim(ev, "n1", NOW).await;
    assert_eq!(event_ids(&first), ["a1", "b1"]);
    // While a user's head is leased, nothing else of that user is claimable (by anyone).
    assert!(claim(ev, "n2", NOW).await.is_empty());
    assert!(ev.event_done(&first[0]).await.unwrap());
    assert_eq!(event_ids(&claim(ev, "n2", NOW).await), ["a2"]);
    // `limit` bounds a claim.
    assert!(ev.event_done(&first[1]).await.unwrap());
    assert!(ev.claim_events("n3", NOW, 60_000, 0).await.unwrap().is_empty());
    assert_eq!(event_ids(&ev.claim_events("n3", NOW, 60_000, 1).await.unwrap()), ["b2"]);
    assert_eq!(ev.pending_events().await.unwrap(), 3);
}

async fn webhook_failures_reschedule_and_release_the_lease(b: &TestBackend) {
    let ev = b.backend.events.as_ref();
    ev.record_event("u1", &event("a1", "k")).await.unwrap();
    ev.record_event("u1", &event("a2", "k")).await.unwrap();
    let first = claim(ev, "n1", NOW).await;
    assert_eq!(event_ids(&first), ["a1"]);
    assert!(ev.event_failed(&first[0], 1, NOW + 500).await.unwrap());
    // The failed head is not due yet, and the user's next event waits behind it (order per user).
    assert!(claim(ev, "n1", NOW + 499).await.is_empty());
    let again = claim(ev, "n2", NOW + 500).await;
    assert_eq!(event_ids(&again), ["a1"]);
    assert_eq!(again[0].attempts, 1);
    assert!(ev.event_failed(&again[0], 2, NOW + 1500).await.unwrap());
    assert_eq!(claim(ev, "n1", NOW + 1500).await[0].attempts, 2);
}

async fn webhook_leases_expire_and_are_released_by_owner(b: &TestBackend) {
    let ev = b.backend.events.as_ref();
    ev.record_event("u1", &event("a1", "k")).await.unwrap();
    ev.record_event("u2", &event("b1", "k")).await.unwrap();
    assert_eq!(ev.claim_events("dead", NOW, 1000, 1).await.unwrap().len(), 1);
    assert_eq!(ev.claim_events("other", NOW, 1000, 1).await.unwrap().len(), 1);
    assert!(claim(ev, "n1", NOW + 999).await.is_empty());
    // An expired lease (its node died) frees the event.
    assert_eq!(event_ids(&claim(ev, "n1", NOW + 1000).await), ["a1", "b1"]);
    // A node releases only its own leases.
    ev.release_leases("other").await.unwrap();
    assert!(claim(ev, "n2", NOW + 1001).await.is_empty());
    ev.release_leases("n1").await.unwrap();
    assert_eq!(claim(ev, "n2", NOW + 1001).await.len(), 2);
}

async fn webhook_claims_from_two_handles_never_overlap(b: &TestBackend) {
    let other = b.open_again().await;
    let (one, two): (Arc<dyn EventStore>, Arc<dyn EventStore>) = (b.backend.events.clone(), other.events.clone());
    for u in 0..8 {
        for i in 0..5 {
            one.record_event(&format!("u{u}"), &event(&format!("u{u}-{i}"), "k")).await.unwrap();
        }
    }
    // Two nodes claim and complete concurrently; every event is delivered once, in order per user, and
    // never while another event of its user is in flight.
    let in_flight = Arc::new(parking_lot::Mutex::new(BTreeSet::<String>::new()));
    let delivered = Arc::new(parking_lot::Mutex::new(Vec::<(String, String)>::new()));
    let tasks: Vec<_> = [(one, "n1"), (two, "n2")]
        .into_iter()
        .map(|(s, node)| {
            let (in_flight, delivered) = (in_flight.clone(), delivered.clone());
            tokio::spawn(async move {
                for _ in 0..200 {
                    let claimed = s.claim_events(node, NOW, 60_000, 3).await.unwrap();
                    for e in &claimed {
                        assert!(in_flight.lock().insert(e.user_id.clone()), "{} claimed twice at once", e.user_id);
                    }
                    tokio::task::yield_now().await;
                    for e in claimed {
                        delivered.lock().push((e.user_id.clone(), e.event_id.clone()));
                        in_flight.lock().remove(&e.user_id);
                        assert!(s.event_done(&e).await.unwrap());
                    }
                    if s.pending_events().await.unwrap() == 0 {
                        break;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let delivered = delivered.lock().clone();
    assert_eq!(delivered.len(), 40, "{delivered:?}");
    for u in 0..8 {
        let user = format!("u{u}");
        let mine: Vec<_> = delivered.iter().filter(|(who, _)| *who == user).map(|(_, id)| id.clone()).collect();
        assert_eq!(mine, (0..5).map(|i| format!("{user}-{i}")).collect::<Vec<_>>());
    }
}

async fn webhook_events_survive_reopening(b: &TestBackend) {
    users(b, &["alice"]).await;
    write(b.backend.chats.as_ref(), message_with_event("alice", "c1", "m1", create(), "e1")).await;
    let claimed = claim(b.backend.events.as_ref(), "n1", NOW).await;
    assert!(b.backend.events.event_failed(&claimed[0], 1, NOW + 10).await.unwrap());
    b.backend.identity.close().await;
    let again = b.open_again().await;
    let claimed = claim(again.events.as_ref(), "n1", NOW + 10).await;
    assert_eq!(event_ids(&claimed), ["e1"]);
    assert_eq!((claimed[0].seq, claimed[0].attempts), (Some(1), 1));
    again.identity.close().await;
}

/// The webhook heads as stored, by user: (user, the head's event id, due at, leased to, pending), checked
/// against the outbox itself (each user with events has one head, on the oldest, counting them all).
async fn heads(b: &TestBackend) -> Vec<(String, String, i64, Option<String>, i64)> {
    use sqlx::Row as _;
    const HEADS: &str = "SELECT h.user_id, e.event_id, h.due_at, h.lease_owner, h.pending \
                         FROM webhook_heads h JOIN webhook_events e ON e.id = h.head_id ORDER BY h.user_id";
    const DERIVED: &str = "SELECT e.user_id, e.event_id, m.n FROM webhook_events e \
                           JOIN (SELECT user_id, MIN(id) AS id, COUNT(*) AS n FROM webhook_events GROUP BY user_id) m \
                           ON m.id = e.id ORDER BY e.user_id";
    type Head = (String, String, i64, Option<String>, i64);
    let (heads, derived): (Vec<Head>, Vec<(String, String, i64)>) = match &b.place {
        Place::Sqlite(_) => {
            let path = b.url().trim_start_matches("sqlite://").to_owned();
            let db = rusqlite::Connection::open(path).unwrap();
            let heads = db
                .prepare(HEADS)
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let derived = db
                .prepare(DERIVED)
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            (heads, derived)
        }
        Place::Postgres(schema) => {
            let mut conn = schema.connect().await;
            let heads = sqlx::query(HEADS)
                .fetch_all(&mut conn)
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                .collect();
            let derived = sqlx::query(DERIVED)
                .fetch_all(&mut conn)
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            (heads, derived)
        }
    };
    let shape: Vec<(String, String, i64)> = heads.iter().map(|h| (h.0.clone(), h.1.clone(), h.4)).collect();
    assert_eq!(shape, derived, "one head per user with events, on its oldest, counting them");
    heads
}

/// A claim reads heads only: with thousands of events none of which is due it returns nothing, and after
/// inserts, deliveries and reschedules the heads (one per user, on its oldest event, with its schedule
/// and count) are exactly what the outbox implies. The index keeps a claim's cost to what it returns
/// (BENCHMARKS.md, fourteenth session, for the time).
async fn webhook_heads_follow_inserts_deletes_and_reschedules(b: &TestBackend) {
    const USERS: usize = 40;
    const EACH: usize = 50;
    let names: Vec<String> = (0..USERS).map(|u| format!("u{u:02}")).collect();
    users(b, &names.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // 2,000 events through the chat writers (group-committed), in order per user.
    let tasks: Vec<_> = names
        .iter()
        .map(|user| {
            let (s, user) = (b.backend.chats.clone(), user.clone());
            tokio::spawn(async move {
                for i in 0..EACH {
                    let target = if i == 0 { create() } else { Target::Existing };
                    let op = message_with_event(
                        &user,
                        &format!("{user}-c"),
                        &format!("m{i}"),
                        target,
                        &format!("{user}-{i:02}"),
                    );
                    assert!(matches!(s.write(op).await.unwrap(), WriteResult::Message { duplicate: false, .. }));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let ev = b.backend.events.as_ref();
    assert_eq!(ev.pending_events().await.unwrap(), (USERS * EACH) as u64);
    let all = heads(b).await;
    assert_eq!(all.len(), USERS);
    assert!(all.iter().all(|h| h.1.ends_with("-00") && h.2 == NOW && h.3.is_none() && h.4 == EACH as i64), "{all:?}");

    assert!(claim(ev, "n1", NOW - 1).await.is_empty(), "nothing due yet");
    let first = claim(ev, "n1", NOW).await;
    assert_eq!(first.len(), USERS, "one head per user, out of {} events", USERS * EACH);
    assert!(first.iter().all(|e| e.event_id == format!("{}-00", e.user_id)));
    assert!(heads(b).await.iter().all(|h| h.2 == NOW + 60_000 && h.3.as_deref() == Some("n1")), "leased");
    // Every head rescheduled: thousands of events, none due.
    for e in &first {
        assert!(ev.event_failed(e, 1, NOW + 10_000).await.unwrap());
    }
    assert!(claim(ev, "n1", NOW + 9_999).await.is_empty());
    assert!(heads(b).await.iter().all(|h| h.2 == NOW + 10_000 && h.3.is_none()));
    // The heads due longest go first (ties by id); a limit takes some of them.
    let some = ev.claim_events("n2", NOW + 10_000, 60_000, 10).await.unwrap();
    assert_eq!(some.len(), 10);
    assert!(some.iter().all(|e| e.attempts == 1 && e.event_id == format!("{}-00", e.user_id)));
    // Delivered: each of those users' next event becomes its head, due at its own time (at once).
    for e in &some {
        assert!(ev.event_done(e).await.unwrap());
    }
    let moved: BTreeSet<String> = some.iter().map(|e| e.user_id.clone()).collect();
    for h in heads(b).await {
        if moved.contains(&h.0) {
            assert_eq!((h.1.clone(), h.2, h.3, h.4), (format!("{}-01", h.0), NOW, None, EACH as i64 - 1));
        } else {
            assert_eq!((h.2, h.4), (NOW + 10_000, EACH as i64));
        }
    }
    let next = claim(ev, "n3", NOW + 5_000).await;
    assert_eq!(next.iter().map(|e| e.user_id.clone()).collect::<BTreeSet<_>>(), moved);
    assert!(next.iter().all(|e| e.event_id == format!("{}-01", e.user_id) && e.attempts == 0));
    // A new user's first event is its head at once; another event of a user only counts.
    ev.record_event("zz", &event("zz-00", "k")).await.unwrap();
    ev.record_event("u00", &event("u00-extra", "k")).await.unwrap();
    let all = heads(b).await;
    assert_eq!(all.last().unwrap(), &("zz".to_owned(), "zz-00".to_owned(), NOW, None, 1));
    assert_eq!(all[0].4, EACH as i64 + 1 - i64::from(moved.contains("u00")));
    assert_eq!(event_ids(&claim(ev, "n3", NOW + 5_000).await), ["zz-00"]);
    // A user's last event delivered: no head left.
    let zz_head = heads(b).await.into_iter().find(|h| h.0 == "zz").unwrap();
    assert_eq!(zz_head.3.as_deref(), Some("n3"));
    b.backend.events.release_leases("n3").await.unwrap();
    let zz = claim(ev, "n4", NOW + 5_000).await.into_iter().find(|e| e.user_id == "zz").unwrap();
    assert!(ev.event_done(&zz).await.unwrap());
    assert!(heads(b).await.iter().all(|h| h.0 != "zz"));
    assert_eq!(ev.pending_events().await.unwrap(), (USERS * EACH - some.len() + 1) as u64);
}

/// Leases are fences: after A's lease expired and B claimed the event again, A's late result (delivered
/// or failed) changes nothing, and the user's next event stays behind B's claim. A lease that expired
/// without being taken over still holds.
async fn webhook_results_after_a_lost_lease_change_nothing(b: &TestBackend) {
    let ev = b.backend.events.as_ref();
    ev.record_event("u1", &event("a1", "k")).await.unwrap();
    ev.record_event("u1", &event("a2", "k")).await.unwrap();
    ev.record_event("u2", &event("b1", "k")).await.unwrap();
    let a = ev.claim_events("A", NOW, 1000, 10).await.unwrap();
    assert_eq!(event_ids(&a), ["a1", "b1"]);
    // A's attempts outlive their lease; B claims both again.
    let taken = ev.claim_events("B", NOW + 1000, 1000, 10).await.unwrap();
    assert_eq!(event_ids(&taken), ["a1", "b1"]);
    assert!(!ev.event_done(&a[0]).await.unwrap(), "A's late delivery must not delete B's event");
    assert!(!ev.event_failed(&a[1], 1, NOW + 1001).await.unwrap(), "nor reschedule it");
    assert!(claim(ev, "C", NOW + 1001).await.is_empty(), "a2 waits behind B's claim of a1, b1 stays B's");
    assert_eq!(ev.pending_events().await.unwrap(), 3);
    // B's results count.
    assert!(ev.event_done(&taken[0]).await.unwrap());
    assert!(ev.event_failed(&taken[1], 1, NOW + 5000).await.unwrap());
    let next = claim(ev, "C", NOW + 1999).await;
    assert_eq!(event_ids(&next), ["a2"]);
    assert_eq!(claim(ev, "C", NOW + 5000).await[0].attempts, 1);
    // C's lease on a2 ends unclaimed by anyone else: C's late result still holds.
    assert!(ev.event_done(&next[0]).await.unwrap());
    assert_eq!(ev.pending_events().await.unwrap(), 1);
}

/// Ties in listings are broken by the bytes of the ids, as SQLite and the cache compare them, whatever
/// the database's collation. The test database's collation is C, so on PostgreSQL the id columns are
/// given ICU's root collation ("a1" before "B1") when the server has it: the queries must say `COLLATE "C"`.
async fn text_ties_are_ordered_by_bytes(b: &TestBackend) {
    if let Place::Postgres(schema) = &b.place {
        let mut conn = schema.connect().await;
        let icu: Option<String> =
            sqlx::query_scalar("SELECT collname::text FROM pg_collation WHERE collname = 'und-x-icu'")
                .fetch_optional(&mut conn)
                .await
                .unwrap();
        if icu.is_some() {
            for sql in [
                r#"ALTER TABLE chats ALTER COLUMN chat_id TYPE TEXT COLLATE "und-x-icu""#,
                r#"ALTER TABLE users ALTER COLUMN user_id TYPE TEXT COLLATE "und-x-icu""#,
            ] {
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
        } else {
            eprintln!("note: no ICU collation on this server; the tie order is checked under its own");
        }
    }
    users(b, &["a1", "B1", "alice"]).await;
    let ids: Vec<String> = b.backend.identity.users().await.unwrap().into_iter().map(|u| u.user_id).collect();
    assert_eq!(ids, ["B1", "a1", "alice"]);
    let s = b.backend.chats.as_ref();
    for chat in ["a1", "B1", "_x"] {
        applied(write(s, title("alice", chat, "t", create(), None, 100)).await);
    }
    let order: Vec<String> = s.chats("alice").await.unwrap().into_iter().map(|c| c.chat_id).collect();
    assert_eq!(order, ["B1", "_x", "a1"]);
}

/// A database whose outbox predates the heads (migrations up to `0006` on SQLite, `0010` on PostgreSQL)
/// gets them filled from its events when a store opens it: each user's oldest event, with its schedule
/// and lease, not due before any lease of the user ends, counting the user's events.
mod heads_migration {
    use super::backends;
    use chatsync::store::events::EventStore;
    use chatsync::store::{self, Durability};

    const NOW: i64 = 1_000;

    /// (event id, user, attempts, next attempt, lease owner, lease until).
    type OldRow = (&'static str, &'static str, i64, i64, Option<&'static str>, i64);

    /// The outbox before the heads, in id order.
    const OLD_ROWS: [OldRow; 6] = [
        ("a1", "u1", 2, NOW + 500, None, 0),
        ("b1", "u2", 0, NOW, Some("old"), NOW + 1000),
        ("a2", "u1", 0, NOW, None, 0),
        ("c1", "u3", 0, NOW, None, 0),
        ("c2", "u3", 0, NOW, Some("odd"), NOW + 2000),
        ("a3", "u1", 0, NOW, None, 0),
    ];

    fn insert(blob: &str) -> String {
        let rows: Vec<String> = OLD_ROWS
            .iter()
            .map(|(id, user, attempts, next, owner, until)| {
                let owner = owner.map_or("NULL".to_owned(), |o| format!("'{o}'"));
                format!("('{id}', '{user}', 'k', NULL, {blob}, {NOW}, {attempts}, {next}, {owner}, {until})")
            })
            .collect();
        format!(
            "INSERT INTO webhook_events (event_id, user_id, kind, seq, body, created_at, attempts, next_attempt_at, \
             lease_owner, lease_until) VALUES {}",
            rows.join(", ")
        )
    }

    async fn older(dir: &str, last: i64) -> sqlx::migrate::Migrator {
        let mut migrator = sqlx::migrate::Migrator::new(std::path::Path::new(&format!(
            "{}/migrations/{dir}",
            env!("CARGO_MANIFEST_DIR")
        )))
        .await
        .unwrap();
        let kept: Vec<_> = migrator.migrations.iter().filter(|m| m.version <= last).cloned().collect();
        assert_eq!(kept.len() as i64, last);
        migrator.migrations = kept.into();
        migrator
    }

    async fn check(ev: &dyn EventStore) {
        let ids = |events: Vec<chatsync::store::events::PendingEvent>| {
            events.into_iter().map(|e| (e.event_id, e.attempts)).collect::<Vec<_>>()
        };
        let claim = |now| ev.claim_events("new", now, 60_000, 10);
        assert_eq!(ev.pending_events().await.unwrap(), 6);
        assert!(claim(NOW).await.unwrap().is_empty(), "u1 retries later, u2 and u3 are leased");
        ev.release_leases("old").await.unwrap();
        assert_eq!(ids(claim(NOW).await.unwrap()), [("b1".to_owned(), 0)]);
        assert_eq!(ids(claim(NOW + 500).await.unwrap()), [("a1".to_owned(), 2)]);
        assert!(claim(NOW + 1999).await.unwrap().is_empty(), "u3's head waits for the lease on its later row");
        assert_eq!(ids(claim(NOW + 2000).await.unwrap()), [("c1".to_owned(), 0)]);
    }

    #[tokio::test]
    async fn sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chatsync.db");
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        older("sqlite", 6).await.run(&pool).await.unwrap();
        sqlx::query(&insert("X'00'")).execute(&pool).await.unwrap();
        pool.close().await;
        let backend = store::open_backend(&format!("sqlite://{}", path.display()), Durability::Full).await.unwrap();
        check(backend.events.as_ref()).await;
        backend.identity.close().await;
    }

    #[tokio::test]
    async fn postgres() {
        let Some(schema) = backends::PgSchema::create().await else { return };
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&schema.url).await.unwrap();
        older("postgres", 10).await.run(&pool).await.unwrap();
        sqlx::query(&insert("'\\x00'::bytea")).execute(&pool).await.unwrap();
        pool.close().await;
        let backend = store::open_backend(&schema.url, Durability::Full).await.unwrap();
        check(backend.events.as_ref()).await;
        backend.identity.close().await;
    }
}

/// PostgreSQL: a user's head delivered while another event of the user is being inserted (its
/// transaction not yet committed) is passed on to that event, never dropped with it left headless: the
/// insert's trigger holds the head row's lock until its commit, and `event_done` waits for that lock
/// before it looks for the user's next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_head_passed_on_while_an_event_commits_keeps_it() {
    use sqlx::Connection as _;
    let Some(b) = backends::postgres().await else { return };
    let Place::Postgres(schema) = &b.place else { unreachable!() };
    let ev = b.backend.events.clone();
    ev.record_event("u1", &event("a1", "k")).await.unwrap();
    let claimed = claim(ev.as_ref(), "n1", NOW).await;
    assert_eq!(event_ids(&claimed), ["a1"]);
    let mut conn = schema.connect().await;
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO webhook_events (event_id, user_id, kind, body, created_at, next_attempt_at) \
         VALUES ('a2', 'u1', 'k', '\\x00'::bytea, $1, $1)",
    )
    .bind(NOW)
    .execute(&mut *tx)
    .await
    .unwrap();
    let done = tokio::spawn({
        let (ev, a1) = (ev.clone(), claimed[0].clone());
        async move { ev.event_done(&a1).await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!done.is_finished(), "event_done waits for the inserting transaction");
    tx.commit().await.unwrap();
    assert!(done.await.unwrap());
    assert_eq!(event_ids(&claim(ev.as_ref(), "n1", NOW).await), ["a2"]);
    assert_eq!(ev.pending_events().await.unwrap(), 1);
    heads(&b).await;
}

/// PostgreSQL: a user's events are claimed in the order they commit, even when a standalone event
/// (`record_event`) is recorded while a chat write batch of the same user is in flight, its event's id
/// drawn but not yet inserted. The standalone insert waits for the batch's owner lock, so it draws the
/// later id; it drew the lower-numbered batch event's successor at once before, and its head row came
/// first: the newer event was delivered before the older. The batch is played here by a transaction
/// doing what `chatsync_write_batch_locked` and the batch's event insert do, in their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_standalone_event_waits_for_a_batch_of_its_user_in_flight() {
    use sqlx::Connection as _;
    let Some(b) = backends::postgres().await else { return };
    let Place::Postgres(schema) = &b.place else { unreachable!() };
    let ev = b.backend.events.clone();
    let mut conn = schema.connect().await;
    let mut batch = conn.begin().await.unwrap();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(1668481025, hashtext(coalesce(current_schema(), '') || chr(31) || 'u1'))",
    )
    .execute(&mut *batch)
    .await
    .unwrap();
    let batch_id: i64 = sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('webhook_events', 'id'))")
        .fetch_one(&mut *batch)
        .await
        .unwrap();
    let standalone = tokio::spawn({
        let ev = ev.clone();
        async move { ev.record_event("u1", &event("a2", "stream.cancel_requested")).await.unwrap() }
    });
    // Until the standalone insert is done, or waits for the owner lock.
    let mut watcher = schema.connect().await;
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND classid = 1668481025 AND objsubid = 2 \
             AND objid = hashtext(coalesce(current_schema(), '') || chr(31) || 'u1')::oid)",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting || standalone.is_finished() {
            break;
        }
        tokio::task::yield_now().await;
    }
    sqlx::query(
        "INSERT INTO webhook_events (id, event_id, user_id, kind, seq, body, created_at, next_attempt_at) \
         OVERRIDING SYSTEM VALUE VALUES ($1, 'a1', 'u1', 'message.created', 1, '\\x00'::bytea, $2, $2)",
    )
    .bind(batch_id)
    .bind(NOW)
    .execute(&mut *batch)
    .await
    .unwrap();
    batch.commit().await.unwrap();
    standalone.await.unwrap();
    let first = claim(ev.as_ref(), "n1", NOW).await;
    assert_eq!(event_ids(&first), ["a1"], "the event committed first goes first");
    assert!(ev.event_done(&first[0]).await.unwrap());
    assert_eq!(event_ids(&claim(ev.as_ref(), "n1", NOW).await), ["a2"]);
    heads(&b).await;
}

/// PostgreSQL: a lone write that PostgreSQL rolls back as a deadlock's victim runs once more (it did not
/// commit), as the same write in a larger batch is retried op by op, instead of failing with
/// `unavailable`. The deadlock is another transaction's: it holds a new chat id's unique index entry
/// (bob's chat `x`, not yet committed) when the write, creating `x` for alice, has taken alice's owner
/// lock and waits for that entry; the transaction then asks for alice's owner lock. PostgreSQL's deadlock
/// check aborts the write, which began waiting first; run again once the other transaction committed, it
/// finds `x` taken by bob: `NotFound`. The owner lock, not alice's `users` row: an advisory lock is
/// granted to its waiter when the victim's abort releases it, so the run again queues behind the other
/// transaction; a row lock is taken by whoever gets to the row first, and the run again could take it
/// before the waiter woke up and deadlock once more (it did, in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_lone_write_rolled_back_by_a_deadlock_runs_again() {
    use sqlx::Connection as _;
    let Some(b) = backends::postgres().await else { return };
    let Place::Postgres(schema) = &b.place else { unreachable!() };
    users(&b, &["alice", "bob"]).await;
    let s = b.backend.chats.clone();
    let mut conn = schema.connect().await;
    let mut other = conn.begin().await.unwrap();
    // The write's deadlock check (the server's 1 s) runs long before this transaction's would, however
    // loaded the machine: the write is the victim, always (a superuser setting; the tests connect as one).
    sqlx::query("SET LOCAL deadlock_timeout = '60s'").execute(&mut *other).await.unwrap();
    let xid: String = sqlx::query_scalar("SELECT (pg_current_xact_id()::text::bigint % 4294967296)::text")
        .fetch_one(&mut *other)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO chats (chat_id, owner, chat_key, kek_id, last_edited_ms, created_at) \
         VALUES ('x', 'bob', '\\x00'::bytea, 'k1', 1, 1)",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let write = tokio::spawn(async move { s.write(title("alice", "x", "t", create(), None, NOW)).await });
    // Until the write waits for the other transaction's index entry.
    let mut watcher = schema.connect().await;
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted \
             AND transactionid::text = $1)",
        )
        .bind(&xid)
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting {
            break;
        }
        assert!(!write.is_finished(), "the write ended before it waited: {:?}", write.await);
        tokio::task::yield_now().await;
    }
    // Alice's owner lock, as the write batch takes it (migration 0010_owner_locks_per_schema.sql).
    sqlx::query(
        "SELECT pg_advisory_xact_lock(1668481025, hashtext(coalesce(current_schema(), '') || chr(31) || 'alice'))",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    other.commit().await.unwrap();
    assert_eq!(write.await.unwrap().unwrap(), WriteResult::NotFound, "run again after the deadlock");
    assert_eq!(
        b.backend.chats.chat_lookup("x").await.unwrap(),
        ChatLookup::Exists { owner: "bob".into(), key: WrappedKey { wrapped: vec![0], kek_id: "k1".into() } }
    );
}
