//! The wire protocol between clients and `walden serve`: frames, their
//! encoding, and an incremental decoder. docs/protocol.md describes every
//! byte; this file is its reference implementation.
//!
//! What it is: pure functions over byte buffers, shared by `server` and
//! `client`. What it is not: sockets, connection state, authentication or
//! scheduling. The decoder is the server's first line of defence against bad
//! input: it never panics, never buffers more than `Limits::max_frame_size`,
//! and refuses an absurd length from the 16-byte header before any of the
//! body is buffered.
//!
//! ```text
//! offset size field
//!      0    4 len         whole frame, header included, little endian
//!      4    1 type        FrameType; bit 7 set = sent by the server
//!      5    1 flags       none defined in version 1: must be 0
//!      6    2 reserved    must be 0
//!      8    8 request_id  chosen by the client, echoed in every reply
//! ```

use std::fmt;

use crate::durability::Durability;
use crate::lsn::Lsn;
use crate::record::{Kind, ALIGN};
use crate::store::page::{MAX_BLOCKS, PAGE_DATA};

/// The newest protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The oldest protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 4 << 20;
/// Largest frame a server accepts before Hello succeeded: a Hello with its
/// token and client name (together at most 4074 bytes). A client that has
/// not authenticated can make the server hold no more than this.
pub const MAX_HELLO_FRAME: u32 = 4096;
/// The most bytes a frame carrying one record adds to its payload (a Records
/// frame: header, count, then LSN, kind and length).
pub const ONE_RECORD_OVERHEAD: u32 = HEADER_LEN as u32 + 4 + 13;

/// The version both sides speak, given the newest one the client offered
/// in Hello; `None` means the server answers `UNSUPPORTED_VERSION`.
pub fn negotiate_version(client_newest: u16) -> Option<u16> {
    (client_newest >= MIN_VERSION).then(|| client_newest.min(VERSION))
}

/// Which way a frame travels. The decoder accepts only one direction, so a
/// server never acts on a frame that only a server may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    ToServer,
    ToClient,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::ToServer => "to the server",
            Direction::ToClient => "to the client",
        })
    }
}

/// Byte 4 of the header. 0x10..=0x1F and 0x90..=0x9F are the page store's
/// frames; 0x20..=0x2F and 0xA0..=0xAF replication's, whose layouts are
/// defined and checked here although no server serves them yet
/// (docs/protocol.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Hello = 0x01,
    Append = 0x02,
    Read = 0x03,
    Follow = 0x04,
    Cancel = 0x05,
    Status = 0x06,
    PageWrite = 0x10,
    PageRead = 0x11,
    Checkpoint = 0x12,
    StartReplication = 0x20,
    StandbyStatus = 0x21,
    TimelineHistory = 0x22,
    SlotCommand = 0x23,
    BaseBackup = 0x24,
    Promote = 0x25,
    HelloOk = 0x81,
    Ack = 0x82,
    Records = 0x83,
    ReadEnd = 0x84,
    Indeterminate = 0x85,
    StatusReply = 0x86,
    PageWritten = 0x90,
    PageData = 0x91,
    CheckpointDone = 0x92,
    WalData = 0xA0,
    Keepalive = 0xA1,
    TimelineEnd = 0xA2,
    HistoryData = 0xA3,
    StreamStart = 0xA4,
    SlotResult = 0xA5,
    BackupStart = 0xA6,
    BackupPages = 0xA7,
    BackupEnd = 0xA8,
    PromoteResult = 0xA9,
    Error = 0xFF,
}

impl FrameType {
    pub const ALL: [FrameType; 35] = [
        FrameType::Hello,
        FrameType::Append,
        FrameType::Read,
        FrameType::Follow,
        FrameType::Cancel,
        FrameType::Status,
        FrameType::PageWrite,
        FrameType::PageRead,
        FrameType::Checkpoint,
        FrameType::StartReplication,
        FrameType::StandbyStatus,
        FrameType::TimelineHistory,
        FrameType::SlotCommand,
        FrameType::BaseBackup,
        FrameType::Promote,
        FrameType::HelloOk,
        FrameType::Ack,
        FrameType::Records,
        FrameType::ReadEnd,
        FrameType::Indeterminate,
        FrameType::StatusReply,
        FrameType::PageWritten,
        FrameType::PageData,
        FrameType::CheckpointDone,
        FrameType::WalData,
        FrameType::Keepalive,
        FrameType::TimelineEnd,
        FrameType::HistoryData,
        FrameType::StreamStart,
        FrameType::SlotResult,
        FrameType::BackupStart,
        FrameType::BackupPages,
        FrameType::BackupEnd,
        FrameType::PromoteResult,
        FrameType::Error,
    ];

    pub fn from_u8(b: u8) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| *t as u8 == b)
    }

    pub fn direction(self) -> Direction {
        if self as u8 & 0x80 == 0 {
            Direction::ToServer
        } else {
            Direction::ToClient
        }
    }

    /// Smallest and largest body (frame minus header) a valid frame of this
    /// type can have, so that a wrong size is refused from the header alone.
    fn body_len(self) -> (usize, usize) {
        use FrameType::*;
        let any = usize::MAX;
        match self {
            Hello => (6, any),
            Append => (1 + 4 + 5, any),
            Read => (16, 16),
            Follow | ReadEnd => (8, 8),
            Cancel | Status | Checkpoint | Promote => (0, 0),
            PageWrite => (1 + 4 + 4 + 2 + 1, 1 + 4 + 4 + 2 + PAGE_DATA),
            PageRead => (8, 8),
            PageWritten | CheckpointDone => (16, 16),
            PageData => (8 + PAGE_DATA, 8 + PAGE_DATA),
            HelloOk => (2 + 8 + 8 + 16 + 2, any),
            Ack => (8 + 4 + 8, any),
            Records => (4 + 13, any),
            StatusReply => (24, any),
            Error => (2, any),
            StartReplication => (
                START_REPLICATION_FIXED,
                START_REPLICATION_FIXED + 2 * MAX_NAME_LEN,
            ),
            StandbyStatus => (33, 33),
            TimelineHistory => (4, 4),
            StreamStart => (32, 32),
            WalData => (32 + 1, any),
            Keepalive => (25, 25),
            TimelineEnd | PromoteResult => (16, 16),
            HistoryData => (4, any),
            SlotCommand => (1 + 1, 1 + MAX_NAME_LEN),
            SlotResult => (8, 8),
            Indeterminate => (2 + 8 + 4 + 8, any),
            BaseBackup => (4, 4 + MAX_LABEL_LEN),
            BackupStart => (BACKUP_START_FIXED, any),
            BackupPages => (8 + PAGE_SIZE, any),
            BackupEnd => (8, 8),
        }
    }
}

/// The longest slot or application name in StartReplication, in bytes:
/// PostgreSQL's `NAMEDATALEN - 1`.
pub const MAX_NAME_LEN: usize = 63;
/// StartReplication's body up to its two names: system id, timeline, flags,
/// start, term and the two name lengths.
const START_REPLICATION_FIXED: usize = 8 + 4 + 4 + 8 + 8 + 2 + 2;

/// What a SlotCommand asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SlotOp {
    /// Create the slot, reserving WAL from the current redo point.
    Create = 1,
    /// Drop the slot (refused while a standby streams from it).
    Drop = 2,
}

impl SlotOp {
    pub fn from_wire(b: u8) -> Option<SlotOp> {
        match b {
            1 => Some(SlotOp::Create),
            2 => Some(SlotOp::Drop),
            _ => None,
        }
    }
}
/// The longest BaseBackup label, in bytes (PostgreSQL's MAXPGPATH).
pub const MAX_LABEL_LEN: usize = 1024;
/// BackupStart's body up to its relations: system id, timeline, flags,
/// segment size, checkpoint, redo, start time and the relation count.
const BACKUP_START_FIXED: usize = 8 + 4 + 4 + 8 + 8 + 8 + 8 + 4;
/// BackupStart flag: the page store has data checksums.
pub const BACKUP_DATA_CHECKSUMS: u32 = 0x1;
/// The size of a page as it is on disk and in BackupPages.
pub const PAGE_SIZE: usize = crate::io::PAGE_SIZE;

/// Why an Append (or PageWrite) ended Indeterminate: its records are
/// written locally, but the level it asked for was not confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IndeterminateReason {
    /// The client's wait timeout expired.
    Timeout = 1,
    /// The client cancelled the wait.
    Cancelled = 2,
    /// The server is shutting down.
    ShuttingDown = 3,
    /// `synchronous_commit_timeout` expired with the `indeterminate` action.
    QuorumTimeout = 4,
    /// A reload emptied `synchronous_standby_names` while it waited.
    ConfigurationChanged = 5,
    /// The server learnt of a higher term: it no longer acknowledges.
    Deposed = 6,
}

impl IndeterminateReason {
    pub const ALL: [IndeterminateReason; 6] = [
        IndeterminateReason::Timeout,
        IndeterminateReason::Cancelled,
        IndeterminateReason::ShuttingDown,
        IndeterminateReason::QuorumTimeout,
        IndeterminateReason::ConfigurationChanged,
        IndeterminateReason::Deposed,
    ];

    pub fn from_wire(b: u8) -> Option<IndeterminateReason> {
        IndeterminateReason::ALL.into_iter().find(|r| *r as u8 == b)
    }

    /// Why, in words, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            IndeterminateReason::Timeout => "the wait timed out",
            IndeterminateReason::Cancelled => "the wait was cancelled (the client's --wait-timeout, or a Cancel)",
            IndeterminateReason::ShuttingDown => "the server shut down while it waited for its standbys",
            IndeterminateReason::QuorumTimeout => {
                "synchronous_commit_timeout passed without the standbys of synchronous_standby_names"
            }
            IndeterminateReason::ConfigurationChanged => {
                "synchronous_standby_names was emptied while it waited"
            }
            IndeterminateReason::Deposed => "the server learnt it is no longer the primary",
        }
    }
}

