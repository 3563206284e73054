//! `fanout`: U users x D devices. Each user sends `--rate-per-user` updates per second on an
//! open-loop schedule computed upfront (rotating over its devices), in a mix of `update_draft`,
//! `chat_message_added` and `update_title`. Each update carries a marker `cs1:<conn>:<seq>:<µs>`
//! (sender connection, sequence, scheduled send time) in its text and `request_id`; every OTHER
//! connection of the user that receives the broadcast records the latency from the scheduled time,
//! and a ledger checks that each expected delivery arrives exactly once.

use super::{add_counts, counts_table, latency_panel, latency_table, per, rate, Ctx};
use crate::connect::{close_all, open_many, Envelope, FrameHandler, Sink};
use crate::ledger::{Delivery, Ledger, UpdateKey};
use crate::metrics::{Latency, Timeline};
use crate::report::{Report, Table};
use crate::schedule::{user_offsets, Mix, UpdateKind};
use crate::tokens::{group_by_user, id_safe, Credential};
use anyhow::{bail, Result};
use clap::Args;
use futures_util::SinkExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Relative weights of update kinds: draft (update_draft), message (chat_message_added), title (update_title).
    #[arg(long, value_name = "MIX", default_value = "draft=60,message=30,title=10")]
    pub mix: Mix,
    /// Chats per user that the updates go to (ids `<user>-fan<j>`).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub chats_per_user: usize,
    /// Seconds to wait after the last send for outstanding deliveries.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub drain: f64,
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

struct Inner {
    ledger: Ledger,
    delivery: Timeline,
    ack: Timeline,
    per_kind: [Latency; 3],
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
            if env.kind == "error" {
                let code = env.error_code().unwrap_or("(no code)").to_owned();
                *inner.errors.entry(code).or_default() += 1;
                inner.ledger.rejected((c, seq));
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
    };
    v.to_string()
}

/// One user's sender: its open connections, their sinks, and its schedule.
struct UserSender {
    index: usize,
    safe_id: String,
    conns: Vec<(u32, Sink)>,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, args: FanoutArgs) -> Result<Report> {
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
    let epoch = Instant::now();
    let handler = Arc::new(Handler {
        epoch,
        inner: Mutex::new(Inner {
            ledger: Ledger::default(),
            delivery: Timeline::new(epoch),
            ack: Timeline::new(epoch),
            per_kind: Default::default(),
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
    let mut conns: Vec<Option<Sink>> = Vec::with_capacity(creds.len());
    for c in opened.conns {
        conns.push(c.map(|c| {
            connect_lat.record(c.latency);
            if let Some(r) = c.greeting.rate_per_sec {
                rate_limit = Some(rate_limit.map_or(r, |m| m.min(r)));
            }
            c.sink
        }));
    }
    let open_count = conns.iter().filter(|c| c.is_some()).count();
    if open_count == 0 {
        bail!("no connection opened: {:?}", opened.failures);
    }

    // Senders: one task per user, owning the sinks of the user's open connections.
    let mut senders = Vec::new();
    for (u, ids) in user_conns.iter().enumerate() {
        let conns_u: Vec<(u32, Sink)> = ids.iter().filter_map(|&i| conns[i as usize].take().map(|s| (i, s))).collect();
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
    let mut tasks = Vec::new();
    for mut s in senders {
        let offsets = user_offsets(s.index, users, args.rate_per_user, args.duration);
        let (handler, sent, send_errors, mix, chats) =
            (handler.clone(), sent.clone(), send_errors.clone(), args.mix, args.chats_per_user.max(1));
        tasks.push(tokio::spawn(async move {
            if s.conns.is_empty() {
                return s.conns;
            }
            let all: Vec<u32> = s.conns.iter().map(|(i, _)| *i).collect();
            for (k, off) in offsets.into_iter().enumerate() {
                let sched_us = t0_us + off;
                tokio::time::sleep_until((handler.epoch + Duration::from_micros(sched_us)).into()).await;
                let d = k % s.conns.len();
                let conn = s.conns[d].0;
                let key: UpdateKey = (conn, k as u32);
                let marker = format!("{MARKER}{conn}:{k}:{sched_us}");
                let kind = mix.pick(s.index as u64, k as u64);
                let chat_id = format!("{}-fan{}", s.safe_id, k % chats);
                let message_id = format!("b{run_id}-{conn}-{k}");
                let frame = update_frame(kind, &marker, &chat_id, &message_id);
                let receivers = all.iter().copied().filter(|&i| i != conn).collect();
                handler.inner.lock().expect("fanout lock").ledger.sent(key, receivers);
                sent.fetch_add(1, Ordering::Relaxed);
                if s.conns[d].1.send(Message::text(frame)).await.is_err() {
                    send_errors.fetch_add(1, Ordering::Relaxed);
                    handler.inner.lock().expect("fanout lock").ledger.rejected(key);
                }
            }
            s.conns
        }));
    }

    // Progress while sending, then drain.
    let pb = ctx.progress(total_sends as u64, "fanout");
    let send_end = t0 + Duration::from_secs_f64(args.duration);
    let drain_end = send_end + Duration::from_secs_f64(args.drain);
    let mut last_complete_check = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        pb.set_position(sent.load(Ordering::Relaxed));
        pb.set_message(format!("recv {} open {}", handler.deliveries.load(Ordering::Relaxed), opened.log.open()));
        let now = Instant::now();
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
    cancel.cancel();
    let mut sinks = Vec::new();
    for t in tasks {
        if let Ok(c) = t.await {
            sinks.extend(c.into_iter().map(|(_, s)| s));
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
    let mut errors = inner.errors.clone();
    let send_err = send_errors.load(Ordering::Relaxed);
    if send_err > 0 {
        add_counts(&mut errors, &BTreeMap::from([("(send failed)".to_owned(), send_err)]));
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

    let mut summary = Table::new("fan-out", &[]);
    summary
        .kv("users x devices", format!("{users} x {}", args.devices))
        .kv("connections opened / asked", format!("{open_count} / {}", creds.len()))
        .kv("mix", format!("draft={} message={} title={}", args.mix.draft, args.mix.message, args.mix.title))
        .kv("updates sent", sent_n)
        .kv("updates sent /s", rate(per(sent_n as f64, window)))
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
    let mut lat_rows = vec![("fan-out (all)", &delivery)];
    for (i, s) in per_kind.iter().enumerate() {
        if s.count > 0 {
            lat_rows.push((KIND_NAMES[i], s));
        }
    }
    lat_rows.push(("sender reply", &ack));
    let connect = connect_lat.summary();
    lat_rows.push(("connect + auth", &connect));
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
            "connect_latency": connect,
            "latency_per_second": inner.delivery.series(),
            "errors": errors, "closes": closes,
            "other_frames": handler.other.load(Ordering::Relaxed),
            "rate_limit_per_conn": rate_limit, "max_send_rate_per_conn": max_per_conn,
            "exceeded_rate_limit": over_limit,
        },
    });
    let panels = vec![
        latency_panel("fan-out latency per second", "seconds since first send", &inner.delivery.series()),
        latency_panel("sender reply latency per second", "seconds since first send", &inner.ack.series()),
    ];
    Ok(Report { scenario: "fanout".into(), json, tables, notes, panels })
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
