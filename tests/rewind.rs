//! `walden rewind` with real processes: an old primary whose WAL diverged
//! after its standby was promoted is rewound from the new primary and
//! follows it as a standby, with the new primary's pages and WAL; the
//! refusals (a running target, an unclean one, the same timeline, another
//! system) change nothing.

use std::path::Path;
use std::process::Output;

mod common;
use common::{assert_unchanged, run_bounded, snapshot, standby_settings, wait_until, Node};
use walden::lsn::Lsn;
use walden::wal::reader::WalReader;
use walden::wal::timeline::{self, TimelineMap};
use walden::Durability;

const SEG: u64 = 1 << 20;
const BLOCKS: u32 = 12;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn flush_lsn(n: &Node) -> Lsn {
    n.status()["flush_lsn"].as_str().unwrap().parse().unwrap()
}

fn timeline_of(n: &Node) -> u64 {
    n.status()["timeline"].as_u64().unwrap()
}

fn write(n: &Node, rel: u32, block: u32, off: u16, bytes: &[u8]) {
    n.client()
        .page_write(Durability::Local, rel, block, off, bytes)
        .unwrap();
}

/// Every page of relations 1..=3, blocks 0..BLOCKS: (LSN, bytes).
fn pages(n: &Node) -> Vec<(Lsn, Vec<u8>)> {
    let mut c = n.client();
    let mut out = Vec::new();
    for rel in 1..=3 {
        for b in 0..BLOCKS {
            out.push(c.page_read(rel, b).unwrap());
        }
    }
    out
}

fn rewind(target: &Path, source: &Node, extra: &[&str]) -> Output {
    let mut args = vec![
        "rewind",
        "-D",
        target.to_str().unwrap(),
        "--source-server",
        &source.addr,
    ];
    args.extend_from_slice(extra);
    run_bounded(&args)
}

fn promote(n: &Node) {
    let o = run_bounded(&["promote", "-D", n.dir.to_str().unwrap(), "-t", "25"]);
    assert!(o.status.success(), "promote: {}\n{}", text(&o), n.log());
    assert_eq!(timeline_of(n), 2);
}

/// The WAL bytes [from, to) of a stopped server, segment by segment as its
/// newest timeline sees them.
fn wal_bytes(dir: &Path, from: Lsn, to: Lsn) -> Vec<u8> {
    let wal = dir.join("wal");
    let tli = timeline::latest_timeline(&wal).unwrap();
    let map = TimelineMap::load(&wal, tli, SEG).unwrap();
    let mut out = Vec::new();
    let mut at = from.0;
    while at < to.0 {
        let segno = at / SEG;
        let bytes = std::fs::read(wal.join(map.file_name(segno, SEG))).unwrap();
        let upto = to.0.min((segno + 1) * SEG);
        out.extend_from_slice(&bytes[(at % SEG) as usize..(upto - segno * SEG) as usize]);
        at = upto;
    }
    out
}

fn wal_start(dir: &Path) -> Lsn {
    walden::wal::segments::read_wal_start(&dir.join("wal"))
        .unwrap()
        .unwrap()
}

