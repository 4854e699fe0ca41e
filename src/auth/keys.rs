//! The credentials recovered from clients' logins, held in memory while their user has a
//! session and zeroed when the user's last session ends.
//!
//! A SCRAM login gives pgshift the client's ClientKey (the md5 flow, with `allow_md5`, uses the
//! stored md5 hash): enough to log in to any backend that stores the same verifier, and so a
//! password equivalent. It is never written anywhere; each session holds a [`KeyLease`] on its
//! user's entry, and the entry is dropped (its bytes overwritten by [`Zeroizing`]) when the
//! last lease goes. A later login of the same user replaces the entry's credential.

use std::collections::HashMap;
use std::sync::Mutex;

use zeroize::Zeroizing;

use super::scram::Key;

/// What pgshift logs in to a backend with, on a client's behalf.
#[derive(Clone)]
pub enum Credential {
    /// A SCRAM ClientKey recovered from the client's proof.
    ScramClientKey(Zeroizing<Key>),
    /// An md5 hash (`md5` + hex) from the stored secret (`allow_md5`).
    Md5Hash(Zeroizing<String>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::ScramClientKey(_) => f.write_str("ScramClientKey(<redacted>)"),
            Credential::Md5Hash(_) => f.write_str("Md5Hash(<redacted>)"),
        }
    }
}

struct Held {
    credential: Credential,
    sessions: usize,
}

/// Credentials of the users with open sessions.
#[derive(Default)]
pub struct ClientKeys {
    users: Mutex<HashMap<String, Held>>,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientKeys {{ users: {} }}", self.held_users())
    }
}

impl ClientKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `credential` for `user` until the returned lease (and every other lease of the
    /// user) is dropped.
    pub fn hold(&self, user: &str, credential: Credential) -> KeyLease<'_> {
        let mut users = self.lock();
        match users.get_mut(user) {
            Some(held) => {
                held.credential = credential;
                held.sessions += 1;
            }
            None => {
                users.insert(
                    user.to_string(),
                    Held {
                        credential,
                        sessions: 1,
                    },
                );
            }
        }
        KeyLease {
            keys: self,
            user: user.to_string(),
        }
    }

    /// Users whose credential is held now.
    pub fn held_users(&self) -> usize {
        self.lock().len()
    }

    /// Whether `user` has a credential held (tests, diagnostics).
    pub fn is_held(&self, user: &str) -> bool {
        self.lock().contains_key(user)
    }

    fn release(&self, user: &str) {
        let mut users = self.lock();
        if let Some(held) = users.get_mut(user) {
            held.sessions = held.sessions.saturating_sub(1);
            if held.sessions == 0 {
                // Dropping the entry zeroes the credential.
                users.remove(user);
            }
        }
    }
}

/// One session's hold on its user's credential.
pub struct KeyLease<'a> {
    keys: &'a ClientKeys,
    user: String,
}

impl KeyLease<'_> {
    /// A copy of the user's current credential (zeroed when dropped), to log in with.
    pub fn credential(&self) -> Option<Credential> {
        self.keys
            .lock()
            .get(&self.user)
            .map(|held| held.credential.clone())
    }
}

impl Drop for KeyLease<'_> {
    fn drop(&mut self) {
        self.keys.release(&self.user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_session_of_a_user_drops_its_key() {
        let keys = ClientKeys::default();
        let first = keys.hold("app", Credential::ScramClientKey(Zeroizing::new([1; 32])));
        let second = keys.hold("app", Credential::ScramClientKey(Zeroizing::new([2; 32])));
        let other = keys.hold("other", Credential::Md5Hash(Zeroizing::new("md5x".into())));
        assert_eq!(keys.held_users(), 2);
        // The newest login's key is the one held.
        assert!(matches!(
            first.credential(),
            Some(Credential::ScramClientKey(key)) if *key == [2; 32]
        ));
        drop(first);
        assert!(keys.is_held("app"));
        drop(second);
        assert!(!keys.is_held("app"));
        assert!(keys.is_held("other"));
        drop(other);
        assert_eq!(keys.held_users(), 0);
        assert!(
            !format!("{:?}", Credential::Md5Hash(Zeroizing::new("md5x".into()))).contains("md5x")
        );
    }
}
