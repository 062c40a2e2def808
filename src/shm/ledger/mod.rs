//! The lend ledger of a session: what a session's client holds of the ref-counted objects of the
//! session's two arenas, kept where the server can read it after the client died, and the
//! server's settlement of it.
//!
//! # What is counted
//! The client (the side that joined the arenas) keeps one [`Ledger`] per session, in pages
//! allocated in the session-scope arena and found from that arena's pool header. Every arena
//! instance the ledger is kept for (the session's two) records in it, per object
//! ([`ShmHandle`](super::ShmHandle)): the references its handles hold (made, cloned, borrowed,
//! less those dropped), the lends it issued, and the lends it adopted. The server keeps, per
//! session, the lends it made to the client and the client's lends it adopted ([`PeerLends`],
//! through `Session::lend_object` and `Session::borrow_object`).
//!
//! # Settlement
//! When the session ends because the client died (the server sees `PeerGone` while the
//! client's ledger is still open: a client that ends its session closes the ledger first, and
//! keeps what it holds), [`settle`] gives back, for every object the ledger names:
//! * the references the client's handles held;
//! * the client's lends nobody adopted: as many outstanding tickets as the client lent less
//!   the server adopted, taken like a borrower takes them;
//! * the server's lends to the client that it never adopted (lent less adopted).
//!
//! Each reference given back goes as a holder's drop would: the last one frees the object (and
//! a message's segments). The server's own handles, including those borrowed from the dead
//! client, are references of their own: they stay valid until dropped.
//!
//! # Order and crashes
//! A process can be killed between any two instructions. The ledger is written so that it never
//! claims more than its process holds: a reference is recorded *after* it is gained (made,
//! cloned, adopted, lent) and forgotten *before* it is given up (dropped). A kill between the
//! two steps leaks that one reference (as every reference leaked before the ledger), never
//! frees an object early. Lends are counted per object, not per blob: if a third process's lend
//! of the same object is outstanding when the client dies, a lend of the client's that the
//! server adopted through another way than `Session::borrow_object` may be settled with that
//! third lend's ticket (that borrower then gets `Stale`).
//!
//! The ledger itself is written by one process, under its mutex, and read by the server only
//! once that process is gone (its socket closed with it): no concurrency across processes.
//! An entry's block offset marks it as used: it is written last when an entry is made and
//! cleared first when one is freed, so a page read after a kill holds only whole entries.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::arena::{Arena, BlockRef};
use super::error::{Error, Result};
use super::layout::{BLOCK_HDR, FLAG_HANDLE, MAX_POOL_BYTES};
use super::lockfree::{is_live_of, Words, LINK};
use super::pool::Pool;
use super::protocols::settle_refs;
use crate::sync::{lock, Ordering};

/// Bytes of a ledger page (a small-class block of the session arena).
const PAGE_BYTES: u64 = 16 << 10;
const PAGE_MAGIC: u64 = u64::from_le_bytes(*b"FIPLEDG1");
/// Page header words: magic, next page (as the root: `pool << 36 | payload offset`), entries.
const HDR_WORDS: u64 = 4;
/// Entry words: arena id, `pool | generation << 32`, block offset (0: no entry), held, lent,
/// took.
const ENTRY_WORDS: u64 = 6;
const PER_PAGE: u64 = (PAGE_BYTES - HDR_WORDS * 8) / (ENTRY_WORDS * 8);
/// Most pages a ledger grows to (a walk of a dead peer's ledger stops there too).
const MAX_PAGES: usize = 1 << 12;
const OFF_BITS: u32 = 36;

/// The object an entry counts references of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) arena: u64,
    pub(crate) pool: u32,
    /// The block (header) offset.
    pub(crate) off: u64,
    pub(crate) generation: u32,
}

/// A change to an entry's counts.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Delta {
    /// References held by handles.
    pub(crate) held: i64,
    /// Lends issued.
    pub(crate) lent: u64,
    /// Lends adopted.
    pub(crate) took: u64,
}

