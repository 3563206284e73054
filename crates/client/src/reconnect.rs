//! A client that stays connected: [`ReconnectingClient`] reconnects with exponential backoff and full
//! jitter, keeps the changes made while it is offline, and on every (re)connection sends them as
//! `sync_offline_changes` (as few as the limits allow), then the chat messages not yet confirmed, then
//! an `initial_sync_request` with the versions it holds. What happens is surfaced as [`Event`]s.
//!
//! The same behaviour as the TypeScript SDK's client. A background task owns the connection; the handle
//! is cheap to use from anywhere (`change`, `send_message` and `request` take `&self`).
//!
//! * Title and draft changes ([`Change`]) made while connected are sent live (`update_title`,
//!   `update_draft`, `delete_draft`); made while disconnected (or sent but not confirmed when the
//!   connection dropped, or refused for now: `unavailable`, `rate_limited`, `internal`) they are queued
//!   for the next connection, one per chat and component (a later edit, queued or live, replaces an
//!   earlier one, so the server sees the last state the user wanted, edited from the version the client
//!   held, or from the one its own earlier edit of that component produced once the server applied it).
//!   The server applies a queued change only if nobody changed that component since
//!   (`version_before_edit`); otherwise the result is a `conflict` in [`Event::OfflineSynced`]. A batch
//!   the server refuses as a whole is kept for the next connection when refused for now (`unavailable`,
//!   `rate_limited`, `internal`); refused with any other error (`invalid_payload`, `limit_exceeded`…),
//!   which a retry would repeat, its changes leave the queue, each reported as an `error` result with
//!   that code in [`Event::OfflineSynced`] (as the TypeScript SDK's `change_rejected`).
//! * Chat messages ([`ReconnectingClient::send_message`]) stay in an outbox until their
//!   `chat_message_confirmed` arrives and are re-sent after a reconnection (a `message_id` is idempotent).
//!   One whose frame is larger than `max_frame_bytes` is not sent (the server would close the connection,
//!   on every attempt): it leaves the outbox, reported as an `error` `limit_exceeded`.
//! * Frames go at the pace of the server's rate limit (the greeting's `rate_per_sec` and `rate_burst`,
//!   with a margin): after a long time offline, the queued changes, the messages to re-send and the
//!   initial sync are more frames than the burst, and sent at once those past it would be refused
//!   `rate_limited`, the initial sync with them (and with it the connection).
//! * The limits kept to (frame size, batch size, rate) are those of the `connected` greeting; a value no
//!   chatsync server announces (0, a `max_frame_bytes` below 1024) says nothing usable and is taken as
//!   the protocol's default (PROTOCOL.md section 2), not as a frame nothing fits in.
//! * The versions held are the newest the client has been told of (initial sync, confirmations,
//!   broadcasts, offline results), those of the initial sync once it is complete (as [`Event::Synced`]:
//!   the parts of one that fails or is cut are not held, so the next sync sends them again); a deleted
//!   chat is forgotten, and nothing that still arrives about it is held. The initial sync names as many
//!   chats as fit in one frame (`max_frame_bytes`); the server sends the others in full, and those of
//!   them missing from its `server_chat_order` are added to the [`Event::Synced`]'s `chat_ids_to_delete`.
//! * A connection counts as a success, and resets the backoff, once its initial sync is complete: a
//!   server that greets and then closes, or fails the sync, is retried with growing delays like one that
//!   refuses, and counts towards `max_attempts`; the later end of a connection that synced does not. A
//!   failed initial sync (`initial_sync_error`, or an `error` in its place) ends the connection: staying
//!   on it, the client would never learn what changed while it was offline. Except when refused
//!   `rate_limited`: the rate refills with time, so the sync is sent again on the same connection after a
//!   pause (jittered, growing like the backoff with each refusal), as the TypeScript SDK does, up to 8
//!   times; the 9th refusal ends the connection as a failed attempt.
//! * An attempt that brings no `connected` greeting within `connect_timeout` (20 s) fails and is retried;
//!   a connection that brings no frame for `keepalive` (25 s) is sent a `ping`, and is dropped and
//!   re-established (a half-open connection) when as long again passes without any frame. Every frame
//!   counts, the WebSocket Pings of the server's heartbeat too (they go on while the server works
//!   through a long request, which the `ping` would wait behind).
//! * Nothing the server sends grows the client's memory without end: at most `event_capacity` (1024)
//!   events wait for the application, and while they do the client stops reading the connection
//!   (backpressure: the server's bounded outbox, and its rule for slow consumers, take it from there;
//!   nothing is lost, a dropped connection resyncs), except while a [`ReconnectingClient::request`] is
//!   awaited (its caller cannot take events meanwhile, and the reply may be behind them): then up to four
//!   times as many wait, past which the connection is dropped and the request fails; commands, the pace
//!   of sending and the keepalive go on throughout; a reply is collected in at most `max_reply_parts`
//!   (1024) parts, past which the request (or the initial sync, and with it the connection) fails.
//! * A frame the client cannot read (a type newer than it, a malformed payload) is reported as
//!   [`Event::ProtocolError`] and skipped, as the TypeScript SDK's `protocol_error`; only one that carries
//!   the `request_id` of a request in flight (its reply, lost) ends the connection.
//! * A close that reconnecting cannot cure (1008 other than `Token expired` and `Rate limit exceeded`:
//!   an invalid or revoked session, a device mismatch) stops the client: [`Event::Disconnected`] with
//!   `retry_in: None` is then the last event. So does an upgrade refused with an HTTP 4xx other than 408
//!   and 429 (a cookie or an Origin the server forbids, 403; a wrong path, 404): every attempt would get
//!   it again. `Token expired` is retried: give a fresh token first with
//!   [`ReconnectingClient::set_token`].
//! * A connection as another user than the last one (a token of someone else given with `set_token`)
//!   starts from nothing: the changes and messages queued before the `set_token` call, and the versions
//!   held, are dropped, never sent as the new user's (as the TypeScript SDK's queue without per-tab
//!   storage); what was made after the call goes out as the new user's.

use crate::{Client, ClientError, ConnectOptions, Undecodable};
use chatsync_protocol::{
    ChatId, ChatMessageAdded, ClientMessage, ClientVersions, Connected, DeleteDraft, ErrorCode, ErrorPayload, Incoming,
    InitialSyncError, InitialSyncRequest, InitialSyncResponse, Limits, MessageId, NewMessage, OfflineChangeType,
    OfflineResult, OfflineStatus, OfflineSyncComplete, ServerMessage, SyncOfflineChanges, UpdateDraft, UpdateTitle,
};
use rand::Rng;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Reconnection timing.
#[derive(Debug, Clone)]
pub struct ReconnectOptions {
    /// The backoff ceiling of the first retry; it doubles per failed attempt.
    pub initial_delay: Duration,
    /// The cap of the ceiling.
    pub max_delay: Duration,
    /// Give up after this many consecutive failed attempts (`None`: never). An attempt fails unless its
    /// initial sync completes (a connection that synced and drops later is no failed attempt).
    pub max_attempts: Option<u32>,
    /// How long an attempt may take until the server's `connected` greeting (TCP connect, TLS, upgrade,
    /// authentication): a network that died mid-handshake may answer nothing for minutes. Past it the
    /// attempt fails and is retried. `Duration::ZERO`: no bound.
    pub connect_timeout: Duration,
    /// After this long without a frame from the server, a `ping` is sent; when this long again passes
    /// without any frame, the connection is taken for half-open (a laptop that slept, a network that
    /// changed: TCP may notice only after many minutes, or never while the client sends nothing), dropped
    /// and re-established. `Duration::ZERO`: no keepalive.
    pub keepalive: Duration,
    /// The most parts of one reply the client collects (a caller's [`ReconnectingClient::request`], the
    /// connection's initial sync): a server that sends parts (`more: true`) without end must not grow
    /// the client's memory without end. Past it a request fails ([`ClientError::Unexpected`]; the
    /// reply's remaining parts are dropped as they come), and an initial sync fails, ending the
    /// connection. A server's parts are each at most its `max_reply_bytes` (1 MiB by default), so the
    /// default, 1024, is far beyond any sync; a caller's own `sync_offline_changes` counts a part per
    /// change applied (its broadcast), so keep it above `max_offline_changes`.
    pub max_reply_parts: usize,
    /// How many events may wait for the application ([`ReconnectingClient::next_event`]). When that
    /// many wait, the client stops reading the connection until the application takes one: what the
    /// server sends waits in the network (the server's bounded outbox, then its slow-consumer rule, hold
    /// it from there), never in this client's memory. While a [`ReconnectingClient::request`] is awaited
    /// (whose caller cannot take events: both calls need the handle), the client reads on, so that the
    /// reply is not stuck behind events, up to four times this many waiting; past that it drops the
    /// connection, failing the request (a resync follows). At least 1.
    pub event_capacity: usize,
}

