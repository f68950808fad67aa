//! `walden bench`: a pgbench-like load generator. With `--embedded` it runs
//! the engine in-process (threads append and wait at the chosen level); the
//! server mode arrives with `walden serve`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use crossbeam::utils::CachePadded;
use walden::config::{FlusherKind, Size, SyncMethod};
use walden::{Durability, Kind, Lsn, Wal};

use super::bench_stats::{self, Interval};

#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    pub(crate) help: Option<bool>,
    /// Run the WAL engine inside this process (no server).
    #[arg(long)]
    pub(crate) embedded: bool,
    /// Server host, or HOST:PORT (default: WALDEN_HOST, else DIR/data/walden.addr).
    #[arg(short = 'h', long = "host", short_alias = 'H')]
    pub(crate) host: Option<String>,
    /// Server port (default: WALDEN_PORT, else DIR/data/walden.addr, else 7480 with --host).
    #[arg(short = 'p', long = "port")]
    pub(crate) port: Option<u16>,
    /// Requests each client keeps in flight (server mode).
    #[arg(long, default_value_t = 1)]
    pub(crate) pipeline: usize,
    /// Write one line per acknowledged record: LSN, length, crc32c of the payload.
    #[arg(long)]
    pub(crate) ack_log: Option<PathBuf>,
    /// File holding the auth token (server mode).
    #[arg(long)]
    pub(crate) token_file: Option<PathBuf>,
    /// Data directory: embedded, the WAL goes in DIR/wal (existing WAL is
    /// continued; default ./walden-data); against a server, its walden.addr
    /// names the server (default: WALDEN_DATA, else ./walden-data).
    #[arg(short = 'D', long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Configuration file (TOML); -D and --set override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Appending threads (embedded: one client each).
    #[arg(short = 'j', long = "threads", default_value_t = 1)]
    pub(crate) threads: usize,
    /// Clients; in embedded mode the same as --threads.
    #[arg(short = 'c', long = "clients")]
    pub(crate) clients: Option<usize>,
    /// Duration in seconds.
    #[arg(short = 'T', long = "time", default_value_t = 10.0)]
    pub(crate) time: f64,
    /// Payload bytes per record (with --pages: bytes per page write, at most 8168).
    #[arg(long, default_value_t = 100)]
    pub(crate) size: usize,
    /// Page workload: each request writes --size bytes at a random offset
    /// of a random page among this many (relation 1), instead of a record.
    #[arg(long, default_value_t = 0)]
    pub(crate) pages: u32,
    /// With --pages (embedded): first fill every page, then checkpoint, then
    /// measure, so full-page images are of full pages (as after a table load).
    #[arg(long)]
    pub(crate) prefill: bool,
    /// Durability level to wait for: off, local, remote_write, on, remote_apply.
    #[arg(long, default_value = "local")]
    pub(crate) level: Durability,
    /// Records per append (one reservation per batch).
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Print a progress line every N seconds (0: never).
    #[arg(short = 'P', long = "progress", default_value_t = 0.0)]
    pub(crate) progress: f64,
    /// wal_sync_method: open_datasync, fdatasync, open_sync, fsync.
    #[arg(long)]
    pub(crate) sync_method: Option<String>,
    /// Which flusher: uring (the real one) or pwrite (plain pwrite+fdatasync, for comparison).
    #[arg(long)]
    pub(crate) flusher: Option<String>,
    /// Keep at most this much WAL (older segments are recycled as a checkpointer would).
    #[arg(long, default_value = "1GB")]
    pub(crate) keep_wal: String,
    /// Any setting, as name=value (repeatable), e.g. --set fsync=off.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub(crate) set: Vec<String>,
}

struct Client {
    interval: Mutex<Interval>,
    records: AtomicU64,
    /// Start LSN of this client's latest durable record (for WAL release).
    durable_lsn: AtomicU64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !args.embedded {
        return super::bench_server::run(&args);
    }
    let mut overrides = args.set.clone();
    if let Some(m) = &args.sync_method {
        if SyncMethod::parse(m).is_none() {
            bail!("invalid --sync-method {m:?}: expected open_datasync, fdatasync, open_sync or fsync");
        }
        overrides.push(format!("wal_sync_method={m}"));
    }
    if let Some(f) = &args.flusher {
        overrides.push(format!("wal_flusher={f}"));
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("walden-data"));
    let cfg = super::common::load_config(args.config.as_deref(), Some(&data_dir), &overrides)?;
    let keep = Size::parse(&args.keep_wal).map_err(anyhow::Error::msg)?.0;
    let threads = args.clients.unwrap_or(args.threads).max(1);
    let batch = args.batch.max(1);
    if args.size as u64 > cfg.max_record_size.0 {
        bail!(
            "--size {} is larger than max_record_size ({})",
            args.size,
            cfg.max_record_size.0
        );
    }

