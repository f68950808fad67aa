//! `walden basebackup`: a copy of a running primary's page store and the
//! WAL from the backup's redo point, over the walden protocol (like
//! `pg_basebackup -X stream`). The copy is a data directory that starts as
//! a server (recovering from the redo point) or, with `-R`, as a standby.
//!
//! Two connections: a BaseBackup (the server checkpoints, then sends every
//! relation file's pages and the backup's end LSN) and, as soon as the
//! redo point is known, a StartReplication from it whose bytes go into
//! DIR/wal through a standby WAL (`Wal::open_standby`, `RawInserter::put`)
//! until a record end at or past the backup's end. The first connection
//! stays open until then: the server keeps the WAL from the redo point for
//! as long as it is open.
//!
//! The primary marks the backup in its WAL (BACKUP_START after the
//! checkpoint, BACKUP_END after the last page; `walden::store::backup`):
//! the end it sends is the end of BACKUP_END, so the copy's WAL holds that
//! record, and the copy's server is consistent once it replayed it. Pages
//! are checked as they arrive (with data checksums, as pg_basebackup
//! does): a page that fails and was not changed since the backup started
//! fails the backup, naming its relation and block.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use walden::client::Client;
use walden::lsn::segment_file_name;
use walden::protocol::{Frame, PAGE_SIZE};
use walden::store::control::{self, ClusterState, ControlFile};
use walden::store::page;
use walden::store::relfiles::BASE_DIR;

use walden::{Config, Durability, Lsn, Wal};

/// The application name of the WAL connection (the primary's view of it).
pub const APPLICATION_NAME: &str = "walden_basebackup";
use super::common::AUTO_CONF;
pub use walden::store::backup::BACKUP_LABEL;

#[derive(Args)]
#[command(disable_help_flag = true)]
pub struct BasebackupArgs {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// The primary's host, or HOST:PORT (default: WALDEN_HOST, else 127.0.0.1).
    #[arg(short = 'h', long = "host", short_alias = 'H')]
    host: Option<String>,
    /// The primary's port (default: WALDEN_PORT, else 7480).
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Directory to create the copy in (wal/ and data/ inside, as `walden
    /// serve -D DIR` uses them); must not exist or be empty.
    #[arg(short = 'D', long = "pgdata")]
    dir: PathBuf,
    /// Replication slot the WAL connection streams through (passed in
    /// StartReplication; the primary must know it).
    #[arg(short = 'S', long)]
    slot: Option<String>,
    /// Write DIR/walden.auto.toml with primary_conninfo (and
    /// primary_slot_name): `walden serve -D DIR` then starts a standby.
    #[arg(short = 'R', long = "write-recovery-conf")]
    write_recovery_conf: bool,
    /// With -R: the standby's application_name, what the primary's
    /// synchronous_standby_names lists (default: the slot's name, else
    /// walreceiver).
    #[arg(long)]
    application_name: Option<String>,
    /// Show progress on standard error.
    #[arg(short = 'P', long)]
    progress: bool,
    /// The backup's label.
    #[arg(short = 'l', long, default_value = "walden basebackup")]
    label: String,
    /// File holding the auth token.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

pub fn run(args: BasebackupArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.application_name {
        if !args.write_recovery_conf {
            anyhow::bail!("--application-name is written by -R: add -R");
        }
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
            anyhow::bail!(
                "--application-name {name:?}: use a name without spaces, quotes or backslashes"
            );
        }
    }
    if args.label.len() > walden::store::backup::MAX_LABEL_LEN {
        anyhow::bail!(
            "backup label too long (max {} bytes, got {})",
            walden::store::backup::MAX_LABEL_LEN,
            args.label.len()
        );
    }
    if args.label.contains(['\n', '\r']) {
        anyhow::bail!("-l {:?}: a backup label is one line", args.label);
    }
    let created = check_target(&args.dir)?;
    let outcome = backup(&args);
    if outcome.is_err() {
        // As pg_basebackup: a failed backup leaves nothing behind.
        eprintln!(
            "walden basebackup: removing {} {}",
            if created {
                "data directory"
            } else {
                "contents of data directory"
            },
            args.dir.display()
        );
        clean(&args.dir, created);
    }
    outcome
}

