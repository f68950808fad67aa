//! A full WAL device, for real: `walden serve` with its WAL on a 48 MiB
//! loop-mounted ext4 filesystem that a filler file almost fills. Appends at
//! `local` run until the next segment cannot be created; the refusal must be
//! `WAL_FULL` ("WAL device full"), the server must keep serving (Status, Read
//! of acknowledged records), appends must resume by themselves once the
//! filler is removed, and after a clean SIGTERM and a restart every
//! acknowledged record must be in the WAL byte for byte.
//!
//! Needs root, mkfs.ext4 and loop devices; without them it fails (it does
//! not skip) unless `WALDEN_SKIP_LOOP_TESTS=1` is set.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walden::client::{Client, ClientError};
use walden::protocol::ErrorCode;
use walden::testkit::payload;
use walden::{Durability, Kind, Lsn};

const IMAGE_SIZE: u64 = 48 << 20;
/// Free space left on the loop filesystem once the filler is in place.
const LEAVE_FREE: u64 = 5 << 19; // 2.5 MiB
const RECORD: usize = 4096;
/// The whole fill phase (appends until the refusal) must end within this.
const FILL_DEADLINE: Duration = Duration::from_secs(60);
/// Appends must resume within this after the filler is removed.
const RESUME_DEADLINE: Duration = Duration::from_secs(15);
/// Every single reply from the server must come within this.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a command, panicking with its output when it cannot run or fails.
fn run(what: &str, cmd: &mut Command) {
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{what} failed ({}): {:?}\nstdout: {}\nstderr: {}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "{what}: could not run {cmd:?}: {e} (this test needs root, e2fsprogs \
             (mkfs.ext4), mount and loop devices; set WALDEN_SKIP_LOOP_TESTS=1 to skip it)"
        ),
    }
}

/// An ext4 image mounted on `mnt` through a loop device; unmounted (lazily
/// if busy) and its loop device detached on drop, also when the test fails.
struct LoopMount {
    mnt: PathBuf,
    device: Option<String>,
}

impl LoopMount {
    fn new(dir: &Path) -> LoopMount {
        let image = dir.join("wal.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
        // -m 0: no blocks reserved for root (the server runs as root and
        // could use them; the free space computed below is then exact).
        run(
            "mkfs.ext4",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&image),
        );
        run(
            "mount -o loop",
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mnt),
        );
        let mut m = LoopMount { mnt, device: None };
        // From here on, drop unmounts. Note the loop device to detach it.
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", "--target"])
            .arg(&m.mnt)
            .output();
        if let Ok(out) = out {
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if dev.starts_with("/dev/loop") {
                m.device = Some(dev);
            }
        }
        m
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let quiet = |c: &mut Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !quiet(Command::new("umount").arg(&self.mnt)) {
            eprintln!(
                "enospc_loop: umount {} failed, unmounting lazily",
                self.mnt.display()
            );
            quiet(Command::new("umount").arg("-l").arg(&self.mnt));
        }
        // mount -o loop sets autoclear, so this usually finds nothing to do;
        // after a lazy unmount the kernel detaches it once the last file closes.
        if let Some(dev) = &self.device {
            let attached = Command::new("losetup")
                .arg(dev)
                .output()
                .map(|o| o.status.success() && !o.stdout.is_empty())
                .unwrap_or(false);
            if attached {
                quiet(Command::new("losetup").arg("-d").arg(dev));
            }
        }
    }
}

/// Free bytes on the filesystem holding `path` (for root: f_bfree).
fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(
        r,
        0,
        "statvfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    st.f_bfree as u64 * st.f_frsize as u64
}

/// A `walden serve` process, its stderr in a file; killed (SIGKILL) on drop
/// if it is still running, before the mount goes away.
struct ServerProc {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
    addr: String,
}

