//! `fanout`: U users x D devices. Each user sends `--rate-per-user` updates per second on an
//! open-loop schedule computed upfront (rotating over its devices), in a mix of `update_draft`,
//! `chat_message_added` and `update_title`. Each update carries a marker `cs1:<conn>:<seq>:<µs>`
//! (sender connection, sequence, scheduled send time) in its text and `request_id`; every OTHER
//! connection of the user that receives the broadcast records the latency from the scheduled time,
//! and a ledger checks that each expected delivery arrives exactly once.
//!
//! The same engine drives `soak` ([`run_with`] and [`Extras`]): reads in the mix
//! (`initial_sync_request`, `get_chat_messages`, answered to the sender only), reconnects of idle
//! devices between sends, and server samples at the edges of the steady window.

use super::{add_counts, counts_table, latency_panel, latency_table, per, rate, Ctx};
use crate::connect::{attach, close_all, close_on_purpose, open_many, Connector, Envelope, FrameHandler, Sink};
use crate::ledger::{Delivery, Ledger, UpdateKey};
use crate::metrics::{Latency, LatencySummary, ProcSample, Timeline};
use crate::report::{Report, Table};
use crate::schedule::{chance, user_offsets, Mix, UpdateKind};
use crate::tokens::{group_by_user, id_safe, Credential};
use anyhow::{bail, Result};
use clap::Args;
use futures_util::SinkExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// `fanout` options.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Users (U), taken in tokens-file order among users with at least two sessions.
    #[arg(long, value_name = "U", default_value_t = 2000)]
    pub users: usize,
    /// Devices (connections) per user (D), the user's first D sessions in the tokens file.
    #[arg(long, value_name = "D", default_value_t = 3)]
    pub devices: usize,
    /// Updates each user sends per second (spread over its devices, phase-shifted across users).
    #[arg(long, value_name = "N", default_value_t = 1.0)]
    pub rate_per_user: f64,
    /// Seconds of sending.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub duration: f64,
    /// Relative weights of request kinds: draft (update_draft), message (chat_message_added), title
    /// (update_title), and the reads sync (initial_sync_request) and history (get_chat_messages).
    #[arg(long, value_name = "MIX", default_value = "draft=60,message=30,title=10")]
    pub mix: Mix,
    /// Chats per user that the updates go to (ids `<user>-fan<j>`).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub chats_per_user: usize,
    /// Seconds to wait after the last send for outstanding deliveries.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub drain: f64,
    /// Seconds after the first send at which the steady window starts; it ends with the sending. With
    /// `--server-pid`, the server's CPU over the window divided by the writes sent in it is reported as
    /// the server CPU per write (with its deliveries).
    #[arg(long, value_name = "SECS", default_value_t = 4.0)]
    pub steady_after: f64,
}

const MARKER: &str = "cs1:";

/// `cs1:<conn>:<seq>:<sched_us>` → (conn, seq, sched_us), from the first marker in `text`.
pub fn parse_marker(text: &str) -> Option<(u32, u32, u64)> {
    let rest = &text[text.find(MARKER)? + MARKER.len()..];
    let mut it = rest.splitn(3, ':');
    let conn = it.next()?.parse().ok()?;
    let seq = it.next()?.parse().ok()?;
    let t = it.next()?;
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    Some((conn, seq, t[..end].parse().ok()?))
}

fn kind_index(kind: &str) -> Option<usize> {
    match kind {
        "chat_draft_updated" => Some(0),
        "chat_message_added" => Some(1),
        "chat_title_updated" => Some(2),
        _ => None,
    }
}

const KIND_NAMES: [&str; 3] = ["update_draft", "chat_message_added", "update_title"];
const READ_NAMES: [&str; 2] = ["initial_sync_request", "get_chat_messages"];

fn read_index(reply: &str) -> Option<usize> {
    match reply {
        "initial_sync_response" => Some(0),
        "chat_messages_response" => Some(1),
        _ => None,
    }
}

struct Inner {
    ledger: Ledger,
    delivery: Timeline,
    ack: Timeline,
    per_kind: [Latency; 3],
    reads: [Latency; 2],
    errors: BTreeMap<String, u64>,
}

struct Handler {
    epoch: Instant,
    inner: Mutex<Inner>,
    acks: AtomicU64,
    deliveries: AtomicU64,
    other: AtomicU64,
}

