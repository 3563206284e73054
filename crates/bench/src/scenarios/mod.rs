//! What every scenario shares: the common options, the run context (target, tokens, connector,
//! server monitor, progress bars) and helpers that turn measurements into report rows.

pub mod fanout;
pub mod idle;
pub mod saturate;
pub mod soak;
pub mod stream;
pub mod sync;

use crate::connect::{check_url, Connector, Target};
use crate::metrics::{LatencySummary, ProcMonitor, ProcSample, SecondPoint};
use crate::report::{f, ms, Line, Panel, Report, Table};
use crate::tokens::{self, Credential};
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// Options of every scenario (accepted before or after the scenario name).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Common options (any scenario, before or after its name)")]
pub struct Common {
    /// WebSocket URL of the server under test; only loopback hosts (127.0.0.0/8, ::1, localhost) are accepted.
    /// Several, comma-separated, for the nodes of a cluster: connection i goes to node i mod N, so the
    /// consecutive devices of a user are spread over the nodes.
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080/v1/ws", value_parser = parse_url,
          value_delimiter = ',')]
    pub url: Vec<String>,
    /// Tokens file: JSON lines {"user_id","device_id","token"}, e.g. from `chatsync sessions issue-bulk`.
    #[arg(long, global = true, value_name = "FILE", default_value = "tokens.jsonl")]
    pub tokens: PathBuf,
    /// Connections started per second while opening connections.
    #[arg(long, global = true, value_name = "N", default_value_t = 1000.0)]
    pub ramp_per_sec: f64,
    /// Client source addresses 127.0.0.1..=127.0.0.N, used round-robin (about 28k ports each).
    #[arg(long, global = true, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_addrs: u8,
    /// Seconds allowed for TCP connect + WebSocket upgrade + `connected` greeting.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Tungstenite read buffer per client connection, bytes (small, so the bench can hold 10k+ connections).
    #[arg(long, global = true, value_name = "BYTES", default_value_t = 4096)]
    pub ws_buffer: usize,
    /// PID of the server: sample its RSS (VmRSS) and CPU (utime+stime) every second and report them.
    #[arg(long, global = true, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Write every number of the run to this JSON file.
    #[arg(long, global = true, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Write an SVG plot of latency percentiles over the run (and server RSS with --server-pid).
    #[arg(long, global = true, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Hard bound on the whole run, seconds; the run is abandoned past it.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 900)]
    pub max_runtime: u64,
    /// Do not draw progress bars (they are drawn only on a terminal anyway).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

fn parse_url(s: &str) -> Result<String, String> {
    check_url(s).map(|_| s.to_owned()).map_err(|e| format!("{e:#}"))
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(s, _)| s).unwrap_or(1024),
    }
}

/// The run context shared by the scenarios.
pub struct Ctx {
    /// The common options.
    pub common: Common,
    /// How to connect.
    pub connector: std::sync::Arc<Connector>,
    /// The sessions of the tokens file.
    pub creds: Vec<Credential>,
    /// The open-files limit in force.
    pub nofile: u64,
    monitor: Mutex<Option<ProcMonitor>>,
    started: std::time::Instant,
}

impl Ctx {
    /// Loads the tokens and starts the server monitor (its first sample is the baseline).
    pub fn new(common: Common, nofile: u64) -> Result<Ctx> {
        let targets = common.url.iter().map(|u| Target::parse(u)).collect::<Result<Vec<_>>>()?;
        let creds = tokens::load(&common.tokens)?;
        let monitor = common.server_pid.map(ProcMonitor::start).transpose()?;
        let connector = Connector::new(
            targets,
            common.source_addrs,
            common.ws_buffer,
            Duration::from_secs_f64(common.connect_timeout),
        );
        Ok(Ctx {
            common,
            connector: std::sync::Arc::new(connector),
            creds,
            nofile,
            monitor: Mutex::new(monitor),
            started: std::time::Instant::now(),
        })
    }

    /// The `--max-runtime` bound.
    pub fn max_runtime(&self) -> Duration {
        Duration::from_secs(self.common.max_runtime)
    }

    /// The most connections the open-files limit allows (keeping some descriptors spare).
    pub fn fd_capacity(&self) -> usize {
        self.nofile.saturating_sub(64) as usize
    }

    /// Samples the server now (when --server-pid was given).
    pub fn sample_server(&self) -> Option<ProcSample> {
        self.monitor.lock().expect("monitor lock").as_ref()?.sample()
    }

    /// The server samples so far (empty without --server-pid).
    pub fn server_samples(&self) -> Vec<ProcSample> {
        self.monitor.lock().expect("monitor lock").as_ref().map(ProcMonitor::snapshot).unwrap_or_default()
    }

    /// A progress bar of `len` steps (hidden with --no-progress or off a terminal).
    pub fn progress(&self, len: u64, prefix: &str) -> ProgressBar {
        if self.common.no_progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        pb.set_prefix(prefix.to_owned());
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }

