//! A ring's memory: one sealed memfd per direction, made by the producer and mapped by both
//! sides (the protocol is in [`ring`](super::ring)).
//!
//! Layout (all little-endian, offsets in bytes):
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic `b"FIPCRING"` |
//! | 8 | layout version, u64 |
//! | 16 | capacity, u64 (a power of two, [`MIN_RING`]..=[`MAX_RING`]) |
//! | 128 | `tail`, the producer's position (its own cache line pair) |
//! | 256 | `head`, the consumer's position |
//! | 384 | `data_bell` |
//! | 512 | `space_bell` |
//! | 4096 | the ring's bytes |
//!
//! The file is sealed against shrinking and growing before its fd leaves the process, so the
//! peer cannot make a mapping fault (`SIGBUS`); an opened file is checked for those seals, the
//! magic, the version and a size that agrees with the capacity. The memfd has no name in any
//! file system: nothing outlives the processes that map it.

use crate::sync::{AtomicU32, AtomicU64, Ordering};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};

use super::ring::{Control, RingBytes};

/// Smallest ring capacity.
pub const MIN_RING: u64 = 4 << 10;
/// Largest ring capacity.
pub const MAX_RING: u64 = 1 << 30;

const MAGIC: u64 = u64::from_le_bytes(*b"FIPCRING");
const VERSION: u64 = 1;
const TAIL: usize = 128;
const HEAD: usize = 256;
const DATA_BELL: usize = 384;
const SPACE_BELL: usize = 512;
const DATA: usize = 4096;

/// Why a ring file could not be made or opened.
#[derive(Debug)]
pub(crate) enum MapError {
    /// A system call failed.
    Io(std::io::Error),
    /// The file is not a ring (the reason).
    NotARing(&'static str),
}

/// One direction's ring, mapped.
#[derive(Debug)]
pub(crate) struct RingMap {
    file: File,
    map: MmapRaw,
    cap: u64,
}

impl RingMap {
    /// Makes a ring of `cap` bytes (rounded up to a power of two within the bounds), sealed.
    pub(crate) fn create(cap: u64) -> Result<RingMap, MapError> {
        let cap = cap.clamp(MIN_RING, MAX_RING).next_power_of_two();
        let file = crate::sys::memfd_sealable("flowipc-ring").map_err(MapError::Io)?;
        file.set_len(DATA as u64 + cap).map_err(MapError::Io)?;
        crate::sys::seal_size(&file).map_err(MapError::Io)?;
        let ring = RingMap::map(file, cap)?;
        ring.word(8).store(VERSION, Ordering::Relaxed);
        ring.word(16).store(cap, Ordering::Relaxed);
        // The peer maps the file only after receiving its fd over a socket, which orders
        // these stores before its loads.
        ring.word(0).store(MAGIC, Ordering::Relaxed);
        Ok(ring)
    }

    /// Opens a ring whose fd came from the peer, validating it.
    pub(crate) fn open(fd: OwnedFd) -> Result<RingMap, MapError> {
        if !crate::sys::is_size_sealed(fd.as_fd()) {
            return Err(MapError::NotARing("the file's size is not sealed"));
        }
        let file = File::from(fd);
        let size = file.metadata().map_err(MapError::Io)?.len();
        let cap = size.wrapping_sub(DATA as u64);
        if size <= DATA as u64 || !cap.is_power_of_two() || !(MIN_RING..=MAX_RING).contains(&cap) {
            return Err(MapError::NotARing("the file's size is not a ring's"));
        }
        let ring = RingMap::map(file, cap)?;
        if ring.word(0).load(Ordering::Relaxed) != MAGIC {
            return Err(MapError::NotARing("bad magic"));
        }
        if ring.word(8).load(Ordering::Relaxed) != VERSION {
            return Err(MapError::NotARing("unknown layout version"));
        }
        if ring.word(16).load(Ordering::Relaxed) != cap {
            return Err(MapError::NotARing(
                "capacity disagrees with the file's size",
            ));
        }
        Ok(ring)
    }

    fn map(file: File, cap: u64) -> Result<RingMap, MapError> {
        let map = MmapOptions::new()
            .len(DATA + cap as usize)
            .map_raw(&file)
            .map_err(MapError::Io)?;
        Ok(RingMap { file, map, cap })
    }

    /// The fd to send to the peer.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= DATA);
        // SAFETY: `off` is one of this module's header offsets: 8-aligned and inside the first
        // page of a mapping that is at least DATA + MIN_RING bytes long (created or checked so)
        // and page-aligned (mmap), and lives as long as `self`. Every bit pattern is a valid
        // u64, and every access to these words, in every process, is atomic.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= DATA);
        // SAFETY: as in `word`: an aligned header offset inside the live mapping, accessed only
        // atomically in every process; every bit pattern is a valid u32.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU32) }
    }

    /// The shared control words.
    pub(crate) fn control(&self) -> Control<'_> {
        Control {
            tail: self.word(TAIL),
            head: self.word(HEAD),
            data_bell: self.word32(DATA_BELL),
            space_bell: self.word32(SPACE_BELL),
        }
    }
}

impl RingBytes for RingMap {
    fn cap(&self) -> u64 {
        self.cap
    }

    fn write_at(&self, off: usize, src: &[u8]) {
        assert!(off <= self.cap as usize && src.len() <= self.cap as usize - off);
        // SAFETY: the range is inside the ring's bytes (checked above; the mapping is DATA +
        // cap long and lives as long as `self`). Only the producer writes, and only bytes the
        // protocol gives it (between its tail and the consumer's head plus cap, see
        // `ring::Producer::push`), which a correct consumer does not read until the tail that
        // publishes them; a peer that breaks the protocol can garble the bytes it reads, which
        // the frame parser checks like any bytes from a socket. `src` is private memory, so the
        // two ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.map.as_mut_ptr().add(DATA + off),
                src.len(),
            )
        }
    }

    fn read_at(&self, off: usize, dst: &mut [u8]) {
        assert!(off <= self.cap as usize && dst.len() <= self.cap as usize - off);
        // SAFETY: the range is inside the ring's bytes (checked above, the mapping outlives the
        // call). Only the consumer reads, and only bytes the producer published (between the
        // consumer's head and the tail it acquired, see `ring::Consumer::pop`), which a correct
        // producer does not write again until the head that frees them. `dst` is private
        // memory: no overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(DATA + off),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }
}
