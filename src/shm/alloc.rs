//! The lock-free allocator inside one pool.
//!
//! * **Small requests** (block ≤ 64 KiB + 16) go to one of [`NUM_CLASSES`] size classes. A thread
//!   first uses its own cache of free blocks of the class (see `tcache`: no read-modify-write,
//!   no shared cache line), then the class's shared tagged free list. When that is empty, a
//!   *span* of pages is taken from the page allocator, carved into blocks, and all but one are
//!   pushed with a single CAS.
//! * **Large requests** get an extent of exactly `ceil((size + 16) / 4096)` pages of fresh space,
//!   or a free extent at most [`slack`] longer (an eighth, and at least 16 pages: a 256 MiB + 8
//!   request takes at most 288 MiB of a freed extent, and exactly 256 MiB + 4 KiB of fresh space,
//!   never 512 MiB). Freed extents go to one of [`NUM_BUCKETS`] free lists (sixteen per doubling);
//!   a request looks at a few extents of each bucket its acceptable range covers.
//! * Extents are never split and never coalesced. Splitting without coalescing is what makes an
//!   allocator fragment without bound (tails too short for the next request pile up: measured,
//!   2 GiB carved for 47 MiB live after 20,000 random 1–2 MiB requests); without it, the space
//!   carved for large blocks stays near the peak in use for each size range. The price: a freed
//!   extent serves only requests of about its size (and never small blocks), so a workload
//!   whose large sizes drift over time carves new space (or adds a pool). Lock-free coalescing
//!   would need a lock-free ordered structure; the simple policy is predictable and crash-safe.
//! * **Zeroing.** Fresh memfd pages are zero. A block carries a CLEAN flag meaning "payload all
//!   zero": it is set on fresh space, on a free that zeroed what it wrote
//!   ([`Block::release_zeroed_prefix`](super::Block::release_zeroed_prefix): capnp knows how many
//!   words it wrote), and on a trimmed extent. A zeroed allocation clears the payload only when
//!   the block is not clean.
//! * **Statistics** are kept per thread-cache slot (one plain counter per operation) plus the
//!   pool's base counters, and summed on demand; see `tcache`.

use super::error::Error;
use super::layout::*;
use super::lockfree::{pop, push, push_chain, Words, LINK};
use super::pool::{Pool, Slot};
use super::protocols::{block_start, carve_span, NotStart};
use crate::sync::Ordering;

/// Extents of each bucket examined for a fit before the next bucket (or fresh space).
const BUCKET_TRIES: usize = 8;

/// How many pages longer than `n` a reused free extent may be: an eighth, at least 16.
#[inline]
pub(crate) fn slack(n: u64) -> u64 {
    (n / 8).max(16)
}

/// Where a block came from, as the allocator hands it out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grant {
    /// Block offset (its header); the payload is at `off + BLOCK_HDR`.
    pub(crate) off: u64,
    /// Usable payload bytes (the class or extent size less the header).
    pub(crate) capacity: u64,
    /// The block's info word as it was while free (one word, so that a `Grant` is copied with
    /// whole-word moves: a bool and a u32 side by side cost a store-forwarding stall here).
    pub(crate) was: u64,
}

impl Grant {
    /// Payload known to be all zeros.
    #[inline]
    pub(crate) fn clean(&self) -> bool {
        self.was & FLAG_CLEAN != 0
    }

    /// Generation of this life of the block.
    #[inline]
    pub(crate) fn generation(&self) -> u32 {
        info_generation(self.was)
    }
}

/// Why a pool could not serve a request: it is full, or its shared metadata failed a check. Kept
/// small (the public [`Error`] is made at the arena level) so that results pass in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fail {
    /// No room in this pool.
    Full,
    /// A peer scribbled over allocator metadata (the text says which check failed).
    Corrupt(&'static str),
}

impl From<Fail> for Error {
    fn from(f: Fail) -> Error {
        match f {
            Fail::Full => Error::OutOfMemory { requested: 0 },
            Fail::Corrupt(why) => Error::Corrupt(why),
        }
    }
}

