// The graceful-end suite, included by tests/end.rs (over sockets), tests/end_shm_queue.rs (over
// shared-memory rings) and tests/end_posix_mq.rs (over POSIX queues): `common::kind()` tells
// which.
//
// The peer's `end_sending` is the graceful end, not an error, on every layer: the transport
// and message channels answer `Ok(None)` and say `is_peer_ended`; the structured channel's
// `run()` returns `Ok`, its peer-end handler runs once and `on_error` never; requests that can
// get no answer fail with `PeerEnded`; the side that was ended on goes on sending. Real errors
// stay errors, reported once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{channel_config, child_role, child_socket, spawn_plain, wait_ok, within};
use flowipc::msg::{Backing, MsgChannel, MsgIn};
use flowipc::poll::Pollable;
use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
use flowipc::shm::{Arena, ArenaConfig};
use flowipc::struc::{self, AsyncChannel, Expect};
use flowipc::transport::{self, Channel, OutFrame};

type Cool = struc::Channel<cool_msg::Owned>;

/// Bound on any single wait (a hang fails instead of blocking forever).
const T: Option<Duration> = Some(Duration::from_secs(60));

#[test]
#[ignore = "child-process entry point, spawned by the other tests of this file"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    match role.as_str() {
        "struc_server_shm" => child_struc_server(true),
        "struc_server_heap" => child_struc_server(false),
        "end_at_once" => child_end_at_once(),
        other => panic!("unknown role {other}"),
    }
}

fn frame(i: u64) -> Vec<u8> {
    let mut v = vec![0u8; 48 << 10];
    common::fill(&mut v, i);
    v
}

// ---- transport ------------------------------------------------------------------------------

#[test]
fn the_transports_end_is_no_error_and_the_other_side_goes_on_sending() {
    let (mut a, mut b) = Channel::pair(channel_config()).unwrap();
    for i in 0..3u64 {
        a.send(&i.to_le_bytes()).unwrap();
    }
    assert!(a.end_sending_blocking(T).unwrap());
    assert!(a.is_send_done());
    // A second call waits for the same end (no SendingEnded).
    assert!(a.end_sending_blocking(T).unwrap());
    assert!(matches!(a.send(b"late"), Err(transport::Error::SendingEnded)));
    for i in 0..3u64 {
        let f = b.recv_blocking(T).unwrap().expect("a frame before the end");
        assert_eq!(&*f.payload, &i.to_le_bytes());
    }
    // The end: `None` (with no timeout too), not hosed, nothing to watch for reading.
    assert!(b.recv_blocking(None).unwrap().is_none());
    assert!(b.is_peer_ended() && !b.is_hosed());
    assert!(b.try_recv().unwrap().is_none());
    assert!(b.interest().read_fd().is_none());
    assert!(!a.is_peer_ended());
    // The other way still works, also past what any kind buffers (3 MiB): the ended side
    // reads it all, making room as it does.
    let writer = std::thread::spawn(move || {
        for i in 0..64 {
            b.send(&frame(i)).unwrap();
        }
        assert!(b.end_sending_blocking(T).unwrap());
        b
    });
    for i in 0..64 {
        let f = a.recv_blocking(T).unwrap().expect("a frame");
        assert!(common::check(&f.payload, i), "frame {i}");
    }
    assert!(a.recv_blocking(T).unwrap().is_none());
    assert!(a.is_peer_ended() && !a.is_hosed());
    let b = writer.join().unwrap();
    assert!(b.is_send_done() && !b.is_hosed());
}

