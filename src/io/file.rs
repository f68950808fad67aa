//! Files and directories: segment files opened with O_DIRECT and the sync
//! flags of `wal_sync_method`, and the directory operations that make
//! creation, renames and removals durable.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An I/O failure, naming the operation and the file as PostgreSQL's
/// messages do (`could not write to file "...": No space left on device`).
#[derive(Debug, thiserror::Error)]
#[error("could not {op} \"{}\": {source}", path.display())]
pub struct FileError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    pub fn new(op: &'static str, path: &Path, source: std::io::Error) -> FileError {
        FileError {
            op,
            path: path.to_owned(),
            source,
        }
    }

    pub fn is_no_space(&self) -> bool {
        self.source.raw_os_error() == Some(libc::ENOSPC)
    }

    /// The failure's errno, EIO for an error that carries none: what an
    /// io_uring completion would have reported (negated) for it.
    pub fn errno(&self) -> i32 {
        self.source.raw_os_error().unwrap_or(libc::EIO)
    }
}

pub type Result<T> = std::result::Result<T, FileError>;

/// Test-only fault injection: the number of the sync that fails with EIO
/// (0: off, always, except in `walden wal-child --inject-sync-eio-at N`;
/// the server never sets it).
static SYNC_EIO_AT: AtomicU64 = AtomicU64::new(0);
/// Syncs of real files counted since [`inject_sync_eio_at`] armed the hook.
static SYNCS: AtomicU64 = AtomicU64::new(0);

/// Test-only hook, used by `walden wal-child --inject-sync-eio-at N` (never by
/// the server): the `n`-th [`SegmentFile::datasync`] or [`SegmentFile::fsync`]
/// of a real file (not a simulated one) from now on, counted process-wide,
/// fails with EIO without calling the real sync, as a device that failed the
/// writeback would; the syncs before and after it are real. `0` turns it off.
pub fn inject_sync_eio_at(n: u64) {
    SYNC_EIO_AT.store(0, Ordering::SeqCst);
    SYNCS.store(0, Ordering::SeqCst);
    SYNC_EIO_AT.store(n, Ordering::SeqCst);
}

/// The injected failure, if this sync is the one [`inject_sync_eio_at`] chose.
/// Off (always outside tests), one relaxed load.
#[inline]
pub(crate) fn injected_sync_error() -> Option<std::io::Error> {
    let at = SYNC_EIO_AT.load(Ordering::Relaxed);
    if at == 0 {
        return None;
    }
    count_injected_sync(at)
}

#[cold]
fn count_injected_sync(at: u64) -> Option<std::io::Error> {
    (SYNCS.fetch_add(1, Ordering::Relaxed) + 1 == at)
        .then(|| std::io::Error::from_raw_os_error(libc::EIO))
}

/// How a segment file is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenMode {
    pub write: bool,
    pub create_new: bool,
    /// O_DIRECT; silently dropped on filesystems that refuse it (tmpfs), see
    /// [`SegmentFile::is_direct`].
    pub direct: bool,
    /// O_DSYNC: every write is durable (data) when it returns.
    pub dsync: bool,
    /// O_SYNC: every write is durable (data and metadata) when it returns.
    pub sync: bool,
}

/// One open file. All positional I/O of the engine goes through it: a real
/// file, or one on a simulated disk ([`super::sim`]) in tests.
#[derive(Debug)]
pub struct SegmentFile {
    file: Backing,
    path: PathBuf,
    direct: bool,
}

#[derive(Debug)]
enum Backing {
    Os(File),
    Sim(sim::SimFile),
}

use super::sim;

