//! The stress suite: sessions under SIGKILL storms, floods, load and silent connections, across
//! real processes, through the public API only.
//!
//! * `sigkill_storm_of_clients`: clients killed during log-in, mid-request and mid-large-send;
//! * `sigkill_storm_of_servers`: servers killed mid-request and replaced by a new instance;
//! * `flood_to_a_peer_that_does_not_read_{classic,vanilla}`: small messages sent to a peer
//!   that does not read, all accepted, then all delivered in order;
//! * `load_of_sync_requests`: sessions making `sync_request`s at once;
//! * `silent_connections_while_a_client_logs_in`.
//!
//! Each asserts: no hang (every wait is bounded), each session's end reported once, nothing lost
//! or reordered, no growth of fds, threads or RSS in the processes that survive, nothing left in
//! the run dir or `/dev/shm`; and prints its figures (run with `--nocapture`).
//!
//! Every test is `#[ignore]`d (`cargo test` skips them). Run them with
//! `cargo test --release --test stress -- --ignored --nocapture`: bounded sizes by default (what
//! CI runs, a minute or two), the full sizes with `FLOWIPC_STRESS_FULL=1` (a million
//! messages per flood, 64 sessions × 10,000 requests, 1,000 kills).

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::balance::{isolated, status_kib, threads};
use common::session::*;
use common::*;
use flowipc::msg::MsgIn;
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::session::{
    ClientSession, ConnectOptions, Error, Scope, ServerSession, SessionConfig, SessionServer,
    ShmKind,
};
use flowipc::struc::{self, MsgType};

type Cool = cool_msg::Owned;
type Async = struc::AsyncChannel<Cool>;

/// Whether the full sizes were asked for.
fn full() -> bool {
    std::env::var("FLOWIPC_STRESS_FULL").as_deref() == Ok("1")
}

/// `bounded` in the default mode, `full` with `FLOWIPC_STRESS_FULL=1`.
fn size(bounded: u64, full_size: u64) -> u64 {
    if full() {
        full_size
    } else {
        bounded
    }
}

const SHM_ENV: &str = "FLOWIPC_STRESS_SHM";
const N_ENV: &str = "FLOWIPC_STRESS_N";
const BIG_ENV: &str = "FLOWIPC_STRESS_BIG";
/// Bounded waits: anything longer is a hang.
const HANG: Duration = Duration::from_secs(60);

fn config(shm: ShmKind) -> SessionConfig {
    SessionConfig::new().with_shm(shm)
}

fn env_shm() -> ShmKind {
    match std::env::var(SHM_ENV).as_deref() {
        Ok("heap") => ShmKind::Heap,
        _ => ShmKind::Classic,
    }
}

fn env_n() -> u64 {
    std::env::var(N_ENV).unwrap().parse().unwrap()
}

fn ty(name: &str) -> MsgType {
    MsgType::of::<Cool>(name).unwrap()
}

#[test]
#[ignore = "a child process's entry point"]
fn child_entry() {
    match child_role().as_deref() {
        Some("flood_reader") => flood_reader(),
        Some("load_client") => load_client(),
        Some("storm_log_in") => storm_log_in(),
        Some("storm_requester") => storm_requester(),
        Some("storm_large") => storm_large(),
        Some("storm_server") => storm_server(),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
}

/// What a surviving process holds, to compare before and after a storm.
#[derive(Debug)]
struct Footprint {
    fds: usize,
    fd_targets: Vec<String>,
    threads: usize,
    rss_kib: u64,
}

impl Footprint {
    fn now() -> Footprint {
        Footprint {
            fds: common::balance::open_fds(),
            fd_targets: common::balance::fd_targets(),
            threads: threads(),
            rss_kib: status_kib("VmRSS:"),
        }
    }

    /// Asserts no fd or thread more than at `self` (waiting up to 10 s for the library thread
    /// to close what it still holds), and RSS grown by less than `rss_slack_kib`.
    fn assert_no_growth(&self, what: &str, rss_slack_kib: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut now = Footprint::now();
        while (now.fds > self.fds || now.threads > self.threads) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            now = Footprint::now();
        }
        println!(
            "{what}: fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
            self.fds, now.fds, self.threads, now.threads, self.rss_kib, now.rss_kib
        );
        let new: Vec<&String> = now
            .fd_targets
            .iter()
            .filter(|t| !self.fd_targets.contains(t))
            .collect();
        assert!(
            now.fds <= self.fds,
            "{what}: fds grew: {self:?} -> {now:?}, new: {new:?}"
        );
        assert!(
            now.threads <= self.threads,
            "{what}: threads grew: {self:?} -> {now:?}"
        );
        assert!(
            now.rss_kib < self.rss_kib + rss_slack_kib,
            "{what}: RSS grew by {} KiB",
            now.rss_kib.saturating_sub(self.rss_kib)
        );
    }
}

