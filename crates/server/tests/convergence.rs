//! Randomized convergence (a model-free end-state check): several devices of one user throw a seeded mix of
//! writes at the server at once (new chats, titles, drafts, draft deletions, messages, chat deletions,
//! offline batches with the versions the device holds, delta initial syncs, and abrupt drops with a write
//! in flight, an offline spell and a reconnect), each keeping a *replica* built only from what the server
//! sends it (its syncs, its own replies, the other devices' broadcasts). At quiescence every replica must
//! equal the truth: a fresh device's full initial sync (and every message of every chat). Also: every
//! acknowledged message of a chat that still exists is in the truth; no broadcast reaches the connection
//! whose write caused it (values are tagged with their author); a second user's devices, writing at the
//! same time (sometimes to the first user's chat ids), never see anything of the first user's, nor the
//! first user's of theirs. Run on the embedded store (one node), on a three-node cluster on PostgreSQL
//! and Redis (devices spread over the nodes), and on that cluster with its Redis killed mid-run and
//! restarted (the guarantee there is convergence at the next sync: every device reconnects after Redis
//! is back).
//!
//! The seed is printed; `CHATSYNC_CONVERGE_SEED=<n>` replays a run's choices (the interleaving of the
//! devices is the scheduler's). A divergence prints the seed and a diff (device, chat, field, replica vs
//! truth).

#[macro_use]
mod sync_util;
mod backends;
mod common;

use chatsync_client::{Client, ConnectOptions};
use chatsync_protocol::*;
use common::cluster::{redis_url, OwnRedis, TestCluster};
use common::TestServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use sync_util::*;

/// The seed when `CHATSYNC_CONVERGE_SEED` is unset (CI makes the same choices every run).
const DEFAULT_SEED: u64 = 20_261_203;

/// How long one reply may take before the run is declared stuck.
const REPLY_BOUND: Duration = Duration::from_secs(20);

/// How long the replicas may take to converge once nothing is in flight.
const CONVERGE_BOUND: Duration = Duration::from_secs(30);

fn base_seed() -> u64 {
    let seed = match std::env::var("CHATSYNC_CONVERGE_SEED") {
        Ok(s) if !s.is_empty() => s.parse().expect("CHATSYNC_CONVERGE_SEED is an unsigned integer"),
        _ => DEFAULT_SEED,
    };
    eprintln!("convergence seed: {seed} (CHATSYNC_CONVERGE_SEED={seed} replays its choices)");
    seed
}

/// What a device believes about one chat.
#[derive(Debug, Clone, Default, PartialEq)]
struct ChatState {
    title: String,
    title_v: u64,
    draft: Option<Map<String, Value>>,
    draft_v: u64,
    /// seq → (message id, content).
    messages: BTreeMap<u64, (String, String)>,
}

impl ChatState {
    /// The messages held without a gap from seq 1: what the device tells the server it holds.
    fn messages_v(&self) -> u64 {
        let mut n = 0;
        while self.messages.contains_key(&(n + 1)) {
            n += 1;
        }
        n
    }
}

#[derive(Debug, Default)]
struct Replica {
    chats: BTreeMap<String, ChatState>,
    /// Chats the device saw deleted: events about them are ignored (ids are never reused).
    /// (With how the device learned it, for the diff.)
    deleted: BTreeMap<String, String>,
}

impl Replica {
    fn chat(&mut self, id: &str) -> Option<&mut ChatState> {
        if self.deleted.contains_key(id) {
            return None;
        }
        Some(self.chats.entry(id.to_owned()).or_default())
    }

    fn title(&mut self, id: &str, title: &str, v: u64) {
        if let Some(c) = self.chat(id) {
            if v > c.title_v {
                c.title = title.to_owned();
                c.title_v = v;
            }
        }
    }

    fn draft(&mut self, id: &str, draft: Option<Map<String, Value>>, v: u64) {
        if let Some(c) = self.chat(id) {
            if v > c.draft_v {
                c.draft = draft;
                c.draft_v = v;
            }
        }
    }

    /// Adds a message; a different message already held at that seq is an anomaly (returned).
    fn message(&mut self, id: &str, seq: u64, message_id: &str, content: &str) -> Option<String> {
        let c = self.chat(id)?;
        match c.messages.get(&seq) {
            Some((held, _)) if held != message_id => {
                Some(format!("chat {id}: seq {seq} is {message_id}, but {held} was held at that seq"))
            }
            _ => {
                c.messages.insert(seq, (message_id.to_owned(), content.to_owned()));
                None
            }
        }
    }

    fn delete(&mut self, id: &str, how: String) {
        self.chats.remove(id);
        self.deleted.entry(id.to_owned()).or_insert(how);
    }
}

fn content_text(c: &MessageContent) -> String {
    match c {
        MessageContent::Text(s) => s.clone(),
        MessageContent::Json(m) => Value::Object(m.clone()).to_string(),
    }
}

/// The kind of one offline change.
#[derive(Debug, Clone, Copy)]
enum OffKind {
    Title,
    Draft,
    DeleteDraft,
}

