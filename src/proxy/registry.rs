//! The open sessions, and the one way to end them from outside: close orders.
//!
//! Every session registers here once routed and receives orders on its own watch channel.
//! `AtIdle` asks it to close at its next idle point (shutdown, drain, session age); `Now` ends
//! it wherever it is (a hard deadline passed). Shutdown, drains and `max_session_age` all use
//! this one mechanism.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::watch;

use crate::color::Color;

/// Why pgshift is ending a session; each gives the client its own message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Shutdown,
    /// Older than `[routing] max_session_age`: closed so application pools follow the weight.
    SessionAge,
    /// The session's color is draining (`drain`, `promote`, `rollback`).
    Drain(Color),
    /// A transparent cutover with `on_timeout = "terminate"` could not wait for its
    /// transaction past `freeze_timeout`.
    FreezeTimeout,
}

impl CloseReason {
    /// The FATAL 57P01 message the client gets.
    pub fn message(self, hard_deadline: bool) -> String {
        let deadline_note = if hard_deadline {
            "; its deadline passed and the open transaction was rolled back"
        } else {
            ""
        };
        match self {
            CloseReason::Shutdown => {
                format!("terminating connection: pgshift is shutting down{deadline_note}")
            }
            CloseReason::SessionAge => format!(
                "terminating connection: the session reached pgshift's max_session_age; reconnect to be routed again{deadline_note}"
            ),
            CloseReason::Drain(color) => format!(
                "terminating connection: pgshift is draining the {color} database; reconnect to be routed to the other one{deadline_note}"
            ),
            CloseReason::FreezeTimeout => {
                "pgshift cutover: transaction exceeded freeze_timeout; it was rolled back, reconnect"
                    .to_string()
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Shutdown => "shutdown",
            CloseReason::SessionAge => "max_session_age",
            CloseReason::Drain(_) => "drain",
            CloseReason::FreezeTimeout => "freeze_timeout",
        }
    }
}

/// What a session has been told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseOrder {
    Run,
    AtIdle(CloseReason),
    Now(CloseReason),
}

#[derive(Debug)]
struct SessionEntry {
    color: Color,
    started: Instant,
    orders: watch::Sender<CloseOrder>,
    /// A walsender: outside a transparent cutover's freeze.
    walsender: bool,
}

/// A registered session's view: its id and the orders addressed to it.
#[derive(Debug)]
pub struct SessionTicket {
    pub id: u64,
    pub orders: watch::Receiver<CloseOrder>,
}

/// Every open, routed session.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<u64, SessionEntry>>,
    next_id: AtomicU64,
}

