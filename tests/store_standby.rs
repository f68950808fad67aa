//! A standby's page store (`Store::open_standby`): the primary's WAL bytes,
//! put through the standby's `RawInserter` in chunks cut anywhere, are
//! replayed continuously until every page reads as on the primary (content
//! and page LSN); a record whose second half has not arrived is applied
//! once it has; the standby writes no WAL of its own (its segment files stay
//! byte-identical to the primary's), refuses page writes and checkpoints,
//! survives clean and kill-like restarts, refuses another system's data
//! directory without changing it, and signals apply listeners.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use walden::io::uring::EventFd;
use walden::lsn::segment_file_name;
use walden::store::control::ClusterState;
use walden::store::page::PAGE_DATA;
use walden::store::RecoveryProgress;
use walden::testkit::{payload, Rng};
use walden::wal::reader::WalReader;
use walden::wal::standby::RawInserter;
use walden::wal::TIMELINE;
use walden::{Config, Durability, Lsn, Store};

const SEG: u64 = 1 << 20;

fn config(dir: &Path, settings: &[&str]) -> Config {
    let mut cfg = Config::with_data_directory(dir);
    for s in [
        "wal_segment_size=1MB",
        "wal_buffers=1MB",
        "max_record_size=64kB",
        "checkpoint_timeout=1h",
        "wal_writer_delay=10",
    ]
    .iter()
    .chain(settings)
    {
        cfg.set(s).unwrap();
    }
    cfg
}

/// A standby whose pool (256 kB: 32 frames) is smaller than the pages the
/// tests write, so replayed pages are evicted and read back.
fn standby_config(dir: &Path) -> Config {
    config(dir, &["shared_buffers=256kB", "bgwriter_delay=10"])
}

fn open_standby(dir: &Path, system_id: Option<u64>) -> Store {
    Store::open_standby(
        standby_config(dir),
        Arc::new(RecoveryProgress::default()),
        system_id,
    )
    .unwrap()
}

/// Pages written on the primary.
type Pages = BTreeSet<(u32, u32)>;

/// `n` page writes of various sizes at various offsets on rels 1..=3,
/// blocks 0..80; returns the pages touched. Waits until they are durable.
fn write_pages(store: &Store, rng: &mut Rng, n: usize, pages: &mut Pages) -> Lsn {
    let mut end = Lsn(0);
    for _ in 0..n {
        let rel = 1 + rng.below(3) as u32;
        let block = rng.below(80) as u32;
        let len = match rng.below(3) {
            0 => 1 + rng.below(16) as usize,
            1 => 1 + rng.below(1000) as usize,
            _ => 1 + rng.below(PAGE_DATA as u64) as usize,
        };
        let off = rng.below((PAGE_DATA - len + 1) as u64) as usize;
        let w = store
            .write_page(rel, block, off, &payload(rng.next_u64(), len))
            .unwrap();
        end = w.end;
        pages.insert((rel, block));
    }
    store.wal().wait(end, Durability::Local).unwrap();
    end
}

/// The stream bytes `[from, to)` of the WAL in `wal_dir` (real files).
fn read_stream(wal_dir: &Path, from: Lsn, to: Lsn) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = Vec::with_capacity((to.0 - from.0) as usize);
    let mut at = from.0;
    while at < to.0 {
        let segno = at / SEG;
        let n = (to.0.min((segno + 1) * SEG) - at) as usize;
        let mut f =
            std::fs::File::open(wal_dir.join(segment_file_name(TIMELINE, segno, SEG))).unwrap();
        f.seek(SeekFrom::Start(at % SEG)).unwrap();
        let old = out.len();
        out.resize(old + n, 0);
        f.read_exact(&mut out[old..]).unwrap();
        at += n as u64;
    }
    out
}

