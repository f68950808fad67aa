//! The failover of issue #15 end to end, with real processes: one primary
//! and two standbys under `ANY 1 (*)`, `on` load (records with an ack log,
//! and page writes); kill -9 of the primary; the standby with the highest
//! flush LSN is promoted; every acknowledged record is on it byte for byte;
//! the other standby follows it onto timeline 2; the old primary, rewound
//! with `walden rewind`, rejoins as its standby; then the WAL of all three
//! is the same bytes up to the end, and so are their pages.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{run_bounded, standby_settings, wait_until, Node};
use walden::{Durability, Kind, Lsn};

const WALDEN: &str = env!("CARGO_BIN_EXE_walden");
const SEG: u64 = 1 << 20;
const PAGES: u32 = 64;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn lsn_at(v: &serde_json::Value) -> Lsn {
    v.as_str().unwrap().parse().unwrap()
}

fn flush_lsn(n: &Node) -> Lsn {
    lsn_at(&n.status()["flush_lsn"])
}

/// ("", 0) while a server restarting in its process (a standby moving to
/// a new timeline) answers without them.
fn role_and_timeline(n: &Node) -> (String, u64) {
    let s = n.status();
    (
        s["replication"]["role"].as_str().unwrap_or("").to_string(),
        s["timeline"].as_u64().unwrap_or(0),
    )
}

