//! Server configuration: defaults, an optional TOML file, `CHATSYNC_*` environment variables and flags,
//! in increasing precedence. The clap definitions live in `cli.rs`; this file owns the merged result.

use chatsync_protocol::Limits;
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The largest value of a setting in seconds (a year): see [`Config::validate`].
pub const MAX_SECS: u64 = 365 * 86_400;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The merged configuration of one `chatsync` process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory for the embedded store (`chatsync.db`).
    pub data_dir: PathBuf,
    /// Store URL; `sqlite://PATH` or `postgres://…` (default: `sqlite://<data_dir>/chatsync.db`).
    pub database_url: Option<String>,
    /// Cluster mode: the Redis URL of the delivery bus (`None`: a single node, in-process hub).
    pub redis_url: Option<String>,
    /// Prefix of bus channel names.
    pub redis_prefix: String,
    /// Sharded pub/sub on the bus.
    pub redis_sharded_pubsub: bool,
    /// When a write counts as durable (embedded store).
    pub durability: crate::store::Durability,
    /// How long, microseconds, the chat writer (SQLite or PostgreSQL) waits when it takes a write with
    /// none queued behind it, for more writes to share the transaction (and its fsync); 0: commit at once.
    /// Unset: the store's default ([`Config::commit_window`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_window_us: Option<u64>,
    /// Seconds a batch of writes may take in PostgreSQL before its writes fail with `unavailable`.
    pub store_timeout_secs: u64,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `chatsync=debug`.
    pub log_level: String,
    /// Largest accepted text frame, bytes.
    pub max_frame_bytes: u32,
    /// Longest title, characters.
    pub max_title_chars: u32,
    /// Longest draft text, characters.
    pub max_draft_chars: u32,
    /// Most words in a draft.
    pub max_draft_words: u32,
    /// Most changes per `sync_offline_changes`.
    pub max_offline_changes: u32,
    /// Most chats per `request_chat_content_batch`.
    pub max_batch_chats: u32,
    /// Most messages per page.
    pub max_page_messages: u32,
    /// Sustained requests per second per connection.
    pub rate_per_sec: u32,
    /// Burst above the sustained rate.
    pub rate_burst: u32,
    /// Largest server frame, bytes (replies above it are split or shortened).
    pub max_reply_bytes: u32,
    /// Most chats one user may own.
    pub max_chats_per_user: u32,
    /// Seconds between server WebSocket Pings.
    pub ping_interval_secs: u64,
    /// Seconds of silence (no frame, no Pong) before closing with 1001 `Heartbeat timeout`.
    pub heartbeat_timeout_secs: u64,
    /// Outbound queue bound per connection, bytes.
    pub outbox_max_bytes: usize,
    /// Outbound queue bound per connection, messages.
    pub outbox_max_messages: usize,
    /// Most connections this node accepts; beyond it: 1013 `Server overloaded`.
    pub max_connections: usize,
    /// Most connections of one user on this node; beyond it: 1013 `Too many connections`.
    pub max_connections_per_user: usize,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: on `listen`, next to `/v1/ws`.
    pub metrics_listen: Option<SocketAddr>,
    /// Allowed `Origin` values; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Seconds between checks for sessions revoked elsewhere (CLI, another node).
    pub session_check_interval_secs: u64,
    /// Seconds to wait for connections to drain and API requests in flight to finish on shutdown.
    pub shutdown_timeout_secs: u64,
    /// How long an HTTP request head may take, and a keep-alive HTTP connection may stay idle, seconds.
    pub http_idle_timeout_secs: u64,
    /// WebSocket read buffer per connection, bytes.
    pub ws_read_buffer_bytes: usize,
    /// JWT connection tokens signed with HS256 and this secret, at least 32 bytes (SERVER_API.md section 6).
    pub jwt_hs256_secret: Option<Secret>,
    /// JWT connection tokens signed with the private half of this PEM public key (RSA: RS256; EC
    /// P-256: ES256). Exclusive with `jwt_hs256_secret`.
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `aud` of JWT connection tokens (unchecked when `None`).
    pub jwt_audience: Option<String>,
    /// Required `iss` of JWT connection tokens (unchecked when `None`).
    pub jwt_issuer: Option<String>,
    /// Clock leeway for a JWT's `exp`, `nbf` and `iat`, seconds.
    pub jwt_leeway_secs: u64,
    /// Where webhook events are POSTed (SERVER_API.md section 5); `None`: no event is recorded.
    pub webhook_url: Option<String>,
    /// The HMAC-SHA256 key of the `X-Chatsync-Signature` header (required with `webhook_url`).
    pub webhook_secret: Option<Secret>,
    /// Seconds after which an undelivered webhook event is dropped (with an error log).
    pub webhook_max_age_secs: u64,
    /// First retry delay of a failed webhook delivery, milliseconds (doubling, capped at 5 min). Not a
    /// flag: tests make it small.
    #[doc(hidden)]
    pub webhook_backoff_base_ms: u64,
    /// Do not serve the web demo (`/`, `/sdk/…`) on `listen`.
    pub no_web_demo: bool,
    /// Seconds without a chunk after which an open stream is cancelled with reason `timeout`.
    pub stream_idle_timeout_secs: u64,
    /// Most text one stream may accumulate, bytes (beyond it a chunk is `limit_exceeded`).
    pub max_stream_bytes: usize,
    /// Most streams one user may have open at once (beyond it a start is `limit_exceeded`).
    pub max_open_streams_per_user: usize,
    /// Sustained `/v1/api` requests per second per API key on each node (0: no limit).
    pub api_rate_per_sec: u32,
    /// Size of each API key's bucket, requests (0: one second's worth, the rate itself).
    pub api_rate_burst: u32,
}

