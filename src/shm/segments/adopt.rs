//! An adopted message: a capnp `Builder` of any allocator, taken over as it is (its segments
//! stay where its allocator put them), and its flat copy into an arena for sending in place.

use std::fmt;

use capnp::any_pointer;
use capnp::message::{Allocator, Builder};

use super::super::arena::Arena;
use super::super::error::Result;
use super::super::handle::LendBlob;
use super::SegTable;
use super::MAX_SEGMENTS;

/// What an adopted builder offers, whatever its allocator.
trait AnyBuilder: Send + Sync {
    fn segments(&self) -> capnp::OutputSegments<'_>;
    fn root(&self) -> capnp::Result<any_pointer::Reader<'_>>;
    fn root_mut(&mut self) -> any_pointer::Builder<'_>;
    fn size_in_words(&self) -> usize;
}

impl<A: Allocator + Send + Sync> AnyBuilder for Builder<A> {
    fn segments(&self) -> capnp::OutputSegments<'_> {
        self.get_segments_for_output()
    }
    fn root(&self) -> capnp::Result<any_pointer::Reader<'_>> {
        self.get_root_as_reader()
    }
    fn root_mut(&mut self) -> any_pointer::Builder<'_> {
        // An any-pointer root is whatever is there: reading it as one cannot fail.
        self.get_root::<any_pointer::Builder<'_>>()
            .expect("an any-pointer root is always readable")
    }
    fn size_in_words(&self) -> usize {
        Builder::size_in_words(self)
    }
}

/// A capnp `Builder` of any allocator, and the flat copy of its segments in an arena made by
/// the last in-place send (kept while the builder is unchanged).
pub struct Adopted {
    builder: Box<dyn AnyBuilder>,
    copy: Option<SegTable>,
}

impl fmt::Debug for Adopted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adopted")
            .field("segments", &self.builder.segments().len())
            .field("copy", &self.copy)
            .finish()
    }
}

impl Adopted {
    /// Takes `builder` over as it is: nothing is copied.
    pub fn new<A: Allocator + Send + Sync + 'static>(builder: Builder<A>) -> Adopted {
        Adopted {
            builder: Box::new(builder),
            copy: None,
        }
    }

    /// The builder's segments, in place.
    pub fn segments(&self) -> capnp::OutputSegments<'_> {
        self.builder.segments()
    }

    /// The root, read.
    pub fn root(&self) -> capnp::Result<any_pointer::Reader<'_>> {
        self.builder.root()
    }

    /// The root, to write: the arena copy (if any) is left to its readers, and the next in-place
    /// send copies again.
    pub fn root_mut(&mut self) -> any_pointer::Builder<'_> {
        self.copy = None;
        self.builder.root_mut()
    }

    /// Words in use.
    pub fn size_in_words(&self) -> usize {
        self.builder.size_in_words()
    }

    /// References to the arena copy, if one is held.
    pub fn table_refs(&self) -> Option<u64> {
        self.copy.as_ref().map(SegTable::ref_count)
    }

    /// Lends a reference to the message's flat copy in `arena`: each segment copied, as it is
    /// (no traversal: far pointers stay valid, as the segments keep their order), into a block
    /// of its own, and a table listing them. Made once; an unchanged message reuses it. Fails
    /// (nothing made, the message intact) when the arena cannot hold it.
    pub fn share_shm(&mut self, arena: &Arena) -> Result<LendBlob> {
        if self
            .copy
            .as_ref()
            .is_some_and(|t| t.arena.id() != arena.id())
        {
            self.copy = None;
        }
        if self.copy.is_none() {
            if self.builder.segments().is_empty() {
                // An empty message still has its root pointer, in one segment.
                let _ = self.builder.root_mut();
            }
            let segs = self.builder.segments();
            if segs.len() > MAX_SEGMENTS {
                return Err(super::super::error::Error::Corrupt("too many segments"));
            }
            let mut blocks = Vec::with_capacity(segs.len());
            for s in segs.iter() {
                // A block of at least a word (a segment may be empty), zeroed past the bytes.
                let mut b = arena.alloc_zeroed(s.len().max(8))?;
                b.as_mut_slice()[..s.len()].copy_from_slice(s);
                blocks.push((b, s.len() as u64));
            }
            // The blocks go to the table as it takes them; should it fail first, those left
            // are freed as they drop.
            let mut entries = blocks.into_iter().map(|(b, used)| Ok((b.into_raw(), used)));
            self.copy = Some(SegTable::create(arena, segs.len(), &mut entries)?);
        }
        Ok(self.copy.as_ref().expect("made above").lend())
    }
}
