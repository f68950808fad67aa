//! Group commit: the published write and flush LSNs, the waiters that block
//! until the flush LSN passes their record, and how they wake the flusher.
//!
//! Invariant: `write_lsn >= flush_lsn`, and `flush_lsn` only advances after
//! the kernel reported the bytes below it durable (a completed O_DSYNC write
//! or a completed sync that was issued after the writes completed).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crossbeam::utils::CachePadded;

use crate::io::uring::EventFd;
use crate::lsn::Lsn;
use crate::metrics::{self, AtomicHistogram};

pub struct GroupCommit {
    write_lsn: CachePadded<AtomicU64>,
    flush_lsn: CachePadded<AtomicU64>,
    /// The highest LSN somebody is waiting to see flushed.
    request_lsn: CachePadded<AtomicU64>,
    /// Threads blocked in a wait (for `commit_siblings`, and to skip the
    /// notify when nobody waits).
    waiting: AtomicU32,
    /// Threads waiting for a flush LSN, earliest first: the flusher wakes
    /// exactly those a flush satisfied (no herd of 64 threads fighting for a
    /// mutex on 2 cores).
    flush_waiters: Mutex<BinaryHeap<Reverse<FlushWaiter>>>,
    next_waiter: AtomicU64,
    /// Other conditions (ring space, shutdown) wait here; rare.
    lock: Mutex<()>,
    cond: Condvar,
    /// Set by the flusher before it blocks; a requester that clears it
    /// signals the eventfd, so the flusher is woken once, not per waiter.
    flusher_sleeping: AtomicBool,
    wake: Arc<EventFd>,
    shutdown: AtomicBool,
    /// Threads that wait in their own event loop (server shards): woken by
    /// eventfd when the flush LSN reaches what they asked for.
    listeners: std::sync::RwLock<Vec<Arc<FlushListener>>>,
}

/// A thread that sleeps in its own io_uring and wants to know when the flush
/// LSN reaches `wants` (0: nothing). The flusher clears `wants` and signals.
pub struct FlushListener {
    wants: AtomicU64,
    wake: Arc<EventFd>,
}

impl FlushListener {
    pub fn new(wake: Arc<EventFd>) -> FlushListener {
        FlushListener {
            wants: AtomicU64::new(0),
            wake,
        }
    }

    /// Asks to be signalled once the flush LSN is at least `lsn`. The caller
    /// must check the flush LSN itself after this (the signal only covers
    /// flushes published after the store), with a SeqCst load or after a
    /// SeqCst fence: an Acquire load may be ordered before this store.
    pub fn want(&self, lsn: Lsn) {
        self.wants.store(lsn.0, SeqCst);
    }

    fn notify(&self, flushed: u64) {
        let w = self.wants.load(SeqCst);
        if w != 0 && flushed >= w && self.wants.compare_exchange(w, 0, SeqCst, SeqCst).is_ok() {
            self.wake.signal();
        }
    }
}

impl GroupCommit {
    pub fn new(start: Lsn, wake: Arc<EventFd>) -> GroupCommit {
        GroupCommit {
            write_lsn: CachePadded::new(AtomicU64::new(start.0)),
            flush_lsn: CachePadded::new(AtomicU64::new(start.0)),
            request_lsn: CachePadded::new(AtomicU64::new(start.0)),
            waiting: AtomicU32::new(0),
            flush_waiters: Mutex::new(BinaryHeap::new()),
            next_waiter: AtomicU64::new(0),
            lock: Mutex::new(()),
            cond: Condvar::new(),
            flusher_sleeping: AtomicBool::new(false),
            wake,
            shutdown: AtomicBool::new(false),
            listeners: std::sync::RwLock::new(Vec::new()),
        }
    }

    pub fn write_lsn(&self) -> Lsn {
        Lsn(self.write_lsn.load(Acquire))
    }

    pub fn flush_lsn(&self) -> Lsn {
        Lsn(self.flush_lsn.load(Acquire))
    }

    pub fn request_lsn(&self) -> Lsn {
        Lsn(self.request_lsn.load(SeqCst))
    }

    pub fn waiting(&self) -> u32 {
        self.waiting.load(Relaxed)
    }

