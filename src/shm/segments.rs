//! Cap'n Proto segments in the arena: the allocator a message builder uses, the ref-counted
//! segment table a sent message becomes, and the reader segments over it in another process.
//!
//! This is the only capnp-aware part of `shm`. It lives here (rather than in the message layer)
//! because capnp's [`Allocator`] is an `unsafe` trait and reading segments in place means making
//! slices from raw pointers into shared memory: `unsafe` code is kept to `shm` and `sys`.
//!
//! # The protocol that keeps readers sound
//! * A message under construction is an [`OutMsg`]: a capnp builder whose segments are arena
//!   blocks (or, in heap mode, private heap buffers). Only its owner writes them.
//! * To send it in place, [`OutMsg::share_shm`] *freezes* it: it writes a segment table (pool,
//!   offset, generation and used bytes of each segment) into a ref-counted arena block that from
//!   then on owns the segments, and lends one reference per receiver. A one-segment message (the
//!   common small one) needs no table: its segment block itself becomes the ref-counted handle,
//!   with its tag and used length in a 16-byte prefix kept back at the start of the block (capnp
//!   never gets those bytes, and they share a cache line with the message's first words), so it
//!   costs one block, validated once on receipt. Heap mode instead
//!   hands out `Arc`s of the segment buffers ([`OutMsg::share_heap`]).
//! * Writing again ([`OutMsg::builder_mut`]) first *thaws*: if the table (or a heap buffer) is
//!   still referenced by anyone else, the message is copied into fresh segments and the shared
//!   ones are left to their readers (copy-on-write); if not, the table is dissolved (a
//!   one-segment handle becomes a private block again, and its next publication a new
//!   generation, so blobs of the old one are stale) and the builder owns its segments again. So a
//!   receiver never sees a byte change under it.
//! * The last reference to a table, dropped in any process, zeroes each segment's used prefix
//!   and frees it, then frees the table.

use std::alloc::Layout;
use std::cell::RefCell;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use capnp::message::{Allocator, Builder, ReaderSegments};

use super::arena::{Arena, BlockRef};
use super::error::{Error, Result};
use super::handle::{publish_block, publish_in_place, unpublish_block, LendBlob};
use super::layout::*;
use super::lockfree::{rc_release, refs, ticket_issue, tickets, Words, LINK};
use super::pool::Pool;
use crate::sync::Ordering;

/// Type tag of a segment table block (recorded like an object's, checked by borrowers).
const TABLE_TAG: u64 = 0x5345_4754_4142_4c31; // "SEGTABL1"
/// Payload offsets in a table block: tag, segment count, then 3 words per segment.
const T_TAG: u64 = 0;
const T_COUNT: u64 = 8;
const T_ENTRIES: u64 = 16;
const T_ENTRY: u64 = 24;
/// Type tag of a one-segment message whose segment block is its own handle ("SEGSOLO1").
const SOLO_TAG: u64 = 0x5345_4753_4f4c_4f31;
/// Bytes at the start of a message's first arena segment kept back from capnp for the prefix of
/// a one-segment handle: its tag (where every handle has its tag), then the used bytes of the
/// segment, which follows.
const PREFIX: u64 = 16;
/// Flag in a table entry's offset (payload offsets are 16-aligned, so the bit is free): the
/// segment starts [`PREFIX`] bytes into its block (a message's first segment).
const ENTRY_PREFIXED: u64 = 1;
/// Most segments a table may list (a 1 GiB message of small objects has about 70).
pub const MAX_SEGMENTS: usize = 1 << 16;

/// How a message's segments are sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSizes {
    /// Words of the first segment (capnp suggests 1024 = 8 KiB).
    pub first_words: u32,
    /// Cap on the heuristic growth of later segments, in words. A single object larger than
    /// this still gets a segment of its own, sized exactly (page-rounded), so the cap bounds the
    /// over-reservation of a big message (a 1 GiB message reserves at most this much extra)
    /// without limiting object sizes.
    pub max_growth_words: u32,
}

impl Default for SegmentSizes {
    fn default() -> Self {
        SegmentSizes {
            first_words: 1024,
            max_growth_words: 2 << 20, // 16 MiB
        }
    }
}

/// A zeroed heap buffer used as a segment: heap-mode messages, and the fallback when the arena
/// is exhausted. Shared with the transport's send queue through `Arc` while frozen.
///
/// Small ones are recycled: the last owner clears the prefix the builder reported writing and
/// keeps the buffer in a per-thread spare list, so a small heap message costs neither a fresh
/// allocation nor clearing a whole 8 KiB first segment.
pub struct HeapSeg {
    ptr: NonNull<u64>,
    words: usize,
    /// Bytes from the start that may be non-zero: all of them until the builder reports how
    /// many words it wrote (`deallocate_segment`).
    dirty: AtomicUsize,
}

/// Largest buffer (in words) kept as a spare: 16 KiB.
const SPARE_MAX_WORDS: usize = 2048;
/// Most spare buffers per thread.
const SPARE_COUNT: usize = 8;

/// Zeroed buffers (pointer, words) kept for reuse by this thread; each was allocated with
/// `Layout::array::<u64>(words)` and is owned by the list alone.
struct Spares(Vec<(NonNull<u64>, usize)>);

impl Drop for Spares {
    fn drop(&mut self) {
        for &(ptr, words) in &self.0 {
            if let Ok(layout) = Layout::array::<u64>(words) {
                // SAFETY: allocated with this layout (`HeapSeg::zeroed`), owned by the list alone
                // (moved in by `HeapSeg::drop`), freed once (here, as the list goes).
                unsafe { std::alloc::dealloc(ptr.as_ptr().cast(), layout) }
            }
        }
    }
}

thread_local! {
    static SPARES: RefCell<Spares> = const { RefCell::new(Spares(Vec::new())) };
}

// SAFETY: a HeapSeg is an owned buffer (like a `Box<[u64]>`); the pointer is not aliased by any
// other owner, so moving it to another thread is fine.
unsafe impl Send for HeapSeg {}
// SAFETY: `&HeapSeg` only gives `&[u8]` (AsRef). Writes go through the capnp builder of the
// `OutMsg` that allocated it, which writes only while it holds the sole `Arc` (checked with
// `Arc::get_mut`, which synchronizes with the other holders' drops), so shared readers never
// race a writer.
unsafe impl Sync for HeapSeg {}

