//! A message's segments, in place: written with capnp's own serialization and read back equal,
//! on the sending side (`MsgOut::segments`) and on the receiving side of another process
//! (`MsgIn::segments`, zero-copy and heap).

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
