//! The shared-memory queue under a [`ChannelKind::ShmQueue`](super::ChannelKind::ShmQueue)
//! channel: this side's outgoing ring (made here, sent in the hello), the peer's ring (mapped from
//! its hello), and how this side waits and wakes the peer (the protocols are in
//! `shm::ring`).
//!
//! The data socket stays: it carries the hello, it tells the peer's death (end of stream), and
//! it is the fd a poll loop watches. A side that sleeps in `poll` (a poll loop, the library
//! thread) arms its bells in `POLL` mode, and the peer wakes it with one byte on the socket (a
//! *doorbell byte*, never parsed: after the hello, the socket carries nothing else). A blocking
//! call sleeps in `FUTEX` mode on one bell and is woken by `FUTEX_WAKE`; it wakes up at least
//! every [`SLICE`] to look at the socket, so a peer that died is seen within that time.

use std::io::IoSlice;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::config::WaitPolicy;
use super::link::{check_alive, drain_socket};
use crate::shm::ring::{self, Consumer, Producer, RingError, AWAKE, FUTEX, POLL};
use crate::shm::ring_map::{MapError, RingMap};
use crate::sys::{self, futex, PollFd};
use crate::transport::Error;

/// Longest futex sleep before the socket is looked at (for the peer's death).
const SLICE: Duration = Duration::from_millis(50);
/// While busy-polling, how often the socket is looked at.
const BUSY_CHECK: Duration = Duration::from_millis(1);

/// Spins in a row that end without the peer's answer before spinning is paused.
const SPIN_FAILS: u32 = 3;
/// Waits that sleep at once once spinning is paused.
const SPIN_SKIPS: u32 = 64;
/// How often a busy-polling wait yields the CPU (rarely: it is meant to own its CPU; `sched_yield`
/// only hands it over to another runnable thread, which then runs for its time slice).
const BUSY_YIELD: Duration = Duration::from_millis(1);

/// How a wait's spinning phase ended.
enum Spun {
    /// There is what we wait for.
    Ready,
    /// The caller's deadline passed.
    Deadline,
    /// Busy-polling: time to look at the socket.
    CheckSocket,
    /// The spin's time is up (or there is none): sleep.
    GaveUp,
}

/// Empty futex slices in a row after which an idle reader sleeps in `poll` instead.
const IDLE_SLICES: u32 = 4;

/// `armed` bits: bells this side armed in `POLL` mode and has not taken back.
const ARMED_DATA: u32 = 1;
const ARMED_SPACE: u32 = 2;

/// One side's rings and waiting state.
#[derive(Debug)]
pub(super) struct Link {
    out: RingMap,
    prod: Producer,
    /// The peer's ring, once its hello is read.
    inp: Option<RingMap>,
    cons: Consumer,
    policy: WaitPolicy,
    /// Bells armed in `POLL` mode by [`Link::arm_poll`] (from `interest`, a `&self` call).
    armed: AtomicU32,
    /// The socket must be read before "nothing here" is believed: a doorbell byte may be
    /// waiting, or the end of stream. Set whenever a wait went to the kernel or a waker may
    /// have written a byte; cleared by reading the socket dry.
    sock_due: AtomicBool,
    /// The socket reached end of stream: what is still in the peer's ring is all there is.
    eof: bool,
    /// Spins in a row that the peer did not answer within.
    spin_fails: u32,
    /// Waits left that skip spinning (see [`Link::spin`]).
    skip_spins: u32,
    /// When the last spin ran out, and how long it was (judged when the sleep after it ends).
    gave_up: Option<(Instant, Duration)>,
    /// Room the next push needs: the length of the slice the last push left for lack of room
    /// (a small frame goes in whole), or 1.
    need: u64,
    /// Futex slices in a row that ended with nothing (see [`IDLE_SLICES`]).
    idle_slices: u32,
}

impl From<MapError> for Error {
    fn from(e: MapError) -> Error {
        match e {
            MapError::Io(e) => Error::Io(e),
            MapError::NotARing(what) => Error::BadQueue(what),
        }
    }
}

