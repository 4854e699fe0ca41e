//! The relay: bytes between a client and its backend, both ways, in large chunks.
//!
//! One task per session drives both directions from a single poll loop, so the session's state
//! (request accounting, idle point, cancel key) needs no lock. Each direction has a bounded
//! buffer (at most [`MAX_BUFFER`] bytes); while one side cannot take more, the other side is
//! not read (backpressure). Only message headers are scanned ([`Framer`]); the few backend
//! messages pgshift must read — ErrorResponse, ReadyForQuery, BackendKeyData and the COPY
//! responses — are held until whole, then forwarded in the same write as their neighbours.
//!
//! The relay ends on its own when either side closes, and from outside through the session's
//! close orders: `AtIdle` is honoured at the next idle point (CONTRACT.md: status `I`, nothing
//! forwarded since, no partial message either way — the client's next bytes are not read
//! while the order waits), `Now` wherever the session is.
//!
//! When the backend hop is TLS the relay also watches the login for SCRAM channel binding,
//! which cannot cross pgshift (a client binds to pgshift's certificate, not the database's). It
//! reads the backend's Authentication requests during login, and then:
//! - client hop TLS too: the client's first `p` message after AuthenticationSASL (its
//!   SASLInitialResponse) is read, and when its GS2 flag is `p` or `y` the session ends with
//!   FATAL 28000 naming the fixes instead of forwarding it;
//! - client hop plaintext: `SCRAM-SHA-256-PLUS` is taken out of AuthenticationSASL's mechanism
//!   list (rewritten in place), because libpq refuses a PLUS offer over a connection that is
//!   not TLS; the client then logs in with plain SCRAM, as with a plaintext server.
//!
//! Those types are inspected during login only.
//!
//! A transparent cutover ([`crate::cutover::procedure`]) asks sessions of the old color to
//! freeze: at its next idle point the relay returns [`RunOutcome::Frozen`] without reading the
//! client's next request; the caller ([`super::freeze`]) may then [`Relay::rehome`] it onto a
//! backend of the new color, or just run it again.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Shared;
use super::cancel::CancelTarget;
use super::cutover::{CutoverPhase, HeldCancel};
use super::registry::{CloseOrder, CloseReason};
use super::requests::{BackendEvent, RequestTracker};
use crate::color::Color;
use crate::protocol::framing::{BadLength, Framer, TagSet};
use crate::protocol::messages::{self, ClientError, TERMINATE};
use crate::protocol::sasl::{self, ChannelBinding};
use crate::stats::ColorStats;

/// The largest message length a backend can announce (the length word is a signed int32).
const BACKEND_MAX_MESSAGE: usize = i32::MAX as usize;

/// The SQLSTATE of a cancelled query (or a statement_timeout).
const QUERY_CANCELED: &[u8; 5] = b"57014";

/// A direction's buffer starts this large and grows, while its reader is behind, up to
/// [`MAX_BUFFER`].
const INITIAL_BUFFER: usize = 4 * 1024;
/// The most a direction buffers before it stops reading its source.
pub const MAX_BUFFER: usize = 256 * 1024;
/// How long pgshift waits to hand a client its last bytes and error before closing anyway.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// Backend messages the relay reads: errors, ReadyForQuery, the cancel key, COPY starts, and
/// ParameterStatus (kept, so that a transparent cutover tells the client only what differs).
const BACKEND_INSPECTED: TagSet = TagSet::of(b"EZKGHWS");
/// ... and, once a transparent cutover moved the session, NotificationResponse (its PID is
/// rewritten for the client).
const BACKEND_INSPECTED_MOVED: TagSet = TagSet::of(b"EZKGHWSA");
/// ... and, while it watches a login for channel binding, Authentication requests.
const BACKEND_INSPECTED_WATCHING_SASL: TagSet = TagSet::of(b"EZKGHWSR");
/// Client messages read while watching a login for channel binding: SASLInitialResponse.
const CLIENT_INSPECTED_WATCHING_SASL: TagSet = TagSet::of(b"pP");
/// Client messages read: Parse, to remember the unnamed statement a cutover must carry.
const CLIENT_INSPECTED: TagSet = TagSet::of(b"P");

/// Bytes read but not yet written, in one flat, reusable vector.
#[derive(Debug)]
struct IoBuffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl IoBuffer {
    fn new() -> IoBuffer {
        IoBuffer {
            data: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Free space to read into, compacting or growing first; `None` when full (backpressure).
    fn spare(&mut self) -> Option<&mut [u8]> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < MAX_BUFFER {
                let grown = (self.data.len() * 2).min(MAX_BUFFER);
                self.data.resize(grown, 0);
            } else {
                return None;
            }
        }
        Some(&mut self.data[self.end..])
    }

    fn filled(&mut self, count: usize) {
        self.end += count;
    }

