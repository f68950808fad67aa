//! The HTTP endpoint over a real WAL: /metrics carries every series with the
//! WAL's live figures, histograms are well formed, /status returns the
//! server's JSON, anything else is 404; `promtool check metrics` accepts a
//! scrape made as its docs teach (`curl -s HOST/metrics`, no Accept header),
//! and a real Prometheus server (which asks for OpenMetrics) scrapes it and
//! answers a `rate()` query over it.
//!
//! promtool and prometheus come from Debian's `prometheus` package. Without
//! them on PATH those two tests fail, unless WALDEN_SKIP_PROMTOOL=1.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use walden::config::{Millis, Size};
use walden::metrics::{Metrics, WalSnapshot, COMMIT_LEVELS, ERROR_KINDS};
use walden::{Config, Durability, Kind, Wal};

const RECORDS: u64 = 300;

/// The Accept header Prometheus 2.x sends with every scrape.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Every series /metrics must carry (sample names; histograms by `_count`).
const SERIES: &[&str] = &[
    "walden_insert_lsn_bytes",
    "walden_write_lsn_bytes",
    "walden_flush_lsn_bytes",
    "walden_records_appended_total",
    "walden_bytes_appended_total",
    "walden_wal_syncs_total",
    "walden_wal_writes_total",
    "walden_wal_write_bytes_total",
    "walden_flush_duration_seconds_count",
    "walden_flush_bytes_count",
    "walden_group_commit_size_count",
    "walden_commit_wait_seconds_count",
    "walden_ring_full_waits_total",
    "walden_segments_created_total",
    "walden_segments_recycled_total",
    "walden_segments_removed_total",
    "walden_connections",
    "walden_errors_total",
];

struct Fixture {
    _dir: tempfile::TempDir,
    wal: Arc<Wal>,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    http: Option<JoinHandle<()>>,
    status_json: String,
}

impl Fixture {
    /// A WAL with RECORDS appended and flushed (Local), and the endpoint on
    /// 127.0.0.1:0.
    fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::with_data_directory(dir.path());
        cfg.wal_segment_size = Size(1 << 20);
        cfg.wal_writer_delay = Millis(10);
        let wal = Arc::new(Wal::open(cfg).unwrap());
        let mut end = wal.insert_lsn();
        for i in 0..RECORDS {
            let payload = vec![i as u8; 10 + (i as usize * 37) % 3000];
            end = wal.append(Kind::DATA, &payload).unwrap().end;
            if i % 50 == 49 {
                wal.wait(end, Durability::Local).unwrap();
            }
        }
        wal.wait(end, Durability::Local).unwrap();

        let metrics = Arc::new(Metrics::new());
        for i in 0..RECORDS {
            metrics.observe_commit_wait("local", 50e-6 + i as f64 * 1e-6);
        }
        metrics.observe_commit_wait("off", 2e-6);
        metrics.connection_opened();
        metrics.connection_opened();
        metrics.connection_closed();
        metrics.error("bad_frame");
        metrics.error("not a kind");

        let status_json = format!(r#"{{"flush_lsn":"{}","shards":[]}}"#, wal.flush_lsn());
        let status = {
            let json = status_json.clone();
            Arc::new(move || json.clone())
        };
        let snapshot = {
            let wal = Arc::clone(&wal);
            Arc::new(move || wal.metrics_snapshot())
        };
        let (addr, http) = metrics
            .serve("127.0.0.1:0".parse().unwrap(), status, snapshot)
            .unwrap();
        assert_ne!(addr.port(), 0);
        Fixture {
            _dir: dir,
            wal,
            metrics,
            addr,
            http: Some(http),
            status_json,
        }
    }

    fn get(&self, path: &str, accept: Option<&str>) -> Response {
        http(self.addr, "GET", path, accept)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.metrics.shutdown();
        if let Some(h) = self.http.take() {
            h.join().unwrap();
        }
    }
}

struct Response {
    code: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// A plain HTTP/1.0 request (the server closes the connection after it).
fn http(addr: SocketAddr, method: &str, path: &str, accept: Option<&str>) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rq = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(a) = accept {
        rq.push_str(&format!("Accept: {a}\r\n"));
    }
    rq.push_str("\r\n");
    s.write_all(rq.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .expect("a complete HTTP response");
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Response {
        code,
        headers,
        body: body.to_string(),
    }
}

/// Sample lines as (name, labels, value), comments skipped.
fn samples(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            };
            (name.to_string(), labels.to_string(), value)
        })
        .collect()
}

