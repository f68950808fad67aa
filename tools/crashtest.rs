//! `walden crashtest --cycles N`: the real server, killed with SIGKILL under
//! load over and over, and every acknowledged record checked after every
//! crash.
//!
//! Each cycle starts `walden serve` (this binary, real io_uring and O_DIRECT)
//! on the same data directory, so it first recovers from the previous crash;
//! runs `walden bench --ack-log` against it as a separate process; kills the
//! server with SIGKILL a seeded random time after the bench's first progress
//! line; lets the bench notice the dead connections and exit (it writes an
//! ack-log line only after the ack arrived, and a line cut short does not
//! count); then, with the server stopped, runs `walden verify` over the ack
//! logs of every cycle of the directory so far. So the acks of earlier cycles
//! are checked again after each later crash, recovery and restart. The
//! settings rotate over the cycles as in `tests/wal_crash.rs` (sync method,
//! flusher, zero-filled or fallocated segments), with 1MB segments so that
//! segment switches happen many times a cycle; record size, batch, pipeline
//! depth and `wal_buffers` are drawn from the seed.
//!
//! Startup and verify both read all retained WAL, so a long run on one
//! directory would slow down quadratically: once a directory's WAL passes
//! `--fresh-dir-after`, a last restart recovers its last crash and shuts
//! down cleanly, every ack of the directory is verified once more, and the
//! next cycle starts on a fresh directory.
//!
//! What it is not: a power-loss test. SIGKILL leaves the kernel's state
//! intact, so this proves that the server never acknowledges a record before
//! its write completed and that recovery finds everything written; whether a
//! sync really reached stable storage needs a fault-injecting disk.

use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use walden::config::Size;
use walden::{Durability, Lsn};

#[derive(Args)]
pub struct CrashtestArgs {
    /// Crash cycles to run.
    #[arg(long, default_value_t = 20)]
    cycles: u32,
    /// Seed for kill times and per-cycle settings (printed at start; give it to replay a run).
    #[arg(long)]
    seed: Option<u64>,
    /// Create the test's fresh directory under DIR [default: the current directory].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the test's directory (it is always kept when something failed).
    #[arg(long)]
    keep: bool,
    /// Bench connections per cycle.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Earliest kill, in ms after the bench's first progress line.
    #[arg(long, default_value_t = 50)]
    min_kill_ms: u64,
    /// Latest kill, in ms after the bench's first progress line.
    #[arg(long, default_value_t = 700)]
    max_kill_ms: u64,
    /// Start a fresh data directory once the WAL of the current one passes this (0: never).
    #[arg(long, default_value = "1GB", value_name = "SIZE")]
    fresh_dir_after: String,
    /// After a cycle that fails verification, keep its directory as the crash
    /// left it and continue on a fresh one (default: stop there).
    #[arg(long)]
    keep_going: bool,
    /// Run even if DIR is on tmpfs or ramfs (O_DIRECT and syncs mean nothing there).
    #[arg(long)]
    allow_tmpfs: bool,
    /// (testing) The level the bench asks for; `off` breaks the durability promise on purpose.
    #[arg(long, default_value = "local", hide = true)]
    level: Durability,
    /// A server setting, as `walden serve -c name=value` (repeatable; applied after the test's own).
    #[arg(short = 'c', value_name = "NAME=VALUE")]
    set: Vec<String>,
}

/// Settings that keep every WAL segment for the whole test, so that every ack
/// can be checked after every later crash. (`verify` reports acks below the
/// WAL's start as released rather than failed, should some still go.) Add
/// here whatever a checkpointer's settings need once `walden serve -c`
/// accepts them.
const KEEP_ALL_WAL: &[&str] = &["max_wal_size=1TB", "wal_keep_size=1TB"];

/// Every cycle's: loopback on a port the kernel picks (read back from
/// walden.addr), no HTTP endpoint, and 1MB segments.
const BASE_SETTINGS: &[&str] = &[
    "listen_addr=127.0.0.1:0",
    "metrics_addr=",
    "wal_segment_size=1MB",
    "max_record_size=64kB",
];

