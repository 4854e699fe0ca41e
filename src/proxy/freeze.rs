//! One session frozen by a transparent cutover, from its idle point to its resumption.
//!
//! The relay stopped at an idle point (nothing forwarded since, the client's next request not
//! read). Here the session reads its state from its own backend
//! ([`crate::cutover::session_state`]) — it must hold nothing a new backend could not be given,
//! and carry a ClientKey to log in with — logs in to the new color with its original startup
//! packet, replays its settings and role there, reports, and waits for the cutover's verdict:
//! `Commit` moves it (or closes it with 57P01 when it cannot move), `Abort` resumes it where
//! it was, having lost nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use super::Shared;
use super::backend::{self, LoginSecret};
use super::cutover::{CutoverPhase, FreezeReport, Unmovable};
use super::registry::{CloseOrder, SessionTicket};
use super::relay::{Relay, SessionEnd, UnnamedStatement};
use crate::auth::keys::Credential;
use crate::auth::verifiers::{RoleSecret, Sources};
use crate::color::Color;
use crate::config::Config;
use crate::cutover::session_state;
use crate::protocol::messages::{ClientError, TERMINATE};
use crate::tls::{BackendStream, ClientStream};

/// How long a cancelled held request may take to arrive whole from the client.
const HELD_REQUEST_WAIT: Duration = Duration::from_millis(200);

/// What the frozen session needs to log in again elsewhere.
pub struct SessionOrigin<'a> {
    pub startup_packet: &'a [u8],
    pub user: &'a str,
    /// The user's credential (auth termination); `None` for a session that logged in through
    /// passthrough.
    pub credential: Option<Credential>,
    /// A backend logged in ahead of the freeze, if the prepare step made one.
    pub ahead: AheadSlot,
}

/// A backend on the new color, logged in and waiting for the session.
struct Prepared {
    color: Color,
    connection: backend::BackendConnection,
}

/// Holds the frozen session until the cutover decides. `None`: it runs on (moved or
/// resumed); `Some(end)`: it ended.
pub async fn hold(
    shared: &Shared,
    config: &Config,
    relay: &mut Relay<'_, ClientStream, BackendStream>,
    ticket: &mut SessionTicket,
    phase: &mut watch::Receiver<CutoverPhase>,
    origin: SessionOrigin<'_>,
) -> Option<SessionEnd> {
    let current = phase.borrow_and_update().clone();
    let CutoverPhase::Holding { to, reports } = current else {
        return None;
    };
    let held = relay.held();
    let (movable, prepared) = match prepare(shared, config, relay, to, &origin).await {
        Ok(prepared) => (Ok(()), Some(prepared)),
        Err(unmovable) => (Err(unmovable), None),
    };
    let _ = reports.send(FreezeReport {
        session_id: ticket.id,
        movable: movable.clone(),
    });
    loop {
        let verdict = phase.borrow_and_update().clone();
        match verdict {
            CutoverPhase::Holding { .. } => {}
            CutoverPhase::Commit { to } => {
                return match (prepared, movable) {
                    (Some(prepared), Ok(())) if prepared.color == to => {
                        move_to(relay, prepared).await
                    }
                    (prepared, movable) => {
                        discard(prepared).await;
                        let reason = movable
                            .err()
                            .map_or_else(|| "its new backend is on another color".into(), |u| u.0);
                        close_unmovable(relay, to, reason).await
                    }
                };
            }
            // A new cutover preparing means this one ended: resume.
            CutoverPhase::Abort | CutoverPhase::Idle | CutoverPhase::Preparing { .. } => {
                discard(prepared).await;
                return None;
            }
        }
        tokio::select! {
            _ = held.rung() => {
                match relay.cancel_held_request(HELD_REQUEST_WAIT).await {
                    Ok(cancelled) => tracing::debug!(session = ticket.id, cancelled, "cancel while frozen"),
                    Err(error) => {
                        discard(prepared).await;
                        relay.close(ClientError::fatal("08006", format!("pgshift: the client connection failed: {error}"))).await;
                        return Some(SessionEnd::ClientError(error));
                    }
                }
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    // The orchestrator is gone: resume where the session was.
                    discard(prepared).await;
                    return None;
                }
            }
            changed = ticket.orders.changed() => {
                let order = *ticket.orders.borrow_and_update();
                if changed.is_err() {
                    continue;
                }
                if let CloseOrder::Now(reason) = order {
                    discard(prepared).await;
                    relay.close(ClientError::fatal("57P01", reason.message(true))).await;
                    return Some(SessionEnd::ClosedAtDeadline(reason));
                }
            }
        }
    }
}