impl Default for ReconnectOptions {
    fn default() -> Self {
        ReconnectOptions {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_attempts: None,
            connect_timeout: Duration::from_secs(20),
            keepalive: Duration::from_secs(25),
            max_reply_parts: 1024,
            event_capacity: 1024,
        }
    }
}

impl ReconnectOptions {
    /// The backoff ceiling before retry `attempt` (1-based): `initial_delay · 2^(attempt-1)`, capped.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        self.initial_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// The delay before retry `attempt`: uniform in `[0, ceiling(attempt)]` ("full jitter"), so that
    /// clients cut off together do not come back together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::thread_rng().gen_range(0..=nanos))
    }
}

/// A change to a chat's title or draft.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `update_title` (offline: a `title` change).
    Title {
        /// The chat.
        chat_id: ChatId,
        /// The new title (`""` clears it).
        title: String,
    },
    /// `update_draft` (offline: a `draft` change).
    Draft {
        /// The chat.
        chat_id: ChatId,
        /// The draft document, or `None` to clear it.
        draft_json: Option<Map<String, Value>>,
    },
    /// `delete_draft` (offline: a `delete_draft` change).
    DeleteDraft {
        /// The chat.
        chat_id: ChatId,
    },
}

impl Change {
    fn chat_id(&self) -> &ChatId {
        match self {
            Change::Title { chat_id, .. } | Change::Draft { chat_id, .. } | Change::DeleteDraft { chat_id } => chat_id,
        }
    }

    /// Which component it changes: a later change of the same component replaces it in the queue.
    fn is_title(&self) -> bool {
        matches!(self, Change::Title { .. })
    }

    /// Whether `other` changes the same chat's same component (a draft update and a draft deletion do).
    fn same_component(&self, other: &Change) -> bool {
        self.chat_id() == other.chat_id() && self.is_title() == other.is_title()
    }

    fn live(&self) -> ClientMessage {
        match self.clone() {
            Change::Title { chat_id, title } => ClientMessage::UpdateTitle(UpdateTitle { chat_id, new_title: title }),
            Change::Draft { chat_id, draft_json } => ClientMessage::UpdateDraft(UpdateDraft { chat_id, draft_json }),
            Change::DeleteDraft { chat_id } => ClientMessage::DeleteDraft(DeleteDraft { chat_id }),
        }
    }

    fn kind(&self) -> OfflineChangeType {
        match self {
            Change::Title { .. } => OfflineChangeType::Title,
            Change::Draft { .. } => OfflineChangeType::Draft,
            Change::DeleteDraft { .. } => OfflineChangeType::DeleteDraft,
        }
    }

    fn offline(&self, version_before_edit: i64, change_id: u64) -> Value {
        let value = match self {
            Change::Title { title, .. } => json!(title),
            Change::Draft { draft_json, .. } => json!(draft_json),
            Change::DeleteDraft { .. } => Value::Null,
        };
        json!({
            "change_id": format!("c{change_id}"),
            "chat_id": self.chat_id(),
            "type": self.kind(),
            "value": value,
            "version_before_edit": version_before_edit,
        })
    }
}

/// What the client surfaces.
#[derive(Debug, Clone)]
pub enum Event {
    /// A connection is up; the queued changes, unconfirmed messages and an initial sync are on their way.
    Connected(Connected),
    /// The server's answer to the queued offline changes (one per batch of at most
    /// `limits.max_offline_changes` changes in one frame of `limits.max_frame_bytes`). A change larger
    /// than a frame on its own is not sent (the server would close the connection, on every attempt): it
    /// leaves the queue, reported here as an `error` result with `limit_exceeded`. A batch the server
    /// refuses as a whole with an error a retry would repeat (not `unavailable`, `rate_limited` or
    /// `internal`) leaves the queue too, reported here (after that `error` as an [`Event::Message`]) as an
    /// `error` result with its code for each change.
    OfflineSynced(OfflineSyncComplete),
    /// The initial sync after a (re)connection, its parts merged.
    Synced(InitialSyncResponse),
    /// Any other server message (replies to live changes, broadcasts, errors, server events).
    Message(Incoming),
    /// A frame that is not a server message this client can read (a type newer than it, a malformed
    /// payload, not JSON) and answers none of its requests: skipped, the connection kept. (One carrying
    /// the `request_id` of a request in flight ends the connection instead: its reply is lost.)
    ProtocolError {
        /// The frame as received.
        frame: String,
        /// Why it could not be read.
        error: String,
    },
    /// The connection ended or could not be made. `retry_in`: when the next attempt starts; `None`: the
    /// client stopped (a close or an HTTP refusal reconnecting cannot cure, `max_attempts`, or
    /// [`ReconnectingClient::close`]) and this is its last event.
    Disconnected {
        /// The server's close code and reason, if it sent one.
        close: Option<(u16, String)>,
        /// What happened, in words.
        error: String,
        /// Delay before the next attempt.
        retry_in: Option<Duration>,
    },
}

/// One queued change and the version it was made from.
#[derive(Debug, Clone)]
struct Queued {
    id: u64,
    change: Change,
    version_before_edit: i64,
}

/// State shared by the handle and the task.
#[derive(Default)]
struct Shared {
    connected: bool,
    /// The user of the last connection (`connected`'s `user_id`).
    user: Option<String>,
    versions: BTreeMap<ChatId, ClientVersions>,
    /// Chats seen deleted (`chat_deleted`): ids are never reused, so what still arrives about them (a
    /// broadcast that raced the deletion, a part of the initial sync from before it) is not taken as held.
    deleted: HashSet<ChatId>,
    queue: Vec<Queued>,
    outbox: Vec<(ChatId, NewMessage)>,
    options: ConnectOptions,
    next_id: u64,
    /// How many tokens [`ReconnectingClient::set_token`] has given (the connection made with the
    /// latest one knows it by this number).
    token_epoch: u64,
    /// Where the queue stood when the latest token was given: see [`TokenMark`].
    token_mark: Option<TokenMark>,
}

/// What was queued when a token was given (in the order of the caller's commands): if the connection
/// made with it is another user's, that is what the previous user left, and it is dropped; what was
/// queued after it was made under the new token and goes out as the new user's.
struct TokenMark {
    /// The token's number ([`Shared::token_epoch`]).
    epoch: u64,
    /// The id of the last change queued before it.
    last_id: u64,
    /// The messages in the outbox then.
    messages: HashSet<(ChatId, MessageId)>,
}

impl Shared {
    fn held(&self, chat_id: &ChatId, title: bool) -> i64 {
        let v = self.versions.get(chat_id).copied().unwrap_or_default();
        let held = if title { v.title_v } else { v.draft_v };
        held.unwrap_or(0)
    }

