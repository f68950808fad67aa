//! The background writer (PostgreSQL's bgwriter.c and BgBufferSync): every
//! `bgwriter_delay` it writes dirty pages just ahead of the clock hand, so
//! that a foreground thread that needs a frame finds a clean one instead of
//! writing one out itself.
//!
//! How many: the recent rate of frame allocations, smoothed (up at once,
//! down slowly), times `bgwriter_lru_multiplier`, less the reusable frames
//! already known to lie ahead of the hand; at least enough to scan the whole
//! pool every two minutes; at most `bgwriter_lru_maxpages` writes a round
//! (hitting that limit counts in `maxwritten_clean`). Only frames that are
//! unpinned and have usage count 0 are written: the next ones the sweep
//! would take.

use std::sync::atomic::Ordering::*;
use std::time::Duration;

use super::buffer_pool::{WriteFilter, WriteStart};
use super::writeback::Writeback;
use super::StoreShared;

/// PostgreSQL's smoothing constant: new samples weigh 1/16.
const SMOOTHING_SAMPLES: f64 = 16.0;
/// Scan the whole pool at least this often, in ms.
const SCAN_WHOLE_POOL_MS: f64 = 120_000.0;

struct State {
    saved_valid: bool,
    prev_strategy: u64,
    next_to_clean: u64,
    prev_allocs: u64,
    smoothed_alloc: f64,
    /// Frames scanned per reusable frame found.
    smoothed_density: f64,
}

pub(crate) fn run(sh: &StoreShared) {
    let mut wb = match Writeback::new() {
        Ok(mut w) => {
            w.set_batch(16);
            w
        }
        Err(e) => {
            tracing::error!("background writer not started: {e}");
            return;
        }
    };
    let mut st = State {
        saved_valid: false,
        prev_strategy: 0,
        next_to_clean: 0,
        prev_allocs: 0,
        smoothed_alloc: 0.0,
        smoothed_density: 10.0,
    };
    loop {
        let delay = Duration::from_millis(sh.tuning.bgwriter_delay_ms.load(Relaxed));
        if !sh.ckpt.sleep_unless_shut_down(delay) {
            return;
        }
        if let Err(e) = round(sh, &mut st, &mut wb) {
            tracing::warn!("background writer: {e}");
        }
    }
}

fn round(sh: &StoreShared, st: &mut State, wb: &mut Writeback) -> Result<(), super::StoreError> {
    let pool = &sh.pool;
    let n = pool.frames() as u64;
    let strategy = pool.clock_position();
    let allocs = pool.stats.allocs.load(Relaxed);
    let recent_alloc = allocs - st.prev_allocs;
    st.prev_allocs = allocs;
    let maxpages = sh.tuning.bgwriter_lru_maxpages.load(Relaxed);
    if maxpages == 0 {
        st.saved_valid = false;
        return Ok(());
    }
    let (strategy_delta, bufs_to_lap) = if st.saved_valid {
        let delta = strategy - st.prev_strategy;
        if st.next_to_clean < strategy {
            // The hand passed us: start again at the hand.
            st.next_to_clean = strategy;
        }
        (delta, n - (st.next_to_clean - strategy).min(n))
    } else {
        st.next_to_clean = strategy;
        (0, n)
    };
    st.prev_strategy = strategy;

    if strategy_delta > 0 && recent_alloc > 0 {
        let scans_per_alloc = strategy_delta as f64 / recent_alloc as f64;
        st.smoothed_density += (scans_per_alloc - st.smoothed_density) / SMOOTHING_SAMPLES;
    }
    let bufs_ahead = n - bufs_to_lap;
    let reusable_est = bufs_ahead as f64 / st.smoothed_density;
    if st.smoothed_alloc <= recent_alloc as f64 {
        st.smoothed_alloc = recent_alloc as f64;
    } else {
        st.smoothed_alloc += (recent_alloc as f64 - st.smoothed_alloc) / SMOOTHING_SAMPLES;
    }
    let mut upcoming = st.smoothed_alloc * sh.tuning.lru_multiplier();
    let delay_ms = sh.tuning.bgwriter_delay_ms.load(Relaxed) as f64;
    let min_scan = n as f64 / (SCAN_WHOLE_POOL_MS / delay_ms);
    if upcoming < min_scan + reusable_est {
        upcoming = min_scan + reusable_est;
    }

    let mut to_scan = bufs_to_lap;
    let mut reusable = reusable_est;
    let mut written = 0u64;
    let before = wb.written;
    while to_scan > 0 && reusable < upcoming {
        let frame = (st.next_to_clean % n) as usize;
        st.next_to_clean += 1;
        to_scan -= 1;
        match wb.offer(pool, frame, WriteFilter::Reusable)? {
            WriteStart::Started { .. } => {
                written += 1;
                reusable += 1.0;
                if written >= maxpages {
                    sh.stats.maxwritten_clean.fetch_add(1, Relaxed);
                    break;
                }
            }
            WriteStart::Skipped { reusable: true } => reusable += 1.0,
            WriteStart::Skipped { reusable: false } => {}
        }
    }
    let flushed = wb.flush(pool);
    sh.stats
        .buffers_clean
        .fetch_add(wb.written - before, Relaxed);
    st.saved_valid = true;
    flushed
}
