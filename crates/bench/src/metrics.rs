//! Measurements: latency histograms (hdrhistogram, microseconds) with a per-second timeline, and
//! sampling of the server process from /proc (VmRSS and Threads from `/proc/PID/status`, utime +
//! stime from `/proc/PID/stat`, context switches summed over `/proc/PID/task/*/status`), and the RSS drift of a window of those samples (soak).

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Highest recordable latency: 10 minutes, in microseconds.
const MAX_US: u64 = 600_000_000;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds are valid")
}

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// A latency histogram in microseconds.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(new_hist())
    }
}

impl Latency {
    /// Records one latency (clamped to 1 µs .. 10 min).
    pub fn record(&mut self, d: Duration) {
        self.record_us(d.as_micros().min(MAX_US as u128) as u64);
    }

    /// Records one latency in microseconds.
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, MAX_US));
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// A quantile in milliseconds (0 when empty).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.value_at_quantile(q) as f64 / 1000.0
        }
    }

    /// Percentiles in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.0.len(),
            mean_ms: self.0.mean() / 1000.0,
            p50_ms: self.quantile_ms(0.50),
            p90_ms: self.quantile_ms(0.90),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.0.max() as f64 / 1000.0,
        }
    }
}

/// One second of a timeline.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SecondPoint {
    /// Seconds since the start of the timeline.
    pub t: u64,
    /// Samples in that second.
    pub count: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
}

/// A latency histogram for the whole run plus one per second (by the time the sample was recorded
/// for, e.g. the scheduled send time).
pub struct Timeline {
    start: Instant,
    total: Latency,
    seconds: Vec<Latency>,
}

impl Timeline {
    /// A timeline whose second 0 starts at `start`.
    pub fn new(start: Instant) -> Timeline {
        Timeline { start, total: Latency::default(), seconds: Vec::new() }
    }

    /// Records `latency` in the second containing `at`.
    pub fn record(&mut self, at: Instant, latency: Duration) {
        let sec = at.saturating_duration_since(self.start).as_secs() as usize;
        if self.seconds.len() <= sec {
            self.seconds.resize_with(sec + 1, Latency::default);
        }
        self.seconds[sec].record(latency);
        self.total.record(latency);
    }

    /// The whole-run histogram.
    pub fn total(&self) -> &Latency {
        &self.total
    }

    /// Per-second percentiles (seconds with no samples included, with zeros).
    pub fn series(&self) -> Vec<SecondPoint> {
        self.seconds
            .iter()
            .enumerate()
            .map(|(t, h)| SecondPoint {
                t: t as u64,
                count: h.count(),
                p50_ms: h.quantile_ms(0.5),
                p99_ms: h.quantile_ms(0.99),
                max_ms: h.quantile_ms(1.0),
            })
            .collect()
    }
}

/// One sample of a process.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ProcSample {
    /// Seconds since the monitor started.
    pub t: f64,
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// utime + stime, seconds.
    pub cpu_secs: f64,
    /// Threads of the process.
    pub threads: u32,
    /// Voluntary context switches of the threads alive now (a thread that blocks: waits for I/O, a lock,
    /// a wake-up), summed.
    pub voluntary_switches: u64,
    /// Involuntary context switches (preempted) of the threads alive now, summed.
    pub involuntary_switches: u64,
}

/// `VmRSS` in KiB from the text of `/proc/PID/status`.
pub fn parse_vmrss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// `Threads` from the text of `/proc/PID/status`.
pub fn parse_threads(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|rest| rest.trim().parse().ok())
}

/// `(utime, stime)` in clock ticks from the text of `/proc/PID/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

/// `(voluntary, involuntary)` context switches from the text of `/proc/PID/task/TID/status`.
pub fn parse_switches(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|rest| rest.trim().parse().ok()).unwrap_or(0)
    };
    (field("voluntary_ctxt_switches:"), field("nonvoluntary_ctxt_switches:"))
}

/// Context switches of every thread of `pid` alive now, summed: `(voluntary, involuntary)`.
fn read_switches(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return (0, 0) };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .map(|status| parse_switches(&status))
        .fold((0, 0), |(v, n), (dv, dn)| (v + dv, n + dn))
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Reads RSS (KiB), CPU seconds and threads of `pid` now, as a sample taken at `t`.
pub fn read_proc(pid: u32, t: f64) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (u, s) = parse_stat_ticks(&stat)?;
    let (voluntary_switches, involuntary_switches) = read_switches(pid);
    Some(ProcSample {
        t,
        rss_kib: parse_vmrss_kib(&status)?,
        cpu_secs: (u + s) as f64 / clock_ticks_per_sec(),
        threads: parse_threads(&status).unwrap_or(0),
        voluntary_switches,
        involuntary_switches,
    })
}