impl HeapSeg {
    fn zeroed(words: usize) -> HeapSeg {
        let words = words.max(1);
        if words <= SPARE_MAX_WORDS {
            let spare = SPARES
                .try_with(|s| {
                    let mut s = s.try_borrow_mut().ok()?;
                    let i = s.0.iter().rposition(|&(_, w)| w == words)?;
                    Some(s.0.swap_remove(i).0)
                })
                .ok()
                .flatten();
            if let Some(ptr) = spare {
                return HeapSeg {
                    ptr,
                    words,
                    dirty: AtomicUsize::new(words * 8),
                };
            }
        }
        let Ok(layout) = Layout::array::<u64>(words) else {
            // Unreachable on 64-bit (capnp asks for at most 2^32 words); like a failed
            // allocation elsewhere, it ends the process rather than hand out a short buffer.
            std::alloc::handle_alloc_error(Layout::new::<u64>())
        };
        // SAFETY: the layout has non-zero size (words >= 1).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<u64>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        HeapSeg {
            ptr,
            words,
            dirty: AtomicUsize::new(words * 8),
        }
    }

    /// Records that only the first `bytes` may be non-zero (the builder is done with it).
    fn written(&self, bytes: usize) {
        self.dirty.store(
            bytes.min(self.words * 8),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl Drop for HeapSeg {
    fn drop(&mut self) {
        if self.words <= SPARE_MAX_WORDS {
            // The last owner: the builder's `written` (if it came) happened before, through the
            // `Arc` whose last drop this is.
            let dirty = (*self.dirty.get_mut()).min(self.words * 8);
            let kept = SPARES
                .try_with(|s| {
                    let Ok(mut s) = s.try_borrow_mut() else {
                        return false;
                    };
                    if s.0.len() >= SPARE_COUNT {
                        return false;
                    }
                    // SAFETY: the buffer is ours alone (its last owner is being dropped) and
                    // `dirty` bytes from its start lie within its `words * 8` bytes.
                    unsafe { std::ptr::write_bytes(self.ptr.as_ptr().cast::<u8>(), 0, dirty) };
                    s.0.push((self.ptr, self.words));
                    true
                })
                .unwrap_or(false);
            if kept {
                return;
            }
        }
        if let Ok(layout) = Layout::array::<u64>(self.words) {
            // SAFETY: allocated in `zeroed` with this very layout (directly, or as a spare
            // allocated so), owned by this segment alone, freed once (here).
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) }
        }
    }
}

impl AsRef<[u8]> for HeapSeg {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the buffer is `words * 8` initialized (zeroed, then written) bytes, alive as
        // long as `self`. No one writes it while this borrow lives: see the `Sync` argument.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast(), self.words * 8) }
    }
}

impl fmt::Debug for HeapSeg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeapSeg({} words)", self.words)
    }
}

/// One segment the allocator handed to capnp.
enum Mem {
    Shm(BlockRef),
    Heap(Arc<HeapSeg>),
}

struct Seg {
    ptr: NonNull<u8>,
    words: u32,
    /// `None` once capnp handed the segment back (`deallocate_segment` ran).
    mem: Option<Mem>,
    /// The block's first [`PREFIX`] bytes, before the `words` capnp got, are kept back for a
    /// one-segment message's handle prefix (see [`OutMsg::share_shm`]). Set on a message's
    /// first arena segment.
    prefix: bool,
}

impl Seg {
    fn live(&self) -> bool {
        self.mem.is_some()
    }
}

/// A message's segments in allocation order; the first inline (most messages have only it).
#[derive(Default)]
struct Segs {
    first: Option<Seg>,
    more: Vec<Seg>,
}