/// A secret configuration value: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Default for Config {
    fn default() -> Self {
        let l = Limits::default();
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            redis_url: None,
            redis_prefix: "chatsync:".into(),
            redis_sharded_pubsub: false,
            durability: crate::store::Durability::Full,
            commit_window_us: None,
            store_timeout_secs: 30,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            max_frame_bytes: l.max_frame_bytes,
            max_title_chars: l.max_title_chars,
            max_draft_chars: l.max_draft_chars,
            max_draft_words: l.max_draft_words,
            max_offline_changes: l.max_offline_changes,
            max_batch_chats: l.max_batch_chats,
            max_page_messages: l.max_page_messages,
            rate_per_sec: l.rate_per_sec,
            rate_burst: l.rate_burst,
            max_reply_bytes: l.max_reply_bytes,
            max_chats_per_user: 10_000,
            ping_interval_secs: 25,
            heartbeat_timeout_secs: 60,
            outbox_max_bytes: 1 << 20,
            outbox_max_messages: 1024,
            max_connections: 100_000,
            max_connections_per_user: 100,
            allowed_origins: Vec::new(),
            metrics_listen: None,
            session_check_interval_secs: 5,
            shutdown_timeout_secs: 10,
            http_idle_timeout_secs: 75,
            ws_read_buffer_bytes: 1024,
            jwt_hs256_secret: None,
            jwt_public_key_file: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_leeway_secs: 0,
            webhook_url: None,
            webhook_secret: None,
            webhook_max_age_secs: 86_400,
            webhook_backoff_base_ms: 1000,
            no_web_demo: false,
            stream_idle_timeout_secs: 60,
            max_stream_bytes: 262_144,
            max_open_streams_per_user: 16,
            api_rate_per_sec: 0,
            api_rate_burst: 0,
        }
    }
}

