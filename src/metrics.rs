//! Metrics: lock-free recording where events happen, and the HTTP endpoint
//! (`/metrics`, `/status`) that reads them.
//!
//! Recording is plain atomics. [`AtomicHistogram::observe`] is two relaxed
//! `fetch_add`s; the counters and gauges of [`Metrics`] are one. No lock, no
//! allocation, no registry lookup: they may sit in the flusher, in the shard
//! threads and on the insert path.
//!
//! Export is one HTTP thread (tiny_http) that, per scrape, reads those atomics
//! and encodes them with prometheus-client's text encoder through a custom
//! `Collector`. No prometheus-client metric object holds state of its own, so
//! nothing is counted twice and every scrape reads the live values.
//!
//! Floors: this module sits below `wal`. `wal` records into the
//! [`AtomicHistogram`]s of its `WalStats`; this module never imports `wal`.
//! The WAL's figures reach the exporter as a plain [`WalSnapshot`] returned by
//! a closure the server passes to [`Metrics::serve`] (`Wal::metrics_snapshot`
//! fills one). A closure rather than a trait: there is one implementation, and
//! a test can pass a fake.
//!
//! Formats: the Prometheus text format 0.0.4 by default (`curl | promtool
//! check metrics`, which parses only that format: it reads an OpenMetrics
//! counter as an untyped `_total` series without help), and OpenMetrics 1.0
//! when the scraper's `Accept` prefers it (Prometheus asks for it first).
//! The negotiation is Prometheus' own exporters' (`expfmt.Negotiate`). The
//! 0.0.4 text is converted from prometheus-client's OpenMetrics encoding:
//! counters' HELP/TYPE lines take the `_total` name, `unknown` is
//! `untyped`, `# UNIT` and `# EOF` go.
//!
//! What it is not: a time-series store, a tracing layer, or a place to add a
//! label whose values are unbounded (client addresses, LSNs).

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format (for `promtool` and old scrapers).
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Flush latency (write plus sync), ns: 20 µs to 1 s, about 1-1.5-2-3-5-7.5.
pub const FLUSH_DURATION_BOUNDS_NS: &[u64] = &[
    20_000,
    30_000,
    50_000,
    75_000,
    100_000,
    150_000,
    200_000,
    300_000,
    500_000,
    750_000,
    1_000_000,
    1_500_000,
    2_000_000,
    3_000_000,
    5_000_000,
    7_500_000,
    10_000_000,
    15_000_000,
    20_000_000,
    30_000_000,
    50_000_000,
    75_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
];

/// Commit wait, ns: 1 µs (level `off` acks from the ring) to 5 s (standbys, later).
pub const COMMIT_WAIT_BOUNDS_NS: &[u64] = &[
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    30_000,
    50_000,
    75_000,
    100_000,
    150_000,
    200_000,
    300_000,
    500_000,
    750_000,
    1_000_000,
    1_500_000,
    2_000_000,
    3_000_000,
    5_000_000,
    7_500_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
];

/// WAL bytes per flush: 512 B to 16 MiB, powers of two.
pub const FLUSH_BYTES_BOUNDS: &[u64] = &[
    512,
    1 << 10,
    2 << 10,
    4 << 10,
    8 << 10,
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
    8 << 20,
    16 << 20,
];

/// Records per flush (group commit size).
pub const GROUP_SIZE_BOUNDS: &[u64] = &[
    1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192,
    16384, 65536,
];

/// Durability levels, as `Durability::name` spells them (a test pins the
/// two lists together; this module may not import `wal`).
pub const COMMIT_LEVELS: [&str; 5] = ["off", "local", "remote_write", "on", "remote_apply"];

/// Error kinds the server counts; anything else is counted as `other`.
pub const ERROR_KINDS: [&str; 8] = [
    "bad_frame",
    "auth",
    "too_large",
    "too_many_requests",
    "too_many_connections",
    "timeout",
    "io",
    "other",
];

/// A histogram with fixed bucket bounds, recorded with relaxed atomics.
///
/// Values are integers in the unit the owner chooses (ns, bytes, records);
/// the exporter scales them. A bucket holds the values `<=` its bound and
/// above the previous one; one more bucket holds values above every bound.
///
/// There is no count atomic: the count is the sum of the buckets, so a
/// snapshot taken during concurrent observations still has `_count` equal to
/// the `+Inf` bucket. `sum` is read separately and may lag or lead the
/// buckets by the observations in flight.
pub struct AtomicHistogram {
    bounds: Box<[u64]>,
    /// `bounds.len() + 1` buckets, not cumulative.
    buckets: Box<[AtomicU64]>,
    /// Wraps at 2^64, which Prometheus reads as a counter reset. In ns that
    /// is 584 years of summed waiting: 21 days with 10,000 requests always
    /// waiting.
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// Panics unless `bounds` is non-empty and strictly ascending.
    pub fn new(bounds: &[u64]) -> AtomicHistogram {
        assert!(
            !bounds.is_empty() && bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bounds must be non-empty and strictly ascending: {bounds:?}"
        );
        AtomicHistogram {
            bounds: bounds.into(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Records one value: a binary search over the bounds and two relaxed adds.
    #[inline]
    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    pub fn bounds(&self) -> &[u64] {
        &self.bounds
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            counts: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum: self.sum.load(Relaxed),
        }
    }
}

impl fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.snapshot();
        f.debug_struct("AtomicHistogram")
            .field("count", &s.count())
            .field("sum", &s.sum)
            .finish()
    }
}

