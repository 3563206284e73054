//! The command line: `serve`, `users`, `sessions`, `devices`. Flags override `CHATSYNC_*` environment
//! variables, which override the TOML file given by `--config`, which overrides the defaults.

use crate::config::{Config, LogFormat};
use crate::gateway::auth;
use crate::store::{self, now_millis, StoreError};
use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// chatsync: real-time sync gateway for multi-device chat applications.
#[derive(Debug, Parser)]
#[command(name = "chatsync", version, about, long_about = None)]
pub struct Cli {
    /// Options shared by every command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts (where the data lives, how to log).
#[derive(Debug, Args, Serialize)]
pub struct GlobalArgs {
    /// TOML configuration file (keys as the long flags, with underscores).
    #[arg(long, global = true, env = "CHATSYNC_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data directory of the embedded store [default: ./data].
    #[arg(long, global = true, env = "CHATSYNC_DATA_DIR", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Store URL, `sqlite://PATH` [default: sqlite://<data-dir>/chatsync.db].
    #[arg(long, global = true, env = "CHATSYNC_DATABASE_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Cluster mode: Redis URL of the delivery bus shared by the nodes, `redis://HOST:PORT` [default: none,
    /// a single node]. `sessions revoke` publishes the revocation on it.
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
    /// Log format [default: text].
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
    #[command(subcommand)]
    Users(UsersCommand),
    /// Issue and revoke sessions (login tokens).
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Inspect the devices known for a user.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Manage the master key that wraps the data keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Connect to a server as a client: prints every server message as a JSON line, sends every JSON
    /// line typed on stdin (e.g. {"type":"ping","request_id":"1"}).
    Connect(ConnectArgs),
}

/// `chatsync connect` options.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Session token (from `chatsync sessions issue`: `cs_…`). Any token is accepted, including old
    /// ones that start with `-`.
    #[arg(long, env = "CHATSYNC_TOKEN", hide_env_values = true, allow_hyphen_values = true)]
    pub token: String,
    /// Device id sent as X-Device-Id.
    #[arg(long, default_value = "cli")]
    pub device_id: String,
    /// Server endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/ws")]
    pub url: String,
}

/// `chatsync keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-wrap every data key under a new, random master key. Stop the server first: like `serve`, it
    /// locks the data directory (<data-dir>/chatsync.lock) and refuses to run while another process holds
    /// it. With a key file (<data-dir>/master.key) the file is replaced, each step flushed to disk so that
    /// a crash at any point leaves readable data; with CHATSYNC_MASTER_KEY the new key is printed on
    /// stdout (before the store is re-wrapped under it) and must then be configured in its place.
    Rotate,
}

