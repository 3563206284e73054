//! The Redis bus: subscription bookkeeping, ordered pipelined publishing, turns (this node's own delivery
//! of a frame run at the frame's place in the bus order), a health check (a PING every second), reconnection
//! with backoff, and the encrypted wire format of bus messages. See the module docs of `cluster`.

use crate::crypto::{Aad, SharedKey};
use crate::store::chats::{ChatRecord, MessageRecord};
use futures_util::FutureExt;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushKind, Value};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the subscriber checks that Redis still answers (a stalled Redis sends no disconnection).
const HEALTH_CHECK: Duration = Duration::from_secs(1);
/// Longest wait for a reply on the bus connection before it counts as lost (the stream registry's
/// connection waits as long: `streams/redis.rs`).
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Messages published in one pipeline at most.
const PIPELINE: usize = 256;
/// Messages waiting to be published at most; beyond it they are dropped (and counted as a gap).
const MAX_QUEUED: usize = 100_000;
/// Bytes of sealed messages waiting to be published at most (clients can send frames of 64 KiB: the
/// count alone would let a stalled link hold gigabytes); beyond it they are dropped, as past the count.
const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Messages Redis sent that wait for the subscriber at most (a node whose subscriber lags: a CPU
/// starved by other work, a handler held up); beyond it they are dropped and the node declares a gap.
pub const MAX_INCOMING: usize = 100_000;
/// Bytes of those messages at most, as for [`MAX_QUEUED_BYTES`].
pub const MAX_INCOMING_BYTES: usize = 64 << 20;
/// Longest wait for a turn (see [`Bus::publish_user_in_turn`]); the turn still runs at its place.
const TURN_TIMEOUT: Duration = Duration::from_secs(5);
/// The kind of the marker the publisher puts among the pushes after a message with a turn.
const TURN_MARKER: &str = "chatsync-turn";

/// How to reach the bus.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// `redis://…` URL.
    pub url: String,
    /// Prefix of every channel name (lets several clusters or test runs share one Redis).
    pub prefix: String,
    /// Use sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`, Redis 7+), for Redis Cluster.
    pub sharded: bool,
    /// Messages received and not yet handled at most ([`MAX_INCOMING`]; tests make it small).
    pub max_incoming: usize,
    /// Bytes of those at most ([`MAX_INCOMING_BYTES`]).
    pub max_incoming_bytes: usize,
}

/// What travels on the bus (inside the encryption).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum BusMessage {
    /// A broadcast frame for the user's connections, except connection `except` (on the origin node).
    #[serde(rename = "f")]
    Frame {
        /// The encoded frame.
        frame: String,
        /// The requesting connection (OTHERS), if any.
        except: Option<String>,
    },
    /// A write's resulting chat state, to merge into the user's cache.
    #[serde(rename = "w")]
    ChatWritten {
        /// The record the store returned.
        chat: ChatRecord,
        /// The write created the chat (`Cache::chat_written`). A node of an earlier version sends none:
        /// `false`, which costs at most a reload of a list.
        #[serde(default)]
        created: bool,
    },
    /// A chat was deleted: drop it from the cache and its key from the keyring, for good.
    #[serde(rename = "d")]
    ChatDeleted {
        /// The chat.
        chat_id: String,
    },
    /// A message was stored.
    #[serde(rename = "m")]
    MessageAdded {
        /// The chat.
        chat_id: String,
        /// The stored message.
        message: MessageRecord,
    },
    /// A write failed with its outcome unknown (it may have committed): on the user's channel, drop what
    /// is cached of the user (with a chat, a deletion's: take the chat as uncertain, see
    /// `MemoryCache::forget`); on the control channel, with a chat, forget its unwrapped key, which the
    /// store then resolves afresh. Nodes that predate it ignore it (it fails to decode).
    #[serde(rename = "x")]
    Forget {
        /// The chat whose deletion's outcome is unknown.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chat_id: Option<String>,
    },
    /// Sessions revoked: close their connections on every node (control channel).
    #[serde(rename = "r")]
    SessionsRevoked {
        /// Session ids.
        session_ids: Vec<String>,
    },
    /// The publishing node lost messages it could not publish (its queue was full, it had no connection,
    /// or a publish failed), which the other nodes, whose own connections were fine, cannot tell: every
    /// node forgets what it cached, as after a gap of its own (control channel; published first thing
    /// once the node publishes again).
    #[serde(rename = "g")]
    Resync,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    /// The node that published.
    n: String,
    /// For user channels: the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    u: Option<String>,
    m: BusMessage,
}

/// This node's own work waiting for its place in the order of what arrives from the bus.
type Turn = Box<dyn FnOnce() + Send>;

/// The turns waiting; each runs exactly once (whoever removes it runs it).
#[derive(Default)]
struct Turns {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Turn>>,
}

