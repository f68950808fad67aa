//! fsyncgate (PostgreSQL, 2018): after a failed fsync the kernel may have
//! dropped the dirty pages and cleared the error, so a retry that "succeeds"
//! proves nothing. A failed sync of WAL must be fatal: abort with a clear
//! message, acknowledge nothing after the last good sync, and let a restart
//! recover every record that was acknowledged.
//!
//! A child process (`walden wal-child --inject-sync-eio-at N`, fdatasync,
//! on each flusher: the io_uring one, whose queued sync is then replaced by
//! a no-op that completes with EIO, and the pwrite one) appends from
//! several threads at `local` and prints each acknowledged record; its N-th
//! sync fails with EIO without syncing. On a new WAL the first three syncs
//! are startup's (`wal_version`, `wal_start`, the first segment), so N = 4
//! fails the flusher's first sync and larger N fail later ones. We check
//! that it died by SIGABRT naming the segment and the unacknowledged range
//! X..Y, that no acknowledged record ends after X, and that after a restart
//! every acknowledged record is in the WAL byte for byte.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use walden::testkit::payload;
use walden::wal::reader::WalReader;
use walden::wal::TIMELINE;
use walden::Lsn;

/// Large enough that no run reaches a second segment (with wal_prealloc=0 the
/// flusher would create it, and that creation's fsync would be counted too).
const SEG: u64 = 16 << 20;
const DEADLINE: Duration = Duration::from_secs(30);

struct Ack {
    lsn: Lsn,
    len: usize,
    seed: u64,
    end: Lsn,
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `walden wal-child` on `dir` to its end, failing the test after
/// [`DEADLINE`].
fn run_child(dir: &Path, extra: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walden"));
    cmd.args(["wal-child", "-D"])
        .arg(dir)
        .args(["--level", "local", "--max-size", "3000"])
        .args(["-c", &format!("wal_segment_size={}MB", SEG >> 20)])
        .args(extra)
        .env("WALDEN_LOG", "warn")
        // The abort must not leave a core file behind (core_pattern is often
        // a relative "core"): no core, and the temporary directory as cwd.
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    let mut child: Child = cmd.spawn().expect("spawn walden wal-child");
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "wal-child {extra:?} still running after {DEADLINE:?}; stderr:\n{}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The `start` LSN and the acknowledgements of a child's stdout. Only
/// complete lines count: a line cut by the abort was not printed.
fn parse_stdout(stdout: &str) -> (Lsn, Vec<Ack>) {
    let complete = match stdout.rfind('\n') {
        Some(i) => &stdout[..i],
        None => "",
    };
    let mut lines = complete.lines();
    let start = lines
        .next()
        .and_then(|l| l.strip_prefix("start "))
        .unwrap_or_else(|| panic!("no start line in the child's output: {stdout:?}"))
        .parse()
        .unwrap();
    let acks = lines
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert!(f.len() == 5 && f[0] == "ack", "unexpected line {l:?}");
            Ack {
                lsn: f[1].parse().unwrap(),
                len: f[2].parse().unwrap(),
                seed: f[3].parse().unwrap(),
                end: f[4].parse().unwrap(),
            }
        })
        .collect();
    (start, acks)
}

/// Reads the whole valid WAL: LSN -> payload.
fn scan(wal_dir: &Path) -> HashMap<Lsn, Vec<u8>> {
    let start = walden::wal::segments::read_wal_start(wal_dir)
        .unwrap()
        .unwrap();
    let mut r = WalReader::new(wal_dir, SEG, TIMELINE, start, None);
    let mut out = HashMap::new();
    while let Some(rec) = r.next_record().unwrap() {
        out.insert(rec.lsn, rec.payload.to_vec());
    }
    out
}