/// The code in an Error frame. Receivers must accept codes they do not know.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    pub const BAD_FRAME: ErrorCode = ErrorCode(1);
    pub const UNKNOWN_TYPE: ErrorCode = ErrorCode(2);
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(3);
    pub const AUTH_FAILED: ErrorCode = ErrorCode(4);
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode(5);
    pub const RECORD_TOO_LARGE: ErrorCode = ErrorCode(6);
    pub const TOO_MANY_IN_FLIGHT: ErrorCode = ErrorCode(7);
    pub const UNKNOWN_LSN: ErrorCode = ErrorCode(8);
    pub const SHUTTING_DOWN: ErrorCode = ErrorCode(9);
    pub const WAL_FULL: ErrorCode = ErrorCode(10);
    pub const INTERNAL: ErrorCode = ErrorCode(11);
    pub const TIMEOUT: ErrorCode = ErrorCode(12);
    /// The server is recovering and does not serve requests yet.
    pub const STARTING_UP: ErrorCode = ErrorCode(13);
    /// The server already has `max_connections` connections open.
    pub const TOO_MANY_CONNECTIONS: ErrorCode = ErrorCode(14);
    /// A write (Append, PageWrite, Checkpoint) sent to a standby. A core
    /// code: any client can meet it, not only a standby.
    pub const READ_ONLY: ErrorCode = ErrorCode(15);
    /// A page address or byte range that cannot exist (block too large,
    /// offset + length past the page). Page store codes start at 256.
    pub const BAD_PAGE: ErrorCode = ErrorCode(256);
    /// The page on the data device failed its checksum.
    pub const PAGE_CORRUPT: ErrorCode = ErrorCode(257);
    /// The data device failed (a read or write error, or it is full).
    pub const IO_ERROR: ErrorCode = ErrorCode(258);
    /// StartReplication from another system (system id or segment size).
    /// Replication codes start at 512.
    pub const SYSTEM_MISMATCH: ErrorCode = ErrorCode(512);
    /// The standby's timeline is not in the server's history at its start.
    pub const TIMELINE_NOT_IN_HISTORY: ErrorCode = ErrorCode(513);
    /// The server's term is below the standby's: it has been deposed.
    pub const STALE_TERM: ErrorCode = ErrorCode(514);
    pub const UNKNOWN_SLOT: ErrorCode = ErrorCode(515);
    /// The slot is in use by another standby's stream.
    pub const SLOT_ACTIVE: ErrorCode = ErrorCode(516);
    /// The slot fell behind `max_slot_wal_keep_size`; its WAL is gone.
    pub const SLOT_LOST: ErrorCode = ErrorCode(517);
    /// The standby's WAL diverged from the server's; the message names where.
    pub const DIVERGED: ErrorCode = ErrorCode(518);
    /// A SlotCommand creating a slot that exists.
    pub const SLOT_EXISTS: ErrorCode = ErrorCode(519);
    /// A base backup the server cannot take (it is a standby, or
    /// `full_page_writes` is off); the message says which.
    pub const BACKUP_REFUSED: ErrorCode = ErrorCode(520);
    /// Promote sent to a server that is not a standby (PostgreSQL's "server
    /// is not in standby mode"), or one that cannot promote itself.
    pub const NOT_IN_RECOVERY: ErrorCode = ErrorCode(521);

    pub const ALL: [ErrorCode; 28] = [
        ErrorCode::BAD_FRAME,
        ErrorCode::UNKNOWN_TYPE,
        ErrorCode::UNSUPPORTED_VERSION,
        ErrorCode::AUTH_FAILED,
        ErrorCode::FRAME_TOO_LARGE,
        ErrorCode::RECORD_TOO_LARGE,
        ErrorCode::TOO_MANY_IN_FLIGHT,
        ErrorCode::UNKNOWN_LSN,
        ErrorCode::SHUTTING_DOWN,
        ErrorCode::WAL_FULL,
        ErrorCode::INTERNAL,
        ErrorCode::TIMEOUT,
        ErrorCode::STARTING_UP,
        ErrorCode::TOO_MANY_CONNECTIONS,
        ErrorCode::READ_ONLY,
        ErrorCode::BAD_PAGE,
        ErrorCode::PAGE_CORRUPT,
        ErrorCode::IO_ERROR,
        ErrorCode::SYSTEM_MISMATCH,
        ErrorCode::TIMELINE_NOT_IN_HISTORY,
        ErrorCode::STALE_TERM,
        ErrorCode::UNKNOWN_SLOT,
        ErrorCode::SLOT_ACTIVE,
        ErrorCode::SLOT_LOST,
        ErrorCode::DIVERGED,
        ErrorCode::SLOT_EXISTS,
        ErrorCode::BACKUP_REFUSED,
        ErrorCode::NOT_IN_RECOVERY,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BAD_FRAME => "BAD_FRAME",
            ErrorCode::UNKNOWN_TYPE => "UNKNOWN_TYPE",
            ErrorCode::UNSUPPORTED_VERSION => "UNSUPPORTED_VERSION",
            ErrorCode::AUTH_FAILED => "AUTH_FAILED",
            ErrorCode::FRAME_TOO_LARGE => "FRAME_TOO_LARGE",
            ErrorCode::RECORD_TOO_LARGE => "RECORD_TOO_LARGE",
            ErrorCode::TOO_MANY_IN_FLIGHT => "TOO_MANY_IN_FLIGHT",
            ErrorCode::UNKNOWN_LSN => "UNKNOWN_LSN",
            ErrorCode::SHUTTING_DOWN => "SHUTTING_DOWN",
            ErrorCode::WAL_FULL => "WAL_FULL",
            ErrorCode::INTERNAL => "INTERNAL",
            ErrorCode::TIMEOUT => "TIMEOUT",
            ErrorCode::BAD_PAGE => "BAD_PAGE",
            ErrorCode::PAGE_CORRUPT => "PAGE_CORRUPT",
            ErrorCode::IO_ERROR => "IO_ERROR",
            ErrorCode::STARTING_UP => "STARTING_UP",
            ErrorCode::TOO_MANY_CONNECTIONS => "TOO_MANY_CONNECTIONS",
            ErrorCode::READ_ONLY => "READ_ONLY",
            ErrorCode::SYSTEM_MISMATCH => "SYSTEM_MISMATCH",
            ErrorCode::TIMELINE_NOT_IN_HISTORY => "TIMELINE_NOT_IN_HISTORY",
            ErrorCode::STALE_TERM => "STALE_TERM",
            ErrorCode::UNKNOWN_SLOT => "UNKNOWN_SLOT",
            ErrorCode::SLOT_ACTIVE => "SLOT_ACTIVE",
            ErrorCode::SLOT_LOST => "SLOT_LOST",
            ErrorCode::DIVERGED => "DIVERGED",
            ErrorCode::SLOT_EXISTS => "SLOT_EXISTS",
            ErrorCode::BACKUP_REFUSED => "BACKUP_REFUSED",
            ErrorCode::NOT_IN_RECOVERY => "NOT_IN_RECOVERY",
            _ => "UNKNOWN",
        }
    }

    /// Whether the server closes the connection after sending this code.
    /// The others fail one request and leave the stream in step; an unknown
    /// code is taken to close.
    pub fn closes_connection(self) -> bool {
        !matches!(
            self,
            ErrorCode::RECORD_TOO_LARGE
                | ErrorCode::TOO_MANY_IN_FLIGHT
                | ErrorCode::UNKNOWN_LSN
                | ErrorCode::WAL_FULL
                | ErrorCode::BAD_PAGE
                | ErrorCode::PAGE_CORRUPT
                | ErrorCode::IO_ERROR
                | ErrorCode::READ_ONLY
                | ErrorCode::TIMELINE_NOT_IN_HISTORY
                | ErrorCode::UNKNOWN_SLOT
                | ErrorCode::SLOT_ACTIVE
                | ErrorCode::SLOT_LOST
                | ErrorCode::DIVERGED
                | ErrorCode::NOT_IN_RECOVERY
                | ErrorCode::SLOT_EXISTS
        )
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a decoder accepts. Both sides use the server's values: HelloOk
/// carries them to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_frame_size: u32,
    pub max_records_per_frame: u32,
    pub max_record_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::for_max_record_size(1 << 20)
    }
}

impl Limits {
    /// Limits for a server whose `max_record_size` is `n`: frames large
    /// enough to carry one record of that size, and never below the default.
    pub fn for_max_record_size(n: u32) -> Limits {
        Limits {
            max_frame_size: n
                .saturating_add(ONE_RECORD_OVERHEAD)
                .max(DEFAULT_MAX_FRAME_SIZE),
            max_records_per_frame: 65536,
            max_record_size: n,
        }
    }
}

/// A record in a Records frame, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: Lsn,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// A record in a Records frame, borrowed from the frame's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub lsn: Lsn,
    pub kind: Kind,
    pub payload: &'a [u8],
}

impl<'a> From<&'a Record> for RecordRef<'a> {
    fn from(r: &'a Record) -> Self {
        RecordRef {
            lsn: r.lsn,
            kind: r.kind,
            payload: &r.payload,
        }
    }
}

/// A frame, owned. The hot paths have borrowed forms: [`encode_append`],
/// [`encode_ack`], [`encode_records`] and [`FrameRef`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello {
        request_id: u64,
        version: u16,
        token: Vec<u8>,
        client_name: String,
    },
    Append {
        request_id: u64,
        durability: Durability,
        records: Vec<(Kind, Vec<u8>)>,
    },
    Read {
        request_id: u64,
        from: Lsn,
        max_bytes: u32,
        max_records: u32,
    },
    Follow {
        request_id: u64,
        from: Lsn,
    },
    /// Ends the request with this id (a Follow, usually).
    Cancel {
        request_id: u64,
    },
    Status {
        request_id: u64,
    },
    /// Changes `data.len()` bytes at `offset` of a page's data.
    PageWrite {
        request_id: u64,
        durability: Durability,
        rel: u32,
        block: u32,
        offset: u16,
        data: Vec<u8>,
    },
    PageRead {
        request_id: u64,
        rel: u32,
        block: u32,
    },
    /// Runs an immediate checkpoint; answered when it completes.
    Checkpoint {
        request_id: u64,
    },
    /// A standby asks for the WAL from `start` (docs/protocol.md §4.10).
    StartReplication {
        request_id: u64,
        system_id: u64,
        timeline: u32,
        start: Lsn,
        term: u64,
        /// Empty: no slot. Otherwise `[a-z0-9_]`, at most MAX_NAME_LEN.
        slot: String,
        application_name: String,
    },
    /// A standby's write, flush and apply LSNs; `write ≥ flush ≥ apply`.
    StandbyStatus {
        request_id: u64,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        /// Microseconds since the Unix epoch.
        send_time: u64,
        reply_requested: bool,
    },
    TimelineHistory {
        request_id: u64,
        timeline: u32,
    },
    /// Creates or drops a replication slot (docs/protocol.md §4.13).
    SlotCommand {
        request_id: u64,
        op: SlotOp,
        /// `[a-z0-9_]`, 1 to MAX_NAME_LEN bytes.
        name: String,
    },
    /// A SlotCommand succeeded: the slot's restart LSN (0 after a drop).
    SlotResult {
        request_id: u64,
        restart_lsn: Lsn,
    },
    /// Asks for a base backup (docs/protocol.md §4.13).
    BaseBackup {
        request_id: u64,
        label: String,
    },
    HelloOk {
        request_id: u64,
        version: u16,
        system_id: u64,
        segment_size: u64,
        limits: Limits,
        max_in_flight: u32,
        server_name: String,
    },
    Ack {
        request_id: u64,
        lsns: Vec<Lsn>,
        end: Lsn,
    },
    Records {
        request_id: u64,
        records: Vec<Record>,
    },
    ReadEnd {
        request_id: u64,
        end: Lsn,
    },
    StatusReply {
        request_id: u64,
        insert_lsn: Lsn,
        write_lsn: Lsn,
        flush_lsn: Lsn,
        json: String,
    },
    /// The page write's record is at `lsn`; `end` (the page's new LSN) has
    /// reached the level asked for.
    PageWritten {
        request_id: u64,
        lsn: Lsn,
        end: Lsn,
    },
    /// The page's LSN and its PAGE_DATA bytes.
    PageData {
        request_id: u64,
        lsn: Lsn,
        data: Vec<u8>,
    },
    CheckpointDone {
        request_id: u64,
        checkpoint: Lsn,
        redo: Lsn,
    },
    /// Final reply of an Append that waited for a level it did not reach:
    /// the Ack's LSNs, the level reached, and why the wait ended.
    Indeterminate {
        request_id: u64,
        reached: Durability,
        reason: IndeterminateReason,
        lsns: Vec<Lsn>,
        end: Lsn,
    },
    /// The first frame of a replication stream.
    StreamStart {
        request_id: u64,
        term: u64,
        timeline: u32,
        flush: Lsn,
        commit: Lsn,
    },
    /// WAL bytes `[start, start + wal.len())` exactly as on disk; they end
    /// at or before `wal_end`.
    WalData {
        request_id: u64,
        start: Lsn,
        wal_end: Lsn,
        commit: Lsn,
        send_time: u64,
        wal: Vec<u8>,
    },
    Keepalive {
        request_id: u64,
        wal_end: Lsn,
        commit: Lsn,
        send_time: u64,
        reply_requested: bool,
    },
    TimelineEnd {
        request_id: u64,
        next_timeline: u32,
        switch: Lsn,
    },
    /// Asks a standby to end recovery and become a primary on a new
    /// timeline (`walden promote -H`, docs/protocol.md §4.14).
    Promote {
        request_id: u64,
    },
    /// The answer to Promote: the promotion started; `timeline` is the one
    /// the standby is leaving, `flush` its flush LSN when it stopped
    /// streaming (replay goes at least that far).
    PromoteResult {
        request_id: u64,
        timeline: u32,
        flush: Lsn,
    },
    HistoryData {
        request_id: u64,
        timeline: u32,
        history: Vec<u8>,
    },
    /// The first answer to a BaseBackup: where recovery of the copy starts,
    /// and every relation file with its length in blocks.
    BackupStart {
        request_id: u64,
        system_id: u64,
        timeline: u32,
        data_checksums: bool,
        segment_size: u64,
        checkpoint: Lsn,
        redo: Lsn,
        /// Microseconds since the Unix epoch.
        start_time: u64,
        /// (relation, blocks), relations strictly increasing.
        relations: Vec<(u32, u32)>,
    },
    /// Whole pages of one relation, as on disk, from `first_block` on.
    BackupPages {
        request_id: u64,
        rel: u32,
        first_block: u32,
        pages: Vec<u8>,
    },
    /// The last frame of a backup: the WAL up to `end` makes it consistent.
    BackupEnd {
        request_id: u64,
        end: Lsn,
    },
    Error {
        request_id: u64,
        code: ErrorCode,
        message: String,
    },
}

