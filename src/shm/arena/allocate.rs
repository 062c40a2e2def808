//! Allocation entry points of an arena: the hinted pool first, then the others, then growth by
//! a new pool; and re-adoption of raw blocks.

use std::sync::atomic::Ordering;

use super::super::alloc::{Fail, Grant};
use super::super::error::{Error, Result};
use super::super::layout::*;
use super::super::pool::Pool;
use super::super::publish::{claim_pool_id, claim_up_to};
use super::{Arena, Block, BlockRef};

impl Arena {
    /// Allocates `size` bytes. The contents are unspecified (not necessarily zero).
    ///
    /// Fails with [`Error::OutOfMemory`] when no pool has room and the arena may not grow, and
    /// with [`Error::TooLarge`] when no pool could ever hold the request. Never panics.
    #[inline]
    pub fn alloc(&self, size: usize) -> Result<Block<'_>> {
        let (pool, grant) = self.grant(size, 0)?;
        Ok(Block {
            pool,
            grant,
            len: size,
        })
    }

    /// Allocates `size` zeroed bytes. Cheap when the block is known clean (fresh memory, or
    /// released with [`Block::release_zeroed_prefix`]): only dirty blocks are cleared.
    pub fn alloc_zeroed(&self, size: usize) -> Result<Block<'_>> {
        let (pool, grant) = self.grant(size, 0)?;
        if !grant.clean() {
            pool.zero(grant.off + BLOCK_HDR, grant.capacity);
        }
        Ok(Block {
            pool,
            grant,
            len: size,
        })
    }

    #[inline(always)]
    pub(crate) fn grant(&self, size: usize, flags: u64) -> Result<(&Pool, Grant)> {
        self.grant_with(size, flags, |pool, g| (pool, g))
    }

    /// Allocates and hands the block to `make`, which builds the result in place (going
    /// through an intermediate `(pool, grant)` pair costs a store-forwarding stall on the fast
    /// path).
    ///
    /// **Freed space before fresh space, arena-wide.** The hinted pool (the one that served last)
    /// is asked for freed space only: a cached or listed block, or a free extent. Only when it has
    /// none does [`grant_elsewhere`](Self::grant_elsewhere) ask the other pools for freed space,
    /// then carve fresh space (hinted pool first), then grow the arena. Carving fresh space in
    /// the hinted pool while a fitting extent waits in another pool would grow the footprint for
    /// nothing, and make every page of the block fault again: a 1 GiB message that spilled into a
    /// second pool was built afresh in that pool the next time, every other time.
    #[inline(always)]
    pub(crate) fn grant_with<'s, R>(
        &'s self,
        size: usize,
        flags: u64,
        make: impl FnOnce(&'s Pool, Grant) -> R,
    ) -> Result<R> {
        let hint = self.shared.hint.load(Ordering::Relaxed);
        if let Some(pool) = self.pool(hint) {
            match pool.alloc_block(size, flags, false) {
                Ok(g) => return Ok(make(pool, g)),
                Err(Fail::Full) => {}
                Err(f) => return Err(f.into()),
            }
        }
        let (pool, g) = self.grant_elsewhere(size, flags, hint)?;
        Ok(make(pool, g))
    }

    /// Nothing freed fits in the hinted pool: freed space in another pool, else fresh space in
    /// the hinted pool, then in the others, then growth. The pool that serves becomes the hint.
    #[inline(never)]
    fn grant_elsewhere(&self, size: usize, flags: u64, hint: u32) -> Result<(&Pool, Grant)> {
        if size > self.max_block_size() {
            return Err(Error::TooLarge {
                requested: size,
                max: self.max_block_size(),
            });
        }
        let hinted = self.pool(hint).into_iter();
        let others = || self.pools().filter(|p| p.id() != hint);
        let tries = others()
            .map(|p| (p, false))
            .chain(hinted.chain(others()).map(|p| (p, true)));
        for (pool, carve) in tries {
            match pool.alloc_block(size, flags, carve) {
                Ok(g) => {
                    if pool.id() != hint {
                        self.shared.hint.store(pool.id(), Ordering::Relaxed);
                    }
                    return Ok((pool, g));
                }
                Err(Fail::Full) => {}
                Err(f) => return Err(f.into()),
            }
        }
        self.grow_and_grant(size, flags)
    }

    fn grow_and_grant(&self, size: usize, flags: u64) -> Result<(&Pool, Grant)> {
        let _guard = crate::sync::lock(&self.shared.grow);
        // Another thread may have grown the arena while we waited.
        let known = self.shared.pools.known();
        if let Some(pool) = known.checked_sub(1).and_then(|id| self.pool(id)) {
            match pool.alloc_block(size, flags, true) {
                Ok(g) => return Ok((pool, g)),
                Err(Fail::Full) => {}
                Err(f) => return Err(f.into()),
            }
        }
        let pool0 = self.pool(0).ok_or(Error::UnknownPool(0))?;
        let hdr = pool0.hdr();
        let need = match class_for(size) {
            Some(c) => span_pages(c) * PAGE,
            None => large_pages(size).ok_or(Error::OutOfMemory { requested: size })? * PAGE,
        };
        // The smallest pool that holds the request, and the one we would like (a pool size).
        let mut least = need + HEADER_BYTES;
        while least - heap_off(least) < need {
            least += page_map_bytes(least) + PAGE;
        }
        let want = self.shared.config.pool_size.div_ceil(PAGE) * PAGE;
        let want = want.max(least).min(MAX_POOL_BYTES);
        // Claim its bytes arena-wide (all processes count in pool 0), never past the limit the
        // creator recorded: as much of `want` as fits, if at least `least` does.
        let limit = hdr.byte_limit.load(Ordering::Relaxed);
        let capacity =
            claim_up_to(&hdr.pool_bytes, least, want, limit, PAGE).ok_or(Error::LimitReached {
                requested: size,
                limit,
            })?;
        let unclaim = || hdr.pool_bytes.fetch_sub(capacity, Ordering::Relaxed);
        let max = self.shared.config.max_pools;
        // Claim an id arena-wide (all processes draw from pool 0's counter), without ever letting
        // the counter run past the limit.
        let Some(id) = claim_pool_id(&hdr.next_pool_id, max) else {
            unclaim();
            log::warn!(
                target: "flowipc::shm",
                "arena {:#x} is full: {max} pools (max_pools), a block of {size} bytes refused",
                self.shared.id
            );
            return Err(Error::OutOfMemory { requested: size });
        };
        let pool = Pool::create(id, self.shared.id, capacity, self.shared.config.trim, limit)
            .inspect_err(|_| {
                unclaim();
            })?;
        self.insert(pool).inspect_err(|_| {
            unclaim();
        })?;
        log::info!(
            target: "flowipc::shm",
            "arena {:#x} grew: pool {id} of {capacity} bytes (for a block of {size} bytes)",
            self.shared.id
        );
        let pool = self.pool(id).ok_or(Error::UnknownPool(id))?;
        self.shared.hint.store(id, Ordering::Relaxed);
        self.grew();
        match pool.alloc_block(size, flags, true) {
            Ok(g) => Ok((pool, g)),
            Err(Fail::Full) => Err(Error::OutOfMemory { requested: size }),
            Err(f) => Err(f.into()),
        }
    }

    /// Re-adopts a block that [`Block::into_raw`] turned into a [`BlockRef`].
    ///
    /// The reference is validated (known pool, block start, allocated, same generation) and
    /// refused with the specific error otherwise.
    ///
    /// # Safety
    /// The block must be owned by no one else: `r` came from `into_raw` of a block of this arena
    /// (in this or another process), and this is the only `from_raw` of it. Otherwise two owners
    /// would write the same bytes, or one would free what the other still uses.
    pub unsafe fn block_from_raw(&self, r: BlockRef, len: usize) -> Result<Block<'_>> {
        let (pool, off, info, capacity) = self.live_block(r)?;
        if len as u64 > capacity {
            return Err(Error::OutOfBounds {
                pool: r.pool,
                offset: r.offset.saturating_add(len as u64),
            });
        }
        let grant = Grant {
            off,
            capacity,
            was: info,
        };
        Ok(Block { pool, grant, len })
    }
}

impl Arena {
    /// Validates that `r` names a block that is allocated in its generation: a known pool, a
    /// block start, state allocated. Returns the pool, the block (header) offset, its info word
    /// and its payload capacity. Reads only atomics (page map, block header).
    pub(crate) fn live_block(&self, r: BlockRef) -> Result<(&Pool, u64, u64, u64)> {
        let pool = self.pool(r.pool).ok_or(Error::UnknownPool(r.pool))?;
        let off = r.offset.checked_sub(BLOCK_HDR).ok_or(Error::OutOfBounds {
            pool: r.pool,
            offset: r.offset,
        })?;
        let (info, capacity) = pool.block_at(off)?;
        if info_state(info) != STATE_ALLOC || info_generation(info) != r.generation {
            return Err(Error::Stale);
        }
        Ok((pool, off, info, capacity))
    }
}
