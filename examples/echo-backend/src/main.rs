//! `echo-backend`: run the example application backend next to `chatsync serve` (see the crate's
//! README and `lib.rs`).

use clap::Parser;
use std::time::Duration;

/// The smallest application backend for chatsync: it receives webhooks and streams an "echo" reply to
/// every message a user writes, word by word, to all of the user's devices.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to receive webhooks (chatsync: --webhook-url http://ADDR/webhook).
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: std::net::SocketAddr,
    /// chatsync's base URL.
    #[arg(long, env = "CHATSYNC_API_URL", default_value = "http://127.0.0.1:8080")]
    api_url: String,
    /// An API key from `chatsync api-keys create`.
    #[arg(long, env = "CHATSYNC_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The webhook secret chatsync signs with (its --webhook-secret).
    #[arg(long, env = "CHATSYNC_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: String,
    /// The reply's sender_name.
    #[arg(long, default_value = "assistant")]
    sender_name: String,
    /// Milliseconds between two words of the reply.
    #[arg(long, default_value_t = 150)]
    word_delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A log line that cannot be written is dropped: reported with `eprintln!`, it would panic the task that
    // logged when stderr itself is a broken pipe (as in chatsync's own logging).
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .log_internal_errors(false)
        .init();
    let args = Args::parse();
    let config = chatsync_echo_backend::Config {
        api_url: args.api_url,
        api_key: args.api_key,
        webhook_secret: args.webhook_secret,
        sender_name: args.sender_name,
        word_delay: Duration::from_millis(args.word_delay_ms),
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!("echo-backend: webhooks at http://{}/webhook", listener.local_addr()?);
    axum::serve(listener, chatsync_echo_backend::router(config)).await?;
    Ok(())
}
