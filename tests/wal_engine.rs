//! The WAL engine through its public API: LSNs unique, increasing and dense
//! under concurrency; the reader returns exactly what was appended; reopening
//! continues at the end; recycled segments are never replayed.

use std::collections::BTreeMap;
use std::path::Path;

use walden::config::{FlusherKind, Size, SyncMethod};
use walden::record::{self, Kind};
use walden::testkit::payload;
use walden::wal::reader::{EndOfWal, WalReader};
use walden::wal::TIMELINE;
use walden::{Config, Durability, Lsn, Wal, WalError};

fn config(dir: &Path) -> Config {
    let mut cfg = Config::with_data_directory(dir);
    cfg.wal_segment_size = Size(1 << 20);
    cfg.wal_writer_delay = walden::config::Millis(10);
    cfg
}

type Records = Vec<(Lsn, Vec<u8>)>;

/// Every record from the retained start, with the end of valid WAL.
fn read_all(cfg: &Config) -> (Records, Lsn, Option<EndOfWal>) {
    let start = walden::wal::segments::read_wal_start(&cfg.wal_dir)
        .unwrap()
        .unwrap();
    let mut r = WalReader::new(&cfg.wal_dir, cfg.wal_segment_size.0, TIMELINE, start, None);
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        out.push((rec.lsn, rec.payload.to_vec()));
    }
    (out, r.position(), r.end().cloned())
}

/// N threads x M appends of varied sizes; checks uniqueness, per-thread
/// order, density, and that the reader returns exactly the payloads.
fn concurrent_appends(
    cfg: Config,
    threads: usize,
    per_thread: usize,
    max_len: usize,
    level: Durability,
) {
    let wal = Wal::open(cfg.clone()).unwrap();
    let first = wal.insert_lsn();
    let results: Vec<Vec<(Lsn, Lsn, u64, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let wal = &wal;
                s.spawn(move || {
                    let mut got = Vec::with_capacity(per_thread);
                    for i in 0..per_thread {
                        let seed = ((t as u64) << 32) | i as u64;
                        let len = walden::testkit::payload_len(seed, max_len);
                        let a = wal.append(Kind::DATA, &payload(seed, len)).unwrap();
                        if i % 7 == 0 || level != Durability::Off {
                            wal.wait(a.end, level).unwrap();
                        }
                        got.push((a.lsn, a.end, seed, len));
                    }
                    got
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let end = wal.insert_lsn();
    wal.wait(end, Durability::Local).unwrap();
    assert_eq!(wal.flush_lsn(), end);

    let mut by_lsn = BTreeMap::new();
    for per in &results {
        for w in per.windows(2) {
            assert!(w[0].0 < w[1].0, "LSNs of one thread must increase");
        }
        for &(lsn, e, seed, len) in per {
            assert_eq!(e.0 - lsn.0, record::stream_len(len));
            assert!(
                by_lsn.insert(lsn, (e, seed, len)).is_none(),
                "LSN {lsn} handed out twice"
            );
        }
    }
    // Dense: each record starts where the previous ended.
    let mut at = first;
    for (&lsn, &(e, _, _)) in &by_lsn {
        assert_eq!(lsn, at, "hole or overlap before {lsn}");
        at = e;
    }
    assert_eq!(at, end);

    // The reader returns exactly these payloads in LSN order.
    let read: Vec<_> = wal.reader(first).map(|r| r.unwrap()).collect();
    assert_eq!(read.len(), by_lsn.len());
    for (rec, (&lsn, &(_, seed, len))) in read.iter().zip(&by_lsn) {
        assert_eq!(rec.lsn, lsn);
        assert_eq!(rec.payload, payload(seed, len), "payload at {lsn}");
    }
    wal.close().unwrap();

    // And after reopening, from disk.
    let (all, valid_end, _) = read_all(&cfg);
    assert_eq!(valid_end, end);
    assert_eq!(
        all.iter().filter(|(l, _)| *l >= first).count(),
        by_lsn.len()
    );
}

#[test]
fn concurrent_appends_default_settings() {
    let d = tempfile::tempdir().unwrap();
    concurrent_appends(config(d.path()), 4, 3000, 600, Durability::Local);
}

#[test]
fn concurrent_appends_tiny_ring_wraps_constantly() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path());
    cfg.wal_buffers = Size(64 << 10);
    cfg.max_record_size = Size(16 << 10);
    concurrent_appends(cfg, 4, 4000, 9000, Durability::Off);
}

#[test]
fn concurrent_appends_tiny_segments_records_span_them() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path());
    cfg.wal_buffers = Size(256 << 10);
    cfg.max_record_size = Size(100 << 10);
    // 1 MiB segments and records up to 100 KiB: many records cross segment ends.
    concurrent_appends(cfg, 3, 400, 100 << 10, Durability::Local);
}

