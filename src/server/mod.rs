//! `walden serve`: the WAL engine behind the wire protocol (docs/protocol.md).
//!
//! One shard thread per insert slot, pinned per `cpu_affinity`, each with its
//! own SO_REUSEPORT listener and io_uring (multishot accept, single-shot
//! recv/send), appending through the insert slot it owns. Acknowledgements
//! at `local` and above are sent when the flusher's eventfd says the flush
//! LSN passed them: no lock and no channel on the append path.
//!
//! What it is not: a client (see `client`), or the process around it
//! (signals, sd_notify and the address file are `tools/serve.rs`).

mod shard;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::Config;
use crate::io::net;
use crate::io::uring::EventFd;
use crate::wal::commit::FlushListener;
use crate::wal::Wal;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Wal(#[from] crate::wal::WalError),
    #[error("invalid value for parameter \"listen_addr\": {0:?} is not an address (host:port)")]
    BadAddress(String),
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "listen_addr {0} is not a loopback address: set auth_token_file, or allow_unauthenticated = true \
         if the network is trusted"
    )]
    Unauthenticated(String),
    #[error("could not read auth_token_file {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("auth_token_file {0} is empty")]
    EmptyToken(String),
    #[error("could not start shard thread: {0}")]
    Thread(std::io::Error),
}

/// What every shard shares.
pub(crate) struct ServerShared {
    pub wal: Arc<Wal>,
    /// The settings at startup; the reloadable ones live in `runtime`.
    pub cfg: Config,
    pub runtime: std::sync::RwLock<Runtime>,
    pub stopping: AtomicBool,
    pub started: std::time::Instant,
    pub name: String,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Settings a reload (SIGHUP) may change while the server runs. Shards read
/// them when they need them (never on the append path).
#[derive(Clone)]
pub(crate) struct Runtime {
    pub token: Option<Arc<[u8]>>,
    pub max_in_flight: u32,
    pub idle_timeout: std::time::Duration,
    pub slow_client_timeout: std::time::Duration,
    pub max_send_backlog: usize,
}

impl Runtime {
    fn from_config(cfg: &Config) -> Result<Runtime, ServerError> {
        Ok(Runtime {
            token: read_token(cfg)?.map(Arc::from),
            max_in_flight: cfg.max_in_flight,
            idle_timeout: cfg.idle_timeout.duration(),
            slow_client_timeout: cfg.slow_client_timeout.duration(),
            max_send_backlog: cfg.max_send_backlog.0 as usize,
        })
    }
}

/// Settings a reload applies; every other change needs a restart.
pub const RELOADABLE: [&str; 8] = [
    "auth_token_file",
    "max_in_flight",
    "idle_timeout",
    "slow_client_timeout",
    "max_send_backlog",
    "wal_writer_delay",
    "commit_delay",
    "commit_siblings",
];

fn read_token(cfg: &Config) -> Result<Option<Vec<u8>>, ServerError> {
    if cfg.auth_token_file.is_empty() {
        return Ok(None);
    }
    let path = &cfg.auth_token_file;
    let t = std::fs::read(path).map_err(|source| ServerError::Token {
        path: path.clone(),
        source,
    })?;
    let t = t.trim_ascii().to_vec();
    if t.is_empty() {
        return Err(ServerError::EmptyToken(path.clone()));
    }
    Ok(Some(t))
}

/// A running server. [`Server::shutdown`] stops it gracefully.
pub struct Server {
    shared: Arc<ServerShared>,
    shards: Vec<(JoinHandle<()>, Arc<EventFd>)>,
    addr: SocketAddr,
    http: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The configuration last applied (startup, then each reload).
    applied: std::sync::Mutex<Config>,
}

pub(crate) fn resolve(addr: &str) -> Result<SocketAddr, ServerError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ServerError::BadAddress(addr.to_string()))
}

