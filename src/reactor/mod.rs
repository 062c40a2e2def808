//! The reactors: the one library thread of a process, which drives every async face's core
//! (transport and structured `AsyncChannel`s, sessions, the session server) through one
//! contract, [`Source`]; and threadless reactors with the same sources, which their owner drives
//! (a sync_io session in a user's poll loop, the tokio face): see [`threadless`](Reactor::threadless).
//!
//! A registered source is only ever called through [`Source::on_ready`], on the reactor thread,
//! one source at a time. `on_ready` does whatever work is ready without blocking, runs the
//! user's handlers outside the source's own locks, and says what to wait for next ([`Wait`]:
//! its core's [`Interest`], by fd number, so the reactor polls without the source's lock).
//! The reactor does not hold sources across its poll: a source taken out meanwhile closes its
//! fds at once, and the poll at worst reports one of those numbers wrongly (`POLLNVAL`, or the
//! readiness of a file that reused the number), which makes some turn run for nothing. Anything else wanting the source to run (a send that
//! queued bytes, a drop) calls [`Registration::notify`].
//!
//! Dropping the [`Registration`] takes the source out: from another thread it waits until the
//! source's `on_ready` is not running, so nothing of the source runs after the drop returns;
//! from the reactor thread (a handler dropping its own channel) it returns at once, and the
//! running `on_ready` finishes.
//!
//! A panicking `on_ready` (a user's handler panicked) takes out only its own source: it is not
//! driven any more, and its [`Source::on_panicked`] ends what waits on it (its face is hosed:
//! later calls answer `Hosed`, blocking waits return, pending completions get their error; the
//! error handler is not called).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, ThreadId};

mod driven;
pub(crate) use driven::Driven;
use std::time::{Duration, Instant};

use crate::poll::Interest;
use crate::sync::lock;
use crate::sys::{self, RawPollFd, Waker};

/// What a source waits for until its next `on_ready`: up to two fds (by number), each with
/// whether to watch it for reading and for writing; and a deadline.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wait {
    pub(crate) fds: [Option<(RawFd, bool, bool)>; 2],
    /// Run `on_ready` at this time even if no fd is ready; at once if it is past.
    pub(crate) deadline: Option<Instant>,
}

impl From<Interest<'_>> for Wait {
    fn from(i: Interest<'_>) -> Wait {
        let mut w = Wait {
            deadline: i.deadline(),
            ..Wait::default()
        };
        for (slot, (fd, r, x)) in w.fds.iter_mut().zip(i.fds()) {
            *slot = Some((fd.as_raw_fd(), r, x));
        }
        w
    }
}

impl Wait {
    /// Nothing: the source runs again only when notified.
    pub(crate) fn idle() -> Wait {
        Wait::default()
    }

    /// Run again at once (after the other sources had their turn).
    pub(crate) fn again() -> Wait {
        Wait {
            deadline: Some(Instant::now()),
            ..Wait::default()
        }
    }
}

/// Something the reactor drives (see the module docs).
pub(crate) trait Source: Send + Sync {
    /// Does what is ready without blocking; says what to wait for next.
    fn on_ready(&self) -> Wait;

    /// A handler panicked in this source's turn, and the source is off the thread for good:
    /// end what waits on a turn of it (its face answers `Hosed` from now on).
    fn on_panicked(&self) {}
}

struct Entry {
    source: Arc<dyn Source>,
    wait: Wait,
    /// Run at the next turn (notified, or one of its fds was ready).
    due: bool,
}

impl Entry {
    fn is_due(&self, now: Instant) -> bool {
        self.due || self.wait.deadline.is_some_and(|d| d <= now)
    }
}

#[derive(Default)]
struct Table {
    entries: HashMap<u64, Entry>,
    next_token: u64,
    /// The sources whose `on_ready` runs now, and on which thread: more than one in nested
    /// rounds (a handler of the last one waits, see [`Reactor::nested_until`]), or when several
    /// threads drive a threadless reactor.
    running: Vec<(u64, ThreadId)>,
    /// Drops waiting for a turn to end (see `turn_done`).
    dropping: usize,
    /// The fds some source waits for changed since a threadless reactor's set was mirrored
    /// (a source came, went, or wants other fds).
    fds_changed: bool,
}

