//! A child process for page-store crash tests (`walden store-child`, hidden).
//!
//! Threads mix client records and page writes and print, flushed before the
//! next operation, one line per event:
//! - `begin REL BLOCK OFF LEN SEED` before a page write is issued;
//! - `page REL BLOCK OFF LEN SEED END` once it is durable at `local`;
//! - `ack LSN LEN SEED` for a client record durable at `local`.
//!
//! Thread `t` of `T` owns the blocks `b` with `b % T == t`, and issues one
//! write at a time, so each page has at most one write in doubt when the
//! process is killed. The bytes of a write are `testkit::payload(SEED, LEN)`.
//!
//! With `--resolve FILE` (lines `REL BLOCK`) it first prints, after
//! recovery, `state REL BLOCK CRC` (crc32c of the page's data) for each,
//! then `start LSN`. `--script torn` instead prepares the torn-page test:
//! eight pages, a checkpoint, one more change to block 3, then `ready`, and
//! waits to be killed.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;
use walden::store::page::PAGE_DATA;
use walden::{Durability, Kind, Store};

#[derive(Args)]
pub struct StoreChildArgs {
    #[arg(short = 'D', long)]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Blocks per relation (shared out between the threads).
    #[arg(long, default_value_t = 64)]
    blocks: u32,
    #[arg(long, default_value_t = 2)]
    rels: u32,
    /// Largest page write, in bytes.
    #[arg(long, default_value_t = 1500)]
    max_write: usize,
    /// Largest client record, in bytes.
    #[arg(long, default_value_t = 2000)]
    max_record: usize,
    /// Percent of operations that are page writes (the rest append records).
    #[arg(long, default_value_t = 70)]
    page_percent: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pages whose state to print after recovery.
    #[arg(long)]
    resolve: Option<PathBuf>,
    /// `torn`: prepare the torn-page test and wait.
    #[arg(long)]
    script: Option<String>,
    #[arg(short = 'c', long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
}

fn rng(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

pub fn run(args: StoreChildArgs) -> anyhow::Result<()> {
    let cfg = super::common::load_config(None, Some(&args.data_dir), &args.set)?;
    let store = Store::open(cfg)?;
    let out = Mutex::new(std::io::stdout());
    if args.script.as_deref() == Some("torn") {
        return torn_setup(&store, &out);
    }
    if let Some(path) = &args.resolve {
        let text = std::fs::read_to_string(path)?;
        let mut o = out.lock().unwrap();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let mut f = line.split(' ');
            let rel: u32 = f.next().unwrap().parse()?;
            let block: u32 = f.next().unwrap().parse()?;
            let p = store.read_page(rel, block)?;
            writeln!(o, "state {rel} {block} {:08x}", crc32c::crc32c(&p.data))?;
        }
        o.flush()?;
    }
    {
        let mut o = out.lock().unwrap();
        writeln!(o, "start {}", store.wal().opened_at())?;
        o.flush()?;
    }
    let per_thread = (args.blocks as usize).div_ceil(args.threads) as u64;
    std::thread::scope(|s| {
        for t in 0..args.threads {
            let (store, out, args) = (&store, &out, &args);
            s.spawn(move || {
                let mut x =
                    (args.seed << 20) ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut n = 0u64;
                let mut ins = store.wal().inserter();
                loop {
                    n += 1;
                    let seed = (args.seed << 40) ^ ((t as u64) << 32) ^ n;
                    if rng(&mut x) % 100 < args.page_percent {
                        let rel = 1 + (rng(&mut x) % args.rels as u64) as u32;
                        let block =
                            (t as u64 + args.threads as u64 * (rng(&mut x) % per_thread)) as u32;
                        if block >= args.blocks {
                            continue;
                        }
                        let len = 1 + (rng(&mut x) as usize % args.max_write.min(PAGE_DATA));
                        let off = rng(&mut x) as usize % (PAGE_DATA - len + 1);
                        let bytes = walden::testkit::payload(seed, len);
                        {
                            let mut o = out.lock().unwrap();
                            writeln!(o, "begin {rel} {block} {off} {len} {seed}").unwrap();
                            o.flush().unwrap();
                        }
                        let w = store
                            .write_page_with(&mut ins, rel, block, off, &bytes)
                            .expect("page write");
                        ins.wait(w.end, Durability::Local).expect("wait");
                        let mut o = out.lock().unwrap();
                        writeln!(o, "page {rel} {block} {off} {len} {seed} {}", w.end).unwrap();
                        o.flush().unwrap();
                    } else {
                        let len = walden::testkit::payload_len(seed, args.max_record);
                        let p = walden::testkit::payload(seed, len);
                        let a = ins.append(Kind::DATA, &p).expect("append");
                        ins.wait(a.end, Durability::Local).expect("wait");
                        let mut o = out.lock().unwrap();
                        writeln!(o, "ack {} {} {}", a.lsn, len, seed).unwrap();
                        o.flush().unwrap();
                    }
                }
            });
        }
    });
    Ok(())
}

/// Eight pages of relation 1, an immediate checkpoint (so they are on the
/// data device), then block 3 changed once more: after a kill, block 3 on
/// disk is the checkpoint's image and the WAL holds its change (a full-page
/// image with full_page_writes on, a delta without).
fn torn_setup(store: &Store, out: &Mutex<std::io::Stdout>) -> anyhow::Result<()> {
    for block in 0..8u32 {
        let text = format!("page {block} before the checkpoint");
        store.write_page(1, block, 0, text.as_bytes())?;
    }
    store.checkpoint()?;
    let w = store.write_page(1, 3, 100, b"after the checkpoint")?;
    store.wal().wait(w.end, Durability::Local)?;
    let mut o = out.lock().unwrap();
    writeln!(o, "ready {}", w.end)?;
    o.flush()?;
    drop(o);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
