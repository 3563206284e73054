//! Opening and reading bench connections: loopback-only targets, client sockets bound to one of
//! several `127.0.0.x` source addresses (to get past the per-address ephemeral port limit), small
//! tungstenite buffers, the `connected` greeting, a ramped opener and a generic frame reader that
//! tells closes the bench asked for (a reconnect) from closes it did not.
//!
//! Frames are read as plain JSON (`type`, `request_id`, `payload.code`), not as the typed protocol,
//! so that the bench drives chatsync and peers whose greetings differ (e.g. without `limits`).

use crate::tokens::Credential;
use anyhow::{bail, Context, Result};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use indicatif::ProgressBar;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;
/// The write half of a connection.
pub type Sink = SplitSink<Ws, Message>;

/// Where to connect: a `ws://` URL whose host is a loopback address.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// The resolved loopback socket address.
    pub addr: SocketAddr,
}

impl Target {
    /// Parses `ws://HOST:PORT/PATH`; refuses anything that is not loopback (127.0.0.0/8, ::1, localhost).
    pub fn parse(url: &str) -> Result<Target> {
        let rest = url.strip_prefix("ws://").context("the URL must start with ws:// (the bench does not do TLS)")?;
        let authority = rest.split('/').next().unwrap_or_default();
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {authority}"))?
            .find(|a| a.ip().is_loopback())
            .with_context(|| {
                format!("{authority} is not a loopback address: the bench only targets 127.0.0.0/8 or ::1")
            })?;
        Ok(Target { url: url.to_owned(), addr })
    }
}

/// What the `connected` greeting told us (fields a peer may omit are optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Greeting {
    /// `payload.connection_id`.
    pub connection_id: Option<String>,
    /// `payload.user_id`.
    pub user_id: Option<String>,
    /// `payload.limits.rate_per_sec`.
    pub rate_per_sec: Option<u32>,
    /// `payload.limits.rate_burst`.
    pub rate_burst: Option<u32>,
}

impl Greeting {
    /// Reads a `connected` frame; `None` if the frame is not one.
    pub fn from_frame(text: &str) -> Option<Greeting> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        if v.get("type")?.as_str()? != "connected" {
            return None;
        }
        let p = v.get("payload");
        let s = |k: &str| p.and_then(|p| p.get(k)).and_then(|x| x.as_str()).map(str::to_owned);
        let limit = |k: &str| {
            p.and_then(|p| p.get("limits"))
                .and_then(|l| l.get(k))
                .and_then(|x| x.as_u64())
                .map(|n| n.min(u32::MAX as u64) as u32)
        };
        Some(Greeting {
            connection_id: s("connection_id"),
            user_id: s("user_id"),
            rate_per_sec: limit("rate_per_sec"),
            rate_burst: limit("rate_burst"),
        })
    }
}

/// The envelope fields the bench looks at; everything else in the frame is skipped unparsed.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    /// Wire `type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Echoed `request_id`, if any.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Only `payload.code` (errors) is read.
    #[serde(default)]
    pub payload: Option<PayloadPeek>,
}

/// `payload.code` of an `error` / `initial_sync_error`.
#[derive(Debug, Deserialize)]
pub struct PayloadPeek {
    /// Error code.
    #[serde(default)]
    pub code: Option<String>,
}

impl Envelope {
    /// Parses the envelope of a server frame.
    pub fn parse(text: &str) -> Option<Envelope> {
        serde_json::from_str(text).ok()
    }

    /// The error code, for `error` frames.
    pub fn error_code(&self) -> Option<&str> {
        self.payload.as_ref().and_then(|p| p.code.as_deref())
    }
}

/// How the bench connects.
pub struct Connector {
    /// The servers (cluster nodes); connection slot `i` goes to `targets[i % len]`.
    targets: Vec<Target>,
    sources: Vec<IpAddr>,
    ws_config: WebSocketConfig,
    timeout: Duration,
    next_source: AtomicUsize,
}

/// A failed connection attempt, as a short label for counting ("timeout", "close 1008 Invalid session", …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure(pub String);

