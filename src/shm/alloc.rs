//! The lock-free allocator inside one pool.
//!
//! * **Small requests** (block ≤ 64 KiB + 16) go to one of [`NUM_CLASSES`] size classes. Each
//!   class has a tagged free list. When it is empty, a *span* of pages is taken from the page
//!   allocator, carved into blocks, and all but one are pushed with a single CAS.
//! * **Large requests** get an extent of exactly `ceil((size + 16) / 4096)` pages. Freed extents go
//!   to one of [`NUM_BUCKETS`] free lists (four per doubling of the page count); a request looks
//!   at a few extents of its own bucket for one that fits, else pops from any larger bucket
//!   (which always fits), and splits off the excess as a new free extent unless it is under
//!   64 KiB (then the request keeps it: a 256 MiB request takes at most 256 MiB + 64 KiB, never
//!   512 MiB). Only then is fresh space taken from the bump pointer, exactly page-rounded.
//! * Extents are not coalesced: two adjacent free 256 MiB extents do not serve a 512 MiB
//!   request (the arena adds a pool instead). Lock-free coalescing would need a lock-free
//!   ordered structure; the simple policy is predictable and crash-safe.
//! * **Zeroing.** Fresh memfd pages are zero. A block carries a CLEAN flag meaning "payload all
//!   zero": it is set on fresh space, on a free that zeroed what it wrote
//!   ([`Block::release_zeroed_prefix`](super::Block::release_zeroed_prefix): capnp knows how many
//!   words it wrote), and on a trimmed extent. A zeroed allocation clears the payload only when
//!   the block is not clean.
//! * **Statistics** are counted before a block is taken and after it is given back, so a process
//!   killed in between makes them over-count (a visible leak), never under-count.

use super::error::{Error, Result};
use super::layout::*;
use super::lockfree::{pop, push, push_chain, Words};
use super::pool::Pool;
use crate::sync::Ordering;

/// Free extents this many pages longer than a large request are taken whole rather than split:
/// a tail under 64 KiB could only ever serve another request of under 64 KiB, which small
/// classes serve, so it would sit on a list forever.
const MAX_SLACK_PAGES: u64 = 16;
/// Entries of a request's own bucket examined for a fit before moving up a bucket.
const OWN_BUCKET_TRIES: usize = 4;

/// Where a block came from, as the allocator hands it out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grant {
    /// Block offset (its header); the payload is at `off + BLOCK_HDR`.
    pub(crate) off: u64,
    /// Usable payload bytes (the class or extent size less the header).
    pub(crate) capacity: u64,
    /// Payload known to be all zeros.
    pub(crate) clean: bool,
    /// Generation of this life of the block.
    pub(crate) generation: u32,
}

impl Pool {
    /// Allocates a block with `size` payload bytes, or `Ok(None)` if this pool has no room.
    /// `flags` (e.g. [`FLAG_HANDLE`]) are recorded in the block's info word.
    pub(crate) fn alloc_block(&self, size: usize, flags: u64) -> Result<Option<Grant>> {
        match class_for(size) {
            Some(c) => self.alloc_small(c, flags),
            None => self.alloc_large(size, flags),
        }
    }

    fn alloc_small(&self, c: usize, flags: u64) -> Result<Option<Grant>> {
        let cs = &self.hdr().classes[c].0;
        cs.in_use.fetch_add(1, Ordering::Relaxed);
        let off = match pop(self, &cs.head) {
            Some(off) => {
                // A popped block must be a free block of this class: anything else means the
                // list was scribbled on (or, astronomically rarely, an ABA tag wrapped).
                let ok = self.is_heap_block(off) && {
                    let i = self.word(off).load(Ordering::Relaxed);
                    info_state(i) == STATE_FREE && info_class(i) == c as u64
                };
                if !ok {
                    cs.in_use.fetch_sub(1, Ordering::Relaxed);
                    return Err(Error::Corrupt(
                        "free list holds something not a free block of its class",
                    ));
                }
                off
            }
            None => match self.refill(c) {
                Ok(Some(off)) => off,
                other => {
                    cs.in_use.fetch_sub(1, Ordering::Relaxed);
                    return other.map(|_| None);
                }
            },
        };
        Ok(Some(self.take(off, c as u64, CLASS_SIZES[c] as u64, flags)))
    }

