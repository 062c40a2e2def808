//! Publication of an arena's pools: how a new pool becomes visible, fully initialized, to the
//! other threads of this process ([`PoolTable`]) and to other processes (the header's magic word,
//! [`publish_header`] / [`header_published`]), and how pool ids stay unique arena-wide
//! ([`claim_pool_id`]). Written over [`crate::sync`] atomics so that loom runs this very code
//! (`--cfg flowipc_loom`, models in `loom-tests/pools.rs`).
//!
//! The atomic operations, and what each orders:
//!
//! * **Header magic** (in the mapping, one per pool): `Pool::create` writes the immutable header
//!   fields (`Relaxed`), then the magic with `Release` ([`publish_header`]); `Pool::open` loads
//!   it with `Acquire` ([`header_published`]) before it reads the fields. Across processes the
//!   kernel's fd passing (`sendmsg`/`recvmsg` of `SCM_RIGHTS`, after the create) already orders
//!   the creator's writes before the peer's open; the magic pair makes an open that raced a
//!   create (a fd obtained some other way) either refuse the pool or see every field.
//! * **Id claim** (pool 0's `next_pool_id`, shared by all processes): a CAS loop, `Relaxed`,
//!   that never passes the limit ([`claim_pool_id`]). It orders nothing: the id's uniqueness is
//!   all it gives (the RMWs of one word form one total order).
//! * **Byte claim** (pool 0's `pool_bytes`, shared by all processes, against its `byte_limit`):
//!   the same bounded CAS loop, claiming a pool's bytes before the pool is made
//!   ([`claim_up_to`]); `Relaxed`, for the same reason. The claims never sum past the limit.
//! * **Slot** (process-local, one per pool id): the pool, boxed and fully built, is published by
//!   a CAS from null (`Release`, so it also refuses a second pool of the same id); readers load
//!   the slot with `Acquire` ([`PoolTable::get`]) and see the whole `Pool` (its header fields
//!   above, which the creating thread wrote before, included).
//! * **Count** (pools known here) and **known** (one more than the highest id published, the
//!   bound of scans): raised (`AcqRel`: `fetch_add`, `fetch_max`) *before* the slot is
//!   published, the count lowered again if the slot was taken. So a thread that found a pool
//!   through its slot (by id: the allocation hint, a `BlockRef`) reads a count that includes it
//!   and a bound that covers it: a channel that put a message in the pool then announces the pool
//!   (its count check fires, its scan finds it) before the handle. Counts and bounds transiently
//!   ahead of the slots are harmless: a scan skips empty slots, an announcement finds nothing new,
//!   a grower that finds the last pool missing grows anew. A scan (`Acquire` bound, then
//!   `Acquire` slots) finds every pool whose insertion happened before it.

use std::marker::PhantomData;

use crate::sync::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// Marks a pool header whose fields are written as valid: a process that sees `magic` here sees
/// those fields.
#[inline]
pub fn publish_header(word: &AtomicU64, magic: u64) {
    word.store(magic, Ordering::Release);
}

/// Whether the header's magic word is `magic`; if so, the fields written before
/// [`publish_header`] are visible.
#[inline]
pub fn header_published(word: &AtomicU64, magic: u64) -> bool {
    word.load(Ordering::Acquire) == magic
}

/// Claims the next pool id from the arena-wide counter `next`, unless it reached `max` (the
/// counter never runs past it). Ids are unique across threads and processes.
#[inline]
pub fn claim_pool_id(next: &AtomicU32, max: u32) -> Option<u32> {
    let mut id = next.load(Ordering::Relaxed);
    loop {
        if id >= max {
            return None;
        }
        match next.compare_exchange_weak(id, id + 1, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(id),
            Err(now) => id = now,
        }
    }
}

/// Claims between `least` and `want` units (both multiples of `unit`) from the arena-wide
/// running total `total`, never letting it pass `limit`: as much of `want` as fits, in whole
/// `unit`s, if that is at least `least`. Returns the amount claimed, or `None` if not even
/// `least` fits. Claims from any number of threads and processes sum to at most `limit`.
#[inline]
pub fn claim_up_to(total: &AtomicU64, least: u64, want: u64, limit: u64, unit: u64) -> Option<u64> {
    let mut cur = total.load(Ordering::Relaxed);
    loop {
        let room = limit.saturating_sub(cur) / unit * unit;
        if room < least {
            return None;
        }
        let n = want.min(room);
        match total.compare_exchange_weak(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(n),
            Err(now) => cur = now,
        }
    }
}

