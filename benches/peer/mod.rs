//! The two-process harness shared by `benches/latency.rs`, `benches/steady.rs` and
//! `examples/perf_demo.rs`.
//!
//! The measuring process (client) binds an abstract Unix socket and re-executes its own binary
//! with [`PEER_ENV`] set; that process (server) connects: a raw socket for the ping-pong floor,
//! a zero-copy (arena-backed, every message in place) message channel and a heap (copying)
//! one, two arena-backed ones that send every message in place and inline
//! ([`Client::send_mode_rtt`]), two structured channels (default inline limit),
//! and a sink that reads and drops what the client sends ([`Client::sink`]). Like
//! Flow-IPC's perf_demo, a request names a size and the response carries that many bytes in
//! 16 KiB parts (`GetCacheRsp.fileParts`). The server builds each size's response once and
//! re-sends it unchanged (a cached file): in place that costs a reference, on the heap a copy
//! through the socket.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowipc::msg::{Backing, MsgChannel, MsgOut};
use flowipc::schemas::perf_demo_capnp::body;
use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
use std::sync::atomic::{AtomicU64, Ordering};

use flowipc::shm::{Arena, ArenaConfig, ShmHandle};
use flowipc::struc;
use flowipc::transport::{Channel, ChannelConfig, ChannelKind, WaitPolicy};

/// Set in the server process: the abstract socket name to connect to.
pub const PEER_ENV: &str = "FLOWIPC_PERF_PEER";
/// Bytes per response part.
pub const PART: usize = 16 * 1024;
/// Bytes of the raw ping-pong.
pub const RAW: usize = 64;

/// How both processes are pinned (`FLOWIPC_PIN`): `same` (default: both on vCPU 0, so every
/// wake-up is a same-core switch), `split` (0 and 1: every wake-up crosses vCPUs, ~35 µs each
/// way on the project's machines) or `none`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    Same,
    Split,
    None,
}

impl Pin {
    pub fn from_env() -> Pin {
        match std::env::var("FLOWIPC_PIN").as_deref() {
            Ok("split") => Pin::Split,
            Ok("none") => Pin::None,
            _ => Pin::Same,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Pin::Same => "same",
            Pin::Split => "split",
            Pin::None => "none",
        }
    }

    /// Pins the calling process (all its future threads) to its vCPU.
    pub fn apply(self, server: bool) {
        let cpu = match (self, server) {
            (Pin::None, _) => return,
            (Pin::Same, _) | (Pin::Split, false) => 0,
            (Pin::Split, true) => 1,
        };
        let mut set = nix::sched::CpuSet::new();
        if set.set(cpu).is_ok() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    }
}

/// The structured channels of the other kinds and wait policies, by label (the socket kind's
/// are `struc_shm` / `struc_heap`): arena-backed like `struc_shm`, the same policy on both
/// sides.
pub const KINDS: [(&str, ChannelKind, WaitPolicy); 4] = [
    ("shm_queue_block", ChannelKind::ShmQueue, WaitPolicy::BLOCK),
    (
        "shm_queue_default",
        ChannelKind::ShmQueue,
        WaitPolicy::SpinThenBlock(Duration::from_micros(20)),
    ),
    (
        "shm_queue_busy",
        ChannelKind::ShmQueue,
        WaitPolicy::BusyPoll,
    ),
    ("posix_mq", ChannelKind::PosixMq, WaitPolicy::BLOCK),
];

fn kind_config(kind: ChannelKind, policy: WaitPolicy) -> ChannelConfig {
    config().with_kind(kind).with_wait_policy(policy)
}

/// Arena-backed message channels that differ only in how they send: every message in place
/// (inline limit 0) or every message up to 64 KiB inline (copied into the frame), both sides
/// alike. Comparing them size by size shows where copying starts to cost more than the handle.
pub const SEND_MODES: [(&str, usize); 2] = [("in_place", 0), ("inline", 64 << 10)];

/// Slots of the spin ping-pong, a cache line pair apart.
const PING: usize = 0;
const PONG: usize = 16;