#[test]
fn every_sync_method_and_both_flushers() {
    for method in [
        SyncMethod::OpenDatasync,
        SyncMethod::Fdatasync,
        SyncMethod::OpenSync,
        SyncMethod::Fsync,
    ] {
        for (flusher, depth1) in [
            (FlusherKind::Uring, true),
            (FlusherKind::Uring, false),
            (FlusherKind::Pwrite, true),
        ] {
            let d = tempfile::tempdir().unwrap();
            let mut cfg = config(d.path());
            cfg.wal_sync_method = method;
            cfg.wal_flusher = flusher;
            cfg.wal_sync_at_depth_1 = depth1;
            cfg.wal_buffers = Size(128 << 10);
            cfg.max_record_size = Size(20 << 10);
            concurrent_appends(cfg, 3, 500, 5000, Durability::Local);
        }
    }
}

#[test]
fn batch_append_reserves_once_and_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let wal = Wal::open(cfg).unwrap();
    let payloads: Vec<Vec<u8>> = (0..1000).map(|i| payload(i, (i % 300) as usize)).collect();
    let recs: Vec<(Kind, &[u8])> = payloads.iter().map(|p| (Kind::DATA, &p[..])).collect();
    let mut lsns = Vec::new();
    let end = wal.append_batch(&recs, &mut lsns).unwrap();
    wal.wait(end, Durability::Local).unwrap();
    assert_eq!(lsns.len(), 1000);
    let read: Vec<_> = wal.reader(lsns[0]).map(|r| r.unwrap()).collect();
    assert_eq!(read.len(), 1000);
    for (i, r) in read.iter().enumerate() {
        assert_eq!(r.lsn, lsns[i]);
        assert_eq!(r.payload, payloads[i]);
    }
}

#[test]
fn reopen_continues_exactly_at_the_end() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let mut expected: Records = Vec::new();
    for round in 0..3u64 {
        let wal = Wal::open(cfg.clone()).unwrap();
        if let Some((last_lsn, p)) = expected.last() {
            assert_eq!(wal.opened_at().0, last_lsn.0 + record::stream_len(p.len()));
        }
        for i in 0..500 {
            let p = payload(round * 1000 + i, (i * 37 % 2000) as usize);
            let a = wal.append(Kind::DATA, &p).unwrap();
            expected.push((a.lsn, p));
        }
        wal.close().unwrap();
    }
    let (all, _, end) = read_all(&cfg);
    assert_eq!(all, expected);
    assert!(
        matches!(end, Some(EndOfWal::Invalid(ref e)) if e.is_zeroed()),
        "{end:?}"
    );
}