type Res<T> = std::result::Result<T, Fail>;

impl Pool {
    /// Allocates a block with `size` payload bytes.
    /// `flags` (e.g. [`FLAG_HANDLE`]) are recorded in the block's info word.
    #[inline(always)]
    pub(crate) fn alloc_block(&self, size: usize, flags: u64) -> Res<Grant> {
        match class_for(size) {
            Some(c) => self.alloc_small(c, flags),
            None => self.alloc_large(size, flags),
        }
    }

    #[inline(always)]
    fn alloc_small(&self, c: usize, flags: u64) -> Res<Grant> {
        let size = CLASS_SIZES[c] as u64;
        // Fast path: this thread's private list, and its own counters (see `tcache`).
        let mut cached = None;
        let counted = self
            .with_slot(|slot, counts| {
                super::tcache::bump(&slot.classes[c].in_use, 1);
                if counts[c] > 0 {
                    let head = &slot.classes[c].head;
                    let off = head.load(Ordering::Relaxed);
                    head.store(
                        self.word(off.wrapping_add(LINK)).load(Ordering::Relaxed),
                        Ordering::Relaxed,
                    );
                    counts[c] -= 1;
                    cached = Some(off);
                }
            })
            .is_some();
        if !counted {
            self.count_small(c, 1);
        }
        let off = match cached {
            Some(off) => off,
            None => match pop(self, &self.hdr().classes[c].0.head) {
                Some(off) => off,
                None => match self.refill(c) {
                    Ok(off) => off,
                    Err(f) => {
                        self.count_small(c, -1);
                        return Err(f);
                    }
                },
            },
        };
        // A block from a list must be a free block of this class: anything else means a list
        // was scribbled on (or, astronomically rarely, an ABA tag wrapped). A fresh span's first
        // block is one too.
        if !self.is_cached_block(off, c) {
            self.count_small(c, -1);
            return Err(Fail::Corrupt(
                "free list holds something not a free block of its class",
            ));
        }
        Ok(self.take(off, c as u64, size, flags))
    }