impl SessionRegistry {
    /// Adds a session; `initial` is the order in force (e.g. `AtIdle` during shutdown).
    pub fn register(&self, color: Color, initial: CloseOrder) -> SessionTicket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (sender, receiver) = watch::channel(initial);
        self.lock().insert(
            id,
            SessionEntry {
                color,
                started: Instant::now(),
                orders: sender,
                walsender: false,
            },
        );
        SessionTicket {
            id,
            orders: receiver,
        }
    }

    pub fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Sends an order to every session (of `color`, when given).
    /// An order never weakens: `AtIdle` does not replace `Now`.
    pub fn order(&self, color: Option<Color>, order: CloseOrder) -> usize {
        let sessions = self.lock();
        let mut sent = 0;
        for entry in sessions.values() {
            if color.is_some_and(|color| color != entry.color) {
                continue;
            }
            entry.orders.send_if_modified(|current| {
                let stronger = !matches!((*current, order), (CloseOrder::Now(_), _));
                if stronger && *current != order {
                    *current = order;
                    true
                } else {
                    false
                }
            });
            sent += 1;
        }
        sent
    }

    /// Orders every session that started before `cutoff` to close at its next idle point.
    pub fn order_started_before(&self, cutoff: Instant, reason: CloseReason) -> usize {
        let sessions = self.lock();
        let mut sent = 0;
        for entry in sessions.values().filter(|entry| entry.started < cutoff) {
            let changed = entry.orders.send_if_modified(|current| {
                let first = *current == CloseOrder::Run;
                if first {
                    *current = CloseOrder::AtIdle(reason);
                }
                first
            });
            sent += usize::from(changed);
        }
        sent
    }

    /// Orders at most `limit` sessions of `color` that have no order yet; returns how many.
    pub fn order_some(&self, color: Color, limit: usize, order: CloseOrder) -> usize {
        let sessions = self.lock();
        let mut sent = 0;
        for entry in sessions.values().filter(|entry| entry.color == color) {
            if sent == limit {
                break;
            }
            sent += usize::from(entry.orders.send_if_modified(|current| {
                let first = *current == CloseOrder::Run;
                if first {
                    *current = order;
                }
                first
            }));
        }
        sent
    }

    /// Withdraws `AtIdle(reason)` orders from sessions of `color` that have not acted on them.
    pub fn rescind(&self, color: Color, reason: CloseReason) -> usize {
        let sessions = self.lock();
        let mut withdrawn = 0;
        for entry in sessions.values().filter(|entry| entry.color == color) {
            withdrawn += usize::from(entry.orders.send_if_modified(|current| {
                let matches = *current == CloseOrder::AtIdle(reason);
                if matches {
                    *current = CloseOrder::Run;
                }
                matches
            }));
        }
        withdrawn
    }

    /// Sends `order` to session `id` (never weakening a `Now`).
    pub fn order_one(&self, id: u64, order: CloseOrder) {
        if let Some(entry) = self.lock().get(&id) {
            entry.orders.send_if_modified(|current| {
                let stronger = !matches!(*current, CloseOrder::Now(_));
                if stronger && *current != order {
                    *current = order;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Session `id` is a walsender: a transparent cutover does not freeze it.
    pub fn mark_walsender(&self, id: u64) {
        if let Some(entry) = self.lock().get_mut(&id) {
            entry.walsender = true;
        }
    }

    /// The ids of the sessions on `color` a transparent cutover freezes (walsenders aside).
    pub fn ids(&self, color: Color) -> Vec<u64> {
        self.lock()
            .iter()
            .filter(|(_, entry)| entry.color == color && !entry.walsender)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether session `id` is still open.
    pub fn contains(&self, id: u64) -> bool {
        self.lock().contains_key(&id)
    }

    /// Session `id` now has its backend on `color` (a transparent cutover moved it).
    pub fn recolor(&self, id: u64, color: Color) {
        if let Some(entry) = self.lock().get_mut(&id) {
            entry.color = color;
        }
    }

    /// Open sessions (of `color`, when given).
    pub fn count(&self, color: Option<Color>) -> usize {
        let sessions = self.lock();
        match color {
            None => sessions.len(),
            Some(color) => sessions
                .values()
                .filter(|entry| entry.color == color)
                .count(),
        }
    }

    /// When the oldest open session started.
    pub fn oldest_start(&self) -> Option<Instant> {
        self.lock().values().map(|entry| entry.started).min()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SessionEntry>> {
        // Every operation is one insert, remove or read: a poisoned map is still whole.
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_reach_the_right_sessions_and_never_weaken() {
        let registry = SessionRegistry::default();
        let blue = registry.register(Color::Blue, CloseOrder::Run);
        let green = registry.register(Color::Green, CloseOrder::Run);
        assert_eq!(
            registry.order(Some(Color::Green), CloseOrder::Now(CloseReason::Shutdown)),
            1
        );
        assert_eq!(
            *green.orders.borrow(),
            CloseOrder::Now(CloseReason::Shutdown)
        );
        assert_eq!(*blue.orders.borrow(), CloseOrder::Run);
        registry.order(None, CloseOrder::AtIdle(CloseReason::Shutdown));
        assert_eq!(
            *green.orders.borrow(),
            CloseOrder::Now(CloseReason::Shutdown)
        );
        assert_eq!(
            *blue.orders.borrow(),
            CloseOrder::AtIdle(CloseReason::Shutdown)
        );
        registry.unregister(blue.id);
        assert_eq!(registry.count(None), 1);
    }
}
