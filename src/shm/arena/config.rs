//! [`ArenaConfig`]: how an arena is built (pool size, pool limit, trimming), and its validation.

use super::super::error::{Error, Result};
use super::super::layout::{MAX_POOL_BYTES, MIN_POOL_BYTES};

/// How an arena is built. All knobs have defaults that let a 1 GiB block be allocated.
///
/// ```
/// use flowipc::shm::{Arena, ArenaConfig};
/// let arena = Arena::create(ArenaConfig::new().pool_size(64 << 20).max_pools(4))?;
/// assert_eq!(arena.pool_ids(), vec![0]);
/// # Ok::<(), flowipc::shm::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ArenaConfig {
    pub(super) pool_size: u64,
    pub(super) max_pools: u32,
    pub(super) trim: bool,
    pub(super) max_bytes: u64,
}

impl Default for ArenaConfig {
    fn default() -> Self {
        ArenaConfig {
            pool_size: 1 << 30,
            max_pools: 64,
            trim: false,
            max_bytes: u64::MAX,
        }
    }
}

impl ArenaConfig {
    /// The defaults: 1 GiB pools (sparse: only touched pages cost RAM), up to 64 pools, no byte
    /// limit, no trimming.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of each new pool (rounded up to pages). A request larger than a pool gets a pool of
    /// its own, sized to fit.
    pub fn pool_size(mut self, bytes: u64) -> Self {
        self.pool_size = bytes;
        self
    }

    /// Most pools the arena may have (1..=1024). When all are full, allocation fails with
    /// [`Error::OutOfMemory`].
    pub fn max_pools(mut self, n: u32) -> Self {
        self.max_pools = n;
        self
    }

    /// Most bytes the arena's pools may take together (pools are sparse: this bounds the RAM
    /// the arena can ever use, not what it uses). The process that [creates](super::Arena::create)
    /// the arena records it in the arena: every process that grows the arena obeys the
    /// creator's limit (a joiner's own setting is not used). A growth that would pass it gets a
    /// smaller pool if that still fits the request, else fails with [`Error::LimitReached`]
    /// (nothing is made; the arena stays usable). The first pool is cut to the limit if it is
    /// larger. At least the smallest pool (about 84 KiB); default: no limit.
    ///
    /// ```
    /// use flowipc::shm::{Arena, ArenaConfig, Error};
    /// let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20).max_bytes(3 << 20))?;
    /// let a = arena.alloc(1 << 20)?; // pool 0 cannot hold it with its header: pool 1, 1 MiB+
    /// let e = arena.alloc(2 << 20).unwrap_err(); // another 2 MiB+ pool would pass 3 MiB
    /// assert!(matches!(e, Error::LimitReached { limit, .. } if limit == 3 << 20));
    /// let small = arena.alloc(1000)?; // what fits still does
    /// # drop((a, small));
    /// # Ok::<(), flowipc::shm::Error>(())
    /// ```
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Whether freed large extents (more than one page) give their pages back to the kernel
    /// (`fallocate` punch-hole). Saves RAM; costs a page fault per page when the space is
    /// reused (about 2.7 µs per 4 KiB page on the project's machines), so it is off by default.
    /// Extents freed clean (a message's segments, which their last holder clears) are never
    /// trimmed: the `memset` that cleared them is several times cheaper than the faults.
    pub fn trim_freed_extents(mut self, on: bool) -> Self {
        self.trim = on;
        self
    }

    pub(super) fn validate(&self) -> Result<()> {
        if !(1..=1024).contains(&self.max_pools) {
            return Err(Error::BadConfig("max_pools must be in 1..=1024"));
        }
        if self.pool_size < MIN_POOL_BYTES || self.pool_size > MAX_POOL_BYTES {
            return Err(Error::BadConfig("pool_size must be in 84 KiB..=1 TiB"));
        }
        if self.max_bytes < MIN_POOL_BYTES {
            return Err(Error::BadConfig("max_bytes must be at least 84 KiB"));
        }
        Ok(())
    }
}