impl Handler {
    fn ack(&self, inner: &mut Inner, sched_us: u64, at: Instant) {
        let sched = self.epoch + Duration::from_micros(sched_us);
        inner.ack.record(sched, at.saturating_duration_since(sched));
        self.acks.fetch_add(1, Ordering::Relaxed);
    }
}

impl FrameHandler for Handler {
    fn on_text(&self, conn: usize, text: &str, at: Instant) {
        let Some(env) = Envelope::parse(text) else {
            self.other.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut inner = self.inner.lock().expect("fanout lock");
        if let Some(rid) = env.request_id.as_deref() {
            // A reply to this connection's own update.
            let Some((c, seq, sched)) = parse_marker(rid) else {
                self.other.fetch_add(1, Ordering::Relaxed);
                return;
            };
            if env.kind == "error" || env.kind == "initial_sync_error" {
                let code = env.error_code().unwrap_or("(no code)").to_owned();
                *inner.errors.entry(code).or_default() += 1;
                inner.ledger.rejected((c, seq));
            } else if let Some(r) = read_index(&env.kind) {
                let sched = self.epoch + Duration::from_micros(sched);
                inner.reads[r].record(at.saturating_duration_since(sched));
                self.acks.fetch_add(1, Ordering::Relaxed);
            } else {
                self.ack(&mut inner, sched, at);
            }
            return;
        }
        if env.kind == "error" {
            let code = env.error_code().unwrap_or("(no code)").to_owned();
            *inner.errors.entry(format!("{code} (no request_id)")).or_default() += 1;
            return;
        }
        let (Some(k), Some((c, seq, sched))) = (kind_index(&env.kind), parse_marker(text)) else {
            self.other.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if c as usize == conn {
            // The sender's own copy of a title broadcast, sent without request_id by some servers.
            self.ack(&mut inner, sched, at);
            return;
        }
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        if inner.ledger.delivered(conn as u32, (c, seq)) == Delivery::First {
            let sched = self.epoch + Duration::from_micros(sched);
            let lat = at.saturating_duration_since(sched);
            inner.delivery.record(sched, lat);
            inner.per_kind[k].record(lat);
        }
    }
}

/// The frame of one request; `chat_id` is ignored by `Sync`.
fn update_frame(kind: UpdateKind, marker: &str, chat_id: &str, message_id: &str) -> String {
    let v = match kind {
        UpdateKind::Draft => json!({"type": "update_draft", "request_id": marker, "payload": {
            "chat_id": chat_id,
            "draft_json": {"type": "doc", "content": [{"type": "paragraph", "content": [
                {"type": "text", "text": format!("bench draft {marker}")}]}]}}}),
        UpdateKind::Message => json!({"type": "chat_message_added", "request_id": marker, "payload": {
            "chat_id": chat_id,
            "message": {"message_id": message_id, "content": format!("bench message {marker}"),
                        "temp_id": message_id}}}),
        UpdateKind::Title => json!({"type": "update_title", "request_id": marker, "payload": {
            "chat_id": chat_id, "new_title": format!("bench {marker}")}}),
        UpdateKind::Sync => json!({"type": "initial_sync_request", "request_id": marker, "payload": {
            "chat_versions": {}}}),
        UpdateKind::History => json!({"type": "get_chat_messages", "request_id": marker, "payload": {
            "chat_id": chat_id, "after_seq": 0, "limit": 50}}),
    };
    v.to_string()
}

/// One user's sender: its open connections (index, sink, closing flag), and its schedule.
struct UserSender {
    index: usize,
    safe_id: String,
    conns: Vec<(u32, Sink, Arc<AtomicBool>)>,
}

/// What `soak` adds to the fan-out engine.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// Scenario name in the report.
    pub name: Option<String>,
    /// Reconnects per second over all users: before a send, with this probability per send, the
    /// sending device is closed by the bench (once nothing is in flight to it) and reopened.
    pub reconnect_per_sec: f64,
    /// Seconds after the first send at which the steady window starts (server sampled then, and at
    /// the end of sending).
    pub warmup_secs: f64,
}

/// Reconnect counts of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Reconnects {
    /// Closed by the bench and reopened.
    pub done: u64,
    /// Skipped: deliveries to the device were still in flight after 5 s.
    pub skipped: u64,
    /// Reopen failures by label (the device is then gone for the rest of the run).
    pub failed: BTreeMap<String, u64>,
    /// Connect + auth latency of the reopened connections.
    pub latency: LatencySummary,
}

