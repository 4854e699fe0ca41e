//! The per-client-address connection limit, `[listen] max_clients_per_addr` (0 = off).
//!
//! [`AddrLimits`] counts the sessions each client IP address holds, in the proxy's shared
//! state; [`admit`] is the session's hook, called right after its `max_clients` slot is taken
//! (so CancelRequests, which never get that far, are never refused): it takes a place for the
//! address or refuses the client with 53300, as Postgres refuses one connection too many. The
//! place is given back when the returned [`AddrSlot`] drops with the session. Addresses whose
//! count falls to zero leave the map, so it holds at most one entry per open session.
//!
//! Refusals are logged through a [`Throttled`] limiter per address: the first in full, then
//! one summary line per [`SUMMARY_INTERVAL`] while they go on (every one is still counted in
//! `pgshift_clients_rejected_total`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Shared;
use crate::log_limit::{SUMMARY_INTERVAL, Throttled};
use crate::protocol::messages::ClientError;

/// Sessions held per client address.
#[derive(Debug)]
pub struct AddrLimits {
    held: Mutex<HashMap<IpAddr, usize>>,
    /// Which refusals are logged in full and which only counted, per address.
    refusals: Throttled<IpAddr>,
}

impl Default for AddrLimits {
    fn default() -> AddrLimits {
        AddrLimits {
            held: Mutex::default(),
            refusals: Throttled::new(SUMMARY_INTERVAL, log_refusals),
        }
    }
}

/// The summary line of one address's refusals that were counted, not logged.
fn log_refusals(addr: &IpAddr, count: u64, interval: Duration) {
    tracing::info!(
        reason = "max_clients_per_addr",
        client = %addr,
        refused = count,
        "clients refused: {count} more from {addr} in the last {}: too many connections from it ([listen] max_clients_per_addr)",
        humantime::format_duration(interval)
    );
}

impl AddrLimits {
    /// Takes one of `max` places for `addr`; `None` when it holds `max` already. `max == 0`
    /// means no limit: the slot counts nothing.
    pub fn try_take(&self, addr: IpAddr, max: usize) -> Option<AddrSlot<'_>> {
        if max == 0 {
            return Some(AddrSlot { taken: None });
        }
        let addr = addr.to_canonical();
        let mut held = self.lock();
        let count = held.entry(addr).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddrSlot {
            taken: Some((self, addr)),
        })
    }

    /// Sessions `addr` holds now (counted only while a limit is set).
    pub fn held_by(&self, addr: IpAddr) -> usize {
        self.lock().get(&addr.to_canonical()).copied().unwrap_or(0)
    }

    /// Addresses holding at least one counted session.
    pub fn addresses(&self) -> usize {
        self.lock().len()
    }

    fn give_back(&self, addr: IpAddr) {
        let mut held = self.lock();
        if let Some(count) = held.get_mut(&addr) {
            *count -= 1;
            if *count == 0 {
                held.remove(&addr);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Every operation is one read-modify-write of a single entry: a panic elsewhere
        // cannot leave the map half-updated.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One session's place under the per-address limit, given back on drop.
#[derive(Debug)]
pub struct AddrSlot<'a> {
    taken: Option<(&'a AddrLimits, IpAddr)>,
}

impl Drop for AddrSlot<'_> {
    fn drop(&mut self) {
        if let Some((limits, addr)) = self.taken.take() {
            limits.give_back(addr);
        }
    }
}

/// The error a client gets when its address holds `max` sessions already.
pub fn refusal(addr: IpAddr, max: usize) -> ClientError {
    ClientError::fatal(
        "53300",
        format!("sorry, too many connections from {}", addr.to_canonical()),
    )
    .with_detail(format!(
        "pgshift serves at most {max} sessions per client address ([listen] max_clients_per_addr)"
    ))
}

/// The session's hook: a place for `addr` under `max` (0 = no limit), or `None` once the
/// client was refused with 53300 (counted in `pgshift_clients_rejected_total`) and closed.
pub async fn admit<'a, S: AsyncWrite + Unpin>(
    shared: &'a Shared,
    client: &mut S,
    addr: IpAddr,
    max: usize,
) -> Option<AddrSlot<'a>> {
    if let Some(slot) = shared.addr_limits.try_take(addr, max) {
        return Some(slot);
    }
    let error = refusal(addr, max);
    metrics::counter!("pgshift_clients_rejected_total", "reason" => "max_clients_per_addr")
        .increment(1);
    if shared.addr_limits.refusals.note(addr.to_canonical()) {
        tracing::info!(
            reason = "max_clients_per_addr",
            client = %addr,
            sqlstate = error.sqlstate,
            "client refused: {}",
            error.message
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        client.write_all(&error.encode()).await?;
        client.shutdown().await
    })
    .await;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn places_are_counted_per_address_and_given_back() {
        let limits = AddrLimits::default();
        let a1 = limits.try_take(ip("10.0.0.1"), 2).expect("first");
        let a2 = limits.try_take(ip("10.0.0.1"), 2).expect("second");
        assert!(
            limits.try_take(ip("10.0.0.1"), 2).is_none(),
            "third refused"
        );
        let b1 = limits.try_take(ip("10.0.0.2"), 2).expect("another address");
        assert_eq!(limits.held_by(ip("10.0.0.1")), 2);
        assert_eq!(limits.addresses(), 2);
        drop(a1);
        let a3 = limits
            .try_take(ip("10.0.0.1"), 2)
            .expect("a place was freed");
        drop((a2, a3, b1));
        assert_eq!(limits.addresses(), 0, "no entry outlives its sessions");
    }

    #[test]
    fn zero_is_no_limit_and_counts_nothing() {
        let limits = AddrLimits::default();
        let slots: Vec<_> = (0..100)
            .map(|_| limits.try_take(ip("10.0.0.1"), 0).expect("no limit"))
            .collect();
        assert_eq!(limits.addresses(), 0);
        drop(slots);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_their_ipv4() {
        let limits = AddrLimits::default();
        let _v4 = limits.try_take(ip("192.0.2.7"), 1).expect("first");
        assert!(limits.try_take(ip("::ffff:192.0.2.7"), 1).is_none());
        let error = refusal(ip("::ffff:192.0.2.7"), 1);
        assert_eq!(error.sqlstate, "53300");
        assert!(error.message.contains("192.0.2.7"), "{}", error.message);
    }
}
