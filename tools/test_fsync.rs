//! `walden test-fsync`: PostgreSQL's pg_test_fsync rebuilt on walden's io
//! layer, and what it lacks.
//!
//! The first five sections are pg_test_fsync's, in its order, with its labels
//! and its `ops/sec  usecs/op` columns, so that the two reports can be laid
//! side by side (bench/compare-pg-test-fsync.sh); every line adds the p50 and
//! p99 latency of one operation. Then each `wal_sync_method` again as
//! walden's flusher issues it: one 8kB write and its sync with plain syscalls
//! and O_DIRECT (the flusher at queue depth 1), and through io_uring (one
//! write linked to its sync; a batch of N writes, then one sync), with
//! O_DIRECT and without. Last, a recommendation: the method with the lowest
//! p50 on this device, one write at a time and in batches.
//!
//! Where it departs from pg_test_fsync, and why:
//! - each operation writes the next blocks of the preallocated 16 MB file,
//!   wrapping at its end, as a WAL segment is written (pg_test_fsync rewrites
//!   the same offset: `--pg-offsets` does that too, for comparisons);
//! - where the filesystem refuses O_DIRECT, open_datasync and open_sync are
//!   measured without it (pg_test_fsync prints n/a*), and the header says so;
//! - the test file must not exist yet: pg_test_fsync overwrites, then
//!   deletes, whatever `-f` names.
//!
//! What it is not: a throughput benchmark (`walden bench`,
//! bench/compare-fio.sh), nor a crash test of the device's write cache.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use walden::config::SyncMethod;
use walden::io::aligned::{AlignedBuf, SharedBuf};
use walden::io::file::{self, OpenMode, SegmentFile};
use walden::io::probe;
use walden::io::uring::{Completion, EventFd, WalQueue};

/// PostgreSQL's XLOG_BLCKSZ: the size of one WAL write in pg_test_fsync.
const XLOG_BLCKSZ: usize = 8192;
/// The test file's size, one default WAL segment (pg_test_fsync's too).
const FILE_SIZE: u64 = 16 << 20;
/// The methods in pg_test_fsync's order ("wal_sync_method preference order,
/// except fdatasync is Linux's default"), which also breaks ties.
const METHODS: [SyncMethod; 4] = [
    SyncMethod::OpenDatasync,
    SyncMethod::Fdatasync,
    SyncMethod::Fsync,
    SyncMethod::OpenSync,
];
const DEFAULT_FILENAME: &str = "walden_test_fsync.out";

#[derive(Args, Debug)]
#[command(
    after_help = "Measures how fast this device makes 8kB WAL writes durable: pg_test_fsync's \
                  sections and output, each line with p50 and p99 latency per operation, then \
                  every wal_sync_method as walden's flusher issues it (plain write and sync; \
                  through io_uring one write and its sync, and a batch of N writes and one \
                  sync, with O_DIRECT and without), and a recommendation.\n\n\
                  Run it on the device that will hold the WAL (FILE's directory), on an \
                  otherwise idle machine. A full run takes about 36 x SECS."
)]
pub struct TestFsyncArgs {
    /// Seconds each test runs: a positive number, fractions allowed (e.g. 0.5).
    /// pg_test_fsync's default is 5.
    #[arg(
        short = 's',
        long = "secs-per-test",
        value_name = "SECS",
        default_value = "5",
        allow_negative_numbers = true,
        value_parser = parse_secs
    )]
    secs_per_test: f64,

    /// Test file, on the device to measure. Created (it must not exist yet),
    /// filled with 16 MB of random data and removed at the end.
    #[arg(short = 'f', long = "filename", value_name = "FILE", default_value = DEFAULT_FILENAME)]
    filename: PathBuf,

    /// Writes per io_uring batch: each batch is N 8kB writes submitted
    /// together, then one fdatasync/fsync (none for open_datasync/open_sync).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 8,
        value_parser = clap::value_parser!(u32).range(1..=128)
    )]
    batch: u32,

    /// Print every result as one JSON document on stdout instead of the text report.
    #[arg(long)]
    json: bool,

    /// In pg_test_fsync's sections, rewrite the offsets pg_test_fsync rewrites
    /// (from offset 0, every operation) instead of cycling through the file as
    /// a WAL segment is written: for a like-for-like comparison with it.
    #[arg(long)]
    pg_offsets: bool,
}

/// `-s`: pg_test_fsync takes whole seconds from 1; fractions serve quick runs.
fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 5 or 0.5)"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("must be greater than 0 seconds, got {s:?}"));
    }
    if v > 86_400.0 {
        return Err(format!(
            "must be at most 86400 seconds (one day), got {s:?}"
        ));
    }
    Ok(v)
}

