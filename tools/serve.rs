//! `walden serve`: runs the server until SIGTERM/SIGINT; SIGHUP reloads;
//! SIGUSR1 with `promote.signal` in the data directory promotes a standby
//! (`walden promote`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use walden::io::file::FileError;
use walden::server::{Server, ADDR_FILE, PROMOTE_SIGNAL, STARTING_FILE};

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (TOML; see systemd/walden.toml for every setting).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory: WAL in DIR/wal, pages in DIR/data, addresses in DIR/data/walden.addr.
    #[arg(short = 'D', long)]
    data_dir: Option<PathBuf>,
    /// Override a setting, as `postgres -c name=value` (repeatable).
    #[arg(short = 'c', long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .clone()
        .or_else(|| args.config.is_none().then(|| PathBuf::from("walden-data")));
    let mut cfg = super::common::load_config(args.config.as_deref(), dir.as_ref(), &args.set)?;
    // In the data directory, always: it is a directory walden owns and
    // writes (ReadWritePaths= under systemd), while its parent may be
    // read-only (/srv under ProtectSystem=strict). `walden status -D`
    // looks there.
    let addr_file = cfg.data_dir.join(ADDR_FILE);
    // walden.addr appears once the server is ready (tests and tools wait
    // for it). During recovery the protocol address is in walden.starting,
    // where `walden status` finds it to show recovery's progress.
    let starting_file = cfg.data_dir.join(STARTING_FILE);
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .context("could not install signal handlers")?;
    let wrote_starting = std::cell::Cell::new(false);
    // Called with the directories locked: a server refused by the lock
    // never gets here, so it neither removes nor writes another's files.
    let server = Server::start_with(cfg.clone(), |listen| {
        // A killed server's walden.addr must not pass for ours.
        match walden::io::file::remove_file(&addr_file) {
            Err(e) if e.source.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        wrote_starting.set(true);
        write_addrs(&starting_file, listen, None)
    });
    if wrote_starting.get() {
        let _ = std::fs::remove_file(&starting_file);
    }
    let mut server = server?;
    server.set_promote_hook(promote_hook());
    let metrics_addr = super::common::start_metrics(&server, &cfg)?;
    write_addrs(&addr_file, server.local_addr(), metrics_addr)?;
    tracing::info!(
        "walden ready: protocol on {}, metrics on {}, addresses in {}",
        server.local_addr(),
        metrics_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "(off)".into()),
        addr_file.display()
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    for sig in signals.forever() {
        match sig {
            SIGUSR1 => {
                // A standby that followed its primary to a new timeline.
                if server.restart_requested() {
                    tracing::info!("restarting the standby on its new timeline");
                    // As reloaded: the primary it follows now.
                    cfg.primary_conninfo = server.primary_conninfo();
                    server = promote(server, &cfg, &addr_file, metrics_addr)?;
                    continue;
                }
                if !cfg.data_dir.join(PROMOTE_SIGNAL).exists() {
                    continue;
                }
                if !server.is_standby() {
                    tracing::info!("ignoring promote request: this server is not in standby mode");
                    let _ = std::fs::remove_file(cfg.data_dir.join(PROMOTE_SIGNAL));
                    continue;
                }
                server = promote(server, &cfg, &addr_file, metrics_addr)?;
            }
            SIGHUP => {
                tracing::info!("received SIGHUP, reloading configuration files");
                let reloaded =
                    super::common::load_config(args.config.as_deref(), dir.as_ref(), &args.set)
                        .and_then(|cfg| server.reload(&cfg).map_err(anyhow::Error::from));
                match reloaded {
                    Ok(lines) if lines.is_empty() => tracing::info!("configuration unchanged"),
                    Ok(lines) => lines.iter().for_each(|l| tracing::info!("{l}")),
                    Err(e) => tracing::error!(
                        "configuration contains errors; no changes were applied: {}",
                        super::common::describe(&e)
                    ),
                }
            }
            _ => {
                tracing::info!(
                    "received {}: shutting down",
                    if sig == SIGTERM { "SIGTERM" } else { "SIGINT" }
                );
                break;
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // While the lock is still ours: once it is released, the next server's
    // walden.addr could already be there.
    let _ = std::fs::remove_file(&addr_file);
    server.shutdown()?;
    tracing::info!("walden stopped cleanly");
    Ok(())
}

/// Promotes a standby in this process (or restarts one whose walreceiver
/// moved its WAL to a new timeline): the standby server shuts down (its
/// walreceiver first, then a restartpoint-style write-out of its pages),
/// and a server starts again on the same directories and addresses; its
/// store finds promote.signal, replays everything flushed, and starts a
/// new timeline (see `Store::open_promoting_locked`).
fn promote(
    server: Server,
    cfg: &walden::Config,
    addr_file: &Path,
    metrics_addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Server> {
    if !server.restart_requested() {
        tracing::info!("received promote request: stopping the standby to end recovery");
    }
    let listen = server.local_addr();
    let _ = std::fs::remove_file(addr_file);
    server.shutdown()?;
    let mut next = cfg.clone();
    next.set(&format!("listen_addr={listen}"))?;
    if let Some(m) = metrics_addr {
        next.set(&format!("metrics_addr={m}"))?;
    }
    let server = Server::start_with(next.clone(), |_| Ok(()))?;
    server.set_promote_hook(promote_hook());
    let metrics = super::common::start_metrics(&server, &next)?;
    write_addrs(addr_file, server.local_addr(), metrics)?;
    Ok(server)
}

/// A Promote frame's hook: the serve loop's SIGUSR1, as `walden promote -D`
/// sends it.
fn promote_hook() -> walden::server::PromoteHook {
    std::sync::Arc::new(|| {
        let _ = signal_hook::low_level::raise(SIGUSR1);
    })
}

/// Writes the bound addresses to `path` through a temporary file and a
/// rename, so that a reader never sees half a file.
fn write_addrs(
    path: &Path,
    listen: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
) -> Result<(), FileError> {
    let text = format!(
        "listen_addr={listen}\nmetrics_addr={}\n",
        metrics.map(|a| a.to_string()).unwrap_or_default()
    );
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    walden::io::file::write_file(&tmp, text.as_bytes())?;
    walden::io::file::rename(&tmp, path)
}