/// The state of an [`AtomicHistogram`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Inclusive upper bounds, ascending; the `+Inf` bucket is implied.
    pub bounds: Vec<u64>,
    /// Observations per bucket, not cumulative: `bounds.len() + 1` entries,
    /// the last for values above every bound (empty in a default snapshot).
    pub counts: Vec<u64>,
    pub sum: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// The WAL's figures at one scrape. The server fills it (with
/// `Wal::metrics_snapshot`); LSNs are byte positions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalSnapshot {
    pub insert_lsn: u64,
    pub write_lsn: u64,
    pub flush_lsn: u64,
    /// Since this process opened the WAL.
    pub records_appended: u64,
    /// The insert LSN's advance since open (headers and padding included).
    pub bytes_appended: u64,
    pub syncs: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub ring_full_waits: u64,
    pub segments_created: u64,
    pub segments_created_by_flusher: u64,
    pub segments_recycled: u64,
    pub segments_removed: u64,
    /// ns per flush (first write submitted to durable).
    pub flush_duration: HistogramSnapshot,
    /// LSN bytes per flush.
    pub flush_bytes: HistogramSnapshot,
    /// Records per flush (approximate; see `WalStats`).
    pub group_size: HistogramSnapshot,
}

/// Returns the figures of the WAL at the moment of a scrape.
/// The page store's figures, filled by `Store::metrics_snapshot`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreSnapshot {
    /// Completed checkpoints by reason (`time`, `wal`, `requested`, `shutdown`, `end_of_recovery`).
    pub checkpoints: [(&'static str, u64); 5],
    pub checkpoints_failed: u64,
    pub checkpoint_in_progress: bool,
    pub buffers_checkpoint: u64,
    pub checkpoint_write_seconds: f64,
    pub checkpoint_sync_seconds: f64,
    pub last_checkpoint_lsn: u64,
    pub last_redo_lsn: u64,
    pub buffers_clean: u64,
    pub maxwritten_clean: u64,
    pub buffers_alloc: u64,
    pub buffers_backend: u64,
    pub shared_buffers: u64,
    pub page_writes: u64,
    pub page_images: u64,
    pub page_image_bytes: u64,
    pub page_reads: u64,
    pub page_device_reads: u64,
}

pub type WalSnapshotFn = Arc<dyn Fn() -> WalSnapshot + Send + Sync>;
/// Returns the figures of the page store at the moment of a scrape.
pub type StoreSnapshotFn = Arc<dyn Fn() -> StoreSnapshot + Send + Sync>;
/// One standby as its primary sees it (the `standby` label).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StandbyMetrics {
    pub name: String,
    pub sent_lsn: u64,
    pub write_lsn: u64,
    pub flush_lsn: u64,
    pub replay_lsn: u64,
    /// Seconds; None before the first report.
    pub write_lag: Option<f64>,
    pub flush_lag: Option<f64>,
    pub replay_lag: Option<f64>,
    /// Counts for the synchronous_standby_names policy now.
    pub sync: bool,
}

/// Replication's figures at the moment of a scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicationSnapshot {
    pub standbys: Vec<StandbyMetrics>,
    pub quorum_flush_lsn: u64,
    /// Fewer standbys than the policy needs are streaming.
    pub quorum_lost: bool,
    pub commits_waiting: i64,
    pub commits_degraded: u64,
    pub commits_indeterminate: u64,
    /// On a standby: (received, flushed, replayed) LSNs.
    pub receiver: Option<(u64, u64, u64)>,
    /// Replication slots: (name, restart LSN, lost).
    pub slots: Vec<(String, u64, bool)>,
}

/// Returns the replication figures at the moment of a scrape.
pub type ReplicationSnapshotFn = Arc<dyn Fn() -> ReplicationSnapshot + Send + Sync>;

/// Returns the `/status` document (JSON).
pub type StatusFn = Arc<dyn Fn() -> String + Send + Sync>;

