//! Auth termination (`[auth] mode = "scram"`) with real Postgres and real clients: psql,
//! tokio-postgres and pgbench logging in through pgshift to both colors; wrong passwords,
//! unknown users and expired passwords failing alike (28P01, same exchange shape, same
//! backoff); green with another salt or without the role (fallback to blue while allowed,
//! 28000 after promotion); the verifier comparison behind `rollout start` / `promote`;
//! `auth_query` down with a fresh and with an expired cache entry, through the recommended
//! SECURITY DEFINER function; userlist mode; md5 only with `allow_md5`; channel binding
//! (`channel_binding=require`) over client TLS with TLS backends; a thousand logins at
//! concurrency 8 with pgshift's CPU per login printed.
//!
//! Every test makes its own roles (unique names): the shared pair's roles are never changed.
//! Tests that need a whole pair's roles to agree, or TLS backends, use private pairs.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgshift::color::Color;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rustls::pki_types::ServerName;
use support::certs::{self, Pki};
use support::pgshift::{TestProxy, TestServer, sqlstate};
use support::wire::{self, error_code, error_field, message, startup_packet};
use support::{
    ClusterPair, SUPERUSER, TEST_PASSWORD, TEST_USER, free_port, pg_bin_dir, shared_pair,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Roles and configs
// ---------------------------------------------------------------------------------------------

/// A role name no other test uses.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `rolpassword` of `role` on `cluster`.
fn verifier_of(cluster: &support::Cluster, role: &str) -> String {
    cluster.psql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"
    ))
}

/// A login role with `password`, created on blue and copied to green with blue's verifier
/// (the way the README says to copy roles).
fn create_role_on_both(pair: &ClusterPair, role: &str, password: &str, extra: &str) -> String {
    pair.blue.psql(&format!(
        "CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}' {extra}"
    ));
    let verifier = verifier_of(&pair.blue, role);
    pair.green.psql(&format!(
        "CREATE ROLE \"{role}\" LOGIN PASSWORD '{verifier}' {extra}"
    ));
    verifier
}

/// A login role created on each color with the same password, each hashing it itself: the
/// verifiers differ (another salt).
fn create_role_hashed_by_each(pair: &ClusterPair, role: &str, password: &str) {
    for cluster in pair.both() {
        cluster.psql(&format!(
            "CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'"
        ));
    }
}

/// `[auth]` in scram mode with `auth_dsn` as the superuser (the default auth_query), no
/// backoff, plus `extra` keys.
fn scram_auth(extra: &str) -> String {
    let backoff = if extra.contains("failure_backoff") {
        ""
    } else {
        "failure_backoff = \"0s\"\n"
    };
    format!(
        "[auth]\nmode = \"scram\"\nauth_dsn = \"user={SUPERUSER} dbname=postgres\"\n{backoff}{extra}\n"
    )
}

/// A config for `pair` on `port` with `rest` as the `[routing]` keys and the sections after
/// them; timeouts generous enough for a loaded machine (SCRAM logins run PBKDF2 on both the
/// client and the server).
fn config_text(pair: &ClusterPair, port: u16, listen: &str, rest: &str) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\nlogin_timeout = \"30s\"\n{listen}\n\
         [blue]\nhost = \"127.0.0.1\"\nport = {}\nconnect_timeout = \"10s\"\n\
         [green]\nhost = \"127.0.0.1\"\nport = {}\nconnect_timeout = \"10s\"\n\
         [metrics]\naddr = \"\"\n\
         [routing]\n{rest}\n",
        pair.blue.port(),
        pair.green.port()
    )
}

/// pgshift in front of the shared pair in scram mode; `routing` keys, then `[auth]` `extra`.
async fn scram_proxy(routing: &str, auth_extra: &str) -> TestProxy {
    let pair = shared_pair();
    let port = free_port();
    let text = config_text(
        pair,
        port,
        "",
        &format!("{routing}\n{}", scram_auth(auth_extra)),
    );
    TestProxy::start_from_text(port, &text, None).await
}

fn dsn(port: u16, user: &str, password: &str, dbname: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} password={password} dbname={dbname}")
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The server's message of a tokio-postgres error (its Display says only "db error").
fn db_message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| error.to_string())
}

async fn served_port(client: &tokio_postgres::Client) -> u16 {
    client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("inet_server_port")
        .get::<_, i32>(0) as u16
}

/// A user name whose sticky bucket is below `weight_bp` (so `sticky = "user"` at that weight
/// places it on green by the weight, not by a pin).
fn green_bound_name(prefix: &str, weight_bp: u16) -> String {
    loop {
        let name = unique(prefix);
        if pgshift::routing::bucket_of(name.as_bytes()) < weight_bp {
            return name;
        }
    }
}

/// Runs psql with a connection string off the async workers, with a clean environment.
async fn psql(conninfo: String, sql: &str, home: &Path) -> Output {
    support::psql_clean(conninfo, &["-c", sql], home).await
}

fn psql_ok(output: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what}: {stderr}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

// ---------------------------------------------------------------------------------------------
// A raw SCRAM client (to see the exchange's shape)
// ---------------------------------------------------------------------------------------------

/// A typed message: tag and body.
type Message = (u8, Vec<u8>);

/// What a raw login saw: the server-first-message (when the exchange got that far) and how
/// it ended (`Ok(messages after AuthenticationOk)` or `Err((sqlstate, message))`).
struct RawLogin {
    mechanisms: Vec<String>,
    server_first: Option<String>,
    result: Result<Vec<Message>, (String, String)>,
    elapsed: Duration,
}

fn error_of(body: &[u8]) -> (String, String) {
    (
        error_code(body).unwrap_or_default(),
        error_field(body, b'M').unwrap_or_default(),
    )
}

