//! Settings. Names follow PostgreSQL wherever the meaning is the same; the
//! file format is TOML. Sizes take PostgreSQL's units (`"16MB"`, `"8kB"`) or
//! a plain number of bytes; durations take `"200ms"`, `"5s"`, `"5min"` or a
//! plain number in the setting's base unit (as PostgreSQL does).

use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How the flusher makes WAL writes durable (`wal_sync_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMethod {
    /// Segments opened with O_DSYNC: each write is durable when it completes.
    OpenDatasync,
    /// Plain writes, then one fdatasync per batch (linked after the writes).
    Fdatasync,
    /// Segments opened with O_SYNC.
    OpenSync,
    /// Plain writes, then one fsync per batch.
    Fsync,
}

impl SyncMethod {
    pub fn name(self) -> &'static str {
        match self {
            SyncMethod::OpenDatasync => "open_datasync",
            SyncMethod::Fdatasync => "fdatasync",
            SyncMethod::OpenSync => "open_sync",
            SyncMethod::Fsync => "fsync",
        }
    }

    /// True when the open flags make every write durable by itself.
    pub fn syncs_on_write(self) -> bool {
        matches!(self, SyncMethod::OpenDatasync | SyncMethod::OpenSync)
    }

    pub fn parse(s: &str) -> Option<SyncMethod> {
        Some(match s {
            "open_datasync" => SyncMethod::OpenDatasync,
            "fdatasync" => SyncMethod::Fdatasync,
            "open_sync" => SyncMethod::OpenSync,
            "fsync" => SyncMethod::Fsync,
            _ => return None,
        })
    }
}

/// Which flusher writes the WAL. `uring` is the real one; `pwrite` (plain
/// pwrite + fdatasync, one batch at a time) exists for benchmark comparisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlusherKind {
    Uring,
    Pwrite,
}

/// How full-page images are compressed in the WAL (`wal_compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalCompression {
    Off,
    Lz4,
}

impl WalCompression {
    pub fn name(self) -> &'static str {
        match self {
            WalCompression::Off => "off",
            WalCompression::Lz4 => "lz4",
        }
    }
}

/// What an append does when the WAL device is full (`wal_full_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalFullPolicy {
    /// Refuse it with a "WAL device full" error (the client retries later).
    Error,
    /// Wait until space returns.
    Wait,
}

/// A size in bytes, written as a number or with PostgreSQL's units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!(
                "invalid size {s:?}: expected a number with an optional unit (B, kB, MB, GB, TB)"
            )
        })?;
        let mul = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" | "k" | "K" => 1 << 10,
            "MB" | "M" => 1 << 20,
            "GB" | "G" => 1 << 30,
            "TB" | "T" => 1 << 40,
            other => {
                return Err(format!(
                    "invalid unit {other:?} in size {s:?}: valid units are B, kB, MB, GB, TB"
                ))
            }
        };
        n.checked_mul(mul)
            .map(Size)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => Size::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A size that may be `-1`, "no limit" (PostgreSQL's
/// `max_slot_wal_keep_size`): a number, a size with units, or -1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeLimit(pub Option<u64>);

impl SizeLimit {
    pub const UNLIMITED: SizeLimit = SizeLimit(None);
}

impl Serialize for SizeLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            None => s.serialize_i64(-1),
            Some(n) => s.serialize_u64(n),
        }
    }
}

impl<'de> Deserialize<'de> for SizeLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        let bad = || serde::de::Error::custom("expected -1 (no limit) or a size such as 10GB");
        match Raw::deserialize(d)? {
            Raw::N(-1) => Ok(SizeLimit(None)),
            Raw::N(n) if n >= 0 => Ok(SizeLimit(Some(n as u64))),
            Raw::N(_) => Err(bad()),
            Raw::S(s) if s.trim() == "-1" => Ok(SizeLimit(None)),
            Raw::S(s) => Size::parse(&s)
                .map(|n| SizeLimit(Some(n.0)))
                .map_err(serde::de::Error::custom),
        }
    }
}

impl std::fmt::Display for SizeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("-1"),
            Some(n) => Size(n).fmt(f),
        }
    }
}

/// A duration in milliseconds when written as a bare number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Millis(pub u64);

impl Millis {
    pub fn duration(self) -> Duration {
        Duration::from_millis(self.0)
    }

