//! `sync_offline_changes` end to end (PROTOCOL.md section 6): per-change results (applied, conflict,
//! error) in order, counts, broadcasts, limits, the cross-user case, and atomicity of the version check
//! against a concurrent live update.

mod common;
#[macro_use]
mod sync_util;

use chatsync_protocol::*;
use common::TestServer;
use serde_json::json;
use sync_util::*;

fn result_summary(r: &OfflineResult) -> (Option<&str>, OfflineStatus, Option<ErrorCode>) {
    (r.change_id.as_deref(), r.status, r.code)
}

#[tokio::test]
async fn one_batch_reports_applied_conflict_and_error_results_in_order_with_counts() {
    let server = TestServer::start_with(|c| c.max_title_chars = 10).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "v1").await;
    set_title(&mut alice, "c1", "v2").await; // title_v 2
    set_draft(&mut alice, "c2", doc("d1")).await; // draft_v 1

    let changes = json!([
        off_title("ok-title", "c1", "offline", 2),
        { "change_id": "no-chat", "type": "title", "value": "x", "version_before_edit": 0 },
        off_title("stale-title", "c1", "stale", 1),
        off_draft("ok-draft", "c2", doc("offline draft"), 1),
        { "change_id": "bad-type", "chat_id": "c1", "type": "rename", "value": "x", "version_before_edit": 9 },
        off_title("too-long", "c1", "far too long title", 9),
        off_draft("stale-draft", "c2", doc("stale"), 0),
        { "change_id": "bad-value", "chat_id": "c1", "type": "title", "value": 5, "version_before_edit": 9 },
        { "change_id": "no-version", "chat_id": "c1", "type": "title", "value": "x" },
    ]);
    let (_, done) = offline_round(&mut alice, changes).await;
    assert_eq!((done.processed, done.conflicts, done.errors), (2, 2, 5), "{done:?}");
    let got: Vec<_> = done.results.iter().map(result_summary).collect();
    use ErrorCode::*;
    use OfflineStatus::*;
    assert_eq!(
        got,
        [
            (Some("ok-title"), Applied, None),
            (Some("no-chat"), Error, Some(InvalidPayload)),
            (Some("stale-title"), Conflict, None),
            (Some("ok-draft"), Applied, None),
            (Some("bad-type"), Error, Some(InvalidPayload)),
            (Some("too-long"), Error, Some(LimitExceeded)),
            (Some("stale-draft"), Conflict, None),
            (Some("bad-value"), Error, Some(InvalidPayload)),
            (Some("no-version"), Error, Some(InvalidPayload)),
        ]
    );
    let r = &done.results;
    // Versions for applied and conflict results: the chat's versions after the change was handled.
    assert_eq!(r[0].versions, Some(Versions { messages_v: 0, title_v: 3, draft_v: 0 }));
    assert_eq!(r[2].versions, Some(Versions { messages_v: 0, title_v: 3, draft_v: 0 }));
    assert_eq!(r[3].versions, Some(Versions { messages_v: 0, title_v: 0, draft_v: 2 }));
    assert_eq!(r[6].versions, Some(Versions { messages_v: 0, title_v: 0, draft_v: 2 }));
    assert!([1, 4, 5, 7, 8].iter().all(|&i| r[i].versions.is_none()), "{r:?}");
    assert_eq!((r[0].chat_id.as_deref(), r[0].kind), (Some("c1"), Some(OfflineChangeType::Title)));
    assert_eq!((r[3].chat_id.as_deref(), r[3].kind), (Some("c2"), Some(OfflineChangeType::Draft)));
    assert_eq!(r[1].chat_id, None);
    assert_eq!(r[4].kind, None);

    // Only the applied changes took effect.
    let c1 = chat_state(&mut alice, "c1").await;
    assert_eq!((c1.title.as_deref(), c1.versions.title_v), (Some("offline"), 3));
    let c2 = chat_state(&mut alice, "c2").await;
    assert_eq!(c2.draft_json, Some(doc("offline draft").as_object().cloned()));
    assert_eq!(c2.versions.draft_v, 2);
}

