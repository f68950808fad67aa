//! The lock-free insert path: insert slots, reservation by one atomic
//! fetch_add, the copy into the ring, and the safe point the flusher may
//! write up to.
//!
//! The protocol (PostgreSQL's `insertingAt`, without the locks):
//! 1. announce: `slot.inserting_at = insert_pos` (a lower bound of what we reserve);
//! 2. reserve:  `start = insert_pos.fetch_add(len)` — the records' LSNs;
//! 3. wait for ring space if `start + len` would overwrite bytes not yet flushed,
//!    announcing the exact `start` first so that the flusher can free space;
//! 4. copy header + payload + zero padding into the ring;
//! 5. `slot.inserting_at = DONE`.
//!
//! The flusher computes `safe = min(insert_pos snapshot, every inserting_at)`.
//! All these operations are SeqCst, and the announcement is stored before the
//! fetch_add while the flusher loads the insert position before the slots: so a
//! reservation whose announcement the flusher did not see was made after its
//! snapshot (start >= snapshot), and one it did see is bounded by the announced
//! value (start >= announced >= safe). Every byte below `safe` is therefore
//! completely copied. No mutex, channel or allocation on this path.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};

use crossbeam::utils::CachePadded;

use super::buffer::WalBuffer;
use crate::io::BLOCK;
use crate::lsn::Lsn;
use crate::record::{self, Kind, HEADER_LEN};

const DONE: u64 = u64::MAX;

/// One insert slot. A slot is used by one thread at a time (`owned`), so that
/// two threads never share an announcement.
pub struct InsertSlot {
    inserting_at: AtomicU64,
    owned: AtomicBool,
    /// Records inserted through this slot; written only by its owner, so the
    /// count costs no shared cache line on the insert path.
    records: AtomicU64,
}

pub struct InsertState {
    pub buffer: WalBuffer,
    insert_pos: CachePadded<AtomicU64>,
    /// Ring memory holding LSNs below `reclaim` may be overwritten: the
    /// flusher has made them durable and no longer reads them.
    reclaim: CachePadded<AtomicU64>,
    slots: Box<[CachePadded<InsertSlot>]>,
    /// Largest reservation: half the ring, so that a waiting reserver can
    /// always get space once everything before it is flushed.
    max_reservation: u64,
    pub ring_full_waits: AtomicU64,
}

