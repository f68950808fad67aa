//! `walden serve`: the WAL engine behind the wire protocol (docs/protocol.md).
//!
//! One shard thread per insert slot, pinned per `cpu_affinity`, each with its
//! own io_uring (accept, recv, send) on a duplicate of the one listening
//! socket (no SO_REUSEPORT: no other process can bind the port, see
//! `io::net`), appending through the insert slot it owns. Acknowledgements
//! at `local` and above are sent when the flusher's eventfd says the flush
//! LSN passed them: no lock and no channel on the append path.
//!
//! What it is not: a client (see `client`), or the process around it
//! (signals, sd_notify and the address file are `tools/serve.rs`).

mod basebackup;
mod shard;
mod startup;
mod walreceiver;
mod walsender;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::Config;
use crate::io::net;
use crate::io::uring::EventFd;
use crate::store::{RecoveryProgress, Store, StoreError};
use crate::wal::commit::FlushListener;
use crate::wal::Wal;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Wal(#[from] crate::wal::WalError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid value for parameter \"listen_addr\": {0:?} is not an address (host:port)")]
    BadAddress(String),
    /// The protocol port: `could not bind 127.0.0.1:7480: address already in use`.
    #[error(transparent)]
    Bind(#[from] net::ListenError),
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
    /// Another process holds the data or WAL directory's lock.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// A file the caller writes once the port is bound (`walden.starting`).
    #[error(transparent)]
    File(#[from] crate::io::file::FileError),
    /// A standby that cannot start (its primary unreachable while it is
    /// created, a bad `primary_conninfo`).
    #[error("{0}")]
    Standby(String),
    /// `could not start a shard thread: …`.
    #[error("could not {0}: {1}")]
    Thread(&'static str, std::io::Error),
}

/// The file `walden serve` writes, in the data directory, once the server
/// is ready: `listen_addr=HOST:PORT` and `metrics_addr=HOST:PORT` lines.
pub const ADDR_FILE: &str = "walden.addr";
/// The file that holds the protocol address while the server recovers
/// (same format; removed when `walden.addr` appears).
pub const STARTING_FILE: &str = "walden.starting";

/// Left in the data directory by `walden promote`: the standby that finds
/// it ends recovery and becomes a primary on a new timeline (PostgreSQL's
/// promote.signal).
pub const PROMOTE_SIGNAL: &str = "promote.signal";

/// What every shard shares.
pub(crate) struct ServerShared {
    pub store: Arc<Store>,
    pub wal: Arc<Wal>,
    /// The settings at startup; the reloadable ones live in `runtime`.
    pub cfg: Config,
    pub runtime: std::sync::RwLock<Runtime>,
    /// Bumped after every change of `runtime`: a shard keeps its own copy
    /// and takes the lock only when this moved (one atomic load per loop
    /// turn), so no lock is taken on the append path.
    pub runtime_version: std::sync::atomic::AtomicU64,
    /// Connections admitted and not yet closed, over all shards: what
    /// `max_connections` limits.
    pub connections: AtomicU32,
    pub stopping: AtomicBool,
    pub started: std::time::Instant,
    pub name: String,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Open connections per shard (for /status: how the listener spreads them).
    pub shard_connections: Vec<std::sync::atomic::AtomicUsize>,
    /// The primary's view of its standbys and the quorum positions.
    pub syncrep: Arc<crate::replication::syncrep::SyncRep>,
    /// On a standby: its primary's address (appends are refused).
    pub standby_of: Option<String>,
    /// Walsenders running (max_wal_senders limits them).
    pub wal_senders: AtomicU32,
    pub senders: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Base backup threads: joined before the shutdown checkpoint (they
    /// write WAL), where the walsenders are joined after it.
    pub backups: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Set once every shard stopped.
    pub shards_done: AtomicBool,
    /// Set once the shutdown checkpoint is durable and nothing more will be
    /// written: walsenders send the rest, wait for their standby to confirm
    /// it (bounded), and end their streams (PostgreSQL's WalSndDone).
    pub wal_final: AtomicBool,
    /// On a standby: the walreceiver's state, for /status.
    pub receiver: Option<Arc<walreceiver::ReceiverStatus>>,
    /// The replication slots (`DATA_DIR/slots`).
    pub slots: Arc<crate::replication::slots::Slots>,
    /// Starts a promotion of this standby once promote.signal is written
    /// (`walden serve` sets it: it restarts the server in its process);
    /// `None`: a Promote frame is refused.
    pub promote_hook: std::sync::Mutex<Option<PromoteHook>>,
    /// Set by a standby's walreceiver that moved its WAL to its primary's
    /// next timeline (or must cut an incomplete record): `walden serve`
    /// restarts the server in its process, as for a promotion.
    pub restart_requested: AtomicBool,
}

/// See [`ServerShared::promote_hook`].
pub type PromoteHook = Arc<dyn Fn() + Send + Sync>;

/// Settings a reload (SIGHUP) may change while the server runs. Each shard
/// works from its own copy, refreshed when `runtime_version` moves.
#[derive(Clone)]
pub(crate) struct Runtime {
    pub token: Option<Arc<[u8]>>,
    pub max_in_flight: u32,
    pub max_connections: u32,
    pub idle_timeout: std::time::Duration,
    pub slow_client_timeout: std::time::Duration,
    pub max_send_backlog: usize,
    /// The configuration these were read from (the startup one, or the one
    /// of the last reload that applied): the [`RELOADABLE`] settings in
    /// force, as /status shows them. Its other settings may not be in force.
    pub config: Arc<Config>,
}

impl Runtime {
    fn from_config(cfg: &Config) -> Result<Runtime, ServerError> {
        Ok(Runtime {
            config: Arc::new(cfg.clone()),
            token: read_token(cfg)?.map(Arc::from),
            max_in_flight: cfg.max_in_flight,
            max_connections: cfg.max_connections,
            idle_timeout: cfg.idle_timeout.duration(),
            slow_client_timeout: cfg.slow_client_timeout.duration(),
            max_send_backlog: cfg.max_send_backlog.0 as usize,
        })
    }
}

/// Settings a reload applies; every other change needs a restart.
pub const RELOADABLE: [&str; 22] = [
    "auth_token_file",
    "max_in_flight",
    "max_connections",
    "idle_timeout",
    "slow_client_timeout",
    "max_send_backlog",
    "wal_writer_delay",
    "commit_delay",
    "commit_siblings",
    "checkpoint_timeout",
    "checkpoint_completion_target",
    "checkpoint_warning",
    "bgwriter_delay",
    "bgwriter_lru_maxpages",
    "bgwriter_lru_multiplier",
    "log_checkpoints",
    "wal_compression",
    "synchronous_standby_names",
    "synchronous_commit_timeout",
    "synchronous_commit_timeout_action",
    "wal_sender_timeout",
    "primary_conninfo",
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
    receiver: std::sync::Mutex<Option<walreceiver::WalReceiver>>,
    shards: Vec<(JoinHandle<()>, Arc<EventFd>)>,
    addr: SocketAddr,
    http: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The configuration last applied (startup, then each reload).
    applied: std::sync::Mutex<Config>,
}

/// The primary's system identifier, for a standby created empty.
fn primary_system_id(
    info: &crate::replication::ConnInfo,
    token: Option<&[u8]>,
) -> Result<u64, ServerError> {
    let addr = info.address();
    let c = crate::client::Client::connect(&addr, token).map_err(|e| {
        ServerError::Standby(format!(
            "could not create the standby: its primary must be reachable to learn its system identifier: {e}"
        ))
    })?;
    if c.system_id == 0 {
        return Err(ServerError::Standby(format!(
            "the server at {addr} did not say its system identifier: is it a walden primary?"
        )));
    }
    Ok(c.system_id)
}

pub(crate) fn resolve(addr: &str) -> Result<SocketAddr, ServerError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ServerError::BadAddress(addr.to_string()))
}

impl Server {
    /// Opens the page store and the WAL (recovering them) and starts the shards.
    pub fn start(cfg: Config) -> Result<Server, ServerError> {
        Server::start_with(cfg, |_| Ok(()))
    }

    /// [`Server::start`], calling `bound(addr)` as soon as the protocol
    /// address is bound and before recovery runs: while it runs, that
    /// address answers Hello and Status (with recovery's progress) and
    /// refuses everything else with `STARTING_UP`. `bound` runs with the
    /// directories locked, so it may write files there.
    pub fn start_with(
        cfg: Config,
        bound: impl FnOnce(SocketAddr) -> Result<(), crate::io::file::FileError>,
    ) -> Result<Server, ServerError> {
        let addr = resolve(&cfg.listen_addr)?;
        let runtime = Runtime::from_config(&cfg)?;
        if runtime.token.is_none() && !is_loopback(addr.ip()) && !cfg.allow_unauthenticated {
            return Err(ServerError::Unauthenticated(addr.to_string()));
        }
        cfg.validate().map_err(crate::wal::WalError::from)?;
        // IMPORTANT: the directories are locked before anything is bound or
        // written, by the caller's `bound` or by recovery: a second server
        // on a running server's directory must change nothing.
        let locks = crate::lock::DirLocks::for_store(&cfg)?;
        // One socket for every shard (port 0 works): while it is open no
        // other process can bind the address (see `io::net`).
        let listener = net::listen(addr, 1024)?;
        let local = net::local_addr(&listener).map_err(|source| ServerError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        locks.note_listen_addr(local);
        let name = format!("walden {}", env!("CARGO_PKG_VERSION"));
        let progress = Arc::new(RecoveryProgress::default());
        let responder = startup::StartupResponder::start(
            &listener,
            startup::Context {
                progress: Arc::clone(&progress),
                token: runtime.token.clone(),
                name: name.clone(),
                segment_size: cfg.wal_segment_size.0,
                started: std::time::Instant::now(),
            },
        )
        .map_err(|e| ServerError::Thread("start the startup responder", e))?;
        bound(local)?;
        // `walden promote` leaves promote.signal in the data directory
        // (PostgreSQL's): a standby that finds it at start ends recovery
        // and starts a new timeline; it is removed once that is durable.
        let promote_signal = cfg.data_dir.join(PROMOTE_SIGNAL);
        let mut promoting = crate::io::file::exists(&promote_signal);
        if promoting && cfg.primary_conninfo.trim().is_empty() {
            tracing::info!(
                "ignoring {}: this server is not in standby mode",
                promote_signal.display()
            );
            crate::io::file::remove_file(&promote_signal)?;
            promoting = false;
        }
        if promoting {
            tracing::info!("received promote request");
        }
        let standby = if cfg.primary_conninfo.trim().is_empty() || promoting {
            None
        } else {
            // Checked by validate().
            Some(
                crate::replication::ConnInfo::parse(&cfg.primary_conninfo)
                    .map_err(|e| ServerError::Standby(format!("primary_conninfo: {e}")))?,
            )
        };
        // The slots before the store: its end-of-recovery checkpoint must
        // already keep their WAL.
        let slots = Arc::new(
            crate::replication::slots::Slots::load(&cfg.data_dir, cfg.max_slot_wal_keep_size.0)
                .map_err(ServerError::Standby)?,
        );
        let retention: crate::store::RetentionHook = {
            let slots = Arc::clone(&slots);
            Arc::new(move |insert| slots.retention(insert).map_err(|e| e.message))
        };
        let store = match &standby {
            None if promoting => {
                let store =
                    Store::open_promoting_locked(cfg.clone(), progress, locks, Some(retention))?;
                // IMPORTANT: only once the new timeline is in the control
                // file: a crash before this promotes (or finishes) again.
                crate::io::file::remove_file(&promote_signal)?;
                crate::io::file::sync_dir(&cfg.data_dir)?;
                store
            }
            None => Store::open_locked(cfg.clone(), progress, locks, Some(retention))?,
            Some(info) => {
                // A new standby takes its primary's system identifier.
                let system_id =
                    match crate::store::control::read(&cfg.data_dir).map_err(StoreError::from)? {
                        Some(_) => None,
                        None => Some(primary_system_id(info, runtime.token.as_deref())?),
                    };
                Store::open_standby_locked(cfg.clone(), progress, locks, system_id)?
            }
        };
        let store = Arc::new(store);
        responder.stop();
        let bound = local;
        let wal = Arc::clone(store.wal());
        let shards_n = wal.insert_shards();
        // Each shard accepts on its own duplicate of the one socket; the
        // kernel wakes one shard's accept per connection.
        let mut listeners = Vec::with_capacity(shards_n);
        for _ in 1..shards_n {
            listeners.push(listener.try_clone().map_err(|source| ServerError::Listen {
                addr: bound.to_string(),
                source,
            })?);
        }
        listeners.push(listener);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let st = Arc::clone(&store);
        metrics.set_store_snapshot(Arc::new(move || st.metrics_snapshot()));
        let names = crate::replication::StandbyNames::parse(&cfg.synchronous_standby_names)
            .ok()
            .flatten();
        let receiver_status = standby.as_ref().map(|info| {
            Arc::new(walreceiver::ReceiverStatus {
                primary: std::sync::Mutex::new(info.address()),
                slot_name: cfg.primary_slot_name.clone(),
                ..Default::default()
            })
        });
        let shared = Arc::new(ServerShared {
            syncrep: Arc::new(crate::replication::syncrep::SyncRep::new(names)),
            standby_of: standby.as_ref().map(|i| i.address()),
            wal_senders: AtomicU32::new(0),
            senders: std::sync::Mutex::new(Vec::new()),
            backups: std::sync::Mutex::new(Vec::new()),
            shards_done: AtomicBool::new(false),
            wal_final: AtomicBool::new(false),
            receiver: receiver_status.clone(),
            slots,
            promote_hook: std::sync::Mutex::new(None),
            restart_requested: AtomicBool::new(false),
            store,
            wal,
            cfg: cfg.clone(),
            runtime: std::sync::RwLock::new(runtime),
            runtime_version: std::sync::atomic::AtomicU64::new(0),
            connections: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            started: std::time::Instant::now(),
            name,
            metrics,
            shard_connections: (0..shards_n)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
        });
        if shared.standby_of.is_none() {
            // The control file's acknowledged_lsn: the quorum flush LSN.
            let rep = Arc::clone(&shared.syncrep);
            shared.store.set_acknowledged_source(Arc::new(move || {
                rep.synced(crate::replication::syncrep::FLUSH)
            }));
            // Told of a newer term before it went down: deposed from the start.
            let term = shared.store.term();
            if let Some(by) =
                crate::replication::fencing::deposed_at_start(term, shared.wal.timeline())
            {
                shared.syncrep.depose(by);
                tracing::error!("{}", crate::replication::fencing::deposed_log(by));
            }
        }
        let weak = Arc::downgrade(&shared);
        shared
            .metrics
            .set_replication_snapshot(Arc::new(move || match weak.upgrade() {
                Some(s) => replication_snapshot(&s),
                None => Default::default(),
            }));
        let mut shards = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let wake = Arc::new(
                EventFd::new()
                    .map_err(|e| ServerError::Thread("create an eventfd for a shard", e))?,
            );
            let listener_wake = Arc::new(FlushListener::new(Arc::clone(&wake)));
            shared.wal.add_flush_listener(Arc::clone(&listener_wake));
            shared.store.add_checkpoint_listener(Arc::clone(&wake));
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
                .map_err(|e| ServerError::Thread("start a shard thread", e))?;
            shards.push((handle, wake));
        }
        let receiver = match (&standby, receiver_status) {
            (Some(info), Some(status)) => {
                let token = shared.runtime.read().unwrap().token.clone();
                // A restart goes through the serve loop's promotion signal
                // (which sees `restart_requested`).
                let weak = Arc::downgrade(&shared);
                let restart: walreceiver::RestartHook = Arc::new(move || {
                    let Some(shared) = weak.upgrade() else {
                        return false;
                    };
                    let Some(hook) = shared.promote_hook.lock().unwrap().clone() else {
                        return false;
                    };
                    shared.restart_requested.store(true, SeqCst);
                    hook();
                    true
                });
                let r = walreceiver::WalReceiver::start(
                    Arc::clone(&shared.store),
                    &cfg,
                    info.clone(),
                    token,
                    status,
                    restart,
                )
                .map_err(|e| ServerError::Thread("start the walreceiver", e))?;
                tracing::info!(
                    "entering standby mode: streaming from the primary at {} as \"{}\"",
                    info.address(),
                    info.application_name
                );
                Some(r)
            }
            _ => None,
        };
        tracing::info!(
            "listening on {bound} with {} shard(s); WAL from {} to {} on timeline {}",
            shards.len(),
            shared.wal.start_lsn(),
            shared.wal.insert_lsn(),
            shared.wal.timeline()
        );
        if promoting {
            tracing::info!("database system is ready to accept connections");
        }
        Ok(Server {
            shared,
            receiver: std::sync::Mutex::new(receiver),
            shards,
            addr: bound,
            http: std::sync::Mutex::new(None),
            applied: std::sync::Mutex::new(cfg),
        })
    }

    /// Lets a Promote frame start a promotion: `hook` is called once the
    /// frame's promote.signal is written (see [`PROMOTE_SIGNAL`]).
    pub fn set_promote_hook(&self, hook: PromoteHook) {
        *self.shared.promote_hook.lock().unwrap() = Some(hook);
    }

    /// Whether a standby's walreceiver asked for a restart in this process
    /// (its WAL moved to its primary's next timeline): the caller shuts
    /// this server down and starts it again on the same addresses.
    pub fn restart_requested(&self) -> bool {
        self.shared.restart_requested.load(SeqCst)
    }

    /// `primary_conninfo` as last applied (at start or by a reload).
    pub fn primary_conninfo(&self) -> String {
        self.applied.lock().unwrap().primary_conninfo.clone()
    }

    /// Whether this server is a standby (streaming from a primary).
    pub fn is_standby(&self) -> bool {
        self.shared.standby_of.is_some()
    }

    /// The bound protocol address (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn wal(&self) -> &Arc<Wal> {
        &self.shared.wal
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
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
        self.shared.store.locks().note_metrics_addr(bound);
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
        let mut conninfo = None;
        for (key, value) in &new_t {
            if old_t.get(key) == Some(value) && key != "auth_token_file" {
                continue;
            }
            if key == "primary_conninfo" {
                let (line, info) = self.reload_conninfo(new)?;
                lines.push(line);
                conninfo = info;
                continue;
            }
            if RELOADABLE.contains(&key.as_str()) {
                if key == "auth_token_file" {
                    if runtime.token.as_deref() != current.token.as_deref() {
                        lines.push("the authentication token was reloaded".to_string());
                    }
                    continue;
                }
                // A string as PostgreSQL shows it: its text, not TOML's quoting.
                let value = match value {
                    toml::Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                lines.push(format!("parameter \"{key}\" changed to \"{value}\""));
            } else if let Some(line) = fixed_at_creation(key, &old, new) {
                lines.push(line);
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
        self.shared.runtime_version.fetch_add(1, SeqCst);
        if let (Some(info), Some(r)) = (conninfo, self.receiver.lock().unwrap().as_ref()) {
            r.set_conninfo(info);
        }
        self.shared.store.reload(new);
        // Remember the reloadable values as applied; the others stay as
        // they run, so a later reload reports them again.
        let mut next = old.clone();
        next.auth_token_file = new.auth_token_file.clone();
        next.max_in_flight = new.max_in_flight;
        next.max_connections = new.max_connections;
        next.idle_timeout = new.idle_timeout;
        next.slow_client_timeout = new.slow_client_timeout;
        next.max_send_backlog = new.max_send_backlog;
        next.wal_writer_delay = new.wal_writer_delay;
        next.commit_delay = new.commit_delay;
        next.commit_siblings = new.commit_siblings;
        next.checkpoint_timeout = new.checkpoint_timeout;
        next.checkpoint_completion_target = new.checkpoint_completion_target;
        next.checkpoint_warning = new.checkpoint_warning;
        next.bgwriter_delay = new.bgwriter_delay;
        next.bgwriter_lru_maxpages = new.bgwriter_lru_maxpages;
        next.bgwriter_lru_multiplier = new.bgwriter_lru_multiplier;
        next.log_checkpoints = new.log_checkpoints;
        next.wal_compression = new.wal_compression;
        next.synchronous_standby_names = new.synchronous_standby_names.clone();
        next.synchronous_commit_timeout = new.synchronous_commit_timeout;
        next.synchronous_commit_timeout_action = new.synchronous_commit_timeout_action;
        next.wal_sender_timeout = new.wal_sender_timeout;
        if self.receiver.lock().unwrap().is_some() && !new.primary_conninfo.trim().is_empty() {
            next.primary_conninfo = new.primary_conninfo.clone();
        }
        // Checked by validate() before a reload applies.
        let names = crate::replication::StandbyNames::parse(&new.synchronous_standby_names)
            .ok()
            .flatten();
        self.shared.syncrep.set_names(names);
        *applied = next;
        Ok(lines)
    }

    /// A changed `primary_conninfo` (PostgreSQL 13+): a standby's
    /// walreceiver reconnects to the new primary. Becoming a standby, or
    /// ceasing to be one, still needs a restart (or `walden promote`).
    /// Returns the log line and the connection to apply, if any.
    fn reload_conninfo(
        &self,
        new: &Config,
    ) -> Result<(String, Option<crate::replication::ConnInfo>), ServerError> {
        if self.receiver.lock().unwrap().is_none() || new.primary_conninfo.trim().is_empty() {
            let line =
                "parameter \"primary_conninfo\" cannot be changed without restarting the server";
            return Ok((line.to_string(), None));
        }
        let info = crate::replication::ConnInfo::parse(&new.primary_conninfo)
            .map_err(|e| ServerError::Standby(format!("primary_conninfo: {e}")))?;
        let line = format!(
            "primary_conninfo changed: walreceiver reconnecting to {}",
            info.address()
        );
        Ok((line, Some(info)))
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.shared.metrics
    }

    /// The JSON of `walden status` and HTTP /status.
    pub fn status_json(&self) -> String {
        status_json(&self.shared)
    }

    /// Stops accepting, answers what becomes durable, closes the connections,
    /// then takes the shutdown checkpoint and closes the WAL.
    pub fn shutdown(self) -> Result<(), ServerError> {
        tracing::info!(
            "shutting down: no new connections, flushing and answering what is in flight"
        );
        // A standby stops receiving first: nothing is put into its WAL
        // once the shutdown starts.
        if let Some(r) = self.receiver.lock().unwrap().take() {
            r.stop();
        }
        self.shared.stopping.store(true, SeqCst);
        for (_, wake) in &self.shards {
            wake.signal();
        }
        for (h, _) in self.shards {
            let _ = h.join();
        }
        // The shards answered what they could. Base backups end (they
        // write WAL: nothing may follow the shutdown checkpoint).
        self.shared.shards_done.store(true, SeqCst);
        for h in std::mem::take(&mut *self.shared.backups.lock().unwrap()) {
            let _ = h.join();
        }
        self.shared.metrics.shutdown();
        if let Some(h) = self.http.lock().unwrap().take() {
            let _ = h.join();
        }
        // The shards are gone; the store's own threads stop in shut_down.
        // Between its shutdown checkpoint and the WAL's close, the
        // walsenders send everything, the checkpoint included, and end:
        // a standby of a cleanly stopped primary has all of its WAL.
        let shared = &self.shared;
        self.shared.store.shut_down_then(|| {
            shared.wal_final.store(true, SeqCst);
            for h in std::mem::take(&mut *shared.senders.lock().unwrap()) {
                let _ = h.join();
            }
        })?;
        Ok(())
    }
}

/// The reload message for a setting fixed when the directories were
/// created: a restart would not apply it either (the WAL refuses a
/// different `wal_segment_size`, the page store keeps its checksums), so
/// "needs a restart" would send the operator into a restart that fails.
fn fixed_at_creation(key: &str, old: &Config, new: &Config) -> Option<String> {
    let size = |b: u64| match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}kB", b >> 10),
        b => format!("{b} bytes"),
    };
    let on_off = |b: bool| if b { "on" } else { "off" };
    match key {
        "wal_segment_size" => Some(format!(
            "parameter \"wal_segment_size\" cannot be changed after the WAL was created \
             (it is {}; the new value {} would be refused at the next start)",
            size(old.wal_segment_size.0),
            size(new.wal_segment_size.0)
        )),
        "data_checksums" => Some(format!(
            "parameter \"data_checksums\" cannot be changed after the page store was created \
             (it is {}; the new value {} would be ignored at the next start)",
            on_off(old.data_checksums),
            on_off(new.data_checksums)
        )),
        _ => None,
    }
}

/// Compares secrets in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

/// "primary", "standby", or "deposed primary" (a newer term deposed it).
fn role(s: &ServerShared) -> &'static str {
    if s.standby_of.is_some() {
        "standby"
    } else if s.syncrep.deposed_by().is_some() {
        "deposed primary"
    } else {
        "primary"
    }
}

pub(crate) fn status_json(s: &ServerShared) -> String {
    let wal = &s.wal;
    let cfg = &s.cfg;
    let store = &s.store;
    let c = store.control();
    let snap = store.metrics_snapshot();
    serde_json::json!({
        "server": s.name,
        "state": c.state.name(),
        "role": role(s),
        "timeline": wal.timeline(),
        "term": c.latest_term(),
        "deposed_by_term": s.syncrep.deposed_by(),
        "uptime_seconds": (s.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        "insert_lsn": wal.insert_lsn().to_string(),
        "write_lsn": wal.write_lsn().to_string(),
        "flush_lsn": wal.flush_lsn().to_string(),
        "start_lsn": wal.start_lsn().to_string(),
        "insert_shards": wal.insert_shards(),
        "cpu_affinity": cfg.cpu_affinity,
        "records_appended": wal.records_appended(),
        "connections_per_shard": s
            .shard_connections
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect::<Vec<_>>(),
        "page_store": {
            "system_identifier": c.system_identifier.to_string(),
            "checkpoint_lsn": c.checkpoint.to_string(),
            "redo_lsn": c.redo.to_string(),
            "checkpoint_in_progress": snap.checkpoint_in_progress,
            "checkpoints_completed": snap.checkpoints.iter().map(|(_, n)| n).sum::<u64>(),
            "shared_buffers_pages": snap.shared_buffers,
            "page_writes": snap.page_writes,
            "page_images": snap.page_images,
            "data_checksums": c.data_checksum_version == 1,
        },
        "replication": replication_json(s),
        "slots": slots_json(s),
        "settings": settings_json(s),
    })
    .to_string()
}

/// pg_replication_slots: one object per slot, PostgreSQL's column names.
fn slots_json(s: &ServerShared) -> serde_json::Value {
    let rows = s.slots.rows(s.wal.insert_lsn(), s.cfg.max_wal_size.0);
    serde_json::Value::Array(
        rows.into_iter()
            .map(|r| {
                serde_json::json!({
                    "slot_name": r.slot_name,
                    "slot_type": "physical",
                    "active": r.active,
                    "active_pid": r.active_pid,
                    "restart_lsn": r.restart_lsn.to_string(),
                    "wal_status": r.wal_status,
                    "safe_wal_size": r.safe_wal_size,
                })
            })
            .collect(),
    )
}

fn replication_snapshot(s: &ServerShared) -> crate::metrics::ReplicationSnapshot {
    use crate::replication::syncrep::FLUSH;
    use crate::replication::SyncState;
    use std::sync::atomic::Ordering::Relaxed;
    let rep = &s.syncrep;
    crate::metrics::ReplicationSnapshot {
        standbys: rep
            .rows()
            .into_iter()
            .map(|r| crate::metrics::StandbyMetrics {
                name: r.application_name,
                sent_lsn: r.sent.0,
                write_lsn: r.write.0,
                flush_lsn: r.flush.0,
                replay_lsn: r.apply.0,
                write_lag: r.write_lag.map(|d| d.as_secs_f64()),
                flush_lag: r.flush_lag.map(|d| d.as_secs_f64()),
                replay_lag: r.replay_lag.map(|d| d.as_secs_f64()),
                sync: matches!(r.sync_state, SyncState::Sync | SyncState::Quorum),
            })
            .collect(),
        quorum_flush_lsn: rep.synced(FLUSH).0,
        quorum_lost: rep.quorum_lost_since().is_some(),
        commits_waiting: rep.waiting.load(Relaxed),
        commits_degraded: rep.degraded.load(Relaxed),
        commits_indeterminate: rep.indeterminate.load(Relaxed),
        slots: s
            .slots
            .rows(s.wal.insert_lsn(), s.cfg.max_wal_size.0)
            .into_iter()
            .map(|r| (r.slot_name, r.restart_lsn.0, r.wal_status == "lost"))
            .collect(),
        receiver: s.receiver.as_ref().map(|r| {
            (
                r.received_lsn.load(Relaxed),
                r.flushed_lsn.load(Relaxed),
                s.store.apply_lsn().0,
            )
        }),
    }
}

/// pg_stat_replication (on a primary) or pg_stat_wal_receiver (on a
/// standby), PostgreSQL's column names; LSNs as text, lags in ms.
fn replication_json(s: &ServerShared) -> serde_json::Value {
    use crate::replication::syncrep::{APPLY, FLUSH, WRITE};
    let rep = &s.syncrep;
    let ms = |d: Option<std::time::Duration>| d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3);
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| crate::clock::format_time(d.as_secs()))
            .unwrap_or_default()
    };
    let flush = s.wal.flush_lsn();
    let standbys: Vec<serde_json::Value> = rep
        .rows()
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "pid": r.pid,
                "application_name": r.application_name,
                "client_addr": r.client_addr,
                "backend_start": secs(r.backend_start),
                "state": r.state.name(),
                "sent_lsn": r.sent.to_string(),
                "write_lsn": r.write.to_string(),
                "flush_lsn": r.flush.to_string(),
                "replay_lsn": r.apply.to_string(),
                "write_lag_ms": ms(r.write_lag),
                "flush_lag_ms": ms(r.flush_lag),
                "replay_lag_ms": ms(r.replay_lag),
                "lag_bytes": flush.0.saturating_sub(r.flush.0),
                "sync_priority": r.sync_priority,
                "sync_state": r.sync_state.name(),
                "reply_time": r.reply_time.map(secs),
            })
        })
        .collect();
    let lost = rep.quorum_lost_since();
    serde_json::json!({
        "role": role(s),
        "term": s.store.term(),
        "deposed_by_term": rep.deposed_by(),
        "timeline": s.wal.timeline(),
        "synchronous_standby_names": s.runtime.read().unwrap().config.synchronous_standby_names,
        "quorum_write_lsn": rep.synced(WRITE).to_string(),
        "quorum_flush_lsn": rep.synced(FLUSH).to_string(),
        "quorum_apply_lsn": rep.synced(APPLY).to_string(),
        "quorum_lost_since": lost.map(secs),
        "commits_waiting": rep.waiting.load(std::sync::atomic::Ordering::Relaxed),
        "commits_degraded": rep.degraded.load(std::sync::atomic::Ordering::Relaxed),
        "commits_indeterminate": rep.indeterminate.load(std::sync::atomic::Ordering::Relaxed),
        "standbys": standbys,
        // ANY k: who holds each quorum-acknowledged range (connected standbys).
        "quorum_holders": rep
            .holders_by_range()
            .into_iter()
            .map(|(from, to, names)| serde_json::json!({
                "from": from.to_string(),
                "to": to.to_string(),
                "standbys": names,
            }))
            .collect::<Vec<_>>(),
        "wal_receiver": s.receiver.as_ref().map(|r| r.json(&s.store)),
    })
}