fn page_ref(pool: u32, payload: u64) -> u64 {
    (pool as u64) << OFF_BITS | payload
}

fn split_ref(r: u64) -> (u32, u64) {
    ((r >> OFF_BITS) as u32, r & ((1 << OFF_BITS) - 1))
}

/// The ledger a session's client keeps (see the module docs).
pub(crate) struct Ledger {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Until closed: the session arena (where the pages are) and the arenas recording here.
    home: Option<Arena>,
    arenas: Vec<Arena>,
    /// Pages: pool id and payload offset.
    pages: Vec<(u32, u64)>,
    index: HashMap<Key, u64>,
    free: Vec<u64>,
    /// Entries ever used (the next new one, when `free` is empty).
    used: u64,
}

impl Ledger {
    /// Opens a ledger in `home` (a session-scope arena), found from its pool header.
    pub(crate) fn open(home: &Arena) -> Result<Arc<Ledger>> {
        let (pool, payload) = new_page(home)?;
        let root = &home
            .pool(pool)
            .ok_or(Error::UnknownPool(pool))?
            .hdr()
            .ledger;
        if root
            .compare_exchange(
                0,
                page_ref(pool, payload),
                Ordering::Release,
                Ordering::Relaxed,
            )
            .is_err()
        {
            free_page(home, pool, payload);
            return Err(Error::BadConfig("the arena has a ledger already"));
        }
        Ok(Arc::new(Ledger {
            inner: Mutex::new(Inner {
                home: Some(home.clone()),
                arenas: Vec::new(),
                pages: vec![(pool, payload)],
                index: HashMap::new(),
                free: Vec::new(),
                used: 0,
            }),
        }))
    }

    /// Records from now on what `arena`'s handles hold (until the ledger is closed).
    pub(crate) fn keep_for(self: &Arc<Ledger>, arena: &Arena) {
        let mut g = lock(&self.inner);
        if g.home.is_some() && arena.set_ledger(self.clone()) {
            g.arenas.push(arena.clone());
        }
    }

    /// Gains what `op` gains of the object of `key` (a clone, a lend, an adoption) and records
    /// it as `d`, under the ledger's lock: the entry is found (or made) first, so that only a
    /// couple of stores follow the gain (a kill in between leaks it, never more). Nothing is
    /// recorded if `op` fails.
    pub(crate) fn gain<R>(&self, key: Key, d: Delta, op: impl FnOnce() -> Result<R>) -> Result<R> {
        let mut g = lock(&self.inner);
        let n = match g.home {
            Some(_) => g.index.get(&key).copied().or_else(|| g.add(key)),
            None => None,
        };
        let r = op();
        if let Some(n) = n {
            g.apply(key, n, if r.is_ok() { d } else { Delta::default() });
        }
        r
    }

    /// Gains a new object: `grant` allocates it and names it; its entry (held once) is written
    /// before the object is published, under the ledger's lock, so that a kill after the grant
    /// leaks at most what the allocator had in flight. A dead owner's entry of an object not yet
    /// published is settled by freeing the block (no one else can hold it).
    pub(crate) fn gain_new<R>(&self, grant: impl FnOnce() -> Result<(Key, R)>) -> Result<R> {
        let mut g = lock(&self.inner);
        let n = if g.home.is_some() { g.reserve() } else { None };
        let (key, r) = match grant() {
            Ok(v) => v,
            Err(e) => {
                if let Some(n) = n {
                    g.free.push(n);
                }
                return Err(e);
            }
        };
        if let Some(n) = n {
            // The entry is whole after a handful of stores; the index (which may allocate) after.
            g.write_key(n, key, 1);
        }
        Ok(r)
    }

    /// Records `d` (a reference given up) for the object of `key`, then gives it up with `op`,
    /// under the ledger's lock (a kill in between leaks it, never frees it early).
    pub(crate) fn lose(&self, key: Key, d: Delta, op: impl FnOnce()) {
        let mut g = lock(&self.inner);
        if let Some(n) = g.index.get(&key).copied() {
            g.apply(key, n, d);
        }
        op();
    }