impl SegmentFile {
    pub fn open(path: &Path, mode: OpenMode) -> Result<SegmentFile> {
        if let Some(disk) = sim::disk_for(path) {
            let f = sim::SimFile::open(
                disk,
                path,
                mode.create_new,
                mode.direct,
                mode.dsync || mode.sync,
            )
            .map_err(|e| FileError::new("open file", path, e))?;
            return Ok(SegmentFile {
                file: Backing::Sim(f),
                path: path.to_owned(),
                direct: mode.direct,
            });
        }
        let attempt = |direct: bool| {
            let mut flags = 0;
            if direct {
                flags |= libc::O_DIRECT;
            }
            if mode.dsync {
                flags |= libc::O_DSYNC;
            }
            if mode.sync {
                flags |= libc::O_SYNC;
            }
            OpenOptions::new()
                .read(true)
                .write(mode.write)
                .create_new(mode.create_new)
                .mode(0o600)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match attempt(mode.direct) {
            Ok(f) => (f, mode.direct),
            // tmpfs and some FUSE filesystems refuse O_DIRECT with EINVAL.
            Err(e) if mode.direct && e.raw_os_error() == Some(libc::EINVAL) => (
                attempt(false).map_err(|e| FileError::new("open file", path, e))?,
                false,
            ),
            Err(e) => return Err(FileError::new("open file", path, e)),
        };
        Ok(SegmentFile {
            file: Backing::Os(file),
            path: path.to_owned(),
            direct,
        })
    }

    /// True for a file on a simulated disk, which io_uring cannot reach:
    /// callers use the synchronous methods instead of [`SegmentFile::raw_fd`].
    pub fn is_simulated(&self) -> bool {
        matches!(self.file, Backing::Sim(_))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether O_DIRECT is in force (false on filesystems that refuse it).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The descriptor, for io_uring. Panics on a simulated file (see
    /// [`SegmentFile::is_simulated`]).
    /// The simulated file behind this one, on a simulated disk (tests).
    pub(crate) fn simulated(&self) -> Option<&sim::SimFile> {
        match &self.file {
            Backing::Os(_) => None,
            Backing::Sim(f) => Some(f),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        match &self.file {
            Backing::Os(f) => f.as_raw_fd(),
            Backing::Sim(_) => panic!(
                "io_uring cannot reach the simulated file {}",
                self.path.display()
            ),
        }
    }

    pub fn is_empty(&self) -> Result<bool> {
        self.len().map(|n| n == 0)
    }

    pub fn len(&self) -> Result<u64> {
        match &self.file {
            Backing::Os(f) => f.metadata().map(|m| m.len()),
            Backing::Sim(f) => f.size(),
        }
        .map_err(|e| FileError::new("stat file", &self.path, e))
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    /// With O_DIRECT, `buf`, its length and `offset` must be block aligned.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let file = match &self.file {
            Backing::Os(f) => f,
            Backing::Sim(f) => {
                return f
                    .read_at(buf, offset)
                    .map_err(|e| FileError::new("read from file", &self.path, e))
            }
        };
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FileError::new("read from file", &self.path, e)),
            }
        }
        Ok(done)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match &self.file {
            Backing::Os(f) => f.write_all_at(buf, offset),
            Backing::Sim(f) => f.write_all_at(buf, offset),
        }
        .map_err(|e| FileError::new("write to file", &self.path, e))
    }

    /// fdatasync(2). A failure is never retried: the caller must treat it as
    /// fatal (the kernel may have dropped the dirty data and cleared the error).
    pub fn datasync(&self) -> Result<()> {
        match &self.file {
            Backing::Os(f) => match injected_sync_error() {
                Some(e) => Err(e),
                None => f.sync_data(),
            },
            Backing::Sim(f) => f.sync(),
        }
        .map_err(|e| FileError::new("fdatasync file", &self.path, e))
    }

    /// fsync(2), with the same rule as [`SegmentFile::datasync`].
    pub fn fsync(&self) -> Result<()> {
        match &self.file {
            Backing::Os(f) => match injected_sync_error() {
                Some(e) => Err(e),
                None => f.sync_all(),
            },
            Backing::Sim(f) => f.sync(),
        }
        .map_err(|e| FileError::new("fsync file", &self.path, e))
    }

    /// Asks the kernel to start reading the whole file into the page cache
    /// (POSIX_FADV_WILLNEED), without waiting: a sequential reader then
    /// finds it there. Only a hint; errors are ignored.
    pub fn will_need(&self) {
        let Backing::Os(file) = &self.file else {
            return;
        };
        // Linux caps one WILLNEED at the device's readahead size
        // (read_ahead_kb), so a whole file is asked for piece by piece.
        const PIECE: u64 = 4 << 20;
        let len = self.len().unwrap_or(0);
        let mut off = 0;
        while off < len {
            // SAFETY: posix_fadvise only reads its integer arguments; fd is open.
            unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    off as libc::off_t,
                    PIECE as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
            off += PIECE;
        }
    }