/// Puts the primary's WAL `[from, to)` into the standby in chunks of
/// `chunk` bytes (and a few odd ones), cutting records anywhere. One
/// `RawInserter` must carry a stream that stops inside a record: a new
/// one starts at a record boundary.
fn feed(raw: &mut RawInserter<'_>, primary_wal: &Path, from: Lsn, to: Lsn, chunk: usize) {
    let bytes = read_stream(primary_wal, from, to);
    assert_eq!(raw.insert_lsn(), from);
    let mut at = 0usize;
    let mut i = 0usize;
    while at < bytes.len() {
        let n = match i % 5 {
            3 => 7,
            4 => 3 * chunk + 13,
            _ => chunk,
        }
        .min(bytes.len() - at);
        raw.put(Lsn(from.0 + at as u64), &bytes[at..at + n])
            .unwrap();
        at += n;
        i += 1;
    }
    assert_eq!(raw.insert_lsn(), to);
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_applied(standby: &Store, end: Lsn) {
    wait_for(&format!("apply LSN {end}"), 20, || {
        standby.apply_lsn() >= end
    });
    assert_eq!(standby.apply_lsn(), end, "applied past the end");
}

fn assert_pages_equal(primary: &Store, standby: &Store, pages: &Pages) {
    for &(rel, block) in pages {
        let p = primary.read_page(rel, block).unwrap();
        let s = standby.read_page(rel, block).unwrap();
        assert_eq!(s.lsn, p.lsn, "page LSN of rel {rel} block {block}");
        assert!(s.data == p.data, "data of rel {rel} block {block} differs");
    }
    // A page never written is zeros on both.
    assert_eq!(standby.read_page(9, 9).unwrap().lsn, Lsn(0));
}

/// The records of the primary's WAL in `[from, to)`: start, end of its
/// bytes before the padding, end.
fn record_spans(wal_dir: &Path, from: Lsn, to: Lsn) -> Vec<(Lsn, Lsn, Lsn)> {
    let mut r = WalReader::new(wal_dir, SEG, TIMELINE, from, Some(to));
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        let unpadded = Lsn(rec.lsn.0 + rec.header.tot_len as u64);
        out.push((rec.lsn, unpadded, rec.end_lsn()));
    }
    out
}

/// A primary with pages written over more than three segments, open.
fn primary(dir: &Path, rng: &mut Rng, pages: &mut Pages) -> (Store, Lsn) {
    let p = Store::open(config(dir, &[])).unwrap();
    let end = write_pages(&p, rng, 1000, pages);
    assert!(end.0 > 3 * SEG, "only {end} of WAL");
    assert_eq!(p.wal().flush_lsn(), p.wal().insert_lsn());
    let flushed = p.wal().flush_lsn();
    (p, flushed)
}

#[test]
fn a_standby_replays_its_primarys_wal_to_identical_pages_and_restarts() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut rng = Rng(14);
    let mut pages = Pages::new();
    let (primary, end) = primary(a.path(), &mut rng, &mut pages);
    let a_wal = a.path().join("wal");

    let standby = open_standby(b.path(), Some(primary.system_identifier()));
    assert!(standby.is_standby() && !primary.is_standby());
    assert_eq!(standby.system_identifier(), primary.system_identifier());
    assert_eq!(standby.control().state, ClusterState::InArchiveRecovery);
    assert_eq!(standby.control().state.name(), "in archive recovery");
    // Created by the same code: the standby's WAL begins where the
    // primary's first record is.
    let start = standby.wal().insert_lsn();
    assert_eq!(start, Lsn(SEG));
    assert_eq!(primary.wal().start_lsn(), start);
    assert_eq!(standby.apply_lsn(), start);

    let mut raw = standby.wal().raw_inserter().unwrap();
    feed(&mut raw, &a_wal, start, end, 1000);
    drop(raw);
    wait_applied(&standby, end);
    assert_pages_equal(&primary, &standby, &pages);
    // Nothing of its own: the WAL ends where the primary's does.
    assert_eq!(standby.wal().insert_lsn(), end);

    // A clean restart: the WAL is byte-identical, replay (crash redo from
    // the start of the WAL) ends at the same place, pages still equal.
    standby.close().unwrap();
    let b_wal = b.path().join("wal");
    assert!(read_stream(&b_wal, start, end) == read_stream(&a_wal, start, end));
    let standby = open_standby(b.path(), Some(primary.system_identifier()));
    assert_eq!(standby.wal().insert_lsn(), end);
    assert_eq!(standby.apply_lsn(), end);
    assert_pages_equal(&primary, &standby, &pages);

    // More on the primary, streamed in larger chunks; then a kill-like stop
    // (no write-out, no control file update) and a restart.
    let end2 = write_pages(&primary, &mut rng, 200, &mut pages);
    let mut raw = standby.wal().raw_inserter().unwrap();
    feed(&mut raw, &a_wal, end, end2, 65536);
    drop(raw);
    wait_applied(&standby, end2);
    assert_pages_equal(&primary, &standby, &pages);
    standby.abandon_for_tests();
    let standby = open_standby(b.path(), None);
    assert_eq!(standby.apply_lsn(), end2);
    assert_pages_equal(&primary, &standby, &pages);
    assert!(read_stream(&b_wal, start, end2) == read_stream(&a_wal, start, end2));
    standby.close().unwrap();
    primary.close().unwrap();
}

