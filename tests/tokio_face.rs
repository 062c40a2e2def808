//! The tokio face (feature `tokio`): a session across processes on current-thread runtimes
//! (no thread started), over every channel kind; cancel safety of `request`; `Send` futures on
//! the multi-thread runtime.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::session::*;
use common::*;
use flowipc::msg::Backing;
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::session::{Error, SessionConfig};
use flowipc::struc::{self, MsgType};
use flowipc::tokio::{Channel, ClientSession, SessionServer};
use flowipc::transport::{self, ChannelConfig};

type M = cool_msg::Owned;

fn ty(name: &str) -> MsgType {
    MsgType::of::<M>(name).unwrap()
}

fn config() -> SessionConfig {
    SessionConfig::new().with_channel_kind(env_kind())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn sum_of(m: &flowipc::msg::MsgIn<M>) -> i64 {
    match m.root().unwrap().which().unwrap() {
        cool_msg::SumResponse(Ok(r)) => r.get_sum(),
        _ => panic!("not a sumResponse"),
    }
}

/// A server answering sumRequests with the sum of the terms times `factor`.
fn answer_sums(chan: &Channel<M>) {
    chan.expect_msgs(ty("sumRequest"), |c, req| {
        let cool_msg::SumRequest(Ok(r)) = req.root().unwrap().which().unwrap() else {
            panic!("not a sumRequest")
        };
        let sum: i64 = r.get_terms_to_add().unwrap().iter().sum::<i64>() * r.get_constant_factor();
        let mut rsp = c.create_msg();
        rsp.init_root().init_sum_response().set_sum(sum);
        let _ = c.send(&mut rsp, Some(&req));
    })
    .unwrap();
}

fn sum_request(chan: &Channel<M>, terms: &[i64], factor: i64) -> flowipc::msg::MsgOut<M> {
    let mut m = chan.create_msg();
    let mut r = m.init_root().init_sum_request();
    r.set_constant_factor(factor);
    let mut t = r.init_terms_to_add(terms.len() as u32);
    for (i, v) in terms.iter().enumerate() {
        t.set(i as u32, *v);
    }
    m
}

#[test]
#[ignore = "the entry point of this test binary's child processes"]
fn child_entry() {
    match child_role().as_deref() {
        Some("srv_tokio") => runtime().block_on(srv_tokio()),
        Some("cli_tokio") => runtime().block_on(cli_tokio()),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
}

/// The Sessions page's tutorial in async form, across processes, over each channel kind:
/// connect, accept, a channel opened each way, requests, a notification stream, the client's
/// end seen once by the server; neither process starts a thread.
#[test]
fn a_tokio_session_across_processes() {
    life_over_every_kind("srv_tokio", "cli_tokio");
}

async fn srv_tokio() {
    let mut ctl = child_socket();
    let threads = thread_count();
    let u = universe(&env_dir());
    let server = SessionServer::build(
        flowipc::session::SessionServer::builder(&u.srv, &u.clients).config(config()),
    )
    .unwrap();
    send_u64(&mut ctl, 1);
    let mut session = server.accept().await.unwrap();
    let (tx_err, rx_err) = mpsc::channel();
    let (tx_chan, mut rx_chan) = tokio::sync::mpsc::unbounded_channel();
    session
        .init_handlers_with_passive_open(
            move |e| tx_err.send(e).unwrap(),
            move |ch, _| tx_chan.send(ch).unwrap(),
        )
        .unwrap();
    // The client's channel: we answer its requests.
    let a = Channel::new(
        session
            .structured::<M>(rx_chan.recv().await.unwrap())
            .unwrap(),
    )
    .unwrap();
    answer_sums(&a);
    a.start(|_| {}).unwrap();
    // Ours: we notify it three times and end.
    let ch = session.open_channel(None).await.unwrap();
    let b = Channel::new(session.structured::<M>(ch).unwrap()).unwrap();
    b.start(|_| {}).unwrap();
    for n in 0..3 {
        let mut m = b.create_msg();
        m.init_root().init_hello_there().set_num(n);
        b.send(&mut m, None).unwrap();
    }
    b.end_sending().await.unwrap();
    // The client is killed after its report: the session's end comes once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let e = loop {
        if let Ok(e) = rx_err.try_recv() {
            break e;
        }
        assert!(Instant::now() < deadline, "no end of session");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(matches!(e, Error::PeerGone), "{e:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx_err.try_recv().is_err(), "reported once");
    assert_eq!(thread_count(), threads, "the server started no thread");
    send_u64(&mut ctl, 3);
}

async fn cli_tokio() {
    let mut ctl = child_socket();
    let threads = thread_count();
    let u = universe(&env_dir());
    let (tx_chan, mut rx_chan) = tokio::sync::mpsc::unbounded_channel();
    let mut s = ClientSession::with_passive_open(
        &u.cli,
        &u.srv,
        |_| {},
        move |ch, _| tx_chan.send(ch).unwrap(),
    )
    .config(config());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match s.connect().await {
            Ok(()) => break,
            Err(Error::ServerAbsent(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
    let a = Channel::new(
        s.structured::<M>(s.open_channel(None).await.unwrap())
            .unwrap(),
    )
    .unwrap();
    a.start(|_| {}).unwrap();
    for k in 1..=5 {
        let mut req = sum_request(&a, &[1, 2, 3], k);
        let rsp = a
            .request(&mut req, None, Some(Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(sum_of(&rsp), 6 * k);
    }
    let b = Channel::new(s.structured::<M>(rx_chan.recv().await.unwrap()).unwrap()).unwrap();
    let mut hellos = b.messages(ty("helloThere")).unwrap();
    b.start(|_| {}).unwrap();
    for n in 0..3 {
        let m = hellos.recv().await.unwrap();
        let cool_msg::HelloThere(Ok(h)) = m.root().unwrap().which().unwrap() else {
            panic!("not helloThere")
        };
        assert_eq!(h.get_num(), n, "in order");
    }
    assert_eq!(thread_count(), threads, "the client started no thread");
    send_u64(&mut ctl, 2);
    until_parent_gone(&mut ctl);
}

/// A pair of tokio channels, `server` answering sums (after `delay` for a factor of 0).
fn pair() -> (Channel<M>, Channel<M>) {
    let (a, b) = transport::Channel::pair(ChannelConfig::new()).unwrap();
    let client = Channel::new(struc::Channel::<M>::new(a, Backing::Heap).unwrap()).unwrap();
    let server = Channel::new(struc::Channel::<M>::new(b, Backing::Heap).unwrap()).unwrap();
    (client, server)
}

/// Dropping a pending `request` leaves the channel usable: the late response is dropped quietly
/// (not an unexpected response, not given to the next request), and the next request gets its
/// own answer.
#[test]
fn a_dropped_request_leaves_the_channel_usable() {
    runtime().block_on(async {
        let (client, server) = pair();
        // The server holds the first request and answers it with the second's.
        let held = std::sync::Arc::new(std::sync::Mutex::new(None));
        let h = held.clone();
        server
            .expect_msgs(ty("sumRequest"), move |c, req| {
                let mut slot = h.lock().unwrap();
                let Some(first) = slot.take() else {
                    *slot = Some(req);
                    return;
                };
                for (r, sum) in [(first, 1), (req, 2)] {
                    let mut rsp = c.create_msg();
                    rsp.init_root().init_sum_response().set_sum(sum);
                    c.send(&mut rsp, Some(&r)).unwrap();
                }
            })
            .unwrap();
        server.start(|_| {}).unwrap();
        let (tx, rx) = mpsc::channel();
        client
            .blocking()
            .set_unexpected_response_handler(move |_, _| tx.send(()).unwrap());
        client.start(|_| {}).unwrap();
        let mut first = sum_request(&client, &[1], 1);
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            client.request(&mut first, None, None),
        )
        .await;
        assert!(
            r.is_err(),
            "the first request waits (its future is dropped here)"
        );
        let mut second = sum_request(&client, &[2], 1);
        let rsp = client
            .request(&mut second, None, Some(Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(sum_of(&rsp), 2, "its own answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            rx.try_recv().is_err(),
            "the late answer was dropped quietly"
        );
        assert!(!client.is_hosed());
        // And a timed-out request says so, not hosing.
        let mut third = sum_request(&client, &[3], 1);
        let r = client
            .request(&mut third, None, Some(Duration::from_millis(50)))
            .await;
        assert!(matches!(r, Err(struc::Error::Timeout)), "{r:?}");
        assert!(!client.is_hosed());
    });
}

/// The futures are `Send`: requests run as tasks of the multi-thread runtime.
#[test]
fn requests_run_on_the_multi_thread_runtime() {
    fn is_send<T: Send>(t: T) -> T {
        t
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, server) = pair();
        answer_sums(&server);
        server.start(|_| {}).unwrap();
        client.start(|_| {}).unwrap();
        let client = std::sync::Arc::new(client);
        let tasks: Vec<_> = (0..8i64)
            .map(|k| {
                let c = client.clone();
                tokio::spawn(is_send(async move {
                    let mut req = sum_request(&c, &[k, k], 1);
                    let rsp = c
                        .request(&mut req, None, Some(Duration::from_secs(10)))
                        .await;
                    sum_of(&rsp.unwrap())
                }))
            })
            .collect();
        for (k, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), 2 * k as i64);
        }
    });
}

/// The async tutorial (`examples/tokio_session.rs`) runs as two processes and says what the
/// page's tutorial says; its run dir is left empty (checked as the `RunDir` goes).
#[test]
fn the_tokio_tutorial_runs() {
    let dir = RunDir::new();
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples/tokio_session");
    let out = std::process::Command::new(exe)
        .env("FLOWIPC_RUN_DIR", &dir.0)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in [
        // (Small answers are copied into their frames: zero-copy or not is the channel's call.)
        "client: sum = 6 (zero-copy: ",
        "client: sum = 12 (zero-copy: ",
        "client: hello 2 from the server",
        "server: session over: the session's peer is gone",
    ] {
        assert!(text.contains(line), "no {line:?} in {text}");
    }
}

/// `accept` is cancel-safe (a session that logs in after its future was dropped waits for the
/// next `accept`), and so is `open_channel` (dropped before the answer, the session stays
/// usable and the next opening gets its own channel).
#[test]
fn accept_and_open_channel_are_cancel_safe() {
    let dir = RunDir::new();
    let u = universe(&dir.0);
    runtime().block_on(async {
        let server = SessionServer::new(&u.srv, &u.clients).unwrap();
        // A dropped accept.
        let r = tokio::time::timeout(Duration::from_millis(50), server.accept()).await;
        assert!(r.is_err(), "nobody logged in yet");
        let mut c = ClientSession::new(&u.cli, &u.srv, |_| {});
        let (connected, accepted) = tokio::join!(c.connect(), server.accept());
        connected.unwrap();
        let mut s = accepted.unwrap();
        // The server has no passive-open handler yet: openings wait for it.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = tokio::time::timeout(Duration::from_millis(50), c.open_channel(None)).await;
        assert!(r.is_err(), "the opening waits (its future is dropped here)");
        s.init_handlers_with_passive_open(|_| {}, move |ch, _| tx.send(ch).unwrap())
            .unwrap();
        let mine = c.open_channel(None).await.unwrap();
        // The peer got both openings' ends; the abandoned one's other end is closed.
        let mut theirs = Vec::new();
        while theirs.len() < 2 {
            theirs.push(rx.recv().await.unwrap());
        }
        let mut live = 0;
        for mut t in theirs {
            // (The abandoned one: the peer gone, or the send's reset before it; a live one
            // stays quiet. Looked at for a while: a loaded machine may be slow to say.)
            let _ = t.send(b"x");
            let mut dead = false;
            for _ in 0..40 {
                if !matches!(t.try_recv(), Ok(None)) {
                    dead = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            if !dead {
                live += 1;
            }
        }
        assert_eq!(
            live, 1,
            "one opening's channel lives, the abandoned one's is closed"
        );
        assert!(!c.is_hosed() && !s.is_hosed());
        drop((mine, s, c, server));
    });
}

// ---- review12: adversarial tests ----

/// A session that logged in but waits for `accept` (the server busy with the previous one) is
/// a sync_io session nobody drives: it neither answers nor sends pings, so the client's idle
/// timeout ends it. The library-thread face keeps such sessions alive (their master channel
/// runs on the library thread from log-in on).
#[test]
fn review12_a_session_waiting_for_accept_is_kept_alive() {
    let dir = RunDir::new();
    let u = universe(&dir.0);
    runtime().block_on(async {
        let ka = SessionConfig::new().with_keep_alive(Some((
            Duration::from_millis(100),
            Duration::from_millis(2000),
        )));
        let server = SessionServer::build(
            flowipc::session::SessionServer::builder(&u.srv, &u.clients).config(ka.clone()),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let mut c = ClientSession::new(&u.cli, &u.srv, move |e| {
            let _ = tx.send(e);
        })
        .config(ka);
        c.connect().await.unwrap();
        // The server's loop accepts a while later (it served another session meanwhile).
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let s = server.accept().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = rx.try_recv();
        assert!(
            got.is_err() && !c.is_hosed(),
            "the client's session ended while the server's waited for accept: {got:?}"
        );
        drop((s, c, server));
    });
}

/// A pending `accept` polled again (each `select!` round of a loop makes a new one) adds one
/// more waker each time to the server's list, which only a change of its queue empties: an
/// idle server's list grows without bound.
#[test]
fn review12_a_pending_accept_holds_one_waker() {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Wake, Waker};
    struct Counted;
    impl Wake for Counted {
        fn wake(self: Arc<Self>) {}
    }
    let dir = RunDir::new();
    let u = universe(&dir.0);
    runtime().block_on(async {
        let server = SessionServer::new(&u.srv, &u.clients).unwrap();
        let w = Arc::new(Counted);
        let waker = Waker::from(w.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..1000 {
            // A loop's round: a new accept future, polled once, dropped (another branch won).
            let mut f = std::pin::pin!(server.accept());
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        drop(waker);
        let held = Arc::strong_count(&w) - 1;
        assert!(held <= 1, "the server holds {held} wakers of one idle task");
        drop(server);
    });
}

/// The runtime that started a channel's task shuts down while the channel lives on (a second
/// runtime uses it, as tests and `block_on` wrappers do): the channel is no longer driven,
/// and says nothing of it: a request times out (or, without a timeout, waits for good) though
/// the peer answers.
#[test]
fn review12_a_channel_whose_runtime_ended_says_so() {
    let first = runtime();
    let (client, server) = first.block_on(async {
        let (client, server) = pair();
        client.start(|_| {}).unwrap();
        (client, server)
    });
    drop(first);
    runtime().block_on(async {
        answer_sums(&server);
        server.start(|_| {}).unwrap();
        let mut req = sum_request(&client, &[1, 2], 1);
        let r = client
            .request(&mut req, None, Some(Duration::from_millis(1000)))
            .await;
        assert!(
            !matches!(r, Err(struc::Error::Timeout)),
            "the peer answered; the client's task went with its runtime: {r:?}"
        );
    });
}

/// Starting a tokio object outside a runtime (or on one built without `enable_io`) is a
/// usage error the call can return; it panics inside tokio instead.
#[test]
fn review12_starting_outside_a_runtime_is_an_error_not_a_panic() {
    let (client, _server) = pair();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client.start(|_| {})));
    assert!(
        matches!(r, Ok(Err(_))),
        "Channel::start outside a runtime panicked"
    );
    let no_io = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (client, _server) = no_io.block_on(async { pair() });
    let r = no_io.block_on(async {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client.start(|_| {})))
    });
    assert!(
        matches!(r, Ok(Err(_))),
        "Channel::start on a runtime without IO panicked"
    );
}