    /// Takes `token` for the next connections, and marks what was queued until now (see [`TokenMark`]).
    fn set_token(&mut self, token: String) {
        self.options.token = Some(token);
        self.token_epoch += 1;
        let messages = self.outbox.iter().map(|(chat, m)| (chat.clone(), m.message_id.clone())).collect();
        self.token_mark = Some(TokenMark { epoch: self.token_epoch, last_id: self.next_id, messages });
    }

    /// Queues `change`, replacing a queued change of the same chat and component.
    fn enqueue(&mut self, change: Change, version_before_edit: i64) {
        self.queue.retain(|q| !q.change.same_component(&change));
        self.next_id += 1;
        self.queue.push(Queued { id: self.next_id, change, version_before_edit });
    }

    /// Puts back the live changes a lost connection left unconfirmed, in the order they were sent (by
    /// their `id`): each is newer than any queued change of its component (the queue only grows while
    /// offline, so what it holds during a connection was made before it: its batch unconfirmed, or
    /// refused), and the last one sent is the user's last word.
    fn requeue(&mut self, mut unconfirmed: Vec<Queued>) {
        unconfirmed.sort_by_key(|q| q.id);
        for q in unconfirmed {
            self.enqueue(q.change, q.version_before_edit);
        }
    }

    fn bump(&mut self, chat_id: &ChatId, messages_v: Option<u64>, title_v: Option<u64>, draft_v: Option<u64>) {
        if self.deleted.contains(chat_id) {
            return;
        }
        let v = self.versions.entry(chat_id.clone()).or_default();
        let max = |held: &mut Option<i64>, new: Option<u64>| {
            if let Some(new) = new.and_then(|n| i64::try_from(n).ok()) {
                *held = Some(held.map_or(new, |h| h.max(new)));
            }
        };
        max(&mut v.messages_v, messages_v);
        max(&mut v.title_v, title_v);
        max(&mut v.draft_v, draft_v);
    }

    /// Learns the versions an initial sync (complete, or one part of a caller's) tells of.
    fn learn_sync(&mut self, r: &InitialSyncResponse) {
        for id in &r.chat_ids_to_delete {
            self.versions.remove(id);
        }
        for c in &r.chats_to_add_or_update {
            let v = c.versions;
            self.bump(&c.chat_id, Some(v.messages_v), Some(v.title_v), Some(v.draft_v));
        }
    }

    /// Learns the versions a server message tells of.
    fn learn(&mut self, m: &ServerMessage) {
        match m {
            ServerMessage::InitialSyncResponse(r) => self.learn_sync(r),
            ServerMessage::DraftUpdateConfirmed(c) => self.bump(&c.chat_id, None, None, Some(c.draft_v)),
            ServerMessage::ChatDraftUpdated(c) => self.bump(&c.chat_id, None, None, Some(c.versions.draft_v)),
            ServerMessage::DraftDeleteReceipt(c) => self.bump(&c.chat_id, None, None, c.draft_v),
            ServerMessage::DraftDeleted(c) => self.bump(&c.chat_id, None, None, Some(c.draft_v)),
            ServerMessage::ChatTitleUpdated(c) => self.bump(&c.chat_id, None, Some(c.versions.title_v), None),
            ServerMessage::ChatMessageConfirmed(c) => self.bump(&c.chat_id, Some(c.new_messages_v), None, None),
            ServerMessage::ChatMessageAdded(c) => self.bump(&c.chat_id, Some(c.versions.messages_v), None, None),
            ServerMessage::ChatDeleted(c) => {
                self.versions.remove(&c.chat_id);
                self.deleted.insert(c.chat_id.clone());
                self.queue.retain(|q| q.change.chat_id() != &c.chat_id);
                self.outbox.retain(|(chat, _)| chat != &c.chat_id);
            }
            ServerMessage::OfflineSyncComplete(c) => {
                for r in &c.results {
                    let chat = r.chat_id.as_deref().and_then(|id| ChatId::new(id).ok());
                    if let (Some(chat), Some(v)) = (chat, r.versions) {
                        self.bump(&chat, Some(v.messages_v), Some(v.title_v), Some(v.draft_v));
                    }
                }
            }
            _ => {}
        }
    }
}

enum Command {
    Change(Change),
    Message(ChatId, NewMessage),
    Request(ClientMessage, oneshot::Sender<Result<Vec<Incoming>, ClientError>>),
    Token(String),
    Close,
}

/// A chatsync connection that reconnects by itself (see the module documentation).
pub struct ReconnectingClient {
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::Receiver<Event>,
    shared: Arc<Mutex<Shared>>,
}

impl ReconnectingClient {
    /// Starts connecting to `url` (e.g. `ws://127.0.0.1:8080/v1/ws`) in a background task.
    pub fn start(url: &str, options: ConnectOptions, reconnect: ReconnectOptions) -> ReconnectingClient {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::channel(reconnect.event_capacity.max(1));
        let shared = Arc::new(Mutex::new(Shared { options, ..Shared::default() }));
        let task = Task {
            url: url.to_owned(),
            reconnect,
            shared: shared.clone(),
            commands: command_rx,
            events: event_tx,
            backlog: VecDeque::new(),
            failures: 0,
            synced: false,
        };
        tokio::spawn(task.run());
        ReconnectingClient { commands, events, shared }
    }

    /// The next event; `None` once the client has stopped and every event was taken. Take them
    /// steadily: while [`ReconnectOptions::event_capacity`] events wait, the connection is not read.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Changes a title or a draft: sent at once when connected, queued for the next connection otherwise.
    pub fn change(&self, change: Change) {
        let _ = self.commands.send(Command::Change(change));
    }

    /// Adds a chat message: sent at once when connected, and again after each reconnection until the server
    /// confirms it.
    pub fn send_message(&self, chat_id: ChatId, message: NewMessage) {
        let _ = self.commands.send(Command::Message(chat_id, message));
    }

