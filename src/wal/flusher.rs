//! The flusher: one dedicated thread that writes the WAL ring to segment
//! files and makes it durable, then publishes the flush LSN (group commit:
//! one sync acknowledges every record below it).
//!
//! The io_uring flusher pipelines. A batch is the range [submitted, safe
//! point): whole 4 KiB blocks written straight from the registered ring (split
//! at ring wrap, segment ends and `wal_max_write`), the partial last block
//! through a bounce block padded with zeros, and for `fdatasync`/`fsync` one
//! sync per segment file linked behind the writes. Up to `wal_max_inflight`
//! batches are in flight; a new batch may start while earlier syncs run, but
//! never while a write to the block it begins with is still in flight (the
//! partial last block is rewritten by the next batch, with its durable prefix
//! unchanged). The flush LSN advances over the prefix of finished batches.
//!
//! Any failed write or sync (ECANCELED of a linked sync included) is fatal:
//! logged with file, offset and LSN, then the process aborts. Never retried:
//! after a failed fsync the kernel may have dropped the dirty data.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, SyncMethod};
use crate::fatal::fatal;
use crate::io::aligned::AlignedBuf;
use crate::io::file::{FileError, OpenMode, SegmentFile};
use crate::io::sim::SimDisk;
use crate::io::sim_queue::SimQueue;
use crate::io::uring::{Completion, WalIo, WalQueue};
use crate::io::BLOCK;
use crate::lsn::Lsn;

use super::WalShared;

const B: u64 = BLOCK as u64;
/// Largest write the depth-1 synchronous path takes (a commit's few blocks).
const DEPTH_1_MAX: usize = 4 * BLOCK;

/// What the flusher needs from the configuration.
#[derive(Clone, Debug)]
pub struct FlushSettings {
    pub method: SyncMethod,
    pub fsync: bool,
    /// `wal_writer_delay`, `commit_delay`, `commit_siblings`: reloadable.
    pub tuning: Arc<FlushTuning>,
    pub max_inflight: usize,
    pub max_write: u64,
    /// Write (and sync) synchronously when a batch is one write and nothing
    /// is in flight.
    pub sync_writes_at_depth_1: bool,
    /// `idle_poll_time`: how long the idle flusher polls for the next
    /// commit before it blocks.
    pub idle_poll: Duration,
    /// A test injection, from `WALDEN_TEST_SYNC_DELAY_MS`: a sleep between
    /// a synchronous write and its sync (queue depth 1, sync per batch), so
    /// that a test can see the write LSN lead the flush LSN (`remote_write`
    /// released before `on`). Zero (the default) in any real use.
    pub test_sync_delay: Duration,
}

impl FlushSettings {
    pub fn from_config(cfg: &Config) -> FlushSettings {
        FlushSettings {
            method: cfg.wal_sync_method,
            fsync: cfg.fsync,
            tuning: Arc::new(FlushTuning::new(cfg)),
            max_inflight: cfg.wal_max_inflight as usize,
            max_write: cfg.wal_max_write.0,
            sync_writes_at_depth_1: cfg.wal_sync_at_depth_1,
            idle_poll: Duration::from_micros(cfg.idle_poll_time),
            test_sync_delay: std::env::var("WALDEN_TEST_SYNC_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or_default(),
        }
    }

    fn open_mode(&self) -> OpenMode {
        OpenMode {
            write: true,
            direct: true,
            dsync: self.fsync && self.method == SyncMethod::OpenDatasync,
            sync: self.fsync && self.method == SyncMethod::OpenSync,
            ..Default::default()
        }
    }

    /// True when a separate sync must follow the writes.
    fn needs_sync_op(&self) -> bool {
        self.fsync && !self.method.syncs_on_write()
    }
}

/// The flusher's settings that a reload (SIGHUP) may change while it runs.
#[derive(Debug)]
pub struct FlushTuning {
    writer_delay_us: AtomicU64,
    commit_delay_us: AtomicU64,
    commit_siblings: AtomicU32,
}

impl FlushTuning {
    pub fn new(cfg: &Config) -> FlushTuning {
        let t = FlushTuning {
            writer_delay_us: AtomicU64::new(0),
            commit_delay_us: AtomicU64::new(0),
            commit_siblings: AtomicU32::new(0),
        };
        t.set(cfg);
        t
    }

    pub fn set(&self, cfg: &Config) {
        self.writer_delay_us
            .store(cfg.wal_writer_delay.0 * 1000, Relaxed);
        self.commit_delay_us.store(cfg.commit_delay, Relaxed);
        self.commit_siblings.store(cfg.commit_siblings, Relaxed);
    }
}

impl FlushSettings {
    fn writer_delay(&self) -> Duration {
        Duration::from_micros(self.tuning.writer_delay_us.load(Relaxed))
    }

    fn commit_delay(&self) -> Duration {
        Duration::from_micros(self.tuning.commit_delay_us.load(Relaxed))
    }

