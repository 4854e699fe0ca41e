//! The mock SCRAM exchange that keeps pgshift from telling which users exist.
//!
//! A user pgshift cannot log in — no such role, a role that cannot log in, no SCRAM verifier
//! (no password, or md5 while `allow_md5` is off), an expired password — gets an exchange that
//! looks like a real one: a salt derived from a per-install secret and the user name (the same
//! salt at every attempt, like a real role's), 4096 iterations (PostgreSQL's default), a fresh
//! server nonce, and at the end the same 28P01 "password authentication failed for user …" a
//! wrong password gets. PostgreSQL's `scram_mock_salt` does the same with its `mock_auth_nonce`.

use super::scram::{self, ScramVerifier};

/// Iterations a mock exchange announces (PostgreSQL's default `scram_iterations`).
pub const MOCK_ITERATIONS: u32 = 4096;
/// Salt length of a mock exchange (PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`).
pub const MOCK_SALT_LEN: usize = 16;

/// The verifier a mock exchange runs with: a stable salt for `user`, keys no proof can match
/// (the exchange is doomed anyway).
pub fn mock_verifier(secret: &[u8; 32], user: &str) -> ScramVerifier {
    let digest = scram::sha256(&[&secret[..], user.as_bytes()].concat());
    ScramVerifier {
        iterations: MOCK_ITERATIONS,
        salt: digest[..MOCK_SALT_LEN].to_vec(),
        stored_key: scram::hmac(secret, &[b"mock StoredKey", user.as_bytes()]),
        server_key: scram::hmac(secret, &[b"mock ServerKey", user.as_bytes()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mock_salt_is_stable_per_user_and_secret() {
        let secret = [9u8; 32];
        let first = mock_verifier(&secret, "alice");
        assert_eq!(first, mock_verifier(&secret, "alice"));
        assert_ne!(first.salt, mock_verifier(&secret, "bob").salt);
        assert_ne!(first.salt, mock_verifier(&[8u8; 32], "alice").salt);
        assert_eq!(first.salt.len(), MOCK_SALT_LEN);
        assert_eq!(first.iterations, 4096);
    }
}
