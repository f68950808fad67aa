//! `walden controldata`: print the control information of a walden data
//! directory, like PostgreSQL's `pg_controldata`.
//!
//! It prints the control file (`data/walden.control`: state, latest
//! checkpoint and its redo point, timeline, the settings fixed at creation)
//! under pg_controldata's labels, then what the WAL directory shows: the
//! retained WAL's start (`wal_start`), the end of valid WAL (found by a
//! read-only scan), the segment files and their size. A damaged control file
//! or `wal_start` is reported and makes the exit status non-zero; it is
//! never hidden. A directory without a control file (a WAL written before
//! the page store existed) prints "none" for the control file's fields.
//!
//! The WAL is read from `DATADIR/wal`, or from `--wal-dir` when `wal_dir`
//! lives elsewhere (its own device); the "WAL directory" line says which.
//! The control file is read from `DATADIR/data` (the `serve -D DIR`
//! layout), or from DATADIR itself when it is a page store's directory
//! (`data_dir` moved elsewhere in walden.toml).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use serde::Serialize;
use walden::wal::TIMELINE;
use walden::wal::{segments, startup};

use super::waldump::{fmt_lsn, WalDir};

#[derive(Args, Debug)]
pub struct ControldataArgs {
    /// Data directory: DIR as `serve -D DIR` made it, or the page store's data_dir itself (the WAL is read from DATADIR/wal unless --wal-dir is given).
    #[arg(short = 'D', long = "data-dir", value_name = "DATADIR")]
    data_dir: Option<PathBuf>,
    /// The WAL directory, when `wal_dir` is not DATADIR/wal (the WAL on its own device).
    #[arg(long = "wal-dir", value_name = "WAL_DIR")]
    wal_dir: Option<PathBuf>,
    /// The data directory, as pg_controldata's positional argument.
    #[arg(value_name = "DATADIR", conflicts_with = "data_dir")]
    positional: Option<PathBuf>,
    /// Print the same fields as one JSON object (`null` where the text says none).
    #[arg(long)]
    json: bool,
}

/// Everything printed, in print order. `None` is "none" (or "unknown") in
/// the text form and `null` in JSON.
#[derive(Serialize)]
struct ControlData {
    data_directory: String,
    wal_directory: String,
    control_version: Option<u32>,
    /// `wal_version`'s number; 1 for a WAL from before the file existed.
    wal_format_version: Option<u32>,
    /// Why the WAL format version is what it is, when there is no file.
    wal_format_version_note: Option<String>,
    system_identifier: Option<String>,
    cluster_state: String,
    control_last_modified: Option<String>,
    latest_checkpoint_location: Option<String>,
    latest_checkpoint_redo_location: Option<String>,
    latest_checkpoint_timeline_id: u32,
    latest_checkpoint_prev_timeline_id: u32,
    /// The highest term this server has seen (the timeline when none was stored).
    latest_term: Option<u64>,
    /// The highest LSN a quorum of synchronous standbys is known to hold.
    acknowledged_lsn: Option<String>,
    latest_checkpoint_full_page_writes: Option<bool>,
    time_of_latest_checkpoint: Option<String>,
    wal_start: Option<String>,
    end_of_wal: Option<String>,
    end_of_wal_reason: Option<String>,
    retained_wal_records: Option<u64>,
    retained_wal_bytes: Option<u64>,
    wal_segment_files: usize,
    first_wal_segment_file: Option<String>,
    last_wal_segment_file: Option<String>,
    bytes_per_wal_segment: Option<u64>,
    database_block_size: Option<u32>,
    wal_block_size: usize,
    data_page_checksum_version: Option<u32>,
    /// Problems found; any of them makes the exit status non-zero.
    warnings: Vec<String>,
}

