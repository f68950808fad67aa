//! Files and directories: segment files opened with O_DIRECT and the sync
//! flags of `wal_sync_method`, and the directory operations that make
//! creation, renames and removals durable.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

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
}

pub type Result<T> = std::result::Result<T, FileError>;

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

/// One open file. All positional I/O of the engine goes through it.
#[derive(Debug)]
pub struct SegmentFile {
    file: File,
    path: PathBuf,
    direct: bool,
}

impl SegmentFile {
    pub fn open(path: &Path, mode: OpenMode) -> Result<SegmentFile> {
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
            file,
            path: path.to_owned(),
            direct,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether O_DIRECT is in force (false on filesystems that refuse it).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn is_empty(&self) -> Result<bool> {
        self.len().map(|n| n == 0)
    }

    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| FileError::new("stat file", &self.path, e))
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    /// With O_DIRECT, `buf`, its length and `offset` must be block aligned.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
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
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| FileError::new("write to file", &self.path, e))
    }

    /// fdatasync(2). A failure is never retried: the caller must treat it as
    /// fatal (the kernel may have dropped the dirty data and cleared the error).
    pub fn datasync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| FileError::new("fdatasync file", &self.path, e))
    }

    /// fsync(2), with the same rule as [`SegmentFile::datasync`].
    pub fn fsync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| FileError::new("fsync file", &self.path, e))
    }

    /// Asks the kernel to start reading the whole file into the page cache
    /// (POSIX_FADV_WILLNEED), without waiting: a sequential reader then
    /// finds it there. Only a hint; errors are ignored.
    pub fn will_need(&self) {
        // SAFETY: posix_fadvise only reads its integer arguments; fd is open.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }

    /// Reserves `len` bytes of disk space (blocks come back as zeros).
    pub fn allocate(&self, len: u64) -> Result<()> {
        // SAFETY: fallocate only reads its integer arguments; fd is open.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // Filesystems without fallocate: extend the file instead.
            return self
                .file
                .set_len(len)
                .map_err(|e| FileError::new("extend file", &self.path, e));
        }
        Err(FileError::new("allocate space in file", &self.path, err))
    }
}

/// fsync of a directory, so that creations, renames and removals in it are
/// durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    // IMPORTANT: without this a crash can forget a rename or a new segment.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::new("fsync directory", dir, e))
}

/// Names of the entries of `dir` (files only), unsorted.
pub fn list_files(dir: &Path) -> Result<Vec<String>> {
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
    std::fs::create_dir_all(dir).map_err(|e| FileError::new("create directory", dir, e))
}

pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| FileError::new("rename file", from, e))
}

pub fn remove_file(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(|e| FileError::new("remove file", path, e))
}
