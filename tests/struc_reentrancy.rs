//! The structured channel under re-entrancy and at its edges: handlers that receive (nested
//! `process_ready`, nested `sync_request`), undo and re-register from inside handlers, notices
//! after end-sending, hosing met in nested receives and in the async face's flushes, `on_error`
//! calling the channel, requests before `start`. (Each was a bug found in review.)
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use flowipc::msg::{Backing, MsgIn, MsgOut};
use flowipc::schemas::perf_demo_capnp::body;
use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
use flowipc::struc::{AsyncChannel, Channel, Error, Expect, MsgType};
use flowipc::transport::{self, ChannelConfig};

type Cool = Channel<cool_msg::Owned>;
type In = MsgIn<cool_msg::Owned>;
const SHORT: Duration = Duration::from_millis(50);

fn started() -> (Cool, Cool) {
    let (a, b) = transport::Channel::pair(ChannelConfig::new()).unwrap();
    let mut a = Cool::new(a, Backing::Heap).unwrap();
    let mut b = Cool::new(b, Backing::Heap).unwrap();
    a.start(|e| panic!("a: {e}")).unwrap();
    b.start(|e| panic!("b: {e}")).unwrap();
    (a, b)
}
fn hello_msg(c: &Cool, n: i64) -> MsgOut<cool_msg::Owned> {
    let mut m = c.create_msg();
    m.init_root().init_hello_there().set_num(n);
    m
}
fn hello(c: &mut Cool, n: i64, orig: Option<&In>) {
    let mut m = hello_msg(c, n);
    c.send(&mut m, orig).unwrap();
}
fn num(m: &In) -> i64 {
    match m.which().unwrap() {
        cool_msg::HelloThere(h) => h.unwrap().get_num(),
        cool_msg::SumResponse(s) => s.unwrap().get_sum(),
        _ => -1,
    }
}
fn sum_rsp(c: &mut Cool, n: i64, orig: &In) {
    let mut m = c.create_msg();
    m.init_root().init_sum_response().set_sum(n);
    c.send(&mut m, Some(orig)).unwrap();
}
fn sum_req(c: &Cool) -> MsgOut<cool_msg::Owned> {
    let mut m = c.create_msg();
    m.init_root().init_sum_request();
    m
}

/// F1: messages arriving while an expect_msgs handler runs a nested receive are cached and
/// never drained: later messages overtake them.
#[test]
fn f1_nested_receive_in_expect_msgs_handler_strands_cache() {
    let (mut a, mut b) = started();
    let got: Arc<Mutex<Vec<i64>>> = Arc::default();
    let g = got.clone();
    b.expect_msgs(CoolMsgKind::HelloThere, move |ch, m| {
        let n = num(&m);
        g.lock().unwrap().push(n);
        if n == 1 {
            ch.process_ready().unwrap();
        } // nested receive
    })
    .unwrap();
    for n in 1..=3 {
        hello(&mut a, n, None);
    }
    b.run_for(SHORT).unwrap();
    hello(&mut a, 4, None);
    b.run_for(SHORT).unwrap();
    assert_eq!(
        b.cached(CoolMsgKind::HelloThere),
        0,
        "stranded in the cache"
    );
    assert_eq!(*got.lock().unwrap(), [1, 2, 3, 4]);
}

