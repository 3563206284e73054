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
        .env_remove("CHATSYNC_MASTER_KEY")
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

#[tokio::test]
async fn users_created_by_commands_get_their_data_key_under_the_store_s_master_key() {
    // `users add` and `sessions issue-bulk` create the users' data keys (their first writes then only read
    // them), but only under the master key the store was fixed with: before any server started there is
    // none to check against, and a different key must not wrap anything (it would lock the users out).
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "early"]));
    let url = format!("sqlite://{}", dir.path().join("chatsync.db").display());
    let backend = chatsync::store::open_command_backend(&url, chatsync::store::Durability::Full).await.unwrap();
    let chats = backend.chats.as_ref();
    assert_eq!(chats.user_key("early").await.unwrap(), None, "no server has fixed the master key yet");
    // What `serve` does at its first start: master.key created, the store's check value set.
    let master = chatsync::keys::load_master_key(dir.path(), None, chats).await.unwrap();

    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    ok(&chatsync(dir.path(), &["sessions", "issue-bulk", "--users", "2", "--devices", "1", "--prefix", "bulk"]));
    for user in ["alice", "bulk0", "bulk1"] {
        let key = chats.user_key(user).await.unwrap().unwrap_or_else(|| panic!("{user} has a key"));
        assert_eq!(key.kek_id, master.id());
        master.unwrap(&key.wrapped, &format!("user:{user}")).expect("opens under the store's master key");
    }
    assert_eq!(chats.user_key("early").await.unwrap(), None, "left to its first write");

    let other = chatsync::crypto::MasterKey::generate();
    let out = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["users", "add", "mallory"])
        .env("CHATSYNC_MASTER_KEY", other.to_base64().as_str())
        .output()
        .unwrap();
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not this store's"), "{err}");
    assert_eq!(chats.user_key("mallory").await.unwrap(), None, "nothing wrapped under another master key");
    backend.identity.close().await;
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
    // Sessions that expire as they are made: refused in bulk too.
    fails(&chatsync(dir.path(), &["sessions", "issue-bulk", "--users", "1", "--devices", "1", "--ttl", "0s"]), "--ttl");
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

/// A listing whose output reader is gone (`chatsync users list | head -1`) ends with success, as other
/// Unix tools do, not with a panic (exit 101) on the broken pipe; a secret shown only once (a session
/// token, an API key) that could not be written is an error, naming what to revoke.
#[test]
fn a_listing_whose_reader_is_gone_exits_0_and_an_unwritten_secret_fails() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let closed_stdout = |args: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatsync"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("CHATSYNC_DATA_DIR")
            .env_remove("CHATSYNC_CONFIG")
            .env_remove("CHATSYNC_MASTER_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    };
    fails(&closed_stdout(&["sessions", "issue", "alice"]), "revoke the session");
    fails(&closed_stdout(&["api-keys", "create"]), "could not be written; revoke ak_");
    for args in [&["users", "list"][..], &["users", "list", "--json"][..]] {
        // The read end closed before anything is written: every write is a broken pipe.
        let out = closed_stdout(args);
        assert!(out.status.success(), "{args:?}: {:?}, stderr: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
}

/// With a cluster bus, a revocation that cannot be announced on it (here: the master key, which seals the
/// bus, cannot be read) is still a success with a warning: it is committed, the nodes' periodic check
/// closes the connections, and a failure would have a second run find nothing to revoke.
#[test]
fn a_revocation_the_bus_cannot_carry_is_committed_and_succeeds_with_a_warning() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice"]));
    let key = dir.path().join("master.key");
    std::fs::write(&key, "AAAA\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Never reached: the bus is sealed with the master key, which fails first.
    let bus = ["--redis-url", "redis://127.0.0.1:1"];
    let out = chatsync(dir.path(), &[&bus[..], &["sessions", "revoke", token.trim()]].concat());
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning: could not tell the cluster") && err.contains("chmod 600"), "{err}");
    fails(&chatsync(dir.path(), &["sessions", "revoke", token.trim()]), "no active session");
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
    assert!(listed.lines().nth(1).unwrap().starts_with("phone "), "labelled with its device id: {listed}");
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

/// A store URL may carry its password in the query (`?password=…`, as libpq allows): the errors that name
/// the URL never show it, whichever command opens the store.
#[test]
fn a_password_in_the_store_url_s_query_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "hunter2-query-secret";
    for url in [
        format!("postgres://cs@127.0.0.1:1/db?password={secret}"),
        format!("postgres://cs@127.0.0.1:1/db?sslmode=disable&password={secret}&application_name=x"),
        format!("postgresql://cs:{secret}@127.0.0.1:1/db?password={secret}"),
    ] {
        for args in [&["users", "list"][..], &["users", "add", "alice"], &["sessions", "list", "alice"]] {
            let mut all = vec!["--database-url", url.as_str()];
            all.extend_from_slice(args);
            let out = chatsync(dir.path(), &all);
            fails(&out, "127.0.0.1:1/db");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!err.contains(secret), "{args:?}: {err}");
        }
    }
}

/// The log options given before the command (`chatsync --log-format text serve`) are flags too: they beat
/// `CHATSYNC_LOG_FORMAT` / `CHATSYNC_LOG_LEVEL`, as the storage and cluster options given there do.
#[test]
fn log_flags_before_the_command_beat_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--log-format", "text", "--log-level", "debug", "serve", "--listen", "127.0.0.1:0"])
        .env("CHATSYNC_LOG_FORMAT", "json")
        .env("CHATSYNC_LOG_LEVEL", "info")
        .env_remove("RUST_LOG")
        .env_remove("CHATSYNC_CONFIG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let listening = line.contains("ws://");
        seen.push(line);
        if listening {
            break;
        }
    }
    // (Killed: a SIGTERM this early may come before the server's handler is installed.)
    child.kill().unwrap();
    let _rest: Vec<String> = lines.map_while(Result::ok).collect();
    child.wait().unwrap();
    let listening = seen.last().expect("the server logged nothing");
    assert!(listening.contains("ws://") && !listening.starts_with('{'), "--log-format text: {seen:?}");
    assert!(seen.iter().any(|l| l.contains("DEBUG")), "--log-level debug: {seen:?}");
}

