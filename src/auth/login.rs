//! One client's login under `[auth] mode = "scram"`, from its routed color to a backend
//! pgshift has logged in to on its behalf.
//!
//! 1. **Which secret, which color.** A session routed to blue is checked against blue's
//!    secret. One routed to green needs green to share blue's (salt, iterations, StoredKey,
//!    ServerKey — the ClientKey is only good where they are the same): when they differ the
//!    session goes to blue instead while it may (placed by the weight, not by a pin; blue
//!    neither draining nor promoted away, i.e. green's weight below 100 %), and is otherwise
//!    refused with 28000 — after the client proved its password, so that the refusal tells a
//!    stranger nothing. Either way the role lands in `status.auth_mismatch`.
//! 2. **The exchange with the client.** AuthenticationSASL (with `SCRAM-SHA-256-PLUS` over
//!    TLS when pgshift's certificate defines channel binding), the client-first-message, the
//!    server-first-message, the proof. A role pgshift cannot log in (unknown, no SCRAM
//!    verifier, expired, md5 without `allow_md5`) gets the mock exchange and the same 28P01.
//!    md5 secrets with `allow_md5` get the md5 exchange instead. Each failure reply waits for
//!    the (client address, user) backoff.
//! 3. **The backend.** [`crate::proxy::backend::login`] with the recovered ClientKey; the
//!    client gets AuthenticationSASLFinal and AuthenticationOk only once the backend has
//!    accepted, followed by the backend's ParameterStatus, BackendKeyData and ReadyForQuery
//!    (through the relay). A backend refusal (3D000, 53300, 28000, …) is relayed as it is.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::keys::{Credential, KeyLease};
use super::mock::mock_verifier;
use super::scram::{self, ScramError, ScramVerifier, ServerExchange};
use super::verifiers::{self, LookupError, RoleSecret, Sources};
use super::{Mismatch, md5};
use crate::color::Color;
use crate::config::{Config, FULL_WEIGHT_BP};
use crate::protocol::messages::ClientError;
use crate::protocol::startup::{StartupFacts, StartupMessage};
use crate::proxy::Shared;
use crate::proxy::backend::{self, BackendConnection, ConnectError, LoginSecret};
use crate::routing::Route;

/// The longest SASL message accepted from a client (PostgreSQL's `PG_MAX_AUTH_TOKEN_LENGTH`).
const MAX_AUTH_MESSAGE: usize = 65_535;

/// Authentication request codes pgshift sends.
const AUTH_OK: i32 = 0;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// What a login needs to know about its session.
pub struct LoginRequest<'a> {
    pub shared: &'a Shared,
    pub config: &'a Config,
    pub startup: &'a StartupMessage,
    pub facts: &'a StartupFacts,
    pub route: Route,
    pub peer: SocketAddr,
    /// `tls-server-end-point` data when the client connection is TLS and pgshift's certificate
    /// defines it.
    pub end_point: Option<Vec<u8>>,
    /// `[listen] login_timeout` from the session's start.
    pub deadline: Instant,
}

/// How a login ended.
pub enum LoginOutcome<'a> {
    /// The backend accepted: relay on. `connection.first_bytes` holds what the client gets
    /// next (authentication results, then the backend's ParameterStatus … ReadyForQuery).
    LoggedIn {
        connection: BackendConnection,
        /// The session's hold on its user's ClientKey (dropped with the session).
        lease: KeyLease<'a>,
    },
    /// The client was answered (or left) and the connection is done.
    Ended,
}

/// Which secret the client is checked against, and where the session then goes.
struct Plan {
    color: Color,
    secret: RoleSecret,
    /// Refuse after a successful exchange (green's verifier differs and blue cannot take it).
    refusal: Option<ClientError>,
    /// Blue holds the same secret: a session meant for green may fall back to blue when green
    /// cannot be reached (`fallback_on_connect_error`).
    blue_shares_it: bool,
}

/// What a successful exchange with the client gave.
enum Proven {
    Scram {
        verifier: ScramVerifier,
        client_key: Zeroizing<scram::Key>,
        server_final: Vec<u8>,
    },
    Md5 {
        hash: Zeroizing<String>,
    },
}

