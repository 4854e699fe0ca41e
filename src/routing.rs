//! Which color serves a new session: the routing table, pins, drains and the weighted split.
//!
//! The table is immutable and published through an [`ArcSwap`]: sessions load it without a
//! lock, and the one writer (the controller) swaps in a new table on every change.
//!
//! Order of precedence for a session: a walsender follows `[routing] replication`; then the
//! first pin whose every given key matches; then the weight. A draining color never receives a
//! new session: its share, pins included, goes to the other color.
//!
//! The weight decides by bucket: `bucket = stable_hash(sticky key) % 10_000`, and the session
//! goes green iff `bucket < green_weight_bp`. Raising the weight therefore only moves keys from
//! blue to green, and every pgshift process computes the same bucket for the same key.
//! `stable_hash` is FNV-1a (64-bit) followed by the SplitMix64 finalizer, both fixed here in
//! code (not `std`'s hasher, whose output may change between Rust versions): never change it,
//! or sticky keys move colors on upgrade. Without a sticky key (`sticky = "none"`, or the key is
//! absent) the bucket is drawn at random per session from a counter-based generator: lock-free,
//! and reproducible when a seed is given (tests).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::color::Color;
use crate::config::{PinConfig, ReplicationPolicy, RoutingConfig, StickyMode};
use crate::protocol::startup::StartupFacts;

/// Buckets in the weight space: one per basis point.
pub const BUCKETS: u64 = 10_000;

/// A routing pin: every key given must match the session's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub color: Color,
}

impl Pin {
    /// True when every key this pin gives equals the session's.
    pub fn matches(&self, facts: &StartupFacts) -> bool {
        fn key_matches(wanted: &Option<String>, actual: Option<&str>) -> bool {
            wanted
                .as_deref()
                .is_none_or(|wanted| actual == Some(wanted))
        }
        key_matches(&self.database, Some(&facts.database))
            && key_matches(&self.user, Some(&facts.user))
            && key_matches(&self.application_name, facts.application_name.as_deref())
            && key_matches(&self.tenant, facts.tenant.as_deref())
    }
}

impl From<&PinConfig> for Pin {
    fn from(pin: &PinConfig) -> Pin {
        Pin {
            database: pin.database.clone(),
            user: pin.user.clone(),
            application_name: pin.application_name.clone(),
            tenant: pin.tenant.clone(),
            color: pin.color,
        }
    }
}

/// Everything a routing decision reads; replaced whole on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTable {
    /// Green's share of new sessions in basis points (0..=10000).
    pub green_weight_bp: u16,
    pub sticky: StickyMode,
    pub pins: Vec<Pin>,
    /// Indexed by [`Color::index`]: no new sessions go to a draining color.
    pub draining: [bool; 2],
    pub replication: ReplicationPolicy,
}

impl RoutingTable {
    /// The table the config describes, with nothing draining.
    pub fn from_config(routing: &RoutingConfig) -> RoutingTable {
        RoutingTable {
            green_weight_bp: routing.green_weight_bp,
            sticky: routing.sticky,
            pins: routing.pins.iter().map(Pin::from).collect(),
            draining: [false, false],
            replication: routing.replication,
        }
    }

    pub fn is_draining(&self, color: Color) -> bool {
        self.draining[color.index()]
    }
}

/// Why a session went where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// Walsender sessions follow `[routing] replication`.
    Walsender,
    /// The pin at this index in the table matched.
    Pin(usize),
    /// The weighted split, with the session's bucket.
    Weight { bucket: u16, sticky: bool },
}

/// A routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub color: Color,
    pub reason: RouteReason,
    /// The decision's color was draining, so the session went to the other one.
    pub redirected_from_drain: bool,
}

impl Route {
    /// Only sessions placed by the weight may fall back to blue when green cannot be reached.
    pub fn may_fall_back(&self) -> bool {
        matches!(self.reason, RouteReason::Weight { .. })
    }
}

