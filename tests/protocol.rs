//! The wire protocol through its public API: every frame round-trips, the
//! incremental decoder yields the same frames however the bytes are cut, and
//! no input (random, or a valid frame mutated) panics or escapes the error
//! codes docs/protocol.md lists.

use proptest::prelude::*;
use walden::protocol::{
    decode, encode, encode_ack, encode_append, encode_backup_pages, encode_indeterminate,
    encode_records, encode_wal_data, Decoder, Direction, ErrorCode, Frame, FrameType,
    IndeterminateReason, Limits, Record, RecordRef, SlotOp, HEADER_LEN, MAX_LABEL_LEN,
    MAX_NAME_LEN, PAGE_SIZE,
};
use walden::{Durability, Kind, Lsn};

fn bytes_of(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        encode(f, &mut out);
    }
    out
}

fn direction_of(bytes: &[u8]) -> Direction {
    FrameType::from_u8(bytes[4]).unwrap().direction()
}

/// Decodes exactly one whole frame.
fn round_trip(frame: &Frame) -> Frame {
    let bytes = bytes_of(std::slice::from_ref(frame));
    let (got, len) = decode(&bytes, direction_of(&bytes), &Limits::default())
        .unwrap()
        .expect("a whole frame");
    assert_eq!(len, bytes.len());
    assert_eq!(got.request_id(), frame.request_id());
    got.to_frame()
}

/// Feeds `bytes` to a decoder in pieces of the given sizes (cycled).
fn decode_in_pieces(bytes: &[u8], direction: Direction, sizes: &[usize]) -> Vec<Frame> {
    let mut d = Decoder::new(direction, Limits::default());
    let (mut frames, mut at) = (Vec::new(), 0);
    for size in sizes.iter().cycle() {
        if at == bytes.len() {
            break;
        }
        let piece = &bytes[at..bytes.len().min(at + size)];
        at += d.extend(piece);
        while let Some(f) = d.next_frame().unwrap() {
            frames.push(f.to_frame());
        }
    }
    assert_eq!(d.buffered(), 0);
    frames
}

fn record(lsn: u64, kind: u8, payload: &[u8]) -> Record {
    Record {
        lsn: Lsn(lsn),
        kind: Kind(kind),
        payload: payload.to_vec(),
    }
}

/// One frame of every type, some in more than one shape.
fn examples() -> Vec<Frame> {
    vec![
        Frame::Hello {
            request_id: 1,
            version: 1,
            token: vec![],
            client_name: "walden-cli".into(),
        },
        Frame::Hello {
            request_id: 2,
            version: 9,
            token: b"s3cret\0\xff".to_vec(),
            client_name: "bänch ✓".into(),
        },
        Frame::Append {
            request_id: 3,
            durability: Durability::RemoteApply,
            records: vec![
                (Kind::DATA, b"hello".to_vec()),
                (Kind(127), vec![]),
                (Kind(7), vec![0; 1000]),
            ],
        },
        Frame::Read {
            request_id: 4,
            from: Lsn(0x100_0000),
            max_bytes: 1 << 20,
            max_records: 0,
        },
        Frame::Follow {
            request_id: 5,
            from: Lsn(0x16_B374_D848),
        },
        Frame::Cancel { request_id: 5 },
        Frame::Status {
            request_id: u64::MAX,
        },
        Frame::HelloOk {
            request_id: 1,
            version: 1,
            system_id: 0,
            segment_size: 16 << 20,
            limits: Limits::default(),
            max_in_flight: 1024,
            server_name: "walden 0.1.0".into(),
        },
        Frame::Ack {
            request_id: 3,
            lsns: vec![Lsn(0x100_0000)],
            end: Lsn(0x100_0020),
        },
        Frame::Ack {
            request_id: 3,
            lsns: vec![Lsn(0x100_0000), Lsn(0x100_0020), Lsn(0x7_0000_0000)],
            end: Lsn(0x7_0000_0400),
        },
        Frame::Records {
            request_id: 4,
            records: vec![
                record(0x100_0000, 1, b"hello"),
                record(0x100_0020, 128, b""),
            ],
        },
        Frame::ReadEnd {
            request_id: 4,
            end: Lsn(0x100_0038),
        },
        Frame::StatusReply {
            request_id: 6,
            insert_lsn: Lsn(0x300),
            write_lsn: Lsn(0x200),
            flush_lsn: Lsn(0x100),
            json: r#"{"shards":[{"core":2}],"uptime_s":12}"#.into(),
        },
        Frame::PageWrite {
            request_id: 7,
            durability: Durability::Local,
            rel: 1,
            block: 42,
            offset: 100,
            data: b"hello page".to_vec(),
        },
        Frame::PageRead {
            request_id: 8,
            rel: 1,
            block: 42,
        },
        Frame::Checkpoint { request_id: 9 },
        Frame::PageWritten {
            request_id: 7,
            lsn: Lsn(0x100_0040),
            end: Lsn(0x100_0068),
        },
        Frame::PageData {
            request_id: 8,
            lsn: Lsn(0x100_0068),
            data: vec![7; walden::store::page::PAGE_DATA],
        },
        Frame::CheckpointDone {
            request_id: 9,
            checkpoint: Lsn(0x100_0090),
            redo: Lsn(0x100_0070),
        },
        Frame::StartReplication {
            request_id: 10,
            system_id: 0x7312_3456_789A_BCDE,
            timeline: 1,
            start: Lsn(0x100_0000),
            term: 1,
            slot: "s1".into(),
            application_name: "standby ✓".into(),
        },
        Frame::StartReplication {
            request_id: 10,
            system_id: 0,
            timeline: u32::MAX,
            start: Lsn(u64::MAX - 7),
            term: u64::MAX,
            slot: String::new(),
            application_name: String::new(),
        },
        Frame::StandbyStatus {
            request_id: 10,
            write: Lsn(0x100_0040),
            flush: Lsn(0x100_0040),
            apply: Lsn(0x100_0020),
            send_time: 1_765_000_000_000_000,
            reply_requested: false,
        },
        Frame::TimelineHistory {
            request_id: 11,
            timeline: 2,
        },
        Frame::SlotCommand {
            request_id: 12,
            op: SlotOp::Create,
            name: "s1".into(),
        },
        Frame::SlotCommand {
            request_id: 13,
            op: SlotOp::Drop,
            name: "a".repeat(MAX_NAME_LEN),
        },
        Frame::SlotResult {
            request_id: 12,
            restart_lsn: Lsn(0x100_0028),
        },
        Frame::StreamStart {
            request_id: 10,
            term: 1,
            timeline: 1,
            flush: Lsn(0x100_0040),
            commit: Lsn(0x100_0020),
        },
        Frame::WalData {
            request_id: 10,
            start: Lsn(0x100_0000),
            wal_end: Lsn(0x100_0040),
            commit: Lsn(0x100_0020),
            send_time: 1_765_000_000_000_000,
            wal: vec![0xAB; 64],
        },
        Frame::Keepalive {
            request_id: 10,
            wal_end: Lsn(0x100_0040),
            commit: Lsn(0x100_0040),
            send_time: 1_765_000_000_000_000,
            reply_requested: true,
        },
        Frame::TimelineEnd {
            request_id: 10,
            next_timeline: 2,
            switch: Lsn(0x100_0040),
        },
        Frame::Promote { request_id: 13 },
        Frame::PromoteResult {
            request_id: 13,
            timeline: 1,
            flush: Lsn(0x100_0040),
        },
        Frame::HistoryData {
            request_id: 11,
            timeline: 2,
            history: b"1\t0/1000040\tno recovery target specified\n".to_vec(),
        },
        Frame::Indeterminate {
            request_id: 3,
            reached: Durability::Local,
            reason: IndeterminateReason::QuorumTimeout,
            lsns: vec![Lsn(0x100_0000), Lsn(0x100_0020)],
            end: Lsn(0x100_0040),
        },
        Frame::BaseBackup {
            request_id: 12,
            label: "nightly ✓".into(),
        },
        Frame::BaseBackup {
            request_id: 12,
            label: String::new(),
        },
        Frame::BackupStart {
            request_id: 12,
            system_id: 0x7312_3456_789A_BCDE,
            timeline: 1,
            data_checksums: true,
            segment_size: 16 << 20,
            checkpoint: Lsn(0x100_0090),
            redo: Lsn(0x100_0070),
            start_time: 1_765_000_000_000_000,
            relations: vec![(1, 3), (7, 0), (u32::MAX, 1 << 30)],
        },
        Frame::BackupStart {
            request_id: 12,
            system_id: 0,
            timeline: u32::MAX,
            data_checksums: false,
            segment_size: 0,
            checkpoint: Lsn(8),
            redo: Lsn(8),
            start_time: 0,
            relations: vec![],
        },
        Frame::BackupPages {
            request_id: 12,
            rel: 7,
            first_block: 2,
            pages: vec![0x5A; 2 * PAGE_SIZE],
        },
        Frame::BackupEnd {
            request_id: 12,
            end: Lsn(0x100_00A4),
        },
        Frame::Error {
            request_id: 0,
            code: ErrorCode::SHUTTING_DOWN,
            message: "shutting down".into(),
        },
        Frame::Error {
            request_id: 3,
            code: ErrorCode(4242),
            message: String::new(),
        },
    ]
}

