//! The admin socket server: operators' command lines in, the controller's answers out.
//!
//! [`AdminServer::start`] binds the Unix socket (see [`super::socket_file`] for how the file is
//! made safely) and accepts peers: each is checked against `[admin] allowed_uids` (SO_PEERCRED)
//! and `[admin] max_connections`, then served one command per line, one JSON reply per line
//! ([`super::wire`]), for as long as it stays connected. Lines are parsed here
//! ([`super::command::parse_command`]); only valid commands reach the controller, tagged with
//! the peer's uid. [`AdminServer::shutdown`] stops accepting, lets commands in progress answer,
//! and removes the socket file.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::command::parse_command;
use super::socket_file::{self, SocketFile};
use super::wire::{Frame, LineFramer, encode_error, encode_reply, too_long_message};
use crate::config::AdminConfig;
use crate::controller::{Actor, ControllerHandle};
use crate::log_limit::{SUMMARY_INTERVAL, Throttled};

/// Bytes read from a peer at a time (a bound on what one read can queue up for answering).
const READ_CHUNK_BYTES: usize = 4096;

/// On shutdown, how long commands already sent to the controller may take to answer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// A running admin socket.
#[derive(Debug)]
pub struct AdminServer {
    socket_file: SocketFile,
    stop: watch::Sender<bool>,
    accept_task: Option<JoinHandle<()>>,
    socket_removed: bool,
}

impl AdminServer {
    /// Binds `config.socket` (already resolved against the config file's directory) and starts
    /// serving; errors name the path and the reason.
    pub async fn start(
        config: &AdminConfig,
        controller: ControllerHandle,
    ) -> anyhow::Result<AdminServer> {
        let (listener, socket_file) = socket_file::bind(config).await?;
        let (stop, stop_requested) = watch::channel(false);
        let accept_loop = AcceptLoop {
            listener,
            controller,
            connection_slots: Arc::new(Semaphore::new(config.max_connections)),
            max_connections: config.max_connections,
            allowed_uids: config.allowed_uids.clone(),
            refusals: Throttled::new(SUMMARY_INTERVAL, log_refusals),
            stop_requested,
        };
        let accept_task = tokio::spawn(accept_loop.run());
        tracing::info!(
            path = %socket_file.path().display(),
            mode = format_args!("{:04o}", config.socket_mode),
            "admin socket listening"
        );
        Ok(AdminServer {
            socket_file,
            stop,
            accept_task: Some(accept_task),
            socket_removed: false,
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        self.socket_file.path()
    }

    /// Stops accepting, removes the socket file, ends idle connections, and waits (up to a few
    /// seconds) for commands in progress to be answered.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        self.socket_file.remove();
        self.socket_removed = true;
        if let Some(accept_task) = self.accept_task.take()
            && let Err(error) = accept_task.await
        {
            tracing::warn!(%error, "the admin socket's accept task failed");
        }
    }
}

impl Drop for AdminServer {
    /// Without [`AdminServer::shutdown`]: stop accepting and remove the socket file anyway.
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if !self.socket_removed {
            self.socket_file.remove();
        }
    }
}

/// Accepts peers until asked to stop.
struct AcceptLoop {
    listener: UnixListener,
    controller: ControllerHandle,
    connection_slots: Arc<Semaphore>,
    max_connections: usize,
    allowed_uids: Option<Vec<u32>>,
    /// Which refusals are logged in full and which only counted.
    refusals: Throttled<Refusal>,
    stop_requested: watch::Receiver<bool>,
}

/// A kind of refused peer: the key of the refusal log's limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Refusal {
    /// Its uid is not in `[admin] allowed_uids`.
    UidNotAllowed(u32),
    /// SO_PEERCRED failed while `[admin] allowed_uids` is set.
    UidUnknown,
    /// `[admin] max_connections` peers were served already.
    TooMany { uid: Option<u32> },
}

/// The summary line of the refusals of one kind that were counted, not logged.
fn log_refusals(refusal: &Refusal, count: u64, interval: Duration) {
    let interval = humantime::format_duration(interval);
    match *refusal {
        Refusal::UidNotAllowed(uid) => tracing::warn!(
            uid,
            refused = count,
            "admin socket: refused {count} more admin connections from uid {uid} in the last {interval} (not in [admin] allowed_uids)"
        ),
        Refusal::UidUnknown => tracing::warn!(
            refused = count,
            "admin socket: refused {count} more admin connections whose uid is unknown (SO_PEERCRED failed) in the last {interval}"
        ),
        Refusal::TooMany { uid: Some(uid) } => tracing::warn!(
            uid,
            refused = count,
            "admin socket: refused {count} more admin connections from uid {uid} in the last {interval}: too many admin connections"
        ),
        Refusal::TooMany { uid: None } => tracing::warn!(
            refused = count,
            "admin socket: refused {count} more admin connections of an unknown uid in the last {interval}: too many admin connections"
        ),
    }
}