/// The error handler of a session that counts its calls (the end must be reported once).
fn counting(count: &Arc<AtomicUsize>, last: &Arc<Mutex<Option<Error>>>) -> impl FnOnce(Error) {
    let (count, last) = (count.clone(), last.clone());
    move |e| {
        count.fetch_add(1, Ordering::SeqCst);
        *last.lock().unwrap() = Some(e);
    }
}

/// Waits (bounded) until `count` is at least 1, then a little more, and asserts it is 1.
fn reported_once(count: &AtomicUsize, what: &str) {
    let deadline = Instant::now() + HANG;
    while count.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "{what}: the end was never reported"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "{what}: reported more than once"
    );
}

/// A started `AsyncChannel` over a session's channel that answers every `sumRequest` with the
/// sum of its terms and drops every other message.
fn answering(s: &flowipc::session::Session, chan: flowipc::transport::Channel) -> Async {
    let c = Async::new(s.structured(chan).unwrap()).unwrap();
    c.expect_msgs(ty("sumRequest"), |chan, req| {
        // (The peer may be gone: its end is the session's to report.)
        let _ = common::msgs::answer_sum(chan, req);
    })
    .unwrap();
    c.expect_msgs(ty("blob"), |_, _| {}).unwrap();
    c.start(|_| {}).unwrap();
    c
}

/// One `sumRequest` of `[i, 2i]`; `Ok(true)` if the answer is `3i`.
fn sum_request(c: &Async, i: i64) -> Result<bool, struc::Error> {
    let mut req = c.create_msg();
    let mut terms = req.init_root().init_sum_request().init_terms_to_add(2);
    terms.set(0, i);
    terms.set(1, 2 * i);
    let rsp = c.sync_request(&mut req, None, Some(HANG))?;
    Ok(matches!(
        rsp.root().map_err(struc::Error::Decode)?.which(),
        Ok(cool_msg::SumResponse(Ok(s))) if s.get_sum() == 3 * i
    ))
}

/// A connected client session of app `cli` whose end is counted.
fn client(
    u: &Universe,
    cfg: SessionConfig,
    count: &Arc<AtomicUsize>,
    last: &Arc<Mutex<Option<Error>>>,
) -> ClientSession {
    let mut s = ClientSession::new(&u.cli, &u.srv, counting(count, last)).config(cfg);
    connect(&mut s, ConnectOptions::new());
    s
}

/// A server session with its end counted, whose passive-open handler hands the channels over.
fn serve(
    mut s: ServerSession,
    count: &Arc<AtomicUsize>,
    last: &Arc<Mutex<Option<Error>>>,
) -> (ServerSession, mpsc::Receiver<flowipc::transport::Channel>) {
    let (tx, rx) = mpsc::channel();
    s.init_handlers_with_passive_open(counting(count, last), move |ch, _| {
        let _ = tx.send(ch);
    })
    .unwrap();
    (s, rx)
}

// -- the flood ----------------------------------------------------------------------------------

#[test]
#[ignore = "stress: cargo test --release --test stress -- --ignored"]
fn flood_to_a_peer_that_does_not_read_classic() {
    isolated("flood_to_a_peer_that_does_not_read_classic", || {
        flood(ShmKind::Classic)
    });
}

#[test]
#[ignore = "stress: cargo test --release --test stress -- --ignored"]
fn flood_to_a_peer_that_does_not_read_vanilla() {
    isolated("flood_to_a_peer_that_does_not_read_vanilla", || {
        flood(ShmKind::Heap)
    });
}

