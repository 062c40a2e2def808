//! The lock-free allocator inside one pool.
//!
//! * **Small requests** (block ≤ 64 KiB + 16) go to one of [`NUM_CLASSES`] size classes. A thread
//!   first uses its own cache of free blocks of the class (see `tcache`: no read-modify-write,
//!   no shared cache line), then the class's shared tagged free list. When that is empty, a
//!   *span* of pages is taken from the page allocator, carved into blocks, and all but one are
//!   pushed with a single CAS.
//! * **Large requests** get an extent of exactly `ceil((size + 16) / 4096)` pages of fresh space,
//!   or a free extent at most [`slack`](super::space::slack) longer (an eighth, and at least 16 pages: a 256 MiB + 8
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
//! * **Reuse before carving, arena-wide.** A pool is first asked for freed space only (a cached
//!   or listed block, a free extent: `carve` false); the arena asks every pool so before it lets
//!   any carve fresh space (`Arena::grant_with`). Fresh space is cheap to take but costs a page
//!   fault per page at first touch (the first build of a 1 GiB message: 262,800 faults, 2 s on
//!   the project's VMs, against 0.1 s for the next ones); carving it while a fitting extent
//!   waited in another pool made a 1 GiB message that spilled into a second pool be rebuilt in
//!   that pool's fresh space, 2 GiB carved for 1 GiB live.
//! * **Zeroing** (capnp's builder needs zeroed segments) is paid once per reuse, when the block
//!   is freed: fresh memfd pages are zero, and a block carries a CLEAN flag meaning "payload
//!   all zero", set on fresh space, on a free that zeroed what it wrote
//!   ([`Block::release_zeroed_prefix`](super::Block::release_zeroed_prefix): capnp knows how many
//!   words it wrote), and on a trimmed extent. A sent message's last holder knows what was
//!   written only from the message's table, shared memory a peer can falsify: it clears the
//!   whole block, the table's claim deciding only how cheaply
//!   (`Pool::free_cleared`). A zeroed allocation clears the payload only when
//!   the block is not clean. Why at free: the freer knows what was written (an
//!   allocation would have to clear the whole capacity), and the build that follows writes
//!   each byte once instead of twice (clear, then fill), so it stays near a `memset` of its
//!   bytes; a drop costs about that `memset`. Measured for 256 MiB (a warm `memset`: 26 ms):
//!   trimming instead (punching the pages out, which also zeroes them) costs 25 ms at the free
//!   and 129 ms of page faults in the next build; clearing through the fd (`pwrite` of zeros,
//!   no faults) 51 ms. Clearing pages this process never touched (the last reference dropped
//!   by a receiver that read only part of the message) first maps them: a minor fault per
//!   page, 95 ms instead of 26 the first time, once per process and page.
//! * **Statistics** are kept per thread-cache slot (one plain counter per operation) plus the
//!   pool's base counters, and summed on demand; see `tcache`.
//!
//! What runs between threads and processes (bump pointer, span refills, extent frees and reuse)
//! is in `space`, over words that the loom models provide on the heap; this file adds the thread
//! caches, the statistics, trimming and validation.

use super::error::Error;
use super::layout::*;
use super::lockfree::{push, Words};
use super::pool::Pool;
use super::protocols::{block_start, NotStart};
use super::slot;
pub(crate) use super::space::{Fail, Grant};
use super::space::{Res, Space};
use crate::sync::{AtomicU64, Ordering};

impl From<Fail> for Error {
    fn from(f: Fail) -> Error {
        match f {
            Fail::Full => Error::OutOfMemory { requested: 0 },
            Fail::Corrupt(why) => Error::Corrupt(why),
        }
    }
}

impl Pool {
    /// Allocates a block with `size` payload bytes.
    /// `flags` (e.g. [`FLAG_HANDLE`]) are recorded in the block's info word. With `carve` false
    /// only freed space serves (a cached or listed block, a free extent): no fresh space is
    /// carved, and [`Fail::Full`] means "nothing freed fits here".
    #[inline(always)]
    pub(crate) fn alloc_block(&self, size: usize, flags: u64, carve: bool) -> Res<Grant> {
        match class_for(size) {
            Some(c) => self.alloc_small(c, flags, carve),
            None => self.alloc_large(size, flags, carve),
        }
    }

