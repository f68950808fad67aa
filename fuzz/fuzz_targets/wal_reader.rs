//! `WalReader` over WAL segment files made from the fuzz input (1 MiB
//! segments, timeline 1, in a directory of this process's own).
//!
//! Input: a 9-byte preamble, then the body.
//!
//! ```text
//! byte 0     mode bits: SEED, TWO_SEGMENTS, NO_SECOND, LIMIT, CORRUPT, HIGH,
//!            BIG (bits 6 and 7 both)
//! byte 1     seeds: bits 0..3 how many (0..=7), bits 3..8 their size class
//! bytes 2..4 TWO_SEGMENTS: how many stream bytes lie in the first segment
//! bytes 4..6 LIMIT: the limit, as an offset from the start LSN
//! bytes 6..8 CORRUPT: which byte of the seeded records to flip
//! byte 8     CORRUPT: the xor mask
//! ```
//!
//! The stream is the seeded records (valid ones, encoded at their LSNs, so
//! the fuzzer starts past the first record), then the body. With one segment
//! the stream is the first bytes of a short segment file and reading starts
//! at the segment's start. With TWO_SEGMENTS the stream straddles the
//! boundary: its first part ends a full-size (sparse) segment and reading
//! starts there; NO_SECOND leaves the second file out. HIGH uses segments
//! 4095 and 4096, whose names differ in the "log" part. BIG makes seeds of
//! up to 400 KiB and multiplies the split and the limit by 32, so records
//! span segments and the stream is longer than the reader's 1 MiB chunk.
//!
//! Properties: never a panic, the reader stops, and it returns exactly what
//! a plain `record::decode` loop over the same bytes returns (records, the
//! reason it stops, where); positions increase and are 8-byte aligned; a
//! limit gives a prefix, and lifting it continues to the same end; a flipped
//! byte of a seeded record ends the WAL exactly there.

#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use walden::lsn::segment_file_name;
use walden::record::{self, Kind, RecordError, HEADER_LEN};
use walden::testkit;
use walden::wal::reader::{EndOfWal, OwnedRecord, WalReader};
use walden::Lsn;

const SEG: u64 = 1 << 20;
const TIMELINE: u32 = 1;

const SEED: u8 = 0x01;
const TWO_SEGMENTS: u8 = 0x02;
const NO_SECOND: u8 = 0x04;
const LIMIT: u8 = 0x08;
const CORRUPT: u8 = 0x10;
const HIGH: u8 = 0x20;
/// Both bits: large inputs cost milliseconds, so they are a quarter of them.
const BIG: u8 = 0xC0;

const PREAMBLE: usize = 9;

fn wal_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = PathBuf::from("/dev/shm");
        let base = if base.is_dir() {
            base
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("walden-fuzz-wal_reader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz WAL directory");
        dir
    })
}

/// One seeded record: where it is in the stream and what it holds.
struct Seed {
    offset: usize,
    tot_len: usize,
    record: OwnedRecord,
}