/// Why an exchange with the client ended without a login.
enum ExchangeEnd {
    /// A failure to answer (after the backoff) with this error.
    Failed(ClientError),
    /// The client left or broke the connection: nothing to say.
    Gone,
}

/// Runs the whole login of one client. Every error reply is sent here.
pub async fn run<'a, C>(
    request: LoginRequest<'a>,
    client: &mut C,
    leftover: &mut BytesMut,
) -> LoginOutcome<'a>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let LoginRequest {
        shared,
        config,
        facts,
        peer,
        deadline,
        ..
    } = request;
    let user = facts.user.as_str();
    let auth = &shared.auth;
    let timed_out =
        || ClientError::fatal("08006", "pgshift: login not finished within login_timeout");
    let plan = match tokio::time::timeout_at(deadline, plan(shared, config, user, request.route))
        .await
    {
        Ok(Ok(plan)) => plan,
        Ok(Err(error)) => {
            tracing::warn!(user, client = %peer, "{error}");
            let reply = ClientError::fatal(
                "08006",
                format!(
                    "pgshift could not look up login secrets on the {} database",
                    error.color
                ),
            )
            .with_hint(format!(
                "check [auth] auth_dsn and auth_query, and that the {} database is reachable from pgshift",
                error.color
            ));
            send_and_close(client, &reply.encode()).await;
            return LoginOutcome::Ended;
        }
        Err(_) => {
            send_and_close(client, &timed_out().encode()).await;
            return LoginOutcome::Ended;
        }
    };
    let mock_secret = Zeroizing::new(auth.mock_secret());
    let exchange = exchange(
        client,
        leftover,
        &mock_secret,
        config.auth.allow_md5,
        user,
        &plan.secret,
        request.end_point.as_deref(),
        config.listen.max_message_size.min(MAX_AUTH_MESSAGE),
    );
    let proven = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(Ok(proven)) => proven,
        Ok(Err(ExchangeEnd::Gone)) => return LoginOutcome::Ended,
        Ok(Err(ExchangeEnd::Failed(error))) => {
            auth.counters.failed.fetch_add(1, Ordering::Relaxed);
            // The cached verifier may be an old one (the password was just changed): the next
            // attempt reads it again.
            for color in Color::ALL {
                auth.verifiers.forget(color, user);
            }
            let delay = auth.backoff.failure(
                config.auth.failure_backoff,
                peer.ip(),
                user,
                std::time::Instant::now(),
            );
            tracing::info!(
                user,
                client = %peer,
                sqlstate = error.sqlstate,
                backoff_ms = delay.as_millis() as u64,
                "login failed: {}",
                error.message
            );
            metrics::counter!("pgshift_clients_rejected_total", "reason" => "auth_failed")
                .increment(1);
            tokio::time::sleep(delay).await;
            send_and_close(client, &error.encode()).await;
            return LoginOutcome::Ended;
        }
        Err(_) => {
            send_and_close(client, &timed_out().encode()).await;
            return LoginOutcome::Ended;
        }
    };
    auth.backoff.success(peer.ip(), user);
    if let Some(refusal) = plan.refusal {
        auth.counters
            .mismatch_refusals
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("pgshift_clients_rejected_total", "reason" => "auth_mismatch")
            .increment(1);
        tracing::warn!(user, client = %peer, "login refused: {}", refusal.message);
        send_and_close(client, &refusal.encode()).await;
        return LoginOutcome::Ended;
    }
    auth.counters.succeeded.fetch_add(1, Ordering::Relaxed);
    let (credential, server_final) = match &proven {
        Proven::Scram {
            client_key,
            server_final,
            ..
        } => (
            Credential::ScramClientKey(client_key.clone()),
            Some(server_final.as_slice()),
        ),
        Proven::Md5 { hash } => (Credential::Md5Hash(hash.clone()), None),
    };
    let lease = auth.keys.hold(user, credential);
    let secret = match &proven {
        Proven::Scram {
            verifier,
            client_key,
            ..
        } => LoginSecret::Scram {
            client_key,
            verifier,
        },
        Proven::Md5 { hash } => LoginSecret::Md5 { hash },
    };
    let connected =
        tokio::time::timeout_at(deadline, connect(shared, config, &request, &plan, secret)).await;
    let logged_in = match connected {
        Ok(Ok(logged_in)) => logged_in,
        Ok(Err(error)) => {
            tracing::warn!(user, database = %facts.database, client = %peer, "{error}");
            send_and_close(client, &error.client_response()).await;
            return LoginOutcome::Ended;
        }
        Err(_) => {
            send_and_close(client, &timed_out().encode()).await;
            return LoginOutcome::Ended;
        }
    };
    // What the client sees next: the backend's early messages, the SASL outcome,
    // AuthenticationOk, then the backend's own ParameterStatus … ReadyForQuery.
    let mut greeting = BytesMut::with_capacity(256 + logged_in.connection.first_bytes.len());
    greeting.extend_from_slice(&logged_in.before_auth);
    if let Some(server_final) = server_final {
        put_auth(&mut greeting, AUTH_SASL_FINAL, &[server_final]);
    }
    put_auth(&mut greeting, AUTH_OK, &[]);
    greeting.extend_from_slice(&logged_in.connection.first_bytes);
    let mut connection = logged_in.connection;
    connection.first_bytes = greeting;
    LoginOutcome::LoggedIn { connection, lease }
}