    /// Closes the ledger (the session ends, its process goes on and keeps what it holds): no
    /// more records, the pages are freed and the root cleared first (a server that then sees
    /// the session end settles nothing).
    pub(crate) fn close(&self) {
        let mut g = lock(&self.inner);
        let Some(home) = g.home.take() else {
            return;
        };
        if let Some(&(pool, _)) = g.pages.first() {
            if let Some(p) = home.pool(pool) {
                p.hdr().ledger.store(0, Ordering::Release);
            }
        }
        for (pool, payload) in std::mem::take(&mut g.pages) {
            free_page(&home, pool, payload);
        }
        g.index.clear();
        g.arenas.clear();
    }
}

impl Inner {
    /// The pool and word offset of entry `n`.
    fn entry(&self, n: u64) -> Option<(&Pool, u64)> {
        let (pool, payload) = *self.pages.get((n / PER_PAGE) as usize)?;
        let pool = self.home.as_ref()?.pool(pool)?;
        Some((
            pool,
            payload + 8 * (HDR_WORDS + (n % PER_PAGE) * ENTRY_WORDS),
        ))
    }

    /// A free entry (its counts zero, no key), or `None` if the ledger is full.
    fn reserve(&mut self) -> Option<u64> {
        if self.free.is_empty() && self.used == self.pages.len() as u64 * PER_PAGE {
            self.sweep();
        }
        match self.free.pop() {
            Some(n) => Some(n),
            None => {
                if self.used == self.pages.len() as u64 * PER_PAGE {
                    self.grow()?;
                }
                self.used += 1;
                Some(self.used - 1)
            }
        }
    }

    /// Names entry `n` (free: its counts zero) for `key`, holding `held` references: the
    /// offset, which marks an entry as used, last.
    fn write_key(&mut self, n: u64, key: Key, held: u64) {
        if let Some((pool, e)) = self.entry(n) {
            pool.word(e).store(key.arena, Ordering::Relaxed);
            pool.word(e + 8).store(
                key.pool as u64 | (key.generation as u64) << 32,
                Ordering::Relaxed,
            );
            pool.word(e + 24).store(held, Ordering::Relaxed);
            pool.word(e + 16).store(key.off, Ordering::Relaxed);
        }
        self.index.insert(key, n);
    }

    /// A new entry for `key` (counts zero).
    fn add(&mut self, key: Key) -> Option<u64> {
        let n = self.reserve()?;
        self.write_key(n, key, 0);
        Some(n)
    }

    /// Applies `d` to entry `n` (of `key`); an entry left counting nothing is freed.
    fn apply(&mut self, key: Key, n: u64, d: Delta) {
        let Some((pool, e)) = self.entry(n) else {
            return;
        };
        let w = |i: u64| pool.word(e + 8 * i);
        // (One writer: plain read-then-store of each count. Adoptions before the reference they
        // bring, so a kill in between never counts the reference without its adoption.)
        if d.took > 0 {
            w(5).store(w(5).load(Ordering::Relaxed) + d.took, Ordering::Relaxed);
        }
        if d.held != 0 {
            let held = w(3).load(Ordering::Relaxed).saturating_add_signed(d.held);
            w(3).store(held, Ordering::Relaxed);
        }
        if d.lent > 0 {
            w(4).store(w(4).load(Ordering::Relaxed) + d.lent, Ordering::Relaxed);
        }
        if (3..6).all(|i| w(i).load(Ordering::Relaxed) == 0) {
            w(2).store(0, Ordering::Relaxed);
            self.index.remove(&key);
            self.free.push(n);
        }
    }

    /// A new page, linked after the last.
    fn grow(&mut self) -> Option<()> {
        if self.pages.len() >= MAX_PAGES {
            return None;
        }
        let home = self.home.as_ref()?;
        let (pool, payload) = new_page(home).ok()?;
        let &(lp, lpay) = self.pages.last()?;
        home.pool(lp)?
            .word(lpay + 8)
            .store(page_ref(pool, payload), Ordering::Release);
        self.pages.push((pool, payload));
        Some(())
    }

