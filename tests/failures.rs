//! What clients see when something goes wrong (CONTRACT.md, "What clients see when something
//! is wrong"), against real Postgres clusters: a stopped green (08006 naming the color and
//! address, `fallback_on_connect_error`, pins that do not fall back), abusive or broken first
//! packets sent over raw sockets (08P01, 0A000, 28000, silence before a StartupMessage,
//! `login_timeout`, `max_clients`), and backends terminated or SIGKILLed under a live session.
//!
//! Every raw-socket read has a deadline, so no test can hang on a proxy that misbehaves.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgshift::color::Color;
use support::pgshift::{TestProxy, server_port, simple_backend_pid, sqlstate};
use support::wire::{
    GSSENC_REQUEST, RawError, SSL_REQUEST, TERMINATE, cancel_packet, error_field, expect_message,
    raw_error, read_byte, read_until_closed, send_query, split_messages, startup_packet,
};
use support::{BULK_USER, ClusterPair, TEST_USER, shared_pair};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Raw-protocol helpers (the wire format itself is in `support::wire`)
// ---------------------------------------------------------------------------

/// The harness's `[listen] login_timeout`.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(3);

const PROTOCOL_3_0: u32 = 3 << 16;
/// The two requests a client may send before its StartupMessage, with their names.
const ENCRYPTION_REQUESTS: [([u8; 8], &str); 2] = [
    (SSL_REQUEST, "SSLRequest"),
    (GSSENC_REQUEST, "GSSENCRequest"),
];

/// A protocol 3.0 StartupMessage for the trusted bulk user and database `app`.
fn bulk_startup() -> Vec<u8> {
    startup_packet(3, 0, &[("user", BULK_USER), ("database", "app")])
}

/// The first 20 bytes of a StartupMessage whose length word claims 100.
fn truncated_startup() -> Vec<u8> {
    let mut partial = 100u32.to_be_bytes().to_vec();
    partial.extend(PROTOCOL_3_0.to_be_bytes());
    partial.extend_from_slice(b"user\0bulk\0");
    partial.resize(20, 0);
    partial
}

async fn raw_connect(proxy: &TestProxy) -> TcpStream {
    support::wire::connect(proxy.port, PROMPT).await
}

/// A raw connection that has sent `request` (SSLRequest or GSSENCRequest, perhaps with more
/// bytes behind it) and read the answer, which must be `N`.
async fn declined(proxy: &TestProxy, request: &[u8], what: &str) -> TcpStream {
    let mut stream = raw_connect(proxy).await;
    stream.write_all(request).await.expect("send");
    assert_eq!(read_byte(&mut stream, PROMPT).await, b'N', "{what}");
    stream
}

/// A raw connection that has sent [`bulk_startup`].
async fn raw_bulk_login(proxy: &TestProxy) -> TcpStream {
    let mut stream = raw_connect(proxy).await;
    stream
        .write_all(&bulk_startup())
        .await
        .expect("send startup");
    stream
}

/// Reads to the close (within [`PROMPT`]) and expects exactly one ErrorResponse: a FATAL with
/// `sqlstate`.
async fn expect_fatal_then_close(stream: &mut TcpStream, sqlstate: &str, what: &str) -> RawError {
    let bytes = read_until_closed(stream, PROMPT)
        .await
        .unwrap_or_else(|got| {
            panic!("{what}: connection still open after {PROMPT:?}; got {got:?}")
        });
    let messages = split_messages(&bytes);
    assert_eq!(
        messages.len(),
        1,
        "{what}: expected one ErrorResponse, got {:?}",
        messages
            .iter()
            .map(|(tag, body)| (*tag as char, String::from_utf8_lossy(body).into_owned()))
            .collect::<Vec<_>>()
    );
    let error = raw_error(messages[0].0, &messages[0].1);
    assert_eq!(error.severity, "FATAL", "{what}: {error:?}");
    assert_eq!(error.sqlstate, sqlstate, "{what}: {error:?}");
    error
}

/// Sends `bytes` on a new raw connection and expects one ErrorResponse with `sqlstate`.
async fn expect_refusal(proxy: &TestProxy, bytes: &[u8], sqlstate: &str, what: &str) -> RawError {
    let mut stream = raw_connect(proxy).await;
    stream.write_all(bytes).await.expect("send");
    expect_fatal_then_close(&mut stream, sqlstate, what).await
}