/// Payloads of every record of a stopped server's WAL from `from`.
fn payloads_from(dir: &Path, from: Lsn) -> Vec<Vec<u8>> {
    let wal = dir.join("wal");
    let tli = timeline::latest_timeline(&wal).unwrap();
    let mut r = WalReader::new(&wal, SEG, tli, from, None);
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        out.push(rec.payload.to_vec());
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The rewound server `p2` reaches the source's pages, and none keeps what
/// the old primary wrote after the divergence.
fn assert_has_the_sources_pages(p2: &Node, s: &Node) {
    wait_until("the rewound server's pages", &[s, p2], || {
        pages(p2) == pages(s)
    });
    assert!(pages(p2).iter().all(|(_, d)| !contains(d, b"P-ONLY")));
}

/// P with standby S, load; S's stream stops (kill -9); P writes pages that
/// diverge and stops cleanly; S is promoted (timeline 2) and writes to
/// some of the same pages and to others; P is rewound from S and started
/// as S's standby: its pages equal S's, its WAL up to S's end equals S's
/// byte for byte, and what P wrote after the divergence is gone.
#[test]
fn a_diverged_old_primary_is_rewound_and_follows_the_promoted_standby() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let mut s = Node::start(&dir.path().join("s"), &standby_settings(&p, "s"));
    for rel in 1..=2 {
        for b in 0..BLOCKS {
            write(&p, rel, b, 0, format!("common {rel}/{b}").as_bytes());
        }
    }
    let target = flush_lsn(&p);
    wait_until("the standby's WAL", &[&p, &s], || flush_lsn(&s) >= target);
    s.kill9();

    // P goes on alone: these records diverge.
    for b in 0..6 {
        write(&p, 1, b, 100, b"P-ONLY-diverged");
    }
    write(&p, 3, 0, 0, b"P-ONLY-new-relation");
    let mut c = p.client();
    c.append(Durability::Local, &[(walden::Kind::DATA, b"P-ONLY-record")])
        .unwrap();
    drop(c);
    p.stop();

    // S is promoted, and writes to some of P's pages and to others.
    s.restart();
    promote(&s);
    for b in 3..9 {
        write(&s, 1, b, 200, b"S-after-promotion");
    }
    write(&s, 2, 1, 0, b"S-only");

    let o = rewind(&p.dir, &s, &["-P", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("nothing was changed"), "{}", text(&o));
    // A control file that says a quorum acknowledged WAL past the
    // divergence point: the rewind refuses to discard it, changing nothing.
    let data = p.dir.join("data");
    let saved = walden::store::control::read(&data).unwrap().unwrap();
    let mut lying = saved;
    lying.acknowledged_lsn = Lsn(target.0 + 4096);
    walden::store::control::write(&data, &lying, true).unwrap();
    let before = common::snapshot(&p.dir);
    let o = rewind(&p.dir, &s, &[]);
    assert!(
        !o.status.success(),
        "rewound past the quorum floor: {}",
        text(&o)
    );
    assert!(
        text(&o).contains(&format!(
            "would discard WAL at or below {} that was acknowledged by a quorum; refusing",
            lying.acknowledged_lsn
        )),
        "{}",
        text(&o)
    );
    assert!(
        common::snapshot(&p.dir) == before,
        "a refused rewind changed the target"
    );
    walden::store::control::write(&data, &saved, true).unwrap();
    let o = rewind(&p.dir, &s, &["-P"]);
    let out = text(&o);
    assert!(o.status.success(), "rewind: {out}");
    for line in [
        "servers diverged at WAL location",
        "on timeline 1",
        "rewinding from last common checkpoint at",
        "Done!",
    ] {
        assert!(out.contains(line), "no {line:?} in\n{out}");
    }
    assert!(!p.dir.join("data/rewind_in_progress").exists());

    // P starts as S's standby and catches up; more on S follows.
    let mut p2 = Node::start(&p.dir, &standby_settings(&s, "p"));
    write(&s, 2, 2, 0, b"S-later");
    assert_eq!(timeline_of(&p2), 2);
    wait_until("the rewound server's pages", &[&s, &p2], || {
        pages(&p2) == pages(&s)
    });
    let got = pages(&p2);
    assert!(
        got.iter().all(|(_, d)| !contains(d, b"P-ONLY")),
        "a page kept what P wrote after the divergence"
    );
    assert!(got.iter().any(|(_, d)| contains(d, b"S-after-promotion")));
    let end = flush_lsn(&s);
    wait_until("the rewound server's WAL", &[&s, &p2], || {
        flush_lsn(&p2) >= end
    });
    p2.stop();
    s.stop();

    let from = wal_start(&p.dir).max(wal_start(&s.dir));
    assert!(
        wal_bytes(&p.dir, from, end) == wal_bytes(&s.dir, from, end),
        "the WAL of the rewound server differs from the source's in [{from}, {end})"
    );
    assert!(
        payloads_from(&p.dir, from)
            .iter()
            .all(|pl| !contains(pl, b"P-ONLY")),
        "a record P wrote after the divergence is still in its WAL"
    );
    assert!(p2.log().contains("entering standby mode"), "{}", p2.log());
}

/// The refusals change nothing; `--recover-first` rewinds an unclean target.
#[test]
fn refusals_change_nothing_and_recover_first_rewinds_an_unclean_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let mut s = Node::start(&dir.path().join("s"), &standby_settings(&p, "s"));
    for b in 0..BLOCKS {
        write(&p, 1, b, 0, b"common");
    }
    let target = flush_lsn(&p);
    wait_until("the standby's WAL", &[&p, &s], || flush_lsn(&s) >= target);
    let files = |d: &Path| {
        let mut m = snapshot(&d.join("data"));
        m.extend(snapshot(&d.join("wal")));
        m
    };

    // A running target.
    let o = rewind(&s.dir, &p, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("target server must be shut down: lock file"),
        "{}",
        text(&o)
    );

    // The same timeline.
    s.stop();
    let before = files(&s.dir);
    let o = rewind(&s.dir, &p, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("source and target are on the same timeline (1); no rewind required"),
        "{}",
        text(&o)
    );
    assert_unchanged(
        &before,
        &files(&s.dir),
        "the target after a same-timeline rewind",
    );

    // Another system.
    let q = Node::start(&dir.path().join("q"), &[] as &[&str]);
    let o = rewind(&s.dir, &q, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("source and target clusters are from different systems"),
        "{}",
        text(&o)
    );
    assert_unchanged(
        &before,
        &files(&s.dir),
        "the target after another system's refusal",
    );
    drop(q);

    // P diverges and dies; S is promoted.
    for b in 0..4 {
        write(&p, 1, b, 50, b"P-ONLY");
    }
    p.kill9();
    s.restart();
    promote(&s);
    write(&s, 1, 2, 60, b"S-new");

    let before = files(&p.dir);
    let o = rewind(&p.dir, &s, &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(
            "target server must be shut down cleanly (its control file says: in production); \
             start and stop it once, or run `walden rewind --recover-first ...`"
        ),
        "{}",
        text(&o)
    );
    assert_unchanged(
        &before,
        &files(&p.dir),
        "the unclean target after the refusal",
    );

    let o = rewind(&p.dir, &s, &["--recover-first", "-R"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Done!"), "{}", text(&o));
    // A rewind cut short (its marker left) refuses to start.
    let marker = p.dir.join("data/rewind_in_progress");
    std::fs::write(&marker, b"").unwrap();
    let o = common::serve_refused(&p.dir);
    assert!(
        text(&o).contains("a rewind of this directory did not finish"),
        "{}",
        text(&o)
    );
    std::fs::remove_file(&marker).unwrap();
    // -R: the directory starts as the source's standby by itself.
    let p2 = Node::start(&p.dir, &[] as &[&str]);
    assert_has_the_sources_pages(&p2, &s);
}

/// A rewind that crashes after it cut the target's WAL and stored the
/// source's history (the WAL is then on the source's timeline): the
/// directory refuses to start, and `walden rewind` run again resumes from
/// the plan in its marker rather than finding "the same timeline".
#[test]
fn a_rewind_cut_short_refuses_to_start_and_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let mut s = Node::start(&dir.path().join("s"), &standby_settings(&p, "s"));
    for b in 0..BLOCKS {
        write(&p, 1, b, 0, b"common");
    }
    let target = flush_lsn(&p);
    wait_until("the standby's WAL", &[&p, &s], || flush_lsn(&s) >= target);
    s.kill9();
    for b in 0..5 {
        write(&p, 1, b, 10, b"P-ONLY");
    }
    p.stop();
    s.restart();
    promote(&s);
    write(&s, 1, 3, 20, b"S-new");

    let o = std::process::Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["rewind", "-D", p.dir.to_str().unwrap(), "--source-server"])
        .arg(&s.addr)
        .env("WALDEN_FAILPOINT", "rewind-after-wal-cut")
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("failpoint rewind-after-wal-cut: aborting"),
        "{}",
        text(&o)
    );
    assert!(p.dir.join("data/rewind_in_progress").exists());
    let o = common::serve_refused(&p.dir);
    assert!(
        text(&o).contains("a rewind of this directory did not finish"),
        "{}",
        text(&o)
    );

    let o = rewind(&p.dir, &s, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("resuming an interrupted rewind: servers diverged at WAL location"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("Done!"), "{}", text(&o));
    let p2 = Node::start(&p.dir, &standby_settings(&s, "p"));
    assert_has_the_sources_pages(&p2, &s);
}

