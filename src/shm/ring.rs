//! The shared-memory queue's protocols: a single-producer single-consumer byte ring and the
//! doorbells that let either side sleep.
//!
//! A ring carries one direction of a channel's byte stream (the transport's frames, headers
//! and payloads, exactly as a socket would). Its producer and its consumer are in different
//! processes; each keeps its own position privately and publishes it in the ring's control
//! words, so a peer that scribbles on them cannot make us read or write outside the ring:
//!
//! * `tail` (written by the producer only): bytes published so far. The producer writes bytes
//!   at `tail % cap`, then stores the new `tail` with `Release`; the consumer loads it with
//!   `Acquire` before reading them.
//! * `head` (written by the consumer only): bytes consumed so far. The consumer copies bytes
//!   out, then stores the new `head` with `Release`; the producer loads it with `Acquire`
//!   before overwriting them.
//!
//! Both are u64 byte counts that never wrap in practice (2^64 bytes). Each side checks what it
//! loads against its own position: `0 <= tail - head <= cap`, or [`RingError::Corrupt`].
//!
//! # Doorbells: sleeping without lost wake-ups
//!
//! Each ring has two bell words: `data_bell`, on which the consumer sleeps when the ring is
//! empty, and `space_bell`, on which the producer sleeps when it is full. A bell is
//! [`AWAKE`] (0), [`FUTEX`] (the sleeper waits in `FUTEX_WAIT` on the word) or [`POLL`] (it
//! waits in `poll` on its socket, and a wake is a byte on that socket). The handshake is the
//! classic store-fence-load pair on both sides:
//!
//! * sleeper: store its mode in the bell, `fence(SeqCst)`, re-check the ring (`tail` for data,
//!   `head` for space); if there is something after all, take the bell back and do not sleep;
//! * waker: publish (`tail` or `head`), `fence(SeqCst)`, load the bell; if it is not `AWAKE`,
//!   swap it to `AWAKE` and wake the sleeper the way the old value says.
//!
//! The two fences are ordered one way or the other: either the waker's load sees the mode (it
//! wakes the sleeper), or the sleeper's re-check sees the publication (it does not sleep).
//! When nobody sleeps the waker's fast path is the fence and one load: no system call. The
//! swap makes a wake happen at most once per arming, and a sleeper that takes its own bell
//! back learns from the swap whether a waker got there first (and so whether a wake is owed).
//!
//! The loom models in `loom-tests/ring.rs` check both protocols over heap memory.

use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};

/// Bell value: the owner is not sleeping (wakers do nothing).
pub const AWAKE: u32 = 0;
/// Bell value: the owner sleeps in `FUTEX_WAIT` on the bell word.
pub const FUTEX: u32 = 1;
/// Bell value: the owner sleeps in `poll` on its socket; a wake is a byte on that socket.
pub const POLL: u32 = 2;

/// What the shared control words of a ring hold that no correct peer would write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingError {
    /// The peer's published position is behind ours or more than a ring ahead of it.
    Corrupt {
        /// Our own position (the consumer's `head` or the producer's `tail`).
        ours: u64,
        /// What the peer published.
        theirs: u64,
    },
}

/// The bytes of a ring: a shared mapping in production, cells the model checker tracks under
/// loom.
pub trait RingBytes {
    /// Capacity in bytes (a power of two).
    fn cap(&self) -> u64;
    /// Copies `src` to offset `off` (`off + src.len() <= cap`). Called only by the producer,
    /// on bytes the protocol gives it.
    fn write_at(&self, off: usize, src: &[u8]);
    /// Copies from offset `off` into `dst` (`off + dst.len() <= cap`). Called only by the
    /// consumer, on bytes the protocol gives it.
    fn read_at(&self, off: usize, dst: &mut [u8]);
}

/// A ring's shared control words.
#[derive(Debug)]
pub struct Control<'a> {
    /// Bytes published (producer's).
    pub tail: &'a AtomicU64,
    /// Bytes consumed (consumer's).
    pub head: &'a AtomicU64,
    /// Where the consumer sleeps.
    pub data_bell: &'a AtomicU32,
    /// Where the producer sleeps.
    pub space_bell: &'a AtomicU32,
}

/// Checks a peer-published position `theirs` against our own `ours`, for a ring of `cap`:
/// the producer's tail is at most `cap` ahead of the consumer's head and never behind it.
fn distance(head: u64, tail: u64, cap: u64, ours: u64, theirs: u64) -> Result<u64, RingError> {
    match tail.checked_sub(head) {
        Some(d) if d <= cap => Ok(d),
        _ => Err(RingError::Corrupt { ours, theirs }),
    }
}

/// The producer's side of a ring: `tail` is its own position (kept privately).
#[derive(Debug)]
pub struct Producer {
    /// Bytes published so far (what `Control::tail` says, unless the peer scribbled on it).
    pub tail: u64,
}

impl Producer {
    /// Room for this many bytes now.
    pub fn space(&self, ctl: &Control<'_>, cap: u64) -> Result<u64, RingError> {
        let head = ctl.head.load(Ordering::Acquire);
        Ok(cap - distance(head, self.tail, cap, self.tail, head)?)
    }

