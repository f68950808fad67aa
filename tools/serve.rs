//! `walden serve`: runs the server until SIGTERM/SIGINT; SIGHUP reloads.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use walden::server::Server;

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (TOML; see systemd/walden.toml for every setting).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory: WAL in DIR/wal, pages in DIR/data, addresses in DIR/walden.addr.
    #[arg(short = 'D', long)]
    data_dir: Option<PathBuf>,
    /// Override a setting, as `postgres -c name=value` (repeatable).
    #[arg(short = 'c', value_name = "NAME=VALUE")]
    set: Vec<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .clone()
        .or_else(|| args.config.is_none().then(|| PathBuf::from("walden-data")));
    let cfg = super::common::load_config(args.config.as_deref(), dir.as_ref(), &args.set)?;
    // Beside wal/ and data/: DIR/walden.addr with -D DIR, and the data
    // directory's parent with --config (/var/lib/walden/walden.addr), so
    // `walden status -D DIR` finds it either way.
    let addr_file = dir
        .clone()
        .or_else(|| {
            cfg.data_dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| p.to_path_buf())
        })
        .unwrap_or_else(|| cfg.data_dir.clone())
        .join("walden.addr");
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    if let Some(parent) = addr_file.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // walden.addr appears once the server is ready (tests and tools wait
    // for it). During recovery the protocol address is in walden.starting,
    // where `walden status` finds it to show recovery's progress.
    let starting_file = addr_file.with_file_name("walden.starting");
    let write_addrs = |path: &std::path::Path,
                       listen: std::net::SocketAddr,
                       metrics: Option<std::net::SocketAddr>| {
        let text = format!(
            "listen_addr={listen}\nmetrics_addr={}\n",
            metrics.map(|a| a.to_string()).unwrap_or_default()
        );
        // Atomically: a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, path))
    };
    let _ = std::fs::remove_file(&addr_file);
    let server = Server::start_with(cfg.clone(), |listen| {
        write_addrs(&starting_file, listen, None)
    });
    let _ = std::fs::remove_file(&starting_file);
    let server = server?;
    let metrics_addr = super::common::start_metrics(&server, &cfg)?;
    write_addrs(&addr_file, server.local_addr(), metrics_addr)
        .with_context(|| format!("writing {}", addr_file.display()))?;
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
            SIGHUP => {
                tracing::info!("received SIGHUP, reloading configuration files");
                let reloaded =
                    super::common::load_config(args.config.as_deref(), dir.as_ref(), &args.set)
                        .and_then(|cfg| server.reload(&cfg).map_err(anyhow::Error::from));
                match reloaded {
                    Ok(lines) if lines.is_empty() => tracing::info!("configuration unchanged"),
                    Ok(lines) => lines.iter().for_each(|l| tracing::info!("{l}")),
                    Err(e) => tracing::error!(
                        "configuration contains errors; no changes were applied: {e:#}"
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
    server.shutdown()?;
    let _ = std::fs::remove_file(&addr_file);
    tracing::info!("walden stopped cleanly");
    Ok(())
}
