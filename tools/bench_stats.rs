//! What both bench modes share: per-interval latency sums for progress
//! lines, the histogram, and the summary lines scripts parse by key.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latencies of one progress interval: count, sum and sum of squares (ns).
#[derive(Default)]
pub struct Interval {
    n: u64,
    sum_ns: f64,
    sum_sq: f64,
}

impl Interval {
    pub fn record(&mut self, ns: u64) {
        self.n += 1;
        self.sum_ns += ns as f64;
        self.sum_sq += (ns as f64) * (ns as f64);
    }
}

/// Sums and resets every thread's interval: (mean, stddev) in ns.
pub fn drain<'a>(intervals: impl Iterator<Item = &'a Mutex<Interval>>) -> (f64, f64) {
    let mut total = Interval::default();
    for iv in intervals {
        let mut iv = iv.lock().unwrap();
        total.n += iv.n;
        total.sum_ns += iv.sum_ns;
        total.sum_sq += iv.sum_sq;
        *iv = Interval::default();
    }
    if total.n == 0 {
        return (0.0, 0.0);
    }
    let avg = total.sum_ns / total.n as f64;
    (
        avg,
        (total.sum_sq / total.n as f64 - avg * avg).max(0.0).sqrt(),
    )
}

/// A latency histogram in ns, 1 ns to 60 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

/// The summary lines both modes print (`key: value`).
pub fn print_summary(records: u64, elapsed: f64, size: usize, hist: &Histogram<u64>) {
    let ms = |ns: f64| ns / 1e6;
    let q = |p: f64| ms(hist.value_at_quantile(p) as f64);
    println!("records: {records}");
    println!("rec/s: {:.1}", records as f64 / elapsed);
    println!("MB/s: {:.1}", records as f64 * size as f64 / elapsed / 1e6);
    println!("latency avg: {:.3} ms", ms(hist.mean()));
    println!("latency stddev: {:.3} ms", ms(hist.stdev()));
    println!("latency p50: {:.3} ms", q(0.50));
    println!("latency p99: {:.3} ms", q(0.99));
    println!("latency p99.9: {:.3} ms", q(0.999));
}

/// Splits latencies by whether a checkpoint was running when a request
/// started or finished (the bench prints both, and their ratio).
pub struct CheckpointSplit {
    pub inside: Histogram<u64>,
    pub outside: Histogram<u64>,
}

impl Default for CheckpointSplit {
    fn default() -> Self {
        CheckpointSplit {
            inside: histogram(),
            outside: histogram(),
        }
    }
}

impl CheckpointSplit {
    pub fn record(&mut self, ns: u64, during_checkpoint: bool) {
        let h = if during_checkpoint {
            &mut self.inside
        } else {
            &mut self.outside
        };
        h.saturating_record(ns.max(1));
    }

    pub fn add(&mut self, other: &CheckpointSplit) {
        self.inside.add(&other.inside).unwrap();
        self.outside.add(&other.outside).unwrap();
    }

    /// `latency outside checkpoints: …`, `latency inside checkpoints: …`
    /// (each only when it saw requests) and the ratio of their p99s, when
    /// both did.
    pub fn print(&self, checkpoints: u64) {
        let line = |what: &str, h: &Histogram<u64>| {
            println!(
                "latency {what} checkpoints: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms ({} requests)",
                h.value_at_quantile(0.5) as f64 / 1e6,
                h.value_at_quantile(0.99) as f64 / 1e6,
                h.value_at_quantile(0.999) as f64 / 1e6,
                h.len()
            )
        };
        println!("checkpoints during the run: {checkpoints}");
        // A side that saw no request has no latencies to show.
        if !self.outside.is_empty() {
            line("outside", &self.outside);
        }
        if !self.inside.is_empty() {
            line("inside", &self.inside);
        }
        if !self.inside.is_empty() && !self.outside.is_empty() {
            println!(
                "checkpoint p99 ratio (inside/outside): {:.2}",
                self.inside.value_at_quantile(0.99) as f64
                    / self.outside.value_at_quantile(0.99).max(1) as f64
            );
        }
    }
}

/// When the monitor of a run wakes: every `tick` after `started` (a
/// progress line at each, `-P`), and at the deadline (`-T`). Ticks are
/// counted from the start, not from the last wake, so that a run of
/// `-T 3 -P 1` prints three lines however late each wake is.
pub struct Ticks {
    started: Instant,
    tick: Duration,
    time: Duration,
    next: u32,
}

impl Ticks {
    pub fn new(started: Instant, tick: Duration, time: Duration) -> Ticks {
        Ticks {
            started,
            tick: tick.max(Duration::from_millis(1)),
            time,
            next: 1,
        }
    }

    /// The next wake: its instant, and whether it is a tick (else the
    /// deadline). `None` once the deadline has passed.
    pub fn next_wake(&mut self) -> Option<(Instant, bool)> {
        let deadline = self.started + self.time;
        let at = self.tick.checked_mul(self.next)?;
        // A tick that falls on the deadline (up to rounding of `-T`/`-P`
        // as floats) is still a tick.
        if at <= self.time + Duration::from_millis(1) {
            self.next += 1;
            return Some((self.started + at.min(self.time), true));
        }
        if self.tick.checked_mul(self.next - 1)? >= self.time {
            return None;
        }
        self.next = u32::MAX;
        Some((deadline, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_full_interval_gets_its_tick() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let wakes = |tick, time| {
            let mut t = Ticks::new(t0, tick, time);
            std::iter::from_fn(|| t.next_wake())
                .map(|(at, tick)| (at - t0, tick))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            wakes(s(1), s(3)),
            [(s(1), true), (s(2), true), (s(3), true)]
        );
        assert_eq!(wakes(s(2), s(3)), [(s(2), true), (s(3), false)]);
        assert_eq!(
            wakes(Duration::from_millis(500), Duration::from_secs_f64(1.0)),
            [(Duration::from_millis(500), true), (s(1), true)]
        );
    }
}
