//! Sequential decoding of WAL from any record start, across segment files,
//! up to an optional limit (the flush LSN of a live WAL). The reader stops at
//! the first invalid record and reports why: it never trusts bytes past it.

use std::path::{Path, PathBuf};

use crate::io::file::{FileError, OpenMode, SegmentFile};
use crate::lsn::Lsn;
use crate::record::{self, Header, Kind, RecordError, HEADER_LEN};

const READ_CHUNK: usize = 1 << 20;
/// Segments the startup scan asks the kernel to read ahead of the current one.
const READ_AHEAD_SEGMENTS: u64 = 3;

/// One decoded record, borrowed from the reader's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub lsn: Lsn,
    pub kind: Kind,
    pub flags: u8,
    pub header: Header,
    pub payload: &'a [u8],
}

impl Record<'_> {
    /// The LSN just past this record (and its padding): the next record's start.
    pub fn end_lsn(&self) -> Lsn {
        Lsn(self.lsn.0 + self.header.stream_len())
    }

    pub fn to_owned(&self) -> OwnedRecord {
        OwnedRecord {
            lsn: self.lsn,
            kind: self.kind,
            flags: self.flags,
            payload: self.payload.to_vec(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    pub lsn: Lsn,
    pub kind: Kind,
    pub flags: u8,
    pub payload: Vec<u8>,
}

/// Why reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndOfWal {
    /// The bytes at the position are not a valid record.
    Invalid(RecordError),
    /// The segment holding the position does not exist (or is short).
    MissingSegment { at: Lsn, segment: String },
    /// The configured limit was reached (a live WAL's flush LSN).
    Limit(Lsn),
}

impl EndOfWal {
    pub fn lsn(&self) -> Lsn {
        match self {
            EndOfWal::Invalid(e) => e.lsn(),
            EndOfWal::MissingSegment { at, .. } => *at,
            EndOfWal::Limit(l) => *l,
        }
    }
}

impl std::fmt::Display for EndOfWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndOfWal::Invalid(e) => write!(f, "{e}"),
            EndOfWal::MissingSegment { at, segment } => {
                write!(f, "could not find WAL segment {segment} for {at}")
            }
            EndOfWal::Limit(l) => write!(f, "reached the flush LSN {l}"),
        }
    }
}

pub struct WalReader {
    dir: PathBuf,
    segment_size: u64,
    /// Which timeline's file holds each segment (the reader follows the
    /// history of the timeline it was given).
    map: super::timeline::TimelineMap,
    /// Next record's start.
    pos: Lsn,
    limit: Option<Lsn>,
    /// Bytes of the stream starting at LSN `buf_start`.
    /// `buf[..filled]` holds them; the rest is room to read into, kept so
    /// that a read does not zero its destination first.
    buf: Vec<u8>,
    filled: usize,
    buf_start: Lsn,
    file: Option<(u64, SegmentFile)>,
    end: Option<EndOfWal>,
    /// fdatasync each segment before reading from it (startup: every byte
    /// handed out is then durable).
    sync_on_open: bool,
    /// With `sync_on_open`: a helper thread that asks the kernel to read
    /// the segments ahead (WILLNEED, piece by piece, which costs the
    /// asking thread page allocations), and the last segment it was sent.
    read_ahead: Option<(std::sync::mpsc::Sender<PathBuf>, u64)>,
}

impl WalReader {
    /// A reader of the WAL in `dir` starting at `from`, which must be a record
    /// start (a wrong position shows up at once as an invalid record).
    pub fn new(
        dir: &Path,
        segment_size: u64,
        timeline: u32,
        from: Lsn,
        limit: Option<Lsn>,
    ) -> WalReader {
        WalReader {
            dir: dir.to_owned(),
            segment_size,
            map: super::timeline::TimelineMap::load_or_single(dir, timeline, segment_size),
            pos: from,
            limit,
            buf: Vec::new(),
            filled: 0,
            buf_start: from,
            file: None,
            end: None,
            sync_on_open: false,
            read_ahead: None,
        }
    }

