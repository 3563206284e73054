//! Who receives what (PROTOCOL.md sections 3 and 6): alice on a phone and on two tabs of one laptop
//! (three connections on two devices; the tabs share the laptop's session), and bob on his phone. For every write: SELF gets the reply (with the `request_id`), OTHERS get the broadcast
//! (without one), ALL-broadcasts reach SELF too, and bob receives nothing.

mod common;
#[macro_use]
mod sync_util;

use chatsync_client::Client;
use chatsync_protocol::*;
use common::TestServer;
use serde_json::json;
use sync_util::*;

struct Devices {
    server: TestServer,
    phone: Client,
    tab1: Client,
    tab2: Client,
    bob: Client,
}

impl Devices {
    async fn start() -> Devices {
        let server = TestServer::start().await;
        let phone = new_user(&server, "alice", "phone").await;
        let laptop = server.token("alice").await;
        let (tab1, hello1) = server.connect(&laptop, "laptop").await;
        let (tab2, hello2) = server.connect(&laptop, "laptop").await;
        assert_ne!(hello1.connection_id, hello2.connection_id);
        let bob = new_user(&server, "bob", "phone").await;
        Devices { server, phone, tab1, tab2, bob }
    }

    /// Every connection but the phone (the sender in most tests): tab1, tab2.
    fn laptop_tabs(&mut self) -> [&mut Client; 2] {
        [&mut self.tab1, &mut self.tab2]
    }

    /// Asserts that no connection has anything pending (alice's three, then bob's).
    async fn all_quiet(&mut self) {
        for c in [&mut self.phone, &mut self.tab1, &mut self.tab2, &mut self.bob] {
            assert_quiet(c).await;
        }
    }
}

/// The next message on `c`, which must be a broadcast (no `request_id`).
async fn next_broadcast(c: &mut Client) -> Incoming {
    let m = c.recv().await.unwrap();
    assert_eq!(m.request_id, None, "a broadcast copy carries no request_id: {m:?}");
    m
}

#[tokio::test]
async fn update_draft_confirms_to_self_and_broadcasts_chat_draft_updated_to_others_only() {
    let mut d = Devices::start().await;
    let reply = d.phone.request(&draft("c1", doc("from the phone"))).await.unwrap();
    assert!(reply.request_id.is_some());
    let confirmed = expect_msg!(reply, DraftUpdateConfirmed);
    assert_eq!(confirmed.draft_v, 1);
    for tab in d.laptop_tabs() {
        let event = expect_msg!(next_broadcast(tab).await, ChatDraftUpdated);
        assert_eq!(event.chat_id.as_str(), "c1");
        assert_eq!(event.data.draft_json, doc("from the phone").as_object().cloned());
        assert_eq!(event.versions.draft_v, 1);
        assert_eq!(event.last_edited_overall_timestamp, confirmed.last_edited_overall_timestamp);
    }
    d.all_quiet().await;

    // Clearing with null is broadcast as an explicit null draft.
    let confirmed = expect_msg!(d.tab1.request(&draft("c1", json!(null))).await.unwrap(), DraftUpdateConfirmed);
    assert_eq!(confirmed.draft_v, 2);
    for c in [&mut d.phone, &mut d.tab2] {
        let event = expect_msg!(next_broadcast(c).await, ChatDraftUpdated);
        assert_eq!(event.data.draft_json, None);
        assert_eq!(event.versions.draft_v, 2);
    }
    d.all_quiet().await;
}

#[tokio::test]
async fn delete_draft_receipt_goes_to_self_and_draft_deleted_to_others_only() {
    let mut d = Devices::start().await;
    d.phone.request(&draft("c1", doc("x"))).await.unwrap();
    for tab in d.laptop_tabs() {
        expect_msg!(next_broadcast(tab).await, ChatDraftUpdated);
    }
    let reply = d.tab2.request(&delete_draft("c1")).await.unwrap();
    let receipt = expect_msg!(reply, DraftDeleteReceipt);
    assert!(receipt.success);
    assert_eq!(receipt.draft_v, Some(2));
    for c in [&mut d.phone, &mut d.tab1] {
        let event = expect_msg!(next_broadcast(c).await, DraftDeleted);
        assert_eq!(event, DraftDeleted { chat_id: ChatId::new("c1").unwrap(), draft_v: 2 });
    }
    d.all_quiet().await;
}

#[tokio::test]
async fn delete_draft_without_a_draft_is_answered_to_self_and_broadcast_to_nobody() {
    let mut d = Devices::start().await;
    set_title(&mut d.phone, "c1", "t").await;
    for tab in d.laptop_tabs() {
        expect_msg!(next_broadcast(tab).await, ChatTitleUpdated);
    }
    let receipt = expect_msg!(d.phone.request(&delete_draft("c1")).await.unwrap(), DraftDeleteReceipt);
    assert!(!receipt.success);
    d.all_quiet().await;
}

#[tokio::test]
async fn update_title_reaches_all_with_the_request_id_only_on_selfs_copy() {
    let mut d = Devices::start().await;
    d.phone.send(&title("c1", "Trip"), Some("title-1")).await.unwrap();
    let own = d.phone.recv().await.unwrap();
    assert_eq!(own.request_id.as_deref(), Some("title-1"));
    let own = expect_msg!(own, ChatTitleUpdated);
    assert_eq!(own.data.title, "Trip");
    assert_eq!(own.versions.title_v, 1);
    for tab in d.laptop_tabs() {
        assert_eq!(expect_msg!(next_broadcast(tab).await, ChatTitleUpdated), own);
    }
    d.all_quiet().await;
}