    pub fn parse(s: &str) -> Result<Millis, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!(
                "invalid duration {s:?}: expected a number with an optional unit (ms, s, min, h, d)"
            )
        })?;
        let ms = match unit.trim() {
            "" | "ms" => n,
            "s" => n * 1000,
            "min" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            other => {
                return Err(format!(
                    "invalid unit {other:?} in duration {s:?}: valid units are ms, s, min, h, d"
                ))
            }
        };
        Ok(Millis(ms))
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Millis(n)),
            Raw::S(s) => Millis::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Every setting, with its default. docs and `systemd/walden.toml` list them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory of WAL segment files (meant for its own device).
    pub wal_dir: PathBuf,
    /// Directory of the page store (meant for a second device).
    pub data_dir: PathBuf,
    /// Size of one WAL segment file: a power of two from 1MB to 1GB.
    pub wal_segment_size: Size,
    /// Size of the in-memory WAL ring (`wal_buffers`), a multiple of 4kB.
    pub wal_buffers: Size,
    /// How WAL writes are made durable.
    pub wal_sync_method: SyncMethod,
    /// `false` skips every sync: for benchmarks and tests only, never for data you keep.
    pub fsync: bool,
    /// The longest an `off` record waits before the flusher writes it.
    pub wal_writer_delay: Millis,
    /// Microseconds the flusher waits before a sync when at least
    /// `commit_siblings` other commits are waiting, to let more join the group.
    pub commit_delay: u64,
    pub commit_siblings: u32,
    /// Microseconds a shard or the flusher keeps polling for its next event
    /// before it blocks, after recent activity (0: block at once).
    pub idle_poll_time: u64,
    /// Number of insert slots (shards); 0 means one per online CPU.
    pub insert_shards: u32,
    /// CPUs the shards (and the flusher, last) are pinned to; empty: no pinning.
    pub cpu_affinity: Vec<usize>,
    /// Largest payload one record may carry; at most half of `wal_buffers`.
    pub max_record_size: Size,
    /// Segments kept ready ahead of the insert position.
    pub wal_prealloc: u32,
    /// Soft limit of the WAL's size. Released segments are recycled (renamed
    /// ahead) while the recycled ones fit in it; the rest are removed. (The
    /// checkpointer will also start a checkpoint when the WAL grows past it.)
    pub max_wal_size: Size,
    /// Zero-fill new segments (fast overwrites later) rather than fallocate.
    pub wal_init_zero: bool,
    /// Reuse released segments by renaming them rather than deleting them.
    pub wal_recycle: bool,
    /// When no new segment can be created (the WAL device is full): `error`
    /// refuses appends that would need it, `wait` makes them wait for space.
    pub wal_full_policy: WalFullPolicy,
    /// Which flusher to run (`uring`, or `pwrite` for comparisons).
    pub wal_flusher: FlusherKind,
    /// Most write batches the io_uring flusher keeps in flight at once.
    pub wal_max_inflight: u32,
    /// Largest single write the flusher submits, in bytes.
    pub wal_max_write: Size,
    /// When a flush is one write and nothing is in flight, the io_uring
    /// flusher writes (and syncs) with plain syscalls: cheaper at depth 1.
    pub wal_sync_at_depth_1: bool,
    /// Address the protocol listens on (one socket, shared by the shards; no SO_REUSEPORT).
    pub listen_addr: String,
    /// Address of the HTTP endpoint (/metrics, /status); empty: off.
    pub metrics_addr: String,
    /// File holding the token clients must present in Hello; empty: none.
    pub auth_token_file: String,
    /// Allow a non-loopback listen_addr without auth_token_file.
    pub allow_unauthenticated: bool,
    /// Requests a connection may have waiting for their acknowledgement;
    /// past it the server stops reading from that connection until acks drain.
    pub max_in_flight: u32,
    /// Client connections open at once, over all shards; one more is
    /// answered TOO_MANY_CONNECTIONS and closed.
    pub max_connections: u32,
    /// Close a connection idle (nothing in flight, no follow) this long; 0: never.
    pub idle_timeout: Millis,
    /// Close a connection whose unsent backlog stays above max_send_backlog this long.
    pub slow_client_timeout: Millis,
    /// Unsent bytes a connection may accumulate before it counts as slow
    /// (a follower is not fed past it).
    pub max_send_backlog: Size,

    // --- the page store (data_dir) ---
    /// Memory for cached pages (8kB frames).
    pub shared_buffers: Size,
    /// Log a full-page image on the first change to a page after each
    /// checkpoint's redo point, so that a page torn by a crash is repaired.
    pub full_page_writes: bool,
    /// Compress full-page images: `off` or `lz4`.
    pub wal_compression: WalCompression,
    /// Checksum every page written (crc32c), verified on every read. Fixed
    /// when the page store is created.
    pub data_checksums: bool,
    /// How long the background writer sleeps between rounds.
    pub bgwriter_delay: Millis,
    /// Most pages the background writer writes per round (0: off).
    pub bgwriter_lru_maxpages: u32,
    /// Pages to clean ahead per round, as a multiple of recent allocations.
    pub bgwriter_lru_multiplier: f64,
    /// Longest time between automatic checkpoints.
    pub checkpoint_timeout: Millis,
    /// Fraction of the checkpoint interval over which its writes are spread.
    pub checkpoint_completion_target: f64,
    /// Warn when checkpoints caused by WAL volume come closer together than this; 0: never.
    pub checkpoint_warning: Millis,
    /// Released segments are recycled (rather than removed) while the WAL is below this.
    pub min_wal_size: Size,
    /// WAL kept behind the insert position even when no checkpoint needs it,
    /// so that clients can read back and follow their own records after
    /// checkpoints and restarts (and, later, standbys catch up); 0: only what
    /// recovery needs. Default 1GB (docs/operations.md says why). WAL is
    /// cut only at a checkpoint's redo point, so a little more is kept.
    pub wal_keep_size: Size,
    /// Log each checkpoint's start and completion with its statistics.
    pub log_checkpoints: bool,
    /// Threads that apply page records during crash recovery, each owning a
    /// share of the pages (0: one per CPU this process may run on, at most 8).
    pub recovery_workers: u32,

    // --- replication ---
    /// Which standbys `remote_write`/`on`/`remote_apply` commits wait for,
    /// in PostgreSQL's grammar (`FIRST 1 (s1, s2)`, `ANY 1 (*)`, `s1, s2`);
    /// empty: none. Validated and reloadable; no effect until replication
    /// lands (issue #14).
    pub synchronous_standby_names: String,
    /// How long a commit waits for the standbys of
    /// `synchronous_standby_names` before `synchronous_commit_timeout_action`
    /// applies; 0: wait for ever (PostgreSQL's behaviour).
    pub synchronous_commit_timeout: Millis,
    /// What a commit whose wait passed `synchronous_commit_timeout` gets:
    /// `indeterminate` (an INDETERMINATE answer: written locally, not
    /// confirmed at its level) or `degrade` (acknowledged as `local`,
    /// logged and counted).
    pub synchronous_commit_timeout_action: TimeoutAction,
    /// Standbys (walsenders) served at once; more are refused.
    pub max_wal_senders: u32,
    /// The most WAL a replication slot may hold behind the insert
    /// position; a slot further behind is invalidated (`lost`) at the next
    /// checkpoint and holds nothing more. -1: no limit (PostgreSQL's
    /// default).
    pub max_slot_wal_keep_size: SizeLimit,
    /// A walsender whose standby said nothing for this long closes the
    /// connection (0: never).
    pub wal_sender_timeout: Millis,
    /// Makes this server a standby: how to reach its primary, as
    /// libpq's conninfo (`host=… port=… application_name=s1`). Empty: a
    /// primary. Reloadable on a standby (its walreceiver reconnects to the
    /// new address, PostgreSQL 13+); becoming or ceasing to be a standby
    /// needs a restart (or `walden promote`).
    pub primary_conninfo: String,
    /// The replication slot the standby streams from (empty: none).
    pub primary_slot_name: String,
    /// How often an idle standby reports its positions (it reports after
    /// every flush and replay anyway).
    pub wal_receiver_status_interval: Millis,
    /// A standby whose primary said nothing for this long reconnects
    /// (0: never).
    pub wal_receiver_timeout: Millis,
}

