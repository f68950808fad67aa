//! A simulated disk for tests: the second implementation of the storage
//! surface of [`super::file`] (files, directories, sync), kept in memory so
//! that a test can cut the power at any instant and look at what a real disk
//! could have kept.
//!
//! The model, written down so that a test failure can be argued about:
//! - A file's bytes are what reads see; beside them the disk keeps the
//!   *durable* image (as of the last successful `fdatasync`/`fsync`) and the
//!   list of writes (and size changes) issued since, in order.
//! - `fdatasync`/`fsync` make every pending change of that file durable.
//!   O_DSYNC/O_SYNC writes are durable when they return.
//! - Names (create, rename, remove) are journaled in order: a directory
//!   fsync makes every name change so far durable (as ext4's journal commit
//!   does); a power cut keeps a prefix of the rest. Directories themselves
//!   are durable when created.
//! - A power cut ([`SimDisk::power_cut`]) keeps the durable image plus any
//!   subset of the pending writes chosen by the seed, applied in issue order,
//!   and may tear a kept write at a 512-byte sector boundary (only some of its
//!   sectors land).
//! - Faults: the n-th write, the n-th sync or the n-th directory fsync
//!   fails with EIO; a failed sync
//!   forgets the file's pending writes for good (they stay readable but will
//!   never be durable: Linux's behaviour that PostgreSQL's "fsyncgate" found);
//!   a write that would take the disk past its capacity fails with ENOSPC.
//! - O_DIRECT rules hold: offsets, lengths and buffers must be 512-aligned.
//! - When the engine gives up (`fatal`) on a thread that last used a
//!   simulated disk, the disk is marked dead (every later operation fails and
//!   changes nothing, as after a crash) and that thread unwinds instead of
//!   aborting the test process.
//!
//! Every fault is a function of the seed: a failing run replays exactly.
//!
//! Paths reach the simulated disk when they lie under its root (a directory
//! that does not exist on the real filesystem, see [`SimDisk::new`]); the
//! engine needs nothing else. io_uring cannot reach a simulated file, so the
//! engine uses its synchronous paths on one (the pwrite flusher, direct page
//! writes).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Error, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use crate::testkit::Rng;

/// The sector a torn write is cut at.
pub const SECTOR: usize = 512;

/// Faults to inject, all optional. Counts start at 1 and include every write
/// (or sync) the disk has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// The n-th write fails with EIO (and changes nothing).
    pub fail_write_at: Option<u64>,
    /// The n-th sync fails with EIO (and its file's pending writes are lost).
    pub fail_sync_at: Option<u64>,
    /// The n-th directory fsync fails with EIO (its name changes stay
    /// pending). Counted apart from `fail_sync_at`'s syncs, which include
    /// every file's: a test can aim at one directory fsync while the WAL's
    /// flushes come and go.
    pub fail_dir_sync_at: Option<u64>,
    /// Total bytes of file data the disk holds; beyond it writes and
    /// allocations fail with ENOSPC.
    pub capacity: Option<u64>,
    /// Cut the power just before the n-th changing operation (write,
    /// allocation, sync, create, rename, remove): the image is kept for
    /// [`SimDisk::take_cut`] and the disk goes on as if nothing happened.
    pub cut_at_op: Option<u64>,
    /// The seed of that cut's choices.
    pub cut_seed: u64,
}

/// What a power cut did, for messages.
#[derive(Clone, Copy, Debug, Default)]
pub struct CutReport {
    pub pending: usize,
    pub kept: usize,
    pub torn: usize,
    pub name_ops_pending: usize,
    pub name_ops_kept: usize,
}

#[derive(Clone, Debug)]
enum Change {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone, Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Change>,
}

#[derive(Clone, Debug)]
enum NameOp {
    Link(PathBuf, usize),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf),
}

#[derive(Debug, Default)]
struct State {
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, usize>,
    durable_names: BTreeMap<PathBuf, usize>,
    name_log: Vec<NameOp>,
    dirs: BTreeSet<PathBuf>,
    faults: Faults,
    writes: u64,
    syncs: u64,
    dir_syncs: u64,
    ops: u64,
    /// Injected EIOs that fired.
    fired: u64,
    dead: Option<String>,
    cut: Option<Box<Cut>>,
}

