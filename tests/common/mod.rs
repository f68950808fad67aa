//! A `walden serve` process for the server tests: a temporary directory, a
//! free port on 127.0.0.1, its log in a file, killed when dropped; a
//! `Node` on a directory that outlives its process (kill -9, restart: the
//! replication and slot tests); and a byte-for-byte snapshot of a
//! directory, for tests that a refusal changed nothing.

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

/// The settings every test server gets besides its own: a port the kernel
/// picks, no metrics listener, 1 MiB segments.
pub const SERVE_DEFAULTS: [&str; 3] = [
    "listen_addr=127.0.0.1:0",
    "metrics_addr=",
    "wal_segment_size=1MB",
];

/// A `walden serve` on a directory that outlives it (kill -9, restart).
pub struct Node {
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub addr: String,
    /// `-c` settings, besides the test defaults (port 0, no metrics, 1 MiB segments).
    pub settings: Vec<String>,
    /// `--config FILE`, if any (for reloads).
    pub config: Option<PathBuf>,
    /// Environment variables for the process (test injections).
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn start(dir: &Path, settings: &[impl AsRef<str>]) -> Node {
        Node::start_with_env(dir, settings, &[])
    }

    /// The same, with `env` set in the server's environment.
    pub fn start_with_env(dir: &Path, settings: &[impl AsRef<str>], env: &[(&str, &str)]) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let mut n = Node {
            dir: dir.to_path_buf(),
            child: None,
            addr: String::new(),
            settings: settings.iter().map(|s| s.as_ref().to_string()).collect(),
            config: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        n.restart();
        n
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let addr_file = self.dir.join("data/walden.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_walden"));
        cmd.arg("serve").arg("-D").arg(&self.dir);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        for s in SERVE_DEFAULTS
            .iter()
            .map(|s| s.to_string())
            .chain(self.settings.iter().cloned())
        {
            cmd.args(["-c", &s]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = cmd
            .env("WALDEN_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Some(a) = text.lines().find_map(|l| l.strip_prefix("listen_addr=")) {
                    self.addr = a.to_string();
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("walden serve exited ({st}):\n{}", self.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no walden.addr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A clean stop (SIGTERM), waited for.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    panic!("server did not stop in 30 s:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Rewrites the configuration file and sends SIGHUP.
    pub fn reload(&self, text: &str) {
        std::fs::write(self.config.as_ref().unwrap(), text).unwrap();
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    }

    /// A connection; retried for up to 10 s while the server restarts in
    /// its process (a promotion, a standby moving to a new timeline) and
    /// its port is briefly closed or still recovering.
    pub fn client(&self) -> walden::client::Client {
        let t = Instant::now();
        loop {
            match walden::client::Client::connect(&self.addr, None) {
                Ok(c) => {
                    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    return c;
                }
                Err(_) if t.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("could not connect to {}: {e}\n{}", self.addr, self.log()),
            }
        }
    }

    /// The status JSON (retried for up to 10 s, as [`Node::client`]).
    pub fn status(&self) -> serde_json::Value {
        let t = Instant::now();
        loop {
            match self.client().status() {
                Ok((_, _, _, json)) => return serde_json::from_str(&json).unwrap(),
                Err(_) if t.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("status of {}: {e}\n{}", self.addr, self.log()),
            }
        }
    }

    pub fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The `-c` setting that makes a node a standby of `primary` named `name`.
pub fn standby_settings(primary: &Node, name: &str) -> Vec<String> {
    vec![format!(
        "primary_conninfo=host=127.0.0.1 port={} application_name={name}",
        primary.port()
    )]
}

/// Waits (up to 30 s) until `cond` holds, showing `what` and the nodes'
/// logs if not.
pub fn wait_until(what: &str, nodes: &[&Node], mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > Duration::from_secs(30) {
            let logs: Vec<String> = nodes
                .iter()
                .map(|n| format!("--- {}:\n{}", n.dir.display(), n.log()))
                .collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `walden controldata` of a node directory (DIR/data, DIR/wal).
pub fn controldata(dir: &Path) -> String {
    let o = run_bounded(&[
        "controldata",
        "-D",
        dir.join("data").to_str().unwrap(),
        "--wal-dir",
        dir.join("wal").to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "controldata: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The value of controldata's line `name:`.
pub fn control_line(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name:?} in\n{out}"))
        .trim()
        .to_string()
}

/// `walden serve` on `dir` with the test defaults, expected to exit (a
/// refused start): its output.
pub fn serve_refused(dir: &Path) -> Output {
    let mut args = vec!["serve", "-D", dir.to_str().unwrap()];
    for s in SERVE_DEFAULTS {
        args.extend(["-c", s]);
    }
    let o = run_bounded(&args);
    assert!(!o.status.success(), "the start was not refused");
    o
}

/// `walden basebackup -R` of `from` into `copy`, as standby `name`.
pub fn basebackup_standby(from: &Node, copy: &Path, name: &str) {
    let o = run_bounded(&[
        "basebackup",
        "-h",
        &from.addr,
        "-D",
        copy.to_str().unwrap(),
        "-R",
        "--application-name",
        name,
    ]);
    assert!(
        o.status.success(),
        "basebackup: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