/// A decoded frame borrowing the decoder's buffer: payloads are not copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameRef<'a> {
    Hello {
        request_id: u64,
        version: u16,
        token: &'a [u8],
        client_name: &'a str,
    },
    Append {
        request_id: u64,
        durability: Durability,
        records: AppendRecords<'a>,
    },
    Read {
        request_id: u64,
        from: Lsn,
        max_bytes: u32,
        max_records: u32,
    },
    Follow {
        request_id: u64,
        from: Lsn,
    },
    Cancel {
        request_id: u64,
    },
    Status {
        request_id: u64,
    },
    PageWrite {
        request_id: u64,
        durability: Durability,
        rel: u32,
        block: u32,
        offset: u16,
        data: &'a [u8],
    },
    PageRead {
        request_id: u64,
        rel: u32,
        block: u32,
    },
    Checkpoint {
        request_id: u64,
    },
    /// A standby asks for the WAL from `start` (docs/protocol.md §4.10).
    StartReplication {
        request_id: u64,
        system_id: u64,
        timeline: u32,
        start: Lsn,
        term: u64,
        /// Empty: no slot. Otherwise `[a-z0-9_]`, at most MAX_NAME_LEN.
        slot: &'a str,
        application_name: &'a str,
    },
    /// A standby's write, flush and apply LSNs; `write ≥ flush ≥ apply`.
    StandbyStatus {
        request_id: u64,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        /// Microseconds since the Unix epoch.
        send_time: u64,
        reply_requested: bool,
    },
    TimelineHistory {
        request_id: u64,
        timeline: u32,
    },
    SlotCommand {
        request_id: u64,
        op: SlotOp,
        name: &'a str,
    },
    SlotResult {
        request_id: u64,
        restart_lsn: Lsn,
    },
    BaseBackup {
        request_id: u64,
        label: &'a str,
    },
    HelloOk {
        request_id: u64,
        version: u16,
        system_id: u64,
        segment_size: u64,
        limits: Limits,
        max_in_flight: u32,
        server_name: &'a str,
    },
    Ack {
        request_id: u64,
        lsns: AckLsns<'a>,
        end: Lsn,
    },
    Records {
        request_id: u64,
        records: ReadRecords<'a>,
    },
    ReadEnd {
        request_id: u64,
        end: Lsn,
    },
    StatusReply {
        request_id: u64,
        insert_lsn: Lsn,
        write_lsn: Lsn,
        flush_lsn: Lsn,
        json: &'a str,
    },
    PageWritten {
        request_id: u64,
        lsn: Lsn,
        end: Lsn,
    },
    PageData {
        request_id: u64,
        lsn: Lsn,
        data: &'a [u8],
    },
    CheckpointDone {
        request_id: u64,
        checkpoint: Lsn,
        redo: Lsn,
    },
    /// Final reply of an Append that waited for a level it did not reach:
    /// the Ack's LSNs, the level reached, and why the wait ended.
    Indeterminate {
        request_id: u64,
        reached: Durability,
        reason: IndeterminateReason,
        lsns: AckLsns<'a>,
        end: Lsn,
    },
    /// The first frame of a replication stream.
    StreamStart {
        request_id: u64,
        term: u64,
        timeline: u32,
        flush: Lsn,
        commit: Lsn,
    },
    /// WAL bytes `[start, start + wal.len())` exactly as on disk; they end
    /// at or before `wal_end`.
    WalData {
        request_id: u64,
        start: Lsn,
        wal_end: Lsn,
        commit: Lsn,
        send_time: u64,
        wal: &'a [u8],
    },
    Keepalive {
        request_id: u64,
        wal_end: Lsn,
        commit: Lsn,
        send_time: u64,
        reply_requested: bool,
    },
    TimelineEnd {
        request_id: u64,
        next_timeline: u32,
        switch: Lsn,
    },
    /// Asks a standby to end recovery and become a primary on a new
    /// timeline (`walden promote -H`, docs/protocol.md §4.14).
    Promote {
        request_id: u64,
    },
    /// The answer to Promote: the promotion started; `timeline` is the one
    /// the standby is leaving, `flush` its flush LSN when it stopped
    /// streaming (replay goes at least that far).
    PromoteResult {
        request_id: u64,
        timeline: u32,
        flush: Lsn,
    },
    HistoryData {
        request_id: u64,
        timeline: u32,
        history: &'a [u8],
    },
    BackupStart {
        request_id: u64,
        system_id: u64,
        timeline: u32,
        data_checksums: bool,
        segment_size: u64,
        checkpoint: Lsn,
        redo: Lsn,
        start_time: u64,
        relations: BackupRelations<'a>,
    },
    BackupPages {
        request_id: u64,
        rel: u32,
        first_block: u32,
        pages: &'a [u8],
    },
    BackupEnd {
        request_id: u64,
        end: Lsn,
    },
    Error {
        request_id: u64,
        code: ErrorCode,
        message: &'a str,
    },
}

impl Frame {
    pub fn request_id(&self) -> u64 {
        match *self {
            Frame::Hello { request_id, .. }
            | Frame::Append { request_id, .. }
            | Frame::Read { request_id, .. }
            | Frame::Follow { request_id, .. }
            | Frame::Cancel { request_id }
            | Frame::Status { request_id }
            | Frame::PageWrite { request_id, .. }
            | Frame::PageRead { request_id, .. }
            | Frame::Checkpoint { request_id }
            | Frame::PageWritten { request_id, .. }
            | Frame::PageData { request_id, .. }
            | Frame::CheckpointDone { request_id, .. }
            | Frame::HelloOk { request_id, .. }
            | Frame::Ack { request_id, .. }
            | Frame::Records { request_id, .. }
            | Frame::ReadEnd { request_id, .. }
            | Frame::StatusReply { request_id, .. }
            | Frame::StartReplication { request_id, .. }
            | Frame::StandbyStatus { request_id, .. }
            | Frame::TimelineHistory { request_id, .. }
            | Frame::SlotCommand { request_id, .. }
            | Frame::SlotResult { request_id, .. }
            | Frame::Indeterminate { request_id, .. }
            | Frame::StreamStart { request_id, .. }
            | Frame::WalData { request_id, .. }
            | Frame::Keepalive { request_id, .. }
            | Frame::TimelineEnd { request_id, .. }
            | Frame::Promote { request_id }
            | Frame::PromoteResult { request_id, .. }
            | Frame::HistoryData { request_id, .. }
            | Frame::BaseBackup { request_id, .. }
            | Frame::BackupStart { request_id, .. }
            | Frame::BackupPages { request_id, .. }
            | Frame::BackupEnd { request_id, .. }
            | Frame::Error { request_id, .. } => request_id,
        }
    }
}

impl FrameRef<'_> {
    pub fn request_id(&self) -> u64 {
        match *self {
            FrameRef::Hello { request_id, .. }
            | FrameRef::Append { request_id, .. }
            | FrameRef::Read { request_id, .. }
            | FrameRef::Follow { request_id, .. }
            | FrameRef::Cancel { request_id }
            | FrameRef::Status { request_id }
            | FrameRef::PageWrite { request_id, .. }
            | FrameRef::PageRead { request_id, .. }
            | FrameRef::Checkpoint { request_id }
            | FrameRef::PageWritten { request_id, .. }
            | FrameRef::PageData { request_id, .. }
            | FrameRef::CheckpointDone { request_id, .. }
            | FrameRef::HelloOk { request_id, .. }
            | FrameRef::Ack { request_id, .. }
            | FrameRef::Records { request_id, .. }
            | FrameRef::ReadEnd { request_id, .. }
            | FrameRef::StatusReply { request_id, .. }
            | FrameRef::StartReplication { request_id, .. }
            | FrameRef::StandbyStatus { request_id, .. }
            | FrameRef::TimelineHistory { request_id, .. }
            | FrameRef::SlotCommand { request_id, .. }
            | FrameRef::SlotResult { request_id, .. }
            | FrameRef::Indeterminate { request_id, .. }
            | FrameRef::StreamStart { request_id, .. }
            | FrameRef::WalData { request_id, .. }
            | FrameRef::Keepalive { request_id, .. }
            | FrameRef::TimelineEnd { request_id, .. }
            | FrameRef::Promote { request_id }
            | FrameRef::PromoteResult { request_id, .. }
            | FrameRef::HistoryData { request_id, .. }
            | FrameRef::BaseBackup { request_id, .. }
            | FrameRef::BackupStart { request_id, .. }
            | FrameRef::BackupPages { request_id, .. }
            | FrameRef::BackupEnd { request_id, .. }
            | FrameRef::Error { request_id, .. } => request_id,
        }
    }

    pub fn to_frame(&self) -> Frame {
        match *self {
            FrameRef::Hello {
                request_id,
                version,
                token,
                client_name,
            } => Frame::Hello {
                request_id,
                version,
                token: token.to_vec(),
                client_name: client_name.to_string(),
            },
            FrameRef::Append {
                request_id,
                durability,
                records,
            } => Frame::Append {
                request_id,
                durability,
                records: records.iter().map(|(k, p)| (k, p.to_vec())).collect(),
            },
            FrameRef::Read {
                request_id,
                from,
                max_bytes,
                max_records,
            } => Frame::Read {
                request_id,
                from,
                max_bytes,
                max_records,
            },
            FrameRef::Follow { request_id, from } => Frame::Follow { request_id, from },
            FrameRef::Cancel { request_id } => Frame::Cancel { request_id },
            FrameRef::Status { request_id } => Frame::Status { request_id },
            FrameRef::PageWrite {
                request_id,
                durability,
                rel,
                block,
                offset,
                data,
            } => Frame::PageWrite {
                request_id,
                durability,
                rel,
                block,
                offset,
                data: data.to_vec(),
            },
            FrameRef::PageRead {
                request_id,
                rel,
                block,
            } => Frame::PageRead {
                request_id,
                rel,
                block,
            },
            FrameRef::Checkpoint { request_id } => Frame::Checkpoint { request_id },
            FrameRef::PageWritten {
                request_id,
                lsn,
                end,
            } => Frame::PageWritten {
                request_id,
                lsn,
                end,
            },
            FrameRef::PageData {
                request_id,
                lsn,
                data,
            } => Frame::PageData {
                request_id,
                lsn,
                data: data.to_vec(),
            },
            FrameRef::CheckpointDone {
                request_id,
                checkpoint,
                redo,
            } => Frame::CheckpointDone {
                request_id,
                checkpoint,
                redo,
            },
            FrameRef::HelloOk {
                request_id,
                version,
                system_id,
                segment_size,
                limits,
                max_in_flight,
                server_name,
            } => Frame::HelloOk {
                request_id,
                version,
                system_id,
                segment_size,
                limits,
                max_in_flight,
                server_name: server_name.to_string(),
            },
            FrameRef::Ack {
                request_id,
                lsns,
                end,
            } => Frame::Ack {
                request_id,
                lsns: lsns.iter().collect(),
                end,
            },
            FrameRef::Records {
                request_id,
                records,
            } => Frame::Records {
                request_id,
                records: records
                    .iter()
                    .map(|r| Record {
                        lsn: r.lsn,
                        kind: r.kind,
                        payload: r.payload.to_vec(),
                    })
                    .collect(),
            },
            FrameRef::ReadEnd { request_id, end } => Frame::ReadEnd { request_id, end },
            FrameRef::StatusReply {
                request_id,
                insert_lsn,
                write_lsn,
                flush_lsn,
                json,
            } => Frame::StatusReply {
                request_id,
                insert_lsn,
                write_lsn,
                flush_lsn,
                json: json.to_string(),
            },
            FrameRef::StartReplication {
                request_id,
                system_id,
                timeline,
                start,
                term,
                slot,
                application_name,
            } => Frame::StartReplication {
                request_id,
                system_id,
                timeline,
                start,
                term,
                slot: slot.to_string(),
                application_name: application_name.to_string(),
            },
            FrameRef::StandbyStatus {
                request_id,
                write,
                flush,
                apply,
                send_time,
                reply_requested,
            } => Frame::StandbyStatus {
                request_id,
                write,
                flush,
                apply,
                send_time,
                reply_requested,
            },
            FrameRef::TimelineHistory {
                request_id,
                timeline,
            } => Frame::TimelineHistory {
                request_id,
                timeline,
            },
            FrameRef::SlotCommand {
                request_id,
                op,
                name,
            } => Frame::SlotCommand {
                request_id,
                op,
                name: name.to_string(),
            },
            FrameRef::SlotResult {
                request_id,
                restart_lsn,
            } => Frame::SlotResult {
                request_id,
                restart_lsn,
            },
            FrameRef::Indeterminate {
                request_id,
                reached,
                reason,
                lsns,
                end,
            } => Frame::Indeterminate {
                request_id,
                reached,
                reason,
                lsns: lsns.iter().collect(),
                end,
            },
            FrameRef::StreamStart {
                request_id,
                term,
                timeline,
                flush,
                commit,
            } => Frame::StreamStart {
                request_id,
                term,
                timeline,
                flush,
                commit,
            },
            FrameRef::WalData {
                request_id,
                start,
                wal_end,
                commit,
                send_time,
                wal,
            } => Frame::WalData {
                request_id,
                start,
                wal_end,
                commit,
                send_time,
                wal: wal.to_vec(),
            },
            FrameRef::Keepalive {
                request_id,
                wal_end,
                commit,
                send_time,
                reply_requested,
            } => Frame::Keepalive {
                request_id,
                wal_end,
                commit,
                send_time,
                reply_requested,
            },
            FrameRef::TimelineEnd {
                request_id,
                next_timeline,
                switch,
            } => Frame::TimelineEnd {
                request_id,
                next_timeline,
                switch,
            },
            FrameRef::Promote { request_id } => Frame::Promote { request_id },
            FrameRef::PromoteResult {
                request_id,
                timeline,
                flush,
            } => Frame::PromoteResult {
                request_id,
                timeline,
                flush,
            },
            FrameRef::HistoryData {
                request_id,
                timeline,
                history,
            } => Frame::HistoryData {
                request_id,
                timeline,
                history: history.to_vec(),
            },
            FrameRef::BaseBackup { request_id, label } => Frame::BaseBackup {
                request_id,
                label: label.to_string(),
            },
            FrameRef::BackupStart {
                request_id,
                system_id,
                timeline,
                data_checksums,
                segment_size,
                checkpoint,
                redo,
                start_time,
                relations,
            } => Frame::BackupStart {
                request_id,
                system_id,
                timeline,
                data_checksums,
                segment_size,
                checkpoint,
                redo,
                start_time,
                relations: relations.iter().collect(),
            },
            FrameRef::BackupPages {
                request_id,
                rel,
                first_block,
                pages,
            } => Frame::BackupPages {
                request_id,
                rel,
                first_block,
                pages: pages.to_vec(),
            },
            FrameRef::BackupEnd { request_id, end } => Frame::BackupEnd { request_id, end },
            FrameRef::Error {
                request_id,
                code,
                message,
            } => Frame::Error {
                request_id,
                code,
                message: message.to_string(),
            },
        }
    }
}

