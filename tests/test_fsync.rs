//! `walden test-fsync` as an operator runs it: the whole binary, on a real
//! directory. The figures depend on the machine, so these tests check the
//! report's shape (sections, lines, recommendation), never the numbers.

use std::path::Path;
use std::process::{Command, Output};

const WALDEN: &str = env!("CARGO_BIN_EXE_walden");

/// pg_test_fsync's sections, in its order.
const PG_SECTIONS: [&str; 5] = [
    "Compare file sync methods using one 8kB write:",
    "Compare file sync methods using two 8kB writes:",
    "Compare open_sync with different write sizes:",
    "Test if fsync on non-write file descriptor is honored:",
    "Non-sync'ed 8kB writes:",
];
const PLAIN_SECTION: &str = "Compare sync methods with plain writes, one 8kB write, O_DIRECT:";
const URING_SECTIONS: [&str; 4] = [
    "Compare sync methods through io_uring, one 8kB write, O_DIRECT:",
    "Compare sync methods through io_uring, a batch of 8 8kB writes, O_DIRECT:",
    "Compare sync methods through io_uring, one 8kB write, without O_DIRECT:",
    "Compare sync methods through io_uring, a batch of 8 8kB writes, without O_DIRECT:",
];
const METHODS: [&str; 4] = ["open_datasync", "fdatasync", "fsync", "open_sync"];

fn test_fsync(args: &[&str]) -> Output {
    Command::new(WALDEN)
        .arg("test-fsync")
        .args(args)
        .output()
        .expect("run walden test-fsync")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// A directory on the disk the build is on (not /tmp, which may be tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// The result lines of `section`: from its title to the next blank line.
fn section_lines<'a>(stdout: &'a str, section: &str) -> Vec<&'a str> {
    let start = stdout
        .find(&format!("\n{section}\n"))
        .unwrap_or_else(|| panic!("section {section:?} missing from:\n{stdout}"));
    stdout[start + 1..]
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("        "))
        .collect()
}

/// The line of `section` whose label is `label`.
fn line<'a>(stdout: &'a str, section: &str, label: &str) -> &'a str {
    section_lines(stdout, section)
        .into_iter()
        .find(|l| l.get(8..38).map(str::trim) == Some(label.trim()))
        .unwrap_or_else(|| panic!("no line {label:?} in section {section:?}:\n{stdout}"))
}

/// A measured line: pg_test_fsync's two columns, then walden's p50 and p99.
fn assert_measured(l: &str) {
    for part in [" ops/sec  ", " usecs/op", "  p50 ", " us  p99 "] {
        assert!(l.contains(part), "line without {part:?}: {l:?}");
    }
    assert!(l.ends_with(" us"), "line not ending in a latency: {l:?}");
}

/// Measured, or `n/a*` where O_DIRECT refused the write (small writes on a
/// device with 4 kB logical blocks).
fn assert_measured_or_direct_na(l: &str) {
    if !l.trim_end().ends_with("n/a*") {
        assert_measured(l);
    }
}

fn assert_dir_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "test file left behind: {left:?}");
}