pub fn run(args: TestFsyncArgs) -> anyhow::Result<()> {
    let per_test = Duration::from_secs_f64(args.secs_per_test);
    let batch = args.batch as usize;
    let dir = match args.filename.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "could not create test file \"{}\": directory \"{}\" does not exist",
            args.filename.display(),
            dir.display()
        );
    }
    let dir = dir.canonicalize().unwrap_or(dir);
    let filesystem = probe::filesystem(&dir).ok();

    let test_file = TestFile::create(&args.filename)?;
    let ctx = Ctx::new(test_file, per_test, args.pg_offsets)?;

    let mut out = Report::new(args.json);
    out.header(&args, &dir, filesystem, ctx.direct_ok)?;

    sync_methods(&ctx, &mut out, 1)?;
    sync_methods(&ctx, &mut out, 2)?;
    open_sync_sizes(&ctx, &mut out)?;
    non_write_descriptor(&ctx, &mut out)?;
    non_synced_writes(&ctx, &mut out)?;
    plain_writes(&ctx, &mut out)?;
    through_io_uring(&ctx, &mut out, batch)?;

    let recommendation = recommend(&out.sections, ctx.direct_ok, args.batch);
    out.recommendation(&recommendation, args.batch, filesystem)?;

    // Remove the file before the JSON goes out: a reader may act at once.
    drop(ctx);
    if args.json {
        let doc = JsonReport {
            secs_per_test: args.secs_per_test,
            filename: &args.filename,
            filesystem: filesystem.map(|f| f.describe()),
            memory_filesystem: filesystem.is_some_and(|f| f.is_memory()),
            o_direct: out.direct_ok,
            batch: args.batch,
            pg_offsets: args.pg_offsets,
            erratic_lines: erratic_lines(&out.sections).0,
            sections: &out.sections,
            recommendation: &recommendation,
        };
        let text = serde_json::to_string_pretty(&doc)?;
        writeln!(std::io::stdout(), "{text}").context("could not write to standard output")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The test file and what every test shares.

/// The test file; removed when dropped, on success and on error alike.
struct TestFile {
    path: PathBuf,
}

impl TestFile {
    /// Creates the file and writes it out whole (random data, then fsync), so
    /// that every test overwrites allocated blocks, as pg_test_fsync does.
    fn create(path: &Path) -> anyhow::Result<TestFile> {
        let mode = OpenMode {
            write: true,
            create_new: true,
            ..Default::default()
        };
        let f = match SegmentFile::open(path, mode) {
            Ok(f) => f,
            Err(e) if e.source.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "test file \"{}\" already exists: remove it (an interrupted run leaves it behind) \
                 or choose another with -f",
                path.display()
            ),
            Err(e) => return Err(e).context("could not create the test file"),
        };
        let guard = TestFile {
            path: path.to_path_buf(),
        };
        let mut data = AlignedBuf::zeroed(FILE_SIZE as usize);
        fill_random(&mut data);
        f.write_all_at(&data, 0)?;
        // Sync now so that dirty pages do not skew the first tests.
        f.fsync()?;
        Ok(guard)
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        if let Err(e) = file::remove_file(&self.path) {
            eprintln!("walden: warning: {e}");
        }
    }
}

/// Random bytes (xorshift64*): a device that compresses or deduplicates must
/// not get an easy ride, as in pg_test_fsync.
fn fill_random(buf: &mut [u8]) {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15)
        | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

struct Ctx {
    file: TestFile,
    per_test: Duration,
    /// 16kB of random data, aligned for O_DIRECT: the source of every pwrite.
    data: AlignedBuf,
    /// Whether the filesystem accepts O_DIRECT.
    direct_ok: bool,
    /// `--pg-offsets`: pg_test_fsync's sections rewrite the start of the file.
    pg_offsets: bool,
}

impl Ctx {
    fn new(file: TestFile, per_test: Duration, pg_offsets: bool) -> anyhow::Result<Ctx> {
        let mut data = AlignedBuf::zeroed(2 * XLOG_BLCKSZ);
        fill_random(&mut data);
        let probe = SegmentFile::open(
            &file.path,
            OpenMode {
                write: true,
                direct: true,
                ..Default::default()
            },
        )?;
        let direct_ok = probe.is_direct();
        Ok(Ctx {
            file,
            per_test,
            data,
            direct_ok,
            pg_offsets,
        })
    }

    fn open(&self, mode: OpenMode) -> anyhow::Result<SegmentFile> {
        Ok(SegmentFile::open(&self.file.path, mode)?)
    }

    /// The open mode of `method` for writing (O_DIRECT if asked and possible).
    fn mode(&self, method: SyncMethod, direct: bool) -> OpenMode {
        OpenMode {
            write: true,
            direct: direct && self.direct_ok,
            dsync: method == SyncMethod::OpenDatasync,
            sync: method == SyncMethod::OpenSync,
            ..Default::default()
        }
    }

    fn block(&self, len: usize) -> &[u8] {
        &self.data[..len]
    }

    /// Where the `op`-th operation of a pg_test_fsync section starts.
    fn pg_slot(&self, op: u64, bytes_per_op: usize) -> u64 {
        if self.pg_offsets {
            0
        } else {
            slot(op, bytes_per_op)
        }
    }
}

/// Offset of the `op`-th run of `bytes_per_op` bytes, cycling through the file.
fn slot(op: u64, bytes_per_op: usize) -> u64 {
    let slots = FILE_SIZE / bytes_per_op as u64;
    (op % slots) * bytes_per_op as u64
}

// ---------------------------------------------------------------------------
// Timing.