/// The client's ends of the connections, and the server process.
pub struct Client {
    pub raw: UnixStream,
    pub shm: MsgChannel<body::Owned>,
    pub heap: MsgChannel<body::Owned>,
    /// Structured channels (CoolMsg), arena-backed and heap-backed.
    pub struc_shm: struc::Channel<cool_msg::Owned>,
    pub struc_heap: struc::Channel<cool_msg::Owned>,
    /// Structured channels of the other kinds, one per entry of [`KINDS`].
    pub struc_kinds: Vec<struc::Channel<cool_msg::Owned>>,
    /// A zero-copy message channel of kind `ShmQueue` (default policy).
    pub shm_queue: MsgChannel<body::Owned>,
    /// The spin ping-pong's words, in an arena the server maps (the hardware floor).
    spin: ShmHandle<[AtomicU64; 32]>,
    spin_seq: u64,
    /// Messages the client builds go here (see [`Client::sink`]).
    pub sink: MsgChannel<body::Owned>,
    /// A structured channel like `struc_shm` (the same server), not started: for a face to
    /// take (`benches/faces.rs`).
    pub struc_spare: Option<struc::Channel<cool_msg::Owned>>,
    /// One arena-backed channel per entry of [`SEND_MODES`].
    pub modes: Vec<MsgChannel<body::Owned>>,
    server: Child,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.spin[PING].store(u64::MAX, Ordering::Release);
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// If this process is the server, serves until the client goes away and exits; otherwise
/// returns. Call first thing in `main`.
pub fn serve_if_peer() {
    let Ok(name) = std::env::var(PEER_ENV) else {
        return;
    };
    Pin::from_env().apply(true);
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("socket name");
    let connect = || UnixStream::connect_addr(&addr).expect("connect to the client");
    let raw = connect();
    let shm = connect();
    let heap = connect();
    let struc_shm = connect();
    let struc_heap = connect();
    let kinds: Vec<UnixStream> = KINDS.iter().map(|_| connect()).collect();
    let shm_queue = connect();
    let spin = connect();
    let sink = connect();
    let spare = connect();
    let modes: Vec<UnixStream> = SEND_MODES.iter().map(|_| connect()).collect();
    let arena = Arena::create(ArenaConfig::new()).expect("arena");
    let small = Arena::create(ArenaConfig::new().pool_size(16 << 20)).expect("arena");
    let mut threads = vec![
        std::thread::spawn({
            let arena = arena.clone();
            move || {
                serve_msgs_with(
                    shm_queue,
                    Backing::Shm(arena),
                    kind_config(ChannelKind::ShmQueue, WaitPolicy::default()),
                    0,
                )
            }
        }),
        std::thread::spawn(move || serve_spin(spin)),
    ];
    for ((_, inline), s) in SEND_MODES.iter().zip(modes) {
        let (arena, inline) = (arena.clone(), *inline);
        threads.push(std::thread::spawn(move || {
            serve_msgs_with(s, Backing::Shm(arena), config(), inline)
        }));
    }
    for ((_, kind, policy), s) in KINDS.iter().zip(kinds) {
        let small = small.clone();
        // The server's side of the busy-polling kind spins for up to 1 ms instead of forever:
        // between bursts of requests an idle busy-poller would take its CPU from every other
        // measurement.
        let (kind, mut policy) = (*kind, *policy);
        if policy == WaitPolicy::BusyPoll {
            policy = WaitPolicy::SpinThenBlock(Duration::from_millis(1));
        }
        threads.push(std::thread::spawn(move || {
            serve_struc_with(s, Backing::Shm(small), kind_config(kind, policy))
        }));
    }
    threads.extend([
        std::thread::spawn(move || serve_raw(raw)),
        std::thread::spawn(move || serve_msgs(shm, Backing::Shm(arena))),
        std::thread::spawn(move || serve_msgs(heap, Backing::Heap)),
        std::thread::spawn({
            let small = small.clone();
            move || serve_struc(struc_shm, Backing::Shm(small))
        }),
        std::thread::spawn(move || serve_struc(struc_heap, Backing::Heap)),
        std::thread::spawn(move || serve_struc(spare, Backing::Shm(small))),
        std::thread::spawn(move || serve_sink(sink)),
    ]);
    for t in threads {
        let _ = t.join();
    }
    std::process::exit(0);
}

fn serve_raw(mut s: UnixStream) {
    let mut buf = [0u8; RAW];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            break;
        }
    }
}

