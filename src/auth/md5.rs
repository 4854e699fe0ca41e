//! PostgreSQL's md5 password exchange, from a stored hash (`allow_md5` only: weaker than
//! SCRAM, the stored hash is itself enough to log in, and it is not salted per server).
//!
//! The stored secret is `md5` + hex(md5(password ‖ user)); the exchange answers a 4-byte salt
//! with `md5` + hex(md5(hex part of the stored secret ‖ salt)). pgshift checks clients and logs
//! in to backends with the stored secret alone.

use ::md5::{Digest, Md5};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The PasswordMessage answering `salt` for the stored secret `hash` (`md5` + 32 hex digits).
pub fn salted_response(hash: &str, salt: &[u8; 4]) -> String {
    let inner = hash.strip_prefix("md5").unwrap_or(hash);
    let mut digest = Md5::new();
    digest.update(inner.as_bytes());
    digest.update(salt);
    format!("md5{}", hex(&digest.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libpq() {
        // md5("md5_pw" ‖ "md5_user"), as CREATE ROLE md5_user PASSWORD 'md5_pw' stores it.
        let stored = format!("md5{}", hex(&Md5::digest(b"md5_pwmd5_user")));
        let salt = [1, 2, 3, 4];
        // libpq: pg_md5_encrypt(pg_md5_encrypt(password, user) without "md5", salt).
        let mut expected = Md5::new();
        expected.update(&stored.as_bytes()[3..]);
        expected.update(salt);
        assert_eq!(
            salted_response(&stored, &salt),
            format!("md5{}", hex(&expected.finalize()))
        );
        assert_eq!(salted_response(&stored, &salt).len(), 35);
    }
}