impl Connector {
    /// `source_addrs` client addresses 127.0.0.1..=127.0.0.N (IPv4 targets only), `buffer` bytes of
    /// tungstenite read/write buffer per connection, `timeout` for TCP + upgrade + greeting.
    /// With several `targets` (the nodes of a cluster), connection slot `i` goes to `targets[i % len]`,
    /// so consecutive devices of a user land on different nodes.
    pub fn new(targets: Vec<Target>, source_addrs: u8, buffer: usize, timeout: Duration) -> Connector {
        let sources = if targets.iter().all(|t| t.addr.is_ipv4()) {
            (1..=source_addrs.max(1)).map(|x| IpAddr::V4(Ipv4Addr::new(127, 0, 0, x))).collect()
        } else {
            Vec::new()
        };
        let ws_config =
            WebSocketConfig::default().read_buffer_size(buffer).write_buffer_size(0).max_write_buffer_size(usize::MAX);
        Connector { targets, sources, ws_config, timeout, next_source: AtomicUsize::new(0) }
    }

    /// Connects, upgrades with `Authorization: Bearer` and `X-Device-Id`, and waits for `connected`.
    /// Returns the socket, the greeting and the time all that took.
    /// `slot` picks the target (see [`Connector::new`]).
    pub async fn connect(&self, cred: &Credential, slot: usize) -> Result<(Ws, Greeting, Duration), ConnectFailure> {
        let start = Instant::now();
        let target = &self.targets[slot % self.targets.len()];
        match tokio::time::timeout(self.timeout, self.connect_inner(target, cred)).await {
            Ok(Ok((ws, g))) => Ok((ws, g, start.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnectFailure("timeout".into())),
        }
    }

    async fn connect_inner(&self, target: &Target, cred: &Credential) -> Result<(Ws, Greeting), ConnectFailure> {
        let fail = |s: String| ConnectFailure(s);
        let socket = if target.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
            .map_err(|e| fail(format!("socket: {}", e.kind())))?;
        if !self.sources.is_empty() {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            socket.bind(SocketAddr::new(self.sources[i], 0)).map_err(|e| fail(format!("bind: {}", e.kind())))?;
        }
        let stream = socket.connect(target.addr).await.map_err(|e| fail(format!("tcp connect: {}", e.kind())))?;
        let _ = stream.set_nodelay(true);
        let mut request = target.url.as_str().into_client_request().map_err(|e| fail(format!("request: {e}")))?;
        let h = request.headers_mut();
        let value = |s: &str| HeaderValue::from_str(s).map_err(|_| fail("bad header value in tokens file".into()));
        h.insert("authorization", value(&format!("Bearer {}", cred.token))?);
        h.insert("x-device-id", value(&cred.device_id)?);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(self.ws_config))
            .await
            .map_err(|e| fail(ws_error_label(&e)))?;
        loop {
            match ws.next().await {
                None => return Err(fail("eof before greeting".into())),
                Some(Err(e)) => return Err(fail(ws_error_label(&e))),
                Some(Ok(Message::Text(t))) => {
                    return match Greeting::from_frame(t.as_str()) {
                        Some(g) => Ok((ws, g)),
                        None => Err(fail(format!(
                            "unexpected first frame {}",
                            Envelope::parse(t.as_str()).map(|e| e.kind).unwrap_or_else(|| "(not json)".into())
                        ))),
                    };
                }
                Some(Ok(Message::Close(f))) => return Err(fail(close_label(f.as_ref()))),
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// "close CODE REASON" (or "close (no frame)").
pub fn close_label(frame: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) => format!("close {} {}", u16::from(f.code), f.reason.as_str()).trim_end().to_owned(),
        None => "close (no frame)".into(),
    }
}

fn ws_error_label(e: &WsError) -> String {
    match e {
        WsError::Http(r) => format!("http {}", r.status().as_u16()),
        WsError::Io(io) => format!("io: {}", io.kind()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "connection closed".into(),
        WsError::Protocol(p) => format!("protocol: {p}"),
        other => format!("ws: {other}"),
    }
}

/// Called by a connection's reader for every text frame.
pub trait FrameHandler: Send + Sync + 'static {
    /// `conn` is the connection's index in the list given to [`open_many`]; `at` the receive time.
    fn on_text(&self, conn: usize, text: &str, at: Instant);
}

/// A handler that ignores every frame (idle connections).
pub struct Ignore;

impl FrameHandler for Ignore {
    fn on_text(&self, _: usize, _: &str, _: Instant) {}
}

/// Counts of how connections ended while the bench still wanted them (label → count).
#[derive(Default)]
pub struct CloseLog {
    closes: Mutex<BTreeMap<String, u64>>,
    open: AtomicUsize,
    bench_closed: AtomicU64,
}

impl CloseLog {
    /// Connections currently open.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections that ended after the bench closed them itself (see [`Conn::closing`]); not in [`CloseLog::closes`].
    pub fn bench_closed(&self) -> u64 {
        self.bench_closed.load(Ordering::Relaxed)
    }

    /// Closes and errors seen (before the bench cancelled).
    pub fn closes(&self) -> BTreeMap<String, u64> {
        self.closes.lock().expect("close log lock").clone()
    }
}

/// Reads frames until the server closes or `cancel` fires; answers Pings (tungstenite does, while reading).
/// An end after `closing` was set is counted as closed by the bench, not as a close.
async fn read_loop<H: FrameHandler>(
    conn: usize,
    mut stream: SplitStream<Ws>,
    handler: Arc<H>,
    cancel: CancellationToken,
    log: Arc<CloseLog>,
    closing: Arc<AtomicBool>,
) {
    log.open.fetch_add(1, Ordering::Relaxed);
    let ended = loop {
        tokio::select! {
            _ = cancel.cancelled() => break None,
            m = stream.next() => match m {
                None => break Some("eof".to_owned()),
                Some(Ok(Message::Text(t))) => handler.on_text(conn, t.as_str(), Instant::now()),
                Some(Ok(Message::Close(f))) => break Some(close_label(f.as_ref())),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(ws_error_label(&e)),
            }
        }
    };
    log.open.fetch_sub(1, Ordering::Relaxed);
    if let Some(label) = ended {
        if closing.load(Ordering::Acquire) {
            log.bench_closed.fetch_add(1, Ordering::Relaxed);
        } else {
            *log.closes.lock().expect("close log lock").entry(label).or_default() += 1;
        }
    }
}

/// Splits a greeted connection, starts its reader (index `conn`, frames to `handler`) and returns the
/// write half and the flag to set before the bench closes it.
pub fn attach<H: FrameHandler>(
    conn: usize,
    ws: Ws,
    handler: Arc<H>,
    cancel: CancellationToken,
    log: Arc<CloseLog>,
) -> (Sink, Arc<AtomicBool>) {
    let (sink, stream) = ws.split();
    let closing = Arc::new(AtomicBool::new(false));
    tokio::spawn(read_loop(conn, stream, handler, cancel, log, closing.clone()));
    (sink, closing)
}

/// Closes a connection on purpose: marks it as closed by the bench (so its reader does not count
/// the end as a close), then sends a Close frame, bounded by `within`.
pub async fn close_on_purpose(mut sink: Sink, closing: &AtomicBool, within: Duration) {
    closing.store(true, Ordering::Release);
    let _ = tokio::time::timeout(within, async {
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
    })
    .await;
}

/// An open connection: its write half, what the greeting said, and how long connect + auth took.
pub struct Conn {
    /// Write half (the read half is owned by the reader task).
    pub sink: Sink,
    /// The greeting.
    pub greeting: Greeting,
    /// Connect + upgrade + greeting.
    pub latency: Duration,
    /// When the greeting arrived.
    pub at: Instant,
    /// Set before the bench closes the connection on purpose (see [`close_on_purpose`]).
    pub closing: Arc<AtomicBool>,
}

/// The outcome of [`open_many`].
pub struct Opened {
    /// One entry per credential, in order; `None` where the connection failed.
    pub conns: Vec<Option<Conn>>,
    /// Failure label → count.
    pub failures: BTreeMap<String, u64>,
    /// Shared with the readers: how connections ended later.
    pub log: Arc<CloseLog>,
}

impl Opened {
    /// Number of connections that opened.
    pub fn ok(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }
}

/// Opens one connection per credential, starting `ramp_per_sec` per second, and starts a reader
/// task on each as soon as it is greeted (so Pings are answered from the first second). Readers
/// stop when `cancel` fires.
pub async fn open_many<H: FrameHandler>(
    connector: Arc<Connector>,
    creds: &[Credential],
    ramp_per_sec: f64,
    handler: Arc<H>,
    cancel: CancellationToken,
    progress: &ProgressBar,
) -> Opened {
    let log = Arc::new(CloseLog::default());
    let start = Instant::now();
    let mut tasks: Vec<JoinHandle<Result<Conn, ConnectFailure>>> = Vec::with_capacity(creds.len());
    let rate = ramp_per_sec.max(0.001);
    for (i, cred) in creds.iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        if cancel.is_cancelled() {
            break;
        }
        let (connector, cred, handler, cancel, log, progress) =
            (connector.clone(), cred.clone(), handler.clone(), cancel.clone(), log.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let r = connector.connect(&cred, i).await;
            progress.inc(1);
            let (ws, greeting, latency) = r?;
            let (sink, closing) = attach(i, ws, handler, cancel, log);
            Ok(Conn { sink, greeting, latency, at: Instant::now(), closing })
        }));
    }
    let mut conns = Vec::with_capacity(creds.len());
    let mut failures = BTreeMap::new();
    for t in tasks {
        match t.await {
            Ok(Ok(c)) => conns.push(Some(c)),
            Ok(Err(ConnectFailure(label))) => {
                *failures.entry(label).or_default() += 1;
                conns.push(None);
            }
            Err(e) => {
                *failures.entry(format!("task: {e}")).or_default() += 1;
                conns.push(None);
            }
        }
    }
    conns.resize_with(creds.len(), || None);
    Opened { conns, failures, log }
}

