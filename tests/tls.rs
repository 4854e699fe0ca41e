//! TLS on both hops, with real Postgres and real clients: psql (`sslmode=require`,
//! `verify-full`, client certificates), tokio-postgres over rustls, Postgres 17's direct TLS
//! (a tokio-rustls client sending ALPN `postgresql` first), `tls_mode = "require"`, backends with
//! `ssl = on` reached with `verify-full` (and refused with a wrong CA or host name), the SCRAM
//! channel-binding matrix over all four hop combinations, 100 MiB each way through TLS,
//! certificate reload without dropping sessions, and `check` / `run` refusing bad TLS files.
//!
//! Every certificate and key is generated (rcgen, `support::certs`) into temp dirs; none is
//! committed.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pgshift::config::Config;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::certs::{self, Pki};
use support::pgshift::{TestProxy, sqlstate};
use support::wire::{self, error_code, error_field, message, startup_packet};
use support::{
    BULK_USER, ClusterPair, TEST_PASSWORD, TEST_USER, free_port, pg_bin_dir, shared_pair,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Configs, clients
// ---------------------------------------------------------------------------------------------

/// A whole config: `[listen]` on `port` with `listen` keys, each color's section with extra
/// keys, then `[routing]` keys.
fn config_text(
    port: u16,
    listen: &str,
    blue: (&str, u16, &str),
    green: (&str, u16, &str),
    routing: &str,
) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\nlogin_timeout = \"5s\"\n{listen}\n\
         [blue]\nhost = \"{}\"\nport = {}\nconnect_timeout = \"5s\"\n{}\n\
         [green]\nhost = \"{}\"\nport = {}\nconnect_timeout = \"5s\"\n{}\n\
         [routing]\n{routing}\n",
        blue.0, blue.1, blue.2, green.0, green.1, green.2
    )
}

/// A proxy on a free port from [`config_text`]'s parts.
async fn start_proxy(
    listen: &str,
    blue: (&str, u16, &str),
    green: (&str, u16, &str),
    routing: &str,
) -> TestProxy {
    let port = free_port();
    TestProxy::start_from_text(port, &config_text(port, listen, blue, green, routing), None).await
}

/// A proxy in front of the shared (plaintext) pair with client TLS `listen` keys.
async fn proxy_before_shared_pair(listen: &str) -> TestProxy {
    let pair = shared_pair();
    start_proxy(
        listen,
        ("127.0.0.1", pair.blue.port(), ""),
        ("127.0.0.1", pair.green.port(), ""),
        "green_weight = 0",
    )
    .await
}

/// Runs psql with a connection string (and more arguments) off the async workers, with a
/// clean environment.
async fn psql(conninfo: String, args: &[&str], home: &Path) -> Output {
    support::psql_clean(conninfo, args, home).await
}

fn text_of(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_ok(output: &Output, what: &str) -> String {
    let (stdout, stderr) = text_of(output);
    assert!(output.status.success(), "{what}: {stderr}{stdout}");
    stdout.trim().to_string()
}

fn assert_failed(output: &Output, what: &str, needles: &[&str]) -> String {
    let (stdout, stderr) = text_of(output);
    assert!(!output.status.success(), "{what} should fail: {stdout}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{what}: {needle:?} not in {stderr}"
        );
    }
    stderr
}

/// A TLS connection to pgshift's port as Postgres 17's `sslnegotiation=direct` opens it.
async fn direct_tls(
    port: u16,
    config: ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Reads messages until ReadyForQuery; panics on an error or EOF first.
async fn until_ready<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<(u8, Vec<u8>)> {
    let mut seen = Vec::new();
    loop {
        let (tag, body) = wire::read_plausible_message(stream, WAIT)
            .await
            .expect("a message");
        assert_ne!(
            tag,
            b'E',
            "error: {:?}",
            error_field(&body, b'M').unwrap_or_default()
        );
        if tag == b'Z' {
            return seen;
        }
        seen.push((tag, body));
    }
}

/// Logs in as the trusted bulk user over `stream` and runs `SELECT 41 + 1`.
async fn login_and_query<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    stream
        .write_all(&startup_packet(
            3,
            0,
            &[("user", BULK_USER), ("database", "app")],
        ))
        .await
        .expect("send startup");
    until_ready(stream).await;
    stream
        .write_all(&message(b'Q', b"SELECT 41 + 1\0"))
        .await
        .expect("send query");
    let rows = until_ready(stream).await;
    let row = rows
        .iter()
        .find(|(tag, _)| *tag == b'D')
        .expect("a DataRow");
    assert!(row.1.ends_with(b"42"), "{:?}", row.1);
}

