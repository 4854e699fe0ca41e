//! One client connection from accept to close: the first packet, TLS, routing, the backend
//! connection, the relay, and the session's log line.
//!
//! Before the StartupMessage has been read nothing is ever sent but the one-byte answers to
//! SSLRequest / GSSENCRequest (clients ignore errors there); after it, every refusal is an
//! ErrorResponse with the contract's SQLSTATE.
//!
//! With client TLS on (`[listen] tls_cert`, `tls_mode` not `disable`) an SSLRequest is answered
//! `S` and a rustls handshake follows; the first packets are then read again over TLS. A
//! connection whose first byte opens a TLS record (0x16) is Postgres 17's direct TLS: the
//! handshake runs at once and must negotiate ALPN `postgresql`. Under `tls_mode = "require"` a
//! plaintext StartupMessage gets 28000, while a plaintext CancelRequest is still honoured (libpq
//! sends its cancels without TLS).
//!
//! Authentication: in passthrough mode the client logs in with the backend through the relay;
//! with `[auth] mode = "scram"` [`crate::auth::login`] runs the client's SCRAM exchange and
//! the backend login first, and the relay starts at AuthenticationOk.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Shared;
use super::backend::{self, BackendConnection, ConnectError, configure_socket};
use super::cutover::CutoverPhase;
use super::freeze::{self, AheadRequest, AheadSlot, SessionOrigin};
use super::registry::{CloseOrder, CloseReason};
use super::relay::{Relay, RunOutcome, SessionEnd, SessionIdentity, TlsHops};
use crate::auth::login::{self, LoginOutcome, LoginRequest};
use crate::color::Color;
use crate::config::{AuthMode, Config, TlsMode};
use crate::protocol::messages::{ClientError, cancel_request};
use crate::protocol::startup::{
    FirstPacket, StartupError, StartupMessage, first_packet_length, parse_first_packet,
};
use crate::routing::{Route, RouteReason};
use crate::tls::{ALPN_POSTGRESQL, ClientStream, MaybeTls, TLS_HANDSHAKE_RECORD};

/// What the first-packet phase produced.
enum Opening {
    Startup {
        client: ClientStream,
        startup: StartupMessage,
        leftover: BytesMut,
        /// `tls-server-end-point` data of the certificate a TLS client was shown, when it
        /// defines one (SCRAM channel binding under auth termination).
        end_point: Option<Vec<u8>>,
    },
    /// The client is refused with `error`; `counted` names the refusal in
    /// `pgshift_clients_rejected_total` when it is one.
    Refused {
        client: ClientStream,
        error: ClientError,
        counted: Option<&'static str>,
    },
    /// The connection is done (a cancel was handled, the client left before starting, or its
    /// TLS handshake failed).
    Done,
}

