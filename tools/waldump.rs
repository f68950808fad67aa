//! `walden waldump`: decode and print WAL records, like PostgreSQL's
//! `pg_waldump`. One line per record, or `--stats` for pg_waldump's table.
//!
//! Filters: `-r` kinds, `-R`/`-B` a relation's (or block's) page records;
//! a start (`-s`, or a segment file argument) inside a record goes on to the
//! next valid one, as pg_waldump does.
//!
//! It reads segment files directly with [`WalReader`] and never writes to the
//! WAL directory, so it can run beside a live server (with `--follow`, it
//! polls for records as they are written). What it is not: a checker of
//! anything past the end of valid WAL; like the engine, it stops at the
//! first invalid record and says why.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use walden::lsn;
use walden::record::{Kind, FLAG_LZ4};
use walden::store::page::{PageTag, PAGE_DATA};
use walden::store::records::{decode_page_image, decode_page_write};
use walden::wal::reader::{EndOfWal, Record, WalReader};
use walden::wal::segments;
use walden::wal::timeline::{self, TimelineMap};
use walden::wal::version::WAL_FORMAT_VERSION;
use walden::Lsn;

const AFTER_HELP: &str = "\
Output, one line per record, in pg_waldump's shape:
  kind: DATA        len (rec/tot):     29/    32, lsn: 0/01000000, desc: 5 bytes \"hello\"

  rec    the record's tot_len: its 24-byte header plus its payload
  tot    the bytes it occupies in the stream: rec rounded up to a multiple of 8,
         so the tot of consecutive records adds up to the distance between their LSNs
  lsn    where the record starts, printed as pg_waldump does (%X/%08X)
  desc   for client records: the payload length, a short preview if it is
         printable UTF-8, and `compressed raw_len=N` for an lz4-compressed payload;
         for the page store's records what they touch:
           PAGE_WRITE           rel 1 blk 7 off 100 len 5
           PAGE_IMAGE           rel 1 blk 7 FPW, compression method: lz4, 61 bytes
           CHECKPOINT_REDO      redo point, 8 bytes
           CHECKPOINT_ONLINE    redo 0/1000028; tli 1; prev tli 1; fpw true
           BACKUP_START         start 0/1000028; label \"nightly\"
           BACKUP_END           start 0/1000028; label \"nightly\"   (the backup that
                                started at 0/1000028 ends at this record's end)

Where it stops (a last line on stderr, unless -n or -e stopped it first):
  end of WAL at X: ...         zeros where the next record would be, or no next
                               segment file: the ordinary end of WAL (exit 0)
  invalid record at X: ...     bytes that are not a valid record: a torn tail, stale
                               records of a recycled segment, or damage; nothing after
                               X is trusted, as by the engine's recovery (exit 0)
  could not find a valid record at START: ...
                               the oldest retained record is damaged (exit 1)
  could not find a valid record at or after START: ...
                               nothing valid from -s START (or STARTSEG) on (exit 1)

Where it starts: by default at the first record of the oldest segment file (at
or before wal_start: a checkpoint moves wal_start without releasing the segment
it is in). -s START, or STARTSEG's first byte, need not be a record start: the
dump begins at the first valid record after it (found by its own LSN field and
crc) and, as pg_waldump, says on stderr
  first record is after X, at Y, skipping over N bytes
(not when START is a segment's first byte). STARTSEG [ENDSEG] stop after the
last record that ends in ENDSEG (default STARTSEG), as -e does.

-b adds pg_waldump's block line under each page record:
  <tab>blkref #0: rel 7 blk 7 (FPW); hole: offset: 0, length: 0, compression saved: 8107, method: lz4

--follow, at the end of WAL, re-reads from there every 500 ms until killed (at
START too, if nothing is valid there yet). It shows what is written to the
segment files, which on a live server can run ahead of the flush LSN.

--stats prints pg_waldump's table, one row per kind. Record size counts each
record's stream length (padding included), so without -r the Combined size
total equals the bytes between the two LSNs of the header line. FPI size is the
stored bytes of full-page images (PAGE_IMAGE), Record size the rest. --stats=record
splits each kind into uncompressed / lz4 (a full-page image stored lz4-compressed,
or a record with the lz4 flag), walden's analogue of pg_waldump's rmgr/info.";

/// How `--stats` groups records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatsMode {
    /// One row per kind (pg_waldump's default, per rmgr).
    #[value(alias = "rmgr")]
    Kind,
    /// One row per kind and flags (pg_waldump's per-record statistics).
    Record,
}

