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
use walden::io::poll::ReadableSet;
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

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let addr =
        super::common::server_addr(args.host.as_deref(), args.port, args.data_dir.as_deref())?;
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
    if args.pages > 0 && args.size > walden::store::page::PAGE_DATA {
        anyhow::bail!(
            "--size {} is larger than a page's data ({} bytes)",
            args.size,
            walden::store::page::PAGE_DATA
        );
    }
    let what = if args.pages > 0 {
        format!("{} B page writes over {} pages", args.size, args.pages)
    } else {
        format!("{} B records, batch {batch}", args.size)
    };
    println!(
        "walden bench: server {addr}, {clients} client(s), {threads} thread(s), pipeline {pipeline}, {what}, level {}, {} s",
        args.level, args.time
    );
    // A status connection says whether a checkpoint is running, so that
    // latencies split into inside and outside checkpoints.
    let mut status = Client::connect(&addr, token.as_deref()).context("status connection")?;
    let checkpoints = |c: &mut Client| -> anyhow::Result<(bool, u64)> {
        let (_, _, _, json) = c.status()?;
        let v: serde_json::Value = serde_json::from_str(&json)?;
        Ok((
            v["page_store"]["checkpoint_in_progress"]
                .as_bool()
                .unwrap_or(false),
            v["page_store"]["checkpoints_completed"]
                .as_u64()
                .unwrap_or(0),
        ))
    };
    let (_, ckpts0) = checkpoints(&mut status)?;
    let in_checkpoint = AtomicBool::new(false);
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
            let in_ckpt = &in_checkpoint;
            handles.push(s.spawn(move || {
                let work = Work {
                    pipeline,
                    batch,
                    size: args.size,
                    pages: args.pages,
                    level: args.level,
                    in_checkpoint: in_ckpt,
                };
                let r = drive(t, conns, &work, stats, stop, ack_log);
                match r {
                    Ok(h) => h,
                    Err(failed_with) => {
                        let (h, e) = *failed_with;
                        if !stop.load(Relaxed) {
                            eprintln!("walden bench: thread {t}: {}", super::common::describe(&e));
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
        let mut wakes = bench_stats::Ticks::new(started, tick, deadline - started);
        'run: while let Some((at, is_tick)) = wakes.next_wake() {
            // Poll the checkpoint state every 20 ms; print on the tick.
            loop {
                if failed.load(Relaxed) {
                    break 'run;
                }
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20).min(left));
                if let Ok((running, _)) = checkpoints(&mut status) {
                    in_checkpoint.store(running, Relaxed);
                }
            }
            if args.progress > 0.0 && is_tick {
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
        let mut split = bench_stats::CheckpointSplit::default();
        for h in handles {
            let (h, sp) = h.join().expect("bench thread");
            total.add(h).unwrap();
            split.add(&sp);
        }
        (total, split)
    });
    let (hist, split) = hist;
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(log) = &ack_log {
        log.lock().unwrap().flush().context("writing the ack log")?;
    }
    let records: u64 = stats.iter().map(|s| s.records.load(Relaxed)).sum();
    bench_stats::print_summary(records, elapsed, args.size, &hist);
    if let Ok((_, ckpts)) = checkpoints(&mut status) {
        split.print(ckpts - ckpts0);
    }
    if failed.load(Relaxed) {
        anyhow::bail!("the run was cut short by an error (acknowledged records are in the summary and the ack log)");
    }
    Ok(())
}

type Hist = (Histogram<u64>, bench_stats::CheckpointSplit);

/// What each connection sends.
struct Work<'a> {
    pipeline: usize,
    batch: usize,
    size: usize,
    /// Page writes over this many pages of relation 1 (0: records).
    pages: u32,
    level: Durability,
    in_checkpoint: &'a AtomicBool,
}

/// What one driving thread keeps between requests.
struct Driver {
    t: usize,
    x: u64,
    payloads: Vec<Vec<u8>>,
    counter: u64,
    log: String,
    h: Hist,
}

impl Driver {
    /// Queues one request on connection `ci` (sent at its next flush).
    fn queue_one(&mut self, ci: usize, conn: &mut Conn, work: &Work<'_>) {
        if work.pages > 0 {
            let x = &mut self.x;
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            let block = (*x % work.pages as u64) as u32;
            let room = walden::store::page::PAGE_DATA - work.size + 1;
            let off = ((*x >> 32) as usize % room) as u16;
            fill(&mut self.payloads[0], *x);
            let id = conn
                .client
                .queue_page_write(work.level, 1, block, off, &self.payloads[0]);
            let during = work.in_checkpoint.load(Relaxed);
            conn.sent
                .push_back((id, Instant::now(), vec![(during as u32, 0)]));
            return;
        }
        let mut meta = Vec::with_capacity(self.payloads.len());
        for p in self.payloads.iter_mut() {
            self.counter += 1;
            let tag = ((self.t as u64) << 48) ^ ((ci as u64) << 32) ^ self.counter;
            fill(p, tag);
            meta.push((p.len() as u32, crc32c::crc32c(p)));
        }
        let recs: Vec<(Kind, &[u8])> = self.payloads.iter().map(|p| (Kind::DATA, &p[..])).collect();
        let id = conn.client.queue_append(work.level, &recs);
        conn.sent.push_back((id, Instant::now(), meta));
    }

    /// Accounts for one answer on `conn`.
    fn on_answer(
        &mut self,
        conn: &mut Conn,
        frame: Frame,
        work: &Work<'_>,
        stats: &ThreadStats,
        ack_log: &Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    ) -> anyhow::Result<()> {
        match frame {
            Frame::PageWritten { request_id, .. } => {
                let (id, sent_at, meta) = conn
                    .sent
                    .pop_front()
                    .context("an answer nobody asked for")?;
                anyhow::ensure!(
                    id == request_id,
                    "answer for request {request_id}, expected {id}"
                );
                let ns = sent_at.elapsed().as_nanos() as u64;
                self.h.0.saturating_record(ns.max(1));
                let during = meta[0].0 == 1 || work.in_checkpoint.load(Relaxed);
                self.h.1.record(ns, during);
                stats.records.fetch_add(1, Relaxed);
                stats.interval.lock().unwrap().record(ns);
            }
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
                self.h.0.saturating_record(ns.max(1));
                self.h.1.record(ns, work.in_checkpoint.load(Relaxed));
                stats.records.fetch_add(lsns.len() as u64, Relaxed);
                stats.interval.lock().unwrap().record(ns);
                if ack_log.is_some() {
                    for (lsn, (len, crc)) in lsns.iter().zip(&meta) {
                        let _ = writeln!(self.log, "{lsn} {len} {crc:08x}");
                    }
                    if self.log.len() > 64 << 10 {
                        write_log(ack_log, &mut self.log)?;
                    }
                }
            }
            other => anyhow::bail!("unexpected answer: {other:?}"),
        }
        Ok(())
    }
}