/// Samples a process every second in the background; also on demand.
pub struct ProcMonitor {
    pid: u32,
    start: Instant,
    samples: Arc<Mutex<Vec<ProcSample>>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ProcMonitor {
    /// Starts sampling `pid`. Fails if the process cannot be read.
    pub fn start(pid: u32) -> anyhow::Result<ProcMonitor> {
        if read_proc(pid, 0.0).is_none() {
            anyhow::bail!("cannot read /proc/{pid}/status and /proc/{pid}/stat: is --server-pid right?");
        }
        let mut m = ProcMonitor {
            pid,
            start: Instant::now(),
            samples: Arc::default(),
            stop: CancellationToken::new(),
            task: None,
        };
        m.sample();
        let (samples, stop, start) = (m.samples.clone(), m.stop.clone(), m.start);
        m.task = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        if let Some(s) = read_proc(pid, start.elapsed().as_secs_f64()) {
                            samples.lock().expect("samples lock").push(s);
                        }
                    }
                }
            }
        }));
        Ok(m)
    }

    /// Takes a sample now (kept in the series too). `None` if the process is gone.
    pub fn sample(&self) -> Option<ProcSample> {
        let s = read_proc(self.pid, self.start.elapsed().as_secs_f64())?;
        self.samples.lock().expect("samples lock").push(s);
        Some(s)
    }

    /// Every sample so far, in time order (sampling goes on).
    pub fn snapshot(&self) -> Vec<ProcSample> {
        let mut v = self.samples.lock().expect("samples lock").clone();
        v.sort_by(|a, b| a.t.total_cmp(&b.t));
        v
    }

    /// Stops sampling and returns every sample, in time order.
    pub fn finish(mut self) -> Vec<ProcSample> {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let mut v = self.samples.lock().expect("samples lock").clone();
        v.sort_by(|a, b| a.t.total_cmp(&b.t));
        v
    }
}

/// The server's RSS and CPU over a window of samples (the steady part of a soak).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RssWindow {
    /// Window start and end, seconds since the monitor started.
    pub from_t: f64,
    /// See `from_t`.
    pub to_t: f64,
    /// Samples in the window.
    pub samples: usize,
    /// RSS at the start: the median of the samples in the first `edge` seconds, KiB.
    pub start_kib: u64,
    /// RSS at the end: the median of the samples in the last `edge` seconds, KiB.
    pub end_kib: u64,
    /// Smallest sample in the window, KiB.
    pub min_kib: u64,
    /// Largest sample in the window, KiB.
    pub max_kib: u64,
    /// (end − start) / start, percent: positive when RSS grew.
    pub drift_pct: f64,
    /// Least-squares slope of RSS over the window, KiB per minute.
    pub slope_kib_per_min: f64,
    /// CPU seconds used in the window.
    pub cpu_secs: f64,
    /// CPU used as a share of one core, percent (100 = one core busy).
    pub cpu_pct_of_core: f64,
    /// Server threads at the first and last sample of the window, and the most in it.
    pub threads_start: u32,
    /// See `threads_start`.
    pub threads_end: u32,
    /// See `threads_start`.
    pub threads_max: u32,
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2])
}

/// The RSS window of `samples` between `from_t` and `to_t` (seconds, inclusive), with start and end
/// taken as medians over `edge` seconds at each end (a single sample can catch a transient burst).
/// `None` when the window holds fewer than two samples or the start is zero.
pub fn rss_window(samples: &[ProcSample], from_t: f64, to_t: f64, edge: f64) -> Option<RssWindow> {
    let w: Vec<&ProcSample> = samples.iter().filter(|s| s.t >= from_t && s.t <= to_t).collect();
    if w.len() < 2 {
        return None;
    }
    let edge = edge.max(0.0);
    let start_kib = median(w.iter().filter(|s| s.t <= from_t + edge).map(|s| s.rss_kib).collect())?;
    let end_kib = median(w.iter().filter(|s| s.t >= to_t - edge).map(|s| s.rss_kib).collect())?;
    if start_kib == 0 {
        return None;
    }
    let n = w.len() as f64;
    let (mt, mr) = (w.iter().map(|s| s.t).sum::<f64>() / n, w.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n);
    let (mut num, mut den) = (0.0, 0.0);
    for s in &w {
        num += (s.t - mt) * (s.rss_kib as f64 - mr);
        den += (s.t - mt) * (s.t - mt);
    }
    let slope_per_sec = if den > 0.0 { num / den } else { 0.0 };
    let (first, last) = (w[0], w[w.len() - 1]);
    let cpu_secs = last.cpu_secs - first.cpu_secs;
    let span = last.t - first.t;
    Some(RssWindow {
        from_t,
        to_t,
        samples: w.len(),
        start_kib,
        end_kib,
        min_kib: w.iter().map(|s| s.rss_kib).min().unwrap_or(0),
        max_kib: w.iter().map(|s| s.rss_kib).max().unwrap_or(0),
        drift_pct: (end_kib as f64 - start_kib as f64) * 100.0 / start_kib as f64,
        slope_kib_per_min: slope_per_sec * 60.0,
        cpu_secs,
        cpu_pct_of_core: if span > 0.0 { cpu_secs * 100.0 / span } else { 0.0 },
        threads_start: first.threads,
        threads_end: last.threads,
        threads_max: w.iter().map(|s| s.threads).max().unwrap_or(0),
    })
}