/// An `--allowed-origins` entry is compared byte for byte with the `Origin` header, so one a browser never
/// sends (a trailing slash, a space after the comma, capitals, a default port, a path, a wildcard) would
/// refuse that site's every upgrade without a word: `serve` refuses to start instead and says how to
/// write it. `null` (what sandboxed frames and local files send, on any site's behalf) is refused too.
#[test]
fn serve_refuses_allowed_origins_that_no_browser_sends() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |origins: &str| {
        Command::new(env!("CARGO_BIN_EXE_chatsync"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--allowed-origins", origins])
            .env_remove("CHATSYNC_CONFIG")
            .env_remove("CHATSYNC_ALLOWED_ORIGINS")
            .output()
            .unwrap()
    };
    for (origins, needle) in [
        ("https://app.example/", "write it as \"https://app.example\""),
        ("https://a.example, https://b.example", "write it as \"https://b.example\""),
        ("https://App.Example", "write it as \"https://app.example\""),
        ("https://app.example:443", "write it as \"https://app.example\""),
        ("https://app.example/chat", "write it as \"https://app.example\""),
        ("*", "\"*\" is not an origin"),
        ("null", "\"null\""),
        ("https://app.example,", "an entry is empty"),
    ] {
        let out = serve(origins);
        fails(&out, "allowed_origins");
        fails(&out, needle);
    }
}

/// Runs `serve` with `args` and returns its stderr, expecting it to refuse to start; if it starts
/// listening instead, stops it and fails the test. `RUST_LOG` (which wins over `--log-level`, still
/// checked) makes a server that starts say so, whatever log filter `args` give it.
fn refused_at_start(dir: &Path, args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .arg("--data-dir")
        .arg(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("CHATSYNC_CONFIG")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("ws://") {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("serve started with {args:?}: {line}");
        }
        seen.push(line);
    }
    let status = child.wait().unwrap();
    let stderr = seen.join("\n");
    assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
    stderr
}

/// A heartbeat timeout not above the Ping interval closes every idle, healthy connection (silence is
/// checked at each Ping: a client that answers every Ping is silent for a whole interval then); timers set
/// near u64::MAX seconds overflow (a panic in every connection at its first Ping, or at shutdown instead of
/// draining); a huge read buffer aborts the process at the first connection. `serve` refuses them all at
/// start, naming the setting, with exit status 1.
#[test]
fn serve_refuses_timings_and_buffers_it_cannot_run_with() {
    let dir = tempfile::tempdir().unwrap();
    let huge = u64::MAX.to_string();
    for (args, needle) in [
        (vec!["--ping-interval-secs", "30", "--heartbeat-timeout-secs", "10"], "heartbeat_timeout_secs (10)"),
        (vec!["--heartbeat-timeout-secs", "25"], "must be greater than ping_interval_secs (25)"),
        (vec!["--ping-interval-secs", &huge, "--heartbeat-timeout-secs", &huge], "ping_interval_secs is at most"),
        (vec!["--shutdown-timeout-secs", &huge], "shutdown_timeout_secs is at most 31536000"),
        (vec!["--session-check-interval-secs", &huge], "session_check_interval_secs is at most"),
        (vec!["--ws-read-buffer-bytes", "100000000000000"], "ws_read_buffer_bytes is at most"),
    ] {
        let stderr = refused_at_start(dir.path(), &args);
        assert!(stderr.contains("invalid configuration") && stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The lock file, whose content becomes the holder's note, is never written through a symbolic link planted
/// under its name: in a data directory others can write to, it would have the server or a command overwrite
/// any file its user may write.
#[test]
fn files_in_the_data_dir_are_never_written_through_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, data.join("chatsync.lock")).unwrap();
    let stderr = refused_at_start(&data, &[]);
    assert!(stderr.contains("cannot open lock file"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "the lock note overwrote the victim");
}

/// The probe of a writable data directory (named after the process) is never written through a symbolic link
/// planted under its name: it would truncate the file the link names.
#[tokio::test]
async fn the_writability_probe_is_never_written_through_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let probe = data.join(format!(".chatsync-write-test-{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &probe).unwrap();
    let store = chatsync::store::sqlite::SqliteStore::open(&data.join("chatsync.db"), Default::default()).await;
    store.expect("the store opens");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "the probe truncated the victim");
    assert!(std::fs::symlink_metadata(&probe).is_err(), "the probe is gone");
}

/// Two servers with data directories of their own but one embedded database (`--database-url sqlite://…`,
/// the same master key) would each serve it with their own hub and cache: neither's devices would hear of
/// the other's writes, and their caches would go stale. The database's directory is locked like the data
/// directory, so the second stops at once, and so does `keys rotate` while a server runs.
#[test]
fn two_servers_never_share_an_embedded_database_outside_their_data_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("shared").join("chatsync.db").display());
    let key = format!("{}\n", chatsync::crypto::MasterKey::generate().to_base64().as_str());
    let data = |name: &str| {
        let data = dir.path().join(name);
        std::fs::create_dir(&data).unwrap();
        let file = data.join("master.key");
        std::fs::write(&file, &key).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        data
    };
    let (first, second, third) = (data("a"), data("b"), data("c"));
    let (server, _lines, _url) = serve(&first, &["--database-url", &db], None);
    let stderr = refused_at_start(&second, &["--database-url", &db]);
    assert!(stderr.contains("is in use by another chatsync process") && stderr.contains("serve"), "{stderr}");
    fails(&chatsync(&third, &["keys", "rotate", "--database-url", &db]), "is in use by another chatsync process");
    // Another database in the same directory is another database: served beside it.
    let (fourth, fifth) = (data("d"), data("e"));
    let beside = format!("sqlite://{}", dir.path().join("shared").join("other.db").display());
    let (other, _lines, _url) = serve(&fourth, &["--database-url", &beside], None);
    stop(server);
    stop(other);
    ok(&chatsync(&third, &["keys", "rotate", "--database-url", &db]));
    // A data directory's own database, named by another server's --database-url: the same lock.
    let (owner, _lines, _url) = serve(&fifth, &[], None);
    let own = format!("sqlite://{}", fifth.join("chatsync.db").display());
    let stderr = refused_at_start(&second, &["--database-url", &own]);
    assert!(stderr.contains("is in use by another chatsync process"), "{stderr}");
    stop(owner);
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

/// A server whose log reader went away (`chatsync serve 2>&1 | logger`, the logger gone) writes its log
/// lines into a broken pipe: it must go on serving and still stop on SIGTERM (README, Operations). The
/// log library reported a failed write with `eprintln!`, which panics on that same broken stderr: every
/// task that logged died, and SIGTERM left the process running.
#[tokio::test]
async fn serve_with_its_stderr_reader_gone_still_serves_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice"])).trim().to_owned();
    let (child, lines, url) = serve(dir.path(), &[], Some("info"));
    drop(lines);
    // Killed if the test fails: a server that ignores SIGTERM would outlive it.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = KillOnDrop(child);
    let (mut client, _) = Client::connect_authenticated(&url, &ConnectOptions::new(&token, "d")).await.unwrap();
    let reply = client.request(&chatsync_protocol::ClientMessage::Ping(chatsync_protocol::Empty {})).await.unwrap();
    assert_eq!(reply.message, chatsync_protocol::ServerMessage::Pong(chatsync_protocol::Empty {}));
    Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status().unwrap();
    assert_eq!(client.recv_close().await.unwrap(), (1001, "Server shutting down".into()));
    let status = tokio::task::spawn_blocking(move || exit_of(&mut server.0)).await.unwrap();
    assert!(status.success(), "{status:?}");
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
    // stdin stays open: the client must notice the close by itself.
    let status = exit_of(&mut client);
    drop(stdin);
    assert!(!status.success(), "a close by the server is an error for the client");
}

/// Waits for `child` to exit; kills it and fails if it has not within a minute (it hangs otherwise).
fn exit_of(child: &mut std::process::Child) -> std::process::ExitStatus {
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap();
    panic!("the client did not exit");
}

/// Runs `chatsync connect` against `url` with `extra` arguments, feeding it `input` then closing stdin.
fn connect_with_input(url: &str, token: &str, device: &str, extra: &[&str], input: &str) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["connect", "--url", url, "--device-id", device])
        .args(extra)
        .env("CHATSYNC_TOKEN", token)
        .env_remove("CHATSYNC_DATA_DIR")
        .env_remove("CHATSYNC_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    exit_of(&mut child);
    child.wait_with_output().unwrap()
}

