//! The arena: a set of pools addressed as (pool id, offset), and the owned [`Block`] it hands out.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::alloc::{Fail, Grant};
use super::error::{Error, Result};
use super::layout::*;
use super::lockfree::{head_off, Words, LINK};
use super::pool::Pool;

/// How an arena is built. All knobs have defaults that let a 1 GiB block be allocated.
///
/// ```
/// use flowipc::shm::{Arena, ArenaConfig};
/// let arena = Arena::create(ArenaConfig::new().pool_size(64 << 20).max_pools(4))?;
/// assert_eq!(arena.pool_ids(), vec![0]);
/// # Ok::<(), flowipc::shm::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ArenaConfig {
    pool_size: u64,
    max_pools: u32,
    trim: bool,
}

impl Default for ArenaConfig {
    fn default() -> Self {
        ArenaConfig {
            pool_size: 1 << 30,
            max_pools: 64,
            trim: false,
        }
    }
}

impl ArenaConfig {
    /// The defaults: 1 GiB pools (sparse: only touched pages cost RAM), up to 64 pools, no
    /// trimming.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of each new pool (rounded up to pages). A request larger than a pool gets a pool of
    /// its own, sized to fit.
    pub fn pool_size(mut self, bytes: u64) -> Self {
        self.pool_size = bytes;
        self
    }

    /// Most pools the arena may have (1..=1024). When all are full, allocation fails with
    /// [`Error::OutOfMemory`].
    pub fn max_pools(mut self, n: u32) -> Self {
        self.max_pools = n;
        self
    }

    /// Whether freed large extents (more than one page) give their pages back to the kernel
    /// (`fallocate` punch-hole). Saves RAM; costs a page fault per page when the space is
    /// reused (about 2.7 µs per 4 KiB page on the project's machines), so it is off by default.
    pub fn trim_freed_extents(mut self, on: bool) -> Self {
        self.trim = on;
        self
    }

    fn validate(&self) -> Result<()> {
        if !(1..=1024).contains(&self.max_pools) {
            return Err(Error::BadConfig("max_pools must be in 1..=1024"));
        }
        if self.pool_size < MIN_POOL_BYTES || self.pool_size > MAX_POOL_BYTES {
            return Err(Error::BadConfig("pool_size must be in 84 KiB..=1 TiB"));
        }
        Ok(())
    }
}

/// A shared-memory arena: one or more memfd pools that several processes map, with a lock-free
/// allocator inside that every thread of every process may use at once.
///
/// `Arena` is a cheap handle (`Clone` shares it). One process [creates](Arena::create) the arena
/// and sends the pools' fds ([`Arena::pool_fd`]) to others, which [join](Arena::join) it. Any
/// process may allocate and free, and a block allocated in one process may be freed in another.
///
/// ```
/// use flowipc::shm::{Arena, ArenaConfig};
/// let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20))?;
/// let mut block = arena.alloc_zeroed(1000)?;
/// assert!(block.as_slice().iter().all(|&b| b == 0));
/// block.as_mut_slice()[..5].copy_from_slice(b"hello");
/// assert_eq!(arena.stats().blocks_in_use, 1);
/// drop(block);
/// assert_eq!(arena.stats().blocks_in_use, 0);
/// # Ok::<(), flowipc::shm::Error>(())
/// ```
#[derive(Clone)]
pub struct Arena {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    id: u64,
    /// Process-unique number of this instance (keys the thread caches).
    instance: u64,
    config: ArenaConfig,
    pools: Box<[OnceLock<Pool>]>,
    /// One more than the highest pool id known here (bounds the scans).
    known: AtomicU32,
    /// Pools known here (checked on every send: is there a pool the peer was not told of?).
    count: AtomicU32,
    /// Pool that served the last allocation: tried first.
    hint: AtomicU32,
    /// Serializes growth within this process (allocation itself never takes it).
    grow: Mutex<()>,
}

