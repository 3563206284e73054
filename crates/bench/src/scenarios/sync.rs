//! `sync`: for one user, make sure C chats exist (ids `<user>-sync<i>`, created with `update_title`
//! and/or `update_draft`, pipelined at no more than the rate limit announced in `connected`), then
//! time `initial_sync_request` with empty `chat_versions` → `initial_sync_response`, R times per C.
//! Population is incremental: chats already on the server (seen in a first sync) are not re-sent.

use super::{counts_table, per, Ctx};
use crate::connect::{close_all, open_many, Envelope, FrameHandler, Sink};
use crate::metrics::{Latency, LatencySummary};
use crate::report::{f, ms, Line, Panel, Report, Table};
use crate::tokens::id_safe;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use futures_util::SinkExt;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// What population writes per chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Populate {
    /// `update_title` only.
    Title,
    /// `update_draft` only.
    Draft,
    /// `update_title` then `update_draft` (two requests per chat).
    Both,
}

/// `sync` options.
#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    /// Chat counts to measure, ascending (population is cumulative).
    #[arg(long, value_name = "C,...", value_delimiter = ',', default_value = "1000,10000")]
    pub chats: Vec<usize>,
    /// Timed `initial_sync_request` round trips per chat count.
    #[arg(long, value_name = "R", default_value_t = 20)]
    pub repeat: usize,
    /// The user [default: the last user in the tokens file]; its first session is used.
    #[arg(long, value_name = "USER_ID")]
    pub user: Option<String>,
    /// Do not populate (the chats already exist); only time the syncs.
    #[arg(long)]
    pub skip_populate: bool,
    /// What population writes per chat.
    #[arg(long, value_enum, default_value_t = Populate::Both)]
    pub populate: Populate,
    /// Population requests per second per connection [default: 95% of the announced `rate_per_sec`, or 1000 if none].
    #[arg(long, value_name = "RPS")]
    pub populate_rate: Option<f64>,
    /// Connections of the user to populate over (each paced to the rate; the rate limit is per connection).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub populate_connections: usize,
    /// Most population requests in flight per connection.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub window: u64,
    /// Seconds to wait for one sync reply, and for population replies to settle.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub request_timeout: f64,
}

struct SyncReply {
    request_id: Option<String>,
    at: Instant,
    bytes: usize,
    kind: String,
    chats_changed: usize,
    order: Vec<String>,
    /// More parts follow (`more: true`, "Bounded replies"); a server without parts never says so.
    more: bool,
}

struct Handler {
    acked: Mutex<HashSet<String>>,
    errors: Mutex<BTreeMap<String, u64>>,
    replies: AtomicU64,
    notify: Notify,
    sync_tx: mpsc::UnboundedSender<SyncReply>,
}

