//! The WAL engine: lock-free insertion into a ring, one io_uring flusher with
//! group commit, segment files, and recovery of the end of WAL at startup.
//!
//! ```no_run
//! use walden::{Config, Durability, Kind, Wal};
//! let wal = Wal::open(Config::with_data_directory("walden-data".as_ref()))?;
//! let rec = wal.append(Kind::DATA, b"hello")?;
//! wal.wait(rec.end, Durability::Local)?; // durable: survives kill -9 and power loss
//! for r in wal.reader(rec.lsn) {
//!     let r = r?;
//!     println!("{} {:?}", r.lsn, r.payload);
//! }
//! wal.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What it is not: a page store (see `store`), a server (see `server`) or a
//! replication sender; those sit on top of it.

pub mod boundary;
pub mod buffer;
pub mod commit;
pub mod flusher;
pub mod insert;
pub mod marker;
pub mod reader;
pub mod segments;
pub mod standby;
pub mod startup;
pub mod timeline;
pub mod version;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError, FlusherKind};
use crate::io::file::{self, FileError};
use crate::io::uring::EventFd;
use crate::lock::{DirLocks, LockError};
use crate::lsn::Lsn;
use crate::record::{self, Kind};

use buffer::WalBuffer;
use commit::{GroupCommit, WalStats};
use insert::{InsertState, SlotGuard};
use reader::WalReader;
use segments::Segments;
use standby::RawInserter;

/// The timeline every WAL starts on. A promotion starts the next one; the
/// WAL's current timeline is the newest with a history file in its
/// directory ([`timeline::latest_timeline`], [`Wal::timeline`]).
pub const TIMELINE: u32 = 1;

/// The environment variable that makes a test abort the process at a named
/// point (`promote-after-copy`, `promote-after-history`,
/// `promote-after-end-of-recovery`): crash tests of promotion.
pub const FAILPOINT_ENV: &str = "WALDEN_FAILPOINT";

/// Aborts the process (as kill -9 would stop it) when [`FAILPOINT_ENV`]
/// names `point`.
pub fn failpoint(point: &str) {
    if std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == point) {
        tracing::error!("failpoint {point}: aborting");
        std::process::abort();
    }
}

/// Insert slots beyond one per shard, for the engine's own threads (the
/// checkpointer) and embedded callers: a server's shards hold their slots
/// for life, so a thread that appends now and then must find one free.
pub const INTERNAL_SLOTS: usize = 2;

pub use crate::durability::Durability;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    File(#[from] FileError),
    /// Another process (or another open engine) holds the directory's lock.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// `wal_version` names a format this build does not read.
    #[error(transparent)]
    Version(#[from] version::UnsupportedVersion),
    #[error("record of {len} bytes is larger than max_record_size ({max} bytes)")]
    RecordTooLarge { len: usize, max: u64 },
    #[error("the WAL is shut down")]
    Closed,
    #[error("invalid WAL directory {dir}: {message}")]
    BadDirectory { dir: String, message: String },
    #[error("cannot release WAL before {requested}: only WAL before the flush LSN {flushed} may be released")]
    ReleaseAhead { requested: Lsn, flushed: Lsn },
    #[error("invalid record kind 0: kinds are 1..=255")]
    InvalidKind,
    #[error("could not set up io_uring for the WAL flusher: {0} (io_uring needs Linux 5.11 or later, and locked memory for wal_buffers: raise LimitMEMLOCK)")]
    Uring(std::io::Error),
    #[error("could not start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
    #[error("WAL device full: no room for a new WAL segment, so appends past {limit} are refused until space is freed on the WAL device")]
    WalFull { limit: Lsn },
    /// The startup scan's observer (the page store's redo) failed, or the
    /// caller refused the end the scan found.
    #[error("{0}")]
    Replay(String),
    /// An append to a standby's WAL, which only its primary's stream writes.
    #[error("the WAL is a standby's (read-only): it is written only from its primary's stream, so appends are refused")]
    ReadOnly,
    #[error("raw WAL input needs a standby's WAL: open it with Wal::open_standby")]
    NotStandby,
    #[error("a RawInserter already exists for this WAL: a standby's stream has one writer")]
    RawInserterTaken,
    /// A raw put that does not continue the stream exactly.
    #[error("raw WAL put at {put}, but this WAL continues at {insert}: a gap or an overlap in the stream is a protocol error; nothing was written")]
    RawPutMisplaced { put: Lsn, insert: Lsn },
    /// Raw bytes that are not valid WAL.
    #[error("raw WAL put at {put} refused, nothing of it written: {error}")]
    InvalidRawWal {
        put: Lsn,
        error: record::RecordError,
    },
    /// Invalid raw bytes arrived after part of their record was written.
    #[error("raw WAL input stopped: the record at {at} was invalid and its first bytes are already in the WAL; restart the WAL (startup cuts it at {at}) and resume streaming from there")]
    RawStreamBroken { at: Lsn },
}

impl From<version::VersionError> for WalError {
    fn from(e: version::VersionError) -> WalError {
        match e {
            version::VersionError::File(f) => WalError::File(f),
            version::VersionError::Unsupported(u) => WalError::Version(u),
        }
    }
}

impl From<startup::ScanError> for WalError {
    fn from(e: startup::ScanError) -> WalError {
        match e {
            startup::ScanError::File(f) => WalError::File(f),
            startup::ScanError::Observer(m) => WalError::Replay(m),
        }
    }
}

pub type Result<T> = std::result::Result<T, WalError>;

/// Where an appended record landed: its LSN, and the LSN just past it (what
/// to wait for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub lsn: Lsn,
    pub end: Lsn,
}

