//! The checkpointer: when to checkpoint (PostgreSQL's checkpointer.c), and
//! how (its CreateCheckPoint and BufferSync).
//!
//! A checkpoint:
//! 1. sets the redo point: appends a CHECKPOINT_REDO record whose LSN it is
//!    (a shutdown checkpoint, with nothing else running, uses the insert LSN);
//!    from then on the first change to each page logs a full-page image;
//! 2. marks every page dirty at that moment and writes them, in file order,
//!    paced so that its progress keeps up with both elapsed time and WAL
//!    consumed against `checkpoint_completion_target` (IsCheckpointOnSchedule);
//! 3. fsyncs every data file written since the last checkpoint (io_uring);
//! 4. appends the CHECKPOINT_ONLINE (or _SHUTDOWN) record and flushes it;
//! 5. replaces the control file (checkpoint LSN, redo LSN, state);
//! 6. releases the WAL before the redo point: recycled while the estimate of
//!    the next cycle's need (between `min_wal_size` and `max_wal_size`)
//!    allows, removed otherwise.
//!
//! A crash anywhere before step 5 leaves the previous checkpoint in force,
//! and its WAL is still there (step 6 comes last).
//!
//! Triggers: `checkpoint_timeout` since the last one started (skipped when no
//! WAL was written since the last checkpoint record), WAL growth of
//! `max_wal_size / (1 + checkpoint_completion_target)` since the redo point,
//! a request (`walden checkpoint`, immediate), shutdown, end of recovery.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::lsn::Lsn;
use crate::record::Kind;
use crate::wal::Durability;

use super::buffer_pool::WriteFilter;
use super::control::{self, ClusterState};
use super::records::{self, Checkpoint};
use super::writeback::Writeback;
use super::{Result, StoreError, StoreShared};

/// Why a checkpoint runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Time,
    Wal,
    Requested,
    Shutdown,
    EndOfRecovery,
}

impl Reason {
    /// The flags PostgreSQL prints in `checkpoint starting: …`.
    pub fn flags(self) -> &'static str {
        match self {
            Reason::Time => "time",
            Reason::Wal => "wal",
            Reason::Requested => "immediate force wait",
            Reason::Shutdown => "shutdown immediate",
            Reason::EndOfRecovery => "end-of-recovery immediate wait",
        }
    }

    /// The `reason` label of `walden_checkpoints_total`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Time => "time",
            Reason::Wal => "wal",
            Reason::Requested => "requested",
            Reason::Shutdown => "shutdown",
            Reason::EndOfRecovery => "end_of_recovery",
        }
    }

    fn immediate(self) -> bool {
        !matches!(self, Reason::Time | Reason::Wal)
    }
}

type Outcome = std::result::Result<(Lsn, Lsn), String>;

struct QueueState {
    /// An immediate checkpoint was asked for, and why.
    requested: Option<Reason>,
    started: u64,
    done: u64,
    outcomes: VecDeque<(u64, Outcome)>,
    /// Stop the background writer.
    stop_bgwriter: bool,
    /// Take the shutdown checkpoint and stop.
    shutdown: bool,
    /// Stop without a checkpoint (the store failed to open).
    exit: bool,
    /// Time and WAL volume may start checkpoints: false until the store is
    /// open (recovery reads the WAL a checkpoint would release).
    automatic: bool,
    shutdown_outcome: Option<Outcome>,
    /// When the last checkpoint started (its timeout counts from there).
    last_start: Instant,
    /// When the last checkpoint triggered by WAL volume started.
    last_wal_start: Option<Instant>,
    /// PostgreSQL's CheckPointDistanceEstimate, bytes.
    distance_estimate: f64,
    prev_redo: Option<Lsn>,
    /// End of the last checkpoint record: no WAL since means idle.
    last_checkpoint_end: Lsn,
    /// Redo points of this run's checkpoints (and the one found at open):
    /// known record starts where `wal_keep_size` may cut the WAL.
    redo_history: VecDeque<Lsn>,
}