fn clean(dir: &Path, created: bool) {
    if created {
        let _ = std::fs::remove_dir_all(dir);
    } else if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

fn backup(args: &BasebackupArgs) -> anyhow::Result<()> {
    let addr = super::common::server_addr(args.host.as_deref(), args.port, None)?;
    let token = super::common::read_token(args.token_file.as_deref())?;
    let mut backup = Client::connect(&addr, token.as_deref())
        .with_context(|| format!("could not connect to the primary at {addr}"))?;
    let request_id = 1;
    backup.queue(&Frame::BaseBackup {
        request_id,
        label: args.label.clone(),
    });
    let start = match backup.recv_frame()? {
        Frame::BackupStart {
            system_id,
            timeline,
            data_checksums,
            segment_size,
            checkpoint,
            redo,
            start_time,
            relations,
            ..
        } => Start {
            system_id,
            timeline,
            data_checksums,
            segment_size,
            checkpoint,
            redo,
            start_time,
            relations,
        },
        Frame::Error { code, message, .. } => {
            bail!("the primary refused the base backup: {code}: {message}")
        }
        other => bail!("the primary answered BaseBackup with {other:?}"),
    };
    if start.segment_size != backup.segment_size {
        bail!(
            "the primary says wal_segment_size {} in BackupStart but {} in HelloOk",
            start.segment_size,
            backup.segment_size
        );
    }
    let data_dir = args.dir.join("data");
    let wal_dir = args.dir.join("wal");
    std::fs::create_dir_all(data_dir.join(BASE_DIR))
        .with_context(|| format!("could not create {}", data_dir.display()))?;
    std::fs::create_dir_all(&wal_dir)
        .with_context(|| format!("could not create {}", wal_dir.display()))?;
    if args.progress {
        eprintln!(
            "walden basebackup: checkpoint completed; backup starts at {} on timeline {} (redo), checkpoint at {}",
            start.redo, start.timeline, start.checkpoint
        );
    }

    // The WAL, from the redo point, on its own connection and thread.
    let end_target = Arc::new(AtomicU64::new(u64::MAX));
    let abort = Arc::new(AtomicBool::new(false));
    let streamer = {
        let (addr, token, wal_dir) = (addr.clone(), token.clone(), wal_dir.clone());
        let (end_target, abort) = (Arc::clone(&end_target), Arc::clone(&abort));
        let slot = args.slot.clone().unwrap_or_default();
        let (system_id, timeline, redo, seg) = (
            start.system_id,
            start.timeline,
            start.redo,
            start.segment_size,
        );

        std::thread::Builder::new()
            .name("basebackup-wal".into())
            .spawn(move || {
                stream_wal(
                    &addr,
                    token.as_deref(),
                    &wal_dir,
                    system_id,
                    timeline,
                    redo,
                    seg,
                    &slot,
                    &end_target,
                    &abort,
                )
            })?
    };

    let pages = receive_pages(&mut backup, &data_dir, &start, args.progress);
    let end = match pages {
        Ok(end) => end,
        Err(e) => {
            abort.store(true, SeqCst);
            let _ = streamer.join();
            return Err(e);
        }
    };
    end_target.store(end.0, SeqCst);
    if args.progress {
        eprintln!("walden basebackup: pages copied; waiting for the WAL up to {end}");
    }
    let wal_end = match streamer.join() {
        Ok(r) => r?,
        Err(_) => bail!("the WAL streaming thread panicked"),
    };
    // The WAL is in: the primary may release it.
    drop(backup);

    let mut c = ControlFile::new(start.segment_size, start.data_checksums, true);
    c.system_identifier = start.system_id;
    c.state = ClusterState::InCrashRecovery;
    c.checkpoint = start.checkpoint;
    c.redo = start.redo;
    c.timeline = start.timeline;
    c.prev_timeline = start.timeline;
    c.checkpoint_time = start.start_time / 1_000_000;
    c.time = control::now_secs();
    c.min_recovery_point = end;
    control::write(&data_dir, &c, true).context("could not write the control file")?;
    write_label(&data_dir, &args.label, &start, end)?;
    if args.write_recovery_conf {
        write_auto_conf(
            &args.dir,
            &addr,
            args.slot.as_deref(),
            args.application_name.as_deref(),
        )?;
    }
    sync_tree(&args.dir)?;
    if args.progress {
        eprintln!("walden basebackup: WAL received up to {wal_end}; base backup completed");
    }
    Ok(())
}

/// What BackupStart said.
struct Start {
    system_id: u64,
    timeline: u32,
    data_checksums: bool,
    segment_size: u64,
    checkpoint: Lsn,
    redo: Lsn,
    start_time: u64,
    relations: Vec<(u32, u32)>,
}

/// pg_basebackup's rule: the target may exist only if it is empty.
/// Returns whether it was created.
fn check_target(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("directory \"{}\" exists but is not empty", dir.display());
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir)
            .map(|_| true)
            .with_context(|| format!("could not create directory \"{}\"", dir.display())),
        Err(e) => {
            Err(e).with_context(|| format!("could not access directory \"{}\"", dir.display()))
        }
    }
}