/// `synchronous_commit_timeout_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutAction {
    /// Answer INDETERMINATE.
    Indeterminate,
    /// Acknowledge at `local`, loudly.
    Degrade,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            wal_dir: PathBuf::from("walden-data/wal"),
            data_dir: PathBuf::from("walden-data/data"),
            wal_segment_size: Size(16 << 20),
            wal_buffers: Size(16 << 20),
            wal_sync_method: SyncMethod::OpenDatasync,
            fsync: true,
            wal_writer_delay: Millis(200),
            commit_delay: 0,
            commit_siblings: 5,
            idle_poll_time: 300,
            insert_shards: 0,
            cpu_affinity: Vec::new(),
            max_record_size: Size(1 << 20),
            wal_prealloc: 2,
            max_wal_size: Size(1 << 30),
            wal_init_zero: true,
            wal_recycle: true,
            wal_full_policy: WalFullPolicy::Error,
            wal_flusher: FlusherKind::Uring,
            wal_max_inflight: 4,
            wal_max_write: Size(1 << 20),
            wal_sync_at_depth_1: true,
            listen_addr: "127.0.0.1:7480".into(),
            metrics_addr: "127.0.0.1:9480".into(),
            auth_token_file: String::new(),
            allow_unauthenticated: false,
            max_in_flight: 1024,
            max_connections: 1024,
            idle_timeout: Millis(0),
            slow_client_timeout: Millis(60_000),
            max_send_backlog: Size(64 << 20),
            shared_buffers: Size(128 << 20),
            full_page_writes: true,
            wal_compression: WalCompression::Off,
            data_checksums: true,
            bgwriter_delay: Millis(200),
            bgwriter_lru_maxpages: 100,
            bgwriter_lru_multiplier: 2.0,
            checkpoint_timeout: Millis(300_000),
            checkpoint_completion_target: 0.9,
            checkpoint_warning: Millis(30_000),
            min_wal_size: Size(80 << 20),
            wal_keep_size: Size(1 << 30),
            log_checkpoints: true,
            recovery_workers: 0,
            synchronous_standby_names: String::new(),
            synchronous_commit_timeout: Millis(0),
            synchronous_commit_timeout_action: TimeoutAction::Indeterminate,
            max_wal_senders: 10,
            max_slot_wal_keep_size: SizeLimit::UNLIMITED,
            wal_sender_timeout: Millis(60_000),
            primary_conninfo: String::new(),
            primary_slot_name: String::new(),
            wal_receiver_status_interval: Millis(10_000),
            wal_receiver_timeout: Millis(60_000),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for parameter \"{name}\": {message}")]
    Invalid { name: &'static str, message: String },
    #[error("unrecognized configuration parameter \"{0}\"; valid parameters are: {names}", names = valid_names())]
    Unknown(String),
    /// A `-c name=value` whose value does not parse.
    #[error("invalid value for parameter \"{name}\": {value:?}: expected {expected}")]
    BadValue {
        name: String,
        value: String,
        expected: &'static str,
    },
    /// A `-c name` without `=value`.
    #[error(
        "parameter \"{name}\" needs a value: expected -c {name}=VALUE, where VALUE is {expected}"
    )]
    NoValue {
        name: String,
        expected: &'static str,
    },
}