/// `chatsync serve` options.
#[derive(Debug, Args, Serialize)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "CHATSYNC_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `full`: every write is fsynced before it is confirmed (survives power loss); `normal`: confirmed
    /// once it reaches the OS (survives a crash of chatsync, not of the machine) [default: full].
    #[arg(long, env = "CHATSYNC_DURABILITY", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durability: Option<crate::store::Durability>,
    /// Largest accepted frame in bytes; larger closes with 1009 [default: 65536].
    #[arg(long, env = "CHATSYNC_MAX_FRAME_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u32>,
    /// Longest chat title, in characters [default: 255].
    #[arg(long, env = "CHATSYNC_MAX_TITLE_CHARS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_title_chars: Option<u32>,
    /// Longest draft text, in characters [default: 7000].
    #[arg(long, env = "CHATSYNC_MAX_DRAFT_CHARS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_draft_chars: Option<u32>,
    /// Most words in a draft [default: 1000].
    #[arg(long, env = "CHATSYNC_MAX_DRAFT_WORDS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_draft_words: Option<u32>,
    /// Most changes in one sync_offline_changes [default: 500].
    #[arg(long, env = "CHATSYNC_MAX_OFFLINE_CHANGES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_offline_changes: Option<u32>,
    /// Most chats in one request_chat_content_batch [default: 50].
    #[arg(long, env = "CHATSYNC_MAX_BATCH_CHATS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_chats: Option<u32>,
    /// Most messages in one page [default: 500].
    #[arg(long, env = "CHATSYNC_MAX_PAGE_MESSAGES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_page_messages: Option<u32>,
    /// Sustained requests per second per connection [default: 100].
    #[arg(long, env = "CHATSYNC_RATE_PER_SEC", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<u32>,
    /// Requests allowed in a burst above the rate [default: 200].
    #[arg(long, env = "CHATSYNC_RATE_BURST", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// Seconds between server Pings [default: 25].
    #[arg(long, env = "CHATSYNC_PING_INTERVAL_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_interval_secs: Option<u64>,
    /// Seconds of client silence before closing with 1001 [default: 60].
    #[arg(long, env = "CHATSYNC_HEARTBEAT_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_secs: Option<u64>,
    /// Outbound queue bound per connection in bytes; beyond it 1013 [default: 1048576].
    #[arg(long, env = "CHATSYNC_OUTBOX_MAX_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_max_bytes: Option<usize>,
    /// Outbound queue bound per connection in messages; beyond it 1013 [default: 1024].
    #[arg(long, env = "CHATSYNC_OUTBOX_MAX_MESSAGES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_max_messages: Option<usize>,
    /// Most connections on this node; beyond it 1013 `Server overloaded` [default: 100000].
    #[arg(long, env = "CHATSYNC_MAX_CONNECTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Serve /metrics, /healthz and /readyz on this address only (e.g. 127.0.0.1:9090) instead of on
    /// --listen next to /v1/ws.
    #[arg(long, env = "CHATSYNC_METRICS_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Most connections of one user on this node; beyond it 1013 `Too many connections` [default: 100].
    #[arg(long, env = "CHATSYNC_MAX_CONNECTIONS_PER_USER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_user: Option<usize>,
    /// Largest server frame; larger replies are split (`more`) or shortened [default: 1048576].
    #[arg(long, env = "CHATSYNC_MAX_REPLY_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_reply_bytes: Option<u32>,
    /// Most chats one user may own; creating one more is `limit_exceeded` [default: 10000].
    #[arg(long, env = "CHATSYNC_MAX_CHATS_PER_USER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_chats_per_user: Option<u32>,
    /// Allowed Origin header values, comma-separated; others get HTTP 403. Cookie authentication is
    /// accepted only from an Origin in this list (none without it) [default: any Origin; no cookies].
    #[arg(long, env = "CHATSYNC_ALLOWED_ORIGINS", value_name = "ORIGINS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    /// Seconds between checks for sessions revoked elsewhere [default: 5].
    #[arg(long, env = "CHATSYNC_SESSION_CHECK_INTERVAL_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_check_interval_secs: Option<u64>,
    /// Seconds to wait for connections to drain on shutdown [default: 10].
    #[arg(long, env = "CHATSYNC_SHUTDOWN_TIMEOUT_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_secs: Option<u64>,
    /// WebSocket read buffer per connection in bytes; larger frames are read in chunks of this size [default: 1024].
    #[arg(long, env = "CHATSYNC_WS_READ_BUFFER_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_read_buffer_bytes: Option<usize>,
    /// Accept JWT connection tokens signed with HS256 and this secret (prefer the environment variable:
    /// a flag shows in the process list) [default: none].
    #[arg(
        long,
        env = "CHATSYNC_JWT_HS256_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        conflicts_with = "jwt_public_key_file"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_hs256_secret: Option<crate::config::Secret>,
    /// Accept JWT connection tokens verified with this PEM public key: RSA (RS256) or EC P-256 (ES256)
    /// [default: none].
    #[arg(long, env = "CHATSYNC_JWT_PUBLIC_KEY_FILE", value_name = "PEM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `aud` claim of JWT connection tokens [default: not checked].
    #[arg(long, env = "CHATSYNC_JWT_AUDIENCE", value_name = "AUD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim of JWT connection tokens [default: not checked].
    #[arg(long, env = "CHATSYNC_JWT_ISSUER", value_name = "ISS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// Clock leeway for the `exp`, `nbf` and `iat` of JWT connection tokens, seconds [default: 0].
    #[arg(long, env = "CHATSYNC_JWT_LEEWAY_SECS", value_name = "SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_leeway_secs: Option<u64>,
}

