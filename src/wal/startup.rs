//! Startup: find where valid WAL ends, make sure nothing after it can ever be
//! mistaken for WAL, and hand the engine the position to continue from.
//!
//! After a crash, bytes past the end of valid WAL may include complete,
//! correctly-checksummed records that were written but never acknowledged
//! (their sync never returned), possibly after a hole. If new records later
//! ended exactly where one of those begins, a reader would run on into them.
//! So before appending resumes, the rest of the end's segment is zeroed and
//! synced, and every later segment file is removed (the preparer recreates
//! them). Recycled segments need no such care: their records carry other LSNs.

use std::path::Path;
use std::time::Instant;

use crate::io::aligned::AlignedBuf;
use crate::io::file::{FileError, OpenMode, SegmentFile};
use crate::io::BLOCK;
use crate::lsn::Lsn;

use super::reader::{EndOfWal, Record, WalReader};
use super::segments::Segments;

/// What the scan found.
pub struct EndOfScan {
    pub end: Lsn,
    pub reason: Option<EndOfWal>,
    pub records: u64,
}

/// Called with every valid record the startup scan passes, in order (the
/// page store replays them as they go by: one pass over the WAL). An error
/// stops the scan and the open.
pub type ScanObserver<'a> = &'a mut dyn FnMut(&Record<'_>) -> Result<(), String>;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Observer(String),
}

/// Reads from `start` to the end of valid WAL, logging progress every few
/// seconds on a long scan. With `sync`, each segment is made durable before
/// it is read, so every record the observer sees is durable.
pub fn scan(
    dir: &Path,
    segment_size: u64,
    timeline: u32,
    start: Lsn,
    sync: bool,
    mut observer: Option<ScanObserver<'_>>,
) -> Result<EndOfScan, ScanError> {
    let mut reader = WalReader::new(dir, segment_size, timeline, start, None).sync_on_open(sync);
    let mut records = 0u64;
    let began = Instant::now();
    let mut last_report = began;
    while let Some(rec) = reader.next_record()? {
        if let Some(obs) = observer.as_mut() {
            obs(&rec).map_err(ScanError::Observer)?;
        }
        records += 1;
        if records % 4096 == 0 && observer.is_none() && last_report.elapsed().as_secs() >= 5 {
            last_report = Instant::now();
            let bytes = reader.position().0 - start.0;
            tracing::info!(
                "scanning WAL: at {} ({} records, {:.1} MB/s)",
                reader.position(),
                records,
                bytes as f64 / 1e6 / began.elapsed().as_secs_f64()
            );
        }
    }
    Ok(EndOfScan {
        end: reader.position(),
        reason: reader.end().cloned(),
        records,
    })
}

/// Zeroes [end, end of its segment) where it is not already zero, syncs, and
/// removes every later segment. Returns (bytes zeroed, segments removed).
pub fn clear_after(segments: &Segments, end: Lsn) -> Result<(u64, u64), FileError> {
    let seg_size = segments.segment_size();
    let segno = end.segno(seg_size);
    let path = segments.path(segno);
    let mut zeroed = 0u64;
    if crate::io::file::exists(&path) {
        let f = SegmentFile::open(
            &path,
            OpenMode {
                write: true,
                ..Default::default()
            },
        )?;
        let file_len = f.len()?.min(seg_size);
        let chunk_len = 1u64 << 20;
        let zeros = vec![0u8; chunk_len as usize];
        let mut buf = vec![0u8; chunk_len as usize];
        let mut off = end.segment_offset(seg_size);
        while off < file_len {
            let n = chunk_len.min(file_len - off) as usize;
            let got = f.read_at(&mut buf[..n], off)?;
            if buf[..got].iter().any(|&b| b != 0) {
                f.write_all_at(&zeros[..got], off)?;
                zeroed += got as u64;
            }
            off += n as u64;
        }
        if zeroed > 0 {
            // IMPORTANT: durable before any new record can be acknowledged.
            f.datasync()?;
        }
    }
    let removed = segments.remove_after(segno)?;
    Ok((zeroed, removed))
}

/// The bytes of the block containing `end` that precede it: the flusher's
/// first write rewrites that block and must carry them unchanged.
pub fn read_tail(segments: &Segments, end: Lsn) -> Result<Vec<u8>, FileError> {
    let block_start = end.align_down(BLOCK as u64);
    let n = (end.0 - block_start.0) as usize;
    if n == 0 {
        return Ok(Vec::new());
    }
    let seg_size = segments.segment_size();
    let f = SegmentFile::open(&segments.path(end.segno(seg_size)), OpenMode::default())?;
    let mut buf = AlignedBuf::zeroed(BLOCK);
    let got = f.read_at(&mut buf[..], block_start.segment_offset(seg_size))?;
    if got < n {
        return Err(FileError::new(
            "read the last WAL block of",
            f.path(),
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file is shorter than the valid WAL",
            ),
        ));
    }
    Ok(buf[..n].to_vec())
}

/// fdatasync of every segment from `first` to `last` that exists, then of the
/// directory: WAL read back at startup is durable before appending resumes.
pub fn sync_segments(segments: &Segments, first: u64, last: u64) -> Result<(), FileError> {
    for segno in first..=last {
        let path = segments.path(segno);
        if crate::io::file::exists(&path) {
            SegmentFile::open(&path, OpenMode::default())?.datasync()?;
        }
    }
    crate::io::file::sync_dir(segments.dir())
}