thread_local! {
    static SLOT_HINT: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_HINT: AtomicUsize = AtomicUsize::new(0);

impl InsertState {
    /// Starts inserting at `start`. `tail` holds the bytes of the block
    /// containing `start` that precede it (already durable on disk): the
    /// flusher rewrites that block and must rewrite those bytes identically.
    pub fn new(buffer: WalBuffer, start: Lsn, tail: &[u8], slots: usize) -> InsertState {
        let block_start = start.align_down(BLOCK as u64);
        assert_eq!(tail.len() as u64, start.0 - block_start.0);
        // SAFETY: no other thread can see this state yet.
        unsafe { buffer.put(block_start, tail) };
        let max_reservation = buffer.size() / 2;
        InsertState {
            buffer,
            insert_pos: CachePadded::new(AtomicU64::new(start.0)),
            reclaim: CachePadded::new(AtomicU64::new(block_start.0)),
            slots: (0..slots.max(1))
                .map(|_| {
                    CachePadded::new(InsertSlot {
                        inserting_at: AtomicU64::new(DONE),
                        owned: AtomicBool::new(false),
                        records: AtomicU64::new(0),
                    })
                })
                .collect(),
            max_reservation,
            ring_full_waits: AtomicU64::new(0),
        }
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn max_reservation(&self) -> u64 {
        self.max_reservation
    }

    /// The next LSN to be reserved.
    pub fn insert_lsn(&self) -> Lsn {
        Lsn(self.insert_pos.load(SeqCst))
    }

    /// The LSN below which every byte has been completely copied.
    pub fn safe_point(&self) -> Lsn {
        // Order matters: the insert position first, then the slots.
        let mut safe = self.insert_pos.load(SeqCst);
        for slot in self.slots.iter() {
            safe = safe.min(slot.inserting_at.load(SeqCst));
        }
        Lsn(safe)
    }

    /// Records inserted since open, over all slots.
    pub fn records(&self) -> u64 {
        self.slots.iter().map(|s| s.records.load(Relaxed)).sum()
    }

    /// True while some slot is between announcement and DONE.
    pub fn any_inserting(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.inserting_at.load(SeqCst) != DONE)
    }

    pub fn reclaim_lsn(&self) -> Lsn {
        Lsn(self.reclaim.load(SeqCst))
    }

    /// Called by the flusher once `flushed` is durable and nothing in flight
    /// reads ring memory below it.
    pub fn set_flushed(&self, flushed: Lsn) {
        let r = flushed.align_down(BLOCK as u64).0;
        debug_assert!(r >= self.reclaim.load(Relaxed), "reclaim went backwards");
        // SeqCst: a ring-space waiter increments the waiter count and then
        // reads this; the flusher stores this and then reads the count.
        self.reclaim.store(r, SeqCst);
    }

    /// Takes a free slot, preferring the one this thread used last.
    pub fn acquire_slot(&self) -> SlotGuard<'_> {
        let n = self.slots.len();
        let hint = SLOT_HINT.with(|h| {
            if h.get() == usize::MAX {
                h.set(NEXT_HINT.fetch_add(1, Relaxed));
            }
            h.get()
        });
        let mut spins = 0u32;
        loop {
            for i in 0..n {
                let idx = (hint + i) % n;
                let slot = &self.slots[idx];
                if !slot.owned.load(Relaxed)
                    && slot
                        .owned
                        .compare_exchange(false, true, Acquire, Relaxed)
                        .is_ok()
                {
                    SLOT_HINT.with(|h| h.set(idx));
                    return SlotGuard { slot };
                }
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Reserves space for `records` with one fetch_add and copies them in.
    /// Pushes each record's start LSN to `lsns` and returns the reservation's
    /// (start, end). The total stream length must not exceed
    /// [`InsertState::max_reservation`] (the caller splits larger batches).
    ///
    /// `wait_space(start, needed)` is called, repeatedly, while the ring has
    /// no room: it must get the flusher going and wait until
    /// `reclaim_lsn() >= needed` (or a moment has passed).
    pub fn insert(
        &self,
        slot: &SlotGuard<'_>,
        records: &[(Kind, &[u8])],
        lsns: &mut Vec<Lsn>,
        wait_space: impl FnMut(Lsn, Lsn),
    ) -> (Lsn, Lsn) {
        let (start, end, _) = self.insert_checked(slot, records, lsns, wait_space, |_| true);
        (start, end)
    }

    /// [`InsertState::insert`], with a last word: once the records' start
    /// LSN is known (reserved) and before anything is copied, `check(start)`
    /// decides whether they are still wanted. If not, the reservation is
    /// filled with NOOP records of the same lengths (zero payloads), so the
    /// stream stays dense, and the third value returned is false. The page
    /// store uses this to redo a full-page-image decision that a concurrent
    /// checkpoint's redo point made stale (PostgreSQL rechecks `RedoRecPtr`
    /// under its insertion lock for the same reason).
    pub fn insert_checked(
        &self,
        slot: &SlotGuard<'_>,
        records: &[(Kind, &[u8])],
        lsns: &mut Vec<Lsn>,
        mut wait_space: impl FnMut(Lsn, Lsn),
        check: impl FnOnce(Lsn) -> bool,
    ) -> (Lsn, Lsn, bool) {
        let total: u64 = records
            .iter()
            .map(|(_, p)| record::stream_len(p.len()))
            .sum();
        assert!(
            total <= self.max_reservation,
            "reservation larger than half the ring"
        );
        let slot = slot.slot;
        let start = self.reserve(slot, total, &mut wait_space);
        let end = start + total;

        let keep = check(Lsn(start));
        let mut at = start;
        let mut hdr = [0u8; HEADER_LEN];
        for (kind, payload) in records {
            let len = record::stream_len(payload.len());
            let pad = len as usize - HEADER_LEN - payload.len();
            // SAFETY: [start, end) is ours alone (fetch_add hands out disjoint
            // ranges) and its ring memory is reclaimed (end - size <= reclaim),
            // so neither the flusher nor the kernel reads it; the flusher will
            // not read it before we store DONE (it stays above the safe point).
            unsafe {
                if keep {
                    record::encode_header(&mut hdr, Lsn(at), *kind, 0, 0, payload);
                    self.buffer.put(Lsn(at), &hdr);
                    self.buffer.put(Lsn(at + HEADER_LEN as u64), payload);
                } else {
                    record::encode_noop_header(&mut hdr, Lsn(at), payload.len());
                    self.buffer.put(Lsn(at), &hdr);
                    self.buffer.zero(Lsn(at + HEADER_LEN as u64), payload.len());
                }
                self.buffer
                    .zero(Lsn(at + (HEADER_LEN + payload.len()) as u64), pad);
            }
            if keep {
                lsns.push(Lsn(at));
            }
            at += len;
        }
        debug_assert_eq!(at, end);
        slot.inserting_at.store(DONE, SeqCst);
        slot.records
            .store(slot.records.load(Relaxed) + records.len() as u64, Relaxed);
        (Lsn(start), Lsn(end), keep)
    }
}

impl InsertState {
    /// Steps 1–3 of the protocol: announce, reserve `total` bytes, wait for
    /// their ring space. Returns the start; the slot stays announced (the
    /// caller copies, then stores DONE).
    fn reserve(&self, slot: &InsertSlot, total: u64, wait_space: &mut impl FnMut(Lsn, Lsn)) -> u64 {
        let size = self.buffer.size();
        slot.inserting_at
            .store(self.insert_pos.load(Relaxed), SeqCst);
        let start = self.insert_pos.fetch_add(total, SeqCst);
        let end = start + total;

        if end > self.reclaim.load(Acquire) + size {
            // Announce the exact start, so the flusher can write (and free)
            // everything before us; then wait.
            slot.inserting_at.store(start, SeqCst);
            self.ring_full_waits.fetch_add(1, Relaxed);
            while end > self.reclaim.load(Acquire) + size {
                wait_space(Lsn(start), Lsn(end - size));
            }
        }
        start
    }

    /// Copies raw WAL bytes (a standby's stream from its primary, already
    /// checked by the caller) into the ring at the next LSN, with the same
    /// announce/reserve/DONE protocol as [`InsertState::insert`], so the
    /// flusher cannot tell them from appended records. Returns (start,
    /// end). `bytes` must not exceed [`InsertState::max_reservation`] (the
    /// caller splits), and need not end on a record boundary: the safe
    /// point, and so a flush, may then stop inside a record.
    ///
    /// The caller is the only one reserving (a standby has one writer), so
    /// `start` is the insert position it saw before the call.
    pub fn insert_raw(
        &self,
        slot: &SlotGuard<'_>,
        bytes: &[u8],
        mut wait_space: impl FnMut(Lsn, Lsn),
    ) -> (Lsn, Lsn) {
        let total = bytes.len() as u64;
        assert!(
            total <= self.max_reservation,
            "reservation larger than half the ring"
        );
        let slot = slot.slot;
        let start = self.reserve(slot, total, &mut wait_space);
        // SAFETY: as in `insert_checked`: [start, start + total) is ours
        // alone and its ring memory is reclaimed; the flusher does not read
        // it before DONE.
        unsafe { self.buffer.put(Lsn(start), bytes) };
        slot.inserting_at.store(DONE, SeqCst);
        (Lsn(start), Lsn(start + total))
    }
}

/// Exclusive use of one insert slot; released on drop.
pub struct SlotGuard<'a> {
    slot: &'a InsertSlot,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        debug_assert_eq!(self.slot.inserting_at.load(Relaxed), DONE);
        self.slot.owned.store(false, Release);
    }
}
