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

/// A backup marker as `walden waldump` prints it: (its LSN, its end, the
/// backup's start, the label).
#[derive(Debug, Clone, PartialEq)]
struct Marker {
    lsn: Lsn,
    end: Lsn,
    start: Lsn,
    label: String,
}

/// The BACKUP_START and BACKUP_END records of the WAL in `wal`, read with
/// `walden waldump` (the parse fails loudly if its line changes shape).
fn markers(wal: &Path) -> (Vec<Marker>, Vec<Marker>) {
    let out = run_bounded(&["waldump", "-p", wal.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let (mut starts, mut ends) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let kind = line.split_whitespace().nth(1).unwrap_or("");
        if kind != "BACKUP_START" && kind != "BACKUP_END" {
            continue;
        }
        let field = |name: &str| {
            line.split(name)
                .nth(1)
                .unwrap_or_else(|| panic!("no {name} in {line}"))
        };
        let tot: u64 = field("len (rec/tot):")
            .split(',')
            .next()
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let lsn: Lsn = field("lsn: ").split(',').next().unwrap().parse().unwrap();
        let desc = field("desc: start ");
        let (start, label) = desc.split_once("; label ").unwrap();
        let m = Marker {
            lsn,
            end: Lsn(lsn.0 + tot),
            start: start.parse().unwrap(),
            label: label.trim_matches('"').to_string(),
        };
        if kind == "BACKUP_START" {
            starts.push(m);
        } else {
            ends.push(m);
        }
    }
    (starts, ends)
}

/// The one BACKUP_START and BACKUP_END of a backup, in the primary's WAL,
/// name its start and label; the copy's label, control file and the end
/// the tool waited for agree with them.
#[test]
fn the_primary_marks_the_backup_in_its_wal() {
    let server = ServerProcess::start(&[]);
    let mut c = Client::connect(&server.addr, None).unwrap();
    fill(&mut c, 2, 20, 1, &mut Vec::new());
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &["-l", "marker test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (starts, ends) = markers(&server.dir.path().join("data/wal"));
    assert_eq!((starts.len(), ends.len()), (1, 1), "{starts:?} {ends:?}");
    let (s, e) = (&starts[0], &ends[0]);
    assert_eq!(s.label, "marker test");
    assert_eq!(e.label, "marker test");
    assert_eq!(s.start, e.start, "BACKUP_END names the backup's start");
    assert!(s.lsn >= s.start && e.lsn > s.lsn, "{s:?} {e:?}");

    let l = label(&copy);
    assert_eq!(lsn_of(&l["START WAL LOCATION"]), s.start);
    assert_eq!(
        lsn_of(&l["STOP WAL LOCATION"]),
        e.end,
        "the backup ends at the end of BACKUP_END"
    );
    let ctl = control::read(&copy.join("data")).unwrap().unwrap();
    assert_eq!(ctl.redo, s.start);
    assert_eq!(ctl.min_recovery_point, e.end);
    // The copy's WAL holds both markers, the end one whole.
    let (cs, ce) = markers(&copy.join("wal"));
    assert_eq!((cs, ce), (starts.clone(), ends.clone()));
    let log = server.log();
    assert!(
        log.contains(&format!("BACKUP_END at {}, backup end {}", e.lsn, e.end)),
        "{log}"
    );

    // A second backup has its own markers; the first's are still there.
    let copy2 = target.path().join("copy2");
    let out = basebackup(&server.addr, &copy2, &["-l", "second"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (starts, ends) = markers(&server.dir.path().join("data/wal"));
    assert_eq!((starts.len(), ends.len()), (2, 2));
    assert_eq!(starts[1].label, "second");
    assert!(starts[1].start >= ends[0].end, "{starts:?} {ends:?}");
    assert_eq!(lsn_of(&label(&copy2)["START WAL LOCATION"]), ends[1].start);
}

/// Args of `walden serve -D DIR` as the tests run it.
fn serve_args(dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = ["serve", "-D", dir.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    for s in common::SERVE_DEFAULTS {
        args.extend(["-c".to_string(), s.to_string()]);
    }
    args
}

/// The copy's WAL cut right before its BACKUP_END (the rest of that
/// segment zeroed, later segments removed): `walden serve` on it refuses
/// to start with PostgreSQL's message and changes nothing; the same copy
/// whole starts.
#[test]
fn a_copy_cut_before_its_backup_end_record_refuses_to_start() {
    let server = ServerProcess::start(&[]);
    let mut c = Client::connect(&server.addr, None).unwrap();
    fill(&mut c, 2, 20, 1, &mut Vec::new());
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let wal = copy.join("wal");
    let (_, ends) = markers(&wal);
    assert_eq!(ends.len(), 1);
    let cut = ends[0].lsn;
    let seg = 1u64 << 20;
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().len() == 24)
        .collect();
    segments.sort();
    let name = walden::lsn::segment_file_name(1, cut.segno(seg), seg);
    for p in &segments {
        let n = p.file_name().unwrap().to_str().unwrap();
        if n > name.as_str() {
            std::fs::remove_file(p).unwrap();
        } else if n == name {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            let off = cut.0 % seg;
            f.write_all_at(&vec![0u8; (seg - off) as usize], off)
                .unwrap();
            f.sync_all().unwrap();
        }
    }
    let (_, ends) = markers(&wal);
    assert!(ends.is_empty(), "the cut left BACKUP_END: {ends:?}");
    let before = common::snapshot(&copy.join("data"));
    let args = serve_args(&copy);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_bounded(&args);
    assert!(!out.status.success(), "the cut copy started");
    let err = stderr(&out);
    assert!(
        err.contains("WAL ends before end of online backup")
            && err.contains(&format!(
                "without the backup end record of the base backup that started at {}",
                ends_start(&copy)
            )),
        "{err}"
    );
    assert!(copy.join("data/backup_label").exists());
    let after = common::snapshot(&copy.join("data"));
    let ctl = |snap: &BTreeMap<PathBuf, Option<Vec<u8>>>| {
        snap.iter()
            .filter(|(p, _)| {
                p.file_name()
                    .is_some_and(|n| n == "walden.control" || n == "backup_label")
            })
            .map(|(p, b)| (p.clone(), b.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ctl(&before),
        ctl(&after),
        "a refused start changed the control file or the label"
    );
}

fn ends_start(copy: &Path) -> Lsn {
    lsn_of(&label(copy)["START WAL LOCATION"])
}

/// A whole copy started as a server: it logs the end of its backup and
/// consistency at the backup's end, clears the backup state (control file,
/// backup_label renamed), serves and takes writes; a restart needs no
/// backup state any more.
#[test]
fn a_copy_reaches_consistency_at_its_backup_end_record_and_starts() {
    let server = ServerProcess::start(&[]);
    let mut c = Client::connect(&server.addr, None).unwrap();
    let mut writes = Vec::new();
    fill(&mut c, 2, 20, 1, &mut writes);
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &["-l", "consistency"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let l = label(&copy);
    let (start, stop) = (
        lsn_of(&l["START WAL LOCATION"]),
        lsn_of(&l["STOP WAL LOCATION"]),
    );
    let mut node = common::Node::start(&copy, &[] as &[&str]);
    let log = node.log();
    assert!(
        log.contains(&format!(
            "backup end record reached at {}: base backup \"consistency\" started at {start} is complete",
            markers(&copy.join("wal")).1[0].lsn
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("consistent recovery state reached at {stop}")),
        "{log}"
    );
    assert!(!copy.join("data/backup_label").exists());
    assert_eq!(
        label_old(&copy)["START WAL LOCATION"],
        l["START WAL LOCATION"]
    );
    let mut cc = node.client();
    let want = model(&writes, Lsn(u64::MAX));
    for (&(rel, block), data) in &want {
        assert_eq!(&cc.page_read(rel, block).unwrap().1, data);
    }
    cc.page_write(Durability::Local, 1, 0, 0, b"after").unwrap();
    node.stop();
    let ctl = control::read(&copy.join("data")).unwrap().unwrap();
    assert_eq!(ctl.min_recovery_point, Lsn::INVALID, "backup state cleared");
    node.restart();
    assert_eq!(
        &node.client().page_read(1, 0).unwrap().1[..5],
        b"after".as_slice()
    );
    node.stop();
    assert_eq!(
        node.log().matches("backup end record reached").count(),
        1,
        "only the first start was a backup recovery"
    );
}

fn label_old(dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir.join("data/backup_label.old")).unwrap();
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// With data checksums, a page damaged on the primary's disk (not changed
/// since) fails the backup with its relation and block, leaving nothing.
#[test]
fn a_damaged_page_on_the_primary_fails_the_backup() {
    let server = ServerProcess::start(&[]);
    let mut c = Client::connect(&server.addr, None).unwrap();
    fill(&mut c, 2, 20, 1, &mut Vec::new());
    // On disk: a checkpoint writes every page out.
    c.checkpoint().unwrap();
    let rel = server.dir.path().join("data/data/base/2");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&rel).unwrap();
        f.write_all_at(b"rot", 7 * 8192 + 4000).unwrap();
        f.sync_all().unwrap();
    }
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &[]);
    assert!(!out.status.success(), "a damaged page was copied");
    let err = stderr(&out);
    assert!(
        err.contains("checksum verification failure: relation 2 block 7"),
        "{err}"
    );
    assert!(!copy.exists(), "a failed backup leaves nothing behind");
}

/// A copy made with -R starts as a standby of its primary: it too is
/// consistent only past its BACKUP_END (logged at its first start), then
/// follows the primary.
#[test]
fn a_standby_copy_logs_its_backup_end_and_follows_the_primary() {
    let server = ServerProcess::start(&[]);
    let mut c = Client::connect(&server.addr, None).unwrap();
    fill(&mut c, 1, 10, 1, &mut Vec::new());
    let target = tempfile::tempdir().unwrap();
    let copy = target.path().join("copy");
    let out = basebackup(&server.addr, &copy, &["-R", "-l", "standby copy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stop = lsn_of(&label(&copy)["STOP WAL LOCATION"]);
    let mut node = common::Node::start(&copy, &[] as &[&str]);
    let log = node.log();
    assert!(log.contains("entering standby mode"), "{log}");
    assert!(
        log.contains("base backup \"standby copy\" started at")
            && log.contains(&format!("consistent recovery state reached at {stop}")),
        "{log}"
    );
    assert!(copy.join("data/backup_label.old").exists());
    let (_, end) = c.page_write(Durability::Local, 1, 3, 0, b"later").unwrap();
    let mut s = node.client();
    let t = Instant::now();
    loop {
        let (lsn, data) = s.page_read(1, 3).unwrap();
        if lsn >= end {
            assert_eq!(&data[..5], b"later".as_slice());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the standby did not replay {end}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    node.stop();
}
