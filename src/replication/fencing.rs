//! Terms that fence a deposed primary (issue #15; replication-design.md §6
//! and §7.6).
//!
//! Every timeline is a term. A server persists (control file, fsync) the
//! highest term it has seen before it answers the first message of that
//! term; terms only grow (invariant 9). At the replication handshake both
//! sides compare terms:
//!
//! - the standby sends its term in StartReplication; a primary whose term is
//!   lower has been deposed by a newer primary: it persists the higher term,
//!   refuses with `STALE_TERM`, stops acknowledging (its waits for standbys
//!   end INDETERMINATE, reason Deposed) and accepts no more writes;
//! - the primary answers with its term in StreamStart; a standby whose term
//!   is higher refuses to stream from it (not one byte of its WAL changes),
//!   and one whose term is lower persists the primary's before it reports a
//!   position on that stream.
//!
//! This module holds the decisions and the messages, with no I/O: the
//! walsender and the walreceiver persist the term (`Store::raise_term`)
//! and depose the server (`SyncRep::depose`) as these functions say.
//!
//! What it is not: quorum intersection at promotion (a promoted server
//! makes N − k + 1 standbys persist its term before it acknowledges, §7.6)
//! is not built; until it is, a standby that has not yet connected to the
//! new primary still acknowledges the old one.

/// What a primary does with a standby's StartReplication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Stream to it.
    Stream,
    /// Refuse with `STALE_TERM` and `message`; `deposed_by`: the standby's
    /// higher term, which the primary must persist and be deposed by
    /// before it answers (None: it was deposed already).
    Refuse {
        deposed_by: Option<u64>,
        message: String,
    },
}

/// The walsender's check: `own` is this primary's persisted term,
/// `deposed_by` the term that deposed it (while it ran, or before it
/// started: [`deposed_at_start`]), if one did; `standby`
/// the term the standby sent (0 from a walden before terms: no check).
pub fn admit_standby(own: u64, deposed_by: Option<u64>, standby: u64) -> Admission {
    if standby > own {
        return Admission::Refuse {
            deposed_by: Some(standby),
            message: stale_term_message(own, standby),
        };
    }
    if let Some(by) = deposed_by {
        return Admission::Refuse {
            deposed_by: None,
            message: format!(
                "this server was deposed by term {by}: it no longer streams or acknowledges; \
                 rewind it with `walden rewind` and start it as a standby"
            ),
        };
    }
    Admission::Stream
}

/// The `STALE_TERM` answer to a standby whose term is above this server's.
pub fn stale_term_message(own: u64, standby: u64) -> String {
    format!(
        "this server's term {own} is below the standby's term {standby}: \
         it has been deposed and no longer streams or acknowledges"
    )
}

/// What the walreceiver does with its primary's StreamStart term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrimaryTerm {
    /// The standby's own term: stream.
    Same,
    /// A newer term: persist it before the first StandbyStatus, then stream.
    Newer(u64),
    /// Lower than the standby's: a deposed primary; refuse with this
    /// message (close, retry later; no byte of the WAL changes).
    Stale(String),
}

/// The walreceiver's check of the term in StreamStart (`primary` at
/// `addr`; `own`: the standby's persisted term).
pub fn judge_primary(addr: &str, own: u64, primary: u64) -> PrimaryTerm {
    use std::cmp::Ordering::*;
    match primary.cmp(&own) {
        Equal => PrimaryTerm::Same,
        Greater => PrimaryTerm::Newer(primary),
        Less => PrimaryTerm::Stale(format!(
            "{STALE_PRIMARY}the primary at {addr} has term {primary} but this standby follows \
             term {own}: it was deposed; not streaming from it"
        )),
    }
}

/// How [`PrimaryTerm::Stale`]'s message starts.
const STALE_PRIMARY: &str = "STALE_TERM: ";

