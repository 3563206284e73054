//! Operations endpoints over real HTTP: `/healthz`, `/readyz` (503 when the store does not answer) and
//! `/metrics` (Prometheus text with live figures), on the main listener or on `--metrics-listen` only.

#[macro_use]
mod sync_util;
mod common;

use common::{http_get as get, sample, TestServer};
use serde_json::json;
use sync_util::*;

#[tokio::test]
async fn healthz_and_readyz_answer_and_readyz_fails_when_the_store_does() {
    let server = TestServer::start().await;
    let addr = server.host();
    assert_eq!(get(&addr, "/healthz").await, (200, "ok\n".into()));
    let (status, body) = get(&addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, json!({"ready": true, "store": "ok", "cache": "ok", "bus": "none"}));
    server.ctx.store.close().await;
    let (status, body) = get(&addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["store"], "error");
    assert_eq!(get(&addr, "/healthz").await.0, 200, "alive all the same");
}

#[tokio::test]
async fn metrics_show_live_figures() {
    let server = TestServer::start().await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    let mut phone = another_device(&server, "alice", "phone").await;
    set_title(&mut alice, "c1", "t").await;
    expect_msg!(phone.recv().await.unwrap(), ChatTitleUpdated);
    add_message(&mut alice, "c1", "m1", json!("x")).await;
    sync_all(&mut alice).await;
    alice.send_text("not json").await.unwrap();
    alice.recv().await.unwrap();
    let (status, text) = get(&server.host(), "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "chatsync_connections_open", ""), Some(2.0), "{text}");
    assert_eq!(sample(&text, "chatsync_connects_total", "result=\"ok\""), Some(2.0));
    assert!(sample(&text, "chatsync_messages_in_total", "type=\"update_title\"").unwrap() >= 1.0);
    assert!(sample(&text, "chatsync_messages_out_total", "type=\"chat_title_updated\"").unwrap() >= 1.0);
    assert_eq!(sample(&text, "chatsync_errors_total", "code=\"invalid_json\""), Some(1.0));
    assert!(sample(&text, "chatsync_handler_seconds_count", "type=\"update_title\"").unwrap() >= 1.0);
    assert!(text.contains("chatsync_handler_seconds_bucket{type=\"update_title\",le=\"0.001\"}"), "histograms");
    assert!(sample(&text, "chatsync_store_seconds_count", "op=\"write_title\"").unwrap() >= 1.0);
    assert!(sample(&text, "chatsync_writer_batch_size_count", "").unwrap() >= 2.0);
    assert!(sample(&text, "chatsync_cache_lookups_total", "").is_some());
    // A refused connection and a close are counted too.
    assert_eq!(server.refused(&chatsync_client::ConnectOptions::new("cs_nope", "d")).await.0, 1008);
    alice.close().await.unwrap();
    let (_, text) = get(&server.host(), "/metrics").await;
    assert_eq!(sample(&text, "chatsync_connects_total", "result=\"Invalid session\""), Some(1.0), "{text}");
    assert!(sample(&text, "chatsync_closes_total", "code=\"1008\"").unwrap() >= 1.0);
}

#[tokio::test]
async fn with_metrics_listen_the_endpoints_move_off_the_public_port() {
    let ops = format!("{}:{}", common::SPARE_HOST, common::spare_port());
    let server = TestServer::start_with(|c| c.metrics_listen = Some(ops.parse().unwrap())).await;
    assert_eq!(get(&server.host(), "/metrics").await.0, 404);
    assert_eq!(get(&server.host(), "/readyz").await.0, 404);
    // The operations listener is bound as the server starts: wait until it accepts.
    while tokio::net::TcpStream::connect(&ops).await.is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(get(&ops, "/healthz").await.0, 200);
    assert_eq!(get(&ops, "/metrics").await.0, 200);
}
