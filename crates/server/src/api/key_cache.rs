//! A cluster node's cache of API keys, kept true by a revocation *epoch* in Redis (SERVER_API.md section 1:
//! a revoked key is refused on every node as soon as `chatsync api-keys revoke` returns).
//!
//! Without it every API request costs a store query for its key; on PostgreSQL, at 8,000 stream chunks a
//! second, that was a third of the machine (BENCHMARKS.md, "stream across three nodes"). With it a request
//! costs a Redis GET:
//!
//! * Redis holds the epoch: a random value that `api-keys revoke` replaces ([`bump_epoch`]) after the
//!   revocation committed and before the command returns (the command fails loudly if Redis does not answer).
//! * A node reads the epoch on every request, before looking at its cache, and uses a cached key only if it
//!   was cached under the epoch just read. So a request that starts after the command returned reads the
//!   new epoch, looks its key up in the store, and is refused.
//! * A missing epoch (a Redis that restarted without its data) is replaced by a fresh random one (`SET NX`):
//!   a lost epoch never brings back one that keys were cached under.
//! * When Redis does not answer (or the bus counts it as down) the cache is emptied and not used: every
//!   request looks its key up in the store, as a single node does, for a second before Redis is tried
//!   again. Emptying also moves the node's *generation* on, and an entry is used only under the generation
//!   its request started in, so a request that was in flight across a failure cannot bring an entry back.
//! * Every entry is dropped after [`MAX_AGE`] whatever happens: the bound on what a revocation costs when
//!   its epoch could not reach the nodes (a `revoke` run without `--redis-url`, which warns when the store
//!   is PostgreSQL; a Redis that rolled back to an older epoch after a crash or an asynchronous failover).
//!
//! Unknown and revoked keys are never cached. A node without `--redis-url` (the embedded default) has no
//! cache: its store answers the lookup on the calling thread. A node on SQLite *with* `--redis-url` caches
//! like any other, and a `revoke` run on its database without `--redis-url` does not warn (the warning
//! names the cluster's store, PostgreSQL): its key may then be accepted for up to [`MAX_AGE`].

use crate::config::Config;
use crate::store::{ApiKey, Millis, Store, StoreError};
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Keys cached at most; past it the cache starts over.
const MAX_ENTRIES: usize = 10_000;
/// Longest wait for Redis's answer before the request falls back to the store.
const EPOCH_TIMEOUT: Duration = Duration::from_millis(500);
/// After Redis failed to give the epoch, requests go to the store this long before it is tried again.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// An entry is used at most this long after its lookup.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// The cache of one node.
pub struct KeyCache {
    epoch: Epoch,
    /// Moves on each time the cache is emptied (see the module doc).
    generation: AtomicU64,
    /// Until when (ms since `started`) Redis is not asked, after a failure.
    paused_until_ms: AtomicU64,
    started: Instant,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

struct Entry {
    epoch: Arc<str>,
    generation: u64,
    at: Instant,
    key: ApiKey,
}

impl KeyCache {
    /// The cache of a cluster node (`redis_url` set); `None` for a single node.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Arc<KeyCache>>> {
        let Some(url) = &config.redis_url else { return Ok(None) };
        Ok(Some(Arc::new(KeyCache {
            epoch: Epoch::new(url, &config.redis_prefix)?,
            generation: AtomicU64::new(0),
            paused_until_ms: AtomicU64::new(0),
            started: Instant::now(),
            entries: Mutex::default(),
        })))
    }

