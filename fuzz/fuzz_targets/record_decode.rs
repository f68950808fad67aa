//! `record::decode` (and `decode_header` / `verify_payload`, which it is made
//! of) on arbitrary bytes read at an arbitrary LSN.
//!
//! Input: byte 0 selects helpers, bytes 1..9 are the LSN `at` (little
//! endian), the rest is what the reader found at `at`. The helpers let the
//! fuzzer past the two checks it cannot guess: bit 0 writes `at` into the
//! record's own-LSN field, bit 1 reseals the crc (computed here with the
//! `crc32c` crate, not with walden's code).
//!
//! Properties: never a panic; `decode` agrees with `decode_header` followed
//! by `verify_payload`; an error names `at`; an accepted record re-encodes to
//! exactly the bytes it was decoded from, up to `tot_len`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walden::record::{self, Header, Kind, RecordError, HEADER_LEN, MAX_TOTAL_LEN};
use walden::Lsn;

const FIX_LSN: u8 = 0x01;
const FIX_CRC: u8 = 0x02;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((lsn_bytes, bytes)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let at = Lsn(u64::from_le_bytes(*lsn_bytes));
    let mut buf = bytes.to_vec();
    if mode & FIX_LSN != 0 && buf.len() >= 16 {
        buf[8..16].copy_from_slice(&at.0.to_le_bytes());
    }
    if mode & FIX_CRC != 0 {
        reseal(&mut buf);
    }
    check(&buf, at);
});

/// Writes the crc the header and payload call for, when `tot_len` fits.
fn reseal(buf: &mut [u8]) {
    if buf.len() < HEADER_LEN {
        return;
    }
    let tot_len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    if tot_len < HEADER_LEN || tot_len > buf.len() {
        return;
    }
    let crc = crc32c::crc32c(&buf[0..4]);
    let crc = crc32c::crc32c_append(crc, &buf[8..HEADER_LEN]);
    let crc = crc32c::crc32c_append(crc, &buf[HEADER_LEN..tot_len]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// `decode` spelled out from its documented parts.
fn decode_in_steps(buf: &[u8], at: Lsn) -> Result<(Header, &[u8]), RecordError> {
    let Some(hdr_bytes) = buf.first_chunk::<HEADER_LEN>() else {
        return Err(RecordError::Truncated {
            at,
            need: HEADER_LEN,
            have: buf.len(),
        });
    };
    let hdr = record::decode_header(hdr_bytes, at)?;
    let Some(payload) = buf.get(HEADER_LEN..hdr.tot_len as usize) else {
        return Err(RecordError::Truncated {
            at,
            need: hdr.tot_len as usize,
            have: buf.len(),
        });
    };
    record::verify_payload(hdr_bytes, &hdr, payload)?;
    Ok((hdr, payload))
}

fn check(buf: &[u8], at: Lsn) {
    let got = record::decode(buf, at);
    assert_eq!(
        got,
        decode_in_steps(buf, at),
        "decode and its parts disagree"
    );
    match got {
        Ok((hdr, payload)) => {
            let tot_len = hdr.tot_len as usize;
            assert_eq!(hdr.lsn, at);
            assert_ne!(hdr.kind, Kind(0));
            assert!((HEADER_LEN..=MAX_TOTAL_LEN as usize).contains(&tot_len));
            assert_eq!(payload.len(), tot_len - HEADER_LEN);
            assert_eq!(hdr.stream_len(), (tot_len as u64).div_ceil(8) * 8);
            // The header is rebuilt exactly from its fields and the payload.
            let mut again = [0u8; HEADER_LEN];
            record::encode_header(&mut again, at, hdr.kind, hdr.flags, hdr.raw_len, payload);
            assert_eq!(&again[..], &buf[..HEADER_LEN], "header does not re-encode");
            // What every writer writes today: flags 0, raw_len 0.
            if hdr.flags == 0 {
                let whole = record::encode(at, hdr.kind, payload);
                assert_eq!(whole.len() as u64, hdr.stream_len());
                assert_eq!(
                    &whole[..tot_len],
                    &buf[..tot_len],
                    "record does not re-encode"
                );
                assert!(whole[tot_len..].iter().all(|&b| b == 0), "padding not zero");
            }
        }
        Err(e) => {
            assert_eq!(e.lsn(), at, "error names another LSN: {e}");
            let zeroed = buf.len() >= HEADER_LEN && buf[0..4] == [0; 4];
            assert_eq!(e.is_zeroed(), zeroed, "{e}");
            assert!(!e.to_string().is_empty());
        }
    }
}