#[test]
fn an_idle_timeout_stops_counting_at_the_peers_end() {
    let cfg = channel_config().with_idle_timeout(Some(Duration::from_millis(50)));
    let (mut a, mut b) = Channel::pair(cfg).unwrap();
    a.end_sending().unwrap();
    assert!(b.recv_blocking(T).unwrap().is_none());
    assert!(b.is_peer_ended());
    assert_eq!(b.next_deadline(), None);
    std::thread::sleep(Duration::from_millis(120));
    b.on_timer(Instant::now()).unwrap();
    assert!(!b.is_hosed());
    // A real error is still one: the peer goes away without ending, seen by a send.
    drop(a);
    let mut err = None;
    for _ in 0..1000 {
        if let Err(e) = b.send(&[0; 4096]).and_then(|()| b.flush().map(drop)) {
            err = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let e = err.expect("a send to a closed peer fails");
    assert!(e.is_hosing(), "{e:?}");
    assert!(matches!(b.send(b"x"), Err(transport::Error::Hosed)));
}

#[test]
fn the_async_transport_tells_the_peers_end_once_after_every_frame() {
    let (a, mut b) = Channel::pair(channel_config()).unwrap();
    let (tx, rx) = mpsc::channel();
    let errors = Arc::new(AtomicUsize::new(0));
    let e = errors.clone();
    let frames = tx.clone();
    let a = transport::AsyncChannel::start(
        a,
        move |f| frames.send(Some(f.payload.len())).unwrap(),
        move |_| {
            e.fetch_add(1, Ordering::SeqCst);
        },
    )
    .unwrap();
    a.on_peer_end(move || tx.send(None).unwrap());
    for i in 0..20 {
        b.send(&frame(i)).unwrap();
    }
    assert!(b.end_sending_blocking(T).unwrap());
    for _ in 0..20 {
        assert_eq!(rx.recv_timeout(T.unwrap()).unwrap(), Some(48 << 10));
    }
    assert_eq!(rx.recv_timeout(T.unwrap()).unwrap(), None, "then the end");
    assert!(a.is_peer_ended() && !a.is_hosed());
    // Sending goes on, past what any kind buffers (3 MiB): the library thread waits for room
    // with nothing left to read (a ring's room is rung on the socket by the ended side).
    for i in 0..64 {
        a.send(&frame(i)).unwrap();
    }
    a.send(OutFrame::new(b"after")).unwrap();
    for i in 0..64 {
        let f = b.recv_blocking(T).unwrap().expect("a frame");
        assert!(common::check(&f.payload, i), "frame {i}");
    }
    assert_eq!(&*b.recv_blocking(T).unwrap().unwrap().payload, b"after");
    // A handler set after the end runs too.
    let (tx2, rx2) = mpsc::channel();
    a.on_peer_end(move || tx2.send(()).unwrap());
    rx2.recv_timeout(T.unwrap()).unwrap();
    drop(a);
    assert!(rx.try_recv().is_err(), "nothing more");
    assert_eq!(errors.load(Ordering::SeqCst), 0, "the end is not an error");
}

// ---- messages -------------------------------------------------------------------------------

#[test]
fn a_message_channel_reads_to_the_end() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let (a, b) = Channel::pair(channel_config()).unwrap();
    let mut tx = MsgChannel::<cool_msg::Owned>::new(a, Backing::Shm(arena));
    let mut rx = MsgChannel::<cool_msg::Owned>::new(b, Backing::Heap);
    for n in 0..5 {
        let mut m = tx.create_msg();
        m.init_root().init_hello_there().set_num(n);
        tx.send(&mut m, None).unwrap();
    }
    assert!(tx.end_sending_blocking(T).unwrap());
    let mut got = Vec::new();
    while let Some(m) = rx.recv_blocking(None).unwrap() {
        let cool_msg::HelloThere(h) = m.which().unwrap() else {
            panic!("not a hello")
        };
        got.push(h.unwrap().get_num());
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);
    assert!(rx.is_peer_ended() && !rx.is_hosed());
    let mut back = rx.create_msg();
    back.init_root().set_ping(());
    rx.send(&mut back, None).unwrap();
    assert!(tx.recv_blocking(T).unwrap().is_some());
}

// ---- structured, sync_io core ---------------------------------------------------------------

fn hello(chan: &mut Cool, num: i64) {
    let mut m = chan.create_msg();
    m.init_root().init_hello_there().set_num(num);
    chan.send(&mut m, None).unwrap();
}

fn num_of(m: &MsgIn<cool_msg::Owned>) -> i64 {
    match m.which().unwrap() {
        cool_msg::HelloThere(h) => h.unwrap().get_num(),
        cool_msg::SumResponse(s) => s.unwrap().get_sum(),
        _ => -1,
    }
}

/// The server of the cross-process test: answers sums; a `hitMe` it does not answer but ends
/// its sending (so the client's request gets no answer). Its `run()` returns `Ok` at the
/// client's end; its peer-end handler (once) says goodbye after the end, and ends.
fn child_struc_server(shm: bool) {
    let backing = if shm {
        Backing::Shm(Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap())
    } else {
        Backing::Heap
    };
    let chan = Channel::from_stream(child_socket(), channel_config()).unwrap();
    let mut server = Cool::new(chan, backing).unwrap();
    server.start(|e| panic!("on_error: {e}")).unwrap();
    server
        .expect_msgs(CoolMsgKind::SumRequest, |chan, req| {
            let cool_msg::SumRequest(Ok(r)) = req.which().unwrap() else {
                panic!("not a sum")
            };
            let sum: i64 = r.get_terms_to_add().unwrap().iter().sum();
            let mut rsp = chan.create_msg();
            rsp.init_root().init_sum_response().set_sum(sum);
            chan.send(&mut rsp, Some(&req)).unwrap();
        })
        .unwrap();
    let ends = Arc::new(AtomicUsize::new(0));
    let e = ends.clone();
    server.set_peer_end_handler(move |chan| {
        e.fetch_add(1, Ordering::SeqCst);
        // Sending after the peer's end works: a last word, then our own end.
        hello(chan, 77);
        assert!(chan.end_sending_blocking(T).unwrap());
    });
    server.run().unwrap();
    assert!(server.is_peer_ended() && !server.is_hosed());
    assert_eq!(ends.load(Ordering::SeqCst), 1);
    // After the end: nothing more to wait for, at once.
    server.run().unwrap();
    server.run_for(Duration::from_secs(60)).unwrap();
    server.process_ready().unwrap();
}

#[test]
fn a_structured_end_is_no_error_across_processes() {
    for shm in [true, false] {
        within(120, "structured end", move || {
            let peer = spawn_plain(if shm {
                "struc_server_shm"
            } else {
                "struc_server_heap"
            });
            let chan =
                Channel::from_stream(peer.sock.try_clone().unwrap(), channel_config()).unwrap();
            let mut client = Cool::new(chan, Backing::Heap).unwrap();
            client.start(|e| panic!("client on_error: {e}")).unwrap();
            let mut req = client.create_msg();
            req.init_root().init_sum_request().init_terms_to_add(2).set(0, 5);
            let rsp = client.sync_request(&mut req, None, T).unwrap();
            assert_eq!(num_of(&rsp), 5);
            assert!(client.end_sending_blocking(T).unwrap());
            // The server's goodbye, then its end: `run` returns Ok.
            let got = Arc::new(Mutex::new(Vec::new()));
            let g = got.clone();
            client
                .expect_msgs(CoolMsgKind::HelloThere, move |_, m| {
                    g.lock().unwrap().push(num_of(&m))
                })
                .unwrap();
            client.run().unwrap();
            assert_eq!(*got.lock().unwrap(), [77]);
            assert!(client.is_peer_ended() && !client.is_hosed());
            wait_ok(peer);
        });
    }
}

#[test]
fn requests_that_can_get_no_answer_fail_with_peer_ended_not_hosing() {
    let (a, b) = Channel::pair(channel_config()).unwrap();
    let mut client = Cool::new(a, Backing::Heap).unwrap();
    let mut server = Cool::new(b, Backing::Heap).unwrap();
    client.start(|e| panic!("{e}")).unwrap();
    server.start(|e| panic!("{e}")).unwrap();
    // The server ends instead of answering.
    server
        .expect_msgs(CoolMsgKind::HitMeWithYourBestShot, |chan, _| {
            // (The second request finds it ended already: `SendingEnded`, not hosing.)
            let _ = chan.end_sending();
        })
        .unwrap();
    let ended = Arc::new(AtomicUsize::new(0));
    let e = ended.clone();
    client.set_peer_end_handler(move |_| {
        e.fetch_add(1, Ordering::SeqCst);
    });
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut hit = client.create_msg();
    hit.init_root().init_hit_me_with_your_best_shot();
    // An async request pending at the end: its handler is dropped, never called.
    let d = dropped.clone();
    let guard = DropCount(d);
    client
        .async_request(&mut hit, None, Expect::Indefinite, move |_, _| {
            let _keep = &guard;
            panic!("no response can come")
        })
        .unwrap();
    let server = std::thread::spawn(move || {
        server.run_for(Duration::from_millis(300)).unwrap();
        server
    });
    let r = client.sync_request(&mut hit, None, T);
    assert!(matches!(r, Err(struc::Error::PeerEnded)), "{r:?}");
    assert!(!r.unwrap_err().is_hosing());
    assert!(client.is_peer_ended() && !client.is_hosed());
    assert_eq!(ended.load(Ordering::SeqCst), 1);
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the pending request's handler");
    // After the end, requests fail at once (nothing sent); notifications still go.
    assert!(matches!(
        client.sync_request(&mut hit, None, T),
        Err(struc::Error::PeerEnded)
    ));
    assert!(matches!(
        client.async_request(&mut hit, None, Expect::OneOff, |_, _| {}),
        Err(struc::Error::PeerEnded)
    ));
    // A handler set now runs at once.
    let e = ended.clone();
    client.set_peer_end_handler(move |_| {
        e.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(ended.load(Ordering::SeqCst), 2);
    let mut server = server.join().unwrap();
    hello(&mut client, 3);
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    server
        .expect_msg(CoolMsgKind::HelloThere, move |_, m| {
            g.lock().unwrap().push(num_of(&m))
        })
        .unwrap();
    server.run_for(Duration::from_millis(100)).unwrap();
    assert_eq!(*got.lock().unwrap(), [3]);
}

struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

// ---- structured, async face -----------------------------------------------------------------

/// Ends its sending at once (in another process), then waits for the parent to close.
fn child_end_at_once() {
    let mut c = Channel::from_stream(child_socket(), channel_config()).unwrap();
    assert!(c.end_sending_blocking(T).unwrap());
    loop {
        match c.recv_blocking(T) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => break,
        }
    }
}

#[test]
fn the_async_face_hears_the_end_once_and_never_through_on_error() {
    within(120, "async end", || {
        let mut peer = spawn_plain("end_at_once");
        // The socket taken out of `peer`: dropping the channel closes it for the child.
        let sock = std::mem::replace(&mut peer.sock, std::os::unix::net::UnixStream::pair().unwrap().0);
        let chan = Channel::from_stream(sock, channel_config()).unwrap();
        let client = AsyncChannel::new(Cool::new(chan, Backing::Heap).unwrap()).unwrap();
        let errors = Arc::new(AtomicUsize::new(0));
        let e = errors.clone();
        let (tx, rx) = mpsc::channel();
        client.set_peer_end_handler(move |_| tx.send(()).unwrap());
        client
            .start(move |_| {
                e.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        rx.recv_timeout(T.unwrap()).unwrap();
        assert!(client.is_peer_ended() && !client.is_hosed());
        let mut req = client.create_msg();
        req.init_root().init_sum_request();
        assert!(matches!(
            client.sync_request(&mut req, None, T),
            Err(struc::Error::PeerEnded)
        ));
        drop(client);
        wait_ok(peer);
        assert_eq!(errors.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn an_async_sync_request_waiting_at_the_end_fails_with_peer_ended() {
    let (a, b) = Channel::pair(channel_config()).unwrap();
    let client = AsyncChannel::new(Cool::new(a, Backing::Heap).unwrap()).unwrap();
    let mut server = Cool::new(b, Backing::Heap).unwrap();
    client.start(|e| panic!("{e}")).unwrap();
    server.start(|e| panic!("{e}")).unwrap();
    server
        .expect_msgs(CoolMsgKind::SumRequest, |chan, _| chan.end_sending().unwrap())
        .unwrap();
    let server = std::thread::spawn(move || {
        server.run_for(Duration::from_millis(500)).unwrap();
        server
    });
    let mut req = client.create_msg();
    req.init_root().init_sum_request();
    let r = client.sync_request(&mut req, None, T);
    assert!(matches!(r, Err(struc::Error::PeerEnded)), "{r:?}");
    assert!(!client.is_hosed());
    drop(server.join().unwrap());
}