/// A session that routing refuses outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteRefusal {
    #[error(
        "replication connections are not accepted through pgshift ([routing] replication = \"reject\")"
    )]
    ReplicationRejected,
    #[error("replication connections go to blue, and blue is draining")]
    ReplicationTargetDraining,
}

/// The routing table behind an `ArcSwap`, plus the random draws for non-sticky sessions.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<RoutingTable>,
    draw_seed: u64,
    draws: AtomicU64,
}

impl Router {
    /// A router; `seed` makes the non-sticky draws reproducible (tests), else a random seed.
    pub fn new(table: RoutingTable, seed: Option<u64>) -> Router {
        Router {
            table: ArcSwap::from_pointee(table),
            draw_seed: seed.unwrap_or_else(rand::random),
            draws: AtomicU64::new(0),
        }
    }

    /// The table in force now.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Publishes a new table; sessions that start afterwards see it.
    pub fn publish(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }

    /// Picks the color for a new session.
    pub fn route(&self, facts: &StartupFacts) -> Result<Route, RouteRefusal> {
        let table = self.table.load();
        if facts.walsender.is_some() {
            return match table.replication {
                ReplicationPolicy::Reject => Err(RouteRefusal::ReplicationRejected),
                ReplicationPolicy::Blue if table.is_draining(Color::Blue) => {
                    Err(RouteRefusal::ReplicationTargetDraining)
                }
                ReplicationPolicy::Blue => Ok(Route {
                    color: Color::Blue,
                    reason: RouteReason::Walsender,
                    redirected_from_drain: false,
                }),
            };
        }
        let (color, reason) = match table.pins.iter().position(|pin| pin.matches(facts)) {
            Some(index) => (table.pins[index].color, RouteReason::Pin(index)),
            None => {
                let (bucket, sticky) = match sticky_key(table.sticky, facts) {
                    Some(key) => (bucket_of(key.as_bytes()), true),
                    None => (self.draw_bucket(), false),
                };
                let color = if bucket < table.green_weight_bp {
                    Color::Green
                } else {
                    Color::Blue
                };
                (color, RouteReason::Weight { bucket, sticky })
            }
        };
        let redirected_from_drain = table.is_draining(color);
        Ok(Route {
            color: if redirected_from_drain {
                color.other()
            } else {
                color
            },
            reason,
            redirected_from_drain,
        })
    }

    fn draw_bucket(&self) -> u16 {
        let draw = self.draws.fetch_add(1, Ordering::Relaxed);
        let mixed = splitmix64(self.draw_seed.wrapping_add(draw.wrapping_mul(GOLDEN_GAMMA)));
        (mixed % BUCKETS) as u16
    }
}

/// The session's key for the configured sticky mode; `None` for `none` or an absent key.
pub fn sticky_key(mode: StickyMode, facts: &StartupFacts) -> Option<String> {
    match mode {
        StickyMode::None => None,
        StickyMode::ClientAddr => facts.client_addr.map(|addr| addr.to_string()),
        StickyMode::User => Some(facts.user.clone()),
        StickyMode::Database => Some(facts.database.clone()),
        StickyMode::ApplicationName => facts.application_name.clone(),
        StickyMode::Tenant => facts.tenant.clone(),
    }
}