impl Table {
    fn is_running(&self, token: u64) -> bool {
        self.running.iter().any(|&(t, _)| t == token)
    }
}

/// A reactor (see the module docs): the process's library thread, or a threadless one.
pub(crate) struct Reactor {
    table: Mutex<Table>,
    /// Signalled each time an `on_ready` returns (for drops waiting on it).
    turn_done: Condvar,
    waker: Waker,
    /// A wake-up was sent since the waker was last drained (a threadless reactor's `drive`
    /// drains it only then).
    woken: std::sync::atomic::AtomicBool,
    /// The library thread, which drives this reactor for good; `None`: a threadless reactor,
    /// driven by its owner (and by the blocking calls made on its sources).
    thread: Option<ThreadId>,
    /// A threadless reactor's one fd for its owner's poll loop.
    driven: Option<Driven>,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("threaded", &self.thread.is_some())
            .finish()
    }
}

/// The reactor of this process with its library thread, started at the first call (a forked
/// child starts its own: the parent's thread does not exist in it).
pub(crate) fn get() -> std::io::Result<Arc<Reactor>> {
    static REACTOR: Mutex<Option<(u32, Arc<Reactor>)>> = Mutex::new(None);
    let mut r = lock(&REACTOR);
    match &*r {
        Some((pid, reactor)) if *pid == std::process::id() => Ok(reactor.clone()),
        _ => {
            let reactor = start()?;
            *r = Some((std::process::id(), reactor.clone()));
            Ok(reactor)
        }
    }
}

fn start() -> std::io::Result<Arc<Reactor>> {
    let waker = Waker::new()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Reactor>>(1);
    let thread = thread::Builder::new()
        .name("flowipc-reactor".into())
        .spawn(move || {
            if let Ok(r) = rx.recv() {
                r.run()
            }
        })?;
    // Lives as long as the process: its thread runs for good (and holds it).
    let reactor = Arc::new(Reactor {
        table: Mutex::new(Table::default()),
        turn_done: Condvar::new(),
        waker,
        woken: Default::default(),
        thread: Some(thread.thread().id()),
        driven: None,
    });
    let _ = tx.send(reactor.clone());
    Ok(reactor)
}

/// A number of the calling thread's own, never 0 (for "this thread runs that turn" flags).
pub(crate) fn thread_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

/// A source's place in the reactor; dropping it takes the source out (see the module docs).
pub(crate) struct Registration {
    reactor: Arc<Reactor>,
    token: u64,
    /// The process that registered it: a forked child inherits the registration, not the
    /// thread (whose table it must not touch: its lock may have been held at the fork).
    pid: u32,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("token", &self.token)
            .finish()
    }
}

impl Reactor {
    fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// A reactor without a thread: its owner drives it ([`drive`](Reactor::drive) when the fd
    /// of [`interest`](Reactor::interest) is ready or its deadline passes), and so does every
    /// blocking call made on one of its sources, from whatever thread (see
    /// [`must_drive`](Reactor::must_drive)). Several threads may drive it at once: each
    /// source still runs one turn at a time.
    pub(crate) fn threadless() -> std::io::Result<Arc<Reactor>> {
        let waker = Waker::new()?;
        let driven = Driven::new(&waker)?;
        Ok(Arc::new(Reactor {
            table: Mutex::new(Table::default()),
            turn_done: Condvar::new(),
            waker,
            woken: Default::default(),
            thread: None,
            driven: Some(driven),
        }))
    }