    /// Makes every segment durable (fdatasync) before reading from it, so
    /// that every record returned is durable. Startup uses it: WAL found
    /// after a crash may never have been synced, and recovery writes pages
    /// whose LSNs are in it (WAL before data).
    pub fn sync_on_open(mut self, on: bool) -> WalReader {
        self.sync_on_open = on;
        self
    }

    /// The next record's start LSN (after the end: where valid WAL ends).
    pub fn position(&self) -> Lsn {
        self.pos
    }

    /// Why the last call to [`WalReader::next_record`] returned `None`.
    pub fn end(&self) -> Option<&EndOfWal> {
        self.end.as_ref()
    }

    /// Raises the limit (a live WAL whose flush LSN advanced); reading can
    /// continue past an earlier [`EndOfWal::Limit`].
    pub fn set_limit(&mut self, limit: Option<Lsn>) {
        self.limit = limit;
        if matches!(self.end, Some(EndOfWal::Limit(_))) {
            self.end = None;
        }
    }

    /// The next valid record, or `None` at the end of valid WAL (see
    /// [`WalReader::end`]). `Err` only for I/O errors other than a missing file.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, FileError> {
        if self.end.is_some() {
            return Ok(None);
        }
        let at = self.pos;
        if let Some(limit) = self.limit {
            if at >= limit {
                self.end = Some(EndOfWal::Limit(limit));
                return Ok(None);
            }
        }
        if let Err(end) = self.fill(HEADER_LEN)? {
            self.end = Some(end);
            return Ok(None);
        }
        let off = (at.0 - self.buf_start.0) as usize;
        let hdr_bytes: [u8; HEADER_LEN] = self.buf[off..off + HEADER_LEN].try_into().unwrap();
        let hdr = match record::decode_header(&hdr_bytes, at) {
            Ok(h) => h,
            Err(e) => {
                self.end = Some(EndOfWal::Invalid(e));
                return Ok(None);
            }
        };
        // IMPORTANT: a record is handed out only once all of it, padding
        // included, is below the limit. A standby's flush LSN can lie in a
        // record's padding (its primary's bytes arrive cut anywhere): the
        // record's bytes are all there, but its end, which a replayed page
        // takes as its LSN, is not flushed yet, and a page written out
        // would wait for a flush that only the rest of the stream brings.
        if let Some(limit) = self.limit {
            if at.0 + hdr.stream_len() > limit.0 {
                self.end = Some(EndOfWal::Limit(limit));
                return Ok(None);
            }
        }
        if let Err(end) = self.fill(hdr.tot_len as usize)? {
            // A record cut short by a missing segment: its tail was never
            // written, the end is this record's start. Cut by the limit: the
            // rest is not flushed yet; a raised limit continues here.
            self.end = Some(match end {
                EndOfWal::MissingSegment { .. } => EndOfWal::Invalid(RecordError::Truncated {
                    at,
                    need: hdr.tot_len as usize,
                    have: self.buffered_from(at),
                }),
                other => other,
            });
            return Ok(None);
        }
        let off = (at.0 - self.buf_start.0) as usize;
        let payload = &self.buf[off + HEADER_LEN..off + hdr.tot_len as usize];
        if let Err(e) = record::verify_payload(&hdr_bytes, &hdr, payload) {
            self.end = Some(EndOfWal::Invalid(e));
            return Ok(None);
        }
        self.pos = Lsn(at.0 + hdr.stream_len());
        Ok(Some(Record {
            lsn: at,
            kind: hdr.kind,
            flags: hdr.flags,
            header: hdr,
            payload,
        }))
    }

    fn buffered_from(&self, at: Lsn) -> usize {
        (self.buf_start.0 + self.filled as u64).saturating_sub(at.0) as usize
    }

    /// Makes `n` bytes from `self.pos` available in the buffer. `Ok(Err(end))`
    /// when the stream ends before that.
    fn fill(&mut self, n: usize) -> Result<Result<(), EndOfWal>, FileError> {
        let at = self.pos;
        if self.buf_start > at || self.buf_start.0 + (self.filled as u64) < at.0 {
            self.filled = 0;
            self.buf_start = at;
        } else if at.0 - self.buf_start.0 > (READ_CHUNK as u64) {
            // Drop consumed bytes so the buffer does not grow without bound.
            let consumed = (at.0 - self.buf_start.0) as usize;
            self.buf.copy_within(consumed..self.filled, 0);
            self.filled -= consumed;
            self.buf_start = at;
        }
        while self.buffered_from(at) < n {
            let next = Lsn(self.buf_start.0 + self.filled as u64);
            let mut want = (n - self.buffered_from(at)).max(READ_CHUNK);
            if let Some(limit) = self.limit {
                if next >= limit {
                    return Ok(Err(EndOfWal::Limit(limit)));
                }
                want = want.min((limit.0 - next.0) as usize);
            }
            let segno = next.segno(self.segment_size);
            let seg_off = next.segment_offset(self.segment_size);
            want = want.min((self.segment_size - seg_off) as usize);
            if self.file.as_ref().map(|(s, _)| *s) != Some(segno) {
                let path = self.segment_path(segno);
                match SegmentFile::open(&path, OpenMode::default()) {
                    Ok(f) => {
                        if self.sync_on_open {
                            // IMPORTANT: durable before any of it is handed out.
                            f.datasync()?;
                            // Startup reads the whole WAL: have the kernel read
                            // the next segments while this one is processed.
                            self.read_ahead_of(segno);
                        }
                        self.file = Some((segno, f))
                    }
                    Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => {
                        self.file = None;
                        return Ok(Err(EndOfWal::MissingSegment {
                            at: next,
                            segment: self.map.file_name(segno, self.segment_size),
                        }));
                    }
                    Err(e) => return Err(e),
                }
            }
            let (_, file) = self.file.as_ref().unwrap();
            let old = self.filled;
            if self.buf.len() < old + want {
                self.buf.resize(old + want, 0);
            }
            let got = file.read_at(&mut self.buf[old..old + want], seg_off)?;
            self.filled = old + got;
            // A short segment file: take what there is, the next round
            // reports it missing.
            if got == 0 {
                return Ok(Err(EndOfWal::MissingSegment {
                    at: next,
                    segment: self.map.file_name(segno, self.segment_size),
                }));
            }
        }
        Ok(Ok(()))
    }

    /// Sends the helper the segments up to READ_AHEAD_SEGMENTS past `segno`
    /// it has not been sent (starting it on first use). Not on a simulated
    /// disk, whose reads are instant and whose operations a seed orders.
    fn read_ahead_of(&mut self, segno: u64) {
        if crate::io::sim::is_simulated(&self.dir) {
            return;
        }
        if self.read_ahead.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
            let spawned = std::thread::Builder::new()
                .name("walden-readahead".into())
                .spawn(move || {
                    for path in rx {
                        if let Ok(f) = SegmentFile::open(&path, OpenMode::default()) {
                            f.will_need();
                        }
                    }
                });
            // Without the helper the scan still works, only slower.
            if spawned.is_err() {
                return;
            }
            self.read_ahead = Some((tx, segno));
        }
        let (tx, sent) = self.read_ahead.as_ref().unwrap();
        let (first, last) = (segno.max(*sent) + 1, segno + READ_AHEAD_SEGMENTS);
        for s in first..=last {
            let _ = tx.send(self.segment_path(s));
        }
        let sent = &mut self.read_ahead.as_mut().unwrap().1;
        *sent = last.max(*sent);
    }

    fn segment_path(&self, segno: u64) -> PathBuf {
        self.dir.join(self.map.file_name(segno, self.segment_size))
    }
}

