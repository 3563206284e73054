//! The command line: `serve`, `users`, `sessions`, `devices`. Flags override `CHATSYNC_*` environment
//! variables, which override the TOML file given by `--config`, which overrides the defaults.

use crate::config::{Config, LogFormat};
use crate::gateway::auth;
use crate::store::{self, now_millis, SessionInfo, Store, StoreError};
use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// chatsync: real-time sync gateway for multi-device chat applications.
#[derive(Debug, Parser)]
#[command(
    name = "chatsync",
    version,
    about,
    long_about = None,
    after_help = "The storage, cluster and log options (--config, --data-dir, --database-url, --redis-url, \
--redis-prefix, --redis-sharded-pubsub, --log-format, --log-level) are also accepted before the command: \
chatsync --data-dir DIR users add alice. Every storage, cluster, log and serve option has its CHATSYNC_* environment \
variable (see each command's --help). The master key comes from CHATSYNC_MASTER_KEY, else <data-dir>/master.key."
)]
pub struct Cli {
    /// The storage, cluster and log options, also accepted before the command (hidden in the help: each
    /// command documents the ones it uses).
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The options accepted before the command, as `chatsync --data-dir DIR users add alice` (scripts).
/// After the command, each command accepts only the ones that apply to it.
#[derive(Debug, Args, Serialize)]
pub struct GlobalArgs {
    /// TOML configuration file.
    #[arg(long, env = "CHATSYNC_CONFIG", value_name = "FILE", hide = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data directory.
    #[arg(long, env = "CHATSYNC_DATA_DIR", value_name = "DIR", hide = true, value_parser = utf8_path)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Store URL.
    #[arg(long, env = "CHATSYNC_DATABASE_URL", value_name = "URL", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Redis URL of the bus.
    #[arg(long, env = "CHATSYNC_REDIS_URL", value_name = "URL", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Bus channel prefix.
    #[arg(long, env = "CHATSYNC_REDIS_PREFIX", value_name = "PREFIX", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_prefix: Option<String>,
    /// Sharded pub/sub.
    #[arg(long, env = "CHATSYNC_REDIS_SHARDED_PUBSUB", num_args = 0..=1, default_missing_value = "true", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_sharded_pubsub: Option<bool>,
    /// Log format.
    #[arg(long, env = "CHATSYNC_LOG_FORMAT", value_enum, hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Log filter.
    #[arg(long, env = "CHATSYNC_LOG_LEVEL", value_name = "FILTER", hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

/// A path the configuration carries as text (the data directory, a key file). Taking `&str`, clap refuses
/// one that is not UTF-8 as a usage error, before the configuration's merge would, with an error naming
/// source locations.
fn utf8_path(value: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(value))
}

/// Where the data lives (every command that opens the store).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Storage")]
pub struct StorageArgs {
    /// TOML configuration file (keys as the long flags, with underscores).
    #[arg(long, global = true, env = "CHATSYNC_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data directory of the embedded store, and of `master.key` unless CHATSYNC_MASTER_KEY is set
    /// [default: ./data].
    #[arg(long, global = true, env = "CHATSYNC_DATA_DIR", value_name = "DIR", value_parser = utf8_path)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Store URL: `sqlite://PATH`, or `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` for a cluster
    /// [default: sqlite://<data-dir>/chatsync.db].
    #[arg(long, global = true, env = "CHATSYNC_DATABASE_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
}

/// The cluster bus (serve, and the commands that revoke sessions).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Cluster")]
pub struct ClusterArgs {
    /// Cluster mode: Redis URL of the delivery bus shared by the nodes, `redis://HOST:PORT` [default: none,
    /// a single node]. Revocations are published on it.
    #[arg(long, global = true, env = "CHATSYNC_REDIS_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Prefix of the bus channel names (several clusters can share one Redis) [default: chatsync:].
    #[arg(long, global = true, env = "CHATSYNC_REDIS_PREFIX", value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_prefix: Option<String>,
    /// Use sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis 7+) for the bus.
    #[arg(long, global = true, env = "CHATSYNC_REDIS_SHARDED_PUBSUB", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_sharded_pubsub: Option<bool>,
}

/// Server logs (`serve`). `global`, as the storage and cluster options are: a value given before the
/// command (`chatsync --log-format json serve`) then reaches these, so that it beats the environment.
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Log format (stderr) [default: text].
    #[arg(long, global = true, env = "CHATSYNC_LOG_FORMAT", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info`, `debug`, `chatsync=debug` [default: info; RUST_LOG wins].
    #[arg(long, global = true, env = "CHATSYNC_LOG_LEVEL", value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
// Parsed once at startup: the size of the `serve` variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the WebSocket server (endpoint GET /v1/ws). Locks the data directory (<data-dir>/chatsync.lock)
    /// while it runs: a second `serve`, or `keys rotate`, on the same directory stops with an error.
    Serve(ServeArgs),
    /// Manage users.
    Users(UsersArgs),
    /// Issue, list and revoke sessions (login tokens).
    Sessions(SessionsArgs),
    /// List a user's devices; revoke one.
    Devices(DevicesArgs),
    /// Manage the master key that wraps the data keys.
    Keys(KeysArgs),
    /// Create, list and revoke the API keys of application backends (the server API under /v1/api).
    ApiKeys(ApiKeysArgs),
    /// Connect to a server as a client: prints every server message as a JSON line, sends every JSON
    /// line read from stdin (e.g. {"type":"ping","request_id":"1"}). Exits 0 at the end of the input
    /// (once the requests that carry a request_id are answered) or on Ctrl-C; exits 1 with the close code
    /// and reason when the server refuses or closes the connection.
    Connect(ConnectArgs),
}

