//! A fault-injecting TCP relay for the chaos tests: it sits between pgshift and a real
//! Postgres (the config's `[blue]` or `[green]` port points at it) and relays bytes untouched
//! until a test arms a [`Fault`]. This is the one place a fake is allowed (DESIGN.md): a real
//! server cannot be made to reset a connection mid-DataRow or accept and then never answer.
//!
//! Faults act on the backend → pgshift direction, where pgshift must cope with what it reads:
//!
//! - [`Fault::BlackHole`]: new connections are accepted (the TCP handshake completes) and never
//!   answered; connections already relayed go on.
//! - [`Fault::ResetAfter`]: on every open connection, after `n` more bytes toward pgshift, the
//!   pgshift-facing socket is closed with a RST (SO_LINGER 0) and the backend's is closed.
//! - [`Fault::HalfCloseAfter`]: after `n` more bytes toward pgshift, its socket's write half is
//!   shut (pgshift reads EOF) while its read half and the backend connection stay open.
//! - [`Fault::Inject`]: these bytes are sent to pgshift at once, as if the backend sent them.
//!
//! A fault applies to the connections open when it is armed and to later ones, until
//! [`FaultRelay::set`] arms another ([`Fault::Pass`] relays normally again). Everything the
//! relay runs is aborted when it is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the relay does to the bytes it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Pass,
    BlackHole,
    ResetAfter(usize),
    HalfCloseAfter(usize),
    Inject(Vec<u8>),
}

/// A running relay on 127.0.0.1.
pub struct FaultRelay {
    pub port: u16,
    fault: watch::Sender<(u64, Fault)>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FaultRelay {
    /// Listens on a free port and relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> FaultRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let (fault, watcher) = watch::channel((0, Fault::Pass));
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept(listener, target, watcher, accepted.clone()));
        FaultRelay {
            port,
            fault,
            accepted,
            task,
        }
    }

    /// Arms `fault` (replacing the one in force).
    pub fn set(&self, fault: Fault) {
        self.fault.send_modify(|(generation, current)| {
            *generation += 1;
            *current = fault;
        });
    }

    /// Connections accepted so far (black-holed ones included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every connection's task.
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    watcher: watch::Receiver<(u64, Fault)>,
    accepted: Arc<AtomicUsize>,
) {
    let mut connections = JoinSet::new();
    let mut black_holed = Vec::new();
    loop {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            incoming = listener.accept() => {
                let Ok((stream, _)) = incoming else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                if watcher.borrow().1 == Fault::BlackHole {
                    // Held open, never read, never answered.
                    black_holed.push(stream);
                    continue;
                }
                connections.spawn(relay(stream, target, watcher.clone()));
            }
        }
    }
}

/// Relays one connection until either side closes or a fault ends it.
async fn relay(proxy_side: TcpStream, target: SocketAddr, watcher: watch::Receiver<(u64, Fault)>) {
    let Ok(Ok(backend)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await
    else {
        return;
    };
    let _ = proxy_side.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    let (from_proxy, to_proxy) = proxy_side.into_split();
    let (from_backend, to_backend) = backend.into_split();
    let upstream = tokio::spawn(pump_upstream(from_proxy, to_backend));
    // When the relay is dropped this task is aborted; the upstream pump goes with it.
    let _abort_upstream = AbortOnDrop(upstream.abort_handle());
    downstream(from_backend, to_proxy, upstream, watcher).await;
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// pgshift → backend, untouched; the backend's write half is shut when pgshift's side ends.
async fn pump_upstream(mut from_proxy: OwnedReadHalf, mut to_backend: OwnedWriteHalf) {
    let _ = tokio::io::copy(&mut from_proxy, &mut to_backend).await;
    let _ = to_backend.shutdown().await;
}

/// What a fault asks of a connection, counted from when the connection saw it armed.
enum Armed {
    Nothing,
    Reset { remaining: usize },
    HalfClose { remaining: usize },
}

/// backend → pgshift, where the faults act.
async fn downstream(
    mut from_backend: OwnedReadHalf,
    mut to_proxy: OwnedWriteHalf,
    upstream: JoinHandle<()>,
    mut watcher: watch::Receiver<(u64, Fault)>,
) {
    let fault = watcher.borrow_and_update().1.clone();
    let mut armed = arm(&mut to_proxy, &fault).await;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match armed {
            Armed::Reset { remaining: 0 } => {
                reset(to_proxy, upstream).await;
                return;
            }
            Armed::HalfClose { remaining: 0 } => {
                half_close(from_backend, to_proxy, upstream).await;
                return;
            }
            _ => {}
        }
        let read = tokio::select! {
            changed = watcher.changed() => {
                if changed.is_err() {
                    return;
                }
                let fault = watcher.borrow_and_update().1.clone();
                armed = arm(&mut to_proxy, &fault).await;
                continue;
            }
            read = from_backend.read(&mut buffer) => read,
        };
        let count = match read {
            Ok(0) | Err(_) => {
                let _ = to_proxy.shutdown().await;
                let _ = upstream.await;
                return;
            }
            Ok(count) => count,
        };
        let forward = match &mut armed {
            Armed::Nothing => count,
            Armed::Reset { remaining } | Armed::HalfClose { remaining } => {
                let forward = count.min(*remaining);
                *remaining -= forward;
                forward
            }
        };
        if to_proxy.write_all(&buffer[..forward]).await.is_err() {
            upstream.abort();
            return;
        }
    }
}

/// Reads a newly armed fault; [`Fault::Inject`] acts at once.
async fn arm(to_proxy: &mut OwnedWriteHalf, fault: &Fault) -> Armed {
    match fault {
        Fault::Pass | Fault::BlackHole => Armed::Nothing,
        Fault::ResetAfter(bytes) => Armed::Reset { remaining: *bytes },
        Fault::HalfCloseAfter(bytes) => Armed::HalfClose { remaining: *bytes },
        Fault::Inject(bytes) => {
            let _ = to_proxy.write_all(bytes).await;
            Armed::Nothing
        }
    }
}

/// Closes the pgshift-facing socket with a RST, and the backend's with a FIN.
async fn reset(to_proxy: OwnedWriteHalf, upstream: JoinHandle<()>) {
    let _ = socket2::SockRef::from(to_proxy.as_ref()).set_linger(Some(Duration::ZERO));
    // No FIN first: the socket closes (with the RST) once the upstream task drops the read half.
    to_proxy.forget();
    upstream.abort();
    let _ = upstream.await;
}

/// Shuts the write half toward pgshift; keeps reading (and dropping) what the backend sends,
/// and keeps relaying pgshift → backend, until both sides are done.
async fn half_close(
    mut from_backend: OwnedReadHalf,
    mut to_proxy: OwnedWriteHalf,
    upstream: JoinHandle<()>,
) {
    let _ = to_proxy.shutdown().await;
    let mut sink = vec![0u8; 16 * 1024];
    while let Ok(count) = from_backend.read(&mut sink).await {
        if count == 0 {
            break;
        }
    }
    let _ = upstream.await;
    drop(to_proxy);
}
