//! Timelines: PostgreSQL's timeline history files and which timeline's
//! file holds a segment.
//!
//! A WAL starts on timeline 1, which has no history file. Promotion starts
//! timeline N+1 at the switch point (the end of the WAL replayed so far) and
//! writes `%08X.history` in the WAL directory: the parent's lines first, then
//! `parentTLI<TAB>X/Y<TAB>reason` (PostgreSQL's `writeTimeLineHistory`),
//! through a temporary file, fsync, rename and a directory fsync.
//!
//! Segment files keep the timeline they were written on in their names.
//! The segment holding a switch point exists under both timelines; the new
//! timeline's copy (the old one's used prefix, then the new timeline's
//! records) is the authoritative one. So segment S of the WAL as timeline T
//! sees it is in the file of the newest timeline in T's history that began
//! at or before S ([`TimelineMap::timeline_of`]).
//!
//! A walsender streams a timeline of its history up to its switch point
//! and names the next one (TimelineEnd); its standby then stores the new
//! timeline's history file and moves its WAL to it (`RawInserter::follow_timeline`).

use std::path::{Path, PathBuf};

use crate::io::file::{self, FileError};
use crate::lsn::{self, Lsn};

/// The reason a promotion writes, as PostgreSQL's for a promotion without
/// a recovery target.
pub const PROMOTE_REASON: &str = "no recovery target specified";

/// The payload of an END_OF_RECOVERY record: the new timeline, then the
/// previous one, each u32 little-endian.
pub fn encode_end_of_recovery(timeline: u32, prev_timeline: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&timeline.to_le_bytes());
    b[4..].copy_from_slice(&prev_timeline.to_le_bytes());
    b
}

/// (timeline, previous timeline) of an END_OF_RECOVERY payload.
pub fn decode_end_of_recovery(payload: &[u8]) -> Option<(u32, u32)> {
    if payload.len() != 8 {
        return None;
    }
    let u = |i: usize| u32::from_le_bytes(payload[i..i + 4].try_into().unwrap());
    Some((u(0), u(4)))
}

/// One line of a history file: timeline `parent` ended at `switch`, where
/// its child began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub parent: u32,
    pub switch: Lsn,
    pub reason: String,
}

/// `%08X.history`, PostgreSQL's `TLHistoryFileName`.
pub fn history_file_name(timeline: u32) -> String {
    format!("{timeline:08X}.history")
}

/// The timeline of a history file's name, if it is one.
pub fn parse_history_file_name(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(".history")?;
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

fn bad(path: &Path, why: String) -> FileError {
    FileError::new(
        "parse timeline history file",
        path,
        std::io::Error::new(std::io::ErrorKind::InvalidData, why),
    )
}

/// The history of `timeline` (its ancestors' switch points, oldest first):
/// empty for timeline 1. A missing file for a later timeline is an error.
pub fn read_history(dir: &Path, timeline: u32) -> Result<Vec<HistoryEntry>, FileError> {
    if timeline <= 1 {
        return Ok(Vec::new());
    }
    let path = dir.join(history_file_name(timeline));
    let text = file::read_file(&path).map_err(|e| FileError::new("read file", &path, e))?;
    parse_history(&String::from_utf8_lossy(&text), &path)
}

/// The lines of a history file's text (as fetched from another server);
/// the error says what is wrong with it.
pub fn parse_history_bytes(bytes: &[u8]) -> Result<Vec<HistoryEntry>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    parse_history(text, Path::new("(fetched)")).map_err(|e| e.to_string())
}

/// What the history of a server on timeline `current` says of a timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimelineFate {
    /// It is `current`: it has not ended.
    Current,
    /// An ancestor: it ended at `switch`, where `next` began.
    Ended { switch: Lsn, next: u32 },
    /// Not in the history.
    Unknown,
}

/// Where `timeline` ends in the history of `current` (`history`, its
/// history file's lines, oldest first).
pub fn fate_of(timeline: u32, current: u32, history: &[HistoryEntry]) -> TimelineFate {
    if timeline == current {
        return TimelineFate::Current;
    }
    match history.iter().position(|e| e.parent == timeline) {
        Some(i) => TimelineFate::Ended {
            switch: history[i].switch,
            next: history.get(i + 1).map_or(current, |e| e.parent),
        },
        None => TimelineFate::Unknown,
    }
}