/// After a StartupMessage for a trusted user: AuthenticationOk … ReadyForQuery (idle).
async fn expect_trusted_login(stream: &mut TcpStream, what: &str) {
    let (tag, body) = expect_message(stream, PROMPT).await;
    assert_eq!(tag, b'R', "{what}: first message {:?}", tag as char);
    assert_eq!(&body[..4], &0u32.to_be_bytes(), "{what}: AuthenticationOk");
    let mut seen = Vec::new();
    loop {
        let (tag, body) = expect_message(stream, PROMPT).await;
        seen.push(tag as char);
        assert_ne!(tag, b'E', "{what}: error {:?}", error_field(&body, b'M'));
        if tag == b'Z' {
            assert_eq!(body, b"I", "{what}: idle after login");
            break;
        }
        assert!(seen.len() < 100, "{what}: no ReadyForQuery in {seen:?}");
    }
    assert!(seen.contains(&'K'), "{what}: BackendKeyData in {seen:?}");
}

/// Sends Terminate and keeps the socket open: the server closes it, saying nothing (as
/// Postgres does; the backend closing after a Terminate is not a lost backend).
async fn expect_quiet_terminate(stream: &mut TcpStream, what: &str) {
    stream.write_all(&TERMINATE).await.expect("Terminate");
    let rest = read_until_closed(stream, PROMPT)
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after Terminate"));
    let said: Vec<_> = split_messages(&rest)
        .iter()
        .map(|(tag, body)| match tag {
            b'E' => format!("{:?}", raw_error(*tag, body)),
            _ => format!("{:?}", *tag as char),
        })
        .collect();
    assert!(
        rest.is_empty(),
        "{what}: messages after Terminate: {said:?}"
    );
}

/// A normal tokio-postgres session through the proxy still works.
async fn assert_proxy_serves(proxy: &TestProxy, what: &str) {
    let client = tokio::time::timeout(PROMPT, proxy.connect(&proxy.bulk_dsn()))
        .await
        .unwrap_or_else(|_| panic!("after {what}: connect timed out"))
        .unwrap_or_else(|error| panic!("after {what}: connect failed: {error}"));
    let row = client
        .query_one("SELECT 41 + 1", &[])
        .await
        .unwrap_or_else(|error| panic!("after {what}: query failed: {error}"));
    assert_eq!(row.get::<_, i32>(0), 42, "after {what}");
}

/// Connects without the harness so the connection task's own result (an unsolicited FATAL
/// arrives there) can be awaited.
async fn connect_watched(
    dsn: &str,
) -> (
    tokio_postgres::Client,
    JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) =
        tokio::time::timeout(PROMPT, tokio_postgres::connect(dsn, tokio_postgres::NoTls))
            .await
            .expect("connect in time")
            .unwrap_or_else(|error| panic!("connect {dsn}: {error}"));
    (client, tokio::spawn(connection))
}

fn db_message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| format!("(not a database error) {error}"))
}

/// Waits (up to 3 s) until backend `pid` is running `pg_sleep`, seen from a direct connection;
/// panics if it does not.
async fn expect_sleeping(admin: &tokio_postgres::Client, pid: i32) {
    let deadline = Instant::now() + PROMPT;
    while Instant::now() < deadline {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active' \
                 AND query LIKE '%pg_sleep%'",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity");
        if row.get::<_, i64>(0) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("pg_sleep did not start on backend {pid}");
}

/// A superuser connection straight to blue (not through pgshift).
async fn blue_admin(pair: &ClusterPair) -> tokio_postgres::Client {
    pair.blue
        .connect(support::SUPERUSER, None, "postgres")
        .await
        .expect("superuser connection to blue")
}

/// `pg_terminate_backend(pid)`, which must succeed.
async fn terminate_backend(admin: &tokio_postgres::Client, pid: i32) {
    let terminated: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate")
        .get(0);
    assert!(terminated);
}

/// Every color's `request_errors` counter.
fn request_errors(proxy: &TestProxy) -> Vec<u64> {
    Color::ALL
        .iter()
        .map(|&color| {
            proxy
                .proxy()
                .shared()
                .stats
                .color(color)
                .snapshot()
                .request_errors
        })
        .collect()
}

/// The proxy's `cancel_unknown` counter.
fn cancel_unknown(proxy: &TestProxy) -> u64 {
    proxy
        .proxy()
        .shared()
        .stats
        .cancel_unknown
        .load(Ordering::Relaxed)
}

/// Sends a CancelRequest on a new raw connection: the proxy closes it without a word.
async fn expect_silent_cancel(proxy: &TestProxy, pid: i32, secret: &[u8], what: &str) {
    let mut stream = raw_connect(proxy).await;
    stream
        .write_all(&cancel_packet(pid, secret))
        .await
        .expect("send");
    let bytes = read_until_closed(&mut stream, PROMPT)
        .await
        .unwrap_or_else(|got| panic!("{what}: not closed after {PROMPT:?} ({got:?})"));
    assert!(
        bytes.is_empty(),
        "{what}: nothing is sent for a cancel: {bytes:?}"
    );
}

/// How long after `started` the proxy closed `stream` (within `limit`), and what it sent.
async fn closed_after(
    stream: &mut TcpStream,
    started: Instant,
    limit: Duration,
    what: &str,
) -> (Duration, Vec<u8>) {
    let bytes = read_until_closed(stream, limit)
        .await
        .unwrap_or_else(|got| panic!("{what} is not closed within {limit:?} ({got:?})"));
    (started.elapsed(), bytes)
}

/// Polls `condition` every 20 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn private_pair() -> ClusterPair {
    tokio::task::spawn_blocking(ClusterPair::start_private)
        .await
        .expect("private pair starts")
}

