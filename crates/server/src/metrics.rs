//! Observability: the `metrics` facade with a Prometheus recorder, rendered at `GET /metrics`, and the
//! names of every series (one place, so dashboards and the code agree).
//!
//! Series (all prefixed `chatsync_`):
//! * `connections_open` (gauge); `connects_total{result}` (`ok`, or the refusal reason);
//!   `closes_total{code}` (every close the server sends, and `peer` when the client closed first);
//! * `messages_in_total{type}`, `messages_out_total{type}` (replies and broadcasts, once per broadcast),
//!   `handler_seconds{type}` (histogram), `errors_total{code}`;
//! * `outbox_overflows_total` (connections closed as slow consumers);
//! * `store_seconds{op}` (histogram of every store call), `cache_lookups_total{result}` (`hit`, `miss`),
//!   `writer_batch_size` (histogram of group-commit batches);
//! * `bus_dropped_total{direction}` (cluster mode: bus messages dropped, `out` or `in`, each run a gap);
//! * `webhook_deliveries_total{outcome}` (`delivered`, `failed`: retried later, `dropped`: given up),
//!   `webhook_pending` (gauge: events in the outbox, every node's, refreshed every 5 s).
//! * `streams_started_total`, `stream_chunks_total`, `streams_ended_total{reason}` (`completed`,
//!   `aborted`, `cancelled_by_user`, `timeout`), `stream_chunks_merged_total` (chunks folded into a queued
//!   chunk of a connection that is behind), `stream_chunks_dropped_total` (queued chunks of a stream that
//!   ended, dropped for a connection far behind);
//! * `api_requests_total{status}` (every authenticated `/v1/api` request), `api_errors_total{code}`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Open connections on this node.
pub const CONNECTIONS_OPEN: &str = "chatsync_connections_open";
/// Upgrades that finished authentication, by result.
pub const CONNECTS: &str = "chatsync_connects_total";
/// Closes, by code.
pub const CLOSES: &str = "chatsync_closes_total";
/// Inbound protocol messages, by type.
pub const MESSAGES_IN: &str = "chatsync_messages_in_total";
/// Outbound protocol messages, by type.
pub const MESSAGES_OUT: &str = "chatsync_messages_out_total";
/// Handler latency, by type.
pub const HANDLER_SECONDS: &str = "chatsync_handler_seconds";
/// Error replies, by code.
pub const ERRORS: &str = "chatsync_errors_total";
/// Slow-consumer closes.
pub const OUTBOX_OVERFLOWS: &str = "chatsync_outbox_overflows_total";
/// Store call latency, by operation.
pub const STORE_SECONDS: &str = "chatsync_store_seconds";
/// Cache lookups of chat lists, by result.
pub const CACHE_LOOKUPS: &str = "chatsync_cache_lookups_total";
/// Group-commit batch sizes.
pub const WRITER_BATCH: &str = "chatsync_writer_batch_size";
/// PostgreSQL group-commit batches run again because their session had ended before they ran.
pub const WRITER_RERUNS: &str = "chatsync_writer_reruns_total";

/// Bus messages dropped, by direction (`out`: not published, the queue full or Redis down; `in`:
/// received while the subscriber lagged past its bound). Every run of drops is a gap.
pub const BUS_DROPPED: &str = "chatsync_bus_dropped_total";

/// Webhook delivery attempts, by outcome.
pub const WEBHOOK_DELIVERIES: &str = "chatsync_webhook_deliveries_total";
/// Webhook events still to deliver.
pub const WEBHOOK_PENDING: &str = "chatsync_webhook_pending";

/// Streams opened.
pub const STREAMS_STARTED: &str = "chatsync_streams_started_total";
/// Stream chunks accepted.
pub const STREAM_CHUNKS: &str = "chatsync_stream_chunks_total";
/// Streams ended, by reason.
pub const STREAMS_ENDED: &str = "chatsync_streams_ended_total";
/// Chunks merged into a chunk already queued for a connection.
pub const STREAM_CHUNKS_MERGED: &str = "chatsync_stream_chunks_merged_total";
/// Queued chunks (merged ones count once) dropped for a connection far behind when their stream ended.
pub const STREAM_CHUNKS_DROPPED: &str = "chatsync_stream_chunks_dropped_total";
/// Server API requests that passed authentication, by HTTP status.
pub const API_REQUESTS: &str = "chatsync_api_requests_total";
/// Server API error responses, by code.
pub const API_ERRORS: &str = "chatsync_api_errors_total";

/// Counts one server API error response.
pub fn api_error(code: &str) {
    metrics::counter!(API_ERRORS, "code" => code.to_owned()).increment(1);
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often recorded histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the Prometheus recorder (once per process; later calls return the same handle) and, the first
/// time, a task that runs its upkeep every 5 s: the recorder keeps every histogram sample until it is
/// rendered or upkept, so a server nobody scrapes would otherwise grow without bound.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let latency = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(WRITER_BATCH.into()), &sizes))
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding application's): then /metrics shows
            // only what this handle saw, which is nothing; say so once.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed: /metrics will be empty");
            }
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("chatsync-metrics".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP);
                    upkeep.run_upkeep();
                })
                .expect("the metrics upkeep thread starts");
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS_OPEN, "Open WebSocket connections on this node.");
    describe_counter!(API_REQUESTS, "Authenticated server API requests, by HTTP status.");
    describe_counter!(API_ERRORS, "Server API error responses, by code.");
    describe_counter!(CONNECTS, "Upgrades that finished authentication, by result.");
    describe_counter!(
        CLOSES,
        "WebSocket closes, by code (peer: the client closed first; stalled: dropped without a close frame, the client had stopped reading)."
    );
    describe_counter!(MESSAGES_IN, "Inbound protocol messages, by type.");
    describe_counter!(MESSAGES_OUT, "Outbound protocol messages (replies, broadcasts once), by type.");
    describe_histogram!(HANDLER_SECONDS, Unit::Seconds, "Handler latency, by message type (up to its outcome: the parts of an initial sync or a content batch are built afterwards, as the client takes them).");
    describe_counter!(ERRORS, "Error replies, by code.");
    describe_counter!(OUTBOX_OVERFLOWS, "Connections closed as slow consumers.");
    describe_histogram!(STORE_SECONDS, Unit::Seconds, "Store call latency, by operation.");
    describe_counter!(CACHE_LOOKUPS, "Chat-list cache lookups, by result.");
    describe_histogram!(WRITER_BATCH, "Writes per group-commit transaction.");
    describe_counter!(
        WRITER_RERUNS,
        "PostgreSQL group-commit batches run again on a new connection: their session had ended before they ran."
    );
    describe_counter!(WEBHOOK_DELIVERIES, "Webhook delivery attempts, by outcome (delivered, failed, dropped).");
    describe_gauge!(WEBHOOK_PENDING, "Webhook events in the outbox, still to deliver.");
    describe_counter!(
        STREAM_CHUNKS_DROPPED,
        "Queued stream chunks dropped for a connection far behind when their stream ended."
    );
}