/// Writes every page into DIR/data/base/<rel>; returns the backup's end.
fn receive_pages(
    backup: &mut Client,
    data_dir: &Path,
    start: &Start,
    progress: bool,
) -> anyhow::Result<Lsn> {
    let base = data_dir.join(BASE_DIR);
    let total_kb: u64 = start
        .relations
        .iter()
        .map(|&(_, b)| u64::from(b))
        .sum::<u64>()
        * (PAGE_SIZE as u64 / 1024);
    let mut files = std::collections::HashMap::new();
    for &(rel, _) in &start.relations {
        let path = base.join(rel.to_string());
        let f =
            File::create(&path).with_context(|| format!("could not create {}", path.display()))?;
        files.insert(rel, f);
    }
    let mut done_kb = 0u64;
    let mut shown = Instant::now() - Duration::from_secs(1);
    let show = |done: u64, last: bool| {
        let pct = (done * 100).checked_div(total_kb).unwrap_or(100);
        eprint!("\r{done} kB / {total_kb} kB ({pct}%)");
        if last {
            eprintln!();
        }
    };
    loop {
        match backup.recv_frame()? {
            Frame::BackupPages {
                rel,
                first_block,
                pages,
                ..
            } => {
                let Some(f) = files.get(&rel) else {
                    bail!(
                        "the primary sent pages of relation {rel}, which BackupStart did not list"
                    );
                };
                check_pages(rel, first_block, &pages, start)?;
                f.write_all_at(&pages, u64::from(first_block) * PAGE_SIZE as u64)
                    .with_context(|| format!("could not write relation {rel}"))?;
                done_kb += (pages.len() / 1024) as u64;
                if progress && shown.elapsed() >= Duration::from_millis(100) {
                    show(done_kb, false);
                    shown = Instant::now();
                }
            }
            Frame::BackupEnd { end, .. } => {
                if progress {
                    show(done_kb, true);
                }
                for (rel, f) in &files {
                    f.sync_all()
                        .with_context(|| format!("could not fsync relation {rel}"))?;
                }
                return Ok(end);
            }
            Frame::Error { code, message, .. } => {
                bail!("the base backup failed on the primary: {code}: {message}")
            }
            other => bail!("unexpected frame during the base backup: {other:?}"),
        }
    }
}

