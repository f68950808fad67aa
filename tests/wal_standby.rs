//! The standby's write path (`Wal::open_standby`, `RawInserter::put`): a
//! primary's WAL, copied byte range by byte range (cut anywhere, 1 byte to
//! several MB at a time) into a standby, gives segment files byte-identical
//! to the primary's; misplaced or invalid bytes are refused with nothing
//! written; appends on a standby are refused; a put is flushed at once; and
//! after power cuts on the simulated disk the standby restarts at a record
//! end no earlier than what it had flushed and streams on to identical WAL.
//!
//! `WALDEN_STANDBY_SEED` replays a run.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use walden::io::sim::{self, SimDisk};
use walden::lsn::segment_file_name;
use walden::record::{self, Kind};
use walden::testkit::{payload, Rng};
use walden::wal::reader::WalReader;
use walden::wal::TIMELINE;
use walden::{Config, Durability, Lsn, Wal, WalError};

const SEG: u64 = 1 << 20;

fn seed() -> u64 {
    let s = std::env::var("WALDEN_STANDBY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("WALDEN_STANDBY_SEED={s}");
    s
}

fn config(dir: &Path, settings: &[&str]) -> Config {
    let mut cfg = Config::with_data_directory(dir);
    for s in ["wal_segment_size=1MB", "wal_writer_delay=10"]
        .iter()
        .chain(settings)
    {
        cfg.set(s).unwrap();
    }
    cfg
}

/// A primary that takes records up to 200 kB through a small ring.
fn primary_config(dir: &Path) -> Config {
    config(dir, &["wal_buffers=512kB", "max_record_size=200kB"])
}

/// A standby with the smallest ring: puts of several MB are many times
/// `wal_buffers` and wait for the flusher (trap T10).
fn standby_config(dir: &Path) -> Config {
    config(dir, &["wal_buffers=64kB", "max_record_size=16kB"])
}

/// A payload length from 1 B to 200 kB, small ones as often as large ones.
fn record_len(rng: &mut Rng) -> usize {
    match rng.below(3) {
        0 => 1 + rng.below(64) as usize,
        1 => 1 + rng.below(4000) as usize,
        _ => 1 + rng.below(200 << 10) as usize,
    }
}

/// A put size from 1 byte to 4 MB.
fn chunk_len(rng: &mut Rng) -> usize {
    match rng.below(4) {
        0 => 1 + rng.below(30) as usize,
        1 => 1 + rng.below(5000) as usize,
        2 => 1 + rng.below(300 << 10) as usize,
        _ => 1 + rng.below(4 << 20) as usize,
    }
}

/// The stream bytes `[from, to)` of the WAL in `dir` (real files).
fn read_stream(dir: &Path, from: Lsn, to: Lsn) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = Vec::with_capacity((to.0 - from.0) as usize);
    let mut at = from.0;
    while at < to.0 {
        let segno = at / SEG;
        let n = (to.0.min((segno + 1) * SEG) - at) as usize;
        let mut f = std::fs::File::open(dir.join(segment_file_name(TIMELINE, segno, SEG))).unwrap();
        f.seek(SeekFrom::Start(at % SEG)).unwrap();
        let old = out.len();
        out.resize(old + n, 0);
        f.read_exact(&mut out[old..]).unwrap();
        at += n as u64;
    }
    out
}

/// Appends `n` random records to a new primary WAL and closes it: the
/// record ends and the end of WAL.
fn make_primary(cfg: &Config, rng: &mut Rng, n: usize) -> (Vec<Lsn>, Lsn) {
    let wal = Wal::open(cfg.clone()).unwrap();
    let mut ends = Vec::new();
    for _ in 0..n {
        let p = payload(rng.next_u64(), record_len(rng));
        ends.push(wal.append(Kind::DATA, &p).unwrap().end);
    }
    let end = wal.insert_lsn();
    wal.wait(end, Durability::Local).unwrap();
    wal.close().unwrap();
    (ends, end)
}

