//! Hostile connections never touch a well-behaved client. A real `walden
//! serve` process takes rounds of hostile connections (random bytes,
//! truncated frames, 64 KiB of garbage, HTTP requests, frames before Hello,
//! resets with unread data, and floods past `max_connections`, whose
//! refused connections are closed while their receive is in flight) while
//! several well-behaved clients append, pipelined, and reconnect now and
//! then, so that their connections take the slots and descriptors of closed
//! hostile ones. Every one of their appends must be acknowledged and none
//! of them may be disconnected (a refusal at connect time, with
//! TOO_MANY_CONNECTIONS, is retried: it is not a disconnect).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walden::client::{Client, ClientError};
use walden::protocol::{self, ErrorCode, Frame};
use walden::testkit::Rng;
use walden::{Durability, Kind};

const GOOD_CLIENTS: usize = 8;
const HOSTILE_THREADS: usize = 8;
const HOSTILE_PER_ROUND: usize = 200;
const ROUNDS: usize = 20;
/// Low enough that each round's flood is refused in part.
const MAX_CONNECTIONS: usize = 16;
const FLOOD: usize = 64;
/// The whole test, server start included, ends well within a minute.
const DEADLINE: Duration = Duration::from_secs(50);

fn hello() -> Vec<u8> {
    let mut out = Vec::new();
    protocol::encode(
        &Frame::Hello {
            request_id: 1,
            version: protocol::VERSION,
            token: Vec::new(),
            client_name: "hostile".into(),
        },
        &mut out,
    );
    out
}

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// What one hostile connection sends.
fn hostile_bytes(rng: &mut Rng) -> Vec<u8> {
    match rng.below(9) {
        0 => {
            let len = rng.range(1, 400) as usize;
            random_bytes(rng, len)
        }
        // A truncated Hello.
        1 => {
            let mut h = hello();
            h.truncate(rng.range(1, h.len() as u64 - 1) as usize);
            h
        }
        2 => random_bytes(rng, 64 << 10),
        3 => b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        // Hello, then garbage.
        4 => {
            let mut b = hello();
            let len = rng.range(1, 300) as usize;
            b.extend(random_bytes(rng, len));
            b
        }
        // Hello, then an Append cut short.
        5 => {
            let mut b = hello();
            protocol::encode_append(
                2,
                Durability::Local,
                &[(Kind::DATA, &[7u8; 500][..])],
                &mut b,
            );
            b.truncate(b.len() - rng.range(1, 400) as usize);
            b
        }
        // Hello, then 64 KiB of garbage.
        6 => {
            let mut b = hello();
            b.extend(random_bytes(rng, 64 << 10));
            b
        }
        // A request before Hello.
        7 => {
            let mut b = Vec::new();
            protocol::encode_append(5, Durability::Local, &[(Kind::DATA, b"early")], &mut b);
            b
        }
        // Valid requests whose answers are never read: closing with them
        // unread makes this side reset the connection.
        _ => {
            let mut b = hello();
            for i in 0..rng.range(1, 40) {
                protocol::encode_append(
                    i + 2,
                    Durability::Local,
                    &[(Kind::DATA, &[1u8; 200][..])],
                    &mut b,
                );
                protocol::encode(
                    &Frame::Status {
                        request_id: 1000 + i,
                    },
                    &mut b,
                );
            }
            b
        }
    }
}

fn hostile_connection(addr: &str, rng: &mut Rng) {
    let Ok(mut t) = TcpStream::connect(addr) else {
        return;
    };
    let _ = t.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = t.set_read_timeout(Some(Duration::from_millis(200)));
    let bytes = hostile_bytes(rng);
    if rng.below(4) == 0 {
        // Dribbled in small pieces.
        for piece in bytes.chunks(rng.range(1, 64) as usize) {
            if t.write_all(piece).is_err() {
                break;
            }
        }
    } else {
        let _ = t.write_all(&bytes);
    }
    match rng.below(3) {
        // Read whatever the server answers, until it closes.
        0 => {
            let mut buf = [0u8; 4096];
            while let Ok(n) = t.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        }
        // Half-close, then go.
        1 => {
            let _ = t.shutdown(std::net::Shutdown::Write);
        }
        // Just go (with answers unread: a reset).
        _ => {}
    }
}

/// Opens more connections than `max_connections` at once, sends some of
/// them a Hello or garbage, holds them a moment, then drops them all.
fn flood(addr: &str, seed: u64) {
    let mut rng = Rng(seed * 31 + 7);
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..FLOOD {
        if let Ok(mut t) = TcpStream::connect(addr) {
            let _ = t.set_write_timeout(Some(Duration::from_secs(2)));
            match rng.below(3) {
                0 => {
                    let _ = t.write_all(&hello());
                }
                1 => {
                    let len = rng.range(1, 200) as usize;
                    let _ = t.write_all(&random_bytes(&mut rng, len));
                }
                _ => {}
            }
            held.push(t);
        }
    }
    std::thread::sleep(Duration::from_millis(rng.range(10, 100)));
}