// ---------------------------------------------------------------- encoding
//
// Encoders append to `out` and never fail on a well-formed frame. They do not
// judge content (kind 0, an empty Append): the receiving decoder does. They
// panic only on a length the format cannot express (a token over 64 KiB, a
// frame over 4 GiB): that is the caller's bug, never the peer's input.

/// Appends the encoding of `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    match frame {
        Frame::Hello {
            request_id,
            version,
            token,
            client_name,
        } => {
            let at = begin(out, FrameType::Hello, *request_id);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&len16(token.len(), "token").to_le_bytes());
            out.extend_from_slice(&len16(client_name.len(), "client name").to_le_bytes());
            out.extend_from_slice(token);
            out.extend_from_slice(client_name.as_bytes());
            finish(out, at);
        }
        Frame::Append {
            request_id,
            durability,
            records,
        } => {
            let records = records.iter().map(|(k, p)| (*k, p.as_slice()));
            put_append(out, *request_id, *durability, records);
        }
        Frame::Read {
            request_id,
            from,
            max_bytes,
            max_records,
        } => {
            let at = begin(out, FrameType::Read, *request_id);
            out.extend_from_slice(&from.0.to_le_bytes());
            out.extend_from_slice(&max_bytes.to_le_bytes());
            out.extend_from_slice(&max_records.to_le_bytes());
            finish(out, at);
        }
        Frame::Follow { request_id, from } => {
            put_lsn_frame(out, FrameType::Follow, *request_id, *from)
        }
        // No body: the length `begin` writes is already right.
        Frame::Cancel { request_id } => _ = begin(out, FrameType::Cancel, *request_id),
        Frame::Status { request_id } => _ = begin(out, FrameType::Status, *request_id),
        Frame::Checkpoint { request_id } => _ = begin(out, FrameType::Checkpoint, *request_id),
        Frame::PageWrite {
            request_id,
            durability,
            rel,
            block,
            offset,
            data,
        } => encode_page_write(*request_id, *durability, *rel, *block, *offset, data, out),
        Frame::PageRead {
            request_id,
            rel,
            block,
        } => {
            let at = begin(out, FrameType::PageRead, *request_id);
            out.extend_from_slice(&rel.to_le_bytes());
            out.extend_from_slice(&block.to_le_bytes());
            finish(out, at);
        }
        Frame::PageWritten {
            request_id,
            lsn,
            end,
        } => put_two_lsns(out, FrameType::PageWritten, *request_id, *lsn, *end),
        Frame::CheckpointDone {
            request_id,
            checkpoint,
            redo,
        } => put_two_lsns(
            out,
            FrameType::CheckpointDone,
            *request_id,
            *checkpoint,
            *redo,
        ),
        Frame::PageData {
            request_id,
            lsn,
            data,
        } => encode_page_data(*request_id, *lsn, data, out),
        Frame::HelloOk {
            request_id,
            version,
            system_id,
            segment_size,
            limits,
            max_in_flight,
            server_name,
        } => {
            let at = begin(out, FrameType::HelloOk, *request_id);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&system_id.to_le_bytes());
            out.extend_from_slice(&segment_size.to_le_bytes());
            out.extend_from_slice(&limits.max_frame_size.to_le_bytes());
            out.extend_from_slice(&limits.max_records_per_frame.to_le_bytes());
            out.extend_from_slice(&limits.max_record_size.to_le_bytes());
            out.extend_from_slice(&max_in_flight.to_le_bytes());
            out.extend_from_slice(&len16(server_name.len(), "server name").to_le_bytes());
            out.extend_from_slice(server_name.as_bytes());
            finish(out, at);
        }
        Frame::Ack {
            request_id,
            lsns,
            end,
        } => encode_ack(*request_id, lsns, *end, out),
        Frame::Records {
            request_id,
            records,
        } => encode_records(*request_id, records.iter().map(RecordRef::from), out),
        Frame::ReadEnd { request_id, end } => {
            put_lsn_frame(out, FrameType::ReadEnd, *request_id, *end)
        }
        Frame::StatusReply {
            request_id,
            insert_lsn,
            write_lsn,
            flush_lsn,
            json,
        } => {
            let at = begin(out, FrameType::StatusReply, *request_id);
            for lsn in [insert_lsn, write_lsn, flush_lsn] {
                out.extend_from_slice(&lsn.0.to_le_bytes());
            }
            out.extend_from_slice(json.as_bytes());
            finish(out, at);
        }
        Frame::StartReplication {
            request_id,
            system_id,
            timeline,
            start,
            term,
            slot,
            application_name,
        } => {
            let at = begin(out, FrameType::StartReplication, *request_id);
            out.extend_from_slice(&system_id.to_le_bytes());
            out.extend_from_slice(&timeline.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes()); // flags: none defined
            out.extend_from_slice(&start.0.to_le_bytes());
            out.extend_from_slice(&term.to_le_bytes());
            out.extend_from_slice(&len16(slot.len(), "slot name").to_le_bytes());
            out.extend_from_slice(&len16(application_name.len(), "application name").to_le_bytes());
            out.extend_from_slice(slot.as_bytes());
            out.extend_from_slice(application_name.as_bytes());
            finish(out, at);
        }
        Frame::StandbyStatus {
            request_id,
            write,
            flush,
            apply,
            send_time,
            reply_requested,
        } => {
            let at = begin(out, FrameType::StandbyStatus, *request_id);
            for v in [write.0, flush.0, apply.0, *send_time] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.push(u8::from(*reply_requested));
            finish(out, at);
        }
        Frame::TimelineHistory {
            request_id,
            timeline,
        } => {
            let at = begin(out, FrameType::TimelineHistory, *request_id);
            out.extend_from_slice(&timeline.to_le_bytes());
            finish(out, at);
        }
        Frame::SlotCommand {
            request_id,
            op,
            name,
        } => {
            let at = begin(out, FrameType::SlotCommand, *request_id);
            out.push(*op as u8);
            out.extend_from_slice(name.as_bytes());
            finish(out, at);
        }
        Frame::SlotResult {
            request_id,
            restart_lsn,
        } => {
            let at = begin(out, FrameType::SlotResult, *request_id);
            out.extend_from_slice(&restart_lsn.0.to_le_bytes());
            finish(out, at);
        }
        Frame::Indeterminate {
            request_id,
            reached,
            reason,
            lsns,
            end,
        } => encode_indeterminate(*request_id, *reached, *reason, lsns, *end, out),
        Frame::StreamStart {
            request_id,
            term,
            timeline,
            flush,
            commit,
        } => {
            let at = begin(out, FrameType::StreamStart, *request_id);
            out.extend_from_slice(&term.to_le_bytes());
            out.extend_from_slice(&timeline.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes()); // reserved
            out.extend_from_slice(&flush.0.to_le_bytes());
            out.extend_from_slice(&commit.0.to_le_bytes());
            finish(out, at);
        }
        Frame::WalData {
            request_id,
            start,
            wal_end,
            commit,
            send_time,
            wal,
        } => encode_wal_data(*request_id, *start, *wal_end, *commit, *send_time, wal, out),
        Frame::Keepalive {
            request_id,
            wal_end,
            commit,
            send_time,
            reply_requested,
        } => {
            let at = begin(out, FrameType::Keepalive, *request_id);
            for v in [wal_end.0, commit.0, *send_time] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.push(u8::from(*reply_requested));
            finish(out, at);
        }
        Frame::TimelineEnd {
            request_id,
            next_timeline,
            switch,
        } => {
            let at = begin(out, FrameType::TimelineEnd, *request_id);
            out.extend_from_slice(&next_timeline.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes()); // reserved
            out.extend_from_slice(&switch.0.to_le_bytes());
            finish(out, at);
        }
        Frame::Promote { request_id } => _ = begin(out, FrameType::Promote, *request_id),
        Frame::PromoteResult {
            request_id,
            timeline,
            flush,
        } => {
            let at = begin(out, FrameType::PromoteResult, *request_id);
            out.extend_from_slice(&timeline.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes()); // reserved
            out.extend_from_slice(&flush.0.to_le_bytes());
            finish(out, at);
        }
        Frame::HistoryData {
            request_id,
            timeline,
            history,
        } => {
            let at = begin(out, FrameType::HistoryData, *request_id);
            out.extend_from_slice(&timeline.to_le_bytes());
            out.extend_from_slice(history);
            finish(out, at);
        }
        Frame::BaseBackup { request_id, label } => {
            let at = begin(out, FrameType::BaseBackup, *request_id);
            out.extend_from_slice(&0u32.to_le_bytes()); // flags: none defined
            out.extend_from_slice(label.as_bytes());
            finish(out, at);
        }
        Frame::BackupStart {
            request_id,
            system_id,
            timeline,
            data_checksums,
            segment_size,
            checkpoint,
            redo,
            start_time,
            relations,
        } => {
            let at = begin(out, FrameType::BackupStart, *request_id);
            out.extend_from_slice(&system_id.to_le_bytes());
            out.extend_from_slice(&timeline.to_le_bytes());
            let flags = if *data_checksums {
                BACKUP_DATA_CHECKSUMS
            } else {
                0
            };
            out.extend_from_slice(&flags.to_le_bytes());
            for v in [*segment_size, checkpoint.0, redo.0, *start_time] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&len32(relations.len(), "relations").to_le_bytes());
            for (rel, blocks) in relations {
                out.extend_from_slice(&rel.to_le_bytes());
                out.extend_from_slice(&blocks.to_le_bytes());
            }
            finish(out, at);
        }
        Frame::BackupPages {
            request_id,
            rel,
            first_block,
            pages,
        } => encode_backup_pages(*request_id, *rel, *first_block, pages, out),
        Frame::BackupEnd { request_id, end } => {
            put_lsn_frame(out, FrameType::BackupEnd, *request_id, *end)
        }
        Frame::Error {
            request_id,
            code,
            message,
        } => {
            let at = begin(out, FrameType::Error, *request_id);
            out.extend_from_slice(&code.0.to_le_bytes());
            out.extend_from_slice(message.as_bytes());
            finish(out, at);
        }
    }
}

/// An Append of borrowed records, without building a [`Frame`].
pub fn encode_append(
    request_id: u64,
    durability: Durability,
    records: &[(Kind, &[u8])],
    out: &mut Vec<u8>,
) {
    put_append(out, request_id, durability, records.iter().copied());
}

/// An Ack for records at `lsns` (as the engine returned them: increasing,
/// 8-byte aligned), `end` being the end of the last one.
pub fn encode_ack(request_id: u64, lsns: &[Lsn], end: Lsn, out: &mut Vec<u8>) {
    let at = begin(out, FrameType::Ack, request_id);
    put_ack_body(out, lsns, end);
    finish(out, at);
}

/// An Indeterminate: the level reached and why the wait ended, then the
/// body of the Ack the Append would have had.
pub fn encode_indeterminate(
    request_id: u64,
    reached: Durability,
    reason: IndeterminateReason,
    lsns: &[Lsn],
    end: Lsn,
    out: &mut Vec<u8>,
) {
    let at = begin(out, FrameType::Indeterminate, request_id);
    out.push(durability_to_wire(reached));
    out.push(reason as u8);
    put_ack_body(out, lsns, end);
    finish(out, at);
}