pub(crate) struct WalShared {
    pub insert: InsertState,
    pub commit: GroupCommit,
    pub segments: Arc<Segments>,
    pub stats: Arc<WalStats>,
    cfg: Config,
    /// First record of the retained WAL (persisted in `wal_start`).
    start_lsn: AtomicU64,
    /// The start this process moved it to and the checkpoint whose release
    /// did (`None` until a checkpoint moved it: set before this process
    /// opened the WAL, or by [`Wal::remove_before`]). Compared with
    /// `start_lsn` by readers, so a pair from another start is never shown.
    released_by: Mutex<Option<(Lsn, Lsn)>>,
    /// Where this process started appending (the end found at startup).
    opened_at: Lsn,
    closed: AtomicBool,
    release_lock: Mutex<()>,
    /// The running flusher's reloadable settings.
    tuning: Mutex<Option<Arc<flusher::FlushTuning>>>,
    /// A standby's WAL: appends refused, written by one [`RawInserter`].
    /// Set by [`Wal::open_standby`] before the `Wal` is handed out, and
    /// never changed after: no append can race with the mode.
    standby: AtomicBool,
    /// A [`RawInserter`] exists.
    raw_taken: AtomicBool,
    /// The timeline this WAL writes (new segments are named with it).
    timeline: u32,
    /// The switch point this open promoted at (a new timeline began there).
    promoted_at: Option<Lsn>,
}

/// The embedded WAL engine. Share it between threads by reference (or Arc).
pub struct Wal {
    shared: Arc<WalShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The WAL directory's lock (none when a store holds it). A field of
    /// `Wal`, not of the shared state: dropped after `Drop` has stopped
    /// every thread that writes.
    _locks: DirLocks,
}

/// Asked, once the startup scan found the end of WAL and before anything
/// in the WAL directory is changed, whether the start may go on; an error
/// refuses it (the page store: the checkpoint record it needs is past the
/// end).
pub type MayStart<'a> = &'a mut dyn FnMut(&startup::EndOfScan) -> std::result::Result<(), String>;

impl Wal {
    /// Opens (or creates) the WAL in `cfg.wal_dir`, finds the end of valid
    /// WAL, and starts the flusher and the segment preparer. Holds the WAL
    /// directory's lock (`walden.pid`) until closed: a second open of the
    /// same directory, in this process or another, is refused.
    pub fn open(cfg: Config) -> Result<Wal> {
        Wal::open_observed(cfg, None)
    }

    /// [`Wal::open`], showing `observer` every valid record of the retained
    /// WAL as the startup scan finds it, in order and each already durable
    /// (every segment is fdatasynced before it is read).
    pub fn open_observed(cfg: Config, observer: Option<startup::ScanObserver<'_>>) -> Result<Wal> {
        cfg.validate()?;
        let locks = DirLocks::for_wal(&cfg)?;
        Wal::open_locked(cfg, observer, &mut |_| Ok(()), locks)
    }

    /// Opens the WAL of a standby: as [`Wal::open`] (the same end-of-WAL
    /// scan: after a crash the WAL ends at the last complete record, which
    /// is where streaming resumes, [`Wal::insert_lsn`]), but read-only to
    /// appends, for life; its one writer is [`Wal::raw_inserter`].
    ///
    /// A mode chosen at open rather than a switch on a running `Wal`: no
    /// append can be in flight when raw input starts (no ordering to prove
    /// between a flag and the insert slots' announcements), and what
    /// builds on the WAL (the page store: no checkpoint records of its own
    /// on a standby, trap T1) knows which it is from the start. Promotion
    /// will be a close and an [`Wal::open`].
    pub fn open_standby(cfg: Config) -> Result<Wal> {
        cfg.validate()?;
        let locks = DirLocks::for_wal(&cfg)?;
        Wal::open_standby_locked(cfg, None, &mut |_| Ok(()), locks)
    }

    /// [`Wal::open_standby`] as [`Wal::open_locked`] opens: the standby's
    /// page store replays the WAL through `observer` and holds the locks.
    /// The mode is set before the `Wal` is handed out, as there.
    pub(crate) fn open_standby_locked(
        cfg: Config,
        observer: Option<startup::ScanObserver<'_>>,
        may_start: MayStart<'_>,
        locks: DirLocks,
    ) -> Result<Wal> {
        let wal = Wal::open_locked(cfg, observer, may_start, locks)?;
        wal.shared.standby.store(true, SeqCst);
        tracing::info!(
            "standby WAL: appends refused, streaming resumes at {}",
            wal.insert_lsn()
        );
        Ok(wal)
    }

    /// Whether this is a standby's WAL ([`Wal::open_standby`]).
    pub fn is_standby(&self) -> bool {
        self.shared.standby.load(Relaxed)
    }