fn stop(mut server: std::process::Child) {
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(server.wait().unwrap().success());
}

#[test]
fn connect_exits_0_at_the_end_of_piped_input_after_printing_the_replies() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "laptop"])).trim().to_owned();
    let (server, _lines, url) = serve(dir.path(), &[], None);
    let input = concat!(
        r#"{"type":"ping","request_id":"p1"}"#,
        "\n",
        r#"{"type":"update_title","payload":{"chat_id":"c1","new_title":"Trip"},"request_id":"t1"}"#,
        "\n",
        r#"{"type":"initial_sync_request","payload":{"chat_versions":{}},"request_id":"s1"}"#,
        "\n"
    );
    let out = connect_with_input(&url, &token, "laptop", &[], input);
    let stdout = ok(&out);
    assert!(stdout.lines().next().unwrap().contains(r#""type":"connected""#), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains(r#""type":"pong""#) && l.contains(r#""request_id":"p1""#)), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains(r#""title":"Trip""#) && l.contains(r#""request_id":"t1""#)), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.contains("initial_sync_response") && l.contains(r#""request_id":"s1""#)),
        "{stdout}"
    );
    stop(server);
}

/// A line whose `request_id` the server cannot echo (not a 1-64-character printable ASCII string: PROTOCOL.md
/// section 8, "Envelope strictness") is answered with `invalid_message` without one: `connect` must not wait
/// for a reply carrying it, and still exits 0 at the end of the input.
#[test]
fn connect_does_not_wait_for_replies_to_request_ids_the_server_cannot_echo() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "laptop"])).trim().to_owned();
    let (server, _lines, url) = serve(dir.path(), &[], None);
    let long = "r".repeat(65);
    let input = format!(
        "{}\n{}\n{}\n{}\n",
        r#"{"type":"ping","request_id":7}"#,
        format_args!(r#"{{"type":"ping","request_id":"{long}"}}"#),
        r#"{"type":"ping","request_id":""}"#,
        r#"{"type":"ping","request_id":"p1"}"#,
    );
    let out = connect_with_input(&url, &token, "laptop", &[], &input);
    let stdout = ok(&out);
    assert_eq!(stdout.lines().filter(|l| l.contains(r#""code":"invalid_message""#)).count(), 3, "{stdout}");
    assert!(stdout.lines().any(|l| l.contains(r#""type":"pong""#) && l.contains(r#""request_id":"p1""#)), "{stdout}");
    stop(server);
}

#[test]
fn connect_fails_with_the_reason_on_an_invalid_session() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let (server, _lines, url) = serve(dir.path(), &[], None);
    let out = connect_with_input(&url, "cs_made-up", "laptop", &[], "");
    fails(&out, "closed by the server: 1008 Invalid session");
    stop(server);
}

#[test]
fn connect_device_mismatch_names_the_device_sent_and_the_one_bound() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "laptop"])).trim().to_owned();
    let (server, _lines, url) = serve(dir.path(), &[], None);
    let data = dir.path().to_str().unwrap();
    let out = connect_with_input(&url, &token, "phone", &["--data-dir", data], "");
    fails(&out, "closed by the server: 1008 Device mismatch");
    fails(&out, r#"sent --device-id "phone""#);
    fails(&out, r#"bound to device "laptop""#);
    // Without the server's store, it still says which device id was sent, and never creates a database.
    let out = connect_with_input(&url, &token, "phone", &["--data-dir", elsewhere.path().to_str().unwrap()], "");
    fails(&out, r#"sent --device-id "phone", but the session is bound to another device"#);
    assert!(!elsewhere.path().join("chatsync.db").exists());
    // A token issued without a device is bound by its first connection, whose device id becomes the label.
    let unbound = ok(&chatsync(dir.path(), &["sessions", "issue", "alice"])).trim().to_owned();
    ok(&connect_with_input(&url, &unbound, "tablet", &[], ""));
    let out = connect_with_input(&url, &unbound, "phone", &["--data-dir", data], "");
    fails(&out, r#"bound to device "tablet""#);
    stop(server);
}

#[test]
fn connect_exits_when_the_server_closes_without_waiting_for_input() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "laptop"])).trim().to_owned();
    let (server, _lines, url) = serve(dir.path(), &["--session-check-interval-secs", "1"], None);
    let mut client = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["connect", "--url", &url, "--device-id", "laptop"])
        .env("CHATSYNC_TOKEN", &token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = client.stdin.take().unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap()).lines();
    let first = out.next().expect("a greeting").unwrap();
    assert!(first.contains(r#""type":"connected""#), "{first}");
    // Whatever else it prints is read, so that the client never meets a full or closed pipe.
    let reader = std::thread::spawn(move || out.map_while(Result::ok).count());
    ok(&chatsync(dir.path(), &["sessions", "revoke", &token]));
    let status = exit_of(&mut client);
    drop(stdin);
    reader.join().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut client.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("closed by the server: 1008 Session revoked"), "{err}");
    stop(server);
}

#[test]
fn connect_exits_0_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let token = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "laptop"])).trim().to_owned();
    let (server, _lines, url) = serve(dir.path(), &[], None);
    let mut client = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .args(["connect", "--url", &url, "--device-id", "laptop"])
        .env("CHATSYNC_TOKEN", &token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = client.stdin.take().unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap()).lines();
    assert!(out.next().expect("a greeting").unwrap().contains(r#""type":"connected""#));
    let reader = std::thread::spawn(move || out.map_while(Result::ok).count());
    Command::new("kill").args(["-INT", &client.id().to_string()]).status().unwrap();
    let status = exit_of(&mut client);
    drop(stdin);
    reader.join().unwrap();
    assert!(status.success(), "Ctrl-C is the user ending the session: {status:?}");
    stop(server);
}

#[test]
fn connect_to_no_server_says_so_once_with_the_url() {
    // A port let go on 127.0.0.2, where no other test's listener or outgoing connection takes it (on
    // 127.0.0.1 one could before the connect, which would then not be refused).
    let port = std::net::TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
    let url = format!("ws://127.0.0.2:{port}/v1/ws");
    let out = connect_with_input(&url, "cs_x", "laptop", &[], "");
    fails(&out, &format!("cannot connect to {url}: connection refused (is `chatsync serve` running?)"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.to_lowercase().matches("refused").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn connect_gives_up_on_a_server_that_never_answers_or_never_greets() {
    // One that accepts the TCP connection and answers nothing (not even the upgrade), one that upgrades
    // and never greets (stuck authenticating): a script piping its input must not hang forever.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_url = format!("ws://{}/v1/ws", mute.local_addr().unwrap());
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("ws://{}/v1/ws", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let held: Vec<_> = mute.incoming().take(1).collect();
        std::thread::sleep(std::time::Duration::from_secs(120));
        drop(held);
    });
    std::thread::spawn(move || {
        let tcp = silent.incoming().next().unwrap().unwrap();
        let ws = tokio_tungstenite::tungstenite::accept(tcp).unwrap();
        std::thread::sleep(std::time::Duration::from_secs(120));
        drop(ws);
    });
    let out = connect_with_input(&mute_url, "cs_x", "laptop", &[], "");
    fails(&out, &format!("cannot connect to {mute_url}: no answer within 10 s"));
    let out = connect_with_input(&silent_url, "cs_x", "laptop", &[], "");
    fails(&out, &format!("no greeting from {silent_url} within 10 s"));
}

#[test]
fn connect_requires_a_device_id() {
    let out = Command::new(env!("CARGO_BIN_EXE_chatsync")).args(["connect", "--token", "cs_x"]).output().unwrap();
    fails(&out, "--device-id");
}

#[test]
fn users_sessions_and_devices_are_listed_as_tables_and_as_json() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "bob", "--tfa"]));
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let table = ok(&chatsync(dir.path(), &["users", "list"]));
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(rows.len() == 2 && rows[0].starts_with("alice") && rows[1].starts_with("bob"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&chatsync(dir.path(), &["users", "list", "--json"]))).unwrap();
    assert_eq!(json[0]["user_id"], "alice");
    assert_eq!(json[1]["tfa"], true);

    let laptop = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "laptop"])).trim().to_owned();
    ok(&chatsync(dir.path(), &["sessions", "issue", "alice"]));
    ok(&chatsync(dir.path(), &["sessions", "revoke", &laptop]));
    let table = ok(&chatsync(dir.path(), &["sessions", "list", "alice"]));
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.lines().any(|l| l.contains("revoked") && l.contains("laptop")), "{table}");
    assert!(table.lines().any(|l| l.contains("active") && l.contains("(unbound)")), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&chatsync(dir.path(), &["sessions", "list", "alice", "--json"]))).unwrap();
    let sessions = json.as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    let revoked = sessions.iter().find(|s| s["state"] == "revoked").unwrap();
    assert_eq!(revoked["device_label"], "laptop");
    assert_eq!(revoked["device_hash"], chatsync::gateway::auth::sha256_hex("id:laptop"));
    assert!(revoked["revoked_at"].is_string());

    let table = ok(&chatsync(dir.path(), &["devices", "list", "alice"]));
    assert!(table.lines().nth(1).unwrap().starts_with("laptop "), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&chatsync(dir.path(), &["devices", "list", "alice", "--json"]))).unwrap();
    assert_eq!(json[0]["label"], "laptop");
    assert_eq!(json[0]["device_hash"], chatsync::gateway::auth::sha256_hex("id:laptop"));
    fails(&chatsync(dir.path(), &["sessions", "list", "nobody"]), "unknown user nobody in sqlite://");
}

