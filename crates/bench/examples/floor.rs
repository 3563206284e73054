//! `floor`: the least a server can do for the bench's `fanout` and `stream` exchanges, to measure what an
//! exchange costs on a machine before any server work. On the same stack as chatsync (axum, hyper,
//! tungstenite, tokio): the WebSocket upgrade and the `connected` greeting; per `fanout` update, a reply
//! to the sender and a copy to each of the user's other connections; per `stream` chunk (`POST
//! /v1/api/users/{user}/chats/{chat}/streams/{stream}/chunks`), a 202 and a `stream_chunk` to each of the
//! user's connections. No store, no encryption, no validation, no limits: it is a measuring stick, not a
//! server (it trusts the tokens file, any API key and any frame).
//!
//! ```text
//! target/release/examples/floor --tokens tokens.jsonl --listen 127.0.0.1:9000 [--threads N] [--direct] &
//! target/release/chatsync-bench --url ws://127.0.0.1:9000/v1/ws --tokens tokens.jsonl --server-pid $! fanout
//! ```
//!
//! `--threads 1` (the default) runs one thread, as the node-ws peer does; `--direct` writes every frame
//! from the task that produced it (each connection's sink behind a lock) instead of through a writer task
//! per connection. With `--redis-url URL` it is one node of a cluster, as chatsync's nodes are: a user's
//! other connections on this node get a copy at once, and the copy is published on the user's channel
//! (`floor:<user>`, to which a node subscribes on the user's first connection), from which the other
//! nodes deliver it (one RESP3 connection per node for both, a node skipping its own messages).
//! `scripts/bench/floor.sh` runs it (`NODES=3` for a cluster).

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// This node's link to the other nodes (`--redis-url`).
struct Bus {
    /// Publishes and subscribes; messages arrive as RESP3 pushes.
    conn: redis::aio::MultiplexedConnection,
    /// Names this node in what it publishes.
    node: String,
}

type Sink = SplitSink<WebSocket, Message>;
/// user → its connections on this node (id, way out).
type Connections = HashMap<Arc<str>, Vec<(u64, Out)>>;

/// How a frame reaches a connection.
#[derive(Clone)]
enum Out {
    /// Through the connection's writer task.
    Queue(mpsc::UnboundedSender<Message>),
    /// Written by whoever produced it, under the sink's lock.
    Direct(Arc<tokio::sync::Mutex<Sink>>),
}

impl Out {
    async fn send(&self, m: Message) {
        match self {
            Out::Queue(tx) => {
                let _ = tx.send(m);
            }
            Out::Direct(sink) => {
                let _ = sink.lock().await.send(m).await;
            }
        }
    }
}

struct Floor {
    /// token → user.
    users: HashMap<String, Arc<str>>,
    /// user → its connections (id, way out).
    conns: Mutex<Connections>,
    next: AtomicU64,
    direct: bool,
    bus: Option<Bus>,
}

impl Floor {
    /// The ways out to `user`'s connections, but `except`.
    fn outs(&self, user: &str, except: Option<u64>) -> Vec<Out> {
        let conns = self.conns.lock().unwrap();
        conns
            .get(user)
            .map_or_else(Vec::new, |l| l.iter().filter(|(c, _)| Some(*c) != except).map(|(_, o)| o.clone()).collect())
    }
}

fn main() -> anyhow::Result<()> {
    let mut tokens = None;
    let mut listen = "127.0.0.1:0".to_owned();
    let mut threads = 1usize;
    let mut direct = false;
    let mut redis_url = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tokens" => tokens = args.next(),
            "--listen" => listen = args.next().unwrap_or(listen),
            "--threads" => threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(1),
            "--direct" => direct = true,
            "--redis-url" => redis_url = args.next(),
            _ => anyhow::bail!("usage: floor --tokens FILE [--listen ADDR] [--threads N] [--direct] [--redis-url URL]"),
        }
    }
    let tokens = tokens.ok_or_else(|| anyhow::anyhow!("--tokens FILE is required"))?;
    let mut users = HashMap::new();
    for line in std::fs::read_to_string(tokens)?.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let (Some(user), Some(token)) = (v["user_id"].as_str(), v["token"].as_str()) else { continue };
        users.insert(token.to_owned(), Arc::<str>::from(user));
    }
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
    let (bus, pushes) = match redis_url {
        None => (None, None),
        Some(url) => {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
            let resp3 = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
            let client = redis::Client::open(info.set_redis_settings(resp3))?;
            let (push_tx, push_rx) = mpsc::unbounded_channel();
            let config = redis::AsyncConnectionConfig::new().set_push_sender(push_tx);
            let conn = runtime.block_on(client.get_multiplexed_async_connection_with_config(&config))?;
            let node = format!("{}-{}", std::process::id(), listen);
            (Some(Bus { conn, node }), Some(push_rx))
        }
    };
    let floor = Arc::new(Floor { users, conns: Mutex::default(), next: AtomicU64::new(0), direct, bus });
    if let Some(pushes) = pushes {
        runtime.spawn(deliver_from_bus(floor.clone(), pushes));
    }
    let app = Router::new()
        .route("/v1/ws", any(upgrade))
        .route("/v1/api/users/{user}/chats/{chat}/streams", post(|| async { (StatusCode::CREATED, "{}") }))
        .route(
            "/v1/api/users/{user}/chats/{chat}/streams/{stream}",
            axum::routing::delete(|| async { StatusCode::NO_CONTENT }),
        )
        .route("/v1/api/users/{user}/chats/{chat}/streams/{stream}/chunks", post(chunk))
        .with_state(floor);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        println!("floor listening on {}", listener.local_addr()?);
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn upgrade(State(floor): State<Arc<Floor>>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let token = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(user) = token.and_then(|t| floor.users.get(t)).cloned() else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    ws.on_upgrade(move |socket| serve(floor, user, socket))
}