    /// Sends `message` on the current connection and returns every message carrying its `request_id`, the
    /// final reply last (several for a reply in parts, or for `sync_offline_changes` with its broadcasts).
    /// [`ClientError::Closed`] when not connected or when the connection drops first (nothing is retried).
    pub async fn request(&self, message: ClientMessage) -> Result<Vec<Incoming>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Request(message, tx)).map_err(|_| ClientError::Closed(None))?;
        rx.await.unwrap_or(Err(ClientError::Closed(None)))
    }

    /// Replaces the token used from the next connection on (after `Token expired`, for example). When
    /// that connection turns out to be another user's, the changes and messages queued before this call,
    /// and the versions held, are dropped (never sent as the new user's); what is made after it goes out
    /// as the new user's. (Of two calls before that connection, the last one marks the boundary: what was
    /// made between them is dropped too.) The current connection, if any, stays its user's: to switch
    /// users while connected, start a new client.
    pub fn set_token(&self, token: &str) {
        // Through the task, in order with the caller's changes and messages: what was made before this
        // call is told apart from what was made after it.
        let _ = self.commands.send(Command::Token(token.to_owned()));
    }

    /// The events waiting to be taken with [`ReconnectingClient::next_event`] (at most
    /// [`ReconnectOptions::event_capacity`]).
    pub fn buffered_events(&self) -> usize {
        self.events.len()
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.lock().connected
    }

    /// The changes waiting for a connection.
    pub fn queued_changes(&self) -> usize {
        self.lock().queue.len()
    }

    /// The chat messages not yet confirmed.
    pub fn unconfirmed_messages(&self) -> usize {
        self.lock().outbox.len()
    }

    /// The versions the client holds, per chat (what its next `initial_sync_request` will send).
    pub fn versions(&self) -> BTreeMap<ChatId, ClientVersions> {
        self.lock().versions.clone()
    }

    /// Stops: closes the connection (waiting at most 2 s for the server's answer), and ends the event
    /// stream after a last [`Event::Disconnected`].
    pub fn close(&self) {
        let _ = self.commands.send(Command::Close);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The changes at the head of `queue` that one `sync_offline_changes` can carry: at most `max_changes`,
/// in one frame of `max_frame_bytes` (past it the server closes with 1009, as it would on every attempt).
/// Empty when the first change alone does not fit.
fn offline_batch(queue: &[Queued], max_changes: usize, max_frame_bytes: usize, request_id: &str) -> Vec<Value> {
    let empty = ClientMessage::SyncOfflineChanges(SyncOfflineChanges { changes: Vec::new() });
    let mut size = empty.encode(Some(request_id)).len();
    let mut changes = Vec::new();
    for q in queue.iter().take(max_changes) {
        let change = q.change.offline(q.version_before_edit, q.id);
        // The change and a comma.
        size += change.to_string().len() + 1;
        if size > max_frame_bytes {
            break;
        }
        changes.push(change);
    }
    changes
}

/// The least `max_frame_bytes` a chatsync server can be configured with.
const MIN_FRAME_BYTES: u32 = 1024;

/// The limits a connection keeps to: the greeting's, except where a value is one no chatsync server
/// announces (0, or a frame smaller than [`MIN_FRAME_BYTES`]: a server that took nothing could not be
/// used at all). Such a value says nothing usable, so the protocol's default takes its place: taken as
/// it is, it would make every queued change and message "larger than a frame", dropped for good.
fn effective_limits(announced: Limits) -> Limits {
    let default = Limits::default();
    let or_default = |value: u32, least: u32, default: u32| if value < least { default } else { value };
    Limits {
        max_frame_bytes: or_default(announced.max_frame_bytes, MIN_FRAME_BYTES, default.max_frame_bytes),
        max_offline_changes: or_default(announced.max_offline_changes, 1, default.max_offline_changes),
        rate_per_sec: or_default(announced.rate_per_sec, 1, default.rate_per_sec),
        rate_burst: or_default(announced.rate_burst, 1, default.rate_burst),
        ..announced
    }
}

/// The result reported for queued changes refused with `code` without a result of the server's own:
/// one larger than a frame (refused before sending, `limit_exceeded`), or a batch the server refused as
/// a whole.
fn refused(changes: &[Queued], code: ErrorCode) -> OfflineSyncComplete {
    let results: Vec<OfflineResult> = changes
        .iter()
        .map(|q| OfflineResult {
            change_id: Some(format!("c{}", q.id)),
            chat_id: Some(q.change.chat_id().as_str().to_owned()),
            kind: Some(q.change.kind()),
            status: OfflineStatus::Error,
            code: Some(code),
            versions: None,
        })
        .collect();
    OfflineSyncComplete { processed: 0, conflicts: 0, errors: results.len() as u32, results }
}

/// The frames a connection has to send, and the pace they go at: a token bucket like the server's
/// (PROTOCOL.md, "Rate limit": `rate_per_sec`, `rate_burst` of the greeting), so that no frame is refused
/// `rate_limited`. After a long time offline the queued changes, the messages to re-send and the initial
/// sync are more frames than the burst: sent at once, those past it were refused, the initial sync with
/// them, and the connection was lost for it. The bucket holds half the server's burst and fills at 90%
/// of its rate: the server's bucket, full when the connection opened (before the greeting), keeps the
/// rest for frames the network delivers closer together than they were sent.
struct Outgoing {
    frames: VecDeque<String>,
    rate: f64,
    burst: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Outgoing {
    fn new(limits: &Limits) -> Outgoing {
        let burst = (f64::from(limits.rate_burst) / 2.0).floor().max(1.0);
        let rate = f64::from(limits.rate_per_sec.max(1)) * 0.9;
        Outgoing { frames: VecDeque::new(), rate, burst, tokens: burst, at: tokio::time::Instant::now() }
    }

    /// Queues a frame, sent after those queued before it.
    fn push(&mut self, frame: String) {
        self.frames.push_back(frame);
    }

    fn refill(&mut self) {
        let now = tokio::time::Instant::now();
        // Not before the end of a pause.
        if now > self.at {
            let elapsed = (now - self.at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
            self.at = now;
        }
    }

    /// After a frame refused for the rate: the server's bucket is empty, so nothing goes for `pause`, and
    /// then at the rate, from an empty bucket.
    fn pause(&mut self, pause: Duration) {
        self.refill();
        self.tokens = 0.0;
        self.at = self.at.max(tokio::time::Instant::now() + pause);
    }

    /// When the next frame may go.
    fn ready_at(&mut self) -> tokio::time::Instant {
        self.refill();
        let wait = if self.tokens >= 1.0 { 0.0 } else { (1.0 - self.tokens) / self.rate };
        self.at + Duration::from_secs_f64(wait)
    }

    /// Sends the frames the pace allows now, in order.
    async fn send_due(&mut self, client: &mut Client) -> Result<(), ClientError> {
        self.refill();
        while self.tokens >= 1.0 {
            let Some(frame) = self.frames.pop_front() else { break };
            self.tokens -= 1.0;
            client.send_text(frame).await?;
        }
        Ok(())
    }
}

/// The request id of the keepalive's `ping` (callers' requests are numbered `request-N`).
const KEEPALIVE_ID: &str = "keepalive";

/// How long closing a connection waits for the server's answer.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The most chats an `initial_sync_request` may name (PROTOCOL.md).
const MAX_SYNC_CHATS: usize = 10_000;

/// The `initial_sync_request` for the versions held, naming as many chats as fit in one frame of
/// `max_frame_bytes` (and at most [`MAX_SYNC_CHATS`]): past it the server closes with 1009, as it would
/// on every attempt, and a user with some hundreds of chats could never sync again. The server sends
/// the chats left out in full, as new; they are returned, to tell from the reply which of them are gone.
fn sync_request(
    versions: BTreeMap<ChatId, ClientVersions>,
    max_frame_bytes: usize,
    request_id: &str,
) -> (InitialSyncRequest, Vec<ChatId>) {
    let mut request = InitialSyncRequest { chat_versions: BTreeMap::new(), immediate_view_chat_id: None };
    let empty = ClientMessage::InitialSyncRequest(request.clone()).encode(Some(request_id)).len();
    let mut room = max_frame_bytes.saturating_sub(empty);
    let mut left_out = Vec::new();
    for (chat_id, v) in versions {
        // `"id":{…},`
        let id_len = serde_json::to_string(&chat_id).map_or(usize::MAX / 4, |t| t.len());
        let v_len = serde_json::to_string(&v).map_or(usize::MAX / 4, |t| t.len());
        let size = id_len + 1 + v_len + 1;
        if left_out.is_empty() && request.chat_versions.len() < MAX_SYNC_CHATS && size <= room {
            room -= size;
            request.chat_versions.insert(chat_id, v);
        } else {
            left_out.push(chat_id);
        }
    }
    (request, left_out)
}

/// After this device's change `id` of a chat's title (`title`) or draft was applied at `version`: the
/// live changes of that component made after it and still unanswered were made on top of it, so if the
/// connection drops they are re-sent (queued) from `version` at least. From the version held when they
/// were made, the server would discard them as conflicting with the device's own edit, and keep the
/// older value instead of the user's last word.
fn rebase(pending: &mut HashMap<String, Pending>, chat_id: &ChatId, title: bool, id: u64, version: u64) {
    let Ok(version) = i64::try_from(version) else { return };
    for p in pending.values_mut() {
        if let Pending::Change(later) = p {
            if later.id > id && later.change.chat_id() == chat_id && later.change.is_title() == title {
                later.version_before_edit = later.version_before_edit.max(version);
            }
        }
    }
}

/// Whether an error refuses a request for now only (a retry may succeed): the store unreachable, the
/// rate exceeded, an internal failure.
fn is_transient(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal)
}

/// Whether a close means that reconnecting cannot help.
fn is_fatal(close: &Option<(u16, String)>) -> bool {
    matches!(close, Some((1008, reason)) if reason != "Token expired" && reason != "Rate limit exceeded")
}

/// Whether the server answered the upgrade with an HTTP status that every attempt would get again: a
/// 4xx (403 for a cookie or an Origin it forbids, 404 for a wrong path), except 408 and 429, which ask
/// to come back later. A 5xx (a proxy in front of a node that restarts) is retried.
fn is_refused_upgrade(e: &ClientError) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    matches!(e, ClientError::Ws(WsError::Http(r))
        if r.status().is_client_error() && !matches!(r.status().as_u16(), 408 | 429))
}

/// What a request id stands for on the current connection.
enum Pending {
    /// A live change, put back in the queue if the connection drops first.
    Change(Queued),
    /// A chat message; leaves the outbox on confirmation, or on an error that a retry would repeat.
    Message(ChatId, chatsync_protocol::MessageId),
    /// A batch of queued changes, dropped from the queue on `offline_sync_complete` (or on an error that
    /// refuses it for good).
    Offline(Vec<Queued>),
    /// The initial sync.
    Sync(SyncState),
    /// A caller's request.
    Request(ClientMessage, Vec<Incoming>, oneshot::Sender<Result<Vec<Incoming>, ClientError>>),
    /// A caller's request whose reply came in more than `max_reply_parts` parts: failed, its remaining
    /// parts are dropped up to the last one.
    Overflowed(ClientMessage),
    /// The keepalive's `ping`: its `pong` is not surfaced.
    Keepalive,
}

/// The initial sync in flight.
struct SyncState {
    /// Its parts so far, merged.
    so_far: Option<InitialSyncResponse>,
    /// The chats held that it could not name.
    left_out: Vec<ChatId>,
    /// How many parts came.
    parts: usize,
    /// Its frame, sent again when refused for the rate.
    frame: String,
    /// How many times it was refused for the rate.
    refused: u32,
}

struct Task {
    url: String,
    reconnect: ReconnectOptions,
    shared: Arc<Mutex<Shared>>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<Event>,
    /// The events of the step in progress, not yet handed to `events` (see [`Task::deliver`]): a few
    /// per frame received, handed over before the next frame is read.
    backlog: VecDeque<Event>,
    /// Consecutive failed attempts; reset when a connection's initial sync completes.
    failures: u32,
    /// Whether the current connection's initial sync completed (its end is then no failed attempt).
    synced: bool,
}

/// How a connection ended.
enum End {
    /// The caller closed or dropped the handle.
    Closed,
    /// The connection failed.
    Lost(Option<(u16, String)>, String),
}

impl Task {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&mut self, event: Event) {
        self.backlog.push_back(event);
    }

    /// Hands the events emitted to the application, waiting while `event_capacity` of them wait for it.
    /// Used only where nothing else is to be done (the client has stopped).
    async fn deliver(&mut self) {
        while let Some(event) = self.backlog.pop_front() {
            if self.events.send(event).await.is_err() {
                // The handle was dropped: nobody will read them.
                self.backlog.clear();
            }
        }
    }

    /// Hands over as many of the events emitted as the application has room for, without waiting; the
    /// others stay in `backlog` (the session's loop hands them over as room comes, and meanwhile reads
    /// no more of the connection).
    fn hand_over(&mut self) {
        while let Some(event) = self.backlog.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => return self.backlog.push_front(event),
                // The handle was dropped: nobody will read them.
                Err(mpsc::error::TrySendError::Closed(_)) => return self.backlog.clear(),
            }
        }
    }

    async fn run(mut self) {
        self.connections().await;
        self.deliver().await;
    }

    /// Connects, and reconnects, until the client stops.
    async fn connections(&mut self) {
        loop {
            let (options, epoch) = {
                let s = self.lock();
                (s.options.clone(), s.token_epoch)
            };
            let url = self.url.clone();
            let timeout = self.reconnect.connect_timeout;
            let attempt = async {
                if timeout.is_zero() {
                    return Client::connect_authenticated(&url, &options).await;
                }
                match tokio::time::timeout(timeout, Client::connect_authenticated(&url, &options)).await {
                    Ok(r) => r,
                    Err(_) => Err(ClientError::Unexpected(format!("no greeting within {timeout:?}"))),
                }
            };
            let outcome = tokio::select! {
                r = attempt => r,
                _ = self.idle_until_closed() => return self.stopped(None, "closed"),
            };
            self.synced = false;
            let (close, error, refused) = match outcome {
                Ok((client, connected)) => match self.session(client, connected, epoch).await {
                    End::Closed => return self.stopped(None, "closed"),
                    End::Lost(close, error) => (close, error, false),
                },
                Err(ClientError::Closed(close)) => (close, "the server closed the connection".to_owned(), false),
                Err(e) => (None, e.to_string(), is_refused_upgrade(&e)),
            };
            // A connection whose initial sync completed was a success: its end starts a new series of
            // attempts (the first retry after the first ceiling), it is not one of them.
            let failed = !self.synced;
            if failed {
                self.failures += 1;
            }
            let exhausted = failed && self.reconnect.max_attempts.is_some_and(|max| self.failures >= max);
            if refused || is_fatal(&close) || exhausted {
                return self.emit(Event::Disconnected { close, error, retry_in: None });
            }
            let delay = self.reconnect.delay(self.failures.max(1));
            self.emit(Event::Disconnected { close, error, retry_in: Some(delay) });
            self.hand_over();
            // Commands are answered meanwhile (a request fails at once, as not connected), whether or
            // not the application takes its events.
            let sleep = tokio::time::sleep(delay);
            tokio::select! {
                _ = sleep => {}
                _ = self.idle_until_closed() => return self.stopped(None, "closed"),
            }
        }
    }

    fn stopped(&mut self, close: Option<(u16, String)>, error: &str) {
        self.emit(Event::Disconnected { close, error: error.to_owned(), retry_in: None });
    }

    /// While disconnected: queues changes and messages, fails requests; returns when the caller closes.
    async fn idle_until_closed(&mut self) {
        loop {
            match self.commands.recv().await {
                None | Some(Command::Close) => return,
                Some(Command::Change(change)) => {
                    let mut s = self.lock();
                    let held = s.held(change.chat_id(), change.is_title());
                    s.enqueue(change, held);
                }
                Some(Command::Message(chat, message)) => self.lock().outbox.push((chat, message)),
                Some(Command::Token(token)) => self.lock().set_token(token),
                Some(Command::Request(_, reply)) => {
                    let _ = reply.send(Err(ClientError::Closed(None)));
                }
            }
        }
    }

    /// One connection: sends what is queued and the initial sync, then relays until it ends.
    async fn session(&mut self, mut client: Client, connected: Connected, epoch: u64) -> End {
        let mut pending: HashMap<String, Pending> = HashMap::new();
        let mut next = 0u64;
        let mut id = |prefix: &str| {
            next += 1;
            format!("{prefix}{next}")
        };
        let connected_limits = effective_limits(connected.limits);
        let batch = connected_limits.max_offline_changes as usize;
        {
            let mut s = self.lock();
            // Another user's connection (a token of someone else given with `set_token`): what the first
            // user left unsent is never sent as this one's (a queued title would create a chat with it
            // in this user's account, a message be posted as theirs), nor are their chats' versions.
            // What was queued after the token of this connection was given is this user's.
            let mark = match &s.token_mark {
                Some(m) if m.epoch <= epoch => s.token_mark.take(),
                _ => None,
            };
            if s.user.as_ref().is_some_and(|user| *user != connected.user_id) {
                match mark {
                    Some(m) => {
                        s.queue.retain(|q| q.id > m.last_id);
                        s.outbox.retain(|(chat, msg)| !m.messages.contains(&(chat.clone(), msg.message_id.clone())));
                    }
                    None => {
                        s.queue.clear();
                        s.outbox.clear();
                    }
                }
                s.versions.clear();
                s.deleted.clear();
            }
            s.user = Some(connected.user_id.clone());
            s.connected = true;
        }
        self.emit(Event::Connected(connected));

        // Queued changes, unconfirmed messages, then the initial sync: the server handles one connection's
        // requests in order, so the sync already sees what was queued.
        let (queue, outbox, versions) = {
            let s = self.lock();
            (s.queue.clone(), s.outbox.clone(), s.versions.clone())
        };
        // Everything is sent through `out`, at the pace of the server's rate limit.
        let mut out = Outgoing::new(&connected_limits);
        let mut rest = queue.as_slice();
        while let Some(first) = rest.first() {
            let rid = id("offline-");
            let changes = offline_batch(rest, batch, connected_limits.max_frame_bytes as usize, &rid);
            if changes.is_empty() {
                // Alone larger than a frame: sent, it would close the connection (1009) on every attempt.
                self.lock().queue.retain(|q| q.id != first.id);
                self.emit(Event::OfflineSynced(refused(std::slice::from_ref(first), ErrorCode::LimitExceeded)));
                rest = &rest[1..];
                continue;
            }
            let (taken, left) = rest.split_at(changes.len());
            rest = left;
            pending.insert(rid.clone(), Pending::Offline(taken.to_vec()));
            out.push(ClientMessage::SyncOfflineChanges(SyncOfflineChanges { changes }).encode(Some(&rid)));
        }
        let max_frame = connected_limits.max_frame_bytes as usize;
        for (chat_id, message) in outbox {
            let rid = id("message-");
            self.send_message(&mut out, &mut pending, rid, chat_id, message, max_frame);
        }
        let rid = id("sync-");
        let (sync, left_out) = sync_request(versions, connected_limits.max_frame_bytes as usize, &rid);
        let frame = ClientMessage::InitialSyncRequest(sync).encode(Some(&rid));
        pending.insert(
            rid.clone(),
            Pending::Sync(SyncState { so_far: None, left_out, parts: 0, frame: frame.clone(), refused: 0 }),
        );
        out.push(frame);

        // The keepalive: a `ping` after `keepalive` without a frame, the connection dropped after as long
        // again without one. (Bounded to a year: a `Duration::MAX` meant as "never" must not overflow.)
        let keepalive = self.reconnect.keepalive.min(Duration::from_secs(365 * 24 * 3600));
        let mut quiet_until = tokio::time::Instant::now() + keepalive;
        let mut pinged = false;
        // Events waiting past this while a caller's request is in flight end the connection (below).
        let most_waiting = self.reconnect.event_capacity.max(1).saturating_mul(4);
        let end = loop {
            // The events of the last step reach the application before the next frame is read. While it
            // has no room for them, the connection is not read (backpressure), except while a caller
            // awaits a request, whose reply may be behind them (it cannot take events meanwhile: both
            // calls need the handle); then up to `most_waiting` events wait here, past which the
            // connection is dropped, failing the request (a resync follows). Commands, the pace of
            // sending and the keepalive go on either way; the time spent waiting for the application is
            // not the server's silence.
            self.hand_over();
            let backed_up = !self.backlog.is_empty();
            if backed_up && self.backlog.len() >= most_waiting {
                break End::Lost(None, format!("{} events not taken while a request waited", self.backlog.len()));
            }
            let read = !backed_up || pending.values().any(|p| matches!(p, Pending::Request(..)));
            if !read {
                (quiet_until, pinged) = (tokio::time::Instant::now() + keepalive, false);
            }
            tokio::select! {
                permit = self.events.clone().reserve_owned(), if backed_up => match permit {
                    Ok(permit) => {
                        if let Some(event) = self.backlog.pop_front() {
                            permit.send(event);
                        }
                    }
                    // The handle was dropped: nobody will read them.
                    Err(_) => self.backlog.clear(),
                },
                _ = tokio::time::sleep_until(out.ready_at()), if !out.frames.is_empty() => {
                    if let Err(e) = out.send_due(&mut client).await {
                        break End::Lost(None, e.to_string());
                    }
                }
                _ = tokio::time::sleep_until(quiet_until), if !keepalive.is_zero() && read => {
                    let now = tokio::time::Instant::now();
                    // A frame this loop never sees is a sign of life too: the WebSocket Pings of the
                    // server's heartbeat, which go on while the server works through a long request
                    // (it handles a connection's requests in order, so the `ping` waits behind it).
                    let alive_until = client.heard_at() + keepalive;
                    if alive_until > now {
                        (quiet_until, pinged) = (alive_until, false);
                        continue;
                    }
                    if pinged {
                        break End::Lost(None, format!("no frame from the server for {:?}", keepalive * 2));
                    }
                    pinged = true;
                    quiet_until = now + keepalive;
                    // One ping at a time, under one request id: its pong is never surfaced, and a
                    // server slow to answer does not get (and answer) a pile of them.
                    if !pending.contains_key(KEEPALIVE_ID) {
                        pending.insert(KEEPALIVE_ID.to_owned(), Pending::Keepalive);
                        out.push(ClientMessage::Ping(chatsync_protocol::Empty {}).encode(Some(KEEPALIVE_ID)));
                    }
                }
                incoming = client.recv_lenient(), if read => {
                    (quiet_until, pinged) = (tokio::time::Instant::now() + keepalive, false);
                    match incoming {
                        Ok(Err(Undecodable { frame, error })) => {
                            let rid = serde_json::from_str::<Value>(&frame)
                                .ok()
                                .and_then(|v| v.get("request_id")?.as_str().map(str::to_owned));
                            if rid.is_some_and(|rid| pending.contains_key(&rid)) {
                                let _ = tokio::time::timeout(CLOSE_WAIT, client.close_with(1000, "")).await;
                                break End::Lost(None, format!("undecodable server frame: {error}: {frame}"));
                            }
                            self.emit(Event::ProtocolError { frame, error });
                        }
                        Ok(Ok(m)) => if let Err(why) = self.receive(m, &mut pending, &mut out) {
                            let _ = tokio::time::timeout(CLOSE_WAIT, client.close_with(1000, "")).await;
                            break End::Lost(None, why);
                        },
                        Err(ClientError::Closed(close)) => break End::Lost(close, "the server closed the connection".into()),
                        Err(e) => break End::Lost(None, e.to_string()),
                    }
                }
                command = self.commands.recv() => {
                    match command {
                        None | Some(Command::Close) => break End::Closed,
                        Some(Command::Change(change)) => {
                            // Numbered like queued changes: a lost connection puts them back in this order.
                            let (order, held) = {
                                let mut s = self.lock();
                                // It supersedes a queued edit of its component (one refused for now,
                                // or one whose batch is unanswered): sent after it, that one would undo
                                // it, or meet it as a conflict.
                                s.queue.retain(|q| !q.change.same_component(&change));
                                s.next_id += 1;
                                (s.next_id, s.held(change.chat_id(), change.is_title()))
                            };
                            let rid = id("change-");
                            let message = change.live();
                            let sent = Queued { id: order, change, version_before_edit: held };
                            out.push(message.encode(Some(&rid)));
                            pending.insert(rid, Pending::Change(sent));
                        }
                        Some(Command::Message(chat_id, message)) => {
                            self.lock().outbox.push((chat_id.clone(), message.clone()));
                            let rid = id("message-");
                            self.send_message(&mut out, &mut pending, rid, chat_id, message, max_frame);
                        }
                        Some(Command::Token(token)) => self.lock().set_token(token),
                        Some(Command::Request(message, reply)) => {
                            let rid = id("request-");
                            out.push(message.encode(Some(&rid)));
                            pending.insert(rid, Pending::Request(message, Vec::new(), reply));
                        }
                    }
                }
            }
        };
        if matches!(end, End::Closed) {
            // Bounded: a server that never answers the close (a half-open connection, a peer that hangs
            // or floods) must not keep the client from stopping.
            let _ = tokio::time::timeout(CLOSE_WAIT, client.close()).await;
        }
        // What was in flight: live changes go back to the queue, requests fail.
        let mut s = self.lock();
        s.connected = false;
        let mut unconfirmed = Vec::new();
        for (_, p) in pending {
            match p {
                Pending::Change(q) => unconfirmed.push(q),
                Pending::Request(_, _, reply) => {
                    let _ = reply.send(Err(ClientError::Closed(None)));
                }
                Pending::Message(..)
                | Pending::Offline(_)
                | Pending::Sync(_)
                | Pending::Keepalive
                | Pending::Overflowed(_) => {}
            }
        }
        s.requeue(unconfirmed);
        end
    }

    /// Sends a chat message of the outbox with request id `rid`, unless its frame is larger than the
    /// server takes: it would close the connection (1009), and the re-sent message every following one.
    /// Such a message leaves the outbox, reported as the server reports a message it refuses (an `error`
    /// `limit_exceeded` carrying `rid`).
    fn send_message(
        &mut self,
        out: &mut Outgoing,
        pending: &mut HashMap<String, Pending>,
        rid: String,
        chat_id: ChatId,
        message: NewMessage,
        max_frame_bytes: usize,
    ) {
        let message_id = message.message_id.clone();
        let frame =
            ClientMessage::ChatMessageAdded(ChatMessageAdded { chat_id: chat_id.clone(), message }).encode(Some(&rid));
        if frame.len() > max_frame_bytes {
            self.lock().outbox.retain(|(chat, msg)| !(chat == &chat_id && msg.message_id == message_id));
            let error = ErrorPayload {
                field: Some("message".into()),
                chat_id: Some(chat_id.as_str().to_owned()),
                message_id: Some(message_id.as_str().to_owned()),
                ..ErrorPayload::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "The message's frame ({} bytes) is larger than max_frame_bytes ({max_frame_bytes}).",
                        frame.len()
                    ),
                )
            };
            self.emit(Event::Message(Incoming { message: ServerMessage::Error(error), request_id: Some(rid) }));
            return;
        }
        pending.insert(rid, Pending::Message(chat_id, message_id));
        out.push(frame);
    }

    /// Handles one server message on a live connection; `Err` (why) when the connection is of no use: its
    /// initial sync failed.
    fn receive(
        &mut self,
        m: Incoming,
        pending: &mut HashMap<String, Pending>,
        out: &mut Outgoing,
    ) -> Result<(), String> {
        // A part of the initial sync is learned with the whole, once complete: the application gets the
        // parts only then ([`Event::Synced`]), and from a sync that fails or is cut before its last part
        // never. Held before, the versions they carry would keep the next sync from sending what they
        // carried.
        let sync_part = matches!(m.message, ServerMessage::InitialSyncResponse(_))
            && m.request_id.as_ref().is_some_and(|rid| matches!(pending.get(rid), Some(Pending::Sync(_))));
        if !sync_part {
            self.lock().learn(&m.message);
        }
        let Some(rid) = m.request_id.clone() else {
            self.emit(Event::Message(m));
            return Ok(());
        };
        let Some(p) = pending.remove(&rid) else {
            self.emit(Event::Message(m));
            return Ok(());
        };
        let is_error = matches!(m.message, ServerMessage::Error(_) | ServerMessage::InitialSyncError(_));
        match p {
            Pending::Keepalive => {}
            Pending::Change(q) => {
                let written = match (&q.change, &m.message) {
                    (Change::Title { .. }, ServerMessage::ChatTitleUpdated(c)) => Some(c.versions.title_v),
                    (Change::Draft { .. }, ServerMessage::DraftUpdateConfirmed(c)) => Some(c.draft_v),
                    (Change::DeleteDraft { .. }, ServerMessage::DraftDeleteReceipt(c)) => c.draft_v,
                    _ => None,
                };
                if let Some(version) = written {
                    rebase(pending, q.change.chat_id(), q.change.is_title(), q.id, version);
                }
                // Not taken for now (the store unreachable, the rate exceeded): kept for the next
                // connection like a lost reply, unless a later edit of that component is on its way.
                if matches!(&m.message, ServerMessage::Error(e) if is_transient(e.code)) {
                    let superseded = pending.values().any(|p| {
                        matches!(p, Pending::Change(later) if later.id > q.id && later.change.same_component(&q.change))
                    });
                    if !superseded {
                        self.lock().requeue(vec![q]);
                    }
                }
                self.emit(Event::Message(m));
            }
            Pending::Message(chat_id, message_id) => {
                let settled = match &m.message {
                    ServerMessage::ChatMessageConfirmed(_) => true,
                    // Refused for good (too large, another user's chat…): re-sending would repeat it.
                    ServerMessage::Error(e) => !is_transient(e.code),
                    _ => false,
                };
                if settled {
                    self.lock().outbox.retain(|(chat, msg)| !(chat == &chat_id && msg.message_id == message_id));
                }
                self.emit(Event::Message(m));
            }
            Pending::Offline(batch) => match m.message {
                ServerMessage::OfflineSyncComplete(done) => {
                    let ids: HashSet<u64> = batch.iter().map(|q| q.id).collect();
                    for r in done.results.iter().filter(|r| r.status == OfflineStatus::Applied) {
                        let id = r.change_id.as_deref().and_then(|c| c.strip_prefix('c')?.parse::<u64>().ok());
                        let chat = r.chat_id.as_deref().and_then(|c| ChatId::new(c).ok());
                        if let (Some(id), Some(chat), Some(kind), Some(v)) = (id, chat, r.kind, r.versions) {
                            if ids.contains(&id) {
                                let title = kind == OfflineChangeType::Title;
                                rebase(pending, &chat, title, id, if title { v.title_v } else { v.draft_v });
                            }
                        }
                    }
                    self.lock().queue.retain(|q| !ids.contains(&q.id));
                    self.emit(Event::OfflineSynced(done));
                }
                // Refused as a whole with an error a retry would repeat (a malformed or oversized batch):
                // sent again on every connection, it would be refused again, forever. Its changes leave
                // the queue, each reported as refused with that code, as the server reports one change.
                ServerMessage::Error(ref e) if !is_transient(e.code) => {
                    let code = e.code;
                    self.lock().queue.retain(|q| !batch.iter().any(|b| b.id == q.id));
                    self.emit(Event::Message(m));
                    self.emit(Event::OfflineSynced(refused(&batch, code)));
                }
                // Refused for now: the changes stay queued for the next connection.
                _ if is_error => self.emit(Event::Message(m)),
                // The broadcasts of applied changes come first, with the same request id.
                _ => {
                    pending.insert(rid, Pending::Offline(batch));
                    self.emit(Event::Message(m));
                }
            },
            Pending::Sync(sync) => match m.message {
                ServerMessage::InitialSyncResponse(part) => {
                    let SyncState { so_far, left_out, parts, frame, refused } = sync;
                    let parts = parts + 1;
                    if part.more && parts >= self.reconnect.max_reply_parts {
                        return Err(format!(
                            "the initial sync failed: its reply came in more than {parts} parts (max_reply_parts)"
                        ));
                    }
                    let merged = match so_far {
                        None => part,
                        Some(mut all) => {
                            all.chat_ids_to_delete.extend(part.chat_ids_to_delete);
                            all.chats_to_add_or_update.extend(part.chats_to_add_or_update);
                            all.active_streams.extend(part.active_streams);
                            all.server_chat_order = part.server_chat_order;
                            all.sync_completed_at = part.sync_completed_at;
                            all.more = part.more;
                            all
                        }
                    };
                    if merged.more {
                        let so_far = Some(merged);
                        pending.insert(rid, Pending::Sync(SyncState { so_far, left_out, parts, frame, refused }));
                    } else {
                        // A chat the request could not name is sent in full if it exists, and not named
                        // as deleted if it does not: gone is what the complete chat order lacks.
                        let mut merged = merged;
                        let order: HashSet<&ChatId> = merged.server_chat_order.iter().collect();
                        let gone: Vec<ChatId> = left_out.into_iter().filter(|id| !order.contains(id)).collect();
                        let mut s = self.lock();
                        s.learn_sync(&merged);
                        for id in &gone {
                            s.versions.remove(id);
                        }
                        drop(s);
                        merged.chat_ids_to_delete.extend(gone);
                        self.failures = 0;
                        self.synced = true;
                        self.emit(Event::Synced(merged));
                    }
                }
                ServerMessage::InitialSyncError(InitialSyncError { code, ref message })
                | ServerMessage::Error(ErrorPayload { code, ref message, .. }) => {
                    // Dropped for the rate (the server charges a frame when it reads it: those sent while it
                    // worked on a long request come to it together): the rate refills as time passes, so
                    // the sync goes again on this connection after a pause growing with each refusal, as
                    // the TypeScript SDK's steps do (a new connection would only cost a connect more).
                    if code == ErrorCode::RateLimited && sync.so_far.is_none() && sync.refused < MAX_SYNC_REFUSALS {
                        let refused = sync.refused + 1;
                        out.pause(self.reconnect.delay(refused));
                        out.push(sync.frame.clone());
                        pending.insert(rid, Pending::Sync(SyncState { refused, ..sync }));
                        self.emit(Event::Message(m));
                        return Ok(());
                    }
                    let why = format!("the initial sync failed: {code:?} ({message})");
                    self.emit(Event::Message(m));
                    return Err(why);
                }
                // Not the sync's reply (a buggy server's frame): the sync still waits for it.
                _ => {
                    pending.insert(rid, Pending::Sync(sync));
                    self.emit(Event::Message(m));
                }
            },
            Pending::Request(message, mut parts, reply) => {
                let more = !ends_reply(&message, &m.message);
                parts.push(m);
                if !more {
                    let _ = reply.send(Ok(parts));
                } else if parts.len() >= self.reconnect.max_reply_parts {
                    let why = format!("the reply to {rid} came in more than {} parts (max_reply_parts)", parts.len());
                    let _ = reply.send(Err(ClientError::Unexpected(why)));
                    pending.insert(rid, Pending::Overflowed(message));
                } else {
                    pending.insert(rid, Pending::Request(message, parts, reply));
                }
            }
            Pending::Overflowed(message) => {
                if !ends_reply(&message, &m.message) {
                    pending.insert(rid, Pending::Overflowed(message));
                }
            }
        }
        Ok(())
    }
}

