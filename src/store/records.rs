//! Payloads of the page store's WAL records (kinds 129..=133), encoded and
//! decoded. docs/wal-format.md §8 describes them byte by byte.
//!
//! ```text
//! PAGE_WRITE (129)          PAGE_IMAGE (130)              CHECKPOINT_ONLINE/SHUTDOWN (132/133)
//!  0 4 rel                   0 4 rel                       0 8 redo LSN
//!  4 4 block                 4 4 block                     8 4 timeline
//!  8 2 offset in data        8 2 flags (bit 0: lz4)       12 4 previous timeline
//! 10 2 length               10 2 stored image length      16 8 time (µs since the epoch)
//! 12 … bytes                12 … image: the 8168 data     24 1 full_page_writes
//!                                bytes, or their lz4 block 25 7 reserved (0)
//!
//! CHECKPOINT_REDO (131): 0 8 time the checkpoint started (µs since the epoch)
//! ```
//!
//! A decoder never trusts a payload: every length is checked, and a record
//! that does not decode is an error naming its LSN (recovery stops there).

use crate::lsn::Lsn;
use crate::record::Kind;

use super::page::{PageTag, MAX_BLOCKS, PAGE_DATA};

pub const PAGE_WRITE_HEADER: usize = 12;
pub const PAGE_IMAGE_HEADER: usize = 12;
pub const IMAGE_LZ4: u16 = 0x0001;
pub const CHECKPOINT_LEN: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} record at {at}: {what}")]
pub struct RecordDecodeError {
    pub kind: Kind,
    pub at: Lsn,
    pub what: String,
}

/// A change to `len` bytes at `offset` of a page's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageWrite<'a> {
    pub tag: PageTag,
    pub offset: usize,
    pub bytes: &'a [u8],
}

/// A full-page image of a page's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageImage<'a> {
    pub tag: PageTag,
    pub compressed: bool,
    /// The stored bytes (compressed or not); see [`PageImage::restore`].
    pub image: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub redo: Lsn,
    pub timeline: u32,
    pub prev_timeline: u32,
    pub time_us: u64,
    pub full_page_writes: bool,
}