    /// Adds the common sections (target, server samples), prints the summary, writes JSON and SVG.
    pub fn finish(self, mut report: Report) -> Result<()> {
        let samples = self.monitor.lock().expect("monitor lock").take().map(ProcMonitor::finish).unwrap_or_default();
        if let Value::Object(m) = &mut report.json {
            m.insert("scenario".into(), json!(report.scenario));
            m.insert("url".into(), json!(self.common.url));
            m.insert("tokens_file".into(), json!(self.common.tokens));
            m.insert("elapsed_secs".into(), json!(self.started.elapsed().as_secs_f64()));
            m.insert("bench_rss_kib".into(), json!(crate::metrics::own_rss_kib()));
            m.insert("bench_nofile_limit".into(), json!(self.nofile));
            if let Some(pid) = self.common.server_pid {
                m.insert("server".into(), server_json(pid, &samples));
            }
        }
        if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
            let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
            let mut t = Table::new("server process (whole run)", &[]);
            t.kv("RSS first sample", format!("{:.1} MiB", first.rss_kib as f64 / 1024.0))
                .kv("RSS last sample", format!("{:.1} MiB", last.rss_kib as f64 / 1024.0))
                .kv("RSS peak", format!("{:.1} MiB", peak as f64 / 1024.0))
                .kv("CPU used", format!("{:.2} s", last.cpu_secs - first.cpu_secs))
                .kv("threads first / last", format!("{} / {}", first.threads, last.threads));
            report.tables.push(t);
            report.panels.push(Panel {
                title: "server RSS".into(),
                x_label: "seconds since start".into(),
                y_label: "MiB".into(),
                log_y: false,
                lines: vec![Line {
                    name: "RSS".into(),
                    points: samples.iter().map(|s| (s.t, s.rss_kib as f64 / 1024.0)).collect(),
                }],
            });
        }
        print!("{}", report.render());
        if let Some(p) = &self.common.json_out {
            report.write_json(p)?;
            println!("JSON written to {}", p.display());
        }
        if let Some(p) = &self.common.plot {
            report.write_svg(p)?;
            println!("plot written to {}", p.display());
        }
        Ok(())
    }
}

fn server_json(pid: u32, samples: &[ProcSample]) -> Value {
    let first = samples.first();
    let last = samples.last();
    json!({
        "pid": pid,
        "rss_first_kib": first.map(|s| s.rss_kib),
        "rss_last_kib": last.map(|s| s.rss_kib),
        "rss_peak_kib": samples.iter().map(|s| s.rss_kib).max(),
        "cpu_used_secs": match (first, last) { (Some(a), Some(b)) => Some(b.cpu_secs - a.cpu_secs), _ => None },
        "samples": samples,
    })
}

/// A latency summary as table cells: count, p50, p90, p99, p99.9, max (ms).
pub fn latency_cells(name: &str, s: &LatencySummary) -> Vec<String> {
    vec![name.to_owned(), s.count.to_string(), ms(s.p50_ms), ms(s.p90_ms), ms(s.p99_ms), ms(s.p999_ms), ms(s.max_ms)]
}

/// A latency table with the given rows.
pub fn latency_table(title: &str, rows: &[(&str, &LatencySummary)]) -> Table {
    let mut t = Table::new(title, &["", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"]);
    for (name, s) in rows {
        t.row(latency_cells(name, s));
    }
    t
}

/// A panel of per-second p50/p99/max.
pub fn latency_panel(title: &str, x_label: &str, series: &[SecondPoint]) -> Panel {
    let line = |name: &str, pick: fn(&SecondPoint) -> f64| Line {
        name: name.into(),
        points: series.iter().filter(|p| p.count > 0).map(|p| (p.t as f64, pick(p))).collect(),
    };
    Panel {
        title: title.into(),
        x_label: x_label.into(),
        y_label: "latency ms".into(),
        log_y: true,
        lines: vec![line("p50", |p| p.p50_ms), line("p99", |p| p.p99_ms), line("max", |p| p.max_ms)],
    }
}

/// A key/value table of counts (e.g. errors by code); "none" when empty.
pub fn counts_table(title: &str, counts: &BTreeMap<String, u64>) -> Table {
    let mut t = Table::new(title, &[]);
    if counts.is_empty() {
        t.kv("(none)", "");
    }
    for (k, v) in counts {
        t.kv(k, v);
    }
    t
}

/// `a / b` as a rate, 0 when `b` is 0.
pub fn per(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Merges `src` counts into `dst`.
pub fn add_counts(dst: &mut BTreeMap<String, u64>, src: &BTreeMap<String, u64>) {
    for (k, v) in src {
        *dst.entry(k.clone()).or_default() += v;
    }
}

/// Formats a rate per second.
pub fn rate(x: f64) -> String {
    f(x, 1)
}
