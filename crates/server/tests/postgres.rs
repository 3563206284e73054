//! The real server on PostgreSQL (`database_url = postgres://…`), end to end over WebSocket: writes and
//! initial sync, a restart on the same database with versions continuing, and no title, draft or
//! message plaintext in any text or bytea column of any table. Each test uses a schema of its own; see
//! `backends/mod.rs` for when these tests skip (variable unset) or fail (server down). Also the batch
//! function against other sessions' transactions (two connections, one holding a lock), and the writer
//! against a connection PostgreSQL ends with a FATAL error after a commit (a proxy that reads the protocol),
//! and a write a read-only server refuses (a demoted primary), and a read cancelled while its `BEGIN` is
//! unanswered (a proxy that holds the answer) leaving no pooled connection inside its transaction.

mod backends;
mod common;
#[macro_use]
mod sync_util;

use backends::PgSchema;
use chatsync::store;
use chatsync::store::chats::{Target, WriteOp, WriteResult};
use chatsync_protocol::*;
use common::TestServer;
use serde_json::json;
use sqlx::Row;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use sync_util::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(schema: &PgSchema) -> TestServer {
    let url = schema.url.clone();
    TestServer::start_with(|config| config.database_url = Some(url)).await
}

#[tokio::test]
async fn writes_sync_and_survive_a_restart_on_postgres() {
    let Some(schema) = PgSchema::create().await else { return };
    let server = start(&schema).await;
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
    assert_eq!(ids(&before.server_chat_order), ["c1"]);
    let messages_before = all_messages(&mut c, "c1").await;
    assert_eq!(messages_before.messages.len(), 2);
    // A second device of the same user sees the same state.
    let (mut other, _) = server.connect(&token, "laptop").await;
    let seen = sync_all(&mut other).await;
    assert_eq!(
        (ids(&seen.server_chat_order), entry(&seen, "c1")),
        (ids(&before.server_chat_order), entry(&before, "c1"))
    );
    drop((c, other));
    assert!(
        !server.data_files().iter().any(|(p, _)| p.file_name().is_some_and(|n| n == "chatsync.db")),
        "no SQLite file is created when the store is PostgreSQL"
    );

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
    assert_eq!(set_title(&mut c, "c1", "after restart").await.versions.title_v, 3);
    assert_eq!(add_message(&mut c, "c1", "m3", json!("three")).await.new_messages_v, 3);
    let dup = add_message(&mut c, "c1", "m1", json!("one")).await;
    assert!(dup.duplicate, "message ids are remembered across restarts");
    assert_not_found(&c.request(&title("gone", "back?")).await.unwrap());
    drop(c);
    let mut server = server;
    server.stop().await;
}

#[tokio::test]
async fn no_plaintext_title_draft_or_message_is_stored_in_any_postgres_column() {
    let Some(schema) = PgSchema::create().await else { return };
    let mut server = start(&schema).await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    let secrets = ["TitlePlainQx7Zr", "DraftPlainKw3Vb", "MessagePlainJp9Ty", "ObjectPlainHd2Mc", "OfflineTitleNm4Gs"];
    set_title(&mut c, "chat-at-rest", secrets[0]).await;
    set_draft(&mut c, "chat-at-rest", doc(secrets[1])).await;
    add_message(&mut c, "chat-at-rest", "m1", json!(secrets[2])).await;
    add_message(&mut c, "chat-at-rest", "m2", json!({ "type": "doc", "text": secrets[3] })).await;
    offline_round(&mut c, json!([off_title("o", "other-chat", secrets[4], 0)])).await;
    drop(c);
    server.stop().await;

    let mut conn = schema.connect().await;
    let columns = sqlx::query(
        "SELECT table_name::TEXT, column_name::TEXT, data_type::TEXT FROM information_schema.columns \
         WHERE table_schema = $1 AND data_type IN ('text', 'bytea', 'character varying')",
    )
    .bind(&schema.name)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(columns.len() >= 10, "the scan sees the schema's columns");
    let mut found_chat_id = false;
    for row in &columns {
        let (table, column, kind): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let bytea = kind == "bytea";
        found_chat_id |= rows_containing(&mut conn, &table, &column, bytea, "chat-at-rest").await > 0;
        for secret in secrets {
            let n = rows_containing(&mut conn, &table, &column, bytea, secret).await;
            assert_eq!(n, 0, "{table}.{column} contains the plaintext {secret:?}");
        }
    }
    assert!(found_chat_id, "the scan does see the store's content: chat ids are stored in the clear");

    // And what an operator's backup holds: `pg_dump` of the schema, as text, has none of them either.
    let base = std::env::var(backends::PG_URL_VAR).unwrap();
    let base = base.split('?').next().unwrap().to_owned();
    let dump = std::process::Command::new("pg_dump").args([&base, "--schema", &schema.name]).output();
    match dump {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("chat-at-rest"), "the dump holds the schema's rows");
            for secret in secrets {
                assert!(!text.contains(secret), "pg_dump shows the plaintext {secret:?}");
            }
        }
        Ok(out) => panic!("pg_dump failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => eprintln!("note: pg_dump is not installed here ({e}); the column scan above stands alone"),
    }
}

