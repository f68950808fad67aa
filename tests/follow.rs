//! Standbys follow a promotion across the timeline switch, with real
//! processes: a standby of the old primary pointed at the promoted one
//! (primary_conninfo reloaded) ends timeline 1 at the switch point, fetches
//! the history file, restarts on timeline 2 and streams on, its WAL byte
//! for byte the new primary's; a standby that was down through two
//! promotions follows through both; a standby whose WAL goes past the
//! switch point is refused with DIVERGED and its WAL is left as it was.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

mod common;
use common::{run_bounded, standby_settings, wait_until, Node};
use walden::protocol::{ErrorCode, Frame};
use walden::{Durability, Kind, Lsn};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The node's /status, or `None` while it is not answering (an in-process
/// restart closes its socket for a moment; during recovery it answers
/// without the replication section).
fn status(n: &Node) -> Option<serde_json::Value> {
    let mut c = walden::client::Client::connect(&n.addr, None).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let (_, _, _, json) = c.status().ok()?;
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    v.get("flush_lsn")?.as_str()?;
    v["replication"]["role"].as_str()?;
    Some(v)
}

fn flush_lsn(n: &Node) -> Lsn {
    let t = Instant::now();
    loop {
        if let Some(v) = status(n) {
            return v["flush_lsn"].as_str().unwrap().parse().unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no status:\n{}",
            n.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn role_and_timeline(n: &Node) -> (String, u64) {
    match status(n) {
        Some(s) => (
            s["replication"]["role"].as_str().unwrap().to_string(),
            s["timeline"].as_u64().unwrap(),
        ),
        None => (String::new(), 0),
    }
}

fn promote(n: &Node) {
    let o = run_bounded(&["promote", "-D", n.dir.to_str().unwrap(), "-t", "25"]);
    assert!(o.status.success(), "promote: {}\n{}", text(&o), n.log());
}

/// `walden waldump` of a stopped node's WAL (it follows the timelines).
fn waldump(dir: &Path) -> String {
    let o = run_bounded(&["waldump", "-p", dir.join("wal").to_str().unwrap()]);
    assert!(o.status.success(), "waldump: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn append(n: &Node, count: u32, tag: &str) {
    let mut c = n.client();
    for i in 0..count {
        let payload = format!("{tag} {i}");
        c.append(Durability::Local, &[(Kind::DATA, payload.as_bytes())])
            .unwrap();
    }
}

fn conninfo(primary: &Node, name: &str) -> String {
    format!(
        "host=127.0.0.1 port={} application_name={name}",
        primary.port()
    )
}

/// A standby whose primary_conninfo is in a configuration file (so that
/// a SIGHUP can change it).
fn start_standby_with_config(dir: &Path, primary: &Node, name: &str) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    let config: PathBuf = dir.join("walden.toml");
    std::fs::write(
        &config,
        format!("primary_conninfo = \"{}\"\n", conninfo(primary, name)),
    )
    .unwrap();
    let mut n = Node {
        dir: dir.to_path_buf(),
        child: None,
        addr: String::new(),
        settings: Vec::new(),
        config: Some(config),
        env: Vec::new(),
    };
    n.restart();
    n
}

/// Points a stopped standby at `primary` and starts it.
fn restart_as_standby_of(n: &mut Node, primary: &Node, name: &str) {
    n.stop();
    n.settings = standby_settings(primary, name);
    n.restart();
}

fn caught_up(standby: &Node, primary: &Node) {
    let end = flush_lsn(primary);
    wait_until("the standby caught up", &[primary, standby], || {
        flush_lsn(standby) >= end
    });
}

/// Stops `primary` cleanly (it streams its shutdown checkpoint to its
/// standbys first), waits until each standby's flush LSN stops moving,
/// stops them, and returns their dumps.
fn stop_all_and_dump(primary: &mut Node, standbys: &mut [&mut Node]) -> (String, Vec<String>) {
    primary.stop();
    let mut dumps = Vec::new();
    for s in standbys.iter_mut() {
        let mut last = flush_lsn(s);
        let t = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = flush_lsn(s);
            if now == last || t.elapsed() > Duration::from_secs(10) {
                break;
            }
            last = now;
        }
        s.stop();
        dumps.push(waldump(&s.dir));
    }
    (waldump(&primary.dir), dumps)
}

/// The test: P with standbys S1 and S2 (`ANY 1`), load, kill -9 of
/// P, S1 promoted; S2's primary_conninfo is rewritten and reloaded: it
/// ends timeline 1 at the switch point, follows to timeline 2, receives
/// what S1 appends after the promotion, and its WAL equals S1's from the
/// first record to the last. `walden read` from before the switch still
/// works on S1.
#[test]
fn a_standby_follows_the_promoted_standby_to_timeline_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Node::start(
        &dir.path().join("p"),
        &["synchronous_standby_names=ANY 1 (s1, s2)"],
    );
    let mut s1 = Node::start(&dir.path().join("s1"), &standby_settings(&p, "s1"));
    let mut s2 = start_standby_with_config(&dir.path().join("s2"), &p, "s2");
    append(&p, 3000, "before");
    caught_up(&s1, &p);
    caught_up(&s2, &p);
    let before = flush_lsn(&p);
    p.kill9();

    promote(&s1);
    assert_eq!(role_and_timeline(&s1), ("primary".to_string(), 2));
    append(&s1, 200, "after");

    // Rewrite S2's configuration and reload it.
    s2.reload(&format!("primary_conninfo = \"{}\"\n", conninfo(&s1, "s2")));
    let line = format!(
        "primary_conninfo changed: walreceiver reconnecting to 127.0.0.1:{}",
        s1.port()
    );
    wait_until("the reload's log line", &[&s2], || s2.log().contains(&line));
    wait_until("S2 on timeline 2", &[&s1, &s2], || {
        role_and_timeline(&s2) == ("standby".to_string(), 2)
    });
    let log = s2.log();
    for l in [
        "replication terminated by primary server",
        &format!("End of WAL reached on timeline 1 at {before}"),
        "fetching timeline history file for timeline 2 from primary server",
        "new target timeline is 2",
        "started streaming WAL from primary at",
    ] {
        assert!(log.contains(l), "no {l:?} in S2's log:\n{log}");
    }
    assert!(
        s2.dir.join("wal/00000002.history").exists(),
        "S2 stored the history file"
    );
    // Appends on S1 after the promotion reach S2.
    append(&s1, 200, "later");
    caught_up(&s2, &s1);
    assert_eq!(
        s2.status()["replication"]["wal_receiver"]["status"],
        "streaming"
    );

    // `walden read` from before the switch on the promoted server reads
    // across it.
    let o = run_bounded(&["read", "-h", &s1.addr, "--from", "0/100000"]);
    assert!(o.status.success(), "read: {}", text(&o));
    let out = text(&o);
    let (first, last) = (out.find("before 0"), out.find("later 199"));
    assert!(
        first.is_some() && last.is_some() && first < last,
        "read from 0/100000:\n{}",
        &out[out.len().saturating_sub(2000)..]
    );

    let (d1, dumps) = stop_all_and_dump(&mut s1, &mut [&mut s2]);
    assert!(d1.contains("END_OF_RECOVERY"), "{d1}");
    assert_eq!(dumps[0], d1, "S2's WAL differs from S1's");
}

/// S1 promoted (timeline 2), then S2, which followed it, promoted
/// (timeline 3); S3, down through both promotions, is pointed at S2 and
/// follows timeline 1 to its end, then timeline 2 to its end, then streams
/// timeline 3: two restarts, both history files, the same WAL as S2.
#[test]
fn a_standby_down_through_two_promotions_follows_both_switches() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let mut s1 = Node::start(&dir.path().join("s1"), &standby_settings(&p, "s1"));
    let mut s2 = Node::start(&dir.path().join("s2"), &standby_settings(&p, "s2"));
    let mut s3 = Node::start(&dir.path().join("s3"), &standby_settings(&p, "s3"));
    append(&p, 1000, "tli1");
    for s in [&s1, &s2, &s3] {
        caught_up(s, &p);
    }
    s3.stop();
    p.kill9();

    promote(&s1);
    restart_as_standby_of(&mut s2, &s1, "s2");
    wait_until("S2 on timeline 2", &[&s1, &s2], || {
        role_and_timeline(&s2) == ("standby".to_string(), 2)
    });
    append(&s1, 300, "tli2");
    caught_up(&s2, &s1);
    s1.kill9();

    promote(&s2);
    assert_eq!(role_and_timeline(&s2), ("primary".to_string(), 3));
    append(&s2, 300, "tli3");

    restart_as_standby_of(&mut s3, &s2, "s3");
    wait_until("S3 on timeline 3", &[&s2, &s3], || {
        role_and_timeline(&s3) == ("standby".to_string(), 3)
    });
    append(&s2, 100, "more");
    caught_up(&s3, &s2);
    let log = s3.log();
    for l in [
        "End of WAL reached on timeline 1 at",
        "End of WAL reached on timeline 2 at",
        "new target timeline is 2",
        "new target timeline is 3",
    ] {
        assert!(log.contains(l), "no {l:?} in S3's log:\n{log}");
    }
    for h in ["00000002.history", "00000003.history"] {
        assert_eq!(
            std::fs::read(s3.dir.join("wal").join(h)).unwrap(),
            std::fs::read(s2.dir.join("wal").join(h)).unwrap(),
            "{h}"
        );
    }
    let (d2, dumps) = stop_all_and_dump(&mut s2, &mut [&mut s3]);
    assert_eq!(
        d2.lines().filter(|l| l.contains("END_OF_RECOVERY")).count(),
        2,
        "{d2}"
    );
    assert_eq!(dumps[0], d2, "S3's WAL differs from S2's");
}