/// The last record end at or below `at` (or `start`).
fn record_end_at_or_below(start: Lsn, ends: &[Lsn], at: Lsn) -> Lsn {
    match ends.binary_search(&at) {
        Ok(i) => ends[i],
        Err(0) => start,
        Err(i) => ends[i - 1],
    }
}

/// Every record of the WAL in `dir` from the first byte of segment 1.
fn records(cfg: &Config) -> Vec<(Lsn, Kind, Vec<u8>)> {
    let mut r = WalReader::new(&cfg.wal_dir, SEG, TIMELINE, Lsn(SEG), None);
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        out.push((rec.lsn, rec.kind, rec.payload.to_vec()));
    }
    out
}

/// Every segment of the standby holds the primary's bytes up to `end`,
/// under the same name, and a reader of each finds the same records.
fn assert_identical(
    primary: &Config,
    standby: &Config,
    end: Lsn,
    standby_file: impl Fn(&Path) -> Vec<u8>,
) {
    for segno in 1..=end.0.div_ceil(SEG) - 1 {
        let name = segment_file_name(TIMELINE, segno, SEG);
        let p = std::fs::read(primary.wal_dir.join(&name)).unwrap();
        let s = standby_file(&standby.wal_dir.join(&name));
        let n = (end.0 - segno * SEG).min(SEG) as usize;
        assert_eq!(s.len(), p.len(), "{name}: sizes differ");
        if let Some(i) = (0..n).find(|&i| p[i] != s[i]) {
            panic!(
                "{name}: first difference at offset {i} (LSN {})",
                Lsn(segno * SEG + i as u64)
            );
        }
    }
    let want = records(primary);
    let got = records(standby);
    assert_eq!(want.last().map(|r| r.0), got.last().map(|r| r.0));
    assert_eq!(got.len(), want.len(), "record counts");
    assert!(got == want, "records differ");
}