impl Turns {
    fn add(&self, turn: Turn) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.waiting.lock().insert(id, turn);
        id
    }

    /// Runs turn `id` unless it already ran.
    fn run(&self, id: u64) {
        let turn = self.waiting.lock().remove(&id);
        if let Some(turn) = turn {
            turn();
        }
    }

    /// Runs every waiting turn, oldest first (after a disconnection: their place is lost).
    fn run_all(&self) {
        let mut all: Vec<(u64, Turn)> = self.waiting.lock().drain().collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        for (_, turn) in all {
            turn();
        }
    }
}

/// A message waiting to be published.
struct Outgoing {
    channel: String,
    payload: Vec<u8>,
    turn: Option<u64>,
    /// Counted in `queued` (a [`BusMessage::Resync`] queued after a drop is not: it goes past the bound).
    counted: bool,
}

/// What waits in the publish queue, against its bounds ([`MAX_QUEUED`] messages, [`MAX_QUEUED_BYTES`]).
struct Backlog {
    messages: AtomicUsize,
    bytes: AtomicUsize,
    max_messages: usize,
    max_bytes: usize,
}

impl Backlog {
    fn new(max_messages: usize, max_bytes: usize) -> Backlog {
        Backlog { messages: AtomicUsize::new(0), bytes: AtomicUsize::new(0), max_messages, max_bytes }
    }

    /// Counts a message of `bytes` in, unless that would pass a bound.
    fn admit(&self, bytes: usize) -> bool {
        let messages = self.messages.fetch_add(1, Ordering::AcqRel);
        let before = self.bytes.fetch_add(bytes, Ordering::AcqRel);
        if messages >= self.max_messages || before + bytes > self.max_bytes {
            self.release(1, bytes);
            return false;
        }
        true
    }

    /// Counts messages out (taken by the publisher, or never sent).
    fn release(&self, messages: usize, bytes: usize) {
        self.messages.fetch_sub(messages, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// What Redis sent this connection and the subscriber has not handled yet, against its bounds
/// ([`BusConfig::max_incoming`], [`BusConfig::max_incoming_bytes`]). One per connection: what a closed
/// connection still counts goes with it.
struct Inbox {
    waiting: Backlog,
    /// A message was dropped and the subscriber has not declared the gap yet.
    overflowed: AtomicBool,
    /// Wakes the subscriber to declare it.
    overflow: Notify,
}

impl Inbox {
    /// The push sender of the connection: messages go to `pushes` while within the bounds; past them
    /// one is dropped, the node stops trusting its caches at once and the subscriber is woken to declare
    /// the gap. Other pushes (disconnection, subscription replies) always go through.
    fn sender(
        self: &Arc<Inbox>,
        pushes: mpsc::UnboundedSender<redis::PushInfo>,
        shared: &Shared,
    ) -> impl Fn(redis::PushInfo) -> Result<(), ()> + Send + Sync + 'static {
        let inbox = self.clone();
        let healthy = shared.healthy.clone();
        let dropped = shared.dropped_incoming.clone();
        move |push| {
            if pushes.is_closed() {
                return Err(()); // a connection the subscriber has left
            }
            if let Some(bytes) = message_bytes(&push) {
                if !inbox.waiting.admit(bytes) {
                    if pushes.is_closed() {
                        return Err(()); // left meanwhile: a later connection's health is not this one's
                    }
                    if !inbox.overflowed.swap(true, Ordering::SeqCst) {
                        healthy.store(false, Ordering::SeqCst);
                        inbox.overflow.notify_one();
                    }
                    dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::BUS_DROPPED, "direction" => "in").increment(1);
                    return Ok(());
                }
            }
            pushes.send(push).map_err(|_| ())
        }
    }

    /// Counts a message out of the inbox (the subscriber took it).
    fn taken(&self, push: &redis::PushInfo) {
        if let Some(bytes) = message_bytes(push) {
            self.waiting.release(1, bytes);
        }
    }

    /// Trusts the caches again (after the gap was declared), unless a message was dropped meanwhile:
    /// healthy is set before `overflowed` is read, and a drop sets `overflowed` before clearing healthy,
    /// so a drop racing with this leaves the node untrusting until its own gap.
    fn trust(&self, healthy: &AtomicBool) {
        healthy.store(true, Ordering::SeqCst);
        if self.overflowed.load(Ordering::SeqCst) {
            healthy.store(false, Ordering::SeqCst);
        }
    }
}

/// The size of a pushed message (the bytes its inbox bound counts), `None` for other pushes.
fn message_bytes(push: &redis::PushInfo) -> Option<usize> {
    matches!(push.kind, PushKind::Message | PushKind::SMessage)
        .then(|| push.data.iter().map(|v| if let Value::BulkString(b) = v { b.len() } else { 0 }).sum())
}

/// How often a publisher that lost messages retries its [`BusMessage::Resync`] while nothing else is
/// published (it also tries as soon as its connection is back).
const RESYNC_RETRY: Duration = Duration::from_secs(1);

/// The connection publishing and subscribing, with the sender of the channel its pushes arrive on.
#[derive(Clone)]
struct Link {
    conn: MultiplexedConnection,
    pushes: mpsc::UnboundedSender<redis::PushInfo>,
}

/// What a node does with what arrives from the bus.
#[async_trait::async_trait]
pub trait BusHandler: Send + Sync + 'static {
    /// A message for `user_id` (`None` on the control channel) from another node.
    async fn on_message(&self, user_id: Option<&str>, message: BusMessage);

