//! Operations endpoints: `GET /healthz` (the process is alive), `GET /readyz` (the store and the cache
//! answer; 503 otherwise) and `GET /metrics` (Prometheus text format). Served on the main listener, or
//! only on `--metrics-listen` when that is set (to keep them off a public port).

use crate::handlers::Ctx;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Duration;

/// How long a readiness probe waits for the store.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct Ops {
    ctx: Arc<Ctx>,
    metrics: PrometheusHandle,
}

/// The router of the operations endpoints.
pub fn router(ctx: Arc<Ctx>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(Ops { ctx, metrics })
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 when the store answers a read (within 2 s) and the cache is usable; 503 with the reason
/// otherwise. The bus (cluster mode) is reported but does not make a node unready: without it a node
/// still serves its own connections correctly (from the store), and failing every node's readiness
/// while Redis is down would turn a degraded cluster into an outage.
async fn readyz(State(ops): State<Ops>) -> Response {
    let store = match tokio::time::timeout(PROBE_TIMEOUT, ops.ctx.store.user("readyz-probe")).await {
        Ok(Ok(_)) => "ok",
        Ok(Err(_)) => "error",
        Err(_) => "timeout",
    };
    let bus = match &ops.ctx.bus {
        None => "none",
        Some(bus) if bus.is_healthy() => "ok",
        Some(_) => "down",
    };
    let ready = store == "ok";
    let body = serde_json::json!({ "ready": ready, "store": store, "cache": "ok", "bus": bus });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn render(State(ops): State<Ops>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ops.metrics.render()).into_response()
}