// ---------------------------------------------------------------------------
// 1. Green stopped
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_green_gives_08006_or_falls_back_to_blue() {
    let pair = private_pair().await;
    let (blue, green) = (pair.blue.port(), pair.green.port());
    tokio::task::block_in_place(|| pair.green.stop());
    let green_address = format!("127.0.0.1:{green}");

    // Everything to green, except a pin that keeps other_db on blue.
    let routing =
        "green_weight = 100\n[[routing.pin]]\ndatabase = \"other_db\"\ncolor = \"blue\"\n";
    let proxy = TestProxy::start(&pair, "", routing, None).await;
    let started = Instant::now();
    let error = proxy
        .connect(&proxy.bulk_dsn())
        .await
        .expect_err("a session routed to a stopped green fails");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(4),
        "the failure took {elapsed:?}"
    );
    assert_eq!(sqlstate(&error).as_deref(), Some("08006"), "{error}");
    let message = db_message(&error);
    assert!(
        message.contains("green"),
        "message names the color: {message}"
    );
    assert!(
        message.contains(&green_address),
        "message names {green_address}: {message}"
    );
    let stats = proxy.proxy().shared().stats.color(Color::Green).snapshot();
    assert!(stats.connect_errors >= 1, "{stats:?}");
    assert_eq!(stats.fallbacks, 0, "no fallback unless configured");
    // Blue keeps working through the same proxy meanwhile.
    let pinned_to_blue = proxy.dsn(BULK_USER, None, "other_db");
    for _ in 0..3 {
        assert_eq!(proxy.served_port(&pinned_to_blue).await, blue);
    }

    // With fallback_on_connect_error, a weighted session goes to blue; a pinned one does not.
    let routing = "green_weight = 100\nfallback_on_connect_error = true\n\
                   [[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"green\"\n";
    let fallback = TestProxy::start(&pair, "", routing, None).await;
    let green_stats = || {
        fallback
            .proxy()
            .shared()
            .stats
            .color(Color::Green)
            .snapshot()
    };
    let before = green_stats();
    let started = Instant::now();
    assert_eq!(fallback.served_port(&fallback.bulk_dsn()).await, blue);
    assert!(started.elapsed() < Duration::from_secs(4));
    let after = green_stats();
    assert!(
        after.fallbacks > before.fallbacks,
        "fallbacks {} -> {}",
        before.fallbacks,
        after.fallbacks
    );
    assert!(after.connect_errors >= 1, "{after:?}");
    // The SCRAM user falls back too (nothing reached the client before the fallback).
    let client = fallback
        .connect(&fallback.app_dsn())
        .await
        .expect("SCRAM session falls back to blue");
    assert_eq!(server_port(&client).await, blue);
    drop(client);

    let pinned_to_green = fallback.dsn(BULK_USER, None, "tenant_42");
    let error = fallback
        .connect(&pinned_to_green)
        .await
        .expect_err("a session pinned to a stopped green does not fall back");
    assert_eq!(sqlstate(&error).as_deref(), Some("08006"), "{error}");
    let message = db_message(&error);
    assert!(
        message.contains("green") && message.contains(&green_address),
        "{message}"
    );

    // Green back: sessions reach it again, through both proxies.
    tokio::task::block_in_place(|| pair.green.start());
    assert_eq!(proxy.served_port(&proxy.bulk_dsn()).await, green);
    assert_eq!(fallback.served_port(&fallback.bulk_dsn()).await, green);
    assert_eq!(fallback.served_port(&pinned_to_green).await, green);
    let fallbacks_now = green_stats().fallbacks;
    assert_eq!(fallback.served_port(&fallback.app_dsn()).await, green);
    assert_eq!(
        green_stats().fallbacks,
        fallbacks_now,
        "no fallback once green is up"
    );
    proxy.stop().await;
    fallback.stop().await;
}

