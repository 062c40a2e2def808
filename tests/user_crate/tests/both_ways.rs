//! The schema compiled both ways the README describes: flowipc-build's embedded compiler (always)
//! and the `capnp` tool (when one was found at build time; skipped, saying so, when not). Both
//! give the same kinds, and messages built with one are read with the other.

use flowipc::struc::{MsgType, Root};
use flowipc_user_crate::calc_capnp::{msg, MsgKind};

#[test]
fn the_embedded_compilers_kinds_match_the_schema() {
    for (kind, name) in [
        (MsgKind::Add, "add"),
        (MsgKind::Sum, "sum"),
        (MsgKind::Note, "note"),
        (MsgKind::File, "file"),
    ] {
        assert_eq!(
            MsgType::from(kind),
            MsgType::of::<msg::Owned>(name).unwrap()
        );
        assert_eq!(<msg::Owned as Root>::kind(kind.into()), Some(kind));
    }
}

#[cfg(capnp_tool)]
#[test]
fn the_capnp_tool_gives_the_same_kinds_and_messages() {
    use flowipc::msg::{Backing, MsgChannel};
    use flowipc::transport::{Channel, ChannelConfig};
    use flowipc_user_crate::tool::calc_capnp as tool;
    println!("built with {}", flowipc_user_crate::CAPNP_TOOL);
    let pairs = [
        (tool::MsgKind::Add, MsgKind::Add),
        (tool::MsgKind::Sum, MsgKind::Sum),
        (tool::MsgKind::Note, MsgKind::Note),
        (tool::MsgKind::File, MsgKind::File),
    ];
    for (t, e) in pairs {
        assert_eq!(MsgType::from(t), MsgType::from(e));
    }
    // Built with the tool's code, read with the embedded compiler's.
    let (a, b) = Channel::pair(ChannelConfig::new()).unwrap();
    let mut tx = MsgChannel::<tool::msg::Owned>::new(a, Backing::Heap);
    let mut rx = MsgChannel::<msg::Owned>::new(b, Backing::Heap);
    let mut m = tx.create_msg();
    m.init_root().init_add().set_a(7);
    tx.send(&mut m, None).unwrap();
    let got = rx.recv_blocking(None).unwrap().unwrap();
    assert_eq!(got.kind().unwrap(), MsgKind::Add);
    let msg::Add(Ok(add)) = got.which().unwrap() else {
        panic!("not an add")
    };
    assert_eq!(add.get_a(), 7);
}

#[cfg(not(capnp_tool))]
#[test]
fn the_capnp_tool_gives_the_same_kinds_and_messages() {
    println!(
        "skipped: no `capnp` tool was found when this crate was built (install capnproto to \
         run this half); the embedded compiler's half ran"
    );
}