impl Iterator for WalReader {
    type Item = Result<OwnedRecord, FileError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r.to_owned())),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// What is at an LSN where no valid record starts, as far as the bytes
/// around it tell ([`locate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// The LSN lies inside the record at `record` (header, payload or
    /// padding); the next record starts at `next`.
    Inside {
        record: Lsn,
        kind: Kind,
        payload_len: usize,
        next: Lsn,
    },
    /// A valid record ends exactly there: the LSN is where a record should
    /// start, and the bytes there are not a valid one.
    AfterRecord { record: Lsn },
    /// No valid record within the scanned window covers the LSN.
    Unknown,
}

/// Finds the record that covers `at`, for a reader that was handed an LSN
/// where no record starts. Records carry their own LSN and a crc, so a
/// candidate start is believed only if its header names that very LSN and
/// its crc matches: the search goes backwards from `at` in 8-byte steps, no
/// further than `floor` (a known record start, e.g. the WAL's start) and no
/// further than `max_record_len` plus a header below `at`, since a longer
/// record cannot be in the WAL. Bytes are read below `limit` only (the
/// flush LSN: nothing unflushed is looked at). Bounded: at most about twice
/// `max_record_len` is read.
pub fn locate(
    dir: &Path,
    segment_size: u64,
    timeline: u32,
    at: Lsn,
    floor: Lsn,
    limit: Lsn,
    max_record_len: u64,
) -> Result<Located, FileError> {
    let reach = max_record_len + record::ALIGN + HEADER_LEN as u64;
    let lo = Lsn(at.0.saturating_sub(reach).max(floor.0)).align_down(record::ALIGN);
    let hi = Lsn(at.0.saturating_add(reach).min(limit.0));
    if lo >= at || hi <= lo {
        return Ok(Located::Unknown);
    }
    let (lo, bytes) = read_range(dir, segment_size, timeline, lo, hi)?;
    let mut c = Lsn(at.0 - 1).align_down(record::ALIGN);
    while c >= lo {
        let off = (c.0 - lo.0) as usize;
        let decoded = bytes.get(off..).map(|b| record::decode(b, c));
        if let Some(Ok((hdr, payload))) = decoded {
            let next = Lsn(c.0 + hdr.stream_len());
            return Ok(if next > at {
                Located::Inside {
                    record: c,
                    kind: hdr.kind,
                    payload_len: payload.len(),
                    next,
                }
            } else if next == at {
                Located::AfterRecord { record: c }
            } else {
                Located::Unknown
            });
        }
        if c.0 < record::ALIGN {
            break;
        }
        c = Lsn(c.0 - record::ALIGN);
    }
    Ok(Located::Unknown)
}

