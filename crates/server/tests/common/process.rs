//! The real binary as a child process: `chatsync serve` on port 0, its WebSocket URL read from its log.

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStderr, Command, Stdio};

/// `chatsync` with the environment a test must not inherit removed.
pub fn chatsync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatsync"));
    cmd.env_remove("RUST_LOG").env_remove("CHATSYNC_CONFIG");
    cmd
}

/// Spawns `cmd` (a `serve` on `127.0.0.1:0`) with stderr piped, and reads stderr until the server logs
/// the URL it listens on. Returns the child, the URL and the rest of stderr (the caller drains it, or
/// hands it to [`drain`], so that the child never blocks on its logs).
pub fn spawn_serve(cmd: &mut Command) -> (Child, String, Lines<BufReader<ChildStderr>>) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if let Some(i) = line.find("ws://") {
            break line[i..].split(['"', ' ']).next().unwrap().to_owned();
        }
    };
    (child, url, lines)
}

/// Reads (and drops) the rest of a child's stderr on a thread.
pub fn drain(lines: Lines<BufReader<ChildStderr>>) {
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
}