/// The server sends `n` small messages (`helloThere`, numbered) over a session channel to a
/// client that does not read until told: every `send` must be accepted; then the client reads
/// them all, in order. Reports the sender's memory per queued message: shared (its RssShmem
/// and the session arena's blocks) and private (its RssAnon), as deltas over the flood.
fn flood(shm: ShmKind) {
    let n = size(100_000, 1_000_000);
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let server = SessionServer::builder(&u.srv, &u.clients)
        .config(config(shm))
        .build()
        .unwrap();
    let shm_name = if shm == ShmKind::Heap {
        "heap"
    } else {
        "classic"
    };
    let n_text = n.to_string();
    let mut env = dir.env().to_vec();
    env.push((SHM_ENV, shm_name.as_ref()));
    env.push((N_ENV, n_text.as_ref()));
    let mut cli = spawn_env("flood_reader", &env);
    let (count, last) = Default::default();
    let (s, chans) = serve(server.accept(T).unwrap(), &count, &last);
    let c = Async::new(s.structured(chans.recv_timeout(HANG).unwrap()).unwrap()).unwrap();
    c.start(|_| {}).unwrap();
    assert_eq!(recv_u64(&mut cli.sock), 1, "the reader is ready");
    let blocks = || {
        s.arena(Scope::Session)
            .map_or(0, |a| a.stats().blocks_in_use)
    };
    let (anon0, shmem0, blocks0) = (status_kib("RssAnon:"), status_kib("RssShmem:"), blocks());
    let t = Instant::now();
    let mut words = 0;
    for i in 0..n {
        let mut m = c.create_msg();
        let mut h = m.init_root().init_hello_there();
        h.set_num(i as i64);
        h.set_greeting("flood");
        words = m.size_in_words();
        c.send(&mut m, None)
            .unwrap_or_else(|e| panic!("send {i} of {n} refused: {e}"));
    }
    let sent_in = t.elapsed();
    let anon = status_kib("RssAnon:").saturating_sub(anon0) * 1024;
    let shmem = status_kib("RssShmem:").saturating_sub(shmem0) * 1024;
    let held_blocks = blocks() - blocks0;
    println!(
        "flood ({shm:?}): {n} messages of {} bytes accepted in {sent_in:?} by a peer that does \
         not read; per queued message: {:.1} bytes private (RssAnon), {:.1} bytes shared \
         (RssShmem), {:.4} session-arena blocks",
        words * 8,
        anon as f64 / n as f64,
        shmem as f64 / n as f64,
        held_blocks as f64 / n as f64
    );
    assert_eq!(held_blocks, 0, "small messages hold no arena block");
    assert!(
        anon / n < 512,
        "{} bytes of private memory per queued message",
        anon / n
    );
    let t = Instant::now();
    send_u64(&mut cli.sock, 2);
    let (got, in_order) = (recv_u64(&mut cli.sock), recv_u64(&mut cli.sock));
    println!(
        "flood ({shm:?}): {got} delivered in {:?}, {}",
        t.elapsed(),
        if in_order == 1 {
            "in order"
        } else {
            "OUT OF ORDER"
        }
    );
    assert_eq!((got, in_order), (n, 1), "lost or reordered");
    assert!(!s.is_hosed());
    send_u64(&mut cli.sock, 3);
    wait_ok(cli);
    reported_once(&count, "the flood's server session");
    drop((c, s, server));
}

