//! Record boundaries in a raw WAL byte stream: a standby receives its
//! primary's WAL as byte ranges cut anywhere (inside a header, inside a
//! payload), and must still know where the last complete record ends, to
//! report record-aligned write/flush LSNs (replication-design.md §7.3, trap
//! T3), and must refuse bytes that are not valid WAL before writing them.
//!
//! The tracker carries at most the 24 bytes of a header across pieces, then
//! the running crc32c of a record's payload: memory does not grow with the
//! record. It checks every record as the reader does (wal-format.md §4,
//! checks 2–6 on the header, 8 on the crc); padding is not covered by the
//! crc and, as for the reader, not checked.
//!
//! What it is not: a decoder. It never holds a payload and hands out no
//! records; `WalReader` reads them back from the segment files.

use crate::lsn::Lsn;
use crate::record::{self, RecordError, HEADER_LEN};

/// Where a raw WAL stream is, record by record. `Clone` is cheap (under 64
/// bytes): a caller checks a piece on a copy and keeps the copy only if
/// the whole piece was valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundaryTracker {
    /// The LSN of the next byte to be fed.
    at: Lsn,
    /// Where the record being received starts: the end of the last complete
    /// record. Invariant: `record_start <= at`.
    record_start: Lsn,
    part: Part,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    /// `have` bytes of the header at `record_start` received so far.
    Header {
        bytes: [u8; HEADER_LEN],
        have: usize,
    },
    /// The header was valid; the payload is arriving.
    Body {
        /// crc32c of header bytes 0..4, 8..24 and the payload so far.
        crc: u32,
        stored: u32,
        payload_left: u64,
        pad_left: u64,
    },
}

impl BoundaryTracker {
    /// A tracker for a stream whose next byte, at `start`, begins a record.
    pub fn new(start: Lsn) -> BoundaryTracker {
        BoundaryTracker {
            at: start,
            record_start: start,
            part: Part::Header {
                bytes: [0; HEADER_LEN],
                have: 0,
            },
        }
    }

    /// The LSN of the next byte expected.
    pub fn position(&self) -> Lsn {
        self.at
    }

    /// The end of the last complete, valid record fed (padding included:
    /// the next record's start), or the start if none is complete yet.
    pub fn last_complete_record_end(&self) -> Lsn {
        self.record_start
    }

    /// Takes in `bytes`, the stream at [`BoundaryTracker::position`]. On an
    /// error the tracker is left part-way: check on a clone (see
    /// [`BoundaryTracker::advanced`]).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), RecordError> {
        while !bytes.is_empty() {
            let used = match &mut self.part {
                Part::Header { bytes: hdr, have } => {
                    let n = (HEADER_LEN - *have).min(bytes.len());
                    hdr[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    if *have == HEADER_LEN {
                        let hdr = *hdr;
                        let h = record::decode_header(&hdr, self.record_start)?;
                        let crc = crc32c::crc32c_append(crc32c::crc32c(&hdr[0..4]), &hdr[8..]);
                        let payload = h.payload_len() as u64;
                        self.part = Part::Body {
                            crc,
                            stored: h.crc,
                            payload_left: payload,
                            pad_left: h.stream_len() - HEADER_LEN as u64 - payload,
                        };
                        // A record without payload is checked at once.
                        self.finish_payload()?;
                    }
                    n
                }
                Part::Body {
                    crc,
                    payload_left,
                    pad_left,
                    ..
                } => {
                    if *payload_left > 0 {
                        let n = (*payload_left).min(bytes.len() as u64) as usize;
                        *crc = crc32c::crc32c_append(*crc, &bytes[..n]);
                        *payload_left -= n as u64;
                        self.finish_payload()?;
                        n
                    } else {
                        let n = (*pad_left).min(bytes.len() as u64) as usize;
                        *pad_left -= n as u64;
                        n
                    }
                }
            };
            self.at = Lsn(self.at.0 + used as u64);
            bytes = &bytes[used..];
            if let Part::Body {
                payload_left: 0,
                pad_left: 0,
                ..
            } = self.part
            {
                self.record_start = self.at;
                self.part = Part::Header {
                    bytes: [0; HEADER_LEN],
                    have: 0,
                };
            }
        }
        Ok(())
    }

    /// The tracker after `bytes`, or why they are not valid WAL (`self` is
    /// unchanged either way).
    pub fn advanced(&self, bytes: &[u8]) -> Result<BoundaryTracker, RecordError> {
        let mut next = self.clone();
        next.feed(bytes)?;
        Ok(next)
    }