/// How many rows of `table` hold `needle` anywhere in `column` (text or bytea).
/// A write refused because the server is read-only (25006: a primary demoted by a failover, a standby
/// reached before the promotion) is `unavailable`, retried later, not an internal error.
#[tokio::test]
async fn a_write_refused_by_a_read_only_server_is_unavailable() {
    let Some(schema) = PgSchema::create().await else { return };
    let mut conn = schema.connect().await;
    sqlx::query("SET default_transaction_read_only = on").execute(&mut conn).await.unwrap();
    let err = sqlx::query("CREATE TABLE refused (x int)").execute(&mut conn).await.unwrap_err();
    assert_eq!(err.as_database_error().and_then(|db| db.code()).as_deref(), Some("25006"));
    assert!(matches!(store::StoreError::from(err), store::StoreError::Unavailable(_)));
}

async fn rows_containing(conn: &mut sqlx::PgConnection, table: &str, column: &str, bytea: bool, needle: &str) -> i64 {
    let sql = if bytea {
        format!("SELECT COUNT(*) FROM \"{table}\" WHERE position($1::BYTEA IN \"{column}\") > 0")
    } else {
        format!("SELECT COUNT(*) FROM \"{table}\" WHERE strpos(\"{column}\", $1) > 0")
    };
    let query = sqlx::query(&sql);
    let query = if bytea { query.bind(needle.as_bytes()) } else { query.bind(needle) };
    query.fetch_one(conn).await.unwrap().get(0)
}

/// Calls the group-commit function on `conn` with one `title` op per (owner, chat) (what a node's
/// writer does with a batch of title writes); returns the outcomes.
async fn title_batch(mut conn: sqlx::PgConnection, ops: &[(&str, &str)]) -> Result<Vec<String>, sqlx::Error> {
    title_batch_on(&mut conn, ops).await
}

/// [`title_batch`] on a borrowed connection (inside a transaction the caller keeps open).
async fn title_batch_on(conn: &mut sqlx::PgConnection, ops: &[(&str, &str)]) -> Result<Vec<String>, sqlx::Error> {
    let n = ops.len();
    let none_text: Vec<Option<&str>> = vec![None; n];
    let none_bytes: Vec<Option<&[u8]>> = vec![None; n];
    let none_int: Vec<Option<i64>> = vec![None; n];
    let rows = sqlx::query(
        "SELECT r_outcome FROM chatsync_write_batch_locked($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ORDER BY r_idx",
    )
    .bind(vec!["title"; n])
    .bind(ops.iter().map(|(owner, _)| *owner).collect::<Vec<_>>())
    .bind(ops.iter().map(|(_, chat)| Some(*chat)).collect::<Vec<_>>())
    .bind(vec![Some(&b"sealed elsewhere"[..]); n])
    .bind(&none_bytes)
    .bind(&none_text)
    .bind(&none_int)
    .bind(&none_int)
    .bind(vec![Some(1_i64); n])
    .bind(&none_text)
    .bind(&none_text)
    .bind(&none_text)
    .bind(&none_int)
    .fetch_all(conn)
    .await?;
    Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
}

/// Waits until `n` sessions of the database wait for a lock (a liveness bound, not a timing check).
async fn until_waiting_for_locks(conn: &mut sqlx::PgConnection, n: i64) {
    for _ in 0..1000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE '%chatsync_write_batch_locked%' AND datname = current_database()",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{n} batches never waited for a lock");
}

#[tokio::test]
async fn batches_of_two_nodes_sharing_owners_queue_instead_of_deadlocking() {
    // The interleaving that deadlocked before the owner locks (migration 0008), made certain with a third
    // session holding bob's chat: node 2's batch [bob/b1, alice/a1] queues first for b1; node 1's batch
    // [alice/a1, bob/b1] locks a1 and queues for b1. When b1 is free, node 2's batch gets it and wants
    // a1: without the owner locks both wait for each other until PostgreSQL aborts one (40P01).
    let Some(schema) = PgSchema::create().await else { return };
    let server = start(&schema).await;
    for user in ["alice", "bob"] {
        let token = server.user_token(user).await;
        let (mut c, _) = server.connect(&token, "laptop").await;
        set_title(&mut c, if user == "alice" { "a1" } else { "b1" }, "t").await;
    }
    let mut watcher = schema.connect().await;
    for _ in 0..3 {
        let mut holder = schema.connect().await;
        sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        sqlx::query("SELECT 1 FROM chats WHERE chat_id = 'b1' FOR UPDATE").execute(&mut holder).await.unwrap();
        let node2 = tokio::spawn(title_batch(schema.connect().await, &[("bob", "b1"), ("alice", "a1")]));
        until_waiting_for_locks(&mut watcher, 1).await;
        let node1 = tokio::spawn(title_batch(schema.connect().await, &[("alice", "a1"), ("bob", "b1")]));
        until_waiting_for_locks(&mut watcher, 2).await;
        sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
        for batch in [node2, node1] {
            assert_eq!(batch.await.unwrap().expect("no deadlock"), ["applied", "applied"]);
        }
    }
    let mut server = server;
    server.stop().await;
}

