//! `walden waldump` and `walden controldata` as an operator runs them: the
//! built binary on a WAL written here with deterministic content. Line
//! format, filters, --stats totals, the closing line, garbage that must stop
//! the dump cleanly (never a panic), and controldata's fields.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use walden::config::Size;
use walden::record::{self, Kind};
use walden::wal::segments;
use walden::{Config, Durability, Lsn, Wal};

const SEG: u64 = 1 << 20;

fn config(data: &Path) -> Config {
    let mut cfg = Config::with_data_directory(data);
    cfg.wal_segment_size = Size(SEG);
    cfg
}

/// One record as appended: where it landed and what it holds.
#[derive(Clone, Debug)]
struct Written {
    lsn: Lsn,
    kind: Kind,
    payload: Vec<u8>,
}

impl Written {
    fn tot_len(&self) -> u64 {
        (record::HEADER_LEN + self.payload.len()) as u64
    }
    fn end(&self) -> Lsn {
        Lsn(self.lsn.0 + record::stream_len(self.payload.len()))
    }
}

/// xorshift64: deterministic "random" bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    walden::testkit::payload(seed, len)
}

/// The records every test starts from: a few of known shape, then enough
/// varied ones to cross into a third 1 MiB segment.
fn records() -> Vec<(Kind, Vec<u8>)> {
    let mut v: Vec<(Kind, Vec<u8>)> = vec![
        (Kind::DATA, b"hello".to_vec()),
        (Kind(7), noise(1, 40)),
        (Kind::NOOP, Vec::new()),
        (
            Kind::DATA,
            b"The quick brown fox jumps over the lazy dog, twice over.".to_vec(),
        ),
        (Kind(200), b"x".to_vec()),
    ];
    for i in 0..4000u64 {
        let kind = match i % 5 {
            0..=2 => Kind::DATA,
            3 => Kind(7),
            _ => Kind(200),
        };
        let len = walden::testkit::payload_len(i, 1500);
        v.push((kind, noise(i + 100, len)));
    }
    v
}

/// Writes the records durably and closes the WAL; returns them with their LSNs.
fn write_wal(data: &Path, recs: &[(Kind, Vec<u8>)]) -> Vec<Written> {
    let wal = Wal::open(config(data)).unwrap();
    let mut out = Vec::new();
    let mut last = wal.insert_lsn();
    for (kind, payload) in recs {
        let a = wal.append(*kind, payload).unwrap();
        out.push(Written {
            lsn: a.lsn,
            kind: *kind,
            payload: payload.clone(),
        });
        last = a.end;
    }
    wal.wait(last, Durability::Local).unwrap();
    wal.close().unwrap();
    out
}

fn setup() -> (tempfile::TempDir, Vec<Written>) {
    let d = tempfile::tempdir().unwrap();
    let written = write_wal(d.path(), &records());
    assert_eq!(written[0].lsn, Lsn(SEG), "a fresh WAL starts at segment 1");
    assert!(
        written.last().unwrap().end().segno(SEG) >= 3,
        "the WAL should span 3 segments"
    );
    (d, written)
}

fn walden(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(args)
        .env("WALDEN_LOG", "warn")
        .output()
        .unwrap()
}

fn waldump(data: &Path, extra: &[&str]) -> Output {
    let wal = data.join("wal");
    let mut args = vec!["waldump", "-p", wal.to_str().unwrap()];
    args.extend_from_slice(extra);
    walden(&args)
}

