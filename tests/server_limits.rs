//! Limits that hold before a client has authenticated, against a real
//! `walden serve` process: before Hello only a Hello of a few KiB is taken
//! (anything else is refused from its header, with an Error, and the
//! connection closed), and `max_connections` refuses one connection more
//! (TOO_MANY_CONNECTIONS), admits again once one closes, and follows SIGHUP.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::ServerProcess;
use walden::client::{Client, ClientError};
use walden::protocol::{self, Direction, ErrorCode, Frame, Limits, HEADER_LEN, MAX_HELLO_FRAME};
use walden::{Durability, Kind};

/// Everything the server sends until it closes the connection; panics if it
/// neither closes nor goes quiet within 5 s of our last write.
fn answer_until_closed(t: &mut TcpStream) -> Vec<u8> {
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match t.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A reset after the answer (we left bytes unread): closed too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!(
                "the server neither answered nor closed ({e}); got {} bytes",
                out.len()
            ),
        }
    }
}

/// The whole frames at the start of `bytes`.
fn whole_frames(bytes: &[u8]) -> (Vec<Frame>, usize) {
    let limits = Limits::default();
    let mut pos = 0;
    let mut out = Vec::new();
    while let Some((f, len)) =
        protocol::decode(&bytes[pos..], Direction::ToClient, &limits).unwrap()
    {
        out.push(f.to_frame());
        pos += len;
    }
    (out, pos)
}

/// The frames in `bytes`, which end with a whole one.
fn frames(bytes: &[u8]) -> Vec<Frame> {
    let (out, used) = whole_frames(bytes);
    assert_eq!(used, bytes.len(), "a partial frame at the end");
    out
}

fn error_of(frames: &[Frame]) -> (u64, ErrorCode, String) {
    match frames {
        [Frame::Error {
            request_id,
            code,
            message,
        }] => (*request_id, *code, message.clone()),
        other => panic!("expected one Error frame, got {other:?}"),
    }
}

fn hello(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::encode(
        &Frame::Hello {
            request_id: 1,
            version: protocol::VERSION,
            token: Vec::new(),
            client_name: name.into(),
        },
        &mut out,
    );
    out
}

#[test]
fn before_hello_only_a_small_hello_is_taken() {
    let server = ServerProcess::start(&[]);
    let addr = &server.addr;

    // Another frame first: refused from its header alone (its body is
    // never sent), with an Error carrying its id, then closed.
    let mut append = Vec::new();
    protocol::encode_append(
        5,
        Durability::Local,
        &[(Kind::DATA, &[1u8; 1000][..])],
        &mut append,
    );
    let mut t = TcpStream::connect(addr).unwrap();
    t.write_all(&append[..HEADER_LEN]).unwrap();
    let (id, code, msg) = error_of(&frames(&answer_until_closed(&mut t)));
    assert_eq!((id, code), (5, ErrorCode::BAD_FRAME), "{msg}");
    assert!(msg.contains("before Hello"), "{msg}");

    // A 64 KiB Hello (a long client name): refused as soon as its header
    // is in, without waiting for (or buffering) the rest.
    let big = hello(&"n".repeat(65_000));
    assert!(big.len() > 64_000);
    let mut t = TcpStream::connect(addr).unwrap();
    t.write_all(&big[..HEADER_LEN + 100]).unwrap();
    let (id, code, msg) = error_of(&frames(&answer_until_closed(&mut t)));
    assert_eq!((id, code), (1, ErrorCode::FRAME_TOO_LARGE), "{msg}");
    assert!(
        msg.contains(&format!("at most {MAX_HELLO_FRAME} bytes")),
        "{msg}"
    );
    // Sent whole, it is refused the same way.
    let mut t = TcpStream::connect(addr).unwrap();
    let _ = t.write_all(&big);
    let (_, code, _) = error_of(&frames(&answer_until_closed(&mut t)));
    assert_eq!(code, ErrorCode::FRAME_TOO_LARGE);

    // A Hello within the limit, with requests right behind it in the same
    // write (more than MAX_HELLO_FRAME bytes in all): all answered.
    let mut bytes = hello("pipelined");
    for i in 0..20 {
        protocol::encode_append(
            i + 2,
            Durability::Local,
            &[(Kind::DATA, &[7u8; 500][..])],
            &mut bytes,
        );
    }
    assert!(bytes.len() > MAX_HELLO_FRAME as usize);
    let mut t = TcpStream::connect(addr).unwrap();
    t.write_all(&bytes).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let answers = loop {
        let n = t.read(&mut buf).expect("HelloOk and 20 Acks");
        assert!(n > 0, "closed after {:?}", frames(&received));
        received.extend_from_slice(&buf[..n]);
        let (decoded, _) = whole_frames(&received);
        if decoded.len() == 21 {
            break decoded;
        }
    };
    assert!(matches!(answers[0], Frame::HelloOk { .. }), "{answers:?}");
    assert!(
        answers[1..].iter().all(|f| matches!(f, Frame::Ack { .. })),
        "{answers:?}"
    );

    // A second Hello is refused (it would renegotiate and re-authenticate).
    let mut t = TcpStream::connect(addr).unwrap();
    t.write_all(&[hello("once"), hello("twice")].concat())
        .unwrap();
    let answers = frames(&answer_until_closed(&mut t));
    assert!(matches!(answers[0], Frame::HelloOk { .. }), "{answers:?}");
    let (_, code, msg) = error_of(&answers[1..]);
    assert_eq!(code, ErrorCode::BAD_FRAME, "{msg}");

    // The server serves on.
    let mut c = Client::connect(addr, None).unwrap();
    c.append(Durability::Local, &[(Kind::DATA, b"still fine")])
        .unwrap();
}

