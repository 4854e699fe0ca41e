//! Where the login secrets come from: `[auth] userlist` (the same for both colors) and
//! `[auth] auth_query` run on `auth_dsn` against each color, with a cache.
//!
//! A lookup answers for one (color, user): the userlist first, then the cache while its entry
//! is younger than `cache_ttl`, then the query. When the query fails (the color or the auth
//! role unreachable, the query broken) an expired entry is served stale, and the log says so;
//! without one the lookup fails and the login gets 08006 — the same for every user, so it says
//! nothing about who exists. Negative answers are cached too, at most [`MAX_CACHED_MISSING`] of
//! them, so that unknown names cannot grow the cache without bound.
//!
//! Each color has one auth connection (tokio-postgres, reopened when it breaks or the DSN or
//! query changes) with the query prepared once; lookups share it (tokio-postgres pipelines).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_postgres::Statement;

use super::dsn::{self, error_text};
use super::scram::ScramVerifier;
use crate::color::Color;
use crate::config::Config;
use crate::tls::TlsState;

/// Negative answers (no such login role) cached at most.
pub const MAX_CACHED_MISSING: usize = 10_000;

/// What one color says about a role's login secret.
#[derive(Clone, PartialEq, Eq)]
pub enum RoleSecret {
    /// No row: no such role, or it cannot log in.
    Missing,
    /// A row without a secret: no password, or an expired one.
    NoPassword,
    Scram(ScramVerifier),
    /// `md5` followed by 32 hex digits.
    Md5(String),
    /// Anything else (a plaintext password, a damaged verifier): unusable.
    Unusable,
}

impl std::fmt::Debug for RoleSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

impl RoleSecret {
    /// The secret a `rolpassword`-like text holds (`None`: NULL).
    pub fn from_text(text: Option<&str>) -> RoleSecret {
        let Some(text) = text else {
            return RoleSecret::NoPassword;
        };
        if let Some(verifier) = ScramVerifier::parse(text) {
            return RoleSecret::Scram(verifier);
        }
        if is_md5_hash(text) {
            return RoleSecret::Md5(text.to_string());
        }
        RoleSecret::Unusable
    }

    /// What kind of secret this is, without its value.
    pub fn describe(&self) -> &'static str {
        match self {
            RoleSecret::Missing => "no login role",
            RoleSecret::NoPassword => "no password (or an expired one)",
            RoleSecret::Scram(_) => "a SCRAM-SHA-256 verifier",
            RoleSecret::Md5(_) => "an md5 hash",
            RoleSecret::Unusable => "a secret pgshift cannot use",
        }
    }
}

