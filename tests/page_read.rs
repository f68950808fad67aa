//! `walden page read` against a real server: a page nothing was ever written
//! to is named as such (its page LSN is 0/0), not dumped as zeros as if
//! they were data; a written page still prints its LSN and hex dump.

mod common;

use std::process::{Command, Output};

use common::ServerProcess;
use walden::store::page::PAGE_DATA;

fn walden(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(args)
        .env("WALDEN_LOG", "warn")
        .output()
        .unwrap()
}

fn page(server: &ServerProcess, args: &[&str]) -> Output {
    let mut all = vec!["page"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-H", &server.addr]);
    let o = walden(&all);
    assert!(
        o.status.success(),
        "walden {all:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn a_never_written_page_says_so() {
    let server = ServerProcess::start(&[]);
    // A neighbour of the page read is written: the relation exists, block 7 does not.
    page(
        &server,
        &[
            "write", "--rel", "1", "--block", "6", "--offset", "3", "abc",
        ],
    );

    let o = page(&server, &["read", "--rel", "1", "--block", "7"]);
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        "relation 1 block 7: never written (page LSN 0/0, all 8168 bytes zero)\n"
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // --raw: the bytes the server holds (zeros), and the note on stderr.
    let o = page(&server, &["read", "--rel", "1", "--block", "7", "--raw"]);
    assert_eq!(o.stdout, vec![0u8; PAGE_DATA]);
    assert_eq!(
        String::from_utf8(o.stderr).unwrap(),
        "walden page read: block 7 of relation 1 has never been written (all zeros)\n"
    );

    // A written page is not mistaken for one: its LSN and its bytes.
    let o = page(&server, &["read", "--rel", "1", "--block", "6"]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.starts_with("relation 1 block 6: page LSN 0/"),
        "{text}"
    );
    assert!(!text.contains("never written"), "{text}");
    assert!(
        text.contains(
            "00000000  00 00 00 61 62 63 00 00  00 00 00 00 00 00 00 00  |...abc..........|"
        ),
        "{text}"
    );
    let o = page(&server, &["read", "--rel", "1", "--block", "6", "--raw"]);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(&o.stdout[3..6], b"abc");
}
