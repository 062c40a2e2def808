//! A threadless reactor's face to its owner: one fd (an epoll set mirroring what the sources
//! wait for, and the waker), a deadline, and a call that runs what is due without blocking.
//!
//! The set mirrors the sources' [`Wait`](super::Wait)s by fd number after every
//! [`drive`](Reactor::drive): level-triggered, so an fd that stays ready keeps the owner's loop
//! awake exactly as `poll` on it would. An fd closed by a source taken out leaves the set by
//! itself (the kernel drops closed files from epoll sets); one whose number a new source reuses
//! is added again because its owner changed.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Reactor, Scratch};
use crate::poll::Interest;
use crate::sync::lock;
use crate::sys::epoll::{Ctl, Epoll};
use crate::sys::Waker;

/// A threadless reactor driven by another's turns (see [`Reactor::carry`]).
struct Carried(Arc<Reactor>);

impl super::Source for Carried {
    fn on_ready(&self) -> super::Wait {
        self.0.drive();
        let i = self.0.interest();
        super::Wait {
            fds: [i.read_fd().map(|fd| (fd.as_raw_fd(), true, false)), None],
            deadline: i.deadline(),
        }
    }
}

/// Most sources with fds that [`Reactor::drive`] runs all at each call rather than poll.
const FEW: usize = 2;

/// Per fd number in the set: watched for reading, for writing, and by which sources.
type Entry = (bool, bool, Vec<u64>);

pub(crate) struct Driven {
    epoll: Epoll,
    /// What the epoll set holds now (the waker aside).
    set: Mutex<HashMap<RawFd, Entry>>,
    /// The working lists of `drive` (another driver meanwhile makes its own).
    scratch: Mutex<Scratch>,
}

impl Driven {
    pub(super) fn new(waker: &Waker) -> std::io::Result<Driven> {
        let epoll = Epoll::new()?;
        epoll.ctl(Ctl::Add, waker.as_fd().as_raw_fd(), true, false)?;
        Ok(Driven {
            epoll,
            set: Mutex::default(),
            scratch: Mutex::default(),
        })
    }
}

impl Reactor {
    fn driven(&self) -> &Driven {
        self.driven
            .as_ref()
            .expect("only threadless reactors are driven by their owner")
    }

    /// What the owner's loop waits for: the one fd, readable when a source's fd is ready or a
    /// source was notified; and the earliest deadline of a source (now if one is due).
    pub(crate) fn interest(&self) -> Interest<'_> {
        let now = Instant::now();
        let t = self.table();
        let mut deadline: Option<Instant> = None;
        for (&token, e) in t.entries.iter() {
            if t.is_running(token) {
                continue;
            }
            let d = if e.due { Some(now) } else { e.wait.deadline };
            if let Some(d) = d {
                deadline = Some(deadline.map_or(d, |m| m.min(d)));
            }
        }
        Interest::new(Some(self.driven().epoll.as_fd()), None, deadline)
    }

    /// Runs, without blocking, every source that is due: notified, past its deadline, or with
    /// a ready fd; then mirrors what they wait for now in the set.
    pub(crate) fn drive(&self) {
        let _in = InDrive::enter(self);
        let d = self.driven();
        let mut own = Scratch::default();
        let mut shared = d.scratch.try_lock().ok();
        let s = shared.as_deref_mut().unwrap_or(&mut own);
        if !self.run_all_if_few() {
            // (Zero timeout: only marks the sources whose fds are ready, and takes the
            // wake-ups.)
            self.poll(s, Some(Instant::now()));
        }
        self.run_due(s);
        drop(shared);
        self.mirror();
    }

    /// With at most [`FEW`] sources waiting for fds, marks them all due instead of asking
    /// which fds are ready (a turn with nothing to read costs one failed read, no more than
    /// the `poll` it saves, and the source whose fd is ready, the usual case, reads anyway);
    /// takes the wake-ups only if one was sent. `false`: more sources, poll them.
    fn run_all_if_few(&self) -> bool {
        let mut t = self.table();
        let with_fds = t
            .entries
            .values()
            .filter(|e| e.wait.fds[0].is_some())
            .count();
        if with_fds > FEW {
            return false;
        }
        let super::Table {
            entries, running, ..
        } = &mut *t;
        for (token, e) in entries.iter_mut() {
            if e.wait.fds[0].is_some() && !running.iter().any(|(r, _)| r == token) {
                e.due = true;
            }
        }
        drop(t);
        if self.woken.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.waker.drain();
        }
        true
    }

    /// Has this reactor drive `child` (a threadless one) while the registration lives: its one
    /// fd and deadline become a source of this one's. For what is not handed to its owner yet
    /// (a session a server accepted, before `accept` takes it).
    pub(crate) fn carry(self: &Arc<Self>, child: Arc<Reactor>) -> super::Registration {
        self.register(Arc::new(Carried(child)))
    }

    /// Brings the epoll set in line with what the sources wait for now.
    fn mirror(&self) {
        let d = self.driven();
        // The set's lock first, then the table's: two drivers mirror one after the other, the
        // later with the later table (never an older one over a newer).
        let mut set = lock(&d.set);
        let mut want: HashMap<RawFd, Entry> = HashMap::new();
        {
            let mut t = self.table();
            if !std::mem::take(&mut t.fds_changed) {
                return;
            }
            for (&token, e) in t.entries.iter() {
                for &(fd, r, w) in e.wait.fds.iter().flatten() {
                    let x = want.entry(fd).or_insert((false, false, Vec::new()));
                    x.0 |= r;
                    x.1 |= w;
                    x.2.push(token);
                }
            }
        }
        for fd in set.keys() {
            if !want.contains_key(fd) {
                // (Fails if the fd was closed: it left the set by itself then.)
                let _ = d.epoll.ctl(Ctl::Remove, *fd, false, false);
            }
        }
        for (fd, x) in want.iter_mut() {
            x.2.sort_unstable();
            match set.get(fd) {
                Some(old) if old == x => {}
                Some(old) if old.2 == x.2 => {
                    if d.epoll.ctl(Ctl::Modify, *fd, x.0, x.1).is_err() {
                        let _ = d.epoll.ctl(Ctl::Add, *fd, x.0, x.1);
                    }
                }
                // New, or another source's now (the number may name another file).
                _ => {
                    let _ = d.epoll.ctl(Ctl::Remove, *fd, false, false);
                    let _ = d.epoll.ctl(Ctl::Add, *fd, x.0, x.1);
                }
            }
        }
        *set = want;
    }
}

