//! The flusher's queue on a simulated disk: the second implementation of
//! [`WalIo`], so that the seeded torture and fault tests drive the real
//! io_uring flusher pipeline, not only the synchronous pwrite flusher.
//!
//! The model, kept as close to io_uring as a test needs:
//! - Operations are queued, then submitted; a submitted operation runs at
//!   some later [`WalIo::reap`] or [`WalIo::submit_and_wait`], chosen by the
//!   seed: operations that do not depend on each other run and complete in
//!   any order, and any number of them may still be in flight when the
//!   power is cut (then they never reached the disk).
//! - A write reads its memory (ring range or bounce block) when it runs, as
//!   the kernel does, and goes to the simulated disk as one
//!   `write_all_at`: pending until a sync (a power cut may drop it or tear
//!   it at a sector), durable at once on an O_DSYNC/O_SYNC file.
//! - A sync is the simulated file's sync: it makes the file's earlier
//!   writes durable, or fails with the disk's injected EIO (and then those
//!   writes are lost for good).
//! - `link` chains: the next operation runs only after this one succeeded;
//!   after a failure the rest of the chain completes with `-ECANCELED`.
//! - Waiting with nothing in flight blocks on the eventfd, as the real
//!   queue does, so commit requests and shutdown wake the flusher.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::aligned::{AlignedBuf, SharedBuf};
use super::file::SegmentFile;
use super::sim::{SimDisk, SimFile};
use super::uring::{Completion, EventFd, WalIo};
use super::BLOCK;
use crate::testkit::Rng;

const MAX_CHAIN: usize = 128;

enum What {
    Ring { offset: usize, len: usize },
    Bounce { index: usize },
    Sync,
}

struct Op {
    file: SimFile,
    what: What,
    file_offset: u64,
    user_data: u64,
}

/// A simulated io_uring for the WAL flusher; see the module documentation.
pub struct SimQueue {
    shared: Arc<SharedBuf>,
    bounce: AlignedBuf,
    bounce_busy: Vec<Option<u64>>,
    wake: Arc<EventFd>,
    rng: Rng,
    /// Queued, not yet submitted, as chains of linked operations.
    queued: Vec<VecDeque<Op>>,
    /// The last queued operation asked for `link`: the next joins its chain.
    linking: bool,
    /// Submitted chains; only the front of each may run.
    in_flight: Vec<VecDeque<Op>>,
    done: Vec<Completion>,
}

impl SimQueue {
    /// A queue writing `shared` (the WAL ring) to files of `disk`, with
    /// `bounce_blocks` bounce blocks; its choices come from the disk's
    /// [`SimDisk::set_io_seed`].
    pub fn new(
        disk: &SimDisk,
        shared: Arc<SharedBuf>,
        bounce_blocks: usize,
        wake: Arc<EventFd>,
    ) -> SimQueue {
        let bounce = AlignedBuf::zeroed(bounce_blocks.max(1) * BLOCK);
        SimQueue {
            shared,
            bounce_busy: vec![None; bounce.len() / BLOCK],
            bounce,
            wake,
            rng: Rng(disk.next_io_seed()),
            queued: Vec::new(),
            linking: false,
            in_flight: Vec::new(),
            done: Vec::new(),
        }
    }

    fn push(&mut self, op: Op, link: bool) {
        match self.queued.last_mut() {
            Some(chain) if self.linking => chain.push_back(op),
            _ => self.queued.push(VecDeque::from([op])),
        }
        self.linking = link;
    }

    fn sim_file(file: &SegmentFile) -> io::Result<SimFile> {
        file.simulated().cloned().ok_or_else(|| {
            io::Error::other(format!(
                "{} is not on a simulated disk",
                file.path().display()
            ))
        })
    }

    /// Runs one operation against the simulated disk; its result as the
    /// kernel would report it.
    fn run(&self, op: &Op) -> i32 {
        let res = match op.what {
            What::Ring { offset, len } => {
                // SAFETY: the flusher leaves a queued write's ring range
                // untouched until its completion is reaped (the contract of
                // WalIo, which the kernel relies on too).
                let data = unsafe { self.shared.slice(offset, len) };
                op.file
                    .write_all_at(data, op.file_offset)
                    .map(|()| len as i32)
            }
            What::Bounce { index } => op
                .file
                .write_all_at(
                    &self.bounce[index * BLOCK..(index + 1) * BLOCK],
                    op.file_offset,
                )
                .map(|()| BLOCK as i32),
            What::Sync => op.file.sync().map(|()| 0),
        };
        res.unwrap_or_else(|e| -e.raw_os_error().unwrap_or(libc::EIO))
    }