fn value(samples: &[(String, String, f64)], name: &str, labels: &str) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| n == name && l == labels)
        .unwrap_or_else(|| panic!("no sample {name}{{{labels}}}"))
        .2
}

/// Checks every histogram: buckets cumulative and ascending in `le`, the
/// `+Inf` bucket equal to `_count`. Returns how many series it checked.
fn check_histograms(samples: &[(String, String, f64)]) -> usize {
    // (family, labels without le) -> [(le, count)]
    let mut buckets: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    for (name, labels, v) in samples {
        if let Some(family) = name.strip_suffix("_bucket") {
            let mut le = None;
            let rest: Vec<&str> = labels
                .split(',')
                .filter(|kv| match kv.strip_prefix("le=") {
                    Some(b) => {
                        le = Some(match b.trim_matches('"') {
                            "+Inf" => f64::INFINITY,
                            b => b.parse::<f64>().unwrap(),
                        });
                        false
                    }
                    None => true,
                })
                .collect();
            buckets
                .entry((family.to_string(), rest.join(",")))
                .or_default()
                .push((le.expect("a bucket without le"), *v));
        }
    }
    for ((family, labels), b) in &buckets {
        assert!(
            b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{family}{{{labels}}}: buckets not cumulative: {b:?}"
        );
        let (last_le, last) = *b.last().unwrap();
        assert_eq!(
            last_le,
            f64::INFINITY,
            "{family}{{{labels}}} has no +Inf bucket"
        );
        assert_eq!(
            last,
            value(samples, &format!("{family}_count"), labels),
            "{family}{{{labels}}}: +Inf bucket != _count"
        );
    }
    buckets.len()
}

#[test]
fn metrics_endpoint_exports_the_live_wal() {
    let f = Fixture::start();
    let r = f.get("/metrics", Some(PROMETHEUS_ACCEPT));
    assert_eq!(r.code, 200);
    assert_eq!(
        r.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        r.body.ends_with("# EOF\n"),
        "no # EOF at the end:\n{}",
        r.body
    );
    let s = samples(&r.body);
    for name in SERIES {
        assert!(
            s.iter().any(|(n, _, _)| n == name),
            "no series {name} in\n{}",
            r.body
        );
    }
    // Nothing was appended since the wait: the gauges are exact.
    let flush = f.wal.flush_lsn().0 as f64;
    assert_eq!(value(&s, "walden_flush_lsn_bytes", ""), flush);
    assert_eq!(value(&s, "walden_write_lsn_bytes", ""), flush);
    assert_eq!(
        value(&s, "walden_insert_lsn_bytes", ""),
        f.wal.insert_lsn().0 as f64
    );
    assert_eq!(
        value(&s, "walden_bytes_appended_total", ""),
        (f.wal.insert_lsn().0 - f.wal.opened_at().0) as f64
    );
    assert_eq!(
        value(&s, "walden_records_appended_total", ""),
        RECORDS as f64
    );
    assert!(value(&s, "walden_wal_syncs_total", "") >= 1.0);
    assert!(value(&s, "walden_wal_write_bytes_total", "") >= flush - f.wal.opened_at().0 as f64);

    // Flush histograms: as many flushes as the WAL counted; flush bytes add
    // up to the LSN advance; group sizes to the records, less at most the
    // last one (its slot counts it just after marking it copied, so the
    // flusher may write it before it sees it counted).
    let flushes = f
        .wal
        .stats()
        .flushes
        .load(std::sync::atomic::Ordering::Relaxed) as f64;
    assert!(flushes >= 1.0);
    assert_eq!(
        value(&s, "walden_flush_duration_seconds_count", ""),
        flushes
    );
    assert!(value(&s, "walden_flush_duration_seconds_sum", "") > 0.0);
    let grouped = value(&s, "walden_group_commit_size_sum", "");
    assert!(
        grouped == RECORDS as f64 || grouped == RECORDS as f64 - 1.0,
        "group sizes add up to {grouped}, not {RECORDS}"
    );
    assert_eq!(
        value(&s, "walden_flush_bytes_sum", ""),
        (f.wal.flush_lsn().0 - f.wal.opened_at().0) as f64
    );
    // 20 us to 1 s, in seconds.
    assert!(s
        .iter()
        .any(|(n, l, _)| n == "walden_flush_duration_seconds_bucket" && l == "le=\"0.00002\""));
    assert!(s
        .iter()
        .any(|(n, l, _)| n == "walden_flush_duration_seconds_bucket" && l == "le=\"1.0\""));

    // Commit wait by level, every level present.
    for level in COMMIT_LEVELS {
        let labels = format!("level=\"{level}\"");
        let want = match level {
            "local" => RECORDS as f64,
            "off" => 1.0,
            _ => 0.0,
        };
        assert_eq!(value(&s, "walden_commit_wait_seconds_count", &labels), want);
    }
    let sum = value(&s, "walden_commit_wait_seconds_sum", "level=\"local\"");
    let want: f64 = (0..RECORDS).map(|i| 50e-6 + i as f64 * 1e-6).sum();
    assert!(
        (sum - want).abs() < 1e-6,
        "commit wait sum {sum}, want {want}"
    );

    assert_eq!(check_histograms(&s), 3 + COMMIT_LEVELS.len());

    assert_eq!(value(&s, "walden_connections", ""), 1.0);
    for kind in ERROR_KINDS {
        let want = match kind {
            "bad_frame" | "other" => 1.0,
            _ => 0.0,
        };
        assert_eq!(
            value(&s, "walden_errors_total", &format!("kind=\"{kind}\"")),
            want
        );
    }

    // A scrape reads the live atomics: a new append shows at once.
    let a = f.wal.append(Kind::DATA, b"one more").unwrap();
    f.wal.wait(a.end, Durability::Local).unwrap();
    f.metrics.connection_closed();
    let s = samples(&f.get("/metrics?x=1", None).body);
    assert_eq!(
        value(&s, "walden_records_appended_total", ""),
        RECORDS as f64 + 1.0
    );
    assert_eq!(
        value(&s, "walden_flush_lsn_bytes", ""),
        f.wal.flush_lsn().0 as f64
    );
    assert_eq!(value(&s, "walden_connections", ""), 0.0);
}