/// One well-behaved client: connects, appends pipelined batches at mixed
/// levels and checks every answer, and reconnects after 1 to 3 batches, so
/// that its new connections take the slots and descriptors that hostile
/// ones just gave up, until `stop`.
fn good_client(
    addr: &str,
    index: usize,
    stop: &AtomicBool,
    acked: &AtomicU64,
) -> Result<(), String> {
    let mut rng = Rng(index as u64 + 1);
    let mut connection = 0;
    while !stop.load(SeqCst) {
        connection += 1;
        let what = |e: &dyn std::fmt::Display, stage: &str| {
            format!("good client {index}, connection {connection}, {stage}: {e}")
        };
        let mut c = loop {
            match Client::connect(addr, None) {
                Ok(c) => break c,
                // Refused while a flood holds every connection: not a
                // disconnect, try again.
                Err(ClientError::Server { code, .. })
                    if code == ErrorCode::TOO_MANY_CONNECTIONS =>
                {
                    if stop.load(SeqCst) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(what(&e, "connect")),
            }
        };
        c.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| what(&e, "set_read_timeout"))?;
        for batch in 0..rng.range(1, 4) {
            let mut ids = Vec::new();
            for i in 0..rng.range(1, 8) {
                let level = if rng.below(2) == 0 {
                    Durability::Off
                } else {
                    Durability::Local
                };
                let p = walden::testkit::payload(rng.next_u64(), 100 + i as usize);
                ids.push(c.queue_append(level, &[(Kind::DATA, &p)]));
            }
            let stage = format!("batch {batch} of {} appends", ids.len());
            c.flush().map_err(|e| what(&e, &stage))?;
            // Acks at different levels may come in any order.
            let mut waiting = ids.clone();
            while !waiting.is_empty() {
                match c.recv().map_err(|e| what(&e, &stage))? {
                    Frame::Ack { request_id, .. } if waiting.contains(&request_id) => {
                        waiting.retain(|&id| id != request_id);
                        acked.fetch_add(1, Relaxed);
                    }
                    other => return Err(what(&format!("{other:?}"), "unexpected answer")),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn hostile_connections_never_disconnect_a_well_behaved_client() {
    let started = Instant::now();
    let max = format!("max_connections={MAX_CONNECTIONS}");
    let server = common::ServerProcess::start(&[&max]);
    let addr = server.addr.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));

    let good: Vec<_> = (0..GOOD_CLIENTS)
        .map(|i| {
            let (addr, stop, acked, failures) = (
                addr.clone(),
                Arc::clone(&stop),
                Arc::clone(&acked),
                Arc::clone(&failures),
            );
            std::thread::spawn(move || {
                if let Err(e) = good_client(&addr, i, &stop, &acked) {
                    failures.lock().unwrap().push(e);
                    stop.store(true, SeqCst);
                }
            })
        })
        .collect();

    let mut rounds = 0;
    for round in 0..ROUNDS {
        if stop.load(SeqCst) || started.elapsed() > DEADLINE - Duration::from_secs(10) {
            break;
        }
        let mut threads: Vec<_> = (0..HOSTILE_THREADS)
            .map(|t| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng((round * HOSTILE_THREADS + t) as u64 * 7919 + 13);
                    for _ in 0..HOSTILE_PER_ROUND / HOSTILE_THREADS {
                        hostile_connection(&addr, &mut rng);
                    }
                })
            })
            .collect();
        let addr = addr.clone();
        threads.push(std::thread::spawn(move || flood(&addr, round as u64)));
        for t in threads {
            t.join().unwrap();
        }
        rounds += 1;
    }
    stop.store(true, SeqCst);
    for g in good {
        g.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    let log = server.log();
    assert!(
        failures.is_empty(),
        "well-behaved clients were disconnected or not answered after {rounds} round(s) \
         of {HOSTILE_PER_ROUND} hostile connections:\n{}\nserver log:\n{log}",
        failures.join("\n")
    );
    assert!(
        rounds >= 3,
        "only {rounds} hostile rounds ran before the deadline"
    );
    let acked = acked.load(SeqCst);
    assert!(
        acked > 100,
        "too few appends acknowledged to prove anything: {acked}"
    );
    assert!(
        started.elapsed() < DEADLINE,
        "the test took {:?}",
        started.elapsed()
    );
    // The server is still healthy: a fresh client is served.
    let mut c = Client::connect(&addr, None).unwrap();
    c.append(Durability::Local, &[(Kind::DATA, b"after the storm")])
        .unwrap();
}
