//! One shard: a thread that owns an insert slot, a listener and an io_uring,
//! and drives its connections: decode frames, append, acknowledge when the
//! flush LSN passes, answer reads, feed followers.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{
    fence,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ServerShared;
use crate::config::TimeoutAction;
use crate::durability::Durability;
use crate::io::net::{ConnId, Event, NetRing};
use crate::io::uring::EventFd;
use crate::lsn::Lsn;
use crate::protocol::{
    self, Decoder, ErrorCode, Frame, FrameRef, FrameType, IndeterminateReason, Limits, RecordRef,
};
use crate::record::Kind;
use crate::store::StoreError;
use crate::wal::commit::FlushListener;
use crate::wal::reader::{locate, EndOfWal, Located, WalReader};
use crate::wal::WalError;

const RECV_BUF: usize = 256 << 10;
/// How long waits for standbys may go on once the server stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Records frames sent to a follower are cut at about this size.
const FOLLOW_CHUNK: usize = 256 << 10;

struct Follow {
    request_id: u64,
    reader: WalReader,
    /// Where it was asked to start: an invalid record there is reported
    /// as a wrong `from`, not as WAL that stopped.
    from: Lsn,
}

struct ConnState {
    serial: u64,
    peer: Option<SocketAddr>,
    /// Counted in `ServerShared::connections` (refused ones are not).
    admitted: bool,
    hello: bool,
    in_flight: u32,
    paused: bool,
    last_activity: Instant,
    slow_since: Option<Instant>,
    follow: Option<Follow>,
    closing: bool,
    /// A StartReplication or BaseBackup was accepted: the socket goes to
    /// a walsender or backup thread once what was queued is sent (no more
    /// receives here).
    replication: Option<Handoff>,
}

/// Where a detached connection goes.
enum Handoff {
    Stream(super::walsender::StartRequest),
    Backup(super::basebackup::BackupRequest),
}

struct PendingAck {
    end: Lsn,
    conn: ConnId,
    serial: u64,
    request_id: u64,
    reply: Reply,
    started: Instant,
    level: Durability,
    /// Waits for standbys: admitted under this `synchronous_standby_names`
    /// generation.
    quorum: Option<u64>,
}

/// The pending queues: `local` (and remote levels with no standbys
/// configured), then one per wait mode (write, flush, apply). Each is
/// sorted by end: a shard appends in LSN order.
const QUEUES: usize = 4;

fn queue_of(level: Durability, quorum: bool) -> usize {
    match level {
        Durability::RemoteWrite if quorum => 1,
        Durability::On if quorum => 2,
        Durability::RemoteApply if quorum => 3,
        _ => 0,
    }
}

/// What to send once a pending request's WAL reaches its level.
enum Reply {
    /// An Append's Ack: its records' LSNs.
    Ack(Vec<Lsn>),
    /// A PageWrite's PageWritten: its record's LSN.
    PageWritten(Lsn),
}

/// A Checkpoint request waiting for the checkpointer.
struct PendingCheckpoint {
    conn: ConnId,
    serial: u64,
    request_id: u64,
    ticket: u64,
}

struct Shard<'a> {
    index: usize,
    shared: &'a ServerShared,
    /// The same, owned: for the walsender threads this shard starts.
    owner: Arc<ServerShared>,
    ring: NetRing,
    limits: Limits,
    pending: [VecDeque<PendingAck>; QUEUES],
    sync: Arc<crate::replication::syncrep::SyncListener>,
    /// When this shard saw the server stopping: waits for standbys get a
    /// grace period, then INDETERMINATE.
    stopping_since: Option<Instant>,
    checkpoints: Vec<PendingCheckpoint>,
    out: Vec<u8>,
    lsns: Vec<Lsn>,
    page: Vec<u8>,
    /// When this shard last logged that it refuses connections.
    refusal_logged: Option<Instant>,
    /// This shard's copy of the reloadable settings, and the
    /// `runtime_version` it was taken at (see [`Shard::refresh_runtime`]).
    rt: super::Runtime,
    rt_version: u64,
}

