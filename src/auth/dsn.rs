//! The connection strings pgshift itself uses to reach each color — `[auth] auth_dsn` and
//! `[cutover] dsn`: libpq key=value without host and port (those come from `[blue]` /
//! `[green]`, so the same string reaches either color), plus the libpq keys tokio-postgres does
//! not know and pgshift handles itself: `passfile` (a `.pgpass` file, looked up with each
//! color's host and port) and `sslmode` (`disable`, `prefer`, `require`, `verify-ca`,
//! `verify-full`; by default the color's own `tls`).
//!
//! [`parse`] is pure (the passfile is read by [`password_from_passfile`] at connect time);
//! [`connect`] opens one connection to one color. The connection string is never echoed in
//! errors, since it may hold a password.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;

use crate::color::Color;
use crate::config::{BackendConfig, BackendTlsMode};
use crate::tls;

/// `sslmode` of the auth connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthSslMode {
    Disable,
    Prefer,
    Require,
    /// `verify-ca` / `verify-full`: TLS with the color's `ca_file` checks.
    Verify,
}

/// A parsed `auth_dsn`.
#[derive(Debug, Clone)]
pub struct AuthDsn {
    /// Everything tokio-postgres reads (user, dbname, password, options, …); no host or port.
    pub config: tokio_postgres::Config,
    pub passfile: Option<PathBuf>,
    /// `None`: follow the color's `tls`.
    pub sslmode: Option<AuthSslMode>,
}

/// Splits a libpq key=value string into pairs (values may be single-quoted, with `\'` and
/// `\\` escapes).
fn pairs(dsn: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = dsn.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("missing \"=\" after \"{key}\""));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quoted value for \"{key}\"")),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("unterminated quoted value for \"{key}\"")),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        pairs.push((key, value));
    }
}

fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Parses `auth_dsn`. Errors name the offending key, never a value.
pub fn parse(dsn: &str) -> Result<AuthDsn, String> {
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        return Err(
            "use the key=value form (user=... dbname=... passfile=...), not a URI".to_string(),
        );
    }
    let mut passfile = None;
    let mut sslmode = None;
    let mut rest = Vec::new();
    for (key, value) in pairs(dsn)? {
        match key.as_str() {
            "host" | "hostaddr" | "port" => {
                return Err(format!(
                    "\"{key}\" is not allowed: host and port come from [blue] / [green], so the same string reaches each color"
                ));
            }
            "passfile" => passfile = Some(PathBuf::from(value)),
            "sslmode" => {
                sslmode = Some(match value.as_str() {
                    "disable" => AuthSslMode::Disable,
                    "allow" | "prefer" => AuthSslMode::Prefer,
                    "require" => AuthSslMode::Require,
                    "verify-ca" | "verify-full" => AuthSslMode::Verify,
                    _ => return Err("\"sslmode\" has an unknown value".to_string()),
                })
            }
            "sslrootcert" | "sslcert" | "sslkey" | "sslcrl" => {
                return Err(format!(
                    "\"{key}\" is not supported: the auth connection uses the color's own TLS settings ([blue] / [green] ca_file, tls_cert, tls_key)"
                ));
            }
            _ => rest.push(format!("{key}={}", quote(&value))),
        }
    }
    let config: tokio_postgres::Config = rest.join(" ").parse().map_err(|error| {
        // tokio-postgres names the key, not the value.
        format!("{error}")
    })?;
    if config.get_user().is_none() {
        return Err("needs user=... (the role pgshift connects as)".to_string());
    }
    Ok(AuthDsn {
        config,
        passfile,
        sslmode,
    })
}

/// Where [`connect`] goes: one color, its TLS config when its `tls` is on, and the database
/// (the DSN's own `dbname` when `None`).
pub struct ColorTarget<'a> {
    pub color: Color,
    pub backend: &'a BackendConfig,
    pub backend_tls: Option<Arc<ClientConfig>>,
    pub database: Option<&'a str>,
    pub application_name: &'a str,
}

