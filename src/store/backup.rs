//! Base backups in the WAL and in a copy (PostgreSQL's pg_backup_start /
//! pg_backup_stop, XLOG_BACKUP_END and backup_label): the payload of the
//! BACKUP_START (134) and BACKUP_END (135) records, the copy's
//! `backup_label`, and the watch recovery keeps for the backup's end.
//!
//! ```text
//! BACKUP_START (134) / BACKUP_END (135)
//!  0 8 start LSN   the backup's start: the redo point of its checkpoint
//!  8 … label       UTF-8, at most MAX_LABEL_LEN bytes
//! ```
//!
//! The primary writes BACKUP_START right after the backup's checkpoint and
//! BACKUP_END once every page is copied; the end of BACKUP_END is the
//! backup's end. A copy (it has a `backup_label`) is consistent only once
//! replay passed the BACKUP_END whose start is the label's START WAL
//! LOCATION: a copy whose WAL ends before it refuses to start. Other
//! backups' markers (concurrent backups, earlier ones) change nothing.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::*};

use crate::lsn::Lsn;
use crate::record::Kind;

use super::records::RecordDecodeError;
use super::StoreError;

/// A copy's label file, written by `walden basebackup`.
pub const BACKUP_LABEL: &str = "backup_label";
/// What the label file becomes once recovery reached the backup's end.
pub const BACKUP_LABEL_OLD: &str = "backup_label.old";
/// The longest label (PostgreSQL's MAXPGPATH).
pub const MAX_LABEL_LEN: usize = 1024;

/// A decoded BACKUP_START or BACKUP_END payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupMarker<'a> {
    pub start: Lsn,
    pub label: &'a str,
}

pub fn encode_marker(start: Lsn, label: &str, out: &mut Vec<u8>) {
    debug_assert!(label.len() <= MAX_LABEL_LEN);
    out.clear();
    out.extend_from_slice(&start.0.to_le_bytes());
    out.extend_from_slice(label.as_bytes());
}

pub fn decode_marker(kind: Kind, p: &[u8], at: Lsn) -> Result<BackupMarker<'_>, RecordDecodeError> {
    let bad = |what: String| RecordDecodeError { kind, at, what };
    if p.len() < 8 {
        return Err(bad(format!(
            "a backup marker is at least 8 bytes (the start LSN), got {}",
            p.len()
        )));
    }
    let label = &p[8..];
    if label.len() > MAX_LABEL_LEN {
        return Err(bad(format!(
            "the label is {} bytes, more than {MAX_LABEL_LEN}",
            label.len()
        )));
    }
    let label =
        std::str::from_utf8(label).map_err(|e| bad(format!("the label is not UTF-8: {e}")))?;
    Ok(BackupMarker {
        start: Lsn(u64::from_le_bytes(p[..8].try_into().unwrap())),
        label,
    })
}

/// waldump's `desc:` for the two markers; `None` for other kinds.
pub fn describe(kind: Kind, payload: &[u8], at: Lsn) -> Option<String> {
    if kind != Kind::BACKUP_START && kind != Kind::BACKUP_END {
        return None;
    }
    Some(match decode_marker(kind, payload, at) {
        Ok(m) => format!("start {}; label \"{}\"", m.start, m.label.escape_debug()),
        Err(e) => format!("INVALID: {}", e.what),
    })
}

/// The fields of a `backup_label` this module reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupLabel {
    /// START WAL LOCATION: the backup's start.
    pub start: Lsn,
    pub label: String,
}

/// Reads `data_dir/backup_label`; `None` if there is none (not a copy, or
/// a copy that already reached its end).
pub fn read_label(data_dir: &Path) -> Result<Option<BackupLabel>, StoreError> {
    let path = data_dir.join(BACKUP_LABEL);
    let Some(text) = crate::io::file::read_optional_text(&path).map_err(StoreError::Recovery)?
    else {
        return Ok(None);
    };
    parse_label(&text).map(Some).map_err(|what| {
        StoreError::Recovery(format!(
            "invalid data in file \"{}\": {what}",
            path.display()
        ))
    })
}

fn parse_label(text: &str) -> Result<BackupLabel, String> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
    };
    let start = field("START WAL LOCATION")
        .ok_or("no START WAL LOCATION line")?
        .split(' ')
        .next()
        .unwrap_or("");
    let start: Lsn = start
        .parse()
        .map_err(|_| format!("START WAL LOCATION {start:?} is not an LSN"))?;
    if !start.is_valid() {
        return Err("START WAL LOCATION is 0/0".into());
    }
    Ok(BackupLabel {
        start,
        label: field("LABEL").unwrap_or("").to_string(),
    })
}

/// Renames the label file away once the backup's end was replayed (as
/// PostgreSQL does at the end of recovery), durably: a later start must not
/// look for a BACKUP_END that a checkpoint may have released.
pub fn retire_label(data_dir: &Path, fsync: bool) -> std::io::Result<()> {
    let from = data_dir.join(BACKUP_LABEL);
    std::fs::rename(&from, data_dir.join(BACKUP_LABEL_OLD))?;
    if fsync {
        // IMPORTANT: the rename is durable before any checkpoint moves the
        // redo point past the BACKUP_END record.
        std::fs::File::open(data_dir)?.sync_all()?;
    }
    Ok(())
}