const SYNC_METHODS: [&str; 4] = ["open_datasync", "fdatasync", "open_sync", "fsync"];
/// All at least twice `max_record_size` plus a block, as `validate` requires.
const WAL_BUFFERS: [&str; 3] = ["256kB", "1MB", "4MB"];
const RECORD_SIZES: [usize; 6] = [16, 100, 400, 1500, 6000, 20000];
const BATCHES: [usize; 4] = [1, 1, 1, 4];
const PIPELINES: [usize; 3] = [1, 2, 4];

/// Fewer acks than this per cycle, on average, prove too little.
const MIN_ACKS_PER_CYCLE: u64 = 100;
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const FIRST_PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// The bench sees its connections die at once; this only bounds a hang.
const BENCH_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(args: CrashtestArgs) -> anyhow::Result<()> {
    if args.cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    if args.min_kill_ms > args.max_kill_ms {
        bail!("--min-kill-ms is larger than --max-kill-ms");
    }
    let fresh_dir_after = Size::parse(&args.fresh_dir_after)
        .map_err(anyhow::Error::msg)
        .context("--fresh-dir-after")?
        .0;
    let exe = std::env::current_exe().context("finding the walden binary")?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let base = args.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let filesystem = walden::io::probe::filesystem(&base)
        .with_context(|| format!("statfs {}", base.display()))?;
    if filesystem.is_memory() {
        if !args.allow_tmpfs {
            bail!(
                "{} is on {}: O_DIRECT and syncs mean nothing there, so a crash test proves little; \
                 use --dir on a disk (or --allow-tmpfs)",
                base.display(),
                filesystem.describe()
            );
        }
        eprintln!(
            "walden crashtest: WARNING: {} is on {}; running anyway (--allow-tmpfs)",
            base.display(),
            filesystem.describe()
        );
    }
    // Check the settings as the server will, before anything is started.
    let probe = Settings::for_cycle(0, &mut Rng::new(seed));
    super::common::load_config(None, Some(&base), &probe.server_settings(&args.set))
        .context("the server settings")?;
    let run_dir = create_run_dir(&base)?;
    println!(
        "walden crashtest: {} cycles, --seed {seed}, {} clients, level {}, kill {}-{} ms after the first progress, in {} ({})",
        args.cycles,
        args.clients,
        args.level,
        args.min_kill_ms,
        args.max_kill_ms,
        run_dir.display(),
        filesystem.describe()
    );
    let mut test = CrashTest {
        generation: Generation::create(&run_dir, 1)?,
        exe,
        seed,
        rng: Rng::new(seed),
        run_dir,
        fresh_dir_after,
        cycles: Vec::new(),
        restarts: Vec::new(),
        totals: Totals::default(),
        began: Instant::now(),
        args,
    };
    let result = test.run_all();
    test.report(result)
}

/// One cycle's server and bench settings.
struct Settings {
    sync_method: &'static str,
    pwrite: bool,
    init_zero: bool,
    sync_at_depth_1: bool,
    wal_buffers: &'static str,
    size: usize,
    batch: usize,
    pipeline: usize,
}

impl Settings {
    /// The rotation of `tests/wal_crash.rs`, on moduli that are coprime so
    /// that every combination of sync method, flusher and segment
    /// preparation comes up within 60 cycles; the rest from the seed.
    fn for_cycle(cycle: u32, rng: &mut Rng) -> Settings {
        Settings {
            sync_method: SYNC_METHODS[cycle as usize % SYNC_METHODS.len()],
            pwrite: cycle % 5 == 4,
            init_zero: cycle % 3 != 1,
            sync_at_depth_1: cycle % 7 != 2,
            wal_buffers: rng.pick(&WAL_BUFFERS),
            size: rng.pick(&RECORD_SIZES),
            batch: rng.pick(&BATCHES),
            pipeline: rng.pick(&PIPELINES),
        }
    }

