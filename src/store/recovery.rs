//! Crash recovery: replay the WAL from the last checkpoint's redo point to
//! the end of valid WAL (PostgreSQL's StartupXLOG and redo loop), in the
//! same pass as the WAL's own startup scan that finds that end.
//!
//! - A full-page image restores its page unconditionally, without reading
//!   it from the data device (so a torn page there is never read).
//! - A page write applies only when the page is older than the record: its
//!   page LSN (the end of the last record applied) is at or before the
//!   record's start. Replaying the same WAL twice changes nothing.
//! - Other records (client data, checkpoints, backup markers) have nothing
//!   to replay; the checkpoint record the control file names is checked on
//!   the way, and in a base backup's copy the BACKUP_END of its backup is
//!   watched for ([`BackupEndWatch`]): the copy is consistent only past it.
//!
//! Parallel redo: the scan's thread reads and checks the WAL and hands each
//! page record, copied into a batch, to one of `recovery_workers` redo
//! threads chosen by its page, so one page's records are applied in WAL
//! order by one thread while different pages replay in parallel. Redo is
//! bound by cache misses (the mapping entry, the frame, the page LSN and the
//! bytes a record changes, each somewhere in a pool of gigabytes), so a
//! worker also prefetches what the next records of its batch touch, letting
//! those misses overlap rather than queue.
//!
//! The scan fdatasyncs each segment before reading it, so every record
//! dispatched is durable and a page written out during redo (an eviction)
//! never gets ahead of durable WAL. Progress is logged every few seconds and
//! published in [`RecoveryProgress`](super::RecoveryProgress).

use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Mutex;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

use crossbeam::channel::{self, Receiver, Sender};

use crate::config::Config;
use crate::lsn::Lsn;
use crate::record::Kind;
use crate::wal::reader::{Record, WalReader};
use crate::wal::timeline;

use super::backup::BackupEndWatch;
use super::buffer_pool::{BufferPool, Fill};
use super::control::ControlFile;
use super::page::{self, PageTag};
use super::records;
use super::{RecoveryProgress, StoreError};

const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A batch goes to its worker at this many records or bytes.
const BATCH_RECORDS: usize = 512;
const BATCH_BYTES: usize = 256 << 10;
/// Batches queued per worker before the scan waits for it.
const QUEUE_DEPTH: usize = 4;
/// How many records ahead of the one it applies a worker prefetches.
const LOOKAHEAD: usize = 8;

/// One page record in a batch; its bytes are `data[at..at + len]` (a page
/// write's new bytes, or a full-page image's whole payload).
#[derive(Clone, Copy)]
struct Entry {
    kind: Kind,
    tag: PageTag,
    /// A page write's offset in the page's data area.
    offset: u16,
    lsn: Lsn,
    end: Lsn,
    at: u32,
    len: u32,
}

#[derive(Default)]
struct Batch {
    data: Vec<u8>,
    recs: Vec<Entry>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            data: Vec::with_capacity(BATCH_BYTES + 2 * crate::io::PAGE_SIZE),
            recs: Vec::with_capacity(BATCH_RECORDS),
        }
    }
}

/// The first failure of any redo worker; the scan stops at its next
/// record. Lives outside the scope the workers run in.
#[derive(Default)]
pub(crate) struct RedoFailure {
    failed: AtomicBool,
    error: Mutex<Option<StoreError>>,
}

impl RedoFailure {
    pub fn new() -> RedoFailure {
        RedoFailure::default()
    }

    fn set(&self, e: StoreError) {
        let mut g = self.error.lock().unwrap();
        if g.is_none() {
            *g = Some(e);
        }
        self.failed.store(true, Release);
    }

    fn take(&self) -> Option<StoreError> {
        if !self.failed.load(Acquire) {
            return None;
        }
        self.error.lock().unwrap().take()
    }
}

struct Worker<'a> {
    tx: Option<Sender<Batch>>,
    batch: Batch,
    handle: Option<ScopedJoinHandle<'a, ()>>,
}

/// The redo loop, fed one record at a time by the WAL's startup scan, and
/// its workers.
pub(crate) struct Redo<'a> {
    pool: &'a BufferPool,
    progress: &'a RecoveryProgress,
    /// Records before this are not replayed (the redo point).
    from: Lsn,
    /// The control file's checkpoint record, to be found on the way.
    checkpoint: Lsn,
    checkpoint_redo: Lsn,
    /// The end of the checkpoint record, once seen (and valid).
    checkpoint_end: Option<Lsn>,
    /// A rough end of WAL for the progress percentage (the end of the
    /// segment file written last).
    estimated_end: Lsn,
    began: Instant,
    last_report: Instant,
    workers: Vec<Worker<'a>>,
    /// Emptied batches coming back from the workers, for reuse.
    spare: Receiver<Batch>,
    failure: &'a RedoFailure,
    /// A copy's backup, whose BACKUP_END makes it consistent.
    backup: &'a BackupEndWatch,
    records: u64,
    writes: u64,
    images: u64,
    first: Option<Lsn>,
    last: Lsn,
}

