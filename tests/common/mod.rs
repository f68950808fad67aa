//! A `walden serve` process for the server tests: a temporary directory, a
//! free port on 127.0.0.1, its log in a file, killed when dropped; and a
//! byte-for-byte snapshot of a directory, for tests that a refusal changed
//! nothing.

#![allow(dead_code)] // each test file uses its own part of this

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
    log: PathBuf,
}

impl ServerProcess {
    /// `walden serve -D DIR` with 1 MiB segments, metrics off, and `settings`
    /// (`name=value`, as `-c`); waits until it listens.
    pub fn start(settings: &[&str]) -> ServerProcess {
        ServerProcess::start_with_config(None, settings)
    }

    /// The same with `--config FILE` as well.
    pub fn start_with_config(config: Option<&Path>, settings: &[&str]) -> ServerProcess {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_walden"));
        cmd.arg("serve");
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("-D").arg(dir.path().join("data"));
        for s in [
            "listen_addr=127.0.0.1:0",
            "metrics_addr=",
            "wal_segment_size=1MB",
        ]
        .iter()
        .chain(settings)
        {
            cmd.args(["-c", s]);
        }
        let child = cmd
            .env("WALDEN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = ServerProcess {
            child,
            addr: String::new(),
            log,
            dir,
        };
        server.addr = server.wait_for_addr();
        server
    }

    fn wait_for_addr(&mut self) -> String {
        // `-D DIR` puts the pages, the lock and walden.addr in DIR/data.
        let file = self.dir.path().join("data/data/walden.addr");
        let t = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some(a) = text.lines().find_map(|l| l.strip_prefix("listen_addr=")) {
                    return a.to_string();
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("walden serve exited ({status}):\n{}", self.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "walden serve did not write walden.addr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGHUP and waits (up to 10 s) until the log shows `line`.
    pub fn reload_until_logged(&self, line: &str) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let t = Instant::now();
        while !self.log().contains(line) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no {line:?} in the log after SIGHUP:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file under `dir` with its bytes (and every directory, as empty).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut all = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                all.insert(p.clone(), None);
                todo.push(p);
            } else {
                all.insert(p.clone(), Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    all
}

pub fn assert_unchanged(
    before: &BTreeMap<PathBuf, Option<Vec<u8>>>,
    after: &BTreeMap<PathBuf, Option<Vec<u8>>>,
    what: &str,
) {
    let differ: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| {
            format!(
                "{} ({})",
                k.display(),
                match (before.get(k), after.get(k)) {
                    (None, _) => "appeared",
                    (_, None) => "disappeared",
                    _ => "changed",
                }
            )
        })
        .collect();
    assert!(differ.is_empty(), "{what} changed: {differ:?}");
}

/// Runs `walden ARGS` to its end, at most 30 s (a process that should have
/// refused and did not runs on: it is killed and the test fails).
pub fn run_bounded(args: &[&str]) -> Output {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_walden"))
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
