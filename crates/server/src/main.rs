//! The `chatsync` binary: parses the command line and runs it (see `cli.rs`).

use clap::Parser;

/// mimalloc: faster than glibc malloc for the many small, short-lived allocations of message handling.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = chatsync::cli::Cli::parse();
    match chatsync::cli::main(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