fuzz_target!(|data: &[u8]| {
    let Some((pre, body)) = data.split_first_chunk::<PREAMBLE>() else {
        return;
    };
    let mode = pre[0];
    let u16_at = |i: usize| u16::from_le_bytes([pre[i], pre[i + 1]]) as usize;

    // BIG scales sizes and offsets so that records span segments and the
    // reader goes more than its 1 MiB read chunk past where it started.
    let scale = if mode & BIG == BIG { 4096 } else { 1 };

    // Seed payload lengths first: a record's stream length does not depend
    // on its LSN, and the start LSN depends on the stream's length.
    let mut seed_lens = Vec::new();
    let mut seeds_len = 0usize;
    if mode & SEED != 0 {
        let class = (pre[1] >> 3) as usize;
        for i in 0..(pre[1] & 7) as usize {
            let len = (class * 37 + i * 101) % (64 + class * 24) * scale % (400 << 10);
            if seeds_len >= 3 * SEG as usize / 2 {
                break;
            }
            seed_lens.push(len);
            seeds_len += record::stream_len(len) as usize;
        }
    }
    let total = seeds_len + body.len();

    let first_segno = if mode & HIGH != 0 { 4095 } else { 1 };
    let two = mode & TWO_SEGMENTS != 0;
    // Bytes of the stream in the first segment (all of them with one).
    let (split, stream_len) = if two {
        let split = (u16_at(2) * scale.min(32) % (total + 1)).min(SEG as usize) & !7;
        (split, total.min(split + SEG as usize))
    } else {
        let len = total.min(SEG as usize);
        (len, len)
    };
    let start = if two {
        (first_segno + 1) * SEG - split as u64
    } else {
        first_segno * SEG
    };

    let mut stream = Vec::with_capacity(stream_len);
    let mut seeds = Vec::new();
    for (i, &len) in seed_lens.iter().enumerate() {
        let lsn = Lsn(start + stream.len() as u64);
        let kind = Kind(1 + (i as u8 * 41) % 255);
        // Random bytes, repeated: large payloads stay cheap to make.
        let mut payload = testkit::payload(lsn.0 ^ i as u64, len.min(509));
        while payload.len() < len {
            payload.extend_from_within(..(len - payload.len()).min(payload.len()));
        }
        seeds.push(Seed {
            offset: stream.len(),
            tot_len: HEADER_LEN + len,
            record: OwnedRecord {
                lsn,
                kind,
                flags: 0,
                payload: payload.clone(),
            },
        });
        stream.extend_from_slice(&record::encode(lsn, kind, &payload));
    }
    stream.extend_from_slice(body);
    stream.truncate(stream_len);

    // The flipped byte, and the seeded record it falls in (not its padding).
    let mut broken_seed = None;
    if mode & CORRUPT != 0 && seeds_len > 0 {
        let at = u16_at(6) * scale.min(32) % seeds_len;
        let mask = if pre[8] == 0 { 0x80 } else { pre[8] };
        if at < stream.len() {
            stream[at] ^= mask;
            broken_seed = seeds
                .iter()
                .position(|s| (s.offset..s.offset + s.tot_len).contains(&at));
        }
    }

    // The files.
    let dir = wal_dir();
    let first = dir.join(segment_file_name(TIMELINE, first_segno, SEG));
    let second = dir.join(segment_file_name(TIMELINE, first_segno + 1, SEG));
    for path in [&first, &second] {
        let _ = std::fs::remove_file(path);
    }
    let visible: &[u8] = if two {
        let f = File::create(&first).expect("create segment");
        f.set_len(SEG).expect("size segment");
        f.write_all_at(&stream[..split], SEG - split as u64)
            .expect("write segment");
        if mode & NO_SECOND != 0 {
            &stream[..split]
        } else {
            std::fs::write(&second, &stream[split..]).expect("write segment");
            &stream
        }
    } else {
        std::fs::write(&first, &stream).expect("write segment");
        &stream
    };

    // What the reader must find: a plain decode loop over the same bytes.
    let (model, model_end, model_pos) = decode_loop(visible, start);

    // The whole WAL, no limit.
    let mut reader = WalReader::new(dir, SEG, TIMELINE, Lsn(start), None);
    let got = read_all(&mut reader, visible, start);
    assert_eq!(got, model, "the reader and a decode loop disagree");
    assert_eq!(reader.position(), model_pos);
    let end = reader.end().cloned().expect("stopped without saying why");
    match &end {
        EndOfWal::Invalid(e) => assert_eq!(e, &model_end, "ends for another reason"),
        EndOfWal::MissingSegment { at, .. } => {
            // Only the last file's end can cut a header short here.
            assert!(
                matches!(
                    model_end,
                    RecordError::Truncated {
                        need: HEADER_LEN,
                        ..
                    }
                ),
                "missing segment at {at}, but the bytes say {model_end}"
            );
        }
        EndOfWal::Limit(l) => panic!("stopped at a limit {l} without one"),
    }
    assert!(reader.next_record().unwrap().is_none(), "read past the end");

    // The seeded records that are whole in the visible bytes come first,
    // and one with a flipped byte is the end, exactly there.
    let whole_seeds = seeds
        .iter()
        .take_while(|s| s.offset + s.tot_len <= visible.len())
        .count();
    let intact = broken_seed.map_or(whole_seeds, |j| j.min(whole_seeds));
    for (i, s) in seeds[..intact].iter().enumerate() {
        assert_eq!(
            got.get(i),
            Some(&s.record),
            "valid seeded record {i} not returned"
        );
    }
    if let Some(j) = broken_seed.filter(|&j| j <= whole_seeds) {
        assert_eq!(
            got.len(),
            j,
            "a corrupted record at index {j} did not end the WAL"
        );
        assert_eq!(reader.position(), seeds[j].record.lsn);
    }

    // Under a limit: a prefix of the same records, then the same end once
    // the limit is lifted.
    if mode & LIMIT != 0 {
        let limit = Lsn(start + (u16_at(4) * scale.min(32)) as u64);
        let mut reader = WalReader::new(dir, SEG, TIMELINE, Lsn(start), Some(limit));
        let before = read_all(&mut reader, visible, start);
        let whole = model
            .iter()
            .take_while(|r| r.lsn.0 + (HEADER_LEN + r.payload.len()) as u64 <= limit.0)
            .count();
        assert_eq!(&before[..], &model[..whole], "a limit gave another prefix");
        let limited_end = reader.end().cloned().expect("stopped without saying why");
        if whole < model.len() {
            assert_eq!(limited_end, EndOfWal::Limit(limit));
        } else {
            assert!(limited_end == EndOfWal::Limit(limit) || limited_end == end);
        }
        reader.set_limit(None);
        let after = read_all(&mut reader, visible, start);
        assert_eq!(
            &after[..],
            &model[whole..],
            "lifting the limit lost records"
        );
        assert_eq!(reader.end(), Some(&end));
        assert_eq!(reader.position(), model_pos);
    }
});

