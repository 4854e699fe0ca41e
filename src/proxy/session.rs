//! One client connection from accept to close: the first packet, routing, the backend
//! connection, the relay, and the session's log line.
//!
//! Before the StartupMessage has been read nothing is ever sent but the one-byte answers to
//! SSLRequest / GSSENCRequest (clients ignore errors there); after it, every refusal is an
//! ErrorResponse with the contract's SQLSTATE.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Shared;
use super::backend::{self, BackendConnection, ConnectError, configure_socket};
use super::registry::{CloseOrder, CloseReason};
use super::relay::{Relay, SessionEnd, SessionIdentity};
use crate::color::Color;
use crate::config::Config;
use crate::protocol::messages::{ClientError, cancel_request};
use crate::protocol::startup::{
    FirstPacket, StartupError, StartupMessage, first_packet_length, parse_first_packet,
};
use crate::routing::Route;

/// What the first-packet phase produced.
enum Opening {
    Startup(StartupMessage, BytesMut),
    /// The connection is done (a cancel was handled, or the client left before starting).
    Done,
}

/// Serves one accepted client connection to its end.
pub async fn serve_client(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr) {
    let config = shared.config.load_full();
    configure_socket(&client, &config.listen);
    let login_deadline = Instant::now() + config.listen.login_timeout;
    let opening = tokio::time::timeout_at(login_deadline, open(&shared, &mut client)).await;
    let (startup, leftover) = match opening {
        Ok(Ok(Opening::Startup(startup, leftover))) => (startup, leftover),
        Ok(Ok(Opening::Done)) | Err(_) => return,
        Ok(Err(refusal)) => {
            send_and_close(&mut client, &refusal.encode()).await;
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
    let backend = match connect_routed(&shared, &config, route, &startup.raw).await {
        Ok(backend) => backend,
        Err(error) => {
            tracing::warn!(user = %facts.user, database = %facts.database, client = %peer, "{error}");
            send_and_close(&mut client, &error.client_response()).await;
            return;
        }
    };
    let color = backend.color;
    let initial_order = if shared.shutting_down.load(Ordering::Acquire) {
        CloseOrder::AtIdle(CloseReason::Shutdown)
    } else {
        CloseOrder::Run
    };
    let mut ticket = shared.sessions.register(color, initial_order);
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
    let (end, requests) = match Relay::new(
        identity,
        client,
        backend.stream,
        &leftover,
        &backend.first_bytes,
        config.listen.max_message_size,
    ) {
        Ok(mut relay) => {
            let end = relay.run(&mut ticket.orders, login_deadline).await;
            if let Some((pid, secret)) = relay.cancel_key() {
                shared.cancels.remove(*pid, secret);
            }
            (end, relay.requests_completed)
        }
        Err(end) => (end, 0),
    };
    shared.sessions.unregister(ticket.id);
    stats.session_closed();
    tracing::info!(
        session = ticket.id,
        %color,
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

/// Reads first packets until a StartupMessage (answering SSL/GSS requests on the way) or a
/// CancelRequest. `Err` is the error to send the client.
async fn open(shared: &Shared, client: &mut TcpStream) -> Result<Opening, ClientError> {
    let mut buffer = BytesMut::with_capacity(1024);
    // As in Postgres, a client may ask for each kind of encryption once (libpq tries GSS
    // first, then SSL, when its gssencmode allows).
    let mut asked_ssl = false;
    let mut asked_gss = false;
    loop {
        let packet = match read_first_packet(client, &mut buffer).await {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(Opening::Done),
            Err(error) => return Err(ClientError::fatal(error.sqlstate(), error.to_string())),
        };
        match parse_first_packet(packet) {
            Err(error) => return Err(ClientError::fatal(error.sqlstate(), error.to_string())),
            Ok(request @ (FirstPacket::SslRequest | FirstPacket::GssEncRequest)) => {
                let asked = if request == FirstPacket::SslRequest {
                    &mut asked_ssl
                } else {
                    &mut asked_gss
                };
                if std::mem::replace(asked, true) {
                    return Err(ClientError::fatal(
                        "08P01",
                        "invalid startup packet: the same encryption was requested twice",
                    ));
                }
                if client.write_all(b"N").await.is_err() {
                    return Ok(Opening::Done);
                }
                if !buffer.is_empty() {
                    // Bytes sent before the answer could not have been meant for a TLS stream:
                    // a man-in-the-middle may have injected them (CVE-2021-23214).
                    return Err(ClientError::fatal("08P01", "received unencrypted data after SSL request")
                        .with_detail("This could be either a client-software bug or evidence of an attempted man-in-the-middle attack."));
                }
            }
            Ok(FirstPacket::Cancel { pid, secret }) => {
                forward_cancel(shared, pid, secret).await;
                return Ok(Opening::Done);
            }
            Ok(FirstPacket::Startup(startup)) => return Ok(Opening::Startup(startup, buffer)),
        }
    }
}

/// Reads one length-prefixed first packet; `Ok(None)` when the client left first.
async fn read_first_packet(
    client: &mut TcpStream,
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
        metrics::counter!("pgshift_cancel_requests_total", "result" => "unknown").increment(1);
        tracing::debug!(pid, "cancel request with an unknown key dropped");
        return;
    };
    let timeout = shared.config.load().backend(target.color).connect_timeout;
    let packet = cancel_request(target.backend_pid, &target.backend_secret);
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
    metrics::counter!("pgshift_cancel_requests_total", "result" => result).increment(1);
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
            metrics::counter!("pgshift_fallbacks_total").increment(1);
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
    let result =
        backend::connect(color, config.backend(color), &config.listen, startup_packet).await;
    if result.is_err() {
        stats.connect_failed();
        metrics::counter!("pgshift_backend_connect_errors_total", "color" => color.as_str())
            .increment(1);
    }
    result
}

/// Counts a refused client, sends it the error and closes.
async fn refuse(shared: &Shared, client: &mut TcpStream, reason: &'static str, error: ClientError) {
    let _ = shared;
    metrics::counter!("pgshift_clients_rejected_total", "reason" => reason).increment(1);
    tracing::info!(
        reason,
        sqlstate = error.sqlstate,
        "client refused: {}",
        error.message
    );
    send_and_close(client, &error.encode()).await;
}

async fn send_and_close(client: &mut TcpStream, bytes: &[u8]) {
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