    fn commit_siblings(&self) -> u32 {
        self.tuning.commit_siblings.load(Relaxed)
    }
}

/// One write of a batch.
#[derive(Clone, Copy, Debug)]
struct Piece {
    segno: u64,
    file_offset: u64,
    lsn: Lsn,
    len: usize,
    /// The partial last block, written from a bounce block.
    tail: bool,
}

/// Splits the write of [from, to) into at most `max_pieces` pieces: `from`
/// is block aligned; whole blocks come from the ring, a partial last block is
/// a tail piece. Returns where the planned range ends (`to`, or a block
/// boundary before it when the cap was reached).
fn plan(
    from: Lsn,
    to: Lsn,
    segment_size: u64,
    ring_size: u64,
    max_write: u64,
    max_pieces: usize,
    out: &mut Vec<Piece>,
) -> Lsn {
    debug_assert_eq!(from.0 % B, 0);
    out.clear();
    let full_end = to.align_down(B).0;
    let mut at = from.0;
    while at < full_end {
        if out.len() == max_pieces {
            return Lsn(at);
        }
        let seg_end = (at / segment_size + 1) * segment_size;
        let ring_end = (at / ring_size + 1) * ring_size;
        let end = full_end.min(seg_end).min(ring_end).min(at + max_write);
        out.push(Piece {
            segno: at / segment_size,
            file_offset: at % segment_size,
            lsn: Lsn(at),
            len: (end - at) as usize,
            tail: false,
        });
        at = end;
    }
    if to.0 > full_end {
        if out.len() == max_pieces {
            return Lsn(full_end);
        }
        out.push(Piece {
            segno: full_end / segment_size,
            file_offset: full_end % segment_size,
            lsn: Lsn(full_end),
            len: BLOCK,
            tail: true,
        });
    }
    to
}

/// How long a flusher that found the WAL device full waits before it tries
/// to create the next segment again.
const ROOM_RETRY: Duration = Duration::from_millis(100);

/// The WAL device is full at shutdown: there is no one left to wait for.
/// PANIC (a restart recovers whatever was made durable; nothing after it
/// was acknowledged).
fn full_at_shutdown(e: &FileError) -> ! {
    fatal(format_args!(
        "shutting down while the WAL device is full: {e}; the records not yet written are lost (none was acknowledged)"
    ))
}

/// The pwrite flusher's wait for room on a full WAL device. Nothing is lost
/// (the records wait in the ring, unacknowledged) and appends past the
/// limit are refused meanwhile; it has nothing in flight, so it may block.
fn wait_for_room(shared: &WalShared, segno: u64, mode: OpenMode, first: FileError) -> SegmentFile {
    tracing::warn!("the flusher waits for room on the WAL device: {first}");
    loop {
        if shared.commit.is_shut_down() {
            full_at_shutdown(&first);
        }
        std::thread::sleep(ROOM_RETRY);
        match shared.segments.open_for_write(segno, mode) {
            Ok(f) => {
                tracing::info!("the WAL device has room again: the flusher goes on");
                return f;
            }
            Err(e) if e.is_no_space() => {}
            Err(e) => fatal(format_args!("could not open WAL segment for writing: {e}")),
        }
    }
}

/// The segment files the flusher writes, open while a batch may use them.
struct Files {
    open: BTreeMap<u64, SegmentFile>,
}

impl Files {
    fn new() -> Files {
        Files {
            open: BTreeMap::new(),
        }
    }

    /// Opens segment `segno` unless it is open, creating it if the preparer
    /// has not (a zero-fill of a whole segment): so it is called before a
    /// batch is queued, never while one is.
    fn open(&mut self, shared: &WalShared, segno: u64, mode: OpenMode) -> Result<(), FileError> {
        if let std::collections::btree_map::Entry::Vacant(v) = self.open.entry(segno) {
            let f = shared.segments.open_for_write(segno, mode)?;
            if !f.is_direct() {
                tracing::warn!(
                    "O_DIRECT is not supported for \"{}\"; WAL writes go through the page cache",
                    f.path().display()
                );
            }
            v.insert(f);
        }
        Ok(())
    }

    /// Opens the segments of a batch's pieces. The first that cannot be
    /// created for want of space is returned (with the error); any other
    /// failure is fatal.
    fn open_all(
        &mut self,
        shared: &WalShared,
        pieces: &[Piece],
        mode: OpenMode,
    ) -> Result<(), (u64, FileError)> {
        let mut last = None;
        for p in pieces {
            if last == Some(p.segno) {
                continue;
            }
            last = Some(p.segno);
            match self.open(shared, p.segno, mode) {
                Ok(()) => {}
                Err(e) if e.is_no_space() => return Err((p.segno, e)),
                Err(e) => fatal(format_args!("could not open WAL segment for writing: {e}")),
            }
        }
        Ok(())
    }

    /// A segment opened (by [`Files::open`]) for the batch that uses it.
    fn get(&self, segno: u64) -> &SegmentFile {
        self.open
            .get(&segno)
            .expect("a batch's segments are opened before it is queued")
    }

    /// The pwrite flusher's open: waits for room while the device is full.
    fn open_waiting(&mut self, shared: &WalShared, segno: u64, mode: OpenMode) -> &SegmentFile {
        if let Err(e) = self.open(shared, segno, mode) {
            if !e.is_no_space() {
                fatal(format_args!("could not open WAL segment for writing: {e}"));
            }
            let f = wait_for_room(shared, segno, mode, e);
            self.open.insert(segno, f);
        }
        self.get(segno)
    }

