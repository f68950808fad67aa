//! What the tools share: loading the configuration the way `walden serve` does,
//! and finding a running server (its `walden.addr` in the data directory,
//! the auth token).

use std::path::{Path, PathBuf};

use anyhow::Context;
use walden::server::{ADDR_FILE, STARTING_FILE};
use walden::Config;

/// Settings from `--config FILE` (or defaults), with the data directory
/// `-D DIR` (wal/ and data/ side by side) and `name=value` overrides applied.
pub fn load_config(
    config: Option<&Path>,
    data_dir: Option<&PathBuf>,
    overrides: &[String],
) -> anyhow::Result<Config> {
    let mut cfg = match config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = data_dir {
        cfg.wal_dir = dir.join("wal");
        cfg.data_dir = dir.join("data");
    }
    for o in overrides {
        cfg.set(o).with_context(|| format!("in setting {o:?}"))?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Starts the HTTP endpoint when `metrics_addr` is set; returns its address.
pub fn start_metrics(
    server: &walden::server::Server,
    cfg: &Config,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if cfg.metrics_addr.is_empty() {
        return Ok(None);
    }
    Ok(Some(server.serve_http(&cfg.metrics_addr)?))
}

/// The protocol address a running server wrote to `walden.addr` (once
/// ready), else to `walden.starting` (while it recovers), in its data
/// directory: `DIR/data` for `-D DIR` (the layout `walden serve -D DIR`
/// makes), else `DIR` itself (a data directory given directly, as with
/// `--config`).
pub fn listen_addr_in(dir: &Path) -> Option<String> {
    let data = dir.join("data");
    let found = [data.as_path(), dir].into_iter().find_map(|d| {
        [ADDR_FILE, STARTING_FILE].iter().find_map(|f| {
            std::fs::read_to_string(d.join(f))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("listen_addr=").map(str::to_string))
        })
    });
    found
}

/// The auth token in `path` (surrounding whitespace trimmed), if one is given.
pub fn read_token(path: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(p) = path else { return Ok(None) };
    let t = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Some(t.trim_ascii().to_vec()))
}
