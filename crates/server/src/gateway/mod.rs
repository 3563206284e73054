//! The HTTP side: the `/v1/ws` route, the origin check, WebSocket tuning, and the task tracking that
//! lets shutdown wait for upgraded connections (axum does not wait for them by itself).

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
    let ctx = gw.ctx.clone();
    let shutdown = gw.shutdown.clone();
    let tracker = gw.tracker.clone();
    ws.read_buffer_size(config.ws_read_buffer_bytes)
        .write_buffer_size(0)
        .max_frame_size(max)
        .max_message_size(max)
        .on_upgrade(move |socket| tracker.track_future(connection::run(ctx, socket, creds, shutdown)))
}