#[test]
fn recycled_segment_with_valid_old_records_is_not_replayed() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path());
    cfg.wal_prealloc = 1;
    let seg = cfg.wal_segment_size.0;
    let wal = Wal::open(cfg.clone()).unwrap();
    // Fill about 3.5 segments with valid records.
    let mut last = None;
    while wal.insert_lsn().0 < seg * 4 + seg / 2 {
        last = Some(wal.append(Kind::DATA, &[0xAB; 1000]).unwrap());
    }
    wal.wait(last.unwrap().end, Durability::Local).unwrap();
    // Release segments 1 and 2: recycled under future names, full of old,
    // checksum-valid records.
    let new_start = wal.reader(Lsn(seg * 3)).map(|_| ()).count(); // warm the cache
    let _ = new_start;
    let mut r = wal.reader(Lsn(seg));
    let mut cut = Lsn(seg);
    while let Some(rec) = r.next_record().unwrap() {
        if rec.lsn.0 >= seg * 3 {
            cut = rec.lsn;
            break;
        }
    }
    let (recycled, removed) = wal.remove_before(cut).unwrap();
    assert_eq!(recycled + removed, 2, "segments 1 and 2 released");
    assert!(recycled >= 1, "recycling is on by default");
    let end = wal.flush_lsn();
    wal.close().unwrap();

    // The recycled files sit after the end and hold old records.
    let names: Vec<_> = walden::wal::segments::list_segments(&cfg.wal_dir, TIMELINE, seg).unwrap();
    assert!(
        names.iter().any(|&s| s > end.segno(seg)),
        "a recycled segment lies ahead: {names:?}"
    );

    // Also plant a raw copy of old records exactly where the next segment starts.
    let wal = Wal::open(cfg.clone()).unwrap();
    assert_eq!(wal.opened_at(), end, "reopen finds the real end");
    let a = wal.append(Kind::DATA, b"after reopen").unwrap();
    assert_eq!(a.lsn, end);
    // Append across into the recycled segment.
    let mut last = a;
    while wal.insert_lsn().0 < (end.segno(seg) + 1) * seg + 5000 {
        last = wal.append(Kind::DATA, &[0xCD; 700]).unwrap();
    }
    wal.wait(last.end, Durability::Local).unwrap();
    let end2 = wal.flush_lsn();
    wal.close().unwrap();

    let (all, valid_end, why) = read_all(&cfg);
    assert_eq!(valid_end, end2, "stops at the real end: {why:?}");
    assert_eq!(all.last().unwrap().0, last.lsn);
    assert!(all.iter().all(|(_, p)| p[0] != 0xAB || p.len() == 1000));
}

#[test]
fn stale_valid_records_after_the_end_are_cleared_at_startup() {
    // A crash can leave complete, checksummed records after a hole. Startup
    // must make sure they can never be read as WAL later.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let wal = Wal::open(cfg.clone()).unwrap();
    let mut acked = Vec::new();
    for i in 0..100 {
        acked.push(wal.append(Kind::DATA, &payload(i, 64)).unwrap());
    }
    wal.wait(acked.last().unwrap().end, Durability::Local)
        .unwrap();
    let end = wal.flush_lsn();
    wal.close().unwrap();
    // Forge what a crashed run could leave: a hole (zeros) of 8 KiB, then a
    // valid record at its correct LSN.
    let seg = cfg.wal_segment_size.0;
    let ghost_lsn = Lsn(end.0 + 8192);
    let ghost = record::encode(ghost_lsn, Kind::DATA, b"never acknowledged");
    let path = cfg.wal_dir.join(walden::lsn::segment_file_name(
        TIMELINE,
        ghost_lsn.segno(seg),
        seg,
    ));
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &ghost, ghost_lsn.segment_offset(seg)).unwrap();
    drop(f);

    let wal = Wal::open(cfg.clone()).unwrap();
    assert_eq!(wal.opened_at(), end);
    // Append exactly up to the ghost's position, then one more record.
    let gap = (ghost_lsn.0 - end.0) as usize;
    let a = wal
        .append(Kind::DATA, &vec![7u8; gap - record::HEADER_LEN])
        .unwrap();
    assert_eq!(a.end, ghost_lsn);
    wal.wait(a.end, Durability::Local).unwrap();
    wal.close().unwrap();
    let (all, valid_end, _) = read_all(&cfg);
    assert_eq!(
        valid_end, ghost_lsn,
        "the ghost record must have been cleared"
    );
    assert!(all.iter().all(|(_, p)| p != b"never acknowledged"));
}

#[test]
fn errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let wal = Wal::open(cfg.clone()).unwrap();
    let big = vec![0u8; (cfg.max_record_size.0 + 1) as usize];
    let e = wal.append(Kind::DATA, &big).unwrap_err();
    assert!(matches!(e, WalError::RecordTooLarge { .. }));
    assert!(e.to_string().contains("larger than max_record_size"), "{e}");
    assert!(wal
        .append(Kind::DATA, &vec![0u8; cfg.max_record_size.0 as usize])
        .is_ok());
    let e = wal.remove_before(Lsn(wal.flush_lsn().0 + 8)).unwrap_err();
    assert!(e.to_string().contains("flush LSN"), "{e}");
    assert_eq!(
        "remote_apply".parse::<Durability>(),
        Ok(Durability::RemoteApply)
    );
    assert!("sometimes"
        .parse::<Durability>()
        .unwrap_err()
        .contains("invalid durability level"));
    wal.close().unwrap();

    // A changed segment size is refused, with the reason.
    let mut other = cfg.clone();
    other.wal_segment_size = Size(2 << 20);
    let e = Wal::open(other).err().expect("must refuse").to_string();
    assert!(e.contains("wal_segment_size cannot change"), "{e}");
}