#[derive(Args, Debug)]
#[command(after_long_help = AFTER_HELP)]
pub struct WaldumpArgs {
    /// Directory of WAL segment files [default: DATADIR/wal, or walden-data/wal].
    #[arg(short = 'p', long = "path", value_name = "WAL_DIR")]
    path: Option<PathBuf>,
    /// Data directory; its wal/ is read when -p is not given.
    #[arg(short = 'D', long = "data-dir", value_name = "DATADIR")]
    data_dir: Option<PathBuf>,
    /// Start at the first valid record at or after this LSN [default: the
    /// first record of the oldest segment file, at or before wal_start].
    #[arg(short = 's', long = "start", value_name = "LSN")]
    start: Option<Lsn>,
    /// Stop before this LSN: a record that does not end at or before it is not shown.
    #[arg(short = 'e', long = "end", value_name = "LSN")]
    end: Option<Lsn>,
    /// Show (or count, with --stats) at most N records.
    #[arg(short = 'n', long = "limit", value_name = "N")]
    limit: Option<u64>,
    /// Only records of this kind (DATA, NOOP, USERn, WALDENn; any case; repeatable).
    /// `-r list` lists the kinds.
    #[arg(
        short = 'r',
        long = "kind",
        visible_alias = "rmgr",
        value_name = "KIND"
    )]
    kinds: Vec<String>,
    /// After the end of WAL, keep polling (every 500 ms) for new records until killed.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only page records (PAGE_WRITE, PAGE_IMAGE) of this relation: walden's
    /// relation id, the `rel` of their `desc:` (pg_waldump's T/D/R is one number here).
    #[arg(short = 'R', long = "relation", value_name = "REL")]
    relation: Option<u32>,
    /// With --relation, only the records of block N.
    #[arg(short = 'B', long = "block", value_name = "N", requires = "relation")]
    block: Option<u32>,
    /// Details of the page each page record touches, on a line below it
    /// (for a full-page image: its compression).
    #[arg(short = 'b', long = "bkp-details")]
    bkp_details: bool,
    /// Dump from the first record in this segment file (a name or a path; a
    /// path's directory is the WAL directory unless -p or -D is given).
    #[arg(value_name = "STARTSEG")]
    start_segment: Option<PathBuf>,
    /// Dump up to the end of this segment file [default: STARTSEG].
    #[arg(value_name = "ENDSEG", requires = "start_segment")]
    end_segment: Option<PathBuf>,
    /// Print statistics instead of records (`--stats=record`: per kind and flags).
    #[arg(
        short = 'z',
        long,
        value_name = "record",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "kind"
    )]
    stats: Option<StatsMode>,
}

const POLL_INTERVAL: Duration = Duration::from_millis(500);

