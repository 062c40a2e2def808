//! The protocol the allocator of one pool runs between threads and processes, written over
//! [`Space`] so that the same code runs on a shared mapping in production and on heap memory under
//! loom (`--cfg flowipc_loom`). `alloc` wraps it with the thread caches and the statistics.
//!
//! Every shared word it touches, and what each access synchronizes:
//!
//! * **Bump pointer** ([`Space::bump`]): fresh space is claimed by a `Relaxed` CAS that moves it
//!   from `cur` to `cur + n pages`. The read-modify-write alone makes claims disjoint; no data
//!   travels with it (fresh memfd pages are zero and untouched), so no ordering is needed. Whoever
//!   claims the pages publishes them later by a `Release` (a free-list push or a page-map entry).
//!   A caller may ask for freed space only (`carve` false, see [`alloc_pages`]): the same steps
//!   without this one (the arena asks every pool for freed space before any carves).
//! * **Block headers** (info word at `off`, link word at `off + LINK`): written with `Relaxed`
//!   stores by the block's owner only, always *before* the block is published by a `Release`
//!   push (a span's chain in [`refill`], a freed extent in [`free_extent`]), and read by the next
//!   owner after the `Acquire` pop that took it. The one header write by a non-owner is the
//!   double-free CAS of [`free_extent`]: racing frees of one extent both read `ALLOC`, and the
//!   CAS lets exactly one of them through (`Relaxed`: the winner already owns the extent).
//! * **Free lists** (a class's [`Space::class_head`], an extent bucket's [`Space::bucket`]): the
//!   tagged Treiber stacks of `lockfree` (`Release` push, `Acquire` pop). A bucket is first read
//!   with a `Relaxed` load that only skips empty buckets: a stale value costs a wasted pop or
//!   fresh space, never correctness.
//! * **Page map** ([`Space::page_entry`]): stored with `Release` by whoever carved the span or
//!   claimed the extent (after the headers it vouches for), read with `Acquire` by validations
//!   (`block_at`, [`extent_len`]).
//!
//! The block's payload is written non-atomically by its owner only: by the user while allocated,
//! and by a freeing owner that trims (zeroes) an extent before pushing it. The pushes and pops
//! above order every owner's payload accesses before the next owner's.

use super::layout::*;
use super::lockfree::{pop, push, push_chain, Words, LINK};
use crate::sync::{AtomicU64, Ordering};

/// The shared words of one pool's allocator (see the module docs), and its heap's bounds.
///
/// Implementors guarantee what [`Words`] does for every block header offset in the heap, and
/// that the other words live as long as `self` is borrowed.
pub trait Space: Words {
    /// Offset of the first heap byte (a multiple of [`PAGE`]).
    fn heap_start(&self) -> u64;
    /// Offset just past the heap (the pool's capacity, a multiple of [`PAGE`]).
    fn heap_end(&self) -> u64;
    /// The bump pointer: the offset of the first byte of heap never handed out.
    fn bump(&self) -> &AtomicU64;
    /// The tagged head of the shared free list of size class `c`.
    fn class_head(&self, c: usize) -> &AtomicU64;
    /// The tagged head of the free-extent list `b` (see [`bucket_of`]).
    fn bucket(&self, b: usize) -> &AtomicU64;
    /// The page-map entry of heap page `page` (below the heap's page count).
    fn page_entry(&self, page: u64) -> &AtomicU64;
}

/// Why a pool could not serve a request: it is full, or its shared metadata failed a check. Kept
/// small (the public `Error` is made at the arena level) so that results pass in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fail {
    /// No room in this pool.
    Full,
    /// A peer scribbled over allocator metadata (the text says which check failed).
    Corrupt(&'static str),
}

/// The result of an allocator step.
pub type Res<T> = std::result::Result<T, Fail>;

/// Where a block came from, as the allocator hands it out.
#[derive(Clone, Copy, Debug)]
pub struct Grant {
    /// Block offset (its header); the payload is at `off + BLOCK_HDR`.
    pub off: u64,
    /// Usable payload bytes (the class or extent size less the header).
    pub capacity: u64,
    /// The block's info word as it was while free (one word, so that a `Grant` is copied with
    /// whole-word moves: a bool and a u32 side by side cost a store-forwarding stall here).
    pub was: u64,
}

impl Grant {
    /// Payload known to be all zeros.
    #[inline]
    pub fn clean(&self) -> bool {
        self.was & FLAG_CLEAN != 0
    }

    /// Generation of this life of the block.
    #[inline]
    pub fn generation(&self) -> u32 {
        info_generation(self.was)
    }
}

/// Pages in the heap of `s`.
#[inline]
fn heap_pages<S: Space + ?Sized>(s: &S) -> u64 {
    (s.heap_end() - s.heap_start()) / PAGE
}

/// How many pages longer than `n` a reused free extent may be: an eighth, at least 16.
#[inline]
pub fn slack(n: u64) -> u64 {
    (n / 8).max(16)
}

/// Whether `off` may be a block header in the heap of `s` (16-aligned, header inside the heap).
#[inline]
pub fn is_heap_block<S: Space + ?Sized>(s: &S, off: u64) -> bool {
    off >= s.heap_start() && off % 16 == 0 && off <= s.heap_end() - BLOCK_HDR
}