    fn complete(&mut self, user_data: u64, result: i32) {
        if let Some(slot) = self.bounce_busy.iter_mut().find(|b| **b == Some(user_data)) {
            *slot = None;
        }
        self.done.push(Completion { user_data, result });
    }

    /// Lets the "kernel" work: each chain's front runs with even odds, in a
    /// random order, and at least `min` operations run if any are in flight.
    fn progress(&mut self, min: usize) {
        let mut ran = 0;
        loop {
            if self.in_flight.is_empty() {
                return;
            }
            let mut any = false;
            let mut i = 0;
            while i < self.in_flight.len() {
                // A random chain, so that completions come out of order.
                let pick = i + self.rng.below((self.in_flight.len() - i) as u64) as usize;
                self.in_flight.swap(i, pick);
                if self.rng.below(2) == 0 || ran < min {
                    let op = self.in_flight[i]
                        .pop_front()
                        .expect("chains are never empty");
                    let result = self.run(&op);
                    self.complete(op.user_data, result);
                    if result < 0 {
                        // IO_LINK: the rest of a broken chain is cancelled.
                        for rest in std::mem::take(&mut self.in_flight[i]) {
                            self.complete(rest.user_data, -libc::ECANCELED);
                        }
                    }
                    ran += 1;
                    any = true;
                }
                if self.in_flight[i].is_empty() {
                    self.in_flight.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            if ran >= min || !any && self.in_flight.is_empty() {
                return;
            }
        }
    }
}

impl WalIo for SimQueue {
    fn max_chain(&self) -> usize {
        MAX_CHAIN
    }

    fn begin_chain(&mut self, n: usize) -> io::Result<()> {
        assert!(n <= MAX_CHAIN, "chain of {n} entries is too long");
        Ok(())
    }

    fn bounce_blocks(&self) -> usize {
        self.bounce_busy.len()
    }

    fn bounce_free(&self, i: usize) -> bool {
        self.bounce_busy[i].is_none()
    }

    fn bounce_mut(&mut self, i: usize) -> &mut [u8] {
        assert!(
            self.bounce_busy[i].is_none(),
            "bounce block {i} is in flight"
        );
        &mut self.bounce[i * BLOCK..(i + 1) * BLOCK]
    }

    fn write_ring(
        &mut self,
        file: &SegmentFile,
        ring_offset: usize,
        len: usize,
        file_offset: u64,
        user_data: u64,
        link: bool,
    ) -> io::Result<()> {
        assert!(ring_offset + len <= self.shared.len());
        let op = Op {
            file: Self::sim_file(file)?,
            what: What::Ring {
                offset: ring_offset,
                len,
            },
            file_offset,
            user_data,
        };
        self.push(op, link);
        Ok(())
    }

    fn write_bounce(
        &mut self,
        file: &SegmentFile,
        i: usize,
        file_offset: u64,
        user_data: u64,
        link: bool,
    ) -> io::Result<()> {
        assert!(
            self.bounce_busy[i].is_none(),
            "bounce block {i} is in flight"
        );
        let op = Op {
            file: Self::sim_file(file)?,
            what: What::Bounce { index: i },
            file_offset,
            user_data,
        };
        self.bounce_busy[i] = Some(user_data);
        self.push(op, link);
        Ok(())
    }

    fn sync(
        &mut self,
        file: &SegmentFile,
        _datasync: bool,
        user_data: u64,
        link: bool,
    ) -> io::Result<()> {
        let op = Op {
            file: Self::sim_file(file)?,
            what: What::Sync,
            file_offset: 0,
            user_data,
        };
        self.push(op, link);
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        self.in_flight.append(&mut self.queued);
        self.linking = false;
        Ok(())
    }

    fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        self.submit()?;
        if self.in_flight.is_empty() && self.done.is_empty() {
            self.wake.wait(timeout.unwrap_or(Duration::from_secs(1)));
        } else {
            self.progress(want.saturating_sub(self.done.len()));
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> bool {
        self.progress(0);
        out.append(&mut self.done);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::file::OpenMode;
    use crate::io::sim::{self, Faults};

    struct Setup {
        disk: Arc<SimDisk>,
        file: SegmentFile,
        q: SimQueue,
    }

    fn setup(seed: u64) -> Setup {
        let disk = Arc::new(SimDisk::new());
        sim::install(Arc::clone(&disk));
        disk.set_io_seed(seed);
        let path = disk.root().join("seg");
        let file = SegmentFile::open(
            &path,
            OpenMode {
                write: true,
                create_new: true,
                direct: true,
                ..Default::default()
            },
        )
        .unwrap();
        crate::io::file::sync_dir(disk.root()).unwrap();
        let ring = Arc::new(SharedBuf::zeroed(16 * BLOCK));
        for i in 0..16 {
            // SAFETY: nothing else uses this ring.
            unsafe { ring.write(i * BLOCK, &[i as u8 + 1; BLOCK]) };
        }
        let q = SimQueue::new(&disk, ring, 2, Arc::new(EventFd::new().unwrap()));
        Setup { disk, file, q }
    }

    fn drain(q: &mut SimQueue, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        while out.len() < n {
            q.submit_and_wait(1, Some(Duration::from_millis(1)))
                .unwrap();
            q.reap(&mut out);
        }
        out
    }

    #[test]
    fn independent_writes_complete_out_of_order_and_land() {
        let mut reordered = false;
        for seed in 0..16 {
            let mut s = setup(seed);
            for i in 0..8u64 {
                s.q.write_ring(
                    &s.file,
                    i as usize * BLOCK,
                    BLOCK,
                    i * BLOCK as u64,
                    i,
                    false,
                )
                .unwrap();
            }
            let got = drain(&mut s.q, 8);
            let order: Vec<u64> = got.iter().map(|c| c.user_data).collect();
            assert!(got.iter().all(|c| c.result == BLOCK as i32), "{got:?}");
            reordered |= order.windows(2).any(|w| w[0] > w[1]);
            let bytes = s.disk.read_all(&s.disk.root().join("seg")).unwrap();
            for i in 0..8 {
                assert_eq!(bytes[i * BLOCK], i as u8 + 1);
            }
            sim::uninstall(s.disk.root());
        }
        assert!(reordered, "some seed completes writes out of order");
    }

    #[test]
    fn a_failed_write_cancels_its_linked_sync_and_a_failed_sync_reports_eio() {
        let mut s = setup(7);
        s.disk.set_faults(Faults {
            fail_write_at: Some(1),
            ..Faults::default()
        });
        s.q.write_ring(&s.file, 0, BLOCK, 0, 1, true).unwrap();
        s.q.sync(&s.file, true, 2, false).unwrap();
        let mut got = drain(&mut s.q, 2);
        got.sort_by_key(|c| c.user_data);
        assert_eq!(got[0].result, -libc::EIO);
        assert_eq!(got[1].result, -libc::ECANCELED);

        let (_, syncs) = s.disk.counts();
        s.disk.set_faults(Faults {
            fail_sync_at: Some(syncs + 1),
            ..Faults::default()
        });
        s.q.write_bounce(&s.file, 0, 0, 3, true).unwrap();
        assert!(!s.q.bounce_free(0));
        s.q.sync(&s.file, true, 4, false).unwrap();
        let mut got = drain(&mut s.q, 2);
        got.sort_by_key(|c| c.user_data);
        assert_eq!(got[0].result, BLOCK as i32);
        assert_eq!(got[1].result, -libc::EIO);
        assert!(
            s.q.bounce_free(0),
            "the bounce block is free once its write completed"
        );
        // The failed sync lost the write for good: no power cut brings it back.
        for seed in 0..16 {
            let img = s.disk.power_cut(seed).0;
            let b = img.read_all(&s.disk.root().join("seg")).unwrap();
            assert!(b.iter().all(|&x| x == 0), "seed {seed}");
        }
        sim::uninstall(s.disk.root());
    }

    #[test]
    fn a_write_not_yet_run_is_not_on_the_disk() {
        let mut s = setup(3);
        s.q.write_ring(&s.file, 0, BLOCK, 0, 1, false).unwrap();
        s.q.submit().unwrap();
        // Submitted but never reaped or waited for: the "kernel" has not run it.
        assert!(s
            .disk
            .read_all(&s.disk.root().join("seg"))
            .unwrap()
            .is_empty());
        drain(&mut s.q, 1);
        assert_eq!(s.disk.read_all(&s.disk.root().join("seg")).unwrap()[0], 1);
        sim::uninstall(s.disk.root());
    }
}
