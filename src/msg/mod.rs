//! Cap'n Proto messages whose segments live in a shared-memory arena: [`MsgOut`] to build and
//! send, [`MsgIn`] to read in place, and [`MsgChannel`] to carry them over a Unix-socket
//! [`Channel`](crate::transport::Channel).
//!
//! Sending an arena-backed message writes only a 24-byte header and a 32-byte handle into the
//! socket, whatever the message's size: the receiver reads the very same segments. The sender's
//! `MsgOut` and every receiver's `MsgIn` hold references to a segment table in shared memory
//! (for a one-segment message, the segment block itself); the last one dropped, in whichever
//! process, frees every segment.
//!
//! A small arena-backed message (up to 1.5 KiB by default, see
//! [`MsgChannel::with_inline_max`]) is copied into its frame instead: up to that size the copy
//! costs what the handle does, and a message waiting for a peer that does not read holds only
//! its bytes, no arena block.
//!
//! A sent message is *frozen* while a receiver holds it: writing to the `MsgOut` again copies it
//! first (copy-on-write, like [`Arc::make_mut`](std::sync::Arc::make_mut)), so a `MsgIn` never
//! sees bytes change under it. Re-sending an unchanged `MsgOut` adds one reference and copies
//! nothing.
//!
//! The heap-backed (copying) mode has the same API: the segments are written into the socket and
//! read back. It needs no shared memory and is the baseline the benchmarks compare against.
//!
//! ```
//! use flowipc::msg::{Backing, MsgChannel};
//! use flowipc::schemas::perf_demo_capnp::body;
//! use flowipc::shm::{Arena, ArenaConfig};
//! use flowipc::transport::{Channel, ChannelConfig};
//!
//! let (a, b) = Channel::pair(ChannelConfig::new())?;
//! let arena = Arena::create(ArenaConfig::new().pool_size(64 << 20))?;
//! let mut tx = MsgChannel::<body::Owned>::new(a, Backing::Shm(arena));
//! let mut rx = MsgChannel::<body::Owned>::new(b, Backing::Heap);
//!
//! let mut msg = tx.create_msg();
//! let mut part = msg.init_root().init_get_cache_rsp().init_file_parts(1).get(0);
//! part.init_data(1 << 20).fill(7);
//! tx.send(&mut msg, None)?; // 1 MiB: sent in place
//!
//! let got = rx.recv_blocking(None)?.expect("a message");
//! assert!(got.is_zero_copy());
//! match got.root()?.which()? {
//!     body::GetCacheRsp(rsp) => assert_eq!(rsp?.get_file_parts()?.get(0).get_data()?[0], 7),
//!     _ => unreachable!(),
//! }
//!
//! let mut small = tx.create_msg();
//! small.init_root().init_get_cache_req().set_file_name("/etc/motd");
//! tx.send(&mut small, None)?; // small: copied into the frame
//! assert!(!rx.recv_blocking(None)?.expect("a message").is_zero_copy());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub(crate) mod channel;
mod error;
mod wire;

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;

use capnp::message::{Reader, ReaderOptions, ReaderSegments};
use capnp::traits::Owned;

pub use self::channel::{Backing, MsgChannel, DEFAULT_INLINE_MAX};
pub use self::error::Error;
pub use crate::shm::segments::SegmentSizes;
use crate::shm::segments::{Adopted, OutMsg, ShmSegments};
use crate::shm::Arena;
use crate::transport::AlignedBuf;

/// Longest capnp `Data`, `Text` or `List` (elements): capnp panics on longer ones, after
/// allocating. Split bigger payloads into a list of chunks.
pub const MAX_LIST_LEN: usize = (1 << 29) - 1;