/// One test's figures. Latencies are of one operation (a line's unit of work).
#[derive(Clone, Debug, Serialize)]
struct Stats {
    ops: u64,
    secs: f64,
    ops_per_sec: f64,
    usecs_per_op: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

/// Runs `op(0)`, `op(1)`, ... until `per_test` has passed (at least once),
/// timing each.
fn measure(
    per_test: Duration,
    mut op: impl FnMut(u64) -> anyhow::Result<()>,
) -> anyhow::Result<Stats> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)?;
    let start = Instant::now();
    let mut last = start;
    let mut ops = 0u64;
    loop {
        op(ops)?;
        let now = Instant::now();
        hist.saturating_record((now - last).as_nanos() as u64);
        last = now;
        ops += 1;
        if now - start >= per_test {
            break;
        }
    }
    let secs = (last - start).as_secs_f64();
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(Stats {
        ops,
        secs,
        ops_per_sec: ops as f64 / secs,
        usecs_per_op: secs / ops as f64 * 1e6,
        p50_us: us(hist.value_at_quantile(0.50)),
        p99_us: us(hist.value_at_quantile(0.99)),
        max_us: us(hist.max()),
    })
}

// ---------------------------------------------------------------------------
// The report: printed as it goes (label first, then the figures, as
// pg_test_fsync does), and kept for --json and the recommendation.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Via {
    /// write(2)/pwrite(2) and fdatasync(2)/fsync(2), as pg_test_fsync.
    Pwrite,
    /// io_uring, as walden's flusher.
    IoUring,
}

#[derive(Debug, Serialize)]
struct Line {
    label: String,
    /// The `wal_sync_method` this line measures, if it is one.
    method: Option<&'static str>,
    via: Via,
    /// O_DIRECT in force for this line.
    direct: bool,
    writes_per_op: u32,
    write_bytes: u32,
    /// None when the test could not run here (see `note`).
    result: Option<Stats>,
    note: Option<String>,
}

#[derive(Debug, Serialize)]
struct Section {
    key: &'static str,
    title: String,
    lines: Vec<Line>,
}

/// What a line measures; its result is filled in by [`Report::run`].
struct Spec {
    label: String,
    method: Option<&'static str>,
    via: Via,
    direct: bool,
    writes_per_op: usize,
    write_bytes: usize,
}

impl Spec {
    fn new(
        label: &str,
        method: Option<SyncMethod>,
        via: Via,
        direct: bool,
        writes_per_op: usize,
        write_bytes: usize,
    ) -> Spec {
        Spec {
            label: label.to_string(),
            method: method.map(SyncMethod::name),
            via,
            direct,
            writes_per_op,
            write_bytes,
        }
    }

    fn into_line(self, result: Option<Stats>, note: Option<String>) -> Line {
        Line {
            label: self.label.trim().to_string(),
            method: self.method,
            via: self.via,
            direct: self.direct,
            writes_per_op: self.writes_per_op as u32,
            write_bytes: self.write_bytes as u32,
            result,
            note,
        }
    }
}

struct Report {
    json: bool,
    direct_ok: bool,
    sections: Vec<Section>,
}

impl Report {
    fn new(json: bool) -> Report {
        Report {
            json,
            direct_ok: false,
            sections: Vec::new(),
        }
    }

    /// Writes to stdout (nothing with --json), flushed so that a label shows
    /// while its test runs. A closed stdout (`| head`) ends the run through
    /// the error path, which removes the test file.
    fn emit(&self, text: &str, end_line: bool) -> anyhow::Result<()> {
        if self.json {
            return Ok(());
        }
        let mut stdout = std::io::stdout().lock();
        let written = if end_line {
            writeln!(stdout, "{text}")
        } else {
            write!(stdout, "{text}")
        };
        written
            .and_then(|()| stdout.flush())
            .context("could not write to standard output")
    }

    fn say(&self, text: &str) -> anyhow::Result<()> {
        self.emit(text, true)
    }

    fn header(
        &mut self,
        args: &TestFsyncArgs,
        dir: &Path,
        fs: Option<probe::Filesystem>,
        direct_ok: bool,
    ) -> anyhow::Result<()> {
        self.direct_ok = direct_ok;
        if args.secs_per_test == 1.0 {
            self.say("1 second per test")?;
        } else {
            self.say(&format!("{} seconds per test", args.secs_per_test))?;
        }
        let fs_name = fs
            .map(|f| f.describe())
            .unwrap_or_else(|| "unknown filesystem".into());
        if direct_ok {
            self.say("O_DIRECT supported on this platform for open_datasync and open_sync.")?;
        } else {
            self.say(&format!(
                "O_DIRECT is not supported on {} ({fs_name}), testing without it.",
                dir.display()
            ))?;
        }
        if fs.is_some_and(|f| f.is_memory()) {
            self.say(&format!(
                "{} is {fs_name}: there is no device behind it{}, every sync is free, and these \
                 figures measure memory, not a disk.",
                dir.display(),
                if direct_ok {
                    " (O_DIRECT is accepted but means nothing)"
                } else {
                    ""
                }
            ))?;
        }
        Ok(())
    }

    fn section(&mut self, key: &'static str, title: String, notes: &[&str]) -> anyhow::Result<()> {
        self.say("")?;
        self.say(&title)?;
        for n in notes {
            self.say(n)?;
        }
        self.sections.push(Section {
            key,
            title,
            lines: Vec::new(),
        });
        Ok(())
    }

    fn label(&self, label: &str) -> anyhow::Result<()> {
        self.emit(&format!("        {label:<30}"), false)
    }

    fn push(&mut self, line: Line) {
        self.sections
            .last_mut()
            .expect("a section")
            .lines
            .push(line);
    }

