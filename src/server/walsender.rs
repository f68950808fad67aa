//! A walsender: one thread per standby that streams the primary's WAL
//! bytes, exactly as on disk, up to the flush LSN (never beyond: trap T6
//! in replication-design.md), and a second one that reads the standby's
//! StandbyStatus replies and hands them to [`SyncRep`].
//!
//! A shard takes the standby's Hello and StartReplication, then hands the
//! socket over ([`crate::io::net::NetRing::detach_after_send`]): reading
//! old WAL from segment files never blocks a shard.
//!
//! Recent WAL is copied from the WAL ring (`Wal::read_recent`: no disk
//! read); what the ring no longer holds is read from the segment files.
//!
//! With a slot (`primary_slot_name`): the walsender is the slot's one
//! user while it streams, each StandbyStatus moves the slot's restart LSN
//! to the standby's flush LSN, and a slot that becomes lost (past
//! `max_slot_wal_keep_size`) ends the stream with `SLOT_LOST`.
//!
//! A standby may ask for a timeline of this server's history (it followed
//! the old primary, or was down during a promotion): that timeline's WAL is
//! streamed up to its switch point exactly (read from the files the
//! current timeline's map names: after a promotion the switch segment's
//! prefix lives in the new timeline's file), then TimelineEnd names the
//! next timeline and ReadEnd ends the stream. A start past the switch
//! point is refused with DIVERGED: that standby needs `walden rewind`.

use std::fs::File;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ServerShared;
use crate::io::uring::EventFd;
use crate::lsn::{segment_file_name, Lsn};
use crate::protocol::{self, Direction, ErrorCode, Frame, FrameRef, Limits};
use crate::replication::fencing::{self, Admission};
use crate::replication::syncrep::FLUSH;
use crate::replication::SenderState;
use crate::wal::commit::FlushListener;
use crate::wal::timeline::{fate_of, read_history, TimelineFate, TimelineMap};

/// How long a stopping walsender waits for its standby to confirm the
/// shutdown checkpoint.
const FINAL_CONFIRM: Duration = Duration::from_secs(5);

/// WAL bytes per WalData frame at most.
const CHUNK: usize = 1 << 20;

/// What the standby asked for in its StartReplication.
#[derive(Clone, Debug)]
pub(crate) struct StartRequest {
    pub request_id: u64,
    pub system_id: u64,
    pub timeline: u32,
    pub start: Lsn,
    /// The standby's persisted term (0: a walden before terms).
    pub term: u64,
    pub slot: String,
    pub application_name: String,
}

/// Microseconds since the Unix epoch (the frames' send times).
pub(crate) fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn send(stream: &mut TcpStream, frame: &Frame) -> std::io::Result<()> {
    let mut out = Vec::new();
    protocol::encode(frame, &mut out);
    stream.write_all(&out)
}

fn refuse(mut stream: TcpStream, request_id: u64, code: ErrorCode, message: String) {
    tracing::warn!("replication connection refused: {message}");
    let _ = send(
        &mut stream,
        &Frame::Error {
            request_id,
            code,
            message,
        },
    );
    let _ = stream.shutdown(Shutdown::Write);
}

/// Where the timeline a standby asked for ends on this server.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TimelineEnd {
    /// The switch point: the last byte of the requested timeline.
    pub switch: Lsn,
    /// The timeline that began there.
    pub next: u32,
}

/// `None`: the requested timeline is this server's (stream it live).
/// `Some`: an ancestor, streamed up to its switch point. Refused: a
/// timeline not in this server's history (TIMELINE_NOT_IN_HISTORY), or a
/// start past the switch point (DIVERGED: the standby has WAL this server
/// never had), with PostgreSQL's wording.
fn timeline_end(
    shared: &ServerShared,
    req: &StartRequest,
) -> Result<Option<TimelineEnd>, (ErrorCode, String)> {
    let current = shared.wal.timeline();
    if req.timeline == current {
        return Ok(None);
    }
    let not_in_history = || {
        (
            ErrorCode::TIMELINE_NOT_IN_HISTORY,
            format!(
                "requested timeline {} is not in this server's history (it is on timeline {current})",
                req.timeline
            ),
        )
    };
    if req.timeline == 0 || req.timeline > current {
        return Err(not_in_history());
    }
    let history = read_history(&shared.cfg.wal_dir, current).map_err(|e| {
        (
            ErrorCode::IO_ERROR,
            format!("could not read this server's timeline history: {e}"),
        )
    })?;
    let TimelineFate::Ended { switch, next } = fate_of(req.timeline, current, &history) else {
        return Err(not_in_history());
    };
    if req.start > switch {
        return Err((
            ErrorCode::DIVERGED,
            format!(
                "requested starting point {} on timeline {} is not in this server's history; \
                 this server's history forked from timeline {} at {switch}",
                req.start, req.timeline, req.timeline
            ),
        ));
    }
    Ok(Some(TimelineEnd { switch, next }))
}