#[test]
fn levels_above_local_behave_as_local_without_standbys() {
    let d = tempfile::tempdir().unwrap();
    let wal = Wal::open(config(d.path())).unwrap();
    for level in Durability::ALL {
        let a = wal.append(Kind::DATA, level.name().as_bytes()).unwrap();
        wal.wait(a.end, level).unwrap();
        if level != Durability::Off {
            assert!(
                wal.flush_lsn() >= a.end,
                "{level} returned before the flush"
            );
        }
    }
    // `off` records are flushed by the writer delay alone.
    let a = wal.append(Kind::DATA, b"async").unwrap();
    let t = std::time::Instant::now();
    while wal.flush_lsn() < a.end {
        assert!(t.elapsed().as_secs() < 5, "off record never flushed");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn reopening_a_wal_that_was_never_written_works() {
    // The preparer makes segments after the end's; the end's own segment
    // must exist too, or the next open would see a gap and refuse.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    for _ in 0..3 {
        let wal = Wal::open(cfg.clone()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        wal.close().unwrap();
    }
    let wal = Wal::open(cfg).unwrap();
    let a = wal.append(Kind::DATA, b"first").unwrap();
    assert_eq!(
        a.lsn,
        Lsn(1 << 20),
        "the first record is at the start of segment 1"
    );
}

#[test]
fn kind_zero_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let wal = Wal::open(config(d.path())).unwrap();
    assert!(matches!(
        wal.append(Kind(0), b"x"),
        Err(WalError::InvalidKind)
    ));
    let mut lsns = Vec::new();
    assert!(wal
        .append_batch(&[(Kind::DATA, b"a"), (Kind(0), b"b")], &mut lsns)
        .is_err());
    assert!(lsns.is_empty(), "nothing of a refused batch is inserted");
}

#[test]
fn live_reader_stops_at_the_limit_inside_a_record_and_continues() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let wal = Wal::open(cfg.clone()).unwrap();
    let a = wal.append(Kind::DATA, &payload(1, 10_000)).unwrap();
    let b = wal.append(Kind::DATA, &payload(2, 10_000)).unwrap();
    wal.wait(b.end, Durability::Local).unwrap();
    // A limit in the middle of the second record: not an invalid record.
    let mut r = WalReader::new(
        &cfg.wal_dir,
        cfg.wal_segment_size.0,
        TIMELINE,
        a.lsn,
        Some(Lsn(b.lsn.0 + 5000)),
    );
    assert_eq!(r.next_record().unwrap().unwrap().lsn, a.lsn);
    assert!(r.next_record().unwrap().is_none());
    assert!(matches!(r.end(), Some(EndOfWal::Limit(_))), "{:?}", r.end());
    r.set_limit(Some(b.end));
    let rec = r
        .next_record()
        .unwrap()
        .expect("continues after the limit is raised");
    assert_eq!(rec.payload, &payload(2, 10_000)[..]);
}

#[test]
fn a_missing_segment_before_later_ones_refuses_to_start() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path());
    cfg.wal_prealloc = 0;
    let seg = cfg.wal_segment_size.0;
    let wal = Wal::open(cfg.clone()).unwrap();
    let mut last = None;
    while wal.insert_lsn().0 < seg * 3 + 100 {
        last = Some(wal.append(Kind::DATA, &[1u8; 4000]).unwrap());
    }
    wal.wait(last.unwrap().end, Durability::Local).unwrap();
    wal.close().unwrap();
    let victim = cfg
        .wal_dir
        .join(walden::lsn::segment_file_name(TIMELINE, 2, seg));
    std::fs::rename(&victim, d.path().join("moved-away")).unwrap();
    let e = Wal::open(cfg.clone())
        .err()
        .expect("must refuse")
        .to_string();
    assert!(e.contains("is missing but a later one exists"), "{e}");
    // Nothing was deleted.
    assert!(cfg
        .wal_dir
        .join(walden::lsn::segment_file_name(TIMELINE, 3, seg))
        .exists());
}