/// Whether the block at `off`, just taken from a list of class `c`, is a free block of that
/// class (anything else means a list was scribbled on).
#[inline]
pub fn is_free_block<S: Space + ?Sized>(s: &S, off: u64, c: usize) -> bool {
    is_heap_block(s, off) && {
        let i = s.word(off).load(Ordering::Relaxed);
        info_state(i) == STATE_FREE && info_class(i) == c as u64
    }
}

/// Marks a block we own as allocated and describes it.
#[inline(always)]
pub fn take<S: Space + ?Sized>(s: &S, off: u64, class: u64, block: u64, flags: u64) -> Grant {
    let info = s.word(off);
    let old = info.load(Ordering::Relaxed);
    let generation = info_generation(old);
    info.store(
        super::layout::info(STATE_ALLOC, class, flags, generation),
        Ordering::Relaxed,
    );
    Grant {
        off,
        capacity: block - BLOCK_HDR,
        was: old,
    }
}

/// A block of class `c` from the class's shared list, or else from a new span of `pages` pages
/// carved in blocks of `size` bytes (the caller then owns it). With `carve` false the span may
/// only be a freed extent, never fresh space ([`alloc_pages`]).
#[inline(always)]
pub fn pop_or_refill<S: Space + ?Sized>(
    s: &S,
    c: usize,
    pages: u64,
    size: u64,
    carve: bool,
) -> Res<u64> {
    match pop(s, s.class_head(c)) {
        Some(off) => Ok(off),
        None => refill(s, c, pages, size, carve),
    }
}

/// Takes a span of `pages` pages for class `c` (blocks of `size` bytes): returns its first block
/// (ours) and frees the others. `carve`: as for [`alloc_pages`].
#[inline(never)]
pub fn refill<S: Space + ?Sized>(s: &S, c: usize, pages: u64, size: u64, carve: bool) -> Res<u64> {
    let (span, _, clean) = alloc_pages(s, pages, 0, carve)?;
    let first_page = (span - s.heap_start()) / PAGE;
    let n = carve_span(s, span, c, pages, size, clean, |i| {
        s.page_entry(first_page + i)
    });
    if n > 1 {
        push_chain(s, s.class_head(c), span + size, span + (n - 1) * size);
    }
    Ok(span)
}

/// Carves the `pages` pages at `span` into free blocks of class `c` (`size` bytes each): writes
/// their headers and links, then publishes the span's page-map entries (`page_entry(i)` is the
/// entry of the span's page `i`). Returns the number of blocks; the caller owns them all (and
/// pushes all but the first).
///
/// Block 0 sits where the recycled extent's header was (if it was recycled): it continues that
/// position's generations, so a stale blob of the extent cannot match it. Every other block
/// start is a position that was never a block start before (see `lockfree`).
pub fn carve_span<'a, W: Words + ?Sized>(
    mem: &'a W,
    span: u64,
    c: usize,
    pages: u64,
    size: u64,
    clean: bool,
    page_entry: impl Fn(u64) -> &'a AtomicU64,
) -> u64 {
    let n = pages * PAGE / size;
    let flags = if clean { FLAG_CLEAN } else { 0 };
    let gen0 = info_generation(mem.word(span).load(Ordering::Relaxed));
    for i in 0..n {
        let b = span + i * size;
        let generation = if i == 0 { gen0 } else { 0 };
        mem.word(b).store(
            info(STATE_FREE, c as u64, flags, generation),
            Ordering::Relaxed,
        );
        let next = if i + 1 < n { b + size } else { 0 };
        mem.word(b + LINK).store(next, Ordering::Relaxed);
    }
    // Release: a validation that finds these entries (Acquire in `protocols::block_start`)
    // sees the block headers written above.
    for i in 0..pages {
        page_entry(i).store(pm_small(c as u64, i), Ordering::Release);
    }
    n
}

