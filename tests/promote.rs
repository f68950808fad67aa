//! Promotion and timelines with real processes: a standby promoted after
//! kill -9 of its primary under `on` load keeps every acknowledged record
//! and continues on timeline 2; a second promotion reaches timeline 3; a
//! crash in the middle of a promotion recovers to a consistent primary; a
//! primary refuses to be promoted.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{control_line, controldata, run_bounded, standby_settings, wait_until, Node};
use walden::{Durability, Kind, Lsn};

const WALDEN: &str = env!("CARGO_BIN_EXE_walden");

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn role_and_timeline(n: &Node) -> (String, u64) {
    let s = n.status();
    (
        s["replication"]["role"].as_str().unwrap().to_string(),
        s["timeline"].as_u64().unwrap(),
    )
}

fn flush_lsn(n: &Node) -> Lsn {
    n.status()["flush_lsn"].as_str().unwrap().parse().unwrap()
}

/// The lines of DIR/wal/0000000N.history, split at the tabs.
fn history(dir: &Path, tli: u32) -> Vec<(u32, Lsn, String)> {
    let path = dir.join("wal").join(format!("{tli:08X}.history"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 3, "history line {l:?}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].to_string(),
            )
        })
        .collect()
}

fn segment_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    v.sort();
    v
}

fn waldump(dir: &Path) -> String {
    let o = run_bounded(&["waldump", "-p", dir.join("wal").to_str().unwrap()]);
    assert!(o.status.success(), "waldump: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn promote_dir(n: &Node) -> Output {
    run_bounded(&["promote", "-D", n.dir.to_str().unwrap(), "-t", "25"])
}

/// The test: `walden bench --level on --ack-log` against a primary
/// with `ANY 1 (s1)`, kill -9 of the primary under load, `walden promote
/// -D` of s1: every acknowledged record is on the promoted server byte for
/// byte (`walden verify`), it accepts appends on timeline 2, new segments
/// are named 00000002…, and the history file says where timeline 1 ended.
#[test]
fn promoted_standby_keeps_every_acknowledged_record_and_appends_on_timeline_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Node::start(
        &dir.path().join("p"),
        &["synchronous_standby_names=ANY 1 (s1)"],
    );
    let mut s1 = Node::start(&dir.path().join("s1"), &standby_settings(&primary, "s1"));
    let ack_log = dir.path().join("acks.log");
    let mut bench = Command::new(WALDEN)
        .args([
            "bench",
            "-h",
            &primary.addr,
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            "30",
        ])
        .args(["--level", "on", "--size", "300", "--ack-log"])
        .arg(&ack_log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("acknowledgements in the ack log", &[&primary, &s1], || {
        std::fs::read_to_string(&ack_log).map_or(0, |t| t.lines().count()) > 2000
    });
    primary.kill9();
    let t = Instant::now();
    while bench.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "bench did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let acked = std::fs::read_to_string(&ack_log).unwrap().lines().count();
    assert_eq!(role_and_timeline(&s1), ("standby".to_string(), 1));

    let o = promote_dir(&s1);
    assert!(o.status.success(), "promote: {}\n{}", text(&o), s1.log());
    assert!(text(&o).contains("server promoted"), "{}", text(&o));
    assert_eq!(role_and_timeline(&s1), ("primary".to_string(), 2));
    let st = run_bounded(&["status", "-D", s1.dir.to_str().unwrap()]);
    assert!(text(&st).contains("timeline:        2"), "{}", text(&st));
    let log = s1.log();
    for line in [
        "selected new timeline ID: 2",
        "archive recovery complete",
        "database system is ready to accept connections",
    ] {
        assert!(log.contains(line), "no {line:?} in the log:\n{log}");
    }
    let h = history(&s1.dir, 2);
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].0, 1);
    assert_eq!(h[0].2, "no recovery target specified");
    let switch = h[0].1;

    // Appends work, after the switch point, on timeline 2.
    let mut c = s1.client();
    let a = c
        .append(Durability::Local, &[(Kind::DATA, b"after promotion")])
        .unwrap();
    assert!(a.lsns[0] > switch, "{} after {switch}", a.lsns[0]);
    let names = segment_names(&s1.dir);
    let seg = 1u64 << 20;
    let switch_seg = walden::lsn::segment_file_name(2, switch.segno(seg), seg);
    assert!(names.contains(&switch_seg), "{switch_seg} not in {names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("00000001")),
        "older segments keep their timeline's names: {names:?}"
    );
    // The promotion's record, first on timeline 2.
    drop(c);
    s1.stop();
    let dump = waldump(&s1.dir);
    let eor: Vec<&str> = dump
        .lines()
        .filter(|l| l.contains("END_OF_RECOVERY"))
        .collect();
    assert_eq!(eor.len(), 1, "{dump}");
    assert!(
        eor[0].contains(&format!(
            "lsn: {:X}/{:08X}",
            switch.0 >> 32,
            switch.0 as u32
        )) && eor[0].contains("tli 2; prev tli 1"),
        "{}",
        eor[0]
    );
    let cd = controldata(&s1.dir);
    assert_eq!(control_line(&cd, "Latest checkpoint's TimeLineID"), "2");
    // Every acknowledged record, byte for byte, on the promoted directory.
    let out = run_bounded(&[
        "verify",
        "--ack-log",
        ack_log.to_str().unwrap(),
        "-D",
        s1.dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "walden verify ({acked} acknowledged): {}",
        text(&out)
    );
}

