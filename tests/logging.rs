//! The `log` facade: what flowipc tells an application's logger (nothing without one). Each
//! event is logged once, by the layer that met it, under the target `flowipc::<module>`: a
//! channel hosed and why (the peer gone: info; bad input: warn), a refused log-in and why (both
//! sides), arena growth. The peer's graceful end is not logged as an error.
//!
//! One test (the logger is process-wide), run in its own test binary.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::session::{universe, RunDir, T};
use flowipc::msg::{Backing, MsgChannel};
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::session::{ClientSession, SessionConfig, SessionServer, ShmKind};
use flowipc::shm::{Arena, ArenaConfig};
use flowipc::struc;
use flowipc::transport::{Channel, ChannelConfig};

/// Every record: (level, target, text).
static RECORDS: Mutex<Vec<(log::Level, String, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target().starts_with("flowipc")
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            RECORDS
                .lock()
                .unwrap()
                .push((r.level(), r.target().to_string(), r.args().to_string()));
        }
    }
    fn flush(&self) {}
}

static LOGGER: Capture = Capture;

/// Runs `f` and returns what it logged.
fn logged(f: impl FnOnce()) -> Vec<(log::Level, String, String)> {
    RECORDS.lock().unwrap().clear();
    f();
    std::mem::take(&mut *RECORDS.lock().unwrap())
}

#[test]
fn each_event_is_logged_once_by_the_layer_that_met_it() {
    // Without a logger nothing is recorded (and nothing breaks): the facade is silent.
    let quiet = logged(|| {
        let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
        drop(a);
        let mut b = MsgChannel::<cool_msg::Owned>::new(b, Backing::Heap);
        assert!(b.recv_blocking(T).is_err());
    });
    assert!(quiet.is_empty(), "{quiet:?}");
    log::set_logger(&LOGGER).unwrap();
    log::set_max_level(log::LevelFilter::Trace);

    // The peer gone, under a message channel: one info line, the transport's.
    let recs = logged(|| {
        let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
        drop(a);
        let mut b = MsgChannel::<cool_msg::Owned>::new(b, Backing::Heap);
        assert!(b.recv_blocking(T).is_err());
    });
    assert_eq!(
        recs,
        [(
            log::Level::Info,
            "flowipc::transport".to_string(),
            "channel hosed: peer closed the connection".to_string()
        )]
    );

    // Bad input met by the message layer: one warning, its own (not the transport's, which
    // is only abandoned, nor the structured channel's above it).
    let recs = logged(|| {
        let (mut raw, b) = Channel::pair(ChannelConfig::new()).unwrap();
        let mut b = struc::Channel::<cool_msg::Owned>::new(b, Backing::Heap).unwrap();
        b.start(|_| {}).unwrap();
        raw.send(&[7; 40]).unwrap();
        assert!(b.run_for(Duration::from_millis(100)).is_err());
    });
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].0, log::Level::Warn);
    assert_eq!(recs[0].1, "flowipc::msg");
    assert_eq!(
        recs[0].2,
        "channel hosed: malformed message from the peer: reserved header bytes are not zero"
    );

    // The graceful end: nothing (it is no error).
    let recs = logged(|| {
        let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
        let mut a = struc::Channel::<cool_msg::Owned>::new(a, Backing::Heap).unwrap();
        let mut b = struc::Channel::<cool_msg::Owned>::new(b, Backing::Heap).unwrap();
        b.start(|e| panic!("{e}")).unwrap();
        assert!(a.end_sending_blocking(T).unwrap());
        b.run().unwrap();
        assert!(b.is_peer_ended());
        // And back: both ended, then closed (no one is still receiving: no peer gone).
        assert!(b.end_sending_blocking(T).unwrap());
        a.start(|e| panic!("{e}")).unwrap();
        a.run().unwrap();
    });
    assert!(recs.is_empty(), "{recs:?}");

    // Arena growth: info, with the new pool's size.
    let recs = logged(|| {
        let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20)).unwrap();
        let _big = arena.alloc_zeroed(2 << 20).unwrap();
    });
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].0, log::Level::Info);
    assert_eq!(recs[0].1, "flowipc::shm");
    assert!(recs[0].2.contains("grew: pool 1 of"), "{recs:?}");

    // A refused log-in: a warning on each side, with the reason.
    let dir = RunDir::new();
    let u = universe(&dir.0);
    let recs = logged(|| {
        let server = SessionServer::builder(&u.srv, &u.clients).build().unwrap();
        let mut client = ClientSession::new(&u.cli, &u.srv, |_| {})
            .config(SessionConfig::new().with_shm(ShmKind::Heap));
        assert!(client.sync_connect().is_err());
        assert!(server.accept(T).is_err());
    });
    let refusals: Vec<_> = recs
        .iter()
        .filter(|(l, t, m)| {
            *l == log::Level::Warn && t == "flowipc::session" && m.contains("log-in refused")
        })
        .collect();
    assert_eq!(refusals.len(), 2, "{recs:?}");
    assert!(
        refusals.iter().any(|(_, _, m)| m.contains("by the server")),
        "{recs:?}"
    );
    assert!(
        refusals.iter().all(|(_, _, m)| m.contains("Config")),
        "{recs:?}"
    );
}
