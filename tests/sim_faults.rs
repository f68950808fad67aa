//! Single faults on the simulated disk (`walden::io::sim`), one at a time:
//! the WAL device filling up (ENOSPC while preparing a segment) with either
//! `wal_full_policy`, and what a power cut keeps afterwards; a failed
//! directory fsync after a relation file is created.

use std::sync::Arc;
use std::time::{Duration, Instant};

use walden::io::sim::{self, Faults, SimDisk};
use walden::testkit::payload;
use walden::wal::reader::WalReader;
use walden::wal::TIMELINE;
use walden::{Config, Durability, Kind, Lsn, Store, Wal, WalError};

fn config(disk: &SimDisk, policy: &str) -> Config {
    let mut cfg = Config::with_data_directory(disk.root());
    for s in [
        "wal_segment_size=1MB",
        "wal_buffers=256kB",
        "max_record_size=16kB",
        "wal_prealloc=1",
        "max_wal_size=1GB",
        "wal_sync_method=fdatasync",
        &format!("wal_full_policy={policy}"),
    ] {
        cfg.set(s).unwrap();
    }
    cfg
}

/// Waits until the preparer made segment 2 (segment 1 exists from the open).
fn wait_for_second_segment(cfg: &Config) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while walden::io::file::list_files(&cfg.wal_dir)
        .unwrap()
        .iter()
        .filter(|f| f.starts_with("0000"))
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the preparer made no second segment"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every (LSN, payload) is in the WAL of `cfg`, byte for byte.
fn assert_present(cfg: &Config, acked: &[(Lsn, Vec<u8>)]) {
    let wal = Wal::open(cfg.clone()).unwrap();
    let mut r = WalReader::new(
        &cfg.wal_dir,
        cfg.wal_segment_size.0,
        TIMELINE,
        wal.start_lsn(),
        Some(wal.flush_lsn()),
    );
    let mut found = std::collections::HashMap::new();
    while let Some(rec) = r.next_record().unwrap() {
        found.insert(rec.lsn, rec.payload.to_vec());
    }
    for (lsn, p) in acked {
        assert_eq!(found.get(lsn), Some(p), "acknowledged record at {lsn}");
    }
    wal.close().unwrap();
}

#[test]
fn a_full_wal_device_refuses_appends_harms_nothing_and_resumes() {
    let disk = Arc::new(SimDisk::new());
    sim::install(Arc::clone(&disk));
    let cfg = config(&disk, "error");
    let wal = Wal::open(cfg.clone()).unwrap();
    // Segments 1 and 2 exist; room for half a segment more: segment 3
    // cannot be created.
    wait_for_second_segment(&cfg);
    disk.set_faults(Faults {
        capacity: Some(disk.used() + (512 << 10)),
        ..Faults::default()
    });
    let mut acked = Vec::new();
    let mut n = 0u64;
    let err = loop {
        n += 1;
        let p = payload(n, 4000);
        match wal.append(Kind::DATA, &p) {
            Ok(a) => {
                wal.wait(a.end, Durability::Local).unwrap();
                acked.push((a.lsn, p));
            }
            Err(e) => break e,
        }
        assert!(
            n < 10_000,
            "2 MB of segments took more than 40 MB of records"
        );
    };
    let WalError::WalFull { limit } = err else {
        panic!("expected WAL full, got {err}");
    };
    assert_eq!(
        limit,
        Lsn(3 << 20),
        "the limit is the start of the segment that could not be made"
    );
    assert!(err.to_string().starts_with("WAL device full"), "{err}");
    let last_end = acked.last().unwrap().0;
    assert!(
        last_end.0 > (3 << 20) - (128 << 10),
        "refused too early: last ack at {last_end}"
    );
    assert!(disk.dead().is_none(), "a full device is not fatal");
    // Still refused while full.
    assert!(matches!(
        wal.append(Kind::DATA, &payload(0, 4000)),
        Err(WalError::WalFull { .. })
    ));

    // Space returns: the preparer (retrying each second) makes segment 3
    // and appends resume without a restart.
    disk.set_faults(Faults::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        n += 1;
        let p = payload(n, 4000);
        match wal.append(Kind::DATA, &p) {
            Ok(a) => {
                wal.wait(a.end, Durability::Local).unwrap();
                acked.push((a.lsn, p));
                break;
            }
            Err(WalError::WalFull { .. }) => {
                assert!(
                    Instant::now() < deadline,
                    "appends did not resume within 10 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Well into segments 3 and 4.
    for _ in 0..400 {
        n += 1;
        let p = payload(n, 4000);
        let a = wal.append(Kind::DATA, &p).unwrap();
        wal.wait(a.end, Durability::Local).unwrap();
        acked.push((a.lsn, p));
    }
    assert!(acked.last().unwrap().0 .0 > 4 << 20);

    // A power cut now keeps every acknowledged record.
    let (image, _) = disk.power_cut(7);
    drop(wal);
    let image = Arc::new(image);
    sim::install(Arc::clone(&image));
    assert_present(&cfg, &acked);
    sim::uninstall(image.root());
}

#[test]
fn with_wal_full_policy_wait_an_append_waits_for_space() {
    let disk = Arc::new(SimDisk::new());
    sim::install(Arc::clone(&disk));
    let cfg = config(&disk, "wait");
    let wal = Arc::new(Wal::open(cfg.clone()).unwrap());
    wait_for_second_segment(&cfg);
    disk.set_faults(Faults {
        capacity: Some(disk.used()),
        ..Faults::default()
    });
    let mut acked = Vec::new();
    // Fill segments 1 and 2 (2 MB) up to the margin kept for checkpoints.
    let mut n = 0u64;
    let started;
    loop {
        n += 1;
        let p = payload(n, 4000);
        let before = wal.insert_lsn();
        if before.0 + 4096 + (64 << 10) > 3 << 20 {
            // The next append needs segment 3: it must wait, not fail.
            let w = Arc::clone(&wal);
            let d = Arc::clone(&disk);
            let freer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(1500));
                d.set_faults(Faults::default());
                drop(w);
            });
            started = Instant::now();
            let a = wal.append(Kind::DATA, &p).expect("waits, then succeeds");
            wal.wait(a.end, Durability::Local).unwrap();
            acked.push((a.lsn, p));
            freer.join().unwrap();
            break;
        }
        let a = wal.append(Kind::DATA, &p).unwrap();
        wal.wait(a.end, Durability::Local).unwrap();
        acked.push((a.lsn, p));
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "the append did not wait: {waited:?}"
    );
    let (image, _) = disk.power_cut(11);
    drop(wal);
    let image = Arc::new(image);
    sim::install(Arc::clone(&image));
    assert_present(&cfg, &acked);
    sim::uninstall(image.root());
}

/// `config` for a page store: small pool, no checkpoint but the test's.
fn store_config(disk: &SimDisk, policy: &str) -> Config {
    let mut cfg = config(disk, policy);
    for s in [
        "shared_buffers=128kB",
        "checkpoint_timeout=1h",
        "bgwriter_delay=10ms",
        "log_checkpoints=off",
        "full_page_writes=on",
        "wal_compression=off",
    ] {
        cfg.set(s).unwrap();
    }
    cfg
}

/// Shuts the store down in the background; one whose disk died may not
/// finish (its threads unwound), so it is left behind after a while.
fn shut_down(store: Arc<Store>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = store.shut_down();
        drop(store);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(10));
}

