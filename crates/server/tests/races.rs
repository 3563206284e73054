//! Races at their worst interleaving, made deterministic with the server's pause points
//! (`chatsync::pause`): a request is held at a named point while others run, then let go.
//! Each test failed before the fix it guards.

#[macro_use]
mod sync_util;
mod common;

use chatsync::pause::{WARMUP_LOADED, WRITE_COMMITTED};
use chatsync_client::Client;
use chatsync_protocol::*;
use common::TestServer;
use serde_json::json;
use std::time::Duration;
use sync_util::*;

/// A draft write commits, then a `delete_chat` of the same chat commits and is merged into the cache,
/// then the draft's result is merged: the chat must stay deleted (it used to be re-inserted, and came
/// back in initial sync as `new_chat`, still decryptable from the cached key).
#[tokio::test]
async fn a_write_merged_after_a_delete_does_not_bring_the_chat_back() {
    let server = TestServer::start().await;
    let (mut laptop, mut phone, held) = a_draft_held_after_its_commit(&server).await;
    let deleted = phone.request(&delete_chat("c1")).await.unwrap();
    expect_msg!(deleted, ChatDeleted);
    held.release();
    // The draft was committed before the delete, so it is confirmed; then the delete reaches the laptop.
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(laptop.recv().await.unwrap());
    }
    assert!(got.iter().any(|m| matches!(m.message, ServerMessage::DraftUpdateConfirmed(_))), "{got:?}");
    assert!(got.iter().any(|m| matches!(m.message, ServerMessage::ChatDeleted(_))), "{got:?}");
    // The draft's broadcast was due before the laptop's answer: the phone, which had its chat_deleted,
    // does not get the chat back from it (everything queued for it comes before this pong).
    let pong = phone.request(&ping()).await.unwrap();
    expect_msg!(pong, Pong);
    assert_eq!(phone.buffered(), 0);

    for device in [&mut laptop, &mut phone] {
        let sync = sync_with(device, json!({ "c1": { "messages_v": 0, "title_v": 1, "draft_v": 0 } }), None).await;
        assert_eq!(ids(&sync.chat_ids_to_delete), ["c1"]);
        assert!(entry(&sync, "c1").is_none(), "a deleted chat came back: {sync:?}");
        assert!(sync.server_chat_order.is_empty());
    }
    // And writes to it stay refused.
    assert_not_found(&laptop.request(&title("c1", "again")).await.unwrap());
}

/// As above, but the delete's answer is lost (it committed; the phone hears `unavailable`), and a sync
/// reloads the chat list, without the chat, before the draft's result is merged: the chat must stay
/// deleted. It used to come back: the unknown outcome only dropped the cached list, so the late result
/// was merged into the reloaded one.
#[tokio::test]
async fn a_write_merged_after_a_delete_whose_answer_was_lost_does_not_bring_the_chat_back() {
    let server = TestServer::start().await;
    let faults = server.ctx.chats.writer_faults().expect("the SQLite store has a writer");
    let (mut laptop, mut phone, held) = a_draft_held_after_its_commit(&server).await;
    faults.lose_answer_next(1);
    assert_error(&phone.request(&delete_chat("c1")).await.unwrap(), ErrorCode::Unavailable, None);
    let sync = sync_all(&mut phone).await; // reloads the list from the store: c1 is gone
    assert!(entry(&sync, "c1").is_none(), "{sync:?}");
    held.release();
    let confirmed = laptop.recv_reply("d1").await.unwrap();
    assert!(matches!(confirmed.message, ServerMessage::DraftUpdateConfirmed(_)), "{confirmed:?}");

    for device in [&mut laptop, &mut phone] {
        let sync = sync_with(device, json!({ "c1": { "messages_v": 0, "title_v": 1, "draft_v": 0 } }), None).await;
        assert_eq!(ids(&sync.chat_ids_to_delete), ["c1"]);
        assert!(entry(&sync, "c1").is_none(), "a deleted chat came back: {sync:?}");
        assert!(sync.server_chat_order.is_empty());
    }
}

/// Alice's laptop and phone, chat c1 in the laptop's cached list, and a draft of the laptop's on c1
/// (request `d1`) held after its commit, before its result is merged into the cache.
async fn a_draft_held_after_its_commit(server: &TestServer) -> (Client, Client, chatsync::pause::Paused) {
    let mut laptop = new_user(server, "alice", "laptop").await;
    let mut phone = another_device(server, "alice", "phone").await;
    set_title(&mut laptop, "c1", "doomed").await;
    expect_msg!(phone.recv().await.unwrap(), ChatTitleUpdated);
    sync_all(&mut laptop).await; // the chat list is cached

    let mut held = server.ctx.pauses.arm(WRITE_COMMITTED);
    laptop.send(&draft("c1", doc("late")), Some("d1")).await.unwrap();
    held.reached().await;
    (laptop, phone, held)
}

