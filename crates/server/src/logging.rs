//! Log setup: `tracing` to stderr, text or JSON. Callers never log tokens, titles, drafts, message
//! bodies or keys: spans carry only ids (connection, user) and message types.

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init(format: LogFormat, level: &str) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // The WebSocket and HTTP layers trace whole frames (payloads in hex) at debug/trace level: they are
    // capped whatever the configured level, so that no message content can reach a log line.
    for quiet in ["tungstenite=info", "tokio_tungstenite=info", "hyper=info", "hyper_util=info", "axum=info"] {
        filter = filter.add_directive(quiet.parse().expect("a valid directive"));
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A failed write is dropped, not reported: tracing-subscriber reports it with `eprintln!`, which panics
    // when stderr is what failed (a pipe whose reader went away, `serve 2>&1 | logger` with the logger
    // gone): every task that logged died with it, connections were refused and SIGTERM no longer stopped
    // the server. Without a reader the lines are lost either way.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The message a panic carried (`panic!("…")` with or without arguments), for its log line.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
}