/// Sends a Close frame on every sink (bounded by `within`), so the server sees polite closes.
pub async fn close_all(sinks: impl IntoIterator<Item = Sink>, within: Duration) {
    let closing = futures_util::future::join_all(sinks.into_iter().map(|mut s| async move {
        let _ = s.send(Message::Close(None)).await;
        let _ = s.close().await;
    }));
    let _ = tokio::time::timeout(within, closing).await;
}

/// Checks the URL, for use by clap-level validation.
pub fn check_url(url: &str) -> Result<()> {
    if url.contains('?') {
        bail!("the URL must not carry a query: tokens go in headers");
    }
    Target::parse(url).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_is_loopback_only() {
        assert_eq!(Target::parse("ws://127.0.0.1:8080/v1/ws").unwrap().addr, "127.0.0.1:8080".parse().unwrap());
        assert!(Target::parse("ws://localhost:9/v1/ws").unwrap().addr.ip().is_loopback());
        assert!(Target::parse("ws://10.0.0.1:8080/v1/ws").is_err());
        assert!(Target::parse("wss://127.0.0.1/v1/ws").is_err());
    }

    #[test]
    fn greeting_with_and_without_limits() {
        let g = Greeting::from_frame(
            r#"{"type":"connected","payload":{"connection_id":"c1","user_id":"u0","limits":{"rate_per_sec":100,"rate_burst":200}}}"#,
        )
        .unwrap();
        assert_eq!(g.rate_per_sec, Some(100));
        assert_eq!(g.rate_burst, Some(200));
        let g = Greeting::from_frame(r#"{"type":"connected","payload":{"connection_id":"c","user_id":"u"}}"#).unwrap();
        assert_eq!(g.rate_per_sec, None);
        assert!(Greeting::from_frame(r#"{"type":"pong","payload":{}}"#).is_none());
    }

    #[test]
    fn envelope_peeks_code_and_request_id() {
        let e =
            Envelope::parse(r#"{"type":"error","payload":{"code":"rate_limited","message":"x"},"request_id":"r1"}"#)
                .unwrap();
        assert_eq!(e.kind, "error");
        assert_eq!(e.request_id.as_deref(), Some("r1"));
        assert_eq!(e.error_code(), Some("rate_limited"));
    }
}