/// Logs in over `stream` with SCRAM as `user` / `password`; `gs2` forces a client-first GS2
/// header (e.g. `y,,`) instead of postgres-protocol's.
async fn raw_scram_login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    password: &str,
    mechanism: Option<&str>,
    binding: ChannelBinding,
    gs2: Option<&str>,
) -> RawLogin {
    let started = Instant::now();
    let mut seen = RawLogin {
        mechanisms: Vec::new(),
        server_first: None,
        result: Err(("".into(), "no answer".into())),
        elapsed: Duration::ZERO,
    };
    stream
        .write_all(&startup_packet(
            3,
            0,
            &[("user", user), ("database", "app")],
        ))
        .await
        .expect("send startup");
    let mut scram = ScramSha256::new(password.as_bytes(), binding);
    loop {
        let Some((tag, body)) = wire::read_plausible_message(stream, WAIT).await else {
            seen.result = Err(("".into(), "connection closed".into()));
            break;
        };
        if tag == b'E' {
            seen.result = Err(error_of(&body));
            break;
        }
        assert_eq!(tag, b'R', "an authentication message");
        let code = i32::from_be_bytes(body[..4].try_into().expect("code"));
        match code {
            10 => {
                seen.mechanisms = body[4..]
                    .split(|&b| b == 0)
                    .filter(|name| !name.is_empty())
                    .map(|name| String::from_utf8_lossy(name).into_owned())
                    .collect();
                let chosen = mechanism.unwrap_or("SCRAM-SHA-256");
                let first = match gs2 {
                    Some(header) => {
                        let message = String::from_utf8_lossy(scram.message()).into_owned();
                        let bare = message.split_once(",,").map(|(_, bare)| bare).unwrap_or("");
                        format!("{header}{bare}").into_bytes()
                    }
                    None => scram.message().to_vec(),
                };
                let mut data = chosen.as_bytes().to_vec();
                data.push(0);
                data.extend((first.len() as i32).to_be_bytes());
                data.extend(first);
                stream.write_all(&message(b'p', &data)).await.expect("send");
            }
            11 => {
                seen.server_first = Some(String::from_utf8_lossy(&body[4..]).into_owned());
                scram
                    .update(&body[4..])
                    .expect("a well-formed server-first");
                stream
                    .write_all(&message(b'p', scram.message()))
                    .await
                    .expect("send");
            }
            12 => scram
                .finish(&body[4..])
                .expect("the server signature verifies"),
            0 => {
                let mut after = Vec::new();
                while let Some((tag, body)) = wire::read_plausible_message(stream, WAIT).await {
                    let ready = tag == b'Z';
                    after.push((tag, body));
                    if ready {
                        break;
                    }
                }
                seen.result = Ok(after);
                break;
            }
            other => panic!("unexpected authentication request {other}"),
        }
    }
    seen.elapsed = started.elapsed();
    seen
}

/// The `s=` and `i=` of a server-first-message.
fn salt_and_iterations(server_first: &str) -> (String, String) {
    let mut salt = String::new();
    let mut iterations = String::new();
    for attribute in server_first.split(',') {
        if let Some(value) = attribute.strip_prefix("s=") {
            salt = value.to_string();
        }
        if let Some(value) = attribute.strip_prefix("i=") {
            iterations = value.to_string();
        }
    }
    (salt, iterations)
}

// ---------------------------------------------------------------------------------------------
// Logins that work
// ---------------------------------------------------------------------------------------------