    /// Closes files wholly below `flushed` (no batch in flight uses them).
    fn close_below(&mut self, segno: u64) {
        while let Some((&s, _)) = self.open.first_key_value() {
            if s >= segno {
                break;
            }
            self.open.remove(&s);
        }
    }
}

/// Decides whether a new batch should start now.
struct Demand {
    last_flush: Instant,
    delay_until: Option<Instant>,
}

impl Demand {
    /// Returns Ok(true) to start, Ok(false) for no work, Err(deadline) to
    /// come back at a given time (commit_delay).
    fn check(
        &mut self,
        shared: &WalShared,
        s: &FlushSettings,
        submitted: Lsn,
        safe: Lsn,
    ) -> Result<bool, Instant> {
        if safe <= submitted {
            return Ok(false);
        }
        let commit = &shared.commit;
        let waited_for = commit.request_lsn() > submitted;
        let shutting_down = commit.is_shut_down();
        let pressure = safe.0 - submitted.0 >= shared.insert.buffer.size() / 4;
        let timer = self.last_flush.elapsed() >= s.writer_delay();
        if !(waited_for || shutting_down || pressure || timer) {
            return Ok(false);
        }
        if waited_for
            && !shutting_down
            && !s.commit_delay().is_zero()
            && commit.waiting() >= s.commit_siblings()
        {
            let now = Instant::now();
            let until = *self.delay_until.get_or_insert(now + s.commit_delay());
            if now < until {
                return Err(until);
            }
        }
        self.delay_until = None;
        Ok(true)
    }
}

/// An operation's tag (its io_uring `user_data`): the unit (32 bits), the
/// operation's index within the unit (8 bits), a write's length in blocks
/// (23 bits) and whether it is a write (1 bit). Unique among the
/// operations in flight, so that a completion, and the bounce block it
/// frees, is never taken for another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tag {
    unit: u32,
    /// Writes are numbered from 0 in queue order, then the syncs.
    op: u8,
    write_blocks: Option<u32>,
}

impl Tag {
    /// Operations one unit may hold.
    const MAX_OPS: usize = 256;

    fn write(unit: u32, op: usize, len: usize) -> u64 {
        let blocks = (len / BLOCK) as u64;
        assert!(op < Tag::MAX_OPS && blocks < (1 << 23) - 1 && len % BLOCK == 0);
        ((unit as u64) << 32) | ((op as u64) << 24) | (blocks << 1) | 1
    }

    fn sync(unit: u32, op: usize) -> u64 {
        assert!(op < Tag::MAX_OPS);
        ((unit as u64) << 32) | ((op as u64) << 24)
    }

    fn decode(user_data: u64) -> Tag {
        Tag {
            unit: (user_data >> 32) as u32,
            op: (user_data >> 24) as u8,
            write_blocks: (user_data & 1 == 1).then_some(((user_data & 0xff_ffff) >> 1) as u32),
        }
    }
}

/// A unit of completion: one write (when writes are durable by themselves:
/// O_DSYNC/O_SYNC or fsync=off), or a whole batch with its syncs. Units
/// finish in any order; the flush LSN advances over the finished prefix.
struct Unit {
    seq: u32,
    start: Lsn,
    end: Lsn,
    /// Operations not yet completed (writes and syncs).
    pending: u32,
    writes_pending: u32,
    /// The unit's writes, in tag order (for the syncs' files and for errors).
    pieces: Vec<Piece>,
    /// Segments to sync (tags after the writes'), once every write of the
    /// unit completed: a batch of several writes runs them in parallel,
    /// then its syncs.
    syncs: Vec<u64>,
    /// The syncs were queued (linked behind a single write, or after the
    /// writes completed).
    syncs_queued: bool,
    /// Last unit of its batch (batches in flight are counted by these).
    last_of_batch: bool,
    started: Instant,
}

/// What the flusher does after trying to start a batch.
enum Next {
    /// A batch started (or the WAL moved on): look again at once.
    Again,
    /// Nothing to start now: sleep until a completion, a wake-up or the
    /// deadline. `may_start` is false when only a completion or the
    /// deadline can change that (too many batches in flight, a partial
    /// block still being written, no room on the device).
    Wait {
        deadline: Option<Instant>,
        may_start: bool,
    },
}

/// The io_uring flusher: reap completions, retire finished units in LSN
/// order and publish the flush LSN, start the next batch, sleep. Generic
/// over its queue so that tests run the same code on a simulated disk.
struct Pipeline<Q: WalIo> {
    shared: Arc<WalShared>,
    s: FlushSettings,
    q: Q,
    files: Files,
    seg_size: u64,
    ring_size: u64,
    mode: OpenMode,
    per_batch_sync: bool,
    datasync: bool,
    /// Writes of one batch: they and one sync per segment fit one chain.
    max_pieces: usize,
    /// WAL below this is durable and published.
    flushed: Lsn,
    /// WAL below this was written (the writes completed; with a sync per
    /// batch, its sync may still be running): `flushed <= written <=
    /// submitted`. Published as the write LSN (a standby reports it for
    /// `remote_write`).
    written: Lsn,
    /// WAL below this is queued (`submitted >= flushed`).
    submitted: Lsn,
    units: VecDeque<Unit>,
    next_seq: u32,
    batches_in_flight: usize,
    /// The unit whose write covers the block at `submitted` (a partial block
    /// that the next batch rewrites): no new batch until that write completes.
    tail_unit: Option<u32>,
    cqes: Vec<Completion>,
    pieces: Vec<Piece>,
    demand: Demand,
    /// The WAL device was full: when to try to open the next segment again.
    no_room_until: Option<Instant>,
}