    if args.pages > 0 {
        return run_pages(&args, cfg, threads);
    }
    let wal = Wal::open(cfg.clone())?;
    println!(
        "walden bench: embedded, {} thread(s), {} B records, batch {}, level {}, {} s, wal_sync_method={}{}, flusher={}, insert shards {}",
        threads,
        args.size,
        batch,
        args.level,
        args.time,
        cfg.wal_sync_method.name(),
        if cfg.fsync { "" } else { " (fsync=off)" },
        match cfg.wal_flusher {
            FlusherKind::Uring => "uring",
            FlusherKind::Pwrite => "pwrite",
        },
        wal.insert_shards()
    );

    let clients: Vec<CachePadded<Client>> = (0..threads)
        .map(|_| {
            CachePadded::new(Client {
                interval: Mutex::new(Interval::default()),
                records: AtomicU64::new(0),
                durable_lsn: AtomicU64::new(0),
            })
        })
        .collect();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.time);
    let stats = wal.stats();
    let syncs0 = stats.syncs.load(Relaxed);
    let flushes0 = stats.flushes.load(Relaxed);
    let flush_ns0 = stats.flush_ns.load(Relaxed);
    let lsn0 = wal.insert_lsn();

    let hist = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (t, client) in clients.iter().enumerate() {
            let (wal, stop, args) = (&wal, &stop, &args);
            handles.push(s.spawn(move || {
                let mut h = bench_stats::histogram();
                let mut payload = vec![0u8; args.size];
                for (i, b) in payload.iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(31).wrapping_add(t as u8);
                }
                let mut lsns: Vec<Lsn> = Vec::with_capacity(batch);
                // A thread may keep an insert slot only if there are enough
                // for every thread; otherwise it takes one per append (a
                // held slot would lock the other threads out).
                let mut held = (threads <= wal.insert_shards()).then(|| wal.inserter());
                let mut n: u64 = 0;
                let batch_copy = payload.clone();
                let batch_payload: Vec<(Kind, &[u8])> =
                    (0..batch).map(|_| (Kind::DATA, &batch_copy[..])).collect();
                while !stop.load(Relaxed) {
                    n += 1;
                    payload[..8.min(args.size)]
                        .copy_from_slice(&n.to_le_bytes()[..8.min(args.size)]);
                    let t0 = Instant::now();
                    let (first, end) = if batch == 1 {
                        let a = match held.as_mut() {
                            Some(ins) => ins.append(Kind::DATA, &payload),
                            None => wal.append(Kind::DATA, &payload),
                        }
                        .expect("append");
                        (a.lsn, a.end)
                    } else {
                        // Every record of the batch carries the same payload.
                        let recs: &[(Kind, &[u8])] = &batch_payload;
                        lsns.clear();
                        let end = match held.as_mut() {
                            Some(ins) => ins.append_batch(recs, &mut lsns),
                            None => wal.append_batch(recs, &mut lsns),
                        }
                        .expect("append");
                        (lsns[0], end)
                    };
                    if wal.wait(end, args.level).is_err() {
                        break;
                    }
                    let ns = t0.elapsed().as_nanos() as u64;
                    h.saturating_record(ns.max(1));
                    client.records.fetch_add(batch as u64, Relaxed);
                    if args.level != Durability::Off {
                        client.durable_lsn.store(first.0, Relaxed);
                    }
                    client.interval.lock().unwrap().record(ns);
                }
                h
            }));
        }

        // Monitor: progress lines, and release of old WAL.
        let tick = if args.progress > 0.0 {
            Duration::from_secs_f64(args.progress)
        } else {
            Duration::from_millis(500)
        };
        let mut last = Instant::now();
        let mut last_records = 0u64;
        let mut last_syncs = syncs0;
        let mut wakes = bench_stats::Ticks::new(started, tick, deadline - started);
        while let Some((at, is_tick)) = wakes.next_wake() {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let records: u64 = clients.iter().map(|c| c.records.load(Relaxed)).sum();
            let syncs = stats.syncs.load(Relaxed);
            let dt = last.elapsed().as_secs_f64();
            if args.progress > 0.0 && is_tick {
                let (avg, sd) = bench_stats::drain(clients.iter().map(|c| &c.interval));
                let rate = (records - last_records) as f64 / dt;
                println!(
                    "progress: {:.1} s, {:.1} rec/s, {:.1} MB/s, lat {:.3} ms stddev {:.3}, syncs {:.0}/s",
                    started.elapsed().as_secs_f64(),
                    rate,
                    rate * args.size as f64 / 1e6,
                    avg / 1e6,
                    sd / 1e6,
                    (syncs - last_syncs) as f64 / dt
                );
            }
            last = Instant::now();
            last_records = records;
            last_syncs = syncs;
            // Release WAL older than `keep`, as a checkpointer would.
            if wal.insert_lsn().0 - wal.start_lsn().0 > keep {
                let oldest_recent = clients
                    .iter()
                    .map(|c| c.durable_lsn.load(Relaxed))
                    .filter(|&l| l != 0)
                    .min();
                if let Some(l) = oldest_recent {
                    if Lsn(l) <= wal.flush_lsn() {
                        if let Err(e) = wal.remove_before(Lsn(l)) {
                            eprintln!("walden bench: could not release old WAL: {e}");
                        }
                    }
                }
            }
        }
        stop.store(true, Relaxed);
        let mut total = bench_stats::histogram();
        for h in handles {
            total.add(h.join().expect("bench thread")).unwrap();
        }
        total
    });
    // Records counted by the threads up to the stop flag; the last waits
    // finish a moment later, so measure to now.
    let elapsed = started.elapsed().as_secs_f64();
    let records: u64 = clients.iter().map(|c| c.records.load(Relaxed)).sum();
    let syncs = stats.syncs.load(Relaxed) - syncs0;
    let flushes = stats.flushes.load(Relaxed) - flushes0;
    let wal_bytes = wal.insert_lsn().0 - lsn0.0;
    bench_stats::print_summary(records, elapsed, args.size, &hist);
    println!("WAL MB/s: {:.1}", wal_bytes as f64 / elapsed / 1e6);
    println!("syncs/s: {:.1}", syncs as f64 / elapsed);
    println!("flushes/s: {:.1}", flushes as f64 / elapsed);
    let flush_ns = stats.flush_ns.load(Relaxed) - flush_ns0;
    println!(
        "flush time avg: {:.3} ms",
        if flushes > 0 {
            flush_ns as f64 / flushes as f64 / 1e6
        } else {
            0.0
        }
    );
    println!(
        "mean group size: {:.1}",
        if flushes > 0 {
            records as f64 / flushes as f64
        } else {
            0.0
        }
    );
    println!("ring full waits: {}", wal.ring_full_waits());
    println!(
        "segments created by the flusher: {}",
        stats.segments_created_by_flusher.load(Relaxed)
    );
    wal.close()?;
    Ok(())
}

