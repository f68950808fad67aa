//! A standby's walreceiver: connects to the primary (`primary_conninfo`),
//! asks for WAL from its own end of WAL, puts the bytes at the same LSNs
//! through its [`RawInserter`] (the standby's own flusher makes them
//! durable, byte-identical to the primary's), and reports write, flush and
//! apply positions back.
//!
//! Two threads while streaming: the receiver (socket reads, puts) and the
//! reporter, which sleeps on one eventfd signalled by the flusher (a
//! [`FlushListener`]) and by replay (the store's apply listeners), and
//! sends a StandbyStatus as soon as a position moved: one per flush batch
//! and per replay step, no timer on the commit path.
//! `wal_receiver_status_interval` only paces reports while nothing moves.
//!
//! Reported LSNs are record ends (trap T3 in replication-design.md): the
//! flush LSN may lie inside a record the primary has not finished sending.
//! After a disconnect it reconnects and resumes at its end of WAL: no gap,
//! no duplicate (the RawInserter refuses both).
//!
//! Timelines (PostgreSQL's model, replication-design.md §5): it asks for
//! its own timeline. A primary on a later one streams it up to the switch
//! point and ends with TimelineEnd; the receiver then fetches the new
//! timeline's history file, moves its WAL to it at the switch point
//! ([`RawInserter::follow_timeline`]) and asks for a restart of the standby
//! in its process, whose WAL opens on the new timeline and streams on.
//! A standby whose WAL goes past the switch point diverged: the primary
//! refuses it (DIVERGED); it says so at ERROR, with the divergence point
//! and the `walden rewind` to run, and retries later without touching its
//! WAL. `primary_conninfo` is reloadable ([`WalReceiver::set_conninfo`]).

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{Client, ClientError};
use crate::io::uring::EventFd;
use crate::lsn::Lsn;
use crate::protocol::{self, ErrorCode, Frame};
use crate::replication::fencing::{self, PrimaryTerm};
use crate::replication::ConnInfo;
use crate::store::Store;
use crate::wal::commit::FlushListener;
use crate::wal::standby::RawInserter;

/// How long to wait before connecting again after a failure.
const RETRY: Duration = Duration::from_millis(500);

/// How long a diverged standby waits before asking again.
const DIVERGED_RETRY: Duration = Duration::from_secs(5);

/// Asks for a restart of the standby in its process (the serve loop's);
/// `false`: nobody can restart it.
pub(crate) type RestartHook = Arc<dyn Fn() -> bool + Send + Sync>;

/// What /status shows of the walreceiver (pg_stat_wal_receiver).
#[derive(Default)]
pub(crate) struct ReceiverStatus {
    pub status: Mutex<&'static str>,
    /// HOST:PORT of `primary_conninfo` (a reload may change it).
    pub primary: Mutex<String>,
    pub slot_name: String,
    pub receive_start_lsn: AtomicU64,
    pub received_lsn: AtomicU64,
    pub flushed_lsn: AtomicU64,
    pub latest_end_lsn: AtomicU64,
    /// Microseconds since the epoch.
    pub last_msg_send_time: AtomicU64,
    pub last_msg_receipt_time: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub connections: AtomicU64,
}

impl ReceiverStatus {
    pub fn json(&self, store: &Store) -> serde_json::Value {
        let lsn = |a: &AtomicU64| Lsn(a.load(Relaxed)).to_string();
        serde_json::json!({
            "status": *self.status.lock().unwrap(),
            "sender": *self.primary.lock().unwrap(),
            "slot_name": self.slot_name,
            "receive_start_lsn": lsn(&self.receive_start_lsn),
            "written_lsn": lsn(&self.received_lsn),
            "flushed_lsn": lsn(&self.flushed_lsn),
            "replayed_lsn": store.apply_lsn().to_string(),
            "latest_end_lsn": lsn(&self.latest_end_lsn),
            "last_msg_send_time_us": self.last_msg_send_time.load(Relaxed),
            "last_msg_receipt_time_us": self.last_msg_receipt_time.load(Relaxed),
            "connections": self.connections.load(Relaxed),
            "last_error": *self.last_error.lock().unwrap(),
        })
    }
}