/// F2: a sync_request nested (in a handler) inside another sync_request overwrites
/// `sync_waiting`: the outer response becomes "unexpected" and the outer call times out.
#[test]
fn f2_nested_sync_request_loses_outer_response() {
    let (mut a, mut b) = started();
    let server = std::thread::spawn(move || {
        let mut reqs = Vec::new();
        b.expect_msgs(CoolMsgKind::SumRequest, |_, _| {}).unwrap();
        b.undo_expect_msgs(CoolMsgKind::SumRequest).unwrap();
        while reqs.is_empty() {
            b.run_for(SHORT).unwrap();
            while let Some(m) = b.take_cached(CoolMsgKind::SumRequest).unwrap() {
                reqs.push(m);
            }
        }
        hello(&mut b, 7, None); // notification first,
        sum_rsp(&mut b, 1, &reqs[0]); // then the answer to R1
        while reqs.len() < 2 {
            b.run_for(SHORT).unwrap();
            while let Some(m) = b.take_cached(CoolMsgKind::SumRequest).unwrap() {
                reqs.push(m);
            }
        }
        sum_rsp(&mut b, 2, &reqs[1]); // answer to R2
        b.run_for(Duration::from_millis(500)).unwrap();
    });
    let unexpected = Arc::new(AtomicUsize::new(0));
    let u = unexpected.clone();
    a.set_unexpected_response_handler(move |_, _| {
        u.fetch_add(1, Ordering::SeqCst);
    });
    a.expect_msg(CoolMsgKind::HelloThere, |ch, _| {
        let mut r2 = sum_req(ch);
        let rsp = ch
            .sync_request(&mut r2, None, Some(Duration::from_secs(1)))
            .unwrap();
        assert_eq!(num(&rsp), 2);
    })
    .unwrap();
    let mut r1 = sum_req(&a);
    let r = a.sync_request(&mut r1, None, Some(Duration::from_millis(300)));
    server.join().unwrap();
    assert_eq!(
        unexpected.load(Ordering::SeqCst),
        0,
        "outer response counted unexpected"
    );
    assert_eq!(num(&r.expect("outer sync_request")), 1);
}

/// F3: undo + re-register (expect_msgs) from inside a handler fed from the cache: the new
/// handler is overwritten by the old, undone one.
#[test]
fn f3_reregistration_during_cache_drain_is_clobbered() {
    let (mut a, mut b) = started();
    for n in 1..=2 {
        hello(&mut a, n, None);
    }
    b.run_for(SHORT).unwrap();
    assert_eq!(b.cached(CoolMsgKind::HelloThere), 2);
    let who: Arc<Mutex<Vec<(&str, i64)>>> = Arc::default();
    let w = who.clone();
    b.expect_msgs(CoolMsgKind::HelloThere, move |ch, m| {
        w.lock().unwrap().push(("old", num(&m)));
        ch.undo_expect_msgs(CoolMsgKind::HelloThere).unwrap();
        let w2 = w.clone();
        ch.expect_msgs(CoolMsgKind::HelloThere, move |_, m| {
            w2.lock().unwrap().push(("new", num(&m)))
        })
        .unwrap();
    })
    .unwrap();
    hello(&mut a, 3, None);
    b.run_for(SHORT).unwrap();
    assert_eq!(*who.lock().unwrap(), [("old", 1), ("new", 2), ("new", 3)]);
}

/// F4: a second response to an Indefinite request arriving while its handler runs a nested
/// receive is treated as an unexpected response (handler fires, notice goes to the peer).
#[test]
fn f4_indefinite_response_during_nested_receive_is_unexpected() {
    let (mut a, mut b) = started();
    let unexpected = Arc::new(AtomicUsize::new(0));
    let u = unexpected.clone();
    a.set_unexpected_response_handler(move |_, _| {
        u.fetch_add(1, Ordering::SeqCst);
    });
    let got: Arc<Mutex<Vec<i64>>> = Arc::default();
    let g = got.clone();
    let mut req = sum_req(&a);
    a.async_request(&mut req, None, Expect::Indefinite, move |ch, m| {
        g.lock().unwrap().push(num(&m));
        ch.process_ready().unwrap();
    })
    .unwrap();
    b.run_for(SHORT).unwrap();
    let r = b.take_cached(CoolMsgKind::SumRequest).unwrap().unwrap();
    sum_rsp(&mut b, 1, &r);
    sum_rsp(&mut b, 2, &r);
    a.run_for(SHORT).unwrap();
    assert_eq!(unexpected.load(Ordering::SeqCst), 0);
    assert_eq!(*got.lock().unwrap(), [1, 2]);
}