/// Every setting's name, alphabetically (as `walden serve -c` takes them).
fn valid_names() -> String {
    let table = toml::Table::try_from(Config::default()).expect("config serializes");
    table
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a setting's value looks like, for error messages.
fn expected_form(name: &str, default: &toml::Value) -> &'static str {
    match name {
        "wal_segment_size" | "wal_buffers" | "max_record_size" | "max_wal_size"
        | "wal_max_write" | "max_send_backlog" | "shared_buffers" | "min_wal_size"
        | "wal_keep_size" => "a size such as 16MB (units B, kB, MB, GB, TB)",
        "max_slot_wal_keep_size" => {
            "-1 (no limit) or a size such as 10GB (units B, kB, MB, GB, TB)"
        }
        "wal_writer_delay"
        | "idle_timeout"
        | "slow_client_timeout"
        | "bgwriter_delay"
        | "checkpoint_timeout"
        | "checkpoint_warning"
        | "synchronous_commit_timeout"
        | "wal_sender_timeout"
        | "wal_receiver_status_interval"
        | "wal_receiver_timeout" => "a duration such as 200ms (units ms, s, min, h, d)",
        "wal_sync_method" => "one of open_datasync, fdatasync, open_sync, fsync",
        "wal_flusher" => "one of uring, pwrite",
        "wal_compression" => "one of off, lz4",
        "wal_full_policy" => "one of error, wait",
        "synchronous_commit_timeout_action" => "one of indeterminate, degrade",
        "primary_conninfo" => {
            "a connection string such as 'host=10.0.0.1 port=7480 application_name=s1'"
        }
        "cpu_affinity" => "a list of CPU numbers such as [0, 1, 2]",
        "synchronous_standby_names" => "a list of standbys such as 'ANY 1 (s1, s2)'",
        _ => match default {
            toml::Value::Boolean(_) => "a boolean: on, off, true, false, yes, no, 1 or 0",
            toml::Value::Integer(_) => "a whole number",
            toml::Value::Float(_) => "a number such as 0.9",
            toml::Value::Array(_) => "a list such as [0, 1]",
            _ => "a string",
        },
    }
}

/// `value` as TOML for a setting whose default is `default`: PostgreSQL's
/// spellings of booleans (on/off, yes/no, 1/0, quoted or not) become
/// `true`/`false` for boolean settings only (`wal_compression = off` is a
/// word, not a boolean), and a bare word (`fdatasync`, `16MB`) is quoted.
fn toml_value(default: Option<&toml::Value>, value: &str) -> String {
    let unquoted = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if let Some(toml::Value::Boolean(_)) = default {
        match unquoted.to_ascii_lowercase().as_str() {
            "on" | "yes" | "1" | "true" => return "true".into(),
            "off" | "no" | "0" | "false" => return "false".into(),
            _ => {}
        }
    }
    let decimal = value.contains('.')
        && value.parse::<f64>().is_ok()
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.".contains(&b));
    if value.parse::<i64>().is_ok()
        || decimal
        || value == "true"
        || value == "false"
        || value.starts_with('[')
        || value.starts_with('"')
        || value.starts_with('\'')
    {
        value.to_string()
    } else {
        format!("{value:?}")
    }
}

const STANDBY_NAMES: &str = "synchronous_standby_names";

