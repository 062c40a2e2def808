//! The process's one library thread: every async face (transport and structured
//! `AsyncChannel`s) runs on it, however many there are; a blocking call from one of its
//! handlers fails instead of hanging every channel; a panicking handler stops only its channel.
mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::balance::{isolated, start_library_thread};
use flowipc::msg::Backing;
use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
use flowipc::struc::{self, Error as StrucError};
use flowipc::transport::{self, AsyncChannel, Channel, ChannelConfig};

const T: Duration = Duration::from_secs(20);

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

type Cool = cool_msg::Owned;

/// `n` transport and `n` structured async channels, each answering its peer (a sync core kept
/// here): a frame is echoed, a sum request is answered.
struct Faces {
    transport: Vec<(AsyncChannel, Channel, mpsc::Receiver<Vec<u8>>)>,
    structured: Vec<(struc::AsyncChannel<Cool>, struc::Channel<Cool>)>,
}

fn faces(n: usize) -> Faces {
    let mut f = Faces {
        transport: Vec::new(),
        structured: Vec::new(),
    };
    for _ in 0..n {
        let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
        let (tx, rx) = mpsc::channel();
        let a = AsyncChannel::start(a, move |fr| tx.send(fr.payload.to_vec()).unwrap(), |_| {})
            .unwrap();
        f.transport.push((a, b, rx));

        let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
        let server = sum_server(a);
        let mut client = struc::Channel::<Cool>::new(b, Backing::Heap).unwrap();
        client.start(|e| panic!("client: {e}")).unwrap();
        f.structured.push((server, client));
    }
    f
}

fn exercise(f: &mut Faces) {
    for (i, (a, b, rx)) in f.transport.iter_mut().enumerate() {
        b.send(format!("to {i}").as_bytes()).unwrap();
        assert_eq!(rx.recv_timeout(T).unwrap(), format!("to {i}").as_bytes());
        a.send(b"back").unwrap();
        assert_eq!(
            &*b.recv_blocking(Some(T)).unwrap().unwrap().payload,
            b"back"
        );
    }
    for (_, client) in f.structured.iter_mut() {
        let mut req = client.create_msg();
        req.init_root().init_sum_request();
        let rsp = client.sync_request(&mut req, None, Some(T)).unwrap();
        assert!(matches!(
            rsp.which().unwrap(),
            cool_msg::SumResponse(Ok(s)) if s.get_sum() == 7
        ));
    }
}

#[test]
fn one_library_thread_serves_one_or_sixteen_async_channels() {
    isolated(
        "one_library_thread_serves_one_or_sixteen_async_channels",
        || {
            let before = threads();
            let mut one = faces(1);
            exercise(&mut one);
            let with_one = threads();
            let mut sixteen = faces(16);
            exercise(&mut sixteen);
            let with_seventeen = threads();
            drop(one);
            drop(sixteen);
            // The library thread may have started with the first channel (not before: nothing
            // else of flowipc ran in this process).
            assert!(
                with_one <= before + 1,
                "threads: {before} before, {with_one} with one of each face"
            );
            assert_eq!(
                with_seventeen, with_one,
                "threads with 17 of each face against 1 of each"
            );
        },
    );
}

/// A struc server on the library thread answering `sumRequest` with 7.
fn sum_server(chan: Channel) -> struc::AsyncChannel<Cool> {
    let server =
        struc::AsyncChannel::new(struc::Channel::new(chan, Backing::Heap).unwrap()).unwrap();
    server
        .expect_msgs(
            CoolMsgKind::SumRequest,
            |chan: &mut struc::Channel<Cool>, req| {
                let mut rsp = chan.create_msg();
                rsp.init_root().init_sum_response().set_sum(7);
                chan.send(&mut rsp, Some(&req)).unwrap();
            },
        )
        .unwrap();
    server.start(|_| {}).unwrap();
    server
}

#[test]
fn a_handler_may_wait_for_a_response_served_by_the_same_library_thread() {
    start_library_thread();
    let (a, mut b) = Channel::pair(ChannelConfig::new()).unwrap();
    let (c, d) = Channel::pair(ChannelConfig::new()).unwrap();
    // Both ends of the second channel live on the library thread: the handler below waits
    // there for a response that only that thread can produce and receive.
    let _server = sum_server(c);
    let client = Arc::new(
        struc::AsyncChannel::new(struc::Channel::<Cool>::new(d, Backing::Heap).unwrap()).unwrap(),
    );
    client.start(|_| {}).unwrap();

    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let cl = client.clone();
    let asker = AsyncChannel::start(
        a,
        move |_frame| {
            let mut req = cl.create_msg();
            req.init_root().init_sum_request();
            let r =
                cl.sync_request(&mut req, None, Some(T))
                    .map(|rsp| match rsp.which().unwrap() {
                        cool_msg::SumResponse(Ok(s)) => s.get_sum(),
                        _ => -1,
                    });
            tx.lock().unwrap().send(r).unwrap();
        },
        |_| {},
    )
    .unwrap();
    for _ in 0..3 {
        b.send(b"go").unwrap();
        let r = rx.recv_timeout(T).unwrap();
        assert!(matches!(r, Ok(7)), "{r:?}");
    }
    asker.send(b"still here").unwrap();
    assert_eq!(
        &*b.recv_blocking(Some(T)).unwrap().unwrap().payload,
        b"still here"
    );
}