    /// Once the whole payload is in, the crc must match.
    fn finish_payload(&self) -> Result<(), RecordError> {
        if let Part::Body {
            crc,
            stored,
            payload_left: 0,
            ..
        } = self.part
        {
            if crc != stored {
                return Err(RecordError::BadChecksum {
                    at: self.record_start,
                    stored,
                    computed: crc,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;
    use proptest::prelude::*;

    /// Records of the given payload lengths from `start`, and each one's end.
    fn stream(start: Lsn, lens: &[usize]) -> (Vec<u8>, Vec<Lsn>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let at = Lsn(start.0 + out.len() as u64);
            out.extend(record::encode(
                at,
                Kind::DATA,
                &crate::testkit::payload(i as u64, len),
            ));
            ends.push(Lsn(start.0 + out.len() as u64));
        }
        (out, ends)
    }

    /// The last end at or below `at` (or `start`).
    fn expected_end(start: Lsn, ends: &[Lsn], at: Lsn) -> Lsn {
        ends.iter()
            .copied()
            .filter(|&e| e <= at)
            .max()
            .unwrap_or(start)
    }

    const START: Lsn = Lsn(1 << 20);

    #[test]
    fn a_header_split_byte_by_byte_is_tracked() {
        let (bytes, ends) = stream(START, &[0, 5, 100]);
        let mut t = BoundaryTracker::new(START);
        for (i, b) in bytes.iter().enumerate() {
            t.feed(std::slice::from_ref(b)).unwrap();
            let at = Lsn(START.0 + i as u64 + 1);
            assert_eq!(t.position(), at);
            assert_eq!(t.last_complete_record_end(), expected_end(START, &ends, at));
        }
        assert_eq!(t.last_complete_record_end(), *ends.last().unwrap());
    }

    #[test]
    fn a_record_is_complete_only_with_its_padding() {
        // 5 bytes of payload: tot_len 29, stream length 32.
        let (bytes, _) = stream(START, &[5]);
        let mut t = BoundaryTracker::new(START);
        t.feed(&bytes[..29]).unwrap();
        assert_eq!(t.last_complete_record_end(), START);
        t.feed(&bytes[29..31]).unwrap();
        assert_eq!(t.last_complete_record_end(), START);
        t.feed(&bytes[31..]).unwrap();
        assert_eq!(t.last_complete_record_end(), Lsn(START.0 + 32));
    }

    #[test]
    fn a_record_at_another_lsn_is_refused_when_its_header_completes() {
        let (bytes, _) = stream(Lsn(START.0 + 8), &[10]);
        let mut t = BoundaryTracker::new(START);
        t.feed(&bytes[..23]).unwrap();
        let e = t.advanced(&bytes[23..24]).unwrap_err();
        assert!(matches!(e, RecordError::WrongLsn { at: START, .. }), "{e}");
        // `advanced` left the tracker as it was.
        assert_eq!(t.position(), Lsn(START.0 + 23));
    }

    #[test]
    fn zeros_are_not_wal() {
        let t = BoundaryTracker::new(START);
        assert!(t.advanced(&[0; 24]).unwrap_err().is_zeroed());
        // Fewer than 24 zeros cannot be judged yet.
        assert!(t.advanced(&[0; 23]).is_ok());
    }

    #[test]
    fn a_payload_byte_flipped_in_a_later_piece_is_refused_at_the_record_end() {
        let (mut bytes, ends) = stream(START, &[3, 1000, 7]);
        bytes[(ends[0].0 - START.0) as usize + 500] ^= 0x40;
        let mut t = BoundaryTracker::new(START);
        t.feed(&bytes[..100]).unwrap();
        t.feed(&bytes[100..(ends[1].0 - START.0) as usize - 10])
            .unwrap();
        let e = t.advanced(&bytes[(ends[1].0 - START.0) as usize - 10..]);
        assert!(
            matches!(e, Err(RecordError::BadChecksum { at, .. }) if at == ends[0]),
            "{e:?}"
        );
        assert_eq!(t.last_complete_record_end(), ends[0]);
    }

    proptest! {
        /// Cut anywhere, fed in any pieces: the tracker ends where the
        /// records end, and after every piece reports the last record end
        /// at or below its position.
        #[test]
        fn any_cuts_track_every_record_end(
            lens in proptest::collection::vec(0usize..300, 1..20),
            cuts in proptest::collection::vec(0usize..400, 0..40),
        ) {
            let (bytes, ends) = stream(START, &lens);
            let mut t = BoundaryTracker::new(START);
            let mut off = 0;
            for c in cuts.iter().copied().chain(std::iter::once(usize::MAX)) {
                let n = c.min(bytes.len() - off);
                t.feed(&bytes[off..off + n]).unwrap();
                off += n;
                let at = Lsn(START.0 + off as u64);
                prop_assert_eq!(t.position(), at);
                prop_assert_eq!(t.last_complete_record_end(), expected_end(START, &ends, at));
                if off == bytes.len() { break; }
            }
            prop_assert_eq!(t.last_complete_record_end(), *ends.last().unwrap());
        }

        /// Any single corrupted byte of a header or payload is refused, at
        /// the latest when its record's last payload byte arrives, and the
        /// last complete record end stays at the record before it.
        #[test]
        fn any_corrupted_byte_is_refused(
            lens in proptest::collection::vec(0usize..200, 1..8),
            pos_seed in any::<usize>(),
            xor in 1u8..=255,
            cut in 1usize..64,
        ) {
            let (mut bytes, ends) = stream(START, &lens);
            // A byte covered by the crc or the header checks (not padding).
            let covered: Vec<usize> = (0..lens.len())
                .flat_map(|i| {
                    let s = if i == 0 { START } else { ends[i - 1] };
                    let s = (s.0 - START.0) as usize;
                    s..s + HEADER_LEN + lens[i]
                })
                .collect();
            let pos = covered[pos_seed % covered.len()];
            bytes[pos] ^= xor;
            let mut t = BoundaryTracker::new(START);
            let mut result = Ok(());
            for piece in bytes.chunks(cut) {
                result = t.feed(piece);
                if result.is_err() { break; }
            }
            let bad_start = ends.iter().copied().filter(|e| (e.0 - START.0) as usize <= pos)
                .max().unwrap_or(START);
            // A corrupted length may announce a record longer than the
            // stream: then it is still incomplete, not refused (as a reader
            // would call it truncated). Either way it never counts.
            let in_length = pos - ((bad_start.0 - START.0) as usize) < 4;
            prop_assert!(result.is_err() || in_length, "corruption at byte {} not refused", pos);
            prop_assert_eq!(t.last_complete_record_end(), bad_start);
        }
    }
}