    pub fn wake_fd(&self) -> &Arc<EventFd> {
        &self.wake
    }

    /// Asks the flusher to flush at least up to `lsn`, waking it if it sleeps.
    pub fn request(&self, lsn: Lsn) {
        self.request_lsn.fetch_max(lsn.0, SeqCst);
        self.kick();
    }

    /// Wakes the flusher if it is blocked.
    pub fn kick(&self) {
        if self.flusher_sleeping.load(SeqCst) && self.flusher_sleeping.swap(false, SeqCst) {
            self.wake.signal();
        }
    }

    /// The flusher, before blocking: after this, check for work once more.
    pub fn flusher_will_sleep(&self) {
        self.flusher_sleeping.store(true, SeqCst);
    }

    pub fn flusher_awake(&self) {
        self.flusher_sleeping.store(false, SeqCst);
    }

    /// Publishes a write LSN ahead of the flush LSN (writes completed, their
    /// sync not yet): nobody waits for it here; standbys report it.
    pub fn publish_written(&self, written: Lsn) {
        self.write_lsn.fetch_max(written.0, Release);
    }

    /// Publishes new positions and wakes the waiters they satisfy.
    pub fn publish(&self, written: Lsn, flushed: Lsn) {
        debug_assert!(written >= flushed);
        self.write_lsn.fetch_max(written.0, Release);
        let old = self.flush_lsn.fetch_max(flushed.0, SeqCst);
        debug_assert!(flushed.0 >= old, "flush LSN went backwards");
        if flushed.0 > old {
            for l in self.listeners.read().unwrap().iter() {
                l.notify(flushed.0);
            }
        }
        if flushed.0 > old && self.waiting.load(SeqCst) > 0 {
            self.wake_flush_waiters(flushed.0);
            self.notify();
        }
    }

    /// Unparks every flush waiter at or below `flushed` (all on shutdown).
    fn wake_flush_waiters(&self, flushed: u64) {
        let mut ready: Vec<Thread> = Vec::new();
        {
            let mut heap = self.flush_waiters.lock().unwrap();
            while heap.peek().is_some_and(|w| w.0.lsn <= flushed) {
                ready.push(heap.pop().unwrap().0.thread);
            }
        }
        for t in ready {
            t.unpark();
        }
    }

    /// Wakes every waiter (they recheck their condition).
    pub fn notify(&self) {
        drop(self.lock.lock().unwrap());
        self.cond.notify_all();
    }

    /// Blocks until `flush_lsn >= lsn`. Returns false if the WAL shut down first.
    pub fn wait_flushed(&self, lsn: Lsn) -> bool {
        if self.flush_lsn.load(Acquire) >= lsn.0 {
            return true;
        }
        self.request(lsn);
        self.waiting.fetch_add(1, SeqCst);
        {
            let mut heap = self.flush_waiters.lock().unwrap();
            // Checked under the lock: the flusher stores the flush LSN before
            // it takes the lock to pop waiters, so either we see it here or
            // it sees us in the heap.
            if self.flush_lsn.load(SeqCst) < lsn.0 && !self.shutdown.load(SeqCst) {
                heap.push(Reverse(FlushWaiter {
                    lsn: lsn.0,
                    id: self.next_waiter.fetch_add(1, Relaxed),
                    thread: std::thread::current(),
                }));
            }
        }
        let ok = loop {
            if self.flush_lsn.load(SeqCst) >= lsn.0 {
                break true;
            }
            if self.shutdown.load(SeqCst) {
                break self.flush_lsn.load(SeqCst) >= lsn.0;
            }
            std::thread::park();
        };
        self.waiting.fetch_sub(1, SeqCst);
        ok
    }

    /// Blocks until `done()` holds, the WAL shuts down, or `timeout` passes.
    /// `done` must become true only through a [`GroupCommit::publish`] or a
    /// [`GroupCommit::notify`].
    pub fn wait_until(&self, done: impl Fn() -> bool, timeout: Option<Duration>) -> bool {
        self.waiting.fetch_add(1, SeqCst);
        let mut guard = self.lock.lock().unwrap();
        let ok = loop {
            if done() {
                break true;
            }
            if self.shutdown.load(SeqCst) {
                break done();
            }
            match timeout {
                None => guard = self.cond.wait(guard).unwrap(),
                Some(t) => {
                    let (g, res) = self.cond.wait_timeout(guard, t).unwrap();
                    guard = g;
                    if res.timed_out() {
                        break done();
                    }
                }
            }
        };
        drop(guard);
        self.waiting.fetch_sub(1, SeqCst);
        ok
    }