/// WalData from borrowed WAL bytes (straight from the ring or a segment).
pub fn encode_wal_data(
    request_id: u64,
    start: Lsn,
    wal_end: Lsn,
    commit: Lsn,
    send_time: u64,
    wal: &[u8],
    out: &mut Vec<u8>,
) {
    let at = begin(out, FrameType::WalData, request_id);
    for v in [start.0, wal_end.0, commit.0, send_time] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(wal);
    finish(out, at);
}

/// BackupPages from borrowed page bytes (whole pages, as read from disk).
pub fn encode_backup_pages(
    request_id: u64,
    rel: u32,
    first_block: u32,
    pages: &[u8],
    out: &mut Vec<u8>,
) {
    let at = begin(out, FrameType::BackupPages, request_id);
    out.extend_from_slice(&rel.to_le_bytes());
    out.extend_from_slice(&first_block.to_le_bytes());
    out.extend_from_slice(pages);
    finish(out, at);
}

/// The relations of a BackupStart, borrowed: (relation, blocks) pairs,
/// checked by the decoder (relations strictly increasing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupRelations<'a>(&'a [u8]);

impl<'a> BackupRelations<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + 'a {
        self.0.chunks_exact(8).map(|c| {
            (
                u32::from_le_bytes(c[..4].try_into().expect("4 bytes")),
                u32::from_le_bytes(c[4..].try_into().expect("4 bytes")),
            )
        })
    }
}

/// `end`, count, first LSN, then the steps: an Ack's body.
fn put_ack_body(out: &mut Vec<u8>, lsns: &[Lsn], end: Lsn) {
    out.extend_from_slice(&end.0.to_le_bytes());
    out.extend_from_slice(&len32(lsns.len(), "LSNs").to_le_bytes());
    let first = lsns.first().map_or(0, |l| l.0);
    out.extend_from_slice(&first.to_le_bytes());
    for pair in lsns.windows(2) {
        let delta = pair[1].0.wrapping_sub(pair[0].0);
        assert!(
            pair[1] > pair[0] && delta % ALIGN == 0,
            "ack LSNs must increase in steps of 8: {} then {}",
            pair[0],
            pair[1]
        );
        put_varint(out, delta / ALIGN);
    }
}

/// A Records frame from borrowed records (straight from a WAL reader).
pub fn encode_records<'r>(
    request_id: u64,
    records: impl IntoIterator<Item = RecordRef<'r>>,
    out: &mut Vec<u8>,
) {
    let at = begin(out, FrameType::Records, request_id);
    let count_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let mut count = 0usize;
    for r in records {
        out.extend_from_slice(&r.lsn.0.to_le_bytes());
        out.push(r.kind.0);
        out.extend_from_slice(&len32(r.payload.len(), "payload").to_le_bytes());
        out.extend_from_slice(r.payload);
        count += 1;
    }
    out[count_at..count_at + 4].copy_from_slice(&len32(count, "records").to_le_bytes());
    finish(out, at);
}

fn put_append<'r>(
    out: &mut Vec<u8>,
    request_id: u64,
    durability: Durability,
    records: impl ExactSizeIterator<Item = (Kind, &'r [u8])>,
) {
    let at = begin(out, FrameType::Append, request_id);
    out.push(durability_to_wire(durability));
    out.extend_from_slice(&len32(records.len(), "records").to_le_bytes());
    for (kind, payload) in records {
        out.push(kind.0);
        out.extend_from_slice(&len32(payload.len(), "payload").to_le_bytes());
        out.extend_from_slice(payload);
    }
    finish(out, at);
}

/// A PageWrite from borrowed bytes.
pub fn encode_page_write(
    request_id: u64,
    durability: Durability,
    rel: u32,
    block: u32,
    offset: u16,
    data: &[u8],
    out: &mut Vec<u8>,
) {
    let at = begin(out, FrameType::PageWrite, request_id);
    out.push(durability_to_wire(durability));
    out.extend_from_slice(&rel.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(data);
    finish(out, at);
}

/// A PageData from borrowed bytes (`data` is PAGE_DATA bytes).
pub fn encode_page_data(request_id: u64, lsn: Lsn, data: &[u8], out: &mut Vec<u8>) {
    let at = begin(out, FrameType::PageData, request_id);
    out.extend_from_slice(&lsn.0.to_le_bytes());
    out.extend_from_slice(data);
    finish(out, at);
}

fn put_two_lsns(out: &mut Vec<u8>, ty: FrameType, request_id: u64, a: Lsn, b: Lsn) {
    let at = begin(out, ty, request_id);
    out.extend_from_slice(&a.0.to_le_bytes());
    out.extend_from_slice(&b.0.to_le_bytes());
    finish(out, at);
}

fn put_lsn_frame(out: &mut Vec<u8>, ty: FrameType, request_id: u64, lsn: Lsn) {
    let at = begin(out, ty, request_id);
    out.extend_from_slice(&lsn.0.to_le_bytes());
    finish(out, at);
}

/// Writes a header for a frame without a body and returns where it starts;
/// `finish` corrects the length once a body follows.
fn begin(out: &mut Vec<u8>, ty: FrameType, request_id: u64) -> usize {
    let at = out.len();
    out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&[ty as u8, 0, 0, 0]);
    out.extend_from_slice(&request_id.to_le_bytes());
    at
}

/// Patches the length of the frame that starts at `at`.
fn finish(out: &mut [u8], at: usize) {
    let len = len32(out.len() - at, "frame");
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

fn len16(n: usize, what: &str) -> u16 {
    u16::try_from(n).unwrap_or_else(|_| panic!("{what} of {n} bytes does not fit a u16 length"))
}

fn len32(n: usize, what: &str) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| panic!("{what}: {n} does not fit a u32 length"))
}

/// LEB128: 7 bits a byte, low first, high bit set on all but the last.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn durability_to_wire(d: Durability) -> u8 {
    match d {
        Durability::Off => 0,
        Durability::Local => 1,
        Durability::RemoteWrite => 2,
        Durability::On => 3,
        Durability::RemoteApply => 4,
    }
}

pub fn durability_from_wire(b: u8) -> Option<Durability> {
    Some(match b {
        0 => Durability::Off,
        1 => Durability::Local,
        2 => Durability::RemoteWrite,
        3 => Durability::On,
        4 => Durability::RemoteApply,
        _ => return None,
    })
}

// ---------------------------------------------------------------- decoding

/// A frame the decoder refused, with the request id from its header (every
/// check needs the complete header, so the id is always known).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{problem} (request {request_id})")]
pub struct ProtocolError {
    pub request_id: u64,
    pub problem: Problem,
}

impl ProtocolError {
    pub fn code(&self) -> ErrorCode {
        self.problem.code()
    }

    pub fn closes_connection(&self) -> bool {
        self.code().closes_connection()
    }

    /// The Error frame that answers this.
    pub fn to_frame(&self) -> Frame {
        Frame::Error {
            request_id: self.request_id,
            code: self.code(),
            message: self.problem.to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("frame length {len} is shorter than the {HEADER_LEN}-byte header")]
    FrameTooShort { len: u32 },
    #[error("frame of {len} bytes is larger than max_frame_size ({max} bytes)")]
    FrameTooLarge { len: u32, max: u32 },
    #[error(
        "frame of {len} bytes before Hello: at most {max} bytes are accepted until Hello succeeds"
    )]
    LargeBeforeHello { len: u32, max: u32 },
    #[error("{ty:?} frame before Hello: the first frame on a connection must be Hello")]
    BeforeHello { ty: FrameType },
    #[error("unknown frame type {ty:#04x} {direction}")]
    UnknownType { ty: u8, direction: Direction },
    #[error("flags {flags:#04x} and reserved {reserved:#06x} in the header must be 0")]
    HeaderBits { flags: u8, reserved: u16 },
    #[error("request id 0 is only for Error frames about the whole connection")]
    ZeroRequestId,
    #[error("{ty:?} frame with a body of {len} bytes: expected {}", expected(*min, *max))]
    BodyLength {
        ty: FrameType,
        len: usize,
        min: usize,
        max: usize,
    },
    #[error("{ty:?} frame ends inside its {field}")]
    Truncated { ty: FrameType, field: &'static str },
    #[error("{ty:?} frame has {count} bytes after its last field")]
    TrailingBytes { ty: FrameType, count: usize },
    #[error("{ty:?} frame has no records")]
    NoRecords { ty: FrameType },
    #[error("{ty:?} frame has {count} records, more than max_records_per_frame ({max})")]
    TooManyRecords { ty: FrameType, count: u32, max: u32 },
    #[error("record {index} has {len} bytes, more than max_record_size ({max} bytes)")]
    RecordTooLarge { index: u32, len: u32, max: u32 },
    #[error("invalid durability level {0}: expected 0 to 4")]
    InvalidDurability(u8),
    #[error("record {index} has kind 0")]
    InvalidKind { index: u32 },
    #[error("record {index} has kind {kind}, which only walden itself may write")]
    ReservedKind { index: u32, kind: u8 },
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("{ty:?} frame: {what}")]
    BadLsn { ty: FrameType, what: &'static str },
    #[error("{ty:?} frame: timeline 0 does not exist (timelines start at 1)")]
    ZeroTimeline { ty: FrameType },
    #[error("{ty:?} frame: {field} is {value:#010x}, must be 0")]
    NonZero {
        ty: FrameType,
        field: &'static str,
        value: u32,
    },
    #[error(
        "{field} of {len} bytes is longer than {MAX_NAME_LEN} bytes (PostgreSQL's NAMEDATALEN - 1)"
    )]
    NameTooLong { field: &'static str, len: u16 },
    #[error(
        "slot name has byte {byte:#04x} at offset {at}: only lower case letters, digits and the underscore are allowed"
    )]
    InvalidSlotName { at: usize, byte: u8 },
    #[error("{field} is {value}: expected 0 or 1")]
    InvalidFlag { field: &'static str, value: u8 },
    #[error("{ty:?} frame: {later} LSN {later_lsn} is past {earlier} LSN {earlier_lsn}")]
    LsnOrder {
        ty: FrameType,
        earlier: &'static str,
        earlier_lsn: Lsn,
        later: &'static str,
        later_lsn: Lsn,
    },
    #[error("WalData frame: {len} bytes from {start} end past wal_end {wal_end}")]
    WalPastEnd {
        start: Lsn,
        len: usize,
        wal_end: Lsn,
    },
    #[error("Indeterminate frame: reached level {0} is not below any level an Append can ask for: expected 0 to 3")]
    InvalidReached(u8),
    #[error("Indeterminate frame: invalid reason {0}: expected 1 to 6")]
    InvalidReason(u8),
    #[error("SlotCommand frame: invalid op {0}: expected 1 (create) or 2 (drop)")]
    InvalidSlotOp(u8),
    #[error("BackupStart frame: flags {0:#010x} has bits other than 0x1 (data checksums)")]
    BackupFlags(u32),
    #[error("BackupStart frame: {count} relations need {need} bytes, {have} follow")]
    BackupRelationCount { count: u32, need: u64, have: usize },
    #[error("BackupStart frame: relation {rel} follows relation {prev}: relations must increase")]
    BackupRelationOrder { prev: u32, rel: u32 },
    #[error("BackupStart frame: relation {rel} has {blocks} blocks, more than {MAX_BLOCKS}")]
    BackupRelationSize { rel: u32, blocks: u32 },
    #[error(
        "BackupPages frame: {len} bytes of pages is not a multiple of the {PAGE_SIZE}-byte page"
    )]
    PartialPage { len: usize },
    #[error("BackupPages frame: {count} pages from block {first} end past block {MAX_BLOCKS}")]
    PagesPastEnd { first: u32, count: usize },
}

fn expected(min: usize, max: usize) -> String {
    match max {
        usize::MAX => format!("at least {min}"),
        _ if max == min => min.to_string(),
        _ => format!("{min} to {max}"),
    }
}

impl Problem {
    pub fn code(&self) -> ErrorCode {
        match self {
            Problem::FrameTooLarge { .. }
            | Problem::LargeBeforeHello { .. }
            | Problem::TooManyRecords { .. } => ErrorCode::FRAME_TOO_LARGE,
            Problem::UnknownType { .. } => ErrorCode::UNKNOWN_TYPE,
            Problem::RecordTooLarge { .. } => ErrorCode::RECORD_TOO_LARGE,
            _ => ErrorCode::BAD_FRAME,
        }
    }
}

