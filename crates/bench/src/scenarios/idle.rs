//! `idle`: open as many authenticated connections as the tokens file, `--connections` and the fd
//! limit allow, hold them idle, and report how many held, connect+auth latency, and what each
//! connection costs the server: RSS per connection = (RSS after hold - RSS before connecting) / held,
//! and CPU time per connection spent while connecting.

use super::{counts_table, latency_panel, latency_table, Ctx};
use crate::connect::{close_all, open_many, Ignore};
use crate::metrics::Timeline;
use crate::report::{Line, Panel, Report, Table};
use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `idle` options.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Connections to open [default: one per session in the tokens file, capped by the fd limit].
    #[arg(long, value_name = "N")]
    pub connections: Option<usize>,
    /// Seconds to hold the connections idle after the last one opened (Pings are answered meanwhile).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub hold: f64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, args: IdleArgs) -> Result<Report> {
    let mut notes = Vec::new();
    let mut n = args.connections.unwrap_or(ctx.creds.len());
    if n > ctx.creds.len() {
        notes.push(format!(
            "--connections {n} but the tokens file has {} sessions: opening {}",
            ctx.creds.len(),
            ctx.creds.len()
        ));
        n = ctx.creds.len();
    }
    if n > ctx.fd_capacity() {
        notes.push(format!("open-files limit {} caps connections at {}", ctx.nofile, ctx.fd_capacity()));
        n = ctx.fd_capacity();
    }
    if n == 0 {
        bail!("no connections to open");
    }
    let creds = &ctx.creds[..n];

    // Baseline before any connection.
    let before = ctx.sample_server();
    let start = Instant::now();
    let cancel = CancellationToken::new();
    let pb = ctx.progress(n as u64, "connect");
    let opened =
        open_many(ctx.connector.clone(), creds, ctx.common.ramp_per_sec, Arc::new(Ignore), cancel.clone(), &pb).await;
    pb.finish_and_clear();
    let ramp_secs = start.elapsed().as_secs_f64();
    let after_connect = ctx.sample_server();
    let ok = opened.ok();

    // Connect latency, per second of connect start.
    let mut timeline = Timeline::new(start);
    for c in opened.conns.iter().flatten() {
        timeline.record(c.at - c.latency, c.latency);
    }

    // Hold, sampling how many stay open.
    // Opened over the ramp (by greeting time, every 0.5 s), then sampled during the hold.
    let mut greeted: Vec<f64> =
        opened.conns.iter().flatten().map(|c| c.at.saturating_duration_since(start).as_secs_f64()).collect();
    greeted.sort_by(f64::total_cmp);
    let mut open_series: Vec<(f64, f64)> = (0..=(ramp_secs * 2.0) as usize)
        .map(|i| {
            let t = i as f64 / 2.0;
            (t, greeted.partition_point(|&g| g <= t) as f64)
        })
        .collect();
    open_series.push((ramp_secs, opened.log.open() as f64));
    let pb = ctx.progress((args.hold * 10.0) as u64, "hold");
    let hold_end = Instant::now() + Duration::from_secs_f64(args.hold);
    while Instant::now() < hold_end {
        tokio::time::sleep(Duration::from_millis(100).min(hold_end - Instant::now())).await;
        pb.inc(1);
        pb.set_message(format!("{} open", opened.log.open()));
        let t = start.elapsed().as_secs_f64();
        if open_series.last().is_none_or(|(lt, _)| t - lt >= 1.0) {
            open_series.push((t, opened.log.open() as f64));
        }
    }
    pb.finish_and_clear();
    let after = ctx.sample_server();
    let held = opened.log.open();
    let dropped = opened.log.closes();

    // Tear down: stop the readers, then close politely.
    cancel.cancel();
    let sinks: Vec<_> = opened.conns.into_iter().flatten().map(|c| c.sink).collect();
    close_all(sinks, Duration::from_secs(10)).await;

    let lat = timeline.total().summary();
    let failed: u64 = opened.failures.values().sum();
    let mut summary = Table::new("idle connections", &[]);
    summary
        .kv("requested", n)
        .kv("opened (greeted)", ok)
        .kv("failed to open", failed)
        .kv("dropped during hold", dropped.values().sum::<u64>())
        .kv("held at end of hold", held)
        .kv("ramp", format!("{:.1} s ({:.0}/s)", ramp_secs, ok as f64 / ramp_secs.max(1e-9)))
        .kv("hold", format!("{:.1} s", args.hold));

    let mut server = json!(null);
    if let (Some(b), Some(c), Some(a)) = (before, after_connect, after) {
        let per_conn_kib = if held > 0 { (a.rss_kib as f64 - b.rss_kib as f64) / held as f64 } else { 0.0 };
        let cpu_connect = c.cpu_secs - b.cpu_secs;
        let cpu_hold = a.cpu_secs - c.cpu_secs;
        let cpu_per_conn_ms = if ok > 0 { cpu_connect * 1000.0 / ok as f64 } else { 0.0 };
        summary
            .kv("server RSS before", format!("{:.1} MiB", b.rss_kib as f64 / 1024.0))
            .kv("server RSS after hold", format!("{:.1} MiB", a.rss_kib as f64 / 1024.0))
            .kv("server RSS per held connection", format!("{per_conn_kib:.1} KiB"))
            .kv("server CPU per connection (connect+auth)", format!("{cpu_per_conn_ms:.3} ms"))
            .kv("server CPU while idle", format!("{:.1}% of a core", cpu_hold * 100.0 / args.hold.max(1e-9)));
        server = json!({
            "rss_before_kib": b.rss_kib,
            "rss_after_connect_kib": c.rss_kib,
            "rss_after_hold_kib": a.rss_kib,
            "rss_per_connection_kib": per_conn_kib,
            "rss_per_connection_bytes": per_conn_kib * 1024.0,
            "cpu_before_secs": b.cpu_secs,
            "cpu_connect_secs": cpu_connect,
            "cpu_per_connection_ms": cpu_per_conn_ms,
            "cpu_hold_secs": cpu_hold,
            "cpu_hold_core_fraction": cpu_hold / args.hold.max(1e-9),
        });
    } else if ctx.common.server_pid.is_some() {
        notes.push("the server process could not be sampled at every point (did it exit?)".into());
    }
    if failed > 0 {
        notes.push(format!("{failed} connections failed to open; see the table of failures"));
    }

    let tables = vec![
        summary,
        latency_table("connect + auth latency (TCP connect to `connected` greeting)", &[("connect", &lat)]),
        counts_table("failures to open", &opened.failures),
        counts_table("closed by the server during the run", &dropped),
    ];
    let json = json!({
        "params": {
            "connections": n, "hold_secs": args.hold, "ramp_per_sec": ctx.common.ramp_per_sec,
            "source_addrs": ctx.common.source_addrs, "ws_buffer": ctx.common.ws_buffer,
        },
        "results": {
            "requested": n, "opened": ok, "failed": failed, "held": held,
            "ramp_secs": ramp_secs,
            "failures": opened.failures, "closes_during_run": dropped,
            "connect_latency": lat,
            "connect_latency_per_second": timeline.series(),
        },
        "idle_server": server,
    });
    let panels = vec![
        latency_panel("connect + auth latency per second of connect start", "seconds since start", &timeline.series()),
        Panel {
            title: "open connections".into(),
            x_label: "seconds since start".into(),
            y_label: "connections".into(),
            log_y: false,
            lines: vec![Line { name: "open".into(), points: open_series }],
        },
    ];
    Ok(Report { scenario: "idle".into(), json, tables, notes, panels })
}