/// `chatsync users`.
#[derive(Debug, Args)]
pub struct UsersArgs {
    /// The subcommand.
    #[command(subcommand)]
    pub command: UsersCommand,
    /// Storage.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Cluster bus (accepted like `serve`'s, so one set of options reaches the whole cluster).
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `chatsync sessions`.
#[derive(Debug, Args)]
pub struct SessionsArgs {
    /// The subcommand.
    #[command(subcommand)]
    pub command: SessionsCommand,
    /// Storage.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Cluster bus (revocations).
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `chatsync devices`.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// The subcommand.
    #[command(subcommand)]
    pub command: DevicesCommand,
    /// Storage.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Cluster bus (revocations).
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `chatsync api-keys`.
#[derive(Debug, Args)]
pub struct ApiKeysArgs {
    /// The subcommand.
    #[command(subcommand)]
    pub command: ApiKeysCommand,
    /// Storage.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Cluster bus (accepted like `serve`'s, so one set of options reaches the whole cluster).
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `chatsync api-keys …`
#[derive(Debug, Subcommand)]
pub enum ApiKeysCommand {
    /// Create an API key and print it alone on stdout (`ck_` followed by 43 characters of base64url).
    /// Only its SHA-256 is stored: it cannot be shown again.
    Create {
        /// A name to recognise the key by in `api-keys list`.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the API keys (id, name, created, last used, revoked); never the keys themselves.
    List {
        /// Print a JSON array of {"key_id","name","created_at","last_used_at","revoked_at"} instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API key by its id (`ak_…`): every request after this command returns is refused with 401,
    /// on every node (with --redis-url the nodes' key caches start over; the command fails if Redis does
    /// not answer). Revoking a revoked key again succeeds.
    Revoke {
        /// The key id, as shown by `api-keys list`.
        key_id: String,
    },
}

/// `chatsync keys`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The subcommand.
    #[command(subcommand)]
    pub command: KeysCommand,
    /// Storage.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Cluster bus (accepted like `serve`'s, so one set of options reaches the whole cluster).
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `chatsync connect` options.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Session token (from `chatsync sessions issue`: `cs_…`); prefer the environment variable, which
    /// keeps the token out of `ps`. Any token is accepted, including old ones that start with `-`.
    #[arg(long, env = "CHATSYNC_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
    pub token: String,
    /// Device id sent as X-Device-Id (1-128 printable ASCII characters). A token issued without a device
    /// is bound to the first device id it is used with, for good.
    #[arg(long, value_name = "ID")]
    pub device_id: String,
    /// Server endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/ws")]
    pub url: String,
    /// Where to look up which device a session is bound to.
    #[command(flatten)]
    pub storage: HintStorageArgs,
}

/// The store `connect` reads (never creates) to name the device a session is bound to.
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Storage (read only to explain a `Device mismatch`)")]
pub struct HintStorageArgs {
    /// TOML configuration file of the server.
    #[arg(long, env = "CHATSYNC_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The server's data directory [default: ./data].
    #[arg(long, env = "CHATSYNC_DATA_DIR", value_name = "DIR", value_parser = utf8_path)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// The server's store URL [default: sqlite://<data-dir>/chatsync.db].
    #[arg(long, env = "CHATSYNC_DATABASE_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
}

/// `chatsync keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-wrap every data key under a new, random master key. Stop the server first: like `serve`, it
    /// locks the data directory (<data-dir>/chatsync.lock) and refuses to run while another process holds
    /// it. With a key file (<data-dir>/master.key) the file is replaced, each step flushed to disk so that
    /// a crash at any point leaves readable data; with CHATSYNC_MASTER_KEY the new key is printed on
    /// stdout (before the store is re-wrapped under it) and must then be configured in its place. If a
    /// data key is stored while it runs (a server or command still running against the store), it fails
    /// and changes nothing: stop them and run it again.
    Rotate,
}

/// `chatsync serve` options, grouped under headings in `serve --help`.
#[derive(Debug, Args, Serialize)]
pub struct ServeArgs {
    /// Storage.
    #[command(flatten)]
    #[serde(flatten)]
    pub storage: StorageArgs,
    /// `full`: every write is fsynced before it is confirmed (survives power loss); `normal`: confirmed
    /// once it reaches the OS (survives a crash of chatsync, not of the machine) [default: full].
    #[arg(long, help_heading = "Storage", env = "CHATSYNC_DURABILITY", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durability: Option<crate::store::Durability>,
    /// Microseconds the chat writer waits, when it takes a write with none queued behind it, for more
    /// writes to share the transaction and its fsync (writes arriving meanwhile wait less; under load
    /// batches form without waiting); 0: commit at once; at most 100000 [default: 1000 on the embedded
    /// store, 250 on PostgreSQL].
    #[arg(long, help_heading = "Storage", env = "CHATSYNC_COMMIT_WINDOW_US", value_name = "MICROS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_window_us: Option<u64>,
    /// Seconds a batch of writes may take in PostgreSQL before its writes fail with `unavailable` (a lock
    /// held by another session: PostgreSQL cancels the batch at this `statement_timeout`; a host that
    /// vanished mid-statement: no answer 5 s later, and the connection is dropped); at most 86400
    /// [default: 30].
    #[arg(long, help_heading = "Storage", env = "CHATSYNC_STORE_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_timeout_secs: Option<u64>,
    /// Cluster bus.
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: ClusterArgs,
    /// Largest accepted frame in bytes, at least 1024; larger closes with 1009 [default: 65536].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_FRAME_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u32>,
    /// Longest chat title, in characters [default: 255].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_TITLE_CHARS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_title_chars: Option<u32>,
    /// Longest draft text, in characters [default: 7000].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_DRAFT_CHARS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_draft_chars: Option<u32>,
    /// Most words in a draft [default: 1000].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_DRAFT_WORDS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_draft_words: Option<u32>,
    /// Most changes in one sync_offline_changes [default: 500].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_OFFLINE_CHANGES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_offline_changes: Option<u32>,
    /// Most chats in one request_chat_content_batch [default: 50].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_BATCH_CHATS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_chats: Option<u32>,
    /// Most messages in one page [default: 500].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_PAGE_MESSAGES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_page_messages: Option<u32>,
    /// Sustained requests per second per connection [default: 100].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_RATE_PER_SEC", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<u32>,
    /// Requests allowed in a burst above the rate [default: 200].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_RATE_BURST", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// Outbound queue bound per connection in bytes; beyond it 1013 [default: 1048576].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_OUTBOX_MAX_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_max_bytes: Option<usize>,
    /// Outbound queue bound per connection in messages; beyond it 1013 [default: 1024].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_OUTBOX_MAX_MESSAGES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_max_messages: Option<usize>,
    /// Most connections on this node; beyond it 1013 `Server overloaded` [default: 100000].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_CONNECTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Most connections of one user on this node; beyond it 1013 `Too many connections` [default: 100].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_CONNECTIONS_PER_USER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_user: Option<usize>,
    /// Largest server frame; larger replies are split (`more`) or shortened [default: 1048576].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_REPLY_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_reply_bytes: Option<u32>,
    /// Most chats one user may own; creating one more is `limit_exceeded` [default: 10000].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_CHATS_PER_USER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_chats_per_user: Option<u32>,
    /// Most text one stream (SERVER_API section 4) may accumulate; a chunk beyond it is 422 `limit_exceeded`
    /// [default: 262144].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_STREAM_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_stream_bytes: Option<usize>,
    /// Most streams (SERVER_API section 4) one user may have open at once; starting one more is 422
    /// `limit_exceeded` until one ends [default: 16].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_MAX_OPEN_STREAMS_PER_USER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_open_streams_per_user: Option<usize>,
    /// Seconds without a chunk after which an open stream is cancelled with reason `timeout` [default: 60].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_STREAM_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout_secs: Option<u64>,
    /// Sustained /v1/api requests per second per API key on this node; beyond it 429 `rate_limited` with
    /// Retry-After. 0: no limit (the backend holding the key is trusted to pace itself) [default: 0].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_API_RATE_PER_SEC", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_rate_per_sec: Option<u32>,
    /// Size of each API key's bucket: the requests a key may send at once after a quiet period (then
    /// --api-rate-per-sec refills it) [default: the rate].
    #[arg(long, help_heading = "Limits", env = "CHATSYNC_API_RATE_BURST", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_rate_burst: Option<u32>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, help_heading = "Network", env = "CHATSYNC_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Serve /metrics, /healthz and /readyz on this address only (e.g. 127.0.0.1:9090) instead of on
    /// --listen next to /v1/ws.
    #[arg(long, help_heading = "Network", env = "CHATSYNC_METRICS_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Allowed Origin header values, comma-separated, each as browsers send it (`https://app.example.com`:
    /// no trailing slash, path or wildcard; an app's own scheme as it is, `capacitor://localhost`); others
    /// get HTTP 403. Cookie authentication is accepted only
    /// from an Origin in this list (none without it) [default: any Origin; no cookies].
    #[arg(
        long,
        help_heading = "Network",
        env = "CHATSYNC_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    /// Seconds between server Pings [default: 25].
    #[arg(long, help_heading = "Network", env = "CHATSYNC_PING_INTERVAL_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_interval_secs: Option<u64>,
    /// Seconds of client silence before closing with 1001; more than --ping-interval-secs (silence is
    /// checked at each Ping) [default: 60].
    #[arg(long, help_heading = "Network", env = "CHATSYNC_HEARTBEAT_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_secs: Option<u64>,
    /// Seconds between checks for sessions revoked elsewhere [default: 5].
    #[arg(long, help_heading = "Network", env = "CHATSYNC_SESSION_CHECK_INTERVAL_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_check_interval_secs: Option<u64>,
    /// Seconds an HTTP request's head may take to arrive, and an HTTP keep-alive connection may stay idle
    /// between requests, before the TCP connection is closed; keep it above the idle timeout of a proxy in
    /// front (nginx's upstream keep-alive and AWS ALB use 60) [default: 75].
    #[arg(long, help_heading = "Network", env = "CHATSYNC_HTTP_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_idle_timeout_secs: Option<u64>,
    /// Seconds to wait for connections to drain and API requests in flight to finish on shutdown [default: 10].
    #[arg(long, help_heading = "Network", env = "CHATSYNC_SHUTDOWN_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_secs: Option<u64>,
    /// WebSocket read buffer in bytes, held by a connection only while it reads; larger frames are read in chunks of this size; at most 4 x --max-frame-bytes [default: 1024].
    #[arg(long, help_heading = "Network", env = "CHATSYNC_WS_READ_BUFFER_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_read_buffer_bytes: Option<usize>,
    /// Accept JWT connection tokens signed with HS256 and this secret, at least 32 bytes (prefer the
    /// environment variable: a flag shows in the process list) [default: none].
    #[arg(
        long,
        help_heading = "JWT connection tokens",
        env = "CHATSYNC_JWT_HS256_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        conflicts_with = "jwt_public_key_file"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_hs256_secret: Option<crate::config::Secret>,
    /// Accept JWT connection tokens verified with this PEM public key: RSA (RS256) or EC P-256 (ES256)
    /// [default: none].
    #[arg(long, help_heading = "JWT connection tokens", env = "CHATSYNC_JWT_PUBLIC_KEY_FILE", value_name = "PEM", value_parser = utf8_path)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `aud` claim of JWT connection tokens [default: not checked].
    #[arg(long, help_heading = "JWT connection tokens", env = "CHATSYNC_JWT_AUDIENCE", value_name = "AUD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim of JWT connection tokens [default: not checked].
    #[arg(long, help_heading = "JWT connection tokens", env = "CHATSYNC_JWT_ISSUER", value_name = "ISS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// Clock leeway for the `exp`, `nbf` and `iat` of JWT connection tokens, seconds, at most 86400
    /// [default: 0].
    #[arg(long, help_heading = "JWT connection tokens", env = "CHATSYNC_JWT_LEEWAY_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_leeway_secs: Option<u64>,
    /// POST webhook events (message.created, chat.deleted, stream.cancel_requested) to this URL
    /// [default: none: no event is recorded].
    #[arg(long, help_heading = "Webhooks", env = "CHATSYNC_WEBHOOK_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Key of the X-Chatsync-Signature HMAC-SHA256 of every delivery; required with --webhook-url
    /// (prefer the environment variable: a flag shows in the process list).
    #[arg(
        long,
        help_heading = "Webhooks",
        env = "CHATSYNC_WEBHOOK_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<crate::config::Secret>,
    /// Seconds an event is retried before it is dropped with an error log [default: 86400].
    #[arg(long, help_heading = "Webhooks", env = "CHATSYNC_WEBHOOK_MAX_AGE_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_max_age_secs: Option<u64>,
    /// First retry delay in milliseconds (tests only).
    #[arg(long, hide = true, env = "CHATSYNC_WEBHOOK_BACKOFF_BASE_MS", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_backoff_base_ms: Option<u64>,
    /// Do not serve the web demo (the page at / and the TypeScript SDK at /sdk/) on --listen; /v1/ws is
    /// not affected [default: served].
    #[arg(
        long,
        help_heading = "Network",
        env = "CHATSYNC_NO_WEB_DEMO",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_web_demo: Option<bool>,
    /// Logging.
    #[command(flatten)]
    #[serde(flatten)]
    pub log: LogArgs,
}

/// `chatsync users …`
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user (and the database, if there is none yet).
    ///
    /// With the store's master key (`CHATSYNC_MASTER_KEY` or `<data_dir>/master.key`, once a server has
    /// started on the store), the user's data key is created too; otherwise the user's first write
    /// creates it.
    Add {
        /// User id: 1-64 characters of [A-Za-z0-9_.@-].
        user_id: String,
        /// The user has two-factor authentication (device mismatches then say `2FA required`).
        #[arg(long)]
        tfa: bool,
    },
    /// List every user.
    List {
        /// Print a JSON array of {"user_id","tfa","created_at"} instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `chatsync sessions …`
#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Issue a session for a user and print its token (only the token, on stdout): `cs_` followed by 43
    /// characters of base64url.
    Issue {
        /// The user.
        user_id: String,
        /// Bind the session to this device id (as sent in X-Device-Id / device_id); kept as the device's
        /// label. Without a device, the session is bound to the first device it connects with.
        #[arg(long, value_name = "ID", conflicts_with = "device_hash")]
        device_id: Option<String>,
        /// Bind the session to this device hash (64 lowercase hex characters).
        #[arg(long, value_name = "HASH")]
        device_hash: Option<String>,
        /// Lifetime, e.g. `30d`, `12h`, `90m`.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Create users `<prefix>0..<prefix>N-1` (when absent) with D device-bound sessions each, in one
    /// transaction, and print one JSON line per session: {"user_id","device_id","token"} (for the bench).
    /// The users' data keys are created as by `users add`.
    IssueBulk {
        /// Number of users.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        users: u32,
        /// Devices (sessions) per user; device ids are `<user_id>-d<j>`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        devices: u32,
        /// User id prefix.
        #[arg(long, default_value = "u")]
        prefix: String,
        /// Lifetime of the sessions.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// List a user's sessions (active, expired, revoked), newest first, with the device each is bound to.
    List {
        /// The user.
        user_id: String,
        /// Print a JSON array of {"session_id","state","device_label","device_hash","created_at",
        /// "expires_at","revoked_at"} instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke the session of a token; its open connections close with 1008 `Session revoked`.
    Revoke {
        /// The token, as printed by `sessions issue` (`cs_…`). Any token is accepted, including old ones
        /// that start with `-`.
        #[arg(allow_hyphen_values = true)]
        token: String,
    },
}

/// `chatsync devices …`
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List the devices known for a user, most recently seen first, with their labels (the device id
    /// the client gave).
    List {
        /// The user.
        user_id: String,
        /// Print a JSON array of {"label","device_hash","first_seen","last_seen"} instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke every session of a user bound to a device. Its open connections close with 1008 `Session
    /// revoked`: at once on every node with --redis-url, otherwise within the server's
    /// --session-check-interval-secs.
    Revoke {
        /// The user.
        user_id: String,
        /// The device: its label (the device id) or its hash (64 lowercase hex characters).
        device: String,
    },
}

impl Cli {
    /// The merged configuration for this invocation.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut overrides: Vec<&dyn crate::config::erased::Overrides> = vec![&self.global];
        let file = match &self.command {
            Command::Serve(a) => {
                overrides.push(a);
                a.storage.config.as_ref()
            }
            Command::Users(a) => {
                overrides.extend([&a.storage as &dyn crate::config::erased::Overrides, &a.cluster]);
                a.storage.config.as_ref()
            }
            Command::Sessions(a) => {
                overrides.extend([&a.storage as &dyn crate::config::erased::Overrides, &a.cluster]);
                a.storage.config.as_ref()
            }
            Command::Devices(a) => {
                overrides.extend([&a.storage as &dyn crate::config::erased::Overrides, &a.cluster]);
                a.storage.config.as_ref()
            }
            Command::Keys(a) => {
                overrides.extend([&a.storage as &dyn crate::config::erased::Overrides, &a.cluster]);
                a.storage.config.as_ref()
            }
            Command::ApiKeys(a) => {
                overrides.extend([&a.storage as &dyn crate::config::erased::Overrides, &a.cluster]);
                a.storage.config.as_ref()
            }
            Command::Connect(a) => {
                overrides.push(&a.storage);
                a.storage.config.as_ref()
            }
        };
        let file = file.or(self.global.config.as_ref());
        Config::load(file.map(PathBuf::as_path), &overrides).context("invalid configuration")
    }
}

/// Runs the parsed command line. Output meant for scripts goes to stdout; logs go to stderr.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config();
    let command = match cli.command {
        // The store is only read to explain a refusal: a configuration that does not load costs the hint.
        Command::Connect(args) => return connect(args, config.ok()).await,
        command => command,
    };
    let config = config?;
    match command {
        Command::Serve(_) => {
            crate::logging::init(config.log_format, &config.log_level);
            serve(config).await
        }
        Command::Users(a) => {
            crate::logging::init(config.log_format, "warn");
            users(config, a.command).await
        }
        Command::Sessions(a) => {
            crate::logging::init(config.log_format, "warn");
            sessions(config, a.command).await
        }
        Command::Devices(a) => {
            crate::logging::init(config.log_format, "warn");
            devices(config, a.command).await
        }
        Command::ApiKeys(a) => {
            crate::logging::init(config.log_format, "warn");
            api_keys(config, a.command).await
        }
        Command::Connect(_) => unreachable!("handled above"),
        Command::Keys(KeysArgs { command: KeysCommand::Rotate, .. }) => {
            crate::logging::init(config.log_format, "warn");
            // Never in a directory without a database: it would write a new master key there.
            let (url, _) = existing_url(&config)?;
            // The database itself (`rotate_with` locks the data directory), as `serve` locks it.
            let _store_lock = crate::datadir::DataDirLock::none().with_store_file(&url, "keys rotate")?;
            let backend = store::open_command_backend(&url, config.durability).await?;
            let env_key = std::env::var("CHATSYNC_MASTER_KEY").ok().filter(|k| !k.is_empty());
            // With an environment key the new key is printed before the store is re-wrapped under it:
            // printed after, a crash in between would leave data that no known key opens.
            let mut printed = false;
            let announce = |step, new: &crate::crypto::MasterKey| {
                if step == crate::keys::RotationStep::Prepared && env_key.is_some() {
                    use std::io::Write as _;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}", new.to_base64().as_str()).and_then(|()| out.flush())?;
                    printed = true;
                }
                Ok(())
            };
            let rotated =
                crate::keys::rotate_with(&config.data_dir, env_key.as_deref(), backend.chats.as_ref(), announce).await;
            let (new, count) = match rotated {
                Err(e) if printed => {
                    return Err(e.context(
                        "rotation failed before the store was re-wrapped: keep the current \
                         CHATSYNC_MASTER_KEY, not the key printed above (the server names the key it needs)",
                    ))
                }
                other => other?,
            };
            if env_key.is_some() {
                eprintln!("re-wrapped {count} data keys under master key {}: set CHATSYNC_MASTER_KEY to the key printed above", new.id());
            } else {
                eprintln!("re-wrapped {count} data keys under master key {} (written to the data directory)", new.id());
            }
            Ok(())
        }
    }
}

/// Pending connections the listening socket queues before the kernel drops SYNs (capped by the kernel at
/// `net.core.somaxconn`). tokio's `bind` asks for 1,024: in a reconnect storm (10,000 devices at once after a
/// deploy) the overflow is dropped and those clients retry only after TCP's 1-second SYN timeout.
const LISTEN_BACKLOG: u32 = 8192;

/// A listening socket on `addr` (address reuse on Unix, as tokio's `bind` sets it, and [`LISTEN_BACKLOG`]).
fn listen_on(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    // Every connection is a file descriptor: take the hard limit, not the (often 1024) soft one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let ctx = crate::build(config).await?;
    let listener = listen_on(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "chatsync listening on ws://{addr}/v1/ws");
    if !ctx.config.no_web_demo {
        tracing::info!("web demo: open http://{addr}/ in a browser (--no-web-demo turns it off)");
    }
    crate::run(listener, ctx, shutdown_signal()).await
}

/// Opens the store of a command that reads or changes existing data: unlike `users add` and `serve`, it
/// never creates a database, so a command run from the wrong directory says where it looked instead of
/// answering from a new, empty one. Returns the store and its URL as shown in messages.
async fn open_existing(config: &Config) -> anyhow::Result<(Arc<dyn Store>, String)> {
    let (url, shown) = existing_url(config)?;
    let store = store::open(&url).await.with_context(|| format!("cannot open {shown}"))?;
    Ok((store, shown))
}

/// The store URL of a command that must not create a database, and that URL as shown in messages; fails
/// naming where it looked when an embedded store has no database file there.
fn existing_url(config: &Config) -> anyhow::Result<(String, String)> {
    let url = config.store_url();
    let shown = store::shown_url(&url);
    if let Some(path) = url.strip_prefix("sqlite://") {
        if !std::path::Path::new(path).is_file() {
            bail!(
                "no database at {shown}: run the command where `chatsync users add`/`serve` ran, or pass \
                 --data-dir or --database-url (CHATSYNC_DATA_DIR, CHATSYNC_DATABASE_URL)"
            );
        }
    }
    Ok((url, shown))
}

/// Fails with "unknown user …" naming the store unless the user exists.
async fn require_user(store: &dyn Store, user_id: &str, shown: &str) -> anyhow::Result<()> {
    check_user_id(user_id)?;
    if store.user(user_id).await?.is_none() {
        bail!("unknown user {user_id} in {shown} (create it with `chatsync users add {user_id}`)");
    }
    Ok(())
}

use crate::api::rfc3339;

/// `println!` for a command's output: a reader that went away (`chatsync users list | head -1`) ends the
/// command quietly with success, as for other Unix tools, instead of a panic (exit 101).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
    }};
}

/// Prints `value` as pretty JSON on stdout.
fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Tells every node through the bus, when there is one, to close the sessions' connections now (they
/// poll the store as a fallback).
async fn publish_revocation(config: &Config, session_ids: Vec<String>) -> anyhow::Result<()> {
    let Some(bus) = config.bus() else { return Ok(()) };
    let env_key = std::env::var("CHATSYNC_MASTER_KEY").ok().filter(|k| !k.is_empty());
    let message = crate::cluster::BusMessage::SessionsRevoked { session_ids };
    // The revocation is committed already: a key that cannot be read here is a warning like a Redis that
    // cannot be reached (failing would exit 1 after the revocation, and a second run find nothing to revoke).
    let published = match crate::keys::existing_master_key(&config.data_dir, env_key.as_deref()) {
        Ok(Some(master)) => crate::cluster::bus::publish_once(&bus, &master.derive("bus"), message).await,
        Ok(None) => Err(anyhow::anyhow!("no master key here (set CHATSYNC_MASTER_KEY)")),
        Err(e) => Err(e),
    };
    if let Err(e) = published {
        eprintln!(
            "warning: could not tell the cluster through Redis ({e:#}); nodes close the connections at their \
             next revocation check"
        );
    }
    Ok(())
}

/// Creates the data keys of users this command just created when it has the store's master key
/// (`CHATSYNC_MASTER_KEY`, else the data directory's `master.key`): their first writes then only read
/// them (see [`crate::keys::create_user_keys`]). Without it, or when it does not fit, the keys are left
/// to the first writes, as before, with a warning where the key given is wrong.
async fn create_user_keys(config: &Config, chats: &dyn crate::store::chats::ChatStore, user_ids: &[String]) {
    use crate::keys::UserKeys;
    let env_key = std::env::var("CHATSYNC_MASTER_KEY").ok().filter(|k| !k.is_empty());
    let master = match crate::keys::existing_master_key(&config.data_dir, env_key.as_deref()) {
        Ok(Some(master)) => master,
        Ok(None) => return,
        Err(e) => {
            eprintln!("warning: cannot read the master key ({e:#}): the users' data keys are created on first use");
            return;
        }
    };
    match crate::keys::create_user_keys(&master, chats, user_ids).await {
        Ok(UserKeys::Stored | UserKeys::NotServedYet) => {}
        Ok(UserKeys::OtherMasterKey) => eprintln!(
            "warning: the master key here (id {}) is not this store's: the users' data keys are created on \
             first use by the servers",
            master.id()
        ),
        Ok(UserKeys::RotatedMeanwhile) => {
            eprintln!("note: the master key was rotated meanwhile: the users' data keys are created on first use")
        }
        Err(e) => eprintln!("warning: could not store the users' data keys ({e}): they are created on first use"),
    }
}

/// After the end of the input, how long `connect` waits without a frame before closing (server events
/// that answer no request, such as the warm-up events, arrive meanwhile).
const CONNECT_QUIET: Duration = Duration::from_millis(300);
/// After the end of the input, how long `connect` waits without a frame for replies still missing.
const CONNECT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// `chatsync connect`: a line-oriented WebSocket client for trying the protocol by hand or from scripts.
///
/// stdin is read on a plain thread feeding a channel: tokio's stdin reads on a blocking thread that the
/// runtime waits for at exit, so the process would wait for one more line before exiting.
async fn connect(args: ConnectArgs, config: Option<Config>) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    use tokio::time::Instant;
    if auth::device_hash_for_id(&args.device_id).is_none() {
        bail!("malformed --device-id: use 1-128 printable ASCII characters");
    }
    // Registered now, before anything is printed, so that a Ctrl-C never meets the default handler.
    #[cfg(unix)]
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    #[cfg(unix)]
    let ctrl_c = async move { interrupt.recv().await };
    #[cfg(not(unix))]
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let opts = chatsync_client::ConnectOptions::new(&args.token, &args.device_id);
    // Bounded: a host that accepts the TCP connection and answers nothing would hang a script for good.
    let upgrade = tokio::time::timeout(CONNECT_REPLY_TIMEOUT, chatsync_client::Client::connect(&args.url, &opts));
    let mut client = tokio::select! {
        connected = upgrade => match connected {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => bail!("cannot connect to {}: {}", args.url, connect_error(&e)),
            Err(_) => bail!("cannot connect to {}: no answer within {} s", args.url, CONNECT_REPLY_TIMEOUT.as_secs()),
        },
        _ = &mut ctrl_c => return Ok(()),
    };
    let (tx, mut lines) = tokio::sync::mpsc::channel::<std::io::Result<String>>(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let failed = line.is_err();
            if tx.blocking_send(line).is_err() || failed {
                break;
            }
        }
    });
    // Requests sent with a request_id and not answered yet (the last part of a reply answers).
    let mut pending: HashSet<String> = HashSet::new();
    let mut input_open = true;
    let mut greeted = false;
    let mut last_activity = Instant::now();
    loop {
        let wait = if pending.is_empty() && greeted { CONNECT_QUIET } else { CONNECT_REPLY_TIMEOUT };
        // After the input ends (and, for a refusal to be reported, after the greeting or a close; a
        // server that sends neither is given up after a while).
        let finishing = !input_open;
        tokio::select! {
            line = lines.recv(), if input_open => match line {
                Some(Ok(line)) if line.trim().is_empty() => {}
                Some(Ok(line)) => {
                    if let Some(id) = request_id_of(&line) {
                        pending.insert(id);
                    }
                    if let Err(e) = client.send_text(line).await {
                        bail!("connection to {} lost: {}", args.url, connect_error(&e));
                    }
                    last_activity = Instant::now();
                }
                Some(Err(e)) => bail!("cannot read stdin: {e}"),
                None => {
                    input_open = false;
                    last_activity = Instant::now();
                }
            },
            frame = client.recv_text() => match frame {
                Ok(text) => {
                    if let Err(e) = print_line(&text) {
                        close_politely(&mut client).await;
                        // The reader is gone (`chatsync connect … | head -1`): nothing left to do.
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            return Ok(());
                        }
                        bail!("cannot write to stdout: {e}");
                    }
                    last_activity = Instant::now();
                    greeted |= text.contains(r#""type":"connected""#);
                    if let Some(id) = final_reply_id(&text) {
                        pending.remove(&id);
                    }
                }
                Err(chatsync_client::ClientError::Closed(close)) => {
                    return closed_by_server(close, &args, config.as_ref()).await;
                }
                Err(e) => bail!("connection to {} lost: {}", args.url, connect_error(&e)),
            },
            _ = &mut ctrl_c => {
                close_politely(&mut client).await;
                return Ok(());
            }
            _ = tokio::time::sleep_until(last_activity + wait), if finishing => {
                close_politely(&mut client).await;
                if !greeted {
                    bail!("no greeting from {} within {} s", args.url, wait.as_secs());
                }
                if !pending.is_empty() {
                    let mut ids: Vec<_> = pending.into_iter().collect();
                    ids.sort();
                    bail!("no reply to request_id {} within {} s", ids.join(", "), wait.as_secs());
                }
                return Ok(());
            }
        }
    }
}

