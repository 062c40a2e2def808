//! What a killed client held is given back: clients that lend objects to the server (in the
//! app-scope and the session-scope arenas), borrow the server's, hold, clone and drop them, are
//! SIGKILLed at random points of that work, one after another. Afterwards the app-scope arena's
//! live block count is back to what it was before the first of them, and what the server still
//! holds of theirs was never freed under it.
//!
//! Each client is killed at a random step of a random round (after making an object, after
//! cloning it, after lending it, after sending the blob or keeping it, after dropping old ones,
//! after borrowing the server's lends), stopped there in a read, while the server still works
//! through what it sent. A kill at a random *instant* can also land inside the few instructions
//! between an allocator step or a reference-count step and its record, which leaks that one
//! block (see `shm::ledger`): `FLOWIPC_KILLS_ANYTIME=1` kills at random instants instead and
//! reports the residue rather than requiring none.
//!
//! `FLOWIPC_KILLS` sets the number of clients (default 200); the test prints the arena's usage
//! curve over the kills (run with `--nocapture` to see it).

mod common;

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::session::*;
use common::*;
use flowipc::msg::MsgIn;
use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
use flowipc::session::{ClientSession, ConnectOptions, Error, Scope, SessionServer};
use flowipc::shm::{self, LendBlob, ShmHandle};
use flowipc::struc;

type Cool = struc::Channel<cool_msg::Owned>;
type Obj = [u64; 2];
const SEED_ENV: &str = "FLOWIPC_KILL_SEED";
/// Where a client stops to be killed: round and step, as `round * STEPS + step`; absent: never.
const STOP_ENV: &str = "FLOWIPC_KILL_AT";
const STEPS: u64 = 6;
/// The first word of every object a client makes: its seed is in the low bits.
const CLIENT_MARK: u64 = 0xC11E_0000_0000_0000;
const SERVER_VALUE: Obj = [0x5E4F, 0x5E4F];

