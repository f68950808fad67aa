//! Operator tools, reached as subcommands of the `walden` binary.

pub mod bench;
pub mod common;
pub mod wal_child;
