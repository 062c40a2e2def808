// The struc suite, included by tests/struc.rs (over sockets) and tests/struc_shm_queue.rs (over
// shared-memory queues): `common::kind()` tells which.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowipc::msg::{Backing, MsgIn};
use flowipc::schemas::perf_demo_capnp::body;
use flowipc::schemas::test_msgs_capnp::{cool_msg, no_union, CoolMsgKind};
use flowipc::shm::{Arena, ArenaConfig};
use flowipc::struc::{Channel, Error, Expect, MsgType, Root};
use common::channel_config;
use flowipc::transport;

type Cool = Channel<cool_msg::Owned>;
const SHORT: Duration = Duration::from_millis(30);

fn ty(name: &str) -> MsgType {
    MsgType::of::<cool_msg::Owned>(name).unwrap()
}

fn backings() -> Vec<(&'static str, Backing, Backing)> {
    let arena = || Backing::Shm(Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap());
    vec![
        ("heap", Backing::Heap, Backing::Heap),
        ("shm", arena(), arena()),
    ]
}

fn pair(a_backing: Backing, b_backing: Backing) -> (Cool, Cool) {
    let (a, b) = transport::Channel::pair(channel_config()).unwrap();
    (
        Channel::new(a, a_backing).unwrap(),
        Channel::new(b, b_backing).unwrap(),
    )
}

fn started(a_backing: Backing, b_backing: Backing) -> (Cool, Cool) {
    let (mut a, mut b) = pair(a_backing, b_backing);
    a.start(|e| panic!("a: {e}")).unwrap();
    b.start(|e| panic!("b: {e}")).unwrap();
    (a, b)
}

fn hello(chan: &mut Cool, num: i64, originating: Option<&MsgIn<cool_msg::Owned>>) {
    let mut m = chan.create_msg();
    let mut h = m.init_root().init_hello_there();
    h.set_greeting("hi");
    h.set_num(num);
    chan.send(&mut m, originating).unwrap();
}

fn num_of(m: &MsgIn<cool_msg::Owned>) -> i64 {
    match m.which().unwrap() {
        cool_msg::HelloThere(h) => h.unwrap().get_num(),
        cool_msg::SumResponse(s) => s.unwrap().get_sum(),
        cool_msg::MyBestShot(s) => s.unwrap().get_num() as i64,
        _ => -1,
    }
}

type Log = Arc<Mutex<Vec<i64>>>;

fn log() -> Log {
    Arc::default()
}

#[test]
fn a_root_without_a_union_is_refused() {
    let (a, _b) = transport::Channel::pair(channel_config()).unwrap();
    assert!(matches!(
        Channel::<no_union::Owned>::new(a, Backing::Heap),
        Err(Error::NoRootUnion)
    ));
    assert!(matches!(
        MsgType::of::<cool_msg::Owned>("noSuchField"),
        Err(Error::NoSuchMsgType(n)) if n == "noSuchField"
    ));
    // The string form (unchecked) names the same types as the generated kinds.
    assert_eq!(ty("helloThere"), MsgType(0));
    assert_eq!(ty("helloThere"), CoolMsgKind::HelloThere.into());
    assert_eq!(ty("ping"), CoolMsgKind::Ping.into());
    assert_eq!(<cool_msg::Owned as Root>::kind(MsgType(6)), Some(CoolMsgKind::Ping));
    assert_eq!(<cool_msg::Owned as Root>::kind(MsgType(7)), None);
}

#[test]
fn early_messages_are_cached_and_delivered_in_order() {
    for (mode, ab, bb) in backings() {
        let (mut a, mut b) = pair(ab, bb);
        a.start(|e| panic!("{e}")).unwrap();
        for n in 1..=3 {
            hello(&mut a, n, None);
        }
        // Not started: nothing is received.
        assert!(matches!(b.run_for(SHORT), Err(Error::NotStarted)));
        b.start(|e| panic!("{e}")).unwrap();
        b.run_for(SHORT).unwrap();
        assert_eq!(b.cached(CoolMsgKind::HelloThere), 3, "{mode}");
        // A one-off expectation takes the first cached one, synchronously.
        let got = log();
        let g = got.clone();
        assert!(b
            .expect_msg(CoolMsgKind::HelloThere, move |_, m| g
                .lock()
                .unwrap()
                .push(num_of(&m)))
            .unwrap());
        assert_eq!(*got.lock().unwrap(), [1]);
        // expect_msgs drains the rest in order, then gets live ones.
        let g = got.clone();
        assert!(b
            .expect_msgs(CoolMsgKind::HelloThere, move |_, m| g
                .lock()
                .unwrap()
                .push(num_of(&m)))
            .unwrap());
        assert_eq!(*got.lock().unwrap(), [1, 2, 3]);
        // Already expected: refused, nothing registered.
        assert!(!b.expect_msg(CoolMsgKind::HelloThere, |_, _| panic!()).unwrap());
        hello(&mut a, 4, None);
        b.run_for(SHORT).unwrap();
        assert_eq!(*got.lock().unwrap(), [1, 2, 3, 4]);
        // Undone: cached again.
        assert!(b.undo_expect_msgs(CoolMsgKind::HelloThere).unwrap());
        assert!(!b.undo_expect_msgs(CoolMsgKind::HelloThere).unwrap());
        hello(&mut a, 5, None);
        b.run_for(SHORT).unwrap();
        assert_eq!(b.cached(CoolMsgKind::HelloThere), 1, "{mode}");
        assert_eq!(got.lock().unwrap().len(), 4);
    }
}

