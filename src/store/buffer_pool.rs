//! The buffer pool (`shared_buffers`): page frames, the table that maps a
//! page to its frame, pins, usage counts and the clock sweep that picks a
//! victim, dirty bits, and the one place a page is written out.
//!
//! Locks, in the only order they are taken (PostgreSQL's bufmgr, simplified):
//! 1. a mapping partition (`mapping[hash(tag) % N]`), to find or retag a frame;
//! 2. a frame's content latch (`page`, a RwLock), held shared to read or to
//!    copy the page for a write-out, exclusive to change it;
//! 3. a frame's header (`meta`), briefly, for pins, usage, flags.
//!
//! A thread never waits for a latch while holding a header, and never takes
//! a partition while holding a latch.
//!
//! Invariants:
//! - a frame's `tag` and its mapping entry change together, under the
//!   partition lock(s), only while the frame is pinned by the retagger alone
//!   and clean;
//! - a page is changed only under its exclusive latch, and marked dirty
//!   before that latch is released; a write-out copies it under the shared
//!   latch and clears `dirty` before releasing it, so no change is lost;
//! - at most one write-out of a frame at a time (`io_busy`), so an older
//!   image can never land after a newer one;
//! - WAL before data: a copy is written only once the WAL is flushed past
//!   its page LSN (asserted in [`BufferPool::before_write`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crossbeam::utils::CachePadded;

use crate::io::aligned::{self, AlignedBuf, Slot};
use crate::io::PAGE_SIZE;
use crate::lsn::Lsn;
use crate::wal::{Durability, Wal};

use super::page::{self, PageTag};
use super::relfiles::RelFiles;
use super::StoreError;

/// PostgreSQL's BM_MAX_USAGE_COUNT: a frame survives this many sweeps unused.
const MAX_USAGE: u8 = 5;
const PARTITIONS: usize = 64;

/// The mapping table's hash: one folded multiply of the page address and a
/// random per-pool seed (foldhash's construction) rather than SipHash's
/// rounds, since the table is probed on every page access. The seed keeps
/// clients, who choose page addresses, from aiming at one bucket.
#[derive(Clone)]
struct TagHasher {
    seed: u64,
}

impl TagHasher {
    fn new() -> TagHasher {
        use std::hash::{BuildHasher, Hasher};
        TagHasher {
            seed: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        }
    }
}

impl std::hash::BuildHasher for TagHasher {
    type Hasher = TagHash;
    fn build_hasher(&self) -> TagHash {
        TagHash {
            seed: self.seed,
            acc: 0,
        }
    }
}

struct TagHash {
    seed: u64,
    acc: u64,
}

impl std::hash::Hasher for TagHash {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.acc = self.acc.rotate_left(8) ^ b as u64;
        }
    }

    /// A PageTag hashes as two u32s (rel, then block): together one u64.
    fn write_u32(&mut self, v: u32) {
        self.acc = self.acc << 32 | v as u64;
    }

    fn finish(&self) -> u64 {
        let m = ((self.acc ^ self.seed) as u128) * 0x9E37_79B9_7F4A_7C15_u128;
        (m as u64) ^ ((m >> 64) as u64)
    }
}

/// Called for every page write-out with (page, page LSN, flush LSN at the
/// moment of the write). Tests use it to check WAL before data.
pub type WriteObserver = Arc<dyn Fn(PageTag, Lsn, Lsn) + Send + Sync>;

#[derive(Default)]
struct Meta {
    tag: Option<PageTag>,
    pins: u32,
    usage: u8,
    /// The content differs from what the data device holds.
    dirty: bool,
    /// The content is loaded (false while a read is in progress or failed).
    valid: bool,
    /// A read or a write-out of this frame is in progress.
    io_busy: bool,
    /// Dirty when the current checkpoint started: it must write the page.
    checkpoint_needed: bool,
}

struct Frame {
    meta: Mutex<Meta>,
    io_done: Condvar,
    page: RwLock<Slot>,
}