/// A warm-up that loaded the chat list, then lost its user's last connection, must never store that
/// list over what a later connection sees: it is cancelled, and its load token can never match the
/// new cache entry (it used to: the per-user counter restarted at 0, and a deleted chat came back).
#[tokio::test]
async fn a_stale_warm_up_never_overwrites_a_newer_chat_list() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    {
        let (mut setup, _) = server.connect(&token, "laptop").await;
        set_title(&mut setup, "keep", "keep").await;
        set_title(&mut setup, "gone", "gone").await;
        setup.close().await.unwrap();
    }
    wait_for_no_connections(&server).await;

    // 1. A connection's warm-up loads [keep, gone] and is held before storing it.
    let mut held = server.ctx.pauses.arm(WARMUP_LOADED);
    let (mut first, _) = server.connect(&token, "laptop").await;
    held.reached().await;
    // 2. That connection deletes "gone", then closes: the user has no connection left.
    expect_msg!(first.request(&delete_chat("gone")).await.unwrap(), ChatDeleted);
    first.close().await.unwrap();
    wait_for_no_connections(&server).await;
    // 3. A new connection warms up completely (the chat list without "gone").
    let (mut second, _) = server.connect_raw(&token, "laptop").await;
    loop {
        if let ServerMessage::CachePrimed(_) = second.recv().await.unwrap().message {
            break;
        }
    }
    // 4. The old warm-up is let go.
    held.release();
    tokio::time::sleep(Duration::from_millis(50)).await; // give a wrongly surviving warm-up time to store

    let sync = sync_with(&mut second, json!({ "keep": {}, "gone": {} }), None).await;
    assert_eq!(ids(&sync.chat_ids_to_delete), ["gone"], "{sync:?}");
    assert_eq!(ids(&sync.server_chat_order), ["keep"]);
    assert!(server.ctx.cache.is_primed("alice").await);
}

/// No cache entry is created for a user without a connection, and none outlives the last one.
#[tokio::test]
async fn no_cache_entry_outlives_the_users_connections() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    set_title(&mut c, "c1", "t").await;
    sync_all(&mut c).await;
    assert!(server.ctx.cache.chats("alice").await.is_some());
    c.close().await.unwrap();
    wait_for_no_connections(&server).await;
    assert!(server.ctx.cache.chats("alice").await.is_none());
    // A load for a user with no connection stores nothing.
    let token = server.ctx.cache.begin_load("alice").await;
    assert!(!server.ctx.cache.put_chats("alice", token, Vec::new()).await);
    assert!(server.ctx.cache.chats("alice").await.is_none());
}

async fn wait_for_no_connections(server: &TestServer) {
    while server.ctx.hub.connection_count() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A backend's message commits, then the chat is deleted, then the user's devices all go and one comes
/// back (a fresh cache entry, its list loaded without the chat), then the message's result is merged:
/// it must not be taken for a new chat (it was, and initial sync listed the deleted chat).
#[tokio::test]
async fn a_write_merged_after_its_chat_was_deleted_is_not_taken_for_a_new_chat_by_a_later_cache_entry() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    set_title(&mut phone, "c1", "doomed").await;
    let (caller, held) = a_backend_message_held_after_its_commit(&server).await;
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    phone.close().await.unwrap();
    wait_for_no_connections(&server).await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    assert!(!lists_chat(&mut laptop, "c1").await, "the list, loaded after the deletion, is cached");
    held.release();
    assert_eq!(caller.await.unwrap(), 201, "committed before the deletion");
    assert!(!lists_chat(&mut laptop, "c1").await, "the late result did not bring the chat back");
}

/// A backend's message commits, then a device deletes the chat (every device has `chat_deleted`), then
/// the message is announced: no device may get it (a `chat_message_added` after `chat_deleted` shows a
/// client that does not remember deleted ids the chat again). The backend still has its 201.
#[tokio::test]
async fn a_backends_message_announced_after_its_chat_was_deleted_reaches_no_device() {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    set_title(&mut phone, "c1", "doomed").await;
    expect_msg!(laptop.recv().await.unwrap(), ChatTitleUpdated);
    let (caller, held) = a_backend_message_held_after_its_commit(&server).await;
    expect_msg!(phone.request(&delete_chat("c1")).await.unwrap(), ChatDeleted);
    expect_msg!(laptop.recv().await.unwrap(), ChatDeleted);
    held.release();
    assert_eq!(caller.await.unwrap(), 201, "committed before the deletion");
    // Anything the announcement queued comes before these (it finished before the 201).
    for device in [&mut phone, &mut laptop] {
        expect_msg!(device.request(&ping()).await.unwrap(), Pong);
        assert_eq!(device.buffered(), 0, "a message of the deleted chat was announced");
    }
}