/// Requests and results of checkpoints, shared by the checkpointer thread,
/// requesters, and the paced write loop (which stops sleeping when an
/// immediate checkpoint or shutdown is asked for).
pub struct CheckpointQueue {
    st: Mutex<QueueState>,
    cond: Condvar,
    hurry: AtomicBool,
}

impl CheckpointQueue {
    /// `redo` and `checkpoint_end`: the latest checkpoint's redo LSN and the
    /// end of its record (invalid when unknown).
    pub(crate) fn new(redo: Lsn, checkpoint_end: Lsn) -> CheckpointQueue {
        CheckpointQueue {
            st: Mutex::new(QueueState {
                requested: None,
                started: 0,
                done: 0,
                outcomes: VecDeque::new(),
                stop_bgwriter: false,
                shutdown: false,
                exit: false,
                automatic: false,
                shutdown_outcome: None,
                last_start: Instant::now(),
                last_wal_start: None,
                distance_estimate: 0.0,
                prev_redo: redo.is_valid().then_some(redo),
                last_checkpoint_end: checkpoint_end,
                redo_history: redo.is_valid().then_some(redo).into_iter().collect(),
            }),
            cond: Condvar::new(),
            hurry: AtomicBool::new(false),
        }
    }

    /// Asks for an immediate checkpoint; the ticket is complete once a
    /// checkpoint that started after this call has finished.
    pub fn request(&self) -> u64 {
        self.request_for(Reason::Requested)
    }

    /// [`CheckpointQueue::request`] with the reason to log (end of recovery).
    pub(crate) fn request_for(&self, reason: Reason) -> u64 {
        let mut st = self.st.lock().unwrap();
        st.requested = Some(match st.requested {
            Some(Reason::EndOfRecovery) => Reason::EndOfRecovery,
            _ => reason,
        });
        self.hurry.store(true, SeqCst);
        let ticket = st.started + 1;
        self.cond.notify_all();
        ticket
    }

    pub fn outcome(&self, ticket: u64) -> Option<Outcome> {
        let st = self.st.lock().unwrap();
        if st.done < ticket {
            return st
                .shutdown
                .then(|| Err("the server is shutting down".to_string()));
        }
        st.outcomes
            .iter()
            .find(|(seq, _)| *seq >= ticket)
            .map(|(_, o)| o.clone())
            .or_else(|| Some(Err("checkpoint outcome no longer known".into())))
    }

    pub fn wait(&self, ticket: u64) -> Outcome {
        let mut st = self.st.lock().unwrap();
        while st.done < ticket && !st.shutdown && !st.exit {
            st = self.cond.wait(st).unwrap();
        }
        drop(st);
        self.outcome(ticket).expect("done or shut down")
    }

    /// Tells the background writer to stop.
    pub(crate) fn stop_bgwriter(&self) {
        self.st.lock().unwrap().stop_bgwriter = true;
        self.cond.notify_all();
    }

    /// Tells the checkpointer to take the shutdown checkpoint and stop.
    pub(crate) fn shut_down(&self) {
        self.st.lock().unwrap().shutdown = true;
        self.hurry.store(true, SeqCst);
        self.cond.notify_all();
    }

    /// Lets time and WAL volume start checkpoints (once recovery is over).
    pub(crate) fn start_automatic(&self) {
        let mut st = self.st.lock().unwrap();
        st.automatic = true;
        st.last_start = Instant::now();
        self.cond.notify_all();
    }

    /// Stops the checkpointer and the background writer without a checkpoint.
    pub(crate) fn abandon(&self) {
        let mut st = self.st.lock().unwrap();
        st.exit = true;
        st.stop_bgwriter = true;
        self.hurry.store(true, SeqCst);
        self.cond.notify_all();
    }

    /// What the shutdown checkpoint did, once the checkpointer has stopped.
    pub(crate) fn shutdown_outcome(&self) -> Option<Outcome> {
        self.st.lock().unwrap().shutdown_outcome.clone()
    }

    /// Sleeps `d` (the background writer's rest); false once shut down.
    pub(crate) fn sleep_unless_shut_down(&self, d: Duration) -> bool {
        let st = self.st.lock().unwrap();
        if st.stop_bgwriter {
            return false;
        }
        let st = self.cond.wait_timeout(st, d).unwrap().0;
        !st.stop_bgwriter
    }

