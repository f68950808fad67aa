//! `walden promote`: ends a standby's recovery, like `pg_ctl promote`.
//!
//! With `-D DIR` it writes `promote.signal` in the data directory and sends
//! SIGUSR1 to the server whose pid is in `walden.pid`; the server stops
//! streaming, replays everything it flushed, starts a new timeline and
//! accepts appends. With `-H HOST:PORT` the request goes over the protocol
//! (a Promote frame, docs/protocol.md). Either way the tool then waits (up
//! to `--timeout`) until the server reports itself a primary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use walden::client::Client;
use walden::protocol::Frame;
use walden::server::PROMOTE_SIGNAL;

#[derive(Args)]
#[command(disable_help_flag = true)]
pub struct PromoteArgs {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// Data directory of the standby (DIR/data, or DIR itself, holds walden.pid).
    #[arg(short = 'D', long)]
    data_dir: Option<PathBuf>,
    /// Promote the standby at HOST:PORT over the protocol instead.
    #[arg(short = 'H', long = "host", short_alias = 'h')]
    host: Option<String>,
    /// File holding the auth token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Seconds to wait for the promotion to complete.
    #[arg(short = 't', long, default_value_t = 60)]
    timeout: u64,
    /// Do not wait for the promotion to complete.
    #[arg(short = 'W', long)]
    no_wait: bool,
}

pub fn run(args: PromoteArgs) -> anyhow::Result<()> {
    let token = super::common::read_token(args.token_file.as_deref())?;
    let addr = match (&args.host, &args.data_dir) {
        (Some(_), Some(_)) => bail!("give either -D DIR or -H HOST:PORT, not both"),
        (None, None) => {
            bail!("no server given: pass -D DIR (the standby's data directory) or -H HOST:PORT")
        }
        (Some(h), None) => super::common::server_addr(Some(h), None, None)?,
        (None, Some(d)) => super::common::server_addr(None, None, Some(d))?,
    };
    let (role, timeline) = role_of(&addr, token.as_deref())
        .with_context(|| format!("could not ask the server at {addr} for its status"))?;
    if role != "standby" {
        bail!("cannot promote server; server is not in standby mode");
    }
    match &args.data_dir {
        Some(dir) => signal_promote(dir)?,
        None => {
            let mut c = Client::connect(&addr, token.as_deref())?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            let id = 1 << 40;
            c.queue(&Frame::Promote { request_id: id });
            match c.recv()? {
                Frame::PromoteResult {
                    timeline, flush, ..
                } => tracing::info!(
                    "promotion requested: leaving timeline {timeline}, flushed up to {flush}"
                ),
                other => bail!("unexpected answer to Promote: {other:?}"),
            }
        }
    }
    if args.no_wait {
        println!("server promoting");
        return Ok(());
    }
    print!("waiting for server to promote...");
    let began = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        // The address is read again: the server restarts its listener.
        let addr = match &args.data_dir {
            Some(d) => super::common::server_addr(None, None, Some(d)).unwrap_or(addr.clone()),
            None => addr.clone(),
        };
        if let Ok((role, now)) = role_of(&addr, token.as_deref()) {
            if role == "primary" && now > timeline {
                println!(" done\nserver promoted (timeline {now})");
                return Ok(());
            }
        }
        if began.elapsed() > Duration::from_secs(args.timeout) {
            println!(" stopped waiting");
            bail!(
                "server did not promote in time ({} s): see its log",
                args.timeout
            );
        }
        print!(".");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
}

/// The server's role ("primary" or "standby") and timeline, from Status.
fn role_of(addr: &str, token: Option<&[u8]>) -> anyhow::Result<(String, u32)> {
    let mut c = Client::connect(addr, token)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (_, _, _, json) = c.status()?;
    let v: serde_json::Value = serde_json::from_str(&json).context("status is not JSON")?;
    let role = v["replication"]["role"].as_str().unwrap_or("").to_string();
    let timeline = v["timeline"].as_u64().unwrap_or(1) as u32;
    Ok((role, timeline))
}

/// Writes promote.signal and sends SIGUSR1 to the pid in walden.pid.
fn signal_promote(dir: &Path) -> anyhow::Result<()> {
    let data = [dir.join("data"), dir.to_path_buf()]
        .into_iter()
        .find(|d| d.join(walden::lock::LOCK_FILE).is_file())
        .with_context(|| {
            format!(
                "PID file \"{}\" does not exist: is the server running?",
                dir.join("data").join(walden::lock::LOCK_FILE).display()
            )
        })?;
    let pid_file = data.join(walden::lock::LOCK_FILE);
    let holder = walden::lock::Holder::parse(
        &std::fs::read(&pid_file)
            .with_context(|| format!("could not read {}", pid_file.display()))?,
    );
    let pid = holder
        .pid
        .with_context(|| format!("{} names no process", pid_file.display()))?;
    let signal = data.join(PROMOTE_SIGNAL);
    std::fs::write(&signal, b"").with_context(|| {
        format!(
            "could not create promote signal file \"{}\"",
            signal.display()
        )
    })?;
    if let Err(e) = walden::io::process::send_sigusr1(pid) {
        let _ = std::fs::remove_file(&signal);
        bail!("could not send promote signal (PID: {pid}): {e}");
    }
    Ok(())
}