/// (1) A primary appends while a copier streams what it has flushed into a
/// standby in random pieces; after close both WALs are the same bytes.
/// After every put, the standby's last complete record end is the
/// primary's last record end at or below the put's end, and its flushed
/// record end is a record end at or below its flush LSN.
#[test]
fn a_standby_fed_random_byte_ranges_is_byte_identical_to_its_primary() {
    let mut rng = Rng(seed());
    let pdir = tempfile::tempdir().unwrap();
    let sdir = tempfile::tempdir().unwrap();
    let pcfg = primary_config(pdir.path());
    let scfg = standby_config(sdir.path());
    let primary = Wal::open(pcfg.clone()).unwrap();
    let standby = Wal::open_standby(scfg.clone()).unwrap();
    assert_eq!(primary.insert_lsn(), standby.insert_lsn());
    let start = primary.insert_lsn();
    let done = AtomicBool::new(false);
    let mut app_rng = Rng(rng.next_u64());
    let (ends, end) = std::thread::scope(|s| {
        let appender = s.spawn(|| {
            let mut ends = Vec::new();
            // About 12 MB: a dozen segments.
            while ends.last().map_or(0, |e: &Lsn| e.0) < start.0 + (12 << 20) {
                let p = payload(app_rng.next_u64(), record_len(&mut app_rng));
                let a = primary.append(Kind::DATA, &p).unwrap();
                if app_rng.below(8) == 0 {
                    primary.wait(a.end, Durability::Local).unwrap();
                }
                ends.push(a.end);
            }
            let end = primary.insert_lsn();
            primary.wait(end, Durability::Local).unwrap();
            done.store(true, SeqCst);
            (ends, end)
        });
        let mut raw = standby.raw_inserter().unwrap();
        let mut at = start;
        let mut puts = Vec::new();
        loop {
            let finished = done.load(SeqCst);
            let flushed = primary.flush_lsn();
            while at < flushed {
                let n = (chunk_len(&mut rng) as u64).min(flushed.0 - at.0);
                let to = Lsn(at.0 + n);
                let bytes = read_stream(&pcfg.wal_dir, at, to);
                assert_eq!(raw.put(at, &bytes).unwrap(), to);
                puts.push((to, raw.last_complete_record_end()));
                let f = raw.flushed_record_end();
                assert!(f <= standby.flush_lsn() && f <= raw.last_complete_record_end());
                at = to;
            }
            if finished && at == primary.flush_lsn() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let (ends, end) = appender.join().unwrap();
        assert_eq!(at, end);
        for &(to, complete) in &puts {
            assert_eq!(
                complete,
                record_end_at_or_below(start, &ends, to),
                "after a put to {to}"
            );
        }
        standby.wait(end, Durability::Local).unwrap();
        let f = raw.flushed_record_end();
        assert_eq!(f, end, "the flushed record end catches up with the end");
        assert!(puts.len() > 10, "only {} puts", puts.len());
        (ends, end)
    });
    assert!(end.segno(SEG) >= 10);
    assert!(
        standby.ring_full_waits() > 0,
        "no put waited for ring space: puts larger than wal_buffers untested"
    );
    assert_eq!(*ends.last().unwrap(), end);
    primary.close().unwrap();
    standby.close().unwrap();
    assert_identical(&pcfg, &scfg, end, |p| std::fs::read(p).unwrap());

    // Reopened, the standby continues exactly at the end.
    let standby = Wal::open_standby(scfg).unwrap();
    assert_eq!(standby.insert_lsn(), end);
}

/// (2) A put anywhere but the insert position is refused naming both LSNs,
/// and bytes that are not WAL are refused; neither writes anything, and the
/// stream goes on afterwards.
#[test]
fn misplaced_or_invalid_puts_write_nothing() {
    let mut rng = Rng(seed());
    let pdir = tempfile::tempdir().unwrap();
    let sdir = tempfile::tempdir().unwrap();
    let pcfg = primary_config(pdir.path());
    let scfg = standby_config(sdir.path());
    let (ends, end) = make_primary(&pcfg, &mut rng, 40);
    let start = Lsn(SEG);
    let bytes = read_stream(&pcfg.wal_dir, start, end);
    let off = |l: Lsn| (l.0 - start.0) as usize;

    let standby = Wal::open_standby(scfg.clone()).unwrap();
    let mut raw = standby.raw_inserter().unwrap();
    let first = ends[0];
    raw.put(start, &bytes[..off(first) + 5]).unwrap();
    let at = Lsn(first.0 + 5);
    for wrong in [Lsn(at.0 + 1), Lsn(at.0 - 1), Lsn(at.0 + 8), start] {
        let e = raw.put(wrong, &bytes[off(at)..off(at) + 100]).unwrap_err();
        assert!(
            matches!(e, WalError::RawPutMisplaced { put, insert } if put == wrong && insert == at),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&wrong.to_string()) && msg.contains(&at.to_string()),
            "{msg}"
        );
        assert_eq!(standby.insert_lsn(), at, "nothing reserved");
    }

    // A put of a valid record and a corrupted one, starting on a record
    // boundary: all of it refused, nothing written, and the correct bytes
    // at the same LSN follow.
    raw.put(at, &bytes[off(at)..off(ends[1])]).unwrap();
    let at = ends[1];
    let mut bad = bytes[off(at)..off(ends[3])].to_vec();
    bad[off(ends[2]) - off(at) + 10] ^= 1; // the own LSN of the fourth record
    let e = raw.put(at, &bad).unwrap_err();
    assert!(
        matches!(&e, WalError::InvalidRawWal { put, error: record::RecordError::WrongLsn { at: bad_at, .. } }
            if *put == at && *bad_at == ends[2]),
        "{e}"
    );
    assert_eq!(standby.insert_lsn(), at, "nothing reserved");
    assert_eq!(raw.last_complete_record_end(), at);
    raw.put(at, &bytes[off(at)..off(ends[3])]).unwrap();
    assert_eq!(raw.last_complete_record_end(), ends[3]);

    // Zeros where a record should start (a primary sending past its end).
    let e = raw.put(ends[3], &[0u8; 64]).unwrap_err();
    assert!(
        matches!(&e, WalError::InvalidRawWal { error, .. } if error.is_zeroed()),
        "{e}"
    );

    // A corrupted record whose start was put earlier: the inserter stops.
    raw.put(ends[3], &bytes[off(ends[3])..off(ends[3]) + 10])
        .unwrap();
    let mut bad = bytes[off(ends[3]) + 10..off(ends[5])].to_vec();
    let last_of_record = off(ends[4]) - off(ends[3]) - 10 - 1;
    bad[last_of_record.saturating_sub(8)] ^= 0x80;
    let here = Lsn(ends[3].0 + 10);
    let e = raw.put(here, &bad).unwrap_err();
    assert!(matches!(e, WalError::InvalidRawWal { .. }), "{e}");
    let e = raw.put(here, &bytes[off(here)..off(ends[5])]).unwrap_err();
    assert!(
        matches!(e, WalError::RawStreamBroken { at } if at == ends[3]),
        "{e}"
    );
    drop(raw);
    standby.close().unwrap();

    // Restarted, the standby ends at the last complete record and goes on.
    let standby = Wal::open_standby(scfg.clone()).unwrap();
    assert_eq!(standby.insert_lsn(), ends[3]);
    let mut raw = standby.raw_inserter().unwrap();
    raw.put(ends[3], &bytes[off(ends[3])..]).unwrap();
    drop(raw);
    standby.close().unwrap();
    assert_identical(&pcfg, &scfg, end, |p| std::fs::read(p).unwrap());
}