/// Reads WAL bytes from the segment files.
struct SegmentBytes {
    dir: PathBuf,
    segment_size: u64,
    /// Which timeline's file holds each segment.
    timelines: TimelineMap,
    open: Option<(u64, File)>,
}

impl SegmentBytes {
    /// Fills `buf` with the WAL at `[at, at + buf.len())`, which lies in one segment.
    fn read(&mut self, at: Lsn, buf: &mut [u8]) -> std::io::Result<()> {
        let segno = at.segno(self.segment_size);
        if !self.open.as_ref().is_some_and(|(s, _)| *s == segno) {
            let path = self
                .dir
                .join(self.timelines.file_name(segno, self.segment_size));
            self.open = Some((segno, File::open(path)?));
        }
        let file = &self.open.as_ref().unwrap().1;
        file.read_exact_at(buf, at.segment_offset(self.segment_size))
    }
}

/// A detached stream's socket: blocking, no Nagle, writes bounded by
/// `wal_sender_timeout` (a standby or backup client that stops reading
/// cannot hold the thread for ever). Returns the timeout (zero: none).
pub(crate) fn stream_timeout(shared: &ServerShared, stream: &TcpStream) -> Duration {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let timeout = shared
        .runtime
        .read()
        .unwrap()
        .config
        .wal_sender_timeout
        .duration();
    if !timeout.is_zero() {
        let _ = stream.set_write_timeout(Some(timeout));
    }
    timeout
}