    /// The single writer of a standby's WAL: puts the primary's bytes at
    /// the primary's LSNs (see [`standby`]). Refused on a WAL opened for
    /// appends, and while another `RawInserter` exists.
    pub fn raw_inserter(&self) -> Result<RawInserter<'_>> {
        if !self.is_standby() {
            return Err(WalError::NotStandby);
        }
        if self.shared.raw_taken.swap(true, AcqRel) {
            return Err(WalError::RawInserterTaken);
        }
        Ok(RawInserter::new(
            &self.shared,
            self.shared.insert.acquire_slot(),
        ))
    }

    /// The open itself, under locks the caller took (a store holds them and
    /// passes none). The page store replays the WAL through `observer`, in
    /// the same pass that finds its end, and checks that end in
    /// `may_start`.
    ///
    /// IMPORTANT: every refusal comes before the first change to the WAL
    /// directory. Startup zeroes what follows the end of WAL and removes
    /// later segments; a start that is then refused (a missing segment, a
    /// checkpoint record past the end, a newer format) must have changed
    /// nothing, or the refusal protects nothing.
    pub(crate) fn open_locked(
        cfg: Config,
        observer: Option<startup::ScanObserver<'_>>,
        may_start: MayStart<'_>,
        locks: DirLocks,
    ) -> Result<Wal> {
        Wal::open_promoting(cfg, observer, may_start, locks, false)
    }

    /// [`Wal::open_locked`]; with `promote`, once the end of WAL is found
    /// it becomes the switch point of a new timeline ([`Wal::promoted_at`]):
    /// the used prefix of the switch segment is copied into the new
    /// timeline's file, later segments of the old timeline are removed,
    /// and the history file is written durably, in that order, so a crash
    /// at any step leaves either the old timeline (the copy is an unlisted
    /// file that the next promotion replaces) or the new one complete.
    pub(crate) fn open_promoting(
        cfg: Config,
        observer: Option<startup::ScanObserver<'_>>,
        may_start: MayStart<'_>,
        locks: DirLocks,
        promote: bool,
    ) -> Result<Wal> {
        cfg.validate()?;
        let dir = cfg.wal_dir.clone();
        file::create_dir_all(&dir)?;
        // Before any record is read: a newer format is not ours to judge.
        let versioned = version::check(&dir)?;
        let seg_size = cfg.wal_segment_size.0;
        let bad = |message: String| WalError::BadDirectory {
            dir: dir.display().to_string(),
            message,
        };
        let mut tli = timeline::latest_timeline(&dir)?;
        let map = timeline::TimelineMap::load(&dir, tli, seg_size)?;
        let present = timeline::list_segments(&dir, &map, seg_size)?;
        let segments_path =
            |d: &std::path::Path, segno: u64, _: u64| d.join(map.file_name(segno, seg_size));
        if let Some(&first) = present.first() {
            let len =
                file::SegmentFile::open(&segments_path(&dir, first, seg_size), Default::default())
                    .and_then(|f| f.len())
                    .unwrap_or(0);
            if len != seg_size {
                return Err(bad(format!(
                    "segment files are {len} bytes but wal_segment_size is {seg_size}: \
                     wal_segment_size cannot change after the WAL is created"
                )));
            }
        }
        let (start, start_missing) = match segments::read_wal_start(&dir)? {
            Some(l) => (l, false),
            // Written below, once the start is decided.
            None if present.is_empty() || present[0] == 1 => (Lsn(seg_size), true),
            None => {
                return Err(bad(format!(
                    "segments exist (the first is {}) but {} is missing: cannot tell where the first record starts",
                    segments_path(&dir, present[0], seg_size).display(),
                    segments::WAL_START_FILE
                )))
            }
        };

        let began = Instant::now();
        let scan = startup::scan(&dir, seg_size, tli, start, cfg.fsync, observer)?;
        let end = scan.end;
        // The scan ran into a missing segment (directly, or inside a record
        // that spans into it) while later segments exist: that is lost or
        // misplaced WAL, not the end of it. Refuse rather than discard.
        let first_gap = (start.segno(seg_size)..)
            .find(|s| present.binary_search(s).is_err())
            .expect("finite");
        if end.segno(seg_size) + 1 >= first_gap {
            if let Some(later) = present.iter().find(|&&s| s > first_gap) {
                return Err(bad(format!(
                    "WAL segment {} is missing but a later one exists ({}): \
                     refusing to start, because continuing would discard the later WAL. \
                     Restore the missing segment, or move the later ones away if they are not needed",
                    map.file_name(first_gap, seg_size),
                    map.file_name(*later, seg_size)
                )));
            }
        }
        match &scan.reason {
            _ if present.is_empty() => tracing::info!("creating a new WAL at {end} in {}", dir.display()),
            Some(reason) => tracing::info!(
                "end of WAL at {end}: {reason}; {} records ({} bytes) from {start} checked in {:.3} s",
                scan.records,
                end.0 - start.0,
                began.elapsed().as_secs_f64()
            ),
            None => tracing::info!("end of WAL at {end}"),
        }
        may_start(&scan).map_err(WalError::Replay)?;

        // The start is decided: from here on the WAL directory changes.
        if !versioned {
            if !present.is_empty() {
                tracing::info!(
                    "{} has no {}: written by a walden from before format versions, \
                     which is WAL format version 1; writing the file",
                    dir.display(),
                    version::WAL_VERSION_FILE
                );
            }
            version::write(&dir, version::WAL_FORMAT_VERSION)?;
        }
        if start_missing {
            segments::write_wal_start(&dir, start)?;
        }
        let promoted_at = if promote {
            let new = tli + 1;
            start_timeline(&dir, &map, new, end, seg_size, cfg.fsync, None)?;
            tracing::info!("selected new timeline ID: {new}");
            tli = new;
            Some(end)
        } else {
            None
        };
        let stats = Arc::new(WalStats::default());
        let segments = Arc::new(Segments::new(&dir, &cfg, tli, Arc::clone(&stats)));
        let (zeroed, removed) = startup::clear_after(&segments, end)?;
        if zeroed + removed > 0 {
            tracing::info!(
                "cleared {zeroed} bytes after the end of WAL and removed {removed} later segment file(s)"
            );
        }
        let end_segno = end.segno(seg_size);
        // IMPORTANT: WAL found valid may have been written but never synced
        // before a crash (its write was in flight). Make it durable before
        // anything is acknowledged after it, or a power cut could leave a
        // hole in front of acknowledged records.
        startup::sync_segments(&segments, start.segno(seg_size), end_segno)?;
        segments.release_before(start.align_down(seg_size), end_segno, None)?;
        // IMPORTANT: the segment holding the end exists before the preparer
        // creates later ones, so a stop before the first write never leaves a
        // gap below prepared segments (which the next start would refuse).
        segments.ensure(end_segno)?;
        let tail = startup::read_tail(&segments, end)?;

        let insert = InsertState::new(
            WalBuffer::new(cfg.wal_buffers.0),
            end,
            &tail,
            crate::topology::insert_shards(&cfg) + INTERNAL_SLOTS,
        );
        let wake = Arc::new(EventFd::new().map_err(|e| WalError::Thread("flusher eventfd", e))?);
        let shared = Arc::new(WalShared {
            insert,
            commit: GroupCommit::new(end, wake),
            segments: Arc::clone(&segments),
            stats,
            start_lsn: AtomicU64::new(start.0),
            released_by: Mutex::new(None),
            opened_at: end,
            closed: AtomicBool::new(false),
            release_lock: Mutex::new(()),
            tuning: Mutex::new(None),
            standby: AtomicBool::new(false),
            raw_taken: AtomicBool::new(false),
            timeline: tli,
            promoted_at,
            cfg,
        });
        if !shared.cfg.fsync {
            tracing::warn!(
                "fsync is off: acknowledged WAL can be lost on a crash or power failure; use it only for benchmarks and tests"
            );
        }

        let mut threads = Vec::new();
        segments.advance(end_segno);
        let seg = Arc::clone(&segments);
        threads.push(
            std::thread::Builder::new()
                .name("walden-walprep".into())
                .spawn(move || seg.run_preparer())
                .map_err(|e| WalError::Thread("segment preparer", e))?,
        );
        let fl = Arc::clone(&shared);
        let settings = flusher::FlushSettings::from_config(&shared.cfg);
        *shared.tuning.lock().unwrap() = Some(Arc::clone(&settings.tuning));
        let pin = shared.cfg.cpu_affinity.last().copied();
        let kind = shared.cfg.wal_flusher;
        // io_uring cannot reach a simulated disk (tests): there the io_uring
        // flusher runs on a simulated queue.
        let sim_disk = crate::io::sim::disk_for(&shared.cfg.wal_dir);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(
            std::thread::Builder::new()
                .name("walden-flusher".into())
                .spawn(move || {
                    if let Some(core) = pin {
                        crate::topology::pin_current_thread(core);
                    }
                    // If the flusher unwinds (a fatal error on a simulated
                    // disk in tests), waiters must not wait for it forever.
                    let _release = ReleaseWaitersOnUnwind(Arc::clone(&fl));
                    match kind {
                        FlusherKind::Uring if sim_disk.is_some() => {
                            let _ = ready_tx.send(Ok(()));
                            flusher::run_simulated(fl, settings, sim_disk.as_deref().unwrap())
                        }
                        FlusherKind::Uring => flusher::run_uring(fl, settings, ready_tx),
                        FlusherKind::Pwrite => {
                            let _ = ready_tx.send(Ok(()));
                            flusher::run_pwrite(fl, settings)
                        }
                    }
                })
                .map_err(|e| WalError::Thread("flusher", e))?,
        );
        let wal = Wal {
            shared,
            threads: Mutex::new(threads),
            _locks: locks,
        };
        // The io_uring is built on the flusher's own thread (SINGLE_ISSUER);
        // report a failure here rather than abort later.
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(wal),
            Ok(Err(e)) => Err(WalError::Uring(e)),
            Err(_) => Err(WalError::Thread(
                "flusher",
                std::io::Error::other("flusher exited at startup"),
            )),
        }
    }

    /// While the WAL device is full, waits (`wal_full_policy = wait`) until
    /// a record of `len` payload bytes has room, or refuses it (`error`);
    /// returns at once otherwise. For a caller about to take what the
    /// checkpointer needs (an insert slot, a page latch): the checkpoint is
    /// what frees WAL, so nobody may wait for room while holding those.
    pub fn check_room(&self, len: usize) -> Result<()> {
        self.shared
            .check_room(|| record::stream_len(len), RoomWait::Wait)
    }

    /// Appends one record through any free insert slot.
    pub fn append(&self, kind: Kind, payload: &[u8]) -> Result<Appended> {
        self.inserter().append(kind, payload)
    }

    /// Appends many records with one reservation per half-ring of bytes;
    /// pushes each record's LSN to `lsns` and returns the end of the last.
    pub fn append_batch(&self, records: &[(Kind, &[u8])], lsns: &mut Vec<Lsn>) -> Result<Lsn> {
        self.inserter().append_batch(records, lsns)
    }

    /// Takes an insert slot for the life of the returned handle: a thread that
    /// appends often (a server shard) keeps one instead of taking a free slot
    /// per call.
    pub fn inserter(&self) -> Inserter<'_> {
        Inserter {
            wal: &self.shared,
            slot: self.shared.insert.acquire_slot(),
            scratch: Vec::new(),
        }
    }

    /// Waits until WAL up to `end` (an [`Appended::end`]) reaches `level`.
    pub fn wait(&self, end: Lsn, level: Durability) -> Result<()> {
        self.shared.wait(end, level)
    }

    /// Applies the reloadable flusher settings of `cfg` (`wal_writer_delay`,
    /// `commit_delay`, `commit_siblings`) to the running flusher.
    pub fn reload_flush_settings(&self, cfg: &Config) {
        if let Some(t) = self.shared.tuning.lock().unwrap().as_ref() {
            t.set(cfg);
        }
    }

    /// Registers a thread with its own event loop to be signalled (through
    /// its eventfd) when the flush LSN reaches what it asks for.
    pub fn add_flush_listener(&self, l: Arc<commit::FlushListener>) {
        self.shared.commit.add_listener(l);
    }

    /// Copies the WAL at `start..start + dst.len()` from the ring, if the
    /// ring still holds it (PostgreSQL's `WALReadFromBuffers`): a walsender
    /// sending recent WAL then reads no file. The range must end at or below
    /// the flush LSN (durable, completely inserted). Returns false (and
    /// `dst` is garbage) when a newer reservation may have overwritten any
    /// of it; read the segment files then.
    ///
    /// WAL from before this `Wal` was opened is never in the ring.
    ///
    /// Why it holds: ring offset `x % size` is rewritten only for LSN
    /// `x + size` or later, which is written only after it was reserved,
    /// i.e. after `insert_pos` passed it. The copy is followed by a SeqCst
    /// fence and a load of `insert_pos`: if no reservation reaches
    /// `start + size` by then, no write to the copied offsets began before
    /// the copy ended (a seqlock reader's check, the insert position being
    /// the sequence).
    pub fn read_recent(&self, start: Lsn, dst: &mut [u8]) -> bool {
        let ins = &self.shared.insert;
        let size = ins.buffer.size();
        let end = start.0 + dst.len() as u64;
        debug_assert!(
            end <= self.flush_lsn().0,
            "read_recent beyond the flush LSN"
        );
        // Before the open's position the ring holds nothing of it (only the
        // partial block at the open was put back).
        if start < self.shared.opened_at
            || dst.len() as u64 > size
            || ins.insert_lsn().0 > start.0 + size
        {
            return false;
        }
        // SAFETY: checked below; a copy that may have raced is discarded.
        unsafe { ins.buffer.get_racy(start, dst) };
        std::sync::atomic::fence(SeqCst);
        ins.insert_lsn().0 <= start.0 + size
    }

    /// Forgets a listener added by [`Wal::add_flush_listener`].
    pub fn remove_flush_listener(&self, l: &Arc<commit::FlushListener>) {
        self.shared.commit.remove_listener(l);
    }

    /// Calls `l(segno)` (on the flusher's thread: keep it short) whenever
    /// the flusher moves on to a new segment.
    pub fn add_segment_listener(&self, l: segments::SegmentListener) {
        self.shared.segments.add_switch_listener(l);
    }

    /// Asks the flusher to flush up to `lsn` without waiting (a server shard
    /// then waits in its own loop).
    pub fn request_flush(&self, lsn: Lsn) {
        self.shared.commit.request(lsn);
    }

    /// The next LSN to be handed out.
    pub fn insert_lsn(&self) -> Lsn {
        self.shared.insert.insert_lsn()
    }

    /// WAL below this has been written to the kernel (maybe not yet durable).
    pub fn write_lsn(&self) -> Lsn {
        self.shared.commit.write_lsn()
    }

    /// WAL below this is durable.
    pub fn flush_lsn(&self) -> Lsn {
        self.shared.commit.flush_lsn()
    }

    /// The first record of the retained WAL.
    pub fn start_lsn(&self) -> Lsn {
        Lsn(self.shared.start_lsn.load(Acquire))
    }

    /// The checkpoint whose release moved the start to where it is now, if
    /// this process knows it (a checkpoint since open moved it there).
    pub fn start_released_by(&self) -> Option<Lsn> {
        let by = *self.shared.released_by.lock().unwrap();
        let start = self.start_lsn();
        by.filter(|(s, _)| *s == start).map(|(_, c)| c)
    }

    /// Where this process began appending (the end of WAL found at open).
    pub fn opened_at(&self) -> Lsn {
        self.shared.opened_at
    }

    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    pub fn stats(&self) -> &WalStats {
        &self.shared.stats
    }

    /// The figures /metrics exports. The flush LSN is read first, then the
    /// write and insert LSNs, so that `insert >= write >= flush` holds.
    pub fn metrics_snapshot(&self) -> crate::metrics::WalSnapshot {
        let flush_lsn = self.flush_lsn().0;
        let write_lsn = self.write_lsn().0;
        let insert_lsn = self.insert_lsn().0;
        let st = &self.shared.stats;
        crate::metrics::WalSnapshot {
            insert_lsn,
            write_lsn,
            flush_lsn,
            records_appended: self.records_appended(),
            bytes_appended: insert_lsn.saturating_sub(self.shared.opened_at.0),
            syncs: st.syncs.load(Relaxed),
            writes: st.writes.load(Relaxed),
            write_bytes: st.write_bytes.load(Relaxed),
            ring_full_waits: self.ring_full_waits(),
            segments_created: st.segments_created.load(Relaxed),
            segments_created_by_flusher: st.segments_created_by_flusher.load(Relaxed),
            segments_recycled: st.segments_recycled.load(Relaxed),
            segments_removed: st.segments_removed.load(Relaxed),
            flush_duration: st.flush_duration.snapshot(),
            flush_bytes: st.flush_bytes.snapshot(),
            group_size: st.group_size.snapshot(),
        }
    }

    /// Records appended since open.
    pub fn records_appended(&self) -> u64 {
        self.shared.insert.records()
    }

    /// Times an appender waited for ring space.
    pub fn ring_full_waits(&self) -> u64 {
        self.shared.insert.ring_full_waits.load(Relaxed)
    }

    /// Shards to run: one per insert slot, less the [`INTERNAL_SLOTS`].
    pub fn insert_shards(&self) -> usize {
        self.shared.insert.slot_count() - INTERNAL_SLOTS
    }

    /// Segments created since open (by the preparer or the flusher).
    pub fn segments_created(&self) -> u64 {
        self.shared.stats.segments_created.load(Relaxed)
    }

    /// The timeline this WAL writes: 1, or the one its last promotion
    /// started (the newest history file in its directory).
    pub fn timeline(&self) -> u32 {
        self.shared.timeline
    }

    /// The switch point, when this open started a new timeline.
    pub fn promoted_at(&self) -> Option<Lsn> {
        self.shared.promoted_at
    }

    /// A reader from `from` (a record start) up to the flush LSN now.
    pub fn reader(&self, from: Lsn) -> WalReader {
        WalReader::new(
            &self.shared.cfg.wal_dir,
            self.shared.cfg.wal_segment_size.0,
            self.shared.timeline,
            from,
            Some(self.flush_lsn()),
        )
    }

    /// Releases the segments wholly before `lsn`, a record start at or below
    /// the flush LSN: recycled or removed. The new start is made durable
    /// first, so a crash in between never leaves a WAL whose start is gone.
    /// Returns (recycled, removed). The checkpointer calls this with its redo LSN.
    pub fn remove_before(&self, lsn: Lsn) -> Result<(u64, u64)> {
        self.remove_before_recycling(lsn, None, None)
    }

    /// [`Wal::remove_before`], recycling released segments only to numbers
    /// up to `recycle_upto` (the checkpointer's estimate of what the next
    /// cycle needs, between `min_wal_size` and `max_wal_size`) and removing
    /// the rest. `None`: up to `max_wal_size` ahead. `checkpoint`: the
    /// checkpoint record whose release this is, named to readers refused
    /// below the new start ([`Wal::start_released_by`]).
    pub fn remove_before_recycling(
        &self,
        lsn: Lsn,
        recycle_upto: Option<u64>,
        checkpoint: Option<Lsn>,
    ) -> Result<(u64, u64)> {
        let _g = self.shared.release_lock.lock().unwrap();
        let flushed = self.flush_lsn();
        if lsn > flushed {
            return Err(WalError::ReleaseAhead {
                requested: lsn,
                flushed,
            });
        }
        if lsn <= self.start_lsn() {
            return Ok((0, 0));
        }
        // The new start must be a record start: check it decodes.
        let mut r = self.reader(lsn);
        if lsn < flushed
            && r.next_record()?.is_none()
            && !matches!(r.end(), Some(reader::EndOfWal::Limit(_)))
        {
            return Err(WalError::BadDirectory {
                dir: self.shared.cfg.wal_dir.display().to_string(),
                message: format!(
                    "{lsn} is not the start of a valid record: {}",
                    r.end().unwrap()
                ),
            });
        }
        segments::write_wal_start(&self.shared.cfg.wal_dir, lsn)?;
        *self.shared.released_by.lock().unwrap() = checkpoint.map(|c| (lsn, c));
        self.shared.start_lsn.store(lsn.0, Release);
        let seg_size = self.shared.segments.segment_size();
        let current = self.shared.commit.flush_lsn().segno(seg_size);
        Ok(self
            .shared
            .segments
            .release_before(lsn, current, recycle_upto)?)
    }

    /// Flushes everything appended and stops the threads. Appends racing
    /// with close may fail with [`WalError::Closed`].
    pub fn close(self) -> Result<()> {
        self.shutdown();
        Ok(())
    }

    /// [`Wal::close`] for a WAL shared by reference: flushes everything
    /// appended and stops the threads; appends after it fail with
    /// [`WalError::Closed`]. Idempotent.
    pub fn shut_down(&self) {
        self.shutdown()
    }

    fn shutdown(&self) {
        if self.shared.closed.swap(true, SeqCst) {
            return;
        }
        self.shared.commit.shut_down();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        let mut handles = threads.into_iter();
        let preparer = handles.next();
        for h in handles {
            let _ = h.join();
        }
        self.shared.segments.stop_preparer();
        if let Some(h) = preparer {
            let _ = h.join();
        }
        tracing::info!("WAL shut down at {}", self.flush_lsn());
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct ReleaseWaitersOnUnwind(Arc<WalShared>);

impl Drop for ReleaseWaitersOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.closed.store(true, SeqCst);
            self.0.commit.shut_down();
        }
    }
}