    /// Wakes the checkpointer to re-check its triggers and settings. Taking
    /// the lock first means a checkpointer between its check and its wait
    /// cannot miss the wake-up.
    pub fn poke(&self) {
        drop(self.st.lock().unwrap());
        self.cond.notify_all();
    }

    /// Sleeps up to `d` unless a hurry (immediate request, shutdown) comes.
    fn nap(&self, d: Duration) {
        let st = self.st.lock().unwrap();
        if !self.hurry.load(SeqCst) {
            let _ = self.cond.wait_timeout(st, d).unwrap();
        }
    }

    fn finish(&self, seq: u64, outcome: Outcome) {
        let mut st = self.st.lock().unwrap();
        st.done = seq;
        st.outcomes.push_back((seq, outcome));
        while st.outcomes.len() > 16 {
            st.outcomes.pop_front();
        }
        self.cond.notify_all();
    }
}

/// The checkpointer thread's body. Every checkpoint runs here (so that the
/// page store's io_uring lives on this thread alone), the end-of-recovery
/// and shutdown ones included.
pub(crate) fn run(sh: &StoreShared) {
    loop {
        let q = &sh.ckpt;
        let mut st = q.st.lock().unwrap();
        let reason = loop {
            if st.exit {
                return;
            }
            if st.shutdown {
                drop(st);
                let outcome = checkpoint(sh, Reason::Shutdown).map_err(|e| e.to_string());
                let mut st = q.st.lock().unwrap();
                st.shutdown_outcome = Some(outcome);
                q.cond.notify_all();
                return;
            }
            if let Some(reason) = st.requested.take() {
                break reason;
            }
            if !st.automatic {
                st = q.cond.wait(st).unwrap();
                continue;
            }
            let timeout = Duration::from_millis(sh.tuning.checkpoint_timeout_ms.load(Relaxed));
            let elapsed = st.last_start.elapsed();
            if wal_due(sh) {
                break Reason::Wal;
            }
            if elapsed >= timeout {
                if sh.wal.insert_lsn() <= st.last_checkpoint_end {
                    // Idle since the last checkpoint: nothing to make durable.
                    tracing::debug!("checkpoint skipped because the system is idle");
                    st.last_start = Instant::now();
                    continue;
                }
                break Reason::Time;
            }
            let nap = (timeout - elapsed).min(Duration::from_millis(100));
            st = q.cond.wait_timeout(st, nap).unwrap().0;
        };
        st.started += 1;
        let seq = st.started;
        if reason == Reason::Wal {
            let warn = Duration::from_millis(sh.tuning.checkpoint_warning_ms.load(Relaxed));
            if let Some(prev) = st.last_wal_start {
                let apart = prev.elapsed();
                if !warn.is_zero() && apart < warn {
                    tracing::warn!(
                        "checkpoints are occurring too frequently ({} seconds apart)",
                        apart.as_secs()
                    );
                    tracing::warn!(
                        "HINT: Consider increasing the configuration parameter \"max_wal_size\"."
                    );
                }
            }
            st.last_wal_start = Some(Instant::now());
        }
        st.last_start = Instant::now();
        q.hurry.store(st.requested.is_some() || st.shutdown, SeqCst);
        drop(st);
        let outcome = checkpoint(sh, reason).map_err(|e| {
            if matches!(e, StoreError::Standby(_)) {
                // A refusal, not a failure: a standby takes no checkpoints.
                tracing::info!("checkpoint request refused: {e}");
            } else {
                tracing::error!("checkpoint failed: {e}");
                sh.stats.checkpoints_failed.fetch_add(1, Relaxed);
            }
            e.to_string()
        });
        q.finish(seq, outcome);
        sh.notify_listeners();
    }
}

/// PostgreSQL's CheckPointSegments: segments of WAL after the redo point
/// that start the next checkpoint.
fn checkpoint_segments(sh: &StoreShared) -> f64 {
    let segs = sh.cfg.max_wal_size.0 as f64 / sh.cfg.wal_segment_size.0 as f64;
    (segs / (1.0 + sh.tuning.completion_target())).max(1.0)
}

