//! The tokio face against the sync_io core it is built on (feature `tokio`): a small structured
//! request/response round trip between two processes, in one criterion group so that the ratio
//! comes from one run. Both use a socket-kind, arena-backed channel to the same server code
//! (see `peer/mod.rs`); both processes are pinned alike (`FLOWIPC_PIN`: `same`, the default,
//! `split` or `none`).
//!
//! * `sync_io_core/blocking`: `struc::Channel::sync_request` on the calling thread (the core's
//!   own blocking wait: a send and a blocking receive, two system calls).
//! * `sync_io_core/poll_loop`: the same core driven the way a user's poll loop drives it
//!   (`async_request`, then `poll` on its interest and `on_ready`), the event-driven model the
//!   tokio face shares.
//! * `tokio/block_on` and `tokio/task`: `flowipc::tokio::Channel::request(..).await` on a
//!   current-thread runtime (the face's task drives the channel through `AsyncFd`), awaited
//!   in the `block_on` future itself, and in a spawned task. They differ by tokio's
//!   scheduler alone: a `block_on` future woken by another task (here the face's) costs a
//!   zero-timeout `epoll_wait` before it is polled again; a task woken so runs next.
//!
//! Run: `cargo bench --features tokio --bench faces`.

mod peer;

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, Criterion, SamplingMode};
use flowipc::poll::Pollable;
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::struc::{self, Expect};
use nix::poll::{PollFd, PollFlags, PollTimeout};

fn faces(c: &mut Criterion) {
    let mut client = peer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let spare = client.struc_spare.take().expect("the spare channel");
    let chan = rt.block_on(async {
        let chan = flowipc::tokio::Channel::new(spare).expect("tokio channel");
        chan.start(|e| panic!("tokio channel: {e}")).expect("start");
        chan
    });
    let mut g = c.benchmark_group("rtt/faces");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("sync_io_core/blocking", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                assert_eq!(client.struc_rtt(true), 42);
            }
            t.elapsed()
        })
    });
    g.bench_function("sync_io_core/poll_loop", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                assert_eq!(poll_loop_rtt(&mut client.struc_shm), 42);
            }
            t.elapsed()
        })
    });
    let chan = std::sync::Arc::new(chan);
    g.bench_function("tokio/block_on", |b| {
        b.iter_custom(|iters| rt.block_on(tokio_rtts(&chan, iters)))
    });
    g.bench_function("tokio/task", |b| {
        b.iter_custom(|iters| {
            let chan = chan.clone();
            rt.block_on(async move {
                tokio::spawn(async move { tokio_rtts(&chan, iters).await })
                    .await
                    .expect("the task")
            })
        })
    });
    g.finish();
    rt.block_on(async { drop(chan) });
}

/// `iters` round trips of the tokio face, timed.
async fn tokio_rtts(chan: &flowipc::tokio::Channel<cool_msg::Owned>, iters: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        let mut req = chan.create_msg();
        {
            // (The builder is not `Send`: gone before the await.)
            let mut terms = req.init_root().init_sum_request().init_terms_to_add(2);
            terms.set(0, 20);
            terms.set(1, 22);
        }
        let rsp = chan.request(&mut req, None, None).await.expect("response");
        match rsp.root().expect("root").which() {
            Ok(cool_msg::SumResponse(Ok(s))) => assert_eq!(s.get_sum(), 42),
            _ => panic!("not a sumResponse"),
        }
    }
    t.elapsed()
}

/// A round trip the way a user's own poll loop makes it: `async_request`, then `poll` on the
/// core's interest and `on_ready` until the handler has the response.
fn poll_loop_rtt(chan: &mut struc::Channel<cool_msg::Owned>) -> i64 {
    let got = Arc::new(AtomicI64::new(-1));
    let g = got.clone();
    let mut req = chan.create_msg();
    let mut terms = req.init_root().init_sum_request().init_terms_to_add(2);
    terms.set(0, 20);
    terms.set(1, 22);
    chan.async_request(&mut req, None, Expect::OneOff, move |_, rsp| {
        if let Ok(cool_msg::SumResponse(Ok(s))) = rsp.root().expect("root").which() {
            g.store(s.get_sum(), Ordering::Relaxed);
        }
    })
    .expect("request");
    while got.load(Ordering::Relaxed) < 0 {
        {
            let i = chan.interest();
            let mut fds: Vec<PollFd> = i
                .fds()
                .map(|(fd, r, w)| {
                    let mut ev = PollFlags::empty();
                    ev.set(PollFlags::POLLIN, r);
                    ev.set(PollFlags::POLLOUT, w);
                    PollFd::new(fd, ev)
                })
                .collect();
            nix::poll::poll(&mut fds, PollTimeout::NONE).expect("poll");
        }
        chan.on_ready().expect("on_ready");
    }
    got.load(Ordering::Relaxed)
}

criterion_group!(benches, faces);

fn main() {
    peer::serve_if_peer();
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