/// Asks the session's backend about its state and logs in to `to`.
async fn prepare(
    shared: &Shared,
    config: &Config,
    relay: &mut Relay<'_, ClientStream, BackendStream>,
    to: Color,
    origin: &SessionOrigin<'_>,
) -> Result<Prepared, Unmovable> {
    let Some(credential) = origin.credential.clone() else {
        return Err(Unmovable(
            "it logged in without auth termination, so pgshift holds no key to log it in again"
                .into(),
        ));
    };
    let mut for_client = BytesMut::new();
    let state = session_state::read(
        relay.backend_mut(),
        &config.cutover.carry_gucs,
        origin.user,
        &mut for_client,
    )
    .await;
    relay.forward_to_client(&for_client);
    let mut state = state?;
    state.unnamed_parse = match relay.unnamed_statement() {
        UnnamedStatement::None => None,
        UnnamedStatement::Parsed(parse) => Some(parse.clone()),
        UnnamedStatement::Unreadable => {
            return Err(Unmovable(
                "its unnamed prepared statement was parsed from a message too large for pgshift to read, so it cannot be parsed again"
                    .into(),
            ));
        }
    };
    // A backend logged in ahead of the freeze, or one logged in now.
    let connection = match origin.ahead.take(to) {
        Some(connection) => connection,
        None => {
            log_in_to(
                shared,
                config,
                to,
                origin.startup_packet,
                origin.user,
                &credential,
            )
            .await?
        }
    };
    let mut prepared = Prepared {
        color: to,
        connection,
    };
    let mut reported = BytesMut::new();
    if let Err(unmovable) =
        session_state::replay(&mut prepared.connection.stream, &state, &mut reported).await
    {
        discard(prepared).await;
        return Err(unmovable);
    }
    // What the replay made the new backend report joins its greeting: the client is told
    // about the values that differ from what it knows.
    prepared.connection.first_bytes.extend_from_slice(&reported);
    Ok(prepared)
}

/// Logs in to `to` as `user` with the session's startup packet and credential.
async fn log_in_to(
    shared: &Shared,
    config: &Config,
    to: Color,
    startup_packet: &[u8],
    user: &str,
    credential: &Credential,
) -> Result<backend::BackendConnection, Unmovable> {
    let sources = Sources {
        config,
        tls: &shared.tls,
    };
    let secret = shared
        .auth
        .verifiers
        .lookup(sources, to, user)
        .await
        .map_err(|error| Unmovable(format!("its login secret on {to}: {}", error.reason)))?;
    let login_secret = match (credential, &secret) {
        (Credential::ScramClientKey(client_key), RoleSecret::Scram(verifier)) => {
            LoginSecret::Scram {
                client_key,
                verifier,
            }
        }
        (Credential::Md5Hash(hash), RoleSecret::Md5(_)) => LoginSecret::Md5 { hash },
        (_, other) => {
            return Err(Unmovable(format!(
                "{to} stores a different kind of secret for {user} ({})",
                other.describe()
            )));
        }
    };
    backend::login(
        to,
        config.backend(to),
        &config.listen,
        startup_packet,
        login_secret,
        shared.tls.backend(to),
    )
    .await
    .map(|logged_in| logged_in.connection)
    .map_err(|error| Unmovable(format!("cannot log in to {to}: {error}")))
}