/// A power cut taken at a chosen operation.
pub struct Cut {
    pub image: SimDisk,
    /// The disk as reads saw it at the cut (every write applied): what the
    /// engine had written, for a test to compare the image against.
    pub seen: SimDisk,
    pub report: CutReport,
    /// What [`SimDisk::set_cut_probe`]'s probe said at the cut (the test's
    /// flush LSN, say).
    pub probe: u64,
    pub at_op: u64,
}

impl std::fmt::Debug for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Cut(op {}, {:?}, probe {})",
            self.at_op, self.report, self.probe
        )
    }
}

type Probe = Box<dyn Fn() -> u64 + Send + Sync>;

/// An in-memory disk; see the module documentation.
pub struct SimDisk {
    root: PathBuf,
    state: Mutex<State>,
    probe: RwLock<Option<Probe>>,
    /// Seeds the simulated io_uring queues opened on this disk (their
    /// completion order and timing), see [`SimDisk::set_io_seed`].
    io_seed: AtomicU64,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimDisk({})", self.root.display())
    }
}

fn apply(buf: &mut Vec<u8>, c: &Change) {
    match c {
        Change::Write { off, data } => {
            let end = *off as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*off as usize..end].copy_from_slice(data);
        }
        Change::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

fn apply_name(names: &mut BTreeMap<PathBuf, usize>, op: &NameOp) {
    match op {
        NameOp::Link(p, ino) => {
            names.insert(p.clone(), *ino);
        }
        NameOp::Unlink(p) => {
            names.remove(p);
        }
        NameOp::Rename(from, to) => {
            if let Some(ino) = names.remove(from) {
                names.insert(to.clone(), ino);
            }
        }
    }
}

static NEXT_ROOT: AtomicU64 = AtomicU64::new(1);
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static DISKS: RwLock<Vec<Arc<SimDisk>>> = RwLock::new(Vec::new());

thread_local! {
    static LAST_USED: RefCell<Option<Weak<SimDisk>>> = const { RefCell::new(None) };
}

fn eio() -> Error {
    Error::from_raw_os_error(libc::EIO)
}

impl SimDisk {
    /// A new, empty disk under a fresh root (`/walden-sim/<pid>-<n>`, which
    /// does not exist on the real filesystem). Not reachable until
    /// [`install`]ed.
    pub fn new() -> SimDisk {
        let n = NEXT_ROOT.fetch_add(1, SeqCst);
        let root = PathBuf::from(format!("/walden-sim/{}-{n}", std::process::id()));
        let mut st = State::default();
        st.dirs.insert(root.clone());
        SimDisk {
            root,
            state: Mutex::new(st),
            probe: RwLock::new(None),
            io_seed: AtomicU64::new(n),
        }
    }

    /// Seeds the completion order of the simulated io_uring queues opened on
    /// this disk from now on (each queue takes the next seed), so that a
    /// seeded test replays the same choices.
    pub fn set_io_seed(&self, seed: u64) {
        self.io_seed.store(seed, SeqCst);
    }

    /// The seed for the next simulated queue.
    pub(crate) fn next_io_seed(&self) -> u64 {
        self.io_seed.fetch_add(0x9e37_79b9_7f4a_7c15, SeqCst)
    }

    /// A function called at a [`Faults::cut_at_op`] cut, under the disk's
    /// lock (so it must not touch the disk): its value is kept with the cut.
    pub fn set_cut_probe(&self, probe: impl Fn() -> u64 + Send + Sync + 'static) {
        *self.probe.write().unwrap() = Some(Box::new(probe));
    }

    /// The cut taken at [`Faults::cut_at_op`], once it happened.
    pub fn take_cut(&self) -> Option<Cut> {
        self.lock().cut.take().map(|c| *c)
    }

    /// Changing operations seen so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Counts a changing operation, cutting the power first if this is the one.
    fn op(&self, st: &mut State) {
        st.ops += 1;
        if st.faults.cut_at_op == Some(st.ops) {
            let (image, report) = image(st, &self.root, st.faults.cut_seed);
            let probe = self
                .probe
                .read()
                .unwrap()
                .as_ref()
                .map(|p| p())
                .unwrap_or(0);
            st.cut = Some(Box::new(Cut {
                image,
                seen: seen(st, &self.root),
                report,
                probe,
                at_op: st.ops,
            }));
        }
    }

    /// The directory under which paths reach this disk.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that unwound from `fatal` may have poisoned the lock; the
        // state is consistent between operations, so go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_faults(&self, f: Faults) {
        self.lock().faults = f;
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults
    }

    /// Injected EIOs that fired so far.
    pub fn fired(&self) -> u64 {
        self.lock().fired
    }

    /// Writes and syncs seen so far.
    pub fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.writes, st.syncs)
    }

    /// Directory fsyncs seen so far (also counted in [`SimDisk::counts`]'s syncs).
    pub fn dir_syncs(&self) -> u64 {
        self.lock().dir_syncs
    }

    /// Bytes of file data held (the sum of file lengths).
    pub fn used(&self) -> u64 {
        let st = self.lock();
        used(&st)
    }

    /// The message of the `fatal` that killed this disk, if one did.
    pub fn dead(&self) -> Option<String> {
        self.lock().dead.clone()
    }

    /// The disk after a power cut at this instant: the durable state plus
    /// the seed's choice of pending writes (some torn) and a prefix of the
    /// pending name changes. The running engine keeps this disk; the image
    /// is a new disk with the same root, to [`install`] in its place.
    pub fn power_cut(&self, seed: u64) -> (SimDisk, CutReport) {
        let st = self.lock();
        image(&st, &self.root, seed)
    }

    /// [`SimDisk::power_cut`], and at the same instant the disk as reads
    /// see it (every write applied, as in [`Cut::seen`]).
    pub fn power_cut_and_seen(&self, seed: u64) -> (SimDisk, CutReport, SimDisk) {
        let st = self.lock();
        let (image, report) = image(&st, &self.root, seed);
        (image, report, seen(&st, &self.root))
    }
}

