//! Opening the probe's connections: DSNs parsed and described without their secrets, one
//! tokio-postgres connection per session (no pool), and the task that drives each connection
//! and watches what arrives outside any request.
//!
//! tokio-postgres reports a COMMIT's outcome without its command tag, so the probe cannot see
//! the `ROLLBACK` tag of a COMMIT that ended an aborted transaction. It does not need to: a
//! session only sends COMMIT after BEGIN and INSERT succeeded on that connection, so the
//! transaction cannot be in the aborted state — unless the connection now talks to a different
//! backend than the one that ran the INSERT (a proxy that swapped backends), where COMMIT runs
//! outside any transaction and Postgres answers tag `COMMIT` with a WARNING 25P01 "there is no
//! transaction in progress". The driver counts those warnings ([`ConnectionWatch`]); it sees
//! them before the COMMIT's reply is handed to the session, so a session compares the count
//! before and after its COMMIT. An unsolicited FATAL (a terminated backend, an idle session
//! closed by pgshift) ends the connection; its SQLSTATE is kept so the next request's "closed"
//! error is reported with it.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::config::Host;
use tokio_postgres::error::{Severity, SqlState};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

/// The `application_name` probe sessions use when the DSN sets none.
pub const DEFAULT_APPLICATION_NAME: &str = "pgshift-probe";

/// The TCP connect timeout used when the DSN sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a whole login (TCP, startup, authentication) may take.
const LOGIN_DEADLINE: Duration = Duration::from_secs(10);

/// A database the probe connects to: its parsed DSN and a label safe to print.
#[derive(Clone)]
pub struct Target {
    pub label: String,
    pub config: Config,
}

impl Target {
    /// Parses a libpq-style DSN (`key=value ...` or a `postgresql://` URL). The error never
    /// repeats the DSN (it may hold a password).
    pub fn parse(dsn: &str, role: &str) -> Result<Target, String> {
        let mut config = Config::from_str(dsn)
            .map_err(|error| format!("{role}: the DSN cannot be parsed: {error}"))?;
        if config.get_application_name().is_none() {
            config.application_name(DEFAULT_APPLICATION_NAME);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        Ok(Target {
            label: describe(&config),
            config,
        })
    }

    /// The same database under another `application_name`.
    pub fn with_application_name(&self, name: &str) -> Target {
        let mut config = self.config.clone();
        config.application_name(name);
        Target {
            label: self.label.clone(),
            config,
        }
    }

    /// The user the DSN logs in as (the OS user when it names none, as libpq does).
    pub fn user(&self) -> String {
        self.config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "(unknown user)".to_string())
    }
}

