//! Which standbys are synchronous, and up to where a commit is replicated.
//!
//! This is `syncrep.c`'s arithmetic, pure: given the configured
//! [`StandbyNames`] and what each connected standby last reported, say
//! up to which LSN the policy is met for each of write, flush and apply
//! (what `remote_write`, `on` and `remote_apply` wait for), and what
//! `pg_stat_replication` would show as each standby's `sync_priority` and
//! `sync_state`.
//!
//! - A standby is a *candidate* (`SyncRepGetCandidateStandbys`) when its
//!   name matches the list (priority > 0), it is `streaming` or `stopping`,
//!   and its flush LSN is valid. One in `startup` or `catchup` never counts.
//! - `FIRST k`: the `k` candidates of lowest priority number are the sync
//!   standbys; ties (two standbys under one name, or several matched by `*`)
//!   go to the one earlier in the input, as PostgreSQL breaks them by
//!   walsender slot. The synced LSN is the minimum over them, per mode
//!   (`SyncRepGetOldestSyncRecPtr`).
//! - `ANY k`: every candidate counts; the synced LSN is the `k`-th largest,
//!   per mode (`SyncRepGetNthLatestSyncRecPtr`).
//! - Fewer than `k` candidates: nothing is synced ([`Synced::Short`]);
//!   waiters wait.
//!
//! One deliberate difference: `SyncRepGetOldestSyncRecPtr` treats its
//! running minimum `0` as "not yet set", so a sync standby that reports an
//! apply (or write) LSN of 0 is skipped and the others' minimum is taken.
//! Here the minimum is the minimum: a synced LSN never exceeds the LSN of
//! any standby it counts.
//!
//! The result can move backwards (a standby ahead of the others
//! disconnects; a lagging one takes a FIRST slot). Whoever releases waiters
//! must keep the largest value it ever released, as `SyncRepReleaseWaiters`
//! only ever raises `walsndctl->lsn[mode]`: every value computed was true
//! of a quorum when it was computed.
//!
//! Cost of [`Quorum::compute`] with `s` standbys and `n` names: `s × n`
//! ASCII case-insensitive name comparisons (at most), a sort of the
//! candidates for `FIRST` when more than `k` stream (`s log s`), three
//! linear selections for `ANY`. No allocation once its buffers have grown to
//! `s` entries; it is meant to run on every feedback message.

use super::standby_names::{Method, StandbyNames};
use crate::lsn::Lsn;

/// A walsender's state, as `pg_stat_replication.state` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SenderState {
    /// Connected, not yet streaming.
    Startup,
    /// Sending WAL the standby is behind on; does not count for sync.
    Catchup,
    /// Caught up and following the primary's WAL as it is written.
    Streaming,
    /// Shutting down after the last WAL was sent; still counts, as in
    /// PostgreSQL 13 and later, so that a clean shutdown can release the
    /// last commits.
    Stopping,
}

impl SenderState {
    pub fn name(self) -> &'static str {
        match self {
            SenderState::Startup => "startup",
            SenderState::Catchup => "catchup",
            SenderState::Streaming => "streaming",
            SenderState::Stopping => "stopping",
        }
    }

    /// Whether a standby in this state can be a sync standby.
    pub fn may_sync(self) -> bool {
        matches!(self, SenderState::Streaming | SenderState::Stopping)
    }
}

/// What one connected standby last reported.
///
/// `write ≥ flush ≥ apply` is what a standby reports, but nothing here
/// relies on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbyReport<'a> {
    pub application_name: &'a str,
    pub state: SenderState,
    /// Written to the standby's WAL files, maybe not yet durable.
    pub write: Lsn,
    /// Durable on the standby. [`Lsn::INVALID`] (nothing reported yet, or
    /// a base backup's stream) makes the standby asynchronous.
    pub flush: Lsn,
    /// Replayed into the standby's page store.
    pub apply: Lsn,
}

/// `pg_stat_replication.sync_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncState {
    /// Not in the list (priority 0), or no valid flush LSN.
    Async,
    /// In the list, but not a sync standby now (not streaming, or `FIRST k`
    /// already has `k` of higher priority).
    Potential,
    /// One of the `k` sync standbys of `FIRST k`.
    Sync,
    /// A candidate of `ANY k`: PostgreSQL does not say which `k` hold a
    /// given commit, since that changes with every report.
    Quorum,
}

