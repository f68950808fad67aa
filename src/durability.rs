//! Durability levels: when an append is acknowledged. Below `wal` and
//! `protocol`, which both speak of them.

use std::str::FromStr;

/// When an append is acknowledged, as PostgreSQL's `synchronous_commit`.
/// Without standbys, `remote_write`, `on` and `remote_apply` behave as `local`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Durability {
    /// In the ring; the flusher writes it within `wal_writer_delay`.
    Off,
    /// Flushed to the local WAL device.
    Local,
    /// Local, and written by a quorum of standbys.
    RemoteWrite,
    /// Local, and flushed by a quorum of standbys.
    On,
    /// Local, and replayed by a quorum of standbys.
    RemoteApply,
}

impl Durability {
    pub const ALL: [Durability; 5] = [
        Durability::Off,
        Durability::Local,
        Durability::RemoteWrite,
        Durability::On,
        Durability::RemoteApply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Durability::Off => "off",
            Durability::Local => "local",
            Durability::RemoteWrite => "remote_write",
            Durability::On => "on",
            Durability::RemoteApply => "remote_apply",
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Durability::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("invalid durability level {s:?}: expected off, local, remote_write, on or remote_apply"))
    }
}