/// Serves one accepted client connection to its end.
pub async fn serve_client(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let config = shared.config.load_full();
    configure_socket(&tcp, &config.listen);
    let login_deadline = Instant::now() + config.listen.login_timeout;
    let opening = tokio::time::timeout_at(login_deadline, open(&shared, &config, tcp, peer)).await;
    let (mut client, startup, mut leftover, end_point) = match opening {
        Ok(Opening::Startup {
            client,
            startup,
            leftover,
            end_point,
        }) => (client, startup, leftover, end_point),
        Ok(Opening::Done) | Err(_) => return,
        Ok(Opening::Refused {
            mut client,
            error,
            counted: Some(reason),
        }) => {
            refuse(&shared, &mut client, reason, error).await;
            return;
        }
        Ok(Opening::Refused {
            mut client, error, ..
        }) => {
            send_and_close(&mut client, &error.encode()).await;
            return;
        }
    };
    if shared.shutting_down.load(Ordering::Acquire) {
        refuse(
            &shared,
            &mut client,
            "shutdown",
            ClientError::fatal("57P03", "pgshift is shutting down"),
        )
        .await;
        return;
    }
    let Some(_slot) = ClientSlot::take(&shared, config.listen.max_clients) else {
        let error =
            ClientError::fatal("53300", "sorry, too many clients already").with_detail(format!(
                "pgshift serves at most {} clients ([listen] max_clients)",
                config.listen.max_clients
            ));
        refuse(&shared, &mut client, "max_clients", error).await;
        return;
    };
    let Some(_addr_slot) = super::limits::admit(
        &shared,
        &mut client,
        peer.ip(),
        config.listen.max_clients_per_addr,
    )
    .await
    else {
        return;
    };
    let facts = match startup.facts(Some(peer.ip())) {
        Ok(facts) => facts,
        Err(error) => {
            send_and_close(
                &mut client,
                &ClientError::fatal(error.sqlstate(), error.to_string()).encode(),
            )
            .await;
            return;
        }
    };
    // A transparent cutover holds new logins until it is done; past the gate this login
    // counts as in flight until it is registered, so a cutover starting now waits for it.
    let Ok(login_pass) = tokio::time::timeout_at(login_deadline, shared.cutover.pass_gate()).await
    else {
        refuse(
            &shared,
            &mut client,
            "cutover",
            ClientError::fatal(
                "57P03",
                "pgshift is moving sessions to the other database and held this login past login_timeout; retry",
            ),
        )
        .await;
        return;
    };
    let route = match shared.router.route(&facts) {
        Ok(route) => route,
        Err(refusal) => {
            refuse(
                &shared,
                &mut client,
                "routing",
                ClientError::fatal("08004", refusal.to_string()),
            )
            .await;
            return;
        }
    };
    // Auth termination: pgshift logs the client in and the backend in on its behalf; the
    // lease keeps the user's ClientKey in memory while this session lives.
    let (backend, key_lease) = if config.auth.mode == AuthMode::Scram {
        let request = LoginRequest {
            shared: &shared,
            config: &config,
            startup: &startup,
            facts: &facts,
            route,
            peer,
            end_point,
            deadline: login_deadline,
        };
        // Boxed: the login future is large (SCRAM state) and would otherwise be part of every
        // session task for its whole life, passthrough included.
        match Box::pin(login::run(request, &mut client, &mut leftover)).await {
            LoginOutcome::LoggedIn { connection, lease } => (connection, Some(lease)),
            LoginOutcome::Ended => return,
        }
    } else {
        match connect_routed(&shared, &config, route, &startup.raw).await {
            Ok(backend) => (backend, None),
            Err(error) => {
                tracing::warn!(user = %facts.user, database = %facts.database, client = %peer, "{error}");
                send_and_close(&mut client, &error.client_response()).await;
                return;
            }
        }
    };
    let color = backend.color;
    let initial_order = if shared.shutting_down.load(Ordering::Acquire) {
        CloseOrder::AtIdle(CloseReason::Shutdown)
    } else {
        CloseOrder::Run
    };
    let mut ticket = shared.sessions.register(color, initial_order);
    let walsender = route.reason == RouteReason::Walsender;
    if walsender {
        shared.sessions.mark_walsender(ticket.id);
    }
    drop(login_pass);
    let stats = shared.stats.color(color);
    stats.session_opened();
    let started = Instant::now();
    tracing::info!(session = ticket.id, %color, user = %facts.user, database = %facts.database, client = %peer, reason = ?route.reason, "session started");
    let identity = SessionIdentity {
        shared: &shared,
        session_id: ticket.id,
        color,
        backend_addr: backend.addr,
    };
    // SCRAM channel binding cannot cross pgshift: with a TLS backend the relay watches the
    // login for it — unless pgshift logged in itself, and the login is already over.
    let hops = TlsHops {
        client: client.is_tls(),
        backend: backend.stream.is_tls() && config.auth.mode != AuthMode::Scram,
    };
    let mut cutover = shared.cutover.watch();
    let ahead = AheadSlot::default();
    let (end, requests, final_color) = match Relay::new(
        identity,
        client,
        backend.stream,
        &leftover,
        &backend.first_bytes,
        config.listen.max_message_size,
        hops,
    ) {
        Ok(mut relay) => {
            if walsender {
                relay.exempt_from_cutovers();
            }
            let end = loop {
                match relay
                    .run(&mut ticket.orders, &mut cutover, login_deadline)
                    .await
                {
                    RunOutcome::Ended(end) => break end,
                    RunOutcome::Prepare(to) => {
                        let CutoverPhase::Preparing { prepared, .. } = cutover.borrow().clone()
                        else {
                            continue;
                        };
                        tokio::spawn(freeze::log_in_ahead(AheadRequest {
                            shared: shared.clone(),
                            config: config.clone(),
                            startup_packet: startup.raw.clone(),
                            user: facts.user.clone(),
                            credential: key_lease.as_ref().and_then(|lease| lease.credential()),
                            to,
                            slot: ahead.clone(),
                            done: prepared,
                            session_id: ticket.id,
                            phase: shared.cutover.watch(),
                        }));
                    }
                    RunOutcome::Frozen => {
                        let origin = SessionOrigin {
                            startup_packet: &startup.raw,
                            user: &facts.user,
                            credential: key_lease.as_ref().and_then(|lease| lease.credential()),
                            ahead: ahead.clone(),
                        };
                        let held = freeze::hold(
                            &shared,
                            &config,
                            &mut relay,
                            &mut ticket,
                            &mut cutover,
                            origin,
                        )
                        .await;
                        if let Some(end) = held {
                            break end;
                        }
                    }
                }
            };
            if let Some((pid, secret)) = relay.cancel_key() {
                shared.cancels.remove(*pid, secret);
            }
            (end, relay.requests_completed, relay.color())
        }
        Err(end) => (end, 0, color),
    };
    shared.sessions.unregister(ticket.id);
    shared.stats.color(final_color).session_closed();
    tracing::info!(
        session = ticket.id,
        color = %final_color,
        user = %facts.user,
        database = %facts.database,
        client = %peer,
        duration_ms = started.elapsed().as_millis() as u64,
        requests,
        "session ended: {end}"
    );
    if let SessionEnd::ClientError(_) | SessionEnd::BackendError(_) = end {
        tracing::debug!(session = ticket.id, "session ended on an I/O error");
    }
}