impl FrameHandler for Handler {
    fn on_text(&self, _conn: usize, text: &str, at: Instant) {
        let Some(env) = Envelope::parse(text) else { return };
        match env.kind.as_str() {
            "initial_sync_response" | "initial_sync_error" => {
                let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                let p = &v["payload"];
                let order = p["server_chat_order"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                let _ = self.sync_tx.send(SyncReply {
                    request_id: env.request_id.clone(),
                    at,
                    bytes: text.len(),
                    kind: env.kind.clone(),
                    chats_changed: p["chats_to_add_or_update"].as_array().map_or(0, Vec::len),
                    order,
                    more: p["more"] == Value::Bool(true),
                });
            }
            "draft_update_confirmed" | "chat_title_updated" => {
                // Titles are acknowledged by the broadcast, which some servers send without request_id.
                let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                if let Some(chat) = v["payload"]["chat_id"].as_str() {
                    let tag = if env.kind == "chat_title_updated" { "t" } else { "d" };
                    if self.acked.lock().expect("acked lock").insert(format!("{tag}:{chat}")) {
                        self.replies.fetch_add(1, Ordering::Relaxed);
                        self.notify.notify_waiters();
                    }
                }
            }
            "error" => {
                let code = env.error_code().unwrap_or("(no code)").to_owned();
                *self.errors.lock().expect("errors lock").entry(code).or_default() += 1;
                if env.request_id.as_deref().is_some_and(|r| r.starts_with("p")) {
                    self.replies.fetch_add(1, Ordering::Relaxed);
                    self.notify.notify_waiters();
                }
            }
            _ => {}
        }
    }
}

/// The chat id of the `i`-th sync chat of a user.
pub fn chat_id(safe_user: &str, i: usize) -> String {
    format!("{safe_user}-sync{i}")
}

/// Population requests for chat `i`, in order.
pub fn populate_frames(mode: Populate, chat: &str, i: usize) -> Vec<String> {
    let title = || {
        json!({"type": "update_title", "request_id": format!("pt:{chat}"),
               "payload": {"chat_id": chat, "new_title": format!("Sync bench chat {i}")}})
        .to_string()
    };
    let draft = || {
        json!({"type": "update_draft", "request_id": format!("pd:{chat}"), "payload": {"chat_id": chat,
               "draft_json": {"type": "doc", "content": [{"type": "paragraph", "content": [
                   {"type": "text", "text": format!("draft of sync bench chat {i}")}]}]}}})
        .to_string()
    };
    match mode {
        Populate::Title => vec![title()],
        Populate::Draft => vec![draft()],
        Populate::Both => vec![title(), draft()],
    }
}

/// One chat count's results.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    /// C.
    pub chats: usize,
    /// Chats created now (the rest existed).
    pub populated: usize,
    /// Population requests sent.
    pub populate_requests: u64,
    /// Seconds population took.
    pub populate_secs: f64,
    /// Chats the server listed in `server_chat_order` (all of the user's chats).
    pub server_chats: usize,
    /// Entries in `chats_to_add_or_update`.
    pub chats_returned: usize,
    /// Mean reply size, bytes.
    pub reply_bytes: usize,
    /// Round trips that failed (error reply or timeout).
    pub failed: usize,
    /// Round-trip latency.
    pub latency: LatencySummary,
    /// Each round trip, ms, in order.
    pub samples_ms: Vec<f64>,
}

