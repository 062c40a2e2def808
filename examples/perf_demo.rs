//! Round-trip time against message size, zero-copy vs copying: the README's main demo.
//!
//! Two processes (this program re-executes itself as the server). Like Flow-IPC's perf_demo,
//! the client asks for N bytes and the server answers with a `GetCacheRsp` carrying N bytes in
//! 16 KiB parts; each round trip is timed from just before the request is sent to just after the
//! first part of the response has been touched. The server builds each response once and
//! re-sends it (a cached file): zero-copy, that costs a handle on the socket; copying, all N
//! bytes go through the socket.
//!
//! Run: `cargo run --release --example perf_demo` (both processes are pinned to vCPU 0 by
//! default; `FLOWIPC_PIN=split` puts them on different vCPUs, `none` leaves them to the
//! scheduler; `FLOWIPC_DEMO_QUICK=1` runs fewer rounds).

#[path = "../benches/peer/mod.rs"]
mod peer;

use std::time::Duration;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn label(size: usize) -> String {
    match size {
        s if s >= 1 << 30 => format!("{} GiB", s >> 30),
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s >> 10),
    }
}

fn main() {
    peer::serve_if_peer();
    let quick = std::env::var_os("FLOWIPC_DEMO_QUICK").is_some();
    let mut client = peer::start();
    println!(
        "flowipc perf demo: request -> response of N bytes in 16 KiB parts (pinning: {:?})",
        peer::Pin::from_env()
    );
    // The floor and the small zero-copy round trip are sampled in alternating blocks, so that
    // a noisy neighbour (this is a shared VM) hits both alike.
    client.sample(Some(true), 1 << 10, 100);
    let (mut raw, mut small) = (Vec::new(), Vec::new());
    for _ in 0..if quick { 4 } else { 20 } {
        raw.extend(client.sample(None, 0, 200));
        small.extend(client.sample(Some(true), 1 << 10, 200));
    }
    let raw = median(raw);
    let small = median(small);
    println!("raw 64 B Unix-socket ping-pong (the floor): {}\n", fmt(raw));
    println!(
        "{:>8} | {:>12} | {:>12} | {:>16} | {:>12}",
        "size", "zero-copy", "copying", "copying/zero-copy", "zc/raw floor"
    );
    println!("{}", "-".repeat(74));
    let sizes = [1 << 10, 64 << 10, 1 << 20, 64 << 20, 1 << 30];
    let mut zc_small = None;
    let mut zc_big = None;
    let mut ratio_big = None;
    for &size in &sizes {
        let (zn, hn) = match size {
            s if s <= 1 << 20 => (if quick { 100 } else { 1000 }, if quick { 50 } else { 300 }),
            s if s <= 64 << 20 => (if quick { 50 } else { 300 }, if quick { 3 } else { 15 }),
            _ => (if quick { 20 } else { 100 }, if quick { 2 } else { 5 }),
        };
        // Each mode warms up right before it is sampled (the server builds and caches its
        // response, pages get mapped), so that the aftermath of a big copy (freeing a 1 GiB
        // buffer) does not land in the zero-copy samples.
        let zc = if size == 1 << 10 {
            small
        } else {
            client.sample(Some(true), size, 3);
            median(client.sample(Some(true), size, zn))
        };
        client.sample(Some(false), size, 1);
        let heap = median(client.sample(Some(false), size, hn));
        let ratio = heap.as_secs_f64() / zc.as_secs_f64();
        println!(
            "{:>8} | {:>12} | {:>12} | {:>16} | {:>12}",
            label(size),
            fmt(zc),
            fmt(heap),
            format!("{ratio:.1}x"),
            format!("{:.2}x", zc.as_secs_f64() / raw.as_secs_f64())
        );
        if size == 1 << 10 {
            zc_small = Some(zc);
        }
        if size == 1 << 30 {
            zc_big = Some(zc);
            ratio_big = Some(ratio);
        }
    }
    if let (Some(small), Some(big), Some(ratio)) = (zc_small, zc_big, ratio_big) {
        println!();
        println!(
            "zero-copy RTT, 1 GiB vs 1 KiB: {:.2}x (goal <= 1.5x)",
            big.as_secs_f64() / small.as_secs_f64()
        );
        println!("copying vs zero-copy at 1 GiB: {ratio:.0}x (goal >= 1000x)");
        println!(
            "zero-copy 1 KiB vs raw 64 B ping-pong: {:.2}x (goal <= 1.2x)",
            small.as_secs_f64() / raw.as_secs_f64()
        );
    }
}
