//! The HTTP side: the listener's HTTP/1.1 server ([`serve`]), the `/v1/ws` route, the origin check,
//! WebSocket tuning, and the task tracking that lets shutdown wait for upgraded connections (the HTTP
//! server does not wait for them).

pub mod auth;
mod connection;
pub mod jwt;
pub mod ops;
mod rate;
pub mod web;

use crate::handlers::Ctx;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared state of the HTTP layer.
#[derive(Clone)]
pub struct Gateway {
    /// Handler context.
    pub ctx: Arc<Ctx>,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
}

/// The HTTP router: `GET /v1/ws`, and the web demo (`/`, `/sdk/…`) unless `no_web_demo`.
pub fn router(gateway: Gateway) -> Router {
    let demo = !gateway.ctx.config.no_web_demo;
    let router = Router::new().route("/v1/ws", get(upgrade)).with_state(gateway);
    if demo {
        router.merge(web::router())
    } else {
        router
    }
}

/// Serves `app` on `listener` over HTTP/1.1 until `stop` is cancelled; then stops accepting, lets each
/// connection finish its request in flight, and returns once every one has (an upgraded WebSocket is no
/// longer one of them: see [`Gateway::tracker`]).
///
/// In place of `axum::serve`, which sets hyper no timer, so that hyper's bound on the wait for a request
/// head did not apply: a peer without any credential held a socket for as long as it liked, with up to
/// 400 KB of an unfinished head buffered, and a file descriptor (the node's connection cap counts only
/// authenticated WebSockets). Here a head must arrive within `head_timeout` (`http_idle_timeout_secs`),
/// which also ends a keep-alive connection idle that long between requests (hyper has one timer for
/// both): longer than the idle timeout of common proxies (60 s), which must close an idle connection
/// first, or a request they send on it as it closes fails (a 502). HTTP/1.1 only: `axum::serve` also spoke HTTP/2 with prior knowledge (hyper's
/// HTTP/2 is compiled in for the webhook client), which no client of the protocol uses and which had no
/// such bound either.
pub async fn serve<L: axum::serve::Listener>(
    mut listener: L,
    app: Router,
    stop: CancellationToken,
    head_timeout: Duration,
) {
    let connections = TaskTracker::new();
    loop {
        let (io, _) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(head_timeout);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(io), service).with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                tracing::trace!(error = %e, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

async fn upgrade(
    State(gw): State<Gateway>,
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let config = &gw.ctx.config;
    let origin = headers.get(header::ORIGIN);
    let origin_allowed =
        origin.is_some_and(|o| o.to_str().is_ok_and(|o| config.allowed_origins.iter().any(|a| a == o)));
    if !config.allowed_origins.is_empty() && origin.is_some() && !origin_allowed {
        return (StatusCode::FORBIDDEN, "Origin not allowed").into_response();
    }
    let query = auth::WsQuery::from_pairs(query.map(|Query(pairs)| pairs).unwrap_or_default());
    // Boxed: the closure below is kept by the upgrade for the life of the connection.
    let creds = Box::new(auth::credentials(&headers, &query));
    // Cross-site WebSocket hijacking: any page can make a browser open a socket that carries the cookie,
    // so the cookie counts only from an Origin the operator allowed.
    if creds.from_cookie() && !origin_allowed {
        let why = if config.allowed_origins.is_empty() {
            "cookie authentication refused: no allowed origins are configured (--allowed-origins)"
        } else {
            "cookie authentication refused: the upgrade carries no Origin from the allow-list"
        };
        tracing::info!(reason = why, "upgrade refused");
        return (StatusCode::FORBIDDEN, "Cookie authentication needs an allowed Origin").into_response();
    }
    // tungstenite's own limit is a backstop well above the protocol limit: the connection loop checks
    // the protocol limit itself, after the frame is read, so that the stream stays in sync and the
    // 1009 close reaches the client instead of a TCP reset over the unread rest of the frame.
    let max = (config.max_frame_bytes as usize).saturating_mul(4);
    // The write buffer holds what the socket has not taken yet: a frame of the writer (at most
    // `max_reply_bytes`) and the Pongs tungstenite answers while reading. Unbounded (tungstenite's
    // default), a client that sent Pings and never read made it grow by one Pong per Ping until the
    // writer's send bound ran out (a minute or more): its upload, held in memory. Past this bound a Pong
    // waits in tungstenite's single pending slot (the latest replaces the one before), and a frame of the
    // writer that does not fit ends the connection as a peer that stopped reading.
    let max_write = (config.max_reply_bytes as usize).saturating_mul(2);
    let ctx = gw.ctx.clone();
    let shutdown = gw.shutdown.clone();
    let pauses = gw.ctx.pauses.clone();
    // Tracked from here, not from the callback: axum calls it in a task of its own once the upgrade is
    // done, after the HTTP connection (which the graceful shutdown waits for) has ended, so a shutdown in
    // between found nothing to wait for. (Dropped with the callback if the upgrade fails.)
    let tracked = gw.tracker.token();
    ws.read_buffer_size(config.ws_read_buffer_bytes)
        .write_buffer_size(0)
        .max_write_buffer_size(max_write)
        .max_frame_size(max)
        .max_message_size(max)
        // The connection's future is made where it is awaited: one made before the pause and awaited after
        // it took its room twice in this future, for the connection's whole life (~0.9 KiB per idle
        // connection).
        .on_upgrade(move |socket| async move {
            let _tracked = tracked;
            pauses.at(crate::pause::UPGRADED).await;
            connection::run(ctx, socket, creds, shutdown).await
        })
}
