//! Encryption keys end to end: the master key file, refusing a wrong master key, and `keys rotate`
//! (with a key file and with `CHATSYNC_MASTER_KEY`), with the data readable afterwards, also when a
//! rotation is killed (SIGKILL) after any of its steps.

mod common;

use chatsync::keys::{self, RotationStep};
use chatsync::store::chats::{ChatLookup, ChatRecord, ChatStore, MessageRecord, WrappedKey, WriteOp, WriteResult};
use chatsync::store::StoreError;
use chatsync::Config;
use chatsync_protocol::*;
use common::TestServer;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn chatsync(data: &Path, args: &[&str], master_key: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatsync"));
    cmd.arg("--data-dir").arg(data).args(args).env_remove("CHATSYNC_DATA_DIR").env_remove("CHATSYNC_CONFIG");
    match master_key {
        Some(k) => cmd.env("CHATSYNC_MASTER_KEY", k),
        None => cmd.env_remove("CHATSYNC_MASTER_KEY"),
    };
    cmd.output().unwrap()
}

fn title(chat: &str, t: &str) -> ClientMessage {
    ClientMessage::UpdateTitle(UpdateTitle { chat_id: ChatId::new(chat).unwrap(), new_title: t.into() })
}

fn sync_all() -> ClientMessage {
    ClientMessage::InitialSyncRequest(InitialSyncRequest {
        chat_versions: Default::default(),
        immediate_view_chat_id: None,
    })
}

/// Starts a server on `data`, writes a title as alice (created on first use), stops it.
async fn write_title(data: tempfile::TempDir, text: &str) -> tempfile::TempDir {
    let config = Config { data_dir: data.path().to_owned(), ..Config::default() };
    let server = TestServer::start_in(data, config).await;
    if server.ctx.store.user("alice").await.unwrap().is_none() {
        server.user("alice", false).await;
    }
    let token = server.token("alice").await;
    let (mut c, _) = server.connect(&token, "d").await;
    let reply = c.request(&title("c1", text)).await.unwrap();
    assert!(matches!(reply.message, ServerMessage::ChatTitleUpdated(_)), "{reply:?}");
    server.stop_into_data().await
}

async fn read_title(data: tempfile::TempDir) -> (String, tempfile::TempDir) {
    let config = Config { data_dir: data.path().to_owned(), ..Config::default() };
    let server = TestServer::start_in(data, config).await;
    let token = server.token("alice").await;
    let (mut c, _) = server.connect(&token, "d").await;
    let reply = c.request(&sync_all()).await.unwrap();
    let ServerMessage::InitialSyncResponse(sync) = reply.message else { panic!("{reply:?}") };
    (sync.chats_to_add_or_update[0].title.clone().unwrap(), server.stop_into_data().await)
}

