//! Crash durability: the real `chatsync serve` binary under pipelined write load on several
//! connections (messages, drafts, titles) is killed with SIGKILL, then restarted on the same data
//! directory. Every write confirmed before the kill must be there exactly once, with its version; in
//! both `--durability` modes. (A graceful stop could not catch a write confirmed before its commit.)
//!
//! What may be checked, precisely: each user writes only its own chats, on one connection, and the
//! server handles a connection's requests in order, so the n-th write of a kind to a chat gets version n.
//! Writes sent but unconfirmed at the kill may or may not have committed. So, per chat: the stored
//! messages are exactly the first `messages_v` messages sent to it, in order, with `seq` 1..; every
//! confirmed message is among them with its confirmed `seq`; the stored `title_v` / `draft_v` is at
//! least the highest confirmed one, and the stored title / draft is the one sent as that version.

mod common;

use chatsync_client::{Client, ClientError, ConnectOptions};
use chatsync_protocol::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections (one user each, so no broadcasts), requests in flight on each, chats per user.
const CONNECTIONS: usize = 8;
const WINDOW: usize = 16;
const CHATS: usize = 2;
/// Confirmed writes before the kill.
const TARGET: usize = 5000;

/// A server child process, killed with SIGKILL when dropped (also when a test fails).
struct Server(Child);

impl Server {
    /// SIGKILL (what `Child::kill` sends on Unix), and waits for the exit.
    fn kill(&mut self) -> std::process::ExitStatus {
        self.0.kill().unwrap();
        self.0.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `chatsync serve` on port 0 and returns the child and its WebSocket URL; stderr is drained
/// on a thread so that the child never blocks on its logs.
fn serve(dir: &Path, durability: &str) -> (Server, String) {
    let (child, url, lines) = common::process::spawn_serve(
        common::process::chatsync()
            .arg("--data-dir")
            .arg(dir)
            .args(["serve", "--listen", "127.0.0.1:0", "--durability", durability])
            .args(["--rate-per-sec", "1000000", "--rate-burst", "1000000", "--log-level", "info"])
            .env_remove("CHATSYNC_MASTER_KEY"),
    );
    common::process::drain(lines);
    (Server(child), url)
}

/// Provisions `CONNECTIONS` users with one device-bound session each: (user, device, token).
fn sessions(dir: &Path) -> Vec<(String, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_chatsync"))
        .arg("--data-dir")
        .arg(dir)
        .args(["sessions", "issue-bulk", "--users", &CONNECTIONS.to_string(), "--prefix", "crash"])
        .env_remove("CHATSYNC_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let field = |k: &str| v[k].as_str().unwrap().to_owned();
            (field("user_id"), field("device_id"), field("token"))
        })
        .collect()
}

async fn connect(url: &str, device: &str, token: &str) -> Client {
    let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(token, device) };
    Client::connect_authenticated(url, &opts).await.unwrap().0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Message,
    Title,
    Draft,
}

fn draft_doc(k: usize) -> Value {
    json!({ "type": "doc", "content": [{ "type": "paragraph", "content": [{ "type": "text", "text": format!("d{k}") }] }] })
}

/// What one connection sent (in order, per chat and kind) and what was confirmed.
#[derive(Default, Debug)]
struct Log {
    /// chat → kind → the write numbers `k` sent, in order (the n-th got version n if it committed).
    sent: HashMap<String, HashMap<&'static str, Vec<usize>>>,
    /// (chat, kind, k, version) of every confirmed write.
    confirmed: Vec<(String, Kind, usize, u64)>,
    /// Error replies (there must be none).
    errors: Vec<ErrorPayload>,
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Message => "message",
        Kind::Title => "title",
        Kind::Draft => "draft",
    }
}