#[tokio::test]
async fn applied_changes_are_broadcast_to_self_before_offline_sync_complete() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_draft(&mut alice, "c1", doc("to delete")).await;
    let changes = json!([
        off_title("1", "c1", "T", 0),
        off_title("2", "c1", "stale", 0),
        off_delete_draft("3", "c1", 1),
        off_draft("4", "c2", doc("new chat draft"), 0),
    ]);
    let (before, done) = offline_round(&mut alice, changes).await;
    assert_eq!((done.processed, done.conflicts, done.errors), (3, 1, 0));
    assert_eq!(before.len(), 3, "{before:?}");
    let t = expect_msg!(before[0], ChatTitleUpdated);
    assert_eq!((t.chat_id.as_str(), t.data.title.as_str(), t.versions.title_v), ("c1", "T", 1));
    assert_eq!(expect_msg!(before[1], DraftDeleted), DraftDeleted { chat_id: ChatId::new("c1").unwrap(), draft_v: 2 });
    let d = expect_msg!(before[2], ChatDraftUpdated);
    assert_eq!((d.chat_id.as_str(), d.versions.draft_v), ("c2", 1));
    assert_eq!(d.data.draft_json, doc("new chat draft").as_object().cloned());
    assert_quiet(&mut alice).await;
}

#[tokio::test]
async fn an_empty_change_list_still_gets_offline_sync_complete() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let (before, done) = offline_round(&mut alice, json!([])).await;
    assert!(before.is_empty());
    assert_eq!(done, OfflineSyncComplete { processed: 0, conflicts: 0, errors: 0, results: vec![] });
}

#[tokio::test]
async fn more_than_max_offline_changes_is_limit_exceeded_and_applies_nothing() {
    let server = TestServer::start_with(|c| c.max_offline_changes = 3).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let four: Vec<_> = (0..4).map(|i| off_title(&i.to_string(), &format!("c{i}"), "t", 0)).collect();
    let reply = alice.request(&offline(json!(four))).await.unwrap();
    assert_limit(&reply, "changes", "max_offline_changes");
    assert!(sync_all(&mut alice).await.server_chat_order.is_empty(), "nothing was applied");
    assert_quiet(&mut alice).await;

    let (_, done) = offline_round(&mut alice, json!(&four[..3])).await;
    assert_eq!(done.processed, 3);
}

#[tokio::test]
async fn a_missing_or_malformed_changes_list_is_invalid_payload() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    for payload in [json!({}), json!({ "changes": {} }), json!({ "changes": "x" })] {
        let reply = request_raw(&mut alice, "sync_offline_changes", payload).await;
        assert_error(&reply, ErrorCode::InvalidPayload, Some("changes"));
    }
}

#[tokio::test]
async fn offline_changes_to_unknown_chats_create_them_for_the_writer() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    let (_, done) =
        offline_round(&mut alice, json!([off_title("1", "new-t", "hello", 0), off_draft("2", "new-d", doc("d"), 0)]))
            .await;
    assert_eq!(done.processed, 2, "{done:?}");
    assert_eq!(done.results[0].versions, Some(Versions { messages_v: 0, title_v: 1, draft_v: 0 }));
    assert_eq!(done.results[1].versions, Some(Versions { messages_v: 0, title_v: 0, draft_v: 1 }));
    let r = sync_all(&mut alice).await;
    assert_eq!(entry(&r, "new-t").unwrap().title.as_deref(), Some("hello"));
    assert_eq!(entry(&r, "new-d").unwrap().draft_json, Some(doc("d").as_object().cloned()));
    assert!(sync_all(&mut bob).await.server_chat_order.is_empty());
}

#[tokio::test]
async fn changes_in_one_batch_apply_in_order_each_against_the_previous_result() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let changes = json!([
        off_title("1", "c1", "first", 0),
        off_title("2", "c1", "second", 1),
        off_title("3", "c1", "lost", 1),
        off_draft("4", "c1", doc("a"), 0),
        off_draft("5", "c1", json!(null), 1),
        off_delete_draft("6", "c1", 2),
    ]);
    let (_, done) = offline_round(&mut alice, changes).await;
    let statuses: Vec<_> = done.results.iter().map(|r| r.status).collect();
    use OfflineStatus::*;
    // "6": the draft is already gone, which is what the client wanted: applied without an event.
    assert_eq!(statuses, [Applied, Applied, Conflict, Applied, Applied, Applied]);
    let title_vs: Vec<_> = done.results[..3].iter().map(|r| r.versions.unwrap().title_v).collect();
    assert_eq!(title_vs, [1, 2, 2]);
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.title.as_deref(), Some("second"));
    assert_eq!(state.draft_json, Some(None));
    assert_eq!(state.versions.title_v, 2);
    assert_eq!(state.versions.draft_v, 2, "the no-op draft deletion does not bump draft_v");
}