impl Segs {
    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn push(&mut self, seg: Seg) {
        if self.first.is_none() {
            self.first = Some(seg);
        } else {
            self.more.push(seg);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Seg> {
        self.first.iter().chain(self.more.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Seg> {
        self.first.iter_mut().chain(self.more.iter_mut())
    }
}

/// What the allocator and its message keep under their lock.
struct SegList {
    segs: Segs,
    /// A segment table owns the SHM segments: the builder must not free them.
    published: bool,
    /// The arena could not serve a segment; a heap buffer stands in for it.
    failed: Option<Error>,
}

// SAFETY: the raw pointers in `segs` point into arena mappings (kept alive by the allocator's
// `Arena`) or into `HeapSeg`s owned through the `Arc`s beside them; the list itself is only
// used under its mutex.
unsafe impl Send for SegList {}

/// What the allocator and its message share (one allocation per message).
struct SegShared {
    /// Where segments come from (`None`: the heap).
    arena: Option<Arena>,
    /// Some segment is a heap buffer (always in heap mode), or `failed` is set: only then do
    /// [`OutMsg::is_frozen_by_others`] and the failure checks need the lock. Written under the
    /// lock by whoever has the message exclusively (`&mut`), read by holders of `&OutMsg`,
    /// which that exclusive access happened before: `Relaxed` suffices.
    heap_or_failed: AtomicBool,
    list: Mutex<SegList>,
}

impl SegShared {
    fn lock(&self) -> MutexGuard<'_, SegList> {
        crate::sync::lock(&self.list)
    }

    /// Records an allocation failure (the first one stays).
    fn fail(&self, list: &mut SegList, e: Error) {
        if list.failed.is_none() {
            list.failed = Some(e);
        }
        self.heap_or_failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a heap segment or a failure may be recorded (see `heap_or_failed`).
    fn heap_or_failed(&self) -> bool {
        self.heap_or_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// capnp's allocator over an arena (or the heap). Crate-internal: users see `MsgOut`.
pub struct SegAlloc {
    shared: Arc<SegShared>,
    next_words: u32,
    sizes: SegmentSizes,
}

impl fmt::Debug for SegAlloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegAlloc")
            .field("shm", &self.shared.arena.is_some())
            .field("next_words", &self.next_words)
            .finish()
    }
}

impl SegAlloc {
    /// A segment of at least `words` words (at least `minimum` of them for capnp), zeroed. The
    /// first arena segment keeps a [`PREFIX`] back at its start. Returns the pointer, the words
    /// capnp may use, the memory and whether the prefix is kept.
    fn grant(
        &self,
        list: &mut SegList,
        words: u32,
        minimum: u32,
        first: bool,
    ) -> (NonNull<u8>, u32, Mem, bool) {
        if let Some(arena) = &self.shared.arena {
            let bytes = if first {
                (words as usize * 8).max(minimum as usize * 8 + PREFIX as usize)
            } else {
                words as usize * 8
            };
            match arena.alloc_zeroed(bytes) {
                Ok(mut block) => {
                    let cap = block.capacity();
                    let (words, prefix) =
                        match u32::try_from(cap.saturating_sub(PREFIX as usize) / 8) {
                            Ok(w) if first && cap >= PREFIX as usize => (w, true),
                            _ => ((cap / 8).min(u32::MAX as usize) as u32, false),
                        };
                    let skip = if prefix { PREFIX as usize } else { 0 };
                    let ptr = block.as_mut_ptr().wrapping_add(skip);
                    let r = block.into_raw();
                    // A live mapping's address is never null.
                    if let Some(ptr) = NonNull::new(ptr) {
                        return (ptr, words, Mem::Shm(r), prefix);
                    }
                }
                Err(e) => self.shared.fail(list, e),
            }
        }
        self.shared
            .heap_or_failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let seg = Arc::new(HeapSeg::zeroed(words as usize));
        let ptr = seg.ptr.cast::<u8>();
        (ptr, words, Mem::Heap(seg), false)
    }
}

// SAFETY: the trait's four duties. (1) Zeroed: arena segments come from `Arena::alloc_zeroed`
// (dirty blocks are cleared; clean ones were released with only their written prefix, which
// `release_zeroed_prefix` cleared), heap ones from `std::alloc::alloc_zeroed`. (2) Valid until
// `deallocate_segment`: an arena block stays allocated until that call frees it, or, once a
// table owns it (`published`), until the table's last reference goes; `OutMsg` drops its builder
// before its table, and a table only dissolves (handing the segments back) when it is the sole
// reference, so neither frees a segment the builder still uses. Heap buffers are kept alive by
// the `Arc` in the list. (3) No overlap: each segment is its own block or buffer (a first
// segment's prefix lies before the words capnp gets). (4) Aligned: block payloads are 16-aligned
// (so is a first segment, 16 bytes in), heap buffers are `u64` arrays (8-aligned).
unsafe impl Allocator for SegAlloc {
    fn allocate_segment(&mut self, minimum_size: u32) -> (NonNull<u8>, u32) {
        let words = minimum_size.max(self.next_words);
        self.next_words = words
            .saturating_mul(2)
            .min(self.sizes.max_growth_words)
            .max(self.sizes.first_words);
        let mut list = self.shared.lock();
        let first = list.segs.is_empty();
        let (ptr, words, mem, prefix) = self.grant(&mut list, words, minimum_size, first);
        list.segs.push(Seg {
            ptr,
            words,
            mem: Some(mem),
            prefix,
        });
        (ptr, words)
    }

    unsafe fn deallocate_segment(&mut self, ptr: NonNull<u8>, _word_size: u32, words_used: u32) {
        let mut list = self.shared.lock();
        let published = list.published;
        let Some((mem, prefix)) = list
            .segs
            .iter_mut()
            .find(|s| s.ptr == ptr && s.live())
            .and_then(|s| Some((s.mem.take()?, s.prefix)))
        else {
            return;
        };
        drop(list);
        match mem {
            // A table owns it now; its last reference frees it.
            Mem::Shm(_) if published => {}
            Mem::Shm(r) => {
                if let Some(arena) = &self.shared.arena {
                    // SAFETY: the block was allocated for this segment and turned into `r` by
                    // `into_raw`; this is its only re-adoption (the segment is marked gone).
                    if let Ok(block) = unsafe { arena.block_from_raw(r, 0) } {
                        let skip = if prefix { PREFIX as usize } else { 0 };
                        // SAFETY: capnp wrote at most `words_used` words of a zeroed block after
                        // the `skip` bytes of the prefix (which is cleared with them).
                        unsafe { block.release_zeroed_prefix(skip + words_used as usize * 8) };
                    }
                }
            }
            Mem::Heap(seg) => {
                // Only what capnp wrote needs clearing when the buffer is recycled.
                seg.written(words_used as usize * 8);
                drop(seg);
            }
        }
    }
}

/// The ref-counted handle of a frozen message. Dropping the last reference (in any process)
/// frees every segment (and the table).
///
/// Two kinds, told apart by the type tag of their blobs:
/// * a **table** ([`TABLE_TAG`]): a block of its own listing the segments;
/// * a **one-segment message** ([`SOLO_TAG`]): the segment block itself is the handle (its
///   header holds the count, as for any handle), and its first [`PREFIX`] bytes, which capnp
///   never got, hold the tag and the used bytes. A small message thus costs one block: no table
///   to allocate, write, validate and free.
pub struct SegTable {
    arena: Arena,
    pool: u32,
    /// Block offset (header), not payload.
    off: u64,
    generation: u32,
    /// Payload capacity of the block (fixed while a reference is held).
    cap: u64,
    /// A one-segment message (the block is the segment).
    solo: bool,
    /// This value holds one of the block's references, given back on drop. Cleared only by
    /// [`dissolve_if_sole`](SegTable::dissolve_if_sole), which ends the handle itself: the
    /// value then drops like any other (its `Arena` clone with it), never `forget`ten.
    holds_ref: bool,
}

impl fmt::Debug for SegTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegTable")
            .field("pool", &self.pool)
            .field("offset", &(self.off + BLOCK_HDR))
            .field("solo", &self.solo)
            .field("refs", &self.ref_count())
            .finish()
    }
}

impl SegTable {
    fn pool(&self) -> &Pool {
        // Pools are never removed from an arena, and this one was known when the table was made.
        self.arena
            .pool(self.pool)
            .expect("a table's pool is part of its arena")
    }

    fn payload(&self) -> u64 {
        self.off + BLOCK_HDR
    }

    /// Payload offset of a one-segment handle's used bytes (after its tag).
    fn solo_used_at(&self) -> u64 {
        self.payload() + 8
    }

    /// Writes a table for `n` entries (segment, used bytes) and returns its first reference. If
    /// an entry is an error, the table is freed and the error returned.
    fn create(
        arena: &Arena,
        n: usize,
        entries: &mut dyn Iterator<Item = Result<(BlockRef, u64)>>,
    ) -> Result<SegTable> {
        let size = T_ENTRIES as usize + n * T_ENTRY as usize;
        let (pool, g) = arena.grant(size, 0)?;
        let p = g.off + BLOCK_HDR;
        pool.word(p + T_TAG).store(TABLE_TAG, Ordering::Relaxed);
        pool.word(p + T_COUNT).store(n as u64, Ordering::Relaxed);
        for i in 0..n {
            let entry = entries
                .next()
                .unwrap_or(Err(Error::Corrupt("fewer segments than counted")));
            let (r, used) = match entry {
                Ok(e) => e,
                Err(e) => {
                    let _ = pool.free_block(g.off, false);
                    return Err(e);
                }
            };
            let e = p + T_ENTRIES + i as u64 * T_ENTRY;
            pool.word(e).store(
                r.pool as u64 | (r.generation as u64) << 32,
                Ordering::Relaxed,
            );
            pool.word(e + 8).store(r.offset, Ordering::Relaxed);
            pool.word(e + 16).store(used, Ordering::Relaxed);
        }
        // Borrowable from here on; the entries written above are ordered before any borrow.
        publish_block(pool, &g);
        Ok(SegTable {
            arena: arena.clone(),
            pool: pool.id(),
            off: g.off,
            generation: g.generation(),
            cap: g.capacity,
            solo: false,
            holds_ref: true,
        })
    }

    /// Makes the one segment of a message its handle: writes the prefix (tag, `used`) into the
    /// `PREFIX` bytes kept back before the segment's `words` and publishes the block in place.
    /// Updates `r` to the block's new generation (see [`publish_in_place`]).
    fn create_solo(arena: &Arena, r: &mut BlockRef, words: u32, used: u64) -> Result<SegTable> {
        let pool = arena.pool(r.pool).ok_or(Error::UnknownPool(r.pool))?;
        let off = r.offset - BLOCK_HDR;
        let cap = words as u64 * 8 + PREFIX;
        pool.word(r.offset).store(SOLO_TAG, Ordering::Relaxed);
        pool.word(r.offset + 8).store(used, Ordering::Relaxed);
        let generation = publish_in_place(pool, off);
        r.generation = generation;
        Ok(SegTable {
            arena: arena.clone(),
            pool: r.pool,
            off,
            generation,
            cap,
            solo: true,
            holds_ref: true,
        })
    }

    /// Adds a reference for a receiver and packs it in a blob.
    pub fn lend(&self) -> LendBlob {
        ticket_issue(self.pool().word(self.off + LINK));
        LendBlob::new(
            self.arena.id() as u32,
            self.pool,
            self.payload(),
            self.generation,
            if self.solo { SOLO_TAG } else { TABLE_TAG },
        )
    }

    /// References (holders in every process plus lent blobs not yet borrowed). A snapshot.
    pub fn ref_count(&self) -> u64 {
        refs(self.pool().word(self.off + LINK).load(Ordering::Relaxed))
    }

    /// If this is the only reference anywhere, gives the segments back to the builder: a table
    /// block is freed, a one-segment handle made a private block again (its prefix cleared), and
    /// the handle ends (`Ok`). Otherwise hands `self` back unchanged (`Err`).
    fn dissolve_if_sole(mut self) -> std::result::Result<(), SegTable> {
        // Acquire pairs with the Release of every other holder's drop: their reads of the
        // segments happen before the builder writes them again.
        let w = self.pool().word(self.off + LINK).load(Ordering::Acquire);
        if refs(w) != 1 || tickets(w) != 0 {
            return Err(self);
        }
        // No other holder and no outstanding ticket: no one can reach the handle any more.
        let pool = self.pool();
        if self.solo {
            unpublish_block(pool, self.off);
            // No longer a handle: no tag (freeing clears the prefix anyway).
            pool.word(self.payload()).store(0, Ordering::Relaxed);
            pool.word(self.solo_used_at()).store(0, Ordering::Relaxed);
        } else {
            let _ = pool.free_block(self.off, false);
        }
        // The reference is gone with the handle; `self` (and its arena clone) drops normally.
        self.holds_ref = false;
        Ok(())
    }
}

fn read_entry(pool: &Pool, e: u64) -> (BlockRef, u64) {
    let w0 = pool.word(e).load(Ordering::Relaxed);
    let r = BlockRef {
        pool: w0 as u32,
        offset: pool.word(e + 8).load(Ordering::Relaxed),
        generation: (w0 >> 32) as u32,
    };
    let used = pool.word(e + 16).load(Ordering::Relaxed);
    (r, used)
}

/// Checks a segment's used length against the `capacity` its bytes may span: a whole number
/// of words, within it, and short enough for capnp (which counts words in a u32).
fn check_used(pool: u32, offset: u64, used: u64, capacity: u64) -> Result<()> {
    if used > capacity || used % 8 != 0 || used / 8 > u32::MAX as u64 {
        return Err(Error::OutOfBounds {
            pool,
            offset: offset.saturating_add(used),
        });
    }
    Ok(())
}

/// A table entry's block reference without its [`ENTRY_PREFIXED`] flag, and the bytes the
/// segment starts into its block.
fn unprefixed(r: BlockRef) -> (BlockRef, u64) {
    let skip = if r.offset & ENTRY_PREFIXED != 0 {
        PREFIX
    } else {
        0
    };
    let r = BlockRef {
        offset: r.offset & !ENTRY_PREFIXED,
        ..r
    };
    (r, skip)
}

/// Validates one segment as a table entry names it: a live block (see [`Arena::live_block`])
/// whose capacity holds `used` (a whole number of words) after the segment's prefix, if any.
/// Returns the segment's pointer.
fn segment(arena: &Arena, r: BlockRef, used: u64) -> Result<NonNull<u8>> {
    let (r, skip) = unprefixed(r);
    let (pool, _, _, capacity) = arena.live_block(r)?;
    check_used(r.pool, r.offset, used, capacity.saturating_sub(skip))?;
    NonNull::new(pool.ptr(r.offset + skip)).ok_or(Error::Corrupt("null mapping"))
}

impl Drop for SegTable {
    fn drop(&mut self) {
        let pool = self.pool();
        if !self.holds_ref || !rc_release(pool.word(self.off + LINK)) {
            return;
        }
        let p = self.payload();
        if self.solo {
            // Last reference to a one-segment message: clear the prefix and what capnp wrote
            // after it, and free the block as clean. That is `Block::release_zeroed_prefix`'s
            // promise, made here through the pool directly (the block is the handle itself), on
            // the same grounds: the segment was allocated zeroed, and capnp wrote at most the
            // `used` bytes the prefix records, which was frozen (no writer) since it was sent.
            // A peer that scribbles past `used` anyway breaks the protocol: a later zeroed
            // allocation of this block would then see its bytes (garbage in a message, never
            // memory unsafety: shared bytes are only read as bytes). `used` is clamped, so the
            // clearing stays within the block whatever the prefix says.
            let used = pool
                .word(self.solo_used_at())
                .load(Ordering::Relaxed)
                .min(self.cap - PREFIX);
            pool.zero(p, PREFIX + used);
            let _ = pool.free_block(self.off, true);
            return;
        }
        // Last reference: free every segment (zeroing its used prefix), then the table. A
        // corrupt entry is skipped (leaked) rather than freed into a list it could damage.
        let n = pool.word(p + T_COUNT).load(Ordering::Relaxed) as usize;
        if n <= MAX_SEGMENTS && T_ENTRIES + n as u64 * T_ENTRY <= self.cap {
            for i in 0..n as u64 {
                let (r, used) = read_entry(pool, p + T_ENTRIES + i * T_ENTRY);
                let (r, skip) = unprefixed(r);
                // An entry naming the table itself (corrupt) must not free it mid-walk.
                if r.pool == self.pool && r.offset == p {
                    continue;
                }
                let len = used.saturating_add(skip) as usize;
                // SAFETY: this was the last reference to the table, which owns its segments (the
                // builder gave them up when the table was made: `published`), so no one else
                // holds or adopts segment `r`. A (corrupt) entry naming a block twice cannot
                // make two owners: freeing the first bumps the block's generation, so the second
                // `block_from_raw` is refused as stale; the self-reference is skipped above.
                // `block_from_raw` validates `r` and `len`.
                if let Ok(block) = unsafe { self.arena.block_from_raw(r, len) } {
                    // SAFETY: capnp wrote at most the `used` bytes the table recorded (its
                    // output prefix) of a segment that was allocated zeroed, after the `skip`
                    // bytes of a first segment's prefix (cleared with them).
                    unsafe { block.release_zeroed_prefix(len) };
                }
            }
        }
        let _ = pool.free_block(self.off, false);
    }
}

impl Arena {
    /// Adopts the reference a message blob carries (validated like any lend blob, plus its
    /// kind's tag) and validates segment 0 (each later one when it is first read).
    pub(crate) fn borrow_segments(&self, blob: &LendBlob) -> Result<ShmSegments> {
        // On error `table` drops its reference again (as the last one, it frees the message).
        let table = self.adopt_message(blob)?;
        if table.solo {
            read_solo(table)
        } else {
            read_table(table)
        }
    }

    /// The reference a message blob carries, as a table (of one segment or many) that gives it
    /// back on drop. The tag is checked where every handle has it (a mismatch leaves the
    /// reference lent, as for any borrow of the wrong type).
    fn adopt_message(&self, blob: &LendBlob) -> Result<SegTable> {
        let min = match blob.type_tag() {
            SOLO_TAG => PREFIX,
            TABLE_TAG => T_ENTRIES,
            // Neither kind of message handle (the table's tag is the one named).
            found => {
                return Err(Error::TypeMismatch {
                    expected: TABLE_TAG,
                    found,
                })
            }
        };
        let (pool, off, cap) = self.adopt(blob, Some((blob.type_tag(), min)))?;
        // The typed adoption checked the block's tag and capacity, so this is a message.
        match self.message_ref(pool, off, cap, blob.generation()) {
            Some(table) => Ok(table),
            None => {
                super::handle::release(pool, off);
                Err(Error::Corrupt("a message handle changed kind"))
            }
        }
    }

    /// The adopted reference to the handle block at `off` as a message table, if the block is
    /// one (its own tag says so, and its capacity holds what that kind reads); else `None`.
    fn message_ref(&self, pool: &Pool, off: u64, cap: u64, generation: u32) -> Option<SegTable> {
        // The reference the caller adopted keeps the block alive and its tag fixed.
        let solo = match pool.word(off + BLOCK_HDR).load(Ordering::Relaxed) {
            SOLO_TAG if cap >= PREFIX => true,
            TABLE_TAG if cap >= T_ENTRIES => false,
            _ => return None,
        };
        Some(SegTable {
            arena: self.clone(),
            pool: pool.id(),
            off,
            generation,
            cap,
            solo,
            holds_ref: true,
        })
    }

    /// Gives back one adopted reference to the handle block at `off` (see
    /// [`Arena::release_blob`]). The block's own tag, not the blob's claim, decides how: the
    /// last reference to a message frees its segments with it (and a one-segment message's
    /// block as clean), that to any other object frees its block.
    pub(super) fn give_back(&self, pool: &Pool, off: u64, cap: u64, generation: u32) {
        match self.message_ref(pool, off, cap, generation) {
            Some(table) => drop(table),
            None => super::handle::release(pool, off),
        }
    }
}

/// A one-segment message's segment: its used length (peer-written: checked) from the prefix.
fn read_solo(table: SegTable) -> Result<ShmSegments> {
    let pool = table.pool();
    let p = table.off + BLOCK_HDR;
    // The ticket's reference keeps the block alive: its prefix is ours to read.
    let used = pool.word(table.solo_used_at()).load(Ordering::Relaxed);
    check_used(pool.id(), p + PREFIX, used, table.cap - PREFIX)?;
    let ptr = NonNull::new(pool.ptr(p + PREFIX)).ok_or(Error::Corrupt("null mapping"))?;
    Ok(ShmSegments {
        table,
        first: (ptr, used as usize),
        rest: Vec::new(),
    })
}

/// A table's segments: the entries copied out (one sequential read), segment 0 validated now.
fn read_table(table: SegTable) -> Result<ShmSegments> {
    let pool = table.pool();
    let p = table.payload();
    let n = pool.word(p + T_COUNT).load(Ordering::Relaxed);
    if n == 0 || n as usize > MAX_SEGMENTS || T_ENTRIES + n * T_ENTRY > table.cap {
        return Err(Error::Corrupt(
            "segment table empty or longer than its block",
        ));
    }
    let (r0, used0) = read_entry(pool, p + T_ENTRIES);
    let ptr = segment(&table.arena, r0, used0)?;
    let rest = (1..n)
        .map(|i| {
            let (at, used) = read_entry(pool, p + T_ENTRIES + i * T_ENTRY);
            SegSlot {
                at,
                used,
                resolved: OnceLock::new(),
            }
        })
        .collect();
    Ok(ShmSegments {
        table,
        first: (ptr, used0 as usize),
        rest,
    })
}

/// A received message's segments, read in place. Holds a table reference: the segments stay
/// allocated and unchanged (frozen) until this is dropped.
///
/// Segment 0 (where the root is) is validated on receipt; every other segment when the reader
/// first reaches it, so receiving costs the same whatever the message's size (validating the ~70
/// segments of a 1 GiB message up front touches ~70 scattered pages: a few µs of TLB misses). A
/// segment that fails validation reads as missing, which capnp reports as an error.
pub struct ShmSegments {
    table: SegTable,
    /// Segment 0, validated: address and length (capnp asks for it on every pointer it follows
    /// there, so it is one load away).
    first: (NonNull<u8>, usize),
    /// Segments 1.. (none for a one-segment message: no allocation).
    rest: Vec<SegSlot>,
}

/// One table entry as received, and where it resolved to (address and length), once checked.
struct SegSlot {
    at: BlockRef,
    used: u64,
    resolved: OnceLock<Option<(NonNull<u8>, usize)>>,
}

impl ShmSegments {
    /// Validates segment `i` >= 1 (once) and returns its address and length.
    fn resolve(&self, i: usize) -> Option<(NonNull<u8>, usize)> {
        let slot = self.rest.get(i.checked_sub(1)?)?;
        *slot.resolved.get_or_init(|| {
            segment(&self.table.arena, slot.at, slot.used)
                .ok()
                .map(|ptr| (ptr, slot.used as usize))
        })
    }

    /// Words of all segments, as the table states them (what a copy would move).
    pub fn total_words(&self) -> usize {
        self.rest.iter().fold(self.first.1 / 8, |a, s| {
            a.saturating_add((s.used / 8) as usize)
        })
    }
}

// SAFETY: the pointers are into arena mappings kept alive by `table.arena`; the bytes are frozen
// (no process writes them while a table reference exists), so reading them from any thread is
// fine; the table reference itself is released with atomics.
unsafe impl Send for ShmSegments {}
// SAFETY: `&ShmSegments` gives only shared reads of frozen bytes (as argued for Send), and the
// one piece of interior mutability, each slot's `OnceLock`, is itself thread-safe.
unsafe impl Sync for ShmSegments {}

impl fmt::Debug for ShmSegments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmSegments")
            .field("table", &self.table)
            .field("segments", &(self.rest.len() + 1))
            .finish()
    }
}