/// Why [`PoolTable::insert`] refused an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The id is beyond the table.
    OutOfRange,
    /// An item of this id was published before.
    Taken,
}

/// A fixed table of items (pools) indexed by id, each published once and never removed while
/// the table lives; lookups are one `Acquire` load, insertions lock-free.
pub struct PoolTable<T> {
    slots: Box<[AtomicPtr<T>]>,
    /// One more than the highest id published (or being published).
    known: AtomicU32,
    /// Items published (possibly one ahead per insertion in progress).
    count: AtomicU32,
    /// The table owns the items (`Box<T>`), and is `Send`/`Sync` only as below.
    _owns: PhantomData<*const T>,
}

// SAFETY: the table owns its items (boxes, freed in `drop`): moving it to another thread moves
// them, which `T: Send` allows. The atomics themselves are thread-safe.
unsafe impl<T: Send> Send for PoolTable<T> {}
// SAFETY: through `&PoolTable` a thread reads items (`&T`, needing `T: Sync`) and inserts items
// that another thread later drops with the table (a move between threads, needing `T: Send`).
// Publication itself is by atomics (see `insert` and `get`).
unsafe impl<T: Send + Sync> Sync for PoolTable<T> {}

impl<T> PoolTable<T> {
    /// An empty table for ids `0..len`.
    pub fn new(len: u32) -> PoolTable<T> {
        PoolTable {
            slots: (0..len)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            known: AtomicU32::new(0),
            count: AtomicU32::new(0),
            _owns: PhantomData,
        }
    }

    /// Publishes `item` as id `id`: from now on [`get`](Self::get) returns it, with everything
    /// written into it before this call visible. Refused (and `item` dropped) if the id is beyond
    /// the table or taken.
    pub fn insert(&self, id: u32, item: Box<T>) -> Result<(), Refused> {
        let slot = self.slots.get(id as usize).ok_or(Refused::OutOfRange)?;
        // Counted and covered by the scan bound before it can be found (see the module docs).
        self.count.fetch_add(1, Ordering::AcqRel);
        self.known.fetch_max(id + 1, Ordering::AcqRel);
        let ptr = Box::into_raw(item);
        // Release: a reader whose Acquire load of the slot reads `ptr` sees the item's contents
        // and the count and bound above.
        match slot.compare_exchange(
            std::ptr::null_mut(),
            ptr,
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => Ok(()),
            Err(_) => {
                // The bound stays: the id is published (by whoever took it).
                self.count.fetch_sub(1, Ordering::AcqRel);
                // SAFETY: `ptr` came from `Box::into_raw` just above and was not published (the
                // CAS failed), so this thread still owns it alone.
                drop(unsafe { Box::from_raw(ptr) });
                Err(Refused::Taken)
            }
        }
    }

    /// The item of id `id`, if published.
    #[inline]
    pub fn get(&self, id: u32) -> Option<&T> {
        let ptr = self.slots.get(id as usize)?.load(Ordering::Acquire);
        // SAFETY: a non-null slot holds a pointer from `Box::into_raw` (in `insert`), published
        // with Release after the box was written, which this Acquire load read: the item is fully
        // initialized as seen from here. Slots are never cleared or replaced, and the box is freed
        // only when the table is dropped, which `&self` prevents for the life of the reference.
        // Items are only ever read through shared references.
        unsafe { ptr.as_ref() }
    }

    /// One more than the highest id published or being published (the slots worth scanning).
    #[inline]
    pub fn known(&self) -> u32 {
        self.known.load(Ordering::Acquire)
    }

    /// Items published (possibly ahead by insertions in progress).
    #[inline]
    pub fn count(&self) -> u32 {
        self.count.load(Ordering::Acquire)
    }

    /// The items published, by ascending id.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        (0..self.known()).filter_map(|id| self.get(id))
    }
}

impl<T> std::fmt::Debug for PoolTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolTable")
            .field("len", &self.slots.len())
            .field("known", &self.known())
            .field("count", &self.count())
            .finish()
    }
}

impl<T> Drop for PoolTable<T> {
    fn drop(&mut self) {
        for slot in self.slots.iter() {
            let ptr = slot.load(Ordering::Acquire);
            if !ptr.is_null() {
                // SAFETY: the pointer came from `Box::into_raw` in `insert` and is freed only
                // here, once: `&mut self` means no reference handed out by `get` is alive.
                drop(unsafe { Box::from_raw(ptr) });
            }
        }
    }
}
