//! The on-disk record: a 24-byte header, then the payload, padded with zeros
//! to a multiple of 8 bytes. docs/wal-format.md describes it byte by byte.
//!
//! ```text
//! offset size field
//!      0    4 tot_len   header + payload, in bytes, little endian (padding excluded)
//!      4    4 crc       crc32c over bytes 0..4, then 8..24, then the payload
//!      8    8 lsn       the record's own start LSN
//!     16    1 kind      what the payload is; 0 is never valid
//!     17    1 flags     bit 0: payload is lz4-compressed
//!     18    2 reserved  always 0
//!     20    4 raw_len   uncompressed payload length when bit 0 is set, else 0
//! ```
//!
//! A record is accepted only if its length is sane, its own LSN equals the
//! position it was read from, its reserved bits are zero and its crc matches.
//! The own-LSN check is what stops replay at stale bytes in a recycled segment:
//! those records were written at a different LSN.

use crate::lsn::Lsn;
use std::fmt;

pub const HEADER_LEN: usize = 24;
/// Records start on 8-byte boundaries.
pub const ALIGN: u64 = 8;
/// Hard ceiling for any record, whatever `max_record_size` says: a reader
/// must be able to read WAL written under a larger setting, but never
/// allocates more than this for one record on the strength of a length field.
pub const MAX_TOTAL_LEN: u32 = 512 << 20;

pub const FLAG_LZ4: u8 = 0x01;
const KNOWN_FLAGS: u8 = FLAG_LZ4;

/// What a record's payload is. 1..=127 are free for clients; 128..=255 are
/// walden's own (page writes, checkpoints, ...). 0 is never valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kind(pub u8);

impl Kind {
    /// A client record: opaque bytes.
    pub const DATA: Kind = Kind(1);
    /// Padding or a marker with no meaning to replay (also what a page
    /// write becomes when a checkpoint's redo point overtook it: see
    /// `store`).
    pub const NOOP: Kind = Kind(128);
    /// A change to part of a page: relation, block, offset, bytes.
    pub const PAGE_WRITE: Kind = Kind(129);
    /// A full-page image (the first change to a page after a redo point),
    /// optionally lz4-compressed.
    pub const PAGE_IMAGE: Kind = Kind(130);
    /// Where a checkpoint's redo starts: the record's own LSN is the redo point.
    pub const CHECKPOINT_REDO: Kind = Kind(131);
    /// An online checkpoint completed; its payload names the redo point.
    pub const CHECKPOINT_ONLINE: Kind = Kind(132);
    /// A shutdown checkpoint: nothing before it needs replay.
    pub const CHECKPOINT_SHUTDOWN: Kind = Kind(133);
    /// A base backup started (pg_backup_start): its payload names the
    /// backup's start (the redo point of its checkpoint) and its label.
    pub const BACKUP_START: Kind = Kind(134);
    /// A base backup's pages are copied (XLOG_BACKUP_END): same payload as
    /// BACKUP_START; the copy is consistent once replay passed this record.
    pub const BACKUP_END: Kind = Kind(135);
    /// The first record of a new timeline, written by a promotion: payload
    /// the new timeline u32 LE, then the previous one u32 LE (PostgreSQL's
    /// XLOG_END_OF_RECOVERY). Nothing to replay.
    pub const END_OF_RECOVERY: Kind = Kind(136);

    /// Whether recovery replays records of this kind (the page store's own).
    pub fn is_walden(self) -> bool {
        self.0 >= 128
    }

