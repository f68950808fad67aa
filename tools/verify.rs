//! `walden verify --ack-log FILE -D DIR`: with the server stopped, checks that
//! every record an ack log lists (`walden bench --ack-log`) is in the WAL at
//! its LSN with the same length and crc32c. Ends with `N passed, M failed`,
//! and `, K released before the WAL start X/Y` when some acknowledged records
//! lie before the retained WAL: a checkpoint may release WAL older than its
//! redo point, so those records are gone by design, not lost, and are
//! neither passed nor failed.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use walden::wal::reader::WalReader;
use walden::Lsn;

use super::waldump::WalDir;

#[derive(Args)]
pub struct VerifyArgs {
    /// The ack log written by `walden bench --ack-log` (lines: LSN LEN CRC32C).
    #[arg(long)]
    ack_log: PathBuf,
    /// Data directory (WAL in DIR/wal).
    #[arg(short = 'D', long, default_value = "walden-data")]
    data_dir: PathBuf,
    /// The WAL directory, if not DIR/wal.
    #[arg(short = 'p', long)]
    wal_dir: Option<PathBuf>,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let file = std::fs::File::open(&args.ack_log)
        .with_context(|| format!("opening {}", args.ack_log.display()))?;
    let mut want: HashMap<Lsn, (u32, u32)> = HashMap::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        let mut f = line.split_whitespace();
        let (Some(lsn), Some(len), Some(crc)) = (f.next(), f.next(), f.next()) else {
            anyhow::bail!(
                "{}:{}: expected \"LSN LEN CRC32C\", got {line:?}",
                args.ack_log.display(),
                n + 1
            );
        };
        let lsn: Lsn = lsn.parse().with_context(|| format!("line {}", n + 1))?;
        let len: u32 = len
            .parse()
            .with_context(|| format!("line {}: length", n + 1))?;
        let crc = u32::from_str_radix(crc, 16).with_context(|| format!("line {}: crc", n + 1))?;
        want.insert(lsn, (len, crc));
    }
    let wal_dir = args
        .wal_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("wal"));
    let dir = WalDir::open(&wal_dir)?;
    dir.check_version()?;
    let seg = dir
        .segment_size
        .context("the WAL directory has no segment files")?;
    let start = dir.wal_start()?;
    let mut reader = WalReader::new(&wal_dir, seg, dir.timeline, start, None);
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut seen = 0usize;
    while let Some(rec) = reader.next_record()? {
        if let Some(&(len, crc)) = want.get(&rec.lsn) {
            seen += 1;
            if rec.payload.len() as u32 == len && crc32c::crc32c(rec.payload) == crc {
                passed += 1;
            } else {
                failed += 1;
                eprintln!(
                    "record at {} differs: {} bytes crc {:08x} in the WAL, {len} bytes crc {crc:08x} acknowledged",
                    rec.lsn,
                    rec.payload.len(),
                    crc32c::crc32c(rec.payload)
                );
            }
        }
    }
    let end = reader.position();
    // The reader starts at the WAL's start, so these were never looked for.
    let released = want.keys().filter(|l| **l < start).count();
    if released > 0 {
        eprintln!(
            "{released} acknowledged record(s) lie before the WAL start {start} (released, not checked)"
        );
    }
    let missing = want.len() - seen - released;
    if missing > 0 {
        let mut lost: Vec<Lsn> = want.keys().copied().filter(|l| *l >= end).collect();
        lost.sort();
        eprintln!(
            "{missing} acknowledged record(s) missing; valid WAL ends at {end}{}; first missing: {}",
            reader.end().map(|e| format!(" ({e})")).unwrap_or_default(),
            lost.first().map(|l| l.to_string()).unwrap_or_else(|| "(inside the valid WAL but not a record start)".into())
        );
    }
    failed += missing as u64;
    if released > 0 {
        println!(
            "{passed} passed, {failed} failed, {released} released before the WAL start {start}"
        );
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