fn failed_fdatasync_is_fatal(flusher: &str, n: u64) {
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    // --count bounds the run should the failure not be fatal.
    let n_arg = n.to_string();
    let flusher_arg = format!("wal_flusher={flusher}");
    // On the io_uring flusher every sync goes through the queue (not the
    // synchronous depth-1 path, which is the pwrite flusher's call).
    let depth_1 = format!("wal_sync_at_depth_1={}", flusher == "pwrite");
    let run = run_child(
        dir.path(),
        &[
            "--threads",
            "4",
            "--count",
            "1000",
            "-c",
            &flusher_arg,
            "-c",
            &depth_1,
            "--inject-sync-eio-at",
            &n_arg,
        ],
    );
    let ctx = format!(
        "{flusher} flusher, N={n}: status {:?}, stderr:\n{}",
        run.status, run.stderr
    );

    // 1. It aborted (PANIC), rather than exiting or going on.
    assert_eq!(
        run.status.signal(),
        Some(libc::SIGABRT),
        "the child must die by SIGABRT; {ctx}"
    );

    // 2. The message names the failed call, the segment and the range of
    //    WAL that is not acknowledged.
    let panic_line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("walden: PANIC: "))
        .unwrap_or_else(|| panic!("no PANIC line; {ctx}"));
    let (open, close) = ("(WAL ", " is not acknowledged)");
    let range = panic_line
        .rfind(open)
        .map(|i| &panic_line[i + open.len()..])
        .and_then(|r| r.strip_suffix(close))
        .unwrap_or_else(|| panic!("no \"WAL X..Y is not acknowledged\" in {panic_line:?}"));
    let (x, y) = range.split_once("..").expect("X..Y");
    let (x, y): (Lsn, Lsn) = (x.parse().unwrap(), y.parse().unwrap());
    assert!(x < y, "empty unacknowledged range {x}..{y}; {ctx}");
    let segment = wal_dir.join(walden::lsn::segment_file_name(TIMELINE, x.segno(SEG), SEG));
    let expected = format!(
        "walden: PANIC: could not fdatasync file \"{}\": Input/output error",
        segment.display()
    );
    assert!(
        panic_line.starts_with(&expected),
        "expected {expected:?}..., got {panic_line:?}"
    );

    // 3. Nothing after the failed sync was acknowledged.
    let (opened_at, acks) = parse_stdout(&run.stdout);
    assert_eq!(opened_at, Lsn(SEG), "a new WAL starts in segment 1");
    for a in &acks {
        assert!(
            a.end <= x,
            "{flusher} N={n}: record {}..{} was acknowledged but WAL {x}..{y} was not synced",
            a.lsn,
            a.end
        );
    }
    if n == FIRST_FLUSHER_SYNC {
        // The flusher's very first sync failed: nothing was ever durable.
        assert!(
            acks.is_empty(),
            "N={n}: {} records acknowledged",
            acks.len()
        );
        assert_eq!(
            x, opened_at,
            "N={n}: the unacknowledged WAL starts at the start"
        );
    } else {
        assert!(
            !acks.is_empty(),
            "{flusher} N={n}: nothing acknowledged before the failure, the test proves little"
        );
    }
    let max_end = acks.iter().map(|a| a.end).max().unwrap_or(opened_at);

    // 4. A restart (no injection) recovers, continues at the end of valid WAL
    //    (at or after every acknowledged record) and stops cleanly.
    let restart = run_child(dir.path(), &["--threads", "2", "--count", "3"]);
    assert!(
        restart.status.success(),
        "{flusher} N={n}: the restart failed: {:?}, stderr:\n{}",
        restart.status,
        restart.stderr
    );
    let (reopened_at, _) = parse_stdout(&restart.stdout);
    assert!(
        reopened_at >= max_end,
        "{flusher} N={n}: the restart continues at {reopened_at}, before acknowledged WAL ending at {max_end}"
    );

    // 5. Every acknowledged record is there, byte for byte.
    let records = scan(&wal_dir);
    for a in &acks {
        let got = records.get(&a.lsn).unwrap_or_else(|| {
            panic!(
                "{flusher} N={n}: acknowledged record at {} is missing",
                a.lsn
            )
        });
        assert!(
            got == &payload(a.seed, a.len),
            "{flusher} N={n}: record at {} differs from what was acknowledged",
            a.lsn
        );
    }
    eprintln!(
        "{flusher} N={n:2}: aborted with WAL {x}..{y} not acknowledged, {} acks (last ends {max_end}), all recovered; {} ms",
        acks.len(),
        began.elapsed().as_millis()
    );
}

/// The flusher's first sync: after startup's three (`wal_version`,
/// `wal_start`, the first segment's creation).
const FIRST_FLUSHER_SYNC: u64 = 4;

#[test]
fn eio_on_the_first_flusher_sync_is_fatal() {
    failed_fdatasync_is_fatal("pwrite", FIRST_FLUSHER_SYNC);
}

#[test]
fn eio_on_the_tenth_sync_is_fatal() {
    failed_fdatasync_is_fatal("pwrite", 10);
}

#[test]
fn eio_on_the_fortieth_sync_is_fatal() {
    failed_fdatasync_is_fatal("pwrite", 40);
}

#[test]
fn eio_on_the_first_io_uring_flusher_sync_is_fatal() {
    failed_fdatasync_is_fatal("uring", FIRST_FLUSHER_SYNC);
}

#[test]
fn eio_on_the_tenth_sync_of_the_io_uring_flusher_is_fatal() {
    failed_fdatasync_is_fatal("uring", 10);
}

#[test]
fn eio_on_the_fortieth_sync_of_the_io_uring_flusher_is_fatal() {
    failed_fdatasync_is_fatal("uring", 40);
}
