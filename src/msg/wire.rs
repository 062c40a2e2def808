//! The message layer's wire format, the one place that knows where its fields lie: the header at
//! the start of every transport frame's payload (see [the channel's docs](super::channel)), a
//! pool announcement's body, and capnp's stream framing of a heap message's segments.

use super::Error;
use crate::shm::segments::MAX_SEGMENTS;

/// Bytes of the per-message header (without a session token).
pub(super) const HEADER_LEN: usize = 24;
/// Bytes of a session token.
pub(super) const TOKEN_LEN: usize = 16;
/// Header flag: a session token follows the header.
const FLAG_TOKEN: u8 = 1;
/// Bytes of a pool announcement's body.
const POOL_BODY_LEN: usize = 16;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A pool of an arena (its memfd is the frame's fd).
    Pool = 1,
    /// A message in an arena: a lend blob of its handle.
    Shm = 2,
    /// A message in the frame itself (capnp stream framing).
    Heap = 3,
    /// A message we sent arrived as a response nobody expected (its id in `answers`).
    Notice = 4,
}

impl Kind {
    fn of(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Pool,
            2 => Kind::Shm,
            3 => Kind::Heap,
            4 => Kind::Notice,
            _ => return None,
        })
    }

    /// Messages have ids (1, 2, 3...); control frames have id 0.
    pub(super) fn is_msg(self) -> bool {
        matches!(self, Kind::Shm | Kind::Heap)
    }
}

/// A frame's message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) kind: Kind,
    /// The message's id (0 for a control frame).
    pub(super) id: u64,
    /// The id of the message this one answers (0: none).
    pub(super) answers: u64,
}

/// A header as bytes, with the session token if the channel has one.
pub(super) struct Encoded {
    bytes: [u8; HEADER_LEN + TOKEN_LEN],
    len: usize,
}

