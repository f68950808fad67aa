//! A lock file held with `flock(LOCK_EX | LOCK_NB)` on an open descriptor:
//! the kernel releases it when the descriptor closes, however the process
//! ends (exit, abort, SIGKILL), so a lock left by a dead process is never
//! held. What the lock means and what the file says are `crate::lock`'s.
//!
//! Two things flock does that callers must design for:
//! - The lock belongs to the open file description. Two `open`s of the same
//!   file in one process are two descriptions, and their locks conflict: a
//!   process that needs the lock twice must share one [`LockFile`].
//! - The lock is on the inode, not the name. If the name is removed or
//!   replaced between our `open` and our `flock`, we would hold a lock
//!   nobody else can see; [`LockFile::try_lock`] checks the name still
//!   leads to the locked file, and tries again if not.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::file::FileError;

/// A lock file whose exclusive lock this process holds until it is dropped.
#[derive(Debug)]
pub struct LockFile {
    file: File,
    path: PathBuf,
}

/// What [`LockFile::try_lock`] found.
#[derive(Debug)]
pub enum Attempt {
    /// The lock is ours; the file still holds what its last holder wrote.
    Locked(LockFile),
    /// Another open file description holds it (another process, or this
    /// one through another open). `contents` is what the file held when we
    /// looked: its holder may be writing it, so it may be partial or empty.
    Held { contents: Vec<u8> },
}

impl LockFile {
    /// Opens `path` (creating it with mode 0600 if missing; an existing
    /// file is never truncated or written) and tries to lock it without
    /// waiting.
    pub fn try_lock(path: &Path) -> Result<Attempt, FileError> {
        // A name replaced under us once is a race; again and again, someone
        // is deleting the file on purpose.
        for _ in 0..10 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| FileError::new("open lock file", path, e))?;
            // SAFETY: flock takes an open descriptor (owned by `file`, alive
            // for the call) and integer flags; it touches no memory of ours.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    let contents =
                        read_all(&file).map_err(|e| FileError::new("read lock file", path, e))?;
                    return Ok(Attempt::Held { contents });
                }
                return Err(FileError::new("lock file", path, e));
            }
            let ours = file
                .metadata()
                .map_err(|e| FileError::new("stat lock file", path, e))?;
            match std::fs::metadata(path) {
                Ok(named) if named.dev() == ours.dev() && named.ino() == ours.ino() => {
                    return Ok(Attempt::Locked(LockFile {
                        file,
                        path: path.to_owned(),
                    }));
                }
                // Removed or replaced between open and flock: the lock we
                // hold guards nothing. Drop it (closing releases it) and
                // take the file the name leads to now.
                _ => continue,
            }
        }
        Err(FileError::new(
            "lock file",
            path,
            io::Error::other("the file was removed or replaced each time it was locked"),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the file holds now.
    pub fn contents(&self) -> Result<Vec<u8>, FileError> {
        read_all(&self.file).map_err(|e| FileError::new("read lock file", &self.path, e))
    }

    /// Makes the file hold exactly `bytes`: written over the old contents
    /// from offset 0, then cut to length. Not atomic: a reader may see a
    /// mix, or a short file, and must tolerate it. Not synced: the lock
    /// lives in the kernel, the file only describes its holder.
    pub fn replace_contents(&self, bytes: &[u8]) -> Result<(), FileError> {
        self.file
            .write_all_at(bytes, 0)
            .and_then(|()| self.file.set_len(bytes.len() as u64))
            .map_err(|e| FileError::new("write lock file", &self.path, e))
    }
}

fn read_all(file: &File) -> io::Result<Vec<u8>> {
    // A lock file is a few hundred bytes; more is not ours to read.
    let mut buf = vec![0u8; 4096];
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// True when `a` and `b` are the same directory (same device and inode),
/// whatever their spelling: one lock file must not be opened twice.
pub fn same_directory(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_conflicts_and_reads_the_holders_contents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("walden.pid");
        let Attempt::Locked(first) = LockFile::try_lock(&p).unwrap() else {
            panic!("a new lock file is free");
        };
        first.replace_contents(b"pid=1\nlonger line\n").unwrap();
        first.replace_contents(b"pid=2\n").unwrap();
        // Another open file description, even in this process, conflicts.
        match LockFile::try_lock(&p).unwrap() {
            Attempt::Held { contents } => assert_eq!(contents, b"pid=2\n"),
            Attempt::Locked(_) => panic!("locked twice"),
        }
        drop(first);
        // Released on close; the contents stay until the next holder writes.
        let Attempt::Locked(second) = LockFile::try_lock(&p).unwrap() else {
            panic!("the lock was not released");
        };
        assert_eq!(second.contents().unwrap(), b"pid=2\n");
    }

    #[test]
    fn same_directory_sees_through_spelling() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        assert!(same_directory(
            &d.path().join("a"),
            &d.path().join("a/../a/.")
        ));
        assert!(!same_directory(d.path(), &d.path().join("a")));
        assert!(!same_directory(d.path(), &d.path().join("missing")));
    }
}
