//! A base backup (PostgreSQL's BASE_BACKUP, streamed): one thread per
//! backup copies every relation file's pages to the client while the
//! primary keeps writing (docs/protocol.md §4.13, replication-design.md
//! §7.7).
//!
//! A shard takes the BaseBackup frame and hands the socket over
//! ([`crate::io::net::NetRing::detach_after_send`]), as for a walsender:
//! reading relation files never blocks a shard.
//!
//! Why a copy of pages that change while they are read is enough: the
//! backup starts with an immediate checkpoint whose redo point R is where
//! recovery of the copy starts. With `full_page_writes`, the first change
//! to any page after R logs the whole page; a page on disk only changes
//! after a change to it was logged (WAL before data). So a page the copy
//! read torn, or newer than R, was changed after R, and replay from R
//! overwrites it with that full-page image before any later change to it;
//! a page not changed after R is on disk as of R (the checkpoint wrote and
//! fsynced it) and is read whole. Without `full_page_writes` a torn page
//! could not be repaired: refused.
//!
//! The backup is marked in the WAL, as pg_backup_start/pg_backup_stop do:
//! a BACKUP_START record (start R, the label) right after the checkpoint,
//! and a BACKUP_END record (start R, the label) once the last page was
//! read, made durable before BackupEnd is sent. The backup's end is the
//! end of BACKUP_END: every page read was as of a moment before it. The
//! tool writes that end as the copy's minimum recovery point and R into
//! its backup_label, and the copy is consistent exactly when replay passed
//! the BACKUP_END whose start is R (`store::backup`).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use super::ServerShared;
use crate::lsn::Lsn;
use crate::protocol::{self, ErrorCode, Frame, PAGE_SIZE};
use crate::record::Kind;
use crate::store::backup;

use crate::Durability;

/// Pages per BackupPages frame at most (1 MiB).
const CHUNK_PAGES: usize = 128;

/// What the client asked for in its BaseBackup.
#[derive(Clone, Debug)]
pub(crate) struct BackupRequest {
    pub request_id: u64,
    pub label: String,
}

fn send(stream: &mut TcpStream, frame: &Frame) -> std::io::Result<()> {
    let mut out = Vec::new();
    protocol::encode(frame, &mut out);
    stream.write_all(&out)
}