impl<Q: WalIo> Pipeline<Q> {
    fn new(shared: Arc<WalShared>, s: FlushSettings, q: Q) -> Pipeline<Q> {
        let flushed = shared.commit.flush_lsn();
        let max_pieces = (q.max_chain() / 2).min(Tag::MAX_OPS / 2);
        Pipeline {
            seg_size: shared.segments.segment_size(),
            ring_size: shared.insert.buffer.size(),
            mode: s.open_mode(),
            per_batch_sync: s.needs_sync_op(),
            datasync: s.method != SyncMethod::Fsync,
            max_pieces,
            shared,
            s,
            q,
            files: Files::new(),
            flushed,
            written: flushed,
            submitted: flushed,
            units: VecDeque::new(),
            next_seq: 0,
            batches_in_flight: 0,
            tail_unit: None,
            cqes: Vec::with_capacity(64),
            pieces: Vec::with_capacity(64),
            demand: Demand {
                last_flush: Instant::now(),
                delay_until: None,
            },
            no_room_until: None,
        }
    }

    /// Runs until a shutdown finds everything inserted durable.
    fn run(mut self) {
        loop {
            self.reap();
            self.retire();
            if self.finished() {
                break;
            }
            match self.start_batch() {
                Next::Again => {}
                Next::Wait {
                    deadline,
                    may_start,
                } => self.sleep(deadline, may_start),
            }
        }
        tracing::debug!(flushed = %self.flushed, "WAL flusher stopped");
    }

    /// 1. Completions: count them against their units; once every write
    ///    of a batch completed, queue its syncs. Any failure is fatal.
    fn reap(&mut self) {
        self.q.reap(&mut self.cqes);
        let mut cqes = std::mem::take(&mut self.cqes);
        for c in cqes.drain(..) {
            let tag = Tag::decode(c.user_data);
            let front = self.units.front().map(|u| u.seq).unwrap_or(tag.unit);
            let unit = &mut self.units[tag.unit.wrapping_sub(front) as usize];
            debug_assert_eq!(unit.seq, tag.unit);
            if c.result < 0 {
                fail(&self.shared, unit, tag, c.result, self.datasync);
            }
            if let Some(blocks) = tag.write_blocks {
                let len = blocks as usize * BLOCK;
                if c.result as usize != len {
                    fatal(format_args!(
                        "short write to WAL: wrote {} of {len} bytes (WAL {}..{} is not acknowledged)",
                        c.result, unit.start, unit.end
                    ));
                }
            }
            unit.pending -= 1;
            if tag.write_blocks.is_none() {
                continue;
            }
            unit.writes_pending -= 1;
            if unit.writes_pending > 0 {
                continue;
            }
            if self.tail_unit == Some(tag.unit) {
                self.tail_unit = None;
            }
            if !unit.syncs_queued {
                // Every write of this batch is done: now its syncs.
                unit.syncs_queued = true;
                for (j, &segno) in unit.syncs.iter().enumerate() {
                    let ud = Tag::sync(unit.seq, unit.pieces.len() + j);
                    if let Err(e) = self.q.sync(self.files.get(segno), self.datasync, ud, false) {
                        fatal(format_args!("could not queue a WAL sync: {e}"));
                    }
                }
                if let Err(e) = self.q.submit() {
                    fatal(format_args!("could not submit WAL syncs: {e}"));
                }
            }
        }
        self.cqes = cqes;
    }

    /// 2. Retires finished units in LSN order and publishes the flush LSN.
    ///    IMPORTANT: a unit is finished when every operation of it
    ///    completed, its syncs included, never when only its writes did.
    fn retire(&mut self) {
        let mut advanced = false;
        while self.units.front().is_some_and(|u| u.pending == 0) {
            let u = self.units.pop_front().unwrap();
            self.flushed = u.end;
            if u.last_of_batch {
                self.batches_in_flight -= 1;
                self.shared.stats.flush_done(u.started);
            }
            advanced = true;
        }
        // The write LSN: the end of the units, in LSN order, whose writes
        // all completed (their syncs may still run).
        let mut written = self.flushed;
        for u in &self.units {
            if u.writes_pending > 0 {
                break;
            }
            written = u.end;
        }
        let written_moved = written > self.written;
        self.written = self.written.max(written);
        if advanced {
            self.publish();
        } else if written_moved {
            // Only the write LSN moved: nothing for flush waiters.
            self.shared.commit.publish_written(self.written);
        }
    }

    fn publish(&mut self) {
        self.written = self.written.max(self.flushed);
        self.shared.insert.set_flushed(self.flushed);
        self.shared.commit.publish(self.written, self.flushed);
        self.files.close_below(self.flushed.segno(self.seg_size));
    }

    /// 3. Done: shut down, nothing in flight, everything inserted submitted.
    fn finished(&self) -> bool {
        self.shared.commit.is_shut_down()
            && self.units.is_empty()
            && self.submitted >= self.shared.insert.insert_lsn()
            && !self.shared.insert.any_inserting()
    }

    fn can_start(&self) -> bool {
        self.batches_in_flight < self.s.max_inflight && self.tail_unit.is_none()
    }