pub fn run(args: WaldumpArgs) -> anyhow::Result<()> {
    if args.kinds.iter().any(|k| k.eq_ignore_ascii_case("list")) {
        print_kind_list();
        return Ok(());
    }
    let filter = Filter {
        kinds: args
            .kinds
            .iter()
            .map(|k| parse_kind(k))
            .collect::<anyhow::Result<Vec<Kind>>>()?,
        relation: args.relation,
        block: args.block,
    };
    if args.follow && args.stats.is_some() {
        bail!("--stats cannot be combined with --follow: statistics are printed at the end of WAL");
    }
    let segment_dir = args
        .start_segment
        .as_deref()
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty());
    let dir = match (&args.path, &args.data_dir, segment_dir) {
        (Some(p), _, _) => p.clone(),
        (None, Some(d), _) => d.join("wal"),
        (None, None, Some(s)) => s.to_owned(),
        (None, None, None) => PathBuf::from("walden-data/wal"),
    };
    let wal = WalDir::open(&dir)?;
    wal.check_version()?;
    let Some(segment_size) = wal.segment_size else {
        bail!("no WAL segment files in {}", dir.display());
    };
    let segments = segment_range(&args, &wal, segment_size)?;
    let end_limit = args
        .end
        .or(segments.map(|(_, last)| Lsn((last + 1) * segment_size)));
    // A start the user gave (-s, or STARTSEG's first byte) need not be a
    // record start: like pg_waldump, go on to the first valid record after
    // it. The default start is one: the oldest retained record.
    let (from, given) = match (args.start, segments) {
        (Some(s), _) => (s, true),
        (None, Some((first, _))) => (Lsn(first * segment_size), true),
        (None, None) => (wal.oldest_record()?, false),
    };
    let start = if given {
        match find_record(&wal, from, end_limit)? {
            Ok(at) => {
                if at != from && from.segment_offset(segment_size) != 0 {
                    eprintln!(
                        "walden waldump: first record is after {}, at {}, skipping over {} bytes",
                        fmt_lsn(from),
                        fmt_lsn(at),
                        at.0 - from.0
                    );
                }
                at
            }
            // Nothing yet: --follow waits at START for the first record.
            Err(_) if args.follow => from,
            Err(why) => bail!(
                "could not find a valid record at or after {}: {why}",
                fmt_lsn(from)
            ),
        }
    } else {
        from
    };

    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut stats = args.stats.map(|mode| Stats::new(mode, start));
    let mut shown = 0u64;
    let mut pos = start;
    let mut read_any = false;
    let end = loop {
        let mut reader = WalReader::new(&dir, segment_size, wal.timeline, pos, end_limit);
        while let Some(rec) = reader.next_record()? {
            read_any = true;
            if !filter.wants(&rec) {
                continue;
            }
            match &mut stats {
                Some(stats) => stats.add(&rec),
                None => {
                    let mut text = record_line(&rec);
                    if args.bkp_details {
                        if let Some(details) = block_details(&rec) {
                            text.push_str("\n\t");
                            text.push_str(&details);
                        }
                    }
                    if let Err(e) = writeln!(out, "{text}") {
                        return quiet_on_broken_pipe(e);
                    }
                }
            }
            shown += 1;
            if args.limit.is_some_and(|n| shown >= n) {
                break;
            }
        }
        pos = reader.position();
        let Some(end) = reader.end().cloned() else {
            // -n stopped it, not the WAL: as pg_waldump, no closing line.
            break None;
        };
        if args.follow && !matches!(end, EndOfWal::Limit(_)) {
            if let Err(e) = out.flush() {
                return quiet_on_broken_pipe(e);
            }
            std::thread::sleep(POLL_INTERVAL);
            continue;
        }
        break Some(end);
    };
    if let Some(stats) = &stats {
        if let Err(e) = stats.print(&mut out) {
            return quiet_on_broken_pipe(e);
        }
    }
    if let Err(e) = out.flush() {
        return quiet_on_broken_pipe(e);
    }
    drop(out);

    match end {
        // -n, -e or ENDSEG stopped it where it was told to: nothing to say.
        None | Some(EndOfWal::Limit(_)) => Ok(()),
        Some(end) if !read_any && !is_clean_end(&end, &wal) => {
            // Nothing valid at the oldest retained record: zeros or no
            // segment there just mean an empty WAL, anything else damage.
            bail!("could not find a valid record at {}: {end}", fmt_lsn(start))
        }
        Some(end) => {
            let at = fmt_lsn(end.lsn());
            if is_clean_end(&end, &wal) {
                eprintln!("walden waldump: end of WAL at {at}: {end}");
            } else {
                eprintln!(
                    "walden waldump: invalid record at {at}: {end}{}",
                    missing_hint(&end, &wal)
                );
            }
            Ok(())
        }
    }
}

/// Which records are shown: -r's kinds, -R's relation and -B's block.
struct Filter {
    kinds: Vec<Kind>,
    relation: Option<u32>,
    block: Option<u32>,
}

impl Filter {
    fn wants(&self, rec: &Record<'_>) -> bool {
        if !self.kinds.is_empty() && !self.kinds.contains(&rec.kind) {
            return false;
        }
        let Some(rel) = self.relation else {
            return true;
        };
        page_tag(rec).is_some_and(|t| t.rel == rel && self.block.map_or(true, |b| t.block == b))
    }
}

