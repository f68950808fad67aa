//! The 8 KiB page: its header, its checksum and its address. docs/page-store.md
//! describes it byte by byte.
//!
//! ```text
//! offset size field
//!      0    8 lsn        end LSN of the last WAL record applied to the page
//!      8    4 checksum   crc32c of (rel, block, bytes 0..8, bytes 12..8192); 0 without checksums
//!     12    2 flags      bit 0: the checksum is set
//!     14    2 version    page layout version, 1
//!     16    4 rel        the page's own relation id   } a copy of its address: a page
//!     20    4 block      the page's own block number  } written to the wrong place is caught
//!     24 8168 data       the client's bytes
//! ```
//!
//! A page of all zeros is a page never written (a hole in a data file, or
//! past its end): it reads as an empty page with LSN 0, as in PostgreSQL.

use std::fmt;

use crate::io::PAGE_SIZE;
use crate::lsn::Lsn;

pub const PAGE_HEADER: usize = 24;
/// Bytes of a page a client may write: the page less its header.
pub const PAGE_DATA: usize = PAGE_SIZE - PAGE_HEADER;
pub const PAGE_VERSION: u16 = 1;
pub const FLAG_CHECKSUM: u16 = 0x0001;
/// Block numbers are below this (a relation file of at most 8 TiB, well
/// inside ext4's and xfs's file size limits).
pub const MAX_BLOCKS: u32 = 1 << 30;

/// Where a page lives: relation id and block number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageTag {
    pub rel: u32,
    pub block: u32,
}

impl PageTag {
    pub fn new(rel: u32, block: u32) -> PageTag {
        PageTag { rel, block }
    }

    /// Byte offset of the page in its relation file.
    pub fn offset(self) -> u64 {
        self.block as u64 * PAGE_SIZE as u64
    }

    /// The 64-bit address spread by Fibonacci hashing: its high bits pick a
    /// buffer-pool partition, lower ones a redo worker.
    pub fn spread(self) -> u64 {
        ((self.rel as u64) << 32 | self.block as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

impl fmt::Display for PageTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {} of relation {}", self.block, self.rel)
    }
}

/// Why a page read from the data device cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("invalid page in {tag}: page verification failed, calculated checksum {computed:08X} but expected {stored:08X}")]
    Checksum {
        tag: PageTag,
        stored: u32,
        computed: u32,
    },
    #[error("invalid page in {tag}: the page holds block {found_block} of relation {found_rel} (a misdirected write)")]
    Misdirected {
        tag: PageTag,
        found_rel: u32,
        found_block: u32,
    },
    #[error("invalid page header in {tag}: {what}")]
    Header { tag: PageTag, what: String },
}

impl PageError {
    pub fn tag(&self) -> PageTag {
        match self {
            PageError::Checksum { tag, .. }
            | PageError::Misdirected { tag, .. }
            | PageError::Header { tag, .. } => *tag,
        }
    }
}

fn u16_at(p: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(p[o..o + 2].try_into().unwrap())
}

fn u32_at(p: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(p[o..o + 4].try_into().unwrap())
}

pub fn lsn(page: &[u8]) -> Lsn {
    Lsn(u64::from_le_bytes(page[0..8].try_into().unwrap()))
}

pub fn set_lsn(page: &mut [u8], lsn: Lsn) {
    page[0..8].copy_from_slice(&lsn.0.to_le_bytes());
}

pub fn data(page: &[u8]) -> &[u8] {
    &page[PAGE_HEADER..PAGE_SIZE]
}

pub fn data_mut(page: &mut [u8]) -> &mut [u8] {
    &mut page[PAGE_HEADER..PAGE_SIZE]
}

/// The checksum of `page` at `tag`: crc32c over the address, then the page
/// with its checksum field left out. Mixing in the address makes a page
/// written to the wrong block fail even if its own copy of the address was
/// rewritten too.
pub fn checksum(page: &[u8], tag: PageTag) -> u32 {
    let mut addr = [0u8; 8];
    addr[0..4].copy_from_slice(&tag.rel.to_le_bytes());
    addr[4..8].copy_from_slice(&tag.block.to_le_bytes());
    let c = crc32c::crc32c(&addr);
    let c = crc32c::crc32c_append(c, &page[0..8]);
    crc32c::crc32c_append(c, &page[12..PAGE_SIZE])
}