/// tokio-postgres and psql log in through scram mode to blue and to green (a role copied with
/// blue's verifier), queries and cancels work, and the ClientKey leaves memory with the last
/// session of its user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_to_both_colors_without_pgshift_holding_a_password() {
    let pair = shared_pair();
    let role = unique("both");
    create_role_on_both(pair, &role, "both-pw", "");
    pair.blue
        .psql_db("app", &format!("GRANT pg_read_all_stats TO \"{role}\""));
    let routing = "green_weight = 0\n[[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"green\"";
    let proxy = scram_proxy(routing, "").await;
    let shared = proxy.proxy().shared().clone();

    let blue = connect(&dsn(proxy.port, &role, "both-pw", "app"))
        .await
        .expect("logs in to blue");
    assert_eq!(served_port(&blue).await, pair.blue.port());
    let green = connect(&dsn(proxy.port, &role, "both-pw", "tenant_42"))
        .await
        .expect("logs in to green");
    assert_eq!(served_port(&green).await, pair.green.port());
    let user: String = green
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(user, role);
    assert!(shared.auth.keys.is_held(&role), "the ClientKey is held");

    // The cancel key is replaced and cancels reach the right backend.
    let cancel = green.cancel_token();
    let sleeper = tokio::spawn(async move { green.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let error = tokio::time::timeout(WAIT, sleeper)
        .await
        .expect("cancelled in time")
        .expect("task")
        .expect_err("cancelled");
    assert_eq!(sqlstate(&error).as_deref(), Some("57014"));

    // psql (libpq) too.
    let home = tempfile::tempdir().expect("home");
    for (database, port) in [("app", pair.blue.port()), ("tenant_42", pair.green.port())] {
        let output = psql(
            format!(
                "{} sslmode=disable",
                dsn(proxy.port, &role, "both-pw", database)
            ),
            "SELECT inet_server_port()",
            home.path(),
        )
        .await;
        assert_eq!(psql_ok(&output, database), port.to_string());
    }

    drop(blue);
    // The green client went with its task; the key goes with the last session.
    let deadline = Instant::now() + WAIT;
    while shared.auth.keys.is_held(&role) {
        assert!(Instant::now() < deadline, "the ClientKey was not dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.stop().await;
}

/// The backend's refusals after authentication are relayed as they are (3D000), and the
/// client never sees AuthenticationOk for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusals_are_relayed() {
    let pair = shared_pair();
    let role = unique("refused");
    create_role_on_both(pair, &role, "refused-pw", "");
    let proxy = scram_proxy("green_weight = 0", "").await;
    let error = connect(&dsn(proxy.port, &role, "refused-pw", "no_such_database"))
        .await
        .expect_err("no such database");
    assert_eq!(sqlstate(&error).as_deref(), Some("3D000"), "{error}");
    // Raw: the error comes instead of AuthenticationOk.
    let mut stream = wire::connect(proxy.port, WAIT).await;
    stream
        .write_all(&startup_packet(
            3,
            0,
            &[("user", role.as_str()), ("database", "no_such_database")],
        ))
        .await
        .expect("startup");
    let mut scram = ScramSha256::new(b"refused-pw", ChannelBinding::unsupported());
    let mut saw_ok = false;
    let mut code = None;
    while let Some((tag, body)) = wire::read_plausible_message(&mut stream, WAIT).await {
        match (
            tag,
            body.get(..4)
                .map(|c| i32::from_be_bytes(c.try_into().unwrap_or_default())),
        ) {
            (b'R', Some(10)) => {
                let mut data = b"SCRAM-SHA-256\0".to_vec();
                data.extend((scram.message().len() as i32).to_be_bytes());
                data.extend(scram.message());
                stream.write_all(&message(b'p', &data)).await.expect("send");
            }
            (b'R', Some(11)) => {
                scram.update(&body[4..]).expect("server-first");
                stream
                    .write_all(&message(b'p', scram.message()))
                    .await
                    .expect("send");
            }
            (b'R', Some(0)) => saw_ok = true,
            (b'E', _) => {
                code = error_code(&body);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(code.as_deref(), Some("3D000"));
    assert!(
        !saw_ok,
        "AuthenticationOk is sent only once the backend accepted"
    );
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Failures look alike
// ---------------------------------------------------------------------------------------------

/// A wrong password and an unknown user get the same exchange (a stable salt, 4096
/// iterations, a fresh nonce), the same 28P01 and the same backoff delays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_fail_alike() {
    let pair = shared_pair();
    let role = unique("known");
    let verifier = create_role_on_both(pair, &role, "right-pw", "");
    let proxy = scram_proxy("green_weight = 0", "failure_backoff = \"300ms\"").await;
    let shared = proxy.proxy().shared().clone();
    let nobody = unique("nobody");

    let login = |user: String, password: &'static str| {
        let port = proxy.port;
        async move {
            let mut stream = wire::connect(port, WAIT).await;
            raw_scram_login(
                &mut stream,
                &user,
                password,
                None,
                ChannelBinding::unsupported(),
                None,
            )
            .await
        }
    };
    let wrong = login(role.clone(), "wrong-pw").await;
    let unknown = login(nobody.clone(), "any-pw").await;
    for (seen, user) in [(&wrong, &role), (&unknown, &nobody)] {
        assert_eq!(seen.mechanisms, ["SCRAM-SHA-256"]);
        assert_eq!(
            seen.result.as_ref().err(),
            Some(&(
                "28P01".to_string(),
                format!("password authentication failed for user \"{user}\"")
            ))
        );
        assert!(
            seen.elapsed >= Duration::from_millis(300),
            "the first failure waits failure_backoff: {:?}",
            seen.elapsed
        );
    }
    // The real role shows its real salt; the unknown one a salt of the same length, stable
    // across attempts, with the same iteration count.
    let (real_salt, real_iterations) =
        salt_and_iterations(wrong.server_first.as_deref().unwrap_or(""));
    assert!(verifier.contains(&format!("{real_iterations}:{real_salt}$")));
    let (mock_salt, mock_iterations) =
        salt_and_iterations(unknown.server_first.as_deref().unwrap_or(""));
    assert_eq!(mock_iterations, real_iterations);
    assert_eq!(mock_salt.len(), real_salt.len());
    let again = login(nobody.clone(), "any-pw").await;
    let server_first = again.server_first.clone().unwrap_or_default();
    assert_eq!(salt_and_iterations(&server_first).0, mock_salt);
    assert_ne!(
        server_first,
        unknown.server_first.clone().unwrap_or_default(),
        "fresh nonce"
    );
    // The second failure of the pair waits twice as long.
    assert!(
        again.elapsed >= Duration::from_millis(600),
        "second failure: {:?}",
        again.elapsed
    );
    // A success forgets the pair's failures (the unknown user's pair stays).
    assert_eq!(shared.auth.backoff.tracked(), 2);
    let right = login(role.clone(), "right-pw").await;
    assert!(right.result.is_ok(), "{:?}", right.result.err());
    assert_eq!(shared.auth.backoff.tracked(), 1);
    // tokio-postgres sees the same error either way.
    for (user, password) in [(role.as_str(), "wrong-pw"), (nobody.as_str(), "x")] {
        let error = connect(&dsn(proxy.port, user, password, "app"))
            .await
            .expect_err("refused");
        assert_eq!(sqlstate(&error).as_deref(), Some("28P01"), "{error}");
    }
    proxy.stop().await;
}

/// An expired password, a role that cannot log in and a role without password are refused
/// like a wrong password (the mock exchange).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_passwordless_roles_get_the_mock_exchange() {
    let pair = shared_pair();
    let expired = unique("expired");
    create_role_on_both(pair, &expired, "expired-pw", "VALID UNTIL '2001-01-01'");
    let nologin = unique("nologin");
    for cluster in pair.both() {
        cluster.psql(&format!(
            "CREATE ROLE \"{nologin}\" NOLOGIN PASSWORD 'x-pw'"
        ));
    }
    let proxy = scram_proxy("green_weight = 0", "").await;
    let shared = proxy.proxy().shared().clone();
    let mocked_before = shared.auth.counters.failed.load(Ordering::Relaxed);
    for (user, password) in [
        (expired.as_str(), "expired-pw"),
        (nologin.as_str(), "x-pw"),
        ("bulk", "anything"),
    ] {
        let error = connect(&dsn(proxy.port, user, password, "app"))
            .await
            .expect_err("refused");
        assert_eq!(
            sqlstate(&error).as_deref(),
            Some("28P01"),
            "{user}: {error}"
        );
        let message = error.as_db_error().map(|e| e.message().to_string());
        assert_eq!(
            message,
            Some(format!(
                "password authentication failed for user \"{user}\""
            ))
        );
    }
    assert!(shared.auth.counters.failed.load(Ordering::Relaxed) >= mocked_before + 3);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Green must share the verifier
// ---------------------------------------------------------------------------------------------

/// Green with another salt, or without the role: sessions the weight sends to green go to
/// blue; a pin to green is refused with 28000 after the password was proven; once blue's
/// verifier is copied to green, green takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_differing_green_verifier_falls_back_to_blue_while_allowed() {
    let pair = shared_pair();
    let salted = green_bound_name("salted", 9999);
    create_role_hashed_by_each(pair, &salted, "salted-pw");
    assert_ne!(
        verifier_of(&pair.blue, &salted),
        verifier_of(&pair.green, &salted)
    );
    let blue_only = green_bound_name("blueonly", 9999);
    pair.blue.psql(&format!(
        "CREATE ROLE \"{blue_only}\" LOGIN PASSWORD 'blue-only-pw'"
    ));
    let pinned = unique("pinned");
    create_role_hashed_by_each(pair, &pinned, "pinned-pw");
    let routing = format!(
        "green_weight = 99.99\nsticky = \"user\"\n[[routing.pin]]\nuser = \"{pinned}\"\ncolor = \"green\""
    );
    let proxy = scram_proxy(&routing, "cache_ttl = \"0s\"").await;
    let shared = proxy.proxy().shared().clone();

    for (user, password) in [(&salted, "salted-pw"), (&blue_only, "blue-only-pw")] {
        let client = connect(&dsn(proxy.port, user, password, "app"))
            .await
            .unwrap_or_else(|error| panic!("{user} falls back to blue: {error}"));
        assert_eq!(served_port(&client).await, pair.blue.port(), "{user}");
    }
    assert!(
        shared
            .auth
            .counters
            .mismatch_fallbacks
            .load(Ordering::Relaxed)
            >= 2
    );
    let mismatches = pgshift::auth::auth_mismatches(&shared);
    let salted_entry = mismatches
        .iter()
        .find(|mismatch| mismatch.user == salted)
        .expect("listed");
    assert!(
        salted_entry
            .differences
            .contains(&"salt differs".to_string()),
        "{salted_entry:?}"
    );
    let blue_only_entry = mismatches
        .iter()
        .find(|mismatch| mismatch.user == blue_only)
        .expect("listed");
    assert_eq!(
        blue_only_entry.differences,
        ["blue has a SCRAM-SHA-256 verifier, green has no login role"]
    );
    // No secret in what status would show.
    let shown = serde_json::to_string(&mismatches).expect("json");
    assert!(!shown.contains("SCRAM-SHA-256$"), "{shown}");

    // A pin to green may not fall back: 28000 naming the fix, after the password was proven.
    let error = connect(&dsn(proxy.port, &pinned, "pinned-pw", "app"))
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&error).as_deref(), Some("28000"), "{error}");
    let db_error = error.as_db_error().expect("server error");
    assert!(
        db_error.message().contains(&format!(
            "role \"{pinned}\" has a different SCRAM verifier on green; copy it with ALTER ROLE"
        )),
        "{db_error:?}"
    );
    // ... while a wrong password still gets 28P01.
    let wrong = connect(&dsn(proxy.port, &pinned, "wrong", "app"))
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&wrong).as_deref(), Some("28P01"));

    // Copy blue's verifier to green: green takes the sessions and the mismatch is gone.
    let verifier = verifier_of(&pair.blue, &salted);
    pair.green
        .psql(&format!("ALTER ROLE \"{salted}\" PASSWORD '{verifier}'"));
    let client = connect(&dsn(proxy.port, &salted, "salted-pw", "app"))
        .await
        .expect("logs in");
    assert_eq!(served_port(&client).await, pair.green.port());
    assert!(
        !pgshift::auth::auth_mismatches(&shared)
            .iter()
            .any(|mismatch| mismatch.user == salted)
    );
    proxy.stop().await;
}