/// Checks a length before `init_*`: capnp panics (after allocating) on lists longer than
/// [`MAX_LIST_LEN`]; this returns [`Error::ListTooLong`] instead.
///
/// ```
/// use flowipc::msg::{check_list_len, Error};
/// assert_eq!(check_list_len(1000).unwrap(), 1000);
/// assert!(matches!(check_list_len(1 << 29), Err(Error::ListTooLong { len }) if len == 1 << 29));
/// ```
pub fn check_list_len(len: usize) -> Result<u32, Error> {
    if len > MAX_LIST_LEN {
        return Err(Error::ListTooLong { len });
    }
    Ok(len as u32)
}

/// An out-message: a capnp builder of root type `M` (e.g. `my_schema_capnp::my_root::Owned`)
/// whose segments come from an arena (zero-copy) or the heap (copying), or a capnp `Builder`
/// made elsewhere and adopted as it is ([`from_builder`](MsgOut::from_builder)).
pub struct MsgOut<M: Owned> {
    body: Body,
    fd: Option<OwnedFd>,
    _root: PhantomData<fn() -> M>,
}

/// A message's builder: flowipc's own (segments in an arena or on the heap), or an adopted one.
pub(crate) enum Body {
    Own(OutMsg),
    Adopted(Adopted),
}

impl<M: Owned> MsgOut<M> {
    /// An empty message with segments in `arena`.
    pub fn new_in(arena: &Arena) -> Self {
        Self::with_sizes(Some(arena.clone()), SegmentSizes::default())
    }

    /// An empty heap-backed (copying) message.
    pub fn new_heap() -> Self {
        Self::with_sizes(None, SegmentSizes::default())
    }

    /// An empty message with explicit segment sizing.
    pub fn with_sizes(arena: Option<Arena>, sizes: SegmentSizes) -> Self {
        MsgOut {
            body: Body::Own(OutMsg::new(arena, sizes)),
            fd: None,
            _root: PhantomData,
        }
    }

    /// Adopts a message built with capnp's own `Builder` (of any `Send + Sync` allocator:
    /// capnp's `HeapAllocator`, a scratch space of `'static` life, one of your own), as it is.
    ///
    /// What it costs: adopting, nothing (the segments stay where the builder's allocator put
    /// them; [`segments`](MsgOut::segments) are those very bytes). Sending it over a heap
    /// channel writes the segments into the socket, as any heap message. Sending it in place
    /// (a channel backed by an arena) copies the segments *flat* into that arena once (a
    /// `memcpy` of each segment into a block of its own: no traversal, far pointers stay valid,
    /// no deep copy), and re-sending it unchanged reuses that copy; writing to it afterwards
    /// writes the builder itself (the receivers read the copy, so there is nothing to thaw),
    /// and the next send copies again. A message built from the start with the channel's
    /// [`create_msg`](MsgChannel::create_msg) costs no copy at all.
    ///
    /// ```
    /// use flowipc::capnp::message::Builder;
    /// use flowipc::msg::MsgOut;
    /// use flowipc::schemas::test_msgs_capnp::cool_msg;
    ///
    /// let mut b = Builder::new_default();
    /// b.init_root::<cool_msg::Builder>().init_hello_there().set_num(7);
    /// let first = b.get_segments_for_output()[0].as_ptr();
    /// let m = MsgOut::<cool_msg::Owned>::from_builder(b);
    /// assert_eq!(m.segments()[0].as_ptr(), first, "in place");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_builder<A>(builder: capnp::message::Builder<A>) -> Self
    where
        A: capnp::message::Allocator + Send + Sync + 'static,
    {
        MsgOut {
            body: Body::Adopted(Adopted::new(builder)),
            fd: None,
            _root: PhantomData,
        }
    }