/// Reads first packets until a StartupMessage or a CancelRequest, answering SSLRequest and
/// GSSENCRequest on the way and running the TLS handshake when TLS is on.
async fn open(shared: &Shared, config: &Config, mut tcp: TcpStream, peer: SocketAddr) -> Opening {
    let listen_tls = shared.tls.listen_tls();
    let tls = listen_tls.as_ref().map(|listen| listen.config.clone());
    let mut buffer = BytesMut::with_capacity(1024);
    let mut asked = Asked::default();
    let direct = match &tls {
        Some(_) => {
            let mut first = [0u8; 1];
            match tcp.peek(&mut first).await {
                Ok(0) | Err(_) => return Opening::Done,
                Ok(_) => first[0] == TLS_HANDSHAKE_RECORD,
            }
        }
        None => false,
    };
    if !direct {
        let step = negotiate(shared, &mut tcp, &mut buffer, &mut asked, tls.is_some()).await;
        match step {
            Ok(Step::Startup(_)) if config.listen.tls_mode == TlsMode::Require => {
                return Opening::Refused {
                    client: MaybeTls::Plain(tcp),
                    error: ClientError::fatal("28000", "TLS required").with_hint(
                        "pgshift accepts only TLS connections ([listen] tls_mode = \"require\"): connect with sslmode=require or stricter",
                    ),
                    counted: Some("tls_required"),
                };
            }
            Ok(Step::Startup(startup)) => {
                return Opening::Startup {
                    client: MaybeTls::Plain(tcp),
                    startup,
                    leftover: buffer,
                    end_point: None,
                };
            }
            Ok(Step::Done) => return Opening::Done,
            Ok(Step::StartTls) => {}
            Err(error) => {
                return Opening::Refused {
                    client: MaybeTls::Plain(tcp),
                    error,
                    counted: None,
                };
            }
        }
    }
    let Some(tls) = tls else {
        return Opening::Done;
    };
    let mut stream = match tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(client = %peer, direct, %error, "TLS handshake with a client failed");
            return Opening::Done;
        }
    };
    if direct && stream.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        // As Postgres 17: direct TLS without ALPN "postgresql" could be another protocol's
        // client; nothing is said to it.
        tracing::debug!(client = %peer, "direct TLS connection without ALPN \"postgresql\" closed");
        return Opening::Done;
    }
    // Over TLS a client may not ask for encryption again.
    asked.ssl = true;
    let step = negotiate(shared, &mut stream, &mut buffer, &mut asked, false).await;
    let client = MaybeTls::Tls(Box::new(stream));
    match step {
        Ok(Step::Startup(startup)) => Opening::Startup {
            client,
            startup,
            leftover: buffer,
            end_point: listen_tls
                .as_ref()
                .and_then(|listen| listen.end_point.hash())
                .map(<[u8]>::to_vec),
        },
        Ok(Step::Done | Step::StartTls) => Opening::Done,
        Err(error) => Opening::Refused {
            client,
            error,
            counted: None,
        },
    }
}

