//! A blocking, pipelined client of the wire protocol (docs/protocol.md): send
//! many requests, then read the answers as they come. Used by the CLI, the
//! bench and the tests. It knows the protocol, never the server's insides.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::durability::Durability;
use crate::lsn::Lsn;
use crate::protocol::{self, Direction, ErrorCode, Frame, Limits, ProtocolError, Record};
use crate::record::Kind;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // The OS error is part of the message and deliberately not a `source`:
    // `{:#}` and anyhow's chain would print it twice.
    #[error("could not connect to {addr}: {error}")]
    Connect { addr: String, error: std::io::Error },
    #[error("connection error: {0}")]
    Io(std::io::Error),
    #[error("server error {code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("protocol error from the server: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server closed the connection")]
    Closed,
    #[error("unexpected answer from the server: {0}")]
    Unexpected(String),
    /// The wait for the level asked ended without it: the records are in
    /// the server's WAL (at `reached`), not confirmed at the level asked.
    /// Never a success, never a failure: the commit may survive a
    /// failover or not.
    #[error(
        "INDETERMINATE: records up to {end} were written (reached {reached}) but not confirmed \
         at the level asked: {}", reason.describe()
    )]
    Indeterminate {
        request_id: u64,
        reached: Durability,
        reason: protocol::IndeterminateReason,
        lsns: Vec<Lsn>,
        end: Lsn,
    },
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> ClientError {
        ClientError::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// An acknowledged Append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub request_id: u64,
    pub lsns: Vec<Lsn>,
    pub end: Lsn,
}

pub struct Client {
    stream: TcpStream,
    /// Received bytes are `rbuf[rpos..rend]`; the buffer is zeroed once and
    /// reused, never resized per read.
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    wbuf: Vec<u8>,
    next_id: u64,
    limits: Limits,
    pub server_name: String,
    pub segment_size: u64,
    pub max_in_flight: u32,
    /// The server's page store's system identifier (0 from servers that
    /// do not say).
    pub system_id: u64,
}