/// Counters the bgwriter and /metrics read.
#[derive(Default)]
pub struct PoolStats {
    /// Frames handed out for a new page (PostgreSQL's buffers_alloc).
    pub allocs: AtomicU64,
    /// Dirty pages written by a foreground thread to free a frame (buffers_backend).
    pub backend_writes: AtomicU64,
    pub reads: AtomicU64,
    pub hits: AtomicU64,
}

pub struct BufferPool {
    frames: Box<[Frame]>,
    /// Where frame 0's page is (see [`BufferPool::new`]).
    page_base: usize,
    mapping: Box<[Mutex<HashMap<PageTag, usize, TagHasher>>]>,
    /// Clock hand: the number of frames the sweep has passed, ever.
    hand: CachePadded<AtomicU64>,
    files: Arc<RelFiles>,
    /// The WAL whose flush LSN page writes wait for; `None` during the
    /// startup scan, when every record replayed is already durable (see
    /// `replayed_to`).
    wal: RwLock<Option<Arc<Wal>>>,
    /// During the startup scan: the end of the last record replayed. Every
    /// byte below it is durable (the scan syncs each segment before reading
    /// it), so it stands in for the flush LSN.
    replayed_to: AtomicU64,
    checksums: bool,
    pub stats: PoolStats,
    observer: RwLock<Option<WriteObserver>>,
}

/// How [`BufferPool::pin`] fills a frame for a page not in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Read it from the data device, checksum verified.
    Read,
    /// Zeros: the caller overwrites the whole page (a full-page image in
    /// redo), so a torn page on disk is never read.
    Zero,
}

/// What [`BufferPool::start_write`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteStart {
    /// The page is copied and sealed into `dest`; write it, then call
    /// [`BufferPool::finish_write`].
    Started { tag: PageTag, lsn: Lsn },
    /// Nothing to write. `reusable`: the frame could be taken for a new page
    /// right now (unpinned, usage 0, clean).
    Skipped { reusable: bool },
}

/// Which dirty frames [`BufferPool::start_write`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFilter {
    /// Marked by the current checkpoint (and still holding `tag`).
    Checkpoint(PageTag),
    /// About to be reused: unpinned and usage 0 (the bgwriter).
    Reusable,
    /// Any dirty frame (eviction).
    Any,
}

