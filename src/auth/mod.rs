//! Auth termination (`[auth] mode = "scram"`): pgshift logs clients in with SCRAM-SHA-256
//! itself and reaches either color on their behalf, with no password anywhere.
//!
//! - [`scram`]: the SCRAM math and messages, server side (checking a client) and client side
//!   (logging in to a backend with a recovered ClientKey); pure.
//! - [`endpoint`]: `tls-server-end-point` channel-binding data of a certificate; pure.
//! - [`mock`]: the exchange unknown users get, so that none can be told from a wrong password.
//! - [`verifiers`]: the userlist, `auth_query` on each color, the cache (stale entries served
//!   while the query is unreachable).
//! - [`dsn`]: `auth_dsn` (libpq key=value, `passfile`, `sslmode`).
//! - [`backoff`]: failed logins delayed per (client address, user).
//! - [`keys`]: ClientKeys held while their user has a session, zeroed after the last one.
//! - [`md5`]: the md5 exchange from a stored hash (`allow_md5` only).
//! - [`login`]: one client's login, from the routed color to an authenticated backend.
//!
//! [`AuthState`] is the shared part (in [`crate::proxy::Shared`]); [`compare_verifiers`] is what
//! the controller runs before `rollout start` and `promote`, and [`auth_mismatches`] feeds
//! `status.auth_mismatch`.

pub mod backoff;
pub mod dsn;
pub mod endpoint;
pub mod keys;
pub mod login;
pub mod md5;
pub mod mock;
pub mod scram;
pub mod verifiers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use crate::color::Color;
use crate::config::{AuthMode, Config};
use crate::proxy::Shared;
use verifiers::{RoleFacts, RoleSecret, Sources, Verifiers};

/// A role whose login facts differ between blue and green: green cannot log it in with the
/// ClientKey blue's verifier gives. No secret is in it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    pub user: String,
    /// What differs, e.g. "salt differs", "blue has a SCRAM-SHA-256 verifier, green has no
    /// login role", "rolvaliduntil differs".
    pub differences: Vec<String>,
}

impl Mismatch {
    /// The fix, for messages: copy blue's verifier to green.
    pub fn hint(user: &str) -> String {
        format!(
            "copy blue's verifier to green: on blue, SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'; on green, ALTER ROLE \"{user}\" PASSWORD 'SCRAM-SHA-256$…' with that value"
        )
    }
}

/// Auth counters (tests, diagnostics): logins by outcome.
#[derive(Debug, Default)]
pub struct AuthCounters {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub mocked: AtomicU64,
    /// Sessions routed to green that went to blue because green's verifier differs.
    pub mismatch_fallbacks: AtomicU64,
    /// Logins refused (28000) because green's verifier differs and blue could not take them.
    pub mismatch_refusals: AtomicU64,
}

/// The auth state every session shares.
#[derive(Debug)]
pub struct AuthState {
    pub verifiers: Verifiers,
    pub keys: keys::ClientKeys,
    pub backoff: backoff::Backoff,
    pub counters: AuthCounters,
    mismatches: Mutex<BTreeMap<String, Mismatch>>,
    mock_secret: Mutex<[u8; 32]>,
}

impl AuthState {
    /// The state for `config`: in scram mode the userlist is read and the per-install secret
    /// of the mock exchange read (or created); errors name the setting.
    pub fn load(config: &Config) -> Result<AuthState, String> {
        let state = AuthState {
            verifiers: Verifiers::default(),
            keys: keys::ClientKeys::default(),
            backoff: backoff::Backoff::default(),
            counters: AuthCounters::default(),
            mismatches: Mutex::new(BTreeMap::new()),
            mock_secret: Mutex::new(rand::random()),
        };
        state.reload(config)?;
        Ok(state)
    }

    /// Re-reads the userlist and the secret file (reload). The cache is emptied when the
    /// query's source changed; nothing changes on error.
    pub fn reload(&self, config: &Config) -> Result<(), String> {
        if config.auth.mode != AuthMode::Scram {
            return Ok(());
        }
        let users = match &config.auth.userlist {
            Some(path) => read_userlist(path)?,
            None => Default::default(),
        };
        let secret = match &config.auth.secret_file {
            Some(path) => Some(load_or_create_secret(path)?),
            None => None,
        };
        self.verifiers.set_userlist(users);
        if let Some(secret) = secret {
            *self.mock_secret.lock().unwrap_or_else(|e| e.into_inner()) = secret;
        }
        self.verifiers.clear_cache();
        Ok(())
    }