/// Which encryptions the client asked for so far (each may be asked for once, as in Postgres:
/// libpq tries GSS first, then SSL, when its gssencmode allows).
#[derive(Debug, Default)]
struct Asked {
    ssl: bool,
    gss: bool,
}

/// Where the first-packet exchange on one stream ended.
enum Step {
    Startup(StartupMessage),
    /// SSLRequest answered `S`: the TLS handshake comes next.
    StartTls,
    /// A cancel was handled, or the client left.
    Done,
}

/// Reads first packets on `client` until a StartupMessage, a CancelRequest or an SSLRequest
/// answered `S` (only when `offer_tls`). `Err` is the error to send the client.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    client: &mut S,
    buffer: &mut BytesMut,
    asked: &mut Asked,
    offer_tls: bool,
) -> Result<Step, ClientError> {
    loop {
        let packet = match read_first_packet(client, buffer).await {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(Step::Done),
            Err(error) => return Err(ClientError::fatal(error.sqlstate(), error.to_string())),
        };
        match parse_first_packet(packet) {
            Err(error) => return Err(ClientError::fatal(error.sqlstate(), error.to_string())),
            Ok(request @ (FirstPacket::SslRequest | FirstPacket::GssEncRequest)) => {
                let ssl = request == FirstPacket::SslRequest;
                let flag = if ssl { &mut asked.ssl } else { &mut asked.gss };
                if std::mem::replace(flag, true) {
                    return Err(ClientError::fatal(
                        "08P01",
                        "invalid startup packet: the same encryption was requested twice",
                    ));
                }
                let start_tls = ssl && offer_tls;
                let answer: &[u8] = if start_tls { b"S" } else { b"N" };
                if client.write_all(answer).await.is_err() || client.flush().await.is_err() {
                    return Ok(Step::Done);
                }
                if !buffer.is_empty() {
                    // Bytes sent before the answer could not have been meant for a TLS stream:
                    // a man-in-the-middle may have injected them (CVE-2021-23214).
                    return Err(ClientError::fatal("08P01", "received unencrypted data after SSL request")
                        .with_detail("This could be either a client-software bug or evidence of an attempted man-in-the-middle attack."));
                }
                if start_tls {
                    return Ok(Step::StartTls);
                }
            }
            Ok(FirstPacket::Cancel { pid, secret }) => {
                forward_cancel(shared, pid, secret).await;
                return Ok(Step::Done);
            }
            Ok(FirstPacket::Startup(startup)) => return Ok(Step::Startup(startup)),
        }
    }
}

