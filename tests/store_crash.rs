//! Crash recovery of the page store with real processes: a child (`walden
//! store-child`) mixes client records and page writes from several threads;
//! we SIGKILL it at random moments (sometimes while it is still recovering
//! from the last kill), and check that
//! - every page equals the model built from the acknowledged writes (plus,
//!   at most, the one write per page that was in flight at the kill);
//! - no page fails its checksum, on the data device or when read;
//! - every acknowledged record still in the retained WAL is there, byte for byte;
//! - a page torn on disk after a crash is repaired from its full-page image,
//!   and with full_page_writes off the same damage is reported by name.
//!
//! Cycles vary the sync method, wal_compression, the pool size (evicting or
//! not) and the number of redo workers (1 to 3).
//!
//! `WALDEN_STORE_CRASH_CYCLES=N` runs more cycles (default 24);
//! `WALDEN_CRASH_SEED` replays a failing run.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walden::io::PAGE_SIZE;
use walden::store::control::ClusterState;
use walden::store::page::{self, PageTag, PAGE_DATA};
use walden::testkit::payload;
use walden::{Config, Lsn, Store};

type Key = (u32, u32);

#[derive(Clone, Copy, Debug)]
struct Write {
    off: usize,
    len: usize,
    seed: u64,
}

#[derive(Default)]
struct Model {
    pages: BTreeMap<Key, Vec<u8>>,
    /// A write issued but not acknowledged when the child died: it may or
    /// may not have survived.
    pending: HashMap<Key, Write>,
    acks: Vec<(Lsn, usize, u64)>,
    page_acks: u64,
}

impl Model {
    fn page(&self, k: Key) -> Vec<u8> {
        self.pages
            .get(&k)
            .cloned()
            .unwrap_or_else(|| vec![0; PAGE_DATA])
    }

    fn with(&self, k: Key, w: Write) -> Vec<u8> {
        let mut p = self.page(k);
        p[w.off..w.off + w.len].copy_from_slice(&payload(w.seed, w.len));
        p
    }