impl Client {
    /// Connects and says Hello (with `token` if the server wants one).
    pub fn connect(addr: &str, token: Option<&[u8]>) -> Result<Client> {
        let stream = TcpStream::connect(addr).map_err(|error| ClientError::Connect {
            addr: addr.to_string(),
            error,
        })?;
        stream.set_nodelay(true)?;
        let mut c = Client {
            stream,
            rbuf: vec![0; 256 << 10],
            rpos: 0,
            rend: 0,
            wbuf: Vec::with_capacity(64 << 10),
            next_id: 1,
            // Until HelloOk tells the server's limits, accept large frames.
            limits: Limits::for_max_record_size(512 << 20),
            server_name: String::new(),
            segment_size: 0,
            max_in_flight: 0,
            system_id: 0,
        };
        let id = c.next_request_id();
        c.queue(&Frame::Hello {
            request_id: id,
            version: protocol::VERSION,
            token: token.unwrap_or_default().to_vec(),
            client_name: format!("walden-client {}", env!("CARGO_PKG_VERSION")),
        });
        c.flush()?;
        match c.recv()? {
            Frame::HelloOk {
                server_name,
                segment_size,
                limits,
                max_in_flight,
                system_id,
                ..
            } => {
                c.system_id = system_id;
                c.server_name = server_name;
                c.segment_size = segment_size;
                c.max_in_flight = max_in_flight;
                c.limits = Limits {
                    max_frame_size: limits.max_frame_size.max(c.limits.max_frame_size),
                    ..limits
                };
                Ok(c)
            }
            other => Err(unexpected(other)),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<()> {
        Ok(self.stream.set_read_timeout(t)?)
    }

    /// Non-blocking mode, for a caller that polls many connections (the
    /// bench): [`Client::try_recv`] then returns `None` instead of waiting,
    /// and [`Client::flush`] still sends everything (it waits for room).
    pub fn set_nonblocking(&self, on: bool) -> Result<()> {
        Ok(self.stream.set_nonblocking(on)?)
    }

    /// The socket, to poll for readability.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }

    /// The next frame if a whole one is already buffered; never reads.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>> {
        self.decode_buffered()?.map(check_error).transpose()
    }

    /// The next frame if one is buffered or can be read without waiting
    /// (non-blocking mode); Error frames become `Err` as in [`Client::recv`].
    pub fn try_recv(&mut self) -> Result<Option<Frame>> {
        if !self.wbuf.is_empty() {
            self.flush()?;
        }
        if let Some(f) = self.next_buffered()? {
            return Ok(Some(f));
        }
        match self.read_more() {
            Ok(()) => self.next_buffered(),
            Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The server's limits (from HelloOk).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn next_request_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Queues `frame` to be sent by the next [`Client::flush`].
    pub fn queue(&mut self, frame: &Frame) {
        protocol::encode(frame, &mut self.wbuf);
    }

    /// Sends everything queued (in non-blocking mode too: it waits for room
    /// in the socket's send buffer).
    pub fn flush(&mut self) -> Result<()> {
        let mut sent = 0;
        while sent < self.wbuf.len() {
            match self.stream.write(&self.wbuf[sent..]) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    crate::io::poll::wait_writable(self.as_raw_fd())?
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.wbuf.clear();
        Ok(())
    }

    /// Queues an Append (sent at the next [`Client::flush`] or receive) and
    /// returns its request id.
    pub fn queue_append(&mut self, level: Durability, records: &[(Kind, &[u8])]) -> u64 {
        let id = self.next_request_id();
        protocol::encode_append(id, level, records, &mut self.wbuf);
        id
    }

    /// Appends and waits for the acknowledgement. A wait that ended
    /// without the level is [`ClientError::Indeterminate`].
    pub fn append(&mut self, level: Durability, records: &[(Kind, &[u8])]) -> Result<Ack> {
        self.append_within(level, records, None)
    }

    /// [`Client::append`], giving up the wait after `timeout`: the request
    /// is cancelled and the server answers (Ack if the level was reached
    /// meanwhile, else INDETERMINATE: written, not confirmed).
    pub fn append_within(
        &mut self,
        level: Durability,
        records: &[(Kind, &[u8])],
        timeout: Option<Duration>,
    ) -> Result<Ack> {
        let id = self.queue_append(level, records);
        self.flush()?;
        let frame = match timeout {
            None => self.recv()?,
            Some(t) => {
                self.stream.set_read_timeout(Some(t))?;
                let first = self.recv();
                self.stream.set_read_timeout(None)?;
                match first {
                    Err(ClientError::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        self.cancel(id)?;
                        self.recv()?
                    }
                    other => other?,
                }
            }
        };
        match frame {
            Frame::Ack {
                request_id,
                lsns,
                end,
            } if request_id == id => Ok(Ack {
                request_id,
                lsns,
                end,
            }),
            Frame::Indeterminate {
                request_id,
                reached,
                reason,
                lsns,
                end,
            } if request_id == id => Err(ClientError::Indeterminate {
                request_id,
                reached,
                reason,
                lsns,
                end,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// The next frame from the server. An Error frame becomes `Err`, except
    /// through [`Client::recv_frame`].
    pub fn recv(&mut self) -> Result<Frame> {
        check_error(self.recv_frame()?)
    }

    /// The next frame, Error frames included.
    pub fn recv_frame(&mut self) -> Result<Frame> {
        if !self.wbuf.is_empty() {
            self.flush()?;
        }
        loop {
            if let Some(f) = self.decode_buffered()? {
                return Ok(f);
            }
            self.read_more()?;
        }
    }

    /// A whole frame from the receive buffer, if one is there.
    fn decode_buffered(&mut self) -> Result<Option<Frame>> {
        let window = &self.rbuf[self.rpos..self.rend];
        let Some((frame, len)) = protocol::decode(window, Direction::ToClient, &self.limits)?
        else {
            return Ok(None);
        };
        let f = frame.to_frame();
        self.rpos += len;
        if self.rpos == self.rend {
            self.rpos = 0;
            self.rend = 0;
        }
        Ok(Some(f))
    }

    /// One read into the receive buffer (made room for first).
    fn read_more(&mut self) -> Result<()> {
        // Room for more: move the partial frame to the front, and grow
        // only when one frame is larger than the buffer.
        if self.rpos > 0 {
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
        if self.rend == self.rbuf.len() {
            let grow = (self.rbuf.len() * 2)
                .min(self.limits.max_frame_size as usize + 4096)
                .max(self.rend + 1);
            self.rbuf.resize(grow, 0);
        }
        loop {
            match self.stream.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => {
                    self.rend += n;
                    return Ok(());
                }
                // A signal interrupted the wait: nothing was read, wait again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads records from `from` (a record start): up to `max_bytes` of
    /// payload and `max_records` records (0: no limit). Returns them and the
    /// LSN after the last.
    pub fn read(
        &mut self,
        from: Lsn,
        max_bytes: u32,
        max_records: u32,
    ) -> Result<(Vec<Record>, Lsn)> {
        let id = self.next_request_id();
        self.queue(&Frame::Read {
            request_id: id,
            from,
            max_bytes,
            max_records,
        });
        let mut out = Vec::new();
        loop {
            match self.recv()? {
                Frame::Records {
                    request_id,
                    records,
                } if request_id == id => out.extend(records),
                Frame::ReadEnd { request_id, end } if request_id == id => return Ok((out, end)),
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Starts following from `from`: Records frames then arrive through
    /// [`Client::recv`] as WAL becomes durable, until [`Client::cancel`].
    pub fn follow(&mut self, from: Lsn) -> Result<u64> {
        let id = self.next_request_id();
        self.queue(&Frame::Follow {
            request_id: id,
            from,
        });
        self.flush()?;
        Ok(id)
    }

    pub fn cancel(&mut self, request_id: u64) -> Result<()> {
        self.queue(&Frame::Cancel { request_id });
        self.flush()
    }

    /// (insert, write, flush LSN, JSON details).
    pub fn status(&mut self) -> Result<(Lsn, Lsn, Lsn, String)> {
        let id = self.next_request_id();
        self.queue(&Frame::Status { request_id: id });
        match self.recv()? {
            Frame::StatusReply {
                insert_lsn,
                write_lsn,
                flush_lsn,
                json,
                ..
            } => Ok((insert_lsn, write_lsn, flush_lsn, json)),
            other => Err(unexpected(other)),
        }
    }

    /// The history file of `timeline` on the server (TimelineHistory,
    /// PostgreSQL's TIMELINE_HISTORY): empty for timeline 1.
    pub fn timeline_history(&mut self, timeline: u32) -> Result<Vec<u8>> {
        let id = self.next_request_id();
        self.queue(&Frame::TimelineHistory {
            request_id: id,
            timeline,
        });
        match self.recv()? {
            Frame::HistoryData { history, .. } => Ok(history),
            other => Err(unexpected(other)),
        }
    }

    /// Queues a PageWrite (sent at the next flush or receive) and returns
    /// its request id; the answer is a `Frame::PageWritten`.
    pub fn queue_page_write(
        &mut self,
        level: Durability,
        rel: u32,
        block: u32,
        offset: u16,
        data: &[u8],
    ) -> u64 {
        let id = self.next_request_id();
        protocol::encode_page_write(id, level, rel, block, offset, data, &mut self.wbuf);
        id
    }

    /// Changes `data.len()` bytes at `offset` of a page's data and waits
    /// until the change reaches `level`. Returns (record LSN, page LSN).
    pub fn page_write(
        &mut self,
        level: Durability,
        rel: u32,
        block: u32,
        offset: u16,
        data: &[u8],
    ) -> Result<(Lsn, Lsn)> {
        let id = self.queue_page_write(level, rel, block, offset, data);
        match self.recv()? {
            Frame::PageWritten {
                request_id,
                lsn,
                end,
            } if request_id == id => Ok((lsn, end)),
            other => Err(unexpected(other)),
        }
    }

    /// A page's current image: (page LSN, its data bytes).
    pub fn page_read(&mut self, rel: u32, block: u32) -> Result<(Lsn, Vec<u8>)> {
        let id = self.next_request_id();
        self.queue(&Frame::PageRead {
            request_id: id,
            rel,
            block,
        });
        match self.recv()? {
            Frame::PageData {
                request_id,
                lsn,
                data,
            } if request_id == id => Ok((lsn, data)),
            other => Err(unexpected(other)),
        }
    }

    /// Runs an immediate checkpoint and waits for it: (checkpoint LSN, redo LSN).
    pub fn checkpoint(&mut self) -> Result<(Lsn, Lsn)> {
        let id = self.next_request_id();
        self.queue(&Frame::Checkpoint { request_id: id });
        match self.recv()? {
            Frame::CheckpointDone {
                request_id,
                checkpoint,
                redo,
            } if request_id == id => Ok((checkpoint, redo)),
            other => Err(unexpected(other)),
        }
    }

    /// Creates (`SlotOp::Create`) or drops a replication slot: the new
    /// slot's restart LSN (0 after a drop).
    pub fn slot(&mut self, op: crate::protocol::SlotOp, name: &str) -> Result<Lsn> {
        let id = self.next_request_id();
        self.queue(&Frame::SlotCommand {
            request_id: id,
            op,
            name: name.to_string(),
        });
        match self.recv()? {
            Frame::SlotResult {
                request_id,
                restart_lsn,
            } if request_id == id => Ok(restart_lsn),
            other => Err(unexpected(other)),
        }
    }

    /// The raw stream, for tests that send bytes of their own.
    /// Whether received bytes wait in the buffer (a frame, or part of one):
    /// a caller that polls the socket before [`Client::recv_frame`] must
    /// not wait for the socket then.
    pub fn has_buffered(&self) -> bool {
        self.rend > self.rpos
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

fn unexpected(f: Frame) -> ClientError {
    match f {
        Frame::Error { code, message, .. } => ClientError::Server { code, message },
        other => ClientError::Unexpected(format!("{other:?}").chars().take(200).collect()),
    }
}

fn check_error(f: Frame) -> Result<Frame> {
    match f {
        Frame::Error { code, message, .. } => Err(ClientError::Server { code, message }),
        f => Ok(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{:#}` (and anyhow's chain) print the OS error once.
    #[test]
    fn a_refused_connection_says_so_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let Err(e) = Client::connect(&addr, None) else {
            panic!("connected to a closed port")
        };
        let text = format!("{:#}", anyhow::Error::from(e));
        assert!(
            text.starts_with(&format!("could not connect to {addr}: ")),
            "{text}"
        );
        assert_eq!(text.matches("os error").count(), 1, "{text}");
        let io = ClientError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let text = format!("{:#}", anyhow::Error::from(io));
        assert_eq!(text, "connection error: connection reset");
    }
}