    /// Copies as much of `parts` (in order) as fits and publishes it. Returns the bytes taken,
    /// and the bell value the consumer was sleeping with if it must be woken ([`AWAKE`]: no
    /// wake needed; the bell is taken, so exactly one waker wakes it).
    pub fn push<B: RingBytes + ?Sized, P: std::ops::Deref<Target = [u8]>>(
        &mut self,
        ctl: &Control<'_>,
        bytes: &B,
        parts: &[P],
    ) -> Result<(usize, u32), RingError> {
        let cap = bytes.cap();
        // Acquire: the consumer's reads of the bytes it freed happen before we overwrite them.
        let mut room = self.space(ctl, cap)?;
        let mut at = self.tail;
        let mut taken = 0usize;
        for p in parts {
            if room == 0 {
                break;
            }
            let n = (p.len() as u64).min(room) as usize;
            copy_in(bytes, at, &p[..n]);
            at += n as u64;
            room -= n as u64;
            taken += n;
        }
        if taken == 0 {
            return Ok((0, AWAKE));
        }
        self.tail = at;
        // Release: the bytes written above are visible to whoever acquires this tail.
        ctl.tail.store(at, Ordering::Release);
        Ok((taken, ring_if_asleep(ctl.data_bell)))
    }

    /// Arms the space bell with `mode` and re-checks: `true` if the ring still has no room for
    /// `need` bytes (at least 1, at most `cap`; sleep: the consumer's next pop wakes us),
    /// `false` if it has (do not sleep). Either way the owner takes the bell back with
    /// [`disarm`] once it runs again.
    pub fn arm_space(
        &self,
        ctl: &Control<'_>,
        cap: u64,
        mode: u32,
        need: u64,
    ) -> Result<bool, RingError> {
        arm(ctl.space_bell, mode);
        Ok(self.space(ctl, cap)? < need.clamp(1, cap))
    }
}

/// The consumer's side of a ring: `head` is its own position (kept privately).
#[derive(Debug)]
pub struct Consumer {
    /// Bytes consumed so far.
    pub head: u64,
}

impl Consumer {
    /// Bytes published and not yet consumed.
    pub fn available(&self, ctl: &Control<'_>, cap: u64) -> Result<u64, RingError> {
        let tail = ctl.tail.load(Ordering::Acquire);
        distance(self.head, tail, cap, self.head, tail)
    }

    /// Copies up to `dst.len()` published bytes out and frees them. Returns the bytes copied,
    /// and the bell value the producer was sleeping with if it must be woken ([`AWAKE`]: no
    /// wake needed).
    pub fn pop<B: RingBytes + ?Sized>(
        &mut self,
        ctl: &Control<'_>,
        bytes: &B,
        dst: &mut [u8],
    ) -> Result<(usize, u32), RingError> {
        // Acquire: the producer's writes of these bytes happen before we read them.
        let avail = self.available(ctl, bytes.cap())?;
        let n = (dst.len() as u64).min(avail) as usize;
        if n == 0 {
            return Ok((0, AWAKE));
        }
        copy_out(bytes, self.head, &mut dst[..n]);
        self.head += n as u64;
        // Release: our reads of the bytes happen before the producer overwrites them.
        ctl.head.store(self.head, Ordering::Release);
        Ok((n, ring_if_asleep(ctl.space_bell)))
    }

    /// Arms the data bell with `mode` and re-checks: `true` if the ring is still empty (sleep;
    /// the producer's next push wakes us), `false` if not (do not sleep). Either way the owner
    /// takes the bell back with [`disarm`] once it runs again.
    pub fn arm_data(&self, ctl: &Control<'_>, cap: u64, mode: u32) -> Result<bool, RingError> {
        arm(ctl.data_bell, mode);
        Ok(self.available(ctl, cap)? == 0)
    }
}

/// The sleeper's half of the handshake, before its re-check: the mode is stored, then a
/// `SeqCst` fence orders that store before the re-check's loads.
///
/// The store is a swap (whose result is not needed) so that every write to a bell is a
/// read-modify-write. The protocol does not need that, but the loom models do: loom orders a
/// plain store and another thread's concurrent read-modify-write only partially, and then lets
/// a later swap read either of them, which C11 forbids (a `disarm` would report a wake that no
/// waker took). The cost is nil next to the fence, on the path to a sleep.
fn arm(bell: &AtomicU32, mode: u32) {
    bell.swap(mode, Ordering::Relaxed);
    fence(Ordering::SeqCst);
}

/// Takes a bell back after waking up (or deciding not to sleep). Returns the value a waker
/// left: [`AWAKE`] means a waker took the bell first, so its wake (a futex wake, a byte on the
/// socket) is on its way or done; otherwise no waker came, and none will for this arming.
pub fn disarm(bell: &AtomicU32) -> u32 {
    bell.swap(AWAKE, Ordering::AcqRel)
}

/// The waker's half, after its publication: a `SeqCst` fence orders the publication before
/// the bell's load; a sleeping bell is taken (swapped to [`AWAKE`]), so one waker wakes it.
/// Returns the mode to wake ([`AWAKE`]: nobody sleeps).
fn ring_if_asleep(bell: &AtomicU32) -> u32 {
    fence(Ordering::SeqCst);
    if bell.load(Ordering::Relaxed) == AWAKE {
        return AWAKE;
    }
    bell.swap(AWAKE, Ordering::AcqRel)
}

/// Copies `src` into the ring at stream position `at`, wrapping at the end.
fn copy_in<B: RingBytes + ?Sized>(bytes: &B, at: u64, src: &[u8]) {
    let cap = bytes.cap();
    let off = (at & (cap - 1)) as usize;
    let first = src.len().min(cap as usize - off);
    bytes.write_at(off, &src[..first]);
    if first < src.len() {
        bytes.write_at(0, &src[first..]);
    }
}

/// Copies from the ring at stream position `at` into `dst`, wrapping at the end.
fn copy_out<B: RingBytes + ?Sized>(bytes: &B, at: u64, dst: &mut [u8]) {
    let cap = bytes.cap();
    let off = (at & (cap - 1)) as usize;
    let first = dst.len().min(cap as usize - off);
    bytes.read_at(off, &mut dst[..first]);
    if first < dst.len() {
        bytes.read_at(0, &mut dst[first..]);
    }
}
