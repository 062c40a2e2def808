//! A session's arenas grow by pools, and each side tells the other of the pools it knows that
//! the other may not: on the master channel, as `resource` messages (kind: which arena, index:
//! the pool id, the pool's memfd riding along), the same message that carries pool 0 at log-in.
//!
//! Where a handle into a new pool can reach the peer, the pool goes first:
//! * a message of a structured channel: the channel announces the pools of its arena on itself,
//!   before the message (the message layer's own mechanism: its `POOL` frames), so it is in
//!   order on that channel;
//! * a lend ([`Session::lend_object`](super::Session::lend_object)): the pool goes on the master
//!   channel before the blob is returned; the peer's
//!   [`borrow_object`](super::Session::borrow_object) of a blob naming a pool it does not know
//!   yet, but that exists, waits (up to the open timeout) for the master channel to bring it;
//! * the client's growth: announced at once (its ledger's pages may be in the new pool, and the
//!   server reads them if the client dies);
//! * a client logging in to an app-scope arena that grew before: the server announces the
//!   pools past 0 as soon as the session opens.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Instant;

use super::core::Master;
use super::proto::{RES_APP_ARENA, RES_SESSION_ARENA};
use super::Error;
use crate::shm::Arena;
use crate::struc;
use crate::sync::lock;

/// Pool ids the peer knows, a bit each.
#[derive(Default)]
struct Known(Vec<u64>);

impl Known {
    fn has(&self, id: u32) -> bool {
        self.0
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    fn set(&mut self, id: u32) {
        let word = id as usize / 64;
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (id % 64);
    }
}

/// What one side of a session knows of its arenas' pools (see the module docs).
pub(crate) struct Pools {
    /// The session-scope and app-scope arenas (none in a vanilla session).
    arenas: [Option<Arena>; 2],
    /// Per arena: the pools the peer knows (pool 0 from the log-in; those announced either way).
    known: Mutex<[Known; 2]>,
    /// Signalled when a pool arrives from the peer.
    arrived: Condvar,
    master: Mutex<Weak<struc::AsyncChannel<Master>>>,
}

/// The wire kind of the arena at `i` (0: session scope, 1: app scope).
const KINDS: [u8; 2] = [RES_SESSION_ARENA, RES_APP_ARENA];

impl Pools {
    pub(crate) fn new(arenas: &(Option<Arena>, Option<Arena>)) -> Pools {
        let mut known: [Known; 2] = Default::default();
        for k in known.iter_mut() {
            k.set(0);
        }
        Pools {
            arenas: [arenas.0.clone(), arenas.1.clone()],
            known: Mutex::new(known),
            arrived: Condvar::new(),
            master: Mutex::new(Weak::new()),
        }
    }

    /// The master channel announcements go on (set once the session is open).
    pub(crate) fn set_master(&self, master: &Arc<struc::AsyncChannel<Master>>) {
        *lock(&self.master) = Arc::downgrade(master);
    }

    fn index_of(&self, arena: &Arena) -> Option<usize> {
        self.arenas
            .iter()
            .position(|a| a.as_ref().is_some_and(|a| a.id() == arena.id()))
    }

    /// Announces every pool of both arenas the peer may not know.
    pub(crate) fn announce_all(&self) -> Result<(), Error> {
        for i in 0..2 {
            self.announce_at(i)?;
        }
        Ok(())
    }

    /// Announces the pools of `arena` (one of the session's) the peer may not know.
    pub(crate) fn announce(&self, arena: &Arena) -> Result<(), Error> {
        match self.index_of(arena) {
            Some(i) => self.announce_at(i),
            None => Ok(()),
        }
    }

    fn announce_at(&self, i: usize) -> Result<(), Error> {
        let Some(arena) = &self.arenas[i] else {
            return Ok(());
        };
        // (Not under the lock while sending: the master's handlers take it, holding the
        // master. Two announcements at once may send a pool twice: the peer skips the second.)
        let new: Vec<u32> = {
            let known = lock(&self.known);
            // (Every pool known here is known there: the common case, no list made.)
            if known[i].count() >= arena.pool_count() {
                return Ok(());
            }
            arena
                .pool_ids()
                .into_iter()
                .filter(|id| !known[i].has(*id))
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        let Some(master) = lock(&self.master).upgrade() else {
            return Err(Error::NotStarted);
        };
        for id in new {
            let Some(fd) = arena.pool_fd(id) else {
                continue;
            };
            let fd = fd.try_clone_to_owned().map_err(Error::Io)?;
            let mut m = master.create_msg();
            m.set_fd(fd);
            let mut r = m.init_root().init_resource();
            r.set_kind(KINDS[i]);
            r.set_index(id);
            master.send(&mut m, None)?;
            lock(&self.known)[i].set(id);
        }
        Ok(())
    }

    /// Has the client's growth of its arenas announced at once (see the module docs). The hook
    /// holds the session's pools weakly.
    pub(crate) fn watch_growth(self: &Arc<Self>) {
        for (i, arena) in self.arenas.iter().enumerate() {
            if let Some(arena) = arena {
                let me = Arc::downgrade(self);
                arena.on_growth(Box::new(move || {
                    if let Some(me) = me.upgrade() {
                        // (A failure leaves the pool to the next announcement.)
                        let _ = me.announce_at(i);
                    }
                }));
            }
        }
    }

    /// A pool the peer announced: `kind` names the arena, `index` the pool id; the pool's fd
    /// came with the message.
    pub(crate) fn received(
        &self,
        kind: u8,
        index: u32,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), Error> {
        let bad = || Error::Protocol("a pool announcement the session's arena refused");
        let i = KINDS.iter().position(|k| *k == kind).ok_or_else(bad)?;
        let (Some(arena), Some(fd)) = (&self.arenas[i], fd) else {
            return Err(bad());
        };
        let id = match arena.add_pool(fd) {
            Ok(id) => id,
            // Ours (we made it), or known already.
            Err(crate::shm::Error::DuplicatePool(id)) => id,
            Err(_) => return Err(bad()),
        };
        if id != index {
            return Err(bad());
        }
        lock(&self.known)[i].set(id);
        self.arrived.notify_all();
        Ok(())
    }

    /// Waits until pool `id` of `arena` is known here, if it exists arena-wide (a peer's
    /// announcement on its way), up to `deadline`. Returns whether it is known.
    pub(crate) fn wait_for(&self, arena: &Arena, id: u32, deadline: Instant) -> bool {
        let known = || arena.pool(id).is_some();
        if known() || !arena.pool_claimed(id) {
            return known();
        }
        let reactor = lock(&self.master)
            .upgrade()
            .and_then(|m| m.reactor().cloned());
        if let Some(r) = reactor.filter(|r| r.must_drive()) {
            // On the library thread (a handler), or a sync_io session: the master channel
            // brings it in this thread's turns; serve the others while waiting.
            return r.nested_until(known, Some(deadline));
        }
        let mut guard = lock(&self.known);
        while !known() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .arrived
                .wait_timeout(guard, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }
}