/// The acceptance test of the issue: `-s 1` on a temporary directory prints
/// every section and a recommendation.
#[test]
fn one_second_per_test_prints_every_section_and_a_recommendation() {
    let dir = disk_dir();
    let file = dir.path().join("file");
    let out = test_fsync(&["-s", "1", "-f", file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );

    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("1 second per test"));
    let direct = lines.next().unwrap();
    assert!(
        direct == "O_DIRECT supported on this platform for open_datasync and open_sync."
            || direct.starts_with("O_DIRECT is not supported on "),
        "second header line: {direct:?}"
    );

    // pg_test_fsync's sections, in order, then walden's.
    let mut at = 0;
    for section in PG_SECTIONS
        .iter()
        .chain([&PLAIN_SECTION])
        .chain(URING_SECTIONS.iter())
    {
        let pos = stdout[at..]
            .find(section)
            .unwrap_or_else(|| panic!("section {section:?} missing or out of order:\n{stdout}"));
        at += pos + section.len();
    }

    for section in &PG_SECTIONS[..2] {
        for m in METHODS {
            let l = line(&stdout, section, m);
            if m.starts_with("open_") {
                assert_measured_or_direct_na(l);
            } else {
                assert_measured(l);
            }
        }
        let l = line(&stdout, section, "fsync_writethrough");
        assert!(l.trim_end().ends_with("n/a"), "{l:?}");
        assert_eq!(section_lines(&stdout, section).len(), 5);
    }
    for label in [
        " 1 * 16kB open_sync write",
        " 2 *  8kB open_sync writes",
        " 4 *  4kB open_sync writes",
        " 8 *  2kB open_sync writes",
        "16 *  1kB open_sync writes",
    ] {
        assert_measured_or_direct_na(line(&stdout, PG_SECTIONS[2], label));
    }
    assert_measured(line(&stdout, PG_SECTIONS[3], "write, fsync, close"));
    assert_measured(line(&stdout, PG_SECTIONS[3], "write, close, fsync"));
    assert_measured(line(&stdout, PG_SECTIONS[4], "write"));
    for m in METHODS {
        assert_measured_or_direct_na(line(&stdout, PLAIN_SECTION, m));
    }
    for (i, section) in URING_SECTIONS.iter().enumerate() {
        for m in METHODS {
            let l = line(&stdout, section, m);
            if i < 2 {
                assert_measured_or_direct_na(l);
            } else {
                assert_measured(l);
            }
        }
    }

    let rec = stdout
        .lines()
        .find(|l| l.starts_with("Recommendation: "))
        .unwrap_or_else(|| panic!("no recommendation:\n{stdout}"));
    assert!(
        rec.starts_with("Recommendation: wal_sync_method = "),
        "{rec:?}"
    );
    assert!(
        METHODS
            .iter()
            .any(|m| rec.contains(&format!("= {m} (p50 "))),
        "{rec:?}"
    );
    assert!(rec.contains("x faster than "), "{rec:?}");
    assert!(
        stdout.contains("\n  one write at a time: wal_sync_at_depth_1 = "),
        "no depth-1 recommendation:\n{stdout}"
    );
    assert!(
        stdout.contains("\n  in batches of 8 writes: wal_sync_method = "),
        "no batch recommendation:\n{stdout}"
    );
    assert_dir_empty(dir.path());
}