/// Promote over the protocol, then restart the promoted server as a
/// standby (of a primary that is gone) and promote it again: timeline 3,
/// whose history has two lines, the first its parent's. A primary refuses.
#[test]
fn promoting_twice_reaches_timeline_3_and_a_primary_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let mut s = Node::start(&dir.path().join("s"), &standby_settings(&primary, "s"));
    let mut c = primary.client();
    for i in 0..500u32 {
        c.append(Durability::Local, &[(Kind::DATA, &i.to_le_bytes())])
            .unwrap();
    }
    let end = flush_lsn(&primary);
    wait_until("the standby caught up", &[&primary, &s], || {
        flush_lsn(&s) >= end
    });

    // A primary is not promoted.
    let o = promote_dir(&primary);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("server is not in standby mode"),
        "{}",
        text(&o)
    );
    let o = run_bounded(&["promote", "-H", &primary.addr]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not in standby mode"), "{}", text(&o));
    drop(c);
    primary.kill9();

    // Over the protocol.
    let o = run_bounded(&["promote", "-H", &s.addr, "-t", "25"]);
    assert!(o.status.success(), "promote -H: {}\n{}", text(&o), s.log());
    assert_eq!(role_and_timeline(&s), ("primary".to_string(), 2));
    let mut c = s.client();
    c.append(Durability::Local, &[(Kind::DATA, b"on timeline 2")])
        .unwrap();
    drop(c);

    // Again a standby (its primary is gone), then promoted again.
    s.stop();
    s.restart();
    wait_until("a standby on timeline 2", &[&s], || {
        role_and_timeline(&s) == ("standby".to_string(), 2)
    });
    let o = promote_dir(&s);
    assert!(
        o.status.success(),
        "second promote: {}\n{}",
        text(&o),
        s.log()
    );
    assert_eq!(role_and_timeline(&s), ("primary".to_string(), 3));
    let h2 = history(&s.dir, 2);
    let h3 = history(&s.dir, 3);
    assert_eq!(h3.len(), 2, "{h3:?}");
    assert_eq!(h3[0], h2[0]);
    assert_eq!(h3[1].0, 2);
    assert!(h3[1].1 > h2[0].1);
    let mut c = s.client();
    c.append(Durability::Local, &[(Kind::DATA, b"on timeline 3")])
        .unwrap();
    drop(c);
    s.stop();
    // The dump crosses both switches, from the first record to the last.
    let dump = waldump(&s.dir);
    let eor: Vec<&str> = dump
        .lines()
        .filter(|l| l.contains("END_OF_RECOVERY"))
        .collect();
    assert_eq!(eor.len(), 2, "{dump}");
    assert!(eor[0].contains("tli 2; prev tli 1"), "{}", eor[0]);
    assert!(eor[1].contains("tli 3; prev tli 2"), "{}", eor[1]);
    assert!(dump.lines().filter(|l| l.contains("kind: DATA")).count() >= 502);
    let cd = controldata(&s.dir);
    assert_eq!(control_line(&cd, "Latest checkpoint's TimeLineID"), "3");
}

