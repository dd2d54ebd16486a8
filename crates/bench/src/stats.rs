//! Latency accounting for the fan-out scenario.
//!
//! A histogram per subscriber would cost about 100 KiB each, or 2 GB at 19k subscribers, so
//! subscribers share a fixed set of shards. Each shard is a `std::sync::Mutex`, not tokio's,
//! because it is never held across an `.await`. A receiver locks its shard once per frame,
//! not once per message. With more shards than worker threads, contention is rare.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::round3;

/// Latencies above this (in µs) are recorded as this value.
const MAX_LATENCY_US: u64 = 60_000_000;
const SHARDS: usize = 64;

/// The measured window as publisher send times `[start, end)` in ns since the UNIX epoch.
/// Until the publisher starts it is empty, so nothing counts as measured.
pub(crate) struct Window {
    start: AtomicU64,
    end: AtomicU64,
}

impl Window {
    pub(crate) fn new() -> Self {
        Window {
            start: AtomicU64::new(u64::MAX),
            end: AtomicU64::new(u64::MAX),
        }
    }

    pub(crate) fn set(&self, start_ns: u64, end_ns: u64) {
        self.end.store(end_ns, Ordering::Relaxed);
        self.start.store(start_ns, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> (u64, u64) {
        (
            self.start.load(Ordering::Relaxed),
            self.end.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn contains(&self, t: u64) -> bool {
        let (start, end) = self.get();
        t >= start && t < end
    }
}

pub(crate) struct Shard {
    latency_us: Histogram<u64>,
    /// Publications sent inside the measured window and received here.
    deliveries: u64,
    /// Publications sent during warm-up, or untimed ones.
    outside: u64,
}

impl Shard {
    /// Records one publication with send time `t`, received at `now` (both in ns since the epoch).
    pub(crate) fn record(&mut self, window: (u64, u64), t: Option<u64>, now: u64) {
        match t {
            Some(t) if t >= window.0 && t < window.1 => {
                self.deliveries += 1;
                let us = now.saturating_sub(t) / 1000;
                self.latency_us
                    .saturating_record(us.clamp(1, MAX_LATENCY_US));
            }
            _ => self.outside += 1,
        }
    }
}

pub(crate) struct Recorder {
    shards: Box<[Mutex<Shard>]>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    latency_us: new_histogram(),
                    deliveries: 0,
                    outside: 0,
                })
            })
            .collect();
        Recorder { shards }
    }

    /// The shard that connection number `i` records into.
    pub(crate) fn shard(&self, i: usize) -> &Mutex<Shard> {
        &self.shards[i % self.shards.len()]
    }

    /// (in-window deliveries, all publications received) so far. Locks every shard in turn,
    /// so poll it, don't spin on it.
    pub(crate) fn progress(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(inside, all), s| {
            let s = lock(s);
            (inside + s.deliveries, all + s.deliveries + s.outside)
        })
    }

    /// Totals across all shards: (latency histogram, in-window deliveries, other deliveries).
    pub(crate) fn merge(&self) -> (Histogram<u64>, u64, u64) {
        let mut all = new_histogram();
        let (mut inside, mut outside) = (0, 0);
        for s in self.shards.iter() {
            let s = lock(s);
            all.add(&s.latency_us)
                .expect("histograms have equal bounds");
            inside += s.deliveries;
            outside += s.outside;
        }
        (all, inside, outside)
    }
}

/// Locks a shard. A receiver that panicked while holding it leaves only counters behind,
/// and those are still worth reporting, so a poisoned lock is not an error.
pub(crate) fn lock(s: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static bounds are valid")
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Summarizes a histogram of µs samples. Returns `None` when it is empty.
pub(crate) fn summarize(h: &Histogram<u64>) -> Option<LatencySummary> {
    if h.is_empty() {
        return None;
    }
    let ms = |us: u64| round3(us as f64 / 1000.0);
    Some(LatencySummary {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 100).unwrap(); // 0.1 ms .. 100 ms
        }
        let s = summarize(&h).unwrap();
        // Three significant digits: every reading is within 0.1% of the exact value.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(s.p50, 50.0), "{s:?}");
        assert!(near(s.p90, 90.0), "{s:?}");
        assert!(near(s.p99, 99.0), "{s:?}");
        assert!(near(s.max, 100.0), "{s:?}");
    }

    #[test]
    fn empty_histogram_has_no_summary() {
        assert_eq!(summarize(&new_histogram()), None);
    }

    #[test]
    fn only_the_window_counts() {
        let r = Recorder::new();
        let window = (1_000_000_000, 2_000_000_000);
        {
            let mut s = lock(r.shard(0));
            s.record(window, Some(999_999_999), 1_500_000_000); // warm-up
            s.record(window, Some(1_000_000_000), 1_002_500_000); // 2.5 ms
            s.record(window, None, 1_500_000_000); // untimed
        }
        {
            let mut s = lock(r.shard(65));
            s.record(window, Some(1_999_999_999), 2_000_000_000); // < 1 µs: clamps to 1 µs
            s.record(window, Some(2_000_000_000), 2_000_000_001); // first ns after the window
            s.record(window, Some(1_500_000_000), 1_400_000_000); // clock skew: clamps to 1 µs
        }
        let (h, inside, outside) = r.merge();
        assert_eq!((inside, outside), (3, 3));
        assert_eq!(r.progress(), (3, 6));
        let s = summarize(&h).unwrap();
        // Readings are the top of their 3-significant-digit bucket.
        assert!((s.max - 2.5).abs() <= 0.003, "{s:?}");
        assert_eq!(s.p50, 0.001);
    }

    #[test]
    fn window_bounds() {
        let w = Window::new();
        assert!(!w.contains(5));
        w.set(10, 20);
        assert!(w.contains(10) && w.contains(19));
        assert!(!w.contains(9) && !w.contains(20));
    }
}
