//! A write resolves its chat from the node's cached chat list instead of asking the store
//! (`Keyring::chat_for_write`), and the store's write corrects a list that another node has outdated.
//!
//! One test in this binary on purpose: it counts the store's chat lookups in the process-wide metrics
//! (`/metrics`), which other tests running in the same process (`cargo test`) would add to.

#[macro_use]
mod sync_util;
mod common;

use chatsync::store::chats::{Target, WriteOp, WriteResult};
use chatsync_protocol::*;
use common::TestServer;
use sync_util::*;

/// Chat lookups the store has answered so far (`/metrics`).
async fn store_lookups(server: &TestServer) -> f64 {
    let url = server.url.replace("ws://", "http://").replace("/v1/ws", "/metrics");
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with("chatsync_store_seconds_count{op=\"chat_lookup\"}"))
        .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

/// Another node's writes (here: straight to the store, unseen by this node's cache) outdate the cached
/// list: a chat created elsewhere must be written as the existing chat it is (not created twice, not an
/// error), and one deleted elsewhere, or another user's, must stay `not_found`, the store's answer then
/// remembered so that the next write is refused without a store round trip.
#[tokio::test]
async fn a_write_takes_its_chat_from_the_cached_list_and_the_store_corrects_what_another_node_changed() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    server.user("bob", false).await;
    let (mut laptop, _) = server.connect_raw(&token, "laptop").await;
    loop {
        if let ServerMessage::CachePrimed(_) = laptop.recv().await.unwrap().message {
            break; // the (empty) chat list is cached
        }
    }
    let (ctx, now) = (&server.ctx, chatsync::store::now_millis());
    let create = |owner: &str, chat: &str| {
        let (key, wrapped) = ctx.keys.new_chat_key(chat);
        WriteOp::Title {
            owner: owner.into(),
            chat_id: chat.into(),
            title: chatsync::handlers::common::seal_title(&key, chat, "made elsewhere"),
            target: Target::Create { key: wrapped, max_chats: 100 },
            if_version_at_most: None,
            now,
        }
    };
    for (owner, chat) in [("alice", "elsewhere"), ("alice", "gone"), ("bob", "bobs")] {
        assert!(matches!(ctx.chats.write(create(owner, chat)).await.unwrap(), WriteResult::Applied(_)));
    }
    let delete = WriteOp::DeleteChat { owner: "alice".into(), chat_id: "gone".into(), now, event: None };
    assert_eq!(ctx.chats.write(delete).await.unwrap(), WriteResult::Deleted);
    for chat in ["elsewhere", "gone", "bobs"] {
        assert_eq!(ctx.cache.chat_key("alice", chat).await, Some(None), "the cached list missed {chat}");
    }

    let before = store_lookups(&server).await;
    set_title(&mut laptop, "fresh", "new here").await;
    assert_eq!(store_lookups(&server).await, before, "a chat the cached list lacks is created without a lookup");
    let updated = set_title(&mut laptop, "elsewhere", "renamed here").await;
    assert_eq!(updated.versions.title_v, 2, "the chat made elsewhere was updated, not made again");
    assert_eq!(store_lookups(&server).await, before + 1.0, "the creation raced, then the store was asked");
    for chat in ["gone", "bobs"] {
        let reply = laptop.request(&title(chat, "mine now")).await.unwrap();
        assert_error(&reply, ErrorCode::NotFound, None);
    }
    assert_eq!(store_lookups(&server).await, before + 3.0, "each refusal was checked with the store");
    let batches = ctx.chats.batches_begun().expect("the SQLite store counts its batches");
    let reply = laptop.request(&title("bobs", "again")).await.unwrap();
    assert_error(&reply, ErrorCode::NotFound, None);
    assert_eq!(store_lookups(&server).await, before + 3.0, "refused from memory");
    assert_eq!(ctx.chats.batches_begun(), Some(batches), "without a write either");

    let listed = sync_all(&mut laptop).await;
    let mut order = ids(&listed.server_chat_order);
    order.sort();
    assert_eq!(order, ["elsewhere", "fresh"]);
}