/// The flood's reader: opens a channel, says so, reads nothing until told, then reads every
/// message and reports how many came and whether they came in order.
fn flood_reader() {
    let mut ctl = child_socket();
    let u = universe(&env_dir());
    let n = env_n();
    let (count, last) = Default::default();
    let s = client(&u, config(env_shm()), &count, &last);
    let mut c: struc::Channel<Cool> = s.structured(s.open_channel(None).unwrap()).unwrap();
    c.start(|e| panic!("flood reader: {e}")).unwrap();
    send_u64(&mut ctl, 1);
    assert_eq!(recv_u64(&mut ctl), 2, "go");
    let next = Arc::new(AtomicU64::new(0));
    let in_order = Arc::new(AtomicU64::new(1));
    let (nx, ok) = (next.clone(), in_order.clone());
    c.expect_msgs(ty("helloThere"), move |_, m: MsgIn<Cool>| {
        let i = nx.fetch_add(1, Ordering::Relaxed);
        let num = match m.root().unwrap().which().unwrap() {
            cool_msg::HelloThere(Ok(h)) => h.get_num(),
            _ => -1,
        };
        if num != i as i64 {
            ok.store(0, Ordering::Relaxed);
        }
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while next.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        c.run_for(Duration::from_millis(20)).unwrap();
    }
    send_u64(&mut ctl, next.load(Ordering::Relaxed));
    send_u64(&mut ctl, in_order.load(Ordering::Relaxed));
    assert_eq!(recv_u64(&mut ctl), 3, "the server is done");
}

// -- load ---------------------------------------------------------------------------------------

/// 64 sessions (8 client processes of 8 sessions, one thread each) make `sync_request`s at
/// once; every answer must be right, no error; the server's fds and threads are back where
/// they were, and every session's end was reported once.
#[test]
#[ignore = "stress: cargo test --release --test stress -- --ignored"]
fn load_of_sync_requests() {
    isolated("load_of_sync_requests", || {
        let (procs, n) = (8, size(500, 10_000));
        let dir = RunDir::new();
        let u = universe(&dir.0);
        let server = SessionServer::builder(&u.srv, &u.clients).build().unwrap();
        // A small round first: what the server makes once (its library thread, the app's
        // arena and what settling a dead client opens) is there before the baseline.
        load_round(&server, &dir, 1, 10);
        let before = Footprint::now();
        let (answered, wrong, errors, took) = load_round(&server, &dir, procs, n);
        println!(
            "load: {} sessions x {n} sync_requests: {answered} answered, {wrong} wrong, \
             {errors} errors in {took:?} ({:.0} requests/s)",
            procs * LOAD_SESSIONS,
            answered as f64 / took.as_secs_f64()
        );
        assert_eq!((answered, wrong, errors), (procs * LOAD_SESSIONS * n, 0, 0));
        before.assert_no_growth("load: the server", 64 << 10);
        drop(server);
    });
}

/// Sessions per load client process.
const LOAD_SESSIONS: u64 = 8;

/// `procs` client processes of [`LOAD_SESSIONS`] sessions make `n` `sync_request`s each, all
/// at once, answered here; once they are gone, each session's end was reported once (the peer
/// gone). Returns (answered right, answered wrong, errors, time from go to the last report).
fn load_round(
    server: &SessionServer,
    dir: &RunDir,
    procs: u64,
    n: u64,
) -> (u64, u64, u64, Duration) {
    let n_text = n.to_string();
    let mut env = dir.env().to_vec();
    env.push((N_ENV, n_text.as_ref()));
    let mut clients: Vec<Peer> = (0..procs).map(|_| spawn_env("load_client", &env)).collect();
    let mut sessions = Vec::new();
    let mut chans = Vec::new();
    for _ in 0..procs * LOAD_SESSIONS {
        let (count, last) = (Arc::default(), Arc::default());
        let (s, rx) = serve(server.accept(T).unwrap(), &count, &last);
        chans.push(answering(&s, rx.recv_timeout(HANG).unwrap()));
        sessions.push((s, count, last));
    }
    let t = Instant::now();
    for c in clients.iter_mut() {
        send_u64(&mut c.sock, 1); // go
    }
    let (mut answered, mut wrong, mut errors) = (0, 0, 0);
    for c in clients.iter_mut() {
        answered += recv_u64(&mut c.sock);
        wrong += recv_u64(&mut c.sock);
        errors += recv_u64(&mut c.sock);
    }
    let took = t.elapsed();
    for c in clients {
        wait_ok(c);
    }
    for (i, (s, count, last)) in sessions.iter().enumerate() {
        reported_once(count, &format!("session {i}"));
        assert!(
            matches!(*last.lock().unwrap(), Some(Error::PeerGone)),
            "session {i}: {:?}",
            last.lock().unwrap()
        );
        assert!(s.is_hosed());
    }
    drop((chans, sessions));
    (answered, wrong, errors, took)
}

/// Eight sessions on eight threads; on the parent's word, each makes `n` `sync_request`s. Then
/// reports (answered, wrong, errors).
fn load_client() {
    let mut ctl = child_socket();
    let u = universe(&env_dir());
    let n = env_n();
    let chans: Vec<_> = (0..LOAD_SESSIONS)
        .map(|_| client_with_channel(&u))
        .collect();
    assert_eq!(recv_u64(&mut ctl), 1, "go");
    let totals = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    on_threads(chans.len() as u64, |t| {
        let c = &chans[t as usize].1;
        for i in 0..n {
            match sum_request(c, (t * n + i) as i64) {
                Ok(true) => totals[0].fetch_add(1, Ordering::Relaxed),
                Ok(false) => totals[1].fetch_add(1, Ordering::Relaxed),
                Err(_) => totals[2].fetch_add(1, Ordering::Relaxed),
            };
        }
    });
    for t in &totals {
        send_u64(&mut ctl, t.load(Ordering::Relaxed));
    }
}

// -- silent connections -------------------------------------------------------------------------

/// 1,000 connections more than the server's pending log-ins that never log in, held while a
/// client logs in: it gets its session, the oldest silent ones are dropped to make room, the
/// server's threads do not grow (see `log_in_among_silent`).
#[test]
#[ignore = "stress: cargo test --release --test stress -- --ignored"]
fn silent_connections_while_a_client_logs_in() {
    isolated("silent_connections_while_a_client_logs_in", || {
        // Both ends of every connection are in this process: room for them.
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(16384), hard).unwrap();
        let dir = RunDir::new();
        let u = universe(&dir.0);
        let server = SessionServer::builder(&u.srv, &u.clients).build().unwrap();
        let client = ClientSession::new(&u.cli, &u.srv, |_| {});
        let t = Instant::now();
        let timeouts = log_in_among_silent(&u, &server, client, 1000);
        println!(
            "silent connections: {} held while a client logged in ({:?}): it got its session, \
             {timeouts} were dropped to make room, no thread more",
            flowipc::session::MAX_PENDING_LOG_INS + 1000,
            t.elapsed()
        );
        drop(server);
    });
}