/// The directory fsync that makes a new relation file's name durable fails:
/// the engine must die (as for a WAL segment), not carry on. Returned as an
/// error, the next write found the file, opened it and never fsynced base/
/// again, and the next checkpoint released the WAL that could redo the
/// pages of a file a crash can lose.
#[test]
fn a_failed_directory_fsync_after_creating_a_relation_file_is_fatal() {
    let disk = Arc::new(SimDisk::new());
    sim::install(Arc::clone(&disk));
    let cfg = store_config(&disk, "error");
    let store = Arc::new(Store::open(cfg.clone()).unwrap());
    // Once the preparer has made (and synced) segment 2, the WAL fsyncs no
    // directory until a checkpoint or the next segment: the next directory
    // fsync is that of base/ for relation 7's new file.
    wait_for_second_segment(&cfg);
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.wal().segments_created() < 2 {
        assert!(Instant::now() < deadline, "segment 2 was never synced");
        std::thread::sleep(Duration::from_millis(5));
    }
    disk.set_faults(Faults {
        fail_dir_sync_at: Some(disk.dir_syncs() + 1),
        ..Faults::default()
    });
    let w = store.write_page(7, 0, 0, b"lost name").unwrap();
    store.wal().wait(w.end, Durability::Local).unwrap();
    let first = store.request_checkpoint();
    let deadline = Instant::now() + Duration::from_secs(10);
    let msg = loop {
        if let Some(m) = disk.dead() {
            break m;
        }
        if let Some(outcome) = store.checkpoint_outcome(first) {
            if let Some(m) = disk.dead() {
                break m; // it died while the checkpoint failed
            }
            // Carried on: show what that leads to.
            let second = store.checkpoint();
            panic!(
                "a failed directory fsync of base/ was not fatal: the checkpoint returned \
                 {outcome:?}, and the next one {second:?} (released WAL up to {})",
                store.wal().start_lsn()
            );
        }
        assert!(
            Instant::now() < deadline,
            "neither death nor a checkpoint outcome in 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(disk.fired(), 1);
    let base = cfg.data_dir.join("base");
    assert!(
        msg.contains(&format!("could not fsync directory \"{}\"", base.display())),
        "the fatal error names the directory: {msg}"
    );
    shut_down(store);
    sim::uninstall(disk.root());
}