impl<'a> Redo<'a> {
    /// Starts `workers` redo threads (at least one) in `scope`.
    #[allow(clippy::too_many_arguments)] // each is a borrow the caller owns
    pub fn new<'env>(
        scope: &'a Scope<'a, 'env>,
        pool: &'a BufferPool,
        progress: &'a RecoveryProgress,
        failure: &'a RedoFailure,
        backup: &'a BackupEndWatch,
        c: Option<&ControlFile>,
        estimated_end: Lsn,
        workers: usize,
    ) -> Result<Redo<'a>, StoreError> {
        let (from, checkpoint, checkpoint_redo) = match c {
            Some(c) if c.checkpoint.is_valid() => (c.redo, c.checkpoint, c.redo),
            // A new store: replay whatever page records the WAL holds.
            _ => (Lsn(0), Lsn::INVALID, Lsn::INVALID),
        };
        progress.from.store(from.0, Relaxed);
        progress.at.store(from.0, Relaxed);
        progress.end.store(estimated_end.0, Relaxed);
        progress.active.store(true, SeqCst);
        let (spare_tx, spare) = channel::unbounded();
        let mut ws = Vec::new();
        for n in 0..workers.max(1) {
            let (tx, rx) = channel::bounded::<Batch>(QUEUE_DEPTH);
            let spare_tx = spare_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("walden-redo{n}"))
                .spawn_scoped(scope, move || {
                    for mut batch in rx {
                        if !failure.failed.load(Relaxed) {
                            if let Err(e) = apply_batch(pool, &batch) {
                                failure.set(e);
                            }
                        }
                        batch.data.clear();
                        batch.recs.clear();
                        let _ = spare_tx.send(batch);
                    }
                })
                .map_err(|e| {
                    StoreError::Recovery(format!("could not start a redo worker thread: {e}"))
                })?;
            ws.push(Worker {
                tx: Some(tx),
                batch: Batch::new(),
                handle: Some(handle),
            });
        }
        Ok(Redo {
            pool,
            progress,
            from,
            checkpoint,
            checkpoint_redo,
            checkpoint_end: None,
            estimated_end,
            began: Instant::now(),
            last_report: Instant::now(),
            workers: ws,
            spare,
            failure,
            backup,
            records: 0,
            writes: 0,
            images: 0,
            first: None,
            last: from,
        })
    }

    /// Replays one record (the scan hands every valid one, in order): page
    /// records go to their worker, the rest is checked here.
    pub fn apply(&mut self, rec: &Record<'_>) -> Result<(), StoreError> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        let end = rec.end_lsn();
        if rec.lsn == self.checkpoint {
            self.check_checkpoint(rec)?;
        }
        if rec.kind == Kind::BACKUP_END {
            self.backup.observe(rec.kind, rec.payload, rec.lsn, end)?;
        }
        if rec.lsn < self.from {
            return Ok(());
        }
        if self.first.is_none() {
            self.first = Some(rec.lsn);
        }
        if let Some((e, bytes)) = page_entry(rec)? {
            if e.kind == Kind::PAGE_WRITE {
                self.writes += 1;
            } else {
                self.images += 1;
            }
            self.dispatch(e, bytes);
        }
        // Everything up to here is durable (the scan synced it): a page
        // evicted by a worker may carry it.
        self.pool.set_replayed_to(end);
        self.records += 1;
        self.last = rec.lsn;
        if self.records % 1024 == 0 {
            self.report(end);
        }
        Ok(())
    }

    fn dispatch(&mut self, mut e: Entry, bytes: &[u8]) {
        let n = self.workers.len() as u64;
        let w = &mut self.workers[((e.tag.spread() >> 32) % n) as usize];
        e.at = w.batch.data.len() as u32;
        e.len = bytes.len() as u32;
        w.batch.data.extend_from_slice(bytes);
        w.batch.recs.push(e);
        if w.batch.recs.len() >= BATCH_RECORDS || w.batch.data.len() >= BATCH_BYTES {
            let fresh = self.spare.try_recv().unwrap_or_else(|_| Batch::new());
            let full = std::mem::replace(&mut w.batch, fresh);
            // A worker that is gone (it panicked) is reported by `join`.
            let _ = w.tx.as_ref().unwrap().send(full);
        }
    }

    /// Hands over the partial batches and waits for every worker to finish
    /// (a worker's panic is resumed here); then what was replayed, or the
    /// first failure.
    pub fn join(mut self) -> Result<Replayed, StoreError> {
        for w in &mut self.workers {
            if let Some(tx) = w.tx.take() {
                let _ = tx.send(std::mem::take(&mut w.batch));
            }
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                if let Err(panic) = h.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        Ok(Replayed {
            checkpoint_end: self.checkpoint_end,
            records: self.records,
            writes: self.writes,
            images: self.images,
            first: self.first,
            last: self.last,
            began: self.began,
            workers: self.workers.len(),
        })
    }

    fn check_checkpoint(&mut self, rec: &Record<'_>) -> Result<(), StoreError> {
        check_checkpoint_record(rec, self.checkpoint_redo)?;
        self.checkpoint_end = Some(rec.end_lsn());
        Ok(())
    }

    fn report(&mut self, at: Lsn) {
        self.progress.at.store(at.0, Relaxed);
        self.progress.records.store(self.records, Relaxed);
        if at > self.estimated_end {
            self.estimated_end = at;
            self.progress.end.store(at.0, Relaxed);
        }
        if self.last_report.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last_report = Instant::now();
        let first = self.first.unwrap_or(at);
        let done = at.0.saturating_sub(first.0) as f64;
        let total = self.estimated_end.0.saturating_sub(first.0) as f64;
        let secs = self.began.elapsed().as_secs_f64();
        tracing::info!(
            "redo in progress, elapsed time: {secs:.2} s, current LSN: {at} (about {:.0}% of {:.0} MB, {:.1} MB/s)",
            done * 100.0 / total.max(1.0),
            total / 1e6,
            done / 1e6 / secs
        );
    }
}