// -- the SIGKILL storms -------------------------------------------------------------------------

/// Where a storm client stops to be killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// Killed while it logs in.
    LogIn,
    /// Killed with `sync_request`s in flight.
    Request,
    /// Killed while it sends large messages.
    LargeSend,
}

/// Clients killed during log-in, mid-request and mid-large-send, one after another: the server
/// (this process) sees each session's end once (or a log-in that failed), keeps serving, and
/// holds no more fds, threads or RSS after the storm than after the first few kills.
#[test]
#[ignore = "stress: cargo test --release --test stress -- --ignored"]
fn sigkill_storm_of_clients() {
    isolated("sigkill_storm_of_clients", || {
        let trials = size(150, 750);
        let big = size(8 << 20, 64 << 20);
        let dir = RunDir::new();
        let u = universe(&dir.0);
        let server = Arc::new(SessionServer::builder(&u.srv, &u.clients).build().unwrap());
        common::balance::start_library_thread();
        let big_text = big.to_string();
        let mut env = dir.env().to_vec();
        env.push((BIG_ENV, big_text.as_ref()));
        let mut rng = Rng::new(0x5709);
        let mut kinds = [0u64; 3];
        let (mut sessions, mut failed_log_ins) = (0, 0);
        let mut baseline = None;
        let t = Instant::now();
        for trial in 0..trials {
            if trial == 6 {
                baseline = Some(Footprint::now());
            }
            let kind = [Kill::LogIn, Kill::Request, Kill::LargeSend][(trial % 3) as usize];
            kinds[(trial % 3) as usize] += 1;
            let role = match kind {
                Kill::LogIn => "storm_log_in",
                Kill::Request => "storm_requester",
                Kill::LargeSend => "storm_large",
            };
            let mut cli = spawn_env(role, &env);
            // Accepting on a thread of its own until the client is dead and nothing more comes
            // (the log-in client logs in again and again); it also serves each session's
            // channel while the client works.
            let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (srv, k2) = (server.clone(), killed.clone());
            let accepting = std::thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    let dead = k2.load(Ordering::SeqCst);
                    let s =
                        match srv.accept(Some(Duration::from_millis(if dead { 50 } else { 20 }))) {
                            Err(Error::AcceptTimeout) if dead => return got,
                            Err(Error::AcceptTimeout) => continue,
                            Err(e) => {
                                got.push(Err(e));
                                continue;
                            }
                            Ok(s) => s,
                        };
                    let (count, last): (Arc<AtomicUsize>, Arc<Mutex<Option<Error>>>) =
                        Default::default();
                    let (s, chans) = serve(s, &count, &last);
                    let mut chan = None;
                    while kind != Kill::LogIn && chan.is_none() && !k2.load(Ordering::SeqCst) {
                        if let Ok(ch) = chans.recv_timeout(Duration::from_millis(5)) {
                            chan = Some(answering(&s, ch));
                        }
                    }
                    got.push(Ok((s, chan, count, last)));
                }
            });
            assert_eq!(
                recv_u64(&mut cli.sock),
                1,
                "trial {trial}: the client is at its point"
            );
            // Somewhere in the next few ms of its work.
            std::thread::sleep(Duration::from_micros(rng.below(20_000)));
            cli.child.kill().unwrap();
            cli.child.wait().unwrap();
            killed.store(true, Ordering::SeqCst);
            for r in within(70, "accept", move || accepting.join().unwrap()) {
                match r {
                    Ok((s, chan, count, last)) => {
                        sessions += 1;
                        reported_once(&count, &format!("trial {trial} ({kind:?})"));
                        let e = last.lock().unwrap().take();
                        assert!(
                            matches!(e, Some(Error::PeerGone)),
                            "trial {trial} ({kind:?}): {e:?}"
                        );
                        drop((chan, s));
                    }
                    // Killed while logging in: that log-in's failure, reported to one accept.
                    Err(e) => {
                        assert_eq!(kind, Kill::LogIn, "trial {trial}: {e:?}");
                        failed_log_ins += 1;
                    }
                }
            }
        }
        println!(
            "SIGKILL storm of clients: {trials} kills in {:?} (log-in {}, mid-request {}, \
             mid-large-send {} of {big} bytes): {sessions} sessions ended once each with \
             PeerGone, {failed_log_ins} log-ins cut by the kill reported once each",
            t.elapsed(),
            kinds[0],
            kinds[1],
            kinds[2]
        );
        // The server still serves.
        let c = client(
            &u,
            SessionConfig::new(),
            &Default::default(),
            &Default::default(),
        );
        let (s, chans) = serve(
            server.accept(T).unwrap(),
            &Default::default(),
            &Default::default(),
        );
        let mine = Async::new(c.structured(c.open_channel(None).unwrap()).unwrap()).unwrap();
        mine.start(|_| {}).unwrap();
        let theirs = answering(&s, chans.recv_timeout(HANG).unwrap());
        assert!(sum_request(&mine, 7).unwrap());
        drop((mine, theirs, s, c));
        baseline
            .expect("a baseline")
            .assert_no_growth("SIGKILL storm: the server", 32 << 10);
        drop(server);
    });
}