/// Every setting in force, named as in the configuration file: the
/// [`RELOADABLE`] ones as the last applied reload set them, the others as
/// the server started. Sizes and durations in their unit form (`16MB`,
/// `30s`); microsecond settings (`commit_delay`, `idle_poll_time`) as plain
/// numbers, the only form the file takes for them (as PostgreSQL shows
/// `commit_delay`).
fn settings_json(s: &ServerShared) -> serde_json::Map<String, serde_json::Value> {
    let reloaded = Arc::clone(&s.runtime.read().unwrap().config);
    let (started, reloaded) = (settings_shown(&s.cfg), settings_shown(&reloaded));
    started
        .into_iter()
        .map(|(name, value)| {
            let value = match reloaded.get(&name) {
                Some(v) if RELOADABLE.contains(&name.as_str()) => v.clone(),
                _ => value,
            };
            (name, value)
        })
        .collect()
}

/// `cfg`'s settings for /status. The destructuring names every field, so a
/// new setting does not compile until it is given its form here.
fn settings_shown(cfg: &Config) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let Config {
        wal_dir,
        data_dir,
        wal_segment_size,
        wal_buffers,
        wal_sync_method,
        fsync,
        wal_writer_delay,
        commit_delay,
        commit_siblings,
        idle_poll_time,
        insert_shards,
        cpu_affinity,
        max_record_size,
        wal_prealloc,
        max_wal_size,
        wal_init_zero,
        wal_recycle,
        wal_full_policy,
        wal_flusher,
        wal_max_inflight,
        wal_max_write,
        wal_sync_at_depth_1,
        listen_addr,
        metrics_addr,
        auth_token_file,
        allow_unauthenticated,
        max_in_flight,
        max_connections,
        idle_timeout,
        slow_client_timeout,
        max_send_backlog,
        shared_buffers,
        full_page_writes,
        wal_compression,
        data_checksums,
        bgwriter_delay,
        bgwriter_lru_maxpages,
        bgwriter_lru_multiplier,
        checkpoint_timeout,
        checkpoint_completion_target,
        checkpoint_warning,
        min_wal_size,
        wal_keep_size,
        log_checkpoints,
        recovery_workers,
        synchronous_standby_names,
        synchronous_commit_timeout,
        synchronous_commit_timeout_action,
        max_wal_senders,
        max_slot_wal_keep_size,
        wal_sender_timeout,
        primary_conninfo,
        primary_slot_name,
        wal_receiver_status_interval,
        wal_receiver_timeout,
    } = cfg;
    let unit = |v: &dyn std::fmt::Display| Value::from(v.to_string());
    [
        ("wal_dir", Value::from(wal_dir.display().to_string())),
        ("data_dir", Value::from(data_dir.display().to_string())),
        ("wal_segment_size", unit(wal_segment_size)),
        ("wal_buffers", unit(wal_buffers)),
        ("wal_sync_method", Value::from(wal_sync_method.name())),
        ("fsync", Value::from(*fsync)),
        ("wal_writer_delay", unit(wal_writer_delay)),
        ("commit_delay", Value::from(*commit_delay)),
        ("commit_siblings", Value::from(*commit_siblings)),
        ("idle_poll_time", Value::from(*idle_poll_time)),
        ("insert_shards", Value::from(*insert_shards)),
        ("cpu_affinity", Value::from(cpu_affinity.clone())),
        ("max_record_size", unit(max_record_size)),
        ("wal_prealloc", Value::from(*wal_prealloc)),
        ("max_wal_size", unit(max_wal_size)),
        ("wal_init_zero", Value::from(*wal_init_zero)),
        ("wal_recycle", Value::from(*wal_recycle)),
        // As the file spells them (serde's snake_case names).
        ("wal_full_policy", serde_json::json!(wal_full_policy)),
        ("wal_flusher", serde_json::json!(wal_flusher)),
        ("wal_max_inflight", Value::from(*wal_max_inflight)),
        ("wal_max_write", unit(wal_max_write)),
        ("wal_sync_at_depth_1", Value::from(*wal_sync_at_depth_1)),
        ("listen_addr", Value::from(listen_addr.as_str())),
        ("metrics_addr", Value::from(metrics_addr.as_str())),
        ("auth_token_file", Value::from(auth_token_file.as_str())),
        ("allow_unauthenticated", Value::from(*allow_unauthenticated)),
        ("max_in_flight", Value::from(*max_in_flight)),
        ("max_connections", Value::from(*max_connections)),
        ("idle_timeout", unit(idle_timeout)),
        ("slow_client_timeout", unit(slow_client_timeout)),
        ("max_send_backlog", unit(max_send_backlog)),
        ("shared_buffers", unit(shared_buffers)),
        ("full_page_writes", Value::from(*full_page_writes)),
        ("wal_compression", Value::from(wal_compression.name())),
        ("data_checksums", Value::from(*data_checksums)),
        ("bgwriter_delay", unit(bgwriter_delay)),
        ("bgwriter_lru_maxpages", Value::from(*bgwriter_lru_maxpages)),
        (
            "bgwriter_lru_multiplier",
            Value::from(*bgwriter_lru_multiplier),
        ),
        ("checkpoint_timeout", unit(checkpoint_timeout)),
        (
            "checkpoint_completion_target",
            Value::from(*checkpoint_completion_target),
        ),
        ("checkpoint_warning", unit(checkpoint_warning)),
        ("min_wal_size", unit(min_wal_size)),
        ("wal_keep_size", unit(wal_keep_size)),
        ("log_checkpoints", Value::from(*log_checkpoints)),
        ("recovery_workers", Value::from(*recovery_workers)),
        // As written (not the canonical form): what the file says.
        (
            "synchronous_standby_names",
            Value::from(synchronous_standby_names.as_str()),
        ),
        (
            "synchronous_commit_timeout",
            unit(synchronous_commit_timeout),
        ),
        (
            "synchronous_commit_timeout_action",
            serde_json::json!(synchronous_commit_timeout_action),
        ),
        ("max_wal_senders", Value::from(*max_wal_senders)),
        // -1 (no limit) as a number, as the file writes it; a size in units.
        (
            "max_slot_wal_keep_size",
            match max_slot_wal_keep_size.0 {
                None => Value::from(-1),
                Some(_) => unit(max_slot_wal_keep_size),
            },
        ),
        ("wal_sender_timeout", unit(wal_sender_timeout)),
        ("primary_conninfo", Value::from(primary_conninfo.as_str())),
        ("primary_slot_name", Value::from(primary_slot_name.as_str())),
        (
            "wal_receiver_status_interval",
            unit(wal_receiver_status_interval),
        ),
        ("wal_receiver_timeout", unit(wal_receiver_timeout)),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect()
}