impl Config {
    /// Merges defaults, the TOML file (if any), and the overrides from flags and environment
    /// (`overrides` serializes only the values that were given).
    pub fn load(file: Option<&Path>, overrides: &[&dyn erased::Overrides]) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
            fig = fig.merge(Toml::file(path));
        }
        for o in overrides {
            fig = o.merge_into(fig);
        }
        let config: Config = fig.extract()?;
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }

    /// Checks values that defaults, files and flags cannot express as types (also run by `build`).
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("store_timeout_secs", self.store_timeout_secs),
            ("rate_per_sec", self.rate_per_sec as u64),
            ("rate_burst", self.rate_burst as u64),
            ("max_page_messages", self.max_page_messages as u64),
            ("ping_interval_secs", self.ping_interval_secs),
            ("heartbeat_timeout_secs", self.heartbeat_timeout_secs),
            ("http_idle_timeout_secs", self.http_idle_timeout_secs),
            ("outbox_max_bytes", self.outbox_max_bytes as u64),
            ("outbox_max_messages", self.outbox_max_messages as u64),
            ("max_connections", self.max_connections as u64),
            ("max_connections_per_user", self.max_connections_per_user as u64),
            ("max_chats_per_user", self.max_chats_per_user as u64),
            ("session_check_interval_secs", self.session_check_interval_secs),
            ("ws_read_buffer_bytes", self.ws_read_buffer_bytes as u64),
            ("stream_idle_timeout_secs", self.stream_idle_timeout_secs),
            ("max_stream_bytes", self.max_stream_bytes as u64),
            ("max_open_streams_per_user", self.max_open_streams_per_user as u64),
            // At 0 every request that carries one of these would be refused.
            ("max_title_chars", self.max_title_chars as u64),
            ("max_draft_chars", self.max_draft_chars as u64),
            ("max_draft_words", self.max_draft_words as u64),
            ("max_offline_changes", self.max_offline_changes as u64),
            ("max_batch_chats", self.max_batch_chats as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        // Timers are set as instants this far ahead (every connection's first Ping, the shutdown's
        // deadline): near u64::MAX seconds the addition overflows, a panic in every connection or at
        // shutdown. A year is beyond any meaningful value of these.
        let seconds = [
            ("ping_interval_secs", self.ping_interval_secs),
            ("heartbeat_timeout_secs", self.heartbeat_timeout_secs),
            ("session_check_interval_secs", self.session_check_interval_secs),
            ("shutdown_timeout_secs", self.shutdown_timeout_secs),
            ("http_idle_timeout_secs", self.http_idle_timeout_secs),
            ("stream_idle_timeout_secs", self.stream_idle_timeout_secs),
            ("store_timeout_secs", self.store_timeout_secs),
            ("webhook_max_age_secs", self.webhook_max_age_secs),
        ];
        for (name, v) in seconds {
            if v > MAX_SECS {
                return Err(format!("{name} is at most {MAX_SECS} (a year)"));
            }
        }
        // A PostgreSQL store runs with `statement_timeout` set to it, whose range ends at 2^31 - 1 ms (24.8
        // days): past that every connection would be refused. A day is already far beyond any use.
        if self.store_timeout_secs > 86_400 {
            return Err("store_timeout_secs is at most 86400 (a day)".into());
        }
        // Silence is checked at each Ping: a client that answers every Ping at once has been silent for a
        // whole interval when the next check comes (and one that sent nothing since it connected, a little
        // longer). With a timeout not above the interval, every idle, healthy connection is closed.
        if self.heartbeat_timeout_secs <= self.ping_interval_secs {
            return Err(format!(
                "heartbeat_timeout_secs ({}) must be greater than ping_interval_secs ({}): silence is checked at \
                 each Ping, so a client that answers every Ping is silent for a whole interval at the next check",
                self.heartbeat_timeout_secs, self.ping_interval_secs
            ));
        }
        // Each connection allocates the whole buffer when it reads; one beyond the largest message
        // tungstenite reads (4 x max_frame_bytes) is never filled, and a huge one aborts the process at the
        // first connection (a failed allocation).
        let largest_read = (self.max_frame_bytes as u64).saturating_mul(4);
        if self.ws_read_buffer_bytes as u64 > largest_read {
            return Err(format!(
                "ws_read_buffer_bytes is at most 4 x max_frame_bytes ({largest_read}): the largest message read"
            ));
        }
        if self.commit_window_us.is_some_and(|us| us > 100_000) {
            return Err(
                "commit_window_us is at most 100000 (100 ms): every write that finds the writer idle waits that long"
                    .into(),
            );
        }
        // SQLite opens an empty name, `:memory:` and (URI names are on) `file:` URIs such as `file::memory:`
        // as a private, temporary database per connection: commands would report success into a database
        // gone at exit, and a server's connections would each see a database of their own.
        if let Some(path) = self.database_url.as_deref().and_then(|u| u.strip_prefix("sqlite://")) {
            if path.is_empty() || path == ":memory:" || path.starts_with("file:") {
                return Err(format!(
                    "database_url {:?} is not a database file: write sqlite://PATH with the path of the file",
                    self.database_url.as_deref().unwrap_or_default()
                ));
            }
        }
        // A directive that does not parse was ignored with a note, which could leave no log at all.
        // tracing reads a directive with a space around it as a target name (`chatsync=debug, info`: the
        // target ` info`, so no info lines; `warn `: nothing logged at all), or fails on it with a message
        // that does not say why (`info, chatsync=debug`).
        if let Some(spaced) = self.log_level.split(',').find(|d| !d.trim().is_empty() && d.trim() != *d) {
            return Err(format!(
                "log_level {:?}: the directive {spaced:?} has a space around it, which tracing would take as \
                 part of a target name; write the directives without spaces (chatsync=debug,info)",
                self.log_level
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log_level) {
            return Err(format!("log_level {:?} is not a valid log filter: {e}", self.log_level));
        }
        // (Directives are untrimmed from here on: one with a space around it was refused above.)
        // A bare word that is not a level parses as a target name with every level on: `warning` (as
        // uvicorn and Python's logging spell it) logged nothing at all, not even the listening address.
        if let Some(word) = self.log_level.split(',').find(|d| is_unknown_bare_word(d)) {
            return Err(format!(
                "log_level {word:?} is neither a level (off, error, warn, info, debug, trace, or 0 to 5) nor TARGET=LEVEL; \
                 to log every level of one target, write {word}=trace"
            ));
        }
        // Both bound would only fail at start with `address in use`, after the store was opened.
        if let Some(metrics) = self.metrics_listen {
            if binds_collide(metrics, self.listen) {
                return Err(format!("metrics_listen {metrics} and listen {} cannot share a port", self.listen));
            }
        }
        for origin in &self.allowed_origins {
            check_origin(origin)?;
        }
        // Clock skew is seconds or minutes; past a day `exp` hardly means anything, and past the epoch's
        // age the JWT library's `now - leeway` overflows.
        if self.jwt_leeway_secs > 86_400 {
            return Err("jwt_leeway_secs is at most 86400 (a day): it allows for clock skew".into());
        }
        if self.jwt_hs256_secret.is_some() && self.jwt_public_key_file.is_some() {
            return Err("jwt_hs256_secret and jwt_public_key_file are exclusive: configure one".into());
        }
        if let Some(url) = &self.webhook_url {
            let parsed = reqwest::Url::parse(url).map_err(|e| format!("webhook_url is not a valid URL: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err("webhook_url must be an http:// or https:// URL".into());
            }
            if self.webhook_secret.as_ref().is_none_or(|s| s.expose().is_empty()) {
                return Err("webhook_url needs webhook_secret (the key that signs every delivery)".into());
            }
        }
        if self.max_frame_bytes < 1024 {
            return Err("max_frame_bytes must be at least 1024".into());
        }
        // Bounded replies: the largest single item must fit in one reply frame: an initial sync entry
        // (a draft of up to one inbound frame, a title, versions) and the whole chat order (sent in one
        // part: at most 67 bytes per chat id).
        let entry_bytes = self.max_frame_bytes as u64 + 16_384;
        let order_bytes = 67 * self.max_chats_per_user as u64 + 8192;
        // `offline_sync_complete` has no parts: one result per change, each at most 184 bytes besides the
        // ids it echoes from the request (which fit in one inbound frame), and the envelope.
        let offline_bytes = self.max_frame_bytes as u64 + 184 * self.max_offline_changes as u64 + 512;
        let min_reply = entry_bytes.max(order_bytes).max(offline_bytes).max(65_536);
        if (self.max_reply_bytes as u64) < min_reply {
            return Err(format!(
                "max_reply_bytes must be at least {min_reply} (64 KiB, max_frame_bytes + 16 KiB, room for the chat \
                 order of max_chats_per_user chats, and max_frame_bytes + 184 bytes per max_offline_changes \
                 for the offline summary)"
            ));
        }
        Ok(())
    }

    /// The limits announced in `connected` and enforced by the handlers.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_title_chars: self.max_title_chars,
            max_draft_chars: self.max_draft_chars,
            max_draft_words: self.max_draft_words,
            max_offline_changes: self.max_offline_changes,
            max_batch_chats: self.max_batch_chats,
            max_page_messages: self.max_page_messages,
            rate_per_sec: self.rate_per_sec,
            rate_burst: self.rate_burst,
            max_reply_bytes: self.max_reply_bytes,
        }
    }

    /// The store URL: `database_url`, or the SQLite file in `data_dir`.
    pub fn store_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("chatsync.db").display()),
        }
    }

    /// The chat writer's commit window: `commit_window_us`, or the store's default. The embedded store
    /// waits 1 ms: its transaction ends in an fsync at `full`, which the window shares (11-17% less CPU
    /// per write at ordinary load). PostgreSQL waits 250 µs: its commit is a round trip, and in the
    /// three-node benchmark 250 µs took 1.2 ms off the median write against 1 ms, for ~30% more
    /// transactions (BENCHMARKS.md).
    pub fn commit_window(&self) -> Duration {
        let default = if self.database_url.as_deref().is_some_and(|u| u.starts_with("postgres")) { 250 } else { 1000 };
        Duration::from_micros(self.commit_window_us.unwrap_or(default))
    }

    /// The bus configuration, in cluster mode.
    pub fn bus(&self) -> Option<crate::cluster::BusConfig> {
        self.redis_url.as_ref().map(|url| crate::cluster::BusConfig {
            url: url.clone(),
            prefix: self.redis_prefix.clone(),
            sharded: self.redis_sharded_pubsub,
            max_incoming: crate::cluster::bus::MAX_INCOMING,
            max_incoming_bytes: crate::cluster::bus::MAX_INCOMING_BYTES,
        })
    }

    /// Interval between server Pings.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }

    /// Silence after which a connection is closed.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs(self.heartbeat_timeout_secs)
    }
}