    /// Clears the root and returns its builder (copy-on-write if the message is shared).
    pub fn init_root(&mut self) -> M::Builder<'_> {
        match &mut self.body {
            Body::Own(o) => o.builder_mut().init_root::<M::Builder<'_>>(),
            Body::Adopted(a) => a.root_mut().init_as::<M::Builder<'_>>(),
        }
    }

    /// The root's builder, to modify an existing message (copy-on-write if shared).
    pub fn get_root(&mut self) -> capnp::Result<M::Builder<'_>> {
        match &mut self.body {
            Body::Own(o) => o.builder_mut().get_root::<M::Builder<'_>>(),
            Body::Adopted(a) => a.root_mut().get_as::<M::Builder<'_>>(),
        }
    }

    /// Reads the message (never copies).
    pub fn root(&self) -> capnp::Result<M::Reader<'_>> {
        match &self.body {
            Body::Own(o) => o.builder().get_root_as_reader::<M::Reader<'_>>(),
            Body::Adopted(a) => a.root()?.get_as::<M::Reader<'_>>(),
        }
    }

    /// Sets the root to a deep copy of `value` (copy-on-write if shared).
    pub fn set_root(&mut self, value: M::Reader<'_>) -> capnp::Result<()>
    where
        for<'a> M::Reader<'a>: capnp::traits::SetterInput<M>,
    {
        match &mut self.body {
            Body::Own(o) => o.builder_mut().set_root::<M>(value),
            Body::Adopted(a) => a.root_mut().set_as::<M>(value),
        }
    }

    /// Whether the segments are in shared memory (sent in place). An adopted message's are
    /// not (its sends in place go through a copy, see [`from_builder`](MsgOut::from_builder)).
    pub fn is_shm(&self) -> bool {
        match &self.body {
            Body::Own(o) => o.is_shm(),
            Body::Adopted(_) => false,
        }
    }

    /// Whether a receiver (or a queued send) still holds this message, so the next write will
    /// copy it first. (Never for an adopted message: receivers hold its copy.)
    pub fn is_shared(&self) -> bool {
        match &self.body {
            Body::Own(o) => o.is_frozen_by_others(),
            Body::Adopted(_) => false,
        }
    }

    /// References to the frozen segment table, if the message was sent in place: 1 means only
    /// this `MsgOut`; every receiver's `MsgIn` (and every handle in flight) adds one. (For an
    /// adopted message, its arena copy's.)
    pub fn shared_refs(&self) -> Option<u64> {
        match &self.body {
            Body::Own(o) => o.table_refs(),
            Body::Adopted(a) => a.table_refs(),
        }
    }

    /// Words the message uses (what a copy would move).
    pub fn size_in_words(&self) -> usize {
        match &self.body {
            Body::Own(o) => o.size_in_words(),
            Body::Adopted(a) => a.size_in_words(),
        }
    }

    /// Words its segments reserve, used or not (growth is capped, see [`SegmentSizes`]); for
    /// an adopted message, those it uses (its allocator's reserve is its own).
    pub fn reserved_words(&self) -> u64 {
        match &self.body {
            Body::Own(o) => o.reserved_words(),
            Body::Adopted(a) => a.size_in_words() as u64,
        }
    }

    /// Number of segments the message has now (its receiver sees as many). A message whose
    /// root was never written has none yet (sending it sends an empty root in one segment).
    pub fn segment_count(&self) -> usize {
        self.segments().len()
    }

    /// The message's segments, in place (no copy): what capnp's own serialization writes, so
    /// the message can go to a file or another transport as it is, e.g. with
    /// `capnp::serialize::write_message_segments(&mut out, &msg.segments())`. Each slice is
    /// the segment's used bytes. A message whose root was never written has no segments yet.
    pub fn segments(&self) -> capnp::OutputSegments<'_> {
        match &self.body {
            Body::Own(o) => o.builder().get_segments_for_output(),
            Body::Adopted(a) => a.segments(),
        }
    }

    /// The arena allocation failure that left part of the message on the heap, if any: such a
    /// message cannot be sent in place until the arena has room again (`send` retries the copy).
    pub fn alloc_failure(&self) -> Option<crate::shm::Error> {
        match &self.body {
            Body::Own(o) => o.alloc_failure(),
            Body::Adopted(_) => None,
        }
    }

    /// Pairs an fd (native handle) with the message: it rides along every time the message is
    /// sent (the receiver gets its own copy, see [`MsgIn::take_fd`]). The message owns it and
    /// closes it when dropped. Returns the fd it replaces, if any.
    pub fn set_fd(&mut self, fd: OwnedFd) -> Option<OwnedFd> {
        self.fd.replace(fd)
    }

    /// Takes the paired fd back.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fd.take()
    }

    /// The paired fd, if any.
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.fd.as_ref().map(|f| f.as_fd())
    }

    pub(crate) fn body_mut(&mut self) -> &mut Body {
        &mut self.body
    }
}