#[test]
fn every_frame_type_round_trips() {
    let mut seen = Vec::new();
    for frame in examples() {
        assert_eq!(round_trip(&frame), frame);
        let bytes = bytes_of(std::slice::from_ref(&frame));
        seen.push(FrameType::from_u8(bytes[4]).unwrap());
    }
    for ty in FrameType::ALL {
        assert!(seen.contains(&ty), "no example of {ty:?}");
    }
}

#[test]
fn borrowed_views_see_the_payloads_in_place() {
    let mut bytes = Vec::new();
    encode_append(
        9,
        Durability::Local,
        &[(Kind::DATA, b"abc"), (Kind(5), b"")],
        &mut bytes,
    );
    let (frame, _) = decode(&bytes, Direction::ToServer, &Limits::default())
        .unwrap()
        .unwrap();
    let walden::protocol::FrameRef::Append {
        records,
        durability,
        ..
    } = frame
    else {
        panic!("not an Append: {frame:?}");
    };
    assert_eq!(durability, Durability::Local);
    assert_eq!(records.len(), 2);
    let (kind, payload) = records.iter().next().unwrap();
    assert_eq!((kind, payload), (Kind::DATA, &b"abc"[..]));
    // The payload is a slice of the received bytes, not a copy.
    let offset = payload.as_ptr() as usize - bytes.as_ptr() as usize;
    assert_eq!(&bytes[offset..offset + 3], b"abc");
}

/// The worked example in docs/protocol.md §7, byte for byte.
#[test]
fn worked_example_matches_the_doc() {
    let mut append = Vec::new();
    encode_append(
        7,
        Durability::Local,
        &[(Kind::DATA, b"hello"), (Kind::DATA, b"world!")],
        &mut append,
    );
    #[rustfmt::skip]
    assert_eq!(append, [
        0x2a, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x01, 0x02, 0x00, 0x00, 0x00,
        0x01, 0x05, 0x00, 0x00, 0x00, b'h', b'e', b'l', b'l', b'o',
        0x01, 0x06, 0x00, 0x00, 0x00, b'w', b'o', b'r', b'l', b'd', b'!',
    ]);
    let mut ack = Vec::new();
    encode_ack(
        7,
        &[Lsn(0x100_0000), Lsn(0x100_0020)],
        Lsn(0x100_0040),
        &mut ack,
    );
    #[rustfmt::skip]
    assert_eq!(ack, [
        0x25, 0x00, 0x00, 0x00, 0x82, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x40, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x02, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x04,
    ]);
}

/// The WalData and Indeterminate examples in docs/protocol.md §9, byte for
/// byte.
#[test]
fn replication_examples_match_the_doc() {
    let mut wal_data = Vec::new();
    encode_wal_data(
        12,
        Lsn(0x100_0000),
        Lsn(0x100_0040),
        Lsn(0x100_0020),
        1_765_000_000_000_000,
        &[0xDE, 0xAD, 0xBE, 0xEF],
        &mut wal_data,
    );
    #[rustfmt::skip]
    assert_eq!(wal_data, [
        0x34, 0x00, 0x00, 0x00, 0xa0, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x40, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x20, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x50, 0x07, 0x16, 0x42, 0x45, 0x06, 0x00,
        0xde, 0xad, 0xbe, 0xef,
    ]);
    let mut indeterminate = Vec::new();
    encode_indeterminate(
        7,
        Durability::Local,
        IndeterminateReason::QuorumTimeout,
        &[Lsn(0x100_0000), Lsn(0x100_0020)],
        Lsn(0x100_0040),
        &mut indeterminate,
    );
    #[rustfmt::skip]
    assert_eq!(indeterminate, [
        0x27, 0x00, 0x00, 0x00, 0x85, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x01, 0x04,
        0x40, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x02, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x04,
    ]);
}

// ------------------------------------------------------------ strategies

fn kind() -> impl Strategy<Value = Kind> {
    (1u8..=255).prop_map(Kind)
}

/// Kinds a client may append (128..=255 are walden's own).
fn client_kind() -> impl Strategy<Value = Kind> {
    (1u8..=127).prop_map(Kind)
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..64),
        1 => prop::collection::vec(any::<u8>(), 0..3000),
    ]
}

fn durability() -> impl Strategy<Value = Durability> {
    prop::sample::select(Durability::ALL.to_vec())
}

/// Increasing, 8-aligned LSNs: small steps (the usual ack) and huge ones
/// (another shard's records in between).
fn lsns(n: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Lsn>> {
    let step = prop_oneof![3u64..200, 1u64..1 << 30];
    (1u64..1 << 40, prop::collection::vec(step, n)).prop_map(|(first, steps)| {
        let mut lsn = first * 8;
        let mut out = vec![Lsn(lsn)];
        for s in steps {
            lsn += s * 8;
            out.push(Lsn(lsn));
        }
        out
    })
}

fn append() -> impl Strategy<Value = Frame> {
    (
        1..u64::MAX,
        durability(),
        prop::collection::vec((client_kind(), payload()), 1..20),
    )
        .prop_map(|(request_id, durability, records)| Frame::Append {
            request_id,
            durability,
            records,
        })
}

fn ack() -> impl Strategy<Value = Frame> {
    (1..u64::MAX, lsns(0..50), 1u64..1 << 20).prop_map(|(request_id, lsns, tail)| {
        let end = Lsn(lsns.last().unwrap().0 + tail * 8);
        Frame::Ack {
            request_id,
            lsns,
            end,
        }
    })
}

fn records() -> impl Strategy<Value = Frame> {
    (
        1..u64::MAX,
        lsns(0..12),
        prop::collection::vec((kind(), payload()), 13),
    )
        .prop_map(|(request_id, lsns, contents)| Frame::Records {
            request_id,
            records: lsns
                .into_iter()
                .zip(contents)
                .map(|(lsn, (kind, payload))| Record { lsn, kind, payload })
                .collect(),
        })
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9 ._-]{1,30}", ".{0,20}"]
}