#[tokio::test]
async fn first_start_creates_a_private_master_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_title(dir, "hello").await;
    let meta = std::fs::metadata(data.path().join("master.key")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn a_lost_master_key_file_is_not_replaced_by_a_new_key_that_stays_behind() {
    let data = write_title(tempfile::tempdir().unwrap(), "secret plans").await;
    let key_file = data.path().join("master.key");
    let original = std::fs::read_to_string(&key_file).unwrap();
    std::fs::remove_file(&key_file).unwrap();
    let config = Config { data_dir: data.path().to_owned(), ..Config::default() };
    let err = format!("{:#}", chatsync::build(config).await.err().expect("no key opens the store: no start"));
    assert!(err.contains("did not exist") && err.contains("removed"), "{err}");
    assert!(!key_file.exists(), "the key made for the refused start is not left as if it were the data's");
    let stray: Vec<_> = std::fs::read_dir(data.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("master.key"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    std::fs::write(&key_file, original).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (t, _) = read_title(data).await;
    assert_eq!(t, "secret plans");
}

#[tokio::test]
async fn a_wrong_master_key_refuses_to_start_with_a_clear_message() {
    let data = write_title(tempfile::tempdir().unwrap(), "secret plans").await;
    let key_file = data.path().join("master.key");
    let original = std::fs::read_to_string(&key_file).unwrap();
    std::fs::remove_file(&key_file).unwrap();
    let other = chatsync::crypto::MasterKey::generate();
    std::fs::write(&key_file, other.to_base64().as_str()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let config = Config { data_dir: data.path().to_owned(), ..Config::default() };
    let err = chatsync::build(config).await.err().expect("a wrong master key must not start");
    assert!(format!("{err:#}").contains("cannot unwrap the stored data keys"), "{err:#}");

    let out = chatsync(data.path(), &["serve", "--listen", "127.0.0.1:0"], Some(other.to_base64().as_str()));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CHATSYNC_MASTER_KEY") && stderr.contains("cannot unwrap"), "{stderr}");
    assert!(!stderr.contains(other.to_base64().as_str()), "the key is never printed");

    std::fs::write(&key_file, original).unwrap();
    let (t, _) = read_title(data).await;
    assert_eq!(t, "secret plans");
}

#[tokio::test]
async fn rotate_with_a_key_file_rewraps_and_data_stays_readable() {
    let data = write_title(tempfile::tempdir().unwrap(), "before rotation").await;
    let key_file = data.path().join("master.key");
    let before = std::fs::read_to_string(&key_file).unwrap();
    let out = chatsync(data.path(), &["keys", "rotate"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "nothing secret on stdout with a key file");
    let after = std::fs::read_to_string(&key_file).unwrap();
    assert_ne!(before.trim(), after.trim());
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!data.path().join("master.key.next").exists());
    let (t, data) = read_title(data).await;
    assert_eq!(t, "before rotation");
    // Writes after the rotation work too, and the old key no longer opens the store.
    let data = write_title(data, "after rotation").await;
    std::fs::write(&key_file, before).unwrap();
    let config = Config { data_dir: data.path().to_owned(), ..Config::default() };
    assert!(chatsync::build(config).await.is_err());
}

#[tokio::test]
async fn rotate_refuses_a_master_key_symlink_and_changes_nothing() {
    let data = write_title(tempfile::tempdir().unwrap(), "linked").await;
    let secrets = tempfile::tempdir().unwrap();
    let target = secrets.path().join("chatsync.key");
    std::fs::rename(data.path().join("master.key"), &target).unwrap();
    std::os::unix::fs::symlink(&target, data.path().join("master.key")).unwrap();
    let before = std::fs::read_to_string(&target).unwrap();
    let out = chatsync(data.path(), &["keys", "rotate"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("symlink") && err.contains("CHATSYNC_MASTER_KEY"), "{err}");
    let link = std::fs::symlink_metadata(data.path().join("master.key")).unwrap();
    assert!(link.file_type().is_symlink(), "the link is left as it was");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), before, "the key is not replaced");
    assert!(!data.path().join("master.key.next").exists());
    let (t, _) = read_title(data).await;
    assert_eq!(t, "linked", "the store still opens under the linked key");
}

#[tokio::test]
async fn rotate_with_an_environment_key_prints_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let old = chatsync::crypto::MasterKey::generate();
    let old_b64 = old.to_base64().to_string();
    assert!(chatsync(dir.path(), &["users", "add", "alice"], None).status.success());
    // Create data under the environment key by running the server binary's store setup via rotate's
    // own check: rotate on an empty store records the key check value for the old key first.
    let out = chatsync(dir.path(), &["keys", "rotate"], Some(&old_b64));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new_b64 = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(chatsync::crypto::MasterKey::from_base64(&new_b64).is_ok(), "stdout is the new key");
    assert!(!dir.path().join("master.key").exists(), "no key file is written with an environment key");
    let refused = chatsync(dir.path(), &["keys", "rotate"], Some(&old_b64));
    assert!(!refused.status.success(), "the old key is refused after rotation");
    assert!(refused.stdout.is_empty(), "no key is printed when the rotation cannot start");
    let again = chatsync(dir.path(), &["keys", "rotate"], Some(&new_b64));
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
}

#[tokio::test]
async fn an_interrupted_rotation_is_completed_at_the_next_start() {
    let data = write_title(tempfile::tempdir().unwrap(), "mid rotation").await;
    let key_file = data.path().join("master.key");
    let old = std::fs::read_to_string(&key_file).unwrap();
    assert!(chatsync(data.path(), &["keys", "rotate"], None).status.success());
    // Simulate a crash after the store was re-wrapped but before the file was moved into place.
    let new = std::fs::read_to_string(&key_file).unwrap();
    std::fs::write(data.path().join("master.key.next"), &new).unwrap();
    std::fs::set_permissions(data.path().join("master.key.next"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&key_file, old).unwrap();
    let (t, data) = read_title(data).await;
    assert_eq!(t, "mid rotation");
    assert_eq!(std::fs::read_to_string(data.path().join("master.key")).unwrap(), new);
    assert!(!data.path().join("master.key.next").exists());
}

fn draft(chat: &str, text: &str) -> ClientMessage {
    let doc = serde_json::json!({"type": "doc", "content": [{"type": "text", "text": text}]});
    ClientMessage::UpdateDraft(UpdateDraft {
        chat_id: ChatId::new(chat).unwrap(),
        draft_json: doc.as_object().cloned(),
    })
}

/// Starts a server on `data` and returns the first chat's title and draft text (both decrypted: the
/// title under the chat's key, the draft under the user's key).
async fn read_title_and_draft(data: tempfile::TempDir) -> (String, String, tempfile::TempDir) {
    let config = Config { data_dir: data.path().to_owned(), ..Config::default() };
    let server = TestServer::start_in(data, config).await;
    let token = server.token("alice").await;
    let (mut c, _) = server.connect(&token, "d").await;
    let reply = c.request(&sync_all()).await.unwrap();
    let ServerMessage::InitialSyncResponse(sync) = reply.message else { panic!("{reply:?}") };
    let chat = &sync.chats_to_add_or_update[0];
    let text = chat.draft_json.clone().flatten().unwrap()["content"][0]["text"].as_str().unwrap().to_owned();
    (chat.title.clone().unwrap(), text, server.stop_into_data().await)
}

/// Set in the child process that [`rotation_killed_after`] starts: the data directory, and the step after
/// which the child kills itself.
const KILL_DIR: &str = "CHATSYNC_TEST_ROTATION_DIR";
const KILL_STEP: &str = "CHATSYNC_TEST_ROTATION_KILL_AFTER";

/// The child half of [`rotation_killed_after`]: started by it (this test binary, this test only, with
/// [`KILL_DIR`] and [`KILL_STEP`] set), rotates the master key and SIGKILLs itself right after the step.
/// Run normally, it does nothing.
#[tokio::test]
async fn rotation_child_that_kills_itself_after_a_step() {
    let (Some(dir), Some(step)) = (std::env::var_os(KILL_DIR), std::env::var(KILL_STEP).ok()) else { return };
    let step = RotationStep::ALL.into_iter().find(|s| format!("{s:?}") == step).expect("a rotation step");
    let url = format!("sqlite://{}", Path::new(&dir).join("chatsync.db").display());
    let backend = chatsync::store::open_backend(&url, chatsync::store::Durability::Full).await.unwrap();
    let kill = |s: RotationStep, _: &chatsync::crypto::MasterKey| {
        if s == step {
            // SAFETY: sends a signal to this process; no memory is involved.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        Ok(())
    };
    keys::rotate_with(Path::new(&dir), None, backend.chats.as_ref(), kill).await.unwrap();
    unreachable!("killed after {step:?}");
}

/// Runs `keys rotate` on a data directory with a title and a draft in a child process that is killed
/// (SIGKILL: no destructor, no store close, the lock released by the kernel) right after `step`; then
/// restarts the server on the data and checks that the title and the draft still decrypt, that nothing
/// of the rotation is left over, and that a new rotation works.
async fn rotation_killed_after(step: RotationStep) {
    use std::os::unix::process::ExitStatusExt as _;
    let data = write_title(tempfile::tempdir().unwrap(), "kept title").await;
    let config = Config { data_dir: data.path().to_owned(), ..Config::default() };
    let server = TestServer::start_in(data, config).await;
    let token = server.token("alice").await;
    let (mut c, _) = server.connect(&token, "d").await;
    assert!(matches!(
        c.request(&draft("c1", "kept draft")).await.unwrap().message,
        ServerMessage::DraftUpdateConfirmed(_)
    ));
    drop(c);
    let data = server.stop_into_data().await;
    let key_file = data.path().join("master.key");
    let old_key = std::fs::read_to_string(&key_file).unwrap();

    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rotation_child_that_kills_itself_after_a_step", "--nocapture"])
        .env(KILL_DIR, data.path())
        .env(KILL_STEP, format!("{step:?}"))
        .env_remove("CHATSYNC_MASTER_KEY")
        .output()
        .unwrap();
    assert_eq!(child.status.signal(), Some(libc::SIGKILL), "{}", String::from_utf8_lossy(&child.stdout));
    let replaced = match step {
        RotationStep::Prepared
        | RotationStep::NextCreated
        | RotationStep::NextWritten
        | RotationStep::NextDurable
        | RotationStep::StoreRewrapped => false,
        RotationStep::Renamed | RotationStep::RenameDurable => true,
    };
    let now = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(now != old_key, replaced, "master.key is replaced by the rename only ({step:?})");

    let (title, text, data) = read_title_and_draft(data).await;
    assert_eq!((title.as_str(), text.as_str()), ("kept title", "kept draft"), "after {step:?}");
    assert!(!data.path().join("master.key.next").exists(), "master.key.next is resolved at start ({step:?})");
    let out = chatsync(data.path(), &["keys", "rotate"], None);
    assert!(out.status.success(), "rotating again after {step:?}: {}", String::from_utf8_lossy(&out.stderr));
    let (title, text, _) = read_title_and_draft(data).await;
    assert_eq!((title.as_str(), text.as_str()), ("kept title", "kept draft"), "after {step:?} and a new rotation");
}

#[tokio::test]
async fn rotation_killed_before_writing_anything_changes_nothing() {
    rotation_killed_after(RotationStep::Prepared).await;
}

#[tokio::test]
async fn rotation_killed_after_creating_master_key_next_is_undone() {
    rotation_killed_after(RotationStep::NextCreated).await;
}

#[tokio::test]
async fn rotation_killed_after_writing_master_key_next_is_undone() {
    rotation_killed_after(RotationStep::NextWritten).await;
}

#[tokio::test]
async fn rotation_killed_after_flushing_master_key_next_is_undone() {
    rotation_killed_after(RotationStep::NextDurable).await;
}

#[tokio::test]
async fn rotation_killed_after_rewrapping_the_store_is_completed() {
    rotation_killed_after(RotationStep::StoreRewrapped).await;
}

#[tokio::test]
async fn rotation_killed_after_the_rename_is_complete() {
    rotation_killed_after(RotationStep::Renamed).await;
}

#[tokio::test]
async fn rotation_killed_after_flushing_the_rename_is_complete() {
    rotation_killed_after(RotationStep::RenameDurable).await;
}

/// A chat whose deletion failed with its outcome unknown is kept out of the keyring's memo, so that no
/// request resolving its key before can keep it in memory if the deletion committed; once a store lookup
/// that began when the outcome has surely settled (the store's timeout and a margin after the failure)
/// finds the chat (the deletion did not commit: a deadlock rolled it back), its key is memoized again
/// instead of being looked up on every use for the life of the process. A lookup before that does not:
/// the deletion could still commit (a commit that lands after the writer gave up on it).
#[tokio::test]
async fn a_chat_whose_deletion_did_not_commit_is_memoized_again_once_the_store_finds_it() {
    let server = TestServer::start_with(|c| c.store_timeout_secs = 1).await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "d").await;
    let reply = c.request(&title("c1", "kept")).await.unwrap();
    assert!(matches!(reply.message, ServerMessage::ChatTitleUpdated(_)), "{reply:?}");
    assert!(server.ctx.keys.holds_key("c1"));
    server.ctx.keys.deletion_unknown("c1");
    assert!(!server.ctx.keys.holds_key("c1"));
    let lookup = || server.ctx.keys.chat(server.ctx.chats.as_ref(), "alice", "c1");
    assert!(matches!(lookup().await.unwrap(), keys::ChatAccess::Owned(_)));
    assert!(!server.ctx.keys.holds_key("c1"), "not yet: the deletion could still land");
    // The store's timeout (1 s) and the margin (10 s) later.
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    assert!(matches!(lookup().await.unwrap(), keys::ChatAccess::Owned(_)));
    assert!(server.ctx.keys.holds_key("c1"), "memoized again");
}

/// A chat store that hands every call to `inner`, with two hooks that put another party's move at the
/// worst point of a call: `check_first` (another node's master key check value, stored in `inner` just
/// after this call read that there was none), and `after_read` (run once a chat lookup or a read of
/// messages has read the store, before the caller goes on).
struct Hooked {
    inner: std::sync::Arc<dyn ChatStore>,
    check_first: std::sync::Mutex<Option<Vec<u8>>>,
    after_read: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Hooked {
    fn new(inner: std::sync::Arc<dyn ChatStore>) -> Hooked {
        Hooked { inner, check_first: Default::default(), after_read: Default::default() }
    }

    fn read(&self) {
        if let Some(hook) = self.after_read.lock().unwrap().take() {
            hook();
        }
    }
}

#[async_trait::async_trait]
impl ChatStore for Hooked {
    async fn write(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        self.inner.write(op).await
    }
    async fn chat_lookup(&self, chat_id: &str) -> Result<ChatLookup, StoreError> {
        let found = self.inner.chat_lookup(chat_id).await;
        self.read();
        found
    }
    async fn user_key(&self, user_id: &str) -> Result<Option<WrappedKey>, StoreError> {
        self.inner.user_key(user_id).await
    }
    async fn chats(&self, owner: &str) -> Result<Vec<ChatRecord>, StoreError> {
        self.inner.chats(owner).await
    }
    async fn chat(&self, owner: &str, chat_id: &str) -> Result<Option<ChatRecord>, StoreError> {
        self.inner.chat(owner, chat_id).await
    }
    async fn messages_after(
        &self,
        owner: &str,
        chat_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>, bool)>, StoreError> {
        let found = self.inner.messages_after(owner, chat_id, after_seq, limit).await;
        self.read();
        found
    }
    async fn latest_messages(
        &self,
        owner: &str,
        chat_id: &str,
        limit: u32,
    ) -> Result<Option<(ChatRecord, Vec<MessageRecord>)>, StoreError> {
        self.inner.latest_messages(owner, chat_id, limit).await
    }
    async fn wrapped_keys(&self) -> Result<Vec<(String, WrappedKey)>, StoreError> {
        self.inner.wrapped_keys().await
    }
    async fn rewrap_keys(
        &self,
        keys: &[(String, WrappedKey)],
        from_check: &[u8],
        kek_id: &str,
        check: &[u8],
    ) -> Result<(), StoreError> {
        self.inner.rewrap_keys(keys, from_check, kek_id, check).await
    }
    async fn create_user_keys(&self, keys: &[(String, WrappedKey)], check: &[u8]) -> Result<bool, StoreError> {
        self.inner.create_user_keys(keys, check).await
    }
    async fn key_check(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let first = self.check_first.lock().unwrap().take();
        match first {
            Some(other) => {
                assert_eq!(self.inner.key_check().await?, None, "a fresh store");
                self.inner.init_key_check(&other).await?;
                Ok(None)
            }
            None => self.inner.key_check().await,
        }
    }
    async fn init_key_check(&self, check: &[u8]) -> Result<(), StoreError> {
        self.inner.init_key_check(check).await
    }
}

/// A fresh store's data directory and its store, wrapped in [`Hooked`].
async fn hooked_store() -> (tempfile::TempDir, Config, chatsync::store::Backend, std::sync::Arc<Hooked>) {
    let data = tempfile::tempdir().unwrap();
    let config = Config { data_dir: data.path().to_owned(), ..Config::default() };
    let backend = chatsync::store::open_backend(&config.store_url(), config.durability).await.unwrap();
    let hooked = std::sync::Arc::new(Hooked::new(backend.chats.clone()));
    let backend = chatsync::store::Backend { chats: hooked.clone(), ..backend };
    (data, config, backend, hooked)
}

/// Two servers starting at the same moment on a fresh shared store (a cluster's nodes, each with a
/// master key of its own: `CHATSYNC_MASTER_KEY` not set, a data directory per node) both read that no
/// check value is stored yet, and both store theirs if none is: only the first one lands. The other
/// server must not go on with its key, which no other node can open (the keys it wraps would lock their
/// users out): it refuses to start, as it would have a moment later.
#[tokio::test]
async fn a_server_that_loses_the_race_to_store_the_first_check_value_refuses_its_master_key() {
    let (data, _config, backend, hooked) = hooked_store().await;
    let other = chatsync::crypto::MasterKey::generate();
    *hooked.check_first.lock().unwrap() = Some(other.check_value());
    let mine = chatsync::crypto::MasterKey::generate();
    let err = keys::load_master_key(data.path(), Some(mine.to_base64().as_str()), backend.chats.as_ref())
        .await
        .expect_err("a master key that is not the store's must not be used");
    assert!(format!("{err:#}").contains("cannot unwrap the stored data keys"), "{err:#}");
    // The node that stored its value first starts.
    keys::load_master_key(data.path(), Some(other.to_base64().as_str()), backend.chats.as_ref()).await.unwrap();
}

/// A `master.key.next` left by a rotation of another store, interrupted after that store was re-wrapped
/// (its only copy of the new key), then the data directory pointed at a new, empty store: starting there
/// must not remove the file (a fresh store cannot tell whether it is stale).
#[tokio::test]
async fn a_first_start_on_a_fresh_store_leaves_a_master_key_next_alone() {
    let (data, _config, backend, _hooked) = hooked_store().await;
    chatsync::crypto::MasterKey::load_or_create(data.path(), None).unwrap();
    let next = data.path().join("master.key.next");
    let other_store_key = chatsync::crypto::MasterKey::generate().to_base64().to_string();
    std::fs::write(&next, &other_store_key).unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600)).unwrap();
    keys::load_master_key(data.path(), None, backend.chats.as_ref()).await.unwrap();
    assert_eq!(std::fs::read_to_string(&next).unwrap(), other_store_key, "the other store's key is kept");
}

/// In a cluster, a gap in the bus may hide a chat's deletion on another node: the keyring forgets every
/// key, and a key resolved from what was read before the gap must not be memoized after it (the chat
/// may be gone, and its key would stay in memory for the life of the process). Here the gap comes right
/// after the store was read: by a chat lookup (a write or a stream resolving the chat), and by a page of
/// messages (`get_chat_messages`). The key serves the request, and is not kept.
#[tokio::test]
async fn a_key_read_from_the_store_before_a_gap_is_not_memoized_after_it() {
    let (data, config, backend, hooked) = hooked_store().await;
    let master = keys::load_master_key(data.path(), None, backend.chats.as_ref()).await.unwrap();
    let server = TestServer::serve(chatsync::assemble(config, backend, master, None).unwrap(), data).await;
    let token = server.user_token("alice").await;
    let (mut c, _) = server.connect(&token, "d").await;
    let reply = c.request(&title("c1", "doomed")).await.unwrap();
    assert!(matches!(reply.message, ServerMessage::ChatTitleUpdated(_)), "{reply:?}");
    assert!(server.ctx.keys.holds_key("c1"));
    server.ctx.keys.forget_all(); // an earlier gap: the key is not in memory
    let gap_after_the_read = || {
        let keys = server.ctx.keys.clone();
        *hooked.after_read.lock().unwrap() = Some(Box::new(move || keys.forget_all()));
    };

    gap_after_the_read();
    let access = server.ctx.keys.chat(server.ctx.chats.as_ref(), "alice", "c1").await.unwrap();
    assert!(matches!(access, keys::ChatAccess::Owned(_)));
    assert!(!server.ctx.keys.holds_key("c1"), "a chat lookup from before the gap is not memoized");

    let page = ClientMessage::GetChatMessages(GetChatMessages {
        chat_id: ChatId::new("c1").unwrap(),
        after_seq: 0,
        limit: None,
    });
    gap_after_the_read();
    let reply = c.request(&page).await.unwrap();
    assert!(matches!(reply.message, ServerMessage::ChatMessagesResponse(_)), "{reply:?}");
    assert!(!server.ctx.keys.holds_key("c1"), "a page of messages read before the gap memoizes no key");

    let reply = c.request(&page).await.unwrap();
    assert!(matches!(reply.message, ServerMessage::ChatMessagesResponse(_)), "{reply:?}");
    assert!(server.ctx.keys.holds_key("c1"), "a page read after the gap does");
}
