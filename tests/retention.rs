//! Reading back what was written (issue #13): with default settings a client
//! reads its own records after a checkpoint and a restart; every refusal of
//! a Read or Follow says what is true of its LSN (never existed, not
//! retained and why, beyond the end, inside a record); `walden read
//! --format hex|json` prints binary payloads readably. Real `walden serve`
//! processes, driven through `walden read` and the client library.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{run_bounded, ServerProcess};
use walden::client::{Client, ClientError};
use walden::protocol::ErrorCode;
use walden::record::stream_len;
use walden::{Durability, Kind, Lsn};

/// A `walden serve` on `dir` that can be stopped with SIGTERM and started
/// again on the same directory (ServerProcess owns its directory).
struct Restartable {
    dir: PathBuf,
    settings: Vec<String>,
    child: Option<Child>,
    addr: String,
}

impl Restartable {
    fn start(dir: &Path, settings: &[&str]) -> Restartable {
        let mut s = Restartable {
            dir: dir.to_path_buf(),
            settings: settings.iter().map(|s| s.to_string()).collect(),
            child: None,
            addr: String::new(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_walden"));
        cmd.arg("serve").arg("-D").arg(&self.dir);
        for s in ["listen_addr=127.0.0.1:0", "metrics_addr="]
            .into_iter()
            .chain(self.settings.iter().map(|s| s.as_str()))
        {
            cmd.args(["-c", s]);
        }
        let log = std::fs::File::create(self.dir.with_extension("log")).unwrap();
        let child = cmd
            .env("WALDEN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let file = self.dir.join("data/walden.addr");
        let t = Instant::now();
        self.addr = loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some(a) = text.lines().find_map(|l| l.strip_prefix("listen_addr=")) {
                    break a.to_string();
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("walden serve exited ({st}):\n{}", self.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "walden serve did not write walden.addr:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// SIGTERM, a clean exit (within 30 s), and a new process on the directory.
    fn restart(&mut self) {
        let mut child = self.child.take().unwrap();
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let t = Instant::now();
        let exit = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no exit 30 s after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "clean shutdown: {exit:?}\n{}", self.log());
        self.spawn();
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn connect(addr: &str) -> Client {
    let c = Client::connect(addr, None).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c
}

/// `walden ARGS -H addr`, which must succeed; its standard output.
fn walden_ok(addr: &str, args: &[&str]) -> String {
    let out = walden(addr, args);
    assert!(
        out.status.success(),
        "walden {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `walden ARGS -H addr`, which must fail; its standard error.
fn walden_err(addr: &str, args: &[&str]) -> String {
    let out = walden(addr, args);
    assert!(
        !out.status.success(),
        "walden {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn walden(addr: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["-H", addr]);
    run_bounded(&all)
}

/// The refusal of a Read from `from`: its code and message.
fn read_refused(c: &mut Client, from: Lsn) -> String {
    match c.read(from, 1 << 20, 0) {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::UNKNOWN_LSN, "{message}");
            message
        }
        other => panic!("a Read from {from} was not refused: {other:?}"),
    }
}

/// `CHECKPOINT at X (redo Y)` from `walden checkpoint`.
fn checkpoint(addr: &str) -> (Lsn, Lsn) {
    let out = walden_ok(addr, &["checkpoint"]);
    let rest = out.trim().strip_prefix("CHECKPOINT at ").unwrap();
    let (lsn, redo) = rest.split_once(" (redo ").unwrap();
    (
        lsn.parse().unwrap(),
        redo.strip_suffix(')').unwrap().parse().unwrap(),
    )
}

/// Records of these sizes, text and binary, appended at `local`.
fn append_some(c: &mut Client, n: usize, size: usize) -> Vec<(Lsn, Vec<u8>)> {
    let mut written = Vec::new();
    for i in 0..n {
        let p: Vec<u8> = if i % 2 == 0 {
            format!("record {i} ").repeat(size / 9 + 1).into_bytes()[..size].to_vec()
        } else {
            walden::testkit::payload(i as u64, size)
        };
        let ack = c.append(Durability::Local, &[(Kind::DATA, &p)]).unwrap();
        written.push((ack.lsns[0], p));
    }
    written
}

/// Every DATA record readable from `from`, by the protocol.
fn read_all(c: &mut Client, mut from: Lsn) -> Vec<(Lsn, Vec<u8>)> {
    let mut all = Vec::new();
    loop {
        let (recs, end) = c.read(from, 4 << 20, 0).unwrap();
        if recs.is_empty() {
            return all;
        }
        all.extend(
            recs.into_iter()
                .filter(|r| r.kind == Kind::DATA)
                .map(|r| (r.lsn, r.payload)),
        );
        from = end;
    }
}

/// Default settings (16 MiB segments, the default wal_keep_size): what a
/// client wrote is read back byte for byte from the stream's first LSN after
/// `walden checkpoint` and after a clean restart (its shutdown checkpoint).
/// Before, both released everything before the redo point: `UNKNOWN_LSN:
/// WAL before … has been removed`.
#[test]
fn default_settings_keep_what_was_written_across_checkpoint_and_restart() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("walden");
    let mut s = Restartable::start(&dir, &[]);
    let mut c = connect(&s.addr);
    let first = Lsn(16 << 20);
    // The stream's first record is walden's (its first checkpoint); the
    // client's follow it.
    let mut written = append_some(&mut c, 200, 3000);
    assert!(written[0].0 > first && written[0].0 < Lsn(first.0 + 4096));
    let (_, redo) = checkpoint(&s.addr);
    written.extend(append_some(&mut c, 50, 1000));
    assert!(
        redo > first,
        "the checkpoint's redo point {redo} is past the records"
    );
    assert_eq!(read_all(&mut c, first), written, "after the checkpoint");
    drop(c);

    s.restart();
    let mut c = connect(&s.addr);
    assert_eq!(read_all(&mut c, first), written, "after the restart");
    // And through the tool: the text records as they were written.
    let out = walden_ok(&s.addr, &["read", "--from", "0/1000000", "-n", "3"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        lines[0],
        format!(
            "{}\t{}",
            written[0].0,
            std::str::from_utf8(&written[0].1).unwrap()
        )
    );
    assert!(
        lines[1].starts_with(&format!("{}\t", written[1].0)),
        "{out}"
    );
    assert_eq!(
        lines[2],
        format!(
            "{}\t{}",
            written[2].0,
            std::str::from_utf8(&written[2].1).unwrap()
        )
    );
}

/// Below the stream's first byte nothing ever existed: 0/0 on a fresh server
/// says so (before: "WAL before 0/100000 has been removed"). Past the end of
/// WAL, the message says where the next record will start.
#[test]
fn lsns_that_never_existed_and_beyond_the_end_say_so() {
    let s = ServerProcess::start(&[]);
    let err = walden_err(&s.addr, &["read", "--from", "0/0"]);
    assert!(
        err.contains(
            "UNKNOWN_LSN: 0/0 never existed: the WAL stream starts at 0/100000 \
             (wal_segment_size), and the retained WAL at 0/100000"
        ),
        "{err}"
    );
    let mut c = connect(&s.addr);
    let ack = c
        .append(Durability::Local, &[(Kind::DATA, b"one record")])
        .unwrap();
    let far = Lsn(ack.end.0 + (1 << 20));
    assert_eq!(
        read_refused(&mut c, far),
        format!(
            "{far} is beyond the end of WAL: the next record will start at {}",
            ack.end
        )
    );
}

/// With wal_keep_size = 0 a checkpoint releases the WAL before its redo
/// point; a Read of it names the setting and the checkpoint that released
/// it; after a restart (when this process did not release it) the latest
/// checkpoint of the control file. Before: "WAL before X has been removed".
#[test]
fn released_wal_names_wal_keep_size_and_the_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("walden");
    let mut s = Restartable::start(&dir, &["wal_segment_size=1MB", "wal_keep_size=0"]);
    let mut c = connect(&s.addr);
    let written = append_some(&mut c, 300, 10_000); // 3 MB: past two segments
    let first = Lsn(1 << 20); // the stream's first record
    let (ckpt, redo) = checkpoint(&s.addr);
    let err = walden_err(&s.addr, &["read", "--from", &first.to_string()]);
    assert!(
        err.contains(&format!(
            "UNKNOWN_LSN: {first} is not retained (wal_keep_size = 0; released by the \
             checkpoint at {ckpt}): the WAL now starts at {redo}"
        )),
        "{err}"
    );
    // Still on disk or not, a record before the start is never served: one
    // in the start's own segment, whose file is kept.
    let (in_start_segment, _) = *written
        .iter()
        .rev()
        .find(|(l, _)| *l < redo && l.segno(1 << 20) == redo.segno(1 << 20))
        .unwrap();
    assert!(read_refused(&mut c, in_start_segment).contains("is not retained"));
    // A Follow is refused the same way.
    c.follow(first).unwrap();
    match c.recv() {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::UNKNOWN_LSN);
            assert!(
                message.contains(&format!("released by the checkpoint at {ckpt}")),
                "{message}"
            );
        }
        other => panic!("a Follow from {first} was not refused: {other:?}"),
    }
    drop(c);

    s.restart();
    let mut c = connect(&s.addr);
    let (_, _, _, json) = c.status().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let (latest, latest_redo, start) = (
        v["page_store"]["checkpoint_lsn"]
            .as_str()
            .unwrap()
            .to_string(),
        v["page_store"]["redo_lsn"].as_str().unwrap().to_string(),
        v["start_lsn"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        read_refused(&mut c, first),
        format!(
            "{first} is not retained (wal_keep_size = 0; released before this server \
             started; the latest checkpoint is at {latest} (redo {latest_redo})): the WAL \
             now starts at {start}"
        )
    );
}

/// An LSN inside a record (after its start, unaligned, deep inside a large
/// payload, in its padding) is answered with the record that covers it and
/// the next record's start, for Read, `walden read` and Follow. Before: "no
/// record starts at X: record at X has wrong LSN …" (the decoder's detail).
#[test]
fn an_lsn_inside_a_record_names_the_record_and_the_next_start() {
    let s = ServerProcess::start(&[]);
    let mut c = connect(&s.addr);
    c.append(Durability::Local, &[(Kind::DATA, b"before")])
        .unwrap();
    let big = walden::testkit::payload(7, 200_000);
    let ack = c
        .append(
            Durability::Local,
            &[
                (Kind::DATA, b"hello, inside"),
                (Kind(7), &big),
                (Kind::DATA, b"x"),
            ],
        )
        .unwrap();
    let (small, large, last) = (ack.lsns[0], ack.lsns[1], ack.lsns[2]);
    assert_eq!(large.0, small.0 + stream_len(13));
    let inside = |at: Lsn, rec: Lsn, kind: &str, len: usize, next: Lsn| {
        format!(
            "{at} is inside the record at {rec} ({kind}, {len} bytes of payload); \
             the next record starts at {next}"
        )
    };
    for at in [Lsn(small.0 + 8), Lsn(small.0 + 3), Lsn(small.0 + 36)] {
        assert_eq!(
            read_refused(&mut c, at),
            inside(at, small, "DATA", 13, large),
            "at {at}"
        );
    }
    let deep = Lsn(large.0 + 150_000);
    assert_eq!(
        read_refused(&mut c, deep),
        inside(deep, large, "USER7", 200_000, last)
    );
    let err = walden_err(&s.addr, &["read", "--from", &Lsn(small.0 + 16).to_string()]);
    assert!(
        err.contains(&inside(Lsn(small.0 + 16), small, "DATA", 13, large)),
        "{err}"
    );
    c.follow(Lsn(small.0 + 16)).unwrap();
    match c.recv() {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::UNKNOWN_LSN);
            assert_eq!(message, inside(Lsn(small.0 + 16), small, "DATA", 13, large));
        }
        other => panic!("a Follow from inside a record was not refused: {other:?}"),
    }
}

/// `--format hex` dumps each payload as `walden page read` does;
/// `--format json` prints one object per record, UTF-8 payloads as text and
/// others as hex. Before, `--format` was not an option.
#[test]
fn read_formats_hex_and_json() {
    let s = ServerProcess::start(&[]);
    let mut c = connect(&s.addr);
    let binary: Vec<u8> = vec![0x00, 0x01, 0xff, b'a', b'b', 0x80, 0x0a, 0x22];
    let ack = c
        .append(
            Durability::Local,
            &[(Kind::DATA, b"hello \"json\"\n"), (Kind::DATA, &binary)],
        )
        .unwrap();
    let (a, b) = (ack.lsns[0], ack.lsns[1]);
    let from = a.to_string();

    let hex = walden_ok(&s.addr, &["read", "--from", &from, "--format", "hex"]);
    assert_eq!(
        hex,
        format!(
            "{a} DATA, 13 bytes\n\
             00000000  68 65 6c 6c 6f 20 22 6a  73 6f 6e 22 0a           |hello \"json\".|\n\
             0000000d\n\
             {b} DATA, 8 bytes\n\
             00000000  00 01 ff 61 62 80 0a 22                           |...ab..\"|\n\
             00000008\n"
        )
    );

    let json = walden_ok(&s.addr, &["read", "--from", &from, "--format", "json"]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            serde_json::json!({"lsn": a.to_string(), "kind": "DATA", "length": 13,
                               "encoding": "utf8", "payload": "hello \"json\"\n"}),
            serde_json::json!({"lsn": b.to_string(), "kind": "DATA", "length": 8,
                               "encoding": "hex", "payload": "0001ff6162800a22"}),
        ]
    );
    // The default stays the text form.
    let text = walden_ok(&s.addr, &["read", "--from", &from]);
    assert_eq!(
        text,
        format!("{a}\thello \\\"json\\\"\\n\n{b}\t\\0\\u{{1}}\u{fffd}ab\u{fffd}\\n\\\"\n")
    );
}