/// Checks one `allowed_origins` entry. The gateway compares it byte for byte with the `Origin` header, so
/// it must be written as browsers serialize an origin (`scheme://host[:port]`: lowercase, no default port,
/// no path, no trailing slash); anything else would refuse that site without a word. `null` (sent by
/// sandboxed frames and local files, whichever site they come from) would let any page use the cookie.
fn check_origin(origin: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(origin).ok();
    // Schemes without a URL-standard origin (capacitor://localhost, chrome-extension://ID, tauri://…) are
    // sent as written: `scheme://host[:port]` with nothing after it.
    if let Some(u) = parsed.as_ref().filter(|u| !u.origin().is_tuple() && origin != "null") {
        let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
        let bare = u.path().is_empty() && u.query().is_none() && u.fragment().is_none() && u.username().is_empty();
        if bare && u.host_str().is_some_and(|host| origin == format!("{}://{host}{port}", u.scheme())) {
            return Ok(());
        }
    }
    let serialized = parsed.map(|u| u.origin()).filter(|o| o.is_tuple()).map(|o| o.ascii_serialization());
    match serialized {
        Some(s) if s == origin => Ok(()),
        Some(s) => Err(format!(
            "allowed_origins: {origin:?} is not an origin as browsers send it in the Origin header; write it as {s:?}"
        )),
        None if origin.is_empty() => Err("allowed_origins: an entry is empty (a trailing comma, or \
             CHATSYNC_ALLOWED_ORIGINS set to nothing: unset it to allow any Origin)"
            .into()),
        None if origin == "null" => {
            Err("allowed_origins: \"null\" is the Origin of sandboxed frames and local files on any site's behalf; \
             it cannot be allowed"
                .into())
        }
        None => Err(format!(
            "allowed_origins: {origin:?} is not an origin: list each one as scheme://host[:port], e.g. \
             https://app.example.com (no wildcards, comma-separated without spaces)"
        )),
    }
}