/// What recovery watches for in a copy: the BACKUP_END of the backup that
/// started at `start`. Shared by the redo loop (which sees the records) and
/// the startup check (which runs once the scan found the end of WAL).
pub(crate) struct BackupEndWatch {
    label: Option<BackupLabel>,
    /// The end of the matching BACKUP_END record, 0 until replayed.
    reached: AtomicU64,
}

impl BackupEndWatch {
    pub fn new(label: Option<BackupLabel>) -> BackupEndWatch {
        BackupEndWatch {
            label,
            reached: AtomicU64::new(0),
        }
    }

    /// The backup's start, if this store is a copy still short of its end.
    pub fn start(&self) -> Option<Lsn> {
        self.label.as_ref().map(|l| l.start)
    }

    pub fn label(&self) -> Option<&BackupLabel> {
        self.label.as_ref()
    }

    /// The end of the matching BACKUP_END, once replayed.
    pub fn reached(&self) -> Option<Lsn> {
        match self.reached.load(Acquire) {
            0 => None,
            e => Some(Lsn(e)),
        }
    }

    /// Sees one record of the redo scan: the matching BACKUP_END is the
    /// backup's end (logged as PostgreSQL does). True when it was that one.
    pub fn observe(
        &self,
        kind: Kind,
        payload: &[u8],
        at: Lsn,
        end: Lsn,
    ) -> Result<bool, StoreError> {
        let Some(label) = &self.label else {
            return Ok(false);
        };
        if kind != Kind::BACKUP_END || self.reached().is_some() {
            return Ok(false);
        }
        let m = decode_marker(kind, payload, at)?;
        if m.start != label.start {
            tracing::info!(
                "backup end record at {at} belongs to another backup (started at {}, not {})",
                m.start,
                label.start
            );
            return Ok(false);
        }
        self.reached.store(end.0, Release);
        tracing::info!(
            "backup end record reached at {at}: base backup \"{}\" started at {} is complete",
            m.label.escape_debug(),
            m.start
        );
        tracing::info!("consistent recovery state reached at {end}");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_bad_payloads_are_refused() {
        let mut out = Vec::new();
        encode_marker(Lsn(0x100_0028), "nightly ✓", &mut out);
        assert_eq!(&out[..8], &0x100_0028u64.to_le_bytes());
        let m = decode_marker(Kind::BACKUP_START, &out, Lsn(8)).unwrap();
        assert_eq!((m.start, m.label), (Lsn(0x100_0028), "nightly ✓"));
        assert_eq!(
            describe(Kind::BACKUP_END, &out, Lsn(8)).unwrap(),
            "start 0/1000028; label \"nightly ✓\""
        );
        assert!(describe(Kind::NOOP, &out, Lsn(8)).is_none());
        let e = decode_marker(Kind::BACKUP_END, &out[..7], Lsn(0x2000)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid BACKUP_END record at 0/2000"),
            "{e}"
        );
        out.push(0xFF);
        assert!(decode_marker(Kind::BACKUP_END, &out, Lsn(8)).is_err());
        encode_marker(Lsn(8), "", &mut out);
        out.resize(8 + MAX_LABEL_LEN + 1, b'a');
        assert!(decode_marker(Kind::BACKUP_END, &out, Lsn(8)).is_err());
    }

    #[test]
    fn labels_parse_and_bad_ones_say_why() {
        let text = "START WAL LOCATION: 0/1000028 (file 000000010000000000000001)\n\
                    CHECKPOINT LOCATION: 0/1000040\nLABEL: my label\n";
        assert_eq!(
            parse_label(text).unwrap(),
            BackupLabel {
                start: Lsn(0x100_0028),
                label: "my label".into()
            }
        );
        assert!(parse_label("LABEL: x\n").unwrap_err().contains("START WAL"));
        assert!(parse_label("START WAL LOCATION: zz\n")
            .unwrap_err()
            .contains("not an LSN"));
    }

    #[test]
    fn the_watch_takes_only_its_own_backup_end() {
        let w = BackupEndWatch::new(Some(BackupLabel {
            start: Lsn(0x1000),
            label: "a".into(),
        }));
        let mut p = Vec::new();
        encode_marker(Lsn(0x900), "other", &mut p);
        assert!(!w
            .observe(Kind::BACKUP_END, &p, Lsn(0x2000), Lsn(0x2020))
            .unwrap());
        encode_marker(Lsn(0x1000), "a", &mut p);
        assert!(!w
            .observe(Kind::BACKUP_START, &p, Lsn(0x2020), Lsn(0x2040))
            .unwrap());
        assert_eq!(w.reached(), None);
        assert!(w
            .observe(Kind::BACKUP_END, &p, Lsn(0x3000), Lsn(0x3028))
            .unwrap());
        assert_eq!(w.reached(), Some(Lsn(0x3028)));
        let none = BackupEndWatch::new(None);
        assert!(!none
            .observe(Kind::BACKUP_END, &p, Lsn(0x3000), Lsn(0x3028))
            .unwrap());
    }
}
