//! Message kinds the compiler checks: [`Root`], implemented for a schema's root type by the
//! code `flowipc-build` generates (a `<Struct>Kind` enum per struct with an anonymous union),
//! and [`KindOf`], what `expect_msg(s)` and the cache take: that enum, or the unchecked
//! [`MsgType`].

use std::fmt;
use std::hash::Hash;

use capnp::private::layout::{PointerReader, StructReader};
use capnp::traits::{FromPointerReader, Owned};

use super::{root_schema, MsgType};
use crate::msg::MsgIn;

/// A root type whose anonymous union's arms have a Rust name the compiler checks: its
/// [`Kind`](Root::Kind) enum (one variant per arm, named as capnp's `Which` names it).
///
/// `flowipc-build` (the build-script helper in flowipc's repository) generates the enum and
/// this impl beside the capnp code of every struct with an anonymous union (see the README's
/// "Your own schemas"): for `struct CoolMsg { union { sumRequest @1 :SumRequest; .. } }`,
/// `CoolMsgKind::SumRequest` names the type, and a typo does not compile.
///
/// ```
/// use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
/// use flowipc::struc::{KindOf, MsgType, Root};
///
/// let k = CoolMsgKind::SumRequest;
/// assert_eq!(KindOf::<cool_msg::Owned>::msg_type(k), MsgType::of::<cool_msg::Owned>("sumRequest")?);
/// assert_eq!(<cool_msg::Owned as Root>::kind(MsgType(1)), Some(k));
/// assert_eq!(<cool_msg::Owned as Root>::kind(MsgType(99)), None);
/// # Ok::<(), flowipc::struc::Error>(())
/// ```
///
/// What the compiler refuses: a typo,
///
/// ```compile_fail
/// # use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
/// # fn f(chan: &mut flowipc::struc::Channel<cool_msg::Owned>) {
/// let _ = chan.expect_msgs(CoolMsgKind::SumRequst, |_, _| {});
/// # }
/// ```
///
/// and the kind of another schema's root:
///
/// ```compile_fail
/// # use flowipc::schemas::{perf_demo_capnp::BodyKind, test_msgs_capnp::cool_msg};
/// # fn f(chan: &mut flowipc::struc::Channel<cool_msg::Owned>) {
/// let _ = chan.expect_msgs(BodyKind::GetCacheReq, |_, _| {});
/// # }
/// ```
///
/// while the right one compiles:
///
/// ```
/// # use flowipc::schemas::test_msgs_capnp::{cool_msg, CoolMsgKind};
/// # fn f(chan: &mut flowipc::struc::Channel<cool_msg::Owned>) {
/// let _ = chan.expect_msgs(CoolMsgKind::SumRequest, |_, _| {});
/// # }
/// ```
pub trait Root: Owned {
    /// The enum of the union's arms.
    type Kind: KindOf<Self> + Into<MsgType> + Copy + Eq + Hash + fmt::Debug + Send + Sync;
    /// The union's arm with its contents: the generated `WhichReader`.
    type Which<'a>;
    /// `root.which()`: the generated accessor of the arm.
    fn which<'a>(root: <Self as Owned>::Reader<'a>) -> Result<Self::Which<'a>, capnp::NotInSchema>;
    /// The kind whose discriminant is `t`, if the schema has one.
    fn kind(t: MsgType) -> Option<Self::Kind>;
}

/// What names a message type of root `M` to [`expect_msg`](super::Channel::expect_msg) and
/// the others: `M`'s [`Kind`](Root::Kind) (checked by the compiler), or a [`MsgType`] (for any
/// root, unchecked: e.g. [`MsgType::of`] by the arm's name in the schema).
pub trait KindOf<M: ?Sized>: Copy {
    /// The discriminant.
    fn msg_type(self) -> MsgType;
}

impl<M: ?Sized> KindOf<M> for MsgType {
    fn msg_type(self) -> MsgType {
        self
    }
}

/// The root struct of a message, whatever its type: enough to read the union's discriminant
/// where the schema says it is, with capnp's own checks (bounds, far pointers, defaults).
struct AnyStruct<'a>(StructReader<'a>);

impl<'a> FromPointerReader<'a> for AnyStruct<'a> {
    fn get_from_pointer(
        reader: &PointerReader<'a>,
        default: Option<&'a [capnp::Word]>,
    ) -> capnp::Result<Self> {
        Ok(AnyStruct(reader.get_struct(default)?))
    }
}

/// The discriminant of the root union of `m`, whose offset in the root's data section is `at`
/// (in 16-bit units), read as capnp's generated `which()` reads it.
pub(crate) fn discriminant<M: Owned>(m: &MsgIn<M>, at: u32) -> capnp::Result<u16> {
    Ok(m.root_as::<AnyStruct<'_>>()?
        .0
        .get_data_field::<u16>(at as usize))
}

/// The name of the root union's arm `t` of `M` (as in the schema), for messages and logs.
pub(crate) fn arm_name<M: Owned>(t: MsgType) -> Option<String> {
    let fields = root_schema::<M>().ok()?.get_union_fields().ok()?;
    fields
        .iter()
        .find(|f| f.get_proto().get_discriminant_value() == t.0)
        .and_then(|f| Some(f.get_proto().get_name().ok()?.to_str().ok()?.to_string()))
}

impl<M: Owned> MsgIn<M> {
    /// The message's type, as the structured channel's dispatch read it (`None` for a message
    /// that no structured channel dispatched: a response, or one from a
    /// [`MsgChannel`](crate::msg::MsgChannel)).
    pub fn msg_type(&self) -> Option<MsgType> {
        self.union_arm().map(MsgType)
    }
}

impl<M: Root> MsgIn<M> {
    /// The root union's arm, with its contents: one call for `root()?.which()?`.
    ///
    /// ```
    /// # use flowipc::msg::{Backing, MsgChannel};
    /// # use flowipc::schemas::test_msgs_capnp::cool_msg;
    /// # use flowipc::transport::{Channel, ChannelConfig};
    /// # let (a, b) = Channel::pair(ChannelConfig::new())?;
    /// # let mut tx = MsgChannel::<cool_msg::Owned>::new(a, Backing::Heap);
    /// # let mut rx = MsgChannel::<cool_msg::Owned>::new(b, Backing::Heap);
    /// # let mut m = tx.create_msg();
    /// # m.init_root().init_sum_response().set_sum(7);
    /// # tx.send(&mut m, None)?;
    /// let got = rx.recv_blocking(None)?.unwrap();
    /// let cool_msg::SumResponse(rsp) = got.which()? else { panic!("not a sum") };
    /// assert_eq!(rsp?.get_sum(), 7);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn which(&self) -> capnp::Result<M::Which<'_>> {
        Ok(M::which(self.root()?)?)
    }

    /// The message's kind: the one dispatch found, or read from the message. Fails as
    /// [`which`](MsgIn::which) does on an arm this schema does not know.
    pub fn kind(&self) -> capnp::Result<M::Kind> {
        let t = match self.msg_type() {
            Some(t) => t,
            None => {
                let at = root_schema::<M>()
                    .ok()
                    .and_then(|s| match s.get_proto().which() {
                        Ok(capnp::schema_capnp::node::Struct(st)) => {
                            Some(st.get_discriminant_offset())
                        }
                        _ => None,
                    })
                    .ok_or_else(|| capnp::Error::failed("the root has no union".into()))?;
                MsgType(discriminant(self, at)?)
            }
        };
        M::kind(t).ok_or(capnp::NotInSchema(t.0).into())
    }
}