impl ServerProc {
    fn spawn(dir: &Path, wal_dir: &Path, log: PathBuf) -> ServerProc {
        let _ = std::fs::remove_file(dir.join("data/walden.addr"));
        let stderr = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(["serve", "-D"])
            .arg(dir)
            .arg("-c")
            .arg(format!("wal_dir={}", wal_dir.display()))
            .args([
                "-c",
                "listen_addr=127.0.0.1:0",
                "-c",
                "metrics_addr=",
                "-c",
                "wal_segment_size=1MB",
                "-c",
                "wal_prealloc=1",
                // No checkpoint may free WAL during the test: the space on the
                // WAL device comes back only when the filler is removed.
                "-c",
                "max_wal_size=1GB",
                "-c",
                "wal_keep_size=1GB",
                "-c",
                "checkpoint_timeout=1d",
            ])
            .env("WALDEN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning walden serve");
        let mut s = ServerProc {
            child: Some(child),
            dir: dir.to_path_buf(),
            log,
            addr: String::new(),
        };
        s.addr = s.wait_for_addr();
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Panics with `msg` and the server's stderr (and whether it still runs).
    fn fail(&mut self, msg: String) -> ! {
        let state = match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(st))) => format!("the server EXITED: {st:?}"),
            Some(Ok(None)) => "the server is still running".to_string(),
            Some(Err(e)) => format!("cannot tell whether the server runs: {e}"),
            None => "the server was stopped".to_string(),
        };
        panic!(
            "{msg}\n{state}\n--- server stderr ({}) ---\n{}--- end of server stderr ---",
            self.log.display(),
            self.log_text()
        );
    }

    fn wait_for_addr(&mut self) -> String {
        let t = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(self.dir.join("data/walden.addr")) {
                if let Some(a) = text.lines().find_map(|l| l.strip_prefix("listen_addr=")) {
                    return a.to_string();
                }
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.fail(format!("the server exited before it was ready: {st:?}"));
            }
            if t.elapsed() > Duration::from_secs(30) {
                self.fail("the server did not write walden.addr within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connect(&mut self) -> Client {
        match Client::connect(&self.addr, None) {
            Ok(c) => {
                c.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
                c
            }
            Err(e) => self.fail(format!(
                "cannot connect to the server at {}: {e}",
                self.addr
            )),
        }
    }

    /// SIGTERM, then the exit within 30 s, which must be a clean 0.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("server already stopped");
        let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0, "kill -TERM: {}", std::io::Error::last_os_error());
        let t = Instant::now();
        let exit = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                self.fail("no exit within 30 s of SIGTERM (killed it)".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if exit.code() != Some(0) {
            self.fail(format!("SIGTERM must give a clean exit 0, got {exit:?}"));
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads every record from `from` to the flush LSN: LSN -> (kind, payload).
fn read_all(s: &mut ServerProc, c: &mut Client, from: Lsn) -> BTreeMap<Lsn, (Kind, Vec<u8>)> {
    let flush = match c.status() {
        Ok((_, _, flush, _)) => flush,
        Err(e) => s.fail(format!("Status failed: {e}")),
    };
    let mut out = BTreeMap::new();
    let mut at = from;
    while at < flush {
        match c.read(at, 4 << 20, 0) {
            Ok((recs, end)) => {
                if recs.is_empty() || end <= at {
                    s.fail(format!(
                        "Read from {at} stopped before the flush LSN {flush}"
                    ));
                }
                for r in recs {
                    out.insert(r.lsn, (r.kind, r.payload));
                }
                at = end;
            }
            Err(e) => s.fail(format!("Read from {at} failed: {e}")),
        }
    }
    out
}

/// Every acknowledged record is in `found` at its LSN, kind DATA, same bytes.
fn check_acked(
    s: &mut ServerProc,
    acked: &BTreeMap<Lsn, Vec<u8>>,
    found: &BTreeMap<Lsn, (Kind, Vec<u8>)>,
    when: &str,
) {
    let mut bad = Vec::new();
    for (lsn, p) in acked {
        match found.get(lsn) {
            Some((k, got)) if *k == Kind::DATA && got == p => {}
            Some((k, got)) => bad.push(format!(
                "{lsn}: kind {k:?}, {} bytes, differs from the {} acknowledged",
                got.len(),
                p.len()
            )),
            None => bad.push(format!("{lsn}: missing")),
        }
    }
    if !bad.is_empty() {
        s.fail(format!(
            "{when}: {} of {} acknowledged records are not intact; first ones: {:#?}",
            bad.len(),
            acked.len(),
            &bad[..bad.len().min(10)]
        ));
    }
}

#[test]
fn a_full_wal_device_refuses_appends_with_wal_full_and_recovers_when_space_returns() {
    if std::env::var("WALDEN_SKIP_LOOP_TESTS").as_deref() == Ok("1") {
        eprintln!(
            "enospc_loop: SKIPPED because WALDEN_SKIP_LOOP_TESTS=1 \
             (this test needs root, mkfs.ext4 and a loop device)"
        );
        return;
    }
    let started = Instant::now();
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test mounts a loop filesystem and must run as root \
         (set WALDEN_SKIP_LOOP_TESTS=1 to skip it)"
    );
    let tmp = tempfile::Builder::new()
        .prefix("enospc-loop")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    // Declared in this order so that the server is killed before the unmount,
    // and the unmount comes before the temporary directory is removed.
    let mount = LoopMount::new(tmp.path());
    let data = tmp.path().join("d");
    let wal_dir = mount.mnt.join("wal");
    let mut s = ServerProc::spawn(&data, &wal_dir, tmp.path().join("serve1.log"));

    // Fill the WAL device but for LEAVE_FREE.
    let filler_path = mount.mnt.join("filler");
    let free_before = free_bytes(&mount.mnt);
    assert!(
        free_before > LEAVE_FREE + (8 << 20),
        "only {free_before} bytes free on the loop fs"
    );
    let filler = File::create(&filler_path).unwrap();
    let want = (free_before - LEAVE_FREE) as libc::off_t;
    let r = unsafe { libc::fallocate(filler.as_raw_fd(), 0, 0, want) };
    assert_eq!(
        r,
        0,
        "fallocate {want} bytes: {}",
        std::io::Error::last_os_error()
    );
    filler.sync_all().unwrap();
    drop(filler);
    let free_filled = free_bytes(&mount.mnt);
    eprintln!(
        "enospc_loop: {free_before} bytes free on the loop fs after startup; \
         filler of {want} bytes leaves {free_filled}"
    );

    // Append 4 KiB records at local until one is refused.
    let mut c = s.connect();
    let mut acked: BTreeMap<Lsn, Vec<u8>> = BTreeMap::new();
    let mut seed = 0u64;
    let t = Instant::now();
    let (code, message, refused) = loop {
        if t.elapsed() > FILL_DEADLINE {
            let n = acked.len();
            s.fail(format!(
                "{n} records ({} MiB) acknowledged in {FILL_DEADLINE:?} on a device with \
                 {free_filled} bytes free, and no append was refused",
                (n * RECORD) >> 20
            ));
        }
        let p = payload(seed, RECORD);
        seed += 1;
        match c.append(Durability::Local, &[(Kind::DATA, &p)]) {
            Ok(ack) => {
                acked.insert(ack.lsns[0], p);
            }
            Err(ClientError::Server { code, message }) => break (code, message, p),
            Err(e) => s.fail(format!(
                "append #{} failed with a non-server error after {} acks: {e} \
                 (a crash, a hang past {REPLY_TIMEOUT:?} or a closed connection)",
                seed - 1,
                acked.len()
            )),
        }
    };
    let fill_time = t.elapsed();
    eprintln!(
        "enospc_loop: {} records acknowledged, then refused after {fill_time:?}: {code} {message}",
        acked.len()
    );
    if code != ErrorCode::WAL_FULL || !message.contains("WAL device full") {
        s.fail(format!(
            "expected WAL_FULL (code 10) with \"WAL device full\" after {} acks, got code {code}: {message}",
            acked.len()
        ));
    }
    if acked.len() < 100 {
        s.fail(format!(
            "only {} records acknowledged before WAL_FULL with {free_filled} bytes free",
            acked.len()
        ));
    }

    // Still up, on the same connection: Status, a second refusal, and the
    // exact bytes of acknowledged records.
    match c.status() {
        Ok((insert, write, flush, json)) => {
            if !(insert >= write && write >= flush && json.contains("\"flush_lsn\"")) {
                s.fail(format!(
                    "odd Status while full: {insert} {write} {flush} {json}"
                ));
            }
        }
        Err(e) => s.fail(format!("Status while the WAL device is full failed: {e}")),
    }
    match c.append(Durability::Local, &[(Kind::DATA, &refused)]) {
        Err(ClientError::Server { code, .. }) if code == ErrorCode::WAL_FULL => {}
        other => s.fail(format!(
            "a second append while still full: expected WAL_FULL, got {other:?}"
        )),
    }
    let first = *acked.keys().next().unwrap();
    let last = *acked.keys().next_back().unwrap();
    for lsn in [first, last] {
        match c.read(lsn, 0, 1) {
            Ok((recs, _))
                if recs.len() == 1 && recs[0].lsn == lsn && recs[0].payload == acked[&lsn] => {}
            other => s.fail(format!(
                "Read of acknowledged {lsn} while full: {:?}",
                other.map(|(r, e)| (
                    r.iter()
                        .map(|r| (r.lsn, r.payload.len()))
                        .collect::<Vec<_>>(),
                    e
                ))
            )),
        }
    }
    let mut c2 = s.connect();
    if let Err(e) = c2.status() {
        s.fail(format!("Status on a new connection while full failed: {e}"));
    }
    drop(c2);
    if !s.log_text().contains("WAL device full") {
        s.fail("the server did not log \"WAL device full\"".into());
    }

    // Free the space: appends resume by themselves.
    std::fs::remove_file(&filler_path).unwrap();
    let t = Instant::now();
    loop {
        let p = payload(seed, RECORD);
        seed += 1;
        match c.append(Durability::Local, &[(Kind::DATA, &p)]) {
            Ok(ack) => {
                acked.insert(ack.lsns[0], p);
                break;
            }
            Err(ClientError::Server { code, .. }) if code == ErrorCode::WAL_FULL => {
                if t.elapsed() > RESUME_DEADLINE {
                    s.fail(format!(
                        "appends still refused with WAL_FULL {RESUME_DEADLINE:?} after the filler \
                         was removed ({} bytes free now)",
                        free_bytes(&mount.mnt)
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => s.fail(format!("append after freeing space failed: {e}")),
        }
    }
    let resume_time = t.elapsed();
    eprintln!("enospc_loop: appends resumed {resume_time:?} after the filler was removed");
    // More than one segment's worth, so new segments are created again.
    for _ in 0..600 {
        let p = payload(seed, RECORD);
        seed += 1;
        match c.append(Durability::Local, &[(Kind::DATA, &p)]) {
            Ok(ack) => {
                acked.insert(ack.lsns[0], p);
            }
            Err(e) => s.fail(format!(
                "append after the resume failed ({} acked so far): {e}",
                acked.len()
            )),
        }
    }
    let found = read_all(&mut s, &mut c, first);
    check_acked(&mut s, &acked, &found, "before the restart");
    drop(c);

    // Clean stop, restart on the same directories, every ack intact.
    s.stop();
    let first_log = s.log_text();
    drop(s);
    let mut s = ServerProc::spawn(&data, &wal_dir, tmp.path().join("serve2.log"));
    let mut c = s.connect();
    let found = read_all(&mut s, &mut c, first);
    check_acked(&mut s, &acked, &found, "after the restart");
    let refused_written = found.values().any(|(_, p)| *p == refused);
    eprintln!(
        "enospc_loop: after the restart all {} acknowledged records are intact \
         ({} records read from {first}); the refused payload is {}in the WAL",
        acked.len(),
        found.len(),
        if refused_written { "" } else { "not " }
    );
    drop(c);
    s.stop();
    let warn_lines: Vec<&str> = first_log
        .lines()
        .filter(|l| l.contains("WAL device") || l.contains("WARN") || l.contains("ERROR"))
        .collect();
    eprintln!(
        "enospc_loop: server log lines about the full device:\n{}",
        warn_lines.join("\n")
    );
    eprintln!("enospc_loop: total {:?}", started.elapsed());
}
