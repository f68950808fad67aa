//! The primary's side of synchronous replication: what each connected
//! standby reported, the quorum positions commits wait for, and the
//! wake-ups of the shards whose waiters those positions release
//! (PostgreSQL's `WalSndCtl` and `SyncRepReleaseWaiters`).
//!
//! - Walsenders [`SyncRep::register`] their standby, move its state and
//!   sent LSN, and hand every StandbyStatus to [`SyncRep::report`].
//! - Each report recomputes the quorum ([`Quorum::compute`]) under one
//!   small mutex and raises three monotone atomics (write, flush, apply):
//!   a position once released never goes back, though the standbys that
//!   met it may disconnect (every value was true of a quorum when
//!   computed, T9 in replication-design.md).
//! - A shard says per level the smallest end it waits for
//!   ([`SyncListener::want`]), then re-checks [`SyncRep::synced`]; a report
//!   that passes a wish signals the shard's eventfd. No timer on the
//!   commit path.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use super::quorum::{Quorum, SenderState, StandbyReport, StandbySync, SyncState, Synced};
use super::standby_names::StandbyNames;
use crate::io::uring::EventFd;
use crate::lsn::Lsn;

/// The three wait modes, in the order of [`SyncRep::synced`]'s index.
pub const WRITE: usize = 0;
pub const FLUSH: usize = 1;
pub const APPLY: usize = 2;

/// A thread that sleeps in its own event loop (a shard) and wants to be
/// signalled when a quorum position reaches an LSN.
pub struct SyncListener {
    wants: [AtomicU64; 3],
    wake: Arc<EventFd>,
}

impl SyncListener {
    pub fn new(wake: Arc<EventFd>) -> SyncListener {
        SyncListener {
            wants: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            wake,
        }
    }

    /// Asks to be signalled once `synced(mode) ≥ lsn` (`Lsn(0)`: nothing).
    /// As `FlushListener::want`: the caller re-checks after a SeqCst fence.
    pub fn want(&self, mode: usize, lsn: Lsn) {
        self.wants[mode].store(lsn.0, SeqCst);
    }

    fn notify(&self, synced: &[u64; 3]) {
        for (m, s) in synced.iter().enumerate() {
            let w = self.wants[m].load(SeqCst);
            if w != 0 && *s >= w && self.wants[m].compare_exchange(w, 0, SeqCst, SeqCst).is_ok() {
                self.wake.signal();
                return;
            }
        }
    }
}

/// One connected standby, as `pg_stat_replication` shows it.
#[derive(Clone, Debug)]
pub struct StandbyRow {
    pub pid: u64,
    pub application_name: String,
    pub client_addr: String,
    pub state: SenderState,
    pub sent: Lsn,
    pub write: Lsn,
    pub flush: Lsn,
    pub apply: Lsn,
    pub write_lag: Option<Duration>,
    pub flush_lag: Option<Duration>,
    pub replay_lag: Option<Duration>,
    pub sync_priority: u32,
    pub sync_state: SyncState,
    pub backend_start: SystemTime,
    pub reply_time: Option<SystemTime>,
}

struct Standby {
    row: StandbyRow,
    /// (end sent, when): the sends not yet reported back in every mode,
    /// for lag as time (PostgreSQL's LagTracker, simplified).
    sends: VecDeque<(Lsn, Instant)>,
    /// The last send each mode passed, to measure against while nothing
    /// newer was sent: lag grows while the standby stalls (never frozen).
    pending: [Option<(Lsn, Instant)>; 3],
}

const MAX_SENDS: usize = 4096;

struct Inner {
    standbys: Vec<Standby>,
    quorum: Quorum,
    next_id: u64,
    lost_since: Option<SystemTime>,
}

/// Shared by the shards and the walsenders of one primary.
pub struct SyncRep {
    names: RwLock<Option<Arc<StandbyNames>>>,
    configured: AtomicBool,
    /// Bumped at each change of `synchronous_standby_names`.
    generation: AtomicU64,
    synced: [AtomicU64; 3],
    inner: Mutex<Inner>,
    listeners: RwLock<Vec<Arc<SyncListener>>>,
    /// Commits acknowledged at `local` by `synchronous_commit_timeout_action = degrade`.
    pub degraded: AtomicU64,
    /// Commits answered INDETERMINATE.
    pub indeterminate: AtomicU64,
    /// Commits waiting for standbys now (the shards count them).
    pub waiting: std::sync::atomic::AtomicI64,
    /// The term that deposed this primary (0: not deposed). Set once, never
    /// cleared while the server runs: see [`SyncRep::depose`].
    deposed_by: AtomicU64,
}