/// S1 is down while P appends more, which S2 receives; P dies; S1 is
/// promoted at the end of what it had: S2's WAL goes past the switch
/// point. Pointed at S1, S2 is refused with DIVERGED (PostgreSQL's
/// wording, the divergence point, the `walden rewind` to run) in its log
/// and `walden status`, stays on timeline 1, and its WAL is unchanged.
#[test]
fn a_diverged_standby_is_refused_and_its_wal_is_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let mut s1 = Node::start(&dir.path().join("s1"), &standby_settings(&p, "s1"));
    let mut s2 = Node::start(&dir.path().join("s2"), &standby_settings(&p, "s2"));
    append(&p, 500, "both");
    caught_up(&s1, &p);
    caught_up(&s2, &p);
    s1.stop();
    append(&p, 500, "only s2");
    caught_up(&s2, &p);
    let s2_end = flush_lsn(&s2);
    p.kill9();
    s1.restart();
    let switch = flush_lsn(&s1);
    assert!(switch < s2_end, "{switch} < {s2_end}");
    promote(&s1);

    s2.stop();
    let before = waldump(&s2.dir);
    let wal_files = |n: &Node| {
        let mut v: Vec<String> = std::fs::read_dir(n.dir.join("wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with("0000000"))
            .collect();
        v.sort();
        v
    };
    let files_before = wal_files(&s2);
    s2.settings = standby_settings(&s1, "s2");
    s2.restart();
    let want = format!(
        "requested starting point {s2_end} on timeline 1 is not in this server's history; \
         this server's history forked from timeline 1 at {switch}"
    );
    wait_until("S2 refused", &[&s1, &s2], || s2.log().contains(&want));
    let log = s2.log();
    let line = log.lines().find(|l| l.contains(&want)).unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("DIVERGED"), "{line}");
    assert!(
        line.contains(&format!(
            "walden rewind -D {} --source-server 127.0.0.1:{}",
            s2.dir.display(),
            s1.port()
        )),
        "{line}"
    );
    let st = s2.status();
    assert_eq!(st["timeline"], 1);
    let last_error = st["replication"]["wal_receiver"]["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_error in {st}"))
        .to_string();
    assert!(last_error.contains(&want), "{last_error}");
    let o = run_bounded(&["status", "-D", s2.dir.to_str().unwrap()]);
    assert!(text(&o).contains("DIVERGED"), "{}", text(&o));
    // A timeline the server never had is refused as such.
    let mut c = s1.client();
    c.queue(&Frame::StartReplication {
        request_id: 7,
        system_id: 0,
        timeline: 3,
        start: switch,
        term: 0,
        slot: String::new(),
        application_name: "x".into(),
    });
    c.flush().unwrap();
    match c.recv_frame().unwrap() {
        Frame::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::TIMELINE_NOT_IN_HISTORY);
            assert_eq!(
                message,
                "requested timeline 3 is not in this server's history (it is on timeline 2)"
            );
        }
        other => panic!("StartReplication on timeline 3: {other:?}"),
    }
    // It retries (DIVERGED again, logged once), and changes nothing.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(s2.log().matches(&want).count(), 1, "{}", s2.log());
    assert_eq!(flush_lsn(&s2), s2_end);
    s2.stop();
    assert_eq!(waldump(&s2.dir), before, "S2's WAL changed");
    assert_eq!(wal_files(&s2), files_before);
    assert!(!s2.dir.join("wal/00000002.history").exists());
}
