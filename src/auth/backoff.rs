//! Backing off failed logins per (client address, user).
//!
//! Each failure's reply is delayed by `failure_backoff` × 2^(n−1) for the n-th failure in a
//! row of that pair, at most [`MAX_FACTOR`] × `failure_backoff`; a success forgets the pair,
//! and so does a quiet spell of twice the longest delay. Only the failure reply waits: no
//! other session, and no success, is slowed down. The table is bounded: past
//! [`MAX_TRACKED`] pairs, stale ones are dropped first, and new pairs get the first delay
//! without being remembered.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest delay, as a multiple of `failure_backoff`.
pub const MAX_FACTOR: u32 = 16;
/// Pairs remembered at most.
pub const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Failed logins by (client address, user).
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<(IpAddr, String), Failures>>,
}

/// The delay of the `count`-th failure in a row (1-based).
pub fn delay_for(base: Duration, count: u32) -> Duration {
    let factor = 1u32 << count.clamp(1, 5).saturating_sub(1);
    base.saturating_mul(factor.min(MAX_FACTOR))
}

impl Backoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(IpAddr, String), Failures>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a failure at `now` and returns how long its reply waits (zero when `base` is).
    pub fn failure(&self, base: Duration, client: IpAddr, user: &str, now: Instant) -> Duration {
        if base.is_zero() {
            return Duration::ZERO;
        }
        let forget_after = base.saturating_mul(2 * MAX_FACTOR);
        let mut failures = self.lock();
        let key = (client, user.to_string());
        if !failures.contains_key(&key) && failures.len() >= MAX_TRACKED {
            failures.retain(|_, entry| now.saturating_duration_since(entry.last) < forget_after);
            if failures.len() >= MAX_TRACKED {
                return delay_for(base, 1);
            }
        }
        let entry = failures.entry(key).or_insert(Failures {
            count: 0,
            last: now,
        });
        if now.saturating_duration_since(entry.last) >= forget_after {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        delay_for(base, entry.count)
    }

    /// A successful login forgets the pair's failures.
    pub fn success(&self, client: IpAddr, user: &str) {
        let mut failures = self.lock();
        if !failures.is_empty() {
            failures.remove(&(client, user.to_string()));
        }
    }

    /// Pairs remembered now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(100);

    fn client(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn delays_double_up_to_the_cap_and_reset_on_success() {
        let backoff = Backoff::default();
        let now = Instant::now();
        let delays: Vec<u128> = (0..7)
            .map(|_| backoff.failure(BASE, client(1), "app", now).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 1600, 1600]);
        // Another user or another address is another pair.
        assert_eq!(backoff.failure(BASE, client(1), "other", now), BASE);
        assert_eq!(backoff.failure(BASE, client(2), "app", now), BASE);
        backoff.success(client(1), "app");
        assert_eq!(backoff.failure(BASE, client(1), "app", now), BASE);
    }

    #[test]
    fn a_quiet_spell_forgets_and_zero_disables() {
        let backoff = Backoff::default();
        let now = Instant::now();
        backoff.failure(BASE, client(1), "app", now);
        backoff.failure(BASE, client(1), "app", now);
        let later = now + BASE * 2 * MAX_FACTOR;
        assert_eq!(backoff.failure(BASE, client(1), "app", later), BASE);
        assert_eq!(
            backoff.failure(Duration::ZERO, client(3), "app", now),
            Duration::ZERO
        );
        assert_eq!(backoff.tracked(), 1);
    }
}