impl ShmSegments {
    /// The table, e.g. for its reference count.
    pub fn table(&self) -> &SegTable {
        &self.table
    }
}

impl ReaderSegments for ShmSegments {
    #[inline]
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        let (addr, len) = if idx == 0 {
            self.first
        } else {
            self.resolve(idx as usize)?
        };
        // SAFETY: segment 0 was validated on receipt (`borrow_solo`: the handle block itself,
        // `len` within its capacity after the prefix; `borrow_table`: `segment`), later ones by
        // `segment` in `resolve`: [addr, addr+len) is inside a live block of a mapped pool
        // (allocated, of the generation recorded); the table reference we hold keeps the block
        // allocated and the mapping lives as long as `self.table.arena`; the freeze protocol
        // (module docs) guarantees no process writes it until the reference is gone, which
        // cannot happen while `&self` is borrowed. The pointer is the mapping's own (derived from
        // the pool's base pointer, never from an integer), so it carries the mapping's
        // provenance.
        Some(unsafe { std::slice::from_raw_parts(addr.as_ptr().cast_const(), len) })
    }

    fn len(&self) -> usize {
        self.rest.len() + 1
    }
}

/// A message being built (or already frozen and shared): a capnp builder over [`SegAlloc`].
pub struct OutMsg {
    // Field order matters: the builder (whose drop hands segments back) goes before the table
    // (whose last reference frees the segments it owns).
    builder: Builder<SegAlloc>,
    shared: Arc<SegShared>,
    table: Option<SegTable>,
    sizes: SegmentSizes,
}

