//! The directory lock, `walden.pid` (PostgreSQL's `postmaster.pid`): one
//! writer per data directory and per WAL directory.
//!
//! Without it a second `walden serve` on a running server's directory ran
//! "automatic recovery": it zeroed the WAL after what it took for the end,
//! removed segments and wrote its own checkpoint, and records the first
//! server had acknowledged were gone. So every engine that writes takes the
//! lock before it creates, zeroes or removes anything, and holds it for its
//! life:
//!
//! - [`crate::Wal::open`] locks the WAL directory (`wal_dir/walden.pid`):
//!   the WAL engine is embedded on its own too (`walden bench --embedded`,
//!   `walden wal-child`);
//! - [`crate::Store::open`] (and the server, which takes them before it
//!   binds its port) locks the data directory (`data_dir/walden.pid`) and
//!   the WAL directory, in that order, and hands no lock to its WAL: one
//!   file when both are the same directory, since two opens of one lock
//!   file in one process conflict (see [`crate::io::lockfile`]).
//!
//! The lock is the kernel's `flock`, released when the process ends in any
//! way, so a lock file left by a killed process is simply taken over (and
//! logged). The file's text only tells people and the next process who
//! holds it: pid, command, start time, directory, and the addresses once
//! bound. It is rewritten in place (not atomically), so a reader must
//! tolerate a partial file. A clean release empties it.
//!
//! Read-only tools (`walden waldump`, `controldata`, `verify`) take no lock.
//! On a simulated disk (tests, [`crate::io::sim`]) the lock is a no-op: a
//! test reopens an engine on the image of a power cut while the old,
//! dead engine's objects still exist in the same process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::Config;
use crate::io::file::{self, FileError};
use crate::io::lockfile::{self, Attempt, LockFile};

/// The lock file's name, in the data directory and in the WAL directory.
pub const LOCK_FILE: &str = "walden.pid";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    File(#[from] FileError),
    /// Another process (or another open in this one) holds the lock.
    #[error(
        "lock file \"{}\" is held by {holder}; is another server running on this {what}?",
        path.display()
    )]
    Held {
        path: PathBuf,
        /// `process N (walden serve started at …)`, or less if the file
        /// was being written when we read it.
        holder: String,
        /// `data directory` or `WAL directory`.
        what: &'static str,
    },
}

/// What a lock file says about its holder, as far as it was written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
    pub command: Option<String>,
    pub started: Option<String>,
    pub directory: Option<String>,
    pub listen_addr: Option<String>,
    pub metrics_addr: Option<String>,
}

impl Holder {
    /// Reads the `name=value` lines of a lock file. Anything else (a line
    /// cut short by a write in progress, an unknown name) is skipped: the
    /// file is for information, and may be caught half written.
    pub fn parse(bytes: &[u8]) -> Holder {
        let mut h = Holder::default();
        let text = String::from_utf8_lossy(bytes);
        // Only complete lines: the last one may still be being written.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..i],
            None => "",
        };
        for line in complete.lines() {
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            let value = Some(value.to_string()).filter(|v| !v.is_empty());
            match name {
                "pid" => h.pid = value.and_then(|v| v.parse().ok()),
                "command" => h.command = value,
                "started" => h.started = value,
                "directory" => h.directory = value,
                "listen_addr" => h.listen_addr = value,
                "metrics_addr" => h.metrics_addr = value,
                _ => {}
            }
        }
        h
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |name: &str, v: &Option<String>| {
            out.push_str(name);
            out.push('=');
            out.push_str(v.as_deref().unwrap_or(""));
            out.push('\n');
        };
        line("pid", &self.pid.map(|p| p.to_string()));
        line("command", &self.command);
        line("started", &self.started);
        line("directory", &self.directory);
        line("listen_addr", &self.listen_addr);
        line("metrics_addr", &self.metrics_addr);
        out
    }

    /// `process 4242 (walden serve started at 2026-12-01 18:55:48 UTC)`.
    pub fn describe(&self) -> String {
        let Some(pid) = self.pid else {
            return "another process (its lock file is empty or being written)".into();
        };
        let mut s = format!("process {pid}");
        match (&self.command, &self.started) {
            (Some(c), Some(t)) => s.push_str(&format!(" ({c} started at {t})")),
            (Some(c), None) => s.push_str(&format!(" ({c})")),
            (None, Some(t)) => s.push_str(&format!(" (started at {t})")),
            (None, None) => {}
        }
        if pid == std::process::id() {
            s.push_str(", this process");
        }
        s
    }
}