/// A name of at most MAX_NAME_LEN bytes (`.` may be 4 bytes a char).
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9 ._-]{1,63}",
        ".{0,15}",
        "é{31}"
    ]
}

fn timeline() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..4, 1..=u32::MAX]
}

fn aligned_lsn() -> impl Strategy<Value = Lsn> {
    prop_oneof![1u64..1 << 30, 1..u64::MAX / 8].prop_map(|n| Lsn(n * 8))
}

fn replication_client_frame() -> impl Strategy<Value = Frame> {
    let id = 1..u64::MAX;
    prop_oneof![
        (
            id.clone(),
            any::<u64>(),
            timeline(),
            aligned_lsn(),
            any::<u64>(),
            "[a-z0-9_]{0,63}",
            name()
        )
            .prop_map(
                |(request_id, system_id, timeline, start, term, slot, application_name)| {
                    Frame::StartReplication {
                        request_id,
                        system_id,
                        timeline,
                        start,
                        term,
                        slot,
                        application_name,
                    }
                }
            ),
        (id.clone(), any::<[u64; 3]>(), any::<u64>(), any::<bool>()).prop_map(
            |(request_id, mut l, send_time, reply_requested)| {
                // write ≥ flush ≥ apply
                l.sort_unstable_by(|a, b| b.cmp(a));
                Frame::StandbyStatus {
                    request_id,
                    write: Lsn(l[0]),
                    flush: Lsn(l[1]),
                    apply: Lsn(l[2]),
                    send_time,
                    reply_requested,
                }
            }
        ),
        (id.clone(), timeline()).prop_map(|(request_id, timeline)| Frame::TimelineHistory {
            request_id,
            timeline
        }),
        (
            id.clone(),
            prop_oneof![Just(SlotOp::Create), Just(SlotOp::Drop)],
            "[a-z0-9_]{1,63}"
        )
            .prop_map(|(request_id, op, name)| Frame::SlotCommand {
                request_id,
                op,
                name
            }),
        (id, prop_oneof![text(), "[a-z ]{1000,1024}"])
            .prop_map(|(request_id, label)| { Frame::BaseBackup { request_id, label } }),
    ]
}

fn backup_server_frame() -> impl Strategy<Value = Frame> {
    let id = 1..u64::MAX;
    prop_oneof![
        (
            id.clone(),
            any::<[u64; 3]>(),
            timeline(),
            any::<bool>(),
            aligned_lsn(),
            0u64..1 << 20,
            prop::collection::btree_map(any::<u32>(), 0u32..=1 << 30, 0..20)
        )
            .prop_map(
                |(request_id, v, timeline, data_checksums, redo, gap, rels)| {
                    Frame::BackupStart {
                        request_id,
                        system_id: v[0],
                        timeline,
                        data_checksums,
                        segment_size: v[1],
                        checkpoint: Lsn(redo.0.saturating_add(gap * 8).min(u64::MAX - 7)),
                        redo,
                        start_time: v[2],
                        relations: rels.into_iter().collect(),
                    }
                }
            ),
        (
            id.clone(),
            any::<u32>(),
            0u32..(1 << 30) - 4,
            1usize..4,
            any::<u8>()
        )
            .prop_map(|(request_id, rel, first_block, n, b)| Frame::BackupPages {
                request_id,
                rel,
                first_block,
                pages: vec![b; n * PAGE_SIZE],
            }),
        (id, any::<u64>()).prop_map(|(request_id, end)| Frame::BackupEnd {
            request_id,
            end: Lsn(end)
        }),
    ]
}

fn replication_server_frame() -> impl Strategy<Value = Frame> {
    let id = 1..u64::MAX;
    prop_oneof![
        (id.clone(), any::<u64>(), timeline(), any::<[u64; 2]>()).prop_map(
            |(request_id, term, timeline, l)| Frame::StreamStart {
                request_id,
                term,
                timeline,
                flush: Lsn(l[0]),
                commit: Lsn(l[1]),
            }
        ),
        (
            id.clone(),
            prop_oneof![0u64..1 << 40, 0..u64::MAX - 4000],
            0u64..1000,
            any::<[u64; 2]>(),
            prop::collection::vec(any::<u8>(), 1..3000)
        )
            .prop_map(|(request_id, start, slack, l, wal)| Frame::WalData {
                request_id,
                start: Lsn(start),
                wal_end: Lsn(start + wal.len() as u64 + slack),
                commit: Lsn(l[0]),
                send_time: l[1],
                wal,
            }),
        (id.clone(), any::<[u64; 3]>(), any::<bool>()).prop_map(
            |(request_id, l, reply_requested)| Frame::Keepalive {
                request_id,
                wal_end: Lsn(l[0]),
                commit: Lsn(l[1]),
                send_time: l[2],
                reply_requested,
            }
        ),
        (id.clone(), timeline(), any::<u64>()).prop_map(|(request_id, next_timeline, switch)| {
            Frame::TimelineEnd {
                request_id,
                next_timeline,
                switch: Lsn(switch),
            }
        }),
        (id.clone(), timeline(), any::<u64>()).prop_map(|(request_id, timeline, flush)| {
            Frame::PromoteResult {
                request_id,
                timeline,
                flush: Lsn(flush),
            }
        }),
        (id.clone(), timeline(), payload()).prop_map(|(request_id, timeline, history)| {
            Frame::HistoryData {
                request_id,
                timeline,
                history,
            }
        }),
        (id.clone(), any::<u64>()).prop_map(|(request_id, l)| Frame::SlotResult {
            request_id,
            restart_lsn: Lsn(l),
        }),
        (
            id,
            0u8..4,
            prop::sample::select(IndeterminateReason::ALL.to_vec()),
            lsns(0..20),
            1u64..1 << 20
        )
            .prop_map(|(request_id, reached, reason, lsns, tail)| {
                let end = Lsn(lsns.last().unwrap().0 + tail * 8);
                Frame::Indeterminate {
                    request_id,
                    reached: walden::protocol::durability_from_wire(reached).unwrap(),
                    reason,
                    lsns,
                    end,
                }
            }),
    ]
}

