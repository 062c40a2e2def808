//! The arena handle: a set of pools addressed as (pool id, offset), how it is created, joined
//! and given pools, and what it knows of them. Allocation, blocks, configuration and checks live
//! in the submodules.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, OnceLock};

use super::error::{Error, Result};
use super::layout::*;
use super::ledger::Ledger;
use super::pool::Pool;
use super::publish::{PoolTable, Refused};

mod allocate;
mod block;
mod check;
mod config;
mod share;

pub use block::{Block, BlockRef};
pub use check::{Stats, Verification};
pub use config::ArenaConfig;

#[cfg(test)]
mod cache_tests;
#[cfg(test)]
mod tests;

/// A shared-memory arena: one or more memfd pools that several processes map, with a lock-free
/// allocator inside that every thread of every process may use at once.
///
/// `Arena` is a cheap handle (`Clone` shares it). One process [creates](Arena::create) the arena
/// and [sends](Arena::send_to) it over a Unix socket to others, which [join](Arena::join_from)
/// it (or hands the pools' fds, [`Arena::pool_fd`], to them some other way: [`Arena::join`]).
/// Any process may allocate and free, and a block allocated in one process may be freed in
/// another.
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
    /// The pools known here, by id, with their count (checked on every send: is there a pool
    /// the peer was not told of?) and one more than the highest id (bounds the scans).
    pools: PoolTable<Pool>,
    /// Pool that served the last allocation: tried first.
    hint: AtomicU32,
    /// Serializes growth within this process (allocation itself never takes it).
    grow: Mutex<()>,
    /// The session ledger this instance's handles record in, if any (see `shm::ledger`).
    ledger: OnceLock<Arc<Ledger>>,
    /// Called after this instance grew the arena by a pool (a session announces it).
    on_growth: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Shared {
    #[inline]
    pub(crate) fn pool(&self, id: u32) -> Option<&Pool> {
        self.pools.get(id)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Hand every cache of this instance back while the pools are still mapped: this thread's
        // and those of threads that outlive the arena (which can no longer use them).
        for pool in self.pools.iter() {
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
        let cfg = &arena.shared.config;
        let pool = Pool::create(
            0,
            arena.shared.id,
            cfg.pool_size.min(cfg.max_bytes / PAGE * PAGE),
            cfg.trim,
            cfg.max_bytes,
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
        log::debug!(
            target: "flowipc::shm",
            "arena {:#x}: joined pool {id}, added by another process",
            self.shared.id
        );
        Ok(id)
    }

    fn empty(id: u64, config: ArenaConfig) -> Arena {
        let pools = PoolTable::new(config.max_pools);
        Arena {
            shared: Arc::new(Shared {
                id,
                instance: {
                    super::tcache::watch_forks();
                    super::tcache::next_instance()
                },
                config,
                pools,
                hint: AtomicU32::new(0),
                grow: Mutex::new(()),
                ledger: OnceLock::new(),
                on_growth: OnceLock::new(),
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
        // Counted and within the scan bound before it can be found (see `publish`): a channel
        // that finds the pool and puts a message in it also sees the count and the bound that
        // make it announce the pool first.
        self.shared
            .pools
            .insert(id, Box::new(pool))
            .map_err(|r| match r {
                Refused::OutOfRange => Error::BadConfig("pool id beyond max_pools"),
                Refused::Taken => Error::DuplicatePool(id),
            })?;
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
        self.shared.pools.count()
    }

    /// The fd of pool `id`, to send to a process that joins the arena.
    pub fn pool_fd(&self, id: u32) -> Option<BorrowedFd<'_>> {
        self.pool(id).map(Pool::fd)
    }

    pub(crate) fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.shared.pools.iter()
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

    /// The session ledger this instance's handles record in (see `shm::ledger`).
    #[inline]
    pub(crate) fn ledger(&self) -> Option<&Ledger> {
        self.shared.ledger.get().map(|l| &**l)
    }

    /// Has `f` called each time this instance grows the arena by a pool, once the pool is
    /// usable (once; false if a hook is set already). It runs on the allocating thread, with
    /// this instance's growth lock held: it must not allocate in the arena.
    pub(crate) fn on_growth(&self, f: Box<dyn Fn() + Send + Sync>) -> bool {
        self.shared.on_growth.set(f).is_ok()
    }

    pub(super) fn grew(&self) {
        if let Some(f) = self.shared.on_growth.get() {
            f();
        }
    }

    /// Whether pool `id` exists arena-wide (some process claimed its id), known here or not.
    pub(crate) fn pool_claimed(&self, id: u32) -> bool {
        self.pool(0)
            .is_some_and(|p| id < p.hdr().next_pool_id.load(crate::sync::Ordering::Relaxed))
    }

    /// Makes this instance's handles record in `ledger` (once); false if they record elsewhere.
    pub(crate) fn set_ledger(&self, ledger: Arc<Ledger>) -> bool {
        self.shared.ledger.set(ledger).is_ok()
    }
}