/// After `promote` (green at 100 %, blue promoted away) a role whose green verifier differs
/// is refused with 28000; a role that matches logs in to green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_promotion_a_differing_verifier_is_refused() {
    // A private pair: `promote` compares every login role of both colors, and other tests
    // leave differing roles on the shared pair.
    let pair = tokio::task::spawn_blocking(ClusterPair::start_private)
        .await
        .expect("private pair");
    let pair = &pair;
    let matching = unique("promoted_ok");
    create_role_on_both(pair, &matching, "ok-pw", "");
    let drifted = unique("promoted_drift");
    create_role_on_both(pair, &drifted, "drift-pw", "");
    let server = TestServer::start(
        pair,
        &scram_auth("cache_ttl = \"0s\""),
        "green_weight = 0",
        None,
    )
    .await;
    // Promote while every role matches (the controller may compare them first).
    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    // Then green's copy of one role drifts (re-hashed on green: another salt).
    pair.green
        .psql(&format!("ALTER ROLE \"{drifted}\" PASSWORD 'drift-pw'"));
    let client = connect(&dsn(server.port, &matching, "ok-pw", "app"))
        .await
        .expect("matching role logs in");
    assert_eq!(served_port(&client).await, pair.green.port());
    let error = connect(&dsn(server.port, &drifted, "drift-pw", "app"))
        .await
        .expect_err("refused after promotion");
    assert_eq!(sqlstate(&error).as_deref(), Some("28000"), "{error}");
    assert!(
        db_message(&error).contains("different SCRAM verifier on green"),
        "{error:?}"
    );
    server.stop().await;
}