/// The figures of a run that `soak` judges.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Connections asked for, and opened at the start.
    pub connections: usize,
    /// See `connections`.
    pub opened: usize,
    /// Failures to open at the start, by label.
    pub open_failures: BTreeMap<String, u64>,
    /// Requests sent (writes and reads).
    pub sent: u64,
    /// The ledger of writes.
    pub completeness: crate::ledger::Completeness,
    /// Error replies by code (and failed sends).
    pub errors: BTreeMap<String, u64>,
    /// Connections that ended without the bench asking (label → count).
    pub unexpected_closes: BTreeMap<String, u64>,
    /// Connections the bench closed itself (reconnects).
    pub bench_closed: u64,
    /// Reconnects.
    pub reconnects: Reconnects,
    /// Fan-out latency (scheduled send → receipt at another device).
    pub delivery: LatencySummary,
    /// Sender reply latency of writes.
    pub ack: LatencySummary,
    /// Round trip of `initial_sync_request` and `get_chat_messages`.
    pub reads: [LatencySummary; 2],
    /// Server samples at the start and end of the steady window.
    pub window: Option<(ProcSample, ProcSample)>,
    /// Seconds of sending.
    pub duration: f64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, args: FanoutArgs) -> Result<Report> {
    Ok(run_with(ctx, args, Extras::default()).await?.0)
}

