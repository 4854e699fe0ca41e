//! Keeping a repeated log line from flooding the log (docs/RELIABILITY.md, "Log
//! amplification"): the first event of a kind (a key: a refused uid, a client address) is
//! logged in full; the next ones within [`SUMMARY_INTERVAL`] of it are only counted, and their
//! count is logged in one summary line when the interval is over. While events keep coming,
//! that is one summary line per interval; after an interval without any, the next event is
//! logged in full again.
//!
//! [`LogLimiter`] is the pure state (the caller passes the time); [`Throttled`] shares one
//! between tasks and writes each summary on time, from a task that runs only while an
//! interval is open.
//!
//! The keys are not bounded here: callers key by something already bounded (the uids of the
//! admin socket's peers; client addresses that hold sessions under `max_clients_per_addr`).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the events after a logged one are counted before their summary is logged.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The first event of its key in a while: log it in full.
    First,
    /// Counted for its key's next summary: do not log it.
    Counted,
}

/// The events of one key that were counted, not logged, during one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary<K> {
    pub key: K,
    pub count: u64,
}

/// One key's open interval.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    counted: u64,
}

/// Per key: the first event logged, the others counted until their interval is over.
#[derive(Debug)]
pub struct LogLimiter<K> {
    interval: Duration,
    windows: HashMap<K, Window>,
    /// When the earliest open interval ends (`None` when none is open).
    next_end: Option<Instant>,
}

impl<K: Eq + Hash + Clone> LogLimiter<K> {
    pub fn new(interval: Duration) -> LogLimiter<K> {
        LogLimiter {
            interval,
            windows: HashMap::new(),
            next_end: None,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Records an event of `key` at `now`. Call [`LogLimiter::flush`] first, so that an
    /// interval that is over is summarized before the event counts.
    pub fn record(&mut self, key: K, now: Instant) -> Seen {
        if let Some(window) = self.windows.get_mut(&key) {
            window.counted += 1;
            return Seen::Counted;
        }
        self.windows.insert(
            key,
            Window {
                started: now,
                counted: 0,
            },
        );
        let end = now + self.interval;
        self.next_end = Some(self.next_end.map_or(end, |next| next.min(end)));
        Seen::First
    }

    /// The summaries of the intervals that are over at `now` (of keys that had events to
    /// count). A key whose events go on gets a new interval from the end of the last; a key
    /// without events for a whole interval is forgotten.
    pub fn flush(&mut self, now: Instant) -> Vec<Summary<K>> {
        if self.next_end.is_none_or(|end| now < end) {
            return Vec::new();
        }
        let interval = self.interval;
        let mut summaries = Vec::new();
        let mut next_end: Option<Instant> = None;
        self.windows.retain(|key, window| {
            let mut end = window.started + interval;
            if now >= end {
                if window.counted == 0 {
                    return false;
                }
                summaries.push(Summary {
                    key: key.clone(),
                    count: window.counted,
                });
                if now >= end + interval {
                    // Nothing can have come since: events come only after a flush.
                    return false;
                }
                *window = Window {
                    started: end,
                    counted: 0,
                };
                end += interval;
            }
            next_end = Some(next_end.map_or(end, |next| next.min(end)));
            true
        });
        self.next_end = next_end;
        summaries
    }

    /// When the earliest open interval ends: when [`LogLimiter::flush`] has work to do.
    pub fn next_flush(&self) -> Option<Instant> {
        self.next_end
    }
}

/// Writes one summary line: the key, how many events were counted, over which interval.
pub type Summarize<K> = fn(&K, u64, Duration);

/// A [`LogLimiter`] shared between tasks whose summaries are written on time: while an
/// interval is open, a task on the current tokio runtime sleeps until it ends and hands each
/// summary to the `summarize` function.
#[derive(Debug)]
pub struct Throttled<K> {
    state: Arc<Mutex<ThrottledState<K>>>,
    summarize: Summarize<K>,
}

#[derive(Debug)]
struct ThrottledState<K> {
    limiter: LogLimiter<K>,
    /// A task is waiting for the next interval to end.
    flushing: bool,
}

impl<K: Eq + Hash + Clone + Send + 'static> Throttled<K> {
    pub fn new(interval: Duration, summarize: Summarize<K>) -> Throttled<K> {
        Throttled {
            state: Arc::new(Mutex::new(ThrottledState {
                limiter: LogLimiter::new(interval),
                flushing: false,
            })),
            summarize,
        }
    }

    /// Notes an event of `key` now: `true` when it is to be logged in full, `false` when it
    /// was counted for a summary.
    pub fn note(&self, key: K) -> bool {
        let now = Instant::now();
        let (seen, due, interval) = {
            let mut state = lock(&self.state);
            let due = state.limiter.flush(now);
            let seen = state.limiter.record(key, now);
            if !state.flushing
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                state.flushing = true;
                runtime.spawn(flush_on_time(Arc::clone(&self.state), self.summarize));
            }
            (seen, due, state.limiter.interval())
        };
        for summary in due {
            (self.summarize)(&summary.key, summary.count, interval);
        }
        seen == Seen::First
    }
}

