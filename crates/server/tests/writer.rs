//! The supervised group-commit writer, over the real WebSocket: a writer panic or a broken connection
//! fails only its batch (with `unavailable`) and the writer restarts; a writer that keeps dying stops the server with an
//! error; one failing write in a group commit fails alone; a full disk fails writes with
//! `unavailable`, loses nothing confirmed, and writes succeed again once space returns; under constant writes
//! and reads the WAL keeps starting over instead of growing; a write that finds the writer idle waits the
//! commit window for others to share its transaction; a write that committed but whose answer was lost
//! leaves no stale state in the cache.
//!
//! Faults are injected through the store's hidden test hook (`ChatStore::writer_faults`).

mod common;
#[macro_use]
mod sync_util;

use chatsync::store::WriterFaults;
use chatsync_client::{Client, ClientError, ConnectOptions};
use chatsync_protocol::*;
use common::TestServer;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use sync_util::*;

fn faults(server: &TestServer) -> Arc<WriterFaults> {
    server.ctx.chats.writer_faults().expect("the SQLite store has a writer")
}

/// Waits until `n` writes are waiting for the held writer.
async fn queued(faults: &WriterFaults, n: usize) {
    for _ in 0..2000 {
        if faults.queued() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{n} writes never queued up (queued: {})", faults.queued());
}

/// One connection per user `prefix0..prefixN`, each with its chat `<user>-chat` titled "v1".
async fn users_with_a_chat(server: &TestServer, prefix: &str, n: usize) -> Vec<(Client, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let user = format!("{prefix}{i}");
        let mut c = new_user(server, &user, "d").await;
        let chat = format!("{user}-chat");
        assert_eq!(set_title(&mut c, &chat, "v1").await.versions.title_v, 1);
        out.push((c, chat));
    }
    out
}

#[tokio::test]
async fn a_writer_panic_fails_its_batch_with_unavailable_and_the_next_write_succeeds() {
    let server = TestServer::start().await;
    let faults = faults(&server);
    let mut conns = users_with_a_chat(&server, "p", 3).await;

    // Three writes in one batch; the writer panics inside its transaction, before the commit.
    faults.hold();
    faults.panic_next(1);
    for (c, chat) in &mut conns {
        c.send(&title(chat, "lost"), Some("w")).await.unwrap();
    }
    queued(&faults, 3).await;
    faults.release();
    for (c, _) in &mut conns {
        let e = assert_error(&c.recv_reply("w").await.unwrap(), ErrorCode::Unavailable, None);
        assert!(!e.message.contains("panic") && !e.message.contains("injected"), "no internal detail: {e:?}");
    }

    // The writer restarted: the next writes succeed, and the failed batch left nothing behind.
    for (c, chat) in &mut conns {
        let done = set_title(c, chat, "v2").await;
        assert_eq!(done.versions.title_v, 2, "the failed write did not commit");
        assert_eq!(done.data.title, "v2");
        add_message(c, chat, "m1", json!("after the restart")).await;
    }
    assert_eq!(faults.restarts(), 1, "the writer reopened its connection once");
    let server = server.restart().await;
    let token = server.token("p0").await;
    let (mut c, _) = server.connect(&token, "d").await;
    let state = chat_state(&mut c, "p0-chat").await;
    assert_eq!((state.title.as_deref(), state.versions.title_v, state.versions.messages_v), (Some("v2"), 2, 1));
}

#[tokio::test]
async fn a_broken_writer_connection_fails_its_batch_with_unavailable_and_is_reopened() {
    let server = TestServer::start().await;
    let faults = faults(&server);
    let mut conns = users_with_a_chat(&server, "b", 2).await;
    faults.hold();
    faults.break_next(1);
    for (c, chat) in &mut conns {
        c.send(&title(chat, "lost"), Some("w")).await.unwrap();
    }
    queued(&faults, 2).await;
    faults.release();
    for (c, _) in &mut conns {
        assert_error(&c.recv_reply("w").await.unwrap(), ErrorCode::Unavailable, None);
    }
    for (c, chat) in &mut conns {
        assert_eq!(set_title(c, chat, "v2").await.versions.title_v, 2, "the failed write did not commit");
    }
    assert_eq!(faults.restarts(), 1, "the writer reopened its connection once");
}

