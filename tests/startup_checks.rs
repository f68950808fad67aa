//! What a start refuses: with real processes, a second server on the same
//! port.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use walden::Durability;

const BIN: &str = env!("CARGO_BIN_EXE_walden");

// ---- real processes ----

fn run_bounded(args: &[&str]) -> Output {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(BIN)
        .args(args)
        .env("WALDEN_LOG", "info")
        .stdin(Stdio::null())
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
            panic!(
                "walden {} was still running after 30 s: {}",
                args.join(" "),
                std::fs::read_to_string(err.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(out.path()).unwrap(),
        stderr: std::fs::read(err.path()).unwrap(),
    }
}

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
    let addr = wait_for_addr(&a.join("walden.addr"), &mut first, &log);
    // Another data directory, the same address.
    let listen = format!("listen_addr={addr}");
    let second =
        run_bounded(&[&["serve", "-D", b.to_str().unwrap(), "-c", &listen], QUIET].concat());
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
