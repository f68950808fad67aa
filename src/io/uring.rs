//! The flusher's io_uring: registered buffers (the WAL ring and a few bounce
//! blocks), fixed-buffer writes, linked fsync/fdatasync, an eventfd that wakes
//! the flusher, and waits with a timeout.
//!
//! Ownership: the queue holds the registered memory (an `Arc` of the ring and
//! its own bounce blocks) and, when dropped, first waits for every operation
//! it submitted. So the kernel can never write from freed memory, whatever the
//! caller does.

use std::io;
use std::mem::ManuallyDrop;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::aligned::{AlignedBuf, SharedBuf};
use super::file::SegmentFile;
use super::BLOCK;

const WAKE_USER_DATA: u64 = u64::MAX;
const RING_BUF_INDEX: u16 = 0;
const BOUNCE_BUF_INDEX: u16 = 1;

/// One finished operation: the caller's `user_data` and the kernel's result
/// (bytes written, 0 for a sync, or a negative errno).
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
}

/// An eventfd other threads use to wake a thread waiting in its io_uring.
pub struct EventFd {
    fd: RawFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes plain integers and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventFd { fd })
    }

    /// Adds one to the counter, waking a pending read. Never blocks.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to our own descriptor.
        // EAGAIN (counter saturated) already means "a wake-up is pending".
        unsafe { libc::write(self.fd, &one as *const u64 as *const libc::c_void, 8) };
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it once.
        unsafe { libc::close(self.fd) };
    }
}

/// The flusher's queue of asynchronous writes and syncs: the seam between
/// the WAL flusher and the kernel. [`WalQueue`] is io_uring;
/// [`super::sim_queue::SimQueue`] runs the same operations on a simulated
/// disk, completing them out of order and failing them as the disk's faults
/// say, so that the seeded torture tests drive the real flusher pipeline.
///
/// The contract both keep, and the flusher relies on:
/// - an operation's memory (ring range, bounce block) is read when the
///   operation runs, at any time until its completion is reaped: the caller
///   must leave it untouched until then;
/// - `link` makes the next queued operation run only after this one
///   succeeded; if this one fails, the next completes with `-ECANCELED`;
/// - every completion carries the `user_data` it was queued with: callers
///   make each one unique, so a completion can never be taken for another's
///   (a bounce block is freed by the completion of the write that used it).
pub trait WalIo {
    /// Entries one linked chain may hold.
    fn max_chain(&self) -> usize;
    /// Makes room for a chain of `n` entries (see [`WalQueue::begin_chain`]).
    fn begin_chain(&mut self, n: usize) -> io::Result<()>;
    fn bounce_blocks(&self) -> usize;
    fn bounce_free(&self, i: usize) -> bool;
    fn bounce_mut(&mut self, i: usize) -> &mut [u8];
    /// Queues a write of `len` bytes of the shared ring at `ring_offset`.
    fn write_ring(
        &mut self,
        file: &SegmentFile,
        ring_offset: usize,
        len: usize,
        file_offset: u64,
        user_data: u64,
        link: bool,
    ) -> io::Result<()>;
    /// Queues a write of bounce block `i` (all [`BLOCK`] bytes).
    fn write_bounce(
        &mut self,
        file: &SegmentFile,
        i: usize,
        file_offset: u64,
        user_data: u64,
        link: bool,
    ) -> io::Result<()>;
    /// Queues fdatasync (`datasync`) or fsync of `file`.
    fn sync(
        &mut self,
        file: &SegmentFile,
        datasync: bool,
        user_data: u64,
        link: bool,
    ) -> io::Result<()>;
    /// Submits what is queued without waiting.
    fn submit(&mut self) -> io::Result<()>;
    /// Submits what is queued and waits for `want` completions, a wake-up
    /// of the eventfd, or `timeout`.
    fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()>;
    /// Moves finished operations into `out`; true if the eventfd was signalled.
    fn reap(&mut self, out: &mut Vec<Completion>) -> bool;
}

/// The flusher's submission/completion queue.
pub struct WalQueue {
    // Field order matters: the ring is dropped (after Drop::drop drained it)
    // before the memory it had registered.
    ring: IoUring,
    shared: Arc<SharedBuf>,
    /// Dropped by hand in Drop, and only once the kernel is done with it.
    bounce: ManuallyDrop<AlignedBuf>,
    bounce_busy: Vec<Option<u64>>,
    wake: Arc<EventFd>,
    /// The pending eventfd read's target; leaked like `bounce` if the
    /// kernel may still write it.
    wake_buf: ManuallyDrop<Box<[u8; 8]>>,
    wake_armed: bool,
    in_flight: usize,
    single_issuer: bool,
    /// Syncs that the test-only hook [`super::file::inject_sync_eio_at`]
    /// chose to fail: queued as no-ops, completed with EIO.
    injected_eio: Vec<u64>,
}