    /// Wakes whoever waits on the reactor (its thread, or its owner's loop).
    fn wake(&self) {
        // The byte first, then the flag: a `drive` that sees the flag finds the byte (one
        // that comes between the two leaves the byte, and the readable fd brings the owner
        // back to a drive that sees the flag; never a byte with the flag down for good).
        self.waker.wake();
        self.woken.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether a blocking call on the calling thread must run this reactor's turns itself while
    /// it waits: the reactor has no thread, or the caller is its thread (a handler waiting).
    pub(crate) fn must_drive(&self) -> bool {
        self.thread.map_or(true, |t| t == thread::current().id())
    }

    /// Whether the reactor has a thread of its own (the library thread).
    pub(crate) fn is_threaded(&self) -> bool {
        self.thread.is_some()
    }

    /// Adds `source`; its `on_ready` runs at once.
    pub(crate) fn register(self: &Arc<Self>, source: Arc<dyn Source>) -> Registration {
        let mut t = self.table();
        let token = t.next_token;
        t.next_token += 1;
        t.entries.insert(
            token,
            Entry {
                source,
                wait: Wait::idle(),
                due: true,
            },
        );
        t.fds_changed = true;
        drop(t);
        self.wake();
        Registration {
            reactor: self.clone(),
            token,
            pid: std::process::id(),
        }
    }

    /// The reactor thread: runs the sources that are due, one at a time, then polls; for good.
    fn run(&self) {
        let mut scratch = Scratch::default();
        loop {
            self.run_due(&mut scratch);
            self.poll(&mut scratch, None);
        }
    }

    /// Runs the sources that are due, one at a time. Sources whose turn is running (further
    /// up this thread's stack, in a nested round) are left out.
    fn run_due(&self, s: &mut Scratch) {
        let now = Instant::now();
        {
            let t = self.table();
            let Table {
                entries, running, ..
            } = &*t;
            for (&token, e) in entries.iter() {
                if running.iter().any(|&(t, _)| t == token) {
                    continue;
                }
                if e.is_due(now) {
                    s.due.push(token);
                }
            }
        }
        for token in std::mem::take(&mut s.due) {
            self.turn(token);
        }
    }

    /// Polls until one of the fds the sources want is ready, the earliest deadline, or `until`
    /// (at once if a source is due), and marks the sources whose fds are ready due. Sources
    /// whose turn is running are left out.
    fn poll(&self, s: &mut Scratch, until: Option<Instant>) {
        s.fds
            .push(RawPollFd::new(self.waker.as_fd().as_raw_fd(), true, false));
        s.owner.push(u64::MAX);
        let timeout = {
            let t = self.table();
            let mut deadline = until;
            let mut pending = false;
            for (&token, e) in t.entries.iter() {
                if t.is_running(token) {
                    continue;
                }
                pending |= e.due;
                if let Some(d) = e.wait.deadline {
                    deadline = Some(deadline.map_or(d, |m| m.min(d)));
                }
                for &(fd, r, w) in e.wait.fds.iter().flatten() {
                    s.fds.push(RawPollFd::new(fd, r, w));
                    s.owner.push(token);
                }
            }
            if pending {
                Some(Duration::ZERO)
            } else {
                deadline.map(|d| d.saturating_duration_since(Instant::now()))
            }
        };
        match sys::poll_raw(&mut s.fds, timeout) {
            Ok(_) => {
                if s.fds[0].ready().any() {
                    self.woken
                        .store(false, std::sync::atomic::Ordering::Release);
                    self.waker.drain();
                }
                let mut t = self.table();
                for (p, token) in s.fds.iter().zip(&s.owner).skip(1) {
                    if p.ready().any() {
                        if let Some(e) = t.entries.get_mut(token) {
                            e.due = true;
                        }
                    }
                }
            }
            // poll itself failed (no memory for its tables): try again shortly; the
            // sources' own state is untouched.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
        s.fds.clear();
        s.owner.clear();
    }

    /// Runs one source's `on_ready` (if it is still registered, and still due: a nested round
    /// may have run it since it was found due) and files its next `Wait`.
    ///
    /// The source is held (shared) only for the turn, and that hold ends before the turn is
    /// marked over: a `Registration` dropped meanwhile waits for the mark, so once its drop
    /// returns the source is gone (its fds closed), not kept alive by this thread.
    fn turn(&self, token: u64) {
        let source = {
            let mut t = self.table();
            let source = match t.entries.get_mut(&token) {
                Some(e) if e.is_due(Instant::now()) => {
                    e.due = false;
                    e.wait.deadline = None;
                    e.source.clone()
                }
                _ => return,
            };
            t.running.push((token, thread::current().id()));
            source
        };
        let wait = catch_unwind(AssertUnwindSafe(|| source.on_ready()));
        drop(source);
        let mut t = self.table();
        let gone = match wait {
            Ok(wait) => {
                let mut changed = false;
                if let Some(e) = t.entries.get_mut(&token) {
                    changed = e.wait.fds != wait.fds;
                    e.wait = wait;
                }
                if changed {
                    t.fds_changed = true;
                }
                // A threadless reactor's turn outside its owner's `drive` (a blocking call's
                // nested round, on any thread): what the owner's loop waits on may be stale
                // (new fds, a new deadline, a notification the owner's drive skipped while
                // this turn ran), so it must look again.
                if self.driven.is_some() && !driven::in_drive(self) {
                    self.wake();
                }
                None
            }
            // A user's handler panicked: only its own source stops.
            Err(_) => {
                t.fds_changed = true;
                t.entries.remove(&token)
            }
        };
        drop(t);
        if let Some(e) = &gone {
            // (A second panic, in the face's own wrap-up, changes nothing more.)
            let _ = catch_unwind(AssertUnwindSafe(|| e.source.on_panicked()));
        }
        // Outside the table's lock (the source's drop may take locks of its own), and before
        // the turn is marked over.
        drop(gone);
        let me = thread::current().id();
        let mut t = self.table();
        t.running.retain(|&r| r != (token, me));
        // (Under the lock, which a drop holds from its look at `running` to its wait: no
        // wake-up is lost. Without waiters, no system call.)
        if t.dropping > 0 {
            self.turn_done.notify_all();
        }
    }
}

/// A round's working lists, kept between rounds (no allocation per round once warm).
#[derive(Default)]
struct Scratch {
    due: Vec<u64>,
    /// The poll set: the waker, then each source's fds as it wants them; and whose they are.
    fds: Vec<RawPollFd>,
    owner: Vec<u64>,
}

/// Most turns stacked by nested rounds (see [`nested_until`]); a wait deeper than that does not
/// run the others' turns (it gives up at once, as at its deadline).
const MAX_NESTING: usize = 16;

impl Reactor {
    /// For a blocking call that must drive this reactor ([`must_drive`](Reactor::must_drive):
    /// made on its thread from a handler, or on any thread for a threadless reactor): runs the
    /// reactor's sources until `done()` or `deadline`, whichever is first, so that what the
    /// call waits for (a response, from a peer served by this very reactor perhaps) can arrive;
    /// returns the last `done()`. The sources whose turns are running (further up the stack, or
    /// on another thread) are left out (their state is locked by those turns), so a call waiting
    /// on its own channel from that channel's handler waits out its deadline.
    pub(crate) fn nested_until(
        &self,
        mut done: impl FnMut() -> bool,
        deadline: Option<Instant>,
    ) -> bool {
        debug_assert!(self.must_drive());
        if self.table().running.len() > MAX_NESTING {
            // Handlers waiting inside handlers, this deep: refuse rather than grow the stack.
            return done();
        }
        let mut scratch = Scratch::default();
        loop {
            if done() {
                return true;
            }
            if deadline.is_some_and(|d| d <= Instant::now()) {
                return false;
            }
            self.run_due(&mut scratch);
            // A turn just run may be what it waits for: check before waiting for more.
            if done() {
                return true;
            }
            self.poll(&mut scratch, deadline);
        }
    }
}

impl Registration {
    /// Has the source's `on_ready` run soon (something changed that it must act on).
    pub(crate) fn notify(&self) {
        if self.pid == std::process::id() {
            self.notifier().notify();
        }
    }

    /// A handle that only notifies: for what the source itself holds (holding the
    /// registration there would keep the source registered for good).
    pub(crate) fn notifier(&self) -> Notifier {
        Notifier {
            reactor: Arc::downgrade(&self.reactor),
            token: self.token,
        }
    }

    /// The reactor the source is on.
    pub(crate) fn reactor(&self) -> &Arc<Reactor> {
        &self.reactor
    }
}

/// Notifies a source (see [`Registration::notifier`]); does nothing once it is taken out.
/// (A weak hold: sources keep notifiers, and a threadless reactor's table keeps its sources.)
#[derive(Clone)]
pub(crate) struct Notifier {
    reactor: std::sync::Weak<Reactor>,
    token: u64,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("token", &self.token)
            .finish()
    }
}

impl Notifier {
    /// See [`Registration::notify`].
    pub(crate) fn notify(&self) {
        let Some(reactor) = self.reactor.upgrade() else {
            return;
        };
        let mut t = reactor.table();
        if let Some(e) = t.entries.get_mut(&self.token) {
            e.due = true;
        }
        drop(t);
        reactor.wake();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // Inherited by a forked child: the source never runs here; leave it be.
            return;
        }
        // A turn of the source running on this thread (a handler dropping its own channel)
        // ends by itself; one on another thread is waited for.
        let me = thread::current().id();
        let mut t = self.reactor.table();
        let gone = t.entries.remove(&self.token);
        t.fds_changed = true;
        if !t.running.contains(&(self.token, me)) {
            while t.is_running(self.token) {
                t.dropping += 1;
                t = self
                    .reactor
                    .turn_done
                    .wait(t)
                    .unwrap_or_else(|e| e.into_inner());
                t.dropping -= 1;
            }
        }
        drop(t);
        // The source (and its fds) may be dropped here: outside the table's lock.
        drop(gone);
        // The thread may be in `poll` with the source's fds: the kernel holds their files for
        // the call, so they stay open (the peer sees no end) until it returns. Wake it. (A
        // threadless reactor's owner takes the fds out of its set at its next turn.)
        self.reactor.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counter {
        runs: AtomicUsize,
        until: usize,
    }