impl Server {
    /// Opens the WAL (recovering the end of it) and starts the shards.
    pub fn start(cfg: Config) -> Result<Server, ServerError> {
        let addr = resolve(&cfg.listen_addr)?;
        let runtime = Runtime::from_config(&cfg)?;
        if runtime.token.is_none() && !is_loopback(addr.ip()) && !cfg.allow_unauthenticated {
            return Err(ServerError::Unauthenticated(addr.to_string()));
        }
        let wal = Arc::new(Wal::open(cfg.clone())?);
        let shards_n = wal.insert_shards();
        // The first listener picks the port (port 0 works); the others bind it too.
        let first = net::listen_reuseport(addr, 1024).map_err(|source| ServerError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        let bound = net::local_addr(&first).map_err(|source| ServerError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        let mut listeners = vec![first];
        for _ in 1..shards_n {
            listeners.push(net::listen_reuseport(bound, 1024).map_err(|source| {
                ServerError::Listen {
                    addr: bound.to_string(),
                    source,
                }
            })?);
        }
        let shared = Arc::new(ServerShared {
            wal,
            cfg: cfg.clone(),
            runtime: std::sync::RwLock::new(runtime),
            stopping: AtomicBool::new(false),
            started: std::time::Instant::now(),
            name: format!("walden {}", env!("CARGO_PKG_VERSION")),
            metrics: Arc::new(crate::metrics::Metrics::new()),
        });
        let mut shards = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let wake = Arc::new(EventFd::new().map_err(ServerError::Thread)?);
            let listener_wake = Arc::new(FlushListener::new(Arc::clone(&wake)));
            shared.wal.add_flush_listener(Arc::clone(&listener_wake));
            let core = cfg.cpu_affinity.get(i).copied();
            let sh = Arc::clone(&shared);
            let w = Arc::clone(&wake);
            let handle = std::thread::Builder::new()
                .name(format!("walden-shard{i}"))
                .spawn(move || {
                    if let Some(core) = core {
                        crate::topology::pin_current_thread(core);
                    }
                    shard::run(i, sh, listener, w, listener_wake);
                })
                .map_err(ServerError::Thread)?;
            shards.push((handle, wake));
        }
        tracing::info!(
            "listening on {bound} with {} shard(s); WAL from {} to {}",
            shards.len(),
            shared.wal.start_lsn(),
            shared.wal.insert_lsn()
        );
        Ok(Server {
            shared,
            shards,
            addr: bound,
            http: std::sync::Mutex::new(None),
            applied: std::sync::Mutex::new(cfg),
        })
    }

    /// The bound protocol address (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn wal(&self) -> &Arc<Wal> {
        &self.shared.wal
    }