/// Writes the summaries as their intervals end, until none is open.
async fn flush_on_time<K: Eq + Hash + Clone>(
    state: Arc<Mutex<ThrottledState<K>>>,
    summarize: Summarize<K>,
) {
    loop {
        let next = {
            let mut state = lock(&state);
            match state.limiter.next_flush() {
                Some(next) => next,
                None => {
                    state.flushing = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next.into()).await;
        let (due, interval) = {
            let mut state = lock(&state);
            (
                state.limiter.flush(Instant::now()),
                state.limiter.interval(),
            )
        };
        for summary in due {
            summarize(&summary.key, summary.count, interval);
        }
    }
}

fn lock<K>(state: &Mutex<ThrottledState<K>>) -> std::sync::MutexGuard<'_, ThrottledState<K>> {
    // Each operation leaves the limiter whole: a panic elsewhere cannot break it.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(10);

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn the_first_event_is_logged_the_rest_counted_then_summarized() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(INTERVAL);
        assert_eq!(limiter.record("uid 7", start), Seen::First);
        assert_eq!(limiter.next_flush(), Some(at(start, 10_000)));
        for millis in [1, 500, 9_999] {
            assert!(limiter.flush(at(start, millis)).is_empty());
            assert_eq!(limiter.record("uid 7", at(start, millis)), Seen::Counted);
        }
        assert_eq!(
            limiter.flush(at(start, 10_000)),
            vec![Summary {
                key: "uid 7",
                count: 3,
            }]
        );
    }

    #[test]
    fn a_flood_gets_one_summary_per_interval() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(INTERVAL);
        let mut logged = 0;
        let mut summarized = Vec::new();
        // 4,000 events a second for 35 s.
        for tick in 0..35 * 4_000 {
            let now = at(start, tick / 4);
            summarized.extend(limiter.flush(now).into_iter().map(|summary| summary.count));
            if limiter.record(1u32, now) == Seen::First {
                logged += 1;
            }
        }
        assert_eq!(logged, 1);
        assert_eq!(summarized, vec![39_999, 40_000, 40_000]);
        // After the flood, the last interval's count, then nothing.
        assert_eq!(
            limiter.flush(at(start, 40_000)),
            vec![Summary {
                key: 1,
                count: 20_000,
            }]
        );
        assert_eq!(limiter.next_flush(), Some(at(start, 50_000)));
        assert!(limiter.flush(at(start, 50_000)).is_empty());
        assert_eq!(limiter.next_flush(), None);
        assert_eq!(limiter.record(1, at(start, 50_001)), Seen::First);
    }

    #[test]
    fn a_single_event_is_forgotten_after_its_interval() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(INTERVAL);
        assert_eq!(limiter.record('a', start), Seen::First);
        assert!(limiter.flush(at(start, 10_000)).is_empty());
        assert_eq!(limiter.next_flush(), None);
        assert_eq!(limiter.record('a', at(start, 10_001)), Seen::First);
    }

    #[test]
    fn a_late_flush_summarizes_and_forgets() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(INTERVAL);
        limiter.record('a', start);
        limiter.record('a', at(start, 1));
        assert_eq!(
            limiter.flush(at(start, 60_000)),
            vec![Summary { key: 'a', count: 1 }]
        );
        assert_eq!(limiter.next_flush(), None);
        assert_eq!(limiter.record('a', at(start, 60_000)), Seen::First);
    }

    #[test]
    fn keys_are_limited_apart() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(INTERVAL);
        assert_eq!(limiter.record(1, start), Seen::First);
        assert_eq!(limiter.record(1, at(start, 1)), Seen::Counted);
        assert_eq!(limiter.record(2, at(start, 5_000)), Seen::First);
        assert_eq!(limiter.record(2, at(start, 5_001)), Seen::Counted);
        assert_eq!(limiter.record(2, at(start, 5_002)), Seen::Counted);
        assert_eq!(limiter.next_flush(), Some(at(start, 10_000)));
        assert_eq!(
            limiter.flush(at(start, 10_000)),
            vec![Summary { key: 1, count: 1 }]
        );
        assert_eq!(limiter.next_flush(), Some(at(start, 15_000)));
        assert_eq!(
            limiter.flush(at(start, 15_000)),
            vec![Summary { key: 2, count: 2 }]
        );
    }

    static SUMMARIES: Mutex<Vec<(u32, u64)>> = Mutex::new(Vec::new());

    fn keep(key: &u32, count: u64, interval: Duration) {
        assert_eq!(interval, Duration::from_millis(100));
        SUMMARIES.lock().unwrap().push((*key, count));
    }

    #[tokio::test]
    async fn throttled_writes_the_summary_when_the_interval_ends() {
        let throttled = Throttled::new(Duration::from_millis(100), keep);
        assert!(throttled.note(9));
        for _ in 0..5 {
            assert!(!throttled.note(9));
        }
        assert!(SUMMARIES.lock().unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(*SUMMARIES.lock().unwrap(), vec![(9, 5)]);
        assert!(
            throttled.note(9),
            "logged in full again after a quiet interval"
        );
    }
}