    /// The `-c` settings for `walden serve`: the test's, then the caller's.
    fn server_settings(&self, extra: &[String]) -> Vec<String> {
        let mut s: Vec<String> = BASE_SETTINGS
            .iter()
            .chain(KEEP_ALL_WAL)
            .map(|s| s.to_string())
            .collect();
        s.push(format!("wal_buffers={}", self.wal_buffers));
        s.push(format!("wal_sync_method={}", self.sync_method));
        s.push(format!(
            "wal_flusher={}",
            if self.pwrite { "pwrite" } else { "uring" }
        ));
        s.push(format!("wal_init_zero={}", self.init_zero));
        s.push(format!("wal_sync_at_depth_1={}", self.sync_at_depth_1));
        s.extend(extra.iter().cloned());
        s
    }

    fn describe(&self) -> String {
        format!(
            "{}/{}{}{} buffers={} {}B x{} pipeline {}",
            self.sync_method,
            if self.pwrite { "pwrite" } else { "uring" },
            if self.init_zero { "" } else { " fallocated" },
            if self.sync_at_depth_1 {
                ""
            } else {
                " no-depth-1"
            },
            self.wal_buffers,
            self.size,
            self.batch,
            self.pipeline
        )
    }
}

/// xorshift64: the seed alone decides every draw.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// A child process that is killed (SIGKILL) and reaped if dropped while
/// still running, so no error path leaves a server behind.
struct Process {
    child: Child,
    exited: Option<ExitStatus>,
}

impl Process {
    fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<Process> {
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Process {
            child,
            exited: None,
        })
    }

    fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(s) = self.exited {
            return Ok(s);
        }
        self.child.kill().context("SIGKILL")?;
        let s = self.child.wait()?;
        self.exited = Some(s);
        Ok(s)
    }

    fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A server that is ready: its process, address, how long it took to start,
/// and the end of WAL its startup found.
struct Running {
    process: Process,
    addr: String,
    log: PathBuf,
}

/// One data directory and the ack logs of its cycles.
struct Generation {
    number: u32,
    dir: PathBuf,
    data: PathBuf,
    /// Every complete ack-log line of this directory's cycles so far.
    all_acks: PathBuf,
    acks: u64,
    /// The highest LSN acknowledged here: how far the WAL has grown.
    max_lsn: Lsn,
    /// The cycle (index into `CrashTest::cycles`) whose crash the next
    /// start recovers.
    last_cycle: Option<usize>,
    last_verify: Option<Verified>,
}

impl Generation {
    fn create(run_dir: &Path, number: u32) -> anyhow::Result<Generation> {
        let dir = run_dir.join(format!("dir{number:03}"));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Generation {
            number,
            data: dir.join("data"),
            all_acks: dir.join("acks-all.log"),
            dir,
            acks: 0,
            max_lsn: Lsn(0),
            last_cycle: None,
            last_verify: None,
        })
    }
}

/// What one `walden verify` run printed.
#[derive(Clone)]
struct Verified {
    passed: u64,
    failed: u64,
    released: u64,
    /// Its stderr: which records are missing or differ.
    detail: String,
}

struct CycleReport {
    cycle: u32,
    generation: u32,
    settings: String,
    acks: u64,
    /// From the bench's first progress line to the SIGKILL.
    kill: Duration,
    restart: Duration,
    /// Where the next start found the end of WAL after this cycle's crash.
    end_of_wal: Option<Lsn>,
    failed: u64,
}

#[derive(Default)]
struct Totals {
    /// Summed over finished directories (the last verify of each).
    passed: u64,
    failed: u64,
    released: u64,
    failed_cycles: u32,
    /// Lines cut by a kill of the bench itself (never counted).
    cut_lines: u64,
    bench_kills: u32,
}

struct CrashTest {
    args: CrashtestArgs,
    exe: PathBuf,
    seed: u64,
    rng: Rng,
    run_dir: PathBuf,
    fresh_dir_after: u64,
    generation: Generation,
    cycles: Vec<CycleReport>,
    /// Start-up times of the servers that recovered from a crash.
    restarts: Vec<Duration>,
    totals: Totals,
    began: Instant,
}