impl WalQueue {
    /// Builds the queue on the calling thread (with SINGLE_ISSUER and
    /// DEFER_TASKRUN where the kernel has them, only this thread may use it)
    /// and registers `shared` and `bounce_blocks` blocks of bounce memory.
    pub fn new(
        entries: u32,
        shared: Arc<SharedBuf>,
        bounce_blocks: usize,
        wake: Arc<EventFd>,
    ) -> io::Result<WalQueue> {
        let (ring, single_issuer) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
        {
            Ok(r) => (r, true),
            Err(_) => (IoUring::new(entries)?, false),
        };
        let bounce = AlignedBuf::zeroed(bounce_blocks.max(1) * BLOCK);
        let iovecs = [
            libc::iovec {
                iov_base: shared.as_ptr() as *mut libc::c_void,
                iov_len: shared.len(),
            },
            libc::iovec {
                iov_base: bounce.as_ptr() as *mut libc::c_void,
                iov_len: bounce.len(),
            },
        ];
        // SAFETY: both buffers are owned by the returned queue (the Arc and
        // the AlignedBuf) and outlive the ring, which is dropped first.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        Ok(WalQueue {
            ring,
            shared,
            bounce_busy: vec![None; bounce.len() / BLOCK],
            bounce: ManuallyDrop::new(bounce),
            wake,
            wake_buf: ManuallyDrop::new(Box::new([0; 8])),
            wake_armed: false,
            in_flight: 0,
            single_issuer,
            injected_eio: Vec::new(),
        })
    }

    /// Whether the kernel accepted SINGLE_ISSUER | DEFER_TASKRUN.
    pub fn is_single_issuer(&self) -> bool {
        self.single_issuer
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn bounce_blocks(&self) -> usize {
        self.bounce_busy.len()
    }

    /// Whether bounce block `i` is free to fill.
    pub fn bounce_free(&self, i: usize) -> bool {
        self.bounce_busy[i].is_none()
    }

    /// Mutable access to bounce block `i`. Panics if a write from it is in flight.
    pub fn bounce_mut(&mut self, i: usize) -> &mut [u8] {
        assert!(
            self.bounce_busy[i].is_none(),
            "bounce block {i} is in flight"
        );
        &mut self.bounce[i * BLOCK..(i + 1) * BLOCK]
    }

    /// Entries one chain may hold: a linked chain must be queued whole
    /// within one submission, or the kernel ends it at the boundary.
    pub fn max_chain(&self) -> usize {
        (self.ring.params().sq_entries() as usize / 2).max(2)
    }

    /// Makes room for `n` more entries: call before queueing a chain of `n`
    /// (at most [`WalQueue::max_chain`]), so it is never split across
    /// two submissions.
    pub fn begin_chain(&mut self, n: usize) -> io::Result<()> {
        assert!(n <= self.max_chain(), "chain of {n} entries is too long");
        let free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if free < n + 1 {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        if self.ring.submission().is_full() {
            // Only reached outside a chain (begin_chain made room for chains).
            self.ring.submit()?;
        }
        // SAFETY: every buffer an entry points at is registered memory owned
        // by self (bounds checked by the callers below) or self.wake_buf, and
        // self waits for all in-flight entries before that memory is freed.
        unsafe {
            self.ring
                .submission()
                .push(&entry)
                .map_err(|_| io::Error::other("submission queue full"))?
        };
        self.in_flight += 1;
        Ok(())
    }

    /// Queues a write of `len` bytes of the shared ring at `ring_offset` to
    /// `fd` at `file_offset`. `link` makes the next queued entry wait for it.
    pub fn write_ring(
        &mut self,
        fd: RawFd,
        ring_offset: usize,
        len: usize,
        file_offset: u64,
        user_data: u64,
        link: bool,
    ) -> io::Result<()> {
        assert!(ring_offset + len <= self.shared.len() && len <= u32::MAX as usize);
        assert!(user_data != WAKE_USER_DATA);
        // SAFETY (pointer arithmetic): in bounds, asserted above.
        let ptr = unsafe { self.shared.as_ptr().add(ring_offset) };
        let mut e = opcode::WriteFixed::new(types::Fd(fd), ptr, len as u32, RING_BUF_INDEX)
            .offset(file_offset)
            .build()
            .user_data(user_data);
        if link {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        self.push(e)
    }

    /// Queues a write of bounce block `i` (all [`BLOCK`] bytes).
    pub fn write_bounce(
        &mut self,
        fd: RawFd,
        i: usize,
        file_offset: u64,
        user_data: u64,
        link: bool,
    ) -> io::Result<()> {
        assert!(
            self.bounce_busy[i].is_none(),
            "bounce block {i} is in flight"
        );
        assert!(user_data != WAKE_USER_DATA);
        // SAFETY (pointer arithmetic): i < bounce_busy.len() (indexed above).
        let ptr = unsafe { self.bounce.as_ptr().add(i * BLOCK) };
        let mut e = opcode::WriteFixed::new(types::Fd(fd), ptr, BLOCK as u32, BOUNCE_BUF_INDEX)
            .offset(file_offset)
            .build()
            .user_data(user_data);
        if link {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        self.bounce_busy[i] = Some(user_data);
        self.push(e)
    }

    /// Queues fdatasync (or fsync) of `fd`. When the previous entry was
    /// queued with `link`, it runs only after that entry succeeded, and fails
    /// with ECANCELED otherwise; `link` chains the next entry to this one.
    pub fn sync(
        &mut self,
        fd: RawFd,
        datasync: bool,
        user_data: u64,
        link: bool,
    ) -> io::Result<()> {
        assert!(user_data != WAKE_USER_DATA);
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let mut e = if super::file::injected_sync_error().is_some() {
            // Test-only (tests/fsync_eio.rs): this sync "fails" without
            // syncing, in its place in the chain; reap reports EIO.
            self.injected_eio.push(user_data);
            opcode::Nop::new().build().user_data(user_data)
        } else {
            opcode::Fsync::new(types::Fd(fd))
                .flags(flags)
                .build()
                .user_data(user_data)
        };
        if link {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        self.push(e)
    }

    /// Keeps a read of the eventfd pending, so that [`EventFd::signal`] ends a wait.
    fn arm_wake(&mut self) -> io::Result<()> {
        if self.wake_armed {
            return Ok(());
        }
        let e = opcode::Read::new(types::Fd(self.wake.raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_USER_DATA);
        self.push(e)?;
        self.wake_armed = true;
        Ok(())
    }

    /// Submits what is queued and waits until at least `want` operations
    /// completed, the eventfd was signalled, or `timeout` passed.
    pub fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        self.arm_wake()?;
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

    /// Submits what is queued without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves finished operations into `out`; eventfd wake-ups are consumed
    /// here and reported only as the return value.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> bool {
        let mut woken = false;
        for cqe in self.ring.completion() {
            self.in_flight -= 1;
            let user_data = cqe.user_data();
            if user_data == WAKE_USER_DATA {
                self.wake_armed = false;
                woken = true;
                continue;
            }
            if let Some(slot) = self.bounce_busy.iter_mut().find(|b| **b == Some(user_data)) {
                *slot = None;
            }
            let mut result = cqe.result();
            if !self.injected_eio.is_empty() {
                if let Some(i) = self.injected_eio.iter().position(|&u| u == user_data) {
                    self.injected_eio.swap_remove(i);
                    if result == 0 {
                        result = -libc::EIO;
                    }
                }
            }
            out.push(Completion { user_data, result });
        }
        woken
    }
}

impl Drop for WalQueue {
    fn drop(&mut self) {
        // IMPORTANT: the kernel may still read registered memory for writes in
        // flight, and write the eventfd read's buffer; wait for them (the
        // pending eventfd read is woken first). A wait interrupted by a
        // signal is retried; if waiting fails otherwise, the memory is
        // leaked rather than freed under the kernel's feet.
        if self.wake_armed {
            self.wake.signal();
        }
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!(
                        "could not wait for {} WAL operation(s) in flight at teardown: {e}; \
                         their buffers are leaked",
                        self.in_flight
                    );
                    // The ring memory is an Arc: keep one count for ever.
                    std::mem::forget(Arc::clone(&self.shared));
                    return;
                }
            }
            self.reap(&mut sink);
        }
        // SAFETY: nothing is in flight: the kernel no longer uses either
        // buffer, and both are dropped exactly once, here.
        unsafe {
            ManuallyDrop::drop(&mut self.bounce);
            ManuallyDrop::drop(&mut self.wake_buf);
        }
    }
}

impl WalIo for WalQueue {
    fn max_chain(&self) -> usize {
        WalQueue::max_chain(self)
    }

    fn begin_chain(&mut self, n: usize) -> io::Result<()> {
        WalQueue::begin_chain(self, n)
    }

    fn bounce_blocks(&self) -> usize {
        WalQueue::bounce_blocks(self)
    }

    fn bounce_free(&self, i: usize) -> bool {
        WalQueue::bounce_free(self, i)
    }

    fn bounce_mut(&mut self, i: usize) -> &mut [u8] {
        WalQueue::bounce_mut(self, i)
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
        WalQueue::write_ring(
            self,
            file.raw_fd(),
            ring_offset,
            len,
            file_offset,
            user_data,
            link,
        )
    }

    fn write_bounce(
        &mut self,
        file: &SegmentFile,
        i: usize,
        file_offset: u64,
        user_data: u64,
        link: bool,
    ) -> io::Result<()> {
        WalQueue::write_bounce(self, file.raw_fd(), i, file_offset, user_data, link)
    }

    fn sync(
        &mut self,
        file: &SegmentFile,
        datasync: bool,
        user_data: u64,
        link: bool,
    ) -> io::Result<()> {
        WalQueue::sync(self, file.raw_fd(), datasync, user_data, link)
    }

    fn submit(&mut self) -> io::Result<()> {
        WalQueue::submit(self)
    }

    fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        WalQueue::submit_and_wait(self, want, timeout)
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> bool {
        WalQueue::reap(self, out)
    }
}

impl EventFd {
    /// Blocks until signalled or `timeout` passes; consumes the signal.
    /// For threads that do not wait in an io_uring (the pwrite flusher).
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms.max(if timeout.is_zero() { 0 } else { 1 })) };
        if n <= 0 {
            return false;
        }
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live local; non-blocking descriptor.
        unsafe { libc::read(self.fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A pipe whose buffer is full: a write to it waits in the kernel until
    /// the reader drains it.
    fn full_pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array it is given.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both were just opened and are owned by nothing else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let chunk = [0u8; 4096];
        // SAFETY: fcntl on our own descriptor with integer flags; write
        // from a live buffer of the length given.
        unsafe {
            let fl = libc::fcntl(w.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(w.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            while libc::write(w.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) > 0 {}
            // Blocking again: io_uring answers EAGAIN at once on O_NONBLOCK.
            libc::fcntl(w.as_raw_fd(), libc::F_SETFL, fl);
        }
        (r, w)
    }

    fn drain(r: &OwnedFd) {
        let mut buf = vec![0u8; 1 << 20];
        // SAFETY: reads into a live buffer of the length given.
        unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }

    /// A signal during teardown ends the kernel wait with EINTR; the queue
    /// must wait again, not drop the ring memory a write still reads.
    #[test]
    fn teardown_waits_through_a_signal_for_a_write_in_flight() {
        crate::io::test_signal::interrupt_with(libc::SIGUSR1);
        let (r, w) = full_pipe();
        let (tx, rx) = std::sync::mpsc::channel();
        let dropper = std::thread::spawn(move || {
            let wake = Arc::new(EventFd::new().unwrap());
            let ring = Arc::new(SharedBuf::zeroed(BLOCK));
            let mut q = WalQueue::new(8, ring, 1, wake).unwrap();
            q.write_ring(w.as_raw_fd(), 0, BLOCK, 0, 1, false).unwrap();
            q.submit().unwrap();
            tx.send(crate::io::test_signal::this_thread()).unwrap();
            drop(q);
            drop(w);
        });
        let thread = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..5 {
            // SAFETY: the thread is alive: its drop cannot end before the
            // pipe is drained below.
            assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR1) }, 0);
            std::thread::sleep(Duration::from_millis(40));
        }
        assert!(
            !dropper.is_finished(),
            "the queue was dropped while a write from its ring was in flight"
        );
        drain(&r);
        dropper.join().unwrap();
    }

    /// When the kernel wait fails for good, the ring memory is leaked (its
    /// Arc keeps a count for ever): a write in flight may still read it.
    #[test]
    fn teardown_that_cannot_wait_leaks_the_ring() {
        let (r, w) = full_pipe();
        let ring = Arc::new(SharedBuf::zeroed(BLOCK));
        let mut q =
            WalQueue::new(8, Arc::clone(&ring), 1, Arc::new(EventFd::new().unwrap())).unwrap();
        q.write_ring(w.as_raw_fd(), 0, BLOCK, 0, 1, false).unwrap();
        q.submit().unwrap();
        // The ring's descriptor now names /dev/null: every wait fails, as
        // on a ring that broke, while the write is still in flight.
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: dup2 only replaces which file the ring's descriptor number
        // names; the number stays open and is closed once, by the ring's drop.
        assert!(unsafe { libc::dup2(null.as_raw_fd(), q.ring.as_raw_fd()) } >= 0);
        drop(q);
        assert_eq!(
            Arc::strong_count(&ring),
            2,
            "the ring memory was released with a write in flight"
        );
        drain(&r);
    }
}
