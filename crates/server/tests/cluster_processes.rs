//! A real cluster: three `chatsync serve` processes sharing one PostgreSQL schema and one Redis, one
//! device of a user on each. A node killed with SIGKILL does not disturb the others (they keep
//! confirming and delivering to each other; the killed node's device reconnects elsewhere and finds
//! everything). And with PostgreSQL cut off, requests get `unavailable` and service resumes by itself.
//! Needs `CHATSYNC_TEST_POSTGRES_URL` and `CHATSYNC_TEST_REDIS_URL` (skipped, saying so, without them).

mod backends;
mod common;
#[macro_use]
mod sync_util;

use backends::PgSchema;
use chatsync_client::{Client, ConnectOptions};
use chatsync_protocol::*;
use common::cluster::{redis_url, unique_prefix};
use common::process;
use common::proxy::Proxy;
use common::TestServer;
use serde_json::json;
use std::process::{Child, Command};
use std::time::Duration;
use sync_util::*;

/// A node process, killed with SIGKILL when dropped.
struct Node {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    database_url: String,
    redis_url: String,
    prefix: String,
    master_key: String,
}

impl Env {
    /// A fresh PostgreSQL schema (dropped with the returned guard), the test Redis with a prefix of its
    /// own, and a master key; `None` (the test is skipped, saying so) without PostgreSQL or Redis.
    async fn start() -> Option<(Env, PgSchema)> {
        let redis = redis_url()?;
        let schema = PgSchema::create().await?;
        let env = Env {
            database_url: schema.url.clone(),
            redis_url: redis,
            prefix: unique_prefix(),
            master_key: chatsync::crypto::MasterKey::generate().to_base64().to_string(),
        };
        Some((env, schema))
    }

    fn command(&self, data: &std::path::Path) -> Command {
        let mut cmd = process::chatsync();
        cmd.arg("--data-dir")
            .arg(data)
            .args(["--database-url", &self.database_url, "--redis-url", &self.redis_url])
            .args(["--redis-prefix", &self.prefix])
            .env("CHATSYNC_MASTER_KEY", &self.master_key);
        cmd
    }