/// This process as a lock file names it: the program's file name and its
/// subcommand (`walden serve`, `walden bench`), else the program alone.
fn this_command() -> String {
    let mut args = std::env::args_os();
    let program = args
        .next()
        .map(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    match args.next().map(|a| a.to_string_lossy().into_owned()) {
        Some(sub) if !sub.starts_with('-') && !sub.is_empty() => format!("{program} {sub}"),
        _ => program,
    }
}

/// One directory's lock, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    file: LockFile,
    what: &'static str,
    holder: Mutex<Holder>,
    /// What the file said when we took it: a stale holder to report.
    previous: Holder,
    /// Our text was written (and is emptied at release).
    published: bool,
}

impl DirLock {
    /// Takes `dir/walden.pid` (`what` names `dir` in messages), without
    /// writing it yet: [`DirLock::publish`] does, once every lock the
    /// caller needs is held, so that a refused start leaves none of the
    /// files it looked at changed. `dir` must exist.
    fn take(dir: &Path, what: &'static str) -> Result<DirLock, LockError> {
        if crate::io::sim::is_simulated(dir) {
            return Ok(DirLock { held: None });
        }
        let path = dir.join(LOCK_FILE);
        match LockFile::try_lock(&path)? {
            Attempt::Locked(file) => {
                let previous = Holder::parse(&file.contents()?);
                let directory = std::fs::canonicalize(dir)
                    .unwrap_or_else(|_| dir.to_owned())
                    .display()
                    .to_string();
                let now = crate::clock::now_secs();
                Ok(DirLock {
                    held: Some(Held {
                        file,
                        what,
                        holder: Mutex::new(Holder {
                            pid: Some(std::process::id()),
                            command: Some(this_command()),
                            started: Some(crate::clock::format_time(now)),
                            directory: Some(directory),
                            listen_addr: None,
                            metrics_addr: None,
                        }),
                        previous,
                        published: false,
                    }),
                })
            }
            Attempt::Held { contents } => Err(LockError::Held {
                path,
                holder: Holder::parse(&contents).describe(),
                what,
            }),
        }
    }

    /// Writes our text into the lock file, and says so if it was left by
    /// a process that is gone (the kernel released its lock when it died).
    fn publish(&mut self) -> Result<(), LockError> {
        let Some(h) = self.held.as_mut() else {
            return Ok(());
        };
        if let Some(pid) = h.previous.pid.filter(|&p| p != std::process::id()) {
            tracing::info!(
                "lock file \"{}\" was left by process {pid}{}, which is gone: taking it over",
                h.file.path().display(),
                h.previous
                    .command
                    .as_ref()
                    .map(|c| format!(
                        " ({c}{})",
                        h.previous
                            .started
                            .as_ref()
                            .map(|t| format!(" started at {t}"))
                            .unwrap_or_default()
                    ))
                    .unwrap_or_default()
            );
        }
        let text = h.holder.lock().unwrap().render();
        h.file.replace_contents(text.as_bytes())?;
        h.published = true;
        Ok(())
    }

    /// The lock file, if one is held (none on a simulated disk).
    pub fn path(&self) -> Option<&Path> {
        self.held.as_ref().map(|h| h.file.path())
    }

    fn set_addresses(&self, listen: Option<SocketAddr>, metrics: Option<SocketAddr>) {
        let Some(h) = &self.held else { return };
        let mut holder = h.holder.lock().unwrap();
        if let Some(a) = listen {
            holder.listen_addr = Some(a.to_string());
        }
        if let Some(a) = metrics {
            holder.metrics_addr = Some(a.to_string());
        }
        if let Err(e) = h.file.replace_contents(holder.render().as_bytes()) {
            // Only the description is lost; the lock itself holds.
            tracing::warn!("{e} (the {} lock still holds)", h.what);
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if let Some(h) = &self.held {
            if h.published {
                // Empty: "nobody holds it", for people and for the next
                // start (nothing stale to report). The lock goes with the
                // descriptor, right after.
                let _ = h.file.replace_contents(b"");
            }
        }
    }
}

/// The directory locks an engine holds for its life: the WAL directory's
/// for a [`crate::Wal`] opened alone; the data directory's and the WAL
/// directory's for a [`crate::Store`] (or a server).
#[derive(Debug)]
pub struct DirLocks {
    locks: Vec<DirLock>,
}

impl DirLocks {
    /// No lock: for a WAL opened by a store, which holds the locks itself.
    pub(crate) fn none() -> DirLocks {
        DirLocks { locks: Vec::new() }
    }

