//! `soak`: many authenticated connections held for a long time under a moderate, mixed, open-loop
//! load (the fan-out engine with reads and reconnects), judged at the end: the server's RSS must not
//! drift by more than `--max-drift-pct` between the start of the steady window (after the ramp and
//! `--warmup`) and the end of sending, no connection may end without the bench asking, every
//! connection must open (and reopen), every expected delivery must arrive exactly once, and no
//! request may be answered with an error. The bench exits non-zero when any of that fails.

use super::fanout::{run_with, Extras, FanoutArgs, Outcome};
use super::Ctx;
use crate::metrics::{rss_window, RssWindow};
use crate::report::{f, Report, Table};
use crate::schedule::Mix;
use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};

/// `soak` options.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Users (U), taken in tokens-file order among users with at least two sessions.
    #[arg(long, value_name = "U", default_value_t = 3334)]
    pub users: usize,
    /// Devices (connections) per user (D).
    #[arg(long, value_name = "D", default_value_t = 3)]
    pub devices: usize,
    /// Requests per second over all users (open loop, spread evenly over users and their devices).
    #[arg(long, value_name = "N", default_value_t = 800.0)]
    pub rate: f64,
    /// Seconds of sending (the soak proper; the ramp comes before it).
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub duration: f64,
    /// Seconds of sending before the steady window starts (RSS start sample).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub warmup: f64,
    /// Relative weights of request kinds: draft, message, title (broadcast), sync, history (reads).
    #[arg(long, value_name = "MIX", default_value = "draft=45,message=25,title=10,sync=10,history=10")]
    pub mix: Mix,
    /// Chats per user that the writes go to.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub chats_per_user: usize,
    /// Reconnects per second over all users (a device closed by the bench between its sends and reopened).
    #[arg(long, value_name = "N", default_value_t = 2.0)]
    pub reconnect_per_sec: f64,
    /// Seconds to wait after the last send for outstanding replies and deliveries.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub drain: f64,
    /// Largest RSS growth allowed over the steady window, percent.
    #[arg(long, value_name = "PCT", default_value_t = 5.0)]
    pub max_drift_pct: f64,
    /// Seconds at each edge of the window whose median RSS is the start / end figure.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub edge: f64,
}

/// The reasons a soak failed (empty: it passed).
pub fn verdict(o: &Outcome, w: Option<&RssWindow>, max_drift_pct: f64) -> Vec<String> {
    let mut fails = Vec::new();
    match w {
        None => fails.push("no RSS window: run with --server-pid and a duration longer than --warmup".to_owned()),
        Some(w) if w.drift_pct > max_drift_pct => fails.push(format!(
            "RSS drift {:+.2}% exceeds {max_drift_pct}% ({} -> {} KiB)",
            w.drift_pct, w.start_kib, w.end_kib
        )),
        Some(_) => {}
    }
    let closes: u64 = o.unexpected_closes.values().sum();
    if closes > 0 {
        fails.push(format!("{closes} unexpected closes: {:?}", o.unexpected_closes));
    }
    if o.opened < o.connections {
        fails.push(format!(
            "{} of {} connections failed to open: {:?}",
            o.connections - o.opened,
            o.connections,
            o.open_failures
        ));
    }
    let reopen: u64 = o.reconnects.failed.values().sum();
    if reopen > 0 {
        fails.push(format!("{reopen} reconnects failed: {:?}", o.reconnects.failed));
    }
    let c = &o.completeness;
    if c.missing > 0 || c.duplicates > 0 || c.unexpected > 0 {
        fails.push(format!(
            "ledger: {} missing, {} duplicates, {} unexpected of {} expected deliveries",
            c.missing, c.duplicates, c.unexpected, c.expected
        ));
    }
    let errors: u64 = o.errors.values().sum();
    if errors > 0 {
        fails.push(format!("{errors} requests answered with an error: {:?}", o.errors));
    }
    fails
}