fn is_md5_hash(text: &str) -> bool {
    text.len() == 35 && text.starts_with("md5") && text[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// What differs between blue's and green's secret of one role, by name, never by value.
pub fn secret_differences(blue: &RoleSecret, green: &RoleSecret) -> Vec<String> {
    match (blue, green) {
        (RoleSecret::Scram(blue), RoleSecret::Scram(green)) => blue
            .differences(green)
            .into_iter()
            .map(|what| format!("{what} differs"))
            .collect(),
        (blue, green) if blue == green => Vec::new(),
        (RoleSecret::Md5(_), RoleSecret::Md5(_)) => vec!["md5 hash differs".to_string()],
        (blue, green) => vec![format!(
            "blue has {}, green has {}",
            blue.describe(),
            green.describe()
        )],
    }
}

// ---------------------------------------------------------------------------------------------
// userlist
// ---------------------------------------------------------------------------------------------

/// Reads one double-quoted field (`""` is a quote) from the front of `line`.
fn quoted_field(line: &str) -> Option<(String, &str)> {
    let mut rest = line.trim_start().strip_prefix('"')?;
    let mut value = String::new();
    loop {
        let end = rest.find('"')?;
        value.push_str(&rest[..end]);
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix('"') {
            value.push('"');
            rest = after;
        } else {
            return Some((value, rest));
        }
    }
}

/// Parses a userlist: lines of `"user" "SCRAM-SHA-256$…"` (or `"user" "md5…"`), blank lines
/// and `#` / `;` comments. Plaintext passwords are refused: pgshift holds none.
pub fn parse_userlist(text: &str) -> Result<HashMap<String, RoleSecret>, String> {
    let mut users = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let (user, rest) = quoted_field(trimmed)
            .ok_or_else(|| format!("line {number}: expected \"user\" \"secret\""))?;
        let (secret, rest) = quoted_field(rest)
            .ok_or_else(|| format!("line {number}: expected \"user\" \"secret\""))?;
        if !rest.trim().is_empty() {
            return Err(format!(
                "line {number}: unexpected text after \"user\" \"secret\""
            ));
        }
        let parsed = RoleSecret::from_text(Some(&secret));
        if !matches!(parsed, RoleSecret::Scram(_) | RoleSecret::Md5(_)) {
            return Err(format!(
                "line {number}: the secret of \"{user}\" is not a SCRAM-SHA-256 verifier or an md5 hash (pgshift accepts no plaintext passwords)"
            ));
        }
        users.insert(user, parsed);
    }
    Ok(users)
}

// ---------------------------------------------------------------------------------------------
// The cache and the query
// ---------------------------------------------------------------------------------------------

/// A role's login facts on one color, from `pg_roles` (for the comparison of both colors).
#[derive(Debug, Clone, PartialEq)]
pub struct RoleFacts {
    pub name: String,
    pub can_login: bool,
    /// `rolvaliduntil` as seconds since the epoch (±infinity allowed); `None`: no limit.
    pub valid_until: Option<f64>,
}

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth_query on {color} failed: {reason}")]
pub struct LookupError {
    pub color: Color,
    pub reason: String,
}

/// Lookup counters (tests, diagnostics).
#[derive(Debug, Default)]
pub struct LookupCounters {
    pub queries: AtomicU64,
    pub cache_hits: AtomicU64,
    pub stale_served: AtomicU64,
    pub failures: AtomicU64,
}

#[derive(Clone)]
struct CacheEntry {
    secret: RoleSecret,
    fetched: Instant,
}

struct AuthConnection {
    client: tokio_postgres::Client,
    /// The DSN, query and color address it was opened for.
    identity: String,
    lookup: Statement,
}

/// The userlist, the cache and the auth connections.
#[derive(Default)]
pub struct Verifiers {
    cache: Mutex<HashMap<(Color, String), CacheEntry>>,
    userlist: RwLock<Arc<HashMap<String, RoleSecret>>>,
    connections: [tokio::sync::Mutex<Option<Arc<AuthConnection>>>; 2],
    pub counters: LookupCounters,
}

impl std::fmt::Debug for Verifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifiers { .. }")
    }
}

/// What a lookup reads from the running pgshift.
#[derive(Clone, Copy)]
pub struct Sources<'a> {
    pub config: &'a Config,
    pub tls: &'a TlsState,
}

fn identity(config: &Config, color: Color) -> String {
    format!(
        "{}\n{}\n{}",
        config.auth.auth_dsn.as_deref().unwrap_or(""),
        config.auth.auth_query,
        config.backend(color).address()
    )
}

impl Verifiers {
    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<(Color, String), CacheEntry>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs a userlist (at start and on reload).
    pub fn set_userlist(&self, users: HashMap<String, RoleSecret>) {
        *self.userlist.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(users);
    }

    fn listed(&self, user: &str) -> Option<RoleSecret> {
        self.userlist
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .cloned()
    }

    /// Users the userlist names.
    pub fn userlist_users(&self) -> Vec<String> {
        let list = self.userlist.read().unwrap_or_else(|e| e.into_inner());
        list.keys().cloned().collect()
    }

    /// Empties the cache (the DSN or the query changed).
    pub fn clear_cache(&self) {
        self.cache().clear();
    }

    /// Forgets the cached answer for (color, user): the backend disagreed with it.
    pub fn forget(&self, color: Color, user: &str) {
        self.cache().remove(&(color, user.to_string()));
    }