pub(crate) fn run(
    index: usize,
    shared: Arc<ServerShared>,
    listener: OwnedFd,
    wake: Arc<EventFd>,
    flush: Arc<FlushListener>,
) {
    let ring = match NetRing::new(1024, listener, Arc::clone(&wake), RECV_BUF) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("shard {index}: could not set up io_uring: {e}");
            return;
        }
    };
    let wal = Arc::clone(&shared.wal);
    let mut ins = wal.inserter();
    let sync = Arc::new(crate::replication::syncrep::SyncListener::new(Arc::clone(
        &wake,
    )));
    shared.syncrep.add_listener(Arc::clone(&sync));
    let mut shard = Shard {
        index,
        shared: &shared,
        owner: Arc::clone(&shared),
        sync,
        stopping_since: None,
        ring,
        limits: Limits::for_max_record_size(
            shared.cfg.max_record_size.0.min(u32::MAX as u64) as u32
        ),
        pending: Default::default(),
        checkpoints: Vec::new(),
        out: Vec::with_capacity(64 << 10),
        lsns: Vec::new(),
        page: vec![0; crate::store::page::PAGE_DATA],
        refusal_logged: None,
        // The version first: a reload in between is then seen next turn.
        rt_version: shared.runtime_version.load(SeqCst),
        rt: shared.runtime.read().unwrap().clone(),
    };
    let mut conns: HashMap<ConnId, ConnState> = HashMap::new();
    // Apart from the state: a decoded frame borrows its decoder while the
    // handler updates the connection's state.
    let mut decoders: HashMap<ConnId, Decoder> = HashMap::new();
    let mut received: Vec<u8> = Vec::with_capacity(RECV_BUF);
    let mut serial = 0u64;
    let mut stopped_accepting = false;
    let mut last_sweep = Instant::now();
    let mut last_data = Instant::now();
    // The flush LSN this shard waits for: its oldest pending ack's end, or
    // past what followers were fed.
    let mut wait_for: Option<Lsn> = None;
    let idle_poll = Duration::from_micros(shared.cfg.idle_poll_time);

    loop {
        let stopping = shared.stopping.load(SeqCst);
        if stopping && shard.stopping_since.is_none() {
            shard.stopping_since = Some(Instant::now());
        }
        if stopping && !stopped_accepting {
            stopped_accepting = true;
            if let Err(e) = shard.ring.stop_accepting() {
                tracing::warn!("shard {index}: {e}");
            }
        }
        if stopping && shard.pending.iter().all(VecDeque::is_empty) {
            // Everything acknowledged that will be: close what is left.
            for id in shard.ring.connections() {
                let _ = shard.ring.close_after_send(id);
            }
            if shard.ring.connection_count() == 0 {
                break;
            }
        }

        let flushed_enough = || wait_for.is_some_and(|l| wal.flush_lsn() >= l);
        let sync_due = |pending: &[VecDeque<PendingAck>; QUEUES]| sync_due(pending, &shared);
        let mut timeout = if flushed_enough() || sync_due(&shard.pending) {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        // Poll before blocking while acks are due or a client was recently
        // active: its next request, or the flush, comes within microseconds
        // (and the flusher need not signal a thread that polls).
        if !timeout.is_zero()
            && (wait_for.is_some() || last_data.elapsed() < crate::io::RECENTLY_BUSY)
        {
            if let Err(e) = shard.ring.submit_queued() {
                tracing::error!("shard {index}: io_uring submit failed: {e}");
                break;
            }
            let (ring, pending) = (&mut shard.ring, &shard.pending);
            if crate::io::poll_until(idle_poll, || {
                ring.has_completions()
                    || flushed_enough()
                    || sync_due(pending)
                    || shared.stopping.load(SeqCst)
            }) {
                timeout = Duration::ZERO;
            }
        }
        if !timeout.is_zero() {
            // Standbys' confirmations wake us through the same eventfd.
            shard.want_sync();
            if let Some(lsn) = wait_for {
                // Ask to be woken; the check after it covers a flush
                // published before the ask.
                // IMPORTANT: this is one half of a Dekker hand-off. We store
                // our wish, then load the flush LSN; the flusher stores the
                // flush LSN, then loads the wishes. One of the two loads must
                // see the other side's store, or the flusher skips our signal
                // while we sleep through the flush we wait for (up to the
                // 100 ms timeout). That holds only if each side's store and
                // the load after it are SeqCst, or separated by a SeqCst
                // fence: want() stores SeqCst, but flush_lsn() loads with
                // Acquire, which may be satisfied before our store is
                // visible (store-load reordering). The fence forbids that.
                flush.want(lsn);
            }
            fence(SeqCst);
            if flushed_enough() || sync_due(&shard.pending) {
                timeout = Duration::ZERO;
            }
        }
        if let Err(e) = shard.ring.wait(timeout) {
            tracing::error!("shard {index}: io_uring wait failed: {e}");
            break;
        }
        shard.refresh_runtime();
        while let Some(ev) = shard.ring.next_event() {
            match ev {
                Event::Accepted(id, peer) => {
                    serial += 1;
                    let max = shard.rt.max_connections;
                    // One count for all shards, taken only below the limit.
                    let admitted = shard
                        .shared
                        .connections
                        .fetch_update(SeqCst, SeqCst, |n| (n < max).then_some(n + 1))
                        .is_ok();
                    conns.insert(
                        id,
                        ConnState {
                            serial,
                            peer,
                            admitted,
                            hello: false,
                            in_flight: 0,
                            paused: false,
                            last_activity: Instant::now(),
                            slow_since: None,
                            follow: None,
                            closing: false,
                            replication: None,
                        },
                    );
                    if !admitted {
                        // Refused before anything of it is read (no decoder:
                        // its bytes are never looked at): the Error, then close.
                        shard.refuse(id, conns.get_mut(&id).unwrap(), max);
                        continue;
                    }
                    // Until Hello succeeds the decoder holds a few KiB at most.
                    decoders.insert(id, Decoder::awaiting_hello(shard.limits));
                    shard.shared.metrics.connection_opened();
                    shard.shared.shard_connections[index].fetch_add(1, Relaxed);
                    tracing::debug!(shard = index, ?peer, "connection accepted");
                }
                Event::Data(id) => {
                    let (Some(st), Some(dec)) = (conns.get_mut(&id), decoders.get_mut(&id)) else {
                        continue;
                    };
                    last_data = Instant::now();
                    received.clear();
                    received.extend_from_slice(shard.ring.received(id));
                    st.last_activity = last_data;
                    shard.process(id, st, dec, &received, &mut ins);
                    let max = shard.rt.max_in_flight;
                    st.paused = st.in_flight >= max;
                    if !st.closing && !st.paused && !stopping && st.replication.is_none() {
                        let _ = shard.ring.resume_recv(id);
                    }
                }
                Event::Closed(id, err) => {
                    decoders.remove(&id);
                    if let Some(st) = conns.remove(&id) {
                        if st.admitted {
                            shard.shared.connections.fetch_sub(1, SeqCst);
                            shard.shared.metrics.connection_closed();
                            shard.shared.shard_connections[index].fetch_sub(1, Relaxed);
                        }
                        if st.replication.is_some() {
                            // Closed before it was handed over: its walsender
                            // never started.
                            shard.shared.wal_senders.fetch_sub(1, SeqCst);
                        }
                        shard.forget_waits(id, st.serial);
                        tracing::debug!(shard = index, peer = ?st.peer, ?err, "connection closed");
                    }
                }
                Event::Detached(id, fd) => {
                    decoders.remove(&id);
                    let Some(st) = conns.remove(&id) else {
                        continue;
                    };
                    if st.admitted {
                        shard.shared.connections.fetch_sub(1, SeqCst);
                        shard.shared.metrics.connection_closed();
                        shard.shared.shard_connections[index].fetch_sub(1, Relaxed);
                    }
                    match st.replication {
                        Some(Handoff::Stream(req)) => shard.start_walsender(fd, req, st.peer),
                        Some(Handoff::Backup(req)) => shard.start_backup(fd, req, st.peer),
                        None => {}
                    }
                }
                Event::Woken => {}
            }
        }

        // Acknowledge what reached its level, oldest first per queue.
        let flushed = wal.flush_lsn();
        shard.release(&mut conns, flushed, stopping);
        // Checkpoint requests whose checkpoint completed (or that shutdown ends).
        if !shard.checkpoints.is_empty() {
            shard.answer_checkpoints(&mut conns, stopping);
        }
        // Followers get what became durable.
        for (&id, st) in conns.iter_mut() {
            if st.follow.is_some() && !st.closing {
                shard.feed_follower(id, st, flushed);
            }
        }
        // What we wait for next from the flusher (asked for before blocking).
        let follows = conns.values().any(|s| s.follow.is_some());
        // Every level needs the local flush first.
        let oldest = shard
            .pending
            .iter()
            .filter_map(|q| q.front().map(|p| p.end))
            .filter(|e| *e > flushed)
            .min();
        wait_for = if let Some(end) = oldest {
            wal.request_flush(end);
            Some(end)
        } else if follows {
            Some(Lsn(flushed.0 + 1))
        } else {
            None
        };

        if last_sweep.elapsed() >= Duration::from_millis(100) {
            last_sweep = Instant::now();
            shard.sweep_timeouts(&mut conns);
        }
    }
    tracing::debug!(shard = index, "shard stopped");
}

/// Whether a wait for standbys can end now (reached, or the setting was
/// emptied): a few atomic loads, for the poll loop.
fn sync_due(pending: &[VecDeque<PendingAck>; QUEUES], shared: &ServerShared) -> bool {
    let rep = &shared.syncrep;
    if rep.deposed_by().is_some() {
        return pending[1..].iter().any(|q| !q.is_empty());
    }
    let flushed = shared.wal.flush_lsn();
    (1..QUEUES).any(|q| {
        pending[q]
            .front()
            .is_some_and(|p| p.end <= flushed && (p.end <= rep.synced(q - 1) || !rep.configured()))
    })
}