/// SHA-256 in hex, as Postgres's `encode(sha256(...), 'hex')`.
fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(part);
    }
    context
        .finish()
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Backends with TLS
// ---------------------------------------------------------------------------------------------

/// A private blue/green pair with `ssl = on` (certificate `db.crt`: `localhost` only) and the
/// PKI that signed it; shared by the tests of this binary, removed at exit.
struct TlsBackends {
    pair: ClusterPair,
    pki: Pki,
}

fn tls_backends() -> &'static TlsBackends {
    static BACKENDS: OnceLock<TlsBackends> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        let pair = ClusterPair::start_private();
        let pki = Pki::create(pair.blue.root_dir().join("pki"));
        for cluster in pair.both() {
            certs::enable_ssl(cluster, &pki);
        }
        TlsBackends { pair, pki }
    })
}

/// Whether the backend of `client`'s session is on TLS.
async fn backend_ssl(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

async fn connect_tls(
    dsn: &str,
    pki: &Pki,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, pki.tokio_postgres_tls()).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A session of the bulk user to `database` through `proxy` must fail with 08006 (`what`
/// says why); returns the error's message.
async fn refused_with_08006(proxy: &TestProxy, database: &str, what: &str) -> String {
    let error = proxy
        .connect(&proxy.dsn(BULK_USER, None, database))
        .await
        .expect_err(what);
    assert_eq!(sqlstate(&error).as_deref(), Some("08006"), "{error}");
    error
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_sslmode_require_and_verify_full() {
    let pki = Pki::new();
    let proxy = proxy_before_shared_pair(&pki.listen("prefer")).await;
    let base = format!(
        "host=127.0.0.1 port={} user={BULK_USER} dbname=app",
        proxy.port
    );
    let home = pki.dir.clone();

    let output = psql(
        format!("{base} sslmode=require"),
        &["-c", "\\conninfo"],
        &home,
    )
    .await;
    let info = assert_ok(&output, "sslmode=require");
    assert!(info.contains("SSL connection (protocol: TLSv1."), "{info}");

    let verify = format!(
        "{base} sslmode=verify-full sslrootcert={}",
        pki.path("ca.crt").display()
    );
    let output = psql(verify.clone(), &["-c", "SELECT 'through ' || 'tls'"], &home).await;
    assert_eq!(assert_ok(&output, "verify-full"), "through tls");
    let by_name = verify.replace("host=127.0.0.1", "host=localhost");
    let output = psql(by_name, &["-c", "SELECT 1"], &home).await;
    assert_eq!(assert_ok(&output, "verify-full by host name"), "1");

    let wrong_root = format!(
        "{base} sslmode=verify-full sslrootcert={}",
        pki.path("other-ca.crt").display()
    );
    let output = psql(wrong_root, &["-c", "SELECT 1"], &home).await;
    assert_failed(
        &output,
        "verify-full with another CA",
        &["certificate verify failed"],
    );

    // tls_mode = "prefer" still serves plaintext clients.
    let output = psql(
        format!("{base} sslmode=disable"),
        &["-c", "SELECT 2"],
        &home,
    )
    .await;
    assert_eq!(assert_ok(&output, "plaintext under prefer"), "2");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_rustls_with_scram() {
    let pki = Pki::new();
    let proxy = proxy_before_shared_pair(&pki.listen("prefer")).await;
    // SCRAM through a TLS client hop and a plaintext backend hop: the backend offers no
    // channel binding, the client says "y", and a plaintext backend accepts that.
    let dsn = format!("{} sslmode=require", proxy.app_dsn());
    let client = connect_tls(&dsn, &pki).await.expect("connect over TLS");
    let row = client
        .query_one("SELECT current_user::text, $1::text", &[&"over rustls"])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), TEST_USER);
    assert_eq!(row.get::<_, String>(1), "over rustls");
    // tokio-postgres sends the cancel of a TLS session over TLS too (SSLRequest first).
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.query_one("SELECT pg_sleep(30)", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token
        .cancel_query(pki.tokio_postgres_tls())
        .await
        .expect("cancel sent");
    let error = sleeper.await.expect("join").expect_err("cancelled");
    assert_eq!(sqlstate(&error).as_deref(), Some("57014"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_postgresql() {
    let pki = Pki::new();
    let proxy = proxy_before_shared_pair(&pki.listen("require")).await;

    let mut stream = direct_tls(proxy.port, pki.client_config(Some(b"postgresql")))
        .await
        .expect("direct TLS handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    login_and_query(&mut stream).await;

    // Without ALPN the handshake may finish, but the connection is closed unanswered.
    let mut stream = direct_tls(proxy.port, pki.client_config(None))
        .await
        .expect("handshake without ALPN");
    let _ = stream
        .write_all(&startup_packet(
            3,
            0,
            &[("user", BULK_USER), ("database", "app")],
        ))
        .await;
    assert_eq!(wire::read_plausible_message(&mut stream, WAIT).await, None);

    // Another ALPN protocol: the handshake itself fails.
    assert!(
        direct_tls(proxy.port, pki.client_config(Some(b"h2")))
            .await
            .is_err()
    );

    // An SSLRequest, then the same handshake, works under tls_mode = "require" too.
    let mut tcp = wire::connect(proxy.port, WAIT).await;
    tcp.write_all(&wire::SSL_REQUEST).await.expect("SSLRequest");
    assert_eq!(wire::read_byte(&mut tcp, WAIT).await, b'S');
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(pki.client_config(None)))
        .connect(name, tcp)
        .await
        .expect("TLS after SSLRequest");
    login_and_query(&mut stream).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mode_require_refuses_plaintext_but_honours_plaintext_cancels() {
    let pki = Pki::new();
    let proxy = proxy_before_shared_pair(&pki.listen("require")).await;

    let mut tcp = wire::connect(proxy.port, WAIT).await;
    tcp.write_all(&startup_packet(
        3,
        0,
        &[("user", BULK_USER), ("database", "app")],
    ))
    .await
    .expect("send startup");
    let (tag, body) = wire::expect_message(&mut tcp, WAIT).await;
    let error = wire::raw_error(tag, &body);
    assert_eq!(
        (error.sqlstate.as_str(), error.message.as_str()),
        ("28000", "TLS required")
    );
    assert!(wire::read_until_closed(&mut tcp, WAIT).await.is_ok());

    let output = psql(
        format!(
            "host=127.0.0.1 port={} user={BULK_USER} dbname=app sslmode=disable",
            proxy.port
        ),
        &["-c", "SELECT 1"],
        &pki.dir,
    )
    .await;
    assert_failed(&output, "psql without TLS", &["TLS required"]);

    // psql's cancel (SIGINT) goes out in plaintext even for a TLS session.
    let output = tokio::task::spawn_blocking({
        let dsn = format!(
            "host=127.0.0.1 port={} user={BULK_USER} dbname=app sslmode=require",
            proxy.port
        );
        let home = pki.dir.clone();
        move || {
            let child = Command::new(pg_bin_dir().join("psql"))
                .env("HOME", home)
                .args(["-X", "-d", &dsn, "-c", "SELECT pg_sleep(30)"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("psql starts");
            std::thread::sleep(Duration::from_millis(1500));
            let started = Instant::now();
            let killed = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(killed.success());
            let output = child.wait_with_output().expect("psql ends");
            (output, started.elapsed())
        }
    })
    .await
    .expect("psql thread");
    let (output, took) = output;
    let (_, stderr) = text_of(&output);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");
    let stats = &proxy.proxy().shared().stats;
    assert_eq!(
        stats
            .cancel_forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_with_tls_client_ca() {
    let pki = Pki::new();
    let listen = format!(
        "{}tls_client_ca = {:?}\n",
        pki.listen("require"),
        pki.path("ca.crt")
    );
    let proxy = proxy_before_shared_pair(&listen).await;
    let base = format!(
        "host=127.0.0.1 port={} user={BULK_USER} dbname=app sslmode=verify-full sslrootcert={}",
        proxy.port,
        pki.path("ca.crt").display()
    );
    let with_cert = format!(
        "{base} sslcert={} sslkey={}",
        pki.path("client.crt").display(),
        pki.path("client.key").display()
    );
    let output = psql(with_cert, &["-c", "SELECT 'mutual'"], &pki.dir).await;
    assert_eq!(assert_ok(&output, "with a client certificate"), "mutual");
    let output = psql(base, &["-c", "SELECT 1"], &pki.dir).await;
    assert_failed(&output, "without a client certificate", &[]);
    let foreign = format!(
        "host=127.0.0.1 port={} user={BULK_USER} dbname=app sslmode=require sslcert={} sslkey={}",
        proxy.port,
        pki.path("other-server.crt").display(),
        pki.path("other-server.key").display()
    );
    let output = psql(foreign, &["-c", "SELECT 1"], &pki.dir).await;
    assert_failed(&output, "with a certificate of another CA", &[]);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Backend side
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_with_tls_verify_full_and_its_failures() {
    let backends = tls_backends();
    let (pair, pki) = (&backends.pair, &backends.pki);
    let ca = format!("ca_file = {:?}\n", pki.path("ca.crt"));
    // blue: verify-full by host name; green: verify-full by IP, which db.crt does not name.
    let proxy = start_proxy(
        "",
        (
            "localhost",
            pair.blue.port(),
            &format!("tls = \"verify-full\"\n{ca}"),
        ),
        (
            "127.0.0.1",
            pair.green.port(),
            &format!("tls = \"verify-full\"\n{ca}"),
        ),
        "green_weight = 0\n[[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"green\"\n",
    )
    .await;
    let blue = proxy
        .connect(&proxy.dsn(BULK_USER, None, "app"))
        .await
        .expect("blue over verify-full");
    assert!(backend_ssl(&blue).await, "blue's hop is TLS");
    let message = refused_with_08006(
        &proxy,
        "tenant_42",
        "green's certificate does not name 127.0.0.1",
    )
    .await;
    assert!(
        message.contains("TLS to the green database") && message.contains("not valid for name"),
        "{message}"
    );
    proxy.stop().await;

    // A wrong CA: 08006 naming the color and the reason.
    let proxy = start_proxy(
        "",
        ("127.0.0.1", pair.blue.port(), "tls = \"require\"\n"),
        (
            "localhost",
            pair.green.port(),
            &format!(
                "tls = \"verify-full\"\nca_file = {:?}\n",
                pki.path("other-ca.crt")
            ),
        ),
        "green_weight = 100",
    )
    .await;
    let message = refused_with_08006(
        &proxy,
        "app",
        "green's certificate is not signed by other-ca",
    )
    .await;
    assert!(
        message.contains("green") && message.contains("UnknownIssuer"),
        "{message}"
    );
    proxy.stop().await;

    // require without a CA: encrypted, not verified (blue by IP works).
    let proxy = start_proxy(
        "",
        ("127.0.0.1", pair.blue.port(), "tls = \"require\"\n"),
        ("127.0.0.1", pair.green.port(), ""),
        "green_weight = 0",
    )
    .await;
    let blue = proxy
        .connect(&proxy.dsn(BULK_USER, None, "app"))
        .await
        .expect("blue over require");
    assert!(backend_ssl(&blue).await);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_require_against_a_plaintext_server_fails_and_prefer_falls_back() {
    let pair = shared_pair();
    let proxy = start_proxy(
        "",
        ("127.0.0.1", pair.blue.port(), "tls = \"prefer\"\n"),
        ("127.0.0.1", pair.green.port(), "tls = \"require\"\n"),
        "green_weight = 0\n[[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"green\"\n",
    )
    .await;
    let blue = proxy
        .connect(&proxy.dsn(BULK_USER, None, "app"))
        .await
        .expect("prefer goes on in plaintext");
    assert!(!backend_ssl(&blue).await);
    let message = refused_with_08006(&proxy, "tenant_42", "green refuses TLS").await;
    assert!(
        message.contains("green") && message.contains("does not accept TLS"),
        "{message}"
    );
    proxy.stop().await;
}

/// SCRAM with libpq's default `channel_binding=prefer` in all four hop combinations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_channel_binding_in_all_four_hop_combinations() {
    let backends = tls_backends();
    let (pair, pki) = (&backends.pair, &backends.pki);
    // Database app goes to blue over plaintext, tenant_42 to green over TLS.
    let proxy = start_proxy(
        &pki.listen("prefer"),
        ("127.0.0.1", pair.blue.port(), "tls = \"disable\"\n"),
        (
            "localhost",
            pair.green.port(),
            &format!(
                "tls = \"verify-full\"\nca_file = {:?}\n",
                pki.path("ca.crt")
            ),
        ),
        "green_weight = 0\n[[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"green\"\n",
    )
    .await;
    let port = proxy.port;
    let dsn = |client_tls: bool, database: &str| {
        format!(
            "host=127.0.0.1 port={port} user={TEST_USER} password={TEST_PASSWORD} dbname={database} sslmode={}",
            if client_tls { "require" } else { "disable" }
        )
    };
    let query = "SELECT (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), current_user";
    for (client_tls, database, backend_tls) in [
        (false, "app", false),
        (true, "app", false),
        (false, "tenant_42", true),
    ] {
        let output = psql(dsn(client_tls, database), &["-c", query], &pki.dir).await;
        let what = format!("client TLS {client_tls}, backend TLS {backend_tls}");
        let expected = format!("{}|{TEST_USER}", if backend_tls { "t" } else { "f" });
        assert_eq!(assert_ok(&output, &what), expected, "{what}");
    }

    // TLS on both hops: 28000 naming the fixes, and the backend never sees the binding.
    let output = psql(dsn(true, "tenant_42"), &["-c", "SELECT 1"], &pki.dir).await;
    assert_failed(
        &output,
        "TLS on both hops",
        &[
            "cannot relay SCRAM channel binding",
            "channel_binding=disable",
            "plaintext",
        ],
    );
    let error = connect_tls(
        &format!(
            "host=127.0.0.1 port={port} user={TEST_USER} password={TEST_PASSWORD} dbname=tenant_42 sslmode=require"
        ),
        pki,
    )
    .await
    .expect_err("tokio-postgres binds too");
    assert_eq!(sqlstate(&error).as_deref(), Some("28000"), "{error}");
    let db_error = error.as_db_error().expect("a server error");
    assert!(
        db_error
            .hint()
            .is_some_and(|hint| hint.contains("channel_binding=disable")
                && hint.contains("auth termination")),
        "{db_error:?}"
    );

    // ... and with channel_binding=disable it logs in.
    let output = psql(
        format!("{} channel_binding=disable", dsn(true, "tenant_42")),
        &["-c", query],
        &pki.dir,
    )
    .await;
    assert_eq!(
        assert_ok(&output, "both hops TLS, channel_binding=disable"),
        format!("t|{TEST_USER}")
    );
    proxy.stop().await;
}

/// 100 MiB to the client and 16 MiB to the backend through TLS on both hops, checksummed on
/// both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_mib_through_tls_keeps_its_checksum() {
    let backends = tls_backends();
    let (pair, pki) = (&backends.pair, &backends.pki);
    let proxy = start_proxy(
        &pki.listen("require"),
        (
            "localhost",
            pair.blue.port(),
            &format!(
                "tls = \"verify-full\"\nca_file = {:?}\n",
                pki.path("ca.crt")
            ),
        ),
        ("127.0.0.1", pair.green.port(), ""),
        "green_weight = 0",
    )
    .await;
    let client = connect_tls(
        &format!("{} sslmode=require", proxy.dsn(BULK_USER, None, "app")),
        pki,
    )
    .await
    .expect("connect");
    assert!(backend_ssl(&client).await);

    const ROWS: i32 = 100 * 1024;
    let row_text = "repeat(md5(g::text), 32)"; // 1 KiB per row
    let expected: String = client
        .query_one(
            &format!(
                "SELECT encode(sha256(convert_to(string_agg({row_text}, '' ORDER BY g), 'UTF8')), 'hex') \
                 FROM generate_series(1, {ROWS}) g"
            ),
            &[],
        )
        .await
        .expect("server-side checksum")
        .get(0);
    let rows = client
        .query_raw(
            &format!("SELECT {row_text} FROM generate_series(1, {ROWS}) g ORDER BY g"),
            std::iter::empty::<i32>(),
        )
        .await
        .expect("query");
    let mut rows = std::pin::pin!(rows);
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut bytes = 0usize;
    let mut count = 0;
    while let Some(row) = rows.next().await {
        let row = row.expect("row");
        let text: &str = row.get(0);
        context.update(text.as_bytes());
        bytes += text.len();
        count += 1;
    }
    assert_eq!((count, bytes), (ROWS, 100 << 20));
    let received: String = context
        .finish()
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    assert_eq!(received, expected);

    // The other way: a 16 MiB parameter, hashed by the backend.
    let upload: String = (0..16 * 1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let hashed: String = client
        .query_one(
            "SELECT encode(sha256(convert_to($1, 'UTF8')), 'hex')",
            &[&upload],
        )
        .await
        .expect("upload")
        .get(0);
    assert_eq!(hashed, sha256_hex(&[upload.as_bytes()]));
    proxy.stop().await;
}

/// A TLS client that reads slowly still gets every byte: records rustls queued while the
/// socket was full are flushed once it drains, even after the relay's buffer is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tls_reader_gets_the_last_bytes() {
    let pki = Pki::new();
    let proxy = proxy_before_shared_pair(&pki.listen("require")).await;
    let mut stream = direct_tls(proxy.port, pki.client_config(Some(b"postgresql")))
        .await
        .expect("direct TLS");
    stream
        .write_all(&startup_packet(
            3,
            0,
            &[("user", BULK_USER), ("database", "app")],
        ))
        .await
        .expect("startup");
    until_ready(&mut stream).await;
    stream
        .write_all(&message(
            b'Q',
            b"SELECT repeat('x', 1000) FROM generate_series(1, 20000)\0",
        ))
        .await
        .expect("query");
    // Read slower than pgshift writes, so its socket stays full until the very end.
    let mut rows = 0;
    loop {
        let (tag, _) = wire::read_plausible_message(&mut stream, WAIT)
            .await
            .unwrap_or_else(|| panic!("stalled after {rows} rows"));
        match tag {
            b'D' => {
                rows += 1;
                if rows % 16 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            b'Z' => break,
            b'E' => panic!("error after {rows} rows"),
            _ => {}
        }
    }
    assert_eq!(rows, 20000);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Reload and bad files
// ---------------------------------------------------------------------------------------------

/// The certificate pgshift presents to a new handshake.
async fn presented_certificate(port: u16, pki: &Pki) -> Vec<u8> {
    let mut roots = pki.roots("ca.crt");
    for cert in pki.roots("other-ca.crt").roots {
        roots.roots.push(cert);
    }
    let config = certs::client_config(roots, Some(b"postgresql"));
    let stream = direct_tls(port, config).await.expect("handshake");
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a certificate")
        .to_vec()
}

fn der_of(pki: &Pki, name: &str) -> Vec<u8> {
    CertificateDer::from_pem_file(pki.path(name))
        .expect("certificate")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_sessions() {
    let pki = Pki::new();
    let live = pki.dir.join("live");
    fs::create_dir(&live).expect("dir");
    let install = |name: &str| {
        for ext in ["crt", "key"] {
            fs::copy(
                pki.path(&format!("{name}.{ext}")),
                live.join(format!("pgshift.{ext}")),
            )
            .expect("copy");
        }
    };
    install("server");
    let pair = shared_pair();
    let port = free_port();
    let text = config_text(
        port,
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            live.join("pgshift.crt"),
            live.join("pgshift.key")
        ),
        ("127.0.0.1", pair.blue.port(), ""),
        ("127.0.0.1", pair.green.port(), ""),
        "green_weight = 0",
    );
    let config_path = pki.dir.join("pgshift.toml");
    fs::write(&config_path, &text).expect("config");
    let config = || Config::load(&config_path).expect("config");
    let proxy = TestProxy::start_from_text(port, &text, None).await;
    let tls = &proxy.proxy().shared().tls;

    assert_eq!(
        presented_certificate(port, &pki).await,
        der_of(&pki, "server.crt")
    );
    let mut open = direct_tls(port, pki.client_config(Some(b"postgresql")))
        .await
        .expect("session before the reload");
    login_and_query(&mut open).await;

    install("other-server");
    tls.reload(&config()).expect("reload");
    assert_eq!(
        presented_certificate(port, &pki).await,
        der_of(&pki, "other-server.crt")
    );
    // The session opened before the reload goes on.
    open.write_all(&message(b'Q', b"SELECT 41 + 1\0"))
        .await
        .expect("query after reload");
    let rows = until_ready(&mut open).await;
    assert!(
        rows.iter()
            .any(|(tag, body)| *tag == b'D' && body.ends_with(b"42"))
    );

    // A broken reload changes nothing and says why.
    fs::copy(pki.path("server.key"), live.join("pgshift.key")).expect("copy");
    let error = tls.reload(&config()).expect_err("mismatched key");
    assert!(
        error.contains("pgshift.key") && error.contains("does not match"),
        "{error}"
    );
    assert_eq!(
        presented_certificate(port, &pki).await,
        der_of(&pki, "other-server.crt")
    );
    proxy.stop().await;
}

/// `pgshift check` and `pgshift run` on a config whose TLS files are wrong.
fn pgshift_bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("pgshift runs")
}

#[test]
fn check_and_run_refuse_bad_tls_files() {
    let pki = Pki::new();
    let cases = [
        (
            "missing key",
            pki.path("server.crt"),
            pki.dir.join("missing.key"),
            "cannot read it: no such file",
        ),
        (
            "mismatched key",
            pki.path("server.crt"),
            pki.path("client.key"),
            "does not match the certificate",
        ),
        (
            "expired certificate",
            pki.path("expired.crt"),
            pki.path("expired.key"),
            "expired on",
        ),
        (
            "not a certificate",
            pki.path("server.key"),
            pki.path("server.key"),
            "holds no certificate",
        ),
    ];
    for (what, cert, key, reason) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("pgshift.toml");
        let port = free_port();
        fs::write(
            &config,
            format!(
                "[listen]\naddr = \"127.0.0.1:{port}\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
                 [metrics]\naddr = \"\"\n\
                 [blue]\nhost = \"127.0.0.1\"\nport = 1\n[green]\nhost = \"127.0.0.1\"\nport = 2\n"
            ),
        )
        .expect("config");
        let config = config.to_str().expect("utf-8 path");
        let named = if reason == "does not match the certificate" || what == "missing key" {
            key.display().to_string()
        } else {
            cert.display().to_string()
        };

        let output = pgshift_bin(&["check", "--config", config]);
        let (stdout, stderr) = text_of(&output);
        assert!(!output.status.success(), "{what}: check passed: {stdout}");
        assert!(
            stderr.contains(&named) && stderr.contains(reason),
            "{what}: check says {stderr}"
        );

        let started = Instant::now();
        let output = pgshift_bin(&["run", "--config", config]);
        let (stdout, stderr) = text_of(&output);
        assert!(!output.status.success(), "{what}: run started: {stdout}");
        assert!(
            stderr.contains(&named) && stderr.contains(reason),
            "{what}: run says {stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    // A good pair passes check, which says what it loaded.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("pgshift.toml");
    fs::write(
        &config,
        format!(
            "[listen]\ntls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n\
             [blue]\nhost = \"localhost\"\nport = 1\ntls = \"verify-full\"\nca_file = {:?}\n\
             [green]\nhost = \"127.0.0.1\"\nport = 2\n",
            pki.path("server.crt"),
            pki.path("server.key"),
            pki.path("ca.crt"),
            pki.path("ca.crt"),
        ),
    )
    .expect("config");
    let output = pgshift_bin(&["check", "--config", config.to_str().expect("utf-8")]);
    let (stdout, stderr) = text_of(&output);
    assert!(output.status.success(), "{stderr}{stdout}");
    assert!(
        stdout.contains("[tls] listen.tls_cert") && stdout.contains("valid until"),
        "{stdout}"
    );
    assert!(stdout.contains("[tls] blue.ca_file"), "{stdout}");
    assert!(
        stdout.contains("TLS verify-full: certificate and host name verified"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_startup_after_tls_handshake_bytes_is_not_misread() {
    // A client that sends an SSLRequest followed at once by a StartupMessage (bytes not meant
    // for a TLS stream) is refused as Postgres refuses it.
    let pki = Pki::new();
    let proxy = proxy_before_shared_pair(&pki.listen("prefer")).await;
    let mut tcp = wire::connect(proxy.port, WAIT).await;
    let mut bytes = wire::SSL_REQUEST.to_vec();
    bytes.extend(startup_packet(3, 0, &[("user", BULK_USER)]));
    tcp.write_all(&bytes).await.expect("send");
    assert_eq!(wire::read_byte(&mut tcp, WAIT).await, b'S');
    let received = wire::read_until_closed(&mut tcp, WAIT)
        .await
        .expect("closed");
    let messages = wire::split_messages(&received);
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(error_code(&messages[0].1).as_deref(), Some("08P01"));
    proxy.stop().await;
}