    /// The secret of `user` on `color`: userlist, fresh cache, query, stale cache.
    pub async fn lookup(
        &self,
        sources: Sources<'_>,
        color: Color,
        user: &str,
    ) -> Result<RoleSecret, LookupError> {
        if let Some(secret) = self.listed(user) {
            return Ok(secret);
        }
        if sources.config.auth.auth_dsn.is_none() {
            return Ok(RoleSecret::Missing);
        }
        let ttl = sources.config.auth.cache_ttl;
        let cached = self.cache().get(&(color, user.to_string())).cloned();
        if let Some(entry) = &cached
            && entry.fetched.elapsed() < ttl
        {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(entry.secret.clone());
        }
        match self.query(sources, color, user).await {
            Ok(secret) => Ok(secret),
            Err(error) => match cached {
                Some(entry) => {
                    self.counters.stale_served.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        %color,
                        user,
                        age_s = entry.fetched.elapsed().as_secs(),
                        "{error}; serving the cached secret past cache_ttl"
                    );
                    Ok(entry.secret)
                }
                None => Err(error),
            },
        }
    }

    /// Runs `auth_query` for `user` on `color` now (bypassing the cache) and caches the answer.
    pub async fn query(
        &self,
        sources: Sources<'_>,
        color: Color,
        user: &str,
    ) -> Result<RoleSecret, LookupError> {
        if let Some(secret) = self.listed(user) {
            return Ok(secret);
        }
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let fail = |reason: String| {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            LookupError { color, reason }
        };
        let connection = self.connection(sources, color).await.map_err(fail)?;
        let timeout = sources.config.backend(color).connect_timeout;
        let rows = tokio::time::timeout(
            timeout,
            connection.client.query(&connection.lookup, &[&user]),
        )
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))
        .and_then(|result| result.map_err(|error| error_text(&error)));
        let rows = match rows {
            Ok(rows) => rows,
            Err(reason) => {
                self.drop_connection(color, &connection).await;
                return Err(fail(reason));
            }
        };
        let secret = secret_of(&rows).map_err(fail)?;
        let mut cache = self.cache();
        let key = (color, user.to_string());
        let missing_cached = || {
            cache
                .values()
                .filter(|entry| entry.secret == RoleSecret::Missing)
                .count()
        };
        if secret != RoleSecret::Missing
            || cache.contains_key(&key)
            || missing_cached() < MAX_CACHED_MISSING
        {
            cache.insert(
                key,
                CacheEntry {
                    secret: secret.clone(),
                    fetched: Instant::now(),
                },
            );
        }
        Ok(secret)
    }

    /// Every role of `color` that is not a system role, with its login facts.
    pub async fn roles(
        &self,
        sources: Sources<'_>,
        color: Color,
    ) -> Result<Vec<RoleFacts>, LookupError> {
        let fail = |reason: String| LookupError { color, reason };
        let connection = self.connection(sources, color).await.map_err(fail)?;
        let timeout = sources.config.backend(color).connect_timeout;
        let query = "SELECT rolname::text, rolcanlogin, extract(epoch FROM rolvaliduntil)::float8 \
                     FROM pg_catalog.pg_roles WHERE rolname !~ '^pg_'";
        let rows = tokio::time::timeout(timeout, connection.client.query(query, &[]))
            .await
            .map_err(|_| fail(format!("no answer within {timeout:?}")))?
            .map_err(|error| fail(error_text(&error)))?;
        rows.iter()
            .map(|row| {
                Ok(RoleFacts {
                    name: row.try_get(0).map_err(|e| fail(e.to_string()))?,
                    can_login: row.try_get(1).map_err(|e| fail(e.to_string()))?,
                    valid_until: row.try_get(2).map_err(|e| fail(e.to_string()))?,
                })
            })
            .collect()
    }

    async fn drop_connection(&self, color: Color, broken: &Arc<AuthConnection>) {
        let mut slot = self.connections[color.index()].lock().await;
        if slot.as_ref().is_some_and(|open| Arc::ptr_eq(open, broken)) {
            *slot = None;
        }
    }

    async fn connection(
        &self,
        sources: Sources<'_>,
        color: Color,
    ) -> Result<Arc<AuthConnection>, String> {
        let wanted = identity(sources.config, color);
        let mut slot = self.connections[color.index()].lock().await;
        if let Some(open) = slot.as_ref()
            && !open.client.is_closed()
            && open.identity == wanted
        {
            return Ok(open.clone());
        }
        *slot = None;
        let opened = Arc::new(open_connection(sources, color, wanted).await?);
        *slot = Some(opened.clone());
        Ok(opened)
    }
}

/// The secret in `auth_query`'s answer: no row (or a NULL user name) is no login role.
fn secret_of(rows: &[tokio_postgres::Row]) -> Result<RoleSecret, String> {
    let Some(row) = rows.first() else {
        return Ok(RoleSecret::Missing);
    };
    if row.len() < 2 {
        return Err("auth_query must return two columns: the user name and its secret".into());
    }
    let name: Option<String> = row
        .try_get(0)
        .map_err(|error| format!("auth_query's first column: {error}"))?;
    if name.is_none() {
        return Ok(RoleSecret::Missing);
    }
    let secret: Option<String> = row
        .try_get(1)
        .map_err(|error| format!("auth_query's second column: {error}"))?;
    Ok(RoleSecret::from_text(secret.as_deref()))
}