    fn consume(&mut self, count: usize) {
        self.start += count;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Gives back a buffer that grew during a burst, once it is empty.
    fn shrink_if_idle(&mut self) {
        if self.is_empty() && self.data.len() > INITIAL_BUFFER {
            self.data = vec![0; INITIAL_BUFFER];
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        if self.data.len() - self.end < bytes.len() {
            self.data.resize(self.end + bytes.len(), 0);
        }
        self.data[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }
}

/// One direction: its buffer and its framer.
#[derive(Debug)]
struct Flow {
    buffer: IoBuffer,
    framer: Framer,
    /// Bytes were written since the sink last finished a flush. A TLS stream may accept bytes
    /// and keep part of their records queued when its socket is full; they go out only on a
    /// later write or flush, so the flush is retried until it completes.
    unflushed: bool,
    /// A request completed: once everything read so far is sent, a buffer that grew during
    /// the request goes back to its initial size, so an idle session holds no burst memory.
    shrink_when_sent: bool,
}

impl Flow {
    fn new(inspected: TagSet, max_message_size: usize) -> Flow {
        Flow {
            buffer: IoBuffer::new(),
            framer: Framer::new(inspected, max_message_size),
            unflushed: false,
            shrink_when_sent: false,
        }
    }

    /// Nothing buffered and the stream stopped at a message boundary.
    fn is_quiet(&self) -> bool {
        self.buffer.is_empty() && self.framer.at_boundary()
    }

    /// Writes what is released; `Ready(Ok(true))` when bytes moved.
    fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        sink: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<bool>> {
        let released = self.framer.released();
        if released == 0 {
            if self.unflushed {
                // A no-op for TCP; TLS streams need it to push their last records out.
                ready!(Pin::new(&mut *sink).poll_flush(cx))?;
                self.unflushed = false;
            }
            return Poll::Ready(Ok(false));
        }
        let written =
            ready!(Pin::new(&mut *sink).poll_write(cx, &self.buffer.pending()[..released]))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.buffer.consume(written);
        self.framer.consumed(written);
        self.unflushed = true;
        if self.buffer.is_empty() {
            if std::mem::take(&mut self.shrink_when_sent) {
                self.buffer.shrink_if_idle();
            }
            if let Poll::Ready(flushed) = Pin::new(&mut *sink).poll_flush(cx) {
                flushed?;
                self.unflushed = false;
            }
        }
        Poll::Ready(Ok(true))
    }

    /// Reads once; `Ready(Ok(0))` is end of stream, `Pending` also when the buffer is full.
    fn poll_receive<R: AsyncRead + Unpin>(
        &mut self,
        source: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let Some(spare) = self.buffer.spare() else {
            return Poll::Pending;
        };
        let mut read = ReadBuf::new(spare);
        ready!(Pin::new(source).poll_read(cx, &mut read))?;
        let count = read.filled().len();
        self.buffer.filled(count);
        Poll::Ready(Ok(count))
    }

    /// Writes every released byte, then `extra`, within the farewell timeout; best effort.
    async fn flush_then<W: AsyncWrite + Unpin>(&mut self, sink: &mut W, extra: Option<&[u8]>) {
        let farewell = async {
            let released = self.framer.released();
            sink.write_all(&self.buffer.pending()[..released]).await?;
            self.buffer.consume(released);
            self.framer.consumed(released);
            if let Some(extra) = extra {
                sink.write_all(extra).await?;
            }
            sink.flush().await?;
            self.unflushed = false;
            Ok::<_, io::Error>(())
        };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, farewell).await;
    }
}

/// Something the relay's poll loop cannot handle alone.
#[derive(Debug)]
enum RelayEvent {
    LoggedIn,
    IdlePoint,
    /// A cutover asked this session to freeze, and it is at an idle point.
    Frozen,
    ClientClosed,
    BackendClosed,
    ClientFailed(io::Error),
    BackendFailed(io::Error),
    ClientViolation(BadLength),
    BackendViolation(BadLength),
    /// The client's SCRAM asked for channel binding while both hops are TLS.
    ChannelBindingAcrossTls(ChannelBinding),
}

/// Why [`Relay::run`] returned.
#[derive(Debug)]
pub enum RunOutcome {
    Ended(SessionEnd),
    /// Frozen at an idle point for a transparent cutover: nothing more is forwarded until the
    /// caller runs the relay again (resumed, or moved with [`Relay::rehome`]).
    Frozen,
    /// A transparent cutover to this color is about to freeze this session: the caller logs
    /// it in there ahead ([`super::freeze::log_in_ahead`]) and runs the relay again at once.
    Prepare(Color),
}

/// Why the loop stopped without the session ending.
enum Stop {
    Frozen,
    Prepare(Color),
}

/// How and why a session ended, for its log line.
#[derive(Debug)]
pub enum SessionEnd {
    ClientClosed,
    BackendClosed {
        fatal_from_backend: bool,
    },
    ClosedAtIdlePoint(CloseReason),
    ClosedAtDeadline(CloseReason),
    LoginTimeout,
    ClientError(io::Error),
    BackendError(io::Error),
    ClientProtocolViolation(BadLength),
    BackendProtocolViolation(BadLength),
    /// Refused with 28000: SCRAM channel binding cannot cross pgshift's two TLS hops.
    ChannelBindingRefused,
    /// Closed with 57P01 by a transparent cutover: the session could not move.
    Unmovable(String),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::ClientClosed => write!(f, "client closed the connection"),
            SessionEnd::BackendClosed {
                fatal_from_backend: true,
            } => {
                write!(f, "backend ended the session with a FATAL error")
            }
            SessionEnd::BackendClosed { .. } => write!(f, "backend closed the connection"),
            SessionEnd::ClosedAtIdlePoint(reason) => {
                write!(
                    f,
                    "closed by pgshift at an idle point ({})",
                    reason.as_str()
                )
            }
            SessionEnd::ClosedAtDeadline(reason) => {
                write!(f, "closed by pgshift at its deadline ({})", reason.as_str())
            }
            SessionEnd::LoginTimeout => write!(f, "login not finished within login_timeout"),
            SessionEnd::ClientError(error) => write!(f, "client connection failed: {error}"),
            SessionEnd::BackendError(error) => write!(f, "backend connection failed: {error}"),
            SessionEnd::ClientProtocolViolation(error) => {
                write!(f, "client protocol violation: {error}")
            }
            SessionEnd::BackendProtocolViolation(error) => {
                write!(f, "backend protocol violation: {error}")
            }
            SessionEnd::Unmovable(reason) => {
                write!(
                    f,
                    "closed by a transparent cutover: it could not move ({reason})"
                )
            }
            SessionEnd::ChannelBindingRefused => write!(
                f,
                "refused: the client's SCRAM asked for channel binding, which cannot cross two TLS hops"
            ),
        }
    }
}