/// XLogCheckpointNeeded: the insert position is CheckPointSegments - 1
/// segments past the redo point's.
fn wal_due(sh: &StoreShared) -> bool {
    wal_due_at(sh, sh.wal.insert_lsn().segno(sh.cfg.wal_segment_size.0))
}

/// [`wal_due`] for the segment `segno` being written: called by the
/// flusher on every segment switch (as XLogWrite signals PostgreSQL's
/// checkpointer), so a checkpoint starts within a segment of being due.
pub(crate) fn wal_due_at(sh: &StoreShared, segno: u64) -> bool {
    let redo = sh.redo_lsn().segno(sh.cfg.wal_segment_size.0);
    segno >= redo + (checkpoint_segments(sh) as u64).saturating_sub(1).max(1)
}

/// Runs one checkpoint. Checkpoints never overlap: the checkpointer thread
/// runs them, except the end-of-recovery one (before it starts) and the
/// shutdown one (after it stopped).
pub(crate) fn checkpoint(sh: &StoreShared, reason: Reason) -> Result<(Lsn, Lsn)> {
    if sh.replay.is_some() {
        // IMPORTANT: a standby writes no WAL of its own (trap T1): no
        // CHECKPOINT_* record, so no checkpoint; at shutdown only its pages
        // are written out.
        return match reason {
            Reason::Shutdown => standby_shutdown(sh),
            // Automatic ones become restartpoints: the last checkpoint
            // record replayed, made the standby's own.
            Reason::Time | Reason::Wal => restartpoint(sh, reason),
            _ => Err(StoreError::Standby(super::standby::NO_CHECKPOINTS)),
        };
    }
    let began = Instant::now();
    let log = sh.tuning.log_checkpoints.load(Relaxed);
    if log {
        tracing::info!("checkpoint starting: {}", reason.flags());
    }
    sh.stats.checkpoint_in_progress.store(true, SeqCst);
    let res = run_checkpoint(sh, reason, began, log);
    sh.stats.checkpoint_in_progress.store(false, SeqCst);
    res
}