/// Looks up the secret(s) and decides the color (see the module's step 1).
async fn plan(
    shared: &Shared,
    config: &Config,
    user: &str,
    route: Route,
) -> Result<Plan, LookupError> {
    let sources = Sources {
        config,
        tls: &shared.tls,
    };
    let verifiers = &shared.auth.verifiers;
    if route.color == Color::Blue {
        let secret = verifiers.lookup(sources, Color::Blue, user).await?;
        return Ok(Plan {
            color: Color::Blue,
            secret,
            refusal: None,
            blue_shares_it: true,
        });
    }
    let table = shared.router.table();
    let blue_available = route.may_fall_back() && !table.is_draining(Color::Blue);
    let blue_takes_part = blue_available && table.green_weight_bp < FULL_WEIGHT_BP;
    let (green, blue) = tokio::join!(
        verifiers.lookup(sources, Color::Green, user),
        verifiers.lookup(sources, Color::Blue, user)
    );
    let green = match green {
        Ok(green) => green,
        // Green's auth_query is unreachable (green itself may be down): as for a failed
        // connect, blue may take the session when fallback_on_connect_error allows it.
        Err(error) if blue_available && config.routing.fallback_on_connect_error => {
            if let Ok(blue) = blue {
                tracing::warn!(
                    user,
                    "{error}; falling back to blue (fallback_on_connect_error)"
                );
                shared.stats.color(Color::Green).connect_attempted();
                shared.stats.color(Color::Green).connect_failed();
                shared.stats.color(Color::Green).fell_back();
                return Ok(Plan {
                    color: Color::Blue,
                    secret: blue,
                    refusal: None,
                    blue_shares_it: true,
                });
            }
            return Err(error);
        }
        Err(error) => return Err(error),
    };
    let blue = match blue {
        Ok(blue) => blue,
        Err(error) => {
            // Nothing to compare with: green's own secret logs in to green.
            tracing::debug!(user, "{error}; green's verifier is used without comparison");
            return Ok(Plan {
                color: Color::Green,
                secret: green,
                refusal: None,
                blue_shares_it: false,
            });
        }
    };
    let differences = verifiers::secret_differences(&blue, &green);
    let unusable = |secret: &RoleSecret| {
        matches!(
            secret,
            RoleSecret::Missing | RoleSecret::NoPassword | RoleSecret::Unusable
        )
    };
    if differences.is_empty() || (unusable(&blue) && unusable(&green)) {
        shared.auth.record_mismatch(user, Vec::new());
        return Ok(Plan {
            color: Color::Green,
            secret: green,
            refusal: None,
            blue_shares_it: true,
        });
    }
    shared.auth.record_mismatch(user, differences.clone());
    if blue_takes_part && !unusable(&blue) {
        shared
            .auth
            .counters
            .mismatch_fallbacks
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            user,
            "green's verifier differs from blue's ({}): the session goes to blue",
            differences.join(", ")
        );
        return Ok(Plan {
            color: Color::Blue,
            secret: blue,
            refusal: None,
            blue_shares_it: true,
        });
    }
    let refusal = ClientError::fatal(
        "28000",
        format!(
            "role \"{user}\" has a different SCRAM verifier on green; copy it with ALTER ROLE \"{user}\" PASSWORD 'SCRAM-SHA-256$…'"
        ),
    )
    .with_detail(format!(
        "pgshift sends this role's sessions to green, and green's secret differs from blue's: {}.",
        differences.join(", ")
    ))
    .with_hint(Mismatch::hint(user));
    // The client proves its password against green's verifier when green has one, else
    // against blue's; the refusal comes only after that.
    let secret = if unusable(&green) { blue } else { green };
    Ok(Plan {
        color: Color::Green,
        secret,
        refusal: Some(refusal),
        blue_shares_it: false,
    })
}

