//! The process's one library thread: every async face (transport and structured
//! `AsyncChannel`s) runs on it, however many there are; a blocking call from one of its
//! handlers fails instead of hanging every channel; a panicking handler stops only its channel.
mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::balance::{isolated, start_library_thread};
use flowipc::msg::Backing;
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::struc::{self, Error as StrucError, MsgType};
use flowipc::transport::{AsyncChannel, Channel, ChannelConfig};

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
        let server =
            struc::AsyncChannel::new(struc::Channel::new(a, Backing::Heap).unwrap()).unwrap();
        server
            .expect_msgs(
                MsgType::of::<Cool>("sumRequest").unwrap(),
                |chan: &mut struc::Channel<Cool>, req| {
                    let mut rsp = chan.create_msg();
                    rsp.init_root().init_sum_response().set_sum(7);
                    chan.send(&mut rsp, Some(&req)).unwrap();
                },
            )
            .unwrap();
        server.start(|_| {}).unwrap();
        let mut client = struc::Channel::<Cool>::new(b, Backing::Heap).unwrap();
        client.start(|e| panic!("client: {e}")).unwrap();
        f.structured.push((server, client));
    }
    f
}

fn exercise(f: &mut Faces) {
    for (i, (a, b, rx)) in f.transport.iter_mut().enumerate() {
        b.send(format!("to {i}").as_bytes(), None).unwrap();
        assert_eq!(rx.recv_timeout(T).unwrap(), format!("to {i}").as_bytes());
        a.send(b"back", None).unwrap();
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
            rsp.root().unwrap().which().unwrap(),
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

#[test]
fn a_sync_request_from_a_handler_fails_instead_of_hanging_every_channel() {
    start_library_thread();
    let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
    let (c, d) = Channel::pair(ChannelConfig::new()).unwrap();
    // `other` is answered on the library thread too: a handler waiting for its answer there
    // would wait forever.
    let other = Arc::new(
        struc::AsyncChannel::new(struc::Channel::<Cool>::new(c, Backing::Heap).unwrap()).unwrap(),
    );
    other.start(|_| {}).unwrap();
    let mut other_peer = struc::Channel::<Cool>::new(d, Backing::Heap).unwrap();
    other_peer.start(|e| panic!("{e}")).unwrap();

    let (tx, rx) = mpsc::channel();
    let o = other.clone();
    let tx = Mutex::new(tx);
    let asker = AsyncChannel::start(
        a,
        move |_frame| {
            let mut req = o.create_msg();
            req.init_root().init_sum_request();
            let r = o.sync_request(&mut req, None, Some(Duration::from_secs(5)));
            tx.lock().unwrap().send(r.map(|_| ())).unwrap();
        },
        |_| {},
    )
    .unwrap();
    let mut b = b;
    b.send(b"go", None).unwrap();
    let r = rx.recv_timeout(T).unwrap();
    assert!(matches!(r, Err(StrucError::OnLibraryThread)), "{r:?}");
    // Nothing was sent or broken: both channels still work.
    assert!(!other.is_hosed());
    let mut req = other.create_msg();
    req.init_root().init_hello_there().set_num(5);
    other.send(&mut req, None).unwrap();
    let (seen_tx, seen_rx) = mpsc::channel();
    for name in ["sumRequest", "helloThere"] {
        let seen = seen_tx.clone();
        other_peer
            .expect_msgs(MsgType::of::<Cool>(name).unwrap(), move |_, _| {
                seen.send(name).unwrap();
            })
            .unwrap();
    }
    let first = loop {
        other_peer.run_for(SHORT).unwrap();
        if let Ok(name) = seen_rx.try_recv() {
            break name;
        }
    };
    assert_eq!(first, "helloThere");
    other_peer.run_for(SHORT).unwrap();
    assert!(
        seen_rx.try_recv().is_err(),
        "only the hello came: no request was sent"
    );
    asker.send(b"still here", None).unwrap();
    assert_eq!(
        &*b.recv_blocking(Some(T)).unwrap().unwrap().payload,
        b"still here"
    );
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
    b.send(b"boom", None).unwrap();
    // Give the panic time to happen, then check the other channel goes on, both ways.
    std::thread::sleep(SHORT);
    d.send(b"calm", None).unwrap();
    assert_eq!(rx.recv_timeout(T).unwrap(), b"calm");
    calm.send(b"reply", None).unwrap();
    assert_eq!(
        &*d.recv_blocking(Some(T)).unwrap().unwrap().payload,
        b"reply"
    );
    // The panicked one still sends from the caller's thread; it no longer receives.
    panicky.send(b"sent anyway", None).unwrap();
    assert_eq!(
        &*b.recv_blocking(Some(T)).unwrap().unwrap().payload,
        b"sent anyway"
    );
    drop(panicky);
}