    /// Marks a block we own as allocated and describes it.
    #[inline(always)]
    fn take(&self, off: u64, class: u64, block: u64, flags: u64) -> Grant {
        let info = self.word(off);
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

    #[inline]
    pub(crate) fn is_heap_block(&self, off: u64) -> bool {
        off >= self.heap_off() && off % 16 == 0 && off <= self.capacity() - BLOCK_HDR
    }

    /// Takes a span for class `c`: returns its first block (ours) and frees the others.
    #[inline(never)]
    fn refill(&self, c: usize) -> Res<u64> {
        let pages = span_pages(c);
        let (span, _, clean) = self.alloc_pages(pages, 0)?;
        let first_page = (span - self.heap_off()) / PAGE;
        let size = CLASS_SIZES[c] as u64;
        // Headers written, then the page map published (see `carve_span`).
        let n = carve_span(self, span, first_page, c, clean);
        if n > 1 {
            let head = &self.hdr().classes[c].0.head;
            push_chain(self, head, span + size, span + (n - 1) * size);
        }
        Ok(span)
    }

    /// Takes `n` contiguous pages of fresh space, or a free extent of `n..=n + slack` pages
    /// (`slack` 0 for spans, which need exactly `n`). Returns the offset, the pages taken and
    /// whether they are known to be zero.
    fn alloc_pages(&self, n: u64, slack: u64) -> Res<(u64, u64, bool)> {
        let h = self.hdr();
        let hi = n + slack;
        for b in bucket_of(n)..=bucket_of(hi).min(NUM_BUCKETS - 1) {
            if h.buckets[b].load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut misfits = [0u64; BUCKET_TRIES];
            let mut tried = 0;
            let mut found = Ok(None);
            while tried < BUCKET_TRIES {
                let Some(off) = pop(self, &h.buckets[b]) else {
                    break;
                };
                match self.extent_pages(off) {
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
                push(self, &h.buckets[b], off);
            }
            if let Some((off, pages)) = found? {
                let clean = self.word(off).load(Ordering::Relaxed) & FLAG_CLEAN != 0;
                return Ok((off, pages, clean));
            }
        }
        let bump = &h.bump.0;
        let mut cur = bump.load(Ordering::Relaxed);
        loop {
            if cur < self.heap_off() || cur % PAGE != 0 {
                return Err(Fail::Corrupt("bump pointer outside the heap"));
            }
            let end = match cur.checked_add(n * PAGE) {
                Some(end) if end <= self.capacity() => end,
                _ => return Err(Fail::Full),
            };
            match bump.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                // Fresh memfd pages read as zero, and nobody has touched these yet.
                Ok(_) => return Ok((cur, n, true)),
                Err(now) => cur = now,
            }
        }
    }

    /// Length in pages of the extent at `off`, from the page map, validated (the entry is
    /// peer-writable and must not send us outside the heap).
    fn extent_len(&self, off: u64) -> Res<u64> {
        if !self.is_heap_block(off) || (off - self.heap_off()) % PAGE != 0 {
            return Err(Fail::Corrupt("extent at a bad offset"));
        }
        let page = (off - self.heap_off()) / PAGE;
        let e = self.page_entry(page).load(Ordering::Acquire);
        let pages = pm_value(e);
        if pm_kind(e) != PM_LARGE || pages == 0 || pages > self.heap_pages() - page {
            return Err(Fail::Corrupt("extent page-map entry is bad"));
        }
        Ok(pages)
    }

    /// Length in pages of the free extent at `off` (validated: a popped offset is untrusted).
    fn extent_pages(&self, off: u64) -> Res<u64> {
        let pages = self.extent_len(off)?;
        let i = self.word(off).load(Ordering::Relaxed);
        if info_state(i) != STATE_FREE || info_class(i) != CLASS_LARGE {
            return Err(Fail::Corrupt(
                "extent list holds something not a free extent",
            ));
        }
        Ok(pages)
    }

    #[inline(never)]
    fn alloc_large(&self, size: usize, flags: u64) -> Res<Grant> {
        let max = self.capacity() - self.heap_off();
        let pages = match large_pages(size) {
            Some(p) if p <= max / PAGE => p,
            _ => return Err(Fail::Full),
        };
        let (off, got, clean) = self.alloc_pages(pages, slack(pages))?;
        if clean {
            // Fresh space or a clean extent: make sure the header says so.
            let w = self.word(off);
            w.store(w.load(Ordering::Relaxed) | FLAG_CLEAN, Ordering::Relaxed);
        }
        self.count_large((got * PAGE) as i64, 1);
        self.page_entry((off - self.heap_off()) / PAGE)
            .store(pm_large(got), Ordering::Release);
        Ok(self.take(off, CLASS_LARGE, got * PAGE, flags))
    }

    /// Frees the block at `off`, which the caller owns. `zeroed` says the payload is all zeros
    /// (the caller cleared what it wrote).
    #[inline]
    pub(crate) fn free_block(&self, off: u64, zeroed: bool) -> Res<()> {
        if !self.is_heap_block(off) {
            return Err(Fail::Corrupt("freeing an offset outside the heap"));
        }
        let info_w = self.word(off);
        let old = info_w.load(Ordering::Relaxed);
        let class = info_class(old);
        if info_state(old) != STATE_ALLOC || (class as usize >= NUM_CLASSES && class != CLASS_LARGE)
        {
            return Err(Fail::Corrupt("freeing a block that is not allocated"));
        }
        let new = info(
            STATE_FREE,
            class,
            if zeroed { FLAG_CLEAN } else { 0 },
            info_generation(old).wrapping_add(1),
        );
        if class == CLASS_LARGE {
            return self.free_extent(off, old, new, zeroed);
        }
        // The caller owns the block: a plain store marks it free and moves the generation on,
        // so from here every lent blob of this life of the block is stale. (A double free is a
        // bug of an unsafe caller; the state check above catches the sequential kind.)
        info_w.store(new, Ordering::Relaxed);
        let c = class as usize;
        let mut cached = false;
        let counted = self
            .with_slot(|slot, counts| {
                super::tcache::bump(&slot.classes[c].in_use, -1);
                if counts[c] < super::tcache::cache_cap(c) {
                    let head = &slot.classes[c].head;
                    self.word(off + LINK)
                        .store(head.load(Ordering::Relaxed), Ordering::Relaxed);
                    head.store(off, Ordering::Relaxed);
                    counts[c] += 1;
                    cached = true;
                }
            })
            .is_some();
        if !counted {
            self.count_small(c, -1);
        }
        if !cached {
            push(self, &self.hdr().classes[c].0.head, off);
        }
        Ok(())
    }

    #[cold]
    fn free_extent(&self, off: u64, old: u64, new: u64, zeroed: bool) -> Res<()> {
        let pages = self.extent_len(off)?;
        // The CAS makes a concurrent double free an error rather than a corrupt list.
        let info_w = self.word(off);
        info_w
            .compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed)
            .map_err(|_| Fail::Corrupt("block freed twice"))?;
        if !zeroed && self.trims() && pages > 1 && self.trim_extent(off, pages) {
            // Still ours (not yet pushed): record that it is clean now.
            info_w.store(new | FLAG_CLEAN, Ordering::Relaxed);
        }
        push(self, &self.hdr().buckets[bucket_of(pages)], off);
        self.count_large(-((pages * PAGE) as i64), -1);
        Ok(())
    }