/// Runs the scenario; the second value is false when the soak failed (see [`verdict`]).
pub async fn run(ctx: &Ctx, args: SoakArgs) -> Result<(Report, bool)> {
    if args.users == 0 || args.rate <= 0.0 || args.duration <= args.warmup {
        bail!("--users and --rate must be positive and --duration longer than --warmup");
    }
    let fan = FanoutArgs {
        users: args.users,
        devices: args.devices,
        rate_per_user: args.rate / args.users as f64,
        duration: args.duration,
        mix: args.mix,
        chats_per_user: args.chats_per_user,
        drain: args.drain,
        steady_after: args.warmup,
    };
    let extras =
        Extras { name: Some("soak".into()), reconnect_per_sec: args.reconnect_per_sec, warmup_secs: args.warmup };
    let (mut report, outcome) = run_with(ctx, fan, extras).await?;
    let window = outcome.window.and_then(|(a, b)| rss_window(&ctx.server_samples(), a.t, b.t, args.edge));
    let fails = verdict(&outcome, window.as_ref(), args.max_drift_pct);
    let passed = fails.is_empty();

    let mut t = Table::new("soak verdict (steady window: after warm-up to the end of sending)", &[]);
    if let Some(w) = &window {
        let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
        t.kv("window", format!("{:.0} s ({} samples)", w.to_t - w.from_t, w.samples))
            .kv("RSS start (median of first edge)", mib(w.start_kib))
            .kv("RSS end (median of last edge)", mib(w.end_kib))
            .kv("RSS drift", format!("{:+.2}% (limit {}%)", w.drift_pct, args.max_drift_pct))
            .kv("RSS min / max in window", format!("{} / {}", mib(w.min_kib), mib(w.max_kib)))
            .kv("RSS trend (least squares)", format!("{} KiB/min", f(w.slope_kib_per_min, 1)))
            .kv("server CPU in window", format!("{:.1} s ({:.1}% of one core)", w.cpu_secs, w.cpu_pct_of_core))
            .kv(
                "server threads start / end (max)",
                format!("{} / {} ({})", w.threads_start, w.threads_end, w.threads_max),
            );
    }
    let c = &outcome.completeness;
    let pct = |l: &crate::metrics::LatencySummary| format!("{:.2} / {:.2} ms", l.p50_ms, l.p99_ms);
    t.kv("requests sent (per second)", format!("{} ({:.0}/s)", outcome.sent, outcome.sent as f64 / outcome.duration))
        .kv("deliveries received / expected", format!("{} / {}", c.received, c.expected))
        .kv("fan-out p50 / p99", pct(&outcome.delivery))
        .kv("sender reply (writes) p50 / p99", pct(&outcome.ack))
        .kv("initial_sync_request p50 / p99", pct(&outcome.reads[0]))
        .kv("get_chat_messages p50 / p99", pct(&outcome.reads[1]))
        .kv(
            "reconnects (closed by the bench)",
            format!(
                "{} done, {} skipped ({})",
                outcome.reconnects.done, outcome.reconnects.skipped, outcome.bench_closed
            ),
        )
        .kv("unexpected closes", outcome.unexpected_closes.values().sum::<u64>())
        .kv("verdict", if passed { "PASS".to_owned() } else { format!("FAIL: {}", fails.join("; ")) });
    report.tables.push(t);
    if let Value::Object(m) = &mut report.json {
        m.insert(
            "soak".into(),
            json!({
                "window": window, "max_drift_pct": args.max_drift_pct, "edge_secs": args.edge,
                "rate": args.rate, "unexpected_closes": outcome.unexpected_closes.values().sum::<u64>(),
                "passed": passed, "failures": fails,
            }),
        );
    }
    Ok((report, passed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn window(drift_pct: f64) -> RssWindow {
        RssWindow {
            from_t: 60.0,
            to_t: 600.0,
            samples: 540,
            start_kib: 100_000,
            end_kib: (100_000.0 * (1.0 + drift_pct / 100.0)) as u64,
            min_kib: 99_000,
            max_kib: 106_000,
            drift_pct,
            slope_kib_per_min: 0.0,
            cpu_secs: 100.0,
            cpu_pct_of_core: 18.0,
            threads_start: 18,
            threads_end: 18,
            threads_max: 18,
        }
    }

    fn clean() -> Outcome {
        Outcome { connections: 10, opened: 10, ..Outcome::default() }
    }

    #[test]
    fn passes_when_everything_is_clean() {
        assert!(verdict(&clean(), Some(&window(4.9)), 5.0).is_empty());
        assert!(verdict(&clean(), Some(&window(-8.0)), 5.0).is_empty(), "shrinking is not drift");
    }

    #[test]
    fn fails_on_drift_closes_and_missing_window() {
        let f = verdict(&clean(), Some(&window(5.1)), 5.0);
        assert_eq!(f.len(), 1);
        assert!(f[0].contains("drift +5.10%"), "{f:?}");
        assert!(verdict(&clean(), None, 5.0)[0].contains("no RSS window"));
        let mut o = clean();
        o.unexpected_closes = BTreeMap::from([("close 1001 Heartbeat timeout".to_owned(), 2)]);
        let f = verdict(&o, Some(&window(0.0)), 5.0);
        assert_eq!(f.len(), 1);
        assert!(f[0].starts_with("2 unexpected closes"), "{f:?}");
    }

    #[test]
    fn fails_on_opens_reconnects_ledger_and_errors() {
        let mut o = clean();
        o.opened = 9;
        o.reconnects.failed = BTreeMap::from([("timeout".to_owned(), 1)]);
        o.completeness.missing = 3;
        o.errors = BTreeMap::from([("rate_limited".to_owned(), 1)]);
        let f = verdict(&o, Some(&window(1.0)), 5.0);
        assert_eq!(f.len(), 4, "{f:?}");
        let mut o = clean();
        o.completeness.duplicates = 1;
        assert_eq!(verdict(&o, Some(&window(1.0)), 5.0).len(), 1);
    }
}