/// The records a decode loop finds in `bytes` (the stream from `start`),
/// why it stops, and where.
fn decode_loop(bytes: &[u8], start: u64) -> (Vec<OwnedRecord>, RecordError, Lsn) {
    let mut records = Vec::new();
    let mut off = 0usize;
    loop {
        let at = Lsn(start + off as u64);
        match record::decode(bytes.get(off..).unwrap_or(&[]), at) {
            Ok((hdr, payload)) => {
                records.push(OwnedRecord {
                    lsn: at,
                    kind: hdr.kind,
                    flags: hdr.flags,
                    payload: payload.to_vec(),
                });
                off += hdr.stream_len() as usize;
            }
            Err(e) => return (records, e, at),
        }
    }
}

/// Reads until the reader stops, checking each record on the way.
fn read_all(reader: &mut WalReader, visible: &[u8], start: u64) -> Vec<OwnedRecord> {
    let mut out: Vec<OwnedRecord> = Vec::new();
    // Every record takes at least 24 bytes of the stream: a reader that
    // returns more than this is not stopping.
    let most = visible.len() / HEADER_LEN + 1;
    while let Some(r) = reader.next_record().expect("I/O error on a local file") {
        let r = r.to_owned();
        assert_eq!(r.lsn.0 % 8, 0, "record at {} not 8-byte aligned", r.lsn);
        if let Some(prev) = out.last() {
            assert!(r.lsn > prev.lsn, "positions do not increase");
        }
        let off = (r.lsn.0 - start) as usize;
        let (hdr, payload) = record::decode(&visible[off..], r.lsn)
            .unwrap_or_else(|e| panic!("returned a record that does not decode: {e}"));
        assert_eq!(
            (hdr.kind, hdr.flags, payload),
            (r.kind, r.flags, &r.payload[..])
        );
        out.push(r);
        assert!(out.len() <= most, "the reader does not stop");
    }
    out
}
