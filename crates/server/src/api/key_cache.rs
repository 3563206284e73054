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
//!   request looks its key up in the store, as a single node does.
//!
//! Unknown and revoked keys are never cached. The embedded single node has no cache: its store answers
//! the lookup on the calling thread.

use crate::config::Config;
use crate::store::{ApiKey, Millis, Store, StoreError};
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Keys cached at most; past it the cache starts over.
const MAX_ENTRIES: usize = 10_000;
/// Longest wait for Redis's answer before the request falls back to the store.
const EPOCH_TIMEOUT: Duration = Duration::from_millis(500);

/// The cache of one node.
pub struct KeyCache {
    epoch: Epoch,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

struct Entry {
    epoch: Arc<str>,
    key: ApiKey,
}

impl KeyCache {
    /// The cache of a cluster node (`redis_url` set); `None` for a single node.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Arc<KeyCache>>> {
        let Some(url) = &config.redis_url else { return Ok(None) };
        Ok(Some(Arc::new(KeyCache { epoch: Epoch::new(url, &config.redis_prefix)?, entries: Mutex::default() })))
    }

    /// The key with SHA-256 `hash`, from the cache when it was cached under the current epoch, else from
    /// the store. `use_cache` false (the bus counts Redis as down) goes to the store and empties the cache.
    pub async fn lookup(
        &self,
        store: &dyn Store,
        hash: &[u8; 32],
        use_cache: bool,
    ) -> Result<Option<ApiKey>, StoreError> {
        let epoch = match use_cache {
            true => self.epoch.current().await,
            false => None,
        };
        let Some(epoch) = epoch else {
            self.entries.lock().clear();
            return store.api_key_by_hash(hash).await;
        };
        if let Some(entry) = self.entries.lock().get(hash).filter(|e| e.epoch == epoch) {
            return Ok(Some(entry.key.clone()));
        }
        let found = store.api_key_by_hash(hash).await?;
        if let Some(key) = found.as_ref().filter(|k| k.revoked_at.is_none()) {
            let mut entries = self.entries.lock();
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(*hash, Entry { epoch, key: key.clone() });
        }
        Ok(found)
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
                tracing::debug!(error = %e, "API key cache: cannot read the revocation epoch; using the store");
                self.reset();
                None
            }
            Err(_) => {
                tracing::debug!("API key cache: Redis did not answer in time; using the store");
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