impl Shared {
    #[inline]
    pub(crate) fn pool(&self, id: u32) -> Option<&Pool> {
        self.pools.get(id as usize)?.get()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Hand every cache of this instance back while the pools are still mapped: this thread's
        // and those of threads that outlive the arena (which can no longer use them).
        for pool in self.pools.iter().filter_map(OnceLock::get) {
            pool.release_thread_slot();
            pool.release_all_slots();
        }
    }
}

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("id", &format_args!("{:#x}", self.shared.id))
            .field("pools", &self.pool_ids())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Usage figures of an arena, summed over the pools this process knows. They live in shared
/// memory, so every process reads the same numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of blocks in use (block sizes, headers included).
    pub bytes_in_use: u64,
    /// Blocks in use.
    pub blocks_in_use: u64,
    /// Heap bytes ever carved from fresh space (in use, free-listed, or leaked).
    pub bytes_reserved: u64,
    /// Total bytes of the pools (virtual; pages cost RAM only once touched).
    pub capacity: u64,
    /// Pools known to this process.
    pub pools: u32,
}

/// Result of [`Arena::verify`]: what the free lists hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Small blocks on the shared free lists.
    pub free_small_blocks: u64,
    /// Small blocks on threads' private free lists (thread caches).
    pub cached_blocks: u64,
    /// Free large extents.
    pub free_extents: u64,
}

/// Where a block lives: pool id and payload offset in that pool, plus the generation of this
/// life of the block. The same in every process, whatever address each maps the pool at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockRef {
    /// Pool id.
    pub pool: u32,
    /// Byte offset of the payload within the pool.
    pub offset: u64,
    /// Generation of the block (changes every time the block is freed).
    pub generation: u32,
}

/// A random, non-zero 64-bit id (arena ids, process tokens).
pub(crate) fn random_id() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() | 1
}

impl Arena {
    /// Creates an arena with one pool (id 0).
    pub fn create(config: ArenaConfig) -> Result<Arena> {
        config.validate()?;
        let arena = Arena::empty(random_id(), config);
        let pool = Pool::create(
            0,
            arena.shared.id,
            arena.shared.config.pool_size,
            arena.shared.config.trim,
        )?;
        arena.insert(pool)?;
        Ok(arena)
    }

    /// Joins an arena created by another process from its pools' fds (which must include pool
    /// 0). Every fd is validated: a sealed memfd with a flowipc header of this layout version, all
    /// of one arena, no id twice.
    pub fn join(fds: impl IntoIterator<Item = OwnedFd>, config: ArenaConfig) -> Result<Arena> {
        config.validate()?;
        let mut pools = Vec::new();
        for fd in fds {
            pools.push(Pool::open(fd, config.trim)?);
        }
        let Some(first) = pools.iter().find(|p| p.id() == 0) else {
            return Err(Error::UnknownPool(0));
        };
        let arena = Arena::empty(first.arena_id(), config);
        for pool in pools {
            arena.insert(pool)?;
        }
        Ok(arena)
    }

    /// Adds a pool another process created (after growing the arena) from its fd. Returns its id.
    pub fn add_pool(&self, fd: OwnedFd) -> Result<u32> {
        let pool = Pool::open(fd, self.shared.config.trim)?;
        let id = pool.id();
        self.insert(pool)?;
        Ok(id)
    }

    fn empty(id: u64, config: ArenaConfig) -> Arena {
        let pools = (0..config.max_pools).map(|_| OnceLock::new()).collect();
        Arena {
            shared: Arc::new(Shared {
                id,
                instance: {
                    super::tcache::watch_forks();
                    super::tcache::next_instance()
                },
                config,
                pools,
                known: AtomicU32::new(0),
                count: AtomicU32::new(0),
                hint: AtomicU32::new(0),
                grow: Mutex::new(()),
            }),
        }
    }

