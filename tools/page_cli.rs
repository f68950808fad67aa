//! `walden page write`, `walden page read` and `walden checkpoint`: the page
//! store from a shell, through a running server.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use walden::store::page::PAGE_DATA;
use walden::Durability;

use super::client_cli::Conn;

#[derive(Subcommand)]
pub enum PageCommand {
    /// Change bytes of a page: DATA (or --file, or standard input) at --offset.
    Write(PageWriteArgs),
    /// Print a page: its LSN and a hex dump of its data (or --raw bytes);
    /// a page never written says so instead (exit status 0).
    Read(PageReadArgs),
}

#[derive(Args)]
pub struct PageArgs {
    #[command(subcommand)]
    command: PageCommand,
}

#[derive(Args)]
pub struct PageWriteArgs {
    #[command(flatten)]
    conn: Conn,
    /// Relation id.
    #[arg(long)]
    rel: u32,
    /// Block number within the relation.
    #[arg(long)]
    block: u32,
    /// Byte offset within the page's data (0..8168).
    #[arg(long, default_value_t = 0)]
    offset: u16,
    /// Durability level to wait for: off, local, remote_write, on, remote_apply.
    #[arg(long, default_value = "local")]
    level: Durability,
    /// Read the bytes from this file.
    #[arg(long, conflicts_with = "data")]
    file: Option<PathBuf>,
    /// The bytes to write (else --file, else standard input).
    data: Option<String>,
}

#[derive(Args)]
pub struct PageReadArgs {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    rel: u32,
    #[arg(long)]
    block: u32,
    /// Write the page's 8168 data bytes to standard output, nothing else.
    #[arg(long)]
    raw: bool,
}

#[derive(Args)]
pub struct CheckpointArgs {
    #[command(flatten)]
    conn: Conn,
}

pub fn run(args: PageArgs) -> anyhow::Result<()> {
    match args.command {
        PageCommand::Write(a) => write(a),
        PageCommand::Read(a) => read(a),
    }
}

fn write(a: PageWriteArgs) -> anyhow::Result<()> {
    let bytes = match (&a.data, &a.file) {
        (Some(d), _) => d.clone().into_bytes(),
        (None, Some(f)) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            b
        }
    };
    if bytes.is_empty() {
        bail!("nothing to write: give DATA, --file or standard input");
    }
    if a.offset as usize + bytes.len() > PAGE_DATA {
        bail!(
            "{} bytes at offset {} do not fit a page: a page holds {PAGE_DATA} bytes of data",
            bytes.len(),
            a.offset
        );
    }
    let mut c = a.conn.connect()?;
    let (lsn, end) = c.page_write(a.level, a.rel, a.block, a.offset, &bytes)?;
    println!("{lsn} (page LSN {end})");
    Ok(())
}

fn read(a: PageReadArgs) -> anyhow::Result<()> {
    let mut c = a.conn.connect()?;
    let (lsn, data) = c.page_read(a.rel, a.block)?;
    // Every write gives a page the end LSN of its record, and the stream
    // starts at segment 1: LSN 0/0 is only ever a page nothing was written
    // to (the server answers such a read with zeros, as PostgreSQL reads a
    // hole in a relation file). Say so rather than dump zeros as data.
    let never_written = !lsn.is_valid();
    let mut out = std::io::stdout().lock();
    if a.raw {
        out.write_all(&data)?;
        if never_written {
            eprintln!(
                "walden page read: block {} of relation {} has never been written (all zeros)",
                a.block, a.rel
            );
        }
        return Ok(());
    }
    if never_written {
        writeln!(
            out,
            "relation {} block {}: never written (page LSN 0/0, all {} bytes zero)",
            a.rel,
            a.block,
            data.len()
        )?;
        return Ok(());
    }
    writeln!(out, "relation {} block {}: page LSN {lsn}", a.rel, a.block)?;
    hexdump(&data, &mut out)?;
    Ok(())
}

/// `hexdump -C`'s layout; runs of identical lines print as one `*`.
pub(super) fn hexdump(data: &[u8], out: &mut impl Write) -> std::io::Result<()> {
    let mut prev: Option<&[u8]> = None;
    let mut starred = false;
    for (i, line) in data.chunks(16).enumerate() {
        if prev == Some(line) {
            if !starred {
                writeln!(out, "*")?;
                starred = true;
            }
            continue;
        }
        starred = false;
        prev = Some(line);
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let (a, b) = hex.split_at(hex.len().min(8));
        let text: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        writeln!(
            out,
            "{:08x}  {:<23}  {:<23}  |{text}|",
            i * 16,
            a.join(" "),
            b.join(" ")
        )?;
    }
    writeln!(out, "{:08x}", data.len())
}

/// `walden checkpoint`: an immediate checkpoint, like PostgreSQL's CHECKPOINT.
pub fn checkpoint(a: CheckpointArgs) -> anyhow::Result<()> {
    let mut c = a.conn.connect()?;
    let (lsn, redo) = c.checkpoint()?;
    println!("CHECKPOINT at {lsn} (redo {redo})");
    Ok(())
}