impl<M: Owned> fmt::Debug for MsgOut<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsgOut")
            .field("shm", &self.is_shm())
            .field("words", &self.size_in_words())
            .field("shared_refs", &self.shared_refs())
            .finish()
    }
}

/// Segments of a received message: in place in shared memory, or copied out of the socket.
pub(crate) enum InSegs {
    Shm(ShmSegments),
    Heap {
        buf: AlignedBuf,
        /// (start, len) of segment 0 in `buf`.
        first: (usize, usize),
        /// (start, len) of each later segment in `buf` (none for a one-segment message).
        rest: Vec<(usize, usize)>,
    },
}

impl ReaderSegments for InSegs {
    #[inline]
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        match self {
            InSegs::Shm(s) => s.get_segment(idx),
            InSegs::Heap { buf, first, rest } => {
                let (start, len) = match idx.checked_sub(1) {
                    None => *first,
                    Some(i) => *rest.get(i as usize)?,
                };
                buf.as_bytes().get(start..start + len)
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            InSegs::Shm(s) => s.len(),
            InSegs::Heap { rest, .. } => rest.len() + 1,
        }
    }
}

/// An in-message: a capnp reader of root type `M` over the received segments, in place.
///
/// The reader's traversal limit is sized to the message (eight times its words, at least
/// capnp's default of 64 MiB), so reading a 1 GiB message works and re-reading is allowed.
pub struct MsgIn<M: Owned> {
    reader: Reader<InSegs>,
    fd: Option<OwnedFd>,
    words: usize,
    id: u64,
    answers: u64,
    /// The root union's discriminant, once a structured channel's dispatch has read it.
    union_arm: Option<u16>,
    _root: PhantomData<fn() -> M>,
}

impl<M: Owned> MsgIn<M> {
    /// A reader over `segs`, with the fd that came along and the message's ids (see
    /// [`id`](MsgIn::id) and [`answers`](MsgIn::answers)).
    #[inline]
    pub(crate) fn new(segs: InSegs, fd: Option<OwnedFd>, id: u64, answers: u64) -> Self {
        let words = match &segs {
            InSegs::Shm(s) => s.total_words(),
            InSegs::Heap { first, rest, .. } => rest
                .iter()
                .fold(first.1 / 8, |a, s| a.saturating_add(s.1 / 8)),
        };
        let mut opts = ReaderOptions::new();
        opts.traversal_limit_in_words(Some(words.saturating_mul(8).max(8 << 20)));
        MsgIn {
            reader: Reader::new(segs, opts),
            fd,
            words,
            id,
            answers,
            union_arm: None,
            _root: PhantomData,
        }
    }

    /// The id the sender's channel gave this message instance (1, 2, 3... per channel and
    /// direction).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The id of our message this one answers, or 0 if it answers none (unsolicited).
    pub fn answers(&self) -> u64 {
        self.answers
    }

    /// The root read as `T` (any pointer reader: the structured channel reads the union's
    /// discriminant of any root type this way).
    pub(crate) fn root_as<'a, T: capnp::traits::FromPointerReader<'a>>(
        &'a self,
    ) -> capnp::Result<T> {
        self.reader.get_root::<T>()
    }

    /// The root union's discriminant, if a structured channel's dispatch read it.
    pub(crate) fn union_arm(&self) -> Option<u16> {
        self.union_arm
    }

    pub(crate) fn set_union_arm(&mut self, arm: u16) {
        self.union_arm = Some(arm);
    }

