//! Streaming replication with real processes: one primary and two
//! standbys on 127.0.0.1, killed with -9 and restarted, and the commits
//! they acknowledged checked byte for byte.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{standby_settings, wait_until, Node};
use walden::client::{Client, ClientError};
use walden::{Durability, Kind, Lsn};

/// The names of the standbys the primary sees streaming.
fn streaming(primary: &Node) -> Vec<String> {
    let s = primary.status();
    let mut v: Vec<String> = s["replication"]["standbys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "streaming")
        .map(|r| r["application_name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn lsn(v: &serde_json::Value) -> Lsn {
    v.as_str().unwrap().parse().unwrap()
}

struct Cluster {
    _dir: tempfile::TempDir,
    primary: Node,
    s1: Node,
    s2: Node,
}

fn cluster(names: &str, extra: &[&str]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut p = vec![format!("synchronous_standby_names={names}")];
    p.extend(extra.iter().map(|s| s.to_string()));
    let primary = Node::start(&dir.path().join("p"), &p);
    let s1 = Node::start(&dir.path().join("s1"), &standby_settings(&primary, "s1"));
    let s2 = Node::start(&dir.path().join("s2"), &standby_settings(&primary, "s2"));
    wait_until("both standbys streaming", &[&primary, &s1, &s2], || {
        streaming(&primary) == ["s1", "s2"]
    });
    Cluster {
        _dir: dir,
        primary,
        s1,
        s2,
    }
}

fn append(c: &mut Client, level: Durability, payload: &[u8]) -> Result<Lsn, ClientError> {
    c.append_within(
        level,
        &[(Kind::DATA, payload)],
        Some(Duration::from_secs(20)),
    )
    .map(|a| a.lsns[0])
}

/// The seeds' scenario: ANY 1 (s1, s2). One standby down: `on` goes on.
/// Both down: `on` waits (and a client timeout ends INDETERMINATE, never
/// success) while `local` completes. One back: the waiter is released.
#[test]
fn any_one_of_two_standbys_survives_one_and_waits_for_both() {
    let mut cl = cluster("ANY 1 (s1, s2)", &[]);
    let mut c = cl.primary.client();
    for i in 0..50u32 {
        append(&mut c, Durability::On, format!("steady {i}").as_bytes()).unwrap();
    }
    cl.s1.kill9();
    for i in 0..20u32 {
        append(&mut c, Durability::On, format!("one down {i}").as_bytes()).unwrap();
    }
    cl.s2.kill9();
    // `local` does not wait for standbys.
    append(&mut c, Durability::Local, b"local while both are down").unwrap();
    // `on` with a client timeout: INDETERMINATE, written locally.
    let started = Instant::now();
    match c.append_within(
        Durability::On,
        &[(Kind::DATA, b"on while both are down")],
        Some(Duration::from_millis(500)),
    ) {
        Err(ClientError::Indeterminate { reached, end, .. }) => {
            assert_eq!(reached, Durability::Local);
            assert!(end.is_valid());
        }
        other => panic!("expected INDETERMINATE, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    let st = cl.primary.status();
    assert!(
        !st["replication"]["quorum_lost_since"].is_null(),
        "status says the quorum is lost: {}",
        st["replication"]
    );
    let waiting = |p: &Node| {
        p.status()["replication"]["commits_waiting"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(waiting(&cl.primary), 0, "the cancelled wait is not counted");
    // A client that goes away while it waits: its wait leaves the count at
    // once, not when the quorum comes back.
    {
        let mut gone = cl.primary.client();
        gone.queue_append(Durability::On, &[(Kind::DATA, b"nobody waits for this")]);
        gone.flush().unwrap();
        wait_until("one commit waiting", &[&cl.primary], || {
            waiting(&cl.primary) == 1
        });
    }
    wait_until(
        "the closed connection's wait forgotten",
        &[&cl.primary],
        || waiting(&cl.primary) == 0,
    );
    // A waiter without timeout, released when one standby comes back.
    let addr = cl.primary.addr.clone();
    let waiter = std::thread::spawn(move || {
        let mut c = Client::connect(&addr, None).unwrap();
        let t = Instant::now();
        let r = c.append(Durability::On, &[(Kind::DATA, b"released by s1's return")]);
        (r.map(|a| a.end), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !waiter.is_finished(),
        "an `on` commit with both standbys down must wait"
    );
    cl.s1.restart();
    let (r, waited) = waiter.join().unwrap();
    let end = r.expect("the waiter is acknowledged once s1 is back");
    assert!(waited >= Duration::from_millis(500));
    // s1 really has it: its flush position passed the commit.
    let flushed = lsn(&cl.s1.status()["replication"]["wal_receiver"]["flushed_lsn"]);
    assert!(
        flushed >= end,
        "s1 flushed {flushed}, commit ended at {end}"
    );
}

/// FIRST 1 (s1, s2): s1 is the sync standby; when it dies s2 takes over.
#[test]
fn first_one_moves_to_the_next_standby() {
    let mut cl = cluster("FIRST 1 (s1, s2)", &[]);
    let rows = || {
        let s = cl.primary.status();
        s["replication"]["standbys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["application_name"].as_str().unwrap().to_string(),
                    r["sync_state"].as_str().unwrap().to_string(),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let mut c = cl.primary.client();
    append(&mut c, Durability::On, b"first").unwrap();
    let r = rows();
    assert_eq!(r["s1"], "sync");
    assert_eq!(r["s2"], "potential");
    cl.s1.kill9();
    append(&mut c, Durability::On, b"s2 is sync now").unwrap();
    wait_until("s2 sync", &[&cl.primary], || {
        rows().get("s2").map(String::as_str) == Some("sync")
    });
}

/// The standbys' WAL is the primary's, byte for byte, and a read on a
/// standby right after a `remote_apply` page write sees it.
#[test]
fn standby_wal_is_byte_identical_and_remote_apply_is_readable() {
    let mut cl = cluster("ANY 2 (s1, s2)", &[]);
    let mut c = cl.primary.client();
    let mut s1 = cl.s1.client();
    let mut s2 = cl.s2.client();
    for i in 0..200u32 {
        let data = format!("page {i}").into_bytes();
        let (_, end) = c
            .page_write(
                Durability::RemoteApply,
                7,
                i % 13,
                (i % 50) as u16 * 8,
                &data,
            )
            .unwrap();
        for s in [&mut s1, &mut s2] {
            let (page_lsn, page) = s.page_read(7, i % 13).unwrap();
            // A page's LSN is the end of the record that last changed it.
            assert_eq!(
                page_lsn, end,
                "write {i}: the standby's page is not this write's"
            );
            let off = (i % 50) as usize * 8;
            assert_eq!(&page[off..off + data.len()], &data[..], "write {i}");
        }
        // Records big enough to cross segments.
        append(&mut c, Durability::On, &vec![i as u8; 20_000]).unwrap();
    }
    // Appends are refused on a standby.
    match append(&mut s1, Durability::Local, b"x") {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, walden::protocol::ErrorCode::READ_ONLY);
            assert!(message.contains("standby of 127.0.0.1:"), "{message}");
        }
        other => panic!("expected READ_ONLY, got {other:?}"),
    }
    let end = cl.primary.client().status().unwrap().2;
    for s in [&cl.s1, &cl.s2] {
        wait_until("the standby flushed everything", &[&cl.primary, s], || {
            lsn(&s.status()["replication"]["wal_receiver"]["flushed_lsn"]) >= end
        });
    }
    cl.primary.stop();
    cl.s1.stop();
    cl.s2.stop();
    compare_wal(&cl.primary.dir, &cl.s1.dir, end);
    compare_wal(&cl.primary.dir, &cl.s2.dir, end);
}

/// Every segment of `a` and `b` agree on the bytes below `end`.
fn compare_wal(a: &Path, b: &Path, end: Lsn) {
    let seg = 1u64 << 20;
    let mut segments = 0;
    for entry in std::fs::read_dir(a.join("wal")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let Some((_, segno)) = walden::lsn::parse_segment_file_name(&name, seg) else {
            continue;
        };
        let start = segno * seg;
        if start >= end.0 {
            continue;
        }
        let n = (end.0 - start).min(seg) as usize;
        let x = std::fs::read(a.join("wal").join(&name)).unwrap();
        let y = std::fs::read(b.join("wal").join(&name))
            .unwrap_or_else(|e| panic!("{name} on the standby: {e}"));
        assert!(x[..n] == y[..n], "segment {name} differs below {end}");
        segments += 1;
    }
    assert!(segments >= 3, "only {segments} segments compared");
}

/// kill -9 of the primary under `on` load: every acknowledged record is
/// on a standby (ANY 1), byte for byte; standbys killed and restarted
/// under load resume with no gap and no duplicate.
#[test]
fn acknowledged_commits_survive_the_primary_and_standby_restarts() {
    let mut cl = cluster("ANY 1 (s1, s2)", &[]);
    let addr = cl.primary.addr.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loaders = Vec::new();
    for t in 0..4u64 {
        let (addr, stop) = (addr.clone(), std::sync::Arc::clone(&stop));
        loaders.push(std::thread::spawn(move || {
            let mut acked: Vec<(Lsn, Vec<u8>)> = Vec::new();
            let Ok(mut c) = Client::connect(&addr, None) else {
                return acked;
            };
            for i in 0u64.. {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let payload = walden::testkit::payload(t << 32 | i, 100 + (i as usize * 37) % 3000);
                match c.append(Durability::On, &[(Kind::DATA, &payload)]) {
                    Ok(a) => acked.push((a.lsns[0], payload)),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    // Standbys die and come back under load.
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let s = if round % 2 == 0 {
            &mut cl.s1
        } else {
            &mut cl.s2
        };
        s.kill9();
        std::thread::sleep(Duration::from_millis(200));
        s.restart();
        let name = if round % 2 == 0 { "s1" } else { "s2" };
        wait_until("the restarted standby streams", &[&cl.primary, s], || {
            streaming(&cl.primary).iter().any(|n| n == name)
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    cl.primary.kill9();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acked: Vec<(Lsn, Vec<u8>)> = loaders
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        acked.len() > 100,
        "only {} records acknowledged",
        acked.len()
    );
    // Each standby's WAL, read back through the standby itself.
    let mut have: Vec<std::collections::HashMap<Lsn, Vec<u8>>> = Vec::new();
    for s in [&cl.s1, &cl.s2] {
        let mut c = s.client();
        let mut from = lsn(&s.status()["start_lsn"]);
        let mut map = std::collections::HashMap::new();
        loop {
            let (recs, next) = c.read(from, 1 << 20, 0).unwrap();
            if recs.is_empty() {
                break;
            }
            for r in recs {
                if r.kind == Kind::DATA {
                    map.insert(r.lsn, r.payload);
                }
            }
            from = next;
        }
        have.push(map);
    }
    for (l, payload) in &acked {
        let on = have.iter().filter(|m| m.get(l) == Some(payload)).count();
        assert!(on >= 1, "acknowledged record at {l} is on no standby");
    }
    // No gap, no duplicate: each standby's records were read back as one
    // chain (every record checked, each where the one before ended), and
    // no acknowledged payload appears twice on a standby.
    for m in &have {
        let mut seen = std::collections::HashSet::new();
        for p in m.values() {
            assert!(seen.insert(p), "a record appears twice on a standby");
        }
    }
}

fn indeterminate(
    r: Result<walden::client::Ack, ClientError>,
) -> (Durability, walden::protocol::IndeterminateReason) {
    match r {
        Err(ClientError::Indeterminate {
            reached, reason, ..
        }) => (reached, reason),
        other => panic!("expected INDETERMINATE, got {other:?}"),
    }
}

/// `synchronous_commit_timeout`: `indeterminate` answers INDETERMINATE
/// (never success); `degrade` acknowledges at `local` and counts it.
#[test]
fn synchronous_commit_timeout_answers_as_its_action_says() {
    use walden::protocol::IndeterminateReason;
    let dir = tempfile::tempdir().unwrap();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let p = Node::start(
        &dir.path().join("a"),
        &s(&[
            "synchronous_standby_names=ANY 1 (s1)",
            "synchronous_commit_timeout=300ms",
        ]),
    );
    let mut c = p.client();
    let t = Instant::now();
    let r = c.append(Durability::On, &[(Kind::DATA, b"no standby")]);
    let (reached, reason) = indeterminate(r);
    assert_eq!(
        (reached, reason),
        (Durability::Local, IndeterminateReason::QuorumTimeout)
    );
    assert!(t.elapsed() >= Duration::from_millis(300));
    // `local` is not affected.
    append(&mut c, Durability::Local, b"local").unwrap();
    let st = p.status();
    assert_eq!(st["replication"]["commits_indeterminate"], 1);
    assert!(!st["replication"]["quorum_lost_since"].is_null());

    let q = Node::start(
        &dir.path().join("b"),
        &s(&[
            "synchronous_standby_names=ANY 1 (s1)",
            "synchronous_commit_timeout=300ms",
            "synchronous_commit_timeout_action=degrade",
        ]),
    );
    let mut c = q.client();
    let t = Instant::now();
    c.append(Durability::RemoteApply, &[(Kind::DATA, b"degraded")])
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(q.status()["replication"]["commits_degraded"], 1);
    assert!(
        q.log()
            .contains("synchronous_commit_timeout_action = degrade"),
        "{}",
        q.log()
    );
}

/// Waits for standbys end INDETERMINATE when the setting is emptied by a
/// reload (PostgreSQL releases them as success) and when the server
/// shuts down; never Ack.
#[test]
fn emptied_setting_and_shutdown_end_waits_indeterminate() {
    use walden::protocol::IndeterminateReason;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("walden.toml");
    std::fs::write(&conf, "synchronous_standby_names = 'ANY 1 (s1)'\n").unwrap();
    std::fs::create_dir_all(dir.path().join("p")).unwrap();
    let mut p = Node {
        dir: dir.path().join("p"),
        child: None,
        addr: String::new(),
        settings: Vec::new(),
        config: Some(conf),
        env: Vec::new(),
    };
    p.restart();
    let waiter = |addr: String| {
        std::thread::spawn(move || {
            let mut c = Client::connect(&addr, None).unwrap();
            c.append(Durability::On, &[(Kind::DATA, b"waits")])
        })
    };
    let w = waiter(p.addr.clone());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!w.is_finished(), "no standby: an `on` commit waits");
    assert_eq!(p.status()["replication"]["commits_waiting"], 1);
    p.reload("synchronous_standby_names = ''\n");
    let (reached, reason) = indeterminate(w.join().unwrap());
    assert_eq!(
        (reached, reason),
        (Durability::Local, IndeterminateReason::ConfigurationChanged)
    );
    // With no standbys configured, `on` acts as `local`.
    append(&mut p.client(), Durability::On, b"as local").unwrap();

    p.reload("synchronous_standby_names = 'ANY 1 (s1)'\n");
    let t = Instant::now();
    while p.status()["settings"]["synchronous_standby_names"] != "ANY 1 (s1)" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "reload not applied:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let w = waiter(p.addr.clone());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!w.is_finished());
    p.stop();
    let (reached, reason) = indeterminate(w.join().unwrap());
    assert_eq!(
        (reached, reason),
        (Durability::Local, IndeterminateReason::ShuttingDown)
    );
}

/// A standby refuses writes and cascading; a standby of another system
/// is refused by the primary before anything is written.
#[test]
fn a_standby_of_another_system_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), &[] as &[&str]);
    let b = Node::start(&dir.path().join("b"), &[] as &[&str]);
    // b's directory holds another system: as a standby of a it must not stream.
    let mut b = b;
    b.stop();
    b.settings = standby_settings(&a, "s1");
    b.restart();
    wait_until("the mismatch in the standby's status", &[&a, &b], || {
        b.status()["replication"]["wal_receiver"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("system identifier differs"))
    });
    assert!(streaming(&a).is_empty());
}

/// A standby takes restartpoints at the checkpoints it replays: its
/// control file's redo point moves, it releases the WAL before it, and a
/// kill -9 restart redoes from there (not from the start of its WAL), with
/// its pages still the primary's.
#[test]
fn a_standby_takes_restartpoints_and_restarts_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let small = [
        "max_wal_size=4MB",
        "min_wal_size=2MB",
        "wal_keep_size=0",
        "checkpoint_timeout=1s",
    ];
    let mut p_settings: Vec<String> = small.iter().map(|s| s.to_string()).collect();
    p_settings.push("synchronous_standby_names=ANY 1 (s1)".into());
    let primary = Node::start(&dir.path().join("p"), &p_settings);
    let mut s_settings = standby_settings(&primary, "s1");
    s_settings.extend(small.iter().map(|s| s.to_string()));
    let mut s1 = Node::start(&dir.path().join("s1"), &s_settings);
    wait_until("s1 streaming", &[&primary, &s1], || {
        streaming(&primary) == ["s1"]
    });
    let mut c = primary.client();
    for i in 0..3000u32 {
        c.page_write(
            Durability::On,
            3,
            i % 97,
            ((i % 100) * 64) as u16,
            &[i as u8; 60],
        )
        .unwrap();
    }
    // Restartpoints release the standby's first segments.
    wait_until("a restartpoint on the standby", &[&primary, &s1], || {
        s1.log().contains("restartpoint complete") && lsn(&s1.status()["start_lsn"]) > Lsn(1 << 20)
    });
    let redo = lsn(&s1.status()["page_store"]["redo_lsn"]);
    assert!(
        redo > Lsn(1 << 20),
        "the standby's redo point stayed at {redo}"
    );
    // Everything replayed, then kill -9 and restart: redo starts at the
    // restartpoint's redo point (or later), not at the beginning.
    let end = primary.client().status().unwrap().2;
    wait_until("s1 replayed everything", &[&primary, &s1], || {
        lsn(&s1.status()["replication"]["wal_receiver"]["replayed_lsn"]) >= end
    });
    s1.kill9();
    s1.restart();
    let log = s1.log();
    let starts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("redo starts at"))
        .collect();
    let last_start: Lsn = starts
        .last()
        .expect("the restart redid")
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        last_start >= redo,
        "redo started at {last_start}, before the restartpoint's {redo}"
    );
    // Crash redo replayed the standby's WAL before it listened again.
    let (mut sc, mut pc) = (s1.client(), primary.client());
    for block in 0..97 {
        assert_eq!(
            sc.page_read(3, block).unwrap(),
            pc.page_read(3, block).unwrap(),
            "block {block}"
        );
    }
}

/// The whole path for a primary whose first WAL is gone: a slot, a base
/// backup with -R, and the copy started as a standby that streams through
/// the slot, counts for the quorum and replays to the primary's pages. An
/// empty-directory standby is refused on that primary (its WAL is gone).
#[test]
fn a_base_backup_with_a_slot_becomes_a_synchronous_standby() {
    let dir = tempfile::tempdir().unwrap();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let primary = Node::start(
        &dir.path().join("p"),
        &s(&[
            "synchronous_standby_names=ANY 1 (s1)",
            "wal_keep_size=0",
            "max_wal_size=4MB",
            "min_wal_size=2MB",
        ]),
    );
    // Pages and enough WAL that checkpoints release the first segments.
    let mut c = primary.client();
    for i in 0..1500u32 {
        c.page_write(
            Durability::Local,
            5,
            i % 61,
            ((i % 90) * 80) as u16,
            &[i as u8; 70],
        )
        .unwrap();
    }
    c.checkpoint().unwrap();
    c.checkpoint().unwrap();
    assert!(
        lsn(&primary.status()["start_lsn"]) > Lsn(1 << 20),
        "the first WAL is still there"
    );
    // An empty standby cannot start from the beginning any more.
    let mut empty = Node::start(&dir.path().join("empty"), &standby_settings(&primary, "e1"));
    wait_until("the empty standby's refusal", &[&primary, &empty], || {
        empty.status()["replication"]["wal_receiver"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("has already been removed"))
    });
    empty.kill9();
    let walden = env!("CARGO_BIN_EXE_walden");
    let out = Command::new(walden)
        .args(["slot", "create", "s1", "-h", &primary.addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copy = dir.path().join("s1");
    let out = Command::new(walden)
        .args([
            "basebackup",
            "-h",
            &primary.addr,
            "-R",
            "--slot",
            "s1",
            "--application-name",
            "s1",
            "-D",
        ])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "basebackup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // More writes while the copy is not running: the slot keeps their WAL.
    for i in 0..300u32 {
        c.page_write(Durability::Local, 5, i % 61, 7000, &[0xAB; 60])
            .unwrap();
    }
    c.checkpoint().unwrap();
    // `walden serve -D copy` reads copy/walden.auto.toml: a standby.
    let s1 = Node::start(&copy, &[] as &[&str]);
    wait_until("s1 streaming", &[&primary, &s1], || {
        streaming(&primary) == ["s1"]
    });
    let (_, end) = c
        .page_write(Durability::RemoteApply, 5, 3, 100, b"after the backup")
        .unwrap();
    let mut sc = s1.client();
    let (page_lsn, page) = sc.page_read(5, 3).unwrap();
    assert_eq!(page_lsn, end);
    assert_eq!(&page[100..116], b"after the backup");
    for block in 0..61 {
        assert_eq!(
            sc.page_read(5, block).unwrap(),
            c.page_read(5, block).unwrap(),
            "block {block}"
        );
    }
    let slots = primary.status()["slots"].clone();
    assert_eq!(slots[0]["slot_name"], "s1", "{slots}");
    assert_eq!(slots[0]["active"], true, "{slots}");
}

/// The check, with the tools an operator has: `walden bench
/// --ack-log` at `on` against a primary with `ANY 2 (s1, s2)`, kill -9 of
/// the primary mid-run, then `walden verify` against each standby's
/// directory: every acknowledged record is on both (k = 2), byte for byte.
#[test]
fn bench_ack_log_verifies_on_every_standby_after_the_primary_dies() {
    let mut cl = cluster("ANY 2 (s1, s2)", &[]);
    let walden = env!("CARGO_BIN_EXE_walden");
    let dir = cl.primary.dir.parent().unwrap().to_path_buf();
    let ack_log = dir.join("acks.log");
    let mut bench = Command::new(walden)
        .args([
            "bench",
            "-h",
            &cl.primary.addr,
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            "30",
        ])
        .args(["--level", "on", "--size", "300", "--ack-log"])
        .arg(&ack_log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let it acknowledge a good number, then kill the primary under load.
    wait_until("acknowledgements in the ack log", &[&cl.primary], || {
        std::fs::read_to_string(&ack_log).map_or(0, |t| t.lines().count()) > 2000
    });
    cl.primary.kill9();
    let t = Instant::now();
    while bench.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "bench did not end after the primary died"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let acked = std::fs::read_to_string(&ack_log).unwrap().lines().count();
    assert!(acked > 2000, "{acked} acknowledged");
    for s in [&mut cl.s1, &mut cl.s2] {
        s.stop();
        let out = Command::new(walden)
            .args(["verify", "--ack-log"])
            .arg(&ack_log)
            .arg("-D")
            .arg(&s.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "walden verify on {} ({acked} acknowledged): {}{}",
            s.dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `remote_write` waits for the standby's write, not its sync: with the
/// standby on `wal_sync_method = fdatasync` and a test injection that holds
/// each of its syncs for 1.5 s, a `remote_write` commit returns while the
/// sync is still running; an `on` commit waits for it, and meanwhile the
/// primary shows the standby's write LSN ahead of its flush LSN.
#[test]
fn remote_write_waits_for_the_standbys_write_not_its_sync() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Node::start(
        &dir.path().join("p"),
        &["synchronous_standby_names=ANY 1 (s1)"],
    );
    let mut settings = standby_settings(&primary, "s1");
    settings.push("wal_sync_method=fdatasync".into());
    settings.push("wal_sync_at_depth_1=on".into());
    let s1 = Node::start_with_env(
        &dir.path().join("s1"),
        &settings,
        &[("WALDEN_TEST_SYNC_DELAY_MS", "1500")],
    );
    let row = |p: &Node| p.status()["replication"]["standbys"][0].clone();
    wait_until("s1 streaming and caught up", &[&primary, &s1], || {
        let r = row(&primary);
        r["state"] == "streaming"
            && !r["flush_lsn"].is_null()
            && lsn(&r["flush_lsn"]) >= lsn(&primary.status()["flush_lsn"])
    });
    let mut c = primary.client();
    let t = Instant::now();
    let at = append(&mut c, Durability::RemoteWrite, b"written, not yet synced").unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "remote_write took {took:?}: it waited for the standby's sync"
    );
    // The standby has written it and is still syncing.
    let r = row(&primary);
    assert!(
        lsn(&r["write_lsn"]) > at,
        "write_lsn {} ≤ {at}",
        r["write_lsn"]
    );
    assert!(
        lsn(&r["flush_lsn"]) <= at,
        "the standby's flush {} passed {at} within {took:?}: the injection did not hold the sync",
        r["flush_lsn"]
    );
    // Once that sync is done, an `on` commit waits for a whole new one.
    wait_until("the standby's flush", &[&primary, &s1], || {
        lsn(&row(&primary)["flush_lsn"]) > at
    });
    let t = Instant::now();
    append(&mut c, Durability::On, b"synced").unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "`on` returned after {took:?}, before the standby's 1.5 s sync"
    );
}

/// A cleanly stopped primary streams everything to its standbys before it
/// closes its WAL, its shutdown checkpoint included (PostgreSQL's
/// WalSndDone): each standby's WAL ends where the primary's does, byte
/// for byte, so a planned switchover loses nothing.
#[test]
fn a_clean_stop_sends_the_shutdown_checkpoint_to_the_standbys() {
    let mut cl = cluster("ANY 1 (s1, s2)", &[]);
    let mut c = cl.primary.client();
    for i in 0..1000u32 {
        append(&mut c, Durability::On, &vec![i as u8; 3500]).unwrap();
    }
    drop(c);
    cl.primary.stop();
    let log = cl.primary.log();
    let end: Lsn = log
        .lines()
        .rev()
        .find_map(|l| l.split("WAL shut down at ").nth(1))
        .unwrap_or_else(|| panic!("no \"WAL shut down at\" in the primary's log:\n{log}"))
        .trim()
        .parse()
        .unwrap();
    for s in [&cl.s1, &cl.s2] {
        wait_until(
            "the standby flushed the primary's last record",
            &[s],
            || lsn(&s.status()["replication"]["wal_receiver"]["flushed_lsn"]) >= end,
        );
        let flushed = lsn(&s.status()["replication"]["wal_receiver"]["flushed_lsn"]);
        assert_eq!(flushed, end, "the standby has WAL the primary does not");
    }
    cl.s1.stop();
    cl.s2.stop();
    compare_wal(&cl.primary.dir, &cl.s1.dir, end);
    compare_wal(&cl.primary.dir, &cl.s2.dir, end);
    // The last record the standbys have is the primary's shutdown checkpoint.
    let out = Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(["waldump", "-D"])
        .arg(&cl.s1.dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rfind(|l| l.contains("lsn:") || l.contains("kind"))
        .unwrap_or_else(|| {
            panic!(
                "no records in waldump's output:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        last.contains("CHECKPOINT_SHUTDOWN"),
        "the standby's last record is not the shutdown checkpoint: {last}"
    );
}
