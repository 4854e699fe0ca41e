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

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::Shared;
use super::cancel::CancelTarget;
use super::registry::{CloseOrder, CloseReason};
use super::requests::{BackendEvent, RequestTracker};
use crate::color::Color;
use crate::protocol::framing::{BadLength, Framer, TagSet};
use crate::protocol::messages::{self, ClientError, TERMINATE};
use crate::stats::ColorStats;

/// A direction's buffer starts this large and grows, while its reader is behind, up to
/// [`MAX_BUFFER`].
const INITIAL_BUFFER: usize = 4 * 1024;
/// The most a direction buffers before it stops reading its source.
pub const MAX_BUFFER: usize = 256 * 1024;
/// How long pgshift waits to hand a client its last bytes and error before closing anyway.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// Backend messages the relay reads: errors, ReadyForQuery, the cancel key, COPY starts.
const BACKEND_INSPECTED: TagSet = TagSet::of(b"EZKGHW");

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
}

impl Flow {
    fn new(inspected: TagSet, max_message_size: usize) -> Flow {
        Flow {
            buffer: IoBuffer::new(),
            framer: Framer::new(inspected, max_message_size),
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
            return Poll::Ready(Ok(false));
        }
        let written =
            ready!(Pin::new(&mut *sink).poll_write(cx, &self.buffer.pending()[..released]))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.buffer.consume(written);
        self.framer.consumed(written);
        if self.buffer.is_empty() {
            // A no-op for TCP; TLS streams need it to push their last record out.
            let _ = Pin::new(&mut *sink).poll_flush(cx)?;
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
            sink.flush().await
        };
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, farewell).await;
    }
}

/// Something the relay's poll loop cannot handle alone.
#[derive(Debug)]
enum RelayEvent {
    LoggedIn,
    IdlePoint,
    ClientClosed,
    BackendClosed,
    ClientFailed(io::Error),
    BackendFailed(io::Error),
    ClientViolation(BadLength),
    BackendViolation(BadLength),
}

/// How and why a session ended, for its log line.
#[derive(Debug)]
pub enum SessionEnd {
    ClientClosed,
    BackendClosed { fatal_from_backend: bool },
    ClosedAtIdlePoint(CloseReason),
    ClosedAtDeadline(CloseReason),
    LoginTimeout,
    ClientError(io::Error),
    BackendError(io::Error),
    ClientProtocolViolation(BadLength),
    BackendProtocolViolation(BadLength),
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
    logged_in_reported: bool,
    backend_sent_fatal: bool,
    /// The client sent Terminate: the backend closing next is the expected end, not a loss.
    client_terminated: bool,
    pub requests_completed: u64,
}

