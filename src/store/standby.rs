//! A standby's page store: continuous replay of its primary's WAL
//! (issue #14; replication-design.md §7.2, trap T1).
//!
//! A standby's WAL is written only by its `RawInserter` (the primary's
//! bytes at the primary's LSNs). The page store follows it with one thread,
//! `walden-replay`, which owns a [`WalReader`] positioned at the end of WAL
//! found at open (everything before it was applied by crash redo), and
//! loops:
//! 1. limit the reader to the WAL's flush LSN (bytes below it are durable
//!    and never change; the flush LSN may lie inside a record, which is then
//!    simply not complete yet: the reader stops at its start with
//!    [`EndOfWal::Limit`] and reads it whole on a later turn);
//! 2. apply every complete record to the buffer pool through crash redo's
//!    own per-record code ([`recovery::apply_record`]);
//! 3. publish the apply LSN (the end of the last record applied, Release)
//!    and signal the apply listeners;
//! 4. sleep on its eventfd until the flush LSN moves past what it read
//!    (a [`FlushListener`]: want, SeqCst fence, re-check), 100 ms at most.
//!
//! A record that cannot be replayed (a damaged page, a record that does not
//! decode) is fatal: the process aborts and the next start recovers.
//!
//! The standby never writes WAL: no checkpoint records (a requested
//! checkpoint is refused), no end-of-recovery checkpoint, no client page
//! writes. Replayed pages are dirty in the buffer pool and the background
//! writer may write them (never ahead of the WAL: only flushed records are
//! applied). The last checkpoint record replayed is remembered
//! ([`ReplayState::last_checkpoint`]); the checkpointer's automatic
//! triggers turn it into a restartpoint (`checkpointer::restartpoint`),
//! which moves the control file's redo point there and releases the WAL
//! before it. A restart redoes from the control file's redo point (or from
//! the start of the WAL for a store that never took a restartpoint), and
//! redo is idempotent by page LSN: pages already written out with later
//! changes are left as they are.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crossbeam::utils::CachePadded;

use crate::io::uring::EventFd;
use crate::lsn::Lsn;
use crate::record::Kind;
use crate::wal::commit::FlushListener;
use crate::wal::reader::{EndOfWal, WalReader};

use super::{recovery, Result, StoreError, StoreShared};

pub(crate) const NO_PAGE_WRITES: &str =
    "pages change only by replaying its primary's WAL, so page writes are refused";
pub(crate) const NO_CHECKPOINTS: &str =
    "it writes no WAL of its own, so it takes no checkpoints (it takes restartpoints by time and WAL volume)";

/// The safety net of the replay thread's sleep.
const NAP: Duration = Duration::from_millis(100);

/// What a standby's store shares with its replay thread.
pub(crate) struct ReplayState {
    apply_lsn: CachePadded<AtomicU64>,
    listeners: RwLock<Vec<Arc<EventFd>>>,
    stop: AtomicBool,
    /// The replay thread sleeps on it: the flusher's [`FlushListener`]
    /// signals it, and so does `stop`.
    wake: Arc<EventFd>,
    /// Where replay starts: the end of WAL found at open.
    start: Lsn,
    /// The last checkpoint record replayed: (its LSN, its redo point), what
    /// a restartpoint makes the standby's own.
    last_checkpoint: std::sync::Mutex<Option<(Lsn, Lsn)>>,
}

impl ReplayState {
    pub fn new(start: Lsn) -> Result<ReplayState> {
        let wake = EventFd::new().map_err(|e| StoreError::Thread("replay eventfd", e))?;
        Ok(ReplayState {
            apply_lsn: CachePadded::new(AtomicU64::new(start.0)),
            listeners: RwLock::new(Vec::new()),
            stop: AtomicBool::new(false),
            wake: Arc::new(wake),
            start,
            last_checkpoint: std::sync::Mutex::new(None),
        })
    }

    pub fn apply_lsn(&self) -> Lsn {
        Lsn(self.apply_lsn.load(Acquire))
    }

    /// The last checkpoint record replayed, (LSN, redo point).
    pub fn last_checkpoint(&self) -> Option<(Lsn, Lsn)> {
        *self.last_checkpoint.lock().unwrap()
    }

