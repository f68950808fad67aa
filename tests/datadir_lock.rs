//! The data directory lock (`walden.pid`) with real processes: a second
//! writer on a running server's directory (`walden serve`, `walden bench
//! --embedded`, the crash-test children) exits non-zero naming the holder
//! and changes no byte on disk; every record the first server acknowledged
//! survives that and a kill -9; the lock file of a killed server is taken
//! over by the next start; the read-only tools work beside a running server.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_walden");

/// Server settings for these tests: a port the kernel picks, no HTTP, small
/// segments, and no WAL released (the ack logs are verified against it).
const SERVE: &[&str] = &[
    "-c",
    "listen_addr=127.0.0.1:0",
    "-c",
    "metrics_addr=",
    "-c",
    "wal_segment_size=1MB",
    "-c",
    "wal_keep_size=1TB",
    "-c",
    "checkpoint_timeout=1h",
];

fn spawn_serve(dir: &Path, log: &Path) -> Child {
    // A killed server leaves its walden.addr behind: not ours to wait for.
    let _ = std::fs::remove_file(dir.join("data/walden.addr"));
    Command::new(BIN)
        .arg("serve")
        .arg("-D")
        .arg(dir)
        .args(SERVE)
        .env("WALDEN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The protocol address in `DIR/data/walden.addr`, once the server is ready.
fn wait_ready(dir: &Path, server: &mut Child, log: &Path) -> String {
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join("data/walden.addr")) {
            if let Some(a) = text.lines().find_map(|l| l.strip_prefix("listen_addr=")) {
                return a.to_string();
            }
        }
        if let Some(st) = server.try_wait().unwrap() {
            panic!(
                "the server exited ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the server did not write walden.addr"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `walden ARGS -D DIR` to its end, at most 30 s (a writer the lock
/// failed to stop would run on: it is killed and the test fails).
fn run_bounded(args: &[&str], dir: &Path) -> Output {
    let dir = dir.to_str().unwrap();
    let all: Vec<&str> = args.iter().copied().chain(["-D", dir]).collect();
    common::run_bounded(&all)
}

fn kill_9(child: &mut Child) {
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `walden verify` over an ack log: every ack passed, none failed.
fn verify_all(log: &Path, dir: &Path) -> u64 {
    let v = Command::new(BIN)
        .args(["verify", "--ack-log"])
        .arg(log)
        .arg("-D")
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(text.trim_end().ends_with("passed, 0 failed"), "{text}");
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// `lock file "DIR/…/walden.pid" is held by process PID (walden serve
/// started at …); is another server running on this data directory?`
fn assert_refused_by(out: &Output, lock: &Path, pid: u32, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "not refused: {err}");
    let head = format!(
        "lock file \"{}\" is held by process {pid} (walden serve started at ",
        lock.display()
    );
    let tail = format!("); is another server running on this {what}?");
    let line = err
        .lines()
        .find(|l| l.contains(&head))
        .unwrap_or_else(|| panic!("no `{head}` in: {err}"));
    assert!(line.ends_with(&tail), "{line}");
    assert!(line.contains(" UTC); is another"), "{line}");
}

#[test]
fn a_second_writer_on_a_running_servers_directory_is_refused_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("walden");
    let log = d.path().join("serve.log");
    let mut server = spawn_serve(&dir, &log);
    let addr = wait_ready(&dir, &mut server, &log);
    let (host, port) = addr.rsplit_once(':').unwrap();

    // The first server acknowledges records (a line per ack, written only
    // once the ack arrived).
    let acks = d.path().join("acks");
    let bench = Command::new(BIN)
        .args([
            "bench", "-h", host, "-p", port, "-c", "4", "-j", "2", "-T", "1",
        ])
        .args(["--size", "300", "--level", "local", "--ack-log"])
        .arg(&acks)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(bench.success());
    // The preparer may still be making the next segments.
    std::thread::sleep(Duration::from_millis(500));
    let before = common::snapshot(&dir);
    let pid = server.id();
    let data_lock = dir.join("data/walden.pid");
    let wal_lock = dir.join("wal/walden.pid");
    let holder = std::fs::read_to_string(&data_lock).unwrap();
    assert!(
        holder.starts_with(&format!("pid={pid}\ncommand=walden serve\nstarted=")),
        "{holder}"
    );
    assert!(
        holder.contains(&format!("\nlisten_addr={addr}\n")),
        "{holder}"
    );

    // A second server, the embedded bench (WAL alone, and page store) and
    // the crash-test children: each refused, naming the first server.
    // Each with the first server's settings: any other refusal (a segment
    // size that differs, say) would prove nothing about the lock.
    let same = ["wal_segment_size=1MB", "wal_keep_size=1TB"];
    let serve_args: Vec<&str> = [&["serve"], SERVE].concat();
    let second = run_bounded(&serve_args, &dir);
    assert_refused_by(&second, &data_lock, pid, "data directory");
    let mut bench_args = vec!["bench", "--embedded", "-T", "1"];
    same.iter().for_each(|s| bench_args.extend(["--set", s]));
    let embedded = run_bounded(&bench_args, &dir);
    assert_refused_by(&embedded, &wal_lock, pid, "WAL directory");
    bench_args.extend(["--pages", "100"]);
    let pages = run_bounded(&bench_args, &dir);
    assert_refused_by(&pages, &data_lock, pid, "data directory");
    let mut child_args = vec!["wal-child", "--count", "10"];
    same.iter().for_each(|s| child_args.extend(["-c", s]));
    let wal_child = run_bounded(&child_args, &dir);
    assert_refused_by(&wal_child, &wal_lock, pid, "WAL directory");
    child_args[0] = "store-child";
    child_args.drain(1..3);
    let store_child = run_bounded(&child_args, &dir);
    assert_refused_by(&store_child, &data_lock, pid, "data directory");

    // Not one byte changed, the lock files included.
    common::assert_unchanged(
        &before,
        &common::snapshot(&dir),
        "the running server's directory",
    );
    assert!(
        server.try_wait().unwrap().is_none(),
        "the first server is still running"
    );

    // Every acknowledged record survives a kill -9 of the first server.
    kill_9(&mut server);
    let passed = verify_all(&acks, &dir);
    assert!(passed > 50, "too few acks to prove anything: {passed}");
    // And a restart (recovery), then a clean stop.
    let log2 = d.path().join("serve2.log");
    let mut again = spawn_serve(&dir, &log2);
    wait_ready(&dir, &mut again, &log2);
    assert!(sigterm(&mut again).success());
    assert_eq!(verify_all(&acks, &dir), passed);
}

#[test]
fn a_killed_servers_lock_file_is_taken_over_and_read_only_tools_work_beside_a_server() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("walden");
    let log = d.path().join("serve.log");
    let mut server = spawn_serve(&dir, &log);
    wait_ready(&dir, &mut server, &log);
    let first = server.id();

    // pg_waldump and pg_controldata's counterparts read beside it.
    let dump = run_bounded(&["waldump", "-n", "5"], &dir);
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(String::from_utf8_lossy(&dump.stdout).contains("CHECKPOINT"));
    let control = run_bounded(&["controldata"], &dir);
    let text = String::from_utf8_lossy(&control.stdout);
    assert!(
        control.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&control.stderr)
    );
    assert!(text.contains("Database cluster state:"), "{text}");

    // kill -9: the kernel drops the flock; walden.pid still names it.
    kill_9(&mut server);
    let stale = std::fs::read_to_string(dir.join("data/walden.pid")).unwrap();
    assert!(stale.starts_with(&format!("pid={first}\n")), "{stale}");

    let log2 = d.path().join("serve2.log");
    let mut next = spawn_serve(&dir, &log2);
    wait_ready(&dir, &mut next, &log2);
    let startup = std::fs::read_to_string(&log2).unwrap();
    for lock in ["data/walden.pid", "wal/walden.pid"] {
        let taken = format!(
            "lock file \"{}\" was left by process {first} (walden serve started at ",
            dir.join(lock).display()
        );
        assert!(startup.contains(&taken), "no `{taken}` in: {startup}");
    }
    let now = std::fs::read_to_string(dir.join("data/walden.pid")).unwrap();
    assert!(now.starts_with(&format!("pid={}\n", next.id())), "{now}");
    // A clean stop releases and empties it.
    assert!(sigterm(&mut next).success());
    assert_eq!(std::fs::read(dir.join("data/walden.pid")).unwrap(), b"");
    assert_eq!(std::fs::read(dir.join("wal/walden.pid")).unwrap(), b"");
}