/// A private pair whose roles all match, then differ in each way the comparison knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_verifiers_names_every_difference_and_nothing_secret() {
    let pair = tokio::task::spawn_blocking(ClusterPair::start_private)
        .await
        .expect("private pair");
    let port = free_port();
    let text = config_text(
        &pair,
        port,
        "",
        &format!("green_weight = 0\n{}", scram_auth("")),
    );
    let proxy = TestProxy::start_from_text(port, &text, None).await;
    let shared = proxy.proxy().shared().clone();
    assert_eq!(
        pgshift::auth::compare_verifiers(&shared).await,
        Ok(Vec::new()),
        "a fresh pair's roles match (copied from one template)"
    );
    create_role_on_both(&pair, "same", "same-pw", "");
    create_role_hashed_by_each(&pair, "salted", "salted-pw");
    pair.blue.psql("CREATE ROLE blue_only LOGIN PASSWORD 'pw'");
    create_role_on_both(&pair, "expiring", "exp-pw", "VALID UNTIL '2999-01-01'");
    pair.green
        .psql("ALTER ROLE expiring VALID UNTIL '2998-01-01'");
    create_role_on_both(&pair, "gated", "gated-pw", "");
    pair.green.psql("ALTER ROLE gated NOLOGIN");
    let mismatches = pgshift::auth::compare_verifiers(&shared)
        .await
        .expect("both colors read");
    let by_user: std::collections::BTreeMap<&str, &Vec<String>> = mismatches
        .iter()
        .map(|mismatch| (mismatch.user.as_str(), &mismatch.differences))
        .collect();
    assert_eq!(
        by_user.keys().copied().collect::<Vec<_>>(),
        ["blue_only", "expiring", "gated", "salted"],
        "{mismatches:?}"
    );
    assert_eq!(by_user["blue_only"], &vec!["missing on green".to_string()]);
    assert_eq!(
        by_user["expiring"],
        &vec!["rolvaliduntil differs".to_string()]
    );
    assert!(by_user["gated"][0].starts_with("rolcanlogin differs"));
    assert_eq!(
        by_user["salted"],
        &vec![
            "salt differs".to_string(),
            "StoredKey differs".to_string(),
            "ServerKey differs".to_string()
        ]
    );
    assert_eq!(pgshift::auth::auth_mismatches(&shared), mismatches);
    // The controller's gate says the same in one refusal, without a secret.
    let refusal = pgshift::auth::verifiers_gate(&shared, "rollout start")
        .await
        .expect_err("refused");
    assert!(
        refusal.starts_with("rollout start refused: 4 role(s)") && refusal.contains("salted ("),
        "{refusal}"
    );
    assert!(!refusal.contains("SCRAM-SHA-256$4096"), "{refusal}");
    // A color that cannot be read is an error, not "no mismatch".
    pair.green.stop();
    assert!(pgshift::auth::compare_verifiers(&shared).await.is_err());
    assert!(
        pgshift::auth::verifiers_gate(&shared, "promote")
            .await
            .is_err_and(|error| error.starts_with("promote refused: cannot compare"))
    );
    proxy.stop().await;
}

/// `rollout start` and `promote` refuse while verifiers differ, and `status.auth_mismatch`
/// lists the roles (the controller runs `auth::verifiers_gate` before both commands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_start_and_promote_refuse_while_verifiers_differ() {
    let pair = tokio::task::spawn_blocking(ClusterPair::start_private)
        .await
        .expect("private pair");
    create_role_hashed_by_each(&pair, "salted", "salted-pw");
    let server = TestServer::start(&pair, &scram_auth(""), "green_weight = 0", None).await;
    for command in ["rollout start", "promote"] {
        let reply = server.admin(command).await;
        assert_eq!(reply["ok"], false, "{command}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains("salted"), "{command}: {error}");
    }
    let status = server.admin("status").await;
    assert_eq!(status["auth_mismatch"][0]["user"], "salted", "{status}");
    let verifier = verifier_of(&pair.blue, "salted");
    pair.green
        .psql(&format!("ALTER ROLE salted PASSWORD '{verifier}'"));
    let reply = server.admin("rollout start").await;
    assert_eq!(reply["ok"], true, "{reply}");
    server.stop().await;
}