#[test]
#[ignore = "a child process's entry point"]
fn child_entry() {
    match child_role().as_deref() {
        Some("cli_lender") => cli_lender(
            std::env::var(SEED_ENV).unwrap().parse().unwrap(),
            std::env::var(STOP_ENV).ok().map(|v| v.parse().unwrap()),
        ),
        Some("cli_quiet") => cli_quiet(),
        Some("cli_keeps") => cli_keeps(),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
}

fn blob_msg(c: &Cool, blob: &LendBlob) -> flowipc::msg::MsgOut<cool_msg::Owned> {
    let mut m = c.create_msg();
    m.init_root()
        .init_blob()
        .init_chunks(1)
        .get(0)
        .set_data(blob.as_bytes());
    m
}

fn blob_of(m: &MsgIn<cool_msg::Owned>) -> LendBlob {
    let cool_msg::Blob(Ok(b)) = m.which().unwrap() else {
        panic!("not a blob");
    };
    LendBlob::from_bytes(b.get_chunks().unwrap().get(0).get_data().unwrap()).unwrap()
}

/// Logs in and out (the app-scope arena is made at the first log-in).
fn cli_quiet() {
    let mut ctl = child_socket();
    let u = universe(&env_dir());
    let mut s = ClientSession::new(&u.cli, &u.srv, |_| {});
    connect(&mut s, ConnectOptions::new());
    send_u64(&mut ctl, 1);
    assert_eq!(recv_u64(&mut ctl), 2);
}

/// Makes an object in the app-scope arena, lends it to the server, ends its session and keeps
/// the object; once the server saw the end (2), checks it and drops it.
fn cli_keeps() {
    let mut ctl = child_socket();
    let u = universe(&env_dir());
    let mut s = ClientSession::new(&u.cli, &u.srv, |_| {});
    connect(&mut s, ConnectOptions::new());
    let h: ShmHandle<Obj> = s.arena(Scope::App).unwrap().construct([7, 7]).unwrap();
    let blob = s.lend_object(&h).unwrap();
    ctl.write_all(blob.as_bytes()).unwrap();
    assert_eq!(recv_u64(&mut ctl), 1, "borrowed");
    drop(s);
    send_u64(&mut ctl, 1);
    assert_eq!(recv_u64(&mut ctl), 2, "the server saw the end");
    assert_eq!(*h, [7, 7]);
    assert_eq!(h.ref_count(), 2, "the server's and ours");
    drop(h);
    send_u64(&mut ctl, 3);
}

/// Lends objects to the server until killed: each round makes one (three in four in the
/// app-scope arena, else in the session's), sometimes keeps a clone, lends it (one lend in seven
/// is never sent), keeps the last few, and borrows half of what the server lent it. With `stop`,
/// says so at that step and waits there to be killed.
fn cli_lender(seed: u64, stop: Option<u64>) {
    let mut ctl = child_socket();
    let u = universe(&env_dir());
    let mut s = ClientSession::new(&u.cli, &u.srv, |_| {});
    connect(&mut s, ConnectOptions::new());
    let mut c: Cool = s.structured(s.open_channel(None).unwrap()).unwrap();
    c.start(|_| {}).unwrap();
    let app = s.arena(Scope::App).unwrap().clone();
    let sess = s.arena(Scope::Session).unwrap().clone();
    send_u64(&mut ctl, 1);
    let mut mine: VecDeque<ShmHandle<Obj>> = VecDeque::new();
    let mut unsent = Vec::new();
    let mut borrowed: VecDeque<ShmHandle<Obj>> = VecDeque::new();
    let mut rng = Rng::new(seed);
    let mut at = |round: u64, step: u64| {
        if stop == Some(round * STEPS + step) {
            send_u64(&mut ctl, 2);
            let _ = recv_u64(&mut ctl); // killed in this read
        }
    };
    for i in 0u64.. {
        let arena = if i % 4 == 3 { &sess } else { &app };
        let h: ShmHandle<Obj> = arena.construct([CLIENT_MARK | seed, i]).unwrap();
        at(i, 0);
        if rng.below(3) == 0 {
            mine.push_back(h.clone());
        }
        at(i, 1);
        let blob = s.lend_object(&h).unwrap();
        at(i, 2);
        if rng.below(7) == 0 {
            unsent.push(blob);
        } else if c.send(&mut blob_msg(&c, &blob), None).is_err() {
            break;
        }
        at(i, 3);
        mine.push_back(h);
        while mine.len() > 8 {
            mine.pop_front();
        }
        at(i, 4);
        while let Ok(Some(m)) = c.take_cached(CoolMsgKind::Blob) {
            if rng.below(2) == 0 {
                borrowed.push_back(s.borrow_object(&blob_of(&m)).unwrap());
            }
        }
        while borrowed.len() > 4 {
            borrowed.pop_front();
        }
        at(i, 5);
        if c.run_for(Duration::from_micros(300)).is_err() {
            break;
        }
    }
    until_parent_gone(&mut ctl);
}

/// The server's side of one lender: borrows what comes, keeps one in four for good (`held`,
/// with the value it had), lends its own object back for each. Until the session ends.
struct Serving<'a> {
    c: Cool,
    s: &'a flowipc::session::ServerSession,
    own: &'a ShmHandle<Obj>,
    held: &'a mut Vec<(ShmHandle<Obj>, Obj)>,
    rng: &'a mut Rng,
}

