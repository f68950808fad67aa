//! Rewinding a diverged server (PostgreSQL's pg_rewind), the parts that
//! read and change a stopped target's directories; `walden rewind`
//! (tools/rewind.rs) drives them and talks to the source.
//!
//! walden is simpler than PostgreSQL here: every page change is a WAL
//! record naming its page (PAGE_WRITE, PAGE_IMAGE), and replay skips a
//! record on a page whose LSN is newer. So the target's pages that its WAL
//! changed at or after the divergence point are fetched from the source
//! whole, the target's WAL after the divergence point is cut off, the
//! source's WAL from there is streamed in, and the control file sends the
//! next start back to the last common checkpoint: replay from its redo
//! point through the source's WAL makes every page the source's.
//!
//! A rewind cut short must not start as anything: [`REWIND_MARKER`] (with
//! the [`RewindPlan`], from which a second run resumes) is
//! written durably before the first change and removed after the control
//! file, the last one; a store open refuses while it exists
//! ([`check_not_in_progress`]).
//!
//! What it is not: no relation is truncated to the source's length (pages
//! the source has never written are written as zeros, a new page), and a
//! source whose history forks from the target's more than one timeline
//! back is not followed here (the source's WAL is streamed from the
//! divergence point on its own timeline).

use std::collections::BTreeSet;
use std::path::Path;

use crate::io::file::{self, FileError};
use crate::lsn::{self, Lsn};
use crate::record::Kind;
use crate::wal::reader::WalReader;
use crate::wal::timeline::HistoryEntry;

use super::page::PageTag;
use super::records;
use super::StoreError;

/// Present in the data directory from the first change a rewind makes to
/// the end; a store refuses to open while it is there.
pub const REWIND_MARKER: &str = "rewind_in_progress";

/// Refuses a store open while a rewind is unfinished.
pub fn check_not_in_progress(data_dir: &Path) -> Result<(), StoreError> {
    let marker = data_dir.join(REWIND_MARKER);
    if file::exists(&marker) {
        return Err(StoreError::Recovery(format!(
            "a rewind of this directory did not finish (\"{}\" exists): its pages and WAL \
             are a mix of two servers; run `walden rewind` again, or take a new base backup",
            marker.display()
        )));
    }
    Ok(())
}

/// What a rewind decided before its first change, kept in
/// [`REWIND_MARKER`]: a rewind cut short is resumed from it (the target's
/// WAL after the divergence point, which named the pages, may be gone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewindPlan {
    pub source_timeline: u32,
    pub target_timeline: u32,
    pub divergence: Lsn,
    pub checkpoint: CommonCheckpoint,
    pub pages: BTreeSet<PageTag>,
}

impl RewindPlan {
    pub fn encode(&self) -> String {
        let k = &self.checkpoint;
        let mut t = format!(
            "# walden rewind in progress: do not start this directory; run walden rewind again\n\
             source_timeline {}\ntarget_timeline {}\ndivergence {}\ncheckpoint {} {} {} {} {}\n",
            self.source_timeline,
            self.target_timeline,
            self.divergence,
            k.lsn,
            k.redo,
            k.timeline,
            k.time_us,
            k.full_page_writes as u8
        );
        for p in &self.pages {
            t.push_str(&format!("page {} {}\n", p.rel, p.block));
        }
        t
    }

    pub fn decode(text: &str) -> Result<RewindPlan, String> {
        let mut plan = RewindPlan {
            source_timeline: 0,
            target_timeline: 0,
            divergence: Lsn::INVALID,
            checkpoint: CommonCheckpoint {
                lsn: Lsn::INVALID,
                redo: Lsn::INVALID,
                timeline: 0,
                time_us: 0,
                full_page_writes: true,
            },
            pages: BTreeSet::new(),
        };
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let f: Vec<&str> = line.split(' ').collect();
            let bad = || format!("cannot parse the line {line:?}");
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or_else(bad);
            let lsn = |i: usize| f.get(i).and_then(|v| v.parse::<Lsn>().ok()).ok_or_else(bad);
            match f[0] {
                "source_timeline" => plan.source_timeline = num(1)? as u32,
                "target_timeline" => plan.target_timeline = num(1)? as u32,
                "divergence" => plan.divergence = lsn(1)?,
                "checkpoint" => {
                    plan.checkpoint = CommonCheckpoint {
                        lsn: lsn(1)?,
                        redo: lsn(2)?,
                        timeline: num(3)? as u32,
                        time_us: num(4)?,
                        full_page_writes: num(5)? == 1,
                    }
                }
                "page" => {
                    plan.pages
                        .insert(PageTag::new(num(1)? as u32, num(2)? as u32));
                }
                _ => return Err(bad()),
            }
        }
        if plan.source_timeline == 0
            || !plan.divergence.is_valid()
            || !plan.checkpoint.lsn.is_valid()
        {
            return Err("a timeline, the divergence point or the checkpoint is missing".into());
        }
        Ok(plan)
    }
}

