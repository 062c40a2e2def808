//! Loom models of settling a dead session peer's references (`shm::ledger`): the server takes
//! back the dead client's lends nobody adopted and gives back the references its ledger says it
//! held ([`settle_refs`], as production runs it), while the server's own threads still borrow
//! the client's lends and drop what they borrowed. The object is the parent file's [`Obj`]: its
//! value is a `loom::cell::UnsafeCell`, so a settlement that frees it under a reader is reported,
//! and it counts its frees.

use flowipc::shm::lockfree::ticket_take;
use flowipc::shm::protocols::settle_refs;
use loom::sync::atomic::Ordering::Relaxed;
use loom::sync::Arc;
use loom::thread;

use super::{model, Obj, GEN, OBJ};

/// The dead client made the object, lent it twice and dropped its handle; the server adopted
/// the first lend at once. Then, at the same time: a server thread borrows the second blob
/// (which arrived late), reads and drops it; another drops the server's first handle after
/// reading; and the settlement takes back the lends the server did not adopt through the session
/// (lent 2, adopted 1: up to one ticket). Whoever comes first gets the second lend's reference
/// (the late borrower or the settlement, never both), nothing is freed under a reader, and the
/// object is freed exactly once, after everyone.
#[test]
fn settle_races_borrow_and_drop() {
    model(|| {
        let obj = Arc::new(Obj::new(false));
        obj.lend();
        obj.lend();
        // The server's first adoption, before the death; the client's handle is dropped.
        assert!(ticket_take(obj.word(), GEN));
        obj.adopted.fetch_add(1, Relaxed);
        obj.release();
        let o = obj.clone();
        let late = thread::spawn(move || o.borrow() as u64);
        let o = obj.clone();
        let dropper = thread::spawn(move || {
            o.read();
            o.release();
        });
        // The settlement: the ledger says held 0, lent 2; the session adopted 1.
        let n = settle_refs(&obj.mem, OBJ, GEN, 2 - 1, 0);
        for _ in 0..n {
            obj.release();
        }
        let borrowed = late.join().unwrap();
        dropper.join().unwrap();
        assert_eq!(
            n + borrowed,
            1,
            "the second lend was taken {} times (settled {n}, borrowed {borrowed})",
            n + borrowed
        );
        obj.assert_freed();
    });
}

/// As above with the client's handle still held when it died (the ledger says held 1): the
/// settlement gives it back too, whatever the late borrower and the server's drop do meanwhile.
#[test]
fn settle_gives_back_a_held_handle_racing_a_borrow() {
    model(|| {
        let obj = Arc::new(Obj::new(false));
        obj.lend();
        obj.lend();
        assert!(ticket_take(obj.word(), GEN));
        obj.adopted.fetch_add(1, Relaxed);
        let o = obj.clone();
        let late = thread::spawn(move || o.borrow() as u64);
        let o = obj.clone();
        let dropper = thread::spawn(move || {
            o.read();
            o.release();
        });
        let n = settle_refs(&obj.mem, OBJ, GEN, 2 - 1, 1);
        for _ in 0..n {
            obj.release();
        }
        let borrowed = late.join().unwrap();
        dropper.join().unwrap();
        assert_eq!(n + borrowed, 2, "settled {n}, borrowed {borrowed}");
        obj.assert_freed();
    });
}

/// A client that died holding a clone and a lend nobody took, of an object the server also
/// holds: the settlement gives back both, racing the server's own drop; the last of the three
/// releases frees, after the server's read.
#[test]
fn settle_races_the_last_drop() {
    model(|| {
        let obj = Arc::new(Obj::new(false));
        flowipc::shm::lockfree::rc_acquire(obj.word()); // the client's clone
        obj.lend(); // to the server, which adopts it
        assert!(ticket_take(obj.word(), GEN));
        obj.lend(); // never sent
        let o = obj.clone();
        let server = thread::spawn(move || {
            o.read();
            o.release();
        });
        let n = settle_refs(&obj.mem, OBJ, GEN, 1, 2);
        assert_eq!(n, 3, "two handles and one lend");
        for _ in 0..n {
            obj.release();
        }
        server.join().unwrap();
        obj.assert_freed();
    });
}