impl Encoded {
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl AsRef<[u8]> for Encoded {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Header {
    pub(super) fn encode(self, token: Option<u128>) -> Encoded {
        let mut e = Encoded {
            bytes: [0; HEADER_LEN + TOKEN_LEN],
            len: HEADER_LEN,
        };
        e.bytes[0] = self.kind as u8;
        e.bytes[8..16].copy_from_slice(&self.id.to_le_bytes());
        e.bytes[16..24].copy_from_slice(&self.answers.to_le_bytes());
        if let Some(token) = token {
            e.bytes[1] = FLAG_TOKEN;
            e.bytes[HEADER_LEN..].copy_from_slice(&token.to_le_bytes());
            e.len += TOKEN_LEN;
        }
        e
    }

    /// The header at the start of a frame on a channel whose session token is `token`, and
    /// where the body starts. Checks, in this order: length, reserved bytes, the token (a
    /// frame of another session is [`Error::WrongSession`]), the kind, and that messages and
    /// only messages have ids.
    pub(super) fn decode(buf: &[u8], token: Option<u128>) -> Result<(Header, usize), Error> {
        let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
            return Err(Error::BadMessage("frame shorter than the message header"));
        };
        if h[1] & !FLAG_TOKEN != 0 || h[2..8] != [0; 6] {
            return Err(Error::BadMessage("reserved header bytes are not zero"));
        }
        let hlen = if h[1] & FLAG_TOKEN != 0 {
            let theirs = buf
                .get(HEADER_LEN..HEADER_LEN + TOKEN_LEN)
                .and_then(|t| t.try_into().ok())
                .map(u128::from_le_bytes)
                .ok_or(Error::BadMessage("frame shorter than its session token"))?;
            if token != Some(theirs) {
                return Err(Error::WrongSession);
            }
            HEADER_LEN + TOKEN_LEN
        } else if token.is_some() {
            return Err(Error::WrongSession);
        } else {
            HEADER_LEN
        };
        let kind = Kind::of(h[0]).ok_or(Error::BadMessage("unknown message kind"))?;
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let header = Header {
            kind,
            id: word(8),
            answers: word(16),
        };
        if kind.is_msg() == (header.id == 0) {
            return Err(Error::BadMessage(
                "message id 0, or a control frame with an id",
            ));
        }
        Ok((header, hlen))
    }
}

/// A pool announcement's body: the arena's id, the pool's id, 4 zero bytes.
pub(super) fn pool_body(arena_id: u64, pool_id: u32) -> [u8; POOL_BODY_LEN] {
    let mut b = [0u8; POOL_BODY_LEN];
    b[..8].copy_from_slice(&arena_id.to_le_bytes());
    b[8..12].copy_from_slice(&pool_id.to_le_bytes());
    b
}

/// Reads a pool announcement's body: (arena id, pool id).
pub(super) fn read_pool_body(body: &[u8]) -> Result<(u64, u32), Error> {
    let b: &[u8; POOL_BODY_LEN] = body
        .try_into()
        .map_err(|_| Error::BadMessage("pool announcement of the wrong length"))?;
    let arena_id = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let pool_id = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    Ok((arena_id, pool_id))
}

/// Bytes of capnp's stream-framing segment table for `n` segments: the count less one, each
/// size in words (u32s), padded to whole words.
pub(super) const fn segment_table_len(n: usize) -> usize {
    (4 * (n + 1)).next_multiple_of(8)
}

/// Writes the segment table of segments of `sizes` bytes into `buf`
/// (`segment_table_len(sizes.len())` bytes, zeroed).
pub(super) fn write_segment_table(buf: &mut [u8], sizes: impl ExactSizeIterator<Item = usize>) {
    buf[..4].copy_from_slice(&(sizes.len() as u32).wrapping_sub(1).to_le_bytes());
    for (i, len) in sizes.enumerate() {
        buf[4 + 4 * i..8 + 4 * i].copy_from_slice(&((len / 8) as u32).to_le_bytes());
    }
}

/// Where a heap message's segments are in its frame.
pub(super) type HeapSegs = ((usize, usize), Vec<(usize, usize)>);

/// Parses capnp's stream framing after the header: where each segment is in `buf` (start,
/// length), the first apart (no allocation for a one-segment message).
pub(super) fn heap_segments(buf: &[u8], hlen: usize) -> Result<HeapSegs, Error> {
    let body = &buf[hlen..];
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            body.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    let count = word(0)
        .ok_or(Error::BadMessage("heap message without a segment table"))?
        .wrapping_add(1) as usize;
    if count == 0 || count > MAX_SEGMENTS {
        return Err(Error::BadMessage("heap message with a bad segment count"));
    }
    let table = segment_table_len(count);
    let mut at = hlen + table;
    if at > buf.len() {
        return Err(Error::BadMessage("segment table cut short"));
    }
    let mut first = (0, 0);
    let mut rest = Vec::with_capacity(count - 1);
    for i in 0..count {
        let words = word(1 + i).ok_or(Error::BadMessage("segment table cut short"))? as usize;
        let len = words * 8;
        let end = at
            .checked_add(len)
            .filter(|&e| e <= buf.len())
            .ok_or(Error::BadMessage("segment sizes exceed the frame"))?;
        if i == 0 {
            first = (at, len);
        } else {
            rest.push((at, len));
        }
        at = end;
    }
    if at != buf.len() {
        return Err(Error::BadMessage("bytes after the last segment"));
    }
    Ok((first, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_each_bad_one_is_its_error() {
        let h = Header {
            kind: Kind::Shm,
            id: 7,
            answers: 3,
        };
        for token in [None, Some(0xabcd_u128 << 64 | 5)] {
            let e = h.encode(token);
            let want = HEADER_LEN + if token.is_some() { TOKEN_LEN } else { 0 };
            assert_eq!(e.len(), want);
            assert_eq!(Header::decode(e.as_ref(), token).unwrap(), (h, want));
            // The same frame on a channel of another session, or of none.
            let other = Some(token.unwrap_or(0) ^ 1);
            assert!(matches!(
                Header::decode(e.as_ref(), other),
                Err(Error::WrongSession)
            ));
        }
        let bad = |mut b: Vec<u8>, f: fn(&mut Vec<u8>)| {
            f(&mut b);
            match Header::decode(&b, None) {
                Err(Error::BadMessage(why)) => why,
                other => panic!("{other:?}"),
            }
        };
        let good = h.encode(None).as_ref().to_vec();
        assert_eq!(
            bad(good.clone(), |b| b.truncate(23)),
            "frame shorter than the message header"
        );
        assert_eq!(
            bad(good.clone(), |b| b[5] = 1),
            "reserved header bytes are not zero"
        );
        assert_eq!(
            bad(good.clone(), |b| b[1] = FLAG_TOKEN),
            "frame shorter than its session token"
        );
        assert_eq!(bad(good.clone(), |b| b[0] = 9), "unknown message kind");
        assert_eq!(
            bad(good.clone(), |b| b[8..16].fill(0)),
            "message id 0, or a control frame with an id"
        );
        assert_eq!(
            bad(good, |b| b[0] = Kind::Pool as u8),
            "message id 0, or a control frame with an id"
        );
        assert_eq!(
            read_pool_body(&pool_body(1 << 40, 3)).unwrap(),
            (1 << 40, 3)
        );
        assert!(read_pool_body(&[0; 15]).is_err());
    }
}