impl CrashTest {
    fn run_all(&mut self) -> anyhow::Result<()> {
        for cycle in 1..=self.args.cycles {
            let settings = Settings::for_cycle(cycle - 1, &mut self.rng);
            let verified = self.run_cycle(cycle, &settings)?;
            if verified.failed > 0 {
                self.totals.failed_cycles += 1;
                // Keep this directory exactly as the crash left it: no restart.
                self.retire_generation(&verified, false);
                if !self.args.keep_going {
                    return Ok(());
                }
                if cycle < self.args.cycles {
                    self.generation =
                        Generation::create(&self.run_dir, self.generation.number + 1)?;
                }
                continue;
            }
            let wal_start =
                walden::wal::segments::read_wal_start(&self.generation.data.join("wal"))?
                    .unwrap_or(Lsn(0));
            let grown = self.generation.max_lsn.0.saturating_sub(wal_start.0);
            let full = self.fresh_dir_after > 0 && grown >= self.fresh_dir_after;
            if full || cycle == self.args.cycles {
                self.finish_generation(&settings)?;
                if cycle < self.args.cycles {
                    self.generation =
                        Generation::create(&self.run_dir, self.generation.number + 1)?;
                }
            }
        }
        Ok(())
    }

    /// Start (recovering the last crash), load, kill, verify.
    fn run_cycle(&mut self, cycle: u32, settings: &Settings) -> anyhow::Result<Verified> {
        let name = format!("{cycle:04}");
        let after_crash = self.generation.last_cycle.is_some();
        let (mut server, restart, end_of_wal) = self.start_server(settings, &name)?;
        let ack_log = self.generation.dir.join(format!("acks-{name}.log"));
        let bench_out = self.generation.dir.join(format!("bench-{name}.out"));
        let (host, port) = server
            .addr
            .rsplit_once(':')
            .context("walden.addr: no port")?;
        let clients = self.args.clients.max(1);
        let mut cmd = Command::new(&self.exe);
        cmd.arg("bench")
            .args(["-h", host, "-p", port])
            .args([
                "-c",
                &clients.to_string(),
                "-j",
                &clients.min(2).to_string(),
            ])
            .args(["-T", "3600", "-P", "0.05"])
            .args(["--pipeline", &settings.pipeline.to_string()])
            .args(["--size", &settings.size.to_string()])
            .args(["--batch", &settings.batch.to_string()])
            .args(["--level", &self.args.level.to_string()])
            .arg("--ack-log")
            .arg(&ack_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(
                &self.generation.dir.join(format!("bench-{name}.err")),
            )?);
        let mut bench = Process::spawn(&mut cmd, "walden bench")?;
        let progress = forward_lines(&mut bench, &bench_out)?;
        if progress.recv_timeout(FIRST_PROGRESS_TIMEOUT).is_err() {
            let status = bench.try_wait()?;
            bail!(
                "cycle {cycle}: the bench {} (see {} and {})",
                match status {
                    Some(s) => format!("exited ({s}) before its first progress line"),
                    None => format!(
                        "printed no progress within {} s",
                        FIRST_PROGRESS_TIMEOUT.as_secs()
                    ),
                },
                bench_out.display(),
                server.log.display()
            );
        }
        let first_progress = Instant::now();
        let delay = self
            .rng
            .between(self.args.min_kill_ms, self.args.max_kill_ms);
        std::thread::sleep(Duration::from_millis(delay));
        if let Some(s) = server.process.try_wait()? {
            bail!(
                "cycle {cycle}: the server exited by itself ({s}) before the kill; see {}",
                server.log.display()
            );
        }
        if let Some(s) = bench.try_wait()? {
            bail!(
                "cycle {cycle}: the bench exited ({s}) before the kill; see {}",
                bench_out.display()
            );
        }
        server.process.kill()?;
        let kill = first_progress.elapsed();
        // The bench now sees its connections fail, writes what it has and exits.
        if bench.wait_timeout(BENCH_EXIT_TIMEOUT)?.is_none() {
            eprintln!(
                "walden crashtest: cycle {cycle}: the bench did not exit {} s after the server died; killing it (its unwritten acks are not counted)",
                BENCH_EXIT_TIMEOUT.as_secs()
            );
            bench.kill()?;
            self.totals.bench_kills += 1;
        }
        let (acks, cut, max_lsn) = append_acks(&ack_log, &self.generation.all_acks)?;
        self.totals.cut_lines += cut;
        self.generation.acks += acks;
        self.generation.max_lsn = self.generation.max_lsn.max(max_lsn);
        let verified = self.verify()?;
        if let Some(prev) = self.generation.last_cycle {
            self.cycles[prev].end_of_wal = end_of_wal;
        }
        self.generation.last_cycle = Some(self.cycles.len());
        self.cycles.push(CycleReport {
            cycle,
            generation: self.generation.number,
            settings: settings.describe(),
            acks,
            kill,
            restart,
            end_of_wal: None,
            failed: verified.failed,
        });
        println!(
            "cycle {cycle}/{} dir{:03} {}: {} {} ms{}, {acks} acks, killed {} ms after the first progress; verify: {} passed, {} failed{}",
            self.args.cycles,
            self.generation.number,
            settings.describe(),
            if after_crash { "restart" } else { "start" },
            restart.as_millis(),
            end_of_wal
                .map(|e| format!(" (end of WAL {e})"))
                .unwrap_or_default(),
            kill.as_millis(),
            verified.passed,
            verified.failed,
            if verified.released > 0 {
                format!(", {} released", verified.released)
            } else {
                String::new()
            },
        );
        if verified.failed > 0 {
            for line in verified.detail.lines().take(20) {
                println!("  verify: {line}");
            }
        }
        self.generation.last_verify = Some(verified.clone());
        Ok(verified)
    }

