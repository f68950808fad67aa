//! `/status` and `walden status` against a real `walden serve`: every
//! setting of the configuration file appears, by its file name, in the form
//! the file takes (`30s`, `16MB`), and a setting changed by a reload
//! (SIGHUP) shows its new value while one that needs a restart shows the
//! value the server runs with.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{run_bounded, ServerProcess};
use walden::Config;

/// The settings of the configuration file format.
fn setting_names() -> BTreeSet<String> {
    toml::Table::try_from(Config::default())
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

fn metrics_addr(s: &ServerProcess) -> String {
    let text = std::fs::read_to_string(s.dir.path().join("data/data/walden.addr")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("metrics_addr="))
        .expect("metrics_addr in walden.addr")
        .to_string()
}

/// GET /status, parsed.
fn http_status(addr: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{raw}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

fn walden_status(addr: &str, json: bool) -> String {
    let mut args = vec!["status", "-H", addr];
    if json {
        args.push("--json");
    }
    let out = run_bounded(&args);
    assert!(
        out.status.success(),
        "walden status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The `  name = value` lines of `walden status`'s settings block.
fn settings_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip_while(|l| *l != "settings:")
        .skip(1)
        .map(|l| {
            // An empty value (auth_token_file) leaves `name =`.
            let (name, value) = l
                .split_once(" =")
                .unwrap_or_else(|| panic!("not a setting line: {l:?}"));
            (name.trim().to_string(), value.trim_start().to_string())
        })
        .collect()
}

fn setting(lines: &[(String, String)], name: &str) -> String {
    lines
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("walden status shows no {name}: {lines:?}"))
        .1
        .clone()
}

#[test]
fn status_shows_every_setting_in_force_with_its_unit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("walden.toml");
    std::fs::write(
        &file,
        "idle_timeout = \"30s\"\nshared_buffers = \"16MB\"\ncheckpoint_timeout = 300000\n",
    )
    .unwrap();
    let s = ServerProcess::start_with_config(Some(&file), &["metrics_addr=127.0.0.1:0"]);
    let http = metrics_addr(&s);

    let v = http_status(&http);
    let settings = v["settings"].as_object().expect("a settings object");
    let shown: BTreeSet<String> = settings.keys().cloned().collect();
    assert_eq!(shown, setting_names(), "/status settings");
    for (name, want) in [
        ("idle_timeout", serde_json::json!("30s")),
        ("shared_buffers", "16MB".into()),
        // Written in ms, shown in the largest exact unit.
        ("checkpoint_timeout", "5min".into()),
        ("wal_segment_size", "1MB".into()), // -c wal_segment_size=1MB
        ("wal_buffers", "16MB".into()),
        ("wal_writer_delay", "200ms".into()),
        ("slow_client_timeout", "1min".into()),
        ("wal_keep_size", "1GB".into()),
        ("commit_delay", 0.into()),
        ("checkpoint_completion_target", 0.9.into()),
        ("fsync", true.into()),
        ("wal_sync_method", "open_datasync".into()),
        ("listen_addr", "127.0.0.1:0".into()),
    ] {
        assert_eq!(settings[name], want, "/status settings.{name}");
    }

    // Reloadable changes, and one that needs a restart.
    std::fs::write(
        &file,
        "idle_timeout = \"2min\"\nshared_buffers = \"16MB\"\ncheckpoint_timeout = 300000\n\
         commit_delay = 250\ncheckpoint_completion_target = 0.5\nmax_send_backlog = \"8MB\"\n\
         wal_buffers = \"32MB\"\nsynchronous_standby_names = 'ANY 1 (\"s 1\", s2)'\n",
    )
    .unwrap();
    s.reload_until_logged(
        "parameter \"wal_buffers\" cannot be changed without restarting the server",
    );
    // A string is logged as its text, as PostgreSQL does.
    assert!(
        s.log()
            .contains("parameter \"synchronous_standby_names\" changed to \"ANY 1 (\"s 1\", s2)\""),
        "{}",
        s.log()
    );
    let v = http_status(&http);
    let settings = &v["settings"];
    for (name, want) in [
        ("idle_timeout", serde_json::json!("2min")),
        ("commit_delay", 250.into()),
        ("checkpoint_completion_target", 0.5.into()),
        ("max_send_backlog", "8MB".into()),
        // As written in the file.
        ("synchronous_standby_names", "ANY 1 (\"s 1\", s2)".into()),
        // Still the value it started with: the file's 32MB is not in force.
        ("wal_buffers", "16MB".into()),
    ] {
        assert_eq!(
            settings[name], want,
            "/status settings.{name} after the reload"
        );
    }

    // walden status: the same settings, one line each, in the same forms.
    let text = walden_status(&s.addr, false);
    let lines = settings_lines(&text);
    let names: BTreeSet<String> = lines.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, setting_names(), "walden status settings:\n{text}");
    for (name, want) in [
        ("idle_timeout", "2min"),
        ("commit_delay", "250"),
        ("checkpoint_completion_target", "0.5"),
        ("checkpoint_timeout", "5min"),
        ("max_send_backlog", "8MB"),
        ("wal_buffers", "16MB"),
        ("shared_buffers", "16MB"),
        ("fsync", "true"),
        ("cpu_affinity", "[]"),
        ("auth_token_file", ""),
        ("synchronous_standby_names", "ANY 1 (\"s 1\", s2)"),
    ] {
        assert_eq!(setting(&lines, name), want, "walden status: {name}\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&walden_status(&s.addr, true)).unwrap();
    assert_eq!(json["settings"], v["settings"]);

    // A value PostgreSQL would refuse is refused by a reload, with its
    // words, and the one in force stays.
    std::fs::write(&file, "synchronous_standby_names = 'FIRST 0 (s1)'\n").unwrap();
    s.reload_until_logged("number of synchronous standbys (0) must be greater than zero");
    assert_eq!(
        http_status(&http)["settings"]["synchronous_standby_names"],
        "ANY 1 (\"s 1\", s2)"
    );
}