/// F5: the async face's library thread discards flush()'s hosing error: on_error never fires.
#[test]
fn f5_async_flush_error_is_never_reported() {
    let (a, b) = transport::Channel::pair(ChannelConfig::new()).unwrap();
    let a = AsyncChannel::new(Cool::new(a, Backing::Heap).unwrap()).unwrap();
    let (tx, rx) = mpsc::channel();
    a.start(move |e| {
        let _ = tx.send(e.to_string());
    })
    .unwrap();
    // Big enough to stay queued (the peer never reads).
    let mut m = a.create_msg();
    let mut ch = m.init_root().init_blob().init_chunks(1);
    ch.reborrow().get(0).set_data(&vec![7u8; 8 << 20]);
    a.send(&mut m, None).unwrap();
    std::thread::sleep(SHORT);
    drop(b);
    let r = rx.recv_timeout(Duration::from_secs(2));
    assert!(a.is_hosed());
    r.expect("on_error never called although the channel is hosed");
}

/// F6: after end_sending, an unexpected response makes process_ready fail (SendingEnded from
/// the internal notice), stopping mid-batch.
#[test]
fn f6_notice_after_end_sending_breaks_process_ready() {
    let (mut a, mut b) = started();
    hello(&mut a, 1, None);
    b.run_for(SHORT).unwrap();
    let m = b.take_cached(CoolMsgKind::HelloThere).unwrap().unwrap();
    hello(&mut b, 10, Some(&m)); // a response to a notification: unexpected on a
    hello(&mut b, 11, None);
    a.end_sending().unwrap();
    let r = a.process_ready();
    assert_eq!(a.cached(CoolMsgKind::HelloThere), 1, "batch stopped early");
    r.expect("process_ready");
}

/// F7: a second hosing error met after on_error already fired (hosing inside a nested
/// process_ready) is returned by the outer call: reported twice.
#[test]
fn f7_nested_process_ready_hosing_reported_twice() {
    let (a, b) = transport::Channel::pair(ChannelConfig::new()).unwrap();
    let mut a = Cool::new(a, Backing::Heap).unwrap();
    let mut b = Channel::<body::Owned>::new(b, Backing::Heap).unwrap();
    let errs = Arc::new(AtomicUsize::new(0));
    let e2 = errs.clone();
    b.start(move |_| {
        e2.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    a.start(|_| {}).unwrap();
    b.expect_msgs(MsgType(0), |ch, _| {
        let _ = ch.process_ready();
    })
    .unwrap();
    hello(&mut a, 1, None); // type 0 for Body
    for _ in 0..2 {
        let mut m = a.create_msg();
        m.init_root().set_ping(());
        a.send(&mut m, None).unwrap();
    }
    let r = b.run_for(SHORT);
    assert_eq!(errs.load(Ordering::SeqCst), 1);
    assert!(matches!(r, Err(Error::Hosed)), "second report: {r:?}");
}

/// F8: on_error runs with the core locked on the library thread: calling the AsyncChannel
/// from it (e.g. is_hosed) deadlocks.
#[test]
fn f8_on_error_calling_async_channel_deadlocks() {
    let (a, b) = transport::Channel::pair(ChannelConfig::new()).unwrap();
    let a = Arc::new(AsyncChannel::new(Cool::new(a, Backing::Heap).unwrap()).unwrap());
    let weak = Arc::downgrade(&a);
    let (tx, rx) = mpsc::channel();
    a.start(move |_| {
        if let Some(a) = weak.upgrade() {
            let _ = tx.send(a.is_hosed());
        }
    })
    .unwrap();
    drop(b);
    assert!(
        rx.recv_timeout(Duration::from_secs(2)).is_ok(),
        "on_error deadlocked"
    );
    std::mem::forget(a);
}

/// F9: AsyncChannel::sync_request before start: waits out the timeout (forever with None)
/// instead of NotStarted like the core.
#[test]
fn f9_async_sync_request_before_start() {
    let (a, _b) = transport::Channel::pair(ChannelConfig::new()).unwrap();
    let a = AsyncChannel::new(Cool::new(a, Backing::Heap).unwrap()).unwrap();
    let mut m = a.create_msg();
    m.init_root().init_sum_request();
    let r = a.sync_request(&mut m, None, Some(SHORT));
    assert!(matches!(r, Err(Error::NotStarted)), "{r:?}");
}