    /// Locks `cfg.wal_dir` (created if missing).
    pub fn for_wal(cfg: &Config) -> Result<DirLocks, LockError> {
        file::create_dir_all(&cfg.wal_dir)?;
        let mut l = DirLocks {
            locks: vec![DirLock::take(&cfg.wal_dir, "WAL directory")?],
        };
        l.publish()?;
        Ok(l)
    }

    /// Locks `cfg.data_dir`, then `cfg.wal_dir` unless it is the same
    /// directory (both created if missing). Nothing is written until both
    /// are held: a refusal changes no file.
    pub fn for_store(cfg: &Config) -> Result<DirLocks, LockError> {
        file::create_dir_all(&cfg.data_dir)?;
        let mut locks = vec![DirLock::take(&cfg.data_dir, "data directory")?];
        file::create_dir_all(&cfg.wal_dir)?;
        if !lockfile::same_directory(&cfg.data_dir, &cfg.wal_dir) {
            locks.push(DirLock::take(&cfg.wal_dir, "WAL directory")?);
        }
        let mut l = DirLocks { locks };
        l.publish()?;
        Ok(l)
    }

    fn publish(&mut self) -> Result<(), LockError> {
        for l in &mut self.locks {
            l.publish()?;
        }
        Ok(())
    }

    /// The lock files held (none on a simulated disk).
    pub fn paths(&self) -> Vec<&Path> {
        self.locks.iter().filter_map(|l| l.path()).collect()
    }

    /// Adds the protocol address to every lock file, once bound.
    pub fn note_listen_addr(&self, addr: SocketAddr) {
        self.locks
            .iter()
            .for_each(|l| l.set_addresses(Some(addr), None));
    }

    /// Adds the HTTP (metrics) address to every lock file, once bound.
    pub fn note_metrics_addr(&self, addr: SocketAddr) {
        self.locks
            .iter()
            .for_each(|l| l.set_addresses(None, Some(addr)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> Config {
        Config::with_data_directory(dir)
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_description() {
        let d = tempfile::tempdir().unwrap();
        let first = DirLocks::for_store(&cfg(d.path())).unwrap();
        assert_eq!(first.paths().len(), 2, "data and WAL directories");
        first.note_listen_addr("127.0.0.1:7480".parse().unwrap());
        let text = std::fs::read_to_string(d.path().join("data/walden.pid")).unwrap();
        let h = Holder::parse(text.as_bytes());
        assert_eq!(h.pid, Some(std::process::id()));
        assert_eq!(h.listen_addr.as_deref(), Some("127.0.0.1:7480"));
        assert!(h.started.as_deref().unwrap().ends_with(" UTC"), "{text}");

        let e = DirLocks::for_store(&cfg(d.path())).unwrap_err().to_string();
        let want = format!(
            "lock file \"{}\" is held by process {} (",
            d.path().join("data/walden.pid").display(),
            std::process::id()
        );
        assert!(e.starts_with(&want), "{e}");
        assert!(
            e.ends_with("; is another server running on this data directory?"),
            "{e}"
        );
        // The WAL engine alone is refused by the WAL directory's lock.
        let e = DirLocks::for_wal(&cfg(d.path())).unwrap_err().to_string();
        assert!(e.contains("wal/walden.pid\" is held by process"), "{e}");
        assert!(e.ends_with("on this WAL directory?"), "{e}");

        // Released (and emptied) on drop.
        drop(first);
        assert_eq!(
            std::fs::read(d.path().join("data/walden.pid")).unwrap(),
            b""
        );
        DirLocks::for_store(&cfg(d.path())).unwrap();
    }

    #[test]
    fn one_lock_when_the_wal_is_the_data_directory() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        c.data_dir = d.path().join("x");
        c.wal_dir = d.path().join("x/../x/.");
        let l = DirLocks::for_store(&c).unwrap();
        assert_eq!(l.paths().len(), 1);
    }

    #[test]
    fn a_partial_lock_file_is_described_without_a_pid() {
        assert_eq!(Holder::parse(b"pid=12"), Holder::default());
        assert_eq!(
            Holder::parse(b"pid=12\ncommand=walden se").describe(),
            "process 12"
        );
        assert_eq!(
            Holder::parse(b"").describe(),
            "another process (its lock file is empty or being written)"
        );
    }
}