/// Streams to one standby until it goes, the server stops, or an error.
pub(crate) fn run(
    shared: Arc<ServerShared>,
    mut stream: TcpStream,
    req: StartRequest,
    peer: String,
) {
    let wal = Arc::clone(&shared.wal);
    let syncrep = Arc::clone(&shared.syncrep);
    let timeout = stream_timeout(&shared, &stream);
    let ours = shared.store.system_identifier();
    if req.system_id != 0 && req.system_id != ours {
        let msg = format!(
            "database system identifier differs between the primary and standby: \
             the primary's is {ours}, the standby's is {}",
            req.system_id
        );
        return refuse(stream, req.request_id, ErrorCode::SYSTEM_MISMATCH, msg);
    }
    // Terms first (issue #15): a standby of a newer primary deposes this one.
    if let Admission::Refuse {
        deposed_by,
        message,
    } = fencing::admit_standby(shared.store.term(), syncrep.deposed_by(), req.term)
    {
        if let Some(term) = deposed_by {
            // IMPORTANT: persisted (fsync) before anything is answered.
            shared.store.raise_term(term);
            if syncrep.depose(term) {
                tracing::error!("{}", fencing::deposed_log(term));
            }
        }
        return refuse(stream, req.request_id, ErrorCode::STALE_TERM, message);
    }
    // A timeline of this server's history is streamed up to its switch
    // point, then the stream names the next one (PostgreSQL's walsender on
    // a historic timeline).
    let end = match timeline_end(&shared, &req) {
        Ok(end) => end,
        Err((code, msg)) => return refuse(stream, req.request_id, code, msg),
    };
    // The walsender's id (its "PID" in /status and slot messages).
    let id = syncrep.register(&req.application_name, peer.clone());
    let refused = |stream, code, msg| {
        syncrep.unregister(id);
        refuse(stream, req.request_id, code, msg)
    };
    let slot = (!req.slot.is_empty()).then_some(req.slot.as_str());
    if let Some(name) = slot {
        if let Err(e) = shared.slots.acquire(name, id) {
            return refused(stream, e.code, e.message);
        }
    }
    let release = || {
        if let Some(name) = slot {
            shared.slots.release(name, id);
        }
    };
    let flush = wal.flush_lsn();
    if req.start > flush {
        let msg = format!(
            "requested starting point {} is ahead of the WAL flush position of this server {flush}",
            req.start
        );
        release();
        return refused(stream, ErrorCode::UNKNOWN_LSN, msg);
    }
    let oldest = wal.start_lsn();
    if req.start < oldest {
        let seg = shared.cfg.wal_segment_size.0;
        let msg = format!(
            "requested WAL segment {} has already been removed (WAL starts at {oldest}): \
             the standby needs a new base backup",
            segment_file_name(shared.wal.timeline(), req.start.segno(seg), seg)
        );
        release();
        return refused(stream, ErrorCode::UNKNOWN_LSN, msg);
    }
    let Ok(reader_stream) = stream.try_clone() else {
        release();
        syncrep.unregister(id);
        return;
    };
    tracing::info!(
        "standby \"{}\" ({peer}) connected: streaming from {} (primary flushed to {flush})",
        req.application_name,
        req.start
    );
    let Ok(wake) = EventFd::new().map(Arc::new) else {
        release();
        syncrep.unregister(id);
        return;
    };
    let listener = Arc::new(FlushListener::new(Arc::clone(&wake)));
    wal.add_flush_listener(Arc::clone(&listener));
    let progress = Arc::new(Progress {
        started: Instant::now(),
        last_reply: AtomicU64::new(0),
        sent: AtomicU64::new(req.start.0),
        confirmed: AtomicU64::new(0),
        gone: AtomicBool::new(false),
        idle_poll: Duration::from_micros(shared.cfg.idle_poll_time),
    });
    let reader = {
        let (syncrep, wake, progress) = (
            Arc::clone(&syncrep),
            Arc::clone(&wake),
            Arc::clone(&progress),
        );
        let name = req.application_name.clone();
        let slot = slot.map(|s| (Arc::clone(&shared.slots), s.to_string(), Arc::clone(&wal)));
        std::thread::Builder::new()
            .name("walden-walsnd-r".into())
            .spawn(move || {
                let slot = slot.as_ref().map(|(s, n, w)| (&**s, n.as_str(), &**w));
                read_replies(reader_stream, id, &syncrep, &name, &progress, slot);
                progress.gone.store(true, SeqCst);
                wake.signal();
            })
    };
    let outcome = stream_wal(
        &shared,
        &mut stream,
        &req,
        end,
        id,
        &wake,
        &listener,
        &progress,
        timeout,
    );
    match outcome {
        Ok(()) => tracing::info!("standby \"{}\" disconnected", req.application_name),
        Err(e) => tracing::warn!(
            "walsender for standby \"{}\" ended: {e}",
            req.application_name
        ),
    }
    syncrep.unregister(id);
    wal.remove_flush_listener(&listener);
    let _ = stream.shutdown(Shutdown::Both);
    if let Ok(h) = reader {
        let _ = h.join();
    }
    release();
}