#[tokio::test]
async fn a_write_that_finds_the_writer_idle_waits_the_commit_window_for_company_on_postgres() {
    // As on SQLite (tests/writer.rs): write A reaches the idle writer, which waits the window (2 s here);
    // write B, sent once A has left the queue, joins A's transaction. With no window, A would be
    // committing alone by then. PostgreSQL shows it too: both rows carry one transaction id.
    let Some(schema) = PgSchema::create().await else { return };
    let mut server = start(&schema).await;
    a_second_write_joins_the_first_in_the_commit_window(&server).await;
    let mut conn = schema.connect().await;
    let xmins: Vec<String> = sqlx::query("SELECT xmin::text FROM chats WHERE chat_id IN ('a', 'b')")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(xmins.len(), 2);
    assert_eq!(xmins[0], xmins[1], "one transaction");
    server.stop().await;
}

/// Waits until `task` has finished or a session waits for a lock that session `holder` (a backend pid)
/// holds (a liveness bound, not a timing check).
async fn until_done_or_blocked_by<T>(conn: &mut sqlx::PgConnection, holder: i32, task: &tokio::task::JoinHandle<T>) {
    for _ in 0..1000 {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                .bind(holder)
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        if waiting > 0 || task.is_finished() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the task neither finished nor waited for a lock");
}

#[tokio::test]
async fn key_creation_by_a_command_and_a_rotation_serialize_on_the_check_value() {
    // The two interleavings a row lock on the check value decides, each made certain by holding the lock
    // in a session of the test: (1) a rotation commits while a command's key creation waits: the
    // creation must then see the new check value and store nothing (a key under the old master key
    // would lock its user out); (2) a command's key creation is in flight when a rotation starts: the
    // rotation must wait, then see that key and fail, changing nothing.
    use chatsync::store::chats::WrappedKey;
    let Some(schema) = PgSchema::create().await else { return };
    let backend = chatsync::store::open_backend(&schema.url, chatsync::store::Durability::Full).await.unwrap();
    let (identity, chats) = (backend.identity.clone(), backend.chats.clone());
    for user in ["alice", "bob"] {
        identity.create_user(user, false, 1).await.unwrap();
    }
    chats.init_key_check(b"check-1").await.unwrap();
    let key = |tag: &str| WrappedKey { wrapped: tag.as_bytes().to_vec(), kek_id: "k1".into() };
    let mut watcher = schema.connect().await;

    // (1) The "rotation" holds the row, changed, uncommitted.
    let mut rotation = schema.connect().await;
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut rotation).await.unwrap();
    sqlx::query("BEGIN").execute(&mut rotation).await.unwrap();
    sqlx::query("SELECT value FROM meta WHERE name = 'kek_check' FOR UPDATE").execute(&mut rotation).await.unwrap();
    sqlx::query("UPDATE meta SET value = 'check-2' WHERE name = 'kek_check'").execute(&mut rotation).await.unwrap();
    let creating = {
        let chats = chats.clone();
        tokio::spawn(async move { chats.create_user_keys(&[("alice".into(), key("alice"))], b"check-1").await })
    };
    until_done_or_blocked_by(&mut watcher, holder, &creating).await;
    sqlx::query("COMMIT").execute(&mut rotation).await.unwrap();
    assert!(!creating.await.unwrap().unwrap(), "the creation saw the rotated check value");
    assert_eq!(chats.user_key("alice").await.unwrap(), None, "nothing stored under the old master key");

    // (2) The "command" holds the row and has stored bob's key under k1, uncommitted.
    let mut command = schema.connect().await;
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut command).await.unwrap();
    sqlx::query("BEGIN").execute(&mut command).await.unwrap();
    sqlx::query("SELECT value FROM meta WHERE name = 'kek_check' FOR SHARE").execute(&mut command).await.unwrap();
    sqlx::query("INSERT INTO user_keys (user_id, wrapped, kek_id) VALUES ('bob', 'bob', 'k1')")
        .execute(&mut command)
        .await
        .unwrap();
    let rotating = {
        let chats = chats.clone();
        // The rotation read the keys before bob's existed: none.
        tokio::spawn(async move { chats.rewrap_keys(&[], b"check-2", "k2", b"check-3").await })
    };
    until_done_or_blocked_by(&mut watcher, holder, &rotating).await;
    sqlx::query("COMMIT").execute(&mut command).await.unwrap();
    let err = rotating.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("stored after the rotation read the keys"), "{err}");
    assert_eq!(chats.key_check().await.unwrap().as_deref(), Some(&b"check-2"[..]), "the rotation changed nothing");
    assert_eq!(chats.user_key("bob").await.unwrap(), Some(key("bob")));
    identity.close().await;
}

