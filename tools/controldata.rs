//! `walden controldata`: print the control information of a walden data
//! directory, like PostgreSQL's `pg_controldata`.
//!
//! The control file (last checkpoint, redo LSN, cluster state, checksums)
//! arrives with the page store. Until then this prints what exists, under
//! PostgreSQL's labels where the meaning matches: the retained WAL's start
//! (`wal_start`), the end of valid WAL (found by a read-only scan), the
//! segment files and their size. A damaged `wal_start` is reported and makes
//! the exit status non-zero; it is never hidden.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use serde::Serialize;
use walden::wal::TIMELINE;
use walden::wal::{segments, startup};

use super::waldump::{fmt_lsn, WalDir};

#[derive(Args, Debug)]
pub struct ControldataArgs {
    /// Data directory (the WAL is read from DATADIR/wal).
    #[arg(short = 'D', long = "data-dir", value_name = "DATADIR")]
    data_dir: Option<PathBuf>,
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
    cluster_state: String,
    latest_checkpoint_location: Option<String>,
    latest_checkpoint_redo_location: Option<String>,
    latest_checkpoint_timeline_id: u32,
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
    let wal_dir = data_dir.join("wal");
    let wal = WalDir::open(&wal_dir)?;
    let mut warnings = Vec::new();

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
    let mut d = ControlData {
        data_directory: data_dir.display().to_string(),
        wal_directory: wal_dir.display().to_string(),
        control_version: None,
        cluster_state: "unknown (no control file yet)".into(),
        latest_checkpoint_location: None,
        latest_checkpoint_redo_location: None,
        latest_checkpoint_timeline_id: TIMELINE,
        time_of_latest_checkpoint: None,
        wal_start: wal_start.map(fmt_lsn),
        end_of_wal: None,
        end_of_wal_reason: None,
        retained_wal_records: None,
        retained_wal_bytes: None,
        wal_segment_files: wal.segments.len(),
        first_wal_segment_file: wal.segments.first().and_then(|&s| wal.segment_name(s)),
        last_wal_segment_file: wal.segments.last().and_then(|&s| wal.segment_name(s)),
        bytes_per_wal_segment: wal.segment_size,
        wal_block_size: walden::io::BLOCK,
        data_page_checksum_version: None,
        warnings,
    };
    if let (Some(start), Some(size)) = (wal_start, wal.segment_size) {
        // Read-only: the scan only reads segment files.
        let scan = startup::scan(&wal_dir, size, TIMELINE, start)?;
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
            "none yet (control file arrives with the page store)".into(),
        ),
        ("Database cluster state", d.cluster_state.clone()),
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
            "Time of latest checkpoint",
            none(&d.time_of_latest_checkpoint, "none"),
        ),
        ("WAL directory", d.wal_directory.clone()),
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
        ("WAL block size", d.wal_block_size.to_string()),
        ("Data page checksum version", "none yet".into()),
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