    fn insert(&self, mut pool: Pool) -> Result<()> {
        if pool.arena_id() != self.shared.id {
            return Err(Error::WrongArena {
                expected: self.shared.id,
                found: pool.arena_id(),
            });
        }
        let id = pool.id();
        pool.owner = Arc::downgrade(&self.shared);
        pool.instance = self.shared.instance;
        let slot = self
            .shared
            .pools
            .get(id as usize)
            .ok_or(Error::BadConfig("pool id beyond max_pools"))?;
        slot.set(pool).map_err(|_| Error::DuplicatePool(id))?;
        // Counted before it can be found: a channel that finds the pool (through `known`) and
        // puts a message in it must also see the count that makes it announce the pool first.
        // (A count ahead of `known` is harmless: the announcement scan finds nothing new.)
        self.shared.count.fetch_add(1, Ordering::AcqRel);
        self.shared.known.fetch_max(id + 1, Ordering::AcqRel);
        Ok(())
    }

    /// Random id of this arena, recorded in each of its pools.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The pool with this id, if this process knows it.
    #[inline]
    pub fn pool(&self, id: u32) -> Option<&Pool> {
        self.shared.pool(id)
    }

    /// Ids of the pools this process knows, ascending.
    pub fn pool_ids(&self) -> Vec<u32> {
        self.pools().map(|p| p.id()).collect()
    }

    /// Number of pools this process knows.
    #[inline]
    pub(crate) fn pool_count(&self) -> u32 {
        self.shared.count.load(Ordering::Acquire)
    }