fn run_checkpoint(
    sh: &StoreShared,
    reason: Reason,
    began: Instant,
    log: bool,
) -> Result<(Lsn, Lsn)> {
    let shutdown = reason == Reason::Shutdown;
    let segs_before = sh.wal.segments_created();
    if shutdown {
        let mut c = sh.control.lock().unwrap();
        c.state = ClusterState::ShuttingDown;
        control::write(&sh.cfg.data_dir, &c, sh.cfg.fsync)?;
    }

    // 1. The redo point.
    let redo = if shutdown {
        let lsn = sh.wal.insert_lsn();
        sh.set_redo_lsn(lsn);
        lsn
    } else {
        let mut ins = sh.wal.inserter();
        let stamp = control::now_micros().to_le_bytes();
        sh.move_redo_point(|| {
            Ok(ins
                .append_checked(Kind::CHECKPOINT_REDO, &stamp, |_| true)?
                .expect("kept")
                .lsn)
        })?
    };

    // 2. Write every page dirty at the redo point.
    let to_write = sh.pool.mark_for_checkpoint();
    let write_began = Instant::now();
    let mut wb = Writeback::new()?;
    if !reason.immediate() {
        // Paced: a few pages at a time, so the WAL's writes are not stuck
        // behind a burst of page writes on a shared device.
        wb.set_batch(8);
    }
    let total = to_write.len().max(1) as f64;
    let mut schedule = Schedule::new(sh, redo, began);
    for (i, &(tag, frame)) in to_write.iter().enumerate() {
        wb.offer(&sh.pool, frame, WriteFilter::Checkpoint(tag))?;
        let progress = (i + 1) as f64 / total;
        if !reason.immediate() && !sh.ckpt.hurry.load(SeqCst) && schedule.on_schedule(sh, progress)
        {
            // Ahead of schedule: write what is queued, then rest a moment,
            // as PostgreSQL's CheckpointWriteDelay does per buffer.
            wb.flush(&sh.pool)?;
            sh.ckpt.nap(Duration::from_millis(100));
        }
    }
    wb.flush(&sh.pool)?;
    let written = wb.written;
    let write_secs = write_began.elapsed().as_secs_f64();

    // 3. Sync every file written since the last checkpoint.
    let sync_began = Instant::now();
    let files = sh.files.take_needs_sync()?;
    let per_file = if sh.cfg.fsync {
        wb.sync_files(&files)
    } else {
        vec![0.0; files.len()]
    };
    let sync_secs = sync_began.elapsed().as_secs_f64();

    // 4. The checkpoint record, durable. The first checkpoint of a new
    // timeline (the end-of-recovery one of a promotion) names the previous
    // timeline, as PostgreSQL's PrevTimeLineID; later ones their own.
    let timeline = sh.wal.timeline();
    let prev_timeline = {
        let c = sh.control.lock().unwrap();
        if c.timeline == timeline {
            timeline
        } else {
            c.timeline
        }
    };
    let rec = Checkpoint {
        redo,
        timeline,
        prev_timeline,
        time_us: control::now_micros(),
        full_page_writes: sh.full_page_writes,
    };
    let kind = if shutdown {
        Kind::CHECKPOINT_SHUTDOWN
    } else {
        Kind::CHECKPOINT_ONLINE
    };
    let a = sh
        .wal
        .inserter()
        .append_checked(kind, &records::encode_checkpoint(&rec), |_| true)?
        .expect("kept");
    sh.wal.wait(a.end, Durability::Local)?;

    // 5. The control file.
    {
        let mut c = sh.control.lock().unwrap();
        c.checkpoint = a.lsn;
        c.redo = redo;
        c.checkpoint_time = rec.time_us / 1_000_000;
        c.full_page_writes = sh.full_page_writes;
        c.timeline = rec.timeline;
        c.prev_timeline = rec.prev_timeline;
        c.acknowledged_lsn = sh.acknowledged_lsn(c.acknowledged_lsn);
        c.state = if shutdown {
            ClusterState::ShutDown
        } else {
            ClusterState::InProduction
        };
        control::write(&sh.cfg.data_dir, &c, sh.cfg.fsync)?;
    }
    sh.stats.last_checkpoint_lsn.store(a.lsn.0, Relaxed);
    sh.stats.last_redo_lsn.store(redo.0, Relaxed);

    // 6. Release the WAL before the redo point (what slots and
    // wal_keep_size hold kept).
    let Released {
        distance,
        estimate,
        recycled,
        removed,
    } = release_wal(sh, redo, a.lsn, a.end)?;
    let added = sh.wal.segments_created() - segs_before;

    let counter = match reason {
        Reason::Time => &sh.stats.checkpoints_time,
        Reason::Wal => &sh.stats.checkpoints_wal,
        Reason::Requested => &sh.stats.checkpoints_requested,
        Reason::Shutdown => &sh.stats.checkpoints_shutdown,
        Reason::EndOfRecovery => &sh.stats.checkpoints_end_of_recovery,
    };
    counter.fetch_add(1, Relaxed);
    sh.stats.buffers_checkpoint.fetch_add(written, Relaxed);
    sh.stats
        .checkpoint_write_us
        .fetch_add((write_secs * 1e6) as u64, Relaxed);
    sh.stats
        .checkpoint_sync_us
        .fetch_add((sync_secs * 1e6) as u64, Relaxed);
    if log {
        let longest = per_file.iter().cloned().fold(0.0, f64::max);
        let average = if per_file.is_empty() {
            0.0
        } else {
            per_file.iter().sum::<f64>() / per_file.len() as f64
        };
        tracing::info!(
            "checkpoint complete: wrote {written} buffers ({:.1}%); {added} WAL file(s) added, \
             {removed} removed, {recycled} recycled; write={write_secs:.3} s, sync={sync_secs:.3} s, \
             total={:.3} s; sync files={}, longest={longest:.3} s, average={average:.3} s; \
             distance={} kB, estimate={} kB; lsn={}, redo lsn={redo}",
            written as f64 * 100.0 / sh.pool.frames() as f64,
            began.elapsed().as_secs_f64(),
            files.len(),
            (distance / 1024.0).round() as u64,
            (estimate / 1024.0).round() as u64,
            a.lsn,
        );
    }
    Ok((a.lsn, redo))
}