/// How a wait for a level ends.
#[derive(Clone, Copy)]
enum Outcome {
    /// The level was reached.
    Reached,
    /// `synchronous_commit_timeout_action = degrade`: acknowledged as `local`.
    Degraded,
    /// Written locally, not confirmed at the level asked.
    Indeterminate(IndeterminateReason),
}

impl Shard<'_> {
    fn push_pending(&mut self, mut p: PendingAck) {
        let rep = &self.shared.syncrep;
        let quorum = p.level > Durability::Local && rep.configured();
        if quorum {
            p.quorum = Some(rep.generation());
            rep.waiting.fetch_add(1, Relaxed);
        }
        self.pending[queue_of(p.level, quorum)].push_back(p);
    }

    /// Tells the replication side which quorum positions to signal us at.
    fn want_sync(&self) {
        for q in 1..QUEUES {
            let want = self.pending[q].front().map_or(Lsn(0), |p| p.end);
            self.sync.want(q - 1, want);
        }
    }

    /// The highest level the WAL up to `end` reached.
    fn reached(&self, end: Lsn, flushed: Lsn) -> Durability {
        use crate::replication::syncrep::{APPLY, FLUSH, WRITE};
        let rep = &self.shared.syncrep;
        if end > flushed {
            Durability::Off
        } else if rep.synced(APPLY) >= end {
            Durability::RemoteApply
        } else if rep.synced(FLUSH) >= end {
            Durability::On
        } else if rep.synced(WRITE) >= end {
            Durability::RemoteWrite
        } else {
            Durability::Local
        }
    }

    /// Answers every pending request whose wait is over: `local` ones once
    /// flushed; the others once flushed and confirmed by the quorum, or
    /// ended by `synchronous_commit_timeout`, an emptied setting, or
    /// shutdown (never a success they did not reach).
    fn release(&mut self, conns: &mut HashMap<ConnId, ConnState>, flushed: Lsn, stopping: bool) {
        while self.pending[0].front().is_some_and(|p| p.end <= flushed) {
            let p = self.pending[0].pop_front().unwrap();
            let st = conns.get_mut(&p.conn).filter(|st| st.serial == p.serial);
            self.answer(st, p, Outcome::Reached, flushed, stopping);
        }
        if self.pending[1..].iter().all(VecDeque::is_empty) {
            return;
        }
        let rep = Arc::clone(&self.shared.syncrep);
        let configured = rep.configured();
        let timeout = self.rt.config.synchronous_commit_timeout.duration();
        let action = self.rt.config.synchronous_commit_timeout_action;
        let grace_over = self
            .stopping_since
            .is_some_and(|t| t.elapsed() >= SHUTDOWN_GRACE);
        // Deposed by a newer term: stop acknowledging at once. Every wait
        // for standbys ends INDETERMINATE, flushed locally or not, even one
        // a quorum had confirmed: the new primary's timeline decides.
        let deposed = rep.deposed_by().is_some();
        for q in 1..QUEUES {
            while let Some(p) = self.pending[q].front() {
                // Every level includes the local flush.
                if p.end > flushed && !deposed {
                    break;
                }
                let outcome = if deposed {
                    Outcome::Indeterminate(IndeterminateReason::Deposed)
                } else if p.end <= rep.synced(q - 1) {
                    Outcome::Reached
                } else if !configured {
                    Outcome::Indeterminate(IndeterminateReason::ConfigurationChanged)
                } else if !timeout.is_zero() && p.started.elapsed() >= timeout {
                    match action {
                        TimeoutAction::Indeterminate => {
                            Outcome::Indeterminate(IndeterminateReason::QuorumTimeout)
                        }
                        TimeoutAction::Degrade => Outcome::Degraded,
                    }
                } else if grace_over {
                    Outcome::Indeterminate(IndeterminateReason::ShuttingDown)
                } else {
                    break;
                };
                let p = self.pending[q].pop_front().unwrap();
                rep.waiting.fetch_sub(1, Relaxed);
                let st = conns.get_mut(&p.conn).filter(|st| st.serial == p.serial);
                self.answer(st, p, outcome, flushed, stopping);
            }
        }
    }

    /// A closed connection's waits for standbys: nobody is left to answer,
    /// so they leave the queues (and the "commits waiting" count) now, not
    /// when the quorum comes back. Its `local` waits end at the next flush.
    fn forget_waits(&mut self, id: ConnId, serial: u64) {
        for q in 1..QUEUES {
            let before = self.pending[q].len();
            self.pending[q].retain(|p| !(p.conn == id && p.serial == serial));
            let gone = before - self.pending[q].len();
            if gone > 0 {
                self.shared.syncrep.waiting.fetch_sub(gone as i64, Relaxed);
            }
        }
    }

    /// A Cancel for an Append waiting for standbys: INDETERMINATE now.
    fn cancel_wait(&mut self, id: ConnId, st: &mut ConnState, request_id: u64) {
        for q in 1..QUEUES {
            let found = self.pending[q]
                .iter()
                .position(|p| p.conn == id && p.serial == st.serial && p.request_id == request_id);
            if let Some(i) = found {
                let p = self.pending[q].remove(i).unwrap();
                self.shared.syncrep.waiting.fetch_sub(1, Relaxed);
                let flushed = self.shared.wal.flush_lsn();
                let stopping = self.shared.stopping.load(SeqCst);
                self.answer(
                    Some(st),
                    p,
                    Outcome::Indeterminate(IndeterminateReason::Cancelled),
                    flushed,
                    stopping,
                );
                return;
            }
        }
    }

    fn answer(
        &mut self,
        st: Option<&mut ConnState>,
        p: PendingAck,
        outcome: Outcome,
        flushed: Lsn,
        stopping: bool,
    ) {
        let Some(st) = st else {
            return;
        };
        let rep = &self.shared.syncrep;
        self.out.clear();
        let one;
        let lsns: &[Lsn] = match &p.reply {
            Reply::Ack(lsns) => lsns,
            Reply::PageWritten(lsn) => {
                one = [*lsn];
                &one
            }
        };
        match outcome {
            Outcome::Reached | Outcome::Degraded => match &p.reply {
                Reply::Ack(lsns) => protocol::encode_ack(p.request_id, lsns, p.end, &mut self.out),
                Reply::PageWritten(lsn) => protocol::encode(
                    &Frame::PageWritten {
                        request_id: p.request_id,
                        lsn: *lsn,
                        end: p.end,
                    },
                    &mut self.out,
                ),
            },
            Outcome::Indeterminate(reason) => {
                // Below the level asked, by definition (the quorum's
                // positions per mode are computed apart).
                let i = Durability::ALL
                    .iter()
                    .position(|d| *d == p.level)
                    .unwrap_or(1);
                let reached = self
                    .reached(p.end, flushed)
                    .min(Durability::ALL[i.max(1) - 1]);
                protocol::encode_indeterminate(
                    p.request_id,
                    reached,
                    reason,
                    lsns,
                    p.end,
                    &mut self.out,
                );
            }
        }
        match outcome {
            Outcome::Degraded => {
                let n = rep.degraded.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        "synchronous_commit_timeout ({}) passed: a commit ending at {} was acknowledged at \"local\" \
                         without its standbys ({n} so far); synchronous_commit_timeout_action = degrade",
                        self.rt.config.synchronous_commit_timeout,
                        p.end
                    );
                }
            }
            Outcome::Indeterminate(reason) => {
                rep.indeterminate.fetch_add(1, Relaxed);
                tracing::debug!(?reason, end = %p.end, "commit answered INDETERMINATE");
            }
            Outcome::Reached => {}
        }
        let _ = self.ring.send(p.conn, &self.out);
        self.shared
            .metrics
            .observe_commit_wait(p.level.name(), p.started.elapsed().as_secs_f64());
        st.in_flight -= 1;
        if st.paused && st.in_flight < self.rt.max_in_flight && !st.closing && !stopping {
            st.paused = false;
            let _ = self.ring.resume_recv(p.conn);
        }
    }

    /// On a standby, or a primary deposed by a newer term: why writes
    /// (Append, PageWrite, Checkpoint) are refused. A deposed primary
    /// accepts no new work at any level, `local` and `off` included.
    fn read_only(&self) -> Option<String> {
        if let Some(primary) = &self.shared.standby_of {
            return Some(format!(
                "this server is a standby of {primary} (read-only): send writes to the primary"
            ));
        }
        self.shared
            .syncrep
            .deposed_by()
            .map(crate::replication::fencing::refuse_writes)
    }

    /// Takes one of the `max_wal_senders` places (given back when the
    /// thread ends, or the connection closes before its hand-over); when
    /// none is free, refuses with TOO_MANY_CONNECTIONS (`note` ends the
    /// message) and returns false.
    fn take_sender_slot(
        &mut self,
        id: ConnId,
        st: &mut ConnState,
        request_id: u64,
        note: &str,
    ) -> bool {
        let max = self.shared.cfg.max_wal_senders;
        if self.shared.wal_senders.fetch_add(1, SeqCst) < max {
            return true;
        }
        self.shared.wal_senders.fetch_sub(1, SeqCst);
        let msg = format!(
            "number of requested standby connections exceeds max_wal_senders (currently {max}){note}"
        );
        self.send_error(id, st, request_id, ErrorCode::TOO_MANY_CONNECTIONS, msg);
        false
    }

    /// Starts the walsender thread for a detached replication connection.
    fn start_walsender(
        &mut self,
        fd: OwnedFd,
        req: super::walsender::StartRequest,
        peer: Option<SocketAddr>,
    ) {
        let list = &self.shared.senders;
        self.start_stream_thread(
            "walden-walsnd",
            "walsender",
            list,
            fd,
            peer,
            move |sh, s, p| super::walsender::run(sh, s, req, p),
        );
    }

    /// Starts the thread of a detached base backup connection.
    fn start_backup(
        &mut self,
        fd: OwnedFd,
        req: super::basebackup::BackupRequest,
        peer: Option<SocketAddr>,
    ) {
        let list = &self.shared.backups;
        self.start_stream_thread(
            "walden-backup",
            "base backup",
            list,
            fd,
            peer,
            move |sh, s, p| super::basebackup::run(sh, s, req, p),
        );
    }

    /// Runs `body` on a new thread that owns a detached connection, and
    /// gives its `max_wal_senders` count back when it ends (or fails to start).
    fn start_stream_thread(
        &mut self,
        name: &str,
        what: &str,
        list: &std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
        fd: OwnedFd,
        peer: Option<SocketAddr>,
        body: impl FnOnce(Arc<ServerShared>, std::net::TcpStream, String) + Send + 'static,
    ) {
        let stream = std::net::TcpStream::from(fd);
        let owner = Arc::clone(&self.owner);
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                body(Arc::clone(&owner), stream, peer);
                owner.wal_senders.fetch_sub(1, SeqCst);
            });
        match spawned {
            Ok(h) => {
                let mut threads = list.lock().unwrap();
                threads.retain(|h| !h.is_finished());
                threads.push(h);
            }
            Err(e) => {
                self.shared.wal_senders.fetch_sub(1, SeqCst);
                tracing::error!("could not start a {what} thread: {e}");
            }
        }
    }

    /// Answers a connection over `max_connections` with TOO_MANY_CONNECTIONS
    /// and closes it. Logged at most once a second per shard: a flood of
    /// refused connections must not flood the log (the metric counts each).
    fn refuse(&mut self, id: ConnId, st: &mut ConnState, max: u32) {
        if !matches!(self.refusal_logged, Some(t) if t.elapsed() < Duration::from_secs(1)) {
            self.refusal_logged = Some(Instant::now());
            tracing::warn!(
                shard = self.index,
                peer = ?st.peer,
                "refusing connections: max_connections ({max}) are open"
            );
        }
        let msg = format!("sorry, too many connections already (max_connections = {max})");
        self.send_error(id, st, 0, ErrorCode::TOO_MANY_CONNECTIONS, msg);
    }

    fn send_frame(&mut self, id: ConnId, frame: &Frame) {
        self.out.clear();
        protocol::encode(frame, &mut self.out);
        let _ = self.ring.send(id, &self.out);
    }

    fn send_error(
        &mut self,
        id: ConnId,
        st: &mut ConnState,
        request_id: u64,
        code: ErrorCode,
        message: String,
    ) {
        tracing::debug!(shard = self.index, peer = ?st.peer, %code, %message, "error sent to client");
        self.shared.metrics.error(match code {
            ErrorCode::BAD_FRAME | ErrorCode::UNKNOWN_TYPE | ErrorCode::UNSUPPORTED_VERSION => {
                "bad_frame"
            }
            ErrorCode::AUTH_FAILED => "auth",
            ErrorCode::FRAME_TOO_LARGE | ErrorCode::RECORD_TOO_LARGE => "too_large",
            ErrorCode::TOO_MANY_CONNECTIONS => "too_many_connections",
            ErrorCode::BAD_PAGE => "bad_frame",
            ErrorCode::IO_ERROR | ErrorCode::PAGE_CORRUPT => "io",
            _ => "other",
        });
        self.send_frame(
            id,
            &Frame::Error {
                request_id,
                code,
                message,
            },
        );
        if code.closes_connection() {
            st.closing = true;
            let _ = self.ring.close_after_send(id);
        }
    }

    /// TimelineHistory: the history file of a timeline in this server's
    /// history (empty for timeline 1, which has none), as PostgreSQL's
    /// TIMELINE_HISTORY. A small file read on the shard thread.
    fn send_history(&mut self, id: ConnId, st: &mut ConnState, request_id: u64, timeline: u32) {
        use crate::wal::timeline::{history_file_name, TimelineMap};
        let cfg = &self.shared.cfg;
        let current = self.shared.wal.timeline();
        let map = TimelineMap::load_or_single(&cfg.wal_dir, current, cfg.wal_segment_size.0);
        if timeline == 0 || !map.contains(timeline) {
            let msg = format!(
                "requested timeline {timeline} is not in this server's history (it is on timeline {current})"
            );
            return self.send_error(id, st, request_id, ErrorCode::TIMELINE_NOT_IN_HISTORY, msg);
        }
        let history = if timeline == 1 {
            Vec::new()
        } else {
            let path = cfg.wal_dir.join(history_file_name(timeline));
            match crate::io::file::read_file(&path) {
                Ok(b) => b,
                Err(e) => {
                    let msg = format!("could not read \"{}\": {e}", path.display());
                    return self.send_error(id, st, request_id, ErrorCode::IO_ERROR, msg);
                }
            }
        };
        self.send_frame(
            id,
            &Frame::HistoryData {
                request_id,
                timeline,
                history,
            },
        );
    }

    /// A replication frame this connection cannot take: UNKNOWN_TYPE, and
    /// the connection closes (docs/protocol.md §3). StandbyStatus belongs on
    /// a replication stream (the walsender reads it there).
    fn refuse_replication(
        &mut self,
        id: ConnId,
        st: &mut ConnState,
        request_id: u64,
        ty: FrameType,
    ) {
        let msg = format!(
            "{ty:?} frames ({:#04x}) are accepted only on a replication stream, after StartReplication",
            ty as u8
        );
        self.send_error(id, st, request_id, ErrorCode::UNKNOWN_TYPE, msg);
    }

    /// Feeds `data` to the connection's decoder and handles every complete
    /// frame. The decoder holds at most `max_frame_size` bytes.
    fn process(
        &mut self,
        id: ConnId,
        st: &mut ConnState,
        dec: &mut Decoder,
        data: &[u8],
        ins: &mut crate::wal::Inserter<'_>,
    ) {
        let mut taken = 0;
        while !st.closing && st.replication.is_none() {
            taken += dec.extend(&data[taken..]);
            loop {
                match dec.next_frame() {
                    Ok(None) => break,
                    Ok(Some(frame)) => {
                        let had_hello = st.hello;
                        self.handle(id, st, frame, ins);
                        if st.closing {
                            return;
                        }
                        if st.replication.is_some() {
                            // A standby waits for StreamStart before it
                            // sends more: anything after is a protocol error
                            // the walsender reports.
                            return;
                        }
                        if st.hello && !had_hello {
                            // Authenticated: the full limits apply from the
                            // next frame on (requests may follow the Hello
                            // in the same receive).
                            dec.hello_accepted();
                        }
                    }
                    Err(e) => {
                        // IMPORTANT: a malformed frame ends this connection,
                        // and only this one; a too-large record fails only its
                        // own request (the decoder skipped it).
                        let frame = e.to_frame();
                        if let Frame::Error { code, message, .. } = frame {
                            self.send_error(id, st, e.request_id, code, message);
                        }
                        if e.closes_connection() {
                            st.closing = true;
                            let _ = self.ring.close_after_send(id);
                            return;
                        }
                    }
                }
            }
            if taken == data.len() {
                break;
            }
        }
    }

    fn handle(
        &mut self,
        id: ConnId,
        st: &mut ConnState,
        frame: FrameRef<'_>,
        ins: &mut crate::wal::Inserter<'_>,
    ) {
        let wal = &self.shared.wal;
        // (The decoder refuses anything but Hello before Hello already.)
        if !st.hello && !matches!(frame, FrameRef::Hello { .. }) {
            let msg = "the first frame on a connection must be Hello".to_string();
            return self.send_error(id, st, frame.request_id(), ErrorCode::BAD_FRAME, msg);
        }
        if st.hello && matches!(frame, FrameRef::Hello { .. }) {
            let msg = "a second Hello: this connection already said Hello".to_string();
            return self.send_error(id, st, frame.request_id(), ErrorCode::BAD_FRAME, msg);
        }
        match frame {
            FrameRef::Hello {
                request_id,
                version,
                token,
                client_name,
            } => {
                let Some(v) = protocol::negotiate_version(version) else {
                    let msg = format!(
                        "protocol version {version} is not supported (this server speaks {}..={})",
                        protocol::MIN_VERSION,
                        protocol::VERSION
                    );
                    return self.send_error(
                        id,
                        st,
                        request_id,
                        ErrorCode::UNSUPPORTED_VERSION,
                        msg,
                    );
                };
                let expected = self.rt.token.clone();
                if let Some(expected) = expected {
                    if !super::constant_time_eq(&expected, token) {
                        tracing::warn!(peer = ?st.peer, client = client_name, "authentication failed");
                        let msg = "authentication failed: wrong or missing token".to_string();
                        return self.send_error(id, st, request_id, ErrorCode::AUTH_FAILED, msg);
                    }
                }
                st.hello = true;
                self.send_frame(
                    id,
                    &Frame::HelloOk {
                        request_id,
                        version: v,
                        system_id: self.shared.store.control().system_identifier,
                        segment_size: self.shared.cfg.wal_segment_size.0,
                        limits: self.limits,
                        max_in_flight: self.rt.max_in_flight,
                        server_name: self.shared.name.clone(),
                    },
                );
            }
            FrameRef::Append {
                request_id,
                durability,
                records,
            } => {
                if let Some(msg) = self.read_only() {
                    return self.send_error(id, st, request_id, ErrorCode::READ_ONLY, msg);
                }
                if self.shared.stopping.load(SeqCst) {
                    let msg = "the server is shutting down".to_string();
                    return self.send_error(id, st, request_id, ErrorCode::SHUTTING_DOWN, msg);
                }
                let recs: Vec<(Kind, &[u8])> = records.iter().collect();
                self.lsns.clear();
                match ins.append_batch(&recs, &mut self.lsns) {
                    Ok(end) => {
                        if durability == Durability::Off {
                            self.shared.metrics.observe_commit_wait("off", 0.0);
                            self.out.clear();
                            protocol::encode_ack(request_id, &self.lsns, end, &mut self.out);
                            let _ = self.ring.send(id, &self.out);
                        } else {
                            st.in_flight += 1;
                            self.push_pending(PendingAck {
                                end,
                                conn: id,
                                serial: st.serial,
                                request_id,
                                reply: Reply::Ack(self.lsns.clone()),
                                started: Instant::now(),
                                level: durability,
                                quorum: None,
                            });
                        }
                    }
                    Err(e) => {
                        let code = match e {
                            WalError::RecordTooLarge { .. } => ErrorCode::RECORD_TOO_LARGE,
                            WalError::InvalidKind => ErrorCode::BAD_FRAME,
                            WalError::Closed => ErrorCode::SHUTTING_DOWN,
                            WalError::WalFull { .. } => ErrorCode::WAL_FULL,
                            _ => ErrorCode::INTERNAL,
                        };
                        self.send_error(id, st, request_id, code, e.to_string());
                    }
                }
            }
            FrameRef::PageWrite {
                request_id,
                durability,
                rel,
                block,
                offset,
                data,
            } => {
                if let Some(msg) = self.read_only() {
                    return self.send_error(id, st, request_id, ErrorCode::READ_ONLY, msg);
                }
                if self.shared.stopping.load(SeqCst) {
                    let msg = "the server is shutting down".to_string();
                    return self.send_error(id, st, request_id, ErrorCode::SHUTTING_DOWN, msg);
                }
                let store = &self.shared.store;
                match store.write_page_with(ins, rel, block, offset as usize, data) {
                    Ok(a) if durability == Durability::Off => {
                        self.shared.metrics.observe_commit_wait("off", 0.0);
                        self.send_frame(
                            id,
                            &Frame::PageWritten {
                                request_id,
                                lsn: a.lsn,
                                end: a.end,
                            },
                        );
                    }
                    Ok(a) => {
                        st.in_flight += 1;
                        self.push_pending(PendingAck {
                            end: a.end,
                            conn: id,
                            serial: st.serial,
                            request_id,
                            reply: Reply::PageWritten(a.lsn),
                            started: Instant::now(),
                            level: durability,
                            quorum: None,
                        });
                    }
                    Err(e) => {
                        let code = store_error_code(&e);
                        self.send_error(id, st, request_id, code, e.to_string());
                    }
                }
            }
            FrameRef::PageRead {
                request_id,
                rel,
                block,
            } => {
                let mut page = std::mem::take(&mut self.page);
                match self.shared.store.read_page_into(rel, block, &mut page) {
                    Ok(lsn) => {
                        self.out.clear();
                        protocol::encode_page_data(request_id, lsn, &page, &mut self.out);
                        let _ = self.ring.send(id, &self.out);
                    }
                    Err(e) => {
                        let code = store_error_code(&e);
                        self.send_error(id, st, request_id, code, e.to_string());
                    }
                }
                self.page = page;
            }
            FrameRef::Checkpoint { request_id } => {
                if let Some(msg) = self.read_only() {
                    return self.send_error(id, st, request_id, ErrorCode::READ_ONLY, msg);
                }
                if self.shared.stopping.load(SeqCst) {
                    let msg = "the server is shutting down".to_string();
                    return self.send_error(id, st, request_id, ErrorCode::SHUTTING_DOWN, msg);
                }
                st.in_flight += 1;
                let ticket = self.shared.store.request_checkpoint();
                self.checkpoints.push(PendingCheckpoint {
                    conn: id,
                    serial: st.serial,
                    request_id,
                    ticket,
                });
            }
            FrameRef::Read {
                request_id,
                from,
                max_bytes,
                max_records,
            } => {
                let mut reader = match self.open_reader(from) {
                    Ok(r) => r,
                    Err(msg) => {
                        return self.send_error(id, st, request_id, ErrorCode::UNKNOWN_LSN, msg)
                    }
                };
                let max_bytes =
                    (max_bytes as usize).clamp(1, self.limits.max_frame_size as usize / 2);
                let max_records = if max_records == 0 {
                    u32::MAX
                } else {
                    max_records
                };
                let mut batch: Vec<(Lsn, Kind, Vec<u8>)> = Vec::new();
                let mut bytes = 0usize;
                let mut first = true;
                loop {
                    if batch.len() as u32 >= max_records || bytes >= max_bytes {
                        break;
                    }
                    match reader.next_record() {
                        Ok(Some(r)) => {
                            if !first && bytes + r.payload.len() > max_bytes {
                                break;
                            }
                            bytes += r.payload.len();
                            batch.push((r.lsn, r.kind, r.payload.to_vec()));
                            first = false;
                        }
                        Ok(None) => {
                            if first && from < wal.flush_lsn() {
                                if let Some(
                                    end @ (EndOfWal::Invalid(_) | EndOfWal::MissingSegment { .. }),
                                ) = reader.end()
                                {
                                    let msg = self.no_record_at(from, end);
                                    return self.send_error(
                                        id,
                                        st,
                                        request_id,
                                        ErrorCode::UNKNOWN_LSN,
                                        msg,
                                    );
                                }
                            }
                            break;
                        }
                        Err(e) => {
                            return self.send_error(
                                id,
                                st,
                                request_id,
                                ErrorCode::INTERNAL,
                                e.to_string(),
                            );
                        }
                    }
                }
                let end = batch
                    .last()
                    .map(|(l, _, p)| Lsn(l.0 + crate::record::stream_len(p.len())))
                    .unwrap_or(from);
                self.out.clear();
                encode_batch(request_id, &batch, &mut self.out);
                protocol::encode(&Frame::ReadEnd { request_id, end }, &mut self.out);
                let _ = self.ring.send(id, &self.out);
            }
            FrameRef::Follow { request_id, from } => {
                match self.open_reader(from) {
                    Ok(reader) => {
                        st.follow = Some(Follow {
                            request_id,
                            reader,
                            from,
                        })
                    }
                    Err(msg) => {
                        return self.send_error(id, st, request_id, ErrorCode::UNKNOWN_LSN, msg)
                    }
                }
                let flushed = wal.flush_lsn();
                self.feed_follower(id, st, flushed);
            }
            FrameRef::Cancel { request_id } => {
                self.cancel_wait(id, st, request_id);
                if st
                    .follow
                    .as_ref()
                    .is_some_and(|f| f.request_id == request_id)
                {
                    let f = st.follow.take().unwrap();
                    let end = f.reader.position();
                    self.send_frame(id, &Frame::ReadEnd { request_id, end });
                }
            }
            FrameRef::Status { request_id } => {
                let json = super::status_json(self.shared);
                self.send_frame(
                    id,
                    &Frame::StatusReply {
                        request_id,
                        insert_lsn: wal.insert_lsn(),
                        write_lsn: wal.write_lsn(),
                        flush_lsn: wal.flush_lsn(),
                        json,
                    },
                );
            }
            // The layouts are defined (docs/protocol.md §4.10-4.12), the
            // behaviour is not yet.
            FrameRef::StartReplication {
                request_id,
                system_id,
                timeline,
                start,
                term,
                slot,
                application_name,
            } => {
                if let Some(primary) = &self.shared.standby_of {
                    let msg = format!(
                        "this server is a standby of {primary}: cascading replication is not supported"
                    );
                    return self.send_error(id, st, request_id, ErrorCode::READ_ONLY, msg);
                }
                if !self.take_sender_slot(id, st, request_id, "") {
                    return;
                }
                let name = if application_name.is_empty() {
                    "walreceiver"
                } else {
                    application_name
                };
                st.replication = Some(Handoff::Stream(super::walsender::StartRequest {
                    request_id,
                    system_id,
                    timeline,
                    start,
                    term,
                    slot: slot.to_string(),
                    application_name: name.to_string(),
                }));
                // Nothing more is read here; the walsender reads the rest.
                self.ring.detach_after_send(id);
            }
            FrameRef::BaseBackup { request_id, label } => {
                if let Some(primary) = &self.shared.standby_of {
                    let msg = format!(
                        "this server is a standby of {primary}: a base backup from a standby is not supported; take it from the primary"
                    );
                    return self.send_error(id, st, request_id, ErrorCode::BACKUP_REFUSED, msg);
                }
                // A backup writes WAL (its checkpoint, BACKUP_START): no new
                // work on a deposed primary.
                if let Some(by) = self.shared.syncrep.deposed_by() {
                    let msg = crate::replication::fencing::refuse_backup(by);
                    return self.send_error(id, st, request_id, ErrorCode::BACKUP_REFUSED, msg);
                }
                // A backup counts as a walsender, as in PostgreSQL.
                if !self.take_sender_slot(id, st, request_id, "; a base backup counts as one") {
                    return;
                }
                st.replication = Some(Handoff::Backup(super::basebackup::BackupRequest {
                    request_id,
                    label: label.to_string(),
                }));
                self.ring.detach_after_send(id);
            }
            FrameRef::StandbyStatus { request_id, .. } => {
                self.refuse_replication(id, st, request_id, FrameType::StandbyStatus)
            }
            FrameRef::Promote { request_id } => {
                if self.shared.standby_of.is_none() {
                    let msg = "cannot promote server; server is not in standby mode".to_string();
                    return self.send_error(id, st, request_id, ErrorCode::NOT_IN_RECOVERY, msg);
                }
                let Some(hook) = self.shared.promote_hook.lock().unwrap().clone() else {
                    let msg = "this server cannot promote itself (it is not run by `walden serve`)"
                        .to_string();
                    return self.send_error(id, st, request_id, ErrorCode::NOT_IN_RECOVERY, msg);
                };
                // A small synchronous file write on the shard: promotions are rare.
                let signal = self.shared.cfg.data_dir.join(super::PROMOTE_SIGNAL);
                if let Err(e) = crate::io::file::write_file(&signal, b"") {
                    return self.send_error(id, st, request_id, ErrorCode::IO_ERROR, e.to_string());
                }
                self.send_frame(
                    id,
                    &Frame::PromoteResult {
                        request_id,
                        timeline: wal.timeline(),
                        flush: wal.flush_lsn(),
                    },
                );
                hook();
            }
            FrameRef::TimelineHistory {
                request_id,
                timeline,
            } => self.send_history(id, st, request_id, timeline),
            FrameRef::SlotCommand {
                request_id,
                op,
                name,
            } => {
                if let Some(primary) = &self.shared.standby_of {
                    let msg = format!(
                        "this server is a standby of {primary}: replication slots are managed on the primary"
                    );
                    return self.send_error(id, st, request_id, ErrorCode::READ_ONLY, msg);
                }
                // A small synchronous file write (tmp, fsync, rename, fsync
                // of the directory) on the shard: slot commands are rare.
                let slots = &self.shared.slots;
                let res = match op {
                    protocol::SlotOp::Create => {
                        let at = self.shared.store.redo_lsn().max(wal.start_lsn());
                        slots.create(name, at)
                    }
                    protocol::SlotOp::Drop => slots.drop_slot(name).map(|()| Lsn(0)),
                };
                match res {
                    Ok(restart_lsn) => self.send_frame(
                        id,
                        &Frame::SlotResult {
                            request_id,
                            restart_lsn,
                        },
                    ),
                    Err(e) => self.send_error(id, st, request_id, e.code, e.message),
                }
            }
            other => {
                // The decoder only yields frames a client may send.
                let msg = format!("unexpected frame {:?}", std::mem::discriminant(&other));
                self.send_error(id, st, other.request_id(), ErrorCode::BAD_FRAME, msg);
            }
        }
    }

    /// Answers the Checkpoint requests whose checkpoint has completed; on
    /// shutdown, every one still waiting.
    fn answer_checkpoints(&mut self, conns: &mut HashMap<ConnId, ConnState>, stopping: bool) {
        let mut i = 0;
        while i < self.checkpoints.len() {
            let c = &self.checkpoints[i];
            let outcome = match self.shared.store.checkpoint_outcome(c.ticket) {
                Some(o) => o,
                None if stopping => Err("the server is shutting down".to_string()),
                None => {
                    i += 1;
                    continue;
                }
            };
            let c = self.checkpoints.swap_remove(i);
            let Some(st) = conns.get_mut(&c.conn).filter(|st| st.serial == c.serial) else {
                continue;
            };
            st.in_flight -= 1;
            match outcome {
                Ok((checkpoint, redo)) => self.send_frame(
                    c.conn,
                    &Frame::CheckpointDone {
                        request_id: c.request_id,
                        checkpoint,
                        redo,
                    },
                ),
                Err(msg) => {
                    let code = if stopping {
                        ErrorCode::SHUTTING_DOWN
                    } else {
                        ErrorCode::IO_ERROR
                    };
                    self.send_error(c.conn, st, c.request_id, code, msg)
                }
            }
        }
    }

    /// A reader at `from`, which must lie in the retained, inserted WAL.
    fn open_reader(&self, from: Lsn) -> Result<WalReader, String> {
        let wal = &self.shared.wal;
        let start = wal.start_lsn();
        if from < start {
            return Err(self.not_retained(from, start));
        }
        let insert = wal.insert_lsn();
        if from > insert {
            return Err(format!(
                "{from} is beyond the end of WAL: the next record will start at {insert}"
            ));
        }
        Ok(WalReader::new(
            &self.shared.cfg.wal_dir,
            self.shared.cfg.wal_segment_size.0,
            wal.timeline(),
            from,
            Some(wal.flush_lsn()),
        ))
    }

    /// Why `from`, below the WAL's start `start`, cannot be read: it never
    /// existed (below the stream's first byte, wal-format.md §1), or it was
    /// released, and by which checkpoint as far as this process knows.
    /// Released WAL is never served, even while its segment file is still
    /// on disk (docs/protocol.md §4.3): what a client can read must not
    /// depend on when a segment happens to be recycled.
    fn not_retained(&self, from: Lsn, start: Lsn) -> String {
        let first = Lsn(self.shared.cfg.wal_segment_size.0);
        if from < first {
            return format!(
                "{from} never existed: the WAL stream starts at {first} \
                 (wal_segment_size), and the retained WAL at {start}"
            );
        }
        let keep = size_text(self.shared.cfg.wal_keep_size.0);
        let by = match self.shared.wal.start_released_by() {
            Some(checkpoint) => format!("released by the checkpoint at {checkpoint}"),
            None => {
                let c = self.shared.store.control();
                format!(
                    "released before this server started; the latest checkpoint \
                     is at {} (redo {})",
                    c.checkpoint, c.redo
                )
            }
        };
        format!(
            "{from} is not retained (wal_keep_size = {keep}; {by}): the WAL now starts at {start}"
        )
    }

    /// Why no record could be read at `from`, below the flush LSN, where
    /// the reader found `end`: inside a record (found by a bounded search,
    /// [`locate`]), released meanwhile, or not a record start at all.
    fn no_record_at(&self, from: Lsn, end: &EndOfWal) -> String {
        let wal = &self.shared.wal;
        let start = wal.start_lsn();
        if from < start {
            return self.not_retained(from, start);
        }
        if let EndOfWal::MissingSegment { .. } = end {
            return format!("cannot read {from}: {end}");
        }
        let hint = "records start on 8-byte boundaries; `walden waldump` lists them";
        let found = locate(
            &self.shared.cfg.wal_dir,
            self.shared.cfg.wal_segment_size.0,
            wal.timeline(),
            from,
            start,
            wal.flush_lsn(),
            self.shared.cfg.max_record_size.0,
        );
        match found {
            Ok(Located::Inside {
                record,
                kind,
                payload_len,
                next,
            }) => format!(
                "{from} is inside the record at {record} ({kind}, {payload_len} bytes of \
                 payload); the next record starts at {next}"
            ),
            Ok(Located::AfterRecord { record }) => format!(
                "the record after the one at {record} should start at {from}, and the \
                 bytes there are not a valid record: {end}"
            ),
            Ok(Located::Unknown) => format!("no record starts at {from} ({hint})"),
            Err(e) => format!("no record starts at {from} ({hint}); looking for one: {e}"),
        }
    }

    /// Sends a follower what became durable, while its backlog allows.
    fn feed_follower(&mut self, id: ConnId, st: &mut ConnState, flushed: Lsn) {
        let max_backlog = self.rt.max_send_backlog;
        let Some(f) = st.follow.as_mut() else { return };
        f.reader.set_limit(Some(flushed));
        let request_id = f.request_id;
        let mut batch: Vec<(Lsn, Kind, Vec<u8>)> = Vec::new();
        loop {
            if self.ring.send_backlog(id) >= max_backlog {
                break;
            }
            batch.clear();
            let mut bytes = 0;
            let mut bad = None;
            let mut bad_from = None;
            while bytes < FOLLOW_CHUNK {
                match f.reader.next_record() {
                    Ok(Some(r)) => {
                        bytes += r.payload.len() + 13;
                        batch.push((r.lsn, r.kind, r.payload.to_vec()));
                    }
                    Ok(None) => {
                        match f.reader.end() {
                            Some(
                                end @ (EndOfWal::Invalid(_) | EndOfWal::MissingSegment { .. }),
                            ) if f.reader.position() == f.from => {
                                bad_from = Some((f.from, end.clone()));
                            }
                            Some(EndOfWal::Invalid(e)) => {
                                bad = Some(format!("following stopped at {}: {e}", e.lsn()));
                            }
                            _ => {}
                        }
                        break;
                    }
                    Err(e) => {
                        bad = Some(e.to_string());
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                self.out.clear();
                encode_batch(request_id, &batch, &mut self.out);
                let _ = self.ring.send(id, &self.out);
            }
            if let Some((from, end)) = bad_from {
                bad = Some(self.no_record_at(from, &end));
            }
            if let Some(msg) = bad {
                st.follow = None;
                return self.send_error(id, st, request_id, ErrorCode::UNKNOWN_LSN, msg);
            }
            if batch.is_empty() || bytes < FOLLOW_CHUNK {
                break;
            }
        }
    }

    /// Takes a new copy of the reloadable settings if a reload changed
    /// them: one atomic load per loop turn, the lock only after a reload.
    fn refresh_runtime(&mut self) {
        let v = self.shared.runtime_version.load(SeqCst);
        if v != self.rt_version {
            self.rt = self.shared.runtime.read().unwrap().clone();
            self.rt_version = v;
        }
    }

    /// Closes idle connections and slow clients.
    fn sweep_timeouts(&mut self, conns: &mut HashMap<ConnId, ConnState>) {
        let (idle, slow, max_backlog) = (
            self.rt.idle_timeout,
            self.rt.slow_client_timeout,
            self.rt.max_send_backlog,
        );
        let ids: Vec<ConnId> = conns.keys().copied().collect();
        for id in ids {
            let st = conns.get_mut(&id).unwrap();
            if st.closing {
                continue;
            }
            if self.ring.send_backlog(id) > max_backlog {
                let since = *st.slow_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= slow {
                    let msg = format!(
                        "client too slow: more than {max_backlog} bytes unsent for {slow:?}"
                    );
                    tracing::warn!(peer = ?st.peer, "{msg}");
                    self.send_error(id, st, 0, ErrorCode::TIMEOUT, msg);
                    st.closing = true;
                    let _ = self.ring.close(id);
                }
                continue;
            }
            st.slow_since = None;
            if !idle.is_zero()
                && st.in_flight == 0
                && st.follow.is_none()
                && st.last_activity.elapsed() >= idle
            {
                let msg = format!("closing idle connection after {idle:?}");
                self.send_error(id, st, 0, ErrorCode::TIMEOUT, msg);
                st.closing = true;
                let _ = self.ring.close_after_send(id);
            }
        }
    }
}

/// A Records frame of records read from the WAL (nothing if there are none).
fn encode_batch(request_id: u64, batch: &[(Lsn, Kind, Vec<u8>)], out: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    protocol::encode_records(
        request_id,
        batch.iter().map(|(lsn, kind, payload)| RecordRef {
            lsn: *lsn,
            kind: *kind,
            payload,
        }),
        out,
    );
}

/// The Error code for a page-store failure.
fn store_error_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::BadRequest(_) => ErrorCode::BAD_PAGE,
        StoreError::Page(_) => ErrorCode::PAGE_CORRUPT,
        StoreError::File(_) | StoreError::NoFreeBuffers(_) => ErrorCode::IO_ERROR,
        StoreError::Wal(WalError::Closed) => ErrorCode::SHUTTING_DOWN,
        StoreError::Wal(WalError::RecordTooLarge { .. }) => ErrorCode::RECORD_TOO_LARGE,
        StoreError::Wal(WalError::WalFull { .. }) => ErrorCode::WAL_FULL,
        _ => ErrorCode::INTERNAL,
    }
}

/// A size as the settings are written: the largest unit that divides it.
fn size_text(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TB"),
        (1 << 30, "GB"),
        (1 << 20, "MB"),
        (1 << 10, "kB"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| bytes > 0 && bytes % unit == 0)
        .map_or_else(
            || bytes.to_string(),
            |(unit, name)| format!("{}{name}", bytes / unit),
        )
}
