//! Creating a master key (`MasterKey::load_or_create` on an empty data directory), and loading it from its
//! file again, leaves no copy of the key's base64 text in freed heap memory: every buffer that held it is
//! zeroized before it is freed.
//!
//! This file's global allocator wraps `System` and, while armed, copies the bytes of every block freed
//! into a buffer reserved up front (no allocation inside the allocator). It leaves `realloc` to
//! `GlobalAlloc`'s default (allocate, copy, free the old block), so the block a reallocation leaves behind
//! is always seen, as if the system allocator had moved it rather than grown it in place. After the key
//! is created, the test reads its text from the key file and looks for it in what was freed.
//!
//! One test in this file: the allocator is the whole test binary's, and a second test running beside it
//! would free blocks into the recording.

use chatsync::crypto::MasterKey;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Room for the freed blocks of one key creation (a few hundred small blocks) many times over.
const CAPACITY: usize = 16 << 20;

struct Recorder {
    armed: AtomicBool,
    /// Bytes reserved in `freed` so far (may exceed `CAPACITY`: then the recording overflowed).
    used: AtomicUsize,
    freed: UnsafeCell<[u8; CAPACITY]>,
}

// SAFETY: each dealloc copies into its own range of `freed`, reserved by `used.fetch_add`; the test reads
// `freed` only while disarmed.
unsafe impl Sync for Recorder {}

static RECORDER: Recorder =
    Recorder { armed: AtomicBool::new(false), used: AtomicUsize::new(0), freed: UnsafeCell::new([0; CAPACITY]) };

struct RecordingAllocator;

unsafe impl GlobalAlloc for RecordingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if RECORDER.armed.load(Ordering::SeqCst) {
            let len = layout.size();
            let at = RECORDER.used.fetch_add(len, Ordering::SeqCst);
            if at + len <= CAPACITY {
                // SAFETY: `ptr` holds `len` readable bytes until freed below; `at..at + len` is this call's.
                unsafe { std::ptr::copy_nonoverlapping(ptr, RECORDER.freed.get().cast::<u8>().add(at), len) };
            }
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: RecordingAllocator = RecordingAllocator;

/// Runs `f` with the recorder armed; returns its result and the bytes of the blocks freed meanwhile (valid
/// until the next call).
fn freed_during<T>(f: impl FnOnce() -> T) -> (T, &'static [u8]) {
    RECORDER.used.store(0, Ordering::SeqCst);
    RECORDER.armed.store(true, Ordering::SeqCst);
    let out = f();
    RECORDER.armed.store(false, Ordering::SeqCst);
    let used = RECORDER.used.load(Ordering::SeqCst);
    assert!(used <= CAPACITY, "recorded {used} freed bytes, more than the {CAPACITY} reserved");
    // SAFETY: disarmed: nothing writes to `freed` until the next call.
    (out, unsafe { std::slice::from_raw_parts(RECORDER.freed.get().cast::<u8>(), used) })
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn creating_a_master_key_leaves_no_freed_copy_of_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The text is known only once the key exists: record everything freed while creating it.
    let ((key, created), freed) = freed_during(|| MasterKey::load_or_create(&data, None).unwrap());
    assert!(created);
    let text = std::fs::read_to_string(data.join("master.key")).unwrap();
    let text = text.trim_end();
    assert_eq!(MasterKey::from_base64(text).unwrap().id(), key.id());
    assert!(!contains(freed, text), "a buffer holding the new key's text was freed without being zeroized");

    // Nor does reading it back from the file.
    let ((again, created), freed) = freed_during(|| MasterKey::load_or_create(&data, None).unwrap());
    assert_eq!((again.id(), created), (key.id(), false));
    assert!(
        !contains(freed, text),
        "a buffer holding the key's text read from its file was freed without being zeroized"
    );

    // The recording does see a copy of the text freed as it is.
    let ((), freed) = freed_during(|| drop(std::hint::black_box(text.to_owned())));
    assert!(contains(freed, text), "the recording missed a freed copy of the text");
}
