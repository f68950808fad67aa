//! `walden rewind` (pg_rewind): brings a stopped server whose WAL diverged
//! from a running source's (the old primary after a failover, a standby
//! that received WAL the new primary never had) back to a state from which
//! it starts as a standby of the source, without copying everything.
//!
//! The steps, in the order a crash of this tool must find them (the
//! marker `rewind_in_progress` first, the control file last, then the
//! marker removed; a store refuses to open while the marker exists):
//!
//! 1. the target is stopped (its directory locks are free and held by us
//!    for the whole run) and was shut down cleanly, or `--recover-first`
//!    runs its crash recovery and a clean shutdown in-process first;
//! 2. the source is the same system; its timeline's history says where the
//!    target's timeline ends (the divergence point S);
//! 3. the target's WAL is scanned: the last checkpoint wholly before S, and
//!    every page a record at or after S changed;
//! 4. those pages are fetched from the source (PageRead) and written;
//! 5. the target's WAL is cut at S, the source's history file stored, the
//!    switch segment started on the source's timeline, and the source's WAL
//!    streamed from S to at least its flush LSN E (and every fetched page's
//!    LSN);
//! 6. the control file: checkpoint and redo = the common checkpoint,
//!    timeline = the source's, minimum recovery point = E, "in archive
//!    recovery". The next start replays from the common checkpoint through
//!    the source's WAL (a record older than a fetched page is skipped by
//!    its page LSN) and is consistent at E.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use walden::client::Client;
use walden::io::aligned::AlignedBuf;
use walden::io::file;
use walden::io::lockfile::{Attempt, LockFile};
use walden::lock::{DirLocks, Holder, LockError};
use walden::protocol::PAGE_SIZE;
use walden::store::control::{self, ClusterState, ControlFile};
use walden::store::page::{self, PageTag};
use walden::store::relfiles::RelFiles;
use walden::store::rewind::{self as rw, REWIND_MARKER};
use walden::wal::timeline;
use walden::{Config, Lsn, Store, Wal};

const APPLICATION_NAME: &str = "walden_rewind";