/// The page a page record touches; `None` for other records (and for a page
/// record that does not decode: its `desc:` says INVALID).
fn page_tag(rec: &Record<'_>) -> Option<PageTag> {
    match rec.kind {
        Kind::PAGE_WRITE => decode_page_write(rec.payload, rec.lsn).ok().map(|w| w.tag),
        Kind::PAGE_IMAGE => decode_page_image(rec.payload, rec.lsn).ok().map(|i| i.tag),
        _ => None,
    }
}

/// pg_waldump's `-b` line for the block a page record references:
/// `blkref #0: rel 7 blk 3`, and for a full-page image `(FPW)` with its
/// compression. walden's images have no hole (the page header is not in
/// them), so the hole is always 0; an lz4 image that does not restore to a
/// page says so.
fn block_details(rec: &Record<'_>) -> Option<String> {
    let tag = page_tag(rec)?;
    let mut text = format!("blkref #0: rel {} blk {}", tag.rel, tag.block);
    if rec.kind == Kind::PAGE_IMAGE {
        let image = decode_page_image(rec.payload, rec.lsn).ok()?;
        text.push_str(" (FPW); hole: offset: 0, length: 0");
        if image.compressed {
            text.push_str(&format!(
                ", compression saved: {}, method: lz4",
                PAGE_DATA - image.image.len()
            ));
            let mut page = vec![0u8; PAGE_DATA];
            if let Err(e) = image.restore(&mut page, rec.lsn) {
                text.push_str(&format!("; INVALID: {}", e.what));
            }
        }
    }
    Some(text)
}

/// STARTSEG and ENDSEG as segment numbers, checked against each other and
/// against -s and -e as pg_waldump checks them.
fn segment_range(
    args: &WaldumpArgs,
    wal: &WalDir,
    segment_size: u64,
) -> anyhow::Result<Option<(u64, u64)>> {
    let Some(first_arg) = &args.start_segment else {
        return Ok(None);
    };
    let first = wal.segment_of(first_arg, segment_size)?;
    let last = match &args.end_segment {
        Some(a) => {
            let last = wal.segment_of(a, segment_size)?;
            if last < first {
                bail!(
                    "ENDSEG {} is before STARTSEG {}",
                    a.display(),
                    first_arg.display()
                );
            }
            last
        }
        None => first,
    };
    let name = |s: u64| wal.map.file_name(s, segment_size);
    if let Some(s) = args.start.filter(|s| s.segno(segment_size) != first) {
        bail!(
            "start WAL location {} is not inside file \"{}\"",
            fmt_lsn(s),
            name(first)
        );
    }
    if let Some(e) = args
        .end
        .filter(|e| e.segno(segment_size) != last && e.0 != (last + 1) * segment_size)
    {
        bail!(
            "end WAL location {} is not inside file \"{}\"",
            fmt_lsn(e),
            name(last)
        );
    }
    Ok(Some((first, last)))
}

/// The first position at or after `from` (rounded up to 8: records are
/// 8-aligned) and before `limit` where a valid record starts; `Err` with
/// why `from` itself is not one when there is none.
///
/// There are no page headers to resynchronise on (docs/wal-format.md §2),
/// but every record carries its own LSN and a crc (§3): a candidate is an
/// aligned position whose 8-byte `lsn` field equals the position, and it is
/// taken only if the whole record then validates. The search stops at the
/// first segment file missing.
fn find_record(
    wal: &WalDir,
    from: Lsn,
    limit: Option<Lsn>,
) -> anyhow::Result<Result<Lsn, EndOfWal>> {
    let size = wal.segment_size.expect("a WAL with segments");
    let valid_at = |at: Lsn| -> anyhow::Result<Result<(), EndOfWal>> {
        let mut r = WalReader::new(&wal.dir, size, wal.timeline, at, limit);
        Ok(match r.next_record()? {
            Some(_) => Ok(()),
            None => Err(r.end().cloned().expect("an end when no record")),
        })
    };
    let why = match valid_at(from)? {
        Ok(()) => return Ok(Ok(from)),
        Err(why) => why,
    };
    let first = (from.0 + 1).next_multiple_of(8);
    let limit = limit.map_or(u64::MAX, |l| l.0);
    // `field` runs over the stream positions of candidates' lsn fields (8
    // bytes after the candidate); being 8-aligned, a field never spans two
    // segment files.
    let mut field = first + 8;
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    while field - 8 < limit {
        let segno = field / size;
        let path = wal.dir.join(wal.map.file_name(segno, size));
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("could not open WAL segment \"{}\"", path.display())))
            }
        };
        let len = file
            .metadata()
            .with_context(|| format!("could not stat \"{}\"", path.display()))?
            .len()
            .min(size);
        let mut off = field % size;
        while off < len && field - 8 < limit {
            let n = (len - off).min(CHUNK) as usize & !7;
            if n == 0 {
                break;
            }
            file.read_exact_at(&mut buf[..n], off).with_context(|| {
                format!(
                    "could not read WAL segment \"{}\" at offset {off}",
                    path.display()
                )
            })?;
            for word in buf[..n].chunks_exact(8) {
                let candidate = field - 8;
                if candidate >= limit {
                    break;
                }
                if u64::from_le_bytes(word.try_into().unwrap()) == candidate
                    && valid_at(Lsn(candidate))?.is_ok()
                {
                    return Ok(Ok(Lsn(candidate)));
                }
                field += 8;
            }
            off += n as u64;
        }
        if len < size {
            break; // a short segment file: nothing is after it
        }
        field = (segno + 1) * size;
    }
    Ok(Err(why))
}

