//! One WebSocket connection: authenticate, register, then a reader (this task) and a writer task.
//!
//! * The reader checks size and kind, decodes, rate-limits, dispatches to the router (one request at a
//!   time, in order) and queues the encoded outcome. Between requests it watches for shutdown.
//! * The writer drains the bounded outbox to the socket, sends a Ping every `ping_interval`, and closes
//!   the connection on heartbeat timeout or when anyone asks the outbox to close.
//!
//! Every close goes through the outbox, so queued frames are sent before the close frame (except a
//! slow consumer, whose queue is dropped). A request that panics ends its connection alone, with 1011.

use super::auth::{self, Credentials};
use super::rate::{RateLimiter, Verdict};
use crate::handlers::{self, Broadcast, Ctx, Outcome};
use crate::hub::{Audience, CloseReason, ConnHandle, Next, Outbox, Utf8Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use chatsync_protocol::{
    decode, encode, Connected, ErrorCode, ErrorPayload, InitialSyncError, RequestId, ServerMessage, PROTOCOL_NAME,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt as _, Sink, SinkExt, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long the reader keeps reading after a close was sent, waiting for the client's close frame, so
/// that unread client data does not turn our close into a TCP reset.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Authentication in progress, boxed: it is large, and done once.
type Authenticating = Pin<Box<dyn Future<Output = Result<auth::Authenticated, CloseReason>> + Send>>;

/// Runs one upgraded connection to its end.
///
/// Not an `async fn`: the future of an `async fn` keeps its arguments (here the socket, 368 bytes, and the
/// credentials) for its whole life, so every idle connection would carry them. The socket is split and the
/// authentication boxed before the connection's future is made.
pub fn run(
    ctx: Arc<Ctx>,
    socket: WebSocket,
    creds: Box<Credentials>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send {
    let (sink, stream) = socket.split();
    let authenticating: Authenticating = {
        let ctx = ctx.clone();
        Box::pin(async move { auth::authenticate(&ctx, *creds).await })
    };
    serve(ctx, sink, stream, authenticating, shutdown)
}

/// The connection after the split: authenticate, register, then read until the end. The awaits reached only
/// on the way out (refusal, closing) are boxed, so that their futures do not enlarge the one every idle
/// connection keeps.
async fn serve(
    ctx: Arc<Ctx>,
    sink: SplitSink<WebSocket, Message>,
    mut stream: SplitStream<WebSocket>,
    authenticating: Authenticating,
    shutdown: CancellationToken,
) {
    let authed = match authenticating.await {
        Ok(a) => {
            ctx.pauses.at(crate::pause::AUTHENTICATED).await;
            a
        }
        Err(reason) => {
            tracing::info!(code = reason.code, reason = reason.reason, "connection refused");
            metrics::counter!(crate::metrics::CONNECTS, "result" => reason.reason).increment(1);
            Box::pin(reject(sink, stream, reason)).await;
            return;
        }
    };
    let device_label = authed.device_label;
    let conn = Arc::new(ConnHandle {
        id: uuid::Uuid::new_v4().simple().to_string(),
        user_id: authed.user_id,
        session_id: authed.session_id,
        device_hash: authed.device_hash,
        expires_at: authed.expires_at,
        outbox: Outbox::new(ctx.config.outbox_max_bytes, ctx.config.outbox_max_messages),
    });
    let span = tracing::info_span!("conn", conn_id = %conn.id, user_id = %conn.user_id);
    async move {
        // The greeting is queued before registering, so no broadcast can overtake it. (A value of its own, so
        // that the greeting is not kept in this future, and in every connection's memory, across the awaits.)
        conn.outbox.push(greeting(&ctx, &conn));
        if let Err(refused) = ctx.hub.register(conn.clone()).await {
            tracing::warn!(%refused, "connection refused");
            let reason = refused.close_reason();
            metrics::counter!(crate::metrics::CONNECTS, "result" => reason.reason).increment(1);
            Box::pin(reject(sink, stream, reason)).await;
            return;
        }
        // A panic in the admission (a bug) refuses the connection like any refusal, with 1011: it would
        // otherwise unwind past the unregistering, and the user's and the node's slots stay taken for good.
        let admission = std::panic::AssertUnwindSafe(Box::pin(admit(
            &ctx,
            &conn,
            authed.recheck,
            authed.create_user,
            device_label,
        )));
        let refused = match admission.catch_unwind().await {
            Ok(admitted) => admitted.err(),
            Err(panic) => {
                let what = crate::logging::panic_text(&*panic);
                tracing::error!(panic = what, "a connection's admission panicked; refusing it");
                Some(CloseReason::INTERNAL)
            }
        };
        if let Some(reason) = refused {
            ctx.hub.unregister(&conn);
            metrics::counter!(crate::metrics::CONNECTS, "result" => reason.reason).increment(1);
            Box::pin(reject(sink, stream, reason)).await;
            return;
        }
        metrics::counter!(crate::metrics::CONNECTS, "result" => "ok").increment(1);
        metrics::gauge!(crate::metrics::CONNECTIONS_OPEN).increment(1.0);
        ctx.cache.attach(&conn.user_id).await;
        tracing::debug!("connected");
        let warm_ctx = ctx.clone();
        let warm_user = conn.user_id.clone();
        tokio::spawn(async move { handlers::warmup::run(&warm_ctx, &warm_user).await }.in_current_span());
        let last_seen = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut writer = tokio::spawn(write_loop(sink, conn.clone(), last_seen.clone(), started, ctx.config.clone()));

        // A request that panics (a bug) must not unwind past the cleanup below: the connection would stay
        // registered (the user's and the node's slots taken for good), counted in the gauge, its user's cache
        // entry kept, and the writer, left running, would keep the socket open and answering Pings while the
        // reply never came. It ends this connection alone, with 1011.
        // (Made where it is awaited, so that this future holds it once.)
        let reading = std::panic::AssertUnwindSafe(read_loop(
            &ctx,
            &conn,
            &mut stream,
            &mut writer,
            &last_seen,
            started,
            &shutdown,
        ));
        let writer_done = match reading.catch_unwind().await {
            Ok(writer_done) => writer_done,
            Err(panic) => {
                let what = crate::logging::panic_text(&*panic);
                tracing::error!(panic = what, "a request panicked; closing its connection");
                conn.outbox.close(CloseReason::INTERNAL);
                false
            }
        };
        ctx.hub.unregister(&conn);
        ctx.cache.detach(&conn.user_id).await;
        metrics::gauge!(crate::metrics::CONNECTIONS_OPEN).decrement(1.0);
        if !writer_done {
            if conn.outbox.is_closing() {
                // Let the writer send the close, then wait for the client's answer.
                let _ = Box::pin(tokio::time::timeout(CLOSE_GRACE, &mut writer)).await;
                Box::pin(drain(&mut stream)).await;
            }
            writer.abort();
        } else {
            Box::pin(drain(&mut stream)).await;
        }
        tracing::debug!("disconnected");
    }
    .instrument(span)
    .await
}

/// What a registered connection must pass before it is served: a session revoked between the read of it
/// and the registration (the revocation found no connection of it to close) is refused now, not left open
/// until the periodic check; a JWT that expired since it was verified is refused (`Invalid session`); then
/// the user of a JWT is created if it is new, and the device is recorded (both only for a connection a cap
/// did not refuse).
async fn admit(
    ctx: &Ctx,
    conn: &ConnHandle,
    recheck: Option<auth::Recheck>,
    create_user: bool,
    device_label: Option<String>,
) -> Result<(), CloseReason> {
    ctx.pauses.at(crate::pause::REGISTERED).await;
    let backend = |e: crate::store::StoreError| {
        tracing::warn!(error = %e, "authentication backend failure");
        CloseReason::AUTH_ERROR
    };
    if let Some(recheck) = recheck.filter(|r| r.due(ctx)) {
        if recheck.revoked(ctx).await.map_err(backend)? {
            return Err(CloseReason::SESSION_REVOKED);
        }
    }
    // A JWT that expired since it was verified (the connection held between its authentication and here)
    // is refused as any expired token is, before anything is created for it: let in, it got `connected`
    // and `Token expired` at once, its user created and its device recorded.
    if conn.expires_at.is_some_and(|at| crate::store::now_millis() >= at) {
        return Err(CloseReason::INVALID_SESSION);
    }
    if create_user {
        auth::create_user(ctx, &conn.user_id).await.map_err(backend)?;
    }
    let now = crate::store::now_millis();
    ctx.store.record_device(&conn.user_id, &conn.device_hash, device_label.as_deref(), now).await.map_err(backend)
}

/// The `connected` greeting, encoded.
fn greeting(ctx: &Ctx, conn: &ConnHandle) -> Utf8Bytes {
    let connected = ServerMessage::Connected(Connected {
        connection_id: conn.id.clone(),
        user_id: conn.user_id.clone(),
        device_hash: conn.device_hash.clone(),
        protocol: PROTOCOL_NAME.to_owned(),
        server_time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        limits: ctx.limits,
    });
    encode(&connected, None).into()
}

/// Reads and handles frames until the connection ends or a close is requested. Returns whether the
/// writer has already finished.
async fn read_loop(
    ctx: &Ctx,
    conn: &ConnHandle,
    stream: &mut SplitStream<WebSocket>,
    writer: &mut tokio::task::JoinHandle<()>,
    last_seen: &AtomicU64,
    started: Instant,
    shutdown: &CancellationToken,
) -> bool {
    let mut limiter = RateLimiter::new(ctx.limits.rate_per_sec, ctx.limits.rate_burst);
    let alive = Alive { last_seen, started };
    loop {
        if shutdown.is_cancelled() {
            conn.outbox.close(CloseReason::SHUTDOWN);
            return false;
        }
        let next = tokio::select! {
            _ = shutdown.cancelled() => {
                conn.outbox.close(CloseReason::SHUTDOWN);
                return false;
            }
            _ = &mut *writer => return true,
            next = stream.next() => next,
        };
        if conn.outbox.is_closing() {
            // Closed meanwhile (revoked, expired, a slow consumer): nothing more is handled.
            return false;
        }
        let now = Instant::now();
        alive.seen(now);
        match next {
            None => return false,
            Some(Err(e)) => {
                if let Some(reason) = read_error_close(e) {
                    conn.outbox.close(reason);
                }
                return false;
            }
            Some(Ok(Message::Text(text))) if text.len() > ctx.limits.max_frame_bytes as usize => {
                conn.outbox.close(CloseReason::TOO_BIG);
                return false;
            }
            Some(Ok(Message::Text(text))) => match limiter.check(now) {
                Verdict::Allow => {
                    alive.busy();
                    Box::pin(handle_text(ctx, conn, text.as_str())).await;
                    alive.seen(Instant::now());
                }
                Verdict::Drop => {
                    // The request id is echoed even when the rest of the frame would not have decoded, and
                    // a dropped initial sync is answered as its failures are. A decoded request's chat and
                    // message ids go with it as with any failure (PROTOCOL.md section 8, "Error context"):
                    // without a request id, that is how a client tells which of its writes was dropped.
                    let mut error =
                        ErrorPayload::new(ErrorCode::RateLimited, "Too many messages; this one was dropped.");
                    let (request_id, kind) = match decode(text.as_str()) {
                        Ok(d) => {
                            (error.chat_id, error.message_id) = handlers::context(&d.message);
                            (d.request_id, Some(d.message.wire_type()))
                        }
                        Err(e) => (e.request_id, e.message_type),
                    };
                    let message = failure(kind, error);
                    conn.outbox.push(encode(&message, request_id.as_ref().map(RequestId::as_str)).into());
                }
                Verdict::Close => {
                    tracing::info!("closing: rate limit exceeded");
                    conn.outbox.close(CloseReason::RATE_LIMIT);
                    return false;
                }
            },
            Some(Ok(Message::Binary(_))) => {
                conn.outbox.close(CloseReason::BINARY);
                return false;
            }
            Some(Ok(Message::Close(_))) => {
                // Answer the client's close (tungstenite has queued the echo of its code); the writer
                // flushes it before the TCP connection goes (RFC 6455 §5.5.1).
                metrics::counter!(crate::metrics::CLOSES, "code" => "peer").increment(1);
                conn.outbox.close_now(CloseReason::PEER_CLOSED);
                return false;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
        }
        if conn.outbox.is_closing() {
            return false;
        }
    }
}

/// Decodes one text frame, dispatches it, and queues the outcome.
async fn handle_text(ctx: &Ctx, conn: &ConnHandle, text: &str) {
    let decoded = match decode(text) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(code = %e.code, "undecodable message");
            metrics::counter!(crate::metrics::MESSAGES_IN, "type" => "undecodable").increment(1);
            metrics::counter!(crate::metrics::ERRORS, "code" => e.code.as_str()).increment(1);
            let message =
                failure(e.message_type, ErrorPayload { field: e.field, ..ErrorPayload::new(e.code, e.message) });
            conn.outbox.push_reply(encode(&message, e.request_id.as_ref().map(RequestId::as_str)).into()).await;
            return;
        }
    };
    let wire_type = decoded.message.wire_type();
    let request_id = decoded.request_id.as_ref().map(RequestId::as_str);
    let started = Instant::now();
    metrics::counter!(crate::metrics::MESSAGES_IN, "type" => wire_type).increment(1);
    let result = handlers::dispatch(ctx, conn, decoded.message)
        .instrument(tracing::debug_span!("msg", r#type = wire_type))
        .await;
    metrics::histogram!(crate::metrics::HANDLER_SECONDS, "type" => wire_type).record(started.elapsed().as_secs_f64());
    match result {
        Ok(outcome) => deliver(ctx, conn, outcome, wire_type, request_id).await,
        Err(err) => {
            conn.outbox.push_reply(encode(&failed(wire_type, err), request_id).into()).await;
        }
    }
    // Server time per request up to its last reply frame queued, lazy parts built included (what the
    // `sync` benchmark reports), at debug level.
    tracing::debug!(r#type = wire_type, elapsed_us = started.elapsed().as_micros() as u64, "handled");
}

/// Logs and counts a request's failure, and makes its answer.
fn failed(wire_type: &'static str, err: crate::error::Error) -> ServerMessage {
    match err.internal_detail() {
        Some(detail) => tracing::warn!(r#type = wire_type, code = %err.code(), detail, "request failed"),
        None => tracing::debug!(r#type = wire_type, code = %err.code(), "request rejected"),
    }
    let payload = err.into_payload();
    metrics::counter!(crate::metrics::ERRORS, "code" => payload.code.as_str()).increment(1);
    failure(Some(wire_type), payload)
}

/// The answer to a failed request of type `kind`: `error`, or `initial_sync_error` for an initial sync
/// (every failure of which is answered so, PROTOCOL.md).
fn failure(kind: Option<&str>, error: ErrorPayload) -> ServerMessage {
    if kind == Some("initial_sync_request") {
        ServerMessage::InitialSyncError(InitialSyncError { code: error.code, message: error.message })
    } else {
        ServerMessage::Error(error)
    }
}

/// Queues SELF's copies (with `request_id`) and hands the OTHERS copies to the hub, encoded once.
async fn deliver(ctx: &Ctx, conn: &ConnHandle, outcome: Outcome, wire_type: &'static str, request_id: Option<&str>) {
    for broadcast in outcome.broadcasts {
        let kind = match &broadcast {
            Broadcast::Others(m) | Broadcast::All(m) => m.wire_type(),
        };
        metrics::counter!(crate::metrics::MESSAGES_OUT, "type" => kind).increment(1);
        let (message, to_self) = match broadcast {
            Broadcast::Others(m) => (m, false),
            Broadcast::All(m) => (m, true),
        };
        // The other devices' copy goes first: this connection's own copy waits for room in its queue (at
        // the pace this client reads), and the other devices must not wait with it.
        // A change that committed just before its chat's deletion, delivered after it: the deletion's
        // `chat_deleted` has reached the other devices already, and this would show them the chat again.
        // (The requester still gets its answer below; the check leaves a window of this function's
        // duration, not the write's.)
        if !message.changed_chat().is_some_and(|chat| ctx.keys.is_deleted(chat.as_str())) {
            // A stream's end keeps its place among the stream's events from the API (in a cluster too).
            let stream_event = matches!(message, ServerMessage::StreamCancelled(_));
            let shared: Utf8Bytes = encode(&message, None).into();
            let others = Audience::Others { except: &conn.id };
            if stream_event {
                ctx.hub.deliver_in_order(&conn.user_id, others, shared).await;
            } else {
                ctx.hub.deliver(&conn.user_id, others, shared).await;
            }
        }
        if to_self {
            conn.outbox.push_reply(encode(&message, request_id).into()).await;
        }
    }
    for reply in outcome.replies {
        metrics::counter!(crate::metrics::MESSAGES_OUT, "type" => reply.wire_type()).increment(1);
        // The parts of a big reply wait for room in the outbox (the client's own reading pace) rather
        // than count as a slow consumer; each part is at most `max_reply_bytes`.
        if !conn.outbox.push_reply(encode(&reply, request_id).into()).await {
            return;
        }
    }
    // Each lazy part is made once the previous one has found room.
    let Some(mut parts) = outcome.lazy else { return };
    while let Some(part) = parts.next().await {
        let (reply, end) = match part {
            Ok(reply) => {
                metrics::counter!(crate::metrics::MESSAGES_OUT, "type" => reply.wire_type()).increment(1);
                (reply, false)
            }
            Err(err) => (failed(wire_type, err), true),
        };
        if !conn.outbox.push_reply(encode(&reply, request_id).into()).await || end {
            return;
        }
    }
}

/// When the client was last heard from, for the writer's heartbeat check.
struct Alive<'a> {
    /// Milliseconds since `started`; [`BUSY`] while the reader handles a request.
    last_seen: &'a AtomicU64,
    started: Instant,
}

/// `last_seen` while the reader handles a request: the heartbeat pauses.
const BUSY: u64 = u64::MAX;

impl Alive<'_> {
    fn seen(&self, now: Instant) {
        self.last_seen.store(now.duration_since(self.started).as_millis() as u64, Ordering::Relaxed);
    }

    /// The reader reads nothing while it handles a request, and the parts of a big reply wait for room
    /// at the pace the client reads them: the client's Pongs wait unread meanwhile, so that time is not
    /// the client's silence. (A client that stops reading is dropped by the writer's send bound instead.)
    fn busy(&self) {
        self.last_seen.store(BUSY, Ordering::Relaxed);
    }
}

/// Drains the outbox to the socket, pings, and enforces the heartbeat timeout.
/// The writer task. (Not an `async fn`, which would keep a second copy of its arguments for its whole
/// life: this future lives as long as the connection, so every byte of it counts per idle connection.)
/// However it ends (a panic too), the outbox is closed, so that a reply waiting for room and the reader see the end.
#[allow(clippy::manual_async_fn)]
fn write_loop<S: Sink<Message> + Unpin + Send>(
    mut sink: S,
    conn: Arc<ConnHandle>,
    last_seen: Arc<AtomicU64>,
    started: Instant,
    config: Arc<crate::config::Config>,
) -> impl Future<Output = ()> + Send {
    async move {
        // However the writer ends, a panic too (where the end of this block is never reached).
        let _closes = ClosesOnExit(&conn.outbox);
        let period = config.ping_interval();
        let timeout = config.heartbeat_timeout().as_millis() as u64;
        // A send that waits this long (plus a second per 4 KB of its frame, for a slow but live link)
        // has a peer that stopped reading (its TCP window stays shut): the connection is dropped without
        // a close frame, which could not get through either.
        let stall = config.heartbeat_timeout();
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let check = Duration::from_secs(config.session_check_interval_secs);
        // Only connections whose credential expires have a timer for it (boxed: most have none).
        let mut expiry = conn.expires_at.map(|at| Box::pin(tokio::time::sleep(until(at, check))));
        loop {
            let next = tokio::select! {
                next = conn.outbox.next() => next,
                _ = expired(&mut expiry), if !conn.outbox.is_closing() => {
                    let at = conn.expires_at.unwrap_or(i64::MAX);
                    if crate::store::now_millis() >= at {
                        tracing::info!("closing: token expired");
                        conn.outbox.close(CloseReason::TOKEN_EXPIRED);
                    } else if let Some(expiry) = expiry.as_mut() {
                        expiry.as_mut().reset(tokio::time::Instant::now() + until(at, check));
                    }
                    continue;
                }
                _ = ticker.tick() => {
                    let now = started.elapsed().as_millis() as u64;
                    // (Never while the reader is busy: `BUSY` is later than any `now`.)
                    if now.saturating_sub(last_seen.load(Ordering::Relaxed)) > timeout {
                        tracing::info!("closing: heartbeat timeout");
                        conn.outbox.close(CloseReason::HEARTBEAT);
                        continue;
                    }
                    if !send_within(&mut sink, Message::Ping(Default::default()), stall).await {
                        break;
                    }
                    continue;
                }
            };
            match next {
                Next::Frame(frame) => {
                    if !send_within(&mut sink, Message::Text(frame), stall).await {
                        break;
                    }
                }
                Next::Close(reason) => {
                    if tokio::time::timeout(stall, send_close(&mut sink, reason)).await.is_err() {
                        // Counted under its close code already.
                        tracing::info!("dropping the connection: the peer stopped reading");
                    }
                    break;
                }
            }
        }
    }
}

/// Closes the outbox when dropped, with 1011 (a no-op after a requested close: the first reason wins).
struct ClosesOnExit<'a>(&'a Outbox);

impl Drop for ClosesOnExit<'_> {
    fn drop(&mut self) {
        self.0.close(CloseReason::INTERNAL);
    }
}

/// Sends one message; false if the socket failed or the peer did not take it within `stall` plus a
/// second per 4 KB of the message.
async fn send_within<S: Sink<Message> + Unpin>(sink: &mut S, message: Message, stall: Duration) -> bool {
    let len = match &message {
        Message::Text(t) => t.len(),
        _ => 0,
    };
    let within = stall + Duration::from_millis(len as u64 / 4);
    match tokio::time::timeout(within, sink.send(message)).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            tracing::info!("dropping the connection: the peer stopped reading");
            metrics::counter!(crate::metrics::CLOSES, "code" => "stalled").increment(1);
            false
        }
    }
}

/// Resolves when the credential's expiry timer fires; never without one.
async fn expired(expiry: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match expiry {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// How long to sleep before looking at a credential expiring at `at` (unix milliseconds) again: until
/// then, but at most `check` (the wall clock may jump; a suspended machine's timers may run late).
fn until(at: crate::store::Millis, check: Duration) -> Duration {
    let left = u64::try_from(at.saturating_sub(crate::store::now_millis())).unwrap_or(0);
    Duration::from_millis(left).min(check)
}

async fn send_close<S: Sink<Message> + Unpin>(sink: &mut S, reason: CloseReason) {
    if reason != CloseReason::PEER_CLOSED {
        metrics::counter!(crate::metrics::CLOSES, "code" => reason.code.to_string()).increment(1);
    }
    let frame = CloseFrame { code: reason.code, reason: reason.reason.into() };
    let _ = sink.send(Message::Close(Some(frame))).await;
}

/// Closes a connection that never got registered, after the queued greeting (if any) is dropped.
async fn reject(mut sink: SplitSink<WebSocket, Message>, mut stream: SplitStream<WebSocket>, reason: CloseReason) {
    send_close(&mut sink, reason).await;
    drain(&mut stream).await;
}

/// Reads (and discards) until the client answers our close, the stream ends, or the grace period ends.
async fn drain(stream: &mut SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async { while let Some(Ok(_)) = stream.next().await {} }).await;
}

/// The close a failed read deserves (RFC 6455 §7.4.1), if the connection can still carry one: 1009 for a
/// frame over the backstop limit, 1007 for a text message that is not UTF-8, 1002 for broken framing.
fn read_error_close(e: axum::Error) -> Option<CloseReason> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match e.into_inner().downcast::<WsError>().map(|b| *b) {
        Ok(WsError::Capacity(_)) => Some(CloseReason::TOO_BIG),
        Ok(WsError::Utf8(_)) => Some(CloseReason::INVALID_UTF8),
        Ok(WsError::Protocol(_)) => Some(CloseReason::PROTOCOL_ERROR),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Arc<ConnHandle> {
        Arc::new(ConnHandle {
            id: "c".into(),
            user_id: "u".into(),
            session_id: "s".into(),
            device_hash: "d".into(),
            expires_at: None,
            outbox: Outbox::new(1 << 16, 64),
        })
    }

    /// A socket whose every send fails.
    fn broken() -> impl Sink<Message> + Unpin + Send {
        Box::pin(futures_util::sink::unfold((), |(), _: Message| async { Err::<(), _>(std::io::Error::other("gone")) }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_whose_ping_fails_closes_the_outbox() {
        // Nothing queued: the first send is the ping.
        let conn = conn();
        let last_seen = Arc::new(AtomicU64::new(0));
        write_loop(broken(), conn.clone(), last_seen, Instant::now(), Arc::default()).await;
        assert!(conn.outbox.is_closing(), "a reply waiting for room, and the reader, must see the end");
        assert!(!conn.outbox.push_reply("late".into()).await);
    }

    /// A writer that panics (a bug) closes the outbox too: the reader may be waiting in `push_reply` for
    /// room only the writer makes, and would wait for ever (the connection registered, its slots taken).
    #[tokio::test(start_paused = true)]
    async fn a_writer_that_panics_closes_the_outbox() {
        let conn = conn();
        assert!(conn.outbox.push_reply("a reply part".into()).await);
        let sink = Box::pin(futures_util::sink::unfold((), |(), _: Message| async {
            panic!("a bug in the writer");
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        }));
        let writer =
            tokio::spawn(write_loop(sink, conn.clone(), Arc::new(AtomicU64::new(0)), Instant::now(), Arc::default()));
        assert!(writer.await.unwrap_err().is_panic());
        assert!(conn.outbox.is_closing(), "a reply waiting for room must see the end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_whose_frame_fails_closes_the_outbox() {
        let conn = conn();
        assert!(conn.outbox.push("frame".into()));
        let last_seen = Arc::new(AtomicU64::new(0));
        write_loop(broken(), conn.clone(), last_seen, Instant::now(), Arc::default()).await;
        assert!(conn.outbox.is_closing());
    }
}