/// Runs one backup to its end, then keeps its WAL until the client closes
/// the connection (it streams that WAL on a second connection).
pub(crate) fn run(
    shared: Arc<ServerShared>,
    mut stream: TcpStream,
    req: BackupRequest,
    peer: String,
) {
    super::walsender::stream_timeout(&shared, &stream);
    tracing::info!("base backup \"{}\" for {peer} starting", req.label);
    match copy(&shared, &mut stream, &req) {
        Ok((end, hold)) => {
            tracing::info!(
                "base backup \"{}\" for {peer} sent; consistent at {end}; keeping its WAL until the client disconnects",
                req.label
            );
            wait_for_close(&shared, &mut stream);
            drop(hold);
        }
        Err((code, message)) => {
            tracing::warn!("base backup \"{}\" for {peer} failed: {message}", req.label);
            let _ = send(
                &mut stream,
                &Frame::Error {
                    request_id: req.request_id,
                    code,
                    message,
                },
            );
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

type Failure = (ErrorCode, String);

fn copy(
    shared: &ServerShared,
    stream: &mut TcpStream,
    req: &BackupRequest,
) -> Result<(Lsn, crate::store::WalHold), Failure> {
    let store = &shared.store;
    if !shared.cfg.full_page_writes {
        return Err((
            ErrorCode::BACKUP_REFUSED,
            "a base backup needs full_page_writes = on: pages the backup reads while they \
             are written could not be repaired by replay"
                .into(),
        ));
    }
    if req.label.len() > backup::MAX_LABEL_LEN {
        return Err((
            ErrorCode::BACKUP_REFUSED,
            format!(
                "backup label too long (max {} bytes, got {})",
                backup::MAX_LABEL_LEN,
                req.label.len()
            ),
        ));
    }
    // Before the checkpoint: its redo point is at or after the hold, and
    // no later checkpoint releases the WAL from there.
    let hold = store.hold_wal();
    // A start of its own: another backup's BACKUP_END must never end this one.
    let (checkpoint, redo) = loop {
        let (checkpoint, redo) = store.checkpoint().map_err(|e| {
            (
                ErrorCode::INTERNAL,
                format!("the backup's checkpoint failed: {e}"),
            )
        })?;
        if store.claim_backup_start(redo) {
            break (checkpoint, redo);
        }
    };
    debug_assert!(hold.from() <= redo);
    let marker = write_marker(shared, Kind::BACKUP_START, redo, &req.label)?;
    tracing::info!(
        "base backup \"{}\": BACKUP_START at {}",
        req.label,
        marker.0
    );
    let io = |what: String| move |e: std::io::Error| (ErrorCode::IO_ERROR, format!("{what}: {e}"));
    let rels = store.relations().map_err(|e| {
        (
            ErrorCode::IO_ERROR,
            format!("could not list the relation files: {e}"),
        )
    })?;
    let mut relations = Vec::with_capacity(rels.len());
    for rel in rels {
        let path = store.relation_path(rel);
        let len = std::fs::metadata(&path)
            .map_err(io(format!("could not stat \"{}\"", path.display())))?
            .len();
        let blocks = u32::try_from(len / PAGE_SIZE as u64).unwrap_or(u32::MAX);
        relations.push((rel, blocks));
    }
    let control = store.control();
    send(
        stream,
        &Frame::BackupStart {
            request_id: req.request_id,
            system_id: control.system_identifier,
            timeline: shared.wal.timeline(),
            data_checksums: control.data_checksum_version == 1,
            segment_size: shared.cfg.wal_segment_size.0,
            checkpoint,
            redo,
            start_time: super::walsender::now_micros(),
            relations: relations.clone(),
        },
    )
    .map_err(|e| {
        (
            ErrorCode::IO_ERROR,
            format!("could not send to the client: {e}"),
        )
    })?;
    tracing::info!(
        "base backup \"{}\": checkpoint at {checkpoint}, redo at {redo}",
        req.label
    );

    let checksums = control.data_checksum_version == 1;
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
    let mut out = Vec::with_capacity(buf.len() + 64);
    for (rel, blocks) in relations {
        if shared.stopping.load(SeqCst) {
            return Err((
                ErrorCode::SHUTTING_DOWN,
                "the server is shutting down".into(),
            ));
        }
        let path = store.relation_path(rel);
        let file =
            File::open(&path).map_err(io(format!("could not open \"{}\"", path.display())))?;
        let mut block = 0u32;
        while block < blocks {
            let n = (blocks - block).min(CHUNK_PAGES as u32) as usize;
            let bytes = &mut buf[..n * PAGE_SIZE];
            let mut got = 0;
            let at = u64::from(block) * PAGE_SIZE as u64;
            // Buffered reads see what O_DIRECT wrote (it invalidates the page cache).
            while got < bytes.len() {
                match file.read_at(&mut bytes[got..], at + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err((
                            ErrorCode::IO_ERROR,
                            format!("could not read \"{}\": {e}", path.display()),
                        ))
                    }
                }
            }
            // Never shorter in practice (files only grow); zeros are a new page.
            bytes[got..].fill(0);
            if checksums {
                reread_torn_pages(&file, rel, block, at, bytes, redo);
            }
            out.clear();
            protocol::encode_backup_pages(req.request_id, rel, block, bytes, &mut out);
            stream
                .write_all(&out)
                .map_err(|e| (ErrorCode::IO_ERROR, format!("could not send pages: {e}")))?;
            block += n as u32;
        }
    }
    // Every page read is as of a moment before now: WAL to the end of the
    // BACKUP_END record makes the copy consistent (its minimum recovery
    // point), and it is durable before the client hears of it.
    let (at, end) = write_marker(shared, Kind::BACKUP_END, redo, &req.label)?;
    tracing::info!(
        "base backup \"{}\": BACKUP_END at {at}, backup end {end}",
        req.label
    );
    send(
        stream,
        &Frame::BackupEnd {
            request_id: req.request_id,
            end,
        },
    )
    .map_err(|e| {
        (
            ErrorCode::IO_ERROR,
            format!("could not send to the client: {e}"),
        )
    })?;
    Ok((end, hold))
}

/// Appends a BACKUP_START or BACKUP_END record for the backup that
/// started at `start` and waits until it is flushed; its (LSN, end).
fn write_marker(
    shared: &ServerShared,
    kind: Kind,
    start: Lsn,
    label: &str,
) -> Result<(Lsn, Lsn), Failure> {
    let mut payload = Vec::with_capacity(8 + label.len());
    backup::encode_marker(start, label, &mut payload);
    let failed = |e: crate::wal::WalError| {
        (
            ErrorCode::IO_ERROR,
            format!("could not write the {kind} record of the backup: {e}"),
        )
    };
    let appended = shared
        .wal
        .inserter()
        .append_checked(kind, &payload, |_| true)
        .map_err(failed)?
        .expect("a check that always passes keeps the record");
    shared.wal.request_flush(appended.end);
    shared
        .wal
        .wait(appended.end, Durability::Local)
        .map_err(failed)?;
    Ok((appended.lsn, appended.end))
}

/// Reads (and ignores) until the client closes, or the server stops.
fn wait_for_close(shared: &ServerShared, stream: &mut TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
        if shared.stopping.load(SeqCst) {
            return;
        }
    }
}

/// A page read while the checkpointer or bgwriter was writing it may come
/// back torn (half old, half new) and fail its checksum, though it is
/// sound. As PostgreSQL's basebackup does, such a page (one whose LSN is
/// before the backup's start: a later one is restored by replay anyway) is
/// read once more; what the second read gives is sent, and the client's
/// verification judges it.
fn reread_torn_pages(file: &File, rel: u32, first: u32, at: u64, pages: &mut [u8], redo: Lsn) {
    use crate::store::page;
    for (i, p) in pages.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let block = first + i as u32;
        if page::lsn(p) >= redo || page::verify(p, page::PageTag::new(rel, block), true).is_ok() {
            continue;
        }
        std::thread::sleep(Duration::from_millis(1));
        let offset = at + (i * PAGE_SIZE) as u64;
        if let Err(e) = file.read_exact_at(p, offset) {
            tracing::warn!("base backup: could not re-read relation {rel} block {block}: {e}");
        }
    }
}