#[test]
fn status_is_the_servers_json_and_anything_else_is_404() {
    let f = Fixture::start();
    let r = f.get("/status", None);
    assert_eq!(r.code, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.body, f.status_json);
    for path in ["/", "/metricsx", "/status/", "/favicon.ico"] {
        assert_eq!(f.get(path, None).code, 404, "{path}");
    }
    assert_eq!(http(f.addr, "POST", "/metrics", None).code, 404);
    assert_eq!(http(f.addr, "DELETE", "/status", None).code, 404);
}

#[test]
fn shutdown_stops_the_thread_and_closes_the_port() {
    let mut f = Fixture::start();
    assert_eq!(f.get("/metrics", None).code, 200);
    f.metrics.shutdown();
    f.http.take().unwrap().join().unwrap();
    // The listener closes once the thread has dropped the server.
    let mut closed = false;
    for _ in 0..100 {
        if TcpStream::connect(f.addr).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        closed,
        "{} still accepts connections after shutdown",
        f.addr
    );
    // And the endpoint can be started again.
    let (addr, h) = f
        .metrics
        .serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|| "{}".to_string()),
            Arc::new(WalSnapshot::default),
        )
        .unwrap();
    assert_eq!(http(addr, "GET", "/status", None).body, "{}");
    f.http = Some(h);
}

#[test]
fn commit_levels_are_the_durability_names() {
    let names: Vec<&str> = Durability::ALL.iter().map(|d| d.name()).collect();
    assert_eq!(names, COMMIT_LEVELS);
}