/// A page record's entry for [`apply_one`] and the bytes it carries (a page
/// write's new bytes, or a full-page image's whole payload); `None` for
/// other records. Crash redo (its workers) and a standby's replay thread
/// ([`apply_record`]) decode and apply records through the same code.
fn page_entry<'r>(rec: &Record<'r>) -> Result<Option<(Entry, &'r [u8])>, StoreError> {
    let end = rec.end_lsn();
    Ok(match rec.kind {
        Kind::PAGE_WRITE => {
            let w = records::decode_page_write(rec.payload, rec.lsn)?;
            let e = Entry {
                kind: rec.kind,
                tag: w.tag,
                offset: w.offset as u16,
                lsn: rec.lsn,
                end,
                at: 0,
                len: w.bytes.len() as u32,
            };
            Some((e, w.bytes))
        }
        Kind::PAGE_IMAGE => {
            let i = records::decode_page_image(rec.payload, rec.lsn)?;
            let e = Entry {
                kind: rec.kind,
                tag: i.tag,
                offset: 0,
                lsn: rec.lsn,
                end,
                at: 0,
                len: rec.payload.len() as u32,
            };
            Some((e, rec.payload))
        }
        _ => None,
    })
}

/// Applies one record to the buffer pool as a redo worker does (a page
/// record only if the page is older than it; other records change no page):
/// a standby's continuous replay. True if it was a page record.
pub(crate) fn apply_record(pool: &BufferPool, rec: &Record<'_>) -> Result<bool, StoreError> {
    let Some((e, bytes)) = page_entry(rec)? else {
        return Ok(false);
    };
    apply_one(pool, &e, bytes, None).map_err(|err| redo_error(e.lsn, err))?;
    Ok(true)
}

/// The checks of the checkpoint record the control file names: a
/// checkpoint, with the redo point the control file says.
fn check_checkpoint_record(rec: &Record<'_>, redo: Lsn) -> Result<(), StoreError> {
    let bad = |why: String| {
        StoreError::Recovery(format!(
            "could not locate a valid checkpoint record at {}: {why}",
            rec.lsn
        ))
    };
    if !matches!(
        rec.kind,
        Kind::CHECKPOINT_ONLINE | Kind::CHECKPOINT_SHUTDOWN
    ) {
        return Err(bad(format!("the record there is a {} record", rec.kind)));
    }
    let cp = records::decode_checkpoint(rec.kind, rec.payload, rec.lsn)?;
    if cp.redo != redo {
        return Err(bad(format!(
            "it names redo {} but the control file says {}",
            cp.redo, redo
        )));
    }
    Ok(())
}