    /// 4. Starts a batch if one is due and allowed.
    fn start_batch(&mut self) -> Next {
        if !self.can_start() {
            return Next::Wait {
                deadline: None,
                may_start: false,
            };
        }
        let now = Instant::now();
        if let Some(t) = self.no_room_until.filter(|&t| now < t) {
            return Next::Wait {
                deadline: Some(t),
                may_start: false,
            };
        }
        let safe = self.shared.insert.safe_point();
        match self
            .demand
            .check(&self.shared, &self.s, self.submitted, safe)
        {
            Ok(true) => {}
            Ok(false) => {
                return Next::Wait {
                    deadline: None,
                    may_start: true,
                }
            }
            Err(deadline) => {
                return Next::Wait {
                    deadline: Some(deadline),
                    may_start: true,
                }
            }
        }
        // Stop at the last whole block unless somebody waits for the
        // partial one: then the next batch need not wait for this one's
        // writes, and batches pipeline.
        let commit = &self.shared.commit;
        let whole = safe.align_down(B);
        let want =
            if whole > self.submitted && commit.request_lsn() <= whole && !commit.is_shut_down() {
                whole
            } else {
                safe
            };
        let from = self.submitted.align_down(B);
        let mut to = self.plan(from, want);
        // IMPORTANT: open (and create, if the preparer fell behind) every
        // segment the batch writes before queueing any of it: a wait here
        // with writes queued but not submitted would hold back WAL that
        // others wait for. A full device cuts the batch at the segment
        // that could not be created; what lies before it goes on.
        if let Some(segno) = self.open_segments() {
            let limit = Lsn(segno * self.seg_size);
            if limit <= from {
                if self.shared.commit.is_shut_down() && self.units.is_empty() {
                    let e = self.files.open(&self.shared, segno, self.mode).unwrap_err();
                    full_at_shutdown(&e);
                }
                let retry = Instant::now() + ROOM_RETRY;
                self.no_room_until = Some(retry);
                return Next::Wait {
                    deadline: Some(retry),
                    may_start: false,
                };
            }
            to = self.plan(from, limit);
        } else if self.no_room_until.take().is_some() {
            tracing::info!("the WAL device has room again: the flusher goes on");
        }
        if self.s.sync_writes_at_depth_1
            && self.units.is_empty()
            && self.pieces.len() == 1
            && self.pieces[0].len <= DEPTH_1_MAX
        {
            self.write_at_depth_1(to);
        } else {
            self.queue_batch(to);
        }
        self.demand.last_flush = Instant::now();
        Next::Again
    }

    fn plan(&mut self, from: Lsn, to: Lsn) -> Lsn {
        plan(
            from,
            to,
            self.seg_size,
            self.ring_size,
            self.s.max_write,
            self.max_pieces,
            &mut self.pieces,
        )
    }

    /// Opens the segments of the planned pieces; the first that cannot be
    /// created for want of space, if any. Any other failure is fatal.
    fn open_segments(&mut self) -> Option<u64> {
        match self.files.open_all(&self.shared, &self.pieces, self.mode) {
            Ok(()) => None,
            Err((segno, e)) => {
                if self.no_room_until.is_none() {
                    tracing::warn!("the flusher waits for room on the WAL device: {e}");
                }
                Some(segno)
            }
        }
    }

    /// Queue depth 1 (nothing in flight, one small write): a plain write
    /// (+ sync) on this thread. Measured here, io_uring loses at depth 1
    /// (the sync runs in an io-wq worker); it wins once several writes are
    /// in flight. Small writes only: a large one blocks this thread and
    /// stops the copy/write overlap that bulk appends need.
    fn write_at_depth_1(&mut self, to: Lsn) {
        let p = self.pieces[0];
        let started = Instant::now();
        let file = self.files.get(p.segno);
        let res = if p.tail {
            let block = self.q.bounce_mut(0);
            let used = (to.0 - p.lsn.0) as usize;
            // SAFETY: as for the queued tail write in queue_batch.
            unsafe { self.shared.insert.buffer.get(p.lsn, &mut block[..used]) };
            block[used..].fill(0);
            file.write_all_at(block, p.file_offset)
        } else {
            // SAFETY: below the safe point and above the reclaim point; the
            // slice is dropped before either moves.
            let data = unsafe { self.shared.insert.buffer.slice(p.lsn, p.len) };
            file.write_all_at(data, p.file_offset)
        };
        if let Err(e) = res {
            fatal(format_args!(
                "{e} (WAL {}..{to} is not acknowledged)",
                self.submitted
            ));
        }
        if self.per_batch_sync {
            // Written, not yet synced: the write LSN moves now (a standby
            // reports it for `remote_write` while the sync runs).
            self.written = to;
            self.shared.commit.publish_written(to);
            if !self.s.test_sync_delay.is_zero() {
                std::thread::sleep(self.s.test_sync_delay);
            }
            let res = if self.datasync {
                file.datasync()
            } else {
                file.fsync()
            };
            if let Err(e) = res {
                fatal(format_args!(
                    "{e} (WAL {}..{to} is not acknowledged)",
                    self.submitted
                ));
            }
        }
        let stats = &self.shared.stats;
        if self.s.fsync {
            stats.syncs.fetch_add(1, Relaxed);
        }
        stats.writes.fetch_add(1, Relaxed);
        stats.write_bytes.fetch_add(p.len as u64, Relaxed);
        stats.flush_started(
            to.0.saturating_sub(self.submitted.0),
            self.shared.insert.records(),
        );
        stats.flush_done(started);
        self.submitted = to;
        self.flushed = to;
        self.publish();
    }