    /// This node has just subscribed to `user_id`'s channel: whatever it holds of the user was kept while
    /// it was not subscribed (a subscription that outlasted its caller's wait, an old connection's entry
    /// kept across an unsubscribe and a subscribe), so messages may have been missed for that user.
    async fn on_subscribed(&self, user_id: &str);

    /// The bus was interrupted (or has just come back): messages may have been missed.
    async fn on_gap(&self);
}

enum Command {
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String),
}

/// One node's connection to the bus.
pub struct Bus {
    node: String,
    config: BusConfig,
    key: Arc<SharedKey>,
    commands: mpsc::UnboundedSender<Command>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<Backlog>,
    turns: Arc<Turns>,
    healthy: Arc<AtomicBool>,
    handler: Arc<OnceLock<Arc<dyn BusHandler>>>,
    stop: CancellationToken,
    /// A [`BusMessage::Resync`] is queued behind a dropped message and not yet taken by the publisher.
    resync_queued: Arc<AtomicBool>,
    /// Test hook: drop every message as if the queue were full ([`Bus::drop_publishes`]).
    dropping: AtomicBool,
    /// Messages received and dropped (the subscriber lagged past its bounds).
    dropped_incoming: Arc<AtomicU64>,
}

impl Bus {
    /// Starts the bus tasks (they connect, and reconnect, in the background). `key` encrypts every payload.
    pub fn start(config: BusConfig, key: SharedKey) -> anyhow::Result<Arc<Bus>> {
        // RESP3: subscriptions and publishing share one multiplexed connection; messages arrive as pushes.
        let info = redis::IntoConnectionInfo::into_connection_info(config.url.as_str())?;
        let resp3 = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(resp3))?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        let bus = Arc::new(Bus {
            node: uuid::Uuid::new_v4().simple().to_string(),
            config,
            key: Arc::new(key),
            commands,
            outgoing,
            queued: Arc::new(Backlog::new(MAX_QUEUED, MAX_QUEUED_BYTES)),
            turns: Arc::new(Turns::default()),
            healthy: Arc::new(AtomicBool::new(false)),
            handler: Arc::new(OnceLock::new()),
            stop: CancellationToken::new(),
            resync_queued: Arc::new(AtomicBool::new(false)),
            dropping: AtomicBool::new(false),
            dropped_incoming: Arc::new(AtomicU64::new(0)),
        });
        let shared = Shared {
            node: bus.node.clone(),
            config: bus.config.clone(),
            key: bus.key.clone(),
            healthy: bus.healthy.clone(),
            handler: bus.handler.clone(),
            queued: bus.queued.clone(),
            turns: bus.turns.clone(),
            connection: Arc::new(Mutex::new(None)),
            lost: Arc::new(AtomicBool::new(false)),
            resync_queued: bus.resync_queued.clone(),
            link_back: Arc::new(Notify::new()),
            dropped_incoming: bus.dropped_incoming.clone(),
        };
        // When a task ends (the bus stops), the turns it would have run run at once.
        let turns = bus.turns.clone();
        tokio::spawn(subscriber(client, shared.clone(), command_rx, bus.stop.clone()).map(move |()| turns.run_all()));
        let turns = bus.turns.clone();
        tokio::spawn(publisher(shared, outgoing_rx, bus.stop.clone()).map(move |()| turns.run_all()));
        Ok(bus)
    }

    /// Installs what handles incoming messages (once, after the node's context exists).
    pub fn set_handler(&self, handler: Arc<dyn BusHandler>) {
        let _ = self.handler.set(handler);
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// Whether the bus is connected and subscribed (what arrives can be trusted to be complete).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// How many messages from Redis this node has dropped because its subscriber lagged past
    /// [`BusConfig::max_incoming`] (each run of drops is a gap; also `chatsync_bus_dropped_total`).
    pub fn dropped_incoming(&self) -> u64 {
        self.dropped_incoming.load(Ordering::Relaxed)
    }

    /// Subscribes to `user_id`'s channel. The command is issued at once (in order with every other
    /// subscription change); the returned future resolves once Redis confirmed it (or at once while
    /// Redis is down: the subscription is made on reconnection).
    pub fn subscribe(&self, user_id: &str) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (ack, done) = oneshot::channel();
        let sent = self.commands.send(Command::Subscribe(user_id.to_owned(), ack)).is_ok();
        async move {
            if sent {
                let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
            }
        }
    }

    /// Unsubscribes from `user_id`'s channel.
    pub fn unsubscribe(&self, user_id: &str) {
        let _ = self.commands.send(Command::Unsubscribe(user_id.to_owned()));
    }

    /// Publishes `message` for `user_id`'s connections and caches on other nodes. Never waits.
    pub fn publish_user(&self, user_id: &str, message: BusMessage) {
        let channel = user_channel(&self.config.prefix, user_id);
        self.enqueue(channel, Some(user_id), message, None);
    }

    /// Publishes `message` for `user_id` as [`publish_user`](Bus::publish_user) does, and runs `turn` (this
    /// node's own delivery) at the message's place in the order of the user's channel: once Redis
    /// confirmed the message, the publisher puts a marker among the pushes of the connection that both
    /// publishes and subscribes; everything Redis sent before the confirmation (every message published
    /// on the channel before this one) is ahead of the marker, and the subscriber runs `turn` when it
    /// reaches it. When the message cannot be published (Redis down, queue full, an error) or the
    /// connection drops first, `turn` runs at once (the order is lost with the gap). Resolves once `turn`
    /// has run, or after [`TURN_TIMEOUT`] (a lagging subscriber; `turn` still runs at its place).
    pub async fn publish_user_in_turn(&self, user_id: &str, message: BusMessage, turn: impl FnOnce() + Send + 'static) {
        let (done, ran) = oneshot::channel();
        let id = self.turns.add(Box::new(move || {
            turn();
            let _ = done.send(());
        }));
        let channel = user_channel(&self.config.prefix, user_id);
        self.enqueue(channel, Some(user_id), message, Some(id));
        if tokio::time::timeout(TURN_TIMEOUT, ran).await.is_err() {
            tracing::warn!("bus: a frame waited more than 5 s for its turn (the subscriber lags)");
        }
    }

    /// Publishes a cluster-wide order on the control channel. Never waits.
    pub fn publish_control(&self, message: BusMessage) {
        let channel = control_channel(&self.config.prefix);
        self.enqueue(channel, None, message, None);
    }

    /// Test hook: while `on`, every message is dropped as if the publish queue were full.
    #[doc(hidden)]
    pub fn drop_publishes(&self, on: bool) {
        self.dropping.store(on, Ordering::Release);
    }

    fn enqueue(&self, channel: String, user: Option<&str>, message: BusMessage, turn: Option<u64>) {
        let payload = seal(&self.key, &channel, &self.node, user, message);
        let bytes = payload.len();
        if self.dropping.load(Ordering::Acquire) || !self.queued.admit(bytes) {
            tracing::warn!("bus publish queue full: dropping a message (every node resyncs behind it)");
            metrics::counter!(crate::metrics::BUS_DROPPED, "direction" => "out").increment(1);
            // Behind everything queued before the dropped message (past the bound: one at a time), so
            // that no node applies an older message after it resynced.
            if !self.resync_queued.swap(true, Ordering::AcqRel) {
                let channel = control_channel(&self.config.prefix);
                let payload = seal(&self.key, &channel, &self.node, None, BusMessage::Resync);
                let _ = self.outgoing.send(Outgoing { channel, payload, turn: None, counted: false });
            }
            if let Some(id) = turn {
                self.turns.run(id);
            }
            return;
        }
        if self.outgoing.send(Outgoing { channel, payload, turn, counted: true }).is_err() {
            self.queued.release(1, bytes);
            if let Some(id) = turn {
                self.turns.run(id);
            }
        }
    }

    /// Stops the bus tasks.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `<prefix>u:<hash>`: the user id is hashed (SHA-256, 128 bits), so channel names do not show user ids
