//! Metadata: a capnp struct of the user's type riding on log-in and channel opening.

use capnp::message::{self, ReaderOptions, TypedReader};
use capnp::serialize::{self, BufferSegments};
use capnp::traits::Owned;
use capnp::Word;

use super::Error;

/// Most bytes a [`Metadata`] may have (1 MiB).
pub const MAX_METADATA: usize = 1 << 20;

/// A small capnp message of any struct type `P` of yours, sent with a log-in (both ways) or with
/// a channel opening, and read on the other side as the same type.
///
/// ```
/// use flowipc::schemas::test_msgs_capnp::channel_mdt;
/// use flowipc::session::Metadata;
///
/// let mdt = Metadata::build::<channel_mdt::Owned>(|mut m| {
///     m.set_purpose("logs");
///     m.set_n(3);
/// })?;
/// let reader = mdt.read::<channel_mdt::Owned>()?;
/// let m = reader.get()?;
/// assert_eq!((m.get_purpose()?.to_str()?, m.get_n()), ("logs", 3));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// The message in capnp's stream framing, in words (so it is aligned for reading in place).
    words: Vec<Word>,
}

impl Metadata {
    /// Builds metadata of type `P`: `f` fills in the root.
    pub fn build<P: Owned>(f: impl FnOnce(P::Builder<'_>)) -> Result<Metadata, Error> {
        let mut msg = message::Builder::new_default();
        f(msg.init_root::<P::Builder<'_>>());
        Metadata::from_message(&msg)
    }

    /// Metadata from a message you built.
    pub fn from_message<A: message::Allocator>(
        msg: &message::Builder<A>,
    ) -> Result<Metadata, Error> {
        let bytes = serialize::write_message_to_words(msg);
        Metadata::from_bytes(&bytes)
    }

    /// Reads it as a message of root type `P` (`.get()` on the result gives the root).
    pub fn read<P: Owned>(&self) -> Result<TypedReader<BufferSegments<&[u8]>, P>, Error> {
        let r = serialize::BufferSegments::new(Word::words_to_bytes(&self.words), options())
            .map_err(Error::Metadata)?;
        Ok(message::Reader::new(r, options()).into_typed())
    }

    /// The bytes (capnp stream framing).
    pub fn as_bytes(&self) -> &[u8] {
        Word::words_to_bytes(&self.words)
    }

    /// Metadata from bytes in capnp stream framing (checked when read).
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Metadata, Error> {
        if bytes.len() > MAX_METADATA {
            return Err(Error::MetadataTooLarge(bytes.len()));
        }
        if bytes.len() % 8 != 0 {
            return Err(Error::Protocol("metadata is not whole words"));
        }
        let mut words = Word::allocate_zeroed_vec(bytes.len() / 8);
        Word::words_to_bytes_mut(&mut words).copy_from_slice(bytes);
        Ok(Metadata { words })
    }

    /// `None` for empty bytes (no metadata).
    pub(crate) fn from_wire(bytes: &[u8]) -> Result<Option<Metadata>, Error> {
        if bytes.is_empty() {
            Ok(None)
        } else {
            Metadata::from_bytes(bytes).map(Some)
        }
    }
}

fn options() -> ReaderOptions {
    *ReaderOptions::new().traversal_limit_in_words(Some(MAX_METADATA / 8 * 4))
}
