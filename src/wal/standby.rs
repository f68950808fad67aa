//! The standby's write path: raw WAL bytes from a primary, written at the
//! primary's LSNs through the same ring, flusher and group commit as
//! appends, so that the standby's segment files are byte-identical to the
//! primary's (DESIGN.md invariant 7; replication-design.md §7.2).
//!
//! A [`RawInserter`] is the stream's single writer. Each `put(lsn, bytes)`:
//! 1. `lsn` must be the insert position: a gap or an overlap is a protocol
//!    error, refused before anything is written;
//! 2. the bytes are checked as WAL first (`BoundaryTracker`: every record's
//!    header, own LSN and crc, across puts), so a refused put writes nothing;
//! 3. they are copied into the ring in pieces of at most half the ring
//!    (`InsertState::insert_raw`: announce, reserve, wait for space, copy,
//!    DONE), so a put larger than `wal_buffers` waits for the flusher piece
//!    by piece, as TCP back-pressure would;
//! 4. the flusher is asked for the end at once (not after `wal_writer_delay`).
//!
//! The flush LSN may then stop inside a record. That is fine for the
//! flusher and for startup (which cuts the WAL at the last complete
//! record), but a standby must never report such an LSN to its primary
//! (trap T3): [`RawInserter::flushed_record_end`] is the record-aligned one.
//!
//! At the end of its primary's timeline (the primary was promoted, or is a
//! standby that was), [`RawInserter::follow_timeline`] moves the WAL to
//! the next timeline at the switch point as a promotion does (the switch
//! segment's used prefix copied into the new timeline's file, the primary's
//! history file stored durably); the next open of the WAL is on it.
//!
//! What it is not: the walreceiver (no socket, no feedback messages).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::*;

use super::boundary::BoundaryTracker;
use super::insert::SlotGuard;
use super::{Result, WalError, WalShared};
use crate::lsn::Lsn;

/// The one writer of a standby's WAL; see [`super::Wal::raw_inserter`].
pub struct RawInserter<'a> {
    wal: &'a WalShared,
    slot: SlotGuard<'a>,
    /// Where the stream is, record by record. Invariant: its position is
    /// the WAL's insert position (nobody else reserves).
    tracker: BoundaryTracker,
    /// Ends of complete records put but perhaps not yet flushed, ascending:
    /// one per piece copied (the last record end within it), so the list
    /// holds at most one entry per half-ring of unflushed WAL plus one per
    /// put.
    unflushed_ends: VecDeque<Lsn>,
    /// The greatest record end known to be flushed.
    flushed_end: Lsn,
    /// Set when invalid bytes arrived while part of their record was already
    /// in the WAL: the stream cannot go on in this process.
    poisoned_at: Option<Lsn>,
}