/// to whoever watches Redis.
pub fn user_channel(prefix: &str, user_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new().chain_update(b"chatsync-bus-user:").chain_update(user_id.as_bytes()).finalize();
    format!("{prefix}u:{}", hex::encode(&digest[..16]))
}

/// `<prefix>control`.
pub fn control_channel(prefix: &str) -> String {
    format!("{prefix}control")
}

/// Encrypts a bus message for `channel` (also used by the CLI to publish revocations).
pub fn seal(key: &SharedKey, channel: &str, node: &str, user: Option<&str>, message: BusMessage) -> Vec<u8> {
    let envelope = Envelope { n: node.to_owned(), u: user.map(str::to_owned), m: message };
    let plain = zeroize::Zeroizing::new(serde_json::to_vec(&envelope).expect("bus messages serialize"));
    key.encrypt(&plain, &Aad::bus(channel))
}

/// Why a pushed message was not opened.
#[derive(Debug, PartialEq)]
enum Unopened {
    /// It does not decrypt under this cluster's key (another cluster on the same prefix, a wrong key).
    Sealed,
    /// It decrypts but is not a message this node knows: a newer node's (a rolling upgrade), or a shape
    /// this version does not read. With its kind (the tag, at most 16 characters), when it has one.
    Unknown(Option<String>),
}