/// The running walreceiver; [`WalReceiver::stop`] ends it.
pub(crate) struct WalReceiver {
    stop: Arc<AtomicBool>,
    info: Arc<Mutex<ConnInfo>>,
    status: Arc<ReceiverStatus>,
    socket: Arc<Mutex<Option<TcpStream>>>,
    wake: Arc<EventFd>,
    handle: Option<JoinHandle<()>>,
}

struct Settings {
    /// `primary_conninfo`; a reload replaces it.
    info: Arc<Mutex<ConnInfo>>,
    /// For the `walden rewind -D DIR` a diverged standby asks for.
    data_dir: PathBuf,
    restart: RestartHook,
    slot: String,
    token: Option<Arc<[u8]>>,
    status_interval: Duration,
    receiver_timeout: Duration,
    segment_size: u64,
    /// `idle_poll_time`: how long the receiver polls its socket, and the
    /// reporter the flush LSN, before blocking.
    idle_poll: Duration,
}

impl WalReceiver {
    pub fn start(
        store: Arc<Store>,
        cfg: &crate::config::Config,
        info: ConnInfo,
        token: Option<Arc<[u8]>>,
        status: Arc<ReceiverStatus>,
        restart: RestartHook,
    ) -> std::io::Result<WalReceiver> {
        let stop = Arc::new(AtomicBool::new(false));
        let info = Arc::new(Mutex::new(info));
        // `walden serve -D DIR` keeps the WAL in DIR/wal and the pages in
        // DIR/data: name DIR then, the data directory otherwise.
        let data_dir = match (cfg.data_dir.parent(), cfg.wal_dir.parent()) {
            (Some(a), Some(b)) if a == b && !a.as_os_str().is_empty() => a.to_path_buf(),
            _ => cfg.data_dir.clone(),
        };
        let socket = Arc::new(Mutex::new(None));
        let wake = Arc::new(EventFd::new()?);
        let settings = Settings {
            info: Arc::clone(&info),
            data_dir,
            restart,
            slot: cfg.primary_slot_name.clone(),
            token,
            status_interval: cfg.wal_receiver_status_interval.duration(),
            receiver_timeout: cfg.wal_receiver_timeout.duration(),
            segment_size: cfg.wal_segment_size.0,
            idle_poll: Duration::from_micros(cfg.idle_poll_time),
        };
        let (st, so, wk) = (Arc::clone(&stop), Arc::clone(&socket), Arc::clone(&wake));
        let stat = Arc::clone(&status);
        let handle = std::thread::Builder::new()
            .name("walden-walrcv".into())
            .spawn(move || run(&store, &settings, &st, &so, &wk, &stat))?;
        Ok(WalReceiver {
            stop,
            info,
            status,
            socket,
            wake,
            handle: Some(handle),
        })
    }

    /// A reloaded `primary_conninfo`: the current stream ends (its socket
    /// is shut down under the receiver) and the next connection goes to
    /// `info` (PostgreSQL 13+).
    pub fn set_conninfo(&self, info: ConnInfo) {
        *self.status.primary.lock().unwrap() = info.address();
        *self.info.lock().unwrap() = info;
        if let Some(s) = self.socket.lock().unwrap().as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.wake.signal();
    }