impl<'a> RawInserter<'a> {
    pub(super) fn new(wal: &'a WalShared, slot: SlotGuard<'a>) -> RawInserter<'a> {
        let at = wal.insert.insert_lsn();
        RawInserter {
            wal,
            slot,
            tracker: BoundaryTracker::new(at),
            unflushed_ends: VecDeque::new(),
            // The open's end is a record end, and durable.
            flushed_end: at,
            poisoned_at: None,
        }
    }

    /// The LSN the next put must start at (the WAL's insert position).
    pub fn insert_lsn(&self) -> Lsn {
        self.tracker.position()
    }

    /// The end of the last complete, valid record put (in the ring; maybe
    /// not yet flushed): a record-aligned write position.
    pub fn last_complete_record_end(&self) -> Lsn {
        self.tracker.last_complete_record_end()
    }

    /// The greatest record end at or below the WAL's flush LSN: what a
    /// walreceiver may report as flushed (never the raw flush LSN, which
    /// may lie inside a record, trap T3). Monotone.
    pub fn flushed_record_end(&mut self) -> Lsn {
        let flushed = self.wal.commit.flush_lsn();
        while let Some(&e) = self.unflushed_ends.front() {
            if e > flushed {
                break;
            }
            self.flushed_end = e;
            self.unflushed_ends.pop_front();
        }
        self.flushed_end
    }

    /// Writes `bytes`, the primary's WAL at `lsn`, into this WAL at the same
    /// LSN, and asks the flusher for them at once. Returns the new insert
    /// position. Blocks while the ring is full.
    ///
    /// Refused, with nothing written: `lsn` is not the insert position
    /// ([`WalError::RawPutMisplaced`]; the inserter stays usable), or the
    /// bytes are not valid WAL ([`WalError::InvalidRawWal`]). In the second
    /// case, if the invalid record began in an earlier put, its first bytes
    /// are already in the WAL past [`RawInserter::last_complete_record_end`]:
    /// every later put is refused ([`WalError::RawStreamBroken`]) until a
    /// restart, whose startup cuts the WAL at the last complete record,
    /// where streaming resumes. Otherwise nothing changed and a put at the
    /// same LSN may follow.
    pub fn put(&mut self, lsn: Lsn, bytes: &[u8]) -> Result<Lsn> {
        let w = self.wal;
        if let Some(at) = self.poisoned_at {
            return Err(WalError::RawStreamBroken { at });
        }
        if w.closed.load(Relaxed) {
            return Err(WalError::Closed);
        }
        let insert = w.insert.insert_lsn();
        debug_assert_eq!(insert, self.tracker.position(), "a second writer");
        if lsn != insert {
            return Err(WalError::RawPutMisplaced { put: lsn, insert });
        }
        if bytes.is_empty() {
            return Ok(insert);
        }
        // Check everything before copying anything.
        let max = w.insert.max_reservation() as usize;
        let mut tracker = self.tracker.clone();
        let mut piece_ends = Vec::with_capacity(bytes.len().div_ceil(max));
        for piece in bytes.chunks(max) {
            if let Err(error) = tracker.feed(piece) {
                let at = self.tracker.last_complete_record_end();
                if at < self.tracker.position() {
                    self.poisoned_at = Some(at);
                }
                return Err(WalError::InvalidRawWal { put: lsn, error });
            }
            piece_ends.push(tracker.last_complete_record_end());
        }
        let mut end = insert;
        for (piece, record_end) in bytes.chunks(max).zip(piece_ends) {
            let (start, e) = w
                .insert
                .insert_raw(&self.slot, piece, |s, n| w.wait_for_space(s, n));
            debug_assert_eq!(start, end);
            end = e;
            if self
                .unflushed_ends
                .back()
                .copied()
                .unwrap_or(self.flushed_end)
                < record_end
            {
                self.unflushed_ends.push_back(record_end);
            }
        }
        self.tracker = tracker;
        // IMPORTANT: at once, not after wal_writer_delay: the primary's
        // commits at `on` wait for this standby's flush.
        w.commit.request(end);
        Ok(end)
    }
}

impl RawInserter<'_> {
    /// Moves this standby's WAL to timeline `new`, which began at `switch`
    /// (the end of this WAL's timeline on the primary), with `history`, the
    /// primary's `new` history file. Waits until everything up to `switch`
    /// is flushed, then (as a promotion, [`super::start_timeline`]) copies
    /// the switch segment's used prefix into `new`'s file, removes this
    /// timeline's later segment files and stores the history file durably:
    /// a crash at any step leaves the old timeline or the new one whole.
    ///
    /// The running WAL goes on naming files with the old timeline: nothing
    /// may be written after this; the caller reopens the WAL (a restart of
    /// the standby), which then opens on `new`.
    pub fn follow_timeline(&mut self, new: u32, switch: Lsn, history: &[u8]) -> Result<()> {
        let w = self.wal;
        let dir = w.segments.dir().to_path_buf();
        let seg = w.segments.segment_size();
        let bad = |message: String| WalError::BadDirectory {
            dir: dir.display().to_string(),
            message,
        };
        let old = w.segments.timeline();
        let insert = self.tracker.position();
        // IMPORTANT: the switch must be this WAL's end exactly. A WAL past
        // it diverged (never cut here: `walden rewind` does that); one short
        // of it would leave a hole on the new timeline.
        if insert != switch || self.tracker.last_complete_record_end() != switch {
            return Err(bad(format!(
                "cannot follow timeline {new}: timeline {old} ends at {switch} on the primary, \
                 but this standby's WAL ends at {insert}"
            )));
        }
        let entries = super::timeline::parse_history_bytes(history).map_err(|why| {
            bad(format!(
                "the primary's history file of timeline {new}: {why}"
            ))
        })?;
        match entries.last() {
            Some(e) if e.parent == old && e.switch == switch => {}
            last => {
                return Err(bad(format!(
                    "the primary's history file of timeline {new} does not say that timeline \
                     {old} ended at {switch} (its last line: {last:?})"
                )))
            }
        }
        w.commit.request(switch);
        if !w.commit.wait_flushed(switch) {
            return Err(WalError::Closed);
        }
        // No segment file may be prepared under the old name from here on.
        w.segments.stop_preparer();
        let map = super::timeline::TimelineMap::load(&dir, old, seg)?;
        super::start_timeline(&dir, &map, new, switch, seg, w.cfg.fsync, Some(history))?;
        // Nothing more goes into this WAL: the stream continues after a reopen.
        self.poisoned_at = Some(switch);
        tracing::info!("new target timeline is {new}");
        Ok(())
    }
}

impl Drop for RawInserter<'_> {
    fn drop(&mut self) {
        self.wal.raw_taken.store(false, Release);
    }
}
