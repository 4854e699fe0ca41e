//! Starting pgshift itself for a test: in-process (a [`TestProxy`] on the test's runtime) or
//! as the real binary (for signal tests), always from a TOML config written to a temp dir so
//! the config parser is exercised too.

use std::path::PathBuf;
use std::time::Duration;

use pgshift::config::Config;
use pgshift::proxy::{Proxy, ProxyOptions};

use super::{BULK_USER, ClusterPair, TEST_PASSWORD, TEST_USER, free_port};

/// A config for `pair` listening on a free port; `extra` is TOML appended to it (its own
/// sections, or keys for `[routing]`, which comes last).
pub fn config_text(pair: &ClusterPair, port: u16, extra_listen: &str, routing: &str) -> String {
    format!(
        r#"
[listen]
addr = "127.0.0.1:{port}"
login_timeout = "3s"
{extra_listen}

[blue]
host = "127.0.0.1"
port = {blue}
connect_timeout = "2s"

[green]
host = "127.0.0.1"
port = {green}
connect_timeout = "2s"

[metrics]
addr = ""

[routing]
{routing}
"#,
        blue = pair.blue.port(),
        green = pair.green.port(),
    )
}

/// Writes a config file into a fresh temp dir and returns both.
pub fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pgshift.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

/// pgshift running inside the test process.
pub struct TestProxy {
    pub proxy: Option<Proxy>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl TestProxy {
    /// Starts pgshift in front of `pair` with `[routing]` keys `routing` (and `[listen]` keys
    /// `extra_listen`); `seed` fixes the random draws.
    pub async fn start(
        pair: &ClusterPair,
        extra_listen: &str,
        routing: &str,
        seed: Option<u64>,
    ) -> TestProxy {
        let port = free_port();
        TestProxy::start_from_text(port, &config_text(pair, port, extra_listen, routing), seed)
            .await
    }

    /// Starts pgshift from a whole config text whose `[listen] addr` uses `port`.
    pub async fn start_from_text(port: u16, text: &str, seed: Option<u64>) -> TestProxy {
        let (dir, path) = write_config(text);
        let config =
            Config::load(&path).unwrap_or_else(|errors| panic!("test config invalid:\n{errors}"));
        let proxy = Proxy::start(
            config,
            ProxyOptions {
                routing_seed: seed,
                ..ProxyOptions::default()
            },
        )
        .await
        .expect("pgshift starts");
        TestProxy {
            proxy: Some(proxy),
            port,
            _dir: dir,
        }
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy running")
    }

    /// A DSN through the proxy.
    pub fn dsn(&self, user: &str, password: Option<&str>, dbname: &str) -> String {
        let mut dsn = format!(
            "host=127.0.0.1 port={} user={user} dbname={dbname}",
            self.port
        );
        if let Some(password) = password {
            dsn.push_str(&format!(" password={password}"));
        }
        dsn
    }

    /// The SCRAM test user on database `app`.
    pub fn app_dsn(&self) -> String {
        self.dsn(TEST_USER, Some(TEST_PASSWORD), "app")
    }

    /// The trusted bulk user (cheap logins) on database `app`.
    pub fn bulk_dsn(&self) -> String {
        self.dsn(BULK_USER, None, "app")
    }

    /// Connects with tokio-postgres through the proxy.
    pub async fn connect(
        &self,
        dsn: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Which cluster port served a new session for `dsn`.
    pub async fn served_port(&self, dsn: &str) -> u16 {
        let client = self.connect(dsn).await.expect("connect through pgshift");
        server_port(&client).await
    }

    /// Graceful shutdown, bounded so a broken test cannot hang.
    pub async fn stop(mut self) {
        if let Some(proxy) = self.proxy.take() {
            tokio::time::timeout(Duration::from_secs(30), proxy.shutdown())
                .await
                .expect("pgshift shuts down");
        }
    }
}

/// `inet_server_port()` of a connected session.
pub async fn server_port(client: &tokio_postgres::Client) -> u16 {
    let row = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("inet_server_port");
    row.get::<_, i32>(0) as u16
}

/// The SQLSTATE of a tokio-postgres error, as text.
pub fn sqlstate(error: &tokio_postgres::Error) -> Option<String> {
    error.code().map(|code| code.code().to_string())
}

/// The password of each test role (`None` for trusted ones).
pub fn password_of(user: &str) -> Option<&'static str> {
    match user {
        "pgshift_test" => Some(super::TEST_PASSWORD),
        "md5_user" => Some(super::MD5_PASSWORD),
        "plain_user" => Some(super::PLAIN_PASSWORD),
        _ => None,
    }
}

/// How a watched connection ended: the error that ended it, if any.
pub type Outcome = tokio::sync::oneshot::Receiver<Option<tokio_postgres::Error>>;

/// Connects to `dsn` (no TLS) and keeps the connection's [`Outcome`].
pub async fn connect_with_outcome(dsn: &str) -> (tokio_postgres::Client, Outcome) {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (ended, outcome) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = ended.send(connection.await.err());
    });
    (client, outcome)
}