/// Logs in to the plan's color, falling back to blue on a connect error when allowed.
async fn connect(
    shared: &Shared,
    config: &Config,
    request: &LoginRequest<'_>,
    plan: &Plan,
    secret: LoginSecret<'_>,
) -> Result<backend::LoggedIn, ConnectError> {
    let first = login_counted(shared, config, request, plan.color, secret).await;
    match first {
        Err(
            error @ (ConnectError::Unreachable { .. }
            | ConnectError::Timeout { .. }
            | ConnectError::Tls { .. }),
        ) if plan.color == Color::Green
            && plan.blue_shares_it
            && request.route.may_fall_back()
            && config.routing.fallback_on_connect_error
            && !shared.router.table().is_draining(Color::Blue) =>
        {
            tracing::warn!("{error}; falling back to blue (fallback_on_connect_error)");
            shared.stats.color(Color::Green).fell_back();
            login_counted(shared, config, request, Color::Blue, secret).await
        }
        other => other,
    }
}

async fn login_counted(
    shared: &Shared,
    config: &Config,
    request: &LoginRequest<'_>,
    color: Color,
    secret: LoginSecret<'_>,
) -> Result<backend::LoggedIn, ConnectError> {
    let stats = shared.stats.color(color);
    stats.connect_attempted();
    let result = backend::login(
        color,
        config.backend(color),
        &config.listen,
        &request.startup.raw,
        secret,
        shared.tls.backend(color),
    )
    .await;
    let user = request.facts.user.as_str();
    match &result {
        Ok(_) => {}
        Err(ConnectError::AuthMismatch { what, .. }) => {
            stats.connect_failed();
            shared.auth.verifiers.forget(color, user);
            shared
                .auth
                .record_mismatch(user, vec![format!("{color} at login: {what}")]);
        }
        Err(ConnectError::Refused {
            sqlstate: [b'2', b'8', b'P', b'0', b'1'],
            ..
        }) => {
            // The backend's secret changed since it was read: look it up again next time.
            stats.connect_failed();
            shared.auth.verifiers.forget(color, user);
        }
        Err(_) => stats.connect_failed(),
    }
    result
}

// ---------------------------------------------------------------------------------------------
// The exchange with the client
// ---------------------------------------------------------------------------------------------

