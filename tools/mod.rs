//! Operator tools, reached as subcommands of the `walden` binary.

pub mod basebackup;
pub mod bench;
pub mod bench_server;
pub mod bench_stats;
pub mod client_cli;
pub mod common;
pub mod controldata;
pub mod crashtest;
pub mod page_cli;
pub mod promote;
pub mod rewind;
pub mod serve;
pub mod store_child;
pub mod test_fsync;
pub mod verify;
pub mod wal_child;
pub mod waldump;
