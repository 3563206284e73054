//! The `chatsync` binary: user, session and device commands with their error paths, and `serve`
//! shutting down on SIGTERM.

use chatsync_client::{Client, ConnectOptions};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn chatsync(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("CHATSYNC_DATA_DIR")
        .env_remove("CHATSYNC_CONFIG")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure, stdout: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
}

/// Starts `chatsync serve` on port 0 with `args` and returns the child, its remaining stderr lines, and
/// the WebSocket URL it printed.
fn serve(
    dir: &Path,
    args: &[&str],
    rust_log: Option<&str>,
) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStderr>>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatsync"));
    cmd.arg("--data-dir").arg(dir).args(["serve", "--listen", "127.0.0.1:0"]).args(args).stderr(Stdio::piped());
    match rust_log {
        Some(filter) => cmd.env("RUST_LOG", filter),
        None => cmd.env_remove("RUST_LOG"),
    };
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if let Some(i) = line.find("ws://") {
            break line[i..].split(['"', ' ']).next().unwrap().to_owned();
        }
    };
    (child, lines, url)
}

#[test]
fn users_add_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    fails(&chatsync(dir.path(), &["users", "add", "alice"]), "already exists");
    fails(&chatsync(dir.path(), &["users", "add", "bad id!"]), "malformed user id");
    ok(&chatsync(dir.path(), &["users", "add", "carol@example.com", "--tfa"]));
}

#[test]
fn sessions_issue_prints_only_a_token_and_checks_its_arguments() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let out = ok(&chatsync(dir.path(), &["sessions", "issue", "alice"]));
    let token = out.trim_end_matches('\n');
    assert_eq!(out.lines().count(), 1);
    let random = token.strip_prefix("cs_").unwrap_or_else(|| panic!("tokens start with cs_: {token:?}"));
    assert_eq!(random.len(), 43, "32 random bytes, base64url: {token:?}");
    assert!(random.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    let second = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "phone", "--ttl", "12h"]));
    assert_ne!(second, out, "tokens are random");
    ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-hash", &"a".repeat(64)]));

    fails(&chatsync(dir.path(), &["sessions", "issue", "nobody"]), "unknown user");
    fails(&chatsync(dir.path(), &["sessions", "issue", "bad id"]), "malformed user id");
    fails(
        &chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", &"x".repeat(129)]),
        "malformed device id",
    );
    fails(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-hash", "zz"]), "malformed device hash");
    fails(&chatsync(dir.path(), &["sessions", "issue", "alice", "--ttl", "soon"]), "--ttl");
    fails(&chatsync(dir.path(), &["sessions", "issue", "alice", "--ttl", "0s"]), "--ttl");
}

#[test]
fn sessions_revoke_once() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice"]));
    ok(&chatsync(dir.path(), &["sessions", "revoke", token.trim()]));
    fails(&chatsync(dir.path(), &["sessions", "revoke", token.trim()]), "no active session");
    fails(&chatsync(dir.path(), &["sessions", "revoke", "made-up"]), "no active session");
}

/// Stores a session for `user_id` whose token is exactly `token` (as issued before tokens had a prefix).
async fn legacy_session(dir: &Path, user_id: &str, token: &str) {
    let store = chatsync::store::open(&format!("sqlite://{}", dir.join("chatsync.db").display())).await.unwrap();
    let (_, mut session) = chatsync::gateway::auth::new_session(user_id, None, std::time::Duration::from_secs(3600));
    session.token_hash = chatsync::gateway::auth::token_hash(token);
    store.create_session(&session).await.unwrap();
    store.close().await;
}

#[tokio::test]
async fn every_command_that_takes_a_token_accepts_one_starting_with_a_hyphen() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    // Old tokens were bare base64url: about 1 in 64 started with `-`, some with `--`.
    let (dash, dashes) =
        ("-Wq3oldStyleToken_aaaaaaaaaaaaaaaaaaaaaaaaaaa", "--v9oldStyleToken_bbbbbbbbbbbbbbbbbbbbbbbbbbb");
    legacy_session(dir.path(), "alice", dash).await;
    legacy_session(dir.path(), "alice", dashes).await;
    let (mut server, _lines, url) = serve(dir.path(), &[], None);
    for token in [dash, dashes] {
        let mut client = Command::new(env!("CARGO_BIN_EXE_chatsync"))
            .args(["connect", "--url", &url, "--device-id", "laptop", "--token", token])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let first = BufReader::new(client.stdout.take().unwrap()).lines().next().expect("a greeting").unwrap();
        client.kill().unwrap();
        client.wait().unwrap();
        assert!(first.contains(r#""type":"connected""#), "{token}: {first}");
    }
    ok(&chatsync(dir.path(), &["sessions", "revoke", dash]));
    ok(&chatsync(dir.path(), &["sessions", "revoke", dashes]));
    fails(&chatsync(dir.path(), &["sessions", "revoke", dash]), "no active session");
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(server.wait().unwrap().success());
}

#[test]
fn devices_list_shows_devices_bound_at_issue() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let empty = ok(&chatsync(dir.path(), &["devices", "list", "alice"]));
    assert_eq!(empty.lines().count(), 1, "header only: {empty}");
    ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "phone"]));
    let listed = ok(&chatsync(dir.path(), &["devices", "list", "alice"]));
    assert!(listed.contains(&chatsync::gateway::auth::sha256_hex("id:phone")), "{listed}");
    fails(&chatsync(dir.path(), &["devices", "list", "nobody"]), "unknown user");
}

#[test]
fn unusable_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    fails(&chatsync(&file.join("data"), &["users", "add", "alice"]), "cannot create data directory");
}

