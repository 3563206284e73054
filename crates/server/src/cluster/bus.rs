//! The Redis bus: subscription bookkeeping, ordered pipelined publishing, reconnection with backoff,
//! and the encrypted wire format of bus messages. See the module docs of `cluster`.

use crate::crypto::{Aad, DataKey};
use crate::store::chats::{ChatRecord, MessageRecord};
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushKind, Value};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Messages published in one pipeline at most.
const PIPELINE: usize = 256;
/// Messages waiting to be published at most; beyond it they are dropped (and counted as a gap).
const MAX_QUEUED: usize = 100_000;

/// How to reach the bus.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// `redis://…` URL.
    pub url: String,
    /// Prefix of every channel name (lets several clusters or test runs share one Redis).
    pub prefix: String,
    /// Use sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`, Redis 7+), for Redis Cluster.
    pub sharded: bool,
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
    /// Sessions revoked: close their connections on every node (control channel).
    #[serde(rename = "r")]
    SessionsRevoked {
        /// Session ids.
        session_ids: Vec<String>,
    },
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

/// What a node does with what arrives from the bus.
#[async_trait::async_trait]
pub trait BusHandler: Send + Sync + 'static {
    /// A message for `user_id` (`None` on the control channel) from another node.
    async fn on_message(&self, user_id: Option<&str>, message: BusMessage);

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
    key: Arc<DataKey>,
    commands: mpsc::UnboundedSender<Command>,
    outgoing: mpsc::UnboundedSender<(String, Vec<u8>)>,
    queued: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    handler: Arc<OnceLock<Arc<dyn BusHandler>>>,
    stop: CancellationToken,
}

impl Bus {
    /// Starts the bus tasks (they connect, and reconnect, in the background). `key` encrypts every payload.
    pub fn start(config: BusConfig, key: DataKey) -> anyhow::Result<Arc<Bus>> {
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
            queued: Arc::new(AtomicUsize::new(0)),
            healthy: Arc::new(AtomicBool::new(false)),
            handler: Arc::new(OnceLock::new()),
            stop: CancellationToken::new(),
        });
        let shared = Shared {
            node: bus.node.clone(),
            config: bus.config.clone(),
            key: bus.key.clone(),
            healthy: bus.healthy.clone(),
            handler: bus.handler.clone(),
            queued: bus.queued.clone(),
            connection: Arc::new(Mutex::new(None)),
        };
        tokio::spawn(subscriber(client, shared.clone(), command_rx, bus.stop.clone()));
        tokio::spawn(publisher(shared, outgoing_rx, bus.stop.clone()));
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
        self.enqueue(channel, Some(user_id), message);
    }

    /// Publishes a cluster-wide order on the control channel. Never waits.
    pub fn publish_control(&self, message: BusMessage) {
        let channel = control_channel(&self.config.prefix);
        self.enqueue(channel, None, message);
    }

    fn enqueue(&self, channel: String, user: Option<&str>, message: BusMessage) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("bus publish queue full: dropping a message (caches are dropped when the bus recovers)");
            return;
        }
        let payload = seal(&self.key, &channel, &self.node, user, message);
        if self.outgoing.send((channel, payload)).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
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
pub fn seal(key: &DataKey, channel: &str, node: &str, user: Option<&str>, message: BusMessage) -> Vec<u8> {
    let envelope = Envelope { n: node.to_owned(), u: user.map(str::to_owned), m: message };
    let plain = zeroize::Zeroizing::new(serde_json::to_vec(&envelope).expect("bus messages serialize"));
    key.encrypt(&plain, &Aad::bus(channel))
}

fn open(key: &DataKey, channel: &str, payload: &[u8]) -> Option<Envelope> {
    let plain = key.decrypt(payload, &Aad::bus(channel)).ok()?;
    serde_json::from_slice(&plain).ok()
}

