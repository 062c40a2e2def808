//! Large messages in steady state: once a message of some size was built and dropped, the next
//! ones of that size reuse its blocks (no new pool space, no page faults), whoever frees them.

use flowipc::msg::{Backing, MsgChannel, MsgOut};
use flowipc::schemas::perf_demo_capnp::body;
use flowipc::shm::{Arena, ArenaConfig};
use flowipc::transport::{Channel, ChannelConfig};

const PART: usize = 16 << 10;

/// Minor page faults of the calling thread (other tests' threads do not count).
fn thread_faults() -> i64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD)
        .unwrap()
        .minor_page_faults()
}

/// A `GetCacheRsp` of `size` bytes in 16 KiB parts, every byte written (as a real response's).
fn build(arena: &Arena, size: usize) -> MsgOut<body::Owned> {
    let mut msg = MsgOut::<body::Owned>::new_in(arena);
    let parts = size.div_ceil(PART);
    let mut list = msg
        .init_root()
        .init_get_cache_rsp()
        .init_file_parts(parts as u32);
    for i in 0..parts {
        let len = PART.min(size - i * PART);
        let mut part = list.reborrow().get(i as u32);
        part.set_data_size_to_verify(len as u64);
        part.init_data(len as u32).fill(i as u8);
    }
    msg
}

/// Builds 2 and later of a 1 GiB message carve no new pool space and fault no page, whether the
/// builder frees the message (never sent) or its segment table does (sent in place, the
/// receiver done with it first). The default arena's 1 GiB pools do not hold it whole: it
/// spills into a second pool, whose fresh space must not be taken while the first pool's freed
/// extents fit.
#[test]
fn a_1_gib_message_built_again_reuses_its_space() {
    const SIZE: usize = 1 << 30;
    let arena = Arena::create(ArenaConfig::new()).unwrap();
    let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
    let mut tx = MsgChannel::<body::Owned>::new(a, Backing::Shm(arena.clone()));
    let mut rx = MsgChannel::<body::Owned>::new(b, Backing::Heap);
    for round in 1..=4 {
        let (before, faults) = (arena.stats(), thread_faults());
        let mut msg = build(&arena, SIZE);
        let (s, faults) = (arena.stats(), thread_faults() - faults);
        // Carved near what is live: the message and a few small blocks' spans.
        assert!(s.bytes_in_use >= SIZE as u64, "{s:?}");
        assert!(s.bytes_reserved - s.bytes_in_use < 4 << 20, "{s:?}");
        if round == 1 {
            assert!(faults > 200_000, "the first build maps its pages: {faults}");
            assert_eq!(s.pools, 2, "{s:?}");
        } else {
            assert_eq!(
                (s.bytes_reserved, s.pools),
                (before.bytes_reserved, before.pools),
                "build {round} carved new space"
            );
            // Heap bookkeeping may touch a page or two; the message's 262,144 are reused.
            assert!(faults < 256, "build {round}: {faults} page faults");
        }
        if round % 2 == 0 {
            tx.send(&mut msg, None).unwrap();
            let got = rx.recv_blocking(None).unwrap().unwrap();
            assert!(got.is_zero_copy());
            drop(got);
        }
        drop(msg);
        assert_eq!(arena.stats().blocks_in_use, 0);
    }
    arena.verify().unwrap();
}