/// The server's own metrics, and the HTTP endpoint. Share it in an `Arc`;
/// every recording method is lock-free.
pub struct Metrics {
    commit_wait: [AtomicHistogram; COMMIT_LEVELS.len()],
    connections: AtomicI64,
    errors: [AtomicU64; ERROR_KINDS.len()],
    /// The running endpoint and its stop flag, for `shutdown`. Locked only
    /// by `serve` and `shutdown`, never by a recording method.
    http: Mutex<Option<(Arc<tiny_http::Server>, Arc<AtomicBool>)>>,
    /// The page store's figures, when there is a page store.
    store: std::sync::OnceLock<StoreSnapshotFn>,
    /// Replication's figures, when served by a server.
    replication: std::sync::OnceLock<ReplicationSnapshotFn>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("connections", &self.connections.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            commit_wait: std::array::from_fn(|_| AtomicHistogram::new(COMMIT_WAIT_BOUNDS_NS)),
            connections: AtomicI64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            http: Mutex::new(None),
            store: std::sync::OnceLock::new(),
            replication: std::sync::OnceLock::new(),
        }
    }

    /// Exports replication's series (per standby, quorum) too.
    pub fn set_replication_snapshot(&self, f: ReplicationSnapshotFn) {
        let _ = self.replication.set(f);
    }

    /// Exports the page store's series (checkpoints, bgwriter, pages) too.
    pub fn set_store_snapshot(&self, f: StoreSnapshotFn) {
        let _ = self.store.set(f);
    }

    /// Records the time from a request's arrival to its acknowledgement at
    /// `level` (a name in [`COMMIT_LEVELS`]). Lock-free.
    #[inline]
    pub fn observe_commit_wait(&self, level: &'static str, secs: f64) {
        match COMMIT_LEVELS.iter().position(|l| *l == level) {
            // `as` saturates: negative and NaN become 0.
            Some(i) => self.commit_wait[i].observe((secs * 1e9).round() as u64),
            None => debug_assert!(false, "unknown durability level {level:?}"),
        }
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    /// Counts an error of `kind` (a name in [`ERROR_KINDS`]; any other name
    /// counts as `other`). Lock-free.
    #[inline]
    pub fn error(&self, kind: &'static str) {
        let i = ERROR_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(ERROR_KINDS.len() - 1);
        self.errors[i].fetch_add(1, Relaxed);
    }

    pub fn connections(&self) -> i64 {
        self.connections.load(Relaxed)
    }

    pub fn errors(&self, kind: &str) -> u64 {
        ERROR_KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.errors[i].load(Relaxed))
    }

    pub fn commit_wait(&self, level: &str) -> Option<HistogramSnapshot> {
        let i = COMMIT_LEVELS.iter().position(|l| *l == level)?;
        Some(self.commit_wait[i].snapshot())
    }

    /// Starts the HTTP endpoint on `addr` (port 0 picks one) on its own
    /// thread: `GET /metrics`, `GET /status` (the JSON `status` returns),
    /// 404 for anything else. Returns the bound address and the thread;
    /// [`Metrics::shutdown`] stops it.
    pub fn serve(
        self: &Arc<Self>,
        addr: SocketAddr,
        status: StatusFn,
        wal_snapshot: WalSnapshotFn,
    ) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
        let mut http = self.http.lock().unwrap();
        if http.is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the metrics endpoint is already running",
            ));
        }
        let server = tiny_http::Server::http(addr).map_err(|e| {
            let what = format!("could not listen for HTTP (metrics, status) on {addr}: {e}");
            // Keep the kind (AddrInUse, PermissionDenied) for the caller.
            match e.downcast::<std::io::Error>() {
                Ok(io) => std::io::Error::new(io.kind(), what),
                Err(_) => std::io::Error::other(what),
            }
        })?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("HTTP listener has no IP address"))?;
        let server = Arc::new(server);
        let registry = registry(Arc::clone(self), wal_snapshot);
        let stopping = Arc::new(AtomicBool::new(false));
        let (thread_server, thread_stopping) = (Arc::clone(&server), Arc::clone(&stopping));
        let handle = std::thread::Builder::new()
            .name("walden-http".into())
            .spawn(move || http_loop(&thread_server, &thread_stopping, &registry, &*status))?;
        *http = Some((server, stopping));
        tracing::info!(%bound, "HTTP (metrics, status) listening");
        Ok((bound, handle))
    }

    /// Stops the HTTP thread after the request it is answering; join the
    /// handle [`Metrics::serve`] returned to wait for it. The listener closes
    /// when the thread ends.
    pub fn shutdown(&self) {
        if let Some((server, stopping)) = self.http.lock().unwrap().take() {
            stopping.store(true, SeqCst);
            server.unblock();
        }
    }
}

/// One thread, blocking: take a request, answer it, repeat. (tiny_http reads
/// requests on its own accept and connection threads; this thread encodes.)
/// `recv` fails only when unblocked by `shutdown`, or when tiny_http's
/// accept thread failed and quit: either way nothing more will come.
fn http_loop(
    server: &tiny_http::Server,
    stopping: &AtomicBool,
    registry: &Registry,
    status: &dyn Fn() -> String,
) {
    let err = loop {
        match server.recv() {
            Ok(rq) => answer(rq, registry, status),
            Err(e) => break e,
        }
    };
    if stopping.load(SeqCst) {
        tracing::debug!("HTTP (metrics, status) stopped");
    } else {
        tracing::error!("HTTP (metrics, status) stopped: could not accept a connection: {err}");
    }
}