    /// The page as found after recovery must be the model, or the model plus
    /// the pending write (which then becomes history).
    fn resolve(&mut self, k: Key, found: &[u8], what: &str) {
        let now = self.page(k);
        if found == now.as_slice() {
            self.pending.remove(&k);
            return;
        }
        if let Some(w) = self.pending.remove(&k) {
            let alt = self.with(k, w);
            if found == alt.as_slice() {
                self.pages.insert(k, alt);
                return;
            }
        }
        let diff = now.iter().zip(found).position(|(a, b)| a != b);
        panic!("{what}: page {k:?} differs from every acknowledged history (first difference at data byte {diff:?})");
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const SETTINGS: [&str; 13] = [
    // Checkpoints release and recycle WAL (the default keeps 1GB).
    "wal_keep_size=0",
    "wal_segment_size=1MB",
    "wal_buffers=1MB",
    "max_record_size=64kB",
    "min_wal_size=2MB",
    "max_wal_size=6MB",
    "shared_buffers=256kB",
    "checkpoint_timeout=1s",
    "checkpoint_completion_target=0.5",
    "bgwriter_delay=20ms",
    "bgwriter_lru_maxpages=20",
    "checkpoint_warning=0",
    "log_checkpoints=false",
];

fn cycle_settings(cycle: u64) -> Vec<String> {
    let mut s: Vec<String> = SETTINGS.iter().map(|s| s.to_string()).collect();
    let method = ["open_datasync", "fdatasync"][cycle as usize % 2];
    s.push(format!("wal_sync_method={method}"));
    let compression = if cycle % 3 == 1 { "lz4" } else { "off" };
    s.push(format!("wal_compression={compression}"));
    // Half the cycles keep every page in memory with no background writer,
    // so only checkpoints write pages; the others evict all the time.
    if cycle % 4 >= 2 {
        s.push("shared_buffers=4MB".into());
        s.push("bgwriter_lru_maxpages=0".into());
    }
    // Redo on 1, 2 or 3 worker threads: each page's records must be applied
    // in order whichever worker owns it.
    s.push(format!("recovery_workers={}", 1 + cycle % 3));
    s
}

fn config(dir: &Path, settings: &[String]) -> Config {
    let mut cfg = Config::with_data_directory(dir);
    for s in settings {
        cfg.set(s).unwrap();
    }
    cfg
}

fn spawn_child(dir: &Path, settings: &[String], extra: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walden"));
    cmd.args(["store-child", "-D"]).arg(dir).args(extra);
    for s in settings {
        cmd.args(["-c", s]);
    }
    cmd.env("WALDEN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn walden store-child")
}

/// Opens the store in this process (crash recovery), checks every page and
/// every acknowledged record, closes it cleanly, and checks the checksum of
/// every page on the data device.
fn verify_in_process(dir: &Path, settings: &[String], m: &mut Model, what: &str) {
    let store = Store::open(config(dir, settings))
        .unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    assert_eq!(store.control().state, ClusterState::InProduction);
    let mut keys: Vec<Key> = m.pages.keys().copied().collect();
    keys.extend(m.pending.keys().copied());
    keys.sort();
    keys.dedup();
    for k in keys {
        let p = store
            .read_page(k.0, k.1)
            .unwrap_or_else(|e| panic!("{what}: reading page {k:?}: {e}"));
        m.resolve(k, &p.data, what);
    }
    assert!(m.pending.is_empty());
    store.close().unwrap();
    let c = walden::store::control::read(&dir.join("data"))
        .unwrap()
        .unwrap();
    assert_eq!(c.state, ClusterState::ShutDown);
    // Every page on the data device carries a valid checksum after the
    // shutdown checkpoint.
    let base = dir.join("data/base");
    let mut pages = 0;
    for entry in std::fs::read_dir(&base).unwrap() {
        let entry = entry.unwrap();
        let rel: u32 = entry.file_name().to_str().unwrap().parse().unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        assert_eq!(bytes.len() % PAGE_SIZE, 0);
        for (block, p) in bytes.chunks(PAGE_SIZE).enumerate() {
            page::verify(p, PageTag::new(rel, block as u32), true)
                .unwrap_or_else(|e| panic!("{what}: on disk: {e}"));
            if !page::is_new(p) {
                let k = (rel, block as u32);
                assert_eq!(
                    page::data(p),
                    m.page(k).as_slice(),
                    "{what}: page {k:?} on disk"
                );
                pages += 1;
            }
        }
    }
    eprintln!("{what}: verified {pages} pages on disk");
}

/// With the child dead and before anything recovers: every acknowledged
/// record at or after the retained WAL's start is there, byte for byte.
/// (Records before it were released by a checkpoint.) Returns how many.
fn check_records(dir: &Path, m: &Model, what: &str) -> usize {
    let wal_dir = dir.join("wal");
    let start = walden::wal::segments::read_wal_start(&wal_dir)
        .unwrap()
        .unwrap();
    let mut r =
        walden::wal::reader::WalReader::new(&wal_dir, 1 << 20, walden::wal::TIMELINE, start, None);
    let mut records = HashMap::new();
    while let Some(rec) = r.next_record().unwrap() {
        if rec.kind == walden::Kind::DATA {
            records.insert(rec.lsn, rec.payload.to_vec());
        }
    }
    let mut checked = 0;
    for &(lsn, len, seed) in m.acks.iter().filter(|a| a.0 >= start) {
        let got = records.get(&lsn).unwrap_or_else(|| {
            panic!(
                "{what}: acknowledged record at {lsn} is missing (WAL from {start} to {})",
                r.position()
            )
        });
        assert!(
            got == &payload(seed, len),
            "{what}: record at {lsn} differs"
        );
        checked += 1;
    }
    checked
}

#[test]
fn kill_9_under_records_and_page_writes_loses_nothing_acknowledged() {
    let cycles = env_u64("WALDEN_STORE_CRASH_CYCLES", 24);
    assert!(
        cycles > 0,
        "WALDEN_STORE_CRASH_CYCLES=0 would check nothing"
    );
    let seed = env_u64(
        "WALDEN_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("store crash test: {cycles} cycles, WALDEN_CRASH_SEED={seed}");
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let dir = tempfile::tempdir().unwrap();
    let pending_file = dir.path().join("pending.txt");
    let mut m = Model::default();
    let mut kills_before_start = 0;
    let mut records_checked = 0;

    for cycle in 0..cycles {
        let what = format!("cycle {cycle} (seed {seed})");
        let settings = cycle_settings(cycle);
        let list: String = m
            .pending
            .keys()
            .map(|(r, b)| format!("{r} {b}\n"))
            .collect();
        std::fs::write(&pending_file, list).unwrap();
        let mut child = spawn_child(
            dir.path(),
            &settings,
            &[
                "--threads",
                "3",
                "--blocks",
                "90",
                "--rels",
                "2",
                "--seed",
                &(cycle + 1).to_string(),
                "--resolve",
                pending_file.to_str().unwrap(),
            ],
        );
        let stdout = child.stdout.take().unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                // Only complete lines count: a line cut by the kill was not printed.
                if line.ends_with('\n') {
                    if line.starts_with("start ") {
                        let _ = started_tx.send(());
                    }
                    lines.push(line.trim_end().to_string());
                }
                line.clear();
            }
            lines
        });
        let began = Instant::now();
        if cycle % 6 == 5 {
            // Kill it while it may still be recovering.
            std::thread::sleep(Duration::from_millis(next() % 150));
        } else {
            if started_rx.recv_timeout(Duration::from_secs(60)).is_err() {
                let _ = child.kill();
                panic!("{what}: the child did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100 + next() % 500));
        }
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        let lines = reader.join().unwrap();
        let mut started = false;
        let (mut pages, mut acks) = (0, 0);
        for l in &lines {
            let f: Vec<&str> = l.split(' ').collect();
            match f[0] {
                "state" => {
                    let k: Key = (f[1].parse().unwrap(), f[2].parse().unwrap());
                    let crc = u32::from_str_radix(f[3], 16).unwrap();
                    let now = m.page(k);
                    if crc32c::crc32c(&now) == crc {
                        m.pending.remove(&k);
                    } else {
                        let w = *m.pending.get(&k).unwrap_or_else(|| {
                            panic!("{what}: page {k:?} changed with no write in doubt")
                        });
                        let alt = m.with(k, w);
                        assert_eq!(
                            crc32c::crc32c(&alt),
                            crc,
                            "{what}: page {k:?} after recovery matches no acknowledged history"
                        );
                        m.pages.insert(k, alt);
                        m.pending.remove(&k);
                    }
                }
                "start" => {
                    started = true;
                    assert!(
                        m.pending.is_empty(),
                        "{what}: unresolved pages after recovery"
                    );
                }
                "begin" => {
                    let k: Key = (f[1].parse().unwrap(), f[2].parse().unwrap());
                    let w = Write {
                        off: f[3].parse().unwrap(),
                        len: f[4].parse().unwrap(),
                        seed: f[5].parse().unwrap(),
                    };
                    assert!(
                        m.pending.insert(k, w).is_none(),
                        "{what}: two writes in flight on {k:?}"
                    );
                }
                "page" => {
                    let k: Key = (f[1].parse().unwrap(), f[2].parse().unwrap());
                    let w = m.pending.remove(&k).expect("begin before page");
                    let new = m.with(k, w);
                    m.pages.insert(k, new);
                    m.page_acks += 1;
                    pages += 1;
                }
                "ack" => {
                    m.acks.push((
                        f[1].parse().unwrap(),
                        f[2].parse().unwrap(),
                        f[3].parse().unwrap(),
                    ));
                    acks += 1;
                }
                other => panic!("{what}: unexpected line {other:?}"),
            }
        }
        if !started {
            kills_before_start += 1;
        }
        let checked = check_records(dir.path(), &m, &what);
        records_checked += checked;
        eprintln!(
            "{what}: {pages} page writes and {acks} records acknowledged in {} ms{}; {checked} records in the retained WAL checked",
            began.elapsed().as_millis(),
            if started { "" } else { " (killed during recovery)" }
        );
        if cycle % 4 == 3 || cycle + 1 == cycles {
            verify_in_process(dir.path(), &settings, &mut m, &what);
        }
    }
    assert!(
        m.page_acks > 200 && m.acks.len() > 50 && records_checked > 50,
        "too little work to prove anything: {} page writes, {} records",
        m.page_acks,
        m.acks.len()
    );
    eprintln!("{kills_before_start} kill(s) landed before the child finished recovering");
    println!(
        "{} page writes and {} records acknowledged ({records_checked} record checks in the retained WAL): 0 lost",
        m.page_acks,
        m.acks.len()
    );
}

/// Runs `store-child --script torn` to the point where block 3 has a change
/// logged after the last checkpoint, kills it, and tears block 3 on disk:
/// its second half becomes garbage, as if the crash had cut the write.
fn torn_page_after_crash(dir: &Path, settings: &[String]) {
    let mut child = spawn_child(dir, settings, &["--script", "torn"]);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready "), "child said {line:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let path = dir.join("data/base/1");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = 3 * PAGE_SIZE;
    assert!(
        page::data(&bytes[at..at + PAGE_SIZE]).starts_with(b"page 3 before the checkpoint"),
        "the checkpoint wrote block 3"
    );
    bytes[at + PAGE_SIZE / 2..at + PAGE_SIZE].fill(0xAB);
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn a_torn_page_is_repaired_from_its_full_page_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings: Vec<String> = SETTINGS.iter().map(|s| s.to_string()).collect();
    settings.extend([
        "checkpoint_timeout=1h".into(),
        "bgwriter_lru_maxpages=0".into(),
    ]);
    torn_page_after_crash(dir.path(), &settings);
    let store = Store::open(config(dir.path(), &settings)).expect("recovery repairs the page");
    let p = store.read_page(1, 3).unwrap();
    assert!(p.data.starts_with(b"page 3 before the checkpoint"));
    assert_eq!(&p.data[100..120], b"after the checkpoint");
    assert!(p.data[120..].iter().all(|&b| b == 0), "no garbage survived");
    for block in [0u32, 7] {
        let p = store.read_page(1, block).unwrap();
        assert!(p
            .data
            .starts_with(format!("page {block} before").as_bytes()));
    }
    store.close().unwrap();
}

#[test]
fn without_full_page_writes_a_torn_page_is_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings: Vec<String> = SETTINGS.iter().map(|s| s.to_string()).collect();
    settings.extend([
        "checkpoint_timeout=1h".into(),
        "bgwriter_lru_maxpages=0".into(),
        "full_page_writes=false".into(),
    ]);
    torn_page_after_crash(dir.path(), &settings);
    let err = match Store::open(config(dir.path(), &settings)) {
        Ok(_) => panic!("recovery must not accept a torn page"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("invalid page in block 3 of relation 1: page verification failed"),
        "{err}"
    );
    assert!(err.contains("full_page_writes"), "{err}");
}