/// `user@host:port/dbname`, never the password.
pub fn describe(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let host = if hosts.is_empty() {
        "localhost".to_string()
    } else {
        hosts.join(",")
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or("(os user)");
    let dbname = config.get_dbname().or(config.get_user()).unwrap_or("");
    format!("{user}@{host}:{port}/{dbname}")
}

/// What the driver of one connection saw outside of requests.
pub struct ConnectionWatch {
    no_transaction_warnings: AtomicU64,
    ending_sqlstate: Mutex<Option<String>>,
    ended: watch::Sender<bool>,
}

impl ConnectionWatch {
    fn new() -> ConnectionWatch {
        ConnectionWatch {
            no_transaction_warnings: AtomicU64::new(0),
            ending_sqlstate: Mutex::new(None),
            ended: watch::Sender::new(false),
        }
    }

    /// WARNING 25P01 ("there is no transaction in progress") seen so far.
    pub fn no_transaction_warnings(&self) -> u64 {
        self.no_transaction_warnings.load(Ordering::SeqCst)
    }

    /// The SQLSTATE of the error that ended the connection, if it ended with one.
    pub fn ending_sqlstate(&self) -> Option<String> {
        self.ending_sqlstate
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The SQLSTATE that ended the connection, waiting up to `wait` for the driver to finish
    /// (a request can fail as "closed" a moment before the driver records why).
    pub async fn ending_sqlstate_after_close(&self, wait: Duration) -> Option<String> {
        let mut ended = self.ended.subscribe();
        let _ = tokio::time::timeout(wait, ended.wait_for(|ended| *ended)).await;
        self.ending_sqlstate()
    }
}

/// Why a connection could not be opened.
#[derive(Debug, Clone)]
pub struct ConnectFailure {
    pub sqlstate: Option<String>,
    pub message: String,
}

/// An open connection and its watch.
pub struct OpenConnection {
    pub client: Client,
    pub watch: Arc<ConnectionWatch>,
}

/// Opens one connection to `target` (no TLS) within [`LOGIN_DEADLINE`] and spawns its driver.
pub async fn open(target: &Target) -> Result<OpenConnection, ConnectFailure> {
    let connecting = target.config.connect(NoTls);
    let (client, mut connection) = match tokio::time::timeout(LOGIN_DEADLINE, connecting).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => {
            return Err(ConnectFailure {
                sqlstate: error.code().map(|code| code.code().to_string()),
                message: error_text(&error),
            });
        }
        Err(_) => {
            return Err(ConnectFailure {
                sqlstate: None,
                message: format!(
                    "no login within {}",
                    humantime::format_duration(LOGIN_DEADLINE)
                ),
            });
        }
    };
    let watch = Arc::new(ConnectionWatch::new());
    let driver_watch = Arc::clone(&watch);
    tokio::spawn(async move {
        let ending = loop {
            match std::future::poll_fn(|context| connection.poll_message(context)).await {
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    if *notice.code() == SqlState::NO_ACTIVE_SQL_TRANSACTION {
                        driver_watch
                            .no_transaction_warnings
                            .fetch_add(1, Ordering::SeqCst);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => break Some(error),
                None => break None,
            }
        };
        if let Some(code) = ending.as_ref().and_then(|error| error.code()) {
            *driver_watch
                .ending_sqlstate
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(code.code().to_string());
        }
        driver_watch.ended.send_replace(true);
        // Pending requests learn that the connection closed only now, after the reason was
        // recorded.
        drop(connection);
    });
    Ok(OpenConnection { client, watch })
}

/// The error's text with its causes (tokio-postgres puts the interesting part in the source).
pub fn error_text(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether a request's error means the connection is gone: it closed, the server sent FATAL
/// or PANIC, or the SQLSTATE says so (class 08, 57P01-57P03).
pub fn is_connection_lost(error: &tokio_postgres::Error, client: &Client) -> bool {
    let fatal = error
        .as_db_error()
        .and_then(|db| db.parsed_severity())
        .is_some_and(|severity| matches!(severity, Severity::Fatal | Severity::Panic));
    let code = error.code().map(|code| code.code());
    fatal || error.is_closed() || client.is_closed() || code.is_some_and(sqlstate_means_lost)
}

/// SQLSTATEs after which the session's connection cannot be used any more.
pub fn sqlstate_means_lost(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_never_show_the_password() {
        let target = Target::parse(
            "host=db.example port=6432 user=app password=s3cret dbname=orders",
            "--dsn",
        )
        .expect("valid");
        assert_eq!(target.label, "app@db.example:6432/orders");
        assert!(!target.label.contains("s3cret"));
        let url =
            Target::parse("postgresql://app:s3cret@db.example/orders", "--dsn").expect("valid");
        assert_eq!(url.label, "app@db.example:5432/orders");
    }

    #[test]
    fn the_application_name_defaults_but_the_dsn_wins() {
        let target = Target::parse("host=h user=u", "--dsn").expect("valid");
        assert_eq!(
            target.config.get_application_name(),
            Some(DEFAULT_APPLICATION_NAME)
        );
        let target = Target::parse("host=h user=u application_name=mine", "--dsn").expect("valid");
        assert_eq!(target.config.get_application_name(), Some("mine"));
    }

    #[test]
    fn a_broken_dsn_is_refused_without_echoing_it() {
        let error = Target::parse("host=h password=s3cret port=notanumber", "--dsn")
            .err()
            .expect("refused");
        assert!(
            error.starts_with("--dsn: the DSN cannot be parsed"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn lost_connections_are_told_by_their_sqlstate() {
        for lost in ["08006", "08003", "57P01", "57P02", "57P03"] {
            assert!(sqlstate_means_lost(lost), "{lost}");
        }
        for alive in ["40001", "23505", "57014", "25P02"] {
            assert!(!sqlstate_means_lost(alive), "{alive}");
        }
    }
}