/// The server side of the page's example: sums, and best shots for as long as asked.
fn serve(chan: &mut Cool) {
    chan.expect_msgs(CoolMsgKind::SumRequest, |chan, req| {
        let Ok(cool_msg::SumRequest(Ok(r))) = req.which() else {
            panic!("not a sum request")
        };
        let sum: i64 = r.get_terms_to_add().unwrap().iter().sum();
        let mut rsp = chan.create_msg();
        rsp.init_root()
            .init_sum_response()
            .set_sum(sum * r.get_constant_factor());
        chan.send(&mut rsp, Some(&req)).unwrap();
    })
    .unwrap();
    chan.expect_msgs(CoolMsgKind::HitMeWithYourBestShot, |chan, req| {
        for shot in 1..=3 {
            let mut rsp = chan.create_msg();
            let mut s = rsp.init_root().init_my_best_shot();
            s.set_text("take that");
            s.set_num(shot);
            chan.send(&mut rsp, Some(&req)).unwrap();
        }
    })
    .unwrap();
}

fn sum_request(chan: &Cool, terms: &[i64], factor: i64) -> flowipc::msg::MsgOut<cool_msg::Owned> {
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
fn requests_responses_and_unexpected_responses() {
    for (mode, ab, bb) in backings() {
        let (mut client, mut server) = started(ab, bb);
        serve(&mut server);
        let remote_unexpected: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
        let r = remote_unexpected.clone();
        server.set_remote_unexpected_response_handler(move |id, what| {
            r.lock().unwrap().push((id, what.to_string()))
        });
        let server = std::thread::spawn(move || {
            server.run_for(Duration::from_millis(1500)).unwrap();
            server
        });
        // sync_request: the one response.
        let mut req = sum_request(&client, &[1, 2, 3], 10);
        let rsp = client
            .sync_request(&mut req, None, Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(num_of(&rsp), 60, "{mode}");
        assert_eq!(rsp.answers(), 1);
        // async one-off: the first of three responses; the other two are unexpected, here and
        // (told over the wire) there.
        let got = log();
        let local_unexpected = log();
        let l = local_unexpected.clone();
        client.set_unexpected_response_handler(move |_, m| l.lock().unwrap().push(num_of(&m)));
        let mut hit = client.create_msg();
        hit.init_root().init_hit_me_with_your_best_shot();
        let g = got.clone();
        client
            .async_request(&mut hit, None, Expect::OneOff, move |_, m| {
                g.lock().unwrap().push(num_of(&m))
            })
            .unwrap();
        // Indefinite: all three, until undone.
        let g = got.clone();
        let id = client
            .async_request(&mut hit, None, Expect::Indefinite, move |_, m| {
                g.lock().unwrap().push(10 * num_of(&m))
            })
            .unwrap();
        client.run_for(Duration::from_millis(300)).unwrap();
        assert_eq!(*got.lock().unwrap(), [1, 10, 20, 30], "{mode}");
        assert_eq!(*local_unexpected.lock().unwrap(), [2, 3], "{mode}");
        assert!(client.undo_expect_responses(id).unwrap());
        assert!(!client.undo_expect_responses(id).unwrap());
        let mut server = server.join().unwrap();
        server.run_for(SHORT).unwrap();
        // Told with the id of each of our messages and the peer's description of it: the
        // second and third best shots, answers to the client's one-off request (its message 2).
        let remote = remote_unexpected.lock().unwrap().clone();
        assert_eq!(remote.len(), 2, "{mode}");
        for (id, what) in &remote {
            assert_eq!(
                what,
                &format!("myBestShot {id} answers message 2, which expects no response (any more)"),
                "{mode}"
            );
        }
        // A response to a message the client never sent as a request: unexpected, not hosing.
        hello(&mut client, 7, None);
        server
            .expect_msg(CoolMsgKind::HelloThere, |chan, m| {
                let mut rsp = chan.create_msg();
                rsp.init_root().init_hello_there().set_num(8);
                chan.send(&mut rsp, Some(&m)).unwrap();
            })
            .unwrap();
        server.run_for(SHORT).unwrap();
        client.run_for(SHORT).unwrap();
        assert_eq!(*local_unexpected.lock().unwrap(), [2, 3, 8], "{mode}");
        assert!(!client.is_hosed() && !server.is_hosed());
    }
}

#[test]
fn a_sync_request_times_out_without_hosing_and_the_late_answer_is_dropped() {
    let (mut client, mut server) = started(Backing::Heap, Backing::Heap);
    let unexpected = log();
    let u = unexpected.clone();
    client.set_unexpected_response_handler(move |_, m| u.lock().unwrap().push(num_of(&m)));
    let mut req = sum_request(&client, &[1], 1);
    let e = client
        .sync_request(&mut req, None, Some(Duration::from_millis(50)))
        .unwrap_err();
    assert!(matches!(e, Error::Timeout));
    assert!(!e.is_hosing() && !client.is_hosed());
    // The server answers late: dropped quietly (not an unexpected response).
    serve(&mut server);
    server.run_for(SHORT).unwrap();
    client.run_for(SHORT).unwrap();
    assert!(unexpected.lock().unwrap().is_empty());
    // The channel works on.
    let server = std::thread::spawn(move || {
        server.run_for(Duration::from_millis(500)).unwrap();
    });
    let mut req = sum_request(&client, &[2, 3], 1);
    let rsp = client
        .sync_request(&mut req, None, Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(num_of(&rsp), 5);
    server.join().unwrap();
}

#[test]
fn an_fd_rides_on_a_structured_message() {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let (mut a, mut b) = started(Backing::Heap, Backing::Heap);
    let (r, mut w) = std::io::pipe().unwrap();
    w.write_all(b"via fd").unwrap();
    drop(w);
    let mut m = a.create_msg();
    m.init_root().init_hello_there().set_num(1);
    a.send_with_fd(&mut m, None, Some(r.as_fd())).unwrap();
    drop(r);
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    b.expect_msg(CoolMsgKind::HelloThere, move |_, mut m| {
        let fd = m.take_fd().expect("an fd");
        std::fs::File::from(fd)
            .read_to_string(&mut t.lock().unwrap())
            .unwrap();
    })
    .unwrap();
    b.run_for(SHORT).unwrap();
    assert_eq!(*text.lock().unwrap(), "via fd");

    // A request with an fd, answered with one: the server reads the client's pipe and answers
    // its length, with a pipe of its own.
    b.expect_msgs(CoolMsgKind::SumRequest, |chan, mut req| {
        let mut got = String::new();
        std::fs::File::from(req.take_fd().expect("the request's fd"))
            .read_to_string(&mut got)
            .unwrap();
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(got.to_uppercase().as_bytes()).unwrap();
        drop(w);
        let mut rsp = chan.create_msg();
        rsp.init_root().init_sum_response().set_sum(got.len() as i64);
        chan.send_with_fd(&mut rsp, Some(&req), Some(r.as_fd()))
            .unwrap();
    })
    .unwrap();
    let server = std::thread::spawn(move || {
        b.run_for(Duration::from_millis(300)).unwrap();
        b
    });
    let (r, mut w) = std::io::pipe().unwrap();
    w.write_all(b"sync with fd").unwrap();
    drop(w);
    let mut req = a.create_msg();
    req.init_root().init_sum_request();
    let mut rsp = a
        .sync_request_with_fd(&mut req, None, Some(r.as_fd()), Some(Duration::from_secs(10)))
        .unwrap();
    drop(r);
    assert_eq!(num_of(&rsp), 12);
    let mut back = String::new();
    std::fs::File::from(rsp.take_fd().expect("the response's fd"))
        .read_to_string(&mut back)
        .unwrap();
    assert_eq!(back, "SYNC WITH FD");
    drop(server.join().unwrap());
}

#[test]
fn a_hosing_error_is_reported_once_then_calls_answer_hosed() {
    let (mut a, mut b) = pair(Backing::Heap, Backing::Heap);
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = errors.clone();
    b.start(move |e| e2.lock().unwrap().push(format!("{e:?}")))
        .unwrap();
    a.start(|_| {}).unwrap();
    let fired = Arc::new(Mutex::new(0));
    let f = fired.clone();
    b.expect_msgs(CoolMsgKind::HelloThere, move |_, _| *f.lock().unwrap() += 1)
        .unwrap();
    hello(&mut a, 1, None);
    drop(a);
    assert!(matches!(b.run_for(SHORT), Err(Error::Hosed)));
    assert_eq!(
        *fired.lock().unwrap(),
        1,
        "the message before the end was delivered"
    );
    assert_eq!(
        errors.lock().unwrap().len(),
        1,
        "{:?}",
        errors.lock().unwrap()
    );
    assert!(errors.lock().unwrap()[0].contains("PeerGone"));
    // Afterwards: Hosed everywhere, no handler.
    assert!(matches!(b.run_for(SHORT), Err(Error::Hosed)));
    assert!(matches!(b.process_ready(), Err(Error::Hosed)));
    let mut m = b.create_msg();
    m.init_root().set_ping(());
    assert!(matches!(b.send(&mut m, None), Err(Error::Hosed)));
    assert!(matches!(
        b.expect_msg(CoolMsgKind::Ping, |_, _| {}),
        Err(Error::Hosed)
    ));
    assert_eq!(errors.lock().unwrap().len(), 1);
}

#[test]
fn a_message_of_another_schema_is_a_specific_error_once() {
    // The peer speaks CoolMsg; we expect perf_demo's Body, whose union has 2 fields: a `ping`
    // (field 6 of CoolMsg) is a type this schema does not know.
    let (a, b) = transport::Channel::pair(channel_config()).unwrap();
    let mut a = Channel::<cool_msg::Owned>::new(a, Backing::Heap).unwrap();
    let mut b = Channel::<body::Owned>::new(b, Backing::Heap).unwrap();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = errors.clone();
    b.start(move |e| e2.lock().unwrap().push(e.to_string()))
        .unwrap();
    a.start(|_| {}).unwrap();
    let mut m = a.create_msg();
    m.init_root().set_ping(());
    a.send(&mut m, None).unwrap();
    assert!(matches!(b.run_for(SHORT), Err(Error::Hosed)));
    let errors = errors.lock().unwrap();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("does not know"), "{errors:?}");
}

#[test]
fn garbage_from_the_peer_is_reported_once() {
    let (mut raw, b) = transport::Channel::pair(channel_config()).unwrap();
    let mut b = Channel::<cool_msg::Owned>::new(b, Backing::Heap).unwrap();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = errors.clone();
    b.start(move |e| e2.lock().unwrap().push(e.to_string()))
        .unwrap();
    raw.send(&[7; 40]).unwrap();
    raw.send(&[7; 40]).unwrap();
    assert!(matches!(b.run_for(SHORT), Err(Error::Hosed)));
    assert!(matches!(b.run_for(SHORT), Err(Error::Hosed)));
    let errors = errors.lock().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("reserved header bytes"), "{errors:?}");
}

// ---- Across processes: the page's scenario with the server in a child, in SHM mode. ----

#[test]
fn the_pages_scenario_across_processes() {
    pages_scenario(true);
    pages_scenario(false);
}

fn pages_scenario(shm: bool) {
    let peer = common::spawn_plain(if shm {
        "struc_server"
    } else {
        "struc_server_heap"
    });
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let chan =
        transport::Channel::from_stream(peer.sock.try_clone().unwrap(), channel_config())
            .unwrap();
    let backing = if shm {
        Backing::Shm(arena.clone())
    } else {
        Backing::Heap
    };
    let mut client = Cool::new(chan, backing).unwrap();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = errors.clone();
    client
        .start(move |e| e2.lock().unwrap().push(e.to_string()))
        .unwrap();
    let shots = log();
    let s = shots.clone();
    let mut hit = client.create_msg();
    hit.init_root().init_hit_me_with_your_best_shot();
    client
        .async_request(&mut hit, None, Expect::Indefinite, move |_, m| {
            s.lock().unwrap().push(num_of(&m))
        })
        .unwrap();
    let mut req = sum_request(&client, &[4, 5, 6], 3);
    let rsp = client
        .sync_request(&mut req, None, Some(Duration::from_secs(30)))
        .unwrap();
    // (A small response goes inline, copied, whatever the backing: see
    // `MsgChannel::with_inline_max`.)
    assert!(!rsp.is_zero_copy());
    assert_eq!(num_of(&rsp), 45);
    // The server greets us unsolicited once it answered; expected after the fact: cached.
    client.run_for(Duration::from_millis(300)).unwrap();
    assert_eq!(*shots.lock().unwrap(), [1, 2, 3]);
    let greeting = log();
    let g = greeting.clone();
    client
        .expect_msg(CoolMsgKind::HelloThere, move |_, m| {
            g.lock().unwrap().push(num_of(&m))
        })
        .unwrap();
    assert_eq!(*greeting.lock().unwrap(), [99]);
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
    // Tell the server to finish.
    let mut bye = client.create_msg();
    bye.init_root().set_ping(());
    client.send(&mut bye, None).unwrap();
    common::wait_ok(peer);
    // The server is gone: reported once, to the handler.
    assert!(matches!(
        client.run_for(Duration::from_secs(5)),
        Err(Error::Hosed)
    ));
    assert_eq!(errors.lock().unwrap().len(), 1);
    drop((rsp, req, hit, bye, client));
    assert_eq!(arena.stats().blocks_in_use, 0);
}

fn child_struc_server(shm: bool) {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let chan =
        transport::Channel::from_stream(common::child_socket(), channel_config()).unwrap();
    let backing = if shm {
        Backing::Shm(arena)
    } else {
        Backing::Heap
    };
    let mut server = Cool::new(chan, backing).unwrap();
    server.start(|e| panic!("{e}")).unwrap();
    serve(&mut server);
    let done = Arc::new(Mutex::new(false));
    let d = done.clone();
    server
        .expect_msg(CoolMsgKind::Ping, move |_, _| *d.lock().unwrap() = true)
        .unwrap();
    let mut greeted = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !*done.lock().unwrap() && std::time::Instant::now() < deadline {
        server.run_for(Duration::from_millis(20)).unwrap();
        if !greeted {
            hello(&mut server, 99, None);
            greeted = true;
        }
    }
    assert!(*done.lock().unwrap());
}

#[test]
#[ignore]
fn child_entry() {
    match common::child_role().as_deref() {
        Some("struc_server") => child_struc_server(true),
        Some("struc_server_heap") => child_struc_server(false),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
}

#[test]
fn a_message_owns_its_fd_and_it_rides_every_send() {
    use std::io::{Read, Write};
    let (mut a, mut b) = started(Backing::Heap, Backing::Heap);
    let (r, mut w) = std::io::pipe().unwrap();
    w.write_all(b"abc").unwrap();
    drop(w);
    let mut m = a.create_msg();
    m.init_root().init_hello_there().set_num(1);
    m.set_fd(r.into());
    a.send(&mut m, None).unwrap();
    a.send(&mut m, None).unwrap();
    let fds = Arc::new(Mutex::new(Vec::new()));
    let f = fds.clone();
    b.expect_msgs(CoolMsgKind::HelloThere, move |_, mut m| {
        f.lock()
            .unwrap()
            .push(m.take_fd().expect("an fd each time"))
    })
    .unwrap();
    b.run_for(SHORT).unwrap();
    let mut fds = std::mem::take(&mut *fds.lock().unwrap());
    assert_eq!(fds.len(), 2);
    // Each is the same pipe: the first read drains it.
    let mut text = String::new();
    std::fs::File::from(fds.remove(0))
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "abc");
    assert!(m.take_fd().is_some(), "the message still owns its fd");
}

#[test]
fn an_unchanged_message_is_resent_on_two_channels_without_a_copy() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let (mut a1, mut b1) = started(Backing::Shm(arena.clone()), Backing::Heap);
    let (mut a2, mut b2) = started(Backing::Shm(arena.clone()), Backing::Heap);
    let mut m = a1.create_msg();
    // (A greeting past the inline limit: the message goes in place.)
    let mut h = m.init_root().init_hello_there();
    h.set_num(5);
    h.set_greeting("x".repeat(flowipc::msg::DEFAULT_INLINE_MAX).as_str());
    a1.send(&mut m, None).unwrap();
    a2.send(&mut m, None).unwrap();
    a1.send(&mut m, None).unwrap();
    assert_eq!(m.shared_refs(), Some(4), "one table, three references lent");
    let got = Arc::new(Mutex::new(Vec::new()));
    for b in [&mut b1, &mut b2] {
        let g = got.clone();
        b.expect_msgs(CoolMsgKind::HelloThere, move |_, m| g.lock().unwrap().push(m))
            .unwrap();
        b.run_for(SHORT).unwrap();
    }
    let got = std::mem::take(&mut *got.lock().unwrap());
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|m| m.is_zero_copy() && num_of(m) == 5));
    // Modify while they hold it: copy-on-write; theirs stay 5.
    m.get_root().unwrap().init_hello_there().set_num(6);
    a1.send(&mut m, None).unwrap();
    assert!(got.iter().all(|m| num_of(m) == 5));
    drop(got);
    b1.run_for(SHORT).unwrap();
}