fn client_frame() -> impl Strategy<Value = Frame> {
    let id = 1..u64::MAX;
    prop_oneof![
        1 => (id.clone(), any::<u16>(), prop::collection::vec(any::<u8>(), 0..40), text()).prop_map(
            |(request_id, version, token, client_name)| Frame::Hello { request_id, version, token, client_name }
        ),
        4 => append(),
        1 => (id.clone(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(request_id, from, max_bytes, max_records)| {
            Frame::Read { request_id, from: Lsn(from), max_bytes, max_records }
        }),
        1 => (id.clone(), any::<u64>()).prop_map(|(request_id, from)| Frame::Follow { request_id, from: Lsn(from) }),
        1 => id.clone().prop_map(|request_id| Frame::Cancel { request_id }),
        1 => id.clone().prop_map(|request_id| Frame::Status { request_id }),
        1 => (id.clone(), 0u8..5, any::<u32>(), any::<u32>(), any::<u16>(), prop::collection::vec(any::<u8>(), 1..300)).prop_map(
            |(request_id, level, rel, block, offset, data)| Frame::PageWrite {
                request_id,
                durability: walden::protocol::durability_from_wire(level).unwrap(),
                rel,
                block,
                offset,
                data,
            }
        ),
        1 => (id.clone(), any::<u32>(), any::<u32>()).prop_map(|(request_id, rel, block)| Frame::PageRead { request_id, rel, block }),
        1 => id.clone().prop_map(|request_id| Frame::Checkpoint { request_id }),
        1 => id.prop_map(|request_id| Frame::Promote { request_id }),
        3 => replication_client_frame(),
    ]
}

fn server_frame() -> impl Strategy<Value = Frame> {
    let id = 1..u64::MAX;
    prop_oneof![
        1 => (id.clone(), any::<u16>(), any::<u64>(), any::<u64>(), any::<[u32; 4]>(), text()).prop_map(
            |(request_id, version, system_id, segment_size, l, server_name)| Frame::HelloOk {
                request_id,
                version,
                system_id,
                segment_size,
                limits: Limits { max_frame_size: l[0], max_records_per_frame: l[1], max_record_size: l[2] },
                max_in_flight: l[3],
                server_name,
            }
        ),
        3 => ack(),
        3 => records(),
        1 => (id.clone(), any::<u64>()).prop_map(|(request_id, end)| Frame::ReadEnd { request_id, end: Lsn(end) }),
        1 => (id.clone(), any::<[u64; 3]>(), text()).prop_map(|(request_id, l, json)| Frame::StatusReply {
            request_id,
            insert_lsn: Lsn(l[0]),
            write_lsn: Lsn(l[1]),
            flush_lsn: Lsn(l[2]),
            json,
        }),
        1 => (id.clone(), any::<[u64; 2]>()).prop_map(|(request_id, l)| Frame::PageWritten { request_id, lsn: Lsn(l[0]), end: Lsn(l[1]) }),
        1 => (id.clone(), any::<[u64; 2]>()).prop_map(|(request_id, l)| Frame::CheckpointDone { request_id, checkpoint: Lsn(l[0]), redo: Lsn(l[1]) }),
        1 => (id.clone(), any::<u64>(), any::<u8>()).prop_map(|(request_id, lsn, b)| Frame::PageData {
            request_id,
            lsn: Lsn(lsn),
            data: vec![b; walden::store::page::PAGE_DATA],
        }),
        1 => (any::<u64>(), any::<u16>(), text()).prop_map(|(request_id, code, message)| Frame::Error {
            request_id,
            code: ErrorCode(code),
            message,
        }),
        6 => replication_server_frame(),
        2 => backup_server_frame(),
    ]
}

fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![client_frame(), server_frame()]
}

/// Where a mutation hits, as a fraction of the frame's length.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: f64,
        mask: u8,
    },
    Truncate {
        at: f64,
    },
    Extend {
        junk: Vec<u8>,
    },
    /// A random u32 written over a length or count.
    Overwrite {
        at: f64,
        value: u32,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0.0..1.0, 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        2 => (0.0..1.0).prop_map(|at| Mutation::Truncate { at }),
        1 => prop::collection::vec(any::<u8>(), 1..40).prop_map(|junk| Mutation::Extend { junk }),
        2 => (0.0..1.0, prop_oneof![any::<u32>(), 0u32..64]).prop_map(|(at, value)| Mutation::Overwrite { at, value }),
    ]
}

fn mutate(mut bytes: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
    match m {
        Mutation::Flip { at: f, mask } => {
            let i = at(*f, bytes.len());
            bytes[i] ^= mask;
        }
        Mutation::Truncate { at: f } => bytes.truncate(at(*f, bytes.len())),
        Mutation::Extend { junk } => bytes.extend_from_slice(junk),
        Mutation::Overwrite { at: f, value } => {
            let i = at(*f, bytes.len().saturating_sub(3));
            bytes[i..i + 4].copy_from_slice(&value.to_le_bytes());
        }
    }
    bytes
}

/// What any input may do: decode to a frame that re-encodes to exactly the
/// bytes it came from, ask for more, or fail with a documented code.
fn check_any_input(
    bytes: &[u8],
    direction: Direction,
    limits: &Limits,
) -> Result<(), TestCaseError> {
    match decode(bytes, direction, limits) {
        Ok(Some((frame, len))) => {
            prop_assert!(len >= HEADER_LEN && len <= bytes.len());
            let mut again = Vec::new();
            encode(&frame.to_frame(), &mut again);
            prop_assert_eq!(&again[..], &bytes[..len], "the encoding is canonical");
        }
        Ok(None) => {
            let declared = bytes
                .get(..4)
                .map(|l| u32::from_le_bytes(l.try_into().unwrap()) as usize);
            let whole = bytes.len() >= HEADER_LEN && declared.is_some_and(|d| d <= bytes.len());
            prop_assert!(!whole, "gave up on a whole frame");
        }
        Err(e) => {
            prop_assert!(
                ErrorCode::ALL.contains(&e.code()),
                "undocumented code {:?}",
                e.code()
            );
            prop_assert!(
                bytes.len() >= HEADER_LEN,
                "judged a frame before its header"
            );
            // The answer itself is a valid frame for the other side.
            let mut answer = Vec::new();
            encode(&e.to_frame(), &mut answer);
            prop_assert!(decode(&answer, Direction::ToClient, &Limits::default())
                .unwrap()
                .is_some());
        }
    }
    Ok(())
}

fn small_limits() -> Limits {
    Limits {
        max_frame_size: 2048,
        max_records_per_frame: 8,
        max_record_size: 512,
    }
}

// ------------------------------------------------------------ properties