#[tokio::test]
async fn the_warm_up_runs_every_kind_of_write_and_stores_nothing() {
    // `warm_up` checks each op's outcome itself (it fails on any other); here: it succeeds on a migrated
    // schema holding a user's data, which it leaves as it was, and nothing of its own remains.
    let Some(schema) = PgSchema::create().await else { return };
    let mut server = start(&schema).await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    set_title(&mut c, "c1", "kept").await;
    add_message(&mut c, "c1", "m1", json!("one")).await;
    let before = sync_all(&mut c).await;

    let mut conn = schema.connect().await;
    chatsync::store::pg::warm_up(&mut conn).await.expect("every outcome as expected");
    chatsync::store::pg::warm_up(&mut conn).await.expect("and again on a warm connection");
    for (table, column) in [
        ("users", "user_id"),
        ("user_keys", "user_id"),
        ("chats", "owner"),
        ("chat_tombstones", "owner"),
        ("messages", "message_id"),
    ] {
        let n = rows_containing(&mut conn, table, column, false, "chatsync warm-up").await;
        assert_eq!(n, 0, "nothing of the warm-up in {table}");
    }
    let after = sync_all(&mut c).await;
    assert_eq!(
        (after.chats_to_add_or_update, after.server_chat_order),
        (before.chats_to_add_or_update, before.server_chat_order),
        "the user's data is untouched"
    );
    assert_eq!(add_message(&mut c, "c1", "m2", json!("two")).await.new_messages_v, 2);
    drop(c);
    server.stop().await;
}

