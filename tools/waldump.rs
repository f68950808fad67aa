//! `walden waldump`: decode and print WAL records, like PostgreSQL's
//! `pg_waldump`. One line per record, or `--stats` for pg_waldump's table.
//!
//! It reads segment files directly with [`WalReader`] and never writes to the
//! WAL directory, so it can run beside a live server (with `--follow`, it
//! polls for records as they are written). What it is not: a checker of
//! anything past the end of valid WAL; like the engine, it stops at the
//! first invalid record and says why.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use walden::lsn;
use walden::record::{Kind, FLAG_LZ4};
use walden::wal::reader::{EndOfWal, Record, WalReader};
use walden::wal::segments;
use walden::wal::version::WAL_FORMAT_VERSION;
use walden::wal::TIMELINE;
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

Where it stops (a last line on stderr, unless -n or -e stopped it first):
  end of WAL at X: ...         zeros where the next record would be, or no next
                               segment file: the ordinary end of WAL (exit 0)
  invalid record at X: ...     bytes that are not a valid record: a torn tail, stale
                               records of a recycled segment, or damage; nothing after
                               X is trusted, as by the engine's recovery (exit 0)
  could not find a valid record at START: ...
                               -s START is not a record start, or the first retained
                               record is damaged (exit 1)

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
    /// Start at this LSN, which must be a record start [default: the LSN in wal_start].
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
    let filter = args
        .kinds
        .iter()
        .map(|k| parse_kind(k))
        .collect::<anyhow::Result<Vec<Kind>>>()?;
    if args.follow && args.stats.is_some() {
        bail!("--stats cannot be combined with --follow: statistics are printed at the end of WAL");
    }
    let dir = match (&args.path, &args.data_dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.join("wal"),
        (None, None) => PathBuf::from("walden-data/wal"),
    };
    let wal = WalDir::open(&dir)?;
    wal.check_version()?;
    let Some(segment_size) = wal.segment_size else {
        bail!("no WAL segment files in {}", dir.display());
    };
    let start = match args.start {
        Some(s) => s,
        None => wal.wal_start()?,
    };

    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut stats = args.stats.map(|mode| Stats::new(mode, start));
    let mut shown = 0u64;
    let mut pos = start;
    let mut read_any = false;
    let end = loop {
        let mut reader = WalReader::new(&dir, segment_size, TIMELINE, pos, args.end);
        while let Some(rec) = reader.next_record()? {
            read_any = true;
            if !filter.is_empty() && !filter.contains(&rec.kind) {
                continue;
            }
            match &mut stats {
                Some(stats) => stats.add(&rec),
                None => {
                    if let Err(e) = writeln!(out, "{}", record_line(&rec)) {
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
        // -n or -e stopped it where it was told to: nothing to say.
        None | Some(EndOfWal::Limit(_)) => Ok(()),
        Some(end) if !read_any && (args.start.is_some() || !is_clean_end(&end, &wal)) => {
            // Nothing valid at START. From wal_start, zeros or no segment just
            // mean an empty WAL; anything else there, or at a START the user
            // gave, means START is not where a record begins.
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
                lsn::segment_file_name(TIMELINE, s, size)
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
    /// Segment numbers of timeline [`TIMELINE`], ascending.
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
        let first = walden::io::file::list_files(dir)?
            .into_iter()
            .filter(|n| looks_like_segment(n))
            .min();
        let Some(first) = first else {
            return Ok(WalDir {
                dir: dir.to_owned(),
                segment_size: None,
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
        Ok(WalDir {
            dir: dir.to_owned(),
            segment_size: Some(size),
            segments: segments::list_segments(dir, TIMELINE, size)?,
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

    pub fn segment_name(&self, segno: u64) -> Option<String> {
        self.segment_size
            .map(|size| lsn::segment_file_name(TIMELINE, segno, size))
    }
}

/// A name that is a segment of [`TIMELINE`] for some segment size: 24
/// upper-case hex digits.
fn looks_like_segment(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
        && name[..8] == format!("{TIMELINE:08X}")
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
        Kind(134).name(),
        Kind(255).name()
    );
}

/// walden's own kinds that have names, in order.
const NAMED_WALDEN_KINDS: [Kind; 6] = [
    Kind::NOOP,
    Kind::PAGE_WRITE,
    Kind::PAGE_IMAGE,
    Kind::CHECKPOINT_REDO,
    Kind::CHECKPOINT_ONLINE,
    Kind::CHECKPOINT_SHUTDOWN,
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
/// and a full-page image's bytes count as FPI in --stats.
fn describe(rec: &Record<'_>) -> Description {
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