/// Step 6 of a checkpoint or restartpoint: remembers the redo point (the
/// distance estimate, the redo history `wal_keep_size` cuts at), then
/// releases the WAL before the redo point, keeping `wal_keep_size` behind
/// the insert position.
fn release_wal(
    sh: &StoreShared,
    redo: Lsn,
    checkpoint: Lsn,
    checkpoint_end: Lsn,
) -> Result<Released> {
    // Replication slots first: what they hold, and (durably) which of them
    // are lost now.
    let slot_floor = match &sh.retention {
        None => Ok(None),
        Some(hook) => hook(sh.wal.insert_lsn()),
    };
    let (distance, estimate, release) = {
        let mut st = sh.ckpt.st.lock().unwrap();
        let distance = st.prev_redo.map_or(0, |p| redo.0.saturating_sub(p.0)) as f64;
        st.prev_redo = Some(redo);
        // UpdateCheckPointDistanceEstimate: jump up at once, decay slowly.
        st.distance_estimate = if st.distance_estimate < distance {
            distance
        } else {
            0.9 * st.distance_estimate + 0.1 * distance
        };
        st.last_checkpoint_end = checkpoint_end;
        st.redo_history.push_back(redo);
        let start = sh.wal.start_lsn();
        st.redo_history.retain(|r| *r >= start);
        // wal_keep_size: cut at the newest known record start that keeps
        // that much WAL behind the insert position (never past the redo point).
        let keep_from = Lsn(sh.wal.insert_lsn().0.saturating_sub(sh.cfg.wal_keep_size.0));
        let release = if keep_from >= redo {
            redo
        } else {
            st.redo_history
                .iter()
                .copied()
                .filter(|r| *r <= keep_from)
                .max()
                .unwrap_or(start)
                .max(start)
        };
        // A base backup in progress keeps its WAL.
        let release = match sh.wal_hold() {
            Some(hold) => release.min(hold.max(start)),
            None => release,
        };
        // A slot's restart LSN: cut at the newest known record start at or
        // below it (keeping a little more), never past it.
        let release = match slot_floor {
            Ok(Some(floor)) if floor < release => st
                .redo_history
                .iter()
                .copied()
                .filter(|r| *r <= floor)
                .max()
                .unwrap_or(start)
                .max(start),
            Ok(_) => release,
            Err(e) => {
                tracing::error!("no WAL released: the replication slots could not be saved: {e}");
                start
            }
        };
        (distance, st.distance_estimate, release)
    };
    let upto = recycle_upto(sh, redo, estimate);
    let (recycled, removed) =
        sh.wal
            .remove_before_recycling(release, Some(upto), Some(checkpoint))?;
    Ok(Released {
        distance,
        estimate,
        recycled,
        removed,
    })
}

/// What [`release_wal`] did, for the log line.
struct Released {
    /// Bytes between this redo point and the previous one.
    distance: f64,
    /// The checkpoint distance estimate after it.
    estimate: f64,
    recycled: u64,
    removed: u64,
}