#[tokio::test]
async fn a_writer_that_keeps_dying_gives_up_and_the_server_stops_with_an_error() {
    let data = tempfile::tempdir().unwrap();
    let config = chatsync::Config { data_dir: data.path().to_owned(), ..chatsync::Config::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
    let ctx = chatsync::build(config).await.unwrap();
    ctx.store.create_user("alice", false, chatsync::store::now_millis()).await.unwrap();
    let token = chatsync::gateway::auth::issue_session(ctx.store.as_ref(), "alice", None, Duration::from_secs(60))
        .await
        .unwrap();
    let faults = ctx.chats.writer_faults().unwrap();
    let server = tokio::spawn(chatsync::run(listener, ctx, std::future::pending()));
    let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(&token, "d") };
    let (mut c, _) = Client::connect_authenticated(&url, &opts).await.unwrap();
    assert_eq!(set_title(&mut c, "c1", "kept").await.versions.title_v, 1);

    faults.panic_next(u32::MAX);
    let mut failed = 0;
    let close = loop {
        match c.request(&title("c1", "never")).await {
            Ok(reply) => {
                assert_error(&reply, ErrorCode::Unavailable, None);
                failed += 1;
                assert!(failed < 1000, "the server never stopped");
            }
            Err(ClientError::Closed(close)) => break close,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(failed > 5, "every death failed a write with unavailable ({failed})");
    assert_eq!(close, Some((1001, "Server shutting down".into())));
    let result = server.await.unwrap();
    let err = result.expect_err("run() reports the failed store, so `serve` exits non-zero");
    assert!(err.to_string().contains("store can no longer write"), "{err:#}");
}

#[tokio::test]
async fn one_failing_write_in_a_group_commit_fails_alone() {
    let server = TestServer::start().await;
    let faults = faults(&server);
    let mut conns = users_with_a_chat(&server, "g", 6).await;
    let bad = conns[2].1.clone();

    faults.hold();
    faults.fail_chat(Some(&bad));
    for (c, chat) in &mut conns {
        c.send(&title(chat, "v2"), Some("w")).await.unwrap();
    }
    queued(&faults, conns.len()).await;
    faults.release();
    for (c, chat) in &mut conns {
        let reply = c.recv_reply("w").await.unwrap();
        if *chat == bad {
            assert_error(&reply, ErrorCode::Internal, None);
        } else {
            let done = expect_msg!(reply, ChatTitleUpdated);
            assert_eq!((done.data.title.as_str(), done.versions.title_v), ("v2", 2), "{chat}");
        }
    }

    faults.fail_chat(None);
    let (c, _) = &mut conns[2];
    assert_eq!(set_title(c, &bad, "v2").await.versions.title_v, 2, "the failed write left nothing behind");
    let server = server.restart().await;
    for i in 0..6 {
        let token = server.token(&format!("g{i}")).await;
        let (mut c, _) = server.connect(&token, "d").await;
        let state = chat_state(&mut c, &format!("g{i}-chat")).await;
        assert_eq!((state.title.as_deref(), state.versions.title_v), (Some("v2"), 2), "g{i}");
    }
}

#[tokio::test]
async fn a_group_commit_that_finds_the_database_held_fails_whole_instead_of_waiting_once_per_write() {
    // Another process holds the write lock: the batch fails after the busy timeout. Retried one by one,
    // each of its writes would wait that long again (a 256-write batch: most of an hour).
    let server = TestServer::start().await;
    let faults = faults(&server);
    let mut conns = users_with_a_chat(&server, "b", 3).await;
    let holder = rusqlite::Connection::open(server.data.path().join("chatsync.db")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    faults.hold();
    for (c, chat) in &mut conns {
        c.send(&title(chat, "v2"), Some("w")).await.unwrap();
    }
    queued(&faults, conns.len()).await;
    faults.release();
    let first = conns[0].0.recv_reply("w").await.unwrap();
    assert_error(&first, ErrorCode::Unavailable, None);
    // Let go once the batch has failed: retried one by one, the other writes would now succeed.
    holder.execute_batch("ROLLBACK").unwrap();
    for (c, _) in &mut conns[1..] {
        assert_error(&c.recv_reply("w").await.unwrap(), ErrorCode::Unavailable, None);
    }
    let (c, chat) = &mut conns[0];
    assert_eq!(set_title(c, chat, "v2").await.versions.title_v, 2, "the writer goes on");
}

#[tokio::test]
async fn a_full_disk_fails_writes_with_unavailable_loses_nothing_and_recovers() {
    let server = TestServer::start().await;
    let faults = faults(&server);
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "d").await;
    let body = |i: usize| json!(format!("{i:05}-{}", "x".repeat(1500)));
    let mut confirmed = Vec::new();
    for i in 0..5 {
        let done = add_message(&mut c, "c1", &format!("m{i}"), body(i)).await;
        confirmed.push((format!("m{i}"), done.new_messages_v));
    }

    // The database may not grow any more: writes fail with unavailable once it would have to.
    faults.limit_pages(Some(0));
    let mut i = confirmed.len();
    let refused = loop {
        assert!(i < 2000, "the page limit never bit");
        let id = format!("m{i}");
        let reply = c.request(&message("c1", &id, body(i))).await.unwrap();
        match &reply.message {
            ServerMessage::ChatMessageConfirmed(done) => confirmed.push((id, done.new_messages_v)),
            _ => {
                assert_error(&reply, ErrorCode::Unavailable, None);
                break id;
            }
        }
        i += 1;
    };
    // Still full: a retry of the refused write is refused too.
    assert_error(&c.request(&message("c1", &refused, body(i))).await.unwrap(), ErrorCode::Unavailable, None);

    // Space returns: the same write now succeeds, right after the last confirmed one.
    faults.limit_pages(None);
    let done = add_message(&mut c, "c1", &refused, body(i)).await;
    assert!(!done.duplicate, "the refused write had not committed");
    assert_eq!(done.new_messages_v, confirmed.last().unwrap().1 + 1);
    confirmed.push((refused, done.new_messages_v));

    // Everything confirmed is stored exactly once, with its seq (read back from disk after a restart).
    let server = server.restart().await;
    let (mut c, _) = server.connect(&server.token("alice").await, "d").await;
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let page = expect_msg!(c.request(&get_messages("c1", after, Some(500))).await.unwrap(), ChatMessagesResponse);
        stored.extend(page.messages.iter().map(|m| (m.message_id.as_str().to_owned(), m.seq)));
        after = stored.last().map_or(0, |m| m.1);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(stored, confirmed);
}

#[tokio::test]
async fn under_constant_writes_and_reads_the_wal_keeps_starting_over() {
    let server = TestServer::start_with(|c| (c.rate_per_sec, c.rate_burst) = (100_000, 100_000)).await;
    let faults = faults(&server);
    faults.reset_wal_past(64);
    let wal = server.data.path().join("chatsync.db-wal");
    let mut writer = new_user(&server, "wal", "w").await;
    // A reader in the WAL nearly all the time (the soak's reads): PASSIVE checkpoints alone never reset it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, db) = (stop.clone(), server.data.path().join("chatsync.db"));
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(db).unwrap();
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0)).unwrap();
                reads += n as u64 + 1;
            }
            reads
        })
    };

    // 8 rounds of 50 messages of 6 KB, each round ~2 MB in the WAL (encrypted, with index and chat pages).
    // After each round, keep writing small ones until the checkpoint thread has seen the WAL start over once
    // more (the writer lets it, between two batches, when the checkpoint thread finds the WAL long).
    let body = "x".repeat(6000);
    let mut first_round = 0;
    for round in 0..8 {
        let before = faults.wal_resets();
        for i in 0..50 {
            add_message(&mut writer, "wal-chat", &format!("m{round}-{i}"), json!(body)).await;
        }
        let mut more = 0;
        while faults.wal_resets() == before {
            assert!(more < 200, "the WAL never started over");
            add_message(&mut writer, "wal-chat", &format!("s{round}-{more}"), json!("s")).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            more += 1;
        }
        if round == 0 {
            first_round = std::fs::metadata(&wal).unwrap().len();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    // The WAL started over: its file holds about a round (a round appends ~2 MB), never the whole run.
    let size = std::fs::metadata(&wal).unwrap().len();
    assert!(size < 3 * first_round, "the WAL grew from {first_round} bytes after a round to {size} after 8");
}

#[tokio::test]
async fn a_write_that_finds_the_writer_idle_waits_the_commit_window_for_company() {
    let server = TestServer::start().await;
    a_second_write_joins_the_first_in_the_commit_window(&server).await;
}

#[tokio::test]
async fn a_write_whose_answer_is_lost_leaves_no_stale_state_in_the_cache() {
    let server = TestServer::start().await;
    let faults = faults(&server);
    let mut phone = new_user(&server, "lost", "phone").await;
    let mut laptop = another_device(&server, "lost", "laptop").await;
    assert_eq!(set_title(&mut phone, "lost-chat", "v1").await.versions.title_v, 1);
    // The laptop's sync loads the user's chat list into the cache.
    assert_eq!(chat_state(&mut laptop, "lost-chat").await.title.as_deref(), Some("v1"));

    // The write commits, but its answer is lost: the phone hears `unavailable`.
    faults.lose_answer_next(1);
    let reply = phone.request(&title("lost-chat", "v2")).await.unwrap();
    assert_error(&reply, ErrorCode::Unavailable, None);

    // What the store holds now is what every device reads, not the cached title it replaced.
    let state = chat_state(&mut laptop, "lost-chat").await;
    assert_eq!((state.title.as_deref(), state.versions.title_v), (Some("v2"), 2));
}
