//! The live view while the probe runs, on stderr: redrawn in place once a second on a
//! terminal (ops/s, errors, drops, the longest stall so far, a throughput sparkline), one plain
//! line per second otherwise (logs, CI). The final report goes to stdout, so it stays clean.
//!
//! Sessions publish what the view needs through [`LiveCounters`] (relaxed atomics); the line
//! itself is built by pure functions ([`format_line`], [`sparkline`]).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Sparkline characters, lowest to highest.
const SPARK_LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
/// Seconds of throughput the sparkline shows.
const SPARK_WIDTH: usize = 20;
/// How often the view is redrawn.
const REFRESH: Duration = Duration::from_secs(1);

/// Counters the sessions update and the view reads.
pub struct LiveCounters {
    pub operations: AtomicU64,
    pub errors: AtomicU64,
    pub dropped: AtomicU64,
    /// The longest gap between two successes that has ended, in milliseconds.
    pub longest_stall_ms: AtomicU64,
    /// Per session: its last success, in milliseconds from the start of the run.
    pub last_success_ms: Vec<AtomicU64>,
}

impl LiveCounters {
    pub fn new(clients: usize) -> LiveCounters {
        LiveCounters {
            operations: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            longest_stall_ms: AtomicU64::new(0),
            last_success_ms: (0..clients).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A session succeeded at `at_ms` after a gap of `gap_ms`.
    pub fn success(&self, client: usize, at_ms: u64, gap_ms: u64) {
        self.operations.fetch_add(1, Ordering::Relaxed);
        self.longest_stall_ms.fetch_max(gap_ms, Ordering::Relaxed);
        if let Some(last) = self.last_success_ms.get(client) {
            last.store(at_ms, Ordering::Relaxed);
        }
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, `now_ms` from the start of the run (gaps still open count too).
    pub fn sample(&self, now_ms: u64) -> LiveSample {
        let open_gap = self
            .last_success_ms
            .iter()
            .map(|last| now_ms.saturating_sub(last.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0);
        LiveSample {
            elapsed_ms: now_ms,
            operations: self.operations.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            longest_stall_ms: open_gap.max(self.longest_stall_ms.load(Ordering::Relaxed)),
        }
    }
}

/// One reading of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveSample {
    pub elapsed_ms: u64,
    pub operations: u64,
    pub errors: u64,
    pub dropped: u64,
    pub longest_stall_ms: u64,
}

/// Throughput as a row of block characters scaled to the largest value.
pub fn sparkline(values: &[u64]) -> String {
    let highest = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|&value| {
            let top = SPARK_LEVELS.len() as u64 - 1;
            let level = (value * top + highest / 2)
                .checked_div(highest)
                .unwrap_or(0)
                .min(top);
            SPARK_LEVELS[level as usize]
        })
        .collect()
}

/// The view's line: time, ops/s over the last interval, totals, the longest stall so far and
/// the sparkline.
pub fn format_line(
    previous: &LiveSample,
    current: &LiveSample,
    total_ms: u64,
    spark: &str,
) -> String {
    let interval_ms = current
        .elapsed_ms
        .saturating_sub(previous.elapsed_ms)
        .max(1);
    let per_second =
        current.operations.saturating_sub(previous.operations) as f64 * 1000.0 / interval_ms as f64;
    format!(
        "probe {:>5.1}s/{:.0}s  {:>7.1} ops/s  ops {}  errors {}  dropped {}  longest stall {:.2}s  {}",
        current.elapsed_ms as f64 / 1000.0,
        total_ms as f64 / 1000.0,
        per_second,
        current.operations,
        current.errors,
        current.dropped,
        current.longest_stall_ms as f64 / 1000.0,
        spark
    )
}

/// Draws the view until `stop` turns true.
pub async fn run_live_view(
    counters: Arc<LiveCounters>,
    started: Instant,
    total: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let on_terminal = std::io::stderr().is_terminal();
    let total_ms = total.as_millis() as u64;
    let mut ticker = tokio::time::interval_at(started + REFRESH, REFRESH);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = LiveSample::default();
    let mut throughput: Vec<u64> = Vec::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
        let current = counters.sample(started.elapsed().as_millis() as u64);
        throughput.push(current.operations.saturating_sub(previous.operations));
        if throughput.len() > SPARK_WIDTH {
            throughput.remove(0);
        }
        let line = format_line(&previous, &current, total_ms, &sparkline(&throughput));
        previous = current;
        let mut stderr = std::io::stderr().lock();
        let _ = if on_terminal {
            write!(stderr, "\r\x1b[2K{line}")
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
    }
    if on_terminal && previous.elapsed_ms > 0 {
        let _ = writeln!(std::io::stderr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sparkline_scales_to_the_busiest_second() {
        assert_eq!(sparkline(&[0, 50, 100]), "▁▅█");
        assert_eq!(sparkline(&[0, 0]), "▁▁");
        assert_eq!(sparkline(&[]), "");
        assert_eq!(sparkline(&[7, 7, 7]), "███");
    }

    #[test]
    fn the_line_shows_the_rate_of_the_last_interval_and_the_totals() {
        let previous = LiveSample {
            elapsed_ms: 1_000,
            operations: 100,
            ..LiveSample::default()
        };
        let current = LiveSample {
            elapsed_ms: 2_000,
            operations: 180,
            errors: 3,
            dropped: 1,
            longest_stall_ms: 1_250,
        };
        let line = format_line(&previous, &current, 60_000, "▁█");
        assert!(line.contains("80.0 ops/s"), "{line}");
        assert!(line.contains("ops 180"), "{line}");
        assert!(line.contains("errors 3"), "{line}");
        assert!(line.contains("dropped 1"), "{line}");
        assert!(line.contains("longest stall 1.25s"), "{line}");
        assert!(line.contains("2.0s/60s"), "{line}");
        assert!(line.ends_with("▁█"), "{line}");
    }

    #[test]
    fn a_gap_still_open_counts_as_the_longest_stall_so_far() {
        let counters = LiveCounters::new(2);
        counters.success(0, 900, 100);
        counters.success(1, 300, 300);
        let sample = counters.sample(1_000);
        assert_eq!(sample.operations, 2);
        assert_eq!(sample.longest_stall_ms, 700);
    }
}