/// PostgreSQL's `readTimeLineHistory`: blank lines and `#` comments are
/// skipped; parent timelines must increase and stay below the file's own.
pub fn parse_history(text: &str, path: &Path) -> Result<Vec<HistoryEntry>, FileError> {
    let mut out: Vec<HistoryEntry> = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(3, '\t');
        let parent = fields
            .next()
            .and_then(|f| f.trim().parse::<u32>().ok())
            .ok_or_else(|| bad(path, format!("syntax error in history file: {line}")))?;
        let switch = fields
            .next()
            .and_then(|f| f.trim().parse::<Lsn>().ok())
            .ok_or_else(|| bad(path, format!("syntax error in history file: {line}")))?;
        if let Some(prev) = out.last() {
            if parent <= prev.parent || switch < prev.switch {
                return Err(bad(
                    path,
                    "invalid data in history file: timeline IDs must be in increasing sequence"
                        .into(),
                ));
            }
        }
        out.push(HistoryEntry {
            parent,
            switch,
            reason: fields.next().unwrap_or("").trim_end().to_string(),
        });
    }
    Ok(out)
}

/// The newest timeline with a history file in `dir`, or 1.
pub fn latest_timeline(dir: &Path) -> Result<u32, FileError> {
    Ok(file::list_files(dir)?
        .iter()
        .filter_map(|n| parse_history_file_name(n))
        .max()
        .unwrap_or(1)
        .max(1))
}

/// [`latest_timeline`], or 1 when the directory cannot be listed (a reader
/// then reports the missing segment itself).
pub fn current(dir: &Path) -> u32 {
    latest_timeline(dir).unwrap_or(1)
}

/// Writes `new`'s history file durably: `parent`'s lines, then
/// `parent\tswitch\treason`. Temporary file, fsync, rename, directory
/// fsync: a crash leaves the old state or the whole file.
pub fn write_history(
    dir: &Path,
    new: u32,
    parent: u32,
    switch: Lsn,
    reason: &str,
    fsync: bool,
) -> Result<PathBuf, FileError> {
    assert!(
        new > parent,
        "a new timeline {new} must follow its parent {parent}"
    );
    let mut text = String::new();
    for e in read_history(dir, parent)? {
        text.push_str(&format!("{}\t{}\t{}\n", e.parent, e.switch, e.reason));
    }
    text.push_str(&format!("{parent}\t{switch}\t{reason}\n"));
    // IMPORTANT: durable before anything is written on the new timeline.
    file::replace_durably(dir, &history_file_name(new), text.as_bytes(), fsync)
}

/// Stores a history file fetched from another server (a standby's or a
/// base backup's copy of its primary's history), durably, after checking
/// that it parses and ends with the switch to `timeline`'s parent.
pub fn store_history(
    dir: &Path,
    timeline: u32,
    bytes: &[u8],
    fsync: bool,
) -> Result<PathBuf, FileError> {
    let path = dir.join(history_file_name(timeline));
    let text = std::str::from_utf8(bytes)
        .map_err(|e| bad(&path, format!("history file is not UTF-8: {e}")))?;
    let entries = parse_history(text, &path)?;
    if !entries.last().is_some_and(|e| e.parent < timeline) {
        return Err(bad(
            &path,
            format!("history file does not end with the switch to timeline {timeline}"),
        ));
    }
    file::replace_durably(dir, &history_file_name(timeline), bytes, fsync)
}

/// Which timeline's file holds each segment, as one timeline sees the WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineMap {
    current: u32,
    /// (timeline, first segment of it), oldest first; the first is (its
    /// root, 0).
    begins: Vec<(u32, u64)>,
}

impl TimelineMap {
    /// A map for a WAL of one timeline (no history).
    pub fn single(timeline: u32) -> TimelineMap {
        TimelineMap {
            current: timeline,
            begins: vec![(timeline, 0)],
        }
    }

    /// The map of `timeline` from its history file in `dir`.
    pub fn load(dir: &Path, timeline: u32, segment_size: u64) -> Result<TimelineMap, FileError> {
        let history = read_history(dir, timeline)?;
        Ok(TimelineMap::from_history(timeline, &history, segment_size))
    }

    /// [`TimelineMap::load`], or the one timeline alone when its history
    /// cannot be read (a reader then finds what that timeline's files hold).
    pub fn load_or_single(dir: &Path, timeline: u32, segment_size: u64) -> TimelineMap {
        TimelineMap::load(dir, timeline, segment_size).unwrap_or_else(|e| {
            tracing::warn!("{e}: reading timeline {timeline}'s own segments only");
            TimelineMap::single(timeline)
        })
    }