/// Kinds of unknown bus messages already warned about (a warning per kind, not per message).
static UNKNOWN_KINDS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn open(key: &SharedKey, channel: &str, payload: &[u8]) -> Result<Envelope, Unopened> {
    let plain = key.decrypt(payload, &Aad::bus(channel)).map_err(|_| Unopened::Sealed)?;
    serde_json::from_slice(&plain).map_err(|_| {
        // Only the tag is read out: the rest carries the plaintext of what the message announces.
        let kind = serde_json::from_slice::<serde_json::Value>(&plain)
            .ok()
            .and_then(|v| v.get("m")?.get("k")?.as_str().filter(|k| k.len() <= 16).map(str::to_owned));
        Unopened::Unknown(kind)
    })
}

/// Publishes one message on a fresh connection (for the CLI: `sessions revoke` with `--redis-url`).
pub async fn publish_once(config: &BusConfig, key: &SharedKey, message: BusMessage) -> anyhow::Result<()> {
    let client = redis::Client::open(config.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let channel = control_channel(&config.prefix);
    let payload = seal(key, &channel, "cli", None, message);
    let verb = if config.sharded { "SPUBLISH" } else { "PUBLISH" };
    redis::cmd(verb).arg(&channel).arg(payload).exec_async(&mut conn).await?;
    Ok(())
}

#[derive(Clone)]
struct Shared {
    node: String,
    config: BusConfig,
    key: Arc<SharedKey>,
    healthy: Arc<AtomicBool>,
    handler: Arc<OnceLock<Arc<dyn BusHandler>>>,
    queued: Arc<Backlog>,
    turns: Arc<Turns>,
    connection: Arc<Mutex<Option<Link>>>,
    /// The publisher dropped messages (no connection, or a failed pipeline): its next pipeline starts
    /// with a [`BusMessage::Resync`].
    lost: Arc<AtomicBool>,
    resync_queued: Arc<AtomicBool>,
    /// Notified when the subscriber has (re)connected: a publisher that lost messages resyncs at once.
    link_back: Arc<Notify>,
    dropped_incoming: Arc<AtomicU64>,
}

impl Shared {
    async fn gap(&self) {
        if let Some(handler) = self.handler.get() {
            handler.on_gap().await;
        }
    }

    fn verbs(&self) -> (&'static str, &'static str, &'static str) {
        if self.config.sharded {
            ("SSUBSCRIBE", "SUNSUBSCRIBE", "SPUBLISH")
        } else {
            ("SUBSCRIBE", "UNSUBSCRIBE", "PUBLISH")
        }
    }
}

/// Keeps the subscriptions: connects (RESP3, pushes to a channel), subscribes to the control channel
/// and every user with connections here, applies subscribe/unsubscribe commands in order, hands what
/// arrives to the handler, and on any failure marks the bus unhealthy and starts over with backoff.
async fn subscriber(
    client: redis::Client,
    shared: Shared,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stop: CancellationToken,
) {
    let mut users: HashSet<String> = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    let (sub, unsub, _) = shared.verbs();
    loop {
        let (push_tx, mut pushes) = mpsc::unbounded_channel();
        let inbox = Arc::new(Inbox {
            waiting: Backlog::new(shared.config.max_incoming, shared.config.max_incoming_bytes),
            overflowed: AtomicBool::new(false),
            overflow: Notify::new(),
        });
        // A reply may take REPLY_TIMEOUT (not the crate's 500 ms): a failed publish runs its turns at once,
        // out of order if Redis still carries the message, so only a Redis that stopped answering should
        // fail one.
        let config = AsyncConnectionConfig::new()
            .set_push_sender(inbox.sender(push_tx.clone(), &shared))
            .set_response_timeout(Some(REPLY_TIMEOUT));
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = client.get_multiplexed_async_connection_with_config(&config) => c,
        };
        let mut conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "bus: cannot connect to Redis");
                if !wait_applying(&mut commands, &mut users, backoff, &stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // Subscribe to everything this node needs, then declare the gap over.
        let mut channels: Vec<String> = users.iter().map(|u| user_channel(&shared.config.prefix, u)).collect();
        channels.push(control_channel(&shared.config.prefix));
        let subscribed = async {
            for chunk in channels.chunks(512) {
                if shared.config.sharded {
                    // The channels of one SSUBSCRIBE must hash to one slot (CROSSSLOT otherwise): one
                    // command each, pipelined.
                    let mut pipe = redis::pipe();
                    for channel in chunk {
                        pipe.cmd(sub).arg(channel).ignore();
                    }
                    pipe.exec_async(&mut conn).await?;
                } else {
                    redis::cmd(sub).arg(chunk).exec_async(&mut conn).await?;
                }
            }
            Ok::<(), redis::RedisError>(())
        }
        .await;
        // One health check before the connection is taken as up (and the backoff reset): a Redis that
        // takes the subscriptions but fails it (a replica cut off from its master answers `-MASTERDOWN`
        // with `replica-serve-stale-data no`; an ACL without PING) was trusted for a moment, failed the
        // first check at once and was reconnected to at once, in a loop with no backoff (hundreds of
        // reconnections a second, each dropping every cache). It now waits as a failed subscription does.
        let up = match subscribed {
            Ok(()) => health_check(&mut conn).await.map_err(|e| ("bus: Redis fails the health check", e)),
            Err(e) => Err(("bus: cannot subscribe", e)),
        };
        if let Err((what, e)) = up {
            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "{what}");
            if !wait_applying(&mut commands, &mut users, backoff, &stop).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        *shared.connection.lock() = Some(Link { conn: conn.clone(), pushes: push_tx.clone() });
        shared.link_back.notify_one();
        shared.gap().await;
        inbox.trust(&shared.healthy);
        tracing::info!(users = users.len(), "bus: connected and subscribed");
        backoff = Duration::from_millis(100);
        // (Checked just now: the next check in a period.)
        let mut health = tokio::time::interval_at(tokio::time::Instant::now() + HEALTH_CHECK, HEALTH_CHECK);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The confirmations of this connection's own unsubscribes still to come, by channel: any other
        // (s)unsubscribe push is Redis dropping a subscription the node needs (see `own_unsubscribe`).
        let mut unsubscribing: HashMap<String, usize> = HashMap::new();

        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = health.tick() => {
                    if let Err(e) = health_check(&mut conn).await {
                        tracing::warn!(error = %e, "bus: Redis fails the health check");
                        break;
                    }
                }
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    let result = match command {
                        Command::Subscribe(user, ack) => {
                            let fresh = users.insert(user.clone());
                            let r = if fresh {
                                redis::cmd(sub).arg(user_channel(&shared.config.prefix, &user)).exec_async(&mut conn).await
                            } else {
                                Ok(())
                            };
                            if fresh && r.is_ok() {
                                if let Some(handler) = shared.handler.get() {
                                    handler.on_subscribed(&user).await;
                                }
                            }
                            let _ = ack.send(());
                            r
                        }
                        Command::Unsubscribe(user) => {
                            if users.remove(&user) {
                                let channel = user_channel(&shared.config.prefix, &user);
                                *unsubscribing.entry(channel.clone()).or_default() += 1;
                                redis::cmd(unsub).arg(channel).exec_async(&mut conn).await
                            } else {
                                Ok(())
                            }
                        }
                    };
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "bus: subscription change failed");
                        break;
                    }
                }
                _ = inbox.overflow.notified() => {
                    // What was dropped cannot be asked for again: as after a disconnection, the node forgets
                    // what it cached (what is still queued is newer than nothing it forgets, and is handled
                    // after). The connection stays: Redis itself was fine.
                    tracing::warn!(
                        dropped_total = shared.dropped_incoming.load(Ordering::Relaxed),
                        "bus: this node fell behind what Redis sent it and dropped messages; cached state is dropped (a gap)"
                    );
                    inbox.overflowed.store(false, Ordering::SeqCst);
                    shared.gap().await;
                    inbox.trust(&shared.healthy);
                }
                push = pushes.recv() => {
                    let Some(push) = push else { break };
                    inbox.taken(&push);
                    match push.kind {
                        PushKind::Message | PushKind::SMessage => deliver(&shared, push.data).await,
                        PushKind::Other(kind) if kind == TURN_MARKER => {
                            if let Some(Value::Int(id)) = push.data.first() {
                                shared.turns.run(*id as u64);
                            }
                        }
                        PushKind::Unsubscribe | PushKind::SUnsubscribe
                            if !own_unsubscribe(&mut unsubscribing, &push.data) =>
                        {
                            // Redis dropped a subscription and kept the connection (a shard channel's slot
                            // was moved, or its primary demoted by a failover: PING still answers): nothing
                            // more arrives on that channel, so nothing cached can be trusted. (The client
                            // may also have taken the push for the reply of a command in flight.) As after a
                            // disconnection: a new connection, every subscription again, a gap.
                            tracing::warn!("bus: Redis dropped a subscription of this node; reconnecting");
                            break;
                        }
                        PushKind::Disconnection => break,
                        _ => {}
                    }
                }
            }
        }
        shared.healthy.store(false, Ordering::Release);
        shared.connection.lock().take();
        drop(pushes);
        shared.turns.run_all();
        shared.gap().await;
        tracing::warn!("bus: connection to Redis lost; serving this node's connections only until it returns");
    }
}