#[tokio::test]
async fn offline_delete_draft_applies_when_current_and_conflicts_when_stale() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_draft(&mut alice, "c1", doc("one")).await;
    set_draft(&mut alice, "c1", doc("two")).await; // draft_v 2
    let (before, done) = offline_round(&mut alice, json!([off_delete_draft("stale", "c1", 1)])).await;
    assert!(before.is_empty(), "a conflict is not broadcast: {before:?}");
    assert_eq!(done.results[0].status, OfflineStatus::Conflict);
    assert_eq!(done.results[0].versions.unwrap().draft_v, 2);
    assert_eq!(chat_state(&mut alice, "c1").await.draft_json, Some(doc("two").as_object().cloned()));

    let (before, done) = offline_round(&mut alice, json!([off_delete_draft("ok", "c1", 2)])).await;
    assert_eq!(done.results[0].status, OfflineStatus::Applied);
    assert_eq!(done.results[0].versions.unwrap().draft_v, 3);
    assert_eq!(expect_msg!(before[0], DraftDeleted).draft_v, 3);
    assert_eq!(chat_state(&mut alice, "c1").await.draft_json, Some(None));

    // No draft any more: a deletion made before the last one is still a conflict (the draft moved on since
    // the client saw it), one made after it is applied, and neither changes anything.
    let (before, done) = offline_round(&mut alice, json!([off_delete_draft("late", "c1", 2)])).await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!((done.results[0].status, done.results[0].versions.unwrap().draft_v), (OfflineStatus::Conflict, 3));
    let (before, done) = offline_round(&mut alice, json!([off_delete_draft("again", "c1", 3)])).await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!((done.results[0].status, done.results[0].versions.unwrap().draft_v), (OfflineStatus::Applied, 3));
}

#[tokio::test]
async fn an_offline_draft_without_a_value_is_an_error_and_keeps_the_draft() {
    // The live `update_draft` requires `draft_json`, even when null; an offline draft change without
    // `value` is malformed too, not a deletion of the draft on every device.
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut phone = another_device(&server, "alice", "phone").await;
    set_draft(&mut alice, "c1", doc("keep me")).await;
    expect_msg!(phone.recv().await.unwrap(), ChatDraftUpdated);
    let change = json!({ "change_id": "no-value", "chat_id": "c1", "type": "draft", "version_before_edit": 1 });
    let (before, done) = offline_round(&mut alice, json!([change])).await;
    assert!(before.is_empty(), "nothing is applied: {before:?}");
    let got: Vec<_> = done.results.iter().map(result_summary).collect();
    assert_eq!(got, [(Some("no-value"), OfflineStatus::Error, Some(ErrorCode::InvalidPayload))]);
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!((state.versions.draft_v, state.draft_json), (1, Some(doc("keep me").as_object().cloned())));
    assert_quiet(&mut phone).await;

    // A draft deletion's `value` is ignored: it may be left out.
    let change = json!({ "change_id": "del", "chat_id": "c1", "type": "delete_draft", "version_before_edit": 1 });
    let (_, done) = offline_round(&mut alice, json!([change])).await;
    assert_eq!(done.results[0].status, OfflineStatus::Applied);
}

#[tokio::test]
async fn offline_drafts_obey_the_draft_limits_of_the_live_message() {
    let server = TestServer::start_with(|c| {
        c.max_draft_chars = 10;
        c.max_draft_words = 2;
    })
    .await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let heading = json!({ "type": "doc", "content": [{ "type": "heading", "content": [{ "type": "text", "text": "abcdefghijk" }] }] });
    let changes = json!([
        off_draft("chars", "c1", heading, 0),
        off_draft("words", "c1", doc("one two three"), 0),
        off_draft("ok", "c1", doc("one two"), 0),
        off_draft("not-object", "c1", json!("text"), 1),
    ]);
    let (_, done) = offline_round(&mut alice, changes).await;
    let got: Vec<_> = done.results.iter().map(result_summary).collect();
    use OfflineStatus::*;
    assert_eq!(
        got,
        [
            (Some("chars"), Error, Some(ErrorCode::LimitExceeded)),
            (Some("words"), Error, Some(ErrorCode::LimitExceeded)),
            (Some("ok"), Applied, None),
            (Some("not-object"), Error, Some(ErrorCode::InvalidPayload)),
        ]
    );
    assert_eq!(chat_state(&mut alice, "c1").await.versions.draft_v, 1);
}