/// With green down, a session the weight sends to green goes to blue when
/// `fallback_on_connect_error` allows it (green's auth_query is unreachable first), and gets
/// 08006 naming green otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_down_falls_back_to_blue_when_allowed() {
    let pair = tokio::task::spawn_blocking(ClusterPair::start_private)
        .await
        .expect("private pair");
    create_role_on_both(&pair, "app_user", "app-pw", "");
    let start = |fallback: bool| {
        let port = free_port();
        let text = config_text(
            &pair,
            port,
            "",
            &format!(
                "green_weight = 100\nfallback_on_connect_error = {fallback}\n{}",
                scram_auth("")
            ),
        );
        async move { TestProxy::start_from_text(port, &text, None).await }
    };
    let with_fallback = start(true).await;
    let client = connect(&dsn(with_fallback.port, "app_user", "app-pw", "app"))
        .await
        .expect("green is up");
    assert_eq!(served_port(&client).await, pair.green.port());
    drop(client);
    pair.green.stop();
    let client = connect(&dsn(with_fallback.port, "app_user", "app-pw", "app"))
        .await
        .expect("falls back to blue");
    assert_eq!(served_port(&client).await, pair.blue.port());
    let without = start(false).await;
    let error = connect(&dsn(without.port, "app_user", "app-pw", "app"))
        .await
        .expect_err("green is down");
    assert_eq!(sqlstate(&error).as_deref(), Some("08006"), "{error}");
    assert!(db_message(&error).contains("green"), "{error:?}");
    with_fallback.stop().await;
    without.stop().await;
}

/// A password changed after its verifier was cached: the login with the new password that
/// fails against the cached verifier makes pgshift read it again, and the next one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_is_read_again_after_a_failed_login() {
    let pair = shared_pair();
    let role = unique("changed");
    create_role_on_both(pair, &role, "old-pw", "");
    let proxy = scram_proxy("green_weight = 0", "cache_ttl = \"1h\"").await;
    connect(&dsn(proxy.port, &role, "old-pw", "app"))
        .await
        .expect("old password");
    pair.blue
        .psql(&format!("ALTER ROLE \"{role}\" PASSWORD 'new-pw'"));
    let verifier = verifier_of(&pair.blue, &role);
    pair.green
        .psql(&format!("ALTER ROLE \"{role}\" PASSWORD '{verifier}'"));
    let error = connect(&dsn(proxy.port, &role, "new-pw", "app"))
        .await
        .expect_err("checked against the cached verifier");
    assert_eq!(sqlstate(&error).as_deref(), Some("28P01"));
    connect(&dsn(proxy.port, &role, "new-pw", "app"))
        .await
        .expect("the verifier was read again");
    let error = connect(&dsn(proxy.port, &role, "old-pw", "app"))
        .await
        .expect_err("the old password no longer works");
    assert_eq!(sqlstate(&error).as_deref(), Some("28P01"));
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Where verifiers come from
// ---------------------------------------------------------------------------------------------

/// The README's SECURITY DEFINER lookup function, in schema `schema`, for role `auth_role`.
fn create_lookup_function(cluster: &support::Cluster, schema: &str, auth_role: &str) {
    cluster.psql(&format!(
        "CREATE ROLE {auth_role} LOGIN PASSWORD 'auth-pw';
         CREATE SCHEMA {schema};
         CREATE FUNCTION {schema}.lookup(p_user text)
             RETURNS TABLE (username name, secret text)
             LANGUAGE sql STABLE SECURITY DEFINER
             SET search_path = pg_catalog, pg_temp
         AS $$
             SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
             FROM pg_authid
             WHERE rolname = p_user AND rolcanlogin AND NOT rolsuper
         $$;
         REVOKE ALL ON FUNCTION {schema}.lookup(text) FROM PUBLIC;
         GRANT USAGE ON SCHEMA {schema} TO {auth_role};
         GRANT EXECUTE ON FUNCTION {schema}.lookup(text) TO {auth_role};"
    ));
}

/// `auth_query` through the SECURITY DEFINER function as an unprivileged role; then that role
/// is locked out: a fresh cache entry is used as is, an expired one is served stale, and a
/// user never looked up gets 08006 (the same for any user).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_down_with_a_fresh_and_an_expired_cache_entry() {
    let pair = shared_pair();
    let schema = unique("pgshift_lookup");
    let auth_role = unique("pgshift_auth");
    for cluster in pair.both() {
        create_lookup_function(cluster, &schema, &auth_role);
    }
    let role = unique("cached");
    create_role_on_both(pair, &role, "cached-pw", "");
    let other = unique("never_cached");
    create_role_on_both(pair, &other, "other-pw", "");
    // The function hides superusers (AND NOT rolsuper) and needs no superuser to call.
    let direct = pair.blue.psql(&format!(
        "SET ROLE {auth_role}; SELECT count(*) FROM {schema}.lookup('{SUPERUSER}')"
    ));
    assert_eq!(direct.trim(), "0");
    let auth = format!(
        "[auth]\nmode = \"scram\"\nauth_dsn = \"user={auth_role} password=auth-pw dbname=postgres\"\n\
         auth_query = \"SELECT username, secret FROM {schema}.lookup($1)\"\ncache_ttl = \"1h\"\nfailure_backoff = \"0s\"\n"
    );
    let port = free_port();
    let text = config_text(pair, port, "", &format!("green_weight = 0\n{auth}"));
    let proxy = TestProxy::start_from_text(port, &text, None).await;
    let shared = proxy.proxy().shared().clone();
    let counters = &shared.auth.verifiers.counters;

    connect(&dsn(port, &role, "cached-pw", "app"))
        .await
        .expect("logs in through the SECURITY DEFINER function");
    let queries = counters.queries.load(Ordering::Relaxed);

    // The auth role is locked out and its connection ended: auth_query is unreachable.
    pair.blue.psql(&format!(
        "ALTER ROLE {auth_role} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{auth_role}'"
    ));
    // Fresh entry: used without asking.
    connect(&dsn(port, &role, "cached-pw", "app"))
        .await
        .expect("fresh cache entry");
    assert_eq!(counters.queries.load(Ordering::Relaxed), queries);
    // Expired entry: the query fails, the entry is served stale (and logged).
    shared.auth.verifiers.age_cache(Duration::from_secs(7200));
    let stale_before = counters.stale_served.load(Ordering::Relaxed);
    connect(&dsn(port, &role, "cached-pw", "app"))
        .await
        .expect("stale cache entry");
    assert_eq!(
        counters.stale_served.load(Ordering::Relaxed),
        stale_before + 1
    );
    // Never looked up: 08006, whoever the user is.
    for user in [other.as_str(), "no_such_user_at_all"] {
        let error = connect(&dsn(port, user, "other-pw", "app"))
            .await
            .expect_err("cannot look up");
        assert_eq!(sqlstate(&error).as_deref(), Some("08006"), "{error}");
        assert!(
            db_message(&error).contains("could not look up"),
            "{error:?}"
        );
    }
    // Back up: lookups work again.
    pair.blue.psql(&format!("ALTER ROLE {auth_role} LOGIN"));

    connect(&dsn(port, &other, "other-pw", "app"))
        .await
        .expect("auth_query reachable again");
    proxy.stop().await;
}