fn answer(rq: tiny_http::Request, registry: &Registry, status: &dyn Fn() -> String) {
    let path = rq.url().split('?').next().unwrap_or("").to_string();
    let get = *rq.method() == tiny_http::Method::Get;
    let (code, content_type, body) = match (get, path.as_str()) {
        (true, "/metrics") => {
            // Several Accept headers are one list (RFC 9110, 5.3).
            let accept: Vec<&str> = rq
                .headers()
                .iter()
                .filter(|h| h.field.equiv("Accept"))
                .map(|h| h.value.as_str())
                .collect();
            let mut body = String::with_capacity(32 << 10);
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => match negotiate(&accept.join(",")) {
                    Format::PrometheusText => (
                        200,
                        PROMETHEUS_TEXT_CONTENT_TYPE,
                        openmetrics_to_prometheus_text(&body),
                    ),
                    Format::OpenMetrics => (200, OPENMETRICS_CONTENT_TYPE, body),
                },
                Err(e) => (
                    500,
                    "text/plain; charset=utf-8",
                    format!("could not encode metrics: {e}\n"),
                ),
            }
        }
        (true, "/status") => (200, "application/json", status()),
        _ => (404, "text/plain; charset=utf-8", "not found\n".to_string()),
    };
    let mut response = tiny_http::Response::from_string(body).with_status_code(code);
    if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", content_type) {
        response = response.with_header(h);
    }
    if let Err(e) = rq.respond(response) {
        tracing::debug!("HTTP (metrics, status): could not answer {path}: {e}");
    }
}

/// The exposition formats `/metrics` answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// `text/plain; version=0.0.4`: what `promtool` and older scrapers read.
    PrometheusText,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

/// Picks the format for an `Accept` header ("" when there is none) as the
/// Go client's `expfmt.NegotiateIncludingOpenMetrics` does: the media ranges
/// by descending `q` (ties in the header's order, `q=0` refused), the first
/// that names a format and version walden serves wins; when none does (no
/// header, `*/*`, `text/html`, protobuf) the Prometheus text format.
fn negotiate(accept: &str) -> Format {
    let mut ranges: Vec<(f64, Format)> = Vec::new();
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let (mut q, mut version) = (1.0, None);
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "q" => q = v.parse().unwrap_or(0.0),
                "version" => version = Some(v.to_string()),
                _ => {}
            }
        }
        let format = match (media.as_str(), version.as_deref()) {
            ("text/plain", None | Some("0.0.4")) => Format::PrometheusText,
            ("application/openmetrics-text", None | Some("1.0.0" | "0.0.1")) => Format::OpenMetrics,
            _ => continue,
        };
        if q > 0.0 {
            ranges.push((q, format));
        }
    }
    // Stable: equal q keep the header's order.
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranges.first().map_or(Format::PrometheusText, |r| r.1)
}

/// Rewrites prometheus-client's OpenMetrics text into the Prometheus text
/// format 0.0.4. Sample lines are the same in both; only the metadata
/// differs: a counter family is named with its `_total`, `unknown` is
/// `untyped`, and `# UNIT` and `# EOF` do not exist.
fn openmetrics_to_prometheus_text(om: &str) -> String {
    let counters: HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?.split_once(' ')?)));
        match meta {
            Some((p, (name, rest))) => {
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let rest = if p == "# TYPE " && rest == "unknown" {
                    "untyped"
                } else {
                    rest
                };
                let _ = writeln!(out, "{p}{name}{suffix} {rest}");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn registry(metrics: Arc<Metrics>, wal: WalSnapshotFn) -> Registry {
    let mut registry = Registry::with_prefix("walden");
    registry.register_collector(Box::new(Exporter { metrics, wal }));
    registry
}

/// Encodes the live atomics at scrape time.
struct Exporter {
    metrics: Arc<Metrics>,
    wal: WalSnapshotFn,
}

impl fmt::Debug for Exporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exporter")
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

const NS_PER_SEC: f64 = 1e9;

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use Value::*;
        let w = (self.wal)();
        let m = &self.metrics;
        let bytes = Some(&Unit::Bytes);
        let secs = Some(&Unit::Seconds);
        let ns = NS_PER_SEC;
        let wal: [(&str, Option<&Unit>, &str, Value); 11] = [
            ("insert_lsn", bytes, HELP_INSERT_LSN, Gauge(w.insert_lsn)),
            ("write_lsn", bytes, HELP_WRITE_LSN, Gauge(w.write_lsn)),
            ("flush_lsn", bytes, HELP_FLUSH_LSN, Gauge(w.flush_lsn)),
            (
                "records_appended",
                None,
                HELP_RECORDS,
                Counter(w.records_appended),
            ),
            (
                "bytes_appended",
                None,
                HELP_BYTES_APPENDED,
                Counter(w.bytes_appended),
            ),
            ("wal_syncs", None, HELP_SYNCS, Counter(w.syncs)),
            ("wal_writes", None, HELP_WRITES, Counter(w.writes)),
            ("wal_write", bytes, HELP_WRITE_BYTES, Counter(w.write_bytes)),
            (
                "flush_duration",
                secs,
                HELP_FLUSH_DURATION,
                Histogram(&w.flush_duration, ns),
            ),
            (
                "flush",
                bytes,
                HELP_FLUSH_BYTES,
                Histogram(&w.flush_bytes, 1.0),
            ),
            (
                "group_commit_size",
                None,
                HELP_GROUP_SIZE,
                Histogram(&w.group_size, 1.0),
            ),
        ];
        for (name, unit, help, value) in wal {
            encode_series(&mut enc, name, help, unit, value)?;
        }
        {
            let mut family = enc.encode_descriptor(
                "commit_wait",
                HELP_COMMIT_WAIT,
                secs,
                MetricType::Histogram,
            )?;
            for (level, h) in COMMIT_LEVELS.iter().zip(&m.commit_wait) {
                let labels = [("level", *level)];
                let mut labelled = family.encode_family(&labels)?;
                encode_histogram(&mut labelled, &h.snapshot(), ns)?;
            }
        }
        let more: [(&str, &str, Value); 6] = [
            (
                "ring_full_waits",
                HELP_RING_FULL,
                Counter(w.ring_full_waits),
            ),
            (
                "segments_created",
                HELP_SEG_CREATED,
                Counter(w.segments_created),
            ),
            (
                "segments_created_by_flusher",
                HELP_SEG_BY_FLUSHER,
                Counter(w.segments_created_by_flusher),
            ),
            (
                "segments_recycled",
                HELP_SEG_RECYCLED,
                Counter(w.segments_recycled),
            ),
            (
                "segments_removed",
                HELP_SEG_REMOVED,
                Counter(w.segments_removed),
            ),
            (
                "connections",
                HELP_CONNECTIONS,
                SignedGauge(m.connections.load(Relaxed)),
            ),
        ];
        for (name, help, value) in more {
            encode_series(&mut enc, name, help, None, value)?;
        }
        {
            let mut family =
                enc.encode_descriptor("errors", HELP_ERRORS, None, MetricType::Counter)?;
            for (kind, n) in ERROR_KINDS.iter().zip(&m.errors) {
                let labels = [("kind", *kind)];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&n.load(Relaxed), None)?;
            }
        }
        if let Some(store) = m.store.get() {
            encode_store(&mut enc, &store())?;
        }
        if let Some(rep) = m.replication.get() {
            encode_replication(&mut enc, &rep())?;
        }
        Ok(())
    }
}

