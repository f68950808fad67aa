//! `walden append`, `walden read`, `walden status`: the protocol from a shell.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use walden::client::Client;
use walden::protocol::Frame;
use walden::{Durability, Kind, Lsn};

#[derive(Args, Clone)]
pub struct Conn {
    /// Server address (host:port); default: DIR/data/walden.addr, else 127.0.0.1:7480.
    #[arg(short = 'H', long = "host")]
    host: Option<String>,
    /// Data directory whose walden.addr (in DIR/data, or DIR itself) names the server.
    #[arg(short = 'D', long, default_value = "walden-data")]
    data_dir: PathBuf,
    /// File holding the auth token.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl Conn {
    pub fn connect(&self) -> anyhow::Result<Client> {
        let addr = match &self.host {
            Some(h) => h.clone(),
            None => super::common::listen_addr_in(&self.data_dir)
                .unwrap_or_else(|| "127.0.0.1:7480".into()),
        };
        let token = super::common::read_token(self.token_file.as_deref())?;
        Ok(Client::connect(&addr, token.as_deref())?)
    }
}

#[derive(Args)]
pub struct AppendArgs {
    #[command(flatten)]
    conn: Conn,
    /// Durability level to wait for: off, local, remote_write, on, remote_apply.
    #[arg(long, default_value = "local")]
    level: Durability,
    /// Records to send per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// File of records, one per line (default: standard input).
    file: Option<PathBuf>,
}

/// Appends one record per input line and prints each record's LSN.
pub fn append(args: AppendArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect()?;
    let input: Box<dyn BufRead> = match &args.file {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut out = std::io::stdout().lock();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut send = |lines: &mut Vec<Vec<u8>>, c: &mut Client| -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let recs: Vec<(Kind, &[u8])> = lines.iter().map(|l| (Kind::DATA, &l[..])).collect();
        let ack = c.append(args.level, &recs)?;
        for lsn in ack.lsns {
            writeln!(out, "{lsn}")?;
        }
        lines.clear();
        Ok(())
    };
    for line in input.split(b'\n') {
        let mut line = line?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        lines.push(line);
        if lines.len() >= args.batch.max(1) {
            send(&mut lines, &mut c)?;
        }
    }
    send(&mut lines, &mut c)
}

/// How `walden read` prints a record.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ReadFormat {
    /// `LSN<TAB>payload` (with `--all-kinds`, `LSN<TAB>KIND<TAB>payload`),
    /// the payload as text with anything else escaped.
    Text,
    /// `LSN KIND, N bytes` and the payload as `hexdump -C` shows it.
    Hex,
    /// One JSON object per line: lsn, kind, length, encoding and payload
    /// (the UTF-8 text when valid, else lowercase hex).
    Json,
}

#[derive(Args)]
pub struct ReadArgs {
    #[command(flatten)]
    conn: Conn,
    /// First record's LSN (e.g. 0/1000000).
    #[arg(long)]
    from: Lsn,
    /// Keep printing records as they become durable, until interrupted.
    #[arg(long)]
    follow: bool,
    /// Stop after this many records (0: all there are).
    #[arg(short = 'n', long, default_value_t = 0)]
    limit: u64,
    /// Also print walden's own records (page writes, checkpoints).
    #[arg(long)]
    all_kinds: bool,
    /// Output: text, hex or json.
    #[arg(long, value_enum, default_value_t = ReadFormat::Text)]
    format: ReadFormat,
}

/// Prints one record in `format`.
fn print_record(
    format: ReadFormat,
    all_kinds: bool,
    lsn: Lsn,
    kind: Kind,
    payload: &[u8],
    out: &mut impl Write,
) -> std::io::Result<()> {
    match format {
        ReadFormat::Text => {
            let text = String::from_utf8_lossy(payload);
            if all_kinds {
                writeln!(out, "{lsn}\t{kind}\t{}", text.escape_debug())
            } else {
                writeln!(out, "{lsn}\t{}", text.escape_debug())
            }
        }
        ReadFormat::Hex => {
            writeln!(out, "{lsn} {kind}, {} bytes", payload.len())?;
            super::page_cli::hexdump(payload, out)
        }
        ReadFormat::Json => {
            let (encoding, text) = match std::str::from_utf8(payload) {
                Ok(t) => ("utf8", t.to_string()),
                Err(_) => ("hex", payload.iter().map(|b| format!("{b:02x}")).collect()),
            };
            let obj = serde_json::json!({
                "lsn": lsn.to_string(),
                "kind": kind.to_string(),
                "length": payload.len(),
                "encoding": encoding,
                "payload": text,
            });
            writeln!(out, "{obj}")
        }
    }
}

/// Prints each record from `--from` in the chosen format: the clients'
/// records, or every record with `--all-kinds`.
pub fn read(args: ReadArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect()?;
    let mut out = std::io::stdout().lock();
    let mut printed = 0u64;
    let all = args.all_kinds;
    let mut print = |lsn: Lsn,
                     kind: Kind,
                     payload: &[u8],
                     out: &mut std::io::StdoutLock|
     -> std::io::Result<bool> {
        if !all && kind.is_walden() {
            return Ok(false);
        }
        print_record(args.format, all, lsn, kind, payload, out)?;
        printed += 1;
        Ok(args.limit > 0 && printed >= args.limit)
    };
    if args.follow {
        c.follow(args.from)?;
        loop {
            match c.recv()? {
                Frame::Records { records, .. } => {
                    for r in records {
                        if print(r.lsn, r.kind, &r.payload, &mut out)? {
                            return Ok(());
                        }
                    }
                    out.flush()?;
                }
                Frame::ReadEnd { .. } => return Ok(()),
                other => anyhow::bail!("unexpected frame: {other:?}"),
            }
        }
    }
    let mut from = args.from;
    loop {
        let (records, end) = c.read(from, 4 << 20, 0)?;
        if records.is_empty() {
            return Ok(());
        }
        for r in &records {
            if print(r.lsn, r.kind, &r.payload, &mut out)? {
                return Ok(());
            }
        }
        from = end;
    }
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
    /// Print the server's JSON status.
    #[arg(long)]
    json: bool,
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect()?;
    let (insert, write, flush, json) = c.status()?;
    if args.json {
        println!("{json}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    let field = |path: &[&str]| {
        let mut x = &v;
        for p in path {
            x = &x[*p];
        }
        match x {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "?".into(),
            other => other.to_string(),
        }
    };
    println!("server:          {}", c.server_name);
    println!("state:           {}", field(&["state"]));
    if field(&["state"]) == "recovering" {
        println!(
            "recovery:        redo at {} of {} ({}%), from {}, {} records",
            field(&["recovery", "replayed_to"]),
            field(&["recovery", "end_of_wal"]),
            field(&["recovery", "percent"]),
            field(&["recovery", "redo_from"]),
            field(&["recovery", "records"]),
        );
        return Ok(());
    }
    println!("insert LSN:      {insert}");
    println!("write LSN:       {write}");
    println!("flush LSN:       {flush}");
    println!("WAL starts at:   {}", field(&["start_lsn"]));
    println!(
        "last checkpoint: {} (redo {}){}",
        field(&["page_store", "checkpoint_lsn"]),
        field(&["page_store", "redo_lsn"]),
        if field(&["page_store", "checkpoint_in_progress"]) == "true" {
            "; a checkpoint is in progress"
        } else {
            ""
        }
    );
    println!("uptime:          {} s", field(&["uptime_seconds"]));
    Ok(())
}