/// Prints one frame as one line on stdout and flushes it (a script reads the replies as they come).
/// Control characters are written as JSON escapes (`\u001b`): JSON leaves DEL and the C1 controls raw in
/// strings, and a server's frame need not be JSON at all, so a message (or a hostile server) could
/// otherwise drive the terminal with escape sequences, or split one frame over several lines. Within a
/// JSON string the escape stands for the same character, so what a script parses is unchanged.
fn print_line(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", escape_controls(text))?;
    out.flush()
}

/// `text` with every control character (C0, DEL, C1) written as a JSON `\uXXXX` escape.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() {
            escaped.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            escaped.push(c);
        }
    }
    escaped.into()
}

/// The `request_id` of a JSON line typed by the user (or of a server message), if any. Only one the server
/// echoes counts: a string of 1-64 printable ASCII characters. Another (a number, `""`, 65 characters) makes
/// the line `invalid_message`, answered without it, and waiting for a reply carrying it would end in a
/// 10 s timeout and exit 1.
fn request_id_of(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    match value.get("request_id")? {
        serde_json::Value::String(s) => chatsync_protocol::RequestId::new(s.as_str()).ok().map(|_| s.clone()),
        _ => None,
    }
}

/// The `request_id` a server message answers, unless more parts of the reply follow.
fn final_reply_id(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if value.pointer("/payload/more").and_then(serde_json::Value::as_bool) == Some(true) {
        return None;
    }
    request_id_of(text)
}

