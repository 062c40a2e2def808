//! Builds and drops large messages repeatedly in one arena and reports, per build, the minor
//! page faults and time of the build and of the drop, and the arena's carved vs live bytes.
//!
//! With `RECEIVER_DROPS=1`, each message is sent through a channel to a receiver that maps the
//! arena separately (as another process would) and drops it last: the drop is then timed there.
//!
//! Run: `cargo run --release --example steady_state -- [MiB ...]` (default 64 256 1024).

use std::time::{Duration, Instant};

use flowipc::msg::{Backing, MsgChannel, MsgOut};
use flowipc::schemas::perf_demo_capnp::body;
use flowipc::shm::{Arena, ArenaConfig};
use flowipc::transport::{Channel, ChannelConfig};

const PART: usize = 16 * 1024;

fn faults() -> i64 {
    usage().0
}

/// Minor faults, CPU time (user + system) and involuntary context switches of this process: a
/// slow step whose CPU time is short was preempted (the machine is shared), not slow itself.
fn usage() -> (i64, Duration, i64) {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) else {
        return (0, Duration::ZERO, 0);
    };
    let cpu = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    (
        u.minor_page_faults(),
        cpu(u.user_time()) + cpu(u.system_time()),
        u.involuntary_context_switches(),
    )
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
        let mut chans = std::env::var_os("RECEIVER_DROPS").map(|_| {
            let cfg = ChannelConfig::new();
            let (a, b) = Channel::pair(cfg).expect("channel pair");
            (
                MsgChannel::<body::Owned>::new(a, Backing::Shm(arena.clone())),
                MsgChannel::<body::Owned>::new(b, Backing::Heap),
            )
        });
        println!("{mib} MiB:");
        for round in 1..=rounds {
            let (f0, t0) = (faults(), Instant::now());
            let mut msg = MsgOut::<body::Owned>::new_in(&arena);
            build(&mut msg, size);
            let build = (faults() - f0, t0.elapsed());
            let (segs, stats) = (msg.segment_count(), arena.stats());
            // What is dropped last: the message itself, or the receiver's view of it.
            let last: Box<dyn std::any::Any> = match &mut chans {
                Some((tx, rx)) => {
                    tx.send(&mut msg, None).expect("send");
                    let got = rx.recv_blocking(None).expect("recv").expect("a message");
                    assert!(got.is_zero_copy());
                    drop(msg);
                    Box::new(got)
                }
                None => Box::new(msg),
            };
            let (u1, t1) = (usage(), Instant::now());
            drop(last);
            let (dt, u2) = (t1.elapsed(), usage());
            let (df, dcpu, dcs) = (u2.0 - u1.0, u2.1 - u1.1, u2.2 - u1.2);
            println!(
                "  build {round}: {:>7} faults {:>8.1} ms ({segs} segs) | drop {df:>6} faults \
                 {:>8.1} ms (cpu {:>6.1} ms, {dcs} preemptions) | carved {:>5} MiB live {:>5} MiB \
                 pools {}",
                build.0,
                build.1.as_secs_f64() * 1e3,
                dt.as_secs_f64() * 1e3,
                dcpu.as_secs_f64() * 1e3,
                stats.bytes_reserved >> 20,
                stats.bytes_in_use >> 20,
                stats.pools
            );
        }
    }
}