    /// The per-install secret mock salts derive from.
    pub(crate) fn mock_secret(&self) -> [u8; 32] {
        *self.mock_secret.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mismatches(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Mismatch>> {
        self.mismatches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or, with no differences, clears) what a login saw of `user` on both colors.
    pub fn record_mismatch(&self, user: &str, differences: Vec<String>) {
        let mut mismatches = self.mismatches();
        if differences.is_empty() {
            mismatches.remove(user);
        } else {
            if !mismatches.contains_key(user) {
                tracing::warn!(
                    user,
                    differences = %differences.join(", "),
                    "auth mismatch: green does not share blue's verifier for this role"
                );
            }
            mismatches.insert(
                user.to_string(),
                Mismatch {
                    user: user.to_string(),
                    differences,
                },
            );
        }
    }
}

/// Reads and parses a userlist file; errors name `[auth] userlist` and the line.
pub fn read_userlist(path: &Path) -> Result<HashMap<String, RoleSecret>, String> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        format!(
            "auth.userlist = {}: cannot read it: {error}",
            path.display()
        )
    })?;
    verifiers::parse_userlist(&text)
        .map_err(|error| format!("auth.userlist = {}: {error}", path.display()))
}

/// Reads the 32-byte secret at `path`, or creates it (mode 0600) when it does not exist.
pub fn load_or_create_secret(path: &Path) -> Result<[u8; 32], String> {
    let describe = |error: String| format!("auth.secret_file = {}: {error}", path.display());
    match std::fs::read(path) {
        Ok(bytes) => {
            return bytes.try_into().map_err(|_| {
                describe("must hold exactly 32 bytes (delete it to have a new one made)".into())
            });
        }
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(describe(format!("cannot read it: {error}")));
        }
        Err(_) => {}
    }
    let secret: [u8; 32] = rand::random();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(&secret)
                .and_then(|()| file.sync_all())
                .map_err(|error| describe(format!("cannot write it: {error}")))?;
            tracing::info!(file = %path.display(), "created the per-install secret of the mock SCRAM exchange");
            Ok(secret)
        }
        // Another pgshift made it first: use theirs.
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            load_or_create_secret(path)
        }
        Err(error) => Err(describe(format!("cannot create it: {error}"))),
    }
}

/// `pgshift check`'s lines for `[auth]`: the userlist read, the secret file's state.
pub fn check(config: &Config) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    if config.auth.mode != AuthMode::Scram {
        return Ok(lines);
    }
    if let Some(path) = &config.auth.userlist {
        let users = read_userlist(path)?;
        lines.push(format!(
            "[auth] userlist {}: {} user(s)",
            path.display(),
            users.len()
        ));
    }
    match &config.auth.secret_file {
        Some(path) if path.exists() => {
            let bytes = std::fs::read(path)
                .map_err(|error| format!("auth.secret_file = {}: {error}", path.display()))?;
            if bytes.len() != 32 {
                return Err(format!(
                    "auth.secret_file = {}: must hold exactly 32 bytes",
                    path.display()
                ));
            }
            lines.push(format!("[auth] mock exchange secret: {}", path.display()));
        }
        Some(path) => lines.push(format!(
            "[auth] mock exchange secret: {} (created at start)",
            path.display()
        )),
        None => lines.push(
            "[auth] mock exchange secret: random per process (unknown users' salts change at each restart)"
                .to_string(),
        ),
    }
    Ok(lines)
}

/// The roles `status.auth_mismatch` lists now: those whose verifier (or login facts) differ
/// between the colors, as the last comparison or login saw them.
pub fn auth_mismatches(shared: &Shared) -> Vec<Mismatch> {
    shared.auth.mismatches().values().cloned().collect()
}

