//! Usage figures ([`Stats`]) and the free-list walk ([`Arena::verify`]) of an arena.

use std::collections::HashSet;

use super::super::error::{Error, Result};
use super::super::layout::*;
use super::super::lockfree::{head_off, Words, LINK};
use super::super::pool::Pool;
use super::Arena;

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

impl Arena {
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