    pub fn name(self) -> String {
        match self {
            Kind::DATA => "DATA".into(),
            Kind::NOOP => "NOOP".into(),
            Kind::PAGE_WRITE => "PAGE_WRITE".into(),
            Kind::PAGE_IMAGE => "PAGE_IMAGE".into(),
            Kind::CHECKPOINT_REDO => "CHECKPOINT_REDO".into(),
            Kind::CHECKPOINT_ONLINE => "CHECKPOINT_ONLINE".into(),
            Kind::CHECKPOINT_SHUTDOWN => "CHECKPOINT_SHUTDOWN".into(),
            Kind::BACKUP_START => "BACKUP_START".into(),
            Kind::BACKUP_END => "BACKUP_END".into(),
            Kind::END_OF_RECOVERY => "END_OF_RECOVERY".into(),
            Kind(k) if k < 128 => format!("USER{k}"),
            Kind(k) => format!("WALDEN{k}"),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Bytes a record of `payload_len` occupies in the stream, padding included.
pub const fn stream_len(payload_len: usize) -> u64 {
    ((HEADER_LEN + payload_len) as u64).div_ceil(ALIGN) * ALIGN
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub tot_len: u32,
    pub crc: u32,
    pub lsn: Lsn,
    pub kind: Kind,
    pub flags: u8,
    pub raw_len: u32,
}

impl Header {
    pub fn payload_len(&self) -> usize {
        self.tot_len as usize - HEADER_LEN
    }

    pub fn stream_len(&self) -> u64 {
        stream_len(self.payload_len())
    }
}

/// Why the bytes at an LSN are not a valid record. The reader treats any of
/// these as the end of valid WAL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("invalid record length at {at}: expected at least {HEADER_LEN}, got {len}")]
    LengthTooShort { at: Lsn, len: u32 },
    #[error("invalid record length at {at}: {len} is larger than the limit {MAX_TOTAL_LEN}")]
    LengthTooLong { at: Lsn, len: u32 },
    #[error("record with incorrect LSN {found} at {at}")]
    WrongLsn { at: Lsn, found: Lsn },
    #[error("invalid kind 0 in record at {at}")]
    InvalidKind { at: Lsn },
    #[error("invalid flags {flags:#04x} or reserved bits in record at {at}")]
    InvalidFlags { at: Lsn, flags: u8 },
    #[error("incorrect checksum in record at {at}: stored {stored:08x}, computed {computed:08x}")]
    BadChecksum { at: Lsn, stored: u32, computed: u32 },
    #[error("record at {at} is truncated: {need} bytes needed, {have} available")]
    Truncated { at: Lsn, need: usize, have: usize },
}

impl RecordError {
    /// The LSN of the offending record.
    pub fn lsn(&self) -> Lsn {
        match *self {
            RecordError::LengthTooShort { at, .. }
            | RecordError::LengthTooLong { at, .. }
            | RecordError::WrongLsn { at, .. }
            | RecordError::InvalidKind { at }
            | RecordError::InvalidFlags { at, .. }
            | RecordError::BadChecksum { at, .. }
            | RecordError::Truncated { at, .. } => at,
        }
    }

    /// True when the bytes are all zero where a header should be: the
    /// ordinary end of WAL in a zero-filled segment.
    pub fn is_zeroed(&self) -> bool {
        matches!(self, RecordError::LengthTooShort { len: 0, .. })
    }
}

/// Fills `hdr` with the header of a record at `lsn`, crc included.
/// This runs on the insert path: no allocation, one pass of crc32c.
pub fn encode_header(
    hdr: &mut [u8; HEADER_LEN],
    lsn: Lsn,
    kind: Kind,
    flags: u8,
    raw_len: u32,
    payload: &[u8],
) {
    assert!(kind.0 != 0, "kind 0 is never valid");
    debug_assert!(payload.len() + HEADER_LEN <= MAX_TOTAL_LEN as usize);
    let tot_len = (HEADER_LEN + payload.len()) as u32;
    hdr[0..4].copy_from_slice(&tot_len.to_le_bytes());
    hdr[4..8].copy_from_slice(&[0; 4]);
    hdr[8..16].copy_from_slice(&lsn.0.to_le_bytes());
    hdr[16] = kind.0;
    hdr[17] = flags;
    hdr[18..20].copy_from_slice(&[0; 2]);
    hdr[20..24].copy_from_slice(&raw_len.to_le_bytes());
    let crc = record_crc(hdr, payload);
    hdr[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Fills `hdr` with the header of a NOOP record at `lsn` whose payload is
/// `payload_len` zero bytes (the caller zeroes them in place). It takes the
/// place of a reserved record that must not be written after all, with the
/// same stream length. No allocation.
pub fn encode_noop_header(hdr: &mut [u8; HEADER_LEN], lsn: Lsn, payload_len: usize) {
    static ZEROS: [u8; 4096] = [0; 4096];
    let tot_len = (HEADER_LEN + payload_len) as u32;
    hdr[0..4].copy_from_slice(&tot_len.to_le_bytes());
    hdr[4..8].copy_from_slice(&[0; 4]);
    hdr[8..16].copy_from_slice(&lsn.0.to_le_bytes());
    hdr[16] = Kind::NOOP.0;
    hdr[17] = 0;
    hdr[18..24].copy_from_slice(&[0; 6]);
    let mut crc = crc32c::crc32c(&hdr[0..4]);
    crc = crc32c::crc32c_append(crc, &hdr[8..HEADER_LEN]);
    let mut left = payload_len;
    while left > 0 {
        let n = left.min(ZEROS.len());
        crc = crc32c::crc32c_append(crc, &ZEROS[..n]);
        left -= n;
    }
    hdr[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn record_crc(hdr: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&hdr[0..4]);
    let crc = crc32c::crc32c_append(crc, &hdr[8..HEADER_LEN]);
    crc32c::crc32c_append(crc, payload)
}

/// Checks a header read at `at` before its payload is read: length, own LSN,
/// kind and flags. The crc is checked by [`verify_payload`].
pub fn decode_header(hdr: &[u8; HEADER_LEN], at: Lsn) -> Result<Header, RecordError> {
    let u32_at = |o: usize| u32::from_le_bytes(hdr[o..o + 4].try_into().unwrap());
    let tot_len = u32_at(0);
    if (tot_len as usize) < HEADER_LEN {
        return Err(RecordError::LengthTooShort { at, len: tot_len });
    }
    if tot_len > MAX_TOTAL_LEN {
        return Err(RecordError::LengthTooLong { at, len: tot_len });
    }
    let lsn = Lsn(u64::from_le_bytes(hdr[8..16].try_into().unwrap()));
    if lsn != at {
        return Err(RecordError::WrongLsn { at, found: lsn });
    }
    let kind = Kind(hdr[16]);
    if kind.0 == 0 {
        return Err(RecordError::InvalidKind { at });
    }
    let flags = hdr[17];
    let raw_len = u32_at(20);
    if flags & !KNOWN_FLAGS != 0
        || hdr[18] != 0
        || hdr[19] != 0
        || (flags & FLAG_LZ4 == 0 && raw_len != 0)
    {
        return Err(RecordError::InvalidFlags { at, flags });
    }
    Ok(Header {
        tot_len,
        crc: u32_at(4),
        lsn,
        kind,
        flags,
        raw_len,
    })
}

/// Checks the crc of a record whose header passed [`decode_header`].
pub fn verify_payload(
    hdr_bytes: &[u8; HEADER_LEN],
    hdr: &Header,
    payload: &[u8],
) -> Result<(), RecordError> {
    debug_assert_eq!(payload.len(), hdr.payload_len());
    let computed = record_crc(hdr_bytes, payload);
    if computed != hdr.crc {
        return Err(RecordError::BadChecksum {
            at: hdr.lsn,
            stored: hdr.crc,
            computed,
        });
    }
    Ok(())
}

/// Decodes the record that starts at `buf[0]`, read from LSN `at`. Returns the
/// header and the payload slice.
pub fn decode(buf: &[u8], at: Lsn) -> Result<(Header, &[u8]), RecordError> {
    if buf.len() < HEADER_LEN {
        return Err(RecordError::Truncated {
            at,
            need: HEADER_LEN,
            have: buf.len(),
        });
    }
    let hdr_bytes: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().unwrap();
    let hdr = decode_header(hdr_bytes, at)?;
    let end = hdr.tot_len as usize;
    if buf.len() < end {
        return Err(RecordError::Truncated {
            at,
            need: end,
            have: buf.len(),
        });
    }
    let payload = &buf[HEADER_LEN..end];
    verify_payload(hdr_bytes, &hdr, payload)?;
    Ok((hdr, payload))
}

/// Encodes a whole record into a new vector, padding included. For tests,
/// tools and the reader's callers; the insert path encodes in place.
pub fn encode(lsn: Lsn, kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; stream_len(payload.len()) as usize];
    let mut hdr = [0u8; HEADER_LEN];
    encode_header(&mut hdr, lsn, kind, 0, 0, payload);
    out[..HEADER_LEN].copy_from_slice(&hdr);
    out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(lsn in 1u64..u64::MAX / 2, kind in 1u8..=255, payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let lsn = Lsn(lsn & !7);
            prop_assume!(lsn.is_valid());
            let bytes = encode(lsn, Kind(kind), &payload);
            prop_assert_eq!(bytes.len() as u64 % ALIGN, 0);
            let (hdr, got) = decode(&bytes, lsn).unwrap();
            prop_assert_eq!(got, &payload[..]);
            prop_assert_eq!(hdr.kind, Kind(kind));
            prop_assert_eq!(hdr.lsn, lsn);
            prop_assert_eq!(hdr.stream_len(), bytes.len() as u64);
        }

        /// Every single corrupted byte of header or payload is detected.
        #[test]
        fn every_corrupted_byte_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            pos_seed in any::<usize>(),
            xor in 1u8..=255,
        ) {
            let lsn = Lsn(0x1_0000_0040);
            let mut bytes = encode(lsn, Kind::DATA, &payload);
            let tot = HEADER_LEN + payload.len();
            let pos = pos_seed % tot;
            bytes[pos] ^= xor;
            prop_assert!(decode(&bytes, lsn).is_err(), "corruption at byte {} not detected", pos);
        }
    }

    #[test]
    fn each_byte_of_a_small_record_exhaustively() {
        let lsn = Lsn(0x100_0000);
        let payload = b"the quick brown fox";
        let clean = encode(lsn, Kind::DATA, payload);
        for pos in 0..HEADER_LEN + payload.len() {
            for xor in [0x01u8, 0x80, 0xFF] {
                let mut bytes = clean.clone();
                bytes[pos] ^= xor;
                assert!(decode(&bytes, lsn).is_err(), "byte {pos} ^ {xor:#x}");
            }
        }
    }

    #[test]
    fn stale_record_at_another_lsn_is_rejected() {
        let bytes = encode(Lsn(0x100_0000), Kind::DATA, b"old");
        let err = decode(&bytes, Lsn(0x200_0000)).unwrap_err();
        assert!(matches!(err, RecordError::WrongLsn { .. }));
        assert_eq!(
            err.to_string(),
            "record with incorrect LSN 0/1000000 at 0/2000000"
        );
    }

    #[test]
    fn noop_header_matches_a_zero_payload_record() {
        for len in [0usize, 5, 4096, 9000] {
            let lsn = Lsn(0x100_0040);
            let want = encode(lsn, Kind::NOOP, &vec![0u8; len]);
            let mut hdr = [0u8; HEADER_LEN];
            encode_noop_header(&mut hdr, lsn, len);
            assert_eq!(&hdr[..], &want[..HEADER_LEN], "payload {len}");
            let (h, p) = decode(&want, lsn).unwrap();
            assert_eq!((h.kind, p.len()), (Kind::NOOP, len));
        }
    }

    #[test]
    fn zeroes_are_the_end_of_wal() {
        let err = decode(&[0u8; 64], Lsn(0x100_0000)).unwrap_err();
        assert!(err.is_zeroed());
        assert_eq!(
            err.to_string(),
            "invalid record length at 0/1000000: expected at least 24, got 0"
        );
    }
}
