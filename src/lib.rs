//! walden: a write-ahead-log appliance for Linux.
//!
//! Clients append records; walden gives each an LSN, makes it durable with
//! group commit, and acknowledges it at the level asked for. This crate is the
//! engine (embeddable: see [`Wal`]) and the `walden` binary's subcommands.
//!
//! What it is not: a database. Records are opaque bytes; pages (in
//! [`store`]) are opaque 8 KiB blocks materialised from page records.
//!
//! Floors, from the bottom: [`io`] (every syscall and `unsafe`), [`lsn`],
//! [`record`], [`repl`] (the synchronous-standby policy, pure), [`config`],
//! [`lock`], [`wal`], [`store`], then the protocol, client and server. Nothing imports upward.

pub mod client;
pub mod clock;
pub mod config;
pub mod durability;
pub(crate) mod fatal;
pub mod io;
pub mod lock;
pub mod lsn;
pub mod metrics;
pub mod protocol;
pub mod record;
pub mod replication;
pub mod server;
pub mod store;
#[doc(hidden)]
pub mod testkit;
pub mod topology;
pub mod wal;

pub use config::Config;
pub use lsn::Lsn;
pub use record::Kind;
pub use store::{Store, StoreError};
pub use wal::{Appended, Durability, Inserter, Wal, WalError};
