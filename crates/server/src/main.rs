//! The `chatsync` binary: parses the command line and runs it (see `cli.rs`).

use clap::Parser;

/// mimalloc: faster than glibc malloc for the many small, short-lived allocations of message handling.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = chatsync::cli::Cli::parse();
    match runtime.block_on(chatsync::cli::main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Turns transparent huge pages off for this process, before the runtime's threads allocate. mimalloc asks
/// for huge pages on its arenas where the kernel allows it (`madvise` mode), and memory then becomes resident
/// 2 MiB at a time: an idle server held ~10 MiB more before its first connection, and ~2 KiB more per idle
/// connection at 5,000 (BENCHMARKS.md, idle). A sync server's heap is small and touched sparsely, so the TLB
/// gains are not worth it (the same advice Redis gives). Best effort: an older kernel just keeps the default.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
