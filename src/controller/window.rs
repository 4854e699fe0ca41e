//! Sliding windows over the cumulative per-color counters: what `status` and the rollout
//! triggers read.
//!
//! The window keeps a ring of snapshots taken at a fixed sampling interval; the figures for
//! the last `window` are the newest snapshot minus the oldest one still inside the window.
//! Sessions never see any of this: they only bump cumulative atomics.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::color::Color;
use crate::stats::{ColorSnapshot, Stats, quantile};

/// Snapshots kept per window: the window's resolution is `window / SAMPLES_PER_WINDOW`.
const SAMPLES_PER_WINDOW: u32 = 24;

/// One color's figures over a window.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WindowFigures {
    /// Sessions open now (a gauge, not windowed).
    pub sessions: i64,
    pub requests: u64,
    pub errors: u64,
    pub connect_attempts: u64,
    pub connect_errors: u64,
    pub latency_p50: Option<Duration>,
    pub latency_p95: Option<Duration>,
    pub latency_p99: Option<Duration>,
    /// The requests' latency histogram over the window (bucket counts).
    pub latency_counts: Vec<u64>,
    /// Errors by SQLSTATE over the window.
    pub errors_by_sqlstate: HashMap<[u8; 5], u64>,
}

impl WindowFigures {
    /// Errors per request; `None` without requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// Connect errors per attempt; `None` without attempts.
    pub fn connect_error_rate(&self) -> Option<f64> {
        (self.connect_attempts > 0)
            .then(|| self.connect_errors as f64 / self.connect_attempts as f64)
    }

    fn between(older: &ColorSnapshot, newer: &ColorSnapshot) -> WindowFigures {
        let latency_counts: Vec<u64> = newer
            .latency_counts
            .iter()
            .zip(&older.latency_counts)
            .map(|(new, old)| new.saturating_sub(*old))
            .collect();
        WindowFigures {
            sessions: newer.sessions_open,
            requests: newer.requests.saturating_sub(older.requests),
            errors: newer.request_errors.saturating_sub(older.request_errors),
            connect_attempts: newer
                .connect_attempts
                .saturating_sub(older.connect_attempts),
            connect_errors: newer.connect_errors.saturating_sub(older.connect_errors),
            latency_p50: quantile(&latency_counts, 0.50),
            latency_p95: quantile(&latency_counts, 0.95),
            latency_p99: quantile(&latency_counts, 0.99),
            latency_counts,
            errors_by_sqlstate: newer
                .errors_by_sqlstate
                .iter()
                .map(|(code, count)| {
                    let before = older.errors_by_sqlstate.get(code).copied().unwrap_or(0);
                    (*code, count.saturating_sub(before))
                })
                .filter(|(_, count)| *count > 0)
                .collect(),
        }
    }
}

/// A ring of snapshots of both colors.
#[derive(Debug)]
pub struct StatsWindow {
    window: Duration,
    samples: VecDeque<(Instant, [ColorSnapshot; 2])>,
}

impl StatsWindow {
    pub fn new(window: Duration) -> StatsWindow {
        StatsWindow {
            window,
            samples: VecDeque::new(),
        }
    }

    /// How often [`StatsWindow::sample`] should be called.
    pub fn sampling_interval(&self) -> Duration {
        (self.window / SAMPLES_PER_WINDOW).max(Duration::from_millis(100))
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Changes the window's length (config reload); old samples are kept as far as they reach.
    pub fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    /// Takes a snapshot now and forgets those older than the window needs.
    pub fn sample(&mut self, stats: &Stats, now: Instant) {
        let snapshot = [
            stats.color(Color::Blue).snapshot(),
            stats.color(Color::Green).snapshot(),
        ];
        self.samples.push_back((now, snapshot));
        // Keep one sample at or before the window's start, so the window is covered whole.
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
    }

    /// The figures for `color` over the window ending at the latest sample, and how much
    /// time they cover (shorter than the window right after a start).
    pub fn figures(&self, color: Color) -> (WindowFigures, Duration) {
        match (self.samples.front(), self.samples.back()) {
            (Some((start, older)), Some((end, newer))) => (
                WindowFigures::between(&older[color.index()], &newer[color.index()]),
                end.duration_since(*start),
            ),
            _ => (WindowFigures::default(), Duration::ZERO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_cover_the_window_only() {
        let stats = Stats::default();
        let mut window = StatsWindow::new(Duration::from_secs(10));
        let t0 = Instant::now();
        window.sample(&stats, t0);
        for _ in 0..5 {
            stats
                .color(Color::Green)
                .record_request(Some(Duration::from_millis(4)), Some(*b"42P01"));
        }
        window.sample(&stats, t0 + Duration::from_secs(5));
        for _ in 0..10 {
            stats
                .color(Color::Green)
                .record_request(Some(Duration::from_millis(8)), None);
        }
        window.sample(&stats, t0 + Duration::from_secs(12));
        let (figures, covered) = window.figures(Color::Green);
        // The first sample fell out: only what happened after t0 + 5 s remains... plus the
        // sample at the window's start (t0 + 5 s is 7 s before the end, inside the window).
        assert_eq!(covered, Duration::from_secs(12));
        assert_eq!(figures.requests, 15);
        window.sample(&stats, t0 + Duration::from_secs(16));
        let (figures, covered) = window.figures(Color::Green);
        assert_eq!(covered, Duration::from_secs(11));
        assert_eq!((figures.requests, figures.errors), (10, 0));
        let p95 = figures.latency_p95.expect("p95");
        assert!((p95.as_secs_f64() - 0.008).abs() < 0.0001, "{p95:?}");
        assert_eq!(figures.error_rate(), Some(0.0));
        assert_eq!(window.figures(Color::Blue).0.error_rate(), None);
    }
}
