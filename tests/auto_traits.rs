//! The auto traits of every public type, checked at compile time (a regression here is an API
//! break), and the size of what crosses the socket.

use flowipc::shm::{
    Arena, ArenaConfig, Block, BlockRef, Error, LendBlob, Pool, ReceiveError, ShmHandle, Stats,
};
use static_assertions::{assert_impl_all, assert_not_impl_any};
use std::sync::atomic::AtomicU64;

assert_impl_all!(Arena: Send, Sync, Clone, std::fmt::Debug);
assert_impl_all!(Pool: Send, Sync, std::fmt::Debug);
assert_impl_all!(Block<'static>: Send, Sync, std::fmt::Debug);
assert_not_impl_any!(Block<'static>: Clone);
assert_impl_all!(ShmHandle<AtomicU64>: Send, Sync, Clone, std::fmt::Debug);
assert_impl_all!(LendBlob: Send, Sync, Copy, Eq, std::hash::Hash, std::fmt::Debug);
assert_impl_all!(BlockRef: Send, Sync, Copy, Eq, std::hash::Hash);
assert_impl_all!(Stats: Send, Sync, Copy, Eq);
assert_impl_all!(Error: Send, Sync, std::error::Error);
assert_impl_all!(ReceiveError: Send, Sync, std::error::Error);

// Messages: an out-message and a channel move between threads; an in-message too (its capnp
// reader counts traversal in a `Cell`, so it is not `Sync`).
type Root = flowipc::schemas::test_msgs_capnp::cool_msg::Owned;
assert_impl_all!(flowipc::msg::MsgOut<Root>: Send, Sync, std::fmt::Debug);
assert_impl_all!(flowipc::msg::MsgIn<Root>: Send, std::fmt::Debug);
assert_impl_all!(flowipc::msg::MsgChannel<Root>: Send, std::fmt::Debug);
assert_impl_all!(flowipc::msg::Error: Send, Sync, std::error::Error);

// Sessions: every method takes `&self` and may be called from any thread.
use flowipc::session as sn;
assert_impl_all!(sn::Session: Send, Sync, std::fmt::Debug);
assert_impl_all!(sn::ClientSession: Send, Sync, std::fmt::Debug);
assert_impl_all!(sn::ServerSession: Send, Sync, std::fmt::Debug);
assert_impl_all!(sn::SessionServer: Send, Sync, std::fmt::Debug);
assert_impl_all!(sn::Error: Send, Sync, std::error::Error);
assert_impl_all!(sn::Metadata: Send, Sync, Clone, std::fmt::Debug);
assert_impl_all!(sn::App: Send, Sync, Clone, Eq, std::fmt::Debug);
assert_impl_all!(sn::ServerApp: Send, Sync, Clone, Eq, std::fmt::Debug);

#[test]
fn a_lend_blob_is_32_bytes_and_errors_read_well() {
    assert_eq!(std::mem::size_of::<LendBlob>(), 32);
    let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20)).unwrap();
    let e = arena.alloc(usize::MAX).unwrap_err();
    assert!(
        e.to_string().contains("exceed the largest possible block"),
        "{e}"
    );
    let e = LendBlob::from_bytes(&[0; 3]).unwrap_err();
    assert_eq!(e.to_string(), "lend blob of 3 bytes, expected 32");
}

/// Every error that has a cause shows it once in a report: either its `Display` says what
/// failed and `source()` returns the cause, or it is transparent (shows as its cause, whose own
/// source comes next). Walks each chain and checks that no message contains the next one.
#[test]
fn errors_show_their_cause_once() {
    use flowipc::{msg, session, struc, transport};
    let io = || std::io::Error::from_raw_os_error(2);
    let shm_io = || Error::Io {
        op: "memfd_create",
        source: io(),
    };
    let errors: Vec<Box<dyn std::error::Error>> = vec![
        Box::new(shm_io()),
        Box::new(ReceiveError::Io(io())),
        Box::new(ReceiveError::Arena(shm_io())),
        Box::new(transport::Error::Io(io())),
        Box::new(msg::Error::Transport(transport::Error::Io(io()))),
        Box::new(msg::Error::Shm {
            source: Error::Stale,
            from_peer: true,
        }),
        Box::new(struc::Error::Msg(msg::Error::Shm {
            source: shm_io(),
            from_peer: false,
        })),
        Box::new(struc::Error::Decode(capnp::Error::failed("bad".into()))),
        Box::new(session::Error::Io(io())),
        Box::new(session::Error::ServerAbsent(io())),
        Box::new(session::Error::Shm(shm_io())),
        Box::new(session::Error::Transport(transport::Error::Io(io()))),
        Box::new(session::Error::Channel(struc::Error::Msg(
            msg::Error::Transport(transport::Error::Io(io())),
        ))),
    ];
    for e in errors {
        let mut chain = vec![e.to_string()];
        let mut cur = e.source();
        while let Some(c) = cur {
            chain.push(c.to_string());
            cur = c.source();
        }
        // A transparent wrapper of a leaf (an I/O error) shows as the leaf, with no cause.
        let leaf = e.to_string() == io().to_string();
        assert!(chain.len() >= 2 || leaf, "{e:?} has no cause");
        for pair in chain.windows(2) {
            assert!(
                !pair[0].contains(&pair[1]),
                "{e:?}: {:?} repeats its cause {:?}",
                pair[0],
                pair[1]
            );
        }
    }
}
