//! Errors that say what to do: the real `walden` binary against real
//! servers, asserting the exact messages an operator reads.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::ServerProcess;

/// `walden ARGS` in `cwd` with only the `env` WALDEN_* variables set; at
/// most 30 s.
fn walden(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walden"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("WALDEN_HOST")
        .env_remove("WALDEN_PORT")
        .env_remove("WALDEN_DATA")
        .env("WALDEN_LOG", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("walden {} still running after 30 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(out.path()).unwrap(),
        stderr: std::fs::read(err.path()).unwrap(),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A successful `walden status` printed the server's LSNs.
fn assert_status_ok(o: &Output, how: &str) {
    assert!(
        o.status.success() && stdout(o).contains("flush LSN:"),
        "status {how}: {}{}",
        stdout(o),
        stderr(o)
    );
}

#[test]
fn client_tools_find_the_server_or_say_what_to_pass() {
    let server = ServerProcess::start(&[]);
    let data = server.dir.path().join("data");
    let data = data.to_str().unwrap();
    let (host, port) = server.addr.rsplit_once(':').unwrap();
    let empty = tempfile::tempdir().unwrap();
    let cwd = empty.path();
    let nowhere = cwd.join("nowhere");
    let nowhere = nowhere.to_str().unwrap();

    // -D DIR without walden.addr: said, not a guess at 127.0.0.1:7480.
    for args in [
        vec!["status", "-D", nowhere],
        vec!["append", "-D", nowhere],
        vec!["checkpoint", "-D", nowhere],
        vec!["page", "read", "--rel", "1", "--block", "0", "-D", nowhere],
        vec!["bench", "-D", nowhere, "-T", "1"],
    ] {
        let o = walden(&args, &[], cwd);
        assert!(!o.status.success());
        assert_eq!(
            stderr(&o),
            format!(
                "walden: error: no walden.addr in {nowhere}: is the server running? \
                 (the directory is from -D; or pass -h HOST[:PORT])\n"
            ),
            "{args:?}"
        );
    }
    // Nothing given and no ./walden-data: what to pass.
    let o = walden(&["status"], &[], cwd);
    assert_eq!(
        stderr(&o),
        "walden: error: no server given and no walden.addr in ./walden-data: \
         pass -h HOST[:PORT] or -D DIR, or set WALDEN_HOST or WALDEN_DATA\n"
    );

    // The flags: -h HOST -p PORT, -h HOST:PORT, --host, and the old -H.
    assert_status_ok(
        &walden(&["status", "-h", host, "-p", port], &[], cwd),
        "-h -p",
    );
    assert_status_ok(&walden(&["status", "-h", &server.addr], &[], cwd), "-h");
    assert_status_ok(
        &walden(&["status", "--host", &server.addr], &[], cwd),
        "--host",
    );
    assert_status_ok(&walden(&["status", "-H", &server.addr], &[], cwd), "-H");
    assert_status_ok(&walden(&["status", "-D", data], &[], cwd), "-D");
    // The environment, as PGHOST/PGPORT/PGDATA.
    assert_status_ok(
        &walden(
            &["status"],
            &[("WALDEN_HOST", host), ("WALDEN_PORT", port)],
            cwd,
        ),
        "WALDEN_HOST/PORT",
    );
    assert_status_ok(
        &walden(&["status"], &[("WALDEN_HOST", &server.addr)], cwd),
        "WALDEN_HOST=HOST:PORT",
    );
    assert_status_ok(
        &walden(&["status"], &[("WALDEN_DATA", data)], cwd),
        "WALDEN_DATA",
    );
    let o = walden(&["status"], &[("WALDEN_DATA", nowhere)], cwd);
    assert!(
        stderr(&o).contains(&format!(
            "no walden.addr in {nowhere}: is the server running? (the directory is from WALDEN_DATA"
        )),
        "{}",
        stderr(&o)
    );
    // An explicit flag wins over the environment.
    let dead = [("WALDEN_HOST", "127.0.0.1:1")];
    assert_status_ok(
        &walden(&["status", "-D", data], &dead, cwd),
        "-D over WALDEN_HOST",
    );
    assert_status_ok(
        &walden(&["status", "-p", port], &[("WALDEN_DATA", nowhere)], cwd),
        "-p over WALDEN_DATA",
    );
    // --help stays (-h is the host).
    let o = walden(&["status", "--help"], &[], cwd);
    assert!(
        o.status.success() && stdout(&o).contains("-h, --host <HOST>"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_refused_connection_is_said_once() {
    let cwd = tempfile::tempdir().unwrap();
    for args in [
        vec!["status", "-h", "127.0.0.1", "-p", "1"],
        vec!["append", "-H", "127.0.0.1:1"],
        vec!["bench", "-h", "127.0.0.1:1", "-T", "1"],
    ] {
        let o = walden(&args, &[], cwd.path());
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(
            err.starts_with("walden: error: ")
                && err.contains(
                    "could not connect to 127.0.0.1:1: Connection refused (os error 111)\n"
                ),
            "{args:?}: {err}"
        );
        assert_eq!(err.matches("os error").count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn append_that_fails_partway_says_which_lines_were_committed() {
    let server = ServerProcess::start(&["max_record_size=1kB", "fsync=off"]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    let mut text = String::new();
    for i in 1..=2500 {
        if i == 2200 {
            text.push_str(&"x".repeat(2000));
        } else {
            text.push_str(&format!("line {i}"));
        }
        text.push('\n');
    }
    std::fs::write(&input, text).unwrap();
    let o = walden(
        &["append", "-h", &server.addr, input.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert!(!o.status.success(), "append must fail");
    let lsns: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(lsns.len(), 2000, "one LSN per committed line");
    assert_eq!(
        stderr(&o),
        format!(
            "walden: error: append stopped: lines 1-2000 committed ({}..{}); \
             lines 2001-2500 not committed: server error RECORD_TOO_LARGE: \
             record 199 has 2000 bytes, more than max_record_size (1024 bytes)\n",
            lsns[0], lsns[1999]
        )
    );
    // What the report says is what the server holds.
    let o = walden(
        &["read", "-h", &server.addr, "--from", &lsns[0]],
        &[],
        dir.path(),
    );
    let read = stdout(&o);
    let records: Vec<&str> = read.lines().collect();
    assert_eq!(records.len(), 2000, "{}", stderr(&o));
    assert_eq!(records[1999], format!("{}\tline 2000", lsns[1999]));
}

#[test]
fn dash_c_errors_name_the_parameter_and_the_expected_form() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d");
    let d = d.to_str().unwrap();
    let run = |setting: &str| {
        let o = walden(&["serve", "-D", d, "-c", setting], &[], dir.path());
        assert!(!o.status.success());
        stderr(&o)
    };
    assert_eq!(
        run("wal_buffers=bad"),
        "walden: error: invalid value for parameter \"wal_buffers\": \"bad\": \
         expected a size such as 16MB (units B, kB, MB, GB, TB)\n"
    );
    assert_eq!(
        run("wal_buffers"),
        "walden: error: parameter \"wal_buffers\" needs a value: expected -c wal_buffers=VALUE, \
         where VALUE is a size such as 16MB (units B, kB, MB, GB, TB)\n"
    );
    assert_eq!(
        run("fsync=maybe"),
        "walden: error: invalid value for parameter \"fsync\": \"maybe\": \
         expected a boolean: on, off, true, false, yes, no, 1 or 0\n"
    );
    let e = run("wal_bufers=16MB");
    assert!(
        e.starts_with(
            "walden: error: unrecognized configuration parameter \"wal_bufers\"; \
             valid parameters are: allow_unauthenticated, auth_token_file,"
        ) && e.contains(" wal_buffers, ")
            && e.ends_with(" wal_writer_delay\n"),
        "{e}"
    );
    // --set is the long spelling of -c.
    let o = walden(
        &["serve", "-D", d, "--set", "wal_buffers=bad"],
        &[],
        dir.path(),
    );
    assert!(
        stderr(&o).contains("\"wal_buffers\": \"bad\""),
        "{}",
        stderr(&o)
    );
    assert!(!Path::new(d).exists(), "a refused setting created {d}");
}

/// `walden serve --config FILE`: its log, and its address once ready.
struct ConfigServer {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl ConfigServer {
    fn start(config: &Path, dir: &Path) -> ConfigServer {
        let log = dir.join(format!("serve-{}.log", Instant::now().elapsed().as_nanos()));
        let _ = std::fs::remove_file(dir.join("data/walden.addr"));
        let child = Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("WALDEN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        ConfigServer { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log shows `line` (or the process exits).
    fn wait_for(&mut self, line: &str) {
        let t = Instant::now();
        while !self.log().contains(line) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no {line:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for ConfigServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn config_file_takes_on_off_and_reload_names_settings_fixed_at_creation() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walden.toml");
    let write = |segment: &str| {
        std::fs::write(
            &config,
            format!(
                "wal_dir = \"{0}/wal\"\ndata_dir = \"{0}/data\"\nlisten_addr = \"127.0.0.1:0\"\n\
                 metrics_addr = \"\"\nwal_segment_size = \"{segment}\"\n\
                 # as walden test-fsync recommends it, and PostgreSQL spells booleans\n\
                 wal_sync_at_depth_1 = on\nfsync = off  # tests only\nlog_checkpoints = \"yes\"\n",
                dir.path().display()
            ),
        )
        .unwrap()
    };
    write("1MB");
    let mut server = ConfigServer::start(&config, dir.path());
    server.wait_for("walden ready");

    write("2MB");
    server.signal("-HUP");
    server.wait_for(
        "parameter \"wal_segment_size\" cannot be changed after the WAL was created \
         (it is 1MB; the new value 2MB would be refused at the next start)",
    );
    assert!(
        !server
            .log()
            .contains("wal_segment_size\" cannot be changed without restarting"),
        "{}",
        server.log()
    );
    server.signal("-TERM");
    server.wait_for("walden stopped cleanly");
    drop(server);

    // And the next start does refuse it, naming the setting.
    let o = walden(
        &["serve", "--config", config.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("walden: error: ") && err.contains("wal_segment_size"),
        "{err}"
    );
}

#[test]
fn bench_prints_every_progress_tick_and_no_empty_checkpoint_line() {
    let server = ServerProcess::start(&["fsync=off"]);
    let dir = tempfile::tempdir().unwrap();
    let o = walden(
        &["bench", "-h", &server.addr, "-T", "3", "-P", "1"],
        &[],
        dir.path(),
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let progress: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("progress: "))
        .collect();
    assert_eq!(progress.len(), 3, "{out}");
    assert!(progress[2].starts_with("progress: 3.0 s"), "{out}");
    assert!(out.contains("checkpoints during the run: 0"), "{out}");
    assert!(out.contains("latency outside checkpoints: "), "{out}");
    assert!(!out.contains("latency inside checkpoints"), "{out}");
}

/// Standard output whose reader is gone before the tool writes (`walden
/// status | head -0`): the tool stops quietly with status 0, as a C tool
/// killed by SIGPIPE would, instead of a panic or `Broken pipe` error.
#[test]
fn a_closed_standard_output_ends_the_tool_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let server = ServerProcess::start(&["fsync=off"]);
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["append", "-h", &server.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: String = (0..5000).map(|i| format!("record {i}\n")).collect();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), lines.as_bytes()).unwrap();
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let first = stdout(&o).lines().next().unwrap().to_string();
    let data = server.dir.path().join("data").to_str().unwrap().to_string();
    for args in [
        vec!["status", "-h", &server.addr],
        vec!["read", "-h", &server.addr, "--from", &first],
        vec![
            "read",
            "-h",
            &server.addr,
            "--from",
            &first,
            "--format",
            "hex",
        ],
        vec!["waldump", "-D", &data],
    ] {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills both descriptors, which are then owned here.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fds came from pipe(2) above and are owned by nobody else.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(reader);
        let o = Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(&args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
    }
}