/// `[auth] userlist` alone (no auth_dsn): verifiers from the file, for both colors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userlist_mode() {
    let pair = shared_pair();
    let role = unique("listed");
    let verifier = create_role_on_both(pair, &role, "listed-pw", "");
    let unlisted = unique("unlisted");
    create_role_on_both(pair, &unlisted, "unlisted-pw", "");
    let dir = tempfile::tempdir().expect("dir");
    let userlist = dir.path().join("userlist.txt");
    fs::write(&userlist, format!("# users\n\"{role}\" \"{verifier}\"\n")).expect("write");
    let port = free_port();
    let auth =
        format!("[auth]\nmode = \"scram\"\nuserlist = {userlist:?}\nfailure_backoff = \"0s\"\n");
    let text = config_text(
        pair,
        port,
        "",
        &format!(
            "green_weight = 0\n[[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"green\"\n{auth}"
        ),
    );
    let proxy = TestProxy::start_from_text(port, &text, None).await;
    for (database, expected) in [("app", pair.blue.port()), ("tenant_42", pair.green.port())] {
        let client = connect(&dsn(port, &role, "listed-pw", database))
            .await
            .expect("listed user logs in");
        assert_eq!(served_port(&client).await, expected);
    }
    let error = connect(&dsn(port, &unlisted, "unlisted-pw", "app"))
        .await
        .expect_err("not in the userlist");
    assert_eq!(sqlstate(&error).as_deref(), Some("28P01"));
    proxy.stop().await;

    // A plaintext password in the userlist stops the start.
    fs::write(&userlist, format!("\"{role}\" \"listed-pw\"\n")).expect("write");
    let (_dir, path) = support::pgshift::write_config(&text);
    let config = pgshift::config::Config::load(&path).expect("config");
    let error = pgshift::proxy::Proxy::start(config, Default::default())
        .await
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("no plaintext passwords"),
        "{error}"
    );
    assert!(!error.to_string().contains("listed-pw"), "{error}");
}

/// md5 secrets log in only with `allow_md5 = true`; otherwise they get the mock exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_only_with_allow_md5() {
    let pair = shared_pair();
    let routing = "green_weight = 0\n[[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"green\"";
    let refused = scram_proxy(routing, "").await;
    let error = connect(&dsn(refused.port, "md5_user", "md5_pw", "app"))
        .await
        .expect_err("md5 refused by default");
    assert_eq!(sqlstate(&error).as_deref(), Some("28P01"));
    refused.stop().await;
    let allowed = scram_proxy(routing, "allow_md5 = true").await;
    for (database, port) in [("app", pair.blue.port()), ("tenant_42", pair.green.port())] {
        let client = connect(&dsn(allowed.port, "md5_user", "md5_pw", database))
            .await
            .expect("md5 with allow_md5");
        assert_eq!(served_port(&client).await, port);
    }
    let error = connect(&dsn(allowed.port, "md5_user", "wrong", "app"))
        .await
        .expect_err("wrong md5 password");
    assert_eq!(sqlstate(&error).as_deref(), Some("28P01"));
    allowed.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Channel binding
// ---------------------------------------------------------------------------------------------