/// Starts timeline `new` at `switch`, the end of the WAL as `map` sees it
/// (PostgreSQL's `XLogInitNewTimeline` and `writeTimeLineHistory`):
/// 1. the used prefix of the switch segment is copied into `new`'s file
///    (temporary file, fsync, rename, directory fsync);
/// 2. the old timeline's segments after the switch segment (preallocated
///    or recycled, never read on the new timeline) are removed;
/// 3. the history file is written durably. From then on the WAL is on `new`.
///
/// A standby that follows its primary to `new` passes the primary's history
/// file (`fetched`), which is stored instead of one written here.
pub(crate) fn start_timeline(
    dir: &std::path::Path,
    map: &timeline::TimelineMap,
    new: u32,
    switch: Lsn,
    seg_size: u64,
    fsync: bool,
    fetched: Option<&[u8]>,
) -> Result<()> {
    let segno = switch.segno(seg_size);
    let used = switch.segment_offset(seg_size) as usize;
    let mut prefix = vec![0u8; used];
    if used > 0 {
        let old = dir.join(map.file_name(segno, seg_size));
        let f = file::SegmentFile::open(&old, Default::default())?;
        let got = f.read_at(&mut prefix, 0)?;
        if got < used {
            return Err(WalError::BadDirectory {
                dir: dir.display().to_string(),
                message: format!(
                    "{} is shorter than the end of WAL {switch}: cannot start timeline {new}",
                    old.display()
                ),
            });
        }
    }
    let target = dir.join(crate::lsn::segment_file_name(new, segno, seg_size));
    let tmp = dir.join(format!("xlogtemp.promote.{}", std::process::id()));
    if file::exists(&tmp) {
        file::remove_file(&tmp)?;
    }
    let f = file::SegmentFile::open(
        &tmp,
        file::OpenMode {
            write: true,
            create_new: true,
            ..Default::default()
        },
    )?;
    let mut whole = prefix;
    whole.resize(seg_size as usize, 0);
    f.write_all_at(&whole, 0)?;
    if fsync {
        f.fsync()?;
    }
    drop(f);
    file::rename(&tmp, &target)?;
    if fsync {
        file::sync_dir(dir)?;
    }
    failpoint("promote-after-copy");
    let old_tli = map.current();
    for name in file::list_files(dir)? {
        if let Some((t, s)) = crate::lsn::parse_segment_file_name(&name, seg_size) {
            if t == old_tli && s > segno {
                file::remove_file(&dir.join(name))?;
            }
        }
    }
    match fetched {
        None => {
            timeline::write_history(dir, new, old_tli, switch, timeline::PROMOTE_REASON, fsync)?;
        }
        Some(bytes) => {
            timeline::store_history(dir, new, bytes, fsync)?;
        }
    }
    failpoint("promote-after-history");
    Ok(())
}

