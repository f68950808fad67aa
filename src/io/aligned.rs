//! Memory aligned for O_DIRECT: owned buffers, and the shared WAL ring.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use super::BLOCK;

/// An owned, zero-initialised buffer aligned to [`BLOCK`], whose length is a
/// multiple of [`BLOCK`]: what O_DIRECT reads and writes need.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads (through Deref), like &Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes, `len` rounded up to a whole block.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = len.max(BLOCK).div_ceil(BLOCK) * BLOCK;
        let layout = Layout::from_size_align(len, BLOCK).expect("aligned layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, BLOCK).expect("aligned layout");
        // SAFETY: allocated in `zeroed` with this same layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Aligned memory written concurrently by many threads at disjoint ranges and
/// read by the flusher and the kernel: the WAL ring. It cannot know which
/// ranges are disjoint; the insert protocol in `wal::insert` does, and every
/// caller states why in its `// SAFETY:` comment.
pub struct SharedBuf {
    buf: AlignedBuf,
}

impl SharedBuf {
    pub fn zeroed(len: usize) -> SharedBuf {
        SharedBuf {
            buf: AlignedBuf::zeroed(len),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.buf.as_ptr()
    }

    /// Copies `src` to `offset`.
    ///
    /// # Safety
    /// No other thread may read or write `offset..offset + src.len()` while
    /// this runs, and the range must lie inside the buffer (checked).
    pub unsafe fn write(&self, offset: usize, src: &[u8]) {
        assert!(
            offset + src.len() <= self.buf.len(),
            "ring write out of bounds"
        );
        // SAFETY: in bounds (asserted); exclusivity is the caller's promise.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.buf.as_mut_ptr().add(offset),
                src.len(),
            )
        }
    }

    /// Fills `offset..offset + len` with zeros.
    ///
    /// # Safety
    /// As for [`SharedBuf::write`].
    pub unsafe fn zero(&self, offset: usize, len: usize) {
        assert!(offset + len <= self.buf.len(), "ring write out of bounds");
        // SAFETY: in bounds (asserted); exclusivity is the caller's promise.
        unsafe { std::ptr::write_bytes(self.buf.as_mut_ptr().add(offset), 0, len) }
    }

    /// Copies `dst.len()` bytes at `offset` out of the buffer while a
    /// writer may be writing them (a seqlock reader's copy): volatile reads,
    /// so the compiler neither elides nor tears them into something the
    /// caller's later check cannot catch. What was copied may be garbage if
    /// a writer raced; the caller must find out afterwards (it re-checks,
    /// after a fence, that no writer could have reached the range) and
    /// throw the copy away if so.
    ///
    /// # Safety
    /// A concurrent plain write is a data race in Rust's model; this is
    /// crossbeam's `AtomicCell` seqlock argument: the copy is only used once
    /// the caller has proven that no write overlapped it. The caller makes
    /// that check.
    pub unsafe fn read_racy(&self, offset: usize, dst: &mut [u8]) {
        assert!(
            offset + dst.len() <= self.buf.len(),
            "ring read out of bounds"
        );
        let base = self.buf.as_ptr();
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: in bounds (asserted); a racing writer is the caller's
            // to detect (above).
            *d = unsafe { std::ptr::read_volatile(base.add(offset + i)) };
        }
    }

    /// Borrows `offset..offset + len` for reading.
    ///
    /// # Safety
    /// No thread may write the range while the slice lives.
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.buf.len(), "ring read out of bounds");
        // SAFETY: in bounds (asserted); no writer is the caller's promise.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(offset), len) }
    }
}

/// One anonymous mapping cut into equal, block-aligned slots, each handed
/// out once as a [`Slot`]: the buffer pool's frames. The kernel zero-fills
/// a mapping's pages on first touch, so a large pool costs nothing until it
/// is used (one 8 KiB allocation per frame, zeroed by memset, took ~3 s for
/// 1 GB here).
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the slots that
// point into it own disjoint ranges (see `Slot`).
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself offers no access to the memory.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; every Slot holds an
        // Arc of this mapping, so none is left when it is unmapped.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// `slot_len` bytes of a [`Mapping`], owned exclusively, like a `Box<[u8]>`:
