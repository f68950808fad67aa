//! `walden append`, `walden read`, `walden status`: the protocol from a shell.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use walden::client::{Client, ClientError};
use walden::protocol::Frame;
use walden::{Durability, Kind, Lsn};

/// How a client tool finds the server (order: `common::server_addr`).
/// `-h` is the host, as in psql, so these commands have `--help` only.
#[derive(Args, Clone)]
#[command(disable_help_flag = true)]
pub struct Conn {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// Server host, or HOST:PORT (default: WALDEN_HOST, else DIR/data/walden.addr).
    #[arg(short = 'h', long = "host", short_alias = 'H')]
    host: Option<String>,
    /// Server port (default: WALDEN_PORT, else DIR/data/walden.addr, else 7480 with --host).
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Data directory whose walden.addr (in DIR/data, or DIR itself) names the
    /// server (default: WALDEN_DATA, else ./walden-data).
    #[arg(short = 'D', long)]
    data_dir: Option<PathBuf>,
    /// File holding the auth token.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl Conn {
    pub fn connect(&self) -> anyhow::Result<Client> {
        let addr =
            super::common::server_addr(self.host.as_deref(), self.port, self.data_dir.as_deref())?;
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
    /// Give up waiting for the level after this long (e.g. 2s, 500ms): the
    /// request is cancelled and answered INDETERMINATE (written, not
    /// confirmed at the level), never success. Default: wait for ever.
    #[arg(long, value_parser = parse_duration)]
    wait_timeout: Option<std::time::Duration>,
    /// File of records, one per line (default: standard input).
    file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    walden::config::Millis::parse(s).map(|m| m.duration())
}

/// Appends one record per input line and prints each record's LSN. When
/// a request fails, says which input lines were committed (with their
/// LSNs), which may have been (sent, unanswered) and which were not, so
/// that a rerun can start at the right line.
pub fn append(args: AppendArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect()?;
    let input: Box<dyn BufRead> = match &args.file {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut out = std::io::stdout().lock();
    let mut progress = AppendProgress::default();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut input = input.split(b'\n');
    let failure = loop {
        let line = match input.next() {
            Some(Ok(mut line)) => {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(line)
            }
            Some(Err(e)) => {
                let e = anyhow::Error::new(e).context("reading the input");
                break Some((e, false));
            }
            None => None,
        };
        let last = line.is_none();
        lines.extend(line);
        if lines.is_empty() || (!last && lines.len() < args.batch.max(1)) {
            if last {
                break None;
            }
            continue;
        }
        let recs: Vec<(Kind, &[u8])> = lines.iter().map(|l| (Kind::DATA, &l[..])).collect();
        match c.append_within(args.level, &recs, args.wait_timeout) {
            Ok(ack) => {
                for lsn in &ack.lsns {
                    writeln!(out, "{lsn}")?;
                }
                progress.committed(lines.len() as u64, &ack.lsns);
                lines.clear();
            }
            // Written but not confirmed at the level: in doubt.
            Err(e @ ClientError::Indeterminate { .. }) => break Some((e.into(), true)),
            // The server answered: nothing of this request was appended.
            Err(e @ ClientError::Server { .. }) => break Some((e.into(), false)),
            // No answer: the request may or may not have been appended.
            Err(e) => break Some((e.into(), true)),
        }
        if last {
            break None;
        }
    };
    let Some((error, in_doubt)) = failure else {
        return Ok(());
    };
    out.flush()?;
    // The lines never sent: the rest of a file is counted; standard input
    // is not read on (its writer may never stop).
    let unsent_after = if args.file.is_some() {
        Some(input.take_while(|l| l.is_ok()).count() as u64)
    } else {
        None
    };
    anyhow::bail!(
        "{}",
        progress.report(
            lines.len() as u64,
            in_doubt,
            unsent_after,
            &super::common::describe(&error)
        )
    )
}

/// Which input lines an interrupted `append` got committed.
#[derive(Default)]
struct AppendProgress {
    lines: u64,
    first: Option<Lsn>,
    last: Option<Lsn>,
}

impl AppendProgress {
    fn committed(&mut self, lines: u64, lsns: &[Lsn]) {
        self.lines += lines;
        self.first = self.first.or(lsns.first().copied());
        self.last = lsns.last().copied().or(self.last);
    }

    /// `lines 1-1000 committed (0/1000000..0/10F3A28); lines 1001-2000
    /// not committed: <error>`, with `pending` lines of the failed request
    /// (in doubt when no answer came) and `unsent_after` more never sent
    /// (`None`: unknown, standard input).
    fn report(
        &self,
        pending: u64,
        in_doubt: bool,
        unsent_after: Option<u64>,
        error: &str,
    ) -> String {
        let range = |from: u64, n: u64| {
            if n == 1 {
                format!("line {from}")
            } else {
                format!("lines {from}-{}", from + n - 1)
            }
        };
        let mut parts = Vec::new();
        match (self.first, self.last) {
            (Some(first), Some(last)) if self.lines > 0 => parts.push(format!(
                "{} committed ({first}..{last})",
                range(1, self.lines)
            )),
            _ => parts.push("no line committed".to_string()),
        }
        let next = self.lines + 1;
        let rest = unsent_after.map(|n| pending + n);
        if in_doubt && pending > 0 {
            parts.push(format!(
                "{} sent without an answer: they may have been committed (check with walden read --from {})",
                range(next, pending),
                self.last.map_or("the start".to_string(), |l| l.to_string())
            ));
            match unsent_after {
                Some(0) => {}
                Some(n) => parts.push(format!("{} not committed", range(next + pending, n))),
                None => parts.push(format!("line {} and after not committed", next + pending)),
            }
        } else {
            match rest {
                Some(0) => {}
                Some(n) => parts.push(format!("{} not committed", range(next, n))),
                None => parts.push(format!("line {next} and after not committed")),
            }
        }
        format!("append stopped: {}: {error}", parts.join("; "))
    }
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
    /// Print the server's JSON status (with --replication: that part only).
    #[arg(long)]
    json: bool,
    /// Show replication: on a primary each standby as pg_stat_replication
    /// does (positions, lags, sync state) and the quorum; on a standby its
    /// walreceiver (pg_stat_wal_receiver).
    #[arg(long)]
    replication: bool,
}

/// `walden status --replication`: PostgreSQL's column names.
fn print_replication(r: &serde_json::Value) {
    let text = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "".into(),
        other => other.to_string(),
    };
    if r["role"] == "standby" {
        let w = &r["wal_receiver"];
        println!("role:             standby of {}", text(&w["sender"]));
        for key in [
            "status",
            "receive_start_lsn",
            "written_lsn",
            "flushed_lsn",
            "replayed_lsn",
            "latest_end_lsn",
            "slot_name",
            "last_error",
        ] {
            println!("{:17} {}", format!("{key}:"), text(&w[key]));
        }
        return;
    }
    if r["role"] == "deposed primary" {
        println!(
            "role:                      deposed primary (deposed by term {}: no longer acknowledging commits)",
            text(&r["deposed_by_term"])
        );
    } else {
        println!("role:                      primary");
    }
    println!("term:                      {}", text(&r["term"]));
    println!(
        "synchronous_standby_names: {}",
        text(&r["synchronous_standby_names"])
    );
    println!(
        "quorum positions:          write {}, flush {}, apply {}",
        text(&r["quorum_write_lsn"]),
        text(&r["quorum_flush_lsn"]),
        text(&r["quorum_apply_lsn"])
    );
    if !r["quorum_lost_since"].is_null() {
        println!(
            "quorum lost since {}, {} commits waiting",
            text(&r["quorum_lost_since"]),
            text(&r["commits_waiting"])
        );
    }
    println!(
        "commits degraded to local: {}, answered INDETERMINATE: {}",
        text(&r["commits_degraded"]),
        text(&r["commits_indeterminate"])
    );
    let cols = [
        "application_name",
        "client_addr",
        "state",
        "sent_lsn",
        "write_lsn",
        "flush_lsn",
        "replay_lsn",
        "write_lag_ms",
        "flush_lag_ms",
        "replay_lag_ms",
        "lag_bytes",
        "sync_priority",
        "sync_state",
    ];
    let empty = vec![];
    let rows: Vec<Vec<String>> = r["standbys"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|s| cols.iter().map(|c| text(&s[*c])).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap()
        })
        .collect();
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        println!("{}", parts.join(" | ").trim_end());
    };
    line(cols.iter().map(|c| c.to_string()).collect());
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for r in &rows {
        line(r.clone());
    }
    println!("({} rows)", rows.len());
    // Who holds the quorum-acknowledged WAL, range by range.
    if let Some(ranges) = r["quorum_holders"].as_array().filter(|a| !a.is_empty()) {
        println!("quorum-acknowledged WAL held by:");
        for h in ranges {
            let names: Vec<String> = h["standbys"]
                .as_array()
                .map(|a| a.iter().map(text).collect())
                .unwrap_or_default();
            println!(
                "  {} .. {}: {}",
                text(&h["from"]),
                text(&h["to"]),
                if names.is_empty() {
                    "(no connected standby)".to_string()
                } else {
                    names.join(", ")
                }
            );
        }
    }
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect()?;
    let (insert, write, flush, json) = c.status()?;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    if args.replication {
        let r = &v["replication"];
        if args.json {
            println!("{r}");
        } else {
            print_replication(r);
        }
        return Ok(());
    }
    if args.json {
        println!("{json}");
        return Ok(());
    }
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
    if field(&["role"]) != "?" {
        println!("role:            {}", field(&["role"]));
    }
    if field(&["timeline"]) != "?" {
        println!("timeline:        {}", field(&["timeline"]));
    }
    if field(&["term"]) != "?" {
        println!("term:            {}", field(&["term"]));
    }
    if field(&["deposed_by_term"]) != "?" {
        println!(
            "deposed:         by term {}: this server accepts no writes and acknowledges no commits; \
             rewind it with `walden rewind` and start it as a standby",
            field(&["deposed_by_term"])
        );
    }
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
    // A standby's walreceiver, and why it is not streaming (a diverged
    // standby says so here).
    if v["replication"]["wal_receiver"].is_object() {
        println!(
            "walreceiver:     {} from {}",
            field(&["replication", "wal_receiver", "status"]),
            field(&["replication", "wal_receiver", "sender"])
        );
        if let Some(e) = v["replication"]["wal_receiver"]["last_error"].as_str() {
            println!("last error:      {e}");
        }
    }
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
    // Every setting in force, as the configuration file writes it (a
    // reloaded one at its new value).
    if let Some(settings) = v["settings"].as_object() {
        println!("settings:");
        let width = settings.keys().map(|k| k.len()).max().unwrap_or(0);
        for (name, value) in settings {
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{}", format!("  {name:width$} = {value}").trim_end());
        }
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum SlotCommand {
    /// Create a physical replication slot reserving WAL from the current redo point.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// Slot name: lower case letters, digits and _, at most 63 bytes.
        name: String,
    },
    /// Drop a replication slot (refused while a standby streams from it).
    Drop {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
    /// List the replication slots, like pg_replication_slots.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Print the JSON of /status's "slots".
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct SlotArgs {
    #[command(subcommand)]
    command: SlotCommand,
}

/// `walden slot create|drop|list`.
pub fn slot(args: SlotArgs) -> anyhow::Result<()> {
    use walden::protocol::SlotOp;
    match args.command {
        SlotCommand::Create { conn, name } => {
            walden::replication::slots::validate_name(&name).map_err(anyhow::Error::msg)?;
            let lsn = conn.connect()?.slot(SlotOp::Create, &name)?;
            println!("created replication slot \"{name}\" (restart_lsn {lsn})");
        }
        SlotCommand::Drop { conn, name } => {
            walden::replication::slots::validate_name(&name).map_err(anyhow::Error::msg)?;
            conn.connect()?.slot(SlotOp::Drop, &name)?;
            println!("dropped replication slot \"{name}\"");
        }
        SlotCommand::List { conn, json } => {
            let (_, _, _, text) = conn.connect()?.status()?;
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let slots = v["slots"].as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::Value::Array(slots));
                return Ok(());
            }
            let text = |x: &serde_json::Value| match x {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            };
            println!(
                "{:<20} {:<6} {:<18} {:<10} {:>14}",
                "slot_name", "active", "restart_lsn", "wal_status", "safe_wal_size"
            );
            for s in &slots {
                println!(
                    "{:<20} {:<6} {:<18} {:<10} {:>14}",
                    text(&s["slot_name"]),
                    if s["active"] == true { "t" } else { "f" },
                    text(&s["restart_lsn"]),
                    text(&s["wal_status"]),
                    text(&s["safe_wal_size"]),
                );
            }
            println!("({} rows)", slots.len());
        }
    }
    Ok(())
}
