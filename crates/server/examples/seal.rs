//! Times sealing and opening with chatsync's own keys: a `DataKey` (AES-256-GCM, what is stored) and a
//! `SharedKey` (AES-256-GCM-SIV, what the cluster's bus and the Redis stream registry carry).
//! `cargo run --release -p chatsync --example seal` (BENCHMARKS.md, fourteenth session).

use chatsync::crypto::{Aad, DataKey, MasterKey};
use std::time::Instant;

fn time(n: u32, mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..n {
        f();
    }
    started.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let data = DataKey::generate();
    let shared = MasterKey::generate().derive("bus");
    let ad = Aad::bus("p:u:0123456789abcdef");
    for size in [200, 2_000, 20_000] {
        let plain = vec![7u8; size];
        for round in 1..=3 {
            let gcm = time(100_000, || {
                let sealed = data.encrypt(&plain, &ad);
                std::hint::black_box(data.decrypt(&sealed, &ad).unwrap());
            });
            let siv = time(100_000, || {
                let sealed = shared.encrypt(&plain, &ad);
                std::hint::black_box(shared.decrypt(&sealed, &ad).unwrap());
            });
            println!("{size:>6} bytes, round {round}: seal + open  DataKey (AES-256-GCM) {gcm:>7.0} ns   SharedKey (AES-256-GCM-SIV) {siv:>7.0} ns");
        }
    }
}