/// `--embedded --pages N`: random page writes through the page store, with
/// its checkpointer and bgwriter running; prints the usual summary, the
/// WAL written per page write (full-page images included) and commit
/// latency inside and outside checkpoints.
fn run_pages(args: &BenchArgs, cfg: walden::Config, threads: usize) -> anyhow::Result<()> {
    use walden::store::page::PAGE_DATA;
    if args.size == 0 || args.size > PAGE_DATA {
        bail!(
            "--size {} must be between 1 and {PAGE_DATA} for page writes",
            args.size
        );
    }
    let store = walden::Store::open(cfg.clone())?;
    let wal = store.wal();
    println!(
        "walden bench: embedded page writes, {} thread(s), {} B at random offsets of {} pages, level {}, {} s, \
         full_page_writes={}, wal_compression={}, checkpoint_completion_target={}, shared_buffers={}",
        threads,
        args.size,
        args.pages,
        args.level,
        args.time,
        cfg.full_page_writes,
        cfg.wal_compression.name(),
        cfg.checkpoint_completion_target,
        cfg.shared_buffers.0
    );
    let clients: Vec<CachePadded<Client>> = (0..threads)
        .map(|_| {
            CachePadded::new(Client {
                interval: Mutex::new(Interval::default()),
                records: AtomicU64::new(0),
                durable_lsn: AtomicU64::new(0),
            })
        })
        .collect();
    if args.prefill {
        let t = Instant::now();
        let mut page = vec![0u8; PAGE_DATA];
        let mut last = Lsn(0);
        for block in 0..args.pages {
            fill_like_table_data(&mut page, block as u64 + 1);
            last = store.write_page(1, block, 0, &page)?.end;
        }
        wal.wait(last, Durability::Local)?;
        store.checkpoint()?;
        println!(
            "prefill: {} pages in {:.1} s, then a checkpoint",
            args.pages,
            t.elapsed().as_secs_f64()
        );
    }
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.time);
    let lsn0 = wal.insert_lsn();
    let before = store.metrics_snapshot();
    let ckpts =
        |s: &walden::metrics::StoreSnapshot| s.checkpoints.iter().map(|(_, n)| n).sum::<u64>();
    let (hist, split) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (t, client) in clients.iter().enumerate() {
            let (store, stop, args) = (&store, &stop, args);
            handles.push(s.spawn(move || {
                let mut h = bench_stats::histogram();
                let mut split = bench_stats::CheckpointSplit::default();
                let mut held =
                    (threads <= store.wal().insert_shards()).then(|| store.wal().inserter());
                let mut x = (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut payload = vec![0u8; args.size];
                let in_ckpt = || store.stats().checkpoint_in_progress.load(Relaxed);
                while !stop.load(Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let block = (x % args.pages as u64) as u32;
                    let off = (x >> 32) as usize % (PAGE_DATA - args.size + 1);
                    fill_like_table_data(&mut payload, x);
                    let during = in_ckpt();
                    let t0 = Instant::now();
                    let w = match held.as_mut() {
                        Some(ins) => store.write_page_with(ins, 1, block, off, &payload),
                        None => store.write_page(1, block, off, &payload),
                    }
                    .expect("page write");
                    if store.wal().wait(w.end, args.level).is_err() {
                        break;
                    }
                    let ns = t0.elapsed().as_nanos() as u64;
                    h.saturating_record(ns.max(1));
                    split.record(ns, during || in_ckpt());
                    client.records.fetch_add(1, Relaxed);
                    client.interval.lock().unwrap().record(ns);
                }
                (h, split)
            }));
        }
        let tick = if args.progress > 0.0 {
            Duration::from_secs_f64(args.progress)
        } else {
            Duration::from_millis(500)
        };
        let mut last = Instant::now();
        let mut last_records = 0u64;
        let mut last_lsn = lsn0;
        let mut wakes = bench_stats::Ticks::new(started, tick, deadline - started);
        while let Some((at, is_tick)) = wakes.next_wake() {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if args.progress > 0.0 && is_tick {
                let records: u64 = clients.iter().map(|c| c.records.load(Relaxed)).sum();
                let (avg, sd) = bench_stats::drain(clients.iter().map(|c| &c.interval));
                let dt = last.elapsed().as_secs_f64();
                let lsn = wal.insert_lsn();
                println!(
                    "progress: {:.1} s, {:.1} rec/s, WAL {:.1} MB/s, lat {:.3} ms stddev {:.3}{}",
                    started.elapsed().as_secs_f64(),
                    (records - last_records) as f64 / dt,
                    (lsn.0 - last_lsn.0) as f64 / dt / 1e6,
                    avg / 1e6,
                    sd / 1e6,
                    if store.stats().checkpoint_in_progress.load(Relaxed) {
                        ", checkpoint in progress"
                    } else {
                        ""
                    }
                );
                last = Instant::now();
                last_records = records;
                last_lsn = lsn;
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
    let elapsed = started.elapsed().as_secs_f64();
    let records: u64 = clients.iter().map(|c| c.records.load(Relaxed)).sum();
    let wal_bytes = wal.insert_lsn().0 - lsn0.0;
    let after = store.metrics_snapshot();
    bench_stats::print_summary(records, elapsed, args.size, &hist);
    println!("WAL MB/s: {:.1}", wal_bytes as f64 / elapsed / 1e6);
    println!("WAL bytes: {wal_bytes}");
    println!(
        "WAL bytes per page write: {:.1}",
        wal_bytes as f64 / records.max(1) as f64
    );
    let images = after.page_images - before.page_images;
    println!(
        "full-page images: {images} ({:.1}% of page writes), {} bytes",
        images as f64 * 100.0 / records.max(1) as f64,
        after.page_image_bytes - before.page_image_bytes
    );
    println!(
        "pages written: {} by checkpoints, {} by the bgwriter, {} by foreground evictions",
        after.buffers_checkpoint - before.buffers_checkpoint,
        after.buffers_clean - before.buffers_clean,
        after.buffers_backend - before.buffers_backend
    );
    split.print(ckpts(&after) - ckpts(&before));
    store.close()?;
    Ok(())
}

/// Bytes that compress about as table pages do (lz4 roughly 2:1): short
/// runs of letters and digits, where most 16-byte pieces repeat
/// an earlier piece (65%), as rows of a table repeat values.
fn fill_like_table_data(out: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 ";
    let mut at = 0;
    while at < out.len() {
        let n = 16.min(out.len() - at);
        let r = next();
        if at >= 16 && r % 20 < 13 {
            let back = 1 + (r >> 8) as usize % (at / 16).min(16);
            let from = at - 16 * back;
            out.copy_within(from..from + n, at);
        } else {
            for (i, b) in out[at..at + n].iter_mut().enumerate() {
                *b = ALNUM[((r >> (i * 4)) as usize ^ i) % ALNUM.len()];
            }
        }
        at += n;
    }
}