    /// Reserves `len` bytes of disk space (blocks come back as zeros).
    pub fn allocate(&self, len: u64) -> Result<()> {
        let file = match &self.file {
            Backing::Os(f) => f,
            Backing::Sim(f) => {
                return f
                    .allocate(len)
                    .map_err(|e| FileError::new("allocate space in file", &self.path, e))
            }
        };
        // SAFETY: fallocate only reads its integer arguments; fd is open.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // Filesystems without fallocate: extend the file instead.
            return file
                .set_len(len)
                .map_err(|e| FileError::new("extend file", &self.path, e));
        }
        Err(FileError::new("allocate space in file", &self.path, err))
    }
}

/// fsync of a directory, so that creations, renames and removals in it are
/// durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    if let Some(d) = sim::disk_for(dir) {
        return sim::sync_dir(&d, dir).map_err(|e| FileError::new("fsync directory", dir, e));
    }
    // IMPORTANT: without this a crash can forget a rename or a new segment.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::new("fsync directory", dir, e))
}

/// Names of the entries of `dir` (files only), unsorted.
pub fn list_files(dir: &Path) -> Result<Vec<String>> {
    if let Some(d) = sim::disk_for(dir) {
        return sim::list_files(&d, dir).map_err(|e| FileError::new("open directory", dir, e));
    }
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| FileError::new("open directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| FileError::new("read directory", dir, e))?;
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            if let Some(name) = entry.file_name().to_str() {
                out.push(name.to_string());
            }
        }
    }
    Ok(out)
}

pub fn create_dir_all(dir: &Path) -> Result<()> {
    if let Some(d) = sim::disk_for(dir) {
        return sim::create_dir_all(&d, dir)
            .map_err(|e| FileError::new("create directory", dir, e));
    }
    std::fs::create_dir_all(dir).map_err(|e| FileError::new("create directory", dir, e))
}

pub fn rename(from: &Path, to: &Path) -> Result<()> {
    if let Some(d) = sim::disk_for(from) {
        return sim::rename(&d, from, to).map_err(|e| FileError::new("rename file", from, e));
    }
    std::fs::rename(from, to).map_err(|e| FileError::new("rename file", from, e))
}

pub fn remove_file(path: &Path) -> Result<()> {
    if let Some(d) = sim::disk_for(path) {
        return sim::remove_file(&d, path).map_err(|e| FileError::new("remove file", path, e));
    }
    std::fs::remove_file(path).map_err(|e| FileError::new("remove file", path, e))
}

/// Whether `path` exists (a file or a directory).
/// A small text file's contents; `None` if it does not exist; an error
/// reads as PostgreSQL's `could not read file "…": …`.
pub fn read_optional_text(path: &Path) -> std::result::Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("could not read file \"{}\": {e}", path.display())),
    }
}

pub fn exists(path: &Path) -> bool {
    match sim::disk_for(path) {
        Some(d) => sim::exists(&d, path),
        None => path.exists(),
    }
}

/// The whole contents of a small file (`NotFound` when it does not exist).
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    if sim::disk_for(path).is_none() {
        return std::fs::read(path);
    }
    let f = SegmentFile::open(path, OpenMode::default()).map_err(|e| e.source)?;
    let mut buf = vec![0; f.len().map_err(|e| e.source)? as usize];
    let n = f.read_at(&mut buf, 0).map_err(|e| e.source)?;
    buf.truncate(n);
    Ok(buf)
}

/// Creates (or truncates) a small file with `bytes`; not synced.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if sim::disk_for(path).is_none() {
        return std::fs::write(path, bytes).map_err(|e| FileError::new("write file", path, e));
    }
    if exists(path) {
        remove_file(path)?;
    }
    let f = SegmentFile::open(
        path,
        OpenMode {
            write: true,
            create_new: true,
            ..Default::default()
        },
    )?;
    f.write_all_at(bytes, 0)
}

/// Replaces `dir/name` with `bytes` durably: a temporary file, written and
/// fsynced, renamed into place, then the directory fsynced. A crash leaves
/// the old file or the whole new one. `fsync = false` (the `fsync` setting
/// off) skips both syncs.
pub fn replace_durably(dir: &Path, name: &str, bytes: &[u8], fsync: bool) -> Result<PathBuf> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    write_file(&tmp, bytes)?;
    if fsync {
        SegmentFile::open(
            &tmp,
            OpenMode {
                write: true,
                ..Default::default()
            },
        )?
        .fsync()?;
    }
    rename(&tmp, &path)?;
    // IMPORTANT: the new name is durable before anything relies on it.
    if fsync {
        sync_dir(dir)?;
    }
    Ok(path)
}