impl fmt::Debug for OutMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutMsg")
            .field("shm", &self.shared.arena.is_some())
            .field("segments", &self.shared.lock().segs.len())
            .field("shared", &self.table)
            .finish()
    }
}

impl OutMsg {
    /// An empty message whose segments come from `arena` (or the heap when `None`).
    pub fn new(arena: Option<Arena>, sizes: SegmentSizes) -> OutMsg {
        let sizes = SegmentSizes {
            first_words: sizes.first_words.max(1),
            max_growth_words: sizes.max_growth_words.max(sizes.first_words.max(1)),
        };
        let shared = Arc::new(SegShared {
            heap_or_failed: AtomicBool::new(false),
            arena,
            list: Mutex::new(SegList {
                segs: Segs::default(),
                published: false,
                failed: None,
            }),
        });
        let alloc = SegAlloc {
            shared: shared.clone(),
            next_words: sizes.first_words,
            sizes,
        };
        OutMsg {
            builder: Builder::new(alloc),
            shared,
            table: None,
            sizes,
        }
    }

    /// Whether segments come from an arena.
    pub fn is_shm(&self) -> bool {
        self.shared.arena.is_some()
    }

    /// The arena segments come from.
    pub fn arena(&self) -> Option<&Arena> {
        self.shared.arena.as_ref()
    }

    /// Read-only access (never copies).
    pub fn builder(&self) -> &Builder<SegAlloc> {
        &self.builder
    }

    /// Write access: thaws a shared message first (copy-on-write if anyone else holds it).
    pub fn builder_mut(&mut self) -> &mut Builder<SegAlloc> {
        if self.is_frozen_by_others() {
            self.copy_into_fresh();
        } else if let Some(t) = self.table.take() {
            match t.dissolve_if_sole() {
                Ok(()) => self.shared.lock().published = false,
                Err(t) => {
                    // Someone borrowed it between the check and now: copy after all.
                    self.table = Some(t);
                    self.copy_into_fresh();
                }
            }
        }
        &mut self.builder
    }