/// A source that no longer holds its WAL from the divergence point (it
/// released it: `wal_keep_size = 0`, checkpoints after more WAL): the
/// rewind is refused before it changes anything, and says to take a new
/// base backup.
#[test]
fn a_source_without_the_wal_from_the_divergence_point_is_refused_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Node::start(&dir.path().join("p"), &[] as &[&str]);
    let mut s = Node::start(&dir.path().join("s"), &{
        let mut v = standby_settings(&p, "s");
        v.push("wal_keep_size=0".into());
        v
    });
    write(&p, 1, 0, 0, b"common");
    let target = flush_lsn(&p);
    wait_until("the standby's WAL", &[&p, &s], || flush_lsn(&s) >= target);
    s.kill9();
    write(&p, 1, 0, 0, b"P-ONLY-diverged");
    p.stop();
    s.restart();
    promote(&s);
    // Several segments of new WAL on S, then checkpoints: the WAL of the
    // divergence point's segment is released.
    let mut c = s.client();
    let payload = vec![0x42u8; 8000];
    for _ in 0..500 {
        c.append(Durability::Local, &[(walden::Kind::DATA, &payload[..])])
            .unwrap();
    }
    c.checkpoint().unwrap();
    c.checkpoint().unwrap();
    drop(c);
    let before = snapshot(&p.dir);
    let o = rewind(&p.dir, &s, &[]);
    let out = text(&o);
    assert!(
        !o.status.success(),
        "rewound without the source's WAL: {out}"
    );
    assert!(
        out.contains("the source has no WAL from the divergence point")
            && out.contains("take a new base backup instead"),
        "{out}"
    );
    assert_unchanged(&before, &snapshot(&p.dir), "a refused rewind");
}