#[tokio::test]
async fn a_server_warms_up_its_postgresql_connections_when_it_opens_them() {
    // The server's sessions are told apart by an application name; each warmed session's last statement
    // is the warm-up's ROLLBACK (until it carries other work). Without the warm-up there is none.
    let Some(schema) = PgSchema::create().await else { return };
    let app = format!("warm-{}", schema.name);
    let url = format!("{}&application_name={app}", schema.url);
    let mut server = TestServer::start_with(|config| config.database_url = Some(url)).await;
    let mut conn = schema.connect().await;
    let mut warmed = 0;
    for _ in 0..200 {
        warmed =
            sqlx::query("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query = 'ROLLBACK'")
                .bind(&app)
                .fetch_one(&mut conn)
                .await
                .unwrap()
                .get::<i64, _>(0);
        if warmed > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(warmed > 0, "no session of the server ran the warm-up");
    server.stop().await;
}

#[tokio::test]
async fn a_server_starts_and_serves_while_a_key_rotation_holds_the_tables_its_warm_up_needs() {
    // `keys rotate` locks `chats` and `user_keys` against writes; a server starting meanwhile must not
    // wait for it (its warm-ups give up on the lock and leave their connections cold, free for other
    // work), and serves once the rotation is over.
    let Some(schema) = PgSchema::create().await else { return };
    let server = start(&schema).await; // migrates the schema
    let mut rotation = schema.connect().await;
    sqlx::query("BEGIN").execute(&mut rotation).await.unwrap();
    sqlx::query("LOCK TABLE chats, user_keys IN SHARE ROW EXCLUSIVE MODE").execute(&mut rotation).await.unwrap();
    let mut server = server.restart().await;
    // The server's connections are usable during the rotation (their warm-ups gave up): a session is
    // issued. (Writes wait for the rotation, as they should.)
    let token = server.user_token("carol").await;
    sqlx::query("COMMIT").execute(&mut rotation).await.unwrap();
    let (mut c, _) = server.connect(&token, "laptop").await;
    assert_eq!(set_title(&mut c, "c1", "after the rotation").await.versions.title_v, 1);
    assert_eq!(add_message(&mut c, "c1", "m1", json!("one")).await.new_messages_v, 1);
    drop(c);
    server.stop().await;
}

#[tokio::test]
async fn a_batch_stuck_in_postgresql_fails_with_unavailable_and_the_writer_goes_on() {
    // A lock another session holds used to hold the node's only writer, and with it every later write,
    // for as long as it lasted.
    let Some(schema) = PgSchema::create().await else { return };
    let url = schema.url.clone();
    let mut server = TestServer::start_with(|c| {
        c.database_url = Some(url);
        c.store_timeout_secs = 1;
    })
    .await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    set_title(&mut c, "c1", "before").await;
    let mut holder = schema.connect().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE chats IN EXCLUSIVE MODE").execute(&mut holder).await.unwrap();
    let reply = tokio::time::timeout(std::time::Duration::from_secs(60), c.request(&title("c1", "stuck")))
        .await
        .expect("the write is answered while the lock is held")
        .unwrap();
    let ServerMessage::Error(e) = &reply.message else { panic!("{reply:?}") };
    assert_eq!(e.code, ErrorCode::Unavailable, "{reply:?}");
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    // PostgreSQL cancelled the statement at the timeout: the write was rolled back, not left to commit
    // once the lock went.
    let title_v: i64 =
        sqlx::query_scalar("SELECT title_v FROM chats WHERE chat_id = 'c1'").fetch_one(&mut holder).await.unwrap();
    assert_eq!(title_v, 1, "the write answered unavailable was not applied");
    assert_eq!(set_title(&mut c, "c1", "after").await.versions.title_v, 2);
    drop(c);
    server.stop().await;
}

// It hung until nextest's 120 s limit once, in a CI run (2026-11-30): not in the test, but in the drop
// of its schema, which blocks the test's runtime while the server's pool, on that runtime, was warming
// up a connection it had opened to replace the terminated ones, in a transaction holding the schema's
// tables (seen under CPU load; `PgSchema`'s drop now ends such sessions after a 1 s lock timeout). Each
// step is bounded all the same, so that a stuck step names itself and prints the sessions it may wait for.
#[tokio::test]
async fn a_connection_terminated_while_the_writer_was_idle_costs_no_write() {
    // PostgreSQL ends the server's sessions (a restart, an idle timeout, an operator) while no write is
    // in flight. The writer gives its connection back after a pause (5 s) and takes a checked one, so
    // the next write after the pause is confirmed at the first try.
    let Some(reruns) = terminated_sessions_cost_no_write(std::time::Duration::from_secs(6)).await else { return };
    assert_eq!(reruns, 0, "the writer took a checked connection after the pause");
}

#[tokio::test]
async fn a_connection_terminated_under_the_writer_between_two_batches_costs_no_write() {
    // The same, with the next write at once: the writer still holds its connection, and its batch gets
    // the session's FATAL error before any result, so the batch never ran; it is run again on a checked
    // connection.
    let Some(reruns) = terminated_sessions_cost_no_write(std::time::Duration::ZERO).await else { return };
    assert_eq!(reruns, 1, "the batch ran again on another connection");
}

/// The tests that end a server's sessions read `chatsync_writer_reruns_total`, which is the process's:
/// under `cargo test` (one process) they take turns.
static RERUN_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Terminates every PostgreSQL session of a server while it is idle (and waits until they are gone),
/// waits `pause`, then writes: the write is confirmed at the first try. Returns how many batches the
/// writer ran again meanwhile (`chatsync_writer_reruns_total`); `None` without PostgreSQL (skipped).
async fn terminated_sessions_cost_no_write(pause: std::time::Duration) -> Option<u64> {
    let _turn = RERUN_TESTS.lock().await;
    let schema = PgSchema::create().await?;
    let app = format!("idle-{}", schema.name);
    let url = format!("{}&application_name={app}", schema.url);
    let mut admin = schema.connect().await;
    let mut server =
        bounded(&mut admin, &app, "start", TestServer::start_with(|config| config.database_url = Some(url))).await;
    let mut c = bounded(&mut admin, &app, "new user", new_user(&server, "dora", "laptop")).await;
    bounded(&mut admin, &app, "first write", set_title(&mut c, "c1", "before")).await;
    let reruns_before = reruns(&bounded(&mut admin, &app, "metrics", server.metrics()).await);
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
        .bind(&app)
        .fetch_all(&mut admin)
        .await
        .unwrap();
    assert!(pids.len() >= 2, "{pids:?}");
    for pid in &pids {
        sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&mut admin).await.unwrap();
    }
    let gone = async {
        loop {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                .bind(&pids)
                .fetch_one(&mut admin)
                .await
                .unwrap();
            if left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), gone).await.expect("the sessions end");
    tokio::time::sleep(pause).await;
    let after = bounded(&mut admin, &app, "write after the pause", set_title(&mut c, "c1", "after")).await;
    assert_eq!(after.versions.title_v, 2);
    let reruns_after = reruns(&bounded(&mut admin, &app, "metrics", server.metrics()).await);
    drop(c);
    bounded(&mut admin, &app, "stop", server.stop()).await;
    Some(reruns_after - reruns_before)
}

/// `chatsync_writer_reruns_total` in a `/metrics` text (0 before the first).
fn reruns(metrics: &str) -> u64 {
    common::sample(metrics, "chatsync_writer_reruns_total", "").map_or(0, |value| value as u64)
}

/// Awaits `step` for at most 60 s (a liveness bound, not a timing check); past it, prints the server's
/// PostgreSQL sessions (`application_name` = `app`) and every session waiting for a lock, then panics.
async fn bounded<T>(
    admin: &mut sqlx::PgConnection,
    app: &str,
    what: &str,
    step: impl std::future::Future<Output = T>,
) -> T {
    if let Ok(done) = tokio::time::timeout(std::time::Duration::from_secs(60), step).await {
        return done;
    }
    let sessions: Vec<String> = sqlx::query_scalar(
        "SELECT concat_ws(' | ', pid, application_name, state, wait_event_type || ':' || wait_event, left(query, 120)) \
         FROM pg_stat_activity WHERE application_name = $1 OR wait_event_type = 'Lock'",
    )
    .bind(app)
    .fetch_all(admin)
    .await
    .unwrap_or_default();
    panic!("{what}: no answer within 60 s; sessions: {sessions:#?}");
}

