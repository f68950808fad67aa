//! A child process for crash tests: appends records from several threads at a
//! durability level and prints one line per acknowledged record,
//! `ack <lsn> <len> <seed> <end>`, flushed before the next append, until killed.
//! The payload is `walden::testkit::payload(seed, len)`, so a test can rebuild it byte for byte.
//!
//! `--inject-sync-eio-at N` (hidden) makes the N-th sync of a WAL file fail
//! with EIO (`walden::io::file::inject_sync_eio_at`), for tests/fsync_eio.rs.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;
use walden::{Durability, Kind, Wal};

#[derive(Args)]
pub struct WalChildArgs {
    #[arg(short = 'D', long)]
    data_dir: PathBuf,
    #[arg(long, default_value = "local")]
    level: Durability,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 3000)]
    max_size: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many records per thread (0: until killed).
    #[arg(long, default_value_t = 0)]
    count: u64,
    #[arg(short = 'c', long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// (testing) The N-th sync of a file in this process (counting from before
    /// the WAL is opened: on a new WAL, the first three are startup's) fails
    /// with EIO; on the io_uring flusher a queued sync chosen this way runs
    /// as a no-op that completes with EIO. Forces wal_sync_method=fdatasync
    /// and wal_prealloc=0 (no segment preparer, whose syncs would race the
    /// flusher's for the N-th); choose the flusher with -c wal_flusher=.
    #[arg(long, value_name = "N", hide = true)]
    inject_sync_eio_at: Option<u64>,
}

pub fn run(args: WalChildArgs) -> anyhow::Result<()> {
    let mut set = args.set.clone();
    if args.inject_sync_eio_at.is_some() {
        // After the -c settings, so that these win.
        set.extend(["wal_sync_method=fdatasync", "wal_prealloc=0"].map(String::from));
    }
    let cfg = super::common::load_config(None, Some(&args.data_dir), &set)?;
    if let Some(n) = args.inject_sync_eio_at {
        walden::io::file::inject_sync_eio_at(n);
    }
    let wal = Wal::open(cfg)?;
    let out = Mutex::new(std::io::stdout());
    writeln!(out.lock().unwrap(), "start {}", wal.opened_at())?;
    std::thread::scope(|s| {
        for t in 0..args.threads {
            let (wal, out, args) = (&wal, &out, &args);
            s.spawn(move || {
                let mut n = 0u64;
                loop {
                    n += 1;
                    if args.count > 0 && n > args.count {
                        break;
                    }
                    let seed = (args.seed << 40) ^ ((t as u64) << 32) ^ n;
                    let len = walden::testkit::payload_len(seed, args.max_size);
                    let p = walden::testkit::payload(seed, len);
                    let a = wal.append(Kind::DATA, &p).expect("append");
                    wal.wait(a.end, args.level).expect("wait");
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ack {} {} {} {}", a.lsn, len, seed, a.end).unwrap();
                    o.flush().unwrap();
                }
            });
        }
    });
    wal.close()?;
    Ok(())
}