#[test]
fn display_is_capnp_text_cut_short() {
    let (mut a, mut b) = started(Backing::Heap, Backing::Heap);
    let mut m = a.create_msg();
    m.init_root()
        .init_hello_there()
        .set_greeting("x".repeat(1000).as_str());
    let shown = m.to_string();
    assert!(
        shown.starts_with("(helloThere = (greeting = \"xxx"),
        "{shown}"
    );
    assert!(shown.ends_with('…') && shown.len() <= 256 + '…'.len_utf8());
    a.send(&mut m, None).unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let s = seen.clone();
    b.expect_msg(CoolMsgKind::HelloThere, move |_, m| {
        *s.lock().unwrap() = format!("{m:#}")
    })
    .unwrap();
    b.run_for(SHORT).unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.contains("greeting") && seen.len() > 1000, "{seen}");
}

#[test]
fn big_requests_and_responses_go_in_place() {
    const BIG: usize = 256 << 20;
    let arena = Arena::create(ArenaConfig::new()).unwrap();
    let (mut client, mut server) =
        started(Backing::Shm(arena.clone()), Backing::Shm(arena.clone()));
    server
        .expect_msgs(CoolMsgKind::Blob, |chan, req| {
            assert!(req.is_zero_copy());
            let Ok(cool_msg::Blob(Ok(b))) = req.which() else {
                panic!()
            };
            let first = b.get_chunks().unwrap().get(0).get_data().unwrap();
            assert_eq!((first.len(), first[0], first[BIG - 1]), (BIG, 1, 1));
            let mut rsp = chan.create_msg();
            let mut chunks = rsp.init_root().init_blob().init_chunks(1);
            chunks.reborrow().get(0).init_data(BIG as u32).fill(2);
            chan.send(&mut rsp, Some(&req)).unwrap();
        })
        .unwrap();
    let server = std::thread::spawn(move || server.run_for(Duration::from_secs(3)).unwrap());
    let mut req = client.create_msg();
    let mut chunks = req.init_root().init_blob().init_chunks(1);
    chunks.reborrow().get(0).init_data(BIG as u32).fill(1);
    let rsp = client
        .sync_request(&mut req, None, Some(Duration::from_secs(60)))
        .unwrap();
    assert!(rsp.is_zero_copy());
    let Ok(cool_msg::Blob(Ok(b))) = rsp.which() else {
        panic!()
    };
    let data = b.get_chunks().unwrap().get(0).get_data().unwrap();
    assert_eq!((data.len(), data[0], data[BIG - 1]), (BIG, 2, 2));
    server.join().unwrap();
}