/// The spin ping-pong's server: maps the client's arena, then answers each ping by spinning.
fn serve_spin(s: UnixStream) {
    let Ok(arena) = Arena::join_from(&s, ArenaConfig::new()) else {
        return;
    };
    let mut blob = [0u8; 32];
    if (&s).read_exact(&mut blob).is_err() {
        return;
    }
    let Ok(blob) = flowipc::shm::LendBlob::from_bytes(&blob) else {
        return;
    };
    let Ok(words) = arena.borrow::<[AtomicU64; 32]>(&blob) else {
        return;
    };
    let mut seq = 0u64;
    let mut last = Instant::now();
    let mut i = 0u32;
    loop {
        let v = words[PING].load(Ordering::Acquire);
        if v == u64::MAX {
            return;
        }
        if v != seq {
            seq = v;
            words[PONG].store(v, Ordering::Release);
            last = Instant::now();
            continue;
        }
        i = i.wrapping_add(1);
        if i % 256 == 0 && last.elapsed() > Duration::from_micros(200) {
            // Between bursts of pings: sleep, so as not to take a CPU from the other
            // measurements (the first ping of a burst waits out one sleep).
            std::thread::sleep(Duration::from_millis(1));
        }
        std::hint::spin_loop();
    }
}

/// Serves round trips; an arena-backed channel sends every response in place, however small
/// (the zero-copy figures are of the handle path, as their names say).
fn serve_msgs(s: UnixStream, backing: Backing) {
    serve_msgs_with(s, backing, config(), 0)
}

fn serve_msgs_with(s: UnixStream, backing: Backing, cfg: ChannelConfig, inline: usize) {
    let chan = Channel::from_stream(s, cfg).expect("channel");
    let mut chan = MsgChannel::<body::Owned>::new(chan, backing).with_inline_max(inline);
    let mut cache: HashMap<usize, MsgOut<body::Owned>> = HashMap::new();
    while let Ok(Some(req)) = chan.recv_blocking(None) {
        let size = match req.which() {
            Ok(body::GetCacheReq(Ok(r))) => r
                .get_file_name()
                .ok()
                .and_then(|n| n.to_str().ok()?.parse::<usize>().ok()),
            _ => None,
        };
        drop(req);
        let Some(size) = size else { break };
        let rsp = cache.entry(size).or_insert_with(|| {
            let mut m = chan.create_msg();
            build_response(&mut m, size);
            m
        });
        if let Err(e) = chan.send(rsp, None) {
            eprintln!("perf server: sending the {size}-byte response failed: {e}");
            break;
        }
    }
}

/// Reads every `GetCacheRsp` the client sends (its part count and the first part's first byte,
/// in place), drops it, and only then acknowledges it with a `GetCacheReq` naming the part count
/// and that byte: the client's `MsgOut` is the message's last reference when the ack arrives.
fn serve_sink(s: UnixStream) {
    let chan = Channel::from_stream(s, config()).expect("channel");
    let mut chan = MsgChannel::<body::Owned>::new(chan, Backing::Heap);
    while let Ok(Some(msg)) = chan.recv_blocking(None) {
        let seen = match msg.which() {
            Ok(body::GetCacheRsp(Ok(rsp))) => rsp.get_file_parts().ok().map(|parts| {
                let first = parts
                    .get(0)
                    .get_data()
                    .ok()
                    .and_then(|d| d.first().copied());
                (parts.len(), first.unwrap_or(0))
            }),
            _ => None,
        };
        drop(msg);
        let Some((parts, first)) = seen else { break };
        let mut ack = chan.create_msg();
        ack.init_root()
            .init_get_cache_req()
            .set_file_name(format!("{parts} {first}").as_str());
        if chan.send(&mut ack, None).is_err() {
            break;
        }
    }
}

/// Answers every `sumRequest` with its sum (the page's example), until the client goes.
fn serve_struc(s: UnixStream, backing: Backing) {
    serve_struc_with(s, backing, config())
}

fn serve_struc_with(s: UnixStream, backing: Backing, cfg: ChannelConfig) {
    let chan = Channel::from_stream(s, cfg).expect("channel");
    let mut chan = struc::Channel::<cool_msg::Owned>::new(chan, backing).expect("struc channel");
    let sum_request = CoolMsgKind::SumRequest;
    chan.start(|_| {}).expect("start");
    chan.expect_msgs(sum_request, |chan, req| {
        let Ok(cool_msg::SumRequest(Ok(r))) = req.which() else {
            return;
        };
        let sum: i64 = r.get_terms_to_add().map(|t| t.iter().sum()).unwrap_or(0);
        let mut rsp = chan.create_msg();
        rsp.init_root().init_sum_response().set_sum(sum);
        let _ = chan.send(&mut rsp, Some(&req));
    })
    .expect("expect");
    let _ = chan.run();
}