/// A `synchronous_standby_names` value as TOML: a TOML string stays one
/// (`'"s1", s2'`), anything else is the setting's own text, quoted. Its
/// grammar has double quotes of its own (`"s1", s2`, `"any"`), which
/// [`toml_value`] would take for a TOML string and refuse.
fn standby_names_value(value: &str) -> String {
    let as_toml = toml::from_str::<toml::Table>(&format!("v = {value}"));
    match as_toml.ok().and_then(|mut t| t.remove("v")) {
        Some(toml::Value::String(_)) => value.to_string(),
        _ => toml::Value::String(value.to_string()).to_string(),
    }
}

/// The configuration file's text with each top-level `name = value` line
/// of a known setting rewritten by [`toml_value`], so that the file takes
/// what `-c` takes (`fsync = on`, `wal_sync_method = fdatasync`). Lines
/// keep their numbers, so the parser's errors still point at the right one.
fn normalize_file(text: &str) -> String {
    let defaults = toml::Table::try_from(Config::default()).expect("config serializes");
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let rewritten = body.split_once('=').and_then(|(name, rest)| {
            let default = defaults.get(name.trim())?;
            // A comment after the value, unless the value is quoted (a
            // `#` inside quotes is not a comment).
            let (value, comment) = match rest.find('#') {
                Some(i) if !rest[..i].contains(['"', '\'']) => rest.split_at(i),
                _ => (rest, ""),
            };
            let value = value.trim();
            if value.is_empty() || value.starts_with(['[', '{', '\'']) {
                return None;
            }
            let new = match name.trim() {
                STANDBY_NAMES => standby_names_value(value),
                _ => toml_value(Some(default), value),
            };
            (new != value).then(|| format!("{} = {new} {comment}", name.trim_end()))
        });
        match rewritten {
            Some(r) => {
                out.push_str(r.trim_end());
                out.push_str(&line[body.len()..]);
            }
            None => out.push_str(line),
        }
    }
    out
}

