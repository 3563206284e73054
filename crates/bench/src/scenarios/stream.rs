//! `stream`: S streams (one per user, SERVER_API.md section 4), each user with D devices connected. Every
//! stream is started through the server API, then sends `--chunks-per-sec` chunks per second (open loop,
//! phase-shifted across streams) for `--duration`, then is aborted. Each chunk's delta carries a marker
//! `cs1:<stream>:<seq>:<µs>` (the time the bench made the API call); every device of the user records, for
//! each marker it receives (chunks may arrive merged), the latency from that API call to receipt, and
//! checks that each stream's chunks arrive in order and exactly once. Reports p50/p99 delivery latency,
//! the API call latency, deliveries per second achieved against offered, and (with --server-pid) server
//! CPU per delivery.

use super::{latency_panel, latency_table, per, rate, Ctx};
use crate::connect::{close_all, open_many, FrameHandler};
use crate::metrics::{Latency, Timeline};
use crate::report::{Report, Table};
use crate::tokens::group_by_user;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;
use serde_json::json;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `stream` options.
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// Concurrent streams (S): one per user, users in tokens-file order among those with D sessions.
    #[arg(long, value_name = "S", default_value_t = 1000)]
    pub streams: usize,
    /// Devices (connections) per user (D).
    #[arg(long, value_name = "D", default_value_t = 3)]
    pub devices: usize,
    /// Chunks per second per stream.
    #[arg(long, value_name = "N", default_value_t = 20.0)]
    pub chunks_per_sec: f64,
    /// Seconds of chunks.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub duration: f64,
    /// Text per chunk besides the marker, bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 24)]
    pub chunk_bytes: usize,
    /// The server API key (`chatsync api-keys create`); or the environment variable.
    #[arg(long, env = "CHATSYNC_BENCH_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: String,
    /// The API base URL [default: from the first --url, `/v1/ws` → `/v1/api`, ws → http].
    #[arg(long, value_name = "URL")]
    pub api_url: Option<String>,
    /// Seconds to wait after the last chunk for outstanding deliveries.
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    pub drain: f64,
}

const MARKER: &str = "cs1:";

/// Every `cs1:<stream>:<seq>:<µs>` marker in `text`, in order.
fn markers(text: &str) -> Vec<(usize, u64, u64)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(MARKER) {
        rest = &rest[i + MARKER.len()..];
        let mut it = rest.splitn(3, ':');
        let (Some(s), Some(q), Some(t)) = (it.next(), it.next(), it.next()) else { break };
        let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        if let (Ok(s), Ok(q), Ok(t)) = (s.parse(), q.parse(), t[..end].parse()) {
            out.push((s, q, t));
        }
    }
    out
}

struct Inner {
    delivery: Timeline,
    /// Per connection: the last seq seen of its user's stream.
    last_seq: Vec<u64>,
    /// Per connection: the chunks received in order (a repeat does not make up for a missed one).
    received: Vec<u64>,
    out_of_order: u64,
    merged_frames: u64,
    other: BTreeMap<String, u64>,
}

struct Handler {
    epoch: Instant,
    inner: Mutex<Inner>,
    deliveries: AtomicU64,
    frames: AtomicU64,
}

/// What the handler reads of a frame: its type and, for a chunk, the delta (borrowed unless escaped).
/// Parsed into this rather than a `serde_json::Value`, which costs the bench CPU the server lacks.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    payload: Option<ChunkPayload<'a>>,
}

#[derive(Deserialize)]
struct ChunkPayload<'a> {
    #[serde(default, borrow)]
    delta: Option<Cow<'a, str>>,
}