/// Takes a free extent of `n..=n + slack` pages (`slack` 0 for spans, which need exactly `n`),
/// or else, if `carve`, `n` contiguous pages of fresh space (without `carve`, no free extent
/// fits: [`Fail::Full`]). Returns the offset, the pages taken and whether they are known to be
/// zero.
///
/// The arena asks every pool for freed space before it asks any for fresh space (see
/// `Arena::grant_with`): fresh space is carved only when nothing freed fits anywhere.
pub fn alloc_pages<S: Space + ?Sized>(
    s: &S,
    n: u64,
    slack: u64,
    carve: bool,
) -> Res<(u64, u64, bool)> {
    let hi = n + slack;
    for b in bucket_of(n)..=bucket_of(hi).min(NUM_BUCKETS - 1) {
        let bucket = s.bucket(b);
        if bucket.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let mut misfits = [0u64; BUCKET_TRIES];
        let mut tried = 0;
        let mut found = Ok(None);
        while tried < BUCKET_TRIES {
            let Some(off) = pop(s, bucket) else {
                break;
            };
            match extent_pages(s, off) {
                Ok(pages) if (n..=hi).contains(&pages) => {
                    found = Ok(Some((off, pages)));
                    break;
                }
                Ok(_) => {
                    misfits[tried] = off;
                    tried += 1;
                }
                // A bad entry is dropped from the list (it cannot be trusted), the rest kept.
                Err(f) => {
                    found = Err(f);
                    break;
                }
            }
        }
        for &off in &misfits[..tried] {
            push(s, bucket, off);
        }
        if let Some((off, pages)) = found? {
            let clean = s.word(off).load(Ordering::Relaxed) & FLAG_CLEAN != 0;
            return Ok((off, pages, clean));
        }
    }
    if !carve {
        return Err(Fail::Full);
    }
    let bump = s.bump();
    let mut cur = bump.load(Ordering::Relaxed);
    loop {
        if cur < s.heap_start() || cur % PAGE != 0 {
            return Err(Fail::Corrupt("bump pointer outside the heap"));
        }
        let end = match cur.checked_add(n * PAGE) {
            Some(end) if end <= s.heap_end() => end,
            _ => return Err(Fail::Full),
        };
        match bump.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
            // Fresh memfd pages read as zero, and nobody has touched these yet.
            Ok(_) => return Ok((cur, n, true)),
            Err(now) => cur = now,
        }
    }
}

/// Extents of each bucket examined for a fit before the next bucket (or fresh space).
const BUCKET_TRIES: usize = 8;

/// Takes an extent for `pages` pages (a free one at most [`slack`] longer, or else, if `carve`,
/// fresh space) and publishes its length in the page map. Returns its offset and length in pages;
/// the caller owns it and marks it allocated ([`take`]).
#[inline]
pub fn alloc_extent<S: Space + ?Sized>(s: &S, pages: u64, carve: bool) -> Res<(u64, u64)> {
    let (off, got, clean) = alloc_pages(s, pages, slack(pages), carve)?;
    if clean {
        // Fresh space or a clean extent: make sure the header says so.
        let w = s.word(off);
        w.store(w.load(Ordering::Relaxed) | FLAG_CLEAN, Ordering::Relaxed);
    }
    s.page_entry((off - s.heap_start()) / PAGE)
        .store(pm_large(got), Ordering::Release);
    Ok((off, got))
}

/// Length in pages of the extent at `off`, from the page map, validated (the entry is
/// peer-writable and must not send us outside the heap).
pub fn extent_len<S: Space + ?Sized>(s: &S, off: u64) -> Res<u64> {
    if !is_heap_block(s, off) || (off - s.heap_start()) % PAGE != 0 {
        return Err(Fail::Corrupt("extent at a bad offset"));
    }
    let page = (off - s.heap_start()) / PAGE;
    let e = s.page_entry(page).load(Ordering::Acquire);
    let pages = pm_value(e);
    if pm_kind(e) != PM_LARGE || pages == 0 || pages > heap_pages(s) - page {
        return Err(Fail::Corrupt("extent page-map entry is bad"));
    }
    Ok(pages)
}

/// Length in pages of the free extent at `off` (validated: a popped offset is untrusted).
fn extent_pages<S: Space + ?Sized>(s: &S, off: u64) -> Res<u64> {
    let pages = extent_len(s, off)?;
    let i = s.word(off).load(Ordering::Relaxed);
    if info_state(i) != STATE_FREE || info_class(i) != CLASS_LARGE {
        return Err(Fail::Corrupt(
            "extent list holds something not a free extent",
        ));
    }
    Ok(pages)
}

/// The info word of a block freed whose info word was `old`, or an error if `old` is not an
/// allocated block. `zeroed` says the payload is all zeros (the caller cleared what it wrote).
#[inline]
pub fn freed_info(old: u64, zeroed: bool) -> Res<u64> {
    let class = info_class(old);
    if info_state(old) != STATE_ALLOC || (class as usize >= NUM_CLASSES && class != CLASS_LARGE) {
        return Err(Fail::Corrupt("freeing a block that is not allocated"));
    }
    Ok(info(
        STATE_FREE,
        class,
        if zeroed { FLAG_CLEAN } else { 0 },
        info_generation(old).wrapping_add(1),
    ))
}

/// Frees the extent at `off`, whose info word the caller read as `old` (allocated) and wants to
/// be `new` ([`freed_info`]). `trim(pages)` may clear the payload (the extent is the caller's
/// until it is pushed) and says whether it did. Returns the extent's length in pages.
#[inline]
pub fn free_extent<S: Space + ?Sized>(
    s: &S,
    off: u64,
    old: u64,
    new: u64,
    trim: impl FnOnce(u64) -> bool,
) -> Res<u64> {
    let pages = extent_len(s, off)?;
    // The CAS makes a concurrent double free an error rather than a corrupt list.
    let info_w = s.word(off);
    info_w
        .compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed)
        .map_err(|_| Fail::Corrupt("block freed twice"))?;
    if trim(pages) {
        // Still ours (not yet pushed): record that it is clean now.
        info_w.store(new | FLAG_CLEAN, Ordering::Relaxed);
    }
    push(s, s.bucket(bucket_of(pages)), off);
    Ok(pages)
}
