//! Byte buffers of the transport: [`AlignedBuf`] (received payloads, 8-aligned) and
//! [`SharedBytes`] (reference-counted outgoing bytes that a send queue keeps without copying).

use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::sync::Arc;

use super::Error;
use crate::sys;

/// Bytes whose start is 8-byte aligned: a received frame's payload.
///
/// The bytes live in `u64` words, so [`as_words`](AlignedBuf::as_words) can hand them to
/// readers that need aligned words (a Cap'n Proto reader over a segment does). The last word is
/// zero-padded past [`len`](AlignedBuf::len). Up to [`AlignedBuf::INLINE`] bytes are kept inline
/// (a message handle or a small control frame costs no allocation).
#[derive(Clone)]
pub struct AlignedBuf {
    store: Store,
    len: usize,
}

#[derive(Clone)]
enum Store {
    Inline([u64; INLINE_WORDS]),
    Heap(Vec<u64>),
}

const INLINE_WORDS: usize = 8;

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf {
            store: Store::Inline([0; INLINE_WORDS]),
            len: 0,
        }
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for AlignedBuf {}

impl AlignedBuf {
    /// Bytes kept inline, without a heap allocation.
    pub const INLINE: usize = INLINE_WORDS * 8;

    /// An empty buffer (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// `len` zero bytes, or `None` if the memory cannot be allocated. Large buffers are fresh
    /// zero pages: nothing is written until the caller writes.
    pub fn try_zeroed(len: usize) -> Option<Self> {
        if len <= Self::INLINE {
            return Some(AlignedBuf {
                store: Store::Inline([0; INLINE_WORDS]),
                len,
            });
        }
        let words = sys::try_zeroed_words(len.div_ceil(8))?;
        Some(AlignedBuf {
            store: Store::Heap(words),
            len,
        })
    }

    /// A copy of `bytes`, aligned.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = if bytes.len() <= Self::INLINE {
            AlignedBuf {
                store: Store::Inline([0; INLINE_WORDS]),
                len: bytes.len(),
            }
        } else {
            AlignedBuf {
                store: Store::Heap(vec![0u64; bytes.len().div_ceil(8)]),
                len: bytes.len(),
            }
        };
        buf.as_bytes_mut().copy_from_slice(bytes);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes as native-endian words; the last one is zero-padded when the length is not a
    /// multiple of 8.
    pub fn as_words(&self) -> &[u64] {
        match &self.store {
            Store::Inline(w) => &w[..self.len.div_ceil(8)],
            Store::Heap(w) => w,
        }
    }

    fn as_words_mut(&mut self) -> &mut [u64] {
        match &mut self.store {
            Store::Inline(w) => &mut w[..self.len.div_ceil(8)],
            Store::Heap(w) => w,
        }
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &sys::words_as_bytes(self.as_words())[..self.len]
    }

    /// The bytes, writable.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut sys::words_as_bytes_mut(self.as_words_mut())[..len]
    }

    /// The words, giving up the byte length (see [`as_words`](AlignedBuf::as_words)).
    pub fn into_words(self) -> Vec<u64> {
        match self.store {
            Store::Inline(w) => w[..self.len.div_ceil(8)].to_vec(),
            Store::Heap(w) => w,
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_bytes_mut()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = &self.as_bytes()[..self.len.min(16)];
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("head", &head)
            .finish()
    }
}

/// The owner behind [`SharedBytes`]: anything that derefs to bytes, shared between threads.
pub type SharedOwner = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A range of reference-counted bytes, for [`OutFrame::shared`](super::OutFrame::shared):
/// a send queue keeps the `Arc` instead of copying the bytes.
///
/// The owner's `as_ref()` must return the same bytes every time it is called (as `Vec<u8>`,
/// `Box<[u8]>`, `Arc<[u8]>`, `String` do). If it did not, the channel would send whatever it
/// returns (clamped to the range), and the peer would see a malformed stream; nothing unsafe
/// happens and nothing panics.
#[derive(Clone)]
pub struct SharedBytes {
    owner: SharedOwner,
    start: usize,
    end: usize,
}

impl SharedBytes {
    /// The bytes `range` of `owner`; [`Error::InvalidRange`] if the range does not fit.
    pub fn new(owner: SharedOwner, range: Range<usize>) -> Result<Self, Error> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(Error::InvalidRange {
                start: range.start,
                end: range.end,
                len,
            });
        }
        Ok(SharedBytes {
            owner,
            start: range.start,
            end: range.end,
        })
    }

    /// All the bytes of `owner`.
    pub fn whole(owner: SharedOwner) -> Self {
        let end = (*owner).as_ref().len();
        SharedBytes {
            owner,
            start: 0,
            end,
        }
    }

    /// The bytes (empty if the owner no longer has the range; see the type's docs).
    pub fn as_slice(&self) -> &[u8] {
        (*self.owner)
            .as_ref()
            .get(self.start..self.end)
            .unwrap_or(&[])
    }

    /// Length of the range in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Drops the first `n` bytes (all of them if `n` exceeds the length).
    pub(crate) fn advance(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(v: Vec<u8>) -> Self {
        SharedBytes::whole(Arc::new(v))
    }
}

impl From<Arc<[u8]>> for SharedBytes {
    fn from(v: Arc<[u8]>) -> Self {
        SharedBytes::whole(Arc::new(v))
    }
}

impl From<SharedOwner> for SharedBytes {
    fn from(owner: SharedOwner) -> Self {
        SharedBytes::whole(owner)
    }
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBytes")
            .field("range", &(self.start..self.end))
            .field("owners", &Arc::strong_count(&self.owner))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_padded() {
        let b = AlignedBuf::from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(&*b, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(b.as_words().len(), 2);
        assert_eq!(b.as_ptr() as usize % 8, 0);
        assert_eq!(
            b.as_words()[1],
            u64::from_ne_bytes([9, 0, 0, 0, 0, 0, 0, 0])
        );
        let z = AlignedBuf::try_zeroed(1 << 20).unwrap();
        assert!(z.iter().all(|&x| x == 0));
        assert!(AlignedBuf::try_zeroed(usize::MAX).is_none());
        assert!(AlignedBuf::new().is_empty());
    }

    #[test]
    fn shared_bytes_ranges() {
        let owner: SharedOwner = Arc::new(vec![1u8, 2, 3, 4]);
        let s = SharedBytes::new(owner.clone(), 1..3).unwrap();
        assert_eq!(&*s, &[2, 3]);
        assert!(matches!(
            SharedBytes::new(owner.clone(), 2..5),
            Err(Error::InvalidRange {
                start: 2,
                end: 5,
                len: 4
            })
        ));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = SharedBytes::new(owner, 3..2);
        assert!(reversed.is_err());
        let mut v = SharedBytes::from(vec![5u8; 10]);
        v.advance(4);
        assert_eq!(v.len(), 6);
        v.advance(100);
        assert!(v.is_empty());
    }
}