/// A standby's restartpoint (PostgreSQL's CreateRestartPoint, trap T1): the
/// last checkpoint record replayed becomes the standby's own, without a
/// record of its own. Every page changed by a record before its redo point
/// was changed in the buffer pool before that record was replayed, so
/// writing every page dirty now and syncing the files makes them durable;
/// then the control file names that checkpoint and redo point, and the WAL
/// before the redo point is released (`wal_keep_size` kept). A restart then
/// redoes from there, not from the start of the standby's WAL. Skipped
/// when no checkpoint record newer than the control file's was replayed.
fn restartpoint(sh: &StoreShared, reason: Reason) -> Result<(Lsn, Lsn)> {
    let r = sh.replay.as_ref().expect("a standby");
    let current = *sh.control.lock().unwrap();
    let Some((ckpt, redo)) = r.last_checkpoint().filter(|(_, redo)| *redo > current.redo) else {
        tracing::debug!(
            "restartpoint skipped: no checkpoint record replayed since {}",
            current.redo
        );
        return Ok((current.checkpoint, current.redo));
    };
    let began = Instant::now();
    let log = sh.tuning.log_checkpoints.load(Relaxed);
    if log {
        tracing::info!("restartpoint starting: {}", reason.flags());
    }
    sh.stats.checkpoint_in_progress.store(true, SeqCst);
    let segs_before = sh.wal.segments_created();
    let res = (|| -> Result<(u64, usize, Released)> {
        let (written, files) = write_out_dirty(sh, Some(8))?;
        {
            let mut c = sh.control.lock().unwrap();
            c.checkpoint = ckpt;
            c.redo = redo;
            c.acknowledged_lsn = sh.acknowledged_lsn(c.acknowledged_lsn);
            c.state = ClusterState::InArchiveRecovery;
            control::write(&sh.cfg.data_dir, &c, sh.cfg.fsync)?;
        }
        sh.set_redo_lsn(redo);
        sh.stats.last_checkpoint_lsn.store(ckpt.0, Relaxed);
        sh.stats.last_redo_lsn.store(redo.0, Relaxed);
        let released = release_wal(sh, redo, ckpt, r.apply_lsn())?;
        Ok((written, files, released))
    })();
    sh.stats.checkpoint_in_progress.store(false, SeqCst);
    let (written, files, rel) = res?;
    let secs = began.elapsed().as_secs_f64();
    let Released {
        distance,
        estimate,
        recycled,
        removed,
    } = rel;
    sh.stats.buffers_checkpoint.fetch_add(written, Relaxed);
    if log {
        let added = sh.wal.segments_created() - segs_before;
        tracing::info!(
            "restartpoint complete: wrote {written} buffers ({:.1}%); {added} WAL file(s) added, \
             {removed} removed, {recycled} recycled; total={secs:.3} s; sync files={files}; \
             distance={} kB, estimate={} kB; lsn={ckpt}, redo lsn={redo}",
            written as f64 * 100.0 / sh.pool.frames() as f64,
            (distance / 1024.0).round() as u64,
            (estimate / 1024.0).round() as u64,
        );
        tracing::info!("recovery restart point at {redo}");
    }
    Ok((ckpt, redo))
}

/// Writes every page dirty now and syncs every file written since the
/// last sync (`batch`: pages per write-back batch, None: the default).
/// Returns (pages written, files synced).
fn write_out_dirty(sh: &StoreShared, batch: Option<usize>) -> Result<(u64, usize)> {
    let to_write = sh.pool.mark_for_checkpoint();
    let mut wb = Writeback::new()?;
    if let Some(b) = batch {
        wb.set_batch(b);
    }
    for &(tag, frame) in &to_write {
        wb.offer(&sh.pool, frame, WriteFilter::Checkpoint(tag))?;
    }
    wb.flush(&sh.pool)?;
    let files = sh.files.take_needs_sync()?;
    if sh.cfg.fsync {
        wb.sync_files(&files);
    }
    Ok((wb.written, files.len()))
}

/// A standby's close: writes every dirty page and syncs the files, then
/// rewrites the control file with its checkpoint and redo point unchanged
/// and the state still "in archive recovery". No WAL record is written, so
/// the next start redoes from the same redo point (idempotent by page LSN).
/// Returns the control file's (checkpoint, redo).
fn standby_shutdown(sh: &StoreShared) -> Result<(Lsn, Lsn)> {
    let (written, _) = write_out_dirty(sh, None)?;
    let mut c = sh.control.lock().unwrap();
    c.acknowledged_lsn = sh.acknowledged_lsn(c.acknowledged_lsn);
    c.state = ClusterState::InArchiveRecovery;
    control::write(&sh.cfg.data_dir, &c, sh.cfg.fsync)?;
    tracing::info!(
        "standby shut down: wrote {written} buffers; replay resumes from the redo point {} at the next start",
        c.redo
    );
    Ok((c.checkpoint, c.redo))
}