#[derive(Debug, Clone)]
enum Op {
    Title(String),
    Draft(String),
    ClearDraft(String),
    DeleteDraft(String),
    Message(String),
    DeleteChat(String),
    /// A `sync_offline_changes` batch sent while connected (some versions deliberately stale).
    Offline(Vec<(String, OffKind)>),
    /// A delta initial sync while connected.
    Sync,
    /// Drops the socket abruptly (optionally right after sending a write), stays away, edits offline, and
    /// reconnects with a delta sync, then sends the offline edits and resends an unconfirmed message.
    Drop {
        in_flight: Option<Box<Op>>,
        offline: Vec<(String, OffKind)>,
        away_ms: u64,
    },
}

/// What one user's devices share: who they are and what the server acknowledged.
struct User {
    /// `A` or `B`: the first letter of every value a device of the user writes.
    tag: &'static str,
    /// The chat id prefix the user mostly writes to.
    prefix: &'static str,
    /// The other user's chat id prefix (sometimes written to: those ids may be taken).
    other_prefix: &'static str,
    /// The other user's value tag: never seen by this user's devices.
    other_tag: &'static str,
    /// Messages confirmed by the server: (chat, message id).
    confirmed: Mutex<Vec<(String, String)>>,
    /// Chats some device of the user tried to delete.
    delete_attempted: Mutex<BTreeSet<String>>,
}

/// What the current request expects (to apply its own replies).
#[derive(Debug, Clone)]
enum Ctx {
    Plain,
    Draft(String, Option<Map<String, Value>>),
    Message(String, String, String),
    Offline,
    Sync,
}

struct Device {
    name: String,
    url: String,
    token: String,
    user: Arc<User>,
    seed: u64,
    client: Option<Client>,
    /// Connection generation: part of every value tag, so an echo to the writing connection is told from
    /// a late broadcast of the device's previous connection.
    gen: u32,
    counter: u64,
    rng: StdRng,
    replica: Replica,
    /// Draft deletions and chat deletions this connection was told it made (for the echo check).
    own_draft_deletes: BTreeSet<(String, u64)>,
    own_chat_deletes: BTreeSet<String>,
    /// Every chat id any message to this device named.
    seen_chats: BTreeSet<String>,
    /// Message sent when the socket dropped: resent after the reconnect (chat, id, content).
    unconfirmed: Option<(String, String, String)>,
    /// Messages the last sync said a chat has (fetched after it).
    to_fetch: BTreeMap<String, u64>,
    /// Versions sent in the current initial sync.
    sent_versions: BTreeMap<String, (u64, u64, u64)>,
    anomalies: Vec<String>,
    requests: u64,
    /// What happened, by kind (printed, to see that a run exercised the paths).
    stats: BTreeMap<&'static str, u64>,
    /// Operations done by all devices of the run.
    progress: Arc<AtomicUsize>,
}

