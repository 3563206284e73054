//! An async Rust client for the chatsync protocol: connect with a token and device, send typed
//! messages, receive typed events, and match replies to requests by `request_id`.
//!
//! Used by the integration tests, the CLI client and the bench. [`Client`] does no retries or reconnects:
//! callers decide what a dropped connection means. [`ReconnectingClient`] (`reconnect.rs`) does: backoff
//! with jitter, an offline queue sent as `sync_offline_changes` on reconnect, then an initial sync.

pub mod reconnect;

use chatsync_protocol::{decode_server, ClientMessage, Connected, Incoming, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use chatsync_protocol as protocol;
pub use reconnect::{Change, Event, ReconnectOptions, ReconnectingClient};
pub use tokio_tungstenite::tungstenite;

/// Where the client puts its token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenPlacement {
    /// `Authorization: Bearer <token>`.
    #[default]
    Bearer,
    /// Cookie `auth_refresh_token=<token>`.
    Cookie,
    /// Query parameter `token=<token>`.
    Query,
}

/// How to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The session token, if any.
    pub token: Option<String>,
    /// Where to put it.
    pub token_placement: TokenPlacement,
    /// Device id sent as `X-Device-Id` (or as `device_id` in the query with `device_id_in_query`).
    pub device_id: Option<String>,
    /// Send the device id as a query parameter instead of a header.
    pub device_id_in_query: bool,
    /// Extra request headers (`User-Agent`, `Origin`, …).
    pub headers: Vec<(String, String)>,
    /// Drop the server-initiated warm-up events (`priority_chat_ready`, `cache_primed`) on receipt, for
    /// callers that do not care when the server's cache is warm.
    pub ignore_warmup_events: bool,
}

