//! Terms that fence a deposed primary (issue #15), with real processes: a
//! primary that comes back after its standby was promoted is deposed by the
//! first standby of the new term that connects to it (STALE_TERM); its
//! waiting `on` commit ends INDETERMINATE, never success; it accepts no new
//! writes, says so in its status, and stays deposed after a restart. A
//! standby persists a newer term it streams in before it reports.

use std::io::Write;
use std::process::{Command, Output, Stdio};
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

fn flushed_on_standby(s: &Node) -> Lsn {
    s.status()["replication"]["wal_receiver"]["flushed_lsn"]
        .as_str()
        .and_then(|l| l.parse().ok())
        .unwrap_or(Lsn(0))
}

/// `walden append --level LEVEL -h ADDR` of one line (a wait for
/// standbys given up after 20 s: INDETERMINATE, reason cancelled).
fn append_cli(addr: &str, level: &str) -> Output {
    let mut child = Command::new(WALDEN)
        .args(["append", "-h", addr, "--level", level])
        .args(["--wait-timeout", "20s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one record\n")
        .unwrap();
    child.wait_with_output().unwrap()
}

/// P with standby S (`ANY 1 (*)`, `on`); P stopped, S promoted (term 2);
/// P restarted as it was. A standby of term 2 pointed at P deposes it.
#[test]
fn a_deposed_primary_acknowledges_nothing_and_stays_deposed() {
    let dir = tempfile::tempdir().unwrap();
    let sync = ["synchronous_standby_names=ANY 1 (*)"];
    let mut p = Node::start(&dir.path().join("p"), &sync);
    let s = Node::start(&dir.path().join("s"), &standby_settings(&p, "s"));
    let mut c = p.client();
    let mut acked = Lsn(0);
    for i in 0..50u32 {
        acked = c
            .append(Durability::On, &[(Kind::DATA, &[i as u8; 100])])
            .unwrap()
            .end;
    }
    drop(c);
    p.stop();
    // The shutdown checkpoint wrote the quorum flush LSN: a floor for rewind.
    let floor: Lsn = control_line(&controldata(&p.dir), "Acknowledged LSN (quorum flushed)")
        .parse()
        .unwrap();
    assert!(floor >= acked, "acknowledged LSN {floor} below {acked}");
    let o = run_bounded(&["promote", "-D", s.dir.to_str().unwrap(), "-t", "25"]);
    assert!(o.status.success(), "promote: {}\n{}", text(&o), s.log());
    assert_eq!(s.status()["term"], 2, "a promotion's timeline is its term");

    // A standby of the new term: a copy of S.
    let copy = dir.path().join("s2");
    common::basebackup_standby(&s, &copy, "s2");
    assert_eq!(control_line(&controldata(&copy), "Latest term"), "2");

    // P comes back, not rewound, same settings: still a primary of term 1.
    p.restart();
    assert_eq!(p.status()["replication"]["role"], "primary");
    assert_eq!(p.status()["term"], 1);
    let waiting = {
        let addr = p.addr.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            (append_cli(&addr, "on"), started.elapsed())
        })
    };
    wait_until("the `on` append waits on P", &[&p], || {
        p.status()["replication"]["commits_waiting"] == 1
    });

    // S2 follows term 2 and is pointed at P.
    let s2 = Node::start(&copy, &standby_settings(&p, "s2"));
    wait_until("P is deposed", &[&p, &s2], || {
        p.log()
            .contains("deposed by term 2: no longer acknowledging commits")
    });
    let (out, took) = waiting.join().unwrap();
    assert!(
        !out.status.success(),
        "the `on` append succeeded: {}",
        text(&out)
    );
    let said = text(&out);
    assert!(
        said.contains("INDETERMINATE") && said.contains("no longer the primary"),
        "{said}"
    );
    assert!(took < Duration::from_secs(20), "answered after {took:?}");

    // S2 was refused, with both terms, and streams nothing from P.
    wait_until("S2 reports the refusal", &[&p, &s2], || {
        s2.status()["replication"]["wal_receiver"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("STALE_TERM"))
    });
    let err = s2.status()["replication"]["wal_receiver"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains("this server's term 1 is below the standby's term 2"),
        "{err}"
    );
    assert!(s2.log().contains("STALE_TERM"), "{}", s2.log());
    assert_eq!(
        s2.status()["replication"]["wal_receiver"]["connections"],
        0,
        "S2 never streamed from P"
    );

    // No new work on P, at any level.
    let deposed = "this server was deposed by term 2: it accepts no writes; \
                   rewind it with `walden rewind` and start it as a standby";
    for level in ["local", "off", "on"] {
        let o = append_cli(&p.addr, level);
        assert!(!o.status.success(), "a {level} append on P: {}", text(&o));
        assert!(text(&o).contains(deposed), "{level}: {}", text(&o));
    }
    let o = run_bounded(&[
        "basebackup",
        "-h",
        &p.addr,
        "-D",
        dir.path().join("from-p").to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "a base backup of P: {}", text(&o));
    assert!(
        text(&o).contains("this server was deposed by term 2: it takes no base backups"),
        "{}",
        text(&o)
    );
    let st = p.status();
    assert_eq!(st["role"], "deposed primary");
    assert_eq!(st["replication"]["role"], "deposed primary");
    assert_eq!(st["term"], 2);
    assert_eq!(st["deposed_by_term"], 2);
    assert_eq!(st["timeline"], 1);
    let o = run_bounded(&["status", "-D", p.dir.to_str().unwrap()]);
    assert!(
        text(&o).contains("role:            deposed primary"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("deposed:         by term 2"),
        "{}",
        text(&o)
    );

    // The term is persisted: P stays deposed after a restart.
    drop(s2);
    p.stop();
    let cd = controldata(&p.dir);
    assert_eq!(control_line(&cd, "Latest term"), "2");
    assert_eq!(control_line(&cd, "Latest checkpoint's TimeLineID"), "1");
    p.restart();
    assert_eq!(p.status()["role"], "deposed primary");
    let o = append_cli(&p.addr, "local");
    assert!(
        !o.status.success() && text(&o).contains(deposed),
        "{}",
        text(&o)
    );
    assert!(
        p.log().matches("deposed by term 2").count() >= 2,
        "deposed again at the start:\n{}",
        p.log()
    );
}

/// A standby whose term is below its new primary's persists the primary's
/// term on the first stream, before it reports anything and while it still
/// streams its old timeline: S2 was down while S was promoted (timeline 2),
/// then follows S across the switch.
#[test]
fn a_standby_persists_a_higher_term_it_streams_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let s = Node::start(&dir.path().join("s"), &standby_settings(&p, "s"));
    let mut s2 = Node::start(&dir.path().join("s2"), &standby_settings(&p, "s2"));
    let mut c = p.client();
    let a = c
        .append(Durability::Local, &[(Kind::DATA, b"before")])
        .unwrap();
    drop(c);
    wait_until("S and S2 have P's WAL", &[&p, &s, &s2], || {
        flushed_on_standby(&s) >= a.end && flushed_on_standby(&s2) >= a.end
    });
    s2.stop();
    assert_eq!(control_line(&controldata(&s2.dir), "Latest term"), "1");
    p.kill9();
    let o = run_bounded(&["promote", "-D", s.dir.to_str().unwrap(), "-t", "25"]);
    assert!(o.status.success(), "promote: {}\n{}", text(&o), s.log());

    s2.settings = standby_settings(&s, "s2");
    s2.restart();
    let mut c = s.client();
    let b = c
        .append(Durability::Local, &[(Kind::DATA, b"after")])
        .unwrap();
    drop(c);
    wait_until("S2 streams S's new WAL", &[&s, &s2], || {
        flushed_on_standby(&s2) >= b.end
    });
    assert_eq!(s2.status()["term"], 2);
    let log = s2.log();
    let adopted = log
        .find("has term 2: this standby now follows it")
        .unwrap_or_else(|| panic!("no term adoption in the log:\n{log}"));
    let switched = log
        .find("End of WAL reached on timeline 1")
        .unwrap_or_else(|| panic!("no timeline switch in the log:\n{log}"));
    assert!(
        adopted < switched,
        "the term was adopted only after the timeline switch:\n{log}"
    );
    s2.stop();
    assert_eq!(control_line(&controldata(&s2.dir), "Latest term"), "2");
}
