//! Questions an operator tool asks about where a file lives, without touching
//! it: which filesystem holds a path. `walden test-fsync` names it in its
//! report, because the figures mean different things on a disk and in memory
//! (tmpfs accepts O_DIRECT since Linux 6.6, yet has no device behind it).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The filesystem a path lives on, as statfs(2) reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filesystem {
    /// `f_type`, the filesystem's magic number (linux/magic.h).
    pub magic: u32,
}

impl Filesystem {
    /// The usual name of the filesystem (`ext4`, `xfs`, `tmpfs`, ...), or
    /// `None` for one this table does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.magic {
            0xEF53 => "ext4", // ext2, ext3 and ext4 share the magic
            0x5846_5342 => "xfs",
            0x9123_683E => "btrfs",
            0xCA45_1A4E => "bcachefs",
            0xF2F5_2010 => "f2fs",
            0x2FC1_2FC1 => "zfs",
            0x0102_1994 => "tmpfs",
            0x8584_58F6 => "ramfs",
            0x794C_7630 => "overlayfs",
            0x6573_5546 => "fuse",
            0x6969 => "nfs",
            0xFF53_4D42 | 0xFE53_4D42 => "cifs",
            0x0102_1997 => "9p",
            _ => return None,
        })
    }

    /// Whether the filesystem keeps files in memory only: no device, so a
    /// sync costs nothing and survives nothing.
    pub fn is_memory(self) -> bool {
        matches!(self.name(), Some("tmpfs" | "ramfs"))
    }

    /// The name, or the magic number in hex when the name is unknown.
    pub fn describe(self) -> String {
        match self.name() {
            Some(n) => n.to_string(),
            None => format!("filesystem 0x{:x}", self.magic),
        }
    }
}

/// statfs(2) of `path` (a file or a directory).
pub fn filesystem(path: &Path) -> io::Result<Filesystem> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statfs is plain old data; all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a NUL-terminated string and st a live, writable
    // statfs, both valid for the duration of the call.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is a signed or unsigned word depending on the architecture; the
    // magic numbers are 32-bit values.
    Ok(Filesystem {
        magic: st.f_type as u64 as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_filesystem_of_the_current_directory() {
        let fs = filesystem(Path::new(".")).unwrap();
        assert!(!fs.describe().is_empty());
    }

    #[test]
    fn a_missing_path_is_an_error() {
        assert!(filesystem(Path::new("/no/such/directory/walden")).is_err());
    }

    #[test]
    fn memory_filesystems_are_recognised() {
        assert!(Filesystem { magic: 0x0102_1994 }.is_memory());
        assert!(!Filesystem { magic: 0xEF53 }.is_memory());
        assert_eq!(Filesystem { magic: 0x1234 }.describe(), "filesystem 0x1234");
    }
}