    /// Queues the planned pieces as one batch. One write and a sync: linked
    /// (no round trip). Several writes: run in parallel, synced when all
    /// are done (in `reap`).
    fn queue_batch(&mut self, to: Lsn) {
        let n = self.pieces.len();
        let mut segnos: Vec<u64> = self.pieces.iter().map(|p| p.segno).collect();
        segnos.dedup();
        let linked = self.per_batch_sync && n == 1;
        let chain = n + usize::from(linked);
        if let Err(e) = self.q.begin_chain(chain) {
            fatal(format_args!("could not submit WAL writes: {e}"));
        }
        let started = Instant::now();
        let batch_seq = self.next_seq;
        for i in 0..n {
            let p = self.pieces[i];
            // One unit per batch when it syncs, else one per write.
            let (seq, op) = if self.per_batch_sync {
                (batch_seq, i)
            } else {
                (batch_seq.wrapping_add(i as u32), 0)
            };
            let ud = Tag::write(seq, op, p.len);
            let file = self.files.get(p.segno);
            let res = if p.tail {
                let bi = (0..self.q.bounce_blocks())
                    .find(|&i| self.q.bounce_free(i))
                    .expect("a free bounce block");
                let block = self.q.bounce_mut(bi);
                let used = (to.0 - p.lsn.0) as usize;
                // SAFETY: [p.lsn, to) is below the safe point and at or above
                // the reclaim point: fully inserted, and no inserter writes it.
                unsafe { self.shared.insert.buffer.get(p.lsn, &mut block[..used]) };
                block[used..].fill(0);
                self.q.write_bounce(file, bi, p.file_offset, ud, linked)
            } else {
                let off = self.shared.insert.buffer.offset(p.lsn);
                self.q
                    .write_ring(file, off, p.len, p.file_offset, ud, linked)
            };
            if let Err(e) = res {
                fatal(format_args!("could not queue a WAL write: {e}"));
            }
            if !self.per_batch_sync {
                self.units.push_back(Unit {
                    seq,
                    start: p.lsn.max(self.submitted),
                    end: if p.tail {
                        to
                    } else {
                        Lsn(p.lsn.0 + p.len as u64)
                    },
                    pending: 1,
                    writes_pending: 1,
                    pieces: vec![p],
                    syncs: Vec::new(),
                    syncs_queued: true,
                    last_of_batch: i + 1 == n,
                    started,
                });
                if p.tail {
                    self.tail_unit = Some(seq);
                }
            }
        }
        let stats = &self.shared.stats;
        if self.per_batch_sync {
            if linked {
                let ud = Tag::sync(batch_seq, 1);
                if let Err(e) = self.q.sync(
                    self.files.get(self.pieces[0].segno),
                    self.datasync,
                    ud,
                    false,
                ) {
                    fatal(format_args!("could not queue a WAL sync: {e}"));
                }
            }
            self.units.push_back(Unit {
                seq: batch_seq,
                start: self.submitted,
                end: to,
                pending: (n + segnos.len()) as u32,
                writes_pending: n as u32,
                pieces: self.pieces.clone(),
                syncs_queued: linked,
                syncs: segnos,
                last_of_batch: true,
                started,
            });
            if to.0 % B != 0 {
                self.tail_unit = Some(batch_seq);
            }
            self.next_seq = self.next_seq.wrapping_add(1);
            stats
                .syncs
                .fetch_add(self.units.back().unwrap().syncs.len() as u64, Relaxed);
        } else {
            self.next_seq = self.next_seq.wrapping_add(n as u32);
            if self.s.fsync {
                stats.syncs.fetch_add(1, Relaxed);
            }
        }
        if let Err(e) = self.q.submit() {
            fatal(format_args!("could not submit WAL writes: {e}"));
        }
        self.batches_in_flight += 1;
        stats.writes.fetch_add(n as u64, Relaxed);
        stats.write_bytes.fetch_add(
            self.pieces.iter().map(|p| p.len as u64).sum::<u64>(),
            Relaxed,
        );
        stats.flush_started(
            to.0.saturating_sub(self.submitted.0),
            self.shared.insert.records(),
        );
        self.submitted = to;
    }

