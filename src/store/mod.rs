//! The page store: 8 KiB pages materialised from page records, cached in a
//! buffer pool, written to the data device by a background writer and a
//! checkpointer, and recovered from the WAL after a crash.
//!
//! ```no_run
//! use walden::{Config, Durability, store::Store};
//! let store = Store::open(Config::with_data_directory("walden-data".as_ref()))?;
//! let w = store.write_page(1, 7, 100, b"hello")?;         // logged, applied, an LSN
//! store.wal().wait(w.end, Durability::Local)?;           // durable
//! let page = store.read_page(1, 7)?;
//! assert_eq!(&page.data[100..105], b"hello");
//! store.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Rules it keeps (docs/page-store.md says why):
//! - WAL before data: a page reaches the data device only once the WAL is
//!   flushed past its page LSN.
//! - With `full_page_writes`, the first change to a page after a
//!   checkpoint's redo point logs the whole page, so recovery can repair a
//!   page torn by a crash without reading it.
//! - A checkpoint completes only once every page dirty at its redo point is
//!   written and every file written is fsynced; then the control file names
//!   it, and only then is older WAL released.
//! - Recovery replays from the last checkpoint's redo point to the end of
//!   valid WAL before anything is served.
//!
//! What it is not: a database. Pages are opaque bytes; there are no tuples,
//! transactions or indexes.

pub mod backup;
pub mod bgwriter;
pub mod buffer_pool;
pub mod checkpointer;
pub mod control;
pub mod page;
pub mod records;
pub mod recovery;
pub mod relfiles;
pub mod rewind;
pub mod standby;
pub mod writeback;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use crossbeam::utils::CachePadded;

use crate::config::{Config, WalCompression, WalFullPolicy};
use crate::io::file::FileError;
use crate::io::uring::EventFd;
use crate::lock::{DirLocks, LockError};
use crate::lsn::Lsn;
use crate::record::Kind;
use crate::wal::startup::EndOfScan;
use crate::wal::{Appended, Inserter, Wal, WalError};