impl Config {
    /// A configuration whose WAL lives in `dir/wal` and pages in `dir/data`.
    pub fn with_data_directory(dir: &Path) -> Config {
        Config {
            wal_dir: dir.join("wal"),
            data_dir: dir.join("data"),
            ..Config::default()
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Config =
            toml::from_str(&normalize_file(&text)).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies the settings of a configuration file over these (as
    /// PostgreSQL reads postgresql.auto.conf after postgresql.conf): what
    /// the file does not name keeps its value.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse_error = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let over: toml::Table =
            toml::from_str(&normalize_file(&text)).map_err(|e| parse_error(e.to_string()))?;
        let mut table = toml::Table::try_from(&*self).expect("config serializes");
        table.extend(over);
        *self = table
            .try_into()
            .map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
        self.validate()
    }

    /// Applies one `name=value` override (as `postgres -c name=value`).
    pub fn set(&mut self, assignment: &str) -> Result<(), ConfigError> {
        let mut table = toml::Table::try_from(&*self).expect("config serializes");
        let (name, value) = match assignment.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim())),
            None => (assignment.trim(), None),
        };
        let Some(default) = table.get(name) else {
            return Err(ConfigError::Unknown(name.to_string()));
        };
        let expected = expected_form(name, default);
        // `name=` is a value: the empty string (`metrics_addr=` turns it off).
        let Some(value) = value else {
            return Err(ConfigError::NoValue {
                name: name.to_string(),
                expected,
            });
        };
        let bad = || ConfigError::BadValue {
            name: name.to_string(),
            value: value.to_string(),
            expected,
        };
        // Reuse the TOML parser so that -c accepts exactly what the file does.
        let quoted = match name {
            STANDBY_NAMES => standby_names_value(value),
            _ => toml_value(Some(default), value),
        };
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {quoted}"))
            .map_err(|_| bad())?
            .remove("v")
            .unwrap();
        table.insert(name.to_string(), parsed);
        *self = table.try_into().map_err(|_: toml::de::Error| bad())?;
        Ok(())
    }

    /// The number of redo workers `recovery_workers` asks for.
    pub fn redo_workers(&self) -> usize {
        match self.recovery_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            n => n as usize,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: String| Err(ConfigError::Invalid { name, message });
        if self.recovery_workers > 64 {
            return invalid(
                "recovery_workers",
                format!(
                    "{} is not between 0 (one per CPU) and 64",
                    self.recovery_workers
                ),
            );
        }
        let seg = self.wal_segment_size.0;
        if !seg.is_power_of_two() || !((1 << 20)..=(1 << 30)).contains(&seg) {
            return invalid(
                "wal_segment_size",
                format!("{seg} is not a power of two between 1MB and 1GB"),
            );
        }
        let ring = self.wal_buffers.0;
        if ring % 4096 != 0 || !((64 << 10)..=(1 << 30)).contains(&ring) {
            return invalid(
                "wal_buffers",
                format!("{ring} must be a multiple of 4kB between 64kB and 1GB"),
            );
        }
        if !ring.is_power_of_two() {
            return invalid("wal_buffers", format!("{ring} must be a power of two"));
        }
        let max_rec = self.max_record_size.0;
        if max_rec == 0
            || max_rec + 4096 > ring / 2
            || max_rec > crate::record::MAX_TOTAL_LEN as u64 / 2
        {
            return invalid(
                "max_record_size",
                format!(
                    "{max_rec} must be positive and leave room in half of wal_buffers ({ring}): \
                     a larger record could wait forever for ring space"
                ),
            );
        }
        if self.max_wal_size.0 < 2 * seg {
            return invalid(
                "max_wal_size",
                format!(
                    "{} must be at least two WAL segments ({})",
                    self.max_wal_size.0,
                    2 * seg
                ),
            );
        }
        if self.wal_max_inflight == 0 || self.wal_max_inflight > 64 {
            return invalid(
                "wal_max_inflight",
                format!("{} is not between 1 and 64", self.wal_max_inflight),
            );
        }
        let w = self.wal_max_write.0;
        if w < 4096 || w % 4096 != 0 {
            return invalid("wal_max_write", format!("{w} must be a multiple of 4kB"));
        }
        if self.wal_writer_delay.0 == 0 || self.wal_writer_delay.0 > 10_000 {
            return invalid(
                "wal_writer_delay",
                format!("{}ms is not between 1ms and 10s", self.wal_writer_delay.0),
            );
        }
        if self.commit_delay > 100_000 {
            return invalid(
                "commit_delay",
                format!("{}us is more than 100000us", self.commit_delay),
            );
        }
        if self.max_connections == 0 {
            return invalid(
                "max_connections",
                "0 would refuse every client: at least 1".to_string(),
            );
        }
        if self.idle_poll_time > 10_000 {
            return invalid(
                "idle_poll_time",
                format!("{}us is more than 10000us", self.idle_poll_time),
            );
        }
        if self.min_wal_size.0 < 2 * seg {
            return invalid(
                "min_wal_size",
                format!(
                    "{} must be at least twice wal_segment_size ({})",
                    self.min_wal_size.0,
                    2 * seg
                ),
            );
        }
        let page = crate::io::PAGE_SIZE as u64;
        if self.shared_buffers.0 < 16 * page || self.shared_buffers.0 > (1 << 40) {
            return invalid(
                "shared_buffers",
                format!(
                    "{} must be between 128kB (16 pages) and 1TB",
                    self.shared_buffers.0
                ),
            );
        }
        if !(10..=10_000).contains(&self.bgwriter_delay.0) {
            return invalid(
                "bgwriter_delay",
                format!("{}ms is not between 10ms and 10s", self.bgwriter_delay.0),
            );
        }
        if !(0.0..=10.0).contains(&self.bgwriter_lru_multiplier) {
            return invalid(
                "bgwriter_lru_multiplier",
                format!("{} is not between 0 and 10", self.bgwriter_lru_multiplier),
            );
        }
        if !(1_000..=86_400_000).contains(&self.checkpoint_timeout.0) {
            return invalid(
                "checkpoint_timeout",
                format!("{}ms is not between 1s and 1d", self.checkpoint_timeout.0),
            );
        }
        if let Err(e) = crate::replication::StandbyNames::parse(&self.synchronous_standby_names) {
            return invalid(
                STANDBY_NAMES,
                format!("{:?}: {e}", self.synchronous_standby_names),
            );
        }
        if !self.primary_conninfo.trim().is_empty() {
            if let Err(e) = crate::replication::ConnInfo::parse(&self.primary_conninfo) {
                return invalid(
                    "primary_conninfo",
                    format!("{:?}: {e}", self.primary_conninfo),
                );
            }
        }
        if !self.primary_slot_name.is_empty()
            && (self.primary_slot_name.len() > 63
                || !self
                    .primary_slot_name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        {
            return invalid(
                "primary_slot_name",
                format!(
                    "{:?}: replication slot names contain only lower case letters, numbers and underscores, at most 63",
                    self.primary_slot_name
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.checkpoint_completion_target) {
            return invalid(
                "checkpoint_completion_target",
                format!(
                    "{} is not between 0 and 1",
                    self.checkpoint_completion_target
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_take_postgres_units() {
        assert_eq!(Size::parse("16MB"), Ok(Size(16 << 20)));
        assert_eq!(Size::parse("8kB"), Ok(Size(8192)));
        assert_eq!(Size::parse("4096"), Ok(Size(4096)));
        assert!(Size::parse("12 parsecs")
            .unwrap_err()
            .contains("invalid unit"));
        assert_eq!(Millis::parse("200ms"), Ok(Millis(200)));
        assert_eq!(Millis::parse("5min"), Ok(Millis(300_000)));
    }

    #[test]
    fn file_and_overrides() {
        let cfg: Config = toml::from_str(
            "wal_buffers = \"4MB\"\nwal_sync_method = \"fdatasync\"\nwal_writer_delay = 10\n",
        )
        .unwrap();
        assert_eq!(cfg.wal_buffers, Size(4 << 20));
        assert_eq!(cfg.wal_sync_method, SyncMethod::Fdatasync);
        cfg.validate().unwrap();
        let mut cfg = cfg;
        cfg.set("wal_segment_size=1MB").unwrap();
        assert_eq!(cfg.wal_segment_size, Size(1 << 20));
        cfg.set("fsync=false").unwrap();
        assert!(!cfg.fsync);
        cfg.set("checkpoint_completion_target=0.5").unwrap();
        assert_eq!(cfg.checkpoint_completion_target, 0.5);
        cfg.set("wal_compression=lz4").unwrap();
        assert_eq!(cfg.wal_compression, WalCompression::Lz4);
        cfg.set("wal_compression=off").unwrap();
        assert_eq!(cfg.wal_compression, WalCompression::Off);
        cfg.set("full_page_writes=off").unwrap();
        assert!(!cfg.full_page_writes);
        cfg.set("fsync=on").unwrap();
        assert!(cfg.fsync);
        assert!(matches!(
            cfg.set("no_such_thing=1"),
            Err(ConfigError::Unknown(_))
        ));
        assert!(cfg.set("wal_sync_method=sometimes").is_err());
        let bad = toml::from_str::<Config>("wal_bufers = 3").unwrap_err();
        assert!(bad.to_string().contains("unknown field"));
    }

    #[test]
    fn validation_names_the_setting() {
        let cfg = Config {
            wal_segment_size: Size(3 << 20),
            ..Config::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("wal_segment_size"), "{e}");
        let cfg = Config {
            max_record_size: Size(9 << 20),
            ..Config::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("max_record_size"), "{e}");
        let mut cfg = Config::default();
        cfg.set("recovery_workers=65").unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("recovery_workers") && e.contains("65"), "{e}");
        let mut cfg = Config::default();
        cfg.set("idle_poll_time=20000").unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("idle_poll_time") && e.contains("20000us"), "{e}");
        cfg.set("idle_poll_time=0").unwrap();
        cfg.validate().unwrap();
        cfg.set("max_connections=0").unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn file_takes_what_dash_c_takes() {
        let text = "fsync = off # benchmarks only\nwal_sync_at_depth_1 = on\n\
                    data_checksums = \"no\"\nwal_compression = lz4\nwal_buffers = 4MB\n";
        let cfg: Config = toml::from_str(&normalize_file(text)).unwrap();
        assert!(!cfg.fsync && cfg.wal_sync_at_depth_1 && !cfg.data_checksums);
        assert_eq!(cfg.wal_compression, WalCompression::Lz4);
        assert_eq!(cfg.wal_buffers, Size(4 << 20));
        // A bad value still points at its line.
        let e = toml::from_str::<Config>(&normalize_file("fsync = on\nwal_buffers = 4 parsecs\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("invalid unit"), "{e}");
    }

    #[test]
    fn dash_c_errors_name_the_parameter_and_the_form() {
        let mut cfg = Config::default();
        let e = cfg.set("wal_buffers=bad").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid value for parameter \"wal_buffers\": \"bad\": \
             expected a size such as 16MB (units B, kB, MB, GB, TB)"
        );
        let e = cfg.set("fsync").unwrap_err().to_string();
        assert!(
            e.starts_with("parameter \"fsync\" needs a value: expected -c fsync=VALUE"),
            "{e}"
        );
        let e = cfg.set("fsync=maybe").unwrap_err().to_string();
        assert!(e.contains("expected a boolean: on, off"), "{e}");
        let e = cfg.set("nosuch=1").unwrap_err().to_string();
        assert!(
            e.starts_with("unrecognized configuration parameter \"nosuch\"; valid parameters are: allow_unauthenticated,"),
            "{e}"
        );
    }

    #[test]
    fn synchronous_standby_names_is_checked_with_postgres_grammar() {
        let mut cfg = Config::default();
        assert_eq!(cfg.synchronous_standby_names, "");
        cfg.validate().unwrap();
        // -c takes the setting's text as is, double quotes included.
        for (value, want) in [
            ("ANY 1 (s1, s2)", "ANY 1 (s1, s2)"),
            ("s1,s2", "s1,s2"),
            ("'FIRST 2 (a, b, c)'", "FIRST 2 (a, b, c)"),
            ("\"s1\", s2", "\"s1\", s2"),
            ("'\"any\"'", "\"any\""),
            ("*", "*"),
            ("", ""),
        ] {
            cfg.set(&format!("synchronous_standby_names={value}"))
                .unwrap_or_else(|e| panic!("{value:?}: {e}"));
            assert_eq!(cfg.synchronous_standby_names, want, "{value:?}");
            cfg.validate().unwrap_or_else(|e| panic!("{value:?}: {e}"));
        }
        cfg.set("synchronous_standby_names=FIRST 0 (a)").unwrap();
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "invalid value for parameter \"synchronous_standby_names\": \"FIRST 0 (a)\": \
             number of synchronous standbys (0) must be greater than zero"
        );
        cfg.set("synchronous_standby_names=ANY 1 (a, b").unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.ends_with("\"ANY 1 (a, b\": syntax error at end of input"),
            "{e}"
        );
        // The file: bare, TOML-quoted, or with the grammar's own quotes.
        for (line, want) in [
            ("synchronous_standby_names = ANY 1 (*)\n", "ANY 1 (*)"),
            (
                "synchronous_standby_names = 'FIRST 1 (\"s 1\", s2)'\n",
                "FIRST 1 (\"s 1\", s2)",
            ),
            ("synchronous_standby_names = \"s1, s2\"\n", "s1, s2"),
            ("synchronous_standby_names = \"s1\", s2\n", "\"s1\", s2"),
        ] {
            let cfg: Config =
                toml::from_str(&normalize_file(line)).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(cfg.synchronous_standby_names, want, "{line:?}");
            cfg.validate().unwrap();
        }
        let cfg: Config =
            toml::from_str(&normalize_file("synchronous_standby_names = 's1 s2'\n")).unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("syntax error at or near \"s2\" at character 4"),
            "{e}"
        );
    }

    #[test]
    fn recovery_workers_zero_means_one_per_cpu() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(Config::default().redo_workers(), cpus.min(8));
        let cfg = Config {
            recovery_workers: 3,
            ..Config::default()
        };
        assert_eq!(cfg.redo_workers(), 3);
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// systemd/walden.toml documents every setting at its default.
    #[test]
    fn example_config_lists_every_setting_at_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/walden.toml");
        let cfg = Config::from_file(&path).unwrap();
        let expected = Config {
            wal_dir: "/var/lib/walden/wal".into(),
            data_dir: "/var/lib/walden/data".into(),
            ..Config::default()
        };
        assert_eq!(
            toml::to_string(&cfg).unwrap(),
            toml::to_string(&expected).unwrap()
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let all = toml::Table::try_from(&expected).unwrap();
        for key in all.keys() {
            assert!(
                table.contains_key(key),
                "systemd/walden.toml does not document {key}"
            );
        }
    }
}

// --- How settings are shown (`/status`, `walden status`) ---
//
// The canonical unit form: the largest unit that holds the value exactly,
// as PostgreSQL's SHOW prints it (`16MB`, `8kB`, `30s`, `5min`, `4097B`,
// `0`). Each form parses back to the same value.

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(u64, &str); 5] = [
            (1 << 40, "TB"),
            (1 << 30, "GB"),
            (1 << 20, "MB"),
            (1 << 10, "kB"),
            (1, "B"),
        ];
        show_in_units(f, self.0, &UNITS)
    }
}

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(u64, &str); 5] = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "min"),
            (1000, "s"),
            (1, "ms"),
        ];
        show_in_units(f, self.0, &UNITS)
    }
}