pub fn run(args: ControldataArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .or(args.positional)
        .unwrap_or_else(|| PathBuf::from("walden-data"));
    if !data_dir.is_dir() {
        bail!(
            "data directory \"{}\" does not exist (give it with -D)",
            data_dir.display()
        );
    }
    let wal_dir = args.wal_dir.unwrap_or_else(|| data_dir.join("wal"));
    if !wal_dir.is_dir() {
        // The usual cause: wal_dir was set elsewhere in walden.toml.
        bail!(
            "WAL directory \"{}\" does not exist (if wal_dir is elsewhere, give it with --wal-dir)",
            wal_dir.display()
        );
    }
    let wal = WalDir::open(&wal_dir)?;
    let mut warnings = Vec::new();
    // A newer format's records are not ours to decode: report, don't scan.
    let wal_readable = match wal.check_version() {
        Ok(()) => true,
        Err(e) => {
            warnings.push(format!("{e:#}"));
            false
        }
    };
    let (wal_format_version, wal_format_version_note) = match wal.version {
        Some(v) => (Some(v), None),
        None if wal.segments.is_empty() => (None, Some("none (no WAL yet)".to_string())),
        None => (
            Some(1),
            Some(format!(
                "1 (no {} file: written before WAL format versions)",
                walden::wal::version::WAL_VERSION_FILE
            )),
        ),
    };

    let wal_start = match segments::read_wal_start(&wal_dir) {
        Ok(Some(l)) => Some(l),
        // No WAL yet: nothing to start from, and nothing wrong.
        Ok(None) if wal.segments.is_empty() => None,
        // Segments without wal_start: the engine's rule (segment 1's start, or refuse).
        Ok(None) => match wal.wal_start() {
            Ok(l) => Some(l),
            Err(e) => {
                warnings.push(format!("{e:#}"));
                None
            }
        },
        Err(e) => {
            warnings.push(e.to_string());
            None
        }
    };
    let mut control_version = None;
    // `-D DIR` as `walden serve -D DIR` lays it out (DIR/data), or the page
    // store's directory itself (`data_dir` moved elsewhere in walden.toml).
    let control_dir = if !data_dir.join("data").is_dir()
        && data_dir.join(walden::store::control::CONTROL_FILE).exists()
    {
        data_dir.clone()
    } else {
        data_dir.join("data")
    };
    let control = match walden::store::control::read(&control_dir) {
        Ok(c) => {
            control_version = c.map(|_| walden::store::control::CONTROL_VERSION);
            c
        }
        Err(e) => {
            if let walden::store::control::ControlError::Version { found, .. } = &e {
                control_version = Some(*found);
            }
            warnings.push(e.to_string());
            None
        }
    };
    let time = |secs: u64| walden::store::checkpointer::format_time(secs);
    let mut d = ControlData {
        data_directory: data_dir.display().to_string(),
        wal_directory: wal_dir.display().to_string(),
        control_version,
        wal_format_version,
        wal_format_version_note,
        system_identifier: control.map(|c| c.system_identifier.to_string()),
        cluster_state: control.map_or_else(
            || "unknown (no control file: the page store was never opened here)".into(),
            |c| c.state.name().to_string(),
        ),
        control_last_modified: control.map(|c| time(c.time)),
        latest_checkpoint_location: control
            .filter(|c| c.checkpoint.is_valid())
            .map(|c| fmt_lsn(c.checkpoint)),
        latest_checkpoint_redo_location: control
            .filter(|c| c.checkpoint.is_valid())
            .map(|c| fmt_lsn(c.redo)),
        latest_checkpoint_timeline_id: control.map_or(TIMELINE, |c| c.timeline),
        latest_checkpoint_prev_timeline_id: control.map_or(TIMELINE, |c| c.prev_timeline),
        latest_term: control.map(|c| c.latest_term()),
        acknowledged_lsn: control.map(|c| fmt_lsn(c.acknowledged_lsn)),
        latest_checkpoint_full_page_writes: control.map(|c| c.full_page_writes),
        time_of_latest_checkpoint: control
            .filter(|c| c.checkpoint.is_valid())
            .map(|c| time(c.checkpoint_time)),
        wal_start: wal_start.map(fmt_lsn),
        end_of_wal: None,
        end_of_wal_reason: None,
        retained_wal_records: None,
        retained_wal_bytes: None,
        wal_segment_files: wal.segments.len(),
        first_wal_segment_file: wal.segments.first().and_then(|&s| wal.segment_name(s)),
        last_wal_segment_file: wal.segments.last().and_then(|&s| wal.segment_name(s)),
        bytes_per_wal_segment: control.map(|c| c.wal_segment_size).or(wal.segment_size),
        database_block_size: control.map(|c| c.block_size),
        wal_block_size: walden::io::BLOCK,
        data_page_checksum_version: control.map(|c| c.data_checksum_version),
        warnings,
    };
    if let (Some(start), Some(size), true) = (wal_start, wal.segment_size, wal_readable) {
        // Read-only: the scan only reads segment files.
        let scan = startup::scan(&wal_dir, size, wal.timeline, start, false, None)?;
        d.end_of_wal = Some(fmt_lsn(scan.end));
        d.end_of_wal_reason = scan.reason.map(|r| r.to_string());
        d.retained_wal_records = Some(scan.records);
        d.retained_wal_bytes = Some(scan.end.0 - start.0);
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print_text(&d);
    }
    if let Some(first) = d.warnings.first() {
        bail!("{first}");
    }
    Ok(())
}