/// This process's own RSS in KiB (for reporting what the bench itself used).
pub fn own_rss_kib() -> Option<u64> {
    parse_vmrss_kib(&std::fs::read_to_string("/proc/self/status").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmrss() {
        let status = "Name:\tchatsync\nVmPeak:\t  10000 kB\nVmRSS:\t   52344 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kib(status), Some(52344));
        assert_eq!(parse_threads(status), Some(3));
        assert_eq!(parse_threads("Name: x\n"), None);
        assert_eq!(parse_vmrss_kib("Name: x\n"), None);
    }

    #[test]
    fn parses_stat_with_odd_command_name() {
        let stat = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 1000 50";
        assert_eq!(parse_stat_ticks(stat), Some((250, 75)));
        assert_eq!(parse_stat_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn parses_context_switches() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(status), (120, 7));
        assert_eq!(parse_switches("Name: x\n"), (0, 0));
    }

    #[test]
    fn reads_own_process() {
        std::thread::sleep(Duration::from_millis(2));
        let s = read_proc(std::process::id(), 1.5).unwrap();
        assert!(s.voluntary_switches > 0, "this thread has just slept");
        assert!(s.rss_kib > 0);
        assert!(s.cpu_secs >= 0.0);
        assert!(s.threads >= 1);
        assert_eq!(s.t, 1.5);
    }

    #[test]
    fn rss_window_drift_slope_and_edges() {
        let s = |t: f64, rss: u64| ProcSample {
            t,
            rss_kib: rss,
            cpu_secs: t / 2.0,
            threads: 10 + t as u32 / 10,
            voluntary_switches: 0,
            involuntary_switches: 0,
        };
        // Flat at 100,000 KiB with one spike at the start edge: the median ignores it.
        let mut v: Vec<ProcSample> = (0..=100).map(|t| s(t as f64, 100_000)).collect();
        v[11].rss_kib = 150_000;
        let w = rss_window(&v, 10.0, 90.0, 5.0).unwrap();
        assert_eq!((w.start_kib, w.end_kib, w.min_kib, w.max_kib), (100_000, 100_000, 100_000, 150_000));
        assert_eq!(w.samples, 81);
        assert!(w.drift_pct.abs() < 1e-9);
        assert!((w.cpu_secs - 40.0).abs() < 1e-9 && (w.cpu_pct_of_core - 50.0).abs() < 1e-9, "{w:?}");
        assert_eq!((w.threads_start, w.threads_end, w.threads_max), (11, 19, 19));
        // Growing 60 KiB per second: 3,600 KiB per minute; 100 s from 100,000 to 106,000 = +6%.
        let v: Vec<ProcSample> = (0..=100).map(|t| s(t as f64, 100_000 + 60 * t)).collect();
        let w = rss_window(&v, 0.0, 100.0, 0.0).unwrap();
        assert_eq!((w.start_kib, w.end_kib), (100_000, 106_000));
        assert!((w.drift_pct - 6.0).abs() < 1e-9, "{w:?}");
        assert!((w.slope_kib_per_min - 3600.0).abs() < 1e-6, "{w:?}");
        // Shrinking is negative drift.
        let v = vec![s(0.0, 200), s(1.0, 190), s(2.0, 180)];
        assert!((rss_window(&v, 0.0, 2.0, 0.0).unwrap().drift_pct + 10.0).abs() < 1e-9);
        // Too few samples, or none at an edge.
        assert!(rss_window(&v, 5.0, 9.0, 1.0).is_none());
        assert!(rss_window(&[s(0.0, 0), s(1.0, 5)], 0.0, 1.0, 0.0).is_none());
    }

    #[test]
    fn timeline_buckets_by_second() {
        let start = Instant::now();
        let mut t = Timeline::new(start);
        t.record(start, Duration::from_millis(1));
        t.record(start + Duration::from_millis(2500), Duration::from_millis(10));
        t.record(start + Duration::from_millis(2600), Duration::from_millis(20));
        let s = t.series();
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].count, s[1].count, s[2].count), (1, 0, 2));
        assert!((s[2].max_ms - 20.0).abs() < 0.1);
        assert_eq!(t.total().count(), 3);
        let sum = t.total().summary();
        assert!((sum.p50_ms - 10.0).abs() < 0.1, "{sum:?}");
    }
}
