//! Log sequence numbers: 64-bit byte positions in the WAL stream.
//!
//! An [`Lsn`] is printed and parsed as PostgreSQL does (`16/B374D848`: the high
//! and low 32 bits in upper-case hex, no padding). Segment file names are
//! PostgreSQL's 24 hex digits: timeline, "log" (the high 32 bits of the
//! segment's start LSN) and segment number within that log, each `%08X`.

use std::fmt;
use std::str::FromStr;

/// A byte position in the WAL stream. `Lsn(0)` is never a valid record
/// position (as `InvalidXLogRecPtr` in PostgreSQL): the stream starts at the
/// first byte of segment 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// The segment number containing this LSN.
    pub fn segno(self, segment_size: u64) -> u64 {
        self.0 / segment_size
    }

    /// Offset of this LSN within its segment.
    pub fn segment_offset(self, segment_size: u64) -> u64 {
        self.0 % segment_size
    }

    pub fn align_down(self, to: u64) -> Lsn {
        Lsn(self.0 - self.0 % to)
    }

    pub fn align_up(self, to: u64) -> Lsn {
        Lsn(self.0.div_ceil(to) * to)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 as u32)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {0:?}: expected two hex numbers separated by '/', like 16/B374D848")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

/// PostgreSQL's `XLogFileName`: `%08X%08X%08X` of timeline, log, segment.
pub fn segment_file_name(timeline: u32, segno: u64, segment_size: u64) -> String {
    let segs_per_log = 0x1_0000_0000u64 / segment_size;
    format!(
        "{:08X}{:08X}{:08X}",
        timeline,
        segno / segs_per_log,
        segno % segs_per_log
    )
}

/// Parses a segment file name back into (timeline, segno). `None` for any
/// name that is not exactly 24 upper-case hex digits of a valid segment.
pub fn parse_segment_file_name(name: &str, segment_size: u64) -> Option<(u32, u64)> {
    if name.len() != 24
        || !name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let segs_per_log = 0x1_0000_0000u64 / segment_size;
    if seg >= segs_per_log {
        return None;
    }
    Some((tli, log * segs_per_log + seg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prints_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0x100_0000).to_string(), "0/1000000");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/1000028".parse::<Lsn>(), Ok(Lsn(0x100_0028)));
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("/1".parse::<Lsn>().is_err());
        assert!("1/".parse::<Lsn>().is_err());
        assert!("1/123456789".parse::<Lsn>().is_err());
        assert!("G/1".parse::<Lsn>().is_err());
    }

    proptest! {
        #[test]
        fn text_round_trip(v in any::<u64>()) {
            let lsn = Lsn(v);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
            prop_assert_eq!(lsn.to_string().to_lowercase().parse::<Lsn>().unwrap(), lsn);
        }

        #[test]
        fn segment_name_round_trip(tli in 1u32..100, shift in 20u32..=30, lsn in any::<u64>()) {
            let size = 1u64 << shift;
            let segno = Lsn(lsn).segno(size);
            let name = segment_file_name(tli, segno, size);
            prop_assert_eq!(parse_segment_file_name(&name, size), Some((tli, segno)));
        }
    }

    /// Cases checked against PostgreSQL's `pg_walfile_name()` and the file
    /// names it creates (`SELECT pg_walfile_name('16/B374D848')` with 16 MiB
    /// segments is `0000000100000016000000B3`).
    #[test]
    fn segment_names_match_postgres() {
        let mib = 1u64 << 20;
        let name = |tli, lsn: &str, size| {
            let lsn: Lsn = lsn.parse().unwrap();
            segment_file_name(tli, lsn.segno(size), size)
        };
        assert_eq!(name(1, "16/B374D848", 16 * mib), "0000000100000016000000B3");
        assert_eq!(name(1, "0/1000000", 16 * mib), "000000010000000000000001");
        assert_eq!(name(1, "0/FFFFFFF", 16 * mib), "00000001000000000000000F");
        assert_eq!(name(1, "1/0", 16 * mib), "000000010000000100000000");
        assert_eq!(name(2, "0/3000060", 16 * mib), "000000020000000000000003");
        // 1 GiB segments: four per log.
        assert_eq!(
            name(1, "5/C0000000", 1024 * mib),
            "000000010000000500000003"
        );
        // 1 MiB segments: 4096 per log.
        assert_eq!(name(1, "0/FFF00000", mib), "000000010000000000000FFF");
        assert_eq!(name(1, "A/00100000", mib), "000000010000000A00000001");
        // 64 MiB segments (initdb --wal-segsize=64).
        assert_eq!(name(1, "0/4000000", 64 * mib), "000000010000000000000001");
        assert_eq!(
            parse_segment_file_name("000000010000000000000001.partial", 16 * mib),
            None
        );
        assert_eq!(
            parse_segment_file_name("00000001000000000000001g", 16 * mib),
            None
        );
        assert_eq!(
            parse_segment_file_name("000000010000000000000100", 16 * mib),
            None
        );
    }
}
