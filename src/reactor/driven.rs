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
        let mut set = lock(&d.set);
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
}
