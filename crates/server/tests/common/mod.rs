//! Test harness: starts the real server in-process on port 0 with a fresh data directory, and
//! connects real WebSocket clients to it.
#![allow(dead_code)]

pub mod cluster;
pub mod process;
pub mod proxy;

use chatsync::gateway::auth;
use chatsync::{Config, Ctx};
use chatsync_client::{Client, ConnectOptions};
use chatsync_protocol::Connected;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub url: String,
    pub ctx: Ctx,
    pub data: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let data = tempfile::tempdir().unwrap();
        let mut config = Config { data_dir: data.path().to_owned(), ..Config::default() };
        tweak(&mut config);
        TestServer::start_in(data, config).await
    }

    pub async fn start_in(data: tempfile::TempDir, config: Config) -> TestServer {
        if std::env::var_os("RUST_LOG").is_some() {
            chatsync::logging::init(chatsync::config::LogFormat::Text, "debug");
        }
        let ctx = chatsync::build(config).await.unwrap();
        TestServer::serve(ctx, data).await
    }

    /// Serves an already built context on a new port 0 listener.
    pub async fn serve(ctx: Ctx, data: tempfile::TempDir) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(chatsync::run(listener, ctx.clone(), async move {
            let _ = stopped.await;
        }));
        TestServer { url, ctx, data, stop: Some(stop), task: Some(task) }
    }

    /// Gives the server its shutdown signal (as SIGTERM does) without waiting for it to finish: `stop`,
    /// `stop_into_data` or `restart` then wait for that.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the server (as on SIGTERM) and waits for it to finish.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Stops the server and hands back its data directory (for a restart on the same data).
    pub async fn stop_into_data(mut self) -> tempfile::TempDir {
        self.stop().await;
        std::mem::replace(&mut self.data, tempfile::tempdir().unwrap())
    }

    /// The server's listener address (`127.0.0.1:port`).
    pub fn host(&self) -> String {
        self.url.trim_start_matches("ws://").trim_end_matches("/v1/ws").to_owned()
    }

    /// `GET /metrics` on the server's listener: the Prometheus text (the recorder is the process's, so
    /// it counts for every server of the test).
    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(&self.host(), "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Creates a user.
    pub async fn user(&self, user_id: &str, tfa: bool) {
        self.ctx.store.create_user(user_id, tfa, chatsync::store::now_millis()).await.unwrap();
    }

    /// Issues an unbound session token for an existing user.
    pub async fn token(&self, user_id: &str) -> String {
        auth::issue_session(self.ctx.store.as_ref(), user_id, None, Duration::from_secs(3600)).await.unwrap()
    }

    /// Creates `user_id` and returns a token for it.
    pub async fn user_token(&self, user_id: &str) -> String {
        self.user(user_id, false).await;
        self.token(user_id).await
    }

    /// Connects with a bearer token and device id; warm-up events are dropped (see `connect_raw`).
    pub async fn connect(&self, token: &str, device: &str) -> (Client, Connected) {
        let opts = ConnectOptions { ignore_warmup_events: true, ..ConnectOptions::new(token, device) };
        Client::connect_authenticated(&self.url, &opts).await.unwrap()
    }

    /// Connects and keeps every server message, warm-up events included.
    pub async fn connect_raw(&self, token: &str, device: &str) -> (Client, Connected) {
        Client::connect_authenticated(&self.url, &ConnectOptions::new(token, device)).await.unwrap()
    }

    /// Connects and expects the server to close right away; returns the code and reason.
    pub async fn refused(&self, opts: &ConnectOptions) -> (u16, String) {
        let mut client = Client::connect(&self.url, opts).await.unwrap();
        client.recv_close().await.unwrap()
    }
}

/// A server API client: plain HTTP with an API key.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub key: String,
    /// The key's public id (`ak_…`), for revoking it.
    pub key_id: String,
    pub http: reqwest::Client,
}

impl Api {
    /// `METHOD /v1/api{path}` with the key and an optional JSON body: (status, JSON body or `null`).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let json = if text.is_empty() { serde_json::Value::Null } else { serde_json::from_str(&text).unwrap() };
        (status, json)
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}

impl TestServer {
    /// `http://HOST:PORT/v1/api`.
    pub fn api_base(&self) -> String {
        self.url.replace("ws://", "http://").replace("/v1/ws", "/v1/api")
    }

    /// Creates an API key in the store and returns a client that uses it.
    pub async fn api(&self) -> Api {
        let (key_id, key) = chatsync::api::keys::create(self.ctx.store.as_ref(), Some("test")).await.unwrap();
        Api { base: self.api_base(), key, key_id, http: reqwest::Client::new() }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl TestServer {
    /// Stops the server and starts a new one on the same data directory and configuration (same
    /// master key file, same store). The old server is fully gone first: `stop` returns once `run` has
    /// closed the store (writer and checkpoint threads joined) and released the data directory lock,
    /// which the new server then takes (it could not start otherwise).
    pub async fn restart(mut self) -> TestServer {
        self.stop().await;
        let data = std::mem::replace(&mut self.data, tempfile::tempdir().unwrap());
        let config = (*self.ctx.config).clone();
        drop(self);
        TestServer::start_in(data, config).await
    }

    /// Every file under the data directory (recursively), as bytes, with its path.
    pub fn data_files(&self) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push((path.clone(), std::fs::read(&path).unwrap()));
                }
            }
        }
        let mut out = Vec::new();
        walk(self.data.path(), &mut out);
        out
    }
}

/// A loopback address that nothing in the tests binds but a server given a port from [`spare_port`].
/// Outgoing connections take their source port on 127.0.0.1, and so do the port-0 listeners of the
/// other tests: a port picked free on 127.0.0.1 and let go could be taken by either before the server
/// binds it (the server then failed to start: a flaky `ops` test in CI), while the same port on this
/// address cannot be.
pub const SPARE_HOST: &str = "127.0.0.2";

/// A port free on [`SPARE_HOST`], for a server that must be told its address before it binds (an
/// operations listener, a `redis-server` restarted on the same port).
pub fn spare_port() -> u16 {
    std::net::TcpListener::bind((SPARE_HOST, 0)).unwrap().local_addr().unwrap().port()
}

/// A plain HTTP/1.1 request; returns the status code, the headers (lowercase names) and the body.
pub async fn http(addr: &str, method: &str, path: &str) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http(addr, "GET", path).await;
    (status, body)
}

/// The value of the first sample line of `series` in a `/metrics` text whose labels contain `labels`.
pub fn sample(metrics: &str, series: &str, labels: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