/// XLOGfileslop: the highest segment number a released segment may be
/// recycled to: what the next checkpoint cycle is expected to need (1 +
/// target times the distance estimate, plus 10%), kept between
/// `min_wal_size` and `max_wal_size` past the redo point.
fn recycle_upto(sh: &StoreShared, redo: Lsn, estimate: f64) -> u64 {
    let seg = sh.cfg.wal_segment_size.0;
    let redo_seg = redo.segno(seg);
    let min_seg = redo_seg + sh.cfg.min_wal_size.0 / seg - 1;
    let max_seg = redo_seg + sh.cfg.max_wal_size.0 / seg - 1;
    let distance = (1.0 + sh.tuning.completion_target()) * estimate * 1.10;
    let want = ((redo.0 as f64 + distance) / seg as f64).ceil() as u64;
    want.clamp(min_seg, max_seg)
}

/// IsCheckpointOnSchedule, with PostgreSQL's cached figure.
struct Schedule {
    began: Instant,
    start_lsn: Lsn,
    cached_elapsed: f64,
}

impl Schedule {
    fn new(_sh: &StoreShared, start_lsn: Lsn, began: Instant) -> Schedule {
        Schedule {
            began,
            start_lsn,
            cached_elapsed: 0.0,
        }
    }

    /// True when the write phase is ahead of both the clock and the WAL.
    fn on_schedule(&mut self, sh: &StoreShared, progress: f64) -> bool {
        let progress = progress * sh.tuning.completion_target();
        if progress < self.cached_elapsed {
            return false;
        }
        let seg = sh.cfg.wal_segment_size.0 as f64;
        let wal = sh.wal.insert_lsn().0.saturating_sub(self.start_lsn.0) as f64;
        let elapsed_xlogs = wal / seg / checkpoint_segments(sh);
        if progress < elapsed_xlogs {
            self.cached_elapsed = elapsed_xlogs;
            return false;
        }
        let timeout = sh.tuning.checkpoint_timeout_ms.load(Relaxed) as f64 / 1000.0;
        let elapsed_time = self.began.elapsed().as_secs_f64() / timeout;
        if progress < elapsed_time {
            self.cached_elapsed = elapsed_time;
            return false;
        }
        true
    }
}

pub use crate::clock::format_time;

/// The figures /metrics exports.
pub(crate) fn snapshot(sh: &StoreShared) -> crate::metrics::StoreSnapshot {
    let s = &sh.stats;
    let p = &sh.pool.stats;
    crate::metrics::StoreSnapshot {
        checkpoints: [
            ("time", s.checkpoints_time.load(Relaxed)),
            ("wal", s.checkpoints_wal.load(Relaxed)),
            ("requested", s.checkpoints_requested.load(Relaxed)),
            ("shutdown", s.checkpoints_shutdown.load(Relaxed)),
            (
                "end_of_recovery",
                s.checkpoints_end_of_recovery.load(Relaxed),
            ),
        ],
        checkpoints_failed: s.checkpoints_failed.load(Relaxed),
        checkpoint_in_progress: s.checkpoint_in_progress.load(Relaxed),
        buffers_checkpoint: s.buffers_checkpoint.load(Relaxed),
        checkpoint_write_seconds: s.checkpoint_write_us.load(Relaxed) as f64 / 1e6,
        checkpoint_sync_seconds: s.checkpoint_sync_us.load(Relaxed) as f64 / 1e6,
        last_checkpoint_lsn: s.last_checkpoint_lsn.load(Relaxed),
        last_redo_lsn: s.last_redo_lsn.load(Relaxed),
        buffers_clean: s.buffers_clean.load(Relaxed),
        maxwritten_clean: s.maxwritten_clean.load(Relaxed),
        buffers_alloc: p.allocs.load(Relaxed),
        buffers_backend: p.backend_writes.load(Relaxed),
        shared_buffers: sh.pool.frames() as u64,
        page_writes: s.page_writes.load(Relaxed),
        page_images: s.page_images.load(Relaxed),
        page_image_bytes: s.page_image_bytes.load(Relaxed),
        page_reads: s.page_reads.load(Relaxed),
        page_device_reads: p.reads.load(Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_like_postgres() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_796_151_348), "2026-12-01 18:55:48 UTC");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
