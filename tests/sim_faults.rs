//! Single faults on the simulated disk (`walden::io::sim`), one at a time:
//! the WAL device filling up (ENOSPC while preparing a segment) with either
//! `wal_full_policy`, and what a power cut keeps afterwards (each on both
//! flushers, the io_uring one on the simulated disk's queue); page writers
//! waiting for WAL room while a checkpoint frees it; a failed directory
//! fsync after a relation file is created.

use std::sync::Arc;
use std::time::{Duration, Instant};

use walden::io::sim::{self, Faults, SimDisk};
use walden::testkit::payload;
use walden::wal::reader::WalReader;
use walden::wal::TIMELINE;
use walden::{Config, Durability, Kind, Lsn, Store, Wal, WalError};

fn config(disk: &SimDisk, policy: &str, flusher: &str) -> Config {
    let mut cfg = Config::with_data_directory(disk.root());
    for s in [
        &format!("wal_flusher={flusher}"),
        "wal_segment_size=1MB",
        "wal_buffers=256kB",
        "max_record_size=16kB",
        "wal_prealloc=1",
        "max_wal_size=1GB",
        // Checkpoints free WAL here (the default keeps 1GB).
        "wal_keep_size=0",
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

/// The margin `check_room` keeps below the full limit for checkpoint records.
const MARGIN: u64 = 64 << 10;

/// `config` for a page store: small pool, no checkpoint but the test's.
fn store_config(disk: &SimDisk, policy: &str) -> Config {
    let mut cfg = config(disk, policy, "uring");
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

/// Appends records until exactly `room` to `room + 7` bytes of record stream
/// are left below `limit` less the checkpoint margin.
fn fill_wal_leaving(wal: &Wal, limit: Lsn, room: u64) {
    let big = walden::record::stream_len(4000);
    let mut n = 0;
    while wal.insert_lsn().0 + big + MARGIN + room + 64 <= limit.0 {
        n += 1;
        let a = wal.append(Kind::DATA, &payload(n, 4000)).unwrap();
        wal.wait(a.end, Durability::Local).unwrap();
    }
    let gap = limit.0 - MARGIN - wal.insert_lsn().0 - room;
    let len = (gap as usize - walden::record::HEADER_LEN) / 8 * 8;
    let a = wal.append(Kind::DATA, &payload(0, len)).unwrap();
    wal.wait(a.end, Durability::Local).unwrap();
    let left = limit.0 - MARGIN - wal.insert_lsn().0;
    assert!((room..room + 8).contains(&left), "left {left} bytes");
}

/// Waits up to 15 s for the checkpoint `ticket` asked for. On a timeout the
/// store is leaked, not dropped: its threads may be deadlocked, and a drop
/// would wait for them forever.
fn wait_checkpoint(store: &Arc<Store>, ticket: u64, why: &str) -> Result<(Lsn, Lsn), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(outcome) = store.checkpoint_outcome(ticket) {
            return outcome;
        }
        if Instant::now() > deadline {
            std::mem::forget(Arc::clone(store));
            panic!("the checkpoint did not complete within 15 s: {why}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Who waits for WAL room in [`page_writers_wait_while_a_checkpoint_frees_wal`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writers {
    /// One writer through an insert slot of its own (as a server shard
    /// writes, [`Store::write_page_with`]).
    OneWithItsOwnSlot,
    /// One more writer than there are insert slots, each taking a free slot
    /// ([`Store::write_page`]).
    MoreThanSlots,
}

/// Page writers wait for WAL room on a full WAL device (`wal_full_policy =
/// wait`); a checkpoint requested meanwhile must complete and free WAL, and
/// then the writers go on. `room`: bytes of record stream left for them.
fn page_writers_wait_while_a_checkpoint_frees_wal(who: Writers, room: u64) {
    let disk = Arc::new(SimDisk::new());
    sim::install(Arc::clone(&disk));
    let cfg = store_config(&disk, "wait");
    let store = Arc::new(Store::open(cfg.clone()).unwrap());
    let own_slot = who == Writers::OneWithItsOwnSlot;
    let writers = match who {
        Writers::OneWithItsOwnSlot => 1,
        Writers::MoreThanSlots => store.wal().insert_shards() + walden::wal::INTERNAL_SLOTS + 1,
    };
    // The pages are in the pool and their file allocated before the device
    // fills; the checkpoint makes each one's next change a full-page image.
    for b in 0..writers as u32 {
        store.write_page(1, b, 0, b"before").unwrap();
    }
    store.checkpoint().unwrap();
    let start_before = store.wal().start_lsn();
    wait_for_second_segment(&cfg);
    // Room for data files to take a page, not for a third WAL segment.
    disk.set_faults(Faults {
        capacity: Some(disk.used() + (512 << 10)),
        ..Faults::default()
    });
    fill_wal_leaving(store.wal(), Lsn(3 << 20), room);

    let handles: Vec<_> = (0..writers as u32)
        .map(|b| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let bytes = payload(b as u64, 100);
                let a = if own_slot {
                    let mut ins = store.wal().inserter();
                    store.write_page_with(&mut ins, 1, b, 0, &bytes)
                } else {
                    store.write_page(1, b, 0, &bytes)
                }
                .unwrap();
                store.wal().wait(a.end, Durability::Local).unwrap();
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        handles.iter().all(|h| !h.is_finished()),
        "the page writers did not wait for WAL room: the test proves nothing"
    );

    let ticket = store.request_checkpoint();
    let why = format!(
        "{writers} page writer(s) waiting for WAL room ({who:?}) hold what it needs, \
         and only a checkpoint frees WAL"
    );
    let (_, redo) = wait_checkpoint(&store, ticket, &why).expect("the checkpoint succeeds");
    assert!(
        store.wal().start_lsn() > start_before,
        "the checkpoint freed no WAL (start {}, redo {redo})",
        store.wal().start_lsn()
    );
    // The preparer retries each second: segment 3 appears and the writers go on.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !handles.iter().all(|h| h.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "the page writers did not resume after the checkpoint freed WAL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for h in handles {
        h.join().unwrap();
    }
    for b in 0..writers as u32 {
        let page = store.read_page(1, b).unwrap();
        assert_eq!(page.data[..100], payload(b as u64, 100)[..], "page {b}");
    }
    assert!(disk.dead().is_none(), "{:?}", disk.dead());
    Arc::try_unwrap(store)
        .ok()
        .expect("the writers are gone")
        .close()
        .unwrap();
    sim::uninstall(disk.root());
}

/// A writer holding its page latch while asleep for WAL room would block the
/// checkpoint's write-out of that page forever. Here a change's delta fits
/// the room left but its full-page image does not, so the writer is refused
/// only once it holds the latch.
#[test]
fn a_page_writer_waiting_for_wal_room_does_not_block_the_checkpoint_that_frees_it() {
    page_writers_wait_while_a_checkpoint_frees_wal(Writers::OneWithItsOwnSlot, 1024);
}

/// More writers than insert slots, waiting for room: were each to hold a
/// slot while it waits, the checkpointer would find none for its records.
#[test]
fn more_page_writers_than_insert_slots_waiting_for_wal_room_leave_the_checkpointer_one() {
    page_writers_wait_while_a_checkpoint_frees_wal(Writers::MoreThanSlots, 0);
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
    // As after a crash, the dead engine is left behind, never shut down (nor
    // dropped, should an assertion below fail): its other threads may wait
    // forever for what the thread that died left half done.
    std::mem::forget(Arc::clone(&store));
    assert_eq!(disk.fired(), 1);
    let base = cfg.data_dir.join("base");
    assert!(
        msg.contains(&format!("could not fsync directory \"{}\"", base.display())),
        "the fatal error names the directory: {msg}"
    );
    // The dead disk fails what comes next with an error: nothing panics (a
    // thread that unwound from the fatal error left no lock poisoned).
    let e = store.read_page(8, 0).unwrap_err();
    assert!(e.to_string().contains("Input/output error"), "{e}");
    sim::uninstall(disk.root());
}