/// Fills in the header of a copy about to be written: version, address and
/// (with `checksums`) the checksum, last.
pub fn seal(page: &mut [u8], tag: PageTag, checksums: bool) {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    page[14..16].copy_from_slice(&PAGE_VERSION.to_le_bytes());
    page[16..20].copy_from_slice(&tag.rel.to_le_bytes());
    page[20..24].copy_from_slice(&tag.block.to_le_bytes());
    let flags = if checksums { FLAG_CHECKSUM } else { 0 };
    page[12..14].copy_from_slice(&flags.to_le_bytes());
    page[8..12].copy_from_slice(&[0; 4]);
    if checksums {
        let c = checksum(page, tag);
        page[8..12].copy_from_slice(&c.to_le_bytes());
    }
}

/// Checks a page read from the data device at `tag`. An all-zero page is a
/// new page and passes. With `checksums`, every other page must carry a
/// matching checksum.
pub fn verify(page: &[u8], tag: PageTag, checksums: bool) -> Result<(), PageError> {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    if is_new(page) {
        return Ok(());
    }
    let flags = u16_at(page, 12);
    if checksums {
        let stored = u32_at(page, 8);
        let computed = checksum(page, tag);
        if flags & FLAG_CHECKSUM == 0 || stored != computed {
            return Err(PageError::Checksum {
                tag,
                stored,
                computed,
            });
        }
    }
    let version = u16_at(page, 14);
    if version != PAGE_VERSION || flags & !FLAG_CHECKSUM != 0 {
        return Err(PageError::Header {
            tag,
            what: format!("version {version}, flags {flags:#06x}"),
        });
    }
    let (found_rel, found_block) = (u32_at(page, 16), u32_at(page, 20));
    if (found_rel, found_block) != (tag.rel, tag.block) {
        return Err(PageError::Misdirected {
            tag,
            found_rel,
            found_block,
        });
    }
    Ok(())
}

/// True for a page never written: all zeros.
pub fn is_new(page: &[u8]) -> bool {
    // Compare in u64 chunks: this runs on every page read.
    page.chunks_exact(8)
        .all(|c| u64::from_ne_bytes(c.try_into().unwrap()) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(tag: PageTag) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        set_lsn(&mut p, Lsn(0x1234_5678));
        data_mut(&mut p)[100..105].copy_from_slice(b"hello");
        seal(&mut p, tag, true);
        p
    }

    #[test]
    fn sealed_page_verifies_and_new_page_passes() {
        let tag = PageTag::new(3, 7);
        let p = written(tag);
        verify(&p, tag, true).unwrap();
        assert_eq!(lsn(&p), Lsn(0x1234_5678));
        verify(&vec![0u8; PAGE_SIZE], tag, true).unwrap();
    }

    #[test]
    fn every_flipped_byte_fails_the_checksum() {
        let tag = PageTag::new(1, 2);
        let clean = written(tag);
        for pos in (0..PAGE_SIZE)
            .step_by(7)
            .chain([8, 9, 10, 11, PAGE_SIZE - 1])
        {
            let mut p = clean.clone();
            p[pos] ^= 0x40;
            assert!(verify(&p, tag, true).is_err(), "byte {pos}");
        }
    }

    #[test]
    fn a_torn_page_is_reported_by_name() {
        let tag = PageTag::new(5, 9);
        let mut p = written(tag);
        p[4096..].fill(0xAB);
        let e = verify(&p, tag, true).unwrap_err();
        assert!(matches!(e, PageError::Checksum { .. }));
        assert!(
            e.to_string()
                .starts_with("invalid page in block 9 of relation 5: page verification failed"),
            "{e}"
        );
    }

    #[test]
    fn a_page_at_the_wrong_address_is_caught() {
        let p = written(PageTag::new(1, 2));
        assert!(matches!(
            verify(&p, PageTag::new(1, 3), true),
            Err(PageError::Checksum { .. })
        ));
        let mut p = vec![0u8; PAGE_SIZE];
        p[0] = 1;
        seal(&mut p, PageTag::new(1, 2), false);
        assert!(matches!(
            verify(&p, PageTag::new(1, 3), false),
            Err(PageError::Misdirected { .. })
        ));
    }
}
