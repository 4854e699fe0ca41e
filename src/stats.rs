//! Per-color observations: sessions, requests, errors by SQLSTATE, request latency, bytes each
//! way and connect attempts, as cumulative counters.
//!
//! Everything is cumulative and lock-free on the hot path (relaxed atomics; errors, which are
//! rare, also go into a small per-color map behind a mutex). A reader that wants a sliding
//! window — the rollout monitor — takes [`ColorStats::snapshot`]s at each tick and subtracts
//! the one taken a window ago, so sessions never coordinate with each other or with the reader.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::color::Color;

/// Latency histogram: log-linear buckets over 64 ns units, 64 sub-buckets per power of two;
/// a bucket's middle is within 0.8 % of any value in it, so any latency from 50 µs to past
/// 60 s is known within 1 % (relative). 1,600 buckets: 12.5 KiB per copy.
pub struct LatencyHistogram {
    counts: Box<[AtomicU64]>,
}

const UNIT_SHIFT: u32 = 6; // 64 ns units
const SUB_BUCKET_BITS: u32 = 6;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Buckets up to 2^30 units (~68.7 s); larger values land in the last bucket.
const MAX_EXPONENT: usize = 30;
const HISTOGRAM_BUCKETS: usize =
    (MAX_EXPONENT - SUB_BUCKET_BITS as usize + 1) * SUB_BUCKETS as usize;

impl LatencyHistogram {
    fn new() -> LatencyHistogram {
        LatencyHistogram {
            counts: (0..HISTOGRAM_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The bucket a duration falls in.
    pub fn bucket_index(latency: Duration) -> usize {
        let units = (latency.as_nanos() >> UNIT_SHIFT).min(u128::from(u64::MAX)) as u64;
        if units < SUB_BUCKETS {
            return units as usize;
        }
        let exponent = 63 - units.leading_zeros(); // >= SUB_BUCKET_BITS
        let mantissa = (units >> (exponent - SUB_BUCKET_BITS)) & (SUB_BUCKETS - 1);
        let index =
            (exponent - SUB_BUCKET_BITS + 1) as usize * SUB_BUCKETS as usize + mantissa as usize;
        index.min(HISTOGRAM_BUCKETS - 1)
    }

    /// The middle of a bucket's range, as a duration.
    pub fn bucket_value(index: usize) -> Duration {
        let sub_buckets = SUB_BUCKETS as usize;
        let (low, width) = if index < sub_buckets {
            (index as u64, 1u64)
        } else {
            let exponent = (index / sub_buckets) as u32 - 1 + SUB_BUCKET_BITS;
            let mantissa = (index % sub_buckets) as u64;
            let width = 1u64 << (exponent - SUB_BUCKET_BITS);
            ((SUB_BUCKETS + mantissa) * width, width)
        };
        Duration::from_nanos((low * 2 + width) << UNIT_SHIFT >> 1)
    }

    fn record(&self, latency: Duration) {
        self.counts[Self::bucket_index(latency)].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }
}

/// Quantile (0..=1) of a histogram's bucket counts; `None` when it is empty.
pub fn quantile(counts: &[u64], q: f64) -> Option<Duration> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (index, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(LatencyHistogram::bucket_value(index));
        }
    }
    None
}

/// Cumulative observations for one color.
pub struct ColorStats {
    pub color: Color,
    sessions_open: AtomicI64,
    sessions_opened: AtomicU64,
    connect_attempts: AtomicU64,
    connect_errors: AtomicU64,
    fallbacks: AtomicU64,
    requests: AtomicU64,
    request_errors: AtomicU64,
    bytes_to_backend: AtomicU64,
    bytes_to_client: AtomicU64,
    latency: LatencyHistogram,
    errors_by_sqlstate: Mutex<HashMap<[u8; 5], u64>>,
}

/// A point-in-time copy of a color's counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ColorSnapshot {
    pub sessions_open: i64,
    pub sessions_opened: u64,
    pub connect_attempts: u64,
    pub connect_errors: u64,
    pub fallbacks: u64,
    pub requests: u64,
    pub request_errors: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub latency_counts: Vec<u64>,
    pub errors_by_sqlstate: HashMap<[u8; 5], u64>,
}

