//! Request -> response round trips between two processes (criterion; timing inside
//! `iter_custom`).
//!
//! One group, `rtt`, holds every figure so that ratios come from one run: the raw 64-byte
//! Unix-socket ping-pong (the floor); a structured `sync_request` of a small message, arena- and
//! heap-backed; and for 1 KiB, 64 KiB, 1 MiB, 64 MiB and 1 GiB responses the zero-copy (arena)
//! and copying (heap) modes. The server is this bench binary re-executed
//! once (see `peer/mod.rs`); both processes are pinned alike (`FLOWIPC_PIN`, default `same`).
//!
//! A third group, `rtt/inline`, compares sending small arena-backed messages in place and
//! inline (copied into the frame), size by size: where the default inline limit comes from.
//!
//! Run: `cargo bench --bench latency` (`-- rtt/zero_copy` for a subset).

mod peer;

use std::time::{Duration, Instant};

use criterion::{criterion_group, Bencher, BenchmarkId, Criterion, SamplingMode};

/// Times `iters` calls of `f` (criterion's custom timing: the round trips are the whole work).
fn timed(b: &mut Bencher<'_>, mut f: impl FnMut()) {
    b.iter_custom(|iters| {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        t.elapsed()
    })
}

fn label(size: usize) -> String {
    match size {
        s if s >= 1 << 30 => format!("{}GiB", s >> 30),
        s if s >= 1 << 20 => format!("{}MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{}KiB", s >> 10),
        s => format!("{s}B"),
    }
}

fn rtt(c: &mut Criterion) {
    let mut client = peer::start();
    let mut g = c.benchmark_group("rtt");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("raw_uds_64B", |b| {
        timed(b, || {
            client.raw_rtt();
        })
    });
    // Structured request/response (a small sumRequest; sync_request on a struc::Channel).
    for (mode, zero_copy) in [("shm", true), ("heap", false)] {
        g.bench_function(BenchmarkId::new("struc_sync_request", mode), |b| {
            timed(b, || {
                assert_eq!(client.struc_rtt(zero_copy), 42);
            })
        });
    }
    for size in [1 << 10, 64 << 10, 1 << 20, 64 << 20, 1 << 30] {
        for (mode, zero_copy) in [("zero_copy", true), ("copying", false)] {
            if size >= 64 << 20 && !zero_copy {
                // A copy of 64 MiB+ takes 10+ ms: few, long samples.
                g.sample_size(10);
                g.measurement_time(Duration::from_secs(if size >= 1 << 30 { 20 } else { 5 }));
            }
            g.bench_with_input(BenchmarkId::new(mode, label(size)), &size, |b, &size| {
                timed(b, || {
                    std::hint::black_box(client.rtt(zero_copy, size));
                })
            });
            g.sample_size(20);
            g.measurement_time(Duration::from_secs(3));
        }
    }
    g.finish();
}

/// The channel kinds side by side, with both floors in the same group: the raw two-process spin
/// ping-pong over shared atomics (the hardware's) and the raw socket ping-pong; the small
/// structured `sync_request` over the socket kind and over `ShmQueue` with each wait policy; and
/// zero-copy 1 KiB and 1 GiB round trips over `ShmQueue` (a large message stays flat). Run it
/// once per pinning (`FLOWIPC_PIN=same` and `split`); busy-polling is meant for split pinning.
fn kinds(c: &mut Criterion) {
    let mut client = peer::start();
    let mut g = c.benchmark_group("rtt/kinds");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("raw_spin_pingpong", |b| {
        timed(b, || {
            client.spin_rtt();
        })
    });
    g.bench_function("raw_uds_64B", |b| {
        timed(b, || {
            client.raw_rtt();
        })
    });
    g.bench_function(BenchmarkId::new("struc_sync_request", "socket"), |b| {
        timed(b, || {
            assert_eq!(client.struc_rtt(true), 42);
        })
    });
    for (i, (name, _, _)) in peer::KINDS.iter().enumerate() {
        g.bench_function(BenchmarkId::new("struc_sync_request", name), |b| {
            timed(b, || {
                assert_eq!(client.kind_rtt(i), 42);
            })
        });
    }
    for size in [1 << 10, 1 << 30] {
        g.bench_with_input(
            BenchmarkId::new("zero_copy_shm_queue", label(size)),
            &size,
            |b, &size| {
                timed(b, || {
                    std::hint::black_box(client.queue_rtt(size));
                })
            },
        );
    }
    g.finish();
}

/// Where sending a small arena-backed message inline (copied into the frame) stops paying off
/// against sending it in place (a handle): the same round trip over two arena-backed channels
/// that differ only in that, size by size, in one group. `MsgChannel`'s default inline limit
/// (`msg::DEFAULT_INLINE_MAX`) is read off this.
fn inline(c: &mut Criterion) {
    let mut client = peer::start();
    let mut g = c.benchmark_group("rtt/inline");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(2));
    let sizes = [
        64,
        512,
        1 << 10,
        1536,
        2 << 10,
        3 << 10,
        4 << 10,
        8 << 10,
        32 << 10,
    ];
    for size in sizes {
        for (i, (mode, _)) in peer::SEND_MODES.iter().enumerate() {
            g.bench_with_input(BenchmarkId::new(*mode, label(size)), &size, |b, &size| {
                timed(b, || {
                    std::hint::black_box(client.send_mode_rtt(i, size));
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, rtt, kinds, inline);

fn main() {
    peer::serve_if_peer();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
