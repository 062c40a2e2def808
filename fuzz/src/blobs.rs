//! Handle blobs a peer sends ([`LendBlob`]s of [`ShmHandle`]s and of messages): real lends of
//! the fixture's objects and messages with the input's bits flipped, and raw byte strings,
//! parsed (`LendBlob::from_bytes`), borrowed as one of several types, or given back
//! (`release_blob`), through the arena that made them or a second view joined from its fd (as
//! another process holds it).
//!
//! Oracles: no panic; a borrow that succeeds reads the value the object was made with (a blob
//! borrowed as the wrong type, or pointing elsewhere, would not); every reference count and the
//! arena's block count are back to the baseline after the input (see
//! [`fixture`](crate::fixture)).

use std::sync::atomic::{AtomicU64, Ordering};

use flowipc::shm::{Arena, LendBlob, ShmHandle};

use crate::fixture::{self, Fixture, COUNTER, QUAD};
use crate::{Input, Program, Seed};

const OP_BORROW: u8 = 0;
const OP_RELEASE: u8 = 1;
const OP_RAW: u8 = 2;
const OP_DROP: u8 = 3;
const OPS: u8 = 4;

/// What a successful borrow holds.
enum Held {
    Counter(ShmHandle<AtomicU64>),
    Quad(ShmHandle<[u64; 4]>),
}

impl Held {
    /// Another handle to the same object (a clone), its value checked.
    fn clone_checked(&self) -> Held {
        match self {
            Held::Counter(c) => {
                assert_eq!(c.load(Ordering::Relaxed), COUNTER);
                Held::Counter(c.clone())
            }
            Held::Quad(q) => {
                assert_eq!(**q, QUAD);
                Held::Quad(q.clone())
            }
        }
    }
}

/// A fresh lend of what `k` names: the counter, the four words, or a message (two kinds).
fn lend(fx: &mut Fixture, k: u8) -> LendBlob {
    match k % 4 {
        0 | 1 => fx.lend_obj(usize::from(k % 2)),
        _ => fx.lend_msg(usize::from(k % 2)).0,
    }
}

/// Borrows `bytes` as the type `t` picks through `arena`, checking the value read.
fn borrow(arena: &Arena, bytes: &[u8], t: u8, held: &mut Vec<Held>) {
    let Ok(blob) = LendBlob::from_bytes(bytes) else {
        return;
    };
    match t % 3 {
        0 => {
            if let Ok(h) = arena.borrow::<AtomicU64>(&blob) {
                assert_eq!(
                    h.load(Ordering::Relaxed),
                    COUNTER,
                    "a borrow reads another object"
                );
                held.push(Held::Counter(h));
            }
        }
        1 => {
            if let Ok(h) = arena.borrow::<[u64; 4]>(&blob) {
                assert_eq!(*h, QUAD, "a borrow reads another object");
                held.push(Held::Quad(h));
            }
        }
        _ => {
            if let Ok(h) = arena.borrow::<u8>(&blob) {
                panic!("no object of type u8 exists, yet one was borrowed: {h:?}");
            }
        }
    }
}

/// One input: a setup byte (bit 0: borrow through the second view), then operations.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let setup = inp.u8();
    fixture::with(|fx| {
        let arena = if setup & 1 != 0 {
            fx.view.clone()
        } else {
            fx.arena.clone()
        };
        let mut held = Vec::new();
        while let Some(op) = inp.op(OPS) {
            match op {
                OP_BORROW => {
                    let (k, t) = (inp.u8(), inp.u8());
                    let mask: [u8; 32] = inp.array();
                    let blob = flip(lend(fx, k).as_bytes(), &mask);
                    borrow(&arena, &blob, t, &mut held);
                }
                OP_RELEASE => {
                    let k = inp.u8();
                    let mask: [u8; 32] = inp.array();
                    let blob = flip(lend(fx, k).as_bytes(), &mask);
                    if let Ok(blob) = LendBlob::from_bytes(&blob) {
                        let _ = arena.release_blob(&blob);
                    }
                }
                OP_RAW => {
                    let t = inp.u8();
                    let bytes = inp.chunk();
                    borrow(&arena, bytes, t, &mut held);
                    if let Ok(blob) = LendBlob::from_bytes(bytes) {
                        let _ = arena.release_blob(&blob);
                    }
                }
                OP_DROP => {
                    // Drops one held handle, or clones it first (a clone and a drop).
                    let i = usize::from(inp.u8());
                    if !held.is_empty() {
                        let h = held.swap_remove(i % held.len());
                        if i & 1 != 0 {
                            held.push(h.clone_checked());
                        }
                    }
                }
                _ => {}
            }
        }
        drop(held);
        fx.settle();
    });
}

/// `a` with `mask` xor-ed in.
fn flip(a: &[u8; 32], mask: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ mask[i])
}

/// Seeds: every fixture lend borrowed as its own type and as the others, given back, and as raw
/// bytes (the real blob of the counter), through either view.
pub fn seeds() -> Vec<Seed> {
    let counter = fixture::with(|fx| {
        let b = *fx.lend_obj(0).as_bytes();
        fx.settle();
        b
    });
    let mut seeds = Vec::new();
    for setup in [0u8, 1] {
        let mut p = Program::new();
        p.u8(setup);
        for k in 0..4u8 {
            for t in 0..3u8 {
                p.u8(OP_BORROW).u8(k).u8(t).bytes(&[0; 32]);
            }
            p.u8(OP_RELEASE).u8(k).bytes(&[0; 32]);
        }
        p.u8(OP_DROP).u8(1);
        // The raw blob names this process's arena (its tag differs elsewhere: a foreign blob).
        p.u8(OP_RAW).u8(0).chunk(&counter);
        seeds.push((format!("view{setup}"), p.finish()));
    }
    seeds
}
