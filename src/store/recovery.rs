//! Crash recovery: replay the WAL from the last checkpoint's redo point to
//! the end of valid WAL (PostgreSQL's StartupXLOG and redo loop).
//!
//! - A full-page image restores its page unconditionally, without reading
//!   it from the data device (so a torn page there is never read).
//! - A page write applies only when the page is older than the record: its
//!   page LSN (the end of the last record applied) is at or before the
//!   record's start. Replaying the same WAL twice changes nothing.
//! - Other records (client data, checkpoints) have nothing to replay.
//!
//! The end of valid WAL was found, and made durable, by `Wal::open` before
//! this runs, so a page written out during redo (eviction) never gets ahead
//! of durable WAL. Progress is logged every few seconds and published in
//! [`RecoveryProgress`](super::RecoveryProgress).

use std::sync::atomic::Ordering::*;
use std::time::Instant;

use crate::lsn::Lsn;
use crate::record::Kind;
use crate::wal::reader::{EndOfWal, WalReader};
use crate::wal::{Wal, TIMELINE};

use super::buffer_pool::Fill;
use super::control::ControlFile;
use super::page;
use super::records;
use super::{Result, StoreError, StoreShared};

const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Checks that the control file's checkpoint record is where it says, is a
/// checkpoint record, and names the same redo point; returns its end.
pub(crate) fn check_checkpoint_record(wal: &Wal, c: &ControlFile) -> Result<Lsn> {
    let start = wal.start_lsn();
    if c.redo < start {
        return Err(StoreError::Recovery(format!(
            "the WAL needed to recover from the redo point {} has been removed: \
             the retained WAL starts at {start}",
            c.redo
        )));
    }
    let mut r = wal.reader(c.checkpoint);
    let bad = |why: String| {
        StoreError::Recovery(format!(
            "could not locate a valid checkpoint record at {}: {why}",
            c.checkpoint
        ))
    };
    match r.next_record()? {
        Some(rec) if matches!(rec.kind, Kind::CHECKPOINT_ONLINE | Kind::CHECKPOINT_SHUTDOWN) => {
            let cp = records::decode_checkpoint(rec.kind, rec.payload, rec.lsn)?;
            if cp.redo != c.redo {
                return Err(bad(format!(
                    "it names redo {} but the control file says {}",
                    cp.redo, c.redo
                )));
            }
            Ok(rec.end_lsn())
        }
        Some(rec) => Err(bad(format!("the record there is a {} record", rec.kind))),
        None => Err(bad(r
            .end()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no record".into()))),
    }
}

/// Replays [from, to): `to` is the end of valid WAL.
pub(crate) fn redo(sh: &StoreShared, from: Lsn, to: Lsn) -> Result<()> {
    let prog = &sh.recovery;
    prog.from.store(from.0, Relaxed);
    prog.at.store(from.0, Relaxed);
    prog.end.store(to.0, Relaxed);
    prog.active.store(true, SeqCst);
    let res = replay(sh, from, to);
    prog.active.store(false, SeqCst);
    res
}

fn replay(sh: &StoreShared, from: Lsn, to: Lsn) -> Result<()> {
    if from >= to {
        tracing::info!("redo is not required");
        return Ok(());
    }
    tracing::info!("redo starts at {from}");
    let began = Instant::now();
    let mut last_report = began;
    let total_bytes = (to.0 - from.0) as f64;
    let mut r = WalReader::new(
        &sh.cfg.wal_dir,
        sh.cfg.wal_segment_size.0,
        TIMELINE,
        from,
        Some(to),
    );
    let (mut records, mut writes, mut images) = (0u64, 0u64, 0u64);
    let mut last = from;
    while let Some(rec) = r.next_record()? {
        let end = rec.end_lsn();
        last = rec.lsn;
        match rec.kind {
            Kind::PAGE_WRITE => {
                let w = records::decode_page_write(rec.payload, rec.lsn)?;
                let p = sh.pool.pin(w.tag, Fill::Read).map_err(|e| redo_error(rec.lsn, e))?;
                let mut g = p.write();
                if page::lsn(&g) <= rec.lsn {
                    page::data_mut(&mut g)[w.offset..w.offset + w.bytes.len()]
                        .copy_from_slice(w.bytes);
                    page::set_lsn(&mut g, end);
                    p.mark_dirty();
                }
                writes += 1;
            }
            Kind::PAGE_IMAGE => {
                let i = records::decode_page_image(rec.payload, rec.lsn)?;
                let p = sh.pool.pin(i.tag, Fill::Zero).map_err(|e| redo_error(rec.lsn, e))?;
                let mut g = p.write();
                i.restore(page::data_mut(&mut g), rec.lsn)?;
                page::set_lsn(&mut g, end);
                p.mark_dirty();
                images += 1;
            }
            _ => {}
        }
        records += 1;
        if records % 1024 == 0 {
            sh.recovery.at.store(end.0, Relaxed);
            sh.recovery.records.store(records, Relaxed);
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let done = (end.0 - from.0) as f64;
                tracing::info!(
                    "redo in progress, elapsed time: {:.2} s, current LSN: {end} ({:.1}% of {:.0} MB, {:.1} MB/s)",
                    began.elapsed().as_secs_f64(),
                    done * 100.0 / total_bytes,
                    total_bytes / 1e6,
                    done / 1e6 / began.elapsed().as_secs_f64()
                );
            }
        }
    }
    let reached = r.position();
    sh.recovery.at.store(reached.0, Relaxed);
    sh.recovery.records.store(records, Relaxed);
    if reached != to {
        let why = match r.end() {
            Some(EndOfWal::Limit(_)) | None => "unknown".to_string(),
            Some(e) => e.to_string(),
        };
        return Err(StoreError::Recovery(format!(
            "redo stopped at {reached}, before the end of WAL {to}: {why}"
        )));
    }
    let secs = began.elapsed().as_secs_f64();
    tracing::info!(
        "redo done at {last}: {records} records ({writes} page writes, {images} full-page images) \
         replayed from {from} to {to}, {:.1} MB in {secs:.3} s ({:.1} MB/s)",
        total_bytes / 1e6,
        total_bytes / 1e6 / secs.max(1e-9)
    );
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