impl SyncRep {
    pub fn new(names: Option<StandbyNames>) -> SyncRep {
        let configured = names.is_some();
        SyncRep {
            names: RwLock::new(names.map(Arc::new)),
            configured: AtomicBool::new(configured),
            generation: AtomicU64::new(0),
            synced: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            inner: Mutex::new(Inner {
                standbys: Vec::new(),
                quorum: Quorum::new(),
                next_id: 1,
                lost_since: configured.then(SystemTime::now),
            }),
            listeners: RwLock::new(Vec::new()),
            degraded: AtomicU64::new(0),
            indeterminate: AtomicU64::new(0),
            waiting: std::sync::atomic::AtomicI64::new(0),
            deposed_by: AtomicU64::new(0),
        }
    }

    /// This primary learnt of a higher `term` (already persisted by the
    /// caller): it stops acknowledging at once. Every shard is woken, ends
    /// its waits for standbys with INDETERMINATE (reason Deposed) and
    /// refuses new writes. Returns whether this call deposed it (false: it
    /// already was, by this or a higher term).
    pub fn depose(&self, term: u64) -> bool {
        let before = self.deposed_by.fetch_max(term, SeqCst);
        for l in self.listeners.read().unwrap().iter() {
            l.wake.signal();
        }
        before == 0
    }

    /// The term that deposed this primary, if one did.
    pub fn deposed_by(&self) -> Option<u64> {
        Some(self.deposed_by.load(SeqCst)).filter(|t| *t != 0)
    }

    pub fn add_listener(&self, l: Arc<SyncListener>) {
        self.listeners.write().unwrap().push(l);
    }

    /// Whether commits at `remote_write`/`on`/`remote_apply` wait for standbys.
    pub fn configured(&self) -> bool {
        self.configured.load(SeqCst)
    }

    /// Bumped each time the setting changes (a wait admitted under another
    /// setting is not judged by this one).
    pub fn generation(&self) -> u64 {
        self.generation.load(SeqCst)
    }

    /// Up to where the policy was met in `mode` (monotone).
    pub fn synced(&self, mode: usize) -> Lsn {
        Lsn(self.synced[mode].load(SeqCst))
    }

    /// A new `synchronous_standby_names` (reload).
    pub fn set_names(&self, names: Option<StandbyNames>) {
        let same = self.names.read().unwrap().as_deref() == names.as_ref();
        if same {
            return;
        }
        self.configured.store(names.is_some(), SeqCst);
        *self.names.write().unwrap() = names.map(Arc::new);
        self.generation.fetch_add(1, SeqCst);
        self.recompute(&mut self.inner.lock().unwrap());
        // Shards look at the generation: wake them all.
        for l in self.listeners.read().unwrap().iter() {
            l.wake.signal();
        }
    }

