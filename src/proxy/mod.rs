//! The proxy: the listener, the shared state every session reads, and graceful shutdown.
//!
//! [`Proxy::start`] binds the listen address and spawns the accept loop; each accepted client
//! gets its own task ([`session::serve_client`]). [`Proxy::shutdown`] is the one shutdown
//! mechanism: new clients are refused with 57P03, idle sessions close at once with 57P01,
//! busy ones at their next idle point, and whatever is left at `shutdown_timeout` is ended.

pub mod backend;
pub mod cancel;
pub mod cutover;
pub mod freeze;
pub mod limits;
pub mod registry;
pub mod relay;
pub mod requests;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::AuthState;
use crate::config::Config;
use crate::routing::{Router, RoutingTable};
use crate::stats::Stats;
use crate::tls::TlsState;
use cancel::CancelTable;
use registry::{CloseOrder, CloseReason, SessionRegistry};

/// State shared by the listener, every session and (later) the controller.
pub struct Shared {
    pub config: ArcSwap<Config>,
    pub router: Router,
    pub stats: Stats,
    pub cancels: CancelTable,
    pub sessions: SessionRegistry,
    /// Clients holding a `max_clients` slot (routed or being routed).
    pub clients: AtomicUsize,
    /// Sessions per client address, for `[listen] max_clients_per_addr`.
    pub addr_limits: limits::AddrLimits,
    /// The live rustls configs of both hops; `tls.reload(&config)` swaps in re-read files.
    pub tls: TlsState,
    /// Auth termination (`[auth] mode = "scram"`): the verifier cache and sources, the held
    /// ClientKeys, the failure backoff, the auth mismatches seen; `auth.reload(&config)`
    /// re-reads the userlist and the secret file.
    pub auth: AuthState,
    /// Client refusals (shutdown, max_clients, routing, …) logged in full once per reason,
    /// then summarized per interval.
    pub refusals: crate::log_limit::Throttled<&'static str>,
    /// A transparent cutover's phase and login gate (`crate::cutover::procedure` drives it).
    pub cutover: cutover::CutoverCoordinator,
    pub shutting_down: AtomicBool,
}

/// Knobs that only tests and embedders set.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Seed for the random draws of non-sticky sessions (reproducible tests).
    pub routing_seed: Option<u64>,
    /// The routing table to start with (the controller's, from its saved state); by default
    /// the config's.
    pub initial_table: Option<RoutingTable>,
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    stop_accepting: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
}

impl Proxy {
    /// Binds `[listen] addr` and starts serving.
    pub async fn start(config: Config, options: ProxyOptions) -> anyhow::Result<Proxy> {
        let tls = TlsState::load(&config)
            .map_err(|errors| anyhow::anyhow!("cannot use the TLS files:\n{errors}"))?;
        let auth = AuthState::load(&config).map_err(|error| anyhow::anyhow!("{error}"))?;
        let listener = TcpListener::bind(config.listen.addr.as_str())
            .await
            .with_context(|| format!("cannot listen on {} ([listen] addr)", config.listen.addr))?;
        let local_addr = listener.local_addr()?;
        let router = Router::new(
            RoutingTable::from_config(&config.routing),
            options.routing_seed,
        );
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(config),
            router,
            stats: Stats::default(),
            cancels: CancelTable::default(),
            sessions: SessionRegistry::default(),
            clients: AtomicUsize::new(0),
            addr_limits: limits::AddrLimits::default(),
            tls,
            auth,
            refusals: crate::log_limit::Throttled::new(
                crate::log_limit::SUMMARY_INTERVAL,
                session::log_refusals,
            ),
            cutover: cutover::CutoverCoordinator::default(),
            shutting_down: AtomicBool::new(false),
        });
        let (stop_accepting, stop_rx) = watch::channel(false);
        tokio::spawn(retire_old_sessions(shared.clone(), stop_rx.clone()));
        let accept_loop = tokio::spawn(accept_clients(listener, shared.clone(), stop_rx));
        tracing::info!(addr = %local_addr, "pgshift listening");
        Ok(Proxy {
            shared,
            local_addr,
            stop_accepting,
            accept_loop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Graceful shutdown: refuse new clients (57P03), close each session at its next idle
    /// point (57P01), end the rest at `shutdown_timeout`, and return once none is left.
    pub async fn shutdown(self) {
        let shared = &self.shared;
        shared.shutting_down.store(true, Ordering::Release);
        // A transparent cutover under way stops first: its frozen sessions resume, then close
        // at their idle points like the others.
        if shared.cutover.request_abort("shutdown").is_some() {
            tracing::warn!("shutting down: the transparent cutover under way is aborted first");
        }
        let timeout = shared.config.load().listen.shutdown_timeout;
        let open = shared
            .sessions
            .order(None, CloseOrder::AtIdle(CloseReason::Shutdown));
        tracing::info!(
            open_sessions = open,
            ?timeout,
            "shutting down: closing sessions at their next idle point"
        );
        if !wait_for_sessions(shared, timeout).await {
            let left = shared
                .sessions
                .order(None, CloseOrder::Now(CloseReason::Shutdown));
            tracing::warn!(
                sessions = left,
                "shutdown_timeout passed: ending the remaining sessions"
            );
            wait_for_sessions(shared, Duration::from_secs(5)).await;
        }
        let _ = self.stop_accepting.send(true);
        let _ = self.accept_loop.await;
        tracing::info!("pgshift stopped");
    }
}

/// Waits until no session is open; false when `timeout` passed first.
async fn wait_for_sessions(shared: &Shared, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Sessions still being routed hold a client slot but are not registered yet.
        if shared.sessions.count(None) == 0 && shared.clients.load(Ordering::Acquire) == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How often sessions are checked against `[routing] max_session_age`.
const SESSION_AGE_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Asks sessions older than `[routing] max_session_age` (when set) to close at their next idle
/// point, so that application pools reconnect and follow the current weight.
async fn retire_old_sessions(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(SESSION_AGE_CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = ticks.tick() => {}
        }
        let max_age = shared.config.load().routing.max_session_age;
        if max_age.is_zero() {
            continue;
        }
        if let Some(cutoff) = std::time::Instant::now().checked_sub(max_age) {
            let retired = shared
                .sessions
                .order_started_before(cutoff, CloseReason::SessionAge);
            if retired > 0 {
                tracing::debug!(
                    sessions = retired,
                    ?max_age,
                    "sessions past max_session_age will close at their next idle point"
                );
            }
        }
    }
}

async fn accept_clients(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(session::serve_client(shared.clone(), stream, peer));
                }
                Err(error) => {
                    // Out of file descriptors or a connection reset before accept: keep serving.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}