/// `units` from the largest, ending in the base unit (factor 1).
fn show_in_units(
    f: &mut std::fmt::Formatter<'_>,
    value: u64,
    units: &[(u64, &str)],
) -> std::fmt::Result {
    if value == 0 {
        return f.write_str("0");
    }
    let (factor, unit) = units
        .iter()
        .find(|(factor, _)| value % factor == 0)
        .expect("the base unit divides every value");
    write!(f, "{}{unit}", value / factor)
}

#[cfg(test)]
mod shown {
    use super::*;

    #[test]
    fn sizes_and_durations_show_in_the_largest_exact_unit() {
        let sizes: [(u64, &str); 7] = [
            (16 << 20, "16MB"),
            (8192, "8kB"),
            (1536, "1536B"),
            (1 << 30, "1GB"),
            (3 << 40, "3TB"),
            (4097, "4097B"),
            (0, "0"),
        ];
        for (n, text) in sizes {
            assert_eq!(Size(n).to_string(), text);
        }
        let durations: [(u64, &str); 8] = [
            (30_000, "30s"),
            (200, "200ms"),
            (300_000, "5min"),
            (90_000, "90s"),
            (7_200_000, "2h"),
            (86_400_000, "1d"),
            (1_500, "1500ms"),
            (0, "0"),
        ];
        for (n, text) in durations {
            assert_eq!(Millis(n).to_string(), text);
        }
    }

    #[test]
    fn shown_forms_parse_back() {
        for n in [0, 1, 4097, 8192, 1536, 16 << 20, 3 << 40] {
            assert_eq!(Size::parse(&Size(n).to_string()), Ok(Size(n)));
        }
        for n in [0, 1, 999, 1000, 61_000, 300_000, 7_200_000, 86_400_000] {
            assert_eq!(Millis::parse(&Millis(n).to_string()), Ok(Millis(n)));
        }
    }
}