/// Closes with 1000 and waits (briefly) for the server's answer.
async fn close_politely(client: &mut chatsync_client::Client) {
    let _ = tokio::time::timeout(Duration::from_secs(2), client.close_with(1000, "")).await;
}

/// Why a connection attempt failed, in one short phrase (the error chain repeats itself otherwise).
fn connect_error(e: &chatsync_client::ClientError) -> String {
    use tokio_tungstenite::tungstenite::Error as WsError;
    if let chatsync_client::ClientError::Ws(WsError::Http(response)) = e {
        return format!("the server answered HTTP {} instead of a WebSocket upgrade", response.status());
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused (is `chatsync serve` running?)".into(),
                _ => io.to_string(),
            };
        }
        source = err.source();
    }
    match e {
        chatsync_client::ClientError::Ws(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

/// The outcome of a close sent by the server: 1000 ends the command normally, anything else is an error
/// that says the code and reason, with a hint for the refusals a newcomer meets.
async fn closed_by_server(
    close: Option<(u16, String)>,
    args: &ConnectArgs,
    config: Option<&Config>,
) -> anyhow::Result<()> {
    let Some((code, reason)) = close else {
        bail!("the server closed the connection without a close frame");
    };
    if code == 1000 {
        eprintln!("closed by the server: {code} {reason}");
        return Ok(());
    }
    let hint = if reason.starts_with("Device mismatch") {
        let bound = match config {
            Some(config) => bound_device(config, &args.token).await,
            None => None,
        };
        let bound = bound.unwrap_or_else(|| {
            "another device (give the server's --data-dir or --database-url to see which)".to_owned()
        });
        format!(
            ": this command sent --device-id {:?}, but the session is bound to {bound} (at issue, or by its first \
             connection); use that device id, or issue a token for this one \
             (`chatsync sessions issue <user_id> --device-id {}`)",
            args.device_id, args.device_id
        )
    } else if reason == "Invalid session" {
        ": the token is unknown, expired or revoked (issue one with `chatsync sessions issue <user_id> --device-id ID`)"
            .to_owned()
    } else {
        String::new()
    };
    bail!("closed by the server: {code} {reason}{hint}")
}

/// The device the session of `token` is bound to, by label (or hash), read from the store when there
/// is one at the configured place (never created).
async fn bound_device(config: &Config, token: &str) -> Option<String> {
    let url = config.store_url();
    if let Some(path) = url.strip_prefix("sqlite://") {
        if !std::path::Path::new(path).is_file() {
            return None;
        }
    }
    let store = store::open(&url).await.ok()?;
    let session = store.session_by_token_hash(&auth::token_hash(token)).await.ok()??;
    let hash = session.device_hash?;
    let label = store.devices(&session.user_id).await.ok()?.into_iter().find(|d| d.device_hash == hash)?.label;
    store.close().await;
    Some(match label {
        Some(label) => format!("device {label:?}"),
        None => format!("a device without a label (hash {hash})"),
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Whether `id` is a valid user id: 1-64 characters of `[A-Za-z0-9_.@-]`.
pub fn valid_user_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

fn check_user_id(id: &str) -> anyhow::Result<()> {
    if !valid_user_id(id) {
        bail!("malformed user id {id:?}: use 1-64 characters of [A-Za-z0-9_.@-]");
    }
    Ok(())
}

async fn users(config: Config, cmd: UsersCommand) -> anyhow::Result<()> {
    match cmd {
        UsersCommand::Add { user_id, tfa } => {
            check_user_id(&user_id)?;
            let backend = store::open_command_backend(&config.store_url(), store::Durability::Full).await?;
            match backend.identity.create_user(&user_id, tfa, now_millis()).await {
                Ok(()) => {
                    eprintln!("created user {user_id}{}", if tfa { " (2FA)" } else { "" });
                    create_user_keys(&config, backend.chats.as_ref(), &[user_id]).await;
                    Ok(())
                }
                Err(StoreError::AlreadyExists) => {
                    bail!("user {user_id} already exists in {}", store::shown_url(&config.store_url()))
                }
                Err(e) => Err(e.into()),
            }
        }
        UsersCommand::List { json } => {
            let (store, _) = open_existing(&config).await?;
            let users = store.users().await?;
            if json {
                let list: Vec<_> = users
                    .iter()
                    .map(|u| serde_json::json!({"user_id": u.user_id, "tfa": u.tfa_enabled, "created_at": rfc3339(u.created_at)}))
                    .collect();
                return print_json(&serde_json::Value::Array(list));
            }
            out!("{:<24}  {:<3}  {:<20}", "USER_ID", "2FA", "CREATED");
            for u in users {
                out!(
                    "{:<24}  {:<3}  {:<20}",
                    u.user_id,
                    if u.tfa_enabled { "yes" } else { "no" },
                    rfc3339(u.created_at)
                );
            }
            Ok(())
        }
    }
}

async fn sessions(config: Config, cmd: SessionsCommand) -> anyhow::Result<()> {
    match cmd {
        SessionsCommand::Issue { user_id, device_id, device_hash, ttl } => {
            check_user_id(&user_id)?;
            let device_hash = match (&device_id, device_hash) {
                (Some(id), _) => Some(
                    auth::device_hash_for_id(id)
                        .ok_or_else(|| anyhow::anyhow!("malformed device id: use 1-128 printable ASCII characters"))?,
                ),
                (None, Some(h)) => {
                    if !is_device_hash(&h) {
                        bail!("malformed device hash: use 64 lowercase hex characters");
                    }
                    Some(h)
                }
                (None, None) => None,
            };
            if ttl.is_zero() {
                bail!("--ttl must be greater than zero");
            }
            let (store, shown) = open_existing(&config).await?;
            let (token, mut session) = auth::new_session(&user_id, device_hash, ttl);
            session.device_label = device_id;
            match store.create_session(&session).await {
                Ok(()) => {
                    // A secret shown only now: not written is an error (exit 1), not a quiet end as for a listing.
                    print_line(&token).context("the token could not be written; revoke the session")?;
                    Ok(())
                }
                Err(StoreError::NotFound) => {
                    bail!("unknown user {user_id} in {shown} (create it with `chatsync users add {user_id}`)")
                }
                Err(e) => Err(e.into()),
            }
        }
        SessionsCommand::IssueBulk { users, devices, prefix, ttl } => {
            check_user_id(&format!("{prefix}{}", users - 1))?;
            if users as u64 * devices as u64 > 1_000_000 {
                bail!("at most 1,000,000 sessions per call");
            }
            if ttl.is_zero() {
                bail!("--ttl must be greater than zero");
            }
            let user_ids: Vec<String> = (0..users).map(|u| format!("{prefix}{u}")).collect();
            let mut lines = String::new();
            let mut sessions = Vec::with_capacity(user_ids.len() * devices as usize);
            for user_id in &user_ids {
                for d in 0..devices {
                    let device_id = format!("{user_id}-d{d}");
                    let hash = auth::device_hash_for_id(&device_id).expect("generated device ids are valid");
                    let (token, mut session) = auth::new_session(user_id, Some(hash), ttl);
                    let line = serde_json::json!({"user_id": user_id, "device_id": device_id, "token": token});
                    lines.push_str(&line.to_string());
                    lines.push('\n');
                    session.device_label = Some(device_id);
                    sessions.push(session);
                }
            }
            let backend = store::open_command_backend(&config.store_url(), store::Durability::Full).await?;
            backend.identity.provision(&user_ids, &sessions).await?;
            create_user_keys(&config, backend.chats.as_ref(), &user_ids).await;
            use std::io::Write as _;
            std::io::stdout().lock().write_all(lines.as_bytes())?;
            Ok(())
        }
        SessionsCommand::List { user_id, json } => {
            let (store, shown) = open_existing(&config).await?;
            require_user(store.as_ref(), &user_id, &shown).await?;
            let now = now_millis();
            let state = |s: &SessionInfo| {
                if s.revoked_at.is_some() {
                    "revoked"
                } else if s.expires_at.is_some_and(|t| t <= now) {
                    "expired"
                } else {
                    "active"
                }
            };
            let list = store.sessions_of(&user_id).await?;
            if json {
                let list: Vec<_> = list
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "session_id": s.session_id,
                            "state": state(s),
                            "device_label": s.device_label,
                            "device_hash": s.device_hash,
                            "created_at": rfc3339(s.created_at),
                            "expires_at": s.expires_at.map(rfc3339),
                            "revoked_at": s.revoked_at.map(rfc3339),
                        })
                    })
                    .collect();
                return print_json(&serde_json::Value::Array(list));
            }
            out!(
                "{:<32}  {:<7}  {:<20}  {:<20}  {:<20}  DEVICE_HASH",
                "SESSION_ID",
                "STATE",
                "DEVICE",
                "CREATED",
                "EXPIRES"
            );
            for s in &list {
                let device = match (&s.device_label, &s.device_hash) {
                    (Some(label), _) => label.clone(),
                    (None, Some(_)) => "(no label)".to_owned(),
                    (None, None) => "(unbound)".to_owned(),
                };
                out!(
                    "{:<32}  {:<7}  {:<20}  {:<20}  {:<20}  {}",
                    s.session_id,
                    state(s),
                    device,
                    rfc3339(s.created_at),
                    s.expires_at.map(rfc3339).unwrap_or_else(|| "never".into()),
                    s.device_hash.as_deref().unwrap_or("-"),
                );
            }
            Ok(())
        }
        SessionsCommand::Revoke { token } => {
            let (store, _) = open_existing(&config).await?;
            let hash = auth::token_hash(&token);
            let session = store.session_by_token_hash(&hash).await?;
            if !store.revoke_session(&hash, now_millis()).await? {
                bail!("no active session has this token");
            }
            eprintln!("session revoked");
            if let Some(session) = session {
                publish_revocation(&config, vec![session.session_id]).await?;
            }
            Ok(())
        }
    }
}

async fn api_keys(config: Config, cmd: ApiKeysCommand) -> anyhow::Result<()> {
    // A key created in a new, empty database (a command run from the wrong directory) would be refused
    // by the server with 401, without a word on why.
    let (store, _) = open_existing(&config).await?;
    match cmd {
        ApiKeysCommand::Create { name } => {
            if name.as_ref().is_some_and(|n| n.is_empty() || n.chars().count() > 200) {
                bail!("--name must be 1-200 characters");
            }
            let (key_id, key) = crate::api::keys::create(store.as_ref(), name.as_deref()).await?;
            // The id first, so that a key that could not be written can be revoked; a secret shown only
            // now not written is an error (exit 1), not a quiet end as for a listing.
            eprintln!("created API key {key_id}; it is shown only now");
            print_line(&key).with_context(|| format!("the key could not be written; revoke {key_id}"))?;
            Ok(())
        }
        ApiKeysCommand::List { json } => {
            let keys = store.api_keys().await?;
            if json {
                let list: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "key_id": k.key_id,
                            "name": k.name,
                            "created_at": rfc3339(k.created_at),
                            "last_used_at": k.last_used_at.map(rfc3339),
                            "revoked_at": k.revoked_at.map(rfc3339),
                        })
                    })
                    .collect();
                return print_json(&serde_json::Value::Array(list));
            }
            out!("{:<35}  {:<20}  {:<20}  {:<20}  REVOKED", "KEY_ID", "NAME", "CREATED", "LAST_USED");
            for k in keys {
                out!(
                    "{:<35}  {:<20}  {:<20}  {:<20}  {}",
                    k.key_id,
                    k.name.as_deref().unwrap_or("-"),
                    rfc3339(k.created_at),
                    k.last_used_at.map(rfc3339).unwrap_or_else(|| "never".into()),
                    k.revoked_at.map(rfc3339).unwrap_or_else(|| "-".into()),
                );
            }
            Ok(())
        }
        ApiKeysCommand::Revoke { key_id } => {
            let newly = store.revoke_api_key(&key_id, now_millis()).await?;
            let known = newly || store.api_keys().await?.iter().any(|k| k.key_id == key_id);
            if !known {
                bail!("no API key has the id {key_id:?} (see `chatsync api-keys list`)");
            }
            if config.redis_url.is_none() && config.database_url.as_deref().is_some_and(|u| u.starts_with("postgres")) {
                eprintln!(
                    "warning: no --redis-url: nodes running as a cluster (with --redis-url) may accept this key \
                     from their caches for up to {} s; pass the cluster's --redis-url and --redis-prefix",
                    crate::api::key_cache::MAX_AGE.as_secs()
                );
            }
            // In a cluster the nodes' key caches start over (see `api/key_cache.rs`), also for a key revoked
            // before: running the command again repairs a revocation whose epoch could not be written.
            if let Err(e) = crate::api::key_cache::bump_epoch(&config).await {
                bail!(
                    "API key {key_id} is revoked in the store, but Redis did not answer ({e:#}): nodes that \
                     cached the key may still accept it; run this command again once Redis answers"
                );
            }
            if newly {
                eprintln!("API key {key_id} revoked");
            } else {
                eprintln!("API key {key_id} was revoked already");
            }
            Ok(())
        }
    }
}

