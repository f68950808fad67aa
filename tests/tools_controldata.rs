//! `walden controldata` on a data directory whose WAL lives elsewhere
//! (`wal_dir` on its own device): `--wal-dir` names it, and without it the
//! error says where the WAL was looked for and how to give it.

use std::path::Path;
use std::process::{Command, Output};

fn walden(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(args)
        .env("WALDEN_LOG", "warn")
        .output()
        .unwrap()
}

fn field(text: &str, label: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{label}:")))
        .unwrap_or_else(|| panic!("no {label:?} in\n{text}"));
    line[label.len() + 1..].trim().to_string()
}

/// A page store written through the embedded store with its WAL in
/// `wal_dir` (not DATADIR/wal), closed cleanly.
fn store_with_wal_in(data: &Path, wal_dir: &Path) -> walden::store::control::ControlFile {
    let mut cfg = walden::Config::with_data_directory(data);
    cfg.wal_dir = wal_dir.to_owned();
    cfg.set("wal_segment_size=1MB").unwrap();
    // Checkpoints move wal_start to their redo point (the default keeps 1GB).
    cfg.set("wal_keep_size=0").unwrap();
    let store = walden::Store::open(cfg).unwrap();
    store.write_page(1, 0, 0, b"on the data device").unwrap();
    store.checkpoint().unwrap();
    let c = store.control();
    store.close().unwrap();
    c
}

#[test]
fn controldata_reads_a_moved_wal_dir() {
    let data = tempfile::tempdir().unwrap();
    let device = tempfile::tempdir().unwrap();
    let wal_dir = device.path().join("walden-wal");
    let c = store_with_wal_in(data.path(), &wal_dir);
    assert!(!data.path().join("wal").exists());
    let dir = data.path().to_str().unwrap();

    // Without --wal-dir: where it looked, and what to do.
    let o = walden(&["controldata", "-D", dir]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim_end(),
        format!(
            "walden: error: WAL directory \"{}\" does not exist (if wal_dir is elsewhere, give it with --wal-dir)",
            data.path().join("wal").display()
        )
    );

    let o = walden(&[
        "controldata",
        "-D",
        dir,
        "--wal-dir",
        wal_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(field(&text, "WAL directory"), wal_dir.display().to_string());
    assert_eq!(field(&text, "Database cluster state"), "shut down");
    assert_eq!(
        field(&text, "Database system identifier"),
        c.system_identifier.to_string()
    );
    assert_eq!(
        field(&text, "First WAL segment file"),
        "000000010000000000000001"
    );
    assert_eq!(field(&text, "Bytes per WAL segment"), "1048576");
    // The WAL read is the moved one: it ends after the shutdown checkpoint.
    let checkpoint = field(&text, "Latest checkpoint location");
    assert_eq!(
        field(&text, "First retained WAL record (wal_start)"),
        checkpoint
    );
    assert_eq!(field(&text, "Retained WAL"), "1 records, 56 bytes");

    // The same in JSON.
    let o = walden(&[
        "controldata",
        dir,
        "--json",
        "--wal-dir",
        wal_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["wal_directory"], wal_dir.display().to_string());
    assert_eq!(j["retained_wal_records"], 1);
    assert!(j["warnings"].as_array().unwrap().is_empty());

    // The page store's own directory (data_dir moved elsewhere in
    // walden.toml) is read directly: its control file is at the top.
    let o = walden(&[
        "controldata",
        "-D",
        data.path().join("data").to_str().unwrap(),
        "--wal-dir",
        wal_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(field(&text, "Database cluster state"), "shut down");
    assert_eq!(
        field(&text, "Database system identifier"),
        c.system_identifier.to_string()
    );
}
