//! The writer side: [`OutMsg`], a message being built, frozen to be shared, and thawed to be
//! written again (copy-on-write while anyone else holds it).

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use capnp::message::{Builder, ReaderSegments};

use super::super::arena::{Arena, BlockRef};
use super::super::error::{Error, Result};
use super::super::handle::LendBlob;
use super::super::lockfree::{is_sole, Words, LINK};
use super::seg_alloc::{Mem, Seg, SegList, SegShared, Segs};
use super::*;

/// A message being built (or already frozen and shared): a capnp builder over [`SegAlloc`].
pub struct OutMsg {
    // Field order matters: the builder (whose drop hands segments back) goes before the table
    // (whose last reference frees the segments it owns).
    pub(super) builder: Builder<SegAlloc>,
    pub(super) shared: Arc<SegShared>,
    pub(super) table: Option<SegTable>,
    pub(super) sizes: SegmentSizes,
}

impl fmt::Debug for OutMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutMsg")
            .field("shm", &self.shared.arena.is_some())
            .field("segments", &self.shared.lock().segs.len())
            .field("shared", &self.table)
            .finish()
    }
}

impl OutMsg {
    /// An empty message whose segments come from `arena` (or the heap when `None`).
    pub fn new(arena: Option<Arena>, sizes: SegmentSizes) -> OutMsg {
        let sizes = SegmentSizes {
            first_words: sizes.first_words.max(1),
            max_growth_words: sizes.max_growth_words.max(sizes.first_words.max(1)),
        };
        let shared = Arc::new(SegShared {
            heap_or_failed: AtomicBool::new(false),
            arena,
            list: Mutex::new(SegList {
                segs: Segs::default(),
                published: false,
                failed: None,
            }),
        });
        let alloc = SegAlloc {
            shared: shared.clone(),
            next_words: sizes.first_words,
            sizes,
        };
        OutMsg {
            builder: Builder::new(alloc),
            shared,
            table: None,
            sizes,
        }
    }

    /// Whether segments come from an arena.
    pub fn is_shm(&self) -> bool {
        self.shared.arena.is_some()
    }

    /// The arena segments come from.
    pub fn arena(&self) -> Option<&Arena> {
        self.shared.arena.as_ref()
    }

    /// Read-only access (never copies).
    pub fn builder(&self) -> &Builder<SegAlloc> {
        &self.builder
    }

    /// Write access: thaws a shared message first (copy-on-write if anyone else holds it).
    pub fn builder_mut(&mut self) -> &mut Builder<SegAlloc> {
        if self.is_frozen_by_others() {
            self.copy_into_fresh();
        } else if let Some(t) = self.table.take() {
            match t.dissolve_if_sole() {
                Ok(()) => self.shared.lock().published = false,
                Err(t) => {
                    // Someone borrowed it between the check and now: copy after all.
                    self.table = Some(t);
                    self.copy_into_fresh();
                }
            }
        }
        &mut self.builder
    }

    /// Whether some other holder (a receiver, a queued send) still references the segments.
    pub fn is_frozen_by_others(&self) -> bool {
        if let Some(t) = &self.table {
            if !is_sole(t.pool().word(t.off + LINK)) {
                return true;
            }
        }
        if !self.shared.heap_or_failed() {
            return false; // no heap buffer to be held elsewhere
        }
        // `Arc::get_mut` (unlike `strong_count`) synchronizes with the other holders' drops, so
        // their reads happen before any write the caller makes after seeing `false`.
        self.shared
            .lock()
            .segs
            .iter_mut()
            .any(|s| match &mut s.mem {
                Some(Mem::Heap(a)) => Arc::get_mut(a).is_none(),
                _ => false,
            })
    }

    /// Replaces the message by a private deep copy (its old segments stay with their readers).
    pub(super) fn copy_into_fresh(&mut self) {
        let mut fresh = OutMsg::new(self.shared.arena.clone(), self.sizes);
        if !self.shared.lock().segs.is_empty() {
            let copied = self
                .builder
                .get_root_as_reader::<capnp::any_pointer::Reader<'_>>()
                .and_then(|root| fresh.builder.set_root(root));
            if copied.is_err() {
                let mut list = fresh.shared.lock();
                list.failed = None;
                fresh
                    .shared
                    .fail(&mut list, Error::Corrupt("message could not be copied"));
            }
        }
        *self = fresh;
    }

    /// The allocation failure that left part of the message on the heap, if any.
    pub fn alloc_failure(&self) -> Option<Error> {
        if !self.shared.heap_or_failed() {
            return None;
        }
        self.shared.lock().failed.as_ref().map(Error::duplicate)
    }