impl ColorStats {
    fn new(color: Color) -> ColorStats {
        ColorStats {
            color,
            sessions_open: AtomicI64::new(0),
            sessions_opened: AtomicU64::new(0),
            connect_attempts: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            request_errors: AtomicU64::new(0),
            bytes_to_backend: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            latency: LatencyHistogram::new(),
            errors_by_sqlstate: Mutex::new(HashMap::new()),
        }
    }

    pub fn session_opened(&self) {
        self.sessions_opened.fetch_add(1, Ordering::Relaxed);
        self.sessions_open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_closed(&self) {
        self.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn sessions_open(&self) -> i64 {
        self.sessions_open.load(Ordering::Relaxed)
    }

    pub fn connect_attempted(&self) {
        self.connect_attempts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connect_failed(&self) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A session meant for this color went to the other one because this one failed to connect.
    pub fn fell_back(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_bytes_to_backend(&self, count: usize) {
        self.bytes_to_backend
            .fetch_add(count as u64, Ordering::Relaxed);
    }

    pub fn add_bytes_to_client(&self, count: usize) {
        self.bytes_to_client
            .fetch_add(count as u64, Ordering::Relaxed);
    }

    /// One finished request: its latency (none for COPY or a lost connection) and its error.
    pub fn record_request(&self, latency: Option<Duration>, error: Option<[u8; 5]>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(latency) = latency {
            self.latency.record(latency);
        }
        if let Some(sqlstate) = error {
            self.request_errors.fetch_add(1, Ordering::Relaxed);
            let mut errors = self
                .errors_by_sqlstate
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *errors.entry(sqlstate).or_insert(0) += 1;
        }
    }

    pub fn snapshot(&self) -> ColorSnapshot {
        ColorSnapshot {
            sessions_open: self.sessions_open.load(Ordering::Relaxed),
            sessions_opened: self.sessions_opened.load(Ordering::Relaxed),
            connect_attempts: self.connect_attempts.load(Ordering::Relaxed),
            connect_errors: self.connect_errors.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            request_errors: self.request_errors.load(Ordering::Relaxed),
            bytes_to_backend: self.bytes_to_backend.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
            latency_counts: self.latency.snapshot(),
            errors_by_sqlstate: self
                .errors_by_sqlstate
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        }
    }
}

/// Proxy-wide observations: both colors, and the events that belong to no color.
pub struct Stats {
    colors: [ColorStats; 2],
    pub cancel_forwarded: AtomicU64,
    pub cancel_unknown: AtomicU64,
    pub cancel_failed: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            colors: [ColorStats::new(Color::Blue), ColorStats::new(Color::Green)],
            cancel_forwarded: AtomicU64::new(0),
            cancel_unknown: AtomicU64::new(0),
            cancel_failed: AtomicU64::new(0),
        }
    }
}

impl Stats {
    pub fn color(&self, color: Color) -> &ColorStats {
        &self.colors[color.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_within_one_percent() {
        let mut micros = 50.0f64;
        while micros < 65_000_000.0 {
            let latency = Duration::from_nanos((micros * 1000.0) as u64);
            let index = LatencyHistogram::bucket_index(latency);
            let estimate = LatencyHistogram::bucket_value(index).as_nanos() as f64;
            let error = (estimate - latency.as_nanos() as f64).abs() / latency.as_nanos() as f64;
            assert!(error < 0.01, "{micros} µs → {estimate} ns ({error})");
            micros *= 1.07;
        }
    }

    #[test]
    fn quantiles_from_counts() {
        let stats = Stats::default();
        let blue = stats.color(Color::Blue);
        for ms in 1..=100 {
            blue.record_request(Some(Duration::from_millis(ms)), None);
        }
        blue.record_request(None, Some(*b"42P01"));
        let snapshot = blue.snapshot();
        assert_eq!(snapshot.requests, 101);
        assert_eq!(snapshot.request_errors, 1);
        assert_eq!(snapshot.errors_by_sqlstate.get(b"42P01"), Some(&1));
        let p95 = quantile(&snapshot.latency_counts, 0.95).expect("p95");
        assert!((p95.as_secs_f64() - 0.095).abs() < 0.001, "{p95:?}");
        assert_eq!(quantile(&[0; 4], 0.5), None);
    }
}
