//! Per-thread caches of free small blocks, kept in shared memory so that nothing is lost when a
//! thread or process goes away.
//!
//! A thread that allocates from a pool claims one of the pool's [`NUM_SLOTS`] slots. The slot
//! holds the thread's usage counters and one private free list per size class. Small frees push
//! onto the private list (up to [`cache_cap`] blocks), small allocations pop from it: plain
//! atomic loads and stores of words only this thread writes, no read-modify-write, no contended
//! cache line. Only when the private list is empty (or full) does the thread touch the shared
//! lock-free lists.
//!
//! Because the slot lives in the pool, a cached block is never out of reach:
//! * a thread that exits (or calls [`Arena::flush_thread_cache`](super::Arena::flush_thread_cache))
//!   pushes its private lists onto the shared ones, folds its counters into the pool's base
//!   counters and frees the slot;
//! * a process that dies (SIGKILL, or `exit` without running thread-local destructors) loses
//!   nothing either: each slot is guarded by an open-file-description lock on one byte of the
//!   pool file, which the kernel drops with the process. Any process that finds a claimed slot
//!   whose lock it can take knows the owner is gone and reclaims the slot's lists and counters
//!   (when it claims a slot of its own, or in
//!   [`Arena::reclaim_dead_caches`](super::Arena::reclaim_dead_caches)).
//!
//! Usage statistics are the pool's base counters plus every slot's counters: exact whenever no
//! thread is allocating or freeing (up to a block in flight when a process is killed), in every
//! process.
//!
//! `fork()`: a child inherits its parent's thread-local entries, process token and lock files,
//! all of which its parent keeps using. A fork handler moves the child to a new generation: it
//! neither uses nor releases what it inherited, and uses no cache for pools whose lock file its
//! parent opened (the shared lists still serve it).
//!
//! Crash safety of the hand-overs: a private list is detached (its head zeroed) *before* it is
//! pushed onto a shared list, and counters are added to the base *before* the slot's are zeroed,
//! so a process killed in between leaks a chain or over-counts, and never lists a block twice.

use std::cell::RefCell;
use std::sync::atomic::AtomicU64 as StdAtomicU64;
use std::sync::{OnceLock, Weak};

use super::arena::Shared;
use super::layout::*;
use super::pool::{Pool, Slot};
use super::slot::{self as protocol, bump, Counters, SlotLocks, SlotPool};
use crate::sync::{AtomicU64, Ordering};

/// Most blocks of class `c` one thread keeps cached: 32, and at most 64 KiB worth (at least 2).
#[inline]
pub(crate) fn cache_cap(c: usize) -> u16 {
    CACHE_CAP[c]
}

static CACHE_CAP: [u16; NUM_CLASSES] = {
    let mut caps = [0u16; NUM_CLASSES];
    let mut c = 0;
    while c < NUM_CLASSES {
        let n = (64 * 1024) / CLASS_SIZES[c];
        caps[c] = if n < 2 {
            2
        } else if n > 32 {
            32
        } else {
            n as u16
        };
        c += 1;
    }
    caps
};

/// This process's token, recorded as the owner of the slots it claims: the pid and a random
/// number (so a recycled pid is not mistaken for us). Never 0. A forked child gets its own.
pub(crate) fn process_token() -> u64 {
    let t = TOKEN.load(Ordering::Relaxed);
    if t != 0 {
        return t;
    }
    let t = ((std::process::id() as u64) << 32) | (super::arena::random_id() & 0xFFFF_FFFF);
    // Threads claiming slots of different pools (each has its own `slot_mutex`) can get here at
    // once: the first token stored is the process's. Had each stored its own, a slot claimed
    // under the losing token would look like another process's to this process's next claim,
    // whose lock (our own description) it gets: it would drain a live thread's cache.
    match TOKEN.compare_exchange(0, t, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => t,
        Err(first) => first,
    }
}

static TOKEN: StdAtomicU64 = StdAtomicU64::new(0);

/// Bumped in the child after every fork: thread-cache entries, the token and the lock files a
/// child inherits belong to its parent, which still uses them. The child must neither use nor
/// release them (releasing would drain the parent's live cache under it).
static FORK_GEN: StdAtomicU64 = StdAtomicU64::new(0);

extern "C" fn forked_child() {
    // Only atomic stores: async-signal-safe, as a fork handler must be.
    FORK_GEN.fetch_add(1, Ordering::Relaxed);
    TOKEN.store(0, Ordering::Relaxed);
}

/// Installs the fork handler (once per process).
pub(crate) fn watch_forks() {
    static ONCE: OnceLock<bool> = OnceLock::new();
    ONCE.get_or_init(|| crate::sys::on_fork_child(forked_child).is_ok());
}