    pub(super) fn check_failure(&mut self) -> Result<()> {
        if !self.shared.heap_or_failed() || self.shared.lock().failed.is_none() {
            return Ok(());
        }
        // The arena was full while building: try again now by copying into fresh segments
        // (if that also fails, the error stays and nothing is sent).
        if self.table.is_none() {
            self.copy_into_fresh();
        }
        match self.alloc_failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Freezes the message into a segment table (once; an unchanged message reuses it) and
    /// lends one reference for a receiver. Fails (sending nothing, the message intact) if the
    /// message is heap-backed or part of it could not be allocated in the arena.
    ///
    /// A one-segment message (the common small one) is frozen in place: its segment block
    /// becomes the handle, with no table block (see [`SegTable`]).
    pub fn share_shm(&mut self) -> Result<LendBlob> {
        if self.shared.arena.is_none() {
            return Err(Error::BadConfig(
                "a heap-backed message cannot be shared in place",
            ));
        }
        if self.table.is_none() {
            self.check_failure()?;
            // Make sure there is a root pointer (an empty message still has one segment).
            if self.builder.get_segments_for_output().is_empty() {
                let _ = self.builder.get_root::<capnp::any_pointer::Builder<'_>>();
            }
            let out = self.builder.get_segments_for_output();
            let Some(arena) = &self.shared.arena else {
                return Err(Error::BadConfig("no arena"));
            };
            let mut list = self.shared.lock();
            if out.len() > MAX_SEGMENTS {
                return Err(Error::Corrupt("too many segments"));
            }
            let out_of_step = || Error::Corrupt("segment list out of step with the builder");
            let table = if let [bytes] = &out[..] {
                let mut live = list.segs.iter_mut().filter(|s| s.live());
                let seg = live.next().ok_or_else(out_of_step)?;
                if live.next().is_some() || !std::ptr::eq(seg.ptr.as_ptr(), bytes.as_ptr()) {
                    return Err(out_of_step());
                }
                match seg {
                    Seg {
                        mem: Some(Mem::Shm(r)),
                        words,
                        prefix: true,
                        ..
                    } => SegTable::create_solo(arena, r, *words, bytes.len() as u64)?,
                    Seg {
                        mem: Some(Mem::Shm(r)),
                        ..
                    } => SegTable::create(
                        arena,
                        1,
                        &mut std::iter::once(Ok((*r, bytes.len() as u64))),
                    )?,
                    _ => return Err(out_of_step()),
                }
            } else {
                // As many live segments as the builder reports, checked before the table exists:
                // a table owns (and on drop frees) what it lists, and the builder still owns
                // these until the table is published.
                if list.segs.iter().filter(|s| s.live()).count() != out.len() {
                    return Err(out_of_step());
                }
                let mut live = list.segs.iter().filter(|s| s.live());
                let mut entries = out.iter().map(|bytes| match live.next() {
                    Some(Seg {
                        mem: Some(Mem::Shm(r)),
                        ptr,
                        prefix,
                        ..
                    }) if std::ptr::eq(ptr.as_ptr(), bytes.as_ptr()) => {
                        let flag = if *prefix { ENTRY_PREFIXED } else { 0 };
                        let r = BlockRef {
                            offset: r.offset | flag,
                            ..*r
                        };
                        Ok((r, bytes.len() as u64))
                    }
                    _ => Err(out_of_step()),
                });
                SegTable::create(arena, out.len(), &mut entries)?
            };
            list.published = true;
            drop(list);
            self.table = Some(table);
        }
        let table = self.table.as_ref().expect("table set above");
        Ok(table.lend())
    }

    /// The used bytes of each segment, in order (e.g. to copy them into a socket). Makes sure
    /// there is a root pointer first, as sending does.
    pub fn output_segments(&mut self) -> capnp::OutputSegments<'_> {
        if self.builder.get_segments_for_output().is_empty() {
            let _ = self.builder.get_root::<capnp::any_pointer::Builder<'_>>();
        }
        self.builder.get_segments_for_output()
    }

    /// The message's references as shared heap buffers (frozen while any is held), with the
    /// number of used bytes of each, in segment order.
    pub fn share_heap(&mut self) -> Result<Vec<(Arc<HeapSeg>, usize)>> {
        if self.shared.arena.is_some() {
            return Err(Error::BadConfig("an arena-backed message is sent in place"));
        }
        if self.shared.lock().segs.is_empty() {
            let _ = self.builder.get_root::<capnp::any_pointer::Builder<'_>>();
        }
        let out = self.builder.get_segments_for_output();
        let list = self.shared.lock();
        let mut live = list.segs.iter().filter(|s| s.live());
        let mut parts = Vec::with_capacity(out.len());
        for bytes in out.iter() {
            match live.next() {
                Some(Seg {
                    mem: Some(Mem::Heap(a)),
                    ptr,
                    ..
                }) if std::ptr::eq(ptr.as_ptr(), bytes.as_ptr()) => {
                    parts.push((a.clone(), bytes.len()))
                }
                _ => return Err(Error::Corrupt("segment list out of step with the builder")),
            }
        }
        if live.next().is_some() {
            return Err(Error::Corrupt("segment list out of step with the builder"));
        }
        Ok(parts)
    }

    /// Total words in use (what a copy would transfer).
    pub fn size_in_words(&self) -> usize {
        self.builder.size_in_words()
    }

    /// Words the segments were given (used or not).
    pub fn reserved_words(&self) -> u64 {
        self.shared
            .lock()
            .segs
            .iter()
            .filter(|s| s.live())
            .map(|s| s.words as u64)
            .sum()
    }

    /// Current references to the shared table (1 = only this message), if frozen.
    pub fn table_refs(&self) -> Option<u64> {
        self.table.as_ref().map(SegTable::ref_count)
    }
}