    /// A walsender starts; its id for the calls below.
    pub fn register(&self, application_name: &str, client_addr: String) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.standbys.push(Standby {
            row: StandbyRow {
                pid: id,
                application_name: application_name.to_string(),
                client_addr,
                state: SenderState::Startup,
                sent: Lsn::INVALID,
                write: Lsn::INVALID,
                flush: Lsn::INVALID,
                apply: Lsn::INVALID,
                write_lag: None,
                flush_lag: None,
                replay_lag: None,
                sync_priority: 0,
                sync_state: SyncState::Async,
                backend_start: SystemTime::now(),
                reply_time: None,
            },
            sends: VecDeque::new(),
            pending: [None; 3],
        });
        self.recompute(&mut inner);
        id
    }

    pub fn unregister(&self, id: u64) {
        let mut inner = self.inner.lock().unwrap();
        inner.standbys.retain(|s| s.row.pid != id);
        self.recompute(&mut inner);
    }

    /// The walsender sent WAL up to `sent` and is in `state`.
    pub fn sent(&self, id: u64, sent: Lsn, state: SenderState) {
        let mut inner = self.inner.lock().unwrap();
        let Some(s) = inner.standbys.iter_mut().find(|s| s.row.pid == id) else {
            return;
        };
        if sent > s.row.sent {
            if s.sends.len() == MAX_SENDS {
                s.sends.pop_front();
            }
            s.sends.push_back((sent, Instant::now()));
        }
        s.row.sent = s.row.sent.max(sent);
        let changed = s.row.state != state;
        s.row.state = state;
        if changed {
            self.recompute(&mut inner);
        }
    }

    /// A StandbyStatus from standby `id`: its positions (kept monotone for
    /// this connection), then the quorum.
    pub fn report(&self, id: u64, write: Lsn, flush: Lsn, apply: Lsn) {
        let mut inner = self.inner.lock().unwrap();
        let Some(s) = inner.standbys.iter_mut().find(|s| s.row.pid == id) else {
            return;
        };
        s.row.write = s.row.write.max(write);
        s.row.flush = s.row.flush.max(flush);
        s.row.apply = s.row.apply.max(apply);
        s.row.reply_time = Some(SystemTime::now());
        let now = Instant::now();
        let reported = [s.row.write, s.row.flush, s.row.apply];
        // Lag: the time since the newest send each position passed.
        for (m, at) in reported.iter().enumerate() {
            let mut passed = None;
            for (lsn, t) in s.sends.iter() {
                if *lsn <= *at {
                    passed = Some((*lsn, *t));
                } else {
                    break;
                }
            }
            if let Some((lsn, t)) = passed {
                if !s.pending[m].is_some_and(|(l, _)| l >= lsn) {
                    s.pending[m] = Some((lsn, t));
                    let lag = now.duration_since(t);
                    match m {
                        WRITE => s.row.write_lag = Some(lag),
                        FLUSH => s.row.flush_lag = Some(lag),
                        _ => s.row.replay_lag = Some(lag),
                    }
                }
            }
        }
        // Sends every mode passed are of no more use.
        let min = reported.iter().min().copied().unwrap_or(Lsn::INVALID);
        while s.sends.len() > 1 && s.sends.front().is_some_and(|(l, _)| *l <= min) {
            s.sends.pop_front();
        }
        self.recompute(&mut inner);
    }

    fn recompute(&self, inner: &mut Inner) {
        let names = self.names.read().unwrap().clone();
        let reports: Vec<StandbyReport> = inner
            .standbys
            .iter()
            .map(|s| StandbyReport {
                application_name: &s.row.application_name,
                state: s.row.state,
                write: s.row.write,
                flush: s.row.flush,
                apply: s.row.apply,
            })
            .collect();
        let mut quorum = std::mem::take(&mut inner.quorum);
        let synced = quorum.compute(names.as_deref(), &reports);
        drop(reports);
        for (s, sync) in inner.standbys.iter_mut().zip(quorum.standbys()) {
            let StandbySync {
                sync_priority,
                sync_state,
            } = *sync;
            s.row.sync_priority = sync_priority;
            s.row.sync_state = sync_state;
        }
        inner.quorum = quorum;
        match synced {
            Synced::Upto(l) => {
                inner.lost_since = None;
                let now = [l.write.0, l.flush.0, l.apply.0];
                let mut moved = false;
                for (m, v) in now.iter().enumerate() {
                    if self.synced[m].fetch_max(*v, SeqCst) < *v {
                        moved = true;
                    }
                }
                if moved {
                    let cur = [
                        self.synced[WRITE].load(SeqCst),
                        self.synced[FLUSH].load(SeqCst),
                        self.synced[APPLY].load(SeqCst),
                    ];
                    for l in self.listeners.read().unwrap().iter() {
                        l.notify(&cur);
                    }
                }
            }
            Synced::Short { .. } => {
                if inner.lost_since.is_none() {
                    inner.lost_since = Some(SystemTime::now());
                }
            }
            Synced::NotConfigured => inner.lost_since = None,
        }
    }

    /// Every connected standby (pg_stat_replication), lags grown by the
    /// time the oldest unreported send has waited (lag never freezes).
    pub fn rows(&self) -> Vec<StandbyRow> {
        let inner = self.inner.lock().unwrap();
        inner
            .standbys
            .iter()
            .map(|s| {
                let mut row = s.row.clone();
                let positions = [row.write, row.flush, row.apply];
                for (m, at) in positions.iter().enumerate() {
                    // The oldest send this mode has not passed yet.
                    if let Some((_, t)) = s.sends.iter().find(|(l, _)| *l > *at) {
                        let waited = t.elapsed();
                        let lag = match m {
                            WRITE => &mut row.write_lag,
                            FLUSH => &mut row.flush_lag,
                            _ => &mut row.replay_lag,
                        };
                        if !lag.is_some_and(|l| l >= waited) {
                            *lag = Some(waited);
                        }
                    }
                }
                row
            })
            .collect()
    }

    /// Since when fewer standbys than the policy needs are streaming
    /// (None: met, or nothing configured).
    pub fn quorum_lost_since(&self) -> Option<SystemTime> {
        self.inner.lock().unwrap().lost_since
    }

    /// Which connected standbys hold each range of the quorum-acknowledged
    /// WAL (below [`SyncRep::synced`] flush): `(from, to, standbys)`,
    /// ascending, each standby holding everything below its reported flush
    /// LSN (durable there, monotone). What a failover needs to know and
    /// PostgreSQL cannot say.
    pub fn holders_by_range(&self) -> Vec<(Lsn, Lsn, Vec<String>)> {
        let upto = self.synced(FLUSH);
        let inner = self.inner.lock().unwrap();
        let mut cuts: Vec<Lsn> = inner
            .standbys
            .iter()
            .map(|s| s.row.flush.min(upto))
            .filter(|l| l.is_valid())
            .collect();
        cuts.push(upto);
        cuts.sort();
        cuts.dedup();
        let mut out = Vec::new();
        let mut from = Lsn(0);
        for to in cuts {
            if to <= from {
                continue;
            }
            let mut names: Vec<String> = inner
                .standbys
                .iter()
                .filter(|s| s.row.flush >= to)
                .map(|s| s.row.application_name.clone())
                .collect();
            names.sort();
            out.push((from, to, names));
            from = to;
        }
        out
    }

    /// The standbys whose reported flush LSN is at least `lsn`: who holds a
    /// commit ending there (PostgreSQL cannot say).
    pub fn holders(&self, lsn: Lsn) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        inner
            .standbys
            .iter()
            .filter(|s| s.row.flush >= lsn && s.row.flush.is_valid())
            .map(|s| s.row.application_name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &str) -> Option<StandbyNames> {
        StandbyNames::parse(s).unwrap()
    }

    #[test]
    fn any_one_releases_at_the_best_standby_and_never_goes_back() {
        let wake = Arc::new(EventFd::new().unwrap());
        let rep = SyncRep::new(names("ANY 1 (s1, s2)"));
        let l = Arc::new(SyncListener::new(Arc::clone(&wake)));
        rep.add_listener(Arc::clone(&l));
        let a = rep.register("s1", "a".into());
        let b = rep.register("s2", "b".into());
        rep.sent(a, Lsn(100), SenderState::Streaming);
        rep.sent(b, Lsn(100), SenderState::Streaming);
        assert!(rep.quorum_lost_since().is_some());
        l.want(FLUSH, Lsn(80));
        rep.report(a, Lsn(100), Lsn(80), Lsn(40));
        assert_eq!(rep.synced(FLUSH), Lsn(80));
        assert_eq!(rep.synced(APPLY), Lsn(40));
        assert!(wake.wait(Duration::ZERO), "the wish was met: signalled");
        assert!(rep.quorum_lost_since().is_none());
        rep.report(b, Lsn(60), Lsn(60), Lsn(60));
        assert_eq!(rep.synced(FLUSH), Lsn(80));
        assert_eq!(
            rep.holders_by_range(),
            vec![
                (Lsn(0), Lsn(60), vec!["s1".to_string(), "s2".to_string()]),
                (Lsn(60), Lsn(80), vec!["s1".to_string()]),
            ]
        );
        assert_eq!(rep.synced(APPLY), Lsn(60));
        rep.unregister(a);
        // s2 alone is behind s1's release: it stays.
        assert_eq!(rep.synced(FLUSH), Lsn(80));
        assert_eq!(rep.holders(Lsn(60)), vec!["s2".to_string()]);
        rep.unregister(b);
        assert!(rep.quorum_lost_since().is_some());
    }

    #[test]
    fn depose_wakes_every_shard_once_and_keeps_the_highest_term() {
        let wake = Arc::new(EventFd::new().unwrap());
        let rep = SyncRep::new(names("ANY 1 (*)"));
        rep.add_listener(Arc::new(SyncListener::new(Arc::clone(&wake))));
        assert_eq!(rep.deposed_by(), None);
        assert!(rep.depose(2));
        assert!(wake.wait(Duration::ZERO), "the shards are woken");
        assert!(!rep.depose(3), "already deposed");
        assert!(!rep.depose(2));
        assert_eq!(rep.deposed_by(), Some(3));
    }

    #[test]
    fn a_standby_in_catchup_does_not_count() {
        let rep = SyncRep::new(names("ANY 1 (*)"));
        let a = rep.register("s1", "a".into());
        rep.sent(a, Lsn(100), SenderState::Catchup);
        rep.report(a, Lsn(100), Lsn(100), Lsn(100));
        assert_eq!(rep.synced(FLUSH), Lsn(0));
        rep.sent(a, Lsn(100), SenderState::Streaming);
        assert_eq!(rep.synced(FLUSH), Lsn(100));
        let rows = rep.rows();
        assert_eq!(rows[0].sync_state, SyncState::Quorum);
        assert!(rows[0].flush_lag.is_some());
    }

    #[test]
    fn first_one_waits_for_the_first_name() {
        let rep = SyncRep::new(names("FIRST 1 (s1, s2)"));
        let a = rep.register("s1", "a".into());
        let b = rep.register("s2", "b".into());
        rep.sent(a, Lsn(100), SenderState::Streaming);
        rep.sent(b, Lsn(100), SenderState::Streaming);
        rep.report(a, Lsn(50), Lsn(50), Lsn(50));
        rep.report(b, Lsn(100), Lsn(100), Lsn(100));
        assert_eq!(rep.synced(FLUSH), Lsn(50), "s1 is sync, s2 only potential");
        rep.unregister(a);
        assert_eq!(rep.synced(FLUSH), Lsn(100), "s1 gone: s2 is sync");
    }
}
