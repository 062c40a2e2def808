//! Loom models of pool publication: how an arena grows by a pool and how the other threads of
//! the process find it ([`PoolTable`], which `Arena` keeps its pools in), how pool ids stay
//! unique ([`claim_pool_id`], over pool 0's `next_pool_id`), how growth stays under the arena's
//! byte limit ([`claim_up_to`], over pool 0's `pool_bytes`), and the pool header's magic word
//! ([`publish_header`] / [`header_published`], as `Pool::create` and `Pool::open` use them).
//!
//! A model pool stands for a `Pool`: a few header words (loom atomics written `Relaxed`, as
//! `Pool::create` writes the real header) and a payload in a `loom::cell::UnsafeCell` (what the
//! creating thread wrote into the pool's memory or its process-local fields before publishing
//! it). A reader that finds the pool reads both, so loom reports a pool found before it was
//! fully written.
//!
//! Assumed, not modelled: across processes, the kernel's fd passing (`sendmsg` of the fd after
//! `Pool::create` returned, `recvmsg` before `Pool::open`) orders the creator's writes before the
//! peer's open. The header model shows that even without that ordering an open either refuses
//! the pool (no magic yet) or sees every field.

use flowipc::shm::layout::{LAYOUT_VERSION, MAGIC};
use flowipc::shm::publish::{
    claim_pool_id, claim_up_to, header_published, publish_header, PoolTable, Refused,
};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use loom::sync::Arc;
use loom::thread;

use super::model;

/// Header words of a model pool (as in `PoolHeader`): magic, version, id.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_ID: usize = 2;

/// A model pool.
struct P {
    hdr: [AtomicU64; 3],
    payload: UnsafeCell<u64>,
}

/// What the creator of pool `id` writes into its payload.
fn contents(id: u32) -> u64 {
    1000 + u64::from(id)
}

impl P {
    /// `Pool::create` of pool `id`: the header fields, then the magic, then (the process-local
    /// part of a pool, and whatever the creating thread writes before it publishes the pool) the
    /// payload.
    fn create(id: u32) -> Box<P> {
        let p = Box::new(P {
            hdr: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            payload: UnsafeCell::new(0),
        });
        p.hdr[H_VERSION].store(u64::from(LAYOUT_VERSION), Relaxed);
        p.hdr[H_ID].store(u64::from(id), Relaxed);
        publish_header(&p.hdr[H_MAGIC], MAGIC);
        p.payload.with_mut(|v| {
            // SAFETY: loom checks that this write is ordered with every other access.
            unsafe { *v = contents(id) }
        });
        p
    }

    /// What a thread that found the pool checks: a valid header and the creator's contents.
    fn check(&self, id: u32) {
        assert!(
            header_published(&self.hdr[H_MAGIC], MAGIC),
            "pool {id} found without its magic"
        );
        assert_eq!(self.hdr[H_VERSION].load(Relaxed), u64::from(LAYOUT_VERSION));
        assert_eq!(self.hdr[H_ID].load(Relaxed), u64::from(id));
        let v = self.payload.with(|v| {
            // SAFETY: loom checks that this read is ordered with every write.
            unsafe { *v }
        });
        assert_eq!(v, contents(id), "pool {id} found half-initialized");
    }
}

/// `Arena::pools`: the ids of the pools a scan finds, each checked whole.
fn scan(table: &PoolTable<P>) -> Vec<u32> {
    table
        .iter()
        .map(|p| {
            let id = p.hdr[H_ID].load(Relaxed) as u32;
            p.check(id);
            id
        })
        .collect()
}

/// An arena of three pool slots with pool 0 in it (as `Arena::create` leaves it).
fn arena() -> Arc<PoolTable<P>> {
    let t = PoolTable::new(3);
    t.insert(0, P::create(0)).unwrap();
    Arc::new(t)
}

/// Model 1, growth seen by lookups: one thread grows the arena by pool 1 while another looks it
/// up by id (an allocation through the hint, `Arena::pool`, a `BlockRef`'s pool) and a third
/// scans the pools (`Arena::pools`: allocation elsewhere, sends, stats). Whoever finds pool 1
/// finds it fully initialized. The looker-up (which waits for it) then also reads a count that
/// includes it and a scan bound that covers it, so a channel that allocated in the pool announces
/// it before the handle (its count check fires, its scan finds the pool).
#[test]
fn growth_seen_initialized() {
    model(|| {
        let table = arena();
        let grower = {
            let table = table.clone();
            thread::spawn(move || {
                table.insert(1, P::create(1)).unwrap();
            })
        };
        let by_id = {
            let table = table.clone();
            thread::spawn(move || loop {
                if let Some(p) = table.get(1) {
                    p.check(1);
                    assert!(table.count() >= 2, "pool 1 found by id but not counted");
                    assert_eq!(scan(&table), [0, 1], "pool 1 found by id but not by a scan");
                    break;
                }
                thread::yield_now();
            })
        };
        // The scan looks once (a second spinning thread would only multiply the executions):
        // loom runs it both before and after the growth. What it finds is whole.
        let ids = scan(&table);
        assert!(ids == [0] || ids == [0, 1], "scan found {ids:?}");
        grower.join().unwrap();
        by_id.join().unwrap();
        assert_eq!((table.count(), table.known()), (2, 2));
    });
}