impl SyncState {
    pub fn name(self) -> &'static str {
        match self {
            SyncState::Async => "async",
            SyncState::Potential => "potential",
            SyncState::Sync => "sync",
            SyncState::Quorum => "quorum",
        }
    }
}

/// One standby's row of `pg_stat_replication`, the sync part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbySync {
    /// 0 for asynchronous; for `FIRST`, the position of the first name it
    /// matches; for `ANY`, 1.
    pub sync_priority: u32,
    pub sync_state: SyncState,
}

/// The positions a policy is met up to, one per wait mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncedLsns {
    /// What `remote_write` waits for.
    pub write: Lsn,
    /// What `on` waits for.
    pub flush: Lsn,
    /// What `remote_apply` waits for.
    pub apply: Lsn,
}

/// The outcome of one computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synced {
    /// `synchronous_standby_names` is empty: commits do not wait for
    /// standbys (`remote_*` and `on` behave as `local`).
    NotConfigured,
    /// Fewer than `num_sync` candidates: the policy is met nowhere and
    /// waiters wait.
    Short { candidates: usize, num_sync: u32 },
    /// Met up to these positions.
    Upto(SyncedLsns),
}

impl Synced {
    /// The positions, when the policy is configured and met.
    pub fn lsns(self) -> Option<SyncedLsns> {
        match self {
            Synced::Upto(l) => Some(l),
            _ => None,
        }
    }
}

/// Reusable buffers for [`Quorum::compute`]; one per caller (it is not
/// shared between threads).
#[derive(Debug, Default)]
pub struct Quorum {
    /// (priority, index into the reports) of each candidate.
    candidates: Vec<(u32, usize)>,
    /// One mode's LSNs of the candidates, for the k-th largest.
    lsns: Vec<Lsn>,
    /// The rows of the last computation, parallel to its reports.
    standbys: Vec<StandbySync>,
}

impl Quorum {
    pub fn new() -> Quorum {
        Quorum::default()
    }

    /// Buffers sized for `standbys` reports: no allocation up to that many.
    pub fn with_capacity(standbys: usize) -> Quorum {
        Quorum {
            candidates: Vec::with_capacity(standbys),
            lsns: Vec::with_capacity(standbys),
            standbys: Vec::with_capacity(standbys),
        }
    }

    /// Applies `names` (None: the empty setting) to `reports`, given in a
    /// stable order (connection order: it breaks priority ties). Also
    /// fills [`Quorum::standbys`].
    pub fn compute(&mut self, names: Option<&StandbyNames>, reports: &[StandbyReport]) -> Synced {
        self.standbys.clear();
        self.candidates.clear();
        let Some(names) = names else {
            self.standbys.extend(reports.iter().map(|_| StandbySync {
                sync_priority: 0,
                sync_state: SyncState::Async,
            }));
            return Synced::NotConfigured;
        };
        let num_sync = names.num_sync();
        // SyncRepGetCandidateStandbys, and pg_stat_get_wal_senders's
        // "no valid flush position: asynchronous".
        for (i, r) in reports.iter().enumerate() {
            let priority = if r.flush.is_valid() {
                names.priority(r.application_name)
            } else {
                0
            };
            if priority > 0 && r.state.may_sync() {
                self.candidates.push((priority, i));
            }
            self.standbys.push(StandbySync {
                sync_priority: priority,
                sync_state: if priority == 0 {
                    SyncState::Async
                } else {
                    SyncState::Potential
                },
            });
        }
        let (method, chosen) = (names.method(), self.candidates.len());
        if method == Method::Priority && chosen > num_sync as usize {
            // (priority, index) pairs are distinct: an unstable sort is
            // PostgreSQL's order (priority, then slot) and does not allocate.
            self.candidates.sort_unstable();
            self.candidates.truncate(num_sync as usize);
        }
        let state = match method {
            Method::Priority => SyncState::Sync,
            Method::Quorum => SyncState::Quorum,
        };
        for &(_, i) in &self.candidates {
            self.standbys[i].sync_state = state;
        }
        if chosen < num_sync as usize {
            return Synced::Short {
                candidates: chosen,
                num_sync,
            };
        }
        let lsns = match method {
            Method::Priority => oldest(reports, &self.candidates),
            Method::Quorum => {
                let k = num_sync as usize;
                SyncedLsns {
                    write: nth_latest(&mut self.lsns, reports, &self.candidates, k, |r| r.write),
                    flush: nth_latest(&mut self.lsns, reports, &self.candidates, k, |r| r.flush),
                    apply: nth_latest(&mut self.lsns, reports, &self.candidates, k, |r| r.apply),
                }
            }
        };
        Synced::Upto(lsns)
    }

