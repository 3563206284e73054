//! Test harness for cluster mode: several nodes in this process sharing one store and one Redis bus
//! (each with its own hub, cache, keyring and listener), and a Redis server of the test's own when a
//! test must stop and restart it.

use super::TestServer;
use chatsync::{Config, Ctx};
use std::time::Duration;

/// The Redis the tests use: `CHATSYNC_TEST_REDIS_URL` (CI sets it and makes Redis answer), else `None`
/// (a machine without Redis skips cluster tests, saying so).
pub fn redis_url() -> Option<String> {
    match std::env::var("CHATSYNC_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("CHATSYNC_TEST_REDIS_URL is not set: skipping a cluster test");
            None
        }
    }
}

/// A channel prefix no other test or run uses.
pub fn unique_prefix() -> String {
    format!("cstest-{}:", uuid::Uuid::new_v4().simple())
}

/// `n` nodes on one store: node 0 owns the data directory; the others share its store and master key.
pub struct TestCluster {
    pub nodes: Vec<TestServer>,
}

impl TestCluster {
    pub async fn start(n: usize, redis_url: &str, tweak: impl Fn(&mut Config)) -> TestCluster {
        let prefix = unique_prefix();
        let first = TestServer::start_with(|c| {
            c.redis_url = Some(redis_url.to_owned());
            c.redis_prefix = prefix.clone();
            tweak(c);
        })
        .await;
        let mut nodes = vec![first];
        for _ in 1..n {
            let ctx = &nodes[0].ctx;
            let config = (*ctx.config).clone();
            let backend = chatsync::store::Backend {
                identity: ctx.store.clone(),
                chats: ctx.chats.clone(),
                events: ctx.events.clone(),
            };
            let (master, _) = chatsync::crypto::MasterKey::load_or_create(&config.data_dir, None).unwrap();
            let node = chatsync::assemble(config, backend, master, None).unwrap();
            nodes.push(TestServer::serve(node, tempfile::tempdir().unwrap()).await);
        }
        let cluster = TestCluster { nodes };
        cluster.wait_healthy().await;
        cluster
    }

    /// Waits until every node's bus is connected and subscribed.
    pub async fn wait_healthy(&self) {
        for node in &self.nodes {
            wait_healthy(&node.ctx).await;
        }
    }

    /// Waits until no node's bus counts as connected (after Redis went away or stalled).
    pub async fn wait_unhealthy(&self) {
        for node in &self.nodes {
            let bus = node.ctx.bus.as_ref().expect("a cluster node");
            while bus.is_healthy() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Waits until `ctx`'s bus is connected and subscribed.
pub async fn wait_healthy(ctx: &Ctx) {
    let bus = ctx.bus.as_ref().expect("a cluster node");
    while !bus.is_healthy() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `redis-server` of the test's own on a free port (no persistence), stopped on drop.
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
    /// In cluster mode: the directory of its cluster configuration (kept across restarts).
    cluster: Option<tempfile::TempDir>,
    /// With a dataset to load at start ([`OwnRedis::start_loading`]): its directory and the arguments that
    /// make the load slow.
    dataset: Option<(tempfile::TempDir, Vec<String>)>,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let port = super::spare_port();
        let mut redis = OwnRedis { port, child: None, cluster: None, dataset: None };
        redis.restart();
        redis
    }

    /// A Redis restarted with persistence: it loads a dataset of `keys` keys at start, slowly (50 µs a
    /// key), answering commands meanwhile (every KiB loaded) as Redis does while it loads: `PING` gets
    /// `-LOADING`, pub/sub works. See [`OwnRedis::loading`].
    pub fn start_loading(keys: u32) -> OwnRedis {
        let port = super::spare_port();
        let dir = tempfile::tempdir().unwrap();
        let dir_arg = dir.path().to_str().unwrap().to_owned();
        let mut redis =
            OwnRedis { port, child: None, cluster: None, dataset: Some((dir, vec!["--dir".into(), dir_arg])) };
        redis.restart();
        let fill = format!("for i = 1, {keys} do redis.call('SET', 'k' .. i, 'v') end");
        redis.cli(&["EVAL", &fill, "0"]);
        redis.cli(&["SAVE"]);
        redis.kill();
        let args = &mut redis.dataset.as_mut().unwrap().1;
        args.extend(["--key-load-delay", "50", "--loading-process-events-interval-bytes", "1024"].map(String::from));
        redis.restart();
        assert!(redis.loading(), "the dataset loaded at once: make it larger");
        redis
    }

    /// Whether it is still loading its dataset.
    pub fn loading(&self) -> bool {
        self.cli(&["INFO", "persistence"]).lines().any(|l| l.trim() == "loading:1")
    }

    /// How many times a command was refused before it ran (`rejected_calls`: `-LOADING`, an ACL…).
    pub fn rejected_calls(&self, command: &str) -> u64 {
        let stats = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:");
        let line = stats.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap_or("");
        line.split(',').find_map(|f| f.strip_prefix("rejected_calls=")).map_or(0, |n| n.trim().parse().unwrap())
    }

    /// A Redis Cluster of this one server, holding every slot (what sharded pub/sub runs on). A restart
    /// keeps its slots.
    pub fn start_cluster() -> OwnRedis {
        let port = super::spare_port();
        let mut redis = OwnRedis { port, child: None, cluster: Some(tempfile::tempdir().unwrap()), dataset: None };
        redis.restart();
        redis.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        for _ in 0..500 {
            if redis.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the cluster-mode redis-server on port {} did not become ready", redis.port);
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", super::SPARE_HOST, "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli is installed with redis-server");
        assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// `host:port`, on [`super::SPARE_HOST`]: the port stays its own while it is down between a kill
    /// and a restart.
    pub fn addr(&self) -> String {
        format!("{}:{}", super::SPARE_HOST, self.port)
    }

    /// Starts (again) on the same port, and waits until it answers.
    pub fn restart(&mut self) {
        let mut command = std::process::Command::new("redis-server");
        command.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            super::SPARE_HOST,
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        if let Some(dir) = &self.cluster {
            let conf = dir.path().join("nodes.conf");
            command.args(["--cluster-enabled", "yes", "--cluster-config-file"]).arg(conf).arg("--dir").arg(dir.path());
        }
        if let Some((_, args)) = &self.dataset {
            command.args(args);
        }
        let child = command
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (the machine's services include Redis)");
        self.child = Some(child);
        for _ in 0..500 {
            if std::net::TcpStream::connect((super::SPARE_HOST, self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Stops it (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = std::process::Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