/// Reads one length-prefixed first packet; `Ok(None)` when the client left first.
async fn read_first_packet<S: AsyncRead + Unpin>(
    client: &mut S,
    buffer: &mut BytesMut,
) -> Result<Option<Bytes>, StartupError> {
    let mut needed = 4;
    loop {
        if buffer.len() >= 4 {
            needed = first_packet_length([buffer[0], buffer[1], buffer[2], buffer[3]])?;
            if buffer.len() >= needed {
                return Ok(Some(buffer.split_to(needed).freeze()));
            }
        }
        buffer.reserve(needed.saturating_sub(buffer.len()).max(256));
        match client.read_buf(buffer).await {
            Ok(0) | Err(_) if buffer.len() >= 4 => {
                return Err(StartupError::Malformed(
                    "the client closed the connection mid-packet",
                ));
            }
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Sends a cancel to the backend that owns the key; unknown keys are dropped silently.
async fn forward_cancel(shared: &Shared, pid: i32, secret: Bytes) {
    let Some(target) = shared.cancels.lookup(pid, &secret) else {
        shared.stats.cancel_unknown.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(pid, "cancel request with an unknown key dropped");
        return;
    };
    if target.held.is_frozen() {
        // A transparent cutover holds this session: its request never reached the backend,
        // and the session drops it and answers 57014 itself.
        target.held.ring();
        tracing::debug!(
            session = target.session_id,
            "cancel request for a held request"
        );
        return;
    }
    let timeout = shared.config.load().backend(target.color).connect_timeout;
    let packet = cancel_request(target.backend_pid, &target.backend_secret);
    // Counted before it is sent: the 57014 it causes may race the cancel connection's close.
    target.cancels_forwarded.fetch_add(1, Ordering::Relaxed);
    let sent = tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(target.backend_addr).await?;
        stream.write_all(&packet).await?;
        // The server closes after reading it; wait for that so the cancel is delivered.
        let mut sink = [0u8; 1];
        let _ = stream.read(&mut sink).await;
        Ok::<_, std::io::Error>(())
    })
    .await;
    let result = match sent {
        Ok(Ok(())) => {
            shared
                .stats
                .cancel_forwarded
                .fetch_add(1, Ordering::Relaxed);
            "forwarded"
        }
        _ => {
            shared.stats.cancel_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(color = %target.color, backend = %target.backend_addr, "could not forward a cancel request");
            "failed"
        }
    };
    tracing::debug!(session = target.session_id, color = %target.color, result, "cancel request");
}

/// Connects to the routed color, falling back to blue when allowed and green fails.
async fn connect_routed(
    shared: &Shared,
    config: &Config,
    route: Route,
    startup_packet: &[u8],
) -> Result<BackendConnection, ConnectError> {
    let first = connect_counted(shared, config, route.color, startup_packet).await;
    match first {
        Err(error)
            if route.color == Color::Green
                && route.may_fall_back()
                && config.routing.fallback_on_connect_error
                && !shared.router.table().is_draining(Color::Blue) =>
        {
            tracing::warn!("{error}; falling back to blue (fallback_on_connect_error)");
            shared.stats.color(Color::Green).fell_back();
            connect_counted(shared, config, Color::Blue, startup_packet).await
        }
        other => other,
    }
}

async fn connect_counted(
    shared: &Shared,
    config: &Config,
    color: Color,
    startup_packet: &[u8],
) -> Result<BackendConnection, ConnectError> {
    let stats = shared.stats.color(color);
    stats.connect_attempted();
    let result = backend::connect(
        color,
        config.backend(color),
        &config.listen,
        startup_packet,
        shared.tls.backend(color),
    )
    .await;
    if result.is_err() {
        stats.connect_failed();
    }
    result
}

/// Counts a refused client, sends it the error and closes.
async fn refuse<S: AsyncWrite + Unpin>(
    shared: &Shared,
    client: &mut S,
    reason: &'static str,
    error: ClientError,
) {
    metrics::counter!("pgshift_clients_rejected_total", "reason" => reason).increment(1);
    // The first refusal of each reason in full, then a summary per interval: a flood of
    // clients (shutdown, max_clients) must not become a flood of log lines.
    if shared.refusals.note(reason) {
        tracing::info!(
            reason,
            sqlstate = error.sqlstate,
            "client refused: {}",
            error.message
        );
    }
    send_and_close(client, &error.encode()).await;
}

/// The summary line of the refusals of one reason that were counted, not logged.
pub fn log_refusals(reason: &&'static str, count: u64, interval: Duration) {
    tracing::info!(
        reason,
        refused = count,
        "clients refused: {count} more ({reason}) in the last {}",
        humantime::format_duration(interval)
    );
}

async fn send_and_close<S: AsyncWrite + Unpin>(client: &mut S, bytes: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        client.write_all(bytes).await?;
        client.shutdown().await
    })
    .await;
}

/// A place among the `max_clients` sessions, given back on drop.
struct ClientSlot<'a> {
    shared: &'a Shared,
}

impl<'a> ClientSlot<'a> {
    fn take(shared: &'a Shared, max_clients: usize) -> Option<ClientSlot<'a>> {
        let previous = shared.clients.fetch_add(1, Ordering::AcqRel);
        if previous >= max_clients {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ClientSlot { shared })
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
    }
}
