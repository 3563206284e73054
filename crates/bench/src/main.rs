//! `chatsync-bench`: a load generator for the chatsync WebSocket protocol (PROTOCOL.md), agnostic of
//! the server it drives (chatsync itself or a peer implementation). Loopback targets only.
//!
//! Scenarios (subcommands): `idle` (how many authenticated idle connections, and what each costs the
//! server), `fanout` (per-user broadcast latency and completeness), `saturate` (highest sustained
//! `update_draft` rate with p99 under a target), `sync` (`initial_sync_request` round trip for a
//! user with many chats) and `soak` (10,000 connections held under mixed load; RSS drift, closes and
//! deliveries judged, non-zero exit on failure) and `stream` (SERVER_API streams through the HTTP API,
//! chunks to every device of each user). Every scenario is bounded in connections and time
//! and stops by itself.

mod connect;
mod ledger;
mod metrics;
mod report;
mod scenarios;
mod schedule;
mod tokens;

use anyhow::Result;
use clap::{Parser, Subcommand};
use scenarios::Common;

/// mimalloc, as in the server: glibc malloc took ~15% of the bench's CPU in the `stream` scenario, CPU the
/// server it shares the machine with then lacks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for the chatsync protocol (loopback targets only).
///
/// Tokens come from a JSON-lines file written by `chatsync sessions issue-bulk` or a peer's
/// `issue-bulk`; each connection sends `Authorization: Bearer <token>` and `X-Device-Id`.
/// Options before or after the scenario name apply to every scenario.
#[derive(Debug, Parser)]
#[command(name = "chatsync-bench", version, max_term_width = 110)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Open many connections, wait for each `connected`, hold them idle, and report how many held,
    /// connect+auth latency, and (with --server-pid) the server's RSS and CPU per connection.
    Idle(scenarios::idle::IdleArgs),
    /// U users x D devices; each user sends one update per second (open loop) and every other
    /// connection of the user must receive the broadcast exactly once: fan-out latency and completeness.
    Fanout(scenarios::fanout::FanoutArgs),
    /// Step up an open-loop `update_draft` rate until p99 (request to `draft_update_confirmed`) exceeds
    /// the target or the server falls behind; report the highest sustained rate.
    Saturate(scenarios::saturate::SaturateArgs),
    /// Populate one user with C chats, then time `initial_sync_request` (empty `chat_versions`) round trips.
    Sync(scenarios::sync::SyncArgs),
    /// Hold U x D connections for --duration under a mixed open-loop load (writes, reads, reconnects)
    /// and judge it: RSS drift over the steady window at most --max-drift-pct, no close the bench did
    /// not ask for, every delivery exactly once, no error reply. Exits non-zero when it fails.
    Soak(scenarios::soak::SoakArgs),
    /// S streams (one per user, started through the server API with --api-key), each sending
    /// --chunks-per-sec chunks for --duration to the user's D connected devices: latency from the API
    /// call to receipt on each device, in-order exactly-once delivery, server CPU per delivery.
    Stream(scenarios::stream::StreamArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let nofile = scenarios::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let ctx = scenarios::Ctx::new(cli.common, nofile)?;
        let max_runtime = ctx.max_runtime();
        let run = async {
            match cli.scenario {
                Scenario::Idle(a) => scenarios::idle::run(&ctx, a).await.map(|r| (r, true)),
                Scenario::Fanout(a) => scenarios::fanout::run(&ctx, a).await.map(|r| (r, true)),
                Scenario::Saturate(a) => scenarios::saturate::run(&ctx, a).await.map(|r| (r, true)),
                Scenario::Sync(a) => scenarios::sync::run(&ctx, a).await.map(|r| (r, true)),
                Scenario::Soak(a) => scenarios::soak::run(&ctx, a).await,
                Scenario::Stream(a) => scenarios::stream::run(&ctx, a).await.map(|r| (r, true)),
            }
        };
        let (report, passed) = tokio::select! {
            r = tokio::time::timeout(max_runtime, run) => match r {
                Ok(r) => r?,
                Err(_) => anyhow::bail!("stopped: the run exceeded --max-runtime ({} s)", max_runtime.as_secs()),
            },
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        };
        ctx.finish(report)?;
        if !passed {
            anyhow::bail!("the run FAILED its checks (see the verdict above)");
        }
        Ok(())
    })
}