    /// Runs one test and prints its line. A write that O_DIRECT refuses
    /// (smaller than the device's logical block) makes the line `n/a*`;
    /// any other error ends the run.
    fn run(
        &mut self,
        spec: Spec,
        test: impl FnOnce() -> anyhow::Result<Stats>,
    ) -> anyhow::Result<()> {
        self.label(&spec.label)?;
        match test() {
            Ok(st) => {
                self.say(&format!(
                    "{:13.3} ops/sec  {:6.0} usecs/op  p50 {} us  p99 {} us",
                    st.ops_per_sec,
                    st.usecs_per_op,
                    fmt_us(st.p50_us),
                    fmt_us(st.p99_us)
                ))?;
                self.push(spec.into_line(Some(st), None));
                Ok(())
            }
            Err(e) if spec.direct && is_invalid_argument(&e) => {
                let note = format!("O_DIRECT refused the write: {e:#}");
                self.finish_not_available(spec, "n/a*", note)
            }
            Err(e) => {
                // End the half-printed line; the error goes to stderr.
                let _ = self.say("");
                Err(e.context(format!("test \"{}\" failed", spec.label.trim())))
            }
        }
    }

    /// Prints a line whose test cannot run here, as pg_test_fsync's `n/a`.
    fn not_available(&mut self, spec: Spec, text: &str, note: String) -> anyhow::Result<()> {
        self.label(&spec.label)?;
        self.finish_not_available(spec, text, note)
    }

    /// The rest of a `n/a` line whose label is printed.
    fn finish_not_available(&mut self, spec: Spec, text: &str, note: String) -> anyhow::Result<()> {
        self.say(&format!("{text:>21}"))?;
        self.push(spec.into_line(None, Some(note)));
        Ok(())
    }

    fn footnotes(&self) -> anyhow::Result<()> {
        let lines = &self.sections.last().expect("a section").lines;
        if lines
            .iter()
            .any(|l| l.note.as_deref().is_some_and(|n| n.starts_with("O_DIRECT")))
        {
            self.say("* O_DIRECT is not supported for these writes on this filesystem or device.")?;
        }
        Ok(())
    }

    fn recommendation(
        &self,
        rec: &Recommendation,
        batch: u32,
        fs: Option<probe::Filesystem>,
    ) -> anyhow::Result<()> {
        self.say("")?;
        match &rec.single {
            Some(p) => self.say(&format!(
                "Recommendation: wal_sync_method = {}",
                p.describe("")
            ))?,
            None => self.say("Recommendation: none (no sync method could be measured)")?,
        }
        if let Some(d) = &rec.depth_1 {
            self.say(&format!(
                "  one write at a time: wal_sync_at_depth_1 = {} (plain write p50 {} us, io_uring {} us)",
                if d.wal_sync_at_depth_1 { "on" } else { "off" },
                fmt_us(d.plain_p50_us),
                fmt_us(d.io_uring_p50_us)
            ))?;
        }
        if let Some(p) = &rec.batch {
            self.say(&format!(
                "  in batches of {batch} writes: wal_sync_method = {}",
                p.describe(" per batch")
            ))?;
        }
        self.say(&format!(
            "  (p50 latency {}, as walden's flusher writes)",
            if rec.direct {
                "with O_DIRECT"
            } else {
                "without O_DIRECT"
            }
        ))?;
        if fs.is_some_and(|f| f.is_memory()) {
            self.say("  (measured in memory: this says nothing about a disk)")?;
        }
        let (erratic, measured) = erratic_lines(&self.sections);
        if erratic * 4 >= measured && erratic > 0 {
            self.say(&format!(
                "  (latency was erratic: p99 above 10x p50 on {erratic} of {measured} synced lines; \
                 the machine or the device was busy, so run again when it is idle)"
            ))?;
        }
        Ok(())
    }
}

/// Microseconds for a latency column: one decimal below 10 us.
fn fmt_us(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// EINVAL anywhere in the error's chain.
fn is_invalid_argument(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::InvalidInput)
}

// ---------------------------------------------------------------------------
// pg_test_fsync's sections.

fn sync_methods(ctx: &Ctx, out: &mut Report, writes: usize) -> anyhow::Result<()> {
    let (key, title) = if writes == 1 {
        (
            "one_write",
            "Compare file sync methods using one 8kB write:",
        )
    } else {
        (
            "two_writes",
            "Compare file sync methods using two 8kB writes:",
        )
    };
    out.section(
        key,
        title.to_string(),
        &["(in wal_sync_method preference order, except fdatasync is Linux's default)"],
    )?;
    let bytes = writes * XLOG_BLCKSZ;
    let write_all = |f: &SegmentFile, op: u64| -> anyhow::Result<()> {
        let base = ctx.pg_slot(op, bytes);
        for w in 0..writes {
            f.write_all_at(ctx.block(XLOG_BLCKSZ), base + (w * XLOG_BLCKSZ) as u64)?;
        }
        Ok(())
    };
    for method in METHODS {
        if method == SyncMethod::OpenSync {
            // Write-through fsync is F_FULLFSYNC (macOS) or _commit (Windows).
            let mut spec = Spec::new(
                "fsync_writethrough",
                None,
                Via::Pwrite,
                false,
                writes,
                XLOG_BLCKSZ,
            );
            spec.method = Some("fsync_writethrough");
            out.not_available(spec, "n/a", "not available on Linux".to_string())?;
        }
        // As pg_test_fsync: O_DIRECT for the open_* methods only.
        let direct = method.syncs_on_write() && ctx.direct_ok;
        let spec = Spec::new(
            method.name(),
            Some(method),
            Via::Pwrite,
            direct,
            writes,
            XLOG_BLCKSZ,
        );
        out.run(spec, || {
            let f = ctx.open(ctx.mode(method, direct))?;
            measure(ctx.per_test, |op| {
                write_all(&f, op)?;
                sync_after_writes(&f, method)
            })
        })?;
    }
    out.footnotes()?;
    Ok(())
}

