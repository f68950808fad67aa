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
