//! Durability and encryption at rest (PROTOCOL.md section 5): everything survives a restart on the same
//! data directory with versions continuing, and no title, draft or message plaintext is ever written to
//! any file of the data directory.

mod common;
#[macro_use]
mod sync_util;

use chatsync_protocol::*;
use common::TestServer;
use serde_json::json;
use sync_util::*;

#[tokio::test]
async fn titles_drafts_messages_and_versions_survive_a_restart_and_versions_continue() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    set_title(&mut c, "c1", "first").await;
    set_title(&mut c, "c1", "Kept title").await;
    set_draft(&mut c, "c1", doc("kept draft")).await;
    add_message(&mut c, "c1", "m1", json!("one")).await;
    add_message(&mut c, "c1", "m2", json!({ "type": "doc", "text": "two" })).await;
    set_title(&mut c, "gone", "deleted").await;
    expect_msg!(c.request(&delete_chat("gone")).await.unwrap(), ChatDeleted);
    let before = sync_all(&mut c).await;
    let messages_before = all_messages(&mut c, "c1").await;
    drop(c);

    let server = server.restart().await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    let after = sync_all(&mut c).await;
    assert_eq!(ids(&after.server_chat_order), ["c1"]);
    let e = entry(&after, "c1").unwrap();
    assert_eq!(e.title.as_deref(), Some("Kept title"));
    assert_eq!(e.draft_json, Some(doc("kept draft").as_object().cloned()));
    assert_eq!(e.versions, Versions { messages_v: 2, title_v: 2, draft_v: 1 });
    assert_eq!(e, entry(&before, "c1").unwrap());
    assert_eq!(all_messages(&mut c, "c1").await, messages_before);

    // Versions continue where they were.
    assert_eq!(set_title(&mut c, "c1", "after restart").await.versions.title_v, 3);
    assert_eq!(set_draft(&mut c, "c1", doc("after")).await.draft_v, 2);
    assert_eq!(add_message(&mut c, "c1", "m3", json!("three")).await.new_messages_v, 3);
    let dup = add_message(&mut c, "c1", "m1", json!("one")).await;
    assert!(dup.duplicate, "message ids are remembered across restarts");
    assert_eq!(dup.new_messages_v, 1);
    // The deleted id stays deleted.
    assert_not_found(&c.request(&title("gone", "back?")).await.unwrap());
}

#[tokio::test]
async fn no_plaintext_title_draft_or_message_is_stored_in_any_data_file() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    let (title_text, draft_text, message_text, object_text) =
        ("TitlePlainQx7Zr", "DraftPlainKw3Vb", "MessagePlainJp9Ty", "ObjectPlainHd2Mc");
    set_title(&mut c, "chat-at-rest", title_text).await;
    set_draft(&mut c, "chat-at-rest", doc(draft_text)).await;
    add_message(&mut c, "chat-at-rest", "m1", json!(message_text)).await;
    add_message(&mut c, "chat-at-rest", "m2", json!({ "type": "doc", "text": object_text })).await;
    // Offline writes go through the same path.
    offline_round(&mut c, json!([off_title("o", "other-chat", "OfflineTitleNm4Gs", 0)])).await;
    drop(c);

    let mut server = server;
    server.stop().await;
    let files = server.data_files();
    let names: Vec<_> = files.iter().map(|(p, _)| p.display().to_string()).collect();
    assert!(files.iter().any(|(p, _)| p.file_name().is_some_and(|n| n == "chatsync.db")), "{names:?}");
    let contains = |bytes: &[u8], needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    // The scan does see the store's content: chat ids are stored in the clear.
    assert!(files.iter().any(|(_, b)| contains(b, "chat-at-rest")), "the scan finds the chat id");
    for (path, bytes) in &files {
        for secret in [title_text, draft_text, message_text, object_text, "OfflineTitleNm4Gs"] {
            assert!(!contains(bytes, secret), "{} contains the plaintext {secret:?}", path.display());
        }
    }
}

#[tokio::test]
async fn normal_durability_keeps_writes_across_a_restart() {
    let server = TestServer::start_with(|c| c.durability = chatsync::store::Durability::Normal).await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "d").await;
    let msg = ClientMessage::UpdateTitle(UpdateTitle { chat_id: ChatId::new("n1").unwrap(), new_title: "kept".into() });
    assert!(matches!(c.request(&msg).await.unwrap().message, ServerMessage::ChatTitleUpdated(_)));
    drop(c);
    let server = server.restart().await;
    let token = server.token("alice").await;
    let (mut c, _) = server.connect(&token, "d").await;
    let sync = ClientMessage::InitialSyncRequest(InitialSyncRequest {
        chat_versions: Default::default(),
        immediate_view_chat_id: None,
    });
    let ServerMessage::InitialSyncResponse(r) = c.request(&sync).await.unwrap().message else { panic!("no sync") };
    assert_eq!(r.chats_to_add_or_update[0].title.as_deref(), Some("kept"));
}

#[tokio::test]
async fn a_deleted_chat_leaves_neither_its_key_nor_its_ciphertext_in_any_data_file() {
    // Crypto-shredding: the wrapped key of a deleted chat must be gone from the disk, not only from the
    // tables (SQLite keeps deleted cells in freed space unless told to overwrite them).
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    set_title(&mut c, "doomed", "a title").await;
    add_message(&mut c, "doomed", "m1", json!("a message long enough to fill a cell of its own page")).await;
    let db = rusqlite::Connection::open(server.data.path().join("chatsync.db")).unwrap();
    let key: Vec<u8> = db.query_row("SELECT chat_key FROM chats WHERE chat_id = 'doomed'", [], |r| r.get(0)).unwrap();
    let content: Vec<u8> =
        db.query_row("SELECT content FROM messages WHERE chat_id = 'doomed'", [], |r| r.get(0)).unwrap();
    drop(db);
    expect_msg!(c.request(&delete_chat("doomed")).await.unwrap(), ChatDeleted);
    drop(c);

    let mut server = server;
    server.stop().await;
    let contains = |bytes: &[u8], needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for (path, bytes) in &server.data_files() {
        assert!(!contains(bytes, &key), "{} still holds the deleted chat's wrapped key", path.display());
        assert!(!contains(bytes, &content[..32]), "{} still holds the deleted message", path.display());
    }
}