    /// The fd of pool `id`, to send to a process that joins the arena.
    pub fn pool_fd(&self, id: u32) -> Option<BorrowedFd<'_>> {
        self.pool(id).map(Pool::fd)
    }

    pub(crate) fn pools(&self) -> impl Iterator<Item = &Pool> {
        let n = self.shared.known.load(Ordering::Acquire) as usize;
        self.shared.pools[..n].iter().filter_map(OnceLock::get)
    }

    /// Largest payload a single block can have.
    pub fn max_block_size(&self) -> usize {
        let cap = MAX_POOL_BYTES - heap_off(MAX_POOL_BYTES);
        (cap - BLOCK_HDR) as usize
    }

    /// Gives the calling thread's cached free blocks back to the shared free lists (and its usage
    /// counters to the pools' base counters). Threads do this by themselves when they exit; call
    /// it to return a thread's cache early, e.g. before the thread goes idle for long.
    pub fn flush_thread_cache(&self) {
        for pool in self.pools() {
            pool.release_thread_slot();
        }
    }

    /// Reclaims the thread caches of processes that are gone (killed, or exited without
    /// dropping the arena): their cached blocks go back to the shared free lists. Returns how
    /// many caches were reclaimed. Also happens by itself when a thread claims a cache slot.
    pub fn reclaim_dead_caches(&self) -> usize {
        self.pools().map(Pool::reclaim_dead_slots).sum()
    }

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
    #[inline(always)]
    pub(crate) fn grant_with<'s, R>(
        &'s self,
        size: usize,
        flags: u64,
        make: impl FnOnce(&'s Pool, Grant) -> R,
    ) -> Result<R> {
        let hint = self.shared.hint.load(Ordering::Relaxed);
        if let Some(pool) = self.pool(hint) {
            match pool.alloc_block(size, flags) {
                Ok(g) => return Ok(make(pool, g)),
                Err(Fail::Full) => {}
                Err(f) => return Err(f.into()),
            }
        }
        let (pool, g) = self.grant_elsewhere(size, flags, hint)?;
        Ok(make(pool, g))
    }

    /// The hinted pool is full: try the others, then grow.
    #[inline(never)]
    fn grant_elsewhere(&self, size: usize, flags: u64, hint: u32) -> Result<(&Pool, Grant)> {
        if size > self.max_block_size() {
            return Err(Error::TooLarge {
                requested: size,
                max: self.max_block_size(),
            });
        }
        for pool in self.pools() {
            if pool.id() != hint {
                match pool.alloc_block(size, flags) {
                    Ok(g) => {
                        self.shared.hint.store(pool.id(), Ordering::Relaxed);
                        return Ok((pool, g));
                    }
                    Err(Fail::Full) => {}
                    Err(f) => return Err(f.into()),
                }
            }
        }
        self.grow_and_grant(size, flags)
    }

    fn grow_and_grant(&self, size: usize, flags: u64) -> Result<(&Pool, Grant)> {
        let _guard = crate::sync::lock(&self.shared.grow);
        // Another thread may have grown the arena while we waited.
        let known = self.shared.known.load(Ordering::Acquire);
        if let Some(pool) = known.checked_sub(1).and_then(|id| self.pool(id)) {
            match pool.alloc_block(size, flags) {
                Ok(g) => return Ok((pool, g)),
                Err(Fail::Full) => {}
                Err(f) => return Err(f.into()),
            }
        }
        let pool0 = self.pool(0).ok_or(Error::UnknownPool(0))?;
        let max = self.shared.config.max_pools;
        // Claim an id arena-wide (all processes draw from pool 0's counter), without ever letting
        // the counter run past the limit.
        let next = &pool0.hdr().next_pool_id;
        let mut id = next.load(Ordering::Relaxed);
        loop {
            if id >= max {
                return Err(Error::OutOfMemory { requested: size });
            }
            match next.compare_exchange_weak(id, id + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => id = now,
            }
        }
        let need = match class_for(size) {
            Some(c) => span_pages(c) * PAGE,
            None => large_pages(size).ok_or(Error::OutOfMemory { requested: size })? * PAGE,
        };
        let mut capacity = self.shared.config.pool_size.max(need + HEADER_BYTES);
        while capacity - heap_off(capacity) < need {
            capacity += page_map_bytes(capacity) + PAGE;
        }
        let pool = Pool::create(
            id,
            self.shared.id,
            capacity.min(MAX_POOL_BYTES),
            self.shared.config.trim,
        )?;
        self.insert(pool)?;
        let pool = self.pool(id).ok_or(Error::UnknownPool(id))?;
        self.shared.hint.store(id, Ordering::Relaxed);
        match pool.alloc_block(size, flags) {
            Ok(g) => Ok((pool, g)),
            Err(Fail::Full) => Err(Error::OutOfMemory { requested: size }),
            Err(f) => Err(f.into()),
        }
    }

    /// Usage figures, read from shared memory (the same in every process that knows the same
    /// pools). Exact while no thread allocates or frees; a snapshot otherwise (a free counted
    /// before the matching allocation can make it transiently low).
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for pool in self.pools() {
            let (bytes, blocks) = pool.usage();
            s.bytes_in_use = s.bytes_in_use.saturating_add(bytes);
            s.blocks_in_use = s.blocks_in_use.saturating_add(blocks);
            s.bytes_reserved += pool.reserved();
            s.capacity += pool.capacity();
            s.pools += 1;
        }
        s
    }

    /// Walks every free list of every known pool and checks it: each entry is a real block start
    /// of the right class, marked free, listed once, and the walk ends. Also counts small blocks
    /// that are neither free nor in use (held by a process that died).
    ///
    /// Meant for tests and diagnostics while the arena is quiescent: with concurrent allocation
    /// the lists move under the walk and it may report spurious corruption (it reads only
    /// atomics, so it is memory-safe either way).
    pub fn verify(&self) -> Result<Verification> {
        let mut v = Verification::default();
        for pool in self.pools() {
            verify_pool(pool, &mut v)?;
        }
        Ok(v)
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

fn verify_pool(pool: &Pool, v: &mut Verification) -> Result<()> {
    use crate::sync::Ordering::Relaxed;
    let h = pool.hdr();
    let mut seen = HashSet::new();
    let limit = pool.capacity() / 16;
    // Walks a small-class list (shared or private), checking every entry.
    let mut walk = |first: u64, class: u64, what: &'static str| -> Result<u64> {
        let mut off = first;
        let mut n = 0;
        while off != 0 {
            let (info, _) = pool.block_at(off).map_err(|_| Error::Corrupt(what))?;
            if info_state(info) != STATE_FREE || info_class(info) != class {
                return Err(Error::Corrupt(what));
            }
            if !seen.insert(off) || seen.len() as u64 > limit {
                return Err(Error::Corrupt(
                    "a free list has a cycle or lists a block twice",
                ));
            }
            n += 1;
            off = pool.word(off + LINK).load(Relaxed);
        }
        Ok(n)
    };
    for (c, cs) in h.classes.iter().enumerate() {
        let first = head_off(cs.0.head.load(Relaxed));
        v.free_small_blocks += walk(first, c as u64, "a free list holds a non-free block")?;
    }
    for slot in &h.slots {
        for (c, k) in slot.0.classes.iter().enumerate() {
            let first = k.head.load(Relaxed);
            v.cached_blocks += walk(first, c as u64, "a thread cache holds a non-free block")?;
        }
    }
    for (b, head) in h.buckets.iter().enumerate() {
        let mut off = head_off(head.load(Relaxed));
        while off != 0 {
            let (info, _) = pool
                .block_at(off)
                .map_err(|_| Error::Corrupt("extent list entry is not a block"))?;
            let pages = pm_value(
                pool.page_entry((off - pool.heap_off()) / PAGE)
                    .load(Relaxed),
            );
            if info_state(info) != STATE_FREE
                || info_class(info) != CLASS_LARGE
                || bucket_of(pages.max(1)) != b
            {
                return Err(Error::Corrupt(
                    "extent list entry is not a free extent of its bucket",
                ));
            }
            if !seen.insert(off) || seen.len() as u64 > limit {
                return Err(Error::Corrupt("extent list has a cycle or a duplicate"));
            }
            v.free_extents += 1;
            off = pool.word(off + LINK).load(Relaxed);
        }
    }
    Ok(())
}