/// An LSN as pg_waldump prints it (`%X/%08X`): `0/01000000`.
pub fn fmt_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:08X}", lsn.0 >> 32, lsn.0 as u32)
}

/// The ordinary end of WAL: zeros where the next header would be, or no
/// segment file holding it (and none after it: a hole is not an end).
fn is_clean_end(end: &EndOfWal, wal: &WalDir) -> bool {
    match end {
        EndOfWal::Invalid(e) => e.is_zeroed(),
        EndOfWal::MissingSegment { at, .. } => later_segment(*at, wal).is_none(),
        EndOfWal::Limit(_) => true,
    }
}

/// The first segment present after the one that should hold `at`.
fn later_segment(at: Lsn, wal: &WalDir) -> Option<u64> {
    let size = wal.segment_size?;
    wal.segments.iter().copied().find(|&s| s > at.segno(size))
}

fn missing_hint(end: &EndOfWal, wal: &WalDir) -> String {
    match (end, wal.segment_size) {
        (EndOfWal::MissingSegment { at, .. }, Some(size)) => match later_segment(*at, wal) {
            Some(s) => format!(
                " (but a later segment, {}, exists: WAL is missing, not ended)",
                wal.map.file_name(s, size)
            ),
            None => String::new(),
        },
        _ => String::new(),
    }
}

fn quiet_on_broken_pipe(e: io::Error) -> anyhow::Result<()> {
    // `walden waldump | head` is normal use, not an error.
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(anyhow::Error::new(e).context("could not write to standard output"))
    }
}

/// A WAL directory as found on disk: its segment size is discovered from the
/// files, as pg_waldump does, so no configuration is needed.
pub struct WalDir {
    pub dir: PathBuf,
    /// `None` when there is no segment file to measure.
    pub segment_size: Option<u64>,
    /// The newest timeline with a history file (1 without one): the dump
    /// follows its history across the switch points.
    pub timeline: u32,
    /// Which timeline's file holds each segment.
    pub map: TimelineMap,
    /// Segment numbers of the WAL as [`WalDir::timeline`] sees it, ascending.
    pub segments: Vec<u64>,
    /// What `wal_version` says; `None` without the file (a WAL from before
    /// format versions: version 1, or no WAL yet).
    pub version: Option<u32>,
}