proptest! {
    #[test]
    fn appends_round_trip(frame in append()) {
        prop_assert_eq!(round_trip(&frame), frame.clone());
        let Frame::Append { request_id, durability, records } = &frame else { unreachable!() };
        let borrowed: Vec<(Kind, &[u8])> = records.iter().map(|(k, p)| (*k, &p[..])).collect();
        let mut fast = Vec::new();
        encode_append(*request_id, *durability, &borrowed, &mut fast);
        prop_assert_eq!(fast, bytes_of(&[frame]));
    }

    #[test]
    fn acks_round_trip_compactly(frame in ack()) {
        prop_assert_eq!(round_trip(&frame), frame.clone());
        let Frame::Ack { lsns, .. } = &frame else { unreachable!() };
        // Header, end, count, first LSN, then at most 5 bytes a step here
        // (steps below 2^30 × 8) and 1 byte for steps below 1 KiB.
        let steps: usize = lsns.windows(2).map(|w| if w[1].0 - w[0].0 < 1024 { 1 } else { 5 }).sum();
        prop_assert!(bytes_of(std::slice::from_ref(&frame)).len() <= HEADER_LEN + 20 + steps);
    }

    #[test]
    fn records_round_trip(frame in records()) {
        prop_assert_eq!(round_trip(&frame), frame.clone());
        let Frame::Records { request_id, records } = &frame else { unreachable!() };
        let mut fast = Vec::new();
        encode_records(*request_id, records.iter().map(RecordRef::from), &mut fast);
        prop_assert_eq!(fast, bytes_of(&[frame]));
    }

    /// Every replication frame, both ways, decodes to itself; the borrowed
    /// encoders give the same bytes as `encode`.
    #[test]
    fn replication_frames_round_trip(
        frame in prop_oneof![replication_client_frame(), replication_server_frame(), backup_server_frame()],
    ) {
        prop_assert_eq!(round_trip(&frame), frame.clone());
        let mut fast = Vec::new();
        match &frame {
            Frame::WalData { request_id, start, wal_end, commit, send_time, wal } => {
                encode_wal_data(*request_id, *start, *wal_end, *commit, *send_time, wal, &mut fast);
            }
            Frame::Indeterminate { request_id, reached, reason, lsns, end } => {
                encode_indeterminate(*request_id, *reached, *reason, lsns, *end, &mut fast);
            }
            Frame::BackupPages { request_id, rel, first_block, pages } => {
                encode_backup_pages(*request_id, *rel, *first_block, pages, &mut fast);
            }
            _ => return Ok(()),
        }
        prop_assert_eq!(fast, bytes_of(&[frame]));
    }

    #[test]
    fn any_cut_of_the_stream_gives_the_same_frames(
        to_server in prop::collection::vec(client_frame(), 1..12),
        to_client in prop::collection::vec(server_frame(), 1..12),
        sizes in prop::collection::vec(1usize..300, 1..20),
    ) {
        for (frames, direction) in [(to_server, Direction::ToServer), (to_client, Direction::ToClient)] {
            let bytes = bytes_of(&frames);
            prop_assert_eq!(&decode_in_pieces(&bytes, direction, &sizes), &frames);
            prop_assert_eq!(&decode_in_pieces(&bytes, direction, &[1]), &frames);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), to_server: bool) {
        let direction = if to_server { Direction::ToServer } else { Direction::ToClient };
        check_any_input(&bytes, direction, &Limits::default())?;
    }

    /// Random bodies behind a plausible header reach the body checks.
    #[test]
    fn random_bodies_never_panic(
        ty in prop::sample::select(FrameType::ALL.to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut bytes = ((HEADER_LEN + body.len()) as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[ty as u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&body);
        check_any_input(&bytes, ty.direction(), &Limits::default())?;
        check_any_input(&bytes, ty.direction(), &small_limits())?;
    }

    #[test]
    fn mutated_frames_never_panic(frame in any_frame(), m in mutation(), pieces in 1usize..50) {
        let bytes = mutate(bytes_of(&[frame]), &m);
        let Some(direction) = bytes.get(4).and_then(|t| FrameType::from_u8(*t)).map(|t| t.direction()) else {
            check_any_input(&bytes, Direction::ToServer, &Limits::default())?;
            return Ok(());
        };
        check_any_input(&bytes, direction, &Limits::default())?;
        check_any_input(&bytes, direction, &small_limits())?;
        // The stream decoder agrees with `decode`, however the bytes arrive.
        let mut d = Decoder::new(direction, small_limits());
        for piece in bytes.chunks(pieces) {
            let mut rest = piece;
            while !rest.is_empty() {
                rest = &rest[d.extend(rest)..];
                prop_assert!(d.buffered() <= small_limits().max_frame_size as usize);
                loop {
                    match d.next_frame() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) if e.closes_connection() => break,
                        Err(_) => {}
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------ errors

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    bytes_of(std::slice::from_ref(frame))
}

fn one_append(payload_len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    encode_append(
        1,
        Durability::Local,
        &[(Kind::DATA, &vec![b'x'; payload_len])],
        &mut out,
    );
    out
}

fn patch(mut bytes: Vec<u8>, at: usize, with: &[u8]) -> Vec<u8> {
    bytes[at..at + with.len()].copy_from_slice(with);
    bytes
}

fn with_len(bytes: Vec<u8>) -> Vec<u8> {
    let len = (bytes.len() as u32).to_le_bytes();
    patch(bytes, 0, &len)
}

#[test]
fn each_error_maps_to_its_documented_code() {
    use Direction::{ToClient, ToServer};
    use ErrorCode as C;
    let ack = frame_bytes(&Frame::Ack {
        request_id: 1,
        lsns: vec![Lsn(0x100_0000), Lsn(0x100_0020)],
        end: Lsn(0x100_0040),
    });
    let recs = frame_bytes(&Frame::Records {
        request_id: 1,
        records: vec![record(0x100_0000, 1, b"a")],
    });
    let hello = frame_bytes(&Frame::Hello {
        request_id: 1,
        version: 1,
        token: vec![],
        client_name: "ab".into(),
    });
    let append = one_append;
    // Append body: level at 16, count at 17..21, kind at 21, length at 22..26.
    // Ack body: end at 16..24, count at 24..28, first LSN at 28..36, steps.
    // Records body: count at 16..20, first LSN at 20..28.
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>, Direction, ErrorCode)> = vec![
        ("length below the header", patch(append(1), 0, &[15, 0, 0, 0]), ToServer, C::BAD_FRAME),
        ("4 GiB frame", patch(append(1), 0, &[0xFF; 4]), ToServer, C::FRAME_TOO_LARGE),
        ("type 0", patch(append(1), 4, &[0x00]), ToServer, C::UNKNOWN_TYPE),
        ("unassigned type", patch(append(1), 4, &[0x07]), ToServer, C::UNKNOWN_TYPE),
        ("unassigned page type", patch(append(1), 4, &[0x13]), ToServer, C::UNKNOWN_TYPE),
        ("a PageWrite too short", patch(append(1), 4, &[0x10]), ToServer, C::BAD_FRAME),
        ("unassigned type to the client", patch(ack.clone(), 4, &[0xB0]), ToClient, C::UNKNOWN_TYPE),
        ("unassigned type to the server", patch(append(1), 4, &[0x30]), ToServer, C::UNKNOWN_TYPE),
        ("a server's frame sent to the server", ack.clone(), ToServer, C::UNKNOWN_TYPE),
        ("a client's frame sent to the client", append(1), ToClient, C::UNKNOWN_TYPE),
        ("flags", patch(append(1), 5, &[0x01]), ToServer, C::BAD_FRAME),
        ("reserved header bits", patch(append(1), 7, &[0x80]), ToServer, C::BAD_FRAME),
        ("request id 0", patch(append(1), 8, &[0; 8]), ToServer, C::BAD_FRAME),
        ("Status with a body", patch(append(1), 4, &[0x06]), ToServer, C::BAD_FRAME),
        ("record past the frame", patch(append(4), 22, &[5]), ToServer, C::BAD_FRAME),
        ("count above the records", patch(append(4), 17, &[2]), ToServer, C::BAD_FRAME),
        ("trailing bytes", with_len([append(4), vec![0]].concat()), ToServer, C::BAD_FRAME),
        ("no records", patch(append(0), 17, &[0]), ToServer, C::BAD_FRAME),
        ("too many records", patch(append(1), 17, &[0, 0, 2, 0]), ToServer, C::FRAME_TOO_LARGE),
        ("record over max_record_size", append((1 << 20) + 1), ToServer, C::RECORD_TOO_LARGE),
        ("durability 5", patch(append(1), 16, &[5]), ToServer, C::BAD_FRAME),
        ("kind 0", patch(append(1), 21, &[0]), ToServer, C::BAD_FRAME),
        ("walden's own kind", patch(append(1), 21, &[128]), ToServer, C::BAD_FRAME),
        ("client name not UTF-8", patch(hello, 22, &[0xC3]), ToServer, C::BAD_FRAME),
        ("ack LSNs not increasing", patch(ack.clone(), 36, &[0]), ToClient, C::BAD_FRAME),
        ("ack LSN step not canonical", with_len([&ack[..36], &[0x84, 0x00]].concat()), ToClient, C::BAD_FRAME),
        ("ack end not after the last record", patch(ack.clone(), 16, &[0x20]), ToClient, C::BAD_FRAME),
        ("record LSN 0", patch(recs.clone(), 20, &[0; 8]), ToClient, C::BAD_FRAME),
        ("record LSN not aligned", patch(recs, 20, &[1]), ToClient, C::BAD_FRAME),
    ];
    for (what, bytes, direction, code) in cases {
        let e = match decode(&bytes, direction, &Limits::default()) {
            Err(e) => e,
            other => panic!("{what}: expected {code}, got {other:?}"),
        };
        assert_eq!(e.code(), code, "{what}: {e}");
        assert_eq!(
            e.request_id,
            if what == "request id 0" { 0 } else { 1 },
            "{what}"
        );
    }
}

#[test]
fn oversized_length_is_refused_from_the_header_alone() {
    let header = [
        0xFF, 0xFF, 0xFF, 0xFF, 0x02, 0, 0, 0, 42, 0, 0, 0, 0, 0, 0, 0,
    ];
    let limits = Limits::default();
    assert!(
        decode(&header[..HEADER_LEN - 1], Direction::ToServer, &limits)
            .unwrap()
            .is_none()
    );
    let e = decode(&header, Direction::ToServer, &limits).unwrap_err();
    assert_eq!((e.code(), e.request_id), (ErrorCode::FRAME_TOO_LARGE, 42));
    assert!(e.closes_connection());

    let mut d = Decoder::new(Direction::ToServer, limits);
    assert_eq!(d.extend(&header), HEADER_LEN);
    assert_eq!(
        d.next_frame().unwrap_err().code(),
        ErrorCode::FRAME_TOO_LARGE
    );
    // The stream is no longer trusted: the same error, whatever follows.
    d.extend(&frame_bytes(&Frame::Status { request_id: 1 }));
    assert_eq!(
        d.next_frame().unwrap_err().code(),
        ErrorCode::FRAME_TOO_LARGE
    );
}

#[test]
fn an_oversized_record_fails_its_request_only() {
    let mut bytes = one_append((1 << 20) + 1);
    encode(&Frame::Status { request_id: 2 }, &mut bytes);
    let mut d = Decoder::new(Direction::ToServer, Limits::default());
    let mut rest = &bytes[..];
    let mut seen = Vec::new();
    while !rest.is_empty() {
        rest = &rest[d.extend(rest)..];
        loop {
            match d.next_frame() {
                Ok(Some(f)) => seen.push(Ok(f.request_id())),
                Ok(None) => break,
                Err(e) => seen.push(Err((e.request_id, e.code()))),
            }
        }
    }
    assert_eq!(seen, [Err((1, ErrorCode::RECORD_TOO_LARGE)), Ok(2)]);
}

/// The messages quoted in docs/protocol.md §7.
#[test]
fn messages_match_the_doc() {
    let limits = Limits::default();
    let message = |bytes: Vec<u8>, direction| {
        decode(&bytes, direction, &limits)
            .unwrap_err()
            .problem
            .to_string()
    };
    let to_server = Direction::ToServer;
    let status = frame_bytes(&Frame::Status { request_id: 1 });
    let cases = [
        (
            patch(status.clone(), 0, &[3]),
            "frame length 3 is shorter than the 16-byte header",
        ),
        (
            patch(status.clone(), 0, &[0xFF; 4]),
            "frame of 4294967295 bytes is larger than max_frame_size (4194304 bytes)",
        ),
        (
            patch(status.clone(), 4, &[0x82]),
            "unknown frame type 0x82 to the server",
        ),
        (
            patch(status.clone(), 5, &[1]),
            "flags 0x01 and reserved 0x0000 in the header must be 0",
        ),
        (
            patch(status.clone(), 8, &[0]),
            "request id 0 is only for Error frames about the whole connection",
        ),
        (
            with_len([status, vec![0; 4]].concat()),
            "Status frame with a body of 4 bytes: expected 0",
        ),
        (
            patch(one_append(4), 22, &[5]),
            "Append frame ends inside its record payload",
        ),
        (
            patch(one_append(0), 17, &[0]),
            "Append frame has no records",
        ),
        (
            patch(one_append(1), 17, &[0, 0, 2, 0]),
            "Append frame has 131072 records, more than max_records_per_frame (65536)",
        ),
        (
            patch(one_append(1), 16, &[5]),
            "invalid durability level 5: expected 0 to 4",
        ),
        (patch(one_append(1), 21, &[0]), "record 0 has kind 0"),
        (
            with_len([one_append(1), vec![0]].concat()),
            "Append frame has 1 bytes after its last field",
        ),
        (
            one_append((1 << 20) + 1),
            "record 0 has 1048577 bytes, more than max_record_size (1048576 bytes)",
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(message(bytes, to_server), want);
    }
}

/// Every check the decoder makes on a replication frame, with the message
/// and code docs/protocol.md §7 gives it. Each case is a valid frame with
/// one field broken.
#[test]
fn replication_checks_match_the_doc() {
    use Direction::{ToClient, ToServer};
    let limits = Limits::default();
    let start = frame_bytes(&Frame::StartReplication {
        request_id: 1,
        system_id: 42,
        timeline: 1,
        start: Lsn(0x100_0000),
        term: 1,
        slot: "s1".into(),
        application_name: "ab".into(),
    });
    let status = frame_bytes(&Frame::StandbyStatus {
        request_id: 1,
        write: Lsn(0x100_0040),
        flush: Lsn(0x100_0020),
        apply: Lsn(0x100_0000),
        send_time: 0,
        reply_requested: false,
    });
    let history = frame_bytes(&Frame::TimelineHistory {
        request_id: 1,
        timeline: 2,
    });
    let stream_start = frame_bytes(&Frame::StreamStart {
        request_id: 1,
        term: 1,
        timeline: 1,
        flush: Lsn(0x100_0040),
        commit: Lsn(0x100_0040),
    });
    let wal_data = frame_bytes(&Frame::WalData {
        request_id: 1,
        start: Lsn(0x100_0000),
        wal_end: Lsn(0x100_0004),
        commit: Lsn(0),
        send_time: 0,
        wal: vec![1, 2, 3, 4],
    });
    let keepalive = frame_bytes(&Frame::Keepalive {
        request_id: 1,
        wal_end: Lsn(0x100_0040),
        commit: Lsn(0x100_0040),
        send_time: 0,
        reply_requested: true,
    });
    let timeline_end = frame_bytes(&Frame::TimelineEnd {
        request_id: 1,
        next_timeline: 2,
        switch: Lsn(0x100_0040),
    });
    let history_data = frame_bytes(&Frame::HistoryData {
        request_id: 1,
        timeline: 2,
        history: b"1\t0/1000040\n".to_vec(),
    });
    let indeterminate = frame_bytes(&Frame::Indeterminate {
        request_id: 1,
        reached: Durability::Local,
        reason: IndeterminateReason::Timeout,
        lsns: vec![Lsn(0x100_0000), Lsn(0x100_0020)],
        end: Lsn(0x100_0040),
    });
    let slot_command = frame_bytes(&Frame::SlotCommand {
        request_id: 1,
        op: SlotOp::Create,
        name: "s1".into(),
    });
    let long = |n: usize| vec![b'a'; n];
    // Offsets: StartReplication system id 16, timeline 24, flags 28, start
    // 32, term 40, slot length 48, name length 50, slot 52, name 54.
    // StandbyStatus write 16, flush 24, apply 32, send time 40, reply 48.
    // StreamStart term 16, timeline 24, reserved 28. WalData start 16,
    // wal_end 24, commit 32, send time 40, WAL 48. Keepalive reply 40.
    // TimelineEnd next timeline 16, reserved 20. Indeterminate reached 16,
    // reason 17, end 18, count 26, first 30, steps 38.
    #[rustfmt::skip]
    let cases: Vec<(Vec<u8>, Direction, &str)> = vec![
        // StartReplication
        (patch(start.clone(), 24, &[0; 4]), ToServer,
         "StartReplication frame: timeline 0 does not exist (timelines start at 1)"),
        (patch(start.clone(), 28, &[1]), ToServer,
         "StartReplication frame: flags is 0x00000001, must be 0"),
        (patch(start.clone(), 32, &[0; 8]), ToServer,
         "StartReplication frame: start LSN must be a record start: non-zero and a multiple of 8"),
        (patch(start.clone(), 32, &[4]), ToServer,
         "StartReplication frame: start LSN must be a record start: non-zero and a multiple of 8"),
        (patch(start.clone(), 48, &[64]), ToServer,
         "slot name of 64 bytes is longer than 63 bytes (PostgreSQL's NAMEDATALEN - 1)"),
        (patch(start.clone(), 50, &[64]), ToServer,
         "application name of 64 bytes is longer than 63 bytes (PostgreSQL's NAMEDATALEN - 1)"),
        (patch(start.clone(), 48, &[5]), ToServer,
         "StartReplication frame ends inside its slot name"),
        (patch(start.clone(), 50, &[3]), ToServer,
         "StartReplication frame ends inside its application name"),
        (patch(start.clone(), 53, b"A"), ToServer,
         "slot name has byte 0x41 at offset 1: only lower case letters, digits and the underscore are allowed"),
        (patch(start.clone(), 52, b"-"), ToServer,
         "slot name has byte 0x2d at offset 0: only lower case letters, digits and the underscore are allowed"),
        (patch(start.clone(), 54, &[0xC3]), ToServer, "application name is not valid UTF-8"),
        (with_len([start.clone(), vec![0, 0]].concat()), ToServer,
         "StartReplication frame has 2 bytes after its last field"),
        (with_len([start[..52].to_vec(), long(2 * MAX_NAME_LEN + 1)].concat()), ToServer,
         "StartReplication frame with a body of 163 bytes: expected 36 to 162"),
        // StandbyStatus
        (patch(status.clone(), 24, &[0x48]), ToServer,
         "StandbyStatus frame: flush LSN 0/1000048 is past write LSN 0/1000040"),
        (patch(status.clone(), 32, &[0x28]), ToServer,
         "StandbyStatus frame: apply LSN 0/1000028 is past flush LSN 0/1000020"),
        (patch(status.clone(), 48, &[2]), ToServer, "reply_requested is 2: expected 0 or 1"),
        (with_len(status[..status.len() - 1].to_vec()), ToServer,
         "StandbyStatus frame with a body of 32 bytes: expected 33"),
        // SlotCommand: op 16, name 17
        (patch(slot_command.clone(), 16, &[0]), ToServer,
         "SlotCommand frame: invalid op 0: expected 1 (create) or 2 (drop)"),
        (patch(slot_command.clone(), 16, &[3]), ToServer,
         "SlotCommand frame: invalid op 3: expected 1 (create) or 2 (drop)"),
        (patch(slot_command.clone(), 18, b"A"), ToServer,
         "slot name has byte 0x41 at offset 1: only lower case letters, digits and the underscore are allowed"),
        (with_len(slot_command[..17].to_vec()), ToServer,
         "SlotCommand frame with a body of 1 bytes: expected 2 to 64"),
        (with_len([slot_command[..17].to_vec(), long(MAX_NAME_LEN + 1)].concat()), ToServer,
         "SlotCommand frame with a body of 65 bytes: expected 2 to 64"),
        // TimelineHistory
        (patch(history, 16, &[0]), ToServer,
         "TimelineHistory frame: timeline 0 does not exist (timelines start at 1)"),
        // StreamStart
        (patch(stream_start.clone(), 24, &[0]), ToClient,
         "StreamStart frame: timeline 0 does not exist (timelines start at 1)"),
        (patch(stream_start, 31, &[0x80]), ToClient,
         "StreamStart frame: reserved is 0x80000000, must be 0"),
        // WalData
        (patch(wal_data.clone(), 24, &[3]), ToClient,
         "WalData frame: 4 bytes from 0/1000000 end past wal_end 0/1000003"),
        (patch(wal_data.clone(), 16, &[0xFF; 8]), ToClient,
         "WalData frame: 4 bytes from FFFFFFFF/FFFFFFFF end past wal_end 0/1000004"),
        (with_len(wal_data[..48].to_vec()), ToClient,
         "WalData frame with a body of 32 bytes: expected at least 33"),
        // Keepalive
        (patch(keepalive, 40, &[7]), ToClient, "reply_requested is 7: expected 0 or 1"),
        // TimelineEnd
        (patch(timeline_end.clone(), 16, &[0]), ToClient,
         "TimelineEnd frame: timeline 0 does not exist (timelines start at 1)"),
        (patch(timeline_end, 20, &[1]), ToClient,
         "TimelineEnd frame: reserved is 0x00000001, must be 0"),
        // HistoryData
        (patch(history_data, 16, &[0]), ToClient,
         "HistoryData frame: timeline 0 does not exist (timelines start at 1)"),
        // Indeterminate
        (patch(indeterminate.clone(), 16, &[4]), ToClient,
         "Indeterminate frame: reached level 4 is not below any level an Append can ask for: expected 0 to 3"),
        (patch(indeterminate.clone(), 16, &[9]), ToClient,
         "Indeterminate frame: reached level 9 is not below any level an Append can ask for: expected 0 to 3"),
        (patch(indeterminate.clone(), 17, &[0]), ToClient,
         "Indeterminate frame: invalid reason 0: expected 1 to 6"),
        (patch(indeterminate.clone(), 17, &[7]), ToClient,
         "Indeterminate frame: invalid reason 7: expected 1 to 6"),
        (patch(indeterminate.clone(), 26, &[0]), ToClient, "Indeterminate frame has no records"),
        (patch(indeterminate.clone(), 18, &[0x20]), ToClient,
         "Indeterminate frame: end LSN is not after the last record"),
        (patch(indeterminate.clone(), 38, &[0]), ToClient,
         "Indeterminate frame: record LSNs must be non-zero, multiples of 8 and increasing"),
        (with_len(indeterminate[..37].to_vec()), ToClient,
         "Indeterminate frame with a body of 21 bytes: expected at least 22"),
        (with_len(indeterminate[..38].to_vec()), ToClient,
         "Indeterminate frame ends inside its LSN steps"),
        (with_len([indeterminate, vec![0]].concat()), ToClient,
         "Indeterminate frame has 1 bytes after its last field"),
    ];
    for (bytes, direction, want) in cases {
        let e = decode(&bytes, direction, &limits).unwrap_err();
        assert_eq!(e.problem.to_string(), want);
        assert_eq!(
            (e.code(), e.request_id),
            (ErrorCode::BAD_FRAME, 1),
            "{want}"
        );
        assert!(e.closes_connection(), "{want}");
    }
}

/// Every check the decoder makes on a base backup frame (docs/protocol.md
/// §4.13, §5.16-5.18, §7), with its message. Each case is a valid frame
/// with one field broken.
#[test]
fn backup_checks_match_the_doc() {
    use Direction::{ToClient, ToServer};
    let limits = Limits::default();
    let request = frame_bytes(&Frame::BaseBackup {
        request_id: 1,
        label: "ab".into(),
    });
    let start = frame_bytes(&Frame::BackupStart {
        request_id: 1,
        system_id: 42,
        timeline: 1,
        data_checksums: true,
        segment_size: 1 << 20,
        checkpoint: Lsn(0x100_0090),
        redo: Lsn(0x100_0070),
        start_time: 0,
        relations: vec![(1, 3), (7, 0)],
    });
    let pages = frame_bytes(&Frame::BackupPages {
        request_id: 1,
        rel: 1,
        first_block: 0,
        pages: vec![0; 2 * PAGE_SIZE],
    });
    let end = frame_bytes(&Frame::BackupEnd {
        request_id: 1,
        end: Lsn(0x100_00A0),
    });
    // Offsets: BaseBackup flags 16, label 20. BackupStart system id 16,
    // timeline 24, flags 28, segment size 32, checkpoint 40, redo 48,
    // start time 56, count 64, relations 68. BackupPages relation 16,
    // first block 20, pages 24. BackupEnd end 16.
    #[rustfmt::skip]
    let cases: Vec<(Vec<u8>, Direction, &str)> = vec![
        // BaseBackup
        (patch(request.clone(), 16, &[1]), ToServer, "BaseBackup frame: flags is 0x00000001, must be 0"),
        (patch(request.clone(), 20, &[0xC3]), ToServer, "backup label is not valid UTF-8"),
        (with_len([request[..20].to_vec(), vec![b'a'; MAX_LABEL_LEN + 1]].concat()), ToServer,
         "BaseBackup frame with a body of 1029 bytes: expected 4 to 1028"),
        (with_len(request[..19].to_vec()), ToServer,
         "BaseBackup frame with a body of 3 bytes: expected 4 to 1028"),
        // BackupStart
        (patch(start.clone(), 24, &[0]), ToClient,
         "BackupStart frame: timeline 0 does not exist (timelines start at 1)"),
        (patch(start.clone(), 28, &[2]), ToClient,
         "BackupStart frame: flags 0x00000002 has bits other than 0x1 (data checksums)"),
        (patch(start.clone(), 48, &[0; 8]), ToClient,
         "BackupStart frame: redo and checkpoint LSNs must be record starts: non-zero and multiples of 8"),
        (patch(start.clone(), 48, &[0x74]), ToClient,
         "BackupStart frame: redo and checkpoint LSNs must be record starts: non-zero and multiples of 8"),
        (patch(start.clone(), 40, &[0x94]), ToClient,
         "BackupStart frame: redo and checkpoint LSNs must be record starts: non-zero and multiples of 8"),
        (patch(start.clone(), 40, &[0x68]), ToClient,
         "BackupStart frame: redo LSN 0/1000070 is past checkpoint LSN 0/1000068"),
        (patch(start.clone(), 64, &[3]), ToClient,
         "BackupStart frame: 3 relations need 24 bytes, 16 follow"),
        (with_len([start.clone(), vec![0; 4]].concat()), ToClient,
         "BackupStart frame: 2 relations need 16 bytes, 20 follow"),
        (patch(start.clone(), 76, &[1]), ToClient,
         "BackupStart frame: relation 1 follows relation 1: relations must increase"),
        (patch(start.clone(), 72, &[1, 0, 0, 0x40]), ToClient,
         "BackupStart frame: relation 1 has 1073741825 blocks, more than 1073741824"),
        (with_len(start[..67].to_vec()), ToClient,
         "BackupStart frame with a body of 51 bytes: expected at least 52"),
        // BackupPages
        (with_len(pages[..pages.len() - 1].to_vec()), ToClient,
         "BackupPages frame: 16383 bytes of pages is not a multiple of the 8192-byte page"),
        (patch(pages.clone(), 20, &[0xFF, 0xFF, 0xFF, 0x3F]), ToClient,
         "BackupPages frame: 2 pages from block 1073741823 end past block 1073741824"),
        (with_len(pages[..124].to_vec()), ToClient,
         "BackupPages frame with a body of 108 bytes: expected at least 8200"),
        // BackupEnd
        (with_len([end, vec![0]].concat()), ToClient,
         "BackupEnd frame with a body of 9 bytes: expected 8"),
    ];
    for (bytes, direction, want) in cases {
        let e = decode(&bytes, direction, &limits).unwrap_err();
        assert_eq!(e.problem.to_string(), want);
        assert_eq!(
            (e.code(), e.request_id),
            (ErrorCode::BAD_FRAME, 1),
            "{want}"
        );
        assert!(e.closes_connection(), "{want}");
    }
    // The largest label and the last block are fine.
    let edge = frame_bytes(&Frame::BaseBackup {
        request_id: 1,
        label: "é".repeat(MAX_LABEL_LEN / 2),
    });
    assert!(decode(&edge, ToServer, &limits).unwrap().is_some());
    let last = patch(pages, 20, &[0xFE, 0xFF, 0xFF, 0x3F]);
    assert!(decode(&last, ToClient, &limits).unwrap().is_some());
}

/// The Promote and PromoteResult examples in docs/protocol.md §4.14, byte
/// for byte, and the decoder's checks on them.
#[test]
fn promote_frames_match_the_doc() {
    #[rustfmt::skip]
    assert_eq!(frame_bytes(&Frame::Promote { request_id: 5 }), [
        0x10, 0x00, 0x00, 0x00, 0x25, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ]);
    let result = frame_bytes(&Frame::PromoteResult {
        request_id: 5,
        timeline: 1,
        flush: Lsn(0x100_0040),
    });
    #[rustfmt::skip]
    assert_eq!(result, [
        0x20, 0x00, 0x00, 0x00, 0xa9, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x01, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
        0x40, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
    ]);
    let decode_error = |bytes: Vec<u8>, direction: Direction| {
        let e = decode(&bytes, direction, &Limits::default()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::BAD_FRAME);
        e.problem.to_string()
    };
    let e = decode_error(patch(result.clone(), 16, &[0]), Direction::ToClient);
    assert!(e.contains("timeline 0 does not exist"), "{e}");
    let e = decode_error(patch(result, 20, &[1]), Direction::ToClient);
    assert!(e.contains("reserved is 0x00000001, must be 0"), "{e}");
    let mut promote = frame_bytes(&Frame::Promote { request_id: 5 });
    promote.push(0);
    let e = decode_error(with_len(promote), Direction::ToServer);
    assert!(e.contains("Promote frame with a body of 1 bytes"), "{e}");
}