    /// Starts the HTTP endpoint (/metrics, /status) on `addr` (port 0 works);
    /// returns the bound address.
    pub fn serve_http(&self, addr: &str) -> Result<SocketAddr, ServerError> {
        let a = resolve(addr)?;
        let (s1, s2) = (Arc::clone(&self.shared), Arc::clone(&self.shared));
        let (bound, handle) = self
            .shared
            .metrics
            .serve(
                a,
                Arc::new(move || status_json(&s1)),
                Arc::new(move || s2.wal.metrics_snapshot()),
            )
            .map_err(|source| ServerError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        *self.http.lock().unwrap() = Some(handle);
        Ok(bound)
    }

    /// Applies a new configuration (SIGHUP): the settings in [`RELOADABLE`]
    /// take effect at once; a change to any other is reported as needing a
    /// restart and ignored. Returns one line per changed setting, worded as
    /// PostgreSQL's. On an invalid new value nothing is applied.
    pub fn reload(&self, new: &Config) -> Result<Vec<String>, ServerError> {
        let mut applied = self.applied.lock().unwrap();
        let old = applied.clone();
        let old_t = toml::Table::try_from(&old).expect("config serializes");
        let new_t = toml::Table::try_from(new).expect("config serializes");
        let current = self.shared.runtime.read().unwrap().clone();
        let runtime = Runtime::from_config(new)?;
        let mut lines = Vec::new();
        for (key, value) in &new_t {
            if old_t.get(key) == Some(value) && key != "auth_token_file" {
                continue;
            }
            if RELOADABLE.contains(&key.as_str()) {
                if key == "auth_token_file" {
                    if runtime.token.as_deref() != current.token.as_deref() {
                        lines.push("the authentication token was reloaded".to_string());
                    }
                    continue;
                }
                lines.push(format!("parameter \"{key}\" changed to \"{value}\""));
            } else {
                lines.push(format!(
                    "parameter \"{key}\" cannot be changed without restarting the server"
                ));
            }
        }
        if runtime.token.is_none() && !is_loopback(self.addr.ip()) && !old.allow_unauthenticated {
            return Err(ServerError::Unauthenticated(self.addr.to_string()));
        }
        *self.shared.runtime.write().unwrap() = runtime;
        self.shared.wal.reload_flush_settings(new);
        // Remember the reloadable values as applied; the others stay as
        // they run, so a later reload reports them again.
        let mut next = old.clone();
        next.auth_token_file = new.auth_token_file.clone();
        next.max_in_flight = new.max_in_flight;
        next.idle_timeout = new.idle_timeout;
        next.slow_client_timeout = new.slow_client_timeout;
        next.max_send_backlog = new.max_send_backlog;
        next.wal_writer_delay = new.wal_writer_delay;
        next.commit_delay = new.commit_delay;
        next.commit_siblings = new.commit_siblings;
        *applied = next;
        Ok(lines)
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.shared.metrics
    }

    /// The JSON of `walden status` and HTTP /status.
    pub fn status_json(&self) -> String {
        status_json(&self.shared)
    }

    /// Stops accepting, answers what becomes durable, closes the connections,
    /// then flushes and closes the WAL.
    pub fn shutdown(self) -> Result<(), ServerError> {
        tracing::info!(
            "shutting down: no new connections, flushing and answering what is in flight"
        );
        self.shared.stopping.store(true, SeqCst);
        for (_, wake) in &self.shards {
            wake.signal();
        }
        for (h, _) in self.shards {
            let _ = h.join();
        }
        self.shared.metrics.shutdown();
        if let Some(h) = self.http.lock().unwrap().take() {
            let _ = h.join();
        }
        match Arc::try_unwrap(self.shared) {
            Ok(shared) => match Arc::try_unwrap(shared.wal) {
                Ok(wal) => wal.close()?,
                Err(wal) => drop(wal),
            },
            Err(shared) => drop(shared),
        }
        Ok(())
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

pub(crate) fn status_json(s: &ServerShared) -> String {
    let wal = &s.wal;
    let cfg = &s.cfg;
    format!(
        concat!(
            "{{\"server\":\"{}\",\"uptime_seconds\":{:.3},\"insert_lsn\":\"{}\",\"write_lsn\":\"{}\",",
            "\"flush_lsn\":\"{}\",\"start_lsn\":\"{}\",\"insert_shards\":{},\"cpu_affinity\":{:?},",
            "\"records_appended\":{},\"settings\":{{\"wal_sync_method\":\"{}\",\"fsync\":{},",
            "\"wal_segment_size\":{},\"wal_buffers\":{},\"max_record_size\":{},\"listen_addr\":\"{}\",",
            "\"wal_dir\":{:?}}}}}"
        ),
        s.name,
        s.started.elapsed().as_secs_f64(),
        wal.insert_lsn(),
        wal.write_lsn(),
        wal.flush_lsn(),
        wal.start_lsn(),
        wal.insert_shards(),
        cfg.cpu_affinity,
        wal.records_appended(),
        cfg.wal_sync_method.name(),
        cfg.fsync,
        cfg.wal_segment_size.0,
        cfg.wal_buffers.0,
        cfg.max_record_size.0,
        cfg.listen_addr,
        cfg.wal_dir.display().to_string(),
    )
}
