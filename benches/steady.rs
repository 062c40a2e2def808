//! Large messages in steady state (criterion): build a `GetCacheRsp` of N bytes in 16 KiB parts
//! in an arena, send it in place to a second process (which reads it, drops it and
//! acknowledges), drop it; again and again, in one arena.
//!
//! One group per size, `steady/build_drop/<size>` (64 MiB, 256 MiB, 1 GiB), so that each size's
//! ratios come from one run:
//! * `memset`: the baseline, a `memset` of N bytes of a buffer already mapped;
//! * `build`: the build alone (timed), then the send and the drop;
//! * `drop`: the build and the send, then the drop alone (timed): the sender's `MsgOut` is the
//!   last reference, so this is the whole cost of freeing (zeroing what was written, freeing
//!   each segment);
//! * `cycle`: build, send, the receiver's read, drop and ack, and the drop, all timed.
//!
//! Each prints the minor page faults per iteration of the timed part (this thread's, counted
//! over every iteration criterion ran, after two untimed warm-up cycles): 0 in steady state.
//! The server is this bench binary re-executed (see `peer/mod.rs`).
//!
//! Run: `cargo bench --bench steady` (`-- 256MiB` for one size).

mod peer;

use std::cell::Cell;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, SamplingMode};
use flowipc::msg::MsgOut;
use flowipc::schemas::perf_demo_capnp::body;
use flowipc::shm::{Arena, ArenaConfig};

fn label(size: usize) -> String {
    match size {
        s if s >= 1 << 30 => format!("{}GiB", s >> 30),
        s => format!("{}MiB", s >> 20),
    }
}

/// Minor page faults of this thread.
fn faults() -> i64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD)
        .map(|u| u.minor_page_faults())
        .unwrap_or(0)
}

/// Page faults and iterations counted for one function.
#[derive(Default)]
struct Count {
    faults: Cell<i64>,
    iters: Cell<u64>,
}

impl Count {
    fn add(&self, faults: i64) {
        self.faults.set(self.faults.get() + faults);
        self.iters.set(self.iters.get() + 1);
    }

    fn report(&self, id: &str) {
        let n = self.iters.get().max(1);
        println!(
            "{id}: {:.1} page faults per iteration ({} iterations)",
            self.faults.get() as f64 / n as f64,
            self.iters.get()
        );
    }
}

fn steady(c: &mut Criterion) {
    let mut client = peer::start();
    let arena = Arena::create(ArenaConfig::new()).expect("arena");
    for size in [64 << 20, 256 << 20, 1 << 30] {
        let name = format!("steady/build_drop/{}", label(size));
        let parts = size.div_ceil(peer::PART) as u32;
        let build = || {
            let mut msg = MsgOut::<body::Owned>::new_in(&arena);
            peer::build_response(&mut msg, size);
            msg
        };
        let mut send = |msg: &mut MsgOut<body::Owned>| {
            assert_eq!(client.sink(msg), (parts, 0), "what the receiver saw");
        };
        // The first build of a size maps its pages; criterion's warm-up then sees steady state.
        for _ in 0..2 {
            send(&mut build());
        }
        let mut buf = vec![1u8; size];
        let mut g = c.benchmark_group(&name);
        g.sampling_mode(SamplingMode::Flat);
        g.sample_size(10);
        g.warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(if size >= 1 << 30 { 4 } else { 2 }));
        let count = Count::default();
        g.bench_function("memset", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for i in 0..iters {
                    let (f, start) = (faults(), Instant::now());
                    buf.fill(i as u8);
                    std::hint::black_box(&mut buf);
                    t += start.elapsed();
                    count.add(faults() - f);
                }
                t
            })
        });
        count.report(&format!("{name}/memset"));
        let count = Count::default();
        g.bench_function("build", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let (f, start) = (faults(), Instant::now());
                    let mut msg = build();
                    t += start.elapsed();
                    count.add(faults() - f);
                    send(&mut msg);
                }
                t
            })
        });
        count.report(&format!("{name}/build"));
        let count = Count::default();
        g.bench_function("drop", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let mut msg = build();
                    send(&mut msg);
                    let (f, start) = (faults(), Instant::now());
                    drop(msg);
                    t += start.elapsed();
                    count.add(faults() - f);
                }
                t
            })
        });
        count.report(&format!("{name}/drop"));
        let count = Count::default();
        g.bench_function("cycle", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let (f, start) = (faults(), Instant::now());
                    let mut msg = build();
                    send(&mut msg);
                    drop(msg);
                    t += start.elapsed();
                    count.add(faults() - f);
                }
                t
            })
        });
        count.report(&format!("{name}/cycle"));
        g.finish();
        let mut msg = build();
        let s = arena.stats();
        send(&mut msg);
        println!(
            "{name}: arena carved {} MiB, {} MiB live with one message, {} pools",
            s.bytes_reserved >> 20,
            s.bytes_in_use >> 20,
            s.pools
        );
    }
}

criterion_group!(benches, steady);

fn main() {
    peer::serve_if_peer();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