/// A copy of the disk as reads see it now, every write applied and durable.
fn seen(st: &State, root: &Path) -> SimDisk {
    let inodes = st
        .inodes
        .iter()
        .map(|ino| Inode {
            data: ino.data.clone(),
            durable: ino.data.clone(),
            pending: Vec::new(),
        })
        .collect();
    settled_disk(root, inodes, st.names.clone(), st.dirs.clone(), 0)
}

/// A disk whose files are `inodes` under `names`, all durable, with no
/// faults armed: what is left after a power cut.
fn settled_disk(
    root: &Path,
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, usize>,
    dirs: BTreeSet<PathBuf>,
    io_seed: u64,
) -> SimDisk {
    let state = State {
        inodes,
        durable_names: names.clone(),
        names,
        name_log: Vec::new(),
        dirs,
        faults: Faults::default(),
        writes: 0,
        syncs: 0,
        dir_syncs: 0,
        ops: 0,
        fired: 0,
        dead: None,
        cut: None,
    };
    SimDisk {
        root: root.to_owned(),
        state: Mutex::new(state),
        probe: RwLock::new(None),
        io_seed: AtomicU64::new(io_seed),
    }
}

fn image(st: &State, root: &Path, seed: u64) -> (SimDisk, CutReport) {
    let mut rng = Rng(seed ^ 0x5eed_0fc0_ffee);
    let mut rep = CutReport::default();
    let mut inodes = Vec::with_capacity(st.inodes.len());
    for ino in &st.inodes {
        let mut img = ino.durable.clone();
        for c in &ino.pending {
            rep.pending += 1;
            if rng.below(2) == 0 {
                continue;
            }
            rep.kept += 1;
            match c {
                Change::Write { off, data } if data.len() > SECTOR && rng.below(4) == 0 => {
                    // Torn: each sector lands or not.
                    rep.torn += 1;
                    for (i, s) in data.chunks(SECTOR).enumerate() {
                        if rng.below(2) == 0 {
                            let c = Change::Write {
                                off: off + (i * SECTOR) as u64,
                                data: s.to_vec(),
                            };
                            apply(&mut img, &c);
                        }
                    }
                }
                c => apply(&mut img, c),
            }
        }
        inodes.push(Inode {
            data: img.clone(),
            durable: img,
            pending: Vec::new(),
        });
    }
    let mut names = st.durable_names.clone();
    rep.name_ops_pending = st.name_log.len();
    rep.name_ops_kept = rng.below(st.name_log.len() as u64 + 1) as usize;
    for op in &st.name_log[..rep.name_ops_kept] {
        apply_name(&mut names, op);
    }
    (
        settled_disk(root, inodes, names, st.dirs.clone(), seed),
        rep,
    )
}

