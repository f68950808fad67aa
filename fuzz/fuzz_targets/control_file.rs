//! `ControlFile::decode` (the page store's `walden.control`, 512 bytes with
//! a crc32c: src/store/control.rs, page-store.md §5) on arbitrary bytes, and
//! on a valid control file with bytes xored.
//!
//! Input: byte 0 selects the mode, the rest is its body.
//!
//! ```text
//! byte 0  bit 7 clear: ARBITRARY, the body is the file. Bits 0..4 are
//!         helpers that let the fuzzer past the checks it cannot guess,
//!         applied in this order: SIZE cuts or zero-pads the body to 512
//!         bytes, MAGIC and VERSION write those fields, RESEAL writes the
//!         crc of bytes 0..508 (computed here with the `crc32c` crate, not
//!         with walden's code).
//!         bit 7 set: MUTATE. Bits 0..2 pick one of four valid control
//!         files (`BASES`); the body is mutations of 3 bytes each, a
//!         position (u16, little endian, modulo 512) and an xor mask.
//!         Nothing is fixed up afterwards.
//! ```
//!
//! Properties: never a panic; `decode` accepts exactly the files the layout
//! allows (512 bytes, the magic, a matching crc32c of bytes 0..508, version
//! 1, a known state, `full_page_writes` 0 or 1, reserved bytes zero), as
//! checked here independently of walden's code, and reads every field from
//! its documented offset; an error names the check that failed (size, magic
//! and crc first: the fields are not trusted before them); an accepted file
//! re-encodes (`encode`) to exactly its bytes and decodes again to an equal
//! value. With MUTATE: an unchanged file decodes to the value encoded; a
//! changed one is refused, or (when the masks happen to reseal the crc)
//! re-encodes to exactly its bytes; a change the crc is certain to catch (at
//! most 5 bits, or all within 4 bytes) is always refused.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walden::store::control::{ClusterState, ControlFile, CONTROL_SIZE, CONTROL_VERSION};
use walden::Lsn;

const MUTATE: u8 = 0x80;
const FIX_SIZE: u8 = 0x01;
const FIX_MAGIC: u8 = 0x02;
const FIX_VERSION: u8 = 0x04;
const RESEAL: u8 = 0x08;

/// page-store.md §5, not walden's constants.
const MAGIC: &[u8; 8] = b"WALDNCTL";
const CRC_AT: usize = 508;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    if mode & MUTATE != 0 {
        mutate(&BASES[(mode & 3) as usize], body);
    } else {
        arbitrary(mode, body);
    }
});

fn arbitrary(mode: u8, body: &[u8]) {
    let mut b = body.to_vec();
    if mode & FIX_SIZE != 0 {
        b.resize(CONTROL_SIZE, 0);
    }
    if mode & FIX_MAGIC != 0 && b.len() >= 8 {
        b[0..8].copy_from_slice(MAGIC);
    }
    if mode & FIX_VERSION != 0 && b.len() >= 12 {
        b[8..12].copy_from_slice(&CONTROL_VERSION.to_le_bytes());
    }
    if mode & RESEAL != 0 && b.len() == CONTROL_SIZE {
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    }
    check(&b);
}

fn mutate(base: &ControlFile, body: &[u8]) {
    let clean = base.encode();
    assert_eq!(ControlFile::decode(&clean), Ok(*base), "no round trip");
    let mut b = clean;
    for m in body.chunks_exact(3) {
        let pos = u16::from_le_bytes([m[0], m[1]]) as usize % CONTROL_SIZE;
        b[pos] ^= m[2];
    }
    let got = check(&b);
    let changed: Vec<usize> = (0..CONTROL_SIZE).filter(|&i| b[i] != clean[i]).collect();
    let Some((&first, &last)) = changed.first().zip(changed.last()) else {
        assert_eq!(
            got,
            Some(*base),
            "an unchanged file decodes to another value"
        );
        return;
    };
    // Certain for a crc of 32 bits: every burst of up to 32 bits. And
    // CRC-32C has Hamming distance 6 up to 5243 data bits, 4064 here
    // (Koopman, "32-Bit Cyclic Redundancy Codes for Internet Applications",
    // 2002): every change of up to 5 bits.
    let bits: u32 = changed
        .iter()
        .map(|&i| (b[i] ^ clean[i]).count_ones())
        .sum();
    if bits <= 5 || last - first < 4 {
        assert!(
            got.is_none(),
            "accepted a file with {bits} bits changed in bytes {first}..={last}"
        );
    }
}

