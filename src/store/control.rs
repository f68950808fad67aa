//! The control file, `data_dir/walden.control` (PostgreSQL's pg_control):
//! which checkpoint recovery starts from, the state the store was left in,
//! and the settings that can never change. 512 bytes with a crc32c, replaced
//! atomically (temporary file, fsync, rename, fsync of the directory), so it
//! is always the old or the new version, never half of each.
//!
//! ```text
//! offset size field
//!      0    8 magic               "WALDNCTL"
//!      8    4 control_version     1
//!     12    4 state               ClusterState (0..=5)
//!     16    8 system_identifier
//!     24    8 time                last update, seconds since the epoch
//!     32    8 checkpoint          LSN of the latest checkpoint record
//!     40    8 redo                its redo LSN: where recovery starts
//!     48    4 timeline
//!     52    4 prev_timeline
//!     56    8 checkpoint_time     seconds since the epoch
//!     64    8 min_recovery_point  (archive recovery, later; 0)
//!     72    8 wal_segment_size
//!     80    4 block_size          8192
//!     84    4 wal_block_size      4096
//!     88    4 data_checksum_version  0 off, 1 crc32c
//!     92    1 full_page_writes    at the latest checkpoint
//!     93    3 reserved            zeros
//!     96    8 term                the highest term this server has seen
//!                                 (0, as an older file has it: the
//!                                 timeline is the term); written >= timeline
//!    104    8 acknowledged_lsn    the highest LSN known flushed by a quorum
//!                                 of synchronous standbys: no WAL at or
//!                                 below it may ever be truncated (rewind)
//!    112  396 reserved            zeros
//!    508    4 crc                 crc32c of bytes 0..508
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use crate::io::file::{self, FileError, OpenMode, SegmentFile};
use crate::lsn::Lsn;

pub const CONTROL_FILE: &str = "walden.control";
pub const CONTROL_SIZE: usize = 512;
pub const CONTROL_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"WALDNCTL";
const CRC_AT: usize = CONTROL_SIZE - 4;

/// The state the store was left in (PostgreSQL's DBState).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterState {
    /// Created; the first checkpoint has not completed.
    StartingUp = 0,
    ShutDown = 1,
    ShuttingDown = 2,
    InCrashRecovery = 3,
    InProduction = 4,
    /// A standby's page store: kept up to date by replaying its primary's
    /// WAL, which it never writes to (PostgreSQL's "in archive recovery").
    InArchiveRecovery = 5,
}

impl ClusterState {
    fn from_u32(v: u32) -> Option<ClusterState> {
        Some(match v {
            0 => ClusterState::StartingUp,
            1 => ClusterState::ShutDown,
            2 => ClusterState::ShuttingDown,
            3 => ClusterState::InCrashRecovery,
            4 => ClusterState::InProduction,
            5 => ClusterState::InArchiveRecovery,
            _ => return None,
        })
    }

    /// pg_controldata's words.
    pub fn name(self) -> &'static str {
        match self {
            ClusterState::StartingUp => "starting up",
            ClusterState::ShutDown => "shut down",
            ClusterState::ShuttingDown => "shutting down",
            ClusterState::InCrashRecovery => "in crash recovery",
            ClusterState::InProduction => "in production",
            ClusterState::InArchiveRecovery => "in archive recovery",
        }
    }
}