/// Appends an Authentication message (`R`) with `code` and `data`.
fn put_auth(out: &mut BytesMut, code: i32, data: &[&[u8]]) {
    let length = 8 + data.iter().map(|part| part.len()).sum::<usize>();
    out.extend_from_slice(b"R");
    out.extend_from_slice(&(length as u32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    for part in data {
        out.extend_from_slice(part);
    }
}

fn password_failed(user: &str) -> ClientError {
    ClientError::fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
}

fn scram_failure(error: ScramError, user: &str) -> ExchangeEnd {
    ExchangeEnd::Failed(match error {
        ScramError::Failed => password_failed(user),
        other => ClientError::fatal(other.sqlstate(), other.to_string()),
    })
}

/// Runs the SCRAM (or md5) exchange with the client against `secret`.
#[allow(clippy::too_many_arguments)]
async fn exchange<C>(
    client: &mut C,
    buffer: &mut BytesMut,
    mock_secret: &[u8; 32],
    allow_md5: bool,
    user: &str,
    secret: &RoleSecret,
    end_point: Option<&[u8]>,
    max_message: usize,
) -> Result<Proven, ExchangeEnd>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if let (RoleSecret::Md5(hash), true) = (secret, allow_md5) {
        return md5_exchange(client, buffer, user, hash, max_message).await;
    }
    let (verifier, doomed) = match secret {
        RoleSecret::Scram(verifier) => (verifier.clone(), false),
        _ => (mock_verifier(mock_secret, user), true),
    };
    let mut server = ServerExchange::new(verifier.clone(), doomed, end_point.map(<[u8]>::to_vec));
    let mut request = BytesMut::new();
    let mut list = Vec::new();
    for mechanism in server.mechanisms() {
        list.extend_from_slice(mechanism.as_bytes());
        list.push(0);
    }
    list.push(0);
    put_auth(&mut request, AUTH_SASL, &[&list]);
    send(client, &request).await?;
    let initial = read_password_message(client, buffer, max_message).await?;
    let (mechanism, data) = parse_initial_response(&initial).ok_or_else(|| {
        ExchangeEnd::Failed(ClientError::fatal(
            "08P01",
            "malformed SASLInitialResponse message",
        ))
    })?;
    let mut random = [0u8; scram::NONCE_RAW_LEN];
    rand::fill(&mut random[..]);
    let server_first = server
        .client_first(&mechanism, data, &scram::nonce_from(&random))
        .map_err(|error| scram_failure(error, user))?;
    let mut continuation = BytesMut::new();
    put_auth(&mut continuation, AUTH_SASL_CONTINUE, &[&server_first]);
    send(client, &continuation).await?;
    let last = read_password_message(client, buffer, max_message).await?;
    let success = server
        .client_final(&last)
        .map_err(|error| scram_failure(error, user))?;
    Ok(Proven::Scram {
        verifier,
        client_key: success.client_key,
        server_final: success.server_final,
    })
}

/// The md5 exchange (`allow_md5` and an md5 secret).
async fn md5_exchange<C>(
    client: &mut C,
    buffer: &mut BytesMut,
    user: &str,
    hash: &str,
    max_message: usize,
) -> Result<Proven, ExchangeEnd>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let salt: [u8; 4] = rand::random();
    let mut request = BytesMut::new();
    put_auth(&mut request, AUTH_MD5, &[&salt]);
    send(client, &request).await?;
    let answer = read_password_message(client, buffer, max_message).await?;
    let answer = answer.strip_suffix(&[0]).unwrap_or(&answer);
    let expected = md5::salted_response(hash, &salt);
    if scram::ct_eq(answer, expected.as_bytes()) {
        Ok(Proven::Md5 {
            hash: Zeroizing::new(hash.to_string()),
        })
    } else {
        Err(ExchangeEnd::Failed(password_failed(user)))
    }
}

/// A SASLInitialResponse body: mechanism, int32 length (-1: none), data.
fn parse_initial_response(body: &[u8]) -> Option<(String, &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    let mechanism = std::str::from_utf8(&body[..end]).ok()?.to_string();
    let rest = &body[end + 1..];
    let length = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = &rest[4..];
    match length {
        -1 if data.is_empty() => Some((mechanism, data)),
        _ if usize::try_from(length).ok() == Some(data.len()) => Some((mechanism, data)),
        _ => None,
    }
}

async fn send<C: AsyncWrite + Unpin>(client: &mut C, bytes: &[u8]) -> Result<(), ExchangeEnd> {
    client
        .write_all(bytes)
        .await
        .map_err(|_| ExchangeEnd::Gone)?;
    client.flush().await.map_err(|_| ExchangeEnd::Gone)
}

/// Reads the client's next message, which must be a `p` (SASL response or password); its
/// body is returned.
async fn read_password_message<C: AsyncRead + Unpin>(
    client: &mut C,
    buffer: &mut BytesMut,
    max_message: usize,
) -> Result<Vec<u8>, ExchangeEnd> {
    loop {
        if buffer.len() >= 5 {
            let tag = buffer[0];
            let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
            if tag == b'X' {
                return Err(ExchangeEnd::Gone);
            }
            if tag != b'p' {
                return Err(ExchangeEnd::Failed(ClientError::fatal(
                    "08P01",
                    format!("expected SASL response, got message type {}", tag),
                )));
            }
            if !(4..=max_message).contains(&length) {
                return Err(ExchangeEnd::Failed(ClientError::fatal(
                    "08P01",
                    format!("invalid message length {length} for a SASL response"),
                )));
            }
            if buffer.len() > length {
                let message = buffer.split_to(length + 1);
                let mut body = message.freeze();
                body.advance(5);
                return Ok(body.to_vec());
            }
        }
        buffer.reserve(1024);
        match client.read_buf(buffer).await {
            Ok(0) | Err(_) => return Err(ExchangeEnd::Gone),
            Ok(_) => {}
        }
    }
}