/// not `Clone`, so `&mut Slot` is the only way to write its bytes.
pub struct Slot {
    _mapping: std::sync::Arc<Mapping>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Slot owns its range exclusively (no two slots overlap), like a
// Box<[u8]>; the mapping outlives it through the Arc.
unsafe impl Send for Slot {}
// SAFETY: shared references only read (Deref), like &Box<[u8]>.
unsafe impl Sync for Slot {}

/// The size of a transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// `count` zeroed slots of `slot_len` bytes (a multiple of [`BLOCK`]), each
/// [`BLOCK`]-aligned, in one mapping (backed by transparent huge pages where
/// the kernel offers them).
pub fn slots(count: usize, slot_len: usize) -> std::io::Result<Vec<Slot>> {
    assert!(
        slot_len > 0 && slot_len % BLOCK == 0,
        "slots are whole blocks"
    );
    let len = count
        .checked_mul(slot_len)
        .filter(|&l| l > 0)
        .ok_or_else(|| std::io::Error::other("slot region size overflows"))?;
    // SAFETY: an anonymous private mapping of `len` bytes; no file, no
    // fixed address. The result is checked before use.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base =
        NonNull::new(raw as *mut u8).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
    let mapping = std::sync::Arc::new(Mapping { ptr: base, len });
    if len >= HUGE_PAGE {
        // A pool of gigabytes touched at random costs a TLB miss (a page
        // walk, nested under a hypervisor) per access with 4 kB pages:
        // ask for transparent huge pages (PostgreSQL's huge_pages = try).
        // Only a hint: where THP is off the call fails and nothing changes.
        // SAFETY: madvise on a mapping this function owns; MADV_HUGEPAGE
        // changes no contents and no permissions.
        unsafe { libc::madvise(raw, len, libc::MADV_HUGEPAGE) };
    }
    Ok((0..count)
        .map(|i| Slot {
            _mapping: std::sync::Arc::clone(&mapping),
            // SAFETY: i * slot_len + slot_len <= len, inside the mapping.
            ptr: unsafe { NonNull::new_unchecked(base.as_ptr().add(i * slot_len)) },
            len: slot_len,
        })
        .collect())
}

impl Slot {
    /// Where the slot's bytes start, as a number: for [`prefetch_write`], which
    /// may be handed it without a borrow of the slot.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

/// Asks the CPU to bring the cache lines of `[addr, addr + len)` into its
/// caches ahead of a write (PREFETCHW: the lines come in exclusive, so the
/// stores that follow need no second trip). A hint: it never faults and
/// never changes memory, so any address is allowed (a wrong one only wastes
/// the hint).
#[inline]
pub fn prefetch_write(addr: usize, len: usize) {
    const LINE: usize = 64;
    let mut line = addr & !(LINE - 1);
    let end = addr.saturating_add(len.max(1));
    while line < end {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: PREFETCHW is a hint that does not access memory
        // architecturally: it cannot fault, whatever the address, and it
        // changes no register or flag. CPUs without it run it as a NOP
        // (0F 0D is a reserved NOP on x86-64).
        unsafe {
            std::arch::asm!("prefetchw [{0}]", in(reg) line, options(nostack, preserves_flags, readonly));
        }
        line += LINE;
    }
}

impl std::ops::Deref for Slot {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len lies in the live mapping and belongs to this
        // slot alone; a shared borrow of the slot only reads.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Slot {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is exclusive access to the slot,
        // hence to its bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[test]
    fn slots_are_zeroed_aligned_and_disjoint() {
        let mut s = slots(4, 8192).unwrap();
        for (i, slot) in s.iter_mut().enumerate() {
            assert_eq!(slot.len(), 8192);
            assert_eq!(slot.as_ptr() as usize % BLOCK, 0);
            assert!(slot.iter().all(|&b| b == 0));
            slot.fill(i as u8 + 1);
        }
        for (i, slot) in s.iter().enumerate() {
            assert!(slot.iter().all(|&b| b == i as u8 + 1));
        }
        let keep = s.pop().unwrap();
        drop(s);
        assert!(
            keep.iter().all(|&b| b == 4),
            "the mapping lives while a slot does"
        );
    }
}
