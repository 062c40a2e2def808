//! Round-trip time against message size, zero-copy vs copying: the README's main demo.
//!
//! Two processes (this program re-executes itself as the server). Like Flow-IPC's perf_demo,
//! the client asks for N bytes and the server answers with a `GetCacheRsp` carrying N bytes in
//! 16 KiB parts; each round trip is timed from just before the request is sent to just after the
//! first part of the response has been touched. The server builds each response once and
//! re-sends it (a cached file): zero-copy, that costs a handle on the socket; copying, all N
//! bytes go through the socket.
//!
//! Zero-copy sizes and the raw floor are sampled in round-robin blocks after a warm-up of every
//! size; copying is measured after them.
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

/// The 99th percentile.
fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() * 99 / 100]
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
    let sizes = [1 << 10, 64 << 10, 1 << 20, 64 << 20, 1 << 30];
    // Zero-copy first: warm every size up (the server builds and caches each response, pages
    // get mapped), then sample the floor and every size in round-robin blocks, so that a noisy
    // neighbour (this is a shared VM) and the memory churn of building 1 GiB hit all alike.
    for &size in &sizes {
        client.sample(Some(true), size, 3);
    }
    let rounds = if quick { 4 } else { 20 };
    let mut raw = Vec::new();
    let mut zc: Vec<Vec<Duration>> = vec![Vec::new(); sizes.len()];
    let (mut struc_shm, mut struc_heap) = (Vec::new(), Vec::new());
    let mut spin = Vec::new();
    let mut struc_socket = Vec::new();
    let mut kinds: Vec<Vec<Duration>> = vec![Vec::new(); peer::KINDS.len()];
    client.sample_struc(true, 100);
    client.sample_struc(false, 100);
    for (i, k) in kinds.iter_mut().enumerate() {
        client.sample_kind(i, 100);
        k.clear();
    }
    for _ in 0..rounds {
        raw.extend(client.sample(None, 0, 100));
        for (i, &size) in sizes.iter().enumerate() {
            zc[i].extend(client.sample(Some(true), size, 100));
        }
        struc_shm.extend(client.sample_struc(true, 100));
        struc_heap.extend(client.sample_struc(false, 100));
        spin.extend(client.sample_spin(100));
        // The kinds are compared in steady state: each block starts after a few round trips
        // of its own (the other blocks left its two sides idle long enough for a waiting side
        // to have gone to sleep in poll).
        client.sample_struc(true, 5);
        let socket_block = client.sample_struc(true, 100);
        struc_socket.extend(socket_block);
        for (i, k) in kinds.iter_mut().enumerate() {
            client.sample_kind(i, 5);
            k.extend(client.sample_kind(i, 100));
        }
    }
    let struc_socket_all = struc_socket;
    let raw = median(raw);
    let (struc_shm, struc_heap) = (median(struc_shm), median(struc_heap));
    let zc: Vec<Duration> = zc.into_iter().map(median).collect();
    // Then copying, which moves every byte through the socket (few rounds at the big sizes).
    let heap: Vec<Duration> = sizes
        .iter()
        .map(|&size| {
            let n = match size {
                s if s <= 1 << 20 => {
                    if quick {
                        50
                    } else {
                        300
                    }
                }
                s if s <= 64 << 20 => {
                    if quick {
                        3
                    } else {
                        15
                    }
                }
                _ => {
                    if quick {
                        2
                    } else {
                        5
                    }
                }
            };
            client.sample(Some(false), size, 1);
            median(client.sample(Some(false), size, n))
        })
        .collect();

    println!("raw 64 B Unix-socket ping-pong (the floor): {}\n", fmt(raw));
    println!(
        "{:>8} | {:>12} | {:>12} | {:>16} | {:>12}",
        "size", "zero-copy", "copying", "copying/zero-copy", "zc/raw floor"
    );
    println!("{}", "-".repeat(74));
    for (i, &size) in sizes.iter().enumerate() {
        println!(
            "{:>8} | {:>12} | {:>12} | {:>16} | {:>12}",
            label(size),
            fmt(zc[i]),
            fmt(heap[i]),
            format!("{:.1}x", heap[i].as_secs_f64() / zc[i].as_secs_f64()),
            format!("{:.2}x", zc[i].as_secs_f64() / raw.as_secs_f64())
        );
    }
    let last = sizes.len() - 1;
    println!();
    println!(
        "zero-copy RTT, 1 GiB vs 1 KiB: {:.2}x (goal <= 1.5x)",
        zc[last].as_secs_f64() / zc[0].as_secs_f64()
    );
    println!(
        "copying vs zero-copy at 1 GiB: {:.0}x (goal >= 1000x)",
        heap[last].as_secs_f64() / zc[last].as_secs_f64()
    );
    println!(
        "zero-copy 1 KiB vs raw 64 B ping-pong: {:.2}x (goal <= 1.2x)",
        zc[0].as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "structured sync_request (small sumRequest -> sumResponse) vs the floor: \
         arena {} ({:.2}x), heap {} ({:.2}x) (goal <= 1.2x)",
        fmt(struc_shm),
        struc_shm.as_secs_f64() / raw.as_secs_f64(),
        fmt(struc_heap),
        struc_heap.as_secs_f64() / raw.as_secs_f64()
    );

    println!();
    println!(
        "channel kinds: structured sync_request (sumRequest -> sumResponse, arena-backed), \
         {} round trips each",
        struc_socket_all.len()
    );
    let spin = median(spin);
    println!(
        "  raw spin ping-pong over shared atomics (the hardware floor): {}",
        fmt(spin)
    );
    println!(
        "{:>20} | {:>10} | {:>10} | {:>12} | {:>10}",
        "kind", "median", "p99", "vs socket", "vs spin"
    );
    println!("{}", "-".repeat(72));
    let socket = (median(struc_socket_all.clone()), p99(struc_socket_all));
    let mut rows = vec![("socket".to_string(), socket)];
    for (i, k) in kinds.into_iter().enumerate() {
        rows.push((peer::KINDS[i].0.to_string(), (median(k.clone()), p99(k))));
    }
    for (name, (med, tail)) in rows {
        println!(
            "{:>20} | {:>10} | {:>10} | {:>12} | {:>10}",
            name,
            fmt(med),
            fmt(tail),
            format!(
                "{:.2}x / {:.2}x",
                med.as_secs_f64() / socket.0.as_secs_f64(),
                tail.as_secs_f64() / socket.1.as_secs_f64()
            ),
            format!("{:.1}x", med.as_secs_f64() / spin.as_secs_f64())
        );
    }
}
