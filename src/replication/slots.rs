//! Physical replication slots (PostgreSQL's slot.c, physical only): named,
//! persistent, each holding the WAL its standby still needs.
//!
//! A slot is one small file, `DATA_DIR/slots/<name>`: one line
//! `HI:LO:TIMELINE:STATE CRC32C` (the restart LSN `HI/LO` with a colon for
//! the slash, STATE `reserved` or `lost`), written
//! as the WAL's markers are (temporary file, fsync, rename, fsync of the
//! directory: [`crate::wal::marker`]), so that a crash leaves the old file
//! or the new one. It is written at creation, when the slot is lost, and
//! at each checkpoint when its restart LSN moved (as PostgreSQL's
//! `CheckPointReplicationSlots`): a restart LSN lagging on disk only keeps
//! more WAL.
//!
//! The checkpointer asks [`Slots::retention`] before it releases WAL: the
//! oldest restart LSN of the slots that are not lost. A slot further than
//! `max_slot_wal_keep_size` behind the insert position is marked lost there,
//! durably, before the WAL it needed can be released, and holds nothing
//! from then on; its standby gets `SLOT_LOST`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::io::file;
use crate::lsn::Lsn;
use crate::protocol::ErrorCode;

/// The directory of the slot files, in the data directory.
pub const SLOTS_DIR: &str = "slots";

/// Why a slot operation failed: the protocol's code and PostgreSQL's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotError {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for SlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SlotError {}

fn err(code: ErrorCode, message: String) -> SlotError {
    SlotError { code, message }
}

/// PostgreSQL's `ReplicationSlotValidateName`: 1 to 63 bytes of `a`–`z`,
/// `0`–`9` and `_`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("replication slot name \"\" is too short".into());
    }
    if name.len() > crate::protocol::MAX_NAME_LEN {
        return Err(format!(
            "replication slot name \"{name}\" is too long (at most 63 bytes)"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "replication slot name \"{name}\" contains invalid character: replication slot names \
             may only contain lower case letters, numbers, and the underscore character"
        ));
    }
    Ok(())
}

#[derive(Clone, Debug)]
struct Slot {
    restart_lsn: Lsn,
    /// What the file says.
    persisted: Lsn,
    lost: bool,
    /// The walsender streaming from it (its pid in /status).
    active: Option<u64>,
}

/// One slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRow {
    pub slot_name: String,
    pub active: bool,
    pub active_pid: Option<u64>,
    pub restart_lsn: Lsn,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: &'static str,
    /// Bytes the insert position may still advance before the slot is
    /// past `max_slot_wal_keep_size`; `None` without a cap or once lost.
    pub safe_wal_size: Option<i64>,
}

/// The server's slots.
pub struct Slots {
    dir: PathBuf,
    /// `max_slot_wal_keep_size` in bytes; `None`: no cap.
    max_keep: Option<u64>,
    slots: Mutex<BTreeMap<String, Slot>>,
}

/// The timeline field is the one the slot was created on (1: timelines
/// do not change a slot's meaning, an LSN is one position on every
/// timeline of the history).
fn encode(restart: Lsn, lost: bool) -> String {
    format!(
        "{restart}:{}:{}",
        crate::wal::TIMELINE,
        if lost { "lost" } else { "reserved" }
    )
}

fn decode(dir: &Path, name: &str, text: &str) -> Result<(Lsn, bool), String> {
    let bad = |why: &str| format!("replication slot file {}: {why}", dir.join(name).display());
    let mut parts = text.split(':');
    let lsn = parts.next().unwrap_or("");
    let hi = parts.next().unwrap_or("");
    let restart: Lsn = format!("{lsn}/{hi}")
        .parse()
        .map_err(|_| bad("bad restart LSN"))?;
    let _timeline: u32 = parts
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad("bad timeline"))?;
    let lost = match parts.next() {
        Some("reserved") => false,
        Some("lost") => true,
        _ => return Err(bad("bad state: expected reserved or lost")),
    };
    if parts.next().is_some() {
        return Err(bad("trailing fields"));
    }
    Ok((restart, lost))
}