    /// Marks a block we own as allocated and describes it.
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
            clean: old & FLAG_CLEAN != 0,
            generation,
        }
    }

    fn is_heap_block(&self, off: u64) -> bool {
        off >= self.heap_off() && off % 16 == 0 && off + BLOCK_HDR <= self.capacity()
    }

    /// Takes a span for class `c`: returns its first block (ours) and frees the others.
    fn refill(&self, c: usize) -> Result<Option<u64>> {
        let pages = span_pages(c);
        let Some((span, _, clean)) = self.alloc_pages(pages, false)? else {
            return Ok(None);
        };
        let first_page = (span - self.heap_off()) / PAGE;
        let size = CLASS_SIZES[c] as u64;
        let n = pages * PAGE / size;
        let flags = if clean { FLAG_CLEAN } else { 0 };
        // Block 0 sits where the recycled extent's header was (if it was recycled): it continues
        // that position's generations, so a stale blob of the extent cannot match it. Every other
        // block start is a position that was never a block start before (see `lockfree`).
        let gen0 = info_generation(self.word(span).load(Ordering::Relaxed));
        for i in 0..n {
            let b = span + i * size;
            let generation = if i == 0 { gen0 } else { 0 };
            self.word(b).store(
                info(STATE_FREE, c as u64, flags, generation),
                Ordering::Relaxed,
            );
            let next = if i + 1 < n { b + size } else { 0 };
            self.word(b + super::lockfree::LINK)
                .store(next, Ordering::Relaxed);
        }
        // Release: a validation that finds these entries (Acquire in `block_at`) sees the block
        // headers written above.
        for i in 0..pages {
            self.page_entry(first_page + i)
                .store(pm_small(c as u64, i), Ordering::Release);
        }
        if n > 1 {
            let head = &self.hdr().classes[c].0.head;
            push_chain(self, head, span + size, span + (n - 1) * size);
        }
        Ok(Some(span))
    }

    /// Takes at least `n` contiguous pages: from a free extent (split to size) or from fresh
    /// space. With `slack`, a free extent up to [`MAX_SLACK_PAGES`] longer than asked is taken
    /// whole rather than leaving a tail too small to be useful. Returns the offset, the pages
    /// taken and whether they are known to be zero.
    fn alloc_pages(&self, n: u64, slack: bool) -> Result<Option<(u64, u64, bool)>> {
        let h = self.hdr();
        let keep = if slack { MAX_SLACK_PAGES } else { 0 };
        // The own bucket holds extents on both sides of `n`: look at a few of them.
        let b0 = bucket_of(n);
        let mut misfits = [0u64; OWN_BUCKET_TRIES];
        let mut found = None;
        let mut tried = 0;
        let mut bad = None;
        while tried < OWN_BUCKET_TRIES {
            let Some(off) = pop(self, &h.buckets[b0]) else {
                break;
            };
            match self.extent_pages(off) {
                Ok(pages) if pages >= n => {
                    found = Some((off, pages));
                    break;
                }
                Ok(_) => {
                    misfits[tried] = off;
                    tried += 1;
                }
                // A bad entry is dropped from the list (it cannot be trusted), the rest kept.
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        for &off in &misfits[..tried] {
            push(self, &h.buckets[b0], off);
        }
        if let Some(e) = bad {
            return Err(e);
        }
        if let Some((off, pages)) = found {
            return Ok(Some(self.split(off, pages, n, keep)));
        }
        // Every extent in a higher bucket is big enough.
        for b in b0 + 1..NUM_BUCKETS {
            if h.buckets[b].load(Ordering::Relaxed) == 0 {
                continue;
            }
            if let Some(off) = pop(self, &h.buckets[b]) {
                let pages = self.extent_pages(off)?;
                if pages < n {
                    return Err(Error::Corrupt("extent smaller than its bucket"));
                }
                return Ok(Some(self.split(off, pages, n, keep)));
            }
        }
        let bump = &h.bump.0;
        let mut cur = bump.load(Ordering::Relaxed);
        loop {
            if cur < self.heap_off() || cur % PAGE != 0 {
                return Err(Error::Corrupt("bump pointer outside the heap"));
            }
            let end = match cur.checked_add(n * PAGE) {
                Some(end) if end <= self.capacity() => end,
                _ => return Ok(None),
            };
            match bump.compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                // Fresh memfd pages read as zero, and nobody has touched these yet.
                Ok(_) => return Ok(Some((cur, n, true))),
                Err(now) => cur = now,
            }
        }
    }

    /// Length in pages of the extent at `off`, from the page map, validated (the entry is
    /// peer-writable and must not send us outside the heap).
    fn extent_len(&self, off: u64) -> Result<u64> {
        if !self.is_heap_block(off) || (off - self.heap_off()) % PAGE != 0 {
            return Err(Error::Corrupt("extent at a bad offset"));
        }
        let page = (off - self.heap_off()) / PAGE;
        let e = self.page_entry(page).load(Ordering::Acquire);
        let pages = pm_value(e);
        if pm_kind(e) != PM_LARGE || pages == 0 || pages > self.heap_pages() - page {
            return Err(Error::Corrupt("extent page-map entry is bad"));
        }
        Ok(pages)
    }

    /// Length in pages of the free extent at `off` (validated: a popped offset is untrusted).
    fn extent_pages(&self, off: u64) -> Result<u64> {
        let pages = self.extent_len(off)?;
        let i = self.word(off).load(Ordering::Relaxed);
        if info_state(i) != STATE_FREE || info_class(i) != CLASS_LARGE {
            return Err(Error::Corrupt(
                "extent list holds something not a free extent",
            ));
        }
        Ok(pages)
    }

    /// Keeps the first `n` of `pages` pages of the free extent at `off` (ours) and frees the rest
    /// as a new extent, unless the rest is at most `keep` pages: then the whole extent is kept.
    /// Returns the offset, the pages kept and whether they are known to be zero.
    fn split(&self, off: u64, pages: u64, n: u64, keep: u64) -> (u64, u64, bool) {
        let clean = self.word(off).load(Ordering::Relaxed) & FLAG_CLEAN != 0;
        if pages - n <= keep {
            return (off, pages, clean);
        }
        let tail = off + n * PAGE;
        let tail_pages = pages - n;
        let flags = if clean { FLAG_CLEAN } else { 0 };
        self.word(tail)
            .store(info(STATE_FREE, CLASS_LARGE, flags, 0), Ordering::Relaxed);
        self.page_entry((tail - self.heap_off()) / PAGE)
            .store(pm_large(tail_pages), Ordering::Release);
        push(self, &self.hdr().buckets[bucket_of(tail_pages)], tail);
        (off, n, clean)
    }

    fn alloc_large(&self, size: usize, flags: u64) -> Result<Option<Grant>> {
        let max = self.capacity() - self.heap_off();
        let pages = match large_pages(size) {
            Some(p) if p * PAGE <= max => p,
            _ => return Ok(None),
        };
        let stats = &self.hdr().large.0;
        // Count the exact size first (see the module docs), then any slack the extent came with.
        stats.bytes.fetch_add(pages * PAGE, Ordering::Relaxed);
        stats.blocks.fetch_add(1, Ordering::Relaxed);
        let (off, got) = match self.alloc_pages(pages, true) {
            Ok(Some((off, got, clean))) => {
                stats
                    .bytes
                    .fetch_add((got - pages) * PAGE, Ordering::Relaxed);
                if clean {
                    // Fresh space or a clean extent: make sure the header says so.
                    let w = self.word(off);
                    w.store(w.load(Ordering::Relaxed) | FLAG_CLEAN, Ordering::Relaxed);
                }
                (off, got)
            }
            other => {
                stats.bytes.fetch_sub(pages * PAGE, Ordering::Relaxed);
                stats.blocks.fetch_sub(1, Ordering::Relaxed);
                return other.map(|_| None);
            }
        };
        self.page_entry((off - self.heap_off()) / PAGE)
            .store(pm_large(got), Ordering::Release);
        Ok(Some(self.take(off, CLASS_LARGE, got * PAGE, flags)))
    }

    /// Frees the block at `off`, which the caller owns. `zeroed` says the payload is all zeros
    /// (the caller cleared what it wrote).
    pub(crate) fn free_block(&self, off: u64, zeroed: bool) -> Result<()> {
        if !self.is_heap_block(off) {
            return Err(Error::Corrupt("freeing an offset outside the heap"));
        }
        let info_w = self.word(off);
        let old = info_w.load(Ordering::Relaxed);
        let class = info_class(old);
        if info_state(old) != STATE_ALLOC || (class as usize >= NUM_CLASSES && class != CLASS_LARGE)
        {
            return Err(Error::Corrupt("freeing a block that is not allocated"));
        }
        let pages = if class == CLASS_LARGE {
            self.extent_len(off)?
        } else {
            0
        };
        let h = self.hdr();
        let flags = if zeroed { FLAG_CLEAN } else { 0 };
        let new = info(
            STATE_FREE,
            class,
            flags,
            info_generation(old).wrapping_add(1),
        );
        // The CAS makes a double free (two owners of one block: a forged raw reference) an
        // error, not a corrupt list. It also moves the generation on, so from here every lent
        // blob of this life of the block is stale.
        info_w
            .compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed)
            .map_err(|_| Error::Corrupt("block freed twice"))?;
        if class == CLASS_LARGE {
            if !zeroed && self.trims() && pages > 1 && self.trim_extent(off, pages) {
                // Still ours (not yet pushed): record that it is clean now.
                info_w.store(new | FLAG_CLEAN, Ordering::Relaxed);
            }
            push(self, &h.buckets[bucket_of(pages)], off);
            h.large.0.bytes.fetch_sub(pages * PAGE, Ordering::Relaxed);
            h.large.0.blocks.fetch_sub(1, Ordering::Relaxed);
        } else {
            let cs = &h.classes[class as usize].0;
            push(self, &cs.head, off);
            cs.in_use.fetch_sub(1, Ordering::Relaxed);
        }
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
    pub(crate) fn block_at(&self, off: u64) -> Result<(u64, u64)> {
        if off < self.heap_off() || off >= self.capacity() - BLOCK_HDR {
            return Err(Error::OutOfBounds {
                pool: self.id(),
                offset: off,
            });
        }
        if off % 16 != 0 {
            return Err(Error::Misaligned(off));
        }
        let rel = off - self.heap_off();
        let page = rel / PAGE;
        // Acquire pairs with the Release stores of refill/split/alloc_large: the block headers
        // those wrote before publishing the entry are visible.
        let e = self.page_entry(page).load(Ordering::Acquire);
        let not_a_block = Error::NotABlock(off);
        let (class, capacity) = match pm_kind(e) {
            PM_SMALL => {
                let (c, idx) = (pm_class(e) as usize, pm_value(e));
                if c >= NUM_CLASSES || idx > page {
                    return Err(not_a_block);
                }
                let at = rel - (page - idx) * PAGE;
                let size = CLASS_SIZES[c] as u64;
                if at % size != 0 || at / size >= span_pages(c) * PAGE / size {
                    return Err(not_a_block);
                }
                (c as u64, size - BLOCK_HDR)
            }
            PM_LARGE => {
                let pages = pm_value(e);
                if rel % PAGE != 0 || pages == 0 || pages > self.heap_pages() - page {
                    return Err(not_a_block);
                }
                (CLASS_LARGE, pages * PAGE - BLOCK_HDR)
            }
            _ => return Err(not_a_block),
        };
        let info = self.word(off).load(Ordering::Acquire);
        if info_class(info) != class {
            return Err(not_a_block);
        }
        Ok((info, capacity))
    }

    /// Bytes and blocks in use in this pool.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let h = self.hdr();
        // Wrapping: the counters are peer-writable; a scribbled one must not panic us.
        let mut bytes = h.large.0.bytes.load(Ordering::Relaxed);
        let mut blocks = h.large.0.blocks.load(Ordering::Relaxed);
        for (c, cs) in h.classes.iter().enumerate() {
            let n = cs.0.in_use.load(Ordering::Relaxed);
            bytes = bytes.wrapping_add(n.wrapping_mul(CLASS_SIZES[c] as u64));
            blocks = blocks.wrapping_add(n);
        }
        (bytes, blocks)
    }

    /// Bytes of heap handed out by the bump pointer so far (spans and extents, used or free).
    pub(crate) fn reserved(&self) -> u64 {
        let bump = self.hdr().bump.0.load(Ordering::Relaxed);
        bump.clamp(self.heap_off(), self.capacity()) - self.heap_off()
    }
}