fn open_sync_sizes(ctx: &Ctx, out: &mut Report) -> anyhow::Result<()> {
    out.section(
        "open_sync_sizes",
        "Compare open_sync with different write sizes:".to_string(),
        &[
            "(This is designed to compare the cost of writing 16kB in different write",
            "open_sync sizes.)",
        ],
    )?;
    let sizes = [
        (" 1 * 16kB open_sync write", 16),
        (" 2 *  8kB open_sync writes", 8),
        (" 4 *  4kB open_sync writes", 4),
        (" 8 *  2kB open_sync writes", 2),
        ("16 *  1kB open_sync writes", 1),
    ];
    let direct = ctx.direct_ok;
    for (label, kb) in sizes {
        let (size, writes) = (kb * 1024, 16 / kb);
        let spec = Spec::new(
            label,
            Some(SyncMethod::OpenSync),
            Via::Pwrite,
            direct,
            writes,
            size,
        );
        out.run(spec, || {
            let f = ctx.open(ctx.mode(SyncMethod::OpenSync, direct))?;
            measure(ctx.per_test, |op| {
                let base = ctx.pg_slot(op, 16 * 1024);
                for w in 0..writes {
                    f.write_all_at(ctx.block(size), base + (w * size) as u64)?;
                }
                Ok(())
            })
        })?;
    }
    out.footnotes()?;
    Ok(())
}

fn non_write_descriptor(ctx: &Ctx, out: &mut Report) -> anyhow::Result<()> {
    out.section(
        "non_write_descriptor",
        "Test if fsync on non-write file descriptor is honored:".to_string(),
        &[
            "(If the times are similar, fsync() can sync data written on a different",
            "descriptor.)",
        ],
    )?;
    let plain = OpenMode {
        write: true,
        ..Default::default()
    };
    // First the usual way, then write and fsync on different descriptors
    // (one process fsyncing another's writes). Both open the file twice.
    let spec = Spec::new(
        "write, fsync, close",
        None,
        Via::Pwrite,
        false,
        1,
        XLOG_BLCKSZ,
    );
    out.run(spec, || {
        measure(ctx.per_test, |op| {
            let f = ctx.open(plain)?;
            f.write_all_at(ctx.block(XLOG_BLCKSZ), ctx.pg_slot(op, XLOG_BLCKSZ))?;
            f.fsync()?;
            drop(f);
            drop(ctx.open(plain)?);
            Ok(())
        })
    })?;
    let spec = Spec::new(
        "write, close, fsync",
        None,
        Via::Pwrite,
        false,
        1,
        XLOG_BLCKSZ,
    );
    out.run(spec, || {
        measure(ctx.per_test, |op| {
            let f = ctx.open(plain)?;
            f.write_all_at(ctx.block(XLOG_BLCKSZ), ctx.pg_slot(op, XLOG_BLCKSZ))?;
            drop(f);
            let f = ctx.open(plain)?;
            f.fsync()?;
            Ok(())
        })
    })
}

fn non_synced_writes(ctx: &Ctx, out: &mut Report) -> anyhow::Result<()> {
    out.section("non_synced", "Non-sync'ed 8kB writes:".to_string(), &[])?;
    let spec = Spec::new("write", None, Via::Pwrite, false, 1, XLOG_BLCKSZ);
    out.run(spec, || {
        let f = ctx.open(OpenMode {
            write: true,
            ..Default::default()
        })?;
        measure(ctx.per_test, |op| {
            f.write_all_at(ctx.block(XLOG_BLCKSZ), ctx.pg_slot(op, XLOG_BLCKSZ))?;
            Ok(())
        })
    })
}