async fn serve(floor: Arc<Floor>, user: Arc<str>, socket: WebSocket) {
    let id = floor.next.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut source) = socket.split();
    let greeting =
        serde_json::json!({"type": "connected", "payload": {"connection_id": id.to_string(), "user_id": &*user}});
    if sink.send(Message::text(greeting.to_string())).await.is_err() {
        return;
    }
    let out = if floor.direct {
        Out::Direct(Arc::new(tokio::sync::Mutex::new(sink)))
    } else {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let _ = sink.feed(m).await;
                while let Ok(m) = rx.try_recv() {
                    let _ = sink.feed(m).await;
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
        });
        Out::Queue(tx)
    };
    let first = {
        let mut conns = floor.conns.lock().unwrap();
        let list = conns.entry(user.clone()).or_default();
        list.push((id, out.clone()));
        list.len() == 1
    };
    if let (true, Some(bus)) = (first, &floor.bus) {
        let _ = redis::cmd("SUBSCRIBE").arg(format!("floor:{user}")).exec_async(&mut bus.conn.clone()).await;
    }
    while let Some(Ok(m)) = source.next().await {
        let Message::Text(text) = m else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text.as_str()) else { continue };
        let kind = match v["type"].as_str() {
            Some("update_draft") => "chat_draft_updated",
            Some("update_title") => "chat_title_updated",
            Some(k) => k,
            None => continue,
        };
        let reply = serde_json::json!({"type": "ok", "request_id": v["request_id"]});
        out.send(Message::text(reply.to_string())).await;
        let copy = serde_json::json!({"type": kind, "payload": v["payload"]}).to_string();
        if let Some(bus) = &floor.bus {
            let (channel, published) = (format!("floor:{user}"), format!("{}\n{copy}", bus.node));
            let mut conn = bus.conn.clone();
            tokio::spawn(async move {
                let _ = redis::cmd("PUBLISH").arg(channel).arg(published).exec_async(&mut conn).await;
            });
        }
        let copy = Message::text(copy);
        for o in floor.outs(&user, Some(id)) {
            o.send(copy.clone()).await;
        }
    }
    let mut conns = floor.conns.lock().unwrap();
    if let Some(list) = conns.get_mut(&user) {
        list.retain(|(c, _)| *c != id);
    }
}

/// Delivers what other nodes published to this node's connections of the user.
async fn deliver_from_bus(floor: Arc<Floor>, mut pushes: mpsc::UnboundedReceiver<redis::PushInfo>) {
    let Some(bus) = &floor.bus else { return };
    while let Some(push) = pushes.recv().await {
        if push.kind != redis::PushKind::Message {
            continue;
        }
        let (Some(redis::Value::BulkString(channel)), Some(redis::Value::BulkString(payload))) =
            (push.data.first(), push.data.get(1))
        else {
            continue;
        };
        let (Ok(channel), Ok(payload)) = (std::str::from_utf8(channel), std::str::from_utf8(payload)) else { continue };
        let (Some(user), Some((node, frame))) = (channel.strip_prefix("floor:"), payload.split_once('\n')) else {
            continue;
        };
        if node == bus.node {
            continue;
        }
        let frame = Message::text(frame.to_owned());
        for o in floor.outs(user, None) {
            o.send(frame.clone()).await;
        }
    }
}

/// A stream chunk: 202, and a `stream_chunk` to every connection of the user.
async fn chunk(
    State(floor): State<Arc<Floor>>,
    Path((user, chat, stream)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else { return StatusCode::BAD_REQUEST };
    let frame = serde_json::json!({"type": "stream_chunk", "payload": {
        "chat_id": chat, "stream_id": stream, "seq": v["seq"], "delta": v["delta"]}});
    let frame = Message::text(frame.to_string());
    for o in floor.outs(&user, None) {
        o.send(frame.clone()).await;
    }
    StatusCode::ACCEPTED
}