/// `chatsync users …`
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user.
    Add {
        /// User id: 1-64 characters of [A-Za-z0-9_.@-].
        user_id: String,
        /// The user has two-factor authentication (device mismatches then say `2FA required`).
        #[arg(long)]
        tfa: bool,
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
        /// Bind the session to this device id (as sent in X-Device-Id / device_id).
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
    /// List the devices known for a user, most recently seen first.
    List {
        /// The user.
        user_id: String,
    },
}

impl Cli {
    /// The merged configuration for this invocation.
    pub fn config(&self) -> anyhow::Result<Config> {
        let serve = match &self.command {
            Command::Serve(args) => Some(args),
            _ => None,
        };
        let mut overrides: Vec<&dyn crate::config::erased::Overrides> = vec![&self.global];
        if let Some(s) = serve {
            overrides.push(s);
        }
        Config::load(self.global.config.as_deref(), &overrides).context("invalid configuration")
    }
}

/// Runs the parsed command line. Output meant for scripts goes to stdout; logs go to stderr.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config()?;
    match cli.command {
        Command::Serve(_) => {
            crate::logging::init(config.log_format, &config.log_level);
            serve(config).await
        }
        Command::Users(cmd) => {
            crate::logging::init(config.log_format, "warn");
            users(config, cmd).await
        }
        Command::Sessions(cmd) => {
            crate::logging::init(config.log_format, "warn");
            sessions(config, cmd).await
        }
        Command::Devices(cmd) => {
            crate::logging::init(config.log_format, "warn");
            devices(config, cmd).await
        }
        Command::Connect(args) => connect(args).await,
        Command::Keys(KeysCommand::Rotate) => {
            crate::logging::init(config.log_format, "warn");
            let backend = store::open_backend(&config.store_url(), config.durability).await?;
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

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    // Every connection is a file descriptor: take the hard limit, not the (often 1024) soft one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let ctx = crate::build(config).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "chatsync listening on ws://{addr}/v1/ws");
    crate::run(listener, ctx, shutdown_signal()).await
}

/// `chatsync connect`: a line-oriented WebSocket client for trying the protocol by hand.
async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    let opts = chatsync_client::ConnectOptions::new(&args.token, &args.device_id);
    let mut client = chatsync_client::Client::connect(&args.url, &opts).await.context("cannot connect")?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => client.send_text(line).await?,
                None => stdin_open = false,
            },
            frame = client.recv_text() => match frame {
                Ok(text) => println!("{text}"),
                Err(chatsync_client::ClientError::Closed(close)) => {
                    match close {
                        Some((code, reason)) => eprintln!("closed by the server: {code} {reason}"),
                        None => eprintln!("connection closed"),
                    }
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            },
        }
    }
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
    let UsersCommand::Add { user_id, tfa } = cmd;
    check_user_id(&user_id)?;
    let store = store::open(&config.store_url()).await?;
    match store.create_user(&user_id, tfa, now_millis()).await {
        Ok(()) => {
            eprintln!("created user {user_id}{}", if tfa { " (2FA)" } else { "" });
            Ok(())
        }
        Err(StoreError::AlreadyExists) => bail!("user {user_id} already exists"),
        Err(e) => Err(e.into()),
    }
}