impl Serving<'_> {
    /// Serves for `d`, or until the channel fails; false once it did.
    fn serve_for(&mut self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            match self.c.take_cached(CoolMsgKind::Blob) {
                Ok(Some(m)) => {
                    let blob = blob_of(&m);
                    match self.s.borrow_object::<Obj>(&blob) {
                        Ok(h) => {
                            assert_eq!(h[0] & CLIENT_MARK, CLIENT_MARK, "a client's object");
                            if self.rng.below(4) == 0 {
                                let v = *h;
                                self.held.push((h, v));
                            }
                        }
                        // The client is dead and its lends were given back already.
                        Err(Error::Shm(shm::Error::Stale)) => {}
                        Err(e) => panic!("borrow: {e:?}"),
                    }
                    if let Ok(back) = self.s.lend_object(self.own) {
                        let mut m = blob_msg(&self.c, &back);
                        if self.c.send(&mut m, None).is_err() {
                            // Never sent: give the lend back ourselves.
                            let _ = self.s.arena(Scope::App).unwrap().release_blob(&back);
                        }
                    }
                }
                Ok(None) => {}
                Err(_) => return false,
            }
            if Instant::now() >= end {
                return true;
            }
            if self.c.run_for(Duration::from_micros(500)).is_err() {
                return false;
            }
        }
    }
}

/// A client that ends its session alive keeps what it holds: the server gives nothing back at
/// that end (the client closed its ledger first), and the client's object lives on, until both
/// drop it.
#[test]
fn a_client_that_ends_its_session_alive_keeps_what_it_holds() {
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let server = SessionServer::new(&u.srv, &u.clients).unwrap();
    let mut cli = spawn_env("cli_keeps", &dir.env());
    let mut s = server.accept(T).unwrap();
    let (etx, errors) = mpsc::channel();
    s.init_handlers(move |e| etx.send(e).unwrap()).unwrap();
    let mut b = [0u8; LendBlob::LEN];
    std::io::Read::read_exact(&mut cli.sock, &mut b).unwrap();
    let theirs: ShmHandle<Obj> = s.borrow_object(&LendBlob::from_bytes(&b).unwrap()).unwrap();
    send_u64(&mut cli.sock, 1);
    assert_eq!(recv_u64(&mut cli.sock), 1, "the client ended its session");
    let e = errors.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(matches!(e, Error::PeerGone), "{e:?}");
    assert_eq!(
        theirs.ref_count(),
        2,
        "nothing given back for a live client"
    );
    send_u64(&mut cli.sock, 2);
    assert_eq!(recv_u64(&mut cli.sock), 3);
    wait_ok(cli);
    assert_eq!(theirs.ref_count(), 1, "the client dropped its own");
    assert_eq!(*theirs, [7, 7]);
    let app = server.app_arena("cli").unwrap();
    drop((theirs, s));
    assert_eq!(app.stats().blocks_in_use, 0);
}