    /// Forgets entries that hold no reference and whose object is gone (freed: nothing of them
    /// is left to settle), to make room.
    fn sweep(&mut self) {
        let dead: Vec<(Key, u64)> = self
            .index
            .iter()
            .filter(|(k, _)| !self.alive(k))
            .map(|(k, n)| (*k, *n))
            .collect();
        for (key, n) in dead {
            let Some((pool, e)) = self.entry(n) else {
                continue;
            };
            if pool.word(e + 24).load(Ordering::Relaxed) != 0 {
                continue; // still held (a peer scribbled the header?): keep it
            }
            for i in [2, 3, 4, 5] {
                pool.word(e + 8 * i).store(0, Ordering::Relaxed);
            }
            self.index.remove(&key);
            self.free.push(n);
        }
    }

    fn alive(&self, k: &Key) -> bool {
        self.arenas
            .iter()
            .find(|a| a.id() == k.arena)
            .and_then(|a| a.pool(k.pool))
            .is_some_and(|p| is_live_of(p.word(k.off + LINK).load(Ordering::Relaxed), k.generation))
    }
}

/// A zeroed page in `home`, its header written: pool id and payload offset.
fn new_page(home: &Arena) -> Result<(u32, u64)> {
    let (pool, g) = home.grant(PAGE_BYTES as usize, 0)?;
    let payload = g.off + BLOCK_HDR;
    if !g.clean() {
        pool.zero(payload, PAGE_BYTES);
    }
    pool.word(payload + 16).store(PER_PAGE, Ordering::Relaxed);
    pool.word(payload).store(PAGE_MAGIC, Ordering::Release);
    Ok((pool.id(), payload))
}

fn free_page(home: &Arena, pool: u32, payload: u64) {
    if let Some(p) = home.pool(pool) {
        let _ = p.free_block(payload - BLOCK_HDR, false);
    }
}

/// What a session's server lent its client and adopted of the client's lends (see the module
/// docs), by object.
#[derive(Debug, Default)]
pub(crate) struct PeerLends {
    gave: HashMap<Key, u64>,
    got: HashMap<Key, u64>,
    /// Size after the last sweep (the next comes at twice as many).
    swept: usize,
}

impl PeerLends {
    /// The server lent the object of `key` to the client.
    pub(crate) fn gave(&mut self, key: Key, arenas: &[&Arena]) {
        *self.gave.entry(key).or_default() += 1;
        self.sweep(arenas);
    }

    /// The server adopted a lend of the client's, of the object of `key`.
    pub(crate) fn got(&mut self, key: Key, arenas: &[&Arena]) {
        *self.got.entry(key).or_default() += 1;
        self.sweep(arenas);
    }

    /// Forgets objects that are gone (nothing of them is left to settle), now and then.
    fn sweep(&mut self, arenas: &[&Arena]) {
        if self.gave.len() + self.got.len() < (2 * self.swept).max(64) {
            return;
        }
        let alive = |k: &Key| {
            arenas
                .iter()
                .find(|a| a.id() == k.arena)
                .and_then(|a| a.pool(k.pool))
                .is_some_and(|p| {
                    is_live_of(p.word(k.off + LINK).load(Ordering::Relaxed), k.generation)
                })
        };
        self.gave.retain(|k, _| alive(k));
        self.got.retain(|k, _| alive(k));
        self.swept = self.gave.len() + self.got.len();
    }
}

/// An entry as read: the object, and its held, lent and took counts.
type Entry = (Key, [u64; 3]);

