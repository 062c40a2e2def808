//! Loom models of the shared-memory queue's protocols ([`flowipc::shm::ring`]): the SPSC byte
//! ring (`Producer::push`, `Consumer::pop`) and the doorbells that let either side sleep
//! (`arm_data` / `arm_space`, the wake that `push` / `pop` return, [`disarm`]).
//!
//! A model ring is a ring's four control words (loom atomics) and its bytes, one
//! `loom::cell::UnsafeCell<u8>` per byte ([`Cells`]): the producer writes them with `with_mut`,
//! the consumer reads them with `with`, so loom reports a byte read before its write is
//! published, or overwritten before its read is done, as a causality violation.
//!
//! How a sleep is modelled:
//! * `FUTEX`: [`Ring::futex_wait`] parks the sleeping thread until its bell no longer says
//!   `FUTEX` (as `FUTEX_WAIT` sleeps while the word holds the expected value), and the waker's
//!   `FUTEX_WAKE` is an `unpark` of that thread.
//! * `POLL`: the socket is a count of doorbell bytes ([`Ring::sock`]); the waker adds one and
//!   unparks the sleeper, whose `poll` parks until there is a byte.
//!
//! Loom's `park` never returns spuriously, and the real futex wait's timeout slice is left out,
//! so a lost wake-up leaves the sleeper parked for good. Rather than let that end in a deadlock
//! (which loom reports by aborting the whole test binary, other models' results included), the
//! waker unparks the sleeper once more when it is done: a sleeper that finds itself still not
//! woken then fails the model with "lost wake-up" ([`Ring::sleep_until`]).
//!
//! Loom supports `fence(SeqCst)`, which the handshake rests on (its `SeqCst` accesses are
//! modelled as `AcqRel`, but the protocol uses none).

use flowipc::shm::ring::{disarm, Consumer, Control, Producer, RingBytes, AWAKE, FUTEX, POLL};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use loom::sync::Arc;
use loom::thread::{self, Thread};

use super::model;

/// A ring's bytes, each in a cell whose accesses loom checks.
struct Cells {
    cells: Vec<UnsafeCell<u8>>,
}

impl RingBytes for Cells {
    fn cap(&self) -> u64 {
        self.cells.len() as u64
    }

    fn write_at(&self, off: usize, src: &[u8]) {
        for (cell, &b) in self.cells[off..off + src.len()].iter().zip(src) {
            cell.with_mut(|p| {
                // SAFETY: loom checks that this write is ordered with every other access to
                // the cell; a u8 has no invalid bit patterns.
                unsafe { *p = b }
            });
        }
    }

    fn read_at(&self, off: usize, dst: &mut [u8]) {
        for (cell, d) in self.cells[off..off + dst.len()].iter().zip(dst) {
            cell.with(|p| {
                // SAFETY: loom checks that this read is ordered with every write to the cell.
                *d = unsafe { *p };
            });
        }
    }
}

/// A ring in heap memory: the control words and the bytes.
struct Ring {
    tail: AtomicU64,
    head: AtomicU64,
    data_bell: AtomicU32,
    space_bell: AtomicU32,
    bytes: Cells,
    /// The sleeper's socket, as far as the models use it: doorbell bytes written, not yet read.
    sock: AtomicUsize,
    /// The waker thread has finished (and unparked the sleeper one last time).
    waker_done: AtomicBool,
}

impl Ring {
    /// An empty ring of `cap` bytes (a power of two), both bells `AWAKE`.
    fn new(cap: usize) -> Ring {
        assert!(cap.is_power_of_two());
        Ring {
            tail: AtomicU64::new(0),
            head: AtomicU64::new(0),
            data_bell: AtomicU32::new(AWAKE),
            space_bell: AtomicU32::new(AWAKE),
            bytes: Cells {
                cells: (0..cap).map(|_| UnsafeCell::new(0)).collect(),
            },
            sock: AtomicUsize::new(0),
            waker_done: AtomicBool::new(false),
        }
    }