#[tokio::test]
async fn devices_revoke_closes_the_device_s_live_sockets_only() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let laptop = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "laptop"])).trim().to_owned();
    let phone = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "phone"])).trim().to_owned();
    let (server, _lines, url) = serve(dir.path(), &["--session-check-interval-secs", "1"], None);
    let (mut on_laptop, _) =
        Client::connect_authenticated(&url, &ConnectOptions::new(&laptop, "laptop")).await.unwrap();
    let (mut on_phone, _) = Client::connect_authenticated(&url, &ConnectOptions::new(&phone, "phone")).await.unwrap();
    fails(&chatsync(dir.path(), &["devices", "revoke", "alice", "tablet"]), "has no device \"tablet\"");
    ok(&chatsync(dir.path(), &["devices", "revoke", "alice", "laptop"]));
    assert_eq!(on_laptop.recv_close().await.unwrap(), (1008, "Session revoked".into()));
    let ping = chatsync_protocol::ClientMessage::Ping(Default::default());
    on_phone.request(&ping).await.expect("the phone stays connected");
    let phone_hash = chatsync::gateway::auth::sha256_hex("id:phone");
    ok(&chatsync(dir.path(), &["devices", "revoke", "alice", &phone_hash]));
    assert_eq!(on_phone.recv_close().await.unwrap(), (1008, "Session revoked".into()));
    fails(&chatsync(dir.path(), &["devices", "revoke", "alice", "laptop"]), "no active session");
    stop(server);
}