fn encode_replication(enc: &mut DescriptorEncoder, r: &ReplicationSnapshot) -> fmt::Result {
    use Value::*;
    let bytes = Some(&Unit::Bytes);
    let secs = Some(&Unit::Seconds);
    type Lsns = fn(&StandbyMetrics) -> u64;
    let lsns: [(&str, &str, Lsns); 4] = [
        (
            "standby_sent_lsn",
            "WAL sent to each standby (pg_stat_replication.sent_lsn).",
            |s| s.sent_lsn,
        ),
        (
            "standby_write_lsn",
            "WAL each standby reported written.",
            |s| s.write_lsn,
        ),
        (
            "standby_flush_lsn",
            "WAL each standby reported durable.",
            |s| s.flush_lsn,
        ),
        (
            "standby_replay_lsn",
            "WAL each standby reported replayed into its page store.",
            |s| s.replay_lsn,
        ),
    ];
    for (name, help, get) in lsns {
        let mut family = enc.encode_descriptor(name, help, bytes, MetricType::Gauge)?;
        for s in &r.standbys {
            let labels = [("standby", s.name.as_str())];
            family.encode_family(&labels)?.encode_gauge(&get(s))?;
        }
    }
    type Lags = fn(&StandbyMetrics) -> Option<f64>;
    let lags: [(&str, &str, Lags); 3] = [
        ("standby_write_lag", "Time from sending WAL to the standby's report that it wrote it (grows while it reports nothing newer).", |s| s.write_lag),
        ("standby_flush_lag", "Time from sending WAL to the standby's report that it flushed it.", |s| s.flush_lag),
        ("standby_replay_lag", "Time from sending WAL to the standby's report that it replayed it.", |s| s.replay_lag),
    ];
    for (name, help, get) in lags {
        let mut family = enc.encode_descriptor(name, help, secs, MetricType::Gauge)?;
        for s in &r.standbys {
            if let Some(v) = get(s) {
                let labels = [("standby", s.name.as_str())];
                family.encode_family(&labels)?.encode_gauge(&v)?;
            }
        }
    }
    {
        let mut family = enc.encode_descriptor(
            "standby_sync",
            "1 if the standby counts for synchronous_standby_names now (sync_state sync or quorum).",
            None,
            MetricType::Gauge,
        )?;
        for s in &r.standbys {
            let labels = [("standby", s.name.as_str())];
            family
                .encode_family(&labels)?
                .encode_gauge(&(s.sync as u64))?;
        }
    }
    {
        let mut family = enc.encode_descriptor(
            "slot_restart_lsn",
            "WAL each replication slot keeps from (pg_replication_slots.restart_lsn).",
            bytes,
            MetricType::Gauge,
        )?;
        for (name, restart, _) in &r.slots {
            let labels = [("slot", name.as_str())];
            family.encode_family(&labels)?.encode_gauge(restart)?;
        }
    }
    {
        let mut family = enc.encode_descriptor(
            "slot_lost",
            "1 once the slot was invalidated (past max_slot_wal_keep_size): it holds no WAL.",
            None,
            MetricType::Gauge,
        )?;
        for (name, _, lost) in &r.slots {
            let labels = [("slot", name.as_str())];
            family
                .encode_family(&labels)?
                .encode_gauge(&(*lost as u64))?;
        }
    }
    let scalars: [(&str, Option<&Unit>, &str, Value); 6] = [
        ("standbys", None, "Standbys connected.", Gauge(r.standbys.len() as u64)),
        ("quorum_flush_lsn", bytes, "WAL durable on the quorum of synchronous_standby_names (what `on` commits wait for).", Gauge(r.quorum_flush_lsn)),
        ("quorum_lost", None, "1 while fewer standbys stream than synchronous_standby_names needs: commits at remote levels wait.", Gauge(r.quorum_lost as u64)),
        ("sync_commits_waiting", None, "Commits waiting for standbys now.", SignedGauge(r.commits_waiting)),
        ("sync_commits_degraded", None, "Commits acknowledged at local after synchronous_commit_timeout (action degrade).", Counter(r.commits_degraded)),
        ("sync_commits_indeterminate", None, "Commits answered INDETERMINATE (written, not confirmed at their level).", Counter(r.commits_indeterminate)),
    ];
    for (name, unit, help, value) in scalars {
        encode_series(enc, name, help, unit, value)?;
    }
    if let Some((received, flushed, replayed)) = r.receiver {
        let receiver: [(&str, &str, u64); 3] = [
            (
                "receiver_received_lsn",
                "On a standby: WAL received from the primary.",
                received,
            ),
            (
                "receiver_flushed_lsn",
                "On a standby: WAL received and durable.",
                flushed,
            ),
            (
                "receiver_replayed_lsn",
                "On a standby: WAL replayed into the page store.",
                replayed,
            ),
        ];
        for (name, help, v) in receiver {
            encode_series(enc, name, help, bytes, Gauge(v))?;
        }
    }
    Ok(())
}