fn corrupt(_: RingError) -> Error {
    Error::BadQueue("a position outside the ring")
}

/// Wakes a sleeper whose bell a push or pop took (`mode`): a futex wake, or a doorbell byte on
/// our socket (a full socket already holds a wake; a failure is the peer's end, which the
/// receive side reports).
fn wake(mode: u32, bell: &crate::sync::AtomicU32, sock: BorrowedFd<'_>) {
    match mode {
        FUTEX => futex::wake(bell),
        POLL => {
            let _ = sys::try_send(sock, &[0]);
        }
        _ => {}
    }
}

impl Link {
    /// This side's ring, made now (its fd goes in the hello).
    pub(super) fn new(capacity: u64, policy: WaitPolicy) -> Result<Link, Error> {
        Ok(Link {
            out: RingMap::create(capacity)?,
            prod: Producer { tail: 0 },
            inp: None,
            cons: Consumer { head: 0 },
            policy,
            armed: AtomicU32::new(0),
            sock_due: AtomicBool::new(true),
            eof: false,
            spin_fails: 0,
            skip_spins: 0,
            gave_up: None,
            need: 1,
            idle_slices: 0,
        })
    }

    /// Our ring's control words (tests scribble on them).
    #[cfg(test)]
    pub(super) fn out_control_for_tests(&self) -> crate::shm::ring::Control<'_> {
        self.out.control()
    }

    /// The fd of our ring, for the hello.
    pub(super) fn ring_fd(&self) -> BorrowedFd<'_> {
        self.out.fd()
    }

    /// Maps the peer's ring, from its hello.
    pub(super) fn attach(&mut self, fd: OwnedFd) -> Result<(), Error> {
        let map = RingMap::open(fd)?;
        let ctl = map.control();
        if ctl.head.load(Ordering::Relaxed) != 0 {
            return Err(Error::BadQueue("a new ring that was read from"));
        }
        self.inp = Some(map);
        Ok(())
    }

    /// Copies what fits of `iov` into our ring and wakes a sleeping peer. `Ok(None)`: full.
    pub(super) fn push(
        &mut self,
        sock: BorrowedFd<'_>,
        iov: &[IoSlice<'_>],
        whole: bool,
    ) -> Result<Option<usize>, Error> {
        let ctl = self.out.control();
        // Whole slices only, unless one could never fit; and with `whole` (`iov` is one frame),
        // all of it or nothing unless it could never fit: a small frame (queued ones are
        // coalesced whole) is never left half in the ring, so a sender that goes away leaves
        // whole frames behind, as it usually does on a socket.
        let cap = ring::RingBytes::cap(&self.out);
        let mut room = self.prod.space(&ctl, cap).map_err(corrupt)?;
        let total: u64 = iov.iter().map(|s| s.len() as u64).sum();
        if whole && total > room && total <= cap {
            self.need = total;
            return Ok(None);
        }
        let mut k = 0;
        for s in iov {
            let len = s.len() as u64;
            if len <= room {
                room -= len;
            } else if len > cap {
                room = 0;
            } else {
                break;
            }
            k += 1;
            if room == 0 {
                break;
            }
        }
        // Until the slice that did not fit has room, a wait for room waits for that much (any
        // room, after a slice too big for the ring went in part).
        let partial = k > 0 && iov[k - 1].len() as u64 > cap;
        self.need = match iov.get(k) {
            Some(s) if !partial => (s.len() as u64).clamp(1, cap),
            _ => 1,
        };
        let (n, mode) = self
            .prod
            .push(&ctl, &self.out, &iov[..k])
            .map_err(corrupt)?;
        wake(mode, ctl.data_bell, sock);
        Ok((n > 0).then_some(n))
    }

    /// Whether our ring has room for what the last push could not take (a whole small frame,
    /// or any byte of a larger one).
    pub(super) fn has_space(&self) -> Result<bool, Error> {
        let ctl = self.out.control();
        let room = self.prod.space(&ctl, ring::RingBytes::cap(&self.out));
        Ok(room.map_err(corrupt)? >= self.need)
    }

    /// Whether the peer's ring has bytes for us.
    pub(super) fn has_data(&self) -> Result<bool, Error> {
        let Some(inp) = &self.inp else {
            return Ok(false);
        };
        let ctl = inp.control();
        Ok(self
            .cons
            .available(&ctl, ring::RingBytes::cap(inp))
            .map_err(corrupt)?
            > 0)
    }

    /// Reads bytes of the stream into `dst`: from the peer's ring, and when it is empty, the
    /// socket is read dry (doorbell bytes; the end of stream, after which the ring is read once
    /// more: the peer published before it closed). `Ok(None)`: nothing now; `Ok(Some(0))`: end
    /// of stream.
    pub(super) fn read(
        &mut self,
        sock: BorrowedFd<'_>,
        dst: &mut [u8],
    ) -> Result<Option<usize>, Error> {
        self.settle();
        loop {
            if let Some(inp) = &self.inp {
                let ctl = inp.control();
                let (n, mode) = self.cons.pop(&ctl, inp, dst).map_err(corrupt)?;
                wake(mode, ctl.space_bell, sock);
                if n > 0 {
                    self.idle_slices = 0;
                    return Ok(Some(n));
                }
            }
            if self.eof {
                return Ok(Some(0));
            }
            if !self.sock_due.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if !self.drain(sock)? && !self.eof {
                // More bytes than one drain takes (a peer writing junk): the next call goes on.
                return Ok(None);
            }
        }
    }

    /// Reads the socket dry of doorbell bytes (which mean nothing once read), at most a bounded
    /// amount per call (a peer that writes junk without end cannot hold us here), noting the
    /// end of stream. Returns whether the socket is dry (or at its end); `sock_due` is cleared
    /// then.
    pub(super) fn drain(&mut self, sock: BorrowedFd<'_>) -> Result<bool, Error> {
        let dry = drain_socket(sock, &mut self.eof)?;
        if dry {
            self.sock_due.store(false, Ordering::Relaxed);
        }
        Ok(dry)
    }

    /// Whether the socket may hold news (the peer's end closed): set by every sleep that went
    /// to the kernel.
    pub(super) fn peer_check_due(&self) -> bool {
        self.sock_due.load(Ordering::Relaxed)
    }

    /// Takes back the bells [`arm_poll`](Link::arm_poll) armed: a waker that took one first
    /// wrote a doorbell byte, which the next read drains.
    pub(super) fn settle(&self) {
        // (A plain load first: every read comes here, and a blocking caller never arms in
        // poll mode, so the read-modify-write is for poll loops only.)
        if self.armed.load(Ordering::Relaxed) == 0 {
            return;
        }
        let armed = self.armed.swap(0, Ordering::Relaxed);
        let mut taken = false;
        if armed & ARMED_DATA != 0 {
            if let Some(inp) = &self.inp {
                taken |= ring::disarm(inp.control().data_bell) == AWAKE;
            }
        }
        if armed & ARMED_SPACE != 0 {
            taken |= ring::disarm(self.out.control().space_bell) == AWAKE;
        }
        if taken {
            self.sock_due.store(true, Ordering::Relaxed);
        }
    }

    /// Before a `poll` on the socket: arms the bells for data (once the peer's ring is mapped)
    /// and, with `space`, for room in our ring, in `POLL` mode. Returns whether there is
    /// something to do already (then the caller must not sleep).
    pub(super) fn arm_poll(&self, space: bool) -> bool {
        self.arm(true, space)
    }

    /// [`arm_poll`](Link::arm_poll), the data bell only if `read`.
    fn arm(&self, read: bool, space: bool) -> bool {
        // A poll on the socket sees what is there: the next read must look.
        self.sock_due.store(true, Ordering::Relaxed);
        let mut ready = false;
        let mut armed = 0;
        if let (true, Some(inp)) = (read, &self.inp) {
            armed |= ARMED_DATA;
            let ctl = inp.control();
            // A corrupt ring counts as ready: the read that follows reports it.
            ready |= !self
                .cons
                .arm_data(&ctl, ring::RingBytes::cap(inp), POLL)
                .unwrap_or(false);
        }
        if space {
            armed |= ARMED_SPACE;
            let ctl = self.out.control();
            ready |= !self
                .prod
                .arm_space(&ctl, ring::RingBytes::cap(&self.out), POLL, self.need)
                .unwrap_or(false);
        }
        self.armed.fetch_or(armed, Ordering::Relaxed);
        ready
    }

    /// A blocking call's wait, until there is data (`read`), room (`space`), or `until`: spins
    /// as the policy says, then sleeps on one bell's futex, or in `poll` when the socket or
    /// the side socket must be watched too (`side`: the side socket, to wait for room for an
    /// fd). Returns early (spurious returns are fine: the caller re-checks and waits again).
    pub(super) fn wait(
        &mut self,
        sock: BorrowedFd<'_>,
        side: Option<BorrowedFd<'_>>,
        read: bool,
        space: bool,
        until: Option<Instant>,
    ) -> Result<(), Error> {
        self.settle();
        let data = read && self.inp.is_some();
        let ready = |l: &Link| -> Result<bool, Error> {
            Ok((data && l.has_data()?) || (space && l.has_space()?))
        };
        // (News on the socket is the caller's to read, once the peer's ring is mapped: before
        // that, the wait is a poll on the socket, which the hello makes readable.)
        if ready(self)? || (data && self.sock_due.load(Ordering::Relaxed)) {
            return Ok(());
        }
        // Waiting for the peer's hello, or for the side socket: only `poll` sees those.
        let socket_only = (read && self.inp.is_none()) || side.is_some();
        if !socket_only {
            match self.spin(&ready, until)? {
                Spun::Ready | Spun::Deadline => return Ok(()),
                Spun::CheckSocket => {
                    // Busy-polling looks at the socket now and then (the peer's death).
                    self.sock_due.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                Spun::GaveUp => {}
            }
            // A reader idle for a while sleeps in poll instead: it sees the peer's end at once
            // and is not woken every slice (a wake-up then costs the peer a doorbell byte).
            let idle = data && self.idle_slices >= IDLE_SLICES;
            if data != space && !idle {
                return self.sleep_futex(sock, data, until);
            }
        }
        self.sleep_poll(sock, side, read, space, until)
    }

    /// The spinning phase of a wait, as the policy says. A spin-then-block wait adapts: after
    /// [`SPIN_FAILS`] spins in a row that ran out and were followed by the peer's answer within
    /// the spin's own length once we slept (the peer shares our CPU, where it cannot run while
    /// we spin, or it is just slower than the spin), the next [`SPIN_SKIPS`] waits sleep at
    /// once; then spinning is tried again. A spin that runs out because the peer is idle (the
    /// sleep after it is long) does not count.
    fn spin(
        &mut self,
        ready: &dyn Fn(&Link) -> Result<bool, Error>,
        until: Option<Instant>,
    ) -> Result<Spun, Error> {
        let budget = match self.policy {
            WaitPolicy::BusyPoll => None,
            WaitPolicy::SpinThenBlock(d) if d.is_zero() => return Ok(Spun::GaveUp),
            WaitPolicy::SpinThenBlock(_) if self.skip_spins > 0 => {
                self.skip_spins -= 1;
                return Ok(Spun::GaveUp);
            }
            WaitPolicy::SpinThenBlock(d) => Some(d),
        };
        let start = Instant::now();
        let mut last_yield = start;
        let mut i = 0u32;
        loop {
            if ready(self)? {
                self.spin_fails = 0;
                return Ok(Spun::Ready);
            }
            i = i.wrapping_add(1);
            if i % 64 == 0 {
                let now = Instant::now();
                if until.is_some_and(|u| now >= u) {
                    return Ok(Spun::Deadline);
                }
                let spun = now - start;
                match budget {
                    Some(d) if spun >= d => {
                        // Whether this spin only held back a peer that shares our CPU is
                        // known once the sleep ends (see `sleep_futex`).
                        self.gave_up = Some((now, d));
                        return Ok(Spun::GaveUp);
                    }
                    None if spun >= BUSY_CHECK => return Ok(Spun::CheckSocket),
                    None if now - last_yield >= BUSY_YIELD => {
                        // A busy-poller that shares its CPU after all must not hold it forever.
                        std::thread::yield_now();
                        last_yield = Instant::now();
                    }
                    _ => {}
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Sleeps on the one bell we wait on (data if `data`, else space), at most a slice.
    fn sleep_futex(
        &mut self,
        sock: BorrowedFd<'_>,
        data: bool,
        until: Option<Instant>,
    ) -> Result<(), Error> {
        let (ring, bell) = match (data, &self.inp) {
            (true, Some(inp)) => (inp, inp.control().data_bell),
            _ => (&self.out, self.out.control().space_bell),
        };
        let cap = ring::RingBytes::cap(ring);
        let ctl = ring.control();
        let sleep = if data {
            self.cons.arm_data(&ctl, cap, FUTEX)
        } else {
            self.prod.arm_space(&ctl, cap, FUTEX, self.need)
        }
        .map_err(corrupt)?;
        if sleep {
            let left = until.map_or(SLICE, |u| u.saturating_duration_since(Instant::now()));
            futex::wait(bell, FUTEX, Some(left.min(SLICE))).map_err(Error::Io)?;
        }
        let woken = ring::disarm(bell) == AWAKE;
        if let Some((at, spin)) = self.gave_up.take() {
            if woken && at.elapsed() < spin * 2 {
                self.spin_fails += 1;
                if self.spin_fails >= SPIN_FAILS {
                    self.spin_fails = 0;
                    self.skip_spins = SPIN_SKIPS;
                }
            } else {
                self.spin_fails = 0;
            }
        }
        if woken {
            self.idle_slices = 0;
        } else {
            // Nobody woke us (a timeout, a signal): look at the socket before sleeping again.
            self.idle_slices = self.idle_slices.saturating_add(1);
            self.sock_due.store(true, Ordering::Relaxed);
            if !data {
                check_alive(sock)?;
            }
        }
        Ok(())
    }

    /// Sleeps in `poll` on the socket (doorbell bytes, the hello, the end of stream) and, with
    /// `side`, the side socket for writing.
    fn sleep_poll(
        &mut self,
        sock: BorrowedFd<'_>,
        side: Option<BorrowedFd<'_>>,
        read: bool,
        space: bool,
        until: Option<Instant>,
    ) -> Result<(), Error> {
        let space = space && side.is_none();
        if self.arm(read, space) {
            self.settle();
            return Ok(());
        }
        // The socket is watched for reading only when reading, or when room in our ring is
        // awaited (the peer's wake-up byte comes there); a hang-up (the peer's end) is
        // reported whatever is watched. Bytes nobody reads now would make the poll return at
        // once, every time.
        let watch = read || space;
        let mut timeout = until.map(|u| u.saturating_duration_since(Instant::now()));
        if !read {
            timeout = Some(timeout.map_or(SLICE, |t| t.min(SLICE)));
        }
        let r = match side {
            Some(s) => sys::poll(
                &mut [PollFd::new(sock, watch, false), PollFd::new(s, false, true)],
                timeout,
            ),
            None => sys::poll(&mut [PollFd::new(sock, watch, false)], timeout),
        };
        self.settle();
        r.map_err(Error::Io)?;
        if !read {
            check_alive(sock)?;
        }
        if space {
            // The wake-up byte is the reader's to drain; while only sending, drain it here.
            self.drain(sock)?;
        }
        Ok(())
    }
}