#[test]
fn a_plain_poll_loop_drives_the_sync_io_core() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let (mut client, mut server) = started(Backing::Heap, Backing::Heap);
    serve(&mut server);
    let answers = log();
    for n in 1..=5 {
        let mut req = sum_request(&client, &[n], 1);
        let a = answers.clone();
        client
            .async_request(&mut req, None, Expect::OneOff, move |_, m| {
                a.lock().unwrap().push(num_of(&m))
            })
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while answers.lock().unwrap().len() < 5 {
        assert!(std::time::Instant::now() < deadline, "hung");
        let (c, s) = {
            let mut fds = [
                PollFd::new(client.as_fd(), PollFlags::POLLIN),
                PollFd::new(server.as_fd(), PollFlags::POLLIN),
            ];
            poll(&mut fds, PollTimeout::from(1000u16)).unwrap();
            (
                fds[0].revents().unwrap_or(PollFlags::empty()),
                fds[1].revents().unwrap_or(PollFlags::empty()),
            )
        };
        if s.contains(PollFlags::POLLIN) {
            server.process_ready().unwrap();
        }
        if c.contains(PollFlags::POLLIN) {
            client.process_ready().unwrap();
        }
    }
    assert_eq!(*answers.lock().unwrap(), [1, 2, 3, 4, 5]);
}

