//! What the tools share: loading the configuration the way `walden serve` does,
//! and finding a running server (its `walden.addr` in the data directory,
//! the auth token).

use std::path::{Path, PathBuf};

use anyhow::Context;
use walden::server::{ADDR_FILE, STARTING_FILE};
use walden::Config;

/// The settings file `-D DIR` may hold besides `--config` (PostgreSQL's
/// postgresql.auto.conf); `walden basebackup -R` writes it.
pub const AUTO_CONF: &str = "walden.auto.toml";

/// Settings from `--config FILE` (or defaults), with the data directory
/// `-D DIR` (wal/ and data/ side by side), then `DIR/walden.auto.toml` if
/// it exists, then `name=value` overrides applied.
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
        // As PostgreSQL's postgresql.auto.conf: after the configuration
        // file, before -c. `walden basebackup -R` writes it.
        let auto = dir.join(AUTO_CONF);
        if auto.exists() {
            cfg.apply_file(&auto)?;
        }
    }
    for o in overrides {
        // The error names the parameter and the value.
        cfg.set(o)?;
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

/// Where a client tool finds the server, in this order (as psql takes
/// `-h`/`-p`, then PGHOST/PGPORT, then its defaults):
///
/// 1. `-h HOST[:PORT]` / `-p PORT` (a missing host is 127.0.0.1, a missing
///    port 7480);
/// 2. `-D DIR`: the `walden.addr` the server wrote in DIR/data (or DIR);
/// 3. `WALDEN_HOST` / `WALDEN_PORT`, as the flags;
/// 4. `WALDEN_DATA`: as `-D`;
/// 5. `./walden-data`'s `walden.addr` (the directory `walden serve` uses
///    when given neither `-D` nor `--config`).
///
/// A data directory without `walden.addr` is an error that says so rather
/// than a guess at 127.0.0.1:7480.
pub fn server_addr(
    host: Option<&str>,
    port: Option<u16>,
    data_dir: Option<&Path>,
) -> anyhow::Result<String> {
    if host.is_some() || port.is_some() {
        return Ok(host_port(host, port));
    }
    if let Some(dir) = data_dir {
        return addr_in(dir, "-D");
    }
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let env_port =
        match env("WALDEN_PORT") {
            Some(p) => Some(p.parse::<u16>().map_err(|_| {
                anyhow::anyhow!("invalid WALDEN_PORT {p:?}: expected a port number")
            })?),
            None => None,
        };
    let env_host = env("WALDEN_HOST");
    if env_host.is_some() || env_port.is_some() {
        return Ok(host_port(env_host.as_deref(), env_port));
    }
    if let Some(dir) = env("WALDEN_DATA") {
        return addr_in(Path::new(&dir), "WALDEN_DATA");
    }
    let default = Path::new("walden-data");
    listen_addr_in(default).ok_or_else(|| {
        anyhow::anyhow!(
            "no server given and no walden.addr in ./walden-data: pass -h HOST[:PORT] \
             or -D DIR, or set WALDEN_HOST or WALDEN_DATA"
        )
    })
}

/// `HOST:PORT` from a host (which may carry its own port) and a port.
fn host_port(host: Option<&str>, port: Option<u16>) -> String {
    let host = host.unwrap_or("127.0.0.1");
    // `HOST:PORT`, `[::1]:PORT`; a bare IPv6 address has more than one colon.
    let split = host
        .rsplit_once(':')
        .filter(|(h, p)| p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')));
    match (split, port) {
        (Some((h, _)), Some(p)) => format!("{h}:{p}"),
        (Some(_), None) => host.to_string(),
        (None, p) if host.contains(':') && !host.starts_with('[') => {
            format!("[{host}]:{}", p.unwrap_or(7480))
        }
        (None, p) => format!("{host}:{}", p.unwrap_or(7480)),
    }
}

fn addr_in(dir: &Path, given_by: &str) -> anyhow::Result<String> {
    listen_addr_in(dir).ok_or_else(|| {
        anyhow::anyhow!(
            "no walden.addr in {}: is the server running? (the directory is from {given_by}; \
             or pass -h HOST[:PORT])",
            dir.display()
        )
    })
}

/// The error and its causes, `: `-separated, as `{:#}` prints them, but
/// without a cause whose text the message already carries: walden's file
/// errors name their OS error (`could not open file "…": Permission
/// denied (os error 13)`) and also return it as their source.
pub fn describe(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

/// The auth token in `path` (surrounding whitespace trimmed), if one is given.
pub fn read_token(path: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(p) = path else { return Ok(None) };
    let t = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Some(t.trim_ascii().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// walden.auto.toml comes after --config and before -c.
    #[test]
    fn auto_conf_is_read_between_the_config_file_and_overrides() {
        let dir = std::env::temp_dir().join(format!("walden-autoconf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("walden.toml");
        std::fs::write(
            &file,
            "max_connections = 11\nmax_in_flight = 12\nidle_timeout = '7s'\n",
        )
        .unwrap();
        // Without the auto file: the config file's values.
        let cfg = load_config(Some(&file), Some(&dir), &[]).unwrap();
        assert_eq!((cfg.max_connections, cfg.max_in_flight), (11, 12));
        std::fs::write(
            dir.join(AUTO_CONF),
            "max_connections = 21\nmax_in_flight = 22\n\
             primary_conninfo = 'host=10.0.0.1 port=7481 application_name=s1'\n\
             primary_slot_name = 's1'\n",
        )
        .unwrap();
        let cfg = load_config(Some(&file), Some(&dir), &["max_in_flight=33".into()]).unwrap();
        assert_eq!(
            cfg.max_connections, 21,
            "the auto file overrides the config file"
        );
        assert_eq!(cfg.max_in_flight, 33, "-c overrides the auto file");
        assert_eq!(
            cfg.idle_timeout,
            Config::from_file(&file).unwrap().idle_timeout,
            "kept"
        );
        assert_eq!(
            cfg.primary_conninfo,
            "host=10.0.0.1 port=7481 application_name=s1"
        );
        assert_eq!(cfg.primary_slot_name, "s1");
        assert_eq!(cfg.data_dir, dir.join("data"));
        // A bad auto file is an error naming it.
        std::fs::write(dir.join(AUTO_CONF), "no_such_setting = 1\n").unwrap();
        let e = load_config(Some(&file), Some(&dir), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("walden.auto.toml"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