/// tmpfs has no device behind it: the report must say so, whether the kernel
/// refuses O_DIRECT there (before Linux 6.6) or accepts it as a no-op.
#[test]
fn on_tmpfs_the_report_says_what_o_direct_means_there() {
    // Linux (and CI) always has it; without it this test would check nothing.
    assert!(
        Path::new("/dev/shm").is_dir(),
        "no /dev/shm: this test needs the tmpfs mounted there"
    );
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let file = dir.path().join("file");
    let out = test_fsync(&["-s", "0.05", "-f", file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    let refused = stdout.contains("O_DIRECT is not supported on ")
        && stdout.contains(", testing without it.");
    let no_device = stdout.contains("is tmpfs: there is no device behind it");
    assert!(
        refused || no_device,
        "nothing said about O_DIRECT on tmpfs:\n{stdout}"
    );
    if refused {
        // The O_DIRECT io_uring lines cannot run; the others still do.
        assert!(line(&stdout, URING_SECTIONS[0], "fdatasync")
            .trim_end()
            .ends_with("n/a*"));
    }
    assert_measured(line(&stdout, URING_SECTIONS[2], "fdatasync"));
    assert!(
        stdout.contains("\nRecommendation: wal_sync_method = "),
        "{stdout}"
    );
    assert!(
        stdout.contains("(measured in memory: this says nothing about a disk)"),
        "{stdout}"
    );
    assert_dir_empty(dir.path());
}

/// A filesystem that refuses O_DIRECT (e.g. a ramfs mount): tmpfs accepts
/// O_DIRECT on recent kernels, so the test needs a directory on such a
/// filesystem named by WALDEN_TEST_NO_DIRECT_DIR. Ignored unless asked for,
/// so that a run without one says "ignored" rather than "ok"; .ci/run mounts
/// a ramfs and runs it.
#[test]
#[ignore = "needs WALDEN_TEST_NO_DIRECT_DIR, a directory on a filesystem without O_DIRECT \
            (mount -t ramfs ramfs DIR); run with --ignored"]
fn without_o_direct_it_says_so_and_tests_what_it_can() {
    let dir = std::env::var_os("WALDEN_TEST_NO_DIRECT_DIR").expect(
        "WALDEN_TEST_NO_DIRECT_DIR must name a directory on a filesystem without O_DIRECT \
         (e.g. mount -t ramfs ramfs DIR)",
    );
    let dir = tempfile::tempdir_in(dir).unwrap();
    let file = dir.path().join("file");
    let out = test_fsync(&["-s", "0.05", "-f", file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("O_DIRECT is not supported on "), "{stdout}");
    assert!(stdout.contains(", testing without it."), "{stdout}");
    assert_measured(line(&stdout, PG_SECTIONS[0], "open_datasync"));
    for m in METHODS {
        assert!(line(&stdout, URING_SECTIONS[0], m)
            .trim_end()
            .ends_with("n/a*"));
        assert_measured(line(&stdout, URING_SECTIONS[2], m));
    }
    assert!(stdout.contains("* O_DIRECT is not supported"), "{stdout}");
    assert!(
        stdout.contains("\nRecommendation: wal_sync_method = "),
        "{stdout}"
    );
    assert_dir_empty(dir.path());
}

#[test]
fn json_holds_every_result_and_the_recommendation() {
    let dir = disk_dir();
    let file = dir.path().join("file");
    let out = test_fsync(&[
        "-s",
        "0.05",
        "--batch",
        "4",
        "--json",
        "-f",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}",
            text(&out.stdout)
        )
    });

    assert_eq!(doc["secs_per_test"], 0.05);
    assert_eq!(doc["batch"], 4);
    assert!(doc["o_direct"].is_boolean());
    let sections = doc["sections"].as_array().unwrap();
    let keys: Vec<&str> = sections
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "one_write",
            "two_writes",
            "open_sync_sizes",
            "non_write_descriptor",
            "non_synced",
            "plain_one_write",
            "io_uring_one_write_direct",
            "io_uring_batch_direct",
            "io_uring_one_write_buffered",
            "io_uring_batch_buffered",
        ]
    );
    assert_eq!(sections[0]["title"], PG_SECTIONS[0]);
    let lines: Vec<usize> = sections
        .iter()
        .map(|s| s["lines"].as_array().unwrap().len())
        .collect();
    assert_eq!(lines, [5, 5, 5, 2, 1, 4, 4, 4, 4, 4]);

    let mut measured = 0;
    for s in sections {
        for l in s["lines"].as_array().unwrap() {
            assert!(l["label"].is_string() && l["via"].is_string(), "{l}");
            match l["result"].as_object() {
                Some(r) => {
                    measured += 1;
                    assert!(r["ops"].as_u64().unwrap() >= 1, "{l}");
                    for k in ["ops_per_sec", "usecs_per_op", "p50_us", "p99_us"] {
                        assert!(r[k].as_f64().unwrap() > 0.0, "{k} in {l}");
                    }
                    assert!(r["p50_us"].as_f64() <= r["p99_us"].as_f64(), "{l}");
                }
                None => assert!(l["note"].is_string(), "n/a without a reason: {l}"),
            }
        }
    }
    assert!(measured >= 29, "only {measured} lines measured");
    let batch = &sections[7]["lines"][0];
    assert_eq!(batch["writes_per_op"], 4);
    assert_eq!(batch["via"], "io_uring");

    let rec = &doc["recommendation"];
    let single = rec["single"]["wal_sync_method"].as_str().unwrap();
    assert!(METHODS.contains(&single), "{rec}");
    assert_eq!(rec["single"]["writes_per_op"], 1);
    assert_eq!(rec["batch"]["writes_per_op"], 4);
    assert!(rec["single"]["margin"].as_f64().unwrap() >= 1.0, "{rec}");
    assert!(rec["depth_1"]["wal_sync_at_depth_1"].is_boolean(), "{rec}");
    assert_dir_empty(dir.path());
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let dir = disk_dir();
    let file = dir.path().join("file");
    let file = file.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["-s", "0", "-f", file], "greater than 0"),
        (&["-s", "abc", "-f", file], "not a number of seconds"),
        (&["-s", "-1", "-f", file], "greater than 0"),
        (&["--batch", "0", "-f", file], "--batch"),
        (
            &["-s", "1", "-f", "/no/such/directory/walden_test_fsync.out"],
            "does not exist",
        ),
        (&["-s", "1", "--no-such-option"], "--no-such-option"),
    ];
    for (args, expect) in cases {
        let out = test_fsync(args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(expect),
            "{args:?}: stderr lacks {expect:?}:\n{stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed a report:\n{}",
            text(&out.stdout)
        );
    }
    assert_dir_empty(dir.path());

    // An existing file is neither overwritten nor removed.
    let existing = dir.path().join("precious");
    std::fs::write(&existing, b"keep me").unwrap();
    let out = test_fsync(&["-s", "1", "-f", existing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
}

#[test]
fn help_explains_every_option() {
    let out = test_fsync(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for opt in [
        "-s, --secs-per-test <SECS>",
        "-f, --filename <FILE>",
        "--batch <N>",
        "--json",
        "--pg-offsets",
    ] {
        assert!(help.contains(opt), "--help lacks {opt:?}:\n{help}");
    }
    assert!(help.contains("walden_test_fsync.out"), "{help}");
}