/// Opens the auth connection to `color` and prepares `auth_query`.
async fn open_connection(
    sources: Sources<'_>,
    color: Color,
    identity: String,
) -> Result<AuthConnection, String> {
    let config = sources.config;
    let dsn_text = config
        .auth
        .auth_dsn
        .as_deref()
        .ok_or("no [auth] auth_dsn")?;
    let dsn = dsn::parse(dsn_text).map_err(|error| format!("auth_dsn: {error}"))?;
    let backend = config.backend(color);
    let target = dsn::ColorTarget {
        color,
        backend,
        backend_tls: sources.tls.backend(color),
        database: None,
        application_name: "pgshift auth_query",
    };
    let client = dsn::connect(&dsn, target)
        .await
        .map_err(|error| error.replace("sslmode verify", "auth_dsn sslmode verify"))?;
    let timeout = backend.connect_timeout;
    let lookup = tokio::time::timeout(timeout, client.prepare(&config.auth.auth_query))
        .await
        .map_err(|_| format!("auth_query not prepared within {timeout:?}"))?
        .map_err(|error| format!("cannot prepare auth_query: {}", error_text(&error)))?;
    Ok(AuthConnection {
        client,
        identity,
        lookup,
    })
}

/// For tests and diagnostics.
impl Verifiers {
    /// Cache entries now.
    pub fn cached(&self) -> usize {
        self.cache().len()
    }

    /// Ages every cache entry by `by` (tests: expire entries without waiting).
    pub fn age_cache(&self, by: Duration) {
        for entry in self.cache().values_mut() {
            if let Some(earlier) = entry.fetched.checked_sub(by) {
                entry.fetched = earlier;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERIFIER: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    #[test]
    fn secrets_are_told_apart() {
        assert!(matches!(
            RoleSecret::from_text(Some(VERIFIER)),
            RoleSecret::Scram(_)
        ));
        assert!(matches!(
            RoleSecret::from_text(Some("md5a3556571e93b0d20722ba62be61e8c2d")),
            RoleSecret::Md5(_)
        ));
        assert_eq!(RoleSecret::from_text(None), RoleSecret::NoPassword);
        assert_eq!(RoleSecret::from_text(Some("hunter2")), RoleSecret::Unusable);
        assert!(!format!("{:?}", RoleSecret::from_text(Some(VERIFIER))).contains("W22Z"));
    }

    #[test]
    fn differences_are_named_without_values() {
        let blue = RoleSecret::from_text(Some(VERIFIER));
        let other_salt = VERIFIER.replace("W22ZaJ0SNY7soEsUEjb6gQ==", "QSXCR+Q6sek8bf92AAAAAA==");
        let green = RoleSecret::from_text(Some(&other_salt));
        assert_eq!(secret_differences(&blue, &blue), Vec::<String>::new());
        assert_eq!(secret_differences(&blue, &green), ["salt differs"]);
        assert_eq!(
            secret_differences(&blue, &RoleSecret::Missing),
            ["blue has a SCRAM-SHA-256 verifier, green has no login role"]
        );
    }

    #[test]
    fn userlists_hold_verifiers_only() {
        let text = format!(
            "# pgshift users\n\"app\" \"{VERIFIER}\"\n\n; old style comment\n\"we\"\"ird\" \"md5a3556571e93b0d20722ba62be61e8c2d\"\n"
        );
        let users = parse_userlist(&text).expect("valid");
        assert_eq!(users.len(), 2);
        assert!(matches!(users.get("app"), Some(RoleSecret::Scram(_))));
        assert!(matches!(users.get("we\"ird"), Some(RoleSecret::Md5(_))));
        let plaintext = parse_userlist("\"app\" \"hunter2\"\n").expect_err("plaintext");
        assert!(plaintext.contains("line 1"), "{plaintext}");
        assert!(!plaintext.contains("hunter2"), "{plaintext}");
        assert!(parse_userlist("app SCRAM\n").is_err());
        assert!(parse_userlist("\"app\" \"md5a3556571e93b0d20722ba62be61e8c2d\" x\n").is_err());
        assert!(parse_userlist("\"app\n").is_err());
    }
}