pub fn encode_page_write(tag: PageTag, offset: usize, bytes: &[u8], out: &mut Vec<u8>) {
    debug_assert!(offset + bytes.len() <= PAGE_DATA && !bytes.is_empty());
    out.clear();
    out.extend_from_slice(&tag.rel.to_le_bytes());
    out.extend_from_slice(&tag.block.to_le_bytes());
    out.extend_from_slice(&(offset as u16).to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Encodes an image of `data` (a page's 8168 data bytes), lz4-compressed
/// when `lz4` and when that is smaller.
pub fn encode_page_image(tag: PageTag, data: &[u8], lz4: bool, out: &mut Vec<u8>) {
    debug_assert_eq!(data.len(), PAGE_DATA);
    out.clear();
    out.extend_from_slice(&tag.rel.to_le_bytes());
    out.extend_from_slice(&tag.block.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let mut flags = 0u16;
    if lz4 {
        out.resize(
            PAGE_IMAGE_HEADER + lz4_flex::block::get_maximum_output_size(PAGE_DATA),
            0,
        );
        match lz4_flex::block::compress_into(data, &mut out[PAGE_IMAGE_HEADER..]) {
            Ok(n) if n < PAGE_DATA => {
                out.truncate(PAGE_IMAGE_HEADER + n);
                flags = IMAGE_LZ4;
            }
            _ => out.truncate(PAGE_IMAGE_HEADER),
        }
    }
    if flags == 0 {
        out.extend_from_slice(data);
    }
    let stored = (out.len() - PAGE_IMAGE_HEADER) as u16;
    out[8..10].copy_from_slice(&flags.to_le_bytes());
    out[10..12].copy_from_slice(&stored.to_le_bytes());
}

pub fn encode_checkpoint(c: &Checkpoint) -> [u8; CHECKPOINT_LEN] {
    let mut b = [0u8; CHECKPOINT_LEN];
    b[0..8].copy_from_slice(&c.redo.0.to_le_bytes());
    b[8..12].copy_from_slice(&c.timeline.to_le_bytes());
    b[12..16].copy_from_slice(&c.prev_timeline.to_le_bytes());
    b[16..24].copy_from_slice(&c.time_us.to_le_bytes());
    b[24] = c.full_page_writes as u8;
    b
}

fn tag_of(p: &[u8], kind: Kind, at: Lsn) -> Result<PageTag, RecordDecodeError> {
    let rel = u32::from_le_bytes(p[0..4].try_into().unwrap());
    let block = u32::from_le_bytes(p[4..8].try_into().unwrap());
    if block >= MAX_BLOCKS {
        return Err(RecordDecodeError {
            kind,
            at,
            what: format!("block {block} is out of range"),
        });
    }
    Ok(PageTag::new(rel, block))
}

fn bad(kind: Kind, at: Lsn, what: String) -> RecordDecodeError {
    RecordDecodeError { kind, at, what }
}

pub fn decode_page_write(p: &[u8], at: Lsn) -> Result<PageWrite<'_>, RecordDecodeError> {
    let kind = Kind::PAGE_WRITE;
    if p.len() < PAGE_WRITE_HEADER {
        return Err(bad(kind, at, format!("{} bytes is too short", p.len())));
    }
    let tag = tag_of(p, kind, at)?;
    let offset = u16::from_le_bytes(p[8..10].try_into().unwrap()) as usize;
    let len = u16::from_le_bytes(p[10..12].try_into().unwrap()) as usize;
    if len == 0 || offset + len > PAGE_DATA || p.len() != PAGE_WRITE_HEADER + len {
        return Err(bad(
            kind,
            at,
            format!(
                "offset {offset} and length {len} do not fit a page, or the payload is {} bytes",
                p.len()
            ),
        ));
    }
    Ok(PageWrite {
        tag,
        offset,
        bytes: &p[PAGE_WRITE_HEADER..],
    })
}

pub fn decode_page_image(p: &[u8], at: Lsn) -> Result<PageImage<'_>, RecordDecodeError> {
    let kind = Kind::PAGE_IMAGE;
    if p.len() < PAGE_IMAGE_HEADER {
        return Err(bad(kind, at, format!("{} bytes is too short", p.len())));
    }
    let tag = tag_of(p, kind, at)?;
    let flags = u16::from_le_bytes(p[8..10].try_into().unwrap());
    let stored = u16::from_le_bytes(p[10..12].try_into().unwrap()) as usize;
    let compressed = flags & IMAGE_LZ4 != 0;
    if flags & !IMAGE_LZ4 != 0
        || p.len() != PAGE_IMAGE_HEADER + stored
        || (!compressed && stored != PAGE_DATA)
    {
        return Err(bad(
            kind,
            at,
            format!(
                "flags {flags:#06x}, stored length {stored}, payload {} bytes",
                p.len()
            ),
        ));
    }
    Ok(PageImage {
        tag,
        compressed,
        image: &p[PAGE_IMAGE_HEADER..],
    })
}

impl PageImage<'_> {
    /// Writes the page's 8168 data bytes into `data`.
    pub fn restore(&self, data: &mut [u8], at: Lsn) -> Result<(), RecordDecodeError> {
        debug_assert_eq!(data.len(), PAGE_DATA);
        if !self.compressed {
            data.copy_from_slice(self.image);
            return Ok(());
        }
        match lz4_flex::block::decompress_into(self.image, data) {
            Ok(PAGE_DATA) => Ok(()),
            Ok(n) => Err(bad(
                Kind::PAGE_IMAGE,
                at,
                format!("the image decompresses to {n} bytes, not {PAGE_DATA}"),
            )),
            Err(e) => Err(bad(
                Kind::PAGE_IMAGE,
                at,
                format!("the image does not decompress: {e}"),
            )),
        }
    }
}

pub fn decode_checkpoint(kind: Kind, p: &[u8], at: Lsn) -> Result<Checkpoint, RecordDecodeError> {
    if p.len() != CHECKPOINT_LEN || p[25..].iter().any(|&b| b != 0) || p[24] > 1 {
        return Err(bad(
            kind,
            at,
            format!("a checkpoint payload is {CHECKPOINT_LEN} bytes with zero reserved bytes"),
        ));
    }
    let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
    Ok(Checkpoint {
        redo: Lsn(u64_at(0)),
        timeline: u32_at(8),
        prev_timeline: u32_at(12),
        time_us: u64_at(16),
        full_page_writes: p[24] == 1,
    })
}

/// One line describing a page-store record's payload, as pg_waldump's
/// `desc:` column does; `None` for kinds this module does not own.
pub fn describe(kind: Kind, payload: &[u8], at: Lsn) -> Option<String> {
    Some(match kind {
        Kind::PAGE_WRITE => match decode_page_write(payload, at) {
            Ok(w) => format!(
                "rel {} blk {} off {} len {}",
                w.tag.rel,
                w.tag.block,
                w.offset,
                w.bytes.len()
            ),
            Err(e) => format!("INVALID: {}", e.what),
        },
        Kind::PAGE_IMAGE => match decode_page_image(payload, at) {
            Ok(i) => format!(
                "rel {} blk {} FPW{}, {} bytes",
                i.tag.rel,
                i.tag.block,
                if i.compressed {
                    ", compression method: lz4"
                } else {
                    ""
                },
                i.image.len()
            ),
            Err(e) => format!("INVALID: {}", e.what),
        },
        Kind::CHECKPOINT_REDO => format!("redo point, {} bytes", payload.len()),
        Kind::END_OF_RECOVERY => match crate::wal::timeline::decode_end_of_recovery(payload) {
            Some((tli, prev)) => format!("tli {tli}; prev tli {prev}"),
            None => format!("invalid end-of-recovery payload of {} bytes", payload.len()),
        },
        Kind::CHECKPOINT_ONLINE | Kind::CHECKPOINT_SHUTDOWN => {
            match decode_checkpoint(kind, payload, at) {
                Ok(c) => format!(
                    "redo {}; tli {}; prev tli {}; fpw {}",
                    c.redo, c.timeline, c.prev_timeline, c.full_page_writes
                ),
                Err(e) => format!("INVALID: {}", e.what),
            }
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_records_round_trip() {
        let tag = PageTag::new(7, 42);
        let mut out = Vec::new();
        encode_page_write(tag, 100, b"abc", &mut out);
        let w = decode_page_write(&out, Lsn(8)).unwrap();
        assert_eq!((w.tag, w.offset, w.bytes), (tag, 100, &b"abc"[..]));

        let mut data = vec![0u8; PAGE_DATA];
        data[5..9].copy_from_slice(b"page");
        for lz4 in [false, true] {
            encode_page_image(tag, &data, lz4, &mut out);
            let i = decode_page_image(&out, Lsn(8)).unwrap();
            assert_eq!(i.compressed, lz4, "zeros compress");
            if lz4 {
                assert!(out.len() < 200, "{} bytes", out.len());
            }
            let mut back = vec![1u8; PAGE_DATA];
            i.restore(&mut back, Lsn(8)).unwrap();
            assert_eq!(back, data);
        }
        let c = Checkpoint {
            redo: Lsn(0x100_0028),
            timeline: 1,
            prev_timeline: 1,
            time_us: 5,
            full_page_writes: true,
        };
        let b = encode_checkpoint(&c);
        assert_eq!(
            decode_checkpoint(Kind::CHECKPOINT_ONLINE, &b, Lsn(8)),
            Ok(c)
        );
    }

    #[test]
    fn incompressible_images_are_stored_raw() {
        let data: Vec<u8> = crate::testkit::payload(3, PAGE_DATA);
        let mut out = Vec::new();
        encode_page_image(PageTag::new(1, 1), &data, true, &mut out);
        let i = decode_page_image(&out, Lsn(8)).unwrap();
        assert!(!i.compressed);
        assert_eq!(i.image, &data[..]);
    }

    #[test]
    fn bad_payloads_are_refused_with_their_lsn() {
        let mut out = Vec::new();
        encode_page_write(PageTag::new(1, 1), PAGE_DATA - 3, b"abc", &mut out);
        assert!(decode_page_write(&out, Lsn(8)).is_ok());
        out[8..10].copy_from_slice(&((PAGE_DATA - 2) as u16).to_le_bytes());
        let e = decode_page_write(&out, Lsn(0x1000)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid PAGE_WRITE record at 0/1000"),
            "{e}"
        );
        assert!(decode_page_write(&out[..5], Lsn(8)).is_err());
        encode_page_image(PageTag::new(1, 1), &vec![0; PAGE_DATA], true, &mut out);
        out.push(0);
        assert!(decode_page_image(&out, Lsn(8)).is_err());
        let mut garbage = vec![0u8; 40];
        garbage[8..10].copy_from_slice(&IMAGE_LZ4.to_le_bytes());
        garbage[10..12].copy_from_slice(&28u16.to_le_bytes());
        garbage[12..].fill(0xFF);
        let i = decode_page_image(&garbage, Lsn(8)).unwrap();
        assert!(i.restore(&mut vec![0; PAGE_DATA], Lsn(8)).is_err());
    }
}