    /// 5. Waits for a completion, a wake-up, or a deadline.
    fn sleep(&mut self, deadline: Option<Instant>, may_start: bool) {
        let shared = &self.shared;
        let s = &self.s;
        let submitted = self.submitted;
        let now = Instant::now();
        let waited_for = shared.commit.request_lsn() > submitted;
        let mut timeout = if waited_for && may_start {
            // Someone waits for WAL we have not submitted, but it is not
            // fully copied yet (an inserter may have been preempted): poll.
            Duration::from_micros(20)
        } else if shared.insert.insert_lsn() <= submitted {
            // Nothing to write: a commit request signals the eventfd, and an
            // `off` record appended meanwhile is written when this timer
            // ends, within wal_writer_delay. (Waking every 100 µs here cost
            // an idle server a quarter of a CPU.)
            s.writer_delay()
        } else {
            (self.demand.last_flush + s.writer_delay())
                .saturating_duration_since(now)
                .max(Duration::from_micros(100))
        };
        if let Some(d) = deadline {
            timeout = timeout.min(d.saturating_duration_since(now));
        }
        if shared.commit.is_shut_down() && self.units.is_empty() {
            timeout = timeout.min(Duration::from_micros(100));
        }
        // Someone waits for WAL beyond what we submitted, and it is copied.
        let commit_ready =
            || shared.commit.request_lsn() > submitted && shared.insert.safe_point() > submitted;
        if may_start
            && self.units.is_empty()
            && deadline.is_none()
            && self.demand.last_flush.elapsed() < crate::io::RECENTLY_BUSY
        {
            // Recently busy and idle now: the next commit is likely within
            // microseconds, so poll for it rather than sleep and be woken.
            if crate::io::poll_until(s.idle_poll, || {
                commit_ready() || shared.commit.is_shut_down()
            }) {
                return;
            }
        }
        if may_start {
            shared.commit.flusher_will_sleep();
            if commit_ready() && deadline.is_none() {
                shared.commit.flusher_awake();
                return;
            }
        }
        if let Err(e) = self.q.submit_and_wait(1, Some(timeout)) {
            fatal(format_args!("io_uring wait failed in the WAL flusher: {e}"));
        }
        shared.commit.flusher_awake();
    }
}

/// A failed write or sync: PANIC, naming the file, the operation and the
/// WAL that is not acknowledged (never retried: see the module comment).
fn fail(shared: &WalShared, unit: &Unit, tag: Tag, result: i32, datasync: bool) -> ! {
    let err = std::io::Error::from_raw_os_error(-result);
    let op = tag.op as usize;
    if tag.write_blocks.is_some() {
        let p = unit.pieces[op];
        fatal(format_args!(
            "could not write to file \"{}\": {err} (WAL {}..{} is not acknowledged; the write was at offset {})",
            shared.segments.path(p.segno).display(),
            unit.start,
            unit.end,
            p.file_offset
        ));
    }
    let segno = unit.syncs[op - unit.pieces.len()];
    fatal(format_args!(
        "could not {} file \"{}\": {err} (WAL {}..{} is not acknowledged)",
        if datasync { "fdatasync" } else { "fsync" },
        shared.segments.path(segno).display(),
        unit.start,
        unit.end
    ))
}