/// Closes device `conn` on purpose once nothing is in flight to it, and opens it again with the same
/// session. Returns the new sink, or `None` if the reopen failed.
#[allow(clippy::too_many_arguments)]
async fn reconnect(
    connector: &Connector,
    cred: &Credential,
    conn: u32,
    sink: Sink,
    closing: Arc<AtomicBool>,
    handler: &Arc<Handler>,
    cancel: &CancellationToken,
    log: &Arc<crate::connect::CloseLog>,
    stats: &Mutex<(Reconnects, Latency)>,
) -> Option<(Sink, Arc<AtomicBool>)> {
    let give_up = Instant::now() + Duration::from_secs(5);
    while handler.inner.lock().expect("fanout lock").ledger.pending_for(conn) > 0 {
        if Instant::now() >= give_up {
            stats.lock().expect("reconnect stats").0.skipped += 1;
            return Some((sink, closing));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    close_on_purpose(sink, &closing, Duration::from_secs(5)).await;
    match connector.connect(cred, conn as usize).await {
        Ok((ws, _greeting, latency)) => {
            let mut st = stats.lock().expect("reconnect stats");
            st.0.done += 1;
            st.1.record(latency);
            Some(attach(conn as usize, ws, handler.clone(), cancel.clone(), log.clone()))
        }
        Err(crate::connect::ConnectFailure(label)) => {
            *stats.lock().expect("reconnect stats").0.failed.entry(label).or_default() += 1;
            None
        }
    }
}

/// Runs the fan-out engine with the `soak` extras; returns the report and the figures to judge.
pub async fn run_with(ctx: &Ctx, args: FanoutArgs, extras: Extras) -> Result<(Report, Outcome)> {
    let mut notes = Vec::new();
    if args.devices < 2 {
        bail!("--devices must be at least 2: fan-out goes to the OTHER connections of a user");
    }
    let groups: Vec<_> =
        group_by_user(&ctx.creds).into_iter().filter(|g| g.devices.len() >= 2).take(args.users).collect();
    if groups.is_empty() {
        bail!("the tokens file has no user with at least two sessions");
    }
    if groups.len() < args.users {
        notes.push(format!("only {} users with 2+ sessions in the tokens file (asked {})", groups.len(), args.users));
    }
    let mut creds: Vec<Credential> = Vec::new();
    let mut user_conns: Vec<Vec<u32>> = Vec::new();
    for g in &groups {
        let ids = g.devices.iter().take(args.devices).map(|c| {
            creds.push(c.clone());
            (creds.len() - 1) as u32
        });
        user_conns.push(ids.collect());
    }
    if groups.iter().any(|g| g.devices.len() < args.devices) {
        notes.push(format!("some users have fewer than {} sessions; they use what they have", args.devices));
    }
    if creds.len() > ctx.fd_capacity() {
        bail!("{} connections exceed the open-files limit {}", creds.len(), ctx.nofile);
    }
    let users = groups.len();
    let name = extras.name.clone().unwrap_or_else(|| "fanout".to_owned());
    let epoch = Instant::now();
    let handler = Arc::new(Handler {
        epoch,
        inner: Mutex::new(Inner {
            ledger: Ledger::default(),
            delivery: Timeline::new(epoch),
            ack: Timeline::new(epoch),
            per_kind: Default::default(),
            reads: Default::default(),
            errors: BTreeMap::new(),
        }),
        acks: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        other: AtomicU64::new(0),
    });
    let cancel = CancellationToken::new();
    let pb = ctx.progress(creds.len() as u64, "connect");
    let opened =
        open_many(ctx.connector.clone(), &creds, ctx.common.ramp_per_sec, handler.clone(), cancel.clone(), &pb).await;
    pb.finish_and_clear();
    let mut connect_lat = Latency::default();
    let mut rate_limit: Option<u32> = None;
    let mut conns: Vec<Option<(Sink, Arc<AtomicBool>)>> = Vec::with_capacity(creds.len());
    for c in opened.conns {
        conns.push(c.map(|c| {
            connect_lat.record(c.latency);
            if let Some(r) = c.greeting.rate_per_sec {
                rate_limit = Some(rate_limit.map_or(r, |m| m.min(r)));
            }
            (c.sink, c.closing)
        }));
    }
    let open_count = conns.iter().filter(|c| c.is_some()).count();
    if open_count == 0 {
        bail!("no connection opened: {:?}", opened.failures);
    }

    // Senders: one task per user, owning the sinks of the user's open connections.
    let mut senders = Vec::new();
    for (u, ids) in user_conns.iter().enumerate() {
        let conns_u: Vec<_> =
            ids.iter().filter_map(|&i| conns[i as usize].take().map(|(s, closing)| (i, s, closing))).collect();
        senders.push(UserSender { index: u, safe_id: id_safe(&groups[u].user_id, 40), conns: conns_u });
    }
    let max_per_conn = senders
        .iter()
        .filter(|s| !s.conns.is_empty())
        .map(|s| args.rate_per_user / s.conns.len() as f64)
        .fold(0.0, f64::max);
    let over_limit = rate_limit.is_some_and(|r| max_per_conn > r as f64);
    if over_limit {
        notes.push(format!(
            "per-connection send rate {max_per_conn:.2}/s EXCEEDS the announced limit {}/s: expect rate_limited errors",
            rate_limit.unwrap_or(0)
        ));
    }

    let t0 = Instant::now() + Duration::from_millis(500);
    let t0_us = (t0 - epoch).as_micros() as u64;
    {
        let mut inner = handler.inner.lock().expect("fanout lock");
        inner.delivery = Timeline::new(t0);
        inner.ack = Timeline::new(t0);
    }
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let sent = Arc::new(AtomicU64::new(0));
    let send_errors = Arc::new(AtomicU64::new(0));
    let total_sends: usize = (0..users).map(|u| user_offsets(u, users, args.rate_per_user, args.duration).len()).sum();
    let total_rate = users as f64 * args.rate_per_user;
    let reconnect_p = if total_rate > 0.0 { (extras.reconnect_per_sec / total_rate).min(1.0) } else { 0.0 };
    let reconnect_stats = Arc::new(Mutex::new((Reconnects::default(), Latency::default())));
    let creds = Arc::new(creds);
    let mut tasks = Vec::new();
    for mut s in senders {
        let offsets = user_offsets(s.index, users, args.rate_per_user, args.duration);
        let (handler, sent, send_errors, mix, chats) =
            (handler.clone(), sent.clone(), send_errors.clone(), args.mix, args.chats_per_user.max(1));
        let (connector, creds, cancel, log, stats) =
            (ctx.connector.clone(), creds.clone(), cancel.clone(), opened.log.clone(), reconnect_stats.clone());
        tasks.push(tokio::spawn(async move {
            // The chat of this user's last write: the target of `get_chat_messages` (it exists by then).
            let mut last_write_chat: Option<String> = None;
            let mut prev_us = None;
            for (k, off) in offsets.into_iter().enumerate() {
                if s.conns.is_empty() {
                    break;
                }
                let sched_us = t0_us + off;
                let d = k % s.conns.len();
                if k > 0 && chance(s.index as u64, k as u64, reconnect_p) {
                    // Halfway between the previous send and this one: nothing of this user is in flight.
                    let mid = (prev_us.unwrap_or(sched_us) + sched_us) / 2;
                    tokio::time::sleep_until((handler.epoch + Duration::from_micros(mid)).into()).await;
                    let (conn, sink, closing) = s.conns.remove(d);
                    let cred = &creds[conn as usize];
                    match reconnect(&connector, cred, conn, sink, closing, &handler, &cancel, &log, &stats).await {
                        Some((sink, closing)) => s.conns.insert(d, (conn, sink, closing)),
                        None => {
                            if s.conns.is_empty() {
                                break;
                            }
                        }
                    }
                }
                prev_us = Some(sched_us);
                tokio::time::sleep_until((handler.epoch + Duration::from_micros(sched_us)).into()).await;
                let d = d % s.conns.len();
                let conn = s.conns[d].0;
                let key: UpdateKey = (conn, k as u32);
                let marker = format!("{MARKER}{conn}:{k}:{sched_us}");
                let mut kind = mix.pick(s.index as u64, k as u64);
                if kind == UpdateKind::History && last_write_chat.is_none() {
                    kind = UpdateKind::Draft;
                }
                let chat_id = match kind {
                    UpdateKind::History => last_write_chat.clone().unwrap_or_default(),
                    _ => format!("{}-fan{}", s.safe_id, k % chats),
                };
                let message_id = format!("b{run_id}-{conn}-{k}");
                let frame = update_frame(kind, &marker, &chat_id, &message_id);
                if kind.is_write() {
                    let receivers = s.conns.iter().map(|c| c.0).filter(|&i| i != conn).collect();
                    handler.inner.lock().expect("fanout lock").ledger.sent(key, receivers);
                    last_write_chat = Some(chat_id);
                }
                sent.fetch_add(1, Ordering::Relaxed);
                if s.conns[d].1.send(Message::text(frame)).await.is_err() {
                    send_errors.fetch_add(1, Ordering::Relaxed);
                    handler.inner.lock().expect("fanout lock").ledger.rejected(key);
                }
            }
            s.conns
        }));
    }

    // Progress while sending (with the server sampled at the edges of the steady window), then drain.
    let pb = ctx.progress(total_sends as u64, &name);
    let send_end = t0 + Duration::from_secs_f64(args.duration);
    let drain_end = send_end + Duration::from_secs_f64(args.drain);
    // The soak names its own warm-up; a plain fanout run uses `--steady-after`.
    let warmup = if extras.name.is_some() { extras.warmup_secs } else { args.steady_after };
    let window_from = t0 + Duration::from_secs_f64(warmup.clamp(0.0, args.duration));
    let (mut w_start, mut w_end) = (None, None);
    let mut last_complete_check = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        pb.set_position(sent.load(Ordering::Relaxed));
        pb.set_message(format!("recv {} open {}", handler.deliveries.load(Ordering::Relaxed), opened.log.open()));
        let now = Instant::now();
        if w_start.is_none() && now >= window_from {
            w_start = Some(ctx.sample_server());
        }
        if w_end.is_none() && now >= send_end {
            w_end = Some(ctx.sample_server());
        }
        if now >= drain_end {
            break;
        }
        if now >= send_end
            && tasks.iter().all(|t| t.is_finished())
            && now - last_complete_check >= Duration::from_millis(500)
        {
            last_complete_check = now;
            let inner = handler.inner.lock().expect("fanout lock");
            let acks_done = handler.acks.load(Ordering::Relaxed) + inner.errors.values().sum::<u64>()
                >= sent.load(Ordering::Relaxed);
            if acks_done && inner.ledger.complete() {
                break;
            }
        }
    }
    pb.finish_and_clear();
    let closes = opened.log.closes();
    let bench_closed = opened.log.bench_closed();
    cancel.cancel();
    let mut sinks = Vec::new();
    for t in tasks {
        if let Ok(c) = t.await {
            sinks.extend(c.into_iter().map(|(_, s, _)| s));
        }
    }
    close_all(sinks, Duration::from_secs(10)).await;

    let inner = handler.inner.lock().expect("fanout lock");
    let completeness = inner.ledger.summary();
    let sent_n = sent.load(Ordering::Relaxed);
    let window = args.duration;
    let delivery = inner.delivery.total().summary();
    let ack = inner.ack.total().summary();
    let per_kind: Vec<_> = inner.per_kind.iter().map(Latency::summary).collect();
    let reads: [LatencySummary; 2] = [inner.reads[0].summary(), inner.reads[1].summary()];
    let mut errors = inner.errors.clone();
    let send_err = send_errors.load(Ordering::Relaxed);
    if send_err > 0 {
        add_counts(&mut errors, &BTreeMap::from([("(send failed)".to_owned(), send_err)]));
    }
    let mut reconnects = {
        let st = reconnect_stats.lock().expect("reconnect stats");
        let mut r = st.0.clone();
        r.latency = st.1.summary();
        r
    };
    if reconnects.failed.values().sum::<u64>() > 0 {
        notes.push(format!("reopening a device failed: {:?}", reconnects.failed));
    }
    if completeness.rejected > 0 {
        notes.push(format!(
            "{} of {} updates were rejected by the server (see errors by code); no deliveries were expected for them",
            completeness.rejected, completeness.sent
        ));
    }
    if completeness.missing > 0 || completeness.duplicates > 0 {
        notes.push(format!(
            "INCOMPLETE fan-out: {} missing, {} duplicates of {} expected deliveries",
            completeness.missing, completeness.duplicates, completeness.expected
        ));
    }
    let reads_sent = reads[0].count + reads[1].count;

    let mut summary = Table::new(&name, &[]);
    summary
        .kv("users x devices", format!("{users} x {}", args.devices))
        .kv("connections opened / asked", format!("{open_count} / {}", creds.len()))
        .kv(
            "mix",
            format!(
                "draft={} message={} title={} sync={} history={}",
                args.mix.draft, args.mix.message, args.mix.title, args.mix.sync, args.mix.history
            ),
        )
        .kv("requests sent", sent_n)
        .kv("requests sent /s", rate(per(sent_n as f64, window)))
        .kv("updates (writes) sent", completeness.sent)
        .kv("reads answered", reads_sent)
        .kv("replies (acks) received", handler.acks.load(Ordering::Relaxed))
        .kv("deliveries expected", completeness.expected)
        .kv("deliveries received", completeness.received)
        .kv("deliveries received /s", rate(per(completeness.received as f64, window)))
        .kv("duplicates", completeness.duplicates)
        .kv("missing", completeness.missing)
        .kv("unexpected", completeness.unexpected)
        .kv("rejected updates (error reply)", completeness.rejected)
        .kv(
            "per-connection send rate (max) / limit",
            format!("{max_per_conn:.2}/s / {}", rate_limit.map_or("not announced".to_owned(), |r| format!("{r}/s"))),
        );
    if extras.reconnect_per_sec > 0.0 {
        summary
            .kv("reconnects done / skipped", format!("{} / {}", reconnects.done, reconnects.skipped))
            .kv("reconnects failed", reconnects.failed.values().sum::<u64>())
            .kv("closed by the bench (reconnects)", bench_closed);
    }
    // Server CPU per write over the steady window (the writes are sent at an even, fixed rate).
    let steady = match (w_start.flatten(), w_end.flatten()) {
        (Some(a), Some(b)) if b.t > a.t && args.duration > 0.0 => {
            let writes = completeness.sent as f64 * (args.duration - warmup.clamp(0.0, args.duration)) / args.duration;
            let cpu = b.cpu_secs - a.cpu_secs;
            let per_write = |n: u64, m: u64| if writes > 0.0 { n.saturating_sub(m) as f64 / writes } else { 0.0 };
            Some(json!({
                "from_secs_after_first_send": warmup.clamp(0.0, args.duration), "secs": b.t - a.t, "server_cpu_secs": cpu,
                "writes": writes.round(), "server_cpu_us_per_write": if writes > 0.0 { cpu / writes * 1e6 } else { 0.0 },
                "server_voluntary_switches_per_write": per_write(b.voluntary_switches, a.voluntary_switches),
                "server_involuntary_switches_per_write": per_write(b.involuntary_switches, a.involuntary_switches),
            }))
        }
        _ => None,
    };
    if let Some(w) = steady.as_ref().filter(|_| extras.name.is_none()) {
        let num = |field: &str| w[field].as_f64().unwrap_or(0.0);
        summary.kv(
            "server CPU per write, with its deliveries",
            format!(
                "{:.1} µs ({:.2} s over the steady window: {:.0} s from {warmup} s after the first send)",
                num("server_cpu_us_per_write"),
                num("server_cpu_secs"),
                num("secs"),
            ),
        );
        summary.kv(
            "server context switches per write, voluntary / involuntary",
            format!(
                "{:.2} / {:.2} (every thread of the server, same window)",
                num("server_voluntary_switches_per_write"),
                num("server_involuntary_switches_per_write"),
            ),
        );
    }
    let mut lat_rows = vec![("fan-out (all)", &delivery)];
    for (i, s) in per_kind.iter().enumerate() {
        if s.count > 0 {
            lat_rows.push((KIND_NAMES[i], s));
        }
    }
    lat_rows.push(("sender reply (writes)", &ack));
    for (i, s) in reads.iter().enumerate() {
        if s.count > 0 {
            lat_rows.push((READ_NAMES[i], s));
        }
    }
    let connect = connect_lat.summary();
    lat_rows.push(("connect + auth", &connect));
    if reconnects.done > 0 {
        lat_rows.push(("reconnect: connect + auth", &reconnects.latency));
    }
    let tables = vec![
        summary,
        latency_table("latency from scheduled send time", &lat_rows),
        counts_table("errors by code", &errors),
        counts_table("failures to open", &opened.failures),
        counts_table("closed by the server during the run", &closes),
    ];
    let json = json!({
        "params": {
            "users": users, "devices": args.devices, "rate_per_user": args.rate_per_user,
            "duration_secs": args.duration, "mix": args.mix, "chats_per_user": args.chats_per_user,
            "drain_secs": args.drain, "ramp_per_sec": ctx.common.ramp_per_sec,
            "reconnect_per_sec": extras.reconnect_per_sec, "warmup_secs": extras.warmup_secs,
        },
        "results": {
            "connections": creds.len(), "opened": open_count, "failures": opened.failures,
            "sent": sent_n, "sent_per_sec": per(sent_n as f64, window),
            "acks": handler.acks.load(Ordering::Relaxed),
            "deliveries_per_sec": per(completeness.received as f64, window),
            "completeness": completeness,
            "latency": delivery,
            "latency_by_kind": {KIND_NAMES[0]: per_kind[0], KIND_NAMES[1]: per_kind[1], KIND_NAMES[2]: per_kind[2]},
            "sender_reply_latency": ack,
            "read_latency": {READ_NAMES[0]: reads[0], READ_NAMES[1]: reads[1]},
            "connect_latency": connect,
            "latency_per_second": inner.delivery.series(),
            "errors": errors, "closes": closes, "bench_closed": bench_closed,
            "reconnects": reconnects,
            "other_frames": handler.other.load(Ordering::Relaxed),
            "rate_limit_per_conn": rate_limit, "max_send_rate_per_conn": max_per_conn,
            "exceeded_rate_limit": over_limit,
            "steady_window": steady,
        },
    });
    let panels = vec![
        latency_panel("fan-out latency per second", "seconds since first send", &inner.delivery.series()),
        latency_panel("sender reply latency per second", "seconds since first send", &inner.ack.series()),
    ];
    let outcome = Outcome {
        connections: creds.len(),
        opened: open_count,
        open_failures: opened.failures.clone(),
        sent: sent_n,
        completeness,
        errors,
        unexpected_closes: closes,
        bench_closed,
        reconnects: std::mem::take(&mut reconnects),
        delivery,
        ack,
        reads,
        window: match (w_start.flatten(), w_end.flatten()) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => None,
        },
        duration: args.duration,
    };
    Ok((Report { scenario: name, json, tables, notes, panels }, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trip_from_frames() {
        let f = update_frame(UpdateKind::Title, "cs1:12:7:1500000", "u0-fan1", "m");
        assert_eq!(parse_marker(&f), Some((12, 7, 1_500_000)));
        let broadcast = r#"{"type":"chat_draft_updated","payload":{"chat_id":"c","data":{"draft_json":{"type":"doc","content":[{"type":"paragraph","content":[{"type":"text","text":"bench draft cs1:3:4:99"}]}]}}}}"#;
        assert_eq!(parse_marker(broadcast), Some((3, 4, 99)));
        assert_eq!(parse_marker("no marker"), None);
        assert_eq!(parse_marker("cs1:1:x:3"), None);
    }

    #[test]
    fn frames_are_valid_requests() {
        for kind in [UpdateKind::Draft, UpdateKind::Message, UpdateKind::Title] {
            let v: serde_json::Value = serde_json::from_str(&update_frame(kind, "cs1:1:2:3", "c", "m1")).unwrap();
            assert_eq!(v["request_id"], "cs1:1:2:3");
            assert_eq!(v["payload"]["chat_id"], "c");
        }
    }
}