/// The sync that follows the writes of `method` (none for the open_* methods,
/// whose writes are durable when they return).
fn sync_after_writes(f: &SegmentFile, method: SyncMethod) -> anyhow::Result<()> {
    match method {
        SyncMethod::Fdatasync => f.datasync()?,
        SyncMethod::Fsync => f.fsync()?,
        SyncMethod::OpenDatasync | SyncMethod::OpenSync => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// walden's sections: the methods as its flusher issues them.

/// The flusher at queue depth 1 (`wal_sync_at_depth_1`): one write and its
/// sync with plain syscalls, every method on a file opened with O_DIRECT
/// (pg_test_fsync's sections use O_DIRECT for the open_* methods only).
fn plain_writes(ctx: &Ctx, out: &mut Report) -> anyhow::Result<()> {
    let how = if ctx.direct_ok {
        "O_DIRECT"
    } else {
        "without O_DIRECT"
    };
    out.section(
        "plain_one_write",
        format!("Compare sync methods with plain writes, one 8kB write, {how}:"),
        &["(pwrite, then fdatasync/fsync: walden's flusher at queue depth 1)"],
    )?;
    for method in METHODS {
        let spec = Spec::new(
            method.name(),
            Some(method),
            Via::Pwrite,
            ctx.direct_ok,
            1,
            XLOG_BLCKSZ,
        );
        out.run(spec, || {
            let f = ctx.open(ctx.mode(method, true))?;
            measure(ctx.per_test, |op| {
                f.write_all_at(ctx.block(XLOG_BLCKSZ), slot(op, XLOG_BLCKSZ))?;
                sync_after_writes(&f, method)
            })
        })?;
    }
    out.footnotes()
}

/// An io_uring with `batch` 8kB blocks of random data registered, issuing
/// writes and syncs the way walden's flusher does.
struct UringWriter {
    queue: WalQueue,
    done: Vec<Completion>,
}

/// user_data of a sync; writes use their index in the batch.
const SYNC_USER_DATA: u64 = 1 << 32;

impl UringWriter {
    fn new(batch: usize) -> std::io::Result<UringWriter> {
        let mut data = vec![0u8; batch * XLOG_BLCKSZ];
        fill_random(&mut data);
        let shared = SharedBuf::zeroed(data.len());
        // SAFETY: the buffer was just created; no other thread and no
        // io_uring can see it yet.
        unsafe { shared.write(0, &data) };
        let wake = Arc::new(EventFd::new()?);
        // max_chain (half the entries) must hold a whole batch, plus room
        // for the pending eventfd read.
        let entries = ((batch + 2).next_power_of_two() * 2).max(8) as u32;
        let queue = WalQueue::new(entries, Arc::new(shared), 1, wake)?;
        Ok(UringWriter {
            queue,
            done: Vec::new(),
        })
    }

    /// One operation: `writes` 8kB writes at `base` (and on), then the
    /// method's sync if it has one. One write is linked to its sync (one
    /// submission); several run in parallel and the sync follows when all
    /// are done, as in the flusher.
    fn op(&mut self, fd: i32, method: SyncMethod, writes: usize, base: u64) -> anyhow::Result<()> {
        let sync = match method {
            SyncMethod::Fdatasync => Some(true),
            SyncMethod::Fsync => Some(false),
            SyncMethod::OpenDatasync | SyncMethod::OpenSync => None,
        };
        let linked = writes == 1 && sync.is_some();
        self.queue.begin_chain(writes + usize::from(linked))?;
        for w in 0..writes {
            let off = w * XLOG_BLCKSZ;
            self.queue
                .write_ring(fd, off, XLOG_BLCKSZ, base + off as u64, w as u64, linked)?;
        }
        if linked {
            self.queue
                .sync(fd, sync == Some(true), SYNC_USER_DATA, false)?;
            return self.wait(writes + 1);
        }
        self.wait(writes)?;
        if let Some(datasync) = sync {
            self.queue.sync(fd, datasync, SYNC_USER_DATA, false)?;
            self.wait(1)?;
        }
        Ok(())
    }

    /// Waits for `n` completions; the first failure (in submission order:
    /// a failed write before the sync it cancelled) is the error.
    fn wait(&mut self, n: usize) -> anyhow::Result<()> {
        self.done.clear();
        while self.done.len() < n {
            self.queue.submit_and_wait(n - self.done.len(), None)?;
            self.queue.reap(&mut self.done);
        }
        self.done.sort_by_key(|c| c.user_data);
        for c in &self.done {
            let what = if c.user_data == SYNC_USER_DATA {
                "sync"
            } else {
                "write"
            };
            if c.result < 0 {
                let err = std::io::Error::from_raw_os_error(-c.result);
                return Err(anyhow::Error::new(err).context(format!("io_uring {what} failed")));
            }
            if what == "write" && c.result as usize != XLOG_BLCKSZ {
                bail!("io_uring short write: {} of {XLOG_BLCKSZ} bytes", c.result);
            }
        }
        Ok(())
    }
}

fn through_io_uring(ctx: &Ctx, out: &mut Report, batch: usize) -> anyhow::Result<()> {
    let mut uring = UringWriter::new(batch);
    let mut told = false;
    for direct in [true, false] {
        for writes in [1, batch] {
            let key = match (direct, writes == 1) {
                (true, true) => "io_uring_one_write_direct",
                (true, false) => "io_uring_batch_direct",
                (false, true) => "io_uring_one_write_buffered",
                (false, false) => "io_uring_batch_buffered",
            };
            let how = if direct {
                "O_DIRECT"
            } else {
                "without O_DIRECT"
            };
            let (title, note) = if writes == 1 {
                (
                    format!("Compare sync methods through io_uring, one 8kB write, {how}:"),
                    "(the write and its fdatasync/fsync linked in one submission)".to_string(),
                )
            } else {
                (
                    format!("Compare sync methods through io_uring, a batch of {writes} 8kB writes, {how}:"),
                    "(the writes submitted together, then one fdatasync/fsync when all are done)".to_string(),
                )
            };
            out.section(key, title, &[&note])?;
            if let (Err(e), false) = (&uring, told) {
                out.say(&format!("(io_uring is not available here: {e})"))?;
                told = true;
            }
            for method in METHODS {
                let spec = Spec::new(
                    method.name(),
                    Some(method),
                    Via::IoUring,
                    direct,
                    writes,
                    XLOG_BLCKSZ,
                );
                if direct && !ctx.direct_ok {
                    out.not_available(
                        spec,
                        "n/a*",
                        "O_DIRECT is not supported on this filesystem".into(),
                    )?;
                    continue;
                }
                let u = match &mut uring {
                    Ok(u) => u,
                    Err(e) => {
                        out.not_available(spec, "n/a", format!("io_uring is not available: {e}"))?;
                        continue;
                    }
                };
                out.run(spec, || {
                    let f = ctx.open(ctx.mode(method, direct))?;
                    measure(ctx.per_test, |op| {
                        u.op(f.raw_fd(), method, writes, slot(op, writes * XLOG_BLCKSZ))
                    })
                })?;
            }
            out.footnotes()?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The recommendation.

#[derive(Debug, Serialize)]
struct Pick {
    wal_sync_method: &'static str,
    writes_per_op: u32,
    /// The path of the pick's best line.
    via: Via,
    p50_us: f64,
    /// The best other method.
    runner_up: Option<&'static str>,
    runner_up_p50_us: Option<f64>,
    /// The runner-up's p50 over the pick's.
    margin: Option<f64>,
}

impl Pick {
    /// `open_datasync (p50 86 us, 1.21x faster than fdatasync)`; `unit`
    /// follows the p50 figure.
    fn describe(&self, unit: &str) -> String {
        let mut s = format!(
            "{} (p50 {} us{unit}",
            self.wal_sync_method,
            fmt_us(self.p50_us)
        );
        if let (Some(r), Some(m)) = (self.runner_up, self.margin) {
            s.push_str(&format!(", {m:.2}x faster than {r}"));
            // p50s move by about this much from run to run on a quiet
            // machine (measured here): a smaller margin is a tie.
            if m < 1.10 {
                s.push_str(": within 10%, either will do");
            }
        } else {
            s.push_str(", no other method measured");
        }
        s.push(')');
        s
    }
}

/// One write at a time, the picked method: plain write or io_uring.
#[derive(Debug, Serialize)]
struct DepthOne {
    wal_sync_at_depth_1: bool,
    plain_p50_us: f64,
    io_uring_p50_us: f64,
}

#[derive(Debug, Serialize)]
struct Recommendation {
    /// Best p50 of one 8kB write and its sync, by either path: the commit
    /// latency of a quiet server.
    single: Option<Pick>,
    /// For the single pick: which path `wal_sync_at_depth_1` should choose.
    depth_1: Option<DepthOne>,
    /// Best p50 of a batch of writes and one sync through io_uring: the
    /// flusher with several writes in flight.
    batch: Option<Pick>,
    /// O_DIRECT in force for the lines compared (the flusher's choice).
    direct: bool,
}

/// Synced lines whose p99 is above 10x their p50, and all synced lines
/// measured: many erratic lines mean something else used the CPU or the
/// device (a sync waiting for a busy CPU shows up as a 4 ms tick).
fn erratic_lines(sections: &[Section]) -> (usize, usize) {
    let synced = sections
        .iter()
        .filter(|s| s.key != "non_synced")
        .flat_map(|s| &s.lines)
        .filter_map(|l| l.result.as_ref());
    synced.fold((0, 0), |(erratic, all), r| {
        (erratic + usize::from(r.p99_us > 10.0 * r.p50_us), all + 1)
    })
}

/// The best line of each method among `keys`' sections, best first; ties go
/// to the earlier method in pg_test_fsync's order, then the earlier section.
fn best_per_method(sections: &[Section], keys: &[&str]) -> Vec<(&'static str, Via, f64)> {
    let mut best: Vec<(&'static str, Via, f64)> = Vec::new();
    for s in sections.iter().filter(|s| keys.contains(&s.key)) {
        for l in &s.lines {
            let (Some(m), Some(r)) = (l.method, &l.result) else {
                continue;
            };
            match best.iter_mut().find(|b| b.0 == m) {
                Some(b) if r.p50_us < b.2 => *b = (m, l.via, r.p50_us),
                Some(_) => {}
                None => best.push((m, l.via, r.p50_us)),
            }
        }
    }
    best.sort_by_key(|b| METHODS.iter().position(|m| m.name() == b.0));
    best.sort_by(|a, b| a.2.total_cmp(&b.2)); // stable
    best
}

fn pick(best: &[(&'static str, Via, f64)], writes: u32) -> Option<Pick> {
    let (method, via, p50) = *best.first()?;
    let runner = best.get(1);
    Some(Pick {
        wal_sync_method: method,
        writes_per_op: writes,
        via,
        p50_us: p50,
        runner_up: runner.map(|r| r.0),
        runner_up_p50_us: runner.map(|r| r.2),
        margin: runner.map(|r| r.2 / p50.max(1e-3)),
    })
}

/// The method with the lowest p50 on the lines walden's flusher would issue
/// here (O_DIRECT when the filesystem has it): one write at a time (plain
/// write or io_uring, which `wal_sync_at_depth_1` chooses between), and a
/// batch of writes through io_uring.
fn recommend(sections: &[Section], direct_ok: bool, batch: u32) -> Recommendation {
    let (uring_one, uring_batch) = if direct_ok {
        ("io_uring_one_write_direct", "io_uring_batch_direct")
    } else {
        ("io_uring_one_write_buffered", "io_uring_batch_buffered")
    };
    let single = pick(
        &best_per_method(sections, &["plain_one_write", uring_one]),
        1,
    );
    let depth_1 = single.as_ref().and_then(|p| {
        let p50 = |key| {
            best_per_method(sections, &[key])
                .into_iter()
                .find(|b| b.0 == p.wal_sync_method)
                .map(|b| b.2)
        };
        let (plain, uring) = (p50("plain_one_write")?, p50(uring_one)?);
        Some(DepthOne {
            wal_sync_at_depth_1: plain <= uring,
            plain_p50_us: plain,
            io_uring_p50_us: uring,
        })
    });
    let batch = if batch > 1 {
        pick(&best_per_method(sections, &[uring_batch]), batch)
    } else {
        None
    };
    Recommendation {
        single,
        depth_1,
        batch,
        direct: direct_ok,
    }
}

#[derive(Serialize)]
struct JsonReport<'a> {
    secs_per_test: f64,
    filename: &'a Path,
    filesystem: Option<String>,
    /// tmpfs or ramfs: no device behind the figures.
    memory_filesystem: bool,
    /// Whether the filesystem accepts O_DIRECT.
    o_direct: bool,
    batch: u32,
    pg_offsets: bool,
    /// Synced lines with p99 above 10x p50 (a busy machine or device).
    erratic_lines: usize,
    sections: &'a [Section],
    recommendation: &'a Recommendation,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secs_must_be_a_positive_number() {
        assert_eq!(parse_secs("1"), Ok(1.0));
        assert_eq!(parse_secs("0.25"), Ok(0.25));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("abc").is_err());
        assert!(parse_secs("nan").is_err());
        assert!(parse_secs("inf").is_err());
    }

    fn section(key: &'static str, via: Via, writes: usize, p50s: [f64; 4]) -> Section {
        let lines = METHODS
            .iter()
            .zip(p50s)
            .map(|(m, p50)| {
                let stats = Stats {
                    ops: 1,
                    secs: 1.0,
                    ops_per_sec: 1.0,
                    usecs_per_op: p50,
                    p50_us: p50,
                    p99_us: p50,
                    max_us: p50,
                };
                // A negative p50 stands for a line that could not run.
                let result = (p50 > 0.0).then_some(stats);
                Spec::new(m.name(), Some(*m), via, true, writes, XLOG_BLCKSZ)
                    .into_line(result, None)
            })
            .collect();
        Section {
            key,
            title: key.to_string(),
            lines,
        }
    }

    #[test]
    fn the_recommendation_is_the_lowest_p50_with_its_margin() {
        // METHODS order: open_datasync, fdatasync, fsync, open_sync.
        let sections = [
            // pg_test_fsync's own lines never count, however fast.
            section("one_write", Via::Pwrite, 1, [1.0, 1.0, 1.0, 1.0]),
            section("plain_one_write", Via::Pwrite, 1, [100.0, 90.0, 95.0, -1.0]),
            section(
                "io_uring_one_write_direct",
                Via::IoUring,
                1,
                [80.0, 120.0, 130.0, 200.0],
            ),
            section(
                "io_uring_batch_direct",
                Via::IoUring,
                8,
                [400.0, 150.0, 200.0, 400.0],
            ),
            section(
                "io_uring_one_write_buffered",
                Via::IoUring,
                1,
                [2.0, 2.0, 2.0, 2.0],
            ),
        ];
        let rec = recommend(&sections, true, 8);
        let single = rec.single.unwrap();
        assert_eq!(single.wal_sync_method, "open_datasync");
        assert_eq!(single.via, Via::IoUring);
        assert_eq!(single.runner_up, Some("fdatasync"));
        assert!((single.margin.unwrap() - 90.0 / 80.0).abs() < 1e-9);
        assert!(single
            .describe("")
            .starts_with("open_datasync (p50 80 us, 1.12x faster than fdatasync"));
        let depth_1 = rec.depth_1.unwrap();
        assert!(!depth_1.wal_sync_at_depth_1);
        assert_eq!(
            (depth_1.plain_p50_us, depth_1.io_uring_p50_us),
            (100.0, 80.0)
        );
        let batch = rec.batch.unwrap();
        assert_eq!(
            (batch.wal_sync_method, batch.writes_per_op),
            ("fdatasync", 8)
        );
        assert_eq!(batch.runner_up, Some("fsync"));
    }

    #[test]
    fn ties_go_to_the_preferred_method_and_say_so() {
        let sections = [
            section("plain_one_write", Via::Pwrite, 1, [-1.0, 50.0, 50.0, 50.0]),
            section(
                "io_uring_one_write_direct",
                Via::IoUring,
                1,
                [-1.0, 60.0, 60.0, 60.0],
            ),
        ];
        let rec = recommend(&sections, true, 1);
        let single = rec.single.unwrap();
        assert_eq!(
            (single.wal_sync_method, single.via),
            ("fdatasync", Via::Pwrite)
        );
        assert!(single
            .describe("")
            .contains("1.00x faster than fsync: within 10%, either will do"));
        assert!(rec.depth_1.unwrap().wal_sync_at_depth_1);
        assert!(rec.batch.is_none());
        assert!(recommend(&[], true, 8).single.is_none());
    }

    #[test]
    fn slots_cycle_through_the_file_without_crossing_its_end() {
        assert_eq!(slot(0, 8192), 0);
        assert_eq!(slot(1, 8192), 8192);
        assert_eq!(slot(2048, 8192), 0);
        let bytes = 24 * 8192; // does not divide 16 MB
        let slots = FILE_SIZE / bytes as u64;
        assert_eq!(slot(slots, bytes), 0);
        assert!(slot(slots - 1, bytes) + bytes as u64 <= FILE_SIZE);
    }
}
