//! The page store's io_uring: page writes and reads from registered bounce
//! pages, and fsyncs of data files, many in flight at once. The checkpointer
//! and the background writer each build one on their own thread and push a
//! batch of writes (or one fsync per file) before waiting: that is where
//! io_uring beats a loop of pwrite (measured for the WAL: 8 writes + 1 sync,
//! ~441 µs against ~955 µs).
//!
//! Ownership: the queue owns the bounce memory, registered as fixed buffer
//! 0; a slot is marked busy from the moment an operation on it is queued
//! until its completion is reaped, and `Drop` waits for every operation (or,
//! if it cannot, leaks the memory). So the kernel never touches memory that
//! was freed or handed back for reuse.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use io_uring::{opcode, types, IoUring};

use super::aligned::AlignedBuf;
use super::PAGE_SIZE;

/// A finished operation: the caller's `user_data` and the kernel's result
/// (bytes transferred, 0 for an fsync, or a negative errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageCompletion {
    pub user_data: u64,
    pub result: i32,
}

pub struct PageQueue {
    // Field order: the ring is dropped (after Drop::drop drained it) before
    // the memory it registered.
    ring: IoUring,
    bounce: AlignedBuf,
    busy: Vec<bool>,
    /// For each in-flight user_data that holds a slot, the slot.
    slot_of: Vec<(u64, usize)>,
    in_flight: usize,
}

impl PageQueue {
    /// A queue with `slots` bounce pages. Built on the calling thread, which
    /// alone may use it (SINGLE_ISSUER where the kernel has it).
    pub fn new(slots: usize) -> io::Result<PageQueue> {
        let slots = slots.max(1);
        let entries = (slots as u32 * 2).next_power_of_two().max(8);
        let ring = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
        {
            Ok(r) => r,
            Err(_) => IoUring::new(entries)?,
        };
        let bounce = AlignedBuf::zeroed(slots * PAGE_SIZE);
        let iov = [libc::iovec {
            iov_base: bounce.as_ptr() as *mut libc::c_void,
            iov_len: bounce.len(),
        }];
        // SAFETY: the memory is owned by the returned queue and outlives the
        // ring, which is dropped first (field order) after draining (Drop).
        unsafe { ring.submitter().register_buffers(&iov)? };
        Ok(PageQueue {
            ring,
            bounce,
            busy: vec![false; slots],
            slot_of: Vec::new(),
            in_flight: 0,
        })
    }