/// A scrape without an Accept header (curl, as Prometheus' docs pipe it into
/// promtool) gets the Prometheus text format 0.0.4, with the same samples as
/// the OpenMetrics one Prometheus asks for, and `promtool check metrics`
/// finds no problem in it. (promtool 2.x reads only that format: fed the
/// OpenMetrics text, it reports every counter as `no help text`.)
#[test]
fn promtool_accepts_a_scrape_without_accept() {
    let f = Fixture::start();
    let text = f.get("/metrics", None);
    assert_eq!(text.code, 200);
    assert_eq!(
        text.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(!text.body.contains("# EOF") && !text.body.contains("# UNIT"));
    for line in [
        "# HELP walden_records_appended_total Records appended since the WAL was opened.",
        "# TYPE walden_records_appended_total counter",
        "# TYPE walden_wal_write_bytes_total counter",
        "# TYPE walden_flush_lsn_bytes gauge",
        "# TYPE walden_flush_duration_seconds histogram",
        "# TYPE walden_errors_total counter",
    ] {
        assert!(
            text.body.lines().any(|l| l == line),
            "no line {line:?} in\n{}",
            text.body
        );
    }
    // Asked for by name, the same.
    let named = f.get("/metrics", Some("text/plain;version=0.0.4"));
    assert_eq!(named.headers["content-type"], text.headers["content-type"]);

    let om = f.get("/metrics", Some(PROMETHEUS_ACCEPT));
    assert_eq!(
        om.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(om
        .body
        .contains("# TYPE walden_records_appended counter\nwalden_records_appended_total "));
    let names = |body: &str| -> Vec<(String, String)> {
        samples(body).into_iter().map(|(n, l, _)| (n, l)).collect()
    };
    assert_eq!(names(&om.body), names(&text.body));

    if !tools_on_path(&["promtool"]) {
        return;
    }
    let out = promtool_check(&text.body);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics failed ({}):\n{}{}\non:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        text.body
    );
}

/// A real Prometheus server scrapes the endpoint every second (asking for
/// OpenMetrics, which it parses with its own parser) and answers
/// `rate(walden_bytes_appended_total[10s])` with the rate of a WAL being
/// appended to. Its metadata carries the help text, and the `# UNIT`, which
/// only the OpenMetrics format has.
#[test]
fn a_prometheus_server_scrapes_and_queries_the_endpoint() {
    if !tools_on_path(&["prometheus"]) {
        return;
    }
    let f = Fixture::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: walden\n    static_configs:\n      - targets: [\"{}\"]\n",
            f.addr
        ),
    )
    .unwrap();
    // A free port: taken, then let go for Prometheus to bind.
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = dir.path().join("prometheus.log");
    let prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run prometheus"),
    );

    // The WAL grows while Prometheus scrapes.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let appender = {
        let (wal, stop) = (Arc::clone(&f.wal), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let a = wal.append(Kind::DATA, &[7u8; 1000]).unwrap();
                wal.wait(a.end, Durability::Local).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let api = |path: &str| -> Option<serde_json::Value> {
        let r = try_http(web, path)?;
        serde_json::from_str(&r.body).ok()
    };
    let t = std::time::Instant::now();
    let rate = loop {
        let answer = api("/api/v1/query?query=rate%28walden_bytes_appended_total%5B10s%5D%29");
        let value = answer.as_ref().and_then(|v| {
            v["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        });
        if let Some(rate) = value.filter(|r| *r > 0.0) {
            break rate;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no rate from Prometheus after 60 s; last answer {answer:?}; targets {:?}; log:\n{}",
            api("/api/v1/targets"),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    appender.join().unwrap();
    // About 1000 bytes per 20 ms; only sure to be well above zero.
    assert!(rate > 1000.0, "rate(walden_bytes_appended_total) = {rate}");

    let targets = api("/api/v1/targets").unwrap();
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{targets}");
    assert_eq!(target["lastError"], "", "{targets}");
    let meta = api("/api/v1/metadata?metric=walden_flush_lsn_bytes").unwrap();
    assert_eq!(
        meta["data"]["walden_flush_lsn_bytes"][0],
        serde_json::json!({"type": "gauge", "help": "WAL below this LSN is durable.", "unit": "bytes"}),
        "{meta}"
    );
    drop(prometheus);
}

/// Kills and reaps the child when dropped (a failing test included).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A GET that gives up (None) on a refused connection or a cut answer:
/// Prometheus may not be listening yet.
fn try_http(addr: SocketAddr, path: &str) -> Option<Response> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.lines().next()?.split(' ').nth(1)?.parse().ok()?;
    Some(Response {
        code,
        headers: BTreeMap::new(),
        body: body.to_string(),
    })
}

/// True when every program is on PATH; false (the test skips) when one is
/// missing and WALDEN_SKIP_PROMTOOL=1; otherwise panics.
fn tools_on_path(programs: &[&str]) -> bool {
    let Some(missing) = programs.iter().find(|p| !on_path(p)) else {
        return true;
    };
    if std::env::var("WALDEN_SKIP_PROMTOOL").as_deref() == Ok("1") {
        eprintln!("{missing} not on PATH; skipped (WALDEN_SKIP_PROMTOOL=1)");
        return false;
    }
    panic!(
        "{missing} is not on PATH: install it (Debian: apt-get install -y prometheus), \
         or set WALDEN_SKIP_PROMTOOL=1 to skip this check"
    );
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| Path::new(&d).join(program).is_file())
    })
}

fn promtool_check(body: &str) -> std::process::Output {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