/// Decodes the frame at the start of `buf`. `Ok(None)`: more bytes are
/// needed. `Ok(Some((frame, len)))`: the frame occupies `buf[..len]`. Never
/// panics and never allocates, whatever `buf` holds.
pub fn decode<'a>(
    buf: &'a [u8],
    direction: Direction,
    limits: &Limits,
) -> Result<Option<(FrameRef<'a>, usize)>, ProtocolError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let [l0, l1, l2, l3, ty, flags, r0, r1, id @ ..] = *header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let reserved = u16::from_le_bytes([r0, r1]);
    let request_id = u64::from_le_bytes(id);
    let fail = |problem| {
        Err(ProtocolError {
            request_id,
            problem,
        })
    };

    // IMPORTANT: everything up to the body check uses the 16 header bytes
    // only: a hostile length or type is refused before its body is buffered.
    if (len as usize) < HEADER_LEN {
        return fail(Problem::FrameTooShort { len });
    }
    if len > limits.max_frame_size {
        return fail(Problem::FrameTooLarge {
            len,
            max: limits.max_frame_size,
        });
    }
    let Some(ty) = FrameType::from_u8(ty).filter(|t| t.direction() == direction) else {
        return fail(Problem::UnknownType { ty, direction });
    };
    if flags != 0 || reserved != 0 {
        return fail(Problem::HeaderBits { flags, reserved });
    }
    if request_id == 0 && ty != FrameType::Error {
        return fail(Problem::ZeroRequestId);
    }
    let body_len = len as usize - HEADER_LEN;
    let (min, max) = ty.body_len();
    if body_len < min || body_len > max {
        return fail(Problem::BodyLength {
            ty,
            len: body_len,
            min,
            max,
        });
    }
    let Some(body) = buf.get(HEADER_LEN..len as usize) else {
        return Ok(None);
    };
    match decode_body(ty, request_id, body, limits) {
        Ok(frame) => Ok(Some((frame, len as usize))),
        Err(problem) => fail(problem),
    }
}

/// Before Hello, from the 16 header bytes alone: a frame larger than
/// [`MAX_HELLO_FRAME`] (in place of check 3 of `decode`), or a frame of a
/// known type other than Hello (right after check 4), is refused. What else
/// is wrong with the header `decode` reports, in its order.
fn check_before_hello(pending: &[u8], direction: Direction) -> Result<(), ProtocolError> {
    let Some(header) = pending.first_chunk::<HEADER_LEN>() else {
        return Ok(());
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let request_id = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    if (len as usize) < HEADER_LEN {
        return Ok(()); // check 2
    }
    let problem = if len > MAX_HELLO_FRAME {
        Problem::LargeBeforeHello {
            len,
            max: MAX_HELLO_FRAME,
        }
    } else {
        match FrameType::from_u8(header[4]) {
            Some(ty) if ty.direction() == direction && ty != FrameType::Hello => {
                Problem::BeforeHello { ty }
            }
            _ => return Ok(()),
        }
    };
    Err(ProtocolError {
        request_id,
        problem,
    })
}

fn decode_body<'a>(
    ty: FrameType,
    request_id: u64,
    bytes: &'a [u8],
    limits: &Limits,
) -> Result<FrameRef<'a>, Problem> {
    let mut b = Body::new(ty, bytes);
    let frame = match ty {
        FrameType::Hello => {
            let version = b.u16("version")?;
            let token_len = b.u16("token length")?;
            let name_len = b.u16("client name length")?;
            let token = b.take(token_len.into(), "token")?;
            let client_name = utf8(b.take(name_len.into(), "client name")?, "client name")?;
            FrameRef::Hello {
                request_id,
                version,
                token,
                client_name,
            }
        }
        FrameType::Append => {
            let level = b.u8("durability")?;
            let durability =
                durability_from_wire(level).ok_or(Problem::InvalidDurability(level))?;
            let records = AppendRecords::check(&mut b, limits)?;
            FrameRef::Append {
                request_id,
                durability,
                records,
            }
        }
        FrameType::Read => FrameRef::Read {
            request_id,
            from: b.lsn("from LSN")?,
            max_bytes: b.u32("max bytes")?,
            max_records: b.u32("max records")?,
        },
        FrameType::Follow => FrameRef::Follow {
            request_id,
            from: b.lsn("from LSN")?,
        },
        FrameType::Cancel => FrameRef::Cancel { request_id },
        FrameType::Status => FrameRef::Status { request_id },
        FrameType::Checkpoint => FrameRef::Checkpoint { request_id },
        FrameType::PageWrite => {
            let level = b.u8("durability")?;
            let durability =
                durability_from_wire(level).ok_or(Problem::InvalidDurability(level))?;
            FrameRef::PageWrite {
                request_id,
                durability,
                rel: b.u32("relation")?,
                block: b.u32("block")?,
                offset: b.u16("offset")?,
                data: b.rest(),
            }
        }
        FrameType::PageRead => FrameRef::PageRead {
            request_id,
            rel: b.u32("relation")?,
            block: b.u32("block")?,
        },
        FrameType::PageWritten => FrameRef::PageWritten {
            request_id,
            lsn: b.lsn("record LSN")?,
            end: b.lsn("end LSN")?,
        },
        FrameType::CheckpointDone => FrameRef::CheckpointDone {
            request_id,
            checkpoint: b.lsn("checkpoint LSN")?,
            redo: b.lsn("redo LSN")?,
        },
        FrameType::PageData => FrameRef::PageData {
            request_id,
            lsn: Lsn(b.u64("page LSN")?),
            data: b.rest(),
        },
        FrameType::HelloOk => FrameRef::HelloOk {
            request_id,
            version: b.u16("version")?,
            system_id: b.u64("system identifier")?,
            segment_size: b.u64("segment size")?,
            limits: Limits {
                max_frame_size: b.u32("max frame size")?,
                max_records_per_frame: b.u32("max records per frame")?,
                max_record_size: b.u32("max record size")?,
            },
            max_in_flight: b.u32("max in flight")?,
            server_name: {
                let n = b.u16("server name length")?;
                utf8(b.take(n.into(), "server name")?, "server name")?
            },
        },
        FrameType::Ack => {
            let end = b.lsn("end LSN")?;
            let lsns = AckLsns::check(&mut b, end, limits)?;
            FrameRef::Ack {
                request_id,
                lsns,
                end,
            }
        }
        FrameType::Records => FrameRef::Records {
            request_id,
            records: ReadRecords::check(&mut b, limits)?,
        },
        FrameType::ReadEnd => FrameRef::ReadEnd {
            request_id,
            end: b.lsn("end LSN")?,
        },
        FrameType::StatusReply => FrameRef::StatusReply {
            request_id,
            insert_lsn: b.lsn("insert LSN")?,
            write_lsn: b.lsn("write LSN")?,
            flush_lsn: b.lsn("flush LSN")?,
            json: utf8(b.rest(), "status JSON")?,
        },
        FrameType::StartReplication => {
            let system_id = b.u64("system identifier")?;
            let timeline = b.timeline()?;
            let flags = b.u32("flags")?;
            if flags != 0 {
                return Err(Problem::NonZero {
                    ty,
                    field: "flags",
                    value: flags,
                });
            }
            let start = b.lsn("start LSN")?;
            if start.0 == 0 || start.0 % ALIGN != 0 {
                return Err(Problem::BadLsn {
                    ty,
                    what: "start LSN must be a record start: non-zero and a multiple of 8",
                });
            }
            let term = b.u64("term")?;
            let slot_len = b.name_len("slot name")?;
            let name_len = b.name_len("application name")?;
            let slot = b.take(slot_len, "slot name")?;
            // As PostgreSQL's ReplicationSlotValidateName; all ASCII, so
            // valid UTF-8 too. Empty means no slot.
            if let Some(at) = slot
                .iter()
                .position(|c| !matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_'))
            {
                return Err(Problem::InvalidSlotName { at, byte: slot[at] });
            }
            let slot = utf8(slot, "slot name")?;
            let application_name = utf8(b.take(name_len, "application name")?, "application name")?;
            FrameRef::StartReplication {
                request_id,
                system_id,
                timeline,
                start,
                term,
                slot,
                application_name,
            }
        }
        FrameType::StandbyStatus => {
            let write = b.lsn("write LSN")?;
            let flush = b.lsn("flush LSN")?;
            b.lsn_order(("write", write), ("flush", flush))?;
            let apply = b.lsn("apply LSN")?;
            b.lsn_order(("flush", flush), ("apply", apply))?;
            FrameRef::StandbyStatus {
                request_id,
                write,
                flush,
                apply,
                send_time: b.u64("send time")?,
                reply_requested: b.flag("reply_requested")?,
            }
        }
        FrameType::TimelineHistory => FrameRef::TimelineHistory {
            request_id,
            timeline: b.timeline()?,
        },
        FrameType::SlotCommand => {
            let op = b.u8("op")?;
            let op = SlotOp::from_wire(op).ok_or(Problem::InvalidSlotOp(op))?;
            let name = b.rest();
            if let Some(at) = name
                .iter()
                .position(|c| !matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_'))
            {
                return Err(Problem::InvalidSlotName { at, byte: name[at] });
            }
            FrameRef::SlotCommand {
                request_id,
                op,
                name: utf8(name, "slot name")?,
            }
        }
        FrameType::SlotResult => FrameRef::SlotResult {
            request_id,
            restart_lsn: b.lsn("restart LSN")?,
        },
        FrameType::Indeterminate => {
            let reached = b.u8("reached level")?;
            let reached = durability_from_wire(reached)
                .filter(|d| *d != Durability::RemoteApply)
                .ok_or(Problem::InvalidReached(reached))?;
            let reason = b.u8("reason")?;
            let reason =
                IndeterminateReason::from_wire(reason).ok_or(Problem::InvalidReason(reason))?;
            let end = b.lsn("end LSN")?;
            let lsns = AckLsns::check(&mut b, end, limits)?;
            FrameRef::Indeterminate {
                request_id,
                reached,
                reason,
                lsns,
                end,
            }
        }
        FrameType::StreamStart => {
            let term = b.u64("term")?;
            let timeline = b.timeline()?;
            b.reserved_u32()?;
            FrameRef::StreamStart {
                request_id,
                term,
                timeline,
                flush: b.lsn("flush LSN")?,
                commit: b.lsn("commit LSN")?,
            }
        }
        FrameType::WalData => {
            let start = b.lsn("start LSN")?;
            let wal_end = b.lsn("wal_end")?;
            let commit = b.lsn("commit LSN")?;
            let send_time = b.u64("send time")?;
            let wal = b.rest();
            // IMPORTANT: a primary sends only WAL it has flushed (wal_end).
            let end = start.0.checked_add(wal.len() as u64);
            if end.map_or(true, |e| e > wal_end.0) {
                return Err(Problem::WalPastEnd {
                    start,
                    len: wal.len(),
                    wal_end,
                });
            }
            FrameRef::WalData {
                request_id,
                start,
                wal_end,
                commit,
                send_time,
                wal,
            }
        }
        FrameType::Keepalive => FrameRef::Keepalive {
            request_id,
            wal_end: b.lsn("wal_end")?,
            commit: b.lsn("commit LSN")?,
            send_time: b.u64("send time")?,
            reply_requested: b.flag("reply_requested")?,
        },
        FrameType::TimelineEnd => {
            let next_timeline = b.timeline()?;
            b.reserved_u32()?;
            FrameRef::TimelineEnd {
                request_id,
                next_timeline,
                switch: b.lsn("switch LSN")?,
            }
        }
        FrameType::Promote => FrameRef::Promote { request_id },
        FrameType::PromoteResult => {
            let timeline = b.timeline()?;
            b.reserved_u32()?;
            FrameRef::PromoteResult {
                request_id,
                timeline,
                flush: b.lsn("flush LSN")?,
            }
        }
        FrameType::HistoryData => FrameRef::HistoryData {
            request_id,
            timeline: b.timeline()?,
            history: b.rest(),
        },
        FrameType::BaseBackup => {
            let flags = b.u32("flags")?;
            if flags != 0 {
                return Err(Problem::NonZero {
                    ty,
                    field: "flags",
                    value: flags,
                });
            }
            FrameRef::BaseBackup {
                request_id,
                label: utf8(b.rest(), "backup label")?,
            }
        }
        FrameType::BackupStart => {
            let system_id = b.u64("system identifier")?;
            let timeline = b.timeline()?;
            let flags = b.u32("flags")?;
            if flags & !BACKUP_DATA_CHECKSUMS != 0 {
                return Err(Problem::BackupFlags(flags));
            }
            let segment_size = b.u64("segment size")?;
            let checkpoint = b.lsn("checkpoint LSN")?;
            let redo = b.lsn("redo LSN")?;
            if redo.0 == 0 || redo.0 % ALIGN != 0 || checkpoint.0 % ALIGN != 0 {
                return Err(Problem::BadLsn {
                    ty,
                    what: "redo and checkpoint LSNs must be record starts: non-zero and multiples of 8",
                });
            }
            b.lsn_order(("checkpoint", checkpoint), ("redo", redo))?;
            let start_time = b.u64("start time")?;
            let count = b.u32("relation count")?;
            let rest = b.rest();
            let need = u64::from(count) * 8;
            if need != rest.len() as u64 {
                return Err(Problem::BackupRelationCount {
                    count,
                    need,
                    have: rest.len(),
                });
            }
            let relations = BackupRelations(rest);
            let mut prev: Option<u32> = None;
            for (rel, blocks) in relations.iter() {
                if let Some(p) = prev.filter(|&p| rel <= p) {
                    return Err(Problem::BackupRelationOrder { prev: p, rel });
                }
                if blocks > MAX_BLOCKS {
                    return Err(Problem::BackupRelationSize { rel, blocks });
                }
                prev = Some(rel);
            }
            FrameRef::BackupStart {
                request_id,
                system_id,
                timeline,
                data_checksums: flags & BACKUP_DATA_CHECKSUMS != 0,
                segment_size,
                checkpoint,
                redo,
                start_time,
                relations,
            }
        }
        FrameType::BackupPages => {
            let rel = b.u32("relation")?;
            let first_block = b.u32("first block")?;
            let pages = b.rest();
            if pages.len() % PAGE_SIZE != 0 {
                return Err(Problem::PartialPage { len: pages.len() });
            }
            let count = pages.len() / PAGE_SIZE;
            if u64::from(first_block) + count as u64 > u64::from(MAX_BLOCKS) {
                return Err(Problem::PagesPastEnd {
                    first: first_block,
                    count,
                });
            }
            FrameRef::BackupPages {
                request_id,
                rel,
                first_block,
                pages,
            }
        }
        FrameType::BackupEnd => FrameRef::BackupEnd {
            request_id,
            end: b.lsn("end LSN")?,
        },
        FrameType::Error => FrameRef::Error {
            request_id,
            code: ErrorCode(b.u16("code")?),
            message: utf8(b.rest(), "error message")?,
        },
    };
    b.finish()?;
    Ok(frame)
}

fn utf8<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, Problem> {
    std::str::from_utf8(bytes).map_err(|_| Problem::InvalidUtf8 { field })
}

/// A cursor over a frame body. Every read is bounds-checked and names the
/// field it was reading when the body ran out.
#[derive(Debug)]
struct Body<'a> {
    ty: FrameType,
    rest: &'a [u8],
    /// A problem that does not close the connection (an oversized record),
    /// reported only if the whole body is otherwise valid.
    deferred: Option<Problem>,
}