impl Device {
    fn new(name: &str, url: &str, token: String, user: Arc<User>, seed: u64) -> Device {
        Device {
            name: name.to_owned(),
            url: url.to_owned(),
            token,
            user,
            seed,
            client: None,
            gen: 0,
            counter: 0,
            rng: StdRng::seed_from_u64(seed ^ 0x9e37_79b9),
            replica: Replica::default(),
            own_draft_deletes: BTreeSet::new(),
            own_chat_deletes: BTreeSet::new(),
            seen_chats: BTreeSet::new(),
            unconfirmed: None,
            to_fetch: BTreeMap::new(),
            sent_versions: BTreeMap::new(),
            anomalies: Vec::new(),
            requests: 0,
            stats: BTreeMap::new(),
            progress: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A fresh value, tagged with user, device and connection: `A.phone.g2.17`.
    fn value(&mut self) -> String {
        self.counter += 1;
        format!("{}.{}.g{}.{}", self.user.tag, self.name, self.gen, self.counter)
    }

    fn own_prefix(&self) -> String {
        format!("{}.{}.g{}.", self.user.tag, self.name, self.gen)
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn anomaly(&mut self, what: String) {
        self.anomalies.push(format!("{}(g{}): {what}", self.name, self.gen));
    }

    async fn connect(&mut self) {
        self.gen += 1;
        self.own_draft_deletes.clear();
        self.own_chat_deletes.clear();
        let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(&self.token, &self.name) };
        let (client, _) = tokio::time::timeout(REPLY_BOUND, Client::connect_authenticated(&self.url, &opts))
            .await
            .unwrap_or_else(|_| panic!("seed {}: {} could not connect in time", self.seed, self.name))
            .unwrap_or_else(|e| panic!("seed {}: {} could not connect: {e}", self.seed, self.name));
        self.client = Some(client);
        self.sync().await;
    }

    /// A delta initial sync with the versions held, then the messages it says the device lacks.
    async fn sync(&mut self) {
        let mut versions = Map::new();
        self.sent_versions.clear();
        for (id, c) in &self.replica.chats {
            let v = (c.messages_v(), c.title_v, c.draft_v);
            self.sent_versions.insert(id.clone(), v);
            versions.insert(id.clone(), json!({ "messages_v": v.0, "title_v": v.1, "draft_v": v.2 }));
        }
        let immediate = if self.rng.gen_bool(0.5) && !self.replica.chats.is_empty() {
            let i = self.rng.gen_range(0..self.replica.chats.len());
            self.replica.chats.keys().nth(i).cloned()
        } else {
            None
        };
        self.to_fetch.clear();
        self.request(&sync_request(Value::Object(versions), immediate.as_deref()), Ctx::Sync).await;
        let targets = std::mem::take(&mut self.to_fetch);
        for (chat, target) in targets {
            while let Some(held) = self.replica.chats.get(&chat).map(ChatState::messages_v) {
                if held >= target {
                    break;
                }
                let reply = self.request(&get_messages(&chat, held, Some(500)), Ctx::Plain).await;
                match reply.message {
                    ServerMessage::ChatMessagesResponse(r) if r.messages.is_empty() => {
                        let got = self.replica.chats.get(&chat).map(ChatState::messages_v);
                        if got < Some(target) && !self.replica.deleted.contains_key(&chat) {
                            self.anomaly(format!(
                                "chat {chat}: the sync said messages_v {target}, but no message after {held} came"
                            ));
                        }
                        break;
                    }
                    ServerMessage::ChatMessagesResponse(_) => {}
                    _ => break, // not_found: deleted meanwhile (its chat_deleted is on its way)
                }
            }
        }
    }

    /// Sends `message` and reads until its final reply, applying everything that comes in arrival order.
    async fn request(&mut self, message: &ClientMessage, ctx: Ctx) -> Incoming {
        self.requests += 1;
        let id = format!("{}-{}", self.name, self.requests);
        self.client.as_mut().expect("connected").send(message, Some(&id)).await.unwrap();
        loop {
            let m = self.recv().await;
            if m.request_id.as_deref() == Some(id.as_str()) {
                self.apply_own(&m, &ctx, message);
                let more = match &m.message {
                    ServerMessage::InitialSyncResponse(r) => r.more,
                    ServerMessage::ChatTitleUpdated(_)
                    | ServerMessage::ChatDraftUpdated(_)
                    | ServerMessage::DraftDeleted(_) => matches!(ctx, Ctx::Offline),
                    _ => false,
                };
                if !more {
                    return m;
                }
            } else if m.request_id.is_some() {
                self.anomaly(format!("a reply to another request: {m:?}"));
            } else {
                self.apply_broadcast(m);
            }
        }
    }

    async fn recv(&mut self) -> Incoming {
        let (seed, name) = (self.seed, self.name.clone());
        let client = self.client.as_mut().expect("connected");
        tokio::time::timeout(REPLY_BOUND, client.recv())
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: {name} waited {REPLY_BOUND:?} for a reply"))
            .unwrap_or_else(|e| panic!("seed {seed}: {name}: {e}"))
    }

    /// Reads what is queued for the device (a ping round trip: everything queued before it comes first).
    async fn drain(&mut self) {
        self.request(&ping(), Ctx::Plain).await;
    }

    /// Checks a value for the other user's tag (never to be seen).
    fn check_value(&mut self, what: &str, value: &str) {
        if value.starts_with(self.user.other_tag) {
            self.anomaly(format!("the other user's {what} reached this device: {value}"));
        }
    }

    fn note_chat(&mut self, chat: &ChatId) {
        self.seen_chats.insert(chat.as_str().to_owned());
    }

    fn apply_own(&mut self, m: &Incoming, ctx: &Ctx, sent: &ClientMessage) {
        match &m.message {
            ServerMessage::ChatTitleUpdated(p) => {
                self.note_chat(&p.chat_id);
                self.replica.title(p.chat_id.as_str(), &p.data.title, p.versions.title_v);
            }
            ServerMessage::ChatDraftUpdated(p) => {
                self.note_chat(&p.chat_id);
                self.replica.draft(p.chat_id.as_str(), p.data.draft_json.clone(), p.versions.draft_v);
            }
            ServerMessage::DraftDeleted(p) => {
                self.note_chat(&p.chat_id);
                self.replica.draft(p.chat_id.as_str(), None, p.draft_v);
            }
            ServerMessage::DraftUpdateConfirmed(p) => {
                self.note_chat(&p.chat_id);
                match ctx {
                    Ctx::Draft(chat, d) if chat == p.chat_id.as_str() => {
                        self.replica.draft(chat, d.clone(), p.draft_v);
                    }
                    _ => self.anomaly(format!("draft_update_confirmed for {sent:?}: {p:?}")),
                }
            }
            ServerMessage::DraftDeleteReceipt(p) => {
                self.note_chat(&p.chat_id);
                self.count(if p.success { "draft deleted" } else { "no draft to delete" });
                if p.success {
                    let v = p.draft_v.expect("a successful receipt carries draft_v");
                    self.own_draft_deletes.insert((p.chat_id.as_str().to_owned(), v));
                    self.replica.draft(p.chat_id.as_str(), None, v);
                }
            }
            ServerMessage::ChatMessageConfirmed(p) => {
                self.note_chat(&p.chat_id);
                match ctx {
                    Ctx::Message(chat, id, content) if chat == p.chat_id.as_str() && id == p.message_id.as_str() => {
                        self.count(if p.duplicate { "message duplicate" } else { "message confirmed" });
                        self.user.confirmed.lock().unwrap().push((chat.clone(), id.clone()));
                        if let Some(a) = self.replica.message(chat, p.new_messages_v, id, content) {
                            self.anomaly(a);
                        }
                    }
                    _ => self.anomaly(format!("chat_message_confirmed for {sent:?}: {p:?}")),
                }
            }
            ServerMessage::ChatDeleted(p) => {
                self.count("chat deleted");
                self.note_chat(&p.chat_id);
                self.own_chat_deletes.insert(p.chat_id.as_str().to_owned());
                self.replica.delete(p.chat_id.as_str(), format!("its own delete_chat, g{}", self.gen));
            }
            ServerMessage::OfflineSyncComplete(p) => {
                for r in &p.results {
                    self.count(match r.status {
                        OfflineStatus::Applied => "offline applied",
                        OfflineStatus::Conflict => "offline conflict",
                        OfflineStatus::Error => "offline error",
                    });
                    if r.status == OfflineStatus::Error && r.code != Some(ErrorCode::NotFound) {
                        self.anomaly(format!("offline change failed: {r:?}"));
                    }
                    // An applied change names a chat that exists (a `delete_draft` of a chat that did not
                    // exist created it, all versions 0, with no broadcast: PROTOCOL.md).
                    if let (OfflineStatus::Applied, Some(chat)) = (r.status, &r.chat_id) {
                        let _ = self.replica.chat(chat);
                    }
                }
            }
            ServerMessage::InitialSyncResponse(r) => {
                for id in &r.chat_ids_to_delete {
                    self.count("sync: chat to delete");
                    self.note_chat(id);
                    if !self.sent_versions.contains_key(id.as_str()) {
                        self.anomaly(format!("chat_ids_to_delete names {id}, which the device did not send"));
                    }
                    let how = format!(
                        "in chat_ids_to_delete of a sync, g{}, versions sent {:?}",
                        self.gen,
                        self.sent_versions.get(id.as_str())
                    );
                    self.replica.delete(id.as_str(), how);
                }
                for e in &r.chats_to_add_or_update {
                    self.note_chat(&e.chat_id);
                    let id = e.chat_id.as_str().to_owned();
                    let sent = self.sent_versions.get(&id).copied();
                    let (s_m, s_t, s_d) = sent.unwrap_or((0, 0, 0));
                    let new = sent.is_none();
                    if self.replica.deleted.contains_key(&id) {
                        self.anomaly(format!("a sync part lists {id}, whose chat_deleted came before it: {e:?}"));
                    }
                    if (e.kind == ChatChangeKind::NewChat) != new {
                        self.anomaly(format!("sync entry of kind {:?} (versions sent: {sent:?}): {e:?}", e.kind));
                    }
                    if (new || e.versions.title_v > s_t) != e.title.is_some() {
                        self.anomaly(format!("sync entry with title_v {} (sent {s_t}): {e:?}", e.versions.title_v));
                    }
                    if (new || e.versions.draft_v > s_d) != e.draft_json.is_some() {
                        self.anomaly(format!("sync entry with draft_v {} (sent {s_d}): {e:?}", e.versions.draft_v));
                    }
                    if let Some(t) = &e.title {
                        self.check_value("title", t);
                        self.replica.title(&id, t, e.versions.title_v);
                    }
                    if let Some(d) = &e.draft_json {
                        self.replica.draft(&id, d.clone(), e.versions.draft_v);
                    }
                    let _ = self.replica.chat(&id); // a new chat exists even with nothing in it
                    for msg in e.messages.iter().flatten() {
                        let content = content_text(&msg.content);
                        if let Some(a) = self.replica.message(&id, msg.seq, msg.message_id.as_str(), &content) {
                            self.anomaly(a);
                        }
                    }
                    self.count(if new { "sync: new chat" } else { "sync: updated chat" });
                    if e.versions.messages_v > s_m {
                        self.to_fetch.insert(id, e.versions.messages_v);
                    }
                }
            }
            ServerMessage::ChatMessagesResponse(r) => {
                self.note_chat(&r.chat_id);
                for msg in &r.messages {
                    let content = content_text(&msg.content);
                    self.check_value("message", &content);
                    if let Some(a) =
                        self.replica.message(r.chat_id.as_str(), msg.seq, msg.message_id.as_str(), &content)
                    {
                        self.anomaly(a);
                    }
                }
            }
            ServerMessage::Error(e) if e.code == ErrorCode::NotFound => self.count("not_found"),
            ServerMessage::Pong(_) => {}
            other => self.anomaly(format!("unexpected reply to {sent:?}: {other:?}")),
        }
    }

    fn apply_broadcast(&mut self, m: Incoming) {
        let own = self.own_prefix();
        match m.message {
            ServerMessage::ChatTitleUpdated(p) => {
                self.note_chat(&p.chat_id);
                self.check_value("title", &p.data.title);
                if p.data.title.starts_with(&own) {
                    self.anomaly(format!("echo: its own title came back as a broadcast: {p:?}"));
                }
                self.replica.title(p.chat_id.as_str(), &p.data.title, p.versions.title_v);
            }
            ServerMessage::ChatDraftUpdated(p) => {
                self.note_chat(&p.chat_id);
                let text = p.data.draft_json.as_ref().map(|d| Value::Object(d.clone()).to_string());
                if let Some(t) = &text {
                    if t.contains(&format!("\"{own}")) {
                        self.anomaly(format!("echo: its own draft came back as a broadcast: {p:?}"));
                    }
                    if t.contains(&format!("\"{}", self.user.other_tag)) {
                        self.anomaly(format!("the other user's draft reached this device: {p:?}"));
                    }
                }
                self.replica.draft(p.chat_id.as_str(), p.data.draft_json, p.versions.draft_v);
            }
            ServerMessage::DraftDeleted(p) => {
                self.note_chat(&p.chat_id);
                if self.own_draft_deletes.contains(&(p.chat_id.as_str().to_owned(), p.draft_v)) {
                    self.anomaly(format!("echo: its own draft deletion came back as a broadcast: {p:?}"));
                }
                self.replica.draft(p.chat_id.as_str(), None, p.draft_v);
            }
            ServerMessage::ChatMessageAdded(p) => {
                self.note_chat(&p.chat_id);
                let content = content_text(&p.message.content);
                self.check_value("message", &content);
                if content.starts_with(&own) {
                    self.anomaly(format!("echo: its own message came back as a broadcast: {p:?}"));
                }
                if p.versions.messages_v != p.message.seq {
                    self.anomaly(format!("a device's message whose seq is not the broadcast's messages_v: {p:?}"));
                }
                let (chat, seq, id) = (p.chat_id.as_str().to_owned(), p.message.seq, p.message.message_id);
                if let Some(a) = self.replica.message(&chat, seq, id.as_str(), &content) {
                    self.anomaly(a);
                }
            }
            ServerMessage::ChatDeleted(p) => {
                self.note_chat(&p.chat_id);
                if self.own_chat_deletes.contains(p.chat_id.as_str()) {
                    self.anomaly(format!("echo: its own chat deletion came back as a broadcast: {p:?}"));
                }
                self.replica.delete(p.chat_id.as_str(), format!("a chat_deleted broadcast, g{}", self.gen));
            }
            ServerMessage::ChatReadUpdated(_) => {}
            other => self.anomaly(format!("unexpected broadcast: {other:?}")),
        }
    }

    /// The offline changes as the device would queue them now: values tagged now, versions held now (30%
    /// one behind: a stale edit).
    fn offline_changes(&mut self, changes: &[(String, OffKind)]) -> Value {
        let mut out = Vec::new();
        for (chat, kind) in changes {
            let held = self.replica.chats.get(chat).cloned().unwrap_or_default();
            let stale = self.rng.gen_bool(0.3);
            let version = |v: u64| if stale { v.saturating_sub(1) } else { v } as i64;
            let change_id = format!("{}-{}", self.name, self.counter);
            out.push(match kind {
                OffKind::Title => off_title(&change_id, chat, &self.value(), version(held.title_v)),
                OffKind::Draft => off_draft(&change_id, chat, doc(&self.value()), version(held.draft_v)),
                OffKind::DeleteDraft => off_delete_draft(&change_id, chat, version(held.draft_v)),
            });
        }
        Value::Array(out)
    }

    /// The wire message of a write, and what its reply means.
    fn write(&mut self, op: &Op) -> (ClientMessage, Ctx) {
        match op {
            Op::Title(chat) => (title(chat, &self.value()), Ctx::Plain),
            Op::Draft(chat) => {
                let d = doc(&self.value());
                (draft(chat, d.clone()), Ctx::Draft(chat.clone(), d.as_object().cloned()))
            }
            Op::ClearDraft(chat) => (draft(chat, Value::Null), Ctx::Draft(chat.clone(), None)),
            Op::DeleteDraft(chat) => (delete_draft(chat), Ctx::Plain),
            Op::Message(chat) => {
                let content = self.value();
                let id = content.replace(&format!("{}.", self.user.tag), "m-");
                (message(chat, &id, json!(content)), Ctx::Message(chat.clone(), id, content))
            }
            Op::DeleteChat(chat) => {
                self.user.delete_attempted.lock().unwrap().insert(chat.clone());
                (delete_chat(chat), Ctx::Plain)
            }
            Op::Offline(changes) => (offline(self.offline_changes(changes)), Ctx::Offline),
            Op::Sync | Op::Drop { .. } => unreachable!("not a write"),
        }
    }

    async fn run(&mut self, op: Op) {
        self.count(match &op {
            Op::Title(_) => "op title",
            Op::Draft(_) | Op::ClearDraft(_) => "op draft",
            Op::DeleteDraft(_) => "op delete_draft",
            Op::Message(_) => "op message",
            Op::DeleteChat(_) => "op delete_chat",
            Op::Offline(_) => "op offline",
            Op::Sync => "op sync",
            Op::Drop { in_flight: Some(_), .. } => "op drop with a write in flight",
            Op::Drop { .. } => "op drop",
        });
        self.run_op(op).await;
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    async fn run_op(&mut self, op: Op) {
        match op {
            Op::Sync => self.sync().await,
            Op::Drop { in_flight, offline: edits, away_ms } => {
                if let Some(op) = in_flight {
                    let (m, ctx) = self.write(&op);
                    if let Ctx::Message(chat, id, content) = ctx {
                        self.unconfirmed = Some((chat, id, content));
                    }
                    self.client.as_mut().expect("connected").send(&m, Some("dropped")).await.unwrap();
                }
                drop(self.client.take()); // no close frame: the socket just goes
                let queued = if edits.is_empty() { None } else { Some(self.offline_changes(&edits)) };
                tokio::time::sleep(Duration::from_millis(away_ms)).await;
                self.connect().await;
                if let Some(changes) = queued {
                    self.request(&offline(changes), Ctx::Offline).await;
                }
                if let Some((chat, id, content)) = self.unconfirmed.take() {
                    let m = message(&chat, &id, json!(content));
                    self.request(&m, Ctx::Message(chat, id, content)).await;
                }
            }
            op => {
                let (m, ctx) = self.write(&op);
                self.request(&m, ctx).await;
            }
        }
    }
}

/// A chat id for step `i`: mostly the user's own (the range grows, so new chats keep appearing),
/// sometimes the other user's (taken or not).
fn pick_chat(rng: &mut StdRng, user: &User, i: usize) -> String {
    let prefix = if rng.gen_bool(0.08) { user.other_prefix } else { user.prefix };
    format!("{prefix}{}", rng.gen_range(0..3 + i / 6))
}

fn off_kind(rng: &mut StdRng) -> OffKind {
    match rng.gen_range(0..3) {
        0 => OffKind::Title,
        1 => OffKind::Draft,
        _ => OffKind::DeleteDraft,
    }
}

fn gen_write(rng: &mut StdRng, user: &User, i: usize) -> Op {
    let chat = pick_chat(rng, user, i);
    match rng.gen_range(0..100) {
        0..=21 => Op::Title(chat),
        22..=37 => Op::Draft(chat),
        38..=42 => Op::ClearDraft(chat),
        43..=51 => Op::DeleteDraft(chat),
        52..=54 => Op::DeleteChat(chat),
        55..=64 => {
            let n = rng.gen_range(1..=4);
            Op::Offline((0..n).map(|_| (pick_chat(rng, user, i), off_kind(rng))).collect())
        }
        _ => Op::Message(chat),
    }
}

fn gen_ops(rng: &mut StdRng, user: &User, n: usize) -> Vec<Op> {
    (0..n)
        .map(|i| match rng.gen_range(0..100) {
            0..=4 => Op::Sync,
            5..=9 => {
                let in_flight = rng.gen_bool(0.5).then(|| Box::new(gen_write(rng, user, i)));
                let n = rng.gen_range(0..=3);
                let offline = (0..n).map(|_| (pick_chat(rng, user, i), off_kind(rng))).collect();
                Op::Drop { in_flight, offline, away_ms: rng.gen_range(5..120) }
            }
            _ => gen_write(rng, user, i),
        })
        .collect()
}

/// The truth: a fresh device's full initial sync, and every message of every chat.
async fn truth(url: &str, token: &str) -> BTreeMap<String, ChatState> {
    tokio::time::timeout(REPLY_BOUND, read_truth(url, token))
        .await
        .unwrap_or_else(|_| panic!("reading the truth from {url} took more than {REPLY_BOUND:?}"))
}

async fn read_truth(url: &str, token: &str) -> BTreeMap<String, ChatState> {
    let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(token, "truth") };
    let (mut c, _) = Client::connect_authenticated(url, &opts).await.unwrap();
    c.send(&sync_request(json!({}), None), Some("truth")).await.unwrap();
    let mut out = BTreeMap::new();
    let mut counts = BTreeMap::new();
    loop {
        let part = expect_msg!(c.recv_reply("truth").await.unwrap(), InitialSyncResponse);
        assert!(part.chat_ids_to_delete.is_empty(), "{part:?}");
        for e in &part.chats_to_add_or_update {
            assert_eq!(e.kind, ChatChangeKind::NewChat, "{e:?}");
            let state = ChatState {
                title: e.title.clone().unwrap_or_else(|| panic!("a new chat without its title: {e:?}")),
                title_v: e.versions.title_v,
                draft: e.draft_json.clone().unwrap_or_else(|| panic!("a new chat without its draft: {e:?}")),
                draft_v: e.versions.draft_v,
                messages: BTreeMap::new(),
            };
            out.insert(e.chat_id.as_str().to_owned(), state);
            counts.insert(e.chat_id.as_str().to_owned(), e.versions.messages_v);
        }
        if !part.more {
            let order: BTreeSet<&str> = part.server_chat_order.iter().map(ChatId::as_str).collect();
            let listed: BTreeSet<&str> = out.keys().map(String::as_str).collect();
            assert_eq!(order, listed, "server_chat_order and the chats listed differ");
            break;
        }
    }
    for (chat, state) in out.iter_mut() {
        let mut after = 0;
        loop {
            let page =
                expect_msg!(c.request(&get_messages(chat, after, Some(500))).await.unwrap(), ChatMessagesResponse);
            for m in &page.messages {
                assert_eq!(m.seq, after + 1, "chat {chat}: messages out of order or with a gap: {page:?}");
                state.messages.insert(m.seq, (m.message_id.as_str().to_owned(), content_text(&m.content)));
                after = m.seq;
            }
            if !page.has_more {
                assert_eq!(page.messages_v, after, "chat {chat}: messages_v is not the number of messages");
                break;
            }
        }
        assert_eq!(counts[chat], after, "chat {chat}: the sync's messages_v is not the number of messages");
    }
    out
}

/// The differences between a replica and the truth, one readable line each.
fn diff(device: &str, replica: &Replica, truth: &BTreeMap<String, ChatState>) -> Vec<String> {
    let mut out = Vec::new();
    let ids: BTreeSet<&String> = replica.chats.keys().chain(truth.keys()).collect();
    for id in ids {
        match (replica.chats.get(id), truth.get(id)) {
            (Some(_), None) => out.push(format!("{device}: chat {id}: held, but not in the truth")),
            // An offline `delete_draft` creates a missing chat, all versions 0, with no broadcast
            // (PROTOCOL.md): the other devices learn of it at their next sync.
            (None, Some(t)) if *t == ChatState::default() && !replica.deleted.contains_key(id) => {}
            (None, Some(_)) => out.push(format!(
                "{device}: chat {id}: in the truth, but {}",
                match replica.deleted.get(id) {
                    Some(how) => format!("the device saw it deleted ({how})"),
                    None => "unknown to the device".to_owned(),
                }
            )),
            (Some(r), Some(t)) => {
                let mut field = |name: &str, r: String, t: String| {
                    if r != t {
                        out.push(format!("{device}: chat {id}: {name}: replica {r} vs truth {t}"));
                    }
                };
                field("title", format!("{:?}@{}", r.title, r.title_v), format!("{:?}@{}", t.title, t.title_v));
                let d = |s: &ChatState| {
                    format!("{}@{}", s.draft.as_ref().map_or("null".into(), |d| d.len().to_string()), s.draft_v)
                };
                field("draft", d(r), d(t));
                if r.draft != t.draft {
                    field("draft_json", format!("{:?}", r.draft), format!("{:?}", t.draft));
                }
                let m = |s: &ChatState| {
                    s.messages.iter().map(|(seq, (id, _))| format!("{seq}:{id}")).collect::<Vec<_>>().join(",")
                };
                field("messages", m(r), m(t));
                if r.messages != t.messages && m(r) == m(t) {
                    field("message contents", format!("{:?}", r.messages), format!("{:?}", t.messages));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    out
}

/// A user's shared record: `A` (alice, chats `a…`) or `B` (bob, chats `b…`).
fn user(tag: &'static str) -> Arc<User> {
    let (prefix, other_prefix, other_tag) = if tag == "A" { ("a", "b", "B.") } else { ("b", "a", "A.") };
    Arc::new(User {
        tag,
        prefix,
        other_prefix,
        other_tag,
        confirmed: Mutex::new(Vec::new()),
        delete_attempted: Mutex::new(BTreeSet::new()),
    })
}

struct Run {
    seed: u64,
    /// The node urls: alice's device `i` connects to `urls[i % len]`, bob's to the next node.
    urls: Vec<String>,
}

/// One run: alice's four devices and bob's two write at once; returns the devices (connected) and users.
/// `during` runs alongside, given the count of operations done so far and their total.
async fn run_devices<F: std::future::Future<Output = ()>>(
    run: &Run,
    nodes: &[&TestServer],
    during: impl FnOnce(Arc<AtomicUsize>, usize) -> F,
) -> Vec<(Arc<User>, Vec<Device>)> {
    let mut rng = StdRng::seed_from_u64(run.seed);
    let mut spawned = Vec::new();
    let progress = Arc::new(AtomicUsize::new(0));
    let mut total = 0;
    for (tag, login, names, ops) in
        [("A", "alice", &["phone", "laptop", "tablet", "desk"][..], 100), ("B", "bob", &["bphone", "blaptop"][..], 40)]
    {
        let u = user(tag);
        nodes[0].user(login, false).await;
        let mut handles = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let url = &run.urls[(i + usize::from(tag == "B")) % run.urls.len()];
            let token = nodes[0].token(login).await;
            let dseed = rng.gen();
            let mut d = Device::new(name, url, token, u.clone(), run.seed);
            d.rng = StdRng::seed_from_u64(dseed);
            d.progress = progress.clone();
            total += ops;
            let plan = gen_ops(&mut StdRng::seed_from_u64(dseed ^ 1), &u, ops);
            handles.push(tokio::spawn(async move {
                d.connect().await;
                for op in plan {
                    d.run(op).await;
                }
                d
            }));
        }
        spawned.push((u, handles));
    }
    let finished = async {
        let mut out = Vec::new();
        for (u, handles) in spawned {
            let mut devices = Vec::new();
            for h in handles {
                devices.push(h.await);
            }
            out.push((u, devices));
        }
        progress.store(usize::MAX / 2, Ordering::Relaxed); // a device that panicked never counts up
        out
    };
    let ((), finished) = tokio::join!(during(progress.clone(), total), finished);
    finished
        .into_iter()
        .map(|(u, devices)| {
            (u, devices.into_iter().map(|d| d.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))).collect())
        })
        .collect()
}

/// Waits (bounded) until every device's replica is the truth on every node, then checks acknowledged
/// messages, echoes and the users' separation.
async fn converge(seed: u64, nodes: &[&TestServer], users: &mut [(Arc<User>, Vec<Device>)]) {
    let deadline = tokio::time::Instant::now() + CONVERGE_BOUND;
    let mut truths = Vec::new();
    loop {
        truths.clear();
        let mut diffs = Vec::new();
        for (u, devices) in users.iter_mut() {
            let login = if u.tag == "A" { "alice" } else { "bob" };
            let token = nodes[0].token(login).await;
            let t = truth(&nodes[0].url, &token).await;
            for node in &nodes[1..] {
                let other = truth(&node.url, &token).await;
                for line in diff(&format!("node {}", node.url), &Replica { chats: other, ..Replica::default() }, &t) {
                    diffs.push(format!("the truth differs between nodes: {line}"));
                }
            }
            for d in devices.iter_mut() {
                d.drain().await;
                diffs.extend(diff(&d.name, &d.replica, &t));
            }
            truths.push(t);
        }
        if diffs.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let anomalies: Vec<String> =
                users.iter().flat_map(|(_, devices)| devices).flat_map(|d| d.anomalies.iter().cloned()).collect();
            panic!(
                "seed {seed}: the replicas did not converge within {CONVERGE_BOUND:?}:\n{}\nanomalies:\n{}",
                diffs.join("\n"),
                anomalies.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut problems = Vec::new();
    for ((u, devices), t) in users.iter().zip(&truths) {
        for (chat, id) in u.confirmed.lock().unwrap().iter() {
            match t.get(chat) {
                Some(c) if c.messages.values().any(|(m, _)| m == id) => {}
                Some(_) => problems.push(format!("user {}: confirmed message {id} of chat {chat} is lost", u.tag)),
                None if u.delete_attempted.lock().unwrap().contains(chat) => {}
                None => problems.push(format!("user {}: chat {chat} of confirmed message {id} is gone", u.tag)),
            }
        }
        for d in devices {
            problems.extend(d.anomalies.iter().cloned());
        }
    }
    for (i, (_, devices)) in users.iter().enumerate() {
        let other = &truths[1 - i];
        for d in devices {
            let crossed: Vec<_> = d.seen_chats.iter().filter(|c| other.contains_key(*c)).collect();
            if !crossed.is_empty() {
                problems.push(format!("{}: saw the other user's chats {crossed:?}", d.name));
            }
        }
    }
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
    let mut stats = BTreeMap::new();
    for d in users.iter().flat_map(|(_, devices)| devices) {
        for (k, v) in &d.stats {
            *stats.entry(*k).or_insert(0) += v;
        }
    }
    eprintln!("seed {seed}: {stats:?}");
    let chats: usize = truths.iter().map(BTreeMap::len).sum();
    let messages: usize = truths.iter().flat_map(|t| t.values()).map(|c| c.messages.len()).sum();
    eprintln!("seed {seed}: converged ({chats} chats, {messages} messages)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_writing_at_once_converge_on_one_node() {
    let seed = base_seed();
    let server = TestServer::start().await;
    let run = Run { seed, urls: vec![server.url.clone()] };
    let mut users = run_devices(&run, &[&server], |_, _| async {}).await;
    converge(seed, &[&server], &mut users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_writing_at_once_on_three_nodes_converge() {
    let Some(url) = redis_url() else { return };
    let Some(schema) = backends::PgSchema::create().await else { return };
    let seed = base_seed() ^ 0x3;
    let cluster = TestCluster::start(3, &url, |c| c.database_url = Some(schema.url.clone())).await;
    let nodes: Vec<&TestServer> = cluster.nodes.iter().collect();
    let run = Run { seed, urls: nodes.iter().map(|n| n.url.clone()).collect() };
    let mut users = run_devices(&run, &nodes, |_, _| async {}).await;
    converge(seed, &nodes, &mut users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_three_nodes_converge_at_their_next_sync_after_redis_went_away_and_returned() {
    let Some(_) = redis_url() else { return };
    let Some(schema) = backends::PgSchema::create().await else { return };
    let seed = base_seed() ^ 0x7;
    let mut redis = OwnRedis::start();
    let cluster = TestCluster::start(3, &redis.url(), |c| c.database_url = Some(schema.url.clone())).await;
    let nodes: Vec<&TestServer> = cluster.nodes.iter().collect();
    let run = Run { seed, urls: nodes.iter().map(|n| n.url.clone()).collect() };
    // Redis goes away a third of the way through the operations and comes back at two thirds.
    let own = &mut redis; // borrowed: the outage must not take (and drop, killing) the server
    let outage = |done: Arc<AtomicUsize>, total: usize| async move {
        let reached = |n: usize| {
            let done = done.clone();
            async move {
                while done.load(Ordering::Relaxed) < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        reached(total / 3).await;
        own.kill();
        eprintln!("seed {seed}: Redis killed");
        reached(total * 2 / 3).await;
        own.restart();
        eprintln!("seed {seed}: Redis restarted");
    };
    let mut users = run_devices(&run, &nodes, outage).await;
    tokio::time::timeout(CONVERGE_BOUND, cluster.wait_healthy()).await.expect("the nodes reconnect to Redis");
    for (_, devices) in users.iter_mut() {
        for d in devices.iter_mut() {
            drop(d.client.take());
            d.connect().await;
        }
    }
    converge(seed, &nodes, &mut users).await;
}
