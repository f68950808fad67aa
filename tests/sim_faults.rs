//! Single faults on the simulated disk (`walden::io::sim`), one at a time:
//! the WAL device filling up (ENOSPC while preparing a segment) with either
//! `wal_full_policy`, and what a power cut keeps afterwards. Each runs on
//! both flushers (the io_uring one on the simulated disk's queue).

use std::sync::Arc;
use std::time::{Duration, Instant};

use walden::io::sim::{self, Faults, SimDisk};
use walden::testkit::payload;
use walden::wal::reader::WalReader;
use walden::wal::TIMELINE;
use walden::{Config, Durability, Kind, Lsn, Wal, WalError};

fn config(disk: &SimDisk, policy: &str, flusher: &str) -> Config {
    let mut cfg = Config::with_data_directory(disk.root());
    for s in [
        &format!("wal_flusher={flusher}"),
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
    full_device_refuses_and_resumes("uring");
    full_device_refuses_and_resumes("pwrite");
}

fn full_device_refuses_and_resumes(flusher: &str) {
    let disk = Arc::new(SimDisk::new());
    sim::install(Arc::clone(&disk));
    let cfg = config(&disk, "error", flusher);
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
    append_waits_for_space("uring");
    append_waits_for_space("pwrite");
}

fn append_waits_for_space(flusher: &str) {
    let disk = Arc::new(SimDisk::new());
    sim::install(Arc::clone(&disk));
    let cfg = config(&disk, "wait", flusher);
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

/// A batch that runs into a segment the full device cannot hold is cut at
/// that segment: the records before it are made durable and acknowledged
/// while the flusher waits for room (it used to wait with them queued but
/// not written, so their waiters hung until space returned). Without a
/// preparer (`wal_prealloc = 0`) the flusher is the first to find the
/// device full, so the appends past the segment end were not refused.
#[test]
fn records_before_a_segment_the_full_device_cannot_hold_are_acknowledged() {
    for flusher in ["uring", "pwrite"] {
        let disk = Arc::new(SimDisk::new());
        sim::install(Arc::clone(&disk));
        let mut cfg = config(&disk, "error", flusher);
        cfg.set("wal_prealloc=0").unwrap();
        let wal = Arc::new(Wal::open(cfg.clone()).unwrap());
        let mut acked = Vec::new();
        // Fill segment 1 to within a record of its end (it starts at 1 MB).
        let mut n = 0;
        while wal.insert_lsn().0 + 2 * 4096 < 2 << 20 {
            n += 1;
            let p = payload(n, 4000);
            let a = wal.append(Kind::DATA, &p).unwrap();
            acked.push((a.lsn, p));
        }
        wal.wait(wal.insert_lsn(), Durability::Local).unwrap();
        // No room for segment 2.
        disk.set_faults(Faults {
            capacity: Some(disk.used()),
            ..Faults::default()
        });
        // Three records in one reservation: the first two end in segment
        // 1, the last crosses into segment 2.
        let ps: Vec<Vec<u8>> = (0..3).map(|i| payload(1000 + i, 3000)).collect();
        let batch: Vec<(Kind, &[u8])> = ps.iter().map(|p| (Kind::DATA, &p[..])).collect();
        let mut lsns = Vec::new();
        let end = wal.append_batch(&batch, &mut lsns).unwrap();
        assert!(lsns[2].0 < 2 << 20 && end.0 > 2 << 20, "{lsns:?} {end}");
        let second_end = lsns[2];
        wal.request_flush(end);
        let w = Arc::clone(&wal);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(w.wait(second_end, Durability::Local));
        });
        let r = rx.recv_timeout(Duration::from_secs(5));
        assert!(
            matches!(r, Ok(Ok(()))),
            "{flusher} flusher: records before the segment the device cannot hold were not \
             acknowledged within 5 s: {r:?}"
        );
        assert!(
            wal.flush_lsn() < end,
            "the last record cannot be durable yet"
        );
        acked.push((lsns[0], ps[0].clone()));
        acked.push((lsns[1], ps[1].clone()));
        assert!(disk.dead().is_none(), "a full device is not fatal");
        // Space returns: the last record becomes durable too.
        disk.set_faults(Faults::default());
        wal.wait(end, Durability::Local).unwrap();
        acked.push((lsns[2], ps[2].clone()));
        let (image, _) = disk.power_cut(3);
        Arc::into_inner(wal).unwrap().close().unwrap();
        let image = Arc::new(image);
        sim::install(Arc::clone(&image));
        assert_present(&cfg, &acked);
        sim::uninstall(image.root());
    }
}