impl<'a, C, B> Relay<'a, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    /// A relay whose buffers already hold what was read during connection setup.
    pub fn new(
        identity: SessionIdentity<'a>,
        client: C,
        backend: B,
        client_bytes: &[u8],
        backend_bytes: &[u8],
        max_message_size: usize,
    ) -> Result<Relay<'a, C, B>, SessionEnd> {
        let stats = identity.shared.stats.color(identity.color);
        let mut relay = Relay {
            identity,
            stats,
            client,
            backend,
            to_backend: Flow::new(TagSet::default(), max_message_size),
            to_client: Flow::new(BACKEND_INSPECTED, max_message_size),
            requests: RequestTracker::new(),
            close_at_idle: None,
            cancel_key: None,
            logged_in_reported: false,
            backend_sent_fatal: false,
            client_terminated: false,
            requests_completed: 0,
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

    /// Runs until the session ends; `login_deadline` bounds the time until the first
    /// ReadyForQuery.
    pub async fn run(
        &mut self,
        orders: &mut watch::Receiver<CloseOrder>,
        login_deadline: Instant,
    ) -> SessionEnd {
        let login_timer = tokio::time::sleep_until(login_deadline);
        tokio::pin!(login_timer);
        let mut orders_open = true;
        loop {
            let order = *orders.borrow_and_update();
            match order {
                CloseOrder::Run => {}
                CloseOrder::AtIdle(reason) => self.close_at_idle = Some(reason),
                CloseOrder::Now(reason) => {
                    self.farewell(ClientError::fatal("57P01", reason.message(true)))
                        .await;
                    return SessionEnd::ClosedAtDeadline(reason);
                }
            }
            let logged_in = self.requests.logged_in();
            let event = tokio::select! {
                changed = orders.changed(), if orders_open => {
                    orders_open = changed.is_ok();
                    continue;
                }
                _ = &mut login_timer, if !logged_in => {
                    self.farewell(ClientError::fatal(
                        "08006",
                        "pgshift: login not finished within login_timeout",
                    ))
                    .await;
                    return SessionEnd::LoginTimeout;
                }
                event = poll_fn(|cx| self.poll_relay(cx)) => event,
            };
            match event {
                RelayEvent::LoggedIn => continue,
                RelayEvent::IdlePoint => {
                    let reason = self.close_at_idle.unwrap_or(CloseReason::Shutdown);
                    self.farewell(ClientError::fatal("57P01", reason.message(false)))
                        .await;
                    return SessionEnd::ClosedAtIdlePoint(reason);
                }
                RelayEvent::ClientClosed => {
                    self.say_goodbye_to_backend().await;
                    return SessionEnd::ClientClosed;
                }
                RelayEvent::ClientFailed(error) => {
                    self.say_goodbye_to_backend().await;
                    return SessionEnd::ClientError(error);
                }
                RelayEvent::ClientViolation(error) => {
                    self.farewell(ClientError::fatal("08P01", format!("pgshift: {error}")))
                        .await;
                    return SessionEnd::ClientProtocolViolation(error);
                }
                RelayEvent::BackendClosed | RelayEvent::BackendFailed(_)
                    if self.client_terminated =>
                {
                    self.to_client.flush_then(&mut self.client, None).await;
                    let _ = self.client.shutdown().await;
                    return SessionEnd::ClientClosed;
                }
                RelayEvent::BackendClosed => {
                    self.backend_lost(None).await;
                    return SessionEnd::BackendClosed {
                        fatal_from_backend: self.backend_sent_fatal,
                    };
                }
                RelayEvent::BackendFailed(error) => {
                    self.backend_lost(Some(&error)).await;
                    return SessionEnd::BackendError(error);
                }
                RelayEvent::BackendViolation(error) => {
                    self.backend_lost(None).await;
                    return SessionEnd::BackendProtocolViolation(error);
                }
            }
        }
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

    /// Walks the new client bytes: request starts and ends.
    fn scan_client(&mut self, now: Instant) -> Result<(), BadLength> {
        let flow = &mut self.to_backend;
        while let Some(frame) = flow.framer.next_frame(flow.buffer.pending())? {
            self.client_terminated |= frame.tag == b'X';
            self.requests.on_client_message(frame.tag, now.into_std());
        }
        Ok(())
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
            let body_bytes = body.map(|range| &self.to_client.buffer.data[range]);
            if frame.tag == b'E' && body_bytes.is_some_and(messages::error_is_fatal) {
                self.backend_sent_fatal = true;
            }
            match self
                .requests
                .on_backend_message(frame.tag, body_bytes, now.into_std())
            {
                BackendEvent::Nothing | BackendEvent::LoggedIn => {}
                BackendEvent::LoginError(_) => self.stats.connect_failed(),
                BackendEvent::Completed(done) => {
                    self.requests_completed += 1;
                    self.stats.record_request(done.latency, done.error);
                    if self.to_backend.buffer.is_empty() {
                        self.to_backend.buffer.shrink_if_idle();
                    }
                }
            }
        }
    }

    /// Swaps the backend's cancel secret for a proxy-issued one of the same length, in place.
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
            color: self.identity.color,
            backend_addr: self.identity.backend_addr,
            backend_pid: pid,
            backend_secret,
            session_id: self.identity.session_id,
        });
        self.to_client.buffer.data[body.start + 4..body.end].copy_from_slice(&proxy_secret);
        self.cancel_key = Some((pid, proxy_secret));
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