/// Pipelines writes (at most `WINDOW` in flight) until the connection dies; every confirmation
/// bumps `total`.
async fn load(mut c: Client, user: String, total: Arc<AtomicUsize>) -> Log {
    let mut log = Log::default();
    let mut in_flight: HashMap<String, (String, Kind, usize)> = HashMap::new();
    let mut k = 0usize;
    loop {
        while in_flight.len() < WINDOW {
            let chat = format!("{user}-c{}", k % CHATS);
            let chat_id = ChatId::new(&chat).unwrap();
            let kind = match (k / CHATS) % 4 {
                0 | 1 => Kind::Message,
                2 => Kind::Title,
                _ => Kind::Draft,
            };
            let message = match kind {
                Kind::Message => ClientMessage::ChatMessageAdded(ChatMessageAdded {
                    chat_id,
                    message: NewMessage {
                        message_id: MessageId::new(format!("m{k}")).unwrap(),
                        content: MessageContent::Text(format!("x{k}")),
                        timestamp: None,
                        temp_id: None,
                    },
                }),
                Kind::Title => ClientMessage::UpdateTitle(UpdateTitle { chat_id, new_title: format!("t{k}") }),
                Kind::Draft => {
                    ClientMessage::UpdateDraft(UpdateDraft { chat_id, draft_json: draft_doc(k).as_object().cloned() })
                }
            };
            let request_id = format!("w{k}");
            if c.send(&message, Some(&request_id)).await.is_err() {
                return log;
            }
            log.sent.entry(chat.clone()).or_default().entry(kind_name(kind)).or_default().push(k);
            in_flight.insert(request_id, (chat, kind, k));
            k += 1;
        }
        let reply = match c.recv().await {
            Ok(reply) => reply,
            Err(ClientError::Closed(_) | ClientError::Ws(_)) => return log,
            Err(e) => panic!("{e}"),
        };
        let Some((chat, kind, k)) = reply.request_id.as_ref().and_then(|id| in_flight.get(id)).cloned() else {
            continue;
        };
        let version = match (&reply.message, kind) {
            (ServerMessage::ChatMessageConfirmed(m), Kind::Message) => {
                assert!(!m.duplicate, "{m:?}");
                m.new_messages_v
            }
            (ServerMessage::ChatTitleUpdated(t), Kind::Title) => t.versions.title_v,
            (ServerMessage::DraftUpdateConfirmed(d), Kind::Draft) => d.draft_v,
            (ServerMessage::Error(e), _) => {
                log.errors.push(e.clone());
                in_flight.remove(reply.request_id.as_deref().unwrap());
                continue;
            }
            _ => continue,
        };
        in_flight.remove(reply.request_id.as_deref().unwrap());
        log.confirmed.push((chat, kind, k, version));
        total.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every message of a chat, paging through `get_chat_messages`.
async fn messages(c: &mut Client, chat: &str) -> (u64, Vec<MessageOut>) {
    let mut out: Vec<MessageOut> = Vec::new();
    loop {
        let after_seq = out.last().map_or(0, |m| m.seq);
        let req = ClientMessage::GetChatMessages(
            serde_json::from_value(json!({
                "chat_id": chat, "after_seq": after_seq, "limit": 500
            }))
            .unwrap(),
        );
        let ServerMessage::ChatMessagesResponse(page) = c.request(&req).await.unwrap().message else {
            panic!("no messages for {chat}")
        };
        out.extend(page.messages);
        if !page.has_more {
            return (page.messages_v, out);
        }
    }
}

/// Checks one user's stored state against its log; returns the number of confirmed writes checked.
async fn verify(c: &mut Client, log: &Log) -> usize {
    let sync = ClientMessage::InitialSyncRequest(InitialSyncRequest {
        chat_versions: Default::default(),
        immediate_view_chat_id: None,
    });
    let ServerMessage::InitialSyncResponse(state) = c.request(&sync).await.unwrap().message else {
        panic!("no initial sync")
    };
    let mut highest: HashMap<(&str, Kind), u64> = HashMap::new();
    for (chat, kind, k, version) in &log.confirmed {
        // The n-th write of a kind to a chat was confirmed as version n.
        let sent = &log.sent[chat][kind_name(*kind)];
        assert_eq!(sent.get(*version as usize - 1), Some(k), "{chat} {kind:?} w{k} confirmed as version {version}");
        let h = highest.entry((chat.as_str(), *kind)).or_default();
        *h = (*h).max(*version);
    }
    for (chat, kinds) in &log.sent {
        let entry = state.chats_to_add_or_update.iter().find(|e| e.chat_id.as_str() == chat);
        let at_least = |kind| highest.get(&(chat.as_str(), kind)).copied().unwrap_or(0);
        let Some(entry) = entry else {
            assert_eq!(at_least(Kind::Message) + at_least(Kind::Title) + at_least(Kind::Draft), 0, "{chat} lost");
            continue;
        };
        let v = entry.versions;
        assert!(
            v.title_v >= at_least(Kind::Title),
            "{chat}: title_v {} < confirmed {}",
            v.title_v,
            at_least(Kind::Title)
        );
        assert!(
            v.draft_v >= at_least(Kind::Draft),
            "{chat}: draft_v {} < confirmed {}",
            v.draft_v,
            at_least(Kind::Draft)
        );
        if v.title_v > 0 {
            let k = kinds["title"][v.title_v as usize - 1];
            assert_eq!(entry.title.as_deref(), Some(format!("t{k}").as_str()), "{chat} title at version {}", v.title_v);
        }
        if v.draft_v > 0 {
            let k = kinds["draft"][v.draft_v as usize - 1];
            assert_eq!(
                entry.draft_json,
                Some(draft_doc(k).as_object().cloned()),
                "{chat} draft at version {}",
                v.draft_v
            );
        }
        let (messages_v, stored) = messages(c, chat).await;
        assert_eq!(messages_v, v.messages_v);
        assert!(messages_v >= at_least(Kind::Message), "{chat}: messages_v {messages_v} < confirmed");
        let sent = kinds.get("message").map_or(&[][..], Vec::as_slice);
        assert_eq!(stored.len() as u64, messages_v, "{chat}: one stored message per seq");
        for (i, m) in stored.iter().enumerate() {
            let k = sent[i];
            assert_eq!((m.seq, m.message_id.as_str()), (i as u64 + 1, format!("m{k}").as_str()), "{chat}");
            assert_eq!(m.content, MessageContent::Text(format!("x{k}")), "{chat} m{k}");
        }
    }
    // Confirmed messages: each among the stored ones with its seq (shown above: seq n holds the n-th
    // sent, and the confirmed version n is the n-th sent, and n <= messages_v).
    log.confirmed.len()
}

async fn crash_and_restart(durability: &str) {
    let dir = tempfile::tempdir().unwrap();
    let users = sessions(dir.path());
    let (mut server, url) = serve(dir.path(), durability);
    let total = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (user, device, token) in &users {
        let c = connect(&url, device, token).await;
        tasks.push(tokio::spawn(load(c, user.clone(), total.clone())));
    }
    while total.load(Ordering::Relaxed) < TARGET {
        assert!(tasks.iter().all(|t| !t.is_finished()), "a connection ended before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SIGKILL, mid-stream: every connection still has writes in flight.
    let status = server.kill();
    assert!(!status.success(), "killed: {status}");
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.unwrap());
    }
    let confirmed: usize = logs.iter().map(|l| l.confirmed.len()).sum();
    let errors: Vec<_> = logs.iter().flat_map(|l| &l.errors).collect();
    assert!(errors.is_empty(), "no write failed: {errors:?}");
    assert!(confirmed >= TARGET, "{confirmed}");

    let (mut server, url) = serve(dir.path(), durability);
    let mut checked = 0;
    for ((_, device, token), log) in users.iter().zip(&logs) {
        let mut c = connect(&url, device, token).await;
        checked += verify(&mut c, log).await;
    }
    server.kill();
    let kinds = |kind| logs.iter().flat_map(|l| &l.confirmed).filter(|w| w.1 == kind).count();
    eprintln!(
        "durability {durability}: {checked} confirmed writes ({} messages, {} titles, {} drafts) all found after SIGKILL",
        kinds(Kind::Message),
        kinds(Kind::Title),
        kinds(Kind::Draft)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_writes_survive_sigkill_with_full_durability() {
    crash_and_restart("full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_writes_survive_sigkill_with_normal_durability() {
    crash_and_restart("normal").await;
}