    /// Whether some other holder (a receiver, a queued send) still references the segments.
    pub fn is_frozen_by_others(&self) -> bool {
        if let Some(t) = &self.table {
            let w = t.pool().word(t.off + LINK).load(Ordering::Acquire);
            if refs(w) != 1 || tickets(w) != 0 {
                return true;
            }
        }
        if !self.shared.heap_or_failed() {
            return false; // no heap buffer to be held elsewhere
        }
        // `Arc::get_mut` (unlike `strong_count`) synchronizes with the other holders' drops, so
        // their reads happen before any write the caller makes after seeing `false`.
        self.shared
            .lock()
            .segs
            .iter_mut()
            .any(|s| match &mut s.mem {
                Some(Mem::Heap(a)) => Arc::get_mut(a).is_none(),
                _ => false,
            })
    }

    /// Replaces the message by a private deep copy (its old segments stay with their readers).
    fn copy_into_fresh(&mut self) {
        let mut fresh = OutMsg::new(self.shared.arena.clone(), self.sizes);
        if !self.shared.lock().segs.is_empty() {
            let copied = self
                .builder
                .get_root_as_reader::<capnp::any_pointer::Reader<'_>>()
                .and_then(|root| fresh.builder.set_root(root));
            if copied.is_err() {
                let mut list = fresh.shared.lock();
                list.failed = None;
                fresh
                    .shared
                    .fail(&mut list, Error::Corrupt("message could not be copied"));
            }
        }
        *self = fresh;
    }

    /// The allocation failure that left part of the message on the heap, if any.
    pub fn alloc_failure(&self) -> Option<Error> {
        if !self.shared.heap_or_failed() {
            return None;
        }
        self.shared.lock().failed.as_ref().map(Error::duplicate)
    }

    fn check_failure(&mut self) -> Result<()> {
        if !self.shared.heap_or_failed() || self.shared.lock().failed.is_none() {
            return Ok(());
        }
        // The arena was full while building: try again now by copying into fresh segments
        // (if that also fails, the error stays and nothing is sent).
        if self.table.is_none() {
            self.copy_into_fresh();
        }
        match self.alloc_failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Freezes the message into a segment table (once; an unchanged message reuses it) and
    /// lends one reference for a receiver. Fails (sending nothing, the message intact) if the
    /// message is heap-backed or part of it could not be allocated in the arena.
    ///
    /// A one-segment message (the common small one) is frozen in place: its segment block
    /// becomes the handle, with no table block (see [`SegTable`]).
    pub fn share_shm(&mut self) -> Result<LendBlob> {
        if self.shared.arena.is_none() {
            return Err(Error::BadConfig(
                "a heap-backed message cannot be shared in place",
            ));
        }
        if self.table.is_none() {
            self.check_failure()?;
            // Make sure there is a root pointer (an empty message still has one segment).
            if self.builder.get_segments_for_output().is_empty() {
                let _ = self.builder.get_root::<capnp::any_pointer::Builder<'_>>();
            }
            let out = self.builder.get_segments_for_output();
            let Some(arena) = &self.shared.arena else {
                return Err(Error::BadConfig("no arena"));
            };
            let mut list = self.shared.lock();
            if out.len() > MAX_SEGMENTS {
                return Err(Error::Corrupt("too many segments"));
            }
            let out_of_step = || Error::Corrupt("segment list out of step with the builder");
            let table = if let [bytes] = &out[..] {
                let mut live = list.segs.iter_mut().filter(|s| s.live());
                let seg = live.next().ok_or_else(out_of_step)?;
                if live.next().is_some() || !std::ptr::eq(seg.ptr.as_ptr(), bytes.as_ptr()) {
                    return Err(out_of_step());
                }
                match seg {
                    Seg {
                        mem: Some(Mem::Shm(r)),
                        words,
                        prefix: true,
                        ..
                    } => SegTable::create_solo(arena, r, *words, bytes.len() as u64)?,
                    Seg {
                        mem: Some(Mem::Shm(r)),
                        ..
                    } => SegTable::create(
                        arena,
                        1,
                        &mut std::iter::once(Ok((*r, bytes.len() as u64))),
                    )?,
                    _ => return Err(out_of_step()),
                }
            } else {
                // As many live segments as the builder reports, checked before the table exists:
                // a table owns (and on drop frees) what it lists, and the builder still owns
                // these until the table is published.
                if list.segs.iter().filter(|s| s.live()).count() != out.len() {
                    return Err(out_of_step());
                }
                let mut live = list.segs.iter().filter(|s| s.live());
                let mut entries = out.iter().map(|bytes| match live.next() {
                    Some(Seg {
                        mem: Some(Mem::Shm(r)),
                        ptr,
                        prefix,
                        ..
                    }) if std::ptr::eq(ptr.as_ptr(), bytes.as_ptr()) => {
                        let flag = if *prefix { ENTRY_PREFIXED } else { 0 };
                        let r = BlockRef {
                            offset: r.offset | flag,
                            ..*r
                        };
                        Ok((r, bytes.len() as u64))
                    }
                    _ => Err(out_of_step()),
                });
                SegTable::create(arena, out.len(), &mut entries)?
            };
            list.published = true;
            drop(list);
            self.table = Some(table);
        }
        let table = self.table.as_ref().expect("table set above");
        Ok(table.lend())
    }

    /// The used bytes of each segment, in order (e.g. to copy them into a socket). Makes sure
    /// there is a root pointer first, as sending does.
    pub fn output_segments(&mut self) -> capnp::OutputSegments<'_> {
        if self.builder.get_segments_for_output().is_empty() {
            let _ = self.builder.get_root::<capnp::any_pointer::Builder<'_>>();
        }
        self.builder.get_segments_for_output()
    }

    /// The message's references as shared heap buffers (frozen while any is held), with the
    /// number of used bytes of each, in segment order.
    pub fn share_heap(&mut self) -> Result<Vec<(Arc<HeapSeg>, usize)>> {
        if self.shared.arena.is_some() {
            return Err(Error::BadConfig("an arena-backed message is sent in place"));
        }
        if self.shared.lock().segs.is_empty() {
            let _ = self.builder.get_root::<capnp::any_pointer::Builder<'_>>();
        }
        let out = self.builder.get_segments_for_output();
        let list = self.shared.lock();
        let mut live = list.segs.iter().filter(|s| s.live());
        let mut parts = Vec::with_capacity(out.len());
        for bytes in out.iter() {
            match live.next() {
                Some(Seg {
                    mem: Some(Mem::Heap(a)),
                    ptr,
                    ..
                }) if std::ptr::eq(ptr.as_ptr(), bytes.as_ptr()) => {
                    parts.push((a.clone(), bytes.len()))
                }
                _ => return Err(Error::Corrupt("segment list out of step with the builder")),
            }
        }
        if live.next().is_some() {
            return Err(Error::Corrupt("segment list out of step with the builder"));
        }
        Ok(parts)
    }

    /// Total words in use (what a copy would transfer).
    pub fn size_in_words(&self) -> usize {
        self.builder.size_in_words()
    }

    /// Words the segments were given (used or not).
    pub fn reserved_words(&self) -> u64 {
        self.shared
            .lock()
            .segs
            .iter()
            .filter(|s| s.live())
            .map(|s| s.words as u64)
            .sum()
    }