    fn ctl(&self) -> Control<'_> {
        Control {
            tail: &self.tail,
            head: &self.head,
            data_bell: &self.data_bell,
            space_bell: &self.space_bell,
        }
    }

    fn cap(&self) -> u64 {
        self.bytes.cap()
    }

    /// `push` of `msg`, all of which must fit now; returns the wake it owes.
    fn push_all(&self, prod: &mut Producer, msg: &[u8]) -> u32 {
        let (n, mode) = prod.push(&self.ctl(), &self.bytes, &[msg]).unwrap();
        assert_eq!(n, msg.len(), "room for the whole message");
        mode
    }

    /// `pop` of exactly `want` bytes, which must be there now; returns them and the wake owed.
    fn pop_exact(&self, cons: &mut Consumer, want: usize) -> (Vec<u8>, u32) {
        let mut buf = vec![0; want];
        let (n, mode) = cons.pop(&self.ctl(), &self.bytes, &mut buf).unwrap();
        assert_eq!(n, want, "the bytes published before");
        (buf, mode)
    }

    /// Sleeps (parks) until `woken()` says so. Nothing but a wake unparks the sleeper, except
    /// the waker's last act ([`waker_finished`](Ring::waker_finished)): a sleeper that is not
    /// `woken()` then will never be, and the model fails with `lost` (rather than in a deadlock,
    /// which loom reports by aborting the whole test binary).
    fn sleep_until(&self, lost: &str, woken: impl Fn() -> bool) {
        loop {
            // Acquire: once the waker is done, `woken()` sees everything it did.
            let finished = self.waker_done.load(Acquire);
            if woken() {
                return;
            }
            assert!(!finished, "{lost}");
            thread::park();
        }
    }

    /// `futex::wait(bell, FUTEX)` without a timeout: sleeps until a waker took the bell (and
    /// unparked us).
    fn futex_wait(&self, bell: &AtomicU32) {
        self.sleep_until(
            "lost wake-up: the waker is done and the sleeper still waits on its futex",
            || bell.load(Relaxed) != FUTEX,
        );
    }

    /// `poll` on the socket: sleeps until a doorbell byte is there; with `read`, reads it.
    fn poll(&self, read: bool, lost: &str) {
        self.sleep_until(lost, || self.sock.load(Relaxed) > 0);
        if read {
            self.sock.fetch_sub(1, Relaxed);
        }
    }

    /// What a waker does with the mode a `push` or `pop` returned: wakes the sleeper through
    /// its futex (`FUTEX`), or writes a doorbell byte on the socket (`POLL`).
    fn wake(&self, mode: u32, sleeper: &Thread) {
        match mode {
            AWAKE => {}
            FUTEX => sleeper.unpark(),
            POLL => {
                self.sock.fetch_add(1, Relaxed);
                sleeper.unpark();
            }
            other => panic!("a push or pop returned bell value {other}"),
        }
    }

    /// The waker's last act: tells a sleeper that waits still that no wake will come.
    fn waker_finished(&self, sleeper: &Thread) {
        self.waker_done.store(true, Release);
        sleeper.unpark();
    }
}

/// Model 1, SPSC publish and consume: on a ring of 4 bytes, a producer pushes messages of 3, 3
/// and 2 bytes, each as two parts (as the transport pushes a header and a payload), so that they
/// wrap and a push may take only part of one, while a consumer pops up to 2 bytes at a time;
/// both spin while the ring is full or empty. The consumer must read
/// the stream in order and intact, loom checks every byte's read against its write (`tail`'s
/// `Release`/`Acquire`) and every overwrite against the read of the byte before (`head`'s).
#[test]
fn ring_spsc_publish_consume() {
    const STREAM: &[u8] = b"abcdefgh";
    model(|| {
        let ring = Arc::new(Ring::new(4));
        let r = ring.clone();
        let producer = thread::spawn(move || {
            let mut prod = Producer { tail: 0 };
            for msg in STREAM.chunks(3) {
                let mut sent = 0;
                while sent < msg.len() {
                    let (first, rest) = msg[sent..].split_at(1);
                    let (n, mode) = prod.push(&r.ctl(), &r.bytes, &[first, rest]).unwrap();
                    assert_eq!(mode, AWAKE, "nobody armed a bell");
                    sent += n;
                    if n == 0 {
                        thread::yield_now();
                    }
                }
            }
        });
        let mut cons = Consumer { head: 0 };
        let mut got = Vec::new();
        while got.len() < STREAM.len() {
            let mut buf = [0; 2];
            let (n, mode) = cons.pop(&ring.ctl(), &ring.bytes, &mut buf).unwrap();
            assert_eq!(mode, AWAKE, "nobody armed a bell");
            got.extend_from_slice(&buf[..n]);
            if n == 0 {
                thread::yield_now();
            }
        }
        assert_eq!(got, STREAM, "the stream arrived out of order or damaged");
        producer.join().unwrap();
        assert_eq!(cons.available(&ring.ctl(), ring.cap()), Ok(0));
    });
}

/// Model 2, no lost wake-up on the data bell: a producer pushes three 1-byte messages, waking
/// the consumer as each push says; the consumer reads until it has them all, and whenever the ring is
/// empty it arms the data bell in `FUTEX` mode, sleeps if the re-check says so, and takes the
/// bell back. A push that does not see the armed bell while the re-check does not see the push
/// leaves the consumer asleep for good.
///
/// (In models 2 to 4 the sleeper is the spawned thread: loom's `unpark` must not reach a thread
/// blocked in `join`.)
#[test]
fn ring_data_bell_no_lost_wakeup() {
    const STREAM: &[u8] = b"abc";
    model(|| {
        let ring = Arc::new(Ring::new(4));
        let r = ring.clone();
        let consumer = thread::spawn(move || {
            let mut cons = Consumer { head: 0 };
            let mut got = Vec::new();
            while got.len() < STREAM.len() {
                let mut buf = [0; 4];
                let (n, mode) = cons.pop(&r.ctl(), &r.bytes, &mut buf).unwrap();
                assert_eq!(mode, AWAKE, "the producer never sleeps here");
                got.extend_from_slice(&buf[..n]);
                if n > 0 {
                    continue;
                }
                if cons.arm_data(&r.ctl(), r.cap(), FUTEX).unwrap() {
                    r.futex_wait(&r.data_bell);
                }
                disarm(&r.data_bell);
            }
            assert_eq!(got, STREAM);
        });
        let sleeper = consumer.thread();
        let mut prod = Producer { tail: 0 };
        for msg in STREAM.chunks(1) {
            let mode = ring.push_all(&mut prod, msg);
            assert!(mode == AWAKE || mode == FUTEX, "bell value {mode}");
            ring.wake(mode, sleeper);
        }
        ring.waker_finished(sleeper);
        consumer.join().unwrap();
    });
}