use buffer_pool::{BufferPool, Fill};
use checkpointer::{CheckpointQueue, Reason};
use control::{ClusterState, ControlError, ControlFile};
use page::{PageError, PageTag, MAX_BLOCKS, PAGE_DATA};
use records::RecordDecodeError;
use relfiles::RelFiles;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Page(#[from] PageError),
    #[error(transparent)]
    Record(#[from] RecordDecodeError),
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Another process (or another open store) holds a directory's lock.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A page address or byte range a client asked for that cannot exist.
    #[error("{0}")]
    BadRequest(String),
    #[error("no unpinned buffers available: all {0} frames of shared_buffers are in use")]
    NoFreeBuffers(usize),
    #[error("{0}")]
    Recovery(String),
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    #[error("could not set up io_uring for the {0}: {1}")]
    Uring(&'static str, std::io::Error),
    #[error("could not start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
    /// A page write (or a checkpoint) asked of a standby, whose pages change
    /// only by replaying its primary's WAL.
    #[error("the server is a standby (read-only): {0}")]
    Standby(&'static str),
    /// A standby opened on a page store of another system.
    #[error("{0}")]
    SystemMismatch(String),
}

impl StoreError {
    /// True when the data device is full (a write failed with ENOSPC).
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::File(e) if e.is_no_space())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A page as [`Store::read_page`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRead {
    /// End LSN of the last record applied to the page (0 for a page never written).
    pub lsn: Lsn,
    /// The page's data: [`PAGE_DATA`] bytes.
    pub data: Vec<u8>,
}

/// The settings a reload may change, read where they are used.
pub(crate) struct Tuning {
    pub checkpoint_timeout_ms: AtomicU64,
    completion_target_bits: AtomicU64,
    pub checkpoint_warning_ms: AtomicU64,
    pub bgwriter_delay_ms: AtomicU64,
    pub bgwriter_lru_maxpages: AtomicU64,
    lru_multiplier_bits: AtomicU64,
    pub log_checkpoints: AtomicBool,
    pub lz4: AtomicBool,
}

impl Tuning {
    fn new(cfg: &Config) -> Tuning {
        let t = Tuning {
            checkpoint_timeout_ms: AtomicU64::new(0),
            completion_target_bits: AtomicU64::new(0),
            checkpoint_warning_ms: AtomicU64::new(0),
            bgwriter_delay_ms: AtomicU64::new(0),
            bgwriter_lru_maxpages: AtomicU64::new(0),
            lru_multiplier_bits: AtomicU64::new(0),
            log_checkpoints: AtomicBool::new(false),
            lz4: AtomicBool::new(false),
        };
        t.set(cfg);
        t
    }

    fn set(&self, cfg: &Config) {
        self.checkpoint_timeout_ms
            .store(cfg.checkpoint_timeout.0, Relaxed);
        self.completion_target_bits
            .store(cfg.checkpoint_completion_target.to_bits(), Relaxed);
        self.checkpoint_warning_ms
            .store(cfg.checkpoint_warning.0, Relaxed);
        self.bgwriter_delay_ms.store(cfg.bgwriter_delay.0, Relaxed);
        self.bgwriter_lru_maxpages
            .store(cfg.bgwriter_lru_maxpages as u64, Relaxed);
        self.lru_multiplier_bits
            .store(cfg.bgwriter_lru_multiplier.to_bits(), Relaxed);
        self.log_checkpoints.store(cfg.log_checkpoints, Relaxed);
        self.lz4
            .store(cfg.wal_compression == WalCompression::Lz4, Relaxed);
    }

    pub fn completion_target(&self) -> f64 {
        f64::from_bits(self.completion_target_bits.load(Relaxed))
    }

    pub fn lru_multiplier(&self) -> f64 {
        f64::from_bits(self.lru_multiplier_bits.load(Relaxed))
    }
}

/// Counters for /metrics and the logs; recorded with relaxed atomics.
#[derive(Default)]
pub struct StoreStats {
    pub page_writes: AtomicU64,
    pub page_images: AtomicU64,
    pub page_image_bytes: AtomicU64,
    pub page_reads: AtomicU64,
    /// A page write whose full-page-image decision a checkpoint made stale
    /// (its reservation became a NOOP and it was logged again).
    pub redo_retries: AtomicU64,
    pub checkpoints_time: AtomicU64,
    pub checkpoints_wal: AtomicU64,
    pub checkpoints_requested: AtomicU64,
    pub checkpoints_shutdown: AtomicU64,
    pub checkpoints_end_of_recovery: AtomicU64,
    pub checkpoints_failed: AtomicU64,
    pub buffers_checkpoint: AtomicU64,
    pub checkpoint_write_us: AtomicU64,
    pub checkpoint_sync_us: AtomicU64,
    pub buffers_clean: AtomicU64,
    pub maxwritten_clean: AtomicU64,
    pub checkpoint_in_progress: AtomicBool,
    pub last_checkpoint_lsn: AtomicU64,
    pub last_redo_lsn: AtomicU64,
}

/// Where recovery is, for `walden status` and /status while it runs.
#[derive(Default)]
pub struct RecoveryProgress {
    pub active: AtomicBool,
    pub from: AtomicU64,
    pub at: AtomicU64,
    pub end: AtomicU64,
    pub records: AtomicU64,
}

pub(crate) struct StoreShared {
    pub wal: Arc<Wal>,
    pub pool: BufferPool,
    pub files: Arc<RelFiles>,
    pub cfg: Config,
    pub full_page_writes: bool,
    /// Odd while the checkpointer is moving the redo point; bumped twice per
    /// move. A page writer that sees it change around its reservation
    /// decides about the full-page image again.
    redo_seq: CachePadded<AtomicU64>,
    redo_lsn: CachePadded<AtomicU64>,
    pub control: Mutex<ControlFile>,
    pub tuning: Tuning,
    pub ckpt: CheckpointQueue,
    pub stats: StoreStats,
    pub recovery: Arc<RecoveryProgress>,
    /// Signalled whenever a checkpoint completes (server shards wait on them).
    listeners: RwLock<Vec<Arc<EventFd>>>,
    /// A standby's replay state (`None` on a primary).
    pub replay: Option<standby::ReplayState>,
    /// What else holds WAL (the server's replication slots).
    pub retention: Option<RetentionHook>,
    /// WAL a base backup still needs: (hold id, first LSN kept). The
    /// checkpointer releases no WAL at or after the lowest.
    pub wal_holds: Mutex<Vec<(u64, Lsn)>>,
    next_hold: AtomicU64,
    /// The start of the latest base backup (PostgreSQL's lastBackupStart):
    /// no two backups share a start, so a copy's BACKUP_END is its own.
    last_backup_start: AtomicU64,
    /// The highest quorum-flushed LSN noted by [`Store::note_acknowledged`]
    /// (a standby: its primary's `commit` LSN), for the control file's
    /// `acknowledged_lsn` at the next checkpoint or restartpoint.
    acknowledged: AtomicU64,
    /// A primary's quorum flush LSN, read at each checkpoint.
    acknowledged_source: Mutex<Option<AcknowledgedSource>>,
}

/// See [`Store::set_acknowledged_source`].
pub type AcknowledgedSource = Arc<dyn Fn() -> Lsn + Send + Sync>;

impl StoreShared {
    /// The control file's next `acknowledged_lsn`: the highest of what it
    /// holds, what was noted and what the source says, never past the
    /// flushed WAL (a standby may hear of a quorum position it has not
    /// received yet).
    pub fn acknowledged_lsn(&self, stored: Lsn) -> Lsn {
        let source = self.acknowledged_source.lock().unwrap().clone();
        let known = Lsn(self.acknowledged.load(SeqCst)).max(source.map_or(Lsn::INVALID, |f| f()));
        stored.max(known.min(self.wal.flush_lsn()))
    }

    /// The lowest LSN a [`WalHold`] keeps, if any.
    pub fn wal_hold(&self) -> Option<Lsn> {
        self.wal_holds.lock().unwrap().iter().map(|h| h.1).min()
    }
}

/// Keeps the WAL from an LSN on until dropped (a base backup's WAL, which
/// its client streams on a second connection, possibly behind later
/// checkpoints).
pub struct WalHold {
    shared: Arc<StoreShared>,
    id: u64,
    from: Lsn,
}

impl WalHold {
    /// The first LSN kept: a record start.
    pub fn from(&self) -> Lsn {
        self.from
    }
}

impl Drop for WalHold {
    fn drop(&mut self) {
        self.shared
            .wal_holds
            .lock()
            .unwrap()
            .retain(|h| h.0 != self.id);
    }
}

/// Called by each checkpoint, with the insert position, before it releases
/// WAL: the oldest LSN something else (a replication slot) still needs, or
/// `None`. The checkpoint releases nothing at or after it. `Err`: the
/// checkpoint releases no WAL this time (and says why).
pub type RetentionHook = Arc<dyn Fn(Lsn) -> std::result::Result<Option<Lsn>, String> + Send + Sync>;

impl StoreShared {
    /// The redo point page writers decide full-page images against, and the
    /// sequence value it was read under (even).
    fn redo_point(&self) -> (u64, Lsn) {
        let mut spins = 0u32;
        loop {
            let seq = self.redo_seq.load(SeqCst);
            if seq % 2 == 0 {
                let lsn = Lsn(self.redo_lsn.load(SeqCst));
                return (seq, lsn);
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Moves the redo point: `insert` appends the CHECKPOINT_REDO record and
    /// returns its LSN, which becomes the redo point. Every page record
    /// reserved after this began is re-decided (see `write_page`).
    pub fn move_redo_point(&self, insert: impl FnOnce() -> Result<Lsn>) -> Result<Lsn> {
        self.redo_seq.fetch_add(1, SeqCst);
        let res = insert();
        if let Ok(lsn) = res {
            self.redo_lsn.store(lsn.0, SeqCst);
        }
        self.redo_seq.fetch_add(1, SeqCst);
        res
    }

    pub fn set_redo_lsn(&self, lsn: Lsn) {
        self.move_redo_point(|| Ok(lsn)).expect("infallible");
    }

    pub fn redo_lsn(&self) -> Lsn {
        Lsn(self.redo_lsn.load(SeqCst))
    }

    pub fn notify_listeners(&self) {
        for l in self.listeners.read().unwrap().iter() {
            l.signal();
        }
    }

    fn write_page(
        &self,
        ins: &mut Inserter<'_>,
        tag: PageTag,
        offset: usize,
        bytes: &[u8],
    ) -> Result<Appended> {
        if self.replay.is_some() {
            return Err(StoreError::Standby(standby::NO_PAGE_WRITES));
        }
        check_range(tag, offset, bytes.len())?;
        // The room to wait for: a delta's, at first; after a refusal under
        // the latch, that of the record refused (an image may be larger).
        let mut need = records::PAGE_WRITE_HEADER + bytes.len();
        loop {
            // IMPORTANT: wait for WAL room before the page is latched, never
            // while it is: the checkpointer, the one thing that frees WAL,
            // latches every dirty page it writes out, so a writer asleep on
            // the latch would wait for it forever (wal_full_policy = wait).
            ins.check_room(need)?;
            match self.log_change(ins, tag, offset, bytes)? {
                Logged::Done(a) => return Ok(a),
                Logged::NoRoom(len) => need = len,
            }
        }
    }

    /// Applies and logs one change under the page's latch. With
    /// `wal_full_policy = wait`, a record refused for want of WAL room is
    /// undone and `NoRoom` returned, the latch released, for the caller to
    /// wait and try again.
    fn log_change(
        &self,
        ins: &mut Inserter<'_>,
        tag: PageTag,
        offset: usize,
        bytes: &[u8],
    ) -> Result<Logged> {
        let p = self.pool.pin(tag, Fill::Read)?;
        let mut g = p.write();
        let saved: Vec<u8> = page::data(&g)[offset..offset + bytes.len()].to_vec();
        page::data_mut(&mut g)[offset..offset + bytes.len()].copy_from_slice(bytes);
        // IMPORTANT: dirty before the record is logged, as PostgreSQL's
        // MarkBufferDirty precedes XLogInsert. A checkpoint whose redo point
        // lands after our record must find the page dirty when it marks the
        // pages it writes; marked after logging, the page could be skipped
        // and the change lost by a crash (recovery starts at that redo
        // point). Found by the simulated-disk torture test.
        p.mark_dirty();
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            loop {
                let (seq, redo) = self.redo_point();
                let image = self.full_page_writes && page::lsn(&g) <= redo;
                let kind = if image {
                    let lz4 = self.tuning.lz4.load(Relaxed);
                    records::encode_page_image(tag, page::data(&g), lz4, &mut scratch);
                    Kind::PAGE_IMAGE
                } else {
                    records::encode_page_write(tag, offset, bytes, &mut scratch);
                    Kind::PAGE_WRITE
                };
                // IMPORTANT: the decision stands only if no redo point was
                // set between reading it and reserving our LSN; else the
                // record could land after a redo point it did not know, a
                // delta where recovery needs an image.
                match ins.append_checked(kind, &scratch, |_| self.redo_seq.load(SeqCst) == seq) {
                    Ok(Some(a)) => {
                        page::set_lsn(&mut g, a.end);
                        self.stats.page_writes.fetch_add(1, Relaxed);
                        if image {
                            self.stats.page_images.fetch_add(1, Relaxed);
                            self.stats
                                .page_image_bytes
                                .fetch_add(scratch.len() as u64, Relaxed);
                        }
                        return Ok(Logged::Done(a));
                    }
                    Ok(None) => {
                        self.stats.redo_retries.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        // Nothing was logged: the change must not stay.
                        page::data_mut(&mut g)[offset..offset + bytes.len()]
                            .copy_from_slice(&saved);
                        if matches!(e, WalError::WalFull { .. })
                            && self.cfg.wal_full_policy == WalFullPolicy::Wait
                        {
                            return Ok(Logged::NoRoom(scratch.len()));
                        }
                        return Err(e.into());
                    }
                }
            }
        })
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(PAGE_DATA + 64));
}

/// What [`StoreShared::log_change`] did.
enum Logged {
    Done(Appended),
    /// The WAL device is full; nothing changed. The payload length of the
    /// record that was refused.
    NoRoom(usize),
}

fn check_range(tag: PageTag, offset: usize, len: usize) -> Result<()> {
    if tag.block >= MAX_BLOCKS {
        return Err(StoreError::BadRequest(format!(
            "block {} is out of range: block numbers are below {MAX_BLOCKS}",
            tag.block
        )));
    }
    if len == 0 || offset + len > PAGE_DATA {
        return Err(StoreError::BadRequest(format!(
            "a write of {len} bytes at offset {offset} does not fit a page: \
             offset + length must be between 1 and {PAGE_DATA}"
        )));
    }
    Ok(())
}

/// The embedded page store. Share it between threads by reference (or Arc).
pub struct Store {
    shared: Arc<StoreShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// A standby's replay thread, stopped first on close.
    replay: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    /// The data and WAL directories' locks. Dropped after `Drop` has shut
    /// the store and its WAL down: nothing writes once they are released.
    locks: DirLocks,
}

impl Store {
    /// Opens (or creates) the page store in `cfg.data_dir` and the WAL in
    /// `cfg.wal_dir`; after a crash, replays the WAL from the last
    /// checkpoint's redo point and takes an end-of-recovery checkpoint
    /// before returning. Holds the lock (`walden.pid`) of both directories
    /// until closed: a second writer, in this process or another, is
    /// refused before it changes anything.
    pub fn open(cfg: Config) -> Result<Store> {
        Store::open_with_progress(cfg, Arc::new(RecoveryProgress::default()))
    }

    /// [`Store::open`], publishing recovery's progress in `progress` (the
    /// server shows it to `walden status` while it recovers).
    pub fn open_with_progress(cfg: Config, progress: Arc<RecoveryProgress>) -> Result<Store> {
        cfg.validate().map_err(WalError::from)?;
        let locks = DirLocks::for_store(&cfg)?;
        Store::open_locked(cfg, progress, locks, None)
    }

    /// The open itself, under the locks of [`DirLocks::for_store`] (the
    /// server takes them before it binds its port).
    ///
    /// IMPORTANT: every refusal comes before the first change on disk: the
    /// control file, the WAL's version and the checkpoint record are read
    /// and judged first, and the control file is written only once the
    /// WAL's startup scan has found the end and the WAL agreed to start
    /// (`may_start`, below). A refused start must leave the directories as
    /// they were, or a second look (by a person, or a newer walden) finds
    /// less than was there.
    ///
    /// `retention`: asked by every checkpoint (the end-of-recovery one
    /// included) before it releases WAL; see [`RetentionHook`].
    pub(crate) fn open_locked(
        cfg: Config,
        progress: Arc<RecoveryProgress>,
        locks: DirLocks,
        retention: Option<RetentionHook>,
    ) -> Result<Store> {
        Store::open_inner(cfg, progress, locks, None, retention, false)
    }

    /// [`Store::open_locked`] of a standby's directories that ends its
    /// recovery (`walden promote`): crash recovery replays everything the
    /// standby flushed, the end of that WAL becomes the switch point of a
    /// new timeline (see [`crate::wal::timeline`]), an END_OF_RECOVERY
    /// record is written first on it and made durable, and the
    /// end-of-recovery checkpoint writes the control file (new timeline,
    /// previous timeline, "in production"). A promotion a crash cut short
    /// (the history file written, the control file not) is finished by any
    /// later primary open, promoting or not, without starting another
    /// timeline.
    pub(crate) fn open_promoting_locked(
        cfg: Config,
        progress: Arc<RecoveryProgress>,
        locks: DirLocks,
        retention: Option<RetentionHook>,
    ) -> Result<Store> {
        Store::open_inner(cfg, progress, locks, None, retention, true)
    }

    /// Opens (or creates) a standby's page store and its WAL (in the
    /// standby mode of [`Wal::open_standby`]: appends refused, written only
    /// by its one [`crate::wal::standby::RawInserter`], the primary's bytes
    /// at the primary's LSNs). The store never writes a WAL record of its
    /// own: no checkpoint records, no end-of-recovery checkpoint, no page
    /// writes from clients.
    ///
    /// `system_id`: a new data directory (no control file) takes it as its
    /// system identifier (the primary's); an existing one whose identifier
    /// differs is refused before anything is changed.
    ///
    /// After crash recovery (the same one-pass scan and redo as
    /// [`Store::open`], from the control file's redo point, or from the
    /// start of the WAL for a store created as a standby), the
    /// `walden-replay` thread applies every record as the WAL's flush LSN
    /// moves; see [`Store::apply_lsn`] and the [`standby`] module.
    pub fn open_standby(
        cfg: Config,
        progress: Arc<RecoveryProgress>,
        system_id: Option<u64>,
    ) -> Result<Store> {
        cfg.validate().map_err(WalError::from)?;
        let locks = DirLocks::for_store(&cfg)?;
        Store::open_standby_locked(cfg, progress, locks, system_id)
    }

    /// [`Store::open_standby`] under the locks of [`DirLocks::for_store`].
    pub(crate) fn open_standby_locked(
        cfg: Config,
        progress: Arc<RecoveryProgress>,
        locks: DirLocks,
        system_id: Option<u64>,
    ) -> Result<Store> {
        Store::open_inner(cfg, progress, locks, Some(system_id), None, false)
    }

    /// `standby`: `None` for a primary; `Some(system_id)` for a standby.
    /// `retention`: see [`Store::open_locked`] (a standby has no slots).
    fn open_inner(
        cfg: Config,
        progress: Arc<RecoveryProgress>,
        locks: DirLocks,
        standby: Option<Option<u64>>,
        retention: Option<RetentionHook>,
        promote: bool,
    ) -> Result<Store> {
        cfg.validate().map_err(WalError::from)?;
        let is_standby = standby.is_some();
        let data_dir = cfg.data_dir.clone();
        let found = control::read(&data_dir)?;
        rewind::check_not_in_progress(&data_dir)?;
        // Before anything is changed: a standby of another system would
        // replay a WAL that does not belong to its pages (trap T8).
        if let (Some(c), Some(Some(want))) = (&found, standby) {
            if c.system_identifier != want {
                return Err(StoreError::SystemMismatch(format!(
                    "the page store in {} has system identifier {}, but the primary's is {want}: \
                     a standby must be created from its own primary (nothing was changed)",
                    data_dir.display(),
                    c.system_identifier
                )));
            }
        }
        crate::wal::version::check(&cfg.wal_dir).map_err(WalError::from)?;
        let creating = found.is_none();
        let files = Arc::new(RelFiles::open(&data_dir, cfg.fsync)?);
        if creating {
            let rels = files.list()?;
            if let Some(r) = rels.first() {
                return Err(StoreError::Recovery(format!(
                    "{} holds relation files (such as {}) but no control file {}: \
                     the page store cannot be trusted without it; restore it from a backup \
                     or move the relation files away",
                    data_dir.display(),
                    files.path(*r).display(),
                    control::CONTROL_FILE
                )));
            }
        }
        let mut c = found.unwrap_or_else(|| {
            let mut c = ControlFile::new(
                cfg.wal_segment_size.0,
                cfg.data_checksums,
                cfg.full_page_writes,
            );
            if let Some(Some(id)) = standby {
                c.system_identifier = id;
            }
            c
        });
        check_fixed_settings(&c, &cfg, &data_dir)?;
        // The WAL's timeline is its newest history file's. One newer than
        // the control file's is a promotion that a crash interrupted after
        // the history file was written: finish it, start no other one.
        let wal_timeline = if crate::io::file::exists(&cfg.wal_dir) {
            crate::wal::timeline::latest_timeline(&cfg.wal_dir)?
        } else {
            crate::wal::TIMELINE
        };
        let finishing = !is_standby && !creating && wal_timeline > c.timeline;
        if promote && creating {
            return Err(StoreError::Recovery(format!(
                "cannot promote: {} holds no page store (no control file)",
                data_dir.display()
            )));
        }
        let start_timeline = promote && !is_standby && !finishing;
        // A standby that followed its primary to a later timeline (its
        // walreceiver stored the history file): the control file names it
        // (written below, at the open), so that a later promotion starts
        // the next timeline rather than "finishing" this one.
        if is_standby && wal_timeline > c.timeline {
            c.prev_timeline = c.timeline;
            c.timeline = wal_timeline;
        }
        if finishing {
            tracing::info!(
                "the WAL is on timeline {wal_timeline} but the control file on timeline {}: \
                 finishing an interrupted promotion",
                c.timeline
            );
        }
        let checksums = c.data_checksum_version == 1;
        if checksums != cfg.data_checksums {
            tracing::warn!(
                "data_checksums = {} is ignored: the page store was created with data checksums {}, and that cannot change",
                cfg.data_checksums,
                if checksums { "on" } else { "off" }
            );
        }
        // As PostgreSQL reads its checkpoint record before redo: the WAL
        // from the redo point on must still be there, and the record the
        // control file names must be a checkpoint with that redo point.
        let checkpoint_end = if !creating && c.checkpoint.is_valid() {
            Some(recovery::read_checkpoint(&cfg, &c)?)
        } else {
            None
        };
        if creating {
            tracing::info!(
                "creating the page store in {} (system identifier {}, data checksums {})",
                data_dir.display(),
                c.system_identifier,
                if checksums { "on" } else { "off" }
            );
        }

        let frames = (cfg.shared_buffers.0 / crate::io::PAGE_SIZE as u64) as usize;
        let pool = BufferPool::new(frames, Arc::clone(&files), checksums)?;
        let was_shut_down = !creating && c.state == ClusterState::ShutDown;
        // What a standby's control file says while it runs, and after.
        let running_state = if is_standby {
            ClusterState::InArchiveRecovery
        } else {
            ClusterState::InCrashRecovery
        };
        if is_standby {
            tracing::info!(
                "entering standby mode: the page store follows its primary's WAL (system identifier {})",
                c.system_identifier
            );
        } else if !creating && !was_shut_down {
            tracing::info!(
                "database system was interrupted; last known up at {}",
                checkpointer::format_time(c.time)
            );
            tracing::info!(
                "database system was not properly shut down; automatic recovery in progress"
            );
        }
        // Once the WAL's scan found the end, before the WAL changes: the
        // checkpoint record must lie before that end (a record cut off by
        // a bad one in between was not really found), and then the control
        // file says what is going on.
        let at_open = c;
        // A base backup's copy: consistent only past its BACKUP_END.
        let backup = backup::BackupEndWatch::new(if creating {
            None
        } else {
            backup::read_label(&data_dir)?
        });
        if let Some(l) = backup.label() {
            tracing::info!(
                "starting backup recovery with redo LSN {} (base backup \"{}\"): \
                 consistent once its backup end record is replayed",
                l.start,
                l.label.escape_debug()
            );
        }
        let mut may_start = |scan: &EndOfScan| -> std::result::Result<(), String> {
            // PostgreSQL's "WAL ends before end of online backup": the
            // pages of a copy are a mix of moments until replay passed the
            // BACKUP_END of its backup (the one whose start is the label's).
            if let (Some(start), None) = (backup.start(), backup.reached()) {
                return Err(format!(
                    "WAL ends before end of online backup: the WAL ends at {} without the backup end \
                     record of the base backup that started at {start} ({}); all WAL generated \
                     during the backup must be available at recovery: the backup is incomplete; \
                     take it again",
                    scan.end,
                    data_dir.join(backup::BACKUP_LABEL).display()
                ));
            }
            // A base backup is consistent only once its WAL reaches the
            // backup's end (the control file's min recovery point).
            if at_open.min_recovery_point.is_valid() && scan.end < at_open.min_recovery_point {
                return Err(format!(
                    "the WAL ends at {} but this base backup is consistent only from {} \
                     (its minimum recovery point, the backup's end): the backup is incomplete; \
                     take it again",
                    scan.end, at_open.min_recovery_point
                ));
            }
            if let Some(ckpt_end) = checkpoint_end {
                if scan.end < ckpt_end {
                    return Err(format!(
                        "could not locate a valid checkpoint record at {}: \
                         the valid WAL ends at {}",
                        at_open.checkpoint, scan.end
                    ));
                }
            }
            // Checked above: replay passed the backup's end, and a crash
            // from here on replays at least as far again.
            let consistent_copy = backup.reached().is_some();
            if creating || !was_shut_down || is_standby || consistent_copy {
                let mut now = at_open;
                if !creating || is_standby {
                    now.state = running_state;
                }
                if consistent_copy {
                    now.min_recovery_point = Lsn::INVALID;
                }
                control::write(&data_dir, &now, cfg.fsync).map_err(|e| e.to_string())?;
            }
            if consistent_copy {
                backup::retire_label(&data_dir, cfg.fsync).map_err(|e| {
                    format!(
                        "could not rename file \"{}\" to \"{}\": {e}",
                        data_dir.join(backup::BACKUP_LABEL).display(),
                        backup::BACKUP_LABEL_OLD
                    )
                })?;
            }
            Ok(())
        };
        if (!creating && !was_shut_down) || is_standby {
            c.state = running_state;
        }
        // One pass: the WAL's startup scan finds the end of valid WAL and
        // hands every record to redo as it goes (each segment made durable
        // before it is read).
        let seg = cfg.wal_segment_size.0;
        let estimated_end = crate::wal::segments::newest_segment(&cfg.wal_dir, wal_timeline, seg)
            .map_or(Lsn(seg), |s| Lsn((s + 1) * seg));
        if c.checkpoint.is_valid() && !was_shut_down {
            tracing::info!("redo starts at {}", c.redo);
        }
        let failure = recovery::RedoFailure::new();
        let workers = cfg.redo_workers();
        // The redo workers borrow the pool: they run in a scope that ends
        // once the scan is over and they have applied everything.
        let (wal, replayed) = std::thread::scope(|scope| -> Result<_> {
            let mut redo = recovery::Redo::new(
                scope,
                &pool,
                &progress,
                &failure,
                &backup,
                (!creating).then_some(&c),
                estimated_end,
                workers,
            )?;
            let mut observe =
                |rec: &crate::wal::reader::Record<'_>| redo.apply(rec).map_err(|e| e.to_string());
            let opened = if is_standby {
                Wal::open_standby_locked(
                    cfg.clone(),
                    Some(&mut observe),
                    &mut may_start,
                    DirLocks::none(),
                )
            } else {
                Wal::open_promoting(
                    cfg.clone(),
                    Some(&mut observe),
                    &mut may_start,
                    DirLocks::none(),
                    start_timeline,
                )
            };
            let joined = redo.join();
            let wal = match opened {
                Ok(w) => Arc::new(w),
                Err(WalError::Replay(msg)) => return Err(StoreError::Recovery(msg)),
                Err(e) => return Err(e.into()),
            };
            Ok((wal, joined?))
        })?;
        let end = wal.opened_at();
        if c.checkpoint.is_valid() {
            // Checked before the open (read_checkpoint, may_start); kept as
            // the last word of redo, which saw the record go by.
            if replayed.checkpoint_end.is_none() {
                return Err(StoreError::Recovery(format!(
                    "could not locate a valid checkpoint record at {}: the valid WAL ends at {end}",
                    c.checkpoint
                )));
            }
        }
        let ckpt_end = replayed.checkpoint_end.unwrap_or(Lsn::INVALID);
        let clean = was_shut_down && c.redo == c.checkpoint && end == ckpt_end;
        // A promotion (started now, or finished now) ends with an
        // END_OF_RECOVERY record and an end-of-recovery checkpoint.
        let promoting = start_timeline || finishing;
        let needs_redo = !clean || promoting;
        if was_shut_down && !clean {
            tracing::info!(
                "records follow the shutdown checkpoint at {}: they were replayed",
                c.checkpoint
            );
        }
        replayed.finish(&progress, end, clean);
        pool.attach_wal(Arc::clone(&wal));
        // Replay passed the backup's end (may_start checked it): from here
        // on the store is consistent, and the next control file says so.
        c.min_recovery_point = Lsn::INVALID;

        let shared = Arc::new(StoreShared {
            pool,
            wal,
            files,
            full_page_writes: cfg.full_page_writes,
            redo_seq: CachePadded::new(AtomicU64::new(0)),
            redo_lsn: CachePadded::new(AtomicU64::new(c.redo.0)),
            tuning: Tuning::new(&cfg),
            ckpt: CheckpointQueue::new(c.redo, ckpt_end),
            stats: StoreStats::default(),
            recovery: progress,
            listeners: RwLock::new(Vec::new()),
            replay: if is_standby {
                Some(standby::ReplayState::new(end)?)
            } else {
                None
            },
            retention,
            wal_holds: Mutex::new(Vec::new()),
            next_hold: AtomicU64::new(1),
            last_backup_start: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            acknowledged_source: Mutex::new(None),
            control: Mutex::new(c),
            cfg,
        });
        shared
            .stats
            .last_checkpoint_lsn
            .store(c.checkpoint.0, Relaxed);
        shared.stats.last_redo_lsn.store(c.redo.0, Relaxed);

        let mut threads = Vec::new();
        let sh = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("walden-ckpt".into())
                .spawn(move || checkpointer::run(&sh))
                .map_err(|e| StoreError::Thread("checkpointer", e))?,
        );
        let store = Store {
            shared,
            threads: Mutex::new(threads),
            replay: Mutex::new(None),
            closed: AtomicBool::new(false),
            locks,
        };
        let shared = &store.shared;
        if is_standby {
            // No end-of-recovery checkpoint (it would be a record of our
            // own): the control file keeps its checkpoint and redo point,
            // and the next start redoes from there again (redo is
            // idempotent by page LSN).
            tracing::info!("standby: replay continues from {end}");
            *shared.control.lock().unwrap() = c;
            if let Err(e) = control::write(&data_dir, &c, shared.cfg.fsync) {
                store.abandon();
                return Err(e.into());
            }
            if let Err(e) = store.start_bgwriter() {
                store.abandon();
                return Err(e);
            }
            let sh = Arc::clone(&store.shared);
            match std::thread::Builder::new()
                .name("walden-replay".into())
                .spawn(move || standby::run(&sh))
            {
                Ok(h) => *store.replay.lock().unwrap() = Some(h),
                Err(e) => {
                    store.abandon();
                    return Err(StoreError::Thread("replay", e));
                }
            }
            // Restartpoints, by time and by WAL received since the last.
            store.watch_wal_volume();
            return Ok(store);
        }
        if needs_redo {
            c.state = ClusterState::InCrashRecovery;
            *shared.control.lock().unwrap() = c;
            if let Err(e) = control::write(&data_dir, &c, shared.cfg.fsync) {
                store.abandon();
                return Err(e.into());
            }
            if promoting {
                if let Err(e) = store.end_recovery(c.timeline, end) {
                    store.abandon();
                    return Err(e);
                }
            }
            let reason = if creating {
                Reason::Requested
            } else {
                Reason::EndOfRecovery
            };
            let ticket = shared.ckpt.request_for(reason);
            if let Err(e) = shared.ckpt.wait(ticket) {
                store.abandon();
                return Err(StoreError::Recovery(format!(
                    "the end-of-recovery checkpoint failed: {e}"
                )));
            }
        } else {
            tracing::info!(
                "database system was shut down at {}",
                checkpointer::format_time(c.time)
            );
            c.state = ClusterState::InProduction;
            *shared.control.lock().unwrap() = c;
            if let Err(e) = control::write(&data_dir, &c, shared.cfg.fsync) {
                store.abandon();
                return Err(e.into());
            }
        }

        // IMPORTANT: only now may time and WAL volume start checkpoints: one
        // during redo would release WAL that redo is still reading.
        store.watch_wal_volume();
        if let Err(e) = store.start_bgwriter() {
            store.abandon();
            return Err(e);
        }
        Ok(store)
    }

    /// The promotion's END_OF_RECOVERY record, first on the new timeline
    /// and durable before the control file names the timeline; not written
    /// again when it is already there (a crash after it, before the
    /// control file).
    fn end_recovery(&self, prev_timeline: u32, end: Lsn) -> Result<()> {
        let wal = &self.shared.wal;
        let new = wal.timeline();
        let switch = match wal.promoted_at() {
            Some(s) => s,
            None => crate::wal::timeline::read_history(&self.shared.cfg.wal_dir, new)?
                .last()
                .map_or(Lsn::INVALID, |e| e.switch),
        };
        if end == switch {
            let payload = crate::wal::timeline::encode_end_of_recovery(new, prev_timeline);
            let a = wal.append(crate::record::Kind::END_OF_RECOVERY, &payload)?;
            wal.wait(a.end, crate::wal::Durability::Local)?;
            crate::wal::failpoint("promote-after-end-of-recovery");
        }
        tracing::info!("archive recovery complete");
        Ok(())
    }

    /// Starts the background writer (the second of `threads`).
    fn start_bgwriter(&self) -> Result<()> {
        let sh = Arc::clone(&self.shared);
        let h = std::thread::Builder::new()
            .name("walden-bgwriter".into())
            .spawn(move || bgwriter::run(&sh))
            .map_err(|e| StoreError::Thread("background writer", e))?;
        self.threads.lock().unwrap().push(h);
        Ok(())
    }

    /// Lets time and WAL volume start checkpoints (restartpoints on a
    /// standby): the flusher pokes the checkpointer at each segment switch
    /// that makes one due.
    fn watch_wal_volume(&self) {
        self.shared.ckpt.start_automatic();
        let weak = Arc::downgrade(&self.shared);
        self.shared.wal.add_segment_listener(Arc::new(move |segno| {
            if let Some(sh) = weak.upgrade() {
                if checkpointer::wal_due_at(&sh, segno) {
                    sh.ckpt.poke();
                }
            }
        }));
    }

    /// Stops the threads of a store that failed to open, without a
    /// shutdown checkpoint (the next start recovers again).
    fn abandon(&self) {
        self.closed.store(true, SeqCst);
        self.stop_replay();
        self.shared.ckpt.abandon();
        for h in std::mem::take(&mut *self.threads.lock().unwrap()) {
            let _ = h.join();
        }
        self.shared.wal.shut_down();
    }

    /// Stops a standby's replay thread (nothing on a primary). Idempotent.
    fn stop_replay(&self) {
        if let Some(r) = &self.shared.replay {
            r.stop();
        }
        if let Some(h) = self.replay.lock().unwrap().take() {
            let _ = h.join();
        }
    }

    /// Stops every thread as a failed open does (no shutdown checkpoint,
    /// no page write-out, no control file update; the WAL flushes what was
    /// put into it and closes): what a kill leaves, for tests of the
    /// restart that follows.
    #[doc(hidden)]
    pub fn abandon_for_tests(self) {
        self.abandon();
    }

    pub fn wal(&self) -> &Arc<Wal> {
        &self.shared.wal
    }

    /// Whether this is a standby's page store ([`Store::open_standby`]).
    pub fn is_standby(&self) -> bool {
        self.shared.replay.is_some()
    }

    /// On a standby: the end of the last record whose effect is visible to
    /// [`Store::read_page`] (applied to the buffer pool). Monotone; starts
    /// at the end of WAL found at open (crash redo applied everything
    /// before it). On a primary, where every page change is applied before
    /// its record is logged: the WAL's insert LSN.
    pub fn apply_lsn(&self) -> Lsn {
        match &self.shared.replay {
            Some(r) => r.apply_lsn(),
            None => self.shared.wal.insert_lsn(),
        }
    }

    /// Signals `wake` each time [`Store::apply_lsn`] advances (signals may
    /// be coalesced: read `apply_lsn` after waking). Never signalled on a
    /// primary.
    pub fn add_apply_listener(&self, wake: Arc<EventFd>) {
        if let Some(r) = &self.shared.replay {
            r.add_listener(wake);
        }
    }

    /// The control file's system identifier.
    pub fn system_identifier(&self) -> u64 {
        self.shared.control.lock().unwrap().system_identifier
    }

    /// The directory locks this store holds (the server adds its
    /// addresses to them once bound).
    pub fn locks(&self) -> &DirLocks {
        &self.locks
    }

    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// Changes `len` bytes at `offset` of a page's data (`offset + len ≤`
    /// [`PAGE_DATA`]): logs the change (or a full-page image), applies it,
    /// and returns where the record landed. Wait for `end` at the durability
    /// you need. Takes a free insert slot; a thread that owns one (a server
    /// shard) uses [`Store::write_page_with`].
    pub fn write_page(
        &self,
        rel: u32,
        block: u32,
        offset: usize,
        bytes: &[u8],
    ) -> Result<Appended> {
        if self.is_standby() {
            return Err(StoreError::Standby(standby::NO_PAGE_WRITES));
        }
        check_range(PageTag::new(rel, block), offset, bytes.len())?;
        // Before taking an insert slot: writers asleep for WAL room while
        // holding every slot would leave the checkpointer none.
        self.shared
            .wal
            .check_room(records::PAGE_WRITE_HEADER + bytes.len())?;
        let mut ins = self.shared.wal.inserter();
        self.write_page_with(&mut ins, rel, block, offset, bytes)
    }

    /// [`Store::write_page`] through the caller's insert slot.
    pub fn write_page_with(
        &self,
        ins: &mut Inserter<'_>,
        rel: u32,
        block: u32,
        offset: usize,
        bytes: &[u8],
    ) -> Result<Appended> {
        self.shared
            .write_page(ins, PageTag::new(rel, block), offset, bytes)
    }

    /// The current image of a page, including changes not yet durable (as
    /// a PostgreSQL buffer shows them). A page never written reads as zeros
    /// with LSN 0. A page that fails its checksum is an error naming it.
    pub fn read_page(&self, rel: u32, block: u32) -> Result<PageRead> {
        let mut data = vec![0u8; PAGE_DATA];
        let lsn = self.read_page_into(rel, block, &mut data)?;
        Ok(PageRead { lsn, data })
    }

    /// [`Store::read_page`] into `out` ([`PAGE_DATA`] bytes); returns the page LSN.
    pub fn read_page_into(&self, rel: u32, block: u32, out: &mut [u8]) -> Result<Lsn> {
        let tag = PageTag::new(rel, block);
        if block >= MAX_BLOCKS {
            return Err(StoreError::BadRequest(format!(
                "block {block} is out of range: block numbers are below {MAX_BLOCKS}"
            )));
        }
        let p = self.shared.pool.pin(tag, Fill::Read)?;
        let g = p.read();
        out.copy_from_slice(page::data(&g));
        self.shared.stats.page_reads.fetch_add(1, Relaxed);
        Ok(page::lsn(&g))
    }

    /// Runs an immediate checkpoint and waits for it (the `CHECKPOINT`
    /// command). Returns (checkpoint LSN, redo LSN).
    ///
    /// On a standby: refused ([`StoreError::Standby`]); it writes no WAL.
    pub fn checkpoint(&self) -> Result<(Lsn, Lsn)> {
        if self.is_standby() {
            return Err(StoreError::Standby(standby::NO_CHECKPOINTS));
        }
        let ticket = self.request_checkpoint();
        self.shared
            .ckpt
            .wait(ticket)
            .map_err(StoreError::Checkpoint)
    }

    /// Asks for an immediate checkpoint without waiting; see
    /// [`Store::checkpoint_outcome`]. On a standby the outcome is a
    /// refusal, and no WAL is written.
    pub fn request_checkpoint(&self) -> u64 {
        self.shared.ckpt.request()
    }

    /// `None` while the checkpoint a ticket asked for has not completed.
    pub fn checkpoint_outcome(
        &self,
        ticket: u64,
    ) -> Option<std::result::Result<(Lsn, Lsn), String>> {
        self.shared.ckpt.outcome(ticket)
    }

    /// Keeps the WAL from the current insert position (a record start) on
    /// until the hold is dropped: no checkpoint releases it meanwhile.
    pub fn hold_wal(&self) -> WalHold {
        let sh = &self.shared;
        let mut holds = sh.wal_holds.lock().unwrap();
        // Read under the lock the checkpointer takes to read the holds: a
        // checkpoint that has not yet read them will see this one.
        let from = sh.wal.insert_lsn();
        let id = sh.next_hold.fetch_add(1, Relaxed);
        holds.push((id, from));
        WalHold {
            shared: Arc::clone(sh),
            id,
            from,
        }
    }

    /// Claims `start` (a checkpoint's redo point) as a base backup's start:
    /// false if a backup already started there or later (two backups whose
    /// checkpoint requests were served by one checkpoint), and the caller
    /// checkpoints again, as PostgreSQL's do_pg_backup_start loops until its
    /// start point is unique.
    pub fn claim_backup_start(&self, start: Lsn) -> bool {
        self.shared.last_backup_start.fetch_max(start.0, SeqCst) < start.0
    }

    /// The page store's system identifier.
    pub fn system_id(&self) -> u64 {
        self.control().system_identifier
    }

    /// Relation ids with a file in `data_dir/base`, ascending.
    pub fn relations(&self) -> Result<Vec<u32>> {
        Ok(self.shared.files.list()?)
    }

    /// The path of a relation's file.
    pub fn relation_path(&self, rel: u32) -> std::path::PathBuf {
        self.shared.files.path(rel)
    }

    /// Signals `wake` whenever a checkpoint completes.
    pub fn add_checkpoint_listener(&self, wake: Arc<EventFd>) {
        self.shared.listeners.write().unwrap().push(wake);
    }

    /// Applies the reloadable settings of `cfg` (checkpoint and bgwriter
    /// tuning, `log_checkpoints`, `wal_compression`) and the WAL's.
    pub fn reload(&self, cfg: &Config) {
        self.shared.tuning.set(cfg);
        self.shared.wal.reload_flush_settings(cfg);
        self.shared.ckpt.poke();
    }

    /// The control file as last written.
    pub fn control(&self) -> ControlFile {
        *self.shared.control.lock().unwrap()
    }

    /// The highest term this server has seen (the control file's).
    pub fn term(&self) -> u64 {
        self.shared.control.lock().unwrap().latest_term()
    }

    /// Persists `term` in the control file (written and fsynced) if it is
    /// higher than the one there, before the caller acts in it (invariant
    /// 9: a server persists a new term before acting in it). Returns whether
    /// it was higher. A failed write is fatal: the caller must not answer
    /// as if the term were durable, and the server cannot go on without it.
    pub fn raise_term(&self, term: u64) -> bool {
        let mut c = self.shared.control.lock().unwrap();
        if term <= c.latest_term() {
            return false;
        }
        let mut next = *c;
        next.term = term;
        if let Err(e) = control::write(&self.shared.cfg.data_dir, &next, self.shared.cfg.fsync) {
            crate::fatal::fatal(format_args!("could not persist term {term}: {e}"));
        }
        *c = next;
        true
    }

    /// A quorum of synchronous standbys is known to have flushed up to
    /// `lsn` (on a standby: the primary's `commit` LSN): the control file's
    /// `acknowledged_lsn` at the next checkpoint or restartpoint.
    pub fn note_acknowledged(&self, lsn: Lsn) {
        self.shared.acknowledged.fetch_max(lsn.0, SeqCst);
    }

    /// On a primary: where each checkpoint reads the quorum flush LSN from.
    pub fn set_acknowledged_source(&self, source: AcknowledgedSource) {
        *self.shared.acknowledged_source.lock().unwrap() = Some(source);
    }

    pub fn stats(&self) -> &StoreStats {
        &self.shared.stats
    }

    pub fn recovery_progress(&self) -> &RecoveryProgress {
        &self.shared.recovery
    }

    pub fn pool(&self) -> &BufferPool {
        &self.shared.pool
    }

    /// The redo point page writers decide full-page images against.
    pub fn redo_lsn(&self) -> Lsn {
        self.shared.redo_lsn()
    }

    /// The figures /metrics exports.
    pub fn metrics_snapshot(&self) -> crate::metrics::StoreSnapshot {
        checkpointer::snapshot(&self.shared)
    }

    /// Stops the background writer and the checkpointer, takes a shutdown
    /// checkpoint (the control file then says "shut down"), and closes the WAL.
    pub fn close(self) -> Result<()> {
        self.shutdown(|| {})
    }

    /// [`Store::close`] for a store shared by reference. Idempotent; page
    /// writes after it fail.
    pub fn shut_down(&self) -> Result<()> {
        self.shutdown(|| {})
    }

    /// The same, calling `before_wal_closes` once the shutdown checkpoint
    /// is durable and before the WAL closes (the server's walsenders send
    /// the checkpoint to the standbys there).
    pub fn shut_down_then(&self, before_wal_closes: impl FnOnce()) -> Result<()> {
        self.shutdown(before_wal_closes)
    }

    fn shutdown(&self, before_wal_closes: impl FnOnce()) -> Result<()> {
        if self.closed.swap(true, SeqCst) {
            before_wal_closes();
            return Ok(());
        }
        tracing::info!("shutting down");
        // A standby's replay first: nothing changes pages after it.
        self.stop_replay();
        let mut threads = std::mem::take(&mut *self.threads.lock().unwrap());
        // The background writer first (it is the second thread), then the
        // checkpointer, which takes the shutdown checkpoint before it stops.
        self.shared.ckpt.stop_bgwriter();
        if threads.len() > 1 {
            let _ = threads.pop().unwrap().join();
        }
        self.shared.ckpt.shut_down();
        for h in threads {
            let _ = h.join();
        }
        let res = self
            .shared
            .ckpt
            .shutdown_outcome()
            .unwrap_or_else(|| Err("the checkpointer was not running".into()));
        before_wal_closes();
        self.shared.wal.shut_down();
        match res {
            Ok(_) => {
                tracing::info!("database system is shut down");
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    "the shutdown checkpoint failed: {e}; the next start will recover from the WAL"
                );
                Err(StoreError::Checkpoint(e))
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.shutdown(|| {});
    }
}

fn check_fixed_settings(c: &ControlFile, cfg: &Config, dir: &std::path::Path) -> Result<()> {
    let bad = |what: String| {
        Err(StoreError::Recovery(format!(
            "the page store in {} was created with {what}; that cannot change",
            dir.display()
        )))
    };
    if c.wal_segment_size != cfg.wal_segment_size.0 {
        return bad(format!(
            "wal_segment_size = {} but the configuration says {}",
            c.wal_segment_size, cfg.wal_segment_size.0
        ));
    }
    if c.block_size != crate::io::PAGE_SIZE as u32 || c.wal_block_size != crate::io::BLOCK as u32 {
        return bad(format!(
            "block size {} and WAL block size {}, but this build uses {} and {}",
            c.block_size,
            c.wal_block_size,
            crate::io::PAGE_SIZE,
            crate::io::BLOCK
        ));
    }
    Ok(())
}