async fn sessions(config: Config, cmd: SessionsCommand) -> anyhow::Result<()> {
    match cmd {
        SessionsCommand::Issue { user_id, device_id, device_hash, ttl } => {
            check_user_id(&user_id)?;
            let device_hash = match (device_id, device_hash) {
                (Some(id), _) => Some(
                    auth::device_hash_for_id(&id)
                        .ok_or_else(|| anyhow::anyhow!("malformed device id: use 1-128 printable ASCII characters"))?,
                ),
                (None, Some(h)) => {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                        bail!("malformed device hash: use 64 lowercase hex characters");
                    }
                    Some(h)
                }
                (None, None) => None,
            };
            if ttl.is_zero() {
                bail!("--ttl must be greater than zero");
            }
            let store = store::open(&config.store_url()).await?;
            match auth::issue_session(store.as_ref(), &user_id, device_hash, ttl).await {
                Ok(token) => {
                    println!("{token}");
                    Ok(())
                }
                Err(StoreError::NotFound) => {
                    bail!("unknown user {user_id} (create it with `chatsync users add {user_id}`)")
                }
                Err(e) => Err(e.into()),
            }
        }
        SessionsCommand::IssueBulk { users, devices, prefix, ttl } => {
            check_user_id(&format!("{prefix}{}", users - 1))?;
            if users as u64 * devices as u64 > 1_000_000 {
                bail!("at most 1,000,000 sessions per call");
            }
            let user_ids: Vec<String> = (0..users).map(|u| format!("{prefix}{u}")).collect();
            let mut lines = String::new();
            let mut sessions = Vec::with_capacity(user_ids.len() * devices as usize);
            for user_id in &user_ids {
                for d in 0..devices {
                    let device_id = format!("{user_id}-d{d}");
                    let hash = auth::device_hash_for_id(&device_id).expect("generated device ids are valid");
                    let (token, session) = auth::new_session(user_id, Some(hash), ttl);
                    let line = serde_json::json!({"user_id": user_id, "device_id": device_id, "token": token});
                    lines.push_str(&line.to_string());
                    lines.push('\n');
                    sessions.push(session);
                }
            }
            let store = store::open(&config.store_url()).await?;
            store.provision(&user_ids, &sessions).await?;
            use std::io::Write as _;
            std::io::stdout().lock().write_all(lines.as_bytes())?;
            Ok(())
        }
        SessionsCommand::Revoke { token } => {
            let store = store::open(&config.store_url()).await?;
            let hash = auth::token_hash(&token);
            let session = store.session_by_token_hash(&hash).await?;
            if !store.revoke_session(&hash, now_millis()).await? {
                bail!("no active session has this token");
            }
            eprintln!("session revoked");
            if let (Some(bus), Some(session)) = (config.bus(), session) {
                // Every node closes the session's sockets now; polling remains the fallback.
                let env_key = std::env::var("CHATSYNC_MASTER_KEY").ok().filter(|k| !k.is_empty());
                let message = crate::cluster::BusMessage::SessionsRevoked { session_ids: vec![session.session_id] };
                let published = match crate::keys::existing_master_key(&config.data_dir, env_key.as_deref())? {
                    Some(master) => crate::cluster::bus::publish_once(&bus, &master.derive("bus"), message).await,
                    None => Err(anyhow::anyhow!("no master key here (set CHATSYNC_MASTER_KEY)")),
                };
                if let Err(e) = published {
                    eprintln!(
                        "warning: could not tell the cluster through Redis ({e:#}); nodes close the session's \
                         connections at their next revocation check"
                    );
                }
            }
            Ok(())
        }
    }
}

async fn devices(config: Config, cmd: DevicesCommand) -> anyhow::Result<()> {
    let DevicesCommand::List { user_id } = cmd;
    check_user_id(&user_id)?;
    let store = store::open(&config.store_url()).await?;
    if store.user(&user_id).await?.is_none() {
        bail!("unknown user {user_id}");
    }
    let fmt = |ms: i64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64))
    };
    println!("{:<64}  {:<20}  {:<20}", "DEVICE_HASH", "FIRST_SEEN", "LAST_SEEN");
    for d in store.devices(&user_id).await? {
        println!("{:<64}  {:<20}  {:<20}", d.device_hash, fmt(d.first_seen), fmt(d.last_seen));
    }
    Ok(())
}
