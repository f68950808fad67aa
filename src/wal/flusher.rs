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
use crate::io::uring::{Completion, WalQueue};
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

/// The WAL device is full and the next segment cannot be created: nothing
/// is lost (the records wait in the ring, unacknowledged) and appends past
/// the limit are refused meanwhile, so wait and retry until space returns.
/// At shutdown there is no one left to wait for: PANIC (a restart recovers
/// whatever was made durable; nothing after it was acknowledged).
fn wait_for_room(shared: &WalShared, segno: u64, mode: OpenMode, first: FileError) -> SegmentFile {
    tracing::warn!("the flusher waits for room on the WAL device: {first}");
    loop {
        if shared.commit.is_shut_down() {
            fatal(format_args!(
                "shutting down while the WAL device is full: {first}; the records not yet written are lost (none was acknowledged)"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
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
    /// Segments to sync once every write of the unit completed (a batch of
    /// several writes: parallel writes, then the syncs).
    deferred_syncs: Vec<u64>,
    /// The segment of the first write, for error messages.
    segno: u64,
    file_offset: u64,
    /// Last unit of its batch (batches in flight are counted by these).
    last_of_batch: bool,
    started: Instant,
}

/// user_data: unit sequence (32 bits) | write length in blocks (31 bits) | is-write bit.
fn user_data(seq: u32, write_len: Option<usize>) -> u64 {
    match write_len {
        Some(len) => ((seq as u64) << 32) | (((len / BLOCK) as u64) << 1) | 1,
        None => (seq as u64) << 32,
    }
}

struct Files {
    open: BTreeMap<u64, SegmentFile>,
}

impl Files {
    fn get(&mut self, shared: &WalShared, segno: u64, mode: OpenMode) -> &SegmentFile {
        self.open.entry(segno).or_insert_with(|| match shared.segments.open_for_write(segno, mode) {
            Ok(f) => {
                if !f.is_direct() {
                    tracing::warn!(
                        "O_DIRECT is not supported for \"{}\"; WAL writes go through the page cache",
                        f.path().display()
                    );
                }
                f
            }
            Err(e) if e.is_no_space() => wait_for_room(shared, segno, mode, e),
            Err(e) => fatal(format_args!("could not open WAL segment for writing: {e}")),
        })
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

/// The io_uring flusher's thread body. Reports on `ready` whether its
/// io_uring could be set up; returns after a shutdown once everything
/// inserted is durable.
pub(crate) fn run_uring(
    shared: Arc<WalShared>,
    s: FlushSettings,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let wake = Arc::clone(shared.commit.wake_fd());
    let mut q = match WalQueue::new(256, shared.insert.buffer.memory(), s.max_inflight + 1, wake) {
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
    let seg_size = shared.segments.segment_size();
    let ring_size = shared.insert.buffer.size();
    let mode = s.open_mode();
    let per_batch_sync = s.needs_sync_op();
    let datasync = s.method != SyncMethod::Fsync;
    // Writes plus one sync per segment must fit in one chain.
    let max_pieces = q.max_chain() / 2;
    let mut files = Files {
        open: BTreeMap::new(),
    };
    let mut flushed = shared.commit.flush_lsn();
    let mut submitted = flushed;
    let mut units: VecDeque<Unit> = VecDeque::new();
    let mut next_seq: u32 = 0;
    let mut batches_in_flight = 0usize;
    // The unit whose write covers the block at `submitted` (a partial block
    // that the next batch rewrites): no new batch until that write completes.
    let mut tail_unit: Option<u32> = None;
    let mut cqes: Vec<Completion> = Vec::with_capacity(64);
    let mut pieces: Vec<Piece> = Vec::with_capacity(64);
    let mut demand = Demand {
        last_flush: Instant::now(),
        delay_until: None,
    };
    let stats = &shared.stats;

    loop {
        // 1. Completions.
        q.reap(&mut cqes);
        for c in cqes.drain(..) {
            let seq = (c.user_data >> 32) as u32;
            let is_write = c.user_data & 1 == 1;
            let write_len = ((c.user_data & 0xffff_ffff) >> 1) as usize * BLOCK;
            let front = units.front().map(|u| u.seq).unwrap_or(seq);
            let unit = &mut units[seq.wrapping_sub(front) as usize];
            if c.result < 0 {
                let err = std::io::Error::from_raw_os_error(-c.result);
                let path = shared.segments.path(unit.segno);
                if is_write {
                    fatal(format_args!(
                        "could not write to file \"{}\" (WAL {}..{}, first write at offset {}): {err}",
                        path.display(),
                        unit.start,
                        unit.end,
                        unit.file_offset
                    ));
                }
                fatal(format_args!(
                    "could not {} WAL segment (WAL {}..{}, first segment \"{}\"): {err}",
                    if datasync { "fdatasync" } else { "fsync" },
                    unit.start,
                    unit.end,
                    path.display()
                ));
            }
            if is_write && c.result as usize != write_len {
                fatal(format_args!(
                    "short write to WAL in {}..{}: wrote {} of {} bytes",
                    unit.start, unit.end, c.result, write_len
                ));
            }
            unit.pending -= 1;
            if is_write {
                unit.writes_pending -= 1;
                if unit.writes_pending == 0 {
                    if tail_unit == Some(seq) {
                        tail_unit = None;
                    }
                    // Every write of this batch is done: now its syncs.
                    if !unit.deferred_syncs.is_empty() {
                        let segnos = std::mem::take(&mut unit.deferred_syncs);
                        for segno in segnos {
                            let fd = files.get(&shared, segno, mode).raw_fd();
                            if let Err(e) = q.sync(fd, datasync, user_data(seq, None), false) {
                                fatal(format_args!("could not queue a WAL sync: {e}"));
                            }
                        }
                        if let Err(e) = q.submit() {
                            fatal(format_args!("could not submit WAL syncs: {e}"));
                        }
                    }
                }
            }
        }

        // 2. Retire finished units, in order.
        let mut advanced = false;
        while units.front().is_some_and(|u| u.pending == 0) {
            let u = units.pop_front().unwrap();
            flushed = u.end;
            if u.last_of_batch {
                batches_in_flight -= 1;
                stats.flush_done(u.started);
            }
            advanced = true;
        }
        if advanced {
            shared.insert.set_flushed(flushed);
            shared.commit.publish(flushed, flushed);
            files.close_below(flushed.segno(seg_size));
        }

        // 3. Done?
        let safe = shared.insert.safe_point();
        if shared.commit.is_shut_down()
            && units.is_empty()
            && submitted >= shared.insert.insert_lsn()
            && !shared.insert.any_inserting()
        {
            break;
        }

        // 4. Start a batch?
        let can_start = batches_in_flight < s.max_inflight && tail_unit.is_none();
        let mut wait_until: Option<Instant> = None;
        if can_start {
            match demand.check(&shared, &s, submitted, safe) {
                Ok(true) => {
                    // Stop at the last whole block unless somebody waits for
                    // the partial one: then the next batch need not wait for
                    // this one's writes, and batches pipeline.
                    let commit = &shared.commit;
                    let whole = safe.align_down(B);
                    let want = if whole > submitted
                        && commit.request_lsn() <= whole
                        && !commit.is_shut_down()
                    {
                        whole
                    } else {
                        safe
                    };
                    let from = submitted.align_down(B);
                    let to = plan(
                        from,
                        want,
                        seg_size,
                        ring_size,
                        s.max_write,
                        max_pieces,
                        &mut pieces,
                    );
                    let mut segnos: Vec<u64> = pieces.iter().map(|p| p.segno).collect();
                    segnos.dedup();
                    // Queue depth 1 (nothing in flight, one write): a plain
                    // write (+ sync) on this thread. Measured here, io_uring
                    // loses at depth 1 (the sync runs in an io-wq worker);
                    // it wins once several writes are in flight.
                    // Small writes only: a large one blocks this thread and
                    // stops the copy/write overlap that bulk appends need.
                    if s.sync_writes_at_depth_1
                        && units.is_empty()
                        && pieces.len() == 1
                        && pieces[0].len <= DEPTH_1_MAX
                    {
                        let p = pieces[0];
                        let started = Instant::now();
                        let file = files.get(&shared, p.segno, mode);
                        let res = if p.tail {
                            let block = q.bounce_mut(0);
                            let used = (to.0 - p.lsn.0) as usize;
                            // SAFETY: as for the queued tail write below.
                            unsafe { shared.insert.buffer.get(p.lsn, &mut block[..used]) };
                            block[used..].fill(0);
                            file.write_all_at(block, p.file_offset)
                        } else {
                            // SAFETY: below the safe point and above the reclaim
                            // point; the slice is dropped before either moves.
                            let data = unsafe { shared.insert.buffer.slice(p.lsn, p.len) };
                            file.write_all_at(data, p.file_offset)
                        };
                        if let Err(e) = res {
                            fatal(format_args!("{e} (WAL {}..{})", submitted, to));
                        }
                        if per_batch_sync {
                            let res = if datasync {
                                file.datasync()
                            } else {
                                file.fsync()
                            };
                            if let Err(e) = res {
                                fatal(format_args!("{e} (WAL up to {to})"));
                            }
                        }
                        if s.fsync {
                            stats.syncs.fetch_add(1, Relaxed);
                        }
                        stats.writes.fetch_add(1, Relaxed);
                        stats.write_bytes.fetch_add(p.len as u64, Relaxed);
                        stats.flush_started(
                            to.0.saturating_sub(submitted.0),
                            shared.insert.records(),
                        );
                        stats.flush_done(started);
                        submitted = to;
                        flushed = to;
                        shared.insert.set_flushed(flushed);
                        shared.commit.publish(flushed, flushed);
                        files.close_below(flushed.segno(seg_size));
                        demand.last_flush = Instant::now();
                        continue;
                    }
                    // One write and a sync: link them (no round trip). Several
                    // writes: run them in parallel, sync when all are done.
                    let linked = per_batch_sync && pieces.len() == 1;
                    let chain = pieces.len() + if linked { 1 } else { 0 };
                    if let Err(e) = q.begin_chain(chain) {
                        fatal(format_args!("could not submit WAL writes: {e}"));
                    }
                    let started = Instant::now();
                    let batch_seq = next_seq;
                    for (i, p) in pieces.iter().enumerate() {
                        let fd = files.get(&shared, p.segno, mode).raw_fd();
                        let seq = if per_batch_sync {
                            batch_seq
                        } else {
                            next_seq.wrapping_add(i as u32)
                        };
                        let ud = user_data(seq, Some(p.len));
                        let res = if p.tail {
                            let bi = (0..q.bounce_blocks())
                                .find(|&i| q.bounce_free(i))
                                .expect("a free bounce block");
                            let block = q.bounce_mut(bi);
                            let used = (to.0 - p.lsn.0) as usize;
                            // SAFETY: [p.lsn, to) is below the safe point and at
                            // or above the reclaim point: fully inserted, and no
                            // inserter writes it.
                            unsafe { shared.insert.buffer.get(p.lsn, &mut block[..used]) };
                            block[used..].fill(0);
                            q.write_bounce(fd, bi, p.file_offset, ud, linked)
                        } else {
                            let off = shared.insert.buffer.offset(p.lsn);
                            q.write_ring(fd, off, p.len, p.file_offset, ud, linked)
                        };
                        if let Err(e) = res {
                            fatal(format_args!("could not queue a WAL write: {e}"));
                        }
                        if !per_batch_sync {
                            units.push_back(Unit {
                                seq,
                                start: p.lsn.max(submitted),
                                end: if p.tail {
                                    to
                                } else {
                                    Lsn(p.lsn.0 + p.len as u64)
                                },
                                pending: 1,
                                writes_pending: 1,
                                deferred_syncs: Vec::new(),
                                segno: p.segno,
                                file_offset: p.file_offset,
                                last_of_batch: i + 1 == pieces.len(),
                                started,
                            });
                            if p.tail {
                                tail_unit = Some(seq);
                            }
                        }
                    }
                    if per_batch_sync {
                        if linked {
                            let fd = files.get(&shared, pieces[0].segno, mode).raw_fd();
                            if let Err(e) = q.sync(fd, datasync, user_data(batch_seq, None), false)
                            {
                                fatal(format_args!("could not queue a WAL sync: {e}"));
                            }
                        }
                        units.push_back(Unit {
                            seq: batch_seq,
                            start: submitted,
                            end: to,
                            pending: (pieces.len() + segnos.len()) as u32,
                            writes_pending: pieces.len() as u32,
                            deferred_syncs: if linked { Vec::new() } else { segnos.clone() },
                            segno: pieces[0].segno,
                            file_offset: pieces[0].file_offset,
                            last_of_batch: true,
                            started,
                        });
                        if to.0 % B != 0 {
                            tail_unit = Some(batch_seq);
                        }
                        next_seq = next_seq.wrapping_add(1);
                        stats.syncs.fetch_add(segnos.len() as u64, Relaxed);
                    } else {
                        next_seq = next_seq.wrapping_add(pieces.len() as u32);
                        if s.fsync {
                            stats.syncs.fetch_add(1, Relaxed);
                        }
                    }
                    if let Err(e) = q.submit() {
                        fatal(format_args!("could not submit WAL writes: {e}"));
                    }
                    batches_in_flight += 1;
                    stats.writes.fetch_add(pieces.len() as u64, Relaxed);
                    stats
                        .write_bytes
                        .fetch_add(pieces.iter().map(|p| p.len as u64).sum::<u64>(), Relaxed);
                    stats.flush_started(to.0.saturating_sub(submitted.0), shared.insert.records());
                    submitted = to;
                    demand.last_flush = Instant::now();
                    continue;
                }
                Ok(false) => {}
                Err(deadline) => wait_until = Some(deadline),
            }
        }

        // 5. Wait for a completion, a wake-up, or a deadline.
        let now = Instant::now();
        let waited_for = shared.commit.request_lsn() > submitted;
        let mut timeout = if waited_for && can_start {
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
            (demand.last_flush + s.writer_delay())
                .saturating_duration_since(now)
                .max(Duration::from_micros(100))
        };
        if let Some(d) = wait_until {
            timeout = timeout.min(d.saturating_duration_since(now));
        }
        if shared.commit.is_shut_down() && units.is_empty() {
            timeout = timeout.min(Duration::from_micros(100));
        }
        // Someone waits for WAL beyond what we submitted, and it is copied.
        let commit_ready = || {
            shared.commit.request_lsn() > submitted && shared.insert.safe_point() > submitted
        };
        if can_start
            && units.is_empty()
            && wait_until.is_none()
            && demand.last_flush.elapsed() < crate::io::RECENTLY_BUSY
        {
            // Recently busy and idle now: the next commit is likely within
            // microseconds, so poll for it rather than sleep and be woken.
            if crate::io::poll_until(s.idle_poll, || {
                commit_ready() || shared.commit.is_shut_down()
            }) {
                continue;
            }
        }
        if can_start {
            shared.commit.flusher_will_sleep();
            if commit_ready() && wait_until.is_none() {
                shared.commit.flusher_awake();
                continue;
            }
        }
        if let Err(e) = q.submit_and_wait(1, Some(timeout)) {
            fatal(format_args!("io_uring wait failed in the WAL flusher: {e}"));
        }
        shared.commit.flusher_awake();
    }
    tracing::debug!(%flushed, "WAL flusher stopped");
}

/// The plain flusher, for comparison in benchmarks: pwrite each piece, then
/// one fdatasync, one batch at a time, no pipelining.
pub(crate) fn run_pwrite(shared: Arc<WalShared>, s: FlushSettings) {
    let seg_size = shared.segments.segment_size();
    let ring_size = shared.insert.buffer.size();
    let mode = s.open_mode();
    let mut files = Files {
        open: BTreeMap::new(),
    };
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
        let safe = plan(
            flushed.align_down(B),
            safe,
            seg_size,
            ring_size,
            s.max_write,
            usize::MAX,
            &mut pieces,
        );
        let mut segnos: Vec<u64> = Vec::new();
        for p in &pieces {
            let file = files.get(&shared, p.segno, mode);
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
                let f = files.get(&shared, *segno, mode);
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