    /// The last restart of a directory: it recovers the last crash and shuts
    /// down cleanly; then every ack of the directory is verified once more.
    fn finish_generation(&mut self, settings: &Settings) -> anyhow::Result<()> {
        let (mut server, restart, end_of_wal) = self.start_server(settings, "final")?;
        if let Some(prev) = self.generation.last_cycle {
            self.cycles[prev].end_of_wal = end_of_wal;
        }
        let pid = server.process.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .context("running kill -TERM")?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        match server.process.wait_timeout(SHUTDOWN_TIMEOUT)? {
            Some(s) if s.success() => {}
            Some(s) => bail!(
                "dir{:03}: the server did not shut down cleanly ({s}); see {}",
                self.generation.number,
                server.log.display()
            ),
            None => bail!(
                "dir{:03}: the server did not shut down within {} s of SIGTERM; see {}",
                self.generation.number,
                SHUTDOWN_TIMEOUT.as_secs(),
                server.log.display()
            ),
        }
        let verified = self.verify()?;
        println!(
            "dir{:03}: final restart {} ms{}, clean shutdown; verify: {} passed, {} failed",
            self.generation.number,
            restart.as_millis(),
            end_of_wal
                .map(|e| format!(" (end of WAL {e})"))
                .unwrap_or_default(),
            verified.passed,
            verified.failed
        );
        if verified.failed > 0 {
            self.totals.failed_cycles += 1;
            for line in verified.detail.lines().take(20) {
                println!("  verify: {line}");
            }
        }
        let passed = verified.failed == 0;
        self.retire_generation(&verified, passed && !self.args.keep);
        Ok(())
    }

    fn retire_generation(&mut self, last: &Verified, remove: bool) {
        self.totals.passed += last.passed;
        self.totals.failed += last.failed;
        self.totals.released += last.released;
        self.generation.last_verify = None;
        if remove {
            let _ = fs::remove_dir_all(&self.generation.dir);
        }
    }