// ---- The async-I/O face. ----

use flowipc::struc::AsyncChannel;

fn async_pair(
    a_backing: Backing,
    b_backing: Backing,
) -> (AsyncChannel<cool_msg::Owned>, AsyncChannel<cool_msg::Owned>) {
    let (a, b) = pair(a_backing, b_backing);
    (AsyncChannel::new(a).unwrap(), AsyncChannel::new(b).unwrap())
}

static_assertions::assert_impl_all!(AsyncChannel<cool_msg::Owned>: Send, Sync);
static_assertions::assert_impl_all!(Channel<cool_msg::Owned>: Send);

#[test]
fn concurrent_sync_requests_from_several_threads() {
    for (mode, ab, bb) in backings() {
        let (client, server) = async_pair(ab, bb);
        server
            .expect_msgs(CoolMsgKind::SumRequest, |chan, req| {
                common::msgs::answer_sum(chan, req).unwrap()
            })
            .unwrap();
        server.start(|e| panic!("server: {e}")).unwrap();
        client.start(|e| panic!("client: {e}")).unwrap();
        let client = Arc::new(client);
        let threads: Vec<_> = (0..4i64)
            .map(|t| {
                let client = client.clone();
                std::thread::spawn(move || {
                    for i in 0..200i64 {
                        let mut req = client.create_msg();
                        let mut terms = req.init_root().init_sum_request().init_terms_to_add(2);
                        terms.set(0, t * 1000);
                        terms.set(1, i);
                        let rsp = client
                            .sync_request(&mut req, None, Some(Duration::from_secs(30)))
                            .unwrap();
                        assert_eq!(num_of(&rsp), t * 1000 + i);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!client.is_hosed(), "{mode}");
    }
}

#[test]
fn async_timeout_end_sending_and_death() {
    let (client, server) = async_pair(Backing::Heap, Backing::Heap);
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = errors.clone();
    client
        .start(move |e| e2.lock().unwrap().push(e.to_string()))
        .unwrap();
    let got = log();
    let g = got.clone();
    server
        .expect_msgs(CoolMsgKind::HelloThere, move |_, m| {
            g.lock().unwrap().push(num_of(&m))
        })
        .unwrap();
    server.start(|_| {}).unwrap();
    // Nobody answers sums: a timeout, not hosing.
    let mut req = client.create_msg();
    req.init_root().init_sum_request();
    assert!(matches!(
        client.sync_request(&mut req, None, Some(Duration::from_millis(50))),
        Err(Error::Timeout)
    ));
    assert!(!client.is_hosed());
    // Notifications, then a graceful end: all delivered, completion fires once.
    for n in 1..=3 {
        let mut m = client.create_msg();
        m.init_root().init_hello_there().set_num(n);
        client.send(&mut m, None).unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    client.async_end_sending(move |r| tx.send(r.is_ok()).unwrap());
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(*got.lock().unwrap(), [1, 2, 3]);
    // The server goes away: the client hears it once.
    drop(server);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while errors.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        errors.lock().unwrap().len(),
        1,
        "{:?}",
        errors.lock().unwrap()
    );
    assert!(client.is_hosed());
    let mut m = client.create_msg();
    m.init_root().set_ping(());
    assert!(matches!(client.send(&mut m, None), Err(Error::Hosed)));
}

#[test]
fn dropping_aborts_a_pending_end_sending() {
    let (client, _server) = async_pair(Backing::Heap, Backing::Heap);
    client.start(|_| {}).unwrap();
    // Fill the socket (the server does not read) so the end cannot be written.
    let big = "x".repeat(1 << 20);
    for _ in 0..64 {
        let mut m = client.create_msg();
        m.init_root().init_hello_there().set_greeting(big.as_str());
        client.send(&mut m, None).unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    client.async_end_sending(move |r| tx.send(format!("{r:?}")).unwrap());
    drop(client);
    let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(r.contains("Aborted"), "{r}");
}

#[test]
fn sync_io_start_and_poll_and_take_cached() {
    let (mut a, mut b) = pair(Backing::Heap, Backing::Heap);
    a.start(|_| {}).unwrap();
    hello(&mut a, 1, None);
    hello(&mut a, 2, None);
    std::thread::sleep(Duration::from_millis(20));
    b.start_and_poll(|e| panic!("{e}")).unwrap();
    assert_eq!(b.cached(CoolMsgKind::HelloThere), 2);
    let first = b.take_cached(CoolMsgKind::HelloThere).unwrap().unwrap();
    assert_eq!(num_of(&first), 1);
    let second = b.take_cached(CoolMsgKind::HelloThere).unwrap().unwrap();
    assert_eq!(num_of(&second), 2);
    assert!(b.take_cached(CoolMsgKind::HelloThere).unwrap().is_none());
    let (r, _w) = std::io::pipe().unwrap();
    let mut m = a.create_msg_with_fd(r.into());
    m.init_root().set_ping(());
    a.send(&mut m, None).unwrap();
    b.run_for(SHORT).unwrap();
    assert!(b
        .take_cached(CoolMsgKind::Ping)
        .unwrap()
        .unwrap()
        .take_fd()
        .is_some());
}

#[test]
fn a_response_to_an_id_never_sent_is_a_specific_error_once() {
    let (mut raw, b) = transport::Channel::pair(channel_config()).unwrap();
    let mut b = Channel::<cool_msg::Owned>::new(b, Backing::Heap).unwrap();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = errors.clone();
    b.start(move |e| e2.lock().unwrap().push(format!("{e:?}")))
        .unwrap();
    // A heap-framed `ping` message (id 1) answering our message 77, which we never sent.
    let mut m = flowipc::msg::MsgOut::<cool_msg::Owned>::new_heap();
    m.init_root().set_ping(());
    let (x, y) = transport::Channel::pair(channel_config()).unwrap();
    let mut forger = flowipc::msg::MsgChannel::<cool_msg::Owned>::new(x, Backing::Heap);
    let mut tap = y;
    forger.send(&mut m, None).unwrap();
    let (mut frame, _) = tap
        .recv_blocking(Some(Duration::from_secs(5)))
        .unwrap()
        .unwrap()
        .into_parts();
    frame[16..24].copy_from_slice(&77u64.to_le_bytes());
    raw.send(&frame).unwrap();
    assert!(matches!(b.run_for(SHORT), Err(Error::Hosed)));
    let errors = errors.lock().unwrap();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("BadResponseId(77)"), "{errors:?}");
}

#[test]
fn unexpected_response_handlers_can_be_unset() {
    let (mut a, mut b) = started(Backing::Heap, Backing::Heap);
    let local = log();
    let l = local.clone();
    a.set_unexpected_response_handler(move |_, m| l.lock().unwrap().push(num_of(&m)));
    let remote = log();
    let r = remote.clone();
    b.set_remote_unexpected_response_handler(move |id, _| r.lock().unwrap().push(id as i64));
    // b answers a's notification twice: both unexpected at a.
    hello(&mut a, 1, None);
    b.expect_msg(CoolMsgKind::HelloThere, |chan, m| {
        for n in [2, 3] {
            let mut rsp = chan.create_msg();
            rsp.init_root().init_hello_there().set_num(n);
            chan.send(&mut rsp, Some(&m)).unwrap();
        }
    })
    .unwrap();
    b.run_for(SHORT).unwrap();
    a.unset_unexpected_response_handler();
    a.run_for(SHORT).unwrap();
    b.run_for(SHORT).unwrap();
    assert!(local.lock().unwrap().is_empty(), "unset: not called");
    assert_eq!(
        remote.lock().unwrap().len(),
        2,
        "the sender still hears of both"
    );
    b.unset_remote_unexpected_response_handler();
}

#[test]
fn a_bogus_handle_from_the_peer_is_a_specific_error_once() {
    // A structured channel in SHM mode receives a message frame whose handle names a pool of
    // an arena it never heard of.
    let (mut raw, b) = transport::Channel::pair(channel_config()).unwrap();
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let mut b = Channel::<cool_msg::Owned>::new(b, Backing::Shm(arena)).unwrap();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = errors.clone();
    b.start(move |e| e2.lock().unwrap().push(format!("{e:?}")))
        .unwrap();
    let mut frame = vec![0u8; 24];
    frame[0] = 2; // an in-place message
    frame[8] = 1; // id 1
    let mut blob = [0u8; 32];
    blob[..4].copy_from_slice(b"FIPL");
    blob[20..24].copy_from_slice(&0x1234_5678u32.to_le_bytes()); // no such arena
    frame.extend_from_slice(&blob);
    raw.send(&frame).unwrap();
    raw.send(&frame).unwrap();
    assert!(matches!(b.run_for(SHORT), Err(Error::Hosed)));
    assert!(matches!(b.run_for(SHORT), Err(Error::Hosed)));
    let errors = errors.lock().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("ForeignBlob") && errors[0].contains("from_peer: true"),
        "{errors:?}"
    );
}

#[test]
fn a_dropped_async_channel_closes_its_socket_and_frees_its_messages() {
    // The library thread's state must not keep itself alive: once the channel is dropped its
    // socket is closed (the peer sees the end) and messages it held are freed.
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let (a, mut b) = pair(Backing::Shm(arena.clone()), Backing::Heap);
    b.start(|_| {}).unwrap();
    let a = AsyncChannel::new(a).unwrap();
    a.start(|_| {}).unwrap();
    // A message from b waits in a's cache (nobody expects it); one from a is sent to b.
    hello(&mut b, 1, None);
    let mut m = a.create_msg();
    m.init_root().init_hello_there().set_num(2);
    a.send(&mut m, None).unwrap();
    drop(m);
    std::thread::sleep(SHORT);
    drop(a);
    let got = log();
    let g = got.clone();
    b.expect_msgs(CoolMsgKind::HelloThere, move |_, m| {
        g.lock().unwrap().push(num_of(&m))
    })
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let end = loop {
        if let Err(e) = b.run_for(SHORT) {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped channel's socket is still open"
        );
    };
    assert_eq!(*got.lock().unwrap(), [2]);
    assert!(matches!(end, Error::Hosed), "{end:?}");
    drop(b);
    assert_eq!(arena.stats().blocks_in_use, 0);
}