// ---------------------------------------------------------------------------
// 2. Raw-socket startup abuse
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_are_refused_with_the_contract_sqlstates() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let valid = [("user", BULK_USER), ("database", "app")];

    for length in [10_001u32, 1 << 20, u32::MAX] {
        let mut packet = length.to_be_bytes().to_vec();
        packet.extend(PROTOCOL_3_0.to_be_bytes());
        let what = format!("length word {length}");
        let error = expect_refusal(&proxy, &packet, "08P01", &what).await;
        assert!(error.message.contains("length"), "{what}: {error:?}");
        assert_proxy_serves(&proxy, &what).await;
    }

    for length in [0u32, 4, 7] {
        let what = format!("length word {length}");
        expect_refusal(&proxy, &length.to_be_bytes(), "08P01", &what).await;
        assert_proxy_serves(&proxy, &what).await;
    }

    let what = "protocol 2.0";
    let error = expect_refusal(&proxy, &startup_packet(2, 0, &valid), "0A000", what).await;
    assert!(error.message.contains("protocol"), "{error:?}");
    assert_proxy_serves(&proxy, what).await;

    let what = "protocol 4.0";
    expect_refusal(&proxy, &startup_packet(4, 0, &valid), "0A000", what).await;
    assert_proxy_serves(&proxy, what).await;

    let what = "no user parameter";
    let error = expect_refusal(
        &proxy,
        &startup_packet(3, 0, &[("database", "app")]),
        "28000",
        what,
    )
    .await;
    assert!(error.message.contains("user"), "{error:?}");
    assert_proxy_serves(&proxy, what).await;

    let what = "unterminated parameter list";
    let mut unterminated = startup_packet(3, 0, &valid);
    unterminated.pop();
    let length = unterminated.len() as u32;
    unterminated[..4].copy_from_slice(&length.to_be_bytes());
    expect_refusal(&proxy, &unterminated, "08P01", what).await;
    assert_proxy_serves(&proxy, what).await;

    let what = "a parameter name without a value";
    let mut dangling = PROTOCOL_3_0.to_be_bytes().to_vec();
    dangling.extend_from_slice(b"user\0");
    let mut packet = ((dangling.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(dangling);
    expect_refusal(&proxy, &packet, "08P01", what).await;
    assert_proxy_serves(&proxy, what).await;

    let what = "a lying length, then the write half closed";
    let mut stream = raw_connect(&proxy).await;
    stream.write_all(&truncated_startup()).await.expect("send");
    stream.shutdown().await.expect("close the write half");
    let bytes = read_until_closed(&mut stream, PROMPT)
        .await
        .unwrap_or_else(|got| panic!("{what}: still open after {PROMPT:?} ({got:?})"));
    // The contract allows nothing or an 08P01 here; anything else is wrong.
    for (tag, body) in split_messages(&bytes) {
        let error = raw_error(tag, &body);
        assert_eq!(error.sqlstate, "08P01", "{what}: {error:?}");
    }
    assert_proxy_serves(&proxy, what).await;

    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_answered_n() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let startup = bulk_startup();

    for (request, name) in ENCRYPTION_REQUESTS {
        let mut stream = declined(&proxy, &request, &format!("{name} answered N")).await;
        stream.write_all(&startup).await.expect("send startup");
        expect_trusted_login(&mut stream, &format!("login after {name}")).await;
        // A query on the raw session, to be sure it is relayed.
        send_query(&mut stream, "SELECT 7").await;
        let mut tags = Vec::new();
        loop {
            let (tag, _) = expect_message(&mut stream, PROMPT).await;
            tags.push(tag as char);
            if tag == b'Z' {
                break;
            }
        }
        assert_eq!(tags, ['T', 'D', 'C', 'Z'], "{name}: SELECT 7");
        drop(stream);
        assert_proxy_serves(&proxy, name).await;
    }

    // Bytes buffered behind the request: N, then 08P01, then the close.
    for (request, name) in ENCRYPTION_REQUESTS {
        let what = format!("{name} with a StartupMessage in the same write");
        let mut bytes = request.to_vec();
        bytes.extend_from_slice(&startup);
        let mut stream = declined(&proxy, &bytes, &what).await;
        let error = expect_fatal_then_close(&mut stream, "08P01", &what).await;
        assert!(
            error
                .message
                .contains("received unencrypted data after SSL request"),
            "{what}: {error:?}"
        );
        assert_proxy_serves(&proxy, &what).await;
    }

    // A second SSLRequest after the first was answered is refused, not answered again.
    let what = "two SSLRequests";
    let mut stream = declined(&proxy, &SSL_REQUEST, what).await;
    stream.write_all(&SSL_REQUEST).await.expect("send");
    expect_fatal_then_close(&mut stream, "08P01", what).await;
    assert_proxy_serves(&proxy, what).await;

    proxy.stop().await;
}

/// A client that sends Terminate and waits for the close gets no error: the backend closing
/// after the client asked it to is not "lost mid-session" (CONTRACT.md, 08006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_then_wait_gets_a_quiet_close() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let errors_before = request_errors(&proxy);
    for round in 0..3 {
        let mut stream = raw_bulk_login(&proxy).await;
        let what = format!("Terminate, round {round}");
        expect_trusted_login(&mut stream, &what).await;
        expect_quiet_terminate(&mut stream, &what).await;
    }
    let errors_after = request_errors(&proxy);
    assert_eq!(errors_before, errors_after, "a Terminate counts no error");
    assert_proxy_serves(&proxy, "Terminate").await;
    proxy.stop().await;
}

