//! Crash recovery: replay the WAL from the last checkpoint's redo point to
//! the end of valid WAL (PostgreSQL's StartupXLOG and redo loop), in the
//! same pass as the WAL's own startup scan that finds that end.
//!
//! - A full-page image restores its page unconditionally, without reading
//!   it from the data device (so a torn page there is never read).
//! - A page write applies only when the page is older than the record: its
//!   page LSN (the end of the last record applied) is at or before the
//!   record's start. Replaying the same WAL twice changes nothing.
//! - Other records (client data, checkpoints) have nothing to replay; the
//!   checkpoint record the control file names is checked on the way.
//!
//! The scan fdatasyncs each segment before reading it, so every record seen
//! here is durable and a page written out during redo (an eviction) never
//! gets ahead of durable WAL. Progress is logged every few seconds and
//! published in [`RecoveryProgress`](super::RecoveryProgress).

use std::sync::atomic::Ordering::*;
use std::time::Instant;

use crate::lsn::Lsn;
use crate::record::Kind;
use crate::wal::reader::Record;

use super::buffer_pool::{BufferPool, Fill};
use super::control::ControlFile;
use super::page;
use super::records;
use super::{RecoveryProgress, StoreError};

const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The redo loop, fed one record at a time by the WAL's startup scan.
pub(crate) struct Redo<'a> {
    pool: &'a BufferPool,
    progress: &'a RecoveryProgress,
    /// Records before this are not replayed (the redo point).
    from: Lsn,
    /// The control file's checkpoint record, to be found on the way.
    checkpoint: Lsn,
    checkpoint_redo: Lsn,
    /// The end of the checkpoint record, once seen (and valid).
    pub checkpoint_end: Option<Lsn>,
    /// A rough end of WAL for the progress percentage (the end of the
    /// segment file written last).
    estimated_end: Lsn,
    began: Instant,
    last_report: Instant,
    pub records: u64,
    pub writes: u64,
    pub images: u64,
    pub first: Option<Lsn>,
    pub last: Lsn,
    pub end: Lsn,
}

impl<'a> Redo<'a> {
    pub fn new(
        pool: &'a BufferPool,
        progress: &'a RecoveryProgress,
        c: Option<&ControlFile>,
        estimated_end: Lsn,
    ) -> Redo<'a> {
        let (from, checkpoint, checkpoint_redo) = match c {
            Some(c) if c.checkpoint.is_valid() => (c.redo, c.checkpoint, c.redo),
            // A new store: replay whatever page records the WAL holds.
            _ => (Lsn(0), Lsn::INVALID, Lsn::INVALID),
        };
        progress.from.store(from.0, Relaxed);
        progress.at.store(from.0, Relaxed);
        progress.end.store(estimated_end.0, Relaxed);
        progress.active.store(true, SeqCst);
        Redo {
            pool,
            progress,
            from,
            checkpoint,
            checkpoint_redo,
            checkpoint_end: None,
            estimated_end,
            began: Instant::now(),
            last_report: Instant::now(),
            records: 0,
            writes: 0,
            images: 0,
            first: None,
            last: from,
            end: from,
        }
    }

    /// Replays one record (the scan hands every valid one, in order).
    pub fn apply(&mut self, rec: &Record<'_>) -> Result<(), StoreError> {
        let end = rec.end_lsn();
        if rec.lsn == self.checkpoint {
            self.check_checkpoint(rec)?;
        }
        if rec.lsn < self.from {
            return Ok(());
        }
        if self.first.is_none() {
            self.first = Some(rec.lsn);
        }
        match rec.kind {
            Kind::PAGE_WRITE => {
                let w = records::decode_page_write(rec.payload, rec.lsn)?;
                let p = self
                    .pool
                    .pin(w.tag, Fill::Read)
                    .map_err(|e| redo_error(rec.lsn, e))?;
                let mut g = p.write();
                if page::lsn(&g) <= rec.lsn {
                    page::data_mut(&mut g)[w.offset..w.offset + w.bytes.len()]
                        .copy_from_slice(w.bytes);
                    page::set_lsn(&mut g, end);
                    p.mark_dirty();
                }
                self.writes += 1;
            }
            Kind::PAGE_IMAGE => {
                let i = records::decode_page_image(rec.payload, rec.lsn)?;
                let p = self
                    .pool
                    .pin(i.tag, Fill::Zero)
                    .map_err(|e| redo_error(rec.lsn, e))?;
                let mut g = p.write();
                i.restore(page::data_mut(&mut g), rec.lsn)?;
                page::set_lsn(&mut g, end);
                p.mark_dirty();
                self.images += 1;
            }
            _ => {}
        }
        // Everything up to here is durable (the scan synced it) and applied:
        // a page evicted now may carry it.
        self.pool.set_replayed_to(end);
        self.records += 1;
        self.last = rec.lsn;
        self.end = end;
        if self.records % 1024 == 0 {
            self.report(end);
        }
        Ok(())
    }

    fn check_checkpoint(&mut self, rec: &Record<'_>) -> Result<(), StoreError> {
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
        if cp.redo != self.checkpoint_redo {
            return Err(bad(format!(
                "it names redo {} but the control file says {}",
                cp.redo, self.checkpoint_redo
            )));
        }
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

    /// Once the scan found the end of WAL: logs the summary, unless the
    /// store was shut down cleanly (`quiet`).
    pub fn finish(&mut self, end: Lsn, quiet: bool) {
        self.progress.at.store(end.0, Relaxed);
        self.progress.end.store(end.0, Relaxed);
        self.progress.records.store(self.records, Relaxed);
        self.progress.active.store(false, SeqCst);
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
             {:.1} MB in {secs:.3} s ({:.1} MB/s, read and checked in the same pass)",
            self.last,
            self.records,
            self.writes,
            self.images,
            bytes / 1e6,
            bytes / 1e6 / secs.max(1e-9)
        );
    }
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