/// The plan of an unfinished rewind, if its marker exists.
pub fn read_marker(data_dir: &Path) -> Result<Option<RewindPlan>, StoreError> {
    let path = data_dir.join(REWIND_MARKER);
    let Some(text) = file::read_optional_text(&path).map_err(StoreError::Recovery)? else {
        return Ok(None);
    };
    RewindPlan::decode(&text).map(Some).map_err(|what| {
        StoreError::Recovery(format!(
            "invalid data in file \"{}\": {what}; take a new base backup",
            path.display()
        ))
    })
}

/// The truncation floor: the target's WAL at or after `s` is discarded,
/// so `s` must not lie below the highest LSN a quorum acknowledged
/// (`floor`; [`Lsn::INVALID`] when none is known). Records below `s` are
/// kept: refused when `floor > s`.
pub fn check_truncation_floor(s: Lsn, floor: Lsn) -> Result<(), String> {
    if floor > s {
        return Err(format!(
            "would discard WAL at or below {floor} that was acknowledged by a quorum; refusing \
             (the servers diverged at {s})"
        ));
    }
    Ok(())
}

/// The divergence point: where `target_timeline` ends in the source's
/// history (`source_history`, the source timeline's history file), or
/// `None` if the source's history does not contain it.
pub fn divergence_point(target_timeline: u32, source_history: &[HistoryEntry]) -> Option<Lsn> {
    source_history
        .iter()
        .find(|e| e.parent == target_timeline)
        .map(|e| e.switch)
}

/// What the scan of the target's WAL found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetScan {
    /// The last checkpoint record wholly before the divergence point.
    pub checkpoint: Option<CommonCheckpoint>,
    /// Every page a record at or after the divergence point touched.
    pub pages: BTreeSet<PageTag>,
    /// Records at or after the divergence point.
    pub diverged_records: u64,
    /// The end of the target's valid WAL.
    pub end: Lsn,
    /// The first LSN of the retained WAL (where the scan began).
    pub start: Lsn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonCheckpoint {
    pub lsn: Lsn,
    pub redo: Lsn,
    pub timeline: u32,
    pub time_us: u64,
    pub full_page_writes: bool,
}

