//! Sharing an arena with another process over a Unix socket: [`Arena::send_to`] writes the
//! pools' fds (`SCM_RIGHTS`) in share messages, [`Arena::join_from`] and
//! [`Arena::add_pools_from`] read them.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::super::error::{Error, ReceiveError};
use super::super::pool::Pool;
use super::{Arena, ArenaConfig};
use crate::sys;

/// First bytes of every share message.
const MAGIC: [u8; 8] = *b"FIPCPOOL";
/// Version of the share message format.
const VERSION: u16 = 1;
/// Bytes of a share message.
const MESSAGE_LEN: usize = 16;
/// Most fds one share message carries (what the receiving side's control buffer holds).
const FDS_PER_MESSAGE: usize = sys::MAX_FDS_PER_MSG;
/// Most pools a share may announce (the largest `max_pools`).
const MAX_POOLS: u32 = 1024;

fn encode(fds: usize, total: u32) -> [u8; MESSAGE_LEN] {
    let mut m = [0u8; MESSAGE_LEN];
    m[..8].copy_from_slice(&MAGIC);
    m[8..10].copy_from_slice(&VERSION.to_le_bytes());
    // `fds` is at most FDS_PER_MESSAGE (8): it fits.
    m[10..12].copy_from_slice(&(fds as u16).to_le_bytes());
    m[12..16].copy_from_slice(&total.to_le_bytes());
    m
}

/// The header of one share message: (fds attached, pools in the whole share).
fn decode(m: &[u8; MESSAGE_LEN]) -> Result<(usize, u32), ReceiveError> {
    if m[..8] != MAGIC {
        return Err(ReceiveError::BadMessage("bad magic"));
    }
    if u16::from_le_bytes([m[8], m[9]]) != VERSION {
        return Err(ReceiveError::BadMessage("unknown share format version"));
    }
    let fds = usize::from(u16::from_le_bytes([m[10], m[11]]));
    let total = u32::from_le_bytes([m[12], m[13], m[14], m[15]]);
    if !(1..=FDS_PER_MESSAGE).contains(&fds) {
        return Err(ReceiveError::BadMessage(
            "fd count of a message out of range",
        ));
    }
    if !(1..=MAX_POOLS).contains(&total) {
        return Err(ReceiveError::BadMessage("pool count out of range"));
    }
    Ok((fds, total))
}

