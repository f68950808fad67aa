//! What the tools share: loading the configuration the way `walden serve` will.

use std::path::{Path, PathBuf};

use anyhow::Context;
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