/// (3) A standby refuses appends of every kind; raw input needs a standby
/// and has one writer.
#[test]
fn a_standby_refuses_appends_and_a_primary_refuses_raw_input() {
    let sdir = tempfile::tempdir().unwrap();
    let pdir = tempfile::tempdir().unwrap();
    let standby = Wal::open_standby(standby_config(sdir.path())).unwrap();
    assert!(standby.is_standby());
    let e = standby.append(Kind::DATA, b"x").unwrap_err();
    assert!(matches!(e, WalError::ReadOnly), "{e}");
    assert!(e.to_string().contains("standby"), "{e}");
    let e = standby
        .append_batch(&[(Kind::DATA, b"x")], &mut Vec::new())
        .unwrap_err();
    assert!(matches!(e, WalError::ReadOnly), "{e}");
    let e = standby
        .inserter()
        .append_checked(Kind::NOOP, b"", |_| true)
        .unwrap_err();
    assert!(matches!(e, WalError::ReadOnly), "{e}");
    let raw = standby.raw_inserter().unwrap();
    assert!(matches!(
        standby.raw_inserter(),
        Err(WalError::RawInserterTaken)
    ));
    drop(raw);
    let raw = standby.raw_inserter().unwrap();
    // Still refused while a RawInserter exists.
    assert!(matches!(
        standby.append(Kind::DATA, b"x"),
        Err(WalError::ReadOnly)
    ));
    drop(raw);
    assert_eq!(standby.insert_lsn(), Lsn(SEG), "nothing was reserved");

    let primary = Wal::open(primary_config(pdir.path())).unwrap();
    assert!(matches!(primary.raw_inserter(), Err(WalError::NotStandby)));
}