/// The io_uring flusher's thread body. Reports on `ready` whether its
/// io_uring could be set up; returns after a shutdown once everything
/// inserted is durable.
pub(crate) fn run_uring(
    shared: Arc<WalShared>,
    s: FlushSettings,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let wake = Arc::clone(shared.commit.wake_fd());
    let q = match WalQueue::new(256, shared.insert.buffer.memory(), s.max_inflight + 1, wake) {
        Ok(q) => {
            let _ = ready.send(Ok(()));
            q
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    drop(ready);
    tracing::debug!(
        single_issuer = q.is_single_issuer(),
        "WAL flusher started (io_uring)"
    );
    Pipeline::new(shared, s, q).run();
}

/// The io_uring flusher on a simulated disk (tests): the same pipeline,
/// with a queue that runs its operations on `disk` out of order.
pub(crate) fn run_simulated(shared: Arc<WalShared>, s: FlushSettings, disk: &SimDisk) {
    let wake = Arc::clone(shared.commit.wake_fd());
    let q = SimQueue::new(
        disk,
        shared.insert.buffer.memory(),
        s.max_inflight + 1,
        wake,
    );
    Pipeline::new(shared, s, q).run();
}

/// The plain flusher, for comparison in benchmarks: pwrite each piece, then
/// one fdatasync, one batch at a time, no pipelining.
pub(crate) fn run_pwrite(shared: Arc<WalShared>, s: FlushSettings) {
    let seg_size = shared.segments.segment_size();
    let ring_size = shared.insert.buffer.size();
    let mode = s.open_mode();
    let mut files = Files::new();
    let mut flushed = shared.commit.flush_lsn();
    let mut pieces = Vec::new();
    let mut bounce = AlignedBuf::zeroed(BLOCK);
    let mut demand = Demand {
        last_flush: Instant::now(),
        delay_until: None,
    };
    let wake = Arc::clone(shared.commit.wake_fd());
    loop {
        let safe = shared.insert.safe_point();
        if shared.commit.is_shut_down()
            && flushed >= shared.insert.insert_lsn()
            && !shared.insert.any_inserting()
        {
            break;
        }
        match demand.check(&shared, &s, flushed, safe) {
            Ok(true) => {}
            other => {
                let timeout = match other {
                    Err(d) => d.saturating_duration_since(Instant::now()),
                    _ if safe > flushed && shared.commit.request_lsn() > flushed => {
                        Duration::from_micros(20)
                    }
                    _ => Duration::from_millis(1).max(
                        (demand.last_flush + s.writer_delay())
                            .saturating_duration_since(Instant::now()),
                    ),
                };
                shared.commit.flusher_will_sleep();
                if other.is_err() || shared.commit.request_lsn() <= flushed || safe <= flushed {
                    wake.wait(timeout);
                }
                shared.commit.flusher_awake();
                continue;
            }
        }
        let started = Instant::now();
        let from = flushed.align_down(B);
        let mut safe = plan(
            from,
            safe,
            seg_size,
            ring_size,
            s.max_write,
            usize::MAX,
            &mut pieces,
        );
        // As in the io_uring flusher: a full device cuts the batch at the
        // segment that could not be created, so that what lies before it
        // is made durable and acknowledged; only a batch that starts
        // there waits for room (with nothing else unpublished).
        if let Err((segno, _)) = files.open_all(&shared, &pieces, mode) {
            let limit = Lsn(segno * seg_size);
            if limit > from {
                safe = plan(
                    from,
                    limit,
                    seg_size,
                    ring_size,
                    s.max_write,
                    usize::MAX,
                    &mut pieces,
                );
            } else {
                files.open_waiting(&shared, segno, mode);
            }
        }
        let mut segnos: Vec<u64> = Vec::new();
        for p in &pieces {
            let file = files.get(p.segno);
            let res = if p.tail {
                let used = (safe.0 - p.lsn.0) as usize;
                // SAFETY: below the safe point, above the reclaim point (see run_uring).
                unsafe { shared.insert.buffer.get(p.lsn, &mut bounce[..used]) };
                bounce[used..].fill(0);
                file.write_all_at(&bounce, p.file_offset)
            } else {
                // SAFETY: as above; the slice is dropped before the flush
                // LSN (and so the reclaim point) moves.
                let data = unsafe { shared.insert.buffer.slice(p.lsn, p.len) };
                file.write_all_at(data, p.file_offset)
            };
            if let Err(e) = res {
                fatal(format_args!(
                    "{e} (WAL {flushed}..{safe} is not acknowledged; the write was at {})",
                    p.lsn
                ));
            }
            if segnos.last() != Some(&p.segno) {
                segnos.push(p.segno);
            }
        }
        if s.needs_sync_op() {
            for segno in &segnos {
                let f = files.get(*segno);
                let res = if s.method == SyncMethod::Fsync {
                    f.fsync()
                } else {
                    f.datasync()
                };
                if let Err(e) = res {
                    fatal(format_args!(
                        "{e} (WAL {flushed}..{safe} is not acknowledged)"
                    ));
                }
                shared.stats.syncs.fetch_add(1, Relaxed);
            }
        } else if s.fsync {
            shared.stats.syncs.fetch_add(1, Relaxed);
        }
        let stats = &shared.stats;
        stats.writes.fetch_add(pieces.len() as u64, Relaxed);
        stats
            .write_bytes
            .fetch_add(pieces.iter().map(|p| p.len as u64).sum::<u64>(), Relaxed);
        stats.flush_started(safe.0.saturating_sub(flushed.0), shared.insert.records());
        stats.flush_done(started);
        flushed = safe;
        shared.insert.set_flushed(flushed);
        shared.commit.publish(flushed, flushed);
        files.close_below(flushed.segno(seg_size));
        demand.last_flush = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique_within_a_unit_and_decode_back() {
        let mut seen = std::collections::HashSet::new();
        for op in 0..64 {
            let w = Tag::write(7, op, (op + 1) * BLOCK);
            assert_eq!(
                Tag::decode(w),
                Tag {
                    unit: 7,
                    op: op as u8,
                    write_blocks: Some(op as u32 + 1)
                }
            );
            let s = Tag::sync(7, 64 + op);
            assert_eq!(Tag::decode(s).write_blocks, None);
            assert_eq!(Tag::decode(s).op as usize, 64 + op);
            assert!(seen.insert(w) && seen.insert(s));
        }
        // Two writes of the same length in one batch: distinct tags.
        assert_ne!(Tag::write(1, 0, BLOCK), Tag::write(1, 1, BLOCK));
        assert_eq!(
            Tag::decode(Tag::write(u32::MAX, 255, 1 << 30)).unit,
            u32::MAX
        );
    }

    #[test]
    fn plan_splits_at_segments_ring_wrap_and_tail() {
        let mut out = Vec::new();
        let mib = 1 << 20;
        // From 1 MiB - 8 KiB to 1 MiB + 5000 B with 1 MiB segments and a 64 KiB ring.
        plan(
            Lsn(mib - 8192),
            Lsn(mib + 5000),
            mib,
            64 << 10,
            mib,
            100,
            &mut out,
        );
        let got: Vec<(u64, u64, usize, bool)> = out
            .iter()
            .map(|p| (p.segno, p.file_offset, p.len, p.tail))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, mib - 8192, 8192, false),
                (1, 0, 4096, false),
                (1, 4096, 4096, true)
            ]
        );
        // Only a partial block.
        plan(Lsn(mib), Lsn(mib + 100), mib, 64 << 10, mib, 100, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].tail);
        // Ring wrap inside one segment, and max_write.
        plan(
            Lsn(mib + 60 * 1024),
            Lsn(mib + 80 * 1024),
            16 * mib,
            64 << 10,
            8192,
            100,
            &mut out,
        );
        let lens: Vec<usize> = out.iter().map(|p| p.len).collect();
        assert_eq!(lens, vec![4096, 8192, 8192]);
        // The piece cap ends the batch early, on a block boundary, without a tail.
        let to = plan(
            Lsn(mib + 60 * 1024),
            Lsn(mib + 80 * 1024 + 5),
            16 * mib,
            64 << 10,
            8192,
            2,
            &mut out,
        );
        assert_eq!(to, Lsn(mib + 72 * 1024));
        assert_eq!(out.len(), 2);
        assert!(!out.iter().any(|p| p.tail));
    }
}