#[derive(Args)]
#[command(disable_help_flag = true)]
pub struct RewindArgs {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// The target's directory (wal/ and data/ inside, as `walden serve -D
    /// DIR` uses them); its server must be stopped.
    #[arg(short = 'D', long = "target-pgdata")]
    dir: PathBuf,
    /// The running source server, HOST:PORT.
    #[arg(long = "source-server")]
    source_server: String,
    /// Show progress on standard error.
    #[arg(short = 'P', long)]
    progress: bool,
    /// Print what would be done; change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// A target that was not shut down cleanly: run its crash recovery
    /// and a clean shutdown first (pg_rewind's single-user mode).
    #[arg(long)]
    recover_first: bool,
    /// Write DIR/walden.auto.toml with primary_conninfo for the source:
    /// `walden serve -D DIR` then starts a standby of it.
    #[arg(short = 'R', long = "write-recovery-conf")]
    write_recovery_conf: bool,
    /// File holding the auth token.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

fn say(msg: impl std::fmt::Display) {
    eprintln!("walden rewind: {msg}");
}

pub fn run(args: RewindArgs) -> anyhow::Result<()> {
    let data_dir = args.dir.join("data");
    let wal_dir = args.dir.join("wal");
    for d in [&data_dir, &wal_dir] {
        if !d.is_dir() {
            bail!(
                "\"{}\" is not a walden data directory (no {})",
                args.dir.display(),
                d.display()
            );
        }
    }
    let addr = super::common::server_addr(Some(&args.source_server), None, None)?;
    let token = super::common::read_token(args.token_file.as_deref())?;

    // 1. The target: stopped, and shut down cleanly (or a standby's
    // directory: its pages never run ahead of its WAL, whose end is where
    // its replay resumes). The refusals here change no file.
    probe_not_running(&data_dir)?;
    probe_not_running(&wal_dir)?;
    let mut c = read_control(&data_dir)?;
    let clean = |c: &ControlFile| {
        matches!(
            c.state,
            ClusterState::ShutDown | ClusterState::InArchiveRecovery
        )
    };
    if !clean(&c) {
        if !args.recover_first || args.dry_run {
            bail!(
                "target server must be shut down cleanly (its control file says: {}); start and \
                 stop it once, or run `walden rewind --recover-first ...`",
                c.state
            );
        }
        say(format!(
            "the target was not shut down cleanly ({}): running crash recovery and a clean shutdown first",
            c.state
        ));
        let cfg = Config {
            data_dir: data_dir.clone(),
            wal_dir: wal_dir.clone(),
            wal_segment_size: walden::config::Size(c.wal_segment_size),
            data_checksums: c.data_checksum_version == 1,
            ..Config::default()
        };
        let store = Store::open(cfg).map_err(|e| match e {
            walden::store::StoreError::Lock(l) => target_running(l),
            e => anyhow::Error::new(e).context("crash recovery of the target failed"),
        })?;
        store
            .close()
            .context("the clean shutdown of the target failed")?;
        c = read_control(&data_dir)?;
        anyhow::ensure!(
            c.state == ClusterState::ShutDown,
            "the target is still not shut down cleanly after recovery (its control file says: {})",
            c.state
        );
    }
    let data_lock = lock(&data_dir)?;
    let wal_lock = lock(&wal_dir)?;
    let seg = c.wal_segment_size;
    let target_tli = timeline::latest_timeline(&wal_dir)?.max(c.timeline);

    // 2. The source, and the divergence point.
    let mut source = Client::connect(&addr, token.as_deref())
        .with_context(|| format!("could not connect to the source server at {addr}"))?;
    source.set_read_timeout(Some(Duration::from_secs(60)))?;
    if source.system_id != c.system_identifier {
        bail!(
            "source and target clusters are from different systems: the source's system \
             identifier is {}, the target's {}",
            source.system_id,
            c.system_identifier
        );
    }
    if source.segment_size != seg {
        bail!(
            "the source's wal_segment_size is {} but the target's is {seg}",
            source.segment_size
        );
    }
    let (_, _, _, json) = source
        .status()
        .context("could not ask the source its status")?;
    let status: serde_json::Value =
        serde_json::from_str(&json).context("the source's status is not JSON")?;
    let source_tli = status["timeline"]
        .as_u64()
        .and_then(|t| u32::try_from(t).ok())
        .context("the source's status has no timeline")?;
    if status["replication"]["role"].as_str() == Some("standby") {
        bail!("the source server is a standby; rewind from a primary");
    }
    let history_bytes = if source_tli > 1 {
        source
            .timeline_history(source_tli)
            .with_context(|| format!("could not fetch the history of timeline {source_tli}"))?
    } else {
        Vec::new()
    };
    let history = timeline::parse_history(
        &String::from_utf8_lossy(&history_bytes),
        Path::new(&timeline::history_file_name(source_tli)),
    )?;
    let plan = match rw::read_marker(&data_dir)? {
        Some(plan) => {
            if plan.source_timeline != source_tli {
                bail!(
                    "an interrupted rewind to timeline {} must be finished from a source on that \
                     timeline, but this source is on timeline {source_tli}; take a new base backup",
                    plan.source_timeline
                );
            }
            say(format!(
                "resuming an interrupted rewind: servers diverged at WAL location {} on \
                 timeline {}; {} page(s) are copied again",
                plan.divergence,
                plan.target_timeline,
                plan.pages.len()
            ));
            if args.dry_run {
                say("dry run: nothing was changed");
                return Ok(());
            }
            plan
        }
        None => {
            if source_tli == target_tli {
                say(format!(
                    "source and target are on the same timeline ({target_tli}); no rewind required"
                ));
                return Ok(());
            }
            let Some(s) = rw::divergence_point(target_tli, &history) else {
                bail!(
                    "the source's timeline history does not contain the target's timeline \
                     {target_tli} (the source is on timeline {source_tli})"
                );
            };
            if history.last().map(|e| e.parent) != Some(target_tli) {
                bail!(
                    "the source's timeline {source_tli} does not begin where the target's \
                     timeline {target_tli} ends (there are timelines in between): rewinding \
                     across several timelines is not supported; take a new base backup instead"
                );
            }
            say(format!(
                "servers diverged at WAL location {s} on timeline {target_tli}"
            ));

            // 3. The target's WAL.
            let scan = rw::scan_target(&wal_dir, seg, target_tli, s)?;
            if scan.end <= s {
                say(format!(
                    "the target's WAL ends at {}, at or before the divergence point: no rewind \
                     required (it can follow the source as a standby)",
                    scan.end
                ));
                return Ok(());
            }
            // The quorum floor: the control file's acknowledged LSN (what
            // this server last knew a quorum of standbys had flushed).
            rw::check_truncation_floor(s, c.acknowledged_lsn).map_err(anyhow::Error::msg)?;
            // The source must still hold its WAL from the divergence point
            // (it is streamed in below): asked before anything changes.
            if let Err(e) = source.read(s, 64 * 1024, 1) {
                bail!(
                    "the source has no WAL from the divergence point {s} ({e}); \
                     take a new base backup instead"
                );
            }
            let ckpt = match scan.checkpoint {
                Some(k) if k.redo >= scan.start => k,
                _ => bail!(
                    "could not find a previous checkpoint before the divergence point {s} in \
                     the target's WAL (it starts at {}); take a new base backup instead",
                    scan.start
                ),
            };
            say(format!(
                "rewinding from last common checkpoint at {} on timeline {}",
                ckpt.lsn, ckpt.timeline
            ));
            say(format!(
                "the target's WAL ends at {}: {} record(s) after the divergence point are \
                 discarded, {} page(s) are copied from the source",
                scan.end,
                scan.diverged_records,
                scan.pages.len()
            ));
            if args.dry_run {
                for t in &scan.pages {
                    println!("page rel {} block {}", t.rel, t.block);
                }
                say("dry run: nothing was changed");
                return Ok(());
            }
            let plan = rw::RewindPlan {
                source_timeline: source_tli,
                target_timeline: target_tli,
                divergence: s,
                checkpoint: ckpt,
                pages: scan.pages,
            };
            // From here on the directory changes: the marker (with the plan) first.
            file::replace_durably(&data_dir, REWIND_MARKER, plan.encode().as_bytes(), true)?;
            plan
        }
    };
    let (s, target_tli) = (plan.divergence, plan.target_timeline);
    let ckpt = plan.checkpoint;

    // 4. The pages.
    let checksums = c.data_checksum_version == 1;
    let newest_page = copy_pages(
        &mut source,
        &data_dir,
        &plan.pages,
        checksums,
        args.progress,
    )?;

    // 5. The WAL.
    let (_, _, flush, _) = source
        .status()
        .context("could not ask the source its status")?;
    let end = flush.max(newest_page);
    rw::truncate_wal(&wal_dir, target_tli, s, seg, true)?;
    timeline::store_history(&wal_dir, source_tli, &history_bytes, true)?;
    rw::copy_switch_segment(&wal_dir, target_tli, source_tli, s, seg, true)?;
    walden::wal::failpoint("rewind-after-wal-cut");
    drop(wal_lock);
    let wal_end = stream_wal(
        &addr,
        token.as_deref(),
        &data_dir,
        &wal_dir,
        c.system_identifier,
        source_tli,
        s,
        seg,
        end,
    )?;
    if args.progress {
        say(format!("WAL received from {s} up to {wal_end}"));
    }

    // 6. The control file, last.
    c.state = ClusterState::InArchiveRecovery;
    c.checkpoint = ckpt.lsn;
    c.redo = ckpt.redo;
    c.checkpoint_time = ckpt.time_us / 1_000_000;
    c.full_page_writes = ckpt.full_page_writes;
    c.prev_timeline = target_tli;
    c.timeline = source_tli;
    c.min_recovery_point = end;
    control::write(&data_dir, &c, true).context("could not write the control file")?;
    if args.write_recovery_conf {
        super::basebackup::write_auto_conf(&args.dir, &addr, None, None)?;
    }
    file::remove_file(&data_dir.join(REWIND_MARKER))?;
    file::sync_dir(&data_dir)?;
    drop(data_lock);
    say(format!(
        "the target is on timeline {source_tli}; it is consistent once replay reaches {end}"
    ));
    say("Done!");
    Ok(())
}

fn read_control(data_dir: &Path) -> anyhow::Result<ControlFile> {
    control::read(data_dir)?.with_context(|| {
        format!(
            "{} has no control file: not a walden data directory",
            data_dir.display()
        )
    })
}

/// Refuses a directory whose lock a running server holds, without taking
/// the lock (which would rewrite the lock file's text).
fn probe_not_running(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(walden::lock::LOCK_FILE);
    if !path.exists() {
        return Ok(());
    }
    match LockFile::try_lock(&path)? {
        Attempt::Locked(_) => Ok(()),
        Attempt::Held { contents } => bail!(
            "target server must be shut down: lock file \"{}\" is held by {}",
            path.display(),
            Holder::parse(&contents).describe()
        ),
    }
}

/// The directory's lock, as a server takes it: refused while one runs.
fn lock(dir: &Path) -> anyhow::Result<DirLocks> {
    let cfg = Config {
        wal_dir: dir.to_path_buf(),
        ..Config::default()
    };
    DirLocks::for_wal(&cfg).map_err(target_running)
}

fn target_running(e: LockError) -> anyhow::Error {
    match e {
        LockError::Held { path, holder, .. } => anyhow::anyhow!(
            "target server must be shut down: lock file \"{}\" is held by {holder}",
            path.display()
        ),
        e => e.into(),
    }
}

/// Fetches every page of `pages` from the source and writes it into the
/// target's relation files, then fsyncs them. Returns the newest page LSN.
fn copy_pages(
    source: &mut Client,
    data_dir: &Path,
    pages: &std::collections::BTreeSet<PageTag>,
    checksums: bool,
    progress: bool,
) -> anyhow::Result<Lsn> {
    let files = RelFiles::open(data_dir, true)?;
    let mut buf = AlignedBuf::zeroed(PAGE_SIZE);
    let mut newest = Lsn::INVALID;
    let total = pages.len();
    let mut shown = Instant::now() - Duration::from_secs(1);
    for (i, &tag) in pages.iter().enumerate() {
        let (lsn, data) = source.page_read(tag.rel, tag.block).with_context(|| {
            format!(
                "could not read relation {} block {} from the source",
                tag.rel, tag.block
            )
        })?;
        buf.fill(0);
        // A page the source never wrote (LSN 0, all zeros) stays a new page.
        if lsn.is_valid() || data.iter().any(|&b| b != 0) {
            page::set_lsn(&mut buf, lsn);
            page::data_mut(&mut buf).copy_from_slice(&data);
            page::seal(&mut buf, tag, checksums);
        }
        newest = newest.max(lsn);
        files
            .write_page(tag, &buf)
            .with_context(|| format!("could not write relation {} block {}", tag.rel, tag.block))?;
        if progress && (shown.elapsed() >= Duration::from_millis(100) || i + 1 == total) {
            eprint!(
                "\r{} kB / {} kB ({}%)",
                (i + 1) * PAGE_SIZE / 1024,
                total * PAGE_SIZE / 1024,
                (i + 1) * 100 / total
            );
            if i + 1 == total {
                eprintln!();
            }
            shown = Instant::now();
        }
    }
    // IMPORTANT: the pages are durable before the control file sends a
    // start to the common checkpoint. A failed fsync ends the rewind (never
    // retried): the marker stays, and the directory refuses to start.
    for (rel, f) in files.take_needs_sync()? {
        f.fsync()
            .with_context(|| format!("could not fsync relation {rel}"))?;
    }
    file::sync_dir(files.dir())?;
    Ok(newest)
}

/// Streams the source's WAL from `s` on `timeline` into the target's WAL
/// (opened as a standby's: its end is `s`) until a record end at or past
/// `end`.
#[allow(clippy::too_many_arguments)]
fn stream_wal(
    addr: &str,
    token: Option<&[u8]>,
    data_dir: &Path,
    wal_dir: &Path,
    system_id: u64,
    timeline: u32,
    s: Lsn,
    seg: u64,
    end: Lsn,
) -> anyhow::Result<Lsn> {
    let cfg = Config {
        wal_dir: wal_dir.to_path_buf(),
        data_dir: data_dir.to_path_buf(),
        wal_segment_size: walden::config::Size(seg),
        ..Config::default()
    };
    let wal = Wal::open_standby(cfg).context("could not open the target's WAL")?;
    let outcome = (|| -> anyhow::Result<Lsn> {
        anyhow::ensure!(
            wal.timeline() == timeline && wal.insert_lsn() == s,
            "the target's WAL opened on timeline {} at {} instead of timeline {timeline} at {s}",
            wal.timeline(),
            wal.insert_lsn()
        );
        let mut client = Client::connect(addr, token)
            .with_context(|| format!("could not connect to the source at {addr} for the WAL"))?;
        super::basebackup::receive_wal(
            &mut client,
            &wal,
            system_id,
            timeline,
            s,
            seg,
            "",
            APPLICATION_NAME,
            &AtomicU64::new(end.0),
            &AtomicBool::new(false),
        )
        .with_context(|| {
            format!(
                "could not stream the source's WAL from {s} (the source must still have it; \
                 otherwise take a new base backup)"
            )
        })
    })();
    let closed = wal.close();
    let got = outcome?;
    closed.context("could not close the target's WAL")?;
    Ok(got)
}