/// A block of an arena, owned by this process: freed when dropped (unless handed on with
/// [`Block::into_raw`]). Dereferences to its bytes.
pub struct Block<'a> {
    pool: &'a Pool,
    grant: Grant,
    len: usize,
}

impl fmt::Debug for Block<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("at", &self.block_ref())
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> Block<'a> {
    /// Requested length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the requested length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Usable bytes of the block (at least [`len`](Block::len): the size class or page-rounded
    /// extent, less the header).
    pub fn capacity(&self) -> usize {
        self.grant.capacity as usize
    }

    /// Where the block lives, valid in every process of the arena.
    pub fn block_ref(&self) -> BlockRef {
        BlockRef {
            pool: self.pool.id(),
            offset: self.grant.off + BLOCK_HDR,
            generation: self.grant.generation(),
        }
    }

    /// Pointer to the first byte (16-byte aligned), valid while the block lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.pool.ptr(self.grant.off + BLOCK_HDR)
    }

    /// Mutable pointer to the first byte (16-byte aligned), valid while the block lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.pool.ptr(self.grant.off + BLOCK_HDR)
    }

    /// The block's `len` bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the payload [off+16, off+16+len) lies inside the mapping (len <= capacity,
        // checked at allocation or in block_from_raw) which lives as long as 'a. The block is
        // owned by this `Block` alone (popped off a free list, or adopted once through the
        // unsafe `block_from_raw`), so no one writes it while we hand out `&`. Bytes are plain
        // u8: any value is valid.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The block's `len` bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    /// Gives up ownership without freeing: the block stays allocated until some process adopts
    /// it with [`Arena::block_from_raw`] and drops it (or until the arena's pools go away).
    pub fn into_raw(self) -> BlockRef {
        let r = self.block_ref();
        std::mem::forget(self);
        r
    }

    /// Frees the block, promising that only its first `written` bytes may be non-zero: those are
    /// cleared now, and the block is then known clean, so the next zeroed allocation of it costs
    /// nothing. This is how a capnp segment (which reports the words it used) is recycled cheaply.
    ///
    /// # Safety
    /// Every byte of the block's capacity at or after `written` must be zero. A false promise
    /// hands a later [`Arena::alloc_zeroed`] dirty memory.
    pub unsafe fn release_zeroed_prefix(self, written: usize) {
        let written = (written as u64).min(self.grant.capacity);
        self.pool.zero(self.grant.off + BLOCK_HDR, written);
        let (pool, off) = (self.pool, self.grant.off);
        std::mem::forget(self);
        // An error means a peer scribbled on the header: the block is leaked, not freed.
        let _ = pool.free_block(off, true);
    }
}