#[tokio::test]
async fn chat_message_added_confirms_to_self_and_broadcasts_to_others_only() {
    let mut d = Devices::start().await;
    let reply = d
        .tab1
        .request(&message_full("c1", json!({ "message_id": "m1", "content": "hi", "temp_id": "t1" })))
        .await
        .unwrap();
    let confirmed = expect_msg!(reply, ChatMessageConfirmed);
    assert_eq!(confirmed.temp_id, Some(TempId::Text("t1".into())));
    for c in [&mut d.phone, &mut d.tab2] {
        let event = expect_msg!(next_broadcast(c).await, ChatMessageAdded);
        assert_eq!(event.message.message_id.as_str(), "m1");
        assert_eq!(event.message.seq, 1);
        assert_eq!(event.message.content, text("hi"));
    }
    d.all_quiet().await;

    // A resend is confirmed to SELF only.
    let dup = expect_msg!(d.tab1.request(&message("c1", "m1", json!("hi"))).await.unwrap(), ChatMessageConfirmed);
    assert!(dup.duplicate);
    d.all_quiet().await;
}

#[tokio::test]
async fn delete_chat_reaches_all_with_the_request_id_only_on_selfs_copy() {
    let mut d = Devices::start().await;
    set_title(&mut d.phone, "c1", "t").await;
    for tab in d.laptop_tabs() {
        expect_msg!(next_broadcast(tab).await, ChatTitleUpdated);
    }
    d.tab2.send(&delete_chat("c1"), Some("del-1")).await.unwrap();
    let own = d.tab2.recv().await.unwrap();
    assert_eq!(own.request_id.as_deref(), Some("del-1"));
    assert_eq!(expect_msg!(own, ChatDeleted), ChatDeleted { chat_id: ChatId::new("c1").unwrap(), tombstone: true });
    for c in [&mut d.phone, &mut d.tab1] {
        let event = expect_msg!(next_broadcast(c).await, ChatDeleted);
        assert_eq!(event, ChatDeleted { chat_id: ChatId::new("c1").unwrap(), tombstone: true });
    }
    d.all_quiet().await;
}

#[tokio::test]
async fn offline_sync_broadcasts_applied_changes_to_all_and_the_summary_to_self_only() {
    let mut d = Devices::start().await;
    let changes = json!([
        off_title("a", "c1", "Offline title", 0),
        off_draft("b", "c1", doc("offline draft"), 0),
        off_title("c", "c1", "stale", 0), // conflict: title_v is 1 by now
    ]);
    let (before, done) = offline_round(&mut d.phone, changes).await;
    assert_eq!((done.processed, done.conflicts, done.errors), (2, 1, 0));
    // SELF: its copies of the two applied changes, with the request id, before the summary.
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before.iter().all(|m| m.request_id.is_some()), "{before:?}");
    assert_eq!(expect_msg!(before[0], ChatTitleUpdated).data.title, "Offline title");
    assert_eq!(expect_msg!(before[1], ChatDraftUpdated).versions.draft_v, 1);
    for tab in d.laptop_tabs() {
        let title = expect_msg!(next_broadcast(tab).await, ChatTitleUpdated);
        assert_eq!(title.data.title, "Offline title");
        assert_eq!(title.versions.title_v, 1);
        let draft = expect_msg!(next_broadcast(tab).await, ChatDraftUpdated);
        assert_eq!(draft.data.draft_json, doc("offline draft").as_object().cloned());
    }
    d.all_quiet().await;
}

#[tokio::test]
async fn rejected_writes_are_answered_to_self_and_broadcast_to_nobody() {
    let mut d = Devices::start().await;
    set_title(&mut d.bob, "bobs", "bob's chat").await;
    let failing = [
        title("c1", &"x".repeat(256)),
        draft("bobs", doc("not yours")),
        title("bobs", "not yours"),
        message("bobs", "m1", json!("not yours")),
        delete_draft("bobs"),
        delete_chat("bobs"),
        delete_chat("ghost"),
    ];
    for m in &failing {
        let reply = d.phone.request(m).await.unwrap();
        assert!(matches!(reply.message, ServerMessage::Error(_)), "{m:?} -> {reply:?}");
    }
    d.all_quiet().await;
}

#[tokio::test]
async fn reads_are_answered_to_the_requester_only() {
    let mut d = Devices::start().await;
    add_message(&mut d.phone, "c1", "m1", json!("x")).await;
    for tab in d.laptop_tabs() {
        expect_msg!(next_broadcast(tab).await, ChatMessageAdded);
    }
    let reads = [get_messages("c1", 0, None), batch(&["c1"]), sync_request(json!({}), Some("c1")), cache_status()];
    for m in &reads {
        let reply = d.tab1.request(m).await.unwrap();
        assert!(!matches!(reply.message, ServerMessage::Error(_)), "{m:?} -> {reply:?}");
    }
    d.all_quiet().await;
}

#[tokio::test]
async fn bobs_writes_never_reach_alice() {
    let mut d = Devices::start().await;
    set_title(&mut d.bob, "b1", "bob").await;
    set_draft(&mut d.bob, "b1", doc("bob")).await;
    add_message(&mut d.bob, "b1", "m1", json!("bob")).await;
    offline_round(&mut d.bob, json!([off_title("x", "b1", "bob 2", 1)])).await;
    expect_msg!(d.bob.request(&delete_chat("b1")).await.unwrap(), ChatDeleted);
    d.all_quiet().await;
    assert_eq!(d.server.ctx.hub.connection_count(), 4);
}
