//! Sessions on the user's own poll loop (sync_io) and keep-alive on session channels, across
//! processes, over every channel kind (the kind is a parameter the children get).
//!
//! The tokio face has its own crate (`tokio_face.rs`, feature `tokio`).

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::session::*;
use common::*;
use flowipc::msg::MsgIn;
use flowipc::poll::Pollable;
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::session::{
    ClientSession, ConnectOptions, Error, EventLoop, SessionConfig, SessionServer,
};
use flowipc::struc::{self, Expect, MsgType};
use flowipc::transport;

type Cool = struc::Channel<cool_msg::Owned>;

fn ty(name: &str) -> MsgType {
    MsgType::of::<cool_msg::Owned>(name).unwrap()
}

fn sync_io_config() -> SessionConfig {
    SessionConfig::new()
        .with_channel_kind(env_kind())
        .with_event_loop(EventLoop::SyncIo)
}

fn num_of(m: &MsgIn<cool_msg::Owned>) -> i64 {
    match m.root().unwrap().which().unwrap() {
        cool_msg::HelloThere(Ok(h)) => h.get_num(),
        _ => panic!("not helloThere"),
    }
}

#[test]
#[ignore = "the entry point of this test binary's child processes"]
fn child_entry() {
    match child_role().as_deref() {
        Some("srv_sync_io") => srv_sync_io(),
        Some("cli_sync_io") => cli_sync_io(),
        Some("cli_keep_alive") => cli_keep_alive(),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
}

/// A whole session life with one poll loop in each process and no thread of the library's:
/// log-in, a channel opened each way, requests and notifications, the client's death; over each
/// channel kind.
#[test]
fn a_whole_session_life_in_one_poll_loop_per_process() {
    life_over_every_kind("srv_sync_io", "cli_sync_io");
}

fn srv_sync_io() {
    let mut ctl = child_socket();
    let threads = thread_count();
    let u = universe(&env_dir());
    let mut server = SessionServer::builder(&u.srv, &u.clients)
        .config(sync_io_config())
        .build()
        .unwrap();
    let (tx_s, rx_s) = mpsc::channel();
    server.async_accept(move |s| tx_s.send(s).unwrap());
    send_u64(&mut ctl, 1);
    let (tx_err, rx_err) = mpsc::channel();
    let (tx_chan, rx_chan) = mpsc::channel();
    let mut session = None;
    let mut a: Option<Cool> = None; // opened by the client: we answer its sumRequests
    let mut b: Option<Cool> = None; // opened by us: we say hello, it answers
    let mut greeted = 0;
    let (tx_hello, rx_hello) = mpsc::channel();
    let mut errors: Vec<Error> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let errors = loop {
        assert!(
            Instant::now() < deadline,
            "server ({:?}): the session's life took too long (session: {}, a: {}, b: {}, greeted: \
             {greeted}, errors: {errors:?})",
            env_kind(),
            session.is_some(),
            a.is_some(),
            b.is_some()
        );
        {
            let mut interests = vec![server.interest()];
            interests.extend(
                session
                    .iter()
                    .map(|s: &flowipc::session::ServerSession| s.interest()),
            );
            interests.extend(a.iter().map(|c| c.interest()));
            interests.extend(b.iter().map(|c| c.interest()));
            poll_interests(&interests, Duration::from_secs(1));
        }
        server.on_ready().unwrap();
        if let Ok(s) = rx_s.try_recv() {
            let mut s = s.unwrap();
            let (e, c) = (tx_err.clone(), tx_chan.clone());
            s.init_handlers_with_passive_open(
                move |err| e.send(err).unwrap(),
                move |ch, _| c.send(ch).unwrap(),
            )
            .unwrap();
            session = Some(s);
        }
        let Some(s) = session.as_mut() else { continue };
        s.on_ready().unwrap();
        if let Ok(ch) = rx_chan.try_recv() {
            let mut c: Cool = s.structured(ch).unwrap();
            c.expect_msgs(ty("sumRequest"), |chan, req| {
                let cool_msg::SumRequest(Ok(r)) = req.root().unwrap().which().unwrap() else {
                    panic!("not a sumRequest")
                };
                let sum: i64 = r.get_terms_to_add().unwrap().iter().sum();
                let mut rsp = chan.create_msg();
                rsp.init_root().init_sum_response().set_sum(sum);
                chan.send(&mut rsp, Some(&req)).unwrap();
            })
            .unwrap();
            c.start(|_| {}).unwrap();
            a = Some(c);
            // Our turn to open one (a blocking call: it drives the session while it waits).
            let mut c: Cool = s.structured(s.open_channel(None).unwrap()).unwrap();
            // (A handler, not the cache: the answer and the client's death may come in one
            // turn, and a hosed channel's cache is closed.)
            let tx = tx_hello.clone();
            c.expect_msgs(ty("helloThere"), move |_, m| tx.send(num_of(&m)).unwrap())
                .unwrap();
            c.start(|_| {}).unwrap();
            let mut m = c.create_msg();
            m.init_root().init_hello_there().set_num(7);
            c.send(&mut m, None).unwrap();
            b = Some(c);
        }
        if let Some(c) = a.as_mut() {
            let _ = c.on_ready();
        }
        if let Some(c) = b.as_mut() {
            let _ = c.on_ready();
            for n in rx_hello.try_iter() {
                assert_eq!(n, 8, "the client's answer");
                greeted += 1;
            }
        }
        // (The client's answer may be read after its death is: it is in the channel still.)
        errors.extend(rx_err.try_iter());
        if !errors.is_empty() && greeted > 0 {
            break errors;
        }
    };
    assert_eq!(greeted, 1);
    assert!(matches!(errors[..], [Error::PeerGone]), "{errors:?}");
    // Once: more turns report nothing more.
    for _ in 0..3 {
        session.as_mut().unwrap().on_ready().unwrap();
    }
    assert!(rx_err.try_recv().is_err(), "reported once");
    assert_eq!(thread_count(), threads, "the server started no thread");
    send_u64(&mut ctl, 3);
}

fn cli_sync_io() {
    let mut ctl = child_socket();
    let threads = thread_count();
    let u = universe(&env_dir());
    let (tx_chan, rx_chan) = mpsc::channel();
    let mut s = ClientSession::with_passive_open(
        &u.cli,
        &u.srv,
        |_| {},
        move |ch, _| tx_chan.send(ch).unwrap(),
    )
    .config(sync_io_config());
    // Connecting, in the loop (retrying while the server is absent).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "never connected");
        if !s.is_connecting() {
            match s.start_connect(ConnectOptions::new()) {
                Ok(()) => {}
                Err(Error::ServerAbsent(_)) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
        poll_interests(&[s.interest()], Duration::from_secs(1));
        match s.on_ready() {
            Ok(()) if s.is_open() => break,
            Ok(()) => {}
            Err(Error::ServerAbsent(_)) => {}
            Err(e) => panic!("log-in: {e}"),
        }
    }
    // A channel of ours, structured; a sumRequest answered through the loop.
    let mut a: Cool = s.structured(s.open_channel(None).unwrap()).unwrap();
    a.start(|_| {}).unwrap();
    let (tx_sum, rx_sum) = mpsc::channel();
    let mut req = a.create_msg();
    {
        let mut terms = req.init_root().init_sum_request().init_terms_to_add(3);
        for (i, v) in [1, 2, 39].into_iter().enumerate() {
            terms.set(i as u32, v);
        }
    }
    a.async_request(&mut req, None, Expect::OneOff, move |_, rsp| {
        let cool_msg::SumResponse(Ok(r)) = rsp.root().unwrap().which().unwrap() else {
            panic!("not a sumResponse")
        };
        tx_sum.send(r.get_sum()).unwrap();
    })
    .unwrap();
    let mut b: Option<Cool> = None;
    let (mut sum, mut answered) = (None, false);
    while sum.is_none() || !answered {
        assert!(Instant::now() < deadline, "the exchange took too long");
        {
            let mut interests = vec![s.interest(), a.interest()];
            interests.extend(b.iter().map(|c| c.interest()));
            poll_interests(&interests, Duration::from_secs(1));
        }
        s.on_ready().unwrap();
        a.on_ready().unwrap();
        if let Ok(ch) = rx_chan.try_recv() {
            let mut c: Cool = s.structured(ch).unwrap();
            c.start(|_| {}).unwrap();
            b = Some(c);
        }
        if let Some(c) = b.as_mut() {
            c.on_ready().unwrap();
            if let Some(m) = c.take_cached(ty("helloThere")).unwrap() {
                assert_eq!(num_of(&m), 7);
                let mut r = c.create_msg();
                r.init_root().init_hello_there().set_num(8);
                c.send(&mut r, None).unwrap();
                answered = true;
            }
        }
        sum = sum.or(rx_sum.try_recv().ok());
    }
    assert_eq!(sum, Some(42));
    // Flush what is queued, then say done.
    let until = Instant::now() + Duration::from_secs(10);
    while b.as_mut().unwrap().wants_write() && Instant::now() < until {
        poll_interests(
            &[b.as_ref().unwrap().interest()],
            Duration::from_millis(100),
        );
        b.as_mut().unwrap().on_ready().unwrap();
    }
    assert_eq!(thread_count(), threads, "the client started no thread");
    send_u64(&mut ctl, 2);
    until_parent_gone(&mut ctl);
}

/// Keep-alive on a session's channels: with it on both sides, a channel outlives several idle
/// timeouts while both processes run (pings keep it), and ends by idle timeout, once, when the
/// peer stops answering (SIGSTOP); over each channel kind.
#[test]
fn a_stopped_peer_ends_a_session_channel_by_idle_timeout_once() {
    for (name, kind) in KINDS {
        let dir = RunDir::new();
        let u = universe(&dir.0);
        let keep = Some((Duration::from_millis(100), Duration::from_millis(1000)));
        let config = SessionConfig::new()
            .with_channel_kind(kind)
            .with_channel_keep_alive(keep);
        let server = SessionServer::builder(&u.srv, &u.clients)
            .config(config)
            .build()
            .unwrap();
        let mut env = dir.env().to_vec();
        env.push((KIND_ENV, std::ffi::OsStr::new(name)));
        let mut cli = spawn_env("cli_keep_alive", &env);
        let mut s = server.accept(T).unwrap();
        let (tx, rx) = mpsc::channel();
        s.init_handlers_with_passive_open(|_| {}, move |ch, _| tx.send(ch).unwrap())
            .unwrap();
        let ch = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let mut c: Cool = s.structured(ch).unwrap();
        assert_eq!(c.keep_alive(), (keep.map(|k| k.0), keep.map(|k| k.1)));
        let (tx_err, rx_err) = mpsc::channel();
        c.start(move |e| tx_err.send(e).unwrap()).unwrap();
        // Alive through three idle timeouts: the peer's pings keep it.
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            c.run_for(Duration::from_millis(50)).unwrap();
        }
        assert!(
            rx_err.try_recv().is_err(),
            "{name}: ended while the peer ran"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(cli.child.id() as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while rx_err.try_recv().map(|e| rx_err_keep(e, name)).is_err() {
            assert!(Instant::now() < end, "{name}: no idle timeout");
            let _ = c.run_for(Duration::from_millis(50));
        }
        assert!(c.is_hosed());
        for _ in 0..3 {
            let _ = c.run_for(Duration::from_millis(20));
        }
        assert!(rx_err.try_recv().is_err(), "{name}: reported once");
        // The session itself (its own keep-alive is looser) and a new channel still work...
        // until the client is gone for good.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(cli.child.id() as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
        cli.child.kill().unwrap();
        cli.child.wait().unwrap();
        drop((c, s, server));
    }
}

/// The idle timeout, as the structured channel reports its transport's.
fn rx_err_keep(e: struc::Error, name: &str) {
    assert!(
        matches!(
            e,
            struc::Error::Msg(flowipc::msg::Error::Transport(
                transport::Error::IdleTimeout
            ))
        ),
        "{name}: {e:?}"
    );
}

fn cli_keep_alive() {
    let _ctl = child_socket();
    let u = universe(&env_dir());
    let keep = Some((Duration::from_millis(100), Duration::from_millis(1000)));
    let config = SessionConfig::new()
        .with_channel_kind(env_kind())
        .with_channel_keep_alive(keep);
    let mut s = ClientSession::new(&u.cli, &u.srv, |_| {}).config(config);
    connect(&mut s, ConnectOptions::new());
    let mut c: Cool = s.structured(s.open_channel(None).unwrap()).unwrap();
    c.start(|_| {}).unwrap();
    // Serve the channel (its pings) until stopped, then killed.
    loop {
        if c.run_for(Duration::from_millis(50)).is_err() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A sync_io server's blocking `accept` drives the server itself (no thread of the library's
/// serves the log-in), and so does a sync_io session's blocking `open_channel`.
#[test]
fn blocking_calls_of_sync_io_objects_drive_them() {
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let config = SessionConfig::new().with_event_loop(EventLoop::SyncIo);
    let server = SessionServer::builder(&u.srv, &u.clients)
        .config(config.clone())
        .build()
        .unwrap();
    let (cli, srv_app) = (u.cli.clone(), u.srv.clone());
    // The client: sync_io too, on a thread of the test's, blocking calls only.
    let client = std::thread::spawn(move || {
        let mut c = ClientSession::new(&cli, &srv_app, |_| {}).config(config);
        connect(&mut c, ConnectOptions::new());
        let chan = c.open_channel(None);
        (c, chan.map(|_| ()))
    });
    let mut s = server.accept(T).unwrap();
    let (tx, rx) = mpsc::channel();
    s.init_handlers_with_passive_open(|_| {}, move |ch, _| tx.send(ch).unwrap())
        .unwrap();
    // The client's opening waits for our session's turn: drive it (our own loop).
    let end = Instant::now() + Duration::from_secs(30);
    let got = loop {
        if let Ok(ch) = rx.try_recv() {
            break ch;
        }
        assert!(Instant::now() < end, "the opening never came");
        poll_interests(&[s.interest()], Duration::from_millis(100));
        s.on_ready().unwrap();
    };
    let (c, opened) = client.join().unwrap();
    opened.unwrap();
    drop((got, s, c, server));
}

// ---- review12: adversarial tests ----

/// A sync_io server's loop that drives the server (log-ins) and takes sessions with `accept`
/// a while after they logged in: meanwhile the session is on a reactor nobody drives (its own,
/// not the server's), so it sends no pings and the client's idle timeout ends it. The
/// library-thread face keeps such sessions alive.
#[test]
fn review12_a_sync_io_session_waiting_for_accept_is_kept_alive() {
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let ka = SessionConfig::new().with_keep_alive(Some((
        Duration::from_millis(50),
        Duration::from_millis(2000),
    )));
    let mut server = SessionServer::builder(&u.srv, &u.clients)
        .config(ka.clone().with_event_loop(EventLoop::SyncIo))
        .build()
        .unwrap();
    let (cli, srv_app) = (u.cli.clone(), u.srv.clone());
    let (tx, rx) = mpsc::channel();
    // The client: the library-thread face.
    let client = std::thread::spawn(move || {
        let mut c = ClientSession::new(&cli, &srv_app, move |e| {
            let _ = tx.send(e);
        })
        .config(ka);
        connect(&mut c, ConnectOptions::new());
        c
    });
    // Our loop serves the log-ins for 1.5 s before it accepts.
    let end = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < end {
        poll_interests(&[server.interest()], Duration::from_millis(20));
        server.on_ready().unwrap();
    }
    let c = client.join().unwrap();
    let s = server.accept(T).unwrap();
    let got = rx.try_recv();
    assert!(
        got.is_err() && !c.is_hosed(),
        "the client's session ended while ours waited for accept: {got:?}"
    );
    drop((s, c, server));
}