    /// `sync_priority` and `sync_state` of each report of the last
    /// [`Quorum::compute`], in its order.
    pub fn standbys(&self) -> &[StandbySync] {
        &self.standbys
    }
}

/// `SyncRepGetOldestSyncRecPtr`: the minimum per mode over `chosen` (not
/// empty), with a true minimum (see the module's note).
fn oldest(reports: &[StandbyReport], chosen: &[(u32, usize)]) -> SyncedLsns {
    debug_assert!(!chosen.is_empty());
    let max = Lsn(u64::MAX);
    let mut out = SyncedLsns {
        write: max,
        flush: max,
        apply: max,
    };
    for &(_, i) in chosen {
        let r = &reports[i];
        out.write = out.write.min(r.write);
        out.flush = out.flush.min(r.flush);
        out.apply = out.apply.min(r.apply);
    }
    out
}

/// `SyncRepGetNthLatestSyncRecPtr` for one mode: the `k`-th largest
/// (1-based) over `chosen`, which holds at least `k`. A selection rather
/// than PostgreSQL's sort: the same value, in linear time.
fn nth_latest(
    scratch: &mut Vec<Lsn>,
    reports: &[StandbyReport],
    chosen: &[(u32, usize)],
    k: usize,
    mode: impl Fn(&StandbyReport) -> Lsn,
) -> Lsn {
    debug_assert!(k >= 1 && k <= chosen.len());
    scratch.clear();
    scratch.extend(chosen.iter().map(|&(_, i)| mode(&reports[i])));
    *scratch.select_nth_unstable_by(k - 1, |a, b| b.cmp(a)).1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> StandbyNames {
        StandbyNames::parse(text).unwrap().unwrap()
    }

    fn report(
        name: &str,
        state: SenderState,
        write: u64,
        flush: u64,
        apply: u64,
    ) -> StandbyReport<'_> {
        StandbyReport {
            application_name: name,
            state,
            write: Lsn(write),
            flush: Lsn(flush),
            apply: Lsn(apply),
        }
    }

    fn streaming(name: &str, lsn: u64) -> StandbyReport<'_> {
        report(name, SenderState::Streaming, lsn, lsn, lsn)
    }

    fn rows(q: &Quorum) -> Vec<(u32, &'static str)> {
        q.standbys()
            .iter()
            .map(|s| (s.sync_priority, s.sync_state.name()))
            .collect()
    }

    fn upto(write: u64, flush: u64, apply: u64) -> Synced {
        Synced::Upto(SyncedLsns {
            write: Lsn(write),
            flush: Lsn(flush),
            apply: Lsn(apply),
        })
    }

    /// The documentation's example: `FIRST 2 (s1, s2, s3)` with s1..s4
    /// connected: s1 and s2 are sync, s3 potential, s4 async; with s1 gone,
    /// s3 takes its place.
    #[test]
    fn first_two_of_three_as_the_postgresql_docs() {
        let policy = names("FIRST 2 (s1, s2, s3)");
        let mut q = Quorum::new();
        let all = [
            streaming("s1", 500),
            streaming("s2", 300),
            streaming("s3", 100),
            streaming("s4", 900),
        ];
        assert_eq!(q.compute(Some(&policy), &all), upto(300, 300, 300));
        assert_eq!(
            rows(&q),
            vec![(1, "sync"), (2, "sync"), (3, "potential"), (0, "async")]
        );
        let s1_gone = [all[1], all[2], all[3]];
        assert_eq!(q.compute(Some(&policy), &s1_gone), upto(100, 100, 100));
        assert_eq!(rows(&q), vec![(2, "sync"), (3, "sync"), (0, "async")]);
        // Only s2 left: the policy is not met, s2 still shows as sync.
        assert_eq!(
            q.compute(Some(&policy), &[all[1]]),
            Synced::Short {
                candidates: 1,
                num_sync: 2
            }
        );
        assert_eq!(rows(&q), vec![(2, "sync")]);
    }

    /// The documentation's example: `ANY 2 (s1, s2, s3)` with s1..s4: any
    /// two of s1..s3 suffice; every candidate shows `quorum`.
    #[test]
    fn any_two_of_three_as_the_postgresql_docs() {
        let policy = names("ANY 2 (s1, s2, s3)");
        let mut q = Quorum::new();
        let all = [
            report("s1", SenderState::Streaming, 500, 400, 300),
            report("s2", SenderState::Streaming, 700, 200, 100),
            report("s3", SenderState::Streaming, 600, 600, 50),
            streaming("s4", 900),
        ];
        // Per mode, the second largest of s1..s3.
        assert_eq!(q.compute(Some(&policy), &all), upto(600, 400, 100));
        assert_eq!(
            rows(&q),
            vec![(1, "quorum"), (1, "quorum"), (1, "quorum"), (0, "async")]
        );
    }

    #[test]
    fn the_seed_scenario_any_one_of_everyone() {
        let policy = names("ANY 1 (*)");
        let mut q = Quorum::new();
        // One standby down: the other carries the commits.
        assert_eq!(
            q.compute(Some(&policy), &[streaming("s2", 42)]),
            upto(42, 42, 42)
        );
        // Both: the largest.
        assert_eq!(
            q.compute(Some(&policy), &[streaming("s1", 40), streaming("s2", 42)]),
            upto(42, 42, 42)
        );
        // None: wait.
        assert_eq!(
            q.compute(Some(&policy), &[]),
            Synced::Short {
                candidates: 0,
                num_sync: 1
            }
        );
    }

    #[test]
    fn catchup_and_startup_do_not_count_stopping_does() {
        let policy = names("ANY 2 (a, b, c)");
        let mut q = Quorum::new();
        let reports = [
            report("a", SenderState::Catchup, 900, 900, 900),
            report("b", SenderState::Startup, 800, 800, 800),
            report("c", SenderState::Streaming, 100, 100, 100),
        ];
        assert_eq!(
            q.compute(Some(&policy), &reports),
            Synced::Short {
                candidates: 1,
                num_sync: 2
            }
        );
        assert_eq!(
            rows(&q),
            vec![(1, "potential"), (1, "potential"), (1, "quorum")]
        );
        let reports = [
            report("a", SenderState::Stopping, 900, 900, 900),
            reports[1],
            reports[2],
        ];
        assert_eq!(q.compute(Some(&policy), &reports), upto(100, 100, 100));
        assert_eq!(
            rows(&q),
            vec![(1, "quorum"), (1, "potential"), (1, "quorum")]
        );
    }

    #[test]
    fn no_valid_flush_is_async() {
        // pg_basebackup's stream reports no flush: priority 0, async.
        let policy = names("*");
        let mut q = Quorum::new();
        let reports = [report("backup", SenderState::Streaming, 100, 0, 0)];
        assert_eq!(
            q.compute(Some(&policy), &reports),
            Synced::Short {
                candidates: 0,
                num_sync: 1
            }
        );
        assert_eq!(rows(&q), vec![(0, "async")]);
    }

    #[test]
    fn empty_setting_is_not_configured_and_everyone_async() {
        let mut q = Quorum::new();
        assert_eq!(
            q.compute(None, &[streaming("s1", 5)]),
            Synced::NotConfigured
        );
        assert_eq!(rows(&q), vec![(0, "async")]);
        assert_eq!(Synced::NotConfigured.lsns(), None);
    }

    #[test]
    fn plain_list_is_first_one_and_ties_go_to_the_earlier_report() {
        // Two standbys under one name: the same priority; the earlier wins.
        let policy = names("a, b");
        let mut q = Quorum::new();
        let reports = [streaming("b", 70), streaming("a", 10), streaming("A", 20)];
        assert_eq!(q.compute(Some(&policy), &reports), upto(10, 10, 10));
        assert_eq!(
            rows(&q),
            vec![(2, "potential"), (1, "sync"), (1, "potential")]
        );
        // `*` gives everyone its position: after the named ones.
        let policy = names("FIRST 2 (x, *)");
        let reports = [streaming("p", 70), streaming("q", 60), streaming("x", 10)];
        assert_eq!(q.compute(Some(&policy), &reports), upto(10, 10, 10));
        assert_eq!(rows(&q), vec![(2, "sync"), (2, "potential"), (1, "sync")]);
    }

    #[test]
    fn first_takes_the_true_minimum_of_each_mode() {
        // PostgreSQL would skip the 0 apply of s1 and report 300.
        let policy = names("FIRST 2 (s1, s2)");
        let mut q = Quorum::new();
        let reports = [
            report("s1", SenderState::Streaming, 500, 400, 0),
            report("s2", SenderState::Streaming, 450, 450, 300),
        ];
        assert_eq!(q.compute(Some(&policy), &reports), upto(450, 400, 0));
    }

    #[test]
    fn num_sync_beyond_the_list_is_met_only_through_duplicates() {
        let policy = names("FIRST 3 (a, b)");
        let mut q = Quorum::new();
        let three = [streaming("a", 30), streaming("b", 20), streaming("b", 10)];
        assert_eq!(q.compute(Some(&policy), &three), upto(10, 10, 10));
        let policy = names("ANY 3 (*)");
        assert_eq!(q.compute(Some(&policy), &three), upto(10, 10, 10));
    }

    #[test]
    fn buffers_are_reused() {
        let policy = names("ANY 2 (*)");
        let reports: Vec<_> = (0..16).map(|i| streaming("s", 100 + i)).collect();
        let mut q = Quorum::with_capacity(16);
        let caps = (
            q.candidates.capacity(),
            q.lsns.capacity(),
            q.standbys.capacity(),
        );
        for _ in 0..3 {
            assert_eq!(q.compute(Some(&policy), &reports), upto(114, 114, 114));
        }
        assert_eq!(
            caps,
            (
                q.candidates.capacity(),
                q.lsns.capacity(),
                q.standbys.capacity()
            )
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        const POOL: [&str; 4] = ["s0", "s1", "s2", "s3"];

        fn any_state() -> impl Strategy<Value = SenderState> {
            prop_oneof![
                Just(SenderState::Startup),
                Just(SenderState::Catchup),
                Just(SenderState::Streaming),
                Just(SenderState::Stopping),
            ]
        }

        /// (name index, upper case?, state, write, flush, apply); small LSNs
        /// so that ties and zeros are common.
        type Raw = (usize, bool, SenderState, u64, u64, u64);

        fn any_reports() -> impl Strategy<Value = Vec<Raw>> {
            proptest::collection::vec(
                (
                    0..POOL.len() + 1,
                    any::<bool>(),
                    any_state(),
                    0u64..6,
                    0u64..6,
                    0u64..6,
                ),
                0..8,
            )
        }

        fn any_policy() -> impl Strategy<Value = StandbyNames> {
            (
                any::<bool>(),
                1u32..5,
                proptest::collection::vec(
                    prop_oneof![
                        (0..POOL.len()).prop_map(|i| POOL[i].to_string()),
                        Just("*".to_string())
                    ],
                    1..5,
                ),
            )
                .prop_map(|(any, k, names)| {
                    let m = if any {
                        Method::Quorum
                    } else {
                        Method::Priority
                    };
                    StandbyNames::new(m, k, names).unwrap()
                })
        }

        /// Names outside the pool ("x4") match only `*`.
        fn app_names(raw: &[Raw]) -> Vec<String> {
            raw.iter()
                .map(|&(i, upper, ..)| {
                    let n = POOL.get(i).map_or("x4".to_string(), |s| s.to_string());
                    if upper {
                        n.to_uppercase()
                    } else {
                        n
                    }
                })
                .collect()
        }

        fn reports<'a>(raw: &[Raw], names: &'a [String]) -> Vec<StandbyReport<'a>> {
            raw.iter()
                .zip(names)
                .map(|(&(_, _, state, w, f, a), name)| StandbyReport {
                    application_name: name,
                    state,
                    write: Lsn(w),
                    flush: Lsn(f),
                    apply: Lsn(a),
                })
                .collect()
        }

        /// Priority the slow way: the first position whose name equals the
        /// application name (any case) or is `*`.
        fn naive_priority(p: &StandbyNames, r: &StandbyReport) -> u32 {
            if !r.flush.is_valid() {
                return 0;
            }
            for (i, n) in p.names().iter().enumerate() {
                if n == "*" || n.to_lowercase() == r.application_name.to_lowercase() {
                    return if p.method() == Method::Quorum {
                        1
                    } else {
                        i as u32 + 1
                    };
                }
            }
            0
        }

        fn modes(r: &StandbyReport) -> [Lsn; 3] {
            [r.write, r.flush, r.apply]
        }

        fn as_array(l: SyncedLsns) -> [Lsn; 3] {
            [l.write, l.flush, l.apply]
        }

        proptest! {
            #[test]
            fn matches_the_naive_definition(policy in any_policy(), raw in any_reports()) {
                let names = app_names(&raw);
                let rs = reports(&raw, &names);
                let mut q = Quorum::new();
                let got = q.compute(Some(&policy), &rs);
                let k = policy.num_sync() as usize;
                // Candidates: streaming (or stopping) standbys in the list.
                let mut cands: Vec<(u32, usize)> = rs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (naive_priority(&policy, r), i))
                    .filter(|&(p, i)| {
                        p > 0
                            && matches!(rs[i].state, SenderState::Streaming | SenderState::Stopping)
                    })
                    .collect();
                for (i, r) in rs.iter().enumerate() {
                    prop_assert_eq!(q.standbys()[i].sync_priority, naive_priority(&policy, r));
                    prop_assert_eq!(
                        q.standbys()[i].sync_state == SyncState::Async,
                        naive_priority(&policy, r) == 0
                    );
                }
                if cands.len() < k {
                    let short = Synced::Short { candidates: cands.len(), num_sync: k as u32 };
                    prop_assert_eq!(got, short);
                    return Ok(());
                }
                let got = as_array(got.lsns().expect("met"));
                match policy.method() {
                    Method::Quorum => {
                        // The k-th largest of the candidates, per mode.
                        for (m, &synced) in got.iter().enumerate() {
                            let mut v: Vec<Lsn> =
                                cands.iter().map(|&(_, i)| modes(&rs[i])[m]).collect();
                            v.sort();
                            v.reverse();
                            prop_assert_eq!(synced, v[k - 1]);
                            // At least k quorum standbys hold it.
                            let holding = rs
                                .iter()
                                .zip(q.standbys())
                                .filter(|(r, s)| {
                                    s.sync_state == SyncState::Quorum && modes(r)[m] >= synced
                                })
                                .count();
                            prop_assert!(holding >= k);
                        }
                    }
                    Method::Priority => {
                        // The min over the k lowest priority numbers (ties:
                        // earlier report first; a stable sort keeps it).
                        cands.sort_by_key(|&(p, _)| p);
                        let sync: Vec<usize> = cands[..k].iter().map(|&(_, i)| i).collect();
                        for (m, &synced) in got.iter().enumerate() {
                            let min = sync.iter().map(|&i| modes(&rs[i])[m]).min().unwrap();
                            prop_assert_eq!(synced, min);
                        }
                        for (i, r) in rs.iter().enumerate() {
                            let is_sync = q.standbys()[i].sync_state == SyncState::Sync;
                            prop_assert_eq!(is_sync, sync.contains(&i));
                            if is_sync {
                                // Never past any sync standby.
                                for (synced, own) in got.iter().zip(modes(r)) {
                                    prop_assert!(*synced <= own);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