fn stdout_lines(o: &Output) -> Vec<String> {
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// pg_waldump's `%X/%08X`.
fn pg(lsn: Lsn) -> String {
    format!("{:X}/{:08X}", lsn.0 >> 32, lsn.0 as u32)
}

fn lsn_of_line(line: &str) -> Lsn {
    let at = line.find("lsn: ").unwrap() + 5;
    line[at..].split(',').next().unwrap().parse().unwrap()
}

/// The process exited by itself with 0 or 1: not a panic, not a signal.
fn assert_sane_exit(o: &Output) {
    let code = o.status.code();
    assert!(
        matches!(code, Some(0) | Some(1)),
        "exit status {:?}; stderr: {}",
        o.status,
        stderr(o)
    );
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
}

#[test]
fn prints_records_in_pg_waldumps_shape() {
    let (d, w) = setup();
    let o = waldump(d.path(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = stdout_lines(&o);
    assert_eq!(lines.len(), w.len());
    assert_eq!(
        lines[0],
        "kind: DATA        len (rec/tot):     29/    32, lsn: 0/00100000, desc: 5 bytes \"hello\""
    );
    assert_eq!(
        lines[1],
        "kind: USER7       len (rec/tot):     64/    64, lsn: 0/00100020, desc: 40 bytes"
    );
    assert_eq!(
        lines[2],
        "kind: NOOP        len (rec/tot):     24/    24, lsn: 0/00100060, desc: 0 bytes"
    );
    assert_eq!(
        lines[3],
        "kind: DATA        len (rec/tot):     80/    80, lsn: 0/00100078, \
         desc: 56 bytes \"The quick brown fox jumps over t\"…"
    );
    assert_eq!(
        lines[4],
        "kind: WALDEN200   len (rec/tot):     25/    32, lsn: 0/001000C8, desc: 1 byte \"x\""
    );
    // Every line: the LSN, kind and lengths of the record written there.
    for (line, rec) in lines.iter().zip(&w) {
        assert_eq!(lsn_of_line(line), rec.lsn, "{line}");
        assert!(
            line.starts_with(&format!("kind: {:<11} ", rec.kind.name())),
            "{line}"
        );
        let lens = format!(
            "len (rec/tot): {:>6}/{:>6}",
            rec.tot_len(),
            record::stream_len(rec.payload.len())
        );
        assert!(line.contains(&lens), "{line}");
    }
    // The closing line: the ordinary end, at the end of the last record.
    let end = w.last().unwrap().end();
    let err = stderr(&o);
    assert_eq!(
        err.trim_end(),
        format!(
            "walden waldump: end of WAL at {}: invalid record length at {end}: expected at least 24, got 0",
            pg(end)
        )
    );
    // -D finds the same WAL under DATADIR/wal.
    let o2 = walden(&["waldump", "-D", d.path().to_str().unwrap()]);
    assert_eq!(o2.stdout, o.stdout);
}

#[test]
fn limit_kind_filter_start_and_end() {
    let (d, w) = setup();
    // -n
    let o = waldump(d.path(), &["-n", "3"]);
    assert!(o.status.success());
    let lines = stdout_lines(&o);
    assert_eq!(lines.len(), 3);
    assert_eq!(lsn_of_line(&lines[2]), w[2].lsn);
    assert_eq!(stderr(&o), "", "-n stops where told: no closing line");

    // -r, case-insensitive, repeatable.
    let o = waldump(d.path(), &["-r", "user7"]);
    let lines = stdout_lines(&o);
    let user7: Vec<&Written> = w.iter().filter(|r| r.kind == Kind(7)).collect();
    assert_eq!(lines.len(), user7.len());
    assert!(lines.iter().all(|l| l.starts_with("kind: USER7 ")));
    assert_eq!(lsn_of_line(&lines[1]), user7[1].lsn);
    let o = waldump(d.path(), &["-r", "NOOP", "--kind", "Walden200"]);
    let want = w
        .iter()
        .filter(|r| r.kind == Kind::NOOP || r.kind == Kind(200))
        .count();
    assert_eq!(stdout_lines(&o).len(), want);
    let o = waldump(d.path(), &["-r", "list"]);
    let list = String::from_utf8(o.stdout).unwrap();
    assert!(list.starts_with("DATA\nNOOP\n"), "{list}");
    let o = waldump(d.path(), &["-r", "nosuchkind"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown record kind \"nosuchkind\""));

    // -s / -e: records 10..20; an END inside record 20 also stops before it.
    for end in [w[20].lsn, Lsn(w[20].lsn.0 + 8)] {
        let o = waldump(d.path(), &["-s", &w[10].lsn.to_string(), "-e", &pg(end)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let got: Vec<Lsn> = stdout_lines(&o).iter().map(|l| lsn_of_line(l)).collect();
        let want: Vec<Lsn> = w[10..20].iter().map(|r| r.lsn).collect();
        assert_eq!(got, want);
    }
}

/// -s inside a record: as pg_waldump, the dump starts at the next record
/// and says how far it skipped (records carry their LSN and crc, so the
/// next valid one is found by scanning forward).
#[test]
fn start_inside_a_record_skips_to_the_next_one() {
    let (d, w) = setup();
    for inside in [
        Lsn(w[10].lsn.0 + 8),
        Lsn(w[10].lsn.0 + 3),
        Lsn(w[11].lsn.0 - 8),
    ] {
        let o = waldump(d.path(), &["-s", &inside.to_string(), "-n", "3"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            stderr(&o),
            format!(
                "walden waldump: first record is after {}, at {}, skipping over {} bytes\n",
                pg(inside),
                pg(w[11].lsn),
                w[11].lsn.0 - inside.0
            )
        );
        let got: Vec<Lsn> = stdout_lines(&o).iter().map(|l| lsn_of_line(l)).collect();
        assert_eq!(got, vec![w[11].lsn, w[12].lsn, w[13].lsn]);
    }
    // The record that crosses into segment 2, and the one after it: a START
    // inside the first finds the second across the file boundary.
    let i = w
        .iter()
        .position(|r| r.end().segno(SEG) == 2 && r.lsn.segno(SEG) == 1)
        .unwrap();
    let inside = Lsn(w[i].lsn.0 + 16);
    let o = waldump(d.path(), &["-s", &inside.to_string(), "-n", "1"]);
    assert!(
        stderr(&o).contains(&format!("at {}, skipping", pg(w[i + 1].lsn))),
        "{}",
        stderr(&o)
    );
    assert_eq!(lsn_of_line(&stdout_lines(&o)[0]), w[i + 1].lsn);
    // --stats counts from the record found.
    let inside = Lsn(w[10].lsn.0 + 8);
    let o = waldump(d.path(), &["-s", &inside.to_string(), "--stats"]);
    assert!(
        stdout_lines(&o)[0].starts_with(&format!("WAL statistics between {} and ", pg(w[11].lsn))),
        "{}",
        stdout_lines(&o)[0]
    );
    // Past the last record there is nothing to skip to: a clear error, exit 1.
    let past = Lsn(w.last().unwrap().end().0 + 64);
    let o = waldump(d.path(), &["-s", &past.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!(
            "could not find a valid record at or after {}: ",
            pg(past)
        )),
        "{}",
        stderr(&o)
    );
    assert!(o.stdout.is_empty());
}

/// STARTSEG [ENDSEG], as pg_waldump: a segment file's name (in -p's
/// directory) or a path to it; the dump covers the records from the first
/// one that starts in STARTSEG to the last that ends in ENDSEG.
#[test]
fn segment_file_arguments_dump_those_segments() {
    let (d, w) = setup();
    let wal = d.path().join("wal");
    let seg2 = "000000010000000000000002";
    let in_segments = |first: u64, last: u64| -> Vec<Lsn> {
        w.iter()
            .filter(|r| r.lsn.0 >= first * SEG && r.end().0 <= (last + 1) * SEG)
            .map(|r| r.lsn)
            .collect()
    };
    let want = in_segments(2, 2);
    assert!(
        want[0].0 > 2 * SEG,
        "segment 2 should begin inside a record"
    );
    let o = waldump(d.path(), &[seg2]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Vec<Lsn> = stdout_lines(&o).iter().map(|l| lsn_of_line(l)).collect();
    assert_eq!(got, want);
    // At a segment start pg_waldump does not report the skipped tail; the
    // end is where it was told to stop: no closing line either.
    assert_eq!(stderr(&o), "");

    // A path: its directory is the WAL directory.
    let o = walden(&["waldump", wal.join(seg2).to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Vec<Lsn> = stdout_lines(&o).iter().map(|l| lsn_of_line(l)).collect();
    assert_eq!(got, want);

    // STARTSEG ENDSEG.
    let o = waldump(d.path(), &["000000010000000000000001", seg2]);
    let got: Vec<Lsn> = stdout_lines(&o).iter().map(|l| lsn_of_line(l)).collect();
    assert_eq!(got, in_segments(1, 2));
    assert_eq!(got[0], w[0].lsn);

    // Mistakes, named.
    let o = waldump(d.path(), &[seg2, "000000010000000000000001"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(
            "ENDSEG 000000010000000000000001 is before STARTSEG 000000010000000000000002"
        ),
        "{}",
        stderr(&o)
    );
    let o = waldump(d.path(), &[seg2, "-s", &w[0].lsn.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(
            "start WAL location 0/00100000 is not inside file \"000000010000000000000002\""
        ),
        "{}",
        stderr(&o)
    );
    let o = waldump(d.path(), &["000000010000000000000007"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("could not locate WAL file"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("000000010000000000000007"),
        "{}",
        stderr(&o)
    );
}

/// The numbers of a --stats row: N, record size, FPI size, combined size.
fn stats_numbers(line: &str) -> (String, Vec<u64>) {
    let mut clean = String::new();
    let mut depth = 0;
    for c in line.chars() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            _ if depth == 0 => clean.push(c),
            _ => {}
        }
    }
    let mut words = clean.split_whitespace();
    let name = words.next().unwrap().to_string();
    (name, words.map(|n| n.parse().unwrap()).collect())
}

#[test]
fn stats_totals_equal_the_bytes_between_start_and_end() {
    let (d, w) = setup();
    let start = w[0].lsn;
    let end = w.last().unwrap().end();
    let o = waldump(d.path(), &["--stats"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = stdout_lines(&o);
    assert_eq!(
        lines[0],
        format!("WAL statistics between {} and {}:", pg(start), pg(end))
    );
    assert!(lines[1].starts_with("Type "));
    assert!(lines[1].contains("Combined size"));
    let mut per_kind = std::collections::BTreeMap::new();
    for l in &lines[3..lines.len() - 2] {
        let (name, n) = stats_numbers(l);
        assert_eq!(n.len(), 4, "{l}");
        assert_eq!(n[2], 0, "no full-page images yet: {l}");
        assert_eq!(n[3], n[1] + n[2]);
        per_kind.insert(name, n);
    }
    let count = |k: Kind| w.iter().filter(|r| r.kind == k).count() as u64;
    let bytes = |k: Kind| {
        w.iter()
            .filter(|r| r.kind == k)
            .map(|r| record::stream_len(r.payload.len()))
            .sum::<u64>()
    };
    for k in [Kind::DATA, Kind::NOOP, Kind(7), Kind(200)] {
        assert_eq!(
            per_kind[&k.name()],
            vec![count(k), bytes(k), 0, bytes(k)],
            "{}",
            k.name()
        );
    }
    let total = lines.last().unwrap();
    assert!(total.starts_with("Total "), "{total}");
    assert!(total.ends_with("[100%]"), "{total}");
    let (_, t) = stats_numbers(total);
    assert_eq!(t, vec![w.len() as u64, end.0 - start.0, 0, end.0 - start.0]);

    // --stats=record: per kind and flags; the totals are the same.
    let o = waldump(d.path(), &["--stats=record"]);
    let lines = stdout_lines(&o);
    assert!(
        lines.iter().any(|l| l.starts_with("DATA/uncompressed ")),
        "{lines:?}"
    );
    assert_eq!(stats_numbers(lines.last().unwrap()).1, t);

    // With -n, the table covers exactly the records counted.
    let o = waldump(d.path(), &["--stats", "-n", "4"]);
    let lines = stdout_lines(&o);
    assert_eq!(
        lines[0],
        format!(
            "WAL statistics between {} and {}:",
            pg(start),
            pg(w[3].end())
        )
    );
    let (_, t) = stats_numbers(lines.last().unwrap());
    assert_eq!(
        t,
        vec![4, w[3].end().0 - start.0, 0, w[3].end().0 - start.0]
    );
}

/// The records fully before the first damaged byte, and where the dump must stop.
fn expected_stop(w: &[Written], damaged: Lsn) -> usize {
    // A record is intact if none of the bytes it covers (header and payload,
    // not padding) is damaged; the dump stops at the first that is not.
    w.iter()
        .position(|r| r.lsn.0 + r.tot_len() > damaged.0)
        .unwrap_or(w.len())
}

#[test]
fn stops_cleanly_at_garbage_in_the_middle_of_a_segment() {
    let (d, w) = setup();
    let wal = d.path().join("wal");
    let pristine: Vec<(PathBuf, Vec<u8>)> = segments::list_segments(&wal, 1, SEG)
        .unwrap()
        .into_iter()
        .map(|s| {
            let p = wal.join(walden::lsn::segment_file_name(1, s, SEG));
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    let restore = || {
        for (p, b) in &pristine {
            std::fs::write(p, b).unwrap();
        }
    };
    let last_end = w.last().unwrap().end();
    for trial in 0..12u64 {
        restore();
        // A damaged range somewhere inside the written WAL, past the first record.
        let span = last_end.0 - w[1].lsn.0;
        let at = Lsn(w[1].lsn.0
            + noise(trial, 8)
                .iter()
                .fold(0u64, |a, &b| (a << 8) | b as u64)
                % span);
        let len = 8 + (trial as usize * 37) % 300;
        let garbage = noise(1000 + trial, len);
        let seg_off = at.segment_offset(SEG) as usize;
        let (path, bytes) = &pristine[(at.segno(SEG) - 1) as usize];
        let mut bytes = bytes.clone();
        let n = len.min(bytes.len() - seg_off);
        bytes[seg_off..seg_off + n].copy_from_slice(&garbage[..n]);
        std::fs::write(path, &bytes).unwrap();
        let damaged_end = Lsn(at.0 + n as u64);

        let o = waldump(d.path(), &[]);
        assert_sane_exit(&o);
        assert!(o.status.success(), "trial {trial}: {}", stderr(&o));
        let stop = expected_stop(&w, at);
        let got: Vec<Lsn> = stdout_lines(&o).iter().map(|l| lsn_of_line(l)).collect();
        let want: Vec<Lsn> = w[..stop].iter().map(|r| r.lsn).collect();
        assert_eq!(got, want, "trial {trial}: damage at {at}..{damaged_end}");
        let err = stderr(&o);
        let stop_lsn = w.get(stop).map_or(last_end, |r| r.lsn);
        assert!(
            err.starts_with(&format!(
                "walden waldump: invalid record at {}: ",
                pg(stop_lsn)
            )),
            "trial {trial}: damage at {at}: {err}"
        );
        // --stats stops at the same place.
        let o = waldump(d.path(), &["--stats"]);
        assert_sane_exit(&o);
        let (_, t) = stats_numbers(stdout_lines(&o).last().unwrap());
        assert_eq!(t[0], stop as u64);
    }
    restore();
    assert!(waldump(d.path(), &[]).status.success());
}

#[test]
fn random_files_named_like_segments_never_panic() {
    let (d, w) = setup();
    let wal = d.path().join("wal");
    let seg = |n: u64| wal.join(walden::lsn::segment_file_name(1, n, SEG));

    // Segment 2 replaced by noise: the dump ends at the first record that
    // has a byte in it, and says so.
    std::fs::write(seg(2), noise(7, SEG as usize)).unwrap();
    let o = waldump(d.path(), &[]);
    assert_sane_exit(&o);
    let stop = expected_stop(&w, Lsn(2 * SEG));
    assert_eq!(stdout_lines(&o).len(), stop);
    assert!(
        stderr(&o).contains(&format!("invalid record at {}", pg(w[stop].lsn))),
        "{}",
        stderr(&o)
    );

    // A noise file far past the end changes nothing before it.
    std::fs::write(seg(9), noise(8, SEG as usize)).unwrap();
    let o2 = waldump(d.path(), &[]);
    assert_eq!(o2.stdout, o.stdout);

    // Segment 1 is noise: not even the first record is valid (exit 1, clear).
    std::fs::write(seg(1), noise(9, SEG as usize)).unwrap();
    let o = waldump(d.path(), &[]);
    assert_sane_exit(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("could not find a valid record at 0/00100000"),
        "{}",
        stderr(&o)
    );
    let o = waldump(d.path(), &["--stats"]);
    assert_sane_exit(&o);

    // Noise of a size no segment can have: the segment size cannot be told.
    std::fs::write(seg(1), noise(10, 12345)).unwrap();
    let o = waldump(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("12345 bytes, not a power of two"),
        "{}",
        stderr(&o)
    );
    let o = walden(&["controldata", "-D", d.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));

    // Many small noise segments of every odd kind at once, and a noise wal_start.
    for n in 1..6 {
        std::fs::write(seg(n), noise(20 + n, SEG as usize)).unwrap();
    }
    std::fs::write(wal.join("wal_start"), noise(30, 40)).unwrap();
    for args in [
        &[][..],
        &["--stats"],
        &["-s", "0/100000"],
        &["-s", "0/1FFFF8", "-n", "5"],
    ] {
        let o = waldump(d.path(), args);
        assert_sane_exit(&o);
    }
    assert_sane_exit(&walden(&["controldata", "-D", d.path().to_str().unwrap()]));
}

#[test]
fn controldata_reports_the_wal_and_a_damaged_wal_start() {
    let (d, w) = setup();
    let end = w.last().unwrap().end();
    let dir = d.path().to_str().unwrap();
    let o = walden(&["controldata", "-D", dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let field = |label: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{label}:")))
            .unwrap_or_else(|| panic!("no {label:?} in\n{text}"));
        line[label.len() + 1..].trim().to_string()
    };
    assert_eq!(field("First retained WAL record (wal_start)"), "0/00100000");
    assert_eq!(field("Current end of valid WAL"), pg(end));
    assert_eq!(field("Bytes per WAL segment"), "1048576");
    assert_eq!(field("WAL block size"), "4096");
    assert_eq!(field("Latest checkpoint's TimeLineID"), "1");
    assert_eq!(field("Latest checkpoint location"), "none");
    assert_eq!(field("First WAL segment file"), "000000010000000000000001");
    assert_eq!(
        field("Retained WAL"),
        format!("{} records, {} bytes", w.len(), end.0 - SEG)
    );
    assert!(field("Database cluster state").starts_with("unknown"));
    assert!(field("Data page checksum version").starts_with("none"));
    // Labels line up in one column, as pg_controldata's.
    let cols: Vec<usize> = text
        .lines()
        .map(|l| {
            l.find(':').unwrap() + 1 + l[l.find(':').unwrap() + 1..].find(|c| c != ' ').unwrap()
        })
        .collect();
    assert!(cols.windows(2).all(|c| c[0] == c[1]), "{text}");

    // --json: the same fields.
    let o = walden(&["controldata", dir, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["wal_start"], "0/00100000");
    assert_eq!(j["end_of_wal"], pg(end));
    assert_eq!(j["bytes_per_wal_segment"], SEG);
    assert_eq!(j["wal_block_size"], 4096);
    assert_eq!(j["latest_checkpoint_timeline_id"], 1);
    assert_eq!(j["retained_wal_records"], w.len());
    assert!(j["latest_checkpoint_location"].is_null());
    assert_eq!(j["warnings"].as_array().unwrap().len(), 0);

    // One digit of the LSN in wal_start changed: reported, exit non-zero.
    let path = d.path().join("wal/wal_start");
    let good = std::fs::read_to_string(&path).unwrap();
    assert!(good.starts_with("0/100000 "), "{good}");
    std::fs::write(&path, good.replacen("0/100000", "0/200000", 1)).unwrap();
    let o = walden(&["controldata", "-D", dir]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("crc mismatch"), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.starts_with("WARNING: "), "{text}");
    assert!(text.contains("crc mismatch"), "{text}");
    let o = walden(&["controldata", "-D", dir, "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["wal_start"].is_null());
    assert!(j["warnings"][0].as_str().unwrap().contains("crc mismatch"));
    // waldump refuses to guess a start, but reads from an explicit one.
    let o = waldump(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("crc mismatch"), "{}", stderr(&o));
    let o = waldump(d.path(), &["-s", "0/100000", "-n", "1"]);
    assert!(o.status.success());

    // A missing directory is a clear error.
    let missing = d.path().join("nope");
    let o = walden(&["controldata", "-D", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    let o = walden(&["waldump", "-D", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("could not open WAL directory"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn follow_prints_records_appended_later() {
    let d = tempfile::tempdir().unwrap();
    let first = write_wal(
        d.path(),
        &[(Kind::DATA, b"one".to_vec()), (Kind::DATA, b"two".to_vec())],
    );
    let wal_dir = d.path().join("wal");
    let mut child = Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["waldump", "--follow", "-p", wal_dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let wait_for = |n: usize, got: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => got.push(l),
                Err(_) => panic!("waldump --follow printed only {got:?}"),
            }
        }
    };
    wait_for(2, &mut got);
    assert!(got[1].ends_with("desc: 3 bytes \"two\""), "{got:?}");
    // More records, from another process's point of view: the WAL reopened.
    let later = write_wal(d.path(), &[(Kind(9), b"three".to_vec())]);
    assert_eq!(later[0].lsn, first[1].end());
    wait_for(3, &mut got);
    assert!(got[2].starts_with("kind: USER9 "), "{got:?}");
    assert_eq!(lsn_of_line(&got[2]), later[0].lsn);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A page store's directory: controldata reads its control file, waldump
/// names its page and checkpoint records.
#[test]
fn controldata_and_waldump_read_a_page_store() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = walden::Config::with_data_directory(d.path());
    cfg.set("wal_segment_size=1MB").unwrap();
    cfg.set("min_wal_size=2MB").unwrap();
    cfg.set("wal_compression=lz4").unwrap();
    cfg.set("wal_keep_size=1GB").unwrap();
    let store = walden::Store::open(cfg).unwrap();
    store.write_page(7, 3, 10, b"hello").unwrap();
    store.checkpoint().unwrap();
    store.write_page(7, 3, 20, b"world").unwrap();
    let c = store.control();
    store.close().unwrap();
    let dir = d.path().to_str().unwrap();
    let o = walden(&["controldata", dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.contains("Database cluster state:                shut down"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Database system identifier:            {}",
            c.system_identifier
        )),
        "{text}"
    );
    assert!(
        text.contains("Data page checksum version:            1"),
        "{text}"
    );
    assert!(
        text.contains("Latest checkpoint's full_page_writes:  on"),
        "{text}"
    );
    let o = walden(&["waldump", "-D", dir]);
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        out.contains("desc: rel 7 blk 3 FPW, compression method: lz4"),
        "{out}"
    );
    assert!(out.contains("kind: CHECKPOINT_REDO"), "{out}");
    assert!(out.contains("kind: CHECKPOINT_SHUTDOWN"), "{out}");
    assert!(out.contains("desc: redo "), "{out}");
    let o = walden(&["waldump", "-D", dir, "--stats=record"]);
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("PAGE_IMAGE/lz4"), "{out}");
}

/// A page store's WAL: pages of relations 7 and 8, a checkpoint, then more
/// writes (the first after the checkpoint logs a full-page image).
fn page_store_wal(compression: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = walden::Config::with_data_directory(d.path());
    cfg.set("wal_segment_size=1MB").unwrap();
    cfg.set(&format!("wal_compression={compression}")).unwrap();
    // Checkpoints move wal_start to their redo point (the default keeps 1GB).
    cfg.set("wal_keep_size=0").unwrap();
    let store = walden::Store::open(cfg).unwrap();
    store.write_page(7, 3, 10, b"hello").unwrap();
    store.write_page(7, 4, 0, b"four").unwrap();
    store.write_page(8, 3, 0, b"other relation").unwrap();
    store.checkpoint().unwrap();
    store.write_page(7, 3, 20, b"world").unwrap();
    store.write_page(7, 3, 30, b"again").unwrap();
    store.write_page(8, 3, 40, b"more").unwrap();
    store.write_page(7, 4, 50, b"five").unwrap();
    store.close().unwrap();
    d
}

fn lsns(o: &Output) -> Vec<String> {
    stdout_lines(o)
        .iter()
        .filter(|l| l.starts_with("kind: "))
        .map(|l| pg(lsn_of_line(l)))
        .collect()
}

/// -R/--relation and -B/--block: only the page records of that relation
/// (and block), as pg_waldump's; walden's relation is one number.
#[test]
fn relation_and_block_filters() {
    let d = page_store_wal("lz4");
    let dir = d.path().to_str().unwrap();
    let o = walden(&["waldump", "-D", dir, "-R", "7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = stdout_lines(&o);
    assert!(
        lines.iter().all(|l| l.contains("desc: rel 7 blk ")),
        "{lines:#?}"
    );
    assert_eq!(
        lsns(&o),
        [
            "0/00100058",
            "0/001000B8",
            "0/001001C8",
            "0/00100230",
            "0/001002D0"
        ]
    );
    let o = walden(&["waldump", "-D", dir, "--relation=7", "--block=3"]);
    assert_eq!(lsns(&o), ["0/00100058", "0/001001C8", "0/00100230"]);
    assert!(
        stdout_lines(&o)[2].ends_with("desc: rel 7 blk 3 off 30 len 5"),
        "{:?}",
        stdout_lines(&o)
    );
    let o = walden(&[
        "waldump",
        "-D",
        dir,
        "-R",
        "8",
        "-B",
        "3",
        "-r",
        "PAGE_WRITE",
    ]);
    assert!(lsns(&o).is_empty(), "{:?}", lsns(&o));
    // Counted in --stats as shown.
    let o = walden(&["waldump", "-D", dir, "-R", "7", "--stats"]);
    let total = stdout_lines(&o).last().unwrap().clone();
    assert!(total.split_whitespace().nth(1) == Some("5"), "{total}");
    // -B alone is refused, as by pg_waldump.
    let o = walden(&["waldump", "-D", dir, "-B", "3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--relation"), "{}", stderr(&o));
}

/// -b/--bkp-details: a line under each page record naming its block, and
/// for a full-page image how it is stored.
#[test]
fn bkp_details_show_full_page_images() {
    let d = page_store_wal("lz4");
    let dir = d.path().to_str().unwrap();
    let o = walden(&["waldump", "-D", dir, "-b", "-n", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = stdout_lines(&o);
    assert!(lines[0].starts_with("kind: CHECKPOINT_REDO "), "{lines:#?}");
    assert!(
        lines[1].starts_with("kind: CHECKPOINT_ONLINE "),
        "{lines:#?}"
    );
    assert!(
        lines[2].ends_with("desc: rel 7 blk 3 FPW, compression method: lz4, 54 bytes"),
        "{lines:#?}"
    );
    assert_eq!(
        lines[3],
        format!(
            "\tblkref #0: rel 7 blk 3 (FPW); hole: offset: 0, length: 0, compression saved: {}, method: lz4",
            8168 - 54
        )
    );
    assert!(lines[4].contains("desc: rel 7 blk 4 FPW"), "{lines:#?}");
    assert!(
        lines[5].starts_with("\tblkref #0: rel 7 blk 4 (FPW); "),
        "{lines:#?}"
    );
    assert_eq!(lines.len(), 6);
    // A page change names its block only.
    let o = walden(&["waldump", "-D", dir, "--bkp-details", "-r", "PAGE_WRITE"]);
    let lines = stdout_lines(&o);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(lines[1], "\tblkref #0: rel 7 blk 3");

    // An image stored whole.
    let d = page_store_wal("off");
    let o = walden(&["waldump", "-D", d.path().to_str().unwrap(), "-b", "-R", "8"]);
    let lines = stdout_lines(&o);
    assert!(
        lines[0].ends_with("desc: rel 8 blk 3 FPW, 8168 bytes"),
        "{lines:#?}"
    );
    assert_eq!(
        lines[1],
        "\tblkref #0: rel 8 blk 3 (FPW); hole: offset: 0, length: 0"
    );
    assert_eq!(lines.len(), 4, "{lines:#?}");
}

/// With no -s, the dump begins at the oldest record on disk: a checkpoint
/// moves wal_start to its redo point, but releases no segment while that
/// point is in the first one, and the records before it are still there.
#[test]
fn default_start_is_the_oldest_retained_record() {
    let d = page_store_wal("lz4");
    let dir = d.path().to_str().unwrap();
    let o = walden(&["controldata", "-D", dir, "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        j["wal_start"], "0/00100330",
        "the shutdown checkpoint's redo point"
    );
    assert_eq!(j["first_wal_segment_file"], "000000010000000000000001");

    let o = walden(&["waldump", "-D", dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = lsns(&o);
    assert_eq!(got.len(), 12, "{got:#?}");
    assert_eq!(got[0], "0/00100000");
    assert!(stdout_lines(&o)[0].starts_with("kind: CHECKPOINT_REDO "));
    assert_eq!(got[11], "0/00100330");
    assert_eq!(
        stderr(&o),
        "walden waldump: end of WAL at 0/00100368: invalid record length at 0/100368: expected at least 24, got 0\n"
    );
    let o = walden(&["waldump", "-D", dir, "--stats"]);
    assert_eq!(
        stdout_lines(&o)[0],
        "WAL statistics between 0/00100000 and 0/00100368:"
    );

    // Records before wal_start that do not lead to it (one damaged) are
    // not trusted: the dump begins at wal_start.
    let seg = d.path().join("wal/000000010000000000000001");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[0xB8 + 40] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let o = walden(&["waldump", "-D", dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(lsns(&o), ["0/00100330"]);
}