#[tokio::test]
async fn deployments_in_two_schemas_of_one_database_do_not_share_owner_locks() {
    let (Some(one), Some(two)) = (PgSchema::create().await, PgSchema::create().await) else { return };
    let mut servers = [start(&one).await, start(&two).await];
    // A batch for alice holds its owner lock in the first schema's deployment...
    let mut holder = one.connect().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    assert_eq!(title_batch_on(&mut holder, &[("alice", "a1")]).await.unwrap(), ["not_found"]);
    // ...and the second's batch for its own alice does not wait for it (a bound, so that the old
    // behaviour fails instead of hanging).
    let mut other = two.connect().await;
    sqlx::query("SET lock_timeout = '10s'").execute(&mut other).await.unwrap();
    let outcome = title_batch_on(&mut other, &[("alice", "a1")]).await;
    assert_eq!(outcome.expect("no wait for another schema's lock"), ["not_found"]);
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    for server in &mut servers {
        server.stop().await;
    }
}

/// Calls `function` (`chatsync_write_batch_locked`, or `chatsync_write_batch` as a node from before the
/// owner locks of migration 0008 does) with one op of `kind` on alice's chat `c1`: a message `message_id`
/// from `sender`, or a read marker at `seq`. Returns (outcome, read_seq, unread_count).
async fn one_op(
    conn: &mut sqlx::PgConnection,
    function: &str,
    kind: &str,
    message_id: Option<&str>,
    sender: Option<&str>,
    seq: Option<i64>,
) -> (String, i64, i64) {
    let none_text: Vec<Option<&str>> = vec![None];
    let none_bytes: Vec<Option<&[u8]>> = vec![None];
    let none_int: Vec<Option<i64>> = vec![None];
    let payload: Vec<Option<&[u8]>> = vec![message_id.map(|_| &b"sealed elsewhere"[..])];
    let row = sqlx::query(&format!(
        "SELECT r_outcome, r_read_seq, r_unread_count FROM {function}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
         $12, $13)"
    ))
    .bind(vec![kind])
    .bind(vec!["alice"])
    .bind(vec![Some("c1")])
    .bind(&payload)
    .bind(&none_bytes)
    .bind(&none_text)
    .bind(&none_int)
    .bind(vec![seq])
    .bind(vec![Some(1_000_i64)])
    .bind(vec![message_id])
    .bind(&none_text)
    .bind(vec![sender])
    .bind(vec![message_id.map(|_| 1_000_i64)])
    .fetch_one(conn)
    .await
    .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn a_read_marker_that_waited_for_a_message_counts_it_as_unread() {
    // `mark_read` recounts the unread messages in its UPDATE. One that waits for the chat's row (a message
    // being added by a transaction not under the owner lock: a node from before migration 0008, during a
    // rolling upgrade) is re-checked on the new row, but its recount ran on the statement's snapshot, taken
    // before that message committed: the message was missing from `unread_count` for good.
    use chatsync::store::chats::WrappedKey;
    let Some(schema) = PgSchema::create().await else { return };
    let backend = store::open_backend(&schema.url, store::Durability::Full).await.unwrap();
    backend.identity.create_user("alice", false, 1).await.unwrap();
    // Alice's chat c1 with one message from the bot (seq 1).
    let first = WriteOp::Message {
        owner: "alice".into(),
        chat_id: "c1".into(),
        message_id: "m1".into(),
        content: b"sealed elsewhere".to_vec(),
        client_timestamp: None,
        sender: "bot".into(),
        created_at: 1_000,
        target: Target::Create { key: WrappedKey { wrapped: b"wrapped".to_vec(), kek_id: "k1".into() }, max_chats: 10 },
        now: 1_000,
        event: None,
    };
    assert!(matches!(backend.chats.write(first).await.unwrap(), WriteResult::Message { duplicate: false, .. }));
    // An older node adds m2 from the bot (seq 2), not committed yet.
    let mut older = schema.connect().await;
    sqlx::query("BEGIN").execute(&mut older).await.unwrap();
    let added = one_op(&mut older, "chatsync_write_batch", "message", Some("m2"), Some("bot"), None).await;
    assert_eq!(added, ("message".to_owned(), 0, 2));
    // A device marks m1 read: the batch waits for the chat's row.
    let marker = schema.connect().await;
    let read = tokio::spawn(async move {
        let mut marker = marker;
        one_op(&mut marker, "chatsync_write_batch_locked", "mark_read", None, None, Some(1)).await
    });
    let mut watcher = schema.connect().await;
    until_waiting_for_locks(&mut watcher, 1).await;
    sqlx::query("COMMIT").execute(&mut older).await.unwrap();
    assert_eq!(read.await.unwrap(), ("applied".to_owned(), 1, 1), "m2 is above the marker: unread");
    let chat = backend.chats.chat("alice", "c1").await.unwrap().unwrap();
    assert_eq!((chat.messages_v, chat.read_seq, chat.unread_count), (2, 1, 1));
    backend.identity.close().await;
}

