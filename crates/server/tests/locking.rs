//! Several processes on one data directory: the data directory lock makes `serve` and `keys rotate`
//! exclusive (other CLI commands still work while `serve` runs), and every database connection (server
//! pool, chat writer, CLI) waits for a lock another process holds instead of failing with "database is
//! locked".

mod common;

use chatsync::gateway::auth;
use chatsync_client::{Client, ConnectOptions};
use chatsync_protocol::*;
use common::TestServer;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn chatsync(data: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatsync"));
    cmd.arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("CHATSYNC_DATA_DIR")
        .env_remove("CHATSYNC_CONFIG")
        .env_remove("CHATSYNC_MASTER_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail because the data directory is locked by `serve`.
fn refused_as_locked(out: Output) {
    assert!(!out.status.success(), "expected failure, stdout: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another chatsync process") && err.contains("serve"), "{err}");
}

/// Starts `chatsync serve` on port 0 and waits until it listens.
fn serve(data: &Path) -> Child {
    let mut child = chatsync(data, &["serve", "--listen", "127.0.0.1:0"]).env("RUST_LOG", "info").spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if line.contains("ws://") {
            break;
        }
    }
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    child
}

#[test]
fn serve_and_keys_rotate_are_exclusive_on_a_data_directory_and_other_commands_are_not() {
    let dir = tempfile::tempdir().unwrap();
    ok(chatsync(dir.path(), &["users", "add", "alice"]).output().unwrap());
    let mut first = serve(dir.path());

    refused_as_locked(chatsync(dir.path(), &["serve", "--listen", "127.0.0.1:0"]).output().unwrap());
    refused_as_locked(chatsync(dir.path(), &["keys", "rotate"]).output().unwrap());
    // Commands that only use the database work next to the server.
    ok(chatsync(dir.path(), &["users", "add", "bob"]).output().unwrap());
    let token = ok(chatsync(dir.path(), &["sessions", "issue", "bob"]).output().unwrap());
    ok(chatsync(dir.path(), &["sessions", "revoke", token.trim()]).output().unwrap());
    ok(chatsync(dir.path(), &["devices", "list", "alice"]).output().unwrap());

    // A crash releases the lock too: the lock file stays, but does not block the next start.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(dir.path().join("chatsync.lock").exists());
    ok(chatsync(dir.path(), &["keys", "rotate"]).output().unwrap());
    let mut second = serve(dir.path());
    refused_as_locked(chatsync(dir.path(), &["keys", "rotate"]).output().unwrap());
    Command::new("kill").args(["-TERM", &second.id().to_string()]).status().unwrap();
    assert!(second.wait().unwrap().success());
    ok(chatsync(dir.path(), &["keys", "rotate"]).output().unwrap());
}

#[tokio::test]
async fn an_in_process_server_holds_the_lock_until_it_has_stopped() {
    let mut server = TestServer::start().await;
    let config = (*server.ctx.config).clone();
    let err = chatsync::build(config.clone()).await.err().expect("a second server on the same data directory");
    assert!(format!("{err:#}").contains("is in use by another chatsync process"), "{err:#}");
    server.stop().await;
    let ctx = chatsync::build(config).await.expect("the lock is released once the server has stopped");
    drop(ctx);
}

/// Takes the database's write lock from a separate connection, as another process writing would, and
/// holds it until the returned sender is used (or dropped); then commits.
fn hold_write_lock(db: &Path) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO meta (name, value) VALUES ('lock-test', x'00');").unwrap();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let _ = released.recv();
        conn.execute_batch("COMMIT").unwrap();
    });
    (release, holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_cli_writes_wait_for_a_write_lock_held_by_another_process() {
    let server = TestServer::start().await;
    let token = server.user_token("alice").await;
    let revoked = server.token("alice").await;
    let later = server.token("alice").await;
    let (mut c, _) = server.connect(&token, "laptop").await;
    let data = server.data.path().to_owned();

    let (release, holder) = hold_write_lock(&data.join("chatsync.db"));
    // Every kind of writer starts while the lock is held: CLI processes (opening the database, then
    // writing), the chat writer thread, the server's pool (session issue, device binding at connect).
    let children: Vec<_> = [
        vec!["users", "add", "bob"],
        vec!["sessions", "issue", "alice", "--device-id", "phone"],
        vec!["sessions", "revoke", revoked.as_str()],
    ]
    .into_iter()
    .map(|args| (args.join(" "), chatsync(&data, &args).spawn().unwrap()))
    .collect();
    let write = tokio::spawn(async move {
        let msg =
            ClientMessage::UpdateTitle(UpdateTitle { chat_id: ChatId::new("c1").unwrap(), new_title: "t".into() });
        c.request(&msg).await.map(|r| r.message)
    });
    let store = server.ctx.store.clone();
    let issue = tokio::spawn(async move {
        auth::issue_session(store.as_ref(), "alice", Some("d".repeat(64)), Duration::from_secs(60)).await
    });
    let url = server.url.clone();
    let connect = tokio::spawn(async move {
        let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(&later, "tablet") };
        Client::connect_authenticated(&url, &opts).await.map(|(_, hello)| hello)
    });
    // Give them time to run into the lock (not an assertion: they can only finish once it is released).
    tokio::time::sleep(Duration::from_secs(1)).await;
    release.send(()).unwrap();
    tokio::task::spawn_blocking(move || holder.join().unwrap()).await.unwrap();

    for (args, child) in children {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
        assert!(out.status.success(), "chatsync {args}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let reply = write.await.unwrap().unwrap();
    assert!(matches!(reply, ServerMessage::ChatTitleUpdated(_)), "{reply:?}");
    issue.await.unwrap().expect("a session issued by the server while the database is locked");
    assert_eq!(connect.await.unwrap().expect("an authentication while the database is locked").user_id, "alice");
}