impl Slots {
    /// The slots in `data_dir/slots` (none when the directory is missing).
    /// `max_keep`: `max_slot_wal_keep_size`, `None` for no cap.
    pub fn load(data_dir: &Path, max_keep: Option<u64>) -> Result<Slots, String> {
        let dir = data_dir.join(SLOTS_DIR);
        let mut slots = BTreeMap::new();
        if file::exists(&dir) {
            let names = file::list_files(&dir).map_err(|e| e.to_string())?;
            for name in names {
                if name.ends_with(".tmp") {
                    // A write that did not finish: the old file (if any) stands.
                    let _ = file::remove_file(&dir.join(&name));
                    continue;
                }
                if validate_name(&name).is_err() {
                    tracing::warn!(
                        "ignoring {}: not a replication slot name",
                        dir.join(&name).display()
                    );
                    continue;
                }
                let text = crate::wal::marker::read(&dir, &name, "HI:LO:TIMELINE:STATE")
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default();
                let (restart, lost) = decode(&dir, &name, &text)?;
                slots.insert(
                    name,
                    Slot {
                        restart_lsn: restart,
                        persisted: restart,
                        lost,
                        active: None,
                    },
                );
            }
        }
        Ok(Slots {
            dir,
            max_keep,
            slots: Mutex::new(slots),
        })
    }

    fn write(&self, name: &str, restart: Lsn, lost: bool) -> Result<(), SlotError> {
        // The LSN's '/' cannot be in the value: written as HI:LO.
        let text = encode(restart, lost).replacen('/', ":", 1);
        crate::wal::marker::write(&self.dir, name, &text).map_err(|e| {
            err(
                ErrorCode::IO_ERROR,
                format!("could not write replication slot \"{name}\": {e}"),
            )
        })
    }

    /// Creates a slot reserving WAL from `restart` (the current redo
    /// point: no checkpoint releases WAL past its own redo point, so what
    /// is at `restart` stays).
    pub fn create(&self, name: &str, restart: Lsn) -> Result<Lsn, SlotError> {
        validate_name(name).map_err(|m| err(ErrorCode::BAD_FRAME, m))?;
        let mut slots = self.slots.lock().unwrap();
        if slots.contains_key(name) {
            return Err(err(
                ErrorCode::SLOT_EXISTS,
                format!("replication slot \"{name}\" already exists"),
            ));
        }
        file::create_dir_all(&self.dir)
            .and_then(|()| file::sync_dir(self.dir.parent().unwrap_or(&self.dir)))
            .map_err(|e| {
                err(
                    ErrorCode::IO_ERROR,
                    format!("could not create replication slot \"{name}\": {e}"),
                )
            })?;
        self.write(name, restart, false)?;
        slots.insert(
            name.to_string(),
            Slot {
                restart_lsn: restart,
                persisted: restart,
                lost: false,
                active: None,
            },
        );
        tracing::info!("created replication slot \"{name}\" reserving WAL from {restart}");
        Ok(restart)
    }

    /// Drops a slot no walsender uses.
    pub fn drop_slot(&self, name: &str) -> Result<(), SlotError> {
        let mut slots = self.slots.lock().unwrap();
        match slots.get(name) {
            None => return Err(unknown(name)),
            Some(Slot {
                active: Some(pid), ..
            }) => return Err(active(name, *pid)),
            Some(_) => {}
        }
        let path = self.dir.join(name);
        file::remove_file(&path)
            .and_then(|()| file::sync_dir(&self.dir))
            .map_err(|e| {
                err(
                    ErrorCode::IO_ERROR,
                    format!("could not remove replication slot \"{name}\": {e}"),
                )
            })?;
        slots.remove(name);
        tracing::info!("dropped replication slot \"{name}\"");
        Ok(())
    }