    pub fn slots(&self) -> usize {
        self.busy.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A slot with no operation in flight, if any.
    pub fn free_slot(&self) -> Option<usize> {
        self.busy.iter().position(|b| !b)
    }

    /// The page in slot `i`, to fill before a write or read after a read.
    /// Panics if an operation on it is in flight.
    pub fn page_mut(&mut self, i: usize) -> &mut [u8] {
        assert!(!self.busy[i], "bounce page {i} is in flight");
        &mut self.bounce[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    pub fn page(&self, i: usize) -> &[u8] {
        assert!(!self.busy[i], "bounce page {i} is in flight");
        &self.bounce[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        // SAFETY: every buffer an entry points at is a bounce page owned by
        // self and marked busy until its completion is reaped; Drop waits for
        // all in-flight entries before the memory is freed.
        unsafe {
            self.ring
                .submission()
                .push(&entry)
                .map_err(|_| io::Error::other("submission queue full"))?
        };
        self.in_flight += 1;
        Ok(())
    }

    fn slot_ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.busy.len());
        // SAFETY (pointer arithmetic): i is in bounds (asserted).
        unsafe { self.bounce.as_mut_ptr().add(i * PAGE_SIZE) }
    }

    /// Queues a write of bounce page `i` (all [`PAGE_SIZE`] bytes) to `fd`
    /// at `offset`.
    pub fn write_page(
        &mut self,
        fd: RawFd,
        i: usize,
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        assert!(!self.busy[i], "bounce page {i} is in flight");
        let e = opcode::WriteFixed::new(types::Fd(fd), self.slot_ptr(i), PAGE_SIZE as u32, 0)
            .offset(offset)
            .build()
            .user_data(user_data);
        self.busy[i] = true;
        self.slot_of.push((user_data, i));
        self.push(e)
    }

    /// Queues a read of one page at `offset` of `fd` into bounce page `i`.
    pub fn read_page(
        &mut self,
        fd: RawFd,
        i: usize,
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        assert!(!self.busy[i], "bounce page {i} is in flight");
        let e = opcode::ReadFixed::new(types::Fd(fd), self.slot_ptr(i), PAGE_SIZE as u32, 0)
            .offset(offset)
            .build()
            .user_data(user_data);
        self.busy[i] = true;
        self.slot_of.push((user_data, i));
        self.push(e)
    }

    /// Queues fsync(2) of `fd` (data and metadata: data files grow).
    pub fn fsync(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let e = opcode::Fsync::new(types::Fd(fd))
            .build()
            .user_data(user_data);
        self.push(e)
    }

    /// Submits what is queued and waits for at least `want` completions (or
    /// `timeout`).
    pub fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        let want = want.min(self.in_flight);
        let res = match timeout {
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            None => self.ring.submitter().submit_and_wait(want),
        };
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Moves finished operations into `out`, freeing their bounce pages.
    pub fn reap(&mut self, out: &mut Vec<PageCompletion>) {
        for cqe in self.ring.completion() {
            self.in_flight -= 1;
            let user_data = cqe.user_data();
            if let Some(pos) = self.slot_of.iter().position(|(u, _)| *u == user_data) {
                let (_, slot) = self.slot_of.swap_remove(pos);
                self.busy[slot] = false;
            }
            out.push(PageCompletion {
                user_data,
                result: cqe.result(),
            });
        }
    }

    /// Submits and waits until nothing is in flight; returns every completion.
    pub fn drain(&mut self, out: &mut Vec<PageCompletion>) -> io::Result<()> {
        while self.in_flight > 0 {
            self.submit_and_wait(1, None)?;
            self.reap(out);
        }
        Ok(())
    }
}

/// Bytes of bounce pages leaked by queues whose teardown could not wait for
/// the kernel (see `Drop for PageQueue`), since the process started.
static LEAKED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes of bounce pages leaked so far because a queue's teardown could not
/// wait for its operations in flight (0 unless an io_uring failed).
pub fn leaked_bytes() -> u64 {
    LEAKED_BYTES.load(Relaxed)
}

impl Drop for PageQueue {
    fn drop(&mut self) {
        // IMPORTANT: the kernel may still use bounce pages of operations in
        // flight; wait for them before the memory goes.
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // A signal ended the wait, not the operations: wait again.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // IMPORTANT: whether the kernel is done with the pages
                    // is unknown. Freed, they would go back to the allocator
                    // while a read may still land in them (in memory handed
                    // out again) or a write still send them to a data file.
                    // Leaked, they stay the kernel's for as long as it wants.
                    let len = self.bounce.len();
                    LEAKED_BYTES.fetch_add(len as u64, Relaxed);
                    tracing::error!(
                        "could not wait for {} page I/O(s) in flight while closing an io_uring: {e}; \
                         leaking their {len} bytes of bounce pages rather than freeing memory the kernel may still use",
                        self.in_flight
                    );
                    std::mem::forget(std::mem::replace(
                        &mut self.bounce,
                        AlignedBuf::zeroed(PAGE_SIZE),
                    ));
                    return;
                }
            }
            self.reap(&mut sink);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::file::{OpenMode, SegmentFile};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A pipe: (read end, write end). A page read from the empty read end
    /// stays in flight until the test writes a page into the other.
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array it is given.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both were just opened and are owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn write_page_into(fd: &OwnedFd) {
        let page = vec![7u8; PAGE_SIZE];
        // SAFETY: writes from a live buffer of the length given.
        let n = unsafe { libc::write(fd.as_raw_fd(), page.as_ptr().cast(), page.len()) };
        assert_eq!(n, PAGE_SIZE as isize);
    }

    /// A signal during teardown ends the kernel wait with EINTR; the queue
    /// must wait again, not free bounce pages a read is still to fill.
    #[test]
    fn teardown_waits_through_a_signal_for_operations_in_flight() {
        crate::io::test_signal::interrupt_with(libc::SIGUSR1);
        let (r, w) = pipe();
        let (tx, rx) = std::sync::mpsc::channel();
        let dropper = std::thread::spawn(move || {
            let mut q = PageQueue::new(4).unwrap();
            q.read_page(r.as_raw_fd(), 0, u64::MAX, 1).unwrap();
            q.submit_and_wait(0, None).unwrap();
            tx.send(crate::io::test_signal::this_thread()).unwrap();
            drop(q);
            drop(r);
        });
        let thread = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: the thread is alive (it has not finished its drop, as
        // the read it waits for cannot complete before the write below).
        assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR1) }, 0);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !dropper.is_finished(),
            "the queue was dropped while a read into its bounce page was in flight"
        );
        write_page_into(&w);
        dropper.join().unwrap();
    }

    /// When the kernel wait fails for good, the bounce pages are leaked:
    /// the operations in flight may still use them.
    #[test]
    fn teardown_that_cannot_wait_leaks_the_bounce_pages() {
        let (r, _w) = pipe();
        let mut q = PageQueue::new(4).unwrap();
        q.read_page(r.as_raw_fd(), 0, u64::MAX, 1).unwrap();
        q.submit_and_wait(0, None).unwrap();
        // The ring's descriptor now names /dev/null: every wait fails
        // (EOPNOTSUPP), as on a ring that broke, while the read is still in
        // flight in the ring (kept alive by its mappings).
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: dup2 only replaces which file the ring's descriptor
        // number names; the number stays open, and is closed once, by the
        // ring's drop.
        assert!(unsafe { libc::dup2(null.as_raw_fd(), q.ring.as_raw_fd()) } >= 0);
        let len = q.bounce.len();
        let before = leaked_bytes();
        drop(q);
        assert!(
            leaked_bytes() >= before + len as u64,
            "the bounce pages were freed with a read in flight"
        );
    }

    #[test]
    fn writes_reads_and_syncs_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rel");
        let f = SegmentFile::open(
            &path,
            OpenMode {
                write: true,
                create_new: true,
                direct: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut q = PageQueue::new(4).unwrap();
        for i in 0..4 {
            q.page_mut(i).fill(i as u8 + 1);
            q.write_page(f.raw_fd(), i, (i * PAGE_SIZE) as u64, i as u64)
                .unwrap();
        }
        assert_eq!(q.free_slot(), None);
        let mut done = Vec::new();
        q.drain(&mut done).unwrap();
        assert_eq!(done.len(), 4);
        assert!(done.iter().all(|c| c.result == PAGE_SIZE as i32));
        q.fsync(f.raw_fd(), 99).unwrap();
        done.clear();
        q.drain(&mut done).unwrap();
        assert_eq!(
            done,
            vec![PageCompletion {
                user_data: 99,
                result: 0
            }]
        );
        q.read_page(f.raw_fd(), 0, 2 * PAGE_SIZE as u64, 7).unwrap();
        done.clear();
        q.drain(&mut done).unwrap();
        assert_eq!(done[0].result, PAGE_SIZE as i32);
        assert!(q.page(0).iter().all(|&b| b == 3));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4 * PAGE_SIZE as u64
        );
    }
}