/// `channel_binding=require` over client TLS with TLS backends: psql and tokio-postgres log
/// in (bound to pgshift's certificate, and pgshift binds its own login to the database's);
/// a `y` flag over TLS is refused; a plaintext client still reaches a TLS backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_over_client_tls_with_tls_backends() {
    let pair = tokio::task::spawn_blocking(ClusterPair::start_private)
        .await
        .expect("private pair");
    let pki = Pki::create(pair.blue.root_dir().join("pki"));
    for cluster in pair.both() {
        certs::enable_ssl(cluster, &pki);
    }
    create_role_on_both(&pair, "bound", "bound-pw", "");
    let port = free_port();
    let listen = pki.listen("prefer");
    let backend_tls = format!(
        "tls = \"verify-full\"\nca_file = {:?}\n",
        pki.path("ca.crt")
    );
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\nlogin_timeout = \"30s\"\n{listen}\n\
         [blue]\nhost = \"localhost\"\nport = {}\nconnect_timeout = \"10s\"\n{backend_tls}\n\
         [green]\nhost = \"localhost\"\nport = {}\nconnect_timeout = \"10s\"\n{backend_tls}\n\
         [metrics]\naddr = \"\"\n\
         [routing]\ngreen_weight = 0\n[[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"green\"\n{}",
        pair.blue.port(),
        pair.green.port(),
        scram_auth("")
    );
    let proxy = TestProxy::start_from_text(port, &text, None).await;
    let query =
        "SELECT (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), inet_server_port()";
    for (database, backend_port) in [("app", pair.blue.port()), ("tenant_42", pair.green.port())] {
        let output = psql(
            format!(
                "host=127.0.0.1 port={port} user=bound password=bound-pw dbname={database} sslmode=verify-full sslrootcert={} channel_binding=require",
                pki.path("ca.crt").display()
            ),
            query,
            &pki.dir,
        )
        .await;
        assert_eq!(
            psql_ok(&output, "channel_binding=require"),
            format!("t|{backend_port}")
        );
    }
    // tokio-postgres over rustls binds too.
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={port} user=bound password=bound-pw dbname=tenant_42 sslmode=require channel_binding=require"
        ),
        pki.tokio_postgres_tls(),
    )
    .await
    .expect("tokio-postgres with channel_binding=require");
    tokio::spawn(connection);
    assert_eq!(served_port(&client).await, pair.green.port());
    // A plaintext client reaches the TLS backend (pgshift binds its own login).
    let output = psql(
        format!("host=127.0.0.1 port={port} user=bound password=bound-pw dbname=tenant_42 sslmode=disable"),
        query,
        &pki.dir,
    )
    .await;
    assert_eq!(
        psql_ok(&output, "plaintext client"),
        format!("t|{}", pair.green.port())
    );

    // Over TLS pgshift offers PLUS first; a client claiming "y" (it thinks the server cannot
    // bind) is refused, as Postgres refuses it.
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut tcp = tcp;
    tcp.write_all(&wire::SSL_REQUEST).await.expect("SSLRequest");
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.expect("answer");
    assert_eq!(answer[0], b'S');
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(pki.client_config(None)))
        .connect(name, tcp)
        .await
        .expect("TLS");
    let seen = raw_scram_login(
        &mut tls,
        "bound",
        "bound-pw",
        None,
        ChannelBinding::unsupported(),
        Some("y,,"),
    )
    .await;
    assert_eq!(seen.mechanisms, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
    let (code, text) = seen.result.expect_err("refused");
    assert_eq!(code, "08P01", "{text}");
    assert!(text.contains("channel binding"), "{text}");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Cost: a thousand logins
// ---------------------------------------------------------------------------------------------

/// CPU time (user + system) of this process's threads whose name starts with `prefix`, from
/// /proc/self/task/*/stat, in clock ticks.
fn thread_cpu_ticks(prefix: &str) -> u64 {
    let mut total = 0;
    for entry in fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After "(comm)": state is field 0; utime is field 11, stime field 12.
        let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        total += utime + stime;
    }
    total
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// 1,000 logins (`pgbench -C`, one connection per transaction, 8 clients) through pgshift in
/// passthrough and in scram mode, as the SCRAM user, to blue and green by weight. Prints
/// connections per second and pgshift's CPU per login (its runtime's threads only); asserts
/// only that every login worked.
#[test]
fn a_thousand_logins_at_concurrency_8() {
    let pair = shared_pair();
    // pgshift_test is the same role (one verifier, from the template) on both colors.
    assert_eq!(
        verifier_of(&pair.blue, TEST_USER),
        verifier_of(&pair.green, TEST_USER)
    );
    let script_dir = tempfile::tempdir().expect("dir");
    let script = script_dir.path().join("select.sql");
    fs::write(&script, "SELECT 1;\n").expect("script");
    let ticks_per_second = clock_ticks_per_second();
    let mut report = Vec::new();
    for mode in ["passthrough", "scram"] {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pgshift-under-test")
            .enable_all()
            .build()
            .expect("runtime");
        let port = free_port();
        let auth = if mode == "scram" {
            scram_auth("")
        } else {
            String::new()
        };
        let text = config_text(pair, port, "", &format!("green_weight = 50\n{auth}"));
        let proxy = runtime.block_on(TestProxy::start_from_text(port, &text, Some(7)));
        let before = thread_cpu_ticks("pgshift-under-");
        let started = Instant::now();
        let output = Command::new(pg_bin_dir().join("pgbench"))
            .env_clear()
            .env("PGPASSWORD", TEST_PASSWORD)
            .args(["-n", "-C", "-c", "8", "-j", "2", "-t", "125", "-f"])
            .arg(&script)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                TEST_USER,
                "app",
            ])
            .output()
            .expect("pgbench runs");
        let wall = started.elapsed();
        let cpu_ticks = thread_cpu_ticks("pgshift-under-") - before;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{mode}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("number of transactions actually processed: 1000/1000"),
            "{mode}: {stdout}"
        );
        let shared = proxy.proxy().shared().clone();
        let sessions: u64 = Color::ALL
            .iter()
            .map(|color| shared.stats.color(*color).snapshot().sessions_opened)
            .sum();
        assert!(sessions >= 1000, "{mode}: {sessions} sessions");
        if mode == "scram" {
            assert!(shared.auth.counters.succeeded.load(Ordering::Relaxed) >= 1000);
            assert_eq!(shared.auth.keys.held_users(), 0, "no ClientKey left behind");
        }
        let cpu_per_login_us = cpu_ticks as f64 * 1e6 / ticks_per_second as f64 / 1000.0;
        let tps = stdout
            .lines()
            .find(|line| line.starts_with("tps"))
            .unwrap_or("tps = ?")
            .to_string();
        report.push(format!(
            "{mode:>11}: 1000 logins in {:.2} s ({:.0} logins/s wall); pgbench -C {tps}; pgshift CPU per login {cpu_per_login_us:.0} µs",
            wall.as_secs_f64(),
            1000.0 / wall.as_secs_f64()
        ));
        runtime.block_on(proxy.stop());
    }
    for line in report {
        eprintln!("[auth bench] {line}");
    }
}