/// Opens a connection to one color with `dsn` (passfile and sslmode applied), within the
/// color's `connect_timeout`; the connection's driver task is spawned.
pub async fn connect(
    dsn: &AuthDsn,
    target: ColorTarget<'_>,
) -> Result<tokio_postgres::Client, String> {
    let backend = target.backend;
    let mut pg = dsn.config.clone();
    pg.host(&backend.host)
        .port(backend.port)
        .connect_timeout(backend.connect_timeout);
    if let Some(database) = target.database {
        pg.dbname(database);
    }
    if pg.get_application_name().is_none() {
        pg.application_name(target.application_name);
    }
    if pg.get_password().is_none()
        && let Some(passfile) = &dsn.passfile
    {
        let user = pg.get_user().unwrap_or_default().to_string();
        let database = pg.get_dbname().unwrap_or(&user).to_string();
        if let Some(password) =
            read_passfile(passfile, &backend.host, backend.port, &database, &user)?
        {
            pg.password(password);
        }
    }
    let mode = dsn.sslmode.unwrap_or(match backend.tls {
        BackendTlsMode::Disable => AuthSslMode::Disable,
        BackendTlsMode::Prefer => AuthSslMode::Prefer,
        BackendTlsMode::Require => AuthSslMode::Require,
        BackendTlsMode::VerifyFull => AuthSslMode::Verify,
    });
    let color = target.color;
    let connect = async {
        match mode {
            AuthSslMode::Disable => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, connection) = pg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|error| error_text(&error))?;
                tokio::spawn(connection);
                Ok(client)
            }
            mode => {
                let rustls = match (target.backend_tls, mode) {
                    (Some(config), _) => config,
                    (None, AuthSslMode::Verify) => {
                        return Err(format!(
                            "sslmode verify-ca / verify-full needs [{color}] tls with a ca_file"
                        ));
                    }
                    (None, _) => tls::encrypt_only_client_config()?,
                };
                pg.ssl_mode(if mode == AuthSslMode::Prefer {
                    tokio_postgres::config::SslMode::Prefer
                } else {
                    tokio_postgres::config::SslMode::Require
                });
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*rustls).clone());
                let (client, connection) = pg
                    .connect(connector)
                    .await
                    .map_err(|error| error_text(&error))?;
                tokio::spawn(connection);
                Ok(client)
            }
        }
    };
    let timeout = backend.connect_timeout;
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| format!("could not connect to {color} within {timeout:?}"))?
}

/// A tokio-postgres error with its server message and SQLSTATE, when there is one.
pub fn error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Splits one `.pgpass` line into its five fields (`\:` and `\\` escaped).
fn passfile_fields(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.push(chars.next()?),
            ':' => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

/// The password a `.pgpass` file gives for (host, port, database, user), as libpq reads it:
/// the first line whose four fields match (`*` matches anything).
pub fn password_from_passfile(
    text: &str,
    host: &str,
    port: u16,
    database: &str,
    user: &str,
) -> Option<String> {
    let port = port.to_string();
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
        .filter_map(passfile_fields)
        .find(|fields| {
            [host, port.as_str(), database, user]
                .iter()
                .zip(fields.iter())
                .all(|(wanted, field)| field == "*" || field == wanted)
        })
        .map(|mut fields| fields.swap_remove(4))
}

/// Reads `path` (a passfile) for the password of (host, port, database, user).
pub fn read_passfile(
    path: &Path,
    host: &str,
    port: u16,
    database: &str,
    user: &str,
) -> Result<Option<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read passfile {}: {error}", path.display()))?;
    Ok(password_from_passfile(&text, host, port, database, user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_are_refused_and_secrets_never_echoed() {
        let parsed =
            parse("user=pgshift_auth dbname=postgres passfile=/etc/pgshift/pgpass").expect("valid");
        assert_eq!(parsed.config.get_user(), Some("pgshift_auth"));
        assert_eq!(parsed.config.get_dbname(), Some("postgres"));
        assert_eq!(
            parsed.passfile.as_deref(),
            Some(Path::new("/etc/pgshift/pgpass"))
        );
        assert!(parsed.config.get_hosts().is_empty());
        for refused in [
            "user=a host=db1",
            "user=a port=5432",
            "dbname=postgres",
            "user=a sslrootcert=/x",
            "postgresql://a@db/postgres",
            "user='a",
        ] {
            assert!(parse(refused).is_err(), "{refused}");
        }
        let error = parse("user=a password=hunter2 colour=blue").expect_err("unknown key");
        assert!(!error.contains("hunter2"), "{error}");
        let quoted = parse("user='odd \\'name\\'' sslmode=require").expect("quoted");
        assert_eq!(quoted.config.get_user(), Some("odd 'name'"));
        assert_eq!(quoted.sslmode, Some(AuthSslMode::Require));
    }

    #[test]
    fn passfile_lines_match_like_libpq() {
        let text = "# comment\n\
                    db1:5432:postgres:auth:first\n\
                    *:5433:*:auth:sec\\:ond\n\
                    127.0.0.1:*:*:*:wild\n";
        assert_eq!(
            password_from_passfile(text, "db1", 5432, "postgres", "auth").as_deref(),
            Some("first")
        );
        assert_eq!(
            password_from_passfile(text, "db2", 5433, "x", "auth").as_deref(),
            Some("sec:ond")
        );
        assert_eq!(
            password_from_passfile(text, "127.0.0.1", 1, "x", "y").as_deref(),
            Some("wild")
        );
        assert_eq!(password_from_passfile(text, "db3", 1, "x", "y"), None);
    }
}