fn print_text(d: &ControlData) {
    let none = |v: &Option<String>, text: &str| v.clone().unwrap_or_else(|| text.to_string());
    let wal_start = match (&d.wal_start, d.warnings.is_empty()) {
        (Some(l), _) => l.clone(),
        (None, true) => "none (no WAL yet)".into(),
        (None, false) => "unreadable (see the warning above)".into(),
    };
    let retained = match (d.retained_wal_records, d.retained_wal_bytes) {
        (Some(n), Some(b)) => format!("{n} records, {b} bytes"),
        _ => "unknown".into(),
    };
    let lines: Vec<(&str, String)> = vec![
        (
            "walden control version",
            d.control_version
                .map_or("none (no control file)".into(), |v| v.to_string()),
        ),
        (
            "Database system identifier",
            none(&d.system_identifier, "none"),
        ),
        ("Database cluster state", d.cluster_state.clone()),
        (
            "walden.control last modified",
            none(&d.control_last_modified, "never"),
        ),
        (
            "Latest checkpoint location",
            none(&d.latest_checkpoint_location, "none"),
        ),
        (
            "Latest checkpoint's REDO location",
            none(&d.latest_checkpoint_redo_location, "none"),
        ),
        (
            "Latest checkpoint's TimeLineID",
            d.latest_checkpoint_timeline_id.to_string(),
        ),
        (
            "Latest checkpoint's PrevTimeLineID",
            d.latest_checkpoint_prev_timeline_id.to_string(),
        ),
        (
            "Latest term",
            d.latest_term.map_or("unknown".into(), |t| t.to_string()),
        ),
        (
            "Acknowledged LSN (quorum flushed)",
            none(&d.acknowledged_lsn, "unknown"),
        ),
        (
            "Latest checkpoint's full_page_writes",
            d.latest_checkpoint_full_page_writes
                .map_or("unknown".into(), |b| {
                    if b { "on" } else { "off" }.to_string()
                }),
        ),
        (
            "Time of latest checkpoint",
            none(&d.time_of_latest_checkpoint, "none"),
        ),
        ("WAL directory", d.wal_directory.clone()),
        (
            "WAL format version",
            d.wal_format_version_note.clone().unwrap_or_else(|| {
                d.wal_format_version
                    .map_or("none".into(), |v| v.to_string())
            }),
        ),
        ("First retained WAL record (wal_start)", wal_start),
        ("Current end of valid WAL", none(&d.end_of_wal, "unknown")),
        (
            "End of valid WAL because",
            none(&d.end_of_wal_reason, "unknown"),
        ),
        ("Retained WAL", retained),
        ("WAL segment files", d.wal_segment_files.to_string()),
        (
            "First WAL segment file",
            none(&d.first_wal_segment_file, "none"),
        ),
        (
            "Last WAL segment file",
            none(&d.last_wal_segment_file, "none"),
        ),
        (
            "Bytes per WAL segment",
            d.bytes_per_wal_segment
                .map_or("unknown (no segment file)".into(), |s| s.to_string()),
        ),
        (
            "Database block size",
            d.database_block_size
                .map_or("none (no control file)".into(), |b| b.to_string()),
        ),
        ("WAL block size", d.wal_block_size.to_string()),
        (
            "Data page checksum version",
            d.data_page_checksum_version
                .map_or("none (no control file)".into(), |v| v.to_string()),
        ),
    ];
    for w in &d.warnings {
        println!("WARNING: {w}");
        println!("The results below are incomplete.\n");
    }
    // pg_controldata aligns values at column 38; our longest label is longer.
    let width = lines
        .iter()
        .map(|(l, _)| l.len() + 1)
        .max()
        .unwrap_or(0)
        .max(37);
    for (label, value) in lines {
        println!("{:<width$} {value}", format!("{label}:"));
    }
}
