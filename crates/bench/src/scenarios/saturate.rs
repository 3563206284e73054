//! `saturate`: the highest sustained `update_draft` rate whose p99 (request to its
//! `draft_update_confirmed`, matched by `request_id`, measured from the scheduled send time) stays
//! under a target. The offered open-loop rate steps up from `--start-rate` by `--step-rate`; each
//! step runs `--step-secs` over `--connections` connections of distinct users (so no fan-out), then
//! drains. The answer is the last step meeting the target with achieved >= 95% of offered.

use super::{counts_table, latency_panel, per, Ctx};
use crate::connect::{close_all, open_many, Envelope, FrameHandler, Sink};
use crate::metrics::{Latency, LatencySummary, Timeline};
use crate::report::{f, ms, Report, Table};
use crate::schedule::conn_offsets;
use crate::tokens::{group_by_user, id_safe, Credential};
use anyhow::{bail, Result};
use clap::Args;
use futures_util::SinkExt;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// `saturate` options.
#[derive(Debug, Clone, Args)]
pub struct SaturateArgs {
    /// Connections the load is spread over (one per user where the tokens file allows).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub connections: usize,
    /// Offered rate of the first step, requests per second (all connections together).
    #[arg(long, value_name = "RPS", default_value_t = 500.0)]
    pub start_rate: f64,
    /// Rate added at each step.
    #[arg(long, value_name = "RPS", default_value_t = 500.0)]
    pub step_rate: f64,
    /// Highest offered rate tried.
    #[arg(long, value_name = "RPS", default_value_t = 10000.0)]
    pub max_rate: f64,
    /// Seconds each step offers load.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub step_secs: f64,
    /// Seconds to wait after a step for its outstanding replies (then they count as timed out).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub drain: f64,
    /// The p99 target, ms.
    #[arg(long, value_name = "MS", default_value_t = 50.0)]
    pub p99_target_ms: f64,
    /// A step passes only if confirmed/s >= this fraction of the offered rate.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.95)]
    pub min_achieved: f64,
    /// Keep stepping after a failed step (up to --max-rate) instead of stopping.
    #[arg(long)]
    pub keep_going: bool,
    /// Run steps that exceed the per-connection rate limit announced in `connected` (else stop before them).
    #[arg(long)]
    pub exceed_rate_limit: bool,
}

#[derive(Default)]
struct StepStats {
    latency: Latency,
    confirmed: u64,
    replies: u64,
    errors: BTreeMap<String, u64>,
    last_reply: Option<Instant>,
}

struct Handler {
    epoch: Instant,
    steps: Mutex<Vec<StepStats>>,
    timeline: Mutex<Timeline>,
}

/// `s<step>:<sched_us>` → (step, sched_us).
fn parse_request_id(rid: &str) -> Option<(usize, u64)> {
    let (step, sched) = rid.strip_prefix('s')?.split_once(':')?;
    Some((step.parse().ok()?, sched.parse().ok()?))
}

impl FrameHandler for Handler {
    fn on_text(&self, _conn: usize, text: &str, at: Instant) {
        let Some(env) = Envelope::parse(text) else { return };
        let Some((step, sched_us)) = env.request_id.as_deref().and_then(parse_request_id) else {
            return;
        };
        let mut steps = self.steps.lock().expect("steps lock");
        let Some(s) = steps.get_mut(step) else { return };
        s.replies += 1;
        s.last_reply = Some(at);
        if env.kind == "draft_update_confirmed" {
            let sched = self.epoch + Duration::from_micros(sched_us);
            let lat = at.saturating_duration_since(sched);
            s.latency.record(lat);
            s.confirmed += 1;
            drop(steps);
            self.timeline.lock().expect("timeline lock").record(sched, lat);
        } else {
            let code = if env.kind == "error" {
                env.error_code().unwrap_or("(no code)").to_owned()
            } else {
                format!("unexpected reply {}", env.kind)
            };
            *s.errors.entry(code).or_default() += 1;
        }
    }
}

/// One step's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// Step number (0-based).
    pub step: usize,
    /// Offered rate, requests/s.
    pub offered_rate: f64,
    /// Requests sent.
    pub sent: u64,
    /// `draft_update_confirmed` received.
    pub confirmed: u64,
    /// Confirmed per second, over the step (or until the last reply, if later).
    pub achieved_rate: f64,
    /// Requests with no reply by the end of the drain.
    pub timed_out: u64,
    /// Errors by code.
    pub errors: BTreeMap<String, u64>,
    /// Latency of confirmed requests.
    pub latency: LatencySummary,
    /// Offered per-connection rate exceeded the announced limit.
    pub over_rate_limit: bool,
    /// p99 <= target and achieved >= min fraction of offered.
    pub pass: bool,
}

