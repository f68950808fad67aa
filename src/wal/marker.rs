//! The WAL directory's small marker files (`wal_start`, `wal_version`): one
//! line, `VALUE CRC32C-IN-HEX`, so that a damaged file is told from a value,
//! replaced durably (temporary file, fsync, rename, fsync of the directory)
//! so that a crash leaves the old one or the new one, never a mix.

use std::path::Path;

use crate::io::file::{self, FileError};

/// The value text of `dir/name`, its crc checked; `None` if there is no such
/// file. `value` names the field in a parse error (`LSN`, `VERSION`).
pub fn read(dir: &Path, name: &str, value: &str) -> Result<Option<String>, FileError> {
    let path = dir.join(name);
    let text = match file::read_file(&path) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FileError::new("read file", &path, e)),
    };
    let (v, crc) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| bad(dir, name, &format!("expected \"{value} CRC\"")))?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| bad(dir, name, "bad crc field"))?;
    if crc != crc32c::crc32c(v.as_bytes()) {
        return Err(bad(dir, name, "crc mismatch: the file is damaged"));
    }
    Ok(Some(v.to_string()))
}

/// A parse error of `dir/name`.
pub fn bad(dir: &Path, name: &str, why: &str) -> FileError {
    FileError::new(
        "parse file",
        &dir.join(name),
        std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string()),
    )
}

/// Replaces `dir/name` with `value` and its crc, durably.
pub fn write(dir: &Path, name: &str, value: &str) -> Result<(), FileError> {
    let body = format!("{value} {:08x}\n", crc32c::crc32c(value.as_bytes()));
    file::replace_durably(dir, name, body.as_bytes(), true).map(|_| ())
}