impl WalShared {
    fn wait(&self, end: Lsn, level: Durability) -> Result<()> {
        if level == Durability::Off {
            return Ok(());
        }
        if self.commit.wait_flushed(end) {
            Ok(())
        } else {
            Err(WalError::Closed)
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.standby.load(Relaxed) {
            return Err(WalError::ReadOnly);
        }
        Ok(())
    }

    fn check_record(&self, kind: Kind, len: usize) -> Result<()> {
        self.check_writable()?;
        if kind.0 == 0 {
            return Err(WalError::InvalidKind);
        }
        let max = self.cfg.max_record_size.0;
        if len as u64 > max {
            return Err(WalError::RecordTooLarge { len, max });
        }
        Ok(())
    }

    /// Refuses (or, with `wal_full_policy = wait`, holds) an append of
    /// `len` payload bytes while the WAL device is full and the append
    /// would need a segment that could not be created. A margin stays free
    /// below the limit for the checkpoint's own records, whose checkpoint
    /// is what frees WAL.
    /// `len` is only called while the device is full: the common case costs
    /// one atomic load. With [`RoomWait::Refuse`] it never waits, whatever
    /// the policy (see [`Inserter::append_checked`]).
    fn check_room(&self, len: impl Fn() -> u64, wait: RoomWait) -> Result<()> {
        const MARGIN: u64 = 64 << 10;
        loop {
            let Some(limit) = self.segments.full_limit() else {
                return Ok(());
            };
            let end = self.insert.insert_lsn().0 + len() + MARGIN;
            if end <= limit.0 {
                return Ok(());
            }
            if self.cfg.wal_full_policy == crate::config::WalFullPolicy::Error
                || wait == RoomWait::Refuse
            {
                return Err(WalError::WalFull { limit });
            }
            if self.closed.load(Relaxed) {
                return Err(WalError::Closed);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_for_space(&self, start: Lsn, needed: Lsn) {
        self.commit.request(start);
        self.commit.wait_until(
            || self.insert.reclaim_lsn() >= needed,
            Some(Duration::from_millis(2)),
        );
    }
}

/// Whether [`WalShared::check_room`] may wait for room (as
/// `wal_full_policy` says) or must refuse at once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RoomWait {
    Wait,
    Refuse,
}

/// An insert slot held by one thread; see [`Wal::inserter`].
pub struct Inserter<'a> {
    wal: &'a WalShared,
    slot: SlotGuard<'a>,
    scratch: Vec<Lsn>,
}

impl Inserter<'_> {
    pub fn append(&mut self, kind: Kind, payload: &[u8]) -> Result<Appended> {
        let w = self.wal;
        w.check_record(kind, payload.len())?;
        if w.closed.load(Relaxed) {
            return Err(WalError::Closed);
        }
        w.check_room(|| record::stream_len(payload.len()), RoomWait::Wait)?;
        self.scratch.clear();
        let (start, end) =
            w.insert
                .insert(&self.slot, &[(kind, payload)], &mut self.scratch, |s, n| {
                    w.wait_for_space(s, n)
                });
        Ok(Appended { lsn: start, end })
    }

    /// See [`Wal::append_batch`].
    pub fn append_batch(&mut self, records: &[(Kind, &[u8])], lsns: &mut Vec<Lsn>) -> Result<Lsn> {
        let w = self.wal;
        for (kind, p) in records {
            w.check_record(*kind, p.len())?;
        }
        if w.closed.load(Relaxed) {
            return Err(WalError::Closed);
        }
        w.check_room(
            || {
                records
                    .iter()
                    .map(|(_, p)| record::stream_len(p.len()))
                    .sum()
            },
            RoomWait::Wait,
        )?;
        let max = w.insert.max_reservation();
        let mut end = w.insert.insert_lsn();
        let mut i = 0;
        while i < records.len() {
            let mut total = 0;
            let mut j = i;
            while j < records.len() {
                let l = record::stream_len(records[j].1.len());
                if total + l > max {
                    break;
                }
                total += l;
                j += 1;
            }
            let (_, e) = w.insert.insert(&self.slot, &records[i..j], lsns, |s, n| {
                w.wait_for_space(s, n)
            });
            end = e;
            i = j;
        }
        Ok(end)
    }

    pub fn wait(&self, end: Lsn, level: Durability) -> Result<()> {
        self.wal.wait(end, level)
    }

    /// [`Wal::check_room`], for a thread that holds an insert slot.
    pub fn check_room(&self, len: usize) -> Result<()> {
        self.wal
            .check_room(|| record::stream_len(len), RoomWait::Wait)
    }

    /// Appends one of walden's own records (kinds 128..=255: page writes,
    /// checkpoints), which `max_record_size` does not limit (a full-page
    /// image must always fit), only the reservation limit of half the ring.
    /// `check(lsn)` runs once the LSN is reserved and before the copy; if it
    /// returns false the space becomes a NOOP record and `Ok(None)` is
    /// returned (see [`insert::InsertState::insert_checked`]).
    ///
    /// A page record (PAGE_WRITE, PAGE_IMAGE) is refused with
    /// [`WalError::WalFull`] while the WAL device is full, whatever
    /// `wal_full_policy` says: wait with [`Inserter::check_room`] before
    /// taking the page's latch, never while holding it.
    pub fn append_checked(
        &mut self,
        kind: Kind,
        payload: &[u8],
        check: impl FnOnce(Lsn) -> bool,
    ) -> Result<Option<Appended>> {
        let w = self.wal;
        assert!(kind.is_walden(), "append_checked is for walden's own kinds");
        w.check_writable()?;
        let max = w.insert.max_reservation() as usize - record::HEADER_LEN - 8;
        if payload.len() > max {
            return Err(WalError::RecordTooLarge {
                len: payload.len(),
                max: max as u64,
            });
        }
        if w.closed.load(Relaxed) {
            return Err(WalError::Closed);
        }
        // Page records are refused like client records; checkpoint records
        // use the margin kept for them. IMPORTANT: refused, never held, even
        // with wal_full_policy = wait: the caller holds the page's latch,
        // which the checkpointer (the one thing that frees WAL) must take to
        // write the page out. The page store waits with `check_room` before
        // it latches, and after a refusal here undoes, unlatches and waits.
        if kind == Kind::PAGE_WRITE || kind == Kind::PAGE_IMAGE {
            w.check_room(|| record::stream_len(payload.len()), RoomWait::Refuse)?;
        }
        self.scratch.clear();
        let (start, end, kept) = w.insert.insert_checked(
            &self.slot,
            &[(kind, payload)],
            &mut self.scratch,
            |s, n| w.wait_for_space(s, n),
            check,
        );
        Ok(kept.then_some(Appended { lsn: start, end }))
    }
}