/// `devices revoke` of a device that is not listed yet but has a session bound to it (bound by its first
/// connection, which the user's connection cap refused, so the device was never recorded) revokes that
/// session. It failed with "has no device" and revoked nothing: the session connected later.
#[tokio::test]
async fn devices_revoke_revokes_a_session_bound_to_a_device_not_listed_yet() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let laptop = ok(&chatsync(dir.path(), &["sessions", "issue", "alice", "--device-id", "laptop"])).trim().to_owned();
    let unbound = ok(&chatsync(dir.path(), &["sessions", "issue", "alice"])).trim().to_owned();
    let (server, _lines, url) = serve(dir.path(), &["--max-connections-per-user", "1"], None);
    let (on_laptop, _) = Client::connect_authenticated(&url, &ConnectOptions::new(&laptop, "laptop")).await.unwrap();
    let mut refused = Client::connect(&url, &ConnectOptions::new(&unbound, "phone")).await.unwrap();
    assert_eq!(refused.recv_close().await.unwrap().0, 1013, "the cap refuses the phone after binding its session");
    assert!(!ok(&chatsync(dir.path(), &["devices", "list", "alice"])).contains("phone"));
    ok(&chatsync(dir.path(), &["devices", "revoke", "alice", "phone"]));
    fails(&chatsync(dir.path(), &["devices", "revoke", "alice", "phone"]), "no active session");
    fails(&chatsync(dir.path(), &["devices", "revoke", "alice", "tablet"]), "has no device \"tablet\"");
    drop(on_laptop);
    let mut again = Client::connect(&url, &ConnectOptions::new(&unbound, "phone")).await.unwrap();
    assert_eq!(again.recv_close().await.unwrap(), (1008, "Invalid session".into()));
    stop(server);
}

