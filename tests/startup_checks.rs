//! What a start refuses, and that a refused start changes nothing on disk:
//! a control file whose checkpoint is past the end of WAL (or cut off from
//! it by a damaged record), a WAL or control file of a newer format; and,
//! with real processes, a second server on the same port, and a data
//! directory whose parent is read-only (walden.addr lives inside it).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walden::store::control::{self, ClusterState};
use walden::wal::version;
use walden::{Config, Durability, Lsn, Store};

const BIN: &str = env!("CARGO_BIN_EXE_walden");

fn config(dir: &Path) -> Config {
    let mut cfg = Config::with_data_directory(dir);
    for s in [
        "wal_segment_size=1MB",
        "wal_buffers=1MB",
        "max_record_size=64kB",
        "shared_buffers=1MB",
        "checkpoint_timeout=1h",
        // Keep every segment: the test damages WAL before the redo point.
        "wal_keep_size=1TB",
    ] {
        cfg.set(s).unwrap();
    }
    cfg
}

/// A store with some pages, an online checkpoint in the middle, closed
/// cleanly. Returns the online checkpoint's (checkpoint LSN, redo LSN).
fn store_with_a_checkpoint(dir: &Path) -> (Lsn, Lsn) {
    let store = Store::open(config(dir)).unwrap();
    for b in 0..20u32 {
        store.write_page(1, b, 0, &[b as u8 + 1; 100]).unwrap();
    }
    let (ckpt, redo) = store.checkpoint().unwrap();
    let mut last = Lsn(0);
    for b in 0..20u32 {
        last = store.write_page(1, b, 200, &[b as u8 + 7; 50]).unwrap().end;
    }
    store.wal().wait(last, Durability::Local).unwrap();
    store.close().unwrap();
    (ckpt, redo)
}

/// Rewrites the control file as a crash right after that checkpoint would
/// have left it, or with a checkpoint LSN of our choosing.
fn set_control(dir: &Path, checkpoint: Lsn, redo: Lsn) {
    let data = dir.join("data");
    let mut c = control::read(&data).unwrap().unwrap();
    c.checkpoint = checkpoint;
    c.redo = redo;
    c.state = ClusterState::InProduction;
    control::write(&data, &c, true).unwrap();
}

fn segment_of(dir: &Path, lsn: Lsn) -> (PathBuf, u64) {
    let seg = 1u64 << 20;
    let name = walden::lsn::segment_file_name(1, lsn.segno(seg), seg);
    (dir.join("wal").join(name), lsn.segment_offset(seg))
}

#[test]
fn a_checkpoint_past_the_end_of_wal_is_refused_before_anything_changes() {
    let d = tempfile::tempdir().unwrap();
    let (_, redo) = store_with_a_checkpoint(d.path());
    // The control file names a checkpoint in the zeros after the end of
    // WAL (segments preallocated there exist).
    let beyond = Lsn(((redo.0 >> 20) + 2) << 20);
    set_control(d.path(), beyond, redo);
    let before = common::snapshot(d.path());
    let e = Store::open(config(d.path())).err().unwrap().to_string();
    assert!(
        e.starts_with(&format!(
            "could not locate a valid checkpoint record at {beyond}: invalid record length at {beyond}"
        )),
        "{e}"
    );
    // Before the fix: the control file said "in crash recovery", the
    // segments after the end of WAL were removed.
    common::assert_unchanged(&before, &common::snapshot(d.path()), "the data directory");
}

#[test]
fn a_checkpoint_cut_off_by_a_damaged_record_is_refused_before_the_wal_changes() {
    let d = tempfile::tempdir().unwrap();
    let (ckpt, redo) = store_with_a_checkpoint(d.path());
    set_control(d.path(), ckpt, redo);
    // Damage the checkpoint's CHECKPOINT_REDO record (its payload): the
    // WAL now ends there, before the checkpoint record, which is intact.
    let (seg, off) = segment_of(d.path(), redo);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[off as usize + 26] ^= 0xFF;
    std::fs::write(&seg, &bytes).unwrap();
    let before = common::snapshot(d.path());
    let e = Store::open(config(d.path())).err().unwrap().to_string();
    assert_eq!(
        e,
        format!(
            "could not locate a valid checkpoint record at {ckpt}: the valid WAL ends at {redo}"
        )
    );
    // Before the fix the WAL after the damaged record, the checkpoint
    // record included, was zeroed before the refusal.
    common::assert_unchanged(&before, &common::snapshot(d.path()), "the data directory");
}

