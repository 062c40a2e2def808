//! The allocator side: capnp's [`Allocator`] over arena blocks (or heap buffers), and the list
//! of segments it shares with its message.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use capnp::message::Allocator;

use super::super::arena::{Arena, BlockRef};
use super::super::error::Error;
use super::*;

/// One segment the allocator handed to capnp.
pub(super) enum Mem {
    Shm(BlockRef),
    Heap(Arc<HeapSeg>),
}

pub(super) struct Seg {
    pub(super) ptr: NonNull<u8>,
    pub(super) words: u32,
    /// `None` once capnp handed the segment back and it was freed (or given up to a table).
    pub(super) mem: Option<Mem>,
    /// Set when capnp handed back an arena segment the builder still owns: the bytes to clear
    /// when it is freed, with the others, once the last segment is back (see
    /// [`SegAlloc::deallocate_segment`]).
    pub(super) returned: Option<usize>,
    /// The block's first [`PREFIX`] bytes, before the `words` capnp got, are kept back for a
    /// one-segment message's handle prefix (see [`OutMsg::share_shm`]). Set on a message's
    /// first arena segment.
    pub(super) prefix: bool,
}

impl Seg {
    pub(super) fn live(&self) -> bool {
        self.mem.is_some() && self.returned.is_none()
    }
}

/// A message's segments in allocation order; the first inline (most messages have only it).
#[derive(Default)]
pub(super) struct Segs {
    pub(super) first: Option<Seg>,
    pub(super) more: Vec<Seg>,
}

impl Segs {
    pub(super) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub(super) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    pub(super) fn push(&mut self, seg: Seg) {
        if self.first.is_none() {
            self.first = Some(seg);
        } else {
            self.more.push(seg);
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Seg> {
        self.first.iter().chain(self.more.iter())
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Seg> {
        self.first.iter_mut().chain(self.more.iter_mut())
    }

    /// The segments, last first.
    pub(super) fn iter_mut_rev(&mut self) -> impl Iterator<Item = &mut Seg> {
        self.more.iter_mut().rev().chain(self.first.iter_mut())
    }
}

/// What the allocator and its message keep under their lock.
pub(super) struct SegList {
    pub(super) segs: Segs,
    /// A segment table owns the SHM segments: the builder must not free them.
    pub(super) published: bool,
    /// The arena could not serve a segment; a heap buffer stands in for it.
    pub(super) failed: Option<Error>,
}

// SAFETY: the raw pointers in `segs` point into arena mappings (kept alive by the allocator's
// `Arena`) or into `HeapSeg`s owned through the `Arc`s beside them; the list itself is only
// used under its mutex.
unsafe impl Send for SegList {}

/// What the allocator and its message share (one allocation per message).
pub(super) struct SegShared {
    /// Where segments come from (`None`: the heap).
    pub(super) arena: Option<Arena>,
    /// Some segment is a heap buffer (always in heap mode), or `failed` is set: only then do
    /// [`OutMsg::is_frozen_by_others`] and the failure checks need the lock. Written under the
    /// lock by whoever has the message exclusively (`&mut`), read by holders of `&OutMsg`,
    /// which that exclusive access happened before: `Relaxed` suffices.
    pub(super) heap_or_failed: AtomicBool,
    pub(super) list: Mutex<SegList>,
}

impl SegShared {
    pub(super) fn lock(&self) -> MutexGuard<'_, SegList> {
        crate::sync::lock(&self.list)
    }

    /// Records an allocation failure (the first one stays).
    pub(super) fn fail(&self, list: &mut SegList, e: Error) {
        if list.failed.is_none() {
            list.failed = Some(e);
        }
        self.heap_or_failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a heap segment or a failure may be recorded (see `heap_or_failed`).
    pub(super) fn heap_or_failed(&self) -> bool {
        self.heap_or_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// capnp's allocator over an arena (or the heap). Crate-internal: users see `MsgOut`.
pub struct SegAlloc {
    pub(super) shared: Arc<SegShared>,
    pub(super) next_words: u32,
    pub(super) sizes: SegmentSizes,
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
    pub(super) fn grant(
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
            returned: None,
            prefix,
        });
        (ptr, words)
    }

    /// capnp hands every segment back at once (when the builder is dropped), first to last.
    /// Arena segments the builder still owns are freed when the last one is back, **last
    /// first**: the free lists are stacks, so the next message of the same shape then gets, for
    /// each of its segments, the very block the same segment had, whose touched pages are the
    /// ones it touches again (first to last, a partly used last segment would be handed to a
    /// segment that fills it, faulting in its untouched tail). A table frees its segments in the
    /// same order (`protocols::release_message`).
    unsafe fn deallocate_segment(&mut self, ptr: NonNull<u8>, _word_size: u32, words_used: u32) {
        let mut list = self.shared.lock();
        let published = list.published;
        let Some(seg) = list.segs.iter_mut().find(|s| s.ptr == ptr && s.live()) else {
            return;
        };
        let heap = match &seg.mem {
            // Ours to free, with the others: what capnp wrote after the prefix (if any), which
            // is cleared with it.
            Some(Mem::Shm(_)) if !published => {
                let skip = if seg.prefix { PREFIX as usize } else { 0 };
                seg.returned = Some(skip + words_used as usize * 8);
                None
            }
            // A table owns it now (its last reference frees it), or a heap buffer.
            _ => seg.mem.take(),
        };
        if let Some(Mem::Heap(seg)) = heap {
            // Only what capnp wrote needs clearing when the buffer is recycled.
            seg.written(words_used as usize * 8);
        }
        if list.segs.iter().any(Seg::live) {
            return;
        }
        let Some(arena) = &self.shared.arena else {
            return;
        };
        for seg in list.segs.iter_mut_rev() {
            let (Some(len), Some(Mem::Shm(r))) = (seg.returned, &seg.mem) else {
                continue;
            };
            // SAFETY: the block was allocated for this segment and turned into `r` by
            // `into_raw`; this is its only re-adoption (the segment is marked gone just below).
            if let Ok(block) = unsafe { arena.block_from_raw(*r, 0) } {
                // SAFETY: the block was allocated zeroed (capnp's builder needs that), the
                // segment capnp saw starts after the prefix, and capnp writes only within the
                // `words_used` words it reported when it handed the segment back; `len` is the
                // prefix plus those words, so every byte from `len` on is still zero.
                unsafe { block.release_zeroed_prefix(len) };
            }
            seg.mem = None;
        }
    }
}