    #[inline(always)]
    fn alloc_small(&self, c: usize, flags: u64, carve: bool) -> Res<Grant> {
        let size = CLASS_SIZES[c] as u64;
        // Fast path: this thread's private list, and its own counters (see `tcache`).
        let mut cached = None;
        let counted = self
            .with_slot(|slot, counts| {
                slot::bump(&slot.classes[c].in_use, 1);
                if counts[c] > 0 {
                    cached = Some(slot::cache_pop(self, &slot.classes[c].head));
                    counts[c] -= 1;
                }
            })
            .is_some();
        if !counted {
            self.count_small(c, 1);
        }
        let off = match cached {
            Some(off) => off,
            None => match super::space::pop_or_refill(self, c, span_pages(c), size, carve) {
                Ok(off) => off,
                Err(f) => {
                    self.count_small(c, -1);
                    return Err(f);
                }
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
        Ok(super::space::take(self, off, c as u64, size, flags))
    }

    #[inline]
    pub(crate) fn is_heap_block(&self, off: u64) -> bool {
        super::space::is_heap_block(self, off)
    }

    #[inline(never)]
    fn alloc_large(&self, size: usize, flags: u64, carve: bool) -> Res<Grant> {
        let max = self.capacity() - self.heap_off();
        let pages = match large_pages(size) {
            Some(p) if p <= max / PAGE => p,
            _ => return Err(Fail::Full),
        };
        let (off, got) = super::space::alloc_extent(self, pages, carve)?;
        self.count_large((got * PAGE) as i64, 1);
        Ok(super::space::take(
            self,
            off,
            CLASS_LARGE,
            got * PAGE,
            flags,
        ))
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
        let new = super::space::freed_info(old, zeroed)?;
        let class = info_class(old);
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
                slot::bump(&slot.classes[c].in_use, -1);
                if counts[c] < super::tcache::cache_cap(c) {
                    slot::cache_push(self, &slot.classes[c].head, off);
                    counts[c] += 1;
                    cached = true;
                }
            })
            .is_some();
        if !counted {
            self.count_small(c, -1);
        }
        if !cached {
            push(self, self.class_head(c), off);
        }
        Ok(())
    }

    #[cold]
    fn free_extent(&self, off: u64, old: u64, new: u64, zeroed: bool) -> Res<()> {
        let pages = super::space::free_extent(self, off, old, new, |pages| {
            !zeroed && self.trims() && pages > 1 && self.trim_extent(off, pages)
        })?;
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

    /// Makes the whole payload of the block at `off` (payload capacity `cap`) zero before it
    /// is freed as clean, when by its writer's word only its first `claimed` bytes can be
    /// non-zero, and that word is shared memory a peer can write (a message's segment table,
    /// a one-segment prefix). The claim decides only the cost, never the result: the bytes up
    /// to the end of the page the claim ends in are cleared with stores (a small block's whole
    /// payload), and a large block's whole pages after them are given back to the kernel,
    /// which costs next to nothing for pages never touched (the tail of an honestly claimed
    /// segment) and clears those a false claim hid. So a peer that under-states what it wrote
    /// cannot hand dirty memory to a later zeroed allocation, whose capnp builder would follow
    /// the garbage as pointers (found looking into the `shm_tables` fuzz target).
    ///
    /// Then frees the block, as clean. An error means a peer scribbled on the header: the
    /// block is leaked, not freed.
    pub(crate) fn free_cleared(&self, off: u64, cap: u64, claimed: u64) {
        /// Payloads up to this size are cleared with stores alone (a few pages).
        const BY_STORES: u64 = 16 * PAGE;
        let start = off + BLOCK_HDR;
        let stores = if cap <= BY_STORES || !self.trims() {
            cap
        } else {
            let end = (start + claimed.min(cap)).next_multiple_of(PAGE);
            (end - start).min(cap)
        };
        self.zero(start, stores);
        let rest = cap - stores;
        if rest > 0 && crate::sys::punch_hole(self.file(), start + stores, rest).is_err() {
            self.zero(start + stores, rest);
        }
        let _ = self.free_block(off, true);
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
            let (b, n) = slot::usage(self, &slot.0);
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

impl Space for Pool {
    #[inline]
    fn heap_start(&self) -> u64 {
        self.heap_off()
    }

    #[inline]
    fn heap_end(&self) -> u64 {
        self.capacity()
    }

    #[inline]
    fn bump(&self) -> &AtomicU64 {
        &self.hdr().bump.0
    }

    #[inline]
    fn class_head(&self, c: usize) -> &AtomicU64 {
        &self.hdr().classes[c].0.head
    }

    #[inline]
    fn bucket(&self, b: usize) -> &AtomicU64 {
        &self.hdr().buckets[b]
    }

    #[inline]
    fn page_entry(&self, page: u64) -> &AtomicU64 {
        Pool::page_entry(self, page)
    }
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