    /// Gives the pages of a freed extent back to the kernel, keeping the header page mapped, and
    /// zeroes the rest of the header page: afterwards the whole payload reads as zeros.
    fn trim_extent(&self, off: u64, pages: u64) -> bool {
        if crate::sys::punch_hole(self.file(), off + PAGE, (pages - 1) * PAGE).is_err() {
            return false;
        }
        self.zero(off + BLOCK_HDR, PAGE - BLOCK_HDR);
        true
    }

    /// Zeroes `len` payload bytes at `off`. Callers own those bytes.
    pub(crate) fn zero(&self, off: u64, len: u64) {
        debug_assert!(off >= self.heap_off() && off + len <= self.capacity());
        // SAFETY: callers pass a range inside the payload of a block they own (allocated to them
        // and not yet shared, or being freed by its last owner), which lies within the mapping;
        // no other thread or process accesses those bytes while it is owned.
        unsafe { std::ptr::write_bytes(self.ptr(off), 0, len as usize) }
    }

    /// Validates that `off` is the start of a block and returns its info word's value and its
    /// payload capacity. Reads only the page map and block headers (atomics), never user bytes,
    /// and does only overflow-free arithmetic on them, whatever they hold.
    ///
    /// A small-class block start, once validated, is remembered (`known_starts`): it stays one,
    /// of the same class, for the pool's life (spans are never freed, see `lockfree`), so the
    /// next validation of it (the same blocks come back, message after message) reads its header
    /// alone, not the page map too.
    pub(crate) fn block_at(&self, off: u64) -> Result<(u64, u64), Error> {
        block_start(
            self,
            &self.known_starts,
            self.heap_off(),
            self.capacity(),
            off,
        )
        .map_err(|e| match e {
            NotStart::OutOfBounds => Error::OutOfBounds {
                pool: self.id(),
                offset: off,
            },
            NotStart::Misaligned => Error::Misaligned(off),
            NotStart::NotABlock => Error::NotABlock(off),
        })
    }

    /// Bytes and blocks in use in this pool: the base counters plus every slot's. A block
    /// allocated through one slot and freed through another makes the first count up and the
    /// second down, so a reader racing them can see a total that is transiently too low (or
    /// negative: clamped to 0). Exact when the pool is quiescent.
    pub(crate) fn usage(&self) -> (u64, u64) {
        // Wrapping, then read as signed: the counters are peer-writable, and one slot's may be
        // "negative".
        let h = self.hdr();
        let mut bytes = h.base.0.bytes.load(Ordering::Relaxed);
        let mut blocks = h.base.0.blocks.load(Ordering::Relaxed);
        for slot in &h.slots {
            let (b, n) = slot_usage(&slot.0);
            bytes = bytes.wrapping_add(b);
            blocks = blocks.wrapping_add(n);
        }
        ((bytes as i64).max(0) as u64, (blocks as i64).max(0) as u64)
    }

