//! Streaming replication: the synchronous-standby policy so far.
//!
//! What is here: `synchronous_standby_names` ([`StandbyNames`]: PostgreSQL's
//! grammar, parsed, checked and printed) and the quorum arithmetic
//! ([`Quorum`]: up to which LSN the policy is met for write, flush and apply,
//! and each standby's `sync_priority`/`sync_state`), both pure: no I/O, no
//! threads, no clock. What is not here yet (issue #14): walsender,
//! walreceiver, slots, the release of waiting commits. The setting is read,
//! validated and reloaded by the server, and has no effect until those land.
//!
//! It sits on floor 2 (it uses only [`crate::lsn`]), so that `config` can
//! validate the setting with this parser.

pub mod conninfo;
pub mod fencing;
pub mod quorum;
pub mod slots;
pub mod standby_names;
pub mod syncrep;

pub use conninfo::ConnInfo;
pub use quorum::{Quorum, SenderState, StandbyReport, StandbySync, SyncState, Synced, SyncedLsns};
pub use standby_names::{Method, StandbyNames, StandbyNamesError};