impl ConnectOptions {
    /// Bearer token and `X-Device-Id`: the usual native client.
    pub fn new(token: &str, device_id: &str) -> ConnectOptions {
        ConnectOptions { token: Some(token.to_owned()), device_id: Some(device_id.to_owned()), ..Default::default() }
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WebSocket layer failed (including an HTTP error instead of an upgrade).
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server sent a frame that is not a protocol message.
    #[error("undecodable server frame: {0}")]
    Decode(String),
    /// The connection was closed (code and reason of the close frame, if any).
    #[error("closed: {0:?}")]
    Closed(Option<(u16, String)>),
    /// The server sent something other than what was expected.
    #[error("unexpected: {0}")]
    Unexpected(String),
    /// A bad URL or header.
    #[error("request: {0}")]
    Request(String),
}

/// One connection to a chatsync server.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<Incoming>,
    next_request: u64,
    ignore_warmup_events: bool,
    /// When the last frame of any kind came from the server (a WebSocket Ping of its heartbeat, a frame
    /// skipped, too): what the reconnecting client's keepalive takes as a sign of life.
    heard_at: tokio::time::Instant,
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    /// Opens a connection to `url` (e.g. `ws://127.0.0.1:8080/v1/ws`) without waiting for `connected`.
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Client, ClientError> {
        let mut query = Vec::new();
        if let (Some(t), TokenPlacement::Query) = (&opts.token, opts.token_placement) {
            query.push(format!("token={}", percent_encode(t)));
        }
        if let (Some(d), true) = (&opts.device_id, opts.device_id_in_query) {
            query.push(format!("device_id={}", percent_encode(d)));
        }
        let url = if query.is_empty() {
            url.to_owned()
        } else {
            format!("{url}{}{}", if url.contains('?') { '&' } else { '?' }, query.join("&"))
        };
        let mut request = url.into_client_request()?;
        let headers = request.headers_mut();
        let value = |s: &str| HeaderValue::from_str(s).map_err(|e| ClientError::Request(e.to_string()));
        match (&opts.token, opts.token_placement) {
            (Some(t), TokenPlacement::Bearer) => {
                headers.insert("authorization", value(&format!("Bearer {t}"))?);
            }
            (Some(t), TokenPlacement::Cookie) => {
                headers.insert("cookie", value(&format!("auth_refresh_token={t}"))?);
            }
            _ => {}
        }
        if let (Some(d), false) = (&opts.device_id, opts.device_id_in_query) {
            headers.insert("x-device-id", value(d)?);
        }
        for (k, v) in &opts.headers {
            let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| ClientError::Request(e.to_string()))?;
            headers.insert(name, value(v)?);
        }
        let (ws, _response) = tokio_tungstenite::connect_async_with_config(request, None, true).await?;
        Ok(Client {
            ws,
            pending: VecDeque::new(),
            next_request: 0,
            ignore_warmup_events: opts.ignore_warmup_events,
            heard_at: tokio::time::Instant::now(),
        })
    }

    /// Connects and waits for the `connected` greeting.
    pub async fn connect_authenticated(url: &str, opts: &ConnectOptions) -> Result<(Client, Connected), ClientError> {
        let mut client = Client::connect(url, opts).await?;
        match client.recv().await?.message {
            ServerMessage::Connected(c) => Ok((client, c)),
            other => Err(ClientError::Unexpected(format!("expected connected, got {other:?}"))),
        }
    }

    /// Sends a typed message with an optional `request_id`.
    pub async fn send(&mut self, message: &ClientMessage, request_id: Option<&str>) -> Result<(), ClientError> {
        self.send_text(message.encode(request_id)).await
    }

    /// Sends a raw text frame (for tests of malformed input).
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), ClientError> {
        self.ws.send(Message::text(text.into())).await?;
        Ok(())
    }

    /// Sends any WebSocket message (binary frames, pings, closes).
    pub async fn send_raw(&mut self, message: Message) -> Result<(), ClientError> {
        self.ws.send(message).await?;
        Ok(())
    }

    /// Sends `message` with a fresh `request_id` and returns the reply carrying it. Other messages
    /// received meanwhile are kept for [`Client::recv`].
    pub async fn request(&mut self, message: &ClientMessage) -> Result<Incoming, ClientError> {
        self.next_request += 1;
        let id = format!("r{}", self.next_request);
        self.send(message, Some(&id)).await?;
        self.recv_reply(&id).await
    }

    /// Waits for the message carrying `request_id`, keeping others for [`Client::recv`].
    pub async fn recv_reply(&mut self, request_id: &str) -> Result<Incoming, ClientError> {
        if let Some(i) = self.pending.iter().position(|m| m.request_id.as_deref() == Some(request_id)) {
            return Ok(self.pending.remove(i).expect("index is in range"));
        }
        loop {
            let m = self.read().await?;
            if m.request_id.as_deref() == Some(request_id) {
                return Ok(m);
            }
            self.pending.push_back(m);
        }
    }

    /// The next protocol message (kept ones first). A close frame is [`ClientError::Closed`].
    pub async fn recv(&mut self) -> Result<Incoming, ClientError> {
        match self.pending.pop_front() {
            Some(m) => Ok(m),
            None => self.read().await,
        }
    }

    /// Messages received while waiting for a reply and not yet taken by [`Client::recv`].
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// The next text frame as received (no decoding; buffered messages are not included; warm-up events
    /// skipped when the client ignores them). A close frame is [`ClientError::Closed`].
    pub async fn recv_text(&mut self) -> Result<String, ClientError> {
        loop {
            match self.next_frame().await {
                None => return Err(ClientError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => {
                    if self.ignore_warmup_events && is_warmup_frame(t.as_str()) {
                        continue;
                    }
                    return Ok(t.as_str().to_owned());
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Closed(
                        frame.map(|CloseFrame { code, reason }| (code.into(), reason.to_string())),
                    ));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads until the server closes; returns the close code and reason. Protocol messages received
    /// before the close are discarded.
    pub async fn recv_close(&mut self) -> Result<(u16, String), ClientError> {
        self.pending.clear();
        loop {
            match self.read().await {
                Ok(_) => continue,
                Err(ClientError::Closed(Some(c))) => return Ok(c),
                Err(e) => return Err(e),
            }
        }
    }

    /// Like [`Client::recv_close`], and checks that the close is clean as a browser judges it
    /// (`wasClean`): after the server's close frame (which this client answers) the connection ends
    /// without an error. Fails with the error otherwise.
    pub async fn recv_clean_close(&mut self) -> Result<(u16, String), ClientError> {
        let close = self.recv_close().await?;
        self.expect_clean_end().await?;
        Ok(close)
    }

    /// Starts the closing handshake with `code` and returns the server's answering close frame, once the
    /// connection has ended cleanly. [`ClientError::Closed`]`(None)` means the server dropped the
    /// connection without answering (what a browser reports as 1006).
    pub async fn close_with(&mut self, code: u16, reason: &str) -> Result<(u16, String), ClientError> {
        let frame = CloseFrame { code: code.into(), reason: reason.to_owned().into() };
        self.ws.close(Some(frame)).await?;
        self.pending.clear();
        let answer = loop {
            match self.ws.next().await {
                None => return Err(ClientError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Close(None))) => {
                    return Err(ClientError::Unexpected("a close frame without a code".into()))
                }
                Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => break (code.into(), reason.to_string()),
                Some(Ok(_)) => continue,
            }
        };
        self.expect_clean_end().await?;
        Ok(answer)
    }

    async fn expect_clean_end(&mut self) -> Result<(), ClientError> {
        use tokio_tungstenite::tungstenite::Error as WsError;
        loop {
            match self.ws.next().await {
                None | Some(Err(WsError::ConnectionClosed)) => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let _ = self.ws.close(None).await;
        while let Some(Ok(_)) = self.ws.next().await {}
        Ok(())
    }

    async fn read(&mut self) -> Result<Incoming, ClientError> {
        self.read_or_undecodable()
            .await?
            .map_err(|Undecodable { frame, error }| ClientError::Decode(format!("{error}: {frame}")))
    }

    /// When the last frame of any kind (a WebSocket Ping included) came from the server.
    pub(crate) fn heard_at(&self) -> tokio::time::Instant {
        self.heard_at
    }

    /// The next WebSocket frame, noting when it came ([`Client::heard_at`]).
    async fn next_frame(&mut self) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
        let frame = self.ws.next().await;
        if matches!(frame, Some(Ok(_))) {
            self.heard_at = tokio::time::Instant::now();
        }
        frame
    }

    /// Like [`Client::recv`], but a text frame that is not a protocol message this client knows (a newer
    /// server's type, a malformed payload) is handed back as it is instead of failing the read.
    pub(crate) async fn recv_lenient(&mut self) -> Result<Result<Incoming, Undecodable>, ClientError> {
        match self.pending.pop_front() {
            Some(m) => Ok(Ok(m)),
            None => self.read_or_undecodable().await,
        }
    }

    async fn read_or_undecodable(&mut self) -> Result<Result<Incoming, Undecodable>, ClientError> {
        loop {
            match self.next_frame().await {
                None => return Err(ClientError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => {
                    let m = match decode_server(t.as_str()) {
                        Ok(m) => m,
                        Err(e) => return Ok(Err(Undecodable { frame: t.as_str().to_owned(), error: e.to_string() })),
                    };
                    let warmup =
                        matches!(m.message, ServerMessage::PriorityChatReady(_) | ServerMessage::CachePrimed(_));
                    if warmup && self.ignore_warmup_events {
                        continue;
                    }
                    return Ok(Ok(m));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Closed(
                        frame.map(|CloseFrame { code, reason }| (code.into(), reason.to_string())),
                    ));
                }
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// A text frame that does not decode as a server message.
pub(crate) struct Undecodable {
    /// The frame as received.
    pub(crate) frame: String,
    /// Why it does not decode.
    pub(crate) error: String,
}

/// Whether a raw frame is a warm-up event (`priority_chat_ready`, `cache_primed`).
fn is_warmup_frame(text: &str) -> bool {
    decode_server(text)
        .is_ok_and(|m| matches!(m.message, ServerMessage::PriorityChatReady(_) | ServerMessage::CachePrimed(_)))
}
