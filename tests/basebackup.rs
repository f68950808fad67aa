//! `walden basebackup` against a real `walden serve`: the copy of an idle
//! primary and of one that writes pages during the backup recovers (from
//! the backup's redo point) to exactly the primary's pages as of the end
//! of its WAL; refusals (a non-empty target, full_page_writes off, an
//! unknown slot) say why and leave nothing behind; `-R` writes
//! walden.auto.toml and `walden serve -D` reads that file.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{run_bounded, ServerProcess};
use walden::client::Client;
use walden::store::control;
use walden::store::page::PAGE_DATA;
use walden::{Config, Durability, Kind, Lsn, Store};

fn copy_config(dir: &Path) -> Config {
    let mut cfg = Config::with_data_directory(dir);
    cfg.set("wal_segment_size=1MB").unwrap();
    cfg
}

fn basebackup(addr: &str, dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["basebackup", "-H", addr, "-D", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_bounded(&args)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The backup_label's fields.
fn label(dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir.join("data/backup_label")).unwrap();
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn lsn_of(field: &str) -> Lsn {
    field.split(' ').next().unwrap().parse().unwrap()
}

/// One acknowledged page write.
#[derive(Clone)]
struct Write {
    rel: u32,
    block: u32,
    offset: u16,
    data: Vec<u8>,
    end: Lsn,
}

/// The pages the writes up to `upto` (page LSN ≤ upto) make, in LSN order.
fn model(writes: &[Write], upto: Lsn) -> BTreeMap<(u32, u32), Vec<u8>> {
    let mut sorted: Vec<&Write> = writes.iter().filter(|w| w.end <= upto).collect();
    sorted.sort_by_key(|w| w.end);
    let mut pages = BTreeMap::new();
    for w in sorted {
        let p = pages
            .entry((w.rel, w.block))
            .or_insert_with(|| vec![0u8; PAGE_DATA]);
        p[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
    }
    pages
}

/// Page writes of `n` pages (pipelined), each a distinct 64-byte pattern.
fn fill(c: &mut Client, rels: u32, blocks: u32, round: u8, writes: &mut Vec<Write>) {
    let mut ids = Vec::new();
    for rel in 1..=rels {
        for block in 0..blocks {
            let data: Vec<u8> = (0..64u8)
                .map(|i| i ^ round ^ block as u8 ^ rel as u8)
                .collect();
            let offset = ((block * 97) % 4000) as u16;
            let id = c.queue_page_write(Durability::Local, rel, block, offset, &data);
            ids.push((id, rel, block, offset, data));
            if ids.len() == 64 {
                drain(c, &mut ids, writes);
            }
        }
    }
    drain(c, &mut ids, writes);
}

fn drain(c: &mut Client, ids: &mut Vec<(u64, u32, u32, u16, Vec<u8>)>, writes: &mut Vec<Write>) {
    for (id, rel, block, offset, data) in ids.drain(..) {
        match c.recv().unwrap() {
            walden::protocol::Frame::PageWritten {
                request_id, end, ..
            } => {
                assert_eq!(request_id, id);
                writes.push(Write {
                    rel,
                    block,
                    offset,
                    data,
                    end,
                });
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Opens the copy as a page store (crash recovery from the backup's redo
/// point) and checks every page against `expected` and the label's LSNs
/// against the control file. Returns the end of the copy's WAL.
fn open_and_compare(
    copy: &Path,
    expected_from: impl Fn(Lsn) -> BTreeMap<(u32, u32), Vec<u8>>,
) -> Lsn {
    let l = label(copy);
    let start = lsn_of(&l["START WAL LOCATION"]);
    let c = control::read(&copy.join("data")).unwrap().unwrap();
    assert_eq!(
        c.redo, start,
        "the control file's redo point is the label's start"
    );
    assert_eq!(c.checkpoint, lsn_of(&l["CHECKPOINT LOCATION"]));
    assert_eq!(c.min_recovery_point, lsn_of(&l["STOP WAL LOCATION"]));
    assert_ne!(
        c.state,
        control::ClusterState::ShutDown,
        "the copy must recover"
    );
    let store = Store::open(copy_config(copy)).unwrap();
    let wal_end = store.wal().opened_at();
    assert!(
        wal_end >= c.min_recovery_point,
        "WAL to {wal_end}, backup end {}",
        c.min_recovery_point
    );
    let expected = expected_from(wal_end);
    assert!(!expected.is_empty());
    for (&(rel, block), want) in &expected {
        let got = store.read_page(rel, block).unwrap();
        assert!(
            got.data == *want,
            "relation {rel} block {block} differs in the copy (WAL to {wal_end})"
        );
    }
    store.close().unwrap();
    wal_end
}

#[test]
fn backup_of_an_idle_primary_recovers_to_its_pages() {
    let server = ServerProcess::start(&[]);
    let mut c = Client::connect(&server.addr, None).unwrap();
    let mut writes = Vec::new();
    fill(&mut c, 3, 40, 1, &mut writes);
    c.append(Durability::Local, &[(Kind::DATA, b"before the backup")])
        .unwrap();
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &["-P", "-l", "idle test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("kB (100%)"), "progress: {err}");

    let l = label(&copy);
    assert_eq!(l["BACKUP METHOD"], "streamed");
    assert_eq!(l["BACKUP FROM"], "primary");
    assert_eq!(l["LABEL"], "idle test");
    assert_eq!(l["START TIMELINE"], "1");
    assert!(
        l["START WAL LOCATION"].contains("(file 0000000100000000000000"),
        "{l:?}"
    );
    assert!(l.contains_key("START TIME") && l.contains_key("STOP WAL LOCATION"));
    assert!(!copy.join("walden.auto.toml").exists(), "only -R writes it");
    // The primary's pages, read over the protocol, are the copy's.
    let mut primary = BTreeMap::new();
    for rel in 1..=3 {
        for block in 0..40 {
            primary.insert((rel, block), c.page_read(rel, block).unwrap().1);
        }
    }
    assert_eq!(primary, model(&writes, Lsn(u64::MAX)));
    open_and_compare(&copy, |_| primary.clone());
    let log = server.log();
    assert!(log.contains("base backup \"idle test\""), "{log}");
}

#[test]
fn backup_while_a_client_writes_recovers_to_the_pages_as_of_its_wal_end() {
    // Large enough that the copy takes a while, with writes all along.
    let server = ServerProcess::start(&["shared_buffers=16MB"]);
    let mut c = Client::connect(&server.addr, None).unwrap();
    let mut writes = Vec::new();
    fill(&mut c, 4, 1500, 1, &mut writes);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (addr, stop) = (server.addr.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut c = Client::connect(&addr, None).unwrap();
            let mut writes = Vec::new();
            let mut round = 2u8;
            while !stop.load(SeqCst) {
                // Pages throughout the relations, rewritten round after round.
                fill(&mut c, 4, 60, round, &mut writes);
                for i in 0..20u32 {
                    let block = 100 + (i * 71 + u32::from(round) * 13) % 1400;
                    let (_, end) = c
                        .page_write(Durability::Local, 1 + i % 4, block, 500, &[round; 200])
                        .unwrap();
                    writes.push(Write {
                        rel: 1 + i % 4,
                        block,
                        offset: 500,
                        data: vec![round; 200],
                        end,
                    });
                }
                c.append(Durability::Local, &[(Kind::DATA, &[round; 300])])
                    .unwrap();
                round = round.wrapping_add(1).max(2);
            }
            writes
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &["-P"]);
    // A little more after the backup: the copy must not have it.
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, SeqCst);
    writes.extend(writer.join().unwrap());
    assert!(out.status.success(), "{}", stderr(&out));

    let l = label(&copy);
    let start = lsn_of(&l["START WAL LOCATION"]);
    let stop_lsn = lsn_of(&l["STOP WAL LOCATION"]);
    let during = writes
        .iter()
        .filter(|w| w.end > start && w.end <= stop_lsn)
        .count();
    assert!(
        during > 0,
        "no page was written during the backup: the test proves nothing"
    );
    let after = writes.iter().filter(|w| w.end > stop_lsn).count();
    assert!(after > 0, "no page was written after the backup");
    let wal_end = open_and_compare(&copy, |wal_end| {
        let m = model(&writes, wal_end);
        // Every page ever written, unwritten ones as zeros.
        let mut all = model(&writes, Lsn(u64::MAX));
        for (k, v) in all.iter_mut() {
            *v = m.get(k).cloned().unwrap_or_else(|| vec![0; PAGE_DATA]);
        }
        all
    });
    assert!(wal_end >= stop_lsn);
}

#[test]
fn a_copy_whose_wal_ends_before_the_backup_end_refuses_to_start() {
    let server = ServerProcess::start(&[]);
    let mut c = Client::connect(&server.addr, None).unwrap();
    fill(&mut c, 1, 10, 1, &mut Vec::new());
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let data = copy.join("data");
    let mut ctl = control::read(&data).unwrap().unwrap();
    ctl.min_recovery_point = Lsn(ctl.min_recovery_point.0 + (1 << 20));
    control::write(&data, &ctl, true).unwrap();
    let e = Store::open(copy_config(&copy)).err().expect("refused");
    assert!(e.to_string().contains("the backup is incomplete"), "{e}");
}

#[test]
fn a_non_empty_target_is_refused_and_left_alone() {
    let server = ServerProcess::start(&[]);
    let target = tempfile::tempdir().unwrap();
    std::fs::write(target.path().join("precious"), b"mine").unwrap();
    let before = common::snapshot(target.path());
    let out = basebackup(&server.addr, target.path(), &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "directory \"{}\" exists but is not empty",
            target.path().display()
        )),
        "{err}"
    );
    common::assert_unchanged(&before, &common::snapshot(target.path()), "the target");
    assert!(
        !server.log().contains("base backup"),
        "the server was asked for a backup"
    );
}

#[test]
fn full_page_writes_off_is_refused() {
    let server = ServerProcess::start(&["full_page_writes=off"]);
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("BACKUP_REFUSED") && err.contains("full_page_writes = on"),
        "{err}"
    );
    assert!(!copy.exists(), "a failed backup leaves nothing behind");
}

#[test]
fn an_unknown_slot_fails_the_backup_clearly() {
    let server = ServerProcess::start(&[]);
    let target = tempfile::tempdir().unwrap();
    let out = basebackup(&server.addr, target.path(), &["--slot", "nosuch"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("through slot \"nosuch\"") && err.contains("UNKNOWN_SLOT"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(target.path()).unwrap().count(),
        0,
        "emptied again"
    );
    // The backup connection closed: the server keeps no WAL for it.
    let t = Instant::now();
    while !server.log().contains("failed") && !server.log().contains("sent; consistent") {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dash_r_writes_walden_auto_toml() {
    let server = ServerProcess::start(&[]);
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &["-R"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let auto = std::fs::read_to_string(copy.join("walden.auto.toml")).unwrap();
    let (host, port) = server.addr.rsplit_once(':').unwrap();
    let cfg = {
        let mut c = Config::default();
        c.apply_file(&copy.join("walden.auto.toml")).unwrap();
        c
    };
    assert_eq!(
        cfg.primary_conninfo,
        format!("host={host} port={port} application_name=walreceiver"),
        "{auto}"
    );
    assert_eq!(cfg.primary_slot_name, "");
}

/// `walden serve -D DIR` applies DIR/walden.auto.toml after --config and
/// before -c (a harmless setting: primary_conninfo would start a standby).
#[test]
fn serve_reads_walden_auto_toml() {
    let dir = tempfile::tempdir().unwrap();
    let d: PathBuf = dir.path().join("node");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("walden.auto.toml"),
        "max_connections = 77\nmax_in_flight = 55\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["serve", "-D", d.to_str().unwrap()])
        .args([
            "-c",
            "listen_addr=127.0.0.1:0",
            "-c",
            "metrics_addr=",
            "-c",
            "wal_segment_size=1MB",
        ])
        .args(["-c", "max_in_flight=66"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let addr = loop {
        if let Some(a) = std::fs::read_to_string(d.join("data/walden.addr"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("listen_addr=").map(str::to_string))
            })
        {
            break a;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = Client::connect(&addr, None).unwrap().status();
    let _ = child.kill();
    let _ = child.wait();
    let json: serde_json::Value = serde_json::from_str(&status.unwrap().3).unwrap();
    assert_eq!(
        json["settings"]["max_connections"], 77,
        "{}",
        json["settings"]
    );
    assert_eq!(
        json["settings"]["max_in_flight"], 66,
        "-c wins: {}",
        json["settings"]
    );
}