/// Whether a step meets the target.
pub fn step_passes(p99_ms: f64, confirmed: u64, achieved: f64, offered: f64, target_ms: f64, min_frac: f64) -> bool {
    confirmed > 0 && p99_ms <= target_ms && achieved >= min_frac * offered
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, args: SaturateArgs) -> Result<Report> {
    let mut notes = Vec::new();
    if args.start_rate <= 0.0 || args.step_rate < 0.0 || args.step_secs <= 0.0 {
        bail!("--start-rate and --step-secs must be positive, --step-rate not negative");
    }
    // One connection per user first, then further devices if there are not enough users.
    let groups = group_by_user(&ctx.creds);
    let depth = groups.iter().map(|g| g.devices.len()).max().unwrap_or(0);
    let creds: Vec<Credential> = (0..depth)
        .flat_map(|d| groups.iter().filter_map(move |g| g.devices.get(d).cloned()))
        .take(args.connections.min(ctx.fd_capacity()))
        .collect();
    if creds.len() < args.connections {
        notes.push(format!("only {} connections available (asked {})", creds.len(), args.connections));
    }
    let epoch = Instant::now();
    let handler =
        Arc::new(Handler { epoch, steps: Mutex::new(Vec::new()), timeline: Mutex::new(Timeline::new(epoch)) });
    let cancel = CancellationToken::new();
    let pb = ctx.progress(creds.len() as u64, "connect");
    let opened =
        open_many(ctx.connector.clone(), &creds, ctx.common.ramp_per_sec, handler.clone(), cancel.clone(), &pb).await;
    pb.finish_and_clear();
    let mut rate_limit: Option<u32> = None;
    let mut conns: Vec<(String, Sink)> = Vec::new();
    for (c, cred) in opened.conns.into_iter().zip(&creds) {
        if let Some(c) = c {
            if let Some(r) = c.greeting.rate_per_sec {
                rate_limit = Some(rate_limit.map_or(r, |m| m.min(r)));
            }
            conns.push((format!("{}-sat{}", id_safe(&cred.user_id, 48), conns.len()), c.sink));
        }
    }
    if conns.is_empty() {
        bail!("no connection opened: {:?}", opened.failures);
    }
    let n = conns.len();
    let start = Instant::now();
    *handler.timeline.lock().expect("timeline lock") = Timeline::new(start);

    let mut results: Vec<StepResult> = Vec::new();
    let mut step = 0usize;
    let mut rate_now = args.start_rate;
    let rates_total = if args.step_rate > 0.0 {
        ((args.max_rate - args.start_rate) / args.step_rate).floor().max(0.0) as u64 + 1
    } else {
        1
    };
    let pb = ctx.progress(rates_total, "saturate");
    while rate_now <= args.max_rate + 1e-9 {
        let per_conn = rate_now / n as f64;
        let over = rate_limit.is_some_and(|r| per_conn > r as f64);
        if over && !args.exceed_rate_limit {
            notes.push(format!(
                "stopped before {rate_now:.0}/s: {per_conn:.1}/s per connection would exceed the announced limit {}/s \
                 (use more --connections, or --exceed-rate-limit)",
                rate_limit.unwrap_or(0)
            ));
            break;
        }
        if over {
            notes.push(format!("step {step} ({rate_now:.0}/s) EXCEEDS the announced per-connection rate limit"));
        }
        pb.set_message(format!("step {step}: {rate_now:.0}/s"));
        handler.steps.lock().expect("steps lock").push(StepStats::default());
        let step_start = Instant::now() + Duration::from_millis(100);
        let mut tasks = Vec::new();
        for (i, (chat_id, mut sink)) in std::mem::take(&mut conns).into_iter().enumerate() {
            let offsets = conn_offsets(i, n, rate_now, args.step_secs);
            let base_us = (step_start - epoch).as_micros() as u64;
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u64;
                for (k, off) in offsets.into_iter().enumerate() {
                    let sched_us = base_us + off;
                    tokio::time::sleep_until((epoch + Duration::from_micros(sched_us)).into()).await;
                    let frame = json!({"type": "update_draft", "request_id": format!("s{step}:{sched_us}"),
                        "payload": {"chat_id": chat_id, "draft_json": {"type": "doc", "content": [
                            {"type": "paragraph", "content": [{"type": "text", "text": format!("saturate {step} {k}")}]}]}}});
                    if sink.send(Message::text(frame.to_string())).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
                (chat_id, sink, sent)
            }));
        }
        let mut sent = 0;
        for t in tasks {
            if let Ok((chat_id, sink, s)) = t.await {
                sent += s;
                conns.push((chat_id, sink));
            }
        }
        let drain_end = Instant::now() + Duration::from_secs_f64(args.drain);
        while Instant::now() < drain_end {
            if handler.steps.lock().expect("steps lock")[step].replies >= sent {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = std::mem::take(&mut handler.steps.lock().expect("steps lock")[step]);
        let busy = s
            .last_reply
            .map_or(args.step_secs, |t| t.saturating_duration_since(step_start).as_secs_f64())
            .max(args.step_secs);
        let achieved = per(s.confirmed as f64, busy);
        let latency = s.latency.summary();
        let pass = step_passes(latency.p99_ms, s.confirmed, achieved, rate_now, args.p99_target_ms, args.min_achieved);
        results.push(StepResult {
            step,
            offered_rate: rate_now,
            sent,
            confirmed: s.confirmed,
            achieved_rate: achieved,
            timed_out: sent.saturating_sub(s.replies),
            errors: s.errors,
            latency,
            over_rate_limit: over,
            pass,
        });
        pb.inc(1);
        if conns.is_empty() {
            notes.push("every connection failed; stopping".into());
            break;
        }
        if !pass && !args.keep_going {
            break;
        }
        if args.step_rate <= 0.0 {
            break;
        }
        step += 1;
        rate_now += args.step_rate;
    }
    pb.finish_and_clear();
    let closes = opened.log.closes();
    cancel.cancel();
    close_all(conns.into_iter().map(|(_, s)| s), Duration::from_secs(10)).await;

    // The answer: the last passing step before the first failure (or the last passing one with --keep-going).
    let best = if args.keep_going {
        results.iter().rev().find(|r| r.pass && !r.over_rate_limit)
    } else {
        results.iter().take_while(|r| r.pass).filter(|r| !r.over_rate_limit).last()
    };
    let mut steps_t = Table::new(
        "steps (latency from scheduled send to draft_update_confirmed)",
        &[
            "step",
            "offered/s",
            "sent",
            "confirmed/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "timeouts",
            "errors",
            "pass",
        ],
    );
    let mut all_errors = BTreeMap::new();
    for r in &results {
        super::add_counts(&mut all_errors, &r.errors);
        steps_t.row(vec![
            r.step.to_string(),
            f(r.offered_rate, 0),
            r.sent.to_string(),
            f(r.achieved_rate, 0),
            ms(r.latency.p50_ms),
            ms(r.latency.p90_ms),
            ms(r.latency.p99_ms),
            ms(r.latency.max_ms),
            r.timed_out.to_string(),
            r.errors.values().sum::<u64>().to_string(),
            format!("{}{}", if r.pass { "yes" } else { "NO" }, if r.over_rate_limit { " (over limit)" } else { "" }),
        ]);
    }
    let mut summary = Table::new("saturate", &[]);
    summary
        .kv("connections", n)
        .kv("p99 target", format!("{} ms", args.p99_target_ms))
        .kv("rate limit per connection", rate_limit.map_or("not announced".into(), |r| format!("{r}/s")))
        .kv(
            "highest sustained rate",
            best.map_or("none met the target".into(), |b| {
                format!(
                    "{:.0}/s offered, {:.0}/s confirmed, p99 {} ms",
                    b.offered_rate,
                    b.achieved_rate,
                    ms(b.latency.p99_ms)
                )
            }),
        );
    let series = handler.timeline.lock().expect("timeline lock").series();
    let json = json!({
        "params": {
            "connections": n, "start_rate": args.start_rate, "step_rate": args.step_rate, "max_rate": args.max_rate,
            "step_secs": args.step_secs, "drain_secs": args.drain, "p99_target_ms": args.p99_target_ms,
            "min_achieved": args.min_achieved, "keep_going": args.keep_going,
        },
        "results": {
            "rate_limit_per_conn": rate_limit,
            "steps": results,
            "best": best,
            "highest_sustained_rate": best.map(|b| b.offered_rate),
            "errors": all_errors,
            "failures": opened.failures,
            "closes": closes,
            "latency_per_second": series,
        },
    });
    Ok(Report {
        scenario: "saturate".into(),
        json,
        tables: vec![
            summary,
            steps_t,
            counts_table("errors by code (all steps)", &all_errors),
            counts_table("closed by the server during the run", &closes),
        ],
        notes,
        panels: vec![latency_panel("update_draft latency per second", "seconds since first step", &series)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_round_trip() {
        assert_eq!(parse_request_id("s3:123456"), Some((3, 123_456)));
        assert_eq!(parse_request_id("x3:1"), None);
        assert_eq!(parse_request_id("s3"), None);
    }

    #[test]
    fn pass_needs_latency_and_throughput() {
        assert!(step_passes(40.0, 100, 960.0, 1000.0, 50.0, 0.95));
        assert!(!step_passes(60.0, 100, 1000.0, 1000.0, 50.0, 0.95));
        assert!(!step_passes(10.0, 100, 900.0, 1000.0, 50.0, 0.95));
        assert!(!step_passes(0.0, 0, 0.0, 1000.0, 50.0, 0.95));
    }
}
