//! The page store in-process: pages round-trip, survive a clean restart and
//! evictions, full-page images follow the redo point, checkpoints release
//! WAL, bad requests get clear errors, and no page is written ahead of its WAL.

use std::sync::{Arc, Mutex};

use walden::store::control::ClusterState;
use walden::store::page::PAGE_DATA;
use walden::wal::reader::WalReader;
use walden::wal::TIMELINE;
use walden::{Config, Durability, Kind, Lsn, Store, StoreError};

fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::with_data_directory(dir);
    for s in [
        "wal_segment_size=1MB",
        "wal_buffers=1MB",
        "max_record_size=64kB",
        "min_wal_size=2MB",
        "max_wal_size=8MB",
        "shared_buffers=256kB",
        "checkpoint_timeout=1h",
    ] {
        cfg.set(s).unwrap();
    }
    cfg
}

/// Kinds of the records in the retained WAL from `from`.
fn kinds_from(store: &Store, from: Lsn) -> Vec<Kind> {
    let wal = store.wal();
    let mut r = WalReader::new(
        &wal.config().wal_dir,
        wal.config().wal_segment_size.0,
        TIMELINE,
        from,
        Some(wal.flush_lsn()),
    );
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        out.push(rec.kind);
    }
    out
}

#[test]
fn pages_round_trip_and_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(store.control().state, ClusterState::InProduction);
    let fresh = store.read_page(1, 5).unwrap();
    assert_eq!(fresh.lsn, Lsn(0));
    assert!(fresh.data.iter().all(|&b| b == 0));
    let mut last = Lsn(0);
    for block in 0..100u32 {
        let text = format!("block {block} says hello");
        let w = store.write_page(1, block, 10 + block as usize, text.as_bytes()).unwrap();
        assert!(w.end > last);
        last = w.end;
    }
    store.wal().wait(last, Durability::Local).unwrap();
    let p = store.read_page(1, 42).unwrap();
    assert_eq!(&p.data[52..52 + 18], b"block 42 says hell");
    store.close().unwrap();

    let store = Store::open(config(dir.path())).unwrap();
    // A clean shutdown: the control file named a shutdown checkpoint, nothing replayed.
    assert_eq!(store.recovery_progress().records.load(std::sync::atomic::Ordering::Relaxed), 0);
    for block in 0..100u32 {
        let p = store.read_page(1, block).unwrap();
        let text = format!("block {block} says hello");
        let off = 10 + block as usize;
        assert_eq!(&p.data[off..off + text.len()], text.as_bytes(), "block {block}");
        assert!(p.data[..off].iter().all(|&b| b == 0));
    }
    store.close().unwrap();
}

#[test]
fn first_change_after_a_redo_point_logs_a_full_page_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let a = store.write_page(3, 1, 0, b"one").unwrap();
    let b = store.write_page(3, 1, 3, b"two").unwrap();
    store.wal().wait(b.end, Durability::Local).unwrap();
    let (ckpt, redo) = store.checkpoint().unwrap();
    assert!(redo >= b.end && ckpt > redo);
    let c = store.write_page(3, 1, 6, b"three").unwrap();
    let d = store.write_page(3, 1, 11, b"four").unwrap();
    store.wal().wait(d.end, Durability::Local).unwrap();
    let kinds = kinds_from(&store, a.lsn);
    assert_eq!(
        kinds,
        vec![
            Kind::PAGE_IMAGE,
            Kind::PAGE_WRITE,
            Kind::CHECKPOINT_REDO,
            Kind::CHECKPOINT_ONLINE,
            Kind::PAGE_IMAGE,
            Kind::PAGE_WRITE
        ]
    );
    assert!(c.lsn > ckpt);
    let p = store.read_page(3, 1).unwrap();
    assert_eq!(&p.data[..15], b"onetwothreefour");
    assert_eq!(p.lsn, d.end);
}

#[test]
fn evictions_write_pages_out_and_read_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let seen: Arc<Mutex<Vec<(Lsn, Lsn)>>> = Arc::default();
    let s2 = Arc::clone(&seen);
    store
        .pool()
        .set_write_observer(Some(Arc::new(move |_tag, page_lsn, flushed| {
            s2.lock().unwrap().push((page_lsn, flushed));
        })));
    // 32 frames; 400 pages: most are evicted, written by foreground threads.
    for round in 0..3u8 {
        for block in 0..400u32 {
            store
                .write_page(2, block, block as usize % 100, &[round + 1; 64])
                .unwrap();
        }
    }
    for block in 0..400u32 {
        let p = store.read_page(2, block).unwrap();
        let off = block as usize % 100;
        assert_eq!(&p.data[off..off + 64], &[3u8; 64], "block {block}");
    }
    let writes = seen.lock().unwrap();
    assert!(writes.len() > 300, "{} page writes", writes.len());
    for (page_lsn, flushed) in writes.iter() {
        assert!(page_lsn <= flushed, "a page with LSN {page_lsn} was written with the WAL flushed to {flushed}");
    }
    assert!(store.metrics_snapshot().buffers_backend > 0);
}

#[test]
fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let e = store.write_page(1, 0, PAGE_DATA - 2, b"abc").unwrap_err();
    assert!(matches!(e, StoreError::BadRequest(_)));
    assert!(e.to_string().contains("does not fit a page"), "{e}");
    let e = store.write_page(1, 0, 0, b"").unwrap_err();
    assert!(matches!(e, StoreError::BadRequest(_)));
    let e = store.read_page(1, u32::MAX).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    // The store is unharmed.
    store.write_page(1, 0, PAGE_DATA - 3, b"abc").unwrap();
}