impl FrameHandler for Handler {
    fn on_text(&self, conn: usize, text: &str, at: Instant) {
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            // Not the shape any server frame has today; counted, not dropped silently.
            *self.inner.lock().expect("handler lock").other.entry("unparsed".into()).or_default() += 1;
            return;
        };
        let mut inner = self.inner.lock().expect("handler lock");
        if frame.kind != "stream_chunk" {
            *inner.other.entry(frame.kind.into_owned()).or_default() += 1;
            return;
        }
        self.frames.fetch_add(1, Ordering::Relaxed);
        let found = markers(frame.payload.as_ref().and_then(|p| p.delta.as_deref()).unwrap_or(""));
        if found.len() > 1 {
            inner.merged_frames += 1;
        }
        for (_, seq, sent_us) in found {
            if seq <= inner.last_seq[conn] {
                inner.out_of_order += 1;
            } else {
                inner.received[conn] += 1;
            }
            inner.last_seq[conn] = seq;
            let sent = self.epoch + Duration::from_micros(sent_us);
            inner.delivery.record(sent, at.saturating_duration_since(sent));
            self.deliveries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A failed call's error with its causes ("error sending request" alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    use std::fmt::Write as _;
    let mut out = format!("error: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(out, ": {c}");
        cause = c.source();
    }
    out
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, args: StreamArgs) -> Result<Report> {
    if args.devices == 0 || args.streams == 0 || args.chunks_per_sec <= 0.0 {
        bail!("--streams, --devices and --chunks-per-sec must be positive");
    }
    let mut notes = Vec::new();
    let groups: Vec<_> =
        group_by_user(&ctx.creds).into_iter().filter(|g| g.devices.len() >= args.devices).take(args.streams).collect();
    if groups.len() < args.streams {
        notes.push(format!("only {} users with {} sessions in the tokens file", groups.len(), args.devices));
    }
    let s = groups.len();
    if s == 0 {
        bail!("no user has {} sessions in the tokens file", args.devices);
    }
    let creds: Vec<_> = groups.iter().flat_map(|g| g.devices[..args.devices].iter().cloned()).collect();
    if creds.len() > ctx.fd_capacity() {
        bail!("{} connections exceed the open-files limit ({})", creds.len(), ctx.nofile);
    }
    let api_url = match &args.api_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => ctx.common.url[0].replacen("ws", "http", 1).replace("/v1/ws", "/v1/api"),
    };
    let http = reqwest::Client::builder().pool_max_idle_per_host(s.max(16)).build()?;

    let epoch = Instant::now();
    let handler = Arc::new(Handler {
        epoch,
        inner: Mutex::new(Inner {
            delivery: Timeline::new(epoch),
            last_seq: vec![0; creds.len()],
            received: vec![0; creds.len()],
            out_of_order: 0,
            merged_frames: 0,
            other: BTreeMap::new(),
        }),
        deliveries: AtomicU64::new(0),
        frames: AtomicU64::new(0),
    });
    let cancel = CancellationToken::new();
    let pb = ctx.progress(creds.len() as u64, "connect");
    let opened =
        open_many(ctx.connector.clone(), &creds, ctx.common.ramp_per_sec, handler.clone(), cancel.clone(), &pb).await;
    pb.finish_and_clear();
    if opened.ok() < creds.len() {
        notes.push(format!("{} of {} connections failed to open", creds.len() - opened.ok(), creds.len()));
    }