#[test]
fn commit_delay_holds_the_flush_when_enough_commits_wait() {
    // commit_siblings = 0: every flush for a waiter is delayed commit_delay.
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path());
    cfg.commit_delay = 30_000;
    cfg.commit_siblings = 0;
    let wal = Wal::open(cfg).unwrap();
    for _ in 0..3 {
        let a = wal.append(Kind::DATA, b"delayed").unwrap();
        let t = std::time::Instant::now();
        wal.wait(a.end, Durability::Local).unwrap();
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(25),
            "the flush came after {:?}, before commit_delay (30 ms)",
            t.elapsed()
        );
    }
}

/// An idle flusher sleeps `wal_writer_delay` at a time (it used to wake every
/// 100 µs): a record appended at level `off` while it sleeps, that nobody
/// waits for, must still be made durable by the timer, within about one
/// `wal_writer_delay`.
#[test]
fn an_off_record_appended_to_an_idle_wal_is_flushed_by_the_timer() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.wal_writer_delay = walden::config::Millis(100);
    let wal = Wal::open(cfg).unwrap();
    // Idle long enough for the flusher to be in its long sleep.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let start = std::time::Instant::now();
    let a = wal.append(Kind::DATA, b"nobody waits for me").unwrap();
    while wal.flush_lsn() < a.end && start.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let took = start.elapsed();
    assert!(
        wal.flush_lsn() >= a.end,
        "the record was not flushed within 5 s (flush LSN {}, record end {})",
        wal.flush_lsn(),
        a.end
    );
    // One timer period, plus slack for a loaded CI machine.
    assert!(
        took < std::time::Duration::from_millis(1000),
        "the record took {took:?} to be flushed with wal_writer_delay = 100ms"
    );
}

/// The bytes of segment files between two LSNs.
fn file_bytes(cfg: &Config, from: Lsn, to: Lsn) -> Vec<u8> {
    let seg = cfg.wal_segment_size.0;
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let name = walden::lsn::segment_file_name(TIMELINE, at.segno(seg), seg);
        let data = std::fs::read(cfg.wal_dir.join(name)).unwrap();
        let off = at.segment_offset(seg) as usize;
        let n = ((to.0 - at.0) as usize).min(seg as usize - off);
        out.extend_from_slice(&data[off..off + n]);
        at = Lsn(at.0 + n as u64);
    }
    out
}

/// A walsender's ring read: recent flushed WAL comes out of the ring equal
/// to the segment files; WAL the ring may have overwritten, or from before
/// the open, is refused (never stale bytes).
#[test]
fn read_recent_copies_the_ring_or_says_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.wal_buffers = Size(256 << 10);
    cfg.max_record_size = Size(64 << 10);
    let wal = Wal::open(cfg.clone()).unwrap();
    let first = wal.insert_lsn();
    let mut last = first;
    for i in 0..40u64 {
        let a = wal
            .append(Kind::DATA, &payload(i, 3000 + i as usize))
            .unwrap();
        wal.wait(a.end, Durability::Local).unwrap();
        last = a.end;
    }
    // 40 records of ~3 KiB: all within the 256 KiB ring.
    let mut got = vec![0u8; (last.0 - first.0) as usize];
    assert!(wal.read_recent(first, &mut got));
    assert_eq!(got, file_bytes(&cfg, first, last));
    // Unaligned starts and lengths too.
    let mid = Lsn(first.0 + 12_345);
    let mut got = vec![0u8; 50_001];
    assert!(wal.read_recent(mid, &mut got));
    assert_eq!(got, file_bytes(&cfg, mid, Lsn(mid.0 + 50_001)));
    // Write more than the ring holds: the first bytes may be overwritten.
    for i in 0..200u64 {
        let a = wal.append(Kind::DATA, &payload(1000 + i, 4000)).unwrap();
        wal.wait(a.end, Durability::Local).unwrap();
    }
    let mut got = vec![0u8; 4096];
    assert!(
        !wal.read_recent(first, &mut got),
        "overwritten ring space was read"
    );
    let end = wal.flush_lsn();
    let recent = Lsn(end.0 - 10_000);
    let mut got = vec![0u8; 10_000];
    assert!(wal.read_recent(recent, &mut got));
    assert_eq!(got, file_bytes(&cfg, recent, end));
    wal.close().unwrap();
    // After a reopen the ring holds nothing from before the open.
    let wal = Wal::open(cfg.clone()).unwrap();
    let mut got = vec![0u8; 1000];
    assert!(
        !wal.read_recent(recent, &mut got),
        "WAL from before the open read from the ring"
    );
    wal.close().unwrap();
}