/// The login_timeout cases run side by side so the test takes one timeout, not four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_logins_end_at_login_timeout() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let lower = LOGIN_TIMEOUT - Duration::from_millis(500);
    let upper = Duration::from_secs(5);

    let silent = async {
        let mut stream = raw_connect(&proxy).await;
        closed_after(&mut stream, Instant::now(), upper, "a silent client").await
    };

    let stalled_length = async {
        let mut stream = raw_connect(&proxy).await;
        let started = Instant::now();
        stream.write_all(&truncated_startup()).await.expect("send");
        closed_after(&mut stream, started, upper, "a stalled startup packet").await
    };

    let stalled_after_ssl = async {
        let mut stream = raw_connect(&proxy).await;
        let started = Instant::now();
        stream.write_all(&SSL_REQUEST).await.expect("send");
        assert_eq!(read_byte(&mut stream, PROMPT).await, b'N');
        closed_after(
            &mut stream,
            started,
            upper,
            "a client silent after SSLRequest",
        )
        .await
    };

    let unanswered_sasl = async {
        let mut stream = raw_connect(&proxy).await;
        let started = Instant::now();
        stream
            .write_all(&startup_packet(
                3,
                0,
                &[("user", TEST_USER), ("database", "app")],
            ))
            .await
            .expect("send");
        let (tag, body) = expect_message(&mut stream, PROMPT).await;
        assert_eq!(tag, b'R', "an authentication request");
        assert_eq!(&body[..4], &10u32.to_be_bytes(), "AuthenticationSASL");
        closed_after(
            &mut stream,
            started,
            upper,
            "a client that never answers SASL",
        )
        .await
    };

    let (silent, stalled_length, stalled_after_ssl, unanswered_sasl) =
        tokio::join!(silent, stalled_length, stalled_after_ssl, unanswered_sasl);

    for (what, (elapsed, bytes)) in [
        ("silent client", silent),
        ("startup packet stalled mid-way", stalled_length),
        ("silent after SSLRequest", stalled_after_ssl),
    ] {
        assert!(
            (lower..upper).contains(&elapsed),
            "{what}: closed after {elapsed:?}"
        );
        assert!(
            bytes.is_empty(),
            "{what}: nothing may be sent before a StartupMessage, got {bytes:?}"
        );
    }

    let (elapsed, bytes) = unanswered_sasl;
    assert!(
        (lower..upper).contains(&elapsed),
        "unanswered SASL: closed after {elapsed:?}"
    );
    let messages = split_messages(&bytes);
    assert_eq!(messages.len(), 1, "unanswered SASL: {messages:?}");
    let error = raw_error(messages[0].0, &messages[0].1);
    assert_eq!(error.sqlstate, "08006", "{error:?}");
    assert!(error.message.contains("login_timeout"), "{error:?}");

    assert_proxy_serves(&proxy, "stalled logins").await;
    // Nothing is left behind by the timed-out logins.
    let shared = proxy.proxy().shared().clone();
    assert!(
        eventually(PROMPT, || {
            shared.clients.load(Ordering::Acquire) == 0
                && shared.sessions.count(None) == 0
                && shared.cancels.is_empty()
        })
        .await,
        "client slots {}, sessions {}, cancel keys {}",
        shared.clients.load(Ordering::Acquire),
        shared.sessions.count(None),
        shared.cancels.len()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_cancel_keys_are_dropped_silently() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let unknown_before = cancel_unknown(&proxy);
    for (pid, secret) in [(12345, [1, 2, 3, 4]), (0, [0, 0, 0, 0]), (-1, [255; 4])] {
        expect_silent_cancel(&proxy, pid, &secret, "an unknown cancel key").await;
        assert_proxy_serves(&proxy, "an unknown cancel key").await;
    }
    let unknown_after = cancel_unknown(&proxy);
    assert_eq!(unknown_after - unknown_before, 3);
    // A malformed cancel (a 2-byte key) is a bad startup packet.
    expect_refusal(
        &proxy,
        &cancel_packet(7, &[1, 2]),
        "08P01",
        "a 2-byte cancel key",
    )
    .await;
    assert_proxy_serves(&proxy, "a malformed cancel").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_refuses_with_53300_but_never_a_cancel() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "max_clients = 2", "green_weight = 0", None).await;
    let first = proxy.connect(&proxy.bulk_dsn()).await.expect("first");
    let second = proxy.connect(&proxy.bulk_dsn()).await.expect("second");

    let error = proxy
        .connect(&proxy.bulk_dsn())
        .await
        .expect_err("a third client is refused");
    assert_eq!(sqlstate(&error).as_deref(), Some("53300"), "{error}");
    // Raw, too: the refusal is one FATAL ErrorResponse, then the close.
    expect_refusal(&proxy, &bulk_startup(), "53300", "a raw third client").await;

    // While full, an unknown cancel key is still read and dropped without an error ...
    expect_silent_cancel(&proxy, 4242, &[9, 9, 9, 9], "a cancel while full").await;

    // ... and a real one is forwarded: the running query is cancelled.
    let token = first.cancel_token();
    let pid = simple_backend_pid(&first).await;
    let sleeper = tokio::spawn(async move { first.simple_query("SELECT pg_sleep(30)").await });
    let admin = blue_admin(pair).await;
    expect_sleeping(&admin, pid).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel accepted while max_clients is reached");
    let cancelled = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("the cancel takes effect")
        .expect("task");
    let error = cancelled.expect_err("pg_sleep is cancelled");
    assert_eq!(sqlstate(&error).as_deref(), Some("57014"), "{error}");
    // The proxy counts the cancel once the server has closed the cancel connection, which
    // may be just after the query reported 57014.
    let shared = proxy.proxy().shared().clone();
    assert!(
        eventually(PROMPT, || shared
            .stats
            .cancel_forwarded
            .load(Ordering::Relaxed)
            == 1)
        .await,
        "cancel_forwarded = {}",
        shared.stats.cancel_forwarded.load(Ordering::Relaxed)
    );

    // One session closes: its slot frees and a new client gets in.
    drop(second);
    assert!(
        eventually(Duration::from_secs(5), || shared
            .clients
            .load(Ordering::Acquire)
            <= 1)
        .await,
        "the closed session's slot was not given back ({} held)",
        shared.clients.load(Ordering::Acquire)
    );
    assert_proxy_serves(&proxy, "a slot was freed").await;
    proxy.stop().await;
}