#[test]
fn an_async_channel_called_from_its_own_handler_says_so() {
    start_library_thread();
    let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
    let me: Arc<std::sync::OnceLock<std::sync::Weak<struc::AsyncChannel<Cool>>>> = Arc::default();
    let server = Arc::new(
        struc::AsyncChannel::new(struc::Channel::<Cool>::new(a, Backing::Heap).unwrap()).unwrap(),
    );
    let _ = me.set(Arc::downgrade(&server));
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let m = me.clone();
    server
        .expect_msgs(
            CoolMsgKind::SumRequest,
            move |chan: &mut struc::Channel<Cool>, req| {
                let own = m.get().and_then(|w| w.upgrade()).unwrap();
                let mut rsp = chan.create_msg();
                rsp.init_root().init_sum_response().set_sum(1);
                // Through the AsyncChannel: refused; through the handler's core: fine.
                let wrong = own.send(&mut rsp, Some(&req));
                let right = chan.send(&mut rsp, Some(&req));
                tx.lock().unwrap().send((wrong, right)).unwrap();
            },
        )
        .unwrap();
    server.start(|_| {}).unwrap();
    let mut client = struc::Channel::<Cool>::new(b, Backing::Heap).unwrap();
    client.start(|e| panic!("{e}")).unwrap();
    let mut req = client.create_msg();
    req.init_root().init_sum_request();
    let rsp = client.sync_request(&mut req, None, Some(T)).unwrap();
    assert!(matches!(rsp.which().unwrap(), cool_msg::SumResponse(Ok(s)) if s.get_sum() == 1));
    let (wrong, right) = rx.recv_timeout(T).unwrap();
    assert!(matches!(wrong, Err(StrucError::InOwnHandler)), "{wrong:?}");
    assert!(right.is_ok(), "{right:?}");
    assert!(!server.is_hosed());
}

const SHORT: Duration = Duration::from_millis(50);

#[test]
fn a_panicking_handler_stops_only_its_own_channel() {
    start_library_thread();
    let (a, mut b) = Channel::pair(ChannelConfig::new()).unwrap();
    let (c, mut d) = Channel::pair(ChannelConfig::new()).unwrap();
    let panicky =
        AsyncChannel::start(a, |_| panic!("a handler panics (on purpose)"), |_| {}).unwrap();
    let (tx, rx) = mpsc::channel();
    let calm =
        AsyncChannel::start(c, move |f| tx.send(f.payload.to_vec()).unwrap(), |_| {}).unwrap();
    b.send(b"boom").unwrap();
    // Give the panic time to happen, then check the other channel goes on, both ways.
    std::thread::sleep(SHORT);
    d.send(b"calm").unwrap();
    assert_eq!(rx.recv_timeout(T).unwrap(), b"calm");
    calm.send(b"reply").unwrap();
    assert_eq!(
        &*d.recv_blocking(Some(T)).unwrap().unwrap().payload,
        b"reply"
    );
    // The panicked one is hosed: it answers `Hosed`, and an end-sending completion gets it.
    let r = panicky.send(b"after the panic");
    assert!(matches!(r, Err(transport::Error::Hosed)), "{r:?}");
    let (tx, rx) = mpsc::channel();
    panicky.async_end_sending(move |r| tx.send(r).unwrap());
    let r = rx.recv_timeout(T).unwrap();
    assert!(matches!(r, Err(transport::Error::Hosed)), "{r:?}");
    drop(panicky);
}

/// A handler's panic ends its structured channel's waits: a `sync_request` waiting (with no
/// timeout) for a response returns `Hosed` instead of waiting for good.
#[test]
fn a_panicking_handler_ends_its_channels_waits() {
    start_library_thread();
    let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
    let server = Arc::new(
        struc::AsyncChannel::new(struc::Channel::<Cool>::new(a, Backing::Heap).unwrap()).unwrap(),
    );
    server
        .expect_msgs(
            CoolMsgKind::HelloThere,
            |_: &mut struc::Channel<Cool>, _| panic!("a handler panics (on purpose)"),
        )
        .unwrap();
    server.start(|_| {}).unwrap();
    let mut peer = struc::Channel::<Cool>::new(b, Backing::Heap).unwrap();
    peer.start(|_| {}).unwrap();
    let (tx, rx) = mpsc::channel();
    let s = server.clone();
    let waiter = std::thread::spawn(move || {
        let mut req = s.create_msg();
        req.init_root().init_sum_request();
        tx.send(s.sync_request(&mut req, None, None).map(|_| ()))
            .unwrap();
    });
    // The request reaches the peer, which never answers; then the peer's hello panics the
    // server's handler.
    let got = loop {
        peer.run_for(SHORT).unwrap();
        if let Some(m) = peer.take_cached(CoolMsgKind::SumRequest).unwrap() {
            break m;
        }
    };
    drop(got);
    let mut hello = peer.create_msg();
    hello.init_root().init_hello_there().set_num(1);
    peer.send(&mut hello, None).unwrap();
    let r = rx.recv_timeout(T).unwrap();
    assert!(matches!(r, Err(StrucError::Hosed)), "{r:?}");
    waiter.join().unwrap();
    assert!(server.is_hosed());
}