/// Who this session is, for accounting and the cancel table.
pub struct SessionIdentity<'a> {
    pub shared: &'a Shared,
    pub session_id: u64,
    pub color: Color,
    pub backend_addr: std::net::SocketAddr,
}

/// Which hops of a session are TLS; they decide what the login watch does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsHops {
    pub client: bool,
    pub backend: bool,
}

/// Where the watch for SCRAM channel binding stands (backend hop TLS only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaslWatch {
    /// Not watching: a hop is plaintext, or the first SASL message was read, or login is over.
    Off,
    /// Waiting for the backend's AuthenticationSASL.
    AwaitingSaslRequest,
    /// AuthenticationSASL was relayed: the client's next `p` is its SASLInitialResponse.
    AwaitingInitialResponse,
}

/// One session's relay between `client` and `backend`.
pub struct Relay<'a, C, B> {
    identity: SessionIdentity<'a>,
    stats: &'a ColorStats,
    client: C,
    backend: B,
    to_backend: Flow,
    to_client: Flow,
    requests: RequestTracker,
    close_at_idle: Option<CloseReason>,
    /// The key handed to the client in place of the backend's, while registered.
    cancel_key: Option<(i32, Bytes)>,
    /// Cancels pgshift forwarded for this session (bumped by the cancel path), and how many
    /// of them a 57014 has already answered: a query the client itself cancelled is not an
    /// error of the backend's.
    cancels_forwarded: Arc<AtomicU64>,
    cancels_answered: u64,
    logged_in_reported: bool,
    backend_sent_fatal: bool,
    /// The client sent Terminate: the backend closing next is the expected end, not a loss.
    client_terminated: bool,
    sasl_watch: SaslWatch,
    /// The client hop is plaintext: AuthenticationSASL loses `SCRAM-SHA-256-PLUS`.
    hide_plus: bool,
    /// The client's SASLInitialResponse asked for channel binding across two TLS hops: it is
    /// not forwarded, and the session ends with 28000.
    channel_binding_refused: Option<ChannelBinding>,
    pub requests_completed: u64,
    /// The ParameterStatus values the client was told, in order of first report.
    parameters: Vec<(String, String)>,
    /// A cutover freezes this session's color: stop at the next idle point.
    freeze_requested: bool,
    /// False for walsenders: a cutover leaves them running.
    freezable: bool,
    /// This cutover's prepare step was passed on (the session is logged in ahead, or trying).
    prepared_ahead: bool,
    /// The unnamed prepared statement, as the client last parsed it (since its last simple
    /// Query), for a cutover to parse again on the new backend.
    unnamed_statement: UnnamedStatement,
    /// Frozen flag and cancel doorbell, shared with this session's cancel-table entry.
    held: Arc<HeldCancel>,
    /// After a move: notifications from the new backend's PID (its own NOTIFYs) carry the PID
    /// the client knows instead.
    notification_pid: Option<(i32, i32)>,
}