    /// Ends streaming (the socket is shut down under the receiver) and
    /// waits for the threads.
    pub fn stop(mut self) {
        self.stop.store(true, SeqCst);
        if let Some(s) = self.socket.lock().unwrap().as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.wake.signal();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(
    store: &Arc<Store>,
    s: &Settings,
    stop: &AtomicBool,
    socket: &Mutex<Option<TcpStream>>,
    wake: &Arc<EventFd>,
    status: &Arc<ReceiverStatus>,
) {
    let wal = Arc::clone(store.wal());
    let mut raw = match wal.raw_inserter() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("could not start the walreceiver: {e}");
            return;
        }
    };
    // One eventfd for the whole life: the flusher and replay signal it.
    let flushed = Arc::new(FlushListener::new(Arc::clone(wake)));
    wal.add_flush_listener(Arc::clone(&flushed));
    store.add_apply_listener(Arc::clone(wake));
    let mut logged_error: Option<String> = None;
    while !stop.load(SeqCst) {
        *status.status.lock().unwrap() = "connecting";
        let mut retry = RETRY;
        match session(store, &mut raw, s, stop, socket, wake, &flushed, status) {
            Ok(None) => {
                logged_error = None;
                tracing::info!("replication terminated by the primary server");
            }
            Ok(Some(end)) => {
                logged_error = None;
                *socket.lock().unwrap() = None;
                match follow(&mut raw, s, store.wal().timeline(), end) {
                    Ok(()) => {
                        *status.status.lock().unwrap() = "restarting";
                        // The restart stops this thread; wait for it.
                        while !stop.load(SeqCst) {
                            wake.wait(Duration::from_millis(50));
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        *status.last_error.lock().unwrap() = Some(e);
                    }
                }
            }
            Err(SessionError::Diverged(message)) => {
                // An incomplete record at the end of the WAL is no WAL yet:
                // a restart cuts it (startup does), then streaming resumes
                // at the last complete record, which may not be past the
                // switch point.
                if raw.last_complete_record_end() < raw.insert_lsn() {
                    tracing::info!(
                        "{message}; this standby's WAL ends with an incomplete record \
                         at {}: restarting to cut it",
                        raw.last_complete_record_end()
                    );
                    if (s.restart)() {
                        *status.status.lock().unwrap() = "restarting";
                        while !stop.load(SeqCst) {
                            wake.wait(Duration::from_millis(50));
                        }
                        break;
                    }
                }
                let address = s.info.lock().unwrap().address();
                let e = format!(
                    "could not start WAL streaming: {message}; this standby has WAL its \
                     primary never had and must be rewound: run `walden rewind -D {} \
                     --source-server {address}` while it is stopped (its WAL is left as it is)",
                    s.data_dir.display()
                );
                if logged_error.as_deref() != Some(e.as_str()) {
                    tracing::error!("{e}");
                    logged_error = Some(e.clone());
                }
                *status.last_error.lock().unwrap() = Some(e);
                retry = DIVERGED_RETRY;
            }
            Err(SessionError::Other(e)) => {
                if stop.load(SeqCst) {
                    break;
                }
                // The same failure once, not every half second.
                if logged_error.as_deref() != Some(e.as_str()) {
                    if fencing::is_stale_primary(&e) {
                        tracing::error!("{e}");
                    } else {
                        tracing::warn!("{e}");
                    }
                    logged_error = Some(e.clone());
                }
                *status.last_error.lock().unwrap() = Some(e);
            }
        }
        *socket.lock().unwrap() = None;
        *status.status.lock().unwrap() = "waiting";
        let until = Instant::now() + retry;
        while !stop.load(SeqCst) && Instant::now() < until {
            wake.wait(Duration::from_millis(50));
        }
    }
    *status.status.lock().unwrap() = "stopped";
    wal.remove_flush_listener(&flushed);
}

/// Why a session ended without a timeline switch.
enum SessionError {
    /// The primary refused the start: this WAL goes past the end of its
    /// timeline in the primary's history (the message names the point).
    Diverged(String),
    Other(String),
}

impl From<String> for SessionError {
    fn from(e: String) -> SessionError {
        SessionError::Other(e)
    }
}

/// The end of the timeline streamed (the primary's TimelineEnd).
#[derive(Clone, Copy, Debug)]
struct TimelineSwitch {
    next: u32,
    switch: Lsn,
}

/// After TimelineEnd: fetches the next timeline's history file from the
/// primary and moves the WAL to it at the switch point, then asks for the
/// restart that reopens the WAL on it.
fn follow(
    raw: &mut RawInserter<'_>,
    s: &Settings,
    timeline: u32,
    end: TimelineSwitch,
) -> Result<(), String> {
    tracing::info!(
        "End of WAL reached on timeline {timeline} at {}",
        end.switch
    );
    let addr = s.info.lock().unwrap().address();
    tracing::info!(
        "fetching timeline history file for timeline {} from primary server",
        end.next
    );
    let history = Client::connect(&addr, s.token.as_deref())
        .and_then(|mut c| c.timeline_history(end.next))
        .map_err(|e| {
            format!(
                "could not fetch the history file of timeline {} from the primary at {addr}: {e}",
                end.next
            )
        })?;
    raw.follow_timeline(end.next, end.switch, &history)
        .map_err(|e| format!("could not switch to timeline {}: {e}", end.next))?;
    if !(s.restart)() {
        return Err(format!(
            "the WAL is on timeline {} now, but this server cannot restart itself \
             (it is not run by `walden serve`): restart it to stream on",
            end.next
        ));
    }
    tracing::info!(
        "restarting the standby to stream timeline {} from {}",
        end.next,
        end.switch
    );
    Ok(())
}

/// What the reporter needs from the receiver.
struct Shared {
    /// Ends of complete records put, not yet known flushed (ascending).
    ends: Mutex<VecDeque<Lsn>>,
    /// The greatest record end known flushed.
    flushed_end: AtomicU64,
    reply_now: AtomicBool,
    done: AtomicBool,
}

#[allow(clippy::too_many_arguments)]
fn session(
    store: &Arc<Store>,
    raw: &mut RawInserter<'_>,
    s: &Settings,
    stop: &AtomicBool,
    socket: &Mutex<Option<TcpStream>>,
    wake: &Arc<EventFd>,
    flushed: &Arc<FlushListener>,
    status: &Arc<ReceiverStatus>,
) -> Result<Option<TimelineSwitch>, SessionError> {
    let info = s.info.lock().unwrap().clone();
    let addr = info.address();
    let mut client = Client::connect(&addr, s.token.as_deref())
        .map_err(|e| format!("could not connect to the primary server: {e}"))?;
    if client.segment_size != s.segment_size {
        return Err(format!(
            "the primary at {addr} has wal_segment_size {} but this standby has {}: \
             a standby must be created from its primary",
            client.segment_size, s.segment_size
        )
        .into());
    }
    let ours = store.system_identifier();
    if client.system_id != 0 && client.system_id != ours {
        return Err(format!(
            "database system identifier differs between the primary and standby: \
             the primary's is {}, the standby's is {ours}",
            client.system_id
        )
        .into());
    }
    let stream = client
        .stream()
        .try_clone()
        .map_err(|e| format!("could not set up the replication connection: {e}"))?;
    *socket.lock().unwrap() = stream.try_clone().ok();
    if stop.load(SeqCst) {
        return Ok(None);
    }
    let start = raw.insert_lsn();
    let request_id = 1u64 << 32;
    client.queue(&Frame::StartReplication {
        request_id,
        system_id: ours,
        timeline: store.wal().timeline(),
        start,
        term: store.term(),
        slot: s.slot.clone(),
        application_name: info.application_name.clone(),
    });
    let first = client.recv_frame();
    match first {
        Ok(Frame::StreamStart {
            flush,
            term,
            commit,
            ..
        }) => {
            // Terms (issue #15): never from a deposed primary; a newer term
            // persisted before the first StandbyStatus of this stream.
            match fencing::judge_primary(&addr, store.term(), term) {
                PrimaryTerm::Same => {}
                PrimaryTerm::Newer(t) => {
                    store.raise_term(t);
                    tracing::info!(
                        "the primary at {addr} has term {t}: this standby now follows it"
                    );
                }
                // Logged (ERROR, once) and shown as last_error by `run`.
                PrimaryTerm::Stale(msg) => return Err(msg.into()),
            }
            store.note_acknowledged(commit);
            status.latest_end_lsn.store(flush.0, Relaxed);
        }
        Ok(Frame::Error { code, message, .. }) if code == ErrorCode::DIVERGED => {
            return Err(SessionError::Diverged(format!("{code}: {message}")))
        }
        Ok(Frame::Error { code, message, .. }) => {
            return Err(format!("could not start WAL streaming: {code}: {message}").into())
        }
        Ok(other) => {
            return Err(format!("the primary answered StartReplication with {other:?}").into())
        }
        Err(e) => return Err(format!("could not start WAL streaming: {e}").into()),
    }
    status.connections.fetch_add(1, Relaxed);
    status.receive_start_lsn.store(start.0, Relaxed);
    // What is on disk at the start is durable (the open's scan made it so).
    status.received_lsn.fetch_max(start.0, Relaxed);
    status.flushed_lsn.fetch_max(start.0, Relaxed);
    *status.status.lock().unwrap() = "streaming";
    *status.last_error.lock().unwrap() = None;
    tracing::info!(
        "started streaming WAL from primary at {start} on timeline {}",
        store.wal().timeline()
    );
    if !s.receiver_timeout.is_zero() {
        let _ = client.set_read_timeout(Some(s.receiver_timeout));
    }
    let shared = Arc::new(Shared {
        ends: Mutex::new(VecDeque::new()),
        flushed_end: AtomicU64::new(start.0),
        reply_now: AtomicBool::new(true),
        done: AtomicBool::new(false),
    });
    let reporter = {
        let (store, shared, wake, flushed, status) = (
            Arc::clone(store),
            Arc::clone(&shared),
            Arc::clone(wake),
            Arc::clone(flushed),
            Arc::clone(status),
        );
        let (interval, idle_poll) = (s.status_interval, s.idle_poll);
        std::thread::Builder::new()
            .name("walden-walrcv-s".into())
            .spawn(move || {
                report(
                    stream, request_id, &store, &shared, &wake, &flushed, interval, idle_poll,
                    &status,
                )
            })
            .map_err(|e| format!("could not start the walreceiver's reporter: {e}"))?
    };
    wake.signal();
    let outcome = receive(
        &mut client,
        store,
        raw,
        &shared,
        wake,
        status,
        stop,
        s.idle_poll,
    );
    // The end of a timeline: everything up to its switch point is reported
    // flushed before the stream closes (the primary may be waiting for it).
    if let Ok(Some(end)) = outcome {
        if store.wal().flush_lsn() < end.switch {
            store.wal().request_flush(end.switch);
        }
        let t = Instant::now();
        while Lsn(shared.flushed_end.load(SeqCst)) < end.switch
            && t.elapsed() < Duration::from_secs(5)
            && !stop.load(SeqCst)
        {
            shared.reply_now.store(true, SeqCst);
            wake.signal();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    shared.done.store(true, SeqCst);
    wake.signal();
    let _ = client.stream().shutdown(Shutdown::Both);
    let _ = reporter.join();
    Ok(outcome?)
}

#[allow(clippy::too_many_arguments)]
fn receive(
    client: &mut Client,
    store: &Store,
    raw: &mut RawInserter<'_>,
    shared: &Shared,
    wake: &EventFd,
    status: &ReceiverStatus,
    stop: &AtomicBool,
    idle_poll: Duration,
) -> Result<Option<TimelineSwitch>, String> {
    use std::os::fd::AsRawFd;
    let mut last_end = raw.last_complete_record_end();
    let mut timeline_end = None;
    let fd = client.stream().as_raw_fd();
    let mut last_frame = Instant::now();
    loop {
        if stop.load(SeqCst) || shared.done.load(SeqCst) {
            return Ok(None);
        }
        // Streaming a moment ago: poll the socket for `idle_poll_time`
        // before blocking in the read (architecture.md, "Idle polling").
        if !client.has_buffered() && last_frame.elapsed() < crate::io::RECENTLY_BUSY {
            crate::io::poll_until(idle_poll, || {
                crate::io::poll::readable_now(fd) || stop.load(Relaxed)
            });
        }
        let frame = match client.recv_frame() {
            Ok(f) => f,
            Err(ClientError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("terminating walreceiver due to timeout: the primary said nothing for wal_receiver_timeout".into())
            }
            Err(e) => return Err(format!("lost the connection to the primary: {e}")),
        };
        last_frame = Instant::now();
        status
            .last_msg_receipt_time
            .store(super::walsender::now_micros(), Relaxed);
        match frame {
            Frame::WalData {
                start,
                wal_end,
                commit,
                send_time,
                wal,
                ..
            } => {
                store.note_acknowledged(commit);
                status.last_msg_send_time.store(send_time, Relaxed);
                status.latest_end_lsn.store(wal_end.0, Relaxed);
                let end = raw
                    .put(start, &wal)
                    .map_err(|e| format!("could not write the primary's WAL at {start}: {e}"))?;
                status.received_lsn.store(end.0, Relaxed);
                let complete = raw.last_complete_record_end();
                if complete > last_end {
                    last_end = complete;
                    shared.ends.lock().unwrap().push_back(complete);
                    wake.signal();
                }
            }
            Frame::Keepalive {
                wal_end,
                commit,
                send_time,
                reply_requested,
                ..
            } => {
                store.note_acknowledged(commit);
                status.last_msg_send_time.store(send_time, Relaxed);
                status.latest_end_lsn.store(wal_end.0, Relaxed);
                if reply_requested {
                    shared.reply_now.store(true, SeqCst);
                    wake.signal();
                }
            }
            Frame::TimelineEnd {
                next_timeline,
                switch,
                ..
            } => {
                // PostgreSQL's walreceiver says the same.
                tracing::info!("replication terminated by primary server");
                timeline_end = Some(TimelineSwitch {
                    next: next_timeline,
                    switch,
                });
            }
            Frame::ReadEnd { .. } => return Ok(timeline_end),
            Frame::Error { code, message, .. } => {
                return Err(format!("the primary ended replication: {code}: {message}"))
            }
            other => return Err(format!("unexpected frame from the primary: {other:?}")),
        }
    }
}

/// Sends a StandbyStatus whenever write, flush or apply moved (or the
/// primary asked, or the status interval passed).
#[allow(clippy::too_many_arguments)]
fn report(
    mut stream: TcpStream,
    request_id: u64,
    store: &Store,
    shared: &Shared,
    wake: &EventFd,
    flushed: &FlushListener,
    interval: Duration,
    idle_poll: Duration,
    status: &ReceiverStatus,
) {
    use std::io::Write;
    let wal = store.wal();
    let mut last = (Lsn::INVALID, Lsn::INVALID, Lsn::INVALID);
    let mut last_send = Instant::now();
    let mut out = Vec::new();
    while !shared.done.load(SeqCst) {
        // The record-aligned flush and write positions. The flush LSN is
        // read first: the flusher publishes the write LSN before it, so
        // the write LSN read after it is not below it.
        let flush_lsn = wal.flush_lsn();
        let write_lsn = wal.write_lsn();
        let (next_wanted, next_written, write_end) = {
            let mut ends = shared.ends.lock().unwrap();
            while let Some(&e) = ends.front() {
                if e > flush_lsn {
                    break;
                }
                shared.flushed_end.store(e.0, SeqCst);
                ends.pop_front();
            }
            let mut write_end = None;
            let mut next_written = None;
            for &e in ends.iter() {
                if e > write_lsn {
                    next_written = Some(e);
                    break;
                }
                write_end = Some(e);
            }
            (ends.front().copied(), next_written, write_end)
        };
        let flush = Lsn(shared.flushed_end.load(SeqCst));
        // Written (the standby's writes completed, its sync may still be
        // running): what `remote_write` waits for. With open_datasync a
        // write completes durable, so it equals the flush position.
        let write = write_end.unwrap_or(flush).max(flush);
        status.flushed_lsn.fetch_max(flush.0, Relaxed);
        let apply = store.apply_lsn().min(flush);
        let now = (write, flush, apply);
        let asked = shared.reply_now.swap(false, SeqCst);
        if now != last || asked || last_send.elapsed() >= interval {
            out.clear();
            protocol::encode(
                &Frame::StandbyStatus {
                    request_id,
                    write,
                    flush,
                    apply,
                    send_time: super::walsender::now_micros(),
                    reply_requested: false,
                },
                &mut out,
            );
            if stream.write_all(&out).is_err() {
                return;
            }
            last = now;
            last_send = Instant::now();
        }
        // A record waits for its write or flush: poll for `idle_poll_time`
        // first (the standby's flush is due within about one fsync).
        if let Some(e) = next_wanted {
            if crate::io::poll_until(idle_poll, || {
                wal.flush_lsn() >= e
                    || next_written.is_some_and(|w| wal.write_lsn() >= w)
                    || shared.done.load(Relaxed)
                    || shared.reply_now.load(Relaxed)
            }) {
                continue;
            }
        }
        // Sleep until the flush passes the next record end, replay moves,
        // or the receiver has news.
        if let Some(e) = next_wanted {
            flushed.want(e);
        }
        fence(SeqCst);
        if next_wanted.is_some_and(|e| wal.flush_lsn() >= e) {
            continue;
        }
        if store.apply_lsn().min(flush) != apply {
            continue;
        }
        let left = interval.saturating_sub(last_send.elapsed());
        wake.wait(left.clamp(Duration::from_millis(1), Duration::from_millis(100)));
    }
}