/// Before anything is changed (PostgreSQL's ReadCheckpointRecord): the WAL
/// from the control file's redo point on is still retained, and the record
/// at its checkpoint LSN is a valid checkpoint with that redo point.
/// Returns the record's end. Reads only.
pub(crate) fn read_checkpoint(cfg: &Config, c: &ControlFile) -> Result<Lsn, StoreError> {
    let seg = cfg.wal_segment_size.0;
    if let Some(start) = crate::wal::segments::read_wal_start(&cfg.wal_dir)? {
        if c.redo < start {
            return Err(StoreError::Recovery(format!(
                "the WAL needed to recover from the redo point {} has been removed: \
                 the retained WAL starts at {start}",
                c.redo
            )));
        }
    }
    let mut reader = WalReader::new(
        &cfg.wal_dir,
        seg,
        timeline::current(&cfg.wal_dir),
        c.checkpoint,
        None,
    );
    let Some(rec) = reader.next_record()? else {
        let why = reader
            .end()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no record".into());
        return Err(StoreError::Recovery(format!(
            "could not locate a valid checkpoint record at {}: {why}",
            c.checkpoint
        )));
    };
    check_checkpoint_record(&rec, c.redo)?;
    Ok(rec.end_lsn())
}

/// What redo did, once its workers are joined.
pub(crate) struct Replayed {
    /// The end of the control file's checkpoint record, if the scan saw it.
    pub checkpoint_end: Option<Lsn>,
    records: u64,
    writes: u64,
    images: u64,
    first: Option<Lsn>,
    last: Lsn,
    began: Instant,
    workers: usize,
}

impl Replayed {
    /// Once the scan found the end of WAL: publishes it and logs the
    /// summary, unless the store was shut down cleanly (`quiet`).
    pub fn finish(&self, progress: &RecoveryProgress, end: Lsn, quiet: bool) {
        progress.at.store(end.0, Relaxed);
        progress.end.store(end.0, Relaxed);
        progress.records.store(self.records, Relaxed);
        progress.active.store(false, SeqCst);
        if quiet {
            return;
        }
        let Some(first) = self.first else {
            tracing::info!("redo is not required");
            return;
        };
        let secs = self.began.elapsed().as_secs_f64();
        let bytes = end.0.saturating_sub(first.0) as f64;
        tracing::info!(
            "redo done at {}: {} records ({} page writes, {} full-page images) replayed from {first} to {end}, \
             {:.1} MB in {secs:.3} s ({:.1} MB/s, read and checked in the same pass, {} redo worker(s))",
            self.last,
            self.records,
            self.writes,
            self.images,
            bytes / 1e6,
            bytes / 1e6 / secs.max(1e-9),
            self.workers
        );
    }
}

/// A worker's part: applies a batch in order, prefetching `LOOKAHEAD`
/// records ahead.
fn apply_batch(pool: &BufferPool, b: &Batch) -> Result<(), StoreError> {
    let prefetch = |e: &Entry| match e.kind {
        Kind::PAGE_WRITE => {
            pool.prefetch(e.tag, page::PAGE_HEADER + e.offset as usize, e.len as usize)
        }
        _ => None,
    };
    let n = b.recs.len();
    let mut hints = [None; LOOKAHEAD];
    for (i, e) in b.recs.iter().take(LOOKAHEAD).enumerate() {
        hints[i] = prefetch(e);
    }
    for (i, e) in b.recs.iter().enumerate() {
        let hint = hints[i % LOOKAHEAD];
        if i + LOOKAHEAD < n {
            hints[i % LOOKAHEAD] = prefetch(&b.recs[i + LOOKAHEAD]);
        }
        let bytes = &b.data[e.at as usize..(e.at + e.len) as usize];
        apply_one(pool, e, bytes, hint).map_err(|err| redo_error(e.lsn, err))?;
    }
    Ok(())
}

fn apply_one(
    pool: &BufferPool,
    e: &Entry,
    bytes: &[u8],
    hint: Option<usize>,
) -> Result<(), StoreError> {
    match e.kind {
        Kind::PAGE_WRITE => {
            let offset = e.offset as usize;
            pool.pin_hinted(e.tag, Fill::Read, hint)?.modify(|g| {
                if page::lsn(g) > e.lsn {
                    return false;
                }
                page::data_mut(g)[offset..offset + bytes.len()].copy_from_slice(bytes);
                page::set_lsn(g, e.end);
                true
            });
        }
        Kind::PAGE_IMAGE => {
            let i = records::decode_page_image(bytes, e.lsn)?;
            let p = pool.pin(e.tag, Fill::Zero)?;
            let mut g = p.write();
            i.restore(page::data_mut(&mut g), e.lsn)?;
            page::set_lsn(&mut g, e.end);
            p.mark_dirty();
        }
        _ => unreachable!("only page records are dispatched"),
    }
    Ok(())
}

fn redo_error(at: Lsn, e: StoreError) -> StoreError {
    match e {
        StoreError::Page(pe) => StoreError::Recovery(format!(
            "could not replay the record at {at}: {pe}; the page on the data device is damaged \
             (torn by a crash while full_page_writes was off, or corrupted) and no full-page image \
             after the redo point can repair it"
        )),
        other => other,
    }
}