/// Reads the target's WAL (`wal_dir`, as `timeline` sees it) from its
/// first retained record to its end: the last checkpoint before `s`, and
/// the pages changed at or after `s`.
pub fn scan_target(
    wal_dir: &Path,
    segment_size: u64,
    timeline: u32,
    s: Lsn,
) -> Result<TargetScan, StoreError> {
    let start = crate::wal::segments::read_wal_start(wal_dir)?.ok_or_else(|| {
        StoreError::Recovery(format!(
            "{} has no {}: cannot tell where the target's WAL starts",
            wal_dir.display(),
            crate::wal::segments::WAL_START_FILE
        ))
    })?;
    let mut reader = WalReader::new(wal_dir, segment_size, timeline, start, None);
    let mut out = TargetScan {
        checkpoint: None,
        pages: BTreeSet::new(),
        diverged_records: 0,
        end: start,
        start,
    };
    while let Some(rec) = reader.next_record()? {
        let end = rec.end_lsn();
        out.end = end;
        if rec.lsn >= s {
            out.diverged_records += 1;
        }
        match rec.kind {
            Kind::PAGE_WRITE if rec.lsn >= s => {
                out.pages
                    .insert(records::decode_page_write(rec.payload, rec.lsn)?.tag);
            }
            Kind::PAGE_IMAGE if rec.lsn >= s => {
                out.pages
                    .insert(records::decode_page_image(rec.payload, rec.lsn)?.tag);
            }
            Kind::CHECKPOINT_ONLINE | Kind::CHECKPOINT_SHUTDOWN if end <= s => {
                let c = records::decode_checkpoint(rec.kind, rec.payload, rec.lsn)?;
                out.checkpoint = Some(CommonCheckpoint {
                    lsn: rec.lsn,
                    redo: c.redo,
                    timeline: c.timeline,
                    time_us: c.time_us,
                    full_page_writes: c.full_page_writes,
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Cuts the target's WAL of `timeline` off at `s`: zeros from `s` to the
/// end of its segment, removes the later segments of that timeline, and
/// makes both durable. The bytes before `s` are the servers' common WAL.
pub fn truncate_wal(
    wal_dir: &Path,
    timeline: u32,
    s: Lsn,
    segment_size: u64,
    fsync: bool,
) -> Result<(), FileError> {
    let segno = s.segno(segment_size);
    let path = wal_dir.join(lsn::segment_file_name(timeline, segno, segment_size));
    if file::exists(&path) {
        let f = file::SegmentFile::open(
            &path,
            file::OpenMode {
                write: true,
                ..Default::default()
            },
        )?;
        let from = s.segment_offset(segment_size);
        let zeros = vec![0u8; (segment_size - from) as usize];
        f.write_all_at(&zeros, from)?;
        if fsync {
            // IMPORTANT: the discarded records are gone before the
            // source's WAL is written after them.
            f.fsync()?;
        }
    }
    for name in file::list_files(wal_dir)? {
        if let Some((t, n)) = lsn::parse_segment_file_name(&name, segment_size) {
            if t == timeline && n > segno {
                file::remove_file(&wal_dir.join(name))?;
            }
        }
    }
    if fsync {
        file::sync_dir(wal_dir)?;
    }
    Ok(())
}

/// The switch segment of the source's timeline `new`: the common prefix
/// up to `s` from the target's file of `old`, zeros after (as promotion
/// copies it, `Wal::open_promoting`). Written whole, synced, renamed into
/// place.
pub fn copy_switch_segment(
    wal_dir: &Path,
    old: u32,
    new: u32,
    s: Lsn,
    segment_size: u64,
    fsync: bool,
) -> Result<(), FileError> {
    let segno = s.segno(segment_size);
    let used = s.segment_offset(segment_size) as usize;
    let mut whole = vec![0u8; segment_size as usize];
    if used > 0 {
        let old_path = wal_dir.join(lsn::segment_file_name(old, segno, segment_size));
        let f = file::SegmentFile::open(&old_path, Default::default())?;
        let got = f.read_at(&mut whole[..used], 0)?;
        if got < used {
            return Err(FileError::new(
                "read file",
                &old_path,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("shorter than the divergence point {s}"),
                ),
            ));
        }
    }
    file::replace_durably(
        wal_dir,
        &lsn::segment_file_name(new, segno, segment_size),
        &whole,
        fsync,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_refuses_only_acknowledged_wal_past_the_divergence() {
        assert!(check_truncation_floor(Lsn(0x3000), Lsn::INVALID).is_ok());
        assert!(check_truncation_floor(Lsn(0x3000), Lsn(0x2000)).is_ok());
        assert!(check_truncation_floor(Lsn(0x3000), Lsn(0x3000)).is_ok());
        let e = check_truncation_floor(Lsn(0x3000), Lsn(0x3008)).unwrap_err();
        assert!(
            e.starts_with(
                "would discard WAL at or below 0/3008 that was acknowledged by a quorum; refusing"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_plan_round_trips_through_the_marker() {
        let plan = RewindPlan {
            source_timeline: 2,
            target_timeline: 1,
            divergence: Lsn(0x1_2345_6789),
            checkpoint: CommonCheckpoint {
                lsn: Lsn(0x100_0040),
                redo: Lsn(0x100_0028),
                timeline: 1,
                time_us: 1_700_000_000_123_456,
                full_page_writes: true,
            },
            pages: [PageTag::new(1, 0), PageTag::new(7, 1 << 20)]
                .into_iter()
                .collect(),
        };
        assert_eq!(RewindPlan::decode(&plan.encode()).unwrap(), plan);
        assert!(RewindPlan::decode("page 1 x\n").is_err());
        assert!(RewindPlan::decode("# nothing\n").is_err());
    }

    #[test]
    fn the_divergence_is_where_the_target_timeline_ends_in_the_source_history() {
        let h = |parent, switch| HistoryEntry {
            parent,
            switch: Lsn(switch),
            reason: String::new(),
        };
        let hist = vec![h(1, 0x100), h(2, 0x500)];
        assert_eq!(divergence_point(1, &hist), Some(Lsn(0x100)));
        assert_eq!(divergence_point(2, &hist), Some(Lsn(0x500)));
        assert_eq!(divergence_point(4, &hist), None);
    }

    #[test]
    fn truncation_zeros_the_tail_and_removes_later_segments() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 1 << 16;
        for n in 1..=3u64 {
            std::fs::write(
                dir.path().join(lsn::segment_file_name(1, n, seg)),
                vec![0xAB; seg as usize],
            )
            .unwrap();
        }
        let s = Lsn(2 * seg + 100);
        copy_switch_segment(dir.path(), 1, 2, s, seg, true).unwrap();
        truncate_wal(dir.path(), 1, s, seg, true).unwrap();
        let two = std::fs::read(dir.path().join(lsn::segment_file_name(1, 2, seg))).unwrap();
        assert!(two[..100].iter().all(|&b| b == 0xAB));
        assert!(two[100..].iter().all(|&b| b == 0));
        assert!(!dir.path().join(lsn::segment_file_name(1, 3, seg)).exists());
        assert!(dir.path().join(lsn::segment_file_name(1, 1, seg)).exists());
        let new = std::fs::read(dir.path().join(lsn::segment_file_name(2, 2, seg))).unwrap();
        assert_eq!(new, two);
        assert!(check_not_in_progress(dir.path()).is_ok());
        std::fs::write(dir.path().join(REWIND_MARKER), b"").unwrap();
        assert!(check_not_in_progress(dir.path())
            .unwrap_err()
            .to_string()
            .contains("did not finish"));
    }
}