impl Drop for Block<'_> {
    #[inline]
    fn drop(&mut self) {
        // An error means a peer scribbled on the header: the block is leaked, not freed into a
        // list it could corrupt. A drop has no one to report it to.
        let _ = self.pool.free_block(self.grant.off, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Ordering::Relaxed;

    fn arena() -> Arena {
        Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap()
    }

    #[test]
    fn release_zeroed_prefix_makes_the_next_zeroed_alloc_free_of_charge() {
        let arena = arena();
        let mut b = arena.alloc_zeroed(8192).unwrap();
        b.as_mut_slice()[..100].fill(9);
        let at = b.block_ref();
        // SAFETY: only the first 100 bytes were written; the block came zeroed.
        unsafe { b.release_zeroed_prefix(100) };
        let (pool, g) = arena.grant(8192, 0).unwrap();
        assert_eq!(g.off + BLOCK_HDR, at.offset);
        assert!(g.clean(), "the block was released clean");
        pool.free_block(g.off, false).unwrap();
        // A plain drop leaves it dirty.
        let b = arena.alloc(8192).unwrap();
        drop(b);
        let (pool, g) = arena.grant(8192, 0).unwrap();
        assert!(!g.clean());
        pool.free_block(g.off, false).unwrap();
        assert_eq!(arena.stats().blocks_in_use, 0);
    }

    #[test]
    fn raw_blocks_round_trip_and_bad_references_are_refused() {
        let arena = arena();
        let mut b = arena.alloc(500).unwrap();
        b.as_mut_slice().fill(3);
        let r = b.into_raw();
        assert_eq!(arena.stats().blocks_in_use, 1);
        // SAFETY: `r` came from `into_raw` and is adopted once.
        let b = unsafe { arena.block_from_raw(r, 500) }.unwrap();
        assert!(b.as_slice().iter().all(|&x| x == 3));
        drop(b);
        let stale = BlockRef { ..r };
        // SAFETY: the block was freed (stale generation), so validation refuses the call and
        // nothing is adopted: no second owner can arise.
        let e = unsafe { arena.block_from_raw(stale, 500) }.unwrap_err();
        assert!(matches!(e, Error::Stale), "{e:?}");
        let b = arena.alloc(500).unwrap();
        let r = b.block_ref();
        // SAFETY: the contract (sole ownership of what is adopted) holds trivially: the length
        // exceeds the block, so validation refuses the call and nothing is adopted.
        let e = unsafe { arena.block_from_raw(r, 1 << 20) }.unwrap_err();
        assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
        // SAFETY: as above: the pool is unknown, so nothing is adopted.
        let e = unsafe { arena.block_from_raw(BlockRef { pool: 9, ..r }, 1) }.unwrap_err();
        assert!(matches!(e, Error::UnknownPool(9)), "{e:?}");
        drop(b);
        assert_eq!(arena.stats().blocks_in_use, 0);
    }

    #[test]
    fn a_scribbled_free_list_is_reported_not_followed() {
        let arena = arena();
        let c = class_for(100).unwrap();
        drop(arena.alloc(100).unwrap()); // carve a span: the class list is non-empty
        arena.flush_thread_cache(); // so that the next allocation goes to the shared list
        let pool = arena.pool(0).unwrap();
        let head = &pool.hdr().classes[c].0.head;
        let good = head.load(Relaxed);
        // A head pointing into the pool header, then one pointing past the end of the pool.
        for bad in [super::super::lockfree::pack(4096, 5), u64::MAX] {
            head.store(bad, Relaxed);
            let e = arena.verify().unwrap_err();
            assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
            let e = arena.alloc(100).unwrap_err();
            assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
        }
        head.store(good, Relaxed);
        arena.verify().unwrap();
        drop(arena.alloc(100).unwrap());
        // A free-list cycle is caught by verify, which terminates.
        let a = arena.alloc(100).unwrap();
        let off = a.block_ref().offset - BLOCK_HDR;
        drop(a);
        pool.word(off + LINK).store(off, Relaxed);
        let e = arena.verify().unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
    }

    #[test]
    fn scribbled_bump_pointer_and_extent_lengths_are_errors_not_panics() {
        let arena = arena();
        let pool = arena.pool(0).unwrap();
        let bump = &pool.hdr().bump.0;
        let good = bump.load(Relaxed);
        bump.store(4096, Relaxed); // inside the pool header
        let e = arena.alloc(1 << 20).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
        bump.store(u64::MAX, Relaxed);
        assert!(arena.stats().bytes_reserved <= pool.capacity());
        arena.verify().unwrap(); // walks no further than the heap
        bump.store(good, Relaxed);
        // A large block whose page-map length is scribbled is not freed into a list (leaked).
        let b = arena.alloc(1 << 20).unwrap();
        let off = b.block_ref().offset - BLOCK_HDR;
        let entry = pool.page_entry((off - pool.heap_off()) / PAGE);
        entry.store(pm_large(1 << 40), Relaxed);
        drop(b);
        entry.store(pm_large(1), Relaxed);
        arena.verify().unwrap();
        // block_from_raw with an absurd length is refused without overflow.
        let b = arena.alloc(64).unwrap();
        // SAFETY: the length overflows, so validation refuses the call and nothing is adopted.
        let e = unsafe { arena.block_from_raw(b.block_ref(), usize::MAX) }.unwrap_err();
        assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn an_arena_dropped_while_its_threads_live_hands_their_caches_back() {
        let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
        let joiner = Arena::join(
            [arena.pool_fd(0).unwrap().try_clone_to_owned().unwrap()],
            ArenaConfig::new(),
        )
        .unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (done, parked) = std::sync::mpsc::channel::<()>();
        let worker = {
            let joiner = joiner.clone();
            std::thread::spawn(move || {
                drop(joiner.alloc(64).unwrap()); // now cached in this thread's slot
                drop(joiner);
                done.send(()).unwrap();
                let _ = wait.recv(); // outlives the arena instance
            })
        };
        parked.recv().unwrap();
        assert_eq!(arena.verify().unwrap().cached_blocks, 1);
        drop(joiner); // the last handle of that instance: it releases the parked thread's slot
        assert_eq!(arena.verify().unwrap().cached_blocks, 0);
        let in_use = arena.pool(0).unwrap().hdr().slots.iter();
        assert_eq!(
            in_use
                .filter(|s| s.0.owner.load(crate::sync::Ordering::Relaxed) != 0)
                .count(),
            0
        );
        go.send(()).unwrap();
        worker.join().unwrap();
    }

    #[test]
    fn a_forked_child_that_lets_go_of_the_arena_leaves_the_parents_cache_alone() {
        let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
        let blocks: Vec<_> = (0..10).map(|_| arena.alloc(64).unwrap()).collect();
        drop(blocks);
        assert_eq!(arena.verify().unwrap().cached_blocks, 10);
        // In the child, what its thread exiting and its last arena handle going would do (without
        // the heap frees, which are not safe after fork in a multi-threaded test process).
        let ok = crate::sys::fork_and_wait(|| {
            arena.flush_thread_cache();
            for pool in arena.pools() {
                pool.release_all_slots();
            }
        });
        assert!(ok, "child failed");
        assert_eq!(
            arena.verify().unwrap().cached_blocks,
            10,
            "parent's cache intact"
        );
        let again: Vec<_> = (0..10).map(|_| arena.alloc(64).unwrap()).collect();
        assert!(again.iter().all(|b| b.capacity() >= 64));
        drop(again);
        arena.verify().unwrap();
        assert_eq!(arena.stats().blocks_in_use, 0);
    }
}