// ---------------------------------------------------------------------------
// 3. Backend killed mid-session
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backends_end_their_sessions_cleanly() {
    let pair = private_pair().await;
    let blue = pair.blue.port();
    let proxy = TestProxy::start(&pair, "", "green_weight = 0", None).await;
    let shared = proxy.proxy().shared().clone();
    let admin = blue_admin(&pair).await;

    // pg_terminate_backend: the backend's own FATAL 57P01 reaches the client.
    // (Simple protocol only: a dropped prepared statement would leave a Close in flight, and
    // tokio-postgres hands an unsolicited FATAL to that request instead of the connection.)
    let (client, connection) = connect_watched(&proxy.bulk_dsn()).await;
    let pid = simple_backend_pid(&client).await;
    terminate_backend(&admin, pid).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the client hears of the termination promptly")
        .expect("connection task");
    let error = ended.expect_err("the connection ends with the backend's FATAL");
    assert_eq!(sqlstate(&error).as_deref(), Some("57P01"), "{error}");
    assert!(client.is_closed());
    assert!(client.simple_query("SELECT 1").await.is_err());
    drop(client);
    assert_proxy_serves(&proxy, "pg_terminate_backend").await;

    // The same on a raw socket: exactly the backend's FATAL, and no 08006 of pgshift's after it.
    let mut stream = raw_bulk_login(&proxy).await;
    let mut pid = None;
    loop {
        let (tag, body) = expect_message(&mut stream, PROMPT).await;
        match tag {
            b'K' => pid = Some(i32::from_be_bytes([body[0], body[1], body[2], body[3]])),
            b'Z' => break,
            b'E' => panic!("login failed: {:?}", raw_error(tag, &body)),
            _ => {}
        }
    }
    let pid = pid.expect("BackendKeyData");
    terminate_backend(&admin, pid).await;
    let error = expect_fatal_then_close(&mut stream, "57P01", "raw session terminated").await;
    assert!(
        error.message.contains("administrator command"),
        "the backend's own message: {error:?}"
    );
    assert_proxy_serves(&proxy, "pg_terminate_backend (raw)").await;

    // SIGKILL under a running query: the postmaster resets every backend.
    let idle = proxy
        .connect(&proxy.bulk_dsn())
        .await
        .expect("idle session");
    let (sleeper, _sleeper_connection) = connect_watched(&proxy.bulk_dsn()).await;
    let pid: i32 = sleeper
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let sleeping = tokio::spawn(async move {
        let result = sleeper.simple_query("SELECT pg_sleep(30)").await;
        (result, Instant::now())
    });
    expect_sleeping(&admin, pid).await;
    let killed_at = Instant::now();
    // SAFETY: kill(2) on a backend pid of our own private cluster.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
    let (result, failed_at) = tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .expect("the client gets an error within 5 s of the SIGKILL")
        .expect("task");
    let error = result.expect_err("the query fails");
    assert!(
        failed_at - killed_at < Duration::from_secs(5),
        "{:?}",
        failed_at - killed_at
    );
    assert_eq!(sqlstate(&error).as_deref(), Some("08006"), "{error}");
    let message = db_message(&error);
    assert!(
        message.contains("blue") && message.contains(&format!("127.0.0.1:{blue}")),
        "{message}"
    );
    drop(idle);
    drop(admin);

    assert!(
        eventually(Duration::from_secs(5), || shared.cancels.is_empty()
            && Color::ALL.iter().all(|&color| shared
                .stats
                .color(color)
                .sessions_open()
                == 0)
            && shared.sessions.count(None) == 0
            && shared.clients.load(Ordering::Acquire) == 0)
        .await,
        "left behind: cancel keys {}, blue sessions {}, green sessions {}, registered {}, slots {}",
        shared.cancels.len(),
        shared.stats.color(Color::Blue).sessions_open(),
        shared.stats.color(Color::Green).sessions_open(),
        shared.sessions.count(None),
        shared.clients.load(Ordering::Acquire)
    );
    let blue_stats = shared.stats.color(Color::Blue).snapshot();
    assert!(
        blue_stats.errors_by_sqlstate.contains_key(b"08006"),
        "the lost request counts as an 08006 error: {blue_stats:?}"
    );

    // After crash recovery, new sessions work again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = async {
            let client = proxy.connect(&proxy.bulk_dsn()).await?;
            client.query_one("SELECT inet_server_port()", &[]).await
        };
        match tokio::time::timeout(PROMPT, attempt).await {
            Ok(Ok(row)) => {
                assert_eq!(row.get::<_, i32>(0) as u16, blue);
                break;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "blue did not recover through pgshift within 10 s: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_proxy_serves(&proxy, "crash recovery").await;
    proxy.stop().await;
}
