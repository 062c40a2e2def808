//! The structured channel: capnp messages with requests, responses and expectations over a
//! [`MsgChannel`](crate::msg::MsgChannel), after Flow-IPC's `struc::Channel`.
//!
//! The root type `M` of a channel must have an anonymous union: its active arm is the
//! message's *type*, which [`expect_msg`](Channel::expect_msg) and
//! [`expect_msgs`](Channel::expect_msgs) dispatch on. Name a type with the `<Root>Kind` enum
//! that `flowipc-build` generates beside your schema's code ([`Root`]: `CoolMsgKind::SumRequest`
//! for the arm `sumRequest` of `struct CoolMsg`), which the compiler checks; or, unchecked, with
//! a [`MsgType`] ([`MsgType::of`] the arm's name in the schema). A received message gives its
//! arm in one call, [`MsgIn::which`](crate::msg::MsgIn::which), and its kind,
//! [`MsgIn::kind`](crate::msg::MsgIn::kind). Each message instance gets an id (1, 2, 3... per
//! channel and direction); a response carries the id of the message it answers.
//!
//! * Unsolicited messages go to the expectation registered for their type, or are cached per
//!   type and delivered, in send order, when one is registered: nothing is dropped for arriving
//!   early.
//! * Responses go to the request they answer ([`sync_request`](Channel::sync_request),
//!   [`async_request`](Channel::async_request), each with an fd if wanted: `*_with_fd`). One
//!   that nothing expects is dropped, reported to the local unexpected-response handler, and
//!   reported over the wire to the sender, whose remote-unexpected-response handler gets its
//!   id and a description. Neither hoses the channel.
//! * The peer's [`end_sending`](Channel::end_sending) is the graceful end, not an error: after
//!   every message sent before it, [`is_peer_ended`](Channel::is_peer_ended) turns true, the
//!   peer-end handler runs ([`set_peer_end_handler`](Channel::set_peer_end_handler)),
//!   [`run`](Channel::run) returns `Ok`, requests that can get no answer fail with
//!   [`Error::PeerEnded`]; sending goes on. `on_error` never hears of it.
//! * A channel-hosing error is reported once: by the call that hit it, or to the `on_error`
//!   handler given to [`start`](Channel::start). Afterwards every call returns
//!   [`Error::Hosed`] and no handler fires.
//!
//! This is the sync_io core: no threads. Handlers run inside the channel's own calls
//! ([`process_ready`](Channel::process_ready) when its fd is readable, or
//! [`run_for`](Channel::run_for) for blocking users, or `expect_*` for cached messages) and get
//! `&mut Channel` so that they can answer at once.
//!
//! ```
//! use std::time::Duration;
//! use flowipc::msg::Backing;
//! use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
//! use flowipc::struc::{Channel, Expect};
//! use flowipc::transport::{self, ChannelConfig};
//!
//! let (a, b) = transport::Channel::pair(ChannelConfig::new())?;
//! let mut client = Channel::<cool_msg::Owned>::new(a, Backing::Heap)?;
//! let mut server = Channel::<cool_msg::Owned>::new(b, Backing::Heap)?;
//! client.start(|e| panic!("{e}"))?;
//! server.start(|e| panic!("{e}"))?;
//!
//! // The server answers every SumRequest (a typo in the kind would not compile).
//! server.expect_msgs(CoolMsgKind::SumRequest, |chan, req| {
//!     let Ok(cool_msg::SumRequest(Ok(r))) = req.which() else { return };
//!     let sum: i64 = r.get_terms_to_add().unwrap().iter().sum();
//!     let mut rsp = chan.create_msg();
//!     rsp.init_root().init_sum_response().set_sum(sum * r.get_constant_factor());
//!     chan.send(&mut rsp, Some(&req)).unwrap();
//! })?;
//!
//! let mut req = client.create_msg();
//! let mut r = req.init_root().init_sum_request();
//! r.set_constant_factor(2);
//! let mut terms = r.init_terms_to_add(3);
//! for (i, t) in [1, 2, 3].into_iter().enumerate() {
//!     terms.set(i as u32, t);
//! }
//! client.async_request(&mut req, None, Expect::OneOff, |chan, rsp| {
//!     assert!(matches!(rsp.which(), Ok(cool_msg::SumResponse(Ok(s))) if s.get_sum() == 12));
//!     chan.end_sending().unwrap(); // done: the graceful end
//! })?;
//! server.run_for(Duration::from_millis(20))?; // handles the request, answers
//! client.run_for(Duration::from_millis(20))?; // handles the response, ends
//! server.run()?; // returns Ok at the client's end
//! assert!(server.is_peer_ended() && !server.is_hosed());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod async_io;
mod channel;
mod error;
pub(crate) mod kind;

pub use self::async_io::AsyncChannel;
pub use self::channel::{Channel, Expect, ReqId};
pub use self::error::Error;
pub use self::kind::{KindOf, Root};

use capnp::introspect::{Introspect, TypeVariant};
use capnp::schema::StructSchema;

/// A message type: the discriminant of the root's anonymous union (which of its fields is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgType(pub u16);

impl MsgType {
    /// The type whose union field is named `field` (as in the schema: `"helloThere"`). Fails with
    /// [`Error::NoRootUnion`] or [`Error::NoSuchMsgType`].
    pub fn of<M: Introspect>(field: &str) -> Result<MsgType, Error> {
        let schema = root_schema::<M>()?;
        let fields = schema.get_union_fields().map_err(|_| Error::NoRootUnion)?;
        fields
            .iter()
            .find(|f| f.get_proto().get_name().ok().and_then(|n| n.to_str().ok()) == Some(field))
            .map(|f| MsgType(f.get_proto().get_discriminant_value()))
            .ok_or_else(|| Error::NoSuchMsgType(field.to_string()))
    }
}

/// The root's struct schema, if it has an anonymous union.
pub(crate) fn root_schema<M: Introspect>() -> Result<StructSchema, Error> {
    let TypeVariant::Struct(raw) = M::introspect().which() else {
        return Err(Error::NoRootUnion);
    };
    let schema = StructSchema::new(raw);
    match schema.get_proto().which() {
        Ok(capnp::schema_capnp::node::Struct(st)) if st.get_discriminant_count() > 0 => Ok(schema),
        _ => Err(Error::NoRootUnion),
    }
}