#[allow(clippy::too_many_arguments)]
fn stream_wal(
    shared: &ServerShared,
    stream: &mut TcpStream,
    req: &StartRequest,
    end: Option<TimelineEnd>,
    id: u64,
    wake: &EventFd,
    listener: &FlushListener,
    progress: &Progress,
    timeout: Duration,
) -> Result<(), String> {
    let Progress {
        started,
        last_reply,
        sent: sent_lsn,
        confirmed,
        gone,
        idle_poll,
    } = progress;
    let (started, idle_poll) = (*started, *idle_poll);
    let wal = &shared.wal;
    let syncrep = &shared.syncrep;
    let seg = shared.cfg.wal_segment_size.0;
    let mut files = SegmentBytes {
        dir: shared.cfg.wal_dir.clone(),
        segment_size: seg,
        timelines: TimelineMap::load_or_single(&shared.cfg.wal_dir, wal.timeline(), seg),
        open: None,
    };
    let request_id = req.request_id;
    let mut sent = req.start;
    // What may be sent: the flush LSN, or the end of a historic timeline.
    let limit = |flush: Lsn| end.map_or(flush, |e| e.switch.min(flush));
    let flush = limit(wal.flush_lsn());
    let mut state = if sent == flush {
        SenderState::Streaming
    } else {
        SenderState::Catchup
    };
    send(
        stream,
        &Frame::StreamStart {
            request_id,
            term: shared.store.term(),
            timeline: wal.timeline(),
            flush,
            commit: syncrep.synced(FLUSH),
        },
    )
    .map_err(|e| format!("could not send to the standby: {e}"))?;
    syncrep.sent(id, sent, state);
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK + 64);
    let mut last_send = Instant::now();
    let mut final_since: Option<Instant> = None;
    loop {
        if gone.load(SeqCst) {
            return Ok(());
        }
        if !req.slot.is_empty() {
            // Lost (past max_slot_wal_keep_size) while streaming: say so.
            if let Err(e) = shared.slots.check(&req.slot) {
                let _ = send(
                    stream,
                    &Frame::Error {
                        request_id,
                        code: e.code,
                        message: e.message.clone(),
                    },
                );
                return Err(e.message);
            }
        }
        let flush = limit(wal.flush_lsn());
        if let Some(e) = end.filter(|e| sent >= e.switch) {
            // The requested timeline ended here: name the next one and end
            // the stream (the standby switches and asks again).
            tracing::info!(
                "standby \"{}\" reached the end of timeline {} at {}: next timeline {}",
                req.application_name,
                req.timeline,
                e.switch,
                e.next
            );
            let mut out = Vec::new();
            protocol::encode(
                &Frame::TimelineEnd {
                    request_id,
                    next_timeline: e.next,
                    switch: e.switch,
                },
                &mut out,
            );
            protocol::encode(
                &Frame::ReadEnd {
                    request_id,
                    end: e.switch,
                },
                &mut out,
            );
            stream
                .write_all(&out)
                .map_err(|e| format!("could not send to the standby: {e}"))?;
            return Ok(());
        }
        if sent < flush {
            // One frame: up to CHUNK bytes, within one segment.
            let seg_end = Lsn((sent.segno(seg) + 1) * seg);
            let n = (flush.0.min(seg_end.0) - sent.0).min(CHUNK as u64) as usize;
            // Recent WAL from the ring (no disk read), older from the files.
            if !wal.read_recent(sent, &mut buf[..n]) {
                files
                    .read(sent, &mut buf[..n])
                    .map_err(|e| format!("could not read WAL at {sent}: {e}"))?;
            }
            // IMPORTANT: a segment released (and perhaps recycled) while
            // we read it holds other bytes: check it was still retained.
            if wal.start_lsn() > sent {
                return Err(format!(
                    "WAL at {sent} was removed while it was being sent: the standby needs a new base backup"
                ));
            }
            out.clear();
            protocol::encode_wal_data(
                request_id,
                sent,
                flush,
                syncrep.synced(FLUSH),
                now_micros(),
                &buf[..n],
                &mut out,
            );
            stream
                .write_all(&out)
                .map_err(|e| format!("could not send WAL to the standby: {e}"))?;
            last_send = Instant::now();
            sent = Lsn(sent.0 + n as u64);
            sent_lsn.store(sent.0, SeqCst);
            if state == SenderState::Catchup && sent >= limit(wal.flush_lsn()) {
                state = SenderState::Streaming;
                tracing::info!(
                    "standby \"{}\" has now caught up with the primary",
                    req.application_name
                );
            }
            syncrep.sent(id, sent, state);
            continue;
        }
        if shared.stopping.load(SeqCst) {
            if state != SenderState::Stopping {
                state = SenderState::Stopping;
                syncrep.sent(id, sent, state);
            }
            // The shutdown checkpoint is durable and was sent (everything
            // flushed was): wait for the standby to confirm it, for up to
            // FINAL_CONFIRM, then end the stream (PostgreSQL's WalSndDone).
            if shared.wal_final.load(SeqCst) && sent >= wal.flush_lsn() {
                let since = *final_since.get_or_insert_with(Instant::now);
                if confirmed.load(SeqCst) >= sent.0 || since.elapsed() > FINAL_CONFIRM {
                    let _ = send(
                        stream,
                        &Frame::ReadEnd {
                            request_id,
                            end: sent,
                        },
                    );
                    return Ok(());
                }
            }
        }
        // Idle. Busy a moment ago: poll the flush LSN for
        // `idle_poll_time` first (architecture.md, "Idle polling": waking
        // a sleeping thread here costs more than the hop is worth).
        if last_send.elapsed() < crate::io::RECENTLY_BUSY
            && crate::io::poll_until(idle_poll, || wal.flush_lsn() > sent || gone.load(Relaxed))
        {
            continue;
        }
        // Then sleep until the flush LSN passes what was sent.
        listener.want(Lsn(sent.0 + 1));
        fence(SeqCst);
        if wal.flush_lsn() > sent {
            continue;
        }
        let keepalive_every = if timeout.is_zero() {
            Duration::from_secs(10)
        } else {
            (timeout / 2).min(Duration::from_secs(10))
        };
        wake.wait(Duration::from_millis(100).min(keepalive_every));
        let replied = Duration::from_millis(last_reply.load(SeqCst));
        let silent = started.elapsed().saturating_sub(replied);
        if !timeout.is_zero() && silent > timeout {
            return Err(format!(
                "terminating walsender due to replication timeout (no reply for {} ms)",
                silent.as_millis()
            ));
        }
        if last_send.elapsed() >= keepalive_every {
            send(
                stream,
                &Frame::Keepalive {
                    request_id,
                    wal_end: wal.flush_lsn(),
                    commit: syncrep.synced(FLUSH),
                    send_time: now_micros(),
                    reply_requested: silent >= keepalive_every,
                },
            )
            .map_err(|e| format!("could not send a keepalive: {e}"))?;
            last_send = Instant::now();
        }
    }
}

