//! The shared-memory fixture of the message and handle targets, made once per process: an arena
//! holding two objects ([`ShmHandle`]s) and two frozen messages (one segment, and many), and a
//! real sender that lends a message's reference the way a peer does (a real `MsgChannel`
//! send, caught on a raw channel: the blob is the real encoder's).
//!
//! Each input gets fresh lends ([`Fixture::lend`]); [`Fixture::settle`] gives back those the
//! input did not take and checks that every reference count and the arena's block count are
//! back where they were: a borrow that leaks or over-releases a reference shows there.

use std::cell::RefCell;
use std::sync::atomic::AtomicU64;

use flowipc::msg::{Backing, MsgChannel, MsgOut, SegmentSizes};
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::shm::{Arena, ArenaConfig, LendBlob, ShmHandle};
use flowipc::transport::{Channel, ChannelConfig};

/// The value of the fixture's counter object.
pub const COUNTER: u64 = 0x4242_4242;
/// The value of the fixture's four-word object.
pub const QUAD: [u64; 4] = [1, 2, 3, 4];

/// Byte offsets in a message frame: the kind, the header's length (no token), a blob's length.
pub const MSG_HEADER_LEN: usize = 24;
const KIND_POOL: u8 = 1;

/// A real in-place sender (a `MsgChannel` backed by an arena) whose frames are caught raw: the
/// bytes a peer's send puts on the wire.
pub struct Lender {
    tx: MsgChannel<cool_msg::Owned>,
    catch: Channel,
    /// The last pool announcement the sender made (header and body).
    pub pool_frame: Vec<u8>,
}

impl Lender {
    /// A sender of messages in `arena`.
    pub fn new(arena: &Arena) -> Lender {
        let (a, b) = Channel::pair(ChannelConfig::new()).expect("a pair");
        Lender {
            tx: MsgChannel::new(a, Backing::Shm(arena.clone())),
            catch: b,
            pool_frame: Vec::new(),
        }
    }

    /// Sends `m` in place: the message's frame (header and blob), and its blob (one lent
    /// reference). Pool announcements on the way are kept in `pool_frame`.
    pub fn send(&mut self, m: &mut MsgOut<cool_msg::Owned>) -> (LendBlob, Vec<u8>) {
        self.tx.send(m, None).expect("a send");
        loop {
            let f = self
                .catch
                .try_recv()
                .expect("a frame")
                .expect("sent at once");
            if f.payload.first() == Some(&KIND_POOL) {
                self.pool_frame = f.payload.to_vec();
                continue;
            }
            let blob = LendBlob::from_bytes(&f.payload[MSG_HEADER_LEN..]).expect("a blob");
            return (blob, f.payload.to_vec());
        }
    }
}

/// The fixture (see the module docs).
pub struct Fixture {
    /// The arena everything lives in.
    pub arena: Arena,
    /// A second view of it, joined from its pool's fd as another process joins it.
    pub view: Arena,
    /// An object of type `AtomicU64`, value [`COUNTER`].
    pub counter: ShmHandle<AtomicU64>,
    /// An object of type `[u64; 4]`, value [`QUAD`].
    pub quad: ShmHandle<[u64; 4]>,
    /// Frozen messages: one segment (`msgs[0]`) and several (`msgs[1]`).
    pub msgs: [MsgOut<cool_msg::Owned>; 2],
    /// Their renderings, to compare what a receiver reads with.
    pub texts: [String; 2],
    /// The frames of the real sends, header and blob (the first lend of each).
    pub frames: [Vec<u8>; 2],
    /// The real sender (its `pool_frame`: the arena's announcement).
    pub lender: Lender,
    /// The blocks in use once all is made.
    blocks: u64,
    lent: Vec<LendBlob>,
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

/// Runs `f` with the process's fixture (made on first use).
pub fn with<R>(f: impl FnOnce(&mut Fixture) -> R) -> R {
    FIXTURE.with(|cell| {
        let mut slot = cell.borrow_mut();
        f(slot.get_or_insert_with(Fixture::new))
    })
}

impl Fixture {
    fn new() -> Fixture {
        let arena = Arena::create(ArenaConfig::new().pool_size(4 << 20)).expect("an arena");
        let fd = arena.pool_fd(0).and_then(|f| f.try_clone_to_owned().ok());
        let view = Arena::join(fd, ArenaConfig::new()).expect("a second view");
        let counter = arena.construct(AtomicU64::new(COUNTER)).expect("an object");
        let quad = arena.construct(QUAD).expect("an object");
        let lender = Lender::new(&arena);
        let mut solo = MsgOut::<cool_msg::Owned>::new_in(&arena);
        {
            let mut h = solo.init_root().init_hello_there();
            h.set_greeting("one segment");
            h.set_num(7);
        }
        // Small segments: the blob's chunks spread over several.
        let sizes = SegmentSizes {
            first_words: 16,
            max_growth_words: 32,
        };
        let mut many = MsgOut::<cool_msg::Owned>::with_sizes(Some(arena.clone()), sizes);
        {
            let mut blob = many.init_root().init_blob();
            blob.set_tag(99);
            let mut chunks = blob.init_chunks(4);
            for i in 0..4 {
                chunks.reborrow().get(i).set_data(&[i as u8; 100]);
            }
        }
        assert!(many.segment_count() > 2, "a message of several segments");
        let texts = [format!("{solo:#}"), format!("{many:#}")];
        let mut fx = Fixture {
            arena,
            view,
            counter,
            quad,
            msgs: [solo, many],
            texts,
            frames: [Vec::new(), Vec::new()],
            lender,
            blocks: 0,
            lent: Vec::new(),
        };
        for k in 0..2 {
            let (_, frame) = fx.lend_msg(k);
            fx.frames[k] = frame;
        }
        // Given back at once: the fixture's baseline holds no lend.
        fx.settle();
        fx.blocks = fx.arena.stats().blocks_in_use;
        fx
    }

    /// Lends one reference of message `k` (0 or 1) through a real send: its blob, and the
    /// frame it came in (header and blob).
    pub fn lend_msg(&mut self, k: usize) -> (LendBlob, Vec<u8>) {
        let (blob, frame) = self.lender.send(&mut self.msgs[k]);
        self.lent.push(blob);
        (blob, frame)
    }

    /// Lends one reference of object `k` (0: the counter, 1: the four words).
    pub fn lend_obj(&mut self, k: usize) -> LendBlob {
        let blob = if k == 0 {
            self.counter.lend()
        } else {
            self.quad.lend()
        };
        self.lent.push(blob);
        blob
    }

    /// Gives back the lends not taken (`release_blob` refuses one whose reference was
    /// borrowed), then checks that every count is back to the baseline.
    pub fn settle(&mut self) {
        for blob in self.lent.drain(..) {
            let _ = self.arena.release_blob(&blob);
        }
        assert_eq!(self.counter.ref_count(), 1, "the counter's references");
        assert_eq!(self.quad.ref_count(), 1, "the four words' references");
        for m in &self.msgs {
            assert_eq!(m.shared_refs(), Some(1), "a message's references");
        }
        if self.blocks != 0 {
            assert_eq!(
                self.arena.stats().blocks_in_use,
                self.blocks,
                "blocks in use"
            );
        }
    }
}
