//! The bottom floor: every syscall, every io_uring operation and the aligned
//! memory they use. Nothing above this module calls libc.
//!
//! The engine reaches the disk through these small surfaces, so that the
//! simulated, fault-injecting disk of [`sim`] slides underneath them in tests
//! (on a simulated disk the page store's io_uring is not used: it takes its
//! synchronous path):
//! - [`file::SegmentFile`]: positional reads and writes, data sync, preallocation;
//! - [`file`]'s directory helpers: list, create, rename, remove, fsync the directory;
//! - [`uring::WalIo`]: the flusher's asynchronous writes and syncs, on
//!   io_uring ([`uring::WalQueue`]) or on a simulated disk
//!   ([`sim_queue::SimQueue`], which completes them out of order);
//! - [`page_queue::PageQueue`]: the page store's batched page writes and file syncs.
//!
//! What this module is not: it knows nothing of LSNs, records or segments.

pub mod aligned;
pub mod file;
pub mod lockfile;
pub mod net;
pub mod page_queue;
pub mod poll;
pub mod probe;
pub mod process;
pub mod sim;
pub mod sim_queue;
#[cfg(test)]
pub(crate) mod test_signal;
pub mod uring;

/// The unit of page-store I/O: one 8 KiB page (two blocks), as PostgreSQL's BLCKSZ.
pub const PAGE_SIZE: usize = 8192;

/// The unit of O_DIRECT I/O and of WAL writes: one 4 KiB block. Writes
/// smaller than the device's 4 KiB physical sector cost a read-modify-write
/// (measured here: 2 KiB O_SYNC writes take ~10 ms), so walden never issues one.
pub const BLOCK: usize = 4096;

/// A thread that was busy this recently polls before it blocks (see
/// [`poll_until`]); one idle longer blocks at once and costs no CPU.
pub const RECENTLY_BUSY: std::time::Duration = std::time::Duration::from_millis(1);

/// Polls `ready` for up to `limit` before the caller blocks, as Seastar's
/// reactor does (`idle_poll_time`). Measured here, on a virtual machine:
/// waking a thread whose CPU has halted costs tens of microseconds, more
/// than the work it is woken for; a thread that polls sees its event at
/// once, and its CPU does not halt. Yields the CPU on every turn, so a
/// runnable thread on the same CPU is not kept waiting. True if `ready` held.
pub fn poll_until(limit: std::time::Duration, mut ready: impl FnMut() -> bool) -> bool {
    if limit.is_zero() {
        return false;
    }
    let start = std::time::Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= limit {
            return ready();
        }
        std::thread::yield_now();
    }
}