fn fork_gen() -> u64 {
    FORK_GEN.load(Ordering::Relaxed)
}

/// A process-unique number for each arena instance (keys the thread-local entries, so an entry
/// of a dropped arena can never be taken for one of a later arena).
pub(crate) fn next_instance() -> u64 {
    static NEXT: StdAtomicU64 = StdAtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// This thread's slot in one pool.
struct Entry {
    instance: u64,
    pool: u32,
    /// Fork generation the entry was made in; an entry from before a fork is the parent's.
    fork_gen: u64,
    /// `None`: no slot could be had (all taken, or no lock file); use the shared lists.
    slot: Option<u32>,
    /// Blocks on each private list (the lists themselves are in shared memory).
    counts: [u16; NUM_CLASSES],
    arena: Weak<Shared>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        // Thread exit: hand the cache back, if the arena is still alive in this process (and the
        // slot is ours, not our parent's from before a fork).
        if self.fork_gen != fork_gen() {
            return;
        }
        if let (Some(slot), Some(shared)) = (self.slot.take(), self.arena.upgrade()) {
            if let Some(pool) = shared.pool(self.pool) {
                pool.release_slot(slot, Some(&self.counts));
            }
        }
    }
}

thread_local! {
    static ENTRIES: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

/// Index of this thread's current-generation entry for `pool`, if any.
fn find(entries: &[Entry], pool: &Pool) -> Option<usize> {
    let gen = fork_gen();
    entries
        .iter()
        .position(|e| e.instance == pool.instance && e.pool == pool.id() && e.fork_gen == gen)
}

impl SlotPool<NUM_CLASSES> for Pool {
    #[inline]
    fn cache_slot(&self, i: u32) -> &Slot {
        &self.hdr().slots[i as usize].0
    }

    #[inline]
    fn shared_list(&self, c: usize) -> &AtomicU64 {
        &self.hdr().classes[c].0.head
    }

    #[inline]
    fn base_counters(&self) -> &Counters {
        &self.hdr().base.0
    }

    #[inline]
    fn class_bytes(&self, c: usize) -> u64 {
        CLASS_SIZES[c] as u64
    }

    #[inline]
    fn list_cap(&self, c: usize) -> u16 {
        cache_cap(c)
    }

    #[inline]
    fn valid_cached(&self, off: u64, c: usize) -> bool {
        self.is_cached_block(off, c)
    }
}

/// The slots' locks in production: OFD locks on byte `i` of the pool file, through this
/// process's own open file description of it (`None` in a forked child, which neither takes nor
/// drops its parent's locks). See [`SlotLocks`] for what the protocol assumes of them.
struct OfdLocks<'a>(Option<&'a std::fs::File>);

impl SlotLocks for OfdLocks<'_> {
    fn try_lock(&self, i: u32) -> bool {
        self.0
            .is_some_and(|file| matches!(crate::sys::try_lock_byte(file, i as u64), Ok(true)))
    }

    fn unlock(&self, i: u32) {
        if let Some(file) = self.0 {
            let _ = crate::sys::unlock_byte(file, i as u64);
        }
    }
}

impl Pool {
    fn slot(&self, i: u32) -> &Slot {
        self.cache_slot(i)
    }

    /// Runs `f` on this thread's slot in this pool (claiming one on first use) and its private
    /// list lengths. `None` if the thread has no slot (or is being torn down): the caller then
    /// uses the shared lists and base counters. `f` must not allocate from the arena.
    #[inline]
    pub(crate) fn with_slot<R>(
        &self,
        f: impl FnOnce(&Slot, &mut [u16; NUM_CLASSES]) -> R,
    ) -> Option<R> {
        ENTRIES
            .try_with(|entries| {
                let mut entries = entries.try_borrow_mut().ok()?;
                let i = match find(&entries, self) {
                    Some(i) => i,
                    None => {
                        let gen = fork_gen();
                        // Forget entries of arenas dropped since (their slots were released or
                        // are reclaimable: the lock file closed with the pool) and entries
                        // inherited through a fork (the parent's).
                        entries.retain(|e| e.arena.strong_count() > 0 && e.fork_gen == gen);
                        entries.push(Entry {
                            instance: self.instance,
                            pool: self.id(),
                            fork_gen: gen,
                            slot: self.claim_slot(),
                            counts: [0; NUM_CLASSES],
                            arena: self.owner.clone(),
                        });
                        entries.len() - 1
                    }
                };
                let e = &mut entries[i];
                let slot = e.slot?;
                Some(f(self.slot(slot), &mut e.counts))
            })
            .ok()
            .flatten()
    }