    fn node(&self) -> Node {
        let data = tempfile::tempdir().unwrap();
        let (child, url, lines) = process::spawn_serve(self.command(data.path()).args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
        ]));
        process::drain(lines);
        Node { child, url, _data: data }
    }

    fn cli(&self, args: &[&str]) -> String {
        let data = tempfile::tempdir().unwrap();
        let out = self.command(data.path()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

async fn connect(node: &Node, token: &str, device: &str) -> Client {
    let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(token, device) };
    Client::connect_authenticated(&node.url, &opts).await.unwrap().0
}

async fn broadcast(c: &mut Client) -> Incoming {
    let m = tokio::time::timeout(Duration::from_secs(10), c.recv()).await.expect("a broadcast").unwrap();
    assert_eq!(m.request_id, None, "{m:?}");
    m
}

#[tokio::test]
async fn a_node_killed_with_sigkill_does_not_disturb_the_others() {
    let Some((env, _schema)) = Env::start().await else { return };
    let nodes: Vec<Node> = (0..3).map(|_| env.node()).collect();
    env.cli(&["users", "add", "alice"]);
    let token = |device: &str| env.cli(&["sessions", "issue", "alice", "--device-id", device]);
    let (t_phone, t_laptop, t_tablet) = (token("phone"), token("laptop"), token("tablet"));
    let mut phone = connect(&nodes[0], &t_phone, "phone").await;
    let mut laptop = connect(&nodes[1], &t_laptop, "laptop").await;
    let mut tablet = connect(&nodes[2], &t_tablet, "tablet").await;

    set_title(&mut phone, "c1", "one").await;
    for c in [&mut laptop, &mut tablet] {
        assert_eq!(expect_msg!(broadcast(c).await, ChatTitleUpdated).data.title, "one");
    }

    // SIGKILL node 2 (the tablet's).
    let mut nodes = nodes;
    let mut dead = nodes.pop().unwrap();
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    assert!(tablet.recv().await.is_err(), "the tablet lost its node");

    // The others go on: writes are confirmed and cross between them.
    add_message(&mut phone, "c1", "m1", json!("after the crash")).await;
    assert_eq!(expect_msg!(broadcast(&mut laptop).await, ChatMessageAdded).message.seq, 1);
    set_draft(&mut laptop, "c1", doc("from the laptop")).await;
    expect_msg!(broadcast(&mut phone).await, ChatDraftUpdated);

    // The tablet reconnects to a surviving node and finds everything.
    let mut tablet = connect(&nodes[1], &t_tablet, "tablet").await;
    let sync = sync_with(&mut tablet, json!({"c1": {"title_v": 1, "messages_v": 0, "draft_v": 0}}), Some("c1")).await;
    let c1 = entry(&sync, "c1").unwrap();
    assert_eq!(c1.versions, Versions { messages_v: 1, title_v: 1, draft_v: 1 });
    assert_eq!(c1.messages.as_ref().unwrap()[0].message_id.as_str(), "m1");
    set_title(&mut tablet, "c1", "two").await;
    for c in [&mut phone, &mut laptop] {
        assert_eq!(expect_msg!(broadcast(c).await, ChatTitleUpdated).data.title, "two");
    }
}

#[tokio::test]
async fn an_api_key_revoked_on_the_cli_is_refused_by_every_node_once_the_command_returns() {
    let Some((env, _schema)) = Env::start().await else { return };
    let nodes: Vec<Node> = (0..2).map(|_| env.node()).collect();
    env.cli(&["users", "add", "alice"]);
    let key = env.cli(&["api-keys", "create", "--name", "bot"]);
    let key_id = env.cli(&["api-keys", "list", "--json"]);
    let key_id: serde_json::Value = serde_json::from_str(&key_id).unwrap();
    let key_id = key_id[0]["key_id"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    let get = |node: &Node| {
        let url = node.url.replace("ws://", "http://").replace("/v1/ws", "/v1/api/users/alice");
        let request = http.get(url).bearer_auth(&key);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // Both nodes have seen (and cached) the key.
    for node in &nodes {
        assert_eq!(get(node).await, 200);
        assert_eq!(get(node).await, 200);
    }
    env.cli(&["api-keys", "revoke", &key_id]);
    for node in &nodes {
        assert_eq!(get(node).await, 401, "refused as soon as the command returned");
    }
}

#[tokio::test]
async fn with_postgresql_cut_off_requests_get_unavailable_and_service_resumes_by_itself() {
    let Some(schema) = PgSchema::create().await else { return };
    // chatsync reaches PostgreSQL through a proxy the test can cut.
    let (scheme_user, rest) = schema.url.split_once('@').expect("postgres://USER@HOST:PORT/DB");
    let (host_port, path) = rest.split_once('/').unwrap();
    let target = if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:5432") };
    let proxy = Proxy::start(target).await;
    let through = format!("{scheme_user}@127.0.0.1:{}/{path}", proxy.port);
    let server = TestServer::start_with(|c| c.database_url = Some(through)).await;
    let mut alice = new_user(&server, "alice", "laptop").await;
    set_title(&mut alice, "c1", "before").await;

    proxy.cut();
    let mut saw_unavailable = false;
    for i in 0..3 {
        let reply = alice.request(&title("c1", &format!("during {i}"))).await.unwrap();
        match reply.message {
            ServerMessage::Error(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
                saw_unavailable = true;
            }
            other => panic!("a write without its database was answered {other:?}"),
        }
    }
    assert!(saw_unavailable);
    expect_msg!(alice.request(&ping()).await.unwrap(), Pong);

    proxy.restore();
    // Service resumes by itself (the pool reconnects); the first writes may still meet a dead pooled
    // connection, so retry until one is confirmed.
    let mut confirmed = None;
    for i in 0..50 {
        match alice.request(&title("c1", &format!("after {i}"))).await.unwrap().message {
            ServerMessage::ChatTitleUpdated(t) => {
                confirmed = Some(t);
                break;
            }
            ServerMessage::Error(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    let confirmed = confirmed.expect("service resumed");
    assert_eq!(confirmed.versions.title_v, 2, "nothing written during the outage");
}