/// The dead client's ledger in `home` (its session arena), taken (so it is settled once): its
/// entries, and its pages (freed by the caller). Nothing if the client closed it or never kept
/// one. The pages are peer-written: the walk checks each is a live block of a page's size with
/// the magic, and stops at a repeat or at [`MAX_PAGES`].
fn take_ledger(home: &Arena) -> (Vec<Entry>, Vec<(u32, u64)>) {
    let mut root = 0;
    for pool in home.pools() {
        root = pool.hdr().ledger.swap(0, Ordering::Acquire);
        if root != 0 {
            break;
        }
    }
    let (mut entries, mut pages) = (Vec::new(), Vec::new());
    let mut seen = HashSet::new();
    let mut next = root;
    while next != 0 && pages.len() < MAX_PAGES && seen.insert(next) {
        let (pool_id, payload) = split_ref(next);
        let Some(pool) = home.pool(pool_id) else {
            break;
        };
        let ok = (BLOCK_HDR..MAX_POOL_BYTES).contains(&payload)
            && pool
                .block_at(payload - BLOCK_HDR)
                .is_ok_and(|(_, cap)| cap >= PAGE_BYTES)
            && pool.word(payload).load(Ordering::Acquire) == PAGE_MAGIC;
        if !ok {
            break;
        }
        pages.push((pool_id, payload));
        let n = pool
            .word(payload + 16)
            .load(Ordering::Relaxed)
            .min(PER_PAGE);
        for i in 0..n {
            let e = payload + 8 * (HDR_WORDS + i * ENTRY_WORDS);
            let w = |k: u64| pool.word(e + 8 * k).load(Ordering::Relaxed);
            if w(2) == 0 {
                continue;
            }
            let key = Key {
                arena: w(0),
                pool: w(1) as u32,
                off: w(2),
                generation: (w(1) >> 32) as u32,
            };
            entries.push((key, [w(3), w(4), w(5)]));
        }
        next = pool.word(payload + 8).load(Ordering::Acquire);
    }
    (entries, pages)
}

/// Settles the references of a session's client that died (see the module docs): its ledger in
/// `home` (the session arena), against what the server lent it and adopted of its lends
/// (`lends`), in `arenas` (the session's). Returns how many references were given back.
pub(crate) fn settle(home: &Arena, arenas: &[&Arena], lends: &PeerLends) -> u64 {
    let (entries, pages) = take_ledger(home);
    if pages.is_empty() {
        return 0;
    }
    let mut given = 0;
    let mut seen = HashSet::new();
    let count = |m: &HashMap<Key, u64>, k: &Key| m.get(k).copied().unwrap_or(0);
    for (key, [held, lent, took]) in entries {
        if !seen.insert(key) {
            continue; // a repeated key (peer-written pages): settled once
        }
        let tickets = lent.saturating_sub(count(&lends.got, &key))
            + count(&lends.gave, &key).saturating_sub(took);
        given += give_back(arenas, key, tickets, held);
    }
    for (key, &n) in &lends.gave {
        if !seen.contains(key) {
            given += give_back(arenas, *key, n, 0);
        }
    }
    for (pool, payload) in pages {
        free_page(home, pool, payload);
    }
    given
}

/// Takes back up to `tickets` outstanding lends of the object of `key` and gives them back with
/// `held` references (see [`settle_refs`]).
fn give_back(arenas: &[&Arena], key: Key, tickets: u64, held: u64) -> u64 {
    let Some(arena) = arenas.iter().find(|a| a.id() == key.arena) else {
        return 0;
    };
    let r = BlockRef {
        pool: key.pool,
        offset: key.off + BLOCK_HDR,
        generation: key.generation,
    };
    let Ok((pool, off, info, cap)) = arena.live_block(r) else {
        return 0;
    };
    let published = info & FLAG_HANDLE != 0
        && is_live_of(
            pool.word(off + LINK).load(Ordering::Acquire),
            key.generation,
        );
    if !published {
        // Killed while making it (recorded, not yet borrowable): the block is its alone.
        if held > 0 {
            let _ = pool.free_block(off, false);
            return 1;
        }
        return 0;
    }
    let n = settle_refs(pool, off, key.generation, tickets, held);
    for _ in 0..n {
        arena.give_back(pool, off, cap, key.generation);
    }
    n
}

#[cfg(test)]
mod tests;