/// What a walsender's two threads share.
struct Progress {
    started: Instant,
    /// Milliseconds after `started` of the last frame from the standby.
    last_reply: AtomicU64,
    /// The end of what was sent.
    sent: AtomicU64,
    /// The standby's last reported flush position.
    confirmed: AtomicU64,
    /// Set by the reply reader when the standby went away.
    gone: AtomicBool,
    /// `idle_poll_time`.
    idle_poll: Duration,
}

/// Reads the standby's frames until it closes: StandbyStatus goes to
/// [`SyncRep::report`] (and moves the slot, if any, to its flush LSN,
/// never past the primary's); Cancel ends the stream.
fn read_replies(
    mut stream: TcpStream,
    id: u64,
    syncrep: &crate::replication::syncrep::SyncRep,
    name: &str,
    progress: &Progress,
    slot: Option<(&crate::replication::slots::Slots, &str, &crate::wal::Wal)>,
) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let Progress {
        started,
        last_reply,
        sent,
        confirmed,
        idle_poll,
        ..
    } = progress;
    let limits = Limits::for_max_record_size(4096);
    let mut buf = vec![0u8; 64 << 10];
    let mut have = 0usize;
    let mut reported = Lsn::INVALID;
    let fd = stream.as_raw_fd();
    loop {
        // A reply is due (WAL was sent past the last reported flush): poll
        // the socket for `idle_poll_time` before blocking in the read, so
        // that the commits waiting for it are not held by a wake-up.
        if sent.load(SeqCst) > reported.0 {
            crate::io::poll_until(*idle_poll, || crate::io::poll::readable_now(fd));
        }
        let n = match stream.read(&mut buf[have..]) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        have += n;
        let mut at = 0;
        loop {
            match protocol::decode(&buf[at..have], Direction::ToServer, &limits) {
                Ok(Some((frame, len))) => {
                    at += len;
                    last_reply.store(started.elapsed().as_millis() as u64, SeqCst);
                    match frame {
                        FrameRef::StandbyStatus {
                            write,
                            flush,
                            apply,
                            ..
                        } => {
                            reported = reported.max(flush);
                            confirmed.fetch_max(flush.0, SeqCst);
                            syncrep.report(id, write, flush, apply);
                            if let Some((slots, slot, wal)) = slot {
                                // A lost slot: the sender says so and ends.
                                let _ = slots.advance(slot, flush.min(wal.flush_lsn()));
                            }
                        }
                        FrameRef::Cancel { .. } => return,
                        other => {
                            tracing::warn!(
                                "standby \"{name}\" sent an unexpected {:?} frame; closing",
                                other.to_frame()
                            );
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("standby \"{name}\" sent a malformed frame: {e}");
                    return;
                }
            }
        }
        buf.copy_within(at..have, 0);
        have -= at;
        if have == buf.len() {
            tracing::warn!(
                "standby \"{name}\" sent a frame larger than {} bytes",
                buf.len()
            );
            return;
        }
    }
}