/// One thread: keeps `pipeline` requests in flight on each of its
/// connections, as pgbench does with its clients: it polls them all and
/// sends a connection its next request as soon as an answer frees a place,
/// whatever the other connections are waiting for.
fn drive(
    t: usize,
    mut conns: Vec<Conn>,
    work: &Work<'_>,
    stats: &ThreadStats,
    stop: &AtomicBool,
    ack_log: &Option<Mutex<std::io::BufWriter<std::fs::File>>>,
) -> Result<Hist, Box<(Hist, anyhow::Error)>> {
    let pipeline = work.pipeline;
    let mut d = Driver {
        t,
        x: (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        payloads: (0..work.batch).map(|_| vec![0u8; work.size]).collect(),
        counter: 0,
        log: String::new(),
        h: (
            bench_stats::histogram(),
            bench_stats::CheckpointSplit::default(),
        ),
    };
    let result = (|| -> anyhow::Result<()> {
        for (ci, conn) in conns.iter_mut().enumerate() {
            conn.client.set_nonblocking(true)?;
            while conn.sent.len() < pipeline {
                d.queue_one(ci, conn, work);
            }
            conn.client.flush()?;
        }
        let mut fds = ReadableSet::new(conns.iter().map(|c| c.client.as_raw_fd()));
        while !stop.load(Relaxed) {
            fds.wait(Duration::from_millis(100))?;
            for (ci, conn) in conns.iter_mut().enumerate() {
                if !fds.ready(ci) {
                    continue;
                }
                // One read, then whatever whole frames it brought: a second
                // read would only find the socket empty (poll says when not).
                let Some(f) = conn.client.try_recv()? else {
                    continue;
                };
                d.on_answer(conn, f, work, stats, ack_log)?;
                while let Some(f) = conn.client.next_buffered()? {
                    d.on_answer(conn, f, work, stats, ack_log)?;
                }
                if !stop.load(Relaxed) {
                    while conn.sent.len() < pipeline {
                        d.queue_one(ci, conn, work);
                    }
                    conn.client.flush()?;
                }
            }
        }
        for conn in &conns {
            conn.client.set_nonblocking(false)?;
        }
        // Collect what is still in flight, so the log has every ack.
        for conn in conns.iter_mut() {
            conn.client
                .set_read_timeout(Some(Duration::from_secs(10)))?;
            while !conn.sent.is_empty() {
                let f = conn.client.recv()?;
                d.on_answer(conn, f, work, stats, ack_log)?;
            }
        }
        Ok(())
    })();
    // The acks received before an error are real: keep them in the log.
    let logged = write_log(ack_log, &mut d.log);
    match result.and(logged) {
        Ok(()) => Ok(d.h),
        Err(e) => Err(Box::new((d.h, e))),
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