impl<'a> Body<'a> {
    fn new(ty: FrameType, rest: &'a [u8]) -> Self {
        Body {
            ty,
            rest,
            deferred: None,
        }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Problem> {
        if self.rest.len() < n {
            return Err(Problem::Truncated { ty: self.ty, field });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Problem> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, Problem> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, Problem> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, Problem> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, Problem> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, Problem> {
        self.u64(field).map(Lsn)
    }

    /// A timeline id: 1 or more, as PostgreSQL's.
    fn timeline(&mut self) -> Result<u32, Problem> {
        match self.u32("timeline")? {
            0 => Err(Problem::ZeroTimeline { ty: self.ty }),
            t => Ok(t),
        }
    }

    /// A reserved u32 field, which must be 0.
    fn reserved_u32(&mut self) -> Result<(), Problem> {
        match self.u32("reserved")? {
            0 => Ok(()),
            value => Err(Problem::NonZero {
                ty: self.ty,
                field: "reserved",
                value,
            }),
        }
    }

    /// A boolean byte: 0 or 1 only, so that it re-encodes the same.
    fn flag(&mut self, field: &'static str) -> Result<bool, Problem> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(Problem::InvalidFlag { field, value }),
        }
    }

    /// The u16 length of a name, at most [`MAX_NAME_LEN`].
    fn name_len(&mut self, field: &'static str) -> Result<usize, Problem> {
        let len = self.u16(field)?;
        if usize::from(len) > MAX_NAME_LEN {
            return Err(Problem::NameTooLong { field, len });
        }
        Ok(len.into())
    }

    /// `later` must not be past `earlier` (a standby's write ≥ flush ≥ apply).
    fn lsn_order(
        &self,
        (earlier, earlier_lsn): (&'static str, Lsn),
        (later, later_lsn): (&'static str, Lsn),
    ) -> Result<(), Problem> {
        if later_lsn > earlier_lsn {
            return Err(Problem::LsnOrder {
                ty: self.ty,
                earlier,
                earlier_lsn,
                later,
                later_lsn,
            });
        }
        Ok(())
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// LEB128, canonical only (no redundant high zero groups), so that every
    /// accepted frame re-encodes to the same bytes.
    fn varint(&mut self, field: &'static str) -> Result<u64, Problem> {
        let bad = Problem::BadLsn {
            ty: self.ty,
            what: "overlong or non-canonical LSN step",
        };
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8(field)?;
            let bits = u64::from(byte & 0x7F);
            if (shift == 63 && bits > 1) || (shift > 0 && byte == 0) {
                return Err(bad);
            }
            v |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad)
    }

    /// The record count of an Append, Ack or Records frame.
    fn count(&mut self, limits: &Limits) -> Result<u32, Problem> {
        let count = self.u32("record count")?;
        if count == 0 {
            return Err(Problem::NoRecords { ty: self.ty });
        }
        // IMPORTANT: bounds the per-record work and the LSN list a server
        // builds for the Ack, whatever the body says.
        if count > limits.max_records_per_frame {
            let max = limits.max_records_per_frame;
            return Err(Problem::TooManyRecords {
                ty: self.ty,
                count,
                max,
            });
        }
        Ok(count)
    }

    /// A record's kind and payload (what follows any LSN).
    fn record(&mut self, index: u32) -> Result<(Kind, &'a [u8]), Problem> {
        let kind = self.u8("record kind")?;
        if kind == 0 {
            return Err(Problem::InvalidKind { index });
        }
        let len = self.u32("record length")?;
        // IMPORTANT: `take` checks the length against the bytes present, so
        // a record can never reach past its frame.
        let payload = self.take(len as usize, "record payload")?;
        Ok((Kind(kind), payload))
    }

    /// Notes a record over `max_record_size`; `finish` reports the first.
    fn check_size(&mut self, index: u32, payload: &[u8], limits: &Limits) {
        let (len, max) = (payload.len() as u32, limits.max_record_size);
        if len > max && self.deferred.is_none() {
            self.deferred = Some(Problem::RecordTooLarge { index, len, max });
        }
    }

    fn finish(self) -> Result<(), Problem> {
        if !self.rest.is_empty() {
            return Err(Problem::TrailingBytes {
                ty: self.ty,
                count: self.rest.len(),
            });
        }
        self.deferred.map_or(Ok(()), Err)
    }
}

/// Record LSNs in a frame must be valid, 8-byte aligned and increasing.
fn check_lsn(ty: FrameType, lsn: u64, prev: Option<u64>) -> Result<(), Problem> {
    let what = "record LSNs must be non-zero, multiples of 8 and increasing";
    if lsn == 0 || lsn % ALIGN != 0 || prev.is_some_and(|p| lsn <= p) {
        return Err(Problem::BadLsn { ty, what });
    }
    Ok(())
}

/// The records of an Append, validated; iterating yields `(kind, payload)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendRecords<'a> {
    count: u32,
    bytes: &'a [u8],
}

impl<'a> AppendRecords<'a> {
    fn check(b: &mut Body<'a>, limits: &Limits) -> Result<Self, Problem> {
        let count = b.count(limits)?;
        let bytes = b.rest;
        for index in 0..count {
            let (kind, payload) = b.record(index)?;
            // IMPORTANT: kinds 128..=255 (page images, checkpoints) are
            // trusted by recovery; a client must not be able to forge one.
            if kind.0 >= 128 {
                return Err(Problem::ReservedKind {
                    index,
                    kind: kind.0,
                });
            }
            b.check_size(index, payload, limits);
        }
        Ok(AppendRecords { count, bytes })
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (Kind, &'a [u8])> + 'a {
        // The frame was validated whole: `record` cannot fail here.
        let mut b = Body::new(FrameType::Append, self.bytes);
        (0..self.count).map_while(move |i| b.record(i).ok())
    }
}

/// The LSNs of an Ack, validated: the first, then steps as varints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckLsns<'a> {
    count: u32,
    first: Lsn,
    steps: &'a [u8],
}

impl<'a> AckLsns<'a> {
    fn check(b: &mut Body<'a>, end: Lsn, limits: &Limits) -> Result<Self, Problem> {
        let count = b.count(limits)?;
        let first = b.lsn("first LSN")?;
        let steps = b.rest;
        let (ty, mut lsn) = (b.ty, first.0);
        check_lsn(ty, lsn, None)?;
        for _ in 1..count {
            let next = b
                .varint("LSN steps")?
                .checked_mul(ALIGN)
                .and_then(|d| lsn.checked_add(d))
                .ok_or(Problem::BadLsn {
                    ty,
                    what: "LSN step overflows",
                })?;
            check_lsn(ty, next, Some(lsn))?;
            lsn = next;
        }
        if end.0 <= lsn {
            return Err(Problem::BadLsn {
                ty,
                what: "end LSN is not after the last record",
            });
        }
        Ok(AckLsns {
            count,
            first,
            steps,
        })
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn first(&self) -> Lsn {
        self.first
    }

    pub fn iter(&self) -> impl Iterator<Item = Lsn> + 'a {
        let mut b = Body::new(FrameType::Ack, self.steps);
        let mut lsn = self.first.0;
        let rest = (1..self.count).map_while(move |_| {
            lsn = lsn.wrapping_add(b.varint("LSN steps").ok()?.wrapping_mul(ALIGN));
            Some(Lsn(lsn))
        });
        std::iter::once(self.first).chain(rest)
    }
}

/// The records of a Records frame, validated; iterating yields [`RecordRef`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRecords<'a> {
    count: u32,
    bytes: &'a [u8],
}

impl<'a> ReadRecords<'a> {
    fn check(b: &mut Body<'a>, limits: &Limits) -> Result<Self, Problem> {
        let count = b.count(limits)?;
        let bytes = b.rest;
        let mut prev = None;
        for index in 0..count {
            let lsn = b.u64("record LSN")?;
            check_lsn(b.ty, lsn, prev)?;
            let (_, payload) = b.record(index)?;
            b.check_size(index, payload, limits);
            prev = Some(lsn);
        }
        Ok(ReadRecords { count, bytes })
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'a>> + 'a {
        let mut b = Body::new(FrameType::Records, self.bytes);
        (0..self.count).map_while(move |i| {
            let lsn = Lsn(b.u64("record LSN").ok()?);
            let (kind, payload) = b.record(i).ok()?;
            Some(RecordRef { lsn, kind, payload })
        })
    }
}

/// Frames from a byte stream that arrives in pieces. Feed what recv returned
/// with [`extend`](Decoder::extend), then call
/// [`next_frame`](Decoder::next_frame) until it returns `Ok(None)`.
///
/// The buffer never grows past `max_frame_size`: `extend` takes only what
/// fits and says how much. After draining every complete frame there is
/// always room, since a partial frame is shorter than its own (checked)
/// length.
#[derive(Debug)]
pub struct Decoder {
    direction: Direction,
    limits: Limits,
    buf: Vec<u8>,
    /// `buf[start..]` is not decoded yet.
    start: usize,
    /// Set by an error that closes the connection: nothing after it is
    /// decoded, since the stream can no longer be trusted to be in step.
    failed: Option<ProtocolError>,
    /// Until the server accepted a Hello: only Hello, at most
    /// [`MAX_HELLO_FRAME`] bytes, judged from the header.
    awaiting_hello: bool,
}

impl Decoder {
    pub fn new(direction: Direction, limits: Limits) -> Self {
        Decoder {
            direction,
            limits,
            buf: Vec::new(),
            start: 0,
            failed: None,
            awaiting_hello: false,
        }
    }

    /// A server's decoder for a new connection: until
    /// [`Decoder::hello_accepted`] it buffers at most [`MAX_HELLO_FRAME`]
    /// bytes and refuses, from the header alone, any frame but Hello and any
    /// frame larger than that (both close the connection). So a client that
    /// has not authenticated costs the server at most that much.
    pub fn awaiting_hello(limits: Limits) -> Self {
        Decoder {
            awaiting_hello: true,
            ..Decoder::new(Direction::ToServer, limits)
        }
    }

    /// The server accepted the Hello: from now on `limits` apply.
    pub fn hello_accepted(&mut self) {
        self.awaiting_hello = false;
    }

    /// The most bytes this decoder holds.
    fn max_buffered(&self) -> usize {
        if self.awaiting_hello {
            MAX_HELLO_FRAME as usize
        } else {
            self.limits.max_frame_size as usize
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A client adopts the limits its server announced in HelloOk.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Buffers as much of `data` as fits and returns how many bytes it took;
    /// the caller keeps the rest for after the next `next_frame` calls.
    /// After an error that closes the connection, input is discarded.
    pub fn extend(&mut self, data: &[u8]) -> usize {
        if self.failed.is_some() {
            return data.len();
        }
        self.buf.drain(..self.start);
        self.start = 0;
        let max = self.max_buffered();
        // IMPORTANT: never hold more than max_frame_size bytes (before Hello,
        // MAX_HELLO_FRAME), and never let Vec's doubling reserve more either.
        let n = data.len().min(max.saturating_sub(self.buf.len()));
        let need = self.buf.len() + n;
        if need > self.buf.capacity() {
            // need <= max here: n was cut to the room left under max.
            let cap = (self.buf.capacity() * 2).max(need).max(4096).min(max);
            self.buf.reserve_exact(cap - self.buf.len());
        }
        self.buf.extend_from_slice(&data[..n]);
        n
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or why
    /// the next frame is refused. After an error that does not close the
    /// connection (`RECORD_TOO_LARGE`) the frame is skipped and decoding can
    /// go on; after any other, every call returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<FrameRef<'_>>, ProtocolError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let pending = &self.buf[self.start..];
        if self.awaiting_hello {
            if let Err(e) = check_before_hello(pending, self.direction) {
                self.failed = Some(e.clone());
                return Err(e);
            }
        }
        match decode(pending, self.direction, &self.limits) {
            Ok(Some((frame, len))) => {
                self.start += len;
                Ok(Some(frame))
            }
            Ok(None) => Ok(None),
            Err(e) if e.closes_connection() => {
                self.failed = Some(e.clone());
                Err(e)
            }
            Err(e) => {
                // The header was valid, so its length is the frame's.
                let len = pending
                    .first_chunk::<4>()
                    .map_or(0, |l| u32::from_le_bytes(*l));
                self.start += len as usize;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        encode(frame, &mut out);
        out
    }

    #[test]
    fn durability_bytes_are_stable() {
        for (i, d) in Durability::ALL.into_iter().enumerate() {
            assert_eq!(durability_to_wire(d), i as u8);
            assert_eq!(durability_from_wire(i as u8), Some(d));
        }
        assert_eq!(durability_from_wire(5), None);
    }

    #[test]
    fn fixed_size_frames_match_their_body_length() {
        let frames = [
            Frame::Read {
                request_id: 1,
                from: Lsn(8),
                max_bytes: 1,
                max_records: 1,
            },
            Frame::Follow {
                request_id: 1,
                from: Lsn(8),
            },
            Frame::Cancel { request_id: 1 },
            Frame::Status { request_id: 1 },
            Frame::ReadEnd {
                request_id: 1,
                end: Lsn(8),
            },
            Frame::StandbyStatus {
                request_id: 1,
                write: Lsn(8),
                flush: Lsn(8),
                apply: Lsn(8),
                send_time: 1,
                reply_requested: true,
            },
            Frame::TimelineHistory {
                request_id: 1,
                timeline: 1,
            },
            Frame::StreamStart {
                request_id: 1,
                term: 1,
                timeline: 1,
                flush: Lsn(8),
                commit: Lsn(8),
            },
            Frame::Keepalive {
                request_id: 1,
                wal_end: Lsn(8),
                commit: Lsn(8),
                send_time: 1,
                reply_requested: false,
            },
            Frame::TimelineEnd {
                request_id: 1,
                next_timeline: 2,
                switch: Lsn(8),
            },
            Frame::PromoteResult {
                request_id: 1,
                timeline: 1,
                flush: Lsn(8),
            },
        ];
        for f in &frames {
            let b = bytes(f);
            let ty = FrameType::from_u8(b[4]).unwrap();
            assert_eq!(
                ty.body_len(),
                (b.len() - HEADER_LEN, b.len() - HEADER_LEN),
                "{ty:?}"
            );
        }
        let smallest = Frame::Error {
            request_id: 0,
            code: ErrorCode::INTERNAL,
            message: String::new(),
        };
        assert_eq!(
            bytes(&smallest).len() - HEADER_LEN,
            FrameType::Error.body_len().0
        );
        let one = Frame::Records {
            request_id: 1,
            records: vec![Record {
                lsn: Lsn(8),
                kind: Kind::DATA,
                payload: vec![],
            }],
        };
        assert_eq!(bytes(&one).len() as u32, ONE_RECORD_OVERHEAD);
        // The smallest and largest StartReplication, Indeterminate, WalData
        // and HistoryData.
        let start = |name: &str| Frame::StartReplication {
            request_id: 1,
            system_id: 1,
            timeline: 1,
            start: Lsn(8),
            term: 1,
            slot: name.replace('x', "_"),
            application_name: name.into(),
        };
        let (min, max) = FrameType::StartReplication.body_len();
        assert_eq!(bytes(&start("")).len() - HEADER_LEN, min);
        let longest = "x".repeat(MAX_NAME_LEN);
        assert_eq!(bytes(&start(&longest)).len() - HEADER_LEN, max);
        let smallest = [
            Frame::Indeterminate {
                request_id: 1,
                reached: Durability::Local,
                reason: IndeterminateReason::Timeout,
                lsns: vec![Lsn(8)],
                end: Lsn(16),
            },
            Frame::WalData {
                request_id: 1,
                start: Lsn(8),
                wal_end: Lsn(9),
                commit: Lsn(0),
                send_time: 0,
                wal: vec![0],
            },
            Frame::HistoryData {
                request_id: 1,
                timeline: 2,
                history: vec![],
            },
        ];
        for f in &smallest {
            let b = bytes(f);
            let ty = FrameType::from_u8(b[4]).unwrap();
            assert_eq!(ty.body_len().0, b.len() - HEADER_LEN, "{ty:?}");
        }
    }

    #[test]
    fn varints_must_be_canonical() {
        let read = |b: &[u8]| Body::new(FrameType::Ack, b).varint("x");
        for v in [0, 1, 127, 128, 300, u64::MAX / 8, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(read(&out), Ok(v));
        }
        assert!(read(&[0x80, 0x00]).is_err(), "redundant zero group");
        assert!(read(&[0xFF; 9].iter().chain(&[0x02]).copied().collect::<Vec<_>>()).is_err());
        assert!(read(&[0xFF; 11]).is_err());
        assert!(matches!(read(&[0x80]), Err(Problem::Truncated { .. })));
    }

    #[test]
    fn decoder_never_holds_more_than_max_frame_size() {
        let limits = Limits {
            max_frame_size: 10_000,
            max_records_per_frame: 100,
            max_record_size: 9_000,
        };
        let mut frames = Vec::new();
        for i in 1..50u64 {
            let payload = vec![i as u8; (i as usize * 997) % 9_000];
            encode_append(i, Durability::Local, &[(Kind::DATA, &payload)], &mut frames);
        }
        let mut d = Decoder::new(Direction::ToServer, limits);
        let (mut rest, mut seen) = (&frames[..], 0);
        while !rest.is_empty() {
            let n = d.extend(&rest[..rest.len().min(7_000)]);
            rest = &rest[n..];
            assert!(d.buf.capacity() <= 10_000, "capacity {}", d.buf.capacity());
            while let Some(f) = d.next_frame().unwrap() {
                seen += 1;
                assert_eq!(f.request_id(), seen);
            }
        }
        assert_eq!(seen, 49);
        // A header announcing 4 GiB is refused from the header alone, and
        // the buffer stays within the limit.
        let mut d = Decoder::new(Direction::ToServer, limits);
        let mut hostile = vec![
            0xFF, 0xFF, 0xFF, 0xFF, 0x02, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
        ];
        hostile.resize(1 << 20, 0xAB);
        assert_eq!(d.extend(&hostile), 10_000);
        assert_eq!(
            d.next_frame().unwrap_err().code(),
            ErrorCode::FRAME_TOO_LARGE
        );
        assert_eq!(
            d.extend(&hostile),
            hostile.len(),
            "input after a fatal error is dropped"
        );
        assert!(d.buf.capacity() <= 10_000);
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(1), Some(1));
        assert_eq!(negotiate_version(7), Some(VERSION));
        assert_eq!(negotiate_version(0), None);
    }

    #[test]
    fn before_hello_only_a_small_hello_is_taken() {
        let limits = Limits::default();
        let hello = bytes(&Frame::Hello {
            request_id: 1,
            version: VERSION,
            token: b"secret".to_vec(),
            client_name: "test".into(),
        });
        // A 64 KiB frame is refused from its header, before any body byte.
        let mut big = Vec::new();
        big.extend_from_slice(&(64u32 << 10).to_le_bytes());
        big.extend_from_slice(&[0x01, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        let mut d = Decoder::awaiting_hello(limits);
        assert_eq!(d.extend(&big), big.len());
        let e = d.next_frame().unwrap_err();
        assert_eq!(e.code(), ErrorCode::FRAME_TOO_LARGE);
        assert_eq!(e.request_id, 7);
        assert!(e.to_string().contains("before Hello"), "{e}");
        // So is any other frame, however small, before its body arrives.
        let mut append = Vec::new();
        encode_append(
            3,
            Durability::Local,
            &[(Kind::DATA, &[1u8; 100][..])],
            &mut append,
        );
        let mut d = Decoder::awaiting_hello(limits);
        d.extend(&append[..HEADER_LEN]);
        let e = d.next_frame().unwrap_err();
        assert_eq!((e.code(), e.request_id), (ErrorCode::BAD_FRAME, 3));
        assert!(e.to_string().contains("Append frame before Hello"), "{e}");
        // Nothing past MAX_HELLO_FRAME is buffered before Hello; requests
        // pipelined behind it are taken once the Hello is accepted.
        let mut stream = hello.clone();
        for i in 0..100 {
            encode_append(
                i + 2,
                Durability::Off,
                &[(Kind::DATA, &[9u8; 100][..])],
                &mut stream,
            );
        }
        let mut d = Decoder::awaiting_hello(limits);
        let mut rest = &stream[..];
        let n = d.extend(rest);
        assert_eq!(n, MAX_HELLO_FRAME as usize);
        rest = &rest[n..];
        assert!(matches!(d.next_frame(), Ok(Some(FrameRef::Hello { .. }))));
        d.hello_accepted();
        let mut seen = 0;
        loop {
            while let Some(f) = d.next_frame().unwrap() {
                seen += 1;
                assert_eq!(f.request_id(), seen + 1);
            }
            if rest.is_empty() {
                break;
            }
            let n = d.extend(rest);
            rest = &rest[n..];
        }
        assert_eq!(seen, 100);
        // A client decoder (or one past Hello) knows no such limit.
        let mut d = Decoder::new(Direction::ToServer, limits);
        d.extend(&append[..HEADER_LEN]);
        assert!(matches!(d.next_frame(), Ok(None)));
    }

    #[test]
    fn error_codes_are_named_and_say_whether_they_close() {
        let keep = [
            ErrorCode::RECORD_TOO_LARGE,
            ErrorCode::TOO_MANY_IN_FLIGHT,
            ErrorCode::UNKNOWN_LSN,
            ErrorCode::WAL_FULL,
            ErrorCode::READ_ONLY,
            ErrorCode::BAD_PAGE,
            ErrorCode::PAGE_CORRUPT,
            ErrorCode::IO_ERROR,
            ErrorCode::TIMELINE_NOT_IN_HISTORY,
            ErrorCode::UNKNOWN_SLOT,
            ErrorCode::SLOT_ACTIVE,
            ErrorCode::SLOT_LOST,
            ErrorCode::DIVERGED,
            ErrorCode::SLOT_EXISTS,
            ErrorCode::NOT_IN_RECOVERY,
        ];
        for (i, c) in ErrorCode::ALL.into_iter().enumerate() {
            // Core codes from 1 (to 255), the page store's from 256 (to
            // 511), replication's from 512 (to 767), each without gaps.
            let want = match i {
                0..15 => i + 1,
                15..18 => 256 + i - 15,
                _ => 512 + i - 18,
            };
            assert_eq!(c.0 as usize, want, "{c}");
            assert_ne!(c.name(), "UNKNOWN");
            assert_eq!(c.closes_connection(), !keep.contains(&c), "{c}");
        }
        assert_eq!(ErrorCode(0).name(), "UNKNOWN");
        assert_eq!(ErrorCode(999).to_string(), "UNKNOWN");
        assert!(ErrorCode(999).closes_connection());
    }
}