#[test]
fn a_record_cut_by_the_flush_lsn_is_applied_once_its_rest_arrives() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let mut pages = Pages::new();
    let (primary, end) = primary(a.path(), &mut rng, &mut pages);
    let a_wal = a.path().join("wal");
    let standby = open_standby(b.path(), Some(primary.system_identifier()));
    let start = standby.wal().insert_lsn();
    let spans = record_spans(&a_wal, start, end);
    // A large record well inside the WAL, and the cut in its middle.
    let &(rec, _, rec_end) = spans
        .iter()
        .skip(spans.len() / 2)
        .find(|(l, _, e)| e.0 - l.0 > 2000)
        .unwrap();
    let cut = Lsn(rec.0 + (rec_end.0 - rec.0) / 2);
    let mut raw = standby.wal().raw_inserter().unwrap();
    raw.put(start, &read_stream(&a_wal, start, cut)).unwrap();
    wait_for("the flush of the cut", 10, || {
        standby.wal().flush_lsn() >= cut
    });
    wait_for("replay up to the cut record", 10, || {
        standby.apply_lsn() >= rec
    });
    // Several replay turns with the flush LSN inside the record: it is not
    // applied, and nothing after it either.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(standby.apply_lsn(), rec);
    // The rest of it, in two pieces (the first ends inside it again).
    feed(&mut raw, &a_wal, cut, Lsn(rec_end.0 - 5), 333);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(standby.apply_lsn(), rec);
    feed(&mut raw, &a_wal, Lsn(rec_end.0 - 5), rec_end, 1);
    wait_applied(&standby, rec_end);
    // A later record whose bytes all arrived but not its padding: not
    // complete either (its end, the LSN its page takes, is not flushed).
    let &(padded, unpadded, padded_end) = spans
        .iter()
        .find(|(l, u, e)| *l >= rec_end && u < e)
        .unwrap();
    feed(&mut raw, &a_wal, rec_end, unpadded, 4096);
    wait_for("the flush of the unpadded record", 10, || {
        standby.wal().flush_lsn() >= unpadded
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(standby.apply_lsn(), padded);
    feed(&mut raw, &a_wal, unpadded, padded_end, 4096);
    wait_applied(&standby, padded_end);
    feed(&mut raw, &a_wal, padded_end, end, 4096);
    drop(raw);
    wait_applied(&standby, end);
    assert_pages_equal(&primary, &standby, &pages);
    standby.close().unwrap();
    primary.close().unwrap();
}

#[test]
fn a_kill_while_streaming_resumes_from_the_last_complete_record() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let mut pages = Pages::new();
    let (primary, end) = primary(a.path(), &mut rng, &mut pages);
    let a_wal = a.path().join("wal");
    let standby = open_standby(b.path(), Some(primary.system_identifier()));
    let start = standby.wal().insert_lsn();
    // About half, cut at an arbitrary byte (inside a record, most likely).
    let half = Lsn(start.0 + (end.0 - start.0) / 2 + 3);
    let mut raw = standby.wal().raw_inserter().unwrap();
    feed(&mut raw, &a_wal, start, half, 1000);
    drop(raw);
    wait_for("the flush of the first half", 10, || {
        standby.wal().flush_lsn() >= half
    });
    let applied = standby.apply_lsn();
    standby.abandon_for_tests();

    let standby = open_standby(b.path(), Some(primary.system_identifier()));
    let resume = standby.wal().insert_lsn();
    // The last complete record end at or below `half`, or the end of the
    // record cut at `half` if the bytes past the cut on disk (zeros) happen
    // to be that record's (a full-page image of a mostly empty page): then
    // it is complete, and the primary's own.
    let straddler = record_spans(&a_wal, start, end)
        .into_iter()
        .find(|(_, _, e)| *e >= half)
        .unwrap();
    assert!(
        resume >= applied && (resume <= half || resume == straddler.2),
        "{resume} {half} {applied} {straddler:?}"
    );
    assert_eq!(standby.apply_lsn(), resume);
    let mut raw = standby.wal().raw_inserter().unwrap();
    feed(&mut raw, &a_wal, resume, end, 1000);
    drop(raw);
    wait_applied(&standby, end);
    assert_pages_equal(&primary, &standby, &pages);
    standby.close().unwrap();
    let b_wal = b.path().join("wal");
    assert!(read_stream(&b_wal, start, end) == read_stream(&a_wal, start, end));
    primary.close().unwrap();
}