/// Whether an (s)unsubscribe push (`data`: the channel, then the count left) confirms one of this
/// connection's own unsubscribes (`unsubscribing`, counted when sent), and counts it out. Any other is
/// Redis dropping a subscription by itself.
fn own_unsubscribe(unsubscribing: &mut HashMap<String, usize>, data: &[Value]) -> bool {
    let Some(Value::BulkString(channel)) = data.first() else { return false };
    let Ok(channel) = std::str::from_utf8(channel) else { return false };
    match unsubscribing.get_mut(channel) {
        Some(1) => {
            unsubscribing.remove(channel);
            true
        }
        Some(pending) => {
            *pending -= 1;
            true
        }
        None => false,
    }
}

/// Checks that Redis answers, with a PING. A stalled Redis (paused, swapping, a dead peer behind a proxy)
/// keeps the connection open and sends nothing: without this, a node would trust its caches forever.
/// A Redis loading its dataset after a restart refuses PING with `-LOADING` (for as long as the load
/// takes) while its pub/sub works: it answers, and the bus works (taken for silence, it made the bus
/// reconnect, resubscribe and drop every cache in a loop). Any other refusal (`-BUSY` with a script
/// running, when PUBLISH fails too; `-MASTERDOWN`) fails the check, as does no answer (a timeout, a
/// broken connection).
async fn health_check(conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
    match redis::cmd("PING").exec_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading) => {
            tracing::debug!("bus: Redis is loading its dataset");
            Ok(())
        }
        result => result,
    }
}