/// Re-fetches every login role on both colors, bypassing the cache (and refreshing it), and
/// compares each role's secret (salt, iterations, StoredKey, ServerKey), `rolcanlogin` and
/// `rolvaliduntil`. The result replaces `status.auth_mismatch`. `rollout start` and `promote`
/// refuse while it is not empty, or when it is an `Err` (a color could not be read).
///
/// In passthrough mode there is nothing to compare (`Ok(vec![])`). With a userlist only (no
/// `auth_dsn`) the colors cannot be read: the mismatches logins met so far are returned.
pub async fn compare_verifiers(shared: &Shared) -> Result<Vec<Mismatch>, String> {
    let config = shared.config.load_full();
    if config.auth.mode != AuthMode::Scram {
        return Ok(Vec::new());
    }
    if config.auth.auth_dsn.is_none() {
        return Ok(auth_mismatches(shared));
    }
    let sources = Sources {
        config: &config,
        tls: &shared.tls,
    };
    let verifiers = &shared.auth.verifiers;
    let (blue, green) = tokio::join!(
        verifiers.roles(sources, Color::Blue),
        verifiers.roles(sources, Color::Green)
    );
    let blue: BTreeMap<String, RoleFacts> = blue
        .map_err(|error| format!("cannot compare the colors' verifiers: {error}"))?
        .into_iter()
        .map(|role| (role.name.clone(), role))
        .collect();
    let green: BTreeMap<String, RoleFacts> = green
        .map_err(|error| format!("cannot compare the colors' verifiers: {error}"))?
        .into_iter()
        .map(|role| (role.name.clone(), role))
        .collect();
    let users: BTreeSet<&String> = blue
        .values()
        .chain(green.values())
        .filter(|role| role.can_login)
        .map(|role| &role.name)
        .collect();
    let mut found = BTreeMap::new();
    for user in users {
        let (blue_secret, green_secret) = tokio::join!(
            verifiers.query(sources, Color::Blue, user),
            verifiers.query(sources, Color::Green, user)
        );
        let blue_secret = blue_secret
            .map_err(|error| format!("cannot compare the colors' verifiers: {error}"))?;
        let green_secret = green_secret
            .map_err(|error| format!("cannot compare the colors' verifiers: {error}"))?;
        let mut differences = Vec::new();
        match (blue.get(user), green.get(user)) {
            (Some(_), None) => differences.push("missing on green".to_string()),
            (None, Some(_)) => differences.push("missing on blue".to_string()),
            (Some(b), Some(g)) => {
                if b.can_login != g.can_login {
                    differences.push(format!(
                        "rolcanlogin differs (blue {}, green {})",
                        b.can_login, g.can_login
                    ));
                }
                if b.valid_until != g.valid_until {
                    differences.push("rolvaliduntil differs".to_string());
                }
            }
            (None, None) => {}
        }
        if differences.is_empty() {
            differences = verifiers::secret_differences(&blue_secret, &green_secret);
        }
        if !differences.is_empty() {
            found.insert(
                user.clone(),
                Mismatch {
                    user: user.clone(),
                    differences,
                },
            );
        }
    }
    let result: Vec<Mismatch> = found.values().cloned().collect();
    *shared.auth.mismatches() = found;
    Ok(result)
}

/// The controller's gate before `rollout start` and `promote`: `Ok` when every login role
/// matches on both colors (always in passthrough mode), else the refusal naming the roles and
/// what differs (or why the colors could not be compared). `verb` opens the message, e.g.
/// "rollout start". Runs [`compare_verifiers`] (so it refreshes `status.auth_mismatch`); it
/// takes a few queries per role on each color.
pub async fn verifiers_gate(shared: &Shared, verb: &str) -> Result<(), String> {
    let mismatches = compare_verifiers(shared)
        .await
        .map_err(|error| format!("{verb} refused: {error}"))?;
    if mismatches.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 10;
    let mut roles: Vec<String> = mismatches
        .iter()
        .take(SHOWN)
        .map(|mismatch| format!("{} ({})", mismatch.user, mismatch.differences.join(", ")))
        .collect();
    if mismatches.len() > SHOWN {
        roles.push(format!("and {} more", mismatches.len() - SHOWN));
    }
    Err(format!(
        "{verb} refused: {} role(s) have another secret on green than on blue, so pgshift cannot log them in to green: {}; copy blue's verifiers to green (ALTER ROLE … PASSWORD 'SCRAM-SHA-256$…', see the README's auth termination section) — status.auth_mismatch lists them",
        mismatches.len(),
        roles.join("; ")
    ))
}