impl WalDir {
    pub fn open(dir: &Path) -> anyhow::Result<WalDir> {
        let meta = std::fs::metadata(dir)
            .with_context(|| format!("could not open WAL directory \"{}\"", dir.display()))?;
        if !meta.is_dir() {
            bail!("\"{}\" is not a directory", dir.display());
        }
        let version = walden::wal::version::read(dir)?;
        let timeline = timeline::latest_timeline(dir)?;
        let first = walden::io::file::list_files(dir)?
            .into_iter()
            .filter(|n| looks_like_segment(n))
            .min();
        let Some(first) = first else {
            return Ok(WalDir {
                dir: dir.to_owned(),
                segment_size: None,
                timeline,
                map: TimelineMap::single(timeline),
                segments: Vec::new(),
                version,
            });
        };
        let path = dir.join(&first);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("could not stat \"{}\"", path.display()))?
            .len();
        if !size.is_power_of_two() || !((1 << 20)..=(1 << 30)).contains(&size) {
            bail!(
                "WAL segment file \"{}\" is {size} bytes, not a power of two between 1 MiB and 1 GiB: \
                 cannot tell the segment size (damaged, or not a walden WAL directory)",
                path.display()
            );
        }
        let map = TimelineMap::load(dir, timeline, size)?;
        Ok(WalDir {
            dir: dir.to_owned(),
            segment_size: Some(size),
            segments: timeline::list_segments(dir, &map, size)?,
            timeline,
            map,
            version,
        })
    }

    /// Refuses a WAL of a format this build cannot decode (a newer
    /// walden's): its records would be misread, not shown.
    pub fn check_version(&self) -> anyhow::Result<()> {
        match self.version {
            Some(found) if found != WAL_FORMAT_VERSION => {
                Err(walden::wal::version::UnsupportedVersion {
                    path: walden::wal::version::path(&self.dir),
                    found,
                    supported: WAL_FORMAT_VERSION,
                }
                .into())
            }
            _ => Ok(()),
        }
    }

    /// The first record of the retained WAL, from `wal_start`; without that
    /// file, the start of segment 1 if the WAL begins there (as the engine
    /// assumes when it opens such a directory).
    pub fn wal_start(&self) -> anyhow::Result<Lsn> {
        match segments::read_wal_start(&self.dir)? {
            Some(l) => Ok(l),
            None => match (self.segment_size, self.segments.first()) {
                (Some(size), Some(1)) => Ok(Lsn(size)),
                _ => bail!(
                    "{} has no {} file and does not begin at segment 1: give the start with -s",
                    self.dir.display(),
                    segments::WAL_START_FILE
                ),
            },
        }
    }

    /// Where a dump begins by default: the first record of the oldest
    /// segment file present. That is `wal_start` unless a checkpoint moved
    /// `wal_start` past records it did not release (its redo point was in
    /// the same segment, or `wal_keep_size` kept the segment): those records
    /// are still on disk, still valid, and pg_waldump would show them. The
    /// records before `wal_start` are shown only if they lead, record by
    /// record, to it; otherwise the dump begins at `wal_start`.
    pub fn oldest_record(&self) -> anyhow::Result<Lsn> {
        let wal_start = self.wal_start()?;
        let (Some(size), Some(&first)) = (self.segment_size, self.segments.first()) else {
            return Ok(wal_start);
        };
        let segment_start = Lsn(first * size);
        if segment_start >= wal_start {
            return Ok(wal_start);
        }
        // The segment may begin with the tail of a record of a released one.
        let Ok(at) = find_record(self, segment_start, Some(wal_start))? else {
            return Ok(wal_start);
        };
        let mut r = WalReader::new(&self.dir, size, self.timeline, at, Some(wal_start));
        while r.next_record()?.is_some() {}
        Ok(match r.end() {
            Some(EndOfWal::Limit(_)) if r.position() == wal_start => at,
            _ => wal_start,
        })
    }

    /// The segment number of a STARTSEG/ENDSEG argument: a segment file's
    /// name, or a path to one, which must exist here.
    fn segment_of(&self, arg: &Path, segment_size: u64) -> anyhow::Result<u64> {
        let name = arg.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some((timeline, segno)) = lsn::parse_segment_file_name(name, segment_size) else {
            bail!(
                "could not parse WAL file name \"{}\": not a segment file name for {segment_size}-byte segments",
                arg.display()
            );
        };
        if !self.map.contains(timeline) {
            bail!(
                "WAL file \"{}\" is of timeline {timeline}, which is not in the history of timeline {}",
                arg.display(),
                self.timeline
            );
        }
        let path = self.dir.join(name);
        if !path.is_file() {
            bail!("could not locate WAL file \"{}\"", path.display());
        }
        Ok(segno)
    }

    pub fn segment_name(&self, segno: u64) -> Option<String> {
        self.segment_size
            .map(|size| self.map.file_name(segno, size))
    }
}