/// Sleeps `backoff` while still applying subscription commands (so the set is current on reconnect).
/// Returns `false` when the bus is stopping.
async fn wait_applying(
    commands: &mut mpsc::UnboundedReceiver<Command>,
    users: &mut HashSet<String>,
    backoff: Duration,
    stop: &CancellationToken,
) -> bool {
    let deadline = tokio::time::Instant::now() + backoff;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep_until(deadline) => return true,
            command = commands.recv() => match command {
                None => return false,
                Some(Command::Subscribe(user, ack)) => {
                    users.insert(user);
                    let _ = ack.send(());
                }
                Some(Command::Unsubscribe(user)) => {
                    users.remove(&user);
                }
            },
        }
    }
}

/// Decrypts a pushed message and hands it to the handler (messages of this node are skipped: it
/// delivered them itself).
async fn deliver(shared: &Shared, data: Vec<Value>) {
    // [channel, payload] (sharded and plain messages alike).
    let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (data.first(), data.get(1)) else {
        return;
    };
    let Ok(channel) = std::str::from_utf8(channel) else { return };
    let envelope = match open(&shared.key, channel, payload) {
        Ok(envelope) => envelope,
        Err(Unopened::Sealed) => {
            tracing::warn!("bus: a message that does not decrypt under this cluster's key was ignored");
            return;
        }
        Err(Unopened::Unknown(kind)) => {
            // Not logged with its content: it carries the plaintext of what it announces. A warning once per
            // kind (a newer node's messages come often during a rolling upgrade), then debug.
            let kind = kind.unwrap_or_else(|| "(none)".into());
            let first = {
                let mut seen = UNKNOWN_KINDS.lock().unwrap_or_else(|e| e.into_inner());
                let first = !seen.contains(&kind) && seen.len() < 32;
                if first {
                    seen.push(kind.clone());
                }
                first
            };
            if first {
                tracing::warn!(%kind, "bus: messages of a kind this node does not read are ignored (a newer node's during a rolling upgrade; else a bug)");
            } else {
                tracing::debug!(%kind, "bus: a message of a kind this node does not read was ignored");
            }
            return;
        }
    };
    if envelope.n == shared.node {
        return;
    }
    if let Some(handler) = shared.handler.get() {
        handler.on_message(envelope.u.as_deref(), envelope.m).await;
    }
}