    pub fn add_listener(&self, wake: Arc<EventFd>) {
        self.listeners.write().unwrap().push(wake);
    }

    /// Asks the replay thread to stop (it finishes the record it is on).
    pub fn stop(&self) {
        self.stop.store(true, SeqCst);
        self.wake.signal();
    }

    /// Publishes `end` (Release: the pages it covers were changed before)
    /// and signals the listeners.
    fn publish(&self, end: Lsn) {
        self.apply_lsn.fetch_max(end.0, Release);
        for l in self.listeners.read().unwrap().iter() {
            l.signal();
        }
    }
}

/// Publish the apply LSN at least every this many records within one turn,
/// so a long catch-up shows progress.
const PUBLISH_EVERY: u64 = 1024;

/// The replay thread's body: runs until the store closes. A failure is fatal.
pub(crate) fn run(sh: &StoreShared) {
    let r = sh.replay.as_ref().expect("a standby's store");
    let wal = &sh.wal;
    let listener = Arc::new(FlushListener::new(Arc::clone(&r.wake)));
    wal.add_flush_listener(Arc::clone(&listener));
    let mut reader = WalReader::new(
        &sh.cfg.wal_dir,
        sh.cfg.wal_segment_size.0,
        wal.timeline(),
        r.start,
        Some(wal.flush_lsn()),
    );
    tracing::info!("standby replay started at {}", r.start);
    while !r.stop.load(SeqCst) {
        let limit = wal.flush_lsn();
        reader.set_limit(Some(limit));
        let mut applied = None;
        let mut n = 0u64;
        loop {
            if r.stop.load(Relaxed) {
                break;
            }
            let rec = match reader.next_record() {
                Ok(Some(rec)) => rec,
                Ok(None) => break,
                Err(e) => fail(format_args!("could not read the WAL to replay it: {e}")),
            };
            let (at, end) = (rec.lsn, rec.end_lsn());
            debug_assert!(
                end <= limit,
                "the reader handed out a record past its limit"
            );
            if let Err(e) = recovery::apply_record(&sh.pool, &rec) {
                fail(format_args!("could not replay the record at {at}: {e}"));
            }
            if matches!(
                rec.kind,
                Kind::CHECKPOINT_ONLINE | Kind::CHECKPOINT_SHUTDOWN
            ) {
                // Every record before it was applied: a restartpoint may
                // take it (its redo point is before it).
                match super::records::decode_checkpoint(rec.kind, rec.payload, at) {
                    Ok(cp) => *r.last_checkpoint.lock().unwrap() = Some((at, cp.redo)),
                    Err(e) => fail(format_args!(
                        "could not decode the checkpoint record at {at}: {e}"
                    )),
                }
            }
            applied = Some(end);
            n += 1;
            if n % PUBLISH_EVERY == 0 {
                r.publish(end);
            }
        }
        if let Some(end) = applied {
            r.publish(end);
        }
        match reader.end() {
            // The flush LSN, at a record end or inside a record not yet
            // complete: both continue on the next turn.
            None | Some(EndOfWal::Limit(_)) => {}
            // IMPORTANT: below the flush LSN every byte was put by the
            // RawInserter, which checked it as WAL: an invalid record or a
            // missing segment there is damage, not the end of the stream.
            Some(end) => fail(format_args!(
                "the standby's WAL is damaged below its flush LSN {limit}: {end}"
            )),
        }
        // Sleep until the flush LSN passes what was read. One half of a
        // Dekker hand-off with the flusher's publish (see server/shard.rs):
        // want() stores SeqCst, the fence keeps the flush LSN's load after
        // it, so either we see the new flush LSN or the flusher sees our wish.
        listener.want(Lsn(limit.0 + 1));
        fence(SeqCst);
        if wal.flush_lsn() > limit || r.stop.load(SeqCst) {
            continue;
        }
        r.wake.wait(NAP);
    }
    tracing::info!("standby replay stopped at {}", r.apply_lsn());
}

#[cold]
fn fail(msg: std::fmt::Arguments<'_>) -> ! {
    tracing::error!("standby replay: {msg}");
    crate::fatal::fatal(format_args!("standby replay cannot go on: {msg}"))
}
