//! A client that sends WebSocket Pings and never reads does not make the server hold its upload in memory:
//! the Pongs the server owes it wait in a bounded write buffer (twice `max_reply_bytes`), not one more per
//! Ping for as long as the connection lasts.
//!
//! This file's global allocator counts the bytes live on the heap and their high-water mark. One test in
//! this file: the allocator is the whole test binary's, and a second test running beside it would move
//! the mark.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

mod common;
use common::TestServer;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct CountingAllocator;

impl CountingAllocator {
    fn grew(by: usize) {
        let live = LIVE.fetch_add(by, Ordering::SeqCst) + by;
        PEAK.fetch_max(live, Ordering::SeqCst);
    }
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Self::grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Counted as a move (both blocks live for a moment), as a reallocation that cannot grow in
            // place is.
            Self::grew(new_size);
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Pings written by the client: 48 MiB of frames, far past what the kernel's socket buffers take (a few
/// MiB).
const PING_BYTES: usize = 48 << 20;

/// A client Ping frame with a 125-byte payload (the most a control frame carries), masked with a zero key.
fn ping_frame() -> Vec<u8> {
    let mut frame = vec![0x89, 0x80 | 125, 0, 0, 0, 0];
    frame.extend(std::iter::repeat_n(b'p', 125));
    frame
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(120), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_from_a_client_that_never_reads_are_not_buffered_without_bound() {
    let server = TestServer::start().await;
    let token = server.user_token("pinger").await;
    let addr: std::net::SocketAddr = server.host().parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small receive window: the server's writes block early.
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    let upgrade = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\nX-Device-Id: pinger-device\r\n\r\n"
    );
    tcp.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "the upgrade was answered");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    until("the connection's registration", || server.ctx.hub.connection_count() == 1).await;
    // From here on the client reads nothing.

    let frame = ping_frame();
    let batch: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * 8_000).collect();
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    for _ in 0..PING_BYTES / batch.len() {
        tcp.write_all(&batch).await.unwrap();
    }
    // A close (1000) after the Pings: the server has read every Ping once the connection is unregistered
    // (its reader ends on the close, before it lets the connection go).
    tcp.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]).await.unwrap();
    until("the connection's end", || server.ctx.hub.connection_count() == 0).await;
    let grew = PEAK.load(Ordering::SeqCst).saturating_sub(before);
    // Twice `max_reply_bytes` (2 MiB) of Pongs at most (3 MiB as the buffer's last growth moves it), and the
    // process's other allocations meanwhile (about 3 MiB measured; without the bound, ~100 MB).
    assert!(grew < 16 << 20, "the heap grew by {grew} bytes while the client sent {PING_BYTES} bytes of Pings");
}
