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
//! per connection. `scripts/bench/floor.sh` runs it.

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

type Sink = SplitSink<WebSocket, Message>;

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
    conns: Mutex<HashMap<Arc<str>, Vec<(u64, Out)>>>,
    next: AtomicU64,
    direct: bool,
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
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tokens" => tokens = args.next(),
            "--listen" => listen = args.next().unwrap_or(listen),
            "--threads" => threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(1),
            "--direct" => direct = true,
            _ => anyhow::bail!("usage: floor --tokens FILE [--listen ADDR] [--threads N] [--direct]"),
        }
    }
    let tokens = tokens.ok_or_else(|| anyhow::anyhow!("--tokens FILE is required"))?;
    let mut users = HashMap::new();
    for line in std::fs::read_to_string(tokens)?.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let (Some(user), Some(token)) = (v["user_id"].as_str(), v["token"].as_str()) else { continue };
        users.insert(token.to_owned(), Arc::<str>::from(user));
    }
    let floor = Arc::new(Floor { users, conns: Mutex::default(), next: AtomicU64::new(0), direct });
    let app = Router::new()
        .route("/v1/ws", any(upgrade))
        .route("/v1/api/users/{user}/chats/{chat}/streams", post(|| async { (StatusCode::CREATED, "{}") }))
        .route(
            "/v1/api/users/{user}/chats/{chat}/streams/{stream}",
            axum::routing::delete(|| async { StatusCode::NO_CONTENT }),
        )
        .route("/v1/api/users/{user}/chats/{chat}/streams/{stream}/chunks", post(chunk))
        .with_state(floor);
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
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
    floor.conns.lock().unwrap().entry(user.clone()).or_default().push((id, out.clone()));
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
        let copy = Message::text(serde_json::json!({"type": kind, "payload": v["payload"]}).to_string());
        for o in floor.outs(&user, Some(id)) {
            o.send(copy.clone()).await;
        }
    }
    let mut conns = floor.conns.lock().unwrap();
    if let Some(list) = conns.get_mut(&user) {
        list.retain(|(c, _)| *c != id);
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