/// Says it starts (1), then logs in, ends the session and logs in again, until killed: a
/// kill lands in a log-in most of the time.
fn storm_log_in() {
    let mut ctl = child_socket();
    let u = universe(&env_dir());
    send_u64(&mut ctl, 1);
    loop {
        let mut s = ClientSession::new(&u.cli, &u.srv, |_| {});
        connect(&mut s, ConnectOptions::new());
    }
}

/// In a child: a client session of app `cli` (its end counted nowhere) with a channel it
/// opened, structured and started.
fn client_with_channel(u: &Universe) -> (ClientSession, Async) {
    let s = client(
        u,
        SessionConfig::new(),
        &Default::default(),
        &Default::default(),
    );
    let c = Async::new(s.structured(s.open_channel(None).unwrap()).unwrap()).unwrap();
    c.start(|_| {}).unwrap();
    (s, c)
}

/// Logs in, opens a channel and makes `sync_request`s until killed (says 1 before the first).
fn storm_requester() {
    let mut ctl = child_socket();
    let (_s, c) = client_with_channel(&universe(&env_dir()));
    send_u64(&mut ctl, 1);
    for i in 0.. {
        assert!(sum_request(&c, i).unwrap());
    }
}

/// Logs in, opens a channel and sends large messages until killed (says 1 before the first).
fn storm_large() {
    let mut ctl = child_socket();
    let u = universe(&env_dir());
    let big: u64 = std::env::var(BIG_ENV).unwrap().parse().unwrap();
    let (_s, c) = client_with_channel(&u);
    send_u64(&mut ctl, 1);
    loop {
        let mut m = c.create_msg();
        m.init_root()
            .init_blob()
            .init_chunks(1)
            .get(0)
            .init_data(big as u32)
            .fill(7);
        c.send(&mut m, None).unwrap();
    }
}

