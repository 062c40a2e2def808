//! Builds and drops large messages repeatedly in one arena and reports, per build, the minor
//! page faults and time of the build and of the drop, and the arena's carved vs live bytes.
//!
//! Run: `cargo run --release --example steady_state -- [MiB ...]` (default 64 256 1024).

use std::time::Instant;

use flowipc::msg::MsgOut;
use flowipc::schemas::perf_demo_capnp::body;
use flowipc::shm::{Arena, ArenaConfig};

const PART: usize = 16 * 1024;

fn faults() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| u.minor_page_faults())
        .unwrap_or(0)
}

fn build(msg: &mut MsgOut<body::Owned>, size: usize) {
    let parts = size.div_ceil(PART);
    let rsp = msg.init_root().init_get_cache_rsp();
    let mut list = rsp.init_file_parts(parts as u32);
    for i in 0..parts {
        let len = PART.min(size - i * PART);
        let mut part = list.reborrow().get(i as u32);
        part.set_data_size_to_verify(len as u64);
        part.set_data_hash_to_verify(i as u64);
        part.init_data(len as u32).fill(i as u8);
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<usize>().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![64, 256, 1024]
    } else {
        sizes
    };
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    for mib in sizes {
        let size = mib << 20;
        let arena = Arena::create(ArenaConfig::new()).expect("arena");
        println!("{mib} MiB:");
        for round in 1..=rounds {
            let (f0, t0) = (faults(), Instant::now());
            let mut msg = MsgOut::<body::Owned>::new_in(&arena);
            build(&mut msg, size);
            let (bf, bt) = (faults() - f0, t0.elapsed());
            let s = arena.stats();
            let segs = msg.segment_count();
            let (f1, t1) = (faults(), Instant::now());
            drop(msg);
            let (df, dt) = (faults() - f1, t1.elapsed());
            println!(
                "  build {round}: {bf:>7} faults {:>8.1} ms ({segs} segs) | drop {df:>6} faults {:>8.1} ms | carved {:>5} MiB live {:>5} MiB pools {}",
                bt.as_secs_f64() * 1e3,
                dt.as_secs_f64() * 1e3,
                s.bytes_reserved >> 20,
                s.bytes_in_use >> 20,
                s.pools
            );
        }
    }
}
