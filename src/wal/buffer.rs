//! The WAL ring (`wal_buffers`): aligned memory registered with io_uring in
//! which LSN `l` lives at offset `l % size`. `wal::insert` decides who may
//! touch which bytes; this file only maps LSNs to memory and copies across
//! the wrap.

use std::sync::Arc;

use crate::io::aligned::SharedBuf;
use crate::lsn::Lsn;

pub struct WalBuffer {
    mem: Arc<SharedBuf>,
    size: u64,
}

impl WalBuffer {
    /// `size` is a power of two and a multiple of the I/O block (checked by
    /// the configuration).
    pub fn new(size: u64) -> WalBuffer {
        assert!(size.is_power_of_two() && size as usize >= crate::io::BLOCK);
        WalBuffer {
            mem: Arc::new(SharedBuf::zeroed(size as usize)),
            size,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memory, to register with the flusher's io_uring.
    pub fn memory(&self) -> Arc<SharedBuf> {
        Arc::clone(&self.mem)
    }

    pub fn offset(&self, lsn: Lsn) -> usize {
        (lsn.0 & (self.size - 1)) as usize
    }

    /// Copies `src` into the ring at `lsn`, wrapping at the end.
    ///
    /// # Safety
    /// The caller owns `lsn..lsn + src.len()`: it reserved that range and the
    /// ring space it maps to has been reclaimed (nobody reads it any more).
    pub unsafe fn put(&self, lsn: Lsn, src: &[u8]) {
        let off = self.offset(lsn);
        let first = src.len().min(self.size as usize - off);
        // SAFETY: exclusivity of the range is the caller's promise; bounds
        // are checked by SharedBuf.
        unsafe {
            self.mem.write(off, &src[..first]);
            if first < src.len() {
                self.mem.write(0, &src[first..]);
            }
        }
    }

    /// Zeros `len` bytes at `lsn`, wrapping at the end.
    ///
    /// # Safety
    /// As for [`WalBuffer::put`].
    pub unsafe fn zero(&self, lsn: Lsn, len: usize) {
        let off = self.offset(lsn);
        let first = len.min(self.size as usize - off);
        // SAFETY: as in `put`.
        unsafe {
            self.mem.zero(off, first);
            if first < len {
                self.mem.zero(0, len - first);
            }
        }
    }

    /// Copies the bytes at `lsn..lsn + dst.len()` out of the ring.
    ///
    /// # Safety
    /// Every byte of the range was completely inserted (it is below the safe
    /// point) and has not been reclaimed, so no thread writes it meanwhile.
    pub unsafe fn get(&self, lsn: Lsn, dst: &mut [u8]) {
        let off = self.offset(lsn);
        let first = dst.len().min(self.size as usize - off);
        // SAFETY: no concurrent writer is the caller's promise.
        unsafe {
            dst[..first].copy_from_slice(self.mem.slice(off, first));
            if first < dst.len() {
                let rest = dst.len() - first;
                dst[first..].copy_from_slice(self.mem.slice(0, rest));
            }
        }
    }

    /// Copies the bytes at `lsn..lsn + dst.len()` out of the ring although a
    /// writer may be overwriting them (wrapping at the end).
    ///
    /// # Safety
    /// As for `SharedBuf::read_racy`: the caller proves afterwards that no
    /// write overlapped the copy, and discards it otherwise.
    pub unsafe fn get_racy(&self, lsn: Lsn, dst: &mut [u8]) {
        let off = self.offset(lsn);
        let first = dst.len().min(self.size as usize - off);
        // SAFETY: the caller's promise, above.
        unsafe {
            self.mem.read_racy(off, &mut dst[..first]);
            if first < dst.len() {
                self.mem.read_racy(0, &mut dst[first..]);
            }
        }
    }

    /// Borrows `len` contiguous bytes at `lsn` (the range must not wrap).
    ///
    /// # Safety
    /// As for [`WalBuffer::get`], for as long as the slice lives.
    pub unsafe fn slice(&self, lsn: Lsn, len: usize) -> &[u8] {
        let off = self.offset(lsn);
        assert!(off + len <= self.size as usize, "ring slice wraps");
        // SAFETY: as in `get`.
        unsafe { self.mem.slice(off, len) }
    }
}