#[test]
fn another_systems_identifier_is_refused_and_nothing_changes() {
    let b = tempfile::tempdir().unwrap();
    let standby = open_standby(b.path(), Some(0x1234_5678_9abc_def0));
    assert_eq!(standby.system_identifier(), 0x1234_5678_9abc_def0);
    standby.close().unwrap();
    let before = common::snapshot(b.path());
    let e = Store::open_standby(
        standby_config(b.path()),
        Arc::new(RecoveryProgress::default()),
        Some(42),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains(&0x1234_5678_9abc_def0u64.to_string()), "{e}");
    assert!(e.contains("42"), "{e}");
    common::assert_unchanged(&before, &common::snapshot(b.path()), "the data directory");
    // The right one (or none) opens.
    let standby = open_standby(b.path(), None);
    assert_eq!(standby.system_identifier(), 0x1234_5678_9abc_def0);
    standby.close().unwrap();
}

#[test]
fn a_standby_refuses_page_writes_and_checkpoints_and_writes_no_wal() {
    let b = tempfile::tempdir().unwrap();
    let standby = open_standby(b.path(), None);
    let at = standby.wal().insert_lsn();
    let e = standby.write_page(1, 1, 0, b"x").unwrap_err().to_string();
    assert!(e.contains("the server is a standby (read-only)"), "{e}");
    let mut ins = standby.wal().inserter();
    let e = standby
        .write_page_with(&mut ins, 1, 1, 0, b"x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("the server is a standby (read-only)"), "{e}");
    drop(ins);
    let e = standby.checkpoint().unwrap_err().to_string();
    assert!(e.contains("the server is a standby (read-only)"), "{e}");
    let ticket = standby.request_checkpoint();
    let t = Instant::now();
    let outcome = loop {
        if let Some(o) = standby.checkpoint_outcome(ticket) {
            break o;
        }
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    };
    let e = outcome.unwrap_err();
    assert!(e.contains("standby"), "{e}");
    // Time for anything automatic to go wrong.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(standby.wal().insert_lsn(), at);
    assert_eq!(standby.wal().flush_lsn(), at);
    assert_eq!(standby.read_page(1, 1).unwrap().lsn, Lsn(0));
    let c = standby.control();
    standby.close().unwrap();
    // Not even the close wrote a record; the control file still says standby.
    let standby = open_standby(b.path(), None);
    assert_eq!(standby.wal().insert_lsn(), at);
    assert_eq!(standby.control().checkpoint, c.checkpoint);
    assert_eq!(standby.control().state, ClusterState::InArchiveRecovery);
    standby.close().unwrap();
    let c = walden::store::control::read(&b.path().join("data"))
        .unwrap()
        .unwrap();
    assert_eq!(c.state, ClusterState::InArchiveRecovery);
}

#[test]
fn apply_listeners_are_signalled_when_a_page_record_is_applied() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let primary = Store::open(config(a.path(), &[])).unwrap();
    let first = primary.wal().start_lsn();
    let w1 = primary.write_page(5, 0, 10, b"one").unwrap();
    let w2 = primary.write_page(5, 0, 20, b"two").unwrap();
    primary.wal().wait(w2.end, Durability::Local).unwrap();
    let a_wal = a.path().join("wal");

    let standby = open_standby(b.path(), Some(primary.system_identifier()));
    let wake = Arc::new(EventFd::new().unwrap());
    standby.add_apply_listener(Arc::clone(&wake));
    let mut raw = standby.wal().raw_inserter().unwrap();
    let bytes = read_stream(&a_wal, first, w2.end);
    // Everything up to the first page record but its last byte: it is not
    // complete, so it cannot have been applied.
    let cut = (w1.end.0 - 1 - first.0) as usize;
    raw.put(first, &bytes[..cut]).unwrap();
    wait_for("the flush", 10, || {
        standby.wal().flush_lsn().0 >= first.0 + cut as u64
    });
    std::thread::sleep(Duration::from_millis(200));
    while wake.wait(Duration::ZERO) {}
    assert!(standby.apply_lsn() <= w1.lsn);
    // The last byte completes it: the listener is signalled, and by then
    // the page shows it.
    raw.put(
        Lsn(first.0 + cut as u64),
        &bytes[cut..(w1.end.0 - first.0) as usize],
    )
    .unwrap();
    assert!(wake.wait(Duration::from_secs(5)), "no signal");
    wait_for("apply", 5, || standby.apply_lsn() == w1.end);
    let p = standby.read_page(5, 0).unwrap();
    assert_eq!(&p.data[10..13], b"one");
    assert_eq!(p.lsn, w1.end);
    raw.put(w1.end, &bytes[(w1.end.0 - first.0) as usize..])
        .unwrap();
    assert!(wake.wait(Duration::from_secs(5)), "no signal");
    wait_for("apply", 5, || standby.apply_lsn() == w2.end);
    assert_eq!(&standby.read_page(5, 0).unwrap().data[20..23], b"two");
    drop(raw);
    standby.close().unwrap();
    primary.close().unwrap();
}