/// Publishes queued messages in order, pipelined. While Redis is down, messages are dropped (the gap is
/// reported by this node's subscriber when it reconnects, and to the other nodes by a
/// [`BusMessage::Resync`] at the head of the next pipeline, sent as soon as the connection is back even
/// if nothing else is: their own connections may have been fine all along).
/// After a batch is confirmed, a marker for each of its turns goes into the push channel, behind every
/// push Redis sent before the confirmation; the subscriber runs the turn when it reaches the marker.
async fn publisher(shared: Shared, mut outgoing: mpsc::UnboundedReceiver<Outgoing>, stop: CancellationToken) {
    let (_, _, publish) = shared.verbs();
    let mut batch = Vec::with_capacity(PIPELINE);
    loop {
        let lost = shared.lost.load(Ordering::Acquire);
        tokio::select! {
            _ = stop.cancelled() => return,
            n = outgoing.recv_many(&mut batch, PIPELINE) => if n == 0 { return },
            // Nothing to publish, but a resync to send (the connection is back, or a retry).
            _ = shared.link_back.notified(), if lost => {}
            _ = tokio::time::sleep(RESYNC_RETRY), if lost => {}
        };
        let counted = batch.iter().filter(|m| m.counted);
        shared.queued.release(counted.clone().count(), counted.map(|m| m.payload.len()).sum());
        if batch.iter().any(|m| !m.counted) {
            shared.resync_queued.store(false, Ordering::Release);
        }
        let link = shared.connection.lock().clone();
        let Some(mut link) = link else {
            if !batch.is_empty() {
                shared.lost.store(true, Ordering::Release);
                metrics::counter!(crate::metrics::BUS_DROPPED, "direction" => "out").increment(batch.len() as u64);
            }
            batch.drain(..).filter_map(|m| m.turn).for_each(|id| shared.turns.run(id));
            continue;
        };
        if batch.is_empty() && !shared.lost.load(Ordering::Acquire) {
            continue;
        }
        let mut pipe = redis::pipe();
        if shared.lost.swap(false, Ordering::AcqRel) {
            let channel = control_channel(&shared.config.prefix);
            let payload = seal(&shared.key, &channel, &shared.node, None, BusMessage::Resync);
            pipe.cmd(publish).arg(channel).arg(payload).ignore();
        }
        let messages = batch.len() as u64;
        let mut turns = Vec::new();
        for message in batch.drain(..) {
            pipe.cmd(publish).arg(message.channel).arg(message.payload).ignore();
            turns.extend(message.turn);
        }
        let published = pipe.exec_async(&mut link.conn).await;
        if let Err(e) = &published {
            shared.lost.store(true, Ordering::Release);
            metrics::counter!(crate::metrics::BUS_DROPPED, "direction" => "out").increment(messages);
            tracing::warn!(error = %e, "bus: publish failed");
        }
        for id in turns {
            let marker =
                redis::PushInfo { kind: PushKind::Other(TURN_MARKER.to_owned()), data: vec![Value::Int(id as i64)] };
            if published.is_err() || link.pushes.send(marker).is_err() {
                shared.turns.run(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_runs_exactly_once_and_leftovers_run_oldest_first() {
        let turns = Turns::default();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let ids: Vec<u64> = (0..3)
            .map(|i| {
                let ran = ran.clone();
                turns.add(Box::new(move || ran.lock().push(i)))
            })
            .collect();
        turns.run(ids[1]);
        turns.run(ids[1]);
        turns.run_all();
        turns.run(ids[0]);
        assert_eq!(*ran.lock(), vec![1, 0, 2]);
    }

    #[test]
    fn the_publish_backlog_is_bounded_in_bytes_as_well_as_in_messages() {
        let backlog = Backlog::new(2, 100);
        assert!(backlog.admit(60));
        assert!(!backlog.admit(41), "past the bytes");
        assert!(backlog.admit(40));
        assert!(!backlog.admit(0), "past the messages");
        backlog.release(1, 60);
        assert!(backlog.admit(50), "what is counted out makes room");
        assert!(!backlog.admit(11));
        assert_eq!(backlog.bytes.load(Ordering::Acquire), 90, "a refusal leaves nothing counted");
    }

    #[test]
    fn a_sealed_message_opens_only_on_its_channel_with_the_cluster_key() {
        let key = crate::crypto::MasterKey::generate().derive("bus");
        let message = BusMessage::ChatDeleted { chat_id: "c1".into() };
        let sealed = seal(&key, "p:u:alice", "n1", Some("alice"), message.clone());
        let opened = open(&key, "p:u:alice", &sealed).unwrap();
        assert_eq!((opened.n.as_str(), opened.u.as_deref(), opened.m), ("n1", Some("alice"), message));
        assert_eq!(open(&key, "p:u:bob", &sealed).err(), Some(Unopened::Sealed), "bound to its channel");
        let other = crate::crypto::MasterKey::generate().derive("bus");
        assert_eq!(open(&other, "p:u:alice", &sealed).err(), Some(Unopened::Sealed), "another cluster's key");
        assert!(!String::from_utf8_lossy(&sealed).contains("c1"), "no plaintext on the wire");
    }

    #[test]
    fn a_message_of_an_unknown_kind_is_told_from_one_that_does_not_decrypt() {
        // A newer node's message (a rolling upgrade): it decrypts, but this node does not know its kind.
        let key = crate::crypto::MasterKey::generate().derive("bus");
        let newer = br#"{"n":"n2","u":"alice","m":{"k":"zz","secret":"plaintext"}}"#;
        let sealed = key.encrypt(newer, &Aad::bus("p:u:alice"));
        assert_eq!(open(&key, "p:u:alice", &sealed).err(), Some(Unopened::Unknown(Some("zz".into()))));
    }
}