    impl Source for Counter {
        fn on_ready(&self) -> Wait {
            let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
            if n < self.until {
                Wait::again()
            } else {
                Wait::idle()
            }
        }
    }

    fn wait_for(what: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !what() {
            assert!(Instant::now() < end, "timed out");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_source_runs_at_registration_again_when_asked_and_when_notified() {
        let r = get().unwrap();
        let c = Arc::new(Counter {
            runs: AtomicUsize::new(0),
            until: 3,
        });
        let reg = r.register(c.clone());
        wait_for(|| c.runs.load(Ordering::SeqCst) == 3);
        thread::sleep(Duration::from_millis(20));
        assert_eq!(c.runs.load(Ordering::SeqCst), 3, "idle sources do not run");
        reg.notify();
        wait_for(|| c.runs.load(Ordering::SeqCst) == 4);
        drop(reg);
        assert_eq!(Arc::strong_count(&c), 1, "taken out, the source is dropped");
    }

    struct Panics;
    impl Source for Panics {
        fn on_ready(&self) -> Wait {
            panic!("a handler panicked");
        }
    }

    #[test]
    fn a_panicking_source_takes_out_only_itself() {
        let r = get().unwrap();
        let p = Arc::new(Panics);
        let _reg = r.register(p.clone());
        wait_for(|| Arc::strong_count(&p) == 1);
        let c = Arc::new(Counter {
            runs: AtomicUsize::new(0),
            until: 1,
        });
        let _r2 = r.register(c.clone());
        wait_for(|| c.runs.load(Ordering::SeqCst) == 1);
    }

    struct Readable {
        fd: OwnedFd,
        runs: AtomicUsize,
    }
    impl Source for Readable {
        fn on_ready(&self) -> Wait {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let mut b = [0u8; 16];
            let _ = sys::recv_plain(self.fd.as_fd(), &mut b, false);
            Wait {
                fds: [Some((self.fd.as_raw_fd(), true, false)), None],
                deadline: None,
            }
        }
    }

    #[test]
    fn a_readable_fd_runs_its_source() {
        use std::io::Write;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let src = Arc::new(Readable {
            fd: b.into(),
            runs: AtomicUsize::new(0),
        });
        let _reg = get().unwrap().register(src.clone());
        wait_for(|| src.runs.load(Ordering::SeqCst) == 1);
        a.write_all(b"x").unwrap();
        wait_for(|| src.runs.load(Ordering::SeqCst) == 2);
    }
}