/// pg_basebackup's checksum verification, on the pages as they arrive:
/// with data checksums, a page that fails its checks fails the backup,
/// unless the primary changed it after the backup started (its LSN is at
/// or past the start): replay from the start restores such a page from a
/// full-page image, so a copy of it read while it was written is expected.
fn check_pages(rel: u32, first_block: u32, pages: &[u8], start: &Start) -> anyhow::Result<()> {
    if !start.data_checksums {
        return Ok(());
    }
    for (i, p) in pages.chunks_exact(PAGE_SIZE).enumerate() {
        let block = first_block + i as u32;
        if page::lsn(p) >= start.redo {
            continue;
        }
        if let Err(e) = page::verify(p, page::PageTag::new(rel, block), true) {
            bail!(
                "checksum verification failure: relation {rel} block {block}: {e}; \
                 the page on the primary is damaged (its LSN {} is before the backup's start {}, \
                 so replay would not repair it)",
                page::lsn(p),
                start.redo
            );
        }
    }
    Ok(())
}

/// Streams the WAL from `redo` into a standby WAL in `wal_dir` until a
/// record end at or past the end the main thread publishes; returns it.
#[allow(clippy::too_many_arguments)]
fn stream_wal(
    addr: &str,
    token: Option<&[u8]>,
    wal_dir: &Path,
    system_id: u64,
    timeline: u32,
    redo: Lsn,
    segment_size: u64,
    slot: &str,
    end_target: &AtomicU64,
    abort: &AtomicBool,
) -> anyhow::Result<Lsn> {
    let mut client = Client::connect(addr, token)
        .with_context(|| format!("could not connect to the primary at {addr} for the WAL"))?;
    // A primary on a later timeline (it was promoted): its history file
    // first, so that the copy's WAL opens on that timeline and names its
    // segments with it (PostgreSQL's pg_basebackup fetches it the same way).
    if timeline > 1 {
        let history = client
            .timeline_history(timeline)
            .with_context(|| format!("could not fetch the history of timeline {timeline}"))?;
        walden::wal::timeline::store_history(wal_dir, timeline, &history, true)?;
    }
    // walden's segments have no headers: the first record is at the redo
    // point itself; the segment holding it is zeros before it.
    walden::wal::segments::write_wal_start(wal_dir, redo)?;
    let cfg = Config {
        wal_dir: wal_dir.to_path_buf(),
        data_dir: wal_dir.with_file_name("data"),
        wal_segment_size: walden::config::Size(segment_size),
        ..Config::default()
    };
    let wal = Wal::open_standby(cfg).context("could not open the backup's WAL")?;
    anyhow::ensure!(
        wal.timeline() == timeline,
        "the backup's WAL opened on timeline {} instead of the primary's {timeline}",
        wal.timeline()
    );
    let outcome = receive_wal(
        &mut client,
        &wal,
        system_id,
        timeline,
        redo,
        segment_size,
        slot,
        APPLICATION_NAME,
        end_target,
        abort,
    );
    let _ = wal.close();
    outcome
}

