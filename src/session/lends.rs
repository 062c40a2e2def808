//! What a session's side keeps of lent objects so that a dead client's are given back (see
//! `shm::ledger`): the client keeps its ledger, the server what it lent the client and adopted of
//! the client's lends, and settles the client's ledger when the client dies.

use std::sync::{Arc, Mutex};

use super::Error;
use crate::shm::ledger::{self, Ledger, PeerLends};
use crate::shm::{Arena, LendBlob, ShmHandle, ShmSafe};
use crate::sync::lock;

/// One session's side of the lend ledger.
pub(crate) struct Lends {
    session_arena: Option<Arena>,
    app_arena: Option<Arena>,
    /// The client: its ledger (closed when its session ends). `None` on the server.
    ledger: Option<Arc<Ledger>>,
    /// The server: its lends to the client and adoptions of the client's; `None` once settled.
    peer: Mutex<Option<PeerLends>>,
}

impl Lends {
    /// The client's side: opens its ledger in the session arena, for both arenas.
    pub(super) fn client(arenas: &(Option<Arena>, Option<Arena>)) -> Result<Lends, Error> {
        let ledger = match arenas {
            (Some(s), Some(a)) => {
                let l = Ledger::open(s)?;
                l.keep_for(s);
                l.keep_for(a);
                Some(l)
            }
            _ => None,
        };
        Ok(Lends::new(arenas, ledger))
    }

    /// The server's side.
    pub(super) fn server(arenas: &(Option<Arena>, Option<Arena>)) -> Lends {
        Lends::new(arenas, None)
    }

    fn new(arenas: &(Option<Arena>, Option<Arena>), ledger: Option<Arc<Ledger>>) -> Lends {
        Lends {
            session_arena: arenas.0.clone(),
            app_arena: arenas.1.clone(),
            ledger,
            peer: Mutex::new(Some(PeerLends::default())),
        }
    }

    fn arenas(&self) -> Vec<&Arena> {
        self.session_arena
            .iter()
            .chain(self.app_arena.iter())
            .collect()
    }

    /// Lends `handle` to the peer (recorded on the server; refused once the peer's lends are
    /// settled: the dead client could never adopt it).
    pub(super) fn lend<T: ShmSafe>(&self, handle: &ShmHandle<T>) -> Result<LendBlob, Error> {
        if self.ledger.is_some() {
            return Ok(handle.lend());
        }
        let mut peer = lock(&self.peer);
        let p = peer.as_mut().ok_or(Error::Hosed)?;
        let blob = handle.lend();
        p.gave(handle.key(), &self.arenas());
        Ok(blob)
    }

    /// Borrows the peer's lend in `arena` (recorded on the server, so that settling knows the
    /// lend was adopted).
    pub(super) fn borrow<T: ShmSafe>(
        &self,
        arena: &Arena,
        blob: &LendBlob,
    ) -> Result<ShmHandle<T>, Error> {
        if self.ledger.is_some() {
            return Ok(arena.borrow(blob)?);
        }
        let mut peer = lock(&self.peer);
        let h: ShmHandle<T> = arena.borrow(blob)?;
        if let Some(p) = peer.as_mut() {
            p.got(h.key(), &self.arenas());
        }
        Ok(h)
    }

    /// The session ended with the peer gone: on the server, gives back what the client held and
    /// was lent (once; nothing if the client closed its ledger, ending its session alive).
    /// Returns how many references were given back.
    pub(super) fn peer_gone(&self) -> u64 {
        if self.ledger.is_some() {
            return 0;
        }
        let mut peer = lock(&self.peer);
        let (Some(p), Some(home)) = (peer.take(), &self.session_arena) else {
            return 0;
        };
        let given = ledger::settle(home, &self.arenas(), &p);
        // The dead client's thread caches too (their free blocks, their usage counts), here
        // rather than by the next client to claim its slots (which could be killed mid-way).
        for a in self.arenas() {
            a.reclaim_dead_caches();
        }
        given
    }

    /// The session ends on this side: the client closes its ledger (what it holds stays its
    /// own).
    pub(super) fn close(&self) {
        if let Some(l) = &self.ledger {
            l.close();
        }
    }
}

impl Drop for Lends {
    /// (A session that failed to open never closed its ledger.)
    fn drop(&mut self) {
        self.close();
    }
}