/// The bucket (0..10000) of a sticky key. Stable across processes, platforms and versions.
pub fn bucket_of(key: &[u8]) -> u16 {
    (stable_hash(key) % BUCKETS) as u16
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// FNV-1a 64 of the key, finalized with SplitMix64 so that every bit of the key reaches the
/// low digits the bucket is taken from.
pub fn stable_hash(key: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in key {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    splitmix64(hash)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(user: &str, database: &str, tenant: Option<&str>) -> StartupFacts {
        StartupFacts {
            user: user.into(),
            database: database.into(),
            application_name: None,
            tenant: tenant.map(str::to_string),
            client_addr: None,
            walsender: None,
        }
    }

    fn table(weight_bp: u16, sticky: StickyMode) -> RoutingTable {
        RoutingTable {
            green_weight_bp: weight_bp,
            sticky,
            pins: Vec::new(),
            draining: [false, false],
            replication: ReplicationPolicy::Blue,
        }
    }

    #[test]
    fn hash_is_pinned_forever() {
        // These values are part of the product: changing them moves sticky keys on upgrade.
        assert_eq!(stable_hash(b""), splitmix64(FNV_OFFSET_BASIS));
        assert_eq!(bucket_of(b"tenant-1"), bucket_of(b"tenant-1"));
        let pinned: Vec<u16> = ["alice", "bob", "10.0.0.1", "tenant_42"]
            .iter()
            .map(|key| bucket_of(key.as_bytes()))
            .collect();
        assert_eq!(pinned, EXPECTED_BUCKETS);
    }
    // Computed independently (Python) from the definition above.
    const EXPECTED_BUCKETS: [u16; 4] = [1941, 8156, 8426, 3597];

    #[test]
    fn raising_the_weight_only_moves_keys_to_green() {
        let keys: Vec<String> = (0..2000).map(|i| format!("user{i}")).collect();
        let router = Router::new(table(0, StickyMode::User), Some(1));
        let mut previous: Vec<Color> = vec![Color::Blue; keys.len()];
        for weight in (0..=10_000).step_by(500) {
            router.publish(table(weight, StickyMode::User));
            for (key, before) in keys.iter().zip(previous.iter_mut()) {
                let now = router.route(&facts(key, "db", None)).expect("route").color;
                assert!(
                    !(*before == Color::Green && now == Color::Blue),
                    "{key} moved back"
                );
                *before = now;
            }
        }
        assert!(previous.iter().all(|color| *color == Color::Green));
    }

    #[test]
    fn pins_then_drains() {
        let mut routing = table(10_000, StickyMode::None);
        routing.pins.push(Pin {
            database: Some("tenant_42".into()),
            user: Some("alice".into()),
            application_name: None,
            tenant: None,
            color: Color::Blue,
        });
        let router = Router::new(routing.clone(), Some(7));
        let pinned = router
            .route(&facts("alice", "tenant_42", None))
            .expect("route");
        assert_eq!(
            (pinned.color, pinned.reason),
            (Color::Blue, RouteReason::Pin(0))
        );
        // One key of a two-key pin is not enough.
        let unpinned = router
            .route(&facts("bob", "tenant_42", None))
            .expect("route");
        assert_eq!(unpinned.color, Color::Green);
        routing.draining = [true, false];
        router.publish(routing);
        let drained = router
            .route(&facts("alice", "tenant_42", None))
            .expect("route");
        assert_eq!(drained.color, Color::Green);
        assert!(drained.redirected_from_drain);
    }

    #[test]
    fn walsenders_follow_the_replication_policy() {
        let mut walsender = facts("rep", "db", None);
        walsender.walsender = Some(crate::protocol::startup::WalSender::Logical);
        let router = Router::new(table(10_000, StickyMode::None), None);
        assert_eq!(router.route(&walsender).expect("route").color, Color::Blue);
        let mut rejecting = table(10_000, StickyMode::None);
        rejecting.replication = ReplicationPolicy::Reject;
        router.publish(rejecting);
        assert_eq!(
            router.route(&walsender),
            Err(RouteRefusal::ReplicationRejected)
        );
    }

    #[test]
    fn seeded_draws_repeat() {
        let first = Router::new(table(3000, StickyMode::None), Some(42));
        let second = Router::new(table(3000, StickyMode::None), Some(42));
        let colors = |router: &Router| -> Vec<Color> {
            (0..100)
                .map(|_| router.route(&facts("u", "d", None)).expect("route").color)
                .collect()
        };
        assert_eq!(colors(&first), colors(&second));
    }
}