    /// Bytes of heap handed out by the bump pointer so far (spans and extents, used or free).
    pub(crate) fn reserved(&self) -> u64 {
        let bump = self.hdr().bump.0.load(Ordering::Relaxed);
        bump.clamp(self.heap_off(), self.capacity()) - self.heap_off()
    }
}

/// Bytes and blocks a slot's counters say are in use (wrapping).
pub(crate) fn slot_usage(slot: &Slot) -> (u64, u64) {
    let mut bytes = slot.large.bytes.load(Ordering::Relaxed);
    let mut blocks = slot.large.blocks.load(Ordering::Relaxed);
    for (c, k) in slot.classes.iter().enumerate() {
        let n = k.in_use.load(Ordering::Relaxed);
        bytes = bytes.wrapping_add(n.wrapping_mul(CLASS_SIZES[c] as u64));
        blocks = blocks.wrapping_add(n);
    }
    (bytes, blocks)
}

#[cfg(all(test, not(flowipc_loom)))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};

    use super::super::{Arena, ArenaConfig};

    /// Spins until `cond` holds, yielding the vCPU after a while (the peer may need it).
    fn wait_for(cond: impl Fn() -> bool) {
        let mut spins = 0u32;
        while !cond() {
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// A double free is a bug of an unsafe caller, but two processes racing to free one extent
    /// must not list it twice (two later owners of one block): the free's CAS on the info word
    /// lets exactly one of them through. Two threads free each extent at the same moment: one
    /// allocates it and opens the round, the other spins on the round counter, so they start
    /// within ~100 ns of each other, the width of the window between a free's read of the
    /// header and its write.
    #[test]
    fn racing_double_frees_of_an_extent_free_it_exactly_once() {
        const ROUNDS: u64 = 200_000;
        let arena = Arena::create(
            ArenaConfig::new()
                .pool_size(64 << 20)
                .trim_freed_extents(false),
        )
        .unwrap();
        let pool = arena.pool(0).unwrap();
        let [target, round, done, freed] = [0; 4].map(AtomicU64::new);
        // Set when a round goes wrong, so that neither thread waits for the other forever.
        let stop = AtomicBool::new(false);
        let free = |r: u64| {
            if pool.free_block(target.load(Relaxed), false).is_ok() {
                freed.fetch_add(1, Relaxed);
            }
            done.fetch_add(1, AcqRel);
            wait_for(|| done.load(Acquire) >= 2 * r || stop.load(Relaxed));
        };
        let outcome = std::thread::scope(|s| {
            let follower = s.spawn(|| {
                for r in 1..=ROUNDS {
                    wait_for(|| round.load(Acquire) == r || stop.load(Relaxed));
                    if stop.load(Relaxed) {
                        return;
                    }
                    free(r);
                }
            });
            let mut outcome = Ok(());
            for r in 1..=ROUNDS {
                let g = match arena.grant(100_000, 0) {
                    Ok((p, g)) if p.id() == 0 => g,
                    other => {
                        outcome = Err(format!("round {r}: allocation gave {other:?}"));
                        break;
                    }
                };
                target.store(g.off, Relaxed);
                round.store(r, Release);
                free(r);
                if freed.load(Relaxed) != r {
                    outcome = Err(format!("round {r}: one extent freed twice"));
                    break;
                }
            }
            stop.store(true, Relaxed);
            follower.join().unwrap();
            outcome
        });
        outcome.unwrap();
        assert_eq!(arena.stats().blocks_in_use, 0);
        let v = arena.verify().unwrap();
        assert_eq!(v.free_extents, 1, "{v:?}");
    }
}