/// `walden serve` with an environment variable set (the failpoint), as
/// Node::restart starts it; returns once walden.addr is written.
fn spawn_with_failpoint(dir: &Path, settings: &[String], failpoint: &str) -> Child {
    let addr_file = dir.join("data/walden.addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let mut cmd = Command::new(WALDEN);
    cmd.arg("serve").arg("-D").arg(dir);
    for s in [
        "listen_addr=127.0.0.1:0",
        "metrics_addr=",
        "wal_segment_size=1MB",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(settings.iter().cloned())
    {
        cmd.args(["-c", &s]);
    }
    let mut child = cmd
        .env("WALDEN_LOG", "info")
        .env(walden::wal::FAILPOINT_ENV, failpoint)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !addr_file.exists() {
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(t.elapsed() < Duration::from_secs(30), "no walden.addr");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A crash at each step of a promotion (after the switch segment's copy,
/// after the history file, after the END_OF_RECOVERY record), then a
/// restart with the same settings: a consistent primary on timeline 2, one
/// history file, one END_OF_RECOVERY, every record from before the switch.
#[test]
fn a_crash_in_the_middle_of_a_promotion_recovers_on_the_new_timeline() {
    for failpoint in [
        "promote-after-copy",
        "promote-after-history",
        "promote-after-end-of-recovery",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut primary = Node::start(&dir.path().join("p"), &[] as &[&str]);
        let sdir = dir.path().join("s");
        let settings = standby_settings(&primary, "s");
        std::fs::create_dir_all(&sdir).unwrap();
        let mut child = spawn_with_failpoint(&sdir, &settings, failpoint);
        let mut c = primary.client();
        let mut last = Lsn(0);
        for i in 0..300u32 {
            last = c
                .append(Durability::Local, &[(Kind::DATA, &i.to_le_bytes())])
                .unwrap()
                .lsns[0];
        }
        let end = flush_lsn(&primary);
        let addr = std::fs::read_to_string(sdir.join("data/walden.addr")).unwrap();
        let saddr = addr
            .lines()
            .find_map(|l| l.strip_prefix("listen_addr="))
            .unwrap()
            .to_string();
        let t = Instant::now();
        loop {
            let mut sc = walden::client::Client::connect(&saddr, None).unwrap();
            let (_, _, flush, _) = sc.status().unwrap();
            if flush >= end {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "standby behind");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(c);
        primary.kill9();
        let o = run_bounded(&["promote", "-D", sdir.to_str().unwrap(), "-W"]);
        assert!(o.status.success(), "{failpoint}: {}", text(&o));
        let t = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{failpoint}: no crash"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!st.success(), "{failpoint}: {st}");
        let log = std::fs::read_to_string(sdir.join("server.log")).unwrap();
        assert!(log.contains(&format!("failpoint {failpoint}")), "{log}");

        // Restarted with the same settings: the promotion is done or redone.
        let s = Node::start(&sdir, &settings);
        assert_eq!(
            role_and_timeline(&s),
            ("primary".to_string(), 2),
            "{failpoint}:\n{}",
            s.log()
        );
        assert!(!sdir.join("data/promote.signal").exists());
        assert!(!sdir.join("wal/00000003.history").exists());
        let h = history(&sdir, 2);
        assert_eq!(h.len(), 1);
        let mut c = s.client();
        c.append(Durability::Local, &[(Kind::DATA, b"after the crash")])
            .unwrap();
        let (recs, _) = c.read(last, 1 << 20, 10).unwrap();
        assert_eq!(
            recs[0].lsn, last,
            "{failpoint}: the last record before the switch"
        );
        drop(c);
        let mut s = s;
        s.stop();
        let dump = waldump(&sdir);
        let eor = dump
            .lines()
            .filter(|l| l.contains("END_OF_RECOVERY"))
            .count();
        assert_eq!(eor, 1, "{failpoint}:\n{dump}");
        let cd = controldata(&sdir);
        assert_eq!(control_line(&cd, "Latest checkpoint's TimeLineID"), "2");
    }
}

/// Promotion while the standby is still catching up: the promoted server
/// ends its timeline 1 wherever its flushed WAL ended, which is a prefix of
/// the old primary's WAL record for record, and continues on timeline 2.
#[test]
fn promote_during_catch_up_keeps_a_prefix_of_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let mut c = primary.client();
    let payload = vec![0x5Au8; 400];
    for _ in 0..200 {
        let batch: Vec<(Kind, &[u8])> = (0..50).map(|_| (Kind::DATA, &payload[..])).collect();
        c.append(Durability::Local, &batch).unwrap();
    }
    drop(c);
    let end = flush_lsn(&primary);
    let s = Node::start(&dir.path().join("s"), &standby_settings(&primary, "s"));
    let o = promote_dir(&s);
    assert!(o.status.success(), "promote: {}\n{}", text(&o), s.log());
    assert_eq!(role_and_timeline(&s), ("primary".to_string(), 2));
    let switch = history(&s.dir, 2)[0].1;
    assert!(
        switch <= end,
        "switch {switch} past the primary's end {end}"
    );
    // Every record before the switch is the primary's, byte for byte.
    let mut pc = primary.client();
    let mut sc = s.client();
    let mut at = Lsn(1 << 20);
    let mut compared = 0;
    while at < switch {
        let (theirs, next) = pc.read(at, 1 << 20, 1000).unwrap();
        let (ours, _) = sc.read(at, 1 << 20, theirs.len() as u32).unwrap();
        for (a, b) in theirs.iter().zip(&ours) {
            if a.lsn >= switch {
                break;
            }
            assert_eq!((a.lsn, a.kind, &a.payload), (b.lsn, b.kind, &b.payload));
            compared += 1;
        }
        at = next;
    }
    let a = sc
        .append(Durability::Local, &[(Kind::DATA, b"after catch-up")])
        .unwrap();
    assert!(a.lsns[0] > switch);
    assert!(compared > 0 || switch == Lsn(1 << 20));
}

/// A promoted server's history over the protocol (TimelineHistory, as
/// PostgreSQL's TIMELINE_HISTORY), and a base backup of it: the copy gets
/// the history file, names its segments with timeline 2, and starts as a
/// standby that streams from the promoted server on timeline 2.
#[test]
fn a_base_backup_of_a_promoted_server_is_its_standby_on_timeline_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let s1 = Node::start(&dir.path().join("s1"), &standby_settings(&primary, "s1"));
    let mut c = primary.client();
    for i in 0..200u32 {
        c.append(Durability::Local, &[(Kind::DATA, &[i as u8; 200])])
            .unwrap();
    }
    let end = flush_lsn(&primary);
    wait_until("s1 has the primary's WAL", &[&primary, &s1], || {
        s1.status()["replication"]["wal_receiver"]["flushed_lsn"]
            .as_str()
            .and_then(|l| l.parse::<Lsn>().ok())
            .is_some_and(|l| l >= end)
    });
    primary.kill9();
    let o = promote_dir(&s1);
    assert!(o.status.success(), "promote: {}", text(&o));
    wait_until("s1 a primary on timeline 2", &[&s1], || {
        role_and_timeline(&s1) == ("primary".to_string(), 2)
    });

    let mut c = s1.client();
    let file = std::fs::read(s1.dir.join("wal/00000002.history")).unwrap();
    assert_eq!(c.timeline_history(2).unwrap(), file);
    assert!(c.timeline_history(1).unwrap().is_empty());
    let mut c = s1.client();
    match c.timeline_history(3) {
        Err(walden::client::ClientError::Server { code, message }) => {
            assert_eq!(code, walden::protocol::ErrorCode::TIMELINE_NOT_IN_HISTORY);
            assert_eq!(
                message,
                "requested timeline 3 is not in this server's history (it is on timeline 2)"
            );
        }
        other => panic!("timeline 3's history: {other:?}"),
    }

    let copy = dir.path().join("s3");
    common::basebackup_standby(&s1, &copy, "s3");
    assert_eq!(history(&copy, 2), history(&s1.dir, 2));
    let names = segment_names(&copy);
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("00000002")),
        "the copy's segments: {names:?}"
    );
    let s3 = Node::start(&copy, &[] as &[&str]);
    let mut c = s1.client();
    let a = c
        .append(Durability::Local, &[(Kind::DATA, b"after the backup")])
        .unwrap();
    wait_until(
        "s3 replays the promoted server's new WAL",
        &[&s1, &s3],
        || {
            s3.status()["replication"]["wal_receiver"]["replayed_lsn"]
                .as_str()
                .and_then(|l| l.parse::<Lsn>().ok())
                .is_some_and(|l| l >= a.end)
        },
    );
    assert_eq!(role_and_timeline(&s3), ("standby".to_string(), 2));
}