/// Fills `msg` with a `GetCacheRsp` of `size` bytes in [`PART`]-byte parts (a recognisable
/// pattern: part `i` is filled with `i as u8`).
pub fn build_response(msg: &mut MsgOut<body::Owned>, size: usize) {
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

/// Spawns the server (this binary again) and connects the three channels.
pub fn start() -> Client {
    let pin = Pin::from_env();
    pin.apply(false);
    let name = format!("flowipc-perf-{}-{}", std::process::id(), nanos());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("socket name");
    let listener = UnixListener::bind_addr(&addr).expect("bind");
    let server = Command::new(std::env::current_exe().expect("own path"))
        .env(PEER_ENV, &name)
        .env("FLOWIPC_PIN", pin.name())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the server");
    let accept = || listener.accept().expect("accept").0;
    let raw = accept();
    let shm = accept();
    let heap = accept();
    let struc_shm = accept();
    let struc_heap = accept();
    let kinds: Vec<UnixStream> = KINDS.iter().map(|_| accept()).collect();
    let shm_queue = accept();
    let spin_sock = accept();
    let sink = accept();
    let spare = accept();
    let modes: Vec<UnixStream> = SEND_MODES.iter().map(|_| accept()).collect();
    let arena = Arena::create(ArenaConfig::new().pool_size(64 << 20)).expect("arena");
    let chan = |s, cfg| Channel::from_stream(s, cfg).expect("channel");
    let structured = |s, backing, cfg| {
        let mut c = struc::Channel::new(chan(s, cfg), backing).expect("struc channel");
        c.start(|e| panic!("structured channel: {e}"))
            .expect("start");
        c
    };
    let spin: ShmHandle<[AtomicU64; 32]> = arena
        .construct(std::array::from_fn(|_| AtomicU64::new(0)))
        .expect("spin words");
    arena.send_to(&spin_sock).expect("send the arena");
    (&spin_sock)
        .write_all(spin.lend().as_bytes())
        .expect("send the spin words");
    Client {
        raw,
        shm: MsgChannel::new(chan(shm, config()), Backing::Shm(arena.clone())).with_inline_max(0),
        heap: MsgChannel::new(chan(heap, config()), Backing::Heap),
        struc_shm: structured(struc_shm, Backing::Shm(arena.clone()), config()),
        struc_heap: structured(struc_heap, Backing::Heap, config()),
        struc_kinds: KINDS
            .iter()
            .zip(kinds)
            .map(|((_, k, p), s)| structured(s, Backing::Shm(arena.clone()), kind_config(*k, *p)))
            .collect(),
        shm_queue: MsgChannel::new(
            chan(
                shm_queue,
                kind_config(ChannelKind::ShmQueue, WaitPolicy::default()),
            ),
            Backing::Shm(arena.clone()),
        )
        .with_inline_max(0),
        spin,
        spin_seq: 0,
        sink: MsgChannel::new(chan(sink, config()), Backing::Heap).with_inline_max(0),
        struc_spare: Some(
            struc::Channel::new(chan(spare, config()), Backing::Shm(arena.clone()))
                .expect("struc channel"),
        ),
        modes: SEND_MODES
            .iter()
            .zip(modes)
            .map(|((_, inline), s)| {
                MsgChannel::new(chan(s, config()), Backing::Shm(arena.clone()))
                    .with_inline_max(*inline)
            })
            .collect(),
        server,
    }
}

/// Room for the 1 GiB response copied whole through the socket (1 GiB plus capnp's framing).
fn config() -> ChannelConfig {
    ChannelConfig::new().with_max_frame(2 << 30)
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Client {
    /// One raw 64-byte round trip.
    pub fn raw_rtt(&mut self) {
        let mut buf = [7u8; RAW];
        self.raw.write_all(&buf).expect("raw write");
        self.raw.read_exact(&mut buf).expect("raw read");
    }

    /// One spin ping-pong over shared atomics (the hardware floor: no system call, no copy).
    pub fn spin_rtt(&mut self) {
        self.spin_seq += 1;
        let seq = self.spin_seq;
        self.spin[PING].store(seq, Ordering::Release);
        while self.spin[PONG].load(Ordering::Acquire) != seq {
            std::hint::spin_loop();
        }
    }

    /// One zero-copy round trip of `size` bytes over the `ShmQueue` channel.
    pub fn queue_rtt(&mut self, size: usize) -> u8 {
        round_trip(&mut self.shm_queue, size)
    }

    /// One structured `sync_request` over the `ShmQueue` channel of policy `KINDS[i]`.
    pub fn kind_rtt(&mut self, i: usize) -> i64 {
        sum_request(&mut self.struc_kinds[i])
    }

    /// One request/response round trip for `size` bytes, ending after the response's first
    /// part was touched. Returns the first byte (so the touch is not optimized away).
    pub fn rtt(&mut self, zero_copy: bool, size: usize) -> u8 {
        let chan = if zero_copy {
            &mut self.shm
        } else {
            &mut self.heap
        };
        round_trip(chan, size)
    }

    /// One round trip for `size` bytes over the channel of send mode `i` (see [`SEND_MODES`]).
    pub fn send_mode_rtt(&mut self, i: usize, size: usize) -> u8 {
        round_trip(&mut self.modes[i], size)
    }

    /// One structured `sync_request` (a small `sumRequest`) and its `sumResponse`.
    pub fn struc_rtt(&mut self, zero_copy: bool) -> i64 {
        let chan = if zero_copy {
            &mut self.struc_shm
        } else {
            &mut self.struc_heap
        };
        sum_request(chan)
    }
}

fn round_trip(chan: &mut MsgChannel<body::Owned>, size: usize) -> u8 {
    {
        let mut req = chan.create_msg();
        req.init_root()
            .init_get_cache_req()
            .set_file_name(size.to_string().as_str());
        chan.send(&mut req, None).expect("send request");
        let rsp = chan
            .recv_blocking(None)
            .expect("receive response")
            .expect("a response");
        let root = rsp.root().expect("root");
        let Ok(body::GetCacheRsp(Ok(rsp))) = root.which() else {
            panic!("not a GetCacheRsp");
        };
        let parts = rsp.get_file_parts().expect("parts");
        assert_eq!(parts.len() as usize, size.div_ceil(PART), "part count");
        let first = parts.get(0).get_data().expect("data");
        assert_eq!(first.len(), PART.min(size));
        first[0]
    }
}

fn sum_request(chan: &mut struc::Channel<cool_msg::Owned>) -> i64 {
    {
        let mut req = chan.create_msg();
        let mut terms = req.init_root().init_sum_request().init_terms_to_add(2);
        terms.set(0, 20);
        terms.set(1, 22);
        let rsp = chan.sync_request(&mut req, None, None).expect("response");
        match rsp.root().expect("root").which() {
            Ok(cool_msg::SumResponse(Ok(s))) => s.get_sum(),
            _ => panic!("not a sumResponse"),
        }
    }
}

impl Client {
    /// Sends `msg` (a `GetCacheRsp`, in place if it is arena-backed) to the server, which reads
    /// it, drops it and acknowledges; returns once the ack is here, with the part count and the
    /// first byte the server saw. From then on `msg` is the message's only reference.
    pub fn sink(&mut self, msg: &mut MsgOut<body::Owned>) -> (u32, u8) {
        self.sink.send(msg, None).expect("send to the sink");
        let ack = self
            .sink
            .recv_blocking(None)
            .expect("receive the ack")
            .expect("an ack");
        let root = ack.root().expect("root");
        let Ok(body::GetCacheReq(Ok(req))) = root.which() else {
            panic!("not an ack");
        };
        let text = req.get_file_name().expect("name");
        let text = text.to_str().expect("utf-8");
        let (parts, first) = text.split_once(' ').expect("two numbers");
        (
            parts.parse().expect("part count"),
            first.parse().expect("first byte"),
        )
    }

    /// Times `n` structured `sync_request` round trips over `KINDS[i]`.
    pub fn sample_kind(&mut self, i: usize, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(self.kind_rtt(i));
                t.elapsed()
            })
            .collect()
    }

    /// Times `n` spin ping-pongs.
    pub fn sample_spin(&mut self, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                self.spin_rtt();
                t.elapsed()
            })
            .collect()
    }

    /// Times `n` structured `sync_request` round trips; returns each one's duration.
    pub fn sample_struc(&mut self, zero_copy: bool, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(self.struc_rtt(zero_copy));
                t.elapsed()
            })
            .collect()
    }

    /// Times `n` round trips; returns each one's duration.
    pub fn sample(&mut self, zero_copy: Option<bool>, size: usize, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                match zero_copy {
                    None => self.raw_rtt(),
                    Some(z) => {
                        std::hint::black_box(self.rtt(z, size));
                    }
                }
                t.elapsed()
            })
            .collect()
    }
}