    /// Makes walsender `pid` the slot's one user; its restart LSN.
    pub fn acquire(&self, name: &str, pid: u64) -> Result<Lsn, SlotError> {
        let mut slots = self.slots.lock().unwrap();
        let Some(s) = slots.get_mut(name) else {
            return Err(unknown(name));
        };
        if s.lost {
            return Err(lost(name));
        }
        if let Some(other) = s.active {
            return Err(active(name, other));
        }
        s.active = Some(pid);
        Ok(s.restart_lsn)
    }

    /// Ends walsender `pid`'s use of the slot.
    pub fn release(&self, name: &str, pid: u64) {
        if let Some(s) = self.slots.lock().unwrap().get_mut(name) {
            if s.active == Some(pid) {
                s.active = None;
            }
        }
    }

    /// The standby flushed up to `flush` (a record end): the slot keeps
    /// WAL from there on. Never backwards; in memory until the next
    /// checkpoint. Err once the slot is lost (or dropped).
    pub fn advance(&self, name: &str, flush: Lsn) -> Result<(), SlotError> {
        let mut slots = self.slots.lock().unwrap();
        let Some(s) = slots.get_mut(name) else {
            return Err(unknown(name));
        };
        if s.lost {
            return Err(lost(name));
        }
        if flush > s.restart_lsn {
            s.restart_lsn = flush;
        }
        Ok(())
    }

    /// Whether the slot is lost (or gone): its walsender stops.
    pub fn check(&self, name: &str) -> Result<(), SlotError> {
        match self.slots.lock().unwrap().get(name) {
            None => Err(unknown(name)),
            Some(s) if s.lost => Err(lost(name)),
            Some(_) => Ok(()),
        }
    }

    /// The checkpointer's step before it releases WAL, with the insert
    /// position `insert`: persists moved restart LSNs, marks (durably) the
    /// slots past `max_slot_wal_keep_size` lost, and returns the oldest
    /// restart LSN of the others: no WAL at or after it may be released.
    /// `Err` (a slot file could not be written): release nothing.
    pub fn retention(&self, insert: Lsn) -> Result<Option<Lsn>, SlotError> {
        let mut slots = self.slots.lock().unwrap();
        let mut floor: Option<Lsn> = None;
        for (name, s) in slots.iter_mut() {
            if s.lost {
                continue;
            }
            let behind = insert.0.saturating_sub(s.restart_lsn.0);
            if self.max_keep.is_some_and(|cap| behind > cap) {
                // IMPORTANT: durable before the WAL it held is released.
                self.write(name, s.restart_lsn, true)?;
                s.lost = true;
                s.persisted = s.restart_lsn;
                tracing::warn!(
                    "invalidating slot \"{name}\" because its restart_lsn {} exceeds \
                     max_slot_wal_keep_size",
                    s.restart_lsn
                );
                continue;
            }
            if s.restart_lsn != s.persisted {
                self.write(name, s.restart_lsn, false)?;
                s.persisted = s.restart_lsn;
            }
            floor = Some(floor.map_or(s.restart_lsn, |f| f.min(s.restart_lsn)));
        }
        Ok(floor)
    }

    /// Every slot, as `pg_replication_slots`: `insert` the insert position,
    /// `max_wal_size` in bytes.
    pub fn rows(&self, insert: Lsn, max_wal_size: u64) -> Vec<SlotRow> {
        let slots = self.slots.lock().unwrap();
        slots
            .iter()
            .map(|(name, s)| {
                let behind = insert.0.saturating_sub(s.restart_lsn.0);
                let wal_status = if s.lost {
                    "lost"
                } else if self.max_keep.is_some_and(|cap| behind > cap) {
                    "unreserved"
                } else if behind > max_wal_size {
                    "extended"
                } else {
                    "reserved"
                };
                SlotRow {
                    slot_name: name.clone(),
                    active: s.active.is_some(),
                    active_pid: s.active,
                    restart_lsn: s.restart_lsn,
                    wal_status,
                    safe_wal_size: self
                        .max_keep
                        .filter(|_| !s.lost)
                        .map(|cap| cap as i64 - behind as i64),
                }
            })
            .collect()
    }
}