#[test]
fn commands_that_read_name_the_database_and_never_create_one() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    let commands = [
        &["users", "list"][..],
        &["devices", "list", "alice"],
        &["sessions", "issue", "alice"],
        &["api-keys", "create"],
        &["api-keys", "list"],
        &["keys", "rotate"],
    ];
    for args in commands {
        fails(&chatsync(&empty, args), &format!("no database at sqlite://{}", empty.join("chatsync.db").display()));
    }
    assert!(!empty.join("chatsync.db").exists() && !empty.join("master.key").exists());
    ok(&chatsync(dir.path(), &["users", "add", "bob"]));
    fails(
        &chatsync(dir.path(), &["sessions", "issue", "alice"]),
        &format!("unknown user alice in sqlite://{}", dir.path().join("chatsync.db").display()),
    );
}

#[test]
fn help_groups_options_and_shows_each_where_it_applies() {
    let help = |args: &[&str]| ok(&Command::new(env!("CARGO_BIN_EXE_chatsync")).args(args).output().unwrap());
    let serve = help(&["serve", "--help"]);
    let at = |h: &str| serve.find(h).unwrap_or_else(|| panic!("{h} missing: {serve}"));
    assert!(at("Storage:") < at("Cluster:") && at("Cluster:") < at("Limits:"), "{serve}");
    assert!(at("Limits:") < at("Network:") && at("Network:") < at("Logging:"), "{serve}");
    assert!(at("--log-level") > at("Logging:") && at("--max-frame-bytes") < at("Network:"), "{serve}");
    let connect = help(&["connect", "--help"]);
    for absent in ["--log-level", "--log-format", "--redis-url", "--durability", "--max-frame-bytes"] {
        assert!(!connect.contains(absent), "{absent} in {connect}");
    }
    assert!(connect.contains("CHATSYNC_TOKEN") && connect.contains("Device mismatch"), "{connect}");
    let users = help(&["users", "list", "--help"]);
    assert!(users.contains("--data-dir") && !users.contains("--log-level"), "{users}");
    // Every command that opens the store says it may be PostgreSQL.
    for args in [&["serve", "--help"][..], &["users", "list", "--help"], &["api-keys", "create", "--help"]] {
        let text = help(args);
        assert!(text.contains("postgres://"), "{args:?}: {text}");
    }
}