/// A backend on the new color logged in ahead of the freeze (the cutover's prepare step), so
/// the freeze does not pay for the fork and the login. Filled by [`log_in_ahead`], taken by
/// the frozen session; one left over when the cutover ends otherwise is logged out.
#[derive(Clone, Default)]
pub struct AheadSlot(Arc<Mutex<Option<(Color, backend::BackendConnection)>>>);

impl AheadSlot {
    /// The backend logged in ahead for `to`, if there is one.
    fn take(&self, to: Color) -> Option<backend::BackendConnection> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match slot.take() {
            Some((color, connection)) if color == to => Some(connection),
            Some(other) => {
                // For another color: not this cutover's; dropped (the socket closes).
                drop(other);
                None
            }
            None => None,
        }
    }

    fn put(&self, color: Color, connection: backend::BackendConnection) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((color, connection));
    }
}

/// What a session hands to the task that logs it in ahead.
pub struct AheadRequest {
    pub shared: Arc<Shared>,
    pub config: Arc<Config>,
    pub startup_packet: bytes::Bytes,
    pub user: String,
    pub credential: Option<Credential>,
    pub to: Color,
    pub slot: AheadSlot,
    /// Told when the login is done (or failed), for the cutover's prepare step.
    pub done: mpsc::UnboundedSender<u64>,
    pub session_id: u64,
    pub phase: watch::Receiver<CutoverPhase>,
}

/// Logs the session in to the new color while it still runs on the old one, then keeps the
/// backend for the freeze; when the cutover ends without taking it, logs it out.
pub async fn log_in_ahead(mut request: AheadRequest) {
    if let Some(credential) = &request.credential
        && let Ok(connection) = log_in_to(
            &request.shared,
            &request.config,
            request.to,
            &request.startup_packet,
            &request.user,
            credential,
        )
        .await
    {
        request.slot.put(request.to, connection);
    }
    let _ = request.done.send(request.session_id);
    loop {
        let phase = request.phase.borrow_and_update().clone();
        if matches!(phase, CutoverPhase::Idle | CutoverPhase::Abort) {
            if let Some(connection) = request.slot.take(request.to) {
                discard(Prepared {
                    color: request.to,
                    connection,
                })
                .await;
            }
            return;
        }
        if request.phase.changed().await.is_err() {
            return;
        }
    }
}

/// Swaps the relay onto the prepared backend; the old one is told goodbye.
async fn move_to(
    relay: &mut Relay<'_, ClientStream, BackendStream>,
    prepared: Prepared,
) -> Option<SessionEnd> {
    let from = relay.color();
    let connection = prepared.connection;
    match relay.rehome(
        prepared.color,
        connection.stream,
        connection.addr,
        &connection.first_bytes,
    ) {
        Ok(mut old) => {
            let _ = old.write_all(&TERMINATE).await;
            let _ = old.shutdown().await;
            let stats = &relay.shared().stats;
            stats.color(from).session_closed();
            stats.color(prepared.color).session_opened();
            None
        }
        Err(reason) => close_unmovable(relay, prepared.color, reason).await,
    }
}

async fn close_unmovable(
    relay: &mut Relay<'_, ClientStream, BackendStream>,
    to: Color,
    reason: String,
) -> Option<SessionEnd> {
    let error = ClientError::fatal(
        "57P01",
        format!(
            "terminating connection: pgshift moved the sessions to the {to} database and this one could not follow: {reason}"
        ),
    )
    .with_hint("Reconnect: new sessions go to the new database.");
    relay.close(error).await;
    Some(SessionEnd::Unmovable(reason))
}

/// Logs out of a prepared backend that will not be used (if there is one).
async fn discard(prepared: impl Into<Option<Prepared>>) {
    let Some(prepared) = prepared.into() else {
        return;
    };
    let mut stream = prepared.connection.stream;
    let _ = stream.write_all(&TERMINATE).await;
    let _ = stream.shutdown().await;
}