impl<'a, C, B> Relay<'a, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    /// A relay whose buffers already hold what was read during connection setup. `hops`
    /// says which connections are TLS: with a TLS backend the login is watched for SCRAM
    /// channel binding.
    pub fn new(
        identity: SessionIdentity<'a>,
        client: C,
        backend: B,
        client_bytes: &[u8],
        backend_bytes: &[u8],
        max_message_size: usize,
        hops: TlsHops,
    ) -> Result<Relay<'a, C, B>, SessionEnd> {
        let stats = identity.shared.stats.color(identity.color);
        let (sasl_watch, client_inspected, backend_inspected) = match hops {
            TlsHops { backend: false, .. } => (SaslWatch::Off, CLIENT_INSPECTED, BACKEND_INSPECTED),
            TlsHops { client: true, .. } => (
                SaslWatch::AwaitingSaslRequest,
                CLIENT_INSPECTED_WATCHING_SASL,
                BACKEND_INSPECTED_WATCHING_SASL,
            ),
            TlsHops { client: false, .. } => (
                SaslWatch::AwaitingSaslRequest,
                CLIENT_INSPECTED,
                BACKEND_INSPECTED_WATCHING_SASL,
            ),
        };
        let mut relay = Relay {
            identity,
            stats,
            client,
            backend,
            to_backend: Flow::new(client_inspected, max_message_size),
            // `max_message_size` protects pgshift from clients; what the database sends streams
            // through whatever its size (only a length Postgres itself could never send is
            // refused).
            to_client: Flow::new(backend_inspected, BACKEND_MAX_MESSAGE),
            requests: RequestTracker::new(),
            close_at_idle: None,
            cancel_key: None,
            cancels_forwarded: Arc::new(AtomicU64::new(0)),
            cancels_answered: 0,
            logged_in_reported: false,
            backend_sent_fatal: false,
            client_terminated: false,
            sasl_watch,
            hide_plus: hops.backend && !hops.client,
            channel_binding_refused: None,
            requests_completed: 0,
            parameters: Vec::new(),
            freeze_requested: false,
            freezable: true,
            prepared_ahead: false,
            notification_pid: None,
            unnamed_statement: UnnamedStatement::None,
            held: Arc::default(),
        };
        let now = Instant::now();
        relay.to_backend.buffer.extend(client_bytes);
        relay
            .scan_client(now)
            .map_err(SessionEnd::ClientProtocolViolation)?;
        relay.to_client.buffer.extend(backend_bytes);
        relay
            .scan_backend(now)
            .map_err(SessionEnd::BackendProtocolViolation)?;
        Ok(relay)
    }

    /// Runs until the session ends or a cutover freezes it; `login_deadline` bounds the time
    /// until the first ReadyForQuery.
    pub async fn run(
        &mut self,
        orders: &mut watch::Receiver<CloseOrder>,
        cutover: &mut watch::Receiver<CutoverPhase>,
        login_deadline: Instant,
    ) -> RunOutcome {
        match self.run_until_frozen(orders, cutover, login_deadline).await {
            Ok(Stop::Frozen) => RunOutcome::Frozen,
            Ok(Stop::Prepare(to)) => RunOutcome::Prepare(to),
            Err(end) => RunOutcome::Ended(end),
        }
    }

    async fn run_until_frozen(
        &mut self,
        orders: &mut watch::Receiver<CloseOrder>,
        cutover: &mut watch::Receiver<CutoverPhase>,
        login_deadline: Instant,
    ) -> Result<Stop, SessionEnd> {
        self.held.set_frozen(false);
        let login_timer = tokio::time::sleep_until(login_deadline);
        tokio::pin!(login_timer);
        let mut orders_open = true;
        let mut cutover_open = true;
        loop {
            let order = *orders.borrow_and_update();
            match order {
                CloseOrder::Run => {}
                CloseOrder::AtIdle(reason) => self.close_at_idle = Some(reason),
                CloseOrder::Now(reason) => {
                    self.farewell(ClientError::fatal("57P01", reason.message(true)))
                        .await;
                    return Err(SessionEnd::ClosedAtDeadline(reason));
                }
            }
            // Only sessions logged in before the cutover began freeze: a login still running
            // was counted at the gate and registered before the freeze was asked for.
            let (freezing, preparing) = {
                let phase = cutover.borrow_and_update();
                (phase.freezing(), phase.preparing())
            };
            self.freeze_requested = self.freezable
                && self.requests.logged_in()
                && freezing == Some(self.identity.color);
            match preparing {
                Some((from, to))
                    if from == self.identity.color
                        && self.freezable
                        && self.requests.logged_in()
                        && !self.prepared_ahead =>
                {
                    self.prepared_ahead = true;
                    return Ok(Stop::Prepare(to));
                }
                Some(_) => {}
                None => self.prepared_ahead = false,
            }
            let logged_in = self.requests.logged_in();
            let event = tokio::select! {
                changed = orders.changed(), if orders_open => {
                    orders_open = changed.is_ok();
                    continue;
                }
                changed = cutover.changed(), if cutover_open => {
                    cutover_open = changed.is_ok();
                    continue;
                }
                _ = &mut login_timer, if !logged_in => {
                    self.farewell(ClientError::fatal(
                        "08006",
                        "pgshift: login not finished within login_timeout",
                    ))
                    .await;
                    return Err(SessionEnd::LoginTimeout);
                }
                event = poll_fn(|cx| self.poll_relay(cx)) => event,
            };
            match event {
                RelayEvent::LoggedIn => continue,
                RelayEvent::Frozen => {
                    self.held.set_frozen(true);
                    return Ok(Stop::Frozen);
                }
                RelayEvent::IdlePoint => {
                    let reason = self.close_at_idle.unwrap_or(CloseReason::Shutdown);
                    self.farewell(ClientError::fatal("57P01", reason.message(false)))
                        .await;
                    return Err(SessionEnd::ClosedAtIdlePoint(reason));
                }
                RelayEvent::ClientClosed => {
                    self.say_goodbye_to_backend().await;
                    return Err(SessionEnd::ClientClosed);
                }
                RelayEvent::ClientFailed(error) => {
                    self.say_goodbye_to_backend().await;
                    return Err(SessionEnd::ClientError(error));
                }
                RelayEvent::ClientViolation(error) => {
                    self.farewell(ClientError::fatal("08P01", format!("pgshift: {error}")))
                        .await;
                    return Err(SessionEnd::ClientProtocolViolation(error));
                }
                RelayEvent::BackendClosed | RelayEvent::BackendFailed(_)
                    if self.client_terminated =>
                {
                    self.to_client.flush_then(&mut self.client, None).await;
                    let _ = self.client.shutdown().await;
                    return Err(SessionEnd::ClientClosed);
                }
                RelayEvent::BackendClosed => {
                    self.backend_lost(None).await;
                    return Err(SessionEnd::BackendClosed {
                        fatal_from_backend: self.backend_sent_fatal,
                    });
                }
                RelayEvent::BackendFailed(error) => {
                    self.backend_lost(Some(&error)).await;
                    return Err(SessionEnd::BackendError(error));
                }
                RelayEvent::BackendViolation(error) => {
                    self.backend_lost(None).await;
                    return Err(SessionEnd::BackendProtocolViolation(error));
                }
                RelayEvent::ChannelBindingAcrossTls(flag) => {
                    self.refuse_channel_binding(&flag).await;
                    return Err(SessionEnd::ChannelBindingRefused);
                }
            }
        }
    }

    /// Ends the session: what is released goes to the client, then `error`; the backend is
    /// told goodbye.
    pub async fn close(&mut self, error: ClientError) {
        self.farewell(error).await;
    }

    /// The state shared with the rest of the proxy.
    pub fn shared(&self) -> &'a Shared {
        self.identity.shared
    }

    /// Queues whole backend messages for the client (what arrived during a cutover's side
    /// queries); they go out when the relay runs again.
    pub fn forward_to_client(&mut self, messages: &[u8]) {
        if messages.is_empty() {
            return;
        }
        self.to_client.buffer.extend(messages);
        let _ = self.scan_backend(Instant::now());
    }

    /// The unnamed statement a cutover must parse again on the new backend.
    pub fn unnamed_statement(&self) -> &UnnamedStatement {
        &self.unnamed_statement
    }

    /// This session's frozen flag and cancel doorbell.
    pub fn held(&self) -> Arc<HeldCancel> {
        self.held.clone()
    }

    /// While frozen, the client cancelled the request it sent meanwhile: reads that request
    /// (through its Sync, or one simple Query; `wait` at most), drops it and answers 57014
    /// and ReadyForQuery `I`, so nothing of it ever runs. Bytes after it stay queued for the
    /// backend. False when no whole request was waiting.
    pub async fn cancel_held_request(&mut self, wait: Duration) -> io::Result<bool> {
        use tokio::io::AsyncReadExt;
        let mut held = Vec::new();
        let read_until_request = async {
            loop {
                if let Some(end) = messages::first_request_end(&held) {
                    return Ok::<_, io::Error>(Some(end));
                }
                let mut chunk = [0u8; 4096];
                let count = self.client.read(&mut chunk).await?;
                if count == 0 {
                    return Ok(None);
                }
                held.extend_from_slice(&chunk[..count]);
            }
        };
        let end = match tokio::time::timeout(wait, read_until_request).await {
            Ok(Ok(end)) => end,
            Ok(Err(error)) => return Err(error),
            Err(_) => None,
        };
        let rest = &held[end.unwrap_or(0)..];
        if !rest.is_empty() {
            self.to_backend.buffer.extend(rest);
            if let Err(error) = self.scan_client(Instant::now()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    error.to_string(),
                ));
            }
        }
        if end.is_none() {
            return Ok(false);
        }
        let mut answer =
            ClientError::error("57014", "canceling statement due to user request").encode();
        answer.extend_from_slice(&messages::ready_for_query(b'I'));
        self.client.write_all(&answer).await?;
        self.client.flush().await?;
        Ok(true)
    }

    /// Keeps this session out of transparent cutovers (a walsender).
    pub fn exempt_from_cutovers(&mut self) {
        self.freezable = false;
    }

    /// The color of the backend this session talks to now.
    pub fn color(&self) -> Color {
        self.identity.color
    }

    /// The frozen session's backend, for the cutover's questions about its state.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Moves this frozen session to `backend` on `color`, logged in as the same user with the
    /// same startup packet; `greeting` is what that backend sent after AuthenticationOk,
    /// through its ReadyForQuery. The client keeps its cancel key (now pointing at the new
    /// backend) and is told, with a ParameterStatus each, only the reported values that
    /// differ. Returns the old backend, for the caller to say goodbye to.
    pub fn rehome(
        &mut self,
        color: Color,
        backend: B,
        backend_addr: std::net::SocketAddr,
        greeting: &[u8],
    ) -> Result<B, String> {
        let messages = messages::split_messages(greeting)
            .ok_or("the new backend's greeting is not whole messages")?;
        let mut new_key = None;
        let mut ready = false;
        let mut told = bytes::BytesMut::new();
        for (tag, body) in messages {
            match tag {
                b'S' => {
                    let (name, value) = messages::parameter_status(body)
                        .ok_or("the new backend sent a malformed ParameterStatus")?;
                    if name == "server_encoding"
                        && self
                            .parameters
                            .iter()
                            .any(|(known, old)| known == name && old != value)
                    {
                        return Err(format!(
                            "the new database's server_encoding is {value}, not the old one's"
                        ));
                    }
                    if remember_parameter(&mut self.parameters, name, value) {
                        told.extend_from_slice(&messages::parameter_status_message(name, value));
                    }
                }
                b'K' => new_key = messages::backend_key(body),
                b'N' => told.extend_from_slice(&messages::whole_message(tag, body)),
                b'Z' => ready = messages::ready_status(body) == Some(b'I'),
                b'E' => {
                    return Err(format!(
                        "the new backend refused the session ({})",
                        messages::error_sqlstate(body)
                            .map(|code| String::from_utf8_lossy(&code).into_owned())
                            .unwrap_or_default()
                    ));
                }
                _ => {}
            }
        }
        if !ready {
            return Err("the new backend's greeting did not end with ReadyForQuery (idle)".into());
        }
        let (backend_pid, backend_secret) =
            new_key.ok_or("the new backend sent no BackendKeyData")?;
        if let Some((pid, secret)) = &self.cancel_key {
            self.identity.shared.cancels.retarget(
                *pid,
                secret,
                CancelTarget {
                    cancels_forwarded: self.cancels_forwarded.clone(),
                    held: self.held.clone(),
                    color,
                    backend_addr,
                    backend_pid,
                    backend_secret,
                    session_id: self.identity.session_id,
                },
            );
        }
        self.notification_pid = self
            .cancel_key
            .as_ref()
            .map(|(client_pid, _)| (backend_pid, *client_pid));
        self.to_client.framer.set_inspected(BACKEND_INSPECTED_MOVED);
        self.identity.color = color;
        self.identity.backend_addr = backend_addr;
        self.stats = self.identity.shared.stats.color(color);
        self.identity
            .shared
            .sessions
            .recolor(self.identity.session_id, color);
        self.freeze_requested = false;
        self.forward_to_client(&told);
        Ok(std::mem::replace(&mut self.backend, backend))
    }

    /// The proxy key this session's client was given, to remove from the cancel table.
    pub fn cancel_key(&self) -> Option<&(i32, Bytes)> {
        self.cancel_key.as_ref()
    }

    /// True at an idle point with both directions quiet.
    fn at_idle_point(&self) -> bool {
        self.requests.at_idle_point() && self.to_backend.is_quiet() && self.to_client.is_quiet()
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<RelayEvent> {
        loop {
            let mut progress = false;
            // Checked before anything is sent: the refused SASLInitialResponse is released in
            // the buffer but must never reach the backend.
            if let Some(flag) = self.channel_binding_refused.take() {
                return Poll::Ready(RelayEvent::ChannelBindingAcrossTls(flag));
            }
            match self.to_backend.poll_send(&mut self.backend, cx) {
                Poll::Ready(Ok(moved)) => progress |= moved,
                Poll::Ready(Err(error)) => return Poll::Ready(RelayEvent::BackendFailed(error)),
                Poll::Pending => {}
            }
            match self.to_client.poll_send(&mut self.client, cx) {
                Poll::Ready(Ok(moved)) => progress |= moved,
                Poll::Ready(Err(error)) => return Poll::Ready(RelayEvent::ClientFailed(error)),
                Poll::Pending => {}
            }
            if self.close_at_idle.is_some() && self.at_idle_point() {
                return Poll::Ready(RelayEvent::IdlePoint);
            }
            if self.freeze_requested && self.at_idle_point() {
                return Poll::Ready(RelayEvent::Frozen);
            }
            match self.to_backend.poll_receive(&mut self.client, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(RelayEvent::ClientClosed),
                Poll::Ready(Ok(count)) => {
                    self.stats.add_bytes_to_backend(count);
                    if let Err(error) = self.scan_client(Instant::now()) {
                        return Poll::Ready(RelayEvent::ClientViolation(error));
                    }
                    progress = true;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(RelayEvent::ClientFailed(error)),
                Poll::Pending => {}
            }
            match self.to_client.poll_receive(&mut self.backend, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(RelayEvent::BackendClosed),
                Poll::Ready(Ok(count)) => {
                    self.stats.add_bytes_to_client(count);
                    if let Err(error) = self.scan_backend(Instant::now()) {
                        return Poll::Ready(RelayEvent::BackendViolation(error));
                    }
                    progress = true;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(RelayEvent::BackendFailed(error)),
                Poll::Pending => {}
            }
            if self.requests.logged_in() && !self.logged_in_reported {
                self.logged_in_reported = true;
                return Poll::Ready(RelayEvent::LoggedIn);
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Walks the new client bytes: request starts and ends (and, while watching the login, the
    /// SASLInitialResponse).
    fn scan_client(&mut self, now: Instant) -> Result<(), BadLength> {
        loop {
            let flow = &mut self.to_backend;
            let Some(frame) = flow.framer.next_frame(flow.buffer.pending())? else {
                return Ok(());
            };
            if frame.tag == b'p' && self.sasl_watch == SaslWatch::AwaitingInitialResponse {
                let start = flow.buffer.start;
                let flag = frame
                    .body
                    .clone()
                    .map(|range| &flow.buffer.data[start + range.start..start + range.end])
                    .and_then(|body| sasl::parse_sasl_initial_response(body).ok())
                    .and_then(|response| response.channel_binding);
                self.stop_watching_sasl();
                if let Some(flag) = flag.filter(ChannelBinding::fails_across_a_relay) {
                    self.channel_binding_refused = Some(flag);
                    // Nothing after it matters: the session ends before anything is sent.
                    return Ok(());
                }
            }
            self.client_terminated |= frame.tag == b'X';
            match frame.tag {
                b'Q' => self.unnamed_statement = UnnamedStatement::None,
                b'P' => {
                    let flow = &self.to_backend;
                    let start = flow.buffer.start;
                    match frame.body {
                        // A Parse's body starts with the statement name: empty is unnamed.
                        Some(range) if flow.buffer.data.get(start + range.start) == Some(&0) => {
                            let whole =
                                &flow.buffer.data[start + range.start - 5..start + range.end];
                            self.unnamed_statement.remember(whole);
                        }
                        Some(_) => {}
                        // Too large to be read: unknown.
                        None => self.unnamed_statement = UnnamedStatement::Unreadable,
                    }
                }
                _ => {}
            }
            self.requests.on_client_message(frame.tag, now.into_std());
        }
    }

    /// Back to the usual inspected types once the login can no longer carry channel binding.
    fn stop_watching_sasl(&mut self) {
        if self.sasl_watch != SaslWatch::Off {
            self.sasl_watch = SaslWatch::Off;
            self.to_backend.framer.set_inspected(CLIENT_INSPECTED);
            self.to_client.framer.set_inspected(BACKEND_INSPECTED);
        }
    }

    /// Walks the new backend bytes: errors, ReadyForQuery, the cancel key, COPY.
    fn scan_backend(&mut self, now: Instant) -> Result<(), BadLength> {
        loop {
            let flow = &mut self.to_client;
            let Some(frame) = flow.framer.next_frame(flow.buffer.pending())? else {
                return Ok(());
            };
            let start = flow.buffer.start;
            let body = frame
                .body
                .map(|range| start + range.start..start + range.end);
            if frame.tag == b'K'
                && let Some(range) = body.clone()
            {
                self.replace_cancel_key(range);
                continue;
            }
            if frame.tag == b'R' && self.sasl_watch == SaslWatch::AwaitingSaslRequest {
                if let Some(range) = body.clone()
                    && sasl::authentication_code(&self.to_client.buffer.data[range.clone()])
                        == Some(sasl::AUTH_SASL)
                {
                    if self.hide_plus {
                        self.hide_channel_binding(range);
                        self.stop_watching_sasl();
                    } else {
                        self.sasl_watch = SaslWatch::AwaitingInitialResponse;
                    }
                }
                continue;
            }
            if frame.tag == b'A' {
                if let (Some((from, to)), Some(range)) = (self.notification_pid, body.clone())
                    && range.len() >= 4
                {
                    let pid = &mut self.to_client.buffer.data[range.start..range.start + 4];
                    if pid == from.to_be_bytes() {
                        pid.copy_from_slice(&to.to_be_bytes());
                    }
                }
                continue;
            }
            let body_bytes = body.map(|range| &self.to_client.buffer.data[range]);
            if frame.tag == b'S' {
                if let Some((name, value)) = body_bytes.and_then(messages::parameter_status) {
                    remember_parameter(&mut self.parameters, name, value);
                }
                continue;
            }
            if frame.tag == b'E' && body_bytes.is_some_and(messages::error_is_fatal) {
                self.backend_sent_fatal = true;
            }
            match self
                .requests
                .on_backend_message(frame.tag, body_bytes, now.into_std())
            {
                BackendEvent::Nothing => {}
                BackendEvent::LoggedIn => self.stop_watching_sasl(),
                BackendEvent::LoginError(_) => self.stats.connect_failed(),
                BackendEvent::Completed(done) => {
                    self.requests_completed += 1;
                    let error = done
                        .error
                        .filter(|sqlstate| !self.cancelled_by_client(sqlstate));
                    self.stats.record_request(done.latency, error);
                    if self.to_backend.buffer.is_empty() {
                        self.to_backend.buffer.shrink_if_idle();
                    }
                    // The reply is still in the buffer: it shrinks once sent.
                    self.to_client.shrink_when_sent = true;
                }
            }
        }
    }

    /// Takes `SCRAM-SHA-256-PLUS` out of the AuthenticationSASL whose body is at `body` (whole
    /// and released, nothing after it framed yet): the message shrinks in place and the bytes
    /// after it move up.
    fn hide_channel_binding(&mut self, body: std::ops::Range<usize>) {
        let flow = &mut self.to_client;
        let Some(new_body) =
            sasl::without_mechanism(&flow.buffer.data[body.clone()], sasl::SCRAM_SHA_256_PLUS)
        else {
            return;
        };
        let removed = body.len() - new_body.len();
        let data = &mut flow.buffer.data;
        let length = (new_body.len() + 4) as u32;
        data[body.start - 4..body.start].copy_from_slice(&length.to_be_bytes());
        data[body.start..body.start + new_body.len()].copy_from_slice(&new_body);
        data.copy_within(body.end..flow.buffer.end, body.end - removed);
        flow.buffer.end -= removed;
        // The released bytes end `removed` bytes earlier, as if that many had been sent.
        flow.framer.consumed(removed);
    }

    /// Swaps the backend's cancel secret for a proxy-issued one of the same length, in place.
    /// A 57014 that answers a cancel pgshift forwarded for this session.
    fn cancelled_by_client(&mut self, sqlstate: &[u8; 5]) -> bool {
        if sqlstate != QUERY_CANCELED {
            return false;
        }
        let forwarded = self.cancels_forwarded.load(Ordering::Relaxed);
        if forwarded > self.cancels_answered {
            self.cancels_answered = forwarded;
            return true;
        }
        false
    }

    fn replace_cancel_key(&mut self, body: std::ops::Range<usize>) {
        let Some((pid, backend_secret)) =
            messages::backend_key(&self.to_client.buffer.data[body.clone()])
        else {
            return;
        };
        if let Some((old_pid, old_secret)) = self.cancel_key.take() {
            self.identity.shared.cancels.remove(old_pid, &old_secret);
        }
        let proxy_secret = self.identity.shared.cancels.register(CancelTarget {
            cancels_forwarded: self.cancels_forwarded.clone(),
            held: self.held.clone(),
            color: self.identity.color,
            backend_addr: self.identity.backend_addr,
            backend_pid: pid,
            backend_secret,
            session_id: self.identity.session_id,
        });
        self.to_client.buffer.data[body.start + 4..body.end].copy_from_slice(&proxy_secret);
        self.cancel_key = Some((pid, proxy_secret));
    }

    /// Ends a login whose SCRAM asked for channel binding across two TLS hops: the client gets
    /// 28000 naming the fixes; its SASLInitialResponse is dropped and the backend connection
    /// closed without it.
    async fn refuse_channel_binding(&mut self, flag: &ChannelBinding) {
        let color = self.identity.color;
        let why = match flag {
            ChannelBinding::Required(name) => format!(
                "the client binds its SCRAM login to pgshift's TLS certificate (channel binding {name}), which the {color} database cannot verify"
            ),
            _ => format!(
                "the client supports channel binding and says so (SCRAM flag \"y\"), which the {color} database must refuse because it offers channel binding over its own TLS connection"
            ),
        };
        let error = ClientError::fatal(
            "28000",
            format!(
                "pgshift cannot relay SCRAM channel binding: both the client connection and the {color} database connection use TLS"
            ),
        )
        .with_detail(format!(
            "pgshift relays authentication unchanged, and {why}."
        ))
        .with_hint(format!(
            "Connect with channel_binding=disable; or use plaintext on one of the two hops (the client's sslmode, or [{color}] tls = \"disable\"); or let pgshift log clients in itself with auth termination ([auth] mode = \"scram\")."
        ));
        metrics::counter!("pgshift_clients_rejected_total", "reason" => "channel_binding")
            .increment(1);
        tracing::info!(
            session = self.identity.session_id,
            %color,
            "SCRAM channel binding across two TLS hops refused (28000)"
        );
        let encoded = error.encode();
        let extra = self.to_client.framer.at_boundary().then_some(&encoded[..]);
        self.to_client.flush_then(&mut self.client, extra).await;
        let _ = self.client.shutdown().await;
        self.requests.abandon();
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, self.backend.shutdown()).await;
    }

    /// Sends the client what is released, then `error` if the stream is at a boundary, and
    /// tells the backend goodbye.
    async fn farewell(&mut self, error: ClientError) {
        let encoded = error.encode();
        let at_boundary_after_flush = self.to_client.framer.at_boundary();
        let extra = at_boundary_after_flush.then_some(&encoded[..]);
        self.to_client.flush_then(&mut self.client, extra).await;
        let _ = self.client.shutdown().await;
        self.say_goodbye_to_backend().await;
    }

    /// Forwards what the client sent in whole messages, then Terminate, then closes.
    async fn say_goodbye_to_backend(&mut self) {
        // Requests cut off by the client or by pgshift say nothing about the backend's health.
        self.requests.abandon();
        let extra = self
            .to_backend
            .framer
            .at_boundary()
            .then_some(&TERMINATE[..]);
        self.to_backend.flush_then(&mut self.backend, extra).await;
        let _ = self.backend.shutdown().await;
    }

    /// The backend is gone: give the client what it sent, then 08006 when at a boundary.
    async fn backend_lost(&mut self, error: Option<&io::Error>) {
        self.abandon_requests();
        let address = self.identity.backend_addr;
        let color = self.identity.color;
        let encoded = (!self.backend_sent_fatal).then(|| {
            let cause =
                error.map_or_else(|| "it closed the connection".to_string(), |e| e.to_string());
            ClientError::fatal(
                "08006",
                format!(
                    "pgshift lost the connection to the {color} database at {address}: {cause}"
                ),
            )
            .encode()
        });
        let extra = encoded
            .as_deref()
            .filter(|_| self.to_client.framer.at_boundary());
        self.to_client.flush_then(&mut self.client, extra).await;
        let _ = self.client.shutdown().await;
    }

    /// Requests still in flight when a connection is lost count as errors without latency.
    fn abandon_requests(&mut self) {
        for _ in 0..self.requests.abandon() {
            self.stats.record_request(None, Some(*b"08006"));
        }
    }
}

/// The client's unnamed prepared statement, as far as the relay saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UnnamedStatement {
    /// None since the last simple Query (which destroys it), or never parsed.
    #[default]
    None,
    /// The whole Parse message that made it.
    Parsed(Vec<u8>),
    /// A Parse too large for the relay to read: it cannot be carried.
    Unreadable,
}

impl UnnamedStatement {
    /// Keeps a copy of the Parse `message`, reusing the last copy's allocation.
    fn remember(&mut self, message: &[u8]) {
        if let UnnamedStatement::Parsed(copy) = self {
            copy.clear();
            copy.extend_from_slice(message);
        } else {
            *self = UnnamedStatement::Parsed(message.to_vec());
        }
    }
}

/// Records `name` = `value`; true when the value is new or changed.
fn remember_parameter(parameters: &mut Vec<(String, String)>, name: &str, value: &str) -> bool {
    match parameters.iter_mut().find(|(known, _)| known == name) {
        Some((_, known_value)) if known_value == value => false,
        Some((_, known_value)) => {
            *known_value = value.to_string();
            true
        }
        None => {
            parameters.push((name.to_string(), value.to_string()));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink like a TLS stream over a full socket: it takes the bytes, but keeps part of them
    /// queued until a flush, and its first flush cannot finish.
    #[derive(Default)]
    struct QueueingSink {
        taken: Vec<u8>,
        flush_attempts: usize,
        flushed: bool,
    }

    impl AsyncWrite for QueueingSink {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let sink = self.get_mut();
            sink.taken.extend_from_slice(buf);
            sink.flushed = false;
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let sink = self.get_mut();
            sink.flush_attempts += 1;
            if sink.flush_attempts == 1 {
                // The socket is full: the waker fires once it drains.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            sink.flushed = true;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A result larger than the buffer, read while the client was slow, grows the buffer; once
    /// the request completed and its reply is sent, the buffer is back to its initial size.
    #[test]
    fn a_buffer_grown_by_a_burst_shrinks_once_its_request_is_sent() {
        let mut flow = Flow::new(TagSet::of(b"Z"), 1 << 30);
        let mut stream = vec![b'D'];
        stream.extend(((3 * INITIAL_BUFFER + 4) as u32).to_be_bytes());
        stream.resize(1 + 4 + 3 * INITIAL_BUFFER, 7);
        stream.extend([b'Z', 0, 0, 0, 5, b'I']);
        // Read in whole while nothing was sent: the buffer grew.
        let mut read = 0;
        while read < stream.len() {
            let spare = flow.buffer.spare().expect("room");
            let count = spare.len().min(stream.len() - read);
            spare[..count].copy_from_slice(&stream[read..read + count]);
            flow.buffer.filled(count);
            read += count;
        }
        while let Ok(Some(_)) = flow.framer.next_frame(flow.buffer.pending()) {}
        assert!(flow.buffer.data.len() > INITIAL_BUFFER);
        flow.shrink_when_sent = true;
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut sink = Vec::new();
        while let Poll::Ready(Ok(true)) = flow.poll_send(&mut sink, &mut cx) {}
        assert_eq!(sink, stream);
        assert!(flow.buffer.is_empty());
        assert_eq!(flow.buffer.data.len(), INITIAL_BUFFER);
        assert!(!flow.shrink_when_sent);
    }

    #[test]
    fn a_flush_left_pending_is_retried_after_the_buffer_emptied() {
        let mut flow = Flow::new(TagSet::default(), 1 << 20);
        flow.buffer.extend(&[b'Z', 0, 0, 0, 5, b'I']);
        while let Ok(Some(_)) = flow.framer.next_frame(flow.buffer.pending()) {}
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut sink = QueueingSink::default();
        assert!(matches!(
            flow.poll_send(&mut sink, &mut cx),
            Poll::Ready(Ok(true))
        ));
        assert!(flow.buffer.is_empty());
        assert!(!sink.flushed, "the first flush could not finish");
        // Woken once the socket drains: nothing is left to write, but the flush is retried so
        // the queued records go out.
        assert!(matches!(
            flow.poll_send(&mut sink, &mut cx),
            Poll::Ready(Ok(false))
        ));
        assert!(sink.flushed);
        assert_eq!(sink.taken, [b'Z', 0, 0, 0, 5, b'I']);
        // And not again while nothing new was written.
        assert!(matches!(
            flow.poll_send(&mut sink, &mut cx),
            Poll::Ready(Ok(false))
        ));
        assert_eq!(sink.flush_attempts, 2);
    }
}