fn unknown(name: &str) -> SlotError {
    err(
        ErrorCode::UNKNOWN_SLOT,
        format!("replication slot \"{name}\" does not exist"),
    )
}

fn active(name: &str, pid: u64) -> SlotError {
    err(
        ErrorCode::SLOT_ACTIVE,
        format!("replication slot \"{name}\" is active for PID {pid}"),
    )
}

fn lost(name: &str) -> SlotError {
    err(
        ErrorCode::SLOT_LOST,
        format!(
            "can no longer get changes from replication slot \"{name}\": this slot has been \
             invalidated because it exceeded the maximum reserved size"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "walden-slots-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn names_follow_postgres() {
        assert!(validate_name("s1_ok").is_ok());
        assert!(validate_name(&"a".repeat(63)).is_ok());
        assert!(validate_name(&"a".repeat(64))
            .unwrap_err()
            .contains("too long"));
        assert!(validate_name("").unwrap_err().contains("too short"));
        assert!(validate_name("S1")
            .unwrap_err()
            .contains("invalid character"));
        assert!(validate_name("a-b")
            .unwrap_err()
            .contains("invalid character"));
    }

    #[test]
    fn create_acquire_advance_lose_and_reload() {
        let d = tmp();
        let slots = Slots::load(&d, Some(1000)).unwrap();
        assert_eq!(slots.create("s1", Lsn(0x100)).unwrap(), Lsn(0x100));
        let e = slots.create("s1", Lsn(0x100)).unwrap_err();
        assert_eq!(e.code, ErrorCode::SLOT_EXISTS);
        assert_eq!(e.message, "replication slot \"s1\" already exists");
        slots.create("s2", Lsn(0x200)).unwrap();
        slots.acquire("s1", 7).unwrap();
        let e = slots.acquire("s1", 8).unwrap_err();
        assert_eq!(e.message, "replication slot \"s1\" is active for PID 7");
        assert_eq!(
            slots.drop_slot("s1").unwrap_err().code,
            ErrorCode::SLOT_ACTIVE
        );
        slots.advance("s1", Lsn(0x180)).unwrap();
        slots.advance("s1", Lsn(0x150)).unwrap(); // never backwards
        assert_eq!(slots.retention(Lsn(0x300)).unwrap(), Some(Lsn(0x180)));
        // s1 persisted at 0x180 by that checkpoint.
        let again = Slots::load(&d, None).unwrap();
        assert_eq!(again.rows(Lsn(0x300), 1 << 30)[0].restart_lsn, Lsn(0x180));
        // 0x600 - 0x180 > 1000: s1 is lost; s2 (0x200) is too.
        assert_eq!(slots.retention(Lsn(0x600)).unwrap(), None);
        assert_eq!(
            slots.acquire("s2", 9).unwrap_err().code,
            ErrorCode::SLOT_LOST
        );
        assert_eq!(
            slots.advance("s1", Lsn(0x600)).unwrap_err().code,
            ErrorCode::SLOT_LOST
        );
        let again = Slots::load(&d, None).unwrap();
        let rows = again.rows(Lsn(0x600), 1 << 30);
        assert!(rows.iter().all(|r| r.wal_status == "lost"), "{rows:?}");
        slots.release("s1", 7);
        slots.drop_slot("s1").unwrap();
        assert_eq!(
            slots.drop_slot("s1").unwrap_err().code,
            ErrorCode::UNKNOWN_SLOT
        );
        let again = Slots::load(&d, None).unwrap();
        assert_eq!(again.rows(Lsn(0), 0).len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_damaged_slot_file_is_an_error() {
        let d = tmp();
        let slots = Slots::load(&d, None).unwrap();
        slots.create("s1", Lsn(0x100)).unwrap();
        let p = d.join(SLOTS_DIR).join("s1");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("reserved", "lost");
        std::fs::write(&p, text).unwrap();
        assert!(Slots::load(&d, None).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