/// Model 2, two growths at once (two processes, or growth racing `add_pool` here): each claims
/// an id from pool 0's counter and publishes its pool. The ids differ, the counter never passes
/// the limit (a third claim fails), and both pools end up published and counted.
#[test]
fn concurrent_growth_unique_ids() {
    model(|| {
        let table = arena();
        let next = Arc::new(AtomicU32::new(1));
        let growers: Vec<_> = (0..2)
            .map(|_| {
                let (table, next) = (table.clone(), next.clone());
                thread::spawn(move || {
                    let id = claim_pool_id(&next, 3).expect("an id below the limit");
                    table.insert(id, P::create(id)).unwrap();
                    table.get(id).unwrap().check(id);
                    id
                })
            })
            .collect();
        let mut ids: Vec<u32> = growers.into_iter().map(|g| g.join().unwrap()).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2]);
        assert_eq!(claim_pool_id(&next, 3), None);
        assert_eq!(next.load(Relaxed), 3);
        for id in 0..3 {
            table.get(id).unwrap().check(id);
        }
        assert_eq!((table.count(), table.known()), (3, 3));
    });
}

/// Model 2b, two growths claiming pool bytes at once under the arena's byte limit: 5 units left,
/// each wants 3 and needs at least 2. Whichever claims first gets 3, the other the 2 that are
/// left; the claims never sum past the limit, and a third claim finds no room.
#[test]
fn concurrent_growth_stays_under_the_byte_limit() {
    model(|| {
        let total = Arc::new(AtomicU64::new(0));
        let growers: Vec<_> = (0..2)
            .map(|_| {
                let total = total.clone();
                thread::spawn(move || claim_up_to(&total, 2, 3, 5, 1))
            })
            .collect();
        let mut got: Vec<Option<u64>> = growers.into_iter().map(|g| g.join().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, [Some(2), Some(3)]);
        assert_eq!(total.load(Relaxed), 5);
        assert_eq!(claim_up_to(&total, 1, 1, 5, 1), None);
    });
}

/// Model 3, the same pool added twice at once (two `add_pools_from` of one share): one insert
/// wins, the other is refused and drops its copy, and the count ends exact. A looker-up meanwhile
/// sees the winner's pool whole.
#[test]
fn same_pool_added_twice() {
    model(|| {
        let table = arena();
        let adders: Vec<_> = (0..2)
            .map(|_| {
                let table = table.clone();
                thread::spawn(move || table.insert(1, P::create(1)))
            })
            .collect();
        loop {
            if let Some(p) = table.get(1) {
                p.check(1);
                assert!(table.count() >= 2);
                assert_eq!(scan(&table), [0, 1]);
                break;
            }
            thread::yield_now();
        }
        let mut results: Vec<_> = adders.into_iter().map(|a| a.join().unwrap()).collect();
        results.sort_by_key(|r| r.is_err());
        assert_eq!(results, [Ok(()), Err(Refused::Taken)]);
        assert_eq!(table.insert(3, P::create(3)), Err(Refused::OutOfRange));
        assert_eq!((table.count(), table.known()), (2, 2));
    });
}

/// Model 4, an open racing the create (a peer that got the fd by a route that orders nothing,
/// unlike the fd passing the crate uses): the open either sees no magic and refuses the pool, or
/// sees the magic and then every header field.
#[test]
fn open_races_create() {
    model(|| {
        let hdr = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        let creator = {
            let hdr = hdr.clone();
            thread::spawn(move || {
                hdr[H_VERSION].store(u64::from(LAYOUT_VERSION), Relaxed);
                hdr[H_ID].store(7, Relaxed);
                publish_header(&hdr[H_MAGIC], MAGIC);
            })
        };
        // Pool::open, retried until it accepts the pool.
        loop {
            if header_published(&hdr[H_MAGIC], MAGIC) {
                assert_eq!(hdr[H_VERSION].load(Relaxed), u64::from(LAYOUT_VERSION));
                assert_eq!(hdr[H_ID].load(Relaxed), 7);
                break;
            }
            thread::yield_now();
        }
        creator.join().unwrap();
    });
}