/// Streams the WAL from `start` on `timeline` into `wal` (a standby WAL,
/// [`Wal::open_standby`], whose end is `start`) until a record end at or
/// past the end `end_target` publishes; returns that record end, flushed.
/// Shared by the base backup's WAL thread and `walden rewind`.
#[allow(clippy::too_many_arguments)]
pub fn receive_wal(
    client: &mut Client,
    wal: &Wal,
    system_id: u64,
    timeline: u32,
    start: Lsn,
    segment_size: u64,
    slot: &str,
    application_name: &str,
    end_target: &AtomicU64,
    abort: &AtomicBool,
) -> anyhow::Result<Lsn> {
    let redo = start;
    let mut raw = wal.raw_inserter()?;
    anyhow::ensure!(
        raw.insert_lsn() == redo,
        "the WAL opened at {} instead of {redo}, where streaming starts",
        raw.insert_lsn()
    );
    let request_id = 1u64 << 32;
    client.queue(&Frame::StartReplication {
        request_id,
        system_id,
        timeline,
        start: redo,
        term: 0,
        slot: slot.to_string(),
        application_name: application_name.to_string(),
    });
    match client.recv_frame()? {
        Frame::StreamStart { .. } => {}
        Frame::Error { code, message, .. } => {
            bail!(
                "could not start WAL streaming from {redo} (segment {}){}: {code}: {message}",
                segment_file_name(timeline, redo.segno(segment_size), segment_size),
                if slot.is_empty() {
                    String::new()
                } else {
                    format!(" through slot \"{slot}\"")
                }
            )
        }
        other => bail!("the primary answered StartReplication with {other:?}"),
    }
    client.set_read_timeout(Some(Duration::from_millis(200)))?;
    loop {
        if abort.load(SeqCst) {
            bail!("aborted");
        }
        let target = Lsn(end_target.load(SeqCst));
        let done = raw.last_complete_record_end();
        if done >= target {
            wal.request_flush(done);
            wal.wait(done, Durability::Local)?;
            return Ok(done);
        }
        match client.recv_frame() {
            Ok(Frame::WalData {
                start, wal: bytes, ..
            }) => {
                raw.put(start, &bytes)
                    .with_context(|| format!("could not write the WAL at {start}"))?;
            }
            Ok(Frame::Keepalive { .. }) => {}
            Ok(Frame::ReadEnd { .. }) => {
                bail!("the server ended the WAL stream before {target}")
            }
            Ok(Frame::Error { code, message, .. }) => {
                bail!("WAL streaming failed: {code}: {message}")
            }
            Ok(other) => bail!("unexpected frame in the WAL stream: {other:?}"),
            Err(walden::client::ClientError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("lost the WAL connection"),
        }
    }
}

fn write_label(data_dir: &Path, label: &str, s: &Start, end: Lsn) -> anyhow::Result<()> {
    let time = chrono_like(s.start_time / 1_000_000);
    let text = format!(
        "START WAL LOCATION: {} (file {})\n\
         CHECKPOINT LOCATION: {}\n\
         BACKUP METHOD: streamed\n\
         BACKUP FROM: primary\n\
         START TIME: {time}\n\
         LABEL: {label}\n\
         START TIMELINE: {}\n\
         STOP WAL LOCATION: {end}\n",
        s.redo,
        segment_file_name(s.timeline, s.redo.segno(s.segment_size), s.segment_size),
        s.checkpoint,
        s.timeline,
    );
    write_durably(&data_dir.join(BACKUP_LABEL), text.as_bytes())
}

/// `YYYY-MM-DD HH:MM:SS UTC` without a date library.
fn chrono_like(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// DIR/walden.auto.toml: the standby settings (PostgreSQL's -R writes
/// them to postgresql.auto.conf).
pub fn write_auto_conf(
    dir: &Path,
    addr: &str,
    slot: Option<&str>,
    application_name: Option<&str>,
) -> anyhow::Result<()> {
    let name = application_name.or(slot).unwrap_or("walreceiver");
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        anyhow::bail!(
            "--application-name {name:?}: use a name without spaces, quotes or backslashes"
        );
    }
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
        None => (addr, "7480"),
    };
    let mut text = String::from(
        "# Written by walden basebackup -R: this directory is a standby of the primary below.\n",
    );
    text.push_str(&format!(
        "primary_conninfo = 'host={host} port={port} application_name={name}'\n"
    ));
    if let Some(slot) = slot {
        text.push_str(&format!("primary_slot_name = '{slot}'\n"));
    }
    write_durably(&dir.join(AUTO_CONF), text.as_bytes())
}

fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f =
        File::create(path).with_context(|| format!("could not create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("could not write {}", path.display()))
}

/// fsyncs the directories of the copy (their entries: new files).
fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for d in [
        dir.join("data").join(BASE_DIR),
        dir.join("data"),
        dir.join("wal"),
        dir.to_path_buf(),
    ] {
        File::open(&d)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("could not fsync {}", d.display()))?;
    }
    Ok(())
}