thread_local! {
    /// A foreground thread's bounce page for writing out a victim.
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

impl BufferPool {
    pub fn new(
        frames: usize,
        files: Arc<RelFiles>,
        checksums: bool,
    ) -> Result<BufferPool, StoreError> {
        let frames = frames.max(16);
        let hasher = TagHasher::new();
        let pages = aligned::slots(frames, PAGE_SIZE).map_err(|e| {
            StoreError::Recovery(format!(
                "could not map shared_buffers ({} bytes): {e}",
                frames * PAGE_SIZE
            ))
        })?;
        // The slots lie end to end in one mapping (aligned::slots): frame
        // i's page is at page_base + i × PAGE_SIZE, which prefetching
        // computes without loading anything.
        let page_base = pages[0].addr();
        debug_assert!(pages
            .iter()
            .enumerate()
            .all(|(i, p)| p.addr() == page_base + i * PAGE_SIZE));
        Ok(BufferPool {
            page_base,
            frames: pages
                .into_iter()
                .map(|page| Frame {
                    meta: Mutex::new(Meta::default()),
                    io_done: Condvar::new(),
                    page: RwLock::new(page),
                })
                .collect(),
            mapping: (0..PARTITIONS)
                .map(|_| Mutex::new(HashMap::with_hasher(hasher.clone())))
                .collect(),
            hand: CachePadded::new(AtomicU64::new(0)),
            files,
            wal: RwLock::new(None),
            replayed_to: AtomicU64::new(0),
            checksums,
            stats: PoolStats::default(),
            observer: RwLock::new(None),
        })
    }

    pub fn frames(&self) -> usize {
        self.frames.len()
    }

    pub fn files(&self) -> &Arc<RelFiles> {
        &self.files
    }

    pub fn checksums(&self) -> bool {
        self.checksums
    }

    /// Where the clock hand is: frames passed since startup.
    pub fn clock_position(&self) -> u64 {
        self.hand.load(Relaxed)
    }

    #[doc(hidden)]
    pub fn set_write_observer(&self, f: Option<WriteObserver>) {
        *self.observer.write().unwrap() = f;
    }

    fn partition(tag: PageTag) -> usize {
        (tag.spread() >> 58) as usize % PARTITIONS
    }

    /// Pins the frame holding `tag`, loading the page (or zeros) into a
    /// frame first if it is not in the pool. The page stays in its frame
    /// while the pin lives.
    pub fn pin(&self, tag: PageTag, fill: Fill) -> Result<Pinned<'_>, StoreError> {
        loop {
            if let Some(p) = self.pin_existing(tag)? {
                self.stats.hits.fetch_add(1, Relaxed);
                return Ok(p);
            }
            let idx = self.victim()?;
            let f = &self.frames[idx];
            // Retag under both partitions (in index order), if nobody took
            // the victim or loaded `tag` meanwhile.
            let old = f.meta.lock().unwrap().tag;
            let new_p = Self::partition(tag);
            let old_p = old.map(Self::partition);
            let (first, second) = match old_p {
                Some(o) if o < new_p => (o, Some(new_p)),
                Some(o) if o > new_p => (new_p, Some(o)),
                _ => (new_p, None),
            };
            let mut g1 = self.mapping[first].lock().unwrap();
            let mut g2 = second.map(|p| self.mapping[p].lock().unwrap());
            let mut m = f.meta.lock().unwrap();
            let new_map = if first == new_p {
                &mut *g1
            } else {
                g2.as_deref_mut().unwrap()
            };
            if m.pins != 1 || m.dirty || m.io_busy || m.tag != old || new_map.contains_key(&tag) {
                m.pins -= 1;
                continue;
            }
            new_map.insert(tag, idx);
            if let Some(o) = old {
                let old_map = if Some(first) == old_p {
                    &mut *g1
                } else {
                    g2.as_deref_mut().unwrap()
                };
                old_map.remove(&o);
            }
            m.tag = Some(tag);
            m.valid = false;
            m.io_busy = true;
            m.usage = 1;
            m.checkpoint_needed = false;
            drop(m);
            drop(g2);
            drop(g1);
            let loaded = self.load(idx, tag, fill);
            let mut m = f.meta.lock().unwrap();
            m.io_busy = false;
            m.valid = loaded.is_ok();
            drop(m);
            f.io_done.notify_all();
            if let Err(e) = loaded {
                self.forget(idx, tag);
                return Err(e);
            }
            return Ok(Pinned {
                pool: self,
                idx,
                tag,
            });
        }
    }

    /// A hint that `len` bytes at `offset` of page `tag` will be changed
    /// soon (redo looking ahead): if the page is in the pool, its frame
    /// header, its page LSN and those bytes are brought into cache now, and
    /// its frame is returned as a hint for [`BufferPool::pin_hinted`].
    /// Takes no pin; the frame may change hands before it is used, which
    /// only wastes the hint.
    pub fn prefetch(&self, tag: PageTag, offset: usize, len: usize) -> Option<usize> {
        let idx = *self.mapping[Self::partition(tag)]
            .lock()
            .unwrap()
            .get(&tag)?;
        let f = &self.frames[idx];
        aligned::prefetch_write(&f.meta as *const Mutex<Meta> as usize, 1);
        let addr = self.page_base + idx * PAGE_SIZE;
        aligned::prefetch_write(addr, page::PAGE_HEADER);
        let offset = offset.min(PAGE_SIZE);
        aligned::prefetch_write(addr + offset, len.min(PAGE_SIZE - offset));
        Some(idx)
    }

    /// [`BufferPool::pin`], first trying frame `hint` (from
    /// [`BufferPool::prefetch`]): if it still holds `tag`, it is pinned
    /// without the mapping table.
    pub fn pin_hinted(
        &self,
        tag: PageTag,
        fill: Fill,
        hint: Option<usize>,
    ) -> Result<Pinned<'_>, StoreError> {
        if let Some(idx) = hint.filter(|&i| i < self.frames.len()) {
            let mut m = self.frames[idx].meta.lock().unwrap();
            // A frame's tag changes only under its header (and the mapping
            // partitions, with no other pin): holding a pin taken under the
            // header keeps it, as a pin found through the mapping does.
            if m.tag == Some(tag) && m.valid && !m.io_busy {
                m.pins += 1;
                m.usage = (m.usage + 1).min(MAX_USAGE);
                return Ok(Pinned {
                    pool: self,
                    idx,
                    tag,
                });
            }
        }
        self.pin(tag, fill)
    }

    fn pin_existing(&self, tag: PageTag) -> Result<Option<Pinned<'_>>, StoreError> {
        let map = self.mapping[Self::partition(tag)].lock().unwrap();
        let Some(&idx) = map.get(&tag) else {
            return Ok(None);
        };
        let f = &self.frames[idx];
        let mut m = f.meta.lock().unwrap();
        debug_assert_eq!(m.tag, Some(tag), "mapping and frame disagree");
        m.pins += 1;
        m.usage = (m.usage + 1).min(MAX_USAGE);
        drop(map);
        while m.io_busy && !m.valid {
            m = f.io_done.wait(m).unwrap();
        }
        if !m.valid {
            // The load failed (its loader reports why); try again ourselves.
            m.pins -= 1;
            return Ok(None);
        }
        drop(m);
        Ok(Some(Pinned {
            pool: self,
            idx,
            tag,
        }))
    }

    /// Reads (or zeroes) a freshly retagged frame; only this thread can see
    /// its content (others wait for `valid`).
    fn load(&self, idx: usize, tag: PageTag, fill: Fill) -> Result<(), StoreError> {
        let mut g = self.frames[idx].page.write().unwrap();
        match fill {
            Fill::Zero => {
                g.fill(0);
                Ok(())
            }
            Fill::Read => {
                self.stats.reads.fetch_add(1, Relaxed);
                self.files.read_page(tag, &mut g)?;
                if let Err(e) = page::verify(&g, tag, self.checksums) {
                    g.fill(0);
                    return Err(e.into());
                }
                Ok(())
            }
        }
    }

    /// Drops a frame whose load failed from the mapping and unpins it.
    fn forget(&self, idx: usize, tag: PageTag) {
        let mut map = self.mapping[Self::partition(tag)].lock().unwrap();
        let mut m = self.frames[idx].meta.lock().unwrap();
        if map.get(&tag) == Some(&idx) {
            map.remove(&tag);
        }
        m.tag = None;
        m.pins -= 1;
        m.usage = 0;
    }

    /// Runs the clock sweep to a frame nobody uses, writes it out if dirty,
    /// and returns it pinned (by us alone, unless someone found it since).
    fn victim(&self) -> Result<usize, StoreError> {
        let n = self.frames.len() as u64;
        let mut busy_in_a_row = 0u64;
        loop {
            let idx = (self.hand.fetch_add(1, Relaxed) % n) as usize;
            let f = &self.frames[idx];
            let mut m = f.meta.lock().unwrap();
            if m.pins > 0 || m.io_busy {
                busy_in_a_row += 1;
                if busy_in_a_row > 2 * n {
                    return Err(StoreError::NoFreeBuffers(n as usize));
                }
                continue;
            }
            busy_in_a_row = 0;
            if m.usage > 0 && m.tag.is_some() {
                m.usage -= 1;
                continue;
            }
            m.pins = 1;
            let dirty = m.dirty && m.valid;
            drop(m);
            self.stats.allocs.fetch_add(1, Relaxed);
            if dirty {
                if let Err(e) = self.write_out(idx) {
                    self.frames[idx].meta.lock().unwrap().pins -= 1;
                    return Err(e);
                }
                self.stats.backend_writes.fetch_add(1, Relaxed);
            }
            return Ok(idx);
        }
    }

    /// Writes one dirty frame out synchronously (a foreground eviction).
    fn write_out(&self, idx: usize) -> Result<(), StoreError> {
        BOUNCE.with(|b| {
            let mut b = b.borrow_mut();
            let buf = b.get_or_insert_with(|| AlignedBuf::zeroed(PAGE_SIZE));
            let WriteStart::Started { tag, lsn } = self.start_write(idx, WriteFilter::Any, buf)
            else {
                return Ok(());
            };
            let res = self
                .before_write(tag, lsn)
                .and_then(|()| Ok(self.files.write_page(tag, buf)?));
            self.finish_write(idx, res.is_ok());
            res
        })
    }

    /// Starts a write-out of frame `idx` if `filter` wants it: waits for an
    /// I/O already in progress on it, copies the page into `dest` under the
    /// shared latch, clears its dirty bit and seals the copy (header and
    /// checksum). The frame stays `io_busy` until [`BufferPool::finish_write`].
    pub fn start_write(&self, idx: usize, filter: WriteFilter, dest: &mut [u8]) -> WriteStart {
        self.start_write_inner(idx, filter, dest, true)
            .expect("waited for the I/O")
    }

    /// [`BufferPool::start_write`], but `None` instead of waiting when an
    /// I/O is in progress on the frame. A writer holding frames of its own
    /// in an unwritten batch must not wait (two such writers would wait for
    /// each other forever): it writes its batch first.
    pub fn try_start_write(
        &self,
        idx: usize,
        filter: WriteFilter,
        dest: &mut [u8],
    ) -> Option<WriteStart> {
        self.start_write_inner(idx, filter, dest, false)
    }

    fn start_write_inner(
        &self,
        idx: usize,
        filter: WriteFilter,
        dest: &mut [u8],
        wait: bool,
    ) -> Option<WriteStart> {
        let f = &self.frames[idx];
        let mut m = f.meta.lock().unwrap();
        while m.io_busy {
            if !wait {
                return None;
            }
            m = f.io_done.wait(m).unwrap();
        }
        let reusable = m.pins == 0 && m.usage == 0;
        let wanted = match filter {
            WriteFilter::Checkpoint(t) => m.checkpoint_needed && m.tag == Some(t),
            WriteFilter::Reusable => reusable,
            WriteFilter::Any => true,
        };
        if !wanted || !m.valid || !m.dirty || m.tag.is_none() {
            return Some(WriteStart::Skipped {
                reusable: reusable && (!m.dirty || !m.valid),
            });
        }
        let tag = m.tag.unwrap();
        m.io_busy = true;
        drop(m);
        let g = f.page.read().unwrap();
        dest.copy_from_slice(&g);
        {
            let mut m = f.meta.lock().unwrap();
            m.dirty = false;
            m.checkpoint_needed = false;
        }
        drop(g);
        let lsn = page::lsn(dest);
        page::seal(dest, tag, self.checksums);
        Some(WriteStart::Started { tag, lsn })
    }

    /// Ends a write-out: the frame may be written again; if the write
    /// failed, it is dirty again, and still needed by a checkpoint.
    pub fn finish_write(&self, idx: usize, ok: bool) {
        let f = &self.frames[idx];
        let mut m = f.meta.lock().unwrap();
        m.io_busy = false;
        if !ok {
            m.dirty = true;
            // IMPORTANT: the write that cleared the checkpoint's mark did
            // not happen; a checkpoint that listed the page must still write
            // it (waiting for this write-out, it then finds the mark). Found
            // by the simulated-disk torture test (EIO on a bgwriter write).
            m.checkpoint_needed = true;
        }
        drop(m);
        f.io_done.notify_all();
    }

    /// WAL before data: makes the WAL durable past `lsn` (the page LSN of a
    /// copy about to be written), then checks it. Call before the write.
    pub fn before_write(&self, tag: PageTag, lsn: Lsn) -> Result<(), StoreError> {
        self.flush_wal(lsn)?;
        let flushed = self.flushed();
        if let Some(obs) = self.observer.read().unwrap().as_ref() {
            obs(tag, lsn, flushed);
        }
        // IMPORTANT: the rule the whole page store stands on.
        assert!(
            lsn <= flushed,
            "WAL before data: {tag} has page LSN {lsn} but the WAL is flushed only to {flushed}"
        );
        Ok(())
    }

    /// Makes the WAL durable up to `lsn` (PostgreSQL's XLogFlush).
    pub fn flush_wal(&self, lsn: Lsn) -> Result<(), StoreError> {
        let wal = self.wal.read().unwrap().clone();
        if let Some(wal) = wal {
            if lsn > wal.flush_lsn() {
                wal.wait(lsn, Durability::Local)?;
            }
        }
        Ok(())
    }

    /// The flush LSN (during the startup scan: how far it replayed).
    pub fn flushed(&self) -> Lsn {
        match self.wal.read().unwrap().as_ref() {
            Some(w) => w.flush_lsn(),
            None => Lsn(self.replayed_to.load(Acquire)),
        }
    }

    /// During the startup scan: every record up to `lsn` has been read
    /// from durable WAL (and handed to redo, which may not have applied it
    /// yet: what matters to a write-out is that it is durable).
    pub fn set_replayed_to(&self, lsn: Lsn) {
        // Release, not SeqCst: once per record, and a full fence here would
        // wait for the page stores before it to reach the cache.
        self.replayed_to.store(lsn.0, Release);
    }

    /// The WAL is open: page writes wait for its flush LSN from now on.
    pub fn attach_wal(&self, wal: Arc<Wal>) {
        *self.wal.write().unwrap() = Some(wal);
    }

    /// Marks every dirty frame as needing this checkpoint's write and lists
    /// them, sorted by page (so the writes go out in file order).
    ///
    /// IMPORTANT: a frame whose write-out is in progress counts as dirty (as
    /// PostgreSQL keeps BM_DIRTY until the write completes): its dirty bit is
    /// already clear, but the write may end after this checkpoint took the
    /// list of files to sync. The checkpoint's own attempt waits for that
    /// write, which notes its file first. Found by the simulated-disk
    /// torture test.
    pub fn mark_for_checkpoint(&self) -> Vec<(PageTag, usize)> {
        let mut out = Vec::new();
        for (idx, f) in self.frames.iter().enumerate() {
            let mut m = f.meta.lock().unwrap();
            if m.valid && (m.dirty || m.io_busy) {
                if let Some(tag) = m.tag {
                    m.checkpoint_needed = true;
                    out.push((tag, idx));
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// Dirty frames now (for status and tests).
    pub fn dirty_count(&self) -> usize {
        self.frames
            .iter()
            .filter(|f| {
                let m = f.meta.lock().unwrap();
                m.valid && m.dirty
            })
            .count()
    }
}

/// A pinned frame: the page cannot leave the pool while this lives.
pub struct Pinned<'a> {
    pool: &'a BufferPool,
    idx: usize,
    tag: PageTag,
}

impl Pinned<'_> {
    pub fn tag(&self) -> PageTag {
        self.tag
    }

    /// The shared content latch.
    pub fn read(&self) -> RwLockReadGuard<'_, Slot> {
        self.pool.frames[self.idx].page.read().unwrap()
    }

    /// The exclusive content latch. Call [`Pinned::mark_dirty`] while
    /// holding it, before the change is logged.
    pub fn write(&self) -> RwLockWriteGuard<'_, Slot> {
        self.pool.frames[self.idx].page.write().unwrap()
    }

    /// Marks the page changed. Must be called while holding the exclusive latch.
    pub fn mark_dirty(&self) {
        self.pool.frames[self.idx].meta.lock().unwrap().dirty = true;
    }

    /// Runs `f` on the page under the exclusive latch and unpins it; if `f`
    /// returns true (it changed the page) the page is marked dirty in the
    /// same header lock that drops the pin, before the latch is released.
    /// Redo's path: one header lock per record instead of two.
    pub fn modify(self, f: impl FnOnce(&mut [u8]) -> bool) {
        let pool: &BufferPool = self.pool;
        let frame = &pool.frames[self.idx];
        // The pin is dropped below, under the header, with the dirty bit.
        std::mem::forget(self);
        let mut g = frame.page.write().unwrap();
        let changed = f(&mut g);
        let mut m = frame.meta.lock().unwrap();
        debug_assert!(m.pins > 0);
        m.dirty |= changed;
        // Unpinned while the latch is still held: nobody can retag a dirty
        // frame, and a write-out copies it only under the latch, after this.
        m.pins -= 1;
        drop(m);
        drop(g);
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        let mut m = self.pool.frames[self.idx].meta.lock().unwrap();
        debug_assert!(m.pins > 0);
        m.pins -= 1;
    }
}