    /// Current references to the shared table (1 = only this message), if frozen.
    pub fn table_refs(&self) -> Option<u64> {
        self.table.as_ref().map(SegTable::ref_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::ArenaConfig;
    use capnp::message::Reader;

    fn arena() -> Arena {
        Arena::create(ArenaConfig::new().pool_size(64 << 20)).unwrap()
    }

    fn fill(msg: &mut OutMsg, n: u32, byte: u8) {
        let b = msg.builder_mut();
        let mut list = b.initn_root::<capnp::data_list::Builder<'_>>(1);
        list.set(0, &vec![byte; n as usize]);
    }

    fn read_first(segs: ShmSegments) -> Vec<u8> {
        let r = Reader::new(segs, Default::default());
        let list = r.get_root::<capnp::data_list::Reader<'_>>().unwrap();
        list.get(0).unwrap().to_vec()
    }

    #[test]
    fn shared_in_place_then_freed_by_the_last_holder() {
        let arena = arena();
        let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        fill(&mut msg, 100_000, 7);
        let blob = msg.share_shm().unwrap();
        assert_eq!(msg.table_refs(), Some(2));
        let segs = arena.borrow_segments(&blob).unwrap();
        let seg0 = segs.get_segment(0).unwrap().as_ptr();
        assert!(msg
            .builder()
            .get_segments_for_output()
            .iter()
            .any(|s| s.as_ptr() == seg0));
        assert_eq!(read_first(segs), vec![7; 100_000]);
        assert_eq!(msg.table_refs(), Some(1));
        let in_use = arena.stats().blocks_in_use;
        drop(msg);
        assert_eq!(arena.stats().blocks_in_use, 0, "had {in_use}");
        // Replaying the blob now fails: stale.
        assert!(matches!(arena.borrow_segments(&blob), Err(Error::Stale)));
    }

    #[test]
    fn a_corrupt_entry_is_an_error_on_receipt_for_the_root_and_on_access_for_others() {
        let arena = arena();
        let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        fill(&mut msg, 100_000, 7); // the root in segment 0, the data in segment 1
        let blob = msg.share_shm().unwrap();
        let pool = arena.pool(blob.pool()).unwrap();
        let entry = |i: u64| pool.word(blob.offset() + T_ENTRIES + i * T_ENTRY);
        // Segment 1 names a generation it never had: receipt works, reading it fails cleanly.
        let good = entry(1).load(Ordering::Relaxed);
        entry(1).store(good ^ (1 << 40), Ordering::Relaxed);
        let segs = arena.borrow_segments(&blob).unwrap();
        assert!(segs.get_segment(1).is_none());
        let r = Reader::new(segs, Default::default());
        let list = r.get_root::<capnp::data_list::Reader<'_>>().unwrap();
        assert!(list.get(0).is_err());
        drop(r);
        entry(1).store(good, Ordering::Relaxed);
        // Segment 0 corrupt: refused on receipt with the specific error, reference given back.
        let good0 = entry(0).load(Ordering::Relaxed);
        entry(0).store(good0 ^ (1 << 40), Ordering::Relaxed);
        let blob2 = msg.share_shm().unwrap();
        assert!(matches!(arena.borrow_segments(&blob2), Err(Error::Stale)));
        entry(0).store(good0, Ordering::Relaxed);
        assert_eq!(msg.table_refs(), Some(1));
        drop(msg);
        assert_eq!(arena.stats().blocks_in_use, 0);
    }

    #[test]
    fn receiver_outlives_sender() {
        let arena = arena();
        let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        fill(&mut msg, 5000, 3);
        let blob = msg.share_shm().unwrap();
        drop(msg);
        assert!(arena.stats().blocks_in_use > 0);
        let segs = arena.borrow_segments(&blob).unwrap();
        assert_eq!(read_first(segs), vec![3; 5000]);
        assert_eq!(arena.stats().blocks_in_use, 0);
    }

    #[test]
    fn write_while_shared_copies_and_unshared_reuses() {
        let arena = arena();
        let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        fill(&mut msg, 1000, 1);
        let blob = msg.share_shm().unwrap();
        let held = arena.borrow_segments(&blob).unwrap();
        let p_before = held.get_segment(0).unwrap().as_ptr();
        // Re-send unchanged: one more reference, same table.
        let blob2 = msg.share_shm().unwrap();
        assert_eq!(msg.table_refs(), Some(3));
        arena.release_blob(&blob2).unwrap();
        // Write while `held` reads: copy-on-write.
        fill(&mut msg, 1000, 2);
        assert_eq!(msg.table_refs(), None);
        assert_ne!(
            msg.builder().get_segments_for_output()[0].as_ptr(),
            p_before
        );
        assert_eq!(read_first(held), vec![1; 1000]);
        // Now nobody else holds the new one: share, release, write in place.
        let blob3 = msg.share_shm().unwrap();
        arena.release_blob(&blob3).unwrap();
        let p = msg.builder().get_segments_for_output()[0].as_ptr();
        fill(&mut msg, 1000, 4);
        assert_eq!(msg.builder().get_segments_for_output()[0].as_ptr(), p);
        drop(msg);
        assert_eq!(arena.stats().blocks_in_use, 0);
        arena.verify().unwrap();
    }

    #[test]
    fn growth_is_capped_and_big_objects_get_exact_segments() {
        let arena = Arena::create(ArenaConfig::new()).unwrap();
        let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        {
            let b = msg.builder_mut();
            let root = b.initn_root::<capnp::data_list::Builder<'_>>(3);
            let _ = root;
        }
        let big = 200 << 20;
        {
            let b = msg.builder_mut();
            let mut list = b.get_root::<capnp::data_list::Builder<'_>>().unwrap();
            list.set(0, &vec![9u8; big]);
        }
        let reserved = msg.reserved_words() * 8;
        assert!(reserved < big as u64 + (8 << 20), "reserved {reserved}");
        drop(msg);
        assert_eq!(arena.stats().blocks_in_use, 0);
    }

    #[test]
    fn exhausted_arena_falls_back_to_heap_and_refuses_to_share() {
        let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20).max_pools(1)).unwrap();
        let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        fill(&mut msg, 4 << 20, 5);
        assert!(matches!(
            msg.alloc_failure(),
            Some(Error::OutOfMemory { .. } | Error::TooLarge { .. })
        ));
        assert!(matches!(
            msg.share_shm(),
            Err(Error::OutOfMemory { .. } | Error::TooLarge { .. })
        ));
        // The message is intact and readable.
        let r = msg
            .builder()
            .get_root_as_reader::<capnp::data_list::Reader<'_>>()
            .unwrap();
        assert_eq!(r.get(0).unwrap().len(), 4 << 20);
        drop(msg);
        assert_eq!(arena.stats().blocks_in_use, 0);
    }

    #[test]
    fn heap_mode_freezes_while_parts_are_held() {
        let mut msg = OutMsg::new(None, SegmentSizes::default());
        fill(&mut msg, 100, 1);
        let parts = msg.share_heap().unwrap();
        assert!(msg.is_frozen_by_others());
        let held = parts[0].0.clone();
        drop(parts);
        fill(&mut msg, 100, 2);
        // The held buffer still has the old bytes.
        let old: &[u8] = (*held).as_ref();
        assert!(old.windows(100).any(|w| w == [1u8; 100]));
        assert!(!old.windows(100).any(|w| w == [2u8; 100]));
        drop(held);
        assert!(!msg.is_frozen_by_others());
    }

