//! `protocol::decode` and the incremental `protocol::Decoder`, both
//! directions, on an arbitrary byte stream delivered in arbitrary pieces.
//!
//! Input: a 6-byte preamble, the piece sizes, then the stream.
//!
//! ```text
//! byte 0     bit 0: ToClient (else ToServer); bit 1: the limits below (else
//!            Limits::default()); bits 4..8: how many piece-size bytes follow
//! bytes 1..3 max_frame_size - 16 (u16)
//! byte 3     max_records_per_frame
//! bytes 4..6 max_record_size (u16)
//! then       piece sizes, one byte each (bit 7: times 64), used in turn
//! ```
//!
//! Properties: never a panic; the decoder never buffers more than
//! `max_frame_size` and never stalls with input left; it yields exactly what
//! repeated `decode` calls over the whole stream yield, however the stream is
//! cut; every accepted frame re-encodes (through `to_frame` and `encode`) to
//! the bytes it came from and decodes again to an equal frame; every error
//! carries a documented code and the frame's request id; after an error that
//! closes the connection, the decoder repeats it and drops further input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walden::protocol::{
    decode, encode, Decoder, Direction, ErrorCode, Frame, Limits, ProtocolError, HEADER_LEN,
};

const TO_CLIENT: u8 = 0x01;
const OWN_LIMITS: u8 = 0x02;
const PREAMBLE: usize = 6;

fuzz_target!(|data: &[u8]| {
    let Some((pre, rest)) = data.split_first_chunk::<PREAMBLE>() else {
        return;
    };
    let direction = if pre[0] & TO_CLIENT != 0 {
        Direction::ToClient
    } else {
        Direction::ToServer
    };
    let limits = if pre[0] & OWN_LIMITS != 0 {
        Limits {
            // Below 16 bytes not even a header fits: a decoder so
            // configured can never make progress, which is not its fault.
            max_frame_size: HEADER_LEN as u32 + u32::from(u16::from_le_bytes([pre[1], pre[2]])),
            max_records_per_frame: u32::from(pre[3]),
            max_record_size: u32::from(u16::from_le_bytes([pre[4], pre[5]])),
        }
    } else {
        Limits::default()
    };
    let n_sizes = ((pre[0] >> 4) as usize).min(rest.len());
    let (size_bytes, stream) = rest.split_at(n_sizes);
    let sizes: Vec<usize> = if size_bytes.is_empty() {
        vec![stream.len().max(1)]
    } else {
        size_bytes
            .iter()
            .map(|&b| ((b & 0x7F) as usize + 1) * if b & 0x80 != 0 { 64 } else { 1 })
            .collect()
    };

    let expected = decode_all(stream, direction, &limits);
    let got = decode_in_pieces(stream, &sizes, direction, &limits);
    assert_eq!(got, expected, "the decoder and decode disagree");
});

type Outcome = Result<Frame, ProtocolError>;

/// Repeated `decode` over the whole stream: frames and errors in order,
/// stopping at the first error that closes the connection or when more bytes
/// are needed.
fn decode_all(stream: &[u8], direction: Direction, limits: &Limits) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut off = 0;
    loop {
        let rest = &stream[off..];
        match decode(rest, direction, limits) {
            Ok(Some((frame, len))) => {
                assert!((HEADER_LEN..=rest.len()).contains(&len));
                assert!(len <= limits.max_frame_size as usize);
                let frame = frame.to_frame();
                check_canonical(&frame, &rest[..len], direction, limits);
                out.push(Ok(frame));
                off += len;
            }
            Ok(None) => {
                if let Some(h) = rest.first_chunk::<HEADER_LEN>() {
                    let len = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
                    assert!(len > rest.len(), "gave up on a whole frame");
                    assert!(
                        len <= limits.max_frame_size as usize,
                        "waits for an oversized frame"
                    );
                }
                return out;
            }
            Err(e) => {
                check_error(&e, rest);
                let closes = e.closes_connection();
                out.push(Err(e));
                if closes {
                    return out;
                }
                // Only a whole frame can fail without closing: skip it.
                off += u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                assert!(off <= stream.len());
            }
        }
    }
}

/// The same stream through a `Decoder`, `sizes` bytes at a time (cycled).
fn decode_in_pieces(
    stream: &[u8],
    sizes: &[usize],
    direction: Direction,
    limits: &Limits,
) -> Vec<Outcome> {
    let max = limits.max_frame_size as usize;
    let mut d = Decoder::new(direction, *limits);
    let mut out = Vec::new();
    let mut at = 0;
    for &size in sizes.iter().cycle() {
        if at == stream.len() {
            break;
        }
        let mut piece = &stream[at..stream.len().min(at + size)];
        at += piece.len();
        while !piece.is_empty() {
            let took = d.extend(piece);
            assert!(took <= piece.len());
            piece = &piece[took..];
            assert!(d.buffered() <= max, "buffers {} > {max}", d.buffered());
            let mut progressed = took > 0;
            loop {
                match d.next_frame() {
                    Ok(Some(frame)) => {
                        out.push(Ok(frame.to_frame()));
                        progressed = true;
                    }
                    Ok(None) => break,
                    Err(e) if e.closes_connection() => {
                        // The stream is no longer in step: the same error
                        // again, and input is dropped.
                        assert_eq!(d.next_frame().err().as_ref(), Some(&e));
                        let left = &stream[at - piece.len()..];
                        assert_eq!(d.extend(left), left.len());
                        assert_eq!(d.next_frame().err().as_ref(), Some(&e));
                        out.push(Err(e));
                        return out;
                    }
                    Err(e) => {
                        out.push(Err(e));
                        progressed = true;
                    }
                }
            }
            assert!(
                progressed,
                "the decoder stalls with {} bytes buffered",
                d.buffered()
            );
        }
    }
    out
}

/// An accepted frame is encoded in exactly one way.
fn check_canonical(frame: &Frame, bytes: &[u8], direction: Direction, limits: &Limits) {
    let mut again = Vec::new();
    encode(frame, &mut again);
    assert_eq!(
        &again[..],
        bytes,
        "the frame does not re-encode to its bytes"
    );
    let (back, len) = decode(&again, direction, limits)
        .expect("a re-encoded frame is refused")
        .expect("a re-encoded frame is incomplete");
    assert_eq!(len, again.len());
    assert_eq!(
        &back.to_frame(),
        frame,
        "the re-encoded frame decodes to another"
    );
}

fn check_error(e: &ProtocolError, bytes: &[u8]) {
    assert!(
        ErrorCode::ALL.contains(&e.code()),
        "undocumented code {:?}",
        e.code()
    );
    let header = bytes
        .first_chunk::<HEADER_LEN>()
        .expect("judged a frame before its header");
    assert_eq!(
        e.request_id,
        u64::from_le_bytes(header[8..16].try_into().unwrap())
    );
    // The answer the server would send is a valid frame for the client.
    let mut answer = Vec::new();
    encode(&e.to_frame(), &mut answer);
    assert!(matches!(
        decode(&answer, Direction::ToClient, &Limits::default()),
        Ok(Some((_, n))) if n == answer.len()
    ));
}