/// A backend's message `a1` to alice's chat c1, held after its commit (before it is merged and announced);
/// the task answers the response's status.
async fn a_backend_message_held_after_its_commit(
    server: &TestServer,
) -> (tokio::task::JoinHandle<reqwest::StatusCode>, chatsync::pause::Paused) {
    let api = server.api().await;
    let mut held = server.ctx.pauses.arm(WRITE_COMMITTED);
    let (url, key) = (format!("{}/users/alice/chats/c1/messages", server.api_base()), api.key.clone());
    let caller = tokio::spawn(async move {
        let body = json!({"message_id": "a1", "sender_name": "assistant", "content": "hi"});
        reqwest::Client::new().post(url).bearer_auth(key).json(&body).send().await.unwrap().status()
    });
    held.reached().await;
    (caller, held)
}

/// An initial sync takes its snapshot of the chat list, then another device deletes one of its chats
/// (every device has `chat_deleted`, the syncing one too), then the sync's reply is built: it must not
/// list the deleted chat (it did, as `new_chat` or `updated_chat` and in `server_chat_order`, after the
/// device's `chat_deleted`: the device showed the chat again until its next sync), and a client that
/// knew the chat finds it in `chat_ids_to_delete`.
#[tokio::test]
async fn an_initial_sync_whose_snapshot_raced_a_deletion_does_not_bring_the_chat_back() {
    a_deletion_while_a_sync_is_held_at(chatsync::pause::SYNC_STREAMS_LISTED).await;
}

/// Likewise when the deletion comes after a part was made (on the blocking pool, where it is checked
/// against the deletions known) and before it is queued: the device had the chat's `chat_deleted` and
/// then the part listing the chat (found by `convergence.rs`: the hop back from the blocking pool is a
/// window of milliseconds on a loaded machine). The part is checked again once it is back.
#[tokio::test]
async fn an_initial_sync_part_made_as_its_chat_is_deleted_does_not_bring_the_chat_back() {
    a_deletion_while_a_sync_is_held_at(chatsync::pause::SYNC_PART).await;
}

/// Holds a laptop's initial sync at `point`, deletes a chat from the phone meanwhile, and checks the
/// reply that follows the laptop's `chat_deleted` leaves the chat out.
async fn a_deletion_while_a_sync_is_held_at(point: &'static str) {
    let server = TestServer::start().await;
    let mut phone = new_user(&server, "alice", "phone").await;
    let mut laptop = another_device(&server, "alice", "laptop").await;
    for chat in ["keep", "c1", "c2"] {
        set_title(&mut phone, chat, "t").await;
        expect_msg!(laptop.recv().await.unwrap(), ChatTitleUpdated);
    }
    // c1: new to the client (and its immediate-view chat); c2: known to the client, with an older title.
    let known = json!({ "keep": { "messages_v": 0, "title_v": 1, "draft_v": 0 },
                        "c2": { "messages_v": 0, "title_v": 0, "draft_v": 0 } });
    for (doomed, to_delete) in [("c1", &[][..]), ("c2", &["c2"][..])] {
        let mut held = server.ctx.pauses.arm(point);
        laptop.send(&sync_request(known.clone(), Some(doomed)), Some("sync")).await.unwrap();
        held.reached().await;
        expect_msg!(phone.request(&delete_chat(doomed)).await.unwrap(), ChatDeleted);
        held.release();
        // The laptop hears of the deletion first (queued while its sync was held), then gets its reply.
        let deleted = expect_msg!(laptop.recv().await.unwrap(), ChatDeleted);
        assert_eq!(deleted.chat_id.as_str(), doomed);
        let sync = expect_msg!(laptop.recv_reply("sync").await.unwrap(), InitialSyncResponse);
        assert!(entry(&sync, doomed).is_none(), "the deleted chat came back: {sync:?}");
        assert!(!sync.server_chat_order.iter().any(|id| id.as_str() == doomed), "{sync:?}");
        assert!(sync.server_chat_order.iter().any(|id| id.as_str() == "keep"), "{sync:?}");
        assert_eq!(ids(&sync.chat_ids_to_delete), to_delete, "{sync:?}");
        assert!(!sync.more);
    }
}