impl fmt::Display for ClusterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlFile {
    pub system_identifier: u64,
    pub state: ClusterState,
    pub time: u64,
    pub checkpoint: Lsn,
    pub redo: Lsn,
    pub timeline: u32,
    pub prev_timeline: u32,
    pub checkpoint_time: u64,
    pub min_recovery_point: Lsn,
    pub wal_segment_size: u64,
    pub block_size: u32,
    pub wal_block_size: u32,
    pub data_checksum_version: u32,
    pub full_page_writes: bool,
    /// The highest term this server has seen (issue #15: every timeline is
    /// a term). 0 in a file written before terms: the timeline is the term.
    /// Read it with [`ControlFile::latest_term`]. A primary whose term is
    /// above its timeline was deposed by a newer primary.
    pub term: u64,
    /// The highest LSN this server knows a quorum of synchronous standbys
    /// flushed (the primary's quorum flush LSN, or on a standby the
    /// `commit` LSN its primary sent): the floor below which no WAL may
    /// ever be truncated. Written at checkpoints and restartpoints.
    pub acknowledged_lsn: Lsn,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("control file \"{}\" is invalid: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    /// A control file of another version (a newer walden's, most likely):
    /// its layout is not ours to judge, so nothing else about it is.
    #[error(
        "control file \"{}\" has version {found}, but this build of walden reads and writes \
         version {supported} only{} (run the walden release that wrote it; nothing was changed)",
        path.display(),
        if *damaged { " (or the file is damaged: its version 1 checksum does not match)" } else { "" }
    )]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
        /// The bytes do not pass version 1's checks either: the version
        /// field may be a damaged 1.
        damaged: bool,
    },
}

impl ControlFile {
    /// A control file for a new page store.
    pub fn new(wal_segment_size: u64, data_checksums: bool, full_page_writes: bool) -> ControlFile {
        ControlFile {
            system_identifier: new_system_identifier(),
            state: ClusterState::StartingUp,
            time: now_secs(),
            checkpoint: Lsn::INVALID,
            redo: Lsn::INVALID,
            timeline: crate::wal::TIMELINE,
            prev_timeline: crate::wal::TIMELINE,
            checkpoint_time: 0,
            min_recovery_point: Lsn::INVALID,
            wal_segment_size,
            block_size: crate::io::PAGE_SIZE as u32,
            wal_block_size: crate::io::BLOCK as u32,
            data_checksum_version: data_checksums as u32,
            full_page_writes,
            term: crate::wal::TIMELINE as u64,
            acknowledged_lsn: Lsn::INVALID,
        }
    }

    /// The highest term seen: the stored one, never below the timeline (a
    /// file from before terms stores 0).
    pub fn latest_term(&self) -> u64 {
        self.term.max(self.timeline as u64)
    }