/// Whether a walreceiver's error is its refusal of a deposed primary
/// (logged as an ERROR, where a lost connection is a WARNING).
pub fn is_stale_primary(error: &str) -> bool {
    error.starts_with(STALE_PRIMARY)
}

/// The refusal of a write (Append, PageWrite, Checkpoint) on a deposed
/// primary.
pub fn refuse_writes(by: u64) -> String {
    format!(
        "this server was deposed by term {by}: it accepts no writes; \
         rewind it with `walden rewind` and start it as a standby"
    )
}

/// The refusal of a base backup on a deposed primary (its WAL is not the
/// new primary's, and a backup writes WAL).
pub fn refuse_backup(by: u64) -> String {
    format!(
        "this server was deposed by term {by}: it takes no base backups; \
         take it from the current primary"
    )
}

/// The log line of a primary that learns it was deposed.
pub fn deposed_log(by: u64) -> String {
    format!("deposed by term {by}: no longer acknowledging commits")
}

/// A primary that starts with a persisted term above its timeline was told
/// of a newer primary before it went down: it is deposed from the start.
pub fn deposed_at_start(term: u64, timeline: u32) -> Option<u64> {
    (term > timeline as u64).then_some(term)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_with_a_higher_term_deposes_the_primary() {
        assert_eq!(admit_standby(2, None, 2), Admission::Stream);
        assert_eq!(admit_standby(2, None, 1), Admission::Stream);
        assert_eq!(admit_standby(2, None, 0), Admission::Stream, "no term sent");
        let Admission::Refuse {
            deposed_by,
            message,
        } = admit_standby(1, None, 2)
        else {
            panic!("streamed to a standby of a newer term");
        };
        assert_eq!(deposed_by, Some(2));
        assert_eq!(
            message,
            "this server's term 1 is below the standby's term 2: \
             it has been deposed and no longer streams or acknowledges"
        );
    }

    #[test]
    fn a_deposed_primary_streams_to_nobody() {
        let Admission::Refuse {
            deposed_by,
            message,
        } = admit_standby(2, Some(2), 1)
        else {
            panic!("a deposed primary streamed");
        };
        assert_eq!(deposed_by, None, "nothing new to persist");
        assert!(message.contains("deposed by term 2"), "{message}");
        // A still higher term is persisted again.
        assert!(matches!(
            admit_standby(2, Some(2), 3),
            Admission::Refuse {
                deposed_by: Some(3),
                ..
            }
        ));
    }

    #[test]
    fn a_standby_refuses_a_lower_term_and_adopts_a_higher_one() {
        assert_eq!(judge_primary("h:1", 2, 2), PrimaryTerm::Same);
        assert_eq!(judge_primary("h:1", 1, 3), PrimaryTerm::Newer(3));
        assert_eq!(
            judge_primary("127.0.0.1:5433", 2, 1),
            PrimaryTerm::Stale(
                "STALE_TERM: the primary at 127.0.0.1:5433 has term 1 but this standby \
                 follows term 2: it was deposed; not streaming from it"
                    .into()
            )
        );
        let PrimaryTerm::Stale(msg) = judge_primary("h:1", 3, 2) else {
            unreachable!()
        };
        assert!(is_stale_primary(&msg));
        assert!(!is_stale_primary(
            "could not start WAL streaming: STALE_TERM: this server's term 1 is below"
        ));
    }

    #[test]
    fn a_term_above_the_timeline_deposes_at_start() {
        assert_eq!(deposed_at_start(1, 1), None);
        assert_eq!(deposed_at_start(2, 2), None);
        assert_eq!(deposed_at_start(2, 1), Some(2));
        assert_eq!(
            refuse_writes(2),
            "this server was deposed by term 2: it accepts no writes; \
             rewind it with `walden rewind` and start it as a standby"
        );
        assert_eq!(
            deposed_log(2),
            "deposed by term 2: no longer acknowledging commits"
        );
    }
}