/// Model 3, no lost wake-up on the space bell: the ring (4 bytes) starts full; the producer
/// pushes two 2-byte messages, and while the ring is full it arms the space bell in `FUTEX`
/// mode, sleeps if the re-check says so, and takes the bell back; meanwhile the consumer pops the
/// ring 2 bytes at a time, twice, waking the producer as each pop says (so the second message
/// waits for the second pop's wake alone). Then the stream must be intact.
#[test]
fn ring_space_bell_no_lost_wakeup() {
    model(|| {
        let ring = Arc::new(Ring::new(4));
        let mut prod = Producer { tail: 0 };
        assert_eq!(ring.push_all(&mut prod, b"abcd"), AWAKE);
        let r = ring.clone();
        let producer = thread::spawn(move || {
            for msg in [b"ef", b"gh"] {
                loop {
                    let (n, mode) = prod.push(&r.ctl(), &r.bytes, &[&msg[..]]).unwrap();
                    assert_eq!(mode, AWAKE, "the consumer never sleeps here");
                    if n > 0 {
                        assert_eq!(n, 2, "a pop frees 2 bytes");
                        break;
                    }
                    if prod
                        .arm_space(&r.ctl(), r.cap(), FUTEX, msg.len() as u64)
                        .unwrap()
                    {
                        r.futex_wait(&r.space_bell);
                    }
                    disarm(&r.space_bell);
                }
            }
        });
        let sleeper = producer.thread();
        let mut cons = Consumer { head: 0 };
        for want in [b"ab", b"cd"] {
            let (got, mode) = ring.pop_exact(&mut cons, 2);
            assert_eq!(got, want);
            assert!(mode == AWAKE || mode == FUTEX, "bell value {mode}");
            ring.wake(mode, sleeper);
        }
        ring.waker_finished(sleeper);
        producer.join().unwrap();
        assert_eq!(ring.pop_exact(&mut cons, 4).0, b"efgh");
    });
}

/// Model 4, wakes owed and delivered (`POLL` mode): the consumer arms the data bell whenever the
/// ring is empty, polls its socket if the re-check says to sleep, and takes the bell back; the
/// producer pushes two messages and writes a doorbell byte whenever a push took the bell. So an
/// arming races a waker that may have taken the previous arming (its byte still on the way) or
/// loaded the bell before it was taken back and re-armed. [`disarm`] must return `AWAKE`
/// exactly for the armings a waker took: the consumer then reads the byte owed (waiting until
/// it comes: a wake announced but never sent fails the model), and no byte may be left over (a
/// wake sent but not announced).
#[test]
fn ring_disarm_accounts_for_wakes() {
    const STREAM: &[u8] = b"abc";
    model(|| {
        let ring = Arc::new(Ring::new(4));
        let r = ring.clone();
        let consumer = thread::spawn(move || {
            let mut cons = Consumer { head: 0 };
            let mut got = Vec::new();
            let mut owed = 0;
            while got.len() < STREAM.len() {
                let mut buf = [0; 4];
                let (n, _) = cons.pop(&r.ctl(), &r.bytes, &mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                if n > 0 {
                    continue;
                }
                if cons.arm_data(&r.ctl(), r.cap(), POLL).unwrap() {
                    r.poll(
                        false,
                        "lost wake-up: the producer is done, no doorbell byte came",
                    );
                }
                if disarm(&r.data_bell) == AWAKE {
                    r.poll(
                        true,
                        "disarm said a wake was owed, and no doorbell byte came",
                    );
                    owed += 1;
                }
            }
            assert_eq!(got, STREAM);
            owed
        });
        let sleeper = consumer.thread();
        let mut prod = Producer { tail: 0 };
        let mut sent = 0;
        for msg in STREAM.chunks(1) {
            let mode = ring.push_all(&mut prod, msg);
            assert!(mode == AWAKE || mode == POLL, "bell value {mode}");
            sent += usize::from(mode == POLL);
            ring.wake(mode, sleeper);
        }
        ring.waker_finished(sleeper);
        let owed = consumer.join().unwrap();
        assert_eq!(
            owed, sent,
            "wakes announced by disarm vs. doorbell bytes written"
        );
        assert_eq!(
            ring.sock.load(Relaxed),
            0,
            "a doorbell byte nobody was told about"
        );
    });
}
