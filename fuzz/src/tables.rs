//! Segment tables in shared memory: a real message (one segment, or many, of a shape the input
//! picks) is sent in place by a real `MsgChannel`; then the input scribbles on the handle block
//! the blob names (xor masks at offsets from its payload: a table's count and entries, a
//! one-segment message's prefix, the message's own words), as a peer that maps the pool may;
//! then a real receiver borrows and reads it, and both ends drop it (in the order the input
//! picks): the last one walks the scribbled table to free the segments.
//!
//! The scribbles go through the pool's memfd (`pwrite`), as the other process's writes would
//! land. The arena is kept from input to input unless an input left a block behind (a corrupt
//! entry leaks its segment by design), so later inputs' senders build on the blocks scribbled
//! messages were freed into. That once crashed: a scribbled used length let the last holder
//! free a dirty block as zeroed, and capnp's builder followed the garbage (a panic in
//! `zero_object`); the claim now only sizes the clearing (`SegTable`'s drop), with a regression
//! test in the library (`an_understated_used_length_still_frees_zeroed_blocks`).
//!
//! Oracles: no panic; receive errors are hosing and reported once.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;

use flowipc::msg::{Backing, MsgChannel, MsgOut, SegmentSizes};
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::shm::{Arena, ArenaConfig};
use flowipc::transport::{Channel, ChannelConfig, OutFrame};

use crate::fixture::Lender;
use crate::msg_frames::read_all;
use crate::{Input, Program, Seed};

/// The arena messages are made in, its pools' files (by pool id, opened as messages land in
/// them), and a real sender whose frames are caught.
struct State {
    arena: Arena,
    pools: Vec<Option<File>>,
    lender: Lender,
    /// The type tag of a one-segment message's blob (a message of one segment whose segment
    /// has no prefix is sent as a table of one entry instead).
    solo_tag: u64,
}

impl State {
    fn new() -> State {
        let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20)).expect("an arena");
        let mut lender = Lender::new(&arena);
        let mut probe = MsgOut::<cool_msg::Owned>::new_in(&arena);
        probe.init_root().init_hello_there().set_num(1);
        let (blob, _) = lender.send(&mut probe);
        arena.release_blob(&blob).expect("an unborrowed lend");
        State {
            arena,
            pools: Vec::new(),
            lender,
            solo_tag: blob.type_tag(),
        }
    }
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Builds the message the shape bytes describe: a greeting (one small segment), or a blob of
/// chunks of the given sizes in segments of the given size.
fn build(arena: &Arena, inp: &mut Input<'_>) -> MsgOut<cool_msg::Owned> {
    let shape = inp.u8();
    if shape & 1 == 0 {
        let mut m = MsgOut::<cool_msg::Owned>::new_in(arena);
        let mut h = m.init_root().init_hello_there();
        h.set_num(i64::from(shape));
        h.set_greeting("scribbled on");
        return m;
    }
    let sizes = SegmentSizes {
        first_words: 8 + u32::from(inp.u8() % 64),
        max_growth_words: 64,
    };
    let n = 1 + u32::from(shape >> 1) % 8;
    let mut m = MsgOut::<cool_msg::Owned>::with_sizes(Some(arena.clone()), sizes);
    let mut chunks = m.init_root().init_blob().init_chunks(n);
    for i in 0..n {
        let len = usize::from(inp.u8()) * 4;
        chunks.reborrow().get(i).set_data(&vec![i as u8; len]);
    }
    m
}

/// One input: the message's shape, then scribbles (offset from the payload, a mask), with a
/// first byte whose bit 0 says who drops last (the receiver, or the sender).
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let order = inp.u8();
    STATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let st = slot.get_or_insert_with(State::new);
        let mut msg = build(&st.arena, &mut inp);
        let (blob, frame) = st.lender.send(&mut msg);
        // What the handle block holds (and no byte of another block, whose header a scribble
        // could break: that is the allocator's metadata, not a table): a table's count and
        // entries (16 + 24 bytes a segment), or a one-segment message's prefix and words.
        let solo = blob.type_tag() == st.solo_tag;
        let span = if solo {
            16 + 8 * msg.size_in_words()
        } else {
            16 + 24 * msg.segment_count().max(1)
        } as u64;
        // The file of the pool the handle is in (the arena grows: not always pool 0).
        let id = blob.pool() as usize;
        if st.pools.len() <= id {
            st.pools.resize_with(id + 1, || None);
        }
        let pool = st.pools[id].get_or_insert_with(|| {
            let fd = st.arena.pool_fd(blob.pool()).expect("the blob's pool");
            File::from(fd.try_clone_to_owned().expect("a duplicate fd"))
        });
        // The scribbles: each an offset in the span and a masked run.
        while inp.more() {
            let at = u64::from(inp.u16()) % span;
            let n = usize::from(inp.u8() % 32).min((span - at) as usize);
            let mask = inp.bytes(n);
            let at = blob.offset() + at;
            let mut cur = vec![0u8; mask.len()];
            pool.read_exact_at(&mut cur, at).expect("pread");
            for (c, m) in cur.iter_mut().zip(mask) {
                *c ^= m;
            }
            pool.write_all_at(&cur, at).expect("pwrite");
        }
        // The receiver: a channel that knows the arena, and the frame as the sender sent it.
        let (mut tx, b) = Channel::pair(ChannelConfig::new().with_fds(false)).expect("a pair");
        let mut rx = MsgChannel::<cool_msg::Owned>::new(b, Backing::Heap).with_arena(&st.arena);
        tx.send(OutFrame::new(&frame)).expect("a send");
        let got = match rx.try_recv() {
            Ok(m) => m,
            Err(e) => {
                assert!(e.is_hosing(), "a receive error that is not hosing: {e:?}");
                assert!(matches!(rx.try_recv(), Err(flowipc::msg::Error::Hosed)));
                None
            }
        };
        if order & 1 == 0 {
            drop(msg);
            if let Some(m) = got {
                read_all(m, None);
            }
        } else {
            if let Some(m) = got {
                read_all(m, None);
            }
            drop(msg);
        }
        drop((tx, rx));
        if st.arena.stats().blocks_in_use != 0 {
            *slot = None;
        }
    });
}

/// Seeds: messages of several shapes, sent and received untouched (and one scribble that
/// flips nothing).
pub fn seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (i, shape) in [0u8, 1, 3, 7, 15].into_iter().enumerate() {
        let mut p = Program::new();
        p.u8(i as u8).u8(shape);
        if shape & 1 != 0 {
            p.u8(8);
            for n in 0..1 + (shape >> 1) % 8 {
                p.u8(n * 7);
            }
        }
        p.u16(0).u8(4).bytes(&[0; 4]);
        seeds.push((format!("shape{shape}"), p.finish()));
    }
    seeds
}
