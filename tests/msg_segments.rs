//! A message's segments, in place: written with capnp's own serialization and read back equal,
//! on the sending side (`MsgOut::segments`) and on the receiving side of another process
//! (`MsgIn::segments`, zero-copy and heap); and a capnp `Builder` made elsewhere, adopted as it
//! is (`MsgOut::from_builder`) and sent to another process, in place (a flat copy into the
//! arena) or through the socket.

mod common;

use common::msgs::{chan_over, chunks, chunks_of as content, T};
use flowipc::capnp;
use flowipc::msg::Backing;
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::shm::{Arena, ArenaConfig};

/// Writes `segments` as capnp's stream format and reads the message back from the bytes.
fn round_trip(segments: &[&[u8]]) -> (u64, Vec<Vec<u8>>) {
    let mut bytes = Vec::new();
    capnp::serialize::write_message_segments(&mut bytes, &segments).unwrap();
    let back =
        capnp::serialize::read_message(&mut &bytes[..], capnp::message::ReaderOptions::new())
            .unwrap();
    content(back.get_root::<cool_msg::Reader<'_>>().unwrap())
}

#[test]
#[ignore = "child-process entry point, spawned by the other tests of this file"]
fn child_entry() {
    let Some(role) = common::child_role() else {
        return;
    };
    let backing = match role.as_str() {
        "send_shm" => Backing::Shm(Arena::create(ArenaConfig::new().pool_size(8 << 20)).unwrap()),
        "send_heap" => Backing::Heap,
        "adopt_shm" => {
            return adopt_and_send(Backing::Shm(
                Arena::create(ArenaConfig::new().pool_size(8 << 20)).unwrap(),
            ))
        }
        "adopt_heap" => return adopt_and_send(Backing::Heap),
        other => panic!("unknown role {other}"),
    };
    let mut chan = chan_over(common::child_socket(), backing);
    let mut m = chan.create_msg();
    assert_eq!(m.segment_count(), 0, "no root written yet");
    chunks(&mut m, 3, 5);
    // The sender's segments, written out and read back, say what the message says.
    assert!(m.segment_count() > 1);
    assert_eq!(round_trip(&m.segments()), content(m.root().unwrap()));
    chan.send(&mut m, None).unwrap();
    chan.flush_blocking(T).unwrap();
    // Wait for the reader to finish (its answer), so the message outlives its reading.
    let _ = chan.recv_blocking(T).unwrap();
}

fn receive_and_round_trip(role: &str, zero_copy: bool) {
    let peer = common::spawn_plain(role);
    let mut chan = chan_over(peer.sock.try_clone().unwrap(), Backing::Heap);
    let got = chan.recv_blocking(T).unwrap().unwrap();
    assert_eq!(got.is_zero_copy(), zero_copy);
    let segs = got.segments().unwrap();
    assert_eq!(segs.len(), got.segment_count());
    assert!(segs.len() > 1);
    let want = content(got.root().unwrap());
    assert_eq!(want.0, 5);
    assert_eq!(round_trip(&segs), want);
    drop(segs);
    drop(got);
    release_child(&mut chan, peer);
}

/// Tells the child that we are done reading (it keeps its messages until then) and waits for
/// it to exit.
fn release_child(chan: &mut common::msgs::Chan, peer: common::Peer) {
    let mut done = chan.create_msg();
    done.init_root().init_hello_there().set_num(1);
    chan.send(&mut done, None).unwrap();
    chan.flush_blocking(T).unwrap();
    common::wait_ok(peer);
}

#[test]
fn a_zero_copy_message_is_written_out_from_its_segments_in_another_process() {
    receive_and_round_trip("send_shm", true);
}

#[test]
fn a_heap_message_is_written_out_from_its_segments_in_another_process() {
    receive_and_round_trip("send_heap", false);
}

/// A blob of `n` chunks built with capnp's own builder (small segments: several of them).
fn capnp_builder(n: u32, tag: u8) -> capnp::message::Builder<capnp::message::HeapAllocator> {
    let alloc = capnp::message::HeapAllocator::new().first_segment_words(64);
    let mut b = capnp::message::Builder::new(alloc);
    common::msgs::blob_into(b.init_root(), n, tag);
    b
}

/// In the child: adopts a capnp builder and sends it; writes to it and sends it again.
fn adopt_and_send(backing: Backing) {
    let shm = matches!(backing, Backing::Shm(_));
    let mut chan = chan_over(common::child_socket(), backing);
    let b = capnp_builder(3, 5);
    let first = b.get_segments_for_output()[0].as_ptr();
    let mut m = flowipc::msg::MsgOut::<cool_msg::Owned>::from_builder(b);
    // Adopted as it is: the very segments.
    assert_eq!(m.segments()[0].as_ptr(), first);
    assert!(m.segment_count() > 1);
    assert!(!m.is_shm());
    chan.send(&mut m, None).unwrap();
    if shm {
        // The flat copy is held by the message and lent to the receiver.
        assert!(m.shared_refs().is_some());
        // An unchanged message re-sent reuses its copy.
        chan.send(&mut m, None).unwrap();
    } else {
        assert_eq!(m.shared_refs(), None);
        chan.send(&mut m, None).unwrap();
    }
    // Written again (the builder itself), then sent: a new copy.
    let cool_msg::Blob(blob) = m.get_root().unwrap().which().unwrap() else {
        panic!("a blob")
    };
    blob.unwrap().set_tag(9);
    assert_eq!(m.segments()[0].as_ptr(), first, "written in place");
    chan.send(&mut m, None).unwrap();
    chan.flush_blocking(T).unwrap();
    let _ = chan.recv_blocking(T).unwrap();
}

fn receive_adopted(role: &str, zero_copy: bool) {
    let peer = common::spawn_plain(role);
    let mut chan = chan_over(peer.sock.try_clone().unwrap(), Backing::Heap);
    let want = content(capnp_builder(3, 5).get_root_as_reader().unwrap());
    let a = chan.recv_blocking(T).unwrap().unwrap();
    let b = chan.recv_blocking(T).unwrap().unwrap();
    let c = chan.recv_blocking(T).unwrap().unwrap();
    for m in [&a, &b, &c] {
        assert_eq!(m.is_zero_copy(), zero_copy);
        assert!(m.segment_count() > 1);
    }
    assert_eq!(content(a.root().unwrap()), want);
    assert_eq!(content(b.root().unwrap()), want);
    if zero_copy {
        // The re-send is the same copy: the child's message, our two readers (the third is
        // another copy).
        assert_eq!(a.shared_refs(), b.shared_refs());
        assert_eq!(c.shared_refs(), Some(2));
    }
    // The third is the written one; the first two did not change under us.
    let (tag, chunks) = content(c.root().unwrap());
    assert_eq!((tag, &chunks), (9, &want.1));
    assert_eq!(content(a.root().unwrap()), want);
    drop((a, b, c));
    release_child(&mut chan, peer);
}

#[test]
fn an_adopted_builder_goes_in_place_through_a_flat_copy_in_another_process() {
    receive_adopted("adopt_shm", true);
}

#[test]
fn an_adopted_builder_goes_through_the_socket_from_its_own_segments() {
    receive_adopted("adopt_heap", false);
}

#[test]
fn an_adopted_builder_too_big_for_the_arena_is_refused_and_stays_whole() {
    let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20).max_pools(1)).unwrap();
    let (a, b) =
        flowipc::transport::Channel::pair(flowipc::transport::ChannelConfig::new()).unwrap();
    let mut tx = flowipc::msg::MsgChannel::<cool_msg::Owned>::new(a, Backing::Shm(arena.clone()));
    let mut rx = flowipc::msg::MsgChannel::<cool_msg::Owned>::new(b, Backing::Heap);
    let mut m = flowipc::msg::MsgOut::<cool_msg::Owned>::from_builder(capnp_builder(80, 1));
    let before = content(m.root().unwrap());
    let e = tx.send(&mut m, None).unwrap_err();
    assert!(
        matches!(
            e,
            flowipc::msg::Error::Shm {
                source: flowipc::shm::Error::OutOfMemory { .. },
                from_peer: false
            }
        ),
        "{e:?}"
    );
    assert!(!tx.is_hosed());
    assert_eq!(content(m.root().unwrap()), before);
    assert_eq!(arena.stats().blocks_in_use, 0, "the partial copy was freed");
    // A smaller one goes.
    let mut small = flowipc::msg::MsgOut::<cool_msg::Owned>::from_builder(capnp_builder(2, 3));
    tx.send(&mut small, None).unwrap();
    let got = rx.recv_blocking(T).unwrap().unwrap();
    assert!(got.is_zero_copy());
    assert_eq!(content(got.root().unwrap()).0, 3);
}