/// Object-safe "merge my given values into a figment" for the clap argument structs.
pub mod erased {
    use figment::providers::Serialized;
    use figment::Figment;
    use serde::Serialize;

    /// A set of overrides (flags and environment) that serializes only the values given.
    pub trait Overrides {
        /// Merges these overrides on top of `fig`.
        fn merge_into(&self, fig: Figment) -> Figment;
    }

    impl<T: Serialize> Overrides for T {
        fn merge_into(&self, fig: Figment) -> Figment {
            fig.merge(Serialized::defaults(self))
        }
    }
}

/// A log directive of one word (no `=`, span filter or path) that is not a level: a name (`warning`) or a
/// number (`30`) that tracing's own parser (the one `EnvFilter` asks) does not take for a level, so that
/// `EnvFilter` takes it for a target name. This server's own crates (`chatsync`, `chatsync_protocol`) are
/// targets that one may mean that way (every level of them).
fn is_unknown_bare_word(directive: &str) -> bool {
    !directive.is_empty()
        && !directive.starts_with("chatsync")
        && directive.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && directive.parse::<tracing_subscriber::filter::LevelFilter>().is_err()
}

/// Whether listening on `a` and on `b` at once fails with `address in use` (Linux, whose IPv6 sockets take
/// the IPv4 addresses too unless `net.ipv6.bindv6only` is set): the same port (not 0, a free one) and the
/// same address, or either address unspecified in its family, or `[::]` (dual stack) with any address.
/// `0.0.0.0` and an IPv6 address bind side by side.
fn binds_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    // `[::ffff:127.0.0.1]` binds 127.0.0.1.
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let dual_stack = |ip: std::net::IpAddr| ip.is_ipv6() && ip.is_unspecified();
    x == y
        || (x.is_ipv4() == y.is_ipv4() && (x.is_unspecified() || y.is_unspecified()))
        || dual_stack(x)
        || dual_stack(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Over {
        #[serde(skip_serializing_if = "Option::is_none")]
        rate_burst: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        max_frame_bytes: Option<u32>,
    }

    #[test]
    fn the_commit_window_defaults_to_the_store_s_own_and_a_set_value_wins() {
        let ms = Duration::from_millis;
        assert_eq!(Config::default().commit_window(), ms(1));
        for url in ["postgres://h/db", "postgresql://h/db"] {
            let pg = Config { database_url: Some(url.into()), ..Config::default() };
            assert_eq!(pg.commit_window(), Duration::from_micros(250), "{url}");
            assert_eq!(Config { commit_window_us: Some(0), ..pg }.commit_window(), Duration::ZERO);
        }
        assert_eq!(Config { commit_window_us: Some(3000), ..Config::default() }.commit_window(), ms(3));
    }

    #[test]
    fn validation_refuses_zero_limits_and_a_commit_window_past_100_ms() {
        assert_eq!(Config::default().validate(), Ok(()));
        let zero_rate = Config { rate_per_sec: 0, ..Config::default() };
        assert_eq!(zero_rate.validate().unwrap_err(), "rate_per_sec must be greater than 0");
        assert_eq!(Config { commit_window_us: Some(0), ..Config::default() }.validate(), Ok(()), "0 commits at once");
        assert_eq!(Config { commit_window_us: Some(100_000), ..Config::default() }.validate(), Ok(()));
        let too_long = Config { commit_window_us: Some(100_001), ..Config::default() };
        assert!(too_long.validate().unwrap_err().starts_with("commit_window_us is at most 100000"));
    }

    /// `--metrics-listen` on the port of `--listen` is refused only where the two binds collide: an IPv4
    /// and an IPv6 address on one port bind side by side unless one of them is `[::]` (dual stack, which
    /// takes the IPv4 addresses too, Linux's default); `0.0.0.0` does not take IPv6 ones.
    #[test]
    fn validation_refuses_a_metrics_address_only_where_its_bind_collides_with_the_listener_s() {
        let with = |listen: &str, metrics: &str| Config {
            listen: listen.parse().unwrap(),
            metrics_listen: Some(metrics.parse().unwrap()),
            ..Config::default()
        };
        let apart = [
            ("0.0.0.0:8080", "[::1]:8080"),
            ("127.0.0.1:8080", "[::1]:8080"),
            ("127.0.0.1:8080", "10.0.0.1:8080"),
            ("127.0.0.1:8080", "127.0.0.1:9090"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ];
        for (listen, metrics) in apart {
            assert_eq!(with(listen, metrics).validate(), Ok(()), "{listen} {metrics}");
            assert_eq!(with(metrics, listen).validate(), Ok(()), "{metrics} {listen}");
        }
        let collide = [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("0.0.0.0:8080", "10.0.0.1:8080"),
            ("[::1]:8080", "[::]:8080"),
            ("[::]:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "[::]:8080"),
            ("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080"),
        ];
        for (listen, metrics) in collide {
            let err = with(listen, metrics).validate().err().unwrap_or_default();
            assert!(err.contains("cannot share a port"), "{listen} {metrics}: {err:?}");
            let err = with(metrics, listen).validate().err().unwrap_or_default();
            assert!(err.contains("cannot share a port"), "{metrics} {listen}: {err:?}");
        }
    }

    /// A number that is not a level (`30`, Python's WARNING) parses as a target name, as `warning` does:
    /// the server logged nothing. Only 0-5 are levels.
    #[test]
    fn validation_refuses_a_log_filter_number_that_is_not_a_level() {
        let with = |filter: &str| Config { log_level: filter.into(), ..Config::default() };
        for filter in ["30", "6", "info,10", "255", "256"] {
            let err = with(filter).validate().err().unwrap_or_default();
            assert!(err.contains("neither a level"), "{filter}: {err:?}");
        }
        for filter in [
            "0",
            "3",
            "5",
            "03",
            "WARN",
            "Debug",
            "chatsync=debug,warn",
            "chatsync::api",
            "chatsync",
            "info,chatsync_protocol",
            "[conn]=debug",
        ] {
            assert_eq!(with(filter).validate(), Ok(()), "{filter}");
        }
    }

    #[test]
    fn validation_refuses_a_heartbeat_timeout_not_above_the_ping_interval() {
        let with = |ping, heartbeat| Config {
            ping_interval_secs: ping,
            heartbeat_timeout_secs: heartbeat,
            ..Config::default()
        };
        assert_eq!(with(25, 60).validate(), Ok(()));
        assert_eq!(with(1, 2).validate(), Ok(()));
        for (ping, heartbeat) in [(60, 10), (25, 25), (1, 1)] {
            let err = with(ping, heartbeat).validate().unwrap_err();
            assert!(err.starts_with("heartbeat_timeout_secs") && err.contains("ping_interval_secs"), "{err}");
        }
    }

    #[test]
    fn validation_refuses_timers_past_a_year_and_a_read_buffer_past_the_largest_message() {
        let year = Config {
            ping_interval_secs: MAX_SECS - 1,
            heartbeat_timeout_secs: MAX_SECS,
            session_check_interval_secs: MAX_SECS,
            shutdown_timeout_secs: MAX_SECS,
            stream_idle_timeout_secs: MAX_SECS,
            store_timeout_secs: 86_400,
            webhook_max_age_secs: MAX_SECS,
            ..Config::default()
        };
        assert_eq!(year.validate(), Ok(()));
        let over = Config { store_timeout_secs: 86_401, ..Config::default() };
        assert_eq!(over.validate().unwrap_err(), "store_timeout_secs is at most 86400 (a day)");
        // At 0 a limit would refuse every request that carries what it limits.
        for zero in [
            Config { max_title_chars: 0, ..Config::default() },
            Config { max_draft_chars: 0, ..Config::default() },
            Config { max_draft_words: 0, ..Config::default() },
            Config { max_offline_changes: 0, ..Config::default() },
            Config { max_batch_chats: 0, ..Config::default() },
        ] {
            assert!(zero.validate().unwrap_err().ends_with("must be greater than 0"), "{zero:?}");
        }
        let huge = u64::MAX;
        for config in [
            Config { ping_interval_secs: huge, heartbeat_timeout_secs: huge, ..Config::default() },
            Config { heartbeat_timeout_secs: MAX_SECS + 1, ..Config::default() },
            Config { session_check_interval_secs: huge, ..Config::default() },
            Config { shutdown_timeout_secs: huge, ..Config::default() },
            Config { stream_idle_timeout_secs: huge, ..Config::default() },
            Config { store_timeout_secs: huge, ..Config::default() },
            Config { webhook_max_age_secs: huge, ..Config::default() },
        ] {
            assert!(config.validate().unwrap_err().contains("is at most 31536000 (a year)"), "{config:?}");
        }
        let frame = Config::default().max_frame_bytes as usize;
        assert_eq!(Config { ws_read_buffer_bytes: 4 * frame, ..Config::default() }.validate(), Ok(()));
        let over = Config { ws_read_buffer_bytes: 4 * frame + 1, ..Config::default() };
        assert!(over.validate().unwrap_err().starts_with("ws_read_buffer_bytes is at most"));
    }

    #[test]
    fn the_cap_of_open_streams_is_16_unless_the_file_or_a_flag_says_otherwise_and_never_0() {
        use clap::Parser;
        assert_eq!(Config::default().max_open_streams_per_user, 16);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "max_open_streams_per_user = 4\n").unwrap();
        assert_eq!(Config::load(Some(&file), &[]).unwrap().max_open_streams_per_user, 4, "the file");
        let args = ["chatsync", "serve", "--max-open-streams-per-user", "3", "--config", file.to_str().unwrap()];
        let cli = crate::cli::Cli::try_parse_from(args).unwrap();
        assert_eq!(cli.config().unwrap().max_open_streams_per_user, 3, "the flag beats the file");
        let zero = Config { max_open_streams_per_user: 0, ..Config::default() };
        assert_eq!(zero.validate().unwrap_err(), "max_open_streams_per_user must be greater than 0");
    }

    #[test]
    fn precedence_is_defaults_then_file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "rate_burst = 7\nmax_frame_bytes = 4096\nlisten = \"127.0.0.1:9999\"\n").unwrap();
        let over = Over { rate_burst: None, max_frame_bytes: Some(2048) };
        let c = Config::load(Some(&file), &[&over]).unwrap();
        assert_eq!(c.rate_burst, 7, "file beats default");
        assert_eq!(c.max_frame_bytes, 2048, "override beats file");
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.rate_per_sec, 100, "default kept");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "rate_brust = 7\n").unwrap();
        assert!(Config::load(Some(&file), &[]).is_err());
        std::fs::write(&file, "rate_burst = 0\n").unwrap();
        assert!(Config::load(Some(&file), &[]).is_err());
        assert!(Config::load(Some(&dir.path().join("missing.toml")), &[]).is_err());
    }

    #[test]
    fn origins_of_apps_and_extensions_are_taken_as_written() {
        for ok in [
            "https://app.example",
            "http://127.0.0.1:8080",
            "capacitor://localhost",
            "tauri://localhost",
            "chrome-extension://abcdefghijklmnop",
            "ionic://localhost:8100",
        ] {
            assert_eq!(check_origin(ok), Ok(()), "{ok}");
        }
        for bad in ["capacitor://localhost/", "capacitor://localhost/app", "capacitor://", "null", "*", ""] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}