/// The stream's bytes in `[lo, hi)` as far as segment files hold them:
/// a missing segment below the last one read restarts the range after it,
/// one above ends it. Returns where the bytes start.
fn read_range(
    dir: &Path,
    segment_size: u64,
    timeline: u32,
    mut lo: Lsn,
    hi: Lsn,
) -> Result<(Lsn, Vec<u8>), FileError> {
    let map = super::timeline::TimelineMap::load_or_single(dir, timeline, segment_size);
    let mut bytes = Vec::with_capacity((hi.0 - lo.0) as usize);
    let mut next = lo;
    while next < hi {
        let segno = next.segno(segment_size);
        let seg_off = next.segment_offset(segment_size);
        let want = (segment_size - seg_off).min(hi.0 - next.0) as usize;
        let path = dir.join(map.file_name(segno, segment_size));
        let file = match SegmentFile::open(&path, OpenMode::default()) {
            Ok(f) => f,
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => {
                if bytes.is_empty() {
                    lo = Lsn(next.0 + want as u64);
                    next = lo;
                    continue;
                }
                break;
            }
            Err(e) => return Err(e),
        };
        let old = bytes.len();
        bytes.resize(old + want, 0);
        let got = file.read_at(&mut bytes[old..], seg_off)?;
        bytes.truncate(old + got);
        if got < want {
            break;
        }
        next = Lsn(next.0 + want as u64);
    }
    Ok((lo, bytes))
}
