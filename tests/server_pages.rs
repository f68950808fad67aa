//! The page store through the server: PageWrite, PageRead and Checkpoint
//! frames, their errors (which fail one request and keep the connection),
//! pipelined page writes and appends acknowledged in LSN order, and the CLI
//! (`walden page write/read`, `walden checkpoint`, `walden status`).

use std::process::Command;
use std::time::Duration;

use walden::client::{Client, ClientError};
use walden::config::Size;
use walden::protocol::{ErrorCode, Frame};
use walden::server::Server;
use walden::store::page::PAGE_DATA;
use walden::{Config, Durability, Kind, Lsn};

fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::with_data_directory(dir);
    cfg.wal_segment_size = Size(1 << 20);
    cfg.min_wal_size = Size(2 << 20);
    cfg.listen_addr = "127.0.0.1:0".into();
    cfg.metrics_addr = String::new();
    cfg.shared_buffers = Size(1 << 20);
    // Keep the WAL the checkpoints would release, to read it back.
    cfg.wal_keep_size = Size(1 << 30);
    cfg
}

/// Kills the child on drop, so a failing test leaves no server behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect(s: &Server) -> Client {
    let c = Client::connect(&s.local_addr().to_string(), None).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c
}

fn server_error(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Server { code, .. } => code,
        other => panic!("expected a server error, got {other}"),
    }
}

#[test]
fn pages_round_trip_and_bad_requests_fail_alone() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(config(d.path())).unwrap();
    let mut c = connect(&s);
    let fresh = c.page_read(1, 5).unwrap();
    assert_eq!(fresh, (Lsn(0), vec![0; PAGE_DATA]));
    let (lsn, end) = c
        .page_write(Durability::Local, 1, 5, 100, b"hello page")
        .unwrap();
    assert!(end > lsn);
    assert!(s.wal().flush_lsn() >= end, "acknowledged at local: durable");
    let (page_lsn, data) = c.page_read(1, 5).unwrap();
    assert_eq!(page_lsn, end);
    assert_eq!(&data[100..110], b"hello page");
    assert!(data[..100].iter().all(|&b| b == 0));

    // Out of range: an error for this request only.
    let e = c
        .page_write(
            Durability::Local,
            1,
            5,
            (PAGE_DATA - 5) as u16,
            b"0123456789",
        )
        .unwrap_err();
    assert_eq!(server_error(e), ErrorCode::BAD_PAGE);
    let e = c.page_read(1, u32::MAX).unwrap_err();
    assert_eq!(server_error(e), ErrorCode::BAD_PAGE);
    // The connection is still good.
    let (_, data) = c.page_read(1, 5).unwrap();
    assert_eq!(&data[100..110], b"hello page");

    // A checkpoint, then the next change to the page is a full-page image.
    let (ckpt, redo) = c.checkpoint().unwrap();
    assert!(redo >= end && ckpt > redo);
    let (lsn2, _) = c.page_write(Durability::Local, 1, 5, 0, b"again").unwrap();
    assert!(lsn2 > ckpt);
    let (recs, _) = c.read(lsn, 1 << 20, 0).unwrap();
    let kinds: Vec<Kind> = recs.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![
            Kind::PAGE_IMAGE,
            Kind::CHECKPOINT_REDO,
            Kind::CHECKPOINT_ONLINE,
            Kind::PAGE_IMAGE
        ]
    );
    drop(c);
    s.shutdown().unwrap();

    // After a clean restart the page is there, read from the data device.
    let s = Server::start(config(d.path())).unwrap();
    let mut c = connect(&s);
    let (_, data) = c.page_read(1, 5).unwrap();
    assert_eq!(&data[..5], b"again");
    assert_eq!(&data[100..110], b"hello page");
    drop(c);
    s.shutdown().unwrap();
}

#[test]
fn pipelined_page_writes_and_appends_are_acked_in_lsn_order() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(config(d.path())).unwrap();
    let mut c = connect(&s);
    let mut ids = Vec::new();
    for i in 0..400u32 {
        let id = if i % 3 == 0 {
            c.queue_append(Durability::Local, &[(Kind::DATA, b"a record")])
        } else {
            c.queue_page_write(
                Durability::Local,
                2,
                i % 50,
                (i % 100) as u16,
                &i.to_le_bytes(),
            )
        };
        ids.push(id);
    }
    c.flush().unwrap();
    let mut last = Lsn(0);
    for id in ids {
        let (rid, lsn) = match c.recv().unwrap() {
            Frame::Ack {
                request_id, lsns, ..
            } => (request_id, lsns[0]),
            Frame::PageWritten {
                request_id, lsn, ..
            } => (request_id, lsn),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(rid, id, "acks arrive in request order");
        assert!(lsn > last, "LSNs increase in request order");
        last = lsn;
    }
    for i in 350..400u32 {
        let (_, data) = c.page_read(2, i % 50).unwrap();
        if i % 3 != 0 {
            let o = (i % 100) as usize;
            assert_eq!(&data[o..o + 4], &i.to_le_bytes(), "block {}", i % 50);
        }
    }
    drop(c);
    s.shutdown().unwrap();
}

#[test]
fn the_cli_writes_reads_and_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_walden");
    let mut server = Killed(
        Command::new(bin)
            .args(["serve", "-D"])
            .arg(d.path())
            .args(["-c", "listen_addr=127.0.0.1:0", "-c", "metrics_addr="])
            .env("WALDEN_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let addr_file = d.path().join("data/walden.addr");
    let t = std::time::Instant::now();
    while !addr_file.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .arg("-D")
            .arg(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "walden {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let w = run(&[
        "page",
        "write",
        "--rel",
        "3",
        "--block",
        "9",
        "--offset",
        "16",
        "from the shell",
    ]);
    assert!(w.contains("(page LSN "), "{w}");
    let r = run(&["page", "read", "--rel", "3", "--block", "9"]);
    assert!(r.starts_with("relation 3 block 9: page LSN "), "{r}");
    assert!(r.contains("|from the shell..|"), "{r}");
    assert!(r.contains("\n*\n"), "runs of zero lines are folded: {r}");
    assert!(r.trim_end().ends_with("\n00001fe8"), "{r}");
    let raw = Command::new(bin)
        .args(["page", "read", "--rel", "3", "--block", "9", "--raw", "-D"])
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(raw.stdout.len(), PAGE_DATA);
    assert_eq!(&raw.stdout[16..30], b"from the shell");
    let ck = run(&["checkpoint"]);
    assert!(ck.starts_with("CHECKPOINT at "), "{ck}");
    let st = run(&["status"]);
    assert!(st.contains("state:           in production"), "{st}");
    assert!(st.contains("last checkpoint:"), "{st}");
    // Bad input from the shell: a clear error, non-zero exit.
    let bad = Command::new(bin)
        .args([
            "page",
            "write",
            "--rel",
            "1",
            "--block",
            "1",
            "--offset",
            "8160",
            "0123456789",
            "-D",
        ])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("do not fit a page"));
    Command::new("kill")
        .arg("-TERM")
        .arg(server.0.id().to_string())
        .status()
        .unwrap();
    assert!(server.0.wait().unwrap().success());
    let c = walden::store::control::read(&d.path().join("data"))
        .unwrap()
        .unwrap();
    assert_eq!(c.state, walden::store::control::ClusterState::ShutDown);
}