    /// The root, read in place.
    pub fn root(&self) -> capnp::Result<M::Reader<'_>> {
        self.reader.get_root::<M::Reader<'_>>()
    }

    /// Whether the segments are read in place in shared memory.
    pub fn is_zero_copy(&self) -> bool {
        matches!(self.reader.get_segments(), InSegs::Shm(_))
    }

    /// Words in the message.
    pub fn size_in_words(&self) -> usize {
        self.words
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.reader.get_segments().len()
    }

    /// The message's segments, read in place (no copy), e.g. to write the message to a file or
    /// another transport with `capnp::serialize::write_message_segments`. A segment of a
    /// zero-copy message is validated when first reached; one that fails validation (a peer's
    /// corrupt table) is an error here, as it is for the reader.
    pub fn segments(&self) -> capnp::Result<Vec<&[u8]>> {
        let segs = self.reader.get_segments();
        (0..segs.len() as u32)
            .map(|i| {
                segs.get_segment(i).ok_or_else(|| {
                    capnp::Error::failed(format!("segment {i} of the message is not readable"))
                })
            })
            .collect()
    }

    /// References to the shared segment table (in place only): the sender's `MsgOut` if it still
    /// exists, plus every `MsgIn` of it.
    pub fn shared_refs(&self) -> Option<u64> {
        match self.reader.get_segments() {
            InSegs::Shm(s) => Some(s.table().ref_count()),
            InSegs::Heap { .. } => None,
        }
    }

    /// The fd that came with the message, if any (the caller owns it).
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fd.take()
    }
}

impl<M: Owned> fmt::Debug for MsgIn<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsgIn")
            .field("zero_copy", &self.is_zero_copy())
            .field("words", &self.words)
            .field("segments", &self.segment_count())
            .field("fd", &self.fd)
            .finish()
    }
}

/// Writes at most `left` bytes, then fails (which stops the formatting early: a 1 GiB message
/// is not rendered in full to be cut).
struct Bounded<'a> {
    out: &'a mut String,
    left: usize,
    cut: bool,
}

impl fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.len() <= self.left {
            self.out.push_str(s);
            self.left -= s.len();
            return Ok(());
        }
        let mut end = self.left;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.out.push_str(&s[..end]);
        self.left = 0;
        self.cut = true;
        Err(fmt::Error)
    }
}

/// Renders `root` in capnp's text form: one line of at most 256 bytes, or (alternate form,
/// `{:#}`) indented, at most 64 KiB; a cut rendering ends with `…`.
fn render(root: capnp::Result<impl fmt::Debug>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let root = match root {
        Ok(r) => r,
        Err(e) => return write!(f, "<unreadable message: {e}>"),
    };
    let alternate = f.alternate();
    let mut out = String::new();
    let mut w = Bounded {
        out: &mut out,
        left: if alternate { 64 << 10 } else { 256 },
        cut: false,
    };
    let _ = if alternate {
        fmt::write(&mut w, format_args!("{root:#?}"))
    } else {
        fmt::write(&mut w, format_args!("{root:?}"))
    };
    let cut = w.cut;
    f.write_str(&out)?;
    if cut {
        f.write_str("…")?;
    }
    Ok(())
}

impl<M: Owned> fmt::Display for MsgOut<M>
where
    for<'a> M::Reader<'a>: fmt::Debug,
{
    /// The message in capnp's text form, cut to 256 bytes (`{:#}`: indented, up to 64 KiB).
    ///
    /// ```
    /// use flowipc::msg::MsgOut;
    /// use flowipc::schemas::test_msgs_capnp::cool_msg;
    /// let mut m = MsgOut::<cool_msg::Owned>::new_heap();
    /// m.init_root().init_hello_there().set_num(42);
    /// assert_eq!(m.to_string(), "(helloThere = (num = 42))");
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render(self.root(), f)
    }
}

impl<M: Owned> fmt::Display for MsgIn<M>
where
    for<'a> M::Reader<'a>: fmt::Debug,
{
    /// As for [`MsgOut`]: capnp's text form, cut to 256 bytes (`{:#}`: indented, 64 KiB).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render(self.root(), f)
    }
}
