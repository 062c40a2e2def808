//! Unit tests of the structured channel core's internals (its behaviour is tested through the
//! public API in `tests/struc.rs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Channel;
use crate::msg::{Backing, MsgOut, SegmentSizes};
use crate::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
use crate::struc::{MsgType, Root};
use crate::transport::{self, ChannelConfig};

/// Dispatch reads every arm's discriminant as capnp's generated `which()` does, also when the
/// root struct is not in segment 0 (a one-word first segment: the root pointer is a far
/// pointer), and the message then says its kind and arm in one call each.
#[test]
fn dispatch_reads_the_arm_as_capnp_does_far_pointer_included() {
    let (a, b) = transport::Channel::pair(ChannelConfig::new()).unwrap();
    let mut tx = Channel::<cool_msg::Owned>::new(a, Backing::Heap).unwrap();
    let mut rx = Channel::<cool_msg::Owned>::new(b, Backing::Heap).unwrap();
    rx.start(|e| panic!("{e}")).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    for d in 0..7u16 {
        let kind = <cool_msg::Owned as Root>::kind(MsgType(d)).unwrap();
        let s = seen.clone();
        rx.expect_msgs(kind, move |_, m| {
            let arm = match m.which().unwrap() {
                cool_msg::HelloThere(_) => CoolMsgKind::HelloThere,
                cool_msg::SumRequest(_) => CoolMsgKind::SumRequest,
                cool_msg::SumResponse(_) => CoolMsgKind::SumResponse,
                cool_msg::HitMeWithYourBestShot(_) => CoolMsgKind::HitMeWithYourBestShot,
                cool_msg::MyBestShot(_) => CoolMsgKind::MyBestShot,
                cool_msg::Blob(_) => CoolMsgKind::Blob,
                cool_msg::Ping(()) => CoolMsgKind::Ping,
            };
            assert_eq!(m.kind().unwrap(), arm);
            assert_eq!(m.msg_type(), Some(arm.into()));
            s.lock().unwrap().push((kind, arm));
        })
        .unwrap();
    }
    for far in [false, true] {
        for d in 0..7u16 {
            let sizes = SegmentSizes {
                first_words: if far { 1 } else { 1024 },
                ..SegmentSizes::default()
            };
            let mut m = MsgOut::<cool_msg::Owned>::with_sizes(None, sizes);
            let mut root = m.init_root();
            match d {
                0 => drop(root.init_hello_there()),
                1 => drop(root.init_sum_request()),
                2 => drop(root.init_sum_response()),
                3 => drop(root.init_hit_me_with_your_best_shot()),
                4 => drop(root.init_my_best_shot()),
                5 => drop(root.init_blob()),
                _ => root.set_ping(()),
            }
            assert_eq!(m.segment_count() > 1, far, "arm {d}");
            tx.send(&mut m, None).unwrap();
        }
    }
    rx.run_for(Duration::from_millis(50)).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 14);
    assert!(
        seen.iter().all(|(expected, got)| expected == got),
        "{seen:?}"
    );
}