/// Issue 8: every command accepts the backend options of `serve` (`--database-url`, `--redis-url`,
/// `--redis-prefix`), so one set of options reaches the whole cluster.
#[test]
fn every_command_accepts_the_backend_options_of_serve() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/elsewhere.db", dir.path().display());
    let backend = ["--database-url", db.as_str(), "--redis-url", "redis://127.0.0.1:1", "--redis-prefix", "p:"];
    let with = |args: &[&str]| -> Vec<String> { args.iter().chain(&backend).map(|a| a.to_string()).collect() };
    let run = |args: &[&str]| {
        let args = with(args);
        chatsync(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    ok(&run(&["users", "add", "alice"]));
    assert!(dir.path().join("elsewhere.db").exists(), "--database-url was used");
    ok(&run(&["users", "list"]));
    let token = ok(&run(&["sessions", "issue", "alice", "--device-id", "d"]));
    ok(&run(&["sessions", "list", "alice"]));
    ok(&run(&["devices", "list", "alice"]));
    ok(&run(&["keys", "rotate"]));
    // Revocation succeeds in the store; the unreachable bus only costs a warning.
    let out = run(&["sessions", "revoke", token.trim()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"), "the bus failure is reported");
    let serve_help = ok(&chatsync(dir.path(), &["serve", "--help"]));
    for flag in ["--database-url", "--redis-url", "--redis-prefix", "--redis-sharded-pubsub"] {
        assert!(serve_help.contains(flag), "serve --help lists {flag}");
    }
}

#[tokio::test]
async fn api_keys_are_created_listed_and_revoked_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let key = ok(&chatsync(dir.path(), &["api-keys", "create", "--name", "bot"])).trim().to_owned();
    assert!(key.starts_with("ck_") && key.len() == 46, "{key}");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&chatsync(dir.path(), &["api-keys", "list", "--json"]))).unwrap();
    let entry = &listed[0];
    assert_eq!(entry["name"], "bot");
    assert!(entry["revoked_at"].is_null());
    assert!(!listed.to_string().contains(&key), "the key itself is never shown again");
    let key_id = entry["key_id"].as_str().unwrap().to_owned();
    let table = ok(&chatsync(dir.path(), &["api-keys", "list"]));
    assert!(table.contains(&key_id) && !table.contains(&key));

    let (mut child, _lines, url) = serve(dir.path(), &[], None);
    let api = url.replace("ws://", "http://").replace("/v1/ws", "/v1/api");
    let get = |key: String| {
        let api = api.clone();
        async move {
            reqwest::Client::new().get(format!("{api}/users/alice")).bearer_auth(key).send().await.unwrap().status()
        }
    };
    assert_eq!(get(key.clone()).await.as_u16(), 200);
    ok(&chatsync(dir.path(), &["api-keys", "revoke", &key_id]));
    assert_eq!(get(key.clone()).await.as_u16(), 401, "refused as soon as the command returned");
    // Again: succeeds (in a cluster it repairs a revocation whose epoch could not be written); an unknown
    // id fails.
    ok(&chatsync(dir.path(), &["api-keys", "revoke", &key_id]));
    fails(&chatsync(dir.path(), &["api-keys", "revoke", "ak_unknown"]), "no API key has the id");
    fails(&chatsync(dir.path(), &["api-keys", "create", "--name", ""]), "--name");
    // 1-200 characters, not bytes: 200 two-byte characters are a name, 201 are not.
    ok(&chatsync(dir.path(), &["api-keys", "create", "--name", &"é".repeat(200)]));
    fails(&chatsync(dir.path(), &["api-keys", "create", "--name", &"é".repeat(201)]), "--name");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn trace_logs_never_contain_api_keys_or_backend_message_bodies() {
    let dir = tempfile::tempdir().unwrap();
    ok(&chatsync(dir.path(), &["users", "add", "alice"]));
    let key = ok(&chatsync(dir.path(), &["api-keys", "create"])).trim().to_owned();
    let (mut child, lines, url) = serve(dir.path(), &["--log-format", "json", "--log-level", "trace"], None);
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<String>>());
    let api = url.replace("ws://", "http://").replace("/v1/ws", "/v1/api");
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        http.post(format!("{api}/users/alice/chats/c1/messages")).bearer_auth(&key).json(&body).send()
    };
    let sent =
        post(serde_json::json!({"message_id": "a1", "sender_name": "assistant", "content": "api-plaintext-5e1"}));
    assert_eq!(sent.await.unwrap().status().as_u16(), 201);
    let bad =
        post(serde_json::json!({"message_id": "a2", "sender_name": "assistant", "content": 1, "x": "api-bad-9a4"}));
    assert_eq!(bad.await.unwrap().status().as_u16(), 400);
    let wrong = http.get(format!("{api}/users/alice")).bearer_auth("ck_wrong-key-2b7").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    let logs = reader.join().unwrap().join("\n");
    assert!(logs.contains("API request refused"), "trace logging was on: {}", &logs[..logs.len().min(2000)]);
    for secret in [key.as_str(), "api-plaintext-5e1", "api-bad-9a4", "ck_wrong-key-2b7"] {
        assert!(!logs.contains(secret), "{secret:?} reached the log");
    }
}

/// `--database-url sqlite://` with an empty path or `:memory:` (or a `file:` URI) opens one private,
/// temporary database per connection: `users add` and `sessions issue-bulk` reported success (printing
/// tokens) into databases that vanished at exit. Every command refuses such a URL, naming it.
#[test]
fn a_store_url_of_a_temporary_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["sqlite://", "sqlite://:memory:", "sqlite://file::memory:"] {
        fails(&chatsync(dir.path(), &["--database-url", url, "users", "add", "alice"]), "database_url");
        let out = chatsync(dir.path(), &["--database-url", url, "sessions", "issue-bulk", "--users", "1"]);
        fails(&out, "database_url");
        assert!(out.stdout.is_empty(), "{url}: tokens printed");
    }
}

/// A log filter with a directive that does not parse (`--log-level nonsense=bogus=x`) was ignored with a
/// note, leaving a server that logged nothing, not even its listening address: `serve` refuses it.
#[test]
fn serve_refuses_a_log_filter_that_does_not_parse() {
    let dir = tempfile::tempdir().unwrap();
    for filter in ["nonsense=bogus=x", "info,["] {
        let stderr = refused_at_start(dir.path(), &["--log-level", filter]);
        assert!(stderr.contains("log_level"), "{filter}: {stderr}");
    }
}