/// Servers killed mid-request and replaced: this process is the client. Each trial starts a
/// server process, connects (retrying while it is absent), makes `sync_request`s on a thread
/// and kills the server in the middle; the in-flight request fails (no hang), the session's
/// end is reported once, and a new server takes over the run dir. The client process holds no
/// more fds, threads or RSS at the end than after the first few trials.
#[test]
#[ignore = "stress: cargo test --release --test stress -- --ignored"]
fn sigkill_storm_of_servers() {
    isolated("sigkill_storm_of_servers", || {
        let trials = size(50, 250);
        let dir = RunDir::new();
        let u = universe(&dir.0);
        common::balance::start_library_thread();
        let mut rng = Rng::new(0x5e4f);
        let mut baseline = None;
        let mut takeovers = Vec::new();
        let mut killed_at = None;
        let t = Instant::now();
        for trial in 0..=trials {
            if trial == 5 {
                baseline = Some(Footprint::now());
            }
            let mut srv = spawn_env("storm_server", &dir.env());
            let (count, last): (Arc<AtomicUsize>, Arc<Mutex<Option<Error>>>) = Default::default();
            let c = client(&u, SessionConfig::new(), &count, &last);
            if let Some(k) = killed_at.take() {
                takeovers.push(Instant::now().duration_since(k));
            }
            let chan =
                Arc::new(Async::new(c.structured(c.open_channel(None).unwrap()).unwrap()).unwrap());
            chan.start(|_| {}).unwrap();
            assert!(
                sum_request(&chan, 1).unwrap(),
                "trial {trial}: the first answer"
            );
            if trial == trials {
                // The last server ends normally (its files go with it).
                send_u64(&mut srv.sock, 9);
                wait_ok(srv);
                reported_once(&count, "the last session");
                drop((chan, c));
                break;
            }
            let ch = chan.clone();
            let requests = std::thread::spawn(move || {
                let mut answered = 0u64;
                for i in 0.. {
                    match sum_request(&ch, i) {
                        Ok(true) => answered += 1,
                        Ok(false) => panic!("a wrong answer"),
                        Err(_) => break,
                    }
                }
                answered
            });
            std::thread::sleep(Duration::from_micros(rng.below(20_000)));
            srv.child.kill().unwrap();
            killed_at = Some(Instant::now());
            srv.child.wait().unwrap();
            within(70, "the in-flight sync_request", move || {
                requests.join().unwrap()
            });
            reported_once(&count, &format!("trial {trial}"));
            let e = last.lock().unwrap().take();
            assert!(matches!(e, Some(Error::PeerGone)), "trial {trial}: {e:?}");
            drop((chan, c));
        }
        takeovers.sort();
        println!(
            "SIGKILL storm of servers: {trials} servers killed mid-request in {:?}; each \
             session's end reported once; a new server took over every time (kill to new \
             session: median {:?}, max {:?})",
            t.elapsed(),
            takeovers[takeovers.len() / 2],
            takeovers.last().unwrap()
        );
        baseline
            .expect("a baseline")
            .assert_no_growth("SIGKILL storm: the client", 32 << 10);
    });
}

/// A server: serves sessions whose channels answer `sumRequest`s, until killed or told to end
/// (9 on its control socket).
fn storm_server() {
    let mut ctl = child_socket();
    let u = universe(&env_dir());
    let server = Arc::new(SessionServer::builder(&u.srv, &u.clients).build().unwrap());
    let (stop_tx, stop_rx) = mpsc::channel();
    let srv = server.clone();
    let serving = std::thread::spawn(move || {
        let mut kept = Vec::new();
        while stop_rx.try_recv().is_err() {
            let Ok(s) = srv.accept(Some(Duration::from_millis(50))) else {
                continue;
            };
            let (s, chans) = serve(s, &Default::default(), &Default::default());
            let chan = chans.recv_timeout(HANG).ok().map(|ch| answering(&s, ch));
            kept.push((s, chan));
        }
        drop(kept);
    });
    let mut word = [0u8; 8];
    let _ = ctl.read_exact(&mut word);
    let _ = stop_tx.send(());
    serving.join().unwrap();
    drop(server);
}