async fn send_and_close<C: AsyncWrite + Unpin>(client: &mut C, bytes: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        client.write_all(bytes).await?;
        client.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_responses_are_checked() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend(11i32.to_be_bytes());
        body.extend(b"n,,n=,r=abc");
        let (mechanism, data) = parse_initial_response(&body).expect("valid");
        assert_eq!(mechanism, "SCRAM-SHA-256");
        assert_eq!(data, b"n,,n=,r=abc");
        body.pop();
        assert!(parse_initial_response(&body).is_none());
        assert!(parse_initial_response(b"SCRAM").is_none());
        let mut huge = b"SCRAM-SHA-256\0".to_vec();
        huge.extend(i32::MAX.to_be_bytes());
        assert!(parse_initial_response(&huge).is_none());
    }

    #[test]
    fn authentication_messages_are_framed() {
        let mut out = BytesMut::new();
        put_auth(&mut out, AUTH_OK, &[]);
        assert_eq!(&out[..], b"R\0\0\0\x08\0\0\0\0");
        out.clear();
        put_auth(&mut out, AUTH_SASL_FINAL, &[b"v=abc"]);
        assert_eq!(&out[..], b"R\0\0\0\x0d\0\0\0\x0cv=abc");
    }

    #[tokio::test]
    async fn an_unknown_user_gets_the_same_exchange_shape_and_error() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        // The client side of a login, scripted over an in-memory pipe.
        let (mut pgshift_end, mut client_end) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut buffer = BytesMut::new();
            exchange(
                &mut pgshift_end,
                &mut buffer,
                &[1; 32],
                false,
                "nobody",
                &RoleSecret::Missing,
                None,
                MAX_AUTH_MESSAGE,
            )
            .await
            .err()
            .map(|end| match end {
                ExchangeEnd::Failed(error) => (error.sqlstate, error.message),
                ExchangeEnd::Gone => ("gone", String::new()),
            })
        });
        let mut header = [0u8; 9];
        client_end.read_exact(&mut header).await.expect("SASL");
        assert_eq!(&header[5..9], &10i32.to_be_bytes());
        let mut rest =
            vec![
                0u8;
                u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize - 8
            ];
        client_end.read_exact(&mut rest).await.expect("mechanisms");
        assert_eq!(rest, b"SCRAM-SHA-256\0\0");
        let mut scram = ScramSha256::new(b"whatever", ChannelBinding::unsupported());
        let mut initial = b"SCRAM-SHA-256\0".to_vec();
        initial.extend((scram.message().len() as i32).to_be_bytes());
        initial.extend(scram.message());
        let mut message = vec![b'p'];
        message.extend(((initial.len() + 4) as u32).to_be_bytes());
        message.extend(initial);
        client_end.write_all(&message).await.expect("send");
        client_end.read_exact(&mut header).await.expect("continue");
        assert_eq!(&header[5..9], &11i32.to_be_bytes());
        let mut first =
            vec![
                0u8;
                u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize - 8
            ];
        client_end
            .read_exact(&mut first)
            .await
            .expect("server-first");
        let text = String::from_utf8(first.clone()).expect("text");
        assert!(text.contains(",i=4096"), "{text}");
        scram.update(&first).expect("a well-formed challenge");
        let mut message = vec![b'p'];
        message.extend(((scram.message().len() + 4) as u32).to_be_bytes());
        message.extend(scram.message());
        client_end.write_all(&message).await.expect("send");
        let outcome = server.await.expect("exchange task");
        assert_eq!(
            outcome,
            Some((
                "28P01",
                "password authentication failed for user \"nobody\"".to_string()
            ))
        );
    }
}