/// Decodes `b`, checks it against the layout, and returns what was accepted.
fn check(b: &[u8]) -> Option<ControlFile> {
    match (ControlFile::decode(b), layout(b)) {
        (Ok(c), Ok(want)) => {
            assert_eq!(c, want, "a field is not read from its documented offset");
            let again = c.encode();
            assert_eq!(
                &again[..],
                b,
                "an accepted file does not re-encode to its bytes"
            );
            assert_eq!(
                ControlFile::decode(&again),
                Ok(c),
                "its re-encoding decodes to another value"
            );
            Some(c)
        }
        (Err(e), Err(failed)) => {
            let first = failed[0];
            let named: Vec<Check> = ALL.into_iter().filter(|c| e.contains(c.word())).collect();
            if matches!(first, Check::Size | Check::Magic | Check::Crc) {
                assert_eq!(
                    named,
                    [first],
                    "the {first:?} check failed first, the error says: {e}"
                );
            } else {
                assert!(
                    named.len() == 1 && failed.contains(&named[0]),
                    "{failed:?} failed, the error says: {e}"
                );
            }
            None
        }
        (Ok(c), Err(failed)) => panic!("accepted a file that fails {failed:?}: {c:?}"),
        (Err(e), Ok(want)) => panic!("refused a valid file ({e}): {want:?}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Check {
    Size,
    Magic,
    Crc,
    Version,
    State,
    Reserved,
}

const ALL: [Check; 6] = [
    Check::Size,
    Check::Magic,
    Check::Crc,
    Check::Version,
    Check::State,
    Check::Reserved,
];

impl Check {
    /// The word an error for this check contains (and no other's word).
    fn word(self) -> &'static str {
        match self {
            Check::Size => "expected 512",
            Check::Magic => "magic",
            Check::Crc => "checksum",
            Check::Version => "version",
            Check::State => "state",
            Check::Reserved => "reserved",
        }
    }
}

/// The control file page-store.md §5 describes, read from `b` without
/// walden's decoder: its fields, or every check it fails, in order.
fn layout(b: &[u8]) -> Result<ControlFile, Vec<Check>> {
    if b.len() != 512 {
        return Err(vec![Check::Size]);
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let state = match u32_at(12) {
        0 => Some(ClusterState::StartingUp),
        1 => Some(ClusterState::ShutDown),
        2 => Some(ClusterState::ShuttingDown),
        3 => Some(ClusterState::InCrashRecovery),
        4 => Some(ClusterState::InProduction),
        _ => None,
    };
    let failed: Vec<Check> = [
        (Check::Magic, &b[0..8] == MAGIC),
        (Check::Crc, u32_at(CRC_AT) == crc32c::crc32c(&b[..CRC_AT])),
        (Check::Version, u32_at(8) == 1),
        (Check::State, state.is_some()),
        // full_page_writes is a boolean byte: 2..=255 are as wrong as a
        // non-zero reserved byte.
        (
            Check::Reserved,
            b[92] <= 1 && b[93..CRC_AT].iter().all(|&x| x == 0),
        ),
    ]
    .into_iter()
    .filter(|&(_, ok)| !ok)
    .map(|(c, _)| c)
    .collect();
    if !failed.is_empty() {
        return Err(failed);
    }
    Ok(ControlFile {
        system_identifier: u64_at(16),
        state: state.unwrap(),
        time: u64_at(24),
        checkpoint: Lsn(u64_at(32)),
        redo: Lsn(u64_at(40)),
        timeline: u32_at(48),
        prev_timeline: u32_at(52),
        checkpoint_time: u64_at(56),
        min_recovery_point: Lsn(u64_at(64)),
        wal_segment_size: u64_at(72),
        block_size: u32_at(80),
        wal_block_size: u32_at(84),
        data_checksum_version: u32_at(88),
        full_page_writes: b[92] == 1,
    })
}

/// The valid files MUTATE starts from: a new store, one in production, one
/// shut down with every field at its largest, one in crash recovery with
/// every field zero (the decoder judges no field but the state).
const BASES: [ControlFile; 4] = [
    ControlFile {
        system_identifier: 0x6A1B_2C3D_0004_D2A7,
        state: ClusterState::StartingUp,
        time: 1_780_000_000,
        checkpoint: Lsn(0),
        redo: Lsn(0),
        timeline: 1,
        prev_timeline: 1,
        checkpoint_time: 0,
        min_recovery_point: Lsn(0),
        wal_segment_size: 16 << 20,
        block_size: 8192,
        wal_block_size: 4096,
        data_checksum_version: 1,
        full_page_writes: true,
    },
    ControlFile {
        system_identifier: 0x6A1B_2C3D_0004_D2A7,
        state: ClusterState::InProduction,
        time: 1_780_000_900,
        checkpoint: Lsn(0x16_B374_D848),
        redo: Lsn(0x16_B374_0028),
        timeline: 1,
        prev_timeline: 1,
        checkpoint_time: 1_780_000_899,
        min_recovery_point: Lsn(0),
        wal_segment_size: 64 << 20,
        block_size: 8192,
        wal_block_size: 4096,
        data_checksum_version: 0,
        full_page_writes: false,
    },
    ControlFile {
        system_identifier: u64::MAX,
        state: ClusterState::ShutDown,
        time: u64::MAX,
        checkpoint: Lsn(u64::MAX),
        redo: Lsn(u64::MAX),
        timeline: u32::MAX,
        prev_timeline: u32::MAX,
        checkpoint_time: u64::MAX,
        min_recovery_point: Lsn(u64::MAX),
        wal_segment_size: u64::MAX,
        block_size: u32::MAX,
        wal_block_size: u32::MAX,
        data_checksum_version: u32::MAX,
        full_page_writes: true,
    },
    ControlFile {
        system_identifier: 0,
        state: ClusterState::InCrashRecovery,
        time: 0,
        checkpoint: Lsn(0),
        redo: Lsn(0),
        timeline: 0,
        prev_timeline: 0,
        checkpoint_time: 0,
        min_recovery_point: Lsn(0),
        wal_segment_size: 0,
        block_size: 0,
        wal_block_size: 0,
        data_checksum_version: 0,
        full_page_writes: false,
    },
];
