//! Operator tools, reached as subcommands of the `walden` binary.

pub mod bench;
pub mod common;
pub mod controldata;
pub mod test_fsync;
pub mod wal_child;
pub mod waldump;