    pub fn encode(&self) -> [u8; CONTROL_SIZE] {
        let mut b = [0u8; CONTROL_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&CONTROL_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.state as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.system_identifier.to_le_bytes());
        b[24..32].copy_from_slice(&self.time.to_le_bytes());
        b[32..40].copy_from_slice(&self.checkpoint.0.to_le_bytes());
        b[40..48].copy_from_slice(&self.redo.0.to_le_bytes());
        b[48..52].copy_from_slice(&self.timeline.to_le_bytes());
        b[52..56].copy_from_slice(&self.prev_timeline.to_le_bytes());
        b[56..64].copy_from_slice(&self.checkpoint_time.to_le_bytes());
        b[64..72].copy_from_slice(&self.min_recovery_point.0.to_le_bytes());
        b[72..80].copy_from_slice(&self.wal_segment_size.to_le_bytes());
        b[80..84].copy_from_slice(&self.block_size.to_le_bytes());
        b[84..88].copy_from_slice(&self.wal_block_size.to_le_bytes());
        b[88..92].copy_from_slice(&self.data_checksum_version.to_le_bytes());
        b[92] = self.full_page_writes as u8;
        b[96..104].copy_from_slice(&self.term.to_le_bytes());
        b[104..112].copy_from_slice(&self.acknowledged_lsn.0.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks the bytes of a control file (any length: a
    /// truncated or padded file is refused, never read past).
    pub fn decode(b: &[u8]) -> Result<ControlFile, String> {
        if b.len() != CONTROL_SIZE {
            return Err(format!("it is {} bytes, expected {CONTROL_SIZE}", b.len()));
        }
        if &b[0..8] != MAGIC {
            return Err("wrong magic number: this is not a walden control file".into());
        }
        let stored = u32::from_le_bytes(b[CRC_AT..].try_into().unwrap());
        let computed = crc32c::crc32c(&b[..CRC_AT]);
        if stored != computed {
            return Err(format!(
                "incorrect checksum: stored {stored:08X}, calculated {computed:08X}"
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != CONTROL_VERSION {
            return Err(format!(
                "control version {version}, but this build reads only version {CONTROL_VERSION}"
            ));
        }
        let state = ClusterState::from_u32(u32_at(12))
            .ok_or_else(|| format!("unknown state {}", u32_at(12)))?;
        if b[92] > 1 || b[93..96].iter().chain(&b[112..CRC_AT]).any(|&x| x != 0) {
            return Err("reserved bytes are not zero".into());
        }
        Ok(ControlFile {
            system_identifier: u64_at(16),
            state,
            time: u64_at(24),
            checkpoint: Lsn(u64_at(32)),
            redo: Lsn(u64_at(40)),
            timeline: u32_at(48),
            prev_timeline: u32_at(52),
            checkpoint_time: u64_at(56),
            min_recovery_point: Lsn(u64_at(64)),
            wal_segment_size: u64_at(72),
            block_size: u32_at(80),
            wal_block_size: u32_at(84),
            data_checksum_version: u32_at(88),
            full_page_writes: b[92] == 1,
            term: u64_at(96),
            acknowledged_lsn: Lsn(u64_at(104)),
        })
    }
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(CONTROL_FILE)
}

/// Reads `data_dir/walden.control`; `None` if there is none.
pub fn read(data_dir: &Path) -> Result<Option<ControlFile>, ControlError> {
    let p = path(data_dir);
    let bytes = match file::read_file(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FileError::new("read file", &p, e).into()),
    };
    match ControlFile::decode(&bytes) {
        Ok(c) => Ok(Some(c)),
        Err(what) => match declared_version(&bytes) {
            // Before the layout's own complaint: another version may have
            // another size or checksum, and "incorrect checksum" would
            // hide what the operator needs to know.
            Some(found) if found != CONTROL_VERSION => Err(ControlError::Version {
                path: p,
                found,
                supported: CONTROL_VERSION,
                damaged: !what.starts_with("control version"),
            }),
            _ => Err(ControlError::Invalid { path: p, what }),
        },
    }
}

/// The version a file with walden's magic says it has (bytes 8..12), which
/// every version of the layout keeps where version 1 has it.
fn declared_version(b: &[u8]) -> Option<u32> {
    (b.len() >= 12 && &b[0..8] == MAGIC).then(|| u32::from_le_bytes(b[8..12].try_into().unwrap()))
}

/// Replaces `data_dir/walden.control` atomically and durably.
pub fn write(data_dir: &Path, c: &ControlFile, fsync: bool) -> Result<(), ControlError> {
    let p = path(data_dir);
    let tmp = data_dir.join(format!("{CONTROL_FILE}.tmp"));
    let mut c = *c;
    c.time = now_secs();
    // Terms only grow, and a timeline is a term: never store one below it.
    c.term = c.latest_term();
    let bytes = c.encode();
    // A temporary left by an interrupted write is never trusted: start afresh.
    match file::remove_file(&tmp) {
        Err(e) if e.source.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let f = SegmentFile::open(
        &tmp,
        OpenMode {
            write: true,
            create_new: true,
            ..Default::default()
        },
    )?;
    f.write_all_at(&bytes, 0)?;
    if fsync {
        // IMPORTANT: contents durable before the rename makes them current,
        // and the rename durable before anyone relies on the new checkpoint.
        f.fsync()?;
    }
    drop(f);
    file::rename(&tmp, &p)?;
    if fsync {
        file::sync_dir(data_dir)?;
    }
    Ok(())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// PostgreSQL's recipe: seconds in the high 32 bits, then microseconds, then
/// 12 bits of the process id, so that two stores created in the same second
/// on different hosts differ.
fn new_system_identifier() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_secs() << 32)
        | ((now.subsec_micros() as u64) << 12)
        | (std::process::id() as u64 & 0xFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_none());
        let mut c = ControlFile::new(16 << 20, true, true);
        c.state = ClusterState::InProduction;
        c.checkpoint = Lsn(0x100_0040);
        c.redo = Lsn(0x100_0028);
        write(dir.path(), &c, true).unwrap();
        let got = read(dir.path()).unwrap().unwrap();
        assert_eq!(got.checkpoint, c.checkpoint);
        assert_eq!(got.redo, c.redo);
        assert_eq!(got.state, ClusterState::InProduction);
        assert_eq!(got.system_identifier, c.system_identifier);
        assert_eq!(std::fs::metadata(path(dir.path())).unwrap().len(), 512);
        assert!(!dir.path().join("walden.control.tmp").exists());
    }

    #[test]
    fn term_and_acknowledged_lsn_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ControlFile::new(16 << 20, true, true);
        assert_eq!(c.latest_term(), 1);
        c.term = 7;
        c.acknowledged_lsn = Lsn(0x3_0000_0128);
        let b = c.encode();
        assert_eq!(&b[96..104], &7u64.to_le_bytes());
        assert_eq!(&b[104..112], &0x3_0000_0128u64.to_le_bytes());
        assert_eq!(ControlFile::decode(&b).unwrap(), c);
        write(dir.path(), &c, true).unwrap();
        let got = read(dir.path()).unwrap().unwrap();
        assert_eq!((got.term, got.latest_term()), (7, 7));
        assert_eq!(got.acknowledged_lsn, Lsn(0x3_0000_0128));
        // Written, a term below the timeline is raised to it.
        c.timeline = 9;
        c.term = 2;
        write(dir.path(), &c, true).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().term, 9);
    }

    #[test]
    fn a_file_from_before_terms_reads_term_zero_as_its_timeline() {
        // An older walden left bytes 96..112 zero (they were reserved).
        let mut c = ControlFile::new(16 << 20, true, true);
        c.timeline = 3;
        c.term = 0;
        let b = c.encode();
        assert!(b[93..CRC_AT].iter().all(|&x| x == 0));
        let got = ControlFile::decode(&b).unwrap();
        assert_eq!(got.term, 0);
        assert_eq!(got.latest_term(), 3, "the timeline is the term");
        assert_eq!(got.acknowledged_lsn, Lsn::INVALID);
        // A non-zero byte left in what is still reserved is refused.
        let mut bad = b;
        bad[200] = 1;
        let crc = crc32c::crc32c(&bad[..CRC_AT]);
        bad[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            ControlFile::decode(&bad).unwrap_err(),
            "reserved bytes are not zero"
        );
    }

    #[test]
    fn another_version_is_named_before_the_layout_is_judged() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        let mut b = ControlFile::new(16 << 20, true, true).encode();
        b[8..12].copy_from_slice(&99u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, b).unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "control file \"{}\" has version 99, but this build of walden reads and writes \
                 version 1 only (run the walden release that wrote it; nothing was changed)",
                p.display()
            )
        );
        // A longer file of a newer layout: still its version, not its size.
        let mut longer = b.to_vec();
        longer.resize(1024, 0);
        std::fs::write(&p, &longer).unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("has version 99"), "{e}");
        assert!(e.contains("or the file is damaged"), "{e}");
    }

    #[test]
    fn damage_is_refused_with_a_reason() {
        let c = ControlFile::new(16 << 20, true, true);
        let good = c.encode();
        assert_eq!(ControlFile::decode(&good).unwrap(), c);
        for pos in [0usize, 9, 13, 40, 100, 300, 508] {
            let mut b = good;
            b[pos] ^= 1;
            let e = ControlFile::decode(&b).unwrap_err();
            assert!(!e.is_empty());
        }
        let e = ControlFile::decode(&good[..100]).unwrap_err();
        assert_eq!(e, "it is 100 bytes, expected 512");
        let mut b = good;
        b[300] = 1;
        assert!(ControlFile::decode(&b)
            .unwrap_err()
            .contains("incorrect checksum"));
    }
}