    // Start every stream.
    let run_id = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis());
    let path = |g: &crate::tokens::UserGroup| format!("{api_url}/users/{}/chats/bench-stream/streams", g.user_id);
    for (i, g) in groups.iter().enumerate() {
        let body = json!({"stream_id": format!("b{run_id}-{i}"), "message_id": format!("b{run_id}-{i}"),
                          "sender_name": "assistant", "meta": {"bench": true}});
        let resp = http.post(path(g)).bearer_auth(&args.api_key).json(&body).send().await.context("start")?;
        if !resp.status().is_success() {
            bail!("starting a stream: HTTP {} {}", resp.status(), resp.text().await.unwrap_or_default());
        }
    }

    // Chunks: one task per stream, open loop.
    let before = ctx.sample_server();
    let api_latency = Arc::new(Mutex::new(Latency::default()));
    let statuses = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let lag = Arc::new(Mutex::new(Latency::default()));
    let sent = Arc::new(AtomicU64::new(0));
    // Per stream: chunks accepted (202), to find the devices that missed some.
    let accepted_per_stream: Arc<Vec<AtomicU64>> = Arc::new((0..s).map(|_| AtomicU64::new(0)).collect());
    let t0 = Instant::now() + Duration::from_millis(200);
    let period = 1.0 / args.chunks_per_sec;
    let filler = "x".repeat(args.chunk_bytes);
    let mut tasks = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        // Parsed once: reqwest would parse a string URL on every call.
        let url = reqwest::Url::parse(&format!("{}/b{run_id}-{i}/chunks", path(g)))?;
        let accepted_here = accepted_per_stream.clone();
        let (http, key, api_latency, statuses, lag, sent, filler) = (
            http.clone(),
            args.api_key.clone(),
            api_latency.clone(),
            statuses.clone(),
            lag.clone(),
            sent.clone(),
            filler.clone(),
        );
        let (phase, duration) = (period * i as f64 / s as f64, args.duration);
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            loop {
                let due = phase + seq as f64 * period;
                if due >= duration {
                    break;
                }
                let due = t0 + Duration::from_secs_f64(due);
                tokio::time::sleep_until(due.into()).await;
                seq += 1;
                let call = Instant::now();
                lag.lock().expect("lag").record(call.saturating_duration_since(due));
                let us = call.duration_since(epoch).as_micros();
                // The delta needs no JSON escaping (digits, colons, `x`), so the body is written directly.
                let body = format!(r#"{{"seq":{seq},"delta":"{MARKER}{i}:{seq}:{us} {filler}"}}"#);
                let request = http
                    .post(url.clone())
                    .bearer_auth(&key)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                let status = match request.send().await {
                    // The status decides; the body is read to its end all the same, so that the time
                    // measured is the whole call (and over HTTP/2 an unread response resets its stream).
                    Ok(r) => {
                        let status = r.status().as_u16().to_string();
                        let _ = r.bytes().await;
                        status
                    }
                    Err(e) => error_chain(&e.without_url()),
                };
                api_latency.lock().expect("api").record(call.elapsed());
                sent.fetch_add(1, Ordering::Relaxed);
                if status == "202" {
                    accepted_here[i].fetch_add(1, Ordering::Relaxed);
                }
                *statuses.lock().expect("statuses").entry(status).or_default() += 1;
            }
        }));
    }
    let pb = ctx.progress(args.duration as u64, "stream");
    for t in tasks {
        t.await?;
    }
    let send_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    tokio::time::sleep(Duration::from_secs_f64(args.drain)).await;
    let after = ctx.sample_server();
    let closes = opened.log.closes();

    for (i, g) in groups.iter().enumerate() {
        let _ = http.delete(format!("{}/b{run_id}-{i}", path(g))).bearer_auth(&args.api_key).send().await;
    }
    cancel.cancel();
    close_all(opened.conns.into_iter().flatten().map(|c| c.sink), Duration::from_secs(10)).await;

    let accepted = statuses.lock().expect("statuses").get("202").copied().unwrap_or(0);
    let expected = accepted * args.devices as u64;
    let deliveries = handler.deliveries.load(Ordering::Relaxed);
    let frames = handler.frames.load(Ordering::Relaxed);
    let inner = handler.inner.lock().expect("handler lock");
    // Devices that received fewer chunks than their stream had accepted, and how many they missed
    // (connections that failed to open count here too, besides the note that says so).
    let (mut short_devices, mut short_chunks) = (0u64, 0u64);
    for (conn, &received) in inner.received.iter().enumerate() {
        let accepted = accepted_per_stream[conn / args.devices].load(Ordering::Relaxed);
        if received < accepted {
            short_devices += 1;
            short_chunks += accepted - received;
        }
    }
    let delivery = inner.delivery.total().summary();
    let api = api_latency.lock().expect("api").summary();
    let lag = lag.lock().expect("lag").summary();
    let offered = s as f64 * args.chunks_per_sec * args.devices as f64;
    let achieved = per(deliveries as f64, send_secs);
    let mut summary = Table::new("stream", &[]);
    summary
        .kv("streams x devices", format!("{s} x {}", args.devices))
        .kv("chunks per second per stream", args.chunks_per_sec)
        .kv("offered chunk deliveries", format!("{}/s", rate(offered)))
        .kv("achieved chunk deliveries", format!("{}/s (over {send_secs:.1} s of sending)", rate(achieved)))
        .kv("chunks sent / accepted (202)", format!("{} / {accepted}", sent.load(Ordering::Relaxed)))
        .kv("deliveries expected / received", format!("{expected} / {deliveries}"))
        .kv("frames received (merged frames)", format!("{frames} ({})", inner.merged_frames))
        .kv("out of order or repeated", inner.out_of_order)
        .kv("devices short of their stream's chunks (chunks missed)", format!("{short_devices} ({short_chunks})"));
    let mut server = json!(null);
    if let (Some(b), Some(a)) = (before, after) {
        let cpu = a.cpu_secs - b.cpu_secs;
        let per_delivery_us = per(cpu * 1e6, deliveries as f64);
        summary
            .kv("server CPU", format!("{cpu:.2} s ({:.0}% of a core)", cpu * 100.0 / (send_secs + args.drain)))
            .kv("server CPU per delivery (incl. its API call share)", format!("{per_delivery_us:.2} µs"));
        server = json!({"cpu_secs": cpu, "cpu_per_delivery_us": per_delivery_us, "rss_after_kib": a.rss_kib});
    }
    if deliveries < expected {
        notes.push(format!("{} deliveries missing", expected - deliveries));
    }
    if !closes.is_empty() {
        notes.push(format!("connections ended by the server during the run: {closes:?}"));
    }
    if lag.p99_ms > 10.0 {
        notes.push(format!(
            "the bench fell behind its schedule (p99 lag {:.1} ms): the offered rate was not met",
            lag.p99_ms
        ));
    }
    let status_table = super::counts_table("chunk API statuses", &statuses.lock().expect("statuses"));
    let tables = vec![
        summary,
        latency_table(
            "latency (ms)",
            &[
                ("API call → receipt on each device", &delivery),
                ("chunk API call (HTTP round trip)", &api),
                ("bench lag behind schedule", &lag),
            ],
        ),
        status_table,
        super::counts_table("other frames received", &inner.other),
    ];
    let json = json!({
        "params": {"streams": s, "devices": args.devices, "chunks_per_sec": args.chunks_per_sec,
                   "duration_secs": args.duration, "chunk_bytes": args.chunk_bytes},
        "results": {"offered_deliveries_per_sec": offered, "achieved_deliveries_per_sec": achieved,
                    "accepted": accepted, "expected": expected, "deliveries": deliveries, "frames": frames,
                    "merged_frames": inner.merged_frames, "out_of_order": inner.out_of_order,
                    "short_devices": short_devices, "short_chunks": short_chunks, "closes": closes,
                    "delivery_latency": delivery, "api_latency": api, "lag": lag,
                    "delivery_latency_per_second": inner.delivery.series()},
        "server": server,
    });
    let panels = vec![latency_panel("API call → receipt, per second", "seconds since start", &inner.delivery.series())];
    Ok(Report { scenario: "stream".into(), json, tables, notes, panels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_marker_of_a_merged_delta_is_found() {
        assert_eq!(markers("cs1:3:1:100 xx cs1:3:2:250 yy"), vec![(3, 1, 100), (3, 2, 250)]);
        assert_eq!(markers("nothing"), vec![]);
        assert_eq!(markers("cs1:3:1"), vec![]);
    }
}
