//! Replication slots with real `walden serve` processes: created, listed
//! and dropped from the CLI, kept across restarts (kill -9 too), used by a
//! fake standby (a client sending StartReplication and StandbyStatus), the
//! WAL they hold, and `max_slot_wal_keep_size` making them lost.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::Node;
use walden::client::{Client, ClientError};
use walden::protocol::{ErrorCode, Frame};
use walden::{Durability, Kind, Lsn};

impl Node {
    fn slot(&self, name: &str) -> Option<serde_json::Value> {
        self.status()["slots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["slot_name"] == name)
            .cloned()
    }

    /// `walden ARGS -h ADDR`: (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(args)
            .args(["-h", &self.addr])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// GET /metrics from the address in walden.addr.
    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let text = std::fs::read_to_string(self.dir.join("data/walden.addr")).unwrap();
        let addr = text
            .lines()
            .find_map(|l| l.strip_prefix("metrics_addr="))
            .expect("metrics_addr in walden.addr");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn checkpoint(&self) {
        self.client().checkpoint().unwrap();
    }

    fn wal_segments(&self) -> usize {
        std::fs::read_dir(self.dir.join("wal"))
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .count()
    }
}

fn lsn(v: &serde_json::Value) -> Lsn {
    v.as_str().unwrap().parse().unwrap()
}

/// Appends `n` records of `size` bytes; the end of the last.
fn write_wal(c: &mut Client, n: usize, size: usize) -> Lsn {
    let payload = vec![0x5A; size];
    let mut end = Lsn(0);
    for _ in 0..n {
        end = c
            .append(Durability::Local, &[(Kind::DATA, &payload)])
            .unwrap()
            .end;
    }
    end
}

/// A client that sent StartReplication on `slot` from the WAL's start.
fn start_replication(node: &Node, slot: &str, start: Lsn) -> Client {
    let mut c = node.client();
    c.queue(&Frame::StartReplication {
        request_id: 77,
        system_id: 0,
        timeline: 1,
        start,
        term: 1,
        slot: slot.into(),
        application_name: "fake".into(),
    });
    c.flush().unwrap();
    c
}

/// The Error frame the stream ends with (WAL frames before it are skipped).
fn stream_error(c: &mut Client) -> (ErrorCode, String) {
    loop {
        match c.recv_frame() {
            Ok(Frame::Error { code, message, .. }) => return (code, message),
            Err(ClientError::Server { code, message }) => return (code, message),
            Ok(Frame::StreamStart { .. } | Frame::WalData { .. } | Frame::Keepalive { .. }) => {}
            other => panic!("expected an Error, got {other:?}"),
        }
    }
}

#[test]
fn slot_cli_creates_lists_drops_and_slots_survive_restarts() {
    let d = tempfile::tempdir().unwrap();
    let mut node = Node::start(&d.path().join("p"), &[] as &[&str]);
    let (ok, out, err) = node.cli(&["slot", "create", "s1"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("created replication slot \"s1\" (restart_lsn "),
        "{out}"
    );
    let s1 = node.slot("s1").expect("s1 listed");
    assert_eq!(s1["wal_status"], "reserved");
    assert_eq!(s1["active"], false);
    let restart = lsn(&s1["restart_lsn"]);
    // Reserved at the redo point: the WAL from there is retained.
    let st = node.status();
    assert_eq!(restart, lsn(&st["page_store"]["redo_lsn"]));
    assert!(lsn(&st["start_lsn"]) <= restart);
    let (ok, out, _) = node.cli(&["slot", "list"]);
    assert!(
        ok && out.contains("s1") && out.contains("reserved") && out.contains("(1 rows)"),
        "{out}"
    );

    let (ok, _, err) = node.cli(&["slot", "create", "s1"]);
    assert!(!ok);
    assert!(
        err.contains("replication slot \"s1\" already exists"),
        "{err}"
    );
    let (ok, _, err) = node.cli(&["slot", "create", "Bad-Name"]);
    assert!(!ok);
    assert!(err.contains("contains invalid character"), "{err}");
    let (ok, _, err) = node.cli(&["slot", "create", &"a".repeat(64)]);
    assert!(!ok);
    assert!(err.contains("too long"), "{err}");
    let (ok, _, err) = node.cli(&["slot", "drop", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("replication slot \"nope\" does not exist"),
        "{err}"
    );
    // The server checks names too (not only the CLI).
    let e = node
        .client()
        .slot(walden::protocol::SlotOp::Create, "A")
        .unwrap_err();
    assert!(e.to_string().contains("slot name has byte 0x41"), "{e}");

    node.kill9();
    node.restart();
    let s1 = node.slot("s1").expect("s1 after kill -9");
    assert_eq!(lsn(&s1["restart_lsn"]), restart);
    assert!(node.cli(&["slot", "create", "s2"]).0);
    node.stop();
    node.restart();
    assert!(node.slot("s2").is_some());
    let (ok, out, err) = node.cli(&["slot", "drop", "s1"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "dropped replication slot \"s1\"");
    node.kill9();
    node.restart();
    assert!(node.slot("s1").is_none());
    assert!(node.slot("s2").is_some());
}

#[test]
fn a_fake_standby_streams_from_its_slot_and_advances_it() {
    let d = tempfile::tempdir().unwrap();
    let node = Node::start(&d.path().join("p"), &["metrics_addr=127.0.0.1:0"]);
    let start = lsn(&node.status()["start_lsn"]);

    // Unknown slot.
    let mut c = start_replication(&node, "nope", start);
    let (code, msg) = stream_error(&mut c);
    assert_eq!(code, ErrorCode::UNKNOWN_SLOT);
    assert_eq!(msg, "replication slot \"nope\" does not exist");

    assert!(node.cli(&["slot", "create", "s1"]).0);
    let mut a = node.client();
    let end = write_wal(&mut a, 10, 1000);
    let mut sb = start_replication(&node, "s1", start);
    let mut got = start;
    while got < end {
        match sb.recv_frame().unwrap() {
            Frame::StreamStart { .. } | Frame::Keepalive { .. } => {}
            Frame::WalData { start: s, wal, .. } => {
                assert_eq!(s, got);
                got = Lsn(s.0 + wal.len() as u64);
            }
            other => panic!("{other:?}"),
        }
    }
    let s1 = node.slot("s1").unwrap();
    assert_eq!(s1["active"], true);
    assert!(s1["active_pid"].as_u64().is_some());

    // One user at a time; no drop while it streams.
    let mut second = start_replication(&node, "s1", start);
    let (code, msg) = stream_error(&mut second);
    assert_eq!(code, ErrorCode::SLOT_ACTIVE);
    assert_eq!(
        msg,
        format!(
            "replication slot \"s1\" is active for PID {}",
            s1["active_pid"]
        )
    );
    let (ok, _, err) = node.cli(&["slot", "drop", "s1"]);
    assert!(!ok && err.contains("is active for PID"), "{err}");

    // The standby's flush moves the slot (in memory at once).
    sb.queue(&Frame::StandbyStatus {
        request_id: 77,
        write: end,
        flush: end,
        apply: end,
        send_time: 0,
        reply_requested: false,
    });
    sb.flush().unwrap();
    let t = Instant::now();
    while lsn(&node.slot("s1").unwrap()["restart_lsn"]) != end {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "slot never advanced to {end}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And persisted by a checkpoint.
    node.checkpoint();
    let text = std::fs::read_to_string(d.path().join("p/data/slots/s1")).unwrap();
    let want = end.to_string().replacen('/', ":", 1);
    assert!(
        text.starts_with(&want),
        "{text:?} does not start with {want}"
    );

    // /metrics has the slot's restart LSN.
    let metrics = node.metrics();
    let line = metrics
        .lines()
        .find(|l| l.contains("slot_restart_lsn") && l.contains("slot=\"s1\""))
        .unwrap_or_else(|| panic!("no slot_restart_lsn for s1:\n{metrics}"));
    assert!(line.ends_with(&format!(" {}", end.0)), "{line}");
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("slot_lost") && l.contains("slot=\"s1\"") && l.ends_with(" 0")),
        "{metrics}"
    );

    // The stream ends: the slot is free again.
    drop(sb);
    let t = Instant::now();
    while node.slot("s1").unwrap()["active"] != false {
        assert!(t.elapsed() < Duration::from_secs(10), "slot still active");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(node.cli(&["slot", "drop", "s1"]).0);
}

#[test]
fn a_slot_holds_wal_until_max_slot_wal_keep_size_makes_it_lost() {
    let d = tempfile::tempdir().unwrap();
    let small = ["wal_keep_size=0", "max_wal_size=4MB", "min_wal_size=2MB"];
    let mut node = Node::start(&d.path().join("p"), &small);
    let mut c = node.client();

    // No cap: the slot's WAL stays through checkpoints.
    assert!(node.cli(&["slot", "create", "s1"]).0);
    let restart = lsn(&node.slot("s1").unwrap()["restart_lsn"]);
    for _ in 0..3 {
        write_wal(&mut c, 40, 50_000); // 2 MB
        node.checkpoint();
    }
    let st = node.status();
    assert!(
        lsn(&st["start_lsn"]) <= restart,
        "WAL released past the slot: {st}"
    );
    assert!(node.wal_segments() >= 6, "{} segments", node.wal_segments());
    let s1 = node.slot("s1").unwrap();
    assert_eq!(s1["wal_status"], "extended", "{s1}");
    assert_eq!(s1["safe_wal_size"], serde_json::Value::Null);
    // Without the slot the same checkpoint releases it.
    assert!(node.cli(&["slot", "drop", "s1"]).0);
    node.checkpoint();
    assert!(lsn(&node.status()["start_lsn"]) > restart);

    // With a cap of 2 MB: the slot is lost at the checkpoint past it.
    drop(c);
    node.stop();
    node.settings.push("max_slot_wal_keep_size=2MB".into());
    node.restart();
    let mut c = node.client();
    assert!(node.cli(&["slot", "create", "s2"]).0);
    assert!(node.cli(&["slot", "create", "s3"]).0);
    let start = lsn(&node.status()["start_lsn"]);
    // A standby streaming from s3 that never confirms anything.
    let mut sb = start_replication(&node, "s3", start);
    match sb.recv_frame().unwrap() {
        Frame::StreamStart { .. } => {}
        other => panic!("{other:?}"),
    }
    write_wal(&mut c, 20, 50_000); // 1 MB: within the cap
    node.checkpoint();
    let s2 = node.slot("s2").unwrap();
    assert_eq!(s2["wal_status"], "reserved", "{s2}");
    assert!(s2["safe_wal_size"].as_i64().unwrap() > 0, "{s2}");
    let mut peak = 0;
    for _ in 0..6 {
        write_wal(&mut c, 40, 50_000);
        node.checkpoint();
        peak = peak.max(node.wal_segments());
    }
    for name in ["s2", "s3"] {
        let s = node.slot(name).unwrap();
        assert_eq!(s["wal_status"], "lost", "{s}");
        assert!(
            node.log().contains(&format!(
                "invalidating slot \"{name}\" because its restart_lsn"
            )),
            "{}",
            node.log()
        );
    }
    // The stream on the lost slot was ended with SLOT_LOST.
    let (code, msg) = stream_error(&mut sb);
    assert_eq!(code, ErrorCode::SLOT_LOST);
    assert!(
        msg.contains("can no longer get changes from replication slot \"s3\""),
        "{msg}"
    );
    // The WAL stops growing: bounded by max_wal_size, not the 12 MB written.
    assert!(peak <= 7, "WAL grew to {peak} segments");
    assert!(lsn(&node.status()["start_lsn"]) > start);
    // A new stream on a lost slot is refused, also after a restart.
    let mut again = start_replication(&node, "s2", lsn(&node.status()["start_lsn"]));
    let (code, msg) = stream_error(&mut again);
    assert_eq!(code, ErrorCode::SLOT_LOST);
    assert_eq!(
        msg,
        "can no longer get changes from replication slot \"s2\": this slot has been \
         invalidated because it exceeded the maximum reserved size"
    );
    drop((c, sb, again));
    node.kill9();
    node.restart();
    assert_eq!(node.slot("s2").unwrap()["wal_status"], "lost");
    // A lost slot can be dropped.
    assert!(node.cli(&["slot", "drop", "s2"]).0);
}