/// A proxy to PostgreSQL (plain TCP: the server's URL says `sslmode=disable`) that, once armed, answers the
/// next group-commit batch, after PostgreSQL has run and committed it, with nothing but a FATAL error of
/// class XX (as a backend that PANICs at the commit's WAL flush would), and closes that connection. It reads
/// the protocol's messages in both directions: the client's Parse names the batch's prepared statement,
/// its Bind runs it.
struct FatalAfterCommit {
    url: String,
    armed: Arc<AtomicBool>,
}

impl FatalAfterCommit {
    async fn start(schema: &PgSchema) -> FatalAfterCommit {
        let rest = schema.url.split_once("://").unwrap().1;
        let authority = rest.split(['/', '?']).next().unwrap();
        let target = authority.rsplit_once('@').map_or(authority, |(_, host)| host).to_owned();
        let target = if target.contains(':') { target } else { format!("{target}:5432") };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            format!("{}&sslmode=disable", schema.url.replacen(&target, &listener.local_addr().unwrap().to_string(), 1));
        let armed = Arc::new(AtomicBool::new(false));
        let trigger = armed.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else { continue };
                tokio::spawn(proxy_connection(client, server, trigger.clone()));
            }
        });
        FatalAfterCommit { url, armed }
    }
}

/// Reads one message (`typed`: a type byte first) into `out`; `None` at the end of the stream.
async fn pg_message(r: &mut (impl AsyncReadExt + Unpin), typed: bool, out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    out.resize(if typed { 5 } else { 4 }, 0);
    r.read_exact(out).await.ok()?;
    let len = u32::from_be_bytes(out[out.len() - 4..].try_into().unwrap()) as usize;
    let start = out.len();
    out.resize(start + len - 4, 0);
    r.read_exact(&mut out[start..]).await.ok()?;
    Some(())
}

async fn proxy_connection(client: tokio::net::TcpStream, server: tokio::net::TcpStream, armed: Arc<AtomicBool>) {
    // Written a message at a time: without this, Nagle's algorithm holds each small write for an ACK.
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut client_r, mut client_w) = client.into_split();
    let (mut server_r, mut server_w) = server.into_split();
    // Set by the client's side when it forwards a Bind of the batch statement while armed.
    let fail_next = Arc::new(AtomicBool::new(false));
    let fail = fail_next.clone();
    let upstream = tokio::spawn(async move {
        let mut batch_statements = std::collections::HashSet::new();
        let mut msg = Vec::new();
        let mut first = true;
        while pg_message(&mut client_r, !first, &mut msg).await.is_some() {
            first = false;
            let body = &msg[5..];
            let cstr = |from: usize| {
                let end = from + body[from..].iter().position(|b| *b == 0).unwrap();
                (String::from_utf8_lossy(&body[from..end]).into_owned(), end + 1)
            };
            match msg[0] {
                b'P' => {
                    let (name, next) = cstr(0);
                    if cstr(next).0.contains("chatsync_write_batch_locked") {
                        batch_statements.insert(name);
                    }
                }
                b'B' => {
                    let (_, next) = cstr(0);
                    if batch_statements.contains(&cstr(next).0) && armed.swap(false, Ordering::SeqCst) {
                        fail.store(true, Ordering::SeqCst);
                    }
                }
                _ => {}
            }
            if server_w.write_all(&msg).await.is_err() {
                return;
            }
        }
    });
    let mut msg = Vec::new();
    let mut swallowing = false;
    while pg_message(&mut server_r, true, &mut msg).await.is_some() {
        swallowing |= fail_next.load(Ordering::SeqCst);
        if !swallowing {
            if client_w.write_all(&msg).await.is_err() {
                break;
            }
            continue;
        }
        if msg[0] == b'Z' {
            // The batch ran and committed (ReadyForQuery follows the commit): the client hears only this.
            let mut fields = Vec::new();
            for (tag, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', "XX000"), (b'M', "injected after the commit")]
            {
                fields.push(tag);
                fields.extend_from_slice(value.as_bytes());
                fields.push(0);
            }
            fields.push(0);
            let mut error = vec![b'E'];
            error.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
            error.extend_from_slice(&fields);
            let _ = client_w.write_all(&error).await;
            break;
        }
    }
    upstream.abort();
}

#[tokio::test]
async fn a_batch_whose_connection_fails_fatally_after_its_commit_is_unavailable() {
    // A write whose connection PostgreSQL ends with a FATAL or PANIC error has an unknown outcome (it may
    // have committed): it must fail with `unavailable`, so that the node drops what it cached of the user
    // and the device knows the write may have been applied. Taken through the error's class (here XX,
    // internal), it was `internal`, and the cache went on serving the state from before the write.
    let Some(schema) = PgSchema::create().await else { return };
    let proxy = FatalAfterCommit::start(&schema).await;
    let url = proxy.url.clone();
    let mut server = TestServer::start_with(|config| config.database_url = Some(url)).await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    assert_eq!(set_title(&mut c, "c1", "v1").await.versions.title_v, 1);
    assert_eq!(chat_state(&mut c, "c1").await.versions.title_v, 1, "cached");
    proxy.armed.store(true, Ordering::SeqCst);
    let reply = c.request(&title("c1", "v2")).await.unwrap();
    assert_error(&reply, ErrorCode::Unavailable, None);
    assert!(!proxy.armed.load(Ordering::SeqCst), "the batch went through the proxy");
    // It had committed: what the device reads next is the store's truth, not the cache's older state.
    let state = chat_state(&mut c, "c1").await;
    assert_eq!((state.title.as_deref(), state.versions.title_v), (Some("v2"), 2));
    server.stop().await;
}

