//! `walden bench` against a server, like pgbench: `-c` connections spread
//! over `-j` threads, each connection keeping `--pipeline` requests in flight.
//! Prints progress lines and a summary; `--ack-log` records every
//! acknowledged record (LSN, length, crc32c) for `walden verify`.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam::utils::CachePadded;
use hdrhistogram::Histogram;
use walden::client::Client;
use walden::protocol::Frame;
use walden::{Durability, Kind};

use super::bench::BenchArgs;
use super::bench_stats::{self, Interval};

struct ThreadStats {
    interval: Mutex<Interval>,
    records: AtomicU64,
}

/// A request in flight: its id, when it was sent, (len, crc) of each record.
type InFlight = (u64, Instant, Vec<(u32, u32)>);

struct Conn {
    client: Client,
    sent: VecDeque<InFlight>,
}

/// The server's address: -h/-p, else DIR/walden.addr, else 127.0.0.1:7480.
fn server_addr(args: &BenchArgs) -> String {
    let from_file = super::common::listen_addr_in(&args.data_dir);
    let (fh, fp) = match from_file.as_deref().and_then(|a| a.rsplit_once(':')) {
        Some((h, p)) => (Some(h.to_string()), p.parse().ok()),
        None => (None, None),
    };
    let host = args
        .host
        .clone()
        .or(fh)
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = args.port.or(fp).unwrap_or(7480);
    format!("{host}:{port}")
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let addr = server_addr(args);
    let clients = args.clients.unwrap_or(1).max(1);
    let threads = args.threads.clamp(1, clients);
    let pipeline = args.pipeline.max(1);
    let batch = args.batch.max(1);
    let token = super::common::read_token(args.token_file.as_deref())?;
    let ack_log = match &args.ack_log {
        Some(p) => Some(Mutex::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        ))),
        None => None,
    };
    // Connect everyone first: a refused connection is an error, not a result.
    let mut per_thread: Vec<Vec<Conn>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..clients {
        let c = Client::connect(&addr, token.as_deref()).with_context(|| format!("client {i}"))?;
        per_thread[i % threads].push(Conn {
            client: c,
            sent: VecDeque::new(),
        });
    }
    println!(
        "walden bench: server {addr}, {clients} client(s), {threads} thread(s), pipeline {pipeline}, {} B records, batch {batch}, level {}, {} s",
        args.size, args.level, args.time
    );
    let stats: Vec<CachePadded<ThreadStats>> = (0..threads)
        .map(|_| {
            CachePadded::new(ThreadStats {
                interval: Mutex::new(Interval::default()),
                records: AtomicU64::new(0),
            })
        })
        .collect();
    let stop = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.time);

    let hist = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (t, conns) in per_thread.into_iter().enumerate() {
            let (stats, stop, failed, ack_log, args) = (&stats[t], &stop, &failed, &ack_log, args);
            handles.push(s.spawn(move || {
                let r = drive(
                    t, conns, pipeline, batch, args.size, args.level, stats, stop, ack_log,
                );
                match r {
                    Ok(h) => h,
                    Err((h, e)) => {
                        if !stop.load(Relaxed) {
                            eprintln!("walden bench: thread {t}: {e:#}");
                            failed.store(true, Relaxed);
                        }
                        h
                    }
                }
            }));
        }
        let tick = if args.progress > 0.0 {
            Duration::from_secs_f64(args.progress)
        } else {
            Duration::from_millis(200)
        };
        let mut last = Instant::now();
        let mut last_records = 0u64;
        while Instant::now() < deadline && !failed.load(Relaxed) {
            std::thread::sleep(tick.min(deadline.saturating_duration_since(Instant::now())));
            if args.progress > 0.0 {
                let records: u64 = stats.iter().map(|s| s.records.load(Relaxed)).sum();
                let (avg, sd) = bench_stats::drain(stats.iter().map(|s| &s.interval));
                println!(
                    "progress: {:.1} s, {:.1} rec/s, lat {:.3} ms stddev {:.3}",
                    started.elapsed().as_secs_f64(),
                    (records - last_records) as f64 / last.elapsed().as_secs_f64(),
                    avg / 1e6,
                    sd / 1e6
                );
                last = Instant::now();
                last_records = records;
            }
        }
        stop.store(true, Relaxed);
        let mut total = bench_stats::histogram();
        for h in handles {
            total.add(h.join().expect("bench thread")).unwrap();
        }
        total
    });
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(log) = &ack_log {
        log.lock().unwrap().flush().context("writing the ack log")?;
    }
    let records: u64 = stats.iter().map(|s| s.records.load(Relaxed)).sum();
    bench_stats::print_summary(records, elapsed, args.size, &hist);
    if failed.load(Relaxed) {
        anyhow::bail!("the run was cut short by an error (acknowledged records are in the summary and the ack log)");
    }
    Ok(())
}