impl SimDisk {
    /// The current bytes of `path` (what reads see), for test assertions.
    pub fn read_all(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.lock();
        st.names.get(path).map(|&i| st.inodes[i].data.clone())
    }

    /// Overwrites bytes of `path` in place, durably (a test's "damage the
    /// disk" step, like a torn page done by hand).
    pub fn damage(&self, path: &Path, off: u64, bytes: &[u8]) -> bool {
        let mut st = self.lock();
        let Some(&i) = st.names.get(path) else {
            return false;
        };
        let c = Change::Write {
            off,
            data: bytes.to_vec(),
        };
        apply(&mut st.inodes[i].data, &c);
        apply(&mut st.inodes[i].durable, &c);
        true
    }
}

impl Default for SimDisk {
    fn default() -> Self {
        SimDisk::new()
    }
}

fn used(st: &State) -> u64 {
    let live: BTreeSet<usize> = st.names.values().copied().collect();
    live.iter().map(|&i| st.inodes[i].data.len() as u64).sum()
}

/// Makes `disk` reachable at its root, replacing a disk installed there
/// before (the old one stays usable by whoever holds it).
pub fn install(disk: Arc<SimDisk>) {
    let mut all = DISKS.write().unwrap();
    all.retain(|d| d.root != disk.root);
    all.push(disk);
    ACTIVE.store(all.len(), SeqCst);
}

/// Makes the disk at `root` unreachable.
pub fn uninstall(root: &Path) {
    let mut all = DISKS.write().unwrap();
    all.retain(|d| d.root != root);
    ACTIVE.store(all.len(), SeqCst);
}

/// The simulated disk `path` lies on, if any.
pub fn disk_for(path: &Path) -> Option<Arc<SimDisk>> {
    if ACTIVE.load(SeqCst) == 0 {
        return None;
    }
    DISKS
        .read()
        .unwrap()
        .iter()
        .find(|d| path.starts_with(&d.root))
        .cloned()
}

/// True when `path` lies on a simulated disk.
pub fn is_simulated(path: &Path) -> bool {
    disk_for(path).is_some()
}

fn note_use(disk: &Arc<SimDisk>) {
    LAST_USED.with(|l| *l.borrow_mut() = Some(Arc::downgrade(disk)));
}

/// Called by the engine's `fatal` before it aborts: if this thread last used
/// a simulated disk, the disk dies (nothing more reaches it, as after a
/// crash) and the thread unwinds instead of aborting the test process.
pub fn on_fatal(msg: &str) {
    let disk = LAST_USED.with(|l| l.borrow().as_ref().and_then(Weak::upgrade));
    if let Some(d) = disk {
        {
            let mut st = d.lock();
            if st.dead.is_none() {
                st.dead = Some(msg.to_string());
            }
        }
        // resume_unwind: no panic hook, so no noise on stderr.
        std::panic::resume_unwind(Box::new(SimulatedPanic(msg.to_string())));
    }
}

/// The payload a thread unwinds with after [`on_fatal`].
#[derive(Debug)]
pub struct SimulatedPanic(pub String);

fn check_live(st: &State) -> Result<(), Error> {
    match st.dead {
        Some(_) => Err(eio()),
        None => Ok(()),
    }
}