/// A TCP proxy to PostgreSQL that, once armed, holds back everything PostgreSQL sends from the moment a
/// client sends a read's `BEGIN` (the answers wait until `held` is cleared); what clients send goes
/// through at once.
struct HoldingProxy {
    url: String,
    armed: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
}

impl HoldingProxy {
    async fn start(schema: &PgSchema, app: &str) -> HoldingProxy {
        let rest = schema.url.split_once("://").unwrap().1;
        let authority = rest.split(['/', '?']).next().unwrap();
        let target = authority.rsplit_once('@').map_or(authority, |(_, host)| host).to_owned();
        let target = if target.contains(':') { target } else { format!("{target}:5432") };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let here = listener.local_addr().unwrap().to_string();
        let url = format!("{}&sslmode=disable&application_name={app}", schema.url.replacen(&target, &here, 1));
        let (armed, held) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (trigger, gate) = (armed.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else { continue };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let (trigger, hold) = (trigger.clone(), gate.clone());
                tokio::spawn(async move {
                    let mut message = Vec::new();
                    let mut typed = false; // the startup message has no type byte
                    while pg_message(&mut client_read, typed, &mut message).await.is_some() {
                        let begin = b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
                        let is_begin = typed && message[0] == b'Q' && message.windows(begin.len()).any(|w| w == begin);
                        if is_begin && trigger.swap(false, Ordering::SeqCst) {
                            hold.store(true, Ordering::SeqCst);
                        }
                        typed = true;
                        if server_write.write_all(&message).await.is_err() {
                            return;
                        }
                    }
                });
                let gate = gate.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while gate.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        HoldingProxy { url, armed, held }
    }
}

#[tokio::test]
async fn a_read_cancelled_while_its_begin_is_unanswered_leaves_no_connection_in_a_transaction() {
    // A store read cancelled after its `BEGIN` went out but before PostgreSQL's answer came (a warm-up
    // cancelled because the user's last connection on the node closed, or dropped with the caches when
    // the Redis bus had a gap) returned its connection to the pool still inside that transaction: sqlx
    // counts a transaction only once the `BEGIN` is answered, so its rollback on drop did nothing. The
    // next user of the connection ran in the stale read-only snapshot: a device's sighting failed ("cannot
    // execute INSERT in a read-only transaction", the connect refused with 1011), and after that error every
    // statement on the connection failed ("current transaction is aborted"), for good. Found by
    // `convergence.rs` (Redis killed under load).
    let Some(schema) = PgSchema::create().await else { return };
    let app = format!("held-{}", schema.name);
    let proxy = HoldingProxy::start(&schema, &app).await;
    let url = proxy.url.clone();
    let mut server = TestServer::start_with(|config| config.database_url = Some(url)).await;
    let mut c = new_user(&server, "alice", "laptop").await;
    add_message(&mut c, "c1", "m1", json!("hello")).await;
    let mut admin = schema.connect().await;
    let in_transaction = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                          AND state IN ('idle in transaction', 'idle in transaction (aborted)')";

    proxy.armed.store(true, Ordering::SeqCst);
    let chats = server.ctx.chats.clone();
    let read = tokio::spawn(async move { chats.latest_messages("alice", "c1", 10).await });
    // PostgreSQL has run the read's BEGIN; its answer is held in the proxy.
    let begun = async {
        loop {
            let n: i64 = sqlx::query_scalar(in_transaction).bind(&app).fetch_one(&mut admin).await.unwrap();
            if n > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), begun).await.expect("the read begins");
    assert!(proxy.held.load(Ordering::SeqCst), "the read's BEGIN went through the proxy");
    read.abort();
    assert!(read.await.unwrap_err().is_cancelled());
    proxy.held.store(false, Ordering::SeqCst);

    // No connection of the server stays inside that transaction (a bounded wait for the pool to settle).
    let settled = async {
        loop {
            let n: i64 = sqlx::query_scalar(in_transaction).bind(&app).fetch_one(&mut admin).await.unwrap();
            if n == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), settled)
        .await
        .expect("a connection was left in the cancelled read's transaction");
    // And every connection of the pool still works: as many new devices as the pool has connections.
    for i in 0..16 {
        let mut d = another_device(&server, "alice", &format!("tablet{i}")).await;
        assert_eq!(chat_state(&mut d, "c1").await.versions.messages_v, 1);
    }
    server.stop().await;
}