type Hist = Histogram<u64>;

/// One thread: keeps `pipeline` requests in flight on each of its
/// connections, in lockstep (all acks of a group commit arrive together).
#[allow(clippy::too_many_arguments)]
fn drive(
    t: usize,
    mut conns: Vec<Conn>,
    pipeline: usize,
    batch: usize,
    size: usize,
    level: Durability,
    stats: &ThreadStats,
    stop: &AtomicBool,
    ack_log: &Option<Mutex<std::io::BufWriter<std::fs::File>>>,
) -> Result<Hist, (Hist, anyhow::Error)> {
    let mut h = bench_stats::histogram();
    let mut payloads: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; size]).collect();
    let mut counter = 0u64;
    let mut log = String::new();
    let result = (|| -> anyhow::Result<()> {
        while !stop.load(Relaxed) {
            for (ci, conn) in conns.iter_mut().enumerate() {
                while conn.sent.len() < pipeline {
                    let mut meta = Vec::with_capacity(batch);
                    for p in payloads.iter_mut() {
                        counter += 1;
                        let tag = ((t as u64) << 48) ^ ((ci as u64) << 32) ^ counter;
                        fill(p, tag);
                        meta.push((p.len() as u32, crc32c::crc32c(p)));
                    }
                    let recs: Vec<(Kind, &[u8])> =
                        payloads.iter().map(|p| (Kind::DATA, &p[..])).collect();
                    let id = conn.client.queue_append(level, &recs);
                    conn.sent.push_back((id, Instant::now(), meta));
                }
                conn.client.flush()?;
            }
            for conn in conns.iter_mut() {
                match conn.client.recv()? {
                    Frame::Ack {
                        request_id, lsns, ..
                    } => {
                        let (id, sent_at, meta) =
                            conn.sent.pop_front().context("an ack nobody asked for")?;
                        anyhow::ensure!(
                            id == request_id,
                            "ack for request {request_id}, expected {id}"
                        );
                        let ns = sent_at.elapsed().as_nanos() as u64;
                        h.saturating_record(ns.max(1));
                        stats.records.fetch_add(lsns.len() as u64, Relaxed);
                        {
                            stats.interval.lock().unwrap().record(ns);
                        }
                        if ack_log.is_some() {
                            for (lsn, (len, crc)) in lsns.iter().zip(&meta) {
                                let _ = writeln!(log, "{lsn} {len} {crc:08x}");
                            }
                            if log.len() > 64 << 10 {
                                write_log(ack_log, &mut log)?;
                            }
                        }
                    }
                    other => anyhow::bail!("unexpected answer: {other:?}"),
                }
            }
        }
        // Collect what is still in flight, so the log has every ack.
        for conn in conns.iter_mut() {
            conn.client
                .set_read_timeout(Some(Duration::from_secs(10)))?;
            while let Some((id, _, meta)) = conn.sent.pop_front() {
                if let Frame::Ack {
                    request_id, lsns, ..
                } = conn.client.recv()?
                {
                    anyhow::ensure!(
                        id == request_id,
                        "ack for request {request_id}, expected {id}"
                    );
                    stats.records.fetch_add(lsns.len() as u64, Relaxed);
                    if ack_log.is_some() {
                        for (lsn, (len, crc)) in lsns.iter().zip(&meta) {
                            let _ = writeln!(log, "{lsn} {len} {crc:08x}");
                        }
                    }
                }
            }
        }
        Ok(())
    })();
    // The acks received before an error are real: keep them in the log.
    let logged = write_log(ack_log, &mut log);
    match result.and(logged) {
        Ok(()) => Ok(h),
        Err(e) => Err((h, e)),
    }
}

fn write_log(
    ack_log: &Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    log: &mut String,
) -> anyhow::Result<()> {
    if let Some(l) = ack_log {
        l.lock()
            .unwrap()
            .write_all(log.as_bytes())
            .context("writing the ack log")?;
    }
    log.clear();
    Ok(())
}

/// Payload bytes derived from `tag` (so records differ and their crcs too).
fn fill(p: &mut [u8], tag: u64) {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in p.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}