/// Publishes one message on a fresh connection (for the CLI: `sessions revoke` with `--redis-url`).
pub async fn publish_once(config: &BusConfig, key: &DataKey, message: BusMessage) -> anyhow::Result<()> {
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
    key: Arc<DataKey>,
    healthy: Arc<AtomicBool>,
    handler: Arc<OnceLock<Arc<dyn BusHandler>>>,
    queued: Arc<AtomicUsize>,
    connection: Arc<Mutex<Option<MultiplexedConnection>>>,
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
        let config = AsyncConnectionConfig::new().set_push_sender(push_tx);
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
                redis::cmd(sub).arg(chunk).exec_async(&mut conn).await?;
            }
            Ok::<(), redis::RedisError>(())
        }
        .await;
        if let Err(e) = subscribed {
            tracing::warn!(error = %e, "bus: cannot subscribe");
            if !wait_applying(&mut commands, &mut users, backoff, &stop).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        *shared.connection.lock() = Some(conn.clone());
        shared.gap().await;
        shared.healthy.store(true, Ordering::Release);
        tracing::info!(users = users.len(), "bus: connected and subscribed");
        backoff = Duration::from_millis(100);

        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
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
                            let _ = ack.send(());
                            r
                        }
                        Command::Unsubscribe(user) => {
                            if users.remove(&user) {
                                redis::cmd(unsub).arg(user_channel(&shared.config.prefix, &user)).exec_async(&mut conn).await
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
                push = pushes.recv() => {
                    let Some(push) = push else { break };
                    match push.kind {
                        PushKind::Message | PushKind::SMessage => deliver(&shared, push.data).await,
                        PushKind::Disconnection => break,
                        _ => {}
                    }
                }
            }
        }
        shared.healthy.store(false, Ordering::Release);
        shared.connection.lock().take();
        shared.gap().await;
        tracing::warn!("bus: connection to Redis lost; serving this node's connections only until it returns");
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
    let Some(envelope) = open(&shared.key, channel, payload) else {
        tracing::warn!("bus: a message that does not decrypt under this cluster's key was ignored");
        return;
    };
    if envelope.n == shared.node {
        return;
    }
    if let Some(handler) = shared.handler.get() {
        handler.on_message(envelope.u.as_deref(), envelope.m).await;
    }
}

/// Publishes queued messages in order, pipelined. While Redis is down, messages are dropped (the gap is
/// reported by the subscriber when it reconnects).
async fn publisher(shared: Shared, mut outgoing: mpsc::UnboundedReceiver<(String, Vec<u8>)>, stop: CancellationToken) {
    let (_, _, publish) = shared.verbs();
    let mut batch = Vec::with_capacity(PIPELINE);
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            n = outgoing.recv_many(&mut batch, PIPELINE) => n,
        };
        if received == 0 {
            return;
        }
        shared.queued.fetch_sub(received, Ordering::AcqRel);
        let conn = shared.connection.lock().clone();
        let Some(mut conn) = conn else {
            batch.clear();
            continue;
        };
        let mut pipe = redis::pipe();
        for (channel, payload) in batch.drain(..) {
            pipe.cmd(publish).arg(channel).arg(payload).ignore();
        }
        if let Err(e) = pipe.exec_async(&mut conn).await {
            tracing::warn!(error = %e, "bus: publish failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_message_opens_only_on_its_channel_with_the_cluster_key() {
        let key = crate::crypto::MasterKey::generate().derive("bus");
        let message = BusMessage::ChatDeleted { chat_id: "c1".into() };
        let sealed = seal(&key, "p:u:alice", "n1", Some("alice"), message.clone());
        let opened = open(&key, "p:u:alice", &sealed).unwrap();
        assert_eq!((opened.n.as_str(), opened.u.as_deref(), opened.m), ("n1", Some("alice"), message));
        assert!(open(&key, "p:u:bob", &sealed).is_none(), "bound to its channel");
        let other = crate::crypto::MasterKey::generate().derive("bus");
        assert!(open(&other, "p:u:alice", &sealed).is_none(), "another cluster's key");
        assert!(!String::from_utf8_lossy(&sealed).contains("c1"), "no plaintext on the wire");
    }
}