/// An offline draft change obeys the draft depth limit (`Limits::MAX_DRAFT_DEPTH`) like `update_draft`:
/// at the limit it is applied, one level more is a `limit_exceeded` result and changes nothing.
#[tokio::test]
async fn offline_drafts_obey_the_draft_depth_limit() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let nested = |levels: usize| (1..levels).fold(json!({ "text": "x" }), |inner, _| json!({ "a": inner }));
    let changes = json!([
        off_draft("over", "c1", nested(Limits::MAX_DRAFT_DEPTH + 1), 0),
        off_draft("at", "c1", nested(Limits::MAX_DRAFT_DEPTH), 0),
        off_draft("over-again", "c1", nested(Limits::MAX_DRAFT_DEPTH + 1), 1),
    ]);
    let (_, done) = offline_round(&mut alice, changes).await;
    let got: Vec<_> = done.results.iter().map(result_summary).collect();
    use OfflineStatus::*;
    assert_eq!(
        got,
        [
            (Some("over"), Error, Some(ErrorCode::LimitExceeded)),
            (Some("at"), Applied, None),
            (Some("over-again"), Error, Some(ErrorCode::LimitExceeded)),
        ]
    );
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!(state.versions.draft_v, 1);
    assert_eq!(state.draft_json, Some(nested(Limits::MAX_DRAFT_DEPTH).as_object().cloned()));
}

#[tokio::test]
async fn offline_changes_to_another_users_chat_are_not_found_errors_and_change_nothing() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut bob = new_user(&server, "bob", "phone").await;
    set_title(&mut alice, "c1", "alice").await;
    set_draft(&mut alice, "c1", doc("alice")).await;
    let before = chat_state(&mut alice, "c1").await;
    let changes = json!([
        off_title("t", "c1", "bob", 99),
        off_draft("d", "c1", doc("bob"), 99),
        off_draft("n", "c1", json!(null), 99),
        off_delete_draft("x", "c1", 99),
    ]);
    let (before_msgs, done) = offline_round(&mut bob, changes).await;
    assert!(before_msgs.is_empty());
    assert_eq!((done.processed, done.conflicts, done.errors), (0, 0, 4));
    for r in &done.results {
        assert_eq!((r.status, r.code, r.versions), (OfflineStatus::Error, Some(ErrorCode::NotFound), None), "{r:?}");
    }
    assert_eq!(chat_state(&mut alice, "c1").await, before);
    assert_quiet(&mut alice).await;
    assert!(!lists_chat(&mut bob, "c1").await);
}

#[tokio::test]
async fn a_conflict_leaves_the_component_unchanged_and_reports_current_versions() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "server").await;
    set_title(&mut alice, "c1", "server 2").await;
    add_message(&mut alice, "c1", "m1", json!("x")).await;
    let (before, done) = offline_round(&mut alice, json!([off_title("t", "c1", "client", 1)])).await;
    assert!(before.is_empty());
    assert_eq!(done.results[0].status, OfflineStatus::Conflict);
    assert_eq!(done.results[0].versions, Some(Versions { messages_v: 1, title_v: 2, draft_v: 0 }));
    let state = chat_state(&mut alice, "c1").await;
    assert_eq!((state.title.as_deref(), state.versions.title_v), (Some("server 2"), 2));
}