#[test]
fn environment_and_config_file_are_read_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let from_env = dir.path().join("env");
    let out = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["users", "add", "alice"])
        .env("CHATSYNC_DATA_DIR", &from_env)
        .output()
        .unwrap();
    ok(&out);
    assert!(from_env.join("chatsync.db").exists());

    let from_file = dir.path().join("file");
    let config = dir.path().join("chatsync.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n", from_file.display().to_string())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["users", "add", "bob", "--config"])
        .arg(&config)
        .env("CHATSYNC_DATA_DIR", &from_env)
        .output()
        .unwrap();
    ok(&out);
    assert!(!from_file.exists(), "the environment beats the file");

    let out = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["users", "add", "bob", "--config"])
        .arg(&config)
        .env_remove("CHATSYNC_DATA_DIR")
        .output()
        .unwrap();
    ok(&out);
    assert!(from_file.join("chatsync.db").exists(), "the file beats the default");

    std::fs::write(&config, "data_dri = \"x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["users", "add", "x", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    fails(&out, "invalid configuration");
}

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_chatsync")).arg("--help").output().unwrap();
    let help = ok(&out);
    for cmd in ["serve", "users", "sessions", "devices"] {
        assert!(help.contains(cmd), "{help}");
    }
    let serve = ok(&Command::new(env!("CARGO_BIN_EXE_chatsync")).args(["serve", "--help"]).output().unwrap());
    assert!(serve.contains("CHATSYNC_LISTEN") && serve.contains("--max-frame-bytes"), "{serve}");
}

#[tokio::test]
async fn serve_closes_clients_with_1001_on_sigterm_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice"])).trim().to_owned();
    let (mut child, lines, url) = serve(dir.path(), &["--log-format", "text"], Some("info"));
    assert!(!url.contains(&token));
    let (mut client, hello) = Client::connect_authenticated(&url, &ConnectOptions::new(&token, "d")).await.unwrap();
    assert_eq!(hello.user_id, "alice");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(client.recv_close().await.unwrap(), (1001, "Server shutting down".into()));
    let logs: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success(), "{logs:?}");
    assert!(logs.iter().all(|l| !l.contains(&token)), "the token never reaches a log line");
}

#[tokio::test]
async fn debug_logs_never_contain_tokens_titles_drafts_or_message_bodies() {
    use chatsync_protocol::*;
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice"])).trim().to_owned();
    let (mut child, lines, url) = serve(dir.path(), &["--log-format", "json", "--log-level", "trace"], None);
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<String>>());
    let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(&token, "d") };
    let (mut c, _) = Client::connect_authenticated(&url, &opts).await.unwrap();
    let chat = ChatId::new("c1").unwrap();
    let doc = serde_json::json!({"type": "doc", "content": [{"type": "text", "text": "draft-plaintext-7d1"}]});
    let requests = [
        ClientMessage::UpdateTitle(UpdateTitle { chat_id: chat.clone(), new_title: "title-plaintext-3f9".into() }),
        ClientMessage::UpdateDraft(UpdateDraft { chat_id: chat.clone(), draft_json: doc.as_object().cloned() }),
        ClientMessage::ChatMessageAdded(ChatMessageAdded {
            chat_id: chat.clone(),
            message: NewMessage {
                message_id: MessageId::new("m1").unwrap(),
                content: MessageContent::Text("body-plaintext-8c2".into()),
                timestamp: None,
                temp_id: None,
            },
        }),
        ClientMessage::InitialSyncRequest(InitialSyncRequest {
            chat_versions: Default::default(),
            immediate_view_chat_id: Some(chat),
        }),
    ];
    for r in &requests {
        let reply = c.request(r).await.unwrap();
        assert!(!matches!(reply.message, ServerMessage::Error(_)), "{reply:?}");
    }
    c.send_text(r#"{"type":"update_title","payload":{"chat_id":"c1","new_title":7}}"#).await.unwrap();
    c.recv().await.unwrap();
    c.close().await.unwrap();
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    let logs = reader.join().unwrap().join("\n");
    assert!(logs.contains("handled"), "trace logging was on: {}", &logs[..logs.len().min(2000)]);
    for secret in [token.as_str(), "title-plaintext-3f9", "draft-plaintext-7d1", "body-plaintext-8c2"] {
        assert!(!logs.contains(secret), "{secret:?} reached the log");
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(!logs.to_lowercase().contains(&hex), "{secret:?} reached the log in hex");
    }
}

#[tokio::test]
async fn connect_is_a_line_client_for_trying_the_protocol() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice"])).trim().to_owned();
    let (mut server, _lines, url) = serve(dir.path(), &[], None);
    let mut client = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["connect", "--url", &url, "--device-id", "laptop", "--token", &token])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    writeln!(stdin, r#"{{"type":"ping","request_id":"p1"}}"#).unwrap();
    writeln!(stdin, r#"{{"type":"update_title","payload":{{"chat_id":"c1","new_title":"Trip"}},"request_id":"t1"}}"#)
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while seen.len() < 3 || !seen.iter().any(|l: &String| l.contains("chat_title_updated")) {
        seen.push(out.next().expect("the client printed every message").unwrap());
    }
    assert!(seen[0].contains(r#""type":"connected""#), "{seen:?}");
    assert!(seen.iter().any(|l| l.contains(r#""type":"pong""#) && l.contains(r#""request_id":"p1""#)), "{seen:?}");
    assert!(seen.iter().any(|l| l.contains(r#""title":"Trip""#) && l.contains(r#""request_id":"t1""#)), "{seen:?}");
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(server.wait().unwrap().success());
    drop(stdin);
    assert!(client.wait().unwrap().success(), "the client ends cleanly when the server closes");
}