/// Waits up to `wait` for the connection behind `outcome` to end with an error with `sqlstate`
/// (`what` says why it should end); returns that error.
pub async fn expect_ended_with(
    outcome: Outcome,
    wait: Duration,
    sqlstate: &str,
    what: &str,
) -> tokio_postgres::Error {
    let error = tokio::time::timeout(wait, outcome)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {wait:?}"))
        .expect("outcome")
        .unwrap_or_else(|| panic!("{what}: ended without an error"));
    assert_eq!(
        self::sqlstate(&error).as_deref(),
        Some(sqlstate),
        "{what}: {error}"
    );
    error
}

/// A whole pgshift (proxy, controller, admin socket) inside the test process, from a config
/// file in its own temp dir (where the admin socket and state file also live).
pub struct TestServer {
    pub server: Option<pgshift::server::Server>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl TestServer {
    /// Starts pgshift in front of `pair`; `extra` is TOML for sections other than `[listen]`
    /// and `[routing]` (placed before `[routing]`), `routing` the `[routing]` keys.
    pub async fn start(
        pair: &ClusterPair,
        extra: &str,
        routing: &str,
        seed: Option<u64>,
    ) -> TestServer {
        let port = free_port();
        let text = config_text(pair, port, "", &format!("{routing}\n{extra}"));
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("pgshift.toml");
        std::fs::write(&config_path, text).expect("write config");
        let mut server = TestServer {
            server: None,
            port,
            dir,
            config_path,
        };
        server.restart(seed).await.expect("pgshift starts");
        server
    }

    /// Starts (again) from the same config file and state file.
    pub async fn restart(&mut self, seed: Option<u64>) -> anyhow::Result<()> {
        self.restart_with(seed, false).await
    }

    /// Starts (again); `reset_state` discards the saved state as `run --reset-state` does.
    pub async fn restart_with(
        &mut self,
        seed: Option<u64>,
        reset_state: bool,
    ) -> anyhow::Result<()> {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let config =
            Config::load(&self.config_path).map_err(|errors| anyhow::anyhow!("{errors}"))?;
        let options = pgshift::server::ServerOptions {
            reset_state,
            proxy: ProxyOptions {
                routing_seed: seed,
                ..ProxyOptions::default()
            },
            store: None,
        };
        self.server =
            Some(pgshift::server::Server::start(config, self.config_path.clone(), options).await?);
        Ok(())
    }

    pub fn server(&self) -> &pgshift::server::Server {
        self.server.as_ref().expect("server running")
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("pgshift.sock")
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("pgshift-state.json")
    }

    /// Sends one admin command over the socket and returns the JSON reply.
    pub async fn admin(&self, line: &str) -> serde_json::Value {
        admin_command(&self.socket_path(), line).await
    }

    pub fn dsn(&self, user: &str, password: Option<&str>, dbname: &str) -> String {
        let mut dsn = format!(
            "host=127.0.0.1 port={} user={user} dbname={dbname}",
            self.port
        );
        if let Some(password) = password {
            dsn.push_str(&format!(" password={password}"));
        }
        dsn
    }

    pub fn app_dsn(&self) -> String {
        self.dsn(TEST_USER, Some(TEST_PASSWORD), "app")
    }

    pub fn bulk_dsn(&self) -> String {
        self.dsn(BULK_USER, None, "app")
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(30), server.shutdown())
                .await
                .expect("pgshift shuts down");
        }
    }
}

/// Sends one admin command line to the socket at `path` and parses the one-line reply.
pub async fn admin_command(path: &std::path::Path, line: &str) -> serde_json::Value {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect to the admin socket");
    stream
        .write_all(format!("{line}\n").as_bytes())
        .await
        .expect("send command");
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .await
        .expect("read reply");
    serde_json::from_str(&reply)
        .unwrap_or_else(|error| panic!("reply is not JSON ({error}): {reply}"))
}

/// `pg_backend_pid()` over the simple protocol.
pub async fn simple_backend_pid(client: &tokio_postgres::Client) -> i32 {
    let messages = client
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("pg_backend_pid");
    messages
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
            _ => None,
        })
        .expect("a pid row")
}

/// True when a proxy holds nothing for any session: no cancel key, no open session, no
/// registered session, no client slot.
pub fn nothing_left_behind(shared: &pgshift::proxy::Shared) -> bool {
    use pgshift::color::Color;
    shared.cancels.is_empty()
        && Color::ALL
            .iter()
            .all(|&color| shared.stats.color(color).sessions_open() == 0)
        && shared.sessions.count(None) == 0
        && shared.clients.load(std::sync::atomic::Ordering::Acquire) == 0
}

/// What a proxy still holds, for an assertion's message.
pub fn left_behind(shared: &pgshift::proxy::Shared) -> String {
    use pgshift::color::Color;
    format!(
        "cancel keys {}, blue sessions {}, green sessions {}, registered {}, slots {}",
        shared.cancels.len(),
        shared.stats.color(Color::Blue).sessions_open(),
        shared.stats.color(Color::Green).sessions_open(),
        shared.sessions.count(None),
        shared.clients.load(std::sync::atomic::Ordering::Acquire)
    )
}