#[test]
fn killed_lenders_give_back_all_they_held_in_the_app_arena() {
    let kills: u64 = std::env::var("FLOWIPC_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let anytime = std::env::var_os("FLOWIPC_KILLS_ANYTIME").is_some();
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let server = SessionServer::new(&u.srv, &u.clients).unwrap();

    // A first client logs in and out: the app-scope arena exists from then on.
    let mut quiet = spawn_env("cli_quiet", &dir.env());
    let mut s = server.accept(T).unwrap();
    let (etx, errors) = mpsc::channel();
    s.init_handlers(move |e| etx.send(e).unwrap()).unwrap();
    assert_eq!(recv_u64(&mut quiet.sock), 1);
    send_u64(&mut quiet.sock, 2);
    wait_ok(quiet);
    assert!(matches!(
        errors.recv_timeout(Duration::from_secs(30)),
        Ok(Error::PeerGone)
    ));
    drop(s);
    let app = server.app_arena("cli").unwrap();
    let baseline = app.stats().blocks_in_use;

    let own: ShmHandle<Obj> = app.construct(SERVER_VALUE).unwrap();
    let mut held: Vec<(ShmHandle<Obj>, Obj)> = Vec::new();
    let mut rng = Rng::new(17);
    let mut curve = Vec::new();
    let started = Instant::now();
    for k in 0..kills {
        let mut env = dir.env().to_vec();
        let seed = k.to_string();
        env.push((SEED_ENV, std::ffi::OsStr::new(&seed)));
        // A random step of one of the first 40 rounds (or, anytime, a random instant of them).
        let stop = (rng.below(40) * STEPS + rng.below(STEPS)).to_string();
        if !anytime {
            env.push((STOP_ENV, std::ffi::OsStr::new(&stop)));
        }
        let mut cli = spawn_env("cli_lender", &env);
        let mut s = server.accept(T).unwrap();
        let (etx, errors) = mpsc::channel();
        let (otx, chans) = mpsc::channel();
        s.init_handlers_with_passive_open(
            move |e| etx.send(e).unwrap(),
            move |ch, _| {
                let _ = otx.send(ch);
            },
        )
        .unwrap();
        let mut c: Cool = s
            .structured(chans.recv_timeout(Duration::from_secs(30)).unwrap())
            .unwrap();
        c.start(|_| {}).unwrap();
        assert_eq!(recv_u64(&mut cli.sock), 1, "client {k} logged in");
        let mut serving = Serving {
            c,
            s: &s,
            own: &own,
            held: &mut held,
            rng: &mut rng,
        };
        if anytime {
            // A random instant of the client's work: from at once to some 40 of its rounds in.
            let work = Duration::from_micros(serving.rng.below(14_000));
            serving.serve_for(work);
        } else {
            // Until the client stops at its step (serving meanwhile: it may wait on us).
            cli.sock.set_nonblocking(true).unwrap();
            let mut b = [0u8; 8];
            loop {
                match std::io::Read::read_exact(&mut cli.sock, &mut b) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("client {k}: {e}"),
                }
                assert!(
                    serving.serve_for(Duration::from_micros(500)),
                    "client {k} failed"
                );
            }
            assert_eq!(u64::from_le_bytes(b), 2, "client {k} stopped");
            // Now and then the server is still catching up with what the client sent.
            let work = Duration::from_micros(serving.rng.below(2_000));
            serving.serve_for(work);
        }
        cli.child.kill().unwrap();
        cli.child.wait().unwrap();
        while serving.serve_for(Duration::from_millis(5)) {}
        let e = errors.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(matches!(e, Error::PeerGone), "client {k}: {e:?}");
        drop(serving);
        drop(s);
        let in_use = app.stats().blocks_in_use;
        let held_in_app = held
            .iter()
            .filter(|(h, _)| h.arena().id() == app.id())
            .count() as u64;
        curve.push(in_use);
        if (k + 1) % 20 == 0 || k + 1 == kills {
            eprintln!(
                "after {:>4} kills: app arena {in_use:>5} blocks in use (baseline {baseline}, \
                 server holds {} of the clients' objects + 1 of its own)",
                k + 1,
                held_in_app,
            );
        }
    }
    eprintln!(
        "{kills} kills ({}) in {:?}",
        if anytime {
            "at random instants"
        } else {
            "at random steps"
        },
        started.elapsed()
    );

    // Nothing the server holds was freed under it (a freed block would have been reused by a
    // later client's object, with another value).
    for (h, v) in &held {
        assert_eq!(**h, *v);
    }
    let held_in_app = held
        .iter()
        .filter(|(h, _)| h.arena().id() == app.id())
        .count() as u64;
    assert_eq!(*own, SERVER_VALUE);
    let residue = app.stats().blocks_in_use as i64 - (baseline + held_in_app + 1) as i64;
    if anytime {
        eprintln!("residue after {kills} kills at random instants: {residue} blocks");
    } else {
        assert_eq!(
            residue, 0,
            "the dead clients' references are given back; the server's own stay (curve: {curve:?})"
        );
    }
    drop(held);
    drop(own);
    app.verify().unwrap();
    if !anytime {
        assert_eq!(
            app.stats().blocks_in_use,
            baseline,
            "the app-scope arena is back to its count before the first client"
        );
    }
}