thread_local! {
    /// The reactors whose `drive` the thread runs (nested: a handler's blocking call may
    /// drive another reactor), by address.
    static IN_DRIVE: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether the calling thread runs a `drive` of `r` (which looks at every source again and
/// mirrors the set when its turns are done).
pub(super) fn in_drive(r: &Reactor) -> bool {
    let me = r as *const Reactor as usize;
    IN_DRIVE.with(|v| v.borrow().contains(&me))
}

/// Marks the thread as in a `drive` of a reactor while it lives.
struct InDrive;

impl InDrive {
    fn enter(r: &Reactor) -> InDrive {
        IN_DRIVE.with(|v| v.borrow_mut().push(r as *const Reactor as usize));
        InDrive
    }
}

impl Drop for InDrive {
    fn drop(&mut self) {
        IN_DRIVE.with(|v| {
            v.borrow_mut().pop();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Source, Wait};
    use super::*;
    use std::io::Write;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Reads what its socket has; waits for it to be readable.
    struct Reader {
        fd: OwnedFd,
        runs: AtomicUsize,
    }

    impl Source for Reader {
        fn on_ready(&self) -> Wait {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let mut b = [0u8; 64];
            while matches!(crate::sys::recv_plain(self.fd.as_fd(), &mut b, false), Ok(n) if n > 0) {
            }
            Wait {
                fds: [Some((self.fd.as_raw_fd(), true, false)), None],
                deadline: None,
            }
        }
    }

    fn reader() -> (UnixStream, Arc<Reader>) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let r = Arc::new(Reader {
            fd: b.into(),
            runs: AtomicUsize::new(0),
        });
        (a, r)
    }

    /// Whether the owner's one fd says "call drive" within `ms`.
    fn readable(r: &Reactor, ms: u64) -> bool {
        let i = r.interest();
        if i.deadline().is_some_and(|d| d <= Instant::now()) {
            return true;
        }
        let fd = crate::sys::PollFd::new(i.read_fd().unwrap(), true, false);
        crate::sys::poll(&mut [fd], Some(Duration::from_millis(ms))).unwrap() > 0
    }

    #[test]
    fn the_one_fd_wakes_the_owner_for_a_ready_source_and_a_notification() {
        let r = Reactor::threadless().unwrap();
        let (mut peer, src) = reader();
        let reg = r.register(src.clone());
        assert!(readable(&r, 0), "a new source is due");
        r.drive();
        assert_eq!(src.runs.load(Ordering::SeqCst), 1);
        assert!(!readable(&r, 20), "nothing to do");
        peer.write_all(b"x").unwrap();
        assert!(readable(&r, 1000), "its fd is ready");
        r.drive();
        assert_eq!(src.runs.load(Ordering::SeqCst), 2);
        assert!(!readable(&r, 20), "read: nothing to do");
        let n = reg.notifier();
        std::thread::spawn(move || n.notify()).join().unwrap();
        assert!(readable(&r, 1000), "notified from another thread");
        r.drive();
        assert_eq!(src.runs.load(Ordering::SeqCst), 3);
        assert!(!readable(&r, 20));
    }

    #[test]
    fn a_reused_fd_number_is_watched_for_its_new_source() {
        let r = Reactor::threadless().unwrap();
        // More sources than run-all handles, so that readiness comes from the set.
        let others: Vec<_> = (0..FEW + 1).map(|_| reader()).collect();
        let _regs: Vec<_> = others.iter().map(|(_, s)| r.register(s.clone())).collect();
        let (peer, first) = reader();
        let number = first.fd.as_raw_fd();
        let reg = r.register(first);
        r.drive();
        drop((reg, peer)); // its fd closes
        let (mut peer, second) = reader();
        // (The lowest free number: the one just closed, or close to it.)
        let reused = second.fd.as_raw_fd() == number;
        let _reg = r.register(second.clone());
        r.drive();
        assert_eq!(second.runs.load(Ordering::SeqCst), 1);
        peer.write_all(b"x").unwrap();
        assert!(
            readable(&r, 1000),
            "the new source's fd is watched (reused: {reused})"
        );
        r.drive();
        assert_eq!(second.runs.load(Ordering::SeqCst), 2);
    }

    // ---- review12: adversarial tests ----

    /// The fd, polled for `ms` as an owner's loop that computed its interest earlier sleeps on
    /// it (that interest had no deadline).
    fn fd_readable(r: &Reactor, ms: u64) -> bool {
        let i = r.interest();
        let fd = crate::sys::PollFd::new(i.read_fd().unwrap(), true, false);
        crate::sys::poll(&mut [fd], Some(Duration::from_millis(ms))).unwrap() > 0
    }

    /// Its second turn runs on another thread (a blocking call's nested round) and is held
    /// there until released; it then says `then`.
    struct Held {
        runs: AtomicUsize,
        entered: std::sync::mpsc::SyncSender<()>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
        then: Wait,
    }

    impl Source for Held {
        fn on_ready(&self) -> Wait {
            let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 2 {
                self.entered.send(()).unwrap();
                let _ = crate::sync::lock(&self.release).recv();
                return self.then;
            }
            Wait::idle()
        }
    }

    /// A turn of `src` on another thread, inside a nested round (as a blocking call made off
    /// the owner's thread runs it), held until `release` is sent. Returns the thread.
    fn turn_elsewhere(
        r: &Arc<Reactor>,
        src: &Arc<Held>,
        n: super::super::Notifier,
    ) -> std::thread::JoinHandle<bool> {
        let (r, s) = (r.clone(), src.clone());
        std::thread::spawn(move || {
            n.notify();
            r.nested_until(
                || s.runs.load(Ordering::SeqCst) >= 2,
                Some(Instant::now() + Duration::from_secs(10)),
            )
        })
    }

    fn held(
        then: Wait,
    ) -> (
        Arc<Held>,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (etx, erx) = std::sync::mpsc::sync_channel(1);
        let (rtx, rrx) = std::sync::mpsc::channel();
        let src = Arc::new(Held {
            runs: AtomicUsize::new(0),
            entered: etx,
            release: Mutex::new(rrx),
            then,
        });
        (src, erx, rtx)
    }

    /// A source notified while its turn runs on another thread (a blocking call's nested
    /// round): the owner's `drive` meanwhile takes the wake-up but skips the running source,
    /// and its interest leaves it out; when the turn ends the source is due, and the owner
    /// must hear of it.
    #[test]
    fn review12_a_notification_during_a_turn_on_another_thread_wakes_the_owner() {
        let r = Reactor::threadless().unwrap();
        let (src, entered, release) = held(Wait::idle());
        let reg = r.register(src.clone());
        r.drive();
        assert!(!readable(&r, 0));
        let b = turn_elsewhere(&r, &src, reg.notifier());
        entered.recv().unwrap();
        // Meanwhile: a send queued bytes, say, and notifies the source.
        reg.notify();
        // The owner's loop wakes, drives (the source runs elsewhere: skipped), and sleeps on
        // its interest (the running source is not in it).
        r.drive();
        assert!(r.interest().deadline().is_none(), "precondition");
        release.send(()).unwrap();
        assert!(b.join().unwrap());
        assert!(
            fd_readable(&r, 1000),
            "the source is due (notified during its turn) but its owner sleeps"
        );
    }

    /// The same with a deadline: a turn on another thread that sets a timer (a keep-alive ping)
    /// which the owner's interest, computed while the turn ran, does not have.
    #[test]
    fn review12_a_timer_set_by_a_turn_on_another_thread_reaches_the_owner() {
        let r = Reactor::threadless().unwrap();
        let (src, entered, release) = held(Wait {
            fds: [None, None],
            deadline: Some(Instant::now() + Duration::from_millis(300)),
        });
        let reg = r.register(src.clone());
        r.drive();
        let b = turn_elsewhere(&r, &src, reg.notifier());
        entered.recv().unwrap();
        r.drive();
        let owners = r.interest().deadline();
        assert!(
            owners.is_none(),
            "precondition: the owner sleeps without a deadline"
        );
        release.send(()).unwrap();
        assert!(b.join().unwrap());
        assert!(
            fd_readable(&r, 1500),
            "the source's timer is due within 300 ms; its owner sleeps past it"
        );
    }

    /// Y's source: idle, then asks for another turn at once, then waits for its socket.
    struct Steps {
        fd: OwnedFd,
        runs: AtomicUsize,
    }

    impl Source for Steps {
        fn on_ready(&self) -> Wait {
            let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
            let mut b = [0u8; 64];
            while matches!(crate::sys::recv_plain(self.fd.as_fd(), &mut b, false), Ok(n) if n > 0) {
            }
            match n {
                1 => Wait::idle(),
                2 => Wait::again(),
                _ => Wait {
                    fds: [Some((self.fd.as_raw_fd(), true, false)), None],
                    deadline: None,
                },
            }
        }
    }

    /// X's source: a handler making a blocking call on Y (which drives Y in a nested round).
    struct Nest {
        y: Arc<Reactor>,
        n: super::super::Notifier,
        steps: Arc<Steps>,
    }

    impl Source for Nest {
        fn on_ready(&self) -> Wait {
            self.n.notify();
            let s = self.steps.clone();
            self.y.nested_until(
                || s.runs.load(Ordering::SeqCst) >= 3,
                Some(Instant::now() + Duration::from_secs(10)),
            );
            Wait::idle()
        }
    }

    /// A handler of reactor X (run in X's `drive`) makes a blocking call on threadless reactor
    /// Y, whose nested round runs a turn of Y's source that changes its fds: Y's owner must
    /// mirror them. `in_drive` is per thread, not per reactor: Y's turn thinks it runs in Y's
    /// drive, does not wake Y's owner, and X's drive mirrors X only.
    #[test]
    fn review12_a_nested_round_of_another_reactor_inside_a_drive_is_mirrored() {
        let x = Reactor::threadless().unwrap();
        let y = Reactor::threadless().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let steps = Arc::new(Steps {
            fd: b.into(),
            runs: AtomicUsize::new(0),
        });
        let yreg = y.register(steps.clone());
        y.drive();
        assert!(!readable(&y, 0));
        let _xreg = x.register(Arc::new(Nest {
            y: y.clone(),
            n: yreg.notifier(),
            steps: steps.clone(),
        }));
        x.drive();
        assert_eq!(steps.runs.load(Ordering::SeqCst), 3, "Y's turns ran nested");
        (&a).write_all(b"x").unwrap();
        assert!(
            readable(&y, 1000),
            "Y's source waits for its socket, which is readable; Y's one fd does not say so"
        );
    }

    /// No fds: runs when notified.
    struct Idle(AtomicUsize);
    impl Source for Idle {
        fn on_ready(&self) -> Wait {
            self.0.fetch_add(1, Ordering::SeqCst);
            Wait::idle()
        }
    }

    /// A notification racing a `drive` (few sources: the waker is drained only when `woken`):
    /// `wake` sets `woken` before it writes, so a drive between the two takes the flag and
    /// drains nothing; the byte then stays with `woken` false, and every later drive leaves it:
    /// the one fd stays readable with nothing to do (a poll loop spins) until the next wake-up.
    #[test]
    fn review12_a_wake_up_racing_a_drive_is_not_left_behind() {
        let r = Reactor::threadless().unwrap();
        let src = Arc::new(Idle(AtomicUsize::new(0)));
        let reg = r.register(src.clone());
        r.drive();
        let n = reg.notifier();
        let go = Arc::new(std::sync::Barrier::new(2));
        let g = go.clone();
        let rounds = 300_000;
        let t = std::thread::spawn(move || {
            for _ in 0..rounds {
                g.wait();
                n.notify();
                g.wait();
            }
        });
        let mut stuck = 0;
        let started = Instant::now();
        for i in 0..rounds {
            go.wait();
            r.drive();
            go.wait();
            r.drive(); // takes the wake-up if the first drive did not
            if readable(&r, 0) {
                stuck = i + 1;
                // Let the notifier finish.
                for _ in i + 1..rounds {
                    go.wait();
                    go.wait();
                }
                break;
            }
            if started.elapsed() > Duration::from_secs(2) {
                for _ in i + 1..rounds {
                    go.wait();
                    go.wait();
                }
                break;
            }
        }
        t.join().unwrap();
        assert_eq!(
            stuck, 0,
            "round {stuck}: the one fd is readable with nothing due"
        );
    }
}