/// Sends all of `bytes` with `fds` attached to the first byte, retrying on `EINTR` and after
/// a short send.
fn send_all(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let (mut sent, mut fds) = (0, fds);
    while sent < bytes.len() {
        match sys::send_with_fds(sock, &bytes[sent..], fds) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            // The fds went with the first byte sent.
            Ok(n) => (sent, fds) = (sent + n, &[]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one share message (exactly [`MESSAGE_LEN`] bytes: nothing the peer sent after it)
/// and the fds that came with it.
fn recv_message(sock: &UnixStream) -> Result<([u8; MESSAGE_LEN], Vec<OwnedFd>), ReceiveError> {
    let mut m = [0u8; MESSAGE_LEN];
    let (mut got, mut fds) = (0, Vec::new());
    while got < MESSAGE_LEN {
        let r =
            sys::recv_with_fds_waiting(sock.as_fd(), &mut m[got..]).map_err(ReceiveError::Io)?;
        if r.fds_truncated {
            // Those that did arrive are closed here, on drop.
            return Err(ReceiveError::BadMessage(
                "more fds with one message than a share carries",
            ));
        }
        if r.bytes == 0 {
            return Err(ReceiveError::EndOfStream);
        }
        got += r.bytes;
        fds.extend(r.fds);
    }
    Ok((m, fds))
}

/// Reads a whole share: its messages, until the announced number of fds has arrived.
fn recv_share(sock: &UnixStream) -> Result<Vec<OwnedFd>, ReceiveError> {
    let mut all = Vec::new();
    let mut announced = None;
    loop {
        let (m, fds) = recv_message(sock)?;
        let (expected, total) = decode(&m)?;
        if announced.is_some_and(|t| t != total) {
            return Err(ReceiveError::BadMessage(
                "pool count differs between the messages of one share",
            ));
        }
        announced = Some(total);
        if fds.len() != expected {
            return Err(ReceiveError::FdCount {
                expected,
                received: fds.len(),
            });
        }
        all.extend(fds);
        match all.len().cmp(&(total as usize)) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => return Ok(all),
            std::cmp::Ordering::Greater => {
                return Err(ReceiveError::BadMessage(
                    "more fds than the share announces",
                ))
            }
        }
    }
}

impl Arena {
    /// Sends this arena to the process at the other end of `sock`, which receives it with
    /// [`Arena::join_from`] (or, if it already has the arena, [`Arena::add_pools_from`]): the
    /// fd of every pool this process knows goes over the socket (`SCM_RIGHTS`), so the peer
    /// maps the same memory. A few bytes per 8 pools are written; nothing else is, so the
    /// socket may carry the application's own traffic before and after.
    ///
    /// The arena grows by a pool when its pools are full; a peer learns of pools created after
    /// the share only from another `send_to` (received with [`Arena::add_pools_from`]). Until
    /// then, a [lend blob](super::super::LendBlob) naming the new pool is refused there with
    /// [`Error::UnknownPool`].
    ///
    /// `sock` should be in blocking mode (as [`UnixStream`]s are made); a send never raises
    /// `SIGPIPE`. An error leaves the share partly written: the peer's receive fails, and the
    /// connection should be dropped.
    ///
    /// # Wire format
    /// One message per 8 pools, 16 bytes each, the fds attached to its first byte: the magic
    /// `b"FIPCPOOL"`, the format version (1) as a little-endian `u16`, the number of fds attached
    /// (1..=8) as a little-endian `u16`, and the number of pools in the whole share as a
    /// little-endian `u32`.
    ///
    /// # Example
    /// ```
    /// use std::os::unix::net::UnixStream;
    /// use flowipc::shm::{Arena, ArenaConfig, ShmHandle};
    ///
    /// // In real use the two ends belong to two processes.
    /// let (mine, theirs) = UnixStream::pair()?;
    /// let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20))?;
    /// arena.send_to(&mine)?;
    ///
    /// let joined = Arena::join_from(&theirs, ArenaConfig::new())?;
    /// assert_eq!((joined.id(), joined.pool_ids()), (arena.id(), vec![0]));
    /// let h = arena.construct(42u64)?;
    /// let there: ShmHandle<u64> = joined.borrow(&h.lend())?;
    /// assert_eq!(*there, 42);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_to(&self, sock: &UnixStream) -> io::Result<()> {
        let pools: Vec<&Pool> = self.pools().collect();
        // At most `max_pools` (1024) pools: the count fits.
        let total = pools.len() as u32;
        for batch in pools.chunks(FDS_PER_MESSAGE) {
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|p| p.fd()).collect();
            send_all(sock, &encode(fds.len(), total), &fds)?;
        }
        Ok(())
    }

    /// Joins the arena that the process at the other end of `sock` sends with
    /// [`Arena::send_to`]. Waits for the share (see [`ReceiveError::Io`] for timeouts) and
    /// reads it, and nothing the peer sent after it. Every fd is validated as by
    /// [`Arena::join`]: a sealed memfd with a flowipc pool header of this layout version, all
    /// of one arena, pool 0 among them, no id twice.
    ///
    /// `config` applies to this process's instance (`max_pools` must cover the highest pool id
    /// received). It is checked first: a bad one fails with [`ReceiveError::Arena`] and reads
    /// nothing.
    ///
    /// Fails with the specific [`ReceiveError`]; no fd received is leaked, whatever happens.
    /// See [`Arena::send_to`] for an example.
    pub fn join_from(sock: &UnixStream, config: ArenaConfig) -> Result<Arena, ReceiveError> {
        config.validate().map_err(ReceiveError::Arena)?;
        let fds = recv_share(sock)?;
        Arena::join(fds, config).map_err(ReceiveError::Arena)
    }

    /// Receives a share of this arena sent with [`Arena::send_to`] (by a process whose arena
    /// has grown since this one joined) and adds the pools this process does not know yet.
    /// Returns their ids, ascending (empty if there were none). Pools already known are
    /// skipped.
    ///
    /// Every fd is validated as by [`Arena::add_pool`]; if any is refused (not a pool, a pool
    /// of another arena, an id beyond this instance's `max_pools`, an id twice in the share),
    /// none is added and the arena is as before.
    ///
    /// ```
    /// use std::os::unix::net::UnixStream;
    /// use flowipc::shm::{Arena, ArenaConfig};
    ///
    /// let (mine, theirs) = UnixStream::pair()?;
    /// let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20))?;
    /// arena.send_to(&mine)?;
    /// let joined = Arena::join_from(&theirs, ArenaConfig::new())?;
    ///
    /// let big = arena.alloc(4 << 20)?; // does not fit in pool 0: the arena grows by pool 1
    /// arena.send_to(&mine)?;
    /// assert_eq!(joined.add_pools_from(&theirs)?, vec![1]);
    /// assert_eq!(joined.pool_ids(), vec![0, 1]);
    /// # drop(big);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn add_pools_from(&self, sock: &UnixStream) -> Result<Vec<u32>, ReceiveError> {
        let fds = recv_share(sock)?;
        let mut ids = Vec::with_capacity(fds.len());
        let mut new = Vec::new();
        for fd in fds {
            let pool = Pool::open(fd, self.shared.config.trim).map_err(ReceiveError::Arena)?;
            let id = pool.id();
            if pool.arena_id() != self.shared.id {
                return Err(ReceiveError::Arena(Error::WrongArena {
                    expected: self.shared.id,
                    found: pool.arena_id(),
                }));
            }
            if ids.contains(&id) {
                return Err(ReceiveError::Arena(Error::DuplicatePool(id)));
            }
            if id >= self.shared.config.max_pools {
                return Err(ReceiveError::Arena(Error::BadConfig(
                    "pool id beyond max_pools",
                )));
            }
            ids.push(id);
            if self.pool(id).is_none() {
                new.push(pool);
            }
        }
        let mut added = Vec::with_capacity(new.len());
        for pool in new {
            let id = pool.id();
            match self.insert(pool) {
                Ok(()) => added.push(id),
                // Another thread added it meanwhile: known now all the same.
                Err(Error::DuplicatePool(_)) => {}
                Err(e) => return Err(ReceiveError::Arena(e)),
            }
        }
        added.sort_unstable();
        Ok(added)
    }
}