#[cfg(test)]
mod status_tests {
    use super::*;
    use crate::config::{Millis, Size};

    /// /status names every setting as the configuration file does, in the
    /// form the file takes.
    #[test]
    fn settings_shown_are_the_files_settings() {
        let cfg = Config {
            idle_timeout: Millis(30_000),
            wal_buffers: Size(32 << 20),
            commit_delay: 250,
            ..Config::default()
        };
        let shown = settings_shown(&cfg);
        let file = toml::Table::try_from(&cfg).unwrap();
        assert_eq!(
            shown.keys().collect::<std::collections::BTreeSet<_>>(),
            file.keys().collect::<std::collections::BTreeSet<_>>()
        );
        assert_eq!(shown["idle_timeout"], "30s");
        assert_eq!(shown["wal_buffers"], "32MB");
        assert_eq!(shown["checkpoint_timeout"], "5min");
        assert_eq!(shown["commit_delay"], 250);
        assert_eq!(shown["wal_full_policy"], "error");
        assert_eq!(shown["wal_flusher"], "uring");
        assert_eq!(shown["wal_sync_method"], "open_datasync");
        // What is shown is what the file takes back.
        let back: Config = serde_json::from_value(serde_json::Value::Object(shown)).unwrap();
        assert_eq!(
            toml::to_string(&back).unwrap(),
            toml::to_string(&cfg).unwrap()
        );
    }
}