/// The replay LSN the primary `p` shows for the standby `name`.
fn replayed_by(p: &Node, name: &str) -> Lsn {
    p.status()["replication"]["standbys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["application_name"] == name)
        .map_or(Lsn(0), |r| lsn_at(&r["replay_lsn"]))
}

/// The WAL bytes of `dir` in segment `segno`, from the file the directory's
/// newest timeline history says holds it (None: not retained).
fn segment_bytes(dir: &Path, segno: u64) -> Option<Vec<u8>> {
    use walden::wal::timeline;
    let wal = dir.join("wal");
    let tli = timeline::latest_timeline(&wal).unwrap();
    let map = timeline::TimelineMap::load(&wal, tli, SEG).unwrap();
    std::fs::read(wal.join(map.file_name(segno, SEG))).ok()
}

/// Compares the WAL of `nodes` byte for byte from the first segment all of
/// them retain up to `end`; every segment from `must_from` on must be
/// there on all. Returns how many bytes were compared.
fn assert_same_wal(nodes: &[&Node], must_from: Lsn, end: Lsn) -> u64 {
    let mut compared = 0;
    for segno in 1..=end.segno(SEG) {
        let copies: Vec<Option<Vec<u8>>> =
            nodes.iter().map(|n| segment_bytes(&n.dir, segno)).collect();
        if copies.iter().any(|c| c.is_none()) {
            assert!(
                segno < must_from.segno(SEG),
                "segment {segno} missing on one of the nodes (must be there from {must_from})"
            );
            continue;
        }
        let used = if segno == end.segno(SEG) {
            (end.0 % SEG) as usize
        } else {
            SEG as usize
        };
        let first = copies[0].as_ref().unwrap();
        for (n, c) in nodes.iter().zip(&copies).skip(1) {
            let c = c.as_ref().unwrap();
            if let Some(i) = (0..used).find(|&i| first[i] != c[i]) {
                panic!(
                    "the WAL of {} differs from {}'s at {} (segment {segno}, offset {i})",
                    n.dir.display(),
                    nodes[0].dir.display(),
                    Lsn(segno * SEG + i as u64)
                );
            }
        }
        compared += used as u64;
    }
    compared
}

fn pages(n: &Node) -> Vec<(Lsn, Vec<u8>)> {
    let mut c = n.client();
    (0..PAGES).map(|b| c.page_read(1, b).unwrap()).collect()
}

fn bench(addr: &str, args: &[&str]) -> std::process::Child {
    Command::new(WALDEN)
        .args(["bench", "-h", addr, "-c", "4", "-j", "1", "-T", "60"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_exit(mut c: std::process::Child) {
    let t = Instant::now();
    while c.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "bench did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn failover_loses_no_acknowledged_record_and_every_server_rejoins_on_timeline_2() {
    let dir = tempfile::tempdir().unwrap();
    let sync = ["synchronous_standby_names=ANY 1 (*)".to_string()];
    let mut p = Node::start(&dir.path().join("p"), &sync);
    let s1 = Node::start(&dir.path().join("s1"), &standby_settings(&p, "s1"));
    let s2 = Node::start(&dir.path().join("s2"), &standby_settings(&p, "s2"));
    wait_until("two streaming standbys", &[&p, &s1, &s2], || {
        p.status()["replication"]["standbys"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    });

    // `on` load: records with an ack log, and page writes.
    let ack_log = dir.path().join("acks.log");
    let records = bench(
        &p.addr,
        &[
            "--level",
            "on",
            "--size",
            "200",
            "--ack-log",
            ack_log.to_str().unwrap(),
        ],
    );
    let page_load = bench(
        &p.addr,
        &[
            "--level",
            "on",
            "--size",
            "300",
            "--pages",
            &PAGES.to_string(),
        ],
    );
    wait_until("acknowledgements in the ack log", &[&p, &s1, &s2], || {
        std::fs::read_to_string(&ack_log).map_or(0, |t| t.lines().count()) > 1500
    });
    p.kill9();
    wait_exit(records);
    wait_exit(page_load);
    let acked = std::fs::read_to_string(&ack_log).unwrap().lines().count();

    // Promote the standby that has the most WAL; the other follows it.
    let (f1, f2) = (flush_lsn(&s1), flush_lsn(&s2));
    let (new, other, other_name) = if f1 >= f2 {
        (s1, s2, "s2")
    } else {
        (s2, s1, "s1")
    };
    let (mut new, mut other) = (new, other);
    let o = run_bounded(&["promote", "-D", new.dir.to_str().unwrap(), "-t", "25"]);
    assert!(o.status.success(), "promote: {}\n{}", text(&o), new.log());
    assert_eq!(role_and_timeline(&new), ("primary".to_string(), 2));
    let switch = walden::wal::timeline::read_history(&new.dir.join("wal"), 2).unwrap()[0].switch;

    other.stop();
    other.settings = standby_settings(&new, other_name);
    other.restart();
    wait_until("the other standby on timeline 2", &[&new, &other], || {
        role_and_timeline(&other) == ("standby".to_string(), 2)
    });

    // The old primary: rewound from the new one, it rejoins as a standby.
    let rew = run_bounded(&[
        "rewind",
        "-D",
        p.dir.to_str().unwrap(),
        "--source-server",
        &new.addr,
        "--recover-first",
    ]);
    assert!(rew.status.success(), "rewind: {}", text(&rew));
    let out = text(&rew);
    assert!(
        out.contains(&format!(
            "servers diverged at WAL location {switch} on timeline 1"
        )),
        "{out}"
    );
    p.settings = standby_settings(&new, "p");
    p.restart();
    wait_until("the old primary on timeline 2", &[&new, &p], || {
        role_and_timeline(&p) == ("standby".to_string(), 2)
    });

    // More `on` commits on the new primary reach all three.
    let mut c = new.client();
    for i in 0..200u32 {
        let rel_block = i % PAGES;
        c.page_write(Durability::On, 1, rel_block, 0, &i.to_le_bytes())
            .unwrap();
        c.append(
            Durability::On,
            &[(Kind::DATA, format!("after failover {i}").as_bytes())],
        )
        .unwrap();
    }
    drop(c);
    let end = flush_lsn(&new);
    wait_until(
        "both standbys replayed the new primary's WAL",
        &[&new, &other, &p],
        || replayed_by(&new, other_name) >= end && replayed_by(&new, "p") >= end,
    );
    let want = pages(&new);
    assert_eq!(pages(&other), want, "pages of the standby that followed");
    assert_eq!(pages(&p), want, "pages of the rewound old primary");

    p.stop();
    other.stop();
    new.stop();
    let compared = assert_same_wal(&[&new, &other, &p], Lsn((switch.segno(SEG)) * SEG), end);
    assert!(compared > switch.0 % SEG, "compared {compared} bytes");

    // Every acknowledged record, byte for byte, on the new primary.
    let v = run_bounded(&[
        "verify",
        "--ack-log",
        ack_log.to_str().unwrap(),
        "-D",
        new.dir.to_str().unwrap(),
    ]);
    assert!(
        v.status.success(),
        "walden verify ({acked} acknowledged): {}",
        text(&v)
    );
}
