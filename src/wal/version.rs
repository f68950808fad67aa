//! The WAL's format version, `wal_dir/wal_version` (docs/wal-format.md §5a).
//!
//! The records carry no version, and a reader that meets bytes it cannot
//! validate takes them for the end of WAL; startup then zeroes everything
//! after that end. So a binary that met a WAL written in a newer format
//! (timelines, padding records: later releases) would destroy it. This file
//! is read before any record is, and before anything is changed: a version
//! other than [`WAL_FORMAT_VERSION`] refuses the start.
//!
//! One line, `<version> <crc32c of the version's text, 8 hex digits>\n`,
//! written at creation (temporary file, fsync, rename, fsync of the
//! directory). A WAL directory made by a build before this file existed has
//! none: that is version 1, and the first start of this build writes it.

use std::path::{Path, PathBuf};

use crate::io::file::FileError;

/// The file's name in the WAL directory.
pub const WAL_VERSION_FILE: &str = "wal_version";

/// The WAL format this build writes, and the only one it reads.
pub const WAL_FORMAT_VERSION: u32 = 1;

/// A WAL this build must not touch.
#[derive(Debug, thiserror::Error)]
#[error(
    "WAL format version {found} in \"{}\" is not supported: this build of walden reads and writes \
     WAL format version {supported} only (run the walden release that wrote this WAL; nothing was changed)",
    path.display()
)]
pub struct UnsupportedVersion {
    pub path: PathBuf,
    pub found: u32,
    pub supported: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Unsupported(#[from] UnsupportedVersion),
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(WAL_VERSION_FILE)
}

/// The version `dir/wal_version` names; `None` if there is no such file.
pub fn read(dir: &Path) -> Result<Option<u32>, FileError> {
    let Some(text) = super::marker::read(dir, WAL_VERSION_FILE, "VERSION")? else {
        return Ok(None);
    };
    text.parse::<u32>()
        .map(Some)
        .map_err(|_| super::marker::bad(dir, WAL_VERSION_FILE, "bad version number"))
}

/// Checks the WAL in `dir` is one this build reads: `wal_version` says
/// [`WAL_FORMAT_VERSION`], or is missing (a new WAL, or one from before the
/// file existed: version 1). Reads only. Returns whether the file is there.
pub fn check(dir: &Path) -> Result<bool, VersionError> {
    match read(dir)? {
        None => Ok(false),
        Some(v) if v == WAL_FORMAT_VERSION => Ok(true),
        Some(found) => Err(UnsupportedVersion {
            path: path(dir),
            found,
            supported: WAL_FORMAT_VERSION,
        }
        .into()),
    }
}

/// Writes `dir/wal_version` durably: a temporary file, fsync, rename, fsync
/// of the directory, so it is whole or absent after a crash.
pub fn write(dir: &Path, version: u32) -> Result<(), FileError> {
    // IMPORTANT: durable (name included) before any WAL is written under it.
    super::marker::write(dir, WAL_VERSION_FILE, &version.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_damaged_and_newer() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), None);
        assert!(!check(d.path()).unwrap());
        write(d.path(), WAL_FORMAT_VERSION).unwrap();
        assert_eq!(
            std::fs::read_to_string(path(d.path())).unwrap(),
            format!("1 {:08x}\n", crc32c::crc32c(b"1"))
        );
        assert!(check(d.path()).unwrap());
        write(d.path(), 99).unwrap();
        let e = check(d.path()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "WAL format version 99 in \"{}\" is not supported: this build of walden reads and \
                 writes WAL format version 1 only",
                path(d.path()).display()
            )),
            "{e}"
        );
        std::fs::write(path(d.path()), "2 00000000\n").unwrap();
        let e = check(d.path()).unwrap_err().to_string();
        assert!(e.contains("crc mismatch"), "{e}");
    }
}