    /// The key with SHA-256 `hash`, from the cache when it was cached under the current epoch, else from
    /// the store. `use_cache` false (the bus counts Redis as down) goes to the store and empties the cache.
    pub async fn lookup(
        &self,
        store: &dyn Store,
        hash: &[u8; 32],
        use_cache: bool,
    ) -> Result<Option<ApiKey>, StoreError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let ask_redis = use_cache && self.elapsed_ms() >= self.paused_until_ms.load(Ordering::Relaxed);
        let epoch = match ask_redis {
            true => self.epoch.current().await,
            false => None,
        };
        let Some(epoch) = epoch else {
            if ask_redis {
                // Redis failed: the next requests go to the store for a while instead of waiting too.
                let until = self.elapsed_ms() + PAUSE_AFTER_FAILURE.as_millis() as u64;
                self.paused_until_ms.fetch_max(until, Ordering::Relaxed);
            }
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.entries.lock().clear();
            return store.api_key_by_hash(hash).await;
        };
        let valid = |e: &&Entry| e.epoch == epoch && e.generation == generation && e.at.elapsed() < MAX_AGE;
        if let Some(entry) = self.entries.lock().get(hash).filter(valid) {
            return Ok(Some(entry.key.clone()));
        }
        let at = Instant::now();
        let found = store.api_key_by_hash(hash).await?;
        if let Some(key) = found.as_ref().filter(|k| k.revoked_at.is_none()) {
            let mut entries = self.entries.lock();
            if entries.len() >= MAX_ENTRIES && !entries.contains_key(hash) {
                entries.clear();
            }
            entries.insert(*hash, Entry { epoch, generation, at, key: key.clone() });
        }
        Ok(found)
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Records in the cached copy that the key's use was written at `now` (so that the next write is a
    /// minute later, as without the cache).
    pub fn touched(&self, hash: &[u8; 32], now: Millis) {
        if let Some(entry) = self.entries.lock().get_mut(hash) {
            entry.key.last_used_at = Some(now);
        }
    }
}

/// Replaces the epoch: every node looks each key up in the store again. Run by `api-keys revoke` after the
/// revocation committed.
pub async fn bump_epoch(config: &Config) -> anyhow::Result<()> {
    let Some(url) = &config.redis_url else { return Ok(()) };
    let epoch = Epoch::new(url, &config.redis_prefix)?;
    let mut conn = tokio::time::timeout(EPOCH_TIMEOUT * 10, epoch.client.get_multiplexed_async_connection()).await??;
    let mut set = redis::cmd("SET");
    set.arg(&epoch.key).arg(fresh());
    tokio::time::timeout(EPOCH_TIMEOUT * 10, set.query_async::<()>(&mut conn)).await??;
    Ok(())
}

/// A new random epoch value.
fn fresh() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The epoch in Redis, read over one shared connection (reconnected after a failure).
struct Epoch {
    client: redis::Client,
    key: String,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Epoch {
    fn new(url: &str, prefix: &str) -> anyhow::Result<Epoch> {
        Ok(Epoch {
            client: redis::Client::open(url)?,
            key: format!("{prefix}api-keys-epoch"),
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// The current epoch, creating one if there is none; `None` when Redis does not answer in time.
    async fn current(&self) -> Option<Arc<str>> {
        match tokio::time::timeout(EPOCH_TIMEOUT, self.read()).await {
            Ok(Ok(epoch)) => Some(epoch.into()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "API key cache: cannot read the revocation epoch; using the store");
                // An error reply (an ACL, a full Redis) is not the connection's fault; anything else
                // (a broken or closed connection) gets a new one.
                if !matches!(e.kind(), redis::ErrorKind::Server(_)) {
                    self.reset();
                }
                None
            }
            Err(_) => {
                tracing::warn!("API key cache: Redis did not answer in time; using the store");
                self.reset();
                None
            }
        }
    }

    /// Drops the shared connection so that the next read reconnects. Never waits: if another request is
    /// connecting meanwhile, there is no connection to drop.
    fn reset(&self) {
        if let Ok(mut conn) = self.conn.try_lock() {
            *conn = None;
        }
    }

    async fn read(&self) -> redis::RedisResult<String> {
        let mut conn = self.connection().await?;
        if let Some(epoch) = redis::cmd("GET").arg(&self.key).query_async::<Option<String>>(&mut conn).await? {
            return Ok(epoch);
        }
        // None yet (a new cluster, or a Redis that lost its data): a fresh one, unless a node was first.
        let (epoch,): (String,) = redis::pipe()
            .cmd("SET")
            .arg(&self.key)
            .arg(fresh())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&self.key)
            .query_async(&mut conn)
            .await?;
        Ok(epoch)
    }

    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.client.get_multiplexed_async_connection().await?;
        *guard = Some(conn.clone());
        Ok(conn)
    }
}