    /// Starts `walden serve` on the generation's directory and waits until it
    /// wrote walden.addr. Returns how long that took and the end of WAL its
    /// startup reported.
    fn start_server(
        &mut self,
        settings: &Settings,
        name: &str,
    ) -> anyhow::Result<(Running, Duration, Option<Lsn>)> {
        let data = &self.generation.data;
        let addr_file = data.join("data").join(walden::server::ADDR_FILE);
        // A killed server leaves its walden.addr behind.
        match fs::remove_file(&addr_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", addr_file.display()))
            }
            _ => {}
        }
        let log = self.generation.dir.join(format!("serve-{name}.log"));
        let mut cmd = Command::new(&self.exe);
        cmd.arg("serve").arg("-D").arg(data);
        for s in settings.server_settings(&self.args.set) {
            cmd.arg("-c").arg(s);
        }
        // The end of WAL is read from its startup lines.
        cmd.env("WALDEN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&log)?);
        let began = Instant::now();
        let mut process = Process::spawn(&mut cmd, "walden serve")?;
        let after_crash = self.generation.last_cycle.is_some();
        let addr = loop {
            if let Some(s) = process.try_wait()? {
                bail!(
                    "the server failed to {} ({s}):\n{}",
                    if after_crash { "restart" } else { "start" },
                    tail(&log, 20)
                );
            }
            if let Some(addr) = read_addr(&addr_file) {
                break addr;
            }
            if began.elapsed() > READY_TIMEOUT {
                bail!(
                    "the server was not ready within {} s:\n{}",
                    READY_TIMEOUT.as_secs(),
                    tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let took = began.elapsed();
        if after_crash {
            self.restarts.push(took);
        }
        let end_of_wal = end_of_wal_in(&log);
        Ok((Running { process, addr, log }, took, end_of_wal))
    }

    /// `walden verify` over every ack of the generation so far.
    fn verify(&self) -> anyhow::Result<Verified> {
        let out = Command::new(&self.exe)
            .arg("verify")
            .arg("--ack-log")
            .arg(&self.generation.all_acks)
            .arg("-D")
            .arg(&self.generation.data)
            .env("WALDEN_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .context("running walden verify")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = stdout.lines().last().unwrap_or("");
        let Some(mut v) = parse_verify_line(line) else {
            bail!(
                "walden verify reported no result ({}): {}{}",
                out.status,
                stdout.trim_end(),
                stderr.trim_end()
            );
        };
        if v.failed == 0 && !out.status.success() {
            bail!("walden verify failed ({}): {line}\n{stderr}", out.status);
        }
        v.detail = stderr;
        Ok(v)
    }

    /// The per-cycle table, the figures, then `N passed, M failed` as the
    /// last line. An error (and a non-zero exit) for any failure.
    fn report(mut self, result: anyhow::Result<()>) -> anyhow::Result<()> {
        // A run cut short by an error: count what was verified so far.
        if let Some(v) = self.generation.last_verify.take() {
            self.retire_generation(&v, false);
        }
        println!(
            "{:>5} {:>4} {:>7} {:>8} {:>9}  {:>10}  settings",
            "cycle", "dir", "acks", "kill_ms", "start_ms", "end_of_wal"
        );
        for c in &self.cycles {
            println!(
                "{:5} {:4} {:7} {:8} {:9}  {:>10}  {}{}",
                c.cycle,
                c.generation,
                c.acks,
                c.kill.as_millis(),
                c.restart.as_millis(),
                c.end_of_wal
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "-".into()),
                c.settings,
                if c.failed > 0 { "  FAILED" } else { "" }
            );
        }
        let t = &self.totals;
        let acks: u64 = self.cycles.iter().map(|c| c.acks).sum();
        let kills = self.cycles.iter().map(|c| c.kill);
        println!(
            "{} cycles in {:.1} s, {} directories, {acks} acks collected; kill {} after the first progress; restart after a crash {}",
            self.cycles.len(),
            self.began.elapsed().as_secs_f64(),
            self.generation.number,
            range_ms(kills),
            range_ms(self.restarts.iter().copied()),
        );
        if t.released > 0 {
            println!(
                "{} acks released before the WAL start (not checked)",
                t.released
            );
        }
        if t.cut_lines > 0 || t.bench_kills > 0 {
            println!(
                "{} ack-log line(s) cut short, not counted; the bench was killed {} time(s)",
                t.cut_lines, t.bench_kills
            );
        }
        println!("{} passed, {} failed", t.passed, t.failed);
        let failed = result.is_err() || t.failed > 0;
        if failed || self.args.keep {
            println!("walden crashtest: kept {}", self.run_dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.run_dir);
        }
        result?;
        if t.failed > 0 {
            bail!(
                "{} acknowledged record(s) failed verification in {} cycle(s) (--seed {} replays the run)",
                t.failed,
                t.failed_cycles,
                self.seed
            );
        }
        let needed = MIN_ACKS_PER_CYCLE * self.cycles.len() as u64;
        if t.passed < needed {
            bail!(
                "too few acknowledged records to prove anything: {} over {} cycles (at least {needed} wanted)",
                t.passed,
                self.cycles.len()
            );
        }
        Ok(())
    }
}

/// A fresh directory under `base`, like a tempfile directory, but kept
/// (not removed on drop): it is removed only after a run that passed.
fn create_run_dir(base: &Path) -> anyhow::Result<PathBuf> {
    for n in 0u32.. {
        let dir = base.join(format!("walden-crashtest.{}.{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    unreachable!()
}

fn log_file(path: &Path) -> anyhow::Result<fs::File> {
    fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// Copies the child's stdout to `path`, line by line, on a thread; the
/// receiver gets one message at the first `progress:` line.
fn forward_lines(process: &mut Process, path: &Path) -> anyhow::Result<mpsc::Receiver<()>> {
    let stdout = process.child.stdout.take().context("bench stdout")?;
    let mut out = log_file(path)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(out, "{line}");
            if line.starts_with("progress:") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    Ok(rx)
}

/// The listen address in a complete walden.addr (the server writes it with
/// a plain write: a half-written file has no final newline yet).
fn read_addr(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    if !text.ends_with('\n') || !text.contains("\nmetrics_addr=") {
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("listen_addr=").map(str::to_string))
}

/// The end of WAL in a server's startup lines (`end of WAL at X/Y: ...`, or
/// `creating a new WAL at X/Y` for a fresh directory).
fn end_of_wal_in(log: &Path) -> Option<Lsn> {
    let text = fs::read_to_string(log).ok()?;
    text.lines().find_map(|l| {
        let at = l
            .split_once("end of WAL at ")
            .or_else(|| l.split_once("creating a new WAL at "))?
            .1;
        at.split([':', ' ']).next()?.parse().ok()
    })
}

/// Appends the complete lines of one cycle's ack log to the directory's
/// cumulative log. A last line without its newline was cut by a kill of the
/// bench: it is not an ack anybody can rely on, so it is dropped. Returns
/// (acks, cut lines, the highest LSN).
fn append_acks(cycle_log: &Path, all: &Path) -> anyhow::Result<(u64, u64, Lsn)> {
    let mut bytes = match fs::read(cycle_log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", cycle_log.display())),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let cut = u64::from(complete < bytes.len());
    bytes.truncate(complete);
    let text = std::str::from_utf8(&bytes).context("the ack log is not text")?;
    let mut acks = 0u64;
    let mut max_lsn = Lsn(0);
    for line in text.lines() {
        acks += 1;
        if let Some(Ok(lsn)) = line.split(' ').next().map(str::parse::<Lsn>) {
            max_lsn = max_lsn.max(lsn);
        }
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(all)
        .with_context(|| format!("opening {}", all.display()))?;
    f.write_all(&bytes)
        .with_context(|| format!("writing {}", all.display()))?;
    Ok((acks, cut, max_lsn))
}

/// `N passed, M failed` optionally followed by `, K released before ...`.
fn parse_verify_line(line: &str) -> Option<Verified> {
    let mut parts = line.split(", ");
    let passed = parts.next()?.strip_suffix(" passed")?.parse().ok()?;
    let failed = parts.next()?.strip_suffix(" failed")?.parse().ok()?;
    let released = match parts.next() {
        Some(p) => p.split_once(" released")?.0.parse().ok()?,
        None => 0,
    };
    Some(Verified {
        passed,
        failed,
        released,
        detail: String::new(),
    })
}

fn range_ms(it: impl Iterator<Item = Duration>) -> String {
    let mut v: Vec<u128> = it.map(|d| d.as_millis()).collect();
    if v.is_empty() {
        return "-".into();
    }
    v.sort_unstable();
    format!("{}-{} (median {}) ms", v[0], v[v.len() - 1], v[v.len() / 2])
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_verify_lines() {
        let v = parse_verify_line("12 passed, 0 failed").unwrap();
        assert_eq!((v.passed, v.failed, v.released), (12, 0, 0));
        let v = parse_verify_line("12 passed, 3 failed, 7 released before the WAL start 0/300000")
            .unwrap();
        assert_eq!((v.passed, v.failed, v.released), (12, 3, 7));
        assert!(parse_verify_line("walden: error: x").is_none());
    }
}
