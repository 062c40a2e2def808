//! Allocation benchmarks: the shared-memory arena against the system allocator.
//!
//! What is measured:
//!
//! * `alloc_free/{flowipc,system}/N`: one allocation of `N` bytes immediately freed again, for
//!   `N` = 64 B, 1 KiB, 8 KiB and 1 MiB, on one thread. `flowipc` is `Arena::alloc` followed by
//!   dropping the [`Block`]; `system` is `Vec::<u8>::with_capacity(N)` followed by dropping the
//!   `Vec` (the global allocator, i.e. the system `malloc`/`free`). Neither side touches the
//!   memory it gets, so this is the bookkeeping cost of the allocator alone. The arena is warmed
//!   first (one allocation and free per size), so the page faults of first touching its headers
//!   and the carving of fresh spans are not part of the measurement.
//! * `alloc_free_contended/{flowipc,system}/64`: the same 64-byte pair on two threads at once,
//!   both allocating from one shared arena (respectively from the system allocator). Each sample
//!   starts the second thread, lines both up on a barrier, and times only the first thread; the
//!   reported time is per pair of that thread while the other one competes.
//!
//! Run with `cargo bench --bench alloc` (add a filter such as `cargo bench --bench alloc --
//! contended` to run one group). Results land in `target/criterion`.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use flowipc::shm::{Arena, ArenaConfig, Block};

/// Payload sizes of the single-threaded group.
const SIZES: [usize; 4] = [64, 1 << 10, 8 << 10, 1 << 20];

/// Payload size of the contended group.
const CONTENDED_SIZE: usize = 64;

/// A pool large enough for every size above; pages cost RAM only once touched.
const POOL_BYTES: u64 = 64 << 20;

fn arena() -> Arena {
    Arena::create(ArenaConfig::new().pool_size(POOL_BYTES)).expect("create arena")
}

fn configure<M: criterion::measurement::Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
}

/// One arena allocation of `n` bytes, freed again.
#[inline(always)]
fn flowipc_pair(arena: &Arena, n: usize) {
    let block: Block<'_> = arena.alloc(n).expect("arena alloc");
    black_box(block.as_ptr());
    drop(block);
}

/// One system allocation of `n` bytes, freed again. `black_box` on the pointer keeps the
/// compiler from eliding the unused allocation.
#[inline(always)]
fn system_pair(n: usize) {
    let v = Vec::<u8>::with_capacity(n);
    black_box(v.as_ptr());
    drop(v);
}

fn alloc_free(c: &mut Criterion) {
    let arena = arena();
    // Warm up: carve each size's span or extent and fault its header pages in.
    for n in SIZES {
        flowipc_pair(&arena, n);
    }

    let mut group = c.benchmark_group("alloc_free");
    configure(&mut group);
    for n in SIZES {
        group.bench_with_input(BenchmarkId::new("flowipc", n), &n, |b, &n| {
            b.iter(|| flowipc_pair(&arena, black_box(n)));
        });
        group.bench_with_input(BenchmarkId::new("system", n), &n, |b, &n| {
            b.iter(|| system_pair(black_box(n)));
        });
    }
    group.finish();
}

/// Runs `pair` `iters` times on this thread and on a second one at once, and returns how long
/// this thread took.
fn contended<F: Fn() + Sync>(iters: u64, pair: F) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            barrier.wait();
            for _ in 0..iters {
                pair();
            }
        });
        barrier.wait();
        let start = Instant::now();
        for _ in 0..iters {
            pair();
        }
        start.elapsed()
    })
}

fn alloc_free_contended(c: &mut Criterion) {
    let arena = arena();
    // Warm up: the first allocation carves a 64 KiB span, enough blocks for both threads.
    flowipc_pair(&arena, CONTENDED_SIZE);

    let mut group = c.benchmark_group("alloc_free_contended");
    configure(&mut group);
    let n = CONTENDED_SIZE;
    group.bench_with_input(BenchmarkId::new("flowipc", n), &n, |b, &n| {
        b.iter_custom(|iters| contended(iters, || flowipc_pair(&arena, black_box(n))));
    });
    group.bench_with_input(BenchmarkId::new("system", n), &n, |b, &n| {
        b.iter_custom(|iters| contended(iters, || system_pair(black_box(n))));
    });
    group.finish();
}

criterion_group!(benches, alloc_free, alloc_free_contended);
criterion_main!(benches);
