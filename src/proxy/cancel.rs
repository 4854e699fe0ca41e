//! The cancel table: proxy-issued cancel keys mapped to the backend that owns the session.
//!
//! A session's BackendKeyData keeps the backend's PID (applications compare it with the PID in
//! NotificationResponse) and gets a fresh secret of the same length from a CSPRNG, so that a
//! client never learns a backend's real secret and (pid, secret) stays unique across both
//! colors. A CancelRequest is looked up in O(1); an unknown key is dropped silently, as
//! Postgres does. Entries are removed when their session ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::cutover::HeldCancel;
use crate::color::Color;

/// Where a cancel for one session must go.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub color: Color,
    pub backend_addr: SocketAddr,
    pub backend_pid: i32,
    pub backend_secret: Bytes,
    pub session_id: u64,
    /// Bumped for each cancel forwarded, so the session knows its next 57014 was asked for.
    pub cancels_forwarded: Arc<AtomicU64>,
    /// Frozen by a transparent cutover: the session answers the cancel itself.
    pub held: Arc<HeldCancel>,
}

impl PartialEq for CancelTarget {
    fn eq(&self, other: &Self) -> bool {
        self.color == other.color
            && self.backend_addr == other.backend_addr
            && self.backend_pid == other.backend_pid
            && self.backend_secret == other.backend_secret
            && self.session_id == other.session_id
    }
}

/// Proxy key (backend pid, proxy secret) → the real target.
#[derive(Debug, Default)]
pub struct CancelTable {
    entries: Mutex<HashMap<(i32, Bytes), CancelTarget>>,
}

impl CancelTable {
    /// Registers a session's backend key; returns the secret to give the client instead.
    pub fn register(&self, target: CancelTarget) -> Bytes {
        let mut entries = self.lock();
        loop {
            let mut secret = vec![0u8; target.backend_secret.len()];
            rand::fill(&mut secret[..]);
            let secret = Bytes::from(secret);
            if let std::collections::hash_map::Entry::Vacant(slot) =
                entries.entry((target.backend_pid, secret.clone()))
            {
                slot.insert(target);
                return secret;
            }
        }
    }

    /// The target of a client's CancelRequest, if the key is one pgshift issued.
    pub fn lookup(&self, pid: i32, secret: &Bytes) -> Option<CancelTarget> {
        self.lock().get(&(pid, secret.clone())).cloned()
    }

    /// Points a key the client already holds at another backend (a transparent cutover
    /// moved its session).
    pub fn retarget(&self, pid: i32, secret: &Bytes, target: CancelTarget) {
        if let Some(entry) = self.lock().get_mut(&(pid, secret.clone())) {
            *entry = target;
        }
    }

    /// Forgets a session's key.
    pub fn remove(&self, pid: i32, secret: &Bytes) {
        self.lock().remove(&(pid, secret.clone()));
    }

    /// The backend PIDs of the sessions whose backend is on `color`.
    pub fn backend_pids(&self, color: Color) -> std::collections::HashSet<i32> {
        self.lock()
            .values()
            .filter(|target| target.color == color)
            .map(|target| target.backend_pid)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, Bytes), CancelTarget>> {
        // A panic while holding this lock cannot leave the map half-updated: every
        // operation is a single insert, lookup or remove.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(pid: i32, secret_len: usize) -> CancelTarget {
        CancelTarget {
            color: Color::Green,
            backend_addr: "127.0.0.1:5433".parse().expect("addr"),
            backend_pid: pid,
            backend_secret: Bytes::from(vec![1; secret_len]),
            session_id: 1,
            cancels_forwarded: Arc::default(),
            held: Arc::default(),
        }
    }

    #[test]
    fn register_lookup_remove() {
        let table = CancelTable::default();
        let secret = table.register(target(42, 4));
        assert_eq!(secret.len(), 4);
        assert_ne!(secret, Bytes::from(vec![1; 4]));
        assert_eq!(table.lookup(42, &secret).map(|t| t.backend_pid), Some(42));
        assert_eq!(table.lookup(43, &secret), None);
        let long = table.register(target(42, 32));
        assert_eq!(long.len(), 32);
        assert_eq!(table.len(), 2);
        table.remove(42, &secret);
        table.remove(42, &long);
        assert!(table.is_empty());
    }
}