#[test]
fn a_newer_wal_or_control_file_version_is_refused_before_anything_changes() {
    let d = tempfile::tempdir().unwrap();
    store_with_a_checkpoint(d.path());
    let wal_dir = d.path().join("wal");
    let data_dir = d.path().join("data");

    version::write(&wal_dir, 99).unwrap();
    let before = common::snapshot(d.path());
    let e = Store::open(config(d.path())).err().unwrap().to_string();
    assert_eq!(
        e,
        format!(
            "WAL format version 99 in \"{}\" is not supported: this build of walden reads and writes \
             WAL format version 1 only (run the walden release that wrote this WAL; nothing was changed)",
            wal_dir.join("wal_version").display()
        )
    );
    common::assert_unchanged(&before, &common::snapshot(d.path()), "the data directory");
    // The WAL engine alone refuses it too.
    let e = walden::Wal::open(config(d.path()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("WAL format version 99 in"), "{e}");
    common::assert_unchanged(&before, &common::snapshot(d.path()), "the data directory");
    version::write(&wal_dir, 1).unwrap();

    let ctl = data_dir.join("walden.control");
    let good = std::fs::read(&ctl).unwrap();
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    let crc = crc32c::crc32c(&newer[..508]);
    newer[508..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&ctl, &newer).unwrap();
    let before = common::snapshot(d.path());
    let e = Store::open(config(d.path())).err().unwrap().to_string();
    assert_eq!(
        e,
        format!(
            "control file \"{}\" has version 99, but this build of walden reads and writes version 1 \
             only (run the walden release that wrote it; nothing was changed)",
            ctl.display()
        )
    );
    common::assert_unchanged(&before, &common::snapshot(d.path()), "the data directory");
    std::fs::write(&ctl, &good).unwrap();
    Store::open(config(d.path())).unwrap().close().unwrap();
}

#[test]
fn a_wal_from_before_format_versions_is_version_1_and_gets_the_file() {
    let d = tempfile::tempdir().unwrap();
    store_with_a_checkpoint(d.path());
    let wal_dir = d.path().join("wal");
    assert_eq!(
        version::read(&wal_dir).unwrap(),
        Some(1),
        "written at creation"
    );
    // As the previous build left it: no wal_version.
    std::fs::remove_file(wal_dir.join("wal_version")).unwrap();
    let store = Store::open(config(d.path())).unwrap();
    assert_eq!(version::read(&wal_dir).unwrap(), Some(1));
    store.close().unwrap();
}

// ---- real processes ----

fn spawn(args: &[&str], log: &Path) -> Child {
    Command::new(BIN)
        .args(args)
        .env("WALDEN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn wait_for_addr(addr_file: &Path, server: &mut Child, log: &Path) -> String {
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(addr_file) {
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
            "no {} after 30 s",
            addr_file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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

const QUIET: &[&str] = &["-c", "metrics_addr=", "-c", "wal_segment_size=1MB"];

#[test]
fn a_second_server_on_the_same_port_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let log = d.path().join("a.log");
    let a_s = a.to_str().unwrap();
    let mut first = spawn(
        &[
            &["serve", "-D", a_s, "-c", "listen_addr=127.0.0.1:0"],
            QUIET,
        ]
        .concat(),
        &log,
    );
    let addr = wait_for_addr(&a.join("data/walden.addr"), &mut first, &log);
    // Another data directory, the same address.
    let listen = format!("listen_addr={addr}");
    let second = common::run_bounded(
        &[&["serve", "-D", b.to_str().unwrap(), "-c", &listen], QUIET].concat(),
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "walden: error: could not bind {addr}: address already in use\n"
        )),
        "{err}"
    );
    assert!(first.try_wait().unwrap().is_none(), "the first still runs");
    // Its clients still reach it.
    let mut c = walden::client::Client::connect(&addr, None).unwrap();
    c.append(Durability::Local, &[(walden::Kind::DATA, b"still mine")])
        .unwrap();
    drop(c);
    assert!(sigterm(&mut first).success());
}

/// Removes the immutable attribute again, however the test ends.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn walden_addr_is_written_in_the_data_directory_whose_parent_is_read_only() {
    let d = tempfile::tempdir().unwrap();
    // The documented /srv layout: both directories in a parent walden may
    // not write (ProtectSystem=strict makes /srv read-only).
    let srv = d.path().join("srv");
    let (wal, data) = (srv.join("walden-wal"), srv.join("walden-data"));
    std::fs::create_dir_all(&wal).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let conf = d.path().join("walden.toml");
    std::fs::write(
        &conf,
        format!(
            "wal_dir = {:?}\ndata_dir = {:?}\nlisten_addr = \"127.0.0.1:0\"\nmetrics_addr = \"127.0.0.1:0\"\n\
             wal_segment_size = \"1MB\"\n",
            wal.display().to_string(),
            data.display().to_string()
        ),
    )
    .unwrap();
    // Tests run as root, whom mode 0555 does not stop: an immutable
    // directory stops everyone. Where chattr is missing or refused (not
    // ext4/xfs), the listing below still shows where the files went.
    let locked = Command::new("chattr")
        .arg("+i")
        .arg(&srv)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _undo = locked.then(|| Immutable(srv.clone()));
    if locked {
        assert!(
            std::fs::write(srv.join("probe"), b"").is_err(),
            "an immutable directory took a new file"
        );
    } else {
        eprintln!(
            "chattr +i is not available here: checking where files go, not a read-only parent"
        );
    }
    let parent_before: Vec<_> = std::fs::read_dir(&srv)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let log = d.path().join("serve.log");
    let mut server = spawn(&["serve", "--config", conf.to_str().unwrap()], &log);
    let addr = wait_for_addr(&data.join("walden.addr"), &mut server, &log);
    let text = std::fs::read_to_string(data.join("walden.addr")).unwrap();
    assert!(text.contains("\nmetrics_addr=127.0.0.1:"), "{text}");
    // `walden status -D` finds it there.
    let status = common::run_bounded(&["status", "-D", data.to_str().unwrap()]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("state:           in production"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let mut parent_after: Vec<_> = std::fs::read_dir(&srv)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    parent_after.sort();
    let mut parent_before = parent_before;
    parent_before.sort();
    assert_eq!(parent_before, parent_after, "walden wrote in the parent");
    assert!(!addr.is_empty());
    assert!(sigterm(&mut server).success());
    assert!(
        !data.join("walden.addr").exists(),
        "removed at a clean stop"
    );
}

#[test]
fn waldump_and_controldata_report_a_newer_wal_format() {
    let d = tempfile::tempdir().unwrap();
    store_with_a_checkpoint(d.path());
    let dir = d.path().to_str().unwrap();
    let control = common::run_bounded(&["controldata", "-D", dir]);
    let text = String::from_utf8_lossy(&control.stdout);
    assert!(control.status.success(), "{text}");
    assert!(text.contains("WAL format version:"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("WAL format version:") && l.ends_with(" 1")),
        "{text}"
    );

    version::write(&d.path().join("wal"), 99).unwrap();
    let before = common::snapshot(d.path());
    let want = format!(
        "WAL format version 99 in \"{}\" is not supported",
        d.path().join("wal/wal_version").display()
    );
    let dump = common::run_bounded(&["waldump", "-D", dir]);
    let err = String::from_utf8_lossy(&dump.stderr);
    assert!(!dump.status.success());
    assert!(err.contains(&want), "{err}");
    let control = common::run_bounded(&["controldata", "-D", dir]);
    let text = String::from_utf8_lossy(&control.stdout);
    assert!(!control.status.success(), "{text}");
    assert!(text.contains(&format!("WARNING: {want}")), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("WAL format version:") && l.ends_with(" 99")),
        "{text}"
    );
    // The control file's fields are still shown.
    assert!(text.contains("Database cluster state:"), "{text}");
    let serve = common::run_bounded(
        &[
            &["serve", "-D", dir, "-c", "listen_addr=127.0.0.1:0"],
            QUIET,
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&serve.stderr);
    assert!(!serve.status.success(), "{err}");
    assert!(err.contains(&format!("walden: error: {want}")), "{err}");
    common::assert_unchanged(&before, &common::snapshot(d.path()), "the data directory");
}