/// A live `update_title` from device A and an offline title change from device B edited from the title
/// version before A's update, sent concurrently. Whatever the order, the result must be one of the two
/// serial outcomes: B first (B applied with title_v v0+1, then A with v0+2) or A first (B a conflict).
/// B applied *after* A (a lost update) is the failure.
#[tokio::test]
async fn offline_title_change_racing_a_live_update_is_serialized() {
    let server = TestServer::start().await;
    let mut a = new_user(&server, "alice", "device-a").await;
    let mut b = another_device(&server, "alice", "device-b").await;
    let (mut b_applied, mut b_conflict) = (0, 0);
    for round in 0..8 {
        let chat = format!("race{round}");
        let v0 = set_title(&mut a, &chat, "base").await.versions.title_v;
        assert_eq!(v0, 1);
        let a_id = format!("a{round}");
        let b_id = format!("b{round}");
        let live = title(&chat, "live from A");
        let off = offline(json!([off_title("b", &chat, "offline from B", v0 as i64)]));
        // Both are in flight before either reply is read; who is sent first alternates.
        if round % 2 == 0 {
            let (sa, sb) = tokio::join!(a.send(&live, Some(&a_id)), b.send(&off, Some(&b_id)));
            sa.unwrap();
            sb.unwrap();
        } else {
            let (sb, sa) = tokio::join!(b.send(&off, Some(&b_id)), a.send(&live, Some(&a_id)));
            sa.unwrap();
            sb.unwrap();
        }

        let a_title = expect_msg!(a.recv_reply(&a_id).await.unwrap(), ChatTitleUpdated);
        let done = loop {
            let m = b.recv_reply(&b_id).await.unwrap();
            if let ServerMessage::OfflineSyncComplete(done) = m.message {
                break done;
            }
        };
        let result = &done.results[0];
        let state = chat_state(&mut a, &chat).await;
        assert_eq!(state.title.as_deref(), Some("live from A"), "A's update is never lost (round {round})");
        match result.status {
            OfflineStatus::Applied => {
                b_applied += 1;
                assert_eq!(result.versions.unwrap().title_v, v0 + 1, "B applied first (round {round})");
                assert_eq!(a_title.versions.title_v, v0 + 2, "then A (round {round})");
                assert_eq!(state.versions.title_v, v0 + 2);
            }
            OfflineStatus::Conflict => {
                b_conflict += 1;
                assert_eq!(a_title.versions.title_v, v0 + 1, "A committed first (round {round})");
                assert_eq!(result.versions.unwrap().title_v, v0 + 1);
                assert_eq!(state.versions.title_v, v0 + 1);
            }
            OfflineStatus::Error => panic!("unexpected error {result:?}"),
        }
        // The other device's broadcasts stay buffered; `request`/`recv_reply` skip them.
    }
    eprintln!("race outcomes: B applied {b_applied}, B conflict {b_conflict}");
    assert_eq!(b_applied + b_conflict, 8);
}

#[tokio::test]
async fn an_offline_change_to_an_unknown_chat_creates_it_whatever_its_version_before_edit() {
    // A chat that does not exist has no version a change could conflict with (docs/PROTOCOL.md §8).
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let (before, done) = offline_round(&mut alice, json!([off_title("t", "fresh", "x", -1)])).await;
    assert_eq!(before.len(), 1, "the applied change is broadcast: {before:?}");
    assert_eq!(done.results[0].status, OfflineStatus::Applied, "{done:?}");
    assert_eq!(done.results[0].versions.unwrap().title_v, 1);
    assert!(lists_chat(&mut alice, "fresh").await);
}

/// docs/PROTOCOL.md section 8: an offline change to a chat that does not exist creates it and applies;
/// for `delete_draft` the created chat has no draft, which is the state the client wanted.
#[tokio::test]
async fn offline_delete_draft_of_an_unknown_chat_creates_it_and_applies() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    // Whatever `version_before_edit` says (as for titles and drafts: there is no version to conflict with).
    for (chat, version_before_edit) in [("fresh", 0), ("fresh2", -1)] {
        let (before, done) = offline_round(&mut alice, json!([off_delete_draft("x", chat, version_before_edit)])).await;
        assert!(before.is_empty(), "no draft was deleted, nothing to broadcast: {before:?}");
        assert_eq!((done.processed, done.conflicts, done.errors), (1, 0, 0), "{chat}");
        assert_eq!(done.results[0].status, OfflineStatus::Applied);
        assert_eq!(done.results[0].versions, Some(Versions { messages_v: 0, title_v: 0, draft_v: 0 }));
        let state = chat_state(&mut alice, chat).await;
        assert_eq!(state.draft_json, Some(None));
    }
    // The live message still answers not_found for an unknown chat (section 8).
    assert_not_found(&alice.request(&delete_draft("unknown")).await.unwrap());
}

/// A `version_before_edit` below every version (negative): the component's version (0 at least) is greater,
/// so each type of change to an existing chat is a conflict (PROTOCOL.md), `delete_draft` of a chat that
/// never had a draft too (docs/PROTOCOL.md section 8: applied only if `draft_v` is at most it).
#[tokio::test]
async fn offline_changes_to_an_existing_chat_made_before_version_zero_are_conflicts() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    add_message(&mut alice, "c1", "m1", json!("hi")).await; // a chat with no title and no draft
    let changes =
        json!([off_title("t", "c1", "x", -1), off_draft("d", "c1", doc("x"), -1), off_delete_draft("dd", "c1", -1),]);
    let (before, done) = offline_round(&mut alice, changes).await;
    assert!(before.is_empty(), "{before:?}");
    let statuses: Vec<_> = done.results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [OfflineStatus::Conflict; 3], "{done:?}");
}