/// Whether `h` is a device hash: 64 lowercase hex characters.
pub fn is_device_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

async fn devices(config: Config, cmd: DevicesCommand) -> anyhow::Result<()> {
    match cmd {
        DevicesCommand::List { user_id, json } => {
            let (store, shown) = open_existing(&config).await?;
            require_user(store.as_ref(), &user_id, &shown).await?;
            let devices = store.devices(&user_id).await?;
            if json {
                let list: Vec<_> = devices
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "label": d.label,
                            "device_hash": d.device_hash,
                            "first_seen": rfc3339(d.first_seen),
                            "last_seen": rfc3339(d.last_seen),
                        })
                    })
                    .collect();
                return print_json(&serde_json::Value::Array(list));
            }
            out!("{:<20}  {:<64}  {:<20}  {:<20}", "LABEL", "DEVICE_HASH", "FIRST_SEEN", "LAST_SEEN");
            for d in devices {
                let label = d.label.as_deref().unwrap_or("(no label)");
                out!(
                    "{:<20}  {:<64}  {:<20}  {:<20}",
                    label,
                    d.device_hash,
                    rfc3339(d.first_seen),
                    rfc3339(d.last_seen)
                );
            }
            Ok(())
        }
        DevicesCommand::Revoke { user_id, device } => {
            let (store, shown) = open_existing(&config).await?;
            require_user(store.as_ref(), &user_id, &shown).await?;
            let known = store.devices(&user_id).await?;
            // A hash, or a label: labels are device ids, whose hash is known (and unambiguous).
            let listed = known.iter().find(|d| d.device_hash == device || d.label.as_deref() == Some(device.as_str()));
            let by_id = || auth::device_hash_for_id(&device).and_then(|h| known.iter().find(|d| d.device_hash == h));
            let listed = listed.or_else(|| if is_device_hash(&device) { None } else { by_id() });
            // A device that is not listed may still have sessions bound to it: a session is bound by its
            // first connection, as it authenticates, and the device is listed once a connection is admitted
            // (a cap may refuse it). Its hash is the one given, or the hash of the device id given.
            let hash = match listed {
                Some(d) => Some(d.device_hash.clone()),
                None if is_device_hash(&device) => Some(device.clone()),
                None => auth::device_hash_for_id(&device),
            };
            let no_device = || {
                anyhow::anyhow!(
                    "user {user_id} has no device {device:?} in {shown} (see `chatsync devices list {user_id}`)"
                )
            };
            let hash = hash.ok_or_else(no_device)?;
            let name = match listed.and_then(|d| d.label.as_ref()) {
                Some(label) => format!("{label} ({hash})"),
                None if !is_device_hash(&device) => format!("{device} ({hash})"),
                None => hash.clone(),
            };
            let revoked = store.revoke_device(&user_id, &hash, now_millis()).await?;
            if revoked.is_empty() {
                // Known: listed, or named by one of the user's sessions (its sessions revoked before).
                let sessions = store.sessions_of(&user_id).await?;
                if listed.is_none() && !sessions.iter().any(|s| s.device_hash.as_deref() == Some(hash.as_str())) {
                    return Err(no_device());
                }
                bail!("no active session of {user_id} is bound to device {name}");
            }
            eprintln!(
                "revoked {} session{} of {user_id} on device {name}; its connections close with 1008 Session revoked",
                revoked.len(),
                if revoked.len() == 1 { "" } else { "s" }
            );
            publish_revocation(&config, revoked).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    /// A frame's control characters (JSON leaves DEL and C1 raw in strings; a hostile server may send any)
    /// reach the terminal as escapes, on one line, and the JSON a script parses keeps its value.
    #[test]
    fn printed_frames_carry_no_control_character() {
        let content = "red \u{1b}[31m, CSI \u{9b}2J, DEL \u{7f}, line\nbreak";
        let frame = serde_json::json!({"type": "chat_message_added", "payload": {"content": content}}).to_string();
        assert!(frame.contains('\u{9b}') && frame.contains('\u{7f}'), "serde_json leaves these raw: {frame}");
        let printed = escape_controls(&frame);
        assert!(!printed.chars().any(char::is_control), "{printed}");
        let parsed: serde_json::Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(parsed["payload"]["content"], content);
        assert_eq!(escape_controls("raw\u{1b}]0;title\u{7}\r\nx"), "raw\\u001b]0;title\\u0007\\u000d\\u000ax");
        assert!(matches!(escape_controls(r#"{"type":"pong"}"#), std::borrow::Cow::Borrowed(_)));
    }
}