    pub fn add_listener(&self, l: Arc<FlushListener>) {
        self.listeners.write().unwrap().push(l);
    }

    /// Forgets `l` (a walsender or walreceiver that ends).
    pub fn remove_listener(&self, l: &Arc<FlushListener>) {
        self.listeners
            .write()
            .unwrap()
            .retain(|x| !Arc::ptr_eq(x, l));
    }

    pub fn shut_down(&self) {
        self.shutdown.store(true, SeqCst);
        self.wake_flush_waiters(u64::MAX);
        self.notify();
        self.wake.signal();
    }

    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(SeqCst)
    }
}

struct FlushWaiter {
    lsn: u64,
    id: u64,
    thread: Thread,
}

impl PartialEq for FlushWaiter {
    fn eq(&self, other: &Self) -> bool {
        (self.lsn, self.id) == (other.lsn, other.id)
    }
}
impl Eq for FlushWaiter {}
impl PartialOrd for FlushWaiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for FlushWaiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.lsn, self.id).cmp(&(other.lsn, other.id))
    }
}

/// Counters of the WAL, read by the bench, `status` and /metrics. All
/// relaxed atomics: recording never takes a lock.
pub struct WalStats {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    /// Write batches made durable (one sync, or one set of O_DSYNC writes).
    pub flushes: AtomicU64,
    /// fsync/fdatasync calls, plus O_DSYNC write batches.
    pub syncs: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Sum of flush latencies (first write submitted to durable), in ns.
    pub flush_ns: AtomicU64,
    pub segments_created: AtomicU64,
    pub segments_created_by_flusher: AtomicU64,
    pub segments_recycled: AtomicU64,
    pub segments_removed: AtomicU64,
    /// Flush latencies (first write submitted to durable), in ns.
    pub flush_duration: AtomicHistogram,
    /// LSN bytes per flush batch.
    pub flush_bytes: AtomicHistogram,
    /// Records per flush batch, approximate: the records inserted (over all
    /// slots) between the flusher's readings for this batch and the previous
    /// one, read when a pipelined batch is submitted, or when a synchronous
    /// one (depth 1, pwrite flusher) is durable. A record may so be counted
    /// one batch early or late; the sum over batches is exact.
    pub group_size: AtomicHistogram,
    /// Records inserted at the flusher's last reading (flusher only).
    group_records_mark: AtomicU64,
}

impl Default for WalStats {
    fn default() -> Self {
        WalStats {
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            flush_ns: AtomicU64::new(0),
            segments_created: AtomicU64::new(0),
            segments_created_by_flusher: AtomicU64::new(0),
            segments_recycled: AtomicU64::new(0),
            segments_removed: AtomicU64::new(0),
            flush_duration: AtomicHistogram::new(metrics::FLUSH_DURATION_BOUNDS_NS),
            flush_bytes: AtomicHistogram::new(metrics::FLUSH_BYTES_BOUNDS),
            group_size: AtomicHistogram::new(metrics::GROUP_SIZE_BOUNDS),
            group_records_mark: AtomicU64::new(0),
        }
    }
}

impl WalStats {
    /// The flusher, when it starts a batch of `lsn_bytes` of WAL;
    /// `records_inserted` is the total inserted since open, read now.
    pub fn flush_started(&self, lsn_bytes: u64, records_inserted: u64) {
        self.flush_bytes.observe(lsn_bytes);
        let before = self.group_records_mark.swap(records_inserted, Relaxed);
        self.group_size
            .observe(records_inserted.saturating_sub(before));
    }

    /// The flusher, when a batch it started at `started` is durable.
    pub fn flush_done(&self, started: Instant) {
        let ns = started.elapsed().as_nanos() as u64;
        self.flushes.fetch_add(1, Relaxed);
        self.flush_ns.fetch_add(ns, Relaxed);
        self.flush_duration.observe(ns);
    }
}
