//! Unit tests of the structured channel core's internals (its behaviour is tested through the
//! public API in `tests/struc.rs`).

use capnp::dynamic_struct;
use capnp::dynamic_value;

use super::dispatch::root_discriminant;
use crate::schemas::test_msgs_capnp::cool_msg;
use crate::struc::root_schema;

/// The direct read of the discriminant agrees with capnp's dynamic reader for every type.
#[test]
fn root_discriminant_agrees_with_capnp() {
    let (at, len) = match root_schema::<cool_msg::Owned>()
        .unwrap()
        .get_proto()
        .which()
    {
        Ok(capnp::schema_capnp::node::Struct(st)) => {
            (st.get_discriminant_offset(), st.get_discriminant_count())
        }
        _ => panic!(),
    };
    assert_eq!(len, 7);
    for d in 0..len {
        let mut b = capnp::message::Builder::new_default();
        let mut root = b.init_root::<cool_msg::Builder<'_>>();
        match d {
            0 => drop(root.init_hello_there()),
            1 => drop(root.init_sum_request()),
            2 => drop(root.init_sum_response()),
            3 => drop(root.init_hit_me_with_your_best_shot()),
            4 => drop(root.init_my_best_shot()),
            5 => drop(root.init_blob()),
            _ => root.set_ping(()),
        }
        let seg0 = b.get_segments_for_output()[0].to_vec();
        assert_eq!(root_discriminant(&seg0, at), Some(d));
        let r = b.get_root_as_reader::<cool_msg::Reader<'_>>().unwrap();
        let dynamic: dynamic_struct::Reader<'_> = dynamic_value::Reader::from(r).downcast();
        let field = dynamic.which().unwrap().unwrap();
        assert_eq!(field.get_proto().get_discriminant_value(), d);
    }
    // A root pointer far beyond segment 0 is not type 0: the caller asks capnp instead.
    let far: u64 = 0x7FFF_FFFC;
    assert_eq!(root_discriminant(&far.to_le_bytes(), 0), None);
    // Garbage or short input is `None` or a value, never a panic.
    for bytes in [&[][..], &[1u8; 3], &[0xFF; 8], &[0x04, 0, 0, 0, 1, 0, 0, 0]] {
        let _ = root_discriminant(bytes, at);
    }
}