/// Commands opening a new embedded database at once (a provisioning script adding users in parallel, a
/// command started beside `serve`) applied the same migration twice, SQLite giving sqlx's migrator no
/// lock: all but one failed (`table users already exists`, in every round of six on this machine). The
/// migrations are now serialized by a lock on the database's directory. (A race by nature: six processes
/// in three rounds, each of which failed without the lock.)
#[test]
fn commands_opening_a_new_database_at_once_all_succeed() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = (0..6).map(|i| format!("u{round}-{i}")).collect();
        let children: Vec<_> = users
            .iter()
            .map(|user| {
                Command::new(env!("CARGO_BIN_EXE_chatsync"))
                    .arg("--data-dir")
                    .arg(dir.path())
                    .args(["users", "add", user])
                    .env_remove("CHATSYNC_CONFIG")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            ok(&child.wait_with_output().unwrap());
        }
        let listed = chatsync(dir.path(), &["users", "list"]);
        ok(&listed);
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(users.iter().all(|u| listed.contains(u.as_str())), "{listed}");
    }
}

/// A data directory (or JWT key file) whose path is not UTF-8, as an option or in the environment, was
/// refused by the configuration's merge with an error naming the server's source files
/// (`config.rs:503:23 &chatsync::cli::StorageArgs`): it is a usage error (exit 2) in plain words.
#[test]
fn a_path_that_is_not_utf8_is_a_usage_error() {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join(std::ffi::OsStr::from_bytes(b"data\xff"));
    let runs = [
        Command::new(env!("CARGO_BIN_EXE_chatsync")).arg("--data-dir").arg(&bad).args(["users", "list"]).output(),
        Command::new(env!("CARGO_BIN_EXE_chatsync")).args(["users", "list"]).env("CHATSYNC_DATA_DIR", &bad).output(),
        Command::new(env!("CARGO_BIN_EXE_chatsync")).arg("serve").arg("--jwt-public-key-file").arg(&bad).output(),
    ];
    for out in runs {
        let out = out.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("invalid UTF-8") && !stderr.contains(".rs"), "{stderr}");
    }
    assert!(!bad.exists());
}

/// A bare word that is not a level (`warning`, as uvicorn spells it) parses as a target name with every
/// level on, so the server logged nothing at all: it is refused, naming the levels and the target form.
/// Levels, numbers and `TARGET=LEVEL` directives still start.
#[test]
fn serve_refuses_a_log_filter_word_that_is_not_a_level() {
    let dir = tempfile::tempdir().unwrap();
    for filter in ["warning", "info,warning", "chatsync=debug,verbose"] {
        let stderr = refused_at_start(dir.path(), &["--log-level", filter]);
        assert!(stderr.contains("neither a level") && stderr.contains("=trace"), "{filter}: {stderr}");
    }
    for filter in ["WARN", "off", "chatsync=debug,warn", "3"] {
        // RUST_LOG wins over the option (so that the address is logged); the option is checked still.
        let (mut child, _, _) = serve(dir.path(), &["--log-level", filter], Some("info"));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// tracing reads a directive with a space around it (`chatsync=debug, info`, `"warn "`) as a target name:
/// `info` became the target ` info`, so the server logged only chatsync's debug lines, and `"warn "` logged
/// nothing at all; the check of bare words trimmed them first and let them through. They are refused,
/// naming the directive (`RUST_LOG`, which is tracing's own, is left as tracing reads it).
#[test]
fn serve_refuses_a_log_filter_with_a_space_around_a_directive() {
    let dir = tempfile::tempdir().unwrap();
    for filter in ["chatsync=debug, info", "warn ", " info", "info ,chatsync=debug", "warn,\tchatsync=debug"] {
        let stderr = refused_at_start(dir.path(), &["--log-level", filter]);
        assert!(stderr.contains("space"), "{filter:?}: {stderr}");
    }
}

/// `--metrics-listen` on the port of `--listen` (the same address, or one of them on every interface)
/// failed at bind with `address in use`, after the store was opened: the configuration is refused.
#[test]
fn serve_refuses_a_metrics_address_on_the_listening_port() {
    let dir = tempfile::tempdir().unwrap();
    for (listen, metrics) in [("127.0.0.1:47811", "127.0.0.1:47811"), ("127.0.0.1:47812", "0.0.0.0:47812")] {
        let out = Command::new(env!("CARGO_BIN_EXE_chatsync"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["serve", "--listen", listen, "--metrics-listen", metrics])
            .env_remove("CHATSYNC_CONFIG")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("cannot share a port"), "{listen} {metrics}: {stderr}");
    }
}

/// `--metrics-listen` with port 0 (a free port, as `--listen` takes it): the log line names the port
/// bound, so that the operations endpoints can be found (it said `:0`).
#[tokio::test]
async fn serve_logs_the_port_its_operations_endpoints_are_bound_to() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines, _) =
        serve(dir.path(), &["--log-format", "text", "--metrics-listen", "127.0.0.1:0"], Some("info"));
    let line = loop {
        let line = lines.next().expect("server exited before its operations endpoints listened").unwrap();
        if line.contains("operations endpoints") {
            break line;
        }
    };
    let addr = line.split("addr=").nth(1).expect("the line names the address").split([' ', '"']).next().unwrap();
    assert!(!addr.ends_with(":0"), "{line}");
    let status = reqwest::get(format!("http://{addr}/healthz")).await.unwrap().status();
    assert_eq!(status.as_u16(), 200, "{line}");
    child.kill().unwrap();
    child.wait().unwrap();
}
