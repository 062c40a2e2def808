//! The ledger within one process: a "client" instance of each arena (joined from the server's
//! fds, recording in a ledger) whose handles are forgotten as a killed process's would be, and
//! the "server" instances that settle. (Across processes: `tests/session_kills.rs`.)

use std::sync::{Arc, Mutex};

use super::*;
use crate::shm::{ArenaConfig, ShmHandle};

fn arena() -> Arena {
    Arena::create(ArenaConfig::new().pool_size(4 << 20).max_pools(1)).unwrap()
}

/// Another instance of `a`, as a joining process has.
fn joined(a: &Arena) -> Arena {
    let fd = a.pool_fd(0).unwrap().try_clone_to_owned().unwrap();
    Arena::join([fd], ArenaConfig::new().max_pools(1)).unwrap()
}

struct Client {
    home: Arena,
    app: Arena,
    ledger: Arc<Ledger>,
}

fn client(home: &Arena, app: &Arena) -> Client {
    let (home, app) = (joined(home), joined(app));
    let ledger = Ledger::open(&home).unwrap();
    ledger.keep_for(&home);
    ledger.keep_for(&app);
    Client { home, app, ledger }
}

/// What dead "processes" left: kept reachable (not dropped: a dead process runs nothing; not
/// forgotten: LeakSanitizer would report it).
static GRAVE: Mutex<Vec<Box<dyn std::any::Any + Send>>> = Mutex::new(Vec::new());

fn bury<T: Send + 'static>(what: T) {
    lock(&GRAVE).push(Box::new(what));
}

impl Client {
    /// The process dies: nothing of it runs any more (its ledger is never closed; the
    /// instances stay mapped, as the test process goes on).
    fn dies(self) {
        bury(self);
    }
}

#[test]
fn a_dead_clients_references_and_unadopted_lends_are_given_back() {
    let (home, app) = (arena(), arena());
    let c = client(&home, &app);
    let mut lends = PeerLends::default();
    let arenas = [&home, &app];

    // The client makes an object, clones it, lends it twice; the server adopts one lend.
    let a: ShmHandle<[u64; 2]> = c.app.construct([1, 2]).unwrap();
    let a2 = a.clone();
    let (l1, _l2) = (a.lend(), a.lend());
    let server_a: ShmHandle<[u64; 2]> = app.borrow(&l1).unwrap();
    lends.got(server_a.key(), &arenas);
    // One in the session arena, never lent.
    let s: ShmHandle<u64> = c.home.construct(5).unwrap();
    // The server lends its own object twice; the client adopts one.
    let own: ShmHandle<u64> = app.construct(9).unwrap();
    let (g1, _g2) = (own.lend(), own.lend());
    lends.gave(own.key(), &arenas);
    lends.gave(own.key(), &arenas);
    let took: ShmHandle<u64> = c.app.borrow(&g1).unwrap();
    assert_eq!((a.ref_count(), own.ref_count()), (4, 3));
    let blocks = |x: &Arena| x.stats().blocks_in_use;
    assert_eq!(
        (blocks(&app), blocks(&home)),
        (2, 2),
        "objects; s and a page"
    );

    bury((a, a2, s, took));
    c.dies();
    // Handles held: a twice, s, own once; lends unadopted: a once (2 lent, 1 got), own once.
    assert_eq!(settle(&home, &arenas, &lends), 6);
    assert_eq!(server_a.ref_count(), 1, "the server's borrow stays");
    assert_eq!(*server_a, [1, 2]);
    assert_eq!(own.ref_count(), 1);
    assert_eq!(blocks(&home), 0, "s and the ledger's page are freed");
    assert_eq!(settle(&home, &arenas, &lends), 0, "settled once");
    drop((server_a, own));
    assert_eq!(blocks(&app), 0);
}

#[test]
fn a_ledger_grows_past_a_page_reuses_entries_and_closes_clean() {
    let (home, app) = (arena(), arena());
    let c = client(&home, &app);
    let n = PER_PAGE as usize * 2 + 5;
    let objs: Vec<ShmHandle<u64>> = (0..n as u64).map(|i| c.app.construct(i).unwrap()).collect();
    let pages = lock(&c.ledger.inner).pages.len();
    assert_eq!(pages, 3);
    drop(objs);
    assert_eq!(lock(&c.ledger.inner).index.len(), 0, "entries freed");
    let again: Vec<ShmHandle<u64>> = (0..n as u64).map(|i| c.app.construct(i).unwrap()).collect();
    assert_eq!(lock(&c.ledger.inner).pages.len(), 3, "entries reused");
    // The client ends its session alive: nothing to settle, the pages go, the objects stay.
    c.ledger.close();
    assert_eq!(home.stats().blocks_in_use, 0);
    assert_eq!(settle(&home, &[&home, &app], &PeerLends::default()), 0);
    assert_eq!(*again[7], 7);
    drop(again);
    assert_eq!(app.stats().blocks_in_use, 0);
}

#[test]
fn a_client_killed_while_making_an_object_has_its_block_freed() {
    let (home, app) = (arena(), arena());
    let c = client(&home, &app);
    // Recorded, killed before publication: the block is allocated, not borrowable.
    let _ = c.ledger.gain_new(|| {
        let (pool, g) = c.app.grant(64, 0)?;
        let key = Key {
            arena: c.app.id(),
            pool: pool.id(),
            off: g.off,
            generation: g.generation(),
        };
        Ok((key, ()))
    });
    assert_eq!(app.stats().blocks_in_use, 1);
    c.dies();
    assert_eq!(settle(&home, &[&home, &app], &PeerLends::default()), 1);
    assert_eq!(app.stats().blocks_in_use, 0);
}