/// How many times one connection sends its initial sync again after a `rate_limited` refusal; the next
/// refusal ends the connection as a failed attempt (a server, or a proxy, that refuses it every time
/// would otherwise hold the client there for ever, out of reach of `max_attempts`).
const MAX_SYNC_REFUSALS: u32 = 8;

/// Whether `m`, a frame carrying the `request_id` of a caller's `request`, is the last of its reply: a
/// part that says `more: false`, an `error`, an `offline_sync_complete`, or any other single reply (for a
/// `sync_offline_changes`, the changes' broadcasts come before its `offline_sync_complete`).
fn ends_reply(request: &ClientMessage, m: &ServerMessage) -> bool {
    match m {
        ServerMessage::InitialSyncResponse(r) => !r.more,
        ServerMessage::ChatContentBatchResponse(r) => !r.more,
        ServerMessage::Error(_) | ServerMessage::OfflineSyncComplete(_) => true,
        _ => !matches!(request, ClientMessage::SyncOfflineChanges(_)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_below_the_ceiling() {
        let o = ReconnectOptions {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            ..ReconnectOptions::default()
        };
        assert_eq!(o.ceiling(1), Duration::from_millis(100));
        assert_eq!(o.ceiling(2), Duration::from_millis(200));
        assert_eq!(o.ceiling(4), Duration::from_millis(800));
        assert_eq!(o.ceiling(5), Duration::from_secs(1));
        assert_eq!(o.ceiling(u32::MAX), Duration::from_secs(1));
        for attempt in 1..40 {
            assert!(o.delay(attempt) <= o.ceiling(attempt));
        }
        let distinct: std::collections::BTreeSet<Duration> = (0..50).map(|_| o.delay(10)).collect();
        assert!(distinct.len() > 1, "the delay is jittered");
    }

    #[test]
    fn a_later_change_of_a_component_replaces_the_queued_one() {
        let chat = ChatId::new("c1").unwrap();
        let mut s = Shared::default();
        s.enqueue(Change::Title { chat_id: chat.clone(), title: "a".into() }, 3);
        s.enqueue(Change::Draft { chat_id: chat.clone(), draft_json: None }, 1);
        s.enqueue(Change::Title { chat_id: chat.clone(), title: "b".into() }, 3);
        s.enqueue(Change::DeleteDraft { chat_id: chat.clone() }, 1);
        let kinds: Vec<&Change> = s.queue.iter().map(|q| &q.change).collect();
        assert_eq!(
            kinds,
            [
                &Change::Title { chat_id: chat.clone(), title: "b".into() },
                &Change::DeleteDraft { chat_id: chat.clone() }
            ]
        );
        // Live changes a lost connection left unconfirmed were made after what is queued: they replace it,
        // the last one sent winning, whatever order they are handed back in.
        let other = ChatId::new("c2").unwrap();
        let live = |id, chat_id: &ChatId, title: &str| Queued {
            id,
            change: Change::Title { chat_id: chat_id.clone(), title: title.into() },
            version_before_edit: 2,
        };
        s.requeue(vec![live(101, &chat, "newest"), live(100, &chat, "newer"), live(102, &other, "x")]);
        let titles: Vec<&Change> = s.queue.iter().filter(|q| q.change.is_title()).map(|q| &q.change).collect();
        assert_eq!(
            titles,
            [
                &Change::Title { chat_id: chat.clone(), title: "newest".into() },
                &Change::Title { chat_id: other, title: "x".into() }
            ]
        );
        assert_eq!(s.queue.len(), 3);
    }

    #[test]
    fn the_initial_sync_names_what_fits_in_a_frame_and_returns_the_rest() {
        let v = ClientVersions { messages_v: Some(12), title_v: Some(3), draft_v: Some(4) };
        let versions: BTreeMap<ChatId, ClientVersions> =
            (0..500).map(|i| (ChatId::new(format!("chat-{i:03}")).unwrap(), v)).collect();
        let (request, left_out) = sync_request(versions.clone(), 4096, "sync-9");
        let named = request.chat_versions.len();
        let frame = ClientMessage::InitialSyncRequest(request).encode(Some("sync-9"));
        assert!(frame.len() <= 4096 && frame.len() > 4096 - 100, "{}", frame.len());
        assert_eq!(named + left_out.len(), 500);
        let (all, none) = sync_request(versions, 1 << 20, "sync-9");
        assert_eq!((all.chat_versions.len(), none.len()), (500, 0));
    }

    #[test]
    fn only_curable_closes_are_retried() {
        assert!(is_fatal(&Some((1008, "Invalid session".into()))));
        assert!(is_fatal(&Some((1008, "Session revoked".into()))));
        assert!(!is_fatal(&Some((1008, "Token expired".into()))));
        assert!(!is_fatal(&Some((1001, "Server shutting down".into()))));
        assert!(!is_fatal(&Some((1013, "Slow consumer".into()))));
        assert!(!is_fatal(&None));
    }
}