/// Connects and says Hello; `Err` with the server's code when refused.
fn connect(addr: &str) -> Result<Client, ErrorCode> {
    match Client::connect(addr, None) {
        Ok(c) => {
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            Ok(c)
        }
        Err(ClientError::Server { code, .. }) => Err(code),
        Err(e) => panic!("neither served nor refused with an Error frame: {e}"),
    }
}

/// Connects until admitted (a close reaches the server a moment later).
fn connect_admitted(addr: &str) -> Client {
    let t = Instant::now();
    loop {
        match connect(addr) {
            Ok(c) => return c,
            Err(code) => assert_eq!(code, ErrorCode::TOO_MANY_CONNECTIONS),
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still refused 10 s after a connection closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn append(c: &mut Client, what: &[u8]) {
    c.append(Durability::Local, &[(Kind::DATA, what)]).unwrap();
}

#[test]
fn max_connections_counts_every_shard_and_admits_again_after_a_close() {
    // Four shards: the connections are spread over them, and the limit is
    // still one count for the server.
    let server = ServerProcess::start(&["max_connections=3", "insert_shards=4"]);
    let addr = &server.addr;
    let mut open: Vec<Client> = (0..3).map(|_| connect(addr).unwrap()).collect();
    for _ in 0..5 {
        // Refused at once with the error, before we say anything...
        let mut t = TcpStream::connect(addr).unwrap();
        let (id, code, msg) = error_of(&frames(&answer_until_closed(&mut t)));
        assert_eq!((id, code), (0, ErrorCode::TOO_MANY_CONNECTIONS), "{msg}");
        assert!(msg.contains("max_connections = 3"), "{msg}");
        // ...and a client that says Hello learns why.
        assert_eq!(connect(addr).err(), Some(ErrorCode::TOO_MANY_CONNECTIONS));
    }
    for (i, c) in open.iter_mut().enumerate() {
        append(c, format!("admitted {i}").as_bytes());
    }
    // One closes: one more is admitted, and only one.
    drop(open.pop());
    open.push(connect_admitted(addr));
    assert_eq!(connect(addr).err(), Some(ErrorCode::TOO_MANY_CONNECTIONS));
    for c in open.iter_mut() {
        append(c, b"still served");
    }
    assert!(
        server
            .log()
            .contains("refusing connections: max_connections (3) are open"),
        "{}",
        server.log()
    );
}

#[test]
fn sighup_changes_max_connections() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "max_connections = 1\n").unwrap();
    let server = ServerProcess::start_with_config(Some(config.path()), &[]);
    let addr = &server.addr;
    let mut first = connect(addr).unwrap();
    assert_eq!(connect(addr).err(), Some(ErrorCode::TOO_MANY_CONNECTIONS));

    std::fs::write(config.path(), "max_connections = 2\n").unwrap();
    server.reload_until_logged("parameter \"max_connections\" changed to \"2\"");
    let mut second = connect(addr).unwrap();
    assert_eq!(connect(addr).err(), Some(ErrorCode::TOO_MANY_CONNECTIONS));

    // Lowered below what is open: nobody is closed, nobody new admitted
    // until enough have gone.
    std::fs::write(config.path(), "max_connections = 1\n").unwrap();
    server.reload_until_logged("parameter \"max_connections\" changed to \"1\"");
    append(&mut first, b"first");
    append(&mut second, b"second");
    assert_eq!(connect(addr).err(), Some(ErrorCode::TOO_MANY_CONNECTIONS));
    drop(second);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        connect(addr).err(),
        Some(ErrorCode::TOO_MANY_CONNECTIONS),
        "two were open, one closed: still at the limit of 1"
    );
    drop(first);
    let mut c = connect_admitted(addr);
    append(&mut c, b"after both closed");
}