impl AcceptLoop {
    async fn run(mut self) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = self.stop_requested.changed() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => self.admit(stream, &mut connections),
                    Err(error) => {
                        tracing::warn!(%error, "admin socket: accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                },
            }
        }
        drop(self.listener);
        let finished = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                connections = connections.len(),
                "admin socket: commands still running at shutdown were abandoned"
            );
            connections.shutdown().await;
        }
    }

    /// Checks a new peer's uid and the connection limit, then serves it on its own task.
    fn admit(&self, stream: UnixStream, connections: &mut JoinSet<()>) {
        let uid = stream.peer_cred().ok().map(|credentials| credentials.uid());
        if let Some(allowed_uids) = &self.allowed_uids {
            match uid {
                Some(uid) if allowed_uids.contains(&uid) => {}
                Some(uid) => {
                    if self.refusals.note(Refusal::UidNotAllowed(uid)) {
                        tracing::warn!(
                            uid,
                            "admin socket: refused a peer whose uid is not in [admin] allowed_uids"
                        );
                    }
                    refuse(stream, &format!("uid {uid} is not allowed on this socket"));
                    return;
                }
                None => {
                    if self.refusals.note(Refusal::UidUnknown) {
                        tracing::warn!(
                            "admin socket: refused a peer whose uid is unknown (SO_PEERCRED failed)"
                        );
                    }
                    refuse(
                        stream,
                        "the peer's uid cannot be determined, and [admin] allowed_uids is set",
                    );
                    return;
                }
            }
        }
        let Ok(slot) = Arc::clone(&self.connection_slots).try_acquire_owned() else {
            if self.refusals.note(Refusal::TooMany { uid }) {
                tracing::warn!(
                    max_connections = self.max_connections,
                    "admin socket: refused a peer: too many admin connections"
                );
            }
            refuse(
                stream,
                &format!("too many admin connections (max {})", self.max_connections),
            );
            return;
        };
        let connection = Connection {
            actor: Actor::AdminSocket { uid },
            controller: self.controller.clone(),
            stop_requested: self.stop_requested.clone(),
            _slot: slot,
        };
        connections.spawn(connection.serve(stream));
    }
}

/// Sends one refusal line without waiting (a new socket's send buffer has room) and closes.
fn refuse(stream: UnixStream, error: &str) {
    let reply = encode_error(error);
    match stream.into_std() {
        Ok(mut stream) => {
            if let Err(error) = stream.write_all(reply.as_bytes()) {
                tracing::debug!(%error, "admin socket: cannot send a refusal");
            }
        }
        Err(error) => tracing::debug!(%error, "admin socket: cannot send a refusal"),
    }
}

/// One accepted peer.
struct Connection {
    actor: Actor,
    controller: ControllerHandle,
    stop_requested: watch::Receiver<bool>,
    /// Held for the connection's lifetime: one of `max_connections`.
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    /// Answers each line in order until the peer closes, an I/O error, or shutdown. At most one
    /// read's worth of lines waits to be answered; while a reply cannot be written, nothing more
    /// is read.
    async fn serve(mut self, mut stream: UnixStream) {
        let (mut reader, mut writer) = stream.split();
        let mut framer = LineFramer::new();
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        loop {
            let read = tokio::select! {
                read = reader.read(&mut chunk) => read,
                _ = self.stop_requested.changed() => return,
            };
            let (frames, peer_closed) = match read {
                Ok(0) => (framer.finish().into_iter().collect(), true),
                Ok(length) => (framer.push(&chunk[..length]), false),
                Err(error) => {
                    tracing::debug!(%error, "admin socket: read failed");
                    return;
                }
            };
            for frame in frames {
                let reply = self.answer(frame).await;
                if let Err(error) = writer.write_all(reply.as_bytes()).await {
                    tracing::debug!(%error, "admin socket: write failed");
                    return;
                }
            }
            if peer_closed {
                return;
            }
        }
    }

    async fn answer(&self, frame: Frame) -> String {
        let line = match frame {
            Frame::Line(line) => line,
            Frame::TooLong => return encode_error(too_long_message()),
            Frame::NotUtf8 => return encode_error("command is not valid UTF-8"),
        };
        match parse_command(&line) {
            Ok(command) => {
                tracing::debug!(actor = %self.actor, command = command.verb(), "admin command");
                encode_reply(&self.controller.execute(command, self.actor.clone()).await)
            }
            Err(error) => {
                tracing::debug!(actor = %self.actor, %error, "admin command refused");
                encode_error(error)
            }
        }
    }
}