/// A name that is a segment for some segment size: 24 upper-case hex
/// digits (of any timeline).
fn looks_like_segment(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn print_kind_list() {
    println!("{}", Kind::DATA.name());
    for k in NAMED_WALDEN_KINDS {
        println!("{}", k.name());
    }
    println!(
        "{} .. {}   (other client kinds)",
        Kind(2).name(),
        Kind(127).name()
    );
    println!(
        "{} .. {}   (other walden kinds)",
        Kind(137).name(),
        Kind(255).name()
    );
}

/// walden's own kinds that have names, in order.
const NAMED_WALDEN_KINDS: [Kind; 9] = [
    Kind::NOOP,
    Kind::PAGE_WRITE,
    Kind::PAGE_IMAGE,
    Kind::CHECKPOINT_REDO,
    Kind::CHECKPOINT_ONLINE,
    Kind::CHECKPOINT_SHUTDOWN,
    Kind::BACKUP_START,
    Kind::BACKUP_END,
    Kind::END_OF_RECOVERY,
];

fn parse_kind(name: &str) -> anyhow::Result<Kind> {
    (1..=255u8)
        .map(Kind)
        .find(|k| k.name().eq_ignore_ascii_case(name))
        .with_context(|| format!("unknown record kind \"{name}\" (try -r list)"))
}

/// One record in pg_waldump's shape.
pub fn record_line(rec: &Record<'_>) -> String {
    format!(
        "kind: {:<11} len (rec/tot): {:>6}/{:>6}, lsn: {}, desc: {}",
        rec.kind.name(),
        rec.header.tot_len,
        rec.header.stream_len(),
        fmt_lsn(rec.lsn),
        describe(rec).text
    )
}

/// What a record says, for the `desc:` column and the FPI column of --stats.
struct Description {
    text: String,
    /// Bytes of full-page images in the record (counted apart in --stats).
    fpi_len: u64,
}

/// The describer of each kind: client records and NOOPs are opaque bytes;
/// the page store's records say what they touch (store::records::describe),
/// and a full-page image's bytes count as FPI in --stats; a base backup's
/// markers name the backup's start and label (store::backup::describe).
fn describe(rec: &Record<'_>) -> Description {
    if let Some(text) = walden::store::backup::describe(rec.kind, rec.payload, rec.lsn) {
        return Description { text, fpi_len: 0 };
    }
    if let Some(text) = walden::store::records::describe(rec.kind, rec.payload, rec.lsn) {
        let fpi_len = match rec.kind {
            Kind::PAGE_IMAGE => walden::store::records::decode_page_image(rec.payload, rec.lsn)
                .map_or(0, |i| i.image.len() as u64),
            _ => 0,
        };
        return Description { text, fpi_len };
    }
    describe_bytes(rec)
}

/// Whether a record is compressed: the record's lz4 flag, or a full-page
/// image stored lz4-compressed.
fn is_compressed(rec: &Record<'_>) -> bool {
    rec.flags & FLAG_LZ4 != 0
        || (rec.kind == Kind::PAGE_IMAGE
            && walden::store::records::decode_page_image(rec.payload, rec.lsn)
                .is_ok_and(|i| i.compressed))
}

/// Longest text preview, in characters.
const PREVIEW_CHARS: usize = 32;

/// Opaque bytes: the length, and a preview when the payload is text.
fn describe_bytes(rec: &Record<'_>) -> Description {
    let n = rec.payload.len();
    let mut text = format!("{n} byte{}", if n == 1 { "" } else { "s" });
    if rec.flags & FLAG_LZ4 != 0 {
        text.push_str(&format!(" compressed raw_len={}", rec.header.raw_len));
    } else if let Some(preview) = text_preview(rec.payload) {
        text.push(' ');
        text.push_str(&preview);
    }
    Description { text, fpi_len: 0 }
}

/// `"hello"` for a printable UTF-8 payload, cut after [`PREVIEW_CHARS`]
/// characters with `…` outside the quotes; `None` for anything else.
fn text_preview(payload: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(payload).ok()?;
    if s.is_empty() || s.chars().any(|c| c.is_control()) {
        return None;
    }
    let cut: String = s.chars().take(PREVIEW_CHARS).collect();
    let more = if cut.len() < s.len() { "…" } else { "" };
    Some(format!("{cut:?}{more}"))
}

/// Counts for `--stats`, as pg_waldump's `XLogStats`.
struct Stats {
    mode: StatsMode,
    /// First record's LSN (the start), and the end of the last one counted.
    start: Lsn,
    end: Lsn,
    count: u64,
    rows: BTreeMap<(Kind, bool), Row>,
}

#[derive(Default, Clone, Copy)]
struct Row {
    count: u64,
    rec_len: u64,
    fpi_len: u64,
}

impl Row {
    fn add(&mut self, other: &Row) {
        self.count += other.count;
        self.rec_len += other.rec_len;
        self.fpi_len += other.fpi_len;
    }
}

impl Stats {
    fn new(mode: StatsMode, start: Lsn) -> Stats {
        Stats {
            mode,
            start,
            end: start,
            count: 0,
            rows: BTreeMap::new(),
        }
    }

    fn add(&mut self, rec: &Record<'_>) {
        let fpi_len = describe(rec).fpi_len;
        let row = self.rows.entry((rec.kind, is_compressed(rec))).or_default();
        row.count += 1;
        row.rec_len += rec.header.stream_len() - fpi_len;
        row.fpi_len += fpi_len;
        self.count += 1;
        self.end = rec.end_lsn();
    }

    /// Rows in kind order. Per kind, the named kinds are always listed (as
    /// pg_waldump lists every built-in rmgr); per record, only what occurred.
    fn table(&self) -> Vec<(String, Row)> {
        match self.mode {
            StatsMode::Kind => {
                let mut by_kind: BTreeMap<Kind, Row> = [Kind::DATA]
                    .into_iter()
                    .chain(NAMED_WALDEN_KINDS)
                    .map(|k| (k, Row::default()))
                    .collect();
                for (&(kind, _), row) in &self.rows {
                    by_kind.entry(kind).or_default().add(row);
                }
                by_kind.into_iter().map(|(k, r)| (k.name(), r)).collect()
            }
            StatsMode::Record => self
                .rows
                .iter()
                .map(|(&(kind, lz4), &r)| {
                    let how = if lz4 { "lz4" } else { "uncompressed" };
                    (format!("{}/{how}", kind.name()), r)
                })
                .collect(),
        }
    }

    /// pg_waldump's `XLogDumpDisplayStats`, column for column.
    fn print(&self, out: &mut impl Write) -> io::Result<()> {
        let rows = self.table();
        let mut total = Row::default();
        for (_, r) in &rows {
            total.add(r);
        }
        let total_len = total.rec_len + total.fpi_len;
        let pct = |n: u64, of: u64| {
            if of == 0 {
                0.0
            } else {
                100.0 * n as f64 / of as f64
            }
        };
        writeln!(
            out,
            "WAL statistics between {} and {}:",
            fmt_lsn(self.start),
            fmt_lsn(self.end)
        )?;
        writeln!(
            out,
            "{:<27} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8}",
            "Type", "N", "(%)", "Record size", "(%)", "FPI size", "(%)", "Combined size", "(%)"
        )?;
        writeln!(
            out,
            "{:<27} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8}",
            "----", "-", "---", "-----------", "---", "--------", "---", "-------------", "---"
        )?;
        for (name, r) in &rows {
            let combined = r.rec_len + r.fpi_len;
            writeln!(
                out,
                "{:<27} {:>20} ({:>6.2}) {:>20} ({:>6.2}) {:>20} ({:>6.2}) {:>20} ({:>6.2})",
                name,
                r.count,
                pct(r.count, total.count),
                r.rec_len,
                pct(r.rec_len, total.rec_len),
                r.fpi_len,
                pct(r.fpi_len, total.fpi_len),
                combined,
                pct(combined, total_len)
            )?;
        }
        writeln!(
            out,
            "{:<27} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8} {:>20}",
            "", "--------", "", "--------", "", "--------", "", "--------"
        )?;
        writeln!(
            out,
            "{:<27} {:>20} {:<9}{:>20} {:<9}{:>20} {:<9}{:>20} {:<6}",
            "Total",
            self.count,
            "",
            total.rec_len,
            format!("[{:.2}%]", pct(total.rec_len, total_len)),
            total.fpi_len,
            format!("[{:.2}%]", pct(total.fpi_len, total_len)),
            total_len,
            "[100%]"
        )
    }
}