fn encode_store(enc: &mut DescriptorEncoder, s: &StoreSnapshot) -> fmt::Result {
    use Value::*;
    {
        let mut family = enc.encode_descriptor(
            "checkpoints",
            "Checkpoints completed, by what started them (PostgreSQL's checkpoints_timed and checkpoints_req, split further).",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in s.checkpoints {
            family
                .encode_family(&[("reason", reason)])?
                .encode_counter::<NoLabelSet, u64, u64>(&n, None)?;
        }
    }
    let bytes = Some(&Unit::Bytes);
    let secs = Some(&Unit::Seconds);
    let series: [(&str, Option<&Unit>, &str, Value); 17] = [
        (
            "checkpoints_failed",
            None,
            "Checkpoints that failed (they are retried).",
            Counter(s.checkpoints_failed),
        ),
        (
            "checkpoint_in_progress",
            None,
            "1 while a checkpoint runs.",
            Gauge(s.checkpoint_in_progress as u64),
        ),
        (
            "checkpoint_buffers_written",
            None,
            "Pages written by checkpoints (buffers_checkpoint).",
            Counter(s.buffers_checkpoint),
        ),
        (
            "checkpoint_write",
            secs,
            "Time checkpoints spent writing pages, spread over checkpoint_completion_target.",
            FloatCounter(s.checkpoint_write_seconds),
        ),
        (
            "checkpoint_sync",
            secs,
            "Time checkpoints spent in fsync of data files.",
            FloatCounter(s.checkpoint_sync_seconds),
        ),
        (
            "checkpoint_lsn",
            bytes,
            "LSN of the latest checkpoint record.",
            Gauge(s.last_checkpoint_lsn),
        ),
        (
            "checkpoint_redo_lsn",
            bytes,
            "Redo LSN of the latest checkpoint: where crash recovery would start.",
            Gauge(s.last_redo_lsn),
        ),
        (
            "bgwriter_buffers_clean",
            None,
            "Pages written by the background writer (buffers_clean).",
            Counter(s.buffers_clean),
        ),
        (
            "bgwriter_maxwritten_clean",
            None,
            "Background writer rounds stopped by bgwriter_lru_maxpages (maxwritten_clean).",
            Counter(s.maxwritten_clean),
        ),
        (
            "buffers_alloc",
            None,
            "Buffer pool frames taken for a page not in the pool (buffers_alloc).",
            Counter(s.buffers_alloc),
        ),
        (
            "buffers_backend",
            None,
            "Dirty pages a foreground thread had to write to free a frame (buffers_backend).",
            Counter(s.buffers_backend),
        ),
        (
            "shared_buffers_pages",
            None,
            "Frames in the buffer pool (shared_buffers / 8kB).",
            Gauge(s.shared_buffers),
        ),
        (
            "page_writes",
            None,
            "Page writes logged and applied.",
            Counter(s.page_writes),
        ),
        (
            "page_images",
            None,
            "Page writes logged as full-page images (first change after a redo point).",
            Counter(s.page_images),
        ),
        (
            "page_image",
            bytes,
            "WAL payload bytes of full-page images (after lz4 when wal_compression = lz4).",
            Counter(s.page_image_bytes),
        ),
        (
            "page_reads",
            None,
            "Pages read by clients.",
            Counter(s.page_reads),
        ),
        (
            "page_device_reads",
            None,
            "Pages read from the data device into the buffer pool.",
            Counter(s.page_device_reads),
        ),
    ];
    for (name, unit, help, value) in series {
        encode_series(enc, name, help, unit, value)?;
    }
    Ok(())
}

const HELP_INSERT_LSN: &str = "Next LSN to be handed out (a byte position in the WAL stream).";
const HELP_WRITE_LSN: &str = "WAL below this LSN is written to the kernel, maybe not yet durable.";
const HELP_FLUSH_LSN: &str = "WAL below this LSN is durable.";
const HELP_RECORDS: &str = "Records appended since the WAL was opened.";
const HELP_BYTES_APPENDED: &str =
    "WAL bytes appended since the WAL was opened, headers included: rate() is the LSN rate.";
const HELP_SYNCS: &str = "fsync/fdatasync calls on WAL segments, plus batches of O_DSYNC writes.";
const HELP_WRITES: &str = "Writes to WAL segment files.";
const HELP_WRITE_BYTES: &str =
    "Bytes written to WAL segment files, in whole blocks (a partial tail block is rewritten).";
const HELP_FLUSH_DURATION: &str =
    "Time to make one batch of WAL durable, from its first write to durable (write plus sync).";
const HELP_FLUSH_BYTES: &str = "WAL made durable per flush, in LSN bytes.";
const HELP_GROUP_SIZE: &str =
    "Records per flush (approximate: records inserted between the flusher's readings).";
const HELP_COMMIT_WAIT: &str =
    "Time from a request's arrival to its acknowledgement, by durability level.";
const HELP_RING_FULL: &str =
    "Times an appender waited for space in the WAL ring (wal_buffers full of unflushed WAL).";
const HELP_SEG_CREATED: &str = "WAL segment files created (zero-filled or allocated).";
const HELP_SEG_BY_FLUSHER: &str =
    "WAL segments the flusher created itself, none being ready (each stalls a flush).";
const HELP_SEG_RECYCLED: &str = "WAL segments recycled by rename for reuse.";
const HELP_SEG_REMOVED: &str = "WAL segments removed.";
const HELP_CONNECTIONS: &str = "Client connections open now.";
const HELP_ERRORS: &str = "Requests or connections that ended in an error, by kind.";

/// One unlabelled series' value at a scrape.
enum Value<'a> {
    Gauge(u64),
    /// A count that a bug could drive below zero: shown, not hidden.
    SignedGauge(i64),
    Counter(u64),
    FloatCounter(f64),
    /// Values per exported unit (see [`encode_histogram`]).
    Histogram(&'a HistogramSnapshot, f64),
}

fn encode_series(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: Value,
) -> fmt::Result {
    let kind = match value {
        Value::Gauge(_) | Value::SignedGauge(_) => MetricType::Gauge,
        Value::Counter(_) | Value::FloatCounter(_) => MetricType::Counter,
        Value::Histogram(..) => MetricType::Histogram,
    };
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    match value {
        Value::Gauge(v) => m.encode_gauge(&v),
        Value::SignedGauge(v) => m.encode_gauge(&v),
        Value::Counter(v) => m.encode_counter::<NoLabelSet, u64, u64>(&v, None),
        Value::FloatCounter(v) => m.encode_counter::<NoLabelSet, f64, u64>(&v, None),
        Value::Histogram(h, per_unit) => encode_histogram(&mut m, h, per_unit),
    }
}

/// `per_unit`: recorded values per exported unit (1e9 for ns as seconds).
/// Dividing (not multiplying by 1e-9) keeps bounds such as 0.00002 exact in text.
fn encode_histogram(m: &mut MetricEncoder, h: &HistogramSnapshot, per_unit: f64) -> fmt::Result {
    let mut buckets: Vec<(f64, u64)> = h
        .bounds
        .iter()
        .zip(&h.counts)
        .map(|(&b, &n)| (b as f64 / per_unit, n))
        .collect();
    let overflow = h.counts.get(h.bounds.len()).copied().unwrap_or(0);
    buckets.push((f64::INFINITY, overflow));
    m.encode_histogram::<NoLabelSet>(h.sum as f64 / per_unit, h.count(), &buckets, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_places_values_by_inclusive_upper_bound() {
        let h = AtomicHistogram::new(&[10, 20, 40]);
        for v in [0, 10, 11, 20, 21, 40, 41, u64::MAX / 2] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.bounds, vec![10, 20, 40]);
        // <=10: 0, 10 | <=20: 11, 20 | <=40: 21, 40 | +Inf: 41, huge
        assert_eq!(s.counts, vec![2, 2, 2, 2]);
        assert_eq!(s.count(), 8);
        assert_eq!(s.sum, 10 + 11 + 20 + 21 + 40 + 41 + u64::MAX / 2);
    }

    #[test]
    #[should_panic(expected = "strictly ascending")]
    fn histogram_rejects_unsorted_bounds() {
        AtomicHistogram::new(&[10, 10]);
    }

    #[test]
    fn histogram_sums_correctly_from_four_threads() {
        let h = Arc::new(AtomicHistogram::new(FLUSH_DURATION_BOUNDS_NS));
        const PER_THREAD: u64 = 200_000;
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let h = Arc::clone(&h);
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        // Spread over every bucket, overflow included.
                        h.observe((i * 7919 + t) % 2_000_000_000);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 4 * PER_THREAD);
        let want_sum: u64 = (0..4u64)
            .flat_map(|t| (0..PER_THREAD).map(move |i| (i * 7919 + t) % 2_000_000_000))
            .sum();
        assert_eq!(s.sum, want_sum);
        // The same values observed on one thread land in the same buckets.
        let one = AtomicHistogram::new(FLUSH_DURATION_BOUNDS_NS);
        for t in 0..4u64 {
            for i in 0..PER_THREAD {
                one.observe((i * 7919 + t) % 2_000_000_000);
            }
        }
        assert_eq!(one.snapshot(), s);
    }

    #[test]
    fn commit_wait_and_errors_are_recorded_by_name() {
        let m = Metrics::new();
        m.observe_commit_wait("local", 0.000_150);
        m.observe_commit_wait("local", 0.002);
        m.observe_commit_wait("off", -1.0);
        let local = m.commit_wait("local").unwrap();
        assert_eq!(local.count(), 2);
        assert_eq!(local.sum, 2_150_000);
        assert_eq!(m.commit_wait("off").unwrap().counts[0], 1);
        assert_eq!(m.commit_wait("on").unwrap().count(), 0);
        m.error("auth");
        m.error("no such kind");
        assert_eq!((m.errors("auth"), m.errors("other")), (1, 1));
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        assert_eq!(m.connections(), 1);
    }

    #[test]
    fn encodes_every_series_with_live_values() {
        let m = Arc::new(Metrics::new());
        m.observe_commit_wait("on", 0.001);
        let wal = Arc::new(|| WalSnapshot {
            flush_lsn: 4096,
            records_appended: 3,
            flush_duration: HistogramSnapshot {
                bounds: vec![20_000],
                counts: vec![1, 2],
                sum: 70_000,
            },
            ..WalSnapshot::default()
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry(m, wal)).unwrap();
        for line in [
            "walden_flush_lsn_bytes 4096",
            "walden_records_appended_total 3",
            "walden_flush_duration_seconds_count 3",
            "walden_flush_duration_seconds_bucket{le=\"0.00002\"} 1",
            "walden_flush_duration_seconds_bucket{le=\"+Inf\"} 3",
            "walden_commit_wait_seconds_count{level=\"on\"} 1",
            "walden_flush_bytes_bucket{le=\"+Inf\"} 0",
            "walden_errors_total{kind=\"bad_frame\"} 0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let om = "# HELP walden_x Help.\n# TYPE walden_x counter\nwalden_x_total 1\n\
                  # HELP walden_y_bytes Y.\n# TYPE walden_y_bytes gauge\n# UNIT walden_y_bytes bytes\nwalden_y_bytes 2\n\
                  # TYPE walden_z unknown\nwalden_z 3\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# HELP walden_x_total Help.\n# TYPE walden_x_total counter\nwalden_x_total 1\n\
             # HELP walden_y_bytes Y.\n# TYPE walden_y_bytes gauge\nwalden_y_bytes 2\n\
             # TYPE walden_z untyped\nwalden_z 3\n"
        );
    }

    #[test]
    fn accept_header_picks_the_format() {
        use Format::*;
        for (accept, want) in [
            // curl, wget, a browser, a proxy: the text format promtool reads.
            ("", PrometheusText),
            ("*/*", PrometheusText),
            ("text/html,application/xhtml+xml,*/*;q=0.8", PrometheusText),
            ("text/plain", PrometheusText),
            ("text/plain;version=0.0.4", PrometheusText),
            // Prometheus 2.x's scrape header.
            (
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                OpenMetrics,
            ),
            ("application/openmetrics-text", OpenMetrics),
            ("Application/OpenMetrics-Text; version=\"1.0.0\"; charset=utf-8", OpenMetrics),
            // q decides, not the order.
            (
                "text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0",
                OpenMetrics,
            ),
            (
                "application/openmetrics-text;q=0.3, text/plain;q=0.9",
                PrometheusText,
            ),
            // Refused, or a version walden does not speak: the default.
            ("application/openmetrics-text;q=0", PrometheusText),
            ("application/openmetrics-text;version=2.0.0", PrometheusText),
            (
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited",
                PrometheusText,
            ),
        ] {
            assert_eq!(negotiate(accept), want, "Accept: {accept}");
        }
    }
}