fn aligned(direct: bool, off: u64, len: usize, ptr: *const u8) -> Result<(), Error> {
    if direct && (off % SECTOR as u64 != 0 || len % SECTOR != 0 || (ptr as usize) % SECTOR != 0) {
        return Err(Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// An open file on a simulated disk. A clone is another handle on the same
/// open file (the simulated io_uring keeps one per queued operation).
#[derive(Clone, Debug)]
pub struct SimFile {
    disk: Arc<SimDisk>,
    ino: usize,
    direct: bool,
    sync_writes: bool,
}

impl SimFile {
    pub fn open(
        disk: Arc<SimDisk>,
        path: &Path,
        create_new: bool,
        direct: bool,
        sync_writes: bool,
    ) -> Result<SimFile, Error> {
        note_use(&disk);
        let ino = {
            let mut st = disk.lock();
            check_live(&st)?;
            match st.names.get(path) {
                Some(_) if create_new => return Err(Error::from(ErrorKind::AlreadyExists)),
                Some(&i) => i,
                None if create_new => {
                    let parent = path.parent().unwrap_or(Path::new("/"));
                    if !st.dirs.contains(parent) {
                        return Err(Error::from(ErrorKind::NotFound));
                    }
                    disk.op(&mut st);
                    let i = st.inodes.len();
                    st.inodes.push(Inode::default());
                    st.names.insert(path.to_owned(), i);
                    st.name_log.push(NameOp::Link(path.to_owned(), i));
                    i
                }
                None => return Err(Error::from(ErrorKind::NotFound)),
            }
        };
        Ok(SimFile {
            disk,
            ino,
            direct,
            sync_writes,
        })
    }

    pub fn size(&self) -> Result<u64, Error> {
        let st = self.disk.lock();
        check_live(&st)?;
        Ok(st.inodes[self.ino].data.len() as u64)
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize, Error> {
        note_use(&self.disk);
        aligned(self.direct, off, buf.len(), buf.as_ptr())?;
        let st = self.disk.lock();
        check_live(&st)?;
        let data = &st.inodes[self.ino].data;
        if off as usize >= data.len() {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - off as usize);
        buf[..n].copy_from_slice(&data[off as usize..off as usize + n]);
        Ok(n)
    }

    fn change(&self, st: &mut State, c: Change) -> Result<(), Error> {
        let new_len = match &c {
            Change::Write { off, data } => *off + data.len() as u64,
            Change::SetLen(len) => *len,
        };
        let old_len = st.inodes[self.ino].data.len() as u64;
        if let Some(cap) = st.faults.capacity {
            if new_len > old_len && used(st) + (new_len - old_len) > cap {
                return Err(Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let ino = &mut st.inodes[self.ino];
        if matches!(c, Change::SetLen(_)) && new_len <= old_len {
            return Ok(()); // allocation never shrinks
        }
        apply(&mut ino.data, &c);
        if self.sync_writes {
            apply(&mut ino.durable, &c);
        } else {
            ino.pending.push(c);
        }
        Ok(())
    }

    pub fn write_all_at(&self, buf: &[u8], off: u64) -> Result<(), Error> {
        note_use(&self.disk);
        aligned(self.direct, off, buf.len(), buf.as_ptr())?;
        let mut st = self.disk.lock();
        check_live(&st)?;
        self.disk.op(&mut st);
        st.writes += 1;
        if st.faults.fail_write_at == Some(st.writes) {
            st.fired += 1;
            return Err(eio());
        }
        self.change(
            &mut st,
            Change::Write {
                off,
                data: buf.to_vec(),
            },
        )
    }

    pub fn allocate(&self, len: u64) -> Result<(), Error> {
        note_use(&self.disk);
        let mut st = self.disk.lock();
        check_live(&st)?;
        self.disk.op(&mut st);
        self.change(&mut st, Change::SetLen(len))
    }

    pub fn sync(&self) -> Result<(), Error> {
        note_use(&self.disk);
        let mut st = self.disk.lock();
        check_live(&st)?;
        self.disk.op(&mut st);
        st.syncs += 1;
        let fail = st.faults.fail_sync_at == Some(st.syncs);
        st.fired += fail as u64;
        let ino = &mut st.inodes[self.ino];
        let pending = std::mem::take(&mut ino.pending);
        if fail {
            // IMPORTANT: the writes are gone for good (still readable, never
            // durable), as Linux does after a failed writeback.
            return Err(eio());
        }
        for c in &pending {
            apply(&mut ino.durable, c);
        }
        Ok(())
    }
}

/// Directory and name operations of [`super::file`] on a simulated disk.
pub fn create_dir_all(disk: &Arc<SimDisk>, dir: &Path) -> Result<(), Error> {
    note_use(disk);
    let mut st = disk.lock();
    check_live(&st)?;
    let mut p = dir.to_path_buf();
    loop {
        if st.names.contains_key(&p) {
            return Err(Error::from(ErrorKind::AlreadyExists));
        }
        st.dirs.insert(p.clone());
        if !p.pop() || p == disk.root || !p.starts_with(&disk.root) {
            return Ok(());
        }
    }
}

pub fn sync_dir(disk: &Arc<SimDisk>, dir: &Path) -> Result<(), Error> {
    note_use(disk);
    let mut st = disk.lock();
    check_live(&st)?;
    if !st.dirs.contains(dir) {
        return Err(Error::from(ErrorKind::NotFound));
    }
    disk.op(&mut st);
    st.syncs += 1;
    st.dir_syncs += 1;
    if st.faults.fail_sync_at == Some(st.syncs) || st.faults.fail_dir_sync_at == Some(st.dir_syncs)
    {
        st.fired += 1;
        return Err(eio());
    }
    let log = std::mem::take(&mut st.name_log);
    for op in &log {
        apply_name(&mut st.durable_names, op);
    }
    Ok(())
}

pub fn list_files(disk: &Arc<SimDisk>, dir: &Path) -> Result<Vec<String>, Error> {
    let st = disk.lock();
    check_live(&st)?;
    if !st.dirs.contains(dir) {
        return Err(Error::from(ErrorKind::NotFound));
    }
    Ok(st
        .names
        .keys()
        .filter(|p| p.parent() == Some(dir))
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect())
}

pub fn rename(disk: &Arc<SimDisk>, from: &Path, to: &Path) -> Result<(), Error> {
    note_use(disk);
    let mut st = disk.lock();
    check_live(&st)?;
    disk.op(&mut st);
    let Some(ino) = st.names.remove(from) else {
        return Err(Error::from(ErrorKind::NotFound));
    };
    st.names.insert(to.to_owned(), ino);
    st.name_log
        .push(NameOp::Rename(from.to_owned(), to.to_owned()));
    Ok(())
}

pub fn remove_file(disk: &Arc<SimDisk>, path: &Path) -> Result<(), Error> {
    note_use(disk);
    let mut st = disk.lock();
    check_live(&st)?;
    disk.op(&mut st);
    if st.names.remove(path).is_none() {
        return Err(Error::from(ErrorKind::NotFound));
    }
    st.name_log.push(NameOp::Unlink(path.to_owned()));
    Ok(())
}

pub fn exists(disk: &Arc<SimDisk>, path: &Path) -> bool {
    let st = disk.lock();
    st.names.contains_key(path) || st.dirs.contains(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> Arc<SimDisk> {
        Arc::new(SimDisk::new())
    }

    fn file(d: &Arc<SimDisk>, name: &str, create: bool) -> SimFile {
        SimFile::open(Arc::clone(d), &d.root().join(name), create, false, false).unwrap()
    }

    #[test]
    fn synced_writes_survive_every_cut_and_unsynced_ones_may_not() {
        let d = disk();
        let f = file(&d, "a", true);
        sync_dir(&d, d.root()).unwrap();
        f.write_all_at(&[1; 4096], 0).unwrap();
        f.sync().unwrap();
        f.write_all_at(&[2; 4096], 4096).unwrap();
        let mut kept = 0;
        for seed in 0..64 {
            let (img, rep) = d.power_cut(seed);
            let bytes = img.read_all(&d.root().join("a")).unwrap();
            assert_eq!(&bytes[..4096], &[1; 4096][..], "seed {seed}");
            assert_eq!(rep.pending, 1);
            if bytes.len() == 8192 && bytes[4096..].iter().all(|&b| b == 2) {
                kept += 1;
            }
        }
        assert!(
            kept > 0 && kept < 64,
            "the unsynced write is sometimes kept: {kept}"
        );
    }

    #[test]
    fn a_torn_write_keeps_some_sectors() {
        let d = disk();
        let f = file(&d, "a", true);
        sync_dir(&d, d.root()).unwrap();
        f.write_all_at(&[0; 8192], 0).unwrap();
        f.sync().unwrap();
        f.write_all_at(&[7; 8192], 0).unwrap();
        let torn = (0..256)
            .map(|s| d.power_cut(s))
            .filter(|(img, rep)| {
                let b = img.read_all(&d.root().join("a")).unwrap();
                let sevens = b.chunks(SECTOR).filter(|s| s[0] == 7).count();
                rep.torn == 1 && sevens > 0 && sevens < 16
            })
            .count();
        assert!(torn > 0, "some cuts tear the write between sectors");
    }

    #[test]
    fn an_unsynced_name_may_be_lost_a_synced_one_is_not() {
        let d = disk();
        let f = file(&d, "a", true);
        f.write_all_at(b"x", 0).unwrap();
        f.sync().unwrap();
        let lost = (0..64)
            .filter(|&s| d.power_cut(s).0.read_all(&d.root().join("a")).is_none())
            .count();
        assert!(lost > 0);
        sync_dir(&d, d.root()).unwrap();
        assert!((0..64).all(|s| d.power_cut(s).0.read_all(&d.root().join("a")).is_some()));
    }

    #[test]
    fn a_failed_sync_loses_the_pending_writes_for_good() {
        let d = disk();
        let f = file(&d, "a", true);
        sync_dir(&d, d.root()).unwrap();
        d.set_faults(Faults {
            fail_sync_at: Some(2),
            ..Faults::default()
        });
        f.write_all_at(&[9; 512], 0).unwrap();
        let e = f.sync().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        // A retry "succeeds" but the data was dropped: never durable.
        f.sync().unwrap();
        let mut buf = [0; 512];
        f.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [9; 512], "still readable");
        for s in 0..32 {
            let img = d.power_cut(s).0.read_all(&d.root().join("a")).unwrap();
            assert!(img.is_empty(), "seed {s}: the lost write came back");
        }
    }

    #[test]
    fn the_nth_directory_fsync_fails_and_its_names_stay_pending() {
        let d = disk();
        let f = file(&d, "a", true);
        f.sync().unwrap(); // a file's sync: not counted as a directory fsync
        d.set_faults(Faults {
            fail_dir_sync_at: Some(d.dir_syncs() + 1),
            ..Faults::default()
        });
        let e = sync_dir(&d, d.root()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!((d.fired(), d.dir_syncs()), (1, 1));
        let lost = (0..64)
            .filter(|&s| d.power_cut(s).0.read_all(&d.root().join("a")).is_none())
            .count();
        assert!(lost > 0, "the name was made durable by a failed fsync");
        sync_dir(&d, d.root()).unwrap();
        assert!((0..64).all(|s| d.power_cut(s).0.read_all(&d.root().join("a")).is_some()));
    }

    #[test]
    fn capacity_gives_enospc_and_direct_io_wants_alignment() {
        let d = disk();
        d.set_faults(Faults {
            capacity: Some(8192),
            ..Faults::default()
        });
        let f = file(&d, "a", true);
        f.allocate(8192).unwrap();
        let e = f.write_all_at(&[1; 512], 8192).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        f.write_all_at(&[1; 512], 0).unwrap(); // inside the allocation
        let g = SimFile::open(Arc::clone(&d), &d.root().join("b"), true, true, false).unwrap();
        let e = g.write_all_at(&[1; 100], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(
            file(&d, "c", true)
                .write_all_at(&[1; 1], 0)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOSPC)
        );
    }
}