/// A put is flushed at once: with `wal_writer_delay` at 10 s, the flush LSN
/// reaches the put's end (inside a record) without anyone waiting for it.
#[test]
fn a_put_is_flushed_without_waiting_for_wal_writer_delay() {
    let mut rng = Rng(seed());
    let pdir = tempfile::tempdir().unwrap();
    let sdir = tempfile::tempdir().unwrap();
    let pcfg = primary_config(pdir.path());
    let (ends, _) = make_primary(&pcfg, &mut rng, 5);
    let mut scfg = standby_config(sdir.path());
    scfg.set("wal_writer_delay=10000").unwrap();
    let standby = Wal::open_standby(scfg).unwrap();
    let mut raw = standby.raw_inserter().unwrap();
    let mut at = Lsn(SEG);
    // Give the flusher time to settle into its long sleep first.
    std::thread::sleep(Duration::from_millis(100));
    for to in [Lsn(ends[0].0 - 3), ends[1], Lsn(ends[2].0 + 1)] {
        raw.put(at, &read_stream(&pcfg.wal_dir, at, to)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while standby.flush_lsn() < to {
            assert!(
                Instant::now() < deadline,
                "put to {to} not flushed within 2 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        at = to;
    }
    assert_eq!(standby.flush_lsn(), Lsn(ends[2].0 + 1));
    assert_eq!(raw.flushed_record_end(), ends[2]);
}

/// (4) Power cuts on the simulated disk while a standby streams: after each
/// restart its end of WAL is a record end, at or past the record end it had
/// flushed and at or below what it had put; streaming resumes there, and
/// the finished standby is byte-identical to the primary.
#[test]
fn a_standby_cut_off_mid_record_resumes_at_a_record_end_to_identical_wal() {
    let mut rng = Rng(seed());
    let pdir = tempfile::tempdir().unwrap();
    let pcfg = primary_config(pdir.path());
    let (ends, end) = make_primary(&pcfg, &mut rng, 250);
    let start = Lsn(SEG);
    let bytes = read_stream(&pcfg.wal_dir, start, end);
    let off = |l: Lsn| (l.0 - start.0) as usize;

    let mut disk = Arc::new(SimDisk::new());
    sim::install(Arc::clone(&disk));
    let mut scfg = standby_config(disk.root());
    scfg.set("wal_flusher=uring").unwrap();
    scfg.set("wal_sync_method=fdatasync").unwrap();
    let mut cuts = 0;
    let mut history = String::new();
    loop {
        let standby = Wal::open_standby(scfg.clone()).unwrap();
        let resumed = standby.insert_lsn();
        let mut raw = standby.raw_inserter().unwrap();
        let mut at = resumed;
        // Stream up to a random point (or the end, on the last cycle).
        let last = cuts == 10;
        let target = if last {
            end
        } else {
            Lsn((at.0 + 1 + rng.below(1 << 20)).min(end.0))
        };
        while at < target {
            let n = (chunk_len(&mut rng) as u64).min(target.0 - at.0);
            let to = Lsn(at.0 + n);
            raw.put(at, &bytes[off(at)..off(to)]).unwrap();
            at = to;
            if rng.below(4) == 0 {
                // Sometimes let a flush complete, mid-record or not.
                standby.wait(at, Durability::Local).unwrap();
            }
        }
        if last {
            drop(raw);
            standby.close().unwrap();
            break;
        }
        let flushed_end = raw.flushed_record_end();
        let put_end = raw.last_complete_record_end();
        // Everything below the flush LSN read now is durable at the cut.
        let flushed = standby.flush_lsn();
        let durable_end = record_end_at_or_below(start, &ends, flushed);
        assert!(flushed_end <= durable_end);
        assert!(flushed_end == start || ends.binary_search(&flushed_end).is_ok());
        let (image, rep) = disk.power_cut(rng.next_u64());
        drop(raw);
        drop(standby);
        disk = Arc::new(image);
        sim::install(Arc::clone(&disk));
        cuts += 1;

        let reopened = Wal::open_standby(scfg.clone()).unwrap();
        let e = reopened.insert_lsn();
        history.push_str(&format!(
            "cut {cuts}: put to {at} (records to {put_end}), flushed {flushed} (records to {durable_end}, reported {flushed_end}), restarted at {e} {rep:?}; "
        ));
        assert!(
            e == start || ends.binary_search(&e).is_ok(),
            "restart at {e}, not a record end; {history}"
        );
        assert!(
            durable_end <= e && e <= put_end,
            "restart at {e} outside [{durable_end}, {put_end}]; {history}"
        );
        reopened.close().unwrap();
    }
    eprintln!("{history}");
    let d = Arc::clone(&disk);
    assert_identical(&pcfg, &scfg, end, move |p| d.read_all(p).unwrap());
    sim::uninstall(disk.root());
}