async fn sync_once(
    sink: &mut Sink,
    rx: &mut mpsc::UnboundedReceiver<SyncReply>,
    request_id: &str,
    timeout: Duration,
) -> Result<(Duration, SyncReply)> {
    let frame = json!({"type": "initial_sync_request", "request_id": request_id, "payload": {"chat_versions": {}}});
    let sent_at = Instant::now();
    sink.send(Message::text(frame.to_string())).await.context("send failed")?;
    let deadline = sent_at + timeout;
    // A reply in parts is whole at its last part: the round trip ends there, and the parts add up.
    let (mut bytes, mut chats) = (0, 0);
    loop {
        let r = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .context("timed out waiting for initial_sync_response")?
            .context("connection closed")?;
        if r.request_id.as_deref() != Some(request_id) {
            continue;
        }
        bytes += r.bytes;
        chats += r.chats_changed;
        if !r.more || r.kind != "initial_sync_response" {
            return Ok((r.at.saturating_duration_since(sent_at), SyncReply { bytes, chats_changed: chats, ..r }));
        }
    }
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, args: SyncArgs) -> Result<Report> {
    let mut notes = Vec::new();
    let user = match &args.user {
        Some(u) => u.clone(),
        None => ctx.creds.last().expect("tokens file is not empty").user_id.clone(),
    };
    let user_creds: Vec<_> = ctx.creds.iter().filter(|c| c.user_id == user).cloned().collect();
    let Some(first) = user_creds.first() else {
        bail!("user {user} is not in the tokens file");
    };
    let pop_conns = args.populate_connections.max(1);
    // Extra connections reuse the user's first session: two tabs on one device are two connections.
    let creds: Vec<_> = (0..pop_conns).map(|_| first.clone()).collect();
    let mut sizes = args.chats.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() || args.repeat == 0 {
        bail!("--chats and --repeat must not be empty or zero");
    }
    let (sync_tx, mut rx) = mpsc::unbounded_channel();
    let handler = Arc::new(Handler {
        acked: Mutex::default(),
        errors: Mutex::default(),
        replies: AtomicU64::new(0),
        notify: Notify::new(),
        sync_tx,
    });
    let cancel = CancellationToken::new();
    let pb = ctx.progress(creds.len() as u64, "connect");
    let opened =
        open_many(ctx.connector.clone(), &creds, ctx.common.ramp_per_sec, handler.clone(), cancel.clone(), &pb).await;
    pb.finish_and_clear();
    let mut rate_limit = None;
    let mut sinks = Vec::new();
    for c in opened.conns.into_iter().flatten() {
        rate_limit = c.greeting.rate_per_sec.or(rate_limit);
        sinks.push(c.sink);
    }
    if sinks.is_empty() {
        bail!("could not connect as {user}: {:?}", opened.failures);
    }
    let pop_rate = args.populate_rate.unwrap_or_else(|| rate_limit.map_or(1000.0, |r| r as f64 * 0.95));
    if rate_limit.is_some_and(|r| pop_rate > r as f64) {
        notes.push(format!(
            "--populate-rate {pop_rate}/s EXCEEDS the announced per-connection limit {}/s",
            rate_limit.unwrap_or(0)
        ));
    }
    let timeout = Duration::from_secs_f64(args.request_timeout);
    let safe = id_safe(&user, 50);

    // What exists already.
    let (_, r) = sync_once(&mut sinks[0], &mut rx, "sync-probe", timeout).await?;
    if r.kind != "initial_sync_response" {
        bail!("the first initial_sync_request failed: {}", r.kind);
    }
    let mut existing: HashSet<String> = r.order.into_iter().collect();

    let mut results = Vec::new();
    let mut panel_lines = Vec::new();
    for &c in &sizes {
        // Populate the missing chats.
        let missing: Vec<usize> = (0..c).filter(|i| !existing.contains(&chat_id(&safe, *i))).collect();
        let mut pop_requests = 0u64;
        let pop_start = Instant::now();
        if !missing.is_empty() && !args.skip_populate {
            let frames: Vec<String> =
                missing.iter().flat_map(|&i| populate_frames(args.populate, &chat_id(&safe, i), i)).collect();
            pop_requests = frames.len() as u64;
            let pb = ctx.progress(pop_requests, &format!("populate {c}"));
            let base = handler.replies.load(Ordering::Relaxed);
            let interval = Duration::from_secs_f64(1.0 / pop_rate);
            let nconn = sinks.len();
            let mut sent = 0u64;
            let mut next = vec![Instant::now(); nconn];
            for (j, frame) in frames.into_iter().enumerate() {
                let ci = j % nconn;
                // Pace each connection, and keep at most `window` requests in flight per connection.
                while sent.saturating_sub(handler.replies.load(Ordering::Relaxed) - base) >= args.window * nconn as u64
                {
                    let _ = tokio::time::timeout(Duration::from_millis(50), handler.notify.notified()).await;
                }
                tokio::time::sleep_until(next[ci].into()).await;
                next[ci] = next[ci].max(Instant::now() - interval) + interval;
                sinks[ci].send(Message::text(frame)).await.context("populate: send failed")?;
                sent += 1;
                pb.set_position(handler.replies.load(Ordering::Relaxed) - base);
            }
            let deadline = Instant::now() + timeout;
            while handler.replies.load(Ordering::Relaxed) - base < sent && Instant::now() < deadline {
                let _ = tokio::time::timeout(Duration::from_millis(100), handler.notify.notified()).await;
                pb.set_position(handler.replies.load(Ordering::Relaxed) - base);
            }
            pb.finish_and_clear();
            let got = handler.replies.load(Ordering::Relaxed) - base;
            if got < sent {
                notes.push(format!("populate {c}: {} of {sent} requests got no reply", sent - got));
            }
        } else if !missing.is_empty() {
            notes.push(format!("--skip-populate: {} of {c} chats are missing on the server", missing.len()));
        }
        let populate_secs = pop_start.elapsed().as_secs_f64();
        for i in &missing {
            existing.insert(chat_id(&safe, *i));
        }

        // Time the syncs.
        let pb = ctx.progress(args.repeat as u64, &format!("sync {c}"));
        let mut lat = Latency::default();
        let mut samples = Vec::new();
        let (mut bytes, mut server_chats, mut returned, mut failed) = (0usize, 0usize, 0usize, 0usize);
        for r in 0..args.repeat {
            match sync_once(&mut sinks[0], &mut rx, &format!("sync{c}-{r}"), timeout).await {
                Ok((d, reply)) if reply.kind == "initial_sync_response" => {
                    lat.record(d);
                    samples.push(d.as_secs_f64() * 1000.0);
                    bytes += reply.bytes;
                    server_chats = reply.order.len();
                    returned = reply.chats_changed;
                }
                Ok((_, reply)) => {
                    failed += 1;
                    notes.push(format!("sync {c} #{r}: {}", reply.kind));
                }
                Err(e) => {
                    failed += 1;
                    notes.push(format!("sync {c} #{r}: {e:#}"));
                    if e.to_string().contains("closed") {
                        break;
                    }
                }
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        if server_chats < c {
            notes.push(format!("sync {c}: the server lists only {server_chats} chats for {user}"));
        }
        panel_lines.push(Line {
            name: format!("{c} chats"),
            points: samples.iter().enumerate().map(|(i, v)| (i as f64 + 1.0, *v)).collect(),
        });
        results.push(SizeResult {
            chats: c,
            populated: if args.skip_populate { 0 } else { missing.len() },
            populate_requests: pop_requests,
            populate_secs,
            server_chats,
            chats_returned: returned,
            reply_bytes: bytes / samples.len().max(1),
            failed,
            latency: lat.summary(),
            samples_ms: samples,
        });
    }
    let closes = opened.log.closes();
    cancel.cancel();
    close_all(sinks, Duration::from_secs(5)).await;

    let errors = handler.errors.lock().expect("errors lock").clone();
    let mut t = Table::new(
        &format!("initial_sync_request round trip, user {user}, empty chat_versions"),
        &[
            "chats",
            "populated",
            "populate s",
            "server chats",
            "returned",
            "reply KiB",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "failed",
        ],
    );
    for r in &results {
        t.row(vec![
            r.chats.to_string(),
            r.populated.to_string(),
            f(r.populate_secs, 1),
            r.server_chats.to_string(),
            r.chats_returned.to_string(),
            f(r.reply_bytes as f64 / 1024.0, 1),
            ms(r.latency.p50_ms),
            ms(r.latency.p90_ms),
            ms(r.latency.p99_ms),
            ms(r.latency.max_ms),
            r.failed.to_string(),
        ]);
    }
    let mut info = Table::new("sync", &[]);
    info.kv("repeat per size", args.repeat)
        .kv("populate rate per connection", format!("{pop_rate:.0}/s"))
        .kv("populate connections", pop_conns)
        .kv("rate limit per connection", rate_limit.map_or("not announced".into(), |r| format!("{r}/s")));
    let json = json!({
        "params": {
            "user": user, "chats": sizes, "repeat": args.repeat, "skip_populate": args.skip_populate,
            "populate": args.populate, "populate_rate": pop_rate, "populate_connections": pop_conns,
            "window": args.window,
        },
        "results": {
            "sizes": results,
            "populate_rate_per_sec_achieved": results.iter().map(|r| per(r.populate_requests as f64, r.populate_secs)).collect::<Vec<_>>(),
            "rate_limit_per_conn": rate_limit,
            "errors": errors, "closes": closes, "failures": opened.failures,
        },
    });
    Ok(Report {
        scenario: "sync".into(),
        json,
        tables: vec![info, t, counts_table("errors by code", &errors), counts_table("closed by the server", &closes)],
        notes,
        panels: vec![Panel {
            title: "initial_sync_request round trip".into(),
            x_label: "repetition".into(),
            y_label: "latency ms".into(),
            log_y: true,
            lines: panel_lines,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populate_frames_per_mode() {
        assert_eq!(populate_frames(Populate::Both, "u-sync1", 1).len(), 2);
        let t: Value = serde_json::from_str(&populate_frames(Populate::Title, "u-sync1", 1)[0]).unwrap();
        assert_eq!(t["type"], "update_title");
        assert_eq!(t["payload"]["chat_id"], "u-sync1");
        let d: Value = serde_json::from_str(&populate_frames(Populate::Draft, "c", 2)[0]).unwrap();
        assert_eq!(d["type"], "update_draft");
        assert_eq!(chat_id("u0", 7), "u0-sync7");
    }
}