    /// Counts `delta` small blocks of class `c` in (or out of) use: through this thread's slot
    /// (no RMW) when it has one, else in the pool's base counters.
    pub(crate) fn count_small(&self, c: usize, delta: i64) {
        if self
            .with_slot(|slot, _| bump(&slot.classes[c].in_use, delta))
            .is_none()
        {
            self.count_base(delta * CLASS_SIZES[c] as i64, delta);
        }
    }

    /// Counts a large extent of `bytes` in (`delta` 1) or out of (`delta` -1) use.
    pub(crate) fn count_large(&self, bytes: i64, delta: i64) {
        let counted = self.with_slot(|slot, _| {
            bump(&slot.large.bytes, bytes);
            bump(&slot.large.blocks, delta);
        });
        if counted.is_none() {
            self.count_base(bytes, delta);
        }
    }

    fn count_base(&self, bytes: i64, blocks: i64) {
        protocol::add(&self.hdr().base.0, bytes as u64, blocks as u64);
    }

    /// Our own open file description of the pool, opened by this process (a forked child
    /// inherits its parent's, whose locks it must not touch: then no caching in the child).
    fn lock_file(&self) -> Option<&std::fs::File> {
        let (pid, file) = self
            .lock_file
            .get_or_init(|| (std::process::id(), crate::sys::reopen(self.fd()).ok()));
        if *pid != std::process::id() {
            return None;
        }
        file.as_ref()
    }

    /// Claims a free slot, or reclaims one whose owner process is gone (see
    /// [`protocol::claim`]). Threads of this process share the lock file, so they are kept apart
    /// by `slot_mutex` (and `take_over` skips slots of this process).
    fn claim_slot(&self) -> Option<u32> {
        let file = self.lock_file()?;
        let _guard = crate::sync::lock(&self.slot_mutex);
        let i = protocol::claim(
            self,
            &OfdLocks(Some(file)),
            process_token(),
            NUM_SLOTS as u32,
        )?;
        self.claimed.fetch_or(1 << i, Ordering::Relaxed);
        Some(i)
    }

    /// Hands slot `i` back: its private lists to the shared lists, its counters to the base.
    pub(crate) fn release_slot(&self, i: u32, counts: Option<&[u16; NUM_CLASSES]>) {
        let _guard = crate::sync::lock(&self.slot_mutex);
        self.release_locked(i, counts);
    }

    /// [`protocol::release`], with `slot_mutex` held.
    fn release_locked(&self, i: u32, counts: Option<&[u16; NUM_CLASSES]>) {
        self.claimed.fetch_and(!(1 << i), Ordering::Relaxed);
        protocol::release(self, &OfdLocks(self.lock_file()), i, counts);
    }

    /// Releases every slot this arena instance still holds. Only when the instance is being
    /// dropped: then no thread can be using any of them (no `Arena`, `Block` or handle of it is
    /// left), whatever threads that used them are doing. Without this, slots of threads that
    /// outlive the arena would stay claimed by this process, unreclaimable by it.
    pub(crate) fn release_all_slots(&self) {
        if self.lock_file().is_none() {
            return;
        }
        let _guard = crate::sync::lock(&self.slot_mutex);
        let claimed = self.claimed.load(Ordering::Relaxed);
        for i in 0..NUM_SLOTS as u32 {
            if claimed & (1 << i) != 0
                && self.slot(i).owner.load(Ordering::Acquire) == process_token()
            {
                // The counts are unknown here: the drain walks the lists with its bound.
                self.release_locked(i, None);
            }
        }
    }

    /// Reclaims every slot whose owner process is gone. Returns how many.
    pub(crate) fn reclaim_dead_slots(&self) -> usize {
        let Some(file) = self.lock_file() else {
            return 0;
        };
        let _guard = crate::sync::lock(&self.slot_mutex);
        protocol::reclaim_dead(
            self,
            &OfdLocks(Some(file)),
            process_token(),
            NUM_SLOTS as u32,
        )
    }

    /// Whether `off` looks like a free block of class `c` (a cache entry worth trusting).
    #[inline]
    pub(crate) fn is_cached_block(&self, off: u64, c: usize) -> bool {
        super::space::is_free_block(self, off, c)
    }

    /// Releases this thread's slot in this pool, if it has one (the arena is being dropped, or
    /// the user asked).
    pub(crate) fn release_thread_slot(&self) {
        let _ = ENTRIES.try_with(|entries| {
            let Ok(mut entries) = entries.try_borrow_mut() else {
                return;
            };
            if let Some(i) = find(&entries, self) {
                let mut e = entries.swap_remove(i);
                if let Some(slot) = e.slot.take() {
                    self.release_slot(slot, Some(&e.counts));
                }
            }
        });
    }
}