    #[test]
    fn heap_segments_are_recycled_clean() {
        let words = 1024;
        let fresh = || HeapSeg::zeroed(words);
        let seg = fresh();
        let first = seg.ptr;
        // SAFETY: the test owns the buffer alone; it writes within its `words` words.
        unsafe { std::ptr::write_bytes(seg.ptr.as_ptr().cast::<u8>(), 0xAB, 100) };
        seg.written(100);
        drop(seg);
        let seg = fresh();
        assert_eq!(seg.ptr, first, "the spare came back");
        assert!(seg.as_ref().iter().all(|&b| b == 0));
        // A buffer whose writer never reported (say, a leaked builder) is cleared whole.
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(seg.ptr.as_ptr().cast::<u8>(), 0xCD, words * 8) };
        drop(seg);
        let seg = fresh();
        assert_eq!(seg.ptr, first);
        assert!(seg.as_ref().iter().all(|&b| b == 0));
        // Only so many are kept; big ones are not.
        let many: Vec<_> = (0..SPARE_COUNT + 2).map(|_| fresh()).collect();
        drop(many);
        assert_eq!(SPARES.with(|s| s.borrow().0.len()), SPARE_COUNT);
        drop(HeapSeg::zeroed(SPARE_MAX_WORDS + 1));
        assert_eq!(SPARES.with(|s| s.borrow().0.len()), SPARE_COUNT);
        drop(seg);
    }

    fn retagged(blob: &LendBlob, tag: u64) -> LendBlob {
        let mut b = *blob.as_bytes();
        b[24..32].copy_from_slice(&tag.to_le_bytes());
        LendBlob::from_bytes(&b).unwrap()
    }

    #[test]
    fn a_one_segment_message_is_its_own_handle() {
        let arena = arena();
        let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        fill(&mut msg, 100, 7);
        let blob = msg.share_shm().unwrap();
        assert_eq!(blob.type_tag(), SOLO_TAG);
        assert_eq!(arena.stats().blocks_in_use, 1, "no table block");
        let seg0 = msg.builder().get_segments_for_output()[0].as_ptr();
        assert_eq!(seg0 as usize % 16, 0);
        let segs = arena.borrow_segments(&blob).unwrap();
        assert_eq!(segs.get_segment(0).unwrap().as_ptr(), seg0);
        assert_eq!(segs.len(), 1);
        assert!(segs.get_segment(1).is_none());
        assert_eq!(read_first(segs), vec![7; 100]);
        assert_eq!(msg.table_refs(), Some(1));
        // Thawed in place (nobody else holds it), then published again: the first blob is
        // stale, the new one reads the new bytes.
        fill(&mut msg, 100, 8);
        assert_eq!(msg.table_refs(), None);
        assert_eq!(msg.builder().get_segments_for_output()[0].as_ptr(), seg0);
        let blob2 = msg.share_shm().unwrap();
        assert_ne!(blob2.generation(), blob.generation());
        assert!(matches!(arena.borrow_segments(&blob), Err(Error::Stale)));
        let segs = arena.borrow_segments(&blob2).unwrap();
        drop(msg);
        assert_eq!(arena.stats().blocks_in_use, 1, "the receiver holds it");
        assert_eq!(read_first(segs), vec![8; 100]);
        assert_eq!(arena.stats().blocks_in_use, 0);
        arena.verify().unwrap();
        // Freed clean (the prefix and what capnp wrote were cleared): the next zeroed
        // allocation of the block clears nothing.
        let (pool, g) = arena.grant(8192, 0).unwrap();
        assert_eq!(g.off + BLOCK_HDR + PREFIX, seg0 as u64 - pool.ptr(0) as u64);
        assert!(g.clean());
        pool.free_block(g.off, true).unwrap();
    }

    #[test]
    fn a_dissolved_one_segment_handle_leaves_no_prefix_behind() {
        let arena = arena();
        let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        fill(&mut msg, 100, 7);
        let blob = msg.share_shm().unwrap();
        arena.release_blob(&blob).unwrap();
        // Grows into a second segment: now sent with a table.
        fill(&mut msg, 20_000, 9);
        let blob = msg.share_shm().unwrap();
        assert_eq!(blob.type_tag(), TABLE_TAG);
        let segs = arena.borrow_segments(&blob).unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(read_first(segs), vec![9; 20_000]);
        let seg0 = msg.builder().get_segments_for_output()[0].as_ptr();
        drop(msg);
        assert_eq!(arena.stats().blocks_in_use, 0);
        let (pool, g) = arena.grant(8192, 0).unwrap();
        assert_eq!(g.off + BLOCK_HDR + PREFIX, seg0 as u64 - pool.ptr(0) as u64);
        assert!(g.clean());
        let all_zero = (0..g.capacity / 8)
            .all(|i| pool.word(g.off + BLOCK_HDR + i * 8).load(Ordering::Relaxed) == 0);
        assert!(all_zero, "the block really is clean");
        pool.free_block(g.off, true).unwrap();
    }

    #[test]
    fn forged_one_segment_handles_are_refused_with_the_specific_error() {
        let arena = arena();
        // A blob of an object retagged as a message: not one (its tag says so); the lent
        // reference stays lent, as for any borrow of the wrong type.
        let h = arena.construct([3u64; 8]).unwrap();
        let e = arena
            .borrow_segments(&retagged(&h.lend(), SOLO_TAG))
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::TypeMismatch {
                    expected: SOLO_TAG,
                    found
                } if found == crate::shm::type_tag::<[u64; 8]>()
            ),
            "{e:?}"
        );
        assert_eq!(h.ref_count(), 2);
        // A table retagged as one segment, and a one-segment message retagged as a table.
        let mut big = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        fill(&mut big, 20_000, 1);
        let big_blob = big.share_shm().unwrap();
        let e = arena
            .borrow_segments(&retagged(&big_blob, SOLO_TAG))
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::TypeMismatch {
                    expected: SOLO_TAG,
                    ..
                }
            ),
            "{e:?}"
        );
        let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
        fill(&mut msg, 100, 7);
        let blob = msg.share_shm().unwrap();
        let e = arena
            .borrow_segments(&retagged(&blob, TABLE_TAG))
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::TypeMismatch {
                    expected: TABLE_TAG,
                    ..
                }
            ),
            "{e:?}"
        );
        // A prefix whose used length overruns the block (a peer scribbled on it): refused, and
        // the reference taken for the check given back.
        let pool = arena.pool(blob.pool()).unwrap();
        let (_, cap) = pool.block_at(blob.offset() - BLOCK_HDR).unwrap();
        let used_at = blob.offset() + 8;
        let good = pool.word(used_at).load(Ordering::Relaxed);
        for bad in [cap - PREFIX + 8, good + 4, u64::MAX] {
            pool.word(used_at).store(bad, Ordering::Relaxed);
            let e = arena
                .borrow_segments(&msg.share_shm().unwrap())
                .unwrap_err();
            assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
        }
        pool.word(used_at).store(good, Ordering::Relaxed);
        assert_eq!(
            msg.table_refs(),
            Some(2),
            "the sender and the first, unborrowed blob"
        );
        assert_eq!(
            read_first(arena.borrow_segments(&blob).unwrap()),
            vec![7; 100]
        );
        assert_eq!(msg.table_refs(), Some(1));
        drop((msg, h));
        arena.release_blob(&big_blob).unwrap();
        drop(big);
        // The lent reference of the object keeps it alive (as with any mistyped borrow).
        assert_eq!(arena.stats().blocks_in_use, 1);
        arena.verify().unwrap();
    }
}