    pub fn from_history(timeline: u32, history: &[HistoryEntry], segment_size: u64) -> TimelineMap {
        let mut begins = Vec::with_capacity(history.len() + 1);
        let mut begin = 0;
        for e in history {
            begins.push((e.parent, begin));
            begin = e.switch.segno(segment_size);
        }
        begins.push((timeline, begin));
        TimelineMap {
            current: timeline,
            begins,
        }
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    /// Whether `timeline` is this one or one of its ancestors.
    pub fn contains(&self, timeline: u32) -> bool {
        self.begins.iter().any(|&(t, _)| t == timeline)
    }

    /// The timeline whose file holds segment `segno`.
    pub fn timeline_of(&self, segno: u64) -> u32 {
        self.begins
            .iter()
            .rev()
            .find(|&&(_, b)| b <= segno)
            .map_or(self.current, |&(t, _)| t)
    }

    /// The file name of segment `segno`.
    pub fn file_name(&self, segno: u64, segment_size: u64) -> String {
        lsn::segment_file_name(self.timeline_of(segno), segno, segment_size)
    }
}

/// Segment numbers present in `dir` for the WAL as `map` sees it (each in
/// the file of the timeline that holds it), ascending.
pub fn list_segments(
    dir: &Path,
    map: &TimelineMap,
    segment_size: u64,
) -> Result<Vec<u64>, FileError> {
    let mut segs: Vec<u64> = file::list_files(dir)?
        .iter()
        .filter_map(|n| lsn::parse_segment_file_name(n, segment_size))
        .filter(|&(tli, s)| map.timeline_of(s) == tli)
        .map(|(_, s)| s)
        .collect();
    segs.sort_unstable();
    segs.dedup();
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_round_trip_in_postgresql_format() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest_timeline(dir.path()).unwrap(), 1);
        write_history(dir.path(), 2, 1, Lsn(0x3000028), PROMOTE_REASON, true).unwrap();
        let text = std::fs::read_to_string(dir.path().join("00000002.history")).unwrap();
        assert_eq!(text, "1\t0/3000028\tno recovery target specified\n");
        write_history(dir.path(), 3, 2, Lsn(0x1_0500_0000), "again", true).unwrap();
        let text = std::fs::read_to_string(dir.path().join("00000003.history")).unwrap();
        assert_eq!(
            text,
            "1\t0/3000028\tno recovery target specified\n2\t1/5000000\tagain\n"
        );
        assert_eq!(latest_timeline(dir.path()).unwrap(), 3);
        let h = read_history(dir.path(), 3).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].parent, 2);
        assert_eq!(h[1].switch, Lsn(0x1_0500_0000));
    }

    #[test]
    fn the_new_timeline_owns_the_switch_segment() {
        let seg = 1 << 20;
        let h = vec![
            HistoryEntry {
                parent: 1,
                switch: Lsn(3 * seg + 40),
                reason: String::new(),
            },
            HistoryEntry {
                parent: 2,
                switch: Lsn(5 * seg),
                reason: String::new(),
            },
        ];
        let m = TimelineMap::from_history(3, &h, seg);
        assert_eq!(m.timeline_of(1), 1);
        assert_eq!(m.timeline_of(2), 1);
        assert_eq!(m.timeline_of(3), 2);
        assert_eq!(m.timeline_of(4), 2);
        assert_eq!(m.timeline_of(5), 3);
        assert_eq!(m.timeline_of(9), 3);
        assert_eq!(TimelineMap::single(1).timeline_of(7), 1);
        assert!(m.contains(1) && m.contains(2) && m.contains(3) && !m.contains(4));
        let ended = |switch, next| TimelineFate::Ended { switch, next };
        assert_eq!(fate_of(1, 3, &h), ended(Lsn(3 * seg + 40), 2));
        assert_eq!(fate_of(2, 3, &h), ended(Lsn(5 * seg), 3));
        assert_eq!(fate_of(3, 3, &h), TimelineFate::Current);
        assert_eq!(fate_of(4, 3, &h), TimelineFate::Unknown);
    }

    #[test]
    fn bad_history_lines_are_refused() {
        let p = Path::new("x.history");
        assert!(parse_history("1\tnot-an-lsn\tr\n", p).is_err());
        assert!(parse_history("2\t0/10\tr\n1\t0/20\tr\n", p).is_err());
        assert_eq!(parse_history("# c\n\n1\t0/10\tr\n", p).unwrap().len(), 1);
    }
}
